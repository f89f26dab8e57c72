"""Loads the compiled kernels. Every other module gets the ops through `ops()`."""

import logging

import torch

from smoe_ops import _C  # noqa: F401  (loading the .so registers torch.ops.smoe_ops.*)

logger = logging.getLogger("smoe_ops")


def ops():
    """The `torch.ops.smoe_ops` namespace."""
    return torch.ops.smoe_ops


def build_info() -> dict:
    """Version, compiled backends and CUDA architectures of the loaded extension."""
    return dict(_C.build_info())
