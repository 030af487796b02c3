//! Reliability, issue 6 point 3 (the profiler's own memory): what an export leaves behind
//! must be the profiler's, and accounted as such.
//!
//! The first export symbolizes: the symbol cache and whatever the symbolizer keeps
//! (the `backtrace` crate's parsed DWARF of the binary) stay allocated afterwards. A
//! counting inner allocator measures the whole process's heap before and after one
//! export; the growth must show up in `Stats::profiler_bytes` (the figure a user watches
//! and the cap is stated in), within a small slack. An export that needs no new
//! symbol must release the parsed debug information again.

use std::hint::black_box;
use std::sync::atomic::Ordering;

mod common;

#[global_allocator]
static ALLOC: allocprof::Profiler<common::LiveBytes> = allocprof::Profiler::new(common::LiveBytes);

/// Heap the process may keep after an export beyond `profiler_bytes` (allocator and
/// harness noise, lazily initialised std state).
const SLACK: i64 = 1 << 20;

#[inline(never)]
fn workload() -> Vec<Vec<u8>> {
    (0..2000).map(|i| vec![i as u8; 100 + i]).collect()
}

#[test]
fn export_leftovers_are_in_profiler_bytes() {
    allocprof::set_sample_rate(4096);
    let kept = workload();
    let s0 = allocprof::stats();
    let h0 = common::LIVE.load(Ordering::Relaxed);
    black_box(allocprof::heap_pprof());
    let s1 = allocprof::stats();
    let h1 = common::LIVE.load(Ordering::Relaxed);
    let retained = h1 - h0;
    let accounted = s1.profiler_bytes as i64 - s0.profiler_bytes as i64;
    println!(
        "the first export left {retained} bytes allocated ({} more objects in use); \
         profiler_bytes grew by {accounted} (symbol cache {} entries); in_use_bytes grew by {}",
        s1.in_use_objects as i64 - s0.in_use_objects as i64,
        s1.symbol_cache_entries,
        s1.in_use_bytes as i64 - s0.in_use_bytes as i64,
    );
    assert!(
        retained <= accounted + SLACK,
        "an export left {retained} bytes allocated but profiler_bytes grew by only {accounted}"
    );

    // An export that finds every address in the symbol cache releases the parsed debug
    // information: what stays is the per-address cache. With sampling off no new stack
    // can appear, so of two more exports the second needs no new symbol (the first may:
    // this test's own printing was sampled after the first export's snapshot).
    allocprof::set_sample_rate(0);
    black_box(allocprof::heap_pprof());
    black_box(allocprof::heap_pprof());
    let s2 = allocprof::stats();
    let h2 = common::LIVE.load(Ordering::Relaxed);
    let retained2 = h2 - h0;
    let accounted2 = s2.profiler_bytes as i64 - s0.profiler_bytes as i64;
    println!(
        "after two more exports: {retained2} bytes left allocated, profiler_bytes {accounted2} \
         above the start"
    );
    drop(kept);
    assert!(
        retained2 < retained / 4,
        "an export without new symbols should release the debug information: {retained2} bytes left \
         (the first left {retained})"
    );
    assert!(
        retained2 <= accounted2 + SLACK,
        "{retained2} bytes left allocated but profiler_bytes is only {accounted2} above the start"
    );
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
}
