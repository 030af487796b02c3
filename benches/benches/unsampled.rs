//! The added cost of an alloc+free pair that is not sampled: allocprof wrapping System vs
//! System itself, same sizes, same run, 1 and 2 threads.
//!
//! The wrapper is called directly (not as the global allocator) so both sides run in one
//! process. `allocprof` runs at the default rate (512 KiB): its figure is the amortised
//! cost including the occasional sample (for 64 KiB blocks, one pair in eight is sampled).
//! `allocprof_off` runs with sampling off: the fast path plus its periodic flush only.
//! The added cost is `allocprof − system`, computed by `run.sh` from criterion's estimates.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

static PROF: allocprof::Profiler<System> = allocprof::Profiler::new(System);

const SIZES: [usize; 7] = [16, 64, 256, 1024, 4096, 16384, 65536];

#[inline(always)]
fn pairs<A: GlobalAlloc>(a: &A, layout: Layout, n: u64) {
    for _ in 0..n {
        // SAFETY: non-zero size; the block is freed with the layout it was allocated with.
        unsafe {
            let p = a.alloc(layout);
            black_box(p);
            a.dealloc(p, layout);
        }
    }
}

/// Time for `iters` pairs on each of `threads` threads (the slowest thread's time).
fn timed<A: GlobalAlloc + Sync>(a: &A, layout: Layout, iters: u64, threads: usize) -> Duration {
    if threads == 1 {
        let t = Instant::now();
        pairs(a, layout, iters);
        return t.elapsed();
    }
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    pairs(a, layout, 1000); // warm this thread's state
                    barrier.wait();
                    let t = Instant::now();
                    pairs(a, layout, iters);
                    t.elapsed()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).max().unwrap()
    })
}

fn bench(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(format!("unsampled_pair/{threads}t"));
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(800));
        for size in SIZES {
            let layout = Layout::from_size_align(size, 8).unwrap();
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::new("system", size), &layout, |b, &l| {
                b.iter_custom(|n| timed(&System, l, n, threads))
            });
            allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
            g.bench_with_input(BenchmarkId::new("allocprof", size), &layout, |b, &l| {
                b.iter_custom(|n| timed(&PROF, l, n, threads))
            });
            allocprof::set_sample_rate(0);
            g.bench_with_input(BenchmarkId::new("allocprof_off", size), &layout, |b, &l| {
                b.iter_custom(|n| timed(&PROF, l, n, threads))
            });
            allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
