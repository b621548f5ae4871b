//! Admission: how much work the gateway takes on. Connections per listener, requests in flight
//! per route (beyond it: 503 with `Retry-After`, stage `admission`), and the budget of HTTP/2
//! stream resets a client may spend per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ResetBudget;
use crate::error::{ErrorKind, ProxyError, Stage};
use crate::listen::ListenerShared;
use crate::proxy::tracker::Tracker;
use crate::route::Route;

/// Seconds a shed client is told to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u32 = 1;

/// A cap on concurrent holders, shared by every worker.
#[derive(Debug)]
pub struct Limit {
    max: usize,
    current: AtomicUsize,
}

impl Limit {
    /// A limit of `max` holders.
    pub fn new(max: usize) -> Arc<Limit> {
        Arc::new(Limit {
            max,
            current: AtomicUsize::new(0),
        })
    }

    /// A permit if the limit is not reached.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.clone()))
    }

    /// Holders now.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }
}

/// Holds one unit of a [`Limit`] until dropped.
#[derive(Debug)]
pub struct Permit(Arc<Limit>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket of client stream resets for one HTTP/2 connection.
#[derive(Debug)]
pub struct ResetBucket {
    budget: ResetBudget,
    tokens: f64,
    at: Instant,
}

impl ResetBucket {
    /// A full bucket.
    pub fn new(budget: ResetBudget) -> ResetBucket {
        ResetBucket {
            budget,
            tokens: f64::from(budget.burst),
            at: Instant::now(),
        }
    }

    /// Spends one reset; false when the budget is exhausted.
    pub fn spend(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.saturating_duration_since(self.at).as_secs_f64()
            * f64::from(self.budget.per_second);
        self.tokens = (self.tokens + refill).min(f64::from(self.budget.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Checks a routed request against the listener's body limit and the route's in-flight limit.
/// On success the in-flight permit is stored in the tracker (released when the request ends);
/// otherwise the error to answer with: 413 for a declared body over the limit, 503 (with
/// `Retry-After`) when the route is full.
pub fn admit(
    route: &Route,
    listener: &ListenerShared,
    req: &http::Request<hyper::body::Incoming>,
    t: &mut Tracker,
) -> Option<ProxyError> {
    if let Some(max) = listener.limits.max_body_bytes
        && http_body::Body::size_hint(req.body())
            .exact()
            .is_some_and(|len| len > max)
    {
        t.stage = Stage::RequestBody;
        return Some(ProxyError::downstream(
            Stage::RequestBody,
            ErrorKind::TooLarge,
        ));
    }
    if let Some(limit) = &route.in_flight {
        match limit.try_acquire() {
            Some(p) => t.admission = Some(p),
            None => {
                t.stage = Stage::Admission;
                return Some(ProxyError::gateway(Stage::Admission, ErrorKind::Overloaded));
            }
        }
    }
    None
}

/// How long an HTTP/2 connection told to go away for abuse may take to finish its streams
/// before it is closed.
pub const CALM_DOWN_GRACE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_refuses_beyond_max_and_frees_on_drop() {
        let l = Limit::new(2);
        let a = l.try_acquire().unwrap();
        let _b = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        drop(a);
        assert!(l.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn reset_bucket_refills() {
        let mut b = ResetBucket::new(ResetBudget {
            burst: 3,
            per_second: 2,
        });
        assert!(b.spend() && b.spend() && b.spend());
        assert!(!b.spend());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.spend());
        assert!(!b.spend());
    }
}
