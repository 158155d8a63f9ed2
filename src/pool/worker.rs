//! One worker slot of a pool: a task that owns a runspace, takes jobs, and keeps the runspace healthy:
//! it replaces the runspace when it dies, when its policy says it is due, when its health check fails
//! and when its credentials expired or are about to. A replacement is always a fresh process connected
//! with freshly read credentials, never a second connect in the same process.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use super::queue::{Job, Reply, Streamed};
use super::stats::{WorkerState, WorkerStats, resident_bytes};
use super::{PoolShared, lock};
use crate::command::Command;
use crate::errors::{Error, Result};
use crate::records::StreamItem;
use crate::records::{Completion, InvocationResult};
use crate::retry::Failure;
use crate::runspace::{CancelHandle, Runspace};

/// What the pool can see of a worker from outside its task.
pub(crate) struct Slot {
    id: usize,
    stats: Mutex<WorkerStats>,
    cancel: Mutex<Option<CancelHandle>>,
}

impl Slot {
    pub(crate) fn new(id: usize, runspace: Option<&Runspace>) -> Self {
        let slot = Slot { id, stats: Mutex::new(WorkerStats::new(id)), cancel: Mutex::new(None) };
        if let Some(runspace) = runspace {
            slot.attach(runspace);
        }
        slot
    }

    /// The counters, with resident memory read now.
    pub(crate) fn snapshot(&self) -> WorkerStats {
        let mut stats = lock(&self.stats).clone();
        stats.resident_bytes = stats.pid.and_then(resident_bytes);
        stats
    }

    pub(crate) fn cancel_handle(&self) -> Option<CancelHandle> {
        lock(&self.cancel).clone()
    }

    fn update(&self, change: impl FnOnce(&mut WorkerStats)) {
        change(&mut lock(&self.stats));
    }

    fn attach(&self, runspace: &Runspace) {
        self.update(|s| {
            s.pid = Some(runspace.pid());
            s.credentials_expire_at = runspace.expires_at();
            s.runspace_opened = Some(Instant::now());
            s.runspace_commands = 0;
        });
        *lock(&self.cancel) = Some(runspace.cancel_handle());
    }

    fn detach(&self) {
        self.update(|s| {
            s.pid = None;
            s.credentials_expire_at = None;
        });
        *lock(&self.cancel) = None;
    }

    /// Whether the slot's task has ended.
    pub(crate) fn stopped(&self) -> bool {
        lock(&self.stats).state == WorkerState::Stopped
    }

    /// Whether the slot has a started, connected worker right now.
    pub(crate) fn connected(&self) -> bool {
        lock(&self.stats).pid.is_some()
    }
}

/// Why a runspace is replaced.
#[derive(Debug, Clone, Copy)]
enum Replacement {
    /// Its credentials expired (the command said so, or they are about to).
    Expired,
    /// Its health check failed.
    Unhealthy,
}

/// The worker task: runs until the pool closes or the worker is retired for being idle.
pub(crate) async fn run(shared: Arc<PoolShared>, slot: Arc<Slot>, initial: Option<Runspace>) {
    let span = tracing::debug_span!("pool_worker", worker = slot.id);
    async move {
        let mut runspace = initial;
        let mut idle_since = Instant::now();
        let mut retired = false;
        loop {
            if runspace.is_none() {
                // Replace a dead, recycled or retired runspace before taking work.
                match open_worker(&shared, &slot).await {
                    Ok(fresh) => runspace = Some(fresh),
                    Err(_) => break, // the pool closed, or this slot (or the pool) gave up
                }
                idle_since = Instant::now();
            }
            slot.update(|s| s.state = WorkerState::Idle);
            let Some(mut job) = next_job(&shared, &mut retired).await else { break };
            slot.update(|s| s.state = WorkerState::Busy);
            if let Some(started) = job.started.take() {
                let _ = started.send(());
            }
            if idle_since.elapsed() >= shared.config.health_check_after {
                check_health(&shared, &slot, &mut runspace).await;
            }
            refresh_if_expiring(&shared, &slot, &mut runspace);
            if runspace.is_none() {
                // Replaced just now (credentials about to expire, a failed health check): open the new one
                // before the job is begun, so that a slot that cannot gives the job back instead of failing
                // a command that never ran.
                match open_worker(&shared, &slot).await {
                    Ok(fresh) => runspace = Some(fresh),
                    Err(_) => {
                        give_back(&shared, job).await;
                        break;
                    }
                }
            }
            let key = job.command.key_str().map(str::to_owned);
            let enqueued = job.enqueued;
            let queue_wait = enqueued.elapsed();
            if let Some(on_start) = job.on_start.take() {
                on_start();
            }
            let failed = execute(&shared, &slot, &mut runspace, job).await;
            shared.timings.record(queue_wait, enqueued.elapsed());
            lock(&shared.queue).release(key.as_deref());
            shared.work.notify_waiters();
            slot.update(|s| {
                s.counters.commands += 1;
                s.counters.failures += u64::from(failed);
                s.runspace_commands += 1;
            });
            idle_since = Instant::now();
            recycle_if_due(&shared, &slot, &mut runspace).await;
        }
        slot.update(|s| s.state = WorkerState::Stopped);
        if let Some(runspace) = runspace.take() {
            slot.detach();
            if let Err(error) = runspace.close().await {
                tracing::warn!(%error, "closing a pool worker");
            }
        }
        if !retired {
            shared.live.fetch_sub(1, Ordering::SeqCst);
        }
    }
    .instrument(span)
    .await
}

