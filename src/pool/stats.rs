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

/// What a runspace of the pool is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Its worker process is opening (or reopening).
    Starting,
    /// Waiting for a command.
    Idle,
    /// Running a command.
    Busy,
    /// Its worker process is being closed to open a fresh one.
    Recycling,
    /// Gone (retired when idle, or the pool is closed).
    Stopped,
}

/// What happened on a runspace, a worker process, or the whole pool.
///
/// Commands, failures and retries are counted by the runspace that ran them; restarts, recycles and
/// reconnects by the worker process they replaced (every runspace of a process goes with it).
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
    /// Worker processes replaced after they died.
    pub restarts: u64,
    /// Worker processes replaced by the recycling policy.
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

/// One runspace's state and counters (a worker process hosts
/// [`runspaces_per_worker`](crate::PoolBuilder::runspaces_per_worker) of them).
#[derive(Debug, Clone)]
pub struct WorkerStats {
    /// The runspace's number in the pool.
    pub id: usize,
    /// The [`ProcessStats::id`] of the worker process it belongs to.
    pub process: usize,
    /// Which runspace of its process it is (0 up to `runspaces_per_worker - 1`).
    pub runspace: usize,
    /// What it is doing.
    pub state: WorkerState,
    /// The PowerShell process id of its current runspace.
    pub pid: Option<u32>,
    /// Resident memory of that process (shared by its runspaces) when last read (Linux), in bytes.
    pub resident_bytes: Option<u64>,
    /// Commands, failures and retries of this runspace.
    pub counters: Counters,
    /// Commands run by the current runspace (what `RecyclePolicy::max_commands` counts).
    pub runspace_commands: u64,
    /// When the credentials the current runspace connected with expire, if its connector said (see
    /// [`Runspace::expires_at`](crate::Runspace::expires_at)).
    pub credentials_expire_at: Option<std::time::SystemTime>,
    /// When the current runspace was opened.
    pub(crate) runspace_opened: Option<Instant>,
}

impl WorkerStats {
    pub(crate) fn new(id: usize, process: usize, runspace: usize) -> Self {
        WorkerStats {
            id,
            process,
            runspace,
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

/// One worker process of the pool: what its runspaces share.
#[derive(Debug, Clone)]
pub struct ProcessStats {
    /// The process slot's number in the pool.
    pub id: usize,
    /// The PowerShell process id, while one is open.
    pub pid: Option<u32>,
    /// Its resident memory when last read (Linux), in bytes.
    pub resident_bytes: Option<u64>,
    /// How many runspaces it hosts.
    pub runspaces: usize,
    /// Restarts, recycles and reconnects of this process slot.
    pub counters: Counters,
    /// When the current process was opened.
    pub(crate) opened: Option<Instant>,
}

impl ProcessStats {
    pub(crate) fn new(id: usize, runspaces: usize) -> Self {
        ProcessStats { id, pid: None, resident_bytes: None, runspaces, counters: Counters::default(), opened: None }
    }

    /// How long the current process has been open.
    pub fn age(&self) -> Option<Duration> {
        self.opened.map(|t| t.elapsed())
    }
}

/// A snapshot of the pool.
#[derive(Debug, Clone)]
pub struct PoolStats {
    /// Every runspace that is or was alive, stopped ones included.
    pub workers: Vec<WorkerStats>,
    /// Every worker process slot that is or was alive, stopped ones included.
    pub processes: Vec<ProcessStats>,
    /// Commands waiting for a worker.
    pub queued: usize,
    /// Commands running now (a command waiting to retry after throttling is not running).
    pub running: usize,
    /// How many commands may run at once now: `max_workers x runspaces_per_worker`, or less while
    /// [`adaptive_concurrency`](crate::PoolBuilder::adaptive_concurrency) holds it down after throttling.
    pub concurrency_limit: usize,
    /// The sum of the runspaces' and the processes' counters.
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
