//! Whole-process workloads for the overhead comparison, shared by one binary per
//! allocator (`src/bin/wl_*.rs`), and helpers for the criterion benchmarks.
//!
//! A workload binary is run as `wl_<allocator> <workload> [iterations-per-thread]`; it
//! runs the workload on [`THREADS`] threads at a call depth of about 30 frames (services
//! allocate from deep stacks; the sampled path's cost grows with depth) and prints a
//! checksum so nothing is optimised away (`service-mt` instead runs on the [`THREADS`]
//! workers of one tokio runtime, see [`service_mt`]). `run.sh` measures its CPU time
//! (user + system).

use std::collections::HashMap;
use std::hint::black_box;

/// Worker threads per workload.
pub const THREADS: usize = 2;

/// Extra frames between `main` and the workload loop.
pub const NEST: usize = 22;

/// A small xorshift generator (no allocation, deterministic per thread).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A size drawn log-uniformly from `[lo, hi]`.
    #[inline]
    pub fn log_uniform(&mut self, lo: usize, hi: usize) -> usize {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        ((a + u * (b - a)).exp() as usize).clamp(lo, hi)
    }
}

/// Calls `f` from `depth` frames further down.
#[inline(never)]
pub fn nest<R>(depth: usize, f: &mut dyn FnMut() -> R) -> R {
    let r = if depth == 0 {
        f()
    } else {
        nest(black_box(depth - 1), f)
    };
    black_box(r)
}

/// Small strings built by `format!` and looked up in a map (one small allocation and
/// free per iteration, plus the map's hashing).
#[inline(never)]
pub fn small_strings(seed: u64, iters: usize) -> u64 {
    let keys = 1000u64;
    let mut map: HashMap<String, u64> = (0..keys)
        .map(|i| (format!("user:{i}:session"), i))
        .collect();
    let mut rng = Rng(seed | 1);
    let mut sum = 0u64;
    for _ in 0..iters {
        let k = format!("user:{}:session", rng.next_u64() % (keys + keys / 5));
        match map.get_mut(&k) {
            Some(v) => {
                *v += 1;
                sum = sum.wrapping_add(*v);
            }
            None => sum = sum.wrapping_add(k.len() as u64),
        }
    }
    sum
}

/// Cache-like churn: 10k live slots; each iteration replaces a random slot with a buffer
/// of log-uniform size in 8 B–128 KiB (first and last byte written).
#[inline(never)]
pub fn churn(seed: u64, iters: usize) -> u64 {
    const SLOTS: usize = 10_000;
    let mut rng = Rng(seed | 1);
    let mut slots: Vec<Vec<u8>> = (0..SLOTS).map(|_| Vec::new()).collect();
    let mut sum = 0u64;
    for i in 0..iters {
        let s = (rng.next_u64() % SLOTS as u64) as usize;
        let size = rng.log_uniform(8, 128 * 1024);
        let v = fill(size, i as u8);
        sum = sum.wrapping_add(slots[s].len() as u64);
        slots[s] = v;
    }
    sum
}

/// Large buffers of log-uniform size in 256 KiB–4 MiB, allocated, touched once per
/// 4 KiB page, and freed (at 512 KiB, 40–100% of them are sampled).
#[inline(never)]
pub fn large(seed: u64, iters: usize) -> u64 {
    let mut rng = Rng(seed | 1);
    let mut sum = 0u64;
    for i in 0..iters {
        let size = rng.log_uniform(256 * 1024, 4 * 1024 * 1024);
        let mut v = fill(size, i as u8);
        for page in v.spare_capacity_mut().iter_mut().step_by(4096) {
            page.write(i as u8);
        }
        sum = sum.wrapping_add(v[v.len() - 1] as u64);
    }
    sum
}

/// Items a [`service`] serves.
pub const ITEMS: u64 = 1000;

