//! Reliability, issue 6 point 4: allocator failure and odd requests.
//!
//! The inner allocator is `System` behind a switch that makes it fail (return null) on
//! demand, on the calling thread only, and that counts what reaches it. Checked:
//!
//! * a failed `alloc`, `alloc_zeroed` or `realloc` returns null through the profiler and
//!   records nothing: not counted in the exact totals, not sampled, not in the profile;
//!   after a failed `realloc` the old block is intact and still tracked;
//! * huge requests the system refuses (up to `isize::MAX`) are not recorded; a huge one
//!   it grants (5 GiB, untouched) is counted and sampled at its full size;
//! * alignments 1 B ..= 1 MiB, sampled (rate 1) and unsampled (rate 0): aligned,
//!   writable, zeroed when asked, exactly counted, in the profile at their size;
//! * `realloc` growing and shrinking blocks, sampled and unsampled on either side:
//!   contents preserved, counted as one free plus one allocation, the old sample
//!   credited and the new one recorded at its new size;
//! * zero-sized types never reach the allocator; a zero-size layout handed to the
//!   profiler directly (outside `GlobalAlloc`'s contract, but an inner allocator may see
//!   one) is forwarded and recorded without breaking the profile.
//!
//! Everything runs in one `#[test]` so that the exact totals (which `stats()` flushes for
//! the calling thread) are not disturbed by other tests of this process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

mod common;

/// `System`, failing on demand.
struct Failing;

thread_local! {
    /// While set, every allocation request of this thread fails.
    static FAIL: Cell<bool> = const { Cell::new(false) };
    /// Requests of this thread that reached the inner allocator.
    static INNER_CALLS: Cell<u64> = const { Cell::new(0) };
    /// Of which with a zero-size layout.
    static INNER_ZERO_SIZE: Cell<u64> = const { Cell::new(0) };
}

fn note_request(layout: Layout) -> bool {
    INNER_CALLS.with(|c| c.set(c.get() + 1));
    if layout.size() == 0 {
        INNER_ZERO_SIZE.with(|c| c.set(c.get() + 1));
    }
    FAIL.with(Cell::get)
}

// SAFETY: forwards to `System` unchanged, or returns null (a valid "allocation failed"
// answer for alloc, alloc_zeroed and realloc, which leaves a realloc's block untouched).
unsafe impl GlobalAlloc for Failing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if note_request(layout) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if note_request(layout) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if note_request(Layout::from_size_align(new_size, layout.align()).unwrap_or(layout)) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: allocprof::Profiler<Failing> = allocprof::Profiler::new(Failing);

fn inner_calls() -> u64 {
    INNER_CALLS.with(Cell::get)
}

/// Runs `f` with the inner allocator failing on this thread.
fn failing<R>(f: impl FnOnce() -> R) -> R {
    FAIL.with(|c| c.set(true));
    let r = f();
    FAIL.with(|c| c.set(false));
    r
}

/// Differences of the exact totals between two `stats()` calls.
#[derive(Debug, PartialEq, Eq)]
struct Delta {
    allocations: u64,
    allocated_bytes: u64,
    frees: u64,
    freed_bytes: u64,
    samples: u64,
    live_samples: i64,
}

fn delta(a: &allocprof::Stats, b: &allocprof::Stats) -> Delta {
    Delta {
        allocations: b.allocations - a.allocations,
        allocated_bytes: b.allocated_bytes - a.allocated_bytes,
        frees: b.frees - a.frees,
        freed_bytes: b.freed_bytes - a.freed_bytes,
        samples: b.samples - a.samples,
        live_samples: b.live_samples as i64 - a.live_samples as i64,
    }
}

const NOTHING: Delta = Delta {
    allocations: 0,
    allocated_bytes: 0,
    frees: 0,
    freed_bytes: 0,
    samples: 0,
    live_samples: 0,
};

