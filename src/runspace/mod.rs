//! [`Runspace`]: one long-lived, connected `pwsh` worker.
//!
//! - [`builder`]: [`RunspaceBuilder`], its settings and their defaults, and spawning the process;
//! - this module: the [`Runspace`] handle: the handshake, session set-up, connect, close;
//! - [`invocation`]: a running command and its state machine (running, stopping, done), cancel and
//!   timeout;
//! - [`channel`]: the tasks that own the worker's stdin and stdout and route its messages to the
//!   invocation they belong to.

mod builder;
mod channel;
mod invocation;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use secrecy::ExposeSecret;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::Instrument;
use zeroize::Zeroizing;

use crate::command::Command;
use crate::errors::{Error, Result, WorkerExit};
use crate::lines::{Line, bounded_lines};
use crate::process::ProcessMonitor;
use crate::protocol::{self, Message, PROTOCOL_VERSION, WorkerInfo};
use crate::records::{ErrorRecord, InvocationResult};
use crate::worker_files::WorkerFiles;
pub(crate) use builder::MAX_RUNSPACES_PER_WORKER;
pub use builder::RunspaceBuilder;
use builder::Settings;
use channel::{Lane, Route, Running, Shared, read_messages, write_frames};
pub use invocation::{CancelHandle, Invocation};
use invocation::collect;

/// Settings an open runspace keeps.
#[derive(Debug, Clone)]
struct Limits {
    command_timeout: Option<Duration>,
    stop_grace: Duration,
    shutdown_grace: Duration,
    stream_buffer: usize,
}

/// An open, connected PowerShell session in a long-lived `pwsh` worker process.
///
/// Commands run one at a time (`invoke` takes `&mut self`); for parallel work use several runspaces,
/// each in a process of its own ([`RunspaceBuilder::open`]) or several in one process
/// ([`RunspaceBuilder::open_many`]). The worker keeps the session (imported modules, variables, the
/// Exchange connection) between commands. Dropping the last runspace of a process kills it;
/// [`close`](Self::close) ends it gracefully.
///
/// ```no_run
/// # async fn demo() -> psbridge::Result<()> {
/// use psbridge::{Command, Runspace};
/// let mut runspace = Runspace::builder().open().await?;
/// let result = runspace.invoke(&Command::new("Get-Date")).await?;
/// println!("{}", result.output[0].value);
/// runspace.close().await?;
/// # Ok(()) }
/// ```
pub struct Runspace {
    info: WorkerInfo,
    shared: Arc<Shared>,
    limits: Limits,
    /// Which runspace of its process this is.
    lane: usize,
    /// Whether `close` already gave up this runspace's share of the process.
    released: bool,
    expires_at: Option<SystemTime>,
    disconnect: Option<Command>,
    _files: Arc<WorkerFiles>,
}

impl std::fmt::Debug for Runspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runspace").field("pid", &self.info.pid).field("index", &self.lane).field("ps_version", &self.info.ps_version).finish()
    }
}

impl Runspace {
    /// A builder with every setting at its default.
    pub fn builder() -> RunspaceBuilder {
        RunspaceBuilder::default()
    }

    /// What the worker said about itself in the handshake.
    pub fn info(&self) -> &WorkerInfo {
        &self.info
    }

    /// The process id of the PowerShell process that runs the session.
    ///
    /// This can differ from the process psbridge spawned: a `pwsh` installed as a dotnet global tool is a
    /// launcher that starts `dotnet pwsh.dll` as its child. Both are in the worker's process group.
    pub fn pid(&self) -> u32 {
        self.info.pid
    }

    /// Which runspace of its worker process this is: 0 for the first (and for a runspace opened with
    /// [`RunspaceBuilder::open`]), up to `count - 1` for [`RunspaceBuilder::open_many`].
    ///
    /// ```no_run
    /// # async fn demo() -> psbridge::Result<()> {
    /// let runspaces = psbridge::Runspace::builder().open_many(2).await?;
    /// assert_eq!(runspaces[1].index(), 1);
    /// assert_eq!(runspaces[0].pid(), runspaces[1].pid());
    /// # Ok(()) }
    /// ```
    pub fn index(&self) -> usize {
        self.lane
    }

    /// When the credentials this worker connected with expire, if its [`Connector`] said.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// How the worker exited, if it has.
    pub fn exit_status(&self) -> Option<Arc<WorkerExit>> {
        self.shared.monitor.exited()
    }

