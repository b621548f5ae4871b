//! Ties request contexts to what happens on the downstream connection: the HTTP/1 disconnect
//! watcher, HTTP/2 stream resets and connection loss, and handler futures dropped by hyper.
//!
//! Each connection has a context (a child of the worker's shutdown context); each request a
//! child of that. Cancelling the connection context cancels every request on it; a request can
//! be cancelled alone (an HTTP/2 stream reset, a deadline).

use std::sync::Mutex;

use tether::{CancelReason, DisconnectWatcher, PeerGone, RequestContext, RequestId};
use tokio::sync::Notify;

use crate::admission::ResetBucket;
use crate::config::{HalfClose, ResetBudget};

/// The downstream protocol of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownstreamProtocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2.
    H2,
}

impl DownstreamProtocol {
    /// Label for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DownstreamProtocol::Http1 => "HTTP/1.1",
            DownstreamProtocol::H2 => "HTTP/2",
        }
    }
}

#[derive(Debug, Default)]
struct H1State {
    /// The request in flight and its half-close policy (HTTP/1 serves one at a time).
    current: Option<(RequestContext, HalfClose)>,
    /// What the watcher saw, once it fired.
    gone: Option<PeerGone>,
}

/// Cancellation state of one downstream connection.
#[derive(Debug)]
pub struct ConnCancel {
    ctx: RequestContext,
    protocol: DownstreamProtocol,
    watcher: Option<DisconnectWatcher>,
    h1: Mutex<H1State>,
    resets: Option<Mutex<ResetBucket>>,
    over_budget: Notify,
    /// A child of the connection's token for as long as the connection lives. tokio-util frees a
    /// token's list of children once it empties, so without it an HTTP/1 connection (one request
    /// at a time) would allocate that list anew for every request and free it after.
    _anchor: tokio_util::sync::CancellationToken,
}

impl ConnCancel {
    /// State for a new connection whose context is `ctx`. `watcher` is used for HTTP/1 only.
    pub fn new(
        ctx: RequestContext,
        protocol: DownstreamProtocol,
        watcher: Option<DisconnectWatcher>,
    ) -> ConnCancel {
        ConnCancel {
            _anchor: ctx.token().child_token(),
            ctx,
            protocol,
            watcher,
            h1: Mutex::new(H1State::default()),
            resets: None,
            over_budget: Notify::new(),
        }
    }

    /// Counts the client's HTTP/2 stream resets against `budget` (`None`: unlimited).
    pub fn with_reset_budget(mut self, budget: Option<ResetBudget>) -> ConnCancel {
        self.resets = budget.map(|b| Mutex::new(ResetBucket::new(b)));
        self
    }

    /// Completes once the client has spent its stream-reset budget.
    pub async fn reset_budget_exhausted(&self) {
        if self.resets.is_none() {
            return std::future::pending().await;
        }
        self.over_budget.notified().await;
    }

    fn count_reset(&self) {
        let Some(bucket) = &self.resets else {
            return;
        };
        let ok = crate::lock(bucket).spend();
        if !ok {
            // notify_one stores a permit, so a reset counted before the loop awaits is not lost.
            self.over_budget.notify_one();
        }
    }

    /// The connection's protocol.
    pub fn protocol(&self) -> DownstreamProtocol {
        self.protocol
    }

    /// The connection context.
    pub fn context(&self) -> &RequestContext {
        &self.ctx
    }

    /// The disconnect watcher, if any.
    pub fn watcher(&self) -> Option<&DisconnectWatcher> {
        self.watcher.as_ref()
    }

    /// A context for a new request on this connection.
    pub fn request_context(&self, id: RequestId) -> RequestContext {
        self.ctx.child_with_id(id)
    }

