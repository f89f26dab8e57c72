"""Token dispatch: `dispatch` groups the T*k routed (token, slot) pairs by expert; `permute`
moves token rows into that expert order and `unpermute` combines them back, weighted."""

from typing import NamedTuple, Optional

import torch

from smoe_ops._library import ops


class Dispatch(NamedTuple):
    """Where each of the N = T*k routed rows goes. Slot (t, j) has flat index s = t*k + j.

    order:   [N] int32, order[pos] = the slot at sorted row pos; grouped by expert, and
             stable (within an expert, slots in increasing order).
    offsets: [E + 1] int64, rows of expert e are offsets[e]:offsets[e + 1]; offsets[E] = N.
    inverse: [T, k] int32, inverse[t, j] = the sorted row of slot (t, j).
    """

    order: torch.Tensor
    offsets: torch.Tensor
    inverse: torch.Tensor


def dispatch(ids: torch.Tensor, num_experts: int) -> Dispatch:
    """Stable sort of the routed slots by expert, with no host sync.

    Args:
        ids: [T, k] int32 or int64, values in [0, num_experts); ids in a row may repeat.
        num_experts: E >= 1.

    Returns:
        Dispatch(order [T*k] int32, offsets [E + 1] int64, inverse [T, k] int32).

    Raises:
        IndexError: an id outside [0, num_experts).
    """
    order, offsets, inverse = ops().dispatch(ids, num_experts)
    return Dispatch(order, offsets, inverse)


@torch.library.register_fake("smoe_ops::dispatch")
def _dispatch_fake(ids, num_experts):
    num_tokens, topk = ids.shape
    order = ids.new_empty(num_tokens * topk, dtype=torch.int32)
    offsets = ids.new_empty(num_experts + 1, dtype=torch.int64)
    inverse = ids.new_empty(num_tokens, topk, dtype=torch.int32)
    return order, offsets, inverse


def permute(x: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """Copies token rows into expert order: xs[d.inverse[t, j]] = x[t].

    Args:
        x: [T, H] float32, float64, bfloat16 or float16; any strides.
        d: the Dispatch of the routing, from `dispatch`. d.inverse must be a permutation of
            [0, T*k), so that every row of the result is written exactly once; the kernel
            checks it (IndexError out of range, ValueError for a repeated row).

    Returns:
        xs [T*k, H], the dtype of x; rows of expert e are d.offsets[e]:d.offsets[e + 1].
        Differentiable w.r.t. x (grad_x[t] = sum over j of grad_xs[d.inverse[t, j]]).
    """
    return ops().permute(x, d.inverse)


@torch.library.register_fake("smoe_ops::permute")
def _permute_fake(x, inverse):
    return x.new_empty(inverse.shape[0] * inverse.shape[1], x.shape[1])


def _permute_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _permute_backward(ctx, grad_xs):
    (inverse,) = ctx.saved_tensors
    return ops().unpermute(grad_xs, inverse, None), None


torch.library.register_autograd(
    "smoe_ops::permute", _permute_backward, setup_context=_permute_setup_context
)


def unpermute(
    ys: torch.Tensor, d: Dispatch, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Combines each token's k expert rows: y[t] = sum_j weights[t, j] * ys[d.inverse[t, j]].

    Args:
        ys: [T*k, H] float32, float64, bfloat16 or float16, in expert order; any strides.
        d: the Dispatch that produced the order of ys.
        weights: [T, k] float (routing weights, float32 or float64), or None for all ones.

    Returns:
        y [T, H], the dtype of ys; summed in float32 (float64 for float64 ys), rounded once.
        Differentiable w.r.t. ys and weights.
    """
    return ops().unpermute(ys, d.inverse, weights)


@torch.library.register_fake("smoe_ops::unpermute")
def _unpermute_fake(ys, inverse, weights):
    return ys.new_empty(inverse.shape[0], ys.shape[1])


@torch.library.register_fake("smoe_ops::unpermute_backward")
def _unpermute_backward_fake(grad_y, ys, inverse, weights, weights_grad):
    grad_ys = torch.empty_like(ys, memory_format=torch.contiguous_format)
    if weights is None:
        return grad_ys, ys.new_empty(0)
    if not weights_grad:
        return grad_ys, weights.new_empty(0)
    return grad_ys, weights.new_empty(inverse.shape)


def _unpermute_setup_context(ctx, inputs, output):
    ys, inverse, weights = inputs
    ctx.save_for_backward(ys, inverse, weights)


def _unpermute_backward(ctx, grad_y):
    ys, inverse, weights = ctx.saved_tensors
    weights_grad = weights is not None and ctx.needs_input_grad[2]
    grad_ys, grad_weights = ops().unpermute_backward(grad_y, ys, inverse, weights, weights_grad)
    return grad_ys, None, grad_weights if weights_grad else None


torch.library.register_autograd(
    "smoe_ops::unpermute", _unpermute_backward, setup_context=_unpermute_setup_context
)
