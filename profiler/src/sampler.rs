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
    let d = -ln(rng.next_unit()) * rate as f64;
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
    let p = one_minus_exp_neg(size as f64 / rate as f64);
    if p > 0.0 {
        1.0 / p
    } else {
        1.0
    }
}

// The two functions below replace libm's `log` and `expm1` on the sampled path. Those
// read tables and are called through the PLT; one sample apart, in a program that churns
// its heap, their lines have left the cache. These are short polynomials whose
// coefficients sit in this binary's read-only data, inlined into their callers: in the
// churn benchmark cachegrind counts about 40 first-level data misses a sample against 42
// with libm, for the same instructions. They are accurate to a few units in the last
// place (the tests compare them with libm), far beyond what the sampling needs: the
// weight is kept as an `f32`.

/// `ln 2` split in two, `LN2_HI` with its low 21 bits zero so that `k * LN2_HI` is exact
/// for the `k` used here, and `LN2_LO` the rest (the split of fdlibm and its descendants).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

/// `1 / (2j + 3)`: the series of `ln m` below, after its first term.
const LN_SERIES: [f64; 9] = {
    let mut c = [0.0; 9];
    let mut j = 0;
    while j < 9 {
        c[j] = 1.0 / (2 * j + 3) as f64;
        j += 1;
    }
    c
};

/// `(-1)^n / (n + 1)!`: `(1 - exp(-x)) / x = sum of c[n] x^n`.
const ONE_MINUS_EXP_SERIES: [f64; 15] = factorial_series(1);

/// `(-1)^n / n!`: `exp(-r) = sum of c[n] r^n`.
const EXP_NEG_SERIES: [f64; 15] = factorial_series(0);

/// `(-1)^n / (n + shift)!` for `n` in `0..15`.
const fn factorial_series(shift: usize) -> [f64; 15] {
    let mut c = [0.0; 15];
    let mut f = 1.0;
    let mut k = 1;
    while k <= shift {
        f *= k as f64;
        k += 1;
    }
    let mut n = 0;
    while n < 15 {
        c[n] = if n % 2 == 0 { 1.0 / f } else { -1.0 / f };
        n += 1;
        f *= (n + shift) as f64;
    }
    c
}

/// `sum of c[n] x^n`, by Horner's rule.
#[inline(always)]
fn horner(c: &[f64], x: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * x + k)
}

/// Natural logarithm of a positive, finite, normal `x`.
///
/// `x = m * 2^e` with `m` in `[sqrt(1/2), sqrt(2))`; then `ln x = e ln 2 + ln m`, and with
/// `s = (m - 1) / (m + 1)` (so `|s| < 0.172`), `ln m = 2 (s + s^3/3 + s^5/5 + ...)`,
/// where ten terms leave a relative error under 1e-16.
#[inline]
fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let ln_m = 2.0 * s + 2.0 * s * z * horner(&LN_SERIES, z);
    let ef = e as f64;
    ef * LN2_HI + (ln_m + ef * LN2_LO)
}

/// `1 - exp(-x)` for `x >= 0`, without cancellation for small `x`.
///
/// Below 1/2 by its Taylor series, `x - x^2/2! + x^3/3! - ...` (15 terms leave under
/// 1e-17); above, as `1 - 2^-k exp(-r)` with `x = k ln 2 + r`, `|r| <= ln 2 / 2`, and
/// `exp(-r)` by 15 terms of its series. From 40 on the result rounds to 1.
#[inline]
fn one_minus_exp_neg(x: f64) -> f64 {
    if x < 0.5 {
        return x * horner(&ONE_MINUS_EXP_SERIES, x);
    }
    if x >= 40.0 {
        return 1.0;
    }
    // Round to nearest (x > 0, so truncating x + 1/2 is the floor); k is in 1..=58.
    let k = (x * std::f64::consts::LOG2_E + 0.5) as i64;
    let kf = k as f64;
    let r = (x - kf * LN2_HI) - kf * LN2_LO;
    // 2^-k, a normal f64 built from its exponent bits.
    let scale = f64::from_bits(((1023 - k) as u64) << 52);
    1.0 - horner(&EXP_NEG_SERIES, r) * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative difference, or absolute next to zero.
    fn err(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
    }

    #[test]
    fn ln_agrees_with_libm() {
        let mut worst = 0.0f64;
        let mut check = |x: f64| {
            let (a, b) = (ln(x), x.ln());
            // ln is close to zero only near 1, where the error is relative to ln itself.
            worst = worst.max(if b == 0.0 { a.abs() } else { err(a, b) });
        };
        for x in [
            1.0,
            0.5,
            2.0,
            f64::MIN_POSITIVE,
            1.0 / (1u64 << 53) as f64,
            1.0 - f64::EPSILON / 2.0,
        ] {
            check(x);
        }
        let mut rng = Rng(seed(7));
        for _ in 0..200_000 {
            check(rng.next_unit());
            // Spread over many binades too.
            check(rng.next_unit() * (2.0f64).powi((rng.next_u64() % 200) as i32 - 100));
        }
        assert_eq!(ln(1.0), 0.0);
        assert!(worst < 4.0 * f64::EPSILON, "worst relative error {worst:e}");
    }

    #[test]
    fn one_minus_exp_neg_agrees_with_libm() {
        let mut worst = 0.0f64;
        let mut x = 1e-12;
        while x < 100.0 {
            let (a, b) = (one_minus_exp_neg(x), -(-x).exp_m1());
            worst = worst.max(err(a, b));
            x *= 1.0001;
        }
        for x in [
            0.0,
            0.5,
            0.5 - f64::EPSILON / 4.0,
            40.0,
            1e300,
            f64::INFINITY,
        ] {
            let (a, b) = (one_minus_exp_neg(x), -(-x).exp_m1());
            worst = worst.max(if b == 0.0 { a.abs() } else { err(a, b) });
        }
        assert!(worst < 4.0 * f64::EPSILON, "worst relative error {worst:e}");
    }

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
