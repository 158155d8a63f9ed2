//! Turning a profile of the configuration file (or the built-in `simulated` one) into the library's
//! builders, with its secrets read from their sources.

use std::path::PathBuf;
use std::time::Duration;

use psbridge::{Command, RetryPolicy, Runspace, RunspaceBuilder, SecretString};

use crate::config::{CommandSpec, Config, ProfileSpec, SIMULATED, SecretKind};
use crate::secret::{SecretError, SecretReader};
use crate::simulated;

/// Workers of `psbridge batch` when neither the profile nor `--workers` says.
pub const DEFAULT_WORKERS: usize = 3;

/// A profile that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("no profile named `{name}` in {}; profiles: {known}", config.as_deref().map_or("the built-in set (no configuration file)".to_owned(), |p| p.display().to_string()))]
    Unknown { name: String, known: String, config: Option<PathBuf> },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("the simulated profile: {0:#}")]
    Simulated(anyhow::Error),
    #[error("profile {profile}: {key} must be {}, not {value}", crate::SECONDS_RANGE)]
    BadSeconds { profile: String, key: &'static str, value: f64 },
}

/// A profile, found and checked, secrets not read yet.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Its name; `None` for a bare pwsh with no modules and no connect.
    pub name: Option<String>,
    pub spec: ProfileSpec,
}

impl Profile {
    /// The profile named `asked` (or the file's default); a bare pwsh when neither names one.
    pub fn find(config: &Config, asked: Option<&str>) -> Result<Profile, ProfileError> {
        let Some(name) = config.chosen(asked) else {
            return Ok(Profile { name: None, spec: ProfileSpec::default() });
        };
        let spec = if name == SIMULATED {
            simulated::profile().map_err(ProfileError::Simulated)?
        } else {
            match config.file.profiles.get(name) {
                Some(spec) => spec.get_ref().clone(),
                None => {
                    return Err(ProfileError::Unknown { name: name.to_owned(), known: config.profile_names(), config: config.path.clone() });
                }
            }
        };
        Ok(Profile { name: Some(name.to_owned()), spec })
    }

    /// For messages: `profile contoso` or `no profile`.
    pub fn label(&self) -> String {
        self.name.as_deref().map_or("no profile (plain pwsh)".to_owned(), |n| format!("profile {n}"))
    }

    /// Workers for a batch.
    pub fn workers(&self) -> usize {
        self.spec.workers.unwrap_or(DEFAULT_WORKERS)
    }

    /// The pool's retry policy.
    pub fn retry(&self) -> RetryPolicy {
        let mut policy = RetryPolicy::default();
        if let Some(retry) = &self.spec.retry {
            if let Some(n) = retry.max_attempts {
                policy = policy.max_attempts(n);
            }
            if let Some(ms) = retry.base_delay_ms {
                policy = policy.base_delay(Duration::from_millis(ms));
            }
            if let Some(ms) = retry.max_delay_ms {
                policy = policy.max_delay(Duration::from_millis(ms));
            }
            if let Some(on) = retry.retry_transient {
                policy = policy.retry_transient(on);
            }
        }
        policy
    }

    /// A builder for this profile's workers, reading every secret of its connect and disconnect
    /// commands.
    pub fn builder(&self, secrets: &mut SecretReader) -> Result<RunspaceBuilder, ProfileError> {
        let mut builder = self.base_builder()?;
        if let Some(connect) = &self.spec.connect {
            builder = builder.connect(command(connect, secrets)?);
        }
        if let Some(disconnect) = &self.spec.disconnect {
            builder = builder.disconnect(command(disconnect, secrets)?);
        }
        Ok(builder)
    }

