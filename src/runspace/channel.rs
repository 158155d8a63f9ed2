//! The tasks that own the worker's pipes: one writes requests to its stdin, one reads its stdout and
//! routes each message to the invocation it belongs to (by request id; late messages of an abandoned
//! request are dropped). A worker process hosts one or more runspaces (lanes); request ids are unique
//! per process, so the id alone says which lane's invocation a message belongs to.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio::process::ChildStdout;
use tokio::sync::{Notify, mpsc};
use tokio_util::codec::FramedRead;
use zeroize::Zeroizing;

use super::lock;
use crate::errors::{Error, Result};
use crate::lines::{BoundedLines, Line};
use crate::process::ProcessMonitor;
use crate::protocol::{self, Message};
use crate::records::{Completion, StreamItem};

/// What the reader task delivers to the invocation it belongs to.
pub(super) enum Event {
    Item(StreamItem),
    Done(Completion),
}

/// The invocation the reader currently delivers to.
pub(super) struct Route {
    pub(super) id: u64,
    pub(super) events: mpsc::Sender<Result<Event>>,
}

/// The running invocation, as seen by [`CancelHandle`]s.
pub(super) struct Running {
    pub(super) id: u64,
    pub(super) cancelled: Arc<Notify>,
}

/// One runspace (lane) of the worker process: the invocation its messages go to, and the one its cancel
/// handles stop.
#[derive(Default)]
pub(super) struct Lane {
    pub(super) route: Mutex<Option<Route>>,
    pub(super) running: Mutex<Option<Running>>,
}

/// State shared by the runspaces of one worker process, its reader task and its cancel handles.
pub(super) struct Shared {
    pub(super) lanes: Vec<Lane>,
    pub(super) writer: mpsc::UnboundedSender<Zeroizing<Vec<u8>>>,
    pub(super) monitor: Arc<ProcessMonitor>,
    /// Why the reader stopped trusting the worker, if it did.
    pub(super) violation: Mutex<Option<String>>,
    /// The next request id: unique in the process, whichever runspace sends it.
    next_id: AtomicU64,
    /// Runspaces of the process neither closed nor dropped; the last one ends the process.
    open_lanes: AtomicUsize,
}

impl Shared {
    pub(super) fn new(lanes: usize, writer: mpsc::UnboundedSender<Zeroizing<Vec<u8>>>, monitor: Arc<ProcessMonitor>) -> Shared {
        Shared {
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            writer,
            monitor,
            violation: Mutex::new(None),
            next_id: AtomicU64::new(1),
            open_lanes: AtomicUsize::new(lanes),
        }
    }

    pub(super) fn send(&self, frame: Zeroizing<Vec<u8>>) {
        // A closed writer means the worker is gone; the caller learns that from the event channel.
        let _ = self.writer.send(frame);
    }

    pub(super) fn cancel(&self, id: u64) {
        self.send(protocol::control("cancel", Some(id)));
    }

    pub(super) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }

    /// A runspace is closed or dropped: true when it was the process's last one.
    pub(super) fn release_lane(&self) -> bool {
        self.open_lanes.fetch_sub(1, Ordering::SeqCst) == 1
    }

    /// The ids of the invocations every lane is routing to right now.
    fn current_ids(&self) -> Vec<u64> {
        self.lanes.iter().filter_map(|lane| lock(&lane.route).as_ref().map(|r| r.id)).collect()
    }
}

/// Owns the worker's stdin: writes frames in order, wipes them, and closes stdin (EOF: "owner gone")
/// when the runspace is dropped.
pub(super) async fn write_frames(mut stdin: tokio::process::ChildStdin, mut frames: mpsc::UnboundedReceiver<Zeroizing<Vec<u8>>>) {
    use tokio::io::AsyncWriteExt;
    while let Some(frame) = frames.recv().await {
        if stdin.write_all(&frame).await.is_err() || stdin.flush().await.is_err() {
            break;
        }
    }
}

/// Owns the worker's stdout: decodes each line and hands it to the invocation it belongs to.
pub(super) async fn read_messages(mut lines: FramedRead<ChildStdout, BoundedLines>, shared: Arc<Shared>) {
    while let Some(line) = lines.next().await {
        let message = match line {
            Ok(Line::Text(line)) => protocol::decode(&line),
            Ok(Line::TooLong) => {
                // The codec skipped to the next newline, so the stream stays in step: fail the current
                // invocations only (with several runspaces in the process, the skipped line could have
                // been any running one's, so every running one fails).
                for id in shared.current_ids() {
                    let error = Error::ProtocolViolation(
                        "a message from the worker was longer than max_line_length; raise RunspaceBuilder::max_line_length \
                         or select fewer properties"
                            .into(),
                    );
                    deliver(&shared, id, Err(error)).await;
                    shared.cancel(id);
                }
                continue;
            }
            Err(error) => {
                // Nobody reads the worker's output any more: end it rather than leave it blocked.
                tracing::error!(pid = ?shared.monitor.pid(), %error, "reading the worker's stdout failed");
                shared.monitor.kill("reading its stdout failed");
                break;
            }
        };
        match message {
            Ok(Message::Item(id, item)) => deliver(&shared, id, Ok(Event::Item(item))).await,
            Ok(Message::Done(id, completion)) => {
                deliver(&shared, id, Ok(Event::Done(completion))).await;
                for lane in &shared.lanes {
                    let mut route = lock(&lane.route);
                    if route.as_ref().is_some_and(|r| r.id == id) {
                        *route = None;
                    }
                }
            }
            Ok(Message::Fatal(id, message)) => {
                // Without an id the worker could not tell whose request it was: every running one fails.
                for current in shared.current_ids().into_iter().filter(|c| id.is_none_or(|id| id == *c)) {
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
                tracing::error!(pid = ?shared.monitor.pid(), "{why}");
                *lock(&shared.violation) = Some(why);
                shared.monitor.kill("protocol violation");
                break;
            }
        }
    }
    // Dropping the routes' senders ends the current invocations' channels.
    for lane in &shared.lanes {
        lock(&lane.route).take();
    }
}

pub(super) async fn deliver(shared: &Shared, id: u64, event: Result<Event>) {
    let events = shared.lanes.iter().find_map(|lane| lock(&lane.route).as_ref().filter(|r| r.id == id).map(|r| r.events.clone()));
    if let Some(events) = events {
        // A closed channel means the caller dropped the invocation; its Drop already sent a cancel.
        let _ = events.send(event).await;
    }
}

