//! Turning a profile of the configuration file (or the built-in `simulated` one) into the library's
//! builders: the workers' runspace (its connect command read anew at each connect, see
//! [`ProfileConnector`]) and the pool, with the Exchange Online preset when the profile imports
//! ExchangeOnlineManagement.

use std::path::PathBuf;
use std::time::Duration;

use psbridge::{Command, PoolBuilder, RetryPolicy, Runspace, RunspaceBuilder, RunspacePool, exo};

use crate::config::{CommandSpec, Config, ProfileSpec, SIMULATED};
use crate::connector::{self, ProfileConnector};
use crate::secret::{SecretError, SecretReader};
use crate::simulated;

/// Workers of `psbridge batch` when neither the profile nor `--workers` says.
pub const DEFAULT_WORKERS: usize = 3;
/// How long before an access token expires its worker is replaced, when the profile does not say.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// How many times in a row a worker may fail to start or connect, when the profile does not say.
pub const DEFAULT_CONNECT_ATTEMPTS: u32 = 3;

/// A profile that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("no profile named `{name}` in {}; profiles: {known}", config.as_deref().map_or("the built-in set (no configuration file)".to_owned(), |p| p.display().to_string()))]
    Unknown { name: String, known: String, config: Option<PathBuf> },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("the simulated profile: {0:#}")]
    Simulated(anyhow::Error),
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

    /// Runspaces per worker process (`runspaces_per_worker`, default 1).
    pub fn runspaces_per_worker(&self) -> usize {
        self.spec.runspaces_per_worker.unwrap_or(1)
    }

    /// Whether the pool adapts its concurrency to throttling (`adaptive_concurrency`, default false).
    pub fn adaptive_concurrency(&self) -> bool {
        self.spec.adaptive_concurrency.unwrap_or(false)
    }

    /// Whether the profile imports ExchangeOnlineManagement, and so gets the Exchange Online preset.
    pub fn is_exchange(&self) -> bool {
        self.spec.modules.iter().any(|m| exo::is_module(m.name()))
    }

    /// The pool's retry policy: the profile's `retry` keys over the Exchange Online preset
    /// (`exo::retry_policy`) for ExchangeOnlineManagement, else over the library's default.
    pub fn retry(&self) -> RetryPolicy {
        let mut policy = if self.is_exchange() { exo::retry_policy() } else { RetryPolicy::default() };
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

    /// How long before an access token's `exp` its worker is replaced (`token_refresh_margin_secs`).
    pub fn refresh_margin(&self) -> Duration {
        self.spec.token_refresh_margin_secs.map_or(DEFAULT_REFRESH_MARGIN, |s| s.0)
    }

    /// How many times in a row a worker may fail to start or connect (`connect_attempts`).
    pub fn connect_attempts(&self) -> u32 {
        self.spec.connect_attempts.unwrap_or(DEFAULT_CONNECT_ATTEMPTS)
    }

    /// A builder for this profile's workers. Every secret is checked now (so that a missing variable or
    /// an unreadable file stops psbridge before anything starts, and standard input is read before
    /// anything else uses it), and read again at each connect.
    pub fn builder(&self, secrets: &mut SecretReader) -> Result<RunspaceBuilder, ProfileError> {
        let mut builder = self.base_builder();
        if let Some(connect) = &self.spec.connect {
            builder = builder.connect_with(ProfileConnector::new(connect, secrets, self.refresh_margin())?);
        }
        if let Some(disconnect) = &self.spec.disconnect {
            builder = builder.disconnect(command(disconnect, secrets)?);
        }
        Ok(builder)
    }

    /// A pool of `workers` (from [`builder`](Self::builder)) as the profile says: its retry policy,
    /// `connect_attempts` and `token_refresh_margin_secs`, and for ExchangeOnlineManagement the
    /// Exchange Online classifier and health check. The caller adds the pool's size and grace.
    pub fn pool_builder(&self, workers: RunspaceBuilder) -> PoolBuilder {
        let pool = RunspacePool::builder(workers)
            .retry(self.retry())
            .connect_attempts(self.connect_attempts())
            .refresh_margin(self.refresh_margin())
            .runspaces_per_worker(self.runspaces_per_worker())
            .adaptive_concurrency(self.adaptive_concurrency());
        if self.is_exchange() { pool.classifier(exo::ExchangeOnline).health_check(exo::health_check()) } else { pool }
    }

    /// A builder with the profile's pwsh, module path, environment and timeouts, but no modules and no
    /// connect: what `doctor` uses to look at the machine before it tries the real thing.
    pub fn bare_builder(&self) -> RunspaceBuilder {
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
        // starts inherits the variable (the connector reads it from psbridge's own environment).
        for variable in self.secret_variables() {
            builder = builder.env_remove(variable);
        }
        if let Some(timeout) = self.spec.start_timeout_secs {
            builder = builder.start_timeout(timeout.0);
        }
        builder
    }

    fn base_builder(&self) -> RunspaceBuilder {
        let mut builder = self.bare_builder();
        for module in &self.spec.modules {
            builder = match module.minimum_version() {
                Some(version) => builder.module_with_version(module.name(), version),
                None => builder.module(module.name()),
            };
        }
        if let Some(policy) = &self.spec.execution_policy {
            builder = builder.execution_policy(policy.as_str());
        }
        if let Some(timeout) = self.spec.connect_timeout_secs {
            builder = builder.connect_timeout(timeout.0);
        }
        if let Some(timeout) = self.command_timeout() {
            builder = builder.command_timeout(timeout);
        }
        if let Some(depth) = self.spec.depth {
            builder = builder.depth(depth);
        }
        builder
    }

    /// The environment variables the profile's secrets are read from.
    fn secret_variables(&self) -> impl Iterator<Item = &str> {
        [&self.spec.connect, &self.spec.disconnect, &self.spec.check]
            .into_iter()
            .flatten()
            .flat_map(|spec| spec.secrets.values())
            .filter_map(|secret| secret.get_ref().env.as_deref())
    }

    /// The profile's per-command timeout: `command_timeout_secs`, else for ExchangeOnlineManagement
    /// `exo::COMMAND_TIMEOUT` (room for the module's own retries), else none.
    pub fn command_timeout(&self) -> Option<Duration> {
        match self.spec.command_timeout_secs {
            Some(timeout) => Some(timeout.0),
            None => self.is_exchange().then_some(exo::COMMAND_TIMEOUT),
        }
    }

    /// The cheap command `doctor` runs once connected: the profile's `check` (its secrets read from any
    /// source, a program run), else for ExchangeOnlineManagement `Get-EXOMailbox -ResultSize 1`, else
    /// none.
    pub async fn check_command(&self, secrets: &mut SecretReader) -> Result<Option<Command>, ProfileError> {
        if let Some(check) = &self.spec.check {
            let mut values = Vec::with_capacity(check.secrets.len());
            for (name, source) in &check.secrets {
                values.push((name.as_str(), source.get_ref().kind, secrets.read_any(name, source.get_ref()).await?));
            }
            return Ok(Some(connector::bind(check, values)));
        }
        Ok(self.is_exchange().then(|| Command::new("Get-EXOMailbox").param("ResultSize", 1)))
    }
}

