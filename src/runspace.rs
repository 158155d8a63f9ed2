//! [`Runspace`]: one long-lived, connected `pwsh` worker.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use tokio::process::ChildStdout;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::Instrument;
use zeroize::Zeroizing;

use crate::command::Command;
use crate::connect::{Connector, Fixed};
use crate::errors::{Error, Result, WorkerExit};
use crate::lines::{BoundedLines, Line, bounded_lines};
use crate::locate::find_pwsh;
use crate::process::{self, ProcessMonitor};
use crate::protocol::{self, Message, ModuleSpec, PROTOCOL_VERSION, WorkerInfo};
use crate::records::{Completion, ErrorRecord, InvocationResult, PipelineState, StreamItem};
use crate::worker_files::{self, WorkerFiles};

/// Configures and opens a [`Runspace`]; every setting has a documented default.
///
/// It plays the part of `InitialSessionState` (modules, execution policy, variables) plus the connect
/// step of Microsoft's C# sample.
///
/// ```no_run
/// # async fn demo() -> psbridge::Result<()> {
/// use std::time::Duration;
/// use psbridge::{Command, Runspace};
/// let runspace = Runspace::builder()
///     .module("ExchangeOnlineManagement")
///     .execution_policy("RemoteSigned")
///     .command_timeout(Duration::from_secs(300))
///     .connect(Command::new("Connect-ExchangeOnline").param("ManagedIdentity", true).param("Organization", "contoso.onmicrosoft.com"))
///     .disconnect(Command::new("Disconnect-ExchangeOnline").param("Confirm", false))
///     .open()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RunspaceBuilder {
    pwsh: Option<PathBuf>,
    modules: Vec<ModuleSpec>,
    module_paths: Vec<PathBuf>,
    execution_policy: Option<String>,
    variables: Map<String, Value>,
    env: Vec<(OsString, OsString)>,
    env_removed: Vec<OsString>,
    connect: Option<Arc<dyn Connector>>,
    disconnect: Option<Command>,
    start_timeout: Duration,
    connect_timeout: Duration,
    command_timeout: Option<Duration>,
    stop_grace: Duration,
    shutdown_grace: Duration,
    max_line_length: usize,
    depth: u32,
    stderr_tail_lines: usize,
    assembly_cache: Option<PathBuf>,
    stream_buffer: usize,
}

impl Default for RunspaceBuilder {
    fn default() -> Self {
        RunspaceBuilder {
            pwsh: None,
            modules: Vec::new(),
            module_paths: Vec::new(),
            execution_policy: None,
            variables: Map::new(),
            env: Vec::new(),
            env_removed: Vec::new(),
            connect: None,
            disconnect: None,
            start_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(180),
            command_timeout: None,
            stop_grace: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            max_line_length: 64 * 1024 * 1024,
            depth: 4,
            stderr_tail_lines: 40,
            assembly_cache: worker_files::default_assembly_cache(),
            stream_buffer: 64,
        }
    }
}

impl RunspaceBuilder {
    /// The pwsh executable. Default: `PSBRIDGE_PWSH`, else `pwsh` on `PATH`, else `~/.dotnet/tools/pwsh`.
    pub fn pwsh(mut self, path: impl Into<PathBuf>) -> Self {
        self.pwsh = Some(path.into());
        self
    }

    /// Imports a module (by name or path) when the session opens. Default: none.
    pub fn module(mut self, name: impl Into<String>) -> Self {
        self.modules.push(ModuleSpec { name: name.into(), minimum_version: None });
        self
    }

    /// Imports a module of at least `minimum_version`.
    pub fn module_with_version(mut self, name: impl Into<String>, minimum_version: impl Into<String>) -> Self {
        self.modules.push(ModuleSpec { name: name.into(), minimum_version: Some(minimum_version.into()) });
        self
    }

    /// Puts a folder in front of the worker's `PSModulePath`. Default: the inherited `PSModulePath`.
    pub fn module_path(mut self, folder: impl Into<PathBuf>) -> Self {
        self.module_paths.push(folder.into());
        self
    }

    /// The session's execution policy, where the platform has one (Windows). Default: the machine's.
    pub fn execution_policy(mut self, policy: impl Into<String>) -> Self {
        self.execution_policy = Some(policy.into());
        self
    }

