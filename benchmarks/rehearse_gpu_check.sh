#!/usr/bin/env bash
# Rehearses benchmarks/gpu_check.sh on a machine with no GPU, under the GPU machine's own
# software: Python 3.12, torch 2.11.0 (the CUDA 13.0 build), nvcc 13.0. Device time is short
# and rare, so the script must not fail for a reason this machine can show: a build that
# torch 2.11 refuses (it compiles extensions as C++17; 2.13 and later as C++20), a Python API
# that 2.11 lacks, a test that does not run there. It builds the working tree (committed or
# not, copied to a scratch folder) with SMOE_OPS_CUDA=1 as gpu_check.sh does, imports it,
# and runs the GPU script's test files on the CPU (their CUDA cases skip) and the benchmark
# half at shapes / 64 (--smoke --device cpu).
#
#   bash benchmarks/rehearse_gpu_check.sh      # from the repository root; needs network once
#
# The venv (REHEARSAL_VENV, default /tmp/smoe-gpu-rehearsal) downloads torch and its nvidia-*
# wheels from PyPI on first use (several GB), then is reused; the build's time is printed.
# Not part of CI: it needs Python 3.12 and those downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${REHEARSAL_VENV:-/tmp/smoe-gpu-rehearsal}
TORCH_VERSION=2.11.0

if [ ! -x "$VENV/bin/python3" ]; then
  py312=${PYTHON312:-$(command -v python3.12 || ls "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
    2>/dev/null | head -1)}
  if [ -z "$py312" ]; then
    echo "no Python 3.12 found: set PYTHON312 to its interpreter" >&2
    exit 2
  fi
  "$py312" -m venv "$VENV"
  "$VENV/bin/python3" -m pip install -q "torch==$TORCH_VERSION" numpy tqdm safetensors pytest \
    hypothesis ninja setuptools wheel
fi

work=$(mktemp -d /tmp/smoe-rehearsal.XXXXXX)
trap 'rm -rf "$work"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work"
cd "$work"
export PATH="$VENV/bin:$PATH"
python3 -c "import sys, torch; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.version.cuda)"

echo "=== build (SMOE_OPS_CUDA=1, sm_90, as gpu_check.sh) ==="
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 SMOE_OPS_CUDA=1 python3 setup.py -q build_ext --inplace
echo "built in $(( $(date +%s) - start )) s"
python3 -c "import smoe_ops; info = smoe_ops.build_info(); print(info); \
assert 'cuda' in info['backends'], 'the CUDA kernels were not built'"

echo "=== the GPU script's test files, on the CPU ==="
python3 -m pytest -q -p no:cacheprovider tests/test_route.py tests/test_router_losses.py \
  tests/test_grouped_mm.py tests/test_swiglu.py tests/test_moe_ffn.py tests/test_cuda.py \
  tests/test_dispatch.py tests/test_gpu_check.py
echo "rehearsal passed: torch $TORCH_VERSION builds, imports and runs the GPU script's tests"
