//! [`Profiler`]: the `GlobalAlloc` wrapper.

use crate::guard::ReentrancyGuard;
use crate::live::{self, LiveMeta};
use crate::sampler::sample_weight;
use crate::stack::StackBuf;
use crate::table::{StackId, TABLE};
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
/// increment and a branch; a free also tests its pointer's address class and its
/// alignment, with no memory access (see `place`). About 1 ns per allocation and free
/// together (criterion, `benches/`). Sampled allocations (one per [`crate::sample_rate`]
/// bytes on average) capture the stack and update the table: about 0.2 µs at a stack
/// depth of 30. A sampled block is asked of `A` 1 KiB larger (see `place`).
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

// SAFETY: the wrapper observes, and changes the inner allocator's requests in one way
// only: a sampled block with an alignment of at most 16 is asked for [`PAD`] bytes larger
// and handed out at an offset inside it (see [`place`]). Such a block is tracked in the
// live set with its offset until it is freed or reallocated, and every free or realloc of
// a tracked pointer gives the inner allocator back the pointer and layout it returned.
// Every other request is forwarded unchanged, and its result returned unchanged. So the
// inner allocator sees every block freed with its own layout, and the caller gets blocks of
// the size and alignment it asked for.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Profiler<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // Counted before the inner call (a sampled block must be asked for larger), and
        // taken back if the inner allocator fails.
        if thread::on_alloc(layout.size()) {
            // SAFETY: as for `alloc` (the caller upholds its contract).
            return unsafe { alloc_slow(&self.inner, layout, Zeroed::No) };
        }
        // SAFETY: forwarded with the caller's layout (the caller upholds alloc's contract).
        let ptr = unsafe { self.inner.alloc(layout) };
        if ptr.is_null() {
            thread::uncount_alloc(layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if thread::on_alloc(layout.size()) {
            // SAFETY: as for `alloc`.
            return unsafe { alloc_slow(&self.inner, layout, Zeroed::Yes) };
        }
        // SAFETY: as for `alloc`.
        let ptr = unsafe { self.inner.alloc_zeroed(layout) };
        if ptr.is_null() {
            thread::uncount_alloc(layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // A tracked pointer is either placed (its address in the class [`place::marked`]
        // tests) or a block that is never placed (large, or more aligned than 16);
        // everything else is certainly not tracked, told from the pointer and layout
        // alone, with no memory read: four compares, each branch almost never taken, and
        // both outcomes end in a tail call, so the fast path needs no stack frame.
        if place::marked(ptr as usize)
            | place::never_placed(layout)
            | thread::on_free(layout.size())
        {
            // SAFETY: forwarded unchanged.
            return unsafe { dealloc_slow(&self.inner, ptr, layout) };
        }
        // SAFETY: forwarded unchanged; the caller upholds dealloc's contract.
        unsafe { self.inner.dealloc(ptr, layout) };
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds realloc's contract.
        unsafe { realloc_slow(&self.inner, ptr, layout, new_size) }
    }
}

/// Where sampled blocks sit inside what the inner allocator returned.
///
/// A free must tell whether its pointer is a sampled object, and almost never is. Testing
/// the live set's filter for that costs a hash and a load on every free (in churn the
/// load missed L1 on most frees); with the test below instead, small strings ran 1.7
/// points faster with sampling off (`benches/runs/2026-12-02-0717-free-without-filter.txt`,
/// a scratch build). So a sampled block smaller than [`MAX_SIZE`] whose alignment is at
/// most 16 is asked of the inner allocator `PAD` bytes larger, and handed out at the
/// address in it that is [`MARK`] modulo `PAD`. Only pointers of that class (one
/// 16-aligned address in 64), and blocks that are never placed (tracked where they lie),
/// go on to the live set; the rest are answered from the pointer and layout alone.
///
/// Large blocks are not placed: their frees are few and dear anyway, so the live set's
/// test costs them little, and placing them cost large buffers about 4 points (their
/// pages faulted and the program's writes ran slower; `benches/runs/2026-12-02-0815-placed.txt`).
/// A vector that grows past `MAX_SIZE` is then resized by the inner allocator where it lies
/// (`mremap` for glibc's largest blocks).
///
/// The price is at most `PAD` bytes a live sampled object (one per [`crate::sample_rate`]
/// bytes of the live heap, so at most about 0.2% of it at the default rate), reported in
/// `Stats::profiler_bytes`, and a copy (of less than `MAX_SIZE`) where a realloc moves a
/// block into or out of its padding.
pub(crate) mod place {
    use std::alloc::Layout;

    /// The padding a placed block is asked for with, and the modulus of its class.
    pub(crate) const PAD: usize = 1024;
    /// The residue modulo [`PAD`] of every placed address: 16-aligned, and clear of the
    /// residue 0 that page- and size-aligned blocks of other allocators share.
    pub(crate) const MARK: usize = PAD - 16;
    /// The largest alignment a placed address satisfies.
    pub(crate) const MAX_ALIGN: usize = 16;
    /// Blocks of this size or more are never placed.
    pub(crate) const MAX_SIZE: usize = 64 * 1024;
    const _: () = assert!(MAX_SIZE.is_power_of_two() && MAX_ALIGN.is_power_of_two());

    /// Whether `ptr` is in the placed class. No memory access.
    #[inline(always)]
    pub(crate) fn marked(ptr: usize) -> bool {
        ptr % PAD == MARK
    }

    /// Whether blocks of `layout` are never placed (too aligned, or large), so that a
    /// sampled one is tracked where it lies and every free of one asks the live set.
    ///
    /// Written as one test of two shifted words (the constants are powers of two): as two
    /// compares, LLVM gave the free two more branches, and small strings ran 2 points
    /// slower (`benches/runs/2026-12-02-0815-placed.txt`).
    #[inline(always)]
    pub(crate) fn never_placed(layout: Layout) -> bool {
        ((layout.size() / MAX_SIZE) | (layout.align() / (2 * MAX_ALIGN))) != 0
    }

    /// The layout to ask the inner allocator for, for a sampled `layout`; `None` if the
    /// block is never placed.
    pub(crate) fn padded(layout: Layout) -> Option<Layout> {
        if never_placed(layout) {
            return None;
        }
        Layout::from_size_align(layout.size() + PAD, layout.align()).ok()
    }

    /// The offset in a padded block starting at `base` of its placed address: less than
    /// [`PAD`], so the caller's `size` bytes fit after it.
    #[inline]
    pub(crate) fn offset(base: usize) -> usize {
        MARK.wrapping_sub(base) % PAD
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_base_gets_a_marked_aligned_address_inside_its_padding() {
            for base in (0x7f00_0000_0000usize..0x7f00_0000_0000 + 3 * PAD).step_by(1) {
                let off = offset(base);
                assert!(off < PAD);
                let ptr = base + off;
                assert!(marked(ptr), "{base:#x}");
                assert_eq!(ptr % MAX_ALIGN, 0);
            }
            // One 16-aligned address in 64 is in the class.
            let hits = (0..64 * PAD).step_by(16).filter(|&p| marked(p)).count();
            assert_eq!(hits, 64);
        }

        #[test]
        fn only_small_blocks_with_small_alignments_are_padded() {
            let layout = |size, align| Layout::from_size_align(size, align).unwrap();
            assert_eq!(padded(layout(100, 16)).map(|p| p.size()), Some(100 + PAD));
            assert_eq!(
                padded(layout(MAX_SIZE - 1, 1)).map(|p| p.size()),
                Some(MAX_SIZE - 1 + PAD)
            );
            for l in [
                layout(100, 32),
                layout(MAX_SIZE, 8),
                layout(isize::MAX as usize - 8, 8),
            ] {
                assert!(padded(l).is_none() && never_placed(l), "{l:?}");
            }
        }
    }
}

/// Whether a block is to be zeroed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zeroed {
    No,
    Yes,
}

/// Asks `inner` for `layout`.
///
/// # Safety
///
/// `layout` has a non-zero size.
#[inline]
unsafe fn inner_alloc<A: GlobalAlloc>(inner: &A, layout: Layout, zeroed: Zeroed) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        match zeroed {
            Zeroed::No => inner.alloc(layout),
            Zeroed::Yes => inner.alloc_zeroed(layout),
        }
    }
}

