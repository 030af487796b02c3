//! Stack capture on the sampled path. This module is the one place that chooses an
//! unwinder for the platform.
//!
//! Every unwinder here fills a [`StackBuf`] without allocating and skips the frames of
//! the profiler's own capture machinery. `marker` is the address of a local in the
//! profiler's sampling entry point; a return address is kept iff the frame it was read
//! from (the frame of the function it returns *from*) lies above the marker, i.e. belongs
//! to the entry point or one of its callers. So the first address kept returns into the
//! entry point's caller; the entry point and everything it calls are gone. (This is what
//! the `backtrace` baseline does: libgcc reports, for each frame, the CFA of its callee,
//! which is the frame's own stack pointer, and we drop frames whose stack pointer is at
//! or below the marker.) The remaining profiler frames (`__rust_alloc`,
//! `alloc::alloc::*`, the wrapper's inlined `alloc`) are removed by name when the
//! profile is built, see `profile::is_internal_function`.
//!
//! # The unwinders
//!
//! | name | how | per frame | one sampled allocation, depth 30 | needs |
//! |---|---|---|---|---|
//! | `fp` | frame-pointer chain, bounds-checked ([`fp`]); frames outside the main program (glibc's thread and process start) finished with `dwarf` once per thread ([`tail`]) | ~3 ns | 0.19 µs | `-C force-frame-pointers=yes` |
//! | `dwarf` | `.eh_frame` CFI reduced to a per-address rule by gimli, cached, and remembered by depth ([`dwarf`]) | ~4 ns warm, a few µs a cache miss | 0.21 µs | nothing (Linux x86_64) |
//! | `libgcc` | the `backtrace` crate over `_Unwind_Backtrace` ([`libgcc`]) | ~100 ns | 4.9 µs | nothing |
//!
//! (Criterion, `benches/benches/sampled.rs`, 2-CPU AMD EPYC; the sampled allocation
//! includes the table and live-set updates and the free. See `benches/README.md`.)
//!
//! All three produce the same stacks (tested in `tests.rs`). The choice is made once per
//! process: `ALLOCPROF_UNWINDER=fp|dwarf|libgcc` if set, else `fp` when this crate was
//! compiled with frame pointers (then the whole build was: `RUSTFLAGS` apply to every
//! crate; Rust's precompiled std keeps frame pointers in its non-leaf functions too,
//! checked on 1.95 by disassembly), else `dwarf`
//! where available, else `libgcc`. When the chosen unwinder cannot run for one capture
//! (unknown stack bounds, e.g. on a signal alternate stack; every rule cache busy; the
//! module list being built by another thread) that capture falls back to `libgcc`.

use crate::stack::StackBuf;
use std::sync::atomic::{AtomicU8, Ordering};

mod libgcc;

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod bounds;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod dwarf;
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod fp;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod tail;

#[cfg(test)]
mod tests;

/// A stack unwinder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unwinder {
    /// Frame-pointer chain (with a DWARF tail where available).
    FramePointer,
    /// Cached DWARF CFI.
    Dwarf,
    /// The system unwinder through the `backtrace` crate.
    Libgcc,
}

impl Unwinder {
    fn code(self) -> u8 {
        match self {
            Unwinder::FramePointer => 1,
            Unwinder::Dwarf => 2,
            Unwinder::Libgcc => 3,
        }
    }

    fn from_code(code: u8) -> Option<Unwinder> {
        match code {
            1 => Some(Unwinder::FramePointer),
            2 => Some(Unwinder::Dwarf),
            3 => Some(Unwinder::Libgcc),
            _ => None,
        }
    }

    /// Whether this platform has the unwinder at all.
    pub(crate) fn available(self) -> bool {
        match self {
            Unwinder::FramePointer => cfg!(all(
                target_os = "linux",
                any(target_arch = "x86_64", target_arch = "aarch64")
            )),
            Unwinder::Dwarf => cfg!(all(target_os = "linux", target_arch = "x86_64")),
            Unwinder::Libgcc => true,
        }
    }
}

/// The process's unwinder; 0 until decided.
static SELECTED: AtomicU8 = AtomicU8::new(0);

/// The unwinder this process uses, deciding on first call (see the module docs).
///
/// Does not allocate: reads the environment with `getenv(3)`.
pub(crate) fn selected() -> Unwinder {
    if let Some(u) = Unwinder::from_code(SELECTED.load(Ordering::Relaxed)) {
        return u;
    }
    let u = requested().unwrap_or_else(default_unwinder);
    SELECTED.store(u.code(), Ordering::Relaxed);
    u
}

