"""Reference token dispatch: the specification of `smoe_ops.dispatch`, `permute`, `unpermute`.

Slot (t, j) of ids [T, k] has flat index s = t*k + j; N = T*k.
"""

from typing import NamedTuple, Optional

import torch


class Dispatch(NamedTuple):
    """order [N] int32 (sorted row -> slot), offsets [E + 1] int64, inverse [T, k] int32."""

    order: torch.Tensor
    offsets: torch.Tensor
    inverse: torch.Tensor


def dispatch(ids: torch.Tensor, num_experts: int) -> Dispatch:
    """Stable sort of the flat slots by expert id, its per-expert row ranges and its inverse."""
    flat = ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(flat.numel(), device=ids.device)
    return Dispatch(order.int(), offsets, inverse.int().view(ids.shape))


def permute(x: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """[T, H] -> [N, H]: sorted row pos holds x[token of slot order[pos]]."""
    topk = d.inverse.shape[1]
    return x.index_select(0, d.order.long() // topk)


def unpermute(
    ys: torch.Tensor, d: Dispatch, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """[N, H] -> [T, H]: y[t] = sum_j weights[t, j] * ys[row of (t, j)], in the dtype of ys.

    Sums in float32 (float64 for float64 ys) and rounds once.
    """
    num_tokens, topk = d.inverse.shape
    acc = torch.float64 if ys.dtype == torch.float64 else torch.float32
    order = d.order.long()
    rows = ys.to(acc)
    if weights is not None:
        rows = rows * weights.to(acc).flatten()[order].unsqueeze(1)
    y = rows.new_zeros(num_tokens, ys.shape[1]).index_add(0, order // topk, rows)
    return y.to(ys.dtype)
