//! The coexistence run shared by `coexist` (allocprof as the global allocator) and
//! `coexist_system` (plain `System`, the control: same workload, same CPU profiler).

use crate::{arg, request, Rng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A thread that makes no progress for this long is deadlocked.
const STALL: Duration = Duration::from_secs(20);

fn dump_threads_and_exit(what: &str) -> ! {
    eprintln!("DEADLOCK: {what} made no progress for {STALL:?}");
    let pid = std::process::id().to_string();
    match std::process::Command::new("gdb")
        .args(["-p", &pid, "-batch", "-ex", "thread apply all bt"])
        .output()
    {
        Ok(out) => eprintln!("{}", String::from_utf8_lossy(&out.stdout)),
        Err(_) => eprintln!("(install gdb for the threads' stacks)"),
    }
    std::process::exit(2);
}

/// User + system CPU time of the process so far, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The coexistence run (see `src/bin/coexist.rs`); exits the process on a deadlock.
pub fn run() {
    let seconds: u64 = arg("--seconds", 30);
    let threads: u64 = arg("--threads", 4);
    let blocklist: u8 = arg("--blocklist", 1);
    allocprof::set_sample_rate(1);
    let builder = pprof::ProfilerGuardBuilder::default().frequency(1000);
    let builder = if blocklist != 0 {
        builder.blocklist(&["libc", "libgcc", "pthread", "vdso"])
    } else {
        builder
    };
    let guard = builder.build().expect("start the CPU profiler");
    println!("coexist: {seconds} s, pprof CPU profiler at 1000 Hz, allocprof rate 1, {threads} churn threads, profiles requested continuously");

    let stop = Arc::new(AtomicBool::new(false));
    // One progress counter per thread: the churn threads, then the exporter.
    let progress: Arc<Vec<AtomicU64>> =
        Arc::new((0..threads + 1).map(|_| AtomicU64::new(0)).collect());
    let mut handles = Vec::new();
    for t in 0..threads {
        let (stop, progress) = (stop.clone(), progress.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng::new(t + 1);
            let mut keep = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                request(&mut rng, &mut keep, 500);
                progress[t as usize].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        let (stop, progress) = (stop.clone(), progress.clone());
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let heap = allocprof::heap_pprof();
                let allocs = allocprof::allocs_pprof();
                assert!(heap.starts_with(&[0x1f, 0x8b]) && allocs.starts_with(&[0x1f, 0x8b]));
                progress[threads as usize].fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }

    let start = Instant::now();
    let mut last: Vec<(u64, Instant)> = progress
        .iter()
        .map(|p| (p.load(Ordering::Relaxed), start))
        .collect();
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(200));
        for (i, p) in progress.iter().enumerate() {
            let now = p.load(Ordering::Relaxed);
            if now != last[i].0 {
                last[i] = (now, Instant::now());
            } else if last[i].1.elapsed() > STALL {
                let name = if i as u64 == threads {
                    "the exporter".to_string()
                } else {
                    format!("churn thread {i}")
                };
                dump_threads_and_exit(&name);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("thread panicked");
    }

    let report = guard.report().build().expect("CPU profile");
    let cpu_samples: isize = report.data.values().sum();
    drop(guard);
    let heap = allocprof::heap_pprof();
    let s = allocprof::stats();
    let churn: u64 = progress[..threads as usize]
        .iter()
        .map(|p| p.load(Ordering::Relaxed))
        .sum();
    let cpu = cpu_seconds();
    println!(
        "process CPU time {cpu:.1} s: about {:.0} SIGPROF signals at 1 kHz \
         (pprof-rs drops those whose leaf is blocklisted)",
        cpu * 1000.0
    );
    println!(
        "OK: {:.1} s without deadlock or crash; {churn} requests, {} allocprof profile pairs, \
         {} allocprof samples ({} distinct stacks), {cpu_samples} CPU samples in {} CPU stacks; \
         final heap profile {} bytes",
        start.elapsed().as_secs_f64(),
        progress[threads as usize].load(Ordering::Relaxed),
        s.samples,
        s.unique_stacks,
        report.data.len(),
        heap.len()
    );
    assert!(cpu_samples > 0, "the CPU profiler took no samples");
}
