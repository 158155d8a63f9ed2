//! [`RunspacePool`]: a supervised pool of connected pwsh workers.
//!
//! Microsoft's Sample 2 opens a RunspacePool of three runspaces in one process, connects each and runs
//! cmdlets with BeginInvoke/EndInvoke. ExchangeOnlineManagement's connections are process-wide while its
//! tmpEXO_ cmdlets exist only in the runspace that connected, and memory grows by about 200 MB per
//! connect; here every worker is a process of its own hosting one runspace, or
//! [`runspaces_per_worker`](PoolBuilder::runspaces_per_worker) runspaces each connected on its own (as
//! Sample 2). The pool also replaces dead workers, recycles old ones, replaces workers whose credentials
//! expired with freshly connected ones, retries what its classifier calls throttling (and, when asked,
//! runs fewer commands at once while it is throttled) and keeps commands on the same object in order.

mod limiter;
mod queue;
mod stats;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::command::Command;
use crate::errors::{Error, Result};
use crate::records::{Completion, InvocationResult, StreamItem};
use crate::retry::{Classifier, Generic, RetryPolicy};
use crate::runspace::{CancelHandle, Runspace, RunspaceBuilder};
use queue::{Job, OnStart, Queue, Reply, Streamed};
use limiter::Limiter;
pub use stats::{Counters, Percentiles, PoolStats, ProcessStats, WorkerState, WorkerStats};
use stats::Timings;

/// When a worker is replaced by a fresh one even though it is healthy.
///
/// Long-lived PowerShell processes grow (ExchangeOnlineManagement adds about 200 MB per connect and
/// does not give it back), so replacing workers now and then keeps a long job's memory flat. A worker
/// is always replaced whole, all its runspaces with it: once its runspaces have finished what they run
/// and take nothing new, a fresh process with freshly connected runspaces takes its place.
#[derive(Debug, Clone, Default)]
pub struct RecyclePolicy {
    /// After this many commands of one runspace (with several runspaces per worker, the first runspace
    /// to reach it recycles the process). Default: never.
    pub max_commands: Option<u64>,
    /// After the process has been open this long. Default: never.
    pub max_age: Option<Duration>,
    /// When the worker process's resident memory passes this many bytes (read from /proc on Linux).
    /// Default: never.
    pub max_resident_bytes: Option<u64>,
}

/// Configures a [`RunspacePool`]; every setting has a documented default.
///
/// ```no_run
/// # async fn demo() -> psbridge::Result<()> {
/// use std::time::Duration;
/// use psbridge::{Command, Runspace, RunspacePool};
/// let workers = Runspace::builder()
///     .module("ExchangeOnlineManagement")
///     .connect(Command::new("Connect-ExchangeOnline").param("ManagedIdentity", true).param("Organization", "contoso.onmicrosoft.com"));
/// let pool = RunspacePool::builder(workers).min_workers(3).max_workers(3).wait_timeout(Duration::from_secs(600)).build().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    runspace: RunspaceBuilder,
    min_workers: usize,
    max_workers: usize,
    queue_capacity: usize,
    wait_timeout: Option<Duration>,
    idle_timeout: Duration,
    health_check_after: Duration,
    health_check: Command,
    retry: RetryPolicy,
    classifier: Arc<dyn Classifier>,
    connect_attempts: u32,
    refresh_margin: Duration,
    recycle: RecyclePolicy,
    restart_backoff: (Duration, Duration),
    rate_limit: Option<f64>,
    shutdown_grace: Duration,
    runspaces_per_worker: usize,
    adaptive_concurrency: bool,
}

