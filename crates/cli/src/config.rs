//! The configuration file: named profiles, each saying how to start and connect a worker.
//!
//! ```toml
//! default_profile = "contoso"
//!
//! [profiles.contoso]
//! modules = ["ExchangeOnlineManagement"]
//! workers = 3
//!
//! [profiles.contoso.connect]
//! command = "Connect-ExchangeOnline"
//! parameters = { AppId = "…", Organization = "contoso.onmicrosoft.com", CertificateFilePath = "/secure/exo.pfx" }
//! secrets.CertificatePassword = { env = "EXO_CERT_PASSWORD" }
//! ```
//!
//! Secrets are never in the file: each names its source (see [`SecretSpec`]). Every error names the file,
//! the line and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, de};
use serde_json::{Map, Value};
use toml::Spanned;

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "PSBRIDGE_CONFIG";
/// The environment variable naming the profile.
pub const PROFILE_ENV: &str = "PSBRIDGE_PROFILE";
/// The built-in profile: the bundled simulated module and sample tenant.
pub const SIMULATED: &str = "simulated";

/// A whole configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The profile used when neither `--profile` nor PSBRIDGE_PROFILE names one.
    pub default_profile: Option<String>,
    /// Profiles by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, Spanned<ProfileSpec>>,
    /// How `--queue` connects to the NATS server: its credentials and TLS roots.
    pub queue: Option<Spanned<QueueSpec>>,
}

/// The `[queue]` section: how `batch --queue`, `serve --queue` and `queue` connect to NATS. At most one
/// way to authenticate: `user` with `password`, `token`, or `nkey_seed`; each secret names its source
/// as a profile's secrets do (`{ env = "..." }`, `{ file = "..." }`, `{ stdin = true }` or
/// `{ command = [...] }`), read once when psbridge starts.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    /// A user name, authenticated by `password`.
    pub user: Option<String>,
    /// The password of `user`.
    pub password: Option<Spanned<SecretSpec>>,
    /// A token (the server's `authorization { token = ... }`).
    pub token: Option<Spanned<SecretSpec>>,
    /// An nkey seed (`SU...`) whose public key the server lists.
    pub nkey_seed: Option<Spanned<SecretSpec>>,
    /// A PEM file of CA certificates, for a `tls://` server whose certificate a private CA signed
    /// (the system's roots are trusted too).
    pub ca_file: Option<PathBuf>,
}


/// One profile. Every field is optional; defaults are those of `RunspaceBuilder` and `RunspacePool`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    /// The pwsh executable (default: PSBRIDGE_PWSH, else pwsh on PATH).
    pub pwsh: Option<PathBuf>,
    /// Folders put in front of PSModulePath.
    #[serde(default)]
    pub module_path: Vec<PathBuf>,
    /// Modules imported in every worker: a name, or `{ name, minimum_version }`.
    #[serde(default)]
    pub modules: Vec<ModuleEntry>,
    /// The session's execution policy (`RemoteSigned`, `Bypass`, ...).
    pub execution_policy: Option<String>,
    /// Extra environment variables for the workers (not for secrets: those go in `connect.secrets`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Workers of `psbridge batch` (default 3; `--workers` overrides).
    pub workers: Option<usize>,
    /// Runspaces per worker process, each connected on its own (default 1, at most 64;
    /// `--runspaces-per-worker` overrides).
    pub runspaces_per_worker: Option<usize>,
    /// Whether the pool runs fewer commands at once while the service throttles it (default false;
    /// `--adaptive-concurrency` turns it on).
    pub adaptive_concurrency: Option<bool>,
    /// How long a command may run before it is stopped (default: no limit, for ExchangeOnlineManagement
    /// `exo::COMMAND_TIMEOUT`; `--timeout` overrides).
    pub command_timeout_secs: Option<Seconds>,
    /// How long pwsh may take to start and import the modules (default 60 s).
    pub start_timeout_secs: Option<Seconds>,
    /// How long the connect command may take (default 180 s).
    pub connect_timeout_secs: Option<Seconds>,
    /// How long before an access token's `exp` its worker is replaced by a freshly connected one; a token
    /// closer to its end than this is refused at connect (default 300 s).
    pub token_refresh_margin_secs: Option<Seconds>,
    /// How many times in a row a worker may fail to start or connect before psbridge gives up (default 3).
    pub connect_attempts: Option<u32>,
    /// How deeply output objects are serialized: deeper ones arrive as their `ToString()` (default:
    /// the library's; `run --depth` overrides).
    pub depth: Option<u32>,
    /// Run once after the modules are imported, with its secrets from their sources.
    pub connect: Option<CommandSpec>,
    /// Run when a worker closes.
    pub disconnect: Option<CommandSpec>,
    /// The cheap command `psbridge doctor` runs after connecting (default for ExchangeOnlineManagement:
    /// `Get-EXOMailbox -ResultSize 1`).
    pub check: Option<CommandSpec>,
    /// How the pool retries throttled commands.
    pub retry: Option<RetrySpec>,
    /// `psbridge serve`: the commands clients may run, as globs matched case-insensitively against every
    /// command of a pipeline (`["Get-*", "Set-Mailbox"]`). A profile without it is refused by `serve`
    /// unless `--allow-all` is given.
    pub allow: Option<Vec<String>>,
    /// `psbridge serve`: whether clients may run scripts (`run --script`); default false.
    pub allow_scripts: Option<bool>,
    /// `run --server` and `batch --server`: where the bearer token for a `tcp:` server comes from (a
    /// secret source, as under `secrets`; `--token-from` overrides).
    pub server_token: Option<Spanned<SecretSpec>>,
}