/// The padded block the inner allocator returned for a placed pointer, and its layout;
/// `None` if the pointer is not placed (its block is itself, with the caller's layout).
fn placed_block(
    ptr: *mut u8,
    layout: Layout,
    meta: Option<&LiveMeta>,
) -> Option<(*mut u8, Layout)> {
    let off = meta?.offset()?;
    let padded = place::padded(layout)?;
    Some((ptr.wrapping_sub(off), padded))
}

/// Where a free or realloc must hand a (possibly tracked) pointer back to the inner
/// allocator: its padded block if it is placed, else itself.
fn block_of(ptr: *mut u8, layout: Layout, meta: Option<&LiveMeta>) -> (*mut u8, Layout) {
    placed_block(ptr, layout, meta).unwrap_or((ptr, layout))
}

/// The allocation side's slow path: the allocation of `layout` ran out the thread's
/// countdown (and is counted). Takes the event, and samples the block if a sample point
/// fell inside it. Returns the block, or null (counting nothing) if the inner allocator
/// fails.
///
/// # Safety
///
/// As for [`GlobalAlloc::alloc`] on `inner`.
#[cold]
#[inline(never)]
unsafe fn alloc_slow<A: GlobalAlloc>(inner: &A, layout: Layout, zeroed: Zeroed) -> *mut u8 {
    let marker = 0u8;
    let ptr = match thread::alloc_event(layout.size()) {
        // SAFETY: the caller's contract.
        Some(rate) => unsafe { alloc_sampled(inner, layout, zeroed, rate, addr_of(&marker)) },
        // SAFETY: the caller's contract.
        None => unsafe { inner_alloc(inner, layout, zeroed) },
    };
    if ptr.is_null() {
        thread::uncount_alloc(layout.size());
    }
    ptr
}

