"""route and router_losses against the references. Memory-bound on paper (one read of the
logits), so the ceiling is large-copy bandwidth; a plain logits.clone() is timed alongside."""

import pytest
import torch

import smoe_ops
from benchmarks.common import Case, copy_bandwidth_gbs
from benchmarks.workloads import make_logits
from smoe_ops import reference

EXPERTS = [(8, 2), (60, 4), (64, 8), (128, 8)]


def route_bytes(num_tokens, num_experts, k):
    # read logits (fp32), write weights (fp32) and ids (int32), counts negligible
    return 4 * num_tokens * num_experts + 8 * num_tokens * k


def cases(quick: bool):
    tokens = [16384] if quick else [512, 4096, 16384]
    experts = [(128, 8)] if quick else EXPERTS
    for num_tokens in tokens:
        for num_experts, k in experts:
            logits = make_logits(num_tokens, num_experts, k, "uniform")
            shape = f"T={num_tokens} E={num_experts} k={k}"
            yield Case(
                "route", shape, torch.float32,
                ours=lambda l=logits, k=k: smoe_ops.route(l, k),
                ref=lambda l=logits, k=k: reference.route(l, k),
                work=route_bytes(num_tokens, num_experts, k), unit="GB/s",
                ceiling=copy_bandwidth_gbs, ceiling_name="copy",
            )  # fmt: skip
            # The target: route no slower than twice a plain copy of its logits.
            yield Case(
                "logits.clone (baseline)", shape, torch.float32,
                ours=lambda l=logits: l.clone(), ref=None,
                work=8 * logits.numel(), unit="GB/s",
                ceiling=copy_bandwidth_gbs, ceiling_name="copy",
            )  # fmt: skip
            r = smoe_ops.route(logits, k)
            yield Case(
                "router_losses", shape, torch.float32,
                ours=lambda l=logits, r=r: smoe_ops.router_losses(l, r),
                ref=lambda l=logits, r=r: reference.router_losses(l, r),
                work=4 * logits.numel(), unit="GB/s",
                ceiling=copy_bandwidth_gbs, ceiling_name="copy",
            )  # fmt: skip
    # DeepSeek-V3 router: sigmoid scores, selection bias, 8 groups, best 4 groups, scale 2.5.
    for num_tokens in [4096] if quick else [512, 4096, 16384]:
        logits = make_logits(num_tokens, 256, 8, "uniform")
        bias = torch.randn(256) * 0.1
        options = dict(score="sigmoid", expert_bias=bias, num_groups=8, topk_groups=4, scale=2.5)
        yield Case(
            "route (DeepSeek-V3)", f"T={num_tokens} E=256 k=8 g=8/4", torch.float32,
            ours=lambda l=logits, o=options: smoe_ops.route(l, 8, **o),
            ref=lambda l=logits, o=options: reference.route(l, 8, **o),
            work=route_bytes(num_tokens, 256, 8), unit="GB/s",
            ceiling=copy_bandwidth_gbs, ceiling_name="copy",
        )  # fmt: skip


@pytest.mark.parametrize("impl", ["smoe_ops", "reference"])
def test_route(benchmark, impl):
    logits = make_logits(16384, 128, 8, "uniform")
    fn = smoe_ops.route if impl == "smoe_ops" else reference.route
    benchmark(fn, logits, 8)
