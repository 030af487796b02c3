//! Checks shared with `http-endpoint/tests`: whether `go` is there, and decoding a
//! gzipped profile. The including module provides `proto` (the profile's generated types).

use super::proto;
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
