//! The endpoint under load and abuse: concurrent scrapes while threads allocate, garbage
//! and slow clients, a delta whose client leaves, shutdown and a dropped handle.

mod common;

use allocprof_http::{Config, Server};
use common::{connect, decode, exchange, get, read_response, wait_for, workload};
use std::alloc::System;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[global_allocator]
static A: allocprof_core::Profiler<System> = allocprof_core::Profiler::new(System);

/// A hang guard for waits on the server (not a timing assertion).
const LIMIT: Duration = Duration::from_secs(30);

fn start() -> Server {
    Config::new()
        .addr("127.0.0.1:0")
        .read_timeout(Duration::from_secs(1))
        .max_header_bytes(16 * 1024)
        .serve()
        .expect("serve")
}

/// The server still answers a normal scrape.
fn still_serving(addr: SocketAddr, after: &str) {
    let r = get(addr, "/debug/pprof/heap");
    assert_eq!(r.status, 200, "after {after}");
    decode(&r.body);
}

#[inline(never)]
fn endpoint_test_background_allocator(stop: &AtomicBool) {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        kept.push(black_box(vec![i as u8; 512 + i % 4096]));
        if kept.len() > 2000 {
            kept.drain(..1000);
        }
        black_box(format!("key-{i}"));
        i += 1;
    }
}

#[test]
fn fifty_concurrent_scrapes_while_threads_allocate() {
    let _kept = workload();
    let server = start();
    let addr = server.local_addr();
    let stop = AtomicBool::new(false);
    let targets = [
        "/debug/pprof/heap",
        "/debug/pprof/allocs",
        "/debug/pprof/heap?debug=1",
        "/debug/pprof/allocs?format=svg",
        "/debug/pprof/stats",
    ];
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| endpoint_test_background_allocator(&stop));
        }
        // Stops the allocators on every way out of this closure, a failed assertion too.
        let _stop = common::StopOnDrop(&stop);
        let scrapes: Vec<_> = (0..50)
            .map(|i| {
                let target = targets[i % targets.len()];
                s.spawn(move || (target, get(addr, target)))
            })
            .collect();
        for h in scrapes {
            let (target, r) = h.join().expect("scrape thread");
            assert_eq!(r.status, 200, "{target}: {}", r.text());
            if !target.contains('?') && !target.ends_with("stats") {
                let p = decode(&r.body);
                assert!(!p.sample.is_empty(), "{target}");
            } else if target.contains("svg") {
                assert!(r.text().contains("</svg>"), "{target}");
            } else if target.contains("debug=1") {
                assert!(r.text().starts_with("heap profile: "), "{target}");
            }
        }
    });
    still_serving(addr, "the concurrent scrapes");
    server.shutdown();
}