/// A module to import.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ModuleEntry {
    /// Just the name.
    Name(String),
    /// A name and the lowest version accepted.
    Versioned {
        /// Module name or path.
        name: String,
        /// Lowest version accepted, such as `3.4.0`.
        minimum_version: String,
    },
}

impl ModuleEntry {
    pub fn name(&self) -> &str {
        match self {
            ModuleEntry::Name(name) | ModuleEntry::Versioned { name, .. } => name,
        }
    }

    pub fn minimum_version(&self) -> Option<&str> {
        match self {
            ModuleEntry::Name(_) => None,
            ModuleEntry::Versioned { minimum_version, .. } => Some(minimum_version),
        }
    }
}

/// A command with parameters bound by name; secret parameters come from their sources.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// The command name.
    pub command: String,
    /// Parameters bound by name (`true` for a switch).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Secret parameters, by name: where each value comes from.
    #[serde(default)]
    pub secrets: BTreeMap<String, Spanned<SecretSpec>>,
}

/// Where one secret comes from: exactly one of `env`, `file`, `stdin` or `command`.
///
/// `as = "securestring"` (the default) hands it to PowerShell as a SecureString, for parameters such as
/// CertificatePassword; `as = "string"` as a plain string, for parameters such as AccessToken;
/// `as = "certificate"` as a certificate built in the worker's memory from a base64 PFX.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// An environment variable holding the secret.
    pub env: Option<String>,
    /// A file holding the secret (its last line break is dropped); refused when others may read it.
    pub file: Option<PathBuf>,
    /// `true`: read the secret from standard input (one line; not echoed on a terminal).
    pub stdin: Option<bool>,
    /// A program and its arguments (no shell), run at each connect: its standard output is the secret.
    pub command: Option<Vec<String>>,
    /// With `command`: the program prints a JSON object and the secret is this top-level string field.
    pub json_field: Option<String>,
    /// With `command`: how long the program may run before it is killed (default 60 s).
    pub timeout_secs: Option<Seconds>,
    /// `securestring` (default), `string` or `certificate`.
    #[serde(rename = "as", default)]
    pub kind: SecretKind,
}

