//! What psbridge knows about Microsoft's ExchangeOnlineManagement module (EXO V3, REST), in one place.
//!
//! The pool and the runspace know no module; this preset tells them how Exchange Online fails, how a
//! healthy connection looks and how long its access tokens live. Everything here was observed on the
//! real module 3.9.0 (see `docs/exo-module-behaviour.md` in the shared notes):
//!
//! - The REST cmdlets retry by themselves, up to 5 times on HTTP 401, 429, 500 and 503 (429 after the
//!   server's Retry-After, the others after 2, 4, 8, 16 and 32 s: about 62 s in all), then write a
//!   *non-terminating* error `Error while querying REST service. HttpStatusCode=<n> ErrorMessage=...`.
//!   So a 429 or 5xx that reaches psbridge has already been retried: [`retry_policy`] adds few, spaced
//!   attempts on top. Worst case for one command with that policy: 3 attempts x (62 s of the module's
//!   own waits + the calls) + 15 s + 30 s of psbridge's waits, about 4 minutes; [`COMMAND_TIMEOUT`]
//!   bounds each attempt and leaves room for the module's schedule.
//! - An access token is only parsed by the module, never checked: an expired one shows as HTTP 401 after
//!   those 62 s, and Get-ConnectionInformation keeps saying `TokenStatus` Active with a
//!   `TokenExpiryTimeUTC` of 9999-12-31. Its lifetime is known only from its own `exp` claim
//!   ([`TokenClaims`]).
//! - Connecting again in the same process adds a second connection instead of replacing the first, so a
//!   worker whose token expired is replaced by a fresh process ([`Failure::ExpiredToken`]).
//!
//! ```
//! use psbridge::{RunspacePool, exo};
//! # async fn demo(workers: psbridge::RunspaceBuilder) -> psbridge::Result<()> {
//! let pool = RunspacePool::builder(workers)
//!     .classifier(exo::ExchangeOnline)
//!     .health_check(exo::health_check())
//!     .retry(exo::retry_policy())
//!     .build()
//!     .await?;
//! # Ok(()) }
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::command::Command;
use crate::records::{ErrorRecord, InvocationResult};
use crate::retry::{Classifier, Failure, RetryPolicy};

/// The module's name, as `Import-Module` takes it.
pub const MODULE: &str = "ExchangeOnlineManagement";

/// A command timeout that leaves room for the module's own retry schedule (about 62 s before an error
/// reaches psbridge), for slow cmdlets and for large result sets: 5 minutes.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Texts that say the token expired or was refused (HTTP 401).
const EXPIRED_MARKERS: &[&str] = &["httpstatuscode=401", "invalidauthenticationtoken", "token has expired"];

/// Texts that say the service throttled the caller.
const THROTTLED_MARKERS: &[&str] = &[
    "httpstatuscode=429",
    "\"code\":\"toomanyrequests\"",
    "rate limit exceeded",
    "the current request is throttled",
    "micro delay",
    "microdelay",
];

/// Texts of transient server failures.
const TRANSIENT_MARKERS: &[&str] = &[
    "httpstatuscode=500",
    "httpstatuscode=502",
    "httpstatuscode=503",
    "httpstatuscode=504",
    "dcoverloaded",
    "serverinmm",
    "storagetransient",
    "a server side error has occurred because of which the operation could not be completed",
];

/// The Exchange Online classifier and health rule.
///
/// ```
/// use psbridge::{InvocationResult, PipelineState, StreamItem, exo::ExchangeOnline, retry::{Classifier, Failure}};
/// let mut r = InvocationResult::default();
/// let record = serde_json::json!({
///     "message": "Error while querying REST service. HttpStatusCode=429 ErrorMessage={\"error\":{\"code\":\"TooManyRequests\",\"message\":\"Rate limit exceeded. Retry after 2 seconds.\"}}",
///     "category": "ProtocolError", "terminating": false,
///     "exception_message": null, "exception_type": null, "fully_qualified_error_id": null, "activity": null,
///     "reason": "RestClientException", "target_name": null, "target_type": null, "category_info": null,
///     "target_object": null, "script_stack_trace": null, "position_message": null, "command": null
/// });
/// r.push(StreamItem::Error(Box::new(serde_json::from_value(record).unwrap())));
/// assert_eq!(ExchangeOnline.classify(&r), Some(Failure::Throttled { retry_after: Some(std::time::Duration::from_secs(2)) }));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ExchangeOnline;

