//! `psbridge batch`: many commands from a JSONL or CSV file through a pool of workers, one result per
//! input item, resumable through a journal.

mod input;
mod journal;
mod progress;
mod sink;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use psbridge::{Command, InvocationResult, RetryPolicy, RunspaceBuilder, RunspacePool};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::secret::SecretReader;
use crate::{EXIT_BRIDGE, EXIT_COMMAND_ERRORS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Globals};
use input::{Entry, Item};
use journal::{Journal, Previous};
use sink::ResultSink;
use progress::{Progress, Tally};

/// Run many commands from a JSONL or CSV file through a pool of workers, with one result per item.
///
/// JSONL input has one item per line: {"command": "Set-Mailbox", "parameters": {...}, "key": "...",
/// "id": ...} (key and id optional). CSV input runs one --command per row, the header naming the
/// parameters; empty cells pass nothing. Items with the same key (--key-column for CSV) never run at
/// once and keep their input order; the others run in parallel on --workers workers, with throttled
/// commands retried as the profile's retry policy says.
///
/// Each result is one JSON line: line, id, key, command, input, status (succeeded, failed, invalid,
/// cancelled, not_run), output, errors, warnings, attempts, duration_ms, and resumed_in_flight or
/// previous_run when they apply. Results come in the order items finish; --output is written whole
/// at the end (FILE.partial until then).
///
/// A journal (FILE.journal beside --output, or --journal) records each item when it starts and when it
/// finishes. Running the same batch again with the same journal skips finished items (their results
/// are copied into the new output, previous_run: true) and runs the rest; an item that was running
/// when psbridge died runs again with resumed_in_flight: true, as it may already have been applied.
/// Ctrl-C (or SIGTERM) stops taking new items and lets running ones finish; a second one cancels
/// them. Either way the journal is kept, the workers are disconnected and the exit status is 130.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    psbridge batch --profile contoso --command Set-Mailbox --key-column Identity departments.csv --output results.jsonl\n  \
    psbridge batch --profile contoso --workers 8 new-mailboxes.jsonl --output created.jsonl\n  \
    psbridge batch --profile contoso new-mailboxes.jsonl --output created.jsonl      # again: resumes\n  \
    psbridge batch --simulated --command Get-Mailbox ids.csv --quiet | jq -c 'select(.status != \"succeeded\")'\n\n\
    JSONL item:  {\"command\": \"New-Mailbox\", \"parameters\": {\"Name\": \"Ann\", \"Shared\": true}, \"key\": \"Ann\", \"id\": 17}\n\n\
    Exit status: 0 every item succeeded, 1 some item failed or was invalid, 2 bad usage, input or journal, \
    3 the workers could not start, 130 interrupted (resume by running the same command again).")]
pub struct BatchArgs {
    /// The input file (`-` for standard input).
    #[arg(value_name = "INPUT")]
    input: PathBuf,

    /// Short for --profile simulated (it wins over --profile and PSBRIDGE_PROFILE).
    #[arg(long)]
    simulated: bool,

    /// The input's format [default: csv for a .csv file, else jsonl].
    #[arg(long, value_enum, value_name = "FORMAT")]
    input_format: Option<InputFormat>,

    /// CSV input: the command every row runs, its columns being the parameters.
    #[arg(long, value_name = "NAME")]
    command: Option<String>,

    /// CSV input: the column whose value is the item's key (it is still passed as a parameter).
    #[arg(long, value_name = "COLUMN")]
    key_column: Option<String>,

    /// Workers in the pool [default: the profile's workers, else 3].
    #[arg(long, short, value_name = "N")]
    workers: Option<usize>,

    /// Write the results to this file (JSONL) instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,

    /// The journal [default: the output file's name plus .journal; none when writing to stdout].
    #[arg(long, value_name = "FILE", conflicts_with = "no_journal")]
    journal: Option<PathBuf>,

    /// Keep no journal (the batch cannot be resumed).
    #[arg(long)]
    no_journal: bool,

    /// Forget what the journal holds and run every item again.
    #[arg(long)]
    restart: bool,

    /// Run again the items the journal holds as failed (succeeded ones are still skipped).
    #[arg(long)]
    retry_failed: bool,

    /// Stop an item after this many seconds [default: the profile's command_timeout_secs].
    #[arg(long, value_name = "SECONDS", value_parser = crate::parse_seconds)]
    timeout: Option<Duration>,

    /// No progress and no summary on stderr.
    #[arg(long, short)]
    quiet: bool,

    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = crate::parse_seconds)]
    progress_interval: Duration,
}

/// Input formats of `batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormat {
    Jsonl,
    Csv,
}

/// Usage problems found before anything runs.
fn usage(message: impl std::fmt::Display) -> u8 {
    eprintln!("psbridge: {message}");
    EXIT_USAGE
}

