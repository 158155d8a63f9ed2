//! How `psbridge` ends: every exit status other than 0 comes from one [`CliError`], whose
//! [`exit_code`](CliError::exit_code) is the one mapping from what went wrong to a number, and which
//! `main` prints once ([`CliError::report`]). [`STATUS_TABLE`] is the same mapping in words, for
//! `--help` and the README.

use std::fmt;
use std::io::{self, Write};

use psbridge::{Completion, ErrorRecord, PipelineState};

use crate::config::ConfigError;
use crate::profile::ProfileError;

/// Exit status: the command ran and succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit status: the command wrote an error record or did not run to the end (or a batch item, or a
/// doctor check, failed).
pub const EXIT_COMMAND_ERRORS: u8 = 1;
/// Exit status: bad usage, input or configuration.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: a worker could not be started, connected or kept.
pub const EXIT_BRIDGE: u8 = 3;
/// Exit status: the system refused psbridge something it needs to run at all (sysexits' EX_OSERR).
pub const EXIT_OS: u8 = 71;
/// Exit status: the output could not be written (sysexits' EX_IOERR), for example a full disk.
pub const EXIT_OUTPUT: u8 = 74;
/// Exit status: the command ran longer than its timeout (as timeout(1) reports it).
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit status: interrupted by Ctrl-C (128 + SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit status: the reader of stdout went away (128 + SIGPIPE), as `psbridge run ... | head -1`.
pub const EXIT_BROKEN_PIPE: u8 = 141;
/// Exit status: ended by SIGTERM (128 + SIGTERM).
pub const EXIT_TERMINATED: u8 = 143;

/// Every exit status in words: the table `--help` shows and the README repeats (a test keeps them the
/// same).
pub const STATUS_TABLE: &[(&str, &str)] = &[
    ("0", "success (a script's `exit 0` too)"),
    ("1", "the command wrote an error record or did not finish; a batch item or doctor check failed"),
    ("2", "bad usage, input or configuration (a missing module included)"),
    ("3", "a worker could not be started, connected or kept (or a psbridge server reached)"),
    ("N", "`run`: a script's `exit N`, as the system reports it (N & 0xFF: `exit 256` is 0)"),
    ("71", "the system refused a resource psbridge needs (threads, the async runtime)"),
    ("74", "the output could not be written (full disk, closed file), one message on stderr"),
    ("124", "the command timed out (the message says whether the worker was kept or replaced)"),
    ("130", "interrupted by Ctrl-C: the command is stopped, the worker disconnected"),
    ("141", "the program reading stdout closed it (`head -1`): psbridge stops quietly"),
    ("143", "SIGTERM: as Ctrl-C"),
];

/// [`STATUS_TABLE`] as text, one indented line per status.
pub fn status_table() -> String {
    STATUS_TABLE.iter().map(|(code, meaning)| format!("  {code:<5}{meaning}")).collect::<Vec<_>>().join("\n")
}

/// Why `psbridge` ends with a status other than 0. Variants without a message are quiet: what the user
/// needs to know was already printed (error records on stderr, a batch summary, doctor's report).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage or input found by psbridge itself; the text says what to do.
    #[error("{0}")]
    Usage(String),
    /// The configuration file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The profile (unknown, bad timeouts, a secret that cannot be read).
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The library failed: starting, connecting, a dead worker, a timeout, an invalid command.
    #[error("{}", bridge_message(.0))]
    Bridge(#[from] psbridge::Error),
    /// The command wrote an error record or did not complete; its records are already on stderr (or in
    /// the envelope).
    #[error("the command failed")]
    CommandFailed,
    /// A script called `exit` with this number (not 0).
    #[error("the script called exit {0}")]
    ScriptExit(i32),
    /// The subcommand printed its own report and chose this status (batch, doctor).
    #[error("exit status {0}")]
    Reported(u8),
    /// Ctrl-C or SIGTERM.
    #[error("{0}; the command was stopped and the worker disconnected")]
    Interrupted(Interrupt),
    /// stdout could not be written (not a closed pipe).
    #[error("cannot write the output: {0}; the command was stopped")]
    Output(#[source] io::Error),
    /// The reader of stdout went away.
    #[error("stdout was closed")]
    BrokenPipe,
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    /// A psbridge server answered with an error (`run --server`, `batch --server`); its kind decides the
    /// status.
    #[error("{}", .0.message)]
    Server(crate::serve::wire::ApiError),
    /// A psbridge server could not be reached, or went away during the request.
    #[error("{0}")]
    ServerGone(String),
    /// clap's own usage error or help text, which it prints itself.
    #[error("{0}")]
    Clap(#[from] clap::Error),
}

/// The signal that interrupted psbridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// SIGINT, Ctrl-C.
    CtrlC,
    /// SIGTERM.
    Terminate,
}

impl fmt::Display for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Interrupt::CtrlC => "interrupted (Ctrl-C)",
            Interrupt::Terminate => "terminated (SIGTERM)",
        })
    }
}

