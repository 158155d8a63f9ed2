//! Which failures are worth running again, and how long to wait first.
//!
//! A pool asks a [`Classifier`] what a finished command's failure means and whether a health check
//! passed. The default, [`Generic`], knows no module: every failure is permanent and a health check
//! passes when it succeeds without a `false` in its output. Module knowledge lives in presets such as
//! [`exo::ExchangeOnline`](crate::exo::ExchangeOnline).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::records::InvocationResult;

/// What kind of failure a command's error records describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A transient server error: try again after a backoff.
    Transient,
    /// The service throttled the caller: try again later, after `retry_after` if the service said.
    Throttled {
        /// The delay the service asked for.
        retry_after: Option<Duration>,
    },
    /// The credentials expired or the connection broke: replace the worker with one connected with
    /// freshly read credentials, then retry once.
    ExpiredToken,
    /// Not worth repeating (not found, bad parameter, permission denied, ...).
    Permanent,
}

/// Tells a pool what a command's failure means and whether a health check passed.
///
/// ```
/// use psbridge::{InvocationResult, retry::{Classifier, Failure, Generic}};
/// let failed = InvocationResult { state: psbridge::PipelineState::Failed, ..Default::default() };
/// assert_eq!(Generic.classify(&failed), Some(Failure::Permanent));
/// assert_eq!(Generic.classify(&InvocationResult::default()), None);
/// ```
pub trait Classifier: std::fmt::Debug + Send + Sync + 'static {
    /// `None` when the command [succeeded](InvocationResult::succeeded), else what its failure is.
    fn classify(&self, result: &InvocationResult) -> Option<Failure>;

    /// Whether the health check's result says the worker is fit for work. Default: the check succeeded
    /// and no output object is `false`.
    fn healthy(&self, result: &InvocationResult) -> bool {
        result.succeeded() && result.output.iter().all(|o| o.value != serde_json::Value::Bool(false))
    }
}

/// The classifier that knows no module: every failure is permanent. The pool's default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Generic;

impl Classifier for Generic {
    fn classify(&self, result: &InvocationResult) -> Option<Failure> {
        (!result.succeeded()).then_some(Failure::Permanent)
    }
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
    /// 6 attempts, exponential backoff from 1 s up to 60 s with equal jitter, transient failures retried.
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
    /// one, else "equal jitter" over `base * 2^(attempt-1)` (half fixed, half random: a delay in
    /// [ceiling/2, ceiling)); capped at `max_delay`.
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

    #[test]
    fn the_generic_classifier_knows_no_module() {
        let mut r = InvocationResult::default();
        assert_eq!(Generic.classify(&r), None);
        r.had_errors = true;
        assert_eq!(Generic.classify(&r), None, "HadErrors without an error record (a suppressed error) is no failure");
        r.exit_code = Some(2);
        assert_eq!(Generic.classify(&r), Some(Failure::Permanent));
        assert!(!Generic.healthy(&r));
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
