//! The live set: which pointers are sampled allocations that have not been freed yet.
//!
//! Every free asks "is this pointer sampled?", and almost always the answer is no. That
//! answer must be cheap and lock-free (DESIGN invariant 5), so the set is an
//! open-addressing hash table of atomic words in static memory:
//!
//! * **Readers** (every free and realloc) hash the pointer and first test one bit of an
//!   8 KiB filter (65536 bits, one per cache line of the table, set while any tracked
//!   pointer has that line as its home). The filter is small enough to stay in the L1 or
//!   L2 cache, so the common answer — not sampled — costs one cached load. Only when the
//!   bit is set (the pointer is sampled, or shares a home line with one: about
//!   `live / 65536` of frees) do they look the pointer up, line by line (below), with
//!   plain atomic loads. No lock, no read-modify-write.
//! * **Writers** (sampled allocations and frees of sampled objects, one per 512 KiB on
//!   average) are serialized per *stripe*: the table is [`STRIPES`] independent
//!   open-addressing tables (a pointer's stripe is given by the top bits of its hash, and
//!   its probe sequence wraps around inside the stripe), each with its own mutex guarding
//!   its slots' metadata and its lines' filter counts. One global mutex was taken twice
//!   per sampled object, and when every allocation is sampled (large buffers) two threads
//!   spent a tenth of their time passing its cache line back and forth.
//!
//! The table is laid out in 64-byte lines of two slots: both pointers, both slots'
//! metadata, the count behind the line's filter bit and the line's `passed` count. A
//! sampled object's insertion, its free's probe and its removal then all touch one line
//! (more only if its probe runs on), where separate arrays for pointers, metadata and
//! filter counts cost three cache misses each time in a program that keeps the cache
//! busy.
//!
//! Lookups go line by line: a pointer's home is a line, it is stored in the first line
//! of its stripe from there on with a free slot, and every line it passed on the way
//! counts it in `passed`. A lookup that misses in a line goes on only while that line's
//! `passed` is not zero, and a removal empties its slot and takes its count back from
//! the lines it passed. So there are no tombstones, and a removal from a line that no
//! probe passes (all of them, in a table this sparse) touches no other line: where the
//! slot-by-slot table before it read a neighbouring line at every removal to decide
//! between an empty slot and a tombstone, a cache miss on every sampled free. Entries
//! never move, so a lookup for a pointer that is in the set always finds it, whatever
//! writers do concurrently: a pointer is looked up only by the thread that frees it,
//! after its insertion happened-before (the program had to hand the pointer over to free
//! it), and the lines it passed keep its count until it is removed.
//!
//! The table lives in `.bss`: 2^17 slots in 2^16 lines, 4 MiB; untouched pages cost
//! nothing. Where the kernel offers transparent huge pages (`madvise` mode or `always`),
//! the table asks for them at start-up, before the first sample: its accesses are to
//! random lines, and with 4 KiB pages each one also missed the TLB in a program churning
//! its heap. The price is that the first samples fault in 2 MiB pages (4 MiB in all),
//! which `Stats::profiler_bytes` counts. A page's first touch is a write (see
//! [`first_touch_for_write`]), so that the kernel faults it in once.
//!
//! At most [`MAX_LIVE`] sampled objects are tracked at once (at most half of each
//! stripe's slots, so slightly fewer when pointers spread unevenly) — at the default rate
//! that is about 32 GiB of live sampled heap; beyond it new samples are still counted as
//! allocations but their frees cannot be credited, and `Stats::untracked_samples` says
//! how many.

use crate::lock::{ForkLock, Mutex};
use crate::table::StackId;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

const BITS: u32 = 17;
const CAP: usize = 1 << BITS;
const LINE_BITS: u32 = BITS - 1;
const LINES: usize = 1 << LINE_BITS;
/// Independent sub-tables, each with its own writer lock.
const STRIPES: usize = 16;
const STRIPE_SLOTS: usize = CAP / STRIPES;
const STRIPE_LINES: usize = LINES / STRIPES;
/// Most sampled objects tracked at once (half the slots).
pub const MAX_LIVE: usize = CAP / 2;
/// Most tracked in one stripe.
const STRIPE_MAX_LIVE: usize = STRIPE_SLOTS / 2;

