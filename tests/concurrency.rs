//! Many threads allocating and freeing while profiles are exported: no deadlock, and the
//! exact totals stay consistent.

mod common;

use std::alloc::System;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

/// A different stack per (depth, branch pattern) so the table keeps growing while
/// exports run: `churn::<false>` and `churn::<true>` are two functions, so each bit of
/// `seed` picks which one the next frame is.
#[inline(never)]
fn churn<const B: bool>(depth: u32, seed: u64, held: &mut Vec<Vec<u8>>, bytes: &AtomicU64) {
    if depth == 0 {
        return leaf(seed, held, bytes);
    }
    if seed & 1 == 0 {
        churn::<false>(depth - 1, seed >> 1, held, bytes);
    } else {
        churn::<true>(depth - 1, seed >> 1, held, bytes);
    }
    // Not a tail call: keep one frame per level.
    black_box(depth);
}

#[inline(never)]
fn leaf(seed: u64, held: &mut Vec<Vec<u8>>, bytes: &AtomicU64) {
    let size = 1 + (seed as usize % 4096);
    bytes.fetch_add(size as u64, Ordering::Relaxed);
    held.push(vec![0u8; size]);
    if held.len() > 64 {
        // Free in a different order than allocated.
        held.swap_remove(seed as usize % held.len());
    }
}

/// A churning thread; it returns the blocks it still holds.
type Worker = std::thread::JoinHandle<Vec<Vec<u8>>>;

/// Runs 8 churning threads until `stop` and they each did 10k operations; returns what
/// they still hold and the bytes they asked for.
fn run_workers(stop: Arc<AtomicBool>) -> (Vec<Worker>, Arc<AtomicU64>) {
    let requested = Arc::new(AtomicU64::new(0));
    let threads = (0..8)
        .map(|t| {
            let stop = stop.clone();
            let requested = requested.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 10_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    churn::<false>((x % 12) as u32, x >> 8, &mut held, &requested);
                    n += 1;
                }
                // Handed to another thread, which frees them.
                held
            })
        })
        .collect();
    (threads, requested)
}

#[test]
fn threads_allocate_while_profiles_are_exported() {
    // A high rate so that the sampled path and the table are busy all the time.
    allocprof::set_sample_rate(512);
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        // Phase 1: exports race with allocating threads. A deadlock shows as a timeout.
        let stop = Arc::new(AtomicBool::new(false));
        let samples_before = allocprof::stats().samples;
        let (threads, _) = run_workers(stop.clone());
        let mut exports = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline || exports < 3 {
            let heap = allocprof::heap_pprof();
            let allocs = allocprof::allocs_pprof();
            assert!(heap.len() > 20 && allocs.len() > 20);
            black_box(
                allocprof::snapshot()
                    .to_profile()
                    .folded(allocprof::SampleType::AllocSpace),
            );
            exports += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            drop(t.join().unwrap());
        }
        let samples = allocprof::stats().samples - samples_before;

        // Phase 2: the same churn without exports (the symbolizer's caches, which stay
        // allocated, would grow with every new address), to check the exact totals.
        black_box(allocprof::heap_pprof());
        let before = allocprof::stats();
        let stop = Arc::new(AtomicBool::new(true));
        let (threads, requested) = run_workers(stop);
        let leftovers: Vec<Vec<Vec<u8>>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let mid = allocprof::stats();
        drop(leftovers); // freed by this thread, allocated by the others
        let after = allocprof::stats();
        done_tx
            .send((
                exports,
                samples,
                before,
                mid,
                after,
                requested.load(Ordering::Relaxed),
            ))
            .unwrap();
    });
    let (exports, samples, before, mid, after, requested) = done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("deadlock: workers or exports did not finish within 120 s");
    worker.join().unwrap();
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);

    eprintln!(
        "{exports} exports during {samples} samples; {} unique stacks; phase 2: {requested} \
         bytes requested, in-use {} -> {} -> {}",
        after.unique_stacks, before.in_use_bytes, mid.in_use_bytes, after.in_use_bytes
    );
    assert!(samples > 0);
    // Every requested byte was counted (plus the holders' own growth).
    let allocated = mid.allocated_bytes - before.allocated_bytes;
    assert!(allocated >= requested, "{allocated} < {requested}");
    // All threads exited (flushing what they held) and the leftovers were freed: in-use
    // is back where it was, but for the two Arcs this test still holds.
    let drift = after.in_use_bytes as i64 - before.in_use_bytes as i64;
    assert!(drift.abs() < 4096, "in-use drifted by {drift} bytes");
    assert_eq!(after.allocations - after.frees, after.in_use_objects);
}

/// The exact totals include what a running thread has allocated and freed so far, with
/// nothing for that thread to flush first: another thread reads them while it waits.
#[test]
fn totals_include_a_running_threads_latest_work() {
    const BLOCKS: usize = 100;
    const BLOCK: usize = 1000;
    let (main, worker) = common::spawn_started_worker(|w| {
        let blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![i as u8; BLOCK]).collect();
        w.signal();
        w.wait();
        drop(black_box(blocks));
        w.signal();
        w.wait();
    });
    let bytes = (BLOCKS * BLOCK) as u64;
    let s0 = allocprof::stats();
    main.signal();
    main.wait();
    // The worker now waits, holding its blocks, some or all of them not flushed.
    let s1 = allocprof::stats();
    main.signal();
    main.wait();
    let s2 = allocprof::stats();
    main.signal();
    worker.join().unwrap();
    // Other tests' threads may allocate and free meanwhile: only lower bounds hold.
    assert!(
        s1.allocated_bytes - s0.allocated_bytes >= bytes
            && s1.allocations - s0.allocations >= BLOCKS as u64,
        "allocations of a waiting thread missing: {s0:?} then {s1:?}"
    );
    assert!(
        s2.freed_bytes - s1.freed_bytes >= bytes && s2.frees - s1.frees >= BLOCKS as u64,
        "frees of a waiting thread missing: {s1:?} then {s2:?}"
    );
}
