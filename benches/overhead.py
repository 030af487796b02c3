#!/usr/bin/env python3
"""Whole-process overhead table: each profiler against its own unprofiled allocator.

For every build, workload and pair (profiled, baseline), runs the two processes
alternately --runs times (the order inside a pair alternates too), measures each
process's CPU time (user + system, from wait4's rusage: the whole process, all threads),
and reports the median of the per-pair ratios profiled/baseline - 1, with a 95%
confidence interval for that median (distribution-free: order statistics of the ratios).

On a shared machine a process's CPU time moves with its neighbours' load, by 10-30% over
tens of seconds. Many short pairs (--scale 0.1, --runs 31: run.sh's default) see the same
drift on both sides of each pair and give a median that repeats within a few points,
where a few long pairs (each run seconds long) did not.

Usage: overhead.py [--runs N] [--scale F] [--only W,..] [--columns C,..] BUILD=DIR ...
"""
import argparse
import math
import os
import statistics
import subprocess
import sys

WORKLOADS = [
    ("strings", "small strings (`format!` + map lookup)"),
    ("churn", "cache-like churn, 8 B–128 KiB, 10k live slots"),
    ("large", "large buffers 256 KiB–4 MiB"),
    ("service", "HTTP service: hyper server + client, loopback"),
]
DEFAULT_ITERS = {"strings": 8_000_000, "churn": 3_000_000, "large": 200_000,
                 "service": 30_000}

JEMALLOC_PROF = {"_RJEM_MALLOC_CONF": "prof:true,lg_prof_sample:19"}

# column name -> (profiled binary, profiled env, baseline binary, baseline env)
PAIRS = [
    ("allocprof / System", ("wl_allocprof_system", {}), ("wl_system", {})),
    ("allocprof / jemalloc", ("wl_allocprof_jemalloc", {}), ("wl_jemalloc", {})),
    ("jemalloc prof", ("wl_jemalloc", JEMALLOC_PROF), ("wl_jemalloc", {})),
    ("mimalloc-pprof", ("wl_mimalloc_pprof", {"BENCH_PROFILE": "1"}), ("wl_mimalloc_pprof", {})),
    ("pprof-alloc", ("wl_pprof_alloc", {}), ("wl_system", {})),
]


def process_env(env):
    """This process's environment without the peers' profiling switches, plus `env`."""
    full_env = dict(os.environ)
    for k in ("_RJEM_MALLOC_CONF", "BENCH_PROFILE", "MALLOC_CONF"):
        full_env.pop(k, None)
    full_env.update(env)
    return full_env


def cpu_seconds(binary, args, env):
    p = subprocess.Popen([binary] + args, env=process_env(env), stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"{binary} {args} failed with status {status}")
    return ru.ru_utime + ru.ru_stime


def median_ci(xs, level=0.95):
    """A distribution-free confidence interval for the median of `xs`: the order
    statistics x_(k), x_(n-k+1) for the largest k whose coverage,
    1 - 2 P(Binomial(n, 1/2) <= k - 1), is at least `level`."""
    xs = sorted(xs)
    n = len(xs)
    k = 0
    while True:
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
        if 1 - 2 * tail < level:
            break
        k += 1
    return xs[k - 1] if k else xs[0], xs[n - k] if k else xs[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--only", default="", help="comma-separated workloads")
    ap.add_argument("--columns", default="",
                    help="comma-separated column names (quick checks; the table needs all)")
    ap.add_argument("builds", nargs="+")
    a = ap.parse_args()
    builds = [b.split("=", 1) for b in a.builds]
    workloads = [w for w in WORKLOADS if not a.only or w[0] in a.only.split(",")]
    results = {}  # (build, workload, column) -> (median ratio, med prof s, med base s)
    for build, d in builds:
        for wl, _ in workloads:
            iters = str(int(DEFAULT_ITERS[wl] * a.scale))
            for col, (pb, penv), (bb, benv) in PAIRS:
                if a.columns and col not in a.columns.split(","):
                    continue
                ratios, ps, bs = [], [], []
                for r in range(a.runs):
                    order = [(True, pb, penv), (False, bb, benv)]
                    if r % 2:
                        order.reverse()
                    t = {}
                    for prof, b, env in order:
                        t[prof] = cpu_seconds(os.path.join(d, b), [wl, iters], env)
                    ratios.append(t[True] / t[False])
                    ps.append(t[True])
                    bs.append(t[False])
                res = (statistics.median(ratios), statistics.median(ps), statistics.median(bs),
                       median_ci(ratios))
                results[(build, wl, col)] = res
                lo, hi = res[3]
                print(f"# {build:8} {wl:8} {col:22} {100 * (res[0] - 1):+7.1f}%  "
                      f"[{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]  "
                      f"({res[1]:.3f} s vs {res[2]:.3f} s; ratios "
                      + " ".join(f"{x:.3f}" for x in ratios) + ")",
                      file=sys.stderr, flush=True)
    if a.columns:
        return
    cols = [c for c, _, _ in PAIRS]
    for build, _ in builds:
        print(f"\nBuild `{build}`: CPU-time overhead, median of {a.runs} alternating pairs at "
              f"{a.scale:g} of the iterations [95% confidence interval of the median]\n")
        print("| workload | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for wl, label in workloads:
            cells = []
            for c in cols:
                m, _, _, (lo, hi) = results[(build, wl, c)]
                cells.append(f"{100 * (m - 1):+.1f}% [{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]")
            print(f"| {label} | " + " | ".join(cells) + " |")
        print("\nBaseline CPU seconds (median): " + "; ".join(
            f"{wl}: System {results[(build, wl, cols[0])][2]:.2f}, "
            f"jemalloc {results[(build, wl, cols[1])][2]:.2f}, "
            f"mimalloc {results[(build, wl, cols[3])][2]:.2f}"
            for wl, _ in workloads))


if __name__ == "__main__":
    main()
