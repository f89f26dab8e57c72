"""Pure-PyTorch references of every smoe_ops op: the specification, the test oracle and the
benchmark baseline. Nothing here imports the compiled kernels."""

from smoe_ops.reference.activation import swiglu

__all__ = ["swiglu"]
