#!/usr/bin/env bash
# One-shot check of the CUDA kernels on a GPU machine with no network (no installs): builds
# the extension in place, runs the CUDA tests and a compute-sanitizer memcheck, measures the
# card's ceilings and times every op (benchmarks/gpu_check.py), in about 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, Python env active
#
# Expects: python with a CUDA torch (2.11+), nvcc of the same CUDA major, pytest; CuPy and
# hypothesis are used when present. Everything it prints goes to gpu_check.log as well.
# Stages are time-boxed (timeout) so that one hung stage cannot eat the whole budget; a
# failing stage is reported and the script goes on to the next.
set -uo pipefail
cd "$(dirname "$0")/.."
exec > >(tee gpu_check.log) 2>&1
PY=${PYTHON:-python3}  # the GPU image: a plain python3 holds torch
start=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - start )) s) ==="; }
status=0

stage "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
$PY - <<'PYEOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for mod in ("cupy", "hypothesis", "pytest"):
    try:
        print(mod, __import__(mod).__version__)
    except ImportError:
        print(mod, "MISSING")
PYEOF
nvcc --version | tail -2 || true

stage "build (SMOE_OPS_CUDA=1, this card's architecture)"
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export SMOE_OPS_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! timeout 300 $PY setup.py -q build_ext --inplace; then
  echo "BUILD FAILED"; exit 1
fi
$PY -c "import smoe_ops; print(smoe_ops.build_info())" || exit 1

stage "CUDA tests"
# The CUDA-parametrized op tests and tests/test_cuda.py; test_dispatch.py needs hypothesis.
tests="tests/test_route.py tests/test_router_losses.py tests/test_grouped_mm.py \
tests/test_swiglu.py tests/test_moe_ffn.py tests/test_cuda.py"
if $PY -c "import hypothesis" 2>/dev/null; then tests="$tests tests/test_dispatch.py"; \
else echo "hypothesis missing: tests/test_dispatch.py not run"; fi
timeout 240 $PY -m pytest -q -p no:cacheprovider -k "cuda or test_cuda" $tests || status=1

stage "compute-sanitizer memcheck (small case)"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
  /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$sanitizer" ]; then
  timeout 120 "$sanitizer" --tool memcheck --error-exitcode 9 $PY - <<'PYEOF' || status=1
import torch, smoe_ops
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(37, 48, device="cuda", dtype=dtype, requires_grad=True)
    router = torch.randn(48, 7, device="cuda", dtype=dtype, requires_grad=True)
    w_in = torch.randn(7, 48, 2 * 40, device="cuda", dtype=dtype, requires_grad=True)
    w_out = torch.randn(7, 40, 48, device="cuda", dtype=dtype, requires_grad=True)
    y, aux = smoe_ops.moe_ffn(x, router, w_in, w_out, 3)
    (y.float().sum() + aux.balance + aux.z).backward()
    r = smoe_ops.route(torch.randn(19, 64, device="cuda"), 6, score="sigmoid",
                       expert_bias=torch.randn(64, device="cuda"), num_groups=8, topk_groups=3)
torch.cuda.synchronize()
print("memcheck case ran")
PYEOF
else
  echo "compute-sanitizer not found: memcheck not run"
fi

stage "ceilings and op timings"
left=$(( 450 - ($(date +%s) - start) ))
budget=$(( left > 120 ? left - 60 : 60 ))
timeout $(( budget + 90 )) $PY -m benchmarks.gpu_check --budget "$budget" || status=1

stage "done, status $status"
exit $status
