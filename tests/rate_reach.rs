//! A new sampling rate reaches a thread that is already running within 2 MiB of that
//! thread's own allocation (`set_sample_rate`'s documented bound), however far away its
//! next sample point under the old rate was.
//!
//! One test in its own process: it changes the process-wide rate.

mod common;

use std::alloc::System;
use std::hint::black_box;

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

const REACH: usize = 2 << 20;
const BLOCK: usize = 1024;

#[test]
fn a_new_rate_reaches_a_running_thread_within_2_mib() {
    // Under this rate the worker's next sample point is about a terabyte away.
    allocprof::set_sample_rate(1 << 40);
    // The worker's first slow event is under the old rate.
    let (main, worker) = common::spawn_started_worker(|w| {
        // 2 MiB, then 200 blocks more: all of those come after the bound.
        for i in 0..REACH / BLOCK + 200 {
            black_box(vec![i as u8; BLOCK]);
        }
        w.signal();
    });
    // Every allocation from here on is sampled, on every thread that has taken it up.
    allocprof::set_sample_rate(1);
    let before = allocprof::stats().samples;
    main.signal();
    main.wait();
    let after = allocprof::stats().samples;
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
    worker.join().unwrap();
    // The worker's last 200 blocks at least; other threads of the harness can only add.
    assert!(
        after - before >= 200,
        "the worker did not take up the new rate within {REACH} bytes: {} samples",
        after - before
    );
}
