//! A server entry point that wires connection events into request contexts.
//!
//! [`serve`] accepts TCP connections and runs hyper-util's `auto` connection (HTTP/1.1 and
//! cleartext HTTP/2 with prior knowledge) for each, wrapping the service in [`ContextLayer`].
//! With the `tls` feature and [`ServeOptions::tls`], every connection is TLS first (rustls), and
//! ALPN offers `h2` and `http/1.1`.
//!
//! LIFECYCLE of one connection:
//! 1. accepted: a connection context is made as a child of the server's context, and a
//!    [`DisconnectWatcher`] is registered on a duplicate of the socket (for its close and errors
//!    only);
//! 2. each request gets a [`Downstream`] in its extensions and a request context, a child of the
//!    connection's (see [`layer`](crate::layer));
//! 3. the client leaves:
//!    - the watcher sees FIN/RST (it sees them even when hyper does not read: unread request
//!      body, pipelined bytes): the connection context is cancelled with
//!      [`ClientClosed`](CancelReason::ClientClosed) / [`ClientReset`](CancelReason::ClientReset)
//!      on HTTP/1, [`ConnectionLost`](CancelReason::ConnectionLost) on HTTP/2, and the connection
//!      is dropped, which drops every handler still running on it;
//!    - an HTTP/2 stream reset: hyper drops that handler only, and the layer cancels its context
//!      with [`StreamReset`](CancelReason::StreamReset);
//!    - the client went silent for good (a crashed host, a dropped network): TCP keepalive
//!      probes ([`ServeOptions::tcp_keepalive`]) make the kernel give up on the socket, and an
//!      HTTP/2 PING left unanswered ([`ServeOptions::h2_ping`]) closes the connection; either way
//!      the connection context is cancelled with [`PeerDead`](CancelReason::PeerDead);
//!    - the connection fails otherwise (protocol error, h2 connection error): like the watcher;
//! 4. shutdown: accepting stops, every connection is asked to finish gracefully (HTTP/1 closes
//!    after the response in flight, HTTP/2 sends GOAWAY) for [`ServeOptions::grace`]; then every
//!    remaining context is cancelled with [`Shutdown`](CancelReason::Shutdown), handlers get
//!    [`ServeOptions::cleanup_window`] to answer, and the connections are dropped.
//!
//! The request body reaches the service as hyper's `Incoming`. With `serve`, a client leaving
//! mid-upload is caught by the watcher (HTTP/1) or by hyper (HTTP/2 reset). Handlers that read
//! the body can also wrap it in [`CancelOnError`](crate::body::CancelOnError) so that a read error
//! cancels the context at once, whatever the server.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::body::{BoxError, ContextBody};
use crate::context::{RequestContext, RequestId};
use crate::layer::{ContextLayer, ContextService, Downstream};
use crate::reason::CancelReason;
use crate::watch::{DisconnectWatcher, PeerGone};

/// Settings for [`serve`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    layer: ContextLayer,
    shutdown: CancellationToken,
    grace: Duration,
    cleanup_window: Duration,
    tcp_keepalive: Option<TcpKeepalive>,
    h2_ping: Option<(Duration, Duration)>,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ServerConfig>>,
    #[cfg(feature = "tls")]
    tls_handshake_timeout: Duration,
}

/// TCP keepalive on accepted connections: after `idle` of silence the kernel sends a probe
/// every `interval`; after `probes` unanswered ones it gives up on the peer.
#[derive(Debug, Clone, Copy)]
struct TcpKeepalive {
    idle: Duration,
    interval: Duration,
    probes: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions::new()
    }
}

