//! Building profiles off the async executor, without multiplying work.
//!
//! Building a profile snapshots the stack table, symbolizes it (the first time, the
//! expensive part: DWARF lookups for every new address) and encodes it. That is
//! blocking CPU work, so it runs on tokio's blocking pool (`spawn_blocking`), never on
//! the executor thread that serves connections.
//!
//! Two rules keep concurrent requests from multiplying the work:
//!
//! * **Single flight**: requests for the same output (`heap` binary, `allocs` text,
//!   `heap` SVG of `inuse_space`, …) that arrive while one is being built wait for that
//!   build and share its bytes, instead of starting their own. The snapshot they get was
//!   taken at most one build's time before they asked, which is as current as any
//!   scrape can tell. A build whose requests have all gone away is finished by the next
//!   waiter (tokio's `OnceCell` hands the initialisation over).
//! * **Bounded builds**: at most [`MAX_CONCURRENT_BUILDS`] different outputs (and delta
//!   profiles, and symbol look-ups) are built at once; further ones wait their turn.
//!
//! Delta (`?seconds=N`) requests cannot share a window, so each takes its own first
//! snapshot (cheap: a copy of the table, no symbolization) and waits; at most
//! `max_waiting_deltas` wait at once. Waiting ends early when the client disconnects
//! (hyper drops the request's future, and with it the timer) or the server shuts down.

use allocprof_core::{pprof, snapshot, text, Profile, ProfileKind, SampleType, Snapshot};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, OnceCell, Semaphore};

/// How many profile builds (or symbol look-ups) run at once, per service.
pub(crate) const MAX_CONCURRENT_BUILDS: usize = 2;

/// What a profile is rendered as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Output {
    /// Gzipped protobuf.
    Proto,
    /// Go's legacy text (`debug=1`).
    Text,
    /// A flame graph of one sample type.
    Svg(SampleType),
}

/// A rendered profile, or the message of a 500.
pub(crate) type Rendered = Result<Bytes, String>;

/// Why a delta profile was not produced.
#[derive(Debug)]
pub(crate) enum DeltaError {
    /// `max_waiting_deltas` requests are already waiting.
    TooMany,
    /// The server is shutting down (Go: the request context was canceled).
    Canceled,
    /// Building failed.
    Failed(String),
}

type Flight = Arc<OnceCell<Rendered>>;

/// Per-service build state.
pub(crate) struct Collector {
    flights: Mutex<HashMap<(ProfileKind, Output), Flight>>,
    permits: Semaphore,
    waiting_deltas: AtomicUsize,
    max_waiting_deltas: usize,
    /// Profiles built by [`Collector::current`] (for the single-flight test).
    builds: AtomicUsize,
}

impl Collector {
    pub(crate) fn new(max_waiting_deltas: usize) -> Collector {
        Collector {
            flights: Mutex::new(HashMap::new()),
            permits: Semaphore::new(MAX_CONCURRENT_BUILDS),
            waiting_deltas: AtomicUsize::new(0),
            max_waiting_deltas,
            builds: AtomicUsize::new(0),
        }
    }

    /// Delta requests currently waiting for their second snapshot.
    pub(crate) fn waiting_deltas(&self) -> usize {
        self.waiting_deltas.load(Ordering::Relaxed)
    }

