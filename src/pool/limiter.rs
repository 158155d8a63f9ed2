//! The pool's permitted concurrency: how many commands may be in PowerShell at once, pool-wide.
//!
//! Fixed at the pool's capacity (workers x runspaces per worker) unless the pool was built with
//! [`adaptive_concurrency`](super::PoolBuilder::adaptive_concurrency): then it adapts to throttling in the
//! manner of TCP's AIMD. It starts at the maximum. A throttled command cuts it to three quarters (never
//! below 1), once per congestion event: a throttle reported by a command that began before the last
//! cut says nothing new (it was sent into the old, larger window), nor does one that comes while the
//! service's Retry-After of the last cut runs; and while that Retry-After runs, nothing new starts (the
//! service asked the tenant to wait; a probe sent anyway would be refused and, where refusals count
//! against the budget, keep it throttled). [`GROWTH_RUN`] unthrottled commands in a row let it grow by
//! one (never above the maximum). A command that waits for its retry gives its permit back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Unthrottled commands in a row that let the limit grow by one.
pub(crate) const GROWTH_RUN: u32 = 32;

/// The AIMD arithmetic, apart from any waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    max: usize,
    limit: usize,
    /// Cuts so far: a command remembers the epoch it began in.
    epoch: u64,
    /// Unthrottled commands since the last change.
    run: u32,
    /// Until when the last cut's Retry-After runs: no new command starts, and no throttle cuts again.
    quiet_until: Option<Instant>,
}

impl Window {
    pub(crate) fn new(max: usize) -> Window {
        let max = max.max(1);
        Window { max, limit: max, epoch: 0, run: 0, quiet_until: None }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Whether the last cut's Retry-After still runs at `now`.
    fn quiet(&self, now: Instant) -> bool {
        self.quiet_until.is_some_and(|until| now < until)
    }

    /// A command that began in `epoch` was throttled at `now`, the service asking to wait
    /// `retry_after`: cut the limit to three quarters unless a cut already answered this congestion
    /// event. Returns whether the limit was cut.
    pub(crate) fn throttled(&mut self, epoch: u64, retry_after: Option<Duration>, now: Instant) -> bool {
        self.run = 0;
        if epoch != self.epoch || self.quiet(now) {
            return false;
        }
        self.limit = (self.limit * 3 / 4).max(1);
        self.epoch += 1;
        self.quiet_until = retry_after.map(|wait| now + wait);
        true
    }

    /// A command was not throttled: after [`GROWTH_RUN`] in a row the limit grows by one.
    pub(crate) fn succeeded(&mut self) {
        self.run += 1;
        if self.run >= GROWTH_RUN && self.limit < self.max {
            self.limit += 1;
            self.run = 0;
        }
    }
}

/// Permits to run a command, at most the current limit at once.
#[derive(Debug)]
pub(crate) struct Limiter {
    adaptive: bool,
    state: Mutex<(Window, usize)>,
    /// Woken when a permit is given back or the limit grows (the pool's work signal).
    wake: Arc<Notify>,
}

/// One command's right to run; given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    limiter: Arc<Limiter>,
    epoch: u64,
}

impl Limiter {
    pub(crate) fn new(max: usize, adaptive: bool, wake: Arc<Notify>) -> Arc<Limiter> {
        Arc::new(Limiter { adaptive, state: Mutex::new((Window::new(max), 0)), wake })
    }

    /// The concurrency permitted now.
    pub(crate) fn limit(&self) -> usize {
        self.lock().0.limit()
    }

    /// Commands holding a permit now.
    pub(crate) fn running(&self) -> usize {
        self.lock().1
    }

    /// Whether as many commands run as are permitted (or none may start before a Retry-After ends).
    pub(crate) fn saturated(&self) -> bool {
        let state = self.lock();
        state.1 >= state.0.limit() || state.0.quiet(Instant::now())
    }

    /// Until when nothing new may start, if a Retry-After runs now.
    pub(crate) fn quiet_until(&self) -> Option<Instant> {
        let state = self.lock();
        state.0.quiet_until.filter(|_| state.0.quiet(Instant::now()))
    }

