"""The CUDA kernels' own source, run on the host by the CUDA emulator (tests/cuda_emulator.py,
csrc/cuda/emulator/), against the CPU kernels and the float64 references.

Each torch.ops.smoe_ops_emu op is the CUDA glue plus the CUDA kernels of that op; the CPU ops
(torch.ops.smoe_ops, on CPU tensors) are the ones the rest of the suite checks against the
references. Index outputs (ids, counts, order, offsets, inverse) must be equal exactly, floats
within the dtype tolerances. Device-side checks must fail the launch with their message. The
emulator runs each block's threads as fibers in a seeded random order: some cases rerun under
several seeds, so that a missing barrier shows up as a difference.

What this cannot show (it waits for benchmarks/gpu_check.sh on a GPU): timing, memory ordering
between blocks, alignment faults, the real hardware's mma rounding.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch

import smoe_ops  # noqa: F401  (registers torch.ops.smoe_ops)
from smoe_ops import reference
from tests.helpers import TOLERANCES, assert_close, assert_equal

pytestmark = pytest.mark.slow

cpu = torch.ops.smoe_ops


@pytest.fixture(scope="module")
def emu():
    from tests import cuda_emulator

    return cuda_emulator.load()


def with_seed(seed, fn):
    old = os.environ.get("SMOE_CUDA_EMULATOR_SEED")
    os.environ["SMOE_CUDA_EMULATOR_SEED"] = str(seed)
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["SMOE_CUDA_EMULATOR_SEED"]
        else:
            os.environ["SMOE_CUDA_EMULATOR_SEED"] = old


def close(actual, expected, dtype, scale=1.0):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale,
                               atol=atol * scale)


# ---- routing -------------------------------------------------------------------------------

# (T, E, k, score, renormalize, bias, num_groups, topk_groups, scale)
ROUTES = [
    (0, 8, 2, "softmax", True, False, 1, 1, 1.0),
    (1, 1, 1, "softmax", True, False, 1, 1, 1.0),
    (37, 7, 2, "softmax", True, False, 1, 1, 1.0),
    (37, 7, 7, "softmax", False, False, 1, 1, 1.0),  # k = E
    (19, 60, 8, "sigmoid", True, False, 1, 1, 2.5),
    (19, 60, 6, "softmax", False, True, 6, 2, 1.0),  # groups with bias
    (9, 257, 8, "softmax", True, False, 1, 1, 1.0),  # E > 256, not a multiple of 32
    (9, 256, 8, "sigmoid", True, True, 8, 4, 2.5),  # DeepSeek-V3 router
    (9, 33, 33, "sigmoid", False, True, 1, 1, 1.0),
    # Groups of whole warp slots (G a multiple of 32), scored from the register cache.
    (40, 512, 8, "sigmoid", True, True, 4, 2, 1.0),  # 4 slots per group
    (33, 64, 4, "softmax", True, True, 2, 1, 1.0),
    (17, 96, 6, "sigmoid", False, False, 3, 2, 1.0),  # a fourth slot past the row
    # E > 512: a block per row
    (5, 600, 8, "softmax", True, False, 1, 1, 1.0),
    (3, 1024, 16, "sigmoid", True, True, 16, 4, 2.5),
    (1, 520, 520, "softmax", False, False, 1, 1, 1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ROUTES, ids=lambda c: "T{}-E{}-k{}-{}-g{}".format(
    c[0], c[1], c[2], c[3], c[6]))
def test_route_equals_the_cpu_kernel(emu, case, dtype):
    T, E, k, score, renorm, with_bias, groups, topk_groups, scale = case
    gen = torch.Generator().manual_seed(T * 1000 + E)
    logits = torch.randn(T, E, generator=gen).to(dtype)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    bias = torch.randn(E, generator=gen).to(wdtype) * 0.1 if with_bias else None
    args = (k, score, renorm, bias, groups, topk_groups, scale)
    w, ids, counts = emu.route(logits, *args)
    w_ref, ids_ref, counts_ref = cpu.route(logits, *args)
    assert w.dtype == w_ref.dtype and ids.dtype == torch.int32
    assert_equal(ids, ids_ref)
    assert_equal(counts, counts_ref)
    close(w, w_ref, wdtype)

    grad_w = torch.randn(T, k, generator=gen).to(wdtype)
    grad = emu.route_backward(grad_w, logits, ids, score, renorm, scale)
    grad_ref = cpu.route_backward(grad_w, logits, ids_ref, score, renorm, scale)
    close(grad, grad_ref, dtype)


@pytest.mark.parametrize("E", [7, 100, 600])  # a warp (one or four key slots), a block
def test_route_ties_nan_and_inf_rows_equal_the_cpu_kernel(emu, E):
    nan, inf = float("nan"), float("inf")
    pattern = torch.tensor([
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
        [nan] * 7,
        [-inf, 0.0, -inf, 2.0, 2.0, nan, 1.0],
        [inf, 0.0, 1.0, inf, -1.0, 0.0, 0.0],
        [3.0] * 7,
        [-inf] * 7,
        # Finite, but a running sum overflows in some orders (the two kernels add in
        # different orders): both must see a finite row and select on the logits.
        [3e38, 3e38, -3e38, -3e38, 20.0, 30.0, -3e38],
    ])
    logits = pattern.repeat(1, (E + 6) // 7)[:, :E].contiguous()
    for score in ("softmax", "sigmoid"):
        for renorm in (True, False):
            args = (3, score, renorm, None, 1, 1, 1.0)
            w, ids, counts = emu.route(logits, *args)
            w_ref, ids_ref, counts_ref = cpu.route(logits, *args)
            assert_equal(ids, ids_ref)
            assert_equal(counts, counts_ref)
            torch.testing.assert_close(w, w_ref, equal_nan=True)


# Groups with NaN and infinite keys: an all-NaN softmax row, -inf logits, and a bias with
# +inf and -inf, so that one group's top-2 sums to NaN (it ranks as -inf). Each group path:
# whole warp slots from the register cache (G = 32), members recomputing keys (G = 10), and a
# block per row (E > 512).
@pytest.mark.parametrize("E, groups, topk_groups", [(256, 8, 4), (60, 6, 2), (600, 8, 3)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_grouped_route_nan_and_inf_keys_equal_the_cpu_kernel(emu, E, groups, topk_groups,
                                                              score):
    nan, inf = float("nan"), float("inf")
    G = E // groups
    gen = torch.Generator().manual_seed(E)
    logits = torch.randn(6, E, generator=gen)
    logits[1] = nan
    logits[2, ::3] = -inf
    logits[3, G:2 * G] = inf
    logits[4, 5] = nan
    bias = torch.randn(E, generator=gen) * 0.1
    bias[:G] = -inf
    bias[0] = inf  # group 0's top-2 is (inf, -inf), whose sum is NaN
    bias[G + 1] = -inf
    bias[2 * G + 2] = inf
    for renorm in (True, False):
        args = (4, score, renorm, bias, groups, topk_groups, 1.0)
        w, ids, counts = emu.route(logits, *args)
        w_ref, ids_ref, counts_ref = cpu.route(logits, *args)
        assert_equal(ids, ids_ref)
        assert_equal(counts, counts_ref)
        torch.testing.assert_close(w, w_ref, equal_nan=True)


# Blocks loop over rows (the grid is the blocks the device holds at once: 8 per emulated
# multiprocessor) and count their picks in shared memory; rows wider than 4096 experts count
# straight into the output. One multiprocessor: every block routes many rows.
@pytest.mark.parametrize("case", [(300, 60, 8), (700, 5, 5), (40, 600, 8), (12, 4100, 4)],
                         ids=lambda c: "T{}-E{}-k{}".format(*c))
@pytest.mark.parametrize("multiprocessors", ["1", "1000"])
def test_route_blocks_loop_over_rows_and_count_in_shared_memory(emu, monkeypatch, case,
                                                                  multiprocessors):
    monkeypatch.setenv("SMOE_CUDA_EMULATOR_SMS", multiprocessors)
    T, E, k = case
    gen = torch.Generator().manual_seed(T + E)
    logits = torch.randn(T, E, generator=gen)
    # A bias that sends every row to expert 3 first: the hottest count any row set can make.
    bias = torch.zeros(E)
    bias[3] = 10.0
    for expert_bias in (None, bias):
        args = (k, "sigmoid", True, expert_bias, 1, 1, 1.0)
        w, ids, counts = emu.route(logits, *args)
        w_ref, ids_ref, counts_ref = cpu.route(logits, *args)
        assert_equal(ids, ids_ref)
        assert_equal(counts, counts_ref)
        assert int(counts.sum()) == T * k
        close(w, w_ref, torch.float32)
    assert int(counts[3]) == T


@pytest.mark.parametrize("E, groups", [(256, 8), (96, 3), (60, 6)])  # cached, cached, not
def test_grouped_route_ties_equal_the_cpu_kernel(emu, E, groups):
    # Logits from three values: keys and group scores tie everywhere, so the order (key
    # descending, id ascending, groups likewise) decides every pick.
    gen = torch.Generator().manual_seed(E)
    logits = torch.randint(0, 3, (50, E), generator=gen).float()
    bias = torch.randint(0, 2, (E,), generator=gen).float() * 0.5
    for expert_bias in (None, bias):
        args = (8, "sigmoid", True, expert_bias, groups, 2, 1.0)
        w, ids, counts = emu.route(logits, *args)
        w_ref, ids_ref, counts_ref = cpu.route(logits, *args)
        assert_equal(ids, ids_ref)
        assert_equal(counts, counts_ref)
        close(w, w_ref, torch.float32)


def test_route_matches_the_float64_reference(emu):
    logits = torch.randn(23, 60, dtype=torch.float64)
    bias = torch.randn(60, dtype=torch.float64) * 0.1
    w, ids, _ = emu.route(logits, 4, "sigmoid", True, bias, 6, 3, 1.5)
    ref = reference.route(logits, 4, score="sigmoid", renormalize=True, expert_bias=bias,
                          num_groups=6, topk_groups=3, scale=1.5)
    assert_equal(ids.long(), ref.ids.long())
    assert_close(w, ref.weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
# E <= 512: one fused pass (1 to 16 register slots per lane); E = 600: the two-kernel path.
@pytest.mark.parametrize("shape", [(0, 5, 2), (1, 1, 1), (70, 7, 2), (300, 257, 8),
                                   (5000, 3, 1), (90, 128, 8), (40, 600, 4), (6, 0, 1)],
                         ids=str)
def test_router_losses_equal_the_cpu_kernel(emu, shape, dtype):
    T, E, k = shape
    gen = torch.Generator().manual_seed(T + E)
    logits = (torch.randn(T, E, generator=gen) * 2).to(dtype)
    if T > 4 and E > 2:
        logits[::3, ::2] = float("-inf")  # masked experts: p = 0, no NaN in the entropies
    counts = torch.randint(0, T + 1, (E,), generator=gen, dtype=torch.int32)
    losses, mean = emu.router_losses(logits, counts, k)
    losses_ref, mean_ref = cpu.router_losses(logits, counts, k)
    wdtype = losses_ref.dtype
    close(losses, losses_ref, wdtype, scale=4)
    close(mean, mean_ref, wdtype)
    if T == 0:
        return
    grad_losses = torch.randn(4, generator=gen).to(wdtype)
    grad = emu.router_losses_backward(grad_losses, logits, counts, k, mean_ref)
    grad_ref = cpu.router_losses_backward(grad_losses, logits, counts, k, mean_ref)
    close(grad, grad_ref, dtype, scale=4)


# ---- dispatch ------------------------------------------------------------------------------

def routed(T, k, E, seed=0, dtype=torch.int32, skew=None):
    gen = torch.Generator().manual_seed(seed)
    if skew == "one":
        return torch.full((T, k), E - 1, dtype=dtype)
    scores = torch.rand(T, E, generator=gen)
    if skew == "empty":
        scores[:, ::2] = -1  # every even expert gets nothing
    return scores.topk(k, dim=1).indices.to(dtype)


DISPATCHES = [
    (0, 2, 4, None), (1, 1, 1, None), (33, 2, 7, None), (33, 8, 8, None), (64, 1, 60, "empty"),
    (257, 4, 257, None), (700, 2, 5, "one"),
    (1500, 2, 9, None),  # 3000 slots: three counting-sort chunks
    (600, 2, 600, None),  # a [chunks, E] histogram over one 1024-entry scan tile
    (2600, 4, 16, "empty"),  # 11 chunks: two blocks of 8 counting warps
]


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", DISPATCHES, ids=str)
def test_dispatch_equals_the_cpu_kernel(emu, case, ids_dtype):
    T, k, E, skew = case
    ids = routed(T, k, E, dtype=ids_dtype, skew=skew)
    got, want = emu.dispatch(ids, E), cpu.dispatch(ids, E)
    for a, b, name in zip(got, want, ("order", "offsets", "inverse")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_equal(a, b, msg=name)


def test_dispatch_is_the_same_under_every_schedule(emu):
    ids = routed(1500, 2, 9, skew=None)
    want = cpu.dispatch(ids, 9)
    for seed in (2, 3, 4):
        got = with_seed(seed, lambda: emu.dispatch(ids, 9))
        for a, b in zip(got, want):
            assert_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [64, 7], ids=lambda h: f"H{h}")  # 16-byte packs, single elements
@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "no-weights"])
def test_permute_unpermute_equal_the_cpu_kernel(emu, dtype, H, weighted):
    T, k, E = 29, 3, 7
    gen = torch.Generator().manual_seed(H)
    ids = routed(T, k, E)
    _, _, inverse = cpu.dispatch(ids, E)
    x = torch.randn(T, H, generator=gen).to(dtype)
    assert_equal(emu.permute(x, inverse), cpu.permute(x, inverse))
    ys = torch.randn(T * k, H, generator=gen).to(dtype)
    w = torch.rand(T, k, generator=gen) if weighted else None
    close(emu.unpermute(ys, inverse, w), cpu.unpermute(ys, inverse, w), dtype)
    grad_y = torch.randn(T, H, generator=gen).to(dtype)
    for wants_grad_w in ((True, False) if weighted else (False,)):
        g_ys, g_w = emu.unpermute_backward(grad_y, ys, inverse, w, wants_grad_w)
        g_ys_ref, g_w_ref = cpu.unpermute_backward(grad_y, ys, inverse, w, wants_grad_w)
        close(g_ys, g_ys_ref, dtype)
        assert g_w.shape == g_w_ref.shape
        if wants_grad_w:
            close(g_w, g_w_ref, torch.float64 if dtype == torch.float64 else torch.float32,
                  scale=50)


@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1), (torch.bfloat16, 4),
                                           (torch.bfloat16, 8)])
def test_permute_unpermute_of_offset_views_equal_the_cpu_kernel(emu, dtype, offset):
    # Views whose storage starts `offset` elements in: rows of 64 elements are whole 16-byte
    # packs, but a start 4 or 8 bytes off must take the one-element path (the emulator fails
    # a misaligned 16-byte access, as a GPU does); 8 bfloat16 elements in is aligned again.
    T, k, E, H = 13, 2, 5, 64
    gen = torch.Generator().manual_seed(offset)
    _, _, inverse = cpu.dispatch(routed(T, k, E), E)

    def view(rows):
        return torch.randn(rows * H + offset, generator=gen).to(dtype)[offset:].view(rows, H)

    x, ys, grad_y = view(T), view(T * k), view(T)
    w = torch.rand(T, k, generator=gen)
    assert_equal(emu.permute(x, inverse), cpu.permute(x, inverse))
    close(emu.unpermute(ys, inverse, w), cpu.unpermute(ys, inverse, w), dtype)
    g_ys, g_w = emu.unpermute_backward(grad_y, ys, inverse, w, True)
    g_ys_ref, g_w_ref = cpu.unpermute_backward(grad_y, ys, inverse, w, True)
    close(g_ys, g_ys_ref, dtype)
    close(g_w, g_w_ref, torch.float32, scale=50)


# ---- grouped_mm ----------------------------------------------------------------------------

def offsets_of(counts):
    return torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int64)


# 16-bit types take the pipelined path (cp.async, ldmatrix) where K and M are multiples of 8,
# the register-staged one elsewhere (K = 33); K = 136 and 100 rows run the two-stage ring
# through several steps, in the forward pass and in grad_w's reduction; the last case takes
# the 128 x 128 tiles in all three products.
GROUPS = [
    ([5], 16, 8),  # E = 1
    ([0, 70, 3, 0, 1, 0, 20], 40, 72),  # empty experts, K and M off the tile sizes
    ([0, 0, 130], 33, 65),  # all rows on one expert, three row tiles
    ([16, 16], 0, 8),  # K = 0: zeros (plus bias)
    ([0, 100, 37], 136, 80),
    ([150, 130], 136, 136),  # >= 128 rows per expert, >= 128 columns: 128 x 128 tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GROUPS, ids=lambda c: f"E{len(c[0])}-K{c[1]}-M{c[2]}")
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_grouped_mm_matches_the_float64_reference(emu, case, dtype, layout):
    counts, K, M = case
    E, N = len(counts), sum(counts)
    gen = torch.Generator().manual_seed(N + K + M)
    x = torch.randn(N, K, generator=gen).to(dtype)
    if layout == "contiguous":
        w = torch.randn(E, K, M, generator=gen).to(dtype)
    else:  # unit stride along K, as w^T in the backward pass
        w = torch.randn(E, M, K, generator=gen).to(dtype).transpose(1, 2)
    bias = torch.randn(E, M, generator=gen).to(dtype)
    offsets = offsets_of(counts)
    scale = max(1.0, K / 8)
    for b in (None, bias):
        out = emu.grouped_mm(x, w, offsets, b)
        ref = reference.grouped_mm(x.double(), w.double(), offsets,
                                   None if b is None else b.double())
        assert_close(out, ref, dtype=dtype, scale=scale)

    grad_out = torch.randn(N, M, generator=gen).to(dtype)
    grad_x, grad_w, grad_b = emu.grouped_mm_backward(grad_out, x, w, offsets, [True] * 3)
    g64, x64, w64 = grad_out.double(), x.double(), w.double().requires_grad_(True)
    x64.requires_grad_(True)
    b64 = bias.double().requires_grad_(True)
    reference.grouped_mm(x64, w64, offsets, b64).backward(g64)
    rows = max(counts) if counts else 1
    assert_close(grad_x, x64.grad, dtype=dtype, scale=max(1.0, M / 8))
    assert_close(grad_w, w64.grad, dtype=dtype, scale=max(1.0, rows / 8))
    assert_close(grad_b, b64.grad, dtype=dtype, scale=max(1.0, rows / 8))


def grouped_mm_against_the_reference(emu, x, w, offsets, bias, grad_out, dtype, scale):
    out = emu.grouped_mm(x, w, offsets, bias)
    grad_x, grad_w, grad_b = emu.grouped_mm_backward(grad_out, x, w, offsets, [True] * 3)
    x64, w64, b64 = (t.double().requires_grad_(True) for t in (x, w, bias))
    ref = reference.grouped_mm(x64, w64, offsets, b64)
    ref.backward(grad_out.double())
    assert_close(out, ref, dtype=dtype, scale=scale)
    for got, want in ((grad_x, x64.grad), (grad_w, w64.grad), (grad_b, b64.grad)):
        assert_close(got, want, dtype=dtype, scale=scale)
    return out, grad_w


def test_grouped_mm_of_views_off_16_bytes_takes_the_staged_tile(emu):
    # x, w and grad_out start 2 bytes into their storage: whole 8-element packs, but not
    # 16-byte aligned, so every product must take the register-staged tile (the emulator
    # fails a misaligned cp.async).
    gen = torch.Generator().manual_seed(5)
    counts, K, M = [10, 0, 90, 30], 48, 72
    E, N = len(counts), sum(counts)

    def view(*shape):
        flat = torch.randn(torch.Size(shape).numel() + 1, generator=gen).to(torch.bfloat16)
        return flat[1:].view(*shape)

    x, w, grad_out = view(N, K), view(E, K, M), view(N, M)
    bias = torch.randn(E, M, generator=gen).to(torch.bfloat16)
    grouped_mm_against_the_reference(emu, x, w, offsets_of(counts), bias, grad_out,
                                     torch.bfloat16, scale=12)


def test_grouped_mm_with_257_experts_and_a_nan_row(emu):
    # Prime E past 256, empty first and last experts (their grad_w and grad_bias exactly 0),
    # and a NaN in one row of x: only that row of out, and only its expert's grad_w, turn NaN.
    gen = torch.Generator().manual_seed(257)
    counts = torch.randint(0, 4, (257,), generator=gen).tolist()
    counts[0] = counts[-1] = 0
    counts[1] = 3
    N = sum(counts)
    x = torch.randn(N, 16, generator=gen).to(torch.bfloat16)
    w = torch.randn(257, 16, 8, generator=gen).to(torch.bfloat16)
    bias = torch.randn(257, 8, generator=gen).to(torch.bfloat16)
    grad_out = torch.randn(N, 8, generator=gen).to(torch.bfloat16)
    offsets = offsets_of(counts)
    _, grad_w = grouped_mm_against_the_reference(emu, x, w, offsets, bias, grad_out,
                                                 torch.bfloat16, scale=2)
    assert grad_w[0].abs().max() == 0 and grad_w[-1].abs().max() == 0

    x[1, 5] = float("nan")  # row 1 belongs to expert 1 (rows 0 to 2)
    out = emu.grouped_mm(x, w, offsets, bias)
    assert out.isnan().any(dim=1).nonzero().flatten().tolist() == [1]
    _, grad_w, _ = emu.grouped_mm_backward(grad_out, x, w, offsets, [False, True, False])
    assert grad_w.isnan().flatten(1).any(dim=1).nonzero().flatten().tolist() == [1]


# (machine code, PTX it came from): an sm_75 device; and an sm_90 device running code the
# driver compiled from compute_75 PTX (a "7.5+PTX" build), which has no tensor cores either.
@pytest.mark.parametrize("arch, ptx", [("75", "75"), ("90", "75")])
def test_grouped_mm_below_sm80_takes_the_register_staged_tile(emu, monkeypatch, arch, ptx):
    """On a device without sm_80 code the launchers must not pick the pipelined tile (under
    the emulator it then traps, as its sm_75 build would)."""
    monkeypatch.setenv("SMOE_CUDA_EMULATOR_ARCH", arch)
    monkeypatch.setenv("SMOE_CUDA_EMULATOR_PTX", ptx)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(90, 48, generator=gen).to(torch.bfloat16)
    w = torch.randn(3, 48, 72, generator=gen).to(torch.bfloat16)
    offsets = offsets_of([10, 0, 80])
    out = emu.grouped_mm(x, w, offsets, None)
    assert_close(out, reference.grouped_mm(x.double(), w.double(), offsets, None),
                 dtype=torch.bfloat16, scale=6)
    grad_out = torch.randn(90, 72, generator=gen).to(torch.bfloat16)
    _, grad_w, _ = emu.grouped_mm_backward(grad_out, x, w, offsets, [False, True, False])
    w64 = w.double().requires_grad_(True)
    reference.grouped_mm(x.double(), w64, offsets, None).backward(grad_out.double())
    assert_close(grad_w, w64.grad, dtype=torch.bfloat16, scale=10)


def test_grouped_mm_is_the_same_under_every_schedule(emu):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(90, 48, generator=gen).to(torch.bfloat16)
    w = torch.randn(3, 48, 70, generator=gen).to(torch.bfloat16)
    offsets = offsets_of([10, 0, 80])
    want = emu.grouped_mm(x, w, offsets, None)
    for seed in (2, 3):
        assert_equal(with_seed(seed, lambda: emu.grouped_mm(x, w, offsets, None)), want)


# ---- swiglu --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (8, 96)], ids=str)
def test_swiglu_equals_the_cpu_kernel(emu, dtype, shape):
    rows, ffn = shape
    gen = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * ffn, generator=gen).to(dtype)
    close(emu.swiglu(gate_up), cpu.swiglu(gate_up), dtype)
    grad = torch.randn(rows, ffn, generator=gen).to(dtype)
    close(emu.swiglu_backward(grad, gate_up), cpu.swiglu_backward(grad, gate_up), dtype)


# ---- the layer: every kernel in sequence ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_moe_ffn_forward_from_the_cuda_kernels_matches_the_reference(emu, dtype):
    """route -> dispatch -> permute -> grouped_mm -> swiglu -> grouped_mm -> unpermute, each a
    CUDA kernel under the emulator, against the reference layer (one loop per expert)."""
    T, H, I, E, k = 70, 24, 16, 6, 2
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=gen).to(dtype)
    router = torch.randn(H, E, generator=gen).to(dtype)
    w_in = (torch.randn(E, H, 2 * I, generator=gen) / H ** 0.5).to(dtype)
    w_out = (torch.randn(E, I, H, generator=gen) / I ** 0.5).to(dtype)
    logits = x @ router
    weights, ids, counts = emu.route(logits, k, "softmax", True, None, 1, 1, 1.0)
    order, offsets, inverse = emu.dispatch(ids, E)
    assert_equal(offsets[1:] - offsets[:-1], counts.long())
    hidden = emu.swiglu(emu.grouped_mm(emu.permute(x, inverse), w_in, offsets, None))
    y = emu.unpermute(emu.grouped_mm(hidden, w_out, offsets, None), inverse, weights)
    y_ref, _ = reference.moe_ffn(x.double(), router.double(), w_in.double(), w_out.double(), k)
    assert_close(y, y_ref, dtype=dtype, scale=4)


# ---- device-side checks --------------------------------------------------------------------

def test_dispatch_id_out_of_range_fails_on_the_device_with_its_message(emu):
    ids = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"smoe_ops.dispatch: ids\[1, 1\] = 9 is out of range"):
        emu.dispatch(ids, 4)
    # Negative, and an int64 id that int32 would wrap to 1: compared before any narrowing.
    with pytest.raises(RuntimeError, match=r"ids\[0, 1\] = -1 is out of range"):
        emu.dispatch(torch.tensor([[0, -1]], dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match=r"ids\[0, 1\] = 4294967297 is out of range"):
        emu.dispatch(torch.tensor([[0, 2**32 + 1]]), 4)


def test_row_writers_reject_an_inverse_that_is_not_a_permutation(emu):
    x = torch.randn(2, 8)
    repeated = torch.tensor([[0, 1], [1, 3]], dtype=torch.int32)
    # Either holder of the repeated row may be the thread that finds it first: on a GPU as
    # under the emulator's schedules, the message names the pair in either order.
    pair = r"inverse\[(1, 0|0, 1)\] = 1 repeats inverse\[(0, 1|1, 0)\]"
    with pytest.raises(RuntimeError, match=r"smoe_ops.permute: " + pair):
        emu.permute(x, repeated)
    outside = torch.tensor([[0, 1], [2, 4]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"smoe_ops.unpermute: inverse\[1, 1\] = 4 is out"):
        emu.unpermute(torch.randn(4, 8), outside, None)
    # Rows of width 0: nothing moves, but the range is still checked, as on the CPU.
    with pytest.raises(RuntimeError, match=r"smoe_ops.unpermute: inverse\[1, 1\] = 4 is out"):
        emu.unpermute(torch.empty(4, 0), outside, None)


def test_grouped_mm_bad_offsets_fail_on_the_device_with_their_message(emu):
    x, w = torch.randn(6, 4), torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match=r"offsets must be non-decreasing"):
        emu.grouped_mm(x, w, torch.tensor([0, 4, 2]), None)
    with pytest.raises(RuntimeError, match=r"offsets\[2\] must equal x.shape\[0\] \(6\)"):
        emu.grouped_mm(x, w, torch.tensor([0, 2, 5]), None)
    # More column tiles than a grid's y dimension holds: refused on the host, by name (a
    # stride-0 w keeps it cheap).
    wide = torch.zeros(1, 4, 1).expand(1, 4, 65535 * 64 + 1)
    with pytest.raises(ValueError, match=r"w.shape\[2\] must be at most 4194240 on CUDA"):
        emu.grouped_mm(torch.randn(2, 4), wide, torch.tensor([0, 2]), None)
    tall = torch.zeros(1, 1, 3).expand(1, 65535 * 64 + 1, 3)
    with pytest.raises(ValueError, match=r"w.shape\[1\] must be at most 4194240 on CUDA"):
        emu.grouped_mm_backward(torch.randn(2, 3), torch.randn(2, 65535 * 64 + 1), tall,
                                torch.tensor([0, 2]), [True, False, False])
    # An empty product (no rows, no columns, no experts) computes nothing but still checks
    # offsets, as the CPU kernel does; so does the backward with no experts.
    empty_cases = [
        (torch.randn(0, 4), torch.randn(2, 4, 3), [0, 3, 0], r"offsets must be non-decreasing"),
        (x, torch.randn(2, 4, 0), [0, 2, 5], r"offsets\[2\] must equal x.shape\[0\] \(6\)"),
        (torch.randn(0, 4), torch.randn(0, 4, 3), [5], r"offsets\[0\] must be 0, got 5"),
    ]
    for rows, weights, offsets, message in empty_cases:
        offsets = torch.tensor(offsets)
        with pytest.raises(ValueError, match=message):
            cpu.grouped_mm(rows, weights, offsets, None)
        with pytest.raises(RuntimeError, match=message):
            emu.grouped_mm(rows, weights, offsets, None)
        grad_out = torch.randn(rows.shape[0], weights.shape[2])
        with pytest.raises(RuntimeError, match=message):
            emu.grouped_mm_backward(grad_out, rows, weights, offsets, [True, True, True])


def test_route_backward_bad_id_fails_on_the_device(emu):
    logits = torch.randn(3, 5)
    ids = torch.tensor([[0], [7], [1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"ids\[1, 0\] = 7 is out of range"):
        emu.route_backward(torch.ones(3, 1), logits, ids, "softmax", True, 1.0)


def test_host_checks_name_the_argument(emu):
    with pytest.raises(ValueError, match="smoe_ops.route: .*k"):
        emu.route(torch.randn(4, 3), 5, "softmax", True, None, 1, 1, 1.0)


def _inverse():
    return torch.arange(8, dtype=torch.int32).reshape(4, 2)


def _grouped(x=None, w=None, offsets=None, bias=None):
    x = torch.randn(6, 4) if x is None else x
    w = torch.randn(3, 4, 5) if w is None else w
    return x, w, offsets_of([2, 0, 4]) if offsets is None else offsets, bias


# Shape and dtype errors of the glue, one case per validator of csrc/checks.h that the CPU and
# CUDA entry points share: each must raise what the CPU kernel raises, word for word.
SHARED_HOST_CHECKS = {
    "dispatch-rank": ("dispatch", lambda: (torch.zeros(4, dtype=torch.int32), 2)),
    "dispatch-dtype": ("dispatch", lambda: (torch.zeros(4, 2), 2)),
    "dispatch-experts": ("dispatch", lambda: (torch.zeros(4, 2, dtype=torch.int32), 0)),
    # two bad arguments: the rows are checked before inverse on both backends
    "permute-order": ("permute", lambda: (torch.ones(4, 5, dtype=torch.int32),
                                          _inverse().long())),
    "permute-inverse": ("permute", lambda: (torch.randn(4, 5), _inverse()[0])),
    "permute-tokens": ("permute", lambda: (torch.randn(3, 5), _inverse())),
    "unpermute-rows": ("unpermute", lambda: (torch.randn(7, 5), _inverse(), None)),
    "unpermute-weights": ("unpermute", lambda: (torch.randn(8, 5), _inverse(),
                                                torch.rand(4, 3))),
    "unpermute-weights-dtype": ("unpermute", lambda: (torch.randn(8, 5), _inverse(),
                                                      torch.ones(4, 2, dtype=torch.long))),
    "unpermute_backward-dtype": ("unpermute_backward", lambda: (
        torch.randn(4, 5).double(), torch.randn(8, 5), _inverse(), None, False)),
    "unpermute_backward-hidden": ("unpermute_backward", lambda: (
        torch.randn(4, 6), torch.randn(8, 5), _inverse(), None, False)),
    "grouped_mm-x": ("grouped_mm", lambda: _grouped(x=torch.randn(6))),
    "grouped_mm-w-dtype": ("grouped_mm", lambda: _grouped(w=torch.randn(3, 4, 5).double())),
    "grouped_mm-w-shape": ("grouped_mm", lambda: _grouped(w=torch.randn(3, 3, 5))),
    "grouped_mm-offsets-dtype": ("grouped_mm", lambda: _grouped(
        offsets=offsets_of([2, 0, 4]).int())),
    "grouped_mm-offsets-size": ("grouped_mm", lambda: _grouped(offsets=offsets_of([2, 4]))),
    "grouped_mm-bias": ("grouped_mm", lambda: _grouped(bias=torch.randn(3, 4))),
    "grouped_mm-bias-dtype": ("grouped_mm", lambda: _grouped(bias=torch.randn(3, 5).half())),
    "grouped_mm_backward-grad": ("grouped_mm_backward", lambda: (
        torch.randn(6, 4), *_grouped()[:3], [True] * 3)),
    "grouped_mm_backward-grad-dtype": ("grouped_mm_backward", lambda: (
        torch.randn(6, 5).double(), *_grouped()[:3], [True] * 3)),
    "route_backward-ids-dtype": ("route_backward", lambda: (
        torch.randn(4, 2), torch.randn(4, 6), torch.zeros(4, 2, dtype=torch.long), "softmax",
        True, 1.0)),
    "route_backward-k": ("route_backward", lambda: (
        torch.randn(4, 7), torch.randn(4, 6), torch.zeros(4, 7, dtype=torch.int32), "softmax",
        True, 1.0)),
    "route_backward-grad-shape": ("route_backward", lambda: (
        torch.randn(4, 3), torch.randn(4, 6), torch.zeros(4, 2, dtype=torch.int32), "softmax",
        True, 1.0)),
    "router_losses_backward-grad-size": ("router_losses_backward", lambda: (
        torch.randn(3), torch.randn(4, 6), torch.zeros(6, dtype=torch.int32), 2,
        torch.rand(6))),
    "router_losses_backward-mean-dtype": ("router_losses_backward", lambda: (
        torch.randn(4), torch.randn(4, 6), torch.zeros(6, dtype=torch.int32), 2,
        torch.rand(6).double())),
    "swiglu-rank": ("swiglu", lambda: (torch.randn(4, 6, 2),)),
    "swiglu-odd": ("swiglu", lambda: (torch.randn(4, 5),)),
    "swiglu-dtype": ("swiglu", lambda: (torch.ones(4, 6, dtype=torch.int32),)),
    "swiglu_backward-grad": ("swiglu_backward", lambda: (torch.randn(4, 2),
                                                         torch.randn(4, 6))),
    "swiglu_backward-grad-dtype": ("swiglu_backward", lambda: (torch.randn(4, 3).double(),
                                                               torch.randn(4, 6))),
}


@pytest.mark.parametrize("case", SHARED_HOST_CHECKS)
def test_host_checks_raise_what_the_cpu_kernel_raises(emu, case):
    op, make_args = SHARED_HOST_CHECKS[case]
    with pytest.raises(Exception) as on_cpu:
        getattr(cpu, op)(*make_args())
    with pytest.raises(Exception) as on_emu:
        getattr(emu, op)(*make_args())
    assert on_emu.type is on_cpu.type
    assert on_emu.type in (ValueError, TypeError)
    assert str(on_emu.value).splitlines()[0] == str(on_cpu.value).splitlines()[0]


# ---- the emulator itself -------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("deadlock", "deadlock"),
    ("mask_without_self", "leaves out the calling lane 0"),
    ("shuffle_outside_mask", "outside the mask"),
    ("trap", r"selftest: thread 5 trapped \[device check in trap_kernel"),
    ("empty_grid", "invalid launch configuration: a grid dimension is 0"),
])
def test_the_emulator_catches_faulty_kernels(emu, name, message):
    with pytest.raises(RuntimeError, match=message):
        emu.emulator_selftest(name)


def test_the_emulator_schedule_exposes_a_missing_barrier(emu):
    for seed in range(5):
        out = with_seed(seed, lambda: emu.emulator_selftest("publish_with_barrier"))
        assert bool((out == 7).all())
    seen = [with_seed(s, lambda: emu.emulator_selftest("publish_without_barrier"))
            for s in range(5)]
    assert any(bool((out != 7).any()) for out in seen)


# ---- memory: AddressSanitizer over the whole file ------------------------------------------

def test_a_fiber_stack_overflow_faults_on_the_guard_page(emu):
    from tests import cuda_emulator

    if cuda_emulator.sanitizer() is not None:
        pytest.skip("AddressSanitizer reports the overflow itself")
    # Just past the 256 KiB fiber stack: the process must die of SIGSEGV at the guard page
    # rather than run on over the mapping below (without the guard page this test fails).
    done = subprocess.run(
        [sys.executable, "-c", "from tests import cuda_emulator; "
         "cuda_emulator.load().emulator_selftest('stack_overflow')"],
        capture_output=True, text=True, timeout=600, cwd=cuda_emulator.ROOT)
    assert done.returncode == -signal.SIGSEGV, done.stderr[-2000:]


def test_the_kernels_pass_address_sanitizer():
    """Every test above again, with the emulator built under AddressSanitizer (the stand-in
    for compute-sanitizer's memcheck): no kernel reads or writes outside its tensors."""
    from tests import cuda_emulator

    if cuda_emulator.sanitizer() is not None:
        pytest.skip("already running under the sanitizer")
    # The runtime first; libstdc++ with it, so that its C++ exception interceptor finds the
    # real __cxa_throw (python itself does not link libstdc++).
    preload = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True,
                              text=True).stdout.strip() for lib in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(lib) for lib in preload):
        pytest.skip("no AddressSanitizer runtime (libasan) for gcc here")
    env = dict(os.environ, SMOE_CUDA_EMULATOR_SANITIZE="address", LD_PRELOAD=" ".join(preload),
               ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0:"
                            "alloc_dealloc_mismatch=0")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", os.path.abspath(__file__), "-k",
         "not address_sanitizer"], capture_output=True, text=True, env=env, timeout=1500,
        cwd=cuda_emulator.ROOT)
    output = done.stdout[-4000:] + done.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in output, output
    assert done.returncode == 0, output
