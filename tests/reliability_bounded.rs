//! Reliability, issue 6 point 3: bounded memory under more than a million distinct stacks.
//!
//! At sample rate 1 the test calls through 16 distinct functions, 1 to 5 levels deep,
//! choosing the function at each level from the digits of a counter: 16 + 16² + … + 16⁵ =
//! 1 118 480 distinct call paths, each ending in one allocation that is freed at once.
//! The stack table keeps `max_stacks()` of them; then:
//!
//! * `stats().profiler_bytes` stays under the cap derived below from `max_stacks()`, and
//!   once the table is full it does not grow at all;
//! * the process's heap (measured independently by a counting inner allocator) stays
//!   flat from then on, within a small slack;
//! * `dropped_samples` counts every sample that did not fit, and the profile carries
//!   them in the overflow entry `[allocprof: stack table full]` (at rate 1 every sample
//!   has weight 1, so its alloc_objects equal `dropped_samples`).
//!
//! # The cap
//!
//! A stored stack costs one 80-byte entry (hash, frame range, eight counters), at most
//! 16 bytes of index (slots are `u32`s, at most four per entry: the index doubles when
//! half full) and 8 bytes per frame, at most [`allocprof::MAX_DEPTH`] frames. The entry
//! and frame vectors at most double past their length. So the table holds at most
//! `max_stacks × (2 × (80 + 8 × MAX_DEPTH) + 16)` bytes (2.2 KiB a stack, 70 MiB at the
//! default 32768), plus the live set's static tables (4 MiB, touched as samples land)
//! and the symbol cache. Without the cap, this workload alone would store over a
//! million stacks (hundreds of MiB).

use std::hint::black_box;
use std::sync::atomic::Ordering;

mod common;

#[global_allocator]
static ALLOC: allocprof::Profiler<common::LiveBytes> = allocprof::Profiler::new(common::LiveBytes);

/// Deepest chain of distinct functions.
const LEVELS: u32 = 5;
/// Size of an entry of the stack table (see the module docs).
const ENTRY_BYTES: u64 = 80;
/// Live set: 2^17 slots of a pointer plus 24 bytes of metadata.
const LIVE_SET_BYTES: u64 = (1 << 17) * (8 + 24);
/// Heap growth allowed once the table is full (allocator and harness noise).
const FLAT_SLACK: i64 = 256 * 1024;

/// Most memory the DWARF unwinder's lazily created rule caches can take
/// (`profiler/src/unwind/dwarf.rs`: 8 slots × `SLOT_BYTES` = 59688 bytes on x86_64).
const UNWINDER_CACHES_MAX: u64 = 8 * 59_688;

/// The documented bound on the stack table's bytes for `max_stacks` stacks.
fn table_cap(max_stacks: u64) -> u64 {
    max_stacks * (2 * (ENTRY_BYTES + 8 * allocprof::MAX_DEPTH as u64) + 16)
}

type Step = fn(u32, u64);

macro_rules! steps {
    ($($name:ident = $k:expr),* $(,)?) => {
        $(
            #[inline(never)]
            fn $name(depth: u32, path: u64) {
                if depth == 0 {
                    // A distinct allocation site per function.
                    let block = vec![$k as u8; 16 + $k];
                    black_box(block);
                } else {
                    STEPS[(path & 15) as usize](depth - 1, path >> 4);
                }
                // Work after the call keeps it from being a tail call.
                black_box($k);
            }
        )*
        static STEPS: [Step; 16] = [$($name),*];
    };
}

steps!(
    s0 = 0,
    s1 = 1,
    s2 = 2,
    s3 = 3,
    s4 = 4,
    s5 = 5,
    s6 = 6,
    s7 = 7,
    s8 = 8,
    s9 = 9,
    s10 = 10,
    s11 = 11,
    s12 = 12,
    s13 = 13,
    s14 = 14,
    s15 = 15,
);

/// Runs every path of `levels` levels (16^levels distinct stacks), split over
/// `threads` threads (fresh threads also have shallower stacks than the test harness's,
/// which makes each capture cheaper).
fn all_paths(levels: u32, threads: u64) {
    let n = 16u64.pow(levels);
    let chunk = n.div_ceil(threads);
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                for path in t * chunk..((t + 1) * chunk).min(n) {
                    STEPS[(path & 15) as usize](levels - 1, path >> 4);
                }
            });
        }
    });
}

