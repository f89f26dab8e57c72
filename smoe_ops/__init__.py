"""smoe_ops: fused sparse Mixture-of-Experts kernels for PyTorch.

    import smoe_ops
    h = smoe_ops.swiglu(gate_up)

See DESIGN.md for the whole API; `smoe_ops.reference` holds the pure-PyTorch specification.
"""

from smoe_ops import reference
from smoe_ops._library import build_info
from smoe_ops._version import __version__
from smoe_ops.ops import grouped_mm, swiglu

__all__ = ["__version__", "build_info", "grouped_mm", "reference", "swiglu"]
