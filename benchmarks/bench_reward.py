"""Inference cost of the sparse MoE reward model: scoring and personalization.

    python -m benchmarks.bench_reward --out docs      # the full sweep behind
                                                      # docs/inference-cost.md
    python -m benchmarks.bench_reward --quick         # a few rows, printed only

Scoring: microseconds per pair and pairs per second of `model.reward` on cached features
(384-d context and response rows already in memory), population and personalized (a
`UserProfile`), at batch 1, 64 and 4096, K in {4, 16, 64}, k in {1, 2}, linear experts
and MLP experts (hidden 256), against the dense MoE (k = K) of the same experts measured in
the same run, and the single head. Each row splits the time into the router's K-wide
product, the top-k routing and the k routed experts (each timed on its own).

Ceiling: scoring must at least read each pair's features once, 4 (Dc + Dr) bytes, so the
pairs-per-second ceiling is the measured large-copy bandwidth over those bytes.

Personalization: seconds to fit one user and 10,000 users (16 labelled pairs each) in one
batched call, for each method; the per-user state in bytes.
"""

import argparse
import logging
import os
import sys
from typing import Optional

import torch
from tqdm import tqdm

from benchmarks.common import copy_bandwidth_gbs, git_sha, machine
from smoe_ops.reward import SparseMoERewardModel
from smoe_ops.reward.cost import personalization_seconds, profile_bytes, scoring_cost
from smoe_ops.reward.personalization import METHODS, UserProfile

FEATURES = 384
MLP_HIDDEN = 256
BATCHES = (1, 64, 4096)
EXPERT_COUNTS = (4, 16, 64)
TOPK = (1, 2)

# Targets of the issue (2 cores, cached 384-d features).
MIN_LINEAR_PAIRS_PER_SECOND = 1e6  # personalized, linear experts, K=16 k=2 batch 4096
MAX_MLP_K64_OVER_K4 = 1.5  # MLP experts, k=2, batch 4096: cost grows with k, not K
MAX_PERSONALIZE_10K_SECONDS = 1.0  # 10,000 users x 16 pairs, one batched call

logger = logging.getLogger("smoe_ops")


def _model(kind: str, num_experts: int, k: int) -> SparseMoERewardModel:
    hidden = MLP_HIDDEN if kind == "mlp" else None
    return SparseMoERewardModel(FEATURES, FEATURES, num_experts=num_experts, k=k,
                                expert_hidden=hidden, seed=0).eval()


def _cases(quick: bool):
    """(kind, K, k, batch, personalized) in the order they are measured. Quick: batch
    4096, personalized, K in {4, 16, 64}, k = 2 and the dense MoE: what the targets need."""
    batches = (4096,) if quick else BATCHES
    counts = (4, 16, 64) if quick else EXPERT_COUNTS
    topk = (2,) if quick else TOPK
    profiles = (True,) if quick else (False, True)
    for kind in ("linear", "mlp"):
        for batch in batches:
            if not quick:
                yield kind, 1, 1, batch, False  # the single head
            for num_experts in counts:
                for k in topk + (num_experts,):  # k = K: the dense MoE
                    for personalized in profiles:
                        yield kind, num_experts, k, batch, personalized


def measure_scoring(quick: bool, repeats: int, progress: bool = True) -> list:
    cases = list(_cases(quick))
    rows, models = [], {}
    for kind, num_experts, k, batch, personalized in tqdm(
            cases, desc="scoring", unit="case", disable=not progress):
        key = (kind, num_experts, k)
        if key not in models:
            models[key] = _model(kind, num_experts, k)
        model = models[key]
        profile = (UserProfile(torch.randn(num_experts, generator=torch.Generator()
                                           .manual_seed(1))) if personalized else None)
        cost = scoring_cost(model, batch, profile, repeats=repeats)
        rows.append(dict(kind=kind, experts=num_experts, k=k, batch=batch,
                         personalized=personalized, cost=cost))
    return rows


def measure_personalization(repeats: int, num_experts: int = 16, pairs: int = 16) -> list:
    model = _model("linear", num_experts, 2)
    rows = []
    for method in METHODS:
        for users in (1, 10_000):
            seconds = personalization_seconds(model, users, pairs, method, repeats=repeats)
            rows.append(dict(method=method, users=users, pairs=pairs, seconds=seconds))
    return rows


def _find(rows, **match) -> Optional[dict]:
    for row in rows:
        if all(row[key] == value for key, value in match.items()):
            return row
    return None


def _time(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.2f} us"


