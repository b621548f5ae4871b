//! What the test upstreams saw, in order, with timestamps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// One observation by an upstream.
#[derive(Debug, Clone)]
pub struct Event {
    /// Connection number on this upstream, from 1 in accept order.
    pub conn: u64,
    /// HTTP/1: request number on the connection (from 1; 0 for connection-level events).
    /// HTTP/2: the stream id (0 for connection-level events).
    pub stream: u32,
    /// Request path for request-level events, empty otherwise.
    pub path: String,
    /// What happened.
    pub kind: EventKind,
    /// When it was seen.
    pub at: Instant,
}

/// The observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A TCP connection was accepted.
    Accepted,
    /// A request head arrived.
    RequestStarted {
        /// Method.
        method: String,
        /// Header names (lowercase) and values, in wire order.
        headers: Vec<(String, String)>,
    },
    /// The request body arrived in full (its framing completed).
    BodyComplete {
        /// Body bytes.
        len: u64,
        /// [`crate::Checksum`] of the body.
        checksum: u64,
    },
    /// The request body ended abnormally (connection closed or stream reset mid-body).
    BodyAborted {
        /// Body bytes received before the end.
        len: u64,
    },
    /// The handler ran its behaviour to the end.
    HandlerCompleted,
    /// The handler was stopped because the peer went away.
    HandlerCancelled,
    /// HTTP/1: a read returned 0 (the peer's FIN).
    Eof,
    /// HTTP/1: a read or write failed with ECONNRESET / EPIPE (the peer's RST).
    Reset,
    /// HTTP/2: the peer reset this stream (RST_STREAM with this reason).
    StreamReset {
        /// The reason in the peer's RST_STREAM.
        reason: h2::Reason,
    },
    /// HTTP/2: the stream failed with a connection-level error (GOAWAY, TCP loss, ...).
    StreamError {
        /// The error text.
        message: String,
    },
    /// The connection ended (for HTTP/2: the connection task returned).
    ConnectionClosed,
}

impl EventKind {
    /// True for the events that mean "the peer closed or reset the HTTP/1 connection".
    pub fn is_h1_close(&self) -> bool {
        matches!(self, EventKind::Eof | EventKind::Reset)
    }
}

#[derive(Debug)]
struct Inner {
    events: Mutex<Vec<Event>>,
    version: watch::Sender<u64>,
    accepted: AtomicU64,
}

/// A shared, append-only event log with waiting.
#[derive(Debug, Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLog {
    /// An empty log.
    pub fn new() -> Self {
        let (version, _) = watch::channel(0);
        EventLog {
            inner: Arc::new(Inner {
                events: Mutex::new(Vec::new()),
                version,
                accepted: AtomicU64::new(0),
            }),
        }
    }

    /// Registers a new connection and returns its number.
    pub(crate) fn accept(&self) -> u64 {
        let conn = self.inner.accepted.fetch_add(1, Ordering::SeqCst) + 1;
        self.push(conn, 0, "", EventKind::Accepted);
        conn
    }

    /// Appends an event stamped now.
    pub(crate) fn push(&self, conn: u64, stream: u32, path: &str, kind: EventKind) {
        let ev = Event {
            conn,
            stream,
            path: path.to_owned(),
            kind,
            at: Instant::now(),
        };
        match self.inner.events.lock() {
            Ok(mut v) => v.push(ev),
            Err(p) => p.into_inner().push(ev),
        }
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// A copy of every event so far.
    pub fn events(&self) -> Vec<Event> {
        match self.inner.events.lock() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The first event matching `pred` so far.
    pub fn find(&self, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        self.events().into_iter().find(|e| pred(e))
    }

    /// True if an event matching `pred` was seen.
    pub fn any(&self, pred: impl Fn(&Event) -> bool) -> bool {
        self.find(pred).is_some()
    }

    /// Waits up to `timeout` for an event matching `pred` (one already logged counts).
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Option<Event> {
        let mut rx = self.inner.version.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(e) = self.find(&pred) {
                return Some(e);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// Waits for a request to `path` to start and returns its event.
    pub async fn wait_request(&self, path: &str, timeout: Duration) -> Option<Event> {
        self.wait_for(timeout, |e| {
            e.path == path && matches!(e.kind, EventKind::RequestStarted { .. })
        })
        .await
    }

    /// Events of one connection.
    pub fn of_conn(&self, conn: u64) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.conn == conn)
            .collect()
    }

    /// Request heads seen for `path`: (method, headers).
    pub fn requests(&self, path: &str) -> Vec<(String, Vec<(String, String)>)> {
        self.events()
            .into_iter()
            .filter(|e| e.path == path)
            .filter_map(|e| match e.kind {
                EventKind::RequestStarted { method, headers } => Some((method, headers)),
                _ => None,
            })
            .collect()
    }

    /// The length of every request body received whole, in order.
    pub fn body_lengths(&self) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::BodyComplete { len, .. } => Some(len),
                _ => None,
            })
            .collect()
    }
}
