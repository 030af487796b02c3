//! The reentrancy mark.
//!
//! While the profiler itself works on a thread (capturing a stack, inserting into the
//! table, exporting, symbolizing under the symbol-cache lock), that thread is *marked*.
//! Allocations made by a marked thread still go through [`crate::Profiler`] but are never
//! sampled, so the profiler can never re-enter itself and can never try to take a lock it
//! already holds. They count in the exact totals, except on the sampled path, which also
//! hides its allocations (the stack table's storage) from the totals: see
//! `thread::Region`.

use crate::thread;
use std::marker::PhantomData;

/// RAII mark: set by [`ReentrancyGuard::enter`], cleared when dropped.
///
/// Not `Send`: the mark belongs to the thread that set it.
pub(crate) struct ReentrancyGuard {
    _not_send: PhantomData<*const ()>,
}

impl ReentrancyGuard {
    /// Marks the current thread. Returns `None` if it was already marked, in which case the
    /// caller is nested inside profiler work and must not do any profiler work itself.
    ///
    /// Must not allocate: it is called on the sampled path before anything else.
    #[inline]
    pub(crate) fn enter() -> Option<Self> {
        if thread::set_busy(true) {
            None
        } else {
            Some(ReentrancyGuard {
                _not_send: PhantomData,
            })
        }
    }
}

impl Drop for ReentrancyGuard {
    #[inline]
    fn drop(&mut self) {
        thread::set_busy(false);
    }
}
