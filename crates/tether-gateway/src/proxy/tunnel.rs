//! HTTP/1.1 upgrades (WebSocket, or any protocol a request names in `Upgrade`). The request goes
//! upstream with its `Connection: upgrade` and `Upgrade` headers, on a connection of its own;
//! when the upstream answers `101 Switching Protocols`, the client gets that answer and the two
//! connections are joined byte for byte. The tunnel stays tied to the request: it ends when
//! either side closes or fails (what that side sent is passed on, then the other side's
//! connection is closed at once; with the route's `client_half_close = "continue"`, a side's FIN
//! is passed on as a half-close instead and the tunnel lasts until both sides are done), when the
//! route's deadline passes, when nothing crosses it for the route's `idle_timeout`, or at
//! shutdown. Its access-log line (status 101) is written when it ends, with the bytes that
//! crossed each way; the metrics count it open, and its bytes as they cross.
//!
//! A WebSocket over HTTP/2 (RFC 8441's extended CONNECT) is tunnelled the same way: the upstream
//! gets an HTTP/1.1 upgrade, and its 101 becomes the `200` that opens the client's stream as the
//! tunnel (status 200 in the log). Only that stream is joined to the upstream connection; the
//! client's connection goes on serving other streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::header::HeaderValue;
use http::{Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::io::InspectReader;

use super::headers;
use super::response_body::ProxyBody;
use super::tracker::{Teardown, Tracker};
use crate::config::HalfClose;
use crate::error::{ErrorKind, ProxyError, Stage};
use crate::observe::metrics::TunnelCounters;
use crate::respond::REQUEST_ID;
use crate::route::Route;
use crate::upstream::pool::{H1Conn, Switched};

/// Answers the client with the upstream's `101` (or, for an HTTP/2 stream, `200`) and joins the
/// two sides in a task of their own, once hyper has handed both over. `downstream` is the
/// client's side of the switch, taken from its request before that was sent upstream; `open`,
/// the HTTP/1 client connection's hold on the tunnel, is dropped when the tunnel ends (an HTTP/2
/// stream has none: its connection serves on).
#[allow(
    clippy::too_many_arguments,
    reason = "the request's parts, each used once"
)]
pub fn open(
    mut t: Tracker,
    resp: Response<Incoming>,
    downstream: OnUpgrade,
    upstream: H1Conn,
    route: &Route,
    id_value: Option<HeaderValue>,
    open: Option<oneshot::Sender<()>>,
) -> Response<ProxyBody> {
    let (mut parts, _) = resp.into_parts();
    let protocols = headers::upgrade_of(&parts.headers).unwrap_or_default();
    headers::remove_hop_by_hop(&mut parts.headers, false);
    if open.is_some() {
        headers::restore_upgrade(&mut parts.headers, &protocols);
        parts.version = Version::HTTP_11;
    } else {
        // The stream's answer to its CONNECT. The accept answered tether's own key.
        parts.status = StatusCode::OK;
        parts.headers.remove(http::header::SEC_WEBSOCKET_ACCEPT);
        parts.version = Version::HTTP_2;
    }
    if let Some(v) = id_value {
        parts.headers.insert(REQUEST_ID, v);
    }
    t.rec.status = parts.status.as_u16();
    t.stage = Stage::Body;
    // The upstream connection belongs to the tunnel now; its end is not waited for.
    t.teardown = Teardown::None;
    let (idle, half_close) = (route.timeouts.idle, route.half_close);
    tokio::spawn(async move {
        run(t, downstream, upstream, idle, half_close).await;
        // The client connection's task, waiting for this, ends now (and its place in the
        // listener's connection limit and the shutdown drain is given back).
        drop(open);
    });
    Response::from_parts(parts, ProxyBody::empty())
}

/// Bytes read from each side, and the last time any crossed.
#[derive(Debug)]
struct Traffic {
    from_client: AtomicU64,
    from_upstream: AtomicU64,
    /// Nanoseconds from `epoch` to the last read that returned bytes.
    last: AtomicU64,
    epoch: Instant,
    /// The same bytes in the metrics, as they cross (a tunnel may last for hours).
    counters: TunnelCounters,
}