/// Waits (at most 10 s) until no other thread of the process allocates: the exact totals
/// are the process's, and libtest's main thread goes on with its own bookkeeping for a
/// moment after it starts this test's thread. Under qemu that bookkeeping fell inside the
/// first window (CI, 2026-12-02: two allocations, 144 bytes, none sampled at rate 1).
fn wait_until_other_threads_are_quiet() {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = allocprof::stats().allocations;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = allocprof::stats().allocations;
        if now == last {
            return;
        }
        last = now;
    }
}

#[test]
fn allocator_failure_and_odd_requests() {
    wait_until_other_threads_are_quiet();
    for rate in [1, allocprof::DEFAULT_SAMPLE_RATE] {
        failed_requests_are_not_recorded(rate);
        huge_requests_are_not_recorded(rate);
    }
    failed_realloc_keeps_the_block_and_its_sample();
    huge_granted_allocation_is_counted();
    alignments_up_to_one_mebibyte();
    realloc_grows_and_shrinks();
    zero_sized_requests();
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
}

#[inline(never)]
fn fails_to_allocate(size: usize) -> usize {
    let layout = Layout::from_size_align(size, 8).expect("layout");
    let mut failures = 0;
    // SAFETY: non-zero-size layouts; null results are not used.
    unsafe {
        failures += usize::from(std::alloc::alloc(layout).is_null());
        failures += usize::from(std::alloc::alloc_zeroed(layout).is_null());
    }
    let mut v: Vec<u8> = Vec::new();
    failures += usize::from(v.try_reserve_exact(size).is_err());
    let mut s = String::new();
    failures += usize::from(s.try_reserve(size).is_err());
    failures
}

fn failed_requests_are_not_recorded(rate: usize) {
    allocprof::set_sample_rate(rate);
    // Sizes around and far above the rate, so that a sample point falls inside them.
    for size in [1, 100, 4096, 1 << 20, 64 << 20] {
        let calls = inner_calls();
        let s0 = allocprof::stats();
        let failures = failing(|| fails_to_allocate(size));
        let s1 = allocprof::stats();
        assert_eq!(failures, 4, "size {size}: every request must fail");
        assert_eq!(
            inner_calls() - calls,
            4,
            "size {size}: the inner allocator saw the requests"
        );
        assert_eq!(
            delta(&s0, &s1),
            NOTHING,
            "rate {rate}, size {size}: a failed allocation was recorded"
        );
    }
    assert_eq!(
        common::heap_values_through("fails_to_allocate"),
        [0; 4],
        "rate {rate}: failed allocations in the profile"
    );
}

#[inline(never)]
fn huge_request(size: usize, align: usize) -> bool {
    let layout = Layout::from_size_align(size, align).expect("layout");
    // SAFETY: non-zero-size layout; a non-null result is freed with the same layout.
    unsafe {
        let p = std::alloc::alloc(layout);
        if p.is_null() {
            return true;
        }
        std::alloc::dealloc(p, layout);
        false
    }
}

fn huge_requests_are_not_recorded(rate: usize) {
    allocprof::set_sample_rate(rate);
    let max = isize::MAX as usize;
    for (size, align) in [
        (max, 1),
        (max - 4095, 4096),
        (max / 2, 8),
        (1 << 50, 16),
        (1 << 47, 1 << 20),
    ] {
        let s0 = allocprof::stats();
        let refused = huge_request(size, align);
        let s1 = allocprof::stats();
        assert!(refused, "the system granted {size} bytes");
        assert_eq!(
            delta(&s0, &s1),
            NOTHING,
            "rate {rate}: a refused request of {size} bytes (align {align}) was recorded"
        );
    }
    assert_eq!(common::heap_values_through("huge_request"), [0; 4]);
}

#[inline(never)]
fn realloc_victim() -> (*mut u8, Layout) {
    let layout = Layout::from_size_align(100, 8).expect("layout");
    // SAFETY: non-zero-size layout.
    let p = unsafe { std::alloc::alloc(layout) };
    assert!(!p.is_null());
    (p, layout)
}

