"""Reference routing: the specification of `smoe_ops.route` and `smoe_ops.router_losses`.

Written for clarity, in several passes (scores, group selection, stable sort, gather,
renormalize, bincount). Scores are computed in float32, or float64 for float64 logits.
"""

from typing import NamedTuple, Optional

import torch


class RouteResult(NamedTuple):
    """What `route` returns.

    weights: [T, k] float32 (float64 for float64 logits), differentiable w.r.t. logits.
    ids:     [T, k] int32, distinct per row, by descending selection score.
    counts:  [E] int32, how many (token, slot) pairs chose each expert.
    """

    weights: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor


class RouterLosses(NamedTuple):
    """What `router_losses` returns: four 0-d tensors, float32 (float64 for float64 logits).

    balance:       Switch load-balancing loss, E * sum_e f_e * P_e (1 when perfectly even).
    z:             router z-loss, mean over tokens of logsumexp(logits)^2.
    entropy:       mean over tokens of the entropy of softmax(logits) (low = sparse tokens).
    batch_entropy: entropy of the mean softmax P (high = balanced use of the experts).
    """

    balance: torch.Tensor
    z: torch.Tensor
    entropy: torch.Tensor
    batch_entropy: torch.Tensor


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _stable_descending(values: torch.Tensor) -> torch.Tensor:
    """Column order by descending value, equal values keeping their (ascending) position."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def _nan_as_neg_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)


def _candidate_experts(selection, num_groups: int, topk_groups: int) -> torch.Tensor:
    """[T, topk_groups * G] expert ids of the kept groups, ascending (G = E / num_groups).

    A group scores the sum of its top min(2, G) selection scores; the topk_groups best groups
    are kept, ties going to the lower group id.
    """
    num_tokens, num_experts = selection.shape
    group_size = num_experts // num_groups
    grouped = selection.view(num_tokens, num_groups, group_size)
    group_scores = grouped.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
    # +inf and -inf in one group (an infinite expert_bias) sum to NaN; it ranks as -inf.
    kept = _stable_descending(_nan_as_neg_inf(group_scores))[:, :topk_groups]
    kept = kept.sort(dim=-1).values
    members = torch.arange(group_size, device=selection.device)
    return (kept.unsqueeze(-1) * group_size + members).flatten(1)


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
    """Scores, (group-limited) top-k, renormalize, scale. See `smoe_ops.route` for the API.

    ids are ordered by descending selection score s + expert_bias, ties to the lower expert
    id, NaN ranking as -inf. weights are s[ids] (no bias), divided by
    max(sum, smallest normal of the compute dtype) when renormalize, times scale.
    """
    num_tokens, num_experts = logits.shape
    num_groups = 1 if num_groups is None else num_groups
    topk_groups = num_groups if topk_groups is None else topk_groups
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    if num_groups < 1 or num_experts % num_groups or not 1 <= topk_groups <= num_groups:
        raise ValueError(
            f"num_groups={num_groups} must divide E={num_experts}, and "
            f"topk_groups={topk_groups} must be in [1, num_groups]"
        )
    if not 1 <= k <= topk_groups * (num_experts // num_groups):
        raise ValueError(f"k={k} must be in [1, experts of the kept groups]")

    dtype = _compute_dtype(logits)
    x = logits.to(dtype)
    scores = torch.softmax(x, dim=-1) if score == "softmax" else torch.sigmoid(x)

    selection = scores.detach()
    if expert_bias is not None:
        selection = selection + expert_bias.to(dtype)
    selection = _nan_as_neg_inf(selection)
    candidates = _candidate_experts(selection, num_groups, topk_groups)
    order = _stable_descending(selection.gather(1, candidates))[:, :k]
    ids = candidates.gather(1, order)

    weights = scores.gather(1, ids)
    if renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / total.clamp_min(torch.finfo(dtype).tiny)
    weights = weights * scale
    counts = torch.bincount(ids.flatten(), minlength=num_experts).to(torch.int32)
    return RouteResult(weights, ids.to(torch.int32), counts)


def router_losses(logits: torch.Tensor, r: RouteResult) -> RouterLosses:
    """Switch balance, z, mean token entropy and batch entropy of softmax(logits).

    The balance loss uses the dispatch fractions f_e = counts_e / (T * k) of `r`, which carry
    no gradient. 0 * log 0 counts as 0. With no tokens every loss is 0.
    """
    num_tokens, num_experts = logits.shape
    k = r.ids.shape[1]
    dtype = _compute_dtype(logits)
    x = logits.to(dtype)
    if num_tokens == 0:
        zero = x.sum()  # 0, and still attached to logits for autograd
        return RouterLosses(zero, zero, zero, zero)

    log_probs = torch.log_softmax(x, dim=-1)
    probs = log_probs.exp()
    mean_probs = probs.mean(dim=0)

    fractions = r.counts.to(dtype) / (num_tokens * k)
    balance = num_experts * (fractions * mean_probs).sum()
    z = torch.logsumexp(x, dim=-1).square().mean()
    # Masking the log (not the product) keeps 0 * log 0 = 0 out of the gradient as well.
    safe_log_probs = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    entropy = -(probs * safe_log_probs).sum(dim=-1).mean()
    safe_log_mean = torch.where(mean_probs > 0, mean_probs, torch.ones_like(mean_probs)).log()
    batch_entropy = -(mean_probs * safe_log_mean).sum()
    return RouterLosses(balance, z, entropy, batch_entropy)
