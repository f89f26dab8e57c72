"""Pure-PyTorch references of every smoe_ops op: the specification, the test oracle and the
benchmark baseline. Nothing here imports the compiled kernels."""

from smoe_ops.reference.activation import swiglu
from smoe_ops.reference.dispatch import Dispatch, dispatch, permute, unpermute
from smoe_ops.reference.grouped_mm import grouped_mm
from smoe_ops.reference.moe import moe_ffn
from smoe_ops.reference.routing import RouteResult, RouterLosses, route, router_losses

__all__ = [
    "Dispatch", "RouteResult", "RouterLosses", "dispatch", "grouped_mm", "moe_ffn", "permute",
    "route", "router_losses", "swiglu", "unpermute",
]  # fmt: skip
