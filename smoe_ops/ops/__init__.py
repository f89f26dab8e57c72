"""Typed Python wrappers over the compiled ops, with their fake kernels and autograd."""

from smoe_ops.ops.activation import swiglu

__all__ = ["swiglu"]
