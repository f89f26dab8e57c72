"""route against the reference: ids and counts exact, weights and gradients within the
tolerance table; ties, NaN, -inf, group-limited routing, opcheck, gradcheck, torch.compile
and bad inputs."""

import os
import subprocess
import sys

import pytest
import torch

import smoe_ops
from smoe_ops import reference
from tests.helpers import DTYPES, assert_close, assert_equal

SPACING = 1 / 64  # logit spacing: exact in bfloat16 for |logit| <= 2, and far above rounding


def distinct_logits(num_tokens, num_experts, dtype=torch.float64, seed=0):
    """[T, E]: each row a random permutation of E distinct multiples of SPACING.

    For E <= 257 the values survive rounding to bfloat16 / float16 unchanged, so scores have
    no ties or near-ties and the float32 kernel must pick exactly the float64 ids. Wider rows
    use a finer spacing, which bfloat16 may round into exact ties: those both sides break
    the same way (lower id), as they see the same rounded values.
    """
    gen = torch.Generator().manual_seed(seed)
    spacing = SPACING if num_experts <= 257 else 4 / num_experts
    values = (torch.arange(num_experts, dtype=torch.float64) - num_experts // 2) * spacing
    order = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)
    return values[order].to(dtype)


def integer_bias(num_experts, seed=1):
    """[E] float32 in {0, 1, 2}: whole levels above scores in [0, 1], so s + bias has no new
    near-ties, and the chosen experts differ from those of s alone."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (num_experts,), generator=gen).float()


CASES = [
    # (T, E, k, num_groups, topk_groups)
    (1, 1, 1, None, None),  # E = 1: the only expert, weight 1 after renormalize
    (33, 7, 2, None, None),  # prime E below one 16-wide vector: partial lanes everywhere
    (33, 8, 8, None, None),  # k = E: every expert, all ranked
    (33, 60, 8, None, None),  # E not a multiple of 16: vector tails
    (33, 64, 1, None, None),  # k = 1
    (33, 128, 17, None, None),  # k > 16: no lower bound, all 128 keys ranked
    (33, 257, 257, None, None),  # prime E, k = E: 257 keys, just past the ranking limit
    (9, 600, 20, None, None),  # wide rows, k > 16: 600 candidates, sorted
    (4096, 128, 8, None, None),  # Mixtral-like width, many rows: several tasks merge counts
    (33, 256, 8, 8, 4),  # DeepSeek-V3 groups: 8 groups of 32, keep 4
    (33, 64, 16, 64, 20),  # groups of one expert: a group scores its only key
    (33, 60, 13, 30, 7),  # groups of two: a group scores the sum of both
    (33, 64, 16, 4, 1),  # one kept group, k = its size
]

# (score, renormalize, with_bias, scale)
VARIANTS = [
    ("softmax", True, False, 1.0),
    ("sigmoid", True, True, 2.5),
    ("sigmoid", False, False, 1.0),
    ("softmax", False, True, 0.5),
]


def check_against_reference(
    logits, k, score, renormalize, bias, num_groups, topk_groups, scale, device="cpu"
):
    """Forward and backward of smoe_ops.route on `device` against the reference (on the CPU)
    on the same inputs; off the CPU, ids and counts must also equal the CPU kernel's."""
    logits = logits.detach().to(device).requires_grad_()
    args = (k, score, renormalize, bias, num_groups, topk_groups, scale)
    device_bias = bias.to(device) if bias is not None else None
    out = smoe_ops.route(logits, k, score, renormalize, device_bias, num_groups, topk_groups,
                         scale)
    ref_logits = logits.detach().cpu().double().requires_grad_()
    ref = reference.route(ref_logits, *args)
    if logits.device.type != "cpu":
        on_cpu = smoe_ops.route(logits.detach().cpu(), *args)
        assert_equal(out.ids, on_cpu.ids, msg="ids vs the CPU kernel")
        assert_equal(out.counts, on_cpu.counts, msg="counts vs the CPU kernel")

    num_tokens, num_experts = logits.shape
    weight_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert out.weights.dtype == weight_dtype and out.weights.shape == (num_tokens, k)
    assert out.ids.dtype == torch.int32 and out.counts.dtype == torch.int32
    assert_equal(out.ids, ref.ids)
    assert_equal(out.counts, ref.counts)
    bincount = torch.bincount(out.ids.flatten().long(), minlength=num_experts)
    assert_equal(out.counts, bincount.int())
    # Weights come from the rounded inputs in float32 (float64): the weight dtype's tolerance.
    assert_close(out.weights, ref.weights, weight_dtype)

    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(num_tokens, k, dtype=torch.float64, generator=gen)
    out.weights.backward(grad.to(device=logits.device, dtype=weight_dtype))
    ref.weights.backward(grad)
    assert logits.grad.dtype == logits.dtype
    assert_close(logits.grad, ref_logits.grad, logits.dtype)
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-renorm{v[1]}-bias{v[2]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}-g{}-{}".format(*c))
def test_matches_reference(case, dtype, variant, device):
    num_tokens, num_experts, k, num_groups, topk_groups = case
    score, renormalize, with_bias, scale = variant
    logits = distinct_logits(num_tokens, num_experts, dtype)
    bias = integer_bias(num_experts) if with_bias else None
    check_against_reference(
        logits, k, score, renormalize, bias, num_groups, topk_groups, scale, device
    )


