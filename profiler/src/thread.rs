//! Per-thread state: the sampling countdown, the unflushed exact totals and the
//! reentrancy mark, all in one `const`-initialised thread-local without `Drop`.
//!
//! # The fast path
//!
//! An allocation of `size` bytes does `alloc_left -= step(size)` and branches on
//! `alloc_left <= 0`; a free does the same with `free_left`. Each word counts bytes and
//! operations at once: `step(size)` is the size shifted up by [`COUNT_BITS`] with a one in
//! the bits below (see [`step`] and [`unpack`]). Nothing else: no atomic
//! read-modify-write, no lock, no call that could allocate. Because the thread-local
//! is `const`-initialised and has no destructor, accessing it compiles to a plain
//! TLS-relative load and store with no lazy-initialisation check.
//!
//! # Slow events
//!
//! `alloc_left` is armed with the distance to the next sample point, at most
//! [`RATE_REACH_BYTES`]. When it runs out, [`alloc_event`] publishes the bytes and counts
//! consumed since arming (into the thread's own slot of counters, see [`SLOTS`]; a plain
//! load and store each), decides whether the allocation that crossed zero is sampled, and
//! re-arms. The free side's word is armed with at most [`FREE_REACH_BYTES`], so that its
//! count never reaches the bytes above it; its event only publishes and re-arms.
//!
//! The exact totals do not wait for those events: readers add each registered thread's
//! unflushed counts, read in place under a sequence lock (see [`Unflushed`] and
//! [`totals`]). The counters are atomics that only their thread writes, with relaxed
//! loads and stores, so the fast path is the same plain loads and stores as with `Cell`s.
//! A thread that exits flushes what it holds from a separate thread-local destructor
//! registered on its first slow event, and unregisters. Threads beyond the
//! [`SLOT_COUNT`] that can be registered at once flush every [`FLUSH_BYTES`] instead:
//! that is the staleness bound documented on [`crate::Stats`].

use crate::config;
use crate::lock::{ForkLock, Mutex};
use crate::sampler::{self, Rng};
use std::cell::Cell;
use std::sync::atomic::{fence, AtomicBool, AtomicIsize, AtomicPtr, AtomicU64, Ordering};

/// Largest amount of allocation (and, separately, of freeing) a thread without a slot
/// keeps unflushed (see [`SLOTS`]).
pub(crate) const FLUSH_BYTES: isize = 256 * 1024;

/// Most allocation between two allocation-side events of a thread, whatever the distance
/// to its next sample point: a new sampling rate reaches every thread within this much of
/// its allocation.
///
/// Four times the default rate, so that at that rate almost every event is a sample
/// (the distance to the next sample point exceeds it with probability e^-4, under 2%).
/// With 256 KiB here, the churn benchmark's threads had 2.3 events per sample, and the
/// extra events, each a few cache misses on lines the program had since evicted, cost
/// 0.6–0.8% of its CPU time (`benches/runs/2026-12-01-fewer-events.txt`).
pub(crate) const RATE_REACH_BYTES: isize = 2 * 1024 * 1024;

/// Most freeing between two free-side events of a thread: enough to make them rare (one
/// per 32 MiB freed), and below `2^COUNT_BITS`, so that the free count, one per freed byte
/// at most, never reaches the bytes above it.
const FREE_REACH_BYTES: isize = 1 << 25;

/// Distance meaning "no sample will ever be taken" (rate 0).
const NEVER: isize = isize::MAX / 4;

/// The low bits of a countdown word, which count operations; the bytes are above them.
/// Between two events a word counts at most [`RATE_REACH_BYTES`] or [`FREE_REACH_BYTES`]
/// operations (each of at least a byte: `GlobalAlloc` is never called with size 0), below
/// `2^COUNT_BITS`, so the count never carries into the bytes. A [`Region`] counts up to
/// `2^COUNT_BITS` operations and 64 GiB.
const COUNT_BITS: u32 = 26;
const COUNT_MASK: isize = (1 << COUNT_BITS) - 1;

/// The largest size a countdown word takes whole: a larger operation takes this much
/// there (enough to reach zero from any armed value) and its event adds the rest.
const CLAMP: usize = 1 << 35;

