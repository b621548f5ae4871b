//! The tower layer that gives every request a [`RequestContext`].
//!
//! [`ContextLayer`] wraps a service taking `http::Request<B>`. For each request it:
//! 1. makes a context: a child of the [`RequestContext`] already in the extensions (an outer
//!    layer), else of the connection's context ([`Downstream`], put there by
//!    [`serve`](crate::serve::serve)), else a new root; with a fresh [`RequestId`] (or a trusted
//!    incoming one) and a deadline from [`ContextLayer::timeout`] and, only when trusted, from an
//!    incoming budget header (which may shorten the deadline, never extend it);
//! 2. puts it in the request extensions (handlers take it from there, or with the axum
//!    extractor);
//! 3. cancels it with [`CancelReason::Deadline`] when the deadline passes, while the handler runs
//!    and while the response body streams. The handler is not interrupted: it sees the
//!    cancellation through the context;
//! 4. cancels it when the response future or the response body is dropped before its end, which
//!    is how hyper says the client left: HTTP/1 [`ClientClosed`](CancelReason::ClientClosed) or
//!    [`ClientReset`](CancelReason::ClientReset) (from the connection's
//!    [`DisconnectWatcher`] when present), HTTP/2
//!    [`StreamReset`](CancelReason::StreamReset), or
//!    [`ConnectionLost`](CancelReason::ConnectionLost) when the whole HTTP/2 connection went.
//!
//! Responses are wrapped in [`ContextBody`]; the request body is left alone (wrap it in
//! [`CancelOnError`](crate::body::CancelOnError) if the handler reads it and the server is not
//! [`serve`](crate::serve::serve)).
//!
//! The context is **not** cancelled when the response completes: work still running then (a task
//! from [`work::spawn`](crate::work::spawn) that outlives the handler) is not stopped by the
//! request's end.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, Request, Response, Version};
use http_body::Body;
use tokio::time::Instant;

use crate::body::{CancelWatch, ContextBody};
use crate::budget;
use crate::context::{Deadline, RequestContext, RequestId};
use crate::reason::CancelReason;
use crate::watch::{DisconnectWatcher, PeerGone};

/// The downstream connection a request arrived on, as [`serve`](crate::serve::serve) puts it in
/// every request's extensions. Other servers may insert it too.
#[derive(Clone, Debug)]
pub struct Downstream {
    ctx: RequestContext,
    watcher: Option<Weak<DisconnectWatcher>>,
    remote: Option<SocketAddr>,
    ended: Arc<AtomicBool>,
}

impl Downstream {
    /// A connection with context `ctx` (request contexts become its children).
    pub fn new(ctx: RequestContext) -> Downstream {
        Downstream {
            ctx,
            watcher: None,
            remote: None,
            ended: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Attaches the connection's disconnect watcher, used to tell a FIN from a RST when a handler
    /// is dropped. Held weakly, so a request kept alive does not keep the socket open.
    pub fn with_watcher(mut self, watcher: &Arc<DisconnectWatcher>) -> Downstream {
        self.watcher = Some(Arc::downgrade(watcher));
        self
    }

    /// Records the client's address.
    pub fn with_remote_addr(mut self, addr: SocketAddr) -> Downstream {
        self.remote = Some(addr);
        self
    }

    /// The connection's context: cancelled when the connection is lost or the server shuts down.
    pub fn context(&self) -> &RequestContext {
        &self.ctx
    }

    /// The client's address, if known.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote
    }

    /// Records that the connection has ended. Call it when the connection task finishes, before
    /// dropping the watcher: HTTP/2 streams run on their own tasks and may be dropped after it,
    /// and are then attributed to the connection loss.
    pub fn mark_ended(&self) {
        self.ended.store(true, Ordering::Release);
    }

    /// `Some` if the client is known to be gone: the connection's watcher saw it, or the
    /// connection has [ended](Self::mark_ended) (then reported as [`PeerGone::Closed`]).
    pub fn peer_gone(&self) -> Option<PeerGone> {
        let seen = self
            .watcher
            .as_ref()
            .and_then(Weak::upgrade)
            .and_then(|w| w.check_now());
        seen.or_else(|| {
            self.ended
                .load(Ordering::Acquire)
                .then_some(PeerGone::Closed)
        })
    }
}

/// Configuration shared by every service the layer builds.
#[derive(Debug, Clone)]
struct Config {
    timeout: Option<Duration>,
    budget_header: Option<HeaderName>,
    grpc_timeout: bool,
    request_id_header: Option<HeaderName>,
}

/// A tower [`Layer`](tower_layer::Layer) that gives each request a [`RequestContext`]; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct ContextLayer {
    config: Arc<Config>,
}

