//! `psbridge run`: one command or script through one worker.

use std::io::StdoutLock;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use psbridge::{Command, Runspace, RunspaceBuilder, StreamItem};

use crate::exit::{self, CliError};
use crate::output::{self, Envelope, Format, OutputWriter, Selection};
use crate::params::ParamsSource;
use crate::profile::Profile;
use crate::secret::SecretReader;
use crate::signals::Signals;
use crate::Globals;

/// Run one command (or script) through one worker and print what it returns.
///
/// The worker is started and connected as the profile says, runs the command with its parameters bound
/// by name, and is disconnected. Output objects go to stdout; warnings, verbose, information and error
/// records to stderr (or all of them into one JSON object with --envelope). Ctrl-C or SIGTERM stops the
/// command and disconnects; the output printed so far stays whole (a JSON array is closed).
///
/// Exit status: 0 on success, a script's `exit N` as N; `psbridge --help` has the table.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    psbridge run --simulated Get-Mailbox --params '{\"Identity\": \"ContosoUser1\"}'\n  \
    psbridge run --profile contoso Get-Mailbox --params '{\"ResultSize\": 50}' --select Alias,Office --format csv > mailboxes.csv\n  \
    psbridge run --simulated Get-Mailbox --params '{\"ResultSize\": 5}' --format table\n  \
    psbridge run --simulated Set-Mailbox --params '{\"Identity\": \"ContosoUser1\", \"Office\": \"Building 7\", \"WhatIf\": true}' --envelope\n  \
    psbridge run --script 'param($Name) \"Hello, $Name\"' --params '{\"Name\": \"world\"}'\n  \
    psbridge run --script 'param($Text) $Text.Length' --params @big.json\n  \
    jq -c '{Identity: .alias}' user.json | psbridge run --simulated Get-Mailbox --params -\n  \
    psbridge run --module Microsoft.PowerShell.Archive Get-Command --params '{\"Module\": \"Microsoft.PowerShell.Archive\"}' --format jsonl")]
pub struct RunArgs {
    /// The command to run (a cmdlet, function or script path).
    #[arg(value_name = "COMMAND", required_unless_present = "script", conflicts_with = "script")]
    command: Option<String>,

    /// Run this script text instead of a command; --params binds to its param() block.
    #[arg(long, value_name = "TEXT")]
    script: Option<String>,

    /// Parameters as one JSON object, bound by name: {"Identity": "x", "WhatIf": true}; @FILE reads it
    /// from FILE, - from standard input. A key given twice is refused. Values JSON cannot carry use
    /// tags: {"$psbridge": "datetime", "value": "2026-01-31T12:00:00Z"}, "bytes" (base64),
    /// "securestring", "secret".
    #[arg(long, value_name = "JSON|@FILE|-", default_value = "{}")]
    params: String,

    /// Short for --profile simulated (it wins over --profile and PSBRIDGE_PROFILE): the bundled simulated
    /// ExchangeOnlineManagement module and sample tenant (no credentials). The tenant lives in the
    /// per-user data folder, or in EXO_SIM_TENANT.
    #[arg(long)]
    simulated: bool,

    /// How to print the output objects [default: json].
    #[arg(long, value_enum, conflicts_with = "envelope")]
    format: Option<Format>,

    /// Keep only these properties of each output object, in this order (case-insensitive, as
    /// Select-Object; a property an object lacks is null).
    #[arg(long, value_name = "PROP,...", value_delimiter = ',')]
    select: Vec<String>,

    /// Print one JSON object with every stream (output, errors, warnings, verbose, debug, information,
    /// progress), had_errors, exit_code, native_exit_code, state and duration_ms, instead of the output
    /// alone (always JSON: not with --format).
    #[arg(long)]
    envelope: bool,

    /// Serialize output objects this many levels deep; deeper ones arrive as their ToString(), with a
    /// warning [default: the profile's depth, else the library's].
    #[arg(long, value_name = "N")]
    depth: Option<u32>,

    /// No warnings, verbose, debug, information or progress records on stderr, and no notes; error
    /// records are still printed.
    #[arg(long, short)]
    quiet: bool,

    /// Stop the command after this many seconds (the worker is killed if it does not stop)
    /// [default: the profile's command_timeout_secs, else no limit].
    #[arg(long, value_name = "SECONDS", value_parser = crate::parse_seconds)]
    timeout: Option<Duration>,

    /// The pwsh executable (default: PSBRIDGE_PWSH, else pwsh on PATH).
    #[arg(long, value_name = "PATH")]
    pwsh: Option<PathBuf>,

    /// Import this module first (repeatable).
    #[arg(long = "module", value_name = "NAME")]
    modules: Vec<String>,

    /// Put this folder in front of PSModulePath (repeatable).
    #[arg(long = "module-path", value_name = "DIR")]
    module_paths: Vec<PathBuf>,
}

