//! The response body sent downstream: the upstream's body streamed frame by frame (never
//! buffered whole; read ahead of the client, with `response_buffer_bytes`, by
//! [`response_buffer`](super::response_buffer)), cut at once when the request is cancelled, and
//! ended abnormally when the upstream fails mid-body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tether::{CancelReason, Cancelled};
use tokio::time::{Instant, Sleep};

use crate::error::{BoxError, ErrorKind, ProxyError, Stage};
use crate::proxy::compress::Compressing;
use crate::proxy::tracker::{Teardown, Tracker};
use crate::upstream::Upstream;
use crate::upstream::pool::H1Conn;

/// Body type of every response tether sends.
#[derive(Debug)]
pub enum ProxyBody {
    /// A complete body (tether's own responses).
    Full(Option<Bytes>),
    /// An upstream body being streamed.
    Stream(Box<Streaming>),
}

impl ProxyBody {
    /// An empty body.
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }

    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Some(b.into()))
    }
}

/// Where an HTTP/1 connection goes back to when the body ends cleanly.
#[derive(Debug)]
pub struct PoolReturn {
    /// The upstream.
    pub upstream: Arc<Upstream>,
    /// Endpoint index within it.
    pub endpoint: usize,
    /// The connection.
    pub conn: H1Conn,
    /// The upstream's announced keep-alive timeout.
    pub keep_alive: Option<Duration>,
    /// Where the client's connection keeps it instead of the pool (`proxy_protocol`).
    pub private: Option<Arc<crate::upstream::Private>>,
}

impl PoolReturn {
    /// The body was read to its end: the connection can serve another request.
    // Inlined: on every request's path, and moving `self` into a call copies it.
    #[inline(always)]
    pub fn give_back(self) {
        match &self.private {
            None => self
                .upstream
                .release(self.endpoint, self.conn, self.keep_alive),
            Some(kept) => {
                self.upstream
                    .keep_private(self.endpoint, self.conn, self.keep_alive, kept)
            }
        }
    }
}

/// See [`ProxyBody::Stream`].
///
/// The cancellation future and the idle timer are made only when the upstream body is not
/// ready: a small response that arrived with its head is forwarded without either (its context
/// is still checked before every frame).
pub struct Streaming {
    inner: Option<Incoming>,
    /// In place of `inner`, the upstream's body read ahead of the client by a task of its
    /// own (`response_buffer_bytes`).
    ahead: Option<Box<super::response_buffer::Ahead>>,
    tracker: Option<Tracker>,
    cancelled: Option<Pin<Box<dyn Future<Output = CancelReason> + Send>>>,
    idle_timeout: Option<Duration>,
    idle: Option<Pin<Box<Sleep>>>,
    pool: Option<PoolReturn>,
    /// The body's compression, when the response is compressed.
    compressing: Option<Box<Compressing>>,
    /// For a gRPC response to an HTTP/2 client: where it is among its messages, so that one cut
    /// between two ends with a `grpc-status` instead of a reset.
    grpc: Option<Box<crate::grpc::Framing>>,
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("done", &!self.has_source())
            .finish()
    }
}

impl Streaming {
    /// Streams `inner` for the request tracked by `tracker`.
    pub fn new(
        inner: Incoming,
        tracker: Tracker,
        idle_timeout: Option<Duration>,
        pool: Option<PoolReturn>,
        compressing: Option<Box<Compressing>>,
    ) -> Streaming {
        Streaming {
            inner: Some(inner),
            ahead: None,
            tracker: Some(tracker),
            cancelled: None,
            idle_timeout,
            idle: None,
            pool,
            compressing,
            grpc: None,
        }
    }

    /// Follows the body's gRPC messages, so that a gRPC response cut between two ends with a
    /// `grpc-status` instead of a reset: in HTTP trailers, or for gRPC-Web in a trailers frame
    /// of the body (in base64 for gRPC-Web-text).
    pub fn frame_grpc(&mut self, flavor: crate::grpc::Flavor) {
        self.grpc = Some(Box::new(match flavor {
            crate::grpc::Flavor::Grpc => crate::grpc::Framing::default(),
            crate::grpc::Flavor::Web => crate::grpc::Framing::web(),
            crate::grpc::Flavor::WebText => crate::grpc::Framing::web_text(),
        }));
    }

    /// For a gRPC response cut between two messages: the trailers (or gRPC-Web's trailers frame)
    /// that end it with `code` (recorded with the request) instead of a reset.
    fn grpc_end(&mut self, code: crate::grpc::Code, what: &str) -> Option<Frame<Bytes>> {
        let framing = self.grpc.as_ref()?;
        if !framing.between_messages() {
            return None;
        }
        let message = format!("tether: {what} at body");
        let end = if framing.is_web() {
            let frame = if framing.is_text() {
                crate::grpc::web_text_trailers(code, &message)
            } else {
                crate::grpc::web_trailers(code, &message)
            };
            if let Some(t) = self.tracker.as_mut() {
                t.rec.bytes_sent += frame.len() as u64;
            }
            Frame::data(frame)
        } else {
            Frame::trailers(crate::grpc::trailers(code, &message))
        };
        if let Some(t) = self.tracker.as_mut() {
            t.rec.grpc_status = Some(code.as_u8());
        }
        Some(end)
    }