const EMPTY: usize = 0;

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

/// Two slots, their metadata and the line's two counts.
#[repr(C, align(64))]
struct Line {
    keys: [AtomicUsize; 2],
    /// Tracked pointers stored beyond this line whose probe passed it: their home line
    /// comes before it in their stripe's probe order, and both its slots were taken when
    /// they were inserted. Written under the lock of the line's stripe, read without.
    passed: AtomicU32,
    /// Never read: stored to once before the first read of the line's page, so that the
    /// page's first touch is a write (see [`first_touch_for_write`]). In what would
    /// otherwise be padding.
    written: AtomicU32,
    /// Written and read only under the lock of the line's stripe.
    meta: UnsafeCell<[LiveMeta; 2]>,
    /// Tracked pointers whose home is this line; the line's filter bit is set iff
    /// it is not zero. Written and read only under the lock of the line's stripe.
    count: UnsafeCell<u32>,
}

const _: () = assert!(std::mem::size_of::<Line>() == 64);
const _: () = assert!(LINES.is_multiple_of(STRIPES));

// SAFETY: `keys` are atomics; `meta` and `count` are only accessed while holding the
// lock of the stripe the line belongs to (lines never straddle stripes; every access below
// goes through `meta` or `count_line`, which take the stripe's `&mut Writer` as witness),
// so they are never accessed concurrently.
unsafe impl Sync for Line {}

