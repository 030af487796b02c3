//! Reliability, issue 6 point 2: thread life.
//!
//! * Hundreds of short-lived threads allocate, free memory other threads allocated,
//!   allocate (and export) inside thread-local destructors, and some threads only free.
//!   After they are joined, the profiler's exact totals must equal the truth, which a
//!   counting inner allocator measures: exactly, but for what the test harness's other
//!   threads may allocate between the two readings ([`HARNESS_SLACK`]). Live threads'
//!   counts are read in place and exited threads flush all.
//! * An `.init_array` constructor allocates before `main` (at rate 1, so it is sampled):
//!   the heap profile must show that allocation.
//! * `std::process::exit` while other threads sample, with an `atexit` handler that
//!   allocates and exports: a child process (this test binary, re-run with an environment
//!   variable) must exit cleanly with the handler's output, never crash or hang.
//!
//! The whole file runs at sample rate 1 (set by the constructor), so every allocation
//! takes the sampled path. Tests that compare totals hold [`SERIAL`] so they do not
//! measure each other.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

/// The inner allocator: `System`, counting exactly what reaches it. Calls made while
/// the profiler marks the thread as busy (its own work: stack capture and table growth,
/// which it hides from the totals, and export, which it counts) are counted separately,
/// so the profiler's totals must lie between "unmarked" and "unmarked + marked".
struct Counting;

/// `[unmarked, marked]` counters.
struct Ledger {
    alloc_bytes: [AtomicU64; 2],
    allocs: [AtomicU64; 2],
    free_bytes: [AtomicU64; 2],
    frees: [AtomicU64; 2],
}

static LEDGER: Ledger = Ledger {
    alloc_bytes: [AtomicU64::new(0), AtomicU64::new(0)],
    allocs: [AtomicU64::new(0), AtomicU64::new(0)],
    free_bytes: [AtomicU64::new(0), AtomicU64::new(0)],
    frees: [AtomicU64::new(0), AtomicU64::new(0)],
};

fn count_alloc(size: usize) {
    let m = usize::from(allocprof::__thread_is_marked());
    LEDGER.alloc_bytes[m].fetch_add(size as u64, Ordering::Relaxed);
    LEDGER.allocs[m].fetch_add(1, Ordering::Relaxed);
}

fn count_free(size: usize) {
    let m = usize::from(allocprof::__thread_is_marked());
    LEDGER.free_bytes[m].fetch_add(size as u64, Ordering::Relaxed);
    LEDGER.frees[m].fetch_add(1, Ordering::Relaxed);
}