impl CliError {
    /// A usage error with this message.
    pub fn usage(message: impl fmt::Display) -> CliError {
        CliError::Usage(message.to_string())
    }

    /// A write to stdout failed: quiet for a closed pipe, one message otherwise.
    pub fn output(error: io::Error) -> CliError {
        if error.kind() == io::ErrorKind::BrokenPipe { CliError::BrokenPipe } else { CliError::Output(error) }
    }

    /// The exit status: the one place that decides it.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Config(_) | CliError::Profile(_) => EXIT_USAGE,
            CliError::Clap(error) if !error.use_stderr() => EXIT_OK, // --help, --version
            CliError::Clap(_) => EXIT_USAGE,
            CliError::Bridge(error) => bridge_exit_code(error),
            CliError::CommandFailed => EXIT_COMMAND_ERRORS,
            // What the system reports for a process that called exit(N).
            CliError::ScriptExit(code) => (*code & 0xFF) as u8,
            CliError::Reported(code) => *code,
            CliError::Interrupted(Interrupt::CtrlC) => EXIT_INTERRUPTED,
            CliError::Interrupted(Interrupt::Terminate) => EXIT_TERMINATED,
            CliError::Output(_) => EXIT_OUTPUT,
            CliError::BrokenPipe => EXIT_BROKEN_PIPE,
            CliError::Runtime(_) => EXIT_OS,
            CliError::Server(error) => server_exit_code(error.error),
            CliError::ServerGone(_) => EXIT_BRIDGE,
        }
    }

    /// Prints the error on stderr, once, with the error records a bridge error carries; quiet variants
    /// print nothing. A stderr that cannot be written is ignored: there is nowhere else to say it.
    pub fn report(&self) {
        let mut stderr = io::stderr().lock();
        match self {
            CliError::CommandFailed | CliError::ScriptExit(_) | CliError::Reported(_) | CliError::BrokenPipe => {}
            CliError::Clap(error) => {
                let _ = error.print();
            }
            CliError::Bridge(error @ (psbridge::Error::Connect { records, .. } | psbridge::Error::ModuleImport { records })) => {
                let _ = writeln!(stderr, "psbridge: {}", bridge_message(error));
                for record in records {
                    let _ = write_error_record(&mut stderr, record);
                }
            }
            other => {
                let _ = writeln!(stderr, "psbridge: {other}");
            }
        }
    }
}

/// The exit status of a library error.
fn bridge_exit_code(error: &psbridge::Error) -> u8 {
    use psbridge::Error;
    match error {
        Error::ModuleImport { .. } | Error::InvalidCommand { .. } => EXIT_USAGE,
        Error::Timeout { .. } => EXIT_TIMEOUT,
        Error::Cancelled { .. } => EXIT_INTERRUPTED,
        // Start, handshake, connect, a dead worker, a protocol violation, pool start-up and queueing:
        // the bridge could not get or keep a worker.
        _ => EXIT_BRIDGE,
    }
}

