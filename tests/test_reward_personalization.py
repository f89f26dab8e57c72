"""Test-time personalization (smoe_ops.reward.personalization): each method against its
formula in float64, batched against one user at a time, the MAP optimum, recovery of a
planted user type, scoring with a profile, profiles on disk, and bad input."""

import logging

import pytest
import torch
import torch.nn.functional as F

from smoe_ops.reward import PreferenceData, SparseMoERewardModel, synthetic
from smoe_ops.reward.em import init_user_mixture
from smoe_ops.reward.personalization import (
    UserProfile,
    all_expert_margins,
    personalize,
    personalize_batch,
    personalized_probability,
    population_logits,
    shift_report,
    update,
)


def context_model(num_experts=4, k=2, seed=0):
    model = SparseMoERewardModel(5, 6, num_experts=num_experts, k=k, seed=seed)
    with torch.no_grad():  # heads large enough that the experts disagree clearly
        model.expert_weight.mul_(30.0)
    return model.eval()


def pairs(num_pairs, users=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return PreferenceData(torch.randn(num_pairs, 5, generator=gen),
                          torch.randn(num_pairs, 6, generator=gen),
                          torch.randn(num_pairs, 6, generator=gen), user_ids=users)


def direct_margins(model, data):
    heads = model.head_weights().double()
    return (data.chosen.double() - data.rejected.double()) @ heads.T


def centred(values):
    return values - values.mean(-1, keepdim=True)


def test_all_expert_margins_match_the_heads():
    model, data = context_model(), pairs(9)
    torch.testing.assert_close(all_expert_margins(model, data.chosen, data.rejected).double(),
                               direct_margins(model, data), atol=1e-4, rtol=1e-5)


def test_hedge_is_the_bayes_posterior_shift():
    model, data = context_model(), pairs(7)
    profile = personalize(model, data, method="hedge", eta=0.7)
    expected = centred(0.7 * F.logsigmoid(direct_margins(model, data)).sum(0))
    torch.testing.assert_close(profile.logits.double(), expected, atol=1e-4, rtol=1e-5)
    assert profile.relative and profile.num_pairs == 7 and profile.method == "hedge"


def test_hedge_update_streams_to_the_batch_result():
    model, data = context_model(), pairs(6)
    streamed = UserProfile(torch.zeros(4))
    for i in range(len(data)):
        streamed = update(model, streamed, data[i])
    batch = personalize(model, data, method="hedge")
    torch.testing.assert_close(streamed.logits, batch.logits, atol=1e-4, rtol=1e-5)
    assert streamed.num_pairs == 6


def test_softmax_reweights_absolutely():
    model, data = context_model(), pairs(5)
    profile = personalize(model, data, method="softmax", tau=2.0)
    losses = -F.logsigmoid(direct_margins(model, data)).sum(0)
    torch.testing.assert_close(torch.softmax(profile.logits.double(), 0),
                               torch.softmax(-losses / 2.0, 0), atol=1e-5, rtol=1e-5)
    assert not profile.relative
    # Absolute: the routing no longer depends on the context.
    logits = profile.routing_logits(population_logits(model, pairs(3, seed=5).context))
    assert torch.equal(logits[0], logits[2])


def map_objective(model, data, shift, prior_strength):
    base = population_logits(model, data.context).double()
    log_mix = torch.logsumexp(F.log_softmax(base + shift, 1)
                              + F.logsigmoid(direct_margins(model, data)), 1)
    return -log_mix.sum() + 0.5 * prior_strength * shift.square().sum()


@pytest.mark.parametrize("num_experts", [1, 4, 7])  # 1: nothing to shift; 7: odd K
def test_map_reaches_a_stationary_point_below_the_start(num_experts):
    model, data = context_model(num_experts=num_experts, k=1), pairs(12)
    profile = personalize(model, data, method="map", prior_strength=0.5, steps=30)
    shift = profile.logits.double().requires_grad_(True)
    value = map_objective(model, data, shift, 0.5)
    (gradient,) = torch.autograd.grad(value, shift)
    # The objective only sees differences of the logits: the centred gradient is the one
    # that must vanish (the prior's pull on the mean is zero after centring).
    assert centred(gradient).abs().max() < 1e-4
    start = map_objective(model, data, torch.zeros(num_experts, dtype=torch.float64), 0.5)
    assert value.item() <= start.item() + 1e-9


@pytest.mark.parametrize("method", ["hedge", "map", "softmax"])
def test_batched_users_match_one_at_a_time(method):
    users = torch.tensor([3, 0, 3, 3, 7, 0, 7, 7, 7, 0, 3, 3])
    model, data = context_model(), pairs(12, users=users)
    profiles = personalize(model, data, method=method)
    assert sorted(profiles) == [0, 3, 7]
    for user, profile in profiles.items():
        alone = data[users == user]
        single = personalize(model, PreferenceData(alone.context, alone.chosen,
                                                   alone.rejected), method=method)
        torch.testing.assert_close(profile.logits, single.logits, atol=1e-4, rtol=1e-4)
        assert profile.user_id == user and profile.num_pairs == int((users == user).sum())


def test_map_finds_a_held_out_users_type():
    made = synthetic.user_types(160, 24, num_types=3, response_dim=16, context_dim=4,
                                seed=0)
    train_users = made.data.user_ids < 120
    model = SparseMoERewardModel(4, 16, num_experts=3, k=1, num_users=160, seed=0)
    fit = init_user_mixture(model, made.data[train_users], seed=0)
    # Which expert stands for which true type, from the training users.
    expert_of_type = {int(t): int(fit.responsibilities[:120][made.user_types[:120] == t]
                                  .mean(0).argmax()) for t in range(3)}
    held_out = made.data[~train_users]
    first_eight = torch.cat([torch.nonzero(held_out.user_ids == u).flatten()[:8]
                             for u in range(120, 160)])
    adapt = held_out[first_eight]
    profiles = personalize(model, adapt, method="map")
    prior = population_logits(model, torch.zeros(1, 4))[0]
    hits = sum(int((prior + profiles[u].logits).argmax()) == expert_of_type[
        int(made.user_types[u])] for u in range(120, 160))
    # From the same 8 labels the Bayes posterior under the true type vectors is right for
    # 39 of the 40 users, hedge on the learned heads (cosine 0.99 with the truth) for 35,
    # MAP (prior 0.5, pulling toward the population) for 33; chance is about 13.
    true_margins = (adapt.chosen - adapt.rejected) @ made.true_rewards.T / made.temperature
    log_likelihood = torch.zeros(160, 3).index_add(0, adapt.user_ids,
                                                   F.logsigmoid(true_margins))[120:]
    bayes_hits = int((log_likelihood.argmax(1) == made.user_types[120:]).sum())
    assert bayes_hits >= 36 and hits >= 31


def test_reward_with_a_profile_routes_on_the_shifted_logits():
    model, data = context_model(num_experts=5, k=2), pairs(10)
    profile = UserProfile(torch.tensor([0.0, 3.0, -2.0, 0.5, 1.0]))
    shifted = population_logits(model, data.context) + profile.logits
    weights = torch.softmax(shifted.double(), 1)
    top = weights.topk(2, dim=1)
    gate = top.values / top.values.sum(1, keepdim=True)
    heads = model.head_weights().double()
    rewards = data.chosen.double() @ heads.T + model.expert_bias.double()
    expected = (gate * rewards.gather(1, top.indices)).sum(1)
    torch.testing.assert_close(model.reward(data.context, data.chosen, profile=profile)
                               .double(), expected, atol=1e-4, rtol=1e-4)
    population = UserProfile(torch.zeros(5))
    torch.testing.assert_close(model.reward(data.context, data.chosen, profile=population),
                               model.reward(data.context, data.chosen))


def test_user_level_population_is_the_mean_user_routing():
    model = SparseMoERewardModel(4, 6, num_experts=3, k=1, num_users=10, seed=0)
    logits = population_logits(model, torch.randn(2, 4))
    expected = torch.softmax(model.user_logits.detach(), 1).mean(0).log()
    torch.testing.assert_close(logits, expected.expand(2, -1))


def test_user_level_population_scores_the_whole_prior_mixture():
    """A user-level model routes every context on one prior over the user types: with no
    profile it mixes all K experts under that prior (its top k would keep k arbitrary
    types); a profile routes the top k."""
    model = SparseMoERewardModel(5, 6, num_experts=3, k=1, num_users=10, seed=0)
    with torch.no_grad():
        model.user_logits.copy_(torch.randn(10, 3, generator=torch.Generator().manual_seed(1)))
    assert model.population_k == 3
    data = pairs(7)
    prior = torch.softmax(model.user_logits.detach(), 1).mean(0).double()
    heads = model.head_weights().detach().double()
    rewards = data.chosen.double() @ heads.T + model.expert_bias.detach().double()
    torch.testing.assert_close(model.reward(data.context, data.chosen).double(),
                               rewards @ prior, atol=1e-5, rtol=1e-5)
    margins = (data.chosen.double() - data.rejected.double()) @ heads.T
    torch.testing.assert_close(personalized_probability(model, data),
                               torch.sigmoid(margins) @ prior, atol=1e-6, rtol=1e-6)
    top = int(prior.argmax())
    torch.testing.assert_close(
        model.reward(data.context, data.chosen, profile=UserProfile(torch.zeros(3))).double(),
        rewards[:, top], atol=1e-5, rtol=1e-5)


def test_profile_save_load_round_trip(tmp_path):
    model, data = context_model(), pairs(8)
    profile = personalize(model, data, method="map")
    path = tmp_path / "alice.safetensors"
    profile.save(path)
    loaded = UserProfile.load(path)
    assert torch.equal(loaded.logits, profile.logits)
    assert (loaded.method, loaded.relative, loaded.num_pairs) == ("map", True, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["alice.safetensors"]
    (tmp_path / "bad.safetensors").write_bytes(b"not a profile")
    with pytest.raises(ValueError, match="bad.safetensors"):
        UserProfile.load(tmp_path / "bad.safetensors")


def test_shift_report():
    model, data = context_model(), pairs(8)
    assert shift_report(model, UserProfile(torch.zeros(4)), data.context).kl == 0.0
    pushed = UserProfile(torch.tensor([4.0, 0.0, 0.0, -4.0]))
    report = shift_report(model, pushed, data.context)
    assert report.kl > 0.1 and report.gained[0] == 0 and report.lost[0] == 3


def test_no_pairs_gives_the_population_and_a_warning(caplog):
    model = context_model()
    with caplog.at_level(logging.WARNING, logger="smoe_ops"):
        profile = personalize(model, pairs(0))
    assert "no labelled pairs" in caplog.text
    assert torch.equal(profile.logits, torch.zeros(4)) and profile.relative


def test_bad_input():
    model = context_model()
    with pytest.raises(ValueError, match="method must be one of"):
        personalize(model, pairs(3), method="newton")
    wrong = PreferenceData(torch.randn(3, 2), torch.randn(3, 6), torch.randn(3, 6))
    with pytest.raises(ValueError, match="context_dim=2"):
        personalize(model, wrong)
    with pytest.raises(ValueError, match="prior_strength must be > 0"):
        personalize(model, pairs(3), prior_strength=0.0)
    with pytest.raises(ValueError, match="has 3 expert logits"):
        model.reward(torch.randn(2, 5), torch.randn(2, 6), profile=UserProfile(torch.zeros(3)))
    absolute = personalize(model, pairs(3), method="softmax")
    with pytest.raises(ValueError, match="absolute"):
        update(model, absolute, pairs(1))
    assert personalize_batch(model, pairs(4)).logits.shape == (1, 4)


def test_map_moves_where_the_plain_newton_step_overshoots():
    # Margins of a real held-out user (demo, seed 0) on a flat population prior: at b = 0
    # the Hessian is nearly singular and the undamped Newton step is ~60 logits long, so
    # halving it 4 times still raised the objective and the fit stopped at b = 0.
    from smoe_ops.reward.personalization import _fit_map, _map_objective

    margins = torch.tensor([[5.09, 4.61, -6.35, -0.72], [3.33, 2.97, -2.39, -0.84],
                            [3.82, 3.14, -5.37, 6.32], [0.71, -3.17, 3.36, 2.45],
                            [1.55, -0.18, 0.06, 1.08], [4.07, -2.94, 1.68, 1.41],
                            [3.51, 0.07, 0.49, 2.24], [4.36, -0.87, -0.35, 1.66]])
    base = torch.full((8, 4), -1.386)
    rows = torch.zeros(8, dtype=torch.int64)
    shift = _fit_map(base, margins, rows, torch.tensor([8]), 0.5, 30)
    padded = dict(base=base[None], log_agree=F.logsigmoid(margins)[None],
                  mask=torch.ones(1, 8))
    start = _map_objective(shift=torch.zeros(1, 4), prior_strength=0.5, **padded)
    value = _map_objective(shift=shift, prior_strength=0.5, **padded)
    assert float(value) < float(start) - 0.5
    assert int(shift.argmax()) == 0  # expert 0 agrees with all 8 labels
    trial = shift.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(
        _map_objective(shift=trial, prior_strength=0.5, **padded).sum(), trial)
    assert gradient.abs().max() < 1e-3
