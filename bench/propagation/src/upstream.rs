//! The upstreams the gateway forwards to. A request for `/slow/<id>` is a long job: the upstream
//! reports [`Event::Started`], then watches for the abort and reports what it saw and when in
//! [`Event::Done`]. If the job runs its full length it answers and counts as completed: a
//! cancellation that did not arrive. `/stream/<id>` is the same job behind a response that has
//! started: the head and a first chunk ([`FIRST_CHUNK`]) go out before it reports started, the
//! rest only at the job's end.

/// The first body chunk of a `/stream/<id>` response.
pub const FIRST_CHUNK: &[u8] = b"data: first\n\n";

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// The protocol an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HTTP/1.1, cleartext.
    H1,
    /// HTTP/2 with prior knowledge, cleartext.
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2Tls,
}

impl Kind {
    /// Every upstream kind, in report order.
    pub const ALL: [Kind; 3] = [Kind::H1, Kind::H2c, Kind::H2Tls];

    /// The label used in the report.
    pub fn label(self) -> &'static str {
        match self {
            Kind::H1 => "h1",
            Kind::H2c => "h2c",
            Kind::H2Tls => "h2+TLS",
        }
    }
}

/// What the upstream saw end a slow job.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seen {
    /// HTTP/1.1: `read()` returned 0 (the gateway closed the connection with FIN).
    Eof,
    /// HTTP/1.1: `read()` failed (typically a reset).
    ReadError(io::ErrorKind),
    /// HTTP/2: the stream was reset with this reason code (`h2::Reason` is not `Ord`).
    Reset(u32),
    /// HTTP/2: `poll_reset` failed (connection error, GOAWAY).
    StreamError(String),
    /// Nothing arrived: the job ran to its end and answered.
    Completed,
}

impl Seen {
    /// Whether this is the abort the gateway must produce for this upstream kind.
    pub fn is_expected(&self) -> bool {
        matches!(self, Seen::Eof | Seen::ReadError(_))
            || *self == Seen::Reset(h2::Reason::CANCEL.into())
    }
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seen::Eof => f.write_str("EOF"),
            Seen::ReadError(kind) => write!(f, "read error {kind:?}"),
            Seen::Reset(code) => write!(f, "RST_STREAM({:?})", h2::Reason::from(*code)),
            Seen::StreamError(e) => write!(f, "stream error: {e}"),
            Seen::Completed => f.write_str("completed"),
        }
    }
}

/// Progress of one slow job, sent to the bench client.
#[derive(Debug)]
pub enum Event {
    /// The upstream has the request and started working.
    Started {
        /// Iteration id from the path.
        id: u64,
    },
    /// The job ended.
    Done {
        /// Iteration id from the path.
        id: u64,
        /// When the upstream observed the end (taken as soon as the wait returned).
        at: Instant,
        /// How it ended.
        seen: Seen,
    },
}

/// Counters an upstream keeps across its connections.
#[derive(Debug, Default)]
pub struct Counters {
    /// TCP connections accepted.
    pub accepted: AtomicU64,
    /// Slow jobs that ran to completion.
    pub completed: AtomicU64,
}

/// A running upstream; dropping it stops it and every connection it serves.
#[derive(Debug)]
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Clone)]
struct Shared {
    job: Duration,
    events: UnboundedSender<Event>,
    counters: Arc<Counters>,
}

/// Starts an upstream of `kind` on 127.0.0.1 (port 0). `tls` is required for [`Kind::H2Tls`].
pub async fn start(
    kind: Kind,
    tls: Option<TlsAcceptor>,
    job: Duration,
    events: UnboundedSender<Event>,
) -> io::Result<Upstream> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    let shared = Shared {
        job,
        events,
        counters: counters.clone(),
    };
    let task = tokio::spawn(accept_loop(listener, kind, tls, shared));
    Ok(Upstream {
        addr,
        counters,
        task,
    })
}

async fn accept_loop(listener: TcpListener, kind: Kind, tls: Option<TlsAcceptor>, shared: Shared) {
    // Owned here so that dropping the upstream aborts every connection with it.
    let mut conns = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        match (kind, &tls) {
            (Kind::H1, _) => {
                conns.spawn(serve_h1(tcp, shared));
            }
            (Kind::H2c, _) => {
                conns.spawn(serve_h2(tcp, shared));
            }
            (Kind::H2Tls, Some(acceptor)) => {
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    if let Ok(io) = acceptor.accept(tcp).await {
                        serve_h2(io, shared).await;
                    }
                });
            }
            (Kind::H2Tls, None) => return,
        }
        while conns.try_join_next().is_some() {}
    }
}