#[allow(clippy::declare_interior_mutable_const)] // used only as the array initialiser
const EMPTY_LINE: Line = Line {
    keys: [const { AtomicUsize::new(EMPTY) }; 2],
    passed: AtomicU32::new(0),
    written: AtomicU32::new(0),
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

/// Writes to every page of the filter and of [`WRITTEN`] once, so that no read of them
/// maps the zero page that a sample's write must then replace (see
/// [`first_touch_for_write`]). Called once, from the start-up settings (`config`), at the
/// process's first allocation event, normally before any free has read the filter and
/// before the process has a second thread.
pub(crate) fn touch_for_write() {
    let words_per_page = SMALL_PAGE / std::mem::size_of::<AtomicU64>();
    for bits in [&FILTER[..], &WRITTEN[..]] {
        for word in (0..bits.len())
            .step_by(words_per_page)
            .chain([bits.len() - 1])
        {
            // OR-ing in nothing changes no bit, whatever other threads do meanwhile. The
            // zero is hidden from the optimizer, which would otherwise drop the operation
            // or make it a load. (On x86_64 it is one locked write; a load-exclusive and a
            // store elsewhere, still cheap once at start-up.)
            bits[word].fetch_or(std::hint::black_box(0), Ordering::Relaxed);
        }
    }
}

/// Whether the table was advised to use huge pages (then a touch faults in 2 MiB).
static HUGE: AtomicBool = AtomicBool::new(false);

/// An upper bound on the table's resident bytes after `samples` samples: each touched at
/// most two pages (its home line, and the next if its probe ran on; a probe would have to
/// pass 64 full lines to reach a third).
pub(crate) fn resident_bound(samples: u64) -> usize {
    let page = if HUGE.load(Ordering::Relaxed) {
        HUGE_PAGE
    } else {
        SMALL_PAGE
    };
    (samples as usize).saturating_mul(2 * page).min(BYTES)
}

/// Bit `b` is set iff line `b` has a non-zero count. Set before the pointer's slot is
/// published and cleared after it is removed, both under the writer lock.
static FILTER: [AtomicU64; LINES / 64] = [const { AtomicU64::new(0) }; LINES / 64];

/// A stripe's writer state, guarded by its lock.
struct Writer {
    live: usize,
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
    writer: Mutex::new(Writer { live: 0 }),
    live: AtomicUsize::new(0),
};

static STRIPE: [Stripe; STRIPES] = [NEW_STRIPE; STRIPES];
static UNTRACKED: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
fn hash(ptr: usize) -> u64 {
    (ptr as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The pointer's home line.
#[inline(always)]
fn home(ptr: usize) -> usize {
    (hash(ptr) >> (64 - LINE_BITS)) as usize
}

/// The line after `l` in its stripe's probe order.
#[inline(always)]
fn next(l: usize) -> usize {
    (l & !(STRIPE_LINES - 1)) | ((l + 1) & (STRIPE_LINES - 1))
}

/// The stripe of line `l`.
#[inline(always)]
fn stripe(l: usize) -> &'static Stripe {
    &STRIPE[l / STRIPE_LINES]
}

/// Line `l`.
#[inline(always)]
fn line(l: usize) -> &'static Line {
    &lines()[l]
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
    let (word, mask) = filter_bit(home(ptr));
    // Acquire pairs with the Release in `insert`: a pointer handed to this thread after
    // its insertion has its bit visible here.
    FILTER[word].load(Ordering::Acquire) & mask != 0
}

/// Whether `ptr` is in the table (lock-free), after [`may_contain`] said it may be.
#[cold]
#[inline(never)]
fn probe(ptr: usize) -> bool {
    find(ptr, |l| l.passed.load(Ordering::Acquire)).is_some()
}

/// A line's `passed` as a writer reads it, under the lock of the line's stripe (the only
/// place it changes).
fn passed_locked(l: &Line) -> u32 {
    l.passed.load(Ordering::Relaxed)
}

/// The line and slot holding `ptr`, searching from its home line while the lines it
/// misses in were passed by some probe (`passed` reads a line's count). Bounded: at most
/// every line of the stripe.
#[inline(always)]
fn find(ptr: usize, passed: impl Fn(&Line) -> u32) -> Option<(usize, usize)> {
    let mut l = home(ptr);
    for _ in 0..STRIPE_LINES {
        let t = line(l);
        for s in 0..2 {
            if t.keys[s].load(Ordering::Acquire) == ptr {
                return Some((l, s));
            }
        }
        if passed(t) == 0 {
            return None;
        }
        l = next(l);
    }
    None
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
        _mm_prefetch::<_MM_HINT_T0>((line(home(ptr)) as *const Line).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// Bytes of a small page.
const SMALL_PAGE: usize = 4096;

/// Small pages of the table, whether or not huge pages back them.
const SMALL_PAGES: usize = BYTES / SMALL_PAGE;

/// The table's small pages that have been written, one bit each.
static WRITTEN: [AtomicU64; SMALL_PAGES / 64] = [const { AtomicU64::new(0) }; SMALL_PAGES / 64];

/// Makes sure the first touch of line `l`'s page is a write. An insertion reads its home
/// line before it writes it; were that read the page's first touch, the kernel would map
/// the shared zero page (the huge zero page when the table has huge pages), and the write
/// that follows would replace that mapping, flushing the TLB of every CPU the process
/// runs on. That is an inter-processor interrupt, which on the benchmarks' VM cost about
/// 70 µs for each of the two huge pages, and one more for every small page touched with
/// `ALLOCPROF_HUGE_PAGES=0` (`benches/runs/2026-12-02-1243-first-touch.txt`). After the
/// first write to a page this is one load of a line the sampled path keeps warm.
#[inline(always)]
fn first_touch_for_write(l: usize) {
    let page = l * std::mem::size_of::<Line>() / SMALL_PAGE;
    let (word, mask) = (page / 64, 1u64 << (page % 64));
    if WRITTEN[word].load(Ordering::Relaxed) & mask == 0 {
        first_write(l, word, mask);
    }
}

#[cold]
#[inline(never)]
fn first_write(l: usize, word: usize, mask: u64) {
    // A plain store, on every architecture a write access from the first touch (a
    // read-modify-write may be a load-exclusive first). Nothing reads `written`.
    line(l).written.store(1, Ordering::Relaxed);
    WRITTEN[word].fetch_or(mask, Ordering::Relaxed);
}

/// Adds `delta` to the count of `line` and keeps its filter bit in step. Under the lock
/// of the line's stripe.
fn count_line(_w: &mut Writer, line: usize, delta: i32) {
    // SAFETY: the caller holds the lock of the line's stripe (witnessed by `_w`), the only
    // way to reach a line's count.
    let count = unsafe { &mut *self::line(line).count.get() };
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

/// The metadata of slot `s` of line `l`. Under the lock of its stripe.
fn meta(_w: &mut Writer, l: usize, s: usize) -> &mut LiveMeta {
    // SAFETY: the caller holds the lock of line `l`'s stripe (witnessed by the
    // `&mut Writer`, whose borrow bounds the returned one), the only way to reach slot
    // metadata.
    unsafe { &mut (*line(l).meta.get())[s] }
}

/// Adds `delta` to `passed` of the lines from `from` up to (not including) `to`. Under
/// the lock of their stripe; only writers change `passed`, so no read-modify-write.
fn count_passed(_w: &mut Writer, from: usize, to: usize, delta: i32) {
    let mut l = from;
    while l != to {
        let p = &line(l).passed;
        p.store(
            p.load(Ordering::Relaxed).wrapping_add_signed(delta),
            Ordering::Release,
        );
        l = next(l);
    }
}

/// Starts tracking `ptr`. Returns `false` (and counts it) when the set is full.
/// Sampled path only.
pub(crate) fn insert(ptr: usize, m: LiveMeta) -> bool {
    if ptr == EMPTY {
        return false;
    }
    let h = home(ptr);
    let st = stripe(h);
    let mut guard = st.writer.lock();
    let w = &mut *guard;
    // Before `find` reads the home line. The lines it reads after that were written
    // already: it goes on past a line only if a probe passed it full.
    first_touch_for_write(h);
    if let Some((l, s)) = find(ptr, passed_locked) {
        // Cannot happen for a correct program (the inner allocator returned a pointer
        // that is still live); keep the newer record.
        *meta(w, l, s) = m;
        return true;
    }
    if w.live >= STRIPE_MAX_LIVE {
        drop(guard);
        UNTRACKED.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    // The first line from home with a free slot; one exists, since at most half the
    // stripe's slots are taken.
    let mut l = h;
    for _ in 0..STRIPE_LINES {
        let t = line(l);
        if let Some(s) = (0..2).find(|&s| t.keys[s].load(Ordering::Relaxed) == EMPTY) {
            *meta(w, l, s) = m;
            w.live += 1;
            st.live.store(w.live, Ordering::Relaxed);
            count_line(w, h, 1);
            count_passed(w, h, l, 1);
            // Release: the owner's later lookup (after a happens-before hand-over) sees it.
            t.keys[s].store(ptr, Ordering::Release);
            return true;
        }
        l = next(l);
        // The home line's page was written above; the next line may be on a page of its
        // own.
        first_touch_for_write(l);
    }
    false
}

/// Stops tracking `ptr` and returns what was recorded for it, if it was tracked.
pub(crate) fn remove(ptr: usize) -> Option<LiveMeta> {
    let h = home(ptr);
    let st = stripe(h);
    let mut guard = st.writer.lock();
    let w = &mut *guard;
    let (l, s) = find(ptr, passed_locked)?;
    let m = *meta(w, l, s);
    w.live -= 1;
    st.live.store(w.live, Ordering::Relaxed);
    line(l).keys[s].store(EMPTY, Ordering::Release);
    count_passed(w, h, l, -1);
    count_line(w, h, -1);
    Some(m)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pointer whose home is line `l`: the `n`th of them (the hash is a multiplication by
    /// an odd constant, so it can be inverted).
    fn homed_at(l: usize, n: usize) -> usize {
        let k: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut inv = k;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(k.wrapping_mul(inv)));
        }
        let h = ((l as u64) << (64 - LINE_BITS)) | (n as u64 + 1) << 8;
        let ptr = h.wrapping_mul(inv) as usize;
        assert_eq!(home(ptr), l);
        ptr
    }

    fn meta_of(size: u64) -> LiveMeta {
        LiveMeta {
            stack: StackId::ZERO,
            weight: 1.0,
            size,
        }
    }

    /// Recomputes every count of `l`'s stripe from its keys, under its lock, and compares:
    /// `passed`, the filter counts and bits, the live count. Holds with other entries in
    /// the stripe (the test binary samples its own allocations into the same set).
    fn check_stripe(l: usize) {
        let st = stripe(l);
        let guard = st.writer.lock();
        let first = l / STRIPE_LINES * STRIPE_LINES;
        let mut passed = vec![0u32; STRIPE_LINES];
        let mut homes = vec![0u32; STRIPE_LINES];
        let mut live = 0;
        for at in first..first + STRIPE_LINES {
            for s in 0..2 {
                let k = line(at).keys[s].load(Ordering::Relaxed);
                if k == EMPTY {
                    continue;
                }
                live += 1;
                let h = home(k);
                assert_eq!(h / STRIPE_LINES, l / STRIPE_LINES, "stored in its stripe");
                homes[h - first] += 1;
                let mut p = h;
                while p != at {
                    passed[p - first] += 1;
                    p = next(p);
                }
            }
        }
        assert_eq!(guard.live, live, "live count");
        for at in first..first + STRIPE_LINES {
            let t = line(at);
            assert_eq!(
                t.passed.load(Ordering::Relaxed),
                passed[at - first],
                "passed"
            );
            // SAFETY: under the stripe's lock.
            let count = unsafe { *t.count.get() };
            assert_eq!(count, homes[at - first], "filter count of line {at}");
            let (word, mask) = filter_bit(at);
            let bit = FILTER[word].load(Ordering::Relaxed) & mask != 0;
            assert_eq!(bit, count != 0, "filter bit of line {at}");
        }
    }

    #[test]
    fn colliding_pointers_chain_and_come_out_in_any_order() {
        // The last line of stripe 3: the chain wraps to the stripe's first line.
        let l = 4 * STRIPE_LINES - 1;
        let ptrs: Vec<usize> = (0..7).map(|n| homed_at(l, n)).collect();
        for (i, &p) in ptrs.iter().enumerate() {
            assert!(!contains(p));
            assert!(insert(p, meta_of(i as u64)));
            check_stripe(l);
        }
        assert!(ptrs.iter().all(|&p| contains(p)));
        // Wrapped inside the stripe, not into stripe 4.
        assert!(
            (0..2).any(|s| ptrs.contains(&line(3 * STRIPE_LINES).keys[s].load(Ordering::Relaxed)))
        );
        assert!(line(l).passed.load(Ordering::Relaxed) >= 5);
        let order = [3, 0, 6, 1, 5, 2, 4];
        for (k, &i) in order.iter().enumerate() {
            let m = remove(ptrs[i]).expect("tracked");
            assert_eq!(m.size, i as u64, "its own record");
            assert!(!contains(ptrs[i]));
            assert!(remove(ptrs[i]).is_none());
            check_stripe(l);
            for (j, &p) in ptrs.iter().enumerate() {
                let gone = order[..=k].contains(&j);
                assert_eq!(contains(p), !gone, "pointer {j} after removing {i}");
            }
        }
    }

    #[test]
    fn a_free_slot_before_a_present_pointer_does_not_hide_it_or_duplicate_it() {
        let l = 7 * STRIPE_LINES + 100;
        let [a, b, c] = [0, 1, 2].map(|n| homed_at(l, n + 20));
        for p in [a, b, c] {
            assert!(insert(p, meta_of(1)));
        }
        // `c` sits in the next line; the slot `a` leaves is free but the search goes on.
        assert!(remove(a).is_some());
        assert!(contains(c));
        // Inserting `c` again (a pointer that is still tracked) keeps one entry.
        assert!(insert(c, meta_of(2)));
        assert_eq!(remove(c).map(|m| m.size), Some(2));
        assert!(!contains(c));
        assert!(remove(b).is_some());
        check_stripe(l);
    }

    #[test]
    fn lookups_find_a_pointer_while_its_neighbours_come_and_go() {
        let l = 11 * STRIPE_LINES + 7;
        // `far` sits two lines beyond its home, behind four neighbours.
        let near: Vec<usize> = (0..4).map(|n| homed_at(l, n + 40)).collect();
        for &p in &near {
            assert!(insert(p, meta_of(0)));
        }
        let far = homed_at(l, 50);
        let absent = homed_at(l, 51);
        assert!(insert(far, meta_of(9)));
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (mut missed, mut found_absent) = (0, 0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let p = near[n % near.len()];
                    assert!(remove(p).is_some());
                    assert!(insert(p, meta_of(0)));
                    n += 1;
                }
            });
            for _ in 0..200_000 {
                missed += usize::from(!contains(far));
                found_absent += usize::from(contains(absent));
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(missed, 0, "lookups that missed a tracked pointer");
        assert_eq!(found_absent, 0, "lookups that found an absent pointer");
        assert_eq!(remove(far).map(|m| m.size), Some(9));
        for &p in &near {
            assert!(remove(p).is_some());
        }
        check_stripe(l);
    }
}
