//! The pool's queue: first come, first served, except that commands with the same key wait for each
//! other, in order.

use std::collections::{HashSet, VecDeque};

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

use crate::command::Command;
use crate::errors::{Error, Result};
use crate::records::{Completion, InvocationResult, StreamItem};

/// What a streamed job sends: its items, then how it ended.
#[derive(Debug)]
pub(crate) enum Streamed {
    Item(StreamItem),
    Done(Completion),
}

/// Where a job's outcome goes.
pub(crate) enum Reply {
    /// `invoke`: the whole result at the end.
    Collect(oneshot::Sender<Result<InvocationResult>>),
    /// `invoke_stream`: items as they come, then the end or an error.
    Stream(mpsc::Sender<Result<Streamed>>),
}

impl Reply {
    /// Whether the caller has gone away.
    pub(crate) fn abandoned(&self) -> bool {
        match self {
            Reply::Collect(tx) => tx.is_closed(),
            Reply::Stream(tx) => tx.is_closed(),
        }
    }

    /// Sends a failure that ends the job.
    pub(crate) async fn fail(self, error: Error) {
        match self {
            Reply::Collect(tx) => {
                let _ = tx.send(Err(error));
            }
            Reply::Stream(tx) => {
                let _ = tx.send(Err(error)).await;
            }
        }
    }
}

/// One command waiting for, or running on, a worker.
pub(crate) struct Job {
    pub(crate) command: Command,
    pub(crate) reply: Reply,
    pub(crate) enqueued: Instant,
    /// Tells the caller a worker took the job (ends its wait timeout).
    pub(crate) started: Option<oneshot::Sender<()>>,
    /// Runs on the worker just before the command is first sent to PowerShell
    /// ([`RunspacePool::submit_with_start`](super::RunspacePool::submit_with_start)).
    pub(crate) on_start: Option<OnStart>,
    /// A place in the bounded queue, given back when a worker takes the job.
    pub(crate) slot: Option<OwnedSemaphorePermit>,
    /// The attempt the next run will be (from 1); a job given back after its worker died counts on.
    pub(crate) attempt: u32,
    /// When it first met expired credentials: it runs again once on a worker connected after that.
    pub(crate) expired_at: Option<Instant>,
    /// How long it waited for its first worker, once one took it.
    pub(crate) queue_wait: Option<std::time::Duration>,
}

impl Job {
    pub(crate) fn new(command: Command, reply: Reply, started: Option<oneshot::Sender<()>>, on_start: Option<OnStart>, slot: Option<OwnedSemaphorePermit>) -> Job {
        Job { command, reply, enqueued: Instant::now(), started, on_start, slot, attempt: 1, expired_at: None, queue_wait: None }
    }
}

/// A caller's hook run when a worker begins a job.
pub(crate) type OnStart = Box<dyn FnOnce() + Send>;

/// Waiting jobs and the keys of running ones.
#[derive(Default)]
pub(crate) struct Queue {
    jobs: VecDeque<Job>,
    busy_keys: HashSet<String>,
}

impl Queue {
    pub(crate) fn push(&mut self, job: Job) {
        self.jobs.push_back(job);
    }

    /// Gives back a job a worker took but could not begin or must run again elsewhere (its worker died,
    /// its credentials expired): first in line again, its key free, so that it still runs before later
    /// jobs of the same key.
    pub(crate) fn give_back(&mut self, job: Job) {
        self.release(job.command.key_str());
        self.jobs.push_front(job);
    }

    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    /// The first job that may start now, its key marked busy. Jobs whose caller went away are dropped
    /// on the way; a job whose key is busy, or has an earlier job still waiting, is passed over.
    pub(crate) fn take(&mut self) -> Option<Job> {
        self.jobs.retain(|job| !job.reply.abandoned());
        let mut blocked: HashSet<&str> = HashSet::new();
        let index = self.jobs.iter().position(|job| match job.command.key_str() {
            None => true,
            Some(key) if self.busy_keys.contains(key) || blocked.contains(key) => {
                blocked.insert(key);
                false
            }
            Some(_) => true,
        })?;
        let mut job = self.jobs.remove(index)?;
        if let Some(key) = job.command.key_str() {
            self.busy_keys.insert(key.to_owned());
        }
        job.slot = None;
        Some(job)
    }

    /// A job with this key finished: the next one with the key may start.
    pub(crate) fn release(&mut self, key: Option<&str>) {
        if let Some(key) = key {
            self.busy_keys.remove(key);
        }
    }

    /// Every waiting job, for shutdown.
    pub(crate) fn drain(&mut self) -> Vec<Job> {
        self.jobs.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, key: Option<&str>) -> (Job, oneshot::Receiver<Result<InvocationResult>>) {
        let (tx, rx) = oneshot::channel();
        let mut command = Command::new(name);
        if let Some(key) = key {
            command = command.key(key);
        }
        (Job::new(command, Reply::Collect(tx), None, None, None), rx)
    }

    fn names(queue: &mut Queue) -> Vec<String> {
        std::iter::from_fn(|| queue.take()).map(|j| j.command.name().to_owned()).collect()
    }

    #[test]
    fn same_key_waits_in_order_and_other_keys_pass() {
        let mut queue = Queue::default();
        let mut receivers = Vec::new();
        for (name, key) in [("a1", Some("a")), ("a2", Some("a")), ("b1", Some("b")), ("free", None), ("a3", Some("a"))] {
            let (job, rx) = job(name, key);
            queue.push(job);
            receivers.push(rx);
        }
        // a1 runs; a2 and a3 wait for it; b1 and the keyless one pass them.
        assert_eq!(names(&mut queue), ["a1", "b1", "free"]);
        queue.release(Some("a"));
        assert_eq!(names(&mut queue), ["a2"]);
        queue.release(Some("b"));
        assert_eq!(names(&mut queue), Vec::<String>::new(), "a3 still waits for a2");
        queue.release(Some("a"));
        assert_eq!(names(&mut queue), ["a3"]);
    }

    #[test]
    fn jobs_whose_caller_left_are_skipped() {
        let mut queue = Queue::default();
        let (gone, rx) = job("gone", Some("k"));
        drop(rx);
        queue.push(gone);
        let (kept, _rx) = job("kept", Some("k"));
        queue.push(kept);
        assert_eq!(names(&mut queue), ["kept"]);
        assert_eq!(queue.len(), 0);
    }
}