    /// Reads the upstream's body ahead of the client, up to `cap` bytes, in a task of its own
    /// ([`response_buffer`](super::response_buffer)), which holds the upstream's part (the
    /// connection, the HTTP/2 stream's place, the endpoint's count) until that body has been
    /// read.
    #[cold]
    pub fn read_ahead(&mut self, cap: usize) {
        if self.inner.as_ref().is_none_or(Body::is_end_stream) {
            return;
        }
        let Some(body) = self.inner.take() else {
            return;
        };
        let (place, load) = match self.tracker.as_mut() {
            Some(t) => {
                let place = match std::mem::replace(&mut t.teardown, Teardown::None) {
                    Teardown::H2(place) => Some(place),
                    other => {
                        t.teardown = other;
                        None
                    }
                };
                (place, t.endpoint_load.take())
            }
            None => (None, None),
        };
        let held = super::response_buffer::Held {
            pool: self.pool.take(),
            place,
            load,
        };
        self.ahead = Some(Box::new(super::response_buffer::start(body, cap, held)));
    }

    /// Whether there is an upstream body still to take from.
    fn has_source(&self) -> bool {
        self.inner.is_some() || self.ahead.is_some()
    }

    /// Whether the upstream body has given its last frame.
    fn source_ended(&self) -> bool {
        match (&self.inner, &self.ahead) {
            (Some(b), _) => b.is_end_stream(),
            (None, Some(a)) => a.is_end_stream(),
            (None, None) => false,
        }
    }

    /// A body read ahead to its end left nothing upstream to tear down, and the upstream's
    /// time ended then.
    fn mark_finished(&mut self) {
        if let Some(at) = self.ahead.as_ref().and_then(|a| a.upstream_done())
            && let Some(t) = self.tracker.as_mut()
        {
            t.teardown = Teardown::Finished(at);
        }
    }

    /// The upstream body ended cleanly: the connection goes back to the pool, the request is done.
    fn complete(&mut self) {
        if self.ahead.is_some() {
            self.mark_finished();
            self.ahead = None;
        }
        self.inner = None;
        if let Some(p) = self.pool.take() {
            p.give_back();
        }
        if let Some(t) = self.tracker.take() {
            t.finish_ok();
        }
    }

    /// Drops the upstream side first (closing an HTTP/1 connection, resetting an HTTP/2 stream),
    /// then records the end. A body read ahead to its end left nothing upstream to tear down.
    fn teardown(&mut self) {
        if self.ahead.is_some() {
            self.mark_finished();
            self.ahead = None;
        }
        self.inner = None;
        self.pool = None;
    }

    /// Ends the body because the request was cancelled.
    fn cancel(&mut self, reason: CancelReason) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.teardown();
        // A client that is gone reads nothing more; one whose deadline passed or whose gateway
        // is shutting down is told so.
        let end = match reason {
            CancelReason::Deadline => {
                self.grpc_end(crate::grpc::Code::DeadlineExceeded, "deadline")
            }
            CancelReason::Shutdown => self.grpc_end(crate::grpc::Code::Unavailable, "shutdown"),
            _ => None,
        };
        if let Some(t) = self.tracker.take() {
            t.finish_cancelled(reason);
        }
        match end {
            Some(trailers) => Poll::Ready(Some(Ok(trailers))),
            None => Poll::Ready(Some(Err(Box::new(Cancelled { reason })))),
        }
    }

    /// Ends the body because compressing it failed.
    fn compression_failed(
        &mut self,
        e: std::io::Error,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.teardown();
        let err = ProxyError::gateway(Stage::Body, ErrorKind::Protocol).with_source(e);
        let msg = err.to_string();
        if let Some(t) = self.tracker.take() {
            t.finish_error(&err, None);
        }
        Poll::Ready(Some(Err(msg.into())))
    }

    /// Ends the body because the upstream sent nothing for the idle timeout.
    fn idle_expired(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.teardown();
        let err = ProxyError::upstream(Stage::Body, ErrorKind::Timeout);
        let end = self.grpc_end(crate::grpc::Code::Unavailable, err.classify().code);
        if let Some(t) = self.tracker.take() {
            t.finish_idle(&err);
        }
        match end {
            Some(trailers) => Poll::Ready(Some(Ok(trailers))),
            None => Poll::Ready(Some(Err(Box::new(err)))),
        }
    }
}

