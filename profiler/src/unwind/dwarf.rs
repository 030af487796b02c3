//! The DWARF unwinder: `.eh_frame` call-frame information, reduced per return address to
//! a three-number rule and cached, so that a warm frame costs a cache probe, one bounds
//! check and one or two stack reads.
//!
//! libgcc's unwinder (the baseline) looks up the FDE of every frame, interprets its CFI
//! program and fills a full register context, every time: 4–8 µs per stack here. Almost
//! every frame of compiled code, however, unwinds by a rule of the form
//!
//! ```text
//! CFA = (rsp or rbp) + cfa_off;  return address = [CFA + ra_off];  rbp = [CFA + bp_off] or unchanged
//! ```
//!
//! and that rule depends only on the address. So the first time an address is seen its
//! FDE is found through `.eh_frame_hdr`'s binary-search table and its CFI program is run
//! up to the address by `gimli` (a few microseconds); the resulting [`Rule`] is stored in
//! a 2-way set-associative cache of [`SETS`] sets. Every later visit is a hash, a compare
//! and the reads above. Rules that do not have that form (a CFA computed by a DWARF
//! expression, a register saved in another register) are cached as "stop", and the walk
//! ends there, as it does at a read outside the stack.
//!
//! Code without an FDE (hand-written assembly without CFI) is unwound as if it kept frame
//! pointers (`CFA = rbp + 16`), which is right when it does, and is bounds-checked when it
//! does not.
//!
//! # Module list
//!
//! On first use (with the reentrancy mark set, so its allocations pass the sampler) the
//! loaded objects are enumerated with `dl_iterate_phdr`: for each, the executable
//! `PT_LOAD` range, `.eh_frame_hdr` (`PT_GNU_EH_FRAME`) and `.eh_frame` (found through the
//! header's `eh_frame_ptr`). The section data are borrowed in place from the loaded image
//! (`&'static [u8]`), nothing is copied. Objects loaded later with `dlopen` are not seen;
//! their frames are unwound by frame pointer, and a stack may end there.
//!
//! # Caches
//!
//! A rule cache (about 48 KiB, plus `gimli`'s context for running CFI programs) is mutable
//! state, so there are [`SLOTS`] of them, each behind a try-lock, created on first use.
//! Each thread is handed a slot to start at on its first capture, in turn, and takes the
//! first free one from there, so that up to [`SLOTS`] sampling threads keep a slot each.
//! (A pick from the stack address would put threads whose stacks lie a multiple of
//! 512 KiB apart, or reuse a joined thread's stack, at one slot, whose lock and caches
//! would then move between their cores.) No thread ever waits: if all are busy (or the
//! module list is still being built by another thread) the capture declines and the
//! caller falls back to the system unwinder.
//!
//! # Safety of the walk
//!
//! Every read is of an aligned word inside the live part of this thread's stack. Reads
//! relative to an rbp-based CFA go through [`StackBounds::read`], which checks each one.
//! An rsp-based rule is accepted only if it puts the return address (and the saved rbp)
//! inside its own frame, `[rsp, CFA)`, with a CFA a whole number of words above rsp
//! ([`Rule::sp`]); the walk keeps rsp aligned and inside the stack, so checking
//! `CFA <= hi` once covers both reads of such a frame. That is the common frame, and
//! the check is most of what a warm frame costs: this one check instead of four per
//! read took a frame from about 49 instructions to 29.
//!
//! The walk stops when the stack pointer does not strictly increase, a check fails, a
//! rule says "stop", or the return address is undefined (the root: `_start`, `clone3`).

use super::bounds::StackBounds;
use crate::stack::{ReturnAddress, StackBuf};
use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, EndianSlice, LittleEndian, ParsedEhFrameHdr,
    RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

type Slice = EndianSlice<'static, LittleEndian>;

/// One loaded object's unwind sections, as mapped (all addresses are run-time addresses).
struct Module {
    text: Range<usize>,
    bases: BaseAddresses,
    eh_frame: EhFrame<Slice>,
    hdr: ParsedEhFrameHdr<Slice>,
}

/// The loaded objects, built once.
struct Modules {
    list: Vec<Module>,
    /// Executable range of the main program: code compiled by rustc with the build's
    /// flags, so it keeps frame pointers iff this crate does.
    main_text: Range<usize>,
}

const UNINIT: u8 = 0;
const BUILDING: u8 = 1;
const READY: u8 = 2;

