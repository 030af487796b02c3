//! Soak: minutes of allocation churn (more distinct stacks than the table holds, short-
//! lived threads, a bounded live heap) with a heap and an allocs profile requested every
//! second. Prints the profiler's own memory (`Stats::profiler_bytes`) and the RSS over
//! time and exits non-zero if the profiler's memory grew after the warm-up.
//!
//! `soak [--seconds 600] [--threads 4] [--rate 4096] [--warmup 60]`; run by
//! `scripts/soak.sh`.

use allocprof_reliability::{arg, mib, request, rss_bytes, Rng};
use std::alloc::System;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

/// Growth of `profiler_bytes` after the warm-up that still counts as flat.
const FLAT_SLACK: u64 = 1 << 20;

struct Point {
    second: u64,
    profiler_bytes: u64,
    rss: u64,
}

fn main() {
    let seconds: u64 = arg("--seconds", 600);
    let threads: u64 = arg("--threads", 4);
    let rate: usize = arg("--rate", 4096);
    let warmup: u64 = arg("--warmup", 60).min(seconds / 2);
    allocprof::set_sample_rate(rate);
    println!(
        "soak: {seconds} s, {threads} churn threads + one short-lived thread a second, \
         rate {rate} B, heap + allocs profile every second, warm-up {warmup} s"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, requests) = (stop.clone(), requests.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(t + 1);
                let mut keep = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    request(&mut rng, &mut keep, 2000);
                    requests.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let start = Instant::now();
    let mut points = Vec::new();
    let mut profiles = 0u64;
    let mut slowest = Duration::ZERO;
    for second in 1..=seconds {
        let next = start + Duration::from_secs(second);
        // A short-lived thread a second: thread start and exit under load.
        let short = std::thread::spawn(move || {
            let mut rng = Rng::new(1000 + second);
            let mut keep = Vec::new();
            for _ in 0..100 {
                request(&mut rng, &mut keep, 50);
            }
        });
        let t = Instant::now();
        let heap = allocprof::heap_pprof();
        let allocs = allocprof::allocs_pprof();
        slowest = slowest.max(t.elapsed());
        assert!(heap.starts_with(&[0x1f, 0x8b]) && allocs.starts_with(&[0x1f, 0x8b]));
        profiles += 2;
        short.join().expect("short-lived thread panicked");
        let s = allocprof::stats();
        points.push(Point {
            second,
            profiler_bytes: s.profiler_bytes,
            rss: rss_bytes(),
        });
        if second % 30 == 0 || second == 1 {
            println!(
                "t={second:>4}s profiler_bytes={} rss={} unique_stacks={} dropped={} samples={} \
                 live_samples={} symbols={} requests={} profile={} B",
                mib(s.profiler_bytes),
                mib(rss_bytes()),
                s.unique_stacks,
                s.dropped_samples,
                s.samples,
                s.live_samples,
                s.symbol_cache_entries,
                requests.load(Ordering::Relaxed),
                heap.len(),
            );
        }
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker panicked");
    }

    let after: Vec<&Point> = points.iter().filter(|p| p.second >= warmup).collect();
    let at_warmup = after.first().map_or(0, |p| p.profiler_bytes);
    let max = after.iter().map(|p| p.profiler_bytes).max().unwrap_or(0);
    let min = after.iter().map(|p| p.profiler_bytes).min().unwrap_or(0);
    let last = points.last().map_or(0, |p| p.profiler_bytes);
    let rss_warm = after.first().map_or(0, |p| p.rss);
    let rss_max = after.iter().map(|p| p.rss).max().unwrap_or(0);
    let rss_last = points.last().map_or(0, |p| p.rss);
    let s = allocprof::stats();
    println!(
        "summary: {} requests, {} samples, {profiles} profiles (slowest pair {slowest:?}), \
         unique_stacks {} of {}, dropped_samples {}",
        requests.load(Ordering::Relaxed),
        s.samples,
        s.unique_stacks,
        s.max_stacks,
        s.dropped_samples,
    );
    println!(
        "profiler_bytes after warm-up ({warmup} s): at warm-up {}, min {}, max {}, last {}; \
         growth {} bytes",
        mib(at_warmup),
        mib(min),
        mib(max),
        mib(last),
        max.saturating_sub(at_warmup)
    );
    println!(
        "rss after warm-up: at warm-up {}, max {}, last {}",
        mib(rss_warm),
        mib(rss_max),
        mib(rss_last)
    );
    if max.saturating_sub(at_warmup) > FLAT_SLACK {
        println!(
            "FAIL: the profiler's memory grew by more than {FLAT_SLACK} bytes after the warm-up"
        );
        std::process::exit(1);
    }
    println!("OK: the profiler's memory is flat after the warm-up");
}
