//! [`Profiler`]: the `GlobalAlloc` wrapper.

use crate::guard::ReentrancyGuard;
use crate::live::{self, LiveMeta};
use crate::sampler::sample_weight;
use crate::stack::StackBuf;
use crate::table::TABLE;
use crate::{thread, unwind};
use std::alloc::{GlobalAlloc, Layout};

/// A `GlobalAlloc` that samples the allocations it passes on to `A`.
///
/// ```
/// use std::alloc::System;
/// #[global_allocator]
/// static ALLOC: allocprof_core::Profiler<System> = allocprof_core::Profiler::new(System);
/// # fn main() {}
/// ```
///
/// All `Profiler` values in a process share one profile: there is one global allocator.
///
/// # What it costs
///
/// An allocation or free that is not sampled costs a thread-local subtraction (of its size
/// shifted up, with a one below it: bytes and count in one word) and a branch; a free also
/// tests one bit of the live set's filter (an 8 KiB array that stays in cache). About 1 ns
/// per allocation and free together (criterion, `benches/`). Sampled allocations (one per
/// [`crate::sample_rate`] bytes on average) capture the stack and update the table: about
/// 0.2 µs at a stack depth of 30.
pub struct Profiler<A> {
    inner: A,
}

impl<A> Profiler<A> {
    /// Wraps `inner`. Usable in a `static`.
    pub const fn new(inner: A) -> Self {
        Profiler { inner }
    }

    /// The wrapped allocator.
    pub const fn inner(&self) -> &A {
        &self.inner
    }
}

// SAFETY: every method forwards the caller's request to the inner allocator unchanged
// (same pointer, same layout) and returns its result unchanged; the profiler only
// observes. The GlobalAlloc contract therefore holds exactly as it holds for `A`.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Profiler<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout (the caller upholds alloc's contract).
        let ptr = unsafe { self.inner.alloc(layout) };
        if !ptr.is_null() && thread::on_alloc(layout.size()) {
            on_alloc_slow(ptr, layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { self.inner.alloc_zeroed(layout) };
        if !ptr.is_null() && thread::on_alloc(layout.size()) {
            on_alloc_slow(ptr, layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Both tests run unconditionally (`|`, not `||`) so that the common case is one
        // predictable branch, and both outcomes end in a tail call: the fast path needs
        // no stack frame at all.
        if live::may_contain(ptr as usize) | thread::on_free(layout.size()) {
            // SAFETY: forwarded unchanged.
            return unsafe { dealloc_slow(&self.inner, ptr, layout) };
        }
        // SAFETY: forwarded unchanged; the caller upholds dealloc's contract.
        unsafe { self.inner.dealloc(ptr, layout) };
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // For sampling, a realloc is the free of the old block and the allocation of the
        // new one. The old record is taken out first (see `dealloc`) and put back if the
        // inner allocator fails, in which case the old block is untouched and still live.
        let old = if live::contains(ptr as usize) {
            live::remove(ptr as usize)
        } else {
            None
        };
        // SAFETY: forwarded unchanged; the caller upholds realloc's contract.
        let new = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if new.is_null() {
            if let Some(meta) = old {
                live::insert(ptr as usize, meta);
            }
            return new;
        }
        if let Some(meta) = old {
            TABLE.record_free(meta.stack, meta.size as usize, f64::from(meta.weight));
        }
        if thread::on_free(layout.size()) {
            thread::free_event(layout.size());
        }
        if thread::on_alloc(new_size) {
            on_alloc_slow(new, new_size);
        }
        new
    }
}

/// The allocation side's slow event: flush, and sample if a sample point fell inside.
#[cold]
#[inline(never)]
fn on_alloc_slow(ptr: *mut u8, size: usize) {
    if let Some(rate) = thread::alloc_event(size) {
        let marker = 0u8;
        if let Some(_mark) = ReentrancyGuard::enter() {
            let _hidden = thread::Region::hidden();
            sample(
                ptr as usize,
                size,
                rate,
                std::ptr::addr_of!(marker) as usize,
            );
        }
    }
}

/// Records one sampled allocation. Runs with the reentrancy mark set; the stack buffer
/// is on this frame, so nothing here allocates except the table's growth (allowed under
/// the mark).
#[inline(never)]
fn sample(ptr: usize, size: usize, rate: usize, marker: usize) {
    live::prefetch(ptr);
    let mut stack = StackBuf::new();
    unwind::capture(&mut stack, marker);
    // Rounded to f32 here because the live set keeps it as an f32 (see `LiveMeta`): the
    // free of this object must take back exactly what its allocation added.
    let weight = sample_weight(size, rate) as f32;
    let id = TABLE.record_alloc(stack.as_slice(), size, f64::from(weight));
    live::insert(
        ptr,
        LiveMeta {
            stack: id,
            weight,
            size: size as u64,
        },
    );
}

/// A free that may be of a sampled object, or that ran out the thread's free countdown.
///
/// The sample is forgotten *before* the memory goes back: once it is back, another
/// thread may be handed the same address and sample it. The real free comes last, as a
/// tail call: with bookkeeping after it, LLVM moved the stack adjustment ahead of the
/// branch while the unwind tables changed only after it, and a signal-handler unwinder
/// (pprof-rs's CPU profiler) landing on those instructions read a garbage return address
/// (tests in `reliability/`).
///
/// # Safety
///
/// As for [`GlobalAlloc::dealloc`] on `inner`.
#[cold]
#[inline(never)]
unsafe fn dealloc_slow<A: GlobalAlloc>(inner: &A, ptr: *mut u8, layout: Layout) {
    // Here also when only the free countdown ran out: test the filter again rather than
    // probe the table (a cache miss) for every such free.
    if live::contains(ptr as usize) {
        if let Some(meta) = live::remove(ptr as usize) {
            TABLE.record_free(meta.stack, meta.size as usize, f64::from(meta.weight));
        }
    }
    if thread::free_due() {
        thread::free_event(layout.size());
    }
    // SAFETY: forwarded unchanged; the caller upholds dealloc's contract.
    unsafe { inner.dealloc(ptr, layout) };
}
