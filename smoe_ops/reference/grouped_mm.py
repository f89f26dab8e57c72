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
    counts = offsets.diff().tolist()
    # split / unbind / cat rather than indexing: their backwards assemble each gradient once,
    # where x[s:t], w[e] and out[s:t] = ... would each build a full-size gradient per expert
    # and make this baseline O(E) times slower in backward than the loop it stands for.
    biases = [None] * w.shape[0] if bias is None else bias.unbind(0)
    pieces = []
    for x_e, w_e, b_e in zip(x.split(counts), w.unbind(0), biases):
        y = x_e @ w_e
        pieces.append(y if b_e is None else y + b_e)
    return torch.cat(pieces)
