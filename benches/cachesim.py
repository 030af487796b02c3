#!/usr/bin/env python3
"""A sample's cost in instructions, simulated cache misses and mispredicted branches:
in allocprof's code and in the program around it.

CPU-time ratios on this shared machine move by several points from one run to the next,
and `perf`'s shares only see the cost inside allocprof's own functions. This runs the
workload three times under `valgrind --tool=cachegrind --cache-sim=yes --branch-sim=yes`
(a simulated machine: L1 data cache 32 KiB 8-way, last level 512 KiB 8-way, i.e. this
machine's L1 and L2 of one core; valgrind runs one thread at a time):

  System, allocprof with sampling off (ALLOCPROF_SAMPLE_RATE=0), allocprof

and splits the differences by function:

* fast path: sampling off against System, everything;
* sampled path: allocprof against sampling off, split into
  - allocprof's code: functions of the allocprof crates and its `GlobalAlloc` entry
    points, and the libm and libc routines the sampler calls (log, expm1, memcmp; small
    strings' map lookups call memcmp too, and there its changes count as allocprof's);
  - the program: everything else (the workload, malloc and free). Its share is the
    indirect cost: the program's own code running with caches and a branch predictor
    that a sample disturbed.

Each figure is per sample (the profiled run's `Stats::samples`): for churn and large
buffers, what a sample and its share of the fast path cost; for small strings, with few
samples, read the fast-path row only. "est. cycles" weighs the counts with rough
latencies of this machine: 1 an instruction, 12 an L1 miss (data or instructions) that
hits the L2, 60 an L2 miss, 15 a mispredicted branch. "of which instruction" is the
part of the L1 misses that is the instruction cache's (valgrind's default: the size the
CPU reports, 32 KiB 8-way here), already weighed among them.

The sampling points and the addresses are random, so the counts move from run to run:
allocprof's rows by a few per cent, the program's row (a small difference of large
totals) by up to a factor of two. They are a model, not the machine: no prefetchers, no
TLB, no overlap of misses with other work, no L3, no kernel. So compare the cycles a
sample costs with the CPU time a sample costs (overhead.py's added time over the run's
samples), not the model's totals with the baseline's.

--l1 and --l2 set the simulated caches' sizes in bytes (8-way, 64-byte lines), e.g. half
of each to see what a job sharing the core would do to a sample's cost.

Usage: cachesim.py [--workload W] [--iters N] [--functions N] [--l1 B] [--l2 B] DIR
(DIR holds wl_system and wl_allocprof_system)
"""
import argparse
import os
import re
from collections import defaultdict

from instructions import cachegrind
from overhead import DEFAULT_ITERS

# This machine's L1 data cache and L2, of one core.
L1_BYTES, L2_BYTES = 32768, 524288
# Functions outside the allocprof crates that the sampled path calls (glibc's names).
SAMPLER_CALLEES = re.compile(r"^(__ieee754_log|log@|log$|__expm1|expm1|__memcmp|memcmp|bcmp)")
# allocprof's `GlobalAlloc` entry points (std's shims to `__rdl_*` in the System build).
ENTRY_POINTS = re.compile(r"__rust_(alloc|dealloc|realloc|alloc_zeroed)$")
WEIGHTS = {"Ir": 1, "D1": 12, "LL": 60, "Bm": 15}
# The columns printed: the weighted events, with the L1 misses' instruction part after
# them (already counted in "D1", so not weighed again).
COLUMNS = ["Ir", "D1", "I1", "LL", "Bm"]


def run(binary, args, env, sim):
    """Event totals of one cachegrind run with the options `sim`, keyed by (function,
    class), and the samples it reports. A function's lines can fall in both classes
    (allocprof's code inlined into the program's, or the reverse); each line counts in its
    own."""
    stderr, lines = cachegrind(binary, args, {**env, "BENCH_PRINT_STATS": "1"}, sim)
    totals = defaultdict(lambda: defaultdict(int))
    events, fl, fn = None, "", ""
    for line in lines:
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("fl="):
            fl = line[3:].strip()
        elif line.startswith("fn="):
            fn = line[3:].strip()
        elif line[:1].isdigit():
            key = (fn, classify(fl, fn))
            for e, v in zip(events, line.split()[1:]):
                totals[key][e] += int(v)
    m = re.search(r"\bsamples: (\d+)", stderr)
    return {key: combine(t) for key, t in totals.items()}, int(m.group(1)) if m else 0


