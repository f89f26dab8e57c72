"""The CUDA kernels compile and link, and that build runs the CPU op tests (CI has no GPU).

A second virtual environment, .venv-cuda/ next to .venv/ (git-ignored; SMOE_OPS_CUDA_VENV
overrides the place), holds torch 2.14.1, the CUDA 13.0 build (about 75 s to install from the
local wheel mirror, once; later runs reuse it). setup.py builds there with SMOE_OPS_CUDA=1
into .venv-cuda/build, never into the source tree, so the CPU extension of the main venv is
left alone. For time the CI build targets sm_90 only (TORCH_CUDA_ARCH_LIST=9.0; the default
8.0;9.0 build compiles the kernels twice). The test then imports that build in a fresh
interpreter, checks build_info, and runs a subset of the op tests against it on the CPU (the
CUDA-parametrized cases skip there: no GPU). It skips only when the torch 2.14.1 wheel or nvcc
is missing.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("SMOE_OPS_CUDA_VENV", os.path.join(ROOT, ".venv-cuda"))
TORCH = "torch==2.14.1"
PACKAGES = [TORCH, "setuptools", "wheel", "ninja", "numpy", "tqdm", "safetensors", "pytest",
            "hypothesis"]
ARCHS = "9.0"
# Op tests run against the CUDA build: each file's reference comparisons and error messages.
OP_TESTS = [
    ("test_swiglu.py", "match_reference or bad_input"),
    ("test_route.py", "matches_reference and (dtype1 or dtype2) or ties or nan or bad_input"),
    ("test_router_losses.py", "matches_reference or bad_input"),
    ("test_dispatch.py", "matches_reference or bad_input"),
    ("test_grouped_mm.py", "matches_reference or bad_input"),
    ("test_cuda.py", ""),
]


def run(cmd, timeout, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def tail(done) -> str:
    return (done.stdout[-6000:] + "\n" + done.stderr[-6000:]).strip()


def find_nvcc():
    home = os.environ.get("CUDA_HOME")
    for path in ([os.path.join(home, "bin", "nvcc")] if home else []) + [
        shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"
    ]:
        if path and os.path.isfile(path):
            return path
    return None


def cuda_venv_python() -> str:
    """The second venv's interpreter, created and filled on first use."""
    python = os.path.join(VENV, "bin", "python")
    ready = os.path.join(VENV, ".smoe-ops-ready")
    if os.path.isfile(ready):
        return python
    if not os.path.isfile(python):
        done = run([sys.executable, "-m", "venv", VENV], timeout=300)
        assert done.returncode == 0, tail(done)
    done = run([python, "-m", "pip", "install", "-q", *PACKAGES], timeout=900)
    if done.returncode != 0:
        if "No matching distribution found for torch" in done.stderr:
            pytest.skip(f"the {TORCH} wheel is not available to pip here")
        pytest.fail("installing the CUDA venv failed:\n" + tail(done))
    with open(ready, "w") as f:
        f.write(" ".join(PACKAGES) + "\n")
    return python


@pytest.mark.slow
def test_cuda_build_compiles_links_and_passes_the_cpu_op_tests():
    if find_nvcc() is None:
        pytest.skip("no nvcc (CUDA_HOME, PATH, /usr/local/cuda): the CUDA kernels cannot build")
    python = cuda_venv_python()
    build_base = os.path.join(VENV, "build")
    env = dict(os.environ, SMOE_OPS_CUDA="1", TORCH_CUDA_ARCH_LIST=ARCHS,
               MAX_JOBS=str(os.cpu_count() or 2))
    env.pop("PYTHONPATH", None)

    # Build (ninja: a rerun only recompiles what changed).
    done = run([python, "setup.py", "-q", "build", "--build-base", build_base], timeout=1200,
               cwd=ROOT, env=env)
    assert done.returncode == 0, "CUDA build failed:\n" + tail(done)
    (lib,) = [os.path.join(build_base, d) for d in os.listdir(build_base)
              if d.startswith("lib.")]
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(lib, "tests"), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))

    # Import the build in a fresh interpreter, from its own folder (not the source tree).
    check = (
        "import json, torch, smoe_ops\n"
        "info = smoe_ops.build_info()\n"
        "print(json.dumps({'file': smoe_ops.__file__, 'info': info, 'torch': torch.__version__,"
        " 'cuda': torch.version.cuda}))\n"
        "for op in ['route', 'route_backward', 'router_losses', 'router_losses_backward',\n"
        "           'dispatch', 'permute', 'unpermute', 'unpermute_backward', 'grouped_mm',\n"
        "           'grouped_mm_backward', 'swiglu', 'swiglu_backward']:\n"
        "    dump = torch._C._dispatch_dump('smoe_ops::' + op)\n"
        "    assert 'CUDA: registered' in dump and 'CPU: registered' in dump, dump\n"
    )
    done = run([python, "-c", check], timeout=300, cwd=lib, env=env)
    assert done.returncode == 0, tail(done)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(lib), report
    assert report["torch"].startswith("2.14.1") and report["cuda"], report
    assert report["info"]["backends"] == ["cpu", "cuda"], report
    assert report["info"]["cuda_archs"] == ARCHS.split(";"), report

    # The op tests against this build.
    for name, selection in OP_TESTS:
        cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               os.path.join("tests", name)]
        if selection:
            cmd += ["-k", selection]
        done = run(cmd, timeout=600, cwd=lib, env=env)
        assert done.returncode == 0, f"{name} against the CUDA build:\n" + tail(done)


