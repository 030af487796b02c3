//! [`Snapshot`]: a consistent copy of the stack table, unsymbolized, cheap to take and to
//! subtract. The data model knows nothing about pprof.

use crate::guard::ReentrancyGuard;
use crate::stats::{stats, Stats};
use crate::table::{Counters, RawRecord, RawSnapshot, TABLE};
use crate::{config, stack::ReturnAddress};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// A copy of every stack's counters at one moment (per shard), or the difference of two.
pub struct Snapshot {
    pub(crate) raw: RawSnapshot,
    pub(crate) rate: usize,
    pub(crate) time: SystemTime,
    pub(crate) duration: Option<Duration>,
    pub(crate) stats: Stats,
}

/// Copies the stack table. The table is copied one shard at a time under that shard's
/// lock; nothing is allocated while a lock is held and nothing is symbolized here.
pub fn snapshot() -> Snapshot {
    let _mark = ReentrancyGuard::enter();
    let mut raw = RawSnapshot::default();
    TABLE.snapshot_into(&mut raw);
    Snapshot {
        raw,
        rate: config::sample_rate(),
        time: SystemTime::now(),
        duration: None,
        stats: stats(),
    }
}

impl Snapshot {
    /// When the snapshot was taken (for a delta: when its later snapshot was).
    pub fn time(&self) -> SystemTime {
        self.time
    }

    /// For a delta, the time between its two snapshots.
    pub fn duration(&self) -> Option<Duration> {
        self.duration
    }

    /// The sampling rate when the snapshot was taken.
    pub fn sample_rate(&self) -> usize {
        self.rate
    }

    /// The exact totals when the snapshot was taken.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Every stack (return addresses, leaf first) with its counters; the overflow entry
    /// is not included (see [`Snapshot::overflow`]).
    pub fn stacks(&self) -> impl Iterator<Item = (&[ReturnAddress], &Counters)> {
        self.raw
            .records
            .iter()
            .map(|r| (self.raw.stack(r), &r.counters))
    }

    /// Counters of samples whose stacks did not fit in the table.
    pub fn overflow(&self) -> &Counters {
        &self.raw.overflow
    }

    /// `self − base` for every stack, as Go computes `?seconds=N` profiles: in-use values
    /// can be negative; stacks whose counters did not change are dropped. `base` must be
    /// an earlier snapshot of this process.
    pub fn delta_since(&self, base: &Snapshot) -> Snapshot {
        let _mark = ReentrancyGuard::enter();
        let before: HashMap<&[ReturnAddress], &Counters> = base.stacks().collect();
        let mut raw = RawSnapshot::default();
        for (stack, counters) in self.stacks() {
            let d = match before.get(stack) {
                Some(b) => counters.minus(b),
                None => *counters,
            };
            if d.raw_alloc_objects == 0 && d.raw_free_objects == 0 {
                continue;
            }
            let start = raw.frames.len();
            raw.frames.extend(stack.iter().map(|a| a.0));
            raw.records.push(RawRecord {
                start,
                len: stack.len(),
                counters: d,
            });
        }
        raw.overflow = self.raw.overflow.minus(&base.raw.overflow);
        Snapshot {
            raw,
            rate: self.rate,
            time: self.time,
            duration: Some(self.time.duration_since(base.time).unwrap_or_default()),
            stats: self.stats.clone(),
        }
    }
}