/// How long a `command` source may run when its `timeout_secs` does not say.
pub const DEFAULT_PROGRAM_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a secret comes from, as [`SecretSpec::source`] reads it.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// An environment variable.
    Env(&'a str),
    /// A private file.
    File(&'a Path),
    /// One line of standard input.
    Stdin,
    /// A program's standard output.
    Command(Program<'a>),
}

/// A program whose standard output is a secret.
#[derive(Debug, Clone, Copy)]
pub struct Program<'a> {
    /// The program and its arguments; never empty (checked when the file is read).
    pub argv: &'a [String],
    /// The top-level string field of its JSON output that holds the secret, if it prints JSON.
    pub json_field: Option<&'a str>,
    /// How long it may run.
    pub timeout: Duration,
}

impl SecretSpec {
    /// The secret's source (the file was checked to give exactly one).
    pub fn source(&self) -> Source<'_> {
        match (&self.env, &self.file, &self.command) {
            (Some(variable), _, _) => Source::Env(variable),
            (None, Some(path), _) => Source::File(path),
            (None, None, Some(argv)) => Source::Command(Program {
                argv,
                json_field: self.json_field.as_deref(),
                timeout: self.timeout_secs.map_or(DEFAULT_PROGRAM_TIMEOUT, |s| s.0),
            }),
            (None, None, None) => Source::Stdin,
        }
    }
}

/// How a secret is handed to PowerShell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretKind {
    /// A SecureString.
    #[default]
    SecureString,
    /// A plain string.
    String,
    /// An `X509Certificate2` with its private key, from a base64 PFX (the command's
    /// `CertificatePassword` secret, if any, opens it).
    Certificate,
}

/// A duration in the configuration: a number of seconds (`30`, `1.5`) or a text such as `"30s"`, `"5m"`
/// or `"1h 30m"` (humantime), above 0 and at most a year; anything else is refused when the file is
/// read, with its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

/// The forms a duration may take, for messages.
const DURATION_FORMS: &str = "a number of seconds (30, 1.5) or a duration such as \"30s\", \"5m\" or \"1h 30m\", above 0 and at most 31536000 (a year)";

