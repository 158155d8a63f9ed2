//! The worker process: spawning it so that it dies with its owner, draining its stderr, reaping it.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::process::{Child, ChildStderr};
use tokio::sync::{Notify, watch};

use crate::errors::WorkerExit;
use crate::lines::{Line, bounded_lines};

/// Longest stderr line kept; pwsh's own error output is far shorter.
const MAX_STDERR_LINE: usize = 64 * 1024;

/// Spawns the worker with piped stdio, in a process group of its own, killed when its owner goes away.
///
/// On Linux the child also gets `PR_SET_PDEATHSIG`. That signal fires when the *thread* that forked
/// the child ends, so the fork happens on one long-lived thread of psbridge's own rather than on
/// whatever runtime thread called `open` (a blocking-pool thread exits after 10 s idle).
pub(crate) async fn spawn(mut command: std::process::Command) -> std::io::Result<Child> {
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    #[cfg(unix)]
    {
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        // Tells the worker the group is its own to end when the owner disappears (see worker.ps1).
        command.env("PSBRIDGE_OWN_GROUP", "1");
    }
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    #[cfg(target_os = "linux")]
    {
        spawner::spawn(command).await
    }
    #[cfg(not(target_os = "linux"))]
    {
        command.spawn()
    }
}

#[cfg(target_os = "linux")]
mod spawner {
    use std::sync::{Mutex, OnceLock, mpsc};

    use tokio::process::{Child, Command};
    use tokio::sync::oneshot;

    struct Job {
        command: Command,
        runtime: tokio::runtime::Handle,
        reply: oneshot::Sender<std::io::Result<Child>>,
    }

    pub(super) async fn spawn(mut command: Command) -> std::io::Result<Child> {
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe calls
        // are allowed; prctl and getppid are. The OS offers no other way to tie a child to its parent.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                // The parent may have died between fork and prctl: then nobody would ever send it.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    return Err(std::io::Error::other("parent exited during spawn"));
                }
                Ok(())
            });
        }
        let (reply, answer) = oneshot::channel();
        let job = Job { command, runtime: tokio::runtime::Handle::current(), reply };
        sender().lock().unwrap_or_else(|p| p.into_inner()).send(job).map_err(|_| spawner_gone())?;
        answer.await.map_err(|_| spawner_gone())?
    }

    fn sender() -> &'static Mutex<mpsc::Sender<Job>> {
        static SENDER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
        SENDER.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("psbridge-spawner".into())
                .spawn(move || {
                    for mut job in rx {
                        // Spawning registers the child with the caller's runtime (for wait()).
                        let _context = job.runtime.enter();
                        let _ = job.reply.send(job.command.spawn());
                    }
                })
                .expect("the spawner thread starts");
            Mutex::new(tx)
        })
    }

    fn spawner_gone() -> std::io::Error {
        std::io::Error::other("the psbridge spawner thread is gone")
    }
}

/// What the owner knows of a running worker process besides its pipes.
#[derive(Debug)]
pub(crate) struct ProcessMonitor {
    /// `None` only if the process was already reaped when the monitor started: then there is no group
    /// to signal (and signalling group 0 would hit psbridge's own).
    pid: Option<u32>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    kill_reason: Mutex<Option<String>>,
    kill: Notify,
    exit: watch::Receiver<Option<Arc<WorkerExit>>>,
}

