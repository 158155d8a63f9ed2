//! What a command produces: output objects and the records of PowerShell's other five streams.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One object from the output stream.
///
/// `value` holds the object's properties as JSON (strings, numbers, booleans, null, arrays, objects);
/// dates are ISO 8601 strings with an offset, enums their names, byte arrays base64, and anything nested
/// deeper than the configured depth its `ToString()`. `type_names` is PowerShell's `pstypenames`, most
/// specific first.
///
/// ```
/// use psbridge::PsObject;
/// let o = PsObject { type_names: vec!["System.String".into(), "System.Object".into()], value: "x".into() };
/// assert_eq!(o.value.as_str(), Some("x"));
/// assert!(o.is_type("System.String"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PsObject {
    /// `pstypenames`, most specific first.
    pub type_names: Vec<String>,
    /// The object as JSON.
    pub value: Value,
}

impl PsObject {
    /// Whether `name` is one of the object's type names.
    pub fn is_type(&self, name: &str) -> bool {
        self.type_names.iter().any(|t| t == name)
    }

    /// A property of the object, if it is an object and has it.
    ///
    /// ```
    /// use psbridge::PsObject;
    /// let o = PsObject { type_names: vec![], value: serde_json::json!({"Alias": "ContosoUser1"}) };
    /// assert_eq!(o.property("Alias").and_then(|v| v.as_str()), Some("ContosoUser1"));
    /// ```
    pub fn property(&self, name: &str) -> Option<&Value> {
        self.value.get(name)
    }

    /// The object as a Rust type, so that a service can declare the properties it reads.
    ///
    /// # Errors
    /// [`Error::OutputShape`](crate::Error::OutputShape) naming the property that is missing or of
    /// another type, and the object's type names.
    ///
    /// ```
    /// use psbridge::PsObject;
    /// #[derive(Debug, serde::Deserialize)]
    /// #[serde(rename_all = "PascalCase")]
    /// struct Mailbox { alias: String, primary_smtp_address: String }
    /// let o = PsObject {
    ///     type_names: vec!["Deserialized.Microsoft.Exchange.Data.Directory.Management.Mailbox".into()],
    ///     value: serde_json::json!({"Alias": "ContosoUser1", "PrimarySmtpAddress": "ContosoUser1@contoso.com"}),
    /// };
    /// let mailbox: Mailbox = o.deserialize().unwrap();
    /// assert_eq!(mailbox.alias, "ContosoUser1");
    /// let missing = PsObject { value: serde_json::json!({"Alias": 5}), ..o };
    /// let error = missing.deserialize::<Mailbox>().unwrap_err().to_string();
    /// assert!(error.contains("Alias") && error.contains("Mailbox"), "{error}");
    /// ```
    pub fn deserialize<T: serde::de::DeserializeOwned>(&self) -> crate::Result<T> {
        serde_path_to_error::deserialize(&self.value).map_err(|error| {
            let path = error.path().to_string();
            crate::Error::OutputShape {
                type_name: self.type_names.first().cloned().unwrap_or_else(|| "an object without type names".into()),
                property: if path == "." { None } else { Some(path) },
                reason: error.into_inner().to_string(),
            }
        })
    }
}

/// A PowerShell `ErrorRecord`, with the fields people look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// What PowerShell shows: `ErrorDetails.Message` when set, else the exception's message.
    pub message: String,
    /// `Exception.Message`.
    pub exception_message: Option<String>,
    /// The exception's full .NET type name.
    pub exception_type: Option<String>,
    /// `FullyQualifiedErrorId`.
    pub fully_qualified_error_id: Option<String>,
    /// `CategoryInfo.Category`, for example `ObjectNotFound`.
    pub category: String,
    /// `CategoryInfo.Activity`.
    pub activity: Option<String>,
    /// `CategoryInfo.Reason`.
    pub reason: Option<String>,
    /// `CategoryInfo.TargetName`.
    pub target_name: Option<String>,
    /// `CategoryInfo.TargetType`.
    pub target_type: Option<String>,
    /// The whole `CategoryInfo` line, for example `NotSpecified: (:) [Get-Recipient], ManagementObjectNotFoundException`.
    pub category_info: Option<String>,
    /// `TargetObject.ToString()`.
    pub target_object: Option<String>,
    /// `ScriptStackTrace`.
    pub script_stack_trace: Option<String>,
    /// `InvocationInfo.PositionMessage`.
    pub position_message: Option<String>,
    /// The command that wrote the error, when known.
    pub command: Option<String>,
    /// Whether the error stopped the pipeline (a thrown error) rather than being written and passed over.
    pub terminating: bool,
}