impl Traffic {
    fn note(&self, from_upstream: bool, n: usize) {
        let (side, counter) = if from_upstream {
            (&self.from_upstream, &self.counters.from_upstream)
        } else {
            (&self.from_client, &self.counters.from_client)
        };
        side.fetch_add(n as u64, Ordering::Relaxed);
        counter.inc_by(n as u64);
        let at = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(at, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// `io`, with what is read from it counted in `traffic` (`upstream`: as from the upstream).
fn counted<T: AsyncRead>(
    io: T,
    traffic: &Arc<Traffic>,
    upstream: bool,
) -> InspectReader<T, impl FnMut(&[u8]) + use<T>> {
    let traffic = traffic.clone();
    InspectReader::new(io, move |read: &[u8]| {
        if !read.is_empty() {
            traffic.note(upstream, read.len());
        }
    })
}

/// How the tunnel ended.
enum End {
    /// A side closed or failed.
    Closed,
    /// Nothing crossed for the idle timeout.
    Idle,
    /// The request was cancelled (deadline, shutdown).
    Cancelled(tether::CancelReason),
    /// An upgrade was not handed over (a side closed before the switch).
    NotUpgraded(ProxyError),
}

async fn run(
    mut t: Tracker,
    downstream: OnUpgrade,
    upstream: H1Conn,
    idle: Option<Duration>,
    half_close: HalfClose,
) {
    let traffic = Arc::new(Traffic {
        from_client: AtomicU64::new(0),
        from_upstream: AtomicU64::new(0),
        last: AtomicU64::new(0),
        epoch: Instant::now(),
        counters: t
            .metrics()
            .tunnel_counters(t.rec.route.as_deref().unwrap_or("")),
    });
    let switched = async {
        let down = downstream.await.map_err(|e| {
            ProxyError::downstream(Stage::ResponseWrite, ErrorKind::Reset).with_source(e)
        })?;
        let up = upstream
            .switched()
            .await
            .ok_or_else(|| ProxyError::upstream(Stage::Body, ErrorKind::Reset))?;
        Ok::<_, ProxyError>((down, up))
    };
    let upgraded = tokio::select! {
        biased;
        reason = t.ctx.cancelled() => Err(End::Cancelled(reason)),
        r = switched => r.map_err(End::NotUpgraded),
    };
    let end = match upgraded {
        Err(end) => end,
        Ok((down, up)) => {
            // `_open`: counted as an open upstream connection until the tunnel ends. What hyper
            // read past the upstream's 101 is the new protocol's first bytes.
            let Switched {
                mut io,
                read_ahead: ahead,
                open: _open,
            } = up;
            let _tunnel = t.metrics().tunnel_open();
            traffic.note(true, ahead.len());
            let mut down = counted(TokioIo::new(down), &traffic, false);
            let mut up = counted(&mut io, &traffic, true);
            match half_close {
                // Each side's end of input is passed on as a half-close, and the tunnel lasts
                // until both directions are done.
                HalfClose::Continue => {
                    let joined = async {
                        down.write_all(&ahead).await?;
                        tokio::io::copy_bidirectional(&mut down, &mut up).await
                    };
                    guarded(&t.ctx, idle, &traffic, joined).await
                }
                // The first side to close (or fail) ends the tunnel: what it sent is passed on,
                // then both connections close, as a client's FIN aborts any other request.
                HalfClose::Abort => {
                    let (mut dr, mut dw) = tokio::io::split(down);
                    let (mut ur, mut uw) = tokio::io::split(up);
                    let first = async {
                        dw.write_all(&ahead).await?;
                        tokio::select! {
                            r = tokio::io::copy(&mut dr, &mut uw) => r,
                            r = tokio::io::copy(&mut ur, &mut dw) => r,
                        }
                    };
                    guarded(&t.ctx, idle, &traffic, first).await
                }
            }
            // Both connections close here, before the line is written.
        }
    };
    t.upload.bytes.store(
        traffic.from_client.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    t.rec.bytes_sent = traffic.from_upstream.load(Ordering::Relaxed);
    match end {
        End::Closed => t.finish_ok(),
        End::Idle => t.finish_idle(&ProxyError::upstream(Stage::Body, ErrorKind::Timeout)),
        End::Cancelled(reason) => t.finish_cancelled(reason),
        End::NotUpgraded(err) => t.finish_error(&err, None),
    }
}

/// Runs `work` (the copying) until it ends, the request is cancelled, or nothing has crossed
/// for `idle`.
async fn guarded(
    ctx: &tether::RequestContext,
    idle: Option<Duration>,
    traffic: &Traffic,
    work: impl Future,
) -> End {
    tokio::pin!(work);
    let idle_timer = tokio::time::sleep(idle.unwrap_or(Duration::MAX));
    tokio::pin!(idle_timer);
    loop {
        tokio::select! {
            biased;
            reason = ctx.cancelled() => return End::Cancelled(reason),
            // However it ended (an error is the usual end of a tunnel: a reset), it is over.
            _ = &mut work => return End::Closed,
            _ = &mut idle_timer, if idle.is_some() => {
                let due = traffic.last() + idle.unwrap_or_default();
                if Instant::now() >= due {
                    return End::Idle;
                }
                idle_timer.as_mut().reset(due);
            }
        }
    }
}