    /// The current profile of `kind` rendered as `output`, shared with concurrent
    /// requests for the same thing (see the module docs).
    pub(crate) async fn current(&self, kind: ProfileKind, output: Output) -> Rendered {
        let key = (kind, output);
        let flight: Flight = Arc::clone(
            self.flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key)
                .or_default(),
        );
        let result = flight
            .get_or_init(|| async {
                let _permit = self.permits.acquire().await;
                self.builds.fetch_add(1, Ordering::Relaxed);
                blocking(move || render(&snapshot().to_profile(), kind, output)).await?
            })
            .await
            .clone();
        // Retire the flight, so that the next request takes a fresh snapshot.
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&key);
        }
        result
    }

    /// `p1 − p0` over `seconds`, as Go's `serveDeltaProfile`.
    pub(crate) async fn delta(
        &self,
        kind: ProfileKind,
        output: Output,
        seconds: u64,
        mut shutdown: Option<watch::Receiver<bool>>,
    ) -> Result<Bytes, DeltaError> {
        let _waiting = WaitingGuard::enter(self)?;
        let p0: Snapshot = blocking(snapshot).await.map_err(DeltaError::Failed)?;
        let timer = tokio::time::sleep(Duration::from_secs(seconds));
        tokio::select! {
            () = timer => {}
            () = shutting_down(&mut shutdown) => return Err(DeltaError::Canceled),
        }
        let _permit = self.permits.acquire().await;
        blocking(move || {
            let p1 = snapshot();
            render(&p1.delta_since(&p0).to_profile(), kind, output)
        })
        .await
        .map_err(DeltaError::Failed)?
        .map_err(DeltaError::Failed)
    }

    /// Runs `f` (a symbol look-up) under a build permit, off the executor.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let _permit = self.permits.acquire().await;
        blocking(f).await
    }
}

/// Counts a waiting delta request; refuses beyond the cap.
struct WaitingGuard<'a>(&'a AtomicUsize);

impl<'a> WaitingGuard<'a> {
    fn enter(c: &'a Collector) -> Result<WaitingGuard<'a>, DeltaError> {
        c.waiting_deltas
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < c.max_waiting_deltas).then_some(n + 1)
            })
            .map_err(|_| DeltaError::TooMany)?;
        Ok(WaitingGuard(&c.waiting_deltas))
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves when the server's shutdown signal is raised; never, when there is no
/// server (a mounted service) or its handle was dropped (the server keeps running).
pub(crate) async fn shutting_down(rx: &mut Option<watch::Receiver<bool>>) {
    match rx {
        Some(rx) => {
            if rx.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Runs blocking work on tokio's blocking pool. A panic there is reported as Go's
/// "failed to collect profile".
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| "failed to collect profile".to_string())
}

/// Renders a profile in one of the outputs. Blocking.
fn render(profile: &Profile, kind: ProfileKind, output: Output) -> Rendered {
    match output {
        Output::Proto => Ok(pprof::encode(profile, kind).into()),
        Output::Text => Ok(text::legacy_text(profile).into()),
        Output::Svg(t) => crate::flamegraph::render(profile, kind, t).map(Bytes::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests for the same output that arrive together share one build; a request
    /// after it finished builds anew; a different output builds its own.
    #[test]
    fn concurrent_requests_share_one_build() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = Collector::new(1);
        rt.block_on(async {
            // All 20 are polled once before the first build can finish (its result
            // arrives from the blocking pool and needs another turn of this runtime).
            let results: Vec<Rendered> =
                futures_join_all((0..20).map(|_| c.current(ProfileKind::Heap, Output::Proto)))
                    .await;
            assert!(results.iter().all(|r| r.is_ok()));
            assert!(
                results.windows(2).all(|w| w[0] == w[1]),
                "one shared result"
            );
            assert_eq!(c.builds.load(Ordering::Relaxed), 1);
            c.current(ProfileKind::Heap, Output::Proto).await.unwrap();
            assert_eq!(
                c.builds.load(Ordering::Relaxed),
                2,
                "a later request builds anew"
            );
            c.current(ProfileKind::Allocs, Output::Text).await.unwrap();
            assert_eq!(c.builds.load(Ordering::Relaxed), 3);
        });
    }

    /// A minimal `join_all` (no futures crate): polls every future on each wake-up.
    async fn futures_join_all<F: std::future::Future>(
        futs: impl Iterator<Item = F>,
    ) -> Vec<F::Output> {
        let mut futs: Vec<_> = futs.map(Box::pin).collect();
        let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
                if o.is_none() {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => *o = Some(v),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        out.into_iter().map(|o| o.unwrap()).collect()
    }
}