/// Waits for a job this worker may run. `None` when the pool closed or this worker was retired.
async fn next_job(shared: &PoolShared, retired: &mut bool) -> Option<Job> {
    shared.idle.fetch_add(1, Ordering::SeqCst);
    let job = async {
        loop {
            // Register for a wake-up before looking, so that a job queued in between is not missed.
            let notified = shared.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(job) = lock(&shared.queue).take() {
                return Some(job);
            }
            if shared.closed.load(Ordering::SeqCst) {
                return None;
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(shared.config.idle_timeout) => {
                    let min = shared.config.min_workers;
                    let shrunk = shared.live.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |live| (live > min).then(|| live - 1));
                    if shrunk.is_ok() {
                        tracing::debug!("idle above min_workers: retiring");
                        *retired = true;
                        return None;
                    }
                }
            }
        }
    }
    .await;
    shared.idle.fetch_sub(1, Ordering::SeqCst);
    job
}

/// Opens a runspace, retrying with exponential backoff, at most `connect_attempts` times in a row.
///
/// Fails with [`Error::PoolClosed`] once the pool closes, with [`Error::WorkersUnavailable`] once the
/// pool gave up, or with the last error when this slot gave up while other workers still work. The
/// pool gives up when a slot's attempts run out and no other worker is connected: waiting longer would
/// only hang every queued command on credentials that do not work.
async fn open_worker(shared: &PoolShared, slot: &Slot) -> Result<Runspace> {
    let (mut delay, max) = shared.config.restart_backoff;
    let attempts = shared.config.connect_attempts;
    let mut failures = 0;
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return Err(Error::PoolClosed);
        }
        if let Some(error) = shared.unavailable() {
            return Err(error);
        }
        slot.update(|s| s.state = WorkerState::Starting);
        let error = match shared.config.runspace.clone().open().await {
            Ok(runspace) => {
                slot.attach(&runspace);
                return Ok(runspace);
            }
            Err(error) => error,
        };
        failures += 1;
        if failures >= attempts {
            if shared.connected_workers() > 0 {
                tracing::warn!(%error, failures, "pool worker could not start; the others go on without it");
                return Err(error);
            }
            shared.give_up(failures, error).await;
            return Err(shared.unavailable().expect("the pool gave up"));
        }
        tracing::warn!(%error, ?delay, failures, "pool worker could not start; trying again");
        let closing = shared.work.notified();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = closing, if !shared.closed.load(Ordering::SeqCst) => {}
        }
        delay = (delay * 2).min(max);
    }
}

/// Returns a job no worker began to the front of the queue for another worker, or fails it with the
/// pool's error when the pool gave up. Checked and queued under the queue's lock: the pool gives up by
/// marking itself broken and then draining the queue under that lock, so the job is never left behind.
async fn give_back(shared: &PoolShared, job: Job) {
    let refused = {
        let mut queue = lock(&shared.queue);
        match shared.unavailable() {
            Some(error) => Some((job, error)),
            None => {
                queue.give_back(job);
                None
            }
        }
    };
    match refused {
        Some((job, error)) => job.reply.fail(error).await,
        None => shared.work.notify_waiters(),
    }
}

