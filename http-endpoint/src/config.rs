//! [`Config`]: the endpoint's address, token and limits, and how the environment sets them.

use std::fmt;
use std::io;
use std::time::Duration;

/// The address [`crate::serve_from_env`] binds when `ALLOCPROF_HTTP_ADDR` is unset.
pub const DEFAULT_ADDR: &str = "127.0.0.1:6060";
/// Default cap on `?seconds=N` (Go's server `WriteTimeout` check): five minutes.
pub const DEFAULT_MAX_DELTA_SECONDS: u64 = 300;
/// Default time a client has to send a request's headers (and a `/symbol` body).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on a request's start line and headers, in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default cap on a `POST /debug/pprof/symbol` body, in bytes (≈ 3,500 addresses).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// Default number of connections the standalone server serves at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default number of `?seconds=N` requests that may wait at once.
pub const DEFAULT_MAX_WAITING_DELTAS: usize = 16;

/// Environment variable overriding the listen address.
pub const ENV_ADDR: &str = "ALLOCPROF_HTTP_ADDR";
/// Environment variable setting the bearer token.
pub const ENV_TOKEN: &str = "ALLOCPROF_HTTP_TOKEN";
/// Environment variable setting the cap on `?seconds=N`.
pub const ENV_MAX_SECONDS: &str = "ALLOCPROF_HTTP_MAX_SECONDS";

/// Settings of the endpoint, for [`Config::serve`] (standalone) or [`Config::service`]
/// (mounted). Built with [`Config::new`] (defaults only) or [`Config::from_env`]
/// (defaults, then the `ALLOCPROF_HTTP_*` variables), then adjusted with the setters.
///
/// | setting | default | environment |
/// |---|---|---|
/// | [`addr`](Config::addr) | `127.0.0.1:6060` (loopback only) | `ALLOCPROF_HTTP_ADDR` |
/// | [`token`](Config::token) | none | `ALLOCPROF_HTTP_TOKEN` |
/// | [`max_delta_seconds`](Config::max_delta_seconds) | 300 | `ALLOCPROF_HTTP_MAX_SECONDS` |
/// | [`read_timeout`](Config::read_timeout) | 10 s | |
/// | [`max_header_bytes`](Config::max_header_bytes) | 16 KiB | |
/// | [`max_body_bytes`](Config::max_body_bytes) | 64 KiB | |
/// | [`max_connections`](Config::max_connections) | 1024 | |
/// | [`max_waiting_deltas`](Config::max_waiting_deltas) | 16 | |
/// | [`prefix`](Config::prefix) | `/debug/pprof` | |
#[derive(Clone)]
pub struct Config {
    pub(crate) addr: String,
    pub(crate) token: Option<String>,
    pub(crate) max_delta_seconds: u64,
    pub(crate) read_timeout: Duration,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_connections: usize,
    pub(crate) max_waiting_deltas: usize,
    pub(crate) prefix: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("max_delta_seconds", &self.max_delta_seconds)
            .field("read_timeout", &self.read_timeout)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_connections", &self.max_connections)
            .field("max_waiting_deltas", &self.max_waiting_deltas)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    /// The defaults (see the table above); reads no environment variable.
    pub fn new() -> Config {
        Config {
            addr: DEFAULT_ADDR.to_string(),
            token: None,
            max_delta_seconds: DEFAULT_MAX_DELTA_SECONDS,
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_waiting_deltas: DEFAULT_MAX_WAITING_DELTAS,
            prefix: "/debug/pprof".to_string(),
        }
    }

    /// The defaults, then the environment: `ALLOCPROF_HTTP_ADDR`, `ALLOCPROF_HTTP_TOKEN`
    /// and `ALLOCPROF_HTTP_MAX_SECONDS`, each when set and non-empty.
    ///
    /// # Errors
    ///
    /// `InvalidInput` naming the variable when `ALLOCPROF_HTTP_MAX_SECONDS` is not a
    /// positive integer. (A bad address is reported when binding.)
    pub fn from_env() -> io::Result<Config> {
        Config::new().with_env()
    }

    /// Applies the `ALLOCPROF_HTTP_*` variables that are set and non-empty on top of
    /// `self`: the operator's environment wins over the values in code.
    ///
    /// # Errors
    ///
    /// As [`Config::from_env`].
    pub fn with_env(mut self) -> io::Result<Config> {
        if let Some(addr) = env(ENV_ADDR) {
            self.addr = addr;
        }
        if let Some(token) = env(ENV_TOKEN) {
            self.token = Some(token);
        }
        if let Some(max) = env(ENV_MAX_SECONDS) {
            match max.trim().parse::<u64>() {
                Ok(n) if n > 0 => self.max_delta_seconds = n,
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{ENV_MAX_SECONDS}={max:?}: must be a positive integer"),
                    ))
                }
            }
        }
        Ok(self)
    }

    /// The address to listen on, `host:port` (port 0 picks a free one). Anything but a
    /// loopback address exposes the profile to the network: set a token then.
    pub fn addr(mut self, addr: impl Into<String>) -> Config {
        self.addr = addr.into();
        self
    }

    /// Requires `Authorization: Bearer <token>` on every request (compared in constant
    /// time); without it the answer is 401. `None` (the default) turns the check off.
    pub fn token(mut self, token: Option<impl Into<String>>) -> Config {
        self.token = token.map(Into::into);
        self
    }

    /// The longest `?seconds=N` accepted; longer requests get Go's 400 `profile duration
    /// exceeds server's WriteTimeout`.
    pub fn max_delta_seconds(mut self, seconds: u64) -> Config {
        self.max_delta_seconds = seconds;
        self
    }

    /// How long a client may take to send a request's headers (hyper's
    /// `header_read_timeout`, which also closes idle keep-alive connections) and a
    /// `/symbol` body.
    pub fn read_timeout(mut self, timeout: Duration) -> Config {
        self.read_timeout = timeout;
        self
    }

    /// The largest start line plus headers accepted (at least 8 KiB); larger requests get
    /// 431 and a closed connection.
    pub fn max_header_bytes(mut self, bytes: usize) -> Config {
        self.max_header_bytes = bytes.max(8192);
        self
    }

    /// The largest `/symbol` POST body accepted; larger ones get 413.
    pub fn max_body_bytes(mut self, bytes: usize) -> Config {
        self.max_body_bytes = bytes;
        self
    }

    /// How many connections the standalone server serves at once; a further one is
    /// answered 503 and closed.
    pub fn max_connections(mut self, n: usize) -> Config {
        self.max_connections = n.max(1);
        self
    }

    /// How many `?seconds=N` requests may wait at once; more get 503.
    pub fn max_waiting_deltas(mut self, n: usize) -> Config {
        self.max_waiting_deltas = n;
        self
    }

    /// The path prefix of the routes, default `/debug/pprof`. Use `""` when a router
    /// strips the prefix before calling the service (axum's `nest_service`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Config {
        let mut p: String = prefix.into();
        while p.ends_with('/') {
            p.pop();
        }
        self.prefix = p;
        self
    }

    /// The configured listen address.
    pub fn listen_addr(&self) -> &str {
        &self.addr
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}
