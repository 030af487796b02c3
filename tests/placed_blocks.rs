//! Sampled blocks placed in padded blocks (`alloc::place`), seen from the inner allocator.
//!
//! The inner allocator is `System` behind a ledger of every block it has handed out and
//! not yet taken back, with its layout. Every free and realloc that reaches it must name
//! such a block with exactly its layout; anything else is counted as an error (the
//! allocator itself must not panic). Checked, at rate 1 (every allocation sampled) and
//! across rate switches:
//!
//! * a sampled block under 64 KiB with an alignment of at most 16 is handed out at an
//!   address that is 1008 modulo 1024, inside a block 1 KiB larger that the inner
//!   allocator returned, and given back as that block; a larger or more aligned one is
//!   handed out where it lies;
//! * `alloc_zeroed` zeroes what the caller gets; `realloc` keeps the contents whether the
//!   old and new blocks are sampled or not, growing and shrinking;
//! * every free is credited: the live samples and the inner allocator's live blocks come
//!   back to where they started, and nothing goes untracked.
//!
//! One `#[test]`, so that no other test of this process changes the rate meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Blocks the ledger can hold; beyond it, it stops checking (and says so).
const CAP: usize = 1 << 16;

struct Ledger {
    /// `(pointer, size, align, counted in LIVE_BLOCKS)` of each block handed out; pointer
    /// 0 is an empty slot.
    blocks: Mutex<[Entry; CAP]>,
}

static ERRORS: AtomicU64 = AtomicU64::new(0);
static OVERFLOWED: AtomicU64 = AtomicU64::new(0);
/// Entries in the ledger.
static ENTRIES: AtomicUsize = AtomicUsize::new(0);
/// Blocks handed out to the test's thread while it runs, for the program (not for the
/// profiler's own tables, allocated and freed under its reentrancy mark), and not taken
/// back (by any thread).
static LIVE_BLOCKS: AtomicUsize = AtomicUsize::new(0);

