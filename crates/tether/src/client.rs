//! Outbound HTTP calls bounded by a request context.
//!
//! [`Client`] wraps hyper-util's pooled client. For each call made with a [`RequestContext`] it:
//! - refuses to start when the context already fired;
//! - sends the time left (`ctx.remaining()`) in the budget header (default
//!   [`DEFAULT_BUDGET_HEADER`], rounded down to milliseconds) and optionally as `grpc-timeout`,
//!   so the upstream can stop on time by itself;
//! - when the context fires before the response head, drops the request future: on HTTP/1 hyper
//!   closes that upstream connection (the upstream sees EOF; it is never returned to the pool), on
//!   HTTP/2 it sends `RST_STREAM(CANCEL)` for that stream only. The call returns
//!   [`ClientError::Cancelled`] with the reason;
//! - wraps the response body in [`ClientBody`], which ends with the same error and drops the
//!   upstream body (same effect on the wire) when the context fires mid-stream.
//!
//! The underlying client retries requests that were never written to a reused connection
//! (`retry_canceled_requests`), which is safe but not counted.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::{self, connect::Connect, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use crate::body::{BoxError, CancelWatch};
use crate::budget::{self, DEFAULT_BUDGET_HEADER};
use crate::context::RequestContext;
use crate::reason::Cancelled;

/// Why an outbound call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request context fired first; the upstream call was aborted.
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
    /// The request failed (connect, write, or before the response head).
    #[error("upstream request failed")]
    Request(#[source] legacy::Error),
    /// The upstream response body failed mid-stream.
    #[error("upstream response body failed")]
    Body(#[source] hyper::Error),
}

impl ClientError {
    /// The cancellation, when the context fired first.
    pub fn cancelled(&self) -> Option<Cancelled> {
        match self {
            ClientError::Cancelled(c) => Some(*c),
            _ => None,
        }
    }
}

/// An outbound HTTP client that propagates the deadline and aborts with the context; see the
/// [module docs](self).
pub struct Client<C = HttpConnector, B = Full<Bytes>> {
    inner: legacy::Client<C, B>,
    budget_header: Option<HeaderName>,
    grpc_timeout: bool,
}

impl<C: Clone, B> Clone for Client<C, B> {
    fn clone(&self) -> Self {
        Client {
            inner: self.inner.clone(),
            budget_header: self.budget_header.clone(),
            grpc_timeout: self.grpc_timeout,
        }
    }
}

impl<C, B> fmt::Debug for Client<C, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("budget_header", &self.budget_header)
            .field("grpc_timeout", &self.grpc_timeout)
            .finish()
    }
}

impl Client<HttpConnector, Full<Bytes>> {
    /// A cleartext HTTP/1.1 client with hyper-util's default pool.
    pub fn new() -> Self {
        Client::from_legacy(legacy::Client::builder(TokioExecutor::new()).build_http())
    }

    /// A cleartext HTTP/2 (prior knowledge) client.
    pub fn http2_only() -> Self {
        Client::from_legacy(
            legacy::Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        )
    }
}

impl Default for Client<HttpConnector, Full<Bytes>> {
    fn default() -> Self {
        Client::new()
    }
}

impl<C, B> Client<C, B>
where
    C: Connect + Clone + Send + Sync + 'static,
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Wraps a configured hyper-util client (TLS connector, pool settings, ...).
    pub fn from_legacy(inner: legacy::Client<C, B>) -> Self {
        Client {
            inner,
            budget_header: Some(HeaderName::from_static(DEFAULT_BUDGET_HEADER)),
            grpc_timeout: false,
        }
    }

    /// The header carrying the time left, or `None` to send none. Default:
    /// [`DEFAULT_BUDGET_HEADER`].
    pub fn budget_header(mut self, name: Option<HeaderName>) -> Self {
        self.budget_header = name;
        self
    }

    /// Also sends the time left as `grpc-timeout`. Default: false.
    pub fn grpc_timeout(mut self, send: bool) -> Self {
        self.grpc_timeout = send;
        self
    }

    /// Sends `req` under `ctx`; see the [module docs](self). Budget headers already on the
    /// request are replaced.
    pub async fn request(
        &self,
        ctx: &RequestContext,
        mut req: Request<B>,
    ) -> Result<Response<ClientBody>, ClientError> {
        ctx.check()?;
        if let Some(left) = ctx.remaining() {
            if let Some(name) = &self.budget_header {
                req.headers_mut()
                    .insert(name.clone(), budget::format_budget_ms(left));
            }
            if self.grpc_timeout {
                req.headers_mut().insert(
                    HeaderName::from_static(budget::GRPC_TIMEOUT_HEADER),
                    budget::format_grpc_timeout(left),
                );
            }
        }
        // Dropping the request future on cancellation is what aborts the call on the wire.
        let resp = ctx
            .run(self.inner.request(req))
            .await?
            .map_err(ClientError::Request)?;
        Ok(resp.map(|body| ClientBody {
            inner: Some(body),
            ctx: ctx.clone(),
            watch: CancelWatch::new(),
            cut: None,
        }))
    }
}

impl<C, B> Client<C, B> {
    /// The wrapped hyper-util client.
    pub fn get_ref(&self) -> &legacy::Client<C, B> {
        &self.inner
    }
}

/// An upstream response body bounded by the request context: when the context fires, the
/// upstream body is dropped at once (HTTP/1: connection closed; HTTP/2: `RST_STREAM(CANCEL)`)
/// and the stream ends with [`ClientError::Cancelled`].
pub struct ClientBody {
    inner: Option<Incoming>,
    ctx: RequestContext,
    watch: CancelWatch,
    cut: Option<Cancelled>,
}

impl fmt::Debug for ClientBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBody")
            .field("ctx", &self.ctx)
            .field("cut", &self.cut)
            .finish()
    }
}

impl ClientBody {
    fn cut(&mut self, cancelled: Cancelled) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        // Drop the upstream body now rather than when the caller drops us.
        self.inner = None;
        self.cut = Some(cancelled);
        Poll::Ready(Some(Err(ClientError::Cancelled(cancelled))))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let this = &mut *self;
        if this.cut.is_some() {
            return Poll::Ready(None);
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Err(c) = this.ctx.check() {
            return this.cut(c);
        }
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(r)) => Poll::Ready(Some(r.map_err(ClientError::Body))),
            Poll::Pending => match this.watch.poll(&this.ctx, cx) {
                Poll::Ready(reason) => this.cut(Cancelled { reason }),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.cut.is_some() || self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
