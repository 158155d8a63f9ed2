//! Pool and worker statistics.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

/// Latency percentiles of a set of durations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// How many durations were recorded.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Longest.
    pub max: Duration,
}

/// What a worker slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Opening (or reopening) its runspace.
    Starting,
    /// Waiting for a command.
    Idle,
    /// Running a command.
    Busy,
    /// Closing an old runspace to open a fresh one.
    Recycling,
    /// Gone (retired when idle, or the pool is closed).
    Stopped,
}

/// What happened on a worker slot, or on the whole pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Commands finished, whatever their outcome.
    pub commands: u64,
    /// Commands that ended in an error (had_errors or a bridge error).
    pub failures: u64,
    /// Attempts that were repeated (throttling, a dead worker).
    pub retries: u64,
    /// Of those, the ones repeated because the classifier called the failure throttling.
    pub throttled: u64,
    /// Runspaces replaced after they died.
    pub restarts: u64,
    /// Runspaces replaced by the recycling policy.
    pub recycles: u64,
    /// Workers replaced by freshly connected ones because their credentials expired (or were about to)
    /// or their health check failed.
    pub reconnects: u64,
}

impl std::iter::Sum for Counters {
    fn sum<I: Iterator<Item = Counters>>(counters: I) -> Counters {
        counters.fold(Counters::default(), |a, b| Counters {
            commands: a.commands + b.commands,
            failures: a.failures + b.failures,
            retries: a.retries + b.retries,
            throttled: a.throttled + b.throttled,
            restarts: a.restarts + b.restarts,
            recycles: a.recycles + b.recycles,
            reconnects: a.reconnects + b.reconnects,
        })
    }
}

/// One worker's state and counters.
#[derive(Debug, Clone)]
pub struct WorkerStats {
    /// The slot's number in the pool.
    pub id: usize,
    /// What it is doing.
    pub state: WorkerState,
    /// The PowerShell process id of its current runspace.
    pub pid: Option<u32>,
    /// Resident memory of that process when last read (Linux), in bytes.
    pub resident_bytes: Option<u64>,
    /// What happened on this slot.
    pub counters: Counters,
    /// Commands run by the current runspace.
    pub runspace_commands: u64,
    /// When the credentials the current runspace connected with expire, if its connector said (see
    /// [`Runspace::expires_at`](crate::Runspace::expires_at)).
    pub credentials_expire_at: Option<std::time::SystemTime>,
    /// When the current runspace was opened.
    pub(crate) runspace_opened: Option<Instant>,
}

impl WorkerStats {
    pub(crate) fn new(id: usize) -> Self {
        WorkerStats {
            id,
            state: WorkerState::Starting,
            pid: None,
            resident_bytes: None,
            counters: Counters::default(),
            runspace_commands: 0,
            credentials_expire_at: None,
            runspace_opened: None,
        }
    }

    /// How long the current runspace has been open.
    pub fn runspace_age(&self) -> Option<Duration> {
        self.runspace_opened.map(|t| t.elapsed())
    }
}

/// A snapshot of the pool.
#[derive(Debug, Clone)]
pub struct PoolStats {
    /// Every worker slot that is or was alive, stopped ones included.
    pub workers: Vec<WorkerStats>,
    /// Commands waiting for a worker.
    pub queued: usize,
    /// The sum of the workers' counters.
    pub counters: Counters,
    /// Time from submission until a worker took the command.
    pub queue_wait: Percentiles,
    /// Time from submission until the result (retries included).
    pub latency: Percentiles,
}

/// Histograms of queue wait and latency, in microseconds.
pub(crate) struct Timings {
    inner: Mutex<(Histogram<u64>, Histogram<u64>)>,
}

impl Timings {
    pub(crate) fn new() -> Self {
        let histogram = || Histogram::new_with_bounds(1, 24 * 3600 * 1_000_000, 3).expect("valid histogram bounds");
        Timings { inner: Mutex::new((histogram(), histogram())) }
    }

    pub(crate) fn record(&self, queue_wait: Duration, latency: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.0.saturating_record(micros(queue_wait));
        inner.1.saturating_record(micros(latency));
    }

    pub(crate) fn snapshot(&self) -> (Percentiles, Percentiles) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (percentiles(&inner.0), percentiles(&inner.1))
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let at = |q: f64| Duration::from_micros(h.value_at_quantile(q));
    Percentiles { count: h.len(), p50: at(0.5), p90: at(0.9), p99: at(0.99), max: Duration::from_micros(h.max()) }
}

/// Resident memory of a process, from /proc (Linux only).
pub(crate) fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}