    /// The reason to use when hyper dropped a request's handler or body without telling why.
    pub fn fallback_reason(&self) -> CancelReason {
        if let Some(c) = self.ctx.reason() {
            return c;
        }
        match self.protocol {
            DownstreamProtocol::H2 => {
                // hyper dropped a stream's handler or body on a live connection: the client reset
                // the stream.
                self.count_reset();
                CancelReason::StreamReset
            }
            DownstreamProtocol::Http1 => self
                .watcher
                .as_ref()
                .and_then(|w| w.poll_gone_now())
                .map(PeerGone::reason)
                .unwrap_or(CancelReason::ClientClosed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, H1State> {
        crate::lock(&self.h1)
    }

    /// Registers the HTTP/1 request in flight once its route (and so its policy) is known. If the
    /// client already left, the request is cancelled at once.
    pub fn begin_h1_request(&self, rctx: &RequestContext, policy: HalfClose) {
        if self.protocol != DownstreamProtocol::Http1 {
            return;
        }
        let mut st = self.lock();
        if let Some(gone) = st.gone
            && aborts(gone, policy)
        {
            rctx.cancel(gone.reason());
        }
        st.current = Some((rctx.clone(), policy));
    }

    /// The HTTP/1 request in flight has ended.
    pub fn end_h1_request(&self) {
        if self.protocol == DownstreamProtocol::Http1 {
            self.lock().current = None;
        }
    }

    /// The watcher saw the client go. Returns true if the connection should be torn down (a reset
    /// or a dead peer), false if it may keep serving (a FIN under the `continue` policy, or a FIN
    /// between requests, which hyper handles itself).
    pub fn on_peer_gone(&self, gone: PeerGone) -> bool {
        let mut st = self.lock();
        st.gone = Some(gone);
        match &st.current {
            Some((rctx, policy)) if aborts(gone, *policy) => {
                rctx.cancel(gone.reason());
            }
            _ => {}
        }
        drop(st);
        if gone != PeerGone::Closed {
            self.ctx.cancel(gone.reason());
            return true;
        }
        false
    }

    /// The connection ended: whatever is still in flight on it is lost.
    pub fn on_connection_end(&self, error: Option<&hyper::Error>) {
        let reason = match self.protocol {
            DownstreamProtocol::H2 => match error {
                Some(e) if e.is_timeout() || peer_unreachable(e) => CancelReason::PeerDead,
                _ => CancelReason::ConnectionLost,
            },
            DownstreamProtocol::Http1 => match (self.lock().gone, error) {
                (Some(g), _) => g.reason(),
                (None, Some(e)) if peer_unreachable(e) => CancelReason::PeerDead,
                _ => CancelReason::ClientClosed,
            },
        };
        self.ctx.cancel(reason);
    }
}

fn aborts(gone: PeerGone, policy: HalfClose) -> bool {
    gone != PeerGone::Closed || policy == HalfClose::Abort
}

/// Whether the connection failed because the kernel gave up on the peer: keepalive probes or
/// `TCP_USER_TIMEOUT` expired (`ETIMEDOUT`), or the peer's host became unreachable while
/// retransmitting (`EHOSTUNREACH`, `ENETUNREACH`). hyper's own HTTP/2 PING timeout is
/// `is_timeout()`, checked by the caller.
pub fn peer_unreachable(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return is_peer_dead_io(io);
        }
        if let Some(h) = s.downcast_ref::<h2::Error>()
            && let Some(io) = h.get_io()
        {
            return is_peer_dead_io(io);
        }
        src = s.source();
    }
    false
}

fn is_peer_dead_io(io: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        io.kind(),
        K::TimedOut | K::HostUnreachable | K::NetworkUnreachable
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h1() -> ConnCancel {
        ConnCancel::new(RequestContext::new(), DownstreamProtocol::Http1, None)
    }

    #[test]
    fn fin_aborts_under_abort_policy() {
        let c = h1();
        let r = c.request_context(RequestId::new("a"));
        c.begin_h1_request(&r, HalfClose::Abort);
        assert!(!c.on_peer_gone(PeerGone::Closed));
        assert_eq!(r.reason(), Some(CancelReason::ClientClosed));
    }

    #[test]
    fn fin_continues_under_continue_policy_but_reset_aborts() {
        let c = h1();
        let r = c.request_context(RequestId::new("a"));
        c.begin_h1_request(&r, HalfClose::Continue);
        assert!(!c.on_peer_gone(PeerGone::Closed));
        assert!(!r.is_cancelled());
        assert!(c.on_peer_gone(PeerGone::Reset));
        assert_eq!(r.reason(), Some(CancelReason::ClientReset));
    }

    #[test]
    fn fin_before_routing_cancels_on_begin() {
        let c = h1();
        c.on_peer_gone(PeerGone::Closed);
        let r = c.request_context(RequestId::new("a"));
        c.begin_h1_request(&r, HalfClose::Abort);
        assert_eq!(r.reason(), Some(CancelReason::ClientClosed));
    }

    #[tokio::test(start_paused = true)]
    async fn h2_stream_resets_spend_the_budget() {
        let c = ConnCancel::new(RequestContext::new(), DownstreamProtocol::H2, None)
            .with_reset_budget(Some(ResetBudget {
                burst: 2,
                per_second: 1,
            }));
        assert_eq!(c.fallback_reason(), CancelReason::StreamReset);
        assert_eq!(c.fallback_reason(), CancelReason::StreamReset);
        let exhausted = c.reset_budget_exhausted();
        tokio::pin!(exhausted);
        assert!(futures_poll_once(exhausted.as_mut()).is_pending());
        c.fallback_reason();
        assert!(futures_poll_once(exhausted.as_mut()).is_ready());
    }

    fn futures_poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        f.poll(&mut cx)
    }

    #[test]
    fn timed_out_and_unreachable_io_is_peer_dead() {
        use std::io::{Error, ErrorKind};
        assert!(is_peer_dead_io(&Error::from(ErrorKind::TimedOut)));
        assert!(is_peer_dead_io(&Error::from(ErrorKind::HostUnreachable)));
        assert!(!is_peer_dead_io(&Error::from(ErrorKind::ConnectionReset)));
    }

    #[test]
    fn h2_connection_end_is_connection_lost() {
        let c = ConnCancel::new(RequestContext::new(), DownstreamProtocol::H2, None);
        let r = c.request_context(RequestId::new("a"));
        c.on_connection_end(None);
        assert_eq!(r.reason(), Some(CancelReason::ConnectionLost));
        assert_eq!(c.fallback_reason(), CancelReason::ConnectionLost);
    }
}
