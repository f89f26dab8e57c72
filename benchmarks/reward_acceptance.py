"""Acceptance run of the sparse MoE reward model on prompt-region types; writes
docs/results.md and prints its table.

    python -m benchmarks.reward_acceptance            # 20,000 pairs, 20 epochs, ~1 minute
    python -m benchmarks.reward_acceptance --pairs 4000 --output -   # quick look, no file

Data: prompt_regions(4 clusters, 64-d features, one opposed pair of clusters), split
80/10/10 into train / validation (early stopping) / test (every accuracy below). Models
use the library defaults (SparseMoERewardModel, train, Regularizers) unless the row says.
"""

import argparse
import dataclasses
import time

import torch

from benchmarks.common import git_sha, machine, publish
from smoe_ops.reward import (
    Regularizers,
    SparseMoERewardModel,
    dense,
    evaluate,
    routing_report,
    single_head,
    train,
)
from smoe_ops.reward.report import matched_cosine, normalized_mutual_information
from smoe_ops.reward.synthetic import prompt_regions, user_types

# The acceptance thresholds.
MAX_POINTS_UNDER_ORACLE = 2.0
MIN_POINTS_OVER_SINGLE_HEAD = 10.0
MIN_NMI = 0.8
MIN_MATCHED_COSINE = 0.9
MAX_TRAIN_SECONDS = 60.0
MIN_USER_NMI = 0.8
NUM_USERS, PAIRS_PER_USER = 300, 20
# TODO: tune the user-level defaults (these beat the library defaults on seed 0; the
# library's sparsity and balance terms slow the per-user logits down) and fold them in.
USER_LEVEL_TRAIN = dict(epochs=40, lr=0.05, patience=10, objective="user_mixture",
                        regularizers=Regularizers(sparsity=0.0, balance=0.0, diversity=0.0))


def ablations():
    defaults = Regularizers()
    return [
        ("sparse MoE K=8 k=2 (defaults)", dict(num_experts=8, k=2), defaults),
        ("sparse MoE, local sparsity off", dict(num_experts=8, k=2),
         dataclasses.replace(defaults, sparsity=0.0)),
        ("sparse MoE, global balance off", dict(num_experts=8, k=2),
         dataclasses.replace(defaults, balance=0.0)),
        ("sparse MoE, balance = Switch loss", dict(num_experts=8, k=2),
         dataclasses.replace(defaults, balance_kind="switch")),
        ("sparse MoE, diversity off", dict(num_experts=8, k=2),
         dataclasses.replace(defaults, diversity=0.0)),
        ("sparse MoE, all regularizers off", dict(num_experts=8, k=2),
         Regularizers(sparsity=0.0, balance=0.0, diversity=0.0)),
        ("dense MoE K=8 (no sparsity term)", "dense", Regularizers(sparsity=0.0)),
        ("single-head BT", "single", Regularizers()),
    ]


def run(num_pairs: int, epochs: int, seed: int):
    torch.manual_seed(seed)
    generated = prompt_regions(num_pairs, num_clusters=4, context_dim=64, response_dim=64,
                               seed=seed)
    train_data, held_out = generated.data.split(0.8, seed=seed)
    val_data, test_data = held_out.split(0.5, seed=seed)
    oracle = generated.oracle_accuracy(test_data)
    # One short untimed run first: the first call pays for thread-pool and allocator start.
    train(SparseMoERewardModel(64, 64), val_data, epochs=1, progress=False)
    rows = []
    for name, shape, regularizers in ablations():
        if shape == "dense":
            model = dense(64, 64, 8, seed=seed)
        elif shape == "single":
            model = single_head(64, 64, seed=seed)
        else:
            model = SparseMoERewardModel(64, 64, seed=seed, **shape)
        started = time.perf_counter()
        history = train(model, train_data, val_data, epochs=epochs, regularizers=regularizers,
                        seed=seed, progress=False)
        seconds = time.perf_counter() - started
        report = routing_report(model, test_data)
        cosine = (matched_cosine(model.head_weights().detach(), generated.true_rewards)
                  if model.num_experts >= 4 else float("nan"))
        rows.append(dict(name=name, accuracy=evaluate(model, test_data), nmi=report.nmi,
                         cosine=cosine, dead=len(report.dead_experts), epochs=len(history),
                         seconds=seconds))
    # The time check is for the full epoch count: early stopping above ends sooner, so the
    # default model is timed again with it switched off.
    model = SparseMoERewardModel(64, 64, seed=seed)
    started = time.perf_counter()
    train(model, train_data, epochs=epochs, seed=seed, patience=None, progress=False)
    rows[0]["full_seconds"] = time.perf_counter() - started
    return oracle, len(train_data), rows