/// The runspace, opened first if it is gone.
async fn ensure_open<'r>(shared: &PoolShared, slot: &Slot, runspace: &'r mut Option<Runspace>) -> Result<&'r mut Runspace> {
    if runspace.is_none() {
        *runspace = Some(open_worker(shared, slot).await?);
    }
    Ok(runspace.as_mut().expect("opened above"))
}

/// Takes a live runspace out of service: it is disconnected and closed in the background (the pool's
/// close waits for that), and the next use opens a fresh one with freshly read credentials.
fn replace(shared: &PoolShared, slot: &Slot, runspace: &mut Option<Runspace>, why: Replacement) {
    let Some(old) = runspace.take() else { return };
    tracing::info!(?why, pid = old.pid(), "replacing the worker with a freshly connected one");
    slot.detach();
    slot.update(|s| s.counters.reconnects += 1);
    let closing = tokio::spawn(async move {
        if let Err(error) = old.close().await {
            tracing::warn!(%error, "closing a replaced worker");
        }
    });
    let mut tasks = lock(&shared.tasks);
    tasks.retain(|task| !task.is_finished());
    tasks.push(closing);
}

/// Replaces the runspace when its credentials expire within the refresh margin.
fn refresh_if_expiring(shared: &PoolShared, slot: &Slot, runspace: &mut Option<Runspace>) {
    let due = runspace
        .as_ref()
        .and_then(Runspace::expires_at)
        .is_some_and(|expires| std::time::SystemTime::now() + shared.config.refresh_margin >= expires);
    if due {
        replace(shared, slot, runspace, Replacement::Expired);
    }
}

/// Forgets a runspace that died; the next use opens a fresh one.
fn drop_if_dead(slot: &Slot, runspace: &mut Option<Runspace>) -> bool {
    let dead = runspace.as_ref().is_some_and(|rs| rs.exit_status().is_some());
    if dead {
        tracing::warn!(exit = %runspace.as_ref().and_then(Runspace::exit_status).map(|e| e.to_string()).unwrap_or_default(), "pool worker died");
        *runspace = None;
        slot.detach();
        slot.update(|s| s.counters.restarts += 1);
    }
    dead
}

/// Runs one job and answers its caller. Returns whether it failed.
async fn execute(shared: &PoolShared, slot: &Slot, runspace: &mut Option<Runspace>, job: Job) -> bool {
    let span = tracing::debug_span!("pool_command", command = job.command.name());
    let Job { command, reply, .. } = job;
    async move {
        match reply {
            Reply::Collect(mut tx) => {
                let outcome = run_collect(shared, slot, runspace, &command, &mut tx).await;
                let failed = outcome.as_ref().map_or(true, |r| !r.succeeded());
                let _ = tx.send(outcome);
                failed
            }
            Reply::Stream(tx) => run_stream(shared, slot, runspace, &command, &tx).await,
        }
    }
    .instrument(span)
    .await
}

async fn run_collect(
    shared: &PoolShared,
    slot: &Slot,
    runspace: &mut Option<Runspace>,
    command: &Command,
    caller: &mut oneshot::Sender<Result<InvocationResult>>,
) -> Result<InvocationResult> {
    let policy = &shared.config.retry;
    let mut attempt = 1;
    let mut replaced = false;
    loop {
        let rs = ensure_open(shared, slot, runspace).await?;
        shared.pace().await;
        let outcome = tokio::select! {
            outcome = rs.invoke(command) => outcome,
            // The caller went away: dropping the invocation stops the command in the worker.
            () = caller.closed() => return Err(Error::Cancelled { worker_killed: false }),
        };
        match outcome {
            Ok(result) => match shared.config.classifier.classify(&result) {
                Some(failure @ (Failure::Transient | Failure::Throttled { .. })) if policy.retries_transient() && attempt < policy.attempts() => {
                    let retry_after = match failure {
                        Failure::Throttled { retry_after } => retry_after,
                        _ => None,
                    };
                    let delay = policy.delay(attempt, retry_after);
                    tracing::debug!(attempt, ?delay, "throttled: retrying");
                    let throttled = u64::from(matches!(failure, Failure::Throttled { .. }));
                    slot.update(|s| {
                        s.counters.retries += 1;
                        s.counters.throttled += throttled;
                    });
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = caller.closed() => return Err(Error::Cancelled { worker_killed: false }),
                    }
                }
                Some(Failure::ExpiredToken) if !replaced => {
                    // The credentials expired: retry once, not counted as an attempt, on a fresh worker
                    // connected with credentials read anew.
                    replaced = true;
                    replace(shared, slot, runspace, Replacement::Expired);
                    continue;
                }
                _ => return Ok(InvocationResult { attempts: attempt, ..result }),
            },
            Err(error) => {
                let dead = drop_if_dead(slot, runspace);
                // A timeout that killed the worker would only hang again; other deaths are retried for
                // idempotent commands.
                let retry = dead && command.is_idempotent() && !matches!(error, Error::Timeout { .. }) && attempt < policy.attempts();
                if !retry {
                    return Err(error);
                }
                slot.update(|s| s.counters.retries += 1);
            }
        }
        attempt += 1;
    }
}

