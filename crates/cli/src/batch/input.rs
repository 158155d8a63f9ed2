//! Batch input: entries read one at a time from JSONL ([`super::jsonl`]) or CSV ([`super::table`]). A bad
//! line becomes an [`Invalid`] entry with its line number; it never stops the other items.
//!
//! Secrets (`{"$psbridge": "securestring" | "secret", "value": ...}` values, CSV columns typed
//! `securestring`) reach the command as secrets (masked by the library in its error records) and are
//! replaced by [`REDACTED`] in what results, journals and messages show.

use std::collections::HashMap;

use psbridge::{Command, ParamValue, SecretString};
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::source::{Line, Lines, SourceError};

/// What stands for a secret value in results and the journal.
pub const REDACTED: &str = "********";

/// One item to run.
pub struct Item {
    /// Line of the input where it starts (1-based).
    pub line: usize,
    /// The line as written (for CSV, the row), secrets replaced by [`REDACTED`].
    pub input: String,
    /// The command's name, for the result.
    pub name: String,
    /// What runs: the command with its parameters (and key), already [validated](Command::validate).
    pub command: Command,
    /// Items with the same key never run at once and keep their input order.
    pub key: Option<String>,
    /// The caller's name for the item, copied into its result.
    pub id: Option<Value>,
    /// What the journal knows the item by (see [`Identities`]).
    pub identity: String,
    /// The parameters as written, in order, secret values replaced by [`REDACTED`]: what a queued item
    /// carries to the host that runs it (the queue refuses items with secrets).
    pub parameters: Vec<(String, Value)>,
}

/// A line that cannot become an item.
#[derive(Debug, Clone)]
pub struct Invalid {
    pub line: usize,
    /// The line as written, secrets replaced by [`REDACTED`].
    pub input: String,
    /// The command it names, when it got that far.
    pub command: Option<String>,
    /// `line N: what is wrong`.
    pub message: String,
}

/// One entry of the input, in input order.
pub enum Entry {
    Item(Box<Item>),
    Invalid(Invalid),
}

impl Entry {
    pub fn invalid(line: usize, input: String, command: Option<String>, message: impl std::fmt::Display) -> Entry {
        Entry::Invalid(Invalid { line, input, command, message: format!("line {line}: {message}") })
    }
}

/// Reads the next entry of a format; `None` at the end.
pub trait Format {
    fn next_entry(&mut self, lines: &mut Lines) -> Result<Option<Entry>, SourceError>;
}

/// The entries of an input, one at a time.
pub struct Entries {
    lines: Lines,
    format: Box<dyn Format + Send + Sync>,
}

impl Entries {
    pub fn new(lines: Lines, format: Box<dyn Format + Send + Sync>) -> Entries {
        Entries { lines, format }
    }

    pub fn next_entry(&mut self) -> Result<Option<Entry>, SourceError> {
        self.format.next_entry(&mut self.lines)
    }
}

/// The text of a line, or the invalid entry it is.
pub fn line_text(line: Line) -> Result<(usize, String), Entry> {
    match line.text {
        Ok(text) => Ok((line.number, text)),
        Err(error) => Err(Entry::invalid(line.number, String::new(), None, error)),
    }
}

/// A checked command as an item, or the invalid entry it is.
pub fn checked(item: Item) -> Entry {
    match item.command.validate() {
        Ok(()) => Entry::Item(Box::new(item)),
        Err(psbridge::Error::InvalidCommand { reason }) => Entry::invalid(item.line, item.input, Some(item.name), reason),
        Err(other) => Entry::invalid(item.line, item.input, Some(item.name), other),
    }
}

/// A parameter value as the command receives it: a tagged secret becomes a secret parameter.
pub fn bind(command: Command, name: String, value: Value) -> Command {
    let secure = match secret_kind(&value) {
        None => return command.param(name, ParamValue::Json(value)),
        Some(kind) => kind == "securestring",
    };
    let Value::Object(mut tagged) = value else { unreachable!("secret_kind only matches objects") };
    let Some(Value::String(secret)) = tagged.remove("value") else { unreachable!("secret_kind checks the value") };
    let secret = SecretString::from(secret);
    if secure { command.secure_param(name, secret) } else { command.secret_param(name, secret) }
}

/// `securestring` or `secret` for a tagged secret value.
fn secret_kind(value: &Value) -> Option<&str> {
    let Value::Object(map) = value else { return None };
    match (map.get("$psbridge"), map.get("value")) {
        (Some(Value::String(kind)), Some(Value::String(_))) if map.len() == 2 && (kind == "securestring" || kind == "secret") => Some(kind),
        _ => None,
    }
}

/// Whether a value holds a tagged secret anywhere.
pub fn holds_secret(value: &Value) -> bool {
    secret_kind(value).is_some()
        || match value {
            Value::Array(items) => items.iter().any(holds_secret),
            Value::Object(map) => map.values().any(holds_secret),
            _ => false,
        }
}

/// Serializes a value with every tagged secret's value replaced by [`REDACTED`].
pub struct Redacted<'a>(pub &'a Value);

impl Serialize for Redacted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            value if secret_kind(value).is_some() => {
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry("$psbridge", &value["$psbridge"])?;
                map.serialize_entry("value", REDACTED)?;
                map.end()
            }
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Redacted(item))?;
                }
                seq.end()
            }
            Value::Object(map) => {
                let mut out = s.serialize_map(Some(map.len()))?;
                for (k, v) in map {
                    out.serialize_entry(k, &Redacted(v))?;
                }
                out.end()
            }
            other => other.serialize(s),
        }
    }
}

/// Parameters in input order, duplicates kept, serialized as one object with secrets redacted.
pub struct RedactedParams<'a>(pub &'a [(String, Value)]);

impl Serialize for RedactedParams<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, &Redacted(value))?;
        }
        map.end()
    }
}

/// Hands out identities: a hash of what an item runs, and which occurrence of that content this is, so
/// that lines may move or be fixed between runs without a finished item running again.
///
/// The hash is taken over the item with its secrets already [redacted](REDACTED), never over a secret:
/// a journal holding the SHA-256 of a (often short, guessable) password would let anyone who can read
/// the journal test guesses offline. Two items that differ only in a secret therefore hash alike; the
/// occurrence number still tells them apart, so each runs once. (Changing only a secret between runs
/// does not make a finished item run again: give --restart for that.)
#[derive(Default)]
pub struct Identities {
    seen: HashMap<String, usize>,
}

impl Identities {
    /// The identity of an item whose redacted content serializes as `content`.
    pub fn next(&mut self, content: &impl Serialize) -> String {
        let text = serde_json::to_vec(content).unwrap_or_default();
        let digest = Sha256::digest(&text);
        let hash: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let occurrence = self.seen.entry(hash.clone()).or_default();
        *occurrence += 1;
        format!("{hash}#{occurrence}")
    }
}

/// What a value is, for messages: the same words as `--params` uses.
pub use crate::params::kind;
