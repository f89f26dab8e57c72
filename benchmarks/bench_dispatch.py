"""dispatch + permute + unpermute against the reference pipeline (stable argsort,
index_select, multiply, index_add). Pure data movement: the ceiling is large-copy bandwidth."""

import pytest
import torch

import smoe_ops
from benchmarks.common import Case, copy_bandwidth_gbs
from benchmarks.workloads import SKEWS, make_logits
from smoe_ops import reference

EXPERTS = [(8, 2), (60, 4), (64, 8), (128, 8)]


def pipeline(impl, x, ids, weights, num_experts):
    plan = impl.dispatch(ids, num_experts)
    rows = impl.permute(x, plan)
    return impl.unpermute(rows, plan, weights)


def moved_bytes(num_tokens, hidden, k):
    # fp32 rows: read x, write xs (N rows), read xs as the expert output, write y;
    # int32 ids read, order and inverse written; fp32 weights read.
    rows = num_tokens * k
    return 4 * (num_tokens * hidden + 2 * rows * hidden + num_tokens * hidden) + 4 * 4 * rows


def cases(quick: bool):
    tokens = [4096] if quick else [512, 4096, 16384]
    experts = [(64, 8)] if quick else EXPERTS
    hiddens = [1024] if quick else [512, 1024]
    skews = ["uniform", "extreme"] if quick else SKEWS
    for num_tokens in tokens:
        for num_experts, k in experts:
            for hidden in hiddens:
                for skew in skews:
                    r = reference.route(make_logits(num_tokens, num_experts, k, skew), k)
                    x = torch.randn(num_tokens, hidden)
                    yield Case(
                        "dispatch+permute+unpermute",
                        f"T={num_tokens} E={num_experts} k={k} H={hidden} {skew}",
                        torch.float32,
                        ours=lambda x=x, r=r, e=num_experts: pipeline(
                            smoe_ops, x, r.ids, r.weights, e),
                        ref=lambda x=x, r=r, e=num_experts: pipeline(
                            reference, x, r.ids, r.weights, e),
                        work=moved_bytes(num_tokens, hidden, k), unit="GB/s",
                        ceiling=copy_bandwidth_gbs, ceiling_name="copy",
                    )  # fmt: skip


@pytest.mark.parametrize("impl", ["smoe_ops", "reference"])
def test_dispatch_pipeline(benchmark, impl):
    r = reference.route(make_logits(4096, 64, 8, "uniform"), 8)
    x = torch.randn(4096, 1024)
    module = smoe_ops if impl == "smoe_ops" else reference
    benchmark(pipeline, module, x, r.ids, r.weights, 64)
