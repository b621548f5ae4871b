//! Upstream connections kept for reuse: an idle list of HTTP/1 connections and the shared
//! multiplexed HTTP/2 connections of each endpoint (one, and more while one has as many streams
//! open as `max_streams_per_connection` allows). Pools are per worker thread, so their locks are
//! never contended.
//!
//! LIFECYCLE (HTTP/1): connect → handshake → a task drives the connection → checked out for one
//! request → returned when the response body ended cleanly → ... A connection whose request was
//! abandoned is never returned: hyper closes it, the upstream sees EOF, and the task records the
//! instant the socket was closed (the end of cancellation propagation).
//!
//! RESTING: a connection left idle for [`REST_AFTER`] is rested. Its task ends and hands back
//! the transport (the socket, or the TLS session on it), still open; hyper's buffers and the task
//! are freed, so a pool that filled up in a burst costs little once the burst is over. The next
//! request that takes it checks that the upstream has not closed it (a non-blocking read of the
//! socket) and starts a new task on the same transport: the same connection for the upstream,
//! with no new handshake.
//!
//! An upstream's [`Lifetime`] ends a connection after so many requests or so long from its
//! opening: an HTTP/1 one is closed instead of pooled, an HTTP/2 one leaves the pool (its
//! streams in flight finish on it, then hyper closes it).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{ErrorKind, ProxyError, Stage};
use crate::lifetime::{Lifetime, Wear};
use crate::lock;
use crate::observe::metrics::ConnCounts;
use crate::proxy::request_body::RequestBody;
use crate::upstream::connect::UpstreamIo;

/// How long an idle HTTP/1 connection keeps its task and hyper's buffers before it rests with
/// only its transport (checked by the once-a-second sweep, so 1 to 2 s).
pub const REST_AFTER: Duration = Duration::from_secs(1);

/// How long closing a connection may wait for its shutdown (a TLS peer that reads nothing
/// cannot hold the task).
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(1);

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

/// Counts an upstream connection as open for as long as it is: its task runs or its socket rests.
#[derive(Debug)]
pub struct OpenConn(Arc<ConnCounts>);

