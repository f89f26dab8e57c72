"""SparseMoERewardModel (routing, margins and rewards against a direct dense formula,
baselines, bad arguments) and the losses (against float64 formulas, gradcheck, zero
weights, extreme margins, regularizers)."""

import math

import pytest
import torch
import torch.nn.functional as F

import smoe_ops
from smoe_ops.reward import (
    Regularizers,
    SparseMoERewardModel,
    dense,
    diversity_loss,
    mixture_bt_loss,
    pair_accuracy,
    reward_mixture_bt_loss,
    single_head,
    user_mixture_bt_loss,
)
from smoe_ops.reward.losses import regularization


def inputs(num_pairs, context_dim=5, response_dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_pairs, context_dim, generator=gen),
            torch.randn(num_pairs, response_dim, generator=gen),
            torch.randn(num_pairs, response_dim, generator=gen))


def dense_expert_rewards(model, response):
    """[B, K] every expert's reward, computed directly: the specification."""
    heads = model.expert_weight.double() + (model.config["prior_scale"]
                                            * model.prior_weight.double())
    return response.double() @ heads.T + model.expert_bias.double()


@pytest.mark.parametrize(
    "num_experts, k, router_hidden, prior_scale",
    [
        (8, 2, None, 0.0),  # the default sparse model
        (7, 7, None, 0.0),  # dense: k = K, prime K
        (1, 1, None, 0.0),  # single head: the router is inert
        (8, 3, 16, 0.5),  # MLP router and prior heads
        (130, 2, None, 0.5),  # K > 64 k: rewards gather k heads instead of the K-wide product
    ],
)
def test_margins_and_reward_match_dense_formula(num_experts, k, router_hidden, prior_scale):
    model = SparseMoERewardModel(5, 4, num_experts, k, router_hidden=router_hidden,
                                 prior_scale=prior_scale, seed=1)
    with torch.no_grad():
        model.expert_bias.normal_()  # biases cancel in margins but not in rewards
    context, chosen, rejected = inputs(33)  # 33 pairs: not a multiple of any block size
    routing, logits, margins = model.expert_margins(context, chosen, rejected)
    assert logits.shape == (33, num_experts) and margins.shape == (33, k)
    assert routing.ids.dtype == torch.int32 and routing.weights.shape == (33, k)
    expected_routing = smoe_ops.reference.route(logits.detach(), k)
    assert torch.equal(routing.ids, expected_routing.ids)

    ids = routing.ids.long()
    every_margin = dense_expert_rewards(model, chosen) - dense_expert_rewards(model, rejected)
    torch.testing.assert_close(margins.double(), every_margin.gather(1, ids),
                               rtol=1e-5, atol=1e-5)

    every_reward = dense_expert_rewards(model, chosen)
    expected = (routing.weights.double() * every_reward.gather(1, ids)).sum(1)
    torch.testing.assert_close(model.reward(context, chosen).double(), expected,
                               rtol=1e-5, atol=1e-5)


def test_prior_head_is_a_fixed_buffer():
    model = SparseMoERewardModel(5, 4, 4, 2, prior_scale=1.0)
    assert "prior_weight" in dict(model.named_buffers())
    assert all(name != "prior_weight" for name, _ in model.named_parameters())
    torch.testing.assert_close(model.head_weights(), model.expert_weight + model.prior_weight)


def test_gradients_reach_router_and_routed_experts_only():
    model = SparseMoERewardModel(5, 4, 8, 2, seed=0)
    context, chosen, rejected = inputs(3)
    routing, _logits, margins = model.expert_margins(context, chosen, rejected)
    mixture_bt_loss(routing.weights, margins).backward()
    used = set(routing.ids.flatten().tolist())
    for expert in range(8):
        touched = bool(model.expert_weight.grad[expert].abs().sum() > 0)
        assert touched == (expert in used), expert
    assert model.router.weight.grad.abs().sum() > 0