impl ErrorRecord {
    /// Replaces every occurrence of `secret` with `********` in every text of the record, so that a
    /// record about a failed connect can be shown and logged.
    ///
    /// ```
    /// use psbridge::ErrorRecord;
    /// let mut r: ErrorRecord = serde_json::from_value(serde_json::json!({
    ///     "message": "bad token abc123", "reason": "abc123", "category": "abc123", "terminating": true,
    ///     "exception_message": null, "exception_type": null, "fully_qualified_error_id": null, "activity": null,
    ///     "target_name": null, "target_type": null, "category_info": null, "target_object": null,
    ///     "script_stack_trace": "at abc123", "position_message": null, "command": null
    /// })).unwrap();
    /// r.redact("abc123");
    /// assert!(!format!("{r:?}").contains("abc123"));
    /// assert_eq!(r.message, "bad token ********");
    /// ```
    pub fn redact(&mut self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        // Every field is named here, so that a text field added later cannot be forgotten.
        let ErrorRecord {
            message,
            exception_message,
            exception_type,
            fully_qualified_error_id,
            category,
            activity,
            reason,
            target_name,
            target_type,
            category_info,
            target_object,
            script_stack_trace,
            position_message,
            command,
            terminating: _,
        } = self;
        let optional = [
            exception_message,
            exception_type,
            fully_qualified_error_id,
            activity,
            reason,
            target_name,
            target_type,
            category_info,
            target_object,
            script_stack_trace,
            position_message,
            command,
        ];
        let fields = [message, category].into_iter().chain(optional.into_iter().filter_map(Option::as_mut));
        for field in fields {
            if field.contains(secret) {
                *field = field.replace(secret, "********");
            }
        }
    }
}

/// A record of the Information stream (`Write-Information`, and `Write-Host` with the tag `PSHOST`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InformationRecord {
    /// `MessageData.ToString()`.
    pub message: Option<String>,
    /// `Source`, for example `Write-Host`.
    pub source: Option<String>,
    /// `Tags`.
    pub tags: Vec<String>,
    /// `TimeGenerated`, ISO 8601.
    pub time_generated: Option<String>,
}

/// A record of the Progress stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// `Activity`.
    pub activity: Option<String>,
    /// `StatusDescription`.
    pub status_description: Option<String>,
    /// `CurrentOperation`.
    pub current_operation: Option<String>,
    /// `ActivityId`.
    pub activity_id: i32,
    /// `ParentActivityId`.
    pub parent_activity_id: i32,
    /// `PercentComplete` (-1 when unknown).
    pub percent_complete: i32,
    /// `SecondsRemaining` (-1 when unknown).
    pub seconds_remaining: i32,
    /// `Processing` or `Completed`.
    pub record_type: String,
}

/// One item of any of the six streams, in the order PowerShell wrote them.
///
/// As JSON it is an object with one key naming the stream: `{"output": {...}}`, `{"error": {...}}`,
/// `{"warning": "..."}`, `{"verbose": ...}`, `{"debug": ...}`, `{"information": {...}}`,
/// `{"progress": {...}}` (what `psbridge serve` streams).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamItem {
    /// An output object.
    Output(PsObject),
    /// An error record (boxed: records are large and rare, output objects small and many).
    Error(Box<ErrorRecord>),
    /// A warning message.
    Warning(String),
    /// A verbose message.
    Verbose(String),
    /// A debug message.
    Debug(String),
    /// An information record (Write-Host included).
    Information(InformationRecord),
    /// A progress record.
    Progress(ProgressRecord),
}

/// How a pipeline ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PipelineState {
    /// It ran to the end (error records may still have been written).
    #[default]
    Completed,
    /// A terminating error ended it; the record is in the errors with `terminating: true`.
    Failed,
    /// It was stopped (cancel or timeout).
    Stopped,
}