type Entry = (usize, usize, usize, bool);
thread_local! {
    /// The last block handed out to this thread for the program, for the test to compare
    /// with.
    static LAST: Cell<(usize, usize, usize)> = const { Cell::new((0, 0, 0)) };
    /// Set on the test's thread while it runs.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

impl Ledger {
    fn slot(ptr: usize) -> usize {
        (ptr as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) as usize >> (64 - 16)
    }

    fn handed_out(&self, ptr: *mut u8, layout: Layout) {
        if ptr.is_null() {
            return;
        }
        let program = !allocprof::__thread_is_marked();
        let counted = program && COUNTED.with(Cell::get);
        let entry = (ptr as usize, layout.size(), layout.align(), counted);
        // Not the profiler's own allocations (its stack table's growth, under the mark).
        if program {
            LAST.with(|l| l.set((entry.0, entry.1, entry.2)));
        }
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        // At most three quarters full, so that probes stay short and always end.
        if ENTRIES.load(Ordering::Relaxed) >= CAP / 4 * 3 {
            OVERFLOWED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let start = Self::slot(ptr as usize);
        for i in 0..CAP {
            let b = &mut blocks[(start + i) % CAP];
            if b.0 == 0 {
                *b = entry;
                ENTRIES.fetch_add(1, Ordering::Relaxed);
                LIVE_BLOCKS.fetch_add(usize::from(counted), Ordering::Relaxed);
                return;
            }
        }
    }

    /// Takes `ptr` back; counts an error unless it was handed out with `layout`.
    fn taken_back(&self, ptr: *mut u8, layout: Layout) {
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let start = Self::slot(ptr as usize);
        for i in 0..CAP {
            let at = (start + i) % CAP;
            let b = blocks[at];
            if b.0 == ptr as usize {
                if (b.1, b.2) != (layout.size(), layout.align()) {
                    ERRORS.fetch_add(1, Ordering::Relaxed);
                }
                // Removal with backward shift, so that later probes still find theirs.
                let mut hole = at;
                let mut j = (hole + 1) % CAP;
                while blocks[j].0 != 0 {
                    let home = Self::slot(blocks[j].0);
                    // Move `j` into the hole unless its home lies after the hole (cyclically).
                    if (j.wrapping_sub(home) % CAP) >= (j.wrapping_sub(hole) % CAP) {
                        blocks[hole] = blocks[j];
                        hole = j;
                    }
                    j = (j + 1) % CAP;
                }
                blocks[hole] = (0, 0, 0, false);
                ENTRIES.fetch_sub(1, Ordering::Relaxed);
                LIVE_BLOCKS.fetch_sub(usize::from(b.3), Ordering::Relaxed);
                return;
            }
            if b.0 == 0 {
                break;
            }
        }
        if OVERFLOWED.load(Ordering::Relaxed) == 0 {
            ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: forwards every call to System unchanged; the ledger's lock does not allocate
// (a futex-based mutex over a static array).
unsafe impl GlobalAlloc for Ledger {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        self.handed_out(p, layout);
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        self.handed_out(p, layout);
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.taken_back(ptr, layout);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.taken_back(ptr, layout);
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            // The old block is still there.
            self.handed_out(ptr, layout);
        } else {
            self.handed_out(
                p,
                Layout::from_size_align(new_size, layout.align()).unwrap(),
            );
        }
        p
    }
}

#[global_allocator]
static ALLOC: allocprof::Profiler<Ledger> = allocprof::Profiler::new(Ledger {
    blocks: Mutex::new([(0, 0, 0, false); CAP]),
});

fn last() -> (usize, usize, usize) {
    LAST.with(Cell::get)
}

/// Whether a sampled block of this size and alignment is placed: under 64 KiB, aligned
/// to at most 16.
fn placeable(size: usize, align: usize) -> bool {
    size < 64 * 1024 && align <= 16
}

/// Allocates `layout` through the profiler, checks where it lies in what the inner
/// allocator returned, fills it with a pattern and returns it.
fn allocate_checked(layout: Layout, zeroed: bool, sampled: bool) -> *mut u8 {
    // SAFETY: non-zero sizes.
    let p = unsafe {
        if zeroed {
            std::alloc::alloc_zeroed(layout)
        } else {
            std::alloc::alloc(layout)
        }
    };
    assert!(!p.is_null());
    assert_eq!(p as usize % layout.align(), 0, "{layout:?}: misaligned");
    let (base, size, align) = last();
    if sampled && placeable(layout.size(), layout.align()) {
        assert_eq!(p as usize % 1024, 1008, "{layout:?}: placed");
        assert_eq!(
            (size, align),
            (layout.size() + 1024, layout.align()),
            "padded"
        );
        assert!(base <= p as usize && p as usize + layout.size() <= base + size);
    } else {
        assert_eq!(
            (base, size, align),
            (p as usize, layout.size(), layout.align())
        );
    }
    // SAFETY: `p` holds `layout.size()` bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(p, layout.size()) };
    if zeroed {
        assert!(bytes.iter().all(|&b| b == 0), "{layout:?}: not zeroed");
    }
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    p
}

/// Reallocates `p` (of `layout`, filled by `allocate_checked`) to `new_size` and checks
/// that the kept bytes came along.
fn reallocate_checked(p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    // SAFETY: `p` was allocated with `layout`; `new_size` is not zero.
    let q = unsafe { std::alloc::realloc(p, layout, new_size) };
    assert!(!q.is_null());
    assert_eq!(q as usize % layout.align(), 0);
    let keep = layout.size().min(new_size);
    // SAFETY: `q` holds at least `keep` bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(q, new_size) };
    assert!(
        bytes[..keep]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 251) as u8),
        "{layout:?} -> {new_size}: contents lost"
    );
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    q
}

#[test]
fn sampled_blocks_are_placed_and_given_back_as_the_inner_allocator_returned_them() {
    let s0 = allocprof::stats();
    COUNTED.with(|c| c.set(true));
    allocprof::set_sample_rate(1);
    // 20 000 bytes cross the 64 KiB limit of placed blocks both ways in the reallocs.
    let sizes = [1, 24, 1000, 1024, 4096, 20_000, 70_000, 300_000];
    let aligns = [1, 8, 16, 32, 4096];
    let mut live = Vec::with_capacity(sizes.len() * aligns.len() * 2);
    for &size in &sizes {
        for &align in &aligns {
            let layout = Layout::from_size_align(size, align).unwrap();
            for zeroed in [false, true] {
                live.push((allocate_checked(layout, zeroed, true), layout));
            }
        }
    }
    // Grow sampled to sampled, shrink sampled to unsampled, grow unsampled to sampled,
    // shrink sampled to sampled.
    for (round, rate) in [(0, 1), (1, 0), (2, 1), (3, 1)] {
        allocprof::set_sample_rate(rate);
        for (p, layout) in live.iter_mut() {
            let new_size = if round % 2 == 0 {
                layout.size() * 3 + 5
            } else {
                (layout.size() / 2).max(1)
            };
            *p = reallocate_checked(*p, *layout, new_size);
            *layout = Layout::from_size_align(new_size, layout.align()).unwrap();
            let (base, size, _) = last();
            if rate == 1 && placeable(new_size, layout.align()) {
                assert_eq!(*p as usize % 1024, 1008, "realloc into a placed block");
                assert_eq!(size, new_size + 1024);
                assert!(base <= *p as usize);
            }
        }
    }
    // Unsampled blocks at rate 0 lie where the inner allocator put them.
    allocprof::set_sample_rate(0);
    let plain = allocate_checked(Layout::from_size_align(100, 8).unwrap(), false, false);
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(plain, Layout::from_size_align(100, 8).unwrap()) };
    // The blocks and the vector holding them, all sampled at rate 1 (libtest's thread may
    // have allocated too meanwhile).
    let mid = allocprof::stats().live_samples - s0.live_samples;
    let blocks = live.len() as u64;
    assert!(
        (blocks + 1..=blocks + 3).contains(&mid),
        "{mid} live samples for {blocks} blocks and their vector"
    );
    for (p, layout) in live.drain(..) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(black_box(p), layout) };
    }
    drop(live);
    COUNTED.with(|c| c.set(false));
    let s1 = allocprof::stats();
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
    assert_eq!(
        OVERFLOWED.load(Ordering::Relaxed),
        0,
        "the ledger overflowed"
    );
    assert_eq!(
        ERRORS.load(Ordering::Relaxed),
        0,
        "frees or reallocs that named no block the inner allocator handed out, or \
         named one with another layout"
    );
    assert!(
        s1.live_samples <= s0.live_samples + 2,
        "{} sampled blocks not credited",
        s1.live_samples - s0.live_samples
    );
    assert_eq!(s1.untracked_samples, s0.untracked_samples, "none untracked");
    assert_eq!(
        LIVE_BLOCKS.load(Ordering::Relaxed),
        0,
        "blocks the test allocated and the inner allocator did not get back"
    );
}