/// A read-only key-value service over HTTP/1.1 on loopback, server and client in this
/// process: one current-thread tokio runtime a thread, a hyper server for one keep-alive
/// connection and a hyper client sending `iters` requests on it. A request asks for
/// `/item/{id}` of [`ITEMS`]; the handler builds that item's JSON document afresh
/// (`format!` and `push_str`, 64 B–8 KiB, log-uniform over the items), the client reads
/// the whole body. Every byte crosses the kernel twice, so most of the CPU time is the
/// network stack's, as in a real service.
#[inline(never)]
pub fn service(seed: u64, iters: usize) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    rt.block_on(connection(seed, iters))
}

/// Connections of [`service_mt`].
pub const CONNECTIONS: usize = 4;

/// [`service`] on one multi-threaded (work-stealing) tokio runtime of [`THREADS`]
/// workers, the shape of most tokio services: [`CONNECTIONS`] server and client pairs,
/// `iters * THREADS` requests in all, tasks (and the memory they free) moving between
/// workers. Run once, from the main thread (see [`workload_main`]).
#[inline(never)]
pub fn service_mt(seed: u64, iters: usize) -> u64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_io()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let per = iters * THREADS / CONNECTIONS;
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|c| tokio::spawn(connection(seed ^ ((c as u64) << 32), per)))
            .collect();
        let mut sum = 0u64;
        for t in tasks {
            sum = sum.wrapping_add(t.await.expect("connection task"));
        }
        sum
    })
}

/// One server and client pair of [`service`]: a listener on a free loopback port, a
/// task serving the one connection it accepts, and a client sending `iters` requests on
/// that connection. Returns the client's checksum.
async fn connection(seed: u64, iters: usize) -> u64 {
    let mut rng = Rng(seed | 1);
    let sizes: std::sync::Arc<Vec<usize>> =
        std::sync::Arc::new((0..ITEMS).map(|_| rng.log_uniform(64, 8 * 1024)).collect());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let svc = hyper::service::service_fn(move |req| {
            let sizes = sizes.clone();
            async move { Ok::<_, std::convert::Infallible>(item_response(&req, &sizes)) }
        });
        hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await
            .expect("server connection");
    });
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut sum = 0u64;
    for _ in 0..iters {
        let id = rng.next_u64() % ITEMS;
        let req = hyper::Request::get(format!("/item/{id}"))
            .header("host", "127.0.0.1")
            .header("user-agent", "allocprof-benches")
            .header("accept", "application/json")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("send_request");
        assert_eq!(resp.status(), hyper::StatusCode::OK);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body")
            .to_bytes();
        sum = sum.wrapping_add(body.len() as u64 + u64::from(body[body.len() / 2]));
    }
    sum
}

/// The handler of [`service`]: `/item/{id}` as a JSON document of `sizes[id]` bytes or a
/// little more, built field by field; 404 for any other path.
fn item_response(
    req: &hyper::Request<hyper::body::Incoming>,
    sizes: &[usize],
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let id = req
        .uri()
        .path()
        .strip_prefix("/item/")
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&id| id < sizes.len());
    let Some(id) = id else {
        let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
        *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
        return resp;
    };
    let mut body = format!("{{\"id\":{id},\"name\":\"item-{id}\",\"events\":[");
    let mut n = 0u64;
    while body.len() < sizes[id] {
        let event = format!(
            "{{\"seq\":{n},\"kind\":\"{}\",\"at\":{}}},",
            ["view", "cart", "order"][(n % 3) as usize],
            1_700_000_000 + n * 37 + id as u64
        );
        body.push_str(&event);
        n += 1;
    }
    body.push_str("null]}");
    hyper::Response::builder()
        .header("content-type", "application/json")
        .header("cache-control", "max-age=60")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("response")
}

/// A buffer of `size` bytes with its first and last byte written (so the memory is real
/// without the workload turning into a memset benchmark).
#[inline(never)]
fn fill(size: usize, b: u8) -> Vec<u8> {
    let mut v: Vec<u8> = Vec::with_capacity(size);
    v.push(b);
    if let Some(last) = v.spare_capacity_mut().get_mut(size - 2) {
        last.write(b);
    }
    v
}

