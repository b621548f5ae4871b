//! HTTP/1 downstream: hyper's server with `half_close(true)` so that tether, not hyper, decides
//! what a client FIN means (per route), and the disconnect watcher so that a client leaving is
//! seen even while hyper is not reading (unread request body, pipelined bytes).
//!
//! An idle plain-TCP keep-alive connection is *parked*: hyper's connection keeps an 8 KiB read
//! and an 8 KiB write buffer, its service and tether's per-connection state for as long as the
//! connection lives, so once nothing is in flight and the client has sent nothing for
//! [`PARK_AFTER`], the hyper connection is closed without touching the socket
//! (`graceful_shutdown` closes an idle hyper connection at once) and everything but the socket is
//! dropped. The next bytes from the client bring up a fresh hyper connection; bytes hyper had
//! read ahead are replayed to it first. The delay keeps a busy connection from being rebuilt per
//! request. TLS connections are not parked (the TLS session state would have to be kept anyway).
//!
//! LIFECYCLE (plain TCP): active (hyper connection, cancellation state, disconnect watcher) →
//! nothing in flight and nothing read for [`PARK_AFTER`] → parked (socket only) → client bytes:
//! active again | FIN or RST, the idle timeout (`header_read_timeout`, counted from when the
//! connection became idle) or shutdown: closed at once.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use socket2::SockRef;
use tether::DisconnectWatcher;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Peer;
use super::gate::Gate;
use super::head_timeout::HeadWatch;
use super::probe::{self, Activity, GuardedBody};
use crate::cancel::{ConnCancel, DownstreamProtocol};
use crate::listen::{ConfigSource, ConnPermit, ListenerShared, Worker};
use crate::proxy;

/// How long a plain-TCP connection must be idle (nothing in flight, nothing read) before it is
/// parked. Long enough that a connection under load is never parked between two requests.
pub const PARK_AFTER: Duration = Duration::from_millis(200);

/// What a connection's sessions share.
#[derive(Clone, Copy)]
struct Downstream<'a> {
    worker: &'a Arc<Worker>,
    listener: &'a Arc<ListenerShared>,
    /// Each request's configuration: a reload applies to the next request on the connection.
    source: &'a ConfigSource,
    peer: Peer,
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
    fd: Option<OwnedFd>,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let down = Downstream {
        worker: &worker,
        listener: &listener,
        source: &source,
        peer,
        stop: &stop,
    };
    let _ = session(down, io, watcher, fd, Activity::new(), None).await;
}

/// Serves a plain-TCP HTTP/1 connection, parking it while it is idle; `permit` is held to the
/// end. Spawn it as a task of its own: its future is what a parked connection costs.
///
/// A plain function around an `async move` block, not an `async fn`: an `async fn` keeps a
/// second copy of every argument in its future. Only what a parked connection needs lives
/// across the parked wait; the session, with hyper's connection, is boxed.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn's future would be 160 bytes larger (measured)"
)]
pub fn serve_tcp(
    worker: Arc<Worker>,
    listener: Arc<ListenerShared>,
    source: ConfigSource,
    mut tcp: TcpStream,
    peer: Peer,
    stop: CancellationToken,
    permit: ConnPermit,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let mut replay = Bytes::new();
        let mut head_by = None;
        loop {
            let park = Park {
                after: PARK_AFTER,
                head_by,
            };
            let down = Downstream {
                worker: &worker,
                listener: &listener,
                source: &source,
                peer,
                stop: &stop,
            };
            let Some(parked) = boxed_session(down, tcp, replay, park).await else {
                break;
            };
            let idle_since = parked.idle_since;
            let (socket, read_ahead) = parked.take_back();
            tcp = socket;
            let deadline = idle_since + listener.limits.header_read_timeout;
            head_by = Some(deadline);
            // A partial request read ahead: serve it at once (hyper waits for the rest itself).
            if !read_ahead.is_empty() {
                replay = read_ahead;
                continue;
            }
            let _parked = worker.parked();
            if !wait_parked(&tcp, deadline, &stop).await {
                break;
            }
            replay = Bytes::new();
        }
        drop(permit);
    }
}

type SessionFuture<'a> =
    Pin<Box<dyn Future<Output = Option<Parked<TokioIo<SessionIo>>>> + Send + 'a>>;