    /// A permit, if fewer commands run than the limit allows and no Retry-After runs.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut state = self.lock();
        let (window, in_flight) = &mut *state;
        if *in_flight >= window.limit() || window.quiet(Instant::now()) {
            return None;
        }
        *in_flight += 1;
        Some(Permit { limiter: self.clone(), epoch: window.epoch })
    }

    /// Waits for a permit.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Some(permit) = self.try_acquire() {
                return permit;
            }
            match self.quiet_until() {
                Some(until) => tokio::select! {
                    () = woken => {}
                    () = tokio::time::sleep_until(until) => {}
                },
                None => woken.await,
            }
        }
    }

    /// What the command holding `permit` met: throttling (with the service's Retry-After, if it gave
    /// one) or not. Only an adaptive limiter listens.
    pub(crate) fn feedback(&self, permit: &Permit, throttled: Option<Option<Duration>>) {
        if !self.adaptive {
            return;
        }
        let (before, after) = {
            let mut state = self.lock();
            let before = state.0.limit();
            match throttled {
                Some(retry_after) => {
                    state.0.throttled(permit.epoch, retry_after, Instant::now());
                }
                None => state.0.succeeded(),
            }
            (before, state.0.limit())
        };
        if after != before {
            tracing::info!(from = before, to = after, "adaptive concurrency: limit changed");
        }
        if after > before {
            self.wake.notify_waiters();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Window, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.lock().1 -= 1;
        self.limiter.wake.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_starts_at_the_maximum_and_cuts_once_per_congestion_event() {
        let now = Instant::now();
        let mut w = Window::new(8);
        assert_eq!(w.limit(), 8);
        assert!(w.throttled(0, None, now));
        assert_eq!(w.limit(), 6);
        // A burst of 429s from commands sent into the old window is one signal, not five.
        for _ in 0..5 {
            assert!(!w.throttled(0, None, now));
        }
        assert_eq!(w.limit(), 6);
        assert!(w.throttled(1, None, now), "a command begun after the cut says something new");
        assert_eq!(w.limit(), 4);
        assert!(w.throttled(2, None, now));
        assert!(w.throttled(3, None, now));
        assert!(w.throttled(4, None, now));
        assert_eq!(w.limit(), 1, "4, 3, 2, 1: never below 1");
        assert!(w.throttled(5, None, now));
        assert_eq!(w.limit(), 1);
    }

    #[test]
    fn while_the_retry_after_runs_nothing_cuts_again_and_nothing_starts() {
        let now = Instant::now();
        let mut w = Window::new(8);
        assert!(w.throttled(0, Some(Duration::from_secs(2)), now));
        assert!(w.quiet(now + Duration::from_secs(1)));
        assert!(!w.throttled(1, None, now + Duration::from_secs(1)), "the same congestion event");
        assert_eq!(w.limit(), 6);
        assert!(!w.quiet(now + Duration::from_secs(2)));
        assert!(w.throttled(1, None, now + Duration::from_secs(2)), "after the Retry-After a new throttle cuts");
        assert_eq!(w.limit(), 4);
    }

    #[test]
    fn it_grows_by_one_after_a_run_of_successes_up_to_the_maximum() {
        let now = Instant::now();
        let mut w = Window::new(3);
        w.throttled(0, None, now);
        assert_eq!(w.limit(), 2);
        for _ in 0..GROWTH_RUN - 1 {
            w.succeeded();
        }
        assert_eq!(w.limit(), 2, "one short of the run");
        w.succeeded();
        assert_eq!(w.limit(), 3);
        w.throttled(1, None, now);
        // A throttle breaks the run (even one from an old window, which does not cut).
        for _ in 0..GROWTH_RUN - 1 {
            w.succeeded();
        }
        assert!(!w.throttled(0, None, now));
        w.succeeded();
        assert_eq!(w.limit(), 2);
        for _ in 0..10 * GROWTH_RUN {
            w.succeeded();
        }
        assert_eq!(w.limit(), 3, "never above the maximum");
    }

    #[tokio::test]
    async fn permits_follow_the_limit_and_only_an_adaptive_limiter_moves() {
        let fixed = Limiter::new(2, false, Arc::new(Notify::new()));
        let a = fixed.try_acquire().unwrap();
        let _b = fixed.try_acquire().unwrap();
        assert!(fixed.try_acquire().is_none() && fixed.saturated());
        fixed.feedback(&a, Some(Some(Duration::from_secs(60))));
        assert_eq!(fixed.limit(), 2, "a fixed limiter ignores throttling");
        drop(a);
        assert!(fixed.try_acquire().is_some(), "a permit given back is free again, Retry-After or not");

        let adaptive = Limiter::new(4, true, Arc::new(Notify::new()));
        let permits: Vec<Permit> = (0..4).map(|_| adaptive.try_acquire().unwrap()).collect();
        permits.iter().for_each(|p| adaptive.feedback(p, Some(Some(Duration::from_millis(200)))));
        assert_eq!(adaptive.limit(), 3, "four 429s from one window: one cut");
        drop(permits);
        assert!(adaptive.try_acquire().is_none(), "nothing starts while the Retry-After runs");
        let waited = Instant::now();
        let _x = adaptive.acquire().await;
        assert!(waited.elapsed() >= Duration::from_millis(150), "acquire waits the Retry-After out");
        let _y = adaptive.try_acquire().unwrap();
        let _z = adaptive.try_acquire().unwrap();
        assert!(adaptive.try_acquire().is_none(), "three run now, at most");
    }
}