/// What one operation of `size` bytes takes off a countdown word: one operation in the low
/// bits and its bytes above them. Two register instructions and a shift: the two increments
/// of separate counts it replaced were read-modify-writes of memory, 2.5 points of the
/// small-strings benchmark on the Intel VM
/// (`benches/runs/2026-12-02-1645-fast-path-parts.txt`).
#[inline(always)]
fn step(size: usize) -> isize {
    ((size.min(CLAMP) as isize) << COUNT_BITS) | 1
}

/// A countdown word armed with `bytes` (below 2^(63 - COUNT_BITS)).
const fn armed_word(bytes: isize) -> isize {
    bytes << COUNT_BITS
}

/// The bytes and operations a word counted: `consumed` is its armed value minus its value.
fn unpack(consumed: isize) -> (u64, u64) {
    if consumed <= 0 {
        return (0, 0);
    }
    (
        (consumed >> COUNT_BITS) as u64,
        (consumed & COUNT_MASK) as u64,
    )
}

/// What a [`Region`] arms both words with: 64 GiB, beyond any region's reach.
const REGION_ARM: isize = armed_word(1 << 36);

const PHASE_NEW: u8 = 0;
const PHASE_RUNNING: u8 = 1;
const PHASE_EXITING: u8 = 2;

/// A word that only its own thread writes and that other threads may read: a `Cell`'s
/// interface over a relaxed atomic, which compiles to the same plain load and store.
macro_rules! owned_word {
    ($name:ident, $atomic:ty, $t:ty) => {
        struct $name($atomic);

        impl $name {
            const fn new(v: $t) -> Self {
                $name(<$atomic>::new(v))
            }
            #[inline(always)]
            fn get(&self) -> $t {
                self.0.load(Ordering::Relaxed)
            }
            #[inline(always)]
            fn set(&self, v: $t) {
                self.0.store(v, Ordering::Relaxed)
            }
            #[inline(always)]
            fn replace(&self, v: $t) -> $t {
                let old = self.get();
                self.set(v);
                old
            }
        }
    };
}
owned_word!(Bytes, AtomicIsize, isize);

/// The counters of a thread that [`totals`] reads in place, for threads with a slot (see
/// [`SLOTS`]): what the thread has allocated and freed since its last flush.
struct Unflushed {
    /// Bytes of allocation left before the next slow event, shifted up by
    /// [`COUNT_BITS`], less the allocations since arming (see [`step`]).
    alloc_left: Bytes,
    /// The same for freeing and the free-side event.
    free_left: Bytes,
    /// The value `alloc_left` was last armed with (or reset to by a partial flush).
    alloc_armed: Bytes,
    free_armed: Bytes,
    /// Odd while the thread changes these counters other than by counting down (a flush,
    /// a re-arming, a [`Region`]); a reader that sees it odd, or changed across its reads,
    /// reads again (a sequence lock).
    seq: AtomicU64,
}

impl Unflushed {
    /// Opens a change that readers must not see half done. Returns `false` (and does
    /// nothing) if one is already open.
    fn begin_change(&self) -> bool {
        let seq = self.seq.load(Ordering::Relaxed);
        if seq % 2 == 1 {
            return false;
        }
        self.seq.store(seq + 1, Ordering::Relaxed);
        // Orders the odd value before the changes that follow, for readers (whose Acquire
        // fence pairs with this).
        fence(Ordering::Release);
        true
    }

    fn end_change(&self) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq + 1, Ordering::Release);
    }

    /// Runs `f` as one change (or inside the one already open).
    fn change<R>(&self, f: impl FnOnce() -> R) -> R {
        let opened = self.begin_change();
        let r = f();
        if opened {
            self.end_change();
        }
        r
    }
}

