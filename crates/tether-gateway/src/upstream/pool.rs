//! Upstream connections kept for reuse: an idle list of HTTP/1 connections and one shared
//! multiplexed HTTP/2 connection per endpoint. Pools are per worker thread, so their locks are
//! never contended.
//!
//! LIFECYCLE (HTTP/1): connect → handshake → a task drives the connection → checked out for one
//! request → returned when the response body ended cleanly → ... A connection whose request was
//! abandoned is never returned: hyper closes it, the upstream sees EOF, and the task records the
//! instant the socket was closed (the end of cancellation propagation).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::lock;
use crate::observe::metrics::ConnCounts;
use crate::proxy::request_body::RequestBody;

/// When the connection behind `closed` was closed, waiting at most `limit` for it.
pub async fn closed_at(
    mut closed: watch::Receiver<Option<Instant>>,
    limit: Duration,
) -> Option<Instant> {
    match tokio::time::timeout(limit, closed.wait_for(|v| v.is_some())).await {
        Ok(Ok(v)) => *v,
        _ => None,
    }
}

/// An HTTP/1 connection ready for one request.
#[derive(Debug)]
pub struct H1Conn {
    /// hyper's request sender for this connection.
    pub sender: http1::SendRequest<RequestBody>,
    /// Resolves when the connection task closed the socket.
    pub closed: watch::Receiver<Option<Instant>>,
    /// Remote address.
    pub peer: SocketAddr,
    /// tether's end of the connection.
    pub local: Option<SocketAddr>,
}

struct IdleH1 {
    conn: H1Conn,
    /// Past this, the upstream may close it at any moment: never reused.
    expires: Instant,
}

impl IdleH1 {
    /// Not closed (the upstream hung up while it was idle) and not old (the upstream may be
    /// about to: the stale keep-alive race).
    fn usable(&self, now: Instant) -> bool {
        !self.conn.sender.is_closed() && now < self.expires
    }
}

/// The shared HTTP/2 connection of an endpoint.
#[derive(Debug, Clone)]
pub struct H2Conn {
    /// hyper's request sender (clones share the connection).
    pub sender: http2::SendRequest<RequestBody>,
    /// Remote address.
    pub peer: SocketAddr,
    /// tether's end of the connection.
    pub local: Option<SocketAddr>,
}

/// Connections of one endpoint on one worker.
pub struct EndpointPool {
    idle: Mutex<Vec<IdleH1>>,
    h2: tokio::sync::Mutex<Option<H2Conn>>,
    max_idle: usize,
    idle_timeout: Duration,
    counts: Arc<ConnCounts>,
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("max_idle", &self.max_idle)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl EndpointPool {
    /// An empty pool.
    pub fn new(max_idle: usize, idle_timeout: Duration, counts: Arc<ConnCounts>) -> EndpointPool {
        EndpointPool {
            idle: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
            max_idle,
            idle_timeout,
            counts,
        }
    }

    /// Takes the most recently used idle HTTP/1 connection that is still open and fresh.
    pub fn take_h1(&self) -> Option<H1Conn> {
        self.take(false)
    }

    /// Like [`take_h1`](Self::take_h1), but only a connection that can take a request at once;
    /// one still finishing its previous exchange is left in the pool.
    pub fn take_h1_ready(&self) -> Option<H1Conn> {
        self.take(true)
    }

    fn take(&self, ready_only: bool) -> Option<H1Conn> {
        let mut idle = lock(&self.idle);
        let now = Instant::now();
        loop {
            let last = idle.last()?;
            let usable = last.usable(now);
            if usable && ready_only && !last.conn.sender.is_ready() {
                return None;
            }
            let c = idle.pop()?;
            self.counts.idle.fetch_sub(1, Ordering::Relaxed);
            if usable {
                return Some(c.conn);
            }
        }
    }

    /// Closes idle connections that expired or that the upstream closed, so that a pool no
    /// longer used does not keep its connections open (and counted) indefinitely.
    pub fn sweep(&self) {
        let mut idle = lock(&self.idle);
        let now = Instant::now();
        let before = idle.len();
        // Dropping a connection's sender ends its task, which closes the socket.
        idle.retain(|c| c.usable(now));
        let gone = before - idle.len();
        if gone > 0 {
            self.counts
                .idle
                .fetch_sub(i64::try_from(gone).unwrap_or(i64::MAX), Ordering::Relaxed);
        }
    }

    /// Returns a connection whose response ended cleanly. `upstream_keep_alive` is the idle
    /// timeout the upstream announced (`Keep-Alive: timeout=N`); the connection is kept for less
    /// than that, so tether never sends on a connection the upstream is about to close.
    pub fn put_h1(&self, conn: H1Conn, upstream_keep_alive: Option<Duration>) {
        if conn.sender.is_closed() || self.max_idle == 0 {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() >= self.max_idle {
            // Drop the oldest; its task closes the socket.
            idle.remove(0);
            self.counts.idle.fetch_sub(1, Ordering::Relaxed);
        }
        let mut keep = self.idle_timeout;
        if let Some(theirs) = upstream_keep_alive {
            // A second of margin covers clock granularity on both sides and the request's flight.
            keep = keep.min(theirs.saturating_sub(Duration::from_secs(1)));
        }
        if keep.is_zero() {
            return;
        }
        self.counts.idle.fetch_add(1, Ordering::Relaxed);
        idle.push(IdleH1 {
            conn,
            expires: Instant::now() + keep,
        });
    }

    /// The shared HTTP/2 connection slot; hold the guard while (re)connecting so that concurrent
    /// requests share one new connection instead of racing to open many.
    pub fn h2_slot(&self) -> &tokio::sync::Mutex<Option<H2Conn>> {
        &self.h2
    }
}

/// Parses the `timeout=N` parameter of a `Keep-Alive` response header (seconds).
pub fn keep_alive_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
    let v = headers.get(KEEP_ALIVE)?.to_str().ok()?;
    v.split(',').find_map(|p| {
        let (k, val) = p.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("timeout") {
            val.trim().parse::<u64>().ok().map(Duration::from_secs)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keep_alive_timeout() {
        let mut h = http::HeaderMap::new();
        assert_eq!(keep_alive_timeout(&h), None);
        h.insert(
            "keep-alive",
            http::HeaderValue::from_static("max=100, timeout=5"),
        );
        assert_eq!(keep_alive_timeout(&h), Some(Duration::from_secs(5)));
        h.insert("keep-alive", http::HeaderValue::from_static("timeout=abc"));
        assert_eq!(keep_alive_timeout(&h), None);
    }
}
