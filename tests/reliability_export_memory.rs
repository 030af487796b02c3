//! Reliability, issue 6 point 3 (the profiler's own memory): what an export leaves behind
//! must be the profiler's, and accounted as such.
//!
//! The first export symbolizes: the symbol cache and whatever the symbolizer keeps
//! (the `backtrace` crate's parsed DWARF of the binary) stay allocated afterwards. A
//! counting inner allocator measures the whole process's heap before and after one
//! export; the growth must show up in `Stats::profiler_bytes` (the figure a user watches
//! and the cap is stated in), within a small slack.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};

/// `System`, keeping the exact number of live heap bytes of the whole process.
struct LiveBytes;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards every call to `System` unchanged and only counts successful calls.
unsafe impl GlobalAlloc for LiveBytes {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: allocprof::Profiler<LiveBytes> = allocprof::Profiler::new(LiveBytes);

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
    let h0 = LIVE.load(Ordering::Relaxed);
    black_box(allocprof::heap_pprof());
    let s1 = allocprof::stats();
    let h1 = LIVE.load(Ordering::Relaxed);
    let retained = h1 - h0;
    let accounted = s1.profiler_bytes as i64 - s0.profiler_bytes as i64;
    println!(
        "the first export left {retained} bytes allocated ({} more objects in use); \
         profiler_bytes grew by {accounted} (symbol cache {} entries); in_use_bytes grew by {}",
        s1.in_use_objects as i64 - s0.in_use_objects as i64,
        s1.symbol_cache_entries,
        s1.in_use_bytes as i64 - s0.in_use_bytes as i64,
    );
    drop(kept);
    assert!(
        retained <= accounted + SLACK,
        "an export left {retained} bytes allocated but profiler_bytes grew by only {accounted}"
    );
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
}
