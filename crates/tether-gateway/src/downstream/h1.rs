//! HTTP/1 downstream: hyper's server with `half_close(true)` so that tether, not hyper, decides
//! what a client FIN means (per route), and the disconnect watcher so that a client leaving is seen
//! even while hyper is not reading (unread request body, pipelined bytes).
//!
//! An idle plain-TCP keep-alive connection is *parked*: hyper's connection keeps an 8 KiB read and
//! an 8 KiB write buffer, its service and tether's per-connection state for as long as the
//! connection lives, so once nothing is in flight and the client has sent nothing for the
//! listener's `park_idle_after` (default [`PARK_AFTER`]), the hyper connection is closed without
//! touching the socket (`graceful_shutdown` closes an idle hyper connection at once), the task ends
//! and the socket moves to the worker's [`Parking`](super::parking::Parking), with no task of its
//! own. The next bytes from the client bring up a new task and a fresh hyper connection; bytes
//! hyper had read ahead are replayed to it first (such a connection is not parked). The delay keeps
//! a busy connection from being rebuilt per request. TLS connections are not parked (the TLS
//! session state would have to be kept anyway).
//!
//! LIFECYCLE (plain TCP): active (hyper connection, cancellation state, disconnect watcher) →
//! nothing in flight and nothing read for `park_idle_after` → parked (socket in the worker's
//! parking) → client bytes: active again, in a new task | FIN or RST, the idle timeout
//! (`header_read_timeout`, counted from when the connection became idle) or shutdown: closed at
//! once.

use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tether::DisconnectWatcher;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Peer;
use super::gate::Gate;
use super::head_timeout::HeadWatch;
use super::probe::{self, Activity, GuardedBody, ProbeSocket};
use crate::cancel::{ConnCancel, DownstreamProtocol};
use crate::listen::{ConfigSource, ConnPermit, ListenerShared, Worker};
use crate::proxy;

/// How long a plain-TCP connection must be idle (nothing in flight, nothing read) before it is
/// parked, unless the listener's `park_idle_after` says otherwise. Parking and coming back cost about as much CPU as a request (a new hyper connection,
/// the socket moved between epoll sets, the watcher made again): long enough that a client
/// sending a request every few hundred milliseconds is not parked between two of them. Not
/// longer: after a burst of new connections, more of them would hold hyper's buffers at once,
/// and the memory freed when they park would be more fragmented.
pub const PARK_AFTER: Duration = Duration::from_millis(500);

/// What a connection's sessions share.
#[derive(Clone, Copy)]
struct Downstream<'a> {
    worker: &'a Arc<Worker>,
    listener: &'a Arc<ListenerShared>,
    /// Each request's configuration: a reload applies to the next request on the connection.
    source: &'a ConfigSource,
    peer: &'a Peer,
    stop: &'a CancellationToken,
}

/// Serves an HTTP/1 connection over any transport (TLS), without parking.
#[allow(
    clippy::too_many_arguments,
    reason = "the connection's parts, each used once"
)]
pub async fn serve<I>(
    worker: Arc<Worker>,
    listener: Arc<ListenerShared>,
    source: ConfigSource,
    io: I,
    peer: Peer,
    watcher: Option<DisconnectWatcher>,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let down = Downstream {
        worker: &worker,
        listener: &listener,
        source: &source,
        peer: &peer,
        stop: &stop,
    };
    let _ = session(
        down,
        io,
        watcher,
        Activity::new(),
        None,
        None,
        crate::lifetime::Wear::new(),
    )
    .await;
}

/// An accepted plain-TCP HTTP/1 connection's parts: what it keeps while parked.
#[derive(Debug)]
pub struct TcpConn {
    /// The worker and listener settings the connection was accepted under.
    pub worker: Arc<Worker>,
    /// The listener's settings.
    pub listener: Arc<ListenerShared>,
    /// Each request's configuration.
    pub source: ConfigSource,
    /// Where the connection came from.
    pub peer: Peer,
    /// Gateway shutdown.
    pub stop: CancellationToken,
    /// Held to the connection's end.
    pub permit: ConnPermit,
    /// Its use so far.
    pub worn: crate::lifetime::Wear,
}

