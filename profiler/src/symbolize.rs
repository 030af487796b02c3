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
//! per address. A later new address parses again (about 0.1 s for the demo).

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
/// inheriting theirs locked. Lock order: SYMBOLIZER, then CACHE. Holds whether `backtrace`
/// keeps parsed debug information (see the module docs).
static SYMBOLIZER: Mutex<bool> = Mutex::new(false);

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
        *loaded = true;
        missing.into_iter().map(|a| (a, resolve(a))).collect()
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
    if *loaded {
        let _measure = crate::thread::Region::counted(&SYMBOLIZER_BYTES);
        backtrace::clear_symbol_cache();
        *loaded = false;
    }
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
