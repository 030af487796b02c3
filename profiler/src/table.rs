//! The lock-sharded stack table: one entry per distinct stack, with its weighted
//! allocation and free estimates and its raw sample counts.
//!
//! # Locking
//!
//! 64 shards, each a small futex mutex (`lock.rs`; fork-safe, unlike parking_lot's); the
//! shard is chosen by the stack's hash and the recording CPU's group (below). A thread
//! holds at most one shard lock at a time and calls nothing that takes another profiler
//! lock while holding it.
//!
//! # One entry per stack and CPU group
//!
//! Threads of a program allocate from the same few call sites, so with one entry per
//! stack, threads on different CPUs took turns with one shard lock and one entry, and
//! every sample moved both cache lines between the CPUs. Where every allocation is
//! sampled (the large-buffers benchmark, two threads, one call site) that was 10 of its
//! 24 points of overhead (`benches/runs/2026-12-02-1640-cpu-groups.txt`). So a stack
//! recorded on CPU `c` goes to the entry of CPU group `c % GROUPS`, in a shard of its
//! own: a stack has up to [`GROUPS`] entries, and the snapshot adds them up
//! ([`RawSnapshot::merge_same_stacks`]). jemalloc keeps its counts per thread for the
//! same reason. The cap on stacks ([`crate::max_stacks`]) counts entries.
//!
//! Inserting a new stack may grow a shard's vectors *under the shard lock*; that is
//! allowed only because the sampled path runs with the reentrancy mark set, so the
//! nested allocation goes straight to the inner allocator and can never come back here.
//! Snapshots copy a shard into a buffer reserved *before* taking the lock, so export never
//! allocates under a shard lock at all.
//!
//! # Bounded memory
//!
//! The number of distinct stacks is capped ([`crate::max_stacks`]). A sample whose stack
//! is new when the table is full goes to a single overflow entry and is counted in
//! `dropped_samples`; its weight is kept, so totals in the profile stay right.

use crate::lock::{ForkLock, Mutex};
use crate::stack::{hash_stack, ReturnAddress};
use std::collections::hash_map::{self, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;
const INDEX_BITS: u32 = 32 - SHARD_BITS;
/// CPU groups: a stack recorded on CPUs of different groups has an entry in each.
pub(crate) const GROUPS: usize = 4;

/// The calling thread's CPU group: its current CPU modulo [`GROUPS`] (0 where the CPU is
/// unknown). A thread that moves to another CPU meanwhile only records into another
/// group's entry.
fn cpu_group() -> usize {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: no arguments, no memory touched; glibc reads it from the thread's rseq
        // area (or asks the vDSO), without allocating or locking.
        let cpu = unsafe { libc::sched_getcpu() };
        if cpu >= 0 {
            return cpu as usize % GROUPS;
        }
    }
    0
}

/// Identifies one entry of the table: its shard and its index in that shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StackId(u32);

impl StackId {
    /// The overflow entry.
    pub(crate) const OVERFLOW: StackId = StackId(u32::MAX);
    /// All zero bits: the first entry of shard 0, for zero-initialised placeholders.
    pub(crate) const ZERO: StackId = StackId(0);

    fn new(shard: usize, index: usize) -> Self {
        StackId(((shard as u32) << INDEX_BITS) | index as u32)
    }
    fn shard(self) -> usize {
        (self.0 >> INDEX_BITS) as usize
    }
    fn index(self) -> usize {
        (self.0 & ((1 << INDEX_BITS) - 1)) as usize
    }
}

/// Weighted estimates and raw sample counts of one stack.
///
/// The weighted fields are sums of per-sample weights (see [`crate::sampler`]); the raw
/// fields count samples as taken, which is what Go's legacy text format prints.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    /// Estimated number of allocations.
    pub alloc_objects: f64,
    /// Estimated bytes allocated.
    pub alloc_bytes: f64,
    /// Estimated number of those allocations freed.
    pub free_objects: f64,
    /// Estimated bytes freed.
    pub free_bytes: f64,
    /// Samples taken.
    pub raw_alloc_objects: u64,
    /// Bytes of the samples taken.
    pub raw_alloc_bytes: u64,
    /// Sampled objects freed.
    pub raw_free_objects: u64,
    /// Bytes of the sampled objects freed.
    pub raw_free_bytes: u64,
}