impl PoolBuilder {
    /// How many runspaces each worker process hosts, each set up and connected on its own (as
    /// Microsoft's Sample 2 connects each runspace of its pool), each running one command at a time: a
    /// worker runs up to this many commands at once, and the pool up to `max_workers` times this many.
    /// Default: 1 (at most 64).
    ///
    /// Several runspaces per process pay when the CPU is the limit (two cores running three pwsh
    /// processes JIT-compile and collect the same code three times; three runspaces in one process do it
    /// once) and start faster (one process start instead of several). They cost: a crash, a kill or a
    /// command that will not stop takes every runspace of the process down (their commands fail, or run
    /// again elsewhere when idempotent, as on any crash), recycling replaces the whole process, one slow
    /// stream consumer holds up its siblings' output, and every runspace's connect costs memory in the
    /// shared process (about 200 MB per Exchange Online connect).
    ///
    /// ```no_run
    /// # async fn demo(workers: psbridge::RunspaceBuilder) -> psbridge::Result<()> {
    /// // One process, three connected runspaces: three commands at once.
    /// let pool = psbridge::RunspacePool::builder(workers).min_workers(1).max_workers(1).runspaces_per_worker(3).build().await?;
    /// assert_eq!(pool.stats().workers.len(), 3);
    /// # Ok(()) }
    /// ```
    pub fn runspaces_per_worker(mut self, runspaces: usize) -> Self {
        self.runspaces_per_worker = runspaces.clamp(1, crate::runspace::MAX_RUNSPACES_PER_WORKER);
        self
    }

    /// Lets the number of commands running at once adapt to throttling, in the manner of TCP's AIMD: it
    /// starts at the pool's capacity (`max_workers` x `runspaces_per_worker`), is cut to three quarters
    /// when a command comes back throttled (the [`classifier`](Self::classifier) says
    /// [`Failure::Throttled`]), once per congestion event (throttles of commands begun before the last
    /// cut, or met while its Retry-After runs, do not cut again), and grows by one after 32 unthrottled
    /// commands in a row; never below 1 nor above the capacity. While the Retry-After of the last cut
    /// runs, no new command starts: the service asked the tenant to wait. A throttled command waiting
    /// for its retry does not count as running. [`PoolStats::concurrency_limit`] shows the current
    /// limit. Default: off (always the capacity, and a Retry-After delays only its own command).
    ///
    /// A pool that pushes a fixed concurrency into a service's throttling spends the tenant's budget on
    /// rejected calls and retries; an adaptive one runs about as many commands at once as the budget
    /// admits.
    ///
    /// [`Failure::Throttled`]: crate::retry::Failure::Throttled
    ///
    /// ```no_run
    /// # async fn demo(workers: psbridge::RunspaceBuilder) -> psbridge::Result<()> {
    /// use psbridge::{RunspacePool, exo};
    /// let pool = RunspacePool::builder(workers).max_workers(8).classifier(exo::ExchangeOnline).adaptive_concurrency(true).build().await?;
    /// println!("running at most {} at once", pool.stats().concurrency_limit);
    /// # Ok(()) }
    /// ```
    pub fn adaptive_concurrency(mut self, adaptive: bool) -> Self {
        self.adaptive_concurrency = adaptive;
        self
    }

    /// Fewest worker processes, started by [`build`](Self::build) and kept. Default: 1.
    pub fn min_workers(mut self, n: usize) -> Self {
        self.min_workers = n.max(1);
        self.max_workers = self.max_workers.max(self.min_workers);
        self
    }

