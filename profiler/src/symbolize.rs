//! In-process symbolization, once per unique address, cached.
//!
//! Symbolization runs only at export time. Each lookup address is resolved once through
//! the `backtrace` crate (gimli/addr2line over the binary's DWARF); the result — one
//! [`SymbolFrame`] per inlined function, innermost first — is kept in a process-wide
//! cache. The cache lock is never held while resolving: missing addresses are collected
//! under the lock, resolved outside it, and inserted under it again. The work runs with
//! the reentrancy mark set, so the symbolizer's own (large) allocations are never sampled
//! into the user's profile; they still count in the exact totals.
//!
//! # Memory
//!
//! Resolving makes `backtrace` parse and keep the binary's debug information: tens of
//! megabytes for a service binary (the units of std and core alone are large). It is needed
//! while new addresses keep coming, which they do in a process's first profiles, and not
//! after. So a symbolization that finds every address already in our cache releases it
//! (`backtrace::clear_symbol_cache`): what stays is our per-address cache, under a kilobyte
//! per address. A later new address parses again (0.1–0.2 s for the demo).
//!
//! New addresses are resolved one object at a time, releasing the previous object's
//! parse before the next: the peak is then the largest object's, not the sum. It matters
//! where a system library has a separate debug file (Debian's `libc6-dbg`, which
//! valgrind pulls in): resolving the thread-root frames in libc parsed its 31 MB of
//! debug information on top of the binary's. The service's own binary goes last and stays
//! loaded, as new addresses keep coming from there.

use crate::guard::ReentrancyGuard;
use crate::lock::{ForkLock, Mutex};
use crate::stack::LookupAddress;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// One function at an address: the address's own function, or one inlined into it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolFrame {
    /// Demangled name without the trailing hash (`alloc::vec::Vec<T>::push`).
    pub name: String,
    /// The symbol as in the binary (mangled), or the demangled name when unknown.
    pub system_name: String,
    /// Source file, empty when unknown.
    pub file: String,
    /// Source line, 0 when unknown.
    pub line: u32,
    /// Start address of the enclosing symbol, when known (used for `+0xOFF` in text).
    pub symbol_address: Option<usize>,
}

/// The functions at one address, innermost (inlined callee) first; empty if unresolved.
pub type Symbols = Arc<[SymbolFrame]>;

static CACHE: Mutex<Option<HashMap<usize, Symbols>>> = Mutex::new(None);
/// Net bytes the symbolizer (the `backtrace` crate's DWARF caches and our cache) has
/// allocated and not freed, measured on the threads that symbolize.
static SYMBOLIZER_BYTES: AtomicI64 = AtomicI64::new(0);
/// Held around every call into the `backtrace` symbolizer, whose own global lock we
/// cannot reach from a fork handler; holding ours across `fork` keeps the child from
/// inheriting theirs locked. Lock order: SYMBOLIZER, then CACHE. Holds the object (the
/// start of its executable mapping) whose parsed debug information `backtrace` keeps, if
/// any (see the module docs).
static SYMBOLIZER: Mutex<Option<u64>> = Mutex::new(None);

/// The symbolizer's locks in their lock order, for `fork.rs`.
pub(crate) fn fork_locks() -> [&'static dyn ForkLock; 2] {
    [&SYMBOLIZER, &CACHE]
}

/// Resolves every address (cached), returning symbols in the same order.
pub fn symbolize(addrs: &[LookupAddress]) -> Vec<Symbols> {
    let _mark = ReentrancyGuard::enter();
    let missing: Vec<usize> = {
        let cache = CACHE.lock();
        let cache = cache.as_ref();
        let mut m: Vec<usize> = addrs
            .iter()
            .map(|a| a.0)
            .filter(|a| !cache.is_some_and(|c| c.contains_key(a)))
            .collect();
        m.sort_unstable();
        m.dedup();
        m
    };
    let resolved: Vec<(usize, Symbols)> = if missing.is_empty() {
        release_debug_info();
        Vec::new()
    } else {
        let mut loaded = SYMBOLIZER.lock();
        let _measure = crate::thread::Region::counted(&SYMBOLIZER_BYTES);
        let mut out = Vec::with_capacity(missing.len());
        for (object, addrs) in by_object(missing) {
            // One object's debug information at a time: the peak is the largest object's,
            // not the sum (see the module docs).
            if loaded.is_some_and(|l| l != object) {
                backtrace::clear_symbol_cache();
            }
            *loaded = Some(object);
            out.extend(addrs.into_iter().map(|a| (a, resolve(a))));
        }
        out
    };
    let mut cache = CACHE.lock();
    let cache = cache.get_or_insert_with(HashMap::new);
    {
        let _measure = crate::thread::Region::counted(&SYMBOLIZER_BYTES);
        cache.extend(resolved);
    }
    addrs
        .iter()
        .map(|a| {
            cache
                .get(&a.0)
                .cloned()
                .unwrap_or_else(|| Arc::from(Vec::new()))
        })
        .collect()
}