pub(crate) struct ThreadState {
    c: Unflushed,
    /// Distance from the arming point to the next sample point, in bytes.
    sample_left: Cell<isize>,
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
            c: Unflushed {
                alloc_left: Bytes::new(0),
                free_left: Bytes::new(0),
                alloc_armed: Bytes::new(0),
                free_armed: Bytes::new(0),
                seq: AtomicU64::new(0),
            },
            sample_left: Cell::new(0),
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
            {
                // Under the registry lock, so that no reader is still reading this thread's
                // counters when its thread-local memory goes away.
                let _registry = REGISTRY.lock();
                s.c.change(|| flush_partial(s));
                unregister(s);
            }
            // Hand the slot back (its totals stay in it, see `SLOTS`); later events of this
            // thread publish into the shared totals.
            release_slot(s);
            // From now on every allocation and free of this thread flushes at once.
            s.c.alloc_left.set(0);
            s.c.alloc_armed.set(0);
            s.c.free_left.set(0);
            s.c.free_armed.set(0);
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
        let left = s.c.alloc_left.get().wrapping_sub(step(size));
        s.c.alloc_left.set(left);
        left <= 0
    })
}

/// Fast path of a free. Returns `true` when the free-side flush must run.
#[inline(always)]
pub(crate) fn on_free(size: usize) -> bool {
    STATE.with(|s| {
        let left = s.c.free_left.get().wrapping_sub(step(size));
        s.c.free_left.set(left);
        left <= 0
    })
}

/// Whether the free countdown has run out (the free-side event is due): what
/// [`on_free`] returned for this thread's last free.
#[inline]
pub(crate) fn free_due() -> bool {
    STATE.with(|s| s.c.free_left.get() <= 0)
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
        s.c.change(|| alloc_event_change(s, size))
    })
}

/// The part of [`alloc_event`] that readers must not see half done.
fn alloc_event_change(s: &ThreadState, size: usize) -> Option<usize> {
    let (bytes, count) = unpack(s.c.alloc_armed.get().wrapping_sub(s.c.alloc_left.get()));
    // What the word did not take of an allocation larger than CLAMP (this one).
    let bytes = bytes + size.saturating_sub(CLAMP) as u64;
    publish(s, Dir::Alloc, bytes, count);
    let consumed = bytes.min(NEVER as u64) as isize;
    // The free side too, though its countdown did not run out: a reader that stops
    // waiting for this change falls back on the slot's totals, which are then
    // complete up to this event (the same line is being written anyway).
    flush_free(s);

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
}

/// Draws the distance to the next sample point for `rate`, in whole bytes.
fn draw(rng: &mut Rng, rate: usize) -> isize {
    match rate {
        0 => NEVER,
        1 => 0,
        r => sampler::next_sample_distance(rng, r).min(NEVER as u64) as isize,
    }
}

/// How far a countdown may run before the next flush: unbounded for a thread with a slot
/// (readers add its unflushed counters in place), [`FLUSH_BYTES`] for one without, and
/// zero (flush at every event) for an exiting thread.
fn flush_limit(s: &ThreadState) -> isize {
    if s.phase.get() == PHASE_EXITING {
        0
    } else if (s.slot.get() as usize) < SLOT_COUNT {
        NEVER
    } else {
        FLUSH_BYTES
    }
}

fn arm_alloc(s: &ThreadState) {
    let armed = s
        .sample_left
        .get()
        .clamp(0, flush_limit(s).min(RATE_REACH_BYTES));
    s.c.alloc_armed.set(armed_word(armed));
    s.c.alloc_left.set(armed_word(armed));
}

/// The free-side event, for the free of `size` bytes that made `free_left` reach zero:
/// publishes the freed bytes and count and re-arms.
#[cold]
pub(crate) fn free_event(size: usize) {
    STATE.with(|s| {
        if s.phase.get() == PHASE_NEW {
            // A thread that only frees (memory other threads allocated) must flush at
            // exit too.
            start_thread(s);
        }
        s.c.change(|| {
            flush_free(s);
            // What the word did not take of a free larger than CLAMP (this one).
            publish(s, Dir::Free, size.saturating_sub(CLAMP) as u64, 0);
            let armed = armed_word(flush_limit(s).min(FREE_REACH_BYTES));
            s.c.free_armed.set(armed);
            s.c.free_left.set(armed);
        })
    })
}

