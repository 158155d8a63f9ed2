//! Reading a batch's entries in a bucket: those recorded so far, then each new one as it is recorded,
//! across reconnects and server restarts (a watch that ends is opened again after the last revision
//! seen).

use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::QueueError;

/// How long to wait before watching again after a watch failed (the server restarting, say).
const REWATCH_DELAY: Duration = Duration::from_millis(500);

/// The entries of one batch in one bucket (`<batch>.*` of results, `<batch>.>` of duplicates), as
/// `(key token after the batch, value)`.
pub struct BatchWatch {
    store: kv::Store,
    filter: String,
    prefix: String,
    watch: Option<kv::Watch>,
    last_revision: u64,
}

impl BatchWatch {
    /// Watches `filter` in `store` (keys starting with `prefix`); returns the watch and every entry
    /// recorded so far, in the order they were recorded.
    pub async fn open<T: DeserializeOwned>(store: &kv::Store, prefix: String, filter: String) -> Result<(BatchWatch, Vec<(String, T)>), QueueError> {
        // How many keys there are now: a watch of history says nothing while there is none.
        let subjects = format!("$KV.{}.{filter}", store.name);
        let stream = store.stream.clone();
        let mut counts = stream.info_with_subjects(&subjects).await.map_err(QueueError::jetstream("count the recorded results"))?;
        let mut existing = 0usize;
        while let Some(subject) = counts.next().await {
            subject.map_err(QueueError::jetstream("count the recorded results"))?;
            existing += 1;
        }
        let watch = store.watch_with_history(&filter).await.map_err(QueueError::jetstream("watch the results"))?;
        let mut this = BatchWatch { store: store.clone(), filter, prefix, watch: Some(watch), last_revision: 0 };
        let mut recorded = Vec::new();
        if existing > 0 {
            loop {
                let watch = this.watch.as_mut().expect("just opened");
                let entry = match watch.next().await {
                    Some(Ok(entry)) => entry,
                    Some(Err(error)) => return Err(QueueError::jetstream("read the recorded results")(error)),
                    None => return Err(QueueError::Refused("the results' watch ended while reading them".to_owned())),
                };
                let last = entry.delta == 0;
                if let Some(value) = this.accept(entry) {
                    recorded.push(value);
                }
                if last {
                    break;
                }
            }
        }
        Ok((this, recorded))
    }

    /// The next entry recorded. Cancel safe. A watch that fails or ends (the server restarting) is
    /// opened again from the revision after the last one seen, so no entry is missed or given twice.
    pub async fn next<T: DeserializeOwned>(&mut self) -> (String, T) {
        loop {
            let watch = match &mut self.watch {
                Some(watch) => watch,
                None => match self.store.watch_from_revision(&self.filter, self.last_revision + 1).await {
                    Ok(watch) => self.watch.insert(watch),
                    Err(error) => {
                        tracing::warn!(%error, "cannot watch the queue's results; trying again");
                        tokio::time::sleep(REWATCH_DELAY).await;
                        continue;
                    }
                },
            };
            match watch.next().await {
                Some(Ok(entry)) => {
                    if let Some(value) = self.accept(entry) {
                        return value;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "the queue's results watch failed; watching again");
                    self.watch = None;
                    tokio::time::sleep(REWATCH_DELAY).await;
                }
                None => {
                    self.watch = None;
                    tokio::time::sleep(REWATCH_DELAY).await;
                }
            }
        }
    }

    /// An entry's key token and value; `None` for one already seen, a deletion or a value that does
    /// not parse (reported).
    fn accept<T: DeserializeOwned>(&mut self, entry: kv::Entry) -> Option<(String, T)> {
        if entry.revision <= self.last_revision {
            return None;
        }
        self.last_revision = entry.revision;
        if entry.operation != Operation::Put {
            return None;
        }
        let token = entry.key.strip_prefix(&self.prefix).unwrap_or(&entry.key).to_owned();
        match serde_json::from_slice(&entry.value) {
            Ok(value) => Some((token, value)),
            Err(error) => {
                tracing::warn!(key = %entry.key, %error, "an entry of the queue is not one psbridge wrote; ignored");
                None
            }
        }
    }
}