    /// A builder with the profile's pwsh, module path, environment and timeouts, but no modules and no
    /// connect: what `doctor` uses to look at the machine before it tries the real thing.
    pub fn bare_builder(&self) -> Result<RunspaceBuilder, ProfileError> {
        let mut builder = Runspace::builder();
        if let Some(pwsh) = &self.spec.pwsh {
            builder = builder.pwsh(pwsh);
        }
        for folder in &self.spec.module_path {
            builder = builder.module_path(folder);
        }
        for (name, value) in &self.spec.env {
            builder = builder.env(name, value);
        }
        // A secret read from the environment stays with psbridge: neither the worker nor anything it
        // starts inherits the variable.
        for variable in self.secret_variables() {
            builder = builder.env_remove(variable);
        }
        if let Some(seconds) = self.seconds("start_timeout_secs", self.spec.start_timeout_secs)? {
            builder = builder.start_timeout(seconds);
        }
        Ok(builder)
    }

    fn base_builder(&self) -> Result<RunspaceBuilder, ProfileError> {
        let mut builder = self.bare_builder()?;
        for module in &self.spec.modules {
            builder = match module.minimum_version() {
                Some(version) => builder.module_with_version(module.name(), version),
                None => builder.module(module.name()),
            };
        }
        if let Some(policy) = &self.spec.execution_policy {
            builder = builder.execution_policy(policy.as_str());
        }
        if let Some(timeout) = self.seconds("connect_timeout_secs", self.spec.connect_timeout_secs)? {
            builder = builder.connect_timeout(timeout);
        }
        if let Some(timeout) = self.command_timeout()? {
            builder = builder.command_timeout(timeout);
        }
        if let Some(depth) = self.spec.depth {
            builder = builder.depth(depth);
        }
        Ok(builder)
    }

    /// The environment variables the profile's secrets are read from.
    fn secret_variables(&self) -> impl Iterator<Item = &str> {
        [&self.spec.connect, &self.spec.disconnect, &self.spec.check]
            .into_iter()
            .flatten()
            .flat_map(|spec| spec.secrets.values())
            .filter_map(|secret| secret.get_ref().env.as_deref())
    }

    /// The profile's per-command timeout.
    pub fn command_timeout(&self) -> Result<Option<Duration>, ProfileError> {
        self.seconds("command_timeout_secs", self.spec.command_timeout_secs)
    }

    fn seconds(&self, key: &'static str, value: Option<f64>) -> Result<Option<Duration>, ProfileError> {
        match value {
            None => Ok(None),
            Some(value) => crate::positive_duration(value)
                .map(Some)
                .ok_or_else(|| ProfileError::BadSeconds { profile: self.name.clone().unwrap_or_default(), key, value }),
        }
    }

    /// The cheap command `doctor` runs once connected: the profile's `check`, else for
    /// ExchangeOnlineManagement `Get-EXOMailbox -ResultSize 1`, else none.
    pub fn check_command(&self, secrets: &mut SecretReader) -> Result<Option<Command>, ProfileError> {
        if let Some(check) = &self.spec.check {
            return Ok(Some(command(check, secrets)?));
        }
        let exchange = self.spec.modules.iter().any(|m| {
            let name = m.name().rsplit(['/', '\\']).next().unwrap_or_default();
            name.split('.').next().is_some_and(|stem| stem.eq_ignore_ascii_case("ExchangeOnlineManagement"))
        });
        Ok(exchange.then(|| Command::new("Get-EXOMailbox").param("ResultSize", 1)))
    }
}

/// A command from its spec, with its secrets read and bound as SecureString or plain string.
pub fn command(spec: &CommandSpec, secrets: &mut SecretReader) -> Result<Command, SecretError> {
    let mut command = Command::new(spec.command.as_str()).params(spec.parameters.clone());
    for (name, source) in &spec.secrets {
        let value: SecretString = secrets.read(name, source.get_ref())?;
        command = match source.get_ref().kind {
            SecretKind::SecureString => command.secure_param(name.as_str(), value),
            SecretKind::String => command.secret_param(name.as_str(), value),
        };
    }
    Ok(command)
}