struct Global {
    state: AtomicU8,
    modules: UnsafeCell<MaybeUninit<Modules>>,
}

// SAFETY: `modules` is written once, by the thread that moved `state` from UNINIT to
// BUILDING, and published by the Release store of READY; it is read only after an Acquire
// load of READY and never written again. Its contents are only read through `&`.
unsafe impl Sync for Global {}

static GLOBAL: Global = Global {
    state: AtomicU8::new(UNINIT),
    modules: UnsafeCell::new(MaybeUninit::uninit()),
};

/// How to find the caller's registers from a frame's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Base {
    /// CFA = rsp + cfa_off, with the saved words inside the frame: only built by
    /// [`Rule::sp`], which checks that `cfa_off` is a positive multiple of the word and
    /// that the return address (and rbp, if saved) lie in `[rsp, CFA)`. The walk then
    /// needs one bounds check per frame, `CFA <= hi` (see `walk`).
    Sp,
    /// CFA = rbp + cfa_off. rbp can hold anything, so every read is checked.
    Bp,
    /// The return address is undefined: the root of the stack.
    Root,
    /// No rule of the supported form: the walk ends here.
    Stop,
}

/// The unwind rule of one address (see the module docs), eight bytes so that a cache
/// entry is sixteen. Saved registers sit at word-aligned offsets from the CFA, so those
/// offsets are kept in words; a rule whose offsets are not whole words cannot be followed
/// (its reads would be misaligned) and is a stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    /// CFA offset from the base register, in bytes.
    cfa_off: i32,
    /// Where the return address is saved, in words from the CFA.
    ra_words: i8,
    /// Where the caller's rbp is saved, in words from the CFA; 0: rbp is unchanged.
    bp_words: i8,
    base: Base,
}

impl Rule {
    const STOP: Rule = Rule {
        base: Base::Stop,
        cfa_off: 0,
        ra_words: 0,
        bp_words: 0,
    };

    const ROOT: Rule = Rule {
        base: Base::Root,
        ..Rule::STOP
    };

    /// What `push rbp; mov rbp, rsp` code unwinds by (the usual fallback for code without
    /// CFI).
    const FRAME_POINTER: Rule = Rule {
        base: Base::Bp,
        cfa_off: 16,
        ra_words: -1,
        bp_words: -2,
    };

    /// A CFA at `rsp + cfa_off` whose frame `[rsp, CFA)` holds the return address and the
    /// saved rbp (if `bp_words` is not 0), or [`Rule::STOP`]. Compilers save both inside
    /// the frame; a rule that says otherwise is not followed.
    fn sp(cfa_off: i32, ra_words: i8, bp_words: i8) -> Rule {
        const WORD: i32 = std::mem::size_of::<usize>() as i32;
        let inside = |w: i8| w < 0 && (w as i32) * WORD >= -cfa_off;
        if cfa_off > 0
            && cfa_off % WORD == 0
            && inside(ra_words)
            && (bp_words == 0 || inside(bp_words))
        {
            Rule {
                base: Base::Sp,
                cfa_off,
                ra_words,
                bp_words,
            }
        } else {
            Rule::STOP
        }
    }
}

const _: () = assert!(std::mem::size_of::<Rule>() == 8);

#[derive(Clone, Copy)]
struct Entry {
    /// The address the rule is for; 0 for an empty entry (no code lives at address 0).
    pc: usize,
    rule: Rule,
}

const EMPTY_ENTRY: Entry = Entry {
    pc: 0,
    rule: Rule::STOP,
};

/// Sets of the rule cache (two entries each).
const SETS: usize = 1024;

/// One slot's state: the rule cache and gimli's context for running CFI programs.
struct SlotState {
    /// The rules of the last walk that used this slot, by depth. A thread's stacks share
    /// their outer frames from one capture to the next, and a thread keeps its slot while
    /// it is not contended, so most frames find their rule here: a sequential read of a
    /// small array instead of a probe at a random place in the cache, which in a program
    /// that keeps the cache busy is a miss.
    by_depth: Box<[Entry; DEPTH_MEMO]>,
    entries: Box<[[Entry; 2]; SETS]>,
    ctx: UnwindContext<usize>,
}

/// Frames remembered by depth.
const DEPTH_MEMO: usize = crate::stack::MAX_DEPTH + 16;