impl Classifier for ExchangeOnline {
    fn classify(&self, result: &InvocationResult) -> Option<Failure> {
        if result.succeeded() {
            return None;
        }
        // The most actionable kind wins: one expired token means every record after it is noise.
        let kinds = result.errors.iter().map(classify_record);
        Some(kinds.fold(Failure::Permanent, |worst, kind| match (worst, kind) {
            (Failure::ExpiredToken, _) | (_, Failure::ExpiredToken) => Failure::ExpiredToken,
            (Failure::Throttled { retry_after: a }, Failure::Throttled { retry_after: b }) => Failure::Throttled { retry_after: a.max(b) },
            (throttled @ Failure::Throttled { .. }, _) | (_, throttled @ Failure::Throttled { .. }) => throttled,
            (Failure::Transient, _) | (_, Failure::Transient) => Failure::Transient,
            (Failure::Permanent, Failure::Permanent) => Failure::Permanent,
        }))
    }

    /// The check succeeded and no connection reports `State` Broken or `TokenStatus` Expired (as
    /// Get-ConnectionInformation does; it asks the service on every call).
    fn healthy(&self, result: &InvocationResult) -> bool {
        result.succeeded()
            && result.output.iter().all(|o| {
                o.value != serde_json::Value::Bool(false) && o.value["State"] != "Broken" && o.value["TokenStatus"] != "Expired"
            })
    }
}

/// Classifies one error record by its message.
pub fn classify_record(record: &ErrorRecord) -> Failure {
    let text = record.message.to_lowercase();
    if EXPIRED_MARKERS.iter().any(|m| text.contains(m)) {
        Failure::ExpiredToken
    } else if THROTTLED_MARKERS.iter().any(|m| text.contains(m)) {
        Failure::Throttled { retry_after: retry_after(&text) }
    } else if TRANSIENT_MARKERS.iter().any(|m| text.contains(m)) {
        Failure::Transient
    } else {
        Failure::Permanent
    }
}

/// Reads "retry after N seconds" or "retry-after: N" from a lower-cased message.
fn retry_after(text: &str) -> Option<Duration> {
    ["retry after ", "retry-after: ", "retry-after:", "retryafter="].iter().find_map(|marker| {
        let start = text.find(marker)? + marker.len();
        let digits: String = text[start..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok().map(Duration::from_secs)
    })
}

/// The health check for Exchange Online workers: `Get-ConnectionInformation`, which asks the service
/// and shows `State` Broken when the connection no longer works.
pub fn health_check() -> Command {
    Command::new("Get-ConnectionInformation")
}

/// psbridge's own retries on top of the module's: 3 attempts in all, 15 s then 30 s apart (60 s at
/// most, or the server's Retry-After), because every 429 or 5xx that reaches psbridge was already
/// retried for about a minute by the module itself.
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy::default().max_attempts(3).base_delay(Duration::from_secs(15)).max_delay(Duration::from_secs(60))
}

/// Whether a module name or path names ExchangeOnlineManagement.
///
/// ```
/// assert!(psbridge::exo::is_module("ExchangeOnlineManagement"));
/// assert!(psbridge::exo::is_module("/opt/m/ExchangeOnlineManagement/3.9.0/ExchangeOnlineManagement.psd1"));
/// assert!(!psbridge::exo::is_module("Microsoft.Graph"));
/// ```
pub fn is_module(name: &str) -> bool {
    let file = name.rsplit(['/', '\\']).next().unwrap_or_default();
    file.split('.').next().is_some_and(|stem| stem.eq_ignore_ascii_case(MODULE))
}

