//! The live set's transparent huge pages, as the kernel reports them.
//!
//! Each case runs a child process (this test binary, an ignored entry point) that samples
//! every allocation, keeps 256 small objects alive (so the live set's lines are touched
//! in both of its 2 MiB halves) and reports `AnonHugePages` from `/proc/self/smaps_rollup`.
//! The live set is the only memory in that child that asks for huge pages, so with THP in
//! `madvise` mode the figure is the live set's alone: at least 2 MiB by default, none with
//! `ALLOCPROF_HUGE_PAGES=0`. In `always` mode other memory may be huge too, and in
//! `never` mode nothing is: the checks that mode cannot decide are skipped with a note, as
//! they are when the kernel reports that it fell back to small pages (no free 2 MiB page
//! at that moment), and under an emulator (`ALLOCPROF_TEST_RUNNER`), whose own memory
//! (qemu-user's translation cache) asks for huge pages too.
//!
//! A third case counts the page faults that samples take on the live set's small pages:
//! one for each page they touch first, where a read before the first write (the zero
//! page mapped, then replaced) took two.

mod common;

#[global_allocator]
static ALLOC: allocprof::Profiler<std::alloc::System> =
    allocprof::Profiler::new(std::alloc::System);

/// The bracketed word of `/sys/kernel/mm/transparent_hugepage/enabled`.
fn thp_mode() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// The kernel's count of huge-page faults that fell back to small pages.
fn thp_fault_fallbacks() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("thp_fault_fallback "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the ignored test `entry` as a child process with `ALLOCPROF_HUGE_PAGES` set to
/// `value` (or unset) and returns a function that reads a `name=number` line of what it
/// printed.
fn run_child(entry: &str, value: Option<&str>) -> impl Fn(&str) -> u64 {
    let mut cmd = common::runner::target_command(std::env::current_exe().unwrap());
    cmd.args([entry, "--exact", "--nocapture", "--ignored"]);
    cmd.env_remove("ALLOCPROF_HUGE_PAGES");
    if let Some(v) = value {
        cmd.env("ALLOCPROF_HUGE_PAGES", v);
    }
    let out = cmd.output().expect("run child");
    assert!(out.status.success(), "child failed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    move |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in child output: {stdout}"))
    }
}

/// Runs the huge-page child with `ALLOCPROF_HUGE_PAGES` set to `value` (or unset),
/// returning its `AnonHugePages` in kB and the `profiler_bytes` it reported.
fn child_report(value: Option<&str>) -> (u64, u64) {
    let field = run_child("child_keeps_samples", value);
    (field("huge_kb="), field("profiler_bytes="))
}

#[test]
fn live_set_uses_huge_pages_unless_turned_off() {
    let Some(mode) = thp_mode() else {
        eprintln!("note: no transparent huge pages on this kernel; nothing to check");
        return;
    };
    if common::runner::emulated() {
        eprintln!("note: under an emulator the process's huge pages are not the live set's");
        return;
    }
    let (off_kb, off_bytes) = child_report(Some("0"));
    let fallbacks_before = thp_fault_fallbacks();
    let (on_kb, on_bytes) = child_report(None);
    if on_kb == 0 && thp_fault_fallbacks() > fallbacks_before {
        // The kernel could not find free 2 MiB pages just then (fragmented memory) and
        // fell back to small pages, as it is allowed to: nothing to check this time.
        eprintln!("note: the kernel fell back to small pages (thp_fault_fallback rose)");
        return;
    }
    eprintln!(
        "THP mode {mode}: AnonHugePages {on_kb} kB by default, {off_kb} kB with \
         ALLOCPROF_HUGE_PAGES=0; profiler_bytes {on_bytes} and {off_bytes}"
    );
    match mode.as_str() {
        "madvise" => {
            assert!(on_kb >= 2048, "live set not on huge pages: {on_kb} kB");
            assert_eq!(off_kb, 0, "huge pages despite ALLOCPROF_HUGE_PAGES=0");
            // stats() counts what huge pages made resident: the whole 4 MiB table once
            // both halves are touched (with small pages, 8 KiB per sample at most).
            assert!(
                on_bytes >= 4 << 20,
                "profiler_bytes {on_bytes} < the 4 MiB resident"
            );
            assert!(off_bytes < on_bytes, "{off_bytes} vs {on_bytes}");
        }
        "always" => assert!(on_kb >= 2048, "live set not on huge pages: {on_kb} kB"),
        _ => eprintln!("note: THP mode {mode}: the kernel gives no huge pages to check"),
    }
}

#[test]
#[ignore = "entry point of the child process of the huge-page tests"]
fn child_keeps_samples() {
    allocprof::set_sample_rate(1);
    let kept: Vec<Box<[u8; 48]>> = (0..256u32).map(|i| Box::new([i as u8; 48])).collect();
    let stats = allocprof::stats();
    assert!(stats.live_samples >= 256, "{stats:?}");
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").expect("smaps_rollup");
    let huge_kb: u64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("AnonHugePages in smaps_rollup");
    println!("huge_kb={huge_kb}");
    println!("profiler_bytes={}", stats.profiler_bytes);
    drop(kept);
}

/// Objects the fault-counting child keeps, each a sample at rate 1.
const KEPT: usize = 256;

#[test]
fn a_sample_faults_a_live_set_page_in_once() {
    if common::runner::emulated() {
        eprintln!("note: under an emulator page faults are the emulator's to count");
        return;
    }
    let faults = run_child("child_counts_faults", Some("0"))("faults=");
    // The boxes lie at consecutive heap addresses, which the table's multiplicative hash
    // sends to lines far apart: each sample's line is on a page of its own, touched first
    // by that sample. One fault each, plus a few for the heap's own pages and the new
    // stack's entry, stays under KEPT + 32 (258 on 2026-12-02); two each does not (512).
    eprintln!("{faults} page faults for {KEPT} samples kept on small pages");
    assert!(
        faults <= KEPT as u64 + 32,
        "{faults} page faults for {KEPT} samples: the live set's pages are faulted in twice"
    );
}

/// This thread's minor page faults so far (field 10 of `/proc/thread-self/stat`), read
/// into a buffer on the stack so that reading them allocates nothing (an allocation would
/// be a sample).
fn thread_minor_faults() -> u64 {
    use std::io::Read;
    let mut buf = [0u8; 1024];
    let mut file = std::fs::File::open("/proc/thread-self/stat").expect("open stat");
    let n = file.read(&mut buf).expect("read stat");
    let text = std::str::from_utf8(&buf[..n]).expect("stat is text");
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &text[text.rfind(')').expect("comm") + 2..];
    rest.split(' ')
        .nth(7)
        .and_then(|v| v.parse().ok())
        .expect("minflt")
}

#[inline(never)]
fn boxed(i: usize) -> Box<[u8; 48]> {
    Box::new([i as u8; 48])
}

#[test]
#[ignore = "entry point of the child process of the fault-counting test"]
fn child_counts_faults() {
    allocprof::set_sample_rate(1);
    // A round unmeasured first, so that the unwinder's caches and the heap's first page
    // are in place before the count (each box is freed at once, so these samples touch
    // one line of the table).
    let mut kept = Vec::with_capacity(KEPT);
    for i in 0..KEPT {
        drop(std::hint::black_box(boxed(i)));
    }
    let before = thread_minor_faults();
    for i in 0..KEPT {
        kept.push(boxed(i));
    }
    let after = thread_minor_faults();
    assert!(allocprof::stats().live_samples >= KEPT as u64);
    println!("faults={}", after - before);
    drop(kept);
}
