//! Process-wide settings: the sample rate, the stack-table cap and whether the live set
//! uses huge pages.
//!
//! They can be set from the environment (`ALLOCPROF_SAMPLE_RATE`, `ALLOCPROF_MAX_STACKS`,
//! `ALLOCPROF_HUGE_PAGES`),
//! which is read once, lazily, from the first slow-path event or the first public API call,
//! never from the fast path. The environment is read with `getenv(3)` into a fixed buffer:
//! no allocation and no Rust lock, so this is safe to call from inside the allocator.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// Go's `runtime.MemProfileRate` default: one sample per 512 KiB allocated, on average.
pub const DEFAULT_SAMPLE_RATE: usize = 512 * 1024;

/// Default cap on the number of entries the stack table keeps (one per distinct stack
/// and CPU group that sampled it, up to 4 a stack).
pub const DEFAULT_MAX_STACKS: usize = 32 * 1024;

/// What every slow-path event reads, on one cache line. Events come hundreds of
/// kilobytes of allocation apart, by then a program churning its heap has evicted the
/// line, and spread over two lines the three cost two misses an event.
#[repr(C, align(64))]
struct Hot {
    rate: AtomicUsize,
    /// Bumped on every rate change; threads compare it at their next slow event and
    /// redraw.
    rate_epoch: AtomicU64,
    env_state: AtomicU8,
}

static HOT: Hot = Hot {
    rate: AtomicUsize::new(DEFAULT_SAMPLE_RATE),
    rate_epoch: AtomicU64::new(0),
    env_state: AtomicU8::new(ENV_UNREAD),
};
static MAX_STACKS: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_STACKS);

const ENV_UNREAD: u8 = 0;
const ENV_READING: u8 = 1;
const ENV_DONE: u8 = 2;

/// Reads the `ALLOCPROF_*` start-up settings once. Cheap after the first call.
///
/// Must not allocate (it runs on the allocator's slow path).
#[inline]
pub(crate) fn ensure_env() {
    if HOT.env_state.load(Ordering::Acquire) == ENV_DONE {
        return;
    }
    read_env_once();
}

#[cold]
fn read_env_once() {
    if HOT
        .env_state
        .compare_exchange(ENV_UNREAD, ENV_READING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Another thread is reading it; until it is done, the defaults apply.
        return;
    }
    match env_usize(c"ALLOCPROF_SAMPLE_RATE") {
        EnvValue::Unset => {}
        EnvValue::Set(rate) => store_rate(rate),
        EnvValue::Invalid => {
            stderr(b"allocprof: ignoring ALLOCPROF_SAMPLE_RATE: not a whole number of bytes\n")
        }
    }
    match env_usize(c"ALLOCPROF_MAX_STACKS") {
        EnvValue::Unset => {}
        EnvValue::Set(n) if n > 0 => MAX_STACKS.store(n, Ordering::Relaxed),
        _ => stderr(b"allocprof: ignoring ALLOCPROF_MAX_STACKS: not a positive whole number\n"),
    }
    // Before the first sample: every sample comes after this (see `thread::alloc_event`).
    crate::live::touch_for_write();
    match env_usize(c"ALLOCPROF_HUGE_PAGES") {
        EnvValue::Unset | EnvValue::Set(1) => crate::live::advise_huge_pages(),
        EnvValue::Set(0) => {}
        _ => {
            stderr(b"allocprof: ignoring ALLOCPROF_HUGE_PAGES: not 0 or 1\n");
            crate::live::advise_huge_pages();
        }
    }
    crate::fork::register();
    HOT.env_state.store(ENV_DONE, Ordering::Release);
}

enum EnvValue {
    Unset,
    Set(usize),
    Invalid,
}

fn env_usize(name: &std::ffi::CStr) -> EnvValue {
    // SAFETY: getenv takes a NUL-terminated name and returns NULL or a pointer into the
    // environment block; we only read it until the NUL. Concurrent setenv from another
    // thread would be a race in the program itself (as for every C library reader).
    let ptr = unsafe { libc::getenv(name.as_ptr()) };
    if ptr.is_null() {
        return EnvValue::Unset;
    }
    // SAFETY: getenv returned a valid NUL-terminated string (see above).
    let bytes = unsafe { std::ffi::CStr::from_ptr(ptr) }.to_bytes();
    parse_usize(bytes).map_or(EnvValue::Invalid, EnvValue::Set)
}

/// Parses a decimal number without allocating; `None` on anything else or overflow.
pub(crate) fn parse_usize(bytes: &[u8]) -> Option<usize> {
    let bytes = trim_ascii(bytes);
    if bytes.is_empty() {
        return None;
    }
    let mut n: usize = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(usize::from(b - b'0'))?;
    }
    Some(n)
}

fn trim_ascii(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// Writes to standard error without allocating or locking Rust's stderr.
pub(crate) fn stderr(msg: &[u8]) {
    // SAFETY: writing a valid buffer to fd 2; a short or failed write is acceptable.
    let _ = unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

fn store_rate(rate: usize) {
    HOT.rate.store(rate, Ordering::Relaxed);
    HOT.rate_epoch.fetch_add(1, Ordering::Release);
}

/// Sets the sampling rate in bytes: on average one sample per `bytes` allocated.
///
/// `0` turns sampling off (exact totals are still kept); `1` samples every allocation.
/// The default is 512 KiB, as Go's `runtime.MemProfileRate`. The calling thread uses the
/// new rate from its next allocation on; every other thread from its next slow-path event,
/// which comes after at most 2 MiB of further allocation on that thread.
///
/// Samples already taken keep the weight of the rate they were taken at, so estimates stay
/// unbiased across a change.
pub fn set_sample_rate(bytes: usize) {
    ensure_env();
    store_rate(bytes);
    crate::thread::rate_changed_here();
}

/// The current sampling rate in bytes (see [`set_sample_rate`]).
pub fn sample_rate() -> usize {
    ensure_env();
    HOT.rate.load(Ordering::Relaxed)
}

/// The rate and its epoch, read together on the slow path.
#[inline]
pub(crate) fn rate_and_epoch() -> (usize, u64) {
    let epoch = HOT.rate_epoch.load(Ordering::Acquire);
    (HOT.rate.load(Ordering::Relaxed), epoch)
}

/// The cap on stack-table entries (`ALLOCPROF_MAX_STACKS`, default [`DEFAULT_MAX_STACKS`]):
/// one per distinct stack and CPU group that sampled it, up to 4 a stack.
pub fn max_stacks() -> usize {
    ensure_env();
    MAX_STACKS.load(Ordering::Relaxed)
}

/// Sets the cap on stack-table entries. Lowering it below the number already stored keeps
/// those and sends every new entry's sample to the overflow entry.
pub fn set_max_stacks(n: usize) {
    ensure_env();
    MAX_STACKS.store(n.max(1), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::parse_usize;

    #[test]
    fn parses_plain_numbers_only() {
        assert_eq!(parse_usize(b"524288"), Some(524288));
        assert_eq!(parse_usize(b" 1 "), Some(1));
        assert_eq!(parse_usize(b"0"), Some(0));
        assert_eq!(parse_usize(b""), None);
        assert_eq!(parse_usize(b"12k"), None);
        assert_eq!(parse_usize(b"-1"), None);
        assert_eq!(parse_usize(b"99999999999999999999999999"), None);
    }
}
