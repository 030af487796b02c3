#!/usr/bin/env bash
# Memory safety (issue 6): the multi-threaded stress program (reliability/src/bin/stress.rs:
# threads allocating, reallocating and freeing each other's blocks at sample rate 1 and
# 4096, short-lived threads, profiles exported concurrently) under valgrind's memcheck.
# Fails on any memcheck error (invalid read or write, use of uninitialised memory in a
# branch, invalid free). Leaks are not checked: the profiler's tables are static.
#
#   scripts/valgrind.sh                  # installs valgrind with apt-get if missing
#   UNWINDER=libgcc scripts/valgrind.sh  # the same with another unwinder (ALLOCPROF_UNWINDER)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-rel}"
if ! command -v valgrind >/dev/null 2>&1; then
    echo "== installing valgrind"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi
valgrind --version
cargo build --release --quiet --manifest-path reliability/Cargo.toml --bin stress
if [[ -n "${UNWINDER:-}" ]]; then
    export ALLOCPROF_UNWINDER="$UNWINDER"
fi
exec valgrind --tool=memcheck --error-exitcode=1 --leak-check=no \
    --track-origins=yes --num-callers=40 \
    "$CARGO_TARGET_DIR/release/stress" --threads "${THREADS:-4}" --rounds "${ROUNDS:-3000}"
