#!/usr/bin/env python3
"""Summarises criterion's estimates (median point estimates) into markdown tables.

Usage: micro.py CRITERION_DIR [CRITERION_DIR ...]
"""
import json
import os
import sys


def estimates(root):
    """{benchmark id: median ns} for every benchmark under a criterion directory."""
    out = {}
    for dirpath, _, files in os.walk(root):
        if "estimates.json" in files and os.path.basename(dirpath) == "new":
            with open(os.path.join(dirpath, "benchmark.json")) as f:
                bid = json.load(f)["full_id"]
            with open(os.path.join(dirpath, "estimates.json")) as f:
                out[bid] = json.load(f)["median"]["point_estimate"]
    return out


def fmt(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"


def main():
    est = {}
    for root in sys.argv[1:]:
        est.update(estimates(root))
    sizes = [16, 64, 256, 1024, 4096, 16384, 65536]
    if any(k.startswith("unsampled_pair/") for k in est):
        print("Unsampled alloc+free pair, added cost over System (allocprof − system), "
              "per pair per thread:\n")
        print("| threads | variant | " + " | ".join(f"{s} B" for s in sizes) + " |")
        print("|---|---|" + "---|" * len(sizes))
        for t in (1, 2):
            g = f"unsampled_pair/{t}t"
            base = [est.get(f"{g}/system/{s}") for s in sizes]
            print(f"| {t} | System itself | " + " | ".join(
                fmt(b) if b is not None else "–" for b in base) + " |")
            for v, label in (("allocprof", "+ allocprof, 512 KiB rate"),
                             ("allocprof_off", "+ allocprof, sampling off")):
                cells = []
                for s, b in zip(sizes, base):
                    x = est.get(f"{g}/{v}/{s}")
                    cells.append("–" if x is None or b is None else f"{x - b:+.1f} ns")
                print(f"| {t} | {label} | " + " | ".join(cells) + " |")
        print()
    sampled = sorted(k for k in est if k.startswith("sampled_alloc/"))
    if sampled:
        print("One sampled allocation (alloc+free of 64 B at rate 1), by stack depth:\n")
        print("| build | unwinder | depth 10 | depth 30 | depth 60 |")
        print("|---|---|---|---|---|")
        groups = sorted({k.rsplit("/", 2)[0] for k in sampled})
        for g in groups:
            _, build, unw = g.split("/")
            cells = [fmt(est[f"{g}/depth/{d}"]) if f"{g}/depth/{d}" in est else "–"
                     for d in (10, 30, 60)]
            print(f"| {build} | {unw} | " + " | ".join(cells) + " |")
        print()
    if any(k.startswith("export/") for k in est):
        print("Export (symbols cached), by unique stacks:\n")
        print("| | 1k | 10k | 100k |")
        print("|---|---|---|---|")
        for v, label in (("heap_pprof", "`heap_pprof()` (snapshot, symbolize, build, encode, gzip)"),
                         ("encode", "`pprof::encode` of a built profile")):
            print(f"| {label} | " + " | ".join(
                fmt(est[f"export/{v}/{n}"]) if f"export/{v}/{n}" in est else "–"
                for n in (1000, 10000, 100000)) + " |")
        print()


if __name__ == "__main__":
    main()
