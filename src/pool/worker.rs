//! One worker process of a pool: a task that owns the process's runspaces (its lanes, as many as
//! `runspaces_per_worker`), runs up to one job on each at once, and keeps the process healthy: it
//! replaces the process when it dies, when its policy says it is due, when a runspace's health check
//! fails and when its credentials expired or are about to. A replacement is always a fresh process whose
//! runspaces are each connected with freshly read credentials, never a second connect in a live
//! process (Exchange Online adds a connection, and its Disconnect-ExchangeOnline clears every connection
//! of the process).
//!
//! What one runspace meets, its siblings share: when a command kills the process (it crashed, or it
//! would not stop after a timeout), the commands running on the other runspaces fail with the process's
//! exit, or run again on another worker when they are idempotent, exactly as on a crash.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;
use tracing::Instrument;

use super::limiter::Permit;
use super::queue::{Job, Reply, Streamed};
use super::stats::{ProcessStats, WorkerState, WorkerStats, resident_bytes};
use super::{PoolShared, lock};
use crate::errors::{Error, Result};
use crate::records::{InvocationResult, StreamItem};
use crate::retry::Failure;
use crate::runspace::{CancelHandle, Runspace};

/// What the pool can see of one runspace from outside its process's task.
pub(crate) struct Slot {
    stats: Mutex<WorkerStats>,
    cancel: Mutex<Option<CancelHandle>>,
}

impl Slot {
    fn new(id: usize, process: usize, runspace: usize) -> Self {
        Slot { stats: Mutex::new(WorkerStats::new(id, process, runspace)), cancel: Mutex::new(None) }
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

    /// Whether the runspace's process was opened before `instant`.
    fn opened_before(&self, instant: Instant) -> bool {
        lock(&self.stats).runspace_opened.is_some_and(|opened| opened < instant)
    }
}

/// What the pool can see of one worker process: its runspaces and what they share.
pub(crate) struct ProcessSlot {
    lanes: Vec<Arc<Slot>>,
    stats: Mutex<ProcessStats>,
}

impl ProcessSlot {
    /// A process slot numbered `id` whose `lanes` runspaces are numbered from `first_lane_id`, with its
    /// process's runspaces when they are open already.
    pub(crate) fn new(id: usize, lanes: usize, first_lane_id: usize, open: Option<&[Runspace]>) -> Self {
        let slot = ProcessSlot {
            lanes: (0..lanes).map(|i| Arc::new(Slot::new(first_lane_id + i, id, i))).collect(),
            stats: Mutex::new(ProcessStats::new(id, lanes)),
        };
        if let Some(runspaces) = open {
            slot.attach(runspaces);
            slot.set_state(WorkerState::Idle);
        }
        slot
    }

    pub(crate) fn lanes(&self) -> &[Arc<Slot>] {
        &self.lanes
    }

    /// The process's counters, with resident memory read now.
    pub(crate) fn snapshot(&self) -> ProcessStats {
        let mut stats = lock(&self.stats).clone();
        stats.resident_bytes = stats.pid.and_then(resident_bytes);
        stats
    }

    fn update(&self, change: impl FnOnce(&mut ProcessStats)) {
        change(&mut lock(&self.stats));
    }

    fn set_state(&self, state: WorkerState) {
        self.lanes.iter().for_each(|lane| lane.update(|s| s.state = state));
    }

    fn attach(&self, runspaces: &[Runspace]) {
        for (lane, runspace) in self.lanes.iter().zip(runspaces) {
            lane.attach(runspace);
        }
        self.update(|s| {
            s.pid = runspaces.first().map(Runspace::pid);
            s.opened = Some(Instant::now());
        });
    }

    fn detach(&self) {
        self.lanes.iter().for_each(|lane| lane.detach());
        self.update(|s| s.pid = None);
    }

    /// Whether the slot's task has ended.
    pub(crate) fn stopped(&self) -> bool {
        self.lanes.iter().all(|lane| lock(&lane.stats).state == WorkerState::Stopped)
    }

