//! Workloads over jemalloc. Unprofiled by default; jemalloc's own profiler runs when
//! started with `_RJEM_MALLOC_CONF=prof:true,lg_prof_sample:19` (one sample per 512 KiB).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    allocprof_benches::workload_main();
}
