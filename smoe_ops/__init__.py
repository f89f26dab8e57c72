"""smoe_ops: fused sparse Mixture-of-Experts kernels for PyTorch.

    import smoe_ops
    r = smoe_ops.route(logits, k)
    d = smoe_ops.dispatch(r.ids, num_experts)
    y = smoe_ops.unpermute(expert_fn(smoe_ops.permute(x, d)), d, r.weights)

See DESIGN.md for the whole API; `smoe_ops.reference` holds the pure-PyTorch specification.
"""

from smoe_ops import reference
from smoe_ops._library import build_info
from smoe_ops._version import __version__
from smoe_ops.ops import (
    Dispatch,
    RouteResult,
    RouterLosses,
    dispatch,
    permute,
    route,
    router_losses,
    swiglu,
    unpermute,
)

__all__ = [
    "Dispatch", "RouteResult", "RouterLosses", "__version__", "build_info", "dispatch",
    "permute", "reference", "route", "router_losses", "swiglu", "unpermute",
]  # fmt: skip