pub async fn run(args: BatchArgs, globals: Globals) -> u8 {
    let globals = globals.with_simulated(args.simulated);
    match Batch::prepare(&args, &globals) {
        Ok(batch) => batch.execute(&args).await,
        Err(code) => code,
    }
}

/// A batch ready to run: items, journal, output and pool settings.
struct Batch {
    entries: Vec<Entry>,
    /// The profile's workers, secrets already read (a missing secret stops the batch before it starts).
    workers_builder: RunspaceBuilder,
    retry: RetryPolicy,
    workers: usize,
    timeout: Option<Duration>,
    journal: Option<Journal>,
    previous: Previous,
    sink: ResultSink,
}

impl Batch {
    fn prepare(args: &BatchArgs, globals: &Globals) -> Result<Batch, u8> {
        let (_, profile) = globals.profile().map_err(usage)?;
        let workers = args.workers.unwrap_or_else(|| profile.workers());
        if workers == 0 {
            return Err(usage("--workers must be at least 1"));
        }
        let stdin_taken = args.input == Path::new("-");
        let text = read_input(&args.input).map_err(usage)?;
        let csv = match args.input_format {
            Some(format) => format == InputFormat::Csv,
            None => args.input.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")),
        };
        let entries = if csv {
            let Some(command) = args.command.as_deref() else {
                return Err(usage("CSV input needs --command, the command each row runs (for example --command Set-Mailbox)"));
            };
            input::read_csv(&text, command, args.key_column.as_deref()).map_err(usage)?
        } else {
            if args.command.is_some() || args.key_column.is_some() {
                return Err(usage(
                    "--command and --key-column are for CSV input; JSONL items carry their own command and key \
                     (use --input-format csv if the file is CSV)",
                ));
            }
            input::read_jsonl(&text)
        };
        let journal_path = match (&args.journal, &args.output) {
            _ if args.no_journal => None,
            (Some(path), _) => Some(path.clone()),
            (None, Some(output)) => Some(with_suffix(output, ".journal")),
            (None, None) => None,
        };
        for (what, path) in [("--output", args.output.as_ref()), ("the journal", journal_path.as_ref())] {
            if let Some(path) = path
                && !stdin_taken
                && same_file(path, &args.input)
            {
                return Err(usage(format_args!("{what} {} is the input file; choose another", path.display())));
            }
        }
        if let (Some(journal), Some(output)) = (&journal_path, &args.output)
            && (journal == output || same_file(journal, output))
        {
            return Err(usage("the journal and --output must be different files"));
        }
        let mut secrets = SecretReader::with_stdin_taken(stdin_taken.then(|| "the batch input".to_owned()));
        let workers_builder = profile.builder(&mut secrets).map_err(usage)?;
        let input_name = args.input.display().to_string();
        let (journal, previous) = match &journal_path {
            Some(path) => {
                let (journal, previous) = Journal::open(path, &input_name, args.restart).map_err(usage)?;
                (Some(journal), previous)
            }
            None => (None, Previous::default()),
        };
        if let Some(earlier) = &previous.input
            && *earlier != input_name
            && !args.quiet
        {
            eprintln!("psbridge: note: the journal was written for input {earlier}; items already finished there are skipped here too");
        }
        let sink = ResultSink::open(args.output.as_deref()).map_err(usage)?;
        if journal.is_none() && !args.quiet && !args.no_journal {
            eprintln!("psbridge: note: no journal (results go to stdout); give --journal FILE to make this batch resumable");
        }
        Ok(Batch { entries, workers_builder, retry: profile.retry(), workers, timeout: args.timeout, journal, previous, sink })
    }

