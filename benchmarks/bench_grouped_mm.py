"""grouped_mm forward and backward against the per-expert reference loop. GEMM-bound: the
ceiling is one dense torch.mm with the same dtype and the same total FLOPs."""

import pytest
import torch

import smoe_ops
from benchmarks.common import Case, dense_gemm_gflops
from benchmarks.workloads import make_logits
from smoe_ops import reference


def segments(num_tokens, num_experts, k, skew):
    r = reference.route(make_logits(num_tokens, num_experts, k, skew), k)
    return reference.dispatch(r.ids, num_experts).offsets


def backward(impl, x, w, offsets, grad):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = impl.grouped_mm(x, w, offsets)
    return torch.autograd.grad(out, (x, w), grad)


# (label, T, E, k, K, M): the up-projection of the layers the moe_ffn targets use.
SHAPES = [
    ("E=8 k=2", 4096, 8, 2, 1024, 2 * 2816),
    ("E=128 k=8", 2048, 128, 8, 1024, 2 * 256),
    ("E=64 k=8", 4096, 64, 8, 512, 1024),
]


def cases(quick: bool):
    shapes = SHAPES[1:2] if quick else SHAPES
    skews = ["uniform", "extreme"] if quick else ["uniform", "mild", "extreme"]
    for label, num_tokens, num_experts, k, size_k, size_m in shapes:
        rows = num_tokens * k
        x = torch.randn(rows, size_k)
        w = torch.randn(num_experts, size_k, size_m) / size_k**0.5
        grad = torch.randn(rows, size_m)
        flops = 2 * rows * size_k * size_m

        def ceiling(rows=rows, size_k=size_k, size_m=size_m):
            return dense_gemm_gflops(rows, size_k, size_m)

        for skew in skews:
            offsets = segments(num_tokens, num_experts, k, skew)
            shape = f"{label} N={rows} K={size_k} M={size_m} {skew}"
            yield Case(
                "grouped_mm", shape, torch.float32,
                ours=lambda x=x, w=w, o=offsets: smoe_ops.grouped_mm(x, w, o),
                ref=lambda x=x, w=w, o=offsets: reference.grouped_mm(x, w, o),
                work=flops, unit="GFLOP/s", ceiling=ceiling, ceiling_name="dense mm",
            )  # fmt: skip
            if quick:
                continue
            yield Case(
                "grouped_mm backward (dx, dw)", shape, torch.float32,
                ours=lambda x=x, w=w, o=offsets, g=grad: backward(smoe_ops, x, w, o, g),
                ref=lambda x=x, w=w, o=offsets, g=grad: backward(reference, x, w, o, g),
                # forward + two backward GEMMs
                work=3 * flops, unit="GFLOP/s", ceiling=ceiling, ceiling_name="dense mm",
            )  # fmt: skip


@pytest.mark.parametrize("impl", ["smoe_ops", "reference"])
def test_grouped_mm(benchmark, impl):
    offsets = segments(2048, 128, 8, "uniform")
    x = torch.randn(2048 * 8, 1024)
    w = torch.randn(128, 1024, 512)
    fn = smoe_ops.grouped_mm if impl == "smoe_ops" else reference.grouped_mm
    benchmark(fn, x, w, offsets)
