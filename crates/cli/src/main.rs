//! `psbridge`: run PowerShell and Exchange Online cmdlets from a shell through a psbridge worker.

mod batch;
mod client;
mod config;
mod connector;
mod doctor;
mod exit;
mod output;
mod params;
mod profile;
mod queue;
mod run;
mod secret;
mod serve;
mod signals;
mod simulated;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::Config;
use crate::exit::CliError;
pub use crate::exit::{EXIT_BRIDGE, EXIT_COMMAND_ERRORS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE};
use crate::profile::Profile;

#[derive(Debug, Parser)]
#[command(
    name = "psbridge",
    version,
    about = "Run PowerShell and Exchange Online cmdlets through long-lived pwsh workers",
    long_about = "Run PowerShell and Exchange Online cmdlets through long-lived pwsh workers.\n\n\
        Parameters are passed as JSON and bound by name (never pasted into script text); results come \
        back as JSON with every PowerShell stream kept apart.",
    after_help = after_help()
)]
struct Cli {
    /// The configuration file [default: ~/.config/psbridge/config.toml, when it exists].
    #[arg(long, global = true, env = config::CONFIG_ENV, value_name = "PATH")]
    config: Option<PathBuf>,

    /// The profile to use [default: the file's default_profile, else plain pwsh]. `simulated` is
    /// built in: the bundled simulated ExchangeOnlineManagement module and a sample tenant. `serve`
    /// takes it more than once, one pool per profile.
    #[arg(long, global = true, env = config::PROFILE_ENV, value_name = "NAME", action = clap::ArgAction::Append)]
    profile: Vec<String>,

    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    Run(run::RunArgs),
    Batch(batch::BatchArgs),
    Doctor(doctor::DoctorArgs),
    Serve(serve::ServeArgs),
    /// Look at a running psbridge server.
    #[command(subcommand)]
    Server(client::ServerCommand),
    Queue(queue::command::QueueArgs),
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  \
        psbridge completions bash > ~/.local/share/bash-completion/completions/psbridge\n  \
        psbridge completions zsh > ~/.zfunc/_psbridge\n  \
        psbridge completions fish > ~/.config/fish/completions/psbridge.fish")]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff).
    #[command(after_help = "Example:\n  psbridge man > /usr/local/share/man/man1/psbridge.1")]
    Man,
}

/// The options every subcommand shares.
#[derive(Debug, Clone)]
pub struct Globals {
    pub config: Option<PathBuf>,
    /// Every `--profile` given (`serve` takes several, the others one).
    pub profiles: Vec<String>,
}

impl Globals {
    /// These options with `--simulated` (short for `--profile simulated`) applied: it wins over
    /// `--profile` and PSBRIDGE_PROFILE, so that a profile set in the environment does not get in the way
    /// of a quick try against the simulation.
    pub fn with_simulated(mut self, simulated: bool) -> Globals {
        if simulated {
            self.profiles = vec![config::SIMULATED.to_owned()];
        }
        self
    }

    /// The one profile asked for, if any (only `serve` takes several).
    pub fn profile_name(&self) -> Result<Option<&str>, CliError> {
        match self.profiles.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            _ => Err(CliError::usage("--profile is given more than once; only `serve` serves several profiles")),
        }
    }

    /// The configuration and the chosen profile.
    pub fn profile(&self) -> Result<(Config, Profile), CliError> {
        let config = Config::load(self.config.as_deref())?;
        let profile = Profile::find(&config, self.profile_name()?)?;
        Ok((config, profile))
    }
}

/// The top-level help's closing text: examples, profiles, exit statuses ([`exit::STATUS_TABLE`]).
fn after_help() -> String {
    format!(
        "Examples:\n  \
        psbridge run --profile simulated Get-Mailbox --params '{{\"Identity\": \"ContosoUser1\"}}'\n  \
        psbridge batch --profile contoso --command Set-Mailbox changes.csv -o results.jsonl\n  \
        psbridge doctor --profile contoso\n  \
        psbridge completions bash > ~/.local/share/bash-completion/completions/psbridge\n\n\
        Profiles: a TOML file (--config, PSBRIDGE_CONFIG, default ~/.config/psbridge/config.toml) names how \
        to start and connect workers; secrets come from environment variables, private files or standard \
        input, never from the file itself. The `simulated` profile is built in.\n\n\
        Exit status:\n{}\n\n\
        Logging: RUST_LOG=psbridge=debug shows the workers' lives and their stderr.",
        exit::status_table()
    )
}

fn main() -> ExitCode {
    match start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error.report();
            ExitCode::from(error.exit_code())
        }
    }
}

/// Parses the command line and runs the subcommand; every failure comes back here as one [`CliError`].
fn start() -> Result<(), CliError> {
    let cli = Cli::try_parse()?;
    // The server says what it does (info); the other subcommands only what went wrong.
    let (default_filter, json) = match &cli.command {
        Commands::Serve(args) => ("warn,psbridge=info", args.log_format == serve::LogFormat::Json),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(CliError::Runtime)?;
    let globals = Globals { config: cli.config, profiles: cli.profile };
    runtime.block_on(async {
        match cli.command {
            Commands::Run(args) => run::run(args, globals).await,
            Commands::Batch(args) => exit::from_status(batch::run(args, globals).await),
            Commands::Doctor(args) => doctor::run(args, globals).await,
            Commands::Serve(args) => serve::run(args, globals).await,
            Commands::Server(command) => client::run(command, globals).await,
            Commands::Queue(args) => queue::command::run(args, globals).await,
            Commands::Completions { shell } => print_generated(|out| {
                clap_complete::generate(shell, &mut Cli::command(), "psbridge", out);
                Ok(())
            }),
            Commands::Man => print_generated(|out| clap_mangen::Man::new(Cli::command()).render(out)),
        }
    })
}

/// The longest time an option or profile key in seconds may give: a year. Longer is surely a mistake
/// (and beyond what a deadline can hold).
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// The accepted range of seconds, in words.
pub const SECONDS_RANGE: &str = "a number of seconds above 0 and at most 31536000 (a year)";

/// `seconds` as a duration, when it is above 0 and at most [`MAX_SECONDS`].
pub fn positive_duration(seconds: f64) -> Option<Duration> {
    (seconds > 0.0 && seconds <= MAX_SECONDS).then(|| Duration::from_secs_f64(seconds))
}

/// Parses an option given in seconds (`--timeout 1.5`).
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.trim().parse::<f64>().ok().and_then(positive_duration).ok_or_else(|| format!("must be {SECONDS_RANGE}, not {text}"))
}

/// Prints a generated text (completions, manual page) on stdout.
fn print_generated(write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    write(&mut out).and_then(|()| out.flush()).map_err(CliError::output)
}
