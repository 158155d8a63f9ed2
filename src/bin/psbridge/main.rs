//! `psbridge`: run PowerShell and Exchange Online cmdlets from a shell through a psbridge worker.

mod batch;
mod config;
mod doctor;
mod output;
mod profile;
mod run;
mod secret;
mod simulated;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::Config;
use crate::profile::Profile;
/// Exit status: the command ran and reported no errors.
pub const EXIT_OK: u8 = 0;
/// Exit status: the command reported errors (PowerShell's HadErrors).
pub const EXIT_COMMAND_ERRORS: u8 = 1;
/// Exit status: bad usage or bad input.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the bridge could not start, connect or keep its worker.
pub const EXIT_BRIDGE: u8 = 3;
/// Exit status: interrupted by Ctrl-C (or SIGTERM for `batch`).
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "psbridge",
    version,
    about = "Run PowerShell and Exchange Online cmdlets through long-lived pwsh workers",
    long_about = "Run PowerShell and Exchange Online cmdlets through long-lived pwsh workers.\n\n\
        Parameters are passed as JSON and bound by name (never pasted into script text); results come \
        back as JSON with every PowerShell stream kept apart.",
    after_help = "Examples:\n  \
        psbridge run --profile simulated Get-Mailbox --params '{\"Identity\": \"ContosoUser1\"}'\n  \
        psbridge batch --profile contoso --command Set-Mailbox changes.csv -o results.jsonl\n  \
        psbridge doctor --profile contoso\n  \
        psbridge completions bash > ~/.local/share/bash-completion/completions/psbridge\n\n\
        Profiles: a TOML file (--config, PSBRIDGE_CONFIG, default ~/.config/psbridge/config.toml) names how \
        to start and connect workers; secrets come from environment variables, private files or standard \
        input, never from the file itself. The `simulated` profile is built in.\n\n\
        Exit status: 0 success, 1 the command (or a batch item, or a doctor check) failed, 2 bad usage, \
        input or configuration, 3 the bridge could not start, connect or keep its worker, 130 interrupted.\n\n\
        Logging: RUST_LOG=psbridge=debug shows the workers' lives and their stderr."
)]
struct Cli {
    /// The configuration file [default: ~/.config/psbridge/config.toml, when it exists].
    #[arg(long, global = true, env = config::CONFIG_ENV, value_name = "PATH")]
    config: Option<PathBuf>,

    /// The profile to use [default: the file's default_profile, else plain pwsh]. `simulated` is
    /// built in: the bundled simulated ExchangeOnlineManagement module and a sample tenant.
    #[arg(long, global = true, env = config::PROFILE_ENV, value_name = "NAME")]
    profile: Option<String>,

    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    Run(run::RunArgs),
    Batch(batch::BatchArgs),
    Doctor(doctor::DoctorArgs),
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
    pub profile: Option<String>,
}

impl Globals {
    /// These options with `--simulated` (short for `--profile simulated`) applied: it wins over
    /// `--profile` and PSBRIDGE_PROFILE, so that a profile set in the environment does not get in the way
    /// of a quick try against the simulation.
    pub fn with_simulated(mut self, simulated: bool) -> Globals {
        if simulated {
            self.profile = Some(config::SIMULATED.to_owned());
        }
        self
    }

    /// The configuration and the chosen profile; on failure, prints why and returns the exit status.
    pub fn profile(&self) -> Result<(Config, Profile), u8> {
        let config = Config::load(self.config.as_deref()).map_err(|error| {
            eprintln!("psbridge: {error}");
            EXIT_USAGE
        })?;
        let profile = Profile::find(&config, self.profile.as_deref()).map_err(|error| {
            eprintln!("psbridge: {error}");
            EXIT_USAGE
        })?;
        Ok((config, profile))
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("psbridge: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_BRIDGE);
        }
    };
    let globals = Globals { config: cli.config, profile: cli.profile };
    let code = runtime.block_on(async {
        match cli.command {
            Commands::Run(args) => run::run(args, globals).await,
            Commands::Batch(args) => batch::run(args, globals).await,
            Commands::Doctor(args) => doctor::run(args, globals).await,
            Commands::Completions { shell } => print_generated(|out| {
                clap_complete::generate(shell, &mut Cli::command(), "psbridge", out);
                Ok(())
            }),
            Commands::Man => print_generated(|out| clap_mangen::Man::new(Cli::command()).render(out)),
        }
    });
    ExitCode::from(code)
}

/// `seconds` as a duration, when it is a positive, finite number.
pub fn positive_duration(seconds: f64) -> Option<Duration> {
    (seconds.is_finite() && seconds > 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// Parses an option given in seconds (`--timeout 1.5`).
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .and_then(positive_duration)
        .ok_or_else(|| format!("must be a positive number of seconds, not {text}"))
}

/// Prints a generated text (completions, manual page) on stdout.
fn print_generated(write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> u8 {
    let mut out = std::io::stdout().lock();
    match write(&mut out).and_then(|()| out.flush()) {
        Ok(()) => EXIT_OK,
        Err(error) => {
            eprintln!("psbridge: cannot write: {error}");
            EXIT_BRIDGE
        }
    }
}
