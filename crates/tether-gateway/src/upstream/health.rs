//! Passive health of one endpoint: after `max_fails` failures in a row (connection attempts that
//! failed at DNS, connect or TLS, so the endpoint never got the request; and, with the upstream's
//! `fail_statuses`, answers with one of them) the endpoint is skipped for `fail_timeout`, then
//! tried again. A fresh connection that works, or an answer not in `fail_statuses`, clears the
//! count. Each worker keeps its own view, as its pools are its own.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{ProxyError, Side, Stage};

/// One endpoint's failures and, when skipped, until when.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    fails: AtomicU32,
    /// Milliseconds after the upstream's `born` until which the endpoint is skipped; 0: never.
    skipped_until: AtomicU64,
    /// Milliseconds after `born` when it last came back (a skip ended) or joined the upstream,
    /// for slow start; 0: never.
    back_at: AtomicU64,
}

/// Whether an error says the endpoint could not be reached at all.
pub fn counts_against_endpoint(e: &ProxyError) -> bool {
    e.side == Side::Upstream && matches!(e.stage, Stage::Dns | Stage::Connect | Stage::Tls)
}

/// Milliseconds from `born` to `at`, at least 1 (0 means "not skipped").
fn millis_since(born: Instant, at: Instant) -> u64 {
    let ms = at.saturating_duration_since(born).as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

impl EndpointHealth {
    /// Whether the endpoint may be picked at `now`.
    pub fn available(&self, born: Instant, now: Instant) -> bool {
        let until = self.skipped_until.load(Ordering::Relaxed);
        until == 0 || millis_since(born, now) >= until
    }

    /// A connection attempt (or an answer) failed. True when this failure made the endpoint
    /// skipped.
    pub fn failed(&self, born: Instant, max_fails: u32, fail_timeout: Duration) -> bool {
        if max_fails == 0 {
            return false;
        }
        let fails = self.fails.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if fails < max_fails {
            return false;
        }
        self.fails.store(0, Ordering::Relaxed);
        let until = millis_since(born, Instant::now() + fail_timeout);
        self.skipped_until.store(until, Ordering::Relaxed);
        true
    }

    /// Takes over what `before` counted (measured from the same `born`): the same endpoint in
    /// the configuration before a reload.
    pub fn carry(&self, before: &EndpointHealth) {
        for (to, from) in [
            (&self.skipped_until, &before.skipped_until),
            (&self.back_at, &before.back_at),
        ] {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.fails
            .store(before.fails.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Notes that the endpoint joined its upstream at `now` (a reload or discovery added it).
    pub fn joined(&self, born: Instant, now: Instant) {
        self.back_at
            .store(millis_since(born, now), Ordering::Relaxed);
    }

    /// When the endpoint last came back or joined, if it did: the end of its skip (past or to
    /// come), or the time noted by [`joined`](Self::joined).
    pub fn back_since(&self, born: Instant) -> Option<Instant> {
        let at = match self.skipped_until.load(Ordering::Relaxed) {
            0 => self.back_at.load(Ordering::Relaxed),
            until => until,
        };
        (at != 0).then(|| born + Duration::from_millis(at))
    }

    /// A fresh connection to the endpoint worked, or it answered well.
    pub fn succeeded(&self) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
        let until = self.skipped_until.load(Ordering::Relaxed);
        if until != 0 {
            // Its skip is over: it came back then.
            self.back_at.store(until, Ordering::Relaxed);
            self.skipped_until.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_after_max_fails_in_a_row_then_tried_again() {
        let born = Instant::now();
        let h = EndpointHealth::default();
        let t = Duration::from_millis(50);
        assert!(h.available(born, Instant::now()));
        assert!(!h.failed(born, 2, t));
        assert!(h.available(born, Instant::now()), "one failure of two");
        assert!(h.failed(born, 2, t));
        assert!(!h.available(born, Instant::now()));
        assert!(h.available(born, Instant::now() + t + Duration::from_millis(2)));
    }

    #[test]
    fn a_success_clears_the_count() {
        let born = Instant::now();
        let h = EndpointHealth::default();
        let t = Duration::from_secs(10);
        assert!(!h.failed(born, 2, t));
        h.succeeded();
        assert!(!h.failed(born, 2, t), "the count started again");
        assert!(h.available(born, Instant::now()));
    }

    #[test]
    fn an_endpoint_came_back_when_its_skip_ended_or_when_it_joined() {
        let born = Instant::now();
        let h = EndpointHealth::default();
        assert_eq!(h.back_since(born), None, "never away");
        let t = Duration::from_secs(10);
        let before = Instant::now();
        assert!(h.failed(born, 1, t));
        let back = h.back_since(born).unwrap();
        assert!(
            back >= before + t - Duration::from_millis(1),
            "when the skip ends"
        );
        // A success after the skip keeps the time it came back.
        h.succeeded();
        assert_eq!(h.back_since(born), Some(back));
        let moved = EndpointHealth::default();
        moved.carry(&h);
        assert_eq!(moved.back_since(born), Some(back));
        let later = born + Duration::from_secs(30);
        h.joined(born, later);
        assert_eq!(h.back_since(born), Some(later));
    }

    #[test]
    fn max_fails_zero_never_skips() {
        let born = Instant::now();
        let h = EndpointHealth::default();
        for _ in 0..10 {
            assert!(!h.failed(born, 0, Duration::from_secs(10)));
        }
        assert!(h.available(born, Instant::now()));
    }
}
