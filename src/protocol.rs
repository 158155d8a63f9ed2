//! The line protocol between the library and `scripts/worker/worker.ps1`.
//!
//! One JSON object per line, UTF-8, in both directions. Every message about a request carries the
//! request's `id`; messages of a request the library no longer waits for are dropped by id.
//!
//! Owner to worker: `setup`, `invoke`, `cancel`, `exit`. Worker to owner: `ready` (first line, once),
//! then per request any number of `out`, `err`, `warn`, `verbose`, `debug`, `info`, `progress` and
//! exactly one `done`; `fatal` for a request it could not even read.

use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Deserialize;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use crate::command::{Command, ParamValue, Runnable, Step};
use crate::errors::{Error, Result};
use crate::records::{Completion, ErrorRecord, InformationRecord, PipelineState, ProgressRecord, PsObject, StreamItem};

/// The protocol version this library speaks; the worker announces its own in `ready`.
pub(crate) const PROTOCOL_VERSION: u32 = 2;

/// The worker's first line.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerInfo {
    /// Protocol version the worker speaks.
    pub protocol: u32,
    /// `$PSVersionTable.PSVersion`, for example `7.6.9`.
    pub ps_version: String,
    /// `Core` or `Desktop`.
    pub ps_edition: String,
    /// The operating system, as .NET describes it.
    pub os: String,
    /// The worker's process id.
    pub pid: u32,
}

/// A module to import when the session opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    /// A module name (found on `PSModulePath`) or a path to a `.psd1`/`.psm1`.
    pub name: String,
    /// The lowest acceptable version, if any.
    pub minimum_version: Option<String>,
}

/// Session set-up, sent once per runspace after the handshake.
pub(crate) struct Setup<'a> {
    pub(crate) id: u64,
    /// Which runspace of the worker; omitted on the wire when 0.
    pub(crate) runspace: usize,
    pub(crate) modules: &'a [ModuleSpec],
    pub(crate) execution_policy: Option<&'a str>,
    pub(crate) variables: &'a serde_json::Map<String, Value>,
    pub(crate) depth: u32,
}

impl Serialize for Setup<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        struct Modules<'a>(&'a [ModuleSpec]);
        impl Serialize for Modules<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for m in self.0 {
                    seq.serialize_element(&serde_json::json!({"name": m.name, "minimum_version": m.minimum_version}))?;
                }
                seq.end()
            }
        }
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("t", "setup")?;
        map.serialize_entry("id", &self.id)?;
        if self.runspace > 0 {
            map.serialize_entry("runspace", &self.runspace)?;
        }
        map.serialize_entry("modules", &Modules(self.modules))?;
        map.serialize_entry("execution_policy", &self.execution_policy)?;
        map.serialize_entry("variables", self.variables)?;
        map.serialize_entry("depth", &self.depth)?;
        map.end()
    }
}

/// Encodes a message as one line. The buffer is wiped when dropped, because an `invoke` may hold secrets.
///
/// The line is measured first and allocated once: a growing buffer would copy the message at every
/// doubling (a 50 MB parameter cost 96 MB at the last one) and leave the outgrown buffers, secrets
/// included, unwiped in freed memory.
pub(crate) fn encode(message: &impl Serialize) -> Zeroizing<Vec<u8>> {
    let mut length = ByteCount(0);
    serde_json::to_writer(&mut length, message).expect("protocol messages always serialize");
    let mut line = Zeroizing::new(Vec::with_capacity(length.0 + 1));
    serde_json::to_writer(&mut *line, message).expect("protocol messages always serialize");
    line.push(b'\n');
    line
}

/// A writer that only counts the bytes written to it.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An `invoke` request. Serializing it exposes secrets: only [`encode`] does that, for the worker's stdin.
pub(crate) struct Invoke<'a> {
    pub(crate) id: u64,
    /// Which runspace of the worker runs it; omitted on the wire when 0.
    pub(crate) runspace: usize,
    pub(crate) command: &'a Command,
}