    /// Whether the slot has a started, connected process right now.
    pub(crate) fn connected(&self) -> bool {
        lock(&self.stats).pid.is_some()
    }
}

/// What a runspace found out about its process while running a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Healthy,
    /// The process is gone.
    Dead,
    /// The credentials expired (the command said so): every runspace of the process connected with them.
    Expired,
    /// A health check failed.
    Unhealthy,
}

/// Why a process is taken out of service once nothing runs on it any more.
#[derive(Debug, Clone, Copy)]
enum Drain {
    Dead,
    /// Credentials expired or about to; a health check failed.
    Replace(Verdict),
    Recycle,
}

/// How a job left its runspace.
enum Outcome {
    /// Answered; `failed` says whether it failed.
    Finished { failed: bool, key: Option<String>, enqueued: Instant, queue_wait: std::time::Duration },
    /// To be run again, by any worker, first in line.
    Again(Job),
}

/// A job's runspace back from the job, with what happened.
struct Finished {
    lane: usize,
    runspace: Runspace,
    verdict: Verdict,
    outcome: Outcome,
}

type Running = FuturesUnordered<Pin<Box<dyn Future<Output = Finished> + Send>>>;

/// The process task: runs until the pool closes or the process is retired for being idle.
pub(crate) async fn run(shared: Arc<PoolShared>, process: Arc<ProcessSlot>, initial: Option<Vec<Runspace>>) {
    let id = lock(&process.stats).id;
    let span = tracing::debug_span!("pool_worker", worker = id);
    async move {
        let mut task = Task {
            lanes: initial.map(|runspaces| runspaces.into_iter().map(Some).collect()).unwrap_or_default(),
            idle_since: vec![Instant::now(); process.lanes.len()],
            running: FuturesUnordered::new(),
            drain: None,
            fresh: true,
            shared,
            process,
        };
        let retired = task.serve().await;
        task.process.set_state(WorkerState::Stopped);
        task.close_lanes().await;
        if !retired {
            task.shared.live.fetch_sub(1, Ordering::SeqCst);
        }
    }
    .instrument(span)
    .await
}

struct Task {
    shared: Arc<PoolShared>,
    process: Arc<ProcessSlot>,
    /// One entry per runspace while the process is open (empty while it is not): `None` while the
    /// runspace is lent to the job running on it.
    lanes: Vec<Option<Runspace>>,
    /// When each runspace last finished a command (for its health check).
    idle_since: Vec<Instant>,
    running: Running,
    drain: Option<Drain>,
    /// Opened and not yet given a job.
    fresh: bool,
}

