"""A steady loop of route for a sampling profiler: where inside the kernel does time go?

    perf record -o /tmp/route.data python -m benchmarks.profile_route
    perf report -i /tmp/route.data --stdio | head -20
    SMOE_OPS_NO_AVX512=1 perf record ... python -m benchmarks.profile_route   # scalar path

One thread, so the shares are of one core's time. docs/cpu-performance.md quotes the share
of the key selection from this profile: TopK::select with the scalar compaction inlined
about 25%; with AVX-512, TopK::select about 6% plus keep_at_least_avx512 about 4%.
"""

import argparse

import torch

import smoe_ops
from benchmarks.workloads import make_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--calls", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logits = make_logits(args.tokens, args.experts, args.k, "uniform")
    for _ in range(args.calls):
        smoe_ops.route(logits, args.k)


if __name__ == "__main__":
    main()