impl Seconds {
    fn checked<E: de::Error>(duration: Duration, given: impl fmt::Display) -> Result<Seconds, E> {
        if duration.is_zero() || duration.as_secs_f64() > crate::MAX_SECONDS {
            Err(E::custom(format!("{given} is out of range: give {DURATION_FORMS}")))
        } else {
            Ok(Seconds(duration))
        }
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Seconds;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(DURATION_FORMS)
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Seconds, E> {
                self.visit_f64(value as f64)
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Seconds, E> {
                self.visit_f64(value as f64)
            }

            fn visit_f64<E: de::Error>(self, value: f64) -> Result<Seconds, E> {
                match crate::positive_duration(value) {
                    Some(duration) => Ok(Seconds(duration)),
                    None => Err(E::custom(format!("{value} is out of range: give {DURATION_FORMS}"))),
                }
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Seconds, E> {
                let trimmed = text.trim();
                // A number in quotes is seconds too, as the plain number would be.
                if let Ok(value) = trimmed.parse::<f64>() {
                    return self.visit_f64(value);
                }
                match humantime::parse_duration(trimmed) {
                    Ok(duration) => Seconds::checked(duration, format_args!("{text:?}")),
                    Err(error) => Err(E::custom(format!("{text:?} is not a duration ({error}): give {DURATION_FORMS}"))),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Retry policy of the pool (`RetryPolicy`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, the first included (default 6).
    pub max_attempts: Option<u32>,
    /// First backoff in milliseconds, doubling after (default 1000).
    pub base_delay_ms: Option<u64>,
    /// Longest wait in milliseconds, also capping a delay the server asks for (default 60000).
    pub max_delay_ms: Option<u64>,
    /// Whether throttled and transient failures are retried (default true).
    pub retry_transient: Option<bool>,
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}, line {line}: {message}", path.display())]
    Invalid { path: PathBuf, line: usize, message: String },
}

/// A configuration file, where it came from and its text (for line numbers).
#[derive(Debug, Default)]
pub struct Config {
    /// The file read, if any.
    pub path: Option<PathBuf>,
    text: String,
    pub file: ConfigFile,
}

impl Config {
    /// Reads the file given by `--config`/PSBRIDGE_CONFIG (which must exist), else the default one in
    /// the user's config folder if it exists, else an empty configuration.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = match explicit {
            Some(path) => (path.to_path_buf(), true),
            None => match default_path() {
                Some(path) => (path, false),
                None => return Ok(Config::default()),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if !required && error.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let file: ConfigFile = toml::from_str(&text).map_err(|error| ConfigError::Parse { path: path.clone(), message: error.to_string() })?;
        let config = Config { path: Some(path), text, file };
        config.validate()?;
        Ok(config)
    }

    /// Checks every field of every profile, so that a mistake is reported with its line when the file
    /// is read rather than when a worker starts.
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, profile) in &self.file.profiles {
            if name == SIMULATED {
                return Err(self.invalid(profile.span(), format!("the profile name `{SIMULATED}` is built in; choose another name")));
            }
            let spec = profile.get_ref();
            let start = profile.span().start;
            let commands = [("connect", &spec.connect), ("disconnect", &spec.disconnect), ("check", &spec.check)];
            for (what, command) in commands {
                if let Some(command) = command {
                    self.validate_command(name, what, command, start)?;
                }
            }
            for module in &spec.modules {
                if module.name().trim().is_empty() {
                    return Err(self.invalid(profile.span(), format!("profiles.{name}.modules: a module name is empty")));
                }
                if let Some(version) = module.minimum_version()
                    && !is_version(version)
                {
                    return Err(self.invalid_at(
                        self.line_of_text(version, start),
                        format!(
                            "profiles.{name}.modules: minimum_version {version:?} of module {} is not a version; \
                             write two to four numbers separated by dots, such as \"3.4.0\"",
                            module.name()
                        ),
                    ));
                }
            }
            if let Some(policy) = &spec.execution_policy
                && !EXECUTION_POLICIES.iter().any(|known| known.eq_ignore_ascii_case(policy))
            {
                return Err(self.invalid_at(
                    self.line_of_text(policy, start),
                    format!("profiles.{name}.execution_policy {policy:?} is not an execution policy; use one of {}", EXECUTION_POLICIES.join(", ")),
                ));
            }
            for (variable, value) in &spec.env {
                if variable.is_empty() || variable.contains(['=', '\0']) || value.contains('\0') {
                    return Err(self.invalid(
                        profile.span(),
                        format!("profiles.{name}.env: {variable:?} cannot be set (a name must be non-empty, without `=` or NUL, and a value without NUL)"),
                    ));
                }
            }
            for pattern in spec.allow.iter().flatten() {
                if let Err(reason) = crate::serve::policy::check_pattern(pattern) {
                    return Err(self.invalid_at(self.line_of_text(pattern, start), format!("profiles.{name}.allow: {reason}")));
                }
            }
            if let Some(token) = &spec.server_token {
                let at = |message: String| self.invalid(token.span(), format!("profiles.{name}.server_token: {message}"));
                check_source(token.get_ref()).map_err(at)?;
                if token.get_ref().kind == SecretKind::Certificate {
                    return Err(at("a bearer token is text; leave out as = \"certificate\"".to_owned()));
                }
            }
            let at_least_one = [
                ("workers", spec.workers.map(|n| n as u64)),
                ("runspaces_per_worker", spec.runspaces_per_worker.map(|n| n as u64)),
                ("connect_attempts", spec.connect_attempts.map(u64::from)),
                ("retry.max_attempts", spec.retry.as_ref().and_then(|r| r.max_attempts).map(u64::from)),
            ];
            for (key, value) in at_least_one {
                if value == Some(0) {
                    return Err(self.invalid_at(self.line_of_key(key.rsplit('.').next().unwrap_or(key), start), format!("profiles.{name}.{key} must be at least 1")));
                }
            }
        }
        if let Some(queue) = &self.file.queue {
            self.validate_queue(queue)?;
        }
        if let Some(default) = &self.file.default_profile
            && default != SIMULATED
            && !self.file.profiles.contains_key(default)
        {
            return Err(self.invalid_at(
                self.line_of("default_profile"),
                format!("default_profile names `{default}`, which is not defined; profiles: {}", self.profile_names()),
            ));
        }
        Ok(())
    }

    /// The `[queue]` section: one way to authenticate, and secrets that each name one source.
    fn validate_queue(&self, queue: &Spanned<QueueSpec>) -> Result<(), ConfigError> {
        let spec = queue.get_ref();
        let ways = [spec.user.is_some() || spec.password.is_some(), spec.token.is_some(), spec.nkey_seed.is_some()];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err(self.invalid(queue.span(), "queue: give one way to authenticate: user and password, token, or nkey_seed".to_owned()));
        }
        if spec.user.is_some() != spec.password.is_some() {
            return Err(self.invalid(queue.span(), "queue: user and password go together".to_owned()));
        }
        for (key, secret) in [("password", &spec.password), ("token", &spec.token), ("nkey_seed", &spec.nkey_seed)] {
            let Some(secret) = secret else { continue };
            let source = secret.get_ref();
            let sources = [source.env.is_some(), source.file.is_some(), source.stdin == Some(true), source.command.is_some()];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err(self.invalid(
                    secret.span(),
                    format!("queue.{key}: give exactly one source: {{ env = \"VARIABLE\" }}, {{ file = \"/path\" }}, {{ stdin = true }} or {{ command = [...] }}"),
                ));
            }
            if source.command.as_ref().is_some_and(|argv| argv.first().is_none_or(|program| program.trim().is_empty())) {
                return Err(self.invalid(secret.span(), format!("queue.{key}: command needs the program first, then its arguments")));
            }
            if source.kind != SecretKind::SecureString {
                return Err(self.invalid(secret.span(), format!("queue.{key}: `as` is for a command's parameters; leave it out here")));
            }
        }
        Ok(())
    }

    /// A command spec: a valid name and parameters (as the library will check them), and secrets that
    /// each name one source.
    fn validate_command(&self, profile: &str, what: &str, spec: &CommandSpec, start: usize) -> Result<(), ConfigError> {
        let key = format!("profiles.{profile}.{what}");
        // The secrets take part as placeholders, so that a secret given twice in other case is caught too.
        let mut probe = psbridge::Command::new(spec.command.as_str()).params(spec.parameters.clone());
        for name in spec.secrets.keys() {
            probe = probe.param(name.as_str(), Value::Null);
        }
        if let Err(error) = probe.validate() {
            let reason = match error {
                psbridge::Error::InvalidCommand { reason } => reason,
                other => other.to_string(),
            };
            return Err(self.invalid_at(self.line_of_text(&spec.command, start), format!("{key}: {reason}")));
        }
        let mut certificate: Option<&str> = None;
        for (param, secret) in &spec.secrets {
            let at = |message: String| self.invalid(secret.span(), format!("{key}.secrets.{param}: {message}"));
            let source = secret.get_ref();
            check_source(source).map_err(at)?;
            if source.command.is_some() && what == "disconnect" {
                return Err(at(
                    "a command source is run at each connect; the disconnect command is made once, so give its secret \
                     from env, file or stdin"
                        .to_owned(),
                ));
            }
            if spec.parameters.keys().any(|p| p.eq_ignore_ascii_case(param)) {
                return Err(at(format!("{param} is both a parameter and a secret; keep it only under secrets")));
            }
            if source.kind == SecretKind::Certificate {
                if param.eq_ignore_ascii_case("AccessToken") || param.eq_ignore_ascii_case(CERTIFICATE_PASSWORD) {
                    return Err(at(format!("{param} is not a certificate; use as = \"string\" or \"securestring\"")));
                }
                if let Some(first) = certificate {
                    return Err(at(format!("only one secret may be a certificate, and {first} already is")));
                }
                certificate = Some(param);
            }
        }
        Ok(())
    }
    fn invalid(&self, span: std::ops::Range<usize>, message: String) -> ConfigError {
        self.invalid_at(self.line_at(span.start), message)
    }

    fn invalid_at(&self, line: usize, message: String) -> ConfigError {
        ConfigError::Invalid { path: self.path.clone().unwrap_or_default(), line, message }
    }

    /// The line (from 1) holding byte `offset` of the file.
    fn line_at(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())].matches('\n').count() + 1
    }

    /// The line of the first quoted `text` at or after byte `from` (else the line of `from`).
    fn line_of_text(&self, text: &str, from: usize) -> usize {
        let quoted = [format!("\"{text}\""), format!("'{text}'")];
        let found = quoted.iter().filter_map(|q| self.text.get(from..)?.find(q.as_str())).min();
        self.line_at(from + found.unwrap_or(0))
    }

    /// The line of the first `key =` at or after byte `from` (else the line of `from`).
    fn line_of_key(&self, key: &str, from: usize) -> usize {
        let rest = self.text.get(from..).unwrap_or_default();
        let found = rest.lines().scan(0, |offset, line| {
            let here = *offset;
            *offset += line.len() + 1;
            Some((here, line))
        });
        let at = found.filter(|(_, line)| line.trim_start().strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('='))).map(|(at, _)| at).next();
        self.line_at(from + at.unwrap_or(0))
    }

    fn line_of(&self, key: &str) -> usize {
        self.text.lines().position(|l| l.trim_start().starts_with(key)).map_or(1, |i| i + 1)
    }

    /// The names of every profile, the built-in one included.
    pub fn profile_names(&self) -> String {
        std::iter::once(SIMULATED).chain(self.file.profiles.keys().map(String::as_str)).collect::<Vec<_>>().join(", ")
    }

    /// The name of the profile to use: the one asked for, else the file's default, else none.
    pub fn chosen<'a>(&'a self, asked: Option<&'a str>) -> Option<&'a str> {
        asked.or(self.file.default_profile.as_deref())
    }

    /// The line where a profile starts (for messages).
    pub fn profile_line(&self, name: &str) -> Option<usize> {
        Some(self.line_at(self.file.profiles.get(name)?.span().start))
    }
}

