//! The live set: which pointers are sampled allocations that have not been freed yet.
//!
//! Every free asks "is this pointer sampled?", and almost always the answer is no. That
//! answer must be cheap and lock-free (DESIGN invariant 5), so the set is an
//! open-addressing hash table of atomic words in static memory:
//!
//! * **Readers** (every free and realloc) hash the pointer and first test one bit of an
//!   8 KiB filter (65536 bits, one per hash bucket, set while any tracked pointer hashes
//!   there). The filter stays in the L1 cache, so the common answer — not sampled — costs
//!   one cached load, where probing the 1 MiB slot table directly missed the cache on
//!   frees of scattered pointers. Only when the bit is set (the pointer is sampled, or
//!   shares a bucket with one: about `live / 65536` of frees) do they probe the slots with
//!   plain atomic loads until they find it or an empty slot. No lock, no
//!   read-modify-write.
//! * **Writers** (sampled allocations and frees of sampled objects, one per 512 KiB on
//!   average) are serialized by one mutex, which also guards the per-slot metadata.
//!
//! Removal leaves a tombstone, except that a tombstone followed by an empty slot is turned
//! back into an empty slot (and so on backwards). Entries never move, so a lookup for a
//! pointer that is in the set always finds it, whatever writers do concurrently: a
//! pointer is looked up only by the thread that frees it, after its insertion
//! happened-before (the program had to hand the pointer over to free it), and a slot on
//! the probe path of a present pointer is never made empty (the chain from its home slot
//! to it contains no empty slot, so no tombstone on it is followed by an empty slot).
//!
//! The table lives in `.bss`: 2^17 slots (1 MiB), their metadata (3 MiB), the filter
//! (8 KiB) and its per-bit counts (256 KiB); untouched pages cost nothing. At most [`MAX_LIVE`] sampled objects are tracked at once — at the
//! default rate that is about 32 GiB of live sampled heap; beyond it new samples are
//! still counted as allocations but their frees cannot be credited, and
//! `Stats::untracked_samples` says how many.

use crate::lock::{ForkLock, Mutex};
use crate::table::StackId;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const BITS: u32 = 17;
const CAP: usize = 1 << BITS;
/// Most sampled objects tracked at once (half the slots).
pub const MAX_LIVE: usize = CAP / 2;
/// Live plus tombstones never exceeds this, so absent lookups stay short.
const MAX_USED: usize = CAP * 5 / 8;

const EMPTY: usize = 0;
const TOMBSTONE: usize = 1;

/// What is remembered about a sampled object until it is freed.
#[derive(Clone, Copy)]
pub(crate) struct LiveMeta {
    pub(crate) stack: StackId,
    pub(crate) size: usize,
    pub(crate) weight: f64,
}

const NO_META: LiveMeta = LiveMeta {
    stack: StackId::OVERFLOW,
    size: 0,
    weight: 0.0,
};

const FILTER_BITS: u32 = 16;

struct Writer {
    meta: [LiveMeta; CAP],
    /// Tracked pointers per filter bit.
    filter_counts: [u32; 1 << FILTER_BITS],
    live: usize,
    tombstones: usize,
}

static SLOTS: [AtomicUsize; CAP] = [const { AtomicUsize::new(EMPTY) }; CAP];
/// Bit `b` is set iff some tracked pointer has filter index `b`. Set before the pointer's
/// slot is published and cleared after it is removed, both under the writer lock.
static FILTER: [AtomicU64; 1 << (FILTER_BITS - 6)] =
    [const { AtomicU64::new(0) }; 1 << (FILTER_BITS - 6)];
static WRITER: Mutex<Writer> = Mutex::new(Writer {
    meta: [NO_META; CAP],
    filter_counts: [0; 1 << FILTER_BITS],
    live: 0,
    tombstones: 0,
});
static UNTRACKED: AtomicU64 = AtomicU64::new(0);
static LIVE_COUNT: AtomicUsize = AtomicUsize::new(0);

