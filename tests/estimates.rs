//! The estimates are unbiased: known workloads at known call sites are estimated within
//! bounds at least 4σ wide, where σ is computed exactly from the sampling model
//! (see `allocprof::sampler`): for `n` objects of `s` bytes sampled at rate `R`,
//! `p = 1 − exp(−s/R)`, Var(bytes) = n·s²·(1−p)/p and Var(count) = n·(1−p)/p.
//! Also: rate 1 is exact, rate 0 samples nothing, and a rate change keeps estimates right.

mod common;

use allocprof::SampleType;
use std::alloc::System;
use std::hint::black_box;
use std::sync::Mutex;

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sum of one sample type over the samples whose stack passes through `function`.
fn site_total(function: &str, t: SampleType) -> i64 {
    allocprof::snapshot()
        .to_profile()
        .folded(t)
        .iter()
        .filter(|(stack, _)| stack.split(';').any(|f| f.ends_with(function)))
        .map(|(_, v)| v)
        .sum()
}

/// Variance contributions of `n` objects of `s` bytes at rate `r`: (count, bytes).
fn variance(n: f64, s: f64, r: f64) -> (f64, f64) {
    let p = -(-s / r).exp_m1();
    let q = (1.0 - p) / p;
    (n * q, n * s * s * q)
}

fn assert_within(what: &str, estimate: i64, truth: f64, sigma: f64) {
    let err = estimate as f64 - truth;
    eprintln!(
        "{what}: estimate {estimate}, true {truth}, error {:+.2}% ({:+.2}σ, σ = {sigma:.0})",
        100.0 * err / truth,
        err / sigma
    );
    assert!(
        err.abs() <= 4.0 * sigma,
        "{what}: estimate {estimate} vs true {truth}: off by {:.1}σ (σ = {sigma:.0})",
        err.abs() / sigma
    );
}

#[inline(never)]
fn site_retain_1000b(n: usize, out: &mut Vec<Box<[u8]>>) {
    for i in 0..n {
        out.push(black_box(vec![i as u8; 1000].into_boxed_slice()));
    }
}

#[inline(never)]
fn site_transient_4k(n: usize) {
    for i in 0..n {
        black_box(vec![i as u8; 4096]);
    }
}

/// Mixed sizes at one site: the case where unbiasing an average instead of each sample
/// would be biased.
#[inline(never)]
fn site_retain_mixed(n: usize, out: &mut Vec<Box<[u8]>>) {
    for i in 0..n {
        let size = if i % 2 == 0 { 64 } else { 256 * 1024 };
        out.push(black_box(vec![1u8; size].into_boxed_slice()));
    }
}

#[test]
fn default_rate_estimates_are_unbiased() {
    let _s = serial();
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
    let r = allocprof::DEFAULT_SAMPLE_RATE as f64;

    // 256 MiB retained in 1000-byte objects.
    let n_a = 268_435;
    let mut kept = Vec::with_capacity(n_a + 4096);
    site_retain_1000b(n_a, &mut kept);
    // 1 GiB allocated and freed in 4 KiB blocks.
    let n_b = 262_144;
    site_transient_4k(n_b);
    // 4096 objects alternating 64 B and 256 KiB: 512 MiB + 128 KiB retained.
    let n_c = 4096;
    site_retain_mixed(n_c, &mut kept);

    let (vc, vb) = variance(n_a as f64, 1000.0, r);
    assert_within(
        "site A inuse_space",
        site_total("site_retain_1000b", SampleType::InuseSpace),
        n_a as f64 * 1000.0,
        vb.sqrt(),
    );
    assert_within(
        "site A inuse_objects",
        site_total("site_retain_1000b", SampleType::InuseObjects),
        n_a as f64,
        vc.sqrt(),
    );

    let (vc, vb) = variance(n_b as f64, 4096.0, r);
    assert_within(
        "site B alloc_space",
        site_total("site_transient_4k", SampleType::AllocSpace),
        n_b as f64 * 4096.0,
        vb.sqrt(),
    );
    assert_within(
        "site B alloc_objects",
        site_total("site_transient_4k", SampleType::AllocObjects),
        n_b as f64,
        vc.sqrt(),
    );
    // Freed memory leaves nothing behind: each free is credited with its sample's weight.
    assert_eq!(site_total("site_transient_4k", SampleType::InuseSpace), 0);
    assert_eq!(site_total("site_transient_4k", SampleType::InuseObjects), 0);

    let half = n_c as f64 / 2.0;
    let (c1, b1) = variance(half, 64.0, r);
    let (c2, b2) = variance(half, 256.0 * 1024.0, r);
    assert_within(
        "site C inuse_space (mixed sizes)",
        site_total("site_retain_mixed", SampleType::InuseSpace),
        half * (64.0 + 256.0 * 1024.0),
        (b1 + b2).sqrt(),
    );
    assert_within(
        "site C inuse_objects (mixed sizes)",
        site_total("site_retain_mixed", SampleType::InuseObjects),
        n_c as f64,
        (c1 + c2).sqrt(),
    );

    drop(kept);
    assert_eq!(site_total("site_retain_1000b", SampleType::InuseSpace), 0);
    assert_eq!(site_total("site_retain_mixed", SampleType::InuseSpace), 0);
}