/// The parameter whose secret opens a certificate given `as = "certificate"`.
pub const CERTIFICATE_PASSWORD: &str = "CertificatePassword";

/// PowerShell's execution policies.
const EXECUTION_POLICIES: &[&str] = &["AllSigned", "Bypass", "Default", "RemoteSigned", "Restricted", "Undefined", "Unrestricted"];

/// Whether `text` is a version as .NET's `System.Version` reads it: two to four numbers separated by
/// dots, each fitting an `i32`.
fn is_version(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    (2..=4).contains(&parts.len()) && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<i32>().is_ok())
}

/// A secret source names exactly one place, and its options fit it.
fn check_source(source: &SecretSpec) -> Result<(), String> {
    let sources = [source.env.is_some(), source.file.is_some(), source.stdin == Some(true), source.command.is_some()];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err("give exactly one source: { env = \"VARIABLE\" }, { file = \"/path\" }, { stdin = true } \
                    or { command = [\"program\", \"argument\", ...] }"
            .to_owned());
    }
    match &source.command {
        Some(argv) if argv.first().is_none_or(|program| program.trim().is_empty()) => {
            Err("command needs the program first, then its arguments: command = [\"az\", \"account\", ...]".to_owned())
        }
        None if source.json_field.is_some() || source.timeout_secs.is_some() => {
            Err("json_field and timeout_secs are for a command source (command = [...])".to_owned())
        }
        _ => Ok(()),
    }
}

