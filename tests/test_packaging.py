"""The package, its build information, and the README/CI contract."""

import functools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import smoe_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_reports_version_and_backends():
    info = smoe_ops.build_info()
    assert info["version"] == smoe_ops.__version__
    assert "cpu" in info["backends"]
    # Without OpenMP, at::parallel_for silently runs on one thread.
    assert info["openmp"] is True


def test_ci_runs_exactly_the_readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        lines = f.read().splitlines()
    ci_commands = [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd "))]
    assert blocks[:2] == ci_commands


@pytest.mark.slow
def test_cmake_builds_the_same_library(tmp_path):
    """CMakeLists.txt builds the same ops; the built library registers and runs them."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    prefix = torch.utils.cmake_prefix_path
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    build = tmp_path / "build"
    configure = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"]
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=900)
    done = run(configure + generator + [f"-DPython_EXECUTABLE={sys.executable}"])
    assert done.returncode == 0, done.stdout + done.stderr
    done = run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (library,) = (build / "smoe_ops").glob("_C*.so")

    # A fresh interpreter: the setup.py build must not be loaded alongside (double registration).
    check = (
        "import torch\n"
        f"torch.ops.load_library({str(library)!r})\n"
        "x = torch.randn(3, 8, dtype=torch.float64)\n"
        "g, u = x.chunk(2, dim=1)\n"
        "expected = torch.nn.functional.silu(g) * u\n"
        "torch.testing.assert_close(torch.ops.smoe_ops.swiglu(x), expected)\n"
    )
    done = run([sys.executable, "-c", check])
    assert done.returncode == 0, done.stderr
