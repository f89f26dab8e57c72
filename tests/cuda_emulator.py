"""The CUDA emulator library, smoe_ops_emu: the CUDA glue and kernels of csrc/cuda/ built for
the host with -DSMOE_CUDA_EMULATE (csrc/cuda/emulator/cuda_emulator.h has the model), so that
the kernels' own source runs under the op tests on a machine without a GPU.

torch.ops.smoe_ops_emu.<op> takes CPU tensors and has the schema of torch.ops.smoe_ops.<op>.
Built once into build/cuda-emulator/ (ninja reuses it while the sources are unchanged); about a
minute on two cores.

SMOE_CUDA_EMULATOR_SANITIZE=address builds it with AddressSanitizer instead (into
build/cuda-emulator-asan/), the host's stand-in for compute-sanitizer's memcheck: a kernel's
read or write outside a tensor stops the process with the kernel's source line. The
interpreter needs the runtime preloaded (see test_the_kernels_pass_address_sanitizer):

    SMOE_CUDA_EMULATOR_SANITIZE=address ASAN_OPTIONS=detect_leaks=0 \
        LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
        python -m pytest tests/test_cuda_emulator.py
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


def sanitizer() -> str | None:
    """The sanitizer the emulator is built with: None or "address"."""
    value = os.environ.get("SMOE_CUDA_EMULATOR_SANITIZE", "").strip() or None
    if value not in (None, "address"):
        raise ValueError(f"SMOE_CUDA_EMULATOR_SANITIZE must be unset or 'address', got {value!r}")
    return value


def load():
    """Builds (if needed) and loads smoe_ops_emu; returns torch.ops.smoe_ops_emu."""
    if not hasattr(torch.ops, "smoe_ops_emu") or not hasattr(torch.ops.smoe_ops_emu, "route"):
        flags, link, name, build = ["-O2", "-g0"], [], "smoe_ops_cuda_emulator", BUILD
        if sanitizer() == "address":
            flags = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
            link = ["-fsanitize=address"]
            name, build = name + "_asan", BUILD + "-asan"
        os.makedirs(build, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=sources(),
            extra_cflags=flags + ["-DSMOE_CUDA_EMULATE", "-fno-strict-aliasing"],
            extra_ldflags=link,
            extra_include_paths=[os.path.join(ROOT, "csrc")],
            build_directory=build,
            is_python_module=False,
            verbose=False,
        )
    return torch.ops.smoe_ops_emu
