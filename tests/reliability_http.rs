//! Reliability, issue 6 point 5: hostile HTTP input against `allocprof::http::serve`,
//! over real TCP.
//!
//! * Fuzzed request targets (a seeded generator, printed on failure): known and unknown
//!   paths, random bytes raw and percent-encoded, invalid UTF-8 after decoding, huge and
//!   odd numbers, repeated and empty parameters, very long values; and fuzzed POST
//!   bodies for `/debug/pprof/symbol`. Every request gets a status below 500 (or 503,
//!   overload) or a closed connection; nothing in the process panics.
//! * 500 idle connections that never send a byte: a normal scrape is still answered.
//! * 10 000 requests in a row (keep-alive, a new connection every 100): all answered,
//!   no file descriptor leaked.
//! * Oversized requests (a 1 MiB request line, 1 MiB of headers, a 10 MiB body, a header
//!   that never ends): an error status or a closed connection, and the server keeps
//!   serving.
//!
//! A panic hook counts panics in the whole process (the server runs on its own thread
//! here), so a panic the server swallows by closing the connection still fails the test.
#![cfg(feature = "http")]

use std::alloc::System;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

/// Socket timeout of the test's clients: deadlock detection, not a performance bound.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

static PANICS: AtomicU64 = AtomicU64::new(0);
static HOOK: Once = Once::new();

/// Counts every panic in the process, then runs the default hook.
fn count_panics() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::Relaxed);
            previous(info);
        }));
    });
}

/// One server at a time (the idle-connection test would starve the others).
static SERIAL: Mutex<()> = Mutex::new(());

fn start(config: allocprof::http::Config) -> allocprof::http::Server {
    count_panics();
    config
        .addr("127.0.0.1:0")
        .serve()
        .expect("start the server")
}

/// What a raw exchange ended with.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A response with this status.
    Status(u16),
    /// The server closed (or reset) the connection without a response.
    Closed,
}

/// Sends `request` on a fresh connection and reads until the server closes it.
fn exchange(addr: SocketAddr, request: &[u8]) -> Outcome {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    // The server may answer and close before it read everything: a failed write is fine.
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("no answer and no close within {IO_TIMEOUT:?}: {e}"),
    }
    status_of(&response).map_or(Outcome::Closed, Outcome::Status)
}

fn status_of(response: &[u8]) -> Option<u16> {
    let head = response.get(..12)?;
    let text = std::str::from_utf8(head).ok()?;
    text.strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))?
        .get(..3)?
        .parse()
        .ok()
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").into_bytes()
}

/// The server still answers a normal scrape with a profile.
fn still_serving(addr: SocketAddr, after: &str) {
    assert_eq!(
        exchange(addr, &get("/debug/pprof/heap")),
        Outcome::Status(200),
        "no profile after {after}"
    );
}

fn acceptable(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Closed => true,
        Outcome::Status(s) => *s < 500 || *s == 503,
    }
}

// ---------------------------------------------------------------------------------------
// Fuzzing.

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const PATHS: &[&str] = &[
    "/debug/pprof/heap",
    "/debug/pprof/allocs",
    "/debug/pprof/",
    "/debug/pprof",
    "/debug/pprof/symbol",
    "/debug/pprof/cmdline",
    "/debug/pprof/profile",
    "/debug/pprof/goroutine",
    "/debug/pprof/heap/",
    "/debug/pprof/heap/../allocs",
    "//debug//pprof//heap",
    "/debug/pprof/%68eap",
    "/debug/pprof/heap%00",
    "/debug/pprof/%FF%FE",
    "/",
    "*",
    "",
];

const NAMES: &[&str] = &[
    "debug",
    "seconds",
    "gc",
    "si",
    "sample_index",
    "token",
    "",
    "%64ebug",
    "debug%00",
    "%FF",
];

const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "-1",
    "+1",
    "1e3",
    "0x10",
    "1.5",
    "",
    "99999999999999999999999999999999",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "%FF%FE%FD",
    "%C3%28",
    "%",
    "%4",
    "%zz",
    "%00",
    "%2B1",
    "%31",
    "inuse_space",
    "alloc_objects",
    "%E2%82",
    "a=b=c",
    "1%20",
];