fn flush_free(s: &ThreadState) {
    let (bytes, count) = unpack(s.c.free_armed.get().wrapping_sub(s.c.free_left.get()));
    s.c.free_armed.set(s.c.free_left.get());
    publish(s, Dir::Free, bytes, count);
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
/// left in place, and the next thread to claim it keeps adding to them.
///
/// A thread with a slot is also registered in [`THREADS`], and readers ([`totals`]) add
/// what it has not flushed, read from its thread-local counters in place. So such a thread
/// never needs to flush for the totals' sake (its countdowns run to the next sample point
/// or [`RATE_REACH_BYTES`], and [`FREE_REACH_BYTES`], which only keep their counts from
/// reaching the bytes above them), and the totals are exact at every moment (but for the
/// part of a single operation over [`CLAMP`] bytes, which its own event adds a moment
/// later). Only threads without a slot (more than [`SLOT_COUNT`] at once) flush every
/// [`FLUSH_BYTES`].
static SLOTS: [Totals; SLOT_COUNT] = [const { Totals::new() }; SLOT_COUNT];
/// Whether slot `n` has an owner.
static OWNED: [AtomicBool; SLOT_COUNT] = [const { AtomicBool::new(false) }; SLOT_COUNT];
/// The counters of slot `n`'s owner, or null. Set by the owner once it has claimed the
/// slot; cleared under [`REGISTRY`] before the owner's thread-local memory can go away.
static THREADS: [AtomicPtr<Unflushed>; SLOT_COUNT] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOT_COUNT];
/// Held by readers while they read other threads' counters through [`THREADS`], and by a
/// thread that unregisters itself. Never held while taking another lock or allocating.
static REGISTRY: Mutex<()> = Mutex::new(());

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
            // Release: a reader that sees the pointer sees the counters' initial values.
            THREADS[n].store(std::ptr::addr_of!(s.c).cast_mut(), Ordering::Release);
            return;
        }
    }
}

/// Takes this thread's counters out of [`THREADS`]. Under [`REGISTRY`], after a flush.
fn unregister(s: &ThreadState) {
    if let Some(p) = THREADS.get(s.slot.get() as usize) {
        p.store(std::ptr::null_mut(), Ordering::Relaxed);
    }
}

/// Gives the slot back; Release so that the next owner's Acquire sees the final totals.
fn release_slot(s: &ThreadState) {
    if let Some(owned) = OWNED.get(s.slot.replace(NO_SLOT) as usize) {
        owned.store(false, Ordering::Release);
    }
}

/// Allocated bytes, allocations, freed bytes and frees.
type Sums = [u64; 4];

fn add(a: Sums, b: Sums) -> Sums {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]]
}

fn published(t: &Totals) -> Sums {
    let (ab, ac) = t.alloc.get();
    let (fb, fc) = t.free.get();
    [ab, ac, fb, fc]
}

/// Slot `n`'s totals plus, if its owner is registered, what the owner has not flushed,
/// read consistently with them (the owner moves counts from one to the other when it
/// flushes). If the owner stays inside a change for all the tries (a long [`Region`], or
/// a thread preempted in a change), the slot's totals alone: every change flushes both
/// sides first, so they are complete up to it, unless the thread was preempted in the
/// middle of that flush's few stores. Under [`REGISTRY`].
fn slot_sums(n: usize) -> Sums {
    let p = THREADS[n].load(Ordering::Acquire);
    // SAFETY: a non-null pointer points to the counters of a thread that has not finished
    // unregistering itself, which it does under `REGISTRY`, held by our caller; so the
    // thread-local memory it points to is live. Only atomic fields are read.
    let Some(c) = (unsafe { p.as_ref() }) else {
        return published(&SLOTS[n]);
    };
    for _ in 0..SEQ_TRIES {
        let seq = c.seq.load(Ordering::Acquire);
        if seq % 2 == 0 {
            let base = published(&SLOTS[n]);
            let alloc = unpack(c.alloc_armed.get().wrapping_sub(c.alloc_left.get()));
            let free = unpack(c.free_armed.get().wrapping_sub(c.free_left.get()));
            let unflushed = [alloc.0, alloc.1, free.0, free.1];
            // Pairs with the owner's Release fence after opening a change: if it changed
            // anything read above, the second load sees the new sequence number.
            fence(Ordering::Acquire);
            if c.seq.load(Ordering::Relaxed) == seq {
                return add(base, unflushed);
            }
        }
        std::hint::spin_loop();
    }
    published(&SLOTS[n])
}

