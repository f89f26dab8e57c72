"""Benchmark runner: sweeps every op family, prints a markdown table, writes CSV and markdown.

    python -m benchmarks.run --quick                    # the README's main job, about a minute
    python -m benchmarks.run --memory --out docs        # the full sweep behind docs/benchmarks.md
"""

import argparse
import json
import logging
import os
import subprocess
import sys

import torch
from tqdm import tqdm

from benchmarks import (
    bench_activation,
    bench_dispatch,
    bench_grouped_mm,
    bench_moe,
    bench_routing,
    targets,
)
from benchmarks.common import git_sha, machine, markdown_table, run_case, write_csv

# glibc serves allocations above 32 MiB with fresh mmap pages and returns them on free, so
# every large op output pays first-touch page faults; on this VM they cost about 10x the
# copy itself (128 MiB: 47 ms fresh vs 5 ms reused). These tunables keep freed memory in
# the heap for reuse, as a caching allocator (jemalloc, tcmalloc) does in production. They
# apply alike to our ops and the references; `--malloc system` measures without them.
REUSE_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(512 << 20),
}

FAMILIES = {
    "routing": bench_routing,
    "dispatch": bench_dispatch,
    "grouped_mm": bench_grouped_mm,
    "activation": bench_activation,
    "moe": bench_moe,
}


def memory_table(rows) -> str:
    lines = [
        "Peak resident memory added by one moe_ffn forward + backward step (best of 3):",
        "",
        "| shape | smoe_ops | reference loop | ratio |",
        "|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["ours_mib"] / r["ref_mib"]
        lines.append(
            f"| {r['shape']} | {r['ours_mib']:.0f} MiB | {r['ref_mib']:.0f} MiB | {ratio:.2f} |"
        )
    return "\n".join(lines)


def system_malloc_memory_rows():
    """Peak memory rows, measured in a child where glibc maps every allocation of 64 KiB or
    more on its own and unmaps it on free, so resident memory follows live tensors. (With
    memory reuse on, or glibc's default dynamic threshold, freed pages stay resident and the
    peak resident size would miss new allocations.)"""
    env = {k: v for k, v in os.environ.items() if k not in REUSE_MALLOC_ENV}
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 << 10)
    code = (
        "import json; from benchmarks.bench_moe import memory_rows; "
        "print(json.dumps(memory_rows()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small sweep, about a minute")
    parser.add_argument("--only", nargs="*", choices=sorted(FAMILIES), help="op families")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per case")
    parser.add_argument("--memory", action="store_true", help="also peak memory of moe_ffn")
    parser.add_argument("--out", default="bench_out", help="folder for benchmarks.csv/.md")
    parser.add_argument(
        "--malloc", choices=["reuse", "system"], default="reuse",
        help="reuse: glibc keeps freed memory for reuse (the default); system: glibc defaults",
    )  # fmt: skip
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.malloc == "reuse" and any(os.environ.get(k) != v for k, v in REUSE_MALLOC_ENV.items()):
        # glibc reads its tunables at start-up: run again with them set.
        env = {**os.environ, **REUSE_MALLOC_ENV}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *argv], env)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    repeats = args.repeats or (3 if args.quick else 7)
    families = args.only or list(FAMILIES)
    cases = [c for name in families for c in FAMILIES[name].cases(args.quick)]
    sha = git_sha()
    rows = [run_case(c, repeats, sha) for c in tqdm(cases, desc="benchmarks", unit="case")]
    memory = system_malloc_memory_rows() if args.memory else []

    allocator = (
        "glibc tuned to reuse freed memory (see REUSE_MALLOC_ENV in benchmarks/run.py)"
        if args.malloc == "reuse"
        else "glibc defaults (large outputs pay first-touch page faults)"
    )
    report = [
        f"Measured on: {machine()}; git {sha}; median of {repeats} samples, each the mean of",
        "enough calls to last 20 ms. Spread: interquartile range over the median.",
        f"Allocator: {allocator}.",
        "`vs ref`: reference time / our time, measured in the same run, interleaved.",
        "",
        markdown_table(rows),
    ]
    if memory:
        report += ["", memory_table(memory)]
    report += ["", "Targets (float32, this machine):", "", targets.check(rows, memory)]
    text = "\n".join(report)
    print(text)

    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, "benchmarks.csv"))
    with open(os.path.join(args.out, "benchmarks.md"), "w") as f:
        f.write(f"# Benchmarks\n\nWritten by `python -m benchmarks.run {' '.join(argv)}`.\n\n")
        f.write(text + "\n")


if __name__ == "__main__":
    main()
