"""The package, its build information, and the README/CI contract."""

import os
import re

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
