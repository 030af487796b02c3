//! End to end: the profile of one deterministic workload is the same whichever unwinder
//! captured its stacks.
//!
//! The unwinder is chosen once per process (`ALLOCPROF_UNWINDER`), so the test re-runs
//! this binary as a child per unwinder. Each child samples every allocation (rate 1) of
//! [`workload`], on the main thread and a spawned one, and prints the symbolized stacks
//! (function and line of every frame) with their raw allocation counts; the parent compares
//! the children's outputs with the `libgcc` (`backtrace` crate) child's.
//!
//! `fp` is compared only in a build with frame pointers (`RUSTFLAGS="-C
//! force-frame-pointers=yes"`); otherwise the test says it skips it.

#[allow(dead_code)] // shared helpers, not all used here
#[path = "../../tests/common/runner.rs"]
mod runner;

use allocprof_core::Profiler;
use std::alloc::System;
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;

#[global_allocator]
static ALLOC: Profiler<System> = Profiler::new(System);

const CHILD: &str = "ALLOCPROF_UNWIND_IDENTICAL_CHILD";

#[inline(never)]
fn leaf_vec(n: usize) -> Vec<u64> {
    (0..n as u64).collect()
}

#[inline(never)]
fn leaf_string(i: usize) -> String {
    format!("item-{i}-{}", "x".repeat(i % 7))
}

#[inline(never)]
fn leaf_map(n: usize) -> HashMap<usize, String> {
    (0..n).map(|i| (i, leaf_string(i))).collect()
}

#[inline(never)]
fn deep(depth: usize, n: usize) -> usize {
    if depth == 0 {
        let v = leaf_vec(n);
        let m = leaf_map(n % 13 + 1);
        return black_box(v.len() + m.len());
    }
    black_box(deep(black_box(depth - 1), n) + 1)
}

/// Allocations from several call paths and depths (up to past the 128-frame buffer).
#[inline(never)]
fn workload() -> usize {
    let mut total = 0;
    for (i, depth) in [0usize, 1, 5, 20, 60, 140].into_iter().enumerate() {
        total += deep(depth, 10 + i * 100);
        total += black_box(Box::new([i; 16])).len();
    }
    total
}

/// The child: profile the workload, print `count<TAB>stack` lines, sorted.
fn child() {
    allocprof_core::set_sample_rate(1);
    let a = workload();
    let b = std::thread::spawn(workload).join().unwrap();
    allocprof_core::set_sample_rate(0);
    black_box(a + b);
    let profile = allocprof_core::snapshot().to_profile();
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for s in &profile.samples {
        let frames: Vec<String> = s
            .locations
            .iter()
            .flat_map(|&l| profile.locations[l].lines.iter())
            .map(|line| format!("{}:{}", profile.functions[line.function].name, line.line))
            .collect();
        if !frames.iter().any(|f| is_ours(f)) {
            continue; // the test harness's own allocations
        }
        *lines.entry(frames.join(";")).or_default() += s.counters.raw_alloc_objects;
    }
    for (stack, count) in lines {
        println!("{count}\t{stack}");
    }
}

/// A frame's function name without its module path (`name:line` in, `name` out). Release
/// builds name inlined frames without a path, debug builds with one.
fn function(frame: &str) -> &str {
    let name = frame.rsplit_once(':').map_or(frame, |(n, _)| n);
    name.rsplit("::").next().unwrap_or(name)
}

/// Whether a frame belongs to this test's workload.
fn is_ours(frame: &str) -> bool {
    matches!(
        function(frame),
        "deep" | "leaf_vec" | "leaf_map" | "leaf_string" | "workload"
    )
}

fn run_child(unwinder: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let out = runner::target_command(exe)
        .args([
            "--exact",
            "stacks_are_identical_across_unwinders",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(CHILD, "1")
        .env("ALLOCPROF_UNWINDER", unwinder)
        .output()
        .unwrap();
    assert!(out.status.success(), "{unwinder} child failed: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.split('\t').count() == 2)
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Whether this binary was compiled with frame pointers: the prologue of a non-leaf
/// function is `push rbp; mov rbp, rsp`.
fn has_frame_pointers() -> bool {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return false;
    }
    let f: fn(usize, usize) -> usize = deep;
    // SAFETY: the first four bytes of a function of this binary, in its mapped text.
    let code = unsafe { std::ptr::read_unaligned(f as usize as *const [u8; 4]) };
    code == [0x55, 0x48, 0x89, 0xe5]
}

#[test]
fn stacks_are_identical_across_unwinders() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let base = run_child("libgcc");
    let stacks = base.lines().count();
    assert!(stacks >= 8, "too few stacks from the baseline: {stacks}");
    assert!(
        base.lines()
            .any(|l| l.split(';').filter(|f| function(f) == "deep").count() >= 100),
        "no stack reached the 128-frame buffer"
    );
    let mut others = vec![];
    if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        others.push("dwarf");
    }
    if has_frame_pointers() {
        others.push("fp");
    } else {
        eprintln!(
            "notice: built without frame pointers; skipping fp (run with \
             RUSTFLAGS=\"-C force-frame-pointers=yes\")"
        );
    }
    for u in others {
        let got = run_child(u);
        let first_difference = got
            .lines()
            .zip(base.lines())
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("{u}:\n{a}\nlibgcc:\n{b}"));
        assert!(
            got == base,
            "{u}: {} stacks vs {stacks} from the backtrace baseline; first difference: {:?}",
            got.lines().count(),
            first_difference
        );
    }
}
