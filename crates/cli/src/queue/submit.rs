//! `psbridge batch --queue URL`: publishes a batch's items for the hosts that serve its profile and
//! writes their results as they are recorded, with the progress, records, summary and exit statuses of
//! a local batch.
//!
//! Run again with the same arguments, it re-attaches: the results recorded meanwhile are written with
//! `previous_run: true` and only items without a result are published again (the stream drops a copy
//! published within its duplicate window; a later copy is skipped by the host, which finds the result).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use super::QueueError;
use super::connect::{Patience, connect};
use super::item::{BatchRecord, BatchState, Duplicate, StoredResult, WorkItem, secret_tag};
use super::layout::{Partition, Queue, item_token, result_key, valid_batch_id, work_subject};
use super::results::BatchWatch;
use crate::batch::input::{Entry, Item};
use crate::batch::progress::Tally;
use crate::batch::record::bridge_error;
use crate::batch::{BatchArgs, Input, Progress, ResultRecord, ResultSink, Status, summary, usage};
use crate::config::{Config, SIMULATED};
use crate::exit::{CliError, EXIT_COMMAND_ERRORS, EXIT_OK, EXIT_OUTPUT, Interrupt};
use crate::secret::SecretReader;
use crate::signals::Signals;
use crate::Globals;

/// Publishes awaiting their acknowledgement at once.
const PUBLISH_WINDOW: usize = 256;
/// How often a waiting submitter updates its progress and looks whether the batch was cancelled.
const CANCEL_CHECK: Duration = Duration::from_secs(1);
/// Between attempts to publish when the server does not answer.
const PUBLISH_RETRY: Duration = Duration::from_millis(500);

/// Runs `batch --queue`; returns the exit status.
pub async fn run(args: &BatchArgs, globals: &Globals) -> u8 {
    let submitter = match Submitter::prepare(args, globals).await {
        Ok(submitter) => submitter,
        Err(code) => return code,
    };
    match submitter.execute(args).await {
        Ok(code) => code,
        Err(QueueError::Output) => EXIT_OUTPUT, // already reported
        Err(error) => {
            eprintln!("psbridge: {error}");
            error.exit_code()
        }
    }
}

/// A batch ready to be published: its input, its id, the queue.
struct Submitter {
    input: Input,
    input_name: String,
    profile: String,
    batch: String,
    queue: Queue,
    /// `None` with --detach (no results are written).
    sink: Option<ResultSink>,
    timeout: Option<Duration>,
    depth: Option<u32>,
    resume: bool,
}

impl Submitter {
    async fn prepare(args: &BatchArgs, globals: &Globals) -> Result<Submitter, u8> {
        let config = Config::load(globals.config.as_deref()).map_err(usage)?;
        let asked = globals.profile_name().map_err(usage)?;
        // The hosts hold the profile; here it is only a name (it need not be in this configuration).
        let Some(profile) = config.chosen(asked).map(str::to_owned) else {
            return Err(usage(format_args!(
                "--queue needs the profile whose hosts run the batch: --profile NAME (or --simulated for {SIMULATED})"
            )));
        };
        if let Some(id) = &args.batch_id
            && !valid_batch_id(id)
        {
            return Err(usage(format_args!("--batch-id {id:?}: use 1 to 64 letters, digits, - and _")));
        }
        let options = args.options();
        options.check_format(&args.input).map_err(usage)?;
        let input = options.open_input(&args.input).map_err(usage)?;
        let batch = match &args.batch_id {
            Some(id) => id.clone(),
            None => crate::batch::remote::default_id(&profile, &args.input, args.output.as_deref(), input.sha256.as_bytes()),
        };
        let sink = if args.detach { None } else { Some(ResultSink::open(args.output.as_deref()).map_err(usage)?) };
        let stdin_taken = args.input == Path::new("-");
        let mut secrets = SecretReader::with_stdin_taken(stdin_taken.then(|| "the batch input".to_owned()));
        let url = args.queue.as_deref().expect("checked by the caller");
        let queue = async {
            let client = connect(url, &config, &mut secrets, "psbridge batch", Patience::FailFast).await?;
            Queue::open(client).await
        };
        let queue = queue.await.map_err(|error| {
            eprintln!("psbridge: {error}");
            error.exit_code()
        })?;
        Ok(Submitter {
            input,
            input_name: args.input.display().to_string(),
            profile,
            batch,
            queue,
            sink,
            timeout: options.timeout_secs.and_then(crate::positive_duration),
            depth: options.depth,
            resume: options.resume,
        })
    }

