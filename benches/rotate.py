#!/usr/bin/env python3
"""Rotating comparison of several commands against a baseline, for experiments.

Each round runs every command once (the order rotates from round to round and reverses
every other cycle), so all variants see the same drift of a shared machine. For each
command after the first it prints the median of the per-round CPU-time ratios
command / baseline - 1 with a 95% confidence interval for that median (overhead.py's
`median_ci`), with overhead.py's CPU time (user + system of the whole process).

Usage: rotate.py [--base LIST] ROUNDS 'BASELINE' 'COMMAND' ...
A command may start with NAME=VALUE environment settings, e.g.
  rotate.py 36 "target/release/wl_system churn 300000" \
      "target/release/wl_allocprof_system churn 300000" \
      "ALLOCPROF_SAMPLE_RATE=0 target/release/wl_allocprof_system churn 300000"

--base gives each command after the first the index of its own baseline (0 is BASELINE,
1 the first COMMAND, ...), comma-separated; a command whose baseline is itself is only
timed. So that two builds run in one rotation, each against its own System:
  rotate.py --base 0,0,3,3 150 "target/release/wl_system churn 300000" \
      "target/release/wl_allocprof_system churn 300000" \
      "ALLOCPROF_SAMPLE_RATE=0 target/release/wl_allocprof_system churn 300000" \
      "target-fp/release/wl_system churn 300000" \
      "target-fp/release/wl_allocprof_system churn 300000"
"""
import shlex
import statistics
import sys

from overhead import cpu_seconds, median_ci


def run(spec):
    """CPU seconds of one run of `spec`: leading NAME=VALUE settings, then the command."""
    parts = shlex.split(spec)
    env = {}
    while parts and "=" in parts[0] and not parts[0].startswith(("/", ".")):
        k, v = parts.pop(0).split("=", 1)
        env[k] = v
    return cpu_seconds(parts[0], parts[1:], env)


def main():
    args = sys.argv[1:]
    bases = None
    if args[:1] == ["--base"] and len(args) > 1:
        bases = [int(b) for b in args[1].split(",")]
        args = args[2:]
    if len(args) < 3:
        raise SystemExit(__doc__)
    rounds = int(args[0])
    cmds = args[1:]
    bases = [0] + (bases if bases is not None else [0] * (len(cmds) - 1))
    if len(bases) != len(cmds) or not all(0 <= b < len(cmds) for b in bases):
        raise SystemExit("--base needs one index below the number of commands per COMMAND")
    times = [[] for _ in cmds]
    for i in range(rounds):
        order = list(range(len(cmds)))
        k = i % len(cmds)
        order = order[k:] + order[:k]
        if (i // len(cmds)) % 2:
            order.reverse()
        for j in order:
            times[j].append(run(cmds[j]))
    for j in range(1, len(cmds)):
        if bases[j] == j:
            continue
        ratios = [b / a for a, b in zip(times[bases[j]], times[j])]
        lo, hi = median_ci(ratios)
        against = f"  (against {bases[j]})" if bases[j] else ""
        print(f"{100 * (statistics.median(ratios) - 1):+5.1f}% "
              f"[{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]  {cmds[j]}{against}")
    for j, cmd in enumerate(cmds):
        med = statistics.median(times[j])
        # Short runs (start-up costs) need milliseconds to more places than seconds give.
        shown = f"{med:.3f} s" if med >= 0.1 else f"{1e3 * med:.3f} ms"
        print(f"{j}: median {shown}  {cmd}")


if __name__ == "__main__":
    main()
