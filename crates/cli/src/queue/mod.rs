//! Batches spread over many hosts through NATS JetStream.
//!
//! `psbridge batch --queue URL` ([`submit`]) publishes a batch's items; `psbridge serve --queue URL`
//! hosts ([`host`]) pull the items of the profiles they serve, run them on their pools and record each
//! result; `psbridge queue status|results|cancel` ([`command`]) look at a batch or stop it. Where
//! everything lives in JetStream, and why same-key order and exactly-once results hold, is in
//! [`layout`] and the README's queue section. [`connect`] opens the connection (credentials, TLS);
//! [`item`] is what travels; [`results`] reads a batch's recorded results.

pub mod command;
pub mod connect;
pub mod host;
pub mod item;
pub mod layout;
pub mod results;
pub mod submit;

use crate::exit::{EXIT_BRIDGE, EXIT_OUTPUT, EXIT_USAGE};

/// What can go wrong between psbridge and the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The URL is not one psbridge connects to.
    #[error("--queue {url}: {reason}")]
    Url { url: String, reason: String },
    /// A credential of the `[queue]` section could not be read.
    #[error("queue credentials: {0}")]
    Secret(#[from] crate::secret::SecretError),
    /// The NATS server could not be reached (or refused the credentials).
    #[error("cannot connect to the queue at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// A JetStream request failed.
    #[error("the queue could not {what}: {source}")]
    JetStream {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No batch of this id is in the queue.
    #[error("the queue has no batch {batch}")]
    UnknownBatch { batch: String },
    /// The batch cannot be used as asked; the text says what to do.
    #[error("{0}")]
    Refused(String),
    /// The results could not be written (already reported).
    #[error("the results could not be written")]
    Output,
}

impl QueueError {
    /// A function turning a JetStream error into [`QueueError::JetStream`] saying what failed.
    pub fn jetstream<E: std::error::Error + Send + Sync + 'static>(what: &'static str) -> impl FnOnce(E) -> QueueError {
        move |source| QueueError::JetStream { what, source: Box::new(source) }
    }

    /// The exit status: 2 for what the user can fix in the command or the configuration, 3 for a queue
    /// that cannot be reached or used.
    pub fn exit_code(&self) -> u8 {
        match self {
            QueueError::Url { .. } | QueueError::Secret(_) | QueueError::UnknownBatch { .. } | QueueError::Refused(_) => EXIT_USAGE,
            QueueError::Connect { .. } | QueueError::JetStream { .. } => EXIT_BRIDGE,
            QueueError::Output => EXIT_OUTPUT,
        }
    }
}