    async fn execute(mut self, args: &BatchArgs) -> Result<u8, QueueError> {
        let mut progress = Progress::new(self.input.total, args.quiet, args.progress_interval);
        let mut signals = match Signals::new() {
            Ok(signals) => Some(signals),
            Err(error) => {
                progress.note(&format!("psbridge: cannot listen for Ctrl-C and SIGTERM: {error}"));
                None
            }
        };
        let (record, notes) = self.claim().await?;
        for note in notes {
            progress.note(&note);
        }
        let prefix = format!("{}.", self.batch);
        let (mut results, recorded) = BatchWatch::open::<StoredResult>(&self.queue.results, prefix.clone(), format!("{}.*", self.batch)).await?;
        let (mut duplicates, earlier_duplicates) = BatchWatch::open::<Duplicate>(&self.queue.duplicates, prefix, format!("{}.>", self.batch)).await?;
        let mut tally = Tally { duplicates: earlier_duplicates.len(), ..Tally::default() };
        let recorded: HashMap<String, StoredResult> = recorded.into_iter().collect();
        if !recorded.is_empty() {
            progress.note(&format!("psbridge batch: re-attaching to batch {}: {} items finished earlier", self.batch, recorded.len()));
        }

        // The input, item by item: what needs no run is written now, the rest is published (unless an
        // earlier run published all of it) and awaited. The rate counts from here: the hosts may begin
        // as soon as the first item is out.
        progress.begin(&tally);
        let mut publisher = (record.items.is_none()).then(|| Publisher::new(self.queue.jetstream.clone()));
        let mut waiting: HashMap<String, ResultRecord> = HashMap::new();
        let mut done: HashSet<String> = HashSet::new();
        let mut interrupted = None;
        loop {
            let entry = match self.input.entries.next_entry() {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(error) => {
                    progress.note(&format!("psbridge: {error}; the items after it are not queued"));
                    break;
                }
            };
            let item = match entry {
                Entry::Invalid(invalid) => {
                    let mut record = ResultRecord::new(invalid.line, invalid.input, Status::Invalid);
                    record.command = invalid.command;
                    record.errors = vec![bridge_error("psbridge.invalid_input", invalid.message)];
                    self.emit_invalid(record, &mut tally, &progress)?;
                    continue;
                }
                Entry::Item(item) => item,
            };
            if let Some(kind) = secret_tag(&item.parameters) {
                let mut record = pending_record(&item);
                record.status = Status::Invalid;
                record.errors = vec![bridge_error(
                    "psbridge.invalid_input",
                    format!(
                        "line {}: a {kind} parameter is not sent through the queue (the stream would keep it on the NATS server's disk); \
                         run this item in a local batch",
                        item.line
                    ),
                )];
                self.emit_invalid(record, &mut tally, &progress)?;
                continue;
            }
            let token = item_token(&item.identity);
            if let Some(earlier) = recorded.get(&token) {
                let mut record = earlier.result.clone();
                record.previous_run = true;
                record.line = item.line; // the line may have moved since (a changed input, --resume)
                if record.status == Status::Succeeded { tally.skipped += 1 } else { tally.failed += 1 }
                self.emit(&record, &progress)?;
                done.insert(token);
                continue;
            }
            if let Some(publishing) = &mut publisher {
                let message = WorkItem::new(&self.batch, record.generation, &item, self.timeout, self.depth);
                tokio::select! {
                    () = publishing.publish(&message, &self.profile) => {}
                    signal = recv(&mut signals) => {
                        // The rest is not published; a re-run publishes what is missing.
                        interrupted = Some(signal);
                        publisher = None;
                    }
                }
            }
            waiting.insert(token, pending_record(&item));
        }
        if let Some(mut publishing) = publisher {
            tokio::select! {
                () = publishing.finish() => self.published(waiting.len() + done.len()).await?,
                signal = recv(&mut signals) => interrupted = Some(signal),
            }
        }
        if args.detach && interrupted.is_none() {
            println!("{}", self.batch);
            if !args.quiet {
                eprintln!(
                    "psbridge batch: batch {} queued ({} items to run, {} finished earlier); follow it with `psbridge queue status --queue {} {}`",
                    self.batch,
                    waiting.len(),
                    done.len(),
                    args.queue.as_deref().unwrap_or_default(),
                    self.batch
                );
            }
            return Ok(EXIT_OK);
        }

        let mut ticker = tokio::time::interval(CANCEL_CHECK);
        let mut cancelled = false;
        while !waiting.is_empty() && interrupted.is_none() && !cancelled {
            tokio::select! {
                (token, stored) = results.next::<StoredResult>() => {
                    let Some(pending) = waiting.remove(&token) else {
                        // A result of an item written already would break the first-result-wins rule; others are of
                        // items not in this input (an earlier input of a resumed batch).
                        if done.contains(&token) {
                            progress.note(&format!("psbridge: warning: the queue holds a second result for item {token} of batch {}", self.batch));
                        }
                        continue;
                    };
                    let mut record = stored.result;
                    record.line = pending.line;
                    tally.ran += 1;
                    if record.status == Status::Succeeded { tally.succeeded += 1 } else { tally.failed += 1 }
                    if record.attempts > 1 {
                        tally.retried += 1;
                    }
                    self.emit(&record, &progress)?;
                    done.insert(token);
                    progress.update(&tally);
                }
                _ = duplicates.next::<Duplicate>() => tally.duplicates += 1,
                signal = recv(&mut signals) => interrupted = Some(signal),
                _ = ticker.tick() => {
                    progress.update(&tally);
                    if self.cancelled().await {
                        progress.note(&format!("psbridge batch: batch {} was cancelled; the items that had not begun do not run", self.batch));
                        cancelled = true;
                    }
                }
            }
        }
        // Whatever did not finish is still accounted for, in input order.
        let reason = if cancelled {
            "the batch was cancelled (psbridge queue cancel) before a host began the item"
        } else {
            "not finished when psbridge stopped waiting; the hosts go on with what is queued: run the same command again to re-attach"
        };
        let left: BTreeMap<usize, ResultRecord> = waiting.into_values().map(|r| (r.line, r)).collect();
        for (_, mut record) in left {
            tally.not_run += 1;
            record.errors = vec![bridge_error("psbridge.not_run", reason.to_owned())];
            self.emit(&record, &progress)?;
        }
        progress.finish();
        if let Some(sink) = &mut self.sink
            && let Err(error) = sink.finish()
        {
            eprintln!("psbridge: cannot write the results: {error}");
            return Ok(EXIT_OUTPUT);
        }
        if !args.quiet {
            eprintln!("{}", summary(&tally, &progress));
        }
        Ok(match interrupted {
            Some(signal) => {
                if !args.quiet {
                    eprintln!("psbridge batch: stopped waiting for batch {}; run the same command again to re-attach", self.batch);
                }
                CliError::Interrupted(signal).exit_code()
            }
            None if cancelled || tally.failed > 0 => EXIT_COMMAND_ERRORS,
            None => EXIT_OK,
        })
    }