    /// A handle that stops whatever command this runspace is running, from any task.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle { shared: self.shared.clone(), lane: self.lane }
    }

    fn lane(&self) -> &Lane {
        &self.shared.lanes[self.lane]
    }

    /// Runs a command and collects everything it produces.
    ///
    /// Errors the command reports are data: look at `had_errors` and `errors`. `Err` means the bridge
    /// failed: timeout, cancel, a dead worker, a protocol violation.
    ///
    /// # Cancel safety
    /// Dropping the future stops the command in the worker (PowerShell's `Stop()`); the runspace stays
    /// usable and ignores whatever the stopped command still sends.
    pub async fn invoke(&mut self, command: &Command) -> Result<InvocationResult> {
        collect(self.invoke_stream(command)?).await
    }

    /// Starts a command and returns its items one by one as the worker produces them.
    ///
    /// Memory stays bounded however much the command outputs: when the caller reads slowly, the worker
    /// waits.
    ///
    /// ```no_run
    /// # async fn demo(runspace: &mut psbridge::Runspace) -> psbridge::Result<()> {
    /// use psbridge::{Command, StreamItem};
    /// let mut stream = runspace.invoke_stream(&Command::new("Get-Mailbox").param("ResultSize", "Unlimited"))?;
    /// while let Some(item) = stream.next_item().await? {
    ///     if let StreamItem::Output(mailbox) = item {
    ///         println!("{}", mailbox.value["PrimarySmtpAddress"]);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidCommand`] when [`Command::validate`] refuses the command (nothing is sent), or
    /// the worker's exit when it is gone.
    pub fn invoke_stream(&mut self, command: &Command) -> Result<Invocation<'_>> {
        command.validate()?;
        let timeout = command.timeout.or(self.limits.command_timeout);
        let runspace = self.lane;
        let request = |id| protocol::encode(&protocol::Invoke { id, runspace, command });
        self.begin(request, timeout, command.name())
    }

    /// Runs the disconnect command (if one was configured); for the last open runspace of its process,
    /// then asks the worker to exit and waits for it.
    ///
    /// Returns the disconnect command's result. The worker is ended even when disconnecting fails; it is
    /// killed if it has not exited within the shutdown grace period. A runspace of a process with other
    /// open runspaces leaves the process running for them.
    pub async fn close(mut self) -> Result<Option<InvocationResult>> {
        let disconnected = match self.disconnect.take() {
            Some(command) if self.exit_status().is_none() => Some(self.invoke(&command).await),
            _ => None,
        };
        self.released = true;
        if self.shared.release_lane() {
            self.shared.send(protocol::control("exit", None));
            let grace = self.limits.shutdown_grace;
            self.shared.monitor.wait_or_kill(grace, "did not exit within the shutdown grace period").await;
        }
        disconnected.transpose()
    }

    /// Spawned process to ready worker: the handshake. Returns the process's `lanes` runspaces, not yet
    /// set up.
    async fn start(mut child: tokio::process::Child, files: Arc<WorkerFiles>, config: &Settings, lanes: usize) -> Result<Vec<Runspace>> {
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdin = child.stdin.take().expect("stdin is piped");
        let monitor = ProcessMonitor::start(child, config.stderr_tail_lines);
        // From here on, dropping the future (or failing) must not leave the process behind.
        let guard = KillOnDrop(Some(monitor.clone()));
        let mut lines = bounded_lines(stdout, config.max_line_length);
        let first = tokio::time::timeout(config.start_timeout, lines.next()).await;
        let info = match first {
            Err(_) => return Err(Error::StartTimeout { stage: "worker start", after: config.start_timeout }),
            Ok(None) | Ok(Some(Err(_))) => {
                let exit = monitor.wait_or_kill(Duration::from_secs(5), "no ready message").await;
                return Err(Error::Handshake { reason: format!("the worker ended before saying it was ready ({exit})") });
            }
            Ok(Some(Ok(Line::TooLong))) => {
                return Err(Error::Handshake { reason: "the first line was longer than max_line_length".into() });
            }
            Ok(Some(Ok(Line::Text(line)))) => match protocol::decode(&line) {
                Ok(Message::Ready(info)) => info,
                _ => {
                    let shown: String = line.chars().take(200).collect();
                    return Err(Error::Handshake { reason: format!("expected a ready message, got {shown:?}") });
                }
            },
        };
        if info.protocol != PROTOCOL_VERSION {
            return Err(Error::ProtocolMismatch { expected: PROTOCOL_VERSION, found: info.protocol });
        }
        tracing::debug!(pid = info.pid, ps_version = %info.ps_version, os = %info.os, "worker ready");
        let (writer, frames) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::new(lanes, writer, monitor.clone()));
        tokio::spawn(write_frames(stdin, frames));
        tokio::spawn(read_messages(lines, shared.clone()).instrument(tracing::debug_span!("worker", pid = info.pid)));
        guard.disarm();
        let limits = Limits {
            command_timeout: config.command_timeout,
            stop_grace: config.stop_grace,
            shutdown_grace: config.shutdown_grace,
            stream_buffer: config.stream_buffer,
        };
        let runspace = |lane| Runspace {
            info: info.clone(),
            shared: shared.clone(),
            limits: limits.clone(),
            lane,
            released: false,
            expires_at: None,
            disconnect: None,
            _files: files.clone(),
        };
        Ok((0..lanes).map(runspace).collect())
    }

    async fn setup(&mut self, config: &Settings) -> Result<()> {
        let runspace = self.lane;
        let setup = |id| {
            protocol::encode(&protocol::Setup {
                id,
                runspace,
                modules: &config.modules,
                execution_policy: config.execution_policy.as_deref(),
                variables: &config.variables,
                depth: config.depth,
            })
        };
        let invocation = self.begin(setup, Some(config.start_timeout), "session set-up")?;
        let result = collect(invocation).await.map_err(|e| start_timeout(e, "session set-up", config.start_timeout))?;
        if !result.succeeded() {
            return Err(Error::ModuleImport { records: result.errors });
        }
        Ok(())
    }

    /// Runs the connect command. Only once per worker: connecting again in the same process is not the
    /// same as connecting afresh (ExchangeOnlineManagement adds a second connection), so a worker whose
    /// connection expired is replaced by a new one instead.
    async fn connect(&mut self, connect: &Command, timeout: Duration) -> Result<()> {
        let command = connect.clone().timeout(timeout);
        let result = self.invoke(&command).await.map_err(|e| start_timeout(e, "connect", timeout))?;
        for information in &result.information {
            tracing::debug!(command = connect.name(), message = ?information.message, "connect information");
        }
        // Judged by what was written and how it ended, never by HadErrors: the real Connect-ExchangeOnline
        // 3.9.0 succeeds with HadErrors set by an error it suppressed itself.
        if !result.succeeded() {
            let mut records = result.errors;
            mask_secrets(&mut records, connect);
            return Err(Error::Connect { command: connect.name().to_owned(), records });
        }
        Ok(())
    }

    /// Sends a request and routes its messages to the returned invocation.
    fn begin(
        &mut self,
        request: impl FnOnce(u64) -> Zeroizing<Vec<u8>>,
        timeout: Option<Duration>,
        name: &str,
    ) -> Result<Invocation<'_>> {
        if let Some(exit) = self.shared.monitor.exited() {
            return Err(self.dead_error(exit));
        }
        let id = self.shared.next_id();
        let (events, receiver) = mpsc::channel(self.limits.stream_buffer);
        let cancelled = Arc::new(Notify::new());
        // Messages of this lane's earlier, abandoned request are dropped by the reader from here on.
        *lock(&self.lane().route) = Some(Route { id, events });
        *lock(&self.lane().running) = Some(Running { id, cancelled: cancelled.clone() });
        self.shared.send(request(id));
        tracing::debug!(pid = self.info.pid, runspace = self.lane, id, command = name, "invoke");
        Ok(Invocation {
            id,
            name: name.to_owned(),
            receiver,
            deadline: timeout.map(|t| (Instant::now() + t, t)),
            stopping: None,
            completion: None,
            cancelled,
            stop_grace: self.limits.stop_grace,
            runspace: self,
        })
    }

    fn dead_error(&self, exit: Arc<WorkerExit>) -> Error {
        match lock(&self.shared.violation).clone() {
            Some(violation) => Error::ProtocolViolation(violation),
            None => Error::WorkerExited(exit),
        }
    }
}

impl Drop for Runspace {
    fn drop(&mut self) {
        if !self.released && self.shared.release_lane() && self.shared.monitor.exited().is_none() {
            self.shared.monitor.kill("runspace dropped without close()");
        }
    }
}

/// Kills the worker if start-up does not get as far as a [`Runspace`].
struct KillOnDrop(Option<Arc<ProcessMonitor>>);

impl KillOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(monitor) = &self.0 {
            monitor.kill("start-up failed or was abandoned");
        }
    }
}

/// A timeout during start-up is reported as the start-up stage that took too long.
fn start_timeout(error: Error, stage: &'static str, after: Duration) -> Error {
    match error {
        Error::Timeout { .. } => Error::StartTimeout { stage, after },
        other => other,
    }
}

/// Replaces every secret the command was given with `********` in its error records.
fn mask_secrets(records: &mut [ErrorRecord], command: &Command) {
    for secret in command.secrets() {
        for record in records.iter_mut() {
            record.redact(secret.expose_secret());
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

