//! What to run: a command, a pipeline of commands, or a script, with parameters bound by name.
//!
//! Parameter values travel as data and are bound with PowerShell's `AddParameter`; they are never
//! pasted into script text, so a value such as `'; Remove-Item -Recurse /` is just a string.

use std::fmt::Write as _;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::{Map, Value};

use crate::errors::{Error, Result};

/// How deeply arrays and objects may nest in one parameter value (`[[1]]` is 2 levels).
///
/// [`Command::validate`] refuses deeper values before anything is sent; the worker reads requests with
/// the same limit (plus the few levels of the request around the values), so a value that passes here
/// is never refused there.
pub const MAX_VALUE_DEPTH: usize = 64;

/// A parameter value.
///
/// Anything that converts into [`serde_json::Value`] converts into a `ParamValue`: strings, numbers,
/// booleans (switches take `true`/`false`), `null`, arrays and objects (objects arrive as hashtables).
/// The other variants carry what JSON cannot.
#[derive(Debug, Clone)]
pub enum ParamValue {
    /// A JSON value.
    Json(Value),
    /// A `DateTime`, given as an RFC 3339 / ISO 8601 string such as `2026-01-31T12:00:00Z`.
    DateTime(String),
    /// A `byte[]`.
    Bytes(Vec<u8>),
    /// A secret that reaches the command as a `SecureString` (for example `CertificatePassword`).
    SecureString(SecretString),
    /// A secret that reaches the command as a plain string (for example `AccessToken`).
    PlainSecret(SecretString),
    /// A certificate with its private key, built in the worker's memory from a PKCS#12 (PFX) file's
    /// bytes, base64-encoded, and its password: it reaches the command as an `X509Certificate2` (for
    /// example `Connect-ExchangeOnline -Certificate`). Nothing is written to disk.
    Certificate {
        /// The PFX, base64.
        pfx_base64: SecretString,
        /// The PFX's password, if it has one.
        password: Option<SecretString>,
    },
}

impl<T: Into<Value>> From<T> for ParamValue {
    fn from(value: T) -> Self {
        ParamValue::Json(value.into())
    }
}

/// What a pipeline step runs.
#[derive(Debug, Clone)]
pub(crate) enum Runnable {
    /// A command by name.
    Command(String),
    /// Script text; its `param()` block receives the step's parameters.
    Script(String),
}

/// One step of a pipeline.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) runnable: Runnable,
    pub(crate) parameters: Vec<(String, ParamValue)>,
}

/// Something to run in a [`Runspace`](crate::Runspace).
///
/// ```
/// use psbridge::Command;
/// // Get-Mailbox -Identity ContosoUser1 -ResultSize 10
/// let get = Command::new("Get-Mailbox").param("Identity", "ContosoUser1").param("ResultSize", 10);
/// // Get-Mailbox -ResultSize Unlimited | Select-Object -First 5 (a script can be piped the same way)
/// let first = Command::new("Get-Mailbox").param("ResultSize", "Unlimited").pipe("Select-Object").param("First", 5);
/// // a script whose param() block receives the values
/// let script = Command::script("param($Name) \"Hello, $Name\"").param("Name", "world");
/// // Set-Mailbox ... -WhatIf
/// let what_if = Command::new("Set-Mailbox").param("Identity", "ContosoUser1").switch("WhatIf");
/// assert_eq!(get.name(), "Get-Mailbox");
/// assert_eq!(script.name(), "<script>");
/// # let _ = (first, what_if);
/// ```
#[derive(Debug, Clone)]
pub struct Command {
    pub(crate) steps: Vec<Step>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) key: Option<String>,
    pub(crate) idempotent: Option<bool>,
    pub(crate) depth: Option<u32>,
}

impl Command {
    /// A command (cmdlet, function, alias or script path) by name.
    pub fn new(name: impl Into<String>) -> Self {
        Self::start(Runnable::Command(name.into()))
    }