    /// Defines a variable in the session before anything runs. Default: none.
    pub fn variable(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.variables.insert(name.into(), value.into());
        self
    }

    /// Sets an environment variable for the worker process (never use this for secrets). Default: the
    /// owner's environment, inherited.
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Removes a variable from the worker's environment, so that neither the session nor any program it
    /// starts sees it: for example the variable a secret was read from. Default: nothing removed.
    pub fn env_remove(mut self, name: impl Into<OsString>) -> Self {
        let name = name.into();
        self.env.retain(|(set, _)| set != &name);
        self.env_removed.push(name);
        self
    }

    /// A command run once after set-up, for example `Connect-ExchangeOnline`. Default: none.
    ///
    /// The same command, with the same secrets, connects every worker opened from this builder; to read
    /// credentials anew for each worker (a rotated file, a fresh token), use
    /// [`connect_with`](Self::connect_with).
    pub fn connect(self, command: Command) -> Self {
        self.connect_with(Fixed(command))
    }

    /// Asks `connector` for the connect command each time a worker opens. Default: no connect.
    ///
    /// A connector that fails ends the open with [`Error::Credentials`]; the time it gives in
    /// [`Connection::expires_at`](crate::Connection::expires_at) becomes [`Runspace::expires_at`].
    pub fn connect_with(mut self, connector: impl Connector) -> Self {
        self.connect = Some(Arc::new(connector));
        self
    }

    /// A command run by [`Runspace::close`] before the worker exits. Default: none.
    pub fn disconnect(mut self, command: Command) -> Self {
        self.disconnect = Some(command);
        self
    }

    /// Limit for starting pwsh, the handshake and session set-up together. Default: 60 s.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Limit for the connect command. Default: 180 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Default limit for each command; [`Command::timeout`] overrides it. Default: none.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = Some(timeout);
        self
    }

    /// How long a stopped command (cancel or timeout) may take to stop before the worker is killed.
    /// Default: 5 s.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// How long [`Runspace::close`] waits for the worker to exit after the disconnect command before it
    /// kills it. Default: 10 s.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Longest protocol line (one serialized object) accepted from the worker. Default: 64 MiB.
    pub fn max_line_length(mut self, bytes: usize) -> Self {
        self.max_line_length = bytes;
        self
    }

    /// How deep nested objects are serialized before they become their `ToString()`. Default: 4.
    pub fn depth(mut self, depth: u32) -> Self {
        self.depth = depth;
        self
    }

    /// How many of the worker's last stderr lines are kept for error reports. Default: 40.
    pub fn stderr_tail_lines(mut self, lines: usize) -> Self {
        self.stderr_tail_lines = lines;
        self
    }

    /// Where the compiled worker host is cached between workers (saves about 2 s per start), or `None`
    /// to compile in memory every time. Default: `<user cache dir>/psbridge`.
    pub fn assembly_cache(mut self, folder: Option<PathBuf>) -> Self {
        self.assembly_cache = folder;
        self
    }

    /// How many stream items may wait between the worker and a slow consumer before the worker is made
    /// to wait (backpressure). Default: 64.
    pub fn stream_buffer(mut self, items: usize) -> Self {
        self.stream_buffer = items.max(1);
        self
    }

    pub(crate) fn stream_buffer_len(&self) -> usize {
        self.stream_buffer
    }

    /// Starts the worker, checks its protocol version, sets up the session and runs the connect command.
    ///
    /// # Errors
    /// [`Error::PwshNotFound`], [`Error::Spawn`], [`Error::Handshake`], [`Error::ProtocolMismatch`],
    /// [`Error::ModuleImport`], [`Error::Connect`], [`Error::StartTimeout`], [`Error::WorkerExited`].
    ///
    /// # Cancel safety
    /// Dropping the future kills the worker started so far; nothing is left running.
    pub async fn open(self) -> Result<Runspace> {
        let pwsh = find_pwsh(self.pwsh.as_deref())?;
        let spawn_error = |source| Error::Spawn { path: pwsh.clone(), source };
        let files = WorkerFiles::shared().map_err(spawn_error)?;
        let child = process::spawn(self.process_command(&pwsh, &files)).await.map_err(spawn_error)?;
        let mut runspace = Runspace::start(child, files, &self).await?;
        runspace.setup(&self).await?;
        if let Some(connector) = &self.connect {
            let connection = connector.connection().await.map_err(|source| Error::Credentials { source })?;
            runspace.connect(&connection.command, self.connect_timeout).await?;
            runspace.expires_at = connection.expires_at;
        }
        runspace.disconnect = self.disconnect;
        Ok(runspace)
    }

    fn process_command(&self, pwsh: &std::path::Path, files: &WorkerFiles) -> std::process::Command {
        let mut command = std::process::Command::new(pwsh);
        command.args(["-NoLogo", "-NoProfile", "-NonInteractive", "-File"]).arg(files.script());
        if let Some(cache) = &self.assembly_cache {
            command.arg("-CacheDirectory").arg(cache);
        }
        command.env("POWERSHELL_TELEMETRY_OPTOUT", "1").env("POWERSHELL_UPDATECHECK", "Off").env("NO_COLOR", "1");
        if !self.module_paths.is_empty() {
            let inherited = std::env::var_os("PSModulePath").unwrap_or_default();
            let paths = self.module_paths.iter().cloned().chain(std::env::split_paths(&inherited));
            command.env("PSModulePath", std::env::join_paths(paths).unwrap_or(inherited));
        }
        // .NET's tiered PGO sends hot methods through an extra, instrumented JIT tier before the
        // optimized one; in a worker that keeps the first few thousand small commands up to 2x slower
        // (Get-Mailbox -Identity, 2,000 calls: ~1.2 ms instead of ~2.2 ms p50). Start-up is unchanged.
        // Only a performance setting: a value in the caller's environment or from `env()` wins, and the
        // worker removes ours from its environment again so that its child processes never see it.
        let chosen = |name: &OsString| name.to_str().is_some_and(|name| name.eq_ignore_ascii_case(TIERED_PGO));
        if std::env::var_os(TIERED_PGO).is_none() && !self.env.iter().any(|(name, _)| chosen(name)) {
            command.env(TIERED_PGO, "0").env("PSBRIDGE_UNSET_TIERED_PGO", "1");
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        for name in &self.env_removed {
            command.env_remove(name);
        }
        command
    }
}