impl Serialize for Invoke<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("t", "invoke")?;
        map.serialize_entry("id", &self.id)?;
        if self.runspace > 0 {
            map.serialize_entry("runspace", &self.runspace)?;
        }
        if let Some(depth) = self.command.depth {
            map.serialize_entry("depth", &depth)?;
        }
        map.serialize_entry("pipeline", &Steps(&self.command.steps))?;
        map.end()
    }
}

struct Steps<'a>(&'a [Step]);

impl Serialize for Steps<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for step in self.0 {
            seq.serialize_element(&StepWire(step))?;
        }
        seq.end()
    }
}

struct StepWire<'a>(&'a Step);

impl Serialize for StepWire<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        match &self.0.runnable {
            Runnable::Command(name) => map.serialize_entry("command", name)?,
            Runnable::Script(text) => map.serialize_entry("script", text)?,
        }
        map.serialize_entry("parameters", &Parameters(&self.0.parameters))?;
        map.end()
    }
}

struct Parameters<'a>(&'a [(String, ParamValue)]);

impl Serialize for Parameters<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, &ValueWire(value))?;
        }
        map.end()
    }
}

/// Values JSON cannot carry travel as `{"$psbridge": kind, "value": ...}` (a certificate also has a
/// `password`).
struct ValueWire<'a>(&'a ParamValue);

impl Serialize for ValueWire<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let (kind, value): (&str, &str) = match self.0 {
            ParamValue::Json(v) => return v.serialize(s),
            ParamValue::Bytes(bytes) => {
                let encoded = Zeroizing::new(base64_encode(bytes));
                return tagged(s, "bytes", &encoded);
            }
            ParamValue::DateTime(text) => ("datetime", text),
            ParamValue::SecureString(secret) => ("securestring", secret.expose_secret()),
            ParamValue::PlainSecret(secret) => ("secret", secret.expose_secret()),
            ParamValue::Certificate { pfx_base64, password } => {
                let mut map = s.serialize_map(Some(3))?;
                map.serialize_entry("$psbridge", "certificate")?;
                map.serialize_entry("value", pfx_base64.expose_secret())?;
                map.serialize_entry("password", &password.as_ref().map(|p| p.expose_secret()))?;
                return map.end();
            }
        };
        tagged(s, kind, value)
    }
}

fn tagged<S: Serializer>(s: S, kind: &str, value: &str) -> std::result::Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(2))?;
    map.serialize_entry("$psbridge", kind)?;
    map.serialize_entry("value", value)?;
    map.end()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A `cancel` or `exit` message.
pub(crate) fn control(kind: &str, id: Option<u64>) -> Zeroizing<Vec<u8>> {
    match id {
        Some(id) => encode(&serde_json::json!({"t": kind, "id": id})),
        None => encode(&serde_json::json!({"t": kind})),
    }
}

/// A message from the worker, decoded.
#[derive(Debug)]
pub(crate) enum Message {
    Ready(WorkerInfo),
    Item(u64, StreamItem),
    Done(u64, Completion),
    Fatal(Option<u64>, String),
}

/// The envelope every worker message shares; `v` is decoded according to `t`.
#[derive(Deserialize)]
struct Envelope<'a> {
    t: &'a str,
    id: Option<u64>,
    /// Present for stream items; a JSON `null` here is a value (a `$null` output object), not a missing one.
    #[serde(borrow, default, deserialize_with = "present")]
    v: Option<&'a RawValue>,
    #[serde(default)]
    types: Vec<String>,
    state: Option<PipelineState>,
    had_errors: Option<bool>,
    duration_ms: Option<f64>,
    exit_code: Option<i32>,
    native_exit_code: Option<i32>,
    message: Option<String>,
}

