//! The live set: which pointers are sampled allocations that have not been freed yet.
//!
//! Every free asks "is this pointer sampled?", and almost always the answer is no. That
//! answer must be cheap and lock-free (DESIGN invariant 5), so the set is an
//! open-addressing hash table of atomic words in static memory:
//!
//! * **Readers** (every free and realloc) hash the pointer and first test one bit of an
//!   8 KiB filter (65536 bits, one per cache line of the table, set while any tracked
//!   pointer has its home slot in that line). The filter stays in the L1 cache, so the
//!   common answer — not sampled — costs one cached load. Only when the bit is set (the
//!   pointer is sampled, or shares a line with one: about `live / 65536` of frees) do they
//!   probe the slots with plain atomic loads until they find it or an empty slot. No lock,
//!   no read-modify-write.
//! * **Writers** (sampled allocations and frees of sampled objects, one per 512 KiB on
//!   average) are serialized per *stripe*: the table is [`STRIPES`] independent
//!   open-addressing tables (a pointer's stripe is given by the top bits of its hash, and
//!   its probe sequence wraps around inside the stripe), each with its own mutex guarding
//!   its slots' metadata and its lines' filter counts. One global mutex was taken twice
//!   per sampled object, and when every allocation is sampled (large buffers) two threads
//!   spent a tenth of their time passing its cache line back and forth.
//!
//! The table is laid out in 64-byte lines of two slots: both pointers, both slots'
//! metadata, and the count behind the line's filter bit. A sampled object's insertion,
//! its free's probe and its removal then all touch one line (two if its probe runs on),
//! where separate arrays for pointers, metadata and filter counts cost three cache misses
//! each time in a program that keeps the cache busy.
//!
//! Removal leaves a tombstone, except that a tombstone followed by an empty slot is turned
//! back into an empty slot (and so on backwards). Entries never move, so a lookup for a
//! pointer that is in the set always finds it, whatever writers do concurrently: a
//! pointer is looked up only by the thread that frees it, after its insertion
//! happened-before (the program had to hand the pointer over to free it), and a slot on
//! the probe path of a present pointer is never made empty (the chain from its home slot
//! to it contains no empty slot, so no tombstone on it is followed by an empty slot).
//!
//! The table lives in `.bss`: 2^17 slots in 2^16 lines, 4 MiB; untouched pages cost
//! nothing. Where the kernel offers transparent huge pages (`madvise` mode or `always`),
//! the table asks for them at start-up, before the first sample: its accesses are to
//! random lines, and with 4 KiB pages each one also missed the TLB in a program churning
//! its heap. The price is that the first samples fault in 2 MiB pages (4 MiB in all),
//! which `Stats::profiler_bytes` counts.
//!
//! At most [`MAX_LIVE`] sampled objects are tracked at once (at most half of each
//! stripe's slots, so slightly fewer when pointers spread unevenly) — at the default rate
//! that is about 32 GiB of live sampled heap; beyond it new samples are still counted as
//! allocations but their frees cannot be credited, and `Stats::untracked_samples` says
//! how many.

use crate::lock::{ForkLock, Mutex};
use crate::table::StackId;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

const BITS: u32 = 17;
const CAP: usize = 1 << BITS;
const LINE_BITS: u32 = BITS - 1;
const LINES: usize = 1 << LINE_BITS;
/// Independent sub-tables, each with its own writer lock.
const STRIPES: usize = 16;
const STRIPE_SLOTS: usize = CAP / STRIPES;
/// Most sampled objects tracked at once (half the slots).
pub const MAX_LIVE: usize = CAP / 2;
/// Most tracked in one stripe.
const STRIPE_MAX_LIVE: usize = STRIPE_SLOTS / 2;
/// Live plus tombstones in a stripe never exceeds this, so absent lookups stay short.
const STRIPE_MAX_USED: usize = STRIPE_SLOTS * 5 / 8;

const EMPTY: usize = 0;
const TOMBSTONE: usize = 1;

