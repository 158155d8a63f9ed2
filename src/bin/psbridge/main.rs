//! `psbridge`: run PowerShell and Exchange Online cmdlets from a shell through a psbridge worker.

mod output;
mod run;
mod simulated;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status: the command ran and reported no errors.
pub const EXIT_OK: u8 = 0;
/// Exit status: the command reported errors (PowerShell's HadErrors).
pub const EXIT_COMMAND_ERRORS: u8 = 1;
/// Exit status: bad usage or bad input.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the bridge could not start, connect or keep its worker.
pub const EXIT_BRIDGE: u8 = 3;
/// Exit status: interrupted by Ctrl-C.
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "psbridge",
    version,
    about = "Run PowerShell and Exchange Online cmdlets through long-lived pwsh workers",
    long_about = "Run PowerShell and Exchange Online cmdlets through long-lived pwsh workers.\n\n\
        Parameters are passed as JSON and bound by name (never pasted into script text); results come \
        back as JSON with every PowerShell stream kept apart.",
    after_help = "Exit status: 0 success, 1 the command reported errors, 2 bad usage or input, \
        3 the bridge could not start, connect or keep its worker, 130 interrupted.\n\n\
        Logging: RUST_LOG=psbridge=debug shows the worker's life and its stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    Run(run::RunArgs),
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
    let code = runtime.block_on(async {
        match cli.command {
            Commands::Run(args) => run::run(args).await,
        }
    });
    ExitCode::from(code)
}
