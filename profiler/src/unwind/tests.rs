//! The unwinders against the `backtrace` baseline, the frame-pointer walk against bad
//! chains, and the proof that a warm capture does not allocate.
//!
//! The frame-pointer comparison needs a build with frame pointers:
//!
//! ```text
//! ALLOCPROF_TEST_FRAME_POINTERS=1 RUSTFLAGS="-C force-frame-pointers=yes" \
//!     cargo test -p allocprof-core unwind
//! ```
//!
//! Without them it prints a notice and checks only `dwarf` against `libgcc`. The variable
//! (set by CI) makes the comparison mandatory, and is what enables it on aarch64, where
//! frame pointers are not detected.

use super::{capture_with, compiled_with_frame_pointers, Unwinder};
use crate::stack::StackBuf;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

/// Counts allocations made by threads that turned counting on; otherwise `System`.
///
/// This is the global allocator of allocprof-core's unit-test binary. Counting is off
/// unless a test turns it on for its own thread, so other tests are unaffected.
struct Counting;

thread_local! {
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
    /// Allocations this thread made while counting (per thread, so that tests running
    /// in parallel do not see each other's).
    static COUNTED: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc() {
    if COUNT_HERE.try_with(Cell::get).unwrap_or(false) {
        let _ = COUNTED.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: forwards every call to `System` unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded; the caller upholds the contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded; the caller upholds the contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded; the caller upholds the contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; the caller upholds the contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Stacks = Vec<(Unwinder, Unwinder, Vec<usize>)>;

/// Stands in for the sampling entry point: owns the marker and captures with every
/// unwinder from one call site (so the leaf return address is the same for all).
#[inline(never)]
fn entry(unwinders: &[Unwinder]) -> Stacks {
    let marker = 0u8;
    let marker = black_box(std::ptr::addr_of!(marker) as usize);
    let mut out = Vec::new();
    for &u in unwinders {
        let mut buf = StackBuf::new();
        let used = black_box(capture_with(black_box(u), &mut buf, marker));
        out.push((u, used, buf.as_slice().to_vec()));
    }
    out
}

/// Recurses `depth` frames (not inlined, not a tail call) before capturing.
#[inline(never)]
fn recurse(depth: usize, unwinders: &[Unwinder]) -> Stacks {
    let r = if depth == 0 {
        entry(unwinders)
    } else {
        recurse(black_box(depth - 1), unwinders)
    };
    black_box(r)
}

fn available() -> Vec<Unwinder> {
    [Unwinder::FramePointer, Unwinder::Dwarf, Unwinder::Libgcc]
        .into_iter()
        .filter(|u| u.available())
        .collect()
}

/// Whether to hold the frame-pointer unwinder to the baseline: when this build keeps
/// frame pointers. `ALLOCPROF_TEST_FRAME_POINTERS=1` says that it does (CI sets it in
/// its builds with `-C force-frame-pointers=yes`): the comparison then cannot be skipped,
/// on x86_64 the detection must agree, and on aarch64, where nothing detects frame
/// pointers, it is the only way to run the comparison.
fn frame_pointers_in_build() -> bool {
    let detected = compiled_with_frame_pointers();
    if std::env::var_os("ALLOCPROF_TEST_FRAME_POINTERS").is_some_and(|v| v == "1") {
        assert!(
            detected || !cfg!(target_arch = "x86_64"),
            "ALLOCPROF_TEST_FRAME_POINTERS=1, but this x86_64 build was not detected as \
             keeping frame pointers"
        );
        return true;
    }
    detected
}

/// Waits until the DWARF unwinder's module list is built (building it if no thread has
/// started to). The first capture in the process builds it, and while another test's
/// thread does, `dwarf` and `fp` captures here fall back to `libgcc`. A comparison that
/// raced the build failed in CI: all its retries fell inside the build.
fn wait_for_module_list() {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while super::dwarf::main_text().is_none() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
    }
}

/// Checks every unwinder's stack against `libgcc`'s, at several depths, on this thread.
fn compare_here() {
    wait_for_module_list();
    let fp_ok = frame_pointers_in_build();
    if !fp_ok && Unwinder::FramePointer.available() {
        eprintln!(
            "notice: built without frame pointers; skipping the fp-vs-backtrace comparison \
             (run with RUSTFLAGS=\"-C force-frame-pointers=yes\")"
        );
    }
    let unwinders = available();
    for depth in [0, 1, 10, 40, 150] {
        // Twice: the second run exercises warm caches.
        for _ in 0..2 {
            // Tests run in parallel and every capturing thread holds one of the DWARF
            // unwinder's rule-cache slots; a capture that finds them all taken falls back
            // (or, for fp, ends before glibc's root frames). So a mismatch is retried; a
            // real difference fails every attempt.
            let mut last = String::new();
            let matched = (0..20).any(|_| {
                let stacks = recurse(depth, &unwinders);
                let base = &stacks.iter().find(|s| s.0 == Unwinder::Libgcc).unwrap().2;
                assert!(
                    base.len() >= (depth + 2).min(crate::stack::MAX_DEPTH),
                    "depth {depth}: baseline has only {} frames",
                    base.len()
                );
                stacks.iter().all(|(asked, used, stack)| {
                    let skip =
                        *asked == Unwinder::Libgcc || (*asked == Unwinder::FramePointer && !fp_ok);
                    let ok = skip || (used == asked && stack == base);
                    if !ok {
                        last = format!(
                            "{asked:?} (ran {used:?}) differs from the backtrace baseline at \
                             depth {depth}:\n{stack:x?}\nbaseline:\n{base:x?}"
                        );
                    }
                    ok
                })
            });
            assert!(matched, "{last}");
        }
    }
}

#[test]
fn unwinders_match_backtrace_on_this_thread() {
    compare_here();
}

#[test]
fn unwinders_match_backtrace_on_a_spawned_thread() {
    std::thread::spawn(compare_here).join().unwrap();
}

#[test]
fn the_leaf_frame_is_the_entry_points_caller() {
    // The first frame kept is the return address into the caller of `entry` (the marker's
    // function): symbolized, it must name `recurse`, not the capture machinery.
    wait_for_module_list();
    for (asked, _, stack) in recurse(3, &available()) {
        if asked == Unwinder::FramePointer && !frame_pointers_in_build() {
            continue;
        }
        let leaf = crate::stack::ReturnAddress(stack[0]).lookup();
        let frames = crate::symbolize::symbolize(&[leaf]);
        let names: Vec<&str> = frames[0].iter().map(|f| f.name.as_str()).collect();
        assert!(
            names.iter().any(|n| n.ends_with("unwind::tests::recurse")),
            "{asked:?}: leaf is {names:?}"
        );
    }
}

#[test]
fn warm_capture_does_not_allocate() {
    let unwinders: Vec<Unwinder> = available()
        .into_iter()
        .filter(|&u| u != Unwinder::Libgcc)
        .filter(|&u| u != Unwinder::FramePointer || frame_pointers_in_build())
        .collect();
    if unwinders.is_empty() {
        // No DWARF unwinder on this platform and no frame pointers in this build: every
        // capture goes to libgcc, which may allocate, and there is nothing to check.
        eprintln!("no fast unwinder in this build; nothing to check");
        return;
    }
    // Warm up: the module list, this thread's stack bounds, and every rule-cache slot (a
    // slot's first use creates its caches, under the reentrancy mark).
    black_box(recurse(20, &unwinders));
    super::warm_all_caches();
    let marker = 0u8;
    let marker = std::ptr::addr_of!(marker) as usize;
    let mut bufs: Vec<StackBuf> = (0..100).map(|_| StackBuf::new()).collect();
    let before = COUNTED.get();
    COUNT_HERE.set(true);
    let mut used = Vec::with_capacity(0);
    for (i, buf) in bufs.iter_mut().enumerate() {
        let u = unwinders[i % unwinders.len()];
        let got = capture_with(u, buf, marker);
        if got != u {
            used.push(got); // never taken when the capture worked (no allocation then)
        }
    }
    COUNT_HERE.set(false);
    let after = COUNTED.get();
    assert!(used.is_empty(), "fell back: {used:?}");
    assert_eq!(after - before, 0, "captures with {unwinders:?} allocated");
    // The captures did real work: every stack holds this test's frames.
    assert!(bufs.iter().all(|b| b.as_slice().len() >= 3));
    // And the DWARF unwinder's caches are accounted for.
    if Unwinder::Dwarf.available() {
        assert!(super::memory_bytes() >= 100 * 1024);
    }
}

#[test]
fn the_counting_allocator_counts() {
    // The no-allocation test above can fail: a Box made while counting is seen.
    let before = COUNTED.get();
    COUNT_HERE.set(true);
    let b = black_box(Box::new(7u64));
    COUNT_HERE.set(false);
    drop(b);
    assert_eq!(COUNTED.get() - before, 1);
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod bad_chains {
    use super::super::bounds::StackBounds;
    use super::super::fp::{walk, End};
    use crate::stack::StackBuf;

    const W: usize = std::mem::size_of::<usize>();

    /// Walks a hand-built chain in `frames` (on this stack) starting at word `start`.
    fn walk_fake(frames: &mut [usize], start: usize) -> Vec<usize> {
        walk_fake_above(frames, start, 0)
    }

    /// As `walk_fake`, keeping only the return addresses of records above the address
    /// `marker`.
    fn walk_fake_above(frames: &mut [usize], start: usize, marker: usize) -> Vec<usize> {
        let base = frames.as_ptr() as usize;
        let bounds = StackBounds {
            lo: base,
            hi: base + frames.len() * W,
        };
        let mut buf = StackBuf::new();
        let end = walk(&mut buf, marker, &bounds, base + start * W, |_| true);
        assert!(matches!(end, Some(End::Done)));
        buf.as_slice().to_vec()
    }

    /// Fills `frames` with a good chain: record `i` at word `2 * i`, returning to
    /// `rets[i]` and linking to the next record, the last one to null.
    fn link_records(frames: &mut [usize], rets: &[usize]) {
        let base = frames.as_ptr() as usize;
        for (i, &ret) in rets.iter().enumerate() {
            frames[2 * i] = if i + 1 < rets.len() {
                base + (2 * i + 2) * W
            } else {
                0
            };
            frames[2 * i + 1] = ret;
        }
    }

    #[test]
    fn records_at_or_below_the_marker_are_skipped() {
        let mut f = [0usize; 8];
        let base = f.as_ptr() as usize;
        link_records(&mut f, &[0x1000, 0x2000, 0x3000, 0x4000]);
        assert_eq!(
            walk_fake_above(&mut f, 0, 0),
            [0x1000, 0x2000, 0x3000, 0x4000]
        );
        // A marker between records, and one at a record: records above it only.
        assert_eq!(walk_fake_above(&mut f, 0, base + 3 * W), [0x3000, 0x4000]);
        assert_eq!(walk_fake_above(&mut f, 0, base + 4 * W), [0x4000]);
        // A bad chain below the marker ends the walk with nothing kept.
        f[2] = base;
        assert_eq!(
            walk_fake_above(&mut f, 0, base + 5 * W),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn a_chain_deeper_than_the_buffer_keeps_its_innermost_frames() {
        let depth = crate::stack::MAX_DEPTH + 20;
        let mut f = vec![0usize; 2 * depth];
        let rets: Vec<usize> = (0..depth).map(|i| 0x1000 + i).collect();
        link_records(&mut f, &rets);
        let kept = walk_fake(&mut f, 0);
        let want: Vec<usize> = (0..crate::stack::MAX_DEPTH).map(|i| 0x1000 + i).collect();
        assert_eq!(kept, want);
    }

    #[test]
    fn a_good_chain_is_followed_to_its_null_end() {
        let mut f = [0usize; 8];
        let base = f.as_ptr() as usize;
        f[0] = base + 2 * W; // record 0 -> record at word 2
        f[1] = 0x1000;
        f[2] = base + 6 * W; // -> word 6
        f[3] = 0x2000;
        f[6] = 0; // end of chain
        f[7] = 0x3000;
        assert_eq!(walk_fake(&mut f, 0), [0x1000, 0x2000, 0x3000]);
    }

    #[test]
    fn a_chain_that_goes_down_stops() {
        let mut f = [0usize; 8];
        let base = f.as_ptr() as usize;
        f[2] = base + 4 * W;
        f[3] = 0x1000;
        f[4] = base + 2 * W; // points back down: a loop
        f[5] = 0x2000;
        assert_eq!(walk_fake(&mut f, 2), [0x1000, 0x2000]);
    }

    #[test]
    fn a_misaligned_or_outside_chain_stops() {
        let mut f = [0usize; 8];
        let base = f.as_ptr() as usize;
        f[0] = base + 2 * W + 3; // misaligned
        f[1] = 0x1000;
        assert_eq!(walk_fake(&mut f, 0), [0x1000]);
        f[0] = base + 64 * W; // beyond the stack's end
        assert_eq!(walk_fake(&mut f, 0), [0x1000]);
        f[0] = base + 7 * W; // a record that would straddle the end
        assert_eq!(walk_fake(&mut f, 0), [0x1000]);
        f[0] = usize::MAX - 7; // overflow
        assert_eq!(walk_fake(&mut f, 0), [0x1000]);
    }

    #[test]
    fn a_start_outside_the_stack_is_refused() {
        let f = [0usize; 4];
        let base = f.as_ptr() as usize;
        let bounds = StackBounds {
            lo: base,
            hi: base + 4 * W,
        };
        let mut buf = StackBuf::new();
        assert!(walk(&mut buf, 0, &bounds, base + 8 * W, |_| true).is_none());
        assert!(walk(&mut buf, 0, &bounds, 0, |_| true).is_none());
        assert!(buf.as_slice().is_empty());
    }
}
