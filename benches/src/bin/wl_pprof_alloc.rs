//! Workloads over pprof-alloc's wrapper sampler around System, at its default 512 KiB.
#[global_allocator]
static ALLOC: pprof_alloc::PprofAlloc = pprof_alloc::PprofAlloc::new().with_pprof();

fn main() {
    allocprof_benches::workload_main();
}
