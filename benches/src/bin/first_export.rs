//! The first export of a process: symbolization from cold, its time and memory.
//!
//! Builds a profile of N unique stacks (argument, default 10 000) with sampling at rate 1,
//! then times the first `heap_pprof()` (symbolizes every address: the binary's DWARF is
//! loaded and parsed) and the second (symbols cached), and reports the growth of the
//! resident set and of its peak across the first export.
use std::time::Instant;

#[global_allocator]
static ALLOC: allocprof::Profiler<std::alloc::System> =
    allocprof::Profiler::new(std::alloc::System);

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    allocprof::set_max_stacks(n + 10_000);
    allocprof::set_sample_rate(1);
    allocprof_benches::unique_stacks(0, n);
    allocprof::set_sample_rate(0);
    let stats = allocprof::stats();
    let (rss0, hwm0) = allocprof_benches::rss_kib();
    let t = Instant::now();
    let first = allocprof::heap_pprof();
    let first_s = t.elapsed().as_secs_f64();
    let (rss1, hwm1) = allocprof_benches::rss_kib();
    let t = Instant::now();
    let second = allocprof::heap_pprof();
    let second_s = t.elapsed().as_secs_f64();
    let exe = std::fs::metadata("/proc/self/exe")
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "first_export stacks={} binary_bytes={} first_ms={:.1} second_ms={:.1} \
         rss_growth_mib={:.1} peak_growth_mib={:.1} profile_bytes={} profiler_bytes={}",
        stats.unique_stacks,
        exe,
        first_s * 1e3,
        second_s * 1e3,
        (rss1 as f64 - rss0 as f64) / 1024.0,
        (hwm1.max(hwm0) - hwm0) as f64 / 1024.0,
        first.len().max(second.len()),
        allocprof::stats().profiler_bytes,
    );
}
