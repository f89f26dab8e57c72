"""Typed Python wrappers over the compiled ops, with their fake kernels and autograd."""

from smoe_ops.ops.activation import swiglu
from smoe_ops.ops.dispatch import Dispatch, dispatch, permute, unpermute
from smoe_ops.ops.expert_parallel import expert_parallel_moe_ffn, local_expert_range
from smoe_ops.ops.grouped_mm import grouped_mm
from smoe_ops.ops.moe import moe_ffn
from smoe_ops.ops.routing import RouteResult, RouterLosses, route, router_losses

__all__ = [
    "Dispatch", "RouteResult", "RouterLosses", "dispatch", "expert_parallel_moe_ffn",
    "grouped_mm", "local_expert_range", "moe_ffn", "permute", "route", "router_losses",
    "swiglu", "unpermute",
]  # fmt: skip
