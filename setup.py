"""Builds smoe_ops._C: the C++ CPU kernels always, and the CUDA kernels when asked or possible.

Build with `pip install -e . --no-build-isolation` (see pyproject.toml for why).

CUDA (csrc/cuda/*.cu kernels, csrc/cuda/*.cpp torch glue) joins the same extension:
  SMOE_OPS_CUDA=0      never; the CPU-only build, whatever torch is installed.
  SMOE_OPS_CUDA=1      always; fails with the reason when torch has no CUDA or nvcc is missing.
  unset (the default)  when torch is a CUDA build and the toolkit (nvcc) is found.
Architectures: TORCH_CUDA_ARCH_LIST if set, else "8.0;9.0" (sm_80 and sm_90).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def read_version() -> str:
    with open(os.path.join(ROOT, "smoe_ops", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def cxx_flags() -> list:
    return [
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


def cpu_sources() -> list:
    return sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))


def cpu_extension() -> cpp_extension.CppExtension:
    return cpp_extension.CppExtension(
        "smoe_ops._C",
        cpu_sources(),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags()},
        extra_link_args=["-fopenmp"],
    )


# ---------------------------------------------------------------------------------------------
# CUDA


def toolkit_of(nvcc: str) -> str | None:
    """The toolkit root of an nvcc, which may be a wrapper script (then nvcc's dry run names the
    real bin folder as _HERE_)."""
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", dry.stdout + dry.stderr, flags=re.M)
    if match:
        root = os.path.dirname(match.group(1).strip())
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit root or None, how it was found or why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if os.path.isfile(os.path.join(home, "bin", "nvcc")):
                return home, f"${var}"
            return None, f"${var}={home} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = toolkit_of(nvcc)
        if home:
            return home, f"nvcc on PATH ({nvcc})"
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no nvcc on PATH, CUDA_HOME unset, no /usr/local/cuda"


def cuda_build_plan() -> str | None:
    """The toolkit root if CUDA kernels are to be built, None if not; raises if forced and
    impossible."""
    mode = os.environ.get("SMOE_OPS_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"SMOE_OPS_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        return None
    import torch

    home, how = find_cuda_home()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if home is None:
        problems.append(f"no CUDA toolkit found: {how}")
    if problems:
        if mode == "1":
            raise SystemExit("SMOE_OPS_CUDA=1 but the CUDA kernels cannot be built: "
                             + "; ".join(problems))
        if torch.version.cuda is not None:  # a CUDA torch without a toolkit: say why
            print("smoe_ops: CUDA kernels not built: " + "; ".join(problems), file=sys.stderr)
        return None
    print(f"smoe_ops: building CUDA kernels with the toolkit at {home} (from {how})",
          file=sys.stderr)
    return home


def nvidia_wheel_includes() -> list:
    """Header folders of torch's nvidia-* dependency wheels (cuBLAS, cuSPARSE, ...), which
    ATen/cuda/CUDAContext.h includes and a toolkit assembled from wheels may lack."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if path not in found and (glob.glob(os.path.join(path, "cublas*.h"))
                                          or glob.glob(os.path.join(path, "cusparse*.h"))):
                    found.append(path)
    return found


def cuda_extension(home: str):
    # cpp_extension read CUDA_HOME at import; a wrapper nvcc made it guess wrong.
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    arch_define = "-DSMOE_OPS_CUDA_ARCHS=" + archs.replace(";", ",").replace(" ", ",")
    sources = cpu_sources() + sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = [
        "-O3",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        # C++17 on every torch: the kernels include no torch header, and torch 2.11 (often
        # what a GPU machine carries) builds as C++17 where 2.13 builds as C++20; so CI's
        # build compiles the kernels as the card's will.
        "-std=c++17",
        # Kernels are plain .cu files without ATen; torch's half-operator switches only matter
        # to ATen's own types.
        "-DSMOE_OPS_WITH_CUDA",
    ]
    return cpp_extension.CUDAExtension(
        "smoe_ops._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + nvidia_wheel_includes(),
        extra_compile_args={
            "cxx": cxx_flags() + ["-DSMOE_OPS_WITH_CUDA", arch_define],
            "nvcc": nvcc_flags,
        },
        extra_link_args=["-fopenmp"],
    )


cuda_home = cuda_build_plan()
setup(
    ext_modules=[cuda_extension(cuda_home) if cuda_home else cpu_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