    /// A script. Its `param()` block receives the parameters added with [`param`](Self::param).
    pub fn script(text: impl Into<String>) -> Self {
        Self::start(Runnable::Script(text.into()))
    }

    fn start(runnable: Runnable) -> Self {
        Command { steps: vec![Step { runnable, parameters: Vec::new() }], timeout: None, key: None, idempotent: None, depth: None }
    }

    /// Adds a named parameter to the last step of the pipeline.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<ParamValue>) -> Self {
        self.parameters_mut().push((name.into(), value.into()));
        self
    }

    /// Adds every entry of a JSON object as a named parameter, in order.
    pub fn params(mut self, parameters: Map<String, Value>) -> Self {
        self.parameters_mut().extend(parameters.into_iter().map(|(k, v)| (k, ParamValue::Json(v))));
        self
    }

    /// Sets a switch parameter (`-Name`); use `param(name, false)` for `-Name:$false`.
    pub fn switch(self, name: impl Into<String>) -> Self {
        self.param(name, true)
    }

    /// Adds a secret that the command receives as a `SecureString`.
    ///
    /// The secret travels only over the worker's stdin; it is never in argv, the environment, a file,
    /// a log line or `Debug` output, and psbridge masks it in the error records of a failed connect.
    pub fn secure_param(self, name: impl Into<String>, secret: SecretString) -> Self {
        self.param(name, ParamValue::SecureString(secret))
    }

    /// Adds a secret that the command receives as a plain string (for parameters typed `string`, such as
    /// `AccessToken`). Handled as carefully as [`secure_param`](Self::secure_param) on the Rust side.
    pub fn secret_param(self, name: impl Into<String>, secret: SecretString) -> Self {
        self.param(name, ParamValue::PlainSecret(secret))
    }

    /// Adds a certificate that the command receives as an `X509Certificate2` with its private key, built
    /// in the worker's memory from a base64 PFX (as CI systems hold certificates in their secret stores).
    ///
    /// ```
    /// use psbridge::{Command, SecretString};
    /// let pfx = SecretString::from(std::env::var("EXO_CERT_PFX_BASE64").unwrap_or_default());
    /// let connect = Command::new("Connect-ExchangeOnline")
    ///     .param("AppId", "11111111-2222-3333-4444-555555555555")
    ///     .param("Organization", "contoso.onmicrosoft.com")
    ///     .certificate_param("Certificate", pfx, Some(SecretString::from("pfx password")));
    /// # let _ = connect;
    /// ```
    pub fn certificate_param(self, name: impl Into<String>, pfx_base64: SecretString, password: Option<SecretString>) -> Self {
        self.param(name, ParamValue::Certificate { pfx_base64, password })
    }

    /// Pipes into another command: `self | name`. Later [`param`](Self::param) calls go to `name`.
    pub fn pipe(mut self, name: impl Into<String>) -> Self {
        self.steps.push(Step { runnable: Runnable::Command(name.into()), parameters: Vec::new() });
        self
    }

    /// Overrides the runspace's command timeout for this command.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Overrides the runspace's serialization depth for this command's output: objects nested deeper
    /// arrive as their `ToString()`, with a warning naming the property that was cut (see
    /// [`RunspaceBuilder::depth`](crate::RunspaceBuilder::depth)).
    pub fn depth(mut self, depth: u32) -> Self {
        self.depth = Some(depth);
        self
    }

    /// Marks what the command changes, for a [`RunspacePool`](crate::RunspacePool): commands with the
    /// same key never run at the same time and run in the order they were submitted (for example the
    /// Identity a Set-Mailbox changes). A single runspace runs one command at a time anyway.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Whether running the command twice is harmless, so that a pool may run it again on a new worker
    /// when its worker died mid-command. Default: true for `Get-*` commands, false otherwise.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = Some(idempotent);
        self
    }

    /// The key given with [`key`](Self::key).
    pub fn key_str(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Whether the command may be run again after its worker died (see [`idempotent`](Self::idempotent)).
    ///
    /// ```
    /// use psbridge::Command;
    /// assert!(Command::new("Get-Mailbox").is_idempotent());
    /// assert!(!Command::new("Set-Mailbox").is_idempotent());
    /// assert!(Command::new("Set-Mailbox").idempotent(true).is_idempotent());
    /// ```
    pub fn is_idempotent(&self) -> bool {
        self.idempotent.unwrap_or_else(|| {
            matches!(&self.steps[0].runnable, Runnable::Command(name) if name.len() > 4 && name.as_bytes()[..4].eq_ignore_ascii_case(b"get-"))
        })
    }

    /// The first command's name, or `<script>`.
    pub fn name(&self) -> &str {
        match &self.steps[0].runnable {
            Runnable::Command(name) => name,
            Runnable::Script(_) => "<script>",
        }
    }

    /// Checks what would be refused later, before anything is sent: command names, parameter names
    /// (letters, digits and `_`, not starting with a digit; each at most once per step, compared
    /// case-insensitively as PowerShell does), and values nested more than [`MAX_VALUE_DEPTH`] levels.
    /// [`Runspace::invoke`](crate::Runspace::invoke) calls it too.
    ///
    /// # Errors
    /// [`Error::InvalidCommand`] saying what is wrong and where.
    ///
    /// ```
    /// use psbridge::{Command, Error};
    /// assert!(Command::new("Get-Mailbox").param("Identity", "x").validate().is_ok());
    /// let twice = Command::new("Get-Mailbox").param("Identity", "x").param("identity", "y");
    /// assert!(matches!(twice.validate(), Err(Error::InvalidCommand { .. })));
    /// let mut deep = serde_json::json!(1);
    /// for _ in 0..65 { deep = serde_json::json!([deep]); }
    /// let error = Command::script("param($V)").param("V", deep).validate().unwrap_err();
    /// assert!(error.to_string().contains("too deep"), "{error}");
    /// ```
    pub fn validate(&self) -> Result<()> {
        for (index, step) in self.steps.iter().enumerate() {
            let at = || if self.steps.len() > 1 { format!(" (pipeline step {})", index + 1) } else { String::new() };
            let invalid = |reason: String| Error::InvalidCommand { reason: format!("{reason}{}", at()) };
            match &step.runnable {
                Runnable::Command(name) if name.trim().is_empty() => return Err(invalid("the command name is empty".into())),
                Runnable::Command(name) if name.chars().any(char::is_control) => {
                    return Err(invalid(format!("the command name {name:?} holds a control character")));
                }
                _ => {}
            }
            for (i, (name, value)) in step.parameters.iter().enumerate() {
                if !valid_parameter_name(name) {
                    return Err(invalid(format!("parameter name {name:?} is not valid (letters, digits and _ only)")));
                }
                if let Some((first, _)) = step.parameters[..i].iter().find(|(other, _)| other.eq_ignore_ascii_case(name)) {
                    return Err(invalid(format!(
                        "parameter {name} is given twice (as {first} and {name}; PowerShell parameter names ignore case)"
                    )));
                }
                if let ParamValue::Json(value) = value
                    && let Some(path) = too_deep(value, name)
                {
                    return Err(invalid(format!(
                        "parameter {name}: the value is too deep: nested more than {MAX_VALUE_DEPTH} levels, at {path}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The secrets among the parameters, to mask them in error records.
    pub(crate) fn secrets(&self) -> impl Iterator<Item = &SecretString> {
        self.steps.iter().flat_map(|s| s.parameters.iter()).flat_map(|(_, v)| {
            let secrets: Vec<&SecretString> = match v {
                ParamValue::SecureString(s) | ParamValue::PlainSecret(s) => vec![s],
                ParamValue::Certificate { pfx_base64, password } => std::iter::once(pfx_base64).chain(password).collect(),
                ParamValue::Json(_) | ParamValue::DateTime(_) | ParamValue::Bytes(_) => Vec::new(),
            };
            secrets
        })
    }

    fn parameters_mut(&mut self) -> &mut Vec<(String, ParamValue)> {
        // `steps` is never empty: every constructor makes one step and nothing removes steps.
        &mut self.steps.last_mut().expect("a command has at least one step").parameters
    }
}

/// A PowerShell parameter name: letters, digits and `_`, not starting with a digit.
///
/// ```
/// assert!(psbridge::valid_parameter_name("Identity"));
/// assert!(psbridge::valid_parameter_name("_x1"));
/// assert!(!psbridge::valid_parameter_name("1x") && !psbridge::valid_parameter_name("a-b") && !psbridge::valid_parameter_name(""));
/// ```
pub fn valid_parameter_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_') && chars.all(|c| c.is_alphanumeric() || c == '_')
}

/// Where `value` first nests deeper than [`MAX_VALUE_DEPTH`], as a path such as `V[0].a[1]`.
fn too_deep(value: &Value, name: &str) -> Option<String> {
    fn walk(value: &Value, depth: usize, path: &mut String) -> bool {
        let (children, is_array): (Box<dyn Iterator<Item = (String, &Value)>>, bool) = match value {
            Value::Array(items) => (Box::new(items.iter().enumerate().map(|(i, v)| (i.to_string(), v))), true),
            Value::Object(map) => (Box::new(map.iter().map(|(k, v)| (k.clone(), v))), false),
            _ => return false,
        };
        if depth >= MAX_VALUE_DEPTH {
            return true;
        }
        for (key, child) in children {
            let len = path.len();
            if is_array {
                let _ = write!(path, "[{key}]");
            } else {
                let _ = write!(path, ".{key}");
            }
            if walk(child, depth + 1, path) {
                return true;
            }
            path.truncate(len);
        }
        false
    }
    let mut path = name.to_owned();
    walk(value, 0, &mut path).then(|| {
        // A path 65 levels deep is long: its start and end say where it is.
        let chars: Vec<char> = path.chars().collect();
        if chars.len() > 120 {
            let head: String = chars[..40].iter().collect();
            let tail: String = chars[chars.len() - 60..].iter().collect();
            format!("{head}...{tail}")
        } else {
            path
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_reads_requests_with_the_same_value_depth() {
        let host = include_str!("../scripts/worker/host/Protocol.cs");
        assert!(host.contains(&format!("public const int MaxValueDepth = {MAX_VALUE_DEPTH};")), "Protocol.cs and MAX_VALUE_DEPTH differ");
    }

    #[test]
    fn validate_names_where_a_value_is_too_deep() {
        let mut ok = serde_json::json!("leaf");
        for _ in 0..MAX_VALUE_DEPTH {
            ok = serde_json::json!({ "a": [ok] }).get("a").cloned().unwrap();
        }
        assert!(Command::script("param($V)").param("V", ok.clone()).validate().is_ok(), "{MAX_VALUE_DEPTH} levels pass");
        let deep = serde_json::json!({ "k": ok });
        let error = Command::new("X").param("V", deep).validate().unwrap_err().to_string();
        assert!(error.contains("parameter V") && error.contains("too deep") && error.contains("V.k[0]"), "{error}");
    }

    #[test]
    fn validate_refuses_names_powershell_would_refuse() {
        for bad in ["", "1st", "a b", "a-b", "-Identity"] {
            assert!(Command::new("Get-Mailbox").param(bad, 1).validate().is_err(), "{bad:?}");
        }
        let piped = Command::new("Get-Mailbox").pipe("Select-Object").param("First", 1).param("FIRST", 2);
        let error = piped.validate().unwrap_err().to_string();
        assert!(error.contains("given twice") && error.contains("pipeline step 2"), "{error}");
        assert!(Command::new(" ").validate().is_err());
    }

    #[test]
    fn idempotence_by_name_survives_multibyte_names() {
        assert!(!Command::new("aéé").is_idempotent());
        assert!(Command::new("GET-Mailbox").is_idempotent());
    }
}