/// Drops `backtrace`'s parsed debug information, if it holds any (see the module docs).
fn release_debug_info() {
    let mut loaded = SYMBOLIZER.lock();
    if loaded.is_some() {
        let _measure = crate::thread::Region::counted(&SYMBOLIZER_BYTES);
        backtrace::clear_symbol_cache();
        *loaded = None;
    }
}

/// `addrs` (sorted) grouped by the executable mapping that contains them, each group
/// named by its mapping's start; the group of the object holding this code (the service's
/// binary, where later new addresses mostly come from) last, so that its parse is the
/// one kept.
fn by_object(addrs: Vec<usize>) -> Vec<(u64, Vec<usize>)> {
    let maps = crate::maps::executable_ranges();
    let object_of = |a: usize| {
        let a = a as u64;
        maps.iter()
            .find(|m| m.start <= a && a < m.limit)
            .map_or(0, |m| m.start)
    };
    let own = object_of(by_object as *const () as usize);
    let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
    for a in addrs {
        let object = object_of(a);
        match groups.iter_mut().find(|(o, _)| *o == object) {
            Some((_, g)) => g.push(a),
            None => groups.push((object, vec![a])),
        }
    }
    groups.sort_by_key(|(o, _)| (*o == own, *o));
    groups
}

/// Number of cached addresses, and the bytes the symbolizer holds: everything allocated
/// while resolving (the `backtrace` crate's parsed debug information, which it keeps) and
/// the growth of our cache, less what was freed there.
pub(crate) fn cache_size() -> (usize, usize) {
    let entries = CACHE.lock().as_ref().map_or(0, HashMap::len);
    let bytes = SYMBOLIZER_BYTES.load(Ordering::Relaxed).max(0) as usize;
    (entries, bytes)
}

fn resolve(addr: usize) -> Symbols {
    let mut frames = Vec::new();
    // `backtrace::resolve` treats its argument as a return address and looks up the byte
    // before it; `addr` is already the byte to look up, so hand it `addr + 1`.
    backtrace::resolve(addr.wrapping_add(1) as *mut std::ffi::c_void, |sym| {
        let (name, system_name) = match sym.name() {
            Some(n) => {
                let demangled = format!("{n:#}");
                let raw = String::from_utf8_lossy(n.as_bytes()).into_owned();
                (demangled, raw)
            }
            None => (String::new(), String::new()),
        };
        frames.push(SymbolFrame {
            name,
            system_name,
            file: sym
                .filename()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            line: sym.lineno().unwrap_or(0),
            symbol_address: sym.addr().map(|a| a as usize),
        });
    });
    frames.retain(|f| !f.name.is_empty());
    Arc::from(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Addresses in libc and in this binary form two groups, this binary's last, each
    /// with its own addresses only.
    #[test]
    fn groups_addresses_by_object_own_binary_last() {
        let own = [
            by_object as *const () as usize,
            resolve as *const () as usize,
        ];
        let libc_fn = libc::getpid as *const () as usize;
        let mut addrs = vec![own[0], libc_fn, own[1]];
        addrs.sort_unstable();
        let groups = by_object(addrs);
        assert_eq!(groups.len(), 2, "{groups:x?}");
        let (libc_group, own_group) = (&groups[0].1, &groups[1].1);
        assert_eq!(libc_group, &vec![libc_fn]);
        let mut expected = own.to_vec();
        expected.sort_unstable();
        assert_eq!(own_group, &expected);
        assert_ne!(groups[0].0, groups[1].0);
    }
}
