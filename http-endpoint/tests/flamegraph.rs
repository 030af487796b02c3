//! `?format=svg` flame graphs: served, titled, `si=` honoured, and rendered by a real
//! browser (headless Chromium) with the workload's function names in the document.

mod common;

use allocprof_http::{Config, Server};
use common::{get, workload, TempPath};
use std::alloc::System;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

#[global_allocator]
static A: allocprof_core::Profiler<System> = allocprof_core::Profiler::new(System);

fn server() -> SocketAddr {
    static SERVER: OnceLock<(Server, Vec<Vec<u8>>)> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let kept = workload();
            let server = Config::new().addr("127.0.0.1:0").serve().expect("serve");
            (server, kept)
        })
        .0
        .local_addr()
}

#[test]
fn svg_titles_and_sample_types() {
    let addr = server();
    for (target, title, has, lacks) in [
        (
            "/debug/pprof/heap?format=svg",
            "heap profile: inuse_space",
            "endpoint_test_retained_blocks",
            Some("endpoint_test_churn_strings"),
        ),
        (
            "/debug/pprof/heap?format=svg&si=inuse_objects",
            "heap profile: inuse_objects",
            "endpoint_test_retained_blocks",
            Some("endpoint_test_churn_strings"),
        ),
        (
            "/debug/pprof/allocs?format=svg",
            "allocs profile: alloc_space",
            "endpoint_test_churn_strings",
            None,
        ),
        (
            "/debug/pprof/allocs?format=svg&si=alloc_objects",
            "allocs profile: alloc_objects",
            "endpoint_test_churn_strings",
            None,
        ),
        (
            "/debug/pprof/heap?format=svg&si=alloc_space",
            "heap profile: alloc_space",
            "endpoint_test_churn_strings",
            None,
        ),
    ] {
        let r = get(addr, target);
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("image/svg+xml"), "{target}");
        assert_eq!(
            r.header("content-disposition"),
            None,
            "{target}: shown inline"
        );
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{target}"
        );
        let svg = r.text();
        assert!(
            svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
            "{target}"
        );
        assert!(svg.contains(title), "{target}: title {title:?}");
        assert!(svg.contains(has), "{target}: lacks {has}");
        if let Some(lacks) = lacks {
            assert!(
                !svg.contains(lacks),
                "{target}: freed memory drawn as in use"
            );
        }
    }
    let r = get(addr, "/debug/pprof/allocs?format=svg&si=inuse-space");
    assert_eq!(r.status, 400);
    assert!(
        r.text().starts_with("invalid value for \"si\""),
        "{}",
        r.text()
    );
}

/// Chromium's binary, or `None` after a notice (a failure with `ALLOCPROF_REQUIRE_CHROMIUM=1`).
fn chromium() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("which").arg(name).output() {
            if out.status.success() {
                let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return Some(PathBuf::from(path));
            }
        }
    }
    if std::env::var("ALLOCPROF_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
        panic!("chromium is required (ALLOCPROF_REQUIRE_CHROMIUM=1) but not found on PATH");
    }
    eprintln!("SKIPPED: chromium not found; `apt-get install -y chromium` to run the flame graph rendering check");
    None
}

/// Runs headless Chromium with the given extra arguments and returns stdout; a watchdog
/// kills it if it hangs.
fn run_chromium(bin: &PathBuf, args: &[String]) -> String {
    let profile_dir = TempPath::dir("allocprof-chromium");
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile_dir.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..1200 {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        })
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let _ = out_pipe.read_to_string(&mut stdout);
    let status = child.wait().expect("wait for chromium");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watchdog.join();
    stderr.push_str(&err_reader.join().unwrap_or_default());
    assert!(
        status.success(),
        "chromium {args:?}: {status}\nstderr:\n{stderr}"
    );
    stdout
}

#[test]
fn chromium_renders_the_flame_graph() {
    let addr = server();
    let Some(bin) = chromium() else { return };
    let url = format!("http://{addr}/debug/pprof/heap?format=svg");
    // The DOM after the page's script ran: an SVG document, no XML parse error, the
    // workload's function in it (frame <title>s keep full names; labels may be cut).
    let dom = run_chromium(&bin, &["--dump-dom".to_string(), url.clone()]);
    assert!(
        dom.contains("<svg"),
        "not an SVG document:\n{}",
        &dom[..dom.len().min(2000)]
    );
    assert!(
        !dom.contains("parsererror"),
        "the SVG did not parse:\n{}",
        &dom[..dom.len().min(2000)]
    );
    assert!(dom.contains("heap profile: inuse_space"), "title");
    assert!(
        dom.contains("endpoint_test_retained_blocks"),
        "function names in the rendered document"
    );

    let allocs = format!("http://{addr}/debug/pprof/allocs?format=svg&si=alloc_objects");
    let dom = run_chromium(&bin, &["--dump-dom".to_string(), allocs]);
    assert!(dom.contains("allocs profile: alloc_objects"), "title");
    assert!(
        dom.contains("endpoint_test_churn_strings"),
        "function names in the rendered document"
    );

    // And it paints: a screenshot of the page is a non-trivial PNG.
    let shot = TempPath::new("allocprof-flamegraph", ".png");
    run_chromium(
        &bin,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,800".to_string(),
            url,
        ],
    );
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert!(
        png.len() > 10_000,
        "a painted page, not a blank one ({} bytes)",
        png.len()
    );
    // The screenshot is removed with `shot` at the end of the test.
    eprintln!("flame graph screenshot: {} bytes", png.len());
}