impl Body for Streaming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(c) = this.compressing.as_mut()
            && let Some(trailers) = c.take_trailers()
        {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if !this.has_source() {
            return Poll::Ready(None);
        }
        // Cancellation is checked first so that a cancelled request never forwards another byte.
        if let Some(t) = &this.tracker
            && let Err(c) = t.ctx.check()
        {
            return this.cancel(c.reason);
        }
        if let Some(sleep) = this.idle.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            return this.idle_expired();
        }
        let polled = match (this.inner.as_mut(), this.ahead.as_mut()) {
            (Some(inner), _) => Pin::new(inner).poll_frame(cx),
            (None, Some(ahead)) => ahead.poll_frame(cx),
            (None, None) => return Poll::Ready(None),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                // Whether this is the body's last frame, asked only when compressing.
                let last = this.compressing.is_some() && this.source_ended();
                let frame = match this.compressing.as_mut() {
                    None => frame,
                    Some(c) => {
                        match c.frame(frame, last) {
                            // Nothing to send yet: asked for the next frame at once.
                            Ok(f) if f.data_ref().is_some_and(|d| d.is_empty()) && !last => {
                                cx.waker().wake_by_ref();
                                return Poll::Pending;
                            }
                            Ok(f) => f,
                            Err(e) => return this.compression_failed(e),
                        }
                    }
                };
                if let Some(t) = this.tracker.as_mut()
                    && let Some(d) = frame.data_ref()
                {
                    t.rec.bytes_sent += d.len() as u64;
                    if let Some(g) = this.grpc.as_mut() {
                        g.advance(d);
                    }
                }
                if let (Some(d), Some(sleep)) = (this.idle_timeout, this.idle.as_mut()) {
                    sleep.as_mut().reset(Instant::now() + d);
                }
                // hyper stops polling a body once it has sent as many bytes as Content-Length
                // says; finish now rather than wait for an end that is never asked for.
                if this.source_ended() {
                    this.complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.teardown();
                let err = ProxyError::upstream(Stage::Body, ErrorKind::Reset).with_source(e);
                let msg = err.to_string();
                let end = this.grpc_end(crate::grpc::Code::Unavailable, err.classify().code);
                if let Some(t) = this.tracker.take() {
                    t.finish_error(&err, None);
                }
                if let Some(trailers) = end {
                    return Poll::Ready(Some(Ok(trailers)));
                }
                // Returning an error makes hyper end the downstream response abnormally (HTTP/1:
                // connection closed without the final chunk; HTTP/2: RST_STREAM), never a clean
                // short response.
                Poll::Ready(Some(Err(msg.into())))
            }
            Poll::Ready(None) => {
                // A compressed body's end is sent before the body ends.
                if let Some(c) = this.compressing.as_mut()
                    && c.unfinished()
                {
                    let tail = match c.finish() {
                        Ok(tail) => Bytes::from(tail),
                        Err(e) => return this.compression_failed(e),
                    };
                    if let Some(t) = this.tracker.as_mut() {
                        t.rec.bytes_sent += tail.len() as u64;
                    }
                    this.complete();
                    return Poll::Ready(Some(Ok(Frame::data(tail))));
                }
                this.complete();
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Waiting on the upstream: now be woken by a cancellation or the idle timer too.
                if this.cancelled.is_none()
                    && let Some(t) = &this.tracker
                {
                    let ctx = t.ctx.clone();
                    this.cancelled = Some(Box::pin(async move { ctx.cancelled().await }));
                }
                if let Some(c) = this.cancelled.as_mut()
                    && let Poll::Ready(reason) = c.as_mut().poll(cx)
                {
                    return this.cancel(reason);
                }
                if this.idle.is_none()
                    && let Some(d) = this.idle_timeout
                {
                    let mut sleep = Box::pin(tokio::time::sleep(d));
                    // A fresh timer is not ready; polled once so it wakes this task.
                    if sleep.as_mut().poll(cx).is_ready() {
                        return this.idle_expired();
                    }
                    this.idle = Some(sleep);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.compressing {
            // The upstream's end is not the compressed body's: that comes after it.
            Some(c) => !self.has_source() && !c.has_trailers(),
            None => match (&self.inner, &self.ahead) {
                (Some(b), _) => b.is_end_stream(),
                (None, Some(a)) => a.is_end_stream(),
                (None, None) => true,
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.ahead) {
            // A compressed body's size is known only at its end.
            _ if self.compressing.is_some() => SizeHint::default(),
            (Some(b), _) => b.size_hint(),
            (None, Some(a)) => a.size_hint(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if self.source_ended() {
            self.complete();
        }
        // Dropped before the end: the downstream is gone (or hyper gave up on it).
        if self.tracker.is_some() {
            self.teardown();
            if let Some(mut t) = self.tracker.take() {
                t.stage = Stage::Body;
                drop(t);
            }
        } else if self.has_source() {
            self.teardown();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Stream(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Stream(s) => s.size_hint(),
        }
    }
}
