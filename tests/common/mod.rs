//! Helpers shared by the workspace's integration tests.
#![allow(dead_code)]

use allocprof::pprof::proto;
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

/// Runs `go tool pprof ARGS…` and returns stdout; panics with stderr on failure.
pub fn go_pprof(args: &[&str]) -> String {
    let out = Command::new("go")
        .arg("tool")
        .arg("pprof")
        .args(args)
        .output()
        .expect("run go tool pprof");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// Gunzips and decodes a profile.
pub fn decode(gz: &[u8]) -> proto::Profile {
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "not gzip");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .expect("gunzip");
    prost::Message::decode(raw.as_slice()).expect("decode profile.proto")
}

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

/// Writes `bytes` to a fresh temporary file and returns its path.
pub fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("allocprof-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    path
}
