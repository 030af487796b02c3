//! The standalone server: its own named thread, its own current-thread tokio runtime,
//! hyper's HTTP/1 connection handling with read limits, and a graceful shutdown.

use crate::config::Config;
use crate::service::Pprof;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// How long [`Server::shutdown`] lets in-flight requests finish before closing them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Starts the endpoint on `addr` (`host:port`; port 0 picks one), unless the
/// environment says otherwise: `ALLOCPROF_HTTP_ADDR` overrides `addr`,
/// `ALLOCPROF_HTTP_TOKEN` sets a bearer token and `ALLOCPROF_HTTP_MAX_SECONDS` the cap on
/// `?seconds=N` (see [`Config`]), and `ALLOCPROF_TRACE=<interval>` starts the trace line
/// (`allocprof_core::trace::start_from_env`). For no environment lookup at all, use
/// `Config::new().addr(addr).serve()`.
///
/// The server runs on a thread named `allocprof-http` with its own current-thread tokio
/// runtime, so a busy or blocked application runtime cannot stall a profile. It keeps
/// running when the returned handle is dropped; [`Server::shutdown`] stops it.
///
/// # Errors
///
/// Binding the address (in use, not resolvable, not permitted), a bad
/// `ALLOCPROF_HTTP_MAX_SECONDS`, or starting the thread or runtime. The message names
/// the address.
pub fn serve(addr: &str) -> io::Result<Server> {
    let server = Config::new().addr(addr).with_env()?.serve()?;
    // ALLOCPROF_TRACE=<interval>: the trace line, once per process.
    allocprof_core::trace::start_from_env();
    Ok(server)
}

/// Starts the endpoint on `ALLOCPROF_HTTP_ADDR`, or on `127.0.0.1:6060` when it is unset:
/// `serve(DEFAULT_ADDR)`.
///
/// # Errors
///
/// As [`serve`].
pub fn serve_from_env() -> io::Result<Server> {
    serve(crate::config::DEFAULT_ADDR)
}

/// A running standalone endpoint, from [`serve`] or [`Config::serve`].
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    pprof: Pprof,
}

impl Server {
    /// The address the server listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections, lets in-flight requests finish for up to
    /// [`SHUTDOWN_GRACE`] (waiting `?seconds=N` requests are answered at once with Go's
    /// 500 `context canceled`), closes idle connections, and joins the thread.
    pub fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// `?seconds=N` requests currently waiting (for tests and metrics).
    #[doc(hidden)]
    pub fn waiting_deltas(&self) -> usize {
        self.pprof.waiting_deltas()
    }
}

impl Config {
    /// Starts a standalone server with exactly this configuration (the environment is
    /// read only if [`Config::from_env`] or [`Config::with_env`] was used). See [`serve`].
    /// Binding beyond loopback without a token prints a warning to stderr.
    ///
    /// # Errors
    ///
    /// As [`serve`].
    pub fn serve(self) -> io::Result<Server> {
        let listener = std::net::TcpListener::bind(self.addr.as_str()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("allocprof-http: cannot listen on {}: {e}", self.addr),
            )
        })?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && self.token.is_none() {
            eprintln!(
                "allocprof-http: serving profiles on {addr}, beyond loopback, without a token \
                 (set ALLOCPROF_HTTP_TOKEN or Config::token)"
            );
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("allocprof-http-build")
            .max_blocking_threads(4)
            .build()?;
        let (stop, stop_rx) = watch::channel(false);
        let pprof = Pprof::build(self.clone(), Some(stop_rx.clone()));
        let served = pprof.clone();
        let thread = std::thread::Builder::new()
            .name("allocprof-http".to_string())
            .spawn(move || {
                runtime.block_on(run(listener, served, self, stop_rx));
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
            })?;
        Ok(Server {
            addr,
            stop,
            thread: Some(thread),
            pprof,
        })
    }

    /// A mountable handler with this configuration (see [`Pprof`]).
    pub fn service(self) -> Pprof {
        Pprof::with_config(self)
    }
}

/// Answers a connection beyond `max_connections` with a 503 and closes it.
async fn refuse(stream: tokio::net::TcpStream) {
    const BODY: &str = "too many connections\n";
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         X-Content-Type-Options: nosniff\r\nX-Go-Pprof: 1\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    // The reply fits any socket send buffer: one non-blocking write, then close.
    if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), stream.writable()).await {
        let _ = stream.try_write(reply.as_bytes());
    }
    // Read what the client sent (up to 64 KiB, for at most a second) before closing:
    // closing with unread data makes the kernel reset the connection, and the client may
    // then lose the reply.
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < 64 * 1024 {
            if stream.readable().await.is_err() {
                break;
            }
            match stream.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => drained += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// The accept loop. Each connection is served by hyper with a header read timeout
/// (which also ends idle keep-alive connections) and a cap on header size; at most
/// `max_connections` are served at once, further ones get a 503 (see [`refuse`]).
async fn run(
    listener: std::net::TcpListener,
    pprof: Pprof,
    config: Config,
    stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("allocprof-http: cannot serve: {e}");
            return;
        }
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.read_timeout)
        .max_buf_size(config.max_header_bytes.max(8192))
        .max_header_size(config.max_header_bytes)
        .max_headers(100);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut stopping = Some(stop);
    loop {
        let stream = tokio::select! {
            () = crate::collect::shutting_down(&mut stopping) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors or a reset before accept: wait a moment
                    // instead of spinning; the listener stays open.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Keep accepting when full: waiting for a slot before `accept` let idle clients
        // hold every slot while new ones queued in the backlog for many seconds.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(TokioIo::new(stream), pprof.clone());
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = watched.await;
            drop(slot);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}