/// The address of the slow path's marker: frames below it are the profiler's own.
fn addr_of(marker: &u8) -> usize {
    std::ptr::addr_of!(*marker) as usize
}

/// Allocates a sampled block and records it: placed in a padded block when its alignment
/// allows, else where the inner allocator puts it. Null if the inner allocator fails, and
/// then nothing is recorded.
///
/// The inner allocator is called as for an unsampled block, without the reentrancy mark;
/// only the recording runs under it (see [`record`]).
///
/// # Safety
///
/// As for [`GlobalAlloc::alloc`] on `inner`.
unsafe fn alloc_sampled<A: GlobalAlloc>(
    inner: &A,
    layout: Layout,
    zeroed: Zeroed,
    rate: usize,
    marker: usize,
) -> *mut u8 {
    let size = layout.size();
    if let Some(padded) = place::padded(layout) {
        // SAFETY: `padded` is larger than the caller's non-zero size.
        let base = unsafe { inner_alloc(inner, padded, zeroed) };
        if !base.is_null() {
            let off = place::offset(base as usize);
            // SAFETY: `off < PAD`, so `base + off .. + size` lies inside the padded block.
            let ptr = unsafe { base.add(off) };
            let recorded = record(ptr, size, rate, marker, Track::Placed(off));
            if recorded.is_some_and(|r| r.tracked) {
                return ptr;
            }
            // The live set is full: a placed block must be tracked, so hand out a block
            // where the inner allocator puts it instead (its free then goes uncredited,
            // as `Stats::untracked_samples` counts).
            // SAFETY: returned above by `inner` with `padded`, never handed out.
            unsafe { inner.dealloc(base, padded) };
            // SAFETY: the caller's contract.
            let plain = unsafe { inner_alloc(inner, layout, zeroed) };
            if plain.is_null() {
                cancel(recorded, size);
            }
            return plain;
        }
        // The padded block failed, perhaps not the caller's: the sample goes untracked.
    }
    // SAFETY: the caller's contract.
    let ptr = unsafe { inner_alloc(inner, layout, zeroed) };
    if !ptr.is_null() {
        record(ptr, size, rate, marker, Track::Unplaced(layout));
    }
    ptr
}

/// What [`record`] did.
#[derive(Clone, Copy)]
struct Recorded {
    stack: StackId,
    weight: f32,
    /// In the live set; otherwise counted in `Stats::untracked_samples`.
    tracked: bool,
}

/// Where a sampled block is, for the live set.
#[derive(Clone, Copy)]
enum Track {
    /// Placed at this offset in its padded block.
    Placed(usize),
    /// Its own block, with this layout.
    Unplaced(Layout),
}

/// Records the sampled block `ptr` of `size` bytes under the reentrancy mark and in a
/// hidden region: in the stack table, and in the live set if it can be tracked. A placed
/// block can; an unplaced one only if its layout is never placed, since only those two
/// kinds of free reach the live set (see `dealloc`). `None` if the thread is already
/// marked (then nothing is recorded).
fn record(ptr: *mut u8, size: usize, rate: usize, marker: usize, track: Track) -> Option<Recorded> {
    let _mark = ReentrancyGuard::enter()?;
    let _hidden = thread::Region::hidden();
    let (stack, weight) = sample(ptr as usize, size, rate, marker);
    let offset = match track {
        Track::Placed(off) => Some(Some(off)),
        Track::Unplaced(layout) => place::never_placed(layout).then_some(None),
    };
    let tracked = match offset {
        Some(offset) => live::insert(ptr as usize, LiveMeta::new(stack, weight, offset)),
        None => {
            live::count_untracked();
            false
        }
    };
    Some(Recorded {
        stack,
        weight,
        tracked,
    })
}