    async fn execute(mut self, args: &BatchArgs) -> u8 {
        let mut tally = Tally::default();
        let mut progress = Progress::new(self.entries.len(), args.quiet, args.progress_interval);
        let mut to_run: Vec<(Item, u32)> = Vec::new();
        for entry in std::mem::take(&mut self.entries) {
            match entry {
                Entry::Invalid(invalid) => {
                    tally.failed += 1;
                    tally.invalid += 1;
                    let record = json!({
                        "line": invalid.line, "input": invalid.raw, "status": "invalid", "error": invalid.message,
                    });
                    if !self.emit(&record, &progress) {
                        return EXIT_BRIDGE;
                    }
                }
                Entry::Item(item) => match self.previous.finished.get(&item.identity) {
                    Some(done) if !(args.retry_failed && done["status"] != "succeeded") => {
                        let mut record = done.clone();
                        record["previous_run"] = json!(true);
                        if record["status"] == "succeeded" { tally.skipped += 1 } else { tally.failed += 1 }
                        if !self.emit(&record, &progress) {
                            return EXIT_BRIDGE;
                        }
                    }
                    Some(_) => to_run.push((item, 0)),
                    None => {
                        let starts = self.previous.starts.get(&item.identity).copied().unwrap_or(0);
                        to_run.push((item, starts));
                    }
                },
            }
        }
        if tally.skipped > 0 || to_run.iter().any(|(_, starts)| *starts > 0) {
            let in_flight = to_run.iter().filter(|(_, starts)| *starts > 0).count();
            progress.note(&format!(
                "psbridge batch: resuming from {}: {} finished earlier, {in_flight} were in flight and run again, {} to run",
                self.journal.as_ref().map_or_else(String::new, |j| j.path().display().to_string()),
                tally.skipped,
                to_run.len()
            ));
        }
        let mut interrupted = false;
        let mut code = EXIT_OK;
        if !to_run.is_empty() {
            match self.open_pool().await {
                Ok(pool) => {
                    progress.begin(&tally); // the rate counts from here, not from the workers' start-up
                    interrupted = self.dispatch(&pool, &mut to_run, &mut tally, &mut progress).await;
                    pool.close().await;
                }
                Err(message) => {
                    progress.note(&format!("psbridge: {message}"));
                    code = EXIT_BRIDGE;
                }
            }
        }
        // Whatever did not run is still accounted for.
        for (item, _) in to_run {
            tally.not_run += 1;
            if !self.emit(&item_record(&item, "not_run"), &progress) {
                return EXIT_BRIDGE;
            }
        }
        progress.finish();
        if let Some(journal) = &mut self.journal
            && let Err(error) = journal.sync()
        {
            eprintln!("psbridge: {error}");
        }
        if let Err(error) = self.sink.finish() {
            eprintln!("psbridge: cannot write the results: {error}");
            return EXIT_BRIDGE;
        }
        if !args.quiet {
            eprintln!("{}", summary(&tally, &progress));
        }
        if interrupted {
            if !args.quiet && self.journal.is_some() {
                eprintln!("psbridge batch: interrupted; run the same command again to resume");
            }
            EXIT_INTERRUPTED
        } else if code != EXIT_OK {
            code
        } else if tally.failed > 0 {
            EXIT_COMMAND_ERRORS
        } else {
            EXIT_OK
        }
    }

    async fn open_pool(&self) -> Result<RunspacePool, String> {
        RunspacePool::builder(self.workers_builder.clone())
            .min_workers(self.workers)
            .max_workers(self.workers)
            .retry(self.retry.clone())
            .shutdown_grace(Duration::from_secs(10))
            .build()
            .await
            .map_err(|e| format!("the workers could not start: {e}"))
    }

    /// Runs the items, at most two per worker handed to the pool at a time, in input order. Returns
    /// whether it was interrupted. Items it did not start stay in `to_run`.
    async fn dispatch(&mut self, pool: &RunspacePool, to_run: &mut Vec<(Item, u32)>, tally: &mut Tally, progress: &mut Progress) -> bool {
        let limit = self.workers * 2;
        let mut queue = std::mem::take(to_run).into_iter();
        let mut running: JoinSet<(Result<InvocationResult, psbridge::Error>, Duration)> = JoinSet::new();
        let mut items: HashMap<tokio::task::Id, (Item, u32)> = HashMap::new();
        let mut signals = Signals::new();
        let mut stopping = false;
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        loop {
            while !stopping && running.len() < limit {
                let Some((item, earlier_starts)) = queue.next() else { break };
                if let Some(journal) = &mut self.journal
                    && let Err(error) = journal.start(&item.identity, item.line)
                {
                    // Without the start record a crash could repeat this item unmarked: stop here.
                    progress.note(&format!("psbridge: {error}; stopping"));
                    to_run.push((item, earlier_starts));
                    stopping = true;
                    break;
                }
                let pending = match pool.submit(self.command(&item)).await {
                    Ok(pending) => pending,
                    Err(error) => {
                        self.finish(item, earlier_starts, Err(error), Duration::ZERO, tally, progress);
                        continue;
                    }
                };
                let started = Instant::now();
                let handle = running.spawn(async move { (pending.result().await, started.elapsed()) });
                items.insert(handle.id(), (item, earlier_starts));
            }
            if running.is_empty() {
                break;
            }
            tokio::select! {
                Some(joined) = running.join_next_with_id() => match joined {
                    Ok((id, (outcome, elapsed))) => {
                        let (item, earlier) = items.remove(&id).expect("every task has its item");
                        self.finish(item, earlier, outcome, elapsed, tally, progress);
                    }
                    Err(error) => {
                        let (item, _) = items.remove(&error.id()).expect("every task has its item");
                        tally.cancelled += 1;
                        // No finish record: the next run repeats it, marked resumed_in_flight.
                        self.emit(&item_record(&item, "cancelled"), progress);
                    }
                },
                () = signals.recv() => {
                    if stopping {
                        progress.note("psbridge batch: cancelling the running items");
                        running.abort_all();
                    } else {
                        stopping = true;
                        progress.note(&format!(
                            "psbridge batch: stopping: waiting for {} running items (interrupt again to cancel them)",
                            running.len()
                        ));
                    }
                }
                _ = ticker.tick() => progress.update(tally),
            }
        }
        to_run.extend(queue);
        stopping
    }