#[inline(never)]
fn site_rate_change(n: usize, out: &mut Vec<Box<[u8]>>) {
    for _ in 0..n {
        out.push(black_box(vec![7u8; 512].into_boxed_slice()));
    }
}

#[test]
fn a_rate_change_keeps_estimates_unbiased() {
    let _s = serial();
    let (r1, r2) = (16.0 * 1024.0, 1024.0 * 1024.0);
    let (n1, n2) = (200_000usize, 1_000_000usize);
    let mut kept = Vec::with_capacity(n1 + n2);
    allocprof::set_sample_rate(r1 as usize);
    site_rate_change(n1, &mut kept);
    allocprof::set_sample_rate(r2 as usize);
    site_rate_change(n2, &mut kept);
    let (c1, b1) = variance(n1 as f64, 512.0, r1);
    let (c2, b2) = variance(n2 as f64, 512.0, r2);
    assert_within(
        "rate change inuse_space",
        site_total("site_rate_change", SampleType::InuseSpace),
        (n1 + n2) as f64 * 512.0,
        (b1 + b2).sqrt(),
    );
    assert_within(
        "rate change inuse_objects",
        site_total("site_rate_change", SampleType::InuseObjects),
        (n1 + n2) as f64,
        (c1 + c2).sqrt(),
    );
    drop(kept);
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
}

#[inline(never)]
#[allow(clippy::vec_box)] // one allocation per element is the point
fn site_every_allocation(n: usize) -> Vec<Box<[u8; 100]>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        v.push(black_box(Box::new([i as u8; 100])));
    }
    v
}

#[inline(never)]
#[allow(clippy::vec_box)] // one allocation per element is the point
fn site_rate_zero(n: usize) -> Vec<Box<[u8; 100]>> {
    (0..n)
        .map(|i| black_box(Box::new([i as u8; 100])))
        .collect()
}

#[test]
fn rate_one_is_exact_and_rate_zero_samples_nothing() {
    let _s = serial();
    allocprof::set_sample_rate(1);
    assert_eq!(allocprof::sample_rate(), 1);
    let kept = site_every_allocation(1000);
    // The 1000 boxes, and the Vec holding them (one allocation of 1000 pointers).
    let expect_bytes = 1000 * 100 + 1000 * std::mem::size_of::<usize>() as i64;
    assert_eq!(
        site_total("site_every_allocation", SampleType::AllocObjects),
        1001
    );
    assert_eq!(
        site_total("site_every_allocation", SampleType::AllocSpace),
        expect_bytes
    );
    assert_eq!(
        site_total("site_every_allocation", SampleType::InuseSpace),
        expect_bytes
    );
    drop(kept);
    assert_eq!(
        site_total("site_every_allocation", SampleType::InuseSpace),
        0
    );
    assert_eq!(
        site_total("site_every_allocation", SampleType::AllocSpace),
        expect_bytes
    );

    allocprof::set_sample_rate(0);
    assert_eq!(allocprof::sample_rate(), 0);
    let before = allocprof::stats();
    let kept = site_rate_zero(100_000);
    let after = allocprof::stats();
    assert_eq!(site_total("site_rate_zero", SampleType::AllocObjects), 0);
    // Exact totals are kept with sampling off.
    assert!(after.allocations - before.allocations >= 100_000);
    assert!(after.allocated_bytes - before.allocated_bytes >= 100_000 * 100);
    drop(kept);
    allocprof::set_sample_rate(allocprof::DEFAULT_SAMPLE_RATE);
}

#[test]
fn exact_totals_count_every_byte() {
    // Exact to the byte only where no other thread allocates meanwhile (other tests'
    // threads are counted at once): run the check alone in a child process.
    if std::env::var_os("ALLOCPROF_EXACT_CHILD").is_none() {
        let out = common::runner::target_command(std::env::current_exe().unwrap())
            .args([
                "exact_totals_count_every_byte",
                "--exact",
                "--test-threads=1",
            ])
            .env("ALLOCPROF_EXACT_CHILD", "1")
            .output()
            .expect("run child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    // The harness's main thread allocates as it starts this test (and stats() counts it
    // at once): let it settle first.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = allocprof::stats();
    let v: Vec<Box<[u8]>> = (0..10_000)
        .map(|_| vec![0u8; 333].into_boxed_slice())
        .collect();
    let mid = allocprof::stats();
    drop(v);
    let after = allocprof::stats();
    // No other thread allocates meanwhile. The differences are exact: the boxes and the
    // Vec holding them.
    let holder = 10_000 * std::mem::size_of::<Box<[u8]>>() as u64;
    assert_eq!(
        mid.allocated_bytes - before.allocated_bytes,
        10_000 * 333 + holder
    );
    assert_eq!(mid.allocations - before.allocations, 10_001);
    assert_eq!(after.freed_bytes - mid.freed_bytes, 10_000 * 333 + holder);
    assert_eq!(after.frees - mid.frees, 10_001);
}