impl OpenConn {
    /// Counts one more open connection.
    pub fn new(counts: Arc<ConnCounts>) -> OpenConn {
        counts.open.fetch_add(1, Ordering::Relaxed);
        OpenConn(counts)
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
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
    handoff: Arc<Handoff>,
}

impl H1Conn {
    /// For a connection made for an upgrade, once its request was answered `101`: the
    /// transport, when the connection's task has handed it over (`None` if the connection
    /// closed instead, or was not made for an upgrade).
    pub async fn switched(self) -> Option<Switched> {
        if !self.handoff.upgradable {
            return None;
        }
        let mut closed = self.closed;
        let _ = closed.wait_for(|v| v.is_some()).await;
        match std::mem::replace(&mut *lock(&self.handoff.state), HandoffState::Gone) {
            HandoffState::Switched(s) => Some(s),
            _ => None,
        }
    }
}

/// The transport of a connection whose request switched protocols: the socket (or TLS session),
/// the bytes hyper had read past the `101`, and the connection's place in the open count.
#[derive(Debug)]
pub struct Switched {
    /// The transport.
    pub io: UpstreamIo,
    /// Read past the `101` head: the new protocol's first bytes.
    pub read_ahead: Bytes,
    /// Counted as open until dropped.
    pub open: OpenConn,
}

/// Starts driving an HTTP/1 connection over `io` in a task of its own. `upgradable`: the
/// connection is made for a request asking to upgrade; on a `101` its transport goes to
/// whoever [takes the switch](H1Conn::switched), and it is never pooled.
pub fn start_h1(
    io: UpstreamIo,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    open: OpenConn,
    upgradable: bool,
) -> Result<H1Conn, ProxyError> {
    drive_h1(io, peer, local, open, upgradable, Wear::new())
}

fn drive_h1(
    io: UpstreamIo,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    open: OpenConn,
    upgradable: bool,
    wear: Wear,
) -> Result<H1Conn, ProxyError> {
    let failed = || ProxyError::upstream(Stage::Connect, ErrorKind::Protocol).with_target(peer);
    // hyper's handshake only builds the connection's state: it is ready at the first poll.
    let (sender, conn) = match ready_now(http1::Builder::new().handshake(TokioIo::new(io))) {
        Some(Ok(pair)) => pair,
        Some(Err(e)) => return Err(failed().with_source(e)),
        None => {
            return Err(failed().with_source(io::Error::other("handshake did not complete")));
        }
    };
    let (tx, closed) = watch::channel(None);
    let handoff = Arc::new(Handoff {
        rest: AtomicBool::new(false),
        upgradable,
        state: Mutex::new(HandoffState::Driving),
        born: wear.born,
        served: AtomicU32::new(wear.served),
    });
    let theirs = handoff.clone();
    tokio::spawn(async move {
        // Not hyper's own shutdown: a connection being rested keeps its socket open, and one
        // that switched protocols is handed over (hyper's own upgrade would be another
        // instance of its connection code in the binary, and a slower one for every request).
        if let Ok(parts) = conn.without_shutdown().await {
            let mut io = parts.io.into_inner();
            // Kept for the tunnel, which holds the connection from the 101 until it takes the
            // transport. When nobody else holds it (the request was answered without switching,
            // and the connection ended after that response), it is closed as any other.
            // (The connection's task runs on the worker that holds the connection: no race.)
            if theirs.upgradable && Arc::strong_count(&theirs) > 1 {
                *lock(&theirs.state) = HandoffState::Switched(Switched {
                    io,
                    read_ahead: parts.read_buf,
                    open,
                });
                let _ = tx.send(Some(Instant::now()));
                return;
            }
            if theirs.rest.load(Ordering::Acquire) && parts.read_buf.is_empty() && io.drained() {
                *lock(&theirs.state) = HandoffState::Rested(Rested { io, open });
                return;
            }
            // Closed as hyper would: FIN (after close_notify on TLS) after anything still
            // buffered.
            let _ = tokio::time::timeout(SHUTDOWN_LIMIT, io.shutdown()).await;
        }
        // hyper ends the connection after an abandoned exchange; the socket is closed by now.
        *lock(&theirs.state) = HandoffState::Gone;
        drop(open);
        let _ = tx.send(Some(Instant::now()));
    });
    Ok(H1Conn {
        sender,
        closed,
        peer,
        local,
        handoff,
    })
}

/// `f`'s output if it is ready at the first poll.
fn ready_now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Where a connection's task hands back its socket when the pool rests the connection.
#[derive(Debug)]
struct Handoff {
    /// Set by the pool before it drops the connection's sender.
    rest: AtomicBool,
    /// Made for an upgrade: the transport is kept for the tunnel when the task ends.
    upgradable: bool,
    state: Mutex<HandoffState>,
    /// When the connection was opened (kept here, with the connection's other shared state,
    /// rather than in every move of its handle).
    born: Instant,
    /// Exchanges it finished cleanly.
    served: AtomicU32,
}

#[derive(Debug)]
enum HandoffState {
    /// The task still drives the connection.
    Driving,
    /// The task ended and left the transport.
    Rested(Rested),
    /// The request switched protocols: the transport waits for its tunnel.
    Switched(Switched),
    /// The task ended and closed the socket (or it was taken).
    Gone,
}

#[derive(Debug)]
struct Rested {
    io: UpstreamIo,
    open: OpenConn,
}

impl Rested {
    /// Nothing to read and no EOF: the upstream still holds the connection open. Readiness is
    /// cached by tokio, so a quiet socket costs no system call. A byte read here (a TLS alert,
    /// or anything unasked for) leaves the connection unusable, and it is closed.
    fn alive(&self) -> bool {
        matches!(self.io.tcp().try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// A rested connection in the idle list.
#[derive(Debug)]
struct Resting {
    handoff: Arc<Handoff>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
}

impl Resting {
    fn usable(&self) -> bool {
        match &*lock(&self.handoff.state) {
            HandoffState::Driving => true,
            HandoffState::Rested(r) => r.alive(),
            HandoffState::Switched(_) | HandoffState::Gone => false,
        }
    }

    /// A new task on the rested socket, if the upstream has not closed it.
    fn wake(self) -> Option<H1Conn> {
        let state = std::mem::replace(&mut *lock(&self.handoff.state), HandoffState::Gone);
        let HandoffState::Rested(r) = state else {
            return None;
        };
        if !r.alive() {
            return None;
        }
        let wear = Wear {
            born: self.handoff.born,
            served: self.handoff.served.load(Ordering::Relaxed),
        };
        drive_h1(r.io, self.peer, self.local, r.open, false, wear).ok()
    }
}

#[derive(Debug)]
enum IdleConn {
    Live(H1Conn),
    Resting(Resting),
}

struct IdleH1 {
    conn: IdleConn,
    /// When it was returned.
    since: Instant,
    /// Past this, the upstream may close it at any moment: never reused.
    expires: Instant,
}

impl IdleH1 {
    /// Not closed (the upstream hung up while it was idle) and not old (the upstream may be
    /// about to: the stale keep-alive race).
    fn usable(&self, now: Instant) -> bool {
        now < self.expires
            && match &self.conn {
                IdleConn::Live(c) => !c.sender.is_closed(),
                IdleConn::Resting(r) => r.usable(),
            }
    }

    /// Rests a live connection idle since before `cutoff` that can take a request now; true if
    /// it did.
    fn maybe_rest(&mut self, cutoff: Instant) -> bool {
        let IdleConn::Live(c) = &self.conn else {
            return false;
        };
        if self.since > cutoff || !c.sender.is_ready() {
            return false;
        }
        c.handoff.rest.store(true, Ordering::Release);
        let resting = Resting {
            handoff: c.handoff.clone(),
            peer: c.peer,
            local: c.local,
        };
        // Dropping the sender ends the task, which hands the socket back.
        self.conn = IdleConn::Resting(resting);
        true
    }
}

/// A shared HTTP/2 connection of an endpoint.
#[derive(Debug, Clone)]
pub struct H2Conn {
    /// Streams open on it now, shared by its handles.
    pub streams: Arc<Streams>,
    /// hyper's request sender (clones share the connection).
    pub sender: http2::SendRequest<RequestBody>,
    /// Remote address.
    pub peer: SocketAddr,
    /// tether's end of the connection.
    pub local: Option<SocketAddr>,
    /// Set when TLS ended the connection after the handshake (a client certificate the
    /// upstream refused): its streams see only that the connection ended.
    pub tls_failed: Arc<std::sync::atomic::AtomicBool>,
    /// When it was opened.
    pub born: Instant,
}

/// The streams of one HTTP/2 connection.
#[derive(Debug)]
pub struct Streams {
    open: AtomicUsize,
    started: AtomicU32,
    /// How many the upstream allows at once (its `SETTINGS_MAX_CONCURRENT_STREAMS`), as the
    /// task driving the connection last saw it.
    allowed: AtomicUsize,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            open: AtomicUsize::new(0),
            started: AtomicU32::new(0),
            allowed: AtomicUsize::new(usize::MAX),
        }
    }
}

impl Streams {
    /// How many are open.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether another may open, with at most `max` at once on a connection: neither `max` nor
    /// the upstream's own limit reached. Beyond the upstream's limit a request would wait inside
    /// the connection for another stream to end, unseen by timeouts, balancing and queues.
    fn has_room(&self, max: usize) -> bool {
        self.open() < max.min(self.allowed.load(Ordering::Relaxed))
    }

