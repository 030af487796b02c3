//! Workloads over allocprof wrapping System, at the default 512 KiB sampling rate.
#[global_allocator]
static ALLOC: allocprof::Profiler<std::alloc::System> =
    allocprof::Profiler::new(std::alloc::System);

fn main() {
    allocprof_benches::workload_main();
    if std::env::var_os("BENCH_PRINT_STATS").is_some() {
        eprintln!("{:?}", allocprof::stats());
    }
}
