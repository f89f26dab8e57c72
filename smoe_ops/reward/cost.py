"""Inference cost of the reward model: what a scored (prompt, response) pair costs, with
and without a user profile, split into the router's share and the experts' share, and
what personalization costs.

Scoring one pair is `model.reward(context, response)`: the router's K logits (a [Dc, K]
product, whatever k is), top-k routing, and the k routed experts on the response. Times are
medians of `repeats` timed blocks, each running the call enough times to last about
`block_seconds`, after one warm-up block; features are cached (already encoded).
"""

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import smoe_ops
from smoe_ops.reward.data import PreferenceData
from smoe_ops.reward.personalization import UserProfile, personalize_batch

__all__ = ["ScoringCost", "median_seconds", "personalization_seconds", "profile_bytes",
           "scoring_cost"]


def median_seconds(call: Callable[[], object], repeats: int = 5,
                   block_seconds: float = 0.02) -> float:
    """Median seconds per call over `repeats` blocks (one warm-up block first)."""
    call()
    started, calls = time.perf_counter(), 0
    while time.perf_counter() - started < block_seconds or calls == 0:
        call()
        calls += 1
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - started) / calls)
    return statistics.median(samples)


@dataclass
class ScoringCost:
    """Cost of scoring `batch` pairs with one `model.reward` call.

    seconds: the whole call. router_seconds: the router's K logits (a [B, Dc] x [Dc, K]
    product, whatever k is). routing_seconds: top-k routing of those logits.
    expert_seconds: the k routed experts' rewards and their weighted sum. The three parts
    are timed on their own, so they need not add up to `seconds` exactly.
    """

    batch: int
    seconds: float
    router_seconds: float
    routing_seconds: float
    expert_seconds: float

    @property
    def us_per_pair(self) -> float:
        return 1e6 * self.seconds / self.batch

    @property
    def pairs_per_second(self) -> float:
        return self.batch / self.seconds

    @property
    def router_share(self) -> float:
        return min(1.0, self.router_seconds / self.seconds)

    @property
    def expert_share(self) -> float:
        return min(1.0, self.expert_seconds / self.seconds)


@torch.no_grad()
def scoring_cost(model, batch: int, profile: Optional[UserProfile] = None,
                 repeats: int = 5, block_seconds: float = 0.02, seed: int = 0
                 ) -> ScoringCost:
    """Time `model.reward` on `batch` random cached feature rows (with `profile`, the
    personalized path), and its three parts on their own."""
    if batch < 1:
        raise ValueError(f"scoring_cost: batch must be >= 1, got {batch}")
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, model.config["context_dim"], generator=generator)
    response = torch.randn(batch, model.config["response_dim"], generator=generator)
    model.eval()
    seconds = median_seconds(lambda: model.reward(context, response, profile=profile),
                             repeats, block_seconds)
    router_seconds = median_seconds(lambda: model.population_logits(context), repeats,
                                    block_seconds)
    logits = model.population_logits(context)
    k = model.population_k  # what model.reward routes on
    if profile is not None:
        logits, k = profile.routing_logits(logits), model.k
    logits = logits.contiguous()
    score = model.config["score"]
    routing_seconds = median_seconds(lambda: smoe_ops.route(logits, k, score=score),
                                     repeats, block_seconds)
    routing = smoe_ops.route(logits, k, score=score)
    expert_seconds = median_seconds(
        lambda: (routing.weights * model.expert_rewards(response, routing)).sum(1),
        repeats, block_seconds)
    return ScoringCost(batch, seconds, router_seconds, routing_seconds, expert_seconds)


def personalization_seconds(model, num_users: int, pairs_per_user: int,
                            method: str = "map", repeats: int = 3, seed: int = 0) -> float:
    """Median seconds to personalize `num_users` users with `pairs_per_user` labelled
    pairs each, in one batched call."""
    generator = torch.Generator().manual_seed(seed)
    num_pairs = num_users * pairs_per_user
    data = PreferenceData(
        torch.randn(num_pairs, model.config["context_dim"], generator=generator),
        torch.randn(num_pairs, model.config["response_dim"], generator=generator),
        torch.randn(num_pairs, model.config["response_dim"], generator=generator),
        user_ids=torch.arange(num_users).repeat_interleave(pairs_per_user))
    return median_seconds(lambda: personalize_batch(model, data, method), repeats,
                          block_seconds=0.0)


def profile_bytes(model) -> int:
    """Bytes of per-user state: the K float32 routing logits of a profile."""
    return 4 * model.num_experts