/// Runs the command; every failure, and every exit status but 0, is the returned [`CliError`].
pub async fn run(args: RunArgs, globals: Globals) -> Result<(), CliError> {
    let globals = globals.with_simulated(args.simulated);
    let (_, profile) = globals.profile()?;
    let source = ParamsSource::from_arg(&args.params);
    // Secrets first, so that a secret wanting standard input is refused before --params - reads it.
    let mut secrets = SecretReader::with_stdin_taken(source.uses_stdin().then(|| "--params -".to_owned()));
    let builder = builder_from(&args, &profile, &mut secrets)?;
    // Limits are checked before anything starts.
    let command = command_from(&args, &source)?;
    // Listening only once standard input has been read: until then Ctrl-C ends psbridge as it would any
    // program (a blocking read would not see it). From here a signal during start-up kills the worker.
    let mut signals = Signals::new().map_err(CliError::Runtime)?;
    let mut runspace = tokio::select! {
        opened = builder.open() => opened?,
        signal = signals.recv() => return Err(CliError::Interrupted(signal)),
    };
    let outcome = execute(&mut runspace, &command, &args, &mut signals).await;
    // Disconnect; a (second) signal meanwhile ends it at once: dropping the runspace kills the worker.
    tokio::select! {
        closed = runspace.close() => {
            if let Err(error) = closed {
                tracing::warn!("closing the worker: {error}");
            }
        }
        _ = signals.recv() => {}
    }
    outcome
}

/// The command from the arguments, checked (names, a key twice, depth) as the library will.
fn command_from(args: &RunArgs, source: &ParamsSource) -> Result<Command, CliError> {
    let params = source.read()?;
    let mut command = match (&args.command, &args.script) {
        (_, Some(script)) => Command::script(script.as_str()),
        (Some(name), None) => Command::new(name.as_str()),
        (None, None) => return Err(CliError::usage("give a COMMAND or --script")),
    };
    command = command.params(params);
    if let Some(timeout) = args.timeout {
        command = command.timeout(timeout);
    }
    if let Some(depth) = args.depth {
        command = command.depth(depth);
    }
    command.validate().map_err(|error| match error {
        psbridge::Error::InvalidCommand { reason } => CliError::usage(format_args!("{source}: {reason}")),
        other => CliError::Bridge(other),
    })?;
    Ok(command)
}

fn builder_from(args: &RunArgs, profile: &Profile, secrets: &mut SecretReader) -> Result<RunspaceBuilder, CliError> {
    let mut builder = profile.builder(secrets)?;
    if let Some(pwsh) = &args.pwsh {
        builder = builder.pwsh(pwsh);
    }
    for path in &args.module_paths {
        builder = builder.module_path(path);
    }
    for module in &args.modules {
        builder = builder.module(module.as_str());
    }
    Ok(builder)
}

/// Where the command's items go: output objects to stdout in a format and the rest to stderr, or
/// everything into one envelope.
enum Printer<'a> {
    Streams { writer: OutputWriter<StdoutLock<'a>>, quiet: bool },
    Envelope(Envelope),
}

impl Printer<'_> {
    fn new(args: &RunArgs) -> Self {
        let selection = Selection::new(&args.select);
        if args.envelope {
            Printer::Envelope(Envelope::new(selection))
        } else {
            let format = args.format.unwrap_or(Format::Json);
            Printer::Streams { writer: OutputWriter::new(std::io::stdout().lock(), format, selection, args.quiet), quiet: args.quiet }
        }
    }

    fn push(&mut self, item: StreamItem) -> std::io::Result<()> {
        match (self, item) {
            (Printer::Envelope(envelope), item) => envelope.push(item),
            (Printer::Streams { writer, .. }, StreamItem::Output(object)) => writer.write(object)?,
            (Printer::Streams { quiet, .. }, other) => output::print_stream_item(&other, *quiet),
        }
        Ok(())
    }

    /// Ends the output whole; `None` when the command did not get to its end.
    fn finish(&mut self, completion: Option<psbridge::Completion>) -> std::io::Result<()> {
        match self {
            Printer::Envelope(envelope) => envelope.print(&mut std::io::stdout().lock(), completion),
            Printer::Streams { writer, .. } => writer.finish(),
        }
    }
}

/// Runs the command and prints what it produces, until it ends, fails, or a signal stops it.
async fn execute(runspace: &mut Runspace, command: &Command, args: &RunArgs, signals: &mut Signals) -> Result<(), CliError> {
    let mut printer = Printer::new(args);
    let mut stream = runspace.invoke_stream(command)?;
    let mut errors_seen = false;
    let failure = loop {
        let item = tokio::select! {
            item = stream.next_item() => item,
            signal = signals.recv() => break CliError::Interrupted(signal),
        };
        match item {
            Ok(Some(item)) => {
                errors_seen |= matches!(item, StreamItem::Error(_));
                if let Err(error) = printer.push(item) {
                    // stdout is gone or full: nothing more can be written there, not even the end.
                    return Err(CliError::output(error));
                }
            }
            Ok(None) => {
                let completion = stream.completion().expect("the stream ended");
                printer.finish(Some(completion)).map_err(CliError::output)?;
                return exit::command_outcome(errors_seen, &completion);
            }
            Err(error) => break CliError::Bridge(error),
        }
    };
    // Dropping the stream stops the command in the worker; what was printed is closed off whole. The
    // failure is what is reported, even when the output cannot be finished.
    drop(stream);
    let _ = printer.finish(None);
    Err(failure)
}
