//! A queue host (`psbridge serve --queue URL`): for each profile it serves, as many pull loops
//! ("slots") as the profile's pool has workers, each taking one item at a time from the profile's work
//! stream, running it on the pool, recording its result and only then acknowledging it.
//!
//! * A slot looks for work only where there is some (the stream's per-subject counts), asks for one
//!   message at a time and only once the pool is open: a host never holds more items than its pool can
//!   run, and takes nothing while its workers cannot connect (the pool does not open, or gave up).
//! * Keyed partitions have one message in flight over all hosts (`max_ack_pending = 1`); a slot that
//!   finished one goes on with the same partition when more is waiting there, so a key's chain
//!   continues without a round of polling.
//! * While an item runs, in-progress acknowledgements every third of the ack wait keep JetStream from
//!   giving it to another host; a host that dies (or stops) has it redelivered after the ack wait.
//! * The result is created in the results bucket before the acknowledgement: the first result
//!   recorded wins, a later run of the same item (its host came back after the redelivery) is counted
//!   in the duplicates bucket instead.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::{AckKind, Acker};
use futures_util::StreamExt;
use psbridge::{InvocationResult, PipelineState};
use tokio_util::sync::CancellationToken;

use super::QueueError;
use super::item::{BatchRecord, BatchState, Duplicate, StoredResult, WorkItem};
use super::layout::{Partition, Queue, profile_subjects, result_key, work_subject};
use crate::batch::ResultRecord;
use crate::batch::record::bridge_error;
use crate::serve::pools::{Pools, PoolsError};

/// How long one pull waits for a message that is not deliverable yet (its partition's previous item
/// is running on another host): what picking such a partition costs a free worker.
const FETCH_WAIT: Duration = Duration::from_millis(25);
/// How long the stream's per-partition counts are trusted.
const COUNTS_TTL: Duration = Duration::from_millis(100);
/// How long a slot with nothing to do waits before looking again.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// After a failed request to the queue (a restarting server), before trying again.
const RETRY_WAIT: Duration = Duration::from_millis(500);
/// The first and the longest wait before opening a pool again after it failed.
const OPEN_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// How long a message given back is held before it is delivered again.
const NAK_DELAY: Duration = Duration::from_secs(1);

/// How a host takes part in the queue.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// How long JetStream waits for an acknowledgement (or an in-progress one) before it delivers a
    /// message again: the time to notice a host that died. The consumers keep the value of the host
    /// that created them.
    pub ack_wait: Duration,
    /// The host's name in recorded results (`hostname/pid`).
    pub name: String,
}

/// The host's name: the machine's and the process id.
pub fn host_name() -> String {
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".to_owned());
    format!("{machine}/{}", std::process::id())
}

/// Pulls and runs the items of `profiles` (each with its pool's most workers) until `shutdown` is
/// cancelled, then lets the items under way finish (as the pools allow: they are closed after the
/// shutdown grace) and records them. A queue that cannot be reached yet is waited for.
pub async fn run(client: async_nats::Client, pools: Pools, profiles: Vec<(String, usize)>, options: HostOptions, shutdown: CancellationToken) {
    let Some(queue) = until_ready(&shutdown, || Queue::open(client.clone())).await else { return };
    let mut slots = tokio::task::JoinSet::new();
    for (profile, workers) in profiles {
        let mut consumers = HashMap::new();
        for partition in Partition::all() {
            let Some(consumer) = until_ready(&shutdown, || queue.consumer(&profile, partition, options.ack_wait)).await else { return };
            consumers.insert(partition, consumer);
        }
        let served = Arc::new(Served {
            profile,
            queue: queue.clone(),
            pools: pools.clone(),
            consumers,
            options: options.clone(),
            shutdown: shutdown.clone(),
            board: Mutex::new(Board::new()),
        });
        tracing::info!(profile = %served.profile, workers, "pulling the profile's queued items");
        for _ in 0..workers {
            slots.spawn(served.clone().slot());
        }
    }
    eprintln!("psbridge serve: pulling queued items");
    while slots.join_next().await.is_some() {}
}