    /// Reads (or creates) the batch's record and makes it this submission's: an input that changed is
    /// refused unless --resume, a cancelled batch is opened again with a new generation. Returns the
    /// record and notes to show.
    async fn claim(&self) -> Result<(BatchRecord, Vec<String>), QueueError> {
        let batches = &self.queue.batches;
        loop {
            let mut notes = Vec::new();
            let entry = batches.entry(&self.batch).await.map_err(QueueError::jetstream("read the batch"))?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                let record = BatchRecord {
                    profile: self.profile.clone(),
                    input: self.input_name.clone(),
                    input_sha256: self.input.sha256.clone(),
                    generation: 1,
                    state: BatchState::Open,
                    items: None,
                };
                match batches.create(&self.batch, encode(&record)).await {
                    Ok(_) => return Ok((record, notes)),
                    Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => continue, // another submitter: read it
                    Err(error) => return Err(QueueError::jetstream("create the batch")(error)),
                }
            };
            let mut record: BatchRecord = serde_json::from_slice(&entry.value)
                .map_err(|e| QueueError::Refused(format!("batch {} in the queue is not one psbridge wrote ({e}); give another --batch-id", self.batch)))?;
            if record.profile != self.profile {
                return Err(QueueError::Refused(format!(
                    "batch {} belongs to profile {}, not {}; give another --batch-id",
                    self.batch, record.profile, self.profile
                )));
            }
            if record.input_sha256 != self.input.sha256 {
                if !self.resume {
                    return Err(QueueError::Refused(format!(
                        "batch {} was submitted for {}, and {} {}. Give --resume to go on with this input (items are matched by their \
                         content; those that finished are skipped), or another --batch-id for a new batch",
                        self.batch,
                        record.input,
                        self.input_name,
                        if record.input == self.input_name { "has changed since" } else { "is not that file, or has other content" },
                    )));
                }
                notes.push(format!("psbridge: note: resuming with a changed input (batch {} was submitted for {})", self.batch, record.input));
                (record.input, record.input_sha256, record.items) = (self.input_name.clone(), self.input.sha256.clone(), None);
            }
            if record.state == BatchState::Cancelled {
                notes.push(format!("psbridge batch: batch {} was cancelled; queuing its unfinished items again", self.batch));
                (record.state, record.generation, record.items) = (BatchState::Open, record.generation + 1, None);
            }
            match batches.update(&self.batch, encode(&record), entry.revision).await {
                Ok(_) => return Ok((record, notes)),
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(error) => return Err(QueueError::jetstream("update the batch")(error)),
            }
        }
    }

    /// Records that every item of the batch is published (`items` of them, finished ones included).
    async fn published(&self, items: usize) -> Result<(), QueueError> {
        let batches = &self.queue.batches;
        let mut missing = 0;
        loop {
            let entry = batches.entry(&self.batch).await.map_err(QueueError::jetstream("read the batch"))?;
            let Some(entry) = entry else {
                // Made by this run: a server still restoring its streams may not show it yet.
                missing += 1;
                if missing > 20 {
                    return Err(QueueError::UnknownBatch { batch: self.batch.clone() });
                }
                tokio::time::sleep(PUBLISH_RETRY).await;
                continue;
            };
            let mut record: BatchRecord = serde_json::from_slice(&entry.value).map_err(QueueError::jetstream("read the batch"))?;
            if record.state == BatchState::Cancelled {
                return Ok(());
            }
            record.items = Some(items);
            match batches.update(&self.batch, encode(&record), entry.revision).await {
                Ok(_) => return Ok(()),
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(error) => return Err(QueueError::jetstream("update the batch")(error)),
            }
        }
    }

    /// Whether `psbridge queue cancel` cancelled the batch (a record that cannot be read says no).
    async fn cancelled(&self) -> bool {
        let record = self.queue.batches.get(&self.batch).await.ok().flatten();
        record.and_then(|bytes| serde_json::from_slice::<BatchRecord>(&bytes).ok()).is_some_and(|record| record.state == BatchState::Cancelled)
    }

    /// Writes an invalid line's result (it is never queued).
    fn emit_invalid(&mut self, record: ResultRecord, tally: &mut Tally, progress: &Progress) -> Result<(), QueueError> {
        tally.failed += 1;
        tally.invalid += 1;
        self.emit(&record, progress)
    }

    /// Writes a result (nothing with --detach).
    fn emit(&mut self, record: &ResultRecord, progress: &Progress) -> Result<(), QueueError> {
        let Some(sink) = &mut self.sink else { return Ok(()) };
        sink.write(record).map_err(|error| {
            progress.note(&format!("psbridge: cannot write the results: {error}"));
            QueueError::Output
        })
    }
}

