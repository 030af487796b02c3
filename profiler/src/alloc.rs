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
/// An allocation or free that is not sampled costs a thread-local decrement, an
/// increment and a branch; a free also tests the pointer's low 12 bits (sampled blocks
/// are allocated 4 KiB-aligned, see below), with no memory access. About 1 ns per
/// allocation and free together (criterion, `benches/`). Sampled allocations (one per
/// [`crate::sample_rate`] bytes on average) capture the stack and update the table: about
/// 0.2 µs at a stack depth of 30.
///
/// # What it asks of the inner allocator
///
/// Unsampled requests are forwarded unchanged: same layout, same pointer, same result.
/// A *sampled* block is allocated with the caller's size and an alignment of at least
/// 4 KiB, and is freed (or reallocated) with that same layout, so that its free is
/// recognised from the pointer alone. The caller sees only a stricter alignment than it
/// asked for. The memory this can cost is bounded by the sampling: at most 4 KiB per
/// live sampled block, one per 512 KiB of allocation at the default rate (0.8%), and
/// under glibc the gap before an aligned block is given back to the free lists.
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

// SAFETY: an unsampled request is forwarded to the inner allocator unchanged and its result
// returned unchanged. A sampled block is allocated from the inner allocator with the
// caller's size and a stricter alignment (`sampled_layout`), which still satisfies the
// caller's layout; it is tracked in the live set from before it is returned until its
// free or reallocation, which find it there and pass the inner allocator the layout it was
// allocated with. A block is tracked iff it was allocated with the sampled layout: every
// path that cannot track such a block moves it to an ordinary one before returning it
// (`track`). Contents are preserved wherever a block moves (`move_block`).
unsafe impl<A: GlobalAlloc> GlobalAlloc for Profiler<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // The countdown runs before the request, so that a sampled block can be asked for
        // with its own layout; a failure takes the count back.
        if thread::on_alloc(layout.size()) {
            // SAFETY: the caller upholds alloc's contract.
            return unsafe { alloc_slow(&self.inner, layout, Fill::Uninit) };
        }
        // SAFETY: forwarded with the caller's layout (the caller upholds alloc's contract).
        let ptr = unsafe { self.inner.alloc(layout) };
        if ptr.is_null() {
            thread::undo_alloc(layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if thread::on_alloc(layout.size()) {
            // SAFETY: as for `alloc`.
            return unsafe { alloc_slow(&self.inner, layout, Fill::Zeroed) };
        }
        // SAFETY: as for `alloc`.
        let ptr = unsafe { self.inner.alloc_zeroed(layout) };
        if ptr.is_null() {
            thread::undo_alloc(layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Both tests run unconditionally (`|`, not `||`) so that the common case is one
        // predictable branch, and both outcomes end in a tail call: the fast path needs
        // no stack frame at all.
        if live::may_be_sampled(ptr as usize) | thread::on_free(layout.size()) {
            // SAFETY: the caller upholds dealloc's contract.
            return unsafe { dealloc_slow(&self.inner, ptr, layout) };
        }
        // SAFETY: forwarded unchanged; the caller upholds dealloc's contract.
        unsafe { self.inner.dealloc(ptr, layout) };
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // For sampling, a realloc is the free of the old block and the allocation of the
        // new one.
        let due = thread::on_alloc(new_size);
        if due || live::may_be_sampled(ptr as usize) {
            // SAFETY: the caller upholds realloc's contract.
            return unsafe { realloc_slow(&self.inner, ptr, layout, new_size, due) };
        }
        // Neither block is sampled: forwarded unchanged.
        // SAFETY: the caller upholds realloc's contract.
        let new = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if new.is_null() {
            thread::undo_alloc(new_size);
        } else if thread::on_free(layout.size()) {
            thread::free_event();
        }
        new
    }
}

/// What a new block must contain.
#[derive(Clone, Copy)]
enum Fill {
    /// Anything (`alloc`).
    Uninit,
    /// Zeros (`alloc_zeroed`).
    Zeroed,
}

/// The layout of a sampled block: the caller's size, aligned to at least
/// [`live::SAMPLED_ALIGN`]. `None` if no such layout exists (a size within 4 KiB of
/// `isize::MAX`, which no allocator grants); such a block is sampled untracked.
fn sampled_layout(layout: Layout) -> Option<Layout> {
    layout.align_to(live::SAMPLED_ALIGN).ok()
}

/// # Safety
///
/// `layout` has a non-zero size (or the inner allocator accepts zero-size layouts).
unsafe fn inner_alloc<A: GlobalAlloc>(inner: &A, layout: Layout, fill: Fill) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        match fill {
            Fill::Uninit => inner.alloc(layout),
            Fill::Zeroed => inner.alloc_zeroed(layout),
        }
    }
}

