//! What travels between `psbridge serve` and its clients, besides the library's own records
//! ([`InvocationResult`](psbridge::InvocationResult), [`StreamItem`], [`Completion`]) and batch
//! results: the invoke request, errors, the end of a stream, and statistics.

use std::time::Duration;

use psbridge::{Command, Completion, StreamItem};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The NDJSON media type: one JSON value per line, sent as produced.
pub const NDJSON: &str = "application/x-ndjson";

/// A command, pipeline or script to run, as the library's [`Command`]: `command` or `script`, its
/// `parameters`, more pipeline steps in `pipe`, and the options.
///
/// Parameter values are JSON; values JSON cannot carry are tagged as for `--params`
/// (`{"$psbridge": "securestring", "value": "..."}`, `"secret"`, `"datetime"`, `"bytes"`). A key given
/// twice in one object is refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    /// A command by name (a cmdlet, function or script path); or give `script`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Script text, whose `param()` block receives `parameters`; or give `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Parameters bound by name.
    #[serde(default, deserialize_with = "crate::params::checked_object", skip_serializing_if = "Map::is_empty")]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// Commands piped after the first: `command | pipe[0] | pipe[1] ...`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pipe: Vec<PipeStep>,
    /// Commands with the same key never run at once and keep their order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Stop the command after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<f64>,
    /// How deeply output objects are serialized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    /// Whether running it twice is harmless (default: true for `Get-*`), so that the pool may run it
    /// again when its worker died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotent: Option<bool>,
}

/// A later step of a pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PipeStep {
    /// The command's name.
    pub command: String,
    /// Its parameters.
    #[serde(default, deserialize_with = "crate::params::checked_object", skip_serializing_if = "Map::is_empty")]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
}

impl InvokeRequest {
    /// The names of the commands it runs, in pipeline order (`<script>` for a script).
    pub fn command_names(&self) -> Vec<&str> {
        let first = match (&self.command, &self.script) {
            (Some(name), None) => name.as_str(),
            _ => "<script>",
        };
        std::iter::once(first).chain(self.pipe.iter().map(|s| s.command.as_str())).collect()
    }

    /// The parameter names of every step, for the audit.
    pub fn parameter_names(&self) -> Vec<String> {
        self.parameters.keys().chain(self.pipe.iter().flat_map(|s| s.parameters.keys())).cloned().collect()
    }

    /// The library's command, checked as [`Command::validate`] checks it. Tagged secrets become secret
    /// parameters (masked by the library wherever they could show).
    pub fn to_command(&self) -> Result<Command, String> {
        let mut command = match (&self.command, &self.script) {
            (Some(name), None) => Command::new(name.as_str()),
            (None, Some(script)) => Command::script(script.as_str()),
            _ => return Err("give either command or script".to_owned()),
        };
        for (name, value) in &self.parameters {
            command = crate::batch::bind_parameter(command, name.clone(), value.clone());
        }
        for step in &self.pipe {
            command = command.pipe(step.command.as_str());
            for (name, value) in &step.parameters {
                command = crate::batch::bind_parameter(command, name.clone(), value.clone());
            }
        }
        if let Some(key) = &self.key {
            command = command.key(key.as_str());
        }
        if let Some(seconds) = self.timeout_secs {
            command = command.timeout(crate::positive_duration(seconds).ok_or_else(|| format!("timeout_secs must be {}", crate::SECONDS_RANGE))?);
        }
        if let Some(depth) = self.depth {
            command = command.depth(depth);
        }
        if let Some(idempotent) = self.idempotent {
            command = command.idempotent(idempotent);
        }
        command.validate().map_err(|error| match error {
            psbridge::Error::InvalidCommand { reason } => reason,
            other => other.to_string(),
        })?;
        Ok(command)
    }
}

/// What went wrong, as every error response (and the last line of a stream that failed) says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// What kind of failure it is; the client's exit status follows from it.
    pub error: ErrorKind,
    /// In words, with what to do about it.
    pub message: String,
}

