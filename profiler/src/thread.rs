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
//! `alloc_left` is armed with `min(distance to the next sample point, WINDOW)` (half of
//! `FLUSH_BYTES`). When it runs out, [`alloc_event`] adds the bytes consumed since arming
//! to the thread's unpublished bytes, publishes those and the count into the process-wide
//! totals (one atomic add each) once they reach `WINDOW`, decides whether the allocation
//! that crossed zero is sampled, and re-arms. So the exact totals are at most
//! `FLUSH_BYTES` of allocation (and as much of freeing) behind per running thread; that is
//! the staleness bound documented on [`crate::Stats`]. A thread that exits flushes what it
//! holds from a separate thread-local destructor registered on its first slow event.

use crate::config;
use crate::sampler::{self, Rng};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest amount of allocation (and, separately, of freeing) a thread keeps unflushed.
pub(crate) const FLUSH_BYTES: isize = 256 * 1024;

/// Longest countdown armed between slow events, and the amount of unpublished bytes at
/// which a slow event publishes: what a thread holds is at most what it has not published
/// (under `WINDOW`) plus the countdown in progress (at most `WINDOW`), so within
/// [`FLUSH_BYTES`]. Slow events that come often (every allocation is one at sample rate
/// 1, every large allocation at any rate) then publish only every `WINDOW` bytes instead
/// of each time: two fewer atomic read-modify-writes on a shared line per event.
const WINDOW: isize = FLUSH_BYTES / 2;

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
    /// Bytes allocated in finished countdowns but not yet published.
    alloc_unpublished: Cell<u64>,
    /// Bytes of freeing left before the next free-side event.
    free_left: Cell<isize>,
    free_armed: Cell<isize>,
    free_count: Cell<u64>,
    free_unpublished: Cell<u64>,
    /// The rate epoch `sample_left` was drawn under.
    epoch: Cell<u64>,
    rng: Cell<u64>,
    busy: Cell<bool>,
    phase: Cell<u8>,
}

thread_local! {
    static STATE: ThreadState = const {
        ThreadState {
            alloc_left: Cell::new(0),
            alloc_armed: Cell::new(0),
            sample_left: Cell::new(0),
            alloc_count: Cell::new(0),
            alloc_unpublished: Cell::new(0),
            free_left: Cell::new(0),
            free_armed: Cell::new(0),
            free_count: Cell::new(0),
            free_unpublished: Cell::new(0),
            epoch: Cell::new(u64::MAX),
            rng: Cell::new(0),
            busy: Cell::new(false),
            phase: Cell::new(PHASE_NEW),
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

/// One direction of the process-wide exact totals, on its own cache lines (128 bytes, the
/// prefetch pair) so that threads flushing allocations and threads flushing frees do not
/// contend for one line.
#[repr(align(128))]
pub(crate) struct Counter {
    pub(crate) bytes: AtomicU64,
    pub(crate) count: AtomicU64,
}

/// Process-wide exact totals, flushed into by slow events.
pub(crate) struct Totals {
    pub(crate) alloc: Counter,
    pub(crate) free: Counter,
}

pub(crate) static TOTALS: Totals = Totals {
    alloc: Counter {
        bytes: AtomicU64::new(0),
        count: AtomicU64::new(0),
    },
    free: Counter {
        bytes: AtomicU64::new(0),
        count: AtomicU64::new(0),
    },
};

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
        // An exiting thread publishes on every event (its destructors may be its last).
        flush_alloc(s, consumed, s.phase.get() == PHASE_EXITING);

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
        s.sample_left.get().clamp(0, WINDOW)
    };
    s.alloc_armed.set(armed);
    s.alloc_left.set(armed);
}

/// Adds `consumed` bytes to what this thread has not published, and publishes it all
/// (bytes and count) if that reaches [`WINDOW`] or `force` is set.
fn flush_alloc(s: &ThreadState, consumed: isize, force: bool) {
    let pending = s.alloc_unpublished.get() + consumed.max(0) as u64;
    if !force && pending < WINDOW as u64 {
        s.alloc_unpublished.set(pending);
        return;
    }
    s.alloc_unpublished.set(0);
    if pending > 0 {
        TOTALS.alloc.bytes.fetch_add(pending, Ordering::Relaxed);
    }
    let count = s.alloc_count.replace(0);
    if count > 0 {
        TOTALS.alloc.count.fetch_add(count, Ordering::Relaxed);
    }
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
        flush_free(s, s.phase.get() == PHASE_EXITING);
        let armed = if s.phase.get() == PHASE_EXITING {
            0
        } else {
            WINDOW
        };
        s.free_armed.set(armed);
        s.free_left.set(armed);
    })
}

/// The free side's [`flush_alloc`]: moves the countdown's bytes to the unpublished ones
/// and publishes if they reach [`WINDOW`] or `force` is set.
fn flush_free(s: &ThreadState, force: bool) {
    let consumed = s.free_armed.get().wrapping_sub(s.free_left.get());
    s.free_armed.set(s.free_left.get());
    let pending = s.free_unpublished.get() + consumed.max(0) as u64;
    if !force && pending < WINDOW as u64 {
        s.free_unpublished.set(pending);
        return;
    }
    s.free_unpublished.set(0);
    if pending > 0 {
        TOTALS.free.bytes.fetch_add(pending, Ordering::Relaxed);
    }
    let count = s.free_count.replace(0);
    if count > 0 {
        TOTALS.free.count.fetch_add(count, Ordering::Relaxed);
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
        flush_alloc(s, consumed, true);
    } else {
        flush_alloc(s, 0, true);
    }
    flush_free(s, true);
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
                TOTALS
                    .alloc
                    .bytes
                    .fetch_add(allocated as u64, Ordering::Relaxed);
                TOTALS.alloc.count.fetch_add(allocations, Ordering::Relaxed);
                TOTALS.free.bytes.fetch_add(freed as u64, Ordering::Relaxed);
                TOTALS.free.count.fetch_add(frees, Ordering::Relaxed);
                sink.fetch_add(allocated as i64 - freed as i64, Ordering::Relaxed);
            }
        });
    }
}
