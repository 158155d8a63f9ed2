//! Where a queued batch lives in JetStream: the work stream and its subjects, the consumers the hosts
//! share, and the key-value buckets of batches, results and duplicate attempts.
//!
//! ```text
//! stream PSBRIDGE_WORK (work queue, file storage)   subjects psbridge.work.<profile>.<partition>
//!     partition = the item's key hashed into 0..PARTITIONS; `any` for items without a key
//! consumer psbridge-<profile>-<partition>          pull, explicit ack, max_ack_pending 1 (keyed)
//! consumer psbridge-<profile>-any                  pull, explicit ack, max_ack_pending UNKEYED_IN_FLIGHT
//! bucket psbridge-batches     <batch>                the batch record (profile, input, state, generation)
//! bucket psbridge-results     <batch>.<item>         an item's first recorded result (create: first wins)
//! bucket psbridge-duplicates  <batch>.<item>.<nuid>  a later run of an item that already had a result
//! ```
//!
//! Every host and submitter creates what it needs with the same configuration, so whichever comes first
//! sets it up; nothing needs an administrator beyond a nats-server with JetStream.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use sha2::{Digest, Sha256};

use super::QueueError;

/// The work stream.
pub const WORK_STREAM: &str = "PSBRIDGE_WORK";
/// The prefix of every work subject.
const WORK_PREFIX: &str = "psbridge.work";
/// Keyed partitions per profile: items whose keys hash alike run one after the other.
pub const PARTITIONS: usize = 32;
/// Unkeyed items one profile may have running at once, over all hosts.
const UNKEYED_IN_FLIGHT: i64 = 10_000;
/// How long the stream remembers a published message id, so that a re-run (or a retried publish)
/// within it does not queue an item twice. Later copies are still harmless: a host skips an item whose
/// result is recorded.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);
/// The bucket of batch records.
pub const BATCHES: &str = "psbridge-batches";
/// The bucket of results.
pub const RESULTS: &str = "psbridge-results";
/// The bucket of duplicate attempts.
pub const DUPLICATES: &str = "psbridge-duplicates";

/// A partition of a profile's work: one of the keyed ones, or the unkeyed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Partition {
    Keyed(usize),
    Unkeyed,
}

impl Partition {
    /// The partition of an item with this key (or none).
    pub fn of(key: Option<&str>) -> Partition {
        match key {
            Some(key) => {
                let digest = Sha256::digest(key.as_bytes());
                let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
                Partition::Keyed((n % PARTITIONS as u64) as usize)
            }
            None => Partition::Unkeyed,
        }
    }

    /// Every partition of a profile, the unkeyed one last.
    pub fn all() -> impl Iterator<Item = Partition> {
        (0..PARTITIONS).map(Partition::Keyed).chain(std::iter::once(Partition::Unkeyed))
    }

    fn token(self) -> String {
        match self {
            Partition::Keyed(n) => n.to_string(),
            Partition::Unkeyed => "any".to_owned(),
        }
    }
}

/// A profile's name as one token of a subject or a consumer name: the name itself when it is made of
/// letters, digits, `-` and `_` (at most 32), else `h_` and a hash of it.
pub fn profile_token(profile: &str) -> String {
    let plain = !profile.is_empty() && profile.len() <= 32 && profile.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        profile.to_owned()
    } else {
        let digest = Sha256::digest(profile.as_bytes());
        format!("h_{}", digest[..8].iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
}

/// The subject an item of `profile` in `partition` is published on.
pub fn work_subject(profile: &str, partition: Partition) -> String {
    format!("{WORK_PREFIX}.{}.{}", profile_token(profile), partition.token())
}

/// The subjects of all of a profile's work.
pub fn profile_subjects(profile: &str) -> String {
    format!("{WORK_PREFIX}.{}.>", profile_token(profile))
}

/// The durable consumer every host serving `profile` pulls `partition` from.
pub fn consumer_name(profile: &str, partition: Partition) -> String {
    format!("psbridge-{}-{}", profile_token(profile), partition.token())
}

/// The key of an item's result.
pub fn result_key(batch: &str, item: &str) -> String {
    format!("{batch}.{item}")
}

/// An item's identity (`<hash>#<occurrence>`, see `batch::input::Identities`) as one KV key token.
pub fn item_token(identity: &str) -> String {
    identity.replace('#', "_")
}

/// Whether `id` may name a batch: 1 to 64 letters, digits, `-` and `_`.
pub fn valid_batch_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The JetStream objects a submitter or host uses, created when missing.
#[derive(Clone)]
pub struct Queue {
    pub jetstream: jetstream::Context,
    pub work: stream::Stream,
    pub batches: kv::Store,
    pub results: kv::Store,
    pub duplicates: kv::Store,
}

impl Queue {
    /// Opens (creating when missing) the work stream and the three buckets.
    pub async fn open(client: async_nats::Client) -> Result<Queue, QueueError> {
        let jetstream = jetstream::new(client);
        let work = jetstream
            .get_or_create_stream(stream::Config {
                name: WORK_STREAM.to_owned(),
                subjects: vec![format!("{WORK_PREFIX}.>")],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(QueueError::jetstream("open the work stream"))?;
        let mut stores = Vec::with_capacity(3);
        for (name, description) in [
            (BATCHES, "psbridge: one record per queued batch"),
            (RESULTS, "psbridge: the first recorded result of each queued item"),
            (DUPLICATES, "psbridge: runs that finished after their item's result was recorded"),
        ] {
            // The bucket's stream made as async-nats' create_key_value makes it, which cannot be called
            // on nats-server 2.9 (it reads the account's limits in a newer form first).
            jetstream
                .get_or_create_stream(stream::Config {
                    name: format!("KV_{name}"),
                    description: Some(description.to_owned()),
                    subjects: vec![format!("$KV.{name}.>")],
                    max_messages_per_subject: 1,
                    storage: stream::StorageType::File,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: stream::DiscardPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(QueueError::jetstream("open a bucket"))?;
            stores.push(jetstream.get_key_value(name).await.map_err(QueueError::jetstream("open a bucket"))?);
        }
        let duplicates = stores.pop().expect("three stores");
        let results = stores.pop().expect("three stores");
        let batches = stores.pop().expect("three stores");
        Ok(Queue { jetstream, work, batches, results, duplicates })
    }

    /// The consumer of one of `profile`'s partitions, created when missing. A redelivered message comes
    /// back after `ack_wait` without an acknowledgement (or an in-progress one).
    pub async fn consumer(&self, profile: &str, partition: Partition, ack_wait: Duration) -> Result<consumer::PullConsumer, QueueError> {
        let name = consumer_name(profile, partition);
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("psbridge: work of profile {profile}")),
            filter_subject: work_subject(profile, partition),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            // One item in flight per keyed partition, over all hosts: what keeps same-key order.
            max_ack_pending: match partition {
                Partition::Keyed(_) => 1,
                Partition::Unkeyed => UNKEYED_IN_FLIGHT,
            },
            max_deliver: -1,
            ..Default::default()
        };
        self.work.get_or_create_consumer(&name, config).await.map_err(QueueError::jetstream("open a work consumer"))
    }
}