/// Serves a plain-TCP HTTP/1 connection until it ends or parks. `head_by` is when the first
/// request head is due, for a connection coming back from being parked.
pub async fn serve_tcp(mut conn: TcpConn, mut tcp: TcpStream, mut head_by: Option<Instant>) {
    let mut replay = Bytes::new();
    loop {
        let park_after = conn.listener.limits.park_idle_after;
        let down = Downstream {
            worker: &conn.worker,
            listener: &conn.listener,
            source: &conn.source,
            peer: &conn.peer,
            stop: &conn.stop,
        };
        let watcher = DisconnectWatcher::new(&tcp).ok();
        let activity = Activity::new();
        let io = TokioIo::new(SessionIo {
            tcp,
            replay,
            activity: activity.clone(),
        });
        let Some(parked) =
            session(down, io, watcher, activity, park_after, head_by, conn.worn).await
        else {
            return;
        };
        conn.worn.served = parked.served;
        let deadline = parked.idle_since + conn.listener.limits.header_read_timeout;
        let (socket, read_ahead) = parked.take_back();
        head_by = Some(deadline);
        // A partial request read ahead: serve it at once (hyper waits for the rest itself).
        if !read_ahead.is_empty() {
            tcp = socket;
            replay = read_ahead;
            continue;
        }
        let parking = conn.worker.parking.clone();
        return parking.park(conn, socket, deadline);
    }
}

/// A session that ended by parking: the socket and what hyper had read ahead.
struct Parked<I> {
    io: I,
    read_ahead: Bytes,
    idle_since: Instant,
    /// Requests the connection has carried, this session's included.
    served: u32,
}

impl Parked<TokioIo<SessionIo>> {
    /// The socket and the bytes to replay to the next session: what hyper had read ahead, then
    /// what it had not yet taken of the previous replay. Everything else is dropped here, and
    /// the bytes are copied out: a slice of hyper's read buffer, even an empty one, would keep
    /// the whole buffer allocated while the connection is parked.
    fn take_back(self) -> (TcpStream, Bytes) {
        let SessionIo {
            tcp,
            replay: unread,
            activity: _,
        } = self.io.into_inner();
        if self.read_ahead.is_empty() && unread.is_empty() {
            return (tcp, Bytes::new());
        }
        let mut b = BytesMut::with_capacity(self.read_ahead.len() + unread.len());
        b.extend_from_slice(&self.read_ahead);
        b.extend_from_slice(&unread);
        (tcp, b.freeze())
    }
}

/// When the connection became idle, and how many reads had returned bytes by then.
#[derive(Clone, Copy)]
struct Idle {
    since: Instant,
    reads: u32,
}

