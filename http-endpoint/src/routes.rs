//! The handlers behind each route, restating Go's `net/http/pprof` (see PPROF.md):
//! the checks run in Go's order and answer with Go's status codes and texts.

use crate::collect::{DeltaError, Output};
use crate::query::{atoi, form_value, parse_int, parse_uint_base0};
use crate::response::{self, Body, HTML, JSON, SVG, TEXT};
use crate::service::Pprof;
use allocprof_core::{ProfileKind, SampleType};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body as HttpBody;
use hyper::{Method, Request, Response, StatusCode};
use std::fmt::Write;

/// `/debug/pprof/heap` and `/debug/pprof/allocs`: Go's `handler.ServeHTTP` and
/// `serveDeltaProfile`, plus our `format=svg` (flame graph) and `si=` (its sample type).
pub(crate) async fn profile(p: &Pprof, kind: ProfileKind, query: Option<&str>) -> Response<Body> {
    let debug = form_value(query, "debug").map_or(0, |d| atoi(&d));
    let seconds = match form_value(query, "seconds").filter(|s| !s.is_empty()) {
        None => None,
        Some(sec) => match check_seconds(p, &sec, debug) {
            Ok(sec) => Some(sec),
            Err(e) => return e.response(),
        },
    };
    let output = match output(kind, query, debug) {
        Ok(o) => o,
        Err(e) => return e.response(),
    };
    if let Some(sec) = seconds {
        let shutdown = p.shared.shutdown.clone();
        return match p.shared.collector.delta(kind, output, sec, shutdown).await {
            Ok(bytes) => finish(kind, output, true, bytes),
            Err(DeltaError::TooMany) => response::go_error(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"too many "seconds" requests waiting; try again later"#,
            ),
            Err(DeltaError::Canceled) => {
                response::go_error(StatusCode::INTERNAL_SERVER_ERROR, "context canceled")
            }
            Err(DeltaError::Failed(msg)) => {
                response::go_error(StatusCode::INTERNAL_SERVER_ERROR, &msg)
            }
        };
    }
    // `gc` is accepted and ignored: there is no collector to run first.
    match p.shared.collector.current(kind, output).await {
        Ok(bytes) => finish(kind, output, false, bytes),
        Err(msg) => response::go_error(StatusCode::INTERNAL_SERVER_ERROR, &msg),
    }
}

/// A 400 answer, as Go's `serveError` writes it.
struct BadRequest(String);

impl BadRequest {
    fn new(message: impl Into<String>) -> BadRequest {
        BadRequest(message.into())
    }

    fn response(&self) -> Response<Body> {
        response::go_error(StatusCode::BAD_REQUEST, &self.0)
    }
}

/// Go's checks of `seconds`, in Go's order.
fn check_seconds(p: &Pprof, sec: &str, debug: i64) -> Result<u64, BadRequest> {
    let sec = match parse_int(sec) {
        Ok(s) if s > 0 => s as u64,
        _ => {
            return Err(BadRequest::new(
                r#"invalid value for "seconds" - must be a positive integer"#,
            ))
        }
    };
    // Both of our profiles support deltas, so Go's `"seconds" parameter is not
    // supported for this profile type` has no route here.
    if sec > p.shared.config.max_delta_seconds {
        return Err(BadRequest::new(
            "profile duration exceeds server's WriteTimeout",
        ));
    }
    if debug != 0 {
        return Err(BadRequest::new("seconds and debug params are incompatible"));
    }
    Ok(sec)
}

/// Which output the query asks for; a 400 for a bad `format` or `si`.
fn output(kind: ProfileKind, query: Option<&str>, debug: i64) -> Result<Output, BadRequest> {
    match form_value(query, "format").as_deref() {
        None | Some("") => Ok(if debug != 0 {
            Output::Text
        } else {
            Output::Proto
        }),
        Some("svg") => {
            if debug != 0 {
                return Err(BadRequest::new("format and debug params are incompatible"));
            }
            match form_value(query, "si").filter(|s| !s.is_empty()) {
                None => Ok(Output::Svg(kind.default_sample_type())),
                Some(si) => SampleType::from_name(&si).map(Output::Svg).ok_or_else(|| {
                    BadRequest::new(format!(
                        "invalid value for \"si\" - must be one of alloc_objects, \
                             alloc_space, inuse_objects, inuse_space (got {si:?})"
                    ))
                }),
            }
        }
        Some(other) => Err(BadRequest::new(format!(
            "invalid value for \"format\" - must be \"svg\" or absent (got {other:?})"
        ))),
    }
}

/// The success response for an output: Go's headers for binary and text; SVG inline.
fn finish(kind: ProfileKind, output: Output, delta: bool, bytes: bytes::Bytes) -> Response<Body> {
    match output {
        Output::Proto if delta => response::attachment(&format!("{}-delta", kind.name()), bytes),
        Output::Proto => response::attachment(kind.name(), bytes),
        Output::Text => response::ok(TEXT, bytes),
        Output::Svg(_) => response::ok(SVG, bytes),
    }
}

/// `/debug/pprof/cmdline`: the arguments joined by NUL, as Go's `Cmdline`.
pub(crate) fn cmdline() -> Response<Body> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for (i, arg) in std::env::args_os().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(arg.as_bytes());
    }
    response::ok(TEXT, out)
}