/// The iteration id in `/slow/<id>` or `/stream/<id>` and whether the response streams, or
/// `None` for any other path.
fn job_of(path: &str) -> Option<(u64, bool)> {
    if let Some(id) = path.strip_prefix("/stream/") {
        return Some((id.parse().ok()?, true));
    }
    Some((path.strip_prefix("/slow/")?.parse().ok()?, false))
}

async fn serve_h1(mut tcp: TcpStream, shared: Shared) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let Ok(Some(head)) = read_head(&mut tcp, &mut buf).await else {
            return;
        };
        let path = head.split(' ').nth(1).unwrap_or("");
        let Some((id, streaming)) = job_of(path) else {
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if tcp.write_all(ok).await.is_err() {
                return;
            }
            continue;
        };
        if streaming {
            let mut start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            start.extend_from_slice(format!("{:x}\r\n", FIRST_CHUNK.len()).as_bytes());
            start.extend_from_slice(FIRST_CHUNK);
            start.extend_from_slice(b"\r\n");
            if tcp.write_all(&start).await.is_err() {
                return;
            }
        }
        let _ = shared.events.send(Event::Started { id });
        let (seen, at) = watch_h1(&mut tcp, shared.job).await;
        if seen == Seen::Completed {
            shared.counters.completed.fetch_add(1, Ordering::Relaxed);
            let end: &[u8] = if streaming {
                b"4\r\ndone\r\n0\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone"
            };
            let _ = tcp.write_all(end).await;
        }
        let _ = shared.events.send(Event::Done { id, at, seen });
        // A cancelled connection is dead; a completed one is closed too, to keep counting simple.
        return;
    }
}

/// Reads one request head (up to the blank line) into a string; leftover bytes stay in `buf`.
/// `None` on a clean EOF between requests.
async fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<String>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits for the connection to end (EOF or error) or the job to finish, whichever comes first.
async fn watch_h1(tcp: &mut TcpStream, job: Duration) -> (Seen, Instant) {
    let finished = tokio::time::sleep(job);
    tokio::pin!(finished);
    let mut scratch = [0u8; 1024];
    loop {
        tokio::select! {
            // The abort is what is measured: look at the socket first.
            biased;
            r = tcp.read(&mut scratch) => {
                let at = Instant::now();
                match r {
                    Ok(0) => return (Seen::Eof, at),
                    Err(e) => return (Seen::ReadError(e.kind()), at),
                    // Stray bytes (a body the gateway forwarded): keep watching.
                    Ok(_) => {}
                }
            }
            () = &mut finished => return (Seen::Completed, Instant::now()),
        }
    }
}

async fn serve_h2<T>(io: T, shared: Shared)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    let mut streams = JoinSet::new();
    // accept() drives the whole connection, resets included: keep calling it.
    while let Some(Ok((req, respond))) = conn.accept().await {
        streams.spawn(serve_h2_stream(req, respond, shared.clone()));
        while streams.try_join_next().is_some() {}
    }
    // Let the streams report what the connection's end looked like to them.
    while streams.join_next().await.is_some() {}
}

async fn serve_h2_stream(
    req: http::Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    shared: Shared,
) {
    let Some((id, streaming)) = job_of(req.uri().path()) else {
        if let Ok(mut body) = respond.send_response(http::Response::new(()), false) {
            let _ = body.send_data(Bytes::from_static(b"ok"), true);
        }
        return;
    };
    // Hold the receiving half for the whole job so the stream stays open on our side.
    let _body = req.into_body();
    let mut sending = None;
    if streaming {
        let Ok(mut body) = respond.send_response(http::Response::new(()), false) else {
            return;
        };
        if body
            .send_data(Bytes::from_static(FIRST_CHUNK), false)
            .is_err()
        {
            return;
        }
        sending = Some(body);
    }
    let _ = shared.events.send(Event::Started { id });
    let (seen, at) = {
        // Once the response has started, its body's handle is the one told of a reset.
        let reset = poll_fn(|cx| match sending.as_mut() {
            Some(body) => body.poll_reset(cx),
            None => respond.poll_reset(cx),
        });
        tokio::select! {
            biased;
            r = reset => {
                let at = Instant::now();
                match r {
                    Ok(reason) => (Seen::Reset(reason.into()), at),
                    Err(e) => (Seen::StreamError(e.to_string()), at),
                }
            }
            () = tokio::time::sleep(shared.job) => (Seen::Completed, Instant::now()),
        }
    };
    if seen == Seen::Completed {
        shared.counters.completed.fetch_add(1, Ordering::Relaxed);
        match sending.as_mut() {
            Some(body) => {
                let _ = body.send_data(Bytes::from_static(b"done"), true);
            }
            None => {
                if let Ok(mut body) = respond.send_response(http::Response::new(()), false) {
                    let _ = body.send_data(Bytes::from_static(b"done"), true);
                }
            }
        }
    }
    let _ = shared.events.send(Event::Done { id, at, seen });
}
