"""What a fresh output costs on this machine: writing into new memory vs memory reused.

    python -m benchmarks.alloc_cost                         # glibc defaults
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        python -m benchmarks.alloc_cost                     # freed memory kept for reuse

glibc maps allocations above its mmap threshold (dynamic, at most 32 MiB) as fresh pages and
unmaps them on free, so each such op output pays a page fault per 4 KiB page on first touch.
This script separates that cost from the copy itself; benchmarks/run.py cites it.
"""

import statistics
import time

import torch


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def main() -> None:
    print("| size | fill new tensor | fill reused tensor | clone | copy_ into reused |")
    print("|---|---|---|---|---|")
    for mib in (8, 32, 128):
        numel = mib * 1024 * 1024 // 4
        src, reused = torch.randn(numel), torch.empty(numel)
        fresh = median_ms(lambda: torch.empty(numel).fill_(1))
        refill = median_ms(lambda: reused.fill_(1))
        clone = median_ms(lambda: src.clone())
        copy = median_ms(lambda: reused.copy_(src))
        print(f"| {mib} MiB | {fresh:.2f} ms | {refill:.2f} ms | {clone:.2f} ms | {copy:.2f} ms |")


if __name__ == "__main__":
    main()