impl SlotState {
    /// A new, empty state, built on the heap: built on the stack first (as `Box::new` of a
    /// literal is), its 48 KiB would also give every function it is inlined into a frame
    /// that large, probed page by page on each call. (The conversions to fixed-size boxes
    /// cannot fail, the lengths being right; `?` rather than `unwrap` keeps panics out of
    /// the allocator path.)
    #[cold]
    #[inline(never)]
    fn create() -> Option<Box<SlotState>> {
        Some(Box::new(SlotState {
            by_depth: vec![EMPTY_ENTRY; DEPTH_MEMO]
                .into_boxed_slice()
                .try_into()
                .ok()?,
            entries: vec![[EMPTY_ENTRY; 2]; SETS]
                .into_boxed_slice()
                .try_into()
                .ok()?,
            ctx: UnwindContext::new(),
        }))
    }
}

/// Puts the rule for `pc` into the depth memo's entry `e`: from the 2-way cache, or
/// derived from the CFI and cached. Out of line, so that the walk reads a rule's fields
/// from the entry whether or not it was just filled.
#[inline(never)]
fn fill(
    e: &mut Entry,
    entries: &mut [[Entry; 2]; SETS],
    ctx: &mut UnwindContext<usize>,
    modules: &Modules,
    pc: usize,
) {
    let set = &mut entries[set_index(pc)];
    if set[0].pc != pc {
        // The most recently used entry goes first.
        if set[1].pc == pc {
            set.swap(0, 1);
        } else {
            set[1] = set[0];
            set[0] = Entry {
                pc,
                rule: derive(modules, ctx, pc),
            };
        }
    }
    *e = set[0];
}

#[inline(always)]
fn set_index(pc: usize) -> usize {
    ((pc as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SETS.trailing_zeros())) as usize
}

/// Number of rule caches (concurrent captures served without falling back). Created on
/// first use, so an unused slot costs its 128-byte line.
const SLOTS: usize = 8;

/// On lines of its own: threads try-lock different slots at every capture, and slots that
/// shared a line passed it back and forth between their cores.
#[repr(align(128))]
struct Slot {
    busy: AtomicBool,
    state: UnsafeCell<Option<Box<SlotState>>>,
}

// SAFETY: `state` is only touched by the thread that holds `busy` (taken with an Acquire
// compare-exchange, released with a Release store), so accesses never overlap.
unsafe impl Sync for Slot {}

#[allow(clippy::declare_interior_mutable_const)] // used only as the array initialiser
const FREE_SLOT: Slot = Slot {
    busy: AtomicBool::new(false),
    state: UnsafeCell::new(None),
};
static CACHES: [Slot; SLOTS] = [FREE_SLOT; SLOTS];

/// Slots whose state has been created.
static CREATED: AtomicUsize = AtomicUsize::new(0);

/// Heap bytes of one slot: the cache itself and the row stack of gimli's unwind context
/// (`StoreOnHeap` boxes four rows).
const SLOT_BYTES: usize = std::mem::size_of::<SlotState>()
    + std::mem::size_of::<[Entry; DEPTH_MEMO]>()
    + std::mem::size_of::<[[Entry; 2]; SETS]>()
    + 4 * std::mem::size_of::<gimli::UnwindTableRow<usize>>();

/// In a child process after `fork`: only the forking thread survives, so slots that other
/// threads held at the fork, and a module list another thread was building, would stay
/// taken forever. Frees them (a half-built list is abandoned, never read).
///
/// Call only in the child, from the `pthread_atfork` child handler. Does not allocate.
pub(super) fn reset_after_fork_in_child() {
    for slot in &CACHES {
        slot.busy.store(false, Ordering::Release);
    }
    let _ = GLOBAL
        .state
        .compare_exchange(BUILDING, UNINIT, Ordering::AcqRel, Ordering::Relaxed);
}

/// Creates the state of every free slot (tests: so that later captures cannot allocate).
#[cfg(test)]
pub(super) fn warm_all_caches() {
    for slot in &CACHES {
        if slot
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            let mut guard = SlotGuard(slot);
            let _ = guard.state();
        }
    }
}

/// Heap memory held by the DWARF unwinder's caches (approximate; the module list adds a
/// few hundred bytes per loaded object and the section data are borrowed, not copied).
pub(super) fn memory_bytes() -> usize {
    CREATED.load(Ordering::Relaxed) * SLOT_BYTES
}