    /// The upstream's limit on streams at once changed (it sent `SETTINGS`).
    pub fn set_allowed(&self, n: usize) {
        if self.allowed.load(Ordering::Relaxed) != n {
            self.allowed.store(n, Ordering::Relaxed);
        }
    }

    /// How many were started on it.
    fn started(&self) -> u32 {
        self.started.load(Ordering::Relaxed)
    }
}

/// One stream's place on its connection, given back when dropped: when the request's exchange
/// ended, failed, or was reset.
#[derive(Debug)]
pub struct StreamPlace(Arc<Streams>);

impl Drop for StreamPlace {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl H2Conn {
    /// A place for one more stream, whatever the count.
    pub fn place(&self) -> StreamPlace {
        self.streams.open.fetch_add(1, Ordering::Relaxed);
        self.streams.started.fetch_add(1, Ordering::Relaxed);
        StreamPlace(self.streams.clone())
    }
}

/// The HTTP/2 connections of one endpoint on one worker, the preferred first. Streams past a
/// server's `SETTINGS_MAX_CONCURRENT_STREAMS` would wait inside the connection, unseen by
/// timeouts and balancing alike, so a connection takes at most `max` streams (set at or below
/// the upstream's limit) and one more connection is opened when all are full. Connections beyond
/// the first are closed once idle for the pool's `idle_timeout`.
#[derive(Debug, Default)]
pub struct H2Conns {
    conns: Vec<PooledH2>,
}

#[derive(Debug)]
struct PooledH2 {
    conn: H2Conn,
    /// When a look found it without streams; `None` while in use.
    idle_since: Option<Instant>,
}

impl H2Conns {
    /// A place on the first open connection with fewer than `max` streams, or `None` when every
    /// connection is full (or there is none). Drops closed connections, those whose `life` is
    /// spent (their streams in flight go on), and those beyond the first idle for longer than
    /// `idle_timeout`. Places are taken only under the endpoint's lock, so no two requests both
    /// take the last one.
    pub fn take(
        &mut self,
        max: usize,
        idle_timeout: Duration,
        life: Lifetime,
    ) -> Option<(H2Conn, StreamPlace)> {
        let usable = |c: &H2Conn| {
            !c.sender.is_closed() && !life.spent(u64::from(c.streams.started()), c.born)
        };
        // The common case: one connection, with room.
        if let [only] = self.conns.as_slice()
            && only.conn.streams.has_room(max)
            && usable(&only.conn)
        {
            let c = only.conn.clone();
            let place = c.place();
            return Some((c, place));
        }
        self.conns.retain(|p| usable(&p.conn));
        let now = Instant::now();
        let mut chosen = None;
        for (i, p) in self.conns.iter_mut().enumerate() {
            let open = p.conn.streams.open();
            if chosen.is_none() && p.conn.streams.has_room(max) {
                chosen = Some(i);
                p.idle_since = None;
            } else if open == 0 {
                p.idle_since.get_or_insert(now);
            } else {
                p.idle_since = None;
            }
        }
        let mut i = 0;
        self.conns.retain(|p| {
            let keep = i == 0
                || chosen == Some(i)
                || p.idle_since
                    .is_none_or(|s| now.saturating_duration_since(s) < idle_timeout);
            i += 1;
            keep
        });
        // Connections before the chosen one are never dropped (only those beyond the first that
        // are idle, and an idle one has room, so it would have been chosen).
        let c = self.conns.get(chosen?)?.conn.clone();
        let place = c.place();
        Some((c, place))
    }