/// The `not_run` record an item has until its result comes.
fn pending_record(item: &Item) -> ResultRecord {
    let mut record = ResultRecord::new(item.line, item.input.clone(), Status::NotRun);
    (record.id, record.key, record.command) = (item.id.clone(), item.key.clone(), Some(item.name.clone()));
    record
}

fn encode<T: serde::Serialize>(value: &T) -> bytes::Bytes {
    serde_json::to_vec(value).expect("plain data serializes").into()
}

/// The next signal; never, when signals could not be listened for.
async fn recv(signals: &mut Option<Signals>) -> Interrupt {
    match signals {
        Some(signals) => signals.recv().await,
        None => std::future::pending().await,
    }
}

/// Publishes work items with their message ids, each again until the stream has it (the id makes a
/// repeat harmless). The items of one keyed partition go one after the other, each once the stream
/// acknowledged the one before, so that the stream holds a key's items in input order even when a
/// publish must be repeated; unkeyed items, and different partitions, go in parallel, at most
/// [`PUBLISH_WINDOW`] awaiting their acknowledgement.
struct Publisher {
    jetstream: async_nats::jetstream::Context,
    /// Per keyed partition, the task publishing its items in order.
    lanes: HashMap<usize, tokio::sync::mpsc::Sender<Outgoing>>,
    tasks: tokio::task::JoinSet<()>,
    /// Unkeyed items awaiting their acknowledgement.
    unkeyed: FuturesUnordered<futures_util::future::BoxFuture<'static, ()>>,
}

