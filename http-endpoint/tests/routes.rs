//! Every route and every error of PPROF.md over real TCP, table-driven as Go's
//! `TestHandlers`: method, path and query → status, Content-Type, Content-Disposition,
//! nosniff, X-Go-Pprof and body. Then the token, the scraper rules (Alloy, Parca) and
//! the stats totals.

mod common;

use allocprof_http::{Config, Server};
use common::{decode, function_names, get, request, workload, Resp};
use std::alloc::System;
use std::net::SocketAddr;
use std::sync::OnceLock;

#[global_allocator]
static A: allocprof_core::Profiler<System> = allocprof_core::Profiler::new(System);

/// One server (and one workload) for the whole file.
fn server() -> SocketAddr {
    static SERVER: OnceLock<(Server, Vec<Vec<u8>>)> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let kept = workload();
            let server = Config::new()
                .addr("127.0.0.1:0")
                .max_delta_seconds(60)
                .max_body_bytes(4096)
                .serve()
                .expect("serve");
            (server, kept)
        })
        .0
        .local_addr()
}

const TEXT: &str = "text/plain; charset=utf-8";
const BIN: &str = "application/octet-stream";

#[derive(Debug)]
enum Body {
    /// Exactly this.
    Is(String),
    /// Contains each of these.
    Has(Vec<String>),
    /// A gzipped profile.
    Gzip,
    /// Empty (HEAD).
    Empty,
}

struct Case {
    method: &'static str,
    target: String,
    body: Vec<u8>,
    status: u16,
    content_type: &'static str,
    disposition: Option<&'static str>,
    go_error: bool,
    expect: Body,
}

fn case(method: &'static str, target: &str, status: u16, content_type: &'static str) -> Case {
    Case {
        method,
        target: target.to_string(),
        body: Vec::new(),
        status,
        content_type,
        disposition: None,
        go_error: false,
        expect: Body::Has(vec![]),
    }
}

impl Case {
    fn disposition(mut self, d: &'static str) -> Case {
        self.disposition = Some(d);
        self
    }
    fn body(mut self, b: &[u8]) -> Case {
        self.body = b.to_vec();
        self
    }
    fn is(mut self, s: &str) -> Case {
        self.expect = Body::Is(s.to_string());
        self
    }
    fn has(mut self, s: &[&str]) -> Case {
        self.expect = Body::Has(s.iter().map(|s| s.to_string()).collect());
        self
    }
    fn gzip(mut self) -> Case {
        self.expect = Body::Gzip;
        self
    }
    fn empty(mut self) -> Case {
        self.expect = Body::Empty;
        self
    }
    /// Go's `serveError`: text, `X-Go-Pprof: 1`, body `msg\n`.
    fn go_error(mut self, msg: &str) -> Case {
        self.go_error = true;
        self.expect = Body::Is(format!("{msg}\n"));
        self
    }

    fn check(&self, r: &Resp) {
        let what = format!("{} {}", self.method, self.target);
        assert_eq!(r.status, self.status, "{what}: status; body {:?}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some(self.content_type),
            "{what}: content type"
        );
        assert_eq!(
            r.header("content-disposition"),
            self.disposition,
            "{what}: disposition"
        );
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{what}: nosniff"
        );
        assert_eq!(
            r.header("x-go-pprof"),
            self.go_error.then_some("1"),
            "{what}: X-Go-Pprof"
        );
        match &self.expect {
            Body::Is(s) => assert_eq!(&r.text(), s, "{what}: body"),
            Body::Has(parts) => {
                let text = r.text();
                for p in parts {
                    assert!(
                        text.contains(p.as_str()),
                        "{what}: body lacks {p:?}:\n{text}"
                    );
                }
            }
            Body::Gzip => {
                let p = decode(&r.body);
                assert!(!p.sample.is_empty(), "{what}: no samples");
            }
            Body::Empty => assert!(r.body.is_empty(), "{what}: body not empty"),
        }
    }
}

