"""dispatch / permute / unpermute against the reference and their invariants, with property
tests, opcheck on all four ops, gradcheck and torch.compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import smoe_ops
from smoe_ops import reference
from tests.helpers import DTYPES, assert_close

ops = torch.ops.smoe_ops

# (num_tokens, topk, num_experts)
ROUTINGS = [
    (0, 2, 4),  # no tokens: empty order and inverse [0, k], offsets all zero
    (1, 1, 1),  # a single expert: the sort is the identity
    (33, 2, 7),  # odd sizes, E not a power of two
    (33, 8, 8),  # k = E: every token on every expert
    (64, 1, 60),  # k = 1, more experts than the rows they get: empty experts
    (257, 4, 257),  # prime E above 256
    (4096, 8, 64),  # N = 32768: several counting-sort chunks when there are threads
]


def routed_ids(num_tokens, topk, num_experts, distinct=True, dtype=torch.int32, seed=0):
    """ids as route() makes them (distinct per row) or with repeats within a row."""
    gen = torch.Generator().manual_seed(seed)
    if distinct:
        scores = torch.rand(num_tokens, num_experts, generator=gen)
        ids = scores.topk(topk, dim=1).indices
    else:
        ids = torch.randint(0, num_experts, (num_tokens, topk), generator=gen)
    return ids.to(dtype)


def assert_same_dispatch(actual, expected):
    for name in ("order", "offsets", "inverse"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert torch.equal(a.cpu(), e.cpu()), name


def assert_dispatch_invariants(ids, num_experts, d):
    """The specification from first principles, without the reference."""
    num_tokens, topk = ids.shape
    flat = ids.flatten().long()
    n = flat.numel()
    assert d.order.dtype == torch.int32 and d.order.shape == (n,)
    assert d.offsets.dtype == torch.int64 and d.offsets.shape == (num_experts + 1,)
    assert d.inverse.dtype == torch.int32 and d.inverse.shape == (num_tokens, topk)
    order = d.order.long()
    assert torch.equal(order.sort().values, torch.arange(n))  # a permutation of the slots
    experts = flat[order]
    # Grouped by expert and stable: (expert, slot) strictly increases along the sorted rows.
    key = experts * max(n, 1) + order
    assert bool((key[1:] > key[:-1]).all())
    counts = torch.bincount(flat, minlength=num_experts)
    assert torch.equal(d.offsets, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    for e in range(num_experts):
        assert bool((experts[d.offsets[e] : d.offsets[e + 1]] == e).all())
    assert torch.equal(order[d.inverse.flatten().long()], torch.arange(n))


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("distinct", [True, False])
def test_dispatch_matches_reference(routing, distinct, device):
    num_tokens, topk, num_experts = routing
    ids = routed_ids(num_tokens, topk, num_experts, distinct)
    d = smoe_ops.dispatch(ids.to(device), num_experts)
    assert isinstance(d, smoe_ops.Dispatch)
    assert d.offsets.device == ids.to(device).device  # offsets stay where the ids are
    # A stable sort has one answer: the CUDA kernel's equals the CPU kernel's exactly.
    assert_same_dispatch(d, smoe_ops.dispatch(ids, num_experts))
    d = type(d)(*(t.cpu() for t in d))
    assert_same_dispatch(d, reference.dispatch(ids, num_experts))
    assert_dispatch_invariants(ids, num_experts, d)


def test_dispatch_int64_and_non_contiguous_ids(device):
    ids = routed_ids(40, 3, 9, distinct=False, dtype=torch.int64)
    expected = reference.dispatch(ids, 9)
    ids = ids.to(device)
    assert_same_dispatch(smoe_ops.dispatch(ids, 9), expected)
    # Transposed storage: the kernel must read ids in (t, j) order, not memory order.
    ids_t = ids.t().contiguous().t()
    assert not ids_t.is_contiguous()
    assert_same_dispatch(smoe_ops.dispatch(ids_t.int(), 9), expected)


def test_dispatch_skewed_and_empty_experts(device):
    # Every token on expert 5 of 8 (k = 1); experts 0-4 and 6-7 get nothing.
    ids = torch.full((100, 1), 5, dtype=torch.int32, device=device)
    d = smoe_ops.dispatch(ids, 8)
    assert torch.equal(d.order.cpu(), torch.arange(100, dtype=torch.int32))
    assert d.offsets.tolist() == [0, 0, 0, 0, 0, 0, 100, 100, 100]
    # Repeated ids in a row: both slots of a token land on the same expert, in slot order.
    ids = torch.tensor([[3, 3], [0, 3]], dtype=torch.int32, device=device)
    d = smoe_ops.dispatch(ids, 4)
    assert d.order.tolist() == [2, 0, 1, 3]
    assert d.offsets.tolist() == [0, 1, 1, 1, 4]
    assert d.inverse.tolist() == [[1, 2], [0, 3]]


def test_dispatch_does_not_depend_on_thread_count():
    # N = 65536 slots: up to 4 counting-sort chunks, whose boundaries cut through experts.
    ids = routed_ids(8192, 8, 60, distinct=False, seed=3)
    expected = reference.dispatch(ids, 60)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3, 4):
            torch.set_num_threads(n)
            assert_same_dispatch(smoe_ops.dispatch(ids, 60), expected)
    finally:
        torch.set_num_threads(threads)


@st.composite
def routings(draw):
    num_experts = draw(st.integers(1, 12))
    topk = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(0, 40))
    if draw(st.booleans()):  # distinct ids per row, as route() gives; includes k = E rows
        rows = [draw(st.permutations(range(num_experts)))[:topk] for _ in range(num_tokens)]
    else:  # anything in range: repeats, all on one expert
        expert = st.integers(0, num_experts - 1)
        rows = draw(st.lists(st.lists(expert, min_size=topk, max_size=topk),
                             min_size=num_tokens, max_size=num_tokens))  # fmt: skip
    ids = torch.tensor(rows, dtype=torch.int32).reshape(num_tokens, topk)
    return ids, num_experts


@settings(max_examples=50, deadline=None)
@given(routings())
def test_dispatch_properties(routing):
    ids, num_experts = routing
    d = smoe_ops.dispatch(ids, num_experts)
    assert_dispatch_invariants(ids, num_experts, d)
    assert_same_dispatch(d, reference.dispatch(ids, num_experts))


@settings(max_examples=50, deadline=None)
@given(routings(), st.integers(1, 40))
def test_permute_then_unpermute_sums_copies(routing, hidden):
    ids, num_experts = routing
    num_tokens, topk = ids.shape
    d = smoe_ops.dispatch(ids, num_experts)
    # Small integers: every sum below is exact in float32, so equality is exact.
    x = torch.randint(-8, 8, (num_tokens, hidden)).float()
    xs = smoe_ops.permute(x, d)
    rows_of_expert = d.order.long() // topk
    assert torch.equal(xs, x[rows_of_expert])
    ones = torch.ones(num_tokens, topk)
    assert torch.equal(smoe_ops.unpermute(xs, d), topk * x)
    assert torch.equal(smoe_ops.unpermute(xs, d, ones), topk * x)


# (num_tokens, topk, num_experts, hidden)
ROW_SHAPES = [
    (0, 2, 4, 8),  # no tokens: [0, H] outputs, empty gradients
    (1, 1, 1, 1),  # one token, one expert, H = 1
    (33, 2, 7, 37),  # odd H: tails of the vector loops
    (33, 8, 8, 16),  # k = E
    (64, 4, 60, 1100),  # H above the 512-element widening chunk of bf16 / fp16
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_permute_unpermute_forward_backward_match_reference(shape, dtype, device):
    num_tokens, topk, num_experts, hidden = shape
    torch.manual_seed(0)
    ids = routed_ids(num_tokens, topk, num_experts)
    d_cpu = smoe_ops.dispatch(ids, num_experts)
    d = smoe_ops.dispatch(ids.to(device), num_experts)
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    on = dict(device=device, dtype=dtype)
    x = torch.randn(num_tokens, hidden, dtype=torch.float64).to(**on).requires_grad_()
    ys = torch.randn(num_tokens * topk, hidden, dtype=torch.float64).to(**on).requires_grad_()
    weights = torch.rand(num_tokens, topk, dtype=weight_dtype).to(device).requires_grad_()

    xs = smoe_ops.permute(x, d)
    y = smoe_ops.unpermute(ys, d, weights)
    assert xs.dtype == dtype and xs.shape == (num_tokens * topk, hidden)
    assert y.dtype == dtype and y.shape == (num_tokens, hidden)

    # The reference sees the same rounded inputs, in float64.
    x64, ys64, w64 = (t.detach().cpu().double().requires_grad_() for t in (x, ys, weights))
    xs64 = reference.permute(x64, d_cpu)
    y64 = reference.unpermute(ys64, d_cpu, w64)
    assert torch.equal(xs.double().cpu(), xs64)  # a copy: exact
    assert_close(y, y64, dtype)

    grad_xs = torch.randn_like(xs64)
    grad_y = torch.randn_like(y64)
    (xs.double() * grad_xs.to(**on)).sum().backward()
    (y.double() * grad_y.to(**on)).sum().backward()
    (xs64 * grad_xs.to(dtype).double()).sum().backward()
    (y64 * grad_y.to(dtype).double()).sum().backward()
    assert_close(x.grad, x64.grad, dtype)
    assert_close(ys.grad, ys64.grad, dtype)
    # A dot product over H of the rounded inputs, summed in float32.
    assert weights.grad.dtype == weight_dtype
    assert_close(weights.grad, w64.grad, dtype if dtype == torch.float64 else torch.float32,
                 scale=10)  # fmt: skip


def test_unpermute_without_weights_and_with_float64_weights():
    torch.manual_seed(1)
    ids = routed_ids(20, 3, 5)
    d = smoe_ops.dispatch(ids, 5)
    ys = torch.randn(60, 24)
    assert_close(smoe_ops.unpermute(ys, d), reference.unpermute(ys.double(), d))
    # float64 weights on float32 rows: the sum stays float32, weights are rounded to it.
    w = torch.rand(20, 3, dtype=torch.float64)
    expected = reference.unpermute(ys.double(), d, w.float().double())
    assert_close(smoe_ops.unpermute(ys, d, w), expected)
    ys.requires_grad_()
    w.requires_grad_()
    smoe_ops.unpermute(ys, d, w).sum().backward()
    assert w.grad.dtype == torch.float64


def test_non_contiguous_inputs():
    torch.manual_seed(2)
    ids = routed_ids(12, 2, 6)
    d = smoe_ops.dispatch(ids, 6)
    x = torch.randn(16, 12, dtype=torch.float64).t()  # [12, 16], column-major
    ys = torch.randn(8, 48, dtype=torch.float64)[:, ::2].t()  # [24, 8], strided and transposed
    weights = torch.rand(2, 12, dtype=torch.float64).t()  # [12, 2], column-major
    inverse = d.inverse.t().contiguous().t()
    for t in (x, ys, weights, inverse):
        assert not t.is_contiguous()
    d_strided = smoe_ops.Dispatch(d.order, d.offsets, inverse)
    assert torch.equal(smoe_ops.permute(x, d_strided), reference.permute(x, d))
    assert_close(smoe_ops.unpermute(ys, d_strided, weights), reference.unpermute(ys, d, weights))
    grad_y = torch.randn(8, 12, dtype=torch.float64).t()  # [12, 8], column-major
    grad_ys, grad_w = ops.unpermute_backward(grad_y, ys, inverse, weights, True)
    ys64, w64 = ys.clone().requires_grad_(), weights.clone().requires_grad_()
    (reference.unpermute(ys64, d, w64) * grad_y).sum().backward()
    assert_close(grad_ys, ys64.grad)
    assert_close(grad_w, w64.grad)


def test_unpermute_backward_grad_weights_requested_or_not():
    ids = routed_ids(9, 2, 4)
    d = smoe_ops.dispatch(ids, 4)
    ys, grad_y = torch.randn(18, 5), torch.randn(9, 5)
    weights = torch.rand(9, 2)
    grad_ys, grad_w = ops.unpermute_backward(grad_y, ys, d.inverse, weights, False)
    assert grad_w.shape == (0,) and grad_w.dtype == torch.float32
    slots = d.order.long()
    # One float32 product per element, as in the kernel: exact.
    assert torch.equal(grad_ys, weights.flatten()[slots].unsqueeze(1) * grad_y[slots // 2])
    grad_ys, grad_w = ops.unpermute_backward(grad_y, ys, d.inverse, None, True)
    assert grad_w.shape == (0,)
    assert torch.equal(grad_ys, smoe_ops.permute(grad_y, d))


OPCHECK_ROUTINGS = [
    (0, 2, 4, 8),  # no tokens
    (5, 1, 1, 3),  # one expert
    (17, 3, 7, 33),  # odd sizes
]


@pytest.mark.parametrize("shape", OPCHECK_ROUTINGS)
def test_opcheck(shape):
    num_tokens, topk, num_experts, hidden = shape
    ids = routed_ids(num_tokens, topk, num_experts)
    torch.library.opcheck(ops.dispatch.default, (ids, num_experts))
    inverse = smoe_ops.dispatch(ids, num_experts).inverse
    x = torch.randn(num_tokens, hidden, requires_grad=True)
    ys = torch.randn(num_tokens * topk, hidden, requires_grad=True)
    weights = torch.rand(num_tokens, topk, requires_grad=True)
    grad_y = torch.randn(num_tokens, hidden)
    torch.library.opcheck(ops.permute.default, (x, inverse))
    torch.library.opcheck(ops.unpermute.default, (ys, inverse, weights))
    torch.library.opcheck(ops.unpermute.default, (ys, inverse, None))
    ys, weights = ys.detach(), weights.detach()
    for w, want in [(weights, True), (weights, False), (None, False)]:
        torch.library.opcheck(ops.unpermute_backward.default, (grad_y, ys, inverse, w, want))


def test_gradcheck():
    ids = routed_ids(6, 3, 5, distinct=False)
    d = smoe_ops.dispatch(ids, 5)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: smoe_ops.permute(x, d), (x,))
    ys = torch.randn(18, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda ys, w: smoe_ops.unpermute(ys, d, w), (ys, w))
    assert torch.autograd.gradcheck(lambda ys: smoe_ops.unpermute(ys, d), (ys,))


def test_compile_fullgraph():
    def layer(x, ids, weights):
        d = smoe_ops.dispatch(ids, 8)
        return smoe_ops.unpermute(smoe_ops.permute(x, d) * 2, d, weights)

    ids = routed_ids(16, 2, 8)
    x = torch.randn(16, 12, requires_grad=True)
    weights = torch.rand(16, 2, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, ids, weights)
    expected = layer(x, ids, weights)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert_close(x.grad, (2 * weights.sum(1, keepdim=True).expand(16, 12)).double())


def _inverse(num_tokens=4, topk=2, num_experts=3):
    return smoe_ops.dispatch(routed_ids(num_tokens, topk, num_experts), num_experts).inverse


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.dispatch(torch.zeros(4, dtype=torch.int32), 2), ValueError,
         r"dispatch: ids must be 2-D .*got shape \[4\]"),
        (lambda: ops.dispatch(torch.zeros(4, 2), 2), TypeError,
         r"dispatch: ids must be int32 or int64, got Float"),
        (lambda: ops.dispatch(torch.zeros(4, 2, dtype=torch.int32), 0), ValueError,
         r"num_experts must be >= 1, got 0"),
        (lambda: ops.dispatch(torch.tensor([[0, 1], [8, 2]], dtype=torch.int32), 8), IndexError,
         r"ids\[1, 0\] = 8 is out of range, expected values in \[0, num_experts\) with "
         r"num_experts = 8"),
        (lambda: ops.dispatch(torch.tensor([[0, -1]]), 3), IndexError,
         r"ids\[0, 1\] = -1 is out of range.*num_experts = 3"),
        (lambda: ops.permute(torch.randn(4, 5), _inverse().long()), TypeError,
         r"permute: inverse must be Int, got Long"),
        (lambda: ops.permute(torch.randn(3, 5), _inverse()), ValueError,
         r"permute: x.shape\[0\] must equal inverse.shape\[0\].*\(4\), got shape \[3, 5\]"),
        (lambda: ops.permute(torch.ones(4, 5, dtype=torch.int32), _inverse()), TypeError,
         r"permute: x must be float32.*got Int"),
        (lambda: ops.permute(torch.randn(4, 5), torch.tensor([[0, 1], [2, 3], [4, 8], [5, 6]],
                                                             dtype=torch.int32)), IndexError,
         r"permute: inverse\[2, 1\] = 8 is out of range, expected a row in \[0, 8\)"),
        (lambda: ops.permute(torch.randn(2, 5), torch.tensor([[0, 1], [1, 3]],
                                                             dtype=torch.int32)), ValueError,
         r"permute: inverse\[1, 0\] = 1 repeats inverse\[0, 1\], expected a permutation"),
        (lambda: ops.unpermute(torch.randn(7, 5), _inverse(), None), ValueError,
         r"unpermute: ys.shape\[0\] must equal inverse.numel\(\).*\(8\), got shape \[7, 5\]"),
        (lambda: ops.unpermute(torch.randn(8, 5), _inverse(), torch.rand(4, 3)), ValueError,
         r"unpermute: weights must have the shape of inverse \(\[4, 2\].*got shape \[4, 3\]"),
        (lambda: ops.unpermute(torch.randn(8, 5), _inverse(), torch.ones(4, 2, dtype=torch.long)),
         TypeError, r"unpermute: weights must be float32.*got Long"),
        (lambda: ops.unpermute(torch.randn(2, 5), torch.tensor([[-1, 0]], dtype=torch.int32),
                               None), IndexError,
         r"unpermute: inverse\[0, 0\] = -1 is out of range, expected a row in \[0, 2\)"),
        (lambda: ops.unpermute_backward(torch.randn(4, 5).double(), torch.randn(8, 5),
                                        _inverse(), None, False), TypeError,
         r"unpermute_backward: grad_y must have the dtype of ys \(Float\), got Double"),
        (lambda: ops.unpermute_backward(torch.randn(4, 6), torch.randn(8, 5), _inverse(), None,
                                        False), ValueError,
         r"grad_y.shape\[1\] must equal ys.shape\[1\] \(5\), got shape \[4, 6\]"),
        (lambda: ops.unpermute_backward(torch.randn(1, 5), torch.randn(2, 5),
                                        torch.tensor([[1, 1]], dtype=torch.int32), None, False),
         ValueError, r"unpermute_backward: inverse\[0, 1\] = 1 repeats inverse\[0, 0\]"),
        # Rows of width 0 move nothing, but inverse is still checked.
        (lambda: ops.unpermute(torch.empty(4, 0), torch.tensor([[0, 1], [2, 9]],
                                                               dtype=torch.int32), None),
         IndexError, r"unpermute: inverse\[1, 1\] = 9 is out of range"),
        # 2^31 rows overflow the int32 row indices; stride-0 views keep it cheap, so the check
        # must come before anything is made contiguous or read.
        (lambda: ops.permute(torch.zeros(1, 4).expand(2**31, 4),
                             torch.zeros(1, 1, dtype=torch.int32).expand(2**31, 1)), ValueError,
         r"permute: inverse.numel\(\) must fit in int32 .*got 2147483648"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
