//! The multi-threaded stress program run under valgrind's memcheck
//! (`scripts/valgrind.sh`): threads allocate, reallocate and free (also each other's
//! blocks) at sample rate 1 and at a low rate, short-lived threads come and go, and
//! profiles are exported while all of that runs. Small enough to finish under valgrind.
//!
//! `stress [--threads 4] [--rounds 3000] [--export 1]` (`--export 0`: no profiles, to
//! tell the export path's own memory from the rest)

use allocprof_reliability::{arg, request, Rng};
use std::alloc::System;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

fn churn(seed: u64, rounds: u64, pool: &Mutex<Vec<Vec<u8>>>) {
    let mut rng = Rng::new(seed);
    let mut keep = Vec::new();
    for i in 0..rounds {
        request(&mut rng, &mut keep, 64);
        // Grow and shrink a block through realloc.
        let mut v: Vec<u8> = Vec::with_capacity(1 + rng.below(256) as usize);
        v.extend((0..rng.below(4096)).map(|b| b as u8));
        v.shrink_to_fit();
        // Hand blocks to other threads and free theirs.
        let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
        if i % 2 == 0 {
            pool.push(v);
        } else if let Some(theirs) = pool.pop() {
            assert!(theirs.iter().enumerate().all(|(j, &b)| b == j as u8));
        }
    }
}

fn main() {
    let threads: u64 = arg("--threads", 4);
    let rounds: u64 = arg("--rounds", 3000);
    let export: u8 = arg("--export", 1);
    let pool = Arc::new(Mutex::new(Vec::new()));
    for (phase, rate) in [(0u64, 1usize), (1, 4096)] {
        allocprof::set_sample_rate(rate);
        let stop = Arc::new(AtomicBool::new(false));
        let exporter = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while export != 0 && (!stop.load(Ordering::Relaxed) || n == 0) {
                    let heap = allocprof::heap_pprof();
                    let allocs = allocprof::allocs_pprof();
                    assert!(heap.starts_with(&[0x1f, 0x8b]) && allocs.starts_with(&[0x1f, 0x8b]));
                    n += 1;
                }
                n
            })
        };
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let pool = pool.clone();
                std::thread::spawn(move || churn(phase * 100 + t + 1, rounds, &pool))
            })
            .collect();
        // Short-lived threads while the workers run.
        for s in 0..20 {
            let pool = pool.clone();
            std::thread::spawn(move || churn(1000 + phase * 100 + s, rounds / 50, &pool))
                .join()
                .expect("short-lived thread panicked");
        }
        for w in workers {
            w.join().expect("worker panicked");
        }
        stop.store(true, Ordering::Relaxed);
        let exports = exporter.join().expect("exporter panicked");
        let s = allocprof::stats();
        println!(
            "rate {rate}: {} samples, {} distinct stacks, {exports} profile pairs exported, in use {} B",
            s.samples, s.unique_stacks, s.in_use_bytes
        );
    }
    let held: usize = pool
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
        .map(|v| v.capacity())
        .sum();
    let s = allocprof::stats();
    println!(
        "stress: done; the pool held {held} B; now in use {} B in {} objects, profiler_bytes {}",
        s.in_use_bytes, s.in_use_objects, s.profiler_bytes
    );
}
