"""router_losses against the reference: the four losses, mean_probs and the gradient; zero
probabilities, no tokens, opcheck, gradcheck, torch.compile and bad inputs."""

import pytest
import torch

import smoe_ops
from smoe_ops import reference
from tests.helpers import DTYPES, assert_close

SHAPES = [
    # (T, E, k)
    (1, 1, 1),  # E = 1: p = 1, every entropy 0, balance 1
    (33, 7, 2),  # prime E below one 16-wide vector: tails only
    (33, 60, 8),  # E not a multiple of 16
    (64, 257, 257),  # prime E, k = E: f is uniform, balance = E * sum_e P_e / E = 1
    (4096, 128, 8),  # many rows: many chunks of partial sums reduced in order
]


def random_logits(num_tokens, num_experts, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64) * scale
    return logits.to(dtype)


def check_against_reference(logits, k, score="softmax", device="cpu"):
    """Forward and backward of smoe_ops.router_losses on `device` against the reference (on
    the CPU), same inputs."""
    logits = logits.detach().to(device).requires_grad_()
    ref_logits = logits.detach().cpu().double().requires_grad_()
    routed = smoe_ops.route(logits.detach(), k, score=score)
    losses = smoe_ops.router_losses(logits, routed)
    ref = reference.router_losses(ref_logits, type(routed)(*(t.cpu() for t in routed)))

    loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert isinstance(losses, smoe_ops.RouterLosses)
    for name, value, expected in zip(losses._fields, losses, ref):
        assert value.shape == () and value.dtype == loss_dtype, name
        # Losses come from the rounded inputs in float32 (float64): the loss dtype's tolerance.
        assert_close(value, expected, loss_dtype, msg=name)

    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(4, dtype=torch.float64, generator=gen)
    torch.autograd.backward(list(losses), list(grad.to(device=logits.device, dtype=loss_dtype)))
    torch.autograd.backward(list(ref), list(grad))
    assert logits.grad.dtype == logits.dtype
    assert_close(logits.grad, ref_logits.grad, logits.dtype)
    return losses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-k{}".format(*s))
def test_matches_reference(shape, dtype, device):
    num_tokens, num_experts, k = shape
    check_against_reference(random_logits(num_tokens, num_experts, dtype), k, device=device)


def test_counts_of_a_sigmoid_router():
    # The losses always use softmax; counts may come from any router (here sigmoid).
    check_against_reference(random_logits(50, 16, torch.float64), 3, score="sigmoid")


def test_mean_probs_output():
    logits = random_logits(40, 12, torch.float32)
    routed = smoe_ops.route(logits, 2)
    losses, mean_probs = torch.ops.smoe_ops.router_losses(logits, routed.counts, 2)
    assert losses.shape == (4,) and mean_probs.shape == (12,)
    assert_close(mean_probs, torch.softmax(logits.double(), dim=-1).mean(dim=0), torch.float32)


def test_known_values():
    # Uniform logits: p = P = 1/E, entropies log E, z = (log E)^2, balance = E * sum f / E = 1.
    logits = torch.zeros(6, 4)
    routed = smoe_ops.route(logits, 2)
    losses = smoe_ops.router_losses(logits, routed)
    log_e = torch.tensor(4.0).log()
    for value, expected in zip(losses, [1.0, log_e**2, log_e, log_e]):
        assert_close(value, torch.as_tensor(expected), torch.float32)


def test_all_tokens_on_one_expert():
    # One expert takes every token: f = e_5 concentrates, balance = E * P_5, near E.
    logits = random_logits(100, 16, torch.float32, scale=0.1)
    logits[:, 5] += 20
    losses = check_against_reference(logits, 1)
    assert losses.balance > 15.9


def test_zero_probabilities():
    # -inf logits: p = 0 entries (0 log 0 = 0), and a column with P = 0 for batch_entropy.
    logits = random_logits(20, 10, torch.float64)
    logits[:, 3] = float("-inf")
    logits[::2, 7] = float("-inf")
    losses = check_against_reference(logits, 2)
    assert all(value.isfinite() for value in losses)


