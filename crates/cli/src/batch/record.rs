//! One result record per input item: what the output file and the journal hold.
//!
//! Every record has every field, whatever its status (an `invalid` line has no id or command to give,
//! so those are `null`, and its `errors` say what was wrong), so that readers of the output need no
//! special cases.

use std::time::Duration;

use psbridge::{ErrorRecord, InvocationResult};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How an item ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// It ran and [succeeded](InvocationResult::succeeded).
    Succeeded,
    /// It ran and failed (error records, a failed pipeline, a non-zero `exit`), or psbridge could not
    /// run it (a worker died).
    Failed,
    /// The input line could not become a command.
    Invalid,
    /// It was running when a second interrupt cancelled it (it may have been applied).
    Cancelled,
    /// The batch stopped before the item began.
    NotRun,
}

/// The result of one input item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultRecord {
    /// Line of the input where the item starts (1-based).
    pub line: usize,
    /// The item's `id` from the input, if any.
    pub id: Option<Value>,
    /// The item's key, if any.
    pub key: Option<String>,
    /// The command it runs (`null` for an invalid line that names none).
    pub command: Option<String>,
    /// The line as written, secret values replaced by `********`.
    pub input: String,
    pub status: Status,
    /// Output objects.
    #[serde(default)]
    pub output: Vec<Value>,
    /// Error records; for a line psbridge refused or could not run, one record saying why.
    #[serde(default)]
    pub errors: Vec<ErrorRecord>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The number a script passed to `exit`; `null` when it did not call `exit`.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// `$LASTEXITCODE` when a native program ran; `null` otherwise.
    #[serde(default)]
    pub native_exit_code: Option<i32>,
    /// Runs of the item, earlier runs of psbridge included (0 when it never ran).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub duration_ms: f64,
    /// It was running when an earlier psbridge died or was cancelled, so it may have been applied twice.
    #[serde(default, skip_serializing_if = "is_false")]
    pub resumed_in_flight: bool,
    /// Copied from the journal: it finished in an earlier run and did not run again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub previous_run: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// The `category` of the error records psbridge itself writes into results.
const CATEGORY: &str = "InvalidData";

/// An error record for a problem psbridge found itself (`id`: `psbridge.invalid_input`, ...).
pub fn bridge_error(id: &str, message: String) -> ErrorRecord {
    ErrorRecord {
        message,
        exception_message: None,
        exception_type: None,
        fully_qualified_error_id: Some(id.to_owned()),
        category: CATEGORY.to_owned(),
        activity: None,
        reason: None,
        target_name: None,
        target_type: None,
        category_info: None,
        target_object: None,
        script_stack_trace: None,
        position_message: None,
        command: None,
        terminating: true,
    }
}

impl ResultRecord {
    /// A record with no outcome yet.
    pub fn new(line: usize, input: String, status: Status) -> ResultRecord {
        ResultRecord {
            line,
            id: None,
            key: None,
            command: None,
            input,
            status,
            output: Vec::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
            exit_code: None,
            native_exit_code: None,
            attempts: 0,
            duration_ms: 0.0,
            resumed_in_flight: false,
            previous_run: false,
        }
    }

    /// Fills in what a run produced: status, streams, exit codes, attempts (`earlier` runs included) and
    /// time.
    pub fn ran(&mut self, outcome: Result<InvocationResult, psbridge::Error>, earlier: u32, elapsed: Duration) {
        let attempts = match outcome {
            Ok(result) => {
                self.status = if result.succeeded() { Status::Succeeded } else { Status::Failed };
                self.output = result.output.into_iter().map(|o| o.value).collect();
                self.errors = result.errors;
                self.warnings = result.warnings;
                self.exit_code = result.exit_code;
                self.native_exit_code = result.native_exit_code;
                result.attempts
            }
            Err(error) => {
                self.status = Status::Failed;
                self.errors = vec![bridge_error("psbridge.not_completed", error.to_string())];
                1
            }
        };
        self.attempts = earlier + attempts;
        self.duration_ms = (elapsed.as_secs_f64() * 1e4).round() / 10.0;
        self.resumed_in_flight = earlier > 0;
    }
}
