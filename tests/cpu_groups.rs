//! One stack sampled on two CPUs: the stack table records it in an entry per CPU group
//! (so that the CPUs do not take turns with one entry's cache lines), and every snapshot,
//! profile and delta shows it once, with the samples of both.
//!
//! Two real threads run the same code, each pinned to a CPU of its own with
//! `sched_setaffinity` (CPUs 0 and 1, in different groups). On a machine with one CPU the
//! test says so, and the stack has one entry to begin with. That the table keeps an entry
//! per group is checked in `table.rs`'s unit tests.

use std::alloc::System;
use std::hint::black_box;

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

/// A size nothing else in this test asks for, to find the stack's record by.
const SIZE: usize = 4321;
const PER_THREAD: usize = 500;

#[inline(never)]
fn allocate_here() -> Vec<Box<[u8]>> {
    (0..PER_THREAD)
        .map(|_| black_box(vec![7u8; SIZE].into_boxed_slice()))
        .collect()
}

/// Pins the calling thread to `cpu`; `false` if the machine does not have it.
fn pin_to(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it (cpu is
    // below CPU_SETSIZE), and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Runs `allocate_here` on a thread pinned to `cpu` (the same code for every call, so the
/// same stack) and frees what it allocated there. Returns whether the pinning worked.
#[inline(never)]
fn run_pinned(cpu: usize) -> bool {
    std::thread::spawn(move || {
        let pinned = pin_to(cpu);
        drop(black_box(allocate_here()));
        pinned
    })
    .join()
    .unwrap()
}

/// The records of `SIZE`-byte allocations: (records, samples, sampled frees).
fn records_of_size(s: &allocprof::Snapshot) -> (usize, u64, u64) {
    let mut found = (0, 0, 0);
    for (_, c) in s.stacks() {
        if c.raw_alloc_objects > 0 && c.raw_alloc_bytes == c.raw_alloc_objects * SIZE as u64 {
            found.0 += 1;
            found.1 += c.raw_alloc_objects;
            found.2 += c.raw_free_objects;
        }
    }
    found
}

#[test]
fn a_stack_sampled_on_two_cpus_is_one_record() {
    allocprof::set_sample_rate(1);
    let base = allocprof::snapshot();
    let pinned = run_pinned(0) & run_pinned(1);
    let now = allocprof::snapshot();
    allocprof::set_sample_rate(512 * 1024);
    if !pinned {
        eprintln!("cpu_groups: could not pin to CPUs 0 and 1: the stack had one entry");
    }

    // Without the merge, two records of PER_THREAD each (one per CPU group).
    let want = 2 * PER_THREAD as u64;
    assert_eq!(
        records_of_size(&now),
        (1, want, want),
        "one record with every sample and free of both threads"
    );
    assert_eq!(
        records_of_size(&now.delta_since(&base)),
        (1, want, want),
        "the delta since before the threads: one record too"
    );
}