/// `Some` for any value the field holds, `null` included (serde's `Option` would make `null` a `None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Decodes one line from the worker.
pub(crate) fn decode(line: &str) -> Result<Message> {
    let bad = |why: String| Error::ProtocolViolation(format!("{why} in worker line {}", preview(line)));
    if line.starts_with(r#"{"t":"ready""#) {
        return serde_json::from_str(line).map(Message::Ready).map_err(|e| bad(e.to_string()));
    }
    let envelope: Envelope<'_> = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
    if envelope.t == "fatal" {
        return Ok(Message::Fatal(envelope.id, envelope.message.unwrap_or_default()));
    }
    let id = envelope.id.ok_or_else(|| bad("message without id".into()))?;
    if envelope.t == "done" {
        let completion = Completion {
            had_errors: envelope.had_errors.unwrap_or(false),
            state: envelope.state.ok_or_else(|| bad("done without state".into()))?,
            // JSON has no NaN, but it has 1e300: saturate rather than panic the reader task.
            duration: Duration::try_from_secs_f64(envelope.duration_ms.unwrap_or(0.0).max(0.0) / 1000.0).unwrap_or(Duration::MAX),
            exit_code: envelope.exit_code,
            native_exit_code: envelope.native_exit_code,
        };
        return Ok(Message::Done(id, completion));
    }
    let raw = envelope.v.ok_or_else(|| bad(format!("'{}' without a value", envelope.t)))?.get();
    let parse_err = |e: serde_json::Error| bad(e.to_string());
    let item = match envelope.t {
        "out" => StreamItem::Output(PsObject {
            type_names: envelope.types,
            value: serde_json::from_str(raw).map_err(parse_err)?,
        }),
        "err" => StreamItem::Error(Box::new(serde_json::from_str::<ErrorRecord>(raw).map_err(parse_err)?)),
        "warn" => StreamItem::Warning(serde_json::from_str(raw).map_err(parse_err)?),
        "verbose" => StreamItem::Verbose(serde_json::from_str(raw).map_err(parse_err)?),
        "debug" => StreamItem::Debug(serde_json::from_str(raw).map_err(parse_err)?),
        "info" => StreamItem::Information(serde_json::from_str::<InformationRecord>(raw).map_err(parse_err)?),
        "progress" => StreamItem::Progress(serde_json::from_str::<ProgressRecord>(raw).map_err(parse_err)?),
        other => return Err(bad(format!("unknown message type '{other}'"))),
    };
    Ok(Message::Item(id, item))
}

