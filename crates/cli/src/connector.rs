//! A profile's connect command, made anew for every worker the library starts (the first ones, and
//! those that replace a worker whose token is about to expire, that crashed or was recycled).
//!
//! Each connect reads the secrets again: an environment variable, a file (a rotated file is picked up)
//! and a program (`az account get-access-token ...`, run each time); a secret from standard input was
//! read once at start-up and is kept in memory. An access token is read as a JWT: its `exp` tells the
//! pool when to replace the worker, and a token already expired, or too close to its end, is refused
//! before the connect is even tried.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use psbridge::exo::{TokenClaims, TokenError};
use psbridge::{Command, Connection, Connector, ConnectorError, SecretString};
use secrecy::ExposeSecret;

use crate::config::{CERTIFICATE_PASSWORD, CommandSpec, SecretKind};
use crate::secret::{self, SecretError, SecretReader};

/// The parameter whose secret is an access token, read as a JWT.
pub const ACCESS_TOKEN: &str = "AccessToken";

/// Why a worker could not get its connect command. No message holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("{}", expired(from, *at, *now))]
    Expired { from: String, at: SystemTime, now: SystemTime },
    #[error(
        "access token from {from} expires at {}, within token_refresh_margin_secs ({} s); get a fresh one",
        rfc3339(*at),
        seconds(*margin)
    )]
    WithinMargin { from: String, at: SystemTime, margin: Duration },
    #[error("access token from {from}: {source}")]
    NotJwt {
        from: String,
        #[source]
        source: TokenError,
    },
}

/// `access token from <source> expired at <time> (<N> min ago)`.
fn expired(from: &str, at: SystemTime, now: SystemTime) -> String {
    let ago = now.duration_since(at).unwrap_or_default().as_secs() / 60;
    format!("access token from {from} expired at {} ({ago} min ago)", rfc3339(at))
}

/// A time as RFC 3339 in UTC, to the second.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// `300`, `1.5`: a duration in seconds as the configuration writes it.
fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 { duration.as_secs().to_string() } else { duration.as_secs_f64().to_string() }
}

/// Whether parameter `name` takes an access token.
pub fn is_access_token(name: &str) -> bool {
    name.eq_ignore_ascii_case(ACCESS_TOKEN)
}

/// Reads an access token's claims and refuses it when it expired, or expires within `margin` of `now`.
/// `from` says where it came from ([`secret::describe`]).
pub fn check_token(from: &str, token: &SecretString, margin: Duration, now: SystemTime) -> Result<TokenClaims, ConnectError> {
    let claims = TokenClaims::from_jwt(token.expose_secret()).map_err(|source| ConnectError::NotJwt { from: from.to_owned(), source })?;
    if let Some(at) = claims.expires_at {
        if at <= now {
            return Err(ConnectError::Expired { from: from.to_owned(), at, now });
        }
        if at <= now + margin {
            return Err(ConnectError::WithinMargin { from: from.to_owned(), at, margin });
        }
    }
    Ok(claims)
}

/// The connect command of a profile, with its secrets read at every connect.
#[derive(Debug)]
pub struct ProfileConnector {
    spec: CommandSpec,
    /// Secrets read from standard input at start-up, by parameter.
    stdin: BTreeMap<String, SecretString>,
    /// How long before its token expires a worker is replaced (and how much life a token must have).
    margin: Duration,
}

impl ProfileConnector {
    /// A connector for `spec`. Every secret is checked now (an environment variable or a file read once,
    /// a program looked for), so that a missing one stops psbridge at start-up; a secret from standard
    /// input is read now and kept.
    pub fn new(spec: &CommandSpec, secrets: &mut SecretReader, margin: Duration) -> Result<ProfileConnector, SecretError> {
        let mut stdin = BTreeMap::new();
        for (name, source) in &spec.secrets {
            secrets.check(name, source.get_ref())?;
            if let Some(value) = secrets.stdin_value(name) {
                stdin.insert(name.clone(), value.clone());
            }
        }
        Ok(ProfileConnector { spec: spec.clone(), stdin, margin })
    }

    /// Reads every secret anew and makes the connect command; an access token's `exp` becomes the
    /// connection's `expires_at`.
    pub async fn connection_now(&self) -> Result<Connection, ConnectError> {
        let mut values = Vec::with_capacity(self.spec.secrets.len());
        let mut expires_at: Option<SystemTime> = None;
        for (name, source) in &self.spec.secrets {
            let source = source.get_ref();
            let value = secret::read_fresh(name, source, self.stdin.get(name)).await?;
            tracing::debug!(secret = %name, from = %secret::describe(source), "read a secret for a connect");
            if is_access_token(name) {
                let claims = check_token(&secret::describe(source), &value, self.margin, SystemTime::now())?;
                expires_at = [expires_at, claims.expires_at].into_iter().flatten().min();
            }
            values.push((name.as_str(), source.kind, value));
        }
        Ok(Connection { command: bind(&self.spec, values), expires_at })
    }
}

impl Connector for ProfileConnector {
    fn connection(&self) -> BoxFuture<'_, Result<Connection, ConnectorError>> {
        Box::pin(async move { self.connection_now().await.map_err(|error| Box::new(error) as ConnectorError) })
    }
}