/// `/debug/pprof/symbol`, as Go's `Symbol`: GET without a query answers
/// `num_symbols: 1`; POST (body) or GET (raw query) of `0xPC+0xPC+…` adds one
/// `0xPC name` line per address that resolves. Unparsable words are skipped.
pub(crate) async fn symbol<B>(p: &Pprof, req: Request<B>) -> Response<Body>
where
    B: HttpBody + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let config = &p.shared.config;
    let input: Vec<u8> = if req.method() == Method::POST {
        let body = Limited::new(req.into_body(), config.max_body_bytes);
        match tokio::time::timeout(config.read_timeout, body.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes().to_vec(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return response::go_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body larger than {} bytes", config.max_body_bytes),
                )
            }
            Ok(Err(e)) => {
                return response::go_error(
                    StatusCode::BAD_REQUEST,
                    &format!("reading request: {e}"),
                )
            }
            Err(_) => {
                return response::go_error(
                    StatusCode::REQUEST_TIMEOUT,
                    "reading request: timed out",
                )
            }
        }
    } else {
        req.uri().query().unwrap_or("").as_bytes().to_vec()
    };
    let addrs: Vec<u64> = input
        .split(|&b| b == b'+')
        .filter_map(|w| parse_uint_base0(std::str::from_utf8(w).ok()?))
        .filter(|&pc| pc != 0)
        .collect();
    let resolved = p
        .shared
        .collector
        .run(move || {
            addrs
                .into_iter()
                .filter_map(|pc| {
                    // Go's `FuncForPC` names the function containing the byte itself,
                    // and so does `symbol_name`.
                    let lookup = usize::try_from(pc).ok()?;
                    allocprof_core::symbol_name(lookup).map(|name| (pc, name))
                })
                .collect::<Vec<_>>()
        })
        .await;
    let mut out = String::from("num_symbols: 1\n");
    match resolved {
        Ok(lines) => {
            for (pc, name) in lines {
                let _ = writeln!(out, "{pc:#x} {name}");
            }
        }
        Err(msg) => {
            let _ = writeln!(out, "reading request: {msg}");
        }
    }
    response::ok(TEXT, out)
}

/// The JSON stats endpoint (`/debug/pprof/stats`): the exact totals and the profiler's
/// own figures of `allocprof::stats()`, one number per field, in its order.
pub(crate) async fn stats(p: &Pprof) -> Response<Body> {
    let stats = p.shared.collector.run(allocprof_core::stats).await;
    match stats {
        Ok(stats) => {
            let mut out = String::from("{");
            for (i, (name, value)) in stats.fields().into_iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                let _ = write!(out, "{sep}\n  \"{name}\": {value}");
            }
            out.push_str("\n}\n");
            response::ok(JSON, out)
        }
        Err(msg) => response::go_error(StatusCode::INTERNAL_SERVER_ERROR, &msg),
    }
}

/// The profile descriptions Go's index shows.
const PROFILES: [(&str, &str); 2] = [
    ("allocs", "A sampling of all past memory allocations"),
    (
        "heap",
        "A sampling of memory allocations of live objects. You can specify the gc GET \
         parameter to run GC before taking the heap sample (accepted; allocprof has no GC).",
    ),
];

/// `/debug/pprof/`: Go's index page (a table of profiles with counts, then the
/// descriptions), plus links to the flame graphs and the stats endpoint. Links are
/// relative, so the page works under any prefix.
pub(crate) async fn index(p: &Pprof) -> Response<Body> {
    let count = p
        .shared
        .collector
        .run(|| allocprof_core::stats().unique_stacks)
        .await
        .unwrap_or(0);
    let mut rows = String::new();
    for (name, _) in PROFILES {
        let _ = writeln!(
            rows,
            "\t<tr>\n\t<td>{count}</td><td><a href='{name}?debug=1'>{name}</a></td>\n\t</tr>"
        );
    }
    let _ = writeln!(
        rows,
        "\t<tr>\n\t<td></td><td><a href='cmdline?debug=1'>cmdline</a></td>\n\t</tr>"
    );
    let mut descs = String::new();
    for (name, desc) in PROFILES {
        let _ = writeln!(
            descs,
            "<li><div class=profile-name>{name}: </div> {desc}</li>"
        );
    }
    let _ = writeln!(
        descs,
        "<li><div class=profile-name>cmdline: </div> The command line invocation of the current program</li>"
    );
    let mut graphs = String::new();
    for kind in [ProfileKind::Heap, ProfileKind::Allocs] {
        let name = kind.name();
        let _ = write!(graphs, "<li>{name}:");
        for t in SampleType::ALL {
            let _ = write!(
                graphs,
                " <a href='{name}?format=svg&amp;si={t}'>{t}</a>",
                t = t.name()
            );
        }
        graphs.push_str("</li>\n");
    }
    let page = format!(
        r#"<html>
<head>
<title>/debug/pprof/</title>
<style>
.profile-name{{
	display:inline-block;
	width:6rem;
}}
</style>
</head>
<body>
/debug/pprof/<br>
<br>
Types of profiles available:
<table>
<thead><td>Count</td><td>Profile</td></thead>
{rows}</table>
<p>
Profile Descriptions:
<ul>
{descs}</ul>
</p>
<p>
Flame graphs (allocprof):
<ul>
{graphs}</ul>
</p>
<p>
<a href='stats'>stats</a>: exact allocation totals and the profiler's own figures (JSON).
</p>
</body>
</html>
"#
    );
    response::ok(HTML, page)
}
