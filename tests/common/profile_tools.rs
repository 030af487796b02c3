//! Helpers shared with `http-endpoint/tests`: whether `go` is there, running `go tool
//! pprof`, decoding a gzipped profile. The including module provides `proto` (the
//! profile's generated types) and `TempPath`.

use super::{proto, TempPath};
use std::io::Read;
use std::process::Command;

/// Whether `go` is on PATH. When it is not: returns `false` after printing a notice, or
/// panics if `ALLOCPROF_REQUIRE_GO=1` (CI sets it, so go-dependent tests cannot skip there).
pub fn have_go() -> bool {
    let ok = Command::new("go")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("ALLOCPROF_REQUIRE_GO").as_deref() == Ok("1") {
            panic!("`go` is required (ALLOCPROF_REQUIRE_GO=1) but not found on PATH");
        }
        eprintln!("SKIPPED: `go` not found; install golang-go to run the go tool pprof checks");
    }
    ok
}

/// Gunzips and decodes a profile; panics unless it is gzip holding a `profile.proto`.
pub fn decode(gz: &[u8]) -> proto::Profile {
    assert!(gz.len() > 2 && gz[..2] == [0x1f, 0x8b], "not gzip");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .expect("gunzip");
    prost::Message::decode(raw.as_slice()).expect("decode profile.proto")
}

/// Runs `go tool pprof ARGS…` with a private `PPROF_TMPDIR` (where it saves the profiles
/// it fetched; one directory per call, removed on return) and returns stdout and stderr;
/// panics with both on failure.
pub fn go_pprof_with_stderr(args: &[&str]) -> (String, String) {
    let tmp = TempPath::dir("allocprof-pprof-tmpdir");
    let out = Command::new("go")
        .arg("tool")
        .arg("pprof")
        .args(args)
        .env("PPROF_TMPDIR", tmp.as_os_str())
        .output()
        .expect("run go tool pprof");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// Runs `go tool pprof ARGS…` as [`go_pprof_with_stderr`] does and returns its stdout.
pub fn go_pprof(args: &[&str]) -> String {
    go_pprof_with_stderr(args).0
}