/// Streams one job's items to its caller. Returns whether it failed.
async fn run_stream(
    shared: &PoolShared,
    slot: &Slot,
    runspace: &mut Option<Runspace>,
    command: &Command,
    caller: &mpsc::Sender<Result<Streamed>>,
) -> bool {
    let mut attempt = 1;
    loop {
        let rs = match ensure_open(shared, slot, runspace).await {
            Ok(rs) => rs,
            Err(error) => {
                let _ = caller.send(Err(error)).await;
                return true;
            }
        };
        shared.pace().await;
        let mut sent_any = false;
        let mut errors_seen = false;
        let outcome: Result<Completion> = async {
            let mut stream = rs.invoke_stream(command)?;
            while let Some(item) = stream.next_item().await? {
                sent_any = true;
                errors_seen |= matches!(item, StreamItem::Error(_));
                if caller.send(Ok(Streamed::Item(item))).await.is_err() {
                    return Err(Error::Cancelled { worker_killed: false }); // dropping the stream stops it
                }
            }
            Ok(stream.completion().expect("a finished stream has its completion"))
        }
        .await;
        match outcome {
            Ok(completion) => {
                let _ = caller.send(Ok(Streamed::Done(completion))).await;
                return errors_seen || !completion.ended_well();
            }
            Err(error) => {
                let dead = drop_if_dead(slot, runspace);
                let retry = dead
                    && !sent_any
                    && command.is_idempotent()
                    && !matches!(error, Error::Timeout { .. })
                    && attempt < shared.config.retry.attempts();
                if !retry {
                    let _ = caller.send(Err(error)).await;
                    return true;
                }
                slot.update(|s| s.counters.retries += 1);
                attempt += 1;
            }
        }
    }
}

/// Runs the health check on a worker that was idle for long; replaces it when it fails.
async fn check_health(shared: &PoolShared, slot: &Slot, runspace: &mut Option<Runspace>) {
    let Some(rs) = runspace.as_mut() else { return };
    match rs.invoke(&shared.config.health_check).await {
        Ok(result) if shared.config.classifier.healthy(&result) => {}
        Ok(_) => replace(shared, slot, runspace, Replacement::Unhealthy),
        Err(_) => {
            if !drop_if_dead(slot, runspace) {
                replace(shared, slot, runspace, Replacement::Unhealthy);
            }
        }
    }
}

/// Replaces the runspace when the recycling policy says it is due (count, age, memory).
async fn recycle_if_due(shared: &PoolShared, slot: &Slot, runspace: &mut Option<Runspace>) {
    let policy = &shared.config.recycle;
    let stats = slot.snapshot();
    let by_count = policy.max_commands.is_some_and(|max| stats.runspace_commands >= max);
    let by_age = policy.max_age.zip(stats.runspace_age()).is_some_and(|(max, age)| age >= max);
    let by_memory = policy.max_resident_bytes.zip(stats.resident_bytes).is_some_and(|(max, rss)| rss >= max);
    if !(by_count || by_age || by_memory) {
        return;
    }
    let Some(old) = runspace.take() else { return };
    tracing::info!(by_count, by_age, by_memory, resident = ?stats.resident_bytes, "recycling the worker");
    slot.update(|s| {
        s.state = WorkerState::Recycling;
        s.counters.recycles += 1;
    });
    slot.detach();
    if let Err(error) = old.close().await {
        tracing::warn!(%error, "closing a recycled worker");
    }
}
