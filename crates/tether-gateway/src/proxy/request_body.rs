//! The request body sent upstream: the client's body, streamed (or read ahead, whole or in
//! part, before the send), with a failure turned into cancellation.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::cancel::ConnCancel;
use crate::error::BoxError;
use tether::{CancelReason, RequestContext};
use tokio::time::{Instant, Sleep};

/// Progress of the upload, shared with the request's tracker.
#[derive(Debug, Default)]
pub struct UploadProgress {
    /// Bytes received from the client so far.
    pub bytes: AtomicU64,
    /// The body ended cleanly.
    pub complete: AtomicBool,
    /// The client went quiet mid-body for longer than the idle timeout.
    pub idle_expired: AtomicBool,
    /// When the last of it was handed to the upstream connection.
    pub completed_at: OnceLock<tokio::time::Instant>,
    /// The body went past the listener's size limit and was cut.
    pub too_large: AtomicBool,
}

impl UploadProgress {
    fn mark_complete(&self) {
        self.complete.store(true, Ordering::Relaxed);
        let _ = self.completed_at.set(tokio::time::Instant::now());
    }
}

/// The body of an upstream request.
///
/// A client that leaves mid-upload makes hyper's body yield an error. That error is treated as
/// cancellation of the request, and the upstream is told with an HTTP/2 `CANCEL` (an error carrying
/// `h2::Reason::CANCEL` makes hyper's h2 client reset with CANCEL instead of INTERNAL_ERROR; an
/// HTTP/1 upstream connection is closed mid-body), so the upstream never sees a silently
/// truncated body.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    ctx: Option<(RequestContext, Arc<ConnCancel>)>,
    progress: Arc<UploadProgress>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    limit: Option<u64>,
    /// A body read ahead before it is sent (whole, so that it can be sent again; or its start,
    /// sent first, then the rest streams), and what of it is still to send. Boxed: every
    /// request's state holds a body or two, and few read ahead.
    whole: Option<Box<(Whole, WholeLeft)>>,
}

/// A request body read whole: its bytes and trailers. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct Whole {
    data: Bytes,
    trailers: Option<http::HeaderMap>,
}

/// What of a [`Whole`] body is still to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WholeLeft {
    /// Not whole: its start, to send before the rest streams.
    Start,
    Data,
    Trailers,
    Nothing,
}

impl RequestBody {
    /// Wraps the client's body.
    /// `idle` bounds the gap between two chunks from the client.
    pub fn new(
        inner: Incoming,
        ctx: RequestContext,
        conn: Arc<ConnCancel>,
        progress: Arc<UploadProgress>,
        idle: Option<Duration>,
        limit: Option<u64>,
    ) -> Self {
        RequestBody {
            inner: Some(inner),
            ctx: Some((ctx, conn)),
            progress,
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            limit,
            whole: None,
        }
    }

