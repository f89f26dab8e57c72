"""EM for the user-level mixture (smoe_ops.reward.em): the M-step reaches its optimum,
the fit recovers planted user types, it starts a model where the fit says, and bad
arguments are refused."""

import pytest
import torch
import torch.nn.functional as F

from smoe_ops.reward import PreferenceData, SparseMoERewardModel, synthetic
from smoe_ops.reward.em import _newton_heads, fit_user_mixture, init_user_mixture
from smoe_ops.reward.report import normalized_mutual_information


def test_newton_heads_reach_the_weighted_optimum():
    gen = torch.Generator().manual_seed(0)
    diff = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    weights = torch.rand(200, 3, generator=gen, dtype=torch.float64)
    heads = _newton_heads(diff, weights, torch.zeros(3, 5, dtype=torch.float64), 0.5, 20)
    # Stationarity of sum_i w_ie log sigmoid(h_e . d_i) - 0.5 / 2 |h_e|^2, by autograd.
    probe = heads.clone().requires_grad_(True)
    objective = (weights * F.logsigmoid(diff @ probe.T)).sum() - 0.25 * probe.square().sum()
    (gradient,) = torch.autograd.grad(objective, probe)
    assert gradient.abs().max() < 1e-9


def test_newton_heads_solve_without_a_batched_lu(monkeypatch):
    # Some MKL builds get the row interchange of a multi-threaded batched LU wrong (a test
    # run failed with "Pivots given to lu_solve must all be greater or equal to 1"): the
    # SPD systems go through Cholesky, and a step equals the exact Newton step.
    gen = torch.Generator().manual_seed(1)
    diff = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    weights = torch.rand(40, 2, generator=gen, dtype=torch.float64)
    heads = torch.randn(2, 6, generator=gen, dtype=torch.float64) * 0.1
    prob = torch.sigmoid(diff @ heads.T)
    expected = []
    for e in range(2):
        gradient = ((1 - prob[:, e]) * weights[:, e]) @ diff - 0.5 * heads[e]
        hessian = (diff.T * (prob[:, e] * (1 - prob[:, e]) * weights[:, e])) @ diff
        hessian = hessian + 0.5 * torch.eye(6, dtype=torch.float64)
        expected.append(heads[e] + torch.linalg.inv(hessian) @ gradient)

    def no_lu(*args, **kwargs):
        raise AssertionError("EM called torch.linalg.solve")

    monkeypatch.setattr(torch.linalg, "solve", no_lu)
    step = _newton_heads(diff, weights, heads, 0.5, 1)
    torch.testing.assert_close(step, torch.stack(expected), rtol=1e-10, atol=1e-12)


def test_non_finite_features_are_refused():
    made = synthetic.user_types(10, 5, num_types=2, response_dim=4, seed=0)
    made.data.chosen[3, 1] = float("nan")
    with pytest.raises(ValueError, match="features must be finite, got 1 non-finite"):
        fit_user_mixture(made.data, 10, 2)
    diff = torch.ones(4, 3, dtype=torch.float64)
    diff[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="not positive definite"):
        _newton_heads(diff, torch.ones(4, 2, dtype=torch.float64),
                      torch.zeros(2, 3, dtype=torch.float64), 1.0, 1)


@pytest.mark.parametrize("num_types", [1, 3])  # 1: a single type, nothing to tell apart
def test_fit_recovers_planted_types(num_types):
    made = synthetic.user_types(90, 20, num_types=num_types, response_dim=16, seed=1)
    fit = fit_user_mixture(made.data, 90, num_types, restarts=4, seed=0)
    assert fit.responsibilities.shape == (90, num_types)
    torch.testing.assert_close(fit.responsibilities.sum(1), torch.ones(90, dtype=torch.float64))
    if num_types > 1:
        nmi = normalized_mutual_information(fit.responsibilities.argmax(1), made.user_types)
        assert nmi >= 0.8
    # Every head points along its true type vector (up to the labelling of the experts).
    cosine = F.normalize(fit.heads, dim=1) @ F.normalize(made.true_rewards.double(), dim=1).T
    assert cosine.max(0).values.min() > 0.8


def test_restarts_keep_the_best_likelihood():
    made = synthetic.user_types(60, 10, num_types=3, response_dim=8, seed=2)
    best = fit_user_mixture(made.data, 60, 3, restarts=5, seed=0)
    singles = [fit_user_mixture(made.data, 60, 3, restarts=1, seed=0).log_likelihood]
    assert best.log_likelihood >= max(singles) - 1e-9


def test_users_without_pairs_get_the_prior():
    made = synthetic.user_types(30, 10, num_types=2, response_dim=8, seed=3)
    fit = fit_user_mixture(made.data, 35, 2, restarts=2, seed=0)  # users 30..34: no pairs
    prior = fit.responsibilities[:30].mean(0)
    spread = fit.responsibilities[30:] - fit.responsibilities[30:].mean(0)
    assert spread.abs().max() < 1e-12  # all the same row: the prior only
    assert fit.responsibilities[30:].sum(1).sub(1).abs().max() < 1e-12
    assert prior.min() > 0


def test_init_sets_effective_heads_and_user_logits():
    made = synthetic.user_types(40, 10, num_types=2, response_dim=6, context_dim=4, seed=4)
    model = SparseMoERewardModel(4, 6, num_experts=2, k=1, num_users=40, prior_scale=0.5)
    fit = init_user_mixture(model, made.data, restarts=2, seed=0)
    torch.testing.assert_close(model.head_weights().double(), fit.heads, atol=1e-6, rtol=0)
    routing, *_ = model.user_expert_margins(torch.arange(40), torch.zeros(40, 6),
                                            torch.zeros(40, 6))
    assert torch.equal(routing.ids[:, 0].long(), fit.responsibilities.argmax(1))
    assert model.user_logits.min() >= -10.0


def test_bad_arguments():
    made = synthetic.user_types(10, 5, num_types=2, response_dim=4, seed=0)
    with pytest.raises(ValueError, match="restarts"):
        fit_user_mixture(made.data, 10, 2, restarts=0)
    with pytest.raises(ValueError, match=r"user id in \[0, 5\)"):
        fit_user_mixture(made.data, 5, 2)
    unknown = PreferenceData(made.data.context, made.data.chosen, made.data.rejected)
    with pytest.raises(ValueError, match="every pair needs a user id"):
        fit_user_mixture(unknown, 10, 2)
    with pytest.raises(ValueError, match="without num_users"):
        init_user_mixture(SparseMoERewardModel(64, 4, num_experts=2, k=1), made.data)
