//! A small recommendation-scoring service with the profiler on, and two real problems
//! to find with it.
//!
//! It loads a factorization-machine model (a latent vector per feature plus learned
//! weights for explicit feature pairs) and serves `GET /score?user=U&items=I1,I2,…`.
//!
//! * **Hot spot**: every feature pair builds a `String` key with `format!` to look its
//!   pair weight up (`pair_weight_by_string_key`). `--fix-hotspot` keys by `(u32, u32)`.
//! * **Leak**: every request is appended to a "recent requests" log for debugging that is
//!   never trimmed (`RequestLog::record`). `--fix-leak` keeps the last 1000 only.
//!
//! A built-in load generator (on by default; `--no-load` to switch it off) calls the API
//! over HTTP so that the profiles show something at once. The profiler endpoint listens
//! on 127.0.0.1:6060 (`--profiler-addr`), the API on 127.0.0.1:8080 (`--port`; 0 picks a
//! free port).

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::alloc::System;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: allocprof::Profiler<System> = allocprof::Profiler::new(System);

const FACTORS: usize = 16;
const FEATURES: u32 = 50_000;
const PAIRS: u32 = 200_000;
const FEATURES_PER_ITEM: usize = 24;

struct Options {
    port: u16,
    profiler_addr: String,
    load: bool,
    load_threads: usize,
    fix_hotspot: bool,
    fix_leak: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        port: 8080,
        profiler_addr: "127.0.0.1:6060".into(),
        load: true,
        load_threads: 2,
        fix_hotspot: false,
        fix_leak: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--port" => {
                o.port = value("--port")?
                    .parse()
                    .map_err(|e| format!("--port: {e}"))?
            }
            "--profiler-addr" => o.profiler_addr = value("--profiler-addr")?,
            "--no-load" => o.load = false,
            "--load-threads" => {
                o.load_threads = value("--load-threads")?
                    .parse()
                    .map_err(|e| format!("--load-threads: {e}"))?
            }
            "--fix-hotspot" => o.fix_hotspot = true,
            "--fix-leak" => o.fix_leak = true,
            "--help" | "-h" => {
                return Err(
                    "usage: demo_service [--port N] [--profiler-addr HOST:PORT] \
                            [--no-load] [--load-threads N] [--fix-hotspot] [--fix-leak]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(o)
}

/// The factorization-machine model.
struct Model {
    bias: Vec<f32>,
    factors: Vec<[f32; FACTORS]>,
    /// Learned weights of explicit feature pairs, keyed "a:b" as the training job
    /// exported them. Looking them up by string is the hot spot.
    pair_weights: HashMap<String, f32>,
    /// The same weights keyed by the pair itself (the fix).
    pair_weights_by_id: HashMap<(u32, u32), f32>,
}

fn hash(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn unit(x: u64) -> f32 {
    (hash(x) % 2001) as f32 / 1000.0 - 1.0
}

/// "Loads" the model (generated deterministically, as if read from a file).
#[inline(never)]
fn load_model() -> Model {
    let bias = (0..FEATURES).map(|f| unit(f as u64) * 0.1).collect();
    let factors = (0..FEATURES)
        .map(|f| {
            let mut v = [0f32; FACTORS];
            for (k, x) in v.iter_mut().enumerate() {
                *x = unit((f as u64) << 8 | k as u64) * 0.05;
            }
            v
        })
        .collect();
    let mut pair_weights = HashMap::with_capacity(PAIRS as usize);
    let mut pair_weights_by_id = HashMap::with_capacity(PAIRS as usize);
    for p in 0..PAIRS {
        let (a, b) = (hot_feature(p as u64 * 2), hot_feature(p as u64 * 2 + 1));
        let (a, b) = (a.min(b), a.max(b));
        let w = unit(p as u64 ^ 0xabcdef) * 0.2;
        pair_weights.insert(format!("{a}:{b}"), w);
        pair_weights_by_id.insert((a, b), w);
    }
    Model {
        bias,
        factors,
        pair_weights,
        pair_weights_by_id,
    }
}

/// Features are drawn from a small "hot" range so that pairs hit the learned weights.
fn hot_feature(x: u64) -> u32 {
    (hash(x) % 2_000) as u32
}

/// The active features of a (user, item) pair.
fn features(user: u64, item: u64) -> [u32; FEATURES_PER_ITEM] {
    let mut f = [0u32; FEATURES_PER_ITEM];
    for (i, x) in f.iter_mut().enumerate() {
        *x = if i < FEATURES_PER_ITEM / 2 {
            hot_feature(user.wrapping_mul(31) ^ i as u64)
        } else {
            hot_feature(item.wrapping_mul(131) ^ (i as u64) << 20)
        };
    }
    f
}

/// THE HOT SPOT: a `String` per feature pair, just to look a weight up.
#[inline(never)]
fn pair_weight_by_string_key(model: &Model, a: u32, b: u32) -> f32 {
    let key = format!("{}:{}", a.min(b), a.max(b));
    model.pair_weights.get(&key).copied().unwrap_or(0.0)
}

/// The fix: no allocation.
#[inline(never)]
fn pair_weight_by_id(model: &Model, a: u32, b: u32) -> f32 {
    model
        .pair_weights_by_id
        .get(&(a.min(b), a.max(b)))
        .copied()
        .unwrap_or(0.0)
}

/// Factorization-machine score: biases + Σ_{i<j} (⟨v_i, v_j⟩ + w_ij).
#[inline(never)]
fn score_item(model: &Model, user: u64, item: u64, fix_hotspot: bool) -> f32 {
    let f = features(user, item);
    let mut s: f32 = f.iter().map(|&i| model.bias[i as usize]).sum();
    for i in 0..f.len() {
        for j in i + 1..f.len() {
            let (vi, vj) = (&model.factors[f[i] as usize], &model.factors[f[j] as usize]);
            s += vi.iter().zip(vj).map(|(a, b)| a * b).sum::<f32>();
            s += if fix_hotspot {
                pair_weight_by_id(model, f[i], f[j])
            } else {
                pair_weight_by_string_key(model, f[i], f[j])
            };
        }
    }
    s
}

/// What the log keeps of each request.
struct RequestRecord {
    user: u64,
    items: Vec<u64>,
    scores: Vec<f32>,
    features: Vec<u32>,
}

/// "Recent requests, kept for debugging."
struct RequestLog {
    records: VecDeque<RequestRecord>,
    served: u64,
    fix_leak: bool,
}

/// How many records the fixed log keeps.
const LOG_KEEP: usize = 200;

impl RequestLog {
    /// THE LEAK: without `--fix-leak`, nothing is ever removed.
    #[inline(never)]
    fn record(&mut self, user: u64, items: &[u64], scores: &[f32]) {
        let features = items.iter().flat_map(|&i| features(user, i)).collect();
        self.records.push_back(RequestRecord {
            user,
            items: items.to_vec(),
            scores: scores.to_vec(),
            features,
        });
        self.served += 1;
        if self.fix_leak {
            while self.records.len() > LOG_KEEP {
                self.records.pop_front();
            }
        }
    }
}

struct App {
    model: Model,
    log: Mutex<RequestLog>,
    fix_hotspot: bool,
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn handle_score(app: &App, query: &str) -> Result<String, String> {
    let user: u64 = query_param(query, "user")
        .ok_or("missing user")?
        .parse()
        .map_err(|_| "user must be a number")?;
    let items: Vec<u64> = query_param(query, "items")
        .ok_or("missing items")?
        .split(',')
        .map(|i| {
            i.parse()
                .map_err(|_| "items must be numbers separated by commas")
        })
        .collect::<Result<_, _>>()?;
    if items.is_empty() || items.len() > 1000 {
        return Err("between 1 and 1000 items".into());
    }
    let scores: Vec<f32> = items
        .iter()
        .map(|&i| score_item(&app.model, user, i, app.fix_hotspot))
        .collect();
    app.log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .record(user, &items, &scores);
    let body: Vec<String> = items
        .iter()
        .zip(&scores)
        .map(|(i, s)| format!("{{\"item\":{i},\"score\":{s:.4}}}"))
        .collect();
    Ok(format!(
        "{{\"user\":{user},\"scores\":[{}]}}\n",
        body.join(",")
    ))
}

async fn route(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status, body: String| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("valid response"))
    };
    match req.uri().path() {
        "/score" => {
            let query = req.uri().query().unwrap_or("").to_string();
            let result = tokio::task::spawn_blocking(move || handle_score(&app, &query)).await;
            match result {
                Ok(Ok(body)) => reply(StatusCode::OK, body),
                Ok(Err(e)) => reply(StatusCode::BAD_REQUEST, format!("{{\"error\":{e:?}}}\n")),
                Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, "{}\n".into()),
            }
        }
        "/recent" => {
            let log = app.log.lock().unwrap_or_else(|e| e.into_inner());
            let recent: Vec<String> = log
                .records
                .iter()
                .rev()
                .take(5)
                .map(|r| {
                    let best = r.scores.iter().copied().fold(f32::MIN, f32::max);
                    format!(
                        "{{\"user\":{},\"items\":{},\"features\":{},\"best\":{best:.4}}}",
                        r.user,
                        r.items.len(),
                        r.features.len()
                    )
                })
                .collect();
            let body = format!(
                "{{\"served\":{},\"logged\":{},\"recent\":[{}]}}\n",
                log.served,
                log.records.len(),
                recent.join(",")
            );
            reply(StatusCode::OK, body)
        }
        "/healthz" => reply(StatusCode::OK, "{\"ok\":true}\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "{\"error\":\"not found\"}\n".into()),
    }
}

/// Calls the API in a loop over one keep-alive connection, like a real client.
fn load_generator(api: SocketAddr, seed: u64) {
    let mut n = seed;
    loop {
        let Ok(stream) = TcpStream::connect(api) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
        let mut writer = stream;
        loop {
            n += 1;
            let items: Vec<String> = (0..20)
                .map(|k| (hash(n * 97 + k) % 100_000).to_string())
                .collect();
            let req = format!(
                "GET /score?user={}&items={} HTTP/1.1\r\nHost: demo\r\n\r\n",
                hash(n) % 10_000,
                items.join(",")
            );
            if writer.write_all(req.as_bytes()).is_err() || read_response(&mut reader).is_err() {
                break;
            }
        }
    }
}

fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<()> {
    let mut len = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let profiler = match allocprof::http::serve(&opts.profiler_addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "cannot start the profiler endpoint on {}: {e}",
                opts.profiler_addr
            );
            std::process::exit(1);
        }
    };
    let pprof = profiler.local_addr();

    let started = Instant::now();
    let app = Arc::new(App {
        model: load_model(),
        log: Mutex::new(RequestLog {
            records: VecDeque::new(),
            served: 0,
            fix_leak: opts.fix_leak,
        }),
        fix_hotspot: opts.fix_hotspot,
    });
    let loaded = started.elapsed();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", opts.port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on 127.0.0.1:{}: {e}", opts.port);
                std::process::exit(1);
            }
        };
        let api = listener.local_addr().expect("local addr");
        println!(
            "demo_service: model loaded in {:.1?} ({} features, {} pair weights)",
            loaded, FEATURES, PAIRS
        );
        println!("scoring API:  http://{api}/score?user=42&items=1,2,3");
        println!("profiler:     http://{pprof}/debug/pprof/");
        println!(
            "problems:     hot spot {}, leak {}; load generator {}",
            if opts.fix_hotspot { "fixed" } else { "ON (--fix-hotspot to fix)" },
            if opts.fix_leak { "fixed" } else { "ON (--fix-leak to fix)" },
            if opts.load { "running" } else { "off" },
        );
        println!("\nTry:");
        println!("  go tool pprof -top http://{pprof}/debug/pprof/heap");
        println!("  curl -so base.pb.gz http://{pprof}/debug/pprof/heap; sleep 10; curl -so now.pb.gz http://{pprof}/debug/pprof/heap");
        // Hiding the standard library's frames puts the bytes on the demo's functions.
        let hide = r"-hide='^(alloc|core|std)::|^<(alloc|core|std)|as (alloc|core|std)::'";
        println!("  go tool pprof -top {hide} -base base.pb.gz now.pb.gz      # what grew: the leak");
        println!("  go tool pprof -top {hide} -seconds 10 http://{pprof}/debug/pprof/heap");
        println!(
            "  go tool pprof -top {hide} -sample_index=alloc_objects http://{pprof}/debug/pprof/allocs   # hot spots"
        );
        println!("  curl -s http://{pprof}/debug/pprof/stats");
        println!("  open http://{pprof}/debug/pprof/allocs?format=svg     # flame graph");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();

        if opts.load {
            for t in 0..opts.load_threads {
                std::thread::Builder::new()
                    .name(format!("load-{t}"))
                    .spawn(move || load_generator(api, t as u64 * 1_000_000_007))
                    .expect("spawn load generator");
            }
        }
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let app = app.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| route(app.clone(), req));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