/// `<config folder>/psbridge/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    dirs::config_dir().map(|dir| dir.join("psbridge").join("config.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path))
    }

    #[test]
    fn the_queue_section_takes_one_way_to_authenticate_each_from_one_source() {
        let config = parse("[queue]\nuser = \"psb\"\npassword = { env = \"NATS_PW\" }\nca_file = \"/etc/ca.pem\"\n").unwrap();
        let queue = config.file.queue.as_ref().unwrap().get_ref();
        assert_eq!(queue.password.as_ref().and_then(|p| p.get_ref().env.as_deref()), Some("NATS_PW"));
        assert!(queue.token.is_none() && queue.nkey_seed.is_none());
        parse("[queue]\nnkey_seed = { file = \"/run/secrets/nk\" }\n").unwrap();
        parse("[queue]\ntoken = { command = [\"vault\", \"read\"] }\n").unwrap();
        for (text, expected) in [
            ("[queue]\nuser = \"psb\"\n", "line 1: queue: user and password go together"),
            ("[queue]\ntoken = { env = \"T\" }\nnkey_seed = { env = \"N\" }\n", "give one way to authenticate"),
            ("[queue]\n\ntoken = { env = \"T\", file = \"/t\" }\n", "line 3: queue.token: give exactly one source"),
            ("[queue]\ntoken = { env = \"T\", as = \"string\" }\n", "`as` is for a command's parameters"),
            ("[queue]\nurl = \"nats://x\"\n", "unknown field `url`"),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn a_full_profile_parses() {
        let config = parse(
            r#"
default_profile = "prod"
[profiles.prod]
modules = ["ExchangeOnlineManagement", { name = "Other", minimum_version = "1.2" }]
workers = 4
runspaces_per_worker = 3
adaptive_concurrency = true
[profiles.prod.connect]
command = "Connect-ExchangeOnline"
parameters = { AppId = "a", ShowBanner = false }
secrets.CertificatePassword = { env = "PW" }
secrets.AccessToken = { file = "/x", as = "string" }
[profiles.prod.retry]
max_attempts = 3
"#,
        )
        .unwrap();
        let prod = config.file.profiles["prod"].get_ref();
        assert_eq!(prod.modules[1].minimum_version(), Some("1.2"));
        assert_eq!((prod.runspaces_per_worker, prod.adaptive_concurrency), (Some(3), Some(true)));
        let connect = prod.connect.as_ref().unwrap();
        assert_eq!(connect.secrets["AccessToken"].get_ref().kind, SecretKind::String);
        assert_eq!(config.chosen(None), Some("prod"));
    }

    #[test]
    fn the_readme_example_parses() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("```toml\ndefault_profile").expect("the README has a profile example") + "```toml\n".len();
        let end = start + readme[start..].find("```").unwrap();
        let config = parse(&readme[start..end]).unwrap();
        let contoso = config.file.profiles["contoso"].get_ref();
        assert_eq!(contoso.connect.as_ref().unwrap().secrets["CertificatePassword"].get_ref().env.as_deref(), Some("EXO_CERT_PASSWORD"));
        assert_eq!(contoso.retry.as_ref().unwrap().max_attempts, Some(6));
    }

    #[test]
    fn versions_are_what_dotnet_reads() {
        for good in ["3.4", "3.4.0", "1.2.3.4", "0.0"] {
            assert!(is_version(good), "{good}");
        }
        for bad in ["3", "3.x", "v3.4", "3.4.0.0.0", "3..4", "", "99999999999.0", "3.4-beta"] {
            assert!(!is_version(bad), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let error = parse("[profiles.a]\nworkers = 2\nwokers = 3\n").unwrap_err().to_string();
        assert!(error.contains("line 3") && error.contains("wokers"), "{error}");
        let error = parse("[profiles.a.connect]\ncommand = \"C\"\nsecrets.Pw = { env = \"X\", file = \"/y\" }\n").unwrap_err().to_string();
        assert!(error.contains("line 3") && error.contains("exactly one source"), "{error}");
        let error = parse("[profiles.simulated]\n").unwrap_err().to_string();
        assert!(error.contains("built in"), "{error}");
        let error = parse("[profiles.a]\nworkers = 2\nmodules = [{ name = \"M\", minimum_version = \"3.x\" }]\n").unwrap_err().to_string();
        assert!(error.contains("line 3") && error.contains("minimum_version \"3.x\" of module M is not a version"), "{error}");
        let error = parse("default_profile = \"nope\"\n").unwrap_err().to_string();
        assert!(error.contains("line 1") && error.contains("nope"), "{error}");
    }

    #[test]
    fn durations_are_seconds_or_humantime_text_within_a_year() {
        let timeout = |value: &str| {
            parse(&format!("[profiles.a]\ncommand_timeout_secs = {value}\n")).map(|c| c.file.profiles["a"].get_ref().command_timeout_secs.unwrap().0)
        };
        assert_eq!(timeout("30").unwrap(), Duration::from_secs(30));
        assert_eq!(timeout("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(timeout("\"45\"").unwrap(), Duration::from_secs(45));
        assert_eq!(timeout("\"30s\"").unwrap(), Duration::from_secs(30));
        assert_eq!(timeout("\"5m\"").unwrap(), Duration::from_secs(300));
        assert_eq!(timeout("\"1h 30m\"").unwrap(), Duration::from_secs(5400));
        assert_eq!(timeout("\"365d\"").unwrap(), Duration::from_secs(365 * 86400));
        for bad in ["0", "-1", "\"0s\"", "\"366d\"", "31536001", "\"soon\""] {
            let error = timeout(bad).unwrap_err().to_string();
            assert!(error.contains("line 2") && error.contains("command_timeout_secs") && error.contains("at most 31536000 (a year)"), "{bad}: {error}");
        }
        let error = parse("[profiles.a.connect]\ncommand = \"C\"\nsecrets.T = { command = [\"az\"], timeout_secs = \"never\" }\n").unwrap_err().to_string();
        assert!(error.contains("line 3") && error.contains("\"never\" is not a duration"), "{error}");
    }

    #[test]
    fn every_field_is_checked_when_the_file_is_read() {
        let cases = [
            ("[profiles.a]\nexecution_policy = \"RemoteSinged\"\n", "line 2", "is not an execution policy"),
            ("[profiles.a]\nworkers = 1\nconnect_attempts = 0\n", "line 3", "connect_attempts must be at least 1"),
            ("[profiles.a]\nworkers = 1\nrunspaces_per_worker = 0\n", "line 3", "runspaces_per_worker must be at least 1"),
            ("[profiles.a.retry]\nmax_attempts = 0\n", "line 2", "retry.max_attempts must be at least 1"),
            ("[profiles.a]\nenv = { \"A=B\" = \"x\" }\n", "line 1", "cannot be set"),
            ("[profiles.a.connect]\ncommand = \"\"\n", "line 2", "the command name is empty"),
            ("[profiles.a.connect]\ncommand = \"C\"\nparameters = { \"Bad-Name\" = 1 }\n", "line 2", "\"Bad-Name\" is not valid"),
            ("[profiles.a.connect]\ncommand = \"C\"\nsecrets.T = { command = [] }\n", "line 3", "needs the program first"),
            ("[profiles.a.connect]\ncommand = \"C\"\nsecrets.T = { env = \"T\", json_field = \"x\" }\n", "line 3", "are for a command source"),
            ("[profiles.a.disconnect]\ncommand = \"C\"\nsecrets.T = { command = [\"az\"] }\n", "line 3", "the disconnect command is made once"),
            (
                "[profiles.a.connect]\ncommand = \"C\"\nsecrets.A = { env = \"A\", as = \"certificate\" }\nsecrets.B = { env = \"B\", as = \"certificate\" }\n",
                "line 4",
                "only one secret may be a certificate",
            ),
            ("[profiles.a.connect]\ncommand = \"C\"\nsecrets.AccessToken = { env = \"A\", as = \"certificate\" }\n", "line 3", "is not a certificate"),
            ("[profiles.a.connect]\ncommand = \"C\"\nsecrets.Pw = { env = \"A\" }\nsecrets.pw = { env = \"B\" }\n", "line 2", "given twice"),
            ("[profiles.a]\nworkers = 1\nallow = [\"Get-*\", \"Set-[Mailbox\"]\n", "line 3", "profiles.a.allow: \"Set-[Mailbox\" is not a glob"),
            ("[profiles.a]\nallow = [\"\"]\n", "line 2", "profiles.a.allow: a pattern is empty"),
            ("[profiles.a]\nworkers = 1\nserver_token = { env = \"T\", file = \"/t\" }\n", "line 3", "server_token: give exactly one source"),
        ];
        for (text, line, wanted) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(line) && error.contains(wanted), "{text}\n=> {error}");
        }
    }
}
