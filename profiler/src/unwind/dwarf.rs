//! The DWARF unwinder: `.eh_frame` call-frame information evaluated by framehop, with a
//! per-address cache of the resulting unwind rules.
//!
//! libgcc's unwinder (the baseline) looks up the FDE of every frame, interprets its CFI
//! program and builds a full register context, every time: 4–8 µs per stack here. framehop
//! does the same lookup once per return address and caches the resulting rule (for
//! almost all frames a rule like "CFA = rsp + 24, return address at CFA − 8"); a cached
//! frame then costs a hash probe and two stack reads.
//!
//! # Module list
//!
//! On first use (with the reentrancy mark set, so its allocations pass the sampler) the
//! loaded objects are enumerated with `dl_iterate_phdr`: for each, the executable
//! `PT_LOAD` range, `.eh_frame_hdr` (`PT_GNU_EH_FRAME`) and `.eh_frame` (found through the
//! header's `eh_frame_ptr`). The section data are borrowed in place from the loaded image
//! (`&'static [u8]`), nothing is copied. Objects loaded later with `dlopen` are not seen;
//! framehop unwinds their frames by frame pointer, and a stack may end there.
//!
//! # Caches
//!
//! framehop's rule cache is direct-mapped (509 entries, slot = address mod 509), so two hot
//! return addresses that share a slot evict each other on every capture, and each miss
//! costs a full FDE lookup and CFI evaluation (~1 µs). Whether that happens depends on
//! where the loader put the binary (ASLR), so one run can be several times slower than the
//! next. So we keep [`WAYS`] caches per slot, and a global table of per-address *way
//! hints*: an address is served by way `(hash(address) + hint) mod WAYS`, and a miss caused
//! by a collision (framehop counts those) bumps the hint of the address that missed, which
//! moves it to another way where its slot is free. Two colliding addresses are separated
//! after one extra miss and stay apart.
//!
//! The caches are mutable state (about 50 KiB each, created on first use). There are
//! [`SLOTS`] sets of them, each behind a try-lock; a thread starts at a slot picked from its
//! identity and takes the first free one. No thread ever waits: if all are busy (or the
//! module list is still being built by another thread) the capture declines and the caller
//! falls back to the system unwinder.
//!
//! # Safety of the walk
//!
//! Rules are evaluated against register values we provide and memory reads we answer, and
//! every read goes through [`StackBounds::read`]. The walk stops when the stack pointer does
//! not strictly increase, a read is refused, or framehop finds the root.

use super::bounds::StackBounds;
use crate::stack::StackBuf;
use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, MustNotAllocateDuringUnwind, Unwinder,
};
use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

/// Section data borrowed from the loaded image of an object.
#[derive(Clone, Copy, Default)]
struct Mapped(&'static [u8]);

impl Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0
    }
}

type Unw = UnwinderX86_64<Mapped, MustNotAllocateDuringUnwind>;
type Cache = CacheX86_64<MustNotAllocateDuringUnwind>;

/// The loaded objects, built once.
struct Modules {
    unwinder: Unw,
    /// Executable range of the main program: code compiled by rustc with the build's
    /// flags, so it keeps frame pointers iff this crate does.
    main_text: Range<usize>,
}

const UNINIT: u8 = 0;
const BUILDING: u8 = 1;
const READY: u8 = 2;
const FAILED: u8 = 3;

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

/// Number of sets of rule caches (concurrent captures served without falling back).
/// Created on first use, so an unused slot costs 16 bytes.
const SLOTS: usize = 8;

/// framehop caches per slot, chosen by address (see the module docs).
const WAYS: usize = 4;

type Caches = [Cache; WAYS];

/// Way hints, indexed by [`hint_index`]; races between threads only cost a miss.
static HINTS: [AtomicU8; 4096] = [const { AtomicU8::new(0) }; 4096];

