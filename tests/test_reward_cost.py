"""Inference-cost helpers (smoe_ops.reward.cost): they time what they say they time and
refuse what they cannot time. Figures themselves are for the benchmark, never asserted."""

import pytest
import torch

from smoe_ops.reward import SparseMoERewardModel
from smoe_ops.reward.cost import (
    median_seconds,
    personalization_seconds,
    profile_bytes,
    scoring_cost,
)
from smoe_ops.reward.personalization import UserProfile


def test_median_seconds_calls_the_function_and_returns_a_duration():
    calls = []
    seconds = median_seconds(lambda: calls.append(1), repeats=3, block_seconds=0.001)
    assert seconds > 0 and len(calls) >= 4  # one warm-up and at least one call per block


@pytest.mark.parametrize("hidden", [None, 8])
def test_scoring_cost_parts_and_rates(hidden):
    model = SparseMoERewardModel(6, 5, num_experts=4, k=2, expert_hidden=hidden)
    cost = scoring_cost(model, 16, UserProfile(torch.zeros(4)), repeats=2,
                        block_seconds=0.001)
    assert cost.batch == 16 and cost.seconds > 0
    assert cost.router_seconds > 0 and cost.routing_seconds > 0 and cost.expert_seconds > 0
    assert cost.pairs_per_second == pytest.approx(16 / cost.seconds)
    assert cost.us_per_pair == pytest.approx(1e6 * cost.seconds / 16)
    assert 0 < cost.router_share <= 1 and 0 < cost.expert_share <= 1
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        scoring_cost(model, 0)


def test_personalization_seconds_and_state():
    model = SparseMoERewardModel(6, 5, num_experts=4, k=2)
    for method in ("hedge", "map", "softmax"):
        assert personalization_seconds(model, 3, 2, method, repeats=1) > 0
    assert profile_bytes(model) == 16  # four float32 logits
