//! The real client: `go tool pprof` against a live endpoint, over HTTP, for the heap and
//! allocs profiles, a `-seconds` delta, the `debug=1` text, and remote symbolization
//! through `/debug/pprof/symbol`.

mod common;

use allocprof_http::{Config, Server};
use common::{go_pprof, go_pprof_with_stderr, have_go, workload};
use std::alloc::System;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

#[global_allocator]
static A: allocprof_core::Profiler<System> = allocprof_core::Profiler::new(System);

/// Tests here read the same process-wide profile; they take turns.
static SERIAL: Mutex<()> = Mutex::new(());

/// This test's turn, or `None` (skip) when `go` is missing (which fails instead under
/// `ALLOCPROF_REQUIRE_GO=1`, see `have_go`).
fn turn_with_go() -> Option<MutexGuard<'static, ()>> {
    let turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    have_go().then_some(turn)
}

fn base_url() -> String {
    static SERVER: OnceLock<(Server, Vec<Vec<u8>>)> = OnceLock::new();
    let (server, _) = SERVER.get_or_init(|| {
        let kept = workload();
        let server = Config::new().addr("127.0.0.1:0").serve().expect("serve");
        (server, kept)
    });
    format!("http://{}/debug/pprof", server.local_addr())
}

#[test]
fn top_of_heap_and_allocs_over_http() {
    let Some(_serial) = turn_with_go() else {
        return;
    };
    let url = base_url();
    let top = go_pprof(&["-top", &format!("{url}/heap")]);
    println!("go tool pprof -top {url}/heap\n{top}");
    assert!(top.contains("Type: inuse_space"), "{top}");
    assert!(
        top.contains("common::endpoint_test_retained_blocks"),
        "{top}"
    );
    assert!(
        !top.contains("endpoint_test_churn_strings"),
        "freed memory is not in use:\n{top}"
    );

    let top = go_pprof(&["-top", &format!("{url}/allocs")]);
    println!("go tool pprof -top {url}/allocs\n{top}");
    assert!(top.contains("Type: alloc_space"), "{top}");
    assert!(top.contains("common::endpoint_test_churn_strings"), "{top}");
    assert!(
        top.contains("common::endpoint_test_retained_blocks"),
        "{top}"
    );

    let top = go_pprof(&[
        "-top",
        "-sample_index=alloc_objects",
        &format!("{url}/allocs"),
    ]);
    assert!(top.contains("Type: alloc_objects"), "{top}");
    assert!(top.contains("common::endpoint_test_churn_strings"), "{top}");
}

/// Allocates in a loop until told to stop: what a delta over the window must show.
#[inline(never)]
fn endpoint_test_allocating_during_delta(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        for i in 0..1000 {
            black_box(vec![i as u8; 1024]);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn seconds_gives_a_delta() {
    let Some(_serial) = turn_with_go() else {
        return;
    };
    let url = base_url();
    let stop = AtomicBool::new(false);
    let (top, stderr) = std::thread::scope(|s| {
        s.spawn(|| endpoint_test_allocating_during_delta(&stop));
        // Stops the allocator on every way out, a failed `go tool pprof` too.
        let _stop = common::StopOnDrop(&stop);
        go_pprof_with_stderr(&[
            "-seconds",
            "2",
            "-top",
            "-sample_index=alloc_space",
            &format!("{url}/allocs"),
        ])
    });
    println!("go tool pprof -seconds 2 -top -sample_index=alloc_space {url}/allocs\n{stderr}{top}");
    // pprof says it is fetching for 2 seconds; the profile covers them.
    assert!(
        stderr.contains("Fetching profile over HTTP from") && stderr.contains("seconds=2"),
        "{stderr}"
    );
    assert!(
        top.contains("Duration: 2"),
        "duration_nanos is set on a delta:\n{top}"
    );
    assert!(
        top.contains("endpoint_test_allocating_during_delta"),
        "{top}"
    );
    // The workload ran before the window: it is not in the delta.
    assert!(!top.contains("endpoint_test_churn_strings"), "{top}");
    assert!(!top.contains("endpoint_test_retained_blocks"), "{top}");
}

#[test]
fn legacy_text_over_http() {
    let Some(_serial) = turn_with_go() else {
        return;
    };
    let url = base_url();
    // pprof parses the text (records and memory map). Asked to symbolize remotely, it
    // posts the addresses to /debug/pprof/symbol and names them from our answers.
    let target = format!("{url}/heap?debug=1");
    let (top, stderr) = go_pprof_with_stderr(&["-symbolize=remote", "-top", &target]);
    println!("go tool pprof -symbolize=remote -top {target}\n{stderr}{top}");
    assert!(top.contains("Type: inuse_space"), "{top}");
    assert!(top.contains("endpoint_test_retained_blocks"), "{top}");

    let raw = go_pprof(&["-raw", "-symbolize=none", &target]);
    assert!(raw.contains("PeriodType: space bytes"), "{raw}");
    assert!(raw.contains("Period: 4096"), "{raw}");
}

/// A URL with a doubled slash (a base URL ending in `/` joined to `/debug/pprof/...`)
/// reaches the profile through the mux's redirect, and an escaped path is decoded, as
/// against a Go server.
#[test]
fn pprof_follows_clean_path_redirects() {
    let Some(_serial) = turn_with_go() else {
        return;
    };
    let addr = base_url_addr();
    for target in [
        format!("http://{addr}//debug/pprof/heap"),
        format!("http://{addr}/debug/pprof/./x/../%68eap"),
    ] {
        let (top, stderr) = go_pprof_with_stderr(&["-top", &target]);
        assert!(top.contains("Type: inuse_space"), "{target}: {stderr}{top}");
        assert!(
            top.contains("common::endpoint_test_retained_blocks"),
            "{target}: {top}"
        );
    }
}

/// With a token configured, `go tool pprof` (which cannot send one) fails with our reason
/// shown, because errors carry `X-Go-Pprof: 1`.
#[test]
fn pprof_shows_why_a_request_was_refused() {
    let Some(_serial) = turn_with_go() else {
        return;
    };
    let server = Config::new()
        .addr("127.0.0.1:0")
        .token(Some("s3cret"))
        .serve()
        .expect("serve");
    let url = format!("http://{}/debug/pprof/heap", server.local_addr());
    let out = std::process::Command::new("go")
        .args(["tool", "pprof", "-top", &url])
        .output()
        .expect("run go tool pprof");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("server response: 401 Unauthorized - Unauthorized"),
        "{stderr}"
    );
    let url = format!("http://{}/debug/pprof/heap?seconds=100000", base_url_addr());
    let out = std::process::Command::new("go")
        .args(["tool", "pprof", "-top", &url])
        .output()
        .expect("run go tool pprof");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("400 Bad Request - profile duration exceeds server's WriteTimeout"),
        "{stderr}"
    );
    server.shutdown();
}

fn base_url_addr() -> String {
    base_url()
        .trim_start_matches("http://")
        .trim_end_matches("/debug/pprof")
        .to_string()
}