/// Up to `max_len` random bytes, percent-encoded (alphanumerics left raw).
fn random_bytes(rng: &mut Rng, max_len: usize) -> String {
    let len = rng.below(max_len + 1);
    (0..len)
        .map(|_| {
            let b = rng.next_u64() as u8;
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A random request target.
fn target(rng: &mut Rng) -> String {
    let mut t = match rng.below(10) {
        0 => format!("/debug/pprof/{}", random_bytes(rng, 40)),
        _ => rng.pick(PATHS).to_string(),
    };
    let params = rng.below(7);
    for i in 0..params {
        t.push(if i == 0 {
            '?'
        } else {
            ['&', ';'][rng.below(2)]
        });
        let name = match rng.below(8) {
            0 => random_bytes(rng, 10),
            _ => rng.pick(NAMES).to_string(),
        };
        let value = match rng.below(10) {
            0 => random_bytes(rng, 30),
            1 => "9".repeat(1 + rng.below(5000)),
            2 => format!("{}", rng.next_u64()),
            _ => rng.pick(VALUES).to_string(),
        };
        match rng.below(6) {
            0 => t.push_str(&name),
            1 => t.push_str(&format!("{name}=={value}")),
            _ => t.push_str(&format!("{name}={value}")),
        }
    }
    t
}

/// A random `/debug/pprof/symbol` POST body: addresses, huge numbers, garbage.
fn symbol_body(rng: &mut Rng) -> String {
    let n = rng.below(20);
    let parts: Vec<String> = (0..n)
        .map(|_| match rng.below(6) {
            0 => format!("0x{:x}", rng.next_u64()),
            1 => format!("{}", rng.next_u64()),
            2 => "0x".to_string() + &"f".repeat(1 + rng.below(100)),
            3 => random_bytes(rng, 20),
            4 => String::new(),
            _ => format!("0x{:x}", rng.below(1 << 30)),
        })
        .collect();
    parts.join(["+", " ", "\n", "++"][rng.below(4)])
}

/// One fuzzed request as raw bytes.
fn fuzz_request(rng: &mut Rng) -> Vec<u8> {
    match rng.below(10) {
        0 => {
            let body = symbol_body(rng);
            format!(
                "POST /debug/pprof/symbol HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
        1 => {
            // Raw bytes in the request target, including invalid UTF-8 and controls.
            let mut raw = b"GET /debug/pprof/heap?debug=".to_vec();
            raw.extend((0..rng.below(30)).map(|_| rng.next_u64() as u8));
            raw.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            raw
        }
        2 => {
            // Repeated parameters.
            let name = rng.pick(NAMES);
            let mut t = "/debug/pprof/heap?".to_string();
            for _ in 0..1 + rng.below(200) {
                t.push_str(&format!("{name}={}&", rng.pick(VALUES)));
            }
            get(&t)
        }
        _ => get(&target(rng)),
    }
}

#[test]
fn fuzzed_paths_queries_and_bodies() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Deltas (`seconds=N`) are capped at 1 s so a fuzzed `seconds=1` costs one second.
    let server = start(allocprof::http::Config::new().max_delta_seconds(1));
    let addr = server.local_addr();
    const CLIENTS: u64 = 4;
    const PER_CLIENT: usize = 250;
    let seed = std::env::var("ALLOCPROF_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0FA1_1C0F);
    let panics_before = PANICS.load(Ordering::Relaxed);
    let results: Vec<Vec<(Vec<u8>, Outcome)>> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                scope.spawn(move || {
                    let mut rng = Rng((seed ^ (c + 1).wrapping_mul(0x9E37_79B9)) | 1);
                    (0..PER_CLIENT)
                        .map(|_| {
                            let request = fuzz_request(&mut rng);
                            let outcome = exchange(addr, &request);
                            (request, outcome)
                        })
                        .collect()
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|c| c.join().expect("client panicked"))
            .collect()
    });
    let mut by_status = std::collections::BTreeMap::new();
    for (request, outcome) in results.iter().flatten() {
        *by_status.entry(format!("{outcome:?}")).or_insert(0) += 1;
        let shown = String::from_utf8_lossy(&request[..request.len().min(300)]);
        assert!(
            acceptable(outcome),
            "seed {seed:#x}: {outcome:?} for {shown:?}"
        );
    }
    println!(
        "{} fuzzed requests (seed {seed:#x}): {by_status:?}",
        CLIENTS as usize * PER_CLIENT
    );
    assert_eq!(
        PANICS.load(Ordering::Relaxed),
        panics_before,
        "seed {seed:#x}: something panicked while serving fuzzed requests"
    );
    still_serving(addr, "the fuzzed requests");
    server.shutdown();
}

// ---------------------------------------------------------------------------------------
// Idle connections, many requests, oversized requests.

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[test]
fn five_hundred_idle_connections() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = start(allocprof::http::Config::new());
    let panics_before = PANICS.load(Ordering::Relaxed);
    let addr = server.local_addr();
    let t = Instant::now();
    let idle: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(addr).expect("connect idle"))
        .collect();
    // Beyond max_connections the server stops accepting; once the kernel's accept queue
    // is full too, connects wait for SYN retransmissions.
    println!("500 idle connections established in {:?}", t.elapsed());
    let t = Instant::now();
    let answered = exchange(addr, &get("/debug/pprof/heap"));
    let waited = t.elapsed();
    println!(
        "with 500 idle connections open, a scrape got {answered:?} after {waited:?} \
         (read timeout {:?}, max connections {})",
        allocprof::http::DEFAULT_READ_TIMEOUT,
        allocprof::http::DEFAULT_MAX_CONNECTIONS
    );
    assert_eq!(answered, Outcome::Status(200));
    // The server closes idle connections after its read timeout: count those it closed.
    let mut closed = 0;
    for mut s in idle {
        s.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 1];
        match s.read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    println!("{closed} of 500 idle connections already closed by the server");
    let t = Instant::now();
    still_serving(addr, "500 idle connections");
    println!(
        "after the clients closed them, a scrape took {:?}",
        t.elapsed()
    );
    assert_eq!(
        PANICS.load(Ordering::Relaxed),
        panics_before,
        "a panic in the process"
    );
    let t = Instant::now();
    server.shutdown();
    println!("shutdown took {:?}", t.elapsed());
}

#[test]
fn ten_thousand_requests_in_a_row() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = start(allocprof::http::Config::new());
    let panics_before = PANICS.load(Ordering::Relaxed);
    let addr = server.local_addr();
    let fds_before = open_fds();
    let targets = [
        "/debug/pprof/",
        "/debug/pprof/cmdline",
        "/debug/pprof/symbol",
        "/debug/pprof/nothing",
        "/debug/pprof/heap?debug=1",
    ];
    let expected = [200, 200, 200, 404, 200];
    let mut statuses = [0usize; 5];
    let mut stream: Option<std::io::BufReader<TcpStream>> = None;
    for i in 0..10_000 {
        if i % 100 == 0 {
            let s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            stream = Some(std::io::BufReader::new(s));
        }
        let reader = stream.as_mut().expect("connection");
        // Profiles are the expensive answer: one in 100.
        let k = if i % 100 == 50 { 4 } else { i % 4 };
        let request =
            format!("GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n", targets[k]).into_bytes();
        reader.get_mut().write_all(&request).expect("send");
        let status = read_response(reader)
            .unwrap_or_else(|| panic!("request {i} ({}): no response", targets[k]));
        assert_eq!(status, expected[k], "request {i}: {}", targets[k]);
        statuses[k] += 1;
    }
    drop(stream);
    still_serving(addr, "10 000 requests");
    // Wait for the server to close its side of the finished connections.
    let deadline = Instant::now() + IO_TIMEOUT;
    while open_fds() > fds_before + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "10 000 requests on 100 keep-alive connections: {statuses:?} by target {targets:?}; \
         open fds {fds_before} before, {} after",
        open_fds()
    );
    assert!(
        open_fds() <= fds_before + 2,
        "file descriptors leaked: {fds_before} before, {} after",
        open_fds()
    );
    assert_eq!(
        PANICS.load(Ordering::Relaxed),
        panics_before,
        "a panic in the process"
    );
    server.shutdown();
}

