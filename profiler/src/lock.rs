//! The profiler's lock for everything the allocator path touches: a small futex mutex
//! (Drepper, "Futexes Are Tricky", mutex 2) behind `lock_api`'s guard API.
//!
//! Why not `parking_lot::Mutex` here: after `fork`, the child must be able to *reset* a
//! lock that a vanished parent thread held or waited on. A parking_lot mutex with parked
//! waiters can only be unlocked by waking them through parking_lot's global hash table,
//! whose bucket locks another parent thread may have held at the fork — a deadlock in the
//! child. This lock's whole state is one word, so the child simply stores "unlocked".
//! Uncontended lock and unlock are one compare-exchange and one swap, like parking_lot.

use std::sync::atomic::{AtomicU32, Ordering};

const UNLOCKED: u32 = 0;
const LOCKED: u32 = 1;
const CONTENDED: u32 = 2;

/// The raw lock.
pub(crate) struct RawFutexMutex {
    state: AtomicU32,
}

/// A mutex over the raw lock.
pub(crate) type Mutex<T> = lock_api::Mutex<RawFutexMutex, T>;

// SAFETY: `lock` returns only once this thread changed the state from UNLOCKED, and
// `unlock` is only called by the holder (lock_api guarantees it through its guard), so
// at most one thread holds the lock; Acquire/Release orderings order the critical
// sections.
unsafe impl lock_api::RawMutex for RawFutexMutex {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawFutexMutex {
        state: AtomicU32::new(UNLOCKED),
    };
    type GuardMarker = lock_api::GuardNoSend;

    #[inline]
    fn lock(&self) {
        if self
            .state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        if self.state.swap(UNLOCKED, Ordering::Release) == CONTENDED {
            futex_wake(&self.state);
        }
    }
}

impl RawFutexMutex {
    #[cold]
    fn lock_contended(&self) {
        // Spin briefly: critical sections here are short.
        for _ in 0..100 {
            std::hint::spin_loop();
            if self.state.load(Ordering::Relaxed) == UNLOCKED
                && self
                    .state
                    .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
        }
        while self.state.swap(CONTENDED, Ordering::Acquire) != UNLOCKED {
            futex_wait(&self.state, CONTENDED);
        }
    }

    /// Marks the lock free without waking anyone: for the child of a `fork`, where the
    /// holder and every waiter are threads that do not exist.
    pub(crate) fn reset_in_child(&self) {
        self.state.store(UNLOCKED, Ordering::Relaxed);
    }
}

fn futex_wait(state: &AtomicU32, expected: u32) {
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 that lives as long as the lock; a
    // spurious or interrupted return is handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            state.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

fn futex_wake(state: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32; waking no one is fine.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            state.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        );
    }
}

/// Holds a lock across `fork` (prepare) and releases or resets it afterwards.
pub(crate) trait ForkLock {
    fn fork_prepare(&self);
    /// # Safety
    /// Only after `fork_prepare` on this thread.
    unsafe fn fork_parent(&self);
    fn fork_child(&self);
}

impl<T> ForkLock for Mutex<T> {
    fn fork_prepare(&self) {
        std::mem::forget(self.lock());
    }
    unsafe fn fork_parent(&self) {
        // SAFETY: `fork_prepare` took the lock on this thread and forgot the guard.
        unsafe { self.force_unlock() };
    }
    fn fork_child(&self) {
        // SAFETY: `raw` only exposes the raw lock; resetting it is sound in the child,
        // which has a single thread and no holder.
        unsafe { self.raw() }.reset_in_child();
    }
}
