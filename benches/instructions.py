#!/usr/bin/env python3
"""Instruction-count overhead table: the pairs of overhead.py, counted by valgrind.

CPU time on a shared machine moves by several points between runs of the same binary;
the number of instructions a process executes does not (for the same binary, input and
environment). This runs each binary of every pair once under
`valgrind --tool=cachegrind --cache-sim=no` at a fraction of the workload's iterations
(--scale, default 0.05) and reports profiled/baseline - 1 in instructions, and how many
instructions each profiler adds per iteration of the workload.

Instructions are not time: a cache miss costs one instruction and a hundred cycles, so
this understates what memory-bound paths cost (the live-set and table lookups of a
sampled allocation) and ignores contention between threads (valgrind runs one thread at
a time). It is the repeatable half of the picture; overhead.py is the other.

Usage: instructions.py [--scale F] [--only W,..] BUILD=DIR ...
"""
import argparse
import os
import re
import subprocess
import tempfile

from overhead import DEFAULT_ITERS, PAIRS, WORKLOADS, process_env

THREADS = 2  # src/lib.rs: THREADS


def cachegrind(binary, args, env, options):
    """Runs `binary args` under `valgrind --tool=cachegrind options` with `env` added to
    this process's (see overhead.process_env); returns valgrind's and the program's
    stderr and the lines of cachegrind's output file. Exits if the run fails."""
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            ["valgrind", "--tool=cachegrind", *options,
             f"--cachegrind-out-file={d}/cg.out", binary, *args],
            env=process_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        if out.returncode != 0:
            raise SystemExit(f"{binary} {args} failed under valgrind:\n{out.stderr}")
        with open(f"{d}/cg.out") as f:
            return out.stderr, f.readlines()


def instructions(binary, args, env):
    stderr, _ = cachegrind(binary, args, env, ["--cache-sim=no"])
    m = re.search(r"I\s+refs:\s+([\d,]+)", stderr)
    if not m:
        raise SystemExit(f"no instruction count from valgrind:\n{stderr}")
    return int(m.group(1).replace(",", ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--only", default="", help="comma-separated workloads")
    ap.add_argument("builds", nargs="+")
    a = ap.parse_args()
    builds = [b.split("=", 1) for b in a.builds]
    workloads = [w for w in WORKLOADS if not a.only or w[0] in a.only.split(",")]
    cols = [c for c, _, _ in PAIRS]
    for build, d in builds:
        rows = []
        for wl, label in workloads:
            iters = int(DEFAULT_ITERS[wl] * a.scale)
            cells = []
            for col, (pb, penv), (bb, benv) in PAIRS:
                p = instructions(os.path.join(d, pb), [wl, str(iters)], penv)
                b = instructions(os.path.join(d, bb), [wl, str(iters)], benv)
                per_iter = (p - b) / (iters * THREADS)
                cells.append(f"{100 * (p / b - 1):+.1f}% ({per_iter:+.0f})")
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        print(f"\nBuild `{build}`: instructions added, % of the baseline's "
              f"(instructions per iteration), {a.scale:g} of the iterations\n")
        print("| workload | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        print("\n".join(rows))


if __name__ == "__main__":
    main()
