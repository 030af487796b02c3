//! The heap and allocs profiles as `go tool pprof` and the wire format see them.

mod common;

use allocprof::pprof::proto;
use common::{decode, go_pprof, have_go, string, temp_file};
use std::alloc::System;
use std::hint::black_box;
use std::sync::Mutex;

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

/// Tests here change the process-wide rate; they take turns.
static SERIAL: Mutex<()> = Mutex::new(());

/// Keeps 4 MiB in 4 KiB blocks alive: shows up in inuse_space.
#[inline(never)]
fn retain_blocks_for_profile_test() -> Vec<Vec<u8>> {
    (0..1024).map(|i| black_box(vec![i as u8; 4096])).collect()
}

/// Allocates and frees 8 MiB in 64-byte strings: shows up in alloc_objects only.
#[inline(never)]
fn churn_strings_for_profile_test() {
    for i in 0..(8 << 20) / 64 {
        black_box(format!("{i:>60}"));
    }
}

fn workload() -> Vec<Vec<u8>> {
    allocprof::set_sample_rate(4096);
    let kept = retain_blocks_for_profile_test();
    churn_strings_for_profile_test();
    kept
}

fn sample_types(p: &proto::Profile) -> Vec<(String, String)> {
    p.sample_type
        .iter()
        .map(|t| (string(p, t.r#type).into(), string(p, t.unit).into()))
        .collect()
}

#[test]
fn wire_format_follows_go() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let kept = workload();
    // Both exports first: decoding allocates, and the test's own allocations are sampled.
    let (heap, allocs) = (allocprof::heap_pprof(), allocprof::allocs_pprof());
    let (heap, allocs) = (decode(&heap), decode(&allocs));
    for p in [&heap, &allocs] {
        assert_eq!(p.string_table[0], "");
        assert_eq!(
            sample_types(p),
            [
                ("alloc_objects", "count"),
                ("alloc_space", "bytes"),
                ("inuse_objects", "count"),
                ("inuse_space", "bytes")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let period = p.period_type.as_ref().unwrap();
        assert_eq!(
            (string(p, period.r#type), string(p, period.unit)),
            ("space", "bytes")
        );
        assert_eq!(p.period, 4096);
        assert!(
            p.time_nanos > 1_600_000_000_000_000_000,
            "time_nanos {}",
            p.time_nanos
        );
        assert_eq!(p.duration_nanos, 0, "cumulative profiles carry no duration");
        for (i, m) in p.mapping.iter().enumerate() {
            assert_eq!(m.id, i as u64 + 1);
        }
        for (i, l) in p.location.iter().enumerate() {
            assert_eq!(l.id, i as u64 + 1);
            assert_ne!(l.address, 0);
        }
        for (i, f) in p.function.iter().enumerate() {
            assert_eq!(f.id, i as u64 + 1);
        }
        for s in &p.sample {
            assert_eq!(s.value.len(), 4);
            assert_eq!(s.label.len(), 1);
            assert_eq!(string(p, s.label[0].key), "bytes");
        }
        // The test binary's mapping has its build ID and was symbolized in process.
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let main = p
            .mapping
            .iter()
            .find(|m| string(p, m.filename) == exe.to_str().unwrap())
            .expect("mapping of the test binary");
        assert!(string(p, main.build_id).len() >= 16);
        assert!(
            main.has_functions,
            "every location in the binary has a function name"
        );
        // has_filenames is set only if every location has a file (e.g. `_start` has none).
        let all_files = p
            .location
            .iter()
            .filter(|l| l.mapping_id == main.id)
            .all(|l| {
                l.line.iter().all(|line| {
                    let f = p
                        .function
                        .iter()
                        .find(|f| f.id == line.function_id)
                        .unwrap();
                    !string(p, f.filename).is_empty()
                })
            });
        assert_eq!(main.has_filenames, all_files);
    }
    assert_eq!(
        heap.default_sample_type, 0,
        "heap leaves it unset (inuse_space)"
    );
    assert_eq!(string(&allocs, allocs.default_sample_type), "alloc_space");
    // Same data, different default.
    assert_eq!(heap.sample.len(), allocs.sample.len());
    drop(kept);
}

#[test]
fn two_exports_of_an_idle_process_are_identical() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let kept = workload();
    // Both exports first: decoding allocates, and the test's own allocations are sampled.
    let (a, b) = (allocprof::heap_pprof(), allocprof::heap_pprof());
    let (mut a, mut b) = (decode(&a), decode(&b));
    a.time_nanos = 0;
    b.time_nanos = 0;
    assert!(!a.sample.is_empty());
    assert!(a == b, "exports differ beyond time_nanos");
    drop(kept);
}

#[test]
fn go_tool_pprof_reads_both_profiles() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !have_go() {
        return;
    }
    let kept = workload();
    let heap = temp_file("heap.pb.gz", &allocprof::heap_pprof());
    let allocs = temp_file("allocs.pb.gz", &allocprof::allocs_pprof());

    let top = go_pprof(&["-top", heap.to_str().unwrap()]);
    assert!(top.contains("Type: inuse_space"), "{top}");
    assert!(top.contains("retain_blocks_for_profile_test"), "{top}");
    assert!(
        !top.contains("churn_strings_for_profile_test"),
        "freed memory is not in use:\n{top}"
    );
    // The profiler's own frames are stripped from the leaf side.
    assert!(!top.contains("allocprof_core"), "{top}");
    assert!(!top.contains("__rust_alloc"), "{top}");

    let top = go_pprof(&["-top", allocs.to_str().unwrap()]);
    assert!(top.contains("Type: alloc_space"), "{top}");
    assert!(top.contains("churn_strings_for_profile_test"), "{top}");

    let top = go_pprof(&[
        "-top",
        "-sample_index=alloc_objects",
        allocs.to_str().unwrap(),
    ]);
    assert!(top.contains("Type: alloc_objects"), "{top}");

    // File and line, from in-process symbolization.
    let lines = go_pprof(&["-top", "-lines", heap.to_str().unwrap()]);
    assert!(
        lines.contains("retain_blocks_for_profile_test") && lines.contains("profile_go.rs:"),
        "{lines}"
    );

    let traces = go_pprof(&["-traces", allocs.to_str().unwrap()]);
    let trace = traces
        .split("-----------+")
        .find(|t| t.contains("churn_strings_for_profile_test"))
        .expect("a trace through the churn function");
    assert!(trace.contains("alloc::fmt::format"), "{trace}");
    assert!(
        trace.contains("profile_go::churn_strings_for_profile_test"),
        "{trace}"
    );

    let raw = go_pprof(&["-raw", heap.to_str().unwrap()]);
    assert!(raw.contains("PeriodType: space bytes"), "{raw}");
    assert!(raw.contains("Period: 4096"), "{raw}");
    drop(kept);
}

#[test]
fn go_tool_pprof_reads_the_legacy_text() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !have_go() {
        return;
    }
    let kept = workload();
    let text = allocprof::text::legacy_text(&allocprof::snapshot().to_profile());
    assert!(text.starts_with("heap profile: "), "{text}");
    assert!(
        text.contains("@ heap/8192\n"),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(text.contains("# AllocatedBytes = "));
    let path = temp_file("heap.txt", text.as_bytes());
    // pprof parses the records and the memory map; it symbolizes from the binary on disk
    // (which needs binutils' addr2line for inline frames), so check what it parsed: the
    // records' count and their raw totals.
    let raw = go_pprof(&["-raw", path.to_str().unwrap()]);
    assert!(raw.contains("PeriodType: space bytes"), "{raw}");
    let records = text
        .lines()
        .take_while(|l| !l.starts_with("# allocprof"))
        .filter(|l| l.contains(" @ 0x"))
        .count();
    let samples = raw
        .lines()
        .skip_while(|l| !l.starts_with("Samples:"))
        .skip(2)
        .take_while(|l| !l.starts_with("Locations"))
        .filter(|l| l.contains(':') && !l.trim_start().starts_with("bytes:"))
        .count();
    assert!(records > 0);
    assert_eq!(samples, records, "pprof -raw:\n{raw}");
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    assert!(
        raw.contains(exe.to_str().unwrap()),
        "mapping of the binary:\n{raw}"
    );
    drop(kept);
}
