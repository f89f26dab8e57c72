"""Timing, machine ceilings and the fixed row schema shared by every benchmark.

A benchmark case times our op and its reference in the same run, interleaved, and reports:
median time, spread (interquartile range over the median), throughput (GB/s or GFLOP/s), the
ratio reference / ours, and the percentage of this machine's measured ceiling for the same
work (large-copy GB/s for memory-bound ops, dense at::mm GFLOP/s for GEMM-bound ones).
"""

import csv
import dataclasses
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

from smoe_ops._io import write_atomically

SCHEMA = [
    "op", "shape", "dtype", "device", "backend", "median_us", "spread", "throughput", "unit",
    "ratio_vs_ref", "pct_ceiling", "ceiling", "git_sha",
]  # fmt: skip


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


def time_fn(fn: Callable[[], object], min_time_s: float = 0.02) -> float:
    """Seconds per call of a warmed-up `fn`, averaged over enough calls to last `min_time_s`."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    iters = int(min_time_s / max(once, 1e-7))
    if iters <= 1:
        return once
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def time_pair(ours, ref, repeats: int, min_time_s: float = 0.02):
    """Interleaved samples of ours and the reference, so drift hits both alike."""
    ours()  # warm-up: first-call allocations, lazy initialization, compilation
    if ref is not None:
        ref()
    ours_s, ref_s = [], []
    for _ in range(repeats):
        ours_s.append(time_fn(ours, min_time_s))
        if ref is not None:
            ref_s.append(time_fn(ref, min_time_s))
    return ours_s, ref_s


def median_spread(samples):
    med = statistics.median(samples)
    if len(samples) < 4:
        return med, (max(samples) - min(samples)) / med
    q = statistics.quantiles(samples, n=4)
    return med, (q[2] - q[0]) / med


_CEILING_CACHE: dict = {}


def copy_bandwidth_gbs(repeats: int = 5) -> float:
    """Large-copy bandwidth (read + write bytes per second) with all threads, best of N."""
    if "copy" not in _CEILING_CACHE:
        src = torch.randn(64 * 1024 * 1024 // 4 * 4)  # 256 MiB
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = min(time_fn(lambda: dst.copy_(src), 0.2) for _ in range(repeats))
        _CEILING_CACHE["copy"] = 2 * src.numel() * 4 / best / 1e9
    return _CEILING_CACHE["copy"]


def dense_gemm_gflops(m: int, k: int, n: int, dtype=torch.float32, repeats: int = 5) -> float:
    """GFLOP/s of one dense at::mm of the same dtype and total FLOPs ([m, k] @ [k, n])."""
    key = ("mm", m, k, n, dtype)
    if key not in _CEILING_CACHE:
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        torch.mm(a, b)
        best = min(time_fn(lambda: torch.mm(a, b), 0.1) for _ in range(repeats))
        _CEILING_CACHE[key] = 2 * m * k * n / best / 1e9
    return _CEILING_CACHE[key]


@dataclasses.dataclass
class Case:
    """One benchmark case. `work` is bytes moved (unit GB/s) or FLOPs (unit GFLOP/s)."""

    op: str
    shape: str
    dtype: torch.dtype
    ours: Callable[[], object]
    ref: Optional[Callable[[], object]]
    work: float
    unit: str  # "GB/s" or "GFLOP/s"
    ceiling: Callable[[], float]  # the machine's ceiling for this work, same unit
    ceiling_name: str


def run_case(case: Case, repeats: int, sha: str) -> dict:
    ours_s, ref_s = time_pair(case.ours, case.ref, repeats)
    med, spread = median_spread(ours_s)
    throughput = case.work / med / 1e9
    ceiling = case.ceiling()
    ratio = statistics.median(ref_s) / med if ref_s else float("nan")
    return {
        "op": case.op,
        "shape": case.shape,
        "dtype": str(case.dtype).replace("torch.", ""),
        "device": "cpu",
        "backend": "smoe_ops",
        "median_us": med * 1e6,
        "spread": spread,
        "throughput": throughput,
        "unit": case.unit,
        "ratio_vs_ref": ratio,
        "pct_ceiling": 100 * throughput / ceiling,
        "ceiling": f"{case.ceiling_name} {ceiling:.1f} {case.unit}",
        "git_sha": sha,
    }


def write_csv(rows, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SCHEMA)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows) -> str:
    head = "| op | shape | dtype | median | spread | throughput | vs ref | % ceiling | ceiling |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ratio = "-" if math.isnan(r["ratio_vs_ref"]) else f"{r['ratio_vs_ref']:.2f}x"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {format_time(r['median_us'])} | "
            f"{100 * r['spread']:.0f}% | {r['throughput']:.1f} {r['unit']} | "
            f"{ratio} | {r['pct_ceiling']:.0f}% | {r['ceiling']} |"
        )
    return "\n".join(lines)


def format_time(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} us"


def publish(text: str, output: str) -> None:
    """Print a generated document and, unless `output` is "-", write it there atomically
    (a doc is never left half-written by an interrupted run)."""
    sys.stdout.write(text)
    if output != "-":
        write_atomically(output, text)
