"""Grouped expert GEMM: `grouped_mm`."""

from typing import Optional

import torch

from smoe_ops._library import ops


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """One GEMM per expert over expert-sorted rows: `out[s:t] = x[s:t] @ w[e] (+ bias[e])`.

    Args:
        x: [N, K] float32, float64, bfloat16 or float16, the rows of expert e in
            `offsets[e]:offsets[e + 1]` (the layout `smoe_ops.permute` produces); any strides.
        w: [E, K, M], x's dtype; any strides (a transposed [E, M, K] view is read in place).
        offsets: [E + 1] int64 on the CPU, exclusive prefix sum of the rows per expert:
            `offsets[0] == 0`, non-decreasing, `offsets[E] == N`. Not differentiable.
        bias: [E, M], x's dtype, or None.

    Returns:
        [N, M] in x's dtype. bfloat16 and float16 accumulate in float32 and round once.
    """
    return ops().grouped_mm(x, w, offsets, bias)


@torch.library.register_fake("smoe_ops::grouped_mm")
def _grouped_mm_fake(x, w, offsets, bias):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.register_fake("smoe_ops::grouped_mm_backward")
def _grouped_mm_backward_fake(grad_out, x, w, offsets, output_mask):
    # Unrequested gradients come back as empty [0] tensors, as the kernels return them.
    num_experts, in_features, out_features = w.shape
    shapes = [(x.shape[0], in_features), (num_experts, in_features, out_features)]
    shapes.append((num_experts, out_features))
    return tuple(x.new_empty(s if needed else (0,)) for s, needed in zip(shapes, output_mask))


def _grouped_mm_setup_context(ctx, inputs, output):
    x, w, offsets, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_backward(ctx, grad_out):
    x, w, offsets = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], ctx.has_bias and needs[3]]
    grad_x, grad_w, grad_bias = ops().grouped_mm_backward(grad_out, x, w, offsets, mask)
    return (
        grad_x if mask[0] else None,
        grad_w if mask[1] else None,
        None,
        grad_bias if mask[2] else None,
    )


torch.library.register_autograd(
    "smoe_ops::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup_context
)