/// Takes back a recorded sample whose allocation then failed.
fn cancel(recorded: Option<Recorded>, size: usize) {
    if let Some(r) = recorded {
        if !r.tracked {
            live::forget_untracked();
        }
        TABLE.cancel_alloc(r.stack, size, f64::from(r.weight));
    }
}

/// Records one sampled allocation in the stack table and returns its stack and weight.
/// Runs with the reentrancy mark set; the stack buffer is on this frame, so nothing here
/// allocates except the table's growth (allowed under the mark).
#[inline(never)]
fn sample(ptr: usize, size: usize, rate: usize, marker: usize) -> (StackId, f32) {
    live::prefetch(ptr);
    let mut stack = StackBuf::new();
    unwind::capture(&mut stack, marker);
    // Rounded to f32 here because the live set keeps it as an f32 (see `LiveMeta`): the
    // free of this object must take back exactly what its allocation added.
    let weight = sample_weight(size, rate) as f32;
    let id = TABLE.record_alloc(stack.as_slice(), size, f64::from(weight));
    (id, weight)
}

/// A free that may be of a sampled object (a placed address, or a large alignment), or
/// that ran out the thread's free countdown.
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
    // Here also when only the free countdown ran out: test the filter rather than probe
    // the table (a cache miss) for every such free.
    let mut block = (ptr, layout);
    if live::contains(ptr as usize) {
        if let Some(meta) = live::remove(ptr as usize) {
            TABLE.record_free(meta.stack, layout.size(), f64::from(meta.weight));
            block = block_of(ptr, layout, Some(&meta));
        }
    }
    if thread::free_due() {
        thread::free_event();
    }
    // SAFETY: the block `inner` returned, with its layout (see `block_of`); the caller
    // upholds dealloc's contract.
    unsafe { inner.dealloc(block.0, block.1) };
}

/// A realloc: for sampling, the free of the old block and the allocation of the new one.
///
/// The old block's record is taken out before the old block goes back to the inner
/// allocator (see `dealloc_slow`): first, if the inner allocator frees the old block
/// itself (a resize in place), and then put back if it fails, in which case the old block
/// is untouched and still live; just before the old block is freed, if it is placed.
/// Then a failure leaves a placed block's record where it was: a placed block must stay
/// tracked, and putting a record back can find the live set full. A block that is
/// placed, or is to be, is not resized by the inner allocator: the new block is
/// allocated, the contents copied, and the old one freed.
///
/// # Safety
///
/// As for [`GlobalAlloc::realloc`] on `inner`.
#[inline(never)]
unsafe fn realloc_slow<A: GlobalAlloc>(
    inner: &A,
    ptr: *mut u8,
    layout: Layout,
    new_size: usize,
) -> *mut u8 {
    let marker = 0u8;
    let old = if live::contains(ptr as usize) {
        live::remove_unless_placed(ptr as usize)
    } else {
        None
    };
    // SAFETY: the caller guarantees that `new_size`, rounded up to the alignment, does not
    // overflow `isize`.
    let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
    let rate = if thread::on_alloc(new_size) {
        thread::alloc_event(new_size)
    } else {
        None
    };
    // SAFETY: the caller's contract.
    let new = unsafe {
        match rate {
            Some(rate) => {
                let sampled = Sampled {
                    rate,
                    marker: addr_of(&marker),
                };
                realloc_sampled(inner, ptr, layout, old.as_ref(), new_layout, sampled)
            }
            None => realloc_plain(inner, ptr, layout, old.as_ref(), new_layout),
        }
    };
    if new.is_null() {
        thread::uncount_alloc(new_size);
        if let Some(meta) = old.filter(|m| m.offset().is_none()) {
            live::insert(ptr as usize, meta);
        }
        return new;
    }
    if let Some(meta) = old {
        TABLE.record_free(meta.stack, layout.size(), f64::from(meta.weight));
    }
    if thread::on_free(layout.size()) {
        thread::free_event();
    }
    new
}

/// A sample to take: its rate, and the marker below which frames are the profiler's.
#[derive(Clone, Copy)]
struct Sampled {
    rate: usize,
    marker: usize,
}

