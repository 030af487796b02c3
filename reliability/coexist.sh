#!/usr/bin/env bash
# Coexistence (issue 6): the `pprof` crate's CPU profiler at 1 kHz next to allocprof at
# sample rate 1 with profiles requested continuously, for 30 s. Fails on a deadlock
# (a watchdog inside the program, exit 2, prints every thread's stack when gdb is
# installed), a crash, or a hang past the outer timeout.
#
#   reliability/coexist.sh               # 30 s
#   SECONDS_TO_RUN=120 reliability/coexist.sh
#   BIN=coexist_system reliability/coexist.sh   # the control: plain System allocator
#
# Builds the standalone crate reliability/ with feature `cpu` (pulls in pprof); the
# first build takes a few minutes, the run itself SECONDS_TO_RUN plus a few seconds.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/../target-rel}"
bin="${BIN:-coexist}"
cargo build --release --quiet --features cpu --bin "$bin"
secs="${SECONDS_TO_RUN:-30}"
timeout --signal=KILL "$((secs + 120))" \
    "$CARGO_TARGET_DIR/release/$bin" --seconds "$secs" --threads "${THREADS:-4}" \
    --blocklist "${BLOCKLIST:-1}"
