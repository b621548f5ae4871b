//! Body wrappers that connect HTTP bodies to a [`RequestContext`].
//!
//! - [`CancelOnError`] wraps a *request* body: a read error (the client closed or reset the
//!   connection mid-upload, or reset the HTTP/2 stream) cancels the context. hyper's HTTP/1
//!   server does **not** drop a handler whose body read failed, so without this (or
//!   [`serve`](crate::serve::serve)'s disconnect watcher) the handler would run on.
//! - [`ContextBody`] wraps a *response* body (the [layer](crate::layer) does it): the request
//!   stays armed until the body ends, so a client leaving mid-stream cancels the context, and a
//!   context that fires mid-stream cuts the response.

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};

use crate::context::RequestContext;
use crate::layer::RequestGuard;
use crate::reason::{CancelReason, Cancelled};

/// A boxed error, as hyper and tower use.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Lazily allocated wait for a context to fire (its deadline included), for poll-based code.
pub(crate) struct CancelWatch {
    fut: Option<Pin<Box<dyn Future<Output = CancelReason> + Send>>>,
    done: Option<CancelReason>,
}

impl CancelWatch {
    pub(crate) fn new() -> CancelWatch {
        CancelWatch {
            fut: None,
            done: None,
        }
    }

    /// Ready with the reason once `ctx` was cancelled or its deadline passed (which cancels it).
    pub(crate) fn poll(
        &mut self,
        ctx: &RequestContext,
        cx: &mut Context<'_>,
    ) -> Poll<CancelReason> {
        if let Some(r) = self.done {
            return Poll::Ready(r);
        }
        let fut = self.fut.get_or_insert_with(|| {
            let ctx = ctx.clone();
            Box::pin(async move { ctx.cancelled().await })
        });
        match fut.as_mut().poll(cx) {
            Poll::Ready(r) => {
                self.done = Some(r);
                self.fut = None;
                Poll::Ready(r)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl fmt::Debug for CancelWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelWatch")
            .field("done", &self.done)
            .finish()
    }
}

pin_project_lite::pin_project! {
    /// A request body whose read errors cancel a [`RequestContext`]; see the [module docs](self).
    ///
    /// The reason is taken from the error: an I/O reset is [`CancelReason::ClientReset`], an
    /// HTTP/2 stream reset [`CancelReason::StreamReset`], anything else (an early EOF)
    /// [`CancelReason::ClientClosed`]. The error itself is passed on unchanged.
    #[derive(Debug)]
    pub struct CancelOnError<B> {
        #[pin]
        inner: B,
        ctx: RequestContext,
    }
}

impl<B> CancelOnError<B> {
    /// Wraps `body` so that its read errors cancel `ctx`.
    pub fn new(body: B, ctx: RequestContext) -> CancelOnError<B> {
        CancelOnError { inner: body, ctx }
    }

    /// The wrapped body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> Body for CancelOnError<B>
where
    B: Body,
    B::Error: StdError + 'static,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let out = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &out {
            let reason = reason_from_error(e);
            if this.ctx.cancel(reason) {
                tracing::debug!(request_id = %this.ctx.id(), reason = %reason, error = %e, "request body failed");
            }
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The cancel reason a downstream body error implies.
pub(crate) fn reason_from_error(err: &(dyn StdError + 'static)) -> CancelReason {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return CancelReason::from_io_error(io);
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.is_go_away() || h2.is_io() {
                return CancelReason::ConnectionLost;
            }
            return CancelReason::StreamReset;
        }
        cur = e.source();
    }
    CancelReason::ClientClosed
}

/// The error a [`ContextBody`] yields when the context fires mid-stream.
///
/// Its source is `h2::Error` with reason `CANCEL`, so hyper's HTTP/2 server resets the stream with
/// `RST_STREAM(CANCEL)` rather than `INTERNAL_ERROR`; an HTTP/1 server closes the connection
/// without the final chunk.
#[derive(Debug, thiserror::Error)]
#[error("response cut: {cancelled}")]
pub struct BodyCancelled {
    /// Why the context fired.
    pub cancelled: Cancelled,
    #[source]
    h2: h2::Error,
}

impl BodyCancelled {
    pub(crate) fn new(reason: CancelReason) -> BodyCancelled {
        BodyCancelled {
            cancelled: Cancelled { reason },
            h2: h2::Error::from(h2::Reason::CANCEL),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body tied to its request's context (the [layer](crate::layer) wraps every
    /// response in it).
    ///
    /// - Dropped before its end (the client left mid-stream): cancels the context, with the same
    ///   reason rules as a dropped handler.
    /// - The context fires while it streams (deadline, shutdown): the stream ends with a
    ///   [`BodyCancelled`] error, which cuts the response.
    /// - Ends normally: the context stays live.
    pub struct ContextBody<B> {
        #[pin]
        inner: B,
        guard: Option<RequestGuard>,
        watch: CancelWatch,
        done: bool,
    }
}

impl<B: fmt::Debug> fmt::Debug for ContextBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextBody")
            .field("inner", &self.inner)
            .field("armed", &self.guard.is_some())
            .finish()
    }
}

impl<B: Body> ContextBody<B> {
    pub(crate) fn new(inner: B, guard: Option<RequestGuard>, watch: CancelWatch) -> ContextBody<B> {
        // hyper may never poll a body that is empty from the start.
        let guard = match guard {
            Some(g) if inner.is_end_stream() => {
                g.disarm();
                None
            }
            other => other,
        };
        ContextBody {
            inner,
            guard,
            watch,
            done: false,
        }
    }
}

impl<B> Body for ContextBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let Some(guard) = this.guard.as_ref() else {
            // Not tied to a context (already disarmed): pass through.
            return this.inner.poll_frame(cx).map_err(Into::into);
        };
        let ctx = guard.ctx().clone();
        if let Some(reason) = ctx.is_cancelled().then(|| ctx.reason()).flatten() {
            return cut(this.done, this.guard, reason);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                finish(this.done, this.guard);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                // hyper may drop a body that reports its end without polling it again.
                if this.inner.is_end_stream() {
                    finish(this.done, this.guard);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The body's own failure is not a cancellation.
                finish(this.done, this.guard);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => match this.watch.poll(&ctx, cx) {
                Poll::Ready(reason) => cut(this.done, this.guard, reason),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> ContextBody<B> {
    /// True once the body ended or was cut.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

fn finish(done: &mut bool, guard: &mut Option<RequestGuard>) {
    *done = true;
    if let Some(g) = guard.take() {
        g.disarm();
    }
}

fn cut<D: Buf>(
    done: &mut bool,
    guard: &mut Option<RequestGuard>,
    reason: CancelReason,
) -> Poll<Option<Result<Frame<D>, BoxError>>> {
    finish(done, guard);
    Poll::Ready(Some(Err(Box::new(BodyCancelled::new(reason)))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    /// A body that fails at once with `kind`.
    struct Failing(std::io::ErrorKind);

    impl Body for Failing {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(Some(Err(self.0.into())))
        }
    }

    #[tokio::test]
    async fn request_body_error_cancels_with_its_reason() {
        let ctx = RequestContext::new();
        let body = CancelOnError::new(Failing(std::io::ErrorKind::ConnectionReset), ctx.clone());
        assert!(body.collect().await.is_err());
        assert_eq!(ctx.reason(), Some(CancelReason::ClientReset));

        let ctx = RequestContext::new();
        let body = CancelOnError::new(Failing(std::io::ErrorKind::UnexpectedEof), ctx.clone());
        assert!(body.collect().await.is_err());
        assert_eq!(ctx.reason(), Some(CancelReason::ClientClosed));
    }

    #[test]
    fn body_cancelled_carries_h2_cancel_in_its_source() {
        let e = BodyCancelled::new(CancelReason::Deadline);
        let src = StdError::source(&e).and_then(|s| s.downcast_ref::<h2::Error>());
        assert_eq!(src.and_then(h2::Error::reason), Some(h2::Reason::CANCEL));
    }
}
