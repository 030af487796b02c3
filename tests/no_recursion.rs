//! A counting inner allocator proves that the profiler never allocates on its fast path,
//! never allocates on the sampled path once a stack is known, and never samples its own
//! allocations (no recursion into the profiler).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

/// Counts, per thread, the calls that reach the inner allocator, split by whether the
/// thread was inside profiler work at the time.
struct Ledger;

thread_local! {
    static PLAIN: Cell<u64> = const { Cell::new(0) };
    static NESTED: Cell<u64> = const { Cell::new(0) };
    static FREES: Cell<u64> = const { Cell::new(0) };
}

fn count_call() {
    if allocprof::__thread_is_marked() {
        NESTED.with(|c| c.set(c.get() + 1));
    } else {
        PLAIN.with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: forwards every call to System unchanged; the counters are const thread-locals
// without destructors, which never allocate.
unsafe impl GlobalAlloc for Ledger {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_call();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        FREES.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_call();
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: allocprof::Profiler<Ledger> = allocprof::Profiler::new(Ledger);

fn counts() -> (u64, u64, u64) {
    (
        PLAIN.with(Cell::get),
        NESTED.with(Cell::get),
        FREES.with(Cell::get),
    )
}

#[inline(never)]
fn allocate_boxes(n: usize) {
    for i in 0..n {
        black_box(Box::new([i as u8; 48]));
    }
}

#[test]
fn fast_path_and_sampled_path_do_not_allocate_or_recurse() {
    const N: usize = 10_000;

    // Sampling off: every call is the fast path.
    allocprof::set_sample_rate(0);
    allocate_boxes(10); // warm up this thread's state
    let before = counts();
    allocate_boxes(N);
    let after = counts();
    assert_eq!(
        after.0 - before.0,
        N as u64,
        "one inner allocation per request"
    );
    assert_eq!(after.1 - before.1, 0, "no allocation from profiler work");
    assert_eq!(after.2 - before.2, N as u64, "one inner free per request");

    // Every allocation sampled, at a stack the table already holds: capture, table
    // update and live-set insert allocate nothing.
    allocprof::set_sample_rate(1);
    // Two rounds through the same call site (the first inserts the stack). The loop body
    // has no branch on the round, so the compiler has no reason to duplicate the call.
    let mut marks = [((0, 0, 0), 0); 2];
    for mark in marks.iter_mut().take(black_box(2)) {
        *mark = (counts(), allocprof::stats().samples);
        allocate_boxes(N);
    }
    let (before, samples_before) = marks[1];
    let after = counts();
    let samples_after = allocprof::stats().samples;
    assert_eq!(after.0 - before.0, N as u64);
    assert_eq!(
        after.1 - before.1,
        0,
        "the sampled path allocated for a known stack"
    );
    // Every request sampled once, nothing more: the profiler's own work (in `stats`
    // too) is never sampled.
    assert!(samples_after - samples_before >= N as u64);
    assert!(
        samples_after - samples_before <= N as u64 + 2,
        "{} samples for {N} allocations",
        samples_after - samples_before
    );

    // New stacks each time: the table grows (nested, marked allocations are allowed),
    // but the nested allocations are never themselves sampled.
    let samples_before = allocprof::stats().samples;
    let before = counts();
    for depth in 0..200 {
        recurse(depth);
    }
    let after = counts();
    let samples_after = allocprof::stats().samples;
    let plain = after.0 - before.0;
    assert!(after.1 - before.1 > 0, "table growth is nested work");
    assert!(
        samples_after - samples_before <= plain,
        "{} samples but only {plain} program allocations",
        samples_after - samples_before
    );
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
}

#[inline(never)]
fn recurse(depth: usize) {
    if depth == 0 {
        black_box(Box::new(0u64));
    } else {
        recurse(black_box(depth - 1));
        black_box(());
    }
}
