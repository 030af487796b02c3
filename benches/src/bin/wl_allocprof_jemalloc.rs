//! Workloads over allocprof wrapping jemalloc, at the default 512 KiB sampling rate.
#[global_allocator]
static ALLOC: allocprof::Profiler<tikv_jemallocator::Jemalloc> =
    allocprof::Profiler::new(tikv_jemallocator::Jemalloc);

fn main() {
    allocprof_benches::workload_main();
    if std::env::var_os("BENCH_PRINT_STATS").is_some() {
        eprintln!("{:?}", allocprof::stats());
    }
}
