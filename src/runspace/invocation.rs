//! [`Invocation`]: one running command, from its request to its `done`, with cancel and timeout.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::channel::{Event, Shared};
use super::{Runspace, lock};
use crate::errors::{Error, Result};
use crate::records::{Completion, InvocationResult, PipelineState, StreamItem};

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
    pub(super) shared: Arc<Shared>,
    pub(super) lane: usize,
}

impl std::fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelHandle").field("pid", &self.shared.monitor.pid()).field("runspace", &self.lane).finish()
    }
}

impl CancelHandle {
    /// Asks the worker to stop the command its runspace is running. Returns whether a command was running.
    ///
    /// The invocation then ends with [`Error::Cancelled`]; if the command does not stop within the stop
    /// grace period, the worker is killed.
    pub fn cancel(&self) -> bool {
        let running = lock(&self.shared.lanes[self.lane].running);
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
pub(super) enum StopCause {
    Timeout(Duration),
    Cancel,
}

/// A running command whose stream items are read one by one. See [`Runspace::invoke_stream`].
///
/// Dropping it before the end stops the command in the worker.
pub struct Invocation<'r> {
    pub(super) runspace: &'r mut Runspace,
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) receiver: mpsc::Receiver<Result<Event>>,
    pub(super) deadline: Option<(Instant, Duration)>,
    pub(super) stopping: Option<(StopCause, Instant)>,
    pub(super) completion: Option<Completion>,
    pub(super) cancelled: Arc<Notify>,
    pub(super) stop_grace: Duration,
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
                *lock(&self.runspace.lane().running) = None;
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
                // The reader ended: the worker is gone, broke the protocol, or closed its stdout. One that
                // closed its stdout but lives on can never answer again: it gets the stop grace to exit.
                let grace = self.stop_grace;
                let exit = self.runspace.shared.monitor.wait_or_kill(grace, "closed its stdout but did not exit").await;
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
        let mut running = lock(&self.runspace.lane().running);
        if running.as_ref().is_some_and(|r| r.id == self.id) {
            *running = None;
        }
    }
}

pub(super) async fn collect(mut invocation: Invocation<'_>) -> Result<InvocationResult> {
    let mut result = InvocationResult { attempts: 1, ..InvocationResult::default() };
    while let Some(item) = invocation.next_item().await? {
        result.push(item);
    }
    result.complete(invocation.completion().expect("a finished invocation has its completion"));
    Ok(result)
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

