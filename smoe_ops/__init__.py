"""smoe_ops: fused sparse Mixture-of-Experts kernels for PyTorch.

    import smoe_ops
    y, aux = smoe_ops.moe_ffn(x, router_weight, w_in, w_out, k)   # the whole layer
    layer = smoe_ops.nn.SparseMoE(hidden_size, ffn_size, num_experts, k)

or op by op: route, router_losses, dispatch, permute, grouped_mm, swiglu, unpermute.
See DESIGN.md for the whole API; `smoe_ops.reference` holds the pure-PyTorch specification.
"""

from smoe_ops import nn, reference
from smoe_ops._library import build_info
from smoe_ops._version import __version__
from smoe_ops.ops import (
    Dispatch,
    RouteResult,
    RouterLosses,
    dispatch,
    grouped_mm,
    moe_ffn,
    permute,
    route,
    router_losses,
    swiglu,
    unpermute,
)

__all__ = [
    "Dispatch", "RouteResult", "RouterLosses", "__version__", "build_info", "dispatch",
    "grouped_mm", "moe_ffn", "nn", "permute", "reference", "route", "router_losses", "swiglu",
    "unpermute",
]  # fmt: skip
