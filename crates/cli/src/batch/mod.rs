//! `psbridge batch`: many commands from a JSONL or CSV file through a pool of workers, one result per
//! input item, resumable through a journal.

pub mod input;
mod journal;
mod jsonl;
pub mod progress;
pub mod record;
pub mod remote;
mod sink;
mod source;
mod table;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use psbridge::{Command, InvocationResult, PoolBuilder, RunspacePool};
use serde::{Deserialize, Serialize};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::secret::SecretReader;
use crate::exit::{CliError, EXIT_OUTPUT, Interrupt};
use crate::signals::Signals;
use crate::{EXIT_BRIDGE, EXIT_COMMAND_ERRORS, EXIT_OK, EXIT_USAGE, Globals};
use input::{Entries, Entry, Format, Item};
pub use journal::JournalError;
use journal::{Journal, Previous, SharedJournal};
pub use progress::Progress;
use progress::Tally;
pub use input::bind as bind_parameter;
pub use record::{ResultRecord, Status};
use record::bridge_error;
pub use sink::ResultSink;
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
    psbridge batch --profile contoso --queue nats://nats.example.com:4222 new-mailboxes.jsonl -o created.jsonl   # on serve --queue hosts\n  \
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
    pub input: PathBuf,

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
    pub output: Option<PathBuf>,

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
    pub quiet: bool,

    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = crate::parse_seconds)]
    pub progress_interval: Duration,

    #[command(flatten)]
    remote: crate::client::ServerArgs,

    /// With --server: the batch's name on the server, whose journal it keeps (running the batch again with
    /// the same id resumes it); with --queue, its name in the queue [default: derived from the input's
    /// path, the output's and the profile].
    #[arg(long, value_name = "ID")]
    pub batch_id: Option<String>,

    /// Do not run the items here: publish them to the NATS JetStream server at URL (nats://HOST:PORT, or
    /// tls://HOST:PORT for TLS) for the `psbridge serve --queue` hosts that serve the profile, and show
    /// their results as they come. Run again with the same arguments to re-attach: finished items are not
    /// published again and come back with previous_run: true. Credentials: the configuration's [queue]
    /// section.
    #[arg(long, value_name = "URL", conflicts_with_all = ["server", "workers", "journal", "no_journal", "restart", "retry_failed"])]
    pub queue: Option<String>,

    /// With --queue: publish the items, print the batch id and return; follow with `psbridge queue
    /// status|results|cancel`, or re-attach by running the same command without --detach.
    #[arg(long, requires = "queue")]
    pub detach: bool,
}

impl BatchArgs {
    /// The options the batch runs with, as a server takes them too.
    pub fn options(&self) -> BatchOptions {
        BatchOptions {
            input_format: self.input_format,
            command: self.command.clone(),
            key_column: self.key_column.clone(),
            delimiter: self.delimiter,
            max_line_bytes: self.max_line_bytes,
            timeout_secs: self.timeout.map(|t| t.as_secs_f64()),
            depth: self.depth,
            restart: self.restart,
            resume: self.resume,
            retry_failed: self.retry_failed,
            no_journal: self.no_journal,
        }
    }
}

/// What a batch reads and how it runs its items: the options a local batch and a server's batch share
/// (`batch --server` sends them as the query of `POST /v1/profiles/{profile}/batches`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BatchOptions {
    /// `jsonl` or `csv` [default: csv for a .csv file, else jsonl].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_format: Option<InputFormat>,
    /// CSV: the command every row runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// CSV: the column whose value is the item's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_column: Option<String>,
    /// CSV: the cell separator [default: ,].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<char>,
    /// The longest input line, in bytes [default: 64M].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_line_bytes: Option<usize>,
    /// Stop an item after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<f64>,
    /// How deep output objects are serialized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    /// Forget the journal and run every item again.
    #[serde(default)]
    pub restart: bool,
    /// Resume even though the journal was written for another input.
    #[serde(default)]
    pub resume: bool,
    /// Run again the items the journal holds as failed.
    #[serde(default)]
    pub retry_failed: bool,
    /// Keep no journal.
    #[serde(default)]
    pub no_journal: bool,
}

/// A batch's input, opened: its entries one at a time, and what progress and the journal (or a queue's
/// batch record) know of it.
pub struct Input {
    pub entries: Entries,
    /// Input entries, estimated, for the progress display.
    pub total: usize,
    /// The SHA-256 of the input's bytes.
    pub sha256: String,
}