thread_local! {
    /// The slot this thread tries first, handed out in turn on its first capture.
    static FIRST_SLOT: std::cell::Cell<u8> = const { std::cell::Cell::new(NOT_HANDED_OUT) };
}
const NOT_HANDED_OUT: u8 = u8::MAX;
/// The next slot to hand out (modulo [`SLOTS`]).
static NEXT_FIRST_SLOT: AtomicUsize = AtomicUsize::new(0);

/// The slot this thread tries first (see [`FIRST_SLOT`]).
fn first_slot() -> usize {
    FIRST_SLOT
        .try_with(|first| {
            if first.get() == NOT_HANDED_OUT {
                first.set((NEXT_FIRST_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS) as u8);
            }
            first.get() as usize
        })
        // The thread's locals are being torn down: any slot will do.
        .unwrap_or(0)
}

/// A held slot; released on drop.
struct SlotGuard(&'static Slot);

impl SlotGuard {
    fn acquire() -> Option<SlotGuard> {
        let start = first_slot();
        (0..SLOTS).find_map(|i| {
            let slot = &CACHES[(start + i) % SLOTS];
            slot.busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
                // `then`, not `then_some`: a guard built eagerly for a slot we did not get
                // would release another thread's slot when dropped.
                .then(|| SlotGuard(slot))
        })
    }

    /// The slot's state, created on first use (allocates: called with the reentrancy mark
    /// set). Never `None` in fact (see [`SlotState::create`]).
    #[inline]
    fn state(&mut self) -> Option<&mut SlotState> {
        // SAFETY: this guard holds the slot's try-lock, so no other reference to the cell's
        // contents exists; the returned borrow ends before the guard releases the lock.
        let cell = unsafe { &mut *self.0.state.get() };
        if cell.is_none() {
            *cell = Some(SlotState::create()?);
            CREATED.fetch_add(1, Ordering::Relaxed);
        }
        cell.as_deref_mut()
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

/// The module list, building it on first use. `None` while another thread builds it or if
/// building failed.
fn modules() -> Option<&'static Modules> {
    match GLOBAL.state.load(Ordering::Acquire) {
        READY => {}
        UNINIT => {
            if GLOBAL
                .state
                .compare_exchange(UNINIT, BUILDING, Ordering::Acquire, Ordering::Acquire)
                .is_err()
            {
                return None;
            }
            let built = build_modules();
            // SAFETY: we moved the state to BUILDING, so no other thread reads or writes
            // the cell until we publish READY below.
            unsafe { (*GLOBAL.modules.get()).write(built) };
            GLOBAL.state.store(READY, Ordering::Release);
        }
        _ => return None,
    }
    // SAFETY: READY was observed (Acquire) or stored by this thread after the write; the
    // value is initialised and never written again.
    Some(unsafe { (*GLOBAL.modules.get()).assume_init_ref() })
}

/// The main program's code range (see [`Modules::main_text`]), once the module list is
/// built.
#[inline]
pub(super) fn main_text() -> Option<Range<usize>> {
    modules().map(|m| m.main_text.clone())
}

/// Reads the instruction, stack and frame pointers of the calling function.
#[inline(always)]
fn registers() -> (usize, usize, usize) {
    let ip: usize;
    let sp: usize;
    let bp: usize;
    // SAFETY: reads three registers (the instruction pointer through a RIP-relative lea)
    // into outputs; touches no memory and no flags.
    unsafe {
        std::arch::asm!(
            "lea {ip}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            ip = out(reg) ip,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nomem, nostack, preserves_flags)
        );
    }
    (ip, sp, bp)
}

/// Unwinds the calling thread's stack with DWARF CFI into `buf`, leaf first, keeping the
/// return addresses read from frames above `marker` (see `unwind/mod.rs`).
///
/// Returns `false`, having pushed nothing, if the unwinder is not available right now;
/// the caller then falls back to the system unwinder.
///
/// Called with the reentrancy mark set: the first call builds the module list, each
/// slot's first use creates its cache, and a cache miss may grow gimli's context
/// (allocations). Otherwise it does not allocate, lock or make a system call.
#[inline(never)]
pub(super) fn capture(buf: &mut StackBuf, marker: usize) -> bool {
    let (ip, sp, bp) = registers();
    let Some(modules) = modules() else {
        return false;
    };
    let Some(bounds) = StackBounds::current().and_then(|b| b.above_sp(sp)) else {
        return false;
    };
    let Some(mut slot) = SlotGuard::acquire() else {
        return false;
    };
    // The first frame is this function at `ip` itself: its rule is looked up at `ip`
    // exactly, and its return address (into our caller) is the first one read.
    let Some(state) = slot.state() else {
        return false;
    };
    walk(buf, marker, &bounds, modules, state, ip, sp, bp);
    true
}

/// How a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Walked {
    /// At the root of the stack: a frame with an undefined return address.
    Root,
    /// Anywhere else: a frame that could not be unwound, a bad read, a full buffer.
    Stopped,
}

/// Continues a walk that a frame-pointer walk handed off (see `fp::End::Handoff`): the
/// return address `ip` is already in `buf`; unwinds its frame and those above it.
///
/// Returns `None` (nothing pushed) if the unwinder is not available right now.
pub(super) fn resume(
    buf: &mut StackBuf,
    marker: usize,
    ip: usize,
    sp: usize,
    bp: usize,
) -> Option<Walked> {
    let modules = modules()?;
    let bounds = StackBounds::current().and_then(|b| b.above_sp(sp))?;
    if ip == 0 {
        return Some(Walked::Stopped);
    }
    let mut slot = SlotGuard::acquire()?;
    Some(walk(
        buf,
        marker,
        &bounds,
        modules,
        slot.state()?,
        ReturnAddress(ip).lookup().0,
        sp,
        bp,
    ))
}

/// The unwinding loop. `pc` is the address to look the next frame's rule up at (inside
/// the call instruction for a return address); `sp` and `bp` are that frame's registers.
///
/// Invariant: `sp` is word-aligned and `bounds.lo <= sp` (the bounds were narrowed to
/// start at the first `sp`, and every step raises it to an aligned CFA). With that, a
/// [`Base::Sp`] frame needs one check, `CFA <= hi`, for both its reads.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn walk(
    buf: &mut StackBuf,
    marker: usize,
    bounds: &StackBounds,
    modules: &Modules,
    state: &mut SlotState,
    mut pc: usize,
    mut sp: usize,
    mut bp: usize,
) -> Walked {
    const WORD: usize = std::mem::size_of::<usize>();
    if !sp.is_multiple_of(WORD) || sp < bounds.lo || bounds.hi > usize::MAX / 2 {
        return Walked::Stopped;
    }
    let SlotState {
        by_depth,
        entries,
        ctx,
    } = state;
    let mut buf = buf.writer();
    // The address `words` words from `cfa` (negative: below it).
    let at = |cfa: usize, words: i8| cfa.wrapping_add((words as isize * WORD as isize) as usize);
    // Every step strictly raises the stack pointer inside bounded memory, so the loop
    // ends; the memo's length (a little more than the deepest stack kept) is a second
    // guard.
    for e in by_depth.iter_mut() {
        if e.pc != pc {
            fill(e, entries, ctx, modules, pc);
        }
        let rule = &e.rule;
        let (cfa, ret) = match rule.base {
            Base::Sp => {
                // No overflow: `sp <= hi <= usize::MAX / 2` and `0 < cfa_off <= i32::MAX`.
                let cfa = sp + rule.cfa_off as usize;
                if cfa > bounds.hi {
                    return Walked::Stopped;
                }
                // SAFETY: `Rule::sp` built this rule, so `cfa_off` is a positive multiple of
                // the word and `ra_words` and `bp_words` (when not 0) are in
                // `-cfa_off / WORD..0`: both reads are of aligned words in `[sp, cfa)`. By
                // the loop invariant `bounds.lo <= sp`, and `cfa <= bounds.hi` was checked.
                unsafe {
                    if rule.bp_words != 0 {
                        bp = bounds.read_unchecked(at(cfa, rule.bp_words));
                    }
                    (cfa, bounds.read_unchecked(at(cfa, rule.ra_words)))
                }
            }
            Base::Bp => {
                let cfa = bp.wrapping_add(rule.cfa_off as isize as usize);
                if cfa <= sp || !cfa.is_multiple_of(WORD) {
                    return Walked::Stopped;
                }
                let Some(ret) = bounds.read(at(cfa, rule.ra_words)) else {
                    return Walked::Stopped;
                };
                if rule.bp_words != 0 {
                    match bounds.read(at(cfa, rule.bp_words)) {
                        Some(v) => bp = v,
                        None => return Walked::Stopped,
                    }
                }
                (cfa, ret)
            }
            Base::Root => return Walked::Root,
            Base::Stop => return Walked::Stopped,
        };
        // The caller's stack pointer is the CFA of the frame just unwound. Keep the return
        // address iff that frame lies above the marker.
        sp = cfa;
        if ret == 0 {
            return Walked::Root;
        }
        if sp > marker && !buf.push(ret) {
            return Walked::Stopped;
        }
        pc = ReturnAddress(ret).lookup().0;
    }
    Walked::Stopped
}