/// The .NET runtime setting psbridge turns off for its workers (see `process_command`).
const TIERED_PGO: &str = "DOTNET_TieredPGO";

/// Settings an open runspace keeps.
#[derive(Debug, Clone)]
struct Limits {
    command_timeout: Option<Duration>,
    stop_grace: Duration,
    shutdown_grace: Duration,
    stream_buffer: usize,
}

/// What the reader task delivers to the invocation it belongs to.
enum Event {
    Item(StreamItem),
    Done(Completion),
}

/// The invocation the reader currently delivers to.
struct Route {
    id: u64,
    events: mpsc::Sender<Result<Event>>,
}

/// The running invocation, as seen by [`CancelHandle`]s.
struct Running {
    id: u64,
    cancelled: Arc<Notify>,
}

/// State shared by the runspace, its reader task and its cancel handles.
struct Shared {
    route: Mutex<Option<Route>>,
    running: Mutex<Option<Running>>,
    writer: mpsc::UnboundedSender<Zeroizing<Vec<u8>>>,
    monitor: Arc<ProcessMonitor>,
    /// Why the reader stopped trusting the worker, if it did.
    violation: Mutex<Option<String>>,
}

impl Shared {
    fn send(&self, frame: Zeroizing<Vec<u8>>) {
        // A closed writer means the worker is gone; the caller learns that from the event channel.
        let _ = self.writer.send(frame);
    }

    fn cancel(&self, id: u64) {
        self.send(protocol::control("cancel", Some(id)));
    }
}

/// One long-lived `pwsh` process with an open, connected PowerShell session.
///
/// Commands run one at a time (`invoke` takes `&mut self`); for parallel work use several runspaces.
/// The worker keeps its session (imported modules, variables, the Exchange connection) between commands.
/// Dropping a runspace kills its worker; [`close`](Self::close) ends it gracefully.
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
    next_id: u64,
    expires_at: Option<SystemTime>,
    disconnect: Option<Command>,
    _files: Arc<WorkerFiles>,
}

