//! What a test upstream does with a request. The same [`Behavior`] drives the HTTP/1 and the
//! HTTP/2 upstream; each one reads the whole request body first (reporting
//! [`EventKind::BodyComplete`](crate::EventKind::BodyComplete) or `BodyAborted`), then plays the
//! behaviour while watching for the peer going away.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// A complete response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Extra headers (the upstream adds framing headers itself).
    pub headers: Vec<(String, String)>,
    /// Body (not sent for HEAD, 204 and 304).
    pub body: Bytes,
    /// Trailers; HTTP/2 only (the HTTP/1 upstream ignores them).
    pub trailers: Vec<(String, String)>,
}

impl Reply {
    /// A response with this status and body.
    pub fn new(status: u16, body: impl Into<Bytes>) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
            trailers: Vec::new(),
        }
    }

    /// 200 with this body.
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Reply::new(200, body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds a trailer (HTTP/2 only).
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// How a broken response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// HTTP/1: close the TCP connection (FIN). HTTP/2: close the whole TCP connection (FIN).
    Fin,
    /// HTTP/1: reset the TCP connection (linger 0). HTTP/2: reset the whole TCP connection.
    Rst,
    /// HTTP/2: RST_STREAM with this reason. HTTP/1: like [`Ending::Rst`].
    StreamReset(h2::Reason),
    /// HTTP/2: GOAWAY with this reason, then close. HTTP/1: like [`Ending::Fin`].
    GoAway(h2::Reason),
}

/// What the upstream does once the request body has been read.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Answer at once.
    Respond(Reply),
    /// Hold the response for `delay`, then answer (stopped early if the peer leaves).
    Stall {
        /// How long to hold.
        delay: Duration,
        /// The answer after that.
        reply: Reply,
    },
    /// 200, then `count` body chunks of `chunk`, `interval` apart (HTTP/1: chunked encoding).
    Stream {
        /// One chunk.
        chunk: Bytes,
        /// How many.
        count: usize,
        /// Pause before each chunk after the first.
        interval: Duration,
    },
    /// 200 with a `content-length: len` body of [`crate::pattern`] bytes, written as fast as the
    /// peer reads.
    Download {
        /// Body length.
        len: u64,
    },
    /// 200 with body `"<len> <checksum>"` of the request body.
    Summary,
    /// Send the head (with `content-length` when `content_length` is set, else chunked / no
    /// length), then `sent`, then break the response as `ending` says.
    Truncate {
        /// Declared length, if any.
        content_length: Option<u64>,
        /// Body bytes actually sent.
        sent: Bytes,
        /// How to break off.
        ending: Ending,
    },
    /// Break off before any response header.
    CloseBeforeHeaders(Ending),
    /// Never answer; wait for the peer to leave.
    Never,
}

impl Behavior {
    /// 200 with this body.
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Behavior::Respond(Reply::ok(body))
    }

    /// Hold for `ms` milliseconds, then 200 with this body.
    pub fn stall_ms(ms: u64, body: impl Into<Bytes>) -> Self {
        Behavior::Stall {
            delay: Duration::from_millis(ms),
            reply: Reply::ok(body),
        }
    }

    /// `count` chunks of `chunk`, `interval_ms` apart.
    pub fn stream(chunk: impl Into<Bytes>, count: usize, interval_ms: u64) -> Self {
        Behavior::Stream {
            chunk: chunk.into(),
            count,
            interval: Duration::from_millis(interval_ms),
        }
    }
}

/// The request as the behaviour chooser sees it.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// Method.
    pub method: String,
    /// Path and query as sent (HTTP/2: the `:path`).
    pub target: String,
    /// Path without the query.
    pub path: String,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
}

impl RequestInfo {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Chooses the behaviour for each request.
pub type Script = Arc<dyn Fn(&RequestInfo) -> Behavior + Send + Sync>;

/// A script from a table of path → behaviour (exact path match), 404 for anything else.
pub fn routes(table: Vec<(&str, Behavior)>) -> Script {
    let table: Vec<(String, Behavior)> =
        table.into_iter().map(|(p, b)| (p.to_owned(), b)).collect();
    Arc::new(move |req: &RequestInfo| {
        table
            .iter()
            .find(|(p, _)| *p == req.path)
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| Behavior::Respond(Reply::new(404, "no such path\n")))
    })
}

/// Wraps a closure as a [`Script`].
pub fn script(f: impl Fn(&RequestInfo) -> Behavior + Send + Sync + 'static) -> Script {
    Arc::new(f)
}