    /// Most worker processes; the pool grows to this under load and shrinks back when idle. Default: the
    /// number of CPUs, at least `min_workers`.
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = n.max(1);
        self.min_workers = self.min_workers.min(self.max_workers);
        self
    }

    /// Commands that may wait for a worker; `invoke` waits for room beyond that, `try_invoke` fails with
    /// [`Error::QueueFull`]. Default: 10,000.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// How long a command may wait for a worker before failing with [`Error::WaitTimeout`]. Default:
    /// no limit.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = Some(timeout);
        self
    }

    /// How long a worker above `min_workers` may stay idle before it is closed. Default: 60 s.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// A worker idle for this long runs the health check before its next command. Default: 5 min.
    pub fn health_check_after(mut self, idle: Duration) -> Self {
        self.health_check_after = idle;
        self
    }

    /// The health check, judged by the [`classifier`](Self::classifier)'s health rule. A failed check
    /// replaces the worker with a freshly connected one. Default: `$true` (a ping);
    /// [`exo::health_check`](crate::exo::health_check) for Exchange Online.
    pub fn health_check(mut self, command: Command) -> Self {
        self.health_check = command;
        self
    }

    /// Retries of throttled commands and of idempotent commands whose worker died. Default:
    /// [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// What a failed command's error records mean (retry, replace the worker, give up) and whether a
    /// health check passed. Default: [`retry::Generic`](crate::retry::Generic), which knows no module:
    /// nothing but a dead worker is retried. [`exo::ExchangeOnline`](crate::exo::ExchangeOnline) knows
    /// Exchange Online's throttling and expired tokens.
    pub fn classifier(mut self, classifier: impl Classifier) -> Self {
        self.classifier = Arc::new(classifier);
        self
    }

    /// How many times in a row a worker may fail to start or connect before the pool gives up: every
    /// queued command, and every later one, then fails with [`Error::WorkersUnavailable`] naming the
    /// last failure, instead of waiting for a worker that cannot come. Default: 3.
    pub fn connect_attempts(mut self, attempts: u32) -> Self {
        self.connect_attempts = attempts.max(1);
        self
    }

    /// A worker whose credentials expire (see [`Runspace::expires_at`]) is replaced by a freshly
    /// connected one this long before they do, between commands. Default: 5 min.
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.refresh_margin = margin;
        self
    }

    /// When healthy workers are replaced. Default: never.
    pub fn recycle(mut self, policy: RecyclePolicy) -> Self {
        self.recycle = policy;
        self
    }

    /// Backoff between attempts to replace a dead worker: first delay, then doubling up to the maximum.
    /// Default: 500 ms up to 30 s.
    pub fn restart_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.restart_backoff = (first, max.max(first));
        self
    }

    /// At most this many commands per second start, pool-wide. Default: no limit.
    pub fn rate_limit(mut self, per_second: f64) -> Self {
        self.rate_limit = (per_second > 0.0).then_some(per_second);
        self
    }

    /// How long [`RunspacePool::close`] lets running commands finish before cancelling them. Default: 30 s.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Opens `min_workers` workers (each with its runspaces) in parallel.
    ///
    /// # Errors
    /// [`Error::PoolOpen`] with every worker's failure when any of them could not open; the others are
    /// closed again.
    pub async fn build(self) -> Result<RunspacePool> {
        let wanted = self.min_workers;
        let lanes = self.runspaces_per_worker;
        let opened = futures_util::future::join_all((0..wanted).map(|_| self.runspace.clone().open_many(lanes))).await;
        let (processes, failures): (Vec<_>, Vec<_>) = opened.into_iter().partition(Result::is_ok);
        if !failures.is_empty() {
            for process in processes.into_iter().flatten() {
                for closed in futures_util::future::join_all(process.into_iter().map(Runspace::close)).await {
                    let _ = closed;
                }
            }
            return Err(Error::PoolOpen { wanted, failures: failures.into_iter().filter_map(Result::err).collect() });
        }
        let work = Arc::new(Notify::new());
        let shared = Arc::new(PoolShared {
            slots: Arc::new(Semaphore::new(self.queue_capacity)),
            queue: Mutex::new(Queue::default()),
            limiter: Limiter::new(self.max_workers * lanes, self.adaptive_concurrency, work.clone()),
            work,
            closed: AtomicBool::new(false),
            broken: Mutex::new(None),
            live: AtomicUsize::new(0),
            next_slot_id: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            workers: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            timings: Timings::new(),
            next_start: Mutex::new(Instant::now()),
            config: self,
        });
        for process in processes.into_iter().flatten() {
            shared.live.fetch_add(1, Ordering::SeqCst);
            shared.spawn_worker(Some(process));
        }
        Ok(RunspacePool { _owner: Arc::new(Owner(shared.clone())), shared })
    }
}