#[inline]
fn mix(address: FrameAddress) -> u64 {
    address.address().wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[inline]
fn hint_index(address: FrameAddress) -> usize {
    (mix(address) >> 52) as usize
}

/// The cache of `caches` that serves `address`: a hash independent of framehop's own
/// `address mod 509`, moved along by the address's hint.
#[inline]
fn way(address: FrameAddress) -> usize {
    let hint = HINTS[hint_index(address)].load(Ordering::Relaxed) as usize;
    ((mix(address) >> 62) as usize + hint) % WAYS
}

/// Moves `address` to the next way after it missed because another address held its slot.
#[cold]
fn collided(address: FrameAddress) {
    let h = &HINTS[hint_index(address)];
    h.store(h.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

struct Slot {
    busy: AtomicBool,
    caches: UnsafeCell<Option<Box<Caches>>>,
}

// SAFETY: `caches` is only touched by the thread that holds `busy` (taken with an Acquire
// compare-exchange, released with a Release store), so accesses never overlap.
unsafe impl Sync for Slot {}

#[allow(clippy::declare_interior_mutable_const)] // used only as the array initialiser
const FREE_SLOT: Slot = Slot {
    busy: AtomicBool::new(false),
    caches: UnsafeCell::new(None),
};
static CACHES: [Slot; SLOTS] = [FREE_SLOT; SLOTS];

/// Slots whose caches have been created.
static CREATED: AtomicUsize = AtomicUsize::new(0);

/// Heap bytes of one slot's caches, approximately: framehop's rule cache (509 entries of
/// 24 bytes) and gimli's unwind context for CFI evaluation (four rows of 192 register
/// rules of 32 bytes) per way.
const SLOT_BYTES: usize = WAYS * (509 * 24 + 4 * 192 * 32 + 512);

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

/// Creates the caches of every free slot (tests: so that later captures cannot allocate).
#[cfg(test)]
pub(super) fn warm_all_caches() {
    for slot in &CACHES {
        if slot
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            let mut guard = SlotGuard(slot);
            guard.caches();
        }
    }
}

/// Heap memory held by the DWARF unwinder's caches (approximate; the module list adds a
/// few hundred bytes per loaded object and the section data are borrowed, not copied).
pub(super) fn memory_bytes() -> usize {
    CREATED.load(Ordering::Relaxed) * SLOT_BYTES
}

/// A held rule cache; released on drop.
struct SlotGuard(&'static Slot);

impl SlotGuard {
    fn acquire() -> Option<SlotGuard> {
        let start = {
            let local = 0u8;
            (std::ptr::addr_of!(local) as usize >> 16) % SLOTS
        };
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

    /// The caches, created on first use (allocates: called with the reentrancy mark set).
    fn caches(&mut self) -> &mut Caches {
        // SAFETY: this guard holds the slot's try-lock, so no other reference to the cell's
        // contents exists; the returned borrow ends before the guard releases the lock.
        let cell = unsafe { &mut *self.0.caches.get() };
        cell.get_or_insert_with(|| {
            CREATED.fetch_add(1, Ordering::Relaxed);
            Box::new(std::array::from_fn(|_| Cache::new_in()))
        })
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
            let ok = built.is_some();
            if let Some(m) = built {
                // SAFETY: we moved the state to BUILDING, so no other thread reads or
                // writes the cell until we publish READY below.
                unsafe { (*GLOBAL.modules.get()).write(m) };
            }
            GLOBAL
                .state
                .store(if ok { READY } else { FAILED }, Ordering::Release);
            if !ok {
                return None;
            }
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
/// Called with the reentrancy mark set: the first call builds the module list and each
/// slot's first use creates its cache (allocations). After that it does not allocate,
/// lock or make a system call.
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
    let regs = UnwindRegsX86_64::new(ip as u64, sp as u64, bp as u64);
    walk(
        buf,
        marker,
        &bounds,
        &modules.unwinder,
        slot.caches(),
        regs,
        FrameAddress::from_instruction_pointer(ip as u64),
    );
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
    let Some(address) = FrameAddress::from_return_address(ip as u64) else {
        return Some(Walked::Stopped);
    };
    let mut slot = SlotGuard::acquire()?;
    let regs = UnwindRegsX86_64::new(ip as u64, sp as u64, bp as u64);
    Some(walk(
        buf,
        marker,
        &bounds,
        &modules.unwinder,
        slot.caches(),
        regs,
        address,
    ))
}

/// The unwinding loop. `address` is the frame to unwind next; its own address has been
/// pushed already (or is the capture function's own instruction pointer, never pushed).
fn walk(
    buf: &mut StackBuf,
    marker: usize,
    bounds: &StackBounds,
    unwinder: &Unw,
    caches: &mut Caches,
    mut regs: UnwindRegsX86_64,
    mut address: FrameAddress,
) -> Walked {
    let mut read = |addr: u64| bounds.read(addr as usize).map(|w| w as u64).ok_or(());
    // Every step strictly raises the stack pointer inside bounded memory, so the loop
    // ends; the cap is a second guard.
    for _ in 0..4 * crate::stack::MAX_DEPTH {
        let sp_before = regs.sp();
        let cache = &mut caches[way(address)];
        let collisions = cache.stats().miss_wrong_address_count;
        let result = unwinder.unwind_frame(address, &mut regs, cache, &mut read);
        if cache.stats().miss_wrong_address_count != collisions {
            collided(address);
        }
        let ret = match result {
            Ok(Some(ret)) => ret,
            Ok(None) => return Walked::Root,
            Err(_) => return Walked::Stopped,
        };
        // `regs` now hold the caller's values: its stack pointer is the CFA of the frame
        // just unwound. Keep the return address iff that frame lies above the marker.
        if regs.sp() <= sp_before {
            return Walked::Stopped;
        }
        if regs.sp() as usize > marker && !buf.push(ret as usize) {
            return Walked::Stopped;
        }
        let Some(next) = FrameAddress::from_return_address(ret) else {
            return Walked::Stopped;
        };
        address = next;
    }
    Walked::Stopped
}

/// Enumerates the loaded objects. Allocates (called with the reentrancy mark set).
fn build_modules() -> Option<Modules> {
    let mut acc = Acc {
        unwinder: Unw::new(),
        main_text: 0..0,
        first: true,
    };
    // SAFETY: `collect` matches `dl_iterate_phdr`'s callback signature and reads `data` as
    // the `Acc` we pass, for the duration of this call only.
    unsafe {
        libc::dl_iterate_phdr(Some(collect), std::ptr::addr_of_mut!(acc).cast());
    }
    Some(Modules {
        unwinder: acc.unwinder,
        main_text: acc.main_text,
    })
}

struct Acc {
    unwinder: Unw,
    main_text: Range<usize>,
    first: bool,
}

/// `dl_iterate_phdr` callback: adds one object to the unwinder.
///
/// # Safety
///
/// `info` must be valid for the call (as `dl_iterate_phdr` guarantees) and `data` must
/// point to an [`Acc`] not otherwise borrowed.
unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: per this function's contract.
    let (info, acc) = unsafe { (&*info, &mut *data.cast::<Acc>()) };
    let first = std::mem::replace(&mut acc.first, false);
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
    if first {
        acc.main_text = base + text.start..base + text.end;
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
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: Some(text.start as u64..text.end as u64),
        eh_frame_svma: Some(eh_frame as u64..seg_end as u64),
        eh_frame: Some(Mapped(eh_bytes)),
        eh_frame_hdr_svma: Some(hdr.start as u64..hdr.end as u64),
        eh_frame_hdr: Some(Mapped(hdr_bytes)),
        ..Default::default()
    };
    acc.unwinder.add_module(Module::new(
        String::new(),
        (base + text.start) as u64..(base + text.end) as u64,
        base as u64,
        info,
    ));
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
