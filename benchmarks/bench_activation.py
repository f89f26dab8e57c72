"""swiglu against the reference: memory-bound, so the ceiling is large-copy bandwidth."""

import pytest
import torch

import smoe_ops
from benchmarks.common import Case, copy_bandwidth_gbs
from smoe_ops import reference


def cases(quick: bool):
    tokens = [4096] if quick else [512, 4096, 16384]
    for num_rows in tokens:
        for ffn in [1024, 2816]:
            gate_up = torch.randn(num_rows, 2 * ffn)
            out = num_rows * ffn
            # bytes: read [N, 2I], write [N, I], float32
            work = 4 * (gate_up.numel() + out)
            yield Case(
                op="swiglu",
                shape=f"N={num_rows} I={ffn}",
                dtype=torch.float32,
                ours=lambda g=gate_up: smoe_ops.swiglu(g),
                ref=lambda g=gate_up: reference.swiglu(g),
                work=work,
                unit="GB/s",
                ceiling=copy_bandwidth_gbs,
                ceiling_name="copy",
            )


@pytest.mark.parametrize("impl", ["smoe_ops", "reference"])
def test_swiglu(benchmark, impl):
    gate_up = torch.randn(4096, 2 * 1024)
    fn = smoe_ops.swiglu if impl == "smoe_ops" else reference.swiglu
    benchmark(fn, gate_up)
