"""The benchmark half of benchmarks/gpu_check.sh: the card's ceilings, then every CUDA op
against the reference (and grouped_mm against torch's own grouped GEMM), as one table.

    python -m benchmarks.gpu_check [--budget SECONDS] [--quick]
    python -m benchmarks.gpu_check --smoke --device cpu     # the script's own test (CI)

Ceilings: a 1 GiB device-to-device copy (GB/s counts bytes read + written) and a bf16
8192^3 torch.matmul (TFLOP/s). Each op row gives our time, the reference's, torch's grouped
GEMM where it exists, and our achieved rate as a percentage of the matching ceiling
(memory-bound ops: bytes they must move / time vs the copy ceiling; GEMMs: FLOPs / time vs
the matmul ceiling). Times: CUDA events around `reps` back-to-back calls after warm-up,
median of 5 such groups. Shapes: Mixtral-8x7B (H=4096, I=14336, E=8, k=2), Qwen3-30B-A3B
(H=2048, I=768, E=128, k=8), OLMoE (H=2048, I=1024, E=64, k=8), the DeepSeek-V3 router
(E=256, k=8, 8 groups, top-4 groups, sigmoid with bias); bf16; uniform and skewed routing.
Rows stop being added once the time budget is spent (the table says which were left out).
Only this script prints; figures go to benchmarks/GPU_NOTES.md by hand, from its output.
--smoke runs every row once at shapes divided by 64 (wall-clock timing off CUDA): its
figures mean nothing, but a GPU run is rare and short, so CI runs the script this way
(tests/test_gpu_check.py) to find its mistakes before a card does.
"""

import argparse
import statistics
import time

import torch

import smoe_ops
from smoe_ops import reference

FULL_MODELS = {
    # name: (H, I, E, k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
}
MODELS = dict(FULL_MODELS)  # main() divides H and I by 64 for --smoke
DEEPSEEK_ROUTER = dict(E=256, k=8, score="sigmoid", num_groups=8, topk_groups=4, scale=2.5)
DEVICE = "cuda"  # --device
SMOKE = False  # --smoke: one timed call per figure


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_time_ms(fn, reps=None, groups=5):
    """Median over `groups` of the mean time of `reps` back-to-back calls, in ms (CUDA
    events; wall clock off CUDA)."""
    if SMOKE:
        reps, groups = 1, 1
    fn()
    synchronize()
    if reps is None:  # about 20 ms per group, at least one call
        start = time.perf_counter()
        fn()
        synchronize()
        once = time.perf_counter() - start
        reps = max(1, min(200, int(0.02 / max(once, 1e-6))))
    times = []
    for _ in range(groups):
        if DEVICE != "cuda":
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - start) * 1e3 / reps)
            continue
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / reps)
    return statistics.median(times)


