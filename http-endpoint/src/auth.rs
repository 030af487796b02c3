//! The optional bearer token, compared in constant time.

use hyper::header::AUTHORIZATION;
use hyper::HeaderMap;

/// Whether `headers` carry `Authorization: Bearer <expected>` (scheme case-insensitive).
pub(crate) fn authorized(headers: &HeaderMap, expected: &str) -> bool {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some((scheme, presented)) = value.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ") & constant_time_eq(presented, expected.as_bytes())
}

/// Compares `presented` with `expected` in time that depends only on `presented`'s
/// length: every byte is compared (cycling over `expected`) and the differences are
/// OR-ed together, with no early exit. The length of the secret is not revealed by
/// timing; a length mismatch is folded into the same accumulator.
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    if expected.is_empty() {
        return false;
    }
    let mut diff = (presented.len() ^ expected.len()) as u64;
    for (i, &p) in presented.iter().enumerate() {
        let e = expected[i % expected.len()];
        diff |= u64::from(std::hint::black_box(p ^ e));
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn bearer_tokens() {
        assert!(authorized(&with_auth("Bearer s3cret"), "s3cret"));
        assert!(authorized(&with_auth("bearer s3cret"), "s3cret"));
        assert!(!authorized(&with_auth("Bearer s3cre"), "s3cret"));
        assert!(!authorized(&with_auth("Bearer s3cret!"), "s3cret"));
        assert!(!authorized(&with_auth("Bearer s3cres3cret"), "s3cret"));
        assert!(!authorized(&with_auth("Basic s3cret"), "s3cret"));
        assert!(!authorized(&with_auth("Bearer"), "s3cret"));
        assert!(!authorized(&HeaderMap::new(), "s3cret"));
        assert!(!constant_time_eq(b"", b""));
    }
}
