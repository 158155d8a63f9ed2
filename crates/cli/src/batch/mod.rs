//! `psbridge batch`: many commands from a JSONL or CSV file through a pool of workers, one result per
//! input item, resumable through a journal.

mod input;
mod journal;
mod jsonl;
mod progress;
mod record;
mod sink;
mod source;
mod table;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use psbridge::{Command, InvocationResult, PoolBuilder, RunspacePool};
use tokio::task::{AbortHandle, JoinSet};

use crate::secret::SecretReader;
use crate::exit::{CliError, EXIT_OUTPUT, Interrupt};
use crate::signals::Signals;
use crate::{EXIT_BRIDGE, EXIT_COMMAND_ERRORS, EXIT_OK, EXIT_USAGE, Globals};
use input::{Entries, Entry, Format, Item};
use journal::{Journal, Previous, SharedJournal};
use progress::{Progress, Tally};
use record::{ResultRecord, Status, bridge_error};
use sink::ResultSink;
use source::{Source, SourceError};

/// The default of --max-line-bytes.
const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// Run many commands from a JSONL or CSV file through a pool of workers, with one result per item.
///
/// JSONL input has one item per line: {"command": "Set-Mailbox", "parameters": {...}, "key": "...",
/// "id": ...} (key and id optional). A secret parameter is written {"$psbridge": "securestring", "value":
/// "..."} (or "secret" for a plain-string secret); results and the journal show it as "********". A
/// parameter given twice (also as Identity and identity) makes the line invalid.
///
/// CSV input runs one --command per row, the header naming the parameters; empty cells pass nothing.
/// A header cell Name:type types its column: string (default), int, bool (true/false, yes/no, 1/0),
/// switch (true passes -Name, false -Name:$false), array (split on ;), securestring (a secret, shown as
/// ********). CRLF or LF line endings, UTF-8 (with or without a BOM) or UTF-16 with a BOM; --delimiter
/// for ; or tab files.
///
/// Items with the same key (--key-column for CSV) never run at once and keep their input order; the
/// others run in parallel on --workers workers (never more workers than items to run), with throttled
/// commands retried as the profile's retry policy says. A line that cannot run (bad JSON or CSV, a bad
/// value, a line over --max-line-bytes) is an invalid result naming its line; the others still run.
///
/// Each result is one JSON line with every field: line, id, key, command, input, status (succeeded,
/// failed, invalid, cancelled, not_run), output, errors, warnings, exit_code, native_exit_code,
/// attempts, duration_ms, and resumed_in_flight or previous_run when they apply. Results come in the
/// order items finish; --output is written whole at the end (FILE.partial until then), readable by its
/// owner only.
///
/// A journal (FILE.journal beside --output, or --journal) records which input it belongs to, each item
/// when a worker begins it and when it finishes. Running the same batch again with the same journal
/// skips finished items (their results are copied into the new output, previous_run: true) and runs the
/// rest; an item that was running when psbridge died runs again with resumed_in_flight: true, as it may
/// already have been applied. A journal written for another input (or the same file, changed) is
/// refused: give --restart to start over, or --resume to go on anyway (items are matched by their
/// content, so finished ones are still skipped). Ctrl-C (or SIGTERM) stops taking new items and lets
/// running ones finish (items no worker began within 10 s are not run); a second one cancels them.
/// Either way the journal is kept, the workers are disconnected and the exit status is 130 (143 for
/// SIGTERM).
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    psbridge batch --profile contoso --command Set-Mailbox --key-column Identity departments.csv --output results.jsonl\n  \
    psbridge batch --profile contoso --workers 8 new-mailboxes.jsonl --output created.jsonl\n  \
    psbridge batch --profile contoso new-mailboxes.jsonl --output created.jsonl      # again: resumes\n  \
    psbridge batch --simulated --command Get-Mailbox ids.csv --quiet | jq -c 'select(.status != \"succeeded\")'\n\n\
    JSONL item:  {\"command\": \"New-Mailbox\", \"parameters\": {\"Name\": \"Ann\", \"Shared\": true}, \"key\": \"Ann\", \"id\": 17}\n\
    CSV header:  Identity,HiddenFromAddressListsEnabled:bool,ResultSize:int,Force:switch,EmailAddresses:array,Password:securestring\n\n\
    Exit status: 0 every item succeeded, 1 some item failed or was invalid, 2 bad usage, input or journal \
    (a journal of another input included), 3 no worker could be started and connected (the items are \
    not_run, with the reason), 74 the results could not be written, 130 Ctrl-C, 143 SIGTERM (resume by \
    running the same command again).")]
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

    /// CSV input: the cell separator, one character (`;`, `|`, or `tab`) [default: ,].
    #[arg(long, value_name = "CHAR", value_parser = parse_delimiter)]
    delimiter: Option<char>,

    /// The longest input line (for CSV, row) read, in bytes (suffix K, M or G for KiB, MiB, GiB);
    /// longer ones are invalid results [default: 64M].
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    max_line_bytes: Option<usize>,

    /// Workers in the pool [default: the profile's workers, else 3; never more than items to run].
    #[arg(long, short, value_name = "N")]
    workers: Option<usize>,

    /// Runspaces per worker process, each connected on its own, each running one item at a time
    /// [default: the profile's runspaces_per_worker, else 1].
    #[arg(long, value_name = "M")]
    runspaces_per_worker: Option<usize>,

    /// Run fewer items at once while the service throttles (cut to three quarters on a throttled
    /// item and nothing new started while its Retry-After runs, one more after a run of unthrottled
    /// ones); the progress line shows the current limit [default: the profile's adaptive_concurrency,
    /// else off].
    #[arg(long)]
    adaptive_concurrency: bool,

    /// How deep output objects are serialized; deeper properties arrive as their ToString() [default: 4].
    #[arg(long, value_name = "N")]
    depth: Option<u32>,

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
    #[arg(long, conflicts_with = "resume")]
    restart: bool,

    /// Resume even though the journal was written for another input (or the input changed): items are
    /// matched by their content, so those that finished are still skipped.
    #[arg(long)]
    resume: bool,

    /// Run again the items the journal holds as failed (succeeded ones are still skipped).
    #[arg(long)]
    retry_failed: bool,

    /// Stop an item after this many seconds [default: the profile's command_timeout_secs].
    #[arg(long, value_name = "SECONDS", value_parser = crate::parse_seconds)]
    timeout: Option<Duration>,

    /// No progress, no notes or warnings, and no summary on stderr (errors are still printed).
    #[arg(long, short)]
    quiet: bool,

    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = crate::parse_seconds)]
    progress_interval: Duration,
}

