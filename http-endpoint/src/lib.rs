//! allocprof's embedded HTTP endpoint: Go's `/debug/pprof` for a Rust process, so that
//! `go tool pprof http://127.0.0.1:6060/debug/pprof/heap`, `curl`, Parca and Grafana
//! Alloy work against a Rust service as against a Go one. Re-exported by the `allocprof`
//! facade as `allocprof::http` (its default feature `http`).
//!
//! # Standalone
//!
//! ```no_run
//! use std::alloc::System;
//! #[global_allocator]
//! static ALLOC: allocprof_core::Profiler<System> = allocprof_core::Profiler::new(System);
//!
//! fn main() -> std::io::Result<()> {
//!     // ALLOCPROF_HTTP_ADDR, if set, overrides the address given here.
//!     let server = allocprof_http::serve("127.0.0.1:6060")?;
//!     println!("profiles at http://{}/debug/pprof/", server.local_addr());
//!     // … the application runs; dropping `server` would leave the endpoint running …
//!     server.shutdown(); // graceful; joins the endpoint's thread
//!     Ok(())
//! }
//! ```
//!
//! [`serve`] starts a thread named `allocprof-http` with its own current-thread tokio
//! runtime, so a busy or blocked application runtime cannot stall a profile request.
//! [`serve_from_env`] is `serve("127.0.0.1:6060")` with the same environment override.
//! [`Config`] sets the token and limits; `Config::new().addr(a).serve()` ignores the
//! environment.
//!
//! # Mounted in an existing application
//!
//! [`Pprof`] is the handler: a [`hyper::service::Service`] and a
//! [`tower_service::Service`], with [`Pprof::handle`] underneath. With hyper 1.x:
//!
//! ```no_run
//! use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
//! use hyper_util::rt::TokioIo;
//! use std::convert::Infallible;
//!
//! # async fn app(_req: Request<Incoming>) -> Response<allocprof_http::Body> { unimplemented!() }
//! # async fn run() -> std::io::Result<()> {
//! let pprof = allocprof_http::Pprof::new(); // or Config::new().token(Some("…")).service()
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     let pprof = pprof.clone();
//!     tokio::spawn(async move {
//!         let svc = service_fn(move |req: Request<Incoming>| {
//!             let pprof = pprof.clone();
//!             async move {
//!                 Ok::<_, Infallible>(if req.uri().path().starts_with("/debug/pprof") {
//!                     pprof.handle(req).await
//!                 } else {
//!                     app(req).await
//!                 })
//!             }
//!         });
//!         let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
//!     });
//! }
//! # }
//! ```
//!
//! With axum (0.8), which takes tower services (compiled against axum, a dev-dependency
//! only; tested in `tests/mounted.rs`):
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let pprof = allocprof_http::Pprof::new();
//! let app = axum::Router::new()
//!     .route("/", axum::routing::get(|| async { "hello" }))
//!     .route_service("/debug/pprof/", pprof.clone())
//!     .route_service("/debug/pprof/{*rest}", pprof)
//!     // or under another path, with a router that strips the prefix:
//!     .nest_service("/admin/pprof", allocprof_http::Config::new().prefix("").service());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! Mounted, the application's own server limits apply (header size and time, body size,
//! connections); [`Config`]'s token, `?seconds=` cap and body cap still do. Profiles are
//! built with `spawn_blocking` on the application's tokio runtime.
//!
//! # Routes
//!
//! | path | answer |
//! |---|---|
//! | `/debug/pprof/` | HTML index: profiles with counts and `?debug=1` links, descriptions, flame-graph links, the stats link |
//! | `/debug/pprof` | 301 to `/debug/pprof/` (as Go's mux) |
//! | `/debug/pprof/heap`, `/debug/pprof/allocs` | gzipped pprof, `application/octet-stream`, `attachment; filename="heap"` (`allocs`) |
//! | `…?debug=N` (N ≠ 0) | Go's legacy text, `text/plain; charset=utf-8` |
//! | `…?seconds=N` | delta profile over N seconds, `filename="heap-delta"`; `duration_nanos` set |
//! | `…?gc=1` | accepted (there is no GC to run) |
//! | `…?format=svg[&si=TYPE]` | flame graph (`image/svg+xml`) of `TYPE` (`inuse_space` for heap, `alloc_space` for allocs by default); combines with `seconds` |
//! | `/debug/pprof/cmdline` | argv joined by NUL, `text/plain` |
//! | `/debug/pprof/symbol` | `num_symbols: 1`; GET with a query or POST of `0xPC+0xPC…` adds `0xPC name` lines |
//! | `/debug/pprof/stats` | JSON object of `allocprof::stats()` (`Stats::fields` names and order) |
//! | other `/debug/pprof/NAME` | 404 `Unknown profile` |
//! | a path with a bad `%` escape | 400 `400 Bad Request`, `Connection: close` (Go's server, before any handler or the token) |
//! | a path that is not clean (`//`, `.` or `..` elements) | 301 to the clean path, query kept (Go's `ServeMux`) |
//!
//! Paths are percent-decoded before they are matched, so `/debug/pprof/%68eap` is the
//! heap profile.
//!
//! Every response carries `X-Content-Type-Options: nosniff`. Errors of the profile
//! handlers are Go's: `text/plain; charset=utf-8`, `X-Go-Pprof: 1`, body = message and
//! a newline:
//!
//! | request | status and body |
//! |---|---|
//! | unknown profile | 404 `Unknown profile` |
//! | `seconds` not a positive integer | 400 `invalid value for "seconds" - must be a positive integer` |
//! | `seconds` above the cap ([`Config::max_delta_seconds`], default 300) | 400 `profile duration exceeds server's WriteTimeout` |
//! | `seconds` with `debug≠0` | 400 `seconds and debug params are incompatible` |
//! | server shutting down while a delta waits | 500 `context canceled` |
//! | more than [`Config::max_waiting_deltas`] deltas waiting | 503 |
//! | bad `format` or `si`, `format=svg` with `debug≠0` | 400 naming the parameter |
//!
//! Go's `"seconds" parameter is not supported for this profile type` cannot happen: both
//! profiles support deltas. A method other than GET or HEAD (and POST on `symbol`) gets
//! 405 `Method Not Allowed` with `Allow`; a missing or wrong bearer token, when one is
//! configured, 401 `Unauthorized`; an oversized or slow `/symbol` body 413 or 408. These
//! carry `X-Go-Pprof: 1` too, so `go tool pprof` prints the reason
//! (`server response: 401 Unauthorized - Unauthorized`). Paths outside the prefix get
//! Go's mux answer, 404 `404 page not found`.
//!
//! `go tool pprof` cannot send a token: with one configured, fetch with
//! `curl -H "Authorization: Bearer $TOKEN" -o heap.pb.gz URL`, then `go tool pprof heap.pb.gz`.
//!
//! # Limits
//!
//! * Loopback by default; anything else is a deliberate [`Config::addr`] or
//!   `ALLOCPROF_HTTP_ADDR`. Set a token ([`Config::token`], `ALLOCPROF_HTTP_TOKEN`) then.
//! * Headers: at most 16 KiB and 100 headers (431 and a closed connection beyond), sent
//!   within 10 s (then the connection is closed; idle keep-alive connections too).
//! * `/symbol` bodies: at most 64 KiB (413), sent within 10 s (408).
//! * At most 1024 connections at once (standalone; an idle one costs a few KiB); a
//!   connection beyond that is answered `503` at once and closed, so idle or slow clients
//!   can delay nobody for longer than the 10 s read timeout that ends them.
//! * Concurrent requests for the same profile share one build; at most two builds run
//!   at once. A delta request whose client disconnects stops
//!   waiting at once.

mod auth;
mod collect;
mod config;
mod flamegraph;
mod path;
mod query;
mod response;
mod routes;
mod server;
mod service;

pub use config::{
    Config, DEFAULT_ADDR, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_DELTA_SECONDS, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_WAITING_DELTAS,
    DEFAULT_READ_TIMEOUT, ENV_ADDR, ENV_MAX_SECONDS, ENV_TOKEN,
};
pub use response::Body;
pub use server::{serve, serve_from_env, Server, SHUTDOWN_GRACE};
pub use service::Pprof;