/// The exit status of an error a server answered: what the same failure would give locally.
fn server_exit_code(kind: crate::serve::wire::ErrorKind) -> u8 {
    use crate::serve::wire::ErrorKind;
    match kind {
        ErrorKind::InvalidRequest
        | ErrorKind::Unauthorized
        | ErrorKind::Forbidden
        | ErrorKind::NotFound
        | ErrorKind::Conflict
        | ErrorKind::TooLarge
        | ErrorKind::Configuration => EXIT_USAGE,
        ErrorKind::TooManyRequests | ErrorKind::Unavailable => EXIT_BRIDGE,
        ErrorKind::Timeout => EXIT_TIMEOUT,
        ErrorKind::Cancelled => EXIT_INTERRUPTED,
    }
}

/// A library error in words; a module that did not import gets its name and the fix.
pub fn bridge_message(error: &psbridge::Error) -> String {
    match error {
        psbridge::Error::ModuleImport { records } => {
            let module = records.iter().find_map(|r| r.target_name.as_deref().filter(|n| !n.is_empty()));
            let reason = records.first().map_or("no error record", |r| r.message.as_str());
            match module {
                Some(module) => format!(
                    "module {module} could not be imported: {reason}\n  fix: install it (`Install-Module {module} -Scope CurrentUser` in \
                     pwsh), or point module_path in the profile (or --module-path) at the folder that holds it"
                ),
                None => format!(
                    "session set-up failed: {reason}\n  fix: check the profile's modules and module_path (or --module and --module-path)"
                ),
            }
        }
        other => other.to_string(),
    }
}

/// An error record the way PowerShell's console shows it, on `out`.
pub fn write_error_record(out: &mut impl Write, record: &ErrorRecord) -> io::Result<()> {
    match &record.command {
        Some(command) => writeln!(out, "{command}: {}", record.message)?,
        None => writeln!(out, "{}", record.message)?,
    }
    if let Some(info) = &record.category_info {
        writeln!(out, "    CategoryInfo          : {info}")?;
    }
    if let Some(id) = &record.fully_qualified_error_id {
        writeln!(out, "    FullyQualifiedErrorId : {id}")?;
    }
    Ok(())
}

/// How a command that ran to its end ends psbridge: a script's `exit N` is N (as the system reports
/// it), whatever it wrote, as with `pwsh -File`; otherwise the library's one success rule
/// ([`InvocationResult::succeeded`](psbridge::InvocationResult::succeeded)): no error record (seen while
/// streaming) and [`Completion::ended_well`]. `had_errors` alone never fails it.
pub fn command_outcome(errors_seen: bool, completion: &Completion) -> Result<(), CliError> {
    match completion.exit_code {
        Some(code) if completion.state == PipelineState::Completed => {
            if code & 0xFF == 0 { Ok(()) } else { Err(CliError::ScriptExit(code)) }
        }
        _ if errors_seen || !completion.ended_well() => Err(CliError::CommandFailed),
        _ => Ok(()),
    }
}

