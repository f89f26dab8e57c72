"""Typed Python wrappers over the compiled ops, with their fake kernels and autograd."""

from smoe_ops.ops.activation import swiglu
from smoe_ops.ops.grouped_mm import grouped_mm

__all__ = ["grouped_mm", "swiglu"]