/// What the pool's tasks share.
struct PoolShared {
    config: PoolBuilder,
    queue: Mutex<Queue>,
    /// Woken when a job arrives, a key is released, a permit is given back, the limit grows, or the
    /// pool closes.
    work: Arc<Notify>,
    /// How many commands may run at once.
    limiter: Arc<Limiter>,
    /// Room in the queue.
    slots: Arc<Semaphore>,
    closed: AtomicBool,
    /// Set when workers could not be started or connected `connect_attempts` times in a row: what every
    /// command fails with from then on.
    broken: Mutex<Option<(u32, Arc<Error>)>>,
    /// Worker process slots alive (starting, idle, busy or recycling).
    live: AtomicUsize,
    /// The id the next worker process slot gets (its runspaces are numbered from `id x runspaces`).
    next_slot_id: AtomicUsize,
    /// Runspaces waiting for a job.
    idle: AtomicUsize,
    workers: Mutex<Vec<Arc<worker::ProcessSlot>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    timings: Timings,
    /// For the rate limit: when the next command may start.
    next_start: Mutex<Instant>,
}

impl PoolShared {
    /// Starts a worker task for a process slot already counted in `live`.
    fn spawn_worker(self: &Arc<Self>, runspaces: Option<Vec<Runspace>>) {
        let lanes = self.config.runspaces_per_worker;
        let slot = {
            let mut workers = lock(&self.workers);
            // Slots of workers that stopped are forgotten here, so that a long-lived pool that grows
            // and shrinks does not keep every slot it ever had.
            workers.retain(|slot| !slot.stopped());
            let id = self.next_slot_id.fetch_add(1, Ordering::SeqCst);
            let slot = Arc::new(worker::ProcessSlot::new(id, lanes, id * lanes, runspaces.as_deref()));
            workers.push(slot.clone());
            slot
        };
        let task = tokio::spawn(worker::run(self.clone(), slot, runspaces));
        let mut tasks = lock(&self.tasks);
        tasks.retain(|task| !task.is_finished());
        tasks.push(task);
    }

    /// Starts another worker when every live one is busy and the pool may grow.
    fn grow_if_needed(self: &Arc<Self>) {
        let queued = lock(&self.queue).len();
        // Another process would not help while the limiter holds the pool down.
        let held = self.limiter.saturated();
        if queued <= self.idle.load(Ordering::SeqCst) || held || self.closed.load(Ordering::SeqCst) || self.is_broken() {
            return;
        }
        // Counted and checked in one step: submits racing here can never pass max_workers.
        let max = self.config.max_workers;
        if self.live.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |live| (live < max).then_some(live + 1)).is_ok() {
            tracing::debug!(queued, "growing the pool");
            self.spawn_worker(None);
        }
    }

    fn is_broken(&self) -> bool {
        lock(&self.broken).is_some()
    }

    /// The error every command gets once the pool gave up on starting workers.
    fn unavailable(&self) -> Option<Error> {
        lock(&self.broken).as_ref().map(|(attempts, cause)| Error::WorkersUnavailable { attempts: *attempts, cause: cause.clone() })
    }

    /// Gives up on starting workers: every queued command fails with `cause`, and so does every later one.
    async fn give_up(&self, attempts: u32, cause: Error) {
        tracing::error!(attempts, error = %cause, "no worker could be started and connected: failing every queued command");
        *lock(&self.broken) = Some((attempts, Arc::new(cause)));
        let jobs = lock(&self.queue).drain();
        for job in jobs {
            let error = self.unavailable().expect("set above");
            job.reply.fail(error).await;
        }
        self.work.notify_waiters();
    }

    /// Slots that have a connected worker right now.
    fn connected_workers(&self) -> usize {
        lock(&self.workers).iter().filter(|slot| slot.connected()).count()
    }

    /// Waits for the pool-wide rate limit, if any.
    async fn pace(&self) {
        let Some(per_second) = self.config.rate_limit else { return };
        let start = {
            let mut next = lock(&self.next_start);
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(1.0 / per_second);
            start
        };
        tokio::time::sleep_until(start).await;
    }

    async fn submit(self: &Arc<Self>, command: Command, reply: Reply, wait: bool, on_start: Option<OnStart>) -> Result<oneshot::Receiver<()>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::PoolClosed);
        }
        if let Some(error) = self.unavailable() {
            return Err(error);
        }
        let slot = if wait {
            self.slots.clone().acquire_owned().await.map_err(|_| Error::PoolClosed)?
        } else {
            self.slots.clone().try_acquire_owned().map_err(|_| Error::QueueFull { capacity: self.config.queue_capacity })?
        };
        let (started, started_rx) = oneshot::channel();
        let job = Job::new(command, reply, Some(started), on_start, Some(slot));
        lock(&self.queue).push(job);
        self.work.notify_waiters();
        self.grow_if_needed();
        Ok(started_rx)
    }

    /// Waits until a worker takes the job, within the wait timeout.
    async fn await_start(&self, started: oneshot::Receiver<()>) -> Result<()> {
        let outcome = match self.config.wait_timeout {
            Some(limit) => tokio::time::timeout(limit, started).await.map_err(|_| Error::WaitTimeout(limit))?,
            None => started.await,
        };
        // The sender is dropped without a word only when the pool shut down, or gave up on starting
        // workers, before the job started.
        outcome.map_err(|_| self.unavailable().unwrap_or(Error::PoolClosed))
    }
}