/// `ALLOCPROF_UNWINDER`, if set to a name available here.
fn requested() -> Option<Unwinder> {
    // SAFETY: `getenv` with a NUL-terminated name; the result, if not null, points to a
    // NUL-terminated string in the environment, read at once. (Concurrent `setenv` from
    // C code would be a data race for every reader of the environment, std included.)
    let value = unsafe {
        let p = libc::getenv(c"ALLOCPROF_UNWINDER".as_ptr());
        if p.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(p).to_bytes()
    };
    let u = match value {
        b"fp" | b"frame-pointer" => Unwinder::FramePointer,
        b"dwarf" => Unwinder::Dwarf,
        b"libgcc" | b"backtrace" => Unwinder::Libgcc,
        _ => {
            warn(b"allocprof: ignoring ALLOCPROF_UNWINDER: expected fp, dwarf or libgcc\n");
            return None;
        }
    };
    if !u.available() {
        warn(b"allocprof: ALLOCPROF_UNWINDER names an unwinder not available on this platform\n");
        return None;
    }
    Some(u)
}

fn warn(msg: &[u8]) {
    // SAFETY: writes `msg.len()` bytes from a valid slice to fd 2; the result is ignored
    // (nothing useful can be done about a failed diagnostic).
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

fn default_unwinder() -> Unwinder {
    if compiled_with_frame_pointers() {
        Unwinder::FramePointer
    } else if Unwinder::Dwarf.available() {
        Unwinder::Dwarf
    } else {
        Unwinder::Libgcc
    }
}

/// Whether this crate's code keeps frame pointers (the prologue of [`capture_with`]).
pub(crate) fn compiled_with_frame_pointers() -> bool {
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    {
        let probe: fn(Unwinder, &mut StackBuf, usize) -> Unwinder = capture_with;
        fp::compiled_with_frame_pointers(probe as usize)
    }
    #[cfg(not(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )))]
    {
        false
    }
}

/// Heap bytes the unwinders hold (the DWARF unwinder's rule caches, created per
/// concurrently capturing thread, at most eight of about 56 KiB), for
/// `Stats::profiler_bytes`.
pub(crate) fn memory_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        dwarf::memory_bytes()
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    {
        0
    }
}

/// For the `pthread_atfork` child handler (`fork.rs`): releases unwinder state that
/// threads which do not exist in the child held at the fork. Does not allocate.
pub(crate) fn reset_after_fork_in_child() {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    dwarf::reset_after_fork_in_child();
}

/// Creates every rule cache now (tests of the no-allocation property).
#[cfg(test)]
fn warm_all_caches() {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    dwarf::warm_all_caches();
}

/// Captures the calling thread's stack into `buf`, leaf first, with the process's
/// unwinder.
///
/// Must be called with the reentrancy mark set: the first capture builds the DWARF
/// unwinder's module list, and the system unwinder may allocate on its first use. Once
/// warm, the `fp` and `dwarf` unwinders do not allocate (tested with a counting allocator).
#[inline(never)]
pub(crate) fn capture(buf: &mut StackBuf, marker: usize) {
    capture_with(selected(), buf, marker);
}

/// Captures with a given unwinder; returns the one that produced the stack (the fallback
/// when `unwinder` could not run, see the module docs). `buf` must be empty.
#[inline(never)]
pub(crate) fn capture_with(unwinder: Unwinder, buf: &mut StackBuf, marker: usize) -> Unwinder {
    match unwinder {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        Unwinder::FramePointer => {
            // Walk frame pointers through the main program; hand frames in other objects
            // (glibc's start routines, built without frame pointers) to DWARF. Without the
            // main program's range (the module list being built by another thread) the
            // walk could not tell where to hand over: fall back, as `dwarf` does.
            if let Some(main) = dwarf::main_text() {
                match fp::capture(buf, marker, |a| main.contains(&a)) {
                    Some(fp::End::Done) => return Unwinder::FramePointer,
                    Some(fp::End::Handoff { ip, sp, bp }) => {
                        finish_with_dwarf(buf, marker, ip, sp, bp, &main);
                        return Unwinder::FramePointer;
                    }
                    None => {}
                }
            }
        }
        #[cfg(all(target_os = "linux", target_arch = "aarch64"))]
        Unwinder::FramePointer if fp::capture(buf, marker, |_| true).is_some() => {
            return Unwinder::FramePointer;
        }
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        Unwinder::Dwarf if dwarf::capture(buf, marker) => return Unwinder::Dwarf,
        _ => {}
    }
    libgcc::capture(buf, marker);
    Unwinder::Libgcc
}

/// The frames above a frame-pointer walk's hand-off: replayed from this thread's memo of
/// its root frames when the hand-off is the memoised one, else unwound with DWARF (and
/// memoised when they qualify, see `tail.rs`).
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn finish_with_dwarf(
    buf: &mut StackBuf,
    marker: usize,
    ip: usize,
    sp: usize,
    bp: usize,
    main: &std::ops::Range<usize>,
) {
    if let Some((frames, len)) = tail::lookup(ip, sp, bp) {
        for &f in &frames[..len] {
            if !buf.push(f) {
                break;
            }
        }
        return;
    }
    let before = buf.as_slice().len();
    if dwarf::resume(buf, marker, ip, sp, bp) == Some(dwarf::Walked::Root) {
        let added = &buf.as_slice()[before..];
        if added.iter().all(|a| !main.contains(a)) {
            tail::store(ip, sp, bp, added);
        }
    }
}