/// What is remembered about a sampled object until it is freed. 16 bytes, so that a line
/// holds two. The weight is kept as an `f32`; the sampled path rounds it to `f32` before
/// recording the allocation too, so a free takes back exactly what was added.
#[derive(Clone, Copy)]
pub(crate) struct LiveMeta {
    pub(crate) stack: StackId,
    pub(crate) weight: f32,
    pub(crate) size: u64,
}

/// All zero bits, so that the table is zero-initialised and goes to `.bss` (anonymous
/// memory, not 4 MiB of the binary's file). An empty slot's metadata is never read.
const NO_META: LiveMeta = LiveMeta {
    stack: StackId::ZERO,
    weight: 0.0,
    size: 0,
};

/// Two slots and the filter count of the line.
#[repr(C, align(64))]
struct Line {
    keys: [AtomicUsize; 2],
    /// Written and read only under the lock of the line's stripe.
    meta: UnsafeCell<[LiveMeta; 2]>,
    /// Tracked pointers whose home slot is in this line; the line's filter bit is set iff
    /// it is not zero. Written and read only under the lock of the line's stripe.
    count: UnsafeCell<u32>,
}

const _: () = assert!(std::mem::size_of::<Line>() == 64);
const _: () = assert!(STRIPE_SLOTS.is_multiple_of(2));

// SAFETY: `keys` are atomics; `meta` and `count` are only accessed while holding the
// lock of the stripe the line belongs to (lines never straddle stripes; every access below
// goes through `meta` or `count_line`, which take the stripe's `&mut Writer` as witness),
// so they are never accessed concurrently.
unsafe impl Sync for Line {}

#[allow(clippy::declare_interior_mutable_const)] // used only as the array initialiser
const EMPTY_LINE: Line = Line {
    keys: [const { AtomicUsize::new(EMPTY) }; 2],
    meta: UnsafeCell::new([NO_META; 2]),
    count: UnsafeCell::new(0),
};

/// Bytes of a transparent huge page (x86_64 and aarch64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// The table's storage: `LINES` lines starting at the first huge-page boundary inside it
/// (see [`lines`]). The lines before that boundary are never touched, so they cost
/// address space only. The table is not declared with a 2 MiB alignment because loaders
/// are not obliged to honour segment alignments above the page size.
static STORAGE: [Line; LINES + HUGE_PAGE / 64] = [EMPTY_LINE; LINES + HUGE_PAGE / 64];

/// The table: `LINES` lines at a huge-page boundary of [`STORAGE`].
#[inline(always)]
fn lines() -> &'static [Line] {
    let skip = (STORAGE.as_ptr() as usize).wrapping_neg() % HUGE_PAGE / 64;
    &STORAGE[skip..skip + LINES]
}

/// Asks the kernel to back the table with transparent huge pages. Called once, from the
/// start-up settings (`config`), before the first sample touches the table, unless
/// `ALLOCPROF_HUGE_PAGES=0`. Every access to the table is to a random line, and in a
/// program that churns its heap the 1024 small pages' translations miss the TLB: under
/// virtualization a probe that missed both cost about 250 ns. Without THP (or with it
/// set to `never`) the table keeps small pages.
pub(crate) fn advise_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        let t = lines();
        // SAFETY: the range is the table's own memory, page-aligned (a huge-page boundary)
        // and mapped; MADV_HUGEPAGE only changes how the kernel backs it, never its
        // contents.
        let done = unsafe {
            libc::madvise(
                t.as_ptr() as *mut libc::c_void,
                std::mem::size_of_val(t),
                libc::MADV_HUGEPAGE,
            )
        } == 0;
        HUGE.store(done, Ordering::Relaxed);
    }
}

/// Whether the table was advised to use huge pages (then a touch faults in 2 MiB).
static HUGE: AtomicBool = AtomicBool::new(false);

/// An upper bound on the table's resident bytes after `samples` samples: each touched at
/// most two pages (its slot's line, and the next if its probe ran on).
pub(crate) fn resident_bound(samples: u64) -> usize {
    let page = if HUGE.load(Ordering::Relaxed) {
        HUGE_PAGE
    } else {
        4096
    };
    (samples as usize).saturating_mul(2 * page).min(BYTES)
}

