//! Stack capture on the sampled path. This module is the one place that chooses an
//! unwinder for the platform.
//!
//! Every unwinder here fills a [`StackBuf`] without allocating and skips the frames of
//! the profiler's own capture machinery: frames whose canonical frame address lies at or
//! below `marker` (the address of a local in the profiler's sampling entry point) belong
//! to callees of that entry point and are dropped. The remaining profiler frames
//! (the entry point itself, `__rust_alloc`, `alloc::alloc::*`) are removed by name when the
//! profile is built, see `profile::is_internal_function`.

use crate::stack::StackBuf;

mod libgcc;

/// Captures the calling thread's stack into `buf`, leaf first.
///
/// Must be called with the reentrancy mark set: the system unwinder may allocate on its
/// first use.
#[inline(never)]
pub(crate) fn capture(buf: &mut StackBuf, marker: usize) {
    libgcc::capture(buf, marker);
}
