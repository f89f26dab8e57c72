"""Routing: `route` (scores, group-limited top-k, renormalize, scale) and `router_losses`."""

from typing import Optional

import torch

from smoe_ops._library import ops
from smoe_ops.reference.routing import RouteResult, RouterLosses

__all__ = ["RouteResult", "RouterLosses", "route", "router_losses"]


def _weight_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def route(
    logits: torch.Tensor,
    k: int,
    score: str = "softmax",
    renormalize: bool = True,
    expert_bias: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    topk_groups: Optional[int] = None,
    scale: float = 1.0,
) -> RouteResult:
    """Score the experts of every token, pick the top k, and weight them.

    Scores s = softmax(logits) or sigmoid(logits), in float32 (float64 for float64 logits).
    Experts are chosen by s + expert_bias; the weights are s alone.

    Args:
        logits: [T, E] float32, float64, bfloat16 or float16; any strides.
        k: experts per token, 1 <= k <= E.
        score: "softmax" or "sigmoid".
        renormalize: divide the k weights of a token by their sum (clamped below at the
            smallest normal number, so an all-underflow sigmoid row gives 0, not NaN).
        expert_bias: [E] float, added to the scores for selection only (aux-loss-free
            balancing); it never enters the weights and gets no gradient.
        num_groups, topk_groups: group-limited routing (DeepSeek-V3): the E experts form
            num_groups groups of G = E / num_groups; a group scores the sum of its best
            min(2, G) selection scores, and only the experts of the topk_groups best groups
            are eligible. None means num_groups = 1 and topk_groups = num_groups (plain top-k).
            Requires k <= topk_groups * G.
        scale: multiplies the weights after renormalization.

    Returns:
        RouteResult(weights [T, k] float32 (float64 for float64 logits), ids [T, k] int32,
        counts [E] int32). ids are distinct, ordered by descending selection score, ties going
        to the lower expert id. NaN propagates: a NaN selection score ranks as -inf (so ids
        stay valid and distinct), and a NaN logit makes the weights of its row NaN (softmax:
        the whole row; sigmoid: the row if that expert is chosen and renormalize is on,
        else only its own weight). Only weights is differentiable (w.r.t. logits).
    """
    num_groups = 1 if num_groups is None else num_groups
    topk_groups = num_groups if topk_groups is None else topk_groups
    weights, ids, counts = ops().route(
        logits, k, score, renormalize, expert_bias, num_groups, topk_groups, scale
    )
    return RouteResult(weights, ids, counts)


@torch.library.register_fake("smoe_ops::route")
def _route_fake(logits, k, score, renormalize, expert_bias, num_groups, topk_groups, scale):
    num_tokens, num_experts = logits.shape
    weights = logits.new_empty(num_tokens, k, dtype=_weight_dtype(logits))
    ids = logits.new_empty(num_tokens, k, dtype=torch.int32)
    return weights, ids, logits.new_empty(num_experts, dtype=torch.int32)


@torch.library.register_fake("smoe_ops::route_backward")
def _route_backward_fake(grad_weights, logits, ids, score, renormalize, scale):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _route_setup_context(ctx, inputs, output):
    logits, _k, score, renormalize, _bias, _groups, _topk_groups, scale = inputs
    _weights, ids, counts = output
    ctx.mark_non_differentiable(ids, counts)
    ctx.save_for_backward(logits, ids)
    ctx.score, ctx.renormalize, ctx.scale = score, renormalize, scale


def _route_backward(ctx, grad_weights, _grad_ids, _grad_counts):
    logits, ids = ctx.saved_tensors
    grad_logits = ops().route_backward(
        grad_weights, logits, ids, ctx.score, ctx.renormalize, ctx.scale
    )
    return grad_logits, None, None, None, None, None, None, None


torch.library.register_autograd(
    "smoe_ops::route", _route_backward, setup_context=_route_setup_context
)


def router_losses(logits: torch.Tensor, r: RouteResult) -> RouterLosses:
    """The routing regularizers of one batch, fused into one pass over the logits.

    p = softmax(logits) (always softmax, the full distribution, whatever `route` scored
    with), P = mean over tokens of p, f = r.counts / (T * k) (no gradient).

    Args:
        logits: [T, E] float32, float64, bfloat16 or float16; any strides.
        r: the RouteResult of these logits (its counts [E] int32 and k = r.ids.shape[1]).

    Returns:
        RouterLosses of 0-d tensors, float32 (float64 for float64 logits), differentiable
        w.r.t. logits: balance = E * sum_e f_e P_e (Switch), z = mean_t logsumexp_t^2,
        entropy = mean_t H(p_t) (low: sparse tokens), batch_entropy = H(P) (high: balanced
        experts); 0 log 0 = 0. All four are 0 when T = 0.
    """
    losses, _mean_probs = ops().router_losses(logits, r.counts, r.ids.shape[1])
    return RouterLosses(*losses.unbind(0))


@torch.library.register_fake("smoe_ops::router_losses")
def _router_losses_fake(logits, counts, k):
    dtype = _weight_dtype(logits)
    return logits.new_empty(4, dtype=dtype), logits.new_empty(logits.shape[1], dtype=dtype)


@torch.library.register_fake("smoe_ops::router_losses_backward")
def _router_losses_backward_fake(grad_losses, logits, counts, k, mean_probs):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _router_losses_setup_context(ctx, inputs, output):
    logits, counts, k = inputs
    _losses, mean_probs = output
    ctx.mark_non_differentiable(mean_probs)
    ctx.save_for_backward(logits, counts, mean_probs)
    ctx.k = k


def _router_losses_backward(ctx, grad_losses, _grad_mean_probs):
    logits, counts, mean_probs = ctx.saved_tensors
    grad_logits = ops().router_losses_backward(grad_losses, logits, counts, ctx.k, mean_probs)
    return grad_logits, None, None


torch.library.register_autograd(
    "smoe_ops::router_losses",
    _router_losses_backward,
    setup_context=_router_losses_setup_context,
)