/// An allocation whose countdown ran out: flush, decide, and allocate the block (sampled
/// with its own layout, see [`sampled_alloc`]).
///
/// # Safety
///
/// As for [`GlobalAlloc::alloc`]; [`thread::on_alloc`] has counted this allocation.
#[cold]
#[inline(never)]
unsafe fn alloc_slow<A: GlobalAlloc>(inner: &A, layout: Layout, fill: Fill) -> *mut u8 {
    let size = layout.size();
    let marker = 0u8;
    let ptr = match thread::alloc_event(size) {
        // SAFETY: the caller's contract.
        Some(rate) => unsafe {
            sampled_alloc(
                inner,
                layout,
                fill,
                rate,
                std::ptr::addr_of!(marker) as usize,
            )
        },
        // SAFETY: the caller's contract.
        None => unsafe { inner_alloc(inner, layout, fill) },
    };
    if !ptr.is_null() {
        thread::count_alloc(size);
    }
    ptr
}

/// Allocates a sampled block of `layout` (filled as `fill`), records its sample and tracks
/// it. Returns null, having recorded nothing, if the inner allocator cannot provide it.
///
/// The block is asked for with the sampled layout, like any allocation of the program
/// (outside the reentrancy mark); the profiler's own work runs under the mark, in a
/// hidden region. If the inner allocator refuses the sampled layout (but not the
/// caller's own), or if the live set is full, the sample is recorded untracked in an
/// ordinary block: its allocation counts, its free will not be credited
/// (`Stats::untracked_samples`).
///
/// # Safety
///
/// As for [`GlobalAlloc::alloc`].
#[inline(never)]
unsafe fn sampled_alloc<A: GlobalAlloc>(
    inner: &A,
    layout: Layout,
    fill: Fill,
    rate: usize,
    marker: usize,
) -> *mut u8 {
    let size = layout.size();
    let big = sampled_layout(layout);
    let ptr = match big {
        // SAFETY: the sampled layout has the caller's (non-zero) size.
        Some(big) => unsafe { inner_alloc(inner, big, fill) },
        None => std::ptr::null_mut(),
    };
    // `alloc_event` sampled only an unmarked thread, so the mark is free.
    let Some(_mark) = ReentrancyGuard::enter() else {
        return match big {
            // SAFETY: `ptr` is a fresh block of `big`; no contents to keep.
            Some(big) if !ptr.is_null() => unsafe { move_block(inner, ptr, big, layout, 0, fill) },
            // SAFETY: the caller's contract.
            _ => unsafe { inner_alloc(inner, layout, fill) },
        };
    };
    let _hidden = thread::Region::hidden();
    let mut stack = StackBuf::new();
    if let (Some(big), false) = (big, ptr.is_null()) {
        live::prefetch(ptr as usize);
        let meta = record(&mut stack, size, rate, marker);
        // SAFETY: `ptr` is a fresh block of `big`, all of it ours; a replacement needs only
        // `fill`, no contents.
        return unsafe { track(inner, ptr, big, layout, meta, 0, fill) };
    }
    // SAFETY: the caller's contract.
    let ptr = unsafe { inner_alloc(inner, layout, fill) };
    if !ptr.is_null() {
        record(&mut stack, size, rate, marker);
        live::note_untracked();
    }
    ptr
}

/// Captures the stack and records one sampled allocation of `size` bytes in the table.
#[inline(never)]
fn record(stack: &mut StackBuf, size: usize, rate: usize, marker: usize) -> LiveMeta {
    unwind::capture(stack, marker);
    // Rounded to f32 here because the live set keeps it as an f32 (see `LiveMeta`): the
    // free of this object must take back exactly what its allocation added.
    let weight = sample_weight(size, rate) as f32;
    let id = TABLE.record_alloc(stack.as_slice(), size, f64::from(weight));
    LiveMeta {
        stack: id,
        weight,
        size: size as u64,
    }
}

/// Tracks `ptr`, a block of the sampled layout `big` whose first `keep` bytes matter,
/// and returns it; if the live set is full, moves it to a block of `plain` (the caller's
/// layout), untracked, and returns that. If that move finds no memory, `ptr` is tracked
/// beyond the live set's limits instead ([`live::insert_forced`]).
///
/// # Safety
///
/// `ptr` is a live block of `big` that nothing else refers to; `keep <= plain.size()`.
unsafe fn track<A: GlobalAlloc>(
    inner: &A,
    ptr: *mut u8,
    big: Layout,
    plain: Layout,
    meta: LiveMeta,
    keep: usize,
    fill: Fill,
) -> *mut u8 {
    if live::insert(ptr as usize, meta) {
        return ptr;
    }
    // SAFETY: `plain` is the caller's layout; `ptr` is ours to read and free.
    let moved = unsafe { move_block(inner, ptr, big, plain, keep, fill) };
    if !moved.is_null() {
        return moved;
    }
    // Out of memory with the live set full. `insert_forced` fails only if every slot of
    // the stripe is taken, which would need thousands of blocks tracked this way at once;
    // then the block goes back untracked, and its free passes the caller's layout (which
    // glibc's `free` ignores). That is the one way a sampled block can reach its free
    // unrecognised, and it is not known to be reachable.
    live::insert_forced(ptr as usize, meta);
    ptr
}