def run_user_level(num_types: int, seed: int) -> dict:
    generated = user_types(NUM_USERS, PAIRS_PER_USER, num_types=num_types, seed=seed)
    train_data, held_out = generated.data.split(0.8, seed=seed)
    val_data, test_data = held_out.split(0.5, seed=seed)
    model = SparseMoERewardModel(64, 64, num_experts=num_types, k=2, num_users=NUM_USERS,
                                 seed=seed)
    train(model, train_data, val_data, seed=seed, progress=False, **USER_LEVEL_TRAIN)
    baseline = single_head(64, 64, seed=seed)
    train(baseline, train_data, val_data, epochs=20, seed=seed, progress=False)
    with torch.no_grad():
        users = torch.arange(NUM_USERS)
        no_pairs = torch.zeros(NUM_USERS, 64)
        routing, *_ = model.user_expert_margins(users, no_pairs, no_pairs)
    nmi = normalized_mutual_information(routing.ids[:, 0].long(), generated.user_types)
    return dict(types=num_types, oracle=generated.oracle_accuracy(test_data),
                accuracy=evaluate(model, test_data, "user_mixture"),
                single=evaluate(baseline, test_data), nmi=nmi)


def user_markdown(user_rows) -> list:
    lines = [
        "",
        f"## User-level types ({NUM_USERS} users x {PAIRS_PER_USER} pairs, same prompts "
        "for every type)",
        "",
        "Objective `user_mixture`, K = number of types, k = 2, trained with "
        f"`{USER_LEVEL_TRAIN}` (not the library defaults). NMI: each user's top expert "
        "against its true type.",
        "",
        "| types | test acc | oracle | single-head BT | NMI | NMI >= 0.8 |",
        "|---|---|---|---|---|---|",
    ]
    for row in user_rows:
        lines.append(
            f"| {row['types']} | {100 * row['accuracy']:.2f}% | {100 * row['oracle']:.2f}% | "
            f"{100 * row['single']:.2f}% | {row['nmi']:.3f} | "
            f"{'pass' if row['nmi'] >= MIN_USER_NMI else 'FAIL'} |"
        )
    return lines


def markdown(oracle, num_train, rows, args, user_rows=()) -> str:
    main, single = rows[0], rows[-1]
    checks = [
        (f"test accuracy within {MAX_POINTS_UNDER_ORACLE:g} points of the oracle",
         100 * (oracle - main["accuracy"]) <= MAX_POINTS_UNDER_ORACLE),
        (f"at least {MIN_POINTS_OVER_SINGLE_HEAD:g} points above the single-head BT",
         100 * (main["accuracy"] - single["accuracy"]) >= MIN_POINTS_OVER_SINGLE_HEAD),
        (f"NMI(argmax routing, true cluster) >= {MIN_NMI}", main["nmi"] >= MIN_NMI),
        (f"matched cosine to the true reward vectors >= {MIN_MATCHED_COSINE}",
         main["cosine"] >= MIN_MATCHED_COSINE),
        ("no dead experts", main["dead"] == 0),
        (f"training {num_train} pairs for {args.epochs} full epochs under "
         f"{MAX_TRAIN_SECONDS:g} s (measured {main['full_seconds']:.1f} s)",
         main["full_seconds"] < MAX_TRAIN_SECONDS),
    ]
    lines = [
        "# Sparse MoE reward model: acceptance results",
        "",
        f"Generated by `python -m benchmarks.reward_acceptance --pairs {args.pairs} "
        f"--epochs {args.epochs} --seed {args.seed}` at git {git_sha()} on {machine()}.",
        "",
        f"prompt_regions: 4 clusters, 64-d context and response features, {args.pairs} pairs "
        f"({num_train} train, the rest split evenly into validation for early stopping and "
        f"test). Oracle (Bayes) test accuracy: **{100 * oracle:.2f}%**.",
        "",
        "| model | test acc | vs oracle (pts) | NMI | matched cos | dead | epochs | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        nmi = "-" if row["nmi"] is None else f"{row['nmi']:.3f}"
        lines.append(
            f"| {row['name']} | {100 * row['accuracy']:.2f}% | "
            f"{100 * (row['accuracy'] - oracle):+.2f} | {nmi} | {row['cosine']:.3f} | "
            f"{row['dead']} | {row['epochs']} | {row['seconds']:.1f} |"
        )
    lines += ["", "| acceptance check (defaults row) | result |", "|---|---|"]
    lines += [f"| {text} | {'pass' if passed else 'FAIL'} |" for text, passed in checks]
    if user_rows:
        lines += user_markdown(user_rows)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="docs/results.md", help="'-': print only")
    args = parser.parse_args(argv)
    oracle, num_train, rows = run(args.pairs, args.epochs, args.seed)
    user_rows = [run_user_level(num_types, args.seed) for num_types in (4, 6)]
    text = markdown(oracle, num_train, rows, args, user_rows)
    publish(text, args.output)


if __name__ == "__main__":
    main()
