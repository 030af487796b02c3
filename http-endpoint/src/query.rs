//! Query strings and numbers read the way Go's `net/http` and `strconv` read them, so
//! that every parameter means here what it means to a Go server.

/// The first value of `key` in a raw query, percent-decoded with `+` as space, as Go's
/// `r.FormValue`. Pairs with a bad escape are skipped, as `url.ParseQuery` does.
pub(crate) fn form_value(raw_query: Option<&str>, key: &str) -> Option<String> {
    let raw = raw_query?;
    for pair in raw.split('&') {
        if pair.is_empty() || pair.contains(';') {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(k) = unescape(k) else { continue };
        if k != key {
            continue;
        }
        if let Some(v) = unescape(v) {
            return Some(v);
        }
    }
    None
}

/// Go's `url.QueryUnescape`: `%XX` escapes and `+` as space; `None` on a bad escape or
/// a result that is not UTF-8 (Go keeps the bytes; no parameter of ours can use them).
fn unescape(s: &str) -> Option<String> {
    String::from_utf8(percent_decode(s, true)?).ok()
}

/// Go's `url` unescaping: `%XX` escapes, and `+` as a space when `plus_is_space` (a
/// query; a path keeps its `+`). `None` for a `%` not followed by two hex digits.
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hi = (hex[0] as char).to_digit(16)?;
                let lo = (hex[1] as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Go's `v, _ := strconv.Atoi(s)`: an optional sign and decimal digits; anything else
/// is 0; out of range saturates (as `ParseInt` returns the bound with its error).
pub(crate) fn atoi(s: &str) -> i64 {
    parse_int(s).unwrap_or_else(|e| e)
}

/// Go's `strconv.ParseInt(s, 10, 64)`: `Ok` for a valid in-range number; `Err(v)` with
/// the value Go returns beside its error (0 for syntax errors, the bound for range).
pub(crate) fn parse_int(s: &str) -> Result<i64, i64> {
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(0);
    }
    let mut v: i128 = 0;
    for c in digits.bytes() {
        v = v * 10 + i128::from(c - b'0');
        if v > i128::from(i64::MAX) + 1 {
            break;
        }
    }
    let v = if neg { -v } else { v };
    match i64::try_from(v) {
        Ok(v) => Ok(v),
        Err(_) if neg => Err(i64::MIN),
        Err(_) => Err(i64::MAX),
    }
}

/// Go's `strconv.ParseUint(s, 0, 64)` as `/debug/pprof/symbol` uses it: `0x`, `0o`,
/// `0b` and leading-`0` octal prefixes, `_` separators after a prefix; `None` on error.
pub(crate) fn parse_uint_base0(s: &str) -> Option<u64> {
    let lower = s.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d, true)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d, true)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d, true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..], true)
    } else {
        (10, lower.as_str(), false)
    };
    let digits = if prefixed {
        digits.replace('_', "")
    } else {
        digits.to_string()
    };
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    u64::from_str_radix(&digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_as_go() {
        let q = Some("debug=1&seconds=&x=a+b%21&debug=2&bad=%zz&si=inuse_space");
        assert_eq!(form_value(q, "debug").as_deref(), Some("1"));
        assert_eq!(form_value(q, "seconds").as_deref(), Some(""));
        assert_eq!(form_value(q, "x").as_deref(), Some("a b!"));
        assert_eq!(form_value(q, "bad"), None);
        assert_eq!(form_value(q, "nope"), None);
        assert_eq!(form_value(None, "debug"), None);
        assert_eq!(form_value(Some("gc"), "gc").as_deref(), Some(""));
    }

    #[test]
    fn numbers_as_strconv() {
        assert_eq!(atoi("1"), 1);
        assert_eq!(atoi("+2"), 2);
        assert_eq!(atoi("-3"), -3);
        assert_eq!(atoi("x"), 0);
        assert_eq!(atoi(" 1"), 0);
        assert_eq!(atoi("0x1"), 0);
        assert_eq!(atoi("99999999999999999999"), i64::MAX);
        assert_eq!(parse_int("30"), Ok(30));
        assert_eq!(parse_int("1.5"), Err(0));
        assert_eq!(parse_int(""), Err(0));
        assert_eq!(parse_int("-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(parse_uint_base0("0x1f"), Some(31));
        assert_eq!(parse_uint_base0("0X1F"), Some(31));
        assert_eq!(parse_uint_base0("017"), Some(15));
        assert_eq!(parse_uint_base0("0b101"), Some(5));
        assert_eq!(parse_uint_base0("42"), Some(42));
        assert_eq!(parse_uint_base0("0"), Some(0));
        assert_eq!(parse_uint_base0("0x"), None);
        assert_eq!(parse_uint_base0("junk"), None);
        assert_eq!(parse_uint_base0("-1"), None);
    }
}
