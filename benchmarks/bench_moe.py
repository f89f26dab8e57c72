"""moe_ffn forward + backward against the per-expert reference loop and torch.compile of it.

FLOPs of the layer (forward + backward): the two expert GEMMs, [N, H] x [H, 2I] and
[N, I] x [I, H], cost 2*N*H*2I + 2*N*I*H = 6*N*H*I forward and twice that backward, so
18*N*H*I in all with N = T*k; the router GEMM and the rest are below 1% and are left out.
The ceiling is dense torch.mm GFLOP/s at the up-projection's shape [N, H] x [H, 2I].
"""

import gc
import os

import pytest
import torch

import smoe_ops
from benchmarks.common import Case, dense_gemm_gflops
from benchmarks.workloads import make_logits
from smoe_ops import reference

# (label, T, H, I, E, k): the two targets.
SHAPES = [
    ("Mixtral-like", 4096, 1024, 2816, 8, 2),
    ("many small experts", 2048, 1024, 256, 128, 8),
]
# The quick run's shape: a small layer, so the reference loop takes well under a second.
QUICK_SHAPES = [("small", 512, 512, 256, 64, 8)]


def make_params(num_tokens, hidden, ffn, num_experts, k, skew="uniform"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_tokens, hidden, generator=g)
    # A router whose logits on x follow the requested skew: least squares fit.
    logits = make_logits(num_tokens, num_experts, k, skew)
    router = torch.linalg.lstsq(x, logits).solution
    w_in = torch.randn(num_experts, hidden, 2 * ffn, generator=g) / hidden**0.5
    w_out = torch.randn(num_experts, ffn, hidden, generator=g) / ffn**0.5
    return [t.requires_grad_() for t in (x, router, w_in, w_out)]


def step(fn, params, k):
    for p in params:
        p.grad = None
    y, aux = fn(*params, k)
    (y.square().mean() + 0.01 * aux.balance).backward()


def cases(quick: bool):
    shapes = QUICK_SHAPES if quick else SHAPES
    for label, num_tokens, hidden, ffn, num_experts, k in shapes:
        params = make_params(num_tokens, hidden, ffn, num_experts, k)
        rows = num_tokens * k
        shape = f"{label} T={num_tokens} H={hidden} I={ffn} E={num_experts} k={k}"

        def ceiling(rows=rows, hidden=hidden, ffn=ffn):
            return dense_gemm_gflops(rows, hidden, 2 * ffn)

        flops = 18 * rows * hidden * ffn
        yield Case(
            "moe_ffn fwd+bwd", shape, torch.float32,
            ours=lambda p=params, k=k: step(smoe_ops.moe_ffn, p, k),
            ref=lambda p=params, k=k: step(reference.moe_ffn, p, k),
            work=flops, unit="GFLOP/s", ceiling=ceiling, ceiling_name="dense mm",
        )  # fmt: skip
        if quick:
            continue
        compiled = torch.compile(reference.moe_ffn)
        yield Case(
            "torch.compile(reference) fwd+bwd", shape, torch.float32,
            ours=lambda p=params, k=k: step(compiled, p, k),
            ref=lambda p=params, k=k: step(reference.moe_ffn, p, k),
            work=flops, unit="GFLOP/s", ceiling=ceiling, ceiling_name="dense mm",
        )  # fmt: skip


def peak_rss_mib(fn) -> float:
    """Peak resident memory added while fn runs (Linux: VmHWM after resetting it)."""

    def read(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    gc.collect()
    base = read("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return read("VmHWM:") - base


def memory_rows():
    """Peak memory of one forward + backward step, ours vs the reference, per target shape."""
    if not os.path.exists("/proc/self/clear_refs"):
        return []
    rows = []
    for label, num_tokens, hidden, ffn, num_experts, k in SHAPES:
        params = make_params(num_tokens, hidden, ffn, num_experts, k)
        step(smoe_ops.moe_ffn, params, k)  # warm up both, so first-call allocations don't count
        step(reference.moe_ffn, params, k)
        ours = min(peak_rss_mib(lambda: step(smoe_ops.moe_ffn, params, k)) for _ in range(3))
        ref = min(peak_rss_mib(lambda: step(reference.moe_ffn, params, k)) for _ in range(3))
        rows.append({"shape": label, "ours_mib": ours, "ref_mib": ref})
    return rows


@pytest.mark.parametrize("impl", ["smoe_ops", "reference"])
def test_moe_ffn_step(benchmark, impl):
    params = make_params(2048, 1024, 256, 128, 8)
    fn = smoe_ops.moe_ffn if impl == "smoe_ops" else reference.moe_ffn
    benchmark(step, fn, params, 8)
