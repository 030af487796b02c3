#!/usr/bin/env bash
# Overhead benchmarks of allocprof against the unprofiled allocators and its peers.
#
#   benches/run.sh            # everything: build, workloads table, instruction counts, cache
#                             # model, criterion, first export
#   benches/run.sh workloads  # only the whole-process table
#   benches/run.sh micro      # only criterion and first_export
#   benches/run.sh instructions  # the workload pairs' instruction counts (valgrind)
#   benches/run.sh cachesim   # a sample's cost in simulated cache misses (valgrind)
#
# Two builds: `default` (no frame pointers: allocprof picks its DWARF unwinder) in
# target/, and `frame-pointers` (RUSTFLAGS=-Cforce-frame-pointers=yes: allocprof walks
# frame pointers) in target-fp/. RUNS (default 31) alternating pairs per cell, each
# process at SCALE (default 0.1) of the workload's iterations (see overhead.py).
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-all}
RUNS=${RUNS:-31}
SCALE=${SCALE:-0.1}
FP_FLAGS="-C force-frame-pointers=yes"

# The code measured: the commit, marked "+ uncommitted changes" when the tree differs from it
# (a runs file must say which code it measured).
if code=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD -- .. || code="$code + uncommitted changes"
else
    code="unknown (not a git checkout)"
fi
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(rustc --version); code of $code; \`benches/run.sh $what\`"

cargo build -q --release --bins
RUSTFLAGS="$FP_FLAGS" CARGO_TARGET_DIR=target-fp cargo build -q --release --bins

if [[ $what == all || $what == workloads ]]; then
    python3 overhead.py --runs "$RUNS" --scale "$SCALE" default=target/release frame-pointers=target-fp/release
fi

if [[ $what == all || $what == instructions ]]; then
    python3 instructions.py default=target/release frame-pointers=target-fp/release
fi

if [[ $what == all || $what == cachesim ]]; then
    for d in target/release target-fp/release; do
        for w in churn large; do
            echo
            echo "## $d"
            python3 cachesim.py --workload "$w" --functions 12 "$d"
        done
    done
fi

if [[ $what == all || $what == micro ]]; then
    cargo bench -q --bench unsampled >/dev/null
    for u in dwarf libgcc; do
        ALLOCPROF_UNWINDER=$u BENCH_BUILD=default cargo bench -q --bench sampled >/dev/null
    done
    for u in fp dwarf libgcc; do
        ALLOCPROF_UNWINDER=$u BENCH_BUILD=frame-pointers RUSTFLAGS="$FP_FLAGS" \
            CARGO_TARGET_DIR=target-fp cargo bench -q --bench sampled >/dev/null
    done
    cargo bench -q --bench export >/dev/null
    echo
    python3 micro.py target/criterion target-fp/criterion
    echo
    python3 first_export.py target/release/first_export
fi
