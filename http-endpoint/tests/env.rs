//! The environment: `ALLOCPROF_HTTP_ADDR` overrides the address given to `serve`,
//! `ALLOCPROF_HTTP_TOKEN` sets the token, `ALLOCPROF_HTTP_MAX_SECONDS` the `seconds` cap;
//! `Config::new()` reads none of them. One test in its own process, so that setting
//! variables races with nothing.

mod common;

use allocprof_http::{serve, serve_from_env, Config};
use common::{get, request};
use std::alloc::System;

#[global_allocator]
static A: allocprof_core::Profiler<System> = allocprof_core::Profiler::new(System);

fn set(name: &str, value: Option<&str>) {
    match value {
        Some(v) => std::env::set_var(name, v),
        None => std::env::remove_var(name),
    }
}

#[test]
fn environment_overrides() {
    // The address in code is unusable; the environment's wins.
    set("ALLOCPROF_HTTP_ADDR", Some("127.0.0.1:0"));
    set("ALLOCPROF_HTTP_TOKEN", Some("from-env"));
    set("ALLOCPROF_HTTP_MAX_SECONDS", Some("5"));
    let server = serve("256.0.0.1:1").expect("the environment's address is used");
    let addr = server.local_addr();
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
    assert_eq!(
        get(addr, "/debug/pprof/heap").status,
        401,
        "token from the environment"
    );
    let auth = ["Authorization: Bearer from-env"];
    assert_eq!(
        request(addr, "GET", "/debug/pprof/heap", &auth, &[]).status,
        200
    );
    let r = request(addr, "GET", "/debug/pprof/heap?seconds=6", &auth, &[]);
    assert_eq!(r.status, 400);
    assert_eq!(r.text(), "profile duration exceeds server's WriteTimeout\n");
    server.shutdown();

    // `Config::new()` ignores the environment.
    let server = Config::new().addr("127.0.0.1:0").serve().unwrap();
    assert_eq!(get(server.local_addr(), "/debug/pprof/heap").status, 200);
    server.shutdown();

    // A bad cap is an error naming the variable, not a silent default.
    set("ALLOCPROF_HTTP_MAX_SECONDS", Some("soon"));
    let err = serve("127.0.0.1:0").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(
        err.to_string().contains("ALLOCPROF_HTTP_MAX_SECONDS"),
        "{err}"
    );
    set("ALLOCPROF_HTTP_MAX_SECONDS", None);
    set("ALLOCPROF_HTTP_TOKEN", None);

    // A bad address is an error naming it.
    set("ALLOCPROF_HTTP_ADDR", Some("not-an-address"));
    let err = serve("127.0.0.1:0").unwrap_err();
    assert!(err.to_string().contains("not-an-address"), "{err}");

    // Unset (or empty): serve_from_env binds the default 127.0.0.1:6060. Another process
    // may hold that port; then the error names it.
    set("ALLOCPROF_HTTP_ADDR", Some(""));
    match serve_from_env() {
        Ok(server) => {
            assert_eq!(server.local_addr().to_string(), "127.0.0.1:6060");
            server.shutdown();
        }
        Err(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
            assert!(e.to_string().contains("127.0.0.1:6060"), "{e}");
        }
    }
}
