//! Helpers shared by the endpoint's integration tests: a raw HTTP/1.1 client over real
//! TCP, profile decoding, `go tool pprof`, and a workload with recognizable names.
#![allow(dead_code)]

use allocprof_core::pprof::proto;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

#[path = "../../../tests/common/profile_tools.rs"]
pub mod profile_tools;
#[path = "../../../tests/common/temp.rs"]
pub mod temp;

#[allow(unused_imports)] // not every test binary uses them all
pub use profile_tools::{decode, go_pprof, go_pprof_with_stderr, have_go};
pub use temp::TempPath;

/// How long a test waits on a socket before failing instead of hanging.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Connects with read/write timeouts set.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the endpoint");
    s.set_read_timeout(Some(SOCKET_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(SOCKET_TIMEOUT)).unwrap();
    s
}

/// Sends `raw` bytes, half-closes nothing, and reads until the server closes.
/// `Err` when the connection was reset or closed without any response bytes.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Resp> {
    let mut s = connect(addr);
    s.write_all(raw)?;
    read_response(&mut s)
}

/// Reads a whole response (the request asked for `Connection: close`, or the server
/// closes after an error).
pub fn read_response(s: &mut TcpStream) -> std::io::Result<Resp> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    parse(&buf).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "no complete response ({} bytes: {:?})",
                buf.len(),
                String::from_utf8_lossy(&buf[..buf.len().min(200)])
            ),
        )
    })
}

/// Parses one response (Content-Length, chunked, or until close).
pub fn parse(buf: &[u8]) -> Option<Resp> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &buf[end + 4..];
    let resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    let body = if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest)?
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().ok()?;
        rest.get(..len).unwrap_or(rest).to_vec()
    } else {
        rest.to_vec()
    };
    Some(Resp { body, ..resp })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..nl]).ok()?.trim(), 16).ok()?;
        b = &b[nl + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// `METHOD target` with `Connection: close`, extra header lines and a body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[&str],
    body: &[u8],
) -> Resp {
    let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        raw.push_str(h);
        raw.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    exchange(addr, &raw).unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

/// `GET target`.
pub fn get(addr: SocketAddr, target: &str) -> Resp {
    request(addr, "GET", target, &[], &[])
}

/// Half-closes the write side (the request is complete; some tests send garbage).
pub fn finish_writing(s: &TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
}

/// Every function name in a decoded profile.
pub fn function_names(p: &proto::Profile) -> Vec<String> {
    p.function
        .iter()
        .map(|f| p.string_table[f.name as usize].clone())
        .collect()
}

/// Keeps 4 MiB alive in 4 KiB blocks: in the heap profile's `inuse_space`.
#[inline(never)]
pub fn endpoint_test_retained_blocks() -> Vec<Vec<u8>> {
    (0..1024).map(|i| black_box(vec![i as u8; 4096])).collect()
}

/// Allocates and frees 4 MiB in 64-byte strings: in `alloc_objects` only.
#[inline(never)]
pub fn endpoint_test_churn_strings() {
    for i in 0..(4 << 20) / 64 {
        black_box(format!("{i:>60}"));
    }
}

/// Sets a small sampling rate and runs the workload; keep the result alive.
pub fn workload() -> Vec<Vec<u8>> {
    allocprof_core::set_sample_rate(4096);
    let kept = endpoint_test_retained_blocks();
    endpoint_test_churn_strings();
    kept
}

/// Waits for `cond`, polling; panics with `what` after `limit` (a hang guard, not a
/// timing assertion).
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Raises a stop flag when dropped, so that threads looping on it end even when an
/// assertion fails (and unwinds) before the flag would have been set.
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