/// The start of a line, for error messages: enough to recognise it, never a whole object.
fn preview(line: &str) -> String {
    let cut: String = line.chars().take(120).collect();
    if cut.len() < line.len() { format!("{cut:?}...") } else { format!("{cut:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    #[test]
    fn invoke_encodes_values_by_kind_and_never_as_script_text() {
        let command = Command::new("Connect-ExchangeOnline")
            .param("AppId", "a")
            .param("Since", ParamValue::DateTime("2026-01-01T00:00:00Z".into()))
            .param("Blob", ParamValue::Bytes(vec![1, 2, 3, 255]))
            .secure_param("CertificatePassword", SecretString::from("p@ss"))
            .pipe("Select-Object")
            .param("First", 1);
        let line = encode(&Invoke { id: 7, runspace: 0, command: &command });
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["t"], "invoke");
        assert_eq!(v["id"], 7);
        let first = &v["pipeline"][0];
        assert_eq!(first["command"], "Connect-ExchangeOnline");
        assert_eq!(first["parameters"]["Since"], serde_json::json!({"$psbridge": "datetime", "value": "2026-01-01T00:00:00Z"}));
        assert_eq!(first["parameters"]["Blob"]["value"], "AQID/w==");
        assert_eq!(first["parameters"]["CertificatePassword"]["$psbridge"], "securestring");
        assert_eq!(v["pipeline"][1]["parameters"]["First"], 1);
        assert!(!format!("{command:?}").contains("p@ss"), "Debug output must not show secrets");
    }

    #[test]
    fn a_line_is_allocated_once_at_its_length() {
        let command = Command::script("param($V) $V.Length").param("V", "é\"x".repeat(10_000));
        let line = encode(&Invoke { id: 1, runspace: 0, command: &command });
        assert_eq!(line.capacity(), line.len(), "no spare capacity, so no reallocation happened");
        assert_eq!(line.last(), Some(&b'\n'));
    }

    #[test]
    fn base64_pads_like_rfc_4648() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foob"), "Zm9vYg==");
    }

    #[test]
    fn decode_reads_each_message_kind() {
        let m = decode(r#"{"t":"out","id":3,"types":["System.String"],"v":"x"}"#).unwrap();
        assert!(matches!(m, Message::Item(3, StreamItem::Output(ref o)) if o.value == "x"));
        let m = decode(r#"{"t":"done","id":3,"state":"Stopped","had_errors":false,"duration_ms":1.5}"#).unwrap();
        assert!(matches!(m, Message::Done(3, c) if c.state == PipelineState::Stopped));
        let m = decode(r#"{"t":"out","id":3,"types":[],"v":null}"#).unwrap();
        assert!(matches!(m, Message::Item(3, StreamItem::Output(ref o)) if o.value.is_null()), "null is a value");
        let m = decode(r#"{"t":"done","id":3,"state":"Completed","had_errors":false,"exit_code":5,"native_exit_code":2}"#).unwrap();
        assert!(matches!(m, Message::Done(3, c) if c.exit_code == Some(5) && c.native_exit_code == Some(2)));
        let m = decode(r#"{"t":"ready","protocol":2,"ps_version":"7.6.9","ps_edition":"Core","os":"x","pid":9}"#).unwrap();
        assert!(matches!(m, Message::Ready(ref i) if i.pid == 9));
    }

    /// The golden fixtures (see PROTOCOL.md): one line per message, in both directions.
    const OWNER_TO_WORKER: &str = include_str!("../tests/fixtures/protocol/owner-to-worker.jsonl");
    const WORKER_TO_OWNER: &str = include_str!("../tests/fixtures/protocol/worker-to-owner.jsonl");

    /// The base64 PFX files of the fixture's certificates (a throwaway self-signed EC key, `CN=psbridge
    /// fixture`), with the password `fixture` and without one, read from the fixture itself.
    fn fixture_pfx(parameter: &str) -> String {
        let invoke: Value = serde_json::from_str(OWNER_TO_WORKER.lines().nth(1).unwrap()).unwrap();
        invoke["pipeline"][0]["parameters"][parameter]["value"].as_str().unwrap().to_owned()
    }

    /// The requests the fixture's lines were written from, in the fixture's order, encoded.
    fn owner_messages() -> Vec<Zeroizing<Vec<u8>>> {
        let modules = [
            ModuleSpec { name: "ExchangeOnlineManagement".into(), minimum_version: Some("3.0".into()) },
            ModuleSpec { name: "/opt/psbridge/modules/Contoso.Tools.psd1".into(), minimum_version: None },
        ];
        let variables = serde_json::json!({"Tenant": "contoso", "Limit": 5, "When": {"$psbridge": "datetime", "value": "2026-01-02T03:04:05Z"}});
        let setup = Setup { id: 1, runspace: 0, modules: &modules, execution_policy: Some("RemoteSigned"), variables: variables.as_object().unwrap(), depth: 4 };
        let no_variables = serde_json::Map::new();
        let second_setup = Setup { id: 4, runspace: 1, modules: &[], execution_policy: None, variables: &no_variables, depth: 4 };
        // Numbers parsed from text keep their text (serde_json's arbitrary_precision), as callers' JSON does.
        let plain: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"Text": "café ✓ \"quoted\" \\ back\nslash\u0001", "Int": 42, "Negative": -7, "Long": 9007199254740993,
                "Decimal": 18446744073709551615, "Big": -1267650600228229401496703205376, "Float": 1.5, "Exponent": 1e3,
                "On": true, "Off": false, "Nothing": null, "List": [1, "two", null, [3]],
                "Table": {"k": "v", "Nested": {"n": 1}}}"#,
        )
        .unwrap();
        let every_kind = Command::new("Connect-Thing")
            .params(plain)
            .param("When", ParamValue::DateTime("2026-01-02T03:04:05Z".into()))
            .param("WhenOffset", ParamValue::DateTime("2026-01-02T03:04:05+02:00".into()))
            .param("Blob", ParamValue::Bytes(vec![0, 1, 2, 255]))
            .secure_param("Password", SecretString::from("p@ss w0rd"))
            .secret_param("Token", SecretString::from("eyJ0eXAi.fixture.token"))
            .certificate_param("Cert", SecretString::from(fixture_pfx("Cert")), Some(SecretString::from("fixture")))
            .certificate_param("CertNoPassword", SecretString::from(fixture_pfx("CertNoPassword")), None)
            .pipe("Select-Object")
            .param("First", 1)
            .depth(6);
        let script = Command::script("param($Name) \"Hello, $Name\"").param("Name", "world");
        vec![
            encode(&setup),
            encode(&Invoke { id: 2, runspace: 0, command: &every_kind }),
            encode(&Invoke { id: 3, runspace: 0, command: &script }),
            encode(&second_setup),
            encode(&Invoke { id: 5, runspace: 1, command: &Command::new("Get-Date") }),
            control("cancel", Some(2)),
            control("exit", None),
        ]
    }

    #[test]
    fn the_encoder_writes_the_owner_fixture_byte_for_byte() {
        let fixture: Vec<&str> = OWNER_TO_WORKER.lines().collect();
        let encoded = owner_messages();
        assert_eq!(encoded.len(), fixture.len(), "one message per fixture line");
        for (number, (line, message)) in fixture.iter().zip(&encoded).enumerate() {
            let message = std::str::from_utf8(message).unwrap();
            let wanted = format!("{line}\n");
            let at = message.bytes().zip(wanted.bytes()).position(|(a, b)| a != b).unwrap_or(message.len().min(wanted.len()));
            assert_eq!(message.len(), wanted.len(), "line {}: lengths differ; first difference at byte {at}", number + 1);
            let window = |text: &str| text.get(at.saturating_sub(40)..(at + 40).min(text.len())).unwrap_or(text).to_owned();
            assert!(message == wanted, "line {}, byte {at}: the encoder wrote ...{}... where the fixture has ...{}...", number + 1, window(message), window(&wanted));
        }
    }

    /// What each line of the worker fixture must decode to, in order.
    fn worker_messages() -> Vec<Message> {
        let info = WorkerInfo { protocol: 2, ps_version: "7.6.9".into(), ps_edition: "Core".into(), os: "Ubuntu 24.04.2 LTS".into(), pid: 4242 };
        let object = PsObject {
            type_names: vec!["Psbridge.Fixture".into(), "System.Management.Automation.PSCustomObject".into(), "System.Object".into()],
            value: serde_json::json!({"Text": "café", "Int": 42, "Big": 9007199254740993_u64, "Float": 1.5, "Bool": true, "Null": null,
                "Utc": "2026-01-02T03:04:05Z", "Offset": "2026-01-02T03:04:05+02:00", "Bytes": "AAEC/w==", "List": [1, "two", null],
                "Table": {"k": "v"}, "Span": "01:30:00", "Cut": "System.Collections.Hashtable"}),
        };
        let path = "/no/such/psbridge/file";
        let not_found = format!("Cannot find path '{path}' because it does not exist.");
        let error = ErrorRecord {
            message: not_found.clone(),
            exception_message: Some(not_found),
            exception_type: Some("System.Management.Automation.ItemNotFoundException".into()),
            fully_qualified_error_id: Some("PathNotFound,Microsoft.PowerShell.Commands.GetItemCommand".into()),
            category: "ObjectNotFound".into(),
            activity: Some("Get-Item".into()),
            reason: Some("ItemNotFoundException".into()),
            target_name: Some(path.into()),
            target_type: Some("String".into()),
            category_info: Some(format!("ObjectNotFound: ({path}:String) [Get-Item], ItemNotFoundException")),
            target_object: Some(path.into()),
            // A command (not script text) has neither: the worker sends them empty, as captured.
            script_stack_trace: Some(String::new()),
            position_message: Some(String::new()),
            command: Some("Get-Item".into()),
            terminating: false,
        };
        let information = InformationRecord {
            message: Some("hello from Write-Host".into()),
            source: Some("Write-Host".into()),
            tags: vec!["PSHOST".into()],
            time_generated: Some("2026-01-02T03:04:05.1234567+00:00".into()),
        };
        let progress = ProgressRecord {
            activity: Some("Copying".into()),
            status_description: Some("half way".into()),
            current_operation: None,
            activity_id: 0,
            parent_activity_id: -1,
            percent_complete: 50,
            seconds_remaining: -1,
            record_type: "Processing".into(),
        };
        let done = |state, had_errors, ms: f64, exit_code, native_exit_code| Completion {
            had_errors,
            state,
            duration: Duration::from_secs_f64(ms / 1000.0),
            exit_code,
            native_exit_code,
        };
        vec![
            Message::Ready(info),
            Message::Item(2, StreamItem::Output(object)),
            Message::Item(2, StreamItem::Output(PsObject { type_names: vec![], value: Value::Null })),
            Message::Item(2, StreamItem::Error(Box::new(error))),
            Message::Item(2, StreamItem::Warning("careful".into())),
            Message::Item(2, StreamItem::Verbose("the details".into())),
            Message::Item(2, StreamItem::Debug("the internals".into())),
            Message::Item(2, StreamItem::Information(information)),
            Message::Item(2, StreamItem::Progress(progress)),
            Message::Done(2, done(PipelineState::Completed, true, 12.5, None, None)),
            Message::Done(3, done(PipelineState::Completed, false, 3.25, Some(7), Some(2))),
            Message::Done(4, done(PipelineState::Completed, false, 1.0, None, Some(0))),
            Message::Done(5, done(PipelineState::Failed, true, 0.5, None, None)),
            Message::Done(6, done(PipelineState::Failed, true, 2.0, Some(1), None)),
            Message::Done(7, done(PipelineState::Stopped, false, 0.0, None, None)),
            Message::Done(8, done(PipelineState::Stopped, false, 1500.75, None, Some(130))),
            Message::Fatal(None, "unparsable request: 'x' is an invalid start of a value. LineNumber: 0 | BytePositionInLine: 0.".into()),
            Message::Fatal(Some(9), "unknown request type 'nope'".into()),
        ]
    }

    /// `Message` has no `PartialEq` of its own: the library never compares messages.
    impl PartialEq for Message {
        fn eq(&self, other: &Self) -> bool {
            match (self, other) {
                (Message::Ready(a), Message::Ready(b)) => {
                    (a.protocol, &a.ps_version, &a.ps_edition, &a.os, a.pid) == (b.protocol, &b.ps_version, &b.ps_edition, &b.os, b.pid)
                }
                (Message::Item(a, x), Message::Item(b, y)) => a == b && x == y,
                (Message::Done(a, x), Message::Done(b, y)) => a == b && x == y,
                (Message::Fatal(a, x), Message::Fatal(b, y)) => a == b && x == y,
                _ => false,
            }
        }
    }

    #[test]
    fn every_worker_fixture_line_decodes_to_its_message() {
        let fixture: Vec<&str> = WORKER_TO_OWNER.lines().collect();
        let expected = worker_messages();
        assert_eq!(fixture.len(), expected.len(), "one expected message per fixture line");
        for (line, expected) in fixture.iter().zip(&expected) {
            let decoded = decode(line).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&decoded, expected, "{line}");
        }
    }

    #[test]
    fn a_duration_beyond_any_clock_is_not_a_panic() {
        let m = decode(r#"{"t":"done","id":1,"state":"Completed","had_errors":false,"duration_ms":1e300}"#).unwrap();
        assert!(matches!(m, Message::Done(1, c) if c.duration == Duration::MAX));
    }

    #[test]
    fn decode_rejects_what_is_not_a_message() {
        for line in ["hello", r#"{"t":"out","v":1}"#, r#"{"t":"nope","id":1,"v":1}"#, r#"{"t":"done","id":1}"#] {
            assert!(matches!(decode(line), Err(Error::ProtocolViolation(_))), "{line}");
        }
    }
}
