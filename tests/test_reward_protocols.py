"""Evaluation protocols (smoe_ops.reward.protocols): the few-shot curve's splits, its
summaries, the per-user logistic baseline, and personalization closing the gap to the
oracle on planted user types."""

import math

import pytest
import torch
import torch.nn.functional as F

from smoe_ops.reward import PreferenceData, SparseMoERewardModel, synthetic
from smoe_ops.reward.em import init_user_mixture
from smoe_ops.reward.protocols import (
    FewShotCurve,
    _split,
    _tie_accuracy,
    adapt_and_score,
    few_shot_curve,
    group_accuracy,
    logistic_probability,
)


def user_level_model(num_types=3, dim=16, users=160, pairs=40, seed=0):
    made = synthetic.user_types(users, pairs, num_types=num_types, response_dim=dim,
                                context_dim=4, seed=seed)
    model = SparseMoERewardModel(4, dim, num_experts=num_types, k=2, num_users=users,
                                 seed=seed)
    init_user_mixture(model, made.data[made.data.user_ids < users // 2], seed=seed)
    return made, model, made.data[made.data.user_ids >= users // 2]


def test_split_keeps_users_apart_and_sizes_right():
    users = torch.tensor([0] * 5 + [1] * 2 + [2] * 1)
    data = PreferenceData(torch.zeros(8, 1), torch.zeros(8, 1), torch.zeros(8, 1),
                          user_ids=users)
    rank, test_size, pool = _split(data, None, torch.Generator().manual_seed(0))
    for user, size in ((0, 5), (1, 2), (2, 1)):
        mine = users == user
        assert sorted(rank[mine].tolist()) == list(range(size))  # a permutation per user
        assert int(test_size[mine][0]) == (size + 1) // 2
        assert int(pool[mine][0]) == size - (size + 1) // 2
    _, test_size, _ = _split(data, 3, torch.Generator().manual_seed(0))
    assert test_size.tolist() == [3] * 5 + [2] * 2 + [1]


def test_tie_accuracy_counts_a_coin_as_half():
    assert _tie_accuracy(torch.tensor([0.9, 0.5, 0.2, 0.5])) == pytest.approx(0.5)
    assert math.isnan(_tie_accuracy(torch.zeros(0)))


def test_logistic_regression_is_the_per_user_optimum():
    gen = torch.Generator().manual_seed(0)
    users = torch.tensor([4, 4, 4, 9, 9, 4, 9, 9, 9])
    train = PreferenceData(torch.zeros(9, 1), torch.randn(9, 3, generator=gen),
                           torch.randn(9, 3, generator=gen), user_ids=users)
    test = PreferenceData(torch.zeros(3, 1), torch.randn(3, 3, generator=gen),
                          torch.randn(3, 3, generator=gen), user_ids=torch.tensor([9, 4, 5]))
    probability = logistic_probability(train, test, l2=0.7, steps=30)
    for row, user in enumerate([9, 4]):
        mine = train[users == user]
        diff = (mine.chosen - mine.rejected).double()
        weights = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weights], max_iter=200, tolerance_grad=1e-12)

        def closure():
            optimizer.zero_grad()
            loss = -F.logsigmoid(diff @ weights).sum() + 0.35 * weights.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        expected = torch.sigmoid((test.chosen[row] - test.rejected[row]).double()
                                 @ weights.detach())
        assert float(probability[row]) == pytest.approx(float(expected), abs=1e-6)
    assert float(probability[2]) == 0.5  # user 5 has no train pairs


def test_curve_closes_the_gap_and_rises():
    made, model, held_out = user_level_model()
    curve = few_shot_curve(model, held_out, shots=(0, 2, 8, 16), resamples=3, eval_pairs=20,
                           oracle=made.oracle_accuracy, progress=False)
    assert curve.users == [80, 80, 80, 80]
    assert set(curve.accuracy) == {"population", "map", "hedge", "softmax", "logistic"}
    mean = curve.mean("map")
    assert mean[0] == curve.mean("population")[0]  # n = 0 is the population
    assert mean[0] < mean[1] < mean[2] <= mean[3] + 0.01
    assert curve.gap_closed("map", 8) > 0.7
    assert curve.labels_to_reach("map") is not None
    assert curve.mean("logistic")[0] == 0.5  # no labels: a coin
    table = curve.to_markdown()
    assert "| map |" in table and "per-user oracle" in table and "users scored" in table


def test_users_with_small_pools_sit_out():
    made, model, held_out = user_level_model(users=20, pairs=6)
    curve = few_shot_curve(model, held_out, shots=(0, 3, 4), resamples=1, progress=False,
                           logistic=False, methods=("hedge",))
    assert curve.users == [10, 10, 0]  # 6 pairs: 3 to test, 3 in the pool
    assert math.isnan(curve.mean("hedge")[2])


def test_baselines_and_seeded_rounds():
    made, model, held_out = user_level_model(users=40, pairs=10)
    coin = {"coin": lambda data: torch.full((len(data),), 0.5, dtype=torch.float64)}
    first, second = (few_shot_curve(model, held_out, shots=(0, 2), resamples=2, seed=3,
                                    baselines=coin, progress=False) for _ in range(2))
    assert first.mean("coin") == [0.5, 0.5]
    assert torch.equal(first.accuracy["map"], second.accuracy["map"])


def test_bad_arguments():
    made, model, held_out = user_level_model(users=10, pairs=4)
    unknown = PreferenceData(held_out.context, held_out.chosen, held_out.rejected)
    with pytest.raises(ValueError, match="user id"):
        few_shot_curve(model, unknown, progress=False)
    with pytest.raises(ValueError, match="resamples >= 1"):
        few_shot_curve(model, held_out, resamples=0, progress=False)
    with pytest.raises(ValueError, match="without an oracle"):
        FewShotCurve([0], {"population": torch.zeros(1, 1)}, [1]).gap_closed("population", 0)


def test_group_accuracy_per_group():
    probability = torch.tensor([0.9, 0.1, 0.5, 0.8, 0.3])
    groups = torch.tensor([2, 2, 0, 0, 0])
    result = group_accuracy(probability, groups)
    assert result == {0: pytest.approx(0.5), 2: pytest.approx(0.5)}
    assert group_accuracy(torch.tensor([0.9, 0.7]), torch.tensor([1, 1])) == {1: 1.0}
    with pytest.raises(ValueError, match="must have the same shape"):
        group_accuracy(torch.zeros(3), torch.zeros(2, dtype=torch.int64))


def test_adapt_and_score_is_one_round_of_the_curve():
    made, model, held_out = user_level_model()
    curve = few_shot_curve(model, held_out, shots=[0, 8], resamples=1, methods=("map",),
                           logistic=False, eval_pairs=10, seed=3, progress=False)
    for n in (0, 8):
        test, probability = adapt_and_score(model, held_out, n, "map", eval_pairs=10,
                                            seed=3)
        assert len(test) == 10 * len(torch.unique(held_out.user_ids))
        expected = curve.mean("map")[curve.shots.index(n)]
        assert _tie_accuracy(probability) == pytest.approx(expected)
    # Knowing the user's type helps on every type: MAP beats the population per type.
    test, personal = adapt_and_score(model, held_out, 8, "map", eval_pairs=10, seed=3)
    _, population = adapt_and_score(model, held_out, 8, "population", eval_pairs=10, seed=3)
    groups = test.categories
    assert min(group_accuracy(personal, groups).values()) > min(
        group_accuracy(population, groups).values())