/// The command of `spec` with its secrets' values bound by kind: a SecureString, a plain string, or a
/// certificate, which takes the `CertificatePassword` secret as its password (that one is then not
/// passed on its own).
pub fn bind(spec: &CommandSpec, values: Vec<(&str, SecretKind, SecretString)>) -> Command {
    let has_certificate = values.iter().any(|(_, kind, _)| *kind == SecretKind::Certificate);
    let (mut password, values): (Vec<_>, Vec<_>) =
        values.into_iter().partition(|(name, _, _)| has_certificate && name.eq_ignore_ascii_case(CERTIFICATE_PASSWORD));
    let mut password = password.pop().map(|(_, _, value)| value);
    let mut command = Command::new(spec.command.as_str()).params(spec.parameters.clone());
    for (name, kind, value) in values {
        command = match kind {
            SecretKind::SecureString => command.secure_param(name, value),
            SecretKind::String => command.secret_param(name, value),
            SecretKind::Certificate => command.certificate_param(name, value, password.take()),
        };
    }
    command
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::UNIX_EPOCH;

    use base64::Engine as _;

    use super::*;
    use crate::config::SecretSpec;

    /// An unsigned JWT expiring at `exp` (seconds since 1970).
    fn jwt(exp: u64, tenant: &str) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = serde_json::json!({ "exp": exp, "tid": tenant, "aud": "https://outlook.office365.com" });
        format!("{}.{}.", engine.encode(br#"{"alg":"none"}"#), engine.encode(payload.to_string()))
    }

    fn in_an_hour() -> u64 {
        (SystemTime::now() + Duration::from_secs(3600)).duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    fn spec(secrets: &[(&str, SecretSpec)]) -> CommandSpec {
        let text = r#"command = "Connect-ExchangeOnline"
parameters = { Organization = "contoso.onmicrosoft.com" }"#;
        let mut spec: CommandSpec = toml::from_str(text).unwrap();
        for (name, source) in secrets {
            spec.secrets.insert((*name).to_owned(), toml::Spanned::new(0..0, source.clone()));
        }
        spec
    }

    #[tokio::test]
    async fn a_token_file_rotated_between_two_connects_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let write = |token: &str| {
            std::fs::write(&path, token).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        let (first, second) = (in_an_hour(), in_an_hour() + 1800);
        write(&jwt(first, "tenant-1"));
        let source = SecretSpec { file: Some(path.clone()), kind: SecretKind::String, ..SecretSpec::default() };
        let connector = ProfileConnector::new(&spec(&[("AccessToken", source)]), &mut SecretReader::default(), Duration::from_secs(300)).unwrap();
        let one = connector.connection_now().await.unwrap();
        write(&jwt(second, "tenant-2"));
        let two = connector.connection_now().await.unwrap();
        assert_eq!(one.expires_at, Some(UNIX_EPOCH + Duration::from_secs(first)));
        assert_eq!(two.expires_at, Some(UNIX_EPOCH + Duration::from_secs(second)), "the second connect read the rotated file");
        // Each connect makes its own command; the token's `exp` tells them apart (the value is masked).
        assert!(!format!("{:?}", two.command).contains(&jwt(second, "tenant-2")), "Debug masks the token");
    }

    #[test]
    fn tokens_too_close_to_their_end_are_refused_with_where_they_came_from() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let margin = Duration::from_secs(300);
        let token = |offset: i64| SecretString::from(jwt((2_000_000_000 + offset) as u64, "t"));
        let from = "environment variable EXO_TOKEN";
        let error = check_token(from, &token(-3600), margin, now).unwrap_err().to_string();
        assert_eq!(error, "access token from environment variable EXO_TOKEN expired at 2033-05-18T02:33:20Z (60 min ago)");
        let error = check_token(from, &token(120), margin, now).unwrap_err().to_string();
        assert_eq!(
            error,
            "access token from environment variable EXO_TOKEN expires at 2033-05-18T03:35:20Z, within token_refresh_margin_secs (300 s); get a fresh one"
        );
        let claims = check_token(from, &token(301), margin, now).unwrap();
        assert_eq!(claims.tenant_id.as_deref(), Some("t"));
        let opaque = SecretString::from("opaque-Secret-9f".to_owned());
        let error = check_token("command az", &opaque, margin, now).unwrap_err().to_string();
        assert!(error.starts_with("access token from command az: the access token is not a well-formed JWT"), "{error}");
        assert!(!error.contains("opaque-Secret-9f"), "{error}");
    }

    #[tokio::test]
    async fn standard_input_is_read_once_and_kept() {
        let source = SecretSpec { stdin: Some(true), kind: SecretKind::String, ..SecretSpec::default() };
        let mut reader = SecretReader::with_stdin_taken(Some("--params -".to_owned()));
        let error = ProfileConnector::new(&spec(&[("Password", source)]), &mut reader, Duration::ZERO).unwrap_err().to_string();
        assert!(error.contains("standard input is already used (--params -)"), "{error}");
    }

    #[test]
    fn a_certificate_takes_the_certificate_password_and_it_is_not_passed_alone() {
        let values = vec![
            ("Certificate", SecretKind::Certificate, SecretString::from("UEZY".to_owned())),
            ("CertificatePassword", SecretKind::SecureString, SecretString::from("pw".to_owned())),
        ];
        let command = bind(&spec(&[]), values);
        let debug = format!("{command:?}");
        assert!(debug.contains("Certificate") && !debug.contains("CertificatePassword"), "{debug}");
        // Without a certificate the password is an ordinary SecureString parameter.
        let command = bind(&spec(&[]), vec![("CertificatePassword", SecretKind::SecureString, SecretString::from("pw".to_owned()))]);
        assert!(format!("{command:?}").contains("CertificatePassword"));
    }
}
