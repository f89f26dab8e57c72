"""The `device` fixture: op tests run on the CPU, and on CUDA where a GPU is present."""

import pytest
import torch

import smoe_ops


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if "cuda" not in smoe_ops.build_info()["backends"]:
            pytest.skip("smoe_ops was built without CUDA kernels (SMOE_OPS_CUDA=0 or CPU torch)")
    return torch.device(request.param)