impl BatchOptions {
    /// Refuses the CSV options for JSONL input, and CSV input (`input` named .csv, or --input-format
    /// csv) without --command.
    pub fn check_format(&self, input: &Path) -> Result<(), String> {
        let csv = match self.input_format {
            Some(format) => format == InputFormat::Csv,
            None => input.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")),
        };
        if csv && self.command.is_none() {
            return Err("CSV input needs --command, the command each row runs (for example --command Set-Mailbox)".to_owned());
        }
        if !csv && (self.command.is_some() || self.key_column.is_some() || self.delimiter.is_some()) {
            return Err("--command, --key-column and --delimiter are for CSV input; JSONL items carry their own command and key \
                 (use --input-format csv if the file is CSV)"
                .to_owned());
        }
        Ok(())
    }

    /// Opens `input` (hashing and counting it first): CSV with --command, else JSONL.
    pub fn open_input(&self, input: &Path) -> Result<Input, String> {
        let max_line_bytes = self.max_line_bytes.unwrap_or(DEFAULT_MAX_LINE_BYTES);
        let mut source = Source::open(input).map_err(|e| e.to_string())?;
        let sha256 = source.sha256().map_err(|e| e.to_string())?;
        let lines_total = source.count_lines(max_line_bytes).map_err(|e| e.to_string())?;
        let mut lines = source.lines(max_line_bytes).map_err(|e| e.to_string())?;
        let (format, total): (Box<dyn Format + Send + Sync>, usize) = if let Some(command) = &self.command {
            let table_options = table::TableOptions {
                command: command.clone(),
                key_column: self.key_column.clone(),
                delimiter: self.delimiter.unwrap_or(','),
                max_bytes: max_line_bytes,
            };
            (Box::new(table::Table::new(&mut lines, table_options).map_err(|e| e.to_string())?), lines_total.saturating_sub(1))
        } else {
            (Box::<jsonl::Jsonl>::default(), lines_total)
        };
        Ok(Input { entries: Entries::new(lines, format), total, sha256 })
    }
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

/// `--max-line-bytes` (and `serve --max-body-bytes`): a number of bytes, with an optional K, M or G
/// (KiB, MiB, GiB).
pub fn parse_bytes(text: &str) -> Result<usize, String> {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    Jsonl,
    Csv,
}

/// Usage problems found before anything runs: printed, and exit status 2.
pub fn usage(message: impl std::fmt::Display) -> u8 {
    eprintln!("psbridge: {message}");
    EXIT_USAGE
}

pub async fn run(args: BatchArgs, globals: Globals) -> u8 {
    let globals = globals.with_simulated(args.simulated);
    if args.queue.is_some() {
        return crate::queue::submit::run(&args, &globals).await;
    }
    if args.batch_id.is_some() && args.remote.server.is_none() {
        return usage("--batch-id names a batch on a server (--server) or in a queue (--queue)");
    }
    if args.remote.server.is_some() {
        return remote::run(args, globals).await;
    }
    match Batch::prepare(&args, &globals) {
        Ok(batch) => {
            let progress = Progress::new(batch.total, args.quiet, args.progress_interval);
            let signals = match Signals::new() {
                Ok(signals) => Some(signals),
                Err(error) => {
                    progress.note(&format!("psbridge: cannot listen for Ctrl-C and SIGTERM: {error}"));
                    None
                }
            };
            batch.execute(progress, Interrupts::Signals(signals)).await
        }
        Err(code) => code,
    }
}

/// What interrupts a batch: Ctrl-C and SIGTERM here, or a server's shutdown.
pub enum Interrupts {
    /// The signals (`None` when they could not be listened for).
    Signals(Option<Signals>),
    /// A server's shutdown: once, as a SIGTERM would (the server's pools cancel what then still runs).
    Shutdown(Option<CancellationToken>),
}

impl Interrupts {
    /// The next interrupt; never, when there is none to come. Cancel safe.
    async fn recv(&mut self) -> Interrupt {
        match self {
            Interrupts::Signals(Some(signals)) => signals.recv().await,
            Interrupts::Shutdown(token @ Some(_)) => {
                token.as_ref().expect("matched Some").cancelled().await;
                *token = None;
                Interrupt::Terminate
            }
            Interrupts::Signals(None) | Interrupts::Shutdown(None) => std::future::pending().await,
        }
    }
}

/// Where a batch's workers come from.
pub enum Workers {
    /// A pool of its own, opened for the batch (as many workers as items, at most `--workers`) and closed
    /// at its end.
    Own(Box<PoolBuilder>),
    /// A pool shared with others (a server's), left open.
    Shared(RunspacePool),
}

/// Where a batch's results go.
pub enum Destination {
    /// Standard output, or this file (written through FILE.partial).
    Local(Option<PathBuf>),
    /// A server's response stream.
    Stream(tokio::sync::mpsc::UnboundedSender<crate::serve::wire::BatchLine>),
}

/// What a batch is made of, besides its input's content.
pub struct Setup<'a> {
    /// The input file (`-`: standard input).
    pub input: &'a Path,
    /// The input's name in the journal.
    pub input_name: String,
    pub options: &'a BatchOptions,
    /// The journal, if the batch keeps one.
    pub journal: Option<PathBuf>,
    pub destination: Destination,
    pub workers: Workers,
    /// Workers (processes) the batch may use.
    pub size: usize,
    /// Runspaces per worker: up to `size x runspaces` items run at once.
    pub runspaces: usize,
    /// Whether the pool adapts its concurrency to throttling (the progress line then shows its limit).
    pub adaptive: bool,
    /// Which commands may run, when not all.
    pub allowed: Option<Allowed>,
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
pub struct Batch {
    entries: Entries,
    /// Input entries, estimated, for the progress display.
    pub total: usize,
    /// The profile's pool, or the pool to share (secrets already read: a missing secret stops the batch
    /// before it starts).
    pool: Workers,
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
    /// Notes found while preparing, shown when the batch begins.
    notes: Vec<String>,
    /// Which commands may run (a server's rules), when not all.
    allowed: Option<Allowed>,
}

/// A server's rules: `Err(rule)` for a command that may not run.
pub type Allowed = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// A batch that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The journal cannot be used (in use by another batch, damaged, another input's).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Anything else; the message says what to do.
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for BatchError {
    fn from(message: String) -> BatchError {
        BatchError::Invalid(message)
    }
}

impl Batch {
    /// A local batch: the profile's pool, the journal beside `--output` (or `--journal`), results to
    /// stdout or `--output`.
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
        let pool = profile
            .pool_builder(profile.builder(&mut secrets).map_err(usage)?)
            .runspaces_per_worker(runspaces)
            .adaptive_concurrency(adaptive);
        let options = args.options();
        let setup = Setup {
            input: &args.input,
            input_name: args.input.display().to_string(),
            options: &options,
            journal: journal_path,
            destination: Destination::Local(args.output.clone()),
            workers: Workers::Own(Box::new(pool)),
            size: workers,
            runspaces,
            adaptive,
            allowed: None,
        };
        let mut batch = Batch::assemble(setup).map_err(usage)?;
        if batch.journal.is_none() && !args.no_journal {
            batch.notes.push("psbridge: note: no journal (results go to stdout); give --journal FILE to make this batch resumable".to_owned());
        }
        Ok(batch)
    }

