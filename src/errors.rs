//! Every error the library returns.
//!
//! Errors about PowerShell *commands* (a cmdlet that wrote an error record) are not here: they are data,
//! found in [`InvocationResult::errors`](crate::InvocationResult::errors) with
//! [`had_errors`](crate::InvocationResult::had_errors) set, as in PowerShell's own hosting API. The
//! variants below are failures of the bridge: the worker could not start, broke the protocol, died, or a
//! command was stopped from the Rust side.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::records::ErrorRecord;

/// What psbridge knows about a worker process that has exited.
///
/// It is cached when the worker dies and attached to every later error of that runspace.
#[derive(Debug, Clone)]
pub struct WorkerExit {
    /// The exit status, when the process could be waited for.
    pub status: Option<ExitStatus>,
    /// The last lines the worker wrote to stderr (bounded; see
    /// [`RunspaceBuilder::stderr_tail_lines`](crate::RunspaceBuilder::stderr_tail_lines)).
    pub stderr_tail: Vec<String>,
    /// Why psbridge itself ended the worker, if it did (timeout, protocol violation, close, drop).
    pub killed_by_bridge: Option<String>,
}

impl fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.status {
            Some(status) => write!(f, "{status}")?,
            None => f.write_str("exit status unknown")?,
        }
        if let Some(reason) = &self.killed_by_bridge {
            write!(f, ", killed by psbridge: {reason}")?;
        }
        if self.stderr_tail.is_empty() {
            f.write_str("; stderr was empty")
        } else {
            write!(f, "; stderr tail:\n  {}", self.stderr_tail.join("\n  "))
        }
    }
}