impl ServeOptions {
    /// Default options: a [`ContextLayer::new`] layer, no shutdown signal, 30 s grace, 1 s
    /// cleanup window, TCP keepalive probes after 10 s of silence (every 5 s, 3 of them) and an
    /// HTTP/2 PING after 20 s of silence, answered within 10 s.
    pub fn new() -> ServeOptions {
        ServeOptions {
            layer: ContextLayer::new(),
            shutdown: CancellationToken::new(),
            grace: Duration::from_secs(30),
            cleanup_window: Duration::from_secs(1),
            tcp_keepalive: Some(TcpKeepalive {
                idle: Duration::from_secs(10),
                interval: Duration::from_secs(5),
                probes: 3,
            }),
            h2_ping: Some((Duration::from_secs(20), Duration::from_secs(10))),
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "tls")]
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Serves TLS with `config`: every accepted connection is handshaken first. When the
    /// config names no ALPN protocols, `h2` and `http/1.1` are offered. A handshake that fails
    /// or takes longer than [`tls_handshake_timeout`](Self::tls_handshake_timeout) closes the
    /// connection (logged at debug level); no request was made, so no context is involved.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> ServeOptions {
        let config = if config.alpn_protocols.is_empty() {
            let mut c = (*config).clone();
            c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(c)
        } else {
            config
        };
        self.tls = Some(config);
        self
    }

    /// How long a client may take to complete the TLS handshake. Default: 10 s.
    #[cfg(feature = "tls")]
    pub fn tls_handshake_timeout(mut self, timeout: Duration) -> ServeOptions {
        self.tls_handshake_timeout = timeout;
        self
    }

    /// TCP keepalive on every accepted connection, so that a client that died without a word
    /// (crashed host, cut network) is noticed: after `idle` of silence a probe is sent every
    /// `interval`, and after `probes` unanswered ones the connection's context is cancelled with
    /// [`CancelReason::PeerDead`]. The kernel counts whole seconds. `None` turns it off.
    /// Default: 10 s, 5 s, 3.
    pub fn tcp_keepalive(mut self, probing: Option<(Duration, Duration, u32)>) -> ServeOptions {
        self.tcp_keepalive = probing.map(|(idle, interval, probes)| TcpKeepalive {
            idle,
            interval,
            probes: probes.max(1),
        });
        self
    }

    /// HTTP/2 PING after `interval` of silence on a connection; unanswered for `timeout`, the
    /// connection is closed and its context cancelled with [`CancelReason::PeerDead`]. `None`
    /// turns it off. Default: 20 s, 10 s.
    pub fn h2_ping(mut self, ping: Option<(Duration, Duration)>) -> ServeOptions {
        self.h2_ping = ping;
        self
    }

    /// The context layer applied to every request (deadline, trusted headers). Do not add another
    /// `ContextLayer` inside the service: it would only nest a child context. Default:
    /// [`ContextLayer::new`].
    pub fn layer(mut self, layer: ContextLayer) -> ServeOptions {
        self.layer = layer;
        self
    }

    /// Starts a graceful shutdown when `token` is cancelled. Default: never.
    pub fn shutdown(mut self, token: CancellationToken) -> ServeOptions {
        self.shutdown = token;
        self
    }

    /// How long in-flight requests may run after shutdown starts before their contexts are
    /// cancelled with [`CancelReason::Shutdown`]. Default: 30 s.
    pub fn grace(mut self, grace: Duration) -> ServeOptions {
        self.grace = grace;
        self
    }

    /// After the grace period, how long handlers get to answer (or clean up) once their contexts
    /// were cancelled, before their connections are dropped. Default: 1 s.
    pub fn cleanup_window(mut self, window: Duration) -> ServeOptions {
        self.cleanup_window = window;
        self
    }
}