fn failed_realloc_keeps_the_block_and_its_sample() {
    allocprof::set_sample_rate(1);
    let (p, layout) = realloc_victim();
    // SAFETY: `p` is a live block of 100 bytes.
    unsafe { std::ptr::write_bytes(p, 0x5A, 100) };
    for new_size in [200, 50, 1 << 30] {
        let s0 = allocprof::stats();
        // SAFETY: `p` was allocated with `layout`; new_size is non-zero.
        let r = failing(|| unsafe { std::alloc::realloc(p, layout, new_size) });
        let s1 = allocprof::stats();
        assert!(r.is_null(), "realloc to {new_size} should have failed");
        assert_eq!(
            delta(&s0, &s1),
            NOTHING,
            "a failed realloc to {new_size} was recorded"
        );
        // SAFETY: a failed realloc leaves the old block valid.
        let bytes = unsafe { std::slice::from_raw_parts(p, 100) };
        assert!(bytes.iter().all(|&b| b == 0x5A), "block changed");
    }
    assert_eq!(
        common::heap_values_through("realloc_victim"),
        [1, 100, 1, 100],
        "the block is still sampled and in use after failed reallocs"
    );
    // The sample was kept: freeing the block credits it.
    let s0 = allocprof::stats();
    // SAFETY: `p` is live with `layout`.
    unsafe { std::alloc::dealloc(p, layout) };
    let s1 = allocprof::stats();
    assert_eq!(s1.live_samples + 1, s0.live_samples, "free not credited");
    assert_eq!(
        common::heap_values_through("realloc_victim"),
        [1, 100, 0, 0]
    );
}

const HUGE_GRANTED: usize = 5 << 30;

#[inline(never)]
fn huge_granted() -> (*mut u8, Layout) {
    let layout = Layout::from_size_align(HUGE_GRANTED, 4096).expect("layout");
    // SAFETY: non-zero-size layout. The pages are never touched.
    (unsafe { std::alloc::alloc(layout) }, layout)
}

fn huge_granted_allocation_is_counted() {
    // At the default rate, a 5 GiB allocation contains a sample point with probability
    // 1 − e^(−10240): it is sampled, with weight 1.
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
    let s0 = allocprof::stats();
    let (p, layout) = huge_granted();
    let s1 = allocprof::stats();
    if p.is_null() {
        println!("SKIPPED the granted-huge check: the system refused {HUGE_GRANTED} bytes");
        assert_eq!(delta(&s0, &s1), NOTHING);
        return;
    }
    assert_eq!(
        delta(&s0, &s1),
        Delta {
            allocations: 1,
            allocated_bytes: HUGE_GRANTED as u64,
            frees: 0,
            freed_bytes: 0,
            samples: 1,
            live_samples: 1,
        }
    );
    let g = HUGE_GRANTED as i64;
    assert_eq!(common::heap_values_through("huge_granted"), [1, g, 1, g]);
    // SAFETY: `p` is live with `layout`.
    unsafe { std::alloc::dealloc(p, layout) };
    assert_eq!(common::heap_values_through("huge_granted"), [1, g, 0, 0]);
}

#[inline(never)]
fn aligned_allocation(layout: Layout, zeroed: bool) -> *mut u8 {
    // SAFETY: non-zero-size layout.
    unsafe {
        if zeroed {
            std::alloc::alloc_zeroed(layout)
        } else {
            std::alloc::alloc(layout)
        }
    }
}

