"""Typed Python wrappers over the compiled ops, with their fake kernels and autograd."""

from smoe_ops.ops.activation import swiglu
from smoe_ops.ops.dispatch import Dispatch, dispatch, permute, unpermute

__all__ = ["Dispatch", "dispatch", "permute", "swiglu", "unpermute"]
