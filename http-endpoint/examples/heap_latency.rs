//! Measures the latency of `GET /debug/pprof/heap` on a workload: the first request of a
//! process (cold symbol cache) and the following ones (cached symbols), over loopback.
//!
//! ```text
//! cargo run --release -p allocprof-http --example heap_latency [-- RUNS REQUESTS]
//! ```
//!
//! Starts itself RUNS times (default 21) as a child process; each child runs the workload
//! (1,024 distinct call stacks, ~64 MiB kept, a background thread that keeps allocating;
//! sampling rate 32 KiB),
//! serves the endpoint, and times one cold request and REQUESTS (default 25) cached ones.
//! Prints the medians. Measured, never asserted.

use std::alloc::System;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[global_allocator]
static A: allocprof_core::Profiler<System> = allocprof_core::Profiler::new(System);

#[inline(never)]
fn branch_a(depth: u32, path: u32, kept: &mut Vec<Vec<u8>>) {
    descend(depth, path, kept);
    // Not a tail call (keeps the frame in release builds); differs from `branch_b`, so
    // the two are not merged.
    black_box(depth + 1);
}

#[inline(never)]
fn branch_b(depth: u32, path: u32, kept: &mut Vec<Vec<u8>>) {
    descend(depth, path, kept);
    black_box(depth + 2);
}

#[inline(never)]
fn descend(depth: u32, path: u32, kept: &mut Vec<Vec<u8>>) {
    if depth == 0 {
        // 64 KiB per leaf, kept; 16 KiB freed at once.
        kept.push(black_box(vec![path as u8; 64 * 1024]));
        black_box(vec![0u8; 16 * 1024]);
        return;
    }
    if (path >> (depth - 1)) & 1 == 0 {
        branch_a(depth - 1, path, kept)
    } else {
        branch_b(depth - 1, path, kept)
    }
    black_box(path);
}

/// 1,024 distinct stacks (10 levels of two branches), 64 MiB kept.
fn workload() -> Vec<Vec<u8>> {
    let mut kept = Vec::new();
    for path in 0..1024u32 {
        descend(10, path, &mut kept);
    }
    kept
}

#[inline(never)]
fn background(stop: &AtomicBool) {
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        black_box(format!("request-{i}-{}", i * 7));
        black_box(vec![0u8; 4096 + i % 8192]);
        i += 1;
        if i.is_multiple_of(1000) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn heap_request(addr: SocketAddr) -> (Duration, usize) {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /debug/pprof/heap HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let took = start.elapsed();
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..buf.len().min(200)])
    );
    (took, buf.len())
}

fn child(requests: usize) {
    // One sample per 32 KiB: most 64 KiB leaves are sampled, so the profile has about a
    // thousand distinct stacks to symbolize.
    allocprof_core::set_sample_rate(32 * 1024);
    let kept = workload();
    let server = allocprof_http::Config::new()
        .addr("127.0.0.1:0")
        .serve()
        .expect("serve");
    let addr = server.local_addr();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| background(&stop));
        std::thread::sleep(Duration::from_millis(200));
        let (cold, bytes) = heap_request(addr);
        let warm: Vec<f64> = (0..requests)
            .map(|_| heap_request(addr).0.as_secs_f64() * 1e3)
            .collect();
        stop.store(true, Ordering::Relaxed);
        let stats = allocprof_core::stats();
        println!(
            "cold_ms {:.3} warm_ms {} response_bytes {bytes} unique_stacks {} symbols {}",
            cold.as_secs_f64() * 1e3,
            warm.iter()
                .map(|w| format!("{w:.3}"))
                .collect::<Vec<_>>()
                .join(","),
            stats.unique_stacks,
            stats.symbol_cache_entries,
        );
    });
    drop(kept);
    server.shutdown();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if std::env::var_os("ALLOCPROF_LATENCY_CHILD").is_some() {
        child(args.get(2).and_then(|a| a.parse().ok()).unwrap_or(25));
        return;
    }
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(21);
    let requests: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(25);
    let exe = std::env::current_exe().expect("own path");
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let mut last = String::new();
    for _ in 0..runs {
        let out = std::process::Command::new(&exe)
            .arg(runs.to_string())
            .arg(requests.to_string())
            .env("ALLOCPROF_LATENCY_CHILD", "1")
            .output()
            .expect("run child");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        last = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let f: Vec<&str> = last.split_whitespace().collect();
        cold.push(f[1].parse::<f64>().unwrap());
        warm.extend(f[3].split(',').map(|w| w.parse::<f64>().unwrap()));
    }
    let (nc, nw) = (cold.len(), warm.len());
    let last_fields: Vec<&str> = last.split_whitespace().collect();
    println!(
        "GET /debug/pprof/heap, {} processes: first request median {:.1} ms (n={nc}, min {:.1}, max {:.1}); \
         cached median {:.1} ms (n={nw}, min {:.1}, max {:.1}); response {} bytes, {} unique stacks, {} symbols",
        runs,
        median(&mut cold),
        cold[0],
        cold[nc - 1],
        median(&mut warm),
        warm[0],
        warm[nw - 1],
        last_fields[5],
        last_fields[7],
        last_fields[9],
    );
}