    /// A batch of `setup.input`, checked (a CSV input needs its command, ...), its journal opened and
    /// read, its destination opened. The message of an error says what to do.
    pub fn assemble(setup: Setup<'_>) -> Result<Batch, BatchError> {
        let Setup { input, input_name, options, journal: journal_path, destination, workers: pool, size, runspaces, adaptive, allowed } = setup;
        options.check_format(input)?;
        let timeout = match options.timeout_secs {
            Some(seconds) => Some(crate::positive_duration(seconds).ok_or_else(|| format!("--timeout must be {}", crate::SECONDS_RANGE))?),
            None => None,
        };
        let Input { entries, total, sha256 } = options.open_input(input)?;
        let mut notes = Vec::new();
        let (journal, previous) = match &journal_path {
            Some(path) => {
                let (mut journal, previous) = Journal::open(path, &input_name, &sha256, options.restart)?;
                if let Some(earlier) = &previous.input_sha256
                    && *earlier != sha256
                {
                    let earlier_input = previous.input.as_deref().unwrap_or("another input");
                    if !options.resume {
                        return Err(BatchError::Invalid(format!(
                            "the journal {} belongs to another input: it was written for {earlier_input}, and {input_name} {}. \
                             Give --restart to forget the journal and run every item, or --resume to go on with this input \
                             (items are matched by their content; those that finished are skipped)",
                            path.display(),
                            if earlier_input == input_name { "has changed since" } else { "is not that file, or has other content" },
                        )));
                    }
                    journal.belongs_to(&input_name, &sha256)?;
                    notes.push(format!(
                        "psbridge: note: resuming with a changed input (the journal was written for {earlier_input}); \
                         items that finished there are skipped here too"
                    ));
                }
                (Some(SharedJournal::new(journal)), previous)
            }
            None => (None, Previous::default()),
        };
        let sink = match destination {
            Destination::Local(path) => ResultSink::open(path.as_deref())?,
            Destination::Stream(lines) => ResultSink::Stream(lines),
        };
        Ok(Batch {
            entries,
            total,
            pool,
            workers: size,
            runspaces,
            adaptive,
            timeout,
            depth: options.depth,
            retry_failed: options.retry_failed,
            journal,
            previous,
            sink,
            notes,
            allowed,
        })
    }