/// How a command ended, apart from what it wrote.
///
/// As JSON the duration is `duration_ms`, a number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Completion {
    /// PowerShell's raw `HadErrors` flag. It is also set by errors that `-ErrorAction SilentlyContinue`
    /// suppressed (the real `Connect-ExchangeOnline` succeeds with it set), so never judge success by it
    /// alone: see [`InvocationResult::succeeded`].
    pub had_errors: bool,
    /// How the pipeline ended.
    pub state: PipelineState,
    /// Time spent running the pipeline inside the worker.
    #[serde(rename = "duration_ms", with = "milliseconds")]
    pub duration: Duration,
    /// The number a script passed to `exit` (`exit` alone is 0); `None` when it did not call `exit`.
    pub exit_code: Option<i32>,
    /// `$LASTEXITCODE` after the command, when a native program ran during it; `None` otherwise.
    pub native_exit_code: Option<i32>,
}

/// A duration as a number of milliseconds (fractions kept), in JSON.
mod milliseconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(duration.as_secs_f64() * 1000.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        // Whole nanoseconds, so that what was written comes back the same; negative or not a number is
        // zero, and beyond u64 nanoseconds (584 years) the most that fits.
        let nanos = (ms * 1e6).round();
        Ok(if nanos.is_nan() || nanos <= 0.0 { Duration::ZERO } else { Duration::from_nanos(nanos.min(u64::MAX as f64) as u64) })
    }
}

impl Completion {
    /// The half of [`InvocationResult::succeeded`] that does not need the error records: the command ran
    /// to the end and did not `exit` with a number other than 0. A stream reader that saw no error item
    /// and gets `true` here has a command that succeeded.
    ///
    /// ```
    /// use psbridge::{Completion, PipelineState};
    /// assert!(Completion { had_errors: true, ..Completion::default() }.ended_well());
    /// assert!(!Completion { exit_code: Some(1), ..Completion::default() }.ended_well());
    /// assert!(!Completion { state: PipelineState::Failed, ..Completion::default() }.ended_well());
    /// ```
    pub fn ended_well(&self) -> bool {
        self.state == PipelineState::Completed && self.exit_code.unwrap_or(0) == 0
    }
}

impl From<&InvocationResult> for Completion {
    fn from(r: &InvocationResult) -> Self {
        Completion {
            had_errors: r.had_errors,
            state: r.state,
            duration: r.duration,
            exit_code: r.exit_code,
            native_exit_code: r.native_exit_code,
        }
    }
}

/// Everything a command produced, each stream kept apart and in order.
///
/// This is what `PowerShell.Invoke()` plus `Streams` gives in C#. Judge it with
/// [`succeeded`](Self::succeeded) and read [`errors`](Self::errors); Microsoft's sample checks
/// `HadErrors`, which PowerShell also sets for errors that were suppressed, so it is kept here only as
/// the raw flag [`had_errors`](Self::had_errors).
///
/// ```
/// use psbridge::{InvocationResult, StreamItem};
/// let mut r = InvocationResult::default();
/// r.push(StreamItem::Warning("careful".into()));
/// assert_eq!(r.warnings, ["careful"]);
/// assert!(r.succeeded());
/// ```
///
/// As JSON it has every field, the duration as `duration_ms` (what `psbridge serve` answers).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InvocationResult {
    /// Output objects.
    pub output: Vec<PsObject>,
    /// Error records, terminating or not.
    pub errors: Vec<ErrorRecord>,
    /// Warning messages.
    pub warnings: Vec<String>,
    /// Verbose messages.
    pub verbose: Vec<String>,
    /// Debug messages.
    pub debug: Vec<String>,
    /// Information records.
    pub information: Vec<InformationRecord>,
    /// Progress records.
    pub progress: Vec<ProgressRecord>,
    /// PowerShell's raw `HadErrors` flag; also set by suppressed errors. Use [`succeeded`](Self::succeeded)
    /// to judge the command.
    pub had_errors: bool,
    /// How the pipeline ended (`Completed` until [`complete`](Self::complete) says otherwise).
    pub state: PipelineState,
    /// Time spent in the worker.
    #[serde(rename = "duration_ms", with = "milliseconds")]
    pub duration: Duration,
    /// The number a script passed to `exit` (`exit` alone is 0); `None` when it did not call `exit`.
    /// `exit` ends the script, never the worker.
    pub exit_code: Option<i32>,
    /// `$LASTEXITCODE` after the command, when a native program ran during it; `None` otherwise.
    pub native_exit_code: Option<i32>,
    /// How many times the command was run: 1 from a [`Runspace`](crate::Runspace); more when a
    /// [`RunspacePool`](crate::RunspacePool) retried it (throttling, a dead worker).
    pub attempts: u32,
}

