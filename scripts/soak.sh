#!/usr/bin/env bash
# Soak benchmark (issue 6): minutes of allocation churn with a heap and an allocs profile
# requested every second; shows that the profiler's own memory (Stats::profiler_bytes)
# stays flat. Not part of `cargo test`: it runs for 10 minutes by default.
#
#   scripts/soak.sh                      # 600 s, 4 churn threads, rate 4096 B
#   SECONDS_TO_RUN=60 THREADS=2 scripts/soak.sh
#
# Prints a line every 30 s and a summary; exits non-zero if profiler_bytes grew by more
# than 1 MiB after the first minute. The full output is also written to
# target-rel/soak.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-rel}"
cargo build --release --quiet --manifest-path reliability/Cargo.toml --bin soak
mkdir -p "$CARGO_TARGET_DIR"
"$CARGO_TARGET_DIR/release/soak" \
    --seconds "${SECONDS_TO_RUN:-600}" \
    --threads "${THREADS:-4}" \
    --rate "${RATE:-4096}" \
    --warmup "${WARMUP:-60}" | tee "$CARGO_TARGET_DIR/soak.log"
