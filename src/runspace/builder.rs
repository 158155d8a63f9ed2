//! [`RunspaceBuilder`]: what a worker is started, set up and connected with.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::Runspace;
use crate::command::Command;
use crate::connect::{Connector, Fixed};
use crate::errors::{Error, Result};
use crate::locate::find_pwsh;
use crate::process;
use crate::protocol::ModuleSpec;
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
#[derive(Debug, Clone, Default)]
pub struct RunspaceBuilder {
    settings: Settings,
}

/// Everything a runspace is opened with: the builder's settings, read by the open steps.
#[derive(Debug, Clone)]
pub(super) struct Settings {

    pub(super) pwsh: Option<PathBuf>,
    pub(super) modules: Vec<ModuleSpec>,
    pub(super) module_paths: Vec<PathBuf>,
    pub(super) execution_policy: Option<String>,
    pub(super) variables: Map<String, Value>,
    pub(super) env: Vec<(OsString, OsString)>,
    pub(super) env_removed: Vec<OsString>,
    pub(super) connect: Option<Arc<dyn Connector>>,
    pub(super) disconnect: Option<Command>,
    pub(super) start_timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) command_timeout: Option<Duration>,
    pub(super) stop_grace: Duration,
    pub(super) shutdown_grace: Duration,
    pub(super) max_line_length: usize,
    pub(super) depth: u32,
    pub(super) stderr_tail_lines: usize,
    pub(super) assembly_cache: Option<PathBuf>,
    pub(super) stream_buffer: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
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
        self.settings.pwsh = Some(path.into());
        self
    }

    /// Imports a module (by name or path) when the session opens. Default: none.
    pub fn module(mut self, name: impl Into<String>) -> Self {
        self.settings.modules.push(ModuleSpec { name: name.into(), minimum_version: None });
        self
    }

    /// Imports a module of at least `minimum_version`.
    pub fn module_with_version(mut self, name: impl Into<String>, minimum_version: impl Into<String>) -> Self {
        self.settings.modules.push(ModuleSpec { name: name.into(), minimum_version: Some(minimum_version.into()) });
        self
    }

    /// Puts a folder in front of the worker's `PSModulePath`. Default: the inherited `PSModulePath`.
    pub fn module_path(mut self, folder: impl Into<PathBuf>) -> Self {
        self.settings.module_paths.push(folder.into());
        self
    }

    /// The session's execution policy, where the platform has one (Windows). Default: the machine's.
    pub fn execution_policy(mut self, policy: impl Into<String>) -> Self {
        self.settings.execution_policy = Some(policy.into());
        self
    }

    /// Defines a variable in the session before anything runs. Default: none.
    pub fn variable(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.settings.variables.insert(name.into(), value.into());
        self
    }

    /// Sets an environment variable for the worker process (never use this for secrets). Default: the
    /// owner's environment, inherited.
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.settings.env.push((name.into(), value.into()));
        self
    }

    /// Removes a variable from the worker's environment, so that neither the session nor any program it
    /// starts sees it: for example the variable a secret was read from. Default: nothing removed.
    pub fn env_remove(mut self, name: impl Into<OsString>) -> Self {
        let name = name.into();
        self.settings.env.retain(|(set, _)| set != &name);
        self.settings.env_removed.push(name);
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
        self.settings.connect = Some(Arc::new(connector));
        self
    }

    /// A command run by [`Runspace::close`] before the worker exits. Default: none.
    pub fn disconnect(mut self, command: Command) -> Self {
        self.settings.disconnect = Some(command);
        self
    }

    /// Limit for starting pwsh, the handshake and session set-up together. Default: 60 s.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.settings.start_timeout = timeout;
        self
    }

    /// Limit for the connect command. Default: 180 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Default limit for each command; [`Command::timeout`] overrides it. Default: none.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.settings.command_timeout = Some(timeout);
        self
    }

    /// How long a stopped command (cancel or timeout) may take to stop before the worker is killed.
    /// Default: 5 s.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.settings.stop_grace = grace;
        self
    }

    /// How long [`Runspace::close`] waits for the worker to exit after the disconnect command before it
    /// kills it. Default: 10 s.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.settings.shutdown_grace = grace;
        self
    }

    /// Longest protocol line (one serialized object) accepted from the worker. Default: 64 MiB.
    pub fn max_line_length(mut self, bytes: usize) -> Self {
        self.settings.max_line_length = bytes;
        self
    }

    /// How deep nested objects are serialized before they become their `ToString()`. Default: 4.
    pub fn depth(mut self, depth: u32) -> Self {
        self.settings.depth = depth;
        self
    }

    /// How many of the worker's last stderr lines are kept for error reports. Default: 40.
    pub fn stderr_tail_lines(mut self, lines: usize) -> Self {
        self.settings.stderr_tail_lines = lines;
        self
    }

    /// Where the compiled worker host is cached between workers (saves about 2 s per start), or `None`
    /// to compile in memory every time. Default: `<user cache dir>/psbridge`.
    pub fn assembly_cache(mut self, folder: Option<PathBuf>) -> Self {
        self.settings.assembly_cache = folder;
        self
    }

    /// How many stream items may wait between the worker and a slow consumer before the worker is made
    /// to wait (backpressure). Default: 64.
    pub fn stream_buffer(mut self, items: usize) -> Self {
        self.settings.stream_buffer = items.max(1);
        self
    }

    pub(crate) fn stream_buffer_len(&self) -> usize {
        self.settings.stream_buffer
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
        let mut runspaces = self.open_many(1).await?;
        Ok(runspaces.pop().expect("open_many(1) opens one runspace"))
    }

    /// Starts one worker process hosting `count` runspaces (at least 1, at most 64), each set up and
    /// connected on its own, as Microsoft's Sample 2 connects each runspace of its pool: every runspace
    /// imports the modules, gets the session variables and runs the connect command (with credentials
    /// read anew for each), in parallel. The runspaces run commands at the same time, each on a thread
    /// of its own in the worker, and share the process: its memory, its JIT-compiled code, and its fate
    /// (a crash or a kill ends them all). The last one closed or dropped ends the process.
    ///
    /// ```no_run
    /// # async fn demo() -> psbridge::Result<()> {
    /// use psbridge::{Command, Runspace};
    /// let mut runspaces = Runspace::builder().open_many(3).await?;
    /// let (a, rest) = runspaces.split_first_mut().unwrap();
    /// let (b, c) = rest.split_first_mut().unwrap();
    /// let sleep = Command::script("Start-Sleep 1");
    /// // About one second, not three: each runspace runs its command on a thread of its own.
    /// let (x, y, z) = tokio::join!(a.invoke(&sleep), b.invoke(&sleep), c[0].invoke(&sleep));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`open`](Self::open); when any runspace fails to set up or connect, the process is killed and
    /// the first failure returned.
    pub async fn open_many(self, count: usize) -> Result<Vec<Runspace>> {
        let count = count.clamp(1, MAX_RUNSPACES_PER_WORKER);
        // The credentials first: when they cannot be had (an expired token, a source that fails), no
        // process is started for nothing, and a pool's bounded attempts take milliseconds, not seconds.
        let mut connections = Vec::with_capacity(count);
        if let Some(connector) = &self.settings.connect {
            for _ in 0..count {
                connections.push(Some(connector.connection().await.map_err(|source| Error::Credentials { source })?));
            }
        } else {
            connections.resize_with(count, || None);
        }
        let pwsh = find_pwsh(self.settings.pwsh.as_deref())?;
        let spawn_error = |source| Error::Spawn { path: pwsh.clone(), source };
        let files = WorkerFiles::shared().map_err(spawn_error)?;
        let child = process::spawn(self.process_command(&pwsh, &files)).await.map_err(spawn_error)?;
        let mut runspaces = Runspace::start(child, files, &self.settings, count).await?;
        let settings = &self.settings;
        let opened = futures_util::future::join_all(runspaces.iter_mut().zip(connections).map(|(runspace, connection)| async move {
            runspace.setup(settings).await?;
            if let Some(connection) = connection {
                runspace.connect(&connection.command, settings.connect_timeout).await?;
                runspace.expires_at = connection.expires_at;
            }
            runspace.disconnect = settings.disconnect.clone();
            Ok::<(), Error>(())
        }))
        .await;
        // Dropping the runspaces (on the way out with an error) kills the process.
        opened.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(runspaces)
    }

    fn process_command(&self, pwsh: &std::path::Path, files: &WorkerFiles) -> std::process::Command {
        let mut command = std::process::Command::new(pwsh);
        command.args(["-NoLogo", "-NoProfile", "-NonInteractive", "-File"]).arg(files.script());
        if let Some(cache) = &self.settings.assembly_cache {
            command.arg("-CacheDirectory").arg(cache);
        }
        command.env("POWERSHELL_TELEMETRY_OPTOUT", "1").env("POWERSHELL_UPDATECHECK", "Off").env("NO_COLOR", "1");
        if !self.settings.module_paths.is_empty() {
            let inherited = std::env::var_os("PSModulePath").unwrap_or_default();
            let paths = self.settings.module_paths.iter().cloned().chain(std::env::split_paths(&inherited));
            command.env("PSModulePath", std::env::join_paths(paths).unwrap_or(inherited));
        }
        // .NET's tiered PGO sends hot methods through an extra, instrumented JIT tier before the
        // optimized one; in a worker that keeps the first few thousand small commands up to 2x slower
        // (Get-Mailbox -Identity, 2,000 calls: ~1.2 ms instead of ~2.2 ms p50). Start-up is unchanged.
        // Only a performance setting: a value in the caller's environment or from `env()` wins, and the
        // worker removes ours from its environment again so that its child processes never see it.
        let chosen = |name: &OsString| name.to_str().is_some_and(|name| name.eq_ignore_ascii_case(TIERED_PGO));
        if std::env::var_os(TIERED_PGO).is_none() && !self.settings.env.iter().any(|(name, _)| chosen(name)) {
            command.env(TIERED_PGO, "0").env("PSBRIDGE_UNSET_TIERED_PGO", "1");
        }
        command.envs(self.settings.env.iter().map(|(k, v)| (k, v)));
        for name in &self.settings.env_removed {
            command.env_remove(name);
        }
        command
    }
}

/// The most runspaces one worker process hosts (the worker's `Lanes.MaxRunspaces`).
pub(crate) const MAX_RUNSPACES_PER_WORKER: usize = 64;

/// The .NET runtime setting psbridge turns off for its workers (see `process_command`).
const TIERED_PGO: &str = "DOTNET_TieredPGO";

