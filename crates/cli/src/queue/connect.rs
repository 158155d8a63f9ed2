//! The connection to NATS: the `--queue` URL (`nats://HOST:PORT`, `tls://HOST:PORT` for TLS, several
//! comma-separated for a cluster), the `[queue]` section's credentials and CA file.

use std::time::Duration;

use async_nats::{ConnectOptions, ServerAddr};
use secrecy::ExposeSecret;

use super::QueueError;
use crate::config::Config;
use crate::secret::SecretReader;

/// How often the connection is checked when it is idle: a server that went away is noticed within this.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a [`Patience::FailFast`] connection tries a server that refuses it (one just starting).
const FAIL_FAST_WITHIN: Duration = Duration::from_secs(5);

/// Whether a connection waits for a server that is not there yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// Fail when no server answers within [`FAIL_FAST_WITHIN`] (a submitter, `psbridge queue`).
    FailFast,
    /// Keep trying until one does (a host may start before its server).
    Wait,
}

/// The servers a `--queue` URL names.
pub fn servers(url: &str) -> Result<Vec<ServerAddr>, QueueError> {
    let bad = |reason: String| QueueError::Url { url: url.to_owned(), reason };
    let mut servers = Vec::new();
    for part in url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let scheme = part.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("nats" | "tls")) {
            return Err(bad(format!("{part} is not a NATS address; write nats://HOST:PORT, or tls://HOST:PORT for TLS")));
        }
        servers.push(part.parse::<ServerAddr>().map_err(|e| bad(e.to_string()))?);
    }
    if servers.is_empty() {
        return Err(bad("names no server; write nats://HOST:PORT".to_owned()));
    }
    Ok(servers)
}

/// Connects to the NATS server(s) of `url` as `name` (shown in the server's connection list), with the
/// credentials and CA file of the configuration's `[queue]` section (secrets read now, once).
pub async fn connect(url: &str, config: &Config, secrets: &mut SecretReader, name: &str, patience: Patience) -> Result<async_nats::Client, QueueError> {
    let servers = servers(url)?;
    let mut options = ConnectOptions::new().name(name).ping_interval(PING_INTERVAL).event_callback(|event| async move {
        match event {
            async_nats::Event::Disconnected => tracing::warn!("disconnected from the queue; reconnecting"),
            async_nats::Event::Connected => tracing::info!("connected to the queue"),
            other => tracing::debug!(%other, "queue connection"),
        }
    });
    if let Some(spec) = config.file.queue.as_ref().map(|q| q.get_ref()) {
        let mut read = async |key: &str, source: &crate::config::SecretSpec| -> Result<String, QueueError> {
            let secret = secrets.read_any(&format!("queue.{key}"), source).await?;
            Ok(secret.expose_secret().to_owned())
        };
        if let (Some(user), Some(password)) = (&spec.user, &spec.password) {
            options = options.user_and_password(user.clone(), read("password", password.get_ref()).await?);
        }
        if let Some(token) = &spec.token {
            options = options.token(read("token", token.get_ref()).await?);
        }
        if let Some(seed) = &spec.nkey_seed {
            options = options.nkey(read("nkey_seed", seed.get_ref()).await?);
        }
        if let Some(ca) = &spec.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
    }
    if servers.iter().any(ServerAddr::tls_required) {
        options = options.require_tls(true);
    }
    if patience == Patience::Wait {
        options = options.retry_on_initial_connect();
        return options.connect(servers).await.map_err(|source| QueueError::Connect { url: url.to_owned(), source });
    }
    // A server refusing connections may be starting: it gets a few seconds; bad credentials, TLS and
    // addresses fail at once.
    let until = std::time::Instant::now() + FAIL_FAST_WITHIN;
    loop {
        match options.clone().connect(servers.clone()).await {
            Ok(client) => return Ok(client),
            Err(source) if source.kind() == async_nats::ConnectErrorKind::Io && std::time::Instant::now() < until => {
                tracing::debug!(%source, "the queue refuses connections; trying again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(source) => return Err(QueueError::Connect { url: url.to_owned(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nats_and_tls_addresses_are_taken() {
        assert_eq!(servers("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert!(servers("tls://nats.example.com:4222").unwrap()[0].tls_required());
        assert_eq!(servers("nats://a:4222, nats://b:4222").unwrap().len(), 2);
        for bad in ["http://a:4222", "a:4222", "", " , "] {
            let error = servers(bad).unwrap_err().to_string();
            assert!(error.contains("nats://HOST:PORT"), "{bad}: {error}");
        }
    }
}