impl Counters {
    fn add_alloc(&mut self, size: usize, weight: f64) {
        self.alloc_objects += weight;
        self.alloc_bytes += weight * size as f64;
        self.raw_alloc_objects += 1;
        self.raw_alloc_bytes += size as u64;
    }

    fn add_free(&mut self, size: usize, weight: f64) {
        self.free_objects += weight;
        self.free_bytes += weight * size as f64;
        self.raw_free_objects += 1;
        self.raw_free_bytes += size as u64;
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Counters) {
        self.alloc_objects += other.alloc_objects;
        self.alloc_bytes += other.alloc_bytes;
        self.free_objects += other.free_objects;
        self.free_bytes += other.free_bytes;
        self.raw_alloc_objects += other.raw_alloc_objects;
        self.raw_alloc_bytes += other.raw_alloc_bytes;
        self.raw_free_objects += other.raw_free_objects;
        self.raw_free_bytes += other.raw_free_bytes;
    }

    /// `self − base`, field by field (raw fields saturate at zero; a base that is not an
    /// earlier snapshot of the same process makes no sense for them).
    pub fn minus(&self, base: &Counters) -> Counters {
        Counters {
            alloc_objects: self.alloc_objects - base.alloc_objects,
            alloc_bytes: self.alloc_bytes - base.alloc_bytes,
            free_objects: self.free_objects - base.free_objects,
            free_bytes: self.free_bytes - base.free_bytes,
            raw_alloc_objects: self
                .raw_alloc_objects
                .saturating_sub(base.raw_alloc_objects),
            raw_alloc_bytes: self.raw_alloc_bytes.saturating_sub(base.raw_alloc_bytes),
            raw_free_objects: self.raw_free_objects.saturating_sub(base.raw_free_objects),
            raw_free_bytes: self.raw_free_bytes.saturating_sub(base.raw_free_bytes),
        }
    }
}

struct Entry {
    hash: u64,
    start: u32,
    len: u32,
    counters: Counters,
}

/// One shard: an open-addressing index (`slots`, entry index + 1, 0 = empty) over
/// `entries`, whose frames live back to back in `frames`.
struct Shard {
    slots: Vec<u32>,
    entries: Vec<Entry>,
    frames: Vec<usize>,
}

impl Shard {
    const fn new() -> Self {
        Shard {
            slots: Vec::new(),
            entries: Vec::new(),
            frames: Vec::new(),
        }
    }

    fn bytes(&self) -> usize {
        self.slots.capacity() * 4
            + self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.frames.capacity() * std::mem::size_of::<usize>()
    }

    fn find(&self, hash: u64, frames: &[usize]) -> Result<usize, usize> {
        let mask = self.slots.len().wrapping_sub(1);
        if self.slots.is_empty() {
            return Err(0);
        }
        let mut i = (hash >> SHARD_BITS) as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return Err(i);
            }
            let e = &self.entries[slot as usize - 1];
            if e.hash == hash
                && &self.frames[e.start as usize..(e.start + e.len) as usize] == frames
            {
                return Ok(slot as usize - 1);
            }
            i = (i + 1) & mask;
        }
    }

    /// Inserts a new entry. Called with the reentrancy mark set (it allocates).
    fn insert(&mut self, hash: u64, frames: &[usize]) -> usize {
        if (self.entries.len() + 1) * 2 > self.slots.len() {
            self.grow_index();
        }
        let index = self.entries.len();
        self.entries.push(Entry {
            hash,
            start: self.frames.len() as u32,
            len: frames.len() as u32,
            counters: Counters::default(),
        });
        self.frames.extend_from_slice(frames);
        let mask = self.slots.len() - 1;
        let mut i = (hash >> SHARD_BITS) as usize & mask;
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = index as u32 + 1;
        index
    }

    fn grow_index(&mut self) {
        let n = (self.slots.len() * 2).max(16);
        let mut slots = vec![0u32; n];
        let mask = n - 1;
        for (index, e) in self.entries.iter().enumerate() {
            let mut i = (e.hash >> SHARD_BITS) as usize & mask;
            while slots[i] != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = index as u32 + 1;
        }
        self.slots = slots;
    }
}

/// One shard and its sample count, on cache lines of their own (128 bytes, the prefetch
/// pair) so that threads recording into different shards do not contend.
#[repr(align(128))]
struct ShardSlot {
    shard: Mutex<Shard>,
    /// Samples recorded through this shard (including those that went to the overflow
    /// entry). Written only under the shard's lock, so a plain load and store suffice;
    /// read without it.
    samples: AtomicU64,
}

