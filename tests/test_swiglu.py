"""swiglu against the reference, with opcheck, gradcheck and torch.compile."""

import pytest
import torch

import smoe_ops
from smoe_ops import reference
from tests.helpers import DTYPES, assert_close

SHAPES = [
    (0, 8),  # no rows: T = 0 must return an empty [0, I]
    (1, 2),  # ffn_size 1
    (33, 2 * 37),  # odd sizes: tails of the vector loop
    (64, 2 * 2816),  # Mixtral-like ffn size, several widening chunks per row in bf16
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_reference(shape, dtype, device):
    torch.manual_seed(0)
    gate_up64 = torch.randn(shape, dtype=torch.float64) * 3
    gate_up = gate_up64.to(device=device, dtype=dtype).requires_grad_()
    out = smoe_ops.swiglu(gate_up)
    assert out.dtype == dtype and out.shape == (shape[0], shape[1] // 2)

    # The reference sees the same rounded inputs, in float64.
    ref_in = gate_up.detach().cpu().double().requires_grad_()
    ref = reference.swiglu(ref_in)
    assert_close(out, ref, dtype)

    grad = torch.randn_like(ref)
    out.backward(grad.to(device=device, dtype=dtype))
    ref.backward(grad)
    assert_close(gate_up.grad, ref_in.grad, dtype)


def test_extreme_values_and_nan():
    # Large |gate| exercises the clamps of the vectorized exp; NaN must propagate, not vanish.
    gate_up = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0, float("nan"), 1, 1, 1, 1, 1, 1]])
    out = smoe_ops.swiglu(gate_up)
    expected = reference.swiglu(gate_up.double())
    assert torch.isnan(out[0, 5])
    assert_close(out[0, :5], expected[0, :5], torch.float32)


def test_non_contiguous_input():
    gate_up = torch.randn(2 * 16, 10, dtype=torch.float64).t()  # [10, 32], column-major
    assert not gate_up.is_contiguous()
    assert_close(smoe_ops.swiglu(gate_up), reference.swiglu(gate_up), torch.float64)


@pytest.mark.parametrize("shape", [(0, 4), (5, 6), (17, 2 * 33)])
def test_opcheck(shape):
    gate_up = torch.randn(shape, requires_grad=True)
    torch.library.opcheck(torch.ops.smoe_ops.swiglu.default, (gate_up,))
    grad = torch.randn(shape[0], shape[1] // 2)
    torch.library.opcheck(torch.ops.smoe_ops.swiglu_backward.default, (grad, gate_up.detach()))


def test_gradcheck():
    gate_up = torch.randn(7, 2 * 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(smoe_ops.swiglu, (gate_up,))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.randn(4, 6, 2), ValueError, r"gate_up must be 2-D .* got shape \[4, 6, 2\]"),
        (torch.randn(4, 5), ValueError, r"gate_up.shape\[1\] must be even .* got shape \[4, 5\]"),
        (torch.ones(4, 6, dtype=torch.int32), TypeError, r"gate_up must be float32.*got Int"),
    ],
)
def test_bad_input_names_the_argument(bad, error, match):
    with pytest.raises(error, match=match):
        smoe_ops.swiglu(bad)


def test_vectorized_exp_is_accurate_over_the_float_range():
    # silu(g) = g / (1 + exp(-g)) walks exp over its whole float32 range; the kernel's
    # polynomial exp must stay within a few ulp of float64 everywhere, not only near 0.
    gate = torch.linspace(-87.0, 88.0, 200_001, dtype=torch.float32)
    gate_up = torch.stack([gate, torch.ones_like(gate)], dim=1)
    out = smoe_ops.swiglu(gate_up).squeeze(1).double()
    expected = reference.swiglu(gate_up.double()).squeeze(1)
    rel = ((out - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()
    assert rel < 4e-7, f"max relative error {rel:.2e}"
