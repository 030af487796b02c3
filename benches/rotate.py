#!/usr/bin/env python3
"""Rotating comparison of several commands against a baseline, for experiments.

Each round runs every command once (the order rotates from round to round and reverses
every other cycle), so all variants see the same drift of a shared machine. For each
command after the first it prints the median of the per-round CPU-time ratios
command / baseline - 1 with a 95% confidence interval for that median (overhead.py's
`median_ci`). CPU time is user + system of the whole process, from wait4's rusage.

Usage: rotate.py ROUNDS 'BASELINE' 'COMMAND' ...
A command may start with NAME=VALUE environment settings, e.g.
  rotate.py 36 "target/release/wl_system churn 300000" \
      "target/release/wl_allocprof_system churn 300000" \
      "ALLOCPROF_SAMPLE_RATE=0 target/release/wl_allocprof_system churn 300000"
"""
import os
import shlex
import statistics
import subprocess
import sys

from overhead import median_ci


def cpu_seconds(spec):
    parts = shlex.split(spec)
    env = dict(os.environ)
    while parts and "=" in parts[0] and not parts[0].startswith(("/", ".")):
        k, v = parts.pop(0).split("=", 1)
        env[k] = v
    p = subprocess.Popen(parts, env=env, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"{spec} failed with status {status}")
    return ru.ru_utime + ru.ru_stime


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    rounds = int(sys.argv[1])
    cmds = sys.argv[2:]
    times = [[] for _ in cmds]
    for i in range(rounds):
        order = list(range(len(cmds)))
        k = i % len(cmds)
        order = order[k:] + order[:k]
        if (i // len(cmds)) % 2:
            order.reverse()
        for j in order:
            times[j].append(cpu_seconds(cmds[j]))
    for j in range(1, len(cmds)):
        ratios = [b / a for a, b in zip(times[0], times[j])]
        lo, hi = median_ci(ratios)
        print(f"{100 * (statistics.median(ratios) - 1):+5.1f}% "
              f"[{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]  {cmds[j]}")
    print(f"baseline median {statistics.median(times[0]):.3f} s  {cmds[0]}")


if __name__ == "__main__":
    main()