/// Default iterations per thread for a workload (about a second of CPU on System).
pub fn default_iters(workload: &str) -> usize {
    match workload {
        "strings" => 8_000_000,
        "churn" => 3_000_000,
        "large" => 200_000,
        "service" | "service-mt" => 30_000,
        _ => 0,
    }
}

/// The entry point of every workload binary: parses `<workload> [iters]`, runs it on
/// [`THREADS`] threads under [`nest`], prints the checksum.
pub fn workload_main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(workload) = args.get(1).cloned() else {
        eprintln!(
            "usage: {} strings|churn|large|service|service-mt [iterations-per-thread]",
            args[0]
        );
        std::process::exit(2);
    };
    let f: fn(u64, usize) -> u64 = match workload.as_str() {
        "strings" => small_strings,
        "churn" => churn,
        "large" => large,
        "service" => service,
        "service-mt" => service_mt,
        other => {
            eprintln!("unknown workload {other}");
            std::process::exit(2);
        }
    };
    let iters = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| default_iters(&workload));
    if workload == "service-mt" {
        // One runtime whose own workers are the threads.
        let sum = nest(NEST, &mut || f(0x9e37_79b9_7f4a_7c15, iters));
        println!("{workload} {sum}");
        return;
    }
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                nest(NEST, &mut || {
                    f(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1), iters)
                })
            })
        })
        .collect();
    let sum: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    println!("{workload} {sum}");
}

/// Fan-out of [`unique_stacks`]: distinct functions per level.
pub const FAN: usize = 64;

/// Distinct functions (one monomorphisation per `K`), so every path through them is a
/// distinct stack of distinct return addresses.
#[inline(never)]
fn hop<const K: usize>(path: &[u8], leaf: &mut dyn FnMut()) {
    match path.split_first() {
        Some((&next, rest)) => HOPS[next as usize % FAN](rest, leaf),
        None => leaf(),
    }
    black_box(K);
}

/// One level of [`at_stack`]: the rest of the path, and the leaf to call at its end.
type Hop = fn(&[u8], &mut dyn FnMut());

static HOPS: [Hop; FAN] = [
    hop::<0>, hop::<1>, hop::<2>, hop::<3>, hop::<4>, hop::<5>, hop::<6>, hop::<7>, hop::<8>,
    hop::<9>, hop::<10>, hop::<11>, hop::<12>, hop::<13>, hop::<14>, hop::<15>, hop::<16>,
    hop::<17>, hop::<18>, hop::<19>, hop::<20>, hop::<21>, hop::<22>, hop::<23>, hop::<24>,
    hop::<25>, hop::<26>, hop::<27>, hop::<28>, hop::<29>, hop::<30>, hop::<31>, hop::<32>,
    hop::<33>, hop::<34>, hop::<35>, hop::<36>, hop::<37>, hop::<38>, hop::<39>, hop::<40>,
    hop::<41>, hop::<42>, hop::<43>, hop::<44>, hop::<45>, hop::<46>, hop::<47>, hop::<48>,
    hop::<49>, hop::<50>, hop::<51>, hop::<52>, hop::<53>, hop::<54>, hop::<55>, hop::<56>,
    hop::<57>, hop::<58>, hop::<59>, hop::<60>, hop::<61>, hop::<62>, hop::<63>,
];

/// Calls `leaf` from stack number `id`: `LEVELS` levels of [`FAN`] distinct functions,
/// so ids below `FAN^LEVELS` (262 144) give distinct stacks.
pub fn at_stack(id: usize, leaf: &mut dyn FnMut()) {
    const LEVELS: usize = 3;
    let mut path = [0u8; LEVELS];
    let mut x = id;
    for p in path.iter_mut() {
        *p = (x % FAN) as u8;
        x /= FAN;
    }
    hop::<999>(&path, leaf);
}

/// With sampling at rate 1, allocates (and frees) once from each of the stacks
/// `from..to`, so the profile gains that many unique stacks.
pub fn unique_stacks(from: usize, to: usize) {
    for id in from..to {
        at_stack(id, &mut || {
            black_box(Vec::<u8>::with_capacity(64));
        });
    }
}

/// This process's resident set size and its peak, in KiB (`/proc/self/status`).
pub fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