    /// Adds a new connection, preferred from now on, with a place taken on it.
    pub fn add(&mut self, conn: H2Conn) -> StreamPlace {
        let place = conn.place();
        self.conns.insert(
            0,
            PooledH2 {
                conn,
                idle_since: None,
            },
        );
        place
    }
}

/// Connections of one endpoint on one worker.
pub struct EndpointPool {
    idle: Mutex<Vec<IdleH1>>,
    h2: tokio::sync::Mutex<H2Conns>,
    max_idle: usize,
    idle_timeout: Duration,
    life: Lifetime,
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
    pub fn new(
        max_idle: usize,
        idle_timeout: Duration,
        life: Lifetime,
        counts: Arc<ConnCounts>,
    ) -> EndpointPool {
        EndpointPool {
            idle: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(H2Conns::default()),
            max_idle,
            idle_timeout,
            life,
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
        loop {
            let entry = {
                let mut idle = lock(&self.idle);
                let now = Instant::now();
                let last = idle.last()?;
                let usable = last.usable(now);
                if usable
                    && ready_only
                    && let IdleConn::Live(c) = &last.conn
                    && !c.sender.is_ready()
                {
                    return None;
                }
                let e = idle.pop()?;
                self.uncount(&e);
                if !usable {
                    continue;
                }
                e
            };
            match entry.conn {
                IdleConn::Live(c) => return Some(c),
                // Woken outside the lock: it starts a task.
                IdleConn::Resting(r) => {
                    if let Some(c) = r.wake() {
                        return Some(c);
                    }
                }
            }
        }
    }

    /// Closes idle connections that expired or that the upstream closed, so that a pool no
    /// longer used does not keep its connections open (and counted) indefinitely, and rests
    /// those idle for [`REST_AFTER`].
    pub fn sweep(&self) {
        let mut idle = lock(&self.idle);
        let now = Instant::now();
        // Dropping a connection's sender ends its task, which closes the socket.
        idle.retain(|c| {
            let keep = c.usable(now);
            if !keep {
                self.uncount(c);
            }
            keep
        });
        if let Some(cutoff) = now.checked_sub(REST_AFTER) {
            for c in idle.iter_mut() {
                if c.maybe_rest(cutoff) {
                    self.counts.resting.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Takes `entry`, which left the idle list, out of the gauges.
    fn uncount(&self, entry: &IdleH1) {
        self.counts.idle.fetch_sub(1, Ordering::Relaxed);
        if matches!(entry.conn, IdleConn::Resting(_)) {
            self.counts.resting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Returns a connection whose response ended cleanly. `upstream_keep_alive` is the idle
    /// timeout the upstream announced (`Keep-Alive: timeout=N`); the connection is kept for less
    /// than that, so tether never sends on a connection the upstream is about to close. One
    /// that has done its [`Lifetime`]'s share is closed instead.
    pub fn put_h1(&self, conn: H1Conn, upstream_keep_alive: Option<Duration>) {
        let now = Instant::now();
        let Some(expires) = self.keep_until(&conn, upstream_keep_alive, now) else {
            return;
        };
        let mut idle = lock(&self.idle);
        if idle.len() >= self.max_idle {
            // Drop the oldest; its task closes the socket.
            self.uncount(&idle.remove(0));
        }
        self.counts.idle.fetch_add(1, Ordering::Relaxed);
        idle.push(IdleH1 {
            conn: IdleConn::Live(conn),
            since: now,
            expires,
        });
    }

    /// Counts the exchange `conn` just finished cleanly; until when it may be used again, or
    /// `None` when it may not be kept at all (closed, spent, or the pool keeps nothing).
    pub fn keep_until(
        &self,
        conn: &H1Conn,
        upstream_keep_alive: Option<Duration>,
        now: Instant,
    ) -> Option<Instant> {
        let h = &conn.handoff;
        let served = h.served.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if conn.sender.is_closed()
            || self.max_idle == 0
            || self.life.spent(u64::from(served), h.born)
        {
            return None;
        }
        let mut keep = self.idle_timeout;
        if let Some(theirs) = upstream_keep_alive {
            // A second of margin covers clock granularity on both sides and the request's flight.
            keep = keep.min(theirs.saturating_sub(Duration::from_secs(1)));
        }
        if keep.is_zero() {
            return None;
        }
        let mut expires = now + keep;
        if let Some(age) = self.life.max_age {
            expires = expires.min(h.born + age);
        }
        Some(expires)
    }

    /// The shared HTTP/2 connections; hold the guard while connecting so that concurrent
    /// requests share one new connection instead of racing to open many.
    pub fn h2_slot(&self) -> &tokio::sync::Mutex<H2Conns> {
        &self.h2
    }

    /// How long a pooled connection may stay idle.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// How much and how long a connection is used.
    pub fn lifetime(&self) -> Lifetime {
        self.life
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
