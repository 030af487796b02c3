//! [`Pprof`]: the request handler, as a hyper and a tower service, for the standalone
//! server and for mounting into an existing application.

use crate::collect::Collector;
use crate::config::Config;
use crate::response::{self, Body};
use crate::{auth, path, query, routes};
use hyper::body::Body as HttpBody;
use hyper::header::{HeaderValue, ALLOW, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::watch;

/// The `/debug/pprof` handler. Cheap to clone (one `Arc`); clones share their build
/// state, so concurrent requests for the same profile share one build.
///
/// It is a [`hyper::service::Service`] and a [`tower_service::Service`] (what axum's
/// `route_service` / `nest_service` take), with [`Pprof::handle`] underneath for any
/// other framework. Requests outside [`Config::prefix`] get a 404, so it can also
/// serve as a fallback.
///
/// Needs a tokio runtime with the time driver (tokio's default for `#[tokio::main]`):
/// profiles are built with `spawn_blocking`, off the executor threads, and `seconds=N`
/// waits with tokio's timer.
#[derive(Clone)]
pub struct Pprof {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) collector: Collector,
    /// The standalone server's shutdown signal: waiting deltas end when it is raised.
    pub(crate) shutdown: Option<watch::Receiver<bool>>,
}

impl Default for Pprof {
    fn default() -> Self {
        Pprof::new()
    }
}

impl std::fmt::Debug for Pprof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pprof")
            .field("config", &self.shared.config)
            .finish()
    }
}

/// Which route a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Index,
    Profile(allocprof_core::ProfileKind),
    Cmdline,
    Symbol,
    Stats,
    /// A name under the prefix that is not a profile (Go: 404 `Unknown profile`).
    UnknownProfile,
    /// The prefix without its trailing slash (Go's mux redirects).
    Redirect,
    /// Outside the prefix.
    NotFound,
}

impl Pprof {
    /// A handler with the defaults of [`Config::new`] (no token, routes under
    /// `/debug/pprof`). Reads no environment variable; use
    /// `Config::from_env()?.service()` for that.
    pub fn new() -> Pprof {
        Pprof::with_config(Config::new())
    }

    /// A handler with `config` (its address and connection limits are unused here).
    pub fn with_config(config: Config) -> Pprof {
        Pprof::build(config, None)
    }

    pub(crate) fn build(config: Config, shutdown: Option<watch::Receiver<bool>>) -> Pprof {
        Pprof {
            shared: Arc::new(Shared {
                collector: Collector::new(config.max_waiting_deltas),
                config,
                shutdown,
            }),
        }
    }

    /// `?seconds=N` requests waiting for their second snapshot (for tests and metrics).
    #[doc(hidden)]
    pub fn waiting_deltas(&self) -> usize {
        self.shared.collector.waiting_deltas()
    }

    /// Answers one request. Never fails: errors are responses (Go's texts and codes).
    /// The body is read only for `POST /debug/pprof/symbol`, up to
    /// [`Config::max_body_bytes`].
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: HttpBody + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let config = &self.shared.config;
        // As Go's server: a path with a bad escape is a bad request, answered before any
        // handler (and so before the token is checked).
        let Some(decoded) = query::percent_decode(req.uri().path(), false) else {
            return response::bad_request();
        };
        if let Some(token) = &config.token {
            if !auth::authorized(req.headers(), token) {
                let mut r = response::go_error(StatusCode::UNAUTHORIZED, "Unauthorized");
                r.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"allocprof\""),
                );
                return r;
            }
        }
        // As Go's ServeMux: route on the clean path, and redirect to it if it differs.
        let clean = path::clean(&decoded);
        if clean != decoded {
            return redirect(path::escape(&clean), req.uri().query());
        }
        let route = route(&String::from_utf8_lossy(&clean), &config.prefix);
        let allowed: &'static str = match route {
            Route::NotFound | Route::UnknownProfile | Route::Redirect => "",
            Route::Symbol => "GET, HEAD, POST",
            _ => "GET, HEAD",
        };
        let method = req.method();
        let method_ok = *method == Method::GET
            || *method == Method::HEAD
            || (*method == Method::POST && route == Route::Symbol);
        if !allowed.is_empty() && !method_ok {
            let mut r = response::go_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allowed));
            return r;
        }
        match route {
            Route::Index => routes::index(self).await,
            Route::Profile(kind) => routes::profile(self, kind, req.uri().query()).await,
            Route::Cmdline => routes::cmdline(),
            Route::Symbol => routes::symbol(self, req).await,
            Route::Stats => routes::stats(self).await,
            Route::UnknownProfile => response::go_error(StatusCode::NOT_FOUND, "Unknown profile"),
            Route::Redirect => redirect(format!("{}/", config.prefix), req.uri().query()),
            Route::NotFound => response::http_error(StatusCode::NOT_FOUND, "404 page not found"),
        }
    }
}

/// 301 to the escaped path `to`, with the request's query kept (as Go's `ServeMux`).
fn redirect(mut to: String, query: Option<&str>) -> Response<Body> {
    if let Some(q) = query {
        to.push('?');
        to.push_str(q);
    }
    response::moved_permanently(&to)
}

/// Maps a request path to its route, relative to `prefix` (no trailing slash).
pub(crate) fn route(path: &str, prefix: &str) -> Route {
    let Some(rest) = path.strip_prefix(prefix) else {
        return Route::NotFound;
    };
    match rest {
        "" if prefix.is_empty() => Route::Index,
        "" => Route::Redirect,
        "/" => Route::Index,
        "/heap" => Route::Profile(allocprof_core::ProfileKind::Heap),
        "/allocs" => Route::Profile(allocprof_core::ProfileKind::Allocs),
        "/cmdline" => Route::Cmdline,
        "/symbol" => Route::Symbol,
        "/stats" => Route::Stats,
        r if r.starts_with('/') => Route::UnknownProfile,
        _ => Route::NotFound,
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<B> hyper::service::Service<Request<B>> for Pprof
where
    B: HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn call(&self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

impl<B> tower_service::Service<Request<B>> for Pprof
where
    B: HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allocprof_core::ProfileKind;

    #[test]
    fn routes() {
        let p = "/debug/pprof";
        assert_eq!(route("/debug/pprof/", p), Route::Index);
        assert_eq!(route("/debug/pprof", p), Route::Redirect);
        assert_eq!(
            route("/debug/pprof/heap", p),
            Route::Profile(ProfileKind::Heap)
        );
        assert_eq!(
            route("/debug/pprof/allocs", p),
            Route::Profile(ProfileKind::Allocs)
        );
        assert_eq!(route("/debug/pprof/goroutine", p), Route::UnknownProfile);
        assert_eq!(route("/debug/pprof/heap/x", p), Route::UnknownProfile);
        assert_eq!(route("/debug/pprofx", p), Route::NotFound);
        assert_eq!(route("/", p), Route::NotFound);
        assert_eq!(route("/", ""), Route::Index);
        assert_eq!(route("/heap", ""), Route::Profile(ProfileKind::Heap));
        assert_eq!(route("", ""), Route::Index);
    }
}