/// Bit `b` is set iff line `b` has a non-zero count. Set before the pointer's slot is
/// published and cleared after it is removed, both under the writer lock.
static FILTER: [AtomicU64; LINES / 64] = [const { AtomicU64::new(0) }; LINES / 64];

/// A stripe's writer state, guarded by its lock.
struct Writer {
    live: usize,
    tombstones: usize,
}

/// A stripe's lock and its live count (written under the lock, read without), on lines of
/// their own.
#[repr(align(128))]
struct Stripe {
    writer: Mutex<Writer>,
    live: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // used only as the array initialiser
const NEW_STRIPE: Stripe = Stripe {
    writer: Mutex::new(Writer {
        live: 0,
        tombstones: 0,
    }),
    live: AtomicUsize::new(0),
};

static STRIPE: [Stripe; STRIPES] = [NEW_STRIPE; STRIPES];
static UNTRACKED: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
fn hash(ptr: usize) -> u64 {
    (ptr as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The pointer's home slot.
#[inline(always)]
fn home(ptr: usize) -> usize {
    (hash(ptr) >> (64 - BITS)) as usize
}

/// The slot after `i` in its stripe's probe order.
#[inline(always)]
fn next(i: usize) -> usize {
    (i & !(STRIPE_SLOTS - 1)) | ((i + 1) & (STRIPE_SLOTS - 1))
}

/// The slot before `i` in its stripe's probe order.
#[inline(always)]
fn prev(i: usize) -> usize {
    (i & !(STRIPE_SLOTS - 1)) | (i.wrapping_sub(1) & (STRIPE_SLOTS - 1))
}

/// The stripe of slot `i`.
#[inline(always)]
fn stripe(i: usize) -> &'static Stripe {
    &STRIPE[i / STRIPE_SLOTS]
}

/// Slot `i`'s key.
#[inline(always)]
fn key(i: usize) -> &'static AtomicUsize {
    &lines()[i >> 1].keys[i & 1]
}

/// A line's filter bit: (word, mask).
#[inline(always)]
fn filter_bit(line: usize) -> (usize, u64) {
    (line >> 6, 1 << (line & 63))
}

/// Is `ptr` a tracked sampled allocation? Lock-free; the common answer is `false`.
#[inline(always)]
pub(crate) fn contains(ptr: usize) -> bool {
    may_contain(ptr) && probe(ptr)
}

/// The filter test alone: `false` means `ptr` is certainly not tracked; `true` means it may
/// be (then [`probe`] decides). One cached load.
#[inline(always)]
pub(crate) fn may_contain(ptr: usize) -> bool {
    let (word, mask) = filter_bit(home(ptr) >> 1);
    // Acquire pairs with the Release in `insert`: a pointer handed to this thread after
    // its insertion has its bit visible here.
    FILTER[word].load(Ordering::Acquire) & mask != 0
}

/// Whether `ptr` is in the table (lock-free), after [`may_contain`] said it may be.
#[cold]
#[inline(never)]
fn probe(ptr: usize) -> bool {
    let mut i = home(ptr);
    // Bounded: a stripe always keeps empty slots (STRIPE_MAX_USED < STRIPE_SLOTS), but a
    // bound costs nothing and makes termination obvious.
    for _ in 0..STRIPE_SLOTS {
        let v = key(i).load(Ordering::Acquire);
        if v == ptr {
            return true;
        }
        if v == EMPTY {
            return false;
        }
        i = next(i);
    }
    false
}

/// Starts loading the line `ptr` would be inserted at, so that the cache miss overlaps the
/// stack capture that comes before the insertion.
#[inline(always)]
pub(crate) fn prefetch(ptr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and has no effect on program
    // semantics; SSE is part of the x86_64 baseline.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((&lines()[home(ptr) >> 1] as *const Line).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// Adds `delta` to the count of `line` and keeps its filter bit in step. Under the lock
/// of the line's stripe.
fn count_line(_w: &mut Writer, line: usize, delta: i32) {
    // SAFETY: the caller holds the lock of the line's stripe (witnessed by `_w`), the only
    // way to reach a line's count.
    let count = unsafe { &mut *lines()[line].count.get() };
    let before = *count;
    *count = count.wrapping_add_signed(delta);
    let (word, mask) = filter_bit(line);
    // Only writers change the filter, under the lock: no read-modify-write needed.
    if before == 0 && *count != 0 {
        let bits = FILTER[word].load(Ordering::Relaxed);
        FILTER[word].store(bits | mask, Ordering::Release);
    } else if before != 0 && *count == 0 {
        let bits = FILTER[word].load(Ordering::Relaxed);
        FILTER[word].store(bits & !mask, Ordering::Release);
    }
}

/// Slot `i`'s metadata. Under the lock of its stripe.
fn meta(_w: &mut Writer, i: usize) -> &mut LiveMeta {
    // SAFETY: the caller holds the lock of slot `i`'s stripe (witnessed by the
    // `&mut Writer`, whose borrow bounds the returned one), the only way to reach slot
    // metadata.
    unsafe { &mut (*lines()[i >> 1].meta.get())[i & 1] }
}

/// Starts tracking `ptr`. Returns `false` (and counts it) when the set is full.
/// Sampled path only.
pub(crate) fn insert(ptr: usize, m: LiveMeta) -> bool {
    if ptr <= TOMBSTONE {
        return false;
    }
    let h = home(ptr);
    let st = stripe(h);
    let mut guard = st.writer.lock();
    let w = &mut *guard;
    if w.live >= STRIPE_MAX_LIVE || w.live + w.tombstones >= STRIPE_MAX_USED {
        drop(guard);
        UNTRACKED.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let mut i = h;
    loop {
        let v = key(i).load(Ordering::Relaxed);
        if v == EMPTY || v == TOMBSTONE {
            if v == TOMBSTONE {
                w.tombstones -= 1;
            }
            *meta(w, i) = m;
            w.live += 1;
            st.live.store(w.live, Ordering::Relaxed);
            count_line(w, h >> 1, 1);
            // Release: the owner's later lookup (after a happens-before hand-over) sees it.
            key(i).store(ptr, Ordering::Release);
            return true;
        }
        if v == ptr {
            // Cannot happen for a correct program (the inner allocator returned a pointer
            // that is still live); keep the newer record.
            *meta(w, i) = m;
            return true;
        }
        i = next(i);
    }
}

/// Stops tracking `ptr` and returns what was recorded for it, if it was tracked.
pub(crate) fn remove(ptr: usize) -> Option<LiveMeta> {
    let h = home(ptr);
    let st = stripe(h);
    let mut guard = st.writer.lock();
    let w = &mut *guard;
    let mut i = h;
    for _ in 0..STRIPE_SLOTS {
        let v = key(i).load(Ordering::Relaxed);
        if v == EMPTY {
            return None;
        }
        if v == ptr {
            let m = *meta(w, i);
            w.live -= 1;
            st.live.store(w.live, Ordering::Relaxed);
            if key(next(i)).load(Ordering::Relaxed) == EMPTY {
                key(i).store(EMPTY, Ordering::Release);
                // Tombstones directly before an empty slot are on no present pointer's
                // probe path: clear them too.
                let mut j = prev(i);
                while key(j).load(Ordering::Relaxed) == TOMBSTONE {
                    key(j).store(EMPTY, Ordering::Release);
                    w.tombstones -= 1;
                    j = prev(j);
                }
            } else {
                key(i).store(TOMBSTONE, Ordering::Release);
                w.tombstones += 1;
            }
            count_line(w, h >> 1, -1);
            return Some(m);
        }
        i = next(i);
    }
    None
}

/// Sampled objects tracked now.
pub(crate) fn live_count() -> usize {
    STRIPE.iter().map(|s| s.live.load(Ordering::Relaxed)).sum()
}

/// Samples whose frees could not be tracked because the set was full.
pub(crate) fn untracked() -> u64 {
    UNTRACKED.load(Ordering::Relaxed)
}

/// Bytes of the live set's static table that can be touched.
pub(crate) const BYTES: usize = LINES * std::mem::size_of::<Line>();

/// The live set's writer locks, in locking order, for `fork.rs`.
pub(crate) fn fork_locks() -> impl DoubleEndedIterator<Item = &'static impl ForkLock> {
    STRIPE.iter().map(|s| &s.writer)
}