/// Reads of a thread's counters a reader tries before settling for its slot's totals.
/// Events and hidden regions take about a microsecond.
const SEQ_TRIES: usize = 10_000;

/// The exact totals: `(allocated bytes, allocations, freed bytes, frees)`.
pub(crate) fn totals() -> (u64, u64, u64, u64) {
    let sums = {
        let _registry = REGISTRY.lock();
        (0..SLOT_COUNT).map(slot_sums).fold(published(&TOTALS), add)
    };
    (sums[0], sums[1], sums[2], sums[3])
}

/// The registry's lock, for `fork.rs`.
pub(crate) fn fork_lock() -> &'static impl ForkLock {
    &REGISTRY
}

/// In a child process after `fork`: only the forking thread survives, so every slot but
/// its own is free and unregistered (what the vanished threads had not flushed is lost
/// with them). Does not allocate.
pub(crate) fn reset_after_fork_in_child() {
    let mine = STATE.try_with(|s| s.slot.get()).unwrap_or(NO_SLOT);
    for (n, owned) in OWNED.iter().enumerate() {
        if n != mine as usize {
            THREADS[n].store(std::ptr::null_mut(), Ordering::Relaxed);
            owned.store(false, Ordering::Relaxed);
        }
    }
}

/// Publishes everything this thread holds without taking a slow event's decisions: used at
/// thread exit, at the start of a region and when the rate changes. Inside a change.
fn flush_partial(s: &ThreadState) {
    let (bytes, count) = unpack(s.c.alloc_armed.get().wrapping_sub(s.c.alloc_left.get()));
    if bytes > 0 || count > 0 {
        s.c.alloc_armed.set(s.c.alloc_left.get());
        s.sample_left
            .set(s.sample_left.get().saturating_sub(bytes as isize));
    }
    publish(s, Dir::Alloc, bytes, count);
    flush_free(s);
}

