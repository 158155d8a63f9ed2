//! `psbridge queue status|results|cancel --queue URL BATCH`: a queued batch's progress, its recorded
//! results, and cancelling what has not begun.

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_nats::jetstream::kv;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::QueueError;
use super::connect::{Patience, connect};
use super::item::{BatchRecord, BatchState, Duplicate, StoredResult};
use super::layout::{Queue, valid_batch_id};
use super::results::BatchWatch;
use crate::batch::{ResultSink, Status};
use crate::config::Config;
use crate::exit::{CliError, EXIT_OUTPUT};
use crate::secret::SecretReader;
use crate::Globals;

/// Look at a batch queued with `batch --queue`, fetch its results, or cancel it.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    psbridge queue status --queue nats://nats.example.com:4222 3f2a9c0d1b7e4a5f6c8d9e0a\n  \
    psbridge queue results --queue nats://nats.example.com:4222 3f2a9c0d1b7e4a5f6c8d9e0a -o results.jsonl\n  \
    psbridge queue cancel --queue nats://nats.example.com:4222 3f2a9c0d1b7e4a5f6c8d9e0a\n\n\
    Exit status: 0 done, 2 bad usage or no such batch, 3 the queue cannot be reached, 74 the results could not be written.")]
pub struct QueueArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// A batch's progress: items finished (succeeded, failed), not finished yet, duplicate runs.
    Status {
        #[command(flatten)]
        target: Target,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The results recorded so far, one JSON line per item in input order (items not finished, and
    /// invalid lines, which never reach the queue, have none).
    Results {
        #[command(flatten)]
        target: Target,
        /// Write them to this file instead of standard output (it appears whole, readable by its owner
        /// only).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Cancel a batch: the hosts drop its items that have not begun; running ones finish and are
    /// recorded. Submitting the batch again queues its unfinished items anew.
    Cancel {
        #[command(flatten)]
        target: Target,
    },
}

/// Which batch, in which queue.
#[derive(Debug, Args)]
struct Target {
    /// The NATS server: nats://HOST:PORT, or tls://HOST:PORT (credentials: the configuration's [queue]).
    #[arg(long, value_name = "URL")]
    queue: String,
    /// The batch's id, as `batch --queue --detach` printed it (or its --batch-id).
    #[arg(value_name = "BATCH")]
    batch: String,
}

/// What `queue status --json` prints.
#[derive(Debug, Serialize)]
struct Report {
    batch: String,
    profile: String,
    state: BatchState,
    /// Items queued (`null` while they are being published).
    items: Option<usize>,
    finished: usize,
    succeeded: usize,
    failed: usize,
    not_finished: Option<usize>,
    duplicates: usize,
}

/// Runs `psbridge queue ...`.
pub async fn run(args: QueueArgs, globals: Globals) -> Result<(), CliError> {
    let (url, batch) = match &args.action {
        Action::Status { target, .. } | Action::Results { target, .. } | Action::Cancel { target } => (target.queue.clone(), target.batch.clone()),
    };
    if !valid_batch_id(&batch) {
        return Err(CliError::usage(format_args!("{batch:?} is not a batch id (letters, digits, - and _)")));
    }
    let config = Config::load(globals.config.as_deref())?;
    let mut secrets = SecretReader::default();
    let outcome = async {
        let client = connect(&url, &config, &mut secrets, "psbridge queue", Patience::FailFast).await?;
        let queue = Queue::open(client).await?;
        match args.action {
            Action::Status { json, .. } => status(&queue, &batch, json).await,
            Action::Results { output, .. } => results(&queue, &batch, output).await,
            Action::Cancel { .. } => cancel(&queue, &batch).await,
        }
    };
    match outcome.await {
        Ok(()) => Ok(()),
        Err(QueueError::Output) => Err(CliError::Reported(EXIT_OUTPUT)), // already reported
        Err(error) => {
            eprintln!("psbridge: {error}");
            Err(CliError::Reported(error.exit_code()))
        }
    }
}

/// The batch's record and its revision.
async fn record(queue: &Queue, batch: &str) -> Result<(BatchRecord, u64), QueueError> {
    let entry = queue.batches.entry(batch).await.map_err(QueueError::jetstream("read the batch"))?;
    let entry = entry.filter(|e| e.operation == kv::Operation::Put).ok_or_else(|| QueueError::UnknownBatch { batch: batch.to_owned() })?;
    let record = serde_json::from_slice(&entry.value).map_err(|e| QueueError::Refused(format!("batch {batch} is not one psbridge wrote ({e})")))?;
    Ok((record, entry.revision))
}

/// Every result recorded for the batch so far.
async fn recorded(queue: &Queue, batch: &str) -> Result<Vec<StoredResult>, QueueError> {
    let (_, results) = BatchWatch::open::<StoredResult>(&queue.results, format!("{batch}."), format!("{batch}.*")).await?;
    Ok(results.into_iter().map(|(_, result)| result).collect())
}

async fn status(queue: &Queue, batch: &str, json: bool) -> Result<(), QueueError> {
    let (record, _) = record(queue, batch).await?;
    let results = recorded(queue, batch).await?;
    let (_, duplicates) = BatchWatch::open::<Duplicate>(&queue.duplicates, format!("{batch}."), format!("{batch}.>")).await?;
    let succeeded = results.iter().filter(|r| r.result.status == Status::Succeeded).count();
    let report = Report {
        batch: batch.to_owned(),
        profile: record.profile,
        state: record.state,
        items: record.items,
        finished: results.len(),
        succeeded,
        failed: results.len() - succeeded,
        not_finished: record.items.map(|items| items.saturating_sub(results.len())),
        duplicates: duplicates.len(),
    };
    if json {
        println!("{}", serde_json::to_string(&report).expect("plain data serializes"));
    } else {
        let state = match report.state {
            BatchState::Open => "open",
            BatchState::Cancelled => "cancelled",
        };
        let items = report.items.map_or_else(|| "items still being queued".to_owned(), |n| format!("{n} items"));
        println!("batch {}: profile {}, {state}, {items}", report.batch, report.profile);
        let waiting = report.not_finished.map_or_else(String::new, |n| format!("; {n} not finished (queued or running)"));
        println!("  {} finished: {} succeeded, {} failed{waiting}; {} duplicate runs", report.finished, report.succeeded, report.failed, report.duplicates);
    }
    Ok(())
}

async fn results(queue: &Queue, batch: &str, output: Option<PathBuf>) -> Result<(), QueueError> {
    record(queue, batch).await?;
    let mut sink = ResultSink::open(output.as_deref()).map_err(QueueError::Refused)?;
    let by_line: BTreeMap<(usize, String), StoredResult> =
        recorded(queue, batch).await?.into_iter().map(|r| ((r.result.line, r.result.input.clone()), r)).collect();
    for stored in by_line.values() {
        if let Err(error) = sink.write(&stored.result) {
            eprintln!("psbridge: cannot write the results: {error}");
            return Err(QueueError::Output);
        }
    }
    sink.finish().map_err(|error| {
        eprintln!("psbridge: cannot write the results: {error}");
        QueueError::Output
    })
}

async fn cancel(queue: &Queue, batch: &str) -> Result<(), QueueError> {
    loop {
        let (mut record, revision) = record(queue, batch).await?;
        if record.state == BatchState::Cancelled {
            break;
        }
        record.state = BatchState::Cancelled;
        let value = serde_json::to_vec(&record).expect("plain data serializes");
        match queue.batches.update(batch, value.into(), revision).await {
            Ok(_) => break,
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(error) => return Err(QueueError::jetstream("cancel the batch")(error)),
        }
    }
    let finished = recorded(queue, batch).await?.len();
    eprintln!("psbridge queue: batch {batch} cancelled: {finished} items had finished; the hosts drop the others before they begin (running ones finish)");
    Ok(())
}