    fn command(&self, item: &Item) -> Command {
        let mut command = Command::new(item.command.as_str()).params(item.parameters.clone());
        if let Some(key) = &item.key {
            command = command.key(key.as_str());
        }
        if let Some(timeout) = self.timeout {
            command = command.timeout(timeout);
        }
        command
    }

    /// Journals and writes one item's result.
    fn finish(
        &mut self,
        item: Item,
        earlier_starts: u32,
        outcome: Result<InvocationResult, psbridge::Error>,
        elapsed: Duration,
        tally: &mut Tally,
        progress: &mut Progress,
    ) {
        let record = result_record(&item, earlier_starts, outcome, elapsed);
        tally.ran += 1;
        if record["status"] == "succeeded" { tally.succeeded += 1 } else { tally.failed += 1 }
        if record["attempts"].as_u64().unwrap_or(1) > 1 {
            tally.retried += 1;
        }
        if let Some(journal) = &mut self.journal
            && let Err(error) = journal.finish(&item.identity, &record)
        {
            progress.note(&format!("psbridge: {error}"));
        }
        self.emit(&record, progress);
        progress.update(tally);
    }

    /// Writes a result; reports a failure to write (and returns false).
    fn emit(&mut self, record: &Value, progress: &Progress) -> bool {
        match self.sink.write(record) {
            Ok(()) => true,
            Err(error) => {
                progress.note(&format!("psbridge: cannot write the results: {error}"));
                false
            }
        }
    }
}

/// The record of an item: what it was, and its status.
fn item_record(item: &Item, status: &str) -> Value {
    json!({
        "line": item.line, "id": item.id, "key": item.key, "command": item.command, "input": item.raw, "status": status,
    })
}

/// The result record of an item that ran.
fn result_record(item: &Item, earlier_starts: u32, outcome: Result<InvocationResult, psbridge::Error>, elapsed: Duration) -> Value {
    let succeeded = outcome.as_ref().is_ok_and(|result| result.succeeded());
    let mut record = item_record(item, if succeeded { "succeeded" } else { "failed" });
    let attempts = match outcome {
        Ok(result) => {
            record["output"] = Value::Array(result.output.into_iter().map(|o| o.value).collect());
            record["errors"] = json!(result.errors);
            record["warnings"] = json!(result.warnings);
            result.attempts
        }
        Err(error) => {
            record["error"] = json!(error.to_string());
            1
        }
    };
    record["attempts"] = json!(earlier_starts + attempts);
    record["duration_ms"] = json!((elapsed.as_secs_f64() * 1e4).round() / 10.0);
    if earlier_starts > 0 {
        record["resumed_in_flight"] = json!(true);
    }
    record
}

fn summary(tally: &Tally, progress: &Progress) -> String {
    let mut text = format!(
        "psbridge batch: {} succeeded, {} failed ({} invalid), {} skipped (finished in an earlier run), {} retried",
        tally.succeeded, tally.failed, tally.invalid, tally.skipped, tally.retried
    );
    if tally.cancelled > 0 {
        text += &format!(", {} cancelled", tally.cancelled);
    }
    if tally.not_run > 0 {
        text += &format!(", {} not run", tally.not_run);
    }
    let seconds = progress.elapsed().as_secs_f64();
    text + &format!("; {} items run in {seconds:.1} s ({:.1} items/s)", tally.ran, progress.rate(tally))
}

fn read_input(path: &Path) -> Result<String, String> {
    let bytes = if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).map_err(|e| format!("cannot read standard input: {e}"))?;
        bytes
    } else {
        std::fs::read(path).map_err(|e| format!("cannot read the input {}: {e}", path.display()))?
    };
    let text = String::from_utf8(bytes).map_err(|e| format!("the input {} is not UTF-8 (byte {})", path.display(), e.utf8_error().valid_up_to()))?;
    Ok(text.strip_prefix('\u{feff}').map(str::to_owned).unwrap_or(text))
}

/// `path` with `suffix` added to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Ctrl-C and SIGTERM, as often as they come.
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals { interrupt: signal(SignalKind::interrupt()).ok(), terminate: signal(SignalKind::terminate()).ok() }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            let interrupt = async {
                match &mut self.interrupt {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let terminate = async {
                match &mut self.terminate {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = interrupt => {}
                _ = terminate => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
