//! Export cost for profiles of 1k, 10k and 100k unique stacks (3 levels of 64 distinct
//! functions under the benchmark's own frames, ~20 frames a stack).
//!
//! `heap_pprof` is the whole export (snapshot, symbolize with the cache warm, build,
//! encode, gzip); `encode` is the pprof encoding and gzip of an already built profile.
//! The first, cold symbolization is measured by the `first_export` binary instead (the
//! symbol cache is process-wide and cannot be emptied between iterations).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use std::time::Duration;

#[global_allocator]
static ALLOC: allocprof::Profiler<std::alloc::System> =
    allocprof::Profiler::new(std::alloc::System);

fn bench(c: &mut Criterion) {
    allocprof::set_max_stacks(200_000);
    let mut g = c.benchmark_group("export");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let mut have = 0;
    for n in [1_000usize, 10_000, 100_000] {
        allocprof::set_sample_rate(1);
        allocprof_benches::unique_stacks(have, n);
        have = n;
        allocprof::set_sample_rate(0);
        let stacks = allocprof::stats().unique_stacks;
        eprintln!("export/{n}: {stacks} unique stacks in the table");
        black_box(allocprof::heap_pprof()); // symbolize once: the cache is warm from here
        g.bench_function(BenchmarkId::new("heap_pprof", n), |b| {
            b.iter(|| black_box(allocprof::heap_pprof()))
        });
        let profile = allocprof::snapshot().to_profile();
        g.bench_function(BenchmarkId::new("encode", n), |b| {
            b.iter(|| {
                black_box(allocprof::pprof::encode(
                    &profile,
                    allocprof::ProfileKind::Heap,
                ))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