/// The process-wide table.
pub(crate) struct StackTable {
    shards: [ShardSlot; SHARDS],
    overflow: Mutex<Counters>,
    unique: AtomicUsize,
    dropped: AtomicU64,
    /// Bytes of shard storage, updated after each insertion (sampled path only).
    bytes: AtomicUsize,
}

pub(crate) static TABLE: StackTable = StackTable::new();

impl StackTable {
    /// An empty table.
    const fn new() -> Self {
        StackTable {
            shards: [const {
                ShardSlot {
                    shard: Mutex::new(Shard::new()),
                    samples: AtomicU64::new(0),
                }
            }; SHARDS],
            overflow: Mutex::new(Counters {
                alloc_objects: 0.0,
                alloc_bytes: 0.0,
                free_objects: 0.0,
                free_bytes: 0.0,
                raw_alloc_objects: 0,
                raw_alloc_bytes: 0,
                raw_free_objects: 0,
                raw_free_bytes: 0,
            }),
            unique: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Records a sampled allocation of `size` bytes with `weight` at `frames`, in the entry
    /// of the calling thread's CPU group.
    ///
    /// Called on the sampled path with the reentrancy mark set; may allocate (only then).
    pub(crate) fn record_alloc(&self, frames: &[usize], size: usize, weight: f64) -> StackId {
        self.record_alloc_in(cpu_group(), frames, size, weight)
    }

    /// [`StackTable::record_alloc`] in the entry of CPU group `group`.
    fn record_alloc_in(&self, group: usize, frames: &[usize], size: usize, weight: f64) -> StackId {
        let hash = hash_stack(frames);
        let shard_no = (hash as usize).wrapping_add(group * (SHARDS / GROUPS)) & (SHARDS - 1);
        let slot = &self.shards[shard_no];
        let mut shard = slot.shard.lock();
        slot.samples
            .store(slot.samples.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let index = match shard.find(hash, frames) {
            Ok(i) => i,
            Err(_) => {
                let cap = crate::config::max_stacks();
                let admitted = self
                    .unique
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        (n < cap).then_some(n + 1)
                    })
                    .is_ok();
                if !admitted || shard.entries.len() >= (1 << INDEX_BITS) - 1 {
                    drop(shard);
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    self.overflow.lock().add_alloc(size, weight);
                    return StackId::OVERFLOW;
                }
                let before = shard.bytes();
                let i = shard.insert(hash, frames);
                let after = shard.bytes();
                self.bytes.fetch_add(after - before, Ordering::Relaxed);
                i
            }
        };
        shard.entries[index].counters.add_alloc(size, weight);
        StackId::new(shard_no, index)
    }

    /// Credits the free of a sampled object to its stack.
    pub(crate) fn record_free(&self, id: StackId, size: usize, weight: f64) {
        if id == StackId::OVERFLOW {
            self.overflow.lock().add_free(size, weight);
            return;
        }
        let mut shard = self.shards[id.shard()].shard.lock();
        if let Some(e) = shard.entries.get_mut(id.index()) {
            e.counters.add_free(size, weight);
        }
    }

    /// Copies the table into `out`, one shard at a time. Never allocates while holding a
    /// shard lock: space is reserved first and the copy retried if the shard grew.
    pub(crate) fn snapshot_into(&self, out: &mut RawSnapshot) {
        for ShardSlot { shard, .. } in &self.shards {
            loop {
                let (n_entries, n_frames) = {
                    let s = shard.lock();
                    (s.entries.len(), s.frames.len())
                };
                out.records.reserve(n_entries);
                out.frames.reserve(n_frames);
                let s = shard.lock();
                if out.records.capacity() - out.records.len() < s.entries.len()
                    || out.frames.capacity() - out.frames.len() < s.frames.len()
                {
                    continue;
                }
                let base = out.frames.len();
                out.frames.extend_from_slice(&s.frames);
                out.records.extend(s.entries.iter().map(|e| RawRecord {
                    start: base + e.start as usize,
                    len: e.len as usize,
                    counters: e.counters,
                }));
                break;
            }
        }
        out.overflow = *self.overflow.lock();
        out.merge_same_stacks();
    }

    pub(crate) fn unique_stacks(&self) -> usize {
        self.unique.load(Ordering::Relaxed)
    }
    pub(crate) fn dropped_samples(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    pub(crate) fn samples(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.samples.load(Ordering::Relaxed))
            .sum()
    }
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Takes every lock of the table, in a fixed order (fork prepare).
    pub(crate) fn fork_prepare(&self) {
        for s in &self.shards {
            s.shard.fork_prepare();
        }
        self.overflow.fork_prepare();
    }

    /// Releases what [`StackTable::fork_prepare`] took (fork, in the parent).
    ///
    /// # Safety
    ///
    /// Only after `fork_prepare` on this thread.
    pub(crate) unsafe fn fork_parent(&self) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            self.overflow.fork_parent();
            for s in self.shards.iter().rev() {
                s.shard.fork_parent();
            }
        }
    }

    /// Resets every lock (fork, in the child).
    pub(crate) fn fork_child(&self) {
        self.overflow.fork_child();
        for s in &self.shards {
            s.shard.fork_child();
        }
    }
}