#[test]
fn garbage_requests_get_an_error_or_a_closed_connection() {
    let server = start();
    let addr = server.local_addr();
    let huge_header = format!(
        "GET /debug/pprof/heap HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let many_headers = format!(
        "GET /debug/pprof/heap HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..200)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown method", b"BREW /debug/pprof/heap HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("huge header", huge_header.into_bytes()),
        ("too many headers", many_headers.into_bytes()),
        (
            "invalid UTF-8 in the path",
            b"GET /debug/pprof/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "invalid UTF-8 in the query",
            b"GET /debug/pprof/heap?debug=\xc3\x28 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("binary noise", (0..=255u8).cycle().take(4096).collect()),
        ("empty lines", b"\r\n\r\n\r\n\r\n".to_vec()),
        ("not HTTP", b"HELLO\r\n\r\n".to_vec()),
        ("bad version", b"GET /debug/pprof/heap HTTP/9.9\r\n\r\n".to_vec()),
        (
            "bad content length",
            b"POST /debug/pprof/symbol HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(),
        ),
        (
            "bad chunked body",
            b"POST /debug/pprof/symbol HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        ),
    ];
    for (what, raw) in &cases {
        match exchange(addr, raw) {
            Ok(r) => {
                eprintln!("{what}: {} {:?}", r.status, r.text());
                assert!(r.status >= 400, "{what}: got {} {:?}", r.status, r.text());
            }
            Err(e) => eprintln!("{what}: connection closed without a response ({e})"),
        }
        still_serving(addr, what);
    }

    // A truncated body, the client then half-closes: an error or a closed connection.
    let mut s = connect(addr);
    s.write_all(
        b"POST /debug/pprof/symbol HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0x1+0x2",
    )
    .unwrap();
    common::finish_writing(&s);
    if let Ok(r) = read_response(&mut s) {
        assert!(
            r.status >= 400,
            "truncated body: {} {:?}",
            r.status,
            r.text()
        );
    }
    still_serving(addr, "a truncated body");

    // A truncated body, the client then stalls: 408 after the read timeout.
    let mut s = connect(addr);
    s.write_all(b"POST /debug/pprof/symbol HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0x1")
        .unwrap();
    let r = read_response(&mut s).expect("a response to a stalled body");
    assert_eq!(r.status, 408, "{:?}", r.text());
    still_serving(addr, "a stalled body");

    // A client that sends nothing, or half a request line: closed after the read timeout.
    for (what, sent) in [
        ("nothing", &b""[..]),
        ("half a request line", &b"GET /debug/pp"[..]),
    ] {
        let mut s = connect(addr);
        s.write_all(sent).unwrap();
        let mut buf = Vec::new();
        // Returns when the server closes (EOF or reset); the socket timeout guards a hang.
        let res = s.read_to_end(&mut buf);
        assert!(
            !matches!(&res, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
            "{what}: the server kept the connection open"
        );
        if !buf.is_empty() {
            let r = common::parse(&buf).expect("a response");
            assert!(r.status >= 400, "{what}: {}", r.status);
        }
        still_serving(addr, what);
    }
    server.shutdown();
}

#[test]
fn a_delta_whose_client_leaves_stops_waiting() {
    let server = start();
    let addr = server.local_addr();
    let mut s = connect(addr);
    s.write_all(b"GET /debug/pprof/heap?seconds=120 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    wait_for("the delta to start waiting", LIMIT, || {
        server.waiting_deltas() == 1
    });
    drop(s);
    // Were the wait not cancelled, it would last 120 s; the guard fails at 30 s.
    wait_for("the delta to stop waiting", LIMIT, || {
        server.waiting_deltas() == 0
    });
    still_serving(addr, "a departed delta client");
    server.shutdown();
}

#[test]
fn shutdown_answers_waiting_deltas_and_stops() {
    let server = start();
    let addr = server.local_addr();
    let mut s = connect(addr);
    s.write_all(b"GET /debug/pprof/allocs?seconds=120 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    wait_for("the delta to start waiting", LIMIT, || {
        server.waiting_deltas() == 1
    });
    server.shutdown();
    let r = read_response(&mut s).expect("the waiting delta is answered");
    assert_eq!(r.status, 500);
    assert_eq!(r.text(), "context canceled\n");
    assert_eq!(r.header("x-go-pprof"), Some("1"));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the listener is closed after shutdown"
    );
}

#[test]
fn dropping_the_handle_leaves_the_server_running() {
    let server = start();
    let addr = server.local_addr();
    drop(server);
    still_serving(addr, "dropping the handle");
    let thread_names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    assert!(
        thread_names.iter().any(|n| n == "allocprof-http"),
        "a thread named allocprof-http: {thread_names:?}"
    );
}

/// An application runtime whose only thread is blocked does not stall a profile: the
/// endpoint has its own thread and runtime.
#[test]
fn a_blocked_application_runtime_does_not_stall_profiles() {
    let server = start();
    let addr = server.local_addr();
    let release = std::sync::Arc::new(AtomicBool::new(false));
    let blocked = {
        let release = release.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // Blocks the runtime's only thread, as a misbehaving task would.
                while !release.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        })
    };
    still_serving(addr, "blocking an application runtime");
    release.store(true, Ordering::Relaxed);
    blocked.join().unwrap();
    server.shutdown();
}

/// Keep-alive: several requests on one connection, then the idle connection is closed
/// by the read timeout.
#[test]
fn keep_alive_then_idle_close() {
    let server = start();
    let addr = server.local_addr();
    let mut s = connect(addr);
    for _ in 0..3 {
        s.write_all(b"GET /debug/pprof/symbol HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while common::parse(&buf).is_none_or(|r| r.body != b"num_symbols: 1\n") {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed early");
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    let mut rest = Vec::new();
    let res = s.read_to_end(&mut rest);
    assert!(
        res.is_ok()
            || res
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
    );
    assert!(rest.is_empty());
    server.shutdown();
}

#[test]
fn connections_beyond_the_cap_get_503_at_once_and_slots_free_up() {
    let server = Config::new()
        .addr("127.0.0.1:0")
        .read_timeout(Duration::from_secs(2))
        .max_connections(2)
        .serve()
        .expect("serve");
    let addr = server.local_addr();
    // Two idle clients hold both slots.
    let idle: Vec<std::net::TcpStream> = (0..2).map(|_| connect(addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let r = get(addr, "/debug/pprof/heap");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.text(), "too many connections\n");
    // The server closes the idle ones after its read timeout, freeing their slots,
    // while they are still open on the client side.
    wait_for("a free slot", LIMIT, || {
        get(addr, "/debug/pprof/heap").status == 200
    });
    still_serving(addr, "the connection cap");
    drop(idle);
    server.shutdown();
}
