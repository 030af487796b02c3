//! The cost of one sampled allocation (alloc + free of 64 B with sampling at rate 1:
//! stack capture, table update, live-set insert and remove) at stack depths 10, 30, 60.
//!
//! The unwinder is chosen per process: run with `ALLOCPROF_UNWINDER=fp|dwarf|libgcc`
//! (`run.sh` does, in a build with and one without frame pointers; `BENCH_BUILD` names
//! the build in the benchmark id). Depth is the number of frames captured, measured.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::{Duration, Instant};

static PROF: allocprof::Profiler<System> = allocprof::Profiler::new(System);

fn pair(layout: Layout) {
    // SAFETY: non-zero size; freed with the layout it was allocated with.
    unsafe {
        let p = PROF.alloc(layout);
        black_box(p);
        PROF.dealloc(p, layout);
    }
}

/// Frames captured for an allocation made at `nest(extra)` from here: measured as the
/// longest stack in the profile after one such allocation.
fn depth_at(extra: usize, layout: Layout) -> usize {
    allocprof_benches::nest(extra, &mut || pair(layout));
    allocprof::snapshot()
        .stacks()
        .map(|(s, _)| s.len())
        .max()
        .unwrap_or(0)
}

fn bench(c: &mut Criterion) {
    let unwinder = std::env::var("ALLOCPROF_UNWINDER").unwrap_or_else(|_| "auto".into());
    let build = std::env::var("BENCH_BUILD").unwrap_or_else(|_| "default".into());
    let layout = Layout::from_size_align(64, 8).unwrap();
    allocprof::set_sample_rate(1);
    let base = depth_at(0, layout);
    let mut g = c.benchmark_group(format!("sampled_alloc/{build}/{unwinder}"));
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for depth in [10usize, 30, 60] {
        let extra = depth.saturating_sub(base);
        let got = depth_at(extra, layout);
        eprintln!("sampled_alloc/{build}/{unwinder}: depth {depth}: {got} frames captured");
        g.bench_function(BenchmarkId::new("depth", depth), |b| {
            b.iter_custom(|n| {
                allocprof_benches::nest(extra, &mut || {
                    let t = Instant::now();
                    for _ in 0..n {
                        pair(layout);
                    }
                    t.elapsed()
                })
            })
        });
    }
    g.finish();
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
}

criterion_group!(benches, bench);
criterion_main!(benches);