/// Serves `service` on `listener` until the shutdown token of `options` is cancelled and the
/// connections are drained; see the [module docs](self).
///
/// The service is wrapped in the options' [`ContextLayer`], so handlers find a
/// [`RequestContext`] and a [`Downstream`] in the request extensions. An axum `Router` (after
/// `with_state`) fits as is.
pub async fn serve<S, B>(listener: TcpListener, service: S, options: ServeOptions)
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let server_ctx = RequestContext::with_id(RequestId::new("server"));
    let drain = CancellationToken::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    if let Some((interval, timeout)) = options.h2_ping {
        builder
            .http2()
            .keep_alive_interval(interval)
            .keep_alive_timeout(timeout);
    }
    let builder = Arc::new(builder);
    let service = ContextService::new(service, &options.layer);
    let mut conns = JoinSet::new();

    loop {
        tokio::select! {
            biased;
            // Shutdown first: stop accepting even if connections keep arriving.
            _ = options.shutdown.cancelled() => break,
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    let conn = Conn {
                        ctx: server_ctx.child(),
                        builder: builder.clone(),
                        drain: drain.clone(),
                        keepalive: options.tcp_keepalive,
                        #[cfg(feature = "tls")]
                        tls: options.tls.clone().map(|a| (a, options.tls_handshake_timeout)),
                    };
                    conns.spawn(conn.run(tcp, remote, service.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    drain.cancel();
    let drained = tokio::time::timeout(options.grace, join_all(&mut conns)).await;
    if drained.is_err() {
        tracing::info!(
            connections = conns.len(),
            "grace period over, cancelling requests"
        );
        server_ctx.cancel(CancelReason::Shutdown);
        let _ = tokio::time::timeout(options.cleanup_window, join_all(&mut conns)).await;
        conns.abort_all();
        join_all(&mut conns).await;
    }
}

async fn join_all(set: &mut JoinSet<()>) {
    while set.join_next().await.is_some() {}
}

struct Conn {
    ctx: RequestContext,
    builder: Arc<auto::Builder<TokioExecutor>>,
    drain: CancellationToken,
    keepalive: Option<TcpKeepalive>,
    #[cfg(feature = "tls")]
    tls: Option<(Arc<rustls::ServerConfig>, Duration)>,
}

impl Conn {
    async fn run<S, B>(self, tcp: TcpStream, remote: SocketAddr, service: ContextService<S>)
    where
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let _ = tcp.set_nodelay(true);
        if let Some(k) = self.keepalive {
            let probing = socket2::TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.probes);
            if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&probing) {
                tracing::debug!(error = %e, "cannot set TCP keepalive on this connection");
            }
        }
        let watcher = match DisconnectWatcher::new(&tcp) {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                tracing::debug!(error = %e, "no disconnect watcher for this connection");
                None
            }
        };
        let mut downstream = Downstream::new(self.ctx.clone()).with_remote_addr(remote);
        if let Some(w) = &watcher {
            downstream = downstream.with_watcher(w);
        }
        #[cfg(feature = "tls")]
        if let Some((config, limit)) = self.tls.clone() {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            // The watcher sees the client leave during the handshake too; the drain does not
            // wait for a handshake.
            let handshake = tokio::time::timeout(limit, acceptor.accept(tcp));
            let tls = tokio::select! {
                r = handshake => r,
                _ = gone(watcher.as_deref()) => return,
                _ = self.drain.cancelled() => return,
            };
            match tls {
                Ok(Ok(tls)) => {
                    self.drive(tls, remote, service, watcher, downstream).await;
                }
                Ok(Err(e)) => tracing::debug!(remote = %remote, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(remote = %remote, "TLS handshake timed out"),
            }
            return;
        }
        self.drive(tcp, remote, service, watcher, downstream).await;
    }

    /// Serves one connection over `io` (the TCP socket, or TLS on it).
    async fn drive<I, S, B>(
        self,
        io: I,
        remote: SocketAddr,
        service: ContextService<S>,
        watcher: Option<Arc<DisconnectWatcher>>,
        downstream: Downstream,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let http2 = Arc::new(AtomicBool::new(false));
        let svc = HyperService {
            inner: service,
            downstream: downstream.clone(),
            http2: http2.clone(),
        };
        let conn = self.builder.serve_connection(TokioIo::new(io), svc);
        let mut conn = std::pin::pin!(conn);
        let mut draining = false;
        let result = loop {
            tokio::select! {
                biased;
                // The connection ended: the normal exit.
                res = conn.as_mut() => break res,
                // The client left, whether or not hyper is reading: stop its work now and drop
                // the connection (and with it any handler still running).
                gone = gone(watcher.as_deref()) => {
                    let reason = if http2.load(Ordering::Relaxed) && gone != PeerGone::Dead {
                        CancelReason::ConnectionLost
                    } else {
                        gone.reason()
                    };
                    if self.ctx.cancel(reason) {
                        tracing::debug!(remote = %remote, reason = %reason, "client gone");
                    }
                    downstream.mark_ended();
                    return;
                }
                // Shutdown: finish what is in flight, take nothing new.
                _ = self.drain.cancelled(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        };
        downstream.mark_ended();
        if let Err(e) = result {
            let reason = if peer_dead(&*e) {
                CancelReason::PeerDead
            } else if http2.load(Ordering::Relaxed) {
                CancelReason::ConnectionLost
            } else {
                watcher
                    .as_ref()
                    .and_then(|w| w.check_now())
                    .map_or(CancelReason::ClientClosed, |g| g.reason())
            };
            if self.ctx.cancel(reason) {
                tracing::debug!(remote = %remote, reason = %reason, error = %e, "connection failed");
            }
        }
    }
}

/// Whether a connection error says the peer went silent for good: an HTTP/2 PING left
/// unanswered, or the kernel giving up on the socket (keepalive probes), whose error hyper may
/// read before the watcher does.
fn peer_dead(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
            || err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = err.source();
    }
    false
}

async fn gone(watcher: Option<&DisconnectWatcher>) -> crate::watch::PeerGone {
    match watcher {
        Some(w) => w.gone().await,
        None => std::future::pending().await,
    }
}

/// Adapts the tower service to hyper, adding the connection's [`Downstream`] to each request.
#[derive(Clone)]
struct HyperService<S> {
    inner: ContextService<S>,
    downstream: Downstream,
    http2: Arc<AtomicBool>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> hyper::service::Service<Request<Incoming>> for HyperService<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
{
    type Response = Response<ContextBody<B>>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if req.version() == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        req.extensions_mut().insert(self.downstream.clone());
        let mut svc = self.inner.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut svc, cx))
                .await
                .map_err(Into::into)?;
            tower_service::Service::call(&mut svc, req)
                .await
                .map_err(Into::into)
        })
    }
}