/// Kinds of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or its command invalid (400); the client exits 2.
    InvalidRequest,
    /// No or a wrong bearer token (401); exit 2.
    Unauthorized,
    /// The peer may not use the server, or the profile's rules refuse the command (403); exit 2.
    Forbidden,
    /// No such profile or route (404); exit 2.
    NotFound,
    /// A batch with this id is still running (409); exit 2.
    Conflict,
    /// The body is larger than the server takes (413); exit 2.
    TooLarge,
    /// The client has too many requests under way (429); exit 3.
    TooManyRequests,
    /// A module could not be imported (a configuration problem on the server); exit 2.
    Configuration,
    /// The workers could not be started, connected or kept, or the server is stopping (503); exit 3.
    Unavailable,
    /// The command timed out (exit 124).
    Timeout,
    /// The command was cancelled (exit 130).
    Cancelled,
}

/// The last line of an NDJSON invoke stream: how the command ended, or why it did not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEnd {
    /// It ran to its end.
    Done(Completion),
    /// It did not.
    Failed(ApiError),
}

/// One line of an NDJSON invoke stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamLine {
    Item(StreamItem),
    End(StreamEnd),
}

impl StreamLine {
    /// Reads a line: `{"done": ...}` and `{"failed": ...}` end the stream, anything else is an item.
    pub fn parse(line: &[u8]) -> Result<StreamLine, serde_json::Error> {
        let value: Value = serde_json::from_slice(line)?;
        let is_end = value.as_object().is_some_and(|o| o.len() == 1 && (o.contains_key("done") || o.contains_key("failed")));
        if is_end { serde_json::from_value(value).map(StreamLine::End) } else { serde_json::from_value(value).map(StreamLine::Item) }
    }
}

/// One line of a batch stream: a result record (as `psbridge batch` writes it), a note or an error for
/// the client's stderr, or the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchLine {
    /// One item's result.
    Result(Box<crate::batch::ResultRecord>),
    /// A note (resuming, stopping, the summary); `--quiet` leaves it out.
    Note(String),
    /// An error, printed whatever `--quiet` says.
    Error(String),
    /// The batch ended with this exit status, as `psbridge batch` would exit.
    End { status: u8 },
}

/// `GET /v1/profiles/{profile}`: a profile's pool.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProfileStats {
    /// The profile's name.
    pub profile: String,
    /// `open`, or `closed` (not started yet, or closed after being idle; opened on the next request).
    pub state: String,
    /// Started at launch (not `--lazy`).
    pub eager: bool,
    /// Requests using the pool now.
    pub requests: usize,
    /// Commands waiting for a worker.
    pub queued: usize,
    /// Seconds since the last request ended (0 while one is under way).
    pub idle_secs: f64,
    /// Commands finished, failed, retried, retried for throttling; worker restarts, recycles, reconnects.
    pub commands: u64,
    pub failures: u64,
    pub retries: u64,
    pub throttled: u64,
    pub restarts: u64,
    pub recycles: u64,
    pub reconnects: u64,
    /// Latency from submission to result, milliseconds.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// The workers (stopped ones left out).
    pub workers: Vec<WorkerInfo>,
}

/// One worker of a pool.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerInfo {
    /// Its slot number.
    pub id: usize,
    /// `starting`, `idle`, `busy` or `recycling`.
    pub state: String,
    /// The pwsh process id.
    pub pid: Option<u32>,
    /// Resident memory, bytes.
    pub resident_bytes: Option<u64>,
    /// Commands its current process ran.
    pub commands: u64,
    /// Seconds since its current process connected.
    pub age_secs: Option<f64>,
    /// When its credentials expire (RFC 3339), if known.
    pub credentials_expire_at: Option<String>,
}

/// `GET /v1/status`: the server.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerStatus {
    /// psbridge's version.
    pub version: String,
    /// Seconds since the server started.
    pub uptime_secs: f64,
    /// Whether every profile started at launch has its workers connected.
    pub healthy: bool,
    /// Every profile served.
    pub profiles: Vec<ProfileStats>,
}

/// Seconds with millisecond precision, for JSON.
pub fn secs(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Milliseconds with microsecond precision, for JSON.
pub fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1000.0
}
