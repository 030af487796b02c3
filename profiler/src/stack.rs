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

    /// Appends a return address; returns `false`, pushing nothing, if the buffer is full.
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
    /// Appends a return address; returns `false`, pushing nothing, if the buffer is full.
    ///
    /// One bounds check a frame: a walker learns that the buffer is full on the frame
    /// after the last one it could keep, having read that frame's record for nothing.
    #[inline(always)]
    pub(crate) fn push(&mut self, addr: usize) -> bool {
        match self.buf.frames.get_mut(self.n) {
            Some(slot) => {
                slot.write(addr);
                self.n += 1;
                true
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

/// A hash of the words of a stack, mixed at the end. Used to pick a shard and as the
/// table's hash; no allocation.
///
/// Two independent multiply chains take alternate frames, so each frame costs a load, an
/// xor and a multiply, and the two chains' multiplies overlap. A chain alone moves an
/// input bit only upwards; the final mix folds the high half into the low one, where the
/// table takes its index. (Equal stacks are still found by comparing frames: the hash
/// only has to spread.)
pub(crate) fn hash_stack(frames: &[usize]) -> u64 {
    const K0: u64 = 0x9E37_79B9_7F4A_7C15;
    const K1: u64 = 0xBF58_476D_1CE4_E5B9;
    let mut a = frames.len() as u64;
    let mut b = 0x94D0_49BB_1331_11EB;
    let mut pairs = frames.chunks_exact(2);
    for p in &mut pairs {
        a = (a ^ p[0] as u64).wrapping_mul(K0);
        b = (b ^ p[1] as u64).wrapping_mul(K1);
    }
    if let [last] = pairs.remainder() {
        a = (a ^ *last as u64).wrapping_mul(K0);
    }
    let mut h = a ^ b.rotate_left(29);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::hash_stack;

    #[test]
    fn stack_hashes_spread_over_the_low_bits() {
        // Stacks that differ in one frame, by one bit anywhere in it (return addresses in
        // different objects differ in high bits only): the low 16 bits, where the table
        // takes its shard and index, change for every one of them.
        let base: Vec<usize> = (0..35).map(|i| 0x5555_0000_1000 + 0x40 * i).collect();
        let h0 = hash_stack(&base);
        for frame in [0, 1, 17, 34] {
            for bit in 0..64 {
                let mut s = base.clone();
                s[frame] ^= 1 << bit;
                assert_ne!(
                    hash_stack(&s) & 0xffff,
                    h0 & 0xffff,
                    "frame {frame} bit {bit}"
                );
            }
        }
        // 64k stacks that differ in their leaf's low bits (call sites of one function)
        // fill 4096 buckets evenly: Poisson(16) puts the fullest of them below 40.
        let mut buckets = vec![0u32; 4096];
        for leaf in 0..65536usize {
            let mut s = base.clone();
            s[0] = 0x5555_0000_0000 + leaf * 5;
            buckets[(hash_stack(&s) & 4095) as usize] += 1;
        }
        let max = *buckets.iter().max().unwrap();
        assert!(max < 40, "fullest bucket {max}");
        // Order matters, and so does length.
        assert_ne!(hash_stack(&[1, 2]), hash_stack(&[2, 1]));
        assert_ne!(hash_stack(&[1, 2]), hash_stack(&[1, 2, 0]));
    }
}
