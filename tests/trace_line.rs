//! The trace line: API and `ALLOCPROF_TRACE`, including bad values.

mod common;

use std::alloc::System;
use std::time::Duration;

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

#[test]
fn trace_api_reports_what_the_program_does() {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let trace = allocprof::trace::start_with(Duration::from_millis(100), move |line| {
        let _ = tx.send(line.to_string());
    })
    .expect("start trace");
    // 8 MiB kept: the in-use figure of a later line grows by that much, less what this
    // thread has not published yet.
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a first line");
    let kept: Vec<Vec<u8>> = (0..128).map(|_| vec![1u8; 64 * 1024]).collect();
    let mut lines = vec![first];
    while lines.len() < 3 {
        lines.push(
            rx.recv_timeout(Duration::from_secs(10))
                .expect("more lines"),
        );
    }
    trace.stop();
    for l in &lines {
        assert!(l.starts_with("allocprof: t="), "{l}");
        for field in [
            "inuse=", "alloc=", "free=", "samples=", "stacks=", "dropped=", "self=",
        ] {
            assert!(l.contains(field), "{field} missing in {l}");
        }
    }
    let grew = lines[1..].iter().any(|l| {
        l.split("inuse=")
            .nth(1)
            .and_then(|r| r.split(" (+").nth(1))
            .and_then(|r| r.split("MiB)").next())
            .and_then(|n| n.parse::<f64>().ok())
            // The trace thread reads this thread's counters in place, so all 8 MiB are
            // there; the line rounds to 0.1 MiB.
            .is_some_and(|mib| mib >= 8.0 - 0.05)
    });
    assert!(grew, "no line shows the 8 MiB kept: {lines:#?}");
    drop(kept);
}

/// Runs `child_trace_from_env` in a child process with `ALLOCPROF_TRACE=value`.
fn run_child(value: &str) -> String {
    let out = common::runner::target_command(std::env::current_exe().unwrap())
        .args([
            "child_trace_from_env",
            "--exact",
            "--nocapture",
            "--ignored",
        ])
        .env("ALLOCPROF_TRACE", value)
        .output()
        .expect("run child");
    assert!(out.status.success(), "child failed: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[ignore = "entry point of the child process of the env tests"]
fn child_trace_from_env() {
    let started = allocprof::trace::start_from_env();
    eprintln!("started={started}");
    std::thread::sleep(Duration::from_millis(700));
}

#[test]
fn env_interval_prints_lines_and_bad_values_print_a_message() {
    let ok = run_child("200ms");
    assert!(ok.contains("started=true"), "{ok}");
    let lines = ok
        .lines()
        .filter(|l| l.starts_with("allocprof: t="))
        .count();
    assert!(
        lines >= 2,
        "expected trace lines every 200 ms in 700 ms:\n{ok}"
    );

    for bad in ["fast", "10", "-1s", "1x"] {
        let err = run_child(bad);
        assert!(err.contains("started=false"), "{bad}: {err}");
        assert!(
            err.contains("ignoring ALLOCPROF_TRACE"),
            "{bad}: no clear message:\n{err}"
        );
        assert!(!err.contains("allocprof: t="), "{bad}: trace ran anyway");
    }
}