/// The rule for `pc` from the CFI of the object containing it (the cache-miss path; may
/// allocate inside gimli's context, called with the reentrancy mark set).
#[cold]
fn derive(modules: &Modules, ctx: &mut UnwindContext<usize>, pc: usize) -> Rule {
    let Some(m) = modules.list.iter().find(|m| m.text.contains(&pc)) else {
        return Rule::FRAME_POINTER;
    };
    let Some(table) = m.hdr.table() else {
        return Rule::FRAME_POINTER;
    };
    let Ok(fde) = table.fde_for_address(&m.eh_frame, &m.bases, pc as u64, EhFrame::cie_from_offset)
    else {
        return Rule::FRAME_POINTER;
    };
    match fde.unwind_info_for_address(&m.eh_frame, &m.bases, ctx, pc as u64) {
        Ok(row) => rule_from_row(
            row.cfa(),
            row.register(X86_64::RA),
            row.register(X86_64::RBP),
        ),
        Err(_) => Rule::STOP,
    }
}

/// Reduces a row of the CFI table to a [`Rule`], or [`Rule::STOP`] if it has another form.
fn rule_from_row(
    cfa: &CfaRule<usize>,
    ra: Option<RegisterRule<usize>>,
    bp: Option<RegisterRule<usize>>,
) -> Rule {
    let (base, cfa_off) = match *cfa {
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RSP => {
            (Base::Sp, offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RBP => {
            (Base::Bp, offset)
        }
        _ => return Rule::STOP,
    };
    let ra_off = match ra {
        Some(RegisterRule::Offset(o)) => o,
        Some(RegisterRule::Undefined) => return Rule::ROOT,
        _ => return Rule::STOP,
    };
    let bp_off = match bp {
        None | Some(RegisterRule::SameValue) | Some(RegisterRule::Undefined) => 0,
        Some(RegisterRule::Offset(o)) if o != 0 => o,
        _ => return Rule::STOP,
    };
    let words = |off: i64| {
        const WORD: i64 = std::mem::size_of::<usize>() as i64;
        (off % WORD == 0)
            .then(|| i8::try_from(off / WORD).ok())
            .flatten()
    };
    match (i32::try_from(cfa_off), words(ra_off), words(bp_off)) {
        (Ok(cfa_off), Some(ra_words), Some(bp_words)) if ra_words != 0 => match base {
            Base::Sp => Rule::sp(cfa_off, ra_words, bp_words),
            _ => Rule {
                base,
                cfa_off,
                ra_words,
                bp_words,
            },
        },
        _ => Rule::STOP,
    }
}

/// Enumerates the loaded objects. Allocates (called with the reentrancy mark set).
fn build_modules() -> Modules {
    let mut acc = Modules {
        list: Vec::new(),
        main_text: 0..0,
    };
    let mut first = true;
    let mut data = (&mut acc, &mut first);
    // SAFETY: `collect` matches `dl_iterate_phdr`'s callback signature and reads `data` as
    // the tuple we pass, for the duration of this call only.
    unsafe {
        libc::dl_iterate_phdr(Some(collect), std::ptr::addr_of_mut!(data).cast());
    }
    acc
}

/// `dl_iterate_phdr` callback: adds one object to the list.
///
/// # Safety
///
/// `info` must be valid for the call (as `dl_iterate_phdr` guarantees) and `data` must
/// point to a `(&mut Modules, &mut bool)` not otherwise borrowed.
unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: per this function's contract.
    let (info, (acc, first)) = unsafe { (&*info, &mut *data.cast::<(&mut Modules, &mut bool)>()) };
    let is_first = std::mem::replace(*first, false);
    if info.dlpi_phdr.is_null() {
        return 0;
    }
    // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers of a loaded object.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let base = info.dlpi_addr as usize;
    let mut text: Option<Range<usize>> = None;
    let mut hdr: Option<Range<usize>> = None;
    for ph in phdrs {
        let start = ph.p_vaddr as usize;
        let end = start + ph.p_memsz as usize;
        if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
            text = Some(match text {
                Some(t) => t.start.min(start)..t.end.max(end),
                None => start..end,
            });
        } else if ph.p_type == libc::PT_GNU_EH_FRAME {
            hdr = Some(start..end);
        }
    }
    let Some(text) = text else { return 0 };
    let text = base + text.start..base + text.end;
    if is_first {
        acc.main_text = text.clone();
    }
    let Some(hdr) = hdr else { return 0 };
    // SAFETY: the PT_GNU_EH_FRAME segment is loaded at `base + hdr`, readable, for as long
    // as the object stays loaded (objects seen at start-up are not unloaded).
    let hdr_bytes: &'static [u8] =
        unsafe { std::slice::from_raw_parts((base + hdr.start) as *const u8, hdr.len()) };
    let Some(eh_frame) = eh_frame_address(hdr_bytes, hdr.start) else {
        return 0;
    };
    // `.eh_frame` has no program header of its own: it extends at most to the end of the
    // PT_LOAD segment holding it (the FDE offsets from the header stay inside it).
    let Some(seg_end) = phdrs
        .iter()
        .filter(|ph| ph.p_type == libc::PT_LOAD)
        .map(|ph| (ph.p_vaddr as usize, (ph.p_vaddr + ph.p_memsz) as usize))
        .find(|&(s, e)| s <= eh_frame && eh_frame < e)
        .map(|(_, e)| e)
    else {
        return 0;
    };
    // SAFETY: `[eh_frame, seg_end)` lies inside a loaded PT_LOAD segment of this object.
    let eh_bytes: &'static [u8] =
        unsafe { std::slice::from_raw_parts((base + eh_frame) as *const u8, seg_end - eh_frame) };
    // Everything is addressed as mapped: pc-relative and data-relative pointers then
    // resolve to run-time addresses, which is what `pc` is.
    let bases = BaseAddresses::default()
        .set_eh_frame_hdr((base + hdr.start) as u64)
        .set_eh_frame((base + eh_frame) as u64)
        .set_text(text.start as u64);
    let Ok(parsed) = EhFrameHdr::new(hdr_bytes, LittleEndian).parse(&bases, 8) else {
        return 0;
    };
    let mut eh_frame = EhFrame::new(eh_bytes, LittleEndian);
    eh_frame.set_address_size(8);
    acc.list.push(Module {
        text,
        bases,
        eh_frame,
        hdr: parsed,
    });
    0
}