/// `--delimiter`: one character, or `tab`.
fn parse_delimiter(text: &str) -> Result<char, String> {
    let mut chars = text.chars();
    let delimiter = match (chars.next(), chars.next()) {
        _ if text.eq_ignore_ascii_case("tab") || text == "\\t" => '\t',
        (Some(c), None) => c,
        _ => return Err(format!("must be one character (such as ; or |) or tab, not {text:?}")),
    };
    if matches!(delimiter, '"' | '\n' | '\r') {
        return Err("cannot be a quote or a line break".to_owned());
    }
    Ok(delimiter)
}

/// `--max-line-bytes`: a number of bytes, with an optional K, M or G (KiB, MiB, GiB).
fn parse_bytes(text: &str) -> Result<usize, String> {
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&trimmed[..i], c.to_ascii_uppercase()),
        _ => (trimmed, 'B'),
    };
    let scale: usize = match unit {
        'B' => 1,
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        _ => return Err(format!("must be a number of bytes such as 200M, not {text}")),
    };
    digits
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("must be a positive number of bytes such as 200M, not {text}"))
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

/// Why a batch stopped early, besides an interrupt.
enum Stop {
    /// The results could not be written (already reported).
    Output,
    /// No worker could be started and connected: the items that did not run say why.
    Workers(String),
    /// The input could not be read any further.
    Input(SourceError),
    /// A start record could not be journalled (already reported).
    Journal,
}

