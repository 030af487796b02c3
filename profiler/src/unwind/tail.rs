//! A per-thread memo of the root end of the stack, for the frame-pointer unwinder.
//!
//! Every stack of a thread ends in the same few frames of code built without frame
//! pointers: glibc's `__libc_start_call_main`, `__libc_start_main`, `_start` on the main
//! thread, `start_thread` and `clone3` on others. The frame-pointer walk hands them to the
//! DWARF unwinder, which costs about as much as the whole walk before it. Those frames are
//! the same for the thread's whole life, so the first DWARF result is remembered and
//! replayed.
//!
//! # When a memo is valid
//!
//! A memo is stored only when the DWARF walk, started at the hand-off registers
//! `(ip, sp, bp)`, reached the end of the stack (a frame whose return address is
//! undefined) through at most [`MAX`] frames, none of them in the main program. It is
//! replayed only for the same `(ip, sp, bp)` on the same thread. DWARF unwinding is a
//! function of the registers and the stack memory above `sp`; the memory above `sp` that
//! these frames read belongs to activations that are still running (they are outer frames
//! of the current one) and, being the thread's root frames outside the main program, they
//! are the activations the thread started with. A callback through C code (a `qsort`
//! comparator) never qualifies: the walk above it reaches main-program frames again.

use std::cell::Cell;

/// Most frames memoised.
pub(super) const MAX: usize = 4;

#[derive(Clone, Copy)]
struct Memo {
    key: (usize, usize, usize),
    len: usize,
    frames: [usize; MAX],
}

const EMPTY: Memo = Memo {
    key: (0, 0, 0),
    len: 0,
    frames: [0; MAX],
};

thread_local! {
    static MEMO: Cell<Memo> = const { Cell::new(EMPTY) };
}

/// The memoised frames for a hand-off at `(ip, sp, bp)`, if any.
#[inline]
pub(super) fn lookup(ip: usize, sp: usize, bp: usize) -> Option<([usize; MAX], usize)> {
    let m = MEMO.try_with(Cell::get).ok()?;
    (m.key == (ip, sp, bp) && ip != 0).then_some((m.frames, m.len))
}

/// Remembers `frames` as the root end of this thread's stacks after a hand-off at
/// `(ip, sp, bp)`. The caller has checked the conditions in the module docs.
#[inline]
pub(super) fn store(ip: usize, sp: usize, bp: usize, frames: &[usize]) {
    if frames.len() > MAX {
        return;
    }
    let mut m = Memo {
        key: (ip, sp, bp),
        len: frames.len(),
        frames: [0; MAX],
    };
    m.frames[..frames.len()].copy_from_slice(frames);
    let _ = MEMO.try_with(|c| c.set(m));
}