/// A command made once (the disconnect command), with its secrets read now from an environment
/// variable, a file or standard input.
fn command(spec: &CommandSpec, secrets: &mut SecretReader) -> Result<Command, SecretError> {
    let mut values = Vec::with_capacity(spec.secrets.len());
    for (name, source) in &spec.secrets {
        values.push((name.as_str(), source.get_ref().kind, secrets.read(name, source.get_ref())?));
    }
    Ok(connector::bind(spec, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(text: &str) -> Profile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        Profile::find(&Config::load(Some(&path)).unwrap(), Some("p")).unwrap()
    }

    #[test]
    fn exchange_profiles_get_the_exchange_preset_unless_they_say_otherwise() {
        let exchange = profile("[profiles.p]\nmodules = [\"ExchangeOnlineManagement\"]\n");
        assert_eq!(exchange.command_timeout(), Some(exo::COMMAND_TIMEOUT));
        assert_eq!(exchange.retry().attempts(), exo::retry_policy().attempts());
        let pool = format!("{:?}", exchange.pool_builder(Runspace::builder()));
        assert!(pool.contains("ExchangeOnline") && pool.contains("Get-ConnectionInformation"), "{pool}");
        assert!(pool.contains("connect_attempts: 3") && pool.contains("refresh_margin: 300s"), "{pool}");

        let tuned = profile(
            "[profiles.p]\nmodules = [\"ExchangeOnlineManagement\"]\ncommand_timeout_secs = \"10m\"\nconnect_attempts = 5\n\
             token_refresh_margin_secs = \"1m\"\n[profiles.p.retry]\nmax_attempts = 7\n",
        );
        assert_eq!(tuned.command_timeout(), Some(Duration::from_secs(600)));
        assert_eq!(tuned.retry().attempts(), 7);
        let pool = format!("{:?}", tuned.pool_builder(Runspace::builder()));
        assert!(pool.contains("connect_attempts: 5") && pool.contains("refresh_margin: 60s"), "{pool}");

        let plain = profile("[profiles.p]\nmodules = [\"Microsoft.PowerShell.Archive\"]\n");
        assert_eq!(plain.command_timeout(), None);
        assert_eq!(plain.retry().attempts(), RetryPolicy::default().attempts());
        assert!(!format!("{:?}", plain.pool_builder(Runspace::builder())).contains("ExchangeOnline"));
    }
}
