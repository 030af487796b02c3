//! The calling thread's stack bounds, and the stack reads every unwinder in this module
//! goes through.
//!
//! A frame-pointer chain or a DWARF rule can point anywhere when the code that built the
//! frame did not keep a frame pointer (or the stack is corrupt). Reading such an address
//! could fault, so every read is checked against the thread's stack, `[lo, hi)`, first:
//! by [`StackBounds::read`] itself, or, for [`StackBounds::read_unchecked`], by its caller
//! (the DWARF walk checks an rsp-based frame once, as a whole, for both of its reads).
//!
//! The bounds come from `pthread_getattr_np` once per thread and are cached in a
//! `const`-initialised thread-local without `Drop`. glibc's `pthread_getattr_np` uses
//! glibc's own `malloc` (and for the main thread reads `/proc/self/maps` and the stack
//! rlimit); neither goes through Rust's global allocator, so it cannot re-enter the
//! profiler. After the first call there is no system call at all.

use std::cell::Cell;

/// `[lo, hi)` of one thread's stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StackBounds {
    pub(crate) lo: usize,
    pub(crate) hi: usize,
}

/// Sentinel cached when the bounds could not be obtained: the walkers then decline and the
/// caller falls back to the system unwinder.
const UNKNOWN: (usize, usize) = (1, 1);

thread_local! {
    /// `(0, 0)`: not queried yet on this thread.
    static BOUNDS: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

impl StackBounds {
    /// The calling thread's stack bounds, or `None` if they cannot be known (in which
    /// case nothing may be read from the stack by address).
    ///
    /// Does not allocate through the global allocator; one `pthread_getattr_np` per thread.
    #[inline]
    pub(crate) fn current() -> Option<StackBounds> {
        let (lo, hi) = BOUNDS.try_with(Cell::get).unwrap_or(UNKNOWN);
        let (lo, hi) = if hi == 0 {
            let b = query().unwrap_or(UNKNOWN);
            // `try_with` fails only while the thread's TLS is being torn down.
            let _ = BOUNDS.try_with(|c| c.set(b));
            b
        } else {
            (lo, hi)
        };
        (lo < hi).then_some(StackBounds { lo, hi })
    }

    /// These bounds narrowed to start at `sp`, a stack pointer value of the calling frame,
    /// so that no read goes below the live part of the stack (for the main thread the
    /// reported bounds reach down to the stack rlimit, below what is mapped). `None` if
    /// `sp` is not on this stack at all (a signal alternate stack, a coroutine's stack).
    #[inline]
    pub(crate) fn above_sp(self, sp: usize) -> Option<StackBounds> {
        (sp >= self.lo && sp < self.hi).then_some(StackBounds {
            lo: sp,
            hi: self.hi,
        })
    }

    /// Whether `[addr, addr + len)` lies inside the stack and `addr` is word-aligned.
    #[inline]
    pub(crate) fn contains(&self, addr: usize, len: usize) -> bool {
        // `lo <= addr && addr + len <= hi` without overflow: `addr - lo` wraps to a huge
        // value when `addr < lo`. (`lo < hi` for every value of this type.)
        addr.is_multiple_of(std::mem::align_of::<usize>())
            && (self.hi - self.lo)
                .checked_sub(len)
                .is_some_and(|room| addr.wrapping_sub(self.lo) <= room)
    }

    /// Reads the two words of a frame record at `addr` (one bounds check for both), if the
    /// record lies inside this thread's stack.
    #[inline]
    pub(crate) fn read_record(&self, addr: usize) -> Option<(usize, usize)> {
        if !self.contains(addr, 2 * std::mem::size_of::<usize>()) {
            return None;
        }
        let p = addr as *const usize;
        // SAFETY: as in `read`, for both words of `[addr, addr + 16)`, which `contains`
        // checked as a whole.
        Some(unsafe {
            (
                std::ptr::read_volatile(p),
                std::ptr::read_volatile(p.add(1)),
            )
        })
    }

    /// Reads the word at `addr`, which the caller has shown to lie inside the stack.
    ///
    /// # Safety
    ///
    /// `addr` is word-aligned and `[addr, addr + size_of::<usize>())` lies inside
    /// `[lo, hi)` (as [`StackBounds::contains`] would check).
    #[cfg(target_arch = "x86_64")] // the DWARF unwinder's
    #[inline(always)]
    pub(crate) unsafe fn read_unchecked(&self, addr: usize) -> usize {
        debug_assert!(self.contains(addr, std::mem::size_of::<usize>()));
        // SAFETY: as in `read`, the caller having done the check `read` does.
        unsafe { std::ptr::read_volatile(addr as *const usize) }
    }

    /// Reads the word at `addr` if it lies inside this thread's stack.
    #[cfg(target_arch = "x86_64")] // the DWARF unwinder's
    #[inline]
    pub(crate) fn read(&self, addr: usize) -> Option<usize> {
        if !self.contains(addr, std::mem::size_of::<usize>()) {
            return None;
        }
        // SAFETY: `addr` is aligned and lies inside `[lo, hi)`. The walkers only read
        // through bounds narrowed by `above_sp` to start at a stack pointer of the calling
        // thread's current call chain, so `[lo, hi)` is the live, touched, mapped part of
        // the calling thread's stack, which stays mapped while the thread runs this code.
        // A volatile read because the memory belongs to other frames, not to a Rust object
        // the compiler may reason about.
        Some(unsafe { std::ptr::read_volatile(addr as *const usize) })
    }
}

/// Asks glibc for the calling thread's stack.
#[cfg(target_os = "linux")]
fn query() -> Option<(usize, usize)> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: `pthread_getattr_np` initialises `attr` on success (returns 0); we only read
    // it and destroy it in that case. `pthread_self` is always valid for the caller.
    unsafe {
        if libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) != 0 {
            return None;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let rc = libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        if rc != 0 || addr.is_null() || size == 0 {
            return None;
        }
        let lo = addr as usize;
        Some((lo, lo.checked_add(size)?))
    }
}

#[cfg(not(target_os = "linux"))]
fn query() -> Option<(usize, usize)> {
    None
}
