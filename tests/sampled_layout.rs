//! Sampled blocks are allocated 4 KiB-aligned (so that a free recognises them from the
//! pointer alone) and must always be freed and reallocated with the layout they were
//! allocated with. The inner allocator here is strict the way sized allocators are
//! (jemalloc's `sdallocx`, mimalloc's `mi_free_size_aligned`): it writes each block's
//! layout in a trailer after it and counts every `dealloc` or `realloc` that passes a
//! different one.
//!
//! Checked, on four threads: allocations of every size class and alignment up to 64 KiB,
//! zeroed ones, `realloc` growing and shrinking with the rate switched between "every
//! allocation" and "none" so that blocks move between sampled and ordinary in both
//! directions, and more live samples than the live set tracks (the overflow is moved to
//! ordinary blocks). No layout mismatch, contents preserved, and every tracked sample's
//! free credited.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// `System` with a trailer recording each block's layout.
struct Strict;

/// Frees or reallocations whose layout differed from the block's.
static MISMATCHES: AtomicU64 = AtomicU64::new(0);
/// Requests with an alignment of 4 KiB or more.
static PAGE_ALIGNED_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// The System layout of a block of `layout`, and the offset of its trailer (two words:
/// the block's size and alignment). The trailer's offset depends on the size only, which
/// every caller passes right (the profiler never changes a size); the alignment is what
/// is checked.
fn outer(layout: Layout) -> (Layout, usize) {
    let at = layout.size().next_multiple_of(8);
    let outer = Layout::from_size_align(at + 16, layout.align()).expect("layout");
    (outer, at)
}

// SAFETY: every block handed out is a System block of `outer(layout)`, aligned as asked,
// with its own layout written in the trailer after the caller's bytes; frees and
// reallocations release it with the layout it was allocated with (read from the trailer),
// whatever alignment they are passed.
unsafe impl GlobalAlloc for Strict {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() >= 4096 {
            PAGE_ALIGNED_REQUESTS.fetch_add(1, Ordering::Relaxed);
        }
        let (outer, at) = outer(layout);
        // SAFETY: `outer` has a non-zero size.
        let p = unsafe { System.alloc(outer) };
        if !p.is_null() {
            // SAFETY: the trailer lies inside the block, 8-aligned.
            unsafe {
                let t = p.add(at).cast::<usize>();
                t.write(layout.size());
                t.add(1).write(layout.align());
            }
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (_, at) = outer(layout);
        // SAFETY: `ptr` came from `alloc` with this size (the caller's contract), so its
        // trailer is there.
        let (size, align) = unsafe {
            let t = ptr.add(at).cast::<usize>();
            (t.read(), t.add(1).read())
        };
        if (size, align) != (layout.size(), layout.align()) {
            MISMATCHES.fetch_add(1, Ordering::Relaxed);
        }
        let own = Layout::from_size_align(size, align).expect("recorded layout");
        // SAFETY: the System block with the layout it was allocated with.
        unsafe { System.dealloc(ptr, outer(own).0) };
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align(new_size, layout.align()).expect("layout");
        // SAFETY: as for `alloc`.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and at least this long; `dealloc` checks the
            // layout passed here against the block's own.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[global_allocator]
static ALLOC: allocprof::Profiler<Strict> = allocprof::Profiler::new(Strict);

/// A byte pattern for block `i` at offset `j`.
fn pattern(i: usize, j: usize) -> u8 {
    (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8
}

/// Allocates, grows, shrinks and frees blocks of many sizes and alignments, checking
/// their contents and alignment.
fn churn(seed: usize, rounds: usize) {
    let mut vecs: Vec<Vec<u8>> = Vec::new();
    for r in 0..rounds {
        let i = seed.wrapping_mul(1000) + r;
        // A vector grown byte by byte (realloc through the size classes), then shrunk.
        let len = 1 + (i * 37) % 3000;
        let mut v = Vec::new();
        for j in 0..len {
            v.push(pattern(i, j));
        }
        if r % 3 == 0 {
            v.truncate(len / 2 + 1);
            v.shrink_to_fit();
        }
        // Zeroed memory.
        let z = vec![0u8; 1 + (i * 101) % 70_000];
        assert!(z.iter().all(|&b| b == 0), "alloc_zeroed block not zeroed");
        // Over-aligned requests of their own.
        for shift in [3, 6, 12, 14, 16] {
            let layout = Layout::from_size_align(24 + i % 100, 1 << shift).unwrap();
            // SAFETY: a non-zero size; freed below with the same layout.
            unsafe {
                let p = std::alloc::alloc(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % layout.align(), 0, "misaligned block");
                p.write_bytes(0xA5, layout.size());
                std::alloc::dealloc(p, layout);
            }
        }
        vecs.push(v);
        if vecs.len() > 64 {
            let v = vecs.swap_remove(i % vecs.len());
            drop(v);
        }
        // Grow a kept vector across rate switches (below): its block moves between
        // sampled and ordinary.
        let k = i % vecs.len();
        let extra = 1 + i % 5000;
        vecs[k].reserve(extra);
    }
    for (n, v) in vecs.iter().enumerate() {
        assert!(v.capacity() >= v.len(), "vector {n} corrupted");
    }
}

#[test]
fn sampled_blocks_keep_their_layout_and_contents() {
    allocprof::set_sample_rate(1);
    // A block sampled at rate 1 lies on a 4 KiB boundary.
    let probe: Box<[u8; 40]> = Box::new([7; 40]);
    assert_eq!(
        &*probe as *const [u8; 40] as usize % 4096,
        0,
        "a sampled block is not 4 KiB-aligned"
    );
    drop(probe);
    let before = allocprof::stats();

    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for phase in 0..6 {
                    churn(t * 10 + phase, 150);
                }
            })
        })
        .collect();
    // Switch the rate while the threads run, so that reallocations cross from sampled to
    // ordinary blocks and back.
    for n in 0..40 {
        allocprof::set_sample_rate(if n % 2 == 0 { 0 } else { 1 });
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    allocprof::set_sample_rate(1);
    for t in threads {
        t.join().expect("worker");
    }

    // More live samples than the live set tracks: the overflow is moved to ordinary
    // blocks, which must be freed with the caller's layout.
    let many: Vec<Box<[u64; 3]>> = (0..allocprof::MAX_LIVE + 5000)
        .map(|i| Box::new([i as u64; 3]))
        .collect();
    let untracked = allocprof::stats().untracked_samples - before.untracked_samples;
    for (i, b) in many.iter().enumerate() {
        assert_eq!(**b, [i as u64; 3], "box {i} corrupted");
    }
    drop(many);
    allocprof::set_sample_rate(0);
    let after = allocprof::stats();

    assert_eq!(
        MISMATCHES.load(Ordering::Relaxed),
        0,
        "blocks freed or reallocated with another layout than their own"
    );
    assert!(
        PAGE_ALIGNED_REQUESTS.load(Ordering::Relaxed) > 10_000,
        "sampled blocks were not asked for 4 KiB-aligned: {}",
        PAGE_ALIGNED_REQUESTS.load(Ordering::Relaxed)
    );
    assert!(
        untracked >= 5000,
        "only {untracked} samples went untracked with the live set overfull"
    );
    // Every tracked sample of this test has been freed and credited (the main thread's
    // own long-lived blocks, allocated before `before`, stay as they were).
    assert!(
        after.live_samples <= before.live_samples,
        "live samples {} after freeing everything, {} before",
        after.live_samples,
        before.live_samples
    );
}