/// A pool of connected pwsh workers; clone it freely, every clone is the same pool.
///
/// `invoke` is callable from many tasks at once; the pool runs up to `max_workers` x
/// `runspaces_per_worker` commands in parallel (fewer while [adaptive
/// concurrency](PoolBuilder::adaptive_concurrency) holds it down), queues the rest first come, first
/// served, and never runs two commands with the same [`key`](Command::key) at once, on whichever
/// runspaces.
///
/// ```no_run
/// # async fn demo(pool: psbridge::RunspacePool) -> psbridge::Result<()> {
/// use psbridge::Command;
/// let (a, b) = tokio::join!(
///     pool.invoke(Command::new("Get-Mailbox").param("Identity", "ContosoUser1")),
///     pool.invoke(Command::new("Get-Mailbox").param("Identity", "ContosoUser2")),
/// );
/// println!("{:?} {:?}", a?.output, b?.output);
/// pool.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RunspacePool {
    shared: Arc<PoolShared>,
    _owner: Arc<Owner>,
}

/// Dropped with the last clone of a pool: closes it so that its workers end (worker tasks hold the
/// shared state, so it cannot notice on its own).
struct Owner(Arc<PoolShared>);

impl Drop for Owner {
    fn drop(&mut self) {
        if !self.0.closed.swap(true, Ordering::SeqCst) {
            self.0.slots.close();
            self.0.work.notify_waiters();
        }
    }
}

impl std::fmt::Debug for RunspacePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunspacePool")
            .field("live", &self.shared.live.load(Ordering::SeqCst))
            .field("queued", &lock(&self.shared.queue).len())
            .finish()
    }
}

impl RunspacePool {
    /// A builder whose workers are opened with `runspace` (modules, connect and disconnect commands,
    /// timeouts).
    pub fn builder(runspace: RunspaceBuilder) -> PoolBuilder {
        PoolBuilder {
            runspace,
            min_workers: 1,
            max_workers: std::thread::available_parallelism().map_or(2, usize::from),
            queue_capacity: 10_000,
            wait_timeout: None,
            idle_timeout: Duration::from_secs(60),
            health_check_after: Duration::from_secs(300),
            health_check: Command::script("$true"),
            retry: RetryPolicy::default(),
            classifier: Arc::new(Generic),
            connect_attempts: 3,
            refresh_margin: Duration::from_secs(300),
            recycle: RecyclePolicy::default(),
            restart_backoff: (Duration::from_millis(500), Duration::from_secs(30)),
            rate_limit: None,
            shutdown_grace: Duration::from_secs(30),
            runspaces_per_worker: 1,
            adaptive_concurrency: false,
        }
    }

    /// Runs a command on the next free worker and returns everything it produced.
    ///
    /// Throttled commands are retried with backoff; a worker whose credentials expired is replaced and
    /// the command retried once; an idempotent command whose worker died is retried on a fresh worker. Errors the
    /// command reports are data (`had_errors`), as with [`Runspace::invoke`].
    ///
    /// # Cancel safety
    /// Dropping the future takes the command out of the queue, or stops it if it is running.
    pub async fn invoke(&self, command: Command) -> Result<InvocationResult> {
        self.invoke_inner(command, true).await
    }