/// One stack of a raw snapshot: its frames are `frames[start..start + len]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawRecord {
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) counters: Counters,
}

/// A copy of the table: unsymbolized stacks and their counters.
#[derive(Default)]
pub(crate) struct RawSnapshot {
    pub(crate) frames: Vec<usize>,
    pub(crate) records: Vec<RawRecord>,
    pub(crate) overflow: Counters,
}

impl RawSnapshot {
    pub(crate) fn stack(&self, r: &RawRecord) -> &[ReturnAddress] {
        let frames = &self.frames[r.start..r.start + r.len];
        // SAFETY: ReturnAddress is `#[repr(transparent)]` over usize, so a slice of usize
        // is a valid slice of ReturnAddress with the same length and lifetime.
        unsafe { std::slice::from_raw_parts(frames.as_ptr().cast(), frames.len()) }
    }

    /// Adds up the records of one stack (its entries of several CPU groups) into the
    /// first of them, keeping the order of first appearance.
    fn merge_same_stacks(&mut self) {
        let mut first: HashMap<&[usize], usize> = HashMap::with_capacity(self.records.len());
        let mut merged: Vec<RawRecord> = Vec::with_capacity(self.records.len());
        for r in &self.records {
            match first.entry(&self.frames[r.start..r.start + r.len]) {
                hash_map::Entry::Occupied(i) => merged[*i.get()].counters.merge(&r.counters),
                hash_map::Entry::Vacant(v) => {
                    v.insert(merged.len());
                    merged.push(*r);
                }
            }
        }
        drop(first);
        self.records = merged;
    }
}

const _: () = assert!(std::mem::size_of::<ReturnAddress>() == std::mem::size_of::<usize>());

#[cfg(test)]
mod tests {
    use super::*;

    fn record_of<'a>(s: &'a RawSnapshot, frames: &[usize]) -> Vec<&'a RawRecord> {
        s.records
            .iter()
            .filter(|r| &s.frames[r.start..r.start + r.len] == frames)
            .collect()
    }

    #[test]
    fn a_stack_has_an_entry_per_cpu_group_and_one_record() {
        let table = StackTable::new();
        let (a, b) = ([0x1000, 0x2000, 0x3000], [0x1000, 0x2000, 0x4000]);
        let a0 = table.record_alloc_in(0, &a, 100, 2.0);
        assert_eq!(table.record_alloc_in(0, &a, 100, 2.0), a0);
        let a1 = table.record_alloc_in(1, &a, 300, 1.0);
        let b3 = table.record_alloc_in(3, &b, 50, 4.0);
        assert_ne!(a0, a1);
        assert_eq!(table.unique_stacks(), 3, "two entries of a, one of b");
        table.record_free(a1, 300, 1.0);

        let mut s = RawSnapshot::default();
        table.snapshot_into(&mut s);
        assert_eq!(s.records.len(), 2);
        let merged = record_of(&s, &a);
        assert_eq!(merged.len(), 1);
        let c = merged[0].counters;
        assert_eq!((c.raw_alloc_objects, c.raw_alloc_bytes), (3, 500));
        assert_eq!((c.alloc_objects, c.alloc_bytes), (5.0, 700.0));
        assert_eq!((c.raw_free_objects, c.free_bytes), (1, 300.0));
        let b_rec = record_of(&s, &b);
        assert_eq!(b_rec.len(), 1);
        assert_eq!(b_rec[0].counters.raw_alloc_objects, 1);
        table.record_free(b3, 50, 4.0);
    }
}
