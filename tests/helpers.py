"""Shared test helpers: the one per-dtype tolerance table, and comparison against references."""

import torch

# (rtol, atol) for kernel output vs a float64 reference computed from the same inputs.
# bfloat16 / float16: one rounding of the output plus float32 accumulation.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}

DTYPES = list(TOLERANCES)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, scale=1.0, msg=""):
    """Compare `actual` with a (float64) `expected`, at the tolerance of `dtype`.

    `scale` widens the tolerance for results that sum many rounded terms (GEMMs).
    """
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    # Kernels may run on a GPU; references run on the CPU.
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), rtol=rtol * scale, atol=atol * scale,
        msg=msg or None,
    )


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, msg=""):
    """Exact equality (index outputs), across devices."""
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, msg=msg or None)


def load_topmodel2007():
    """(data, info) of the real Topmodel2007 set, or skip the calling test with what to
    install: the R sets need the PyPI package rdata and the psychotree data files."""
    import pytest

    datasets = pytest.importorskip("smoe_ops.reward.datasets")
    pytest.importorskip("rdata", reason="the R sets need pip install rdata")
    try:
        datasets.find_r_library("psychotree")
    except FileNotFoundError:
        pytest.skip("R package psychotree not installed; run "
                    "python -m smoe_ops.reward.datasets fetch")
    return datasets.load_dataset("topmodel2007")
