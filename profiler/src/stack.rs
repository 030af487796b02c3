//! Addresses and captured stacks.
//!
//! A captured stack holds *return addresses*: for every caller frame, the address the
//! callee returns to, which is the instruction after the call. Symbolizing that address
//! would name the line after the call (or even the next function), so lookups use the
//! address one byte before it, which lies inside the call instruction. The two are
//! separate types and [`ReturnAddress::lookup`] is the one place the −1 happens.

use std::mem::MaybeUninit;

/// Deepest stack kept. Deeper stacks keep their innermost `MAX_DEPTH` frames.
///
/// 128 (not 32) so that Pyroscope's truncation heuristic, which triggers on stacks of
/// 28–32 frames, does not fire on ordinary deep stacks.
pub const MAX_DEPTH: usize = 128;

/// A return address as found on the stack (the instruction after a call).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct ReturnAddress(pub usize);

/// An address inside the call instruction: what symbolization and pprof's
/// `Location.address` use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LookupAddress(pub usize);

impl ReturnAddress {
    /// The address to symbolize: one byte before the return address.
    #[inline]
    pub fn lookup(self) -> LookupAddress {
        LookupAddress(self.0.saturating_sub(1))
    }
}

/// A fixed-capacity stack buffer filled on the sampled path without allocating. Its
/// 1 KiB of storage is left uninitialised until pushed to (zeroing it would cost every
/// sample as much as a dozen frames of unwinding).
pub(crate) struct StackBuf {
    frames: [MaybeUninit<usize>; MAX_DEPTH],
    /// `frames[..len]` are initialised.
    len: usize,
}

impl StackBuf {
    pub(crate) const fn new() -> Self {
        StackBuf {
            frames: [const { MaybeUninit::uninit() }; MAX_DEPTH],
            len: 0,
        }
    }

    /// Appends a return address; returns `false` once the buffer is full.
    #[inline]
    pub(crate) fn push(&mut self, addr: usize) -> bool {
        self.writer().push(addr)
    }

    /// A writer over the free part of the buffer, for a walker's inner loop: it keeps its
    /// count in a register where `push` would load and store `len` for every frame. The
    /// frames written become part of the stack when the writer is dropped.
    #[inline]
    pub(crate) fn writer(&mut self) -> StackWriter<'_> {
        let start = self.len;
        StackWriter {
            buf: self,
            n: start,
        }
    }

    /// The captured return addresses, innermost (leaf) first.
    pub(crate) fn as_slice(&self) -> &[usize] {
        // SAFETY: `frames[..len]` were written by a `StackWriter` (the invariant of `len`), and
        // `MaybeUninit<usize>` has the layout of `usize`.
        unsafe { std::slice::from_raw_parts(self.frames.as_ptr().cast::<usize>(), self.len) }
    }
}

/// See [`StackBuf::writer`].
pub(crate) struct StackWriter<'a> {
    buf: &'a mut StackBuf,
    /// Frames initialised so far, counting those before the writer.
    n: usize,
}

impl StackWriter<'_> {
    /// Appends a return address; returns `false` once the buffer is full.
    #[inline(always)]
    pub(crate) fn push(&mut self, addr: usize) -> bool {
        match self.buf.frames.get_mut(self.n) {
            Some(slot) => {
                slot.write(addr);
                self.n += 1;
                self.n < MAX_DEPTH
            }
            None => false,
        }
    }
}

impl Drop for StackWriter<'_> {
    fn drop(&mut self) {
        // `frames[..n]` are initialised: those before the writer were, and it wrote the
        // rest in order.
        self.buf.len = self.n;
    }
}

/// FNV-1a-style hash over the words of a stack, mixed at the end. Used to pick a shard
/// and as the table's hash; no allocation.
pub(crate) fn hash_stack(frames: &[usize]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &f in frames {
        h ^= f as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
        h ^= h >> 29;
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}