def copy_ceiling_gbs():
    # 1 GiB (16 MiB in a smoke run)
    src = torch.empty(1 << (23 if SMOKE else 29), dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    copy_ms = cuda_time_ms(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() * src.element_size() / copy_ms / 1e6


def ceilings():
    gbs = copy_ceiling_gbs()
    n = 512 if SMOKE else 8192
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    mm_ms = cuda_time_ms(lambda: a @ b, reps=10)
    tflops = 2 * n**3 / mm_ms / 1e9
    return gbs, tflops


def torch_grouped_mm():
    """torch's grouped GEMM (2D x 3D with int32 cumulative row ends), or None."""
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    if fn is not None:
        return lambda x, w, ends: fn(x, w, offs=ends)
    fn = getattr(torch, "_grouped_mm", None)
    if fn is not None:
        return lambda x, w, ends: fn(x, w, offs=ends)
    return None


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def routed_ids(T, E, k, skew, gen):
    """[T, k] int32 distinct per row, uniform; skewed: every token also picks expert 0 (a hot
    expert with T rows, 1/k of all assignments), the rest uniform."""
    scores = torch.rand(T, E, generator=gen, device=DEVICE)
    if skew:
        scores[:, 0] += 1.0
    return scores.topk(k, dim=1).indices.int()


class Table:
    def __init__(self, copy_gbs, mm_tflops):
        self.copy_gbs, self.mm_tflops = copy_gbs, mm_tflops
        self.rows, self.left_out = [], []

    def add(self, op, shape, T, routing, ours, ref=None, theirs=None, nbytes=None, flops=None):
        if flops is not None:
            rate = flops / ours / 1e9
            achieved, pct = f"{rate:.1f} TFLOP/s", 100 * rate / self.mm_tflops
        else:
            rate = nbytes / ours / 1e6
            achieved, pct = f"{rate:.0f} GB/s", 100 * rate / self.copy_gbs
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        speed = "-" if ref is None else f"{ref / ours:.2f}x"
        vs_torch = "-" if theirs is None else f"{theirs / ours:.2f}x"
        self.rows.append([op, shape, str(T), routing, fmt(ours), fmt(ref), speed, fmt(theirs),
                          vs_torch, achieved, f"{pct:.0f}%"])

    def print(self):
        head = ["op", "shape", "T", "routing", "ours ms", "ref ms", "vs ref", "torch ms",
                "vs torch", "achieved", "% ceiling"]
        print(f"\nceilings: device copy {self.copy_gbs:.0f} GB/s, bf16 matmul "
              f"{self.mm_tflops:.1f} TFLOP/s")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in self.rows:
            print("| " + " | ".join(row) + " |")
        if self.left_out:
            print(f"\nleft out for time ({len(self.left_out)}): " + "; ".join(self.left_out))


def bench_route(table, T, name, E, k, options, gen, skew=False):
    logits = torch.randn(T, E, generator=gen, device=DEVICE).bfloat16()
    if skew:  # every row picks expert 0 first: one count takes T picks (see GPU_NOTES v3)
        logits[:, 0] += 8.0
    bias = options.pop("bias", None)
    args = (k, options.get("score", "softmax"), True, bias, options.get("num_groups"),
            options.get("topk_groups"), options.get("scale", 1.0))
    ours = cuda_time_ms(lambda: smoe_ops.route(logits, *args))
    ref = cuda_time_ms(lambda: reference.route(logits, *args))
    nbytes = T * E * 2 + T * k * (4 + 4) + E * 4
    table.add("route", name, T, "skewed" if skew else "uniform", ours, ref, nbytes=nbytes)


def bench_layer_ops(table, model, T, skew, gen, gmm):
    H, I, E, k = MODELS[model]
    routing = "skewed" if skew else "uniform"
    ids = routed_ids(T, E, k, skew, gen)
    N = T * k
    d = smoe_ops.dispatch(ids, E)
    d_ref = reference.dispatch(ids, E)
    table.add("dispatch", model, T, routing, cuda_time_ms(lambda: smoe_ops.dispatch(ids, E)),
              cuda_time_ms(lambda: reference.dispatch(ids, E)), nbytes=N * 4 * 3 + 8 * (E + 1))

    x = torch.randn(T, H, generator=gen, device=DEVICE).bfloat16()
    table.add("permute", model, T, routing, cuda_time_ms(lambda: smoe_ops.permute(x, d)),
              cuda_time_ms(lambda: reference.permute(x, d_ref)), nbytes=2 * N * H * 2)
    ys = torch.randn(N, H, generator=gen, device=DEVICE).bfloat16()
    w = torch.rand(T, k, generator=gen, device=DEVICE)
    table.add("unpermute", model, T, routing,
              cuda_time_ms(lambda: smoe_ops.unpermute(ys, d, w)),
              cuda_time_ms(lambda: reference.unpermute(ys, d_ref, w)),
              nbytes=(N + T) * H * 2)

    xs = smoe_ops.permute(x, d)
    w_in = (torch.randn(E, H, 2 * I, generator=gen, device=DEVICE) / H**0.5).bfloat16()
    ends = d.offsets[1:].int()
    theirs = None
    if gmm is not None:
        try:
            theirs = cuda_time_ms(lambda: gmm(xs, w_in, ends))
        except RuntimeError as err:  # e.g. no kernel for this card or alignment
            table.left_out.append(f"torch grouped_mm {model} T={T}: {str(err)[:80]}")
    flops = 2 * N * H * 2 * I
    table.add("grouped_mm up", model, T, routing,
              cuda_time_ms(lambda: smoe_ops.grouped_mm(xs, w_in, d.offsets)),
              cuda_time_ms(lambda: reference.grouped_mm(xs, w_in, d.offsets)), theirs,
              flops=flops)
    if T == 4096 and not skew:
        # The same product on the register-staged loader (version 1's tile): a w one element
        # off 16-byte alignment cannot take the cp.async path. The pair of rows is the gain of
        # the pipelined tile (benchmarks/GPU_NOTES.md, version 2).
        flat = torch.empty(w_in.numel() + 1, dtype=w_in.dtype, device=DEVICE)
        w_staged = flat[1:].view(w_in.shape).copy_(w_in)
        table.add("grouped_mm up, staged", model, T, routing,
                  cuda_time_ms(lambda: smoe_ops.grouped_mm(xs, w_staged, d.offsets)),
                  flops=flops)
    gate_up = smoe_ops.grouped_mm(xs, w_in, d.offsets)
    table.add("swiglu", model, T, routing, cuda_time_ms(lambda: smoe_ops.swiglu(gate_up)),
              cuda_time_ms(lambda: reference.swiglu(gate_up)), nbytes=N * 3 * I * 2)

    # Backward GEMMs of the up projection: grad_x (grouped rows) and grad_w (per expert).
    grad = torch.randn_like(gate_up)
    op = torch.ops.smoe_ops.grouped_mm_backward
    table.add("grouped_mm dx", model, T, routing,
              cuda_time_ms(lambda: op(grad, xs, w_in, d.offsets, [True, False, False])),
              flops=flops)
    table.add("grouped_mm dw", model, T, routing,
              cuda_time_ms(lambda: op(grad, xs, w_in, d.offsets, [False, True, False])),
              flops=flops)


def bench_moe_ffn(table, model, T, gen):
    H, I, E, k = MODELS[model]
    x = torch.randn(T, H, generator=gen, device=DEVICE).bfloat16().requires_grad_()
    router = (torch.randn(H, E, generator=gen, device=DEVICE) / H**0.5).bfloat16()
    w_in = (torch.randn(E, H, 2 * I, generator=gen, device=DEVICE) / H**0.5).bfloat16()
    w_out = (torch.randn(E, I, H, generator=gen, device=DEVICE) / I**0.5).bfloat16()
    params = [t.requires_grad_() for t in (router, w_in, w_out)]

    def step(fn):
        y, aux = fn(x, *params, k)
        (y.float().square().mean() + aux.balance).backward()

    ours = cuda_time_ms(lambda: step(smoe_ops.moe_ffn), groups=3)
    ref = cuda_time_ms(lambda: step(reference.moe_ffn), groups=3)
    flops = 3 * 2 * T * k * H * 3 * I  # fwd + 2 bwd GEMMs, up (2I) + down (I)
    table.add("moe_ffn fwd+bwd", model, T, "uniform", ours, ref, flops=flops)


def main(argv=None):
    global DEVICE, SMOKE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for op rows")
    parser.add_argument("--quick", action="store_true", help="few sizes")
    parser.add_argument("--smoke", action="store_true",
                        help="every row once at shapes / 64: tests the script, not the card")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    DEVICE, SMOKE = args.device, args.smoke
    MODELS.update({name: (H // 64, I // 64, E, k) if SMOKE else (H, I, E, k)
                   for name, (H, I, E, k) in FULL_MODELS.items()})
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    copy_gbs, mm_tflops = ceilings()
    table = Table(copy_gbs, mm_tflops)
    deadline = time.perf_counter() + args.budget

    def within_budget(label):
        if time.perf_counter() < deadline:
            return True
        table.left_out.append(label)
        return False

    route_T = [1, 64, 4096] if args.quick else [1, 64, 4096, 65536]
    layer_T = [128, 4096] if args.quick else [1, 128, 4096, 32768]
    ffn_T = {"qwen3": 4096, "olmoe": 4096, "mixtral": 1024}
    if SMOKE:
        route_T, layer_T, ffn_T = [1, 64, 4096], [1, 4096], dict.fromkeys(ffn_T, 64)
    for T in route_T:
        ds = dict(DEEPSEEK_ROUTER)
        E, k = ds.pop("E"), ds.pop("k")
        ds["bias"] = torch.randn(E, generator=gen, device=DEVICE) * 0.1
        if within_budget(f"route deepseek T={T}"):
            bench_route(table, T, "deepseek-v3", E, k, ds, gen)
        for model in ("qwen3", "mixtral"):
            _, _, E, k = MODELS[model]
            if within_budget(f"route {model} T={T}"):
                bench_route(table, T, model, E, k, {}, gen)
        if T >= 4096 and within_budget(f"route qwen3 skewed T={T}"):
            _, _, E, k = MODELS["qwen3"]
            bench_route(table, T, "qwen3", E, k, {}, gen, skew=True)

    gmm = torch_grouped_mm()
    for model in ("qwen3", "olmoe", "mixtral"):
        for T in layer_T:
            for skew in (False, True):
                label = f"{model} T={T} {'skewed' if skew else 'uniform'}"
                if within_budget(label):
                    bench_layer_ops(table, model, T, skew, gen, gmm)
                    empty_cache()
    for model, T in ffn_T.items():
        if within_budget(f"moe_ffn {model} T={T}"):
            bench_moe_ffn(table, model, T, gen)
            empty_cache()
    table.print()


if __name__ == "__main__":
    main()
