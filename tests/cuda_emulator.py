"""The CUDA emulator library, smoe_ops_emu: the CUDA glue and kernels of csrc/cuda/ built for
the host with -DSMOE_CUDA_EMULATE (csrc/cuda/emulator/cuda_emulator.h has the model), so that
the kernels' own source runs under the op tests on a machine without a GPU.

torch.ops.smoe_ops_emu.<op> takes CPU tensors and has the schema of torch.ops.smoe_ops.<op>.
Built once into build/cuda-emulator/ (ninja reuses it while the sources are unchanged); about a
minute on two cores.
"""

import glob
import os

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "cuda-emulator")


def sources() -> list:
    csrc = os.path.join(ROOT, "csrc")
    return sorted(glob.glob(os.path.join(csrc, "cuda", "*_ops.cpp"))
                  + glob.glob(os.path.join(csrc, "cuda", "emulator", "*.cpp")))


def load():
    """Builds (if needed) and loads smoe_ops_emu; returns torch.ops.smoe_ops_emu."""
    if not hasattr(torch.ops, "smoe_ops_emu") or not hasattr(torch.ops.smoe_ops_emu, "route"):
        os.makedirs(BUILD, exist_ok=True)
        cpp_extension.load(
            name="smoe_ops_cuda_emulator",
            sources=sources(),
            extra_cflags=["-O2", "-g0", "-DSMOE_CUDA_EMULATE", "-fno-strict-aliasing"],
            extra_include_paths=[os.path.join(ROOT, "csrc")],
            build_directory=BUILD,
            is_python_module=False,
            verbose=False,
        )
    return torch.ops.smoe_ops_emu