#[test]
fn a_million_distinct_stacks_stay_under_the_cap() {
    allocprof::set_sample_rate(1);
    let max_stacks = allocprof::max_stacks() as u64;
    let cap = table_cap(max_stacks) + LIVE_SET_BYTES;
    let s0 = allocprof::stats();

    // Levels 1..=4: 69 904 stacks, more than the default cap of 32768.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4)) as u64;
    for levels in 1..LEVELS {
        all_paths(levels, threads);
    }
    let full = allocprof::stats();
    assert_eq!(
        full.unique_stacks,
        max_stacks,
        "the table should be full after {} distinct stacks",
        full.samples - s0.samples
    );
    let heap_full = common::LIVE.load(Ordering::Relaxed);

    // Level 5: 1 048 576 more.
    all_paths(LEVELS, threads);
    let end = allocprof::stats();
    let heap_end = common::LIVE.load(Ordering::Relaxed);

    let distinct: u64 = (1..=LEVELS).map(|l| 16u64.pow(l)).sum();
    let samples = end.samples - s0.samples;
    println!(
        "{distinct} distinct stacks, {samples} samples; table full at {} stacks; \
         profiler_bytes {} when full, {} at the end (cap {cap}); \
         dropped_samples {}; heap growth after the table filled {} bytes",
        full.unique_stacks,
        full.profiler_bytes,
        end.profiler_bytes,
        end.dropped_samples,
        heap_end - heap_full,
    );
    assert!(samples >= distinct, "rate 1 samples every allocation");
    assert_eq!(end.unique_stacks, max_stacks);
    assert!(
        end.profiler_bytes <= cap,
        "profiler_bytes {} above the cap {cap}",
        end.profiler_bytes
    );
    // Once full, only the DWARF unwinder may still create rule caches: lazily, one slot
    // (59688 bytes each) at a time, at most 8 slots in the process.
    assert!(
        end.profiler_bytes >= full.profiler_bytes
            && end.profiler_bytes - full.profiler_bytes <= UNWINDER_CACHES_MAX,
        "profiler memory grew after the table was full: {} -> {}",
        full.profiler_bytes,
        end.profiler_bytes
    );
    assert!(
        heap_end - heap_full <= FLAT_SLACK,
        "the heap grew by {} bytes while a million new stacks were dropped",
        heap_end - heap_full
    );
    // Every path beyond the cap was dropped (paths are never repeated).
    assert!(
        end.dropped_samples >= distinct - max_stacks,
        "dropped_samples {} < {} distinct stacks that did not fit",
        end.dropped_samples,
        distinct - max_stacks
    );

    // The profile says so: the overflow entry carries the dropped samples.
    let snapshot = allocprof::snapshot();
    assert_eq!(
        snapshot.overflow().raw_alloc_objects,
        snapshot.stats().dropped_samples,
        "overflow entry vs dropped_samples"
    );
    let gz = allocprof::allocs_pprof();
    let profile = common::decode(&gz);
    let overflow: Vec<_> = common::stacks(&profile)
        .into_iter()
        .filter(|(stack, _)| stack.contains("[allocprof: stack table full]"))
        .collect();
    assert_eq!(overflow.len(), 1, "one overflow entry in the profile");
    let dropped = allocprof::stats().dropped_samples as i64;
    assert!(
        overflow[0].1[0] >= end.dropped_samples as i64 && overflow[0].1[0] <= dropped,
        "overflow alloc_objects {} vs dropped_samples {}..={dropped}",
        overflow[0].1[0],
        end.dropped_samples
    );
    if common::have_go() {
        let path = common::temp_file("bounded.pb.gz", &gz);
        let top = common::go_pprof(&[
            "-top",
            "-sample_index=alloc_objects",
            path.to_str().expect("utf-8 path"),
        ]);
        assert!(
            top.contains("[allocprof: stack table full]"),
            "go tool pprof -top does not show the overflow entry:\n{top}"
        );
    }
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
}