/// A function of this binary whose address `/symbol` must resolve.
#[inline(never)]
fn endpoint_test_symbol_target() -> usize {
    std::hint::black_box(7)
}

#[test]
fn routes_as_go() {
    let addr = server();
    let cmdline: Vec<u8> = std::env::args().collect::<Vec<_>>().join("\0").into_bytes();
    let pc = endpoint_test_symbol_target as *const () as usize;
    let sym_line = format!("{pc:#x} routes::endpoint_test_symbol_target");
    let cases = vec![
        // The index, and the mux's redirect to it.
        case("GET", "/debug/pprof/", 200, "text/html; charset=utf-8").has(&[
            "Types of profiles available",
            "<a href='heap?debug=1'>heap</a>",
            "<a href='allocs?debug=1'>allocs</a>",
            "A sampling of all past memory allocations",
            "A sampling of memory allocations of live objects",
            "heap?format=svg&amp;si=inuse_space",
            "allocs?format=svg&amp;si=alloc_space",
            "href='stats'",
            "cmdline?debug=1",
        ]),
        case("GET", "/debug/pprof", 301, "text/html; charset=utf-8").has(&["/debug/pprof/"]),
        // Binary profiles.
        case("GET", "/debug/pprof/heap", 200, BIN)
            .disposition("attachment; filename=\"heap\"")
            .gzip(),
        case("GET", "/debug/pprof/allocs", 200, BIN)
            .disposition("attachment; filename=\"allocs\"")
            .gzip(),
        case("GET", "/debug/pprof/heap?gc=1", 200, BIN)
            .disposition("attachment; filename=\"heap\"")
            .gzip(),
        case("GET", "/debug/pprof/heap?debug=0", 200, BIN)
            .disposition("attachment; filename=\"heap\"")
            .gzip(),
        // A debug value that is not a number counts as 0.
        case("GET", "/debug/pprof/allocs?debug=yes", 200, BIN)
            .disposition("attachment; filename=\"allocs\"")
            .gzip(),
        case("HEAD", "/debug/pprof/heap", 200, BIN)
            .disposition("attachment; filename=\"heap\"")
            .empty(),
        // Legacy text.
        case("GET", "/debug/pprof/heap?debug=1", 200, TEXT).has(&[
            "heap profile: ",
            "@ heap/8192",
            "# AllocatedBytes = ",
            "endpoint_test_retained_blocks",
        ]),
        case("GET", "/debug/pprof/allocs?debug=1&gc=1", 200, TEXT).has(&["heap profile: "]),
        case("GET", "/debug/pprof/heap?debug=2", 200, TEXT).has(&["heap profile: "]),
        // Deltas.
        case("GET", "/debug/pprof/heap?seconds=1", 200, BIN)
            .disposition("attachment; filename=\"heap-delta\""),
        case("GET", "/debug/pprof/allocs?seconds=1&gc=1", 200, BIN)
            .disposition("attachment; filename=\"allocs-delta\""),
        // Go's errors, in Go's order.
        case("GET", "/debug/pprof/heap?seconds=0", 400, TEXT)
            .go_error(r#"invalid value for "seconds" - must be a positive integer"#),
        case("GET", "/debug/pprof/heap?seconds=-5", 400, TEXT)
            .go_error(r#"invalid value for "seconds" - must be a positive integer"#),
        case("GET", "/debug/pprof/allocs?seconds=1.5", 400, TEXT)
            .go_error(r#"invalid value for "seconds" - must be a positive integer"#),
        case("GET", "/debug/pprof/allocs?seconds=abc&debug=1", 400, TEXT)
            .go_error(r#"invalid value for "seconds" - must be a positive integer"#),
        case("GET", "/debug/pprof/heap?seconds=61", 400, TEXT)
            .go_error("profile duration exceeds server's WriteTimeout"),
        case("GET", "/debug/pprof/heap?seconds=61&debug=1", 400, TEXT)
            .go_error("profile duration exceeds server's WriteTimeout"),
        case("GET", "/debug/pprof/heap?seconds=1&debug=1", 400, TEXT)
            .go_error("seconds and debug params are incompatible"),
        case("GET", "/debug/pprof/goroutine", 404, TEXT).go_error("Unknown profile"),
        case("GET", "/debug/pprof/goroutine?seconds=1", 404, TEXT).go_error("Unknown profile"),
        case("GET", "/debug/pprof/profile", 404, TEXT).go_error("Unknown profile"),
        // Flame graphs and their parameter errors.
        case("GET", "/debug/pprof/heap?format=svg", 200, "image/svg+xml")
            .has(&["<svg", "heap profile: inuse_space"]),
        case(
            "GET",
            "/debug/pprof/allocs?format=svg&si=alloc_objects",
            200,
            "image/svg+xml",
        )
        .has(&["<svg", "allocs profile: alloc_objects"]),
        case(
            "GET",
            "/debug/pprof/allocs?seconds=1&format=svg",
            200,
            "image/svg+xml",
        )
        .has(&["<svg", "allocs profile: alloc_space", "delta over "]),
        case("GET", "/debug/pprof/heap?format=svg&si=bogus", 400, TEXT).go_error(
            "invalid value for \"si\" - must be one of alloc_objects, alloc_space, \
             inuse_objects, inuse_space (got \"bogus\")",
        ),
        case("GET", "/debug/pprof/heap?format=png", 400, TEXT)
            .go_error("invalid value for \"format\" - must be \"svg\" or absent (got \"png\")"),
        case("GET", "/debug/pprof/heap?format=svg&debug=1", 400, TEXT)
            .go_error("format and debug params are incompatible"),
        // cmdline: argv joined by NUL.
        case("GET", "/debug/pprof/cmdline", 200, TEXT).is(&String::from_utf8(cmdline).unwrap()),
        // symbol: GET, GET with a query, POST.
        case("GET", "/debug/pprof/symbol", 200, TEXT).is("num_symbols: 1\n"),
        case("GET", &format!("/debug/pprof/symbol?{pc:#x}"), 200, TEXT)
            .has(&["num_symbols: 1\n", &sym_line]),
        case("POST", "/debug/pprof/symbol", 200, TEXT)
            .body(format!("{pc:#x}+junk+0+{pc}").as_bytes())
            .is(&format!("num_symbols: 1\n{sym_line}\n{sym_line}\n")),
        case("POST", "/debug/pprof/symbol", 200, TEXT)
            .body(b"\xff\xfe+0x")
            .is("num_symbols: 1\n"),
        case("POST", "/debug/pprof/symbol", 413, TEXT)
            .body(&vec![b'1'; 5000])
            .go_error("request body larger than 4096 bytes"),
        // stats.
        case("GET", "/debug/pprof/stats", 200, "application/json")
            .has(&["\"allocated_bytes\": ", "\"symbol_cache_entries\": "]),
        // Methods.
        case("POST", "/debug/pprof/heap", 405, TEXT).go_error("Method Not Allowed"),
        case("PUT", "/debug/pprof/symbol", 405, TEXT).go_error("Method Not Allowed"),
        case("DELETE", "/debug/pprof/", 405, TEXT).go_error("Method Not Allowed"),
        case("BREW", "/debug/pprof/cmdline", 405, TEXT).go_error("Method Not Allowed"),
        // Outside the prefix.
        case("GET", "/", 404, TEXT).is("404 page not found\n"),
        case("GET", "/debug/pprofx", 404, TEXT).is("404 page not found\n"),
        // Paths as Go's server reads them: percent-decoded, and a bad escape is a bad
        // request before any handler.
        case("GET", "/debug/pprof/%68eap", 200, BIN)
            .disposition("attachment; filename=\"heap\"")
            .gzip(),
        case("GET", "/debug/%70prof/allocs?debug=1", 200, TEXT).has(&["heap profile: "]),
        case("GET", "/debug/pprof/%zz", 400, TEXT).is("400 Bad Request"),
        case("GET", "/debug/pprof/heap%", 400, TEXT).is("400 Bad Request"),
        // ServeMux's clean-path redirects, query kept.
        case("GET", "//debug/pprof/heap", 301, "text/html; charset=utf-8")
            .is("<a href=\"/debug/pprof/heap\">Moved Permanently</a>.\n\n"),
        case(
            "GET",
            "/debug/pprof/./heap?debug=1&gc=1",
            301,
            "text/html; charset=utf-8",
        )
        .is("<a href=\"/debug/pprof/heap?debug=1&amp;gc=1\">Moved Permanently</a>.\n\n"),
        case(
            "GET",
            "/debug/pprof/x/../allocs",
            301,
            "text/html; charset=utf-8",
        ),
        case("GET", "/debug/pprof/goroutine/", 404, TEXT).go_error("Unknown profile"),
    ];
    for c in &cases {
        let r = request(addr, c.method, &c.target, &[], &c.body);
        c.check(&r);
    }
    for (target, location) in [
        ("/debug/pprof", "/debug/pprof/"),
        ("/debug/pprof?debug=1", "/debug/pprof/?debug=1"),
        ("//debug/pprof/heap", "/debug/pprof/heap"),
        (
            "/debug//pprof/heap?seconds=1",
            "/debug/pprof/heap?seconds=1",
        ),
        ("/debug/pprof/x/../allocs", "/debug/pprof/allocs"),
        ("/debug/pprof/heap/..", "/debug/pprof"),
        ("/a/../%2e%2e/debug/pprof/", "/debug/pprof/"),
        ("/debug/pprof/./a%20b/", "/debug/pprof/a%20b/"),
    ] {
        let r = get(addr, target);
        assert_eq!(r.status, 301, "{target}");
        assert_eq!(r.header("location"), Some(location), "{target}");
    }
    let r = get(addr, "/debug/pprof/%zz");
    assert_eq!(
        r.header("connection"),
        Some("close"),
        "a bad request closes"
    );
    let r = request(addr, "POST", "/debug/pprof/heap", &[], &[]);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = request(addr, "PUT", "/debug/pprof/symbol", &[], &[]);
    assert_eq!(r.header("allow"), Some("GET, HEAD, POST"));
}

#[test]
fn bearer_token_on_and_off() {
    let _ = server(); // the workload
    let server = Config::new()
        .addr("127.0.0.1:0")
        .token(Some("s3cret-token"))
        .serve()
        .expect("serve");
    let addr = server.local_addr();
    let unauthorized = |r: &Resp, what: &str| {
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(r.text(), "Unauthorized\n", "{what}");
        assert_eq!(r.header("content-type"), Some(TEXT), "{what}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{what}"
        );
        assert_eq!(
            r.header("x-go-pprof"),
            Some("1"),
            "{what}: pprof shows the body"
        );
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"allocprof\""),
            "{what}"
        );
    };
    for target in [
        "/debug/pprof/",
        "/debug/pprof/heap",
        "/debug/pprof/symbol",
        "/nope",
    ] {
        unauthorized(&get(addr, target), target);
        for bad in [
            "Authorization: Bearer s3cret-toke",
            "Authorization: Bearer s3cret-token-",
            "Authorization: Basic s3cret-token",
            "Authorization: s3cret-token",
        ] {
            unauthorized(&request(addr, "GET", target, &[bad], &[]), bad);
        }
    }
    let ok = ["Authorization: Bearer s3cret-token"];
    let r = request(addr, "GET", "/debug/pprof/heap", &ok, &[]);
    assert_eq!(r.status, 200);
    decode(&r.body);
    let r = request(addr, "GET", "/debug/pprof/goroutine", &ok, &[]);
    assert_eq!(r.status, 404);
    let r = request(
        addr,
        "GET",
        "/debug/pprof/heap",
        &["authorization: bearer s3cret-token"],
        &[],
    );
    assert_eq!(r.status, 200, "the scheme is case-insensitive");
    // Without a token configured, no header is needed.
    assert_eq!(
        get(server_addr_without_token(), "/debug/pprof/heap").status,
        200
    );
    server.shutdown();
}

fn server_addr_without_token() -> SocketAddr {
    server()
}

/// What Grafana Alloy and Parca require of a scrape.
#[test]
fn scraper_rules() {
    let addr = server();
    for (target, delta) in [
        ("/debug/pprof/heap", false),
        ("/debug/pprof/allocs", false),
        ("/debug/pprof/allocs?seconds=1", true),
    ] {
        let r = get(addr, target);
        assert_eq!(r.status, 200, "{target}");
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("application/octet-stream"),
            "{target}"
        );
        assert_eq!(&r.body[..2], &[0x1f, 0x8b], "{target}: gzip magic");
        let p = decode(&r.body);
        assert_eq!(p.string_table[0], "", "{target}");
        for (i, m) in p.mapping.iter().enumerate() {
            assert_eq!(m.id, i as u64 + 1, "{target}: mapping ids 1..N");
        }
        for (i, l) in p.location.iter().enumerate() {
            assert_eq!(l.id, i as u64 + 1, "{target}: location ids 1..N");
            assert_ne!(l.address, 0, "{target}: location addresses are non-zero");
        }
        for (i, f) in p.function.iter().enumerate() {
            assert_eq!(f.id, i as u64 + 1, "{target}: function ids 1..N");
        }
        let mut addrs: Vec<u64> = p.location.iter().map(|l| l.address).collect();
        addrs.sort_unstable();
        addrs.dedup();
        assert_eq!(
            addrs.len(),
            p.location.len(),
            "{target}: distinct addresses"
        );
        for s in &p.sample {
            assert_eq!(s.value.len(), p.sample_type.len(), "{target}");
        }
        assert!(p.time_nanos > 0, "{target}: time_nanos");
        if delta {
            assert!(
                p.duration_nanos >= 1_000_000_000,
                "{target}: duration_nanos {}",
                p.duration_nanos
            );
        } else {
            assert_eq!(
                p.duration_nanos, 0,
                "{target}: duration_nanos on a cumulative profile"
            );
        }
        if !delta {
            let names = function_names(&p);
            assert!(
                names
                    .iter()
                    .any(|n| n.contains("endpoint_test_retained_blocks")),
                "{target}: {names:?}"
            );
        }
        let default = p.string_table[p.default_sample_type as usize].as_str();
        if target.contains("allocs") {
            assert_eq!(default, "alloc_space", "{target}");
        } else {
            assert_eq!(p.default_sample_type, 0, "{target}: heap leaves it unset");
        }
    }
}

/// The JSON endpoint returns `allocprof::stats()`: each total lies between a reading
/// taken before the request and one taken after (the totals only grow).
#[test]
fn stats_are_the_exact_totals() {
    let addr = server();
    let before = allocprof_core::stats();
    let r = get(addr, "/debug/pprof/stats");
    let after = allocprof_core::stats();
    assert_eq!(r.status, 200);
    let text = r.text();
    let json: Vec<(String, u64)> = text
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split(',')
        .map(|kv| {
            let (k, v) = kv.split_once(':').expect("key: value");
            (
                k.trim().trim_matches('"').to_string(),
                v.trim().parse().expect("a number"),
            )
        })
        .collect();
    let names: Vec<&str> = before.fields().iter().map(|(n, _)| *n).collect();
    let got: Vec<&str> = json.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(got, names, "every field of Stats, in order:\n{text}");
    let field = |s: &allocprof_core::Stats, name: &str| {
        s.fields().into_iter().find(|(n, _)| *n == name).unwrap().1
    };
    for name in [
        "allocated_bytes",
        "allocations",
        "freed_bytes",
        "frees",
        "samples",
    ] {
        let v = json.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(
            field(&before, name) <= v && v <= field(&after, name),
            "{name}: {} <= {v} <= {}",
            field(&before, name),
            field(&after, name)
        );
    }
    let rate = json.iter().find(|(n, _)| n == "sample_rate").unwrap().1;
    assert_eq!(rate, 4096);
}
