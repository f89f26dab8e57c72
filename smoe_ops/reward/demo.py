"""The end-to-end demo behind `smoe-ops demo`: train, read the routing, personalize new
users, and measure what scoring costs, writing every artifact into one folder.

Three acts, on synthetic data with known ground truth:

1. Prompt-region types (`synthetic.prompt_regions`): the context says which of 4 clusters
   a prompt is from, and each cluster has its own reward vector, two of them in direct
   conflict. A sparse MoE (K = 8, k = 2) and the single-head BT train on the same pairs;
   the routing report, its PNGs and the model are written out.
2. User-level types (`synthetic.user_types`): users of 4 types label pairs on the same
   prompts. The user-level mixture trains on some users; new users personalize from a few
   labels, experts frozen. The few-shot table compares MAP, hedge, softmax reweighting,
   a per-user logistic regression and the single-head BT against the per-user oracle, and
   a few profiles are saved with their shift reports.
3. Inference cost: pairs per second of population and personalized scoring, and the
   time to personalize 10,000 users at once.

`run_demo` returns the tables (markdown) and a summary dict; it logs and shows progress
bars but prints nothing (the CLI prints).
"""

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Dict

import torch
from tqdm.auto import tqdm

from smoe_ops._io import write_atomically
from smoe_ops.reward.cost import personalization_seconds, profile_bytes, scoring_cost
from smoe_ops.reward.losses import Regularizers
from smoe_ops.reward.model import SparseMoERewardModel, single_head
from smoe_ops.reward.personalization import (
    UserProfile,
    personalize_batch,
    personalized_probability,
    shift_report,
)
from smoe_ops.reward.protocols import few_shot_curve
from smoe_ops.reward.report import matched_cosine, routing_report
from smoe_ops.reward.synthetic import prompt_regions, user_types
from smoe_ops.reward.train import evaluate, save, train

__all__ = ["DemoResult", "run_demo"]

logger = logging.getLogger("smoe_ops")

# User-level mixture training (as in benchmarks/personalization.py: the library defaults'
# sparsity and balance terms slow the per-user logits down; see the TODO there).
_USER_LEVEL_TRAIN = dict(epochs=25, lr=0.05, patience=8, objective="user_mixture",
                         regularizers=Regularizers(sparsity=0.0, balance=0.0, diversity=0.0))