// SAFETY: forwards every call to `System` unchanged and only counts successful calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc_zeroed`'s contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) };
        count_free(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count_free(layout.size());
            count_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: allocprof::Profiler<Counting> = allocprof::Profiler::new(Counting);

/// Serializes the tests of this file: totals are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Before main.

/// Size of the block allocated before `main` and kept for the test to find.
const PRE_MAIN_BYTES: usize = 4321;
static PRE_MAIN_BLOCK: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

#[used]
#[link_section = ".init_array"]
static BEFORE_MAIN: extern "C" fn() = before_main;

/// Runs from `.init_array`, before Rust's runtime is set up.
extern "C" fn before_main() {
    allocprof::set_sample_rate(1);
    let kept = allocated_before_main();
    PRE_MAIN_BLOCK.store(Box::leak(kept).as_mut_ptr(), Ordering::Relaxed);
    // Churn that is freed again before main.
    let s: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    black_box(s);
}

#[inline(never)]
fn allocated_before_main() -> Box<[u8]> {
    black_box(vec![0xA5; PRE_MAIN_BYTES].into_boxed_slice())
}

#[test]
fn allocation_before_main_is_in_the_heap_profile() {
    let _serial = serial();
    let block = PRE_MAIN_BLOCK.load(Ordering::Relaxed);
    assert!(!block.is_null(), "the .init_array constructor did not run");
    // SAFETY: the constructor leaked a boxed slice of PRE_MAIN_BYTES bytes at `block`.
    let bytes = unsafe { std::slice::from_raw_parts(block, PRE_MAIN_BYTES) };
    assert!(bytes.iter().all(|&b| b == 0xA5), "pre-main block corrupted");
    let profile = common::decode(&allocprof::heap_pprof());
    let inuse: i64 = common::stacks(&profile)
        .iter()
        .filter(|(stack, _)| stack.contains("allocated_before_main"))
        .map(|(_, v)| v[3])
        .sum();
    assert_eq!(
        inuse, PRE_MAIN_BYTES as i64,
        "inuse_space of allocated_before_main (sampled at rate 1, never freed)"
    );
}

// ---------------------------------------------------------------------------------------
// Thread churn.

/// Short-lived threads in all.
const THREADS: usize = 400;
/// Of those running at once.
const WAVE: usize = 8;
/// Size of the blocks allocated in thread-local destructors (no other block has it).
const DTOR_BYTES: usize = 333;
/// Threads that only free (they never allocate).
const FREE_ONLY_THREADS: usize = 50;
/// Blocks each free-only thread frees, of `FREE_ONLY_BYTES` each.
const FREE_ONLY_BLOCKS: usize = 40;
const FREE_ONLY_BYTES: usize = 1000;

/// Blocks handed between threads: allocated by one, freed by another.
static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Box<[u8]>>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A thread-local whose destructor allocates, hands a block to other threads and, for
/// some threads, exports a profile.
struct AllocatesOnDrop {
    export: bool,
}

impl Drop for AllocatesOnDrop {
    fn drop(&mut self) {
        let block = dtor_allocates();
        let note = format!("dropped with a block of {}", block.len());
        black_box(note);
        pool().push(block);
        if self.export {
            let profile = common::decode(&allocprof::heap_pprof());
            assert!(
                !profile.sample.is_empty(),
                "empty profile from a TLS destructor"
            );
        }
    }
}

thread_local! {
    static ON_EXIT: std::cell::RefCell<Option<AllocatesOnDrop>> = const { std::cell::RefCell::new(None) };
}

#[inline(never)]
fn dtor_allocates() -> Box<[u8]> {
    black_box(vec![0xD7; DTOR_BYTES].into_boxed_slice())
}

/// The body of a short-lived thread.
fn churn(n: usize, exports: bool) {
    // The first thing the thread does is register a destructor (this may be its very
    // first allocation, made while the runtime registers the destructor).
    ON_EXIT.with(|slot| {
        *slot.borrow_mut() = Some(AllocatesOnDrop {
            export: exports && n % 25 == 7,
        })
    });
    let mine: Vec<Box<[u8]>> = (0..20)
        .map(|i| vec![n as u8; 8 + (n * 7 + i * 13) % 500].into_boxed_slice())
        .filter(|b| b.len() != DTOR_BYTES)
        .collect();
    // Free up to 20 blocks that other threads allocated.
    let theirs: Vec<Box<[u8]>> = {
        let mut pool = pool();
        let keep = pool.len().saturating_sub(20);
        pool.drain(keep..).collect()
    };
    drop(theirs);
    let text: String = (0..50).map(|i| format!("{i},")).collect();
    black_box(text);
    pool().extend(mine);
}

/// A thread that only frees blocks the spawning thread allocated.
fn free_only(blocks: Vec<Box<[u8]>>) {
    for b in blocks {
        drop(black_box(b));
    }
}

/// One figure from the counting inner allocator: calls made outside and inside
/// profiler work.
#[derive(Clone, Copy, Debug)]
struct Truth {
    unmarked: u64,
    marked: u64,
}

fn read(c: &[AtomicU64; 2]) -> Truth {
    Truth {
        unmarked: c[0].load(Ordering::Relaxed),
        marked: c[1].load(Ordering::Relaxed),
    }
}

/// Threads of this process, from /proc/self/task.
fn live_threads() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Asserts that the profiler's change of one total (`profiler`, from `Stats`) lies
/// between the inner allocator's unmarked change and its unmarked + marked change,
/// widened by `bound`. A lost flush makes it too small; a double count
/// too large.
fn assert_consistent(what: &str, profiler: u64, before: Truth, after: Truth, bound: u64) {
    let unmarked = after.unmarked - before.unmarked;
    let marked = after.marked - before.marked;
    let low = unmarked.saturating_sub(bound);
    let high = unmarked + marked + bound;
    println!(
        "  {what}: profiler {profiler}, inner allocator {unmarked} + {marked} in profiler work"
    );
    assert!(
        (low..=high).contains(&profiler),
        "{what}: profiler says {profiler}, the inner allocator saw {unmarked} outside profiler \
         work and {marked} inside it; expected within [{low}, {high}] (slack {bound})"
    );
}

/// Runs THREADS churn threads, WAVE at a time.
fn run_churn(exports: bool) {
    for wave in 0..THREADS / WAVE {
        let handles: Vec<_> = (0..WAVE)
            .map(|i| {
                let n = wave * WAVE + i;
                std::thread::spawn(move || churn(n, exports))
            })
            .collect();
        for h in handles {
            h.join().expect("churn thread panicked");
        }
    }
}

/// Bytes (and as many allocations or frees) the harness's other threads may allocate
/// or free between a `stats()` and the ledger's reading next to it: its main thread
/// prints a line as each test ends, while the next one starts.
const HARNESS_SLACK: u64 = 16 * 1024;

/// Runs `work` and checks the profiler's totals against the inner allocator's.
fn check_totals_around(label: &str, work: impl FnOnce()) {
    let counters = || {
        [
            &LEDGER.alloc_bytes,
            &LEDGER.allocs,
            &LEDGER.free_bytes,
            &LEDGER.frees,
        ]
        .map(read)
    };
    let threads_before = live_threads();
    let s0 = allocprof::stats();
    let t0 = counters();
    work();
    let s1 = allocprof::stats();
    let t1 = counters();
    // Other threads still alive (the harness's main thread, tests waiting for SERIAL)
    // are counted in place, but they may allocate between a `stats()` and the ledger's
    // reading next to it.
    let others = threads_before.max(live_threads()).saturating_sub(1);
    let bound = HARNESS_SLACK;
    println!("{label}: other live threads {others}, slack {bound}");
    let names = ["bytes allocated", "allocations", "bytes freed", "frees"];
    let profiler = [
        s1.allocated_bytes - s0.allocated_bytes,
        s1.allocations - s0.allocations,
        s1.freed_bytes - s0.freed_bytes,
        s1.frees - s0.frees,
    ];
    for i in 0..4 {
        assert_consistent(names[i], profiler[i], t0[i], t1[i], bound);
    }
}

#[test]
fn free_only_threads_flush_at_exit() {
    let _serial = serial();
    check_totals_around("free-only threads", || {
        for _ in 0..FREE_ONLY_THREADS {
            let blocks: Vec<Box<[u8]>> = (0..FREE_ONLY_BLOCKS)
                .map(|_| vec![1u8; FREE_ONLY_BYTES].into_boxed_slice())
                .collect();
            std::thread::spawn(move || free_only(blocks))
                .join()
                .expect("free-only thread panicked");
        }
    });
}

#[test]
fn short_lived_threads_keep_totals_consistent() {
    let _serial = serial();
    pool().clear();
    check_totals_around("churn threads", || run_churn(false));

    // Again with profiles exported from thread-local destructors (not measured above:
    // export work is counted in the totals, and would hide a lost flush in the bound).
    run_churn(true);

    // What the thread-local destructors allocated and nobody freed is in use in the heap
    // profile, attributed to dtor_allocates (rate 1: every block sampled, weight 1).
    assert_eq!(
        allocprof::stats().untracked_samples,
        0,
        "live set overflowed"
    );
    let dtor_bytes_held: usize = pool()
        .iter()
        .filter(|b| b.len() == DTOR_BYTES)
        .map(|b| b.len())
        .sum();
    assert!(
        dtor_bytes_held > 0,
        "no destructor block survived to the end"
    );
    let profile = common::decode(&allocprof::heap_pprof());
    let inuse: i64 = common::stacks(&profile)
        .iter()
        .filter(|(stack, _)| stack.contains("dtor_allocates"))
        .map(|(_, v)| v[3])
        .sum();
    assert_eq!(
        inuse, dtor_bytes_held as i64,
        "inuse_space of dtor_allocates vs the destructor blocks still held"
    );
    pool().clear();
}

/// More threads alive at once than the profiler has per-thread counter slots
/// (`SLOT_COUNT` = 256 in `profiler/src/thread.rs`): the ones without a slot publish into
/// the shared totals, and slots freed by exiting threads are handed on with their totals.
const CROWD: usize = 300;

#[test]
fn more_threads_than_counter_slots_keep_totals_exact() {
    let _serial = serial();
    for round in 0..2 {
        check_totals_around(&format!("crowd of {CROWD}, round {round}"), || {
            let all_alive = std::sync::Arc::new(std::sync::Barrier::new(CROWD));
            let handles: Vec<_> = (0..CROWD)
                .map(|n| {
                    let all_alive = std::sync::Arc::clone(&all_alive);
                    std::thread::Builder::new()
                        .stack_size(128 * 1024)
                        .spawn(move || {
                            // Enough to take a slow event (and so a slot) before the
                            // barrier, and more after it.
                            let before: Vec<u8> = vec![n as u8; 300 * 1024];
                            all_alive.wait();
                            let after: Vec<Box<[u8]>> = (0..50)
                                .map(|i| vec![i as u8; 100 + n + i].into_boxed_slice())
                                .collect();
                            black_box((before, after));
                        })
                        .expect("spawn")
                })
                .collect();
            for h in handles {
                h.join().expect("crowd thread panicked");
            }
        });
    }
}

// ---------------------------------------------------------------------------------------
// Exit while other threads sample.

/// Set in the environment of the child process that exits while sampling.
const EXIT_CHILD_ENV: &str = "ALLOCPROF_RELIABILITY_EXIT_CHILD";
/// What the child's atexit handler prints when its profile decoded.
const ATEXIT_OK: &str = "ATEXIT_PROFILE_OK";
/// Child processes to run (each exits at a different point of the workers' loops).
const EXIT_CHILDREN: usize = 4;
/// Deadlock detection only.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

#[inline(never)]
fn at_exit_allocates() -> Vec<u8> {
    black_box(vec![3u8; 2222])
}

extern "C" fn at_exit() {
    let kept = at_exit_allocates();
    let profile = common::decode(&allocprof::heap_pprof());
    let found = common::stacks(&profile)
        .iter()
        .any(|(s, v)| s.contains("at_exit_allocates") && v[3] >= 2222);
    drop(kept);
    let msg = if found {
        format!("{ATEXIT_OK}\n")
    } else {
        "ATEXIT_PROFILE_MISSING_BLOCK\n".to_string()
    };
    // SAFETY: writing a valid buffer to fd 1 (bypasses the harness's output capture).
    unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
}

/// The child's body: only runs in the child process (see `exit_while_sampling`).
#[test]
#[ignore = "helper: run as a child process by exit_while_sampling"]
fn helper_exit_child() {
    let Ok(delay) = std::env::var(EXIT_CHILD_ENV) else {
        return;
    };
    let delay: u64 = delay.parse().expect("delay in ms");
    // SAFETY: registering a static extern "C" fn.
    assert_eq!(unsafe { libc::atexit(at_exit) }, 0);
    let stop = Arc::new(AtomicBool::new(false));
    for t in 0..4 {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut keep = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                keep.push(format!("{t}:{i}"));
                if keep.len() > 100 {
                    keep.clear();
                }
                if t == 0 && i.is_multiple_of(1000) {
                    black_box(allocprof::heap_pprof());
                }
                i += 1;
            }
        });
    }
    std::thread::sleep(Duration::from_millis(delay));
    std::process::exit(0);
}

#[test]
fn exit_while_sampling() {
    // Serial: spawning and waiting for children allocates, and that would land between
    // the readings of the tests that compare totals.
    let _serial = serial();
    let exe = std::env::current_exe().expect("current_exe");
    for n in 0..EXIT_CHILDREN {
        let delay = (n * 7 % 40).to_string();
        let mut child = common::runner::target_command(&exe)
            .args(["--ignored", "--exact", "helper_exit_child", "--nocapture"])
            .env(EXIT_CHILD_ENV, &delay)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn child");
        let deadline = Instant::now() + CHILD_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child {n} (exit after {delay} ms) hung for {CHILD_TIMEOUT:?}: deadlock");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = child.wait_with_output().expect("child output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            status.success(),
            "child {n} (exit after {delay} ms) ended with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        assert!(
            stdout.contains(ATEXIT_OK),
            "child {n}: the atexit handler's profile lacked its block or did not run\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    println!("{EXIT_CHILDREN} children exited cleanly while 4 threads sampled at rate 1");
}
