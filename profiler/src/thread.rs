//! Per-thread state: the sampling countdown, the unflushed exact totals and the
//! reentrancy mark, all in one `const`-initialised thread-local without `Drop`.
//!
//! # The fast path
//!
//! An allocation of `size` bytes does `alloc_left -= size; alloc_count += 1` and branches on
//! `alloc_left <= 0`; a free does the same with `free_left` / `free_count`. Nothing else: no
//! atomic read-modify-write, no lock, no call that could allocate. Because the thread-local
//! is `const`-initialised and has no destructor, accessing it compiles to a plain
//! TLS-relative load and store with no lazy-initialisation check.
//!
//! # Slow events
//!
//! `alloc_left` is armed with `min(distance to the next sample point, FLUSH_BYTES)`. When
//! it runs out, [`alloc_event`] publishes the bytes and counts consumed since arming (into
//! the thread's own slot of counters, see [`SLOT_COUNT`]; a plain load and store each),
//! decides whether the allocation that crossed
//! zero is sampled, and re-arms. So the exact totals are at most `FLUSH_BYTES` of
//! allocation (and as much of freeing) behind per running thread; that is the staleness
//! bound documented on [`crate::Stats`]. A thread that exits flushes what it holds from a
//! separate thread-local destructor registered on its first slow event.

use crate::config;
use crate::sampler::{self, Rng};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Largest amount of allocation (and, separately, of freeing) a thread keeps unflushed.
pub(crate) const FLUSH_BYTES: isize = 256 * 1024;

/// Distance meaning "no sample will ever be taken" (rate 0).
const NEVER: isize = isize::MAX / 4;

const PHASE_NEW: u8 = 0;
const PHASE_RUNNING: u8 = 1;
const PHASE_EXITING: u8 = 2;

pub(crate) struct ThreadState {
    /// Bytes of allocation left before the next slow event.
    alloc_left: Cell<isize>,
    /// The value `alloc_left` was last armed with (or reset to by a partial flush).
    alloc_armed: Cell<isize>,
    /// Distance from the arming point to the next sample point, in bytes.
    sample_left: Cell<isize>,
    /// Allocations since the last flush.
    alloc_count: Cell<u64>,
    /// Bytes of freeing left before the next free-side flush.
    free_left: Cell<isize>,
    free_armed: Cell<isize>,
    free_count: Cell<u64>,
    /// The rate epoch `sample_left` was drawn under.
    epoch: Cell<u64>,
    rng: Cell<u64>,
    busy: Cell<bool>,
    phase: Cell<u8>,
    /// This thread's slot of [`SLOTS`], or [`NO_SLOT`] (publish into [`TOTALS`]).
    slot: Cell<u16>,
}

thread_local! {
    static STATE: ThreadState = const {
        ThreadState {
            alloc_left: Cell::new(0),
            alloc_armed: Cell::new(0),
            sample_left: Cell::new(0),
            alloc_count: Cell::new(0),
            free_left: Cell::new(0),
            free_armed: Cell::new(0),
            free_count: Cell::new(0),
            epoch: Cell::new(u64::MAX),
            rng: Cell::new(0),
            busy: Cell::new(false),
            phase: Cell::new(PHASE_NEW),
            slot: Cell::new(NO_SLOT),
        }
    };
}

/// Flushes the exiting thread's counters. Registered lazily (on the thread's first slow
/// event, with the reentrancy mark set), never touched on the fast path.
struct ExitFlush;

impl Drop for ExitFlush {
    fn drop(&mut self) {
        STATE.with(|s| {
            s.phase.set(PHASE_EXITING);
            flush_partial(s);
            // Hand the slot back (its totals stay in it, see `Slot`); later events of this
            // thread publish into the shared totals.
            release_slot(s);
            // From now on every allocation and free of this thread flushes at once.
            s.alloc_left.set(0);
            s.alloc_armed.set(0);
            s.free_left.set(0);
            s.free_armed.set(0);
        });
    }
}

thread_local! {
    static EXIT_FLUSH: ExitFlush = const { ExitFlush };
}

/// Bytes and count of one direction of the exact totals.
struct Counts {
    bytes: AtomicU64,
    count: AtomicU64,
}

