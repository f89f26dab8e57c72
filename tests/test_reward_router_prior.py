"""The covariate prior of a user-level model: SparseMoERewardModel(router_prior=True) and
fit_router_prior, on a closed-form case, its errors, checkpoints, and Topmodel2007 when the
R data are installed (python -m smoe_ops.reward.datasets fetch)."""

import pytest
import torch

from smoe_ops.reward import PreferenceData, SparseMoERewardModel, fit_router_prior, load, save
from smoe_ops.reward.personalization import personalize_batch, personalized_probability
from tests.helpers import load_topmodel2007

NUM_EXPERTS = 3


def grouped_users(num_groups=3, users_per_group=4, pairs_per_user=2, response_dim=5):
    """Users whose context is the one-hot of their group; every pair of a user carries it."""
    users = torch.arange(num_groups * users_per_group)
    group = users // users_per_group
    pair_users = users.repeat_interleave(pairs_per_user)
    context = torch.nn.functional.one_hot(group[pair_users], num_groups).float()
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randn(len(pair_users), response_dim, generator=generator)
    rejected = torch.randn(len(pair_users), response_dim, generator=generator)
    return PreferenceData(context, chosen, rejected, user_ids=pair_users), group


def user_model(data, num_users, router_prior=True, k=2):
    model = SparseMoERewardModel(data.context_dim, data.response_dim, NUM_EXPERTS, k,
                                 num_users=num_users, router_prior=router_prior, seed=0)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        model.user_logits.copy_(3 * torch.randn(num_users, NUM_EXPERTS, generator=generator))
    return model


def test_fit_matches_the_group_mean_routing():
    # One-hot contexts, a bias and no penalty: the cross-entropy is minimized exactly when
    # the prior of each group is the mean routing of its users (closed form, float64).
    data, group = grouped_users()
    model = user_model(data, num_users=len(group))
    fit_router_prior(model, data, l2=0.0, steps=500)
    targets = torch.softmax(model.user_logits.detach().double(), 1)
    with torch.no_grad():
        prior = torch.softmax(model.population_logits(torch.eye(3)).double(), 1)
    for level in range(3):
        expected = targets[group == level].mean(0)
        torch.testing.assert_close(prior[level], expected, atol=2e-4, rtol=0)


def test_only_the_router_changes():
    data, group = grouped_users()
    model = user_model(data, num_users=len(group))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    objective = fit_router_prior(model, data, l2=0.01)
    after = model.state_dict()
    for name, value in before.items():
        if name.startswith("router."):
            assert not torch.equal(value, after[name]), name
        else:
            assert torch.equal(value, after[name]), name
    assert all(parameter.grad is None for parameter in model.router.parameters())
    # A constant prior (weights 0) is feasible, so the fit can be no worse than it.
    targets = torch.softmax(model.user_logits.detach(), 1)
    mean = targets.mean(0)
    constant = float(-(targets * mean.log()).sum(1).mean())
    assert objective <= constant + 1e-6


def test_population_logits_follow_the_flag():
    data, group = grouped_users()
    contexts = torch.eye(3)
    plain = user_model(data, len(group), router_prior=False)
    expected = torch.softmax(plain.user_logits, 1).mean(0).log()
    with torch.no_grad():
        torch.testing.assert_close(plain.population_logits(contexts), expected.expand(3, -1))
        covariate = user_model(data, len(group), router_prior=True)
        torch.testing.assert_close(covariate.population_logits(contexts),
                                   covariate.router(contexts))


def test_a_new_user_is_scored_on_the_covariate_prior():
    data, group = grouped_users()
    model = user_model(data, len(group))
    fit_router_prior(model, data, l2=0.0, steps=500)
    no_profiles = personalize_batch(model, data[:0], "hedge")
    probability = personalized_probability(model, data, no_profiles)
    # Reference in float64: top-2 of the router's logits, softmax over those two, and
    # the mixture of the two experts' sigmoid margins.
    with torch.no_grad():
        logits = model.router(data.context).double()
        heads = model.head_weights().double()
    top = logits.topk(2, dim=1)
    weights = torch.softmax(top.values, 1)
    margins = ((data.chosen - data.rejected).double() @ heads.T).gather(1, top.indices)
    expected = (weights * torch.sigmoid(margins)).sum(1)
    torch.testing.assert_close(probability, expected, atol=1e-5, rtol=0)


def test_checkpoint_keeps_the_flag(tmp_path):
    data, group = grouped_users()
    model = user_model(data, len(group))
    fit_router_prior(model, data)
    save(model, tmp_path / "model.safetensors")
    loaded = load(tmp_path / "model.safetensors")
    assert loaded.config["router_prior"] is True
    with torch.no_grad():
        torch.testing.assert_close(loaded.population_logits(torch.eye(3)),
                                   model.population_logits(torch.eye(3)))
    # A config written before the flag existed builds the mean-prior model it described.
    old = {key: value for key, value in model.config.items() if key != "router_prior"}
    assert SparseMoERewardModel(**old).config["router_prior"] is False


def test_errors_name_the_problem():
    data, group = grouped_users()
    with pytest.raises(ValueError, match="router_prior=True needs num_users"):
        SparseMoERewardModel(3, 5, NUM_EXPERTS, 2, router_prior=True)
    plain = user_model(data, len(group), router_prior=False)
    with pytest.raises(ValueError, match="router_prior=True, got num_users=12, "
                                         "router_prior=False"):
        fit_router_prior(plain, data)
    model = user_model(data, len(group))
    with pytest.raises(ValueError, match=r"user ids must be in \[0, 5\)"):
        fit_router_prior(user_model(data, 5), data)
    with pytest.raises(ValueError, match="context_dim=2, the model expects 3"):
        fit_router_prior(model, PreferenceData(data.context[:, :2], data.chosen,
                                               data.rejected, data.user_ids))
    with pytest.raises(ValueError, match="each with its user id"):
        fit_router_prior(model, PreferenceData(data.context, data.chosen, data.rejected))
    with pytest.raises(ValueError, match="l2 >= 0 and steps >= 1"):
        fit_router_prior(model, data, l2=-1.0)


def test_topmodel_covariates_shift_the_prior():
    from smoe_ops.reward.em import init_user_mixture

    data, info = load_topmodel2007()
    model = SparseMoERewardModel(data.context_dim, data.response_dim, 4, 2,
                                 num_users=info.num_raters, router_prior=True, seed=0)
    init_user_mixture(model, data, restarts=2, seed=0)
    objective = fit_router_prior(model, data)
    targets = torch.softmax(model.user_logits.detach(), 1)
    constant = float(-(targets * targets.mean(0).log()).sum(1).mean())
    # The raters' covariates carry information about their type: the fitted prior beats
    # the best constant prior on its own objective, and it differs between raters.
    assert objective < constant - 0.01
    with torch.no_grad():
        prior = torch.softmax(model.population_logits(data.context), 1)
    assert float(prior.std(0).max()) > 0.05