/// Boxes the session of a plain-TCP connection, with everything it needs made here, so that
/// none of it takes room in the connection's future while it is parked.
fn boxed_session<'a>(
    down: Downstream<'a>,
    tcp: TcpStream,
    replay: Bytes,
    park: Park,
) -> SessionFuture<'a> {
    let watcher = DisconnectWatcher::new(&tcp).ok();
    let fd = super::probe_fd(&tcp, down.listener);
    let activity = Activity::new();
    let io = TokioIo::new(SessionIo {
        tcp,
        replay,
        activity: activity.clone(),
    });
    Box::pin(session(down, io, watcher, fd, activity, Some(park)))
}

/// Waits while a connection is parked. True when the client sent bytes (serve them), false
/// when the connection must close: FIN, RST, the idle timeout or shutdown.
///
/// Polls the socket's readiness directly rather than through `readable()`, whose future (and
/// those it nests) would add to every parked connection's state.
#[allow(
    clippy::manual_async_fn,
    reason = "its future is part of every parked connection's; an async fn's is larger"
)]
fn wait_parked<'a>(
    tcp: &'a TcpStream,
    deadline: Instant,
    stop: &'a CancellationToken,
) -> impl Future<Output = bool> + Send + 'a {
    async move {
        // Shutdown: nothing is in flight on a parked connection, close it at once.
        let mut stopped = pin!(stop.cancelled());
        // The keep-alive idle timeout, counted from when the connection became idle.
        let mut expired = pin!(tokio::time::sleep_until(deadline));
        std::future::poll_fn(|cx| {
            if stopped.as_mut().poll(cx).is_ready() || expired.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            // The next request, or the client leaving.
            loop {
                match tcp.poll_read_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => return Poll::Ready(false),
                    Poll::Ready(Ok(())) => {}
                }
                let mut byte = [MaybeUninit::<u8>::uninit()];
                // WouldBlock clears the readiness, so the next poll waits for new bytes.
                match tcp.try_io(Interest::READABLE, || SockRef::from(tcp).peek(&mut byte)) {
                    Ok(0) => return Poll::Ready(false),
                    Ok(_) => return Poll::Ready(true),
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Poll::Ready(false),
                }
            }
        })
        .await
    }
}

/// Parking settings of one session.
struct Park {
    after: Duration,
    /// After a park: when the first request head must have arrived (the idle timeout).
    head_by: Option<Instant>,
}

/// A session that ended by parking: the socket and what hyper had read ahead.
struct Parked<I> {
    io: I,
    read_ahead: Bytes,
    idle_since: Instant,
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

/// One hyper connection over `io`, to the connection's end or, with `park`, until it is idle
/// long enough to be parked.
async fn session<I>(
    down: Downstream<'_>,
    io: I,
    watcher: Option<DisconnectWatcher>,
    fd: Option<OwnedFd>,
    activity: Arc<Activity>,
    park: Option<Park>,
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
    let svc = {
        let accepted = (worker.clone(), listener.clone());
        let source = source.clone();
        let conn = peer.conn(cancel.clone());
        let activity = activity.clone();
        service_fn(move |req| {
            let guard = activity.begin();
            // A reload since the connection opened applies to this request; the request keeps
            // what it starts with.
            let (worker, listener) = source.current().unwrap_or_else(|| accepted.clone());
            let handled = proxy::handle(worker, listener, conn.clone(), req);
            async move {
                let resp = handled.await?;
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
        .serve_connection(io, svc);
    let probing = probe::run(fd, listener.dead_peer, activity.clone());
    let mut probing = pin!(probing);
    let (after, head_by) = match &park {
        Some(p) => (p.after, p.head_by),
        None => (Duration::MAX, None),
    };
    let parkable = park.is_some();
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
                        Some(took) => head.record(worker, &peer, took),
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
    if let Some((i, started)) = parking {
        // Parked only if hyper was idle: nothing read and no request started since.
        if result.is_ok() && activity.reads() == i.reads && activity.started() == started {
            let parts = connection.into_parts();
            return Some(Parked {
                io: parts.io.into_inner(),
                read_ahead: parts.read_buf,
                idle_since: i.since,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn size7<A, B, C, D, E, F, G, R>(_: fn(A, B, C, D, E, F, G) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A parked connection costs its task (this future, a task header) and its socket's
    /// registration; the future must stay small (it was 1.1 KiB when the parked wait, the
    /// arguments of nested `async fn`s and the protocol sniffing all took room in it).
    #[test]
    fn the_future_of_a_parked_connection_stays_small() {
        let size = size7(serve_tcp as fn(_, _, _, _, _, _, _) -> _);
        // Measured: 488 bytes in a debug build (648 as an `async fn`).
        assert!(size <= 560, "serve_tcp's future is {size} bytes");
    }
}
