"""Builds smoe_ops._C: the C++ CPU kernels, always.

Build with `pip install -e . --no-build-isolation` (see pyproject.toml for why).
"""

import glob
import os
import re

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(ROOT, "smoe_ops", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def cpu_extension() -> cpp_extension.CppExtension:
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = [
        "-O3",
        # Python's CFLAGS add -g, which makes the .so 50x larger and the build slower.
        "-g0",
        # at::parallel_for is inline `#pragma omp` in the ATen headers: without -fopenmp on
        # both compile and link it silently runs on one thread.
        "-fopenmp",
        # No -march=native: the .so must run on any x86-64; hot loops carry their own
        # AVX-512 / AVX2 clones chosen at load time (csrc/cpu/vec_math.h).
        f"-DSMOE_OPS_VERSION={read_version()}",
    ]
    return cpp_extension.CppExtension(
        "smoe_ops._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


# TODO: add a CUDAExtension over csrc/cuda/*.cu, built when torch has CUDA and
# SMOE_OPS_CUDA != "0", once the CUDA kernels (issue 3) exist.
setup(
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