/// The error type of every fallible psbridge call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No `pwsh` executable could be found.
    #[error(
        "pwsh not found (searched: {}); install PowerShell 7.4 or later (for example \
         `dotnet tool install --global PowerShell` and add ~/.dotnet/tools to PATH), or set \
         PSBRIDGE_PWSH or RunspaceBuilder::pwsh to its full path",
        searched.join("; ")
    )]
    PwshNotFound {
        /// Every place that was looked at, in order.
        searched: Vec<String>,
    },

    /// The worker's files could not be written or the process could not be spawned.
    #[error("could not start pwsh at {}", path.display())]
    Spawn {
        /// The pwsh executable that was started.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The worker did not say it was ready, or said something else first.
    #[error("worker handshake failed: {reason}")]
    Handshake {
        /// What went wrong.
        reason: String,
    },

    /// The worker speaks another protocol version than this build of psbridge.
    #[error(
        "worker speaks protocol version {found} but this psbridge speaks {expected}; the worker \
         script and the library must come from the same psbridge build"
    )]
    ProtocolMismatch {
        /// The version this library speaks.
        expected: u32,
        /// The version the worker announced.
        found: u32,
    },

    /// Session set-up failed: a module did not import (the error records say why).
    #[error("session set-up failed: {}", first_message(records))]
    ModuleImport {
        /// The error records PowerShell produced while opening the session.
        records: Vec<ErrorRecord>,
    },

    /// The connect command reported errors.
    #[error("connect command {command} failed: {}", first_message(records))]
    Connect {
        /// The connect command's name.
        command: String,
        /// Its error records (secrets that were passed to it are masked).
        records: Vec<ErrorRecord>,
    },

    /// The [`Connector`](crate::Connector) could not make the connect command (a secret could not be read,
    /// a token command failed, a token has expired). Not worth retrying with the same source.
    #[error("could not get the credentials to connect with: {source}")]
    Credentials {
        /// What the connector said (it never holds a secret).
        #[source]
        source: crate::connect::ConnectorError,
    },

    /// A step of opening the runspace took longer than allowed.
    #[error("{stage} did not finish within {after:?}")]
    StartTimeout {
        /// Which step: "worker start", "session set-up" or "connect".
        stage: &'static str,
        /// The limit that was exceeded.
        after: Duration,
    },

    /// The command cannot be sent as it is (see [`Command::validate`](crate::Command::validate)); nothing
    /// was sent and the worker is unchanged.
    #[error("invalid command: {reason}")]
    InvalidCommand {
        /// What is wrong and where.
        reason: String,
    },

    /// A command ran longer than its timeout.
    #[error(
        "{command} timed out after {}; {}{}",
        humane(*after),
        if *worker_killed {
            "it did not stop within the grace period, so the worker was killed (a pool replaces it)"
        } else {
            "it was stopped and the worker was kept"
        },
        credentials_expired_at.map(expired_note).unwrap_or_default()
    )]
    Timeout {
        /// The command's name (`<script>` for a script).
        command: String,
        /// The timeout that was exceeded.
        after: Duration,
        /// Whether the worker had to be killed.
        worker_killed: bool,
        /// When the worker's credentials expired, if they had by the time of the timeout (see
        /// [`Runspace::expires_at`](crate::Runspace::expires_at)): then the likely cause, since a module
        /// may retry a refused token for a minute or more before it reports an error.
        credentials_expired_at: Option<SystemTime>,
    },

    /// The command was cancelled through a [`CancelHandle`](crate::CancelHandle).
    #[error(
        "command was cancelled{}",
        if *worker_killed { "; it did not stop within the grace period, so the worker was killed" } else { "" }
    )]
    Cancelled {
        /// Whether the worker had to be killed.
        worker_killed: bool,
    },

    /// The worker process is gone. Every later call on the same runspace returns this again.
    #[error("worker exited ({0})")]
    WorkerExited(Arc<WorkerExit>),

    /// The worker sent something that is not a protocol message.
    #[error("protocol violation: {0}")]
    ProtocolViolation(String),

    /// An output object does not have the shape of the Rust type it was read as
    /// ([`PsObject::deserialize`](crate::PsObject::deserialize)).
    #[error(
        "an output object of type {type_name} does not fit: {}{reason}",
        property.as_deref().map(|p| format!("property {p}: ")).unwrap_or_default()
    )]
    OutputShape {
        /// The object's most specific type name.
        type_name: String,
        /// The property that is missing or mistyped (a path such as `EmailAddresses[2]`), if one is.
        property: Option<String>,
        /// What serde said.
        reason: String,
    },

    /// A pool could not start its minimum number of workers.
    #[error("the pool could not start {} of its {wanted} workers; first failure: {}", failures.len(), failures[0])]
    PoolOpen {
        /// How many workers the pool wanted to start.
        wanted: usize,
        /// Why each failed worker failed.
        failures: Vec<Error>,
    },

    /// The pool's queue is full and the caller asked not to wait.
    #[error("the pool's queue is full ({capacity} commands waiting); retry later or raise PoolBuilder::queue_capacity")]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },

    /// No worker took the command within the wait timeout.
    #[error("no worker was free within {0:?}; raise PoolBuilder::wait_timeout or max_workers")]
    WaitTimeout(Duration),

    /// The pool's workers failed to start or connect `attempts` times in a row (see
    /// [`PoolBuilder::connect_attempts`](crate::PoolBuilder::connect_attempts)): every queued command,
    /// and every later one, fails with this error and its cause.
    #[error("no worker could be started and connected ({attempts} attempts in a row failed): {cause}")]
    WorkersUnavailable {
        /// How many attempts failed in a row.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        cause: Arc<Error>,
    },

    /// The pool is shut down (or shutting down) and takes no more commands.
    #[error("the pool is closed")]
    PoolClosed,
}

fn expired_note(at: SystemTime) -> String {
    format!(
        "; the worker's credentials had expired at {}, which is the likely cause (modules retry a refused token for \
         a minute or more before they report it)",
        humantime::format_rfc3339_seconds(at)
    )
}

/// `1.5 s`, `300 s`: durations as people write them in options.
fn humane(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) { format!("{} s", ms / 1000) } else { format!("{} s", d.as_secs_f64()) }
}

fn first_message(records: &[ErrorRecord]) -> &str {
    records.first().map_or("no error record", |r| r.message.as_str())
}

/// `Result` with psbridge's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
