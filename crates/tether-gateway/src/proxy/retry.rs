//! When a failed upstream attempt may be sent again, and how long to wait first.
//!
//! Retried only when the request provably did not reach the upstream's handler (connect failed,
//! nothing was written, HTTP/2 REFUSED_STREAM or a GOAWAY below the stream: any method), or when a reused keep-alive connection turned out
//! to be closed before any response byte and the request is idempotent and bodiless (the stale
//! connection race). Never after the client left: the caller checks the context first.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::error::{ProxyError, Retry};

/// A route's retry policy: attempt limit, statuses worth retrying, and a budget.
#[derive(Debug)]
pub struct RetryPolicy {
    max_retries: u32,
    statuses: Vec<u16>,
    budget: RetryBudget,
}

impl RetryPolicy {
    /// A policy allowing `max_retries` extra attempts, retrying idempotent requests on
    /// `statuses`, with retries held to `ratio` of requests (plus `min_per_second`).
    pub fn new(
        max_retries: u32,
        statuses: Vec<u16>,
        ratio: f64,
        min_per_second: u32,
    ) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            statuses,
            budget: RetryBudget::new(ratio, min_per_second),
        }
    }

    /// Counts a request towards the budget.
    pub fn on_request(&self) {
        self.budget.deposit();
    }

    /// Whether attempt number `attempt` (0-based) that failed with `err` may be followed by
    /// another. `nothing_reached_handler` is the caller's proof that the upstream did not act on
    /// the request.
    pub fn may_retry(&self, err: &ProxyError, attempt: u32, nothing_reached_handler: bool) -> bool {
        if attempt >= self.max_retries {
            return false;
        }
        let allowed = match err.classify().retry {
            Retry::Safe => true,
            Retry::IdempotentOnly => nothing_reached_handler,
            Retry::Never => false,
        };
        allowed && self.budget.withdraw()
    }

    /// Whether any response status is retried.
    pub fn retries_statuses(&self) -> bool {
        self.max_retries > 0 && !self.statuses.is_empty()
    }

    /// Whether a response with `status` to a replayable idempotent request is retried.
    pub fn retries_status(
        &self,
        status: u16,
        attempt: u32,
        idempotent: bool,
        replayable: bool,
    ) -> bool {
        attempt < self.max_retries
            && idempotent
            && replayable
            && self.statuses.contains(&status)
            && self.budget.withdraw()
    }
}

/// Retries held to a fraction of requests, so a failing upstream is not stormed: each request
/// deposits `ratio` of a token, each retry takes one, and `min_per_second` retries are always
/// allowed so a quiet route can still retry.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a token per request.
    deposit: i64,
    /// Thousandths of a token available.
    milli_tokens: AtomicI64,
    min_per_second: u32,
    /// (second, retries taken from the per-second allowance in it).
    floor: Mutex<(u64, u32)>,
    epoch: std::time::Instant,
}

/// The most tokens that can be saved up (in thousandths): bursts stay bounded.
const MAX_MILLI_TOKENS: i64 = 100_000;

impl RetryBudget {
    /// A budget of `ratio` retries per request plus `min_per_second`.
    pub fn new(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget {
            deposit: (ratio.clamp(0.0, 1000.0) * 1000.0) as i64,
            milli_tokens: AtomicI64::new(0),
            min_per_second,
            floor: Mutex::new((0, 0)),
            epoch: std::time::Instant::now(),
        }
    }

    fn deposit(&self) {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + self.deposit).min(MAX_MILLI_TOKENS))
            });
    }

    /// Takes one retry from the budget; false when none is left.
    pub fn withdraw(&self) -> bool {
        let took = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t >= 1000).then_some(t - 1000)
            })
            .is_ok();
        if took {
            return true;
        }
        let second = self.epoch.elapsed().as_secs();
        let mut floor = crate::lock(&self.floor);
        if floor.0 != second {
            *floor = (second, 0);
        }
        if floor.1 < self.min_per_second {
            floor.1 += 1;
            return true;
        }
        false
    }
}

/// RFC 9110 §9.2.2 idempotent methods.
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// Pause before retry `attempt` (1-based): none for a stale connection (a fresh one is expected to
/// work), else exponential from 25 ms with up to 50 % jitter, capped at 1 s.
pub fn backoff(attempt: u32, stale_connection: bool) -> Duration {
    if stale_connection {
        return Duration::ZERO;
    }
    let base = Duration::from_millis(25).saturating_mul(1 << attempt.saturating_sub(1).min(6));
    let base = base.min(Duration::from_secs(1));
    base + base.mul_f64(jitter() * 0.5)
}

/// A cheap pseudo-random number in [0, 1); jitter only needs to de-synchronise clients.
fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x853c_49e6_748f_ea9b);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, Stage};

    fn policy(max: u32) -> RetryPolicy {
        // A generous budget so only the limit and the classification decide.
        let p = RetryPolicy::new(max, vec![503], 1.0, 1000);
        for _ in 0..10 {
            p.on_request();
        }
        p
    }

    #[test]
    fn connect_failures_retry_until_the_limit() {
        let p = policy(2);
        let e = ProxyError::upstream(Stage::Connect, ErrorKind::Refused);
        assert!(p.may_retry(&e, 0, false));
        assert!(p.may_retry(&e, 1, false));
        assert!(!p.may_retry(&e, 2, false));
    }

    #[test]
    fn sent_requests_need_proof() {
        let p = policy(2);
        let e = ProxyError::upstream(Stage::FirstByte, ErrorKind::Reset);
        assert!(!p.may_retry(&e, 0, false));
        assert!(p.may_retry(&e, 0, true));
        let body = ProxyError::upstream(Stage::Body, ErrorKind::Reset);
        assert!(!p.may_retry(&body, 0, true));
    }

    #[test]
    fn statuses_retry_only_idempotent_replayable_requests() {
        let p = policy(2);
        assert!(p.retries_status(503, 0, true, true));
        assert!(!p.retries_status(503, 0, false, true));
        assert!(!p.retries_status(503, 0, true, false));
        assert!(!p.retries_status(502, 0, true, true));
        assert!(!p.retries_status(503, 2, true, true));
        assert!(p.retries_statuses());
        // No status to retry, or no retry at all: no response is ever retried.
        assert!(!RetryPolicy::new(2, vec![], 1.0, 10).retries_statuses());
        assert!(!RetryPolicy::new(0, vec![503], 1.0, 10).retries_statuses());
    }

    #[test]
    fn budget_holds_retries_to_the_ratio() {
        let b = RetryBudget::new(0.1, 0);
        for _ in 0..100 {
            b.deposit();
        }
        let taken = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(taken, 10);
        let floor = RetryBudget::new(0.0, 3);
        assert_eq!((0..10).filter(|_| floor.withdraw()).count(), 3);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let a = backoff(1, false);
        let b = backoff(3, false);
        assert!(a >= Duration::from_millis(25) && a <= Duration::from_millis(38));
        assert!(b >= Duration::from_millis(100) && b <= Duration::from_millis(150));
        assert!(backoff(30, false) <= Duration::from_millis(1500));
        assert_eq!(backoff(1, true), Duration::ZERO);
        assert!(is_idempotent("GET") && !is_idempotent("POST"));
    }
}