fn alignments_up_to_one_mebibyte() {
    for rate in [1, 0] {
        allocprof::set_sample_rate(rate);
        let sampled = u64::from(rate == 1);
        let mut kept = Vec::with_capacity(200);
        let mut kept_bytes = 0usize;
        for shift in 0..=20 {
            let align = 1usize << shift;
            for size in [1, 24, align, 2 * align + 3] {
                for zeroed in [false, true] {
                    let layout = Layout::from_size_align(size, align).expect("layout");
                    let s0 = allocprof::stats();
                    let p = aligned_allocation(layout, zeroed);
                    let s1 = allocprof::stats();
                    assert!(!p.is_null(), "size {size} align {align} refused");
                    assert_eq!(p as usize % align, 0, "misaligned for {align}");
                    assert_eq!(
                        delta(&s0, &s1),
                        Delta {
                            allocations: 1,
                            allocated_bytes: size as u64,
                            frees: 0,
                            freed_bytes: 0,
                            samples: sampled,
                            live_samples: sampled as i64,
                        },
                        "rate {rate}, size {size}, align {align}, zeroed {zeroed}"
                    );
                    // SAFETY: `p` is a live block of `size` bytes.
                    let bytes = unsafe { std::slice::from_raw_parts_mut(p, size) };
                    if zeroed {
                        assert!(bytes.iter().all(|&b| b == 0), "alloc_zeroed not zeroed");
                    }
                    bytes.fill(shift as u8);
                    kept.push((p, layout));
                    kept_bytes += size;
                }
            }
        }
        let expect_n = if rate == 1 { kept.len() as i64 } else { 0 };
        let expect_b = if rate == 1 { kept_bytes as i64 } else { 0 };
        let before_free = common::heap_values_through("aligned_allocation");
        let s0 = allocprof::stats();
        for &(p, layout) in &kept {
            // SAFETY: `p` is live with `layout` and was filled with its alignment's shift.
            unsafe {
                let bytes = std::slice::from_raw_parts(p, layout.size());
                let shift = layout.align().trailing_zeros() as u8;
                assert!(bytes.iter().all(|&b| b == shift), "block overwritten");
                std::alloc::dealloc(p, layout);
            }
        }
        let s1 = allocprof::stats();
        let d = delta(&s0, &s1);
        assert_eq!(
            (d.frees, d.freed_bytes, d.live_samples),
            (kept.len() as u64, kept_bytes as u64, -(expect_n)),
            "rate {rate}: frees of aligned blocks"
        );
        let after_free = common::heap_values_through("aligned_allocation");
        if rate == 1 {
            // Accumulates over the two rates: rate 0 adds nothing.
            assert_eq!(
                [
                    before_free[0],
                    before_free[1],
                    before_free[2],
                    before_free[3]
                ],
                [expect_n, expect_b, expect_n, expect_b],
                "aligned blocks in the profile while held"
            );
            assert_eq!(after_free, [expect_n, expect_b, 0, 0]);
        } else {
            assert_eq!(
                after_free[1] - before_free[1],
                expect_b,
                "unsampled blocks appeared in the profile"
            );
        }
    }
}

#[inline(never)]
fn allocated_for_realloc(layout: Layout) -> *mut u8 {
    // SAFETY: non-zero-size layout.
    unsafe { std::alloc::alloc(layout) }
}

#[inline(never)]
fn reallocated(p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    // SAFETY: `p` is live with `layout`; `new_size` is non-zero.
    unsafe { std::alloc::realloc(p, layout, new_size) }
}

fn realloc_grows_and_shrinks() {
    // (rate when allocated, rate when reallocated)
    let rates = [(1, 1), (1, 0), (0, 1), (0, 0)];
    let sizes = [
        (100, 5000),
        (5000, 100),
        (1000, 1 << 20),
        (1 << 20, 1),
        (64, 65),
    ];
    let mut expect = [0i64; 4]; // reallocated: alloc objects/bytes, inuse objects/bytes
    let mut expect_first = [0i64; 2]; // allocated_for_realloc: alloc objects/bytes
    for (a, b) in rates {
        for (old, new) in sizes {
            for align in [8, 4096] {
                allocprof::set_sample_rate(a);
                let layout = Layout::from_size_align(old, align).expect("layout");
                let p = allocated_for_realloc(layout);
                assert!(!p.is_null());
                // SAFETY: `p` is a live block of `old` bytes.
                let fill = unsafe { std::slice::from_raw_parts_mut(p, old) };
                for (i, byte) in fill.iter_mut().enumerate() {
                    *byte = (i % 251) as u8;
                }
                allocprof::set_sample_rate(b);
                let s0 = allocprof::stats();
                let q = reallocated(p, layout, new);
                let s1 = allocprof::stats();
                assert!(!q.is_null(), "realloc {old} -> {new} failed");
                let d = delta(&s0, &s1);
                let what = format!("realloc {old}->{new} align {align}, rates {a}->{b}");
                assert_eq!(
                    d,
                    Delta {
                        allocations: 1,
                        allocated_bytes: new as u64,
                        frees: 1,
                        freed_bytes: old as u64,
                        samples: u64::from(b == 1),
                        live_samples: i64::from(b == 1) - i64::from(a == 1),
                    },
                    "{what}"
                );
                // SAFETY: `q` is a live block of `new` bytes.
                let kept = unsafe { std::slice::from_raw_parts(q, old.min(new)) };
                assert!(
                    kept.iter().enumerate().all(|(i, &v)| v == (i % 251) as u8),
                    "{what}: contents not preserved"
                );
                if a == 1 {
                    expect_first[0] += 1;
                    expect_first[1] += old as i64;
                }
                let first = common::heap_values_through("allocated_for_realloc");
                assert_eq!(
                    first,
                    [expect_first[0], expect_first[1], 0, 0],
                    "{what}: the old block must be credited as freed"
                );
                if b == 1 {
                    expect[0] += 1;
                    expect[1] += new as i64;
                }
                let now = common::heap_values_through("reallocated");
                let inuse = if b == 1 { [1, new as i64] } else { [0, 0] };
                assert_eq!(
                    now,
                    [expect[0], expect[1], inuse[0], inuse[1]],
                    "{what}: the new block in the profile"
                );
                let new_layout = Layout::from_size_align(new, align).expect("layout");
                // SAFETY: `q` is live with `new_layout`.
                unsafe { std::alloc::dealloc(q, new_layout) };
            }
        }
    }
}