    /// Runs the batch to its end (or until `interrupts` stops it) and returns its exit status, as
    /// `psbridge batch` exits with it.
    pub async fn execute(mut self, mut progress: Progress, mut interrupts: Interrupts) -> u8 {
        let mut tally = Tally::default();
        for note in std::mem::take(&mut self.notes) {
            progress.note(&note);
        }
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
        if !ready.is_empty() && stop.is_none() {
            match self.start_pool(ready.len().div_ceil(self.runspaces), &mut interrupts, &mut interrupted).await {
                Ok((pool, own)) => {
                    progress.begin(&tally); // the rate counts from here, not from the workers' start-up
                    let (was_interrupted, stopped) =
                        self.dispatch(&pool, &mut ready, &mut tally, &mut progress, &mut interrupts, interrupted).await;
                    interrupted = was_interrupted;
                    stop = stopped;
                    if own {
                        pool.close().await;
                    }
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
                progress.error(&format!("psbridge: {message}; the items that did not run are reported not_run"));
                code = EXIT_BRIDGE;
            }
            Some(Stop::Input(error)) => {
                progress.error(&format!("psbridge: {error}; the items after it did not run"));
                code = EXIT_USAGE;
            }
            Some(Stop::Journal) => code = EXIT_BRIDGE,
            None => {}
        }
        if let Err(error) = self.sink.finish() {
            progress.error(&format!("psbridge: cannot write the results: {error}"));
            return EXIT_OUTPUT;
        }
        progress.note(&summary(&tally, &progress));
        if let Some(signal) = interrupted {
            if self.journal.is_some() {
                progress.note("psbridge batch: interrupted; run the same command again to resume");
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
                    let Item { line, input, name, command, key, id, identity, .. } = *item;
                    if let Some(refusal) = self.allowed.as_ref().and_then(|allowed| allowed(&name).err()) {
                        // The server's rules do not let this command run: like a line that cannot run.
                        tally.failed += 1;
                        tally.invalid += 1;
                        let mut record = ResultRecord::new(line, input, Status::Invalid);
                        (record.id, record.key, record.command) = (id, key, Some(name));
                        record.errors = vec![bridge_error("psbridge.refused", format!("line {line}: refused: {refusal}"))];
                        self.emit(&record, progress)?;
                        continue;
                    }
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
    ///
    /// A shared pool is there already. Returns the pool and whether it is the batch's own.
    async fn start_pool(
        &self,
        workers: usize,
        interrupts: &mut Interrupts,
        interrupted: &mut Option<Interrupt>,
    ) -> Result<(RunspacePool, bool), String> {
        let builder = match &self.pool {
            Workers::Shared(pool) => return Ok((pool.clone(), false)),
            Workers::Own(builder) => builder,
        };
        let open = async { Self::open_pool(builder, workers).await.map(|pool| (pool, true)) };
        tokio::pin!(open);
        let signal = tokio::select! {
            opened = &mut open => return opened,
            signal = interrupts.recv() => signal,
        };
        *interrupted = Some(signal);
        match tokio::time::timeout(SHUTDOWN_GRACE, open).await {
            Ok(opened) => opened,
            Err(_) => Err(format!("the workers did not start within {} s after the signal", SHUTDOWN_GRACE.as_secs())),
        }
    }

    async fn open_pool(builder: &PoolBuilder, workers: usize) -> Result<RunspacePool, String> {
        // Bounded: connect failures fail every queued item with the cause within seconds (connect_attempts).
        builder
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
        interrupts: &mut Interrupts,
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
                signal = interrupts.recv() => {
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
        if matches!(outcome, Err(psbridge::Error::PoolClosed)) && ticket.began.get().is_none() {
            // A shared pool closed (its server stops) before a worker began the item: it did not run, and
            // gets no finish record, so that running the batch again runs it.
            return self.emit_not_run(ticket.record, Some("the pool closed before the item began"), tally, progress);
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

/// The line that ends a batch: what happened to its items, and how fast.
pub fn summary(tally: &Tally, progress: &Progress) -> String {
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
    if tally.duplicates > 0 {
        text += &format!(", {} duplicate attempts (finished again after another host recorded them)", tally.duplicates);
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
