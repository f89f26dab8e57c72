"""Reference gated activation: the specification of `smoe_ops.swiglu`."""

import torch
import torch.nn.functional as F


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[N, 2I] -> [N, I]: `silu(gate_up[:, :I]) * gate_up[:, I:]`, in the input dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