impl InvocationResult {
    /// Files one stream item under its stream.
    pub fn push(&mut self, item: StreamItem) {
        match item {
            StreamItem::Output(o) => self.output.push(o),
            StreamItem::Error(e) => self.errors.push(*e),
            StreamItem::Warning(w) => self.warnings.push(w),
            StreamItem::Verbose(v) => self.verbose.push(v),
            StreamItem::Debug(d) => self.debug.push(d),
            StreamItem::Information(i) => self.information.push(i),
            StreamItem::Progress(p) => self.progress.push(p),
        }
    }

    /// Records how the command ended.
    pub fn complete(&mut self, completion: Completion) {
        self.had_errors = completion.had_errors;
        self.state = completion.state;
        self.duration = completion.duration;
        self.exit_code = completion.exit_code;
        self.native_exit_code = completion.native_exit_code;
    }

    /// Every output object as a Rust type (see [`PsObject::deserialize`]).
    ///
    /// # Errors
    /// [`Error::OutputShape`](crate::Error::OutputShape) for the first object that does not fit.
    pub fn output_as<T: serde::de::DeserializeOwned>(&self) -> crate::Result<Vec<T>> {
        self.output.iter().map(PsObject::deserialize).collect()
    }

    /// Whether the command succeeded: it wrote no error record, ended in the `Completed` state, and did
    /// not `exit` with a number other than 0.
    ///
    /// This is psbridge's one rule for success: the connect step, a pool's retries, `psbridge run`'s
    /// exit status and a batch item's status all follow it. PowerShell's `HadErrors` is not part of it,
    /// because it is also set by errors that `-ErrorAction SilentlyContinue` suppressed. A native
    /// program's exit code is reported in [`native_exit_code`](Self::native_exit_code) but, as in
    /// `pwsh -File`, does not by itself fail the command.
    ///
    /// ```
    /// use psbridge::{InvocationResult, PipelineState};
    /// // a suppressed error: HadErrors set, nothing written
    /// let quiet = InvocationResult { had_errors: true, ..Default::default() };
    /// assert!(quiet.succeeded());
    /// let exited = InvocationResult { exit_code: Some(5), ..Default::default() };
    /// assert!(!exited.succeeded());
    /// let failed = InvocationResult { state: PipelineState::Failed, ..Default::default() };
    /// assert!(!failed.succeeded());
    /// ```
    pub fn succeeded(&self) -> bool {
        self.errors.is_empty() && Completion::from(self).ended_well()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_stream_items_travel_as_json_and_come_back_the_same() {
        let result = InvocationResult {
            output: vec![PsObject { type_names: vec!["System.String".into()], value: "x".into() }],
            warnings: vec!["careful".into()],
            duration: Duration::from_micros(1_500),
            exit_code: Some(3),
            attempts: 2,
            ..InvocationResult::default()
        };
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["duration_ms"], 1.5);
        assert_eq!(json["state"], "Completed");
        assert_eq!(serde_json::from_value::<InvocationResult>(json).unwrap(), result);
        let item = StreamItem::Warning("careful".into());
        assert_eq!(serde_json::to_string(&item).unwrap(), r#"{"warning":"careful"}"#);
        let completion = Completion { duration: Duration::from_millis(2), native_exit_code: Some(1), ..Completion::default() };
        let text = serde_json::to_string(&completion).unwrap();
        assert_eq!(serde_json::from_str::<Completion>(&text).unwrap(), completion);
        let negative: Completion = serde_json::from_str(r#"{"had_errors":false,"state":"Failed","duration_ms":-5,"exit_code":null,"native_exit_code":null}"#).unwrap();
        assert_eq!(negative.duration, Duration::ZERO);
    }
}