/// Moves the old block (`ptr`, `layout`, and its record `old` if it was tracked) into a
/// new unsampled block of `new_layout`. Null, with the old block untouched, if the inner
/// allocator fails.
///
/// # Safety
///
/// As for [`GlobalAlloc::realloc`] on `inner`.
unsafe fn realloc_plain<A: GlobalAlloc>(
    inner: &A,
    ptr: *mut u8,
    layout: Layout,
    old: Option<&LiveMeta>,
    new_layout: Layout,
) -> *mut u8 {
    match placed_block(ptr, layout, old) {
        // SAFETY: the caller's contract (a realloc's new size is not zero); the contents
        // are `ptr .. + layout.size()`, inside the padded block `base`.
        Some((base, padded)) => unsafe {
            let len = layout.size().min(new_layout.size());
            move_block(inner, ptr, len, base, padded, new_layout, Zeroed::No)
        },
        // The old block is the inner allocator's own: resize it there.
        // SAFETY: the caller's contract.
        None => unsafe { inner.realloc(ptr, layout, new_layout.size()) },
    }
}

/// Stops tracking the placed block `ptr` of a realloc, just before its padded block goes
/// back to the inner allocator (see `realloc_slow`).
fn forget_placed(ptr: *mut u8) {
    live::remove(ptr as usize);
}

/// Allocates `new_layout` from `inner`, copies `len` bytes from `from` into it, stops
/// tracking the placed block `from`, and frees its padded block `base` (with
/// `inner_layout`). Null, freeing nothing, if the inner allocator fails.
///
/// # Safety
///
/// `from` is a placed block, and `from .. from + len` lies inside its padded block `base`,
/// which `inner` returned for `inner_layout`; `new_layout` has a non-zero size not smaller
/// than `len`.
unsafe fn move_block<A: GlobalAlloc>(
    inner: &A,
    from: *mut u8,
    len: usize,
    base: *mut u8,
    inner_layout: Layout,
    new_layout: Layout,
    zeroed: Zeroed,
) -> *mut u8 {
    // SAFETY: the caller's contract.
    let new = unsafe { inner_alloc(inner, new_layout, zeroed) };
    if !new.is_null() {
        // SAFETY: both ranges are inside live blocks (the caller's contract), and the new
        // block was not handed out, so they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(from, new, len);
            forget_placed(from);
            inner.dealloc(base, inner_layout);
        }
    }
    new
}

/// Moves the old block into a new sampled one of `new_layout` and records it. Null, with
/// the old block untouched and nothing recorded, if the inner allocator fails.
///
/// A placed new block is allocated, recorded and tracked before the old block is touched:
/// if the live set is full, the old block is still there to be resized where it lies.
///
/// # Safety
///
/// As for [`GlobalAlloc::realloc`] on `inner`.
unsafe fn realloc_sampled<A: GlobalAlloc>(
    inner: &A,
    ptr: *mut u8,
    layout: Layout,
    old: Option<&LiveMeta>,
    new_layout: Layout,
    sampled: Sampled,
) -> *mut u8 {
    let Sampled { rate, marker } = sampled;
    let size = new_layout.size();
    if let Some(padded) = place::padded(new_layout) {
        // SAFETY: `padded` is larger than the non-zero new size.
        let new_base = unsafe { inner.alloc(padded) };
        if !new_base.is_null() {
            let off = place::offset(new_base as usize);
            // SAFETY: `off < PAD`, inside the padded block.
            let new = unsafe { new_base.add(off) };
            let recorded = record(new, size, rate, marker, Track::Placed(off));
            if recorded.is_some_and(|r| r.tracked) {
                let (base, inner_layout) = block_of(ptr, layout, old);
                // SAFETY: the old contents are `ptr .. + layout.size()`, inside the old
                // block `base`; the new block holds `size` bytes at `new` and was never
                // handed out, so the two do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(size));
                    if old.is_some_and(|m| m.offset().is_some()) {
                        forget_placed(ptr);
                    }
                    inner.dealloc(base, inner_layout);
                }
                return new;
            }
            // The live set is full: the sample goes untracked, the block where the inner
            // allocator puts it.
            // SAFETY: returned above by `inner` with `padded`, never handed out.
            unsafe { inner.dealloc(new_base, padded) };
            // SAFETY: the caller's contract.
            let new = unsafe { realloc_plain(inner, ptr, layout, old, new_layout) };
            if new.is_null() {
                cancel(recorded, size);
            }
            return new;
        }
    }
    // Never placed (large, or more aligned than 16), or the padded block failed: resized
    // where the inner allocator puts it.
    // SAFETY: the caller's contract.
    let new = unsafe { realloc_plain(inner, ptr, layout, old, new_layout) };
    if !new.is_null() {
        record(new, size, rate, marker, Track::Unplaced(new_layout));
    }
    new
}