def classify(fl, fn):
    if ("/profiler/src/" in fl or "allocprof" in fn or SAMPLER_CALLEES.search(fn)
            or ENTRY_POINTS.search(fn)):
        return "allocprof"
    return "program"


def combine(t):
    """Cachegrind's events summed into the four this script reports."""
    return {
        "Ir": t["Ir"],
        "D1": t["I1mr"] + t["D1mr"] + t["D1mw"],
        "I1": t["I1mr"],
        "LL": t["DLmr"] + t["DLmw"] + t["ILmr"],
        "Bm": t["Bcm"] + t["Bim"],
    }


def delta(a, b, classes):
    """b - a per event, over the functions of `classes`."""
    def total(run):
        return {e: sum(t[e] for (_, c), t in run.items() if c in classes)
                for e in COLUMNS}
    ta, tb = total(a), total(b)
    return {e: tb[e] - ta[e] for e in COLUMNS}


def delta_by_function(a, b):
    """b - a per event for each function, both classes together."""
    d = defaultdict(lambda: dict.fromkeys(COLUMNS, 0))
    for run, sign in ((a, -1), (b, 1)):
        for (fn, _), t in run.items():
            for e in COLUMNS:
                d[fn][e] += sign * t[e]
    return d


HEADER = ("|{}| instructions | L1 misses | of which instruction | L2 misses "
          "| mispredicted branches | est. cycles |")
RULE = "|---|---|---|---|---|---|---|"


def est_cycles(d):
    return sum(WEIGHTS[e] * d[e] for e in WEIGHTS)


def row(label, d, per):
    cells = [d[e] / per for e in COLUMNS]
    return (f"| {label} | " + " | ".join(f"{c:+.1f}" for c in cells)
            + f" | {est_cycles(d) / per:+.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="churn")
    ap.add_argument("--iters", type=int, help="per thread; default 0.05 of the workload's")
    ap.add_argument("--functions", type=int, default=0,
                    help="also list the N functions adding most to the sampled path")
    ap.add_argument("--l1", type=int, default=L1_BYTES, help="L1 data cache, bytes")
    ap.add_argument("--l2", type=int, default=L2_BYTES, help="last-level cache, bytes")
    ap.add_argument("dir")
    a = ap.parse_args()
    sim = ["--cache-sim=yes", "--branch-sim=yes",
           f"--D1={a.l1},8,64", f"--LL={a.l2},8,64"]
    iters = a.iters or int(DEFAULT_ITERS[a.workload] * 0.05)
    args = [a.workload, str(iters)]
    sys_, _ = run(os.path.join(a.dir, "wl_system"), args, {}, sim)
    off, _ = run(os.path.join(a.dir, "wl_allocprof_system"), args,
                 {"ALLOCPROF_SAMPLE_RATE": "0"}, sim)
    on, samples = run(os.path.join(a.dir, "wl_allocprof_system"), args, {}, sim)
    if samples == 0:
        raise SystemExit("the profiled run reported no samples")
    both = ("allocprof", "program")
    print(f"{a.workload} {iters} per thread, {samples} samples; figures per sample\n")
    print(HEADER.format(" "))
    print(RULE)
    print(row("fast path (sampling off − System)", delta(sys_, off, both), samples))
    print(row("sampled path, allocprof's code", delta(off, on, ["allocprof"]), samples))
    print(row("sampled path, the program's code", delta(off, on, ["program"]), samples))
    print(row("allocprof − System, all", delta(sys_, on, both), samples))
    if a.functions:
        print("\nThe sampled path's largest items (sampling on − off), per sample\n")
        print(HEADER.format(" function "))
        print(RULE)
        by_fn = delta_by_function(off, on)
        ranked = sorted(by_fn.items(), key=lambda item: -abs(est_cycles(item[1])))
        for fn, d in ranked[:a.functions]:
            print(row(f"`{fn}`", d, samples))


if __name__ == "__main__":
    main()