    /// Like [`invoke`](Self::invoke), but fails at once with [`Error::QueueFull`] instead of waiting for
    /// room in the queue.
    pub async fn try_invoke(&self, command: Command) -> Result<InvocationResult> {
        self.invoke_inner(command, false).await
    }

    async fn invoke_inner(&self, command: Command, wait: bool) -> Result<InvocationResult> {
        self.enqueue(command, wait, None).await?.result().await
    }

    /// Queues a command whose caller collects its result; waits for room unless `wait` is false.
    async fn enqueue(&self, command: Command, wait: bool, on_start: Option<OnStart>) -> Result<Pending> {
        let (tx, rx) = oneshot::channel();
        let started = self.shared.submit(command, Reply::Collect(tx), wait, on_start).await?;
        Ok(Pending { shared: self.shared.clone(), started, reply: rx })
    }

    /// Puts a command in the queue and returns once it is there, waiting for room when the queue is
    /// full; [`Pending::result`] then waits for what it produced.
    ///
    /// Commands with the same [`key`](Command::key) run in the order they were submitted, so a caller
    /// that must keep an order submits one command after the other and awaits the results anywhere
    /// (another task, `join_all`), which [`invoke`](Self::invoke) from several tasks cannot promise.
    ///
    /// ```no_run
    /// # async fn demo(pool: psbridge::RunspacePool) -> psbridge::Result<()> {
    /// use psbridge::Command;
    /// let office = |o: &str| Command::new("Set-Mailbox").param("Identity", "u1").param("Office", o).key("u1");
    /// let first = pool.submit(office("A")).await?;
    /// let second = pool.submit(office("B")).await?;
    /// // The office ends as "B": the second never starts before the first is done.
    /// let (a, b) = tokio::join!(tokio::spawn(first.result()), tokio::spawn(second.result()));
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Dropping this future before it completes submits nothing; dropping the [`Pending`] takes the
    /// command out of the queue, or stops it if it is running.
    pub async fn submit(&self, command: Command) -> Result<Pending> {
        self.enqueue(command, true, None).await
    }

    /// Like [`submit`](Self::submit), and calls `on_start` on the worker's task when a worker begins the
    /// command, just before it is first sent to PowerShell (once: not again for retries). A command
    /// withdrawn or failed before a worker began it never calls `on_start`.
    ///
    /// `on_start` delays the command until it returns, so keep it short (`psbridge batch` writes its
    /// journal's start record there, so that the record is on disk before the command can run).
    ///
    /// # Cancel safety
    /// As [`submit`](Self::submit): dropping this future before it completes submits nothing (and
    /// `on_start` is never called).
    pub async fn submit_with_start(&self, command: Command, on_start: impl FnOnce() + Send + 'static) -> Result<Pending> {
        self.enqueue(command, true, Some(Box::new(on_start))).await
    }

    /// Runs a command on the next free worker and yields its items as they come.
    ///
    /// A streamed command is not retried (its items may already have been used), except when its worker
    /// died before it produced anything and the command is idempotent.
    pub async fn invoke_stream(&self, command: Command) -> Result<PoolStream> {
        let (tx, rx) = mpsc::channel(self.shared.config.runspace.stream_buffer_len());
        let started = self.shared.submit(command, Reply::Stream(tx), true, None).await?;
        self.shared.await_start(started).await?;
        Ok(PoolStream { items: rx, completion: None })
    }

    /// Counters and latency percentiles of the pool, of each worker process and of each runspace, and
    /// the concurrency permitted now.
    pub fn stats(&self) -> PoolStats {
        let slots: Vec<Arc<worker::ProcessSlot>> = lock(&self.shared.workers).clone();
        let processes: Vec<ProcessStats> = slots.iter().map(|slot| slot.snapshot()).collect();
        let mut workers: Vec<WorkerStats> = slots.iter().flat_map(|slot| slot.lanes().iter().map(|lane| lane.snapshot())).collect();
        for worker in &mut workers {
            worker.resident_bytes = processes.iter().find(|p| p.id == worker.process).and_then(|p| p.resident_bytes);
        }
        let (queue_wait, latency) = self.shared.timings.snapshot();
        PoolStats {
            queued: lock(&self.shared.queue).len(),
            running: self.shared.limiter.running(),
            concurrency_limit: self.shared.limiter.limit(),
            counters: workers.iter().map(|w| w.counters).chain(processes.iter().map(|p| p.counters)).sum(),
            queue_wait,
            latency,
            workers,
            processes,
        }
    }

