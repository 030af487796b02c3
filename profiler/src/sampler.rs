//! The sampling math: where the next sample falls and what a sample stands for.
//!
//! # The process
//!
//! Like Go's runtime (`runtime/malloc.go`, `nextSample`), each thread runs a Poisson
//! process over the bytes it allocates, with one event per `rate` bytes on average: the
//! distance from one sample point to the next is exponentially distributed with mean
//! `rate`. An allocation is sampled when a sample point falls inside its bytes. After a
//! sample the next distance is drawn afresh from the end of that allocation (the overshoot
//! is dropped, as in Go); because the exponential distribution is memoryless this is
//! still exactly a Poisson process.
//!
//! # The estimator and its derivation
//!
//! For an allocation of `s` bytes, the number of sample points inside it is Poisson with
//! mean `s / R`, so the probability that it is sampled is
//!
//! ```text
//!     p(s) = 1 - P(no point in s bytes) = 1 - exp(-s / R).
//! ```
//!
//! Every allocation `i` is sampled independently of its size history with probability
//! `p(s_i)`. Give each sampled allocation the weight `w_i = 1 / p(s_i)` (Horvitz–Thompson).
//! Then for any set of allocations `A` (one call site, one time window, the live ones),
//!
//! ```text
//!     E[ sum_{i in A, sampled} w_i ]       = sum_{i in A} p(s_i) / p(s_i)       = |A|
//!     E[ sum_{i in A, sampled} w_i * s_i ] = sum_{i in A} p(s_i) s_i / p(s_i)   = bytes(A)
//! ```
//!
//! so both the object count and the byte count are unbiased. Frees of sampled objects are
//! credited with the same weight, so in-use estimates (allocated minus freed) are
//! unbiased too, and a sampled object that is freed leaves exactly zero behind.
//!
//! The variance of the byte estimate for `n` objects of size `s` is
//! `n * s^2 * (1 - p) / p`, which for `s << R` is about `n * s * R`: the standard deviation
//! of an estimate of `B` bytes is about `sqrt(B * R)`. Tests size their bounds from this.
//!
//! # Why the weight is taken at sampling time
//!
//! Go keys its records by (stack, size) and unbiases a record at encoding time with the
//! rate current then. We store `w_i` with each sample, using the rate the sample was drawn
//! under. That keeps every estimate right when the rate changes at run time, and avoids
//! the bias of summing samples of mixed sizes first and unbiasing the average after.
//!
//! When the rate is 1, every allocation is sampled and its weight is exactly 1.

/// A small, fast generator (xorshift64*), one per thread. Not cryptographic; it only has
/// to make sample points unpredictable to the program's allocation pattern.
#[derive(Clone, Copy)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    #[inline]
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    #[inline]
    fn next_unit(&mut self) -> f64 {
        // 53 random bits, shifted into (0, 1].
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A non-zero seed, different per thread and per process.
pub(crate) fn seed(salt: usize) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let n = COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = splitmix(n ^ t ^ (salt as u64).rotate_left(17));
    if x == 0 {
        x = 0x1234_5678_9ABC_DEF1;
    }
    x
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Distance in bytes to the next sample point: exponential with mean `rate`, rounded up
/// to whole bytes. Rounding up keeps the sampling probability exact: an allocation of `s`
/// bytes is sampled iff `ceil(d) <= s`, that is iff `d <= s`.
///
/// Must not allocate (called on the slow path of the allocator).
#[inline]
pub(crate) fn next_sample_distance(rng: &mut Rng, rate: usize) -> u64 {
    let d = -rng.next_unit().ln() * rate as f64;
    ceil_to_u64(d)
}

/// `ceil(d)` for `d >= 0`, saturating at `u64::MAX`. `f64::ceil` is a call into libm
/// on x86_64's baseline (no SSE4.1 `roundsd`); this is a conversion, a comparison and
/// an add.
#[inline]
fn ceil_to_u64(d: f64) -> u64 {
    // Saturating float-to-int conversion truncates toward zero, which for d >= 0 is the
    // floor; add one when that lost a fraction.
    let t = d as u64;
    t + u64::from((t as f64) < d && t < u64::MAX)
}

/// The weight of a sample of `size` bytes taken at `rate`: how many allocations it
/// stands for, `1 / (1 - exp(-size / rate))` (see the module docs). Exactly 1 when
/// every allocation is sampled.
#[inline]
pub fn sample_weight(size: usize, rate: usize) -> f64 {
    if rate <= 1 {
        return 1.0;
    }
    if size == 0 {
        // A zero-sized request is sampled only by a zero draw (probability ~1/rate per
        // event); count it once rather than divide by zero.
        return 1.0;
    }
    let p = -(-(size as f64) / rate as f64).exp_m1();
    if p > 0.0 {
        1.0 / p
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_matches_the_formula() {
        let r = 512 * 1024;
        assert_eq!(sample_weight(100, 1), 1.0);
        let w = sample_weight(r, r);
        assert!((w - 1.0 / (1.0 - (-1.0f64).exp())).abs() < 1e-12);
        // Large objects are (nearly) always sampled and stand for themselves.
        assert!((sample_weight(64 * r, r) - 1.0).abs() < 1e-12);
        // Small objects stand for about rate/size allocations.
        let w = sample_weight(64, r);
        assert!((w - r as f64 / 64.0).abs() / w < 1e-3);
    }

    #[test]
    fn ceil_to_u64_rounds_up() {
        for d in [
            0.0,
            0.25,
            1.0,
            1.5,
            2.0 - f64::EPSILON,
            4096.0,
            1e15 + 0.5,
            3.5e9,
        ] {
            assert_eq!(ceil_to_u64(d), d.ceil() as u64, "{d}");
        }
        assert_eq!(ceil_to_u64(1e30), u64::MAX);
        assert_eq!(ceil_to_u64(f64::INFINITY), u64::MAX);
    }

    #[test]
    fn distances_have_the_right_mean() {
        // Mean of n exponentials: sd of the mean is rate/sqrt(n); bound at 5 sd.
        let mut rng = Rng(seed(1));
        let rate = 4096usize;
        let n = 200_000;
        let sum: u64 = (0..n).map(|_| next_sample_distance(&mut rng, rate)).sum();
        let mean = sum as f64 / n as f64;
        // ceil adds 0.5 on average.
        let sd = rate as f64 / (n as f64).sqrt();
        assert!((mean - rate as f64 - 0.5).abs() < 5.0 * sd, "mean {mean}");
    }
}