/// One message to publish.
struct Outgoing {
    subject: String,
    id: String,
    payload: bytes::Bytes,
}

/// Items a partition's lane holds before the input waits for it.
const LANE_DEPTH: usize = 64;

impl Publisher {
    fn new(jetstream: async_nats::jetstream::Context) -> Publisher {
        Publisher { jetstream, lanes: HashMap::new(), tasks: tokio::task::JoinSet::new(), unkeyed: FuturesUnordered::new() }
    }

    /// Publishes `item` of `profile` (for a keyed item: hands it to its partition's lane). Cancel safe:
    /// dropped before it returns, the item is not published.
    async fn publish(&mut self, item: &WorkItem, profile: &str) {
        let partition = Partition::of(item.key.as_deref());
        let outgoing = Outgoing {
            subject: work_subject(profile, partition),
            id: format!("{}.{}", result_key(&item.batch, &item.item), item.generation),
            payload: encode(item),
        };
        match partition {
            Partition::Keyed(n) => {
                let lane = match self.lanes.get(&n) {
                    Some(lane) => lane.clone(),
                    None => {
                        let (lane, mut queued) = tokio::sync::mpsc::channel::<Outgoing>(LANE_DEPTH);
                        let jetstream = self.jetstream.clone();
                        self.tasks.spawn(async move {
                            while let Some(outgoing) = queued.recv().await {
                                publish_until_stored(&jetstream, outgoing).await;
                            }
                        });
                        self.lanes.insert(n, lane.clone());
                        lane
                    }
                };
                // The lane ends only when this publisher drops it.
                let _ = lane.send(outgoing).await;
            }
            Partition::Unkeyed => {
                while self.unkeyed.len() >= PUBLISH_WINDOW {
                    self.unkeyed.next().await;
                }
                let jetstream = self.jetstream.clone();
                self.unkeyed.push(Box::pin(async move { publish_until_stored(&jetstream, outgoing).await }));
            }
        }
    }

    /// Waits until every item published is in the stream.
    async fn finish(&mut self) {
        self.lanes.clear();
        while self.unkeyed.next().await.is_some() {}
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Publishes one message until the stream acknowledges it.
async fn publish_until_stored(jetstream: &async_nats::jetstream::Context, outgoing: Outgoing) {
    loop {
        let message = PublishMessage::build().payload(outgoing.payload.clone()).message_id(&outgoing.id);
        match jetstream.send_publish(outgoing.subject.clone(), message).await {
            Ok(ack) => match ack.await {
                Ok(_) => return,
                Err(error) => tracing::warn!(%error, "publishing an item was not acknowledged; publishing it again"),
            },
            Err(error) => tracing::warn!(%error, "cannot publish an item; trying again"),
        }
        tokio::time::sleep(PUBLISH_RETRY).await;
    }
}