def scoring_table(rows, ceiling_pairs_per_second: float) -> list:
    lines = [
        "| experts | K | k | batch | profile | per pair | pairs/s | router | routing | "
        "experts | vs dense (k=K) | % ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cost = row["cost"]
        dense = _find(rows, kind=row["kind"], experts=row["experts"], k=row["experts"],
                      batch=row["batch"], personalized=row["personalized"])
        versus = ("-" if dense is None or row["k"] == row["experts"]
                  else f"{dense['cost'].seconds / cost.seconds:.2f}x")
        kind = "linear" if row["kind"] == "linear" else f"MLP {MLP_HIDDEN}"
        label = f"single head, {kind}" if row["experts"] == 1 else kind
        lines.append(
            f"| {label} | {row['experts']} | {row['k']} | {row['batch']} | "
            f"{'user' if row['personalized'] else 'population'} | "
            f"{_time(cost.us_per_pair)} | {cost.pairs_per_second:,.0f} | "
            f"{100 * cost.router_share:.0f}% | "
            f"{100 * min(1.0, cost.routing_seconds / cost.seconds):.0f}% | "
            f"{100 * cost.expert_share:.0f}% | {versus} | "
            f"{100 * cost.pairs_per_second / ceiling_pairs_per_second:.1f}% |")
    return lines


def personalization_table(rows) -> list:
    lines = ["| method | users | pairs per user | seconds | per user |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['users']:,} | {row['pairs']} | "
                     f"{row['seconds']:.4f} | {_time(1e6 * row['seconds'] / row['users'])} |")
    return lines


def target_checks(scoring, personalization) -> list:
    """(text, measured, passed) for each target the sweep covers."""
    checks = []
    linear = _find(scoring, kind="linear", experts=16, k=2, batch=4096, personalized=True)
    if linear is not None:
        rate = linear["cost"].pairs_per_second
        checks.append(("personalized scoring, linear experts, K=16 k=2 batch 4096: "
                       f">= {MIN_LINEAR_PAIRS_PER_SECOND:,.0f} pairs/s", f"{rate:,.0f} pairs/s",
                       rate >= MIN_LINEAR_PAIRS_PER_SECOND))
    small = _find(scoring, kind="mlp", experts=4, k=2, batch=4096, personalized=True)
    large = _find(scoring, kind="mlp", experts=64, k=2, batch=4096, personalized=True)
    if small is not None and large is not None:
        ratio = large["cost"].seconds / small["cost"].seconds
        dense_small = _find(scoring, kind="mlp", experts=4, k=4, batch=4096,
                            personalized=True)
        dense_large = _find(scoring, kind="mlp", experts=64, k=64, batch=4096,
                            personalized=True)
        dense = ("" if dense_small is None or dense_large is None else
                 f" (dense MoE: {dense_large['cost'].seconds / dense_small['cost'].seconds:.1f}x)")
        checks.append((f"MLP experts, k=2 batch 4096: time at K=64 / K=4 <= "
                       f"{MAX_MLP_K64_OVER_K4}", f"{ratio:.2f}x{dense}",
                       ratio <= MAX_MLP_K64_OVER_K4))
    many = _find(personalization, method="map", users=10_000)
    if many is not None:
        checks.append((f"10,000 users x 16 pairs personalized (map) in under "
                       f"{MAX_PERSONALIZE_10K_SECONDS:g} s", f"{many['seconds']:.2f} s",
                       many["seconds"] < MAX_PERSONALIZE_10K_SECONDS))
    return checks


def markdown(scoring, personalization, bandwidth_gbs: float, command: str) -> str:
    ceiling = bandwidth_gbs * 1e9 / (4 * 2 * FEATURES)
    state = profile_bytes(_model("linear", 16, 2))
    lines = [
        "# Inference cost of the sparse MoE reward model",
        "",
        f"Written by `{command}` at git {git_sha()} on {machine()}. Median of several "
        "timed blocks per row, after a warm-up; features cached (384-d context and "
        "response rows in memory).",
        "",
        "Per pair: the router's K logits (a [B, 384] x [384, K] product, whatever k is), "
        "top-k routing, and the k routed experts. The router, routing and experts columns "
        "are each part's own time as a share of the whole call (timed separately, so they "
        "need not add to 100%). `vs dense`: the dense MoE (k = K, same experts) time over "
        "this row's, same run. `% ceiling`: pairs/s over the feature-read ceiling, "
        f"{bandwidth_gbs:.1f} GB/s (measured large copy) / {4 * 2 * FEATURES} bytes per "
        f"pair = {ceiling:,.0f} pairs/s.",
        "",
        *scoring_table(scoring, ceiling),
        "",
        "## Personalization (K = 16 linear experts, batched over users)",
        "",
        *personalization_table(personalization),
        "",
        f"Per-user state: {state} bytes at K = 16 (K float32 routing logits; "
        "4 K bytes in general).",
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    for text, measured, passed in target_checks(scoring, personalization):
        lines.append(f"| {text} | {measured} | {'met' if passed else '**not met**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few rows (about 20 s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per row")
    parser.add_argument("--out", default=None,
                        help="folder for inference-cost.md (default: print only)")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.bench_reward " + " ".join(argv or sys.argv[1:])
    bandwidth = copy_bandwidth_gbs()
    scoring = measure_scoring(args.quick, args.repeats)
    personalization = measure_personalization(max(1, args.repeats // 2))
    text = markdown(scoring, personalization, bandwidth, command.strip())
    sys.stdout.write(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "inference-cost.md"), "w") as file:
            file.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