OLDEST_TORCH = "2.11.0"


def oldest_torch_headers() -> str:
    """torch/include of the torch 2.11 CUDA wheel, downloaded once into the CUDA venv's folder
    and never installed; skips the test when pip cannot fetch it."""
    import zipfile

    cache = os.path.join(VENV, f"torch-{OLDEST_TORCH}-headers")
    include = os.path.join(cache, "torch", "include")
    if not os.path.isdir(include):
        wheels = os.path.join(cache, "wheel")
        done = run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels,
                    f"torch=={OLDEST_TORCH}"], timeout=600)
        found = glob.glob(os.path.join(wheels, "torch-*.whl"))
        if done.returncode != 0 or not found:
            pytest.skip(f"the torch {OLDEST_TORCH} wheel is not available to pip here")
        with zipfile.ZipFile(found[0]) as wheel:
            members = [m for m in wheel.namelist() if m.startswith("torch/include/")]
            wheel.extractall(cache, members)
        os.remove(found[0])
    assert os.path.isdir(os.path.join(include, "c10", "cuda")), "not a CUDA build of torch"
    return include


@pytest.mark.slow
def test_every_cpp_source_compiles_against_the_oldest_supported_torch():
    """GPU machines often carry torch 2.11, whose cpp_extension compiles as C++17 (2.13 and
    later: C++20), so a C++20-only construct passes CI's builds and breaks the build on the
    card (std::atomic_ref once did). Every .cpp (the CPU kernels, the registration, the CUDA
    glue) is checked with g++ -fsyntax-only -std=c++17 against torch 2.11's headers. The .cu
    kernels include no torch header and setup.py compiles them as C++17 on every torch, so
    the CUDA build test covers them."""
    import concurrent.futures
    import sysconfig

    if find_nvcc() is None:
        pytest.skip("no CUDA toolkit headers (nvcc not found)")
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(
        find_nvcc()))), "include")
    if not os.path.isfile(os.path.join(cuda_include, "cuda_runtime_api.h")):
        cuda_include = "/usr/local/cuda/include"
    include = oldest_torch_headers()

    # One translation unit per file: the files keep helpers of the same name in anonymous
    # namespaces. Two files at a time (torch's headers take ~12 s to parse).
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                     + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    assert len(sources) >= 10, sources
    flags = ["g++", "-std=c++17", "-fsyntax-only", "-fopenmp", "-DSMOE_OPS_WITH_CUDA",
             "-DSMOE_OPS_CUDA_ARCHS=8.0,9.0", "-DSMOE_OPS_VERSION=0", "-DTORCH_EXTENSION_NAME=_C",
             "-I" + os.path.join(ROOT, "csrc"), "-I" + include,
             "-I" + os.path.join(include, "torch", "csrc", "api", "include"),
             "-I" + cuda_include, "-I" + sysconfig.get_paths()["include"]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda source: run(flags + [source], timeout=300), sources))
    failed = [f"{source} vs torch {OLDEST_TORCH} (C++17):\n" + tail(done)
              for source, done in zip(sources, results) if done.returncode != 0]
    assert not failed, "\n\n".join(failed)


@pytest.mark.parametrize(
    "value, match",
    [
        ("1", "SMOE_OPS_CUDA=1 but the CUDA kernels cannot be built: torch .* CPU-only build"),
        ("yes", "SMOE_OPS_CUDA must be 0, 1 or unset, got 'yes'"),
    ],
)
def test_forced_cuda_build_fails_loudly_without_cuda_torch(value, match):
    import re

    import torch

    if value == "1" and torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: a forced build is possible here")
    env = dict(os.environ, SMOE_OPS_CUDA=value)
    done = run([sys.executable, "setup.py", "--name"], timeout=120, cwd=ROOT, env=env)
    assert done.returncode != 0
    assert re.search(match, done.stderr), done.stderr[-2000:]
