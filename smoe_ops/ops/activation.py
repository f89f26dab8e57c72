"""The gated activation: `swiglu`."""

import torch

from smoe_ops._library import ops


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up = [gate | up]`.

    Args:
        gate_up: [N, 2I] float32, float64, bfloat16 or float16; any strides.

    Returns:
        [N, I], the dtype of `gate_up`. Reduced precision computes in float32 and rounds once.
    """
    return ops().swiglu(gate_up)


@torch.library.register_fake("smoe_ops::swiglu")
def _swiglu_fake(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.register_fake("smoe_ops::swiglu_backward")
def _swiglu_backward_fake(grad_out, gate_up):
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad_out):
    (gate_up,) = ctx.saved_tensors
    return ops().swiglu_backward(grad_out, gate_up)


torch.library.register_autograd(
    "smoe_ops::swiglu", _swiglu_backward, setup_context=_swiglu_setup_context
)