impl Default for ContextLayer {
    fn default() -> Self {
        ContextLayer::new()
    }
}

impl ContextLayer {
    /// A layer with no deadline, trusting no incoming header.
    pub fn new() -> ContextLayer {
        ContextLayer {
            config: Arc::new(Config {
                timeout: None,
                budget_header: None,
                grpc_timeout: false,
                request_id_header: None,
            }),
        }
    }

    fn update(mut self, f: impl FnOnce(&mut Config)) -> ContextLayer {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The total deadline of each request, response body included. Default: none.
    pub fn timeout(self, timeout: Duration) -> ContextLayer {
        self.update(|c| c.timeout = Some(timeout))
    }

    /// Honours a budget header (relative milliseconds, see [`budget`]) named `name`, usually
    /// [`budget::DEFAULT_BUDGET_HEADER`]. It can only shorten the deadline. Trust it only when
    /// every client that can reach the service is trusted. Default: not honoured.
    pub fn trust_budget_header(self, name: HeaderName) -> ContextLayer {
        self.update(|c| c.budget_header = Some(name))
    }

    /// Honours gRPC's `grpc-timeout` header; it can only shorten the deadline. Default: false.
    pub fn trust_grpc_timeout(self, trust: bool) -> ContextLayer {
        self.update(|c| c.grpc_timeout = trust)
    }

    /// Takes the request id from header `name` when present and valid (visible ASCII, at most 128
    /// bytes), instead of generating one. Default: always generated.
    pub fn trust_request_id_header(self, name: HeaderName) -> ContextLayer {
        self.update(|c| c.request_id_header = Some(name))
    }

    /// The context this layer would give `req` (without inserting it).
    pub fn context_for<B>(&self, req: &Request<B>) -> RequestContext {
        self.config.context_for(req)
    }
}

impl Config {
    fn context_for<B>(&self, req: &Request<B>) -> RequestContext {
        let id = self
            .request_id_header
            .as_ref()
            .and_then(|name| req.headers().get(name))
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty() && s.len() <= 128)
            .map(RequestId::new);
        let parent = req
            .extensions()
            .get::<RequestContext>()
            .or_else(|| req.extensions().get::<Downstream>().map(|d| &d.ctx));
        let ctx = match (parent, id) {
            (Some(p), Some(id)) => p.child_with_id(id),
            (Some(p), None) => p.child_with_id(RequestId::generate()),
            (None, Some(id)) => RequestContext::with_id(id),
            (None, None) => RequestContext::new(),
        };
        match self.budget(req) {
            Some(budget) => {
                let now = Instant::now();
                // A budget too large to represent is no limit at all.
                if now.checked_add(budget).is_some() {
                    ctx.child_with_deadline(Deadline::starting_at(now, budget))
                } else {
                    ctx
                }
            }
            None => ctx,
        }
    }

    fn budget<B>(&self, req: &Request<B>) -> Option<Duration> {
        let mut budget = self.timeout;
        let mut shorten = |d: Duration| {
            budget = Some(budget.map_or(d, |b| b.min(d)));
        };
        if let Some(name) = &self.budget_header
            && let Some(v) = req.headers().get(name)
        {
            match budget::parse_budget_header(v) {
                Ok(d) => shorten(d),
                Err(e) => tracing::debug!(header = %name, error = %e, "ignoring budget header"),
            }
        }
        if self.grpc_timeout
            && let Some(v) = req.headers().get(budget::GRPC_TIMEOUT_HEADER)
        {
            match budget::parse_grpc_timeout_header(v) {
                Ok(d) => shorten(d),
                Err(e) => tracing::debug!(error = %e, "ignoring grpc-timeout"),
            }
        }
        budget
    }
}

