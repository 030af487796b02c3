#!/usr/bin/env python3
"""The export of a profile with and without symbols cached, by number of unique stacks.

The symbol cache is process-wide and cannot be emptied, so the cold export is timed in a
fresh process each time: `first_export N` builds a profile of N unique stacks, times its
first `heap_pprof()` (cold: the binary's debug information is loaded and parsed) and its
second (symbols cached), and reports the growth of the resident set and of its peak
across the first. This script runs it RUNS times per size, sizes interleaved, and prints
the medians as a markdown table.

Usage: first_export.py BINARY [RUNS]
"""
import re
import statistics
import subprocess
import sys

SIZES = (1_000, 10_000, 100_000)
FIELDS = (
    ("first_ms", "first export, cold symbol cache", "ms"),
    ("second_ms", "second export, symbols cached", "ms"),
    ("peak_growth_mib", "peak resident set growth across the first", "MiB"),
    ("rss_growth_mib", "resident set growth after the first", "MiB"),
)


def run(binary, n):
    """first_export's key=value fields for one process."""
    out = subprocess.run([binary, str(n)], check=True, capture_output=True, text=True).stdout
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", out)}


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    binary = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    results = {n: [] for n in SIZES}
    for _ in range(runs):
        for n in SIZES:
            results[n].append(run(binary, n))
    for n in SIZES:
        fewest = min(int(r["stacks"]) for r in results[n])
        if fewest < n:
            raise SystemExit(f"first_export {n} built only {fewest} unique stacks")
    print(f"Export of N unique stacks, with and without symbols cached (`first_export`, "
          f"a fresh process each, median of {runs}):\n")
    print("| | " + " | ".join(f"{n // 1000}k" for n in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for key, label, unit in FIELDS:
        cells = [f"{statistics.median(r[key] for r in results[n]):.1f} {unit}" for n in SIZES]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
