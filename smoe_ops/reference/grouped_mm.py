"""Reference grouped GEMM: the specification of `smoe_ops.grouped_mm`."""

from typing import Optional

import torch


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`out[s:t] = x[s:t] @ w[e] (+ bias[e])` with `s, t = offsets[e], offsets[e + 1]`.

    x [N, K], w [E, K, M], offsets [E + 1] int64 (exclusive prefix sum), bias [E, M] or None;
    returns [N, M] in x's dtype. Rows outside every segment do not exist: offsets[E] == N.
    """
    bounds = offsets.tolist()
    out = x.new_empty(x.shape[0], w.shape[2])
    for e in range(w.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        y = x[s:t] @ w[e]
        out[s:t] = y if bias is None else y + bias[e]
    return out