/// Reads one HTTP/1.1 response (status line, headers, a Content-Length or chunked
/// body) and returns its status.
fn read_response(r: &mut std::io::BufReader<TcpStream>) -> Option<u16> {
    use std::io::BufRead;
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let status = status_of(line.as_bytes())?;
    let mut length = None;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
        }
    } else {
        let mut body = vec![0u8; length.unwrap_or(0)];
        r.read_exact(&mut body).ok()?;
    }
    Some(status)
}

#[test]
fn oversized_requests() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = start(allocprof::http::Config::new());
    let panics_before = PANICS.load(Ordering::Relaxed);
    let addr = server.local_addr();
    let mib = 1 << 20;
    let long_line = get(&format!("/debug/pprof/heap?debug={}", "1".repeat(mib)));
    let mut many_headers = b"GET /debug/pprof/heap HTTP/1.1\r\nHost: x\r\n".to_vec();
    while many_headers.len() < mib {
        many_headers.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    many_headers.extend_from_slice(b"Connection: close\r\n\r\n");
    let big_body = {
        let body = "0x1+".repeat(10 * mib / 4);
        let mut r = format!(
            "POST /debug/pprof/symbol HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body.as_bytes());
        r
    };
    let mut endless_header = b"GET /debug/pprof/heap HTTP/1.1\r\nX-Endless: ".to_vec();
    endless_header.extend(std::iter::repeat_n(b'a', mib));
    let huge_length = b"POST /debug/pprof/symbol HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
        Content-Length: 99999999999999999999999\r\n\r\n0x1"
        .to_vec();
    let cases: [(&str, Vec<u8>); 5] = [
        ("a 1 MiB request line", long_line),
        ("1 MiB of headers", many_headers),
        ("a 10 MiB body", big_body),
        ("a 1 MiB header that never ends", endless_header),
        ("an absurd Content-Length", huge_length),
    ];
    for (what, request) in cases {
        let outcome = exchange(addr, &request);
        println!("{what}: {outcome:?}");
        assert!(
            outcome == Outcome::Closed
                || matches!(outcome, Outcome::Status(s) if (400..500).contains(&s)),
            "{what}: {outcome:?}"
        );
        still_serving(addr, what);
    }
    assert_eq!(
        PANICS.load(Ordering::Relaxed),
        panics_before,
        "a panic in the process"
    );
    server.shutdown();
}