/// How long running items may finish after the first signal, and how long queued ones may wait for a
/// worker to begin them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The next signal; never, when signals could not be listened for.
async fn recv(signals: &mut Option<Signals>) -> Interrupt {
    match signals {
        Some(signals) => signals.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// An item handed to the pool: its result so far, and what the journal needs.
struct Ticket {
    record: ResultRecord,
    identity: String,
    line: usize,
    /// Starts journalled by earlier runs.
    earlier: u32,
    /// When a worker began it (set by the pool's start hook).
    began: Arc<OnceLock<Instant>>,
}

/// A batch ready to run: input, journal, output and pool settings.
struct Batch {
    entries: Entries,
    /// Input entries, estimated, for the progress display.
    total: usize,
    /// The profile's workers, secrets already read (a missing secret stops the batch before it starts).
    /// The profile's pool: its workers, and its classifier, retries and connect limits.
    pool: PoolBuilder,
    workers: usize,
    /// Runspaces per worker: the pool runs up to `workers x runspaces` items at once.
    runspaces: usize,
    /// Whether the pool's concurrency adapts to throttling (the progress line shows its limit).
    adaptive: bool,
    timeout: Option<Duration>,
    depth: Option<u32>,
    retry_failed: bool,
    journal: Option<SharedJournal>,
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
        let runspaces = args.runspaces_per_worker.unwrap_or_else(|| profile.runspaces_per_worker());
        if !(1..=64).contains(&runspaces) {
            return Err(usage("--runspaces-per-worker must be 1 to 64"));
        }
        let adaptive = args.adaptive_concurrency || profile.adaptive_concurrency();
        let stdin_taken = args.input == Path::new("-");
        let csv = match args.input_format {
            Some(format) => format == InputFormat::Csv,
            None => args.input.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")),
        };
        if csv && args.command.is_none() {
            return Err(usage("CSV input needs --command, the command each row runs (for example --command Set-Mailbox)"));
        }
        if !csv && (args.command.is_some() || args.key_column.is_some() || args.delimiter.is_some()) {
            return Err(usage(
                "--command, --key-column and --delimiter are for CSV input; JSONL items carry their own command and key \
                 (use --input-format csv if the file is CSV)",
            ));
        }
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
        let max_line_bytes = args.max_line_bytes.unwrap_or(DEFAULT_MAX_LINE_BYTES);
        let mut source = Source::open(&args.input).map_err(usage)?;
        let sha256 = source.sha256().map_err(usage)?;
        let lines_total = source.count_lines(max_line_bytes).map_err(usage)?;
        let mut lines = source.lines(max_line_bytes).map_err(usage)?;
        let (format, total): (Box<dyn Format>, usize) = if let Some(command) = &args.command {
            let options = table::TableOptions {
                command: command.clone(),
                key_column: args.key_column.clone(),
                delimiter: args.delimiter.unwrap_or(','),
                max_bytes: max_line_bytes,
            };
            (Box::new(table::Table::new(&mut lines, options).map_err(usage)?), lines_total.saturating_sub(1))
        } else {
            (Box::<jsonl::Jsonl>::default(), lines_total)
        };
        let mut secrets = SecretReader::with_stdin_taken(stdin_taken.then(|| "the batch input".to_owned()));
        let pool = profile.pool_builder(profile.builder(&mut secrets).map_err(usage)?).runspaces_per_worker(runspaces).adaptive_concurrency(adaptive);
        let input_name = args.input.display().to_string();
        let (journal, previous) = match &journal_path {
            Some(path) => {
                let (mut journal, previous) = Journal::open(path, &input_name, &sha256, args.restart).map_err(usage)?;
                if let Some(earlier) = &previous.input_sha256
                    && *earlier != sha256
                {
                    let earlier_input = previous.input.as_deref().unwrap_or("another input");
                    if !args.resume {
                        return Err(usage(format_args!(
                            "the journal {} belongs to another input: it was written for {earlier_input}, and {input_name} {}. \
                             Give --restart to forget the journal and run every item, or --resume to go on with this input \
                             (items are matched by their content; those that finished are skipped)",
                            path.display(),
                            if earlier_input == input_name { "has changed since" } else { "is not that file, or has other content" },
                        )));
                    }
                    journal.belongs_to(&input_name, &sha256).map_err(usage)?;
                    if !args.quiet {
                        eprintln!(
                            "psbridge: note: resuming with a changed input (the journal was written for {earlier_input}); \
                             items that finished there are skipped here too"
                        );
                    }
                }
                (Some(SharedJournal::new(journal)), previous)
            }
            None => (None, Previous::default()),
        };
        let sink = ResultSink::open(args.output.as_deref()).map_err(usage)?;
        if journal.is_none() && !args.quiet && !args.no_journal {
            eprintln!("psbridge: note: no journal (results go to stdout); give --journal FILE to make this batch resumable");
        }
        Ok(Batch {
            entries: Entries::new(lines, format),
            total,
            pool,
            workers,
            runspaces,
            adaptive,
            timeout: args.timeout,
            depth: args.depth,
            retry_failed: args.retry_failed,
            journal,
            previous,
            sink,
        })
    }

    async fn execute(mut self, args: &BatchArgs) -> u8 {
        let mut tally = Tally::default();
        let mut progress = Progress::new(self.total, args.quiet, args.progress_interval);
        if !self.previous.finished.is_empty() || !self.previous.starts.is_empty() {
            progress.note(&format!(
                "psbridge batch: resuming from {}: {} items finished earlier, {} were running and run again",
                self.journal.as_ref().map_or_else(String::new, |j| j.path().display().to_string()),
                self.previous.finished.len(),
                self.previous.in_flight(),
            ));
        }
        // Read ahead up to one item per runspace, so that the pool starts no more workers than there are
        // items to run.
        let mut ready: VecDeque<(Command, Ticket)> = VecDeque::new();
        let mut stop = None;
        while ready.len() < self.workers * self.runspaces {
            match self.next_to_run(&mut tally, &progress) {
                Ok(Some(next)) => ready.push_back(next),
                Ok(None) => break,
                Err(error) => {
                    stop = Some(error);
                    break;
                }
            }
        }
        let mut interrupted = None;
        let mut code = EXIT_OK;
        let mut signals = match Signals::new() {
            Ok(signals) => Some(signals),
            Err(error) => {
                progress.note(&format!("psbridge: cannot listen for Ctrl-C and SIGTERM: {error}"));
                None
            }
        };
        if !ready.is_empty() && stop.is_none() {
            match self.start_pool(ready.len().div_ceil(self.runspaces), &mut signals, &mut interrupted).await {
                Ok(pool) => {
                    progress.begin(&tally); // the rate counts from here, not from the workers' start-up
                    let (was_interrupted, stopped) =
                        self.dispatch(&pool, &mut ready, &mut tally, &mut progress, &mut signals, interrupted).await;
                    interrupted = was_interrupted;
                    stop = stopped;
                    pool.close().await;
                }
                Err(message) => stop = Some(Stop::Workers(message)),
            }
        }
        // Whatever did not run is still accounted for, to the end of the input.
        let reason = match &stop {
            Some(Stop::Workers(message)) => Some(message.clone()),
            _ => None,
        };
        if !matches!(stop, Some(Stop::Output))
            && let Err(error) = self.not_run(ready, reason.as_deref(), &mut tally, &progress)
        {
            stop = Some(error);
        }
        progress.finish();
        if let Some(journal) = &self.journal
            && let Err(error) = journal.sync()
        {
            eprintln!("psbridge: {error}");
        }
        match stop {
            Some(Stop::Output) => return EXIT_OUTPUT,
            Some(Stop::Workers(message)) => {
                eprintln!("psbridge: {message}; the items that did not run are reported not_run");
                code = EXIT_BRIDGE;
            }
            Some(Stop::Input(error)) => {
                eprintln!("psbridge: {error}; the items after it did not run");
                code = EXIT_USAGE;
            }
            Some(Stop::Journal) => code = EXIT_BRIDGE,
            None => {}
        }
        if let Err(error) = self.sink.finish() {
            eprintln!("psbridge: cannot write the results: {error}");
            return EXIT_OUTPUT;
        }
        if !args.quiet {
            eprintln!("{}", summary(&tally, &progress));
        }
        if let Some(signal) = interrupted {
            if !args.quiet && self.journal.is_some() {
                eprintln!("psbridge batch: interrupted; run the same command again to resume");
            }
            CliError::Interrupted(signal).exit_code()
        } else if code != EXIT_OK {
            code
        } else if tally.failed > 0 {
            EXIT_COMMAND_ERRORS
        } else {
            EXIT_OK
        }
    }

    /// The next item to run, writing the results of the entries before it that need no run (invalid
    /// lines, items finished in an earlier run); `None` at the end of the input.
    fn next_to_run(&mut self, tally: &mut Tally, progress: &Progress) -> Result<Option<(Command, Ticket)>, Stop> {
        loop {
            match self.entries.next_entry().map_err(Stop::Input)? {
                None => return Ok(None),
                Some(Entry::Invalid(invalid)) => {
                    tally.failed += 1;
                    tally.invalid += 1;
                    let mut record = ResultRecord::new(invalid.line, invalid.input, Status::Invalid);
                    record.command = invalid.command;
                    record.errors = vec![bridge_error("psbridge.invalid_input", invalid.message)];
                    self.emit(&record, progress)?;
                }
                Some(Entry::Item(item)) => {
                    let Item { line, input, name, command, key, id, identity } = *item;
                    let earlier = match self.previous.finished.remove(&identity) {
                        Some(done) if !(self.retry_failed && done.status != Status::Succeeded) => {
                            let mut record = done;
                            record.previous_run = true;
                            record.line = line; // the line may have moved since (a fixed or changed input)
                            if record.status == Status::Succeeded { tally.skipped += 1 } else { tally.failed += 1 }
                            self.emit(&record, progress)?;
                            continue;
                        }
                        Some(_) => 0, // failed before, run again with --retry-failed: a fresh run
                        None => self.previous.starts.get(&identity).copied().unwrap_or(0),
                    };
                    let mut record = ResultRecord::new(line, input, Status::NotRun);
                    (record.id, record.key, record.command) = (id, key, Some(name));
                    return Ok(Some((command, Ticket { record, identity, line, earlier, began: Arc::default() })));
                }
            }
        }
    }

    /// Writes `not_run` results for the items that did not run (with the reason, when there is one),
    /// and the results of the rest of the input.
    fn not_run(
        &mut self,
        ready: VecDeque<(Command, Ticket)>,
        reason: Option<&str>,
        tally: &mut Tally,
        progress: &Progress,
    ) -> Result<(), Stop> {
        for (_, ticket) in ready {
            self.emit_not_run(ticket.record, reason, tally, progress)?;
        }
        while let Some((_, ticket)) = self.next_to_run(tally, progress)? {
            self.emit_not_run(ticket.record, reason, tally, progress)?;
        }
        Ok(())
    }

    fn emit_not_run(&mut self, mut record: ResultRecord, reason: Option<&str>, tally: &mut Tally, progress: &Progress) -> Result<(), Stop> {
        tally.not_run += 1;
        record.status = Status::NotRun;
        if let Some(reason) = reason {
            record.errors = vec![bridge_error("psbridge.not_run", reason.to_owned())];
        }
        self.emit(&record, progress)
    }

    /// Opens the pool, listening for signals meanwhile: after a first one, start-up gets the shutdown
    /// grace to finish, then the batch ends (the workers being started are killed with the dropped
    /// future) without waiting for a second signal.
    async fn start_pool(
        &self,
        workers: usize,
        signals: &mut Option<Signals>,
        interrupted: &mut Option<Interrupt>,
    ) -> Result<RunspacePool, String> {
        let open = self.open_pool(workers);
        tokio::pin!(open);
        let signal = tokio::select! {
            opened = &mut open => return opened,
            signal = recv(signals) => signal,
        };
        *interrupted = Some(signal);
        match tokio::time::timeout(SHUTDOWN_GRACE, open).await {
            Ok(opened) => opened,
            Err(_) => Err(format!("the workers did not start within {} s after the signal", SHUTDOWN_GRACE.as_secs())),
        }
    }

    async fn open_pool(&self, workers: usize) -> Result<RunspacePool, String> {
        // Bounded: connect failures fail every queued item with the cause within seconds (connect_attempts).
        self.pool
            .clone()
            .min_workers(workers)
            .max_workers(workers)
            .shutdown_grace(SHUTDOWN_GRACE)
            .build()
            .await
            .map_err(|e| format!("the workers could not start: {e}"))
    }

    /// Runs the items, at most two per runspace handed to the pool at a time, in input order. Returns
    /// whether it was interrupted, and why it stopped otherwise. Items it did not hand over stay in
    /// `ready` or in the input.
    async fn dispatch(
        &mut self,
        pool: &RunspacePool,
        ready: &mut VecDeque<(Command, Ticket)>,
        tally: &mut Tally,
        progress: &mut Progress,
        signals: &mut Option<Signals>,
        mut interrupted: Option<Interrupt>,
    ) -> (Option<Interrupt>, Option<Stop>) {
        let limit = self.workers * self.runspaces * 2;
        let mut running: JoinSet<Result<InvocationResult, psbridge::Error>> = JoinSet::new();
        let mut tickets: HashMap<tokio::task::Id, (Ticket, AbortHandle)> = HashMap::new();
        // After the first signal, items that no worker has begun get the shutdown grace to begin: a batch
        // whose workers cannot connect then ends without a second signal.
        let mut grace: Option<tokio::time::Instant> = None;
        let mut stop = None;
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        loop {
            if let Some(error) = self.journal.as_ref().and_then(SharedJournal::take_start_failure) {
                // Without start records a crash could repeat items unmarked: take no more.
                progress.note(&format!("psbridge: {error}; stopping"));
                stop.get_or_insert(Stop::Journal);
            }
            while interrupted.is_none() && stop.is_none() && running.len() < limit {
                let next = match ready.pop_front() {
                    Some(next) => Some(next),
                    None => match self.next_to_run(tally, progress) {
                        Ok(next) => next,
                        Err(error) => {
                            stop = Some(error);
                            None
                        }
                    },
                };
                let Some((command, ticket)) = next else { break };
                let command = self.options(command);
                let (journal, began, identity, line) = (self.journal.clone(), ticket.began.clone(), ticket.identity.clone(), ticket.line);
                let on_start = move || {
                    // Before the command reaches PowerShell: a crash after this repeats it marked.
                    if let Some(journal) = journal {
                        journal.start(&identity, line);
                    }
                    let _ = began.set(Instant::now());
                };
                match pool.submit_with_start(command, on_start).await {
                    Ok(pending) => {
                        let handle = running.spawn(pending.result());
                        tickets.insert(handle.id(), (ticket, handle));
                    }
                    Err(error) => {
                        if let Err(stopped) = self.finish(ticket, Err(error), tally, progress) {
                            stop = Some(stopped);
                        }
                    }
                }
            }
            if running.is_empty() {
                break;
            }
            if self.adaptive {
                progress.concurrency(pool.concurrency_limit());
            }
            tokio::select! {
                Some(joined) = running.join_next_with_id() => match joined {
                    Ok((id, outcome)) => {
                        let (ticket, _) = tickets.remove(&id).expect("every task has its ticket");
                        if let Err(stopped) = self.finish(ticket, outcome, tally, progress) {
                            stop.get_or_insert(stopped);
                        }
                    }
                    Err(error) => {
                        let (mut ticket, _) = tickets.remove(&error.id()).expect("every task has its ticket");
                        // Begun: it may have been applied. No finish record, so the next run repeats it,
                        // marked resumed_in_flight. Not begun: it simply did not run.
                        if ticket.began.get().is_some() {
                            tally.cancelled += 1;
                            ticket.record.status = Status::Cancelled;
                            ticket.record.attempts = ticket.earlier + 1;
                            ticket.record.resumed_in_flight = ticket.earlier > 0;
                        } else {
                            tally.not_run += 1;
                        }
                        if self.emit(&ticket.record, progress).is_err() {
                            stop = Some(Stop::Output);
                        }
                    }
                },
                signal = recv(signals) => {
                    if interrupted.is_some() {
                        progress.note("psbridge batch: cancelling the running items");
                        running.abort_all();
                    } else {
                        interrupted = Some(signal);
                        grace = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                        progress.note(&format!(
                            "psbridge batch: stopping: waiting for {} running items (interrupt again to cancel them)",
                            running.len()
                        ));
                    }
                }
                () = sleep_until(grace) => {
                    grace = None;
                    let waiting: Vec<&AbortHandle> = tickets.values().filter(|(t, _)| t.began.get().is_none()).map(|(_, h)| h).collect();
                    if !waiting.is_empty() {
                        progress.note(&format!("psbridge batch: {} items found no worker within the shutdown grace; not running them", waiting.len()));
                    }
                    for handle in waiting {
                        handle.abort();
                    }
                }
                _ = ticker.tick() => progress.update(tally),
            }
        }
        (interrupted, stop)
    }

    /// The batch-wide options on an item's command.
    fn options(&self, mut command: Command) -> Command {
        if let Some(timeout) = self.timeout {
            command = command.timeout(timeout);
        }
        if let Some(depth) = self.depth {
            command = command.depth(depth);
        }
        command
    }

    /// Journals and writes one item's result. An item the pool failed because no worker could be started
    /// and connected is `not_run` with the reason (it did not run on this attempt; it gets no finish record,
    /// so a rerun runs it, marked resumed_in_flight when its start was journalled), and stops the batch.
    fn finish(
        &mut self,
        ticket: Ticket,
        outcome: Result<InvocationResult, psbridge::Error>,
        tally: &mut Tally,
        progress: &mut Progress,
    ) -> Result<(), Stop> {
        if let Err(error @ psbridge::Error::WorkersUnavailable { .. }) = &outcome {
            let message = error.to_string();
            self.emit_not_run(ticket.record, Some(&message), tally, progress)?;
            return Err(Stop::Workers(message));
        }
        let Ticket { mut record, identity, earlier, began, .. } = ticket;
        let elapsed = began.get().map_or(Duration::ZERO, Instant::elapsed);
        record.ran(outcome, earlier, elapsed);
        tally.ran += 1;
        if record.status == Status::Succeeded { tally.succeeded += 1 } else { tally.failed += 1 }
        if record.attempts > 1 {
            tally.retried += 1;
        }
        if let Some(journal) = &self.journal
            && let Err(error) = journal.finish(&identity, &record)
        {
            progress.note(&format!("psbridge: {error}"));
        }
        self.emit(&record, progress)?;
        progress.update(tally);
        Ok(())
    }

    /// Writes a result; reports a failure to write.
    fn emit(&mut self, record: &ResultRecord, progress: &Progress) -> Result<(), Stop> {
        self.sink.write(record).map_err(|error| {
            progress.note(&format!("psbridge: cannot write the results: {error}"));
            Stop::Output
        })
    }
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
