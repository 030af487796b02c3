//! Coexistence: the `pprof` crate's CPU profiler (SIGPROF at 1 kHz, its own unwinder in
//! the signal handler) runs while allocprof samples every allocation (rate 1) on several
//! threads and profiles are requested continuously. Passes if nothing deadlocks or
//! crashes for the whole run and both profilers still produce profiles at the end.
//!
//! `coexist [--seconds 30] [--threads 4] [--blocklist 1]`; run by `reliability/coexist.sh`.
//! With `--blocklist 0` the CPU profiler also samples inside libc, libgcc and pthread
//! (pprof-rs recommends the blocklist against deadlocks of its own unwinder there). A watchdog
//! fails the run (exit 2, after printing every thread's stack with gdb when installed)
//! when any thread stops making progress for 20 s.

use std::alloc::System;

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

fn main() {
    allocprof_reliability::coexist::run();
}