/// What `attempt` makes, tried again until it works; `None` when the host stops first.
async fn until_ready<T, F: Future<Output = Result<T, QueueError>>>(shutdown: &CancellationToken, mut attempt: impl FnMut() -> F) -> Option<T> {
    let mut reported = false;
    loop {
        match attempt().await {
            Ok(done) => return Some(done),
            Err(error) => {
                if !reported {
                    eprintln!("psbridge serve: {error}; trying again");
                    reported = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(RETRY_WAIT * 2) => {}
                    () = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// One served profile's share of the queue.
struct Served {
    profile: String,
    queue: Queue,
    pools: Pools,
    consumers: HashMap<Partition, PullConsumer>,
    options: HostOptions,
    shutdown: CancellationToken,
    board: Mutex<Board>,
}

/// What this host knows of a profile's partitions.
struct Board {
    /// Messages per partition (in flight included), when last counted.
    counts: HashMap<Partition, u64>,
    counted: Option<Instant>,
    /// Keyed partitions a slot of this host is pulling from or running an item of.
    claimed: HashSet<Partition>,
    /// Picks among the partitions with work at random, so that hosts do not all try the same one first
    /// (xorshift; seeded by the process and the time).
    random: u64,
}

impl Board {
    fn new() -> Board {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        Board { counts: HashMap::new(), counted: None, claimed: HashSet::new(), random: (nanos ^ u64::from(std::process::id()) << 32) | 1 }
    }

    fn next_random(&mut self) -> u64 {
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        self.random
    }
}

/// What became of a message.
enum Outcome {
    /// Done with (run and recorded, or skipped); `more` when its partition had more waiting.
    Done { more: bool },
    /// Given back without running, because the pool cannot run it.
    PoolBroken,
    /// Given back without running, or stopped, because the host is stopping.
    Stopping,
}

impl Served {
    /// One pull loop: while the host runs, find a partition with work, open the pool, take one message,
    /// run it.
    async fn slot(self: Arc<Self>) {
        let mut backoff = OPEN_BACKOFF.0;
        let mut next: Option<Partition> = None;
        while !self.shutdown.is_cancelled() {
            let picked = match next.take() {
                Some(partition) if self.claim(partition) => Some(partition),
                // A queue that does not answer does not hold up a host that stops.
                _ => tokio::select! {
                    picked = self.pick() => picked,
                    () = self.shutdown.cancelled() => return,
                },
            };
            let Some(partition) = picked else {
                self.pause(IDLE_WAIT).await;
                continue;
            };
            // Only with an open pool: while its workers cannot connect, nothing is taken.
            let lease = match self.pools.get(&self.profile).await {
                Ok(lease) => lease,
                Err(PoolsError::Closing | PoolsError::Unknown { .. }) => {
                    self.release(partition);
                    return;
                }
                Err(error) => {
                    self.release(partition);
                    tracing::warn!(profile = %self.profile, %error, "taking no queued items until the pool opens");
                    self.pause(backoff).await;
                    backoff = (backoff * 2).min(OPEN_BACKOFF.1);
                    continue;
                }
            };
            backoff = OPEN_BACKOFF.0;
            let fetched = tokio::select! {
                fetched = self.fetch(partition) => fetched,
                () = self.shutdown.cancelled() => {
                    // A message delivered meanwhile comes back after the ack wait.
                    self.release(partition);
                    return;
                }
            };
            let message = match fetched {
                Ok(Some(message)) => message,
                Ok(None) => {
                    self.empty(partition);
                    continue;
                }
                Err(error) => {
                    self.release(partition);
                    tracing::warn!(profile = %self.profile, %error, "cannot pull from the queue; trying again");
                    self.pause(RETRY_WAIT).await;
                    continue;
                }
            };
            let outcome = self.process(message, &lease).await;
            self.release(partition);
            match outcome {
                Outcome::Done { more } => {
                    if more && partition != Partition::Unkeyed {
                        next = Some(partition);
                    }
                }
                Outcome::PoolBroken => {
                    tracing::warn!(profile = %self.profile, "the pool gave up on its workers; opening a fresh one");
                    lease.discard().await;
                    self.pause(backoff).await;
                }
                Outcome::Stopping => return,
            }
        }
    }

    /// Sleeps, or less when the host stops.
    async fn pause(&self, how_long: Duration) {
        tokio::select! {
            () = tokio::time::sleep(how_long) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// A partition with messages that no slot of this host holds, claimed for this slot; the counts are
    /// read again when stale.
    async fn pick(&self) -> Option<Partition> {
        let stale = lock(&self.board).counted.is_none_or(|at| at.elapsed() >= COUNTS_TTL);
        if stale {
            match self.count().await {
                Ok(counts) => {
                    let mut board = lock(&self.board);
                    board.counts = counts;
                    board.counted = Some(Instant::now());
                }
                Err(error) => tracing::warn!(profile = %self.profile, %error, "cannot count the queued items"),
            }
        }
        let mut board = lock(&self.board);
        let candidates: Vec<Partition> = Partition::all()
            .filter(|p| *p == Partition::Unkeyed || !board.claimed.contains(p))
            .filter(|p| board.counts.get(p).is_some_and(|n| *n > 0))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let partition = candidates[(board.next_random() % candidates.len() as u64) as usize];
        if partition != Partition::Unkeyed {
            board.claimed.insert(partition);
        }
        Some(partition)
    }

    /// Claims `partition` for a slot; false when another slot of this host has it.
    fn claim(&self, partition: Partition) -> bool {
        partition == Partition::Unkeyed || lock(&self.board).claimed.insert(partition)
    }

    fn release(&self, partition: Partition) {
        lock(&self.board).claimed.remove(&partition);
    }

    /// Nothing came from `partition`: it is passed over until the next count.
    fn empty(&self, partition: Partition) {
        let mut board = lock(&self.board);
        board.claimed.remove(&partition);
        board.counts.insert(partition, 0);
    }

    /// Messages per partition of the profile (those in flight included).
    async fn count(&self) -> Result<HashMap<Partition, u64>, QueueError> {
        let subjects: HashMap<String, Partition> = Partition::all().map(|p| (work_subject(&self.profile, p), p)).collect();
        let mut counts = HashMap::new();
        let mut info = self.queue.work.info_with_subjects(profile_subjects(&self.profile)).await.map_err(QueueError::jetstream("count the queued items"))?;
        while let Some(subject) = info.next().await {
            let (subject, count) = subject.map_err(QueueError::jetstream("count the queued items"))?;
            if let Some(partition) = subjects.get(&subject) {
                counts.insert(*partition, count as u64);
            }
        }
        Ok(counts)
    }

    /// One message of `partition`, if one is deliverable within [`FETCH_WAIT`].
    async fn fetch(&self, partition: Partition) -> Result<Option<async_nats::jetstream::Message>, QueueError> {
        let consumer = &self.consumers[&partition];
        let mut batch = consumer.fetch().max_messages(1).expires(FETCH_WAIT).messages().await.map_err(QueueError::jetstream("pull an item"))?;
        match batch.next().await {
            Some(Ok(message)) => Ok(Some(message)),
            Some(Err(source)) => Err(QueueError::JetStream { what: "pull an item", source }),
            None => Ok(None),
        }
    }

    /// Runs one message's item and records its result, then acknowledges it.
    async fn process(&self, message: async_nats::jetstream::Message, pool: &psbridge::RunspacePool) -> Outcome {
        let (delivered, more) = match message.info() {
            Ok(info) => (u64::try_from(info.delivered).unwrap_or(1).max(1), info.pending > 0),
            Err(_) => (1, false),
        };
        let (message, acker) = message.split();
        let acker = Arc::new(acker);
        let work: WorkItem = match serde_json::from_slice(&message.payload) {
            Ok(work) => work,
            Err(error) => {
                tracing::error!(subject = %message.subject, %error, "a message in the work stream is not a psbridge item; dropping it");
                ack(&acker, AckKind::Term).await;
                return Outcome::Done { more };
            }
        };
        let key = result_key(&work.batch, &work.item);
        match self.still_wanted(&work, &key).await {
            Ok(true) => {}
            Ok(false) => {
                ack(&acker, AckKind::Ack).await;
                return Outcome::Done { more };
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the batch of a queued item; giving it back");
                ack(&acker, AckKind::Nak(Some(NAK_DELAY))).await;
                return Outcome::Done { more: false };
            }
        }
        let progress = tokio::spawn(in_progress(acker.clone(), self.options.ack_wait));
        let began = Instant::now();
        let mut record = work.record();
        let command = self.pools.served(&self.profile).ok().map(|served| served.policy.check_command(&work.command));
        let outcome = match (command, work.command()) {
            (Some(Err(refusal)), _) => Err(("psbridge.refused", format!("this host's rules for profile {} refuse it: {}", self.profile, refusal.0))),
            (_, Err(error)) => Err(("psbridge.invalid_input", error.to_string())),
            (_, Ok(command)) => Ok(pool.invoke(command).await),
        };
        match outcome {
            Err((id, reason)) => {
                // Not run: failed, with the reason.
                record.status = crate::batch::Status::Failed;
                record.errors = vec![bridge_error(id, reason)];
            }
            Ok(Err(psbridge::Error::WorkersUnavailable { .. })) => {
                progress.abort();
                ack(&acker, AckKind::Nak(Some(NAK_DELAY))).await;
                return Outcome::PoolBroken;
            }
            Ok(Err(psbridge::Error::PoolClosed)) => {
                progress.abort();
                ack(&acker, AckKind::Nak(None)).await;
                return Outcome::Stopping;
            }
            Ok(outcome) if self.shutdown.is_cancelled() && stopped(&outcome) => {
                // Stopped by this host's shutdown, not by its own doing: another host runs it again (marked
                // resumed_in_flight, since it had begun).
                progress.abort();
                ack(&acker, AckKind::Nak(None)).await;
                return Outcome::Stopping;
            }
            Ok(outcome) => record.ran(outcome, u32::try_from(delivered - 1).unwrap_or(u32::MAX), began.elapsed()),
        }
        self.record(&key, delivered, record).await;
        progress.abort();
        ack(&acker, AckKind::Ack).await;
        Outcome::Done { more }
    }

    /// Whether the item should run: its batch is open, in the generation that published it, and the item
    /// has no result yet (a copy published again after the first finished). A batch that cannot be
    /// found is an error, not a reason to drop the item: a server restoring its streams after a restart
    /// may not show it yet (batch records are never deleted).
    async fn still_wanted(&self, work: &WorkItem, key: &str) -> Result<bool, QueueError> {
        let batch = self.queue.batches.get(&work.batch).await.map_err(QueueError::jetstream("read a batch"))?;
        let Some(batch) = batch else {
            return Err(QueueError::UnknownBatch { batch: work.batch.clone() });
        };
        let open = serde_json::from_slice::<BatchRecord>(&batch)
            .is_ok_and(|record| record.state == BatchState::Open && record.generation == work.generation);
        if !open {
            return Ok(false);
        }
        let recorded = self.queue.results.get(key).await.map_err(QueueError::jetstream("read a result"))?;
        Ok(recorded.is_none())
    }

    /// Creates the item's result; when another run recorded it first, counts this run as a duplicate.
    /// Tries again while the queue cannot be reached (the message's in-progress acknowledgements go on
    /// meanwhile).
    async fn record(&self, key: &str, delivered: u64, result: ResultRecord) {
        let status = result.status;
        let stored = serde_json::to_vec(&StoredResult { host: self.options.name.clone(), delivered, result }).expect("plain data serializes");
        loop {
            match self.queue.results.create(key, stored.clone().into()).await {
                Ok(_) => return,
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => break,
                Err(error) => {
                    tracing::warn!(%error, "cannot record a result; trying again");
                    tokio::time::sleep(RETRY_WAIT).await;
                }
            }
        }
        tracing::info!(key, delivered, "another run recorded this item first; counting this run as a duplicate");
        let duplicate = serde_json::to_vec(&Duplicate { host: self.options.name.clone(), delivered, status }).expect("plain data serializes");
        // Unique per run: the delivery, the process and the time.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let duplicate_key = format!("{key}.{delivered}-{}-{nanos}", std::process::id());
        loop {
            match self.queue.duplicates.create(&duplicate_key, duplicate.clone().into()).await {
                Ok(_) => return,
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => return,
                Err(error) => {
                    tracing::warn!(%error, "cannot count a duplicate run; trying again");
                    tokio::time::sleep(RETRY_WAIT).await;
                }
            }
        }
    }
}

/// Whether a command ended because it was stopped (cancelled) rather than by itself.
fn stopped(outcome: &Result<InvocationResult, psbridge::Error>) -> bool {
    match outcome {
        Ok(result) => result.state == PipelineState::Stopped,
        Err(error) => matches!(error, psbridge::Error::Cancelled { .. }),
    }
}

/// Tells JetStream, every third of the ack wait, that the item is still being worked on.
async fn in_progress(acker: Arc<Acker>, ack_wait: Duration) {
    let mut ticker = tokio::time::interval(ack_wait / 3);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Err(error) = acker.ack_with(AckKind::Progress).await {
            tracing::debug!(%error, "cannot send an in-progress acknowledgement");
        }
    }
}

/// Acknowledges (or gives back) a message, a few times if the queue does not take it: one that is lost
/// is delivered again after the ack wait, and then skipped, its result being recorded.
async fn ack(acker: &Acker, kind: AckKind) {
    for _ in 0..3 {
        match acker.ack_with(kind).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, "cannot acknowledge a queued item; trying again");
                tokio::time::sleep(RETRY_WAIT).await;
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