impl ProcessMonitor {
    /// Starts draining stderr and waiting for the process. Both run until the process is gone.
    pub(crate) fn start(mut child: Child, tail_lines: usize) -> Arc<ProcessMonitor> {
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(tail_lines)));
        let drain = tokio::spawn(drain_stderr(stderr, pid.unwrap_or_default(), stderr_tail.clone(), tail_lines));
        let (exit_tx, exit) = watch::channel(None);
        let monitor = Arc::new(ProcessMonitor { pid, stderr_tail, kill_reason: Mutex::new(None), kill: Notify::new(), exit });
        tokio::spawn(reap(child, drain, monitor.clone(), exit_tx));
        monitor
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The exit, once the process has been reaped.
    pub(crate) fn exited(&self) -> Option<Arc<WorkerExit>> {
        self.exit.borrow().clone()
    }

    /// Waits until the process has been reaped.
    pub(crate) async fn wait(&self) -> Arc<WorkerExit> {
        let mut exit = self.exit.clone();
        let waited = exit.wait_for(Option::is_some).await;
        match waited {
            Ok(exit) => exit.clone().expect("wait_for returned a value"),
            // The reaper task is gone without a word: only when the runtime shuts down.
            Err(_) => Arc::new(WorkerExit {
                status: None,
                stderr_tail: self.stderr_tail(),
                killed_by_bridge: Some("runtime shut down".into()),
            }),
        }
    }

    /// Kills the process group (the worker and anything it started). The first reason given is kept.
    pub(crate) fn kill(&self, reason: &str) {
        self.kill_reason.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| reason.to_owned());
        self.kill.notify_one();
    }

    /// Kills and waits for the process to be reaped.
    pub(crate) async fn kill_and_wait(&self, reason: &str) -> Arc<WorkerExit> {
        self.kill(reason);
        self.wait().await
    }

    /// Waits up to `grace` for the process to exit by itself, then kills it.
    pub(crate) async fn wait_or_kill(&self, grace: Duration, reason: &str) -> Arc<WorkerExit> {
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(exit) => exit,
            Err(_) => self.kill_and_wait(reason).await,
        }
    }

    pub(crate) fn stderr_tail(&self) -> Vec<String> {
        self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }
}

async fn reap(
    mut child: Child,
    drain: tokio::task::JoinHandle<()>,
    monitor: Arc<ProcessMonitor>,
    exit_tx: watch::Sender<Option<Arc<WorkerExit>>>,
) {
    let status: Option<ExitStatus> = tokio::select! {
        status = child.wait() => status.ok(),
        () = monitor.kill.notified() => {
            kill_group(&mut child, monitor.pid);
            child.wait().await.ok()
        }
    };
    // Grandchildren (native programs a script started) share the group: end them too, so that nothing
    // outlives the worker. The pid was reaped an instant ago; Linux does not hand it out again that soon.
    if let Some(pid) = monitor.pid {
        kill_pgid(pid);
    }
    // Let the drain read what the process wrote last; a grandchild holding stderr open must not stall us.
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
    let exit = WorkerExit {
        status,
        stderr_tail: monitor.stderr_tail(),
        killed_by_bridge: monitor.kill_reason.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    };
    tracing::debug!(pid = ?monitor.pid, %exit, "worker exited");
    let _ = exit_tx.send(Some(Arc::new(exit)));
}

fn kill_group(child: &mut Child, pid: Option<u32>) {
    if let Some(pid) = pid {
        kill_pgid(pid);
    }
    let _ = child.start_kill();
}

/// SIGKILL to the worker's process group (the worker is its group's leader). Never group 0 or 1:
/// `killpg(0)` would signal psbridge's own group.
fn kill_pgid(pid: u32) {
    #[cfg(unix)]
    if let Ok(pgid) = i32::try_from(pid)
        && pgid > 1
    {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(unix))]
    let _ = pid;
}

async fn drain_stderr(stderr: ChildStderr, pid: u32, tail: Arc<Mutex<VecDeque<String>>>, keep: usize) {
    let mut lines = bounded_lines(stderr, MAX_STDERR_LINE);
    while let Some(line) = lines.next().await {
        let line = match line {
            Ok(Line::Text(line)) => line,
            Ok(Line::TooLong) => format!("[stderr line longer than {MAX_STDERR_LINE} bytes omitted]"),
            Err(_) => break,
        };
        tracing::debug!(target: "psbridge::worker_stderr", pid, "{line}");
        let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.len() == keep {
            tail.pop_front();
        }
        if keep > 0 {
            tail.push_back(line);
        }
    }
}
