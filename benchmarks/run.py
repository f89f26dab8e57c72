"""Benchmark runner: sweeps every op family, prints a markdown table, writes CSV and markdown.

    python -m benchmarks.run --quick            # the README's main job, about a minute
    python -m benchmarks.run --out docs         # the full sweep behind docs/benchmarks.md
"""

import argparse
import logging
import os

import torch
from tqdm import tqdm

from benchmarks import bench_activation
from benchmarks.common import git_sha, machine, markdown_table, run_case, write_csv

FAMILIES = {"activation": bench_activation}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small sweep, about a minute")
    parser.add_argument("--only", nargs="*", choices=sorted(FAMILIES), help="op families")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per case")
    parser.add_argument("--out", default="bench_out", help="folder for results.csv/.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    repeats = args.repeats or (5 if args.quick else 9)
    families = args.only or list(FAMILIES)
    cases = [c for name in families for c in FAMILIES[name].cases(args.quick)]
    sha = git_sha()
    rows = [run_case(c, repeats, sha) for c in tqdm(cases, desc="benchmarks", unit="case")]

    table = markdown_table(rows)
    header = f"Measured on: {machine()}; git {sha}; median of {repeats} samples.\n\n"
    print(header + table)
    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, "results.csv"))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + table + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