/// A subcommand's own status as a result: 0 is success, anything else was already reported.
pub fn from_status(code: u8) -> Result<(), CliError> {
    if code == EXIT_OK { Ok(()) } else { Err(CliError::Reported(code)) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn record(target: Option<&str>) -> ErrorRecord {
        serde_json::from_value(serde_json::json!({
            "message": "The specified module 'Nope' was not loaded because no valid module file was found in any module directory.",
            "exception_message": null, "exception_type": null, "fully_qualified_error_id": "Modules_ModuleNotFound",
            "category": "ResourceUnavailable", "activity": null, "reason": null, "target_name": target, "target_type": null,
            "category_info": null, "target_object": null, "script_stack_trace": null, "position_message": null,
            "command": null, "terminating": false
        }))
        .unwrap()
    }

    #[test]
    fn each_failure_has_its_own_status() {
        let timeout = psbridge::Error::Timeout { command: "Get-Mailbox".into(), after: Duration::from_secs(2), worker_killed: false, credentials_expired_at: None };
        let cases: Vec<(CliError, u8)> = vec![
            (CliError::usage("x"), 2),
            (CliError::Bridge(psbridge::Error::ModuleImport { records: vec![record(Some("Nope"))] }), 2),
            (CliError::Bridge(psbridge::Error::InvalidCommand { reason: "too deep".into() }), 2),
            (CliError::Bridge(psbridge::Error::PwshNotFound { searched: vec![] }), 3),
            (CliError::Bridge(psbridge::Error::Connect { command: "Connect-ExchangeOnline".into(), records: vec![] }), 3),
            (CliError::Bridge(psbridge::Error::StartTimeout { stage: "connect", after: Duration::from_secs(1) }), 3),
            (CliError::Bridge(timeout), 124),
            (CliError::CommandFailed, 1),
            (CliError::ScriptExit(5), 5),
            (CliError::ScriptExit(-1), 255),
            (CliError::ScriptExit(256), 0),
            (CliError::ScriptExit(300), 44),
            (CliError::Interrupted(Interrupt::CtrlC), 130),
            (CliError::Interrupted(Interrupt::Terminate), 143),
            (CliError::output(io::Error::from(io::ErrorKind::StorageFull)), 74),
            (CliError::output(io::Error::from(io::ErrorKind::BrokenPipe)), 141),
            (CliError::Reported(1), 1),
            (CliError::ServerGone("the psbridge server at unix:/x cannot be reached".into()), 3),
        ];
        use crate::serve::wire::{ApiError, ErrorKind};
        let server = |error| CliError::Server(ApiError { error, message: String::new() });
        let cases = cases.into_iter().chain([
            (server(ErrorKind::Forbidden), 2),
            (server(ErrorKind::Unauthorized), 2),
            (server(ErrorKind::InvalidRequest), 2),
            (server(ErrorKind::Configuration), 2),
            (server(ErrorKind::Unavailable), 3),
            (server(ErrorKind::Timeout), 124),
            (server(ErrorKind::Cancelled), 130),
        ]);
        for (error, code) in cases {
            assert_eq!(error.exit_code(), code, "{error:?}");
        }
    }

    #[test]
    fn a_command_fails_by_its_records_and_state_and_a_script_by_its_exit_number() {
        let status = |errors_seen, completion: Completion| command_outcome(errors_seen, &completion).err().map_or(0, |e| e.exit_code());
        let done = Completion::default();
        assert_eq!(status(false, done), 0);
        assert_eq!(status(false, Completion { had_errors: true, ..done }), 0, "had_errors alone never fails");
        assert_eq!(status(true, done), 1);
        assert_eq!(status(false, Completion { state: PipelineState::Failed, ..done }), 1);
        assert_eq!(status(false, Completion { state: PipelineState::Stopped, ..done }), 1);
        assert_eq!(status(false, Completion { exit_code: Some(5), ..done }), 5);
        assert_eq!(status(true, Completion { exit_code: Some(0), ..done }), 0, "exit 0 is 0");
        assert_eq!(status(false, Completion { exit_code: Some(256), ..done }), 0, "as the system reports exit(256)");
        assert_eq!(status(false, Completion { exit_code: Some(-1), ..done }), 255);
        assert_eq!(status(false, Completion { native_exit_code: Some(2), ..done }), 0, "$LASTEXITCODE is reported, not judged");
    }

    #[test]
    fn a_missing_module_is_named_with_its_fix() {
        let message = CliError::Bridge(psbridge::Error::ModuleImport { records: vec![record(Some("Nope"))] }).to_string();
        assert!(message.contains("module Nope could not be imported") && message.contains("Install-Module Nope"), "{message}");
        assert!(message.contains("module_path"), "{message}");
        let message = CliError::Bridge(psbridge::Error::ModuleImport { records: vec![record(None)] }).to_string();
        assert!(message.contains("session set-up failed") && message.contains("module_path"), "{message}");
    }

    #[test]
    fn the_readme_has_the_same_status_table() {
        let readme = include_str!("../../../README.md");
        for (code, meaning) in STATUS_TABLE {
            let row = format!("| {code} | {meaning} |");
            assert!(readme.contains(&row), "the README's exit status table lacks the row\n{row}");
        }
    }
}
