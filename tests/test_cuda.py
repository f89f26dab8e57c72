"""CUDA-only checks (they skip without a GPU): a CUDA graph captures and replays the whole
layer forward and backward; CuPy, a non-torch library, checks grouped_mm on the same device
buffers; index outputs equal the CPU kernels' exactly at sizes the op tests do not reach; and
the kernels run on the caller's current stream. The op tests (test_route.py, ...) run their
reference comparisons on CUDA too through the `device` fixture (tests/conftest.py)."""

import math

import pytest
import torch

import smoe_ops
from smoe_ops import reference
from tests.helpers import assert_close, assert_equal

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in smoe_ops.build_info()["backends"],
    reason="needs a CUDA device and smoe_ops built with its CUDA kernels",
)


def layer_params(T, H, I, E, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    router = torch.randn(H, E, generator=g)
    w_in = torch.randn(E, H, 2 * I, generator=g) / H**0.5
    w_out = torch.randn(E, I, H, generator=g) / I**0.5
    return [t.to(device="cuda", dtype=dtype) for t in (x, router, w_in, w_out)]


def layer_step(x, router, w_in, w_out, k):
    y, aux = smoe_ops.moe_ffn(x, router, w_in, w_out, k)
    loss = y.square().sum() + aux.balance + aux.z
    loss.backward()
    return y, loss


def test_cuda_graph_captures_moe_ffn_forward_and_backward():
    T, H, I, E, k = 256, 64, 32, 8, 2
    x, *weights = layer_params(T, H, I, E)
    weights = [w.requires_grad_() for w in weights]
    static_x = x.clone().requires_grad_()

    # Warm up on a side stream (allocator pools, lazy init), as graph capture requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            layer_step(static_x, *weights, k)
            for t in [static_x, *weights]:
                t.grad = None
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises if any op synchronizes with the host
        static_y, static_loss = layer_step(static_x, *weights, k)

    for seed in (1, 2):
        new_x = layer_params(T, H, I, E, seed=seed)[0]
        with torch.no_grad():
            static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        eager = [t.detach().clone().requires_grad_() for t in [new_x, *weights]]
        y, loss = layer_step(*eager, k)
        assert_close(static_y, y, torch.float32, msg="y")
        assert_close(static_loss, loss, torch.float32, scale=10, msg="loss")
        grads = [static_x.grad, *(w.grad for w in weights)]
        for name, ours, expected in zip(["x", "router", "w_in", "w_out"], grads, eager):
            assert_close(ours, expected.grad, torch.float32, scale=10, msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts", [[300, 0, 17, 1200, 5], [0, 0, 2048, 0]])
def test_grouped_mm_matches_cupy(dtype, counts):
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("CuPy sees no CUDA device")
    g = torch.Generator().manual_seed(0)
    N, K, M, E = sum(counts), 192, 320, len(counts)
    x = torch.randn(N, K, generator=g).to(device="cuda", dtype=dtype)
    w = (torch.randn(E, K, M, generator=g) / math.sqrt(K)).to(device="cuda", dtype=dtype)
    offsets = torch.tensor([0] + counts, device="cuda").cumsum(0)
    out = smoe_ops.grouped_mm(x, w, offsets)
    torch.cuda.synchronize()

    # CuPy multiplies the same values (bfloat16 widened to float32: CuPy has no bfloat16).
    wide = torch.float32 if dtype == torch.bfloat16 else dtype
    xc, wc = cupy.from_dlpack(x.to(wide)), cupy.from_dlpack(w.to(wide))
    begin = 0
    for e, rows in enumerate(counts):
        expected = cupy.matmul(xc[begin : begin + rows].astype(cupy.float64),
                               wc[e].astype(cupy.float64))
        ours = cupy.from_dlpack(out[begin : begin + rows].float().contiguous())
        got = torch.from_dlpack(ours).double()
        assert_close(got, torch.from_dlpack(expected), dtype, scale=math.sqrt(K), msg=f"e={e}")
        begin += rows


def test_route_ids_equal_the_cpu_kernel_at_scale():
    # float32 softmax + renormalize and sigmoid select on the logits on both devices: exact.
    logits = torch.randn(8192, 256, generator=torch.Generator().manual_seed(0))
    for score in ("softmax", "sigmoid"):
        ours = smoe_ops.route(logits.cuda(), 8, score=score)
        cpu = smoe_ops.route(logits, 8, score=score)
        assert_equal(ours.ids, cpu.ids, msg=score)
        assert_equal(ours.counts, cpu.counts, msg=score)
        assert_close(ours.weights, cpu.weights, torch.float32)
    # DeepSeek-V3 routing against the float64 reference (integer bias: no near-ties).
    bias = torch.randint(0, 3, (256,), generator=torch.Generator().manual_seed(1)).float()
    args = (8, "sigmoid", True, bias, 8, 4, 2.5)
    ours = smoe_ops.route(logits.cuda().double(), *args[:3], bias.cuda(), *args[4:])
    ref = reference.route(logits.double(), *args)
    assert_equal(ours.ids, ref.ids)
    assert_close(ours.weights, ref.weights, torch.float64)


def test_dispatch_equals_the_cpu_kernel_at_scale():
    g = torch.Generator().manual_seed(0)
    for T, k, E in [(32768, 8, 128), (65536, 2, 8), (4096, 8, 257), (1000, 4, 100000)]:
        ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
        ids[: T // 2] = 3  # skew: half the tokens on one expert
        ours = smoe_ops.dispatch(ids.cuda(), E)
        cpu = smoe_ops.dispatch(ids, E)
        for name, a, b in zip(ours._fields, ours, cpu):
            assert_equal(a, b, msg=f"{name} T={T} k={k} E={E}")


def test_kernels_run_on_the_current_stream():
    logits = torch.randn(4096, 64, device="cuda")
    expected = smoe_ops.route(logits, 4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = smoe_ops.route(logits, 4)
        d = smoe_ops.dispatch(out.ids, 64)
        xs = smoe_ops.permute(logits, d)
    torch.cuda.current_stream().wait_stream(side)
    assert_equal(out.ids, expected.ids)
    assert_equal(xs, reference.permute(logits.cpu(), type(d)(*(t.cpu() for t in d))))


def test_second_device_if_present():
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device")
    x = torch.randn(64, 2 * 48, device="cuda:1")
    assert_close(smoe_ops.swiglu(x), reference.swiglu(x.double()), torch.float32)


def opcheck_cases():
    """(op, args) for every op on CUDA, small shapes; the last case of each op has no rows."""
    g = torch.Generator().manual_seed(0)
    dev = dict(device="cuda")
    cases = []
    for T, E, k, groups in [(9, 7, 3, 1), (17, 64, 8, 8), (0, 8, 2, 1)]:
        logits = torch.randn(T, E, generator=g).to(**dev).requires_grad_()
        bias = torch.randn(E, generator=g).to(**dev) if groups > 1 else None
        args = (logits, k, "sigmoid" if groups > 1 else "softmax", True, bias, groups,
                max(1, groups // 2), 1.0)
        cases.append(("route", args))
        r = torch.ops.smoe_ops.route(*args)
        grad_w = torch.randn(T, k, generator=g).to(**dev)
        cases.append(("route_backward", (grad_w, logits.detach(), r[1], args[2], True, 1.0)))
        cases.append(("router_losses", (logits, r[2], k)))
        losses, mean_probs = torch.ops.smoe_ops.router_losses(logits.detach(), r[2], k)
        if T > 0:
            cases.append(("router_losses_backward",
                          (torch.randn(4, generator=g).to(**dev), logits.detach(), r[2], k,
                           mean_probs)))
        d = torch.ops.smoe_ops.dispatch(r[1], E)
        cases.append(("dispatch", (r[1], E)))
        H = 24
        x = torch.randn(T, H, generator=g).to(**dev).requires_grad_()
        ys = torch.randn(T * k, H, generator=g).to(**dev).requires_grad_()
        weights = torch.rand(T, k, generator=g).to(**dev).requires_grad_()
        cases.append(("permute", (x, d[2])))
        cases.append(("unpermute", (ys, d[2], weights)))
        cases.append(("unpermute_backward",
                      (torch.randn(T, H, generator=g).to(**dev), ys.detach(), d[2],
                       weights.detach(), True)))
        w = torch.randn(E, H, 40, generator=g).to(**dev).requires_grad_()
        b = torch.randn(E, 40, generator=g).to(**dev).requires_grad_()
        cases.append(("grouped_mm", (ys, w, d[1], b)))
        cases.append(("grouped_mm_backward",
                      (torch.randn(T * k, 40, generator=g).to(**dev), ys.detach(), w.detach(),
                       d[1], [True, True, True])))
        gate_up = torch.randn(T, 2 * 20, generator=g).to(**dev).requires_grad_()
        cases.append(("swiglu", (gate_up,)))
        cases.append(("swiglu_backward", (torch.randn(T, 20, generator=g).to(**dev),
                                          gate_up.detach())))
    return cases


def test_opcheck_every_op_on_cuda():
    # Schemas, fake kernels and autograd registration agree with the CUDA kernels.
    for name, args in opcheck_cases():
        torch.library.opcheck(getattr(torch.ops.smoe_ops, name).default, args)
