//! Building responses with the headers Go's `net/http/pprof` sets.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_DISPOSITION, CONTENT_TYPE, LOCATION};
use hyper::{Response, StatusCode};

/// The body type of every response.
pub type Body = Full<Bytes>;

pub(crate) const TEXT: &str = "text/plain; charset=utf-8";
pub(crate) const OCTET_STREAM: &str = "application/octet-stream";
pub(crate) const HTML: &str = "text/html; charset=utf-8";
pub(crate) const SVG: &str = "image/svg+xml";
pub(crate) const JSON: &str = "application/json";

/// A response with `X-Content-Type-Options: nosniff` (set on every response, as Go's
/// handlers do) and the given status, content type and body.
pub(crate) fn with(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(CONTENT_TYPE, v);
    }
    r
}

/// 200 with a body.
pub(crate) fn ok(content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    with(StatusCode::OK, content_type, body)
}

/// A binary profile: `application/octet-stream`, downloaded as `filename`.
pub(crate) fn attachment(filename: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = ok(OCTET_STREAM, body);
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        r.headers_mut().insert(CONTENT_DISPOSITION, v);
    }
    r
}

/// Go's `serveError`: plain text `message\n`, `X-Go-Pprof: 1`, no disposition. Used for
/// every error of ours too (401, 405, 408, 413, 503): with the header, `go tool pprof`
/// prints the body ("server response: 401 Unauthorized - Unauthorized") instead of the
/// bare status.
pub(crate) fn go_error(status: StatusCode, message: &str) -> Response<Body> {
    let mut r = with(status, TEXT, format!("{message}\n"));
    r.headers_mut()
        .insert("x-go-pprof", HeaderValue::from_static("1"));
    r
}

/// A plain-text error from outside the pprof handlers (the 404 page of Go's mux): Go's
/// `http.Error` shape, without `X-Go-Pprof`.
pub(crate) fn http_error(status: StatusCode, message: &str) -> Response<Body> {
    with(status, TEXT, format!("{message}\n"))
}

/// Go's `http.Redirect` with 301 to `to` (an escaped path and query): the `Location` and
/// a one-link HTML body.
pub(crate) fn moved_permanently(to: &str) -> Response<Body> {
    let mut r = with(
        StatusCode::MOVED_PERMANENTLY,
        HTML,
        format!(
            "<a href=\"{}\">Moved Permanently</a>.\n\n",
            crate::path::html_escape(to)
        ),
    );
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(LOCATION, v);
    }
    r
}

/// What Go's server answers to a request it cannot parse (here: a bad escape in the
/// path): `400 Bad Request` as text, and the connection closed.
pub(crate) fn bad_request() -> Response<Body> {
    let mut r = with(StatusCode::BAD_REQUEST, TEXT, "400 Bad Request");
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}
