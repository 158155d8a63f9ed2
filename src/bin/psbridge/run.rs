//! `psbridge run`: one command or script through one worker.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use psbridge::{Command, Runspace, RunspaceBuilder, StreamItem};

use crate::output::{self, Envelope, OutputWriter, Selection};
use crate::secret::SecretReader;
use crate::{EXIT_BRIDGE, EXIT_COMMAND_ERRORS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Globals};

/// Run one command (or script) through one worker and print what it returns.
///
/// The worker is started and connected as the profile says, runs the command with its parameters bound
/// by name, and is disconnected. Output objects go to stdout; warnings, verbose, information and error
/// records to stderr (or all of them into one JSON object with --envelope).
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    psbridge run --simulated Get-Mailbox --params '{\"Identity\": \"ContosoUser1\"}'\n  \
    psbridge run --profile contoso Get-Mailbox --params '{\"ResultSize\": 50}' --select Alias,Office --format csv > mailboxes.csv\n  \
    psbridge run --simulated Get-Mailbox --params '{\"ResultSize\": 5}' --format table\n  \
    psbridge run --simulated Set-Mailbox --params '{\"Identity\": \"ContosoUser1\", \"Office\": \"Building 7\", \"WhatIf\": true}' --envelope\n  \
    psbridge run --script 'param($Name) \"Hello, $Name\"' --params '{\"Name\": \"world\"}'\n  \
    psbridge run --module Microsoft.PowerShell.Archive Get-Command --params '{\"Module\": \"Microsoft.PowerShell.Archive\"}' --format jsonl")]
pub struct RunArgs {
    /// The command to run (a cmdlet, function or script path).
    #[arg(value_name = "COMMAND", required_unless_present = "script", conflicts_with = "script")]
    command: Option<String>,

    /// Run this script text instead of a command; --params binds to its param() block.
    #[arg(long, value_name = "TEXT")]
    script: Option<String>,

    /// Parameters as one JSON object, bound by name: {"Identity": "x", "WhatIf": true}.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    params: String,

    /// Short for --profile simulated (it wins over --profile and PSBRIDGE_PROFILE): the bundled simulated
    /// ExchangeOnlineManagement module and sample tenant (no credentials). The tenant lives in the
    /// per-user data folder, or in EXO_SIM_TENANT.
    #[arg(long)]
    simulated: bool,

    /// How to print the output objects.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,

    /// Keep only these properties of each output object, in this order (case-insensitive, as
    /// Select-Object; a property an object lacks is null).
    #[arg(long, value_name = "PROP,...", value_delimiter = ',')]
    select: Vec<String>,

    /// Print one JSON object with every stream (output, errors, warnings, verbose, debug, information,
    /// progress) and had_errors, instead of the output alone.
    #[arg(long)]
    envelope: bool,

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

/// Output formats of `run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON array.
    Json,
    /// One JSON value per line.
    Jsonl,
    /// A readable table.
    Table,
    /// CSV with a header row (columns from --select, else the first object's properties; nested values
    /// as JSON).
    Csv,
}

pub async fn run(args: RunArgs, globals: Globals) -> u8 {
    let globals = globals.with_simulated(args.simulated);
    let command = match command_from(&args) {
        Ok(command) => command,
        Err(error) => {
            eprintln!("psbridge: {error:#}");
            return EXIT_USAGE;
        }
    };
    let builder = match builder_from(&args, &globals) {
        Ok(builder) => builder,
        Err(code) => return code,
    };
    let mut runspace = match builder.open().await {
        Ok(runspace) => runspace,
        Err(error) => {
            output::print_bridge_error(&error);
            return EXIT_BRIDGE;
        }
    };
    let code = tokio::select! {
        code = execute(&mut runspace, &command, &args) => code,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("psbridge: interrupted; stopping the command");
            EXIT_INTERRUPTED
        }
    };
    // The select dropped the command's future if Ctrl-C won: that stops it in the worker.
    if let Err(error) = runspace.close().await {
        tracing::warn!("closing the worker: {error}");
    }
    code
}

fn command_from(args: &RunArgs) -> anyhow::Result<Command> {
    let params: serde_json::Value = serde_json::from_str(&args.params)
        .with_context(|| format!("--params is not valid JSON: {}", args.params))?;
    let serde_json::Value::Object(params) = params else {
        bail!("--params must be a JSON object such as {{\"Identity\": \"ContosoUser1\"}}, not {params}");
    };
    let mut command = match (&args.command, &args.script) {
        (_, Some(script)) => Command::script(script.as_str()),
        (Some(name), None) => Command::new(name.as_str()),
        (None, None) => bail!("give a COMMAND or --script"),
    };
    command = command.params(params);
    if let Some(timeout) = args.timeout {
        command = command.timeout(timeout);
    }
    Ok(command)
}

fn builder_from(args: &RunArgs, globals: &Globals) -> Result<RunspaceBuilder, u8> {
    let (_, profile) = globals.profile()?;
    let mut builder = profile.builder(&mut SecretReader::default()).map_err(|error| {
        eprintln!("psbridge: {error}");
        EXIT_USAGE
    })?;
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

async fn execute(runspace: &mut Runspace, command: &Command, args: &RunArgs) -> u8 {
    let stdout = std::io::stdout();
    let selection = Selection::new(&args.select);
    let mut writer = OutputWriter::new(stdout.lock(), args.format, selection.clone());
    let mut envelope = Envelope::new(selection);
    let mut stream = match runspace.invoke_stream(command) {
        Ok(stream) => stream,
        Err(error) => {
            output::print_bridge_error(&error);
            return EXIT_BRIDGE;
        }
    };
    let mut errors_seen = false;
    loop {
        let item = stream.next_item().await;
        errors_seen |= matches!(item, Ok(Some(StreamItem::Error(_))));
        match item {
            Ok(Some(item)) if args.envelope => envelope.push(item),
            Ok(Some(StreamItem::Output(object))) => {
                if let Err(error) = writer.write(object) {
                    eprintln!("psbridge: cannot write output: {error}");
                    return EXIT_BRIDGE;
                }
            }
            Ok(Some(other)) => output::print_stream_item(&other),
            Ok(None) => break,
            Err(error) => {
                let _ = writer.finish();
                output::print_bridge_error(&error);
                return EXIT_BRIDGE;
            }
        }
    }
    let completion = stream.completion().expect("the stream ended");
    let written = if args.envelope { envelope.print(completion) } else { writer.finish() };
    if let Err(error) = written.and_then(|()| std::io::stdout().flush()) {
        eprintln!("psbridge: cannot write output: {error}");
        return EXIT_BRIDGE;
    }
    if errors_seen || !completion.ended_well() { EXIT_COMMAND_ERRORS } else { EXIT_OK }
}