    /// How many commands may run at once now, as in [`PoolStats::concurrency_limit`], without the rest
    /// of the statistics (cheap enough to call after every command).
    pub fn concurrency_limit(&self) -> usize {
        self.shared.limiter.limit()
    }

    /// The PowerShell process ids of the live workers (one per process, however many runspaces it hosts).
    pub fn worker_pids(&self) -> Vec<u32> {
        lock(&self.shared.workers).iter().filter_map(|slot| slot.snapshot().pid).collect()
    }

    /// Shuts the pool down: takes no more commands, fails the queued ones with [`Error::PoolClosed`],
    /// lets running ones finish within the shutdown grace period (then cancels them), runs the
    /// disconnect command on every worker and waits for every process to exit.
    pub async fn close(&self) {
        if self.shared.closed.swap(true, Ordering::SeqCst) {
            return self.wait_for_workers().await;
        }
        self.shared.slots.close();
        let queued = lock(&self.shared.queue).drain();
        for job in queued {
            job.reply.fail(Error::PoolClosed).await;
        }
        self.shared.work.notify_waiters();
        let grace = self.shared.config.shutdown_grace;
        if tokio::time::timeout(grace, self.wait_for_workers()).await.is_err() {
            tracing::warn!(?grace, "commands still running after the shutdown grace period: cancelling them");
            let handles: Vec<CancelHandle> =
                lock(&self.shared.workers).iter().flat_map(|slot| slot.lanes().iter().filter_map(|lane| lane.cancel_handle())).collect();
            handles.iter().for_each(|h| {
                h.cancel();
            });
            self.wait_for_workers().await;
        }
    }

    async fn wait_for_workers(&self) {
        let tasks: Vec<JoinHandle<()>> = lock(&self.shared.tasks).drain(..).collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Items of a command run with [`RunspacePool::invoke_stream`].
#[derive(Debug)]
pub struct PoolStream {
    items: mpsc::Receiver<Result<Streamed>>,
    completion: Option<Completion>,
}

impl PoolStream {
    /// The next item; `Ok(None)` at the end.
    ///
    /// # Cancel safety
    /// Cancel safe. Dropping the stream stops the command.
    pub async fn next_item(&mut self) -> Result<Option<StreamItem>> {
        if self.completion.is_some() {
            return Ok(None);
        }
        match self.items.recv().await {
            Some(Ok(Streamed::Item(item))) => Ok(Some(item)),
            Some(Ok(Streamed::Done(completion))) => {
                self.completion = Some(completion);
                Ok(None)
            }
            Some(Err(error)) => Err(error),
            None => Err(Error::PoolClosed),
        }
    }

    /// How the command ended, once [`next_item`](Self::next_item) has returned `Ok(None)`.
    pub fn completion(&self) -> Option<Completion> {
        self.completion
    }
}

/// A command in a pool's queue, from [`RunspacePool::submit`].
///
/// Dropping it takes the command out of the queue, or stops it if it is running.
#[must_use = "dropping a Pending withdraws its command"]
pub struct Pending {
    shared: Arc<PoolShared>,
    started: oneshot::Receiver<()>,
    reply: oneshot::Receiver<Result<InvocationResult>>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl Pending {
    /// Waits for a worker to take the command (within the pool's wait timeout) and for what it
    /// produced, as [`RunspacePool::invoke`] does.
    ///
    /// # Cancel safety
    /// Dropping the future withdraws the command, or stops it if it is running.
    pub async fn result(self) -> Result<InvocationResult> {
        self.shared.await_start(self.started).await?;
        self.reply.await.map_err(|_| Error::PoolClosed)?
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
