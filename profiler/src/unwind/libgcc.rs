//! The baseline unwinder: the `backtrace` crate over the system's DWARF unwinder
//! (libgcc's `_Unwind_Backtrace`). Robust on every target `backtrace` supports, with or
//! without frame pointers; costs several microseconds per stack.

use crate::stack::StackBuf;

pub(super) fn capture(buf: &mut StackBuf, marker: usize) {
    // SAFETY: `trace_unsynchronized` requires that no other thread runs a backtrace
    // function concurrently *if* the platform's unwinder is not thread-safe. libgcc's
    // `_Unwind_Backtrace` is thread-safe on Linux (glibc and musl), which is the only
    // platform this crate builds the sampled path for. We use the unsynchronized variant
    // because the synchronized one takes a global lock and may allocate.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            // `sp()` is `_Unwind_GetCFA`, which inside `_Unwind_Backtrace` still holds the
            // CFA of the frame's callee, i.e. this frame's own stack pointer. At or below
            // the marker: the sampling entry point itself or one of its callees.
            let sp = frame.sp() as usize;
            if sp != 0 && sp <= marker {
                return true;
            }
            let ip = frame.ip() as usize;
            if ip == 0 {
                return false;
            }
            buf.push(ip)
        });
    }
}