impl Counts {
    const fn new() -> Self {
        Counts {
            bytes: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Adds to counters only one thread writes (a slot's owner): a plain load and store
    /// each, no read-modify-write; readers see each word move forward.
    fn add_owned(&self, bytes: u64, count: u64) {
        self.bytes.store(
            self.bytes.load(Ordering::Relaxed) + bytes,
            Ordering::Relaxed,
        );
        self.count.store(
            self.count.load(Ordering::Relaxed) + count,
            Ordering::Relaxed,
        );
    }

    /// Adds to counters any thread may write.
    fn add_shared(&self, bytes: u64, count: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.count.fetch_add(count, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.count.load(Ordering::Relaxed),
        )
    }
}

/// Both directions of a set of exact totals, on cache lines of their own (128 bytes, the
/// prefetch pair).
#[repr(align(128))]
struct Totals {
    alloc: Counts,
    free: Counts,
}

impl Totals {
    const fn new() -> Self {
        Totals {
            alloc: Counts::new(),
            free: Counts::new(),
        }
    }

    fn side(&self, dir: Dir) -> &Counts {
        match dir {
            Dir::Alloc => &self.alloc,
            Dir::Free => &self.free,
        }
    }
}

/// The totals shared by every thread without a slot of its own (more threads than
/// [`SLOT_COUNT`], exiting threads) and by counted regions.
static TOTALS: Totals = Totals::new();

/// Fast path of an allocation. Returns `true` when the slow path must run.
#[inline(always)]
pub(crate) fn on_alloc(size: usize) -> bool {
    STATE.with(|s| {
        let left = s.alloc_left.get().wrapping_sub(size as isize);
        s.alloc_left.set(left);
        s.alloc_count.set(s.alloc_count.get().wrapping_add(1));
        left <= 0
    })
}

/// Fast path of a free. Returns `true` when the free-side flush must run.
#[inline(always)]
pub(crate) fn on_free(size: usize) -> bool {
    STATE.with(|s| {
        let left = s.free_left.get().wrapping_sub(size as isize);
        s.free_left.set(left);
        s.free_count.set(s.free_count.get().wrapping_add(1));
        left <= 0
    })
}

/// Whether the free countdown has run out (the free-side event is due): what
/// [`on_free`] returned for this thread's last free.
#[inline]
pub(crate) fn free_due() -> bool {
    STATE.with(|s| s.free_left.get() <= 0)
}

/// Marks or unmarks the thread; returns the previous mark.
#[inline]
pub(crate) fn set_busy(busy: bool) -> bool {
    STATE.with(|s| s.busy.replace(busy))
}

/// The slow event of the allocation side, for the allocation of `size` bytes that made
/// `alloc_left` reach zero. Flushes, decides and re-arms.
///
/// Returns the rate to sample this allocation at, or `None` if it is not sampled (no
/// sample point inside it, sampling off, or the thread is marked busy).
///
/// Must not allocate except with the reentrancy mark set.
#[cold]
pub(crate) fn alloc_event(size: usize) -> Option<usize> {
    config::ensure_env();
    STATE.with(|s| {
        if s.phase.get() == PHASE_NEW {
            start_thread(s);
        }
        let consumed = s.alloc_armed.get().wrapping_sub(s.alloc_left.get());
        flush_alloc(s, consumed);

        let (rate, epoch) = config::rate_and_epoch();
        let mut rng = Rng(s.rng.get());
        let sampled = if s.epoch.get() != epoch {
            // New thread or new rate: draw afresh. The exponential is memoryless, so a
            // fresh draw measured from this allocation's first byte is the same process.
            s.epoch.set(epoch);
            let d = draw(&mut rng, rate);
            let sampled = d <= size as isize;
            s.sample_left.set(if sampled {
                draw(&mut rng, rate)
            } else {
                d - size as isize
            });
            sampled
        } else {
            // The sample point was not reached before this allocation (else an earlier
            // allocation would have triggered the event), so it lies in this one iff the
            // bytes consumed since arming reach it.
            let left = s.sample_left.get().saturating_sub(consumed);
            let sampled = left <= 0;
            // Each sample starts a fresh draw; the overshoot is not carried (as Go).
            s.sample_left
                .set(if sampled { draw(&mut rng, rate) } else { left });
            sampled
        };
        s.rng.set(rng.0);
        arm_alloc(s);
        (sampled && rate > 0 && !s.busy.get()).then_some(rate)
    })
}

/// Draws the distance to the next sample point for `rate`, in whole bytes.
fn draw(rng: &mut Rng, rate: usize) -> isize {
    match rate {
        0 => NEVER,
        1 => 0,
        r => sampler::next_sample_distance(rng, r).min(NEVER as u64) as isize,
    }
}

fn arm_alloc(s: &ThreadState) {
    let armed = if s.phase.get() == PHASE_EXITING {
        0
    } else {
        s.sample_left.get().clamp(0, FLUSH_BYTES)
    };
    s.alloc_armed.set(armed);
    s.alloc_left.set(armed);
}

fn flush_alloc(s: &ThreadState, consumed: isize) {
    let count = s.alloc_count.replace(0);
    publish(s, Dir::Alloc, consumed.max(0) as u64, count);
}

/// The free-side flush: publishes the freed bytes and count and re-arms.
#[cold]
pub(crate) fn free_event() {
    STATE.with(|s| {
        if s.phase.get() == PHASE_NEW {
            // A thread that only frees (memory other threads allocated) must flush at
            // exit too.
            start_thread(s);
        }
        flush_free(s);
        let armed = if s.phase.get() == PHASE_EXITING {
            0
        } else {
            FLUSH_BYTES
        };
        s.free_armed.set(armed);
        s.free_left.set(armed);
    })
}

fn flush_free(s: &ThreadState) {
    let consumed = s.free_armed.get().wrapping_sub(s.free_left.get());
    s.free_armed.set(s.free_left.get());
    let count = s.free_count.replace(0);
    publish(s, Dir::Free, consumed.max(0) as u64, count);
}

#[derive(Clone, Copy)]
enum Dir {
    Alloc,
    Free,
}

/// Adds `bytes` and `count` to this thread's published totals: its own slot if it has
/// one (a line no other thread writes), else the shared ones.
#[inline]
fn publish(s: &ThreadState, dir: Dir, bytes: u64, count: u64) {
    if bytes == 0 && count == 0 {
        return;
    }
    match SLOTS.get(s.slot.get() as usize) {
        Some(own) => own.side(dir).add_owned(bytes, count),
        None => TOTALS.side(dir).add_shared(bytes, count),
    }
}

/// Threads that can have a slot at once; more publish into [`TOTALS`].
const SLOT_COUNT: usize = 256;
const NO_SLOT: u16 = u16::MAX;

/// Published totals of threads that own (or once owned) a slot.
///
/// Every thread that allocates publishes at each slow event. With one shared counter, two
/// busy threads bounced its cache line between cores on every publish (in the churn
/// benchmark, 70% of the slow event's time was that one `lock add`). So a thread claims a
/// slot on its first slow event and publishes into it alone. A slot's counters are
/// cumulative: when its thread exits the slot is marked free ([`OWNED`]) with its totals
/// left in place, and the next thread to claim it keeps adding to them. Readers sum the
/// shared totals and every slot.
static SLOTS: [Totals; SLOT_COUNT] = [const { Totals::new() }; SLOT_COUNT];
/// Whether slot `n` has an owner.
static OWNED: [AtomicBool; SLOT_COUNT] = [const { AtomicBool::new(false) }; SLOT_COUNT];

/// Claims a free slot for this thread (starting at one picked from its address), or
/// leaves it without one if all are taken.
fn claim_slot(s: &ThreadState) {
    let start = (s as *const ThreadState as usize >> 12) % SLOT_COUNT;
    for i in 0..SLOT_COUNT {
        let n = (start + i) % SLOT_COUNT;
        if OWNED[n]
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            s.slot.set(n as u16);
            return;
        }
    }
}

/// Gives the slot back; Release so that the next owner's Acquire sees the final totals.
fn release_slot(s: &ThreadState) {
    if let Some(owned) = OWNED.get(s.slot.replace(NO_SLOT) as usize) {
        owned.store(false, Ordering::Release);
    }
}

/// The published totals: `(allocated bytes, allocations, freed bytes, frees)`.
pub(crate) fn published() -> (u64, u64, u64, u64) {
    std::iter::once(&TOTALS)
        .chain(&SLOTS)
        .fold((0, 0, 0, 0), |t, totals| {
            let (ab, ac) = totals.alloc.get();
            let (fb, fc) = totals.free.get();
            (t.0 + ab, t.1 + ac, t.2 + fb, t.3 + fc)
        })
}

/// In a child process after `fork`: only the forking thread survives, so every slot but
/// its own is free. Does not allocate.
pub(crate) fn reset_after_fork_in_child() {
    let mine = STATE.try_with(|s| s.slot.get()).unwrap_or(NO_SLOT);
    for (n, owned) in OWNED.iter().enumerate() {
        if n != mine as usize {
            owned.store(false, Ordering::Relaxed);
        }
    }
}

/// Publishes everything this thread holds without taking a slow event's decisions: used by
/// [`crate::stats`] (so a thread sees its own allocations) and at thread exit.
fn flush_partial(s: &ThreadState) {
    let consumed = s.alloc_armed.get().wrapping_sub(s.alloc_left.get());
    if consumed > 0 {
        s.alloc_armed.set(s.alloc_left.get());
        s.sample_left
            .set(s.sample_left.get().saturating_sub(consumed));
        flush_alloc(s, consumed);
    } else {
        flush_alloc(s, 0);
    }
    flush_free(s);
}

/// Flushes the calling thread's unflushed totals.
pub(crate) fn flush_current() {
    STATE.with(flush_partial);
}

/// Called by `set_sample_rate` so that the calling thread uses the new rate from its very
/// next allocation: a slow event is forced, which sees the new epoch.
pub(crate) fn rate_changed_here() {
    STATE.with(|s| {
        flush_partial(s);
        s.alloc_armed.set(0);
        s.alloc_left.set(0);
    });
}

/// First slow event of a thread: seed its generator, register the exit flush.
fn start_thread(s: &ThreadState) {
    s.phase.set(PHASE_RUNNING);
    s.rng.set(sampler::seed(s as *const ThreadState as usize));
    if s.busy.replace(true) {
        // Nested inside profiler work: register on a later event.
        s.phase.set(PHASE_NEW);
        return;
    }
    // Registering a thread-local destructor may allocate; the mark above routes that
    // allocation past the sampler. `try_with` fails only if the thread is already running
    // its thread-local destructors, in which case it flushes on every event from now on.
    if EXIT_FLUSH.try_with(|_| ()).is_err() {
        s.phase.set(PHASE_EXITING);
    } else {
        claim_slot(s);
    }
    s.busy.set(false);
}

/// A stretch of this thread's work whose allocations and frees are measured apart from
/// the program's, without touching the fast path: it saves the four fast-path cells, sets
/// the countdowns out of reach (so no slow event fires inside), and on drop reads what
/// the region consumed and restores the cells.
///
/// * [`Region::hidden`] leaves the region's allocations out of the exact totals and of
///   the sampling countdown: used around the sampled path, whose only allocations are the
///   stack table's own storage. That storage is reported as `Stats::profiler_bytes`
///   instead, and it is only ever reallocated or freed inside another such region, so the
///   totals stay consistent.
/// * [`Region::counted`] publishes the region's allocations and frees to the totals as
///   usual (what it allocates may be freed later by anyone) and adds its net bytes to
///   `sink`: used around symbolization, whose caches stay allocated and are reported in
///   `Stats::profiler_bytes` as well as in the totals.
pub(crate) struct Region {
    alloc_left: isize,
    alloc_count: u64,
    free_left: isize,
    free_count: u64,
    sink: Option<&'static std::sync::atomic::AtomicI64>,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Region {
    fn begin(sink: Option<&'static std::sync::atomic::AtomicI64>) -> Self {
        STATE.with(|s| Region {
            alloc_left: s.alloc_left.replace(NEVER),
            alloc_count: s.alloc_count.replace(0),
            free_left: s.free_left.replace(NEVER),
            free_count: s.free_count.replace(0),
            sink,
            _not_send: std::marker::PhantomData,
        })
    }

    /// Leaves the region's allocations out of the totals (see the type's docs).
    pub(crate) fn hidden() -> Self {
        Region::begin(None)
    }

    /// Counts the region's allocations in the totals and its net bytes into `sink`.
    pub(crate) fn counted(sink: &'static std::sync::atomic::AtomicI64) -> Self {
        Region::begin(Some(sink))
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        STATE.with(|s| {
            let allocated = NEVER.wrapping_sub(s.alloc_left.replace(self.alloc_left));
            let allocations = s.alloc_count.replace(self.alloc_count);
            let freed = NEVER.wrapping_sub(s.free_left.replace(self.free_left));
            let frees = s.free_count.replace(self.free_count);
            if let Some(sink) = self.sink {
                TOTALS.alloc.add_shared(allocated as u64, allocations);
                TOTALS.free.add_shared(freed as u64, frees);
                sink.fetch_add(allocated as i64 - freed as i64, Ordering::Relaxed);
            }
        });
    }
}
