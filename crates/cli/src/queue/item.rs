//! What travels through the queue: a work message per item ([`WorkItem`]), a record per batch
//! ([`BatchRecord`]), and what a host records when an item is done ([`StoredResult`], or a
//! [`Duplicate`] when another run recorded it first).

use std::time::Duration;

use psbridge::Command;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::batch::input::Item;
use crate::batch::{ResultRecord, Status, bind_parameter};

/// One item of a batch, as published: what a host needs to run it and to write its result record.
/// Secrets never travel: an item holding one is refused before it is published (see [`secret_tag`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkItem {
    /// The batch's id.
    pub batch: String,
    /// Which submission of the batch published it (a batch cancelled and submitted again publishes its
    /// unfinished items anew, and hosts skip the older copies).
    pub generation: u64,
    /// The item's key token in the results bucket (its identity in the input).
    pub item: String,
    /// Its line in the input.
    pub line: usize,
    /// The line as written.
    pub input: String,
    pub command: String,
    /// The parameters, in input order.
    pub parameters: Map<String, Value>,
    pub key: Option<String>,
    pub id: Option<Value>,
    /// `--timeout` of the submitter, if given.
    pub timeout_secs: Option<f64>,
    /// `--depth` of the submitter, if given.
    pub depth: Option<u32>,
}

impl WorkItem {
    /// The message of input item `item`.
    pub fn new(batch: &str, generation: u64, item: &Item, timeout: Option<Duration>, depth: Option<u32>) -> WorkItem {
        WorkItem {
            batch: batch.to_owned(),
            generation,
            item: super::layout::item_token(&item.identity),
            line: item.line,
            input: item.input.clone(),
            command: item.name.clone(),
            parameters: item.parameters.iter().cloned().collect(),
            key: item.key.clone(),
            id: item.id.clone(),
            timeout_secs: timeout.map(|t| t.as_secs_f64()),
            depth,
        }
    }

    /// The command to run, checked as the input's commands are.
    pub fn command(&self) -> Result<Command, psbridge::Error> {
        let mut command = Command::new(self.command.as_str());
        for (name, value) in &self.parameters {
            command = bind_parameter(command, name.clone(), value.clone());
        }
        if let Some(key) = &self.key {
            command = command.key(key.as_str());
        }
        if let Some(timeout) = self.timeout_secs.and_then(crate::positive_duration) {
            command = command.timeout(timeout);
        }
        if let Some(depth) = self.depth {
            command = command.depth(depth);
        }
        command.validate()?;
        Ok(command)
    }

    /// A record for the item with no outcome yet.
    pub fn record(&self) -> ResultRecord {
        let mut record = ResultRecord::new(self.line, self.input.clone(), Status::NotRun);
        (record.id, record.key, record.command) = (self.id.clone(), self.key.clone(), Some(self.command.clone()));
        record
    }
}

/// The first tagged secret (`securestring`, `secret` or `certificate`) in an item's parameters, if any.
/// Such items are not queued: the stream would keep the secret on the NATS server's disk.
pub fn secret_tag(parameters: &[(String, Value)]) -> Option<&str> {
    fn find(value: &Value) -> Option<&str> {
        match value {
            Value::Object(map) => match map.get("$psbridge") {
                Some(Value::String(kind)) if matches!(kind.as_str(), "securestring" | "secret" | "certificate") => Some(kind),
                _ => map.values().find_map(find),
            },
            Value::Array(items) => items.iter().find_map(find),
            _ => None,
        }
    }
    parameters.iter().find_map(|(_, value)| find(value))
}

/// A batch's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// Its items run.
    Open,
    /// `psbridge queue cancel`: items not begun are dropped by the hosts.
    Cancelled,
}

/// A batch, in the batches bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchRecord {
    /// The profile whose hosts run it.
    pub profile: String,
    /// The input as the submitter named it.
    pub input: String,
    /// The SHA-256 of the input's bytes.
    pub input_sha256: String,
    /// Bumped when a cancelled batch is submitted again.
    pub generation: u64,
    pub state: BatchState,
    /// How many items were published, once all of them are (`None` while publishing).
    pub items: Option<usize>,
}

/// An item's result as a host recorded it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredResult {
    /// The host that ran it (`name/pid`).
    pub host: String,
    /// The JetStream delivery that ran it (1 for the first).
    pub delivered: u64,
    pub result: ResultRecord,
}

/// A run that finished after its item's result was recorded by another run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Duplicate {
    pub host: String,
    pub delivered: u64,
    pub status: Status,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_found_wherever_they_are_tagged() {
        let params = |value: Value| vec![("Identity".to_owned(), json!("u1")), ("P".to_owned(), value)];
        assert_eq!(secret_tag(&params(json!({"$psbridge": "securestring", "value": "********"}))), Some("securestring"));
        assert_eq!(secret_tag(&params(json!([{"x": {"$psbridge": "certificate", "value": "MII"}}]))), Some("certificate"));
        assert_eq!(secret_tag(&params(json!({"$psbridge": "datetime", "value": "2026-01-31T12:00:00Z"}))), None);
        assert_eq!(secret_tag(&params(json!("plain"))), None);
    }

    #[test]
    fn a_work_item_runs_the_command_it_names() {
        let item = WorkItem {
            batch: "b".into(),
            generation: 1,
            item: "abc_1".into(),
            line: 3,
            input: "{}".into(),
            command: "Set-Mailbox".into(),
            parameters: [("Identity".to_owned(), json!("u1")), ("Office".to_owned(), json!("B7"))].into_iter().collect(),
            key: Some("u1".into()),
            id: Some(json!(7)),
            timeout_secs: Some(30.0),
            depth: None,
        };
        let command = item.command().unwrap();
        assert_eq!((command.name(), command.key_str()), ("Set-Mailbox", Some("u1")));
        let record = item.record();
        assert_eq!((record.line, record.status, record.id), (3, Status::NotRun, Some(json!(7))));
        let bad = WorkItem { command: " ".into(), ..item };
        assert!(bad.command().is_err());
    }
}
