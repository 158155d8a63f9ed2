//! Which failures are worth running again, and how long to wait first.
//!
//! The classification follows what ExchangeOnlineManagement's REST cmdlets report (see Microsoft's
//! cmdlet reference): throttling (HTTP 429 with the server's JSON body, or a 503/504, or a server
//! exception such as DCOverloaded) is transient; HTTP 401 / InvalidAuthenticationToken means the token
//! expired and the session must connect again; everything else (not found, bad parameter) is permanent.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::records::{ErrorRecord, InvocationResult};

/// What kind of failure a command's error records describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Throttling or a transient server error: try again later, after `retry_after` if the server said.
    Transient {
        /// The delay the server asked for.
        retry_after: Option<Duration>,
    },
    /// The access token expired or the connection broke: connect again, then retry.
    ExpiredToken,
    /// Not worth repeating (not found, bad parameter, permission denied, ...).
    Permanent,
}

const TRANSIENT_MARKERS: &[&str] = &[
    "\"code\":\"toomanyrequests\"",
    "httpstatuscode=429",
    "httpstatuscode=503",
    "httpstatuscode=504",
    "rate limit exceeded",
    "the current request is throttled",
    "dcoverloaded",
    "serverinmm",
    "storagetransient",
    "a server side error has occurred because of which the operation could not be completed",
];

const EXPIRED_MARKERS: &[&str] = &["httpstatuscode=401", "invalidauthenticationtoken", "token has expired"];

/// Classifies a finished command; `None` when it reported no errors.
///
/// ```
/// use psbridge::{ErrorRecord, InvocationResult, StreamItem, retry::{classify, Failure}};
/// let mut r = InvocationResult::default();
/// r.had_errors = true;
/// let mut record: ErrorRecord = serde_json::from_value(serde_json::json!({
///     "message": "{\"error\":{\"code\":\"TooManyRequests\",\"message\":\"Rate limit exceeded. Retry after 2 seconds.\"}}",
///     "exception_message": null, "exception_type": null, "fully_qualified_error_id": null, "category": "ProtocolError",
///     "activity": null, "reason": null, "target_name": null, "target_type": null, "category_info": null,
///     "target_object": null, "script_stack_trace": null, "position_message": null, "command": null, "terminating": true
/// })).unwrap();
/// r.push(StreamItem::Error(Box::new(record)));
/// assert_eq!(classify(&r), Some(Failure::Transient { retry_after: Some(std::time::Duration::from_secs(2)) }));
/// ```
pub fn classify(result: &InvocationResult) -> Option<Failure> {
    if result.succeeded() {
        return None;
    }
    // The most actionable kind wins: one expired token means every record after it is noise.
    let kinds = result.errors.iter().map(classify_record);
    Some(kinds.fold(Failure::Permanent, |worst, kind| match (worst, kind) {
        (Failure::ExpiredToken, _) | (_, Failure::ExpiredToken) => Failure::ExpiredToken,
        (Failure::Transient { retry_after: a }, Failure::Transient { retry_after: b }) => Failure::Transient { retry_after: a.max(b) },
        (transient @ Failure::Transient { .. }, Failure::Permanent) | (Failure::Permanent, transient) => transient,
    }))
}