impl<S> tower_layer::Layer<S> for ContextLayer {
    type Service = ContextService<S>;

    fn layer(&self, inner: S) -> ContextService<S> {
        ContextService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service built by [`ContextLayer`].
#[derive(Debug, Clone)]
pub struct ContextService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> ContextService<S> {
    /// Wraps `inner` with the settings of `layer`.
    pub fn new(inner: S, layer: &ContextLayer) -> ContextService<S> {
        ContextService {
            inner,
            config: layer.config.clone(),
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B, ResBody> tower_service::Service<Request<B>> for ContextService<S>
where
    S: tower_service::Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<ContextBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let ctx = self.config.context_for(&req);
        let guard = RequestGuard {
            ctx: ctx.clone(),
            downstream: req.extensions().get::<Downstream>().cloned(),
            http2: req.version() == Version::HTTP_2,
            armed: true,
        };
        req.extensions_mut().insert(ctx);
        ResponseFuture {
            guard: Some(guard),
            watch: CancelWatch::new(),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`ContextService`].
    ///
    /// Dropping it before it completes cancels the request's context (see the [module
    /// docs](self)).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        // Declared first so that it is dropped first: the context is cancelled before the
        // handler's future is dropped, so the handler's drop guards see the reason.
        guard: Option<RequestGuard>,
        watch: CancelWatch,
        #[pin]
        inner: F,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Body,
{
    type Output = Result<Response<ContextBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(guard) = this.guard.as_ref()
            && guard.ctx.deadline().is_some()
        {
            // Only for its effect: a passed deadline cancels the context. The handler decides
            // what to answer.
            let _ = this.watch.poll(&guard.ctx, cx);
        }
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(resp)) => {
                let guard = this.guard.take();
                let watch = std::mem::replace(this.watch, CancelWatch::new());
                Poll::Ready(Ok(resp.map(|b| ContextBody::new(b, guard, watch))))
            }
            Poll::Ready(Err(e)) => {
                // The service failed on its own: not a cancellation.
                if let Some(g) = this.guard.take() {
                    g.disarm();
                }
                Poll::Ready(Err(e))
            }
        }
    }
}

/// Cancels a request's context when dropped armed, with the reason the drop implies.
#[derive(Debug)]
pub(crate) struct RequestGuard {
    ctx: RequestContext,
    downstream: Option<Downstream>,
    http2: bool,
    armed: bool,
}

impl RequestGuard {
    pub(crate) fn ctx(&self) -> &RequestContext {
        &self.ctx
    }

    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }

    /// Why hyper dropped the request: the connection went (the watcher saw it), or on HTTP/2 the
    /// stream alone was reset.
    fn drop_reason(&self) -> CancelReason {
        let gone = self.downstream.as_ref().and_then(Downstream::peer_gone);
        match (self.http2, gone) {
            (true, Some(_)) => CancelReason::ConnectionLost,
            (true, None) => CancelReason::StreamReset,
            (false, Some(g)) => g.reason(),
            (false, None) => CancelReason::ClientClosed,
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.armed && !self.ctx.is_cancelled() {
            let reason = self.drop_reason();
            if self.ctx.cancel(reason) {
                tracing::debug!(request_id = %self.ctx.id(), reason = %reason, "request dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower_layer::Layer;
    use tower_service::Service;

    #[derive(Clone)]
    struct Echo;

    impl Service<Request<()>> for Echo {
        type Response = Response<http_body_util::Full<bytes::Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: Request<()>) -> Self::Future {
            let ctx = req.extensions().get::<RequestContext>().cloned();
            let text = format!("{:?}", ctx.and_then(|c| c.remaining()));
            std::future::ready(Ok(Response::new(text.into())))
        }
    }

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn budget_header_only_when_trusted_and_only_shortens() {
        let h = [("x-request-timeout-ms", "500"), ("grpc-timeout", "2S")];
        let untrusted = ContextLayer::new().timeout(Duration::from_secs(1));
        assert_eq!(
            untrusted.context_for(&req(&h)).remaining(),
            Some(Duration::from_secs(1))
        );
        let trusted = untrusted
            .clone()
            .trust_budget_header(HeaderName::from_static(budget::DEFAULT_BUDGET_HEADER));
        assert_eq!(
            trusted.context_for(&req(&h)).remaining(),
            Some(Duration::from_millis(500))
        );
        let longer = [("x-request-timeout-ms", "5000")];
        assert_eq!(
            trusted.context_for(&req(&longer)).remaining(),
            Some(Duration::from_secs(1))
        );
        let grpc = ContextLayer::new().trust_grpc_timeout(true);
        assert_eq!(
            grpc.context_for(&req(&h)).remaining(),
            Some(Duration::from_secs(2))
        );
        let huge = [("x-request-timeout-ms", "18446744073709551615")];
        let no_timeout = ContextLayer::new()
            .trust_budget_header(HeaderName::from_static(budget::DEFAULT_BUDGET_HEADER));
        // Representable on this platform: a deadline centuries away, and no panic.
        let far = no_timeout.context_for(&req(&huge)).remaining();
        assert!(far.is_none_or(|d| d > Duration::from_secs(100 * 365 * 86_400)));
        let bad = [("x-request-timeout-ms", "soon")];
        assert_eq!(no_timeout.context_for(&req(&bad)).remaining(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn child_of_connection_and_dropped_future_cancels() {
        let conn = RequestContext::new();
        let mut svc = ContextLayer::new().layer(Echo);
        let mut r = req(&[]);
        r.extensions_mut().insert(Downstream::new(conn.clone()));
        let fut = svc.call(r);
        drop(fut);
        assert!(!conn.is_cancelled());

        // Reach into the context through a service that keeps it.
        #[derive(Clone)]
        struct Keep(Arc<std::sync::Mutex<Option<RequestContext>>>);
        impl Service<Request<()>> for Keep {
            type Response = Response<http_body_util::Empty<bytes::Bytes>>;
            type Error = Infallible;
            type Future = std::future::Pending<Result<Self::Response, Infallible>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: Request<()>) -> Self::Future {
                *self.0.lock().unwrap() = req.extensions().get::<RequestContext>().cloned();
                std::future::pending()
            }
        }
        let slot = Arc::new(std::sync::Mutex::new(None));
        let mut svc = ContextLayer::new().layer(Keep(slot.clone()));
        let mut r = Request::builder()
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        r.extensions_mut().insert(Downstream::new(conn.clone()));
        drop(svc.call(r));
        let ctx = slot.lock().unwrap().clone().unwrap();
        assert_eq!(ctx.reason(), Some(CancelReason::StreamReset));
        conn.cancel(CancelReason::Shutdown);
        assert_eq!(ctx.reason(), Some(CancelReason::StreamReset));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_cancels_while_pending() {
        let slot = Arc::new(std::sync::Mutex::new(None));
        #[derive(Clone)]
        struct Wait(Arc<std::sync::Mutex<Option<RequestContext>>>);
        impl Service<Request<()>> for Wait {
            type Response = Response<http_body_util::Empty<bytes::Bytes>>;
            type Error = Infallible;
            type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: Request<()>) -> Self::Future {
                let ctx = req.extensions().get::<RequestContext>().cloned().unwrap();
                *self.0.lock().unwrap() = Some(ctx.clone());
                Box::pin(async move {
                    // Ignores the context on purpose: the layer's timer must cancel it.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(Response::new(http_body_util::Empty::new()))
                })
            }
        }
        let mut svc = ContextLayer::new()
            .timeout(Duration::from_millis(300))
            .layer(Wait(slot.clone()));
        let started = Instant::now();
        let fut = svc.call(req(&[]));
        let fut = tokio::spawn(fut);
        tokio::time::sleep(Duration::from_millis(301)).await;
        let ctx = slot.lock().unwrap().clone().unwrap();
        assert_eq!(ctx.reason(), Some(CancelReason::Deadline));
        assert!(ctx.cause().unwrap().at - started <= Duration::from_millis(300));
        fut.await.unwrap().unwrap();
    }
}