/// What an access token (a JWT) says about itself. psbridge reads it to know when the token expires:
/// the module cannot tell (see the module notes above). The signature is not checked; nothing here
/// ever prints or logs the token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenClaims {
    /// `exp`: when the token expires.
    pub expires_at: Option<SystemTime>,
    /// `tid`: the tenant.
    pub tenant_id: Option<String>,
    /// `aud`: who the token is for (Exchange Online: `https://outlook.office365.com`).
    pub audience: Option<String>,
}

/// An access token that is not a readable JWT. The message never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the access token is not a well-formed JWT: {0}")]
pub struct TokenError(String);

impl TokenClaims {
    /// Reads the claims of a JWT (`header.payload.signature`, base64url).
    ///
    /// # Errors
    /// [`TokenError`] when the token does not have three parts or its payload is not a JSON object.
    ///
    /// ```
    /// use base64::Engine as _;
    /// let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp": 2000000000, "tid": "t1", "aud": "https://outlook.office365.com"}"#);
    /// let claims = psbridge::exo::TokenClaims::from_jwt(&format!("eyJhbGciOiJub25lIn0.{payload}.")).unwrap();
    /// assert_eq!(claims.tenant_id.as_deref(), Some("t1"));
    /// assert_eq!(claims.expires_at, Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(2_000_000_000)));
    /// assert!(psbridge::exo::TokenClaims::from_jwt("not a token").is_err());
    /// ```
    pub fn from_jwt(token: &str) -> Result<TokenClaims, TokenError> {
        use base64::Engine as _;
        let parts: Vec<&str> = token.trim().split('.').collect();
        if parts.len() != 3 {
            return Err(TokenError(format!("it has {} dot-separated parts, not 3", parts.len())));
        }
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = engine
            .decode(parts[1].trim_end_matches('='))
            .map_err(|_| TokenError("its payload is not base64url".into()))?;
        let claims: serde_json::Value =
            serde_json::from_slice(&payload).map_err(|_| TokenError("its payload is not JSON".into()))?;
        let serde_json::Value::Object(claims) = claims else {
            return Err(TokenError("its payload is not a JSON object".into()));
        };
        let text = |name: &str| claims.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        let expires_at = claims.get("exp").and_then(serde_json::Value::as_f64).filter(|exp| exp.is_finite() && *exp >= 0.0);
        Ok(TokenClaims {
            expires_at: expires_at.map(|exp| UNIX_EPOCH + Duration::from_secs_f64(exp.min(1e12))),
            tenant_id: text("tid"),
            audience: text("aud"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::StreamItem;

    fn record(message: &str) -> ErrorRecord {
        serde_json::from_value(serde_json::json!({
            "message": message, "exception_message": null, "exception_type": null, "fully_qualified_error_id": null,
            "category": "ProtocolError", "activity": null, "reason": "RestClientException", "target_name": null,
            "target_type": null, "category_info": null, "target_object": null, "script_stack_trace": null,
            "position_message": null, "command": null, "terminating": false
        }))
        .unwrap()
    }

    fn failed_with(messages: &[&str]) -> InvocationResult {
        let mut r = InvocationResult::default();
        for message in messages {
            r.push(StreamItem::Error(Box::new(record(message))));
        }
        r
    }

    #[test]
    fn classifies_the_real_module_texts() {
        // As the real 3.9.0 writes them (non-terminating, after its own retries).
        let expired = r#"Error while querying REST service. HttpStatusCode=401 ErrorMessage={"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is not yet valid."}}"#;
        assert_eq!(classify_record(&record(expired)), Failure::ExpiredToken);
        let throttled = "Error while querying REST service. HttpStatusCode=429 ErrorMessage=";
        assert_eq!(classify_record(&record(throttled)), Failure::Throttled { retry_after: None });
        let unavailable = "Error while querying REST service. HttpStatusCode=503 ErrorMessage={}";
        assert_eq!(classify_record(&record(unavailable)), Failure::Transient);
        let missing = "Error while querying REST service. HttpStatusCode=404 ErrorMessage={}";
        assert_eq!(classify_record(&record(missing)), Failure::Permanent);
        // Older texts of the module's documentation.
        let body = r#"{"error":{"code":"TooManyRequests","message":"Rate limit exceeded. Retry after 2 seconds."}}"#;
        assert_eq!(classify_record(&record(body)), Failure::Throttled { retry_after: Some(Duration::from_secs(2)) });
        let server = "A server side error has occurred because of which the operation could not be completed. Please try again after some time. If the problem still persists, please reach out to MS support.";
        assert_eq!(classify_record(&record(server)), Failure::Transient);
        let not_found = "Ex6F9304|Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException|The operation couldn't be performed because object 'x' couldn't be found on 'SRV'.";
        assert_eq!(classify_record(&record(not_found)), Failure::Permanent);
    }

    #[test]
    fn an_expired_token_outranks_the_rest_and_success_is_not_a_failure() {
        let mut r = failed_with(&["object 'x' couldn't be found", "HttpStatusCode=401", "HttpStatusCode=429"]);
        assert_eq!(ExchangeOnline.classify(&r), Some(Failure::ExpiredToken));
        r.errors.truncate(1);
        assert_eq!(ExchangeOnline.classify(&r), Some(Failure::Permanent));
        r.errors.clear();
        r.had_errors = true;
        assert_eq!(ExchangeOnline.classify(&r), None, "HadErrors without an error record is how the real connect succeeds");
        let r = failed_with(&["HttpStatusCode=503", "retry after 5 seconds HttpStatusCode=429"]);
        assert_eq!(ExchangeOnline.classify(&r), Some(Failure::Throttled { retry_after: Some(Duration::from_secs(5)) }));
    }

    #[test]
    fn health_reads_connection_information() {
        let with = |value: serde_json::Value| {
            let mut r = InvocationResult::default();
            r.push(StreamItem::Output(crate::records::PsObject { type_names: vec![], value }));
            r
        };
        assert!(ExchangeOnline.healthy(&with(serde_json::json!({"State": "Connected", "TokenStatus": "Active"}))));
        assert!(!ExchangeOnline.healthy(&with(serde_json::json!({"State": "Broken", "TokenStatus": "Active"}))));
        assert!(!ExchangeOnline.healthy(&with(serde_json::json!({"State": "Connected", "TokenStatus": "Expired"}))));
        assert!(!ExchangeOnline.healthy(&with(serde_json::json!(false))));
        let mut failed = with(serde_json::json!({"State": "Connected"}));
        failed.errors.push(record("HttpStatusCode=500"));
        assert!(!ExchangeOnline.healthy(&failed));
    }

    #[test]
    fn token_claims_never_need_the_signature_and_errors_never_show_the_token() {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let token = format!("{}.{}.sig", engine.encode(b"{}"), engine.encode(br#"{"exp": 1700000000.5, "aud": "a"}"#));
        let claims = TokenClaims::from_jwt(&token).unwrap();
        assert_eq!(claims.expires_at, Some(UNIX_EPOCH + Duration::from_secs_f64(1_700_000_000.5)));
        assert_eq!(claims.tenant_id, None);
        for bad in ["s3cr3t-opaque-token", "a.b", "a.!!!.c", &format!("a.{}.c", engine.encode(b"[1]"))] {
            let error = TokenClaims::from_jwt(bad).unwrap_err().to_string();
            assert!(!error.contains("s3cr3t") && !error.contains("!!!"), "{error}");
        }
    }
}