/// Classifies one error record by its message.
pub fn classify_record(record: &ErrorRecord) -> Failure {
    let text = record.message.to_lowercase();
    if EXPIRED_MARKERS.iter().any(|m| text.contains(m)) {
        Failure::ExpiredToken
    } else if TRANSIENT_MARKERS.iter().any(|m| text.contains(m)) {
        Failure::Transient { retry_after: retry_after(&text) }
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

/// How often and how patiently a pool retries.
///
/// ```
/// use std::time::Duration;
/// let policy = psbridge::RetryPolicy::default().max_attempts(10).max_delay(Duration::from_secs(5));
/// assert_eq!(policy.attempts(), 10);
/// ```
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
    retry_transient: bool,
}

impl Default for RetryPolicy {
    /// 6 attempts, exponential backoff from 1 s up to 60 s with full jitter, transient failures retried.
    fn default() -> Self {
        RetryPolicy { max_attempts: 6, base_delay: Duration::from_secs(1), max_delay: Duration::from_secs(60), retry_transient: true }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn never() -> Self {
        RetryPolicy { max_attempts: 1, ..Self::default() }
    }

    /// Attempts in all, the first included. Default: 6.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The first backoff; each later one doubles. Default: 1 s.
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// The longest wait, also capping a delay the server asked for. Default: 60 s.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Whether throttling and transient server errors are retried. Default: true.
    pub fn retry_transient(mut self, retry: bool) -> Self {
        self.retry_transient = retry;
        self
    }

    /// Attempts in all.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    pub(crate) fn retries_transient(&self) -> bool {
        self.retry_transient
    }

    /// The wait before attempt `attempt + 1` (attempt counts from 1): the server's delay when it gave
    /// one, else full jitter over `base * 2^(attempt-1)`; capped at `max_delay`.
    pub fn delay(&self, attempt: u32, server: Option<Duration>) -> Duration {
        if let Some(server) = server {
            return server.min(self.max_delay);
        }
        let exponential = self.base_delay.saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20));
        let ceiling = exponential.min(self.max_delay);
        ceiling.mul_f64(jitter())
    }
}

/// A number in [0.5, 1): half the backoff is fixed, half random, so that workers retrying together
/// spread out without ever retrying at once.
fn jitter() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    0.5 + (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64 / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(message: &str) -> ErrorRecord {
        serde_json::from_value(serde_json::json!({
            "message": message, "exception_message": null, "exception_type": null, "fully_qualified_error_id": null,
            "category": "NotSpecified", "activity": null, "reason": null, "target_name": null, "target_type": null,
            "category_info": null, "target_object": null, "script_stack_trace": null, "position_message": null,
            "command": null, "terminating": false
        }))
        .unwrap()
    }

    #[test]
    fn classifies_the_real_module_texts() {
        let throttled = r#"{"error":{"code":"TooManyRequests","message":"Rate limit exceeded. Retry after 2 seconds."}}"#;
        assert_eq!(classify_record(&record(throttled)), Failure::Transient { retry_after: Some(Duration::from_secs(2)) });
        let expired = r#"Error while querying REST service. HttpStatusCode=401 ErrorMessage={"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is not yet valid."}}"#;
        assert_eq!(classify_record(&record(expired)), Failure::ExpiredToken);
        let server = "A server side error has occurred because of which the operation could not be completed. Please try again after some time. If the problem still persists, please reach out to MS support.";
        assert_eq!(classify_record(&record(server)), Failure::Transient { retry_after: None });
        let unavailable = "Error while querying REST service. HttpStatusCode=503 ErrorMessage={}";
        assert_eq!(classify_record(&record(unavailable)), Failure::Transient { retry_after: None });
        let missing = "Ex6F9304|Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException|The operation couldn't be performed because object 'x' couldn't be found on 'SRV'.";
        assert_eq!(classify_record(&record(missing)), Failure::Permanent);
    }

    #[test]
    fn an_expired_token_outranks_the_rest() {
        let mut r = InvocationResult { had_errors: true, ..Default::default() };
        r.errors = vec![record("object 'x' couldn't be found"), record("HttpStatusCode=401"), record("HttpStatusCode=429")];
        assert_eq!(classify(&r), Some(Failure::ExpiredToken));
        r.errors.truncate(1);
        assert_eq!(classify(&r), Some(Failure::Permanent));
        r.errors.clear();
        assert_eq!(classify(&r), None, "HadErrors without an error record (a suppressed error) is no failure");
    }

    #[test]
    fn delays_grow_are_jittered_capped_and_honour_the_server() {
        let policy = RetryPolicy::default().base_delay(Duration::from_millis(100)).max_delay(Duration::from_secs(1));
        for attempt in 1..=3 {
            let ceiling = Duration::from_millis(100 << (attempt - 1));
            let d = policy.delay(attempt, None);
            assert!(d >= ceiling / 2 && d < ceiling, "attempt {attempt}: {d:?}");
        }
        assert!(policy.delay(30, None) < Duration::from_secs(1));
        assert_eq!(policy.delay(1, Some(Duration::from_secs(2))), Duration::from_secs(1), "capped");
        assert_eq!(policy.delay(1, Some(Duration::from_millis(300))), Duration::from_millis(300));
    }
}
