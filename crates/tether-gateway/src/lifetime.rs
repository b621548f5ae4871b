//! How much and how long one connection is used, a client's or an upstream's
//! (`max_requests_per_connection`, `max_connection_age`; nginx's `keepalive_requests` and
//! `keepalive_time`): connections that live for ever keep their traffic on whatever they reached
//! first behind a balancer, and servers (or tethers) added later get none of it.

use std::num::NonZeroU32;
use std::time::Duration;

use tokio::time::Instant;

/// The limits on one connection's use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifetime {
    /// Requests (HTTP/2: streams) one connection carries.
    pub max_requests: Option<NonZeroU32>,
    /// Longest a connection is used from its opening.
    pub max_age: Option<Duration>,
}

impl Lifetime {
    /// Whether either limit is set.
    pub fn is_limited(&self) -> bool {
        self.max_requests.is_some() || self.max_age.is_some()
    }

    /// Whether a connection opened at `born` with `requests` to its name (a client's: the one
    /// starting now included; an upstream's: those it finished) has done its share.
    pub fn spent(&self, requests: u64, born: Instant) -> bool {
        self.max_requests
            .is_some_and(|m| requests >= u64::from(m.get()))
            || self.max_age.is_some_and(|a| born.elapsed() >= a)
    }

    /// The request limit alone, for a connection whose age has a timer of its own.
    pub fn by_count(self) -> Lifetime {
        Lifetime {
            max_age: None,
            ..self
        }
    }
}

/// A connection's use so far.
#[derive(Debug, Clone, Copy)]
pub struct Wear {
    /// When it was opened (accepted, for a client's).
    pub born: Instant,
    /// Requests it carried before now (a client's: before its current session, that is before
    /// it last parked; an upstream's: exchanges it finished cleanly).
    pub served: u32,
}

impl Wear {
    /// A connection opened now.
    pub fn new() -> Wear {
        Wear {
            born: Instant::now(),
            served: 0,
        }
    }
}

impl Default for Wear {
    fn default() -> Self {
        Wear::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_spent_by_its_count_or_its_age_and_by_count_ignores_the_age() {
        let life = Lifetime {
            max_requests: NonZeroU32::new(3),
            max_age: Some(Duration::from_secs(10)),
        };
        let born = Instant::now();
        assert!(life.is_limited() && !Lifetime::default().is_limited());
        assert!(!life.spent(2, born));
        assert!(life.spent(3, born));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(life.spent(0, born));
        assert!(!life.by_count().spent(2, born));
        assert!(!Lifetime::default().spent(u64::MAX, born));
    }
}
