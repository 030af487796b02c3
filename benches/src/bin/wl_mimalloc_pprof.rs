//! Workloads over mimalloc-pprof. Its profiler is started (default rate, ~512 KiB) only
//! when `BENCH_PROFILE=1`; otherwise this is its unprofiled baseline.
#[global_allocator]
static ALLOC: mimalloc_pprof::MiMalloc = mimalloc_pprof::MiMalloc;

fn main() {
    if std::env::var_os("BENCH_PROFILE").is_some_and(|v| v == "1") {
        assert!(
            mimalloc_pprof::prof::start(0),
            "mimalloc-pprof profiler did not start"
        );
    }
    allocprof_benches::workload_main();
}
