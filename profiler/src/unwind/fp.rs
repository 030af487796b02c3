//! The frame-pointer unwinder: follows the chain of frame records that code compiled with
//! frame pointers builds in every prologue.
//!
//! A frame record is two words at the frame pointer: the caller's frame pointer, then the
//! return address into the caller. On x86_64 the record sits at `rbp` (`push rbp; mov rbp,
//! rsp` right after the call, so the frame's CFA is `rbp + 16`); on aarch64 at `x29`
//! (`stp x29, x30, [sp, #-n]!; mov x29, sp`).
//!
//! # Safety of the walk
//!
//! Nothing guarantees that `rbp` holds a frame pointer: code built without frame pointers
//! uses it as an ordinary register, and the walk may reach such frames (glibc's
//! `start_thread` and `__libc_start_call_main` are built that way). So every read goes
//! through [`StackBounds::read`] (inside the live part of this thread's stack, aligned),
//! and the walk stops as soon as the chain is not strictly increasing, leaves the stack,
//! is misaligned, or yields a null return address. A bad chain can therefore end a stack
//! early or, at worst, append a few bogus addresses at its root end; it can never fault.
//!
//! # Cost
//!
//! Two loads and a few compares per frame, no system call, no allocation: ~0.1 µs for a
//! 30-frame stack.

use super::bounds::StackBounds;
use crate::stack::StackBuf;

/// Where a frame-pointer walk stopped.
pub(super) enum End {
    /// The chain ended (null or bad next record), or the buffer is full.
    Done,
    /// The last pushed return address lies outside the code known to keep frame pointers.
    /// The caller may continue from here with a DWARF unwinder: `ip` is that return
    /// address, `sp` the caller's stack pointer after the return (the CFA of the frame the
    /// record belonged to) and `bp` the caller's frame-pointer register. x86_64 only (see
    /// `handoff`).
    #[cfg(target_arch = "x86_64")]
    Handoff { ip: usize, sp: usize, bp: usize },
}

/// Words in a frame record.
const RECORD: usize = 2 * std::mem::size_of::<usize>();

/// Reads the frame-pointer and stack-pointer registers of the calling function.
#[inline(always)]
fn registers() -> (usize, usize) {
    let fp: usize;
    let sp: usize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads two registers into outputs; touches no memory and no flags.
    unsafe {
        std::arch::asm!(
            "mov {fp}, rbp",
            "mov {sp}, rsp",
            fp = out(reg) fp,
            sp = out(reg) sp,
            options(nomem, nostack, preserves_flags)
        );
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: reads two registers into outputs; touches no memory and no flags.
    unsafe {
        std::arch::asm!(
            "mov {fp}, x29",
            "mov {sp}, sp",
            fp = out(reg) fp,
            sp = out(reg) sp,
            options(nomem, nostack, preserves_flags)
        );
    }
    (fp, sp)
}

/// Walks the frame-pointer chain of the calling thread into `buf`, leaf first, keeping the
/// return addresses read from frames above `marker` (see `unwind/mod.rs`).
///
/// `in_fp_code(addr)` says whether a return address lies in code known to keep frame
/// pointers; at the first one that does not, the walk stops with [`End::Handoff`] (on
/// x86_64, where the caller's registers are known) so the rest can be unwound with DWARF.
/// Pass `|_| true` to walk the chain to its end.
///
/// Returns `None`, having pushed nothing, if the walk cannot start: the stack bounds are
/// unknown or the frame pointer is not on this thread's stack (signal alternate stack,
/// binary built without frame pointers).
///
/// Does not allocate, lock or make a system call (except the first call on a thread, which
/// asks glibc for the stack bounds once).
#[inline(never)]
pub(super) fn capture(
    buf: &mut StackBuf,
    marker: usize,
    in_fp_code: impl Fn(usize) -> bool,
) -> Option<End> {
    let (fp, sp) = registers();
    let bounds = StackBounds::current()?.above_sp(sp)?;
    walk(buf, marker, &bounds, fp, in_fp_code)
}

/// The walk of [`capture`] from the frame record at `fp`, reading only inside `bounds`.
pub(super) fn walk(
    buf: &mut StackBuf,
    marker: usize,
    bounds: &StackBounds,
    mut fp: usize,
    in_fp_code: impl Fn(usize) -> bool,
) -> Option<End> {
    if !bounds.contains(fp, RECORD) {
        return None;
    }
    // `ret` returns into the caller of the function owning the record at `fp`. Like the
    // baseline, keep it iff that function's frame lies above `marker`, i.e. it is the
    // sampling entry point or one of its callers (its callees' records all lie below the
    // marker, a local of the entry point; the entry point's record above it). The chain
    // rises strictly, so the records below the marker come first: skip them in a loop of
    // their own, and the loop that keeps frames needs no marker test.
    while fp <= marker {
        match bounds.read_record(fp) {
            Some((next, ret)) if ret != 0 && next > fp => fp = next,
            _ => return Some(End::Done),
        }
    }
    let mut buf = buf.writer();
    loop {
        let Some((next, ret)) = bounds.read_record(fp) else {
            return Some(End::Done);
        };
        if ret == 0 || !buf.push(ret) {
            return Some(End::Done);
        }
        if !in_fp_code(ret) {
            return Some(handoff(ret, fp, next));
        }
        if next <= fp {
            return Some(End::Done);
        }
        fp = next;
    }
}

#[cfg(target_arch = "x86_64")]
fn handoff(ret: usize, fp: usize, next: usize) -> End {
    // `push rbp; mov rbp, rsp` right after the call: the CFA is two words above the record.
    End::Handoff {
        ip: ret,
        sp: fp + RECORD,
        bp: next,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn handoff(_ret: usize, _fp: usize, _next: usize) -> End {
    // On aarch64 the record's place in the frame (and so the CFA) is not fixed.
    End::Done
}

/// Whether the code of this crate was compiled with frame pointers: checks the prologue
/// of `probe`, a non-leaf function, for `push rbp; mov rbp, rsp` (after an optional
/// `endbr64`). `-C force-frame-pointers=yes` in `RUSTFLAGS` applies to every crate of the
/// build, so this stands for the whole binary except precompiled and C code.
#[cfg(target_arch = "x86_64")]
pub(super) fn compiled_with_frame_pointers(probe: usize) -> bool {
    // SAFETY: `probe` is the address of a function of this binary; its first eight bytes
    // are inside the mapped, readable text segment (a function body is longer than that).
    let code = unsafe { std::ptr::read_unaligned(probe as *const [u8; 8]) };
    let code = if code[..4] == [0xf3, 0x0f, 0x1e, 0xfa] {
        &code[4..]
    } else {
        &code[..]
    };
    code[0] == 0x55 && code[1..4] == [0x48, 0x89, 0xe5]
}

/// See the x86_64 version. The aarch64 prologue has no single fixed encoding, so this
/// answers `false` and frame pointers are used there only when asked for.
#[cfg(not(target_arch = "x86_64"))]
pub(super) fn compiled_with_frame_pointers(_probe: usize) -> bool {
    false
}