def test_baselines_and_seeded_init():
    assert single_head(5, 4).config["num_experts"] == 1 and single_head(5, 4).k == 1
    assert dense(5, 4, 6).k == 6
    first, second = SparseMoERewardModel(5, 4, seed=3), SparseMoERewardModel(5, 4, seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    third = SparseMoERewardModel(5, 4, seed=4)
    assert not torch.equal(first.expert_weight, third.expert_weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts=4\], got 5"):
        SparseMoERewardModel(5, 4, num_experts=4, k=5)
    with pytest.raises(ValueError, match="score must be 'softmax' or 'sigmoid', got 'relu'"):
        SparseMoERewardModel(5, 4, score="relu")
    with pytest.raises(ValueError, match="context_dim and response_dim must be >= 1"):
        SparseMoERewardModel(0, 4)
    model = SparseMoERewardModel(5, 4)
    with pytest.raises(ValueError, match="context has 3 rows but response has 2"):
        model.reward(torch.zeros(3, 5), torch.zeros(2, 4))


def random_weights_and_margins(num_pairs, k, seed=0, dtype=torch.float64, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.softmax(torch.randn(num_pairs, k, generator=gen, dtype=dtype), dim=1)
    margins = torch.randn(num_pairs, k, generator=gen, dtype=dtype) * scale
    return weights, margins


@pytest.mark.parametrize("k", [1, 2, 8])
def test_losses_against_float64_formula(k):
    weights, margins = random_weights_and_margins(64, k)
    expected = -torch.log((weights * torch.sigmoid(margins)).sum(1)).mean()
    torch.testing.assert_close(mixture_bt_loss(weights, margins), expected)
    expected = -torch.log(torch.sigmoid((weights * margins).sum(1))).mean()
    torch.testing.assert_close(reward_mixture_bt_loss(weights, margins), expected)
    # float32 inputs against the float64 formula on the same values.
    torch.testing.assert_close(mixture_bt_loss(weights.float(), margins.float()).double(),
                               mixture_bt_loss(weights, margins), rtol=1e-5, atol=1e-6)


def test_mixture_loss_stable_with_zero_weights_and_extreme_margins():
    # A zero weight (softmax underflow) and margins of -200 whose sigmoid underflows in
    # float32: the naive log(sum g sigmoid(m)) gives inf there and NaN gradients.
    weights = torch.tensor([[0.0, 1.0], [0.25, 0.75], [1.0, 0.0]], requires_grad=True)
    margins = torch.tensor([[5.0, -200.0], [-200.0, -210.0], [-300.0, 1.0]],
                           requires_grad=True)
    loss = mixture_bt_loss(weights, margins)
    w, m = weights.detach().double(), margins.detach().double()
    log_terms = torch.log(w) + F.logsigmoid(m)
    expected = -torch.logsumexp(log_terms, dim=1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-4)
    loss.backward()
    assert torch.isfinite(weights.grad).all() and torch.isfinite(margins.grad).all()
    # Pair 0: only the expert with weight 1 counts, whatever the other margin says.
    assert margins.grad[0, 0] == 0


def test_losses_gradcheck():
    weights, margins = random_weights_and_margins(6, 3, scale=2.0)
    weights.requires_grad_(), margins.requires_grad_()
    assert torch.autograd.gradcheck(mixture_bt_loss, (weights, margins))
    assert torch.autograd.gradcheck(reward_mixture_bt_loss, (weights, margins))
    assert torch.autograd.gradcheck(diversity_loss, (torch.randn(5, 4, dtype=torch.float64,
                                                                 requires_grad=True),))


def test_pair_accuracy_uses_mixture_probability():
    # Expert 0 agrees mildly (weight 0.8), expert 1 disagrees strongly (weight 0.2):
    # mixture probability 0.8 * 0.73 + 0.2 * 0.0 > 0.5, but sum g m = 0.8 - 2 < 0.
    weights = torch.tensor([[0.8, 0.2]])
    margins = torch.tensor([[1.0, -10.0]])
    assert pair_accuracy(weights, margins).tolist() == [True]
    assert pair_accuracy(weights, margins, "reward_mixture").tolist() == [False]


def test_diversity_loss_formula():
    heads = torch.randn(5, 4, dtype=torch.float64)
    unit = heads / heads.norm(dim=1, keepdim=True)
    expected = sum((unit[i] @ unit[j]) ** 2 for i in range(5) for j in range(i + 1, 5)) / 10
    torch.testing.assert_close(diversity_loss(heads), expected)
    orthogonal = torch.eye(4, dtype=torch.float64)
    assert diversity_loss(orthogonal).item() == 0.0
    assert diversity_loss(heads[:1]).item() == 0.0  # K = 1: no pairs


def test_regularization_terms_and_switches():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    routing = smoe_ops.route(logits, 2)
    heads = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    probs = torch.softmax(logits, dim=1)
    entropy = -(probs * probs.log()).sum(1).mean()
    mean_probs = probs.mean(0)
    kl_uniform = (mean_probs * (mean_probs * 6).log()).sum()

    weights = Regularizers(sparsity=0.5, balance=2.0, diversity=3.0)
    total, terms = regularization(logits, routing, heads, weights)
    torch.testing.assert_close(terms["sparsity"], entropy)
    torch.testing.assert_close(terms["balance"], kl_uniform)
    torch.testing.assert_close(total, 0.5 * entropy + 2.0 * kl_uniform
                               + 3.0 * diversity_loss(heads))

    switch = Regularizers(sparsity=0.0, balance=1.0, balance_kind="switch", diversity=0.0)
    total, terms = regularization(logits, routing, heads, switch)
    torch.testing.assert_close(total, smoe_ops.router_losses(logits, routing).balance)
    assert "diversity" not in terms

    total, terms = regularization(logits, routing, heads, Regularizers(0.0, 0.0, "kl", 0.0))
    assert total.item() == 0.0 and terms == {}
    with pytest.raises(ValueError, match="balance_kind must be 'kl' or 'switch', got 'l2'"):
        Regularizers(balance_kind="l2")
    with pytest.raises(ValueError, match="sparsity must be >= 0, got -1"):
        Regularizers(sparsity=-1)
    assert math.isclose(Regularizers().balance, 0.1)


def test_user_mixture_loss_against_float64_formula():
    # 3 users; user 1 has no pairs and adds nothing; user 2 has many pairs, whose
    # product of sigmoids underflows float32 (the log-domain form must not).
    gen = torch.Generator().manual_seed(0)
    user_weights = torch.softmax(torch.randn(3, 2, generator=gen, dtype=torch.float64), 1)
    pair_users = torch.tensor([0, 0, 0] + [2] * 200)
    margins = torch.randn(203, 2, generator=gen, dtype=torch.float64) * 3 - 1
    expected = 0.0
    for user in (0, 2):
        mine = margins[pair_users == user]
        product = torch.sigmoid(mine).prod(0)  # float64 holds what float32 cannot
        expected -= torch.log((user_weights[user] * product).sum())
    expected /= 203
    loss = user_mixture_bt_loss(user_weights, margins, pair_users)
    torch.testing.assert_close(loss, expected)
    loss32 = user_mixture_bt_loss(user_weights.float(), margins.float(), pair_users)
    assert torch.isfinite(loss32) and float(loss32) == pytest.approx(float(expected), rel=1e-5)
    # One pair per user: the user-level loss is the pairwise mixture loss.
    single = torch.arange(3)
    torch.testing.assert_close(user_mixture_bt_loss(user_weights, margins[:3], single),
                               mixture_bt_loss(user_weights, margins[:3]))


def test_user_mixture_loss_gradcheck():
    gen = torch.Generator().manual_seed(1)
    user_weights = torch.softmax(torch.randn(3, 2, generator=gen, dtype=torch.float64), 1)
    margins = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    pair_users = torch.tensor([0, 2, 0, 2, 2, 0, 0])
    user_weights.requires_grad_(), margins.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w, m: user_mixture_bt_loss(w, m, pair_users), (user_weights, margins))