impl std::fmt::Debug for Runspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runspace").field("pid", &self.info.pid).field("ps_version", &self.info.ps_version).finish()
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
        CancelHandle { shared: self.shared.clone() }
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
        let request = |id| protocol::encode(&protocol::Invoke { id, command });
        self.begin(request, timeout, command.name())
    }

    /// Runs the disconnect command (if one was configured), asks the worker to exit and waits for it.
    ///
    /// Returns the disconnect command's result. The worker is ended even when disconnecting fails; it is
    /// killed if it has not exited within the shutdown grace period.
    pub async fn close(mut self) -> Result<Option<InvocationResult>> {
        let disconnected = match self.disconnect.take() {
            Some(command) if self.exit_status().is_none() => Some(self.invoke(&command).await),
            _ => None,
        };
        self.shared.send(protocol::control("exit", None));
        let grace = self.limits.shutdown_grace;
        self.shared.monitor.wait_or_kill(grace, "did not exit within the shutdown grace period").await;
        disconnected.transpose()
    }

    /// Spawned process to ready worker: the handshake.
    async fn start(mut child: tokio::process::Child, files: Arc<WorkerFiles>, config: &RunspaceBuilder) -> Result<Runspace> {
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
        let shared = Arc::new(Shared {
            route: Mutex::new(None),
            running: Mutex::new(None),
            writer,
            monitor: monitor.clone(),
            violation: Mutex::new(None),
        });
        tokio::spawn(write_frames(stdin, frames));
        tokio::spawn(read_messages(lines, shared.clone()).instrument(tracing::debug_span!("worker", pid = info.pid)));
        guard.disarm();
        let limits = Limits {
            command_timeout: config.command_timeout,
            stop_grace: config.stop_grace,
            shutdown_grace: config.shutdown_grace,
            stream_buffer: config.stream_buffer,
        };
        Ok(Runspace { info, shared, limits, next_id: 1, expires_at: None, disconnect: None, _files: files })
    }

    async fn setup(&mut self, config: &RunspaceBuilder) -> Result<()> {
        let setup = |id| {
            protocol::encode(&protocol::Setup {
                id,
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
        let id = self.next_id;
        self.next_id += 1;
        let (events, receiver) = mpsc::channel(self.limits.stream_buffer);
        let cancelled = Arc::new(Notify::new());
        // Messages of an earlier, abandoned request are dropped by the reader from here on.
        *lock(&self.shared.route) = Some(Route { id, events });
        *lock(&self.shared.running) = Some(Running { id, cancelled: cancelled.clone() });
        self.shared.send(request(id));
        tracing::debug!(pid = self.info.pid, id, command = name, "invoke");
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
        if self.shared.monitor.exited().is_none() {
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

/// Stops the command a runspace is running, from any task.
///
/// ```no_run
/// # async fn demo(mut runspace: psbridge::Runspace) -> psbridge::Result<()> {
/// use std::time::Duration;
/// let cancel = runspace.cancel_handle();
/// tokio::spawn(async move {
///     tokio::time::sleep(Duration::from_secs(2)).await;
///     cancel.cancel();
/// });
/// let result = runspace.invoke(&psbridge::Command::script("Start-Sleep 60")).await;
/// assert!(matches!(result, Err(psbridge::Error::Cancelled { worker_killed: false })));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CancelHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelHandle").field("pid", &self.shared.monitor.pid()).finish()
    }
}

impl CancelHandle {
    /// Asks the worker to stop the running command. Returns whether a command was running.
    ///
    /// The invocation then ends with [`Error::Cancelled`]; if the command does not stop within the stop
    /// grace period, the worker is killed.
    pub fn cancel(&self) -> bool {
        let running = lock(&self.shared.running);
        match running.as_ref() {
            Some(running) => {
                self.shared.cancel(running.id);
                running.cancelled.notify_one();
                true
            }
            None => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopCause {
    Timeout(Duration),
    Cancel,
}

/// A running command whose stream items are read one by one. See [`Runspace::invoke_stream`].
///
/// Dropping it before the end stops the command in the worker.
pub struct Invocation<'r> {
    runspace: &'r mut Runspace,
    id: u64,
    name: String,
    receiver: mpsc::Receiver<Result<Event>>,
    deadline: Option<(Instant, Duration)>,
    stopping: Option<(StopCause, Instant)>,
    completion: Option<Completion>,
    cancelled: Arc<Notify>,
    stop_grace: Duration,
}

impl std::fmt::Debug for Invocation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invocation").field("id", &self.id).field("completion", &self.completion).finish()
    }
}

impl Invocation<'_> {
    /// The next item of any stream, in the order the worker wrote them; `Ok(None)` at the end.
    ///
    /// # Cancel safety
    /// Cancel safe: an item is only taken from the channel when it is returned.
    pub async fn next_item(&mut self) -> Result<Option<StreamItem>> {
        if self.completion.is_some() {
            return Ok(None);
        }
        loop {
            let wake = match (self.stopping, self.deadline) {
                (Some((_, grace_end)), _) => Some(grace_end),
                (None, Some((deadline, _))) => Some(deadline),
                (None, None) => None,
            };
            tokio::select! {
                event = self.receiver.recv() => return self.on_event(event).await,
                () = self.cancelled.notified(), if self.stopping.is_none() => {
                    self.stopping = Some((StopCause::Cancel, Instant::now() + self.stop_grace));
                }
                () = sleep_until(wake), if wake.is_some() => {
                    if let Some((cause, _)) = self.stopping {
                        return Err(self.kill_unstoppable(cause).await);
                    }
                    let after = self.deadline.map(|(_, after)| after).unwrap_or_default();
                    self.runspace.shared.cancel(self.id);
                    self.stopping = Some((StopCause::Timeout(after), Instant::now() + self.stop_grace));
                }
            }
        }
    }

    /// Asks the worker to stop this command; the next [`next_item`](Self::next_item) calls drain what is
    /// left and end with [`Error::Cancelled`].
    pub fn cancel(&mut self) {
        if self.completion.is_none() && self.stopping.is_none() {
            self.runspace.shared.cancel(self.id);
            self.stopping = Some((StopCause::Cancel, Instant::now() + self.stop_grace));
        }
    }

    /// How the command ended, once [`next_item`](Self::next_item) has returned `Ok(None)`.
    pub fn completion(&self) -> Option<Completion> {
        self.completion
    }

    async fn on_event(&mut self, event: Option<Result<Event>>) -> Result<Option<StreamItem>> {
        match event {
            Some(Ok(Event::Item(item))) => Ok(Some(item)),
            Some(Ok(Event::Done(completion))) => {
                self.completion = Some(completion);
                *lock(&self.runspace.shared.running) = None;
                match (self.stopping, completion.state) {
                    (Some((StopCause::Timeout(after), _)), PipelineState::Stopped) => {
                        Err(self.timeout(after, false))
                    }
                    (Some((StopCause::Cancel, _)), PipelineState::Stopped) => Err(Error::Cancelled { worker_killed: false }),
                    // Finished before the stop took effect: the result is complete and valid.
                    _ => Ok(None),
                }
            }
            Some(Err(error)) => Err(error),
            None => {
                // The reader ended: the worker is gone or broke the protocol.
                let exit = self.runspace.shared.monitor.wait().await;
                Err(self.runspace.dead_error(exit))
            }
        }
    }

    fn timeout(&self, after: Duration, worker_killed: bool) -> Error {
        let credentials_expired_at = self.runspace.expires_at.filter(|at| *at <= SystemTime::now());
        Error::Timeout { command: self.name.clone(), after, worker_killed, credentials_expired_at }
    }

    async fn kill_unstoppable(&mut self, cause: StopCause) -> Error {
        let reason = match cause {
            StopCause::Timeout(_) => "command timed out and did not stop within the grace period",
            StopCause::Cancel => "cancelled command did not stop within the grace period",
        };
        self.runspace.shared.monitor.kill_and_wait(reason).await;
        self.completion = Some(Completion { had_errors: true, state: PipelineState::Stopped, ..Completion::default() });
        match cause {
            StopCause::Timeout(after) => self.timeout(after, true),
            StopCause::Cancel => Error::Cancelled { worker_killed: true },
        }
    }
}

impl Drop for Invocation<'_> {
    fn drop(&mut self) {
        if self.completion.is_none() {
            // The caller went away mid-command: stop it so the worker is free for the next one.
            self.runspace.shared.cancel(self.id);
        }
        let mut running = lock(&self.runspace.shared.running);
        if running.as_ref().is_some_and(|r| r.id == self.id) {
            *running = None;
        }
    }
}

async fn collect(mut invocation: Invocation<'_>) -> Result<InvocationResult> {
    let mut result = InvocationResult { attempts: 1, ..InvocationResult::default() };
    while let Some(item) = invocation.next_item().await? {
        result.push(item);
    }
    result.complete(invocation.completion().expect("a finished invocation has its completion"));
    Ok(result)
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
        let secret = secret.expose_secret();
        if secret.is_empty() {
            continue;
        }
        for record in records.iter_mut() {
            let fields = [
                Some(&mut record.message),
                record.exception_message.as_mut(),
                record.fully_qualified_error_id.as_mut(),
                record.target_name.as_mut(),
                record.category_info.as_mut(),
                record.target_object.as_mut(),
                record.position_message.as_mut(),
            ];
            for field in fields.into_iter().flatten() {
                if field.contains(secret) {
                    *field = field.replace(secret, "********");
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Owns the worker's stdin: writes frames in order, wipes them, and closes stdin (EOF: "owner gone")
/// when the runspace is dropped.
async fn write_frames(mut stdin: tokio::process::ChildStdin, mut frames: mpsc::UnboundedReceiver<Zeroizing<Vec<u8>>>) {
    use tokio::io::AsyncWriteExt;
    while let Some(frame) = frames.recv().await {
        if stdin.write_all(&frame).await.is_err() || stdin.flush().await.is_err() {
            break;
        }
    }
}

/// Owns the worker's stdout: decodes each line and hands it to the invocation it belongs to.
async fn read_messages(mut lines: FramedRead<ChildStdout, BoundedLines>, shared: Arc<Shared>) {
    while let Some(line) = lines.next().await {
        let message = match line {
            Ok(Line::Text(line)) => protocol::decode(&line),
            Ok(Line::TooLong) => {
                // The codec skipped to the next newline, so the stream stays in step: fail the current
                // invocation only.
                let error = Error::ProtocolViolation(
                    "a message from the worker was longer than max_line_length; raise RunspaceBuilder::max_line_length \
                     or select fewer properties"
                        .into(),
                );
                let current = lock(&shared.route).as_ref().map(|r| r.id);
                if let Some(id) = current {
                    deliver(&shared, id, Err(error)).await;
                    shared.cancel(id);
                }
                continue;
            }
            Err(error) => {
                // Nobody reads the worker's output any more: end it rather than leave it blocked.
                tracing::error!(pid = shared.monitor.pid(), %error, "reading the worker's stdout failed");
                shared.monitor.kill("reading its stdout failed");
                break;
            }
        };
        match message {
            Ok(Message::Item(id, item)) => deliver(&shared, id, Ok(Event::Item(item))).await,
            Ok(Message::Done(id, completion)) => {
                deliver(&shared, id, Ok(Event::Done(completion))).await;
                let mut route = lock(&shared.route);
                if route.as_ref().is_some_and(|r| r.id == id) {
                    *route = None;
                }
            }
            Ok(Message::Fatal(id, message)) => {
                let current = lock(&shared.route).as_ref().map(|r| r.id);
                if let Some(current) = current.filter(|c| id.is_none_or(|id| id == *c)) {
                    deliver(&shared, current, Err(Error::ProtocolViolation(format!("the worker could not read a request: {message}")))).await;
                }
            }
            Ok(Message::Ready(_)) | Err(_) => {
                // Something other than the worker's writer reached the protocol stream: nothing it says
                // can be trusted any more.
                let why = match message {
                    Err(Error::ProtocolViolation(why)) => why,
                    _ => "a second ready message".into(),
                };
                tracing::error!(pid = shared.monitor.pid(), "{why}");
                *lock(&shared.violation) = Some(why);
                shared.monitor.kill("protocol violation");
                break;
            }
        }
    }
    // Dropping the route's sender ends the current invocation's channel.
    lock(&shared.route).take();
}

async fn deliver(shared: &Shared, id: u64, event: Result<Event>) {
    let events = lock(&shared.route).as_ref().filter(|r| r.id == id).map(|r| r.events.clone());
    if let Some(events) = events {
        // A closed channel means the caller dropped the invocation; its Drop already sent a cancel.
        let _ = events.send(event).await;
    }
}