/// One hyper connection over `io`, to the connection's end or, with `park_after`, until it is
/// idle that long and is parked. `head_by`: when the first request head is due, after a park;
/// `worn`: the connection's use before this session.
async fn session<I>(
    down: Downstream<'_>,
    io: I,
    watcher: Option<DisconnectWatcher>,
    activity: Arc<Activity>,
    park_after: Option<Duration>,
    head_by: Option<Instant>,
    worn: crate::lifetime::Wear,
) -> Option<Parked<I>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let Downstream {
        worker,
        listener,
        source,
        peer,
        stop,
    } = down;
    let cancel = Arc::new(ConnCancel::new(
        worker.root.child(),
        DownstreamProtocol::Http1,
        watcher,
    ));
    let (io, head) = HeadWatch::new(io, activity.clone());
    let limits = listener.limits;
    let conn = peer.conn(cancel.clone());
    let svc = {
        let accepted = (worker.clone(), listener.clone());
        let source = source.clone();
        let conn = conn.clone();
        let activity = activity.clone();
        service_fn(move |req| {
            let guard = activity.begin();
            // The connection's last request (`max_requests_per_connection`, `max_connection_age`)
            // is answered with `Connection: close`, and hyper closes it after the response.
            let last = accepted
                .1
                .limits
                .lifetime()
                .spent(u64::from(worn.served) + activity.started(), worn.born);
            // A reload since the connection opened applies to this request; the request keeps
            // what it starts with.
            let (worker, listener) = source.current().unwrap_or_else(|| accepted.clone());
            let handled = proxy::handle(worker, listener, conn.clone(), req);
            async move {
                let mut resp = handled.await?;
                if last && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, std::convert::Infallible>(resp.map(|b| GuardedBody::new(b, guard)))
            }
        })
    };
    // No timer for hyper: its header read timeout would arm one per request. The loop below
    // enforces `header_read_timeout` instead, looking at the connection once per timeout.
    let mut connection = http1::Builder::new()
        .half_close(true)
        // A head larger than the buffer is answered with 431 by hyper.
        .max_buf_size(limits.max_header_bytes)
        .serve_connection(io, svc)
        // A request that switches protocols (a WebSocket) hands the connection to its tunnel.
        .with_upgrades();
    // Probing borrows the watcher's duplicate of the socket rather than making another (and
    // does nothing unless dead-peer probing is configured).
    let probe_socket = ProbeSocket::Watcher(cancel.clone());
    let probing = probe::run(Some(probe_socket), listener.dead_peer, activity.clone());
    let mut probing = pin!(probing);
    let parkable = park_after.is_some();
    let after = park_after.unwrap_or(Duration::MAX);
    let park_timer = tokio::time::sleep(after);
    let mut park_timer = pin!(park_timer);
    // The first head is due `header_read_timeout` after the connection opened (or, after a park,
    // after it became idle); each later one that long after the previous request ended.
    let head_timeout = limits.header_read_timeout;
    let first_head_by = head_by.unwrap_or_else(|| Instant::now() + head_timeout);
    let head_timer = tokio::time::sleep_until(first_head_by);
    let mut head_timer = pin!(head_timer);
    let mut parking: Option<(Idle, u64)> = None;
    let mut watching = cancel.watcher().is_some();
    let mut stopping = false;
    // Made once: a fresh waiter per turn of the loop would register with the watcher and the
    // stop token each time.
    let gone_fut = watch(&cancel);
    let mut gone_fut = pin!(gone_fut);
    let stop_fut = stop.cancelled();
    let mut stop_fut = pin!(stop_fut);
    // Only hyper's connection is polled on every turn; the other branches when one of them woke.
    let (gate, gated) = Gate::new();
    let result = loop {
        let turn = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = Pin::new(&mut connection).poll(cx) {
                return Poll::Ready(Turn::Done(r));
            }
            if !gate.open(cx.waker()) {
                return Poll::Pending;
            }
            let mut cx = Context::from_waker(&gated);
            if watching && let Poll::Ready(gone) = gone_fut.as_mut().poll(&mut cx) {
                return Poll::Ready(Turn::Gone(gone));
            }
            // Never completes: switches dead-peer probing on and off as requests come and go.
            let _ = probing.as_mut().poll(&mut cx);
            if !stopping && stop_fut.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Turn::Stop);
            }
            if parkable
                && parking.is_none()
                && !stopping
                && park_timer.as_mut().poll(&mut cx).is_ready()
            {
                return Poll::Ready(Turn::Park);
            }
            if parking.is_none() && head_timer.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Turn::Head);
            }
            Poll::Pending
        })
        .await;
        // A branch completed, so which branches are polled, or their state, changed.
        gate.reopen();
        match turn {
            Turn::Done(r) => break r,
            // The client left: cancel what is in flight (per the route's half-close policy). hyper
            // is still driven afterwards so it can finish or fail the exchange cleanly.
            Turn::Gone(gone) => {
                watching = false;
                cancel.on_peer_gone(gone);
            }
            // Shutdown: finish the response in flight, then close.
            Turn::Stop => {
                stopping = true;
                Pin::new(&mut connection).graceful_shutdown();
            }
            // Looked at every `after` rather than on every request, so that a busy connection's
            // loop does not turn (and poll hyper again) per request.
            Turn::Park => {
                let now = Instant::now();
                // Idle: nothing in flight, and nothing read since the last request ended.
                let idle = Idle {
                    since: activity.last_end(),
                    reads: activity.reads_at_end(),
                };
                if activity.in_flight() > 0 || activity.reads() != idle.reads {
                    park_timer.as_mut().reset(now + after);
                } else if now < idle.since + after {
                    park_timer.as_mut().reset(idle.since + after);
                } else if activity.write_stalled() {
                    // A response is still leaving (a slow reader): not idle yet.
                    park_timer.as_mut().reset(now + after);
                } else {
                    // hyper is idle: this closes its connection at once, and the socket is kept
                    // (the session's socket skips the shutdown while parking).
                    parking = Some((idle, activity.started()));
                    activity.set_parking();
                    Pin::new(&mut connection).graceful_shutdown();
                }
            }
            // A slow head (slowloris) or an idle keep-alive connection past `header_read_timeout`
            // is closed. Looked at once per timeout, not per request: the due time follows from
            // when the last request ended.
            Turn::Head => {
                let now = Instant::now();
                let due = if activity.in_flight() > 0 || activity.write_stalled() {
                    // Busy (or a response still leaving): nothing is due yet.
                    now + head_timeout
                } else if activity.started() == 0 {
                    first_head_by
                } else {
                    activity.last_end() + head_timeout
                };
                if now < due {
                    head_timer.as_mut().reset(due);
                } else {
                    match head.partial_head() {
                        Some(took) => head.record(worker, peer, took),
                        None => {
                            tracing::trace!(client = %peer.client, "idle keep-alive connection timed out")
                        }
                    }
                    cancel.on_connection_end(None);
                    return None;
                }
            }
        }
    };
    // `None`: hyper handed the connection to an upgrade. The connection is a tunnel now
    // (`proxy::tunnel`), which ends with its request: the connection's cancellation is not
    // fired, and the connection is counted as open until the tunnel ends.
    let Some(parts) = connection.into_parts() else {
        conn.tunnel_closed().await;
        return None;
    };
    if let Some((i, started)) = parking {
        // Parked only if hyper was idle: nothing read and no request started since.
        if result.is_ok() && activity.reads() == i.reads && activity.started() == started {
            return Some(Parked {
                io: parts.io.into_inner(),
                read_ahead: parts.read_buf,
                idle_since: i.since,
                served: worn
                    .served
                    .saturating_add(u32::try_from(started).unwrap_or(u32::MAX)),
            });
        }
    }
    if let Err(e) = &result {
        tracing::trace!(client = %peer.client, error = %e, "downstream connection ended with an error");
    }
    cancel.on_connection_end(result.as_ref().err());
    None
}

/// What ended one turn of a session's loop.
enum Turn<R> {
    Done(R),
    Gone(tether::PeerGone),
    Stop,
    Park,
    Head,
}

async fn watch(cancel: &ConnCancel) -> tether::PeerGone {
    match cancel.watcher() {
        Some(w) => w.gone().await,
        None => std::future::pending().await,
    }
}

/// The socket of a plain-TCP connection as one session's hyper connection sees it: bytes read
/// ahead by the previous session first, reads and stalled writes noted for the parking
/// decision, and no shutdown while parking (the socket outlives the session).
#[derive(Debug)]
struct SessionIo {
    tcp: TcpStream,
    replay: Bytes,
    activity: Arc<Activity>,
}

impl AsyncRead for SessionIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            this.activity.note_read();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.note_read();
        }
        r
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.activity.note_write(r.is_pending());
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.activity.note_write(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_flush(cx);
        this.activity.note_write(r.is_pending());
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.parking() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