impl Task {
    /// Serves jobs until the pool closes (false) or the process retires for being idle (true).
    async fn serve(&mut self) -> bool {
        let mut quiet_since = Instant::now();
        loop {
            if self.lanes.is_empty() {
                // Open (or replace) the process before taking work.
                match open_process(&self.shared, &self.process).await {
                    Ok(runspaces) => {
                        self.lanes = runspaces.into_iter().map(Some).collect();
                        self.fresh = true;
                    }
                    Err(_) => return false, // the pool closed, or this slot (or the pool) gave up
                }
                self.idle_since.fill(Instant::now());
                quiet_since = Instant::now();
            }
            // Register for a wake-up before looking, so that a job queued in between is not missed.
            let work = self.shared.work.clone();
            let woken = work.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // A process opened just now runs what it takes even when its credentials are already within
            // the refresh margin (they were read before the process started): otherwise a margin longer
            // than the start-up would replace processes for ever.
            if self.drain.is_none() && !self.fresh && self.expiring() {
                tracing::info!(pid = ?self.pid(), "credentials expire soon: replacing the worker with a freshly connected one");
                self.drain = Some(Drain::Replace(Verdict::Expired));
            }
            if let Some(why) = self.drain
                && self.running.is_empty()
            {
                self.take_out_of_service(why).await;
                continue;
            }
            let closed = self.shared.closed.load(Ordering::SeqCst);
            if !closed && self.drain.is_none() {
                self.start_jobs();
            }
            if closed && self.running.is_empty() && lock(&self.shared.queue).len() == 0 {
                return false;
            }
            if !self.running.is_empty() {
                quiet_since = Instant::now();
            }
            let free = if self.drain.is_none() { self.lanes.iter().filter(|l| l.is_some()).count() } else { 0 };
            self.shared.idle.fetch_add(free, Ordering::SeqCst);
            let idle_timeout = self.shared.config.idle_timeout;
            // Nothing wakes the task when a Retry-After that holds new commands back runs out.
            let quiet_until = self.shared.limiter.quiet_until();
            let retire = tokio::select! {
                () = tokio::time::sleep_until(quiet_until.unwrap_or_else(Instant::now)), if quiet_until.is_some() => false,
                Some(finished) = self.running.next(), if !self.running.is_empty() => {
                    self.finish(finished).await;
                    false
                }
                () = &mut woken => false,
                () = tokio::time::sleep_until(quiet_since + idle_timeout), if self.running.is_empty() => self.may_retire(),
            };
            self.shared.idle.fetch_sub(free, Ordering::SeqCst);
            if retire {
                return true;
            }
        }
    }

    /// Puts a job on every free runspace for which the limiter gives a permit.
    fn start_jobs(&mut self) {
        for lane in 0..self.lanes.len() {
            if self.lanes[lane].is_none() {
                continue;
            }
            // The job first: a permit taken for nothing and given back would wake every waiting task.
            let Some(mut job) = lock(&self.shared.queue).take() else { return };
            let Some(permit) = self.shared.limiter.try_acquire() else {
                lock(&self.shared.queue).give_back(job);
                return;
            };
            if let Some(started) = job.started.take() {
                let _ = started.send(());
            }
            job.queue_wait.get_or_insert_with(|| job.enqueued.elapsed());
            let runspace = self.lanes[lane].take().expect("a free lane has its runspace");
            self.fresh = false;
            let slot = self.process.lanes[lane].clone();
            slot.update(|s| s.state = WorkerState::Busy);
            let health_due = self.idle_since[lane].elapsed() >= self.shared.config.health_check_after;
            let shared = self.shared.clone();
            let span = tracing::debug_span!("pool_command", command = job.command.name(), runspace = lane);
            self.running.push(Box::pin(run_job(shared, slot, lane, runspace, job, permit, health_due).instrument(span)));
        }
    }

    /// Takes back a runspace from its job and answers for the job.
    async fn finish(&mut self, finished: Finished) {
        let Finished { lane, runspace, verdict, outcome } = finished;
        let slot = &self.process.lanes[lane];
        self.lanes[lane] = Some(runspace);
        self.idle_since[lane] = Instant::now();
        slot.update(|s| s.state = WorkerState::Idle);
        match outcome {
            Outcome::Finished { failed, key, enqueued, queue_wait } => {
                self.shared.timings.record(queue_wait, enqueued.elapsed());
                lock(&self.shared.queue).release(key.as_deref());
                slot.update(|s| {
                    s.counters.commands += 1;
                    s.counters.failures += u64::from(failed);
                    s.runspace_commands += 1;
                });
            }
            Outcome::Again(job) => give_back(&self.shared, job).await,
        }
        self.shared.work.notify_waiters();
        if verdict == Verdict::Dead {
            // Whatever else was planned, a dead process can only be forgotten.
            self.drain = Some(Drain::Dead);
            return;
        }
        if self.drain.is_some() {
            return;
        }
        self.drain = match verdict {
            Verdict::Healthy => self.recycle_due().then_some(Drain::Recycle),
            Verdict::Dead => Some(Drain::Dead),
            other => Some(Drain::Replace(other)),
        };
        if let Some(why) = self.drain {
            tracing::info!(?why, pid = ?self.pid(), "the worker goes out of service once its other runspaces are done");
        }
    }

