//! Helpers shared by the workspace's integration tests.
#![allow(dead_code)]

use allocprof::pprof::proto;
use std::io::Read;

pub mod profile_tools;
pub mod runner;
pub mod temp;

#[allow(unused_imports)] // not every test binary uses them all
pub use profile_tools::{decode, go_pprof, have_go};
pub use temp::TempPath;

/// A string of the decoded profile's string table.
pub fn string(p: &proto::Profile, i: i64) -> &str {
    &p.string_table[i as usize]
}

/// Each sample as `outer;…;leaf` (function names, inline frames expanded) with its values.
pub fn stacks(p: &proto::Profile) -> Vec<(String, Vec<i64>)> {
    let funcs: std::collections::HashMap<u64, &proto::Function> =
        p.function.iter().map(|f| (f.id, f)).collect();
    let locs: std::collections::HashMap<u64, &proto::Location> =
        p.location.iter().map(|l| (l.id, l)).collect();
    p.sample
        .iter()
        .map(|s| {
            let mut names = Vec::new();
            for id in s.location_id.iter().rev() {
                for line in locs[id].line.iter().rev() {
                    names.push(string(p, funcs[&line.function_id].name).to_string());
                }
            }
            (names.join(";"), s.value.clone())
        })
        .collect()
}

/// The heap profile's four values (alloc objects and bytes, in-use objects and bytes),
/// summed over the stacks that pass through `function` (a frame named `function` or
/// ending in `::function`). Panics on a sample without four values or with a negative one.
pub fn heap_values_through(function: &str) -> [i64; 4] {
    let profile = decode(&allocprof::heap_pprof());
    let suffix = format!("::{function}");
    let mut sum = [0i64; 4];
    for (stack, values) in stacks(&profile) {
        assert_eq!(values.len(), 4, "sample with {} values", values.len());
        assert!(
            values.iter().all(|&v| v >= 0),
            "negative value in {stack}: {values:?}"
        );
        if stack
            .split(';')
            .any(|f| f == function || f.ends_with(&suffix))
        {
            for (s, v) in sum.iter_mut().zip(&values) {
                *s += v;
            }
        }
    }
    sum
}

/// Writes `bytes` to a fresh temporary file, `allocprof-test-<pid>-<n>-<name>`, and returns
/// its path; the file is removed when the returned value is dropped, so keep it alive for
/// as long as the path is used.
pub fn temp_file(name: &str, bytes: &[u8]) -> TempPath {
    let path = TempPath::new("allocprof-test", &format!("-{name}"));
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

/// `GET path` over a fresh HTTP/1.1 connection; returns (status, body). Panics on I/O
/// errors; see [`try_http_get`].
pub fn http_get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// `GET path` over a fresh HTTP/1.1 connection; returns (status, body).
pub fn try_http_get(addr: &str, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..eol])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// Where cargo put this test's sibling example binaries (`target/<profile>/examples`).
pub fn example_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/examples/<name>
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples")
        .join(name)
}

/// One side of a two-thread handshake over a pair of channels.
pub struct Lockstep {
    tx: std::sync::mpsc::Sender<()>,
    rx: std::sync::mpsc::Receiver<()>,
}

impl Lockstep {
    /// Tells the other side that this one has reached a point.
    pub fn signal(&self) {
        self.tx.send(()).unwrap();
    }

    /// Waits for the other side's next signal.
    pub fn wait(&self) {
        self.rx.recv().unwrap();
    }
}

/// Spawns a worker thread that makes its first allocation (a thread's first slow event,
/// where it registers with the profiler), then waits for the caller's signal and runs
/// `f`. Returns once that first allocation is made: the caller's side of the handshake
/// and the worker's handle.
pub fn spawn_started_worker(
    f: impl FnOnce(&Lockstep) + Send + 'static,
) -> (Lockstep, std::thread::JoinHandle<()>) {
    let (to_main, from_worker) = std::sync::mpsc::channel();
    let (to_worker, from_main) = std::sync::mpsc::channel();
    let main = Lockstep {
        tx: to_worker,
        rx: from_worker,
    };
    let worker = Lockstep {
        tx: to_main,
        rx: from_main,
    };
    let handle = std::thread::spawn(move || {
        std::hint::black_box(vec![0u8; 16]);
        worker.signal();
        worker.wait();
        f(&worker);
    });
    main.wait();
    (main, handle)
}

/// Regex-free `-hide` pattern for `go tool pprof` that hides the standard library's
/// frames, so that values land on the program's own functions.
pub const HIDE_STD: &str = r"^(alloc|core|std)::|^<(alloc|core|std)|as (alloc|core|std)::";

/// `System`, keeping the exact number of live heap bytes of the whole process.
pub struct LiveBytes;

/// Live heap bytes counted by [`LiveBytes`].
pub static LIVE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

// SAFETY: forwards every call to `System` unchanged and only counts successful calls.
unsafe impl std::alloc::GlobalAlloc for LiveBytes {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as i64 - layout.size() as i64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        p
    }
}
