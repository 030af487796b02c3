//! Workloads and measurements shared by the reliability programs (`soak`, `stress`,
//! `coexist`). Each program is its own process with `allocprof::Profiler` as its
//! global allocator.

#[cfg(feature = "cpu")]
pub mod coexist;

use std::collections::HashMap;
use std::hint::black_box;

/// A small xorshift generator: deterministic, allocation-free.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Deepest recursion of [`request`]: with one of two functions per level, up to
/// 2^(MAX_DEPTH+1) distinct call paths, more than the stack table's default cap.
pub const MAX_DEPTH: u32 = 16;

/// One unit of churn, like a request handler: recursion of random depth, branching
/// between two functions per level, ending in a mix of allocations (strings, a growing
/// vector, a hash map, a block of random size). One block is handed to `keep`, which
/// drops its oldest entries beyond `keep_max` (so the live heap stays bounded).
pub fn request(rng: &mut Rng, keep: &mut Vec<Box<[u8]>>, keep_max: usize) {
    let depth = 1 + rng.below(u64::from(MAX_DEPTH)) as u32;
    let path = rng.next_u64();
    let block = descend(depth, path, rng);
    keep.push(block);
    if keep.len() > keep_max {
        let excess = keep.len() - keep_max / 2;
        keep.drain(..excess);
    }
}

fn descend(depth: u32, path: u64, rng: &mut Rng) -> Box<[u8]> {
    if path & 1 == 0 {
        level::<false>(depth, path >> 1, rng)
    } else {
        level::<true>(depth, path >> 1, rng)
    }
}

/// One level of the recursion. `level::<false>` and `level::<true>` are two functions,
/// so each bit of the path picks which frame the stack gets.
#[inline(never)]
fn level<const RIGHT: bool>(depth: u32, path: u64, rng: &mut Rng) -> Box<[u8]> {
    let b = if depth == 0 {
        leaf(rng)
    } else {
        descend(depth - 1, path, rng)
    };
    black_box(b)
}

#[inline(never)]
fn leaf(rng: &mut Rng) -> Box<[u8]> {
    let words: Vec<String> = (0..1 + rng.below(16))
        .map(|i| format!("item-{i}-{}", rng.next_u64()))
        .collect();
    let mut grow = Vec::new();
    for i in 0..rng.below(512) {
        grow.push(i);
    }
    let mut map = HashMap::new();
    for w in &words {
        map.insert(w.clone(), w.len());
    }
    black_box((&words, &grow, &map));
    let size = match rng.below(100) {
        0 => 1 << 20,
        1..=9 => 16 * 1024 + rng.below(48 * 1024) as usize,
        _ => 16 + rng.below(2048) as usize,
    };
    vec![rng.next_u64() as u8; size].into_boxed_slice()
}

/// The process's resident set size in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

/// Reads `--name value` from the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: cannot parse {v:?}"))
        })
        .unwrap_or(default)
}

/// MiB with one decimal, for reports.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