def test_deepseek_v3_router():
    # The DeepSeek-V3 gate: sigmoid, bias for selection, 8 groups keep 4, k = 8, scale 2.5.
    logits = distinct_logits(257, 256, torch.float32, seed=3)
    bias = integer_bias(256, seed=4)
    out = check_against_reference(logits, 8, "sigmoid", True, bias, 8, 4, 2.5)
    # At most 4 distinct groups per token, and the weights sum to the scale.
    assert ((out.ids // 32).sort(dim=1).values.diff(dim=1) != 0).sum(dim=1).max() <= 3
    assert_close(out.weights.sum(dim=1), torch.full((257,), 2.5), torch.float32)


def test_bias_selects_but_never_weights():
    # Bias 10 on expert 3 wins every token; its weight is still its score, not score + bias.
    logits = distinct_logits(16, 8, torch.float32)
    bias = torch.zeros(8)
    bias[3] = 10.0
    out = smoe_ops.route(logits, 1, score="sigmoid", renormalize=False, expert_bias=bias)
    assert (out.ids == 3).all()
    assert_close(out.weights[:, 0], torch.sigmoid(logits[:, 3].double()), torch.float32)


@pytest.mark.parametrize("num_experts, k", [(8, 3), (60, 8), (128, 17), (600, 4)])
def test_all_equal_rows_choose_the_lowest_ids(num_experts, k, device):
    # Every key ties: the bound keeps all of them (E = 600: the sorting path).
    logits = torch.zeros(5, num_experts, device=device)
    out = smoe_ops.route(logits, k)
    expected = torch.arange(k, dtype=torch.int32).expand(5, k)
    assert_equal(out.ids, expected)
    assert_close(out.weights, torch.full((5, k), 1.0 / k), torch.float32)


def test_ties_in_groups_go_to_the_lowest_group_and_expert(device):
    logits = torch.zeros(3, 64, device=device)
    out = smoe_ops.route(logits, 6, num_groups=8, topk_groups=3)
    assert_equal(out.ids, torch.arange(6, dtype=torch.int32).expand(3, 6))
    # Tied groups: group 5 and 1 share the best pair of keys; the lower group id goes first.
    logits[:, 5 * 8 + 2] = logits[:, 1 * 8 + 6] = 1.0
    out = smoe_ops.route(logits, 2, num_groups=8, topk_groups=1)
    assert_equal(out.ids, torch.tensor([[14, 8]] * 3, dtype=torch.int32))


def test_ties_with_bias(device):
    # Zero logits plus a bias of 1 on odd experts: odd ids first, ascending, then even ones.
    bias = torch.tensor([0.0, 1.0] * 8)
    out = smoe_ops.route(torch.zeros(2, 16, device=device), 10, expert_bias=bias.to(device))
    expected = torch.tensor([1, 3, 5, 7, 9, 11, 13, 15, 0, 2], dtype=torch.int32)
    assert_equal(out.ids, expected.expand(2, 10))
    check_against_reference(torch.zeros(2, 16), 10, "softmax", True, bias, None, None, 1.0,
                            device)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_nan_rows_propagate_with_valid_ids(score, device):
    logits = distinct_logits(4, 32, torch.float32)
    logits[1, 5] = float("nan")  # one NaN logit
    logits[2] = float("nan")  # a whole NaN row
    out = smoe_ops.route(logits.to(device), 4, score=score)
    out = type(out)(*(t.cpu() for t in out))
    ref = reference.route(logits.double(), 4, score=score)
    torch.testing.assert_close(out.ids, ref.ids, rtol=0, atol=0)
    assert torch.equal(out.weights.isnan(), ref.weights.isnan())
    assert_close(out.weights.nan_to_num(), ref.weights.nan_to_num(), torch.float32)
    # A NaN key ranks as -inf: ids stay valid and distinct, the whole-NaN row takes 0..k-1.
    assert ((out.ids >= 0) & (out.ids < 32)).all()
    assert (out.ids.sort(dim=1).values.diff(dim=1) > 0).all()
    torch.testing.assert_close(out.ids[2], torch.arange(4, dtype=torch.int32))
    assert out.weights[2].isnan().all()
    assert out.weights[[0, 3]].isfinite().all()
    assert not (out.ids[1] == 5).any()
    # softmax spreads the NaN over its row; sigmoid only where the NaN expert is chosen.
    assert out.weights[1].isnan().all() == (score == "softmax")


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_neg_inf_logits(score, device):
    # Three finite logits and k = 5: two -inf experts must be taken, lowest ids, weight 0.
    logits = torch.full((2, 12), float("-inf"))
    logits[:, [2, 7, 9]] = torch.tensor([0.5, -0.25, 1.0])
    out = check_against_reference(logits, 5, score, True, None, None, None, 1.0, device)
    assert_equal(out.ids[0], torch.tensor([9, 2, 7, 0, 1], dtype=torch.int32))
    assert (out.weights[:, 3:] == 0).all()


def test_all_underflow_sigmoid_row_stays_zero(device):
    # Every score underflows: the renormalizing sum is clamped, weights are 0, not 0 / 0.
    logits = torch.full((2, 8), -200.0, device=device)
    out = smoe_ops.route(logits, 2, score="sigmoid")
    assert (out.weights == 0).all()
    logits.requires_grad_()
    smoe_ops.route(logits, 2, score="sigmoid").weights.sum().backward()
    assert (logits.grad == 0).all()


def test_all_tokens_on_one_expert(device):
    # Expert 5 dominates every token: counts concentrate, every other expert is empty.
    logits = distinct_logits(300, 16, torch.float32)
    logits[:, 5] += 10
    out = check_against_reference(logits, 1, "softmax", True, None, None, None, 1.0, device)
    expected = torch.zeros(16, dtype=torch.int32)
    expected[5] = 300
    assert_equal(out.counts, expected)


def test_no_tokens(device):
    logits = torch.empty(0, 12, device=device, requires_grad=True)
    out = smoe_ops.route(logits, 3, num_groups=4, topk_groups=2)
    assert out.weights.shape == (0, 3) and out.ids.shape == (0, 3)
    assert_equal(out.counts, torch.zeros(12, dtype=torch.int32))
    out.weights.sum().backward()
    assert logits.grad.shape == (0, 12)


def test_non_contiguous_logits():
    logits = distinct_logits(40, 24, torch.float64).t().contiguous().t()  # column-major
    assert not logits.is_contiguous()
    check_against_reference(logits, 5, "softmax", True, None, 4, 2, 1.0)
    bias = integer_bias(48)[::2]  # strided bias
    check_against_reference(logits, 5, "sigmoid", True, bias, None, None, 1.0)


def test_result_types():
    r = smoe_ops.route(distinct_logits(3, 8, torch.float32), 2)
    assert isinstance(r, smoe_ops.RouteResult) and isinstance(r, reference.RouteResult)
    assert r._fields == ("weights", "ids", "counts")


def test_thread_count_does_not_change_results():
    logits = distinct_logits(2000, 64, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = smoe_ops.route(logits, 4)
        torch.set_num_threads(2)
        two = smoe_ops.route(logits, 4)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


OPCHECK_CASES = [
    # (T, E, k, score, renormalize, with_bias, num_groups, topk_groups, scale)
    (0, 8, 2, "softmax", True, False, 1, 1, 1.0),  # no tokens
    (5, 7, 3, "sigmoid", False, True, 1, 1, 1.0),  # prime E, bias
    (17, 64, 8, "sigmoid", True, True, 8, 4, 2.5),  # DeepSeek-style groups
    (6, 20, 20, "softmax", True, False, 1, 1, 0.5),  # k = E > 16
]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    num_tokens, num_experts, k, score, renorm, with_bias, groups, topk_groups, scale = case
    logits = distinct_logits(num_tokens, num_experts, torch.float32).requires_grad_()
    bias = integer_bias(num_experts) if with_bias else None
    args = (logits, k, score, renorm, bias, groups, topk_groups, scale)
    torch.library.opcheck(torch.ops.smoe_ops.route.default, args)
    ids = smoe_ops.route(*args).ids
    grad = torch.randn(num_tokens, k)
    backward_args = (grad, logits.detach(), ids, score, renorm, scale)
    torch.library.opcheck(torch.ops.smoe_ops.route_backward.default, backward_args)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-renorm{v[1]}-bias{v[2]}")
def test_gradcheck(variant):
    score, renormalize, with_bias, scale = variant
    logits = distinct_logits(6, 12, torch.float64).requires_grad_()
    bias = integer_bias(12) if with_bias else None

    def weights(x):
        return smoe_ops.route(x, 3, score, renormalize, bias, 3, 2, scale).weights

    assert torch.autograd.gradcheck(weights, (logits,))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    logits = distinct_logits(33, 16, torch.float32)
    bias = integer_bias(16)

    def layer(x):
        r = smoe_ops.route(x, 4, "sigmoid", True, bias, 4, 2, 2.5)
        return r.weights * r.ids, r.counts

    compiled = torch.compile(layer, fullgraph=True)
    x_eager = logits.clone().requires_grad_()
    x_compiled = logits.clone().requires_grad_()
    eager, compiled_out = layer(x_eager), compiled(x_compiled)
    for a, b in zip(eager, compiled_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    eager[0].sum().backward()
    compiled_out[0].sum().backward()
    torch.testing.assert_close(x_eager.grad, x_compiled.grad)


def route_call(logits=None, k=2, score="softmax", bias=None, groups=None, topk_groups=None):
    logits = torch.zeros(4, 8) if logits is None else logits
    return smoe_ops.route(logits, k, score, True, bias, groups, topk_groups)


BAD_INPUTS = [
    ({"logits": torch.zeros(4, 8, 2)}, ValueError, r"logits must be 2-D .* got shape \[4, 8, 2\]"),
    ({"logits": torch.zeros(4, 8, dtype=torch.int64)}, TypeError, r"logits must be float.*Long"),
    ({"k": 0}, ValueError, r"k must be in \[1, num_experts = 8\], got 0"),
    ({"k": 9}, ValueError, r"k must be in \[1, num_experts = 8\], got 9"),
    ({"score": "relu"}, ValueError, r"score must be 'softmax' or 'sigmoid', got 'relu'"),
    ({"bias": torch.zeros(7)}, ValueError, r"expert_bias.shape\[0\] must equal num_experts"),
    ({"bias": torch.zeros(8, dtype=torch.int32)}, TypeError, r"expert_bias must be float.*Int"),
    ({"groups": 3}, ValueError, r"num_groups must be >= 1 and divide num_experts = 8, got 3"),
    (
        {"groups": 4, "topk_groups": 5},
        ValueError,
        r"topk_groups must be in \[1, num_groups = 4\], got 5",
    ),
    ({"k": 3, "groups": 4, "topk_groups": 1}, ValueError, r"k must be <= .* = 2 .*got 3"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
def test_bad_input_names_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        route_call(**kwargs)


def test_backward_bad_input_names_the_argument():
    logits = torch.zeros(4, 8)
    grad = torch.zeros(4, 2)
    backward = torch.ops.smoe_ops.route_backward
    ids = torch.tensor([[0, 8]] * 4, dtype=torch.int32)
    with pytest.raises(IndexError, match=r"ids must be in \[0, num_experts = 8\), got .*8\]"):
        backward(grad, logits, ids, "softmax", True, 1.0)
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"grad_weights must be Float, got Double"):
        backward(grad.double(), logits, ids, "softmax", True, 1.0)
    with pytest.raises(ValueError, match=r"grad_weights must have the shape of ids \[4, 2\]"):
        backward(torch.zeros(4, 3), logits, ids, "softmax", True, 1.0)
    with pytest.raises(TypeError, match=r"ids must be Int, got Long"):
        backward(grad, logits, ids.long(), "softmax", True, 1.0)


def test_selection_follows_the_exact_scores_where_float32_scores_tie():
    # exp(-200) and exp(-201) both underflow to 0 in float32, a tie that would go to the lower
    # id; in exact arithmetic (the float64 reference) expert 2 scores higher than expert 1.
    # The float32 kernel selects on the logits (softmax is increasing) and must agree.
    logits = torch.tensor([[0.0, -201.0, -200.0]])
    r = smoe_ops.route(logits, 2)
    expected = reference.route(logits.double(), 2)
    assert r.ids.tolist() == expected.ids.tolist() == [[0, 2]]
    assert_close(r.weights, expected.weights, torch.float32)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_finite_rows_whose_sum_overflows_select_on_the_logits(score, device):
    # Every entry is finite, but a running sum overflows in some orders of addition (the CPU
    # kernel's and the CUDA team's orders differ; this row's sequential sum is inf). Such a row
    # must take the path of finite rows on every backend: selection on the logits, the order
    # of the exact scores. sigmoid(20) and sigmoid(30) round to 1 in float32 (the scored path
    # would pick expert 4 by the tie); float64 tells them apart, so sigmoid is checked against
    # the reference. Softmax scores of 20 and 30 underflow to 0 even in float64.
    logits = torch.tensor([[3e38, 3e38, -3e38, -3e38, 20.0, 30.0],
                           [20.0, 3e38, -3e38, 30.0, 3e38, -3e38]])
    out = smoe_ops.route(logits.to(device), 3, score)
    assert out.ids.tolist() == [[0, 1, 5], [1, 4, 3]]
    if score == "sigmoid":
        check_against_reference(logits, 3, score, True, None, None, None, 1.0, device)


def test_assignments_beyond_int32_counts_are_refused():
    # 2^28 tokens * k = 8 assignments overflow int32 counts; a stride-0 view keeps it cheap,
    # and the check must come before anything is allocated or read.
    logits = torch.zeros(1, 8).expand(2**28, 8)
    with pytest.raises(ValueError, match=r"num_tokens \* k must fit int32 counts"):
        smoe_ops.route(logits, 8)


def test_scalar_compaction_path_matches_the_reference():
    # The AVX-512 compaction is chosen at run time; SMOE_OPS_NO_AVX512 forces the scalar loop
    # that other CPUs run, in a fresh process (the choice is made once per process).
    code = (
        "import torch, smoe_ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for experts, k in [(7, 2), (60, 4), (128, 8), (257, 16)]:\n"
        "    logits = torch.randn(333, experts, generator=g)\n"
        "    for score in ['softmax', 'sigmoid']:\n"
        "        r = smoe_ops.route(logits, k, score=score)\n"
        "        ref = smoe_ops.reference.route(logits.double(), k, score=score)\n"
        "        assert torch.equal(r.ids, ref.ids), (experts, k, score)\n"
    )
    env = {**os.environ, "SMOE_OPS_NO_AVX512": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