@dataclasses.dataclass
class DemoResult:
    """What the demo measured: markdown tables by name and a JSON-ready summary."""

    tables: Dict[str, str]
    summary: dict
    files: list


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _act_regions(out: Path, pairs: int, seed: int, files: list) -> tuple:
    made = prompt_regions(pairs, num_clusters=4, context_dim=64, response_dim=64, seed=seed)
    train_data, held_out = made.data.split(0.8, seed=seed)
    val_data, test_data = held_out.split(0.5, seed=seed)
    model = SparseMoERewardModel(64, 64, num_experts=8, k=2, seed=seed)
    started = time.perf_counter()
    history = train(model, train_data, val_data, seed=seed, progress=True)
    seconds = time.perf_counter() - started
    baseline = single_head(64, 64, seed=seed)
    train(baseline, train_data, val_data, seed=seed, progress=False)

    report = routing_report(model, test_data)
    files.append(out / "model.safetensors")
    save(model, files[-1])
    files.append(out / "report.md")
    write_atomically(files[-1], report.to_markdown())
    files.append(out / "report.json")
    write_atomically(files[-1], json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    try:
        from smoe_ops.reward.plots import save_report_plots

        files.extend(save_report_plots(report, out))
    except ImportError as error:  # matplotlib is an optional extra
        logger.warning("demo: no plots (%s); install smoe_ops[plots]", error)

    summary = dict(pairs=pairs, oracle=made.oracle_accuracy(test_data),
                   sparse_moe=evaluate(model, test_data), single_head=evaluate(baseline,
                                                                             test_data),
                   nmi=report.nmi, ari=report.ari, dead_experts=report.dead_experts,
                   matched_cosine=matched_cosine(model.head_weights().detach(),
                                                 made.true_rewards),
                   epochs=len(history), train_seconds=seconds)
    rows = [("sparse MoE K=8 k=2", f"{summary['sparse_moe']:.1%}"),
            ("single-head BT", f"{summary['single_head']:.1%}"),
            ("oracle (Bayes)", f"{summary['oracle']:.1%}")]
    table = _table(("model", "test accuracy"), rows) + (
        f"\nRouting against the true clusters: NMI {report.nmi:.3f}, ARI {report.ari:.3f}; "
        f"matched expert cosine {summary['matched_cosine']:.3f}; dead experts "
        f"{len(report.dead_experts)}; trained in {seconds:.1f} s ({len(history)} epochs).\n")
    return table, summary


def _act_users(out: Path, train_users: int, held_out_users: int, resamples: int, seed: int,
               files: list) -> tuple:
    made = user_types(train_users + held_out_users, 40, num_types=4, context_dim=64,
                      response_dim=64, seed=seed)
    seen = made.data[made.data.user_ids < train_users]
    new_users = made.data[made.data.user_ids >= train_users]
    train_data, val_data = seen.split(0.9, seed=seed)
    model = SparseMoERewardModel(64, 64, num_experts=4, k=2, num_users=train_users,
                                 seed=seed)
    train(model, train_data, val_data, seed=seed, progress=True, **_USER_LEVEL_TRAIN)
    baseline = single_head(64, 64, seed=seed)
    train(baseline, train_data, val_data, seed=seed, progress=False)
    files.append(out / "user_model.safetensors")
    save(model, files[-1])

    curve = few_shot_curve(
        model, new_users, shots=(0, 1, 2, 4, 8, 16), resamples=resamples,
        baselines={"single-head BT": lambda test: personalized_probability(baseline, test)},
        oracle=made.oracle_accuracy, eval_pairs=8, seed=seed, progress=True)
    table = curve.to_markdown() + (
        f"\nMAP with 8 labels closes {curve.gap_closed('map', 8):.0%} of the gap from the "
        f"population model to the per-user oracle; labels to reach 90% of the oracle: MAP "
        f"{curve.labels_to_reach('map')}, logistic regression "
        f"{curve.labels_to_reach('logistic')}.\n")

    # Three new users, each from 8 labels: their profiles and how far each moved.
    profile_dir = out / "profiles"
    profile_dir.mkdir(exist_ok=True)
    first_users = torch.unique(new_users.user_ids)[:3]
    eight = torch.cat([torch.nonzero(new_users.user_ids == u).flatten()[:8]
                       for u in first_users])
    profiles = personalize_batch(model, new_users[eight], "map").profiles()
    shifts = []
    for user, profile in profiles.items():
        files.append(profile_dir / f"user_{user}.safetensors")
        profile.save(files[-1])
        shift = shift_report(model, profile)
        shifts.append((user, int(made.user_types[user]), f"{shift.kl:.2f}",
                       ", ".join(map(str, shift.gained)) or "-",
                       ", ".join(map(str, shift.lost)) or "-"))
    table += "\n" + _table(("new user", "true type", "KL from population",
                            "experts gained", "experts lost"), shifts)
    summary = dict(train_users=train_users, held_out_users=held_out_users,
                   resamples=resamples, shots=curve.shots,
                   accuracy={name: curve.mean(name) for name in curve.accuracy},
                   oracle=curve.oracle, gap_closed_map_8=curve.gap_closed("map", 8))
    return table, summary


def _act_cost(batch: int, users: int) -> tuple:
    rows, summary = [], {}
    cases = [("linear", 16, 2, None), ("linear", 16, 16, None), ("MLP 256", 4, 2, 256),
             ("MLP 256", 64, 2, 256), ("MLP 256", 64, 64, 256)]
    for name, num_experts, k, hidden in tqdm(cases, desc="inference cost", unit="case"):
        model = SparseMoERewardModel(384, 384, num_experts=num_experts, k=k,
                                     expert_hidden=hidden, seed=0)
        profile = UserProfile(torch.randn(num_experts, generator=torch.Generator()
                                          .manual_seed(1)))
        # The dense MLP MoE is 32x the work: one batch a tenth the size keeps it short.
        rows_batch = batch if k < num_experts or hidden is None else max(1, batch // 8)
        cost = scoring_cost(model, rows_batch, profile, repeats=3)
        key = f"{name} K={num_experts} k={k}"
        summary[key] = cost.pairs_per_second
        rows.append((name, num_experts, k, rows_batch, f"{cost.us_per_pair:.2f}",
                     f"{cost.pairs_per_second:,.0f}", f"{cost.router_share:.0%}",
                     f"{cost.expert_share:.0%}"))
    table = _table(("experts", "K", "k", "batch", "us per pair", "pairs/s", "router",
                    "experts"), rows)
    model = SparseMoERewardModel(384, 384, num_experts=16, k=2, seed=0)
    seconds = personalization_seconds(model, users, 16, "map", repeats=1)
    summary["personalize_seconds"] = seconds
    table += (f"\nPersonalized scoring of cached 384-d features, {torch.get_num_threads()} "
              f"threads; router and experts: each part's own time as a share of the call. "
              f"Personalizing {users:,} users x 16 labels (MAP, K=16) in one call: "
              f"{seconds:.2f} s; per-user state {profile_bytes(model)} bytes.\n")
    return table, summary


def run_demo(out_dir, seed: int = 0, pairs: int = 20000, train_users: int = 300,
             held_out_users: int = 100, resamples: int = 20, cost_batch: int = 4096,
             cost_users: int = 10_000, skip_cost: bool = False) -> DemoResult:
    """Run the three acts, writing every artifact into `out_dir` (created if missing);
    see the module docstring. Sizes are parameters so tests can run a small demo."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"run_demo: out_dir must be a folder, got the file {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    files, tables, summary = [], {}, {"seed": seed}
    started = time.perf_counter()
    tables["prompt regions"], summary["prompt_regions"] = _act_regions(out, pairs, seed,
                                                                        files)
    tables["few-shot personalization"], summary["user_types"] = _act_users(
        out, train_users, held_out_users, resamples, seed, files)
    if not skip_cost:
        tables["inference cost"], summary["inference_cost"] = _act_cost(cost_batch,
                                                                         cost_users)
    summary["seconds"] = time.perf_counter() - started

    text = "# smoe-ops demo\n\n" + "\n".join(f"## {name}\n\n{table}"
                                             for name, table in tables.items())
    files.append(out / "demo.md")
    write_atomically(files[-1], text)
    files.append(out / "demo.json")
    write_atomically(files[-1], json.dumps(summary, indent=2, default=float) + "\n")
    logger.info("demo: %d files in %s after %.0f s", len(files), out, summary["seconds"])
    return DemoResult(tables, summary, [str(path) for path in files])
