//! Surviving `fork`.
//!
//! If another thread holds one of the profiler's locks when a multi-threaded process
//! forks, the child inherits the lock held by a thread that does not exist in it, and its
//! first sampled allocation or export would wait forever. We register `pthread_atfork`
//! handlers once (at the first slow-path event) that:
//!
//! * **prepare** (in the forking thread, before the fork): take every profiler lock in
//!   one fixed order — symbolizer, symbol cache, live-set writer, stack-table shards,
//!   overflow, thread registry — so no other thread is inside a critical section at the
//!   instant of the fork and the table is consistent in the child;
//! * **parent**: release them in reverse order;
//! * **child**: reset them to unlocked (the child has one thread and no waiters), and
//!   release the DWARF unwinder's try-locked cache slots, which a vanished thread may
//!   have held (the child would otherwise fall back to libgcc for good).
//!
//! The fixed order and the rule that no code path takes two of these locks except
//! symbolizer → cache (never the reverse) mean prepare cannot deadlock with a thread
//! that is using them. The forking thread is marked busy across the fork so that
//! allocations made by other atfork handlers (glibc's run after ours in prepare) are not
//! sampled while we hold the table.

use crate::lock::ForkLock;
use crate::{live, symbolize, table::TABLE, thread};
use std::sync::Once;

static REGISTER: Once = Once::new();

/// Registers the handlers once. Must not allocate through the profiler (it is called on
/// the slow path; `pthread_atfork` uses the C library's own allocator).
pub(crate) fn register() {
    REGISTER.call_once(|| {
        // SAFETY: the three handlers are `extern "C" fn()` with static lifetime.
        unsafe {
            libc::pthread_atfork(Some(prepare), Some(parent), Some(child));
        }
    });
}

extern "C" fn prepare() {
    thread::set_busy(true);
    symbolize::fork_locks()
        .iter()
        .for_each(|l| l.fork_prepare());
    live::fork_locks().for_each(|l| l.fork_prepare());
    TABLE.fork_prepare();
    thread::fork_lock().fork_prepare();
}

extern "C" fn parent() {
    // SAFETY: `prepare` took these locks on this thread.
    unsafe {
        thread::fork_lock().fork_parent();
        TABLE.fork_parent();
        for l in live::fork_locks().rev() {
            l.fork_parent();
        }
        for l in symbolize::fork_locks().iter().rev() {
            l.fork_parent();
        }
    }
    thread::set_busy(false);
}

extern "C" fn child() {
    crate::unwind::reset_after_fork_in_child();
    crate::thread::reset_after_fork_in_child();
    thread::fork_lock().fork_child();
    TABLE.fork_child();
    live::fork_locks().for_each(|l| l.fork_child());
    symbolize::fork_locks().iter().for_each(|l| l.fork_child());
    thread::set_busy(false);
}
