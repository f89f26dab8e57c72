"""Pure-PyTorch references of every smoe_ops op: the specification, the test oracle and the
benchmark baseline. Nothing here imports the compiled kernels."""

from smoe_ops.reference.activation import swiglu
from smoe_ops.reference.grouped_mm import grouped_mm

__all__ = ["grouped_mm", "swiglu"]