    /// Whether the recycling policy says the process is due (count by runspace, age and memory by process).
    fn recycle_due(&self) -> bool {
        let policy = &self.shared.config.recycle;
        let process = self.process.snapshot();
        let by_count = policy.max_commands.is_some_and(|max| self.process.lanes.iter().any(|l| lock(&l.stats).runspace_commands >= max));
        let by_age = policy.max_age.zip(process.age()).is_some_and(|(max, age)| age >= max);
        let by_memory = policy.max_resident_bytes.zip(process.resident_bytes).is_some_and(|(max, rss)| rss >= max);
        if by_count || by_age || by_memory {
            tracing::info!(by_count, by_age, by_memory, resident = ?process.resident_bytes, "recycling the worker");
        }
        by_count || by_age || by_memory
    }

    /// Whether the credentials of a runspace of the process expire within the refresh margin.
    fn expiring(&self) -> bool {
        let margin = self.shared.config.refresh_margin;
        self.lanes.iter().flatten().filter_map(Runspace::expires_at).any(|expires| std::time::SystemTime::now() + margin >= expires)
    }

    fn pid(&self) -> Option<u32> {
        lock(&self.process.stats).pid
    }

    /// Closes or forgets the process now that nothing runs on it; the next turn opens a fresh one.
    async fn take_out_of_service(&mut self, why: Drain) {
        self.drain = None;
        let runspaces: Vec<Runspace> = self.lanes.drain(..).flatten().collect();
        self.process.detach();
        match why {
            Drain::Dead => {
                tracing::warn!(exit = %runspaces.first().and_then(Runspace::exit_status).map(|e| e.to_string()).unwrap_or_default(), "pool worker died");
                self.process.update(|s| s.counters.restarts += 1);
                drop(runspaces); // gone already; dropping them reaps what is left of the group
            }
            Drain::Recycle => {
                self.process.set_state(WorkerState::Recycling);
                self.process.update(|s| s.counters.recycles += 1);
                close_all(runspaces, "closing a recycled worker").await;
            }
            Drain::Replace(why) => {
                tracing::info!(?why, "replacing the worker with a freshly connected one");
                self.process.update(|s| s.counters.reconnects += 1);
                // Disconnected and closed in the background (the pool's close waits for that).
                let closing = tokio::spawn(close_all(runspaces, "closing a replaced worker"));
                let mut tasks = lock(&self.shared.tasks);
                tasks.retain(|task| !task.is_finished());
                tasks.push(closing);
            }
        }
    }

    /// Idle for the idle timeout: retire when the pool is above `min_workers`.
    fn may_retire(&self) -> bool {
        let min = self.shared.config.min_workers;
        let shrunk = self.shared.live.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |live| (live > min).then(|| live - 1));
        if shrunk.is_ok() {
            tracing::debug!("idle above min_workers: retiring");
        }
        shrunk.is_ok()
    }

    /// Waits for running jobs, then closes the process's runspaces.
    async fn close_lanes(&mut self) {
        while let Some(finished) = self.running.next().await {
            self.finish(finished).await;
        }
        let runspaces: Vec<Runspace> = self.lanes.drain(..).flatten().collect();
        if !runspaces.is_empty() {
            self.process.detach();
            close_all(runspaces, "closing a pool worker").await;
        }
    }
}

/// Closes every runspace of a process at once (each runs its disconnect command; the last one ends the
/// process).
async fn close_all(runspaces: Vec<Runspace>, what: &'static str) {
    for closed in futures_util::future::join_all(runspaces.into_iter().map(Runspace::close)).await {
        if let Err(error) = closed {
            tracing::warn!(%error, "{what}");
        }
    }
}