    /// A body with no bytes.
    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            ctx: None,
            progress: Arc::default(),
            idle: None,
            limit: None,
            whole: None,
        }
    }

    /// A body of these bytes.
    pub fn from_bytes(data: Bytes) -> Self {
        RequestBody::from_whole(Whole {
            data,
            trailers: None,
        })
    }

    /// A body read whole before: `whole` again.
    pub fn from_whole(whole: Whole) -> Self {
        RequestBody {
            whole: Some(Box::new((whole, WholeLeft::Data))),
            ..RequestBody::empty()
        }
    }

    /// Reads the client's body ahead of the send (its idle timeout, size limit and the client
    /// leaving apply as when it streams), to its end or until more than `limit` bytes came.
    /// `Ok(true)`: it ended, and is kept whole, to be sent and sent again; `Ok(false)`: what
    /// came is sent first and the rest streams. `Err` when the body failed: the request's
    /// context says why.
    pub async fn read_ahead(&mut self, limit: u64) -> Result<bool, BoxError> {
        use http_body_util::BodyExt;
        let mut data = bytes::BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = self.frame().await {
            match frame?.into_data() {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    if data.len() as u64 > limit {
                        let start = Whole {
                            data: data.freeze(),
                            trailers: None,
                        };
                        self.whole = Some(Box::new((start, WholeLeft::Start)));
                        return Ok(false);
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        *self = RequestBody::from_whole(Whole {
            data: data.freeze(),
            trailers,
        });
        Ok(true)
    }

    /// The body, when it was read whole.
    pub fn whole(&self) -> Option<&Whole> {
        match self.whole.as_deref() {
            Some((w, left)) if *left != WholeLeft::Start => Some(w),
            _ => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this
            .whole
            .as_deref()
            .is_some_and(|(_, left)| *left == WholeLeft::Start)
            && let Some(start) = this.whole.take()
        {
            return Poll::Ready(Some(Ok(Frame::data(start.0.data))));
        }
        if let Some(whole) = this.whole.as_deref_mut() {
            let (body, left) = whole;
            return Poll::Ready(match *left {
                WholeLeft::Data => {
                    *left = WholeLeft::Trailers;
                    Some(Ok(Frame::data(body.data.clone())))
                }
                WholeLeft::Trailers => {
                    *left = WholeLeft::Nothing;
                    body.trailers.clone().map(|t| Ok(Frame::trailers(t)))
                }
                WholeLeft::Nothing | WholeLeft::Start => None,
            });
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if polled.is_pending()
            && let Some((_, sleep)) = this.idle.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            // The client stopped sending mid-body: end the request (408) and tell the upstream
            // the body will never complete.
            this.inner = None;
            this.progress.idle_expired.store(true, Ordering::Relaxed);
            if let Some((ctx, _)) = this.ctx.take() {
                ctx.cancel(CancelReason::Deadline);
            }
            return Poll::Ready(Some(Err(Box::new(h2::Error::from(h2::Reason::CANCEL)))));
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let total = this
                        .progress
                        .bytes
                        .fetch_add(d.len() as u64, Ordering::Relaxed)
                        + d.len() as u64;
                    if this.limit.is_some_and(|max| total > max) {
                        // Too long a body (chunked or HTTP/2, no Content-Length to refuse up
                        // front): the upstream sees the request abort, never a truncated body.
                        this.inner = None;
                        this.progress.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(h2::Error::from(
                            h2::Reason::CANCEL,
                        )))));
                    }
                }
                if let Some((d, sleep)) = this.idle.as_mut() {
                    sleep.as_mut().reset(Instant::now() + *d);
                }
                // hyper does not poll again once a body with a known length says it has ended.
                if this.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
                    this.progress.mark_complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => {
                this.inner = None;
                if let Some((ctx, conn)) = this.ctx.take() {
                    ctx.cancel(conn.fallback_reason());
                }
                Poll::Ready(Some(Err(Box::new(h2::Error::from(h2::Reason::CANCEL)))))
            }
            Poll::Ready(None) => {
                this.progress.mark_complete();
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.whole.as_deref() {
            Some((w, left)) => match left {
                WholeLeft::Start => false,
                WholeLeft::Data => w.data.is_empty() && w.trailers.is_none(),
                WholeLeft::Trailers => w.trailers.is_none(),
                WholeLeft::Nothing => true,
            },
            None => self.inner.as_ref().is_none_or(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (self.whole.as_deref(), &self.inner) {
            (Some((start, WholeLeft::Start)), Some(b)) => {
                // What was read ahead, and what is still to come.
                let ahead = start.data.len() as u64;
                let rest = b.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + ahead);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + ahead);
                }
                hint
            }
            (Some((w, WholeLeft::Data | WholeLeft::Start)), _) => {
                SizeHint::with_exact(w.data.len() as u64)
            }
            (Some(_), _) => SizeHint::with_exact(0),
            (None, Some(b)) => b.size_hint(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}