/// Decodes `eh_frame_ptr` from an `.eh_frame_hdr` at stated address `hdr_svma`: the
/// stated address of `.eh_frame`. Handles the encodings linkers emit (pc-relative or
/// absolute, 4 or 8 bytes).
fn eh_frame_address(hdr: &[u8], hdr_svma: usize) -> Option<usize> {
    const DW_EH_PE_ABSPTR: u8 = 0x00;
    const DW_EH_PE_UDATA4: u8 = 0x03;
    const DW_EH_PE_SDATA4: u8 = 0x0b;
    const DW_EH_PE_SDATA8: u8 = 0x0c;
    const DW_EH_PE_UDATA8: u8 = 0x04;
    const DW_EH_PE_PCREL: u8 = 0x10;
    if hdr.len() < 8 || hdr[0] != 1 {
        return None;
    }
    let enc = hdr[1];
    let field = &hdr[4..];
    let value: i64 = match enc & 0x0f {
        DW_EH_PE_SDATA4 => i32::from_le_bytes(field.get(..4)?.try_into().ok()?) as i64,
        DW_EH_PE_UDATA4 => u32::from_le_bytes(field.get(..4)?.try_into().ok()?) as i64,
        DW_EH_PE_ABSPTR | DW_EH_PE_UDATA8 | DW_EH_PE_SDATA8 => {
            i64::from_le_bytes(field.get(..8)?.try_into().ok()?)
        }
        _ => return None,
    };
    match enc & 0x70 {
        0 => usize::try_from(value).ok(),
        DW_EH_PE_PCREL => usize::try_from((hdr_svma as i64 + 4).checked_add(value)?).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: usize = std::mem::size_of::<usize>();

    #[test]
    fn sp_rules_must_keep_their_saved_words_inside_the_frame() {
        assert_eq!(Rule::sp(16, -1, 0).base, Base::Sp);
        assert_eq!(Rule::sp(24, -1, -3).base, Base::Sp);
        // Return address or rbp above the CFA, below rsp, or at it; a CFA that is not
        // above rsp or not word-aligned.
        for (cfa_off, ra, bp) in [
            (16, 1, 0),
            (16, -3, 0),
            (16, 0, 0),
            (16, -1, 1),
            (16, -1, -3),
            (0, -1, 0),
            (-16, -1, 0),
            (12, -1, 0),
        ] {
            assert_eq!(Rule::sp(cfa_off, ra, bp), Rule::STOP, "{cfa_off} {ra} {bp}");
        }
    }

    /// Walks `stack` (a fake stack on this thread's stack) from its first word, with the
    /// depth memo filled with `rules` for the return addresses met (no CFI is consulted).
    fn walk_fake(stack: &[usize], bp: usize, rules: &[(usize, Rule)]) -> (Walked, Vec<usize>) {
        let lo = stack.as_ptr() as usize;
        let bounds = StackBounds {
            lo,
            hi: lo + std::mem::size_of_val(stack),
        };
        let modules = Modules {
            list: Vec::new(),
            main_text: 0..0,
        };
        let mut state = SlotState::create().unwrap();
        for (e, &(pc, rule)) in state.by_depth.iter_mut().zip(rules) {
            *e = Entry { pc, rule };
        }
        let mut buf = StackBuf::new();
        let end = walk(
            &mut buf, 0, &bounds, &modules, &mut state, rules[0].0, lo, bp,
        );
        (end, buf.as_slice().to_vec())
    }

    #[test]
    fn a_walk_follows_sp_and_bp_frames_to_the_root() {
        let mut s = [0usize; 10];
        let lo = s.as_ptr() as usize;
        s[1] = 0x2001; // frame 0: CFA = sp + 16 (word 2), return address at CFA - 8
        s[3] = lo + 6 * W; // frame 1 saves rbp (word 6) at CFA - 16
        s[4] = 0x3001; // frame 1: CFA = sp + 24 (word 5)
        s[6] = 0x77; // frame 2: CFA = rbp + 16 (word 8); its caller's rbp
        s[7] = 0x4001;
        let rules = [
            (0x1000, Rule::sp(16, -1, 0)),
            (0x2000, Rule::sp(24, -1, -2)),
            (0x3000, Rule::FRAME_POINTER),
            (0x4000, Rule::ROOT),
        ];
        let (end, frames) = walk_fake(&s, 0, &rules);
        assert_eq!(end, Walked::Root);
        assert_eq!(frames, [0x2001, 0x3001, 0x4001]);
    }

    #[test]
    fn a_walk_stops_at_frames_outside_the_stack() {
        let mut s = [0usize; 6];
        let lo = s.as_ptr() as usize;
        s[1] = 0x2001;
        // Frame 1's CFA would be past the end of the stack.
        let (end, frames) = walk_fake(
            &s,
            0,
            &[(0x1000, Rule::sp(16, -1, 0)), (0x2000, Rule::sp(64, -1, 0))],
        );
        assert_eq!((end, frames.as_slice()), (Walked::Stopped, &[0x2001][..]));
        // An rbp-based frame whose rbp points below the stack pointer, or misaligned, or
        // far away.
        for bp in [lo, lo + 3, usize::MAX - 8, 0] {
            let (end, frames) = walk_fake(
                &s,
                bp,
                &[(0x1000, Rule::sp(16, -1, 0)), (0x2000, Rule::FRAME_POINTER)],
            );
            assert_eq!(
                (end, frames.as_slice()),
                (Walked::Stopped, &[0x2001][..]),
                "{bp:x}"
            );
        }
        // A stop rule.
        let (end, frames) = walk_fake(&s, 0, &[(0x1000, Rule::STOP)]);
        assert_eq!((end, frames.len()), (Walked::Stopped, 0));
    }

    #[test]
    fn threads_are_handed_first_slots_in_turn() {
        // Threads run one after another, most likely each on the stack the one before it
        // left (glibc keeps joined threads' stacks for reuse), which put them all at one
        // slot when it was picked from the stack address. Handed out in turn, they differ
        // (threads of other tests may take turns in between, but not so many that four
        // land on the same slot).
        let firsts: Vec<usize> = (0..4)
            .map(|_| std::thread::spawn(first_slot).join().unwrap())
            .collect();
        assert!(firsts.windows(2).any(|w| w[0] != w[1]), "{firsts:?}");
        assert!(firsts.iter().all(|&f| f < SLOTS));
        assert_eq!(first_slot(), first_slot(), "a thread keeps its first slot");
    }
}
