//! The live set filled past its capacity and emptied again, at one sample per allocation.
//!
//! With [`allocprof::MAX_LIVE`] sampled objects alive, half of the live set's slots are
//! taken, so pointers chain across lines and removals come out of the middle of chains.
//! Checked, through the exact totals and the heap profile:
//!
//! * samples beyond the capacity are counted as allocations and in `untracked_samples`,
//!   and every tracked one is found and credited at its free, whatever the order of the
//!   frees;
//! * once emptied, the set tracks and credits again as if it had never been full.
//!
//! One `#[test]`, so that no other test of this process samples meanwhile.

use std::hint::black_box;

mod common;

#[global_allocator]
static ALLOC: allocprof::Profiler<std::alloc::System> =
    allocprof::Profiler::new(std::alloc::System);

/// More than the live set can hold.
const OVERFILL: usize = allocprof::MAX_LIVE + 20_000;
/// A second round, well under the capacity.
const AGAIN: usize = 30_000;

/// Fills `out` (reserved by the caller, so that only the blocks are allocated here).
#[inline(never)]
fn live_set_full_fill(out: &mut Vec<Option<Box<[u8; 24]>>>, n: usize) {
    out.extend((0..n).map(|i| Some(black_box(Box::new([i as u8; 24])))));
}

#[inline(never)]
fn live_set_full_again(out: &mut Vec<Option<Box<[u8; 40]>>>, n: usize) {
    out.extend((0..n).map(|i| Some(black_box(Box::new([i as u8; 40])))));
}

/// Frees the blocks in a scrambled order (a fixed permutation), so that removals come
/// out of every position of the chains. The vector itself stays allocated.
fn free_scrambled<T>(slots: &mut [Option<T>]) {
    let n = slots.len();
    // 7919 is prime and does not divide n, so i * 7919 mod n visits every index once.
    assert_ne!(n % 7919, 0);
    for i in 0..n {
        drop(slots[i * 7919 % n].take().expect("each block freed once"));
    }
}

#[test]
fn live_set_overfilled_then_emptied() {
    allocprof::set_sample_rate(1);
    // Both vectors are allocated (and sampled) before the first reading, and live to the
    // end, so that the counts below are the blocks' alone.
    let mut blocks = Vec::with_capacity(OVERFILL);
    let mut again = Vec::with_capacity(AGAIN);
    let s0 = allocprof::stats();
    live_set_full_fill(&mut blocks, OVERFILL);
    let s1 = allocprof::stats();
    let untracked = s1.untracked_samples - s0.untracked_samples;
    let tracked = s1.live_samples - s0.live_samples;
    println!("overfilled: {tracked} tracked, {untracked} untracked");
    assert!(
        s1.live_samples <= allocprof::MAX_LIVE as u64,
        "more tracked than the capacity: {s1:?}"
    );
    // The stripes fill unevenly, so a few fewer than MAX_LIVE may fit.
    assert!(
        tracked as usize > allocprof::MAX_LIVE * 9 / 10,
        "{tracked} tracked"
    );
    assert!(
        untracked as usize >= OVERFILL - allocprof::MAX_LIVE,
        "{untracked} untracked"
    );
    let [alloc_objects, alloc_space, inuse_objects, _] =
        common::heap_values_through("live_set_full_fill");
    assert_eq!(alloc_objects, OVERFILL as i64, "every allocation sampled");
    assert_eq!(alloc_space, 24 * OVERFILL as i64);
    assert_eq!(inuse_objects, OVERFILL as i64);

    free_scrambled(&mut blocks);
    let s2 = allocprof::stats();
    assert_eq!(
        s2.live_samples, s0.live_samples,
        "every tracked sample found and removed at its free"
    );
    // Frees of untracked samples cannot be credited: they stay in use in the profile,
    // as the README says. Every tracked one was credited.
    let fill = common::heap_values_through("live_set_full_fill");
    let fill_untracked = fill[2];
    assert!(
        fill_untracked > 0 && fill_untracked as u64 <= untracked,
        "in use after the frees: {fill:?}, untracked {untracked}"
    );
    assert_eq!(fill[3], 24 * fill_untracked, "{fill:?}");

    // Emptied, the set works as before: nothing is lost and nothing is left.
    live_set_full_again(&mut again, AGAIN);
    let s3 = allocprof::stats();
    assert_eq!(s3.untracked_samples, s2.untracked_samples, "room again");
    assert_eq!(
        common::heap_values_through("live_set_full_again"),
        [
            AGAIN as i64,
            40 * AGAIN as i64,
            AGAIN as i64,
            40 * AGAIN as i64
        ]
    );
    free_scrambled(&mut again);
    assert_eq!(
        common::heap_values_through("live_set_full_again"),
        [AGAIN as i64, 40 * AGAIN as i64, 0, 0],
        "every free credited"
    );
    assert_eq!(allocprof::stats().live_samples, s0.live_samples);
}
