//! The leak-hunting workflow end to end: start the demo service as a separate process,
//! let its load generator run, and find both of its problems with `go tool pprof` alone;
//! then start it with both fixes and show the problems are gone.

mod common;

use common::{go_pprof, have_go, http_get, temp_file, try_http_get, HIDE_STD};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The running demo; killed and reaped on drop, whatever happened.
struct Demo {
    child: Child,
    api: String,
    pprof: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo(extra: &[&str]) -> Demo {
    let exe = common::example_path("demo_service");
    if !exe.exists() {
        // `cargo test` builds examples; `cargo test --test demo_e2e` does not.
        let release = exe.components().any(|c| c.as_os_str() == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--example", "demo_service"]);
        if release {
            build.arg("--release");
        }
        assert!(build.status().expect("run cargo build").success());
    }
    let mut child = common::runner::target_command(&exe)
        .args([
            "--port",
            "0",
            "--profiler-addr",
            "127.0.0.1:0",
            "--load-threads",
            "2",
        ])
        .args(extra)
        // A finer rate than the default, so a few seconds of a debug build suffice.
        .env("ALLOCPROF_SAMPLE_RATE", "16384")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start demo_service");
    let stdout = child.stdout.take().expect("stdout");
    let mut demo = Demo {
        child,
        api: String::new(),
        pprof: String::new(),
    };
    let mut lines = BufReader::new(stdout).lines();
    while demo.api.is_empty() || demo.pprof.is_empty() {
        let line = lines
            .next()
            .expect("demo exited before printing its addresses")
            .expect("read demo output");
        let addr = |l: &str| {
            l.split("http://")
                .nth(1)
                .and_then(|r| r.split('/').next())
                .map(str::to_string)
        };
        if line.starts_with("scoring API:") {
            demo.api = addr(&line).expect("api address");
        } else if line.starts_with("profiler:") {
            demo.pprof = addr(&line).expect("profiler address");
        }
    }
    // Keep draining stdout so the demo never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    // Wait until the load generator has served more requests than the fixed log keeps,
    // so that with --fix-leak the log is at its steady size.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let served: u64 = match try_http_get(&demo.api, "/recent") {
            Ok((200, body)) => String::from_utf8_lossy(&body)
                .split("\"served\":")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            _ => 0,
        };
        if served > 300 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the demo's load generator did not run"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    demo
}

fn fetch(demo: &Demo, path: &str, name: &str) -> common::TempPath {
    let (status, body) = http_get(&demo.pprof, path);
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    temp_file(name, &body)
}

/// `(flat, name)` rows of `go tool pprof -top` output.
fn top_rows(out: &str) -> Vec<(String, String)> {
    out.lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 6).then(|| (cols[0].to_string(), cols[5..].join(" ")))
        })
        .collect()
}

/// `2.71MB`, `105.25kB`, `-0.02MB`, `512B` → bytes.
fn parse_size(s: &str) -> f64 {
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().unwrap_or(0.0);
    n * match unit {
        "kB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        _ => 1.0,
    }
}

/// Leak: the rows of the `-base` diff of two heap profiles taken seconds apart,
/// as (bytes grown, function), largest first.
fn heap_growth(demo: &Demo, tag: &str) -> Vec<(f64, String)> {
    let base = fetch(demo, "/debug/pprof/heap", &format!("{tag}-base.pb.gz"));
    // Under an emulator the demo serves far fewer requests a second: wait longer.
    let window = if common::runner::emulated() { 40 } else { 6 };
    std::thread::sleep(Duration::from_secs(window));
    let now = fetch(demo, "/debug/pprof/heap", &format!("{tag}-now.pb.gz"));
    let out = go_pprof(&[
        "-top",
        &format!("-hide={HIDE_STD}"),
        "-base",
        base.to_str().unwrap(),
        now.to_str().unwrap(),
    ]);
    eprintln!("[{tag}] heap growth:\n{out}");
    top_rows(&out)
        .into_iter()
        .map(|(flat, name)| (parse_size(&flat), name))
        .collect()
}

/// Hot spots: the top `alloc_objects` functions of the allocs profile.
fn top_allocators(demo: &Demo, tag: &str) -> Vec<String> {
    let allocs = fetch(demo, "/debug/pprof/allocs", &format!("{tag}-allocs.pb.gz"));
    let out = go_pprof(&[
        "-top",
        "-sample_index=alloc_objects",
        &format!("-hide={HIDE_STD}"),
        allocs.to_str().unwrap(),
    ]);
    eprintln!("[{tag}] allocation hot spots:\n{out}");
    top_rows(&out)
        .into_iter()
        .filter(|(flat, _)| flat != "0")
        .take(3)
        .map(|(_, n)| n)
        .collect()
}

#[test]
fn leak_and_hot_spot_are_found_and_fixes_make_them_disappear() {
    if !have_go() {
        return;
    }
    const LEAK: &str = "demo_service::RequestLog::record";
    let demo = start_demo(&[]);
    let growth = heap_growth(&demo, "broken");
    let (leaked, top) = growth.first().cloned().unwrap_or_default();
    assert_eq!(top, LEAK, "top of the heap growth: {growth:?}");
    assert!(leaked > 512.0 * 1024.0, "the leak grew only {leaked} bytes");
    let hot = top_allocators(&demo, "broken");
    assert_eq!(
        hot.first().map(String::as_str),
        Some("demo_service::pair_weight_by_string_key"),
        "top allocator by objects: {hot:?}"
    );
    drop(demo);

    let fixed = start_demo(&["--fix-hotspot", "--fix-leak"]);
    let growth = heap_growth(&fixed, "fixed");
    // The bounded log still churns (old records out, new ones in), so sampling shows
    // some noise there, but no growth comparable to the leak's.
    let still = growth
        .iter()
        .filter(|(_, name)| name == LEAK)
        .map(|(b, _)| *b)
        .sum::<f64>();
    assert!(
        still < leaked / 5.0,
        "with --fix-leak the log still grew {still} bytes (vs {leaked} leaked before)"
    );
    let hot = top_allocators(&fixed, "fixed");
    assert!(
        !hot.iter().any(|n| n.contains("pair_weight_by_string_key")),
        "the hot spot is fixed: {hot:?}"
    );
}
