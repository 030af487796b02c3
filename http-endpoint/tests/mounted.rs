//! The handler mounted into existing applications: an axum router (tower service, both
//! `route_service` and `nest_service` with an empty prefix) and a plain hyper
//! `service_fn`, each on the application's own multi-threaded tokio runtime.

mod common;

use allocprof_http::{Config, Pprof};
use common::{decode, get, request, workload};
use std::alloc::System;
use std::net::SocketAddr;

#[global_allocator]
static A: allocprof_core::Profiler<System> = allocprof_core::Profiler::new(System);

/// Runs `serve(listener)` on a fresh two-worker runtime thread, listening on a free
/// loopback port; returns its address.
fn serve_on_runtime<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            serve(listener).await;
        });
    });
    addr
}

/// Serves `app` on a fresh runtime thread; returns its address.
fn serve_axum(app: axum::Router) -> SocketAddr {
    serve_on_runtime(|listener| async move { axum::serve(listener, app).await.unwrap() })
}

fn check_profile_routes(addr: SocketAddr, base: &str) {
    let r = get(addr, &format!("{base}/heap"));
    assert_eq!(r.status, 200, "{base}/heap: {}", r.text());
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"heap\"")
    );
    let p = decode(&r.body);
    assert!(
        common::function_names(&p)
            .iter()
            .any(|n| n.contains("endpoint_test_retained_blocks")),
        "{base}/heap"
    );
    let r = get(addr, &format!("{base}/allocs?debug=1"));
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("heap profile: "));
    let r = get(addr, &format!("{base}/"));
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Types of profiles available"));
    let r = get(addr, &format!("{base}/nosuch"));
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "Unknown profile\n");
    let r = request(addr, "POST", &format!("{base}/symbol"), &[], b"0x1");
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("num_symbols: 1\n"));
}

#[test]
fn mounted_in_axum() {
    let _kept = workload();
    let pprof = Pprof::new();
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "the application" }))
        .route_service("/debug/pprof/{*rest}", pprof.clone())
        .route_service("/debug/pprof/", pprof)
        .nest_service("/admin/profiling", Config::new().prefix("").service());
    let addr = serve_axum(app);
    assert_eq!(get(addr, "/").text(), "the application");
    check_profile_routes(addr, "/debug/pprof");
    check_profile_routes(addr, "/admin/profiling");
}

#[test]
fn mounted_with_a_token_in_axum() {
    let _kept = workload();
    let app = axum::Router::new().route_service(
        "/debug/pprof/{*rest}",
        Config::new().token(Some("t")).service(),
    );
    let addr = serve_axum(app);
    assert_eq!(get(addr, "/debug/pprof/heap").status, 401);
    let r = request(
        addr,
        "GET",
        "/debug/pprof/heap",
        &["Authorization: Bearer t"],
        &[],
    );
    assert_eq!(r.status, 200);
}

#[test]
fn mounted_in_hyper_service_fn() {
    use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
    use hyper_util::rt::TokioIo;
    let _kept = workload();
    let addr = serve_on_runtime(|listener| async move {
        let pprof = Pprof::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let pprof = pprof.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let pprof = pprof.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            if req.uri().path().starts_with("/debug/pprof") {
                                pprof.handle(req).await
                            } else {
                                Response::new(allocprof_http::Body::from("the application"))
                            },
                        )
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    assert_eq!(get(addr, "/").text(), "the application");
    check_profile_routes(addr, "/debug/pprof");
}