/// Allocates a block of `to` (filled as `fill`), copies the first `keep` bytes of `ptr`
/// into it and frees `ptr` (a block of `from`). Returns null, leaving `ptr` untouched, if
/// the inner allocator cannot provide the new block.
///
/// # Safety
///
/// `ptr` is a live block of `from`; `keep` is at most both sizes.
unsafe fn move_block<A: GlobalAlloc>(
    inner: &A,
    ptr: *mut u8,
    from: Layout,
    to: Layout,
    keep: usize,
    fill: Fill,
) -> *mut u8 {
    // SAFETY: `to` has a non-zero size whenever `from` had (both are a caller's sizes).
    let new = unsafe { inner_alloc(inner, to, fill) };
    if !new.is_null() {
        // SAFETY: both blocks are live, distinct and at least `keep` bytes long.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr, new, keep);
            inner.dealloc(ptr, from);
        }
    }
    new
}

/// A free that may be of a sampled object (its pointer is 4 KiB-aligned), or that ran out
/// the thread's free countdown.
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
    // Here also when only the free countdown ran out: test the pointer again rather than
    // probe the table (a cache miss) for every such free.
    let mut layout = layout;
    if live::contains(ptr as usize) {
        if let Some(meta) = live::remove(ptr as usize) {
            TABLE.record_free(meta.stack, meta.size as usize, f64::from(meta.weight));
            // A tracked block was allocated with the sampled layout (which exists).
            layout = sampled_layout(layout).unwrap_or(layout);
        }
    }
    if thread::free_due() {
        thread::free_event();
    }
    // SAFETY: the layout the block was allocated with; the caller upholds dealloc's
    // contract.
    unsafe { inner.dealloc(ptr, layout) };
}

/// A realloc whose new block's countdown ran out (`due`: [`thread::on_alloc`] counted it)
/// or whose old block may be sampled.
///
/// The old block's record is taken out first (see [`dealloc_slow`]) and put back if the
/// inner allocator fails, in which case the old block is untouched and still live. When
/// both blocks have the same kind of layout (both sampled, or both ordinary) the inner
/// allocator's `realloc` does the work with the old block's layout, and keeps its
/// alignment; otherwise the block is moved.
///
/// # Safety
///
/// As for [`GlobalAlloc::realloc`].
#[cold]
#[inline(never)]
unsafe fn realloc_slow<A: GlobalAlloc>(
    inner: &A,
    ptr: *mut u8,
    layout: Layout,
    new_size: usize,
    due: bool,
) -> *mut u8 {
    let marker = 0u8;
    let rate = if due {
        thread::alloc_event(new_size)
    } else {
        None
    };
    let old = if live::contains(ptr as usize) {
        live::remove(ptr as usize)
    } else {
        None
    };
    // The old block's layout as the inner allocator knows it.
    let old_layout = match old {
        Some(_) => sampled_layout(layout).unwrap_or(layout),
        None => layout,
    };
    // SAFETY: the caller guarantees (realloc's contract) that `new_size`, rounded up to
    // `layout.align()`, does not overflow `isize`; the alignment is the block's own.
    let new_plain = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
    let new_big = rate.and_then(|_| sampled_layout(new_plain));
    let keep = layout.size().min(new_size);
    let new = match (old.is_some(), new_big) {
        // SAFETY: the block's own layout; the caller's contract for the rest.
        (true, Some(_)) | (false, None) => unsafe { inner.realloc(ptr, old_layout, new_size) },
        // SAFETY: `ptr` is a live block of `old_layout`; `keep` fits both blocks.
        (_, to) => unsafe {
            move_block(
                inner,
                ptr,
                old_layout,
                to.unwrap_or(new_plain),
                keep,
                Fill::Uninit,
            )
        },
    };
    if new.is_null() {
        if let Some(meta) = old {
            // The old block keeps its sampled layout, so it must stay recognisable.
            live::insert_forced(ptr as usize, meta);
        }
        if !due {
            thread::undo_alloc(new_size);
        }
        return new;
    }
    if let Some(meta) = old {
        TABLE.record_free(meta.stack, meta.size as usize, f64::from(meta.weight));
    }
    let new = match (rate, new_big) {
        (Some(rate), Some(big)) => match ReentrancyGuard::enter() {
            Some(_mark) => {
                let _hidden = thread::Region::hidden();
                let mut stack = StackBuf::new();
                live::prefetch(new as usize);
                let meta = record(
                    &mut stack,
                    new_size,
                    rate,
                    std::ptr::addr_of!(marker) as usize,
                );
                // SAFETY: `new` is a fresh block of `big` whose first `new_size` bytes
                // matter.
                unsafe { track(inner, new, big, new_plain, meta, new_size, Fill::Uninit) }
            }
            // `alloc_event` sampled only an unmarked thread: not reached. An untracked
            // block should not keep the sampled layout (the last resort as in `track`).
            None => {
                // SAFETY: `new` is a live block of `big`; its `new_size` bytes are kept.
                let moved =
                    unsafe { move_block(inner, new, big, new_plain, new_size, Fill::Uninit) };
                if moved.is_null() {
                    new
                } else {
                    moved
                }
            }
        },
        _ => new,
    };
    if due {
        thread::count_alloc(new_size);
    }
    if thread::on_free(layout.size()) {
        thread::free_event();
    }
    new
}
