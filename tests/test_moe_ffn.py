"""moe_ffn and nn.SparseMoE against the per-expert reference loop, and under torch.compile."""

import pytest
import torch

import smoe_ops
from smoe_ops import reference
from tests.helpers import assert_close


def make_layer(num_tokens, hidden, ffn, num_experts, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g, dtype=dtype)
    router = torch.randn(hidden, num_experts, generator=g, dtype=dtype)
    w_in = torch.randn(num_experts, hidden, 2 * ffn, generator=g, dtype=dtype) / hidden**0.5
    w_out = torch.randn(num_experts, ffn, hidden, generator=g, dtype=dtype) / ffn**0.5
    return [t.requires_grad_() for t in (x, router, w_in, w_out)]


def run_both(params, k, device="cpu", **route_options):
    """The layer on `device` and the reference loop on the CPU, forward and backward."""
    ours_in = [p.detach().to(device).clone().requires_grad_() for p in params]
    ref_in = [p.detach().double().requires_grad_() for p in params]
    y, aux = smoe_ops.moe_ffn(*ours_in, k, **route_options)
    y_ref, aux_ref = reference.moe_ffn(*ref_in, k, **route_options)
    # One loss that touches the output and every routing loss, so every gradient path runs.
    grad = torch.randn_like(y_ref)
    loss = (y * grad.to(device=y.device, dtype=y.dtype)).sum() + sum(aux)
    loss_ref = (y_ref * grad).sum() + sum(aux_ref)
    loss.backward()
    loss_ref.backward()
    return (y, aux, ours_in), (y_ref, aux_ref, ref_in)


@pytest.mark.parametrize(
    "num_tokens, num_experts, k",
    [
        (0, 4, 2),  # no tokens: empty output, zero losses, zero weight grads
        (1, 1, 1),  # one expert: the router is a constant
        (33, 7, 2),  # prime E, odd T
        (64, 8, 8),  # k = E: every expert sees every token
        (40, 60, 4),  # more experts than tokens can fill: empty experts
    ],
)
def test_matches_reference_in_float64(num_tokens, num_experts, k, device):
    params = make_layer(num_tokens, 16, 12, num_experts)
    (y, aux, ours_in), (y_ref, aux_ref, ref_in) = run_both(params, k, device)
    assert_close(y, y_ref, torch.float64)
    for name, a, b in zip(aux._fields, aux, aux_ref):
        assert_close(a, b, torch.float64, msg=name)
    for name, a, b in zip(["x", "router_weight", "w_in", "w_out"], ours_in, ref_in):
        # The loop never touches an expert with no tokens (grad None); ours gives zeros.
        expected = b.grad if b.grad is not None else torch.zeros_like(b)
        assert_close(a.grad, expected, torch.float64, msg=f"grad of {name}")


def test_all_tokens_on_one_expert(device):
    params = make_layer(50, 16, 8, 8)
    with torch.no_grad():
        params[1][:, 3] += 1e3 * torch.sign(params[0].sum(0))  # expert 3 dominates every row
    (y, _, ours_in), (y_ref, _, ref_in) = run_both(params, 1, device)
    assert_close(y, y_ref, torch.float64)
    assert_close(ours_in[2].grad, ref_in[2].grad, torch.float64)


def test_sigmoid_group_limited_routing_options_pass_through(device):
    params = make_layer(24, 16, 8, 16)
    options = dict(score="sigmoid", num_groups=4, topk_groups=2, scale=2.0)
    (y, _, ours_in), (y_ref, _, ref_in) = run_both(params, 4, device, **options)
    assert_close(y, y_ref, torch.float64)
    assert_close(ours_in[1].grad, ref_in[1].grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_close_to_float64(dtype, device):
    params = make_layer(64, 32, 16, 8, dtype=torch.float64)
    low = [p.detach().to(dtype) for p in params]
    y, _ = smoe_ops.moe_ffn(*[p.to(device) for p in low], 2)
    y_ref, _ = reference.moe_ffn(*[p.double() for p in low], 2)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, scale=4)  # two GEMMs and an activation, each rounded


def test_compile_fullgraph_forward_and_backward():
    params = make_layer(48, 16, 8, 6, dtype=torch.float32)
    compiled = torch.compile(smoe_ops.moe_ffn, fullgraph=True, dynamic=False)
    y, aux = compiled(*params, 2)
    (y.square().sum() + aux.balance + aux.z).backward()
    grads = [p.grad.clone() for p in params]

    eager = [p.detach().clone().requires_grad_() for p in params]
    y_eager, aux_eager = smoe_ops.moe_ffn(*eager, 2)
    (y_eager.square().sum() + aux_eager.balance + aux_eager.z).backward()
    assert_close(y, y_eager, torch.float32)
    for g, p in zip(grads, eager):
        assert_close(g, p.grad, torch.float32, scale=10)


def test_sparse_moe_module():
    torch.manual_seed(0)
    layer = smoe_ops.nn.SparseMoE(16, 24, num_experts=8, k=2, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y, aux = layer(x)
    y_ref, _ = reference.moe_ffn(
        x.reshape(-1, 16), layer.router_weight, layer.w_in, layer.w_out, 2
    )
    assert y.shape == x.shape
    assert_close(y.reshape(-1, 16), y_ref, torch.float64)
    (y.sum() + aux.balance).backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert "num_experts=8" in repr(layer)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p: [p[0][:, :3]] + p[1:], r"router_weight must be \[H=3, E\]"),
        (lambda p: p[:2] + [p[2][:, :, :5]] + p[3:], r"w_in.shape\[2\] must be even"),
        (lambda p: p[:3] + [p[3][:, :, :3]], r"w_out must be \[E=4, I=6, H=8\]"),
    ],
)
def test_bad_shapes_name_the_argument(change, match):
    params = [p.detach() for p in make_layer(5, 8, 6, 4)]
    with pytest.raises(ValueError, match=match):
        smoe_ops.moe_ffn(*change(params), 2)


def test_bad_k_and_activation():
    params = [p.detach() for p in make_layer(5, 8, 6, 4)]
    with pytest.raises(ValueError, match=r"k must be in \[1, E=4\], got 5"):
        smoe_ops.moe_ffn(*params, 5)
    with pytest.raises(ValueError, match=r"activation must be one of .* got 'gelu'"):
        smoe_ops.moe_ffn(*params, 2, activation="gelu")
