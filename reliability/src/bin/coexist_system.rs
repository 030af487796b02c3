//! The control for `coexist`: the same workload and CPU profiler with plain `System` as
//! the global allocator (allocprof's API is still called; it records nothing). If this
//! crashes too, the crash is the CPU profiler's, not allocprof's.
//!
//! `coexist_system [--seconds 30] [--threads 4] [--blocklist 1]`

use std::alloc::System;

#[global_allocator]
static ALLOC: System = System;

fn main() {
    allocprof_reliability::coexist::run();
}
