//! The trace line: allocprof's `GODEBUG=gctrace=1`.
//!
//! A background thread prints one line per interval to standard error:
//!
//! ```text
//! allocprof: t=12.0s inuse=45.2MiB (+1.2MiB) alloc=120.5MiB/s 35.2k/s free=119.3MiB/s 34.9k/s samples=1234 stacks=456 dropped=0 self=2.1MiB
//! ```
//!
//! `inuse` is the exact bytes in use and its change over the interval; `alloc` and
//! `free` are byte and object rates over the interval; then the profiler's own figures
//! (samples taken, stack-table entries, samples dropped for want of table space, its own
//! memory). Start it with [`start`], or from `ALLOCPROF_TRACE=<interval>` with
//! [`start_from_env`] (the HTTP endpoint's `serve` calls that for you).

use crate::stats::{stats, Stats};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running trace; [`Trace::stop`] ends it. Dropping the handle leaves it running.
pub struct Trace {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Trace {
    /// Stops the trace thread and waits for it.
    pub fn stop(mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts printing a trace line to standard error every `interval` (at least 10 ms).
///
/// # Errors
///
/// Fails only if the thread cannot be spawned.
pub fn start(interval: Duration) -> std::io::Result<Trace> {
    start_with(interval, |line| eprintln!("{line}"))
}

/// Like [`start`], but hands each line to `sink` instead of printing it.
///
/// # Errors
///
/// Fails only if the thread cannot be spawned.
pub fn start_with(
    interval: Duration,
    mut sink: impl FnMut(&str) + Send + 'static,
) -> std::io::Result<Trace> {
    let interval = interval.max(Duration::from_millis(10));
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("allocprof-trace".into())
        .spawn(move || {
            let start = Instant::now();
            let mut prev = stats();
            let mut prev_t = start;
            let (lock, cv) = &*stop2;
            let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let deadline = prev_t + interval;
                while !*stopped {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    stopped = cv
                        .wait_timeout(stopped, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if *stopped {
                    return;
                }
                let now = Instant::now();
                let cur = stats();
                sink(&format_line(now - start, now - prev_t, &prev, &cur));
                prev = cur;
                prev_t = now;
            }
        })?;
    Ok(Trace {
        stop,
        thread: Some(thread),
    })
}

static FROM_ENV: AtomicBool = AtomicBool::new(false);

/// Starts the trace if `ALLOCPROF_TRACE` holds an interval (`500ms`, `1s`, `1m`…), once
/// per process. A value that is not a duration gets a message on standard error and no
/// trace; it never panics. Returns whether a trace was started by this call.
pub fn start_from_env() -> bool {
    let Ok(value) = std::env::var("ALLOCPROF_TRACE") else {
        return false;
    };
    match parse_interval(&value) {
        Some(d) if !FROM_ENV.swap(true, Ordering::SeqCst) => match start(d) {
            Ok(t) => {
                // The env-started trace lives as long as the process.
                std::mem::forget(t);
                true
            }
            Err(e) => {
                eprintln!("allocprof: ALLOCPROF_TRACE: cannot start the trace thread: {e}");
                false
            }
        },
        Some(_) => false,
        None => {
            eprintln!(
                "allocprof: ignoring ALLOCPROF_TRACE={value:?}: expected an interval such as \
                 500ms, 1s or 1m; no trace"
            );
            false
        }
    }
}

/// Parses `<number><unit>` with unit `ms`, `s`, `m` or `h` (as Go's durations), and a
/// positive value. `None` for anything else.
pub fn parse_interval(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs > 0.0 && secs < 1e9).then(|| Duration::from_secs_f64(secs))
}

fn format_line(t: Duration, dt: Duration, prev: &Stats, cur: &Stats) -> String {
    let dt = dt.as_secs_f64().max(1e-9);
    let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
    let change = cur.in_use_bytes as i64 - prev.in_use_bytes as i64;
    format!(
        "allocprof: t={:.1}s inuse={} ({}{}) alloc={}/s {}/s free={}/s {}/s samples={} stacks={} dropped={} self={}",
        t.as_secs_f64(),
        bytes(cur.in_use_bytes as f64),
        if change < 0 { "-" } else { "+" },
        bytes(change.unsigned_abs() as f64),
        bytes(rate(cur.allocated_bytes, prev.allocated_bytes)),
        count(rate(cur.allocations, prev.allocations)),
        bytes(rate(cur.freed_bytes, prev.freed_bytes)),
        count(rate(cur.frees, prev.frees)),
        cur.samples,
        cur.unique_stacks,
        cur.dropped_samples,
        bytes(cur.profiler_bytes as f64),
    )
}

/// `1.5MiB`-style bytes.
pub fn bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn count(c: f64) -> String {
    if c >= 1e6 {
        format!("{:.1}M", c / 1e6)
    } else if c >= 1e3 {
        format!("{:.1}k", c / 1e3)
    } else {
        format!("{c:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_intervals() {
        assert_eq!(parse_interval("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_interval("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_interval("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_interval("2m"), Some(Duration::from_secs(120)));
        for bad in ["", "1", "s", "abc", "-1s", "0s", "1x", "1e999s", "NaNs"] {
            assert_eq!(parse_interval(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_a_line() {
        let prev = Stats {
            allocated_bytes: 0,
            in_use_bytes: 1024,
            ..Stats::default()
        };
        let cur = Stats {
            allocated_bytes: 2 * 1024 * 1024,
            allocations: 2000,
            in_use_bytes: 3 * 1024 * 1024,
            samples: 7,
            unique_stacks: 3,
            ..Stats::default()
        };
        let line = format_line(Duration::from_secs(3), Duration::from_secs(1), &prev, &cur);
        assert_eq!(
            line,
            "allocprof: t=3.0s inuse=3.0MiB (+3.0MiB) alloc=2.0MiB/s 2.0k/s free=0B/s 0/s \
             samples=7 stacks=3 dropped=0 self=0B"
        );
    }
}