#[inline(never)]
fn zero_size_direct(n: usize) -> usize {
    let layout = Layout::from_size_align(0, 1).expect("layout");
    let mut non_null = 0;
    for _ in 0..n {
        // SAFETY: outside GlobalAlloc's contract (zero size) but sound for this inner
        // allocator: System answers malloc(0) with a unique pointer or null, and a
        // non-null one is freed with the same layout.
        unsafe {
            let p = ALLOC.alloc(layout);
            if !p.is_null() {
                non_null += 1;
                ALLOC.dealloc(p, layout);
            }
        }
    }
    non_null
}

fn zero_sized_requests() {
    for rate in [1, allocprof::DEFAULT_SAMPLE_RATE] {
        allocprof::set_sample_rate(rate);
        // Zero-sized types never reach the allocator at all.
        let calls = inner_calls();
        let s0 = allocprof::stats();
        let unit = Box::new(());
        let units = vec![(); 1_000_000];
        let mut empty: Vec<[u64; 0]> = Vec::with_capacity(1000);
        empty.push([]);
        black_box((&unit, &units, &empty));
        drop((unit, units, empty));
        let s1 = allocprof::stats();
        assert_eq!(inner_calls(), calls, "a ZST reached the inner allocator");
        assert_eq!(delta(&s0, &s1), NOTHING, "rate {rate}: ZSTs recorded");
    }

    // Zero-size layouts handed to the profiler directly are forwarded to the inner
    // allocator and recorded as zero-byte allocations without breaking anything.
    for rate in [1, allocprof::DEFAULT_SAMPLE_RATE] {
        allocprof::set_sample_rate(rate);
        let n = 1000;
        let zero_before = INNER_ZERO_SIZE.with(Cell::get);
        let s0 = allocprof::stats();
        let non_null = zero_size_direct(n);
        let s1 = allocprof::stats();
        assert_eq!(
            INNER_ZERO_SIZE.with(Cell::get) - zero_before,
            n as u64,
            "zero-size requests must reach the inner allocator"
        );
        let d = delta(&s0, &s1);
        assert_eq!(
            (d.allocations, d.allocated_bytes, d.frees, d.freed_bytes),
            (non_null as u64, 0, non_null as u64, 0),
            "rate {rate}: zero-size allocations are counted, with zero bytes"
        );
        assert_eq!(d.live_samples, 0);
        let values = common::heap_values_through("zero_size_direct");
        assert_eq!(values[1], 0, "zero-size allocations have no bytes");
        assert_eq!(values[2..], [0, 0], "all freed");
        if rate == 1 {
            assert_eq!(values[0], non_null as i64, "rate 1 samples each one");
        }
    }
}
