//! Reliability, issue 6 point 1: `fork` while other threads are inside the profiler.
//!
//! Worker threads allocate at sample rate 1 (every allocation takes the sampled path:
//! stack capture, table shard lock, live-set lock) and another thread exports profiles in
//! a loop (symbolizer and symbol-cache locks), while the test thread forks [`FORKS`] times.
//! Every child allocates, takes a heap profile, decodes it, checks that its own allocation
//! is in it, and leaves with `_exit`. A child that does not finish within
//! [`CHILD_TIMEOUT`] is deadlocked (a profiler lock inherited in the locked state): it is
//! killed and the test fails. The parent must carry on: its workers keep allocating and it
//! can still export afterwards.
//!
//! The profiler's approach (fork.rs): `pthread_atfork` handlers take every profiler lock
//! before the fork, release them in the parent and reset them in the child.

use std::alloc::System;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

/// How many times the test forks.
const FORKS: usize = 200;
/// Threads allocating at rate 1 while the test forks.
const WORKERS: usize = 2;
/// Threads exporting profiles in a loop while the test forks.
const EXPORTERS: usize = 2;
/// Deadlock detection only (a healthy child takes milliseconds): generous because the
/// machine may be shared and the child symbolizes in a debug build.
const CHILD_TIMEOUT: Duration = Duration::from_secs(20);

/// Exit codes of a child.
const CHILD_OK: i32 = 0;
const CHILD_NOT_IN_PROFILE: i32 = 3;
const CHILD_PANICKED: i32 = 4;

/// Bytes the child keeps alive so that its heap profile must show them.
const CHILD_BYTES: usize = 12_345;

/// Allocates a block the heap profile must attribute to this function.
#[inline(never)]
fn child_allocates() -> Vec<u8> {
    black_box(vec![7u8; CHILD_BYTES])
}

/// What a child does: allocate, export, decode, look for its own allocation.
/// Returns true when the child's allocation is in its heap profile.
fn child_work() -> bool {
    let kept = child_allocates();
    let churn: Vec<String> = (0..64).map(|i| format!("child {i}")).collect();
    black_box(&churn);
    let gz = allocprof::heap_pprof();
    // Decoding allocates a lot; at rate 1 every allocation would be sampled (slow in a
    // debug build). The rate is the process's, so in the parent it is restored below.
    allocprof::set_sample_rate(0);
    let profile = common::decode(&gz);
    let found = common::stacks(&profile).iter().any(|(stack, values)| {
        stack.contains("child_allocates") && values[3] >= CHILD_BYTES as i64
    });
    allocprof::set_sample_rate(1);
    drop(kept);
    found
}

/// Allocation churn that stays inside the sampled path at rate 1.
fn worker(stop: &AtomicBool, progress: &AtomicU64) {
    let mut keep: Vec<Box<[u8]>> = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        keep.push(vec![i as u8; 16 + (i % 64) * 8].into_boxed_slice());
        if keep.len() > 256 {
            keep.drain(..128);
        }
        let s = format!("{i}-{}", keep.len());
        black_box(s);
        i += 1;
        progress.fetch_add(1, Ordering::Relaxed);
    }
}

enum Outcome {
    Exited(i32),
    Signaled(i32),
    Hung,
}

/// Waits for `pid` for at most `timeout`; kills it if it has not finished by then.
fn wait_with_timeout(pid: libc::pid_t, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(
            r >= 0,
            "waitpid failed: {}",
            std::io::Error::last_os_error()
        );
        if r == pid {
            if libc::WIFEXITED(status) {
                return Outcome::Exited(libc::WEXITSTATUS(status));
            }
            return Outcome::Signaled(libc::WTERMSIG(status));
        }
        if Instant::now() > deadline {
            print_stack_of(pid);
            // SAFETY: signalling and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Outcome::Hung;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Prints a hung child's stack with gdb when it is installed (diagnostics only).
fn print_stack_of(pid: libc::pid_t) {
    let out = std::process::Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-ex", "bt"])
        .output();
    match out {
        Ok(out) => eprintln!(
            "stack of hung child {pid}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => eprintln!("(install gdb to see the hung child's stack)"),
    }
}

/// Waits until `counter` moves past `from` (deadlock detection for the parent's threads).
fn wait_for_progress(counter: &AtomicU64, what: &str) {
    let from = counter.load(Ordering::Relaxed);
    let deadline = Instant::now() + CHILD_TIMEOUT;
    while counter.load(Ordering::Relaxed) <= from {
        assert!(
            Instant::now() < deadline,
            "{what} made no progress for {CHILD_TIMEOUT:?} in the parent after the forks"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn children_of_a_sampling_process_allocate_and_export() {
    allocprof::set_sample_rate(1);
    // Warm up in the parent so that children inherit a populated symbol cache, and check
    // that what the child will check works at all.
    let t = Instant::now();
    assert!(
        child_work(),
        "the parent's own heap profile lacks child_allocates"
    );
    println!("child_work in the parent: first {:?}", t.elapsed());
    let t = Instant::now();
    assert!(child_work());
    println!("child_work in the parent: second {:?}", t.elapsed());

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let exports = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..WORKERS {
        let (stop, progress) = (stop.clone(), progress.clone());
        threads.push(std::thread::spawn(move || worker(&stop, &progress)));
    }
    for _ in 0..EXPORTERS {
        let (stop, exports) = (stop.clone(), exports.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                black_box(allocprof::heap_pprof());
                exports.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    wait_for_progress(&progress, "the workers");

    let mut survived = 0;
    let mut failures = Vec::new();
    for n in 0..FORKS {
        // SAFETY: fork in a multi-threaded process. The child runs only what this test
        // exists to prove safe there (allocation, profile export, decoding) and leaves
        // with `_exit`, never returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = match std::panic::catch_unwind(child_work) {
                Ok(true) => CHILD_OK,
                Ok(false) => CHILD_NOT_IN_PROFILE,
                Err(_) => CHILD_PANICKED,
            };
            // SAFETY: leaving the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        match wait_with_timeout(pid, CHILD_TIMEOUT) {
            Outcome::Exited(CHILD_OK) => survived += 1,
            Outcome::Exited(CHILD_NOT_IN_PROFILE) => failures.push(format!(
                "fork {n}: child's allocation missing from its profile"
            )),
            Outcome::Exited(code) => failures.push(format!("fork {n}: child exited with {code}")),
            Outcome::Signaled(sig) => {
                failures.push(format!("fork {n}: child killed by signal {sig}"))
            }
            Outcome::Hung => failures.push(format!(
                "fork {n}: child did not finish within {CHILD_TIMEOUT:?} (deadlock), killed"
            )),
        }
    }

    // The parent carries on: workers and exporter still make progress, exports still work.
    wait_for_progress(&progress, "the workers");
    wait_for_progress(&exports, "the exporter");
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("parent thread panicked");
    }
    assert!(
        child_work(),
        "the parent's heap profile lacks child_allocates after the forks"
    );
    println!(
        "forks survived: {survived}/{FORKS} (workers made {} allocation rounds, exporters {} profiles)",
        progress.load(Ordering::Relaxed),
        exports.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} of {FORKS} forks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(survived, FORKS);
}