def test_no_tokens():
    logits = torch.empty(0, 6, requires_grad=True)
    routed = smoe_ops.route(logits.detach(), 2)
    losses = smoe_ops.router_losses(logits, routed)
    for value in losses:
        torch.testing.assert_close(value, torch.tensor(0.0), rtol=0, atol=0)
    sum(losses).backward()
    assert logits.grad.shape == (0, 6)


def test_non_contiguous_logits():
    logits = random_logits(12, 30, torch.float64).t().contiguous().t()
    assert not logits.is_contiguous()
    check_against_reference(logits, 3)


def test_thread_count_does_not_change_results():
    # Fixed chunks of rows, reduced in order: bitwise the same for any thread count.
    logits = random_logits(3000, 64, torch.float32)
    routed = smoe_ops.route(logits, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = smoe_ops.router_losses(logits, routed)
        torch.set_num_threads(2)
        two = smoe_ops.router_losses(logits, routed)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 5, 2), (7, 3, 1), (19, 40, 8)])
def test_opcheck(shape):
    num_tokens, num_experts, k = shape
    logits = random_logits(num_tokens, num_experts, torch.float32).requires_grad_()
    counts = smoe_ops.route(logits.detach(), k).counts
    torch.library.opcheck(torch.ops.smoe_ops.router_losses.default, (logits, counts, k))
    _, mean_probs = torch.ops.smoe_ops.router_losses(logits.detach(), counts, k)
    grad = torch.randn(4)
    args = (grad, logits.detach(), counts, k, mean_probs)
    torch.library.opcheck(torch.ops.smoe_ops.router_losses_backward.default, args)


@pytest.mark.parametrize("shape", [(1, 3, 1), (9, 6, 2)])
def test_gradcheck(shape):
    num_tokens, num_experts, k = shape
    logits = random_logits(num_tokens, num_experts, torch.float64).requires_grad_()
    routed = smoe_ops.route(logits.detach(), k)

    def losses(x):
        return torch.stack(list(smoe_ops.router_losses(x, routed)))

    assert torch.autograd.gradcheck(losses, (logits,))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    logits = random_logits(33, 16, torch.float32)

    def aux_loss(x):
        losses = smoe_ops.router_losses(x, smoe_ops.route(x, 4))
        return losses.balance + 1e-3 * losses.z + 0.1 * losses.entropy - losses.batch_entropy

    x_eager = logits.clone().requires_grad_()
    x_compiled = logits.clone().requires_grad_()
    eager = aux_loss(x_eager)
    compiled = torch.compile(aux_loss, fullgraph=True)(x_compiled)
    torch.testing.assert_close(eager, compiled)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(x_eager.grad, x_compiled.grad)


def losses_call(logits=None, counts=None, k=2):
    logits = torch.zeros(4, 8) if logits is None else logits
    counts = torch.zeros(8, dtype=torch.int32) if counts is None else counts
    return torch.ops.smoe_ops.router_losses(logits, counts, k)


BAD_INPUTS = [
    ({"logits": torch.zeros(8)}, ValueError, r"logits must be 2-D .* got shape \[8\]"),
    ({"logits": torch.zeros(4, 8, dtype=torch.int32)}, TypeError, r"logits must be float.*Int"),
    ({"counts": torch.zeros(8)}, TypeError, r"counts must be Int, got Float"),
    ({"counts": torch.zeros(7, dtype=torch.int32)}, ValueError, r"counts.shape\[0\] must equal"),
    ({"counts": torch.zeros(2, 8, dtype=torch.int32)}, ValueError, r"counts must be 1-D"),
    ({"k": 0}, ValueError, r"k must be >= 1, got 0"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
def test_bad_input_names_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        losses_call(**kwargs)


def test_backward_bad_input_names_the_argument():
    logits, counts = torch.zeros(4, 8), torch.zeros(8, dtype=torch.int32)
    backward = torch.ops.smoe_ops.router_losses_backward
    with pytest.raises(ValueError, match=r"grad_losses.shape\[0\] must equal .* \(4\)"):
        backward(torch.zeros(3), logits, counts, 2, torch.zeros(8))
    with pytest.raises(TypeError, match=r"mean_probs must be Float, got Double"):
        backward(torch.zeros(4), logits, counts, 2, torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mean_probs.shape\[0\] must equal num_experts"):
        backward(torch.zeros(4), logits, counts, 2, torch.zeros(9))
