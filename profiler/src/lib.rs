//! allocprof's core: a sampling [`GlobalAlloc`](std::alloc::GlobalAlloc) wrapper that
//! records where allocations come from, and an exporter of Go-compatible heap and allocs
//! profiles in pprof format.
//!
//! Most users depend on the `allocprof` facade crate, which re-exports everything here
//! and adds the HTTP endpoint. The data flow:
//!
//! * [`Profiler`] samples allocations (one per [`sample_rate`] bytes on average, Poisson
//!   over bytes as Go's runtime; the math is in [`sampler`]) and keeps exact totals.
//! * Sampled stacks go into a lock-sharded table; frees of sampled objects are credited.
//! * [`snapshot`] copies the table; [`Snapshot::to_profile`] symbolizes it into a
//!   format-neutral [`Profile`]; [`pprof::encode()`] and [`text::legacy_text`] write it.
//!
//! Export work runs with the calling thread marked as profiler work, so its own
//! allocations are never sampled: exporting does not change the profile, and two exports
//! of an idle process are identical but for their timestamps. Those allocations still
//! count in the exact totals of [`stats`].

mod alloc;
mod config;
mod fork;
mod guard;
mod live;
mod lock;
pub mod maps;
pub mod pprof;
pub mod profile;
pub mod sampler;
mod snapshot;
mod stack;
mod stats;
pub mod symbolize;
mod table;
pub mod text;
mod thread;
pub mod trace;
mod unwind;

pub use alloc::Profiler;
pub use config::{
    max_stacks, sample_rate, set_max_stacks, set_sample_rate, DEFAULT_MAX_STACKS,
    DEFAULT_SAMPLE_RATE,
};
pub use live::MAX_LIVE;
pub use profile::{Profile, ProfileKind, SampleType};
pub use snapshot::{snapshot, Snapshot};
pub use stack::{LookupAddress, ReturnAddress, MAX_DEPTH};
pub use stats::{stats, Stats};
pub use table::Counters;

/// The heap profile (live objects; pprof shows `inuse_space` first), gzipped pprof.
pub fn heap_pprof() -> Vec<u8> {
    pprof::encode(&snapshot().to_profile(), ProfileKind::Heap)
}

/// The allocs profile (same data; default sample type `alloc_space`), gzipped pprof.
pub fn allocs_pprof() -> Vec<u8> {
    pprof::encode(&snapshot().to_profile(), ProfileKind::Allocs)
}

/// Resolves one code address to a function name, as `/debug/pprof/symbol` answers.
/// The address is used as given (a lookup address, not a return address).
pub fn symbol_name(addr: usize) -> Option<String> {
    symbolize::symbolize(&[LookupAddress(addr)])
        .into_iter()
        .next()
        .and_then(|s| s.last().map(|f| f.name.clone()))
}

/// Whether the calling thread is inside profiler work (the reentrancy mark). For tests
/// that prove the allocator path never recurses; not part of the stable API.
#[doc(hidden)]
pub fn __thread_is_marked() -> bool {
    let was = thread::set_busy(true);
    thread::set_busy(was);
    was
}
