//! Request paths as Go's server and `ServeMux` see them: percent-decoded, then cleaned,
//! with a redirect when cleaning changed them.
//!
//! * Go's server parses the request target with `url.ParseRequestURI`, which decodes
//!   `%XX` escapes in the path (`+` stays `+`); a bad escape fails the parse and the
//!   server answers `400 Bad Request` without calling any handler. (The decoding is
//!   `query::percent_decode`, shared with the query's.)
//! * `ServeMux` routes on the decoded path after `cleanPath` (`path.Clean`, keeping a
//!   trailing slash). If that differs from the request's path it answers 301 with the
//!   clean path (and the original query) instead, so `//debug/pprof/heap` and
//!   `/debug/pprof/./heap` reach the heap profile after one redirect.

/// Go's `cleanPath`: a leading `/`, no empty, `.` or `..` elements (`..` removes the
/// element before it and stops at the root), and the trailing slash kept when the path
/// had one and is not just `/`.
pub(crate) fn clean(p: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in p.split(|&c| c == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            _ => parts.push(part),
        }
    }
    let mut out = Vec::with_capacity(p.len() + 1);
    for part in &parts {
        out.push(b'/');
        out.extend_from_slice(part);
    }
    if out.is_empty() || (p.ends_with(b"/") && !out.ends_with(b"/")) {
        out.push(b'/');
    }
    out
}

/// Go's `url.URL.EscapedPath` for a path without a raw form: every byte escaped as
/// `%XX` except letters, digits, `-._~` and `$&+,/:;=@`.
pub(crate) fn escape(p: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(p.len());
    for &c in p {
        if c.is_ascii_alphanumeric() || b"-._~$&+,/:;=@".contains(&c) {
            out.push(c as char);
        } else {
            let _ = write!(out, "%{c:02X}");
        }
    }
    out
}

/// Go's `htmlEscape` (the `href` of a redirect's body).
pub(crate) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cleaned(p: &str) -> String {
        String::from_utf8(clean(p.as_bytes())).unwrap()
    }

    /// Paths are decoded as `url.ParseRequestURI` decodes them (`query::percent_decode`
    /// without `+` as space).
    #[test]
    fn decodes_like_url_parse() {
        let decode = |p| crate::query::percent_decode(p, false);
        assert_eq!(decode("/debug/pprof/%68eap").unwrap(), b"/debug/pprof/heap");
        assert_eq!(decode("/a+b%2Fc%2f").unwrap(), b"/a+b/c/");
        assert_eq!(decode("/%e2%82%ac").unwrap(), "/€".as_bytes());
        assert_eq!(decode("/%00").unwrap(), b"/\0");
        assert_eq!(decode("/%zz"), None);
        assert_eq!(decode("/%4"), None);
        assert_eq!(decode("/%"), None);
    }

    /// Cases of Go's `path.Clean` tests, with `cleanPath`'s leading and trailing slash.
    #[test]
    fn cleans_like_serve_mux() {
        for (p, want) in [
            ("", "/"),
            ("/", "/"),
            ("/debug/pprof/", "/debug/pprof/"),
            ("/debug/pprof", "/debug/pprof"),
            ("//debug/pprof/heap", "/debug/pprof/heap"),
            ("/debug//pprof///heap", "/debug/pprof/heap"),
            ("/debug/pprof/./heap", "/debug/pprof/heap"),
            ("/debug/pprof/x/../heap", "/debug/pprof/heap"),
            ("/debug/pprof/heap/.", "/debug/pprof/heap"),
            ("/debug/pprof/heap/..", "/debug/pprof"),
            ("/debug/pprof/heap/../", "/debug/pprof/"),
            ("/../../debug/pprof/", "/debug/pprof/"),
            ("/..", "/"),
            ("debug/pprof/heap", "/debug/pprof/heap"),
            ("/abc/def/../../..", "/"),
            ("/...", "/..."),
            ("/.heap", "/.heap"),
        ] {
            assert_eq!(cleaned(p), want, "clean({p:?})");
        }
    }

    #[test]
    fn escapes_like_escaped_path() {
        assert_eq!(escape(b"/debug/pprof/heap"), "/debug/pprof/heap");
        assert_eq!(escape(b"/a b?c#d%e"), "/a%20b%3Fc%23d%25e");
        assert_eq!(escape("/€".as_bytes()), "/%E2%82%AC");
        assert_eq!(escape(b"/$&+,:;=@-._~"), "/$&+,:;=@-._~");
        assert_eq!(
            html_escape("/x?a=1&b=<'\">"),
            "/x?a=1&amp;b=&lt;&#39;&#34;&gt;"
        );
    }
}
