"""grouped_mm and its backward against the reference, with opcheck, gradcheck and bad inputs.

Tolerances: a GEMM output sums n rounded products, so its rounding error grows like sqrt(n)
relative to the result; every comparison widens the dtype's tolerance by sqrt(n), n being the
length of the sum behind that output (K for out, M for grad_x, the expert's rows for grad_w
and grad_bias). Inputs are scaled so that every output is O(1): x, grad_out ~ N(0, 1),
w ~ N(0, 1/K).
"""

import math

import pytest
import torch

import smoe_ops
from smoe_ops import reference
from tests.helpers import DTYPES, assert_close

op = torch.ops.smoe_ops


def offsets_of(counts) -> torch.Tensor:
    """Exclusive prefix sum [E + 1] int64 of rows per expert."""
    counts = torch.as_tensor(counts, dtype=torch.int64)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def random_counts(num_rows: int, num_experts: int, routing: str, gen) -> list:
    """Rows per expert: 'random' leaves about a third of the experts empty; 'one' puts every
    row on the last expert, the extreme of skewed routing."""
    if routing == "one":
        return [0] * (num_experts - 1) + [num_rows]
    live = torch.rand(num_experts, generator=gen) > 1 / 3
    live[torch.randint(num_experts, (1,), generator=gen)] = True
    picks = torch.multinomial(live.double(), num_rows, replacement=True, generator=gen)
    return torch.bincount(picks, minlength=num_experts).tolist()


