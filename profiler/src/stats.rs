//! Exact totals and the profiler's own figures.

use crate::thread::FLUSH_BYTES;
use crate::{config, live, symbolize, table::TABLE};

/// Exact allocation totals and the profiler's own figures, from [`stats`].
///
/// # Freshness
///
/// The totals are exact at the moment of the call: each thread counts its allocations
/// and frees in thread-local counters (so the allocator's fast path needs no atomic
/// read-modify-write), and [`stats`] reads every thread's counters in place. Two
/// exceptions, each bounded:
///
/// * threads beyond the first 256 running at once publish their counts every
///   [`Stats::FLUSH_BYTES`] (256 KiB) of allocation, and as much of freeing, so the
///   totals may lag by that much per such thread;
/// * a thread inside the profiler's own symbolization at that moment is counted up to
///   the start of it (its allocations there are added when it ends); so is, rarely, a
///   thread that the scheduler stopped for longer than a reading waits (about a
///   millisecond) in the middle of one of the profiler's own brief updates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Bytes allocated since start (each `realloc` counts as a free and an allocation).
    pub allocated_bytes: u64,
    /// Allocations since start.
    pub allocations: u64,
    /// Bytes freed since start.
    pub freed_bytes: u64,
    /// Frees since start.
    pub frees: u64,
    /// `allocated_bytes − freed_bytes` (zero if stale counters make it negative).
    pub in_use_bytes: u64,
    /// `allocations − frees` (zero if stale counters make it negative).
    pub in_use_objects: u64,
    /// The sampling rate in bytes (0 = off).
    pub sample_rate: u64,
    /// Samples taken since start.
    pub samples: u64,
    /// Sampled objects not yet freed.
    pub live_samples: u64,
    /// Entries of the stack table: one per distinct stack and CPU group that sampled it
    /// (up to 4 a stack; a snapshot adds a stack's entries up into one record).
    pub unique_stacks: u64,
    /// The cap on stack-table entries.
    pub max_stacks: u64,
    /// Samples whose stack did not fit under the cap (kept in the overflow entry).
    pub dropped_samples: u64,
    /// Samples whose free could not be tracked because the live set was full.
    pub untracked_samples: u64,
    /// Bytes the profiler itself holds: the stack table, the symbolizer's caches, the
    /// unwinder's rule caches and the touched part of the live set (an upper bound).
    pub profiler_bytes: u64,
    /// Addresses in the symbol cache.
    pub symbol_cache_entries: u64,
}

impl Stats {
    /// Unpublished bytes at most, in each direction, of a thread beyond the first 256
    /// (see the type's docs).
    pub const FLUSH_BYTES: u64 = FLUSH_BYTES as u64;

    /// `(name, value)` pairs in a stable order, for text and JSON output.
    pub fn fields(&self) -> [(&'static str, u64); 15] {
        [
            ("allocated_bytes", self.allocated_bytes),
            ("allocations", self.allocations),
            ("freed_bytes", self.freed_bytes),
            ("frees", self.frees),
            ("in_use_bytes", self.in_use_bytes),
            ("in_use_objects", self.in_use_objects),
            ("sample_rate", self.sample_rate),
            ("samples", self.samples),
            ("live_samples", self.live_samples),
            ("unique_stacks", self.unique_stacks),
            ("max_stacks", self.max_stacks),
            ("dropped_samples", self.dropped_samples),
            ("untracked_samples", self.untracked_samples),
            ("profiler_bytes", self.profiler_bytes),
            ("symbol_cache_entries", self.symbol_cache_entries),
        ]
    }
}

/// Reads the exact totals and the profiler's own figures. Cheap: a few atomic loads per
/// thread under a lock that only readers and exiting threads take, and one short lock of
/// the symbol cache. See [`Stats`] for how fresh the totals are.
pub fn stats() -> Stats {
    let (allocated_bytes, allocations, freed_bytes, frees) = crate::thread::totals();
    let (symbols, symbol_bytes) = symbolize::cache_size();
    let live_samples = live::live_count() as u64;
    // The live set's static pages are touched only as samples land in them.
    let samples = TABLE.samples();
    let live_bytes = live::resident_bound(samples);
    Stats {
        allocated_bytes,
        allocations,
        freed_bytes,
        frees,
        in_use_bytes: allocated_bytes.saturating_sub(freed_bytes),
        in_use_objects: allocations.saturating_sub(frees),
        sample_rate: config::sample_rate() as u64,
        samples,
        live_samples,
        unique_stacks: TABLE.unique_stacks() as u64,
        max_stacks: config::max_stacks() as u64,
        dropped_samples: TABLE.dropped_samples(),
        untracked_samples: live::untracked(),
        profiler_bytes: (TABLE.bytes() + symbol_bytes + live_bytes + crate::unwind::memory_bytes())
            as u64,
        symbol_cache_entries: symbols as u64,
    }
}