/// Opens a process with its runspaces, retrying with exponential backoff, at most `connect_attempts`
/// times in a row.
///
/// Fails with [`Error::PoolClosed`] once the pool closes, with [`Error::WorkersUnavailable`] once the
/// pool gave up, or with the last error when this slot gave up while other workers still work. The
/// pool gives up when a slot's attempts run out and no other worker is connected: waiting longer would
/// only hang every queued command on credentials that do not work.
async fn open_process(shared: &PoolShared, process: &ProcessSlot) -> Result<Vec<Runspace>> {
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
        process.set_state(WorkerState::Starting);
        let error = match shared.config.runspace.clone().open_many(process.lanes.len()).await {
            Ok(runspaces) => {
                process.attach(&runspaces);
                process.set_state(WorkerState::Idle);
                return Ok(runspaces);
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

/// Returns a job to the front of the queue for another worker, or fails it with the pool's error when
/// the pool gave up (or closed). Checked and queued under the queue's lock: the pool gives up by marking
/// itself broken and then draining the queue under that lock, so the job is never left behind.
async fn give_back(shared: &PoolShared, job: Job) {
    let refused = {
        let mut queue = lock(&shared.queue);
        let error = shared.unavailable().or_else(|| shared.closed.load(Ordering::SeqCst).then_some(Error::PoolClosed));
        match error {
            Some(error) => {
                queue.release(job.command.key_str());
                Some((job, error))
            }
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

/// Runs one job on one runspace: the health check first when the runspace was idle for long, then the
/// command with its retries.
async fn run_job(shared: Arc<PoolShared>, slot: Arc<Slot>, lane: usize, mut runspace: Runspace, mut job: Job, permit: Permit, health_due: bool) -> Finished {
    if health_due {
        let verdict = check_health(&shared, &mut runspace).await;
        if verdict != Verdict::Healthy {
            // Not begun: another worker runs it, as the first attempt still.
            return Finished { lane, runspace, verdict, outcome: Outcome::Again(job) };
        }
    }
    if let Some(on_start) = job.on_start.take() {
        on_start();
    }
    let (verdict, outcome) = match job.reply {
        Reply::Collect(_) => run_collect(&shared, &slot, &mut runspace, job, permit).await,
        Reply::Stream(_) => run_stream(&shared, &slot, &mut runspace, job, permit).await,
    };
    Finished { lane, runspace, verdict, outcome }
}

/// What the caller is owed when a job is answered.
fn finished(job: &Job, failed: bool) -> Outcome {
    Outcome::Finished {
        failed,
        key: job.command.key_str().map(str::to_owned),
        enqueued: job.enqueued,
        queue_wait: job.queue_wait.unwrap_or_default(),
    }
}

/// Whether a job whose runspace failed it with `error` runs again on another worker: when the process
/// died under it (a timeout that killed the process would only hang again), the command is idempotent
/// and attempts remain.
fn runs_again(shared: &PoolShared, job: &Job, error: &Error, dead: bool) -> bool {
    dead && job.command.is_idempotent() && !matches!(error, Error::Timeout { .. }) && job.attempt < shared.config.retry.attempts()
}

async fn run_collect(shared: &PoolShared, slot: &Slot, runspace: &mut Runspace, mut job: Job, mut permit: Permit) -> (Verdict, Outcome) {
    let Reply::Collect(caller) = &mut job.reply else { unreachable!("run_collect runs collected jobs") };
    let policy = &shared.config.retry;
    loop {
        shared.pace().await;
        let outcome = tokio::select! {
            outcome = runspace.invoke(&job.command) => outcome,
            // The caller went away: dropping the invocation stops the command in the worker.
            () = caller.closed() => return (Verdict::Healthy, finished(&job, true)),
        };
        let result = match outcome {
            Ok(result) => result,
            Err(error) => {
                let dead = runspace.exit_status().is_some();
                let verdict = if dead { Verdict::Dead } else { Verdict::Healthy };
                if runs_again(shared, &job, &error, dead) {
                    slot.update(|s| s.counters.retries += 1);
                    job.attempt += 1;
                    return (verdict, Outcome::Again(job));
                }
                let outcome = finished(&job, true);
                if let Reply::Collect(tx) = job.reply {
                    let _ = tx.send(Err(error));
                }
                return (verdict, outcome);
            }
        };
        let failure = shared.config.classifier.classify(&result);
        let throttled = match failure {
            Some(Failure::Throttled { retry_after }) => Some(retry_after),
            _ => None,
        };
        shared.limiter.feedback(&permit, throttled);
        match failure {
            Some(failure @ (Failure::Transient | Failure::Throttled { .. })) if policy.retries_transient() && job.attempt < policy.attempts() => {
                let retry_after = match failure {
                    Failure::Throttled { retry_after } => retry_after,
                    _ => None,
                };
                let delay = policy.delay(job.attempt, retry_after);
                tracing::debug!(attempt = job.attempt, ?delay, "throttled: retrying");
                let throttled = u64::from(matches!(failure, Failure::Throttled { .. }));
                slot.update(|s| {
                    s.counters.retries += 1;
                    s.counters.throttled += throttled;
                });
                // Waiting is not running: the permit goes back to the pool meanwhile.
                drop(permit);
                permit = tokio::select! {
                    permit = async {
                        tokio::time::sleep(delay).await;
                        shared.limiter.acquire().await
                    } => permit,
                    () = caller.closed() => return (Verdict::Healthy, finished(&job, true)),
                };
                job.attempt += 1;
            }
            Some(Failure::ExpiredToken) if job.expired_at.is_none_or(|at| slot.opened_before(at)) => {
                // The credentials expired: retry once, not counted as an attempt, on a worker connected
                // with credentials read anew after this (a worker as old as this one that takes it first
                // meets the same expiry and passes it on).
                job.expired_at.get_or_insert_with(Instant::now);
                return (Verdict::Expired, Outcome::Again(job));
            }
            _ => {
                let outcome = finished(&job, !result.succeeded());
                let attempts = job.attempt;
                if let Reply::Collect(tx) = job.reply {
                    let _ = tx.send(Ok(InvocationResult { attempts, ..result }));
                }
                return (Verdict::Healthy, outcome);
            }
        }
    }
}

/// Streams one job's items to its caller.
async fn run_stream(shared: &PoolShared, slot: &Slot, runspace: &mut Runspace, mut job: Job, permit: Permit) -> (Verdict, Outcome) {
    let Reply::Stream(caller) = &job.reply else { unreachable!("run_stream runs streamed jobs") };
    shared.pace().await;
    let mut sent_any = false;
    let mut errors_seen = false;
    let outcome: Result<crate::records::Completion> = async {
        let mut stream = runspace.invoke_stream(&job.command)?;
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
    drop(permit);
    match outcome {
        Ok(completion) => {
            let _ = caller.send(Ok(Streamed::Done(completion))).await;
            (Verdict::Healthy, finished(&job, errors_seen || !completion.ended_well()))
        }
        Err(error) => {
            let dead = runspace.exit_status().is_some();
            let verdict = if dead { Verdict::Dead } else { Verdict::Healthy };
            // Items already delivered cannot be taken back: only a stream that produced nothing runs again.
            if !sent_any && runs_again(shared, &job, &error, dead) {
                slot.update(|s| s.counters.retries += 1);
                job.attempt += 1;
                return (verdict, Outcome::Again(job));
            }
            let _ = caller.send(Err(error)).await;
            (verdict, finished(&job, true))
        }
    }
}

/// Runs the health check on a runspace that was idle for long.
async fn check_health(shared: &PoolShared, runspace: &mut Runspace) -> Verdict {
    match runspace.invoke(&shared.config.health_check).await {
        Ok(result) if shared.config.classifier.healthy(&result) => Verdict::Healthy,
        Ok(_) => Verdict::Unhealthy,
        Err(_) if runspace.exit_status().is_some() => Verdict::Dead,
        Err(_) => Verdict::Unhealthy,
    }
}