def make_inputs(num_rows, in_features, out_features, counts, dtype, bias=True, seed=0):
    """Inputs in `dtype`, plus their float64 copies for the reference (same rounded values)."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = len(counts)
    x = torch.randn(num_rows, in_features, generator=gen, dtype=torch.float64)
    w = torch.randn(num_experts, in_features, out_features, generator=gen, dtype=torch.float64)
    w /= math.sqrt(max(in_features, 1))
    b = torch.randn(num_experts, out_features, generator=gen, dtype=torch.float64)
    grad = torch.randn(num_rows, out_features, generator=gen, dtype=torch.float64)
    ours = [t.to(dtype) for t in (x, w, b, grad)]
    ref = [t.double() for t in ours]
    if not bias:
        ours[2] = ref[2] = None
    return ours, ref, offsets_of(counts)


def check_against_reference(ours, ref, offsets, dtype, device="cpu"):
    """ours run on `device` (offsets too); the float64 reference on the CPU."""
    x, w, b, grad = (t.to(device) if t is not None else None for t in ours)
    x_ref, w_ref, b_ref, grad_ref = ref
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ref_leaves = [t.requires_grad_() for t in (x_ref, w_ref, b_ref) if t is not None]
    out = smoe_ops.grouped_mm(x, w, offsets.to(device), b)
    expected = reference.grouped_mm(x_ref, w_ref, offsets, b_ref)
    assert out.dtype == dtype and out.shape == expected.shape
    num_rows, in_features = x.shape
    out_features = w.shape[2]
    assert_close(out, expected, dtype, scale=math.sqrt(max(in_features, 1)), msg="out")
    if num_rows == 0:
        return
    out.backward(grad)
    expected.backward(grad_ref)
    counts = offsets.diff()
    max_rows = max(int(counts.max()), 1)
    assert_close(x.grad, x_ref.grad, dtype, scale=math.sqrt(max(out_features, 1)), msg="x")
    assert_close(w.grad, w_ref.grad, dtype, scale=math.sqrt(max_rows), msg="w")
    # Experts without rows get exact zeros, not whatever the allocator returned.
    assert not w.grad[counts == 0].any()
    if b is not None:
        assert_close(b.grad, b_ref.grad, dtype, scale=math.sqrt(max_rows), msg="bias")
        assert not b.grad[counts == 0].any()
    assert all(t.grad.dtype == dtype for t in leaves)
    assert len(leaves) == len(ref_leaves)


EXPERT_COUNTS = [
    1,  # a single expert: the op is one plain GEMM
    7,  # prime and odd: no power-of-two assumptions
    8,  # the common Mixtral-style count
    60,  # Qwen-MoE's count: not a power of two, many experts per thread
    64,  # power of two with more experts than rows per expert
    128,  # many small experts: each GEMM is only a few rows
    257,  # prime beyond 256 (DeepSeek-V3's 256 routed + 1)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_experts", EXPERT_COUNTS)
@pytest.mark.parametrize("routing", ["random", "one"])
def test_matches_reference(num_experts, routing, dtype, device):
    gen = torch.Generator().manual_seed(num_experts)
    num_rows = 3 * num_experts + 5
    counts = random_counts(num_rows, num_experts, routing, gen)
    # Bias on one routing pattern only: both code paths, half the cases.
    ours, ref, offsets = make_inputs(num_rows, 24, 40, counts, dtype, bias=routing == "random")
    check_against_reference(ours, ref, offsets, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "counts",
    [
        [700, 3, 0, 321],  # skewed: big experts split into row tiles and grad_w blocks
        [0, 1024, 0],  # every row on one expert: all tiles come from a single GEMM
    ],
)
def test_larger_shapes_split_into_tiles(counts, dtype, device):
    # 1024 rows on 2+ threads: 64-row tiles or more, and grad_w blocks narrower than M
    # (strided output views for MKL and oneDNN). On CUDA: many 64 x 64 tiles, edge tiles in
    # both dimensions (700 and 321 rows), and long grad_w reductions.
    ours, ref, offsets = make_inputs(sum(counts), 160, 320, counts, dtype)
    check_against_reference(ours, ref, offsets, dtype, device)


def test_single_thread():
    # One thread runs every task on the caller, without at::parallel_for.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours, ref, offsets = make_inputs(300, 64, 80, [0, 290, 10], torch.float32)
        check_against_reference(ours, ref, offsets, torch.float32)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows(dtype):
    # N = 0: out is [0, M]; grad_w and grad_bias are all zeros, not uninitialized memory.
    ours, _, offsets = make_inputs(0, 5, 6, [0, 0, 0], dtype)
    x, w, b, grad = ours
    out = smoe_ops.grouped_mm(x, w, offsets, b)
    assert out.shape == (0, 6) and out.dtype == dtype
    grad_x, grad_w, grad_b = op.grouped_mm_backward(grad, x, w, offsets, [True, True, True])
    assert grad_x.shape == (0, 5)
    assert grad_w.shape == (3, 5, 6) and not grad_w.any()
    assert grad_b.shape == (3, 6) and not grad_b.any()


@pytest.mark.parametrize(
    "in_features, out_features",
    [
        (0, 4),  # K = 0: every product is an empty sum, out is the bias alone
        (5, 0),  # M = 0: out is [N, 0] and grad_x an empty sum, all zeros
    ],
)
def test_zero_sized_features(in_features, out_features):
    ours, ref, offsets = make_inputs(6, in_features, out_features, [2, 0, 4], torch.float64)
    check_against_reference(ours, ref, offsets, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_accumulates_in_float32(dtype):
    # 4096 ones summed in bfloat16 stall at 256 (2048 in float16); float32 gets 4096 exactly.
    # Each output below sums 4096 ones: over K (out), M (grad_x) or the rows (grad_w, bias).
    n = 4096
    out = smoe_ops.grouped_mm(torch.ones(3, n, dtype=dtype), torch.ones(2, n, 5, dtype=dtype),
                              offsets_of([1, 2]))
    assert torch.equal(out, torch.full((3, 5), n, dtype=dtype))
    x, w, grad = (torch.ones(s, dtype=dtype) for s in [(n, 3), (1, 3, n), (n, n)])
    grads = op.grouped_mm_backward(grad, x, w, offsets_of([n]), [True, True, True])
    for got in grads:
        assert torch.equal(got, torch.full_like(got, n))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_rounds_once(dtype):
    # x @ w + bias rounded once agrees with the exactly rounded result almost everywhere;
    # rounding the product before adding the bias (twice) disagrees on about a quarter.
    gen = torch.Generator().manual_seed(0)
    x, w = (torch.randn(s, generator=gen).to(dtype) for s in [(256, 64), (2, 64, 128)])
    bias = (10 * torch.randn(2, 128, generator=gen)).to(dtype)
    offsets = offsets_of([100, 156])
    out = smoe_ops.grouped_mm(x, w, offsets, bias)
    exact = reference.grouped_mm(x.double(), w.double(), offsets, bias.double())
    product = reference.grouped_mm(x.double(), w.double(), offsets).to(dtype).double()
    twice = (product + bias.double().repeat_interleave(offsets.diff(), dim=0)).to(dtype)
    assert (twice != exact.to(dtype)).double().mean() > 0.1  # the test can tell them apart
    assert (out != exact.to(dtype)).double().mean() < 0.01


def test_non_contiguous_inputs(device):
    counts = [5, 0, 9, 3]
    ours, ref, offsets = make_inputs(17, 12, 10, counts, torch.float64)
    x, w, b, grad = ours
    # x column-major; w as the transposed view of [E, M, K] weights (nn.Linear's layout),
    # read in place; bias and grad_out strided.
    x_nc = x.t().contiguous().t()
    w_nc = w.transpose(1, 2).contiguous().transpose(1, 2)
    b_nc = torch.stack([b, b], dim=2)[..., 0]
    grad_nc = torch.stack([grad, grad], dim=2)[..., 1]
    assert not any(t.is_contiguous() for t in (x_nc, w_nc, b_nc, grad_nc))
    check_against_reference([x_nc, w_nc, b_nc, grad_nc], ref, offsets, torch.float64, device)


def test_weights_with_general_strides(device):
    # w[:, ::2, :] is neither row- nor column-major per expert: copied once, then multiplied
    # (on CUDA: read through its strides).
    ours, ref, offsets = make_inputs(11, 8, 6, [4, 7], torch.float64)
    ours = [t.to(device) for t in ours]
    w_wide = torch.repeat_interleave(ours[1], 2, dim=1)
    out = smoe_ops.grouped_mm(ours[0], w_wide[:, ::2, :], offsets.to(device), ours[2])
    assert_close(out, reference.grouped_mm(ref[0], ref[1], offsets, ref[2]))


def test_expanded_grad_out():
    # out.sum() hands the backward an expanded (stride-0) grad_out.
    ours, ref, offsets = make_inputs(9, 4, 3, [3, 0, 6], torch.float64, bias=False)
    x, w = ours[0].requires_grad_(), ours[1].requires_grad_()
    smoe_ops.grouped_mm(x, w, offsets).sum().backward()
    x_ref, w_ref = ref[0].requires_grad_(), ref[1].requires_grad_()
    reference.grouped_mm(x_ref, w_ref, offsets).sum().backward()
    assert_close(x.grad, x_ref.grad)
    assert_close(w.grad, w_ref.grad)


MASKS = [
    [True, True, True],
    [True, False, False],
    [False, True, True],
    [False, False, True],
]


@pytest.mark.parametrize("mask", MASKS)
def test_backward_output_mask(mask):
    ours, ref, offsets = make_inputs(13, 6, 5, [4, 0, 9], torch.float64)
    x, w, _, grad = ours
    grads = op.grouped_mm_backward(grad, x, w, offsets, mask)
    full = op.grouped_mm_backward(grad, x, w, offsets, [True, True, True])
    for got, want, needed in zip(grads, full, mask):
        if needed:
            assert torch.equal(got, want)
        else:
            assert got.shape == (0,)


OPCHECK_CASES = [
    (0, [0, 0]),  # no rows
    (1, [1]),  # one row, one expert
    (12, [5, 0, 7]),  # an empty expert between two others
    (30, [0, 30, 0, 0]),  # everything on one expert
]


@pytest.mark.parametrize("num_rows, counts", OPCHECK_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(num_rows, counts, bias):
    ours, _, offsets = make_inputs(num_rows, 6, 5, counts, torch.float32, bias=bias)
    x, w, b, _ = ours
    args = (x.requires_grad_(), w.requires_grad_(), offsets, b)
    torch.library.opcheck(op.grouped_mm.default, args)


@pytest.mark.parametrize("num_rows, counts", OPCHECK_CASES)
@pytest.mark.parametrize("mask", MASKS)
def test_opcheck_backward(num_rows, counts, mask):
    ours, _, offsets = make_inputs(num_rows, 6, 5, counts, torch.float32)
    x, w, _, grad = ours
    torch.library.opcheck(op.grouped_mm_backward.default, (grad, x, w, offsets, mask))


def test_gradcheck():
    ours, _, offsets = make_inputs(9, 4, 5, [3, 0, 6], torch.float64)
    x, w, b, _ = (t.requires_grad_() for t in ours)
    assert torch.autograd.gradcheck(smoe_ops.grouped_mm, (x, w, offsets, b))
    assert torch.autograd.gradcheck(lambda x, w: smoe_ops.grouped_mm(x, w, offsets), (x, w))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    ours, ref, offsets = make_inputs(20, 8, 4, [6, 0, 14], torch.float32)
    compiled = torch.compile(smoe_ops.grouped_mm, fullgraph=True)
    out = compiled(ours[0], ours[1], offsets, ours[2])
    assert_close(out, reference.grouped_mm(ref[0], ref[1], offsets, ref[2]), torch.float32)


def bad_case(**changes):
    args = dict(
        x=torch.randn(6, 4),
        w=torch.randn(3, 4, 5),
        offsets=offsets_of([2, 0, 4]),
        bias=None,
    )
    args.update(changes)
    return args


BAD_INPUTS = [
    (bad_case(x=torch.randn(6)), ValueError, r"x must be 2-D .* got shape \[6\]"),
    (bad_case(w=torch.randn(4, 5)), ValueError, r"w must be 3-D .* got shape \[4, 5\]"),
    (
        bad_case(w=torch.randn(3, 4, 5, dtype=torch.float64)),
        TypeError,
        r"w must have the dtype of x \(Float\), got Double",
    ),
    (
        bad_case(x=torch.ones(6, 4, dtype=torch.int32), w=torch.ones(3, 4, 5, dtype=torch.int32)),
        TypeError,
        r"x must be float32, float64, bfloat16 or float16, got Int",
    ),
    (
        bad_case(w=torch.randn(3, 7, 5)),
        ValueError,
        r"w.shape\[1\] must equal x.shape\[1\] \(4\), got shape \[3, 7, 5\]",
    ),
    (
        bad_case(offsets=offsets_of([2, 4])),
        ValueError,
        r"offsets.shape\[0\] must equal w.shape\[0\] \+ 1 \(4\), got shape \[3\]",
    ),
    (
        bad_case(offsets=offsets_of([2, 0, 4]).int()),
        TypeError,
        r"offsets must be Long, got Int",
    ),
    (
        bad_case(offsets=offsets_of([2, 0, 4])[None]),
        ValueError,
        r"offsets must be 1-D .* got shape \[1, 4\]",
    ),
    (
        bad_case(offsets=torch.tensor([1, 2, 2, 6])),
        ValueError,
        r"offsets\[0\] must be 0, got 1",
    ),
    (
        bad_case(offsets=torch.tensor([0, 4, 3, 6])),
        ValueError,
        r"offsets must be non-decreasing, got offsets\[2\] = 3 < offsets\[1\] = 4",
    ),
    (
        bad_case(offsets=torch.tensor([0, 2, 2, 5])),
        ValueError,
        r"offsets\[3\] must equal x.shape\[0\] \(6\), got 5",
    ),
    (
        bad_case(bias=torch.randn(3, 4)),
        ValueError,
        r"bias.shape\[1\] must equal w.shape\[2\] \(5\), got shape \[3, 4\]",
    ),
    (
        bad_case(bias=torch.randn(2, 5)),
        ValueError,
        r"bias.shape\[0\] must equal w.shape\[0\] \(3\), got shape \[2, 5\]",
    ),
    (
        bad_case(bias=torch.randn(3, 5, dtype=torch.float16)),
        TypeError,
        r"bias must have the dtype of x \(Float\), got Half",
    ),
]


@pytest.mark.parametrize("args, error, match", BAD_INPUTS)
def test_bad_input_names_the_argument(args, error, match):
    with pytest.raises(error, match="smoe_ops.grouped_mm: " + match):
        smoe_ops.grouped_mm(**args)


@pytest.mark.parametrize(
    "grad, error, match",
    [
        (torch.randn(6, 4), ValueError, r"grad_out must have shape \[6, 5\] .* got \[6, 4\]"),
        (torch.randn(6, 5).double(), TypeError, r"grad_out must have the dtype of x"),
    ],
)
def test_bad_grad_out(grad, error, match):
    args = bad_case()
    with pytest.raises(error, match="smoe_ops.grouped_mm_backward: " + match):
        op.grouped_mm_backward(grad, args["x"], args["w"], args["offsets"], [True] * 3)


def test_backward_checks_offsets_too():
    args = bad_case(offsets=torch.tensor([0, 4, 3, 6]))
    grad = torch.randn(6, 5)
    with pytest.raises(ValueError, match=r"grouped_mm_backward: offsets must be non-decreasing"):
        op.grouped_mm_backward(grad, args["x"], args["w"], args["offsets"], [True] * 3)