#[inline(always)]
fn hash(ptr: usize) -> u64 {
    (ptr as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[inline(always)]
fn home(ptr: usize) -> usize {
    (hash(ptr) >> (64 - BITS)) as usize
}

/// The pointer's filter bit: (word, mask). Independent bits of the hash from `home`'s
/// top bits would not help: what matters is that it is cheap and spreads pointers.
#[inline(always)]
fn filter_bit(ptr: usize) -> (usize, u64) {
    let b = ((hash(ptr) >> 24) & ((1 << FILTER_BITS) - 1)) as usize;
    (b >> 6, 1 << (b & 63))
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
    let (word, mask) = filter_bit(ptr);
    // Acquire pairs with the Release in `insert`: a pointer handed to this thread after
    // its insertion has its bit visible here.
    FILTER[word].load(Ordering::Acquire) & mask != 0
}

/// Whether `ptr` is in the slot table (lock-free), after [`may_contain`] said it may be.
#[cold]
#[inline(never)]
pub(crate) fn probe(ptr: usize) -> bool {
    let mut i = home(ptr);
    // Bounded: the table always keeps empty slots (MAX_USED < CAP), but a bound costs
    // nothing and makes termination obvious.
    for _ in 0..CAP {
        let v = SLOTS[i].load(Ordering::Acquire);
        if v == ptr {
            return true;
        }
        if v == EMPTY {
            return false;
        }
        i = (i + 1) & (CAP - 1);
    }
    false
}

/// Starts tracking `ptr`. Returns `false` (and counts it) when the set is full.
/// Sampled path only.
pub(crate) fn insert(ptr: usize, meta: LiveMeta) -> bool {
    if ptr <= TOMBSTONE {
        return false;
    }
    let mut w = WRITER.lock();
    if w.live >= MAX_LIVE || w.live + w.tombstones >= MAX_USED {
        drop(w);
        UNTRACKED.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let mut i = home(ptr);
    loop {
        let v = SLOTS[i].load(Ordering::Relaxed);
        if v == EMPTY || v == TOMBSTONE {
            if v == TOMBSTONE {
                w.tombstones -= 1;
            }
            w.meta[i] = meta;
            w.live += 1;
            LIVE_COUNT.store(w.live, Ordering::Relaxed);
            let (word, mask) = filter_bit(ptr);
            let b = word * 64 + mask.trailing_zeros() as usize;
            w.filter_counts[b] += 1;
            if w.filter_counts[b] == 1 {
                // Only writers change the filter, under the lock: no read-modify-write.
                let bits = FILTER[word].load(Ordering::Relaxed);
                FILTER[word].store(bits | mask, Ordering::Release);
            }
            // Release: the owner's later lookup (after a happens-before hand-over) sees it.
            SLOTS[i].store(ptr, Ordering::Release);
            return true;
        }
        if v == ptr {
            // Cannot happen for a correct program (the inner allocator returned a pointer
            // that is still live); keep the newer record.
            w.meta[i] = meta;
            return true;
        }
        i = (i + 1) & (CAP - 1);
    }
}

/// Stops tracking `ptr` and returns what was recorded for it, if it was tracked.
pub(crate) fn remove(ptr: usize) -> Option<LiveMeta> {
    let mut w = WRITER.lock();
    let mut i = home(ptr);
    for _ in 0..CAP {
        let v = SLOTS[i].load(Ordering::Relaxed);
        if v == EMPTY {
            return None;
        }
        if v == ptr {
            let meta = w.meta[i];
            w.live -= 1;
            LIVE_COUNT.store(w.live, Ordering::Relaxed);
            let next = (i + 1) & (CAP - 1);
            if SLOTS[next].load(Ordering::Relaxed) == EMPTY {
                SLOTS[i].store(EMPTY, Ordering::Release);
                // Tombstones directly before an empty slot are on no present pointer's
                // probe path: clear them too.
                let mut j = i.wrapping_sub(1) & (CAP - 1);
                while SLOTS[j].load(Ordering::Relaxed) == TOMBSTONE {
                    SLOTS[j].store(EMPTY, Ordering::Release);
                    w.tombstones -= 1;
                    j = j.wrapping_sub(1) & (CAP - 1);
                }
            } else {
                SLOTS[i].store(TOMBSTONE, Ordering::Release);
                w.tombstones += 1;
            }
            let (word, mask) = filter_bit(ptr);
            let b = word * 64 + mask.trailing_zeros() as usize;
            w.filter_counts[b] -= 1;
            if w.filter_counts[b] == 0 {
                let bits = FILTER[word].load(Ordering::Relaxed);
                FILTER[word].store(bits & !mask, Ordering::Release);
            }
            return Some(meta);
        }
        i = (i + 1) & (CAP - 1);
    }
    None
}

/// Sampled objects tracked now.
pub(crate) fn live_count() -> usize {
    LIVE_COUNT.load(Ordering::Relaxed)
}

/// Samples whose frees could not be tracked because the set was full.
pub(crate) fn untracked() -> u64 {
    UNTRACKED.load(Ordering::Relaxed)
}

/// Bytes of the live set's static tables that can be touched.
pub(crate) const BYTES: usize =
    CAP * (std::mem::size_of::<usize>() + std::mem::size_of::<LiveMeta>());

/// The live set's writer lock, for `fork.rs`.
pub(crate) fn fork_lock() -> &'static impl ForkLock {
    &WRITER
}
