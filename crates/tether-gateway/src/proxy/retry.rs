//! When a failed upstream attempt may be sent again, and how long to wait first.
//!
//! Retried only when the request provably did not reach the upstream's handler (connect failed,
//! nothing was written, HTTP/2 REFUSED_STREAM), or when a reused keep-alive connection turned out
//! to be closed before any response byte and the request is idempotent and bodiless (the stale
//! connection race). Never after the client left: the caller checks the context first.

use std::time::Duration;

use crate::error::{ProxyError, Retry};

/// Whether attempt number `attempt` (0-based) that failed with `err` may be followed by another.
/// `nothing_reached_handler` is the caller's proof that the upstream did not act on the request.
pub fn may_retry(
    err: &ProxyError,
    attempt: u32,
    max_retries: u32,
    nothing_reached_handler: bool,
) -> bool {
    if attempt >= max_retries {
        return false;
    }
    match err.classify().retry {
        Retry::Safe => true,
        Retry::IdempotentOnly => nothing_reached_handler,
        Retry::Never => false,
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

    #[test]
    fn connect_failures_retry_until_the_limit() {
        let e = ProxyError::upstream(Stage::Connect, ErrorKind::Refused);
        assert!(may_retry(&e, 0, 2, false));
        assert!(may_retry(&e, 1, 2, false));
        assert!(!may_retry(&e, 2, 2, false));
    }

    #[test]
    fn sent_requests_need_proof() {
        let e = ProxyError::upstream(Stage::FirstByte, ErrorKind::Reset);
        assert!(!may_retry(&e, 0, 2, false));
        assert!(may_retry(&e, 0, 2, true));
        let body = ProxyError::upstream(Stage::Body, ErrorKind::Reset);
        assert!(!may_retry(&body, 0, 2, true));
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
