//! Workloads over the unwrapped System allocator (the baseline of allocprof/System and
//! pprof-alloc).
fn main() {
    allocprof_benches::workload_main();
}