/// Called by `set_sample_rate` so that the calling thread uses the new rate from its very
/// next allocation: a slow event is forced, which sees the new epoch.
pub(crate) fn rate_changed_here() {
    STATE.with(|s| {
        s.c.change(|| {
            flush_partial(s);
            s.c.alloc_armed.set(0);
            s.c.alloc_left.set(0);
        })
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
/// the program's, without touching the fast path: it flushes, saves the two fast-path
/// words, arms them with [`REGION_ARM`] (so no slow event fires inside), and on drop
/// reads what the region consumed and restores the words. Readers of the totals
/// see the thread as it was when the region began.
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
    free_left: isize,
    sink: Option<&'static std::sync::atomic::AtomicI64>,
    /// Whether this region opened the change readers wait out (not when nested in one).
    opened: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Region {
    fn begin(sink: Option<&'static std::sync::atomic::AtomicI64>) -> Self {
        STATE.with(|s| {
            // The counters below hold the region's own counts until it ends, so readers
            // must not add them in: the region is one change. Readers stop waiting for a
            // change after a while (a counted region may last long, a thread may be
            // preempted in any region), so the region flushes first: the slot's totals
            // they then fall back on are complete up to the region. A region nested in
            // another finds the outer one's counts in the counters and must not flush
            // them: it only saves and restores them.
            let opened = s.c.begin_change();
            if opened {
                flush_partial(s);
            }
            Region {
                alloc_left: s.c.alloc_left.replace(REGION_ARM),
                free_left: s.c.free_left.replace(REGION_ARM),
                sink,
                opened,
                _not_send: std::marker::PhantomData,
            }
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
            let (allocated, allocations) =
                unpack(REGION_ARM.wrapping_sub(s.c.alloc_left.replace(self.alloc_left)));
            let (freed, frees) =
                unpack(REGION_ARM.wrapping_sub(s.c.free_left.replace(self.free_left)));
            if let Some(sink) = self.sink {
                TOTALS.alloc.add_shared(allocated, allocations);
                TOTALS.free.add_shared(freed, frees);
                sink.fetch_add(allocated as i64 - freed as i64, Ordering::Relaxed);
            }
            if self.opened {
                s.c.end_change();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;
    use std::sync::mpsc;

    /// `n` allocations of `size` bytes on this thread's fast path, with the slow event
    /// where the allocator takes it. (This test binary's global allocator is not the
    /// profiler, so nothing else moves this thread's counters.)
    fn allocate(n: usize, size: usize) {
        for _ in 0..n {
            if on_alloc(size) {
                let _ = alloc_event(size);
            }
        }
    }

    fn free(n: usize, size: usize) {
        for _ in 0..n {
            if on_free(size) {
                free_event(size);
            }
        }
    }

    /// The tests below compare the process-wide totals before and after one thread's
    /// work, so they must not run at the same time as each other.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn minus(a: (u64, u64, u64, u64), b: (u64, u64, u64, u64)) -> (u64, u64, u64, u64) {
        (a.0 - b.0, a.1 - b.1, a.2 - b.2, a.3 - b.3)
    }

    #[test]
    fn readers_count_a_running_thread_in_place_and_wait_out_its_regions() {
        let _serial = serial();
        static SINK: AtomicI64 = AtomicI64::new(0);
        let (to_main, from_worker) = mpsc::channel::<()>();
        let (to_worker, from_main) = mpsc::channel::<()>();
        let step = |to: &mpsc::Sender<()>, from: &mpsc::Receiver<()>| {
            to.send(()).unwrap();
            from.recv().unwrap();
        };
        let worker = std::thread::spawn(move || {
            // The thread's first event registers it.
            allocate(1, 8);
            step(&to_main, &from_main);
            allocate(10, 1000);
            free(4, 1000);
            step(&to_main, &from_main);
            let region = Region::counted(&SINK);
            allocate(5, 1000);
            free(1, 1000);
            // Readers now find this thread inside a change for as long as it waits.
            step(&to_main, &from_main);
            drop(region);
            step(&to_main, &from_main);
        });
        let next = || {
            from_worker.recv().unwrap();
            totals()
        };
        let t0 = next();
        to_worker.send(()).unwrap();
        let t1 = next();
        assert_eq!(minus(t1, t0), (10_000, 10, 4_000, 4), "counted in place");
        to_worker.send(()).unwrap();
        let t2 = next();
        assert_eq!(
            t2, t1,
            "inside the region: the slot's totals, complete up to it"
        );
        to_worker.send(()).unwrap();
        let t3 = next();
        assert_eq!(
            minus(t3, t2),
            (5_000, 5, 1_000, 1),
            "the region, counted at its end"
        );
        to_worker.send(()).unwrap();
        worker.join().unwrap();
        assert_eq!(totals(), t3, "nothing lost when the thread exits");
    }

    #[test]
    fn counts_never_carry_into_bytes_and_huge_sizes_count_whole() {
        let _serial = serial();
        std::thread::spawn(|| {
            allocate(1, 8);
            free(1, 8);
            let before = totals();
            // One-byte operations: the most operations a word counts per byte, and more of
            // them than the low bits hold (2^26), which only events in time keep from
            // carrying into the bytes.
            let n = (1 << COUNT_BITS) + 1_000_000;
            allocate(n, 1);
            free(n, 1);
            let n = n as u64;
            assert_eq!(minus(totals(), before), (n, n, n, n), "one byte each");
            // Sizes over CLAMP: the word takes CLAMP, the event the rest.
            let before = totals();
            let huge = CLAMP * 3 + 12_345;
            allocate(2, huge);
            free(1, huge);
            let h = huge as u64;
            assert_eq!(minus(totals(), before), (2 * h, 2, h, 1), "whole sizes");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_region_nested_in_another_leaves_the_outer_one_alone() {
        let _serial = serial();
        static SINK: AtomicI64 = AtomicI64::new(0);
        std::thread::spawn(|| {
            allocate(1, 8);
            let before = totals();
            let outer = Region::hidden();
            allocate(3, 100);
            let inner = Region::counted(&SINK);
            allocate(2, 100);
            free(1, 100);
            drop(inner);
            allocate(4, 100);
            drop(outer);
            assert_eq!(
                minus(totals(), before),
                (200, 2, 100, 1),
                "only the counted inner region's work"
            );
        })
        .join()
        .unwrap();
    }
}
