//! The least a reverse proxy built on hyper does, as a yardstick for `bench/instructions.sh`: what
//! hyper's HTTP/1.1 and HTTP/2 servers, hyper's HTTP/1.1 client and tokio cost per proxied
//! request before any of tether's own work (routing, request ids, forwarding headers, the
//! cancellation context, timeouts, retries, the access log, metrics).
//!
//! One thread with tokio's current-thread runtime (as each of tether's workers), HTTP/1.1 on
//! `--listen` and cleartext HTTP/2 with prior knowledge on `--listen-h2`, every request passed
//! to one HTTP/1.1 upstream over keep-alive connections from a thread-local pool, bodies
//! streamed both ways, `Connection` and `Keep-Alive` dropped, jemalloc as the allocator (as
//! tether's). Nothing else: no limits, no timeouts, a 502 without a body for any upstream error.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use clap::Parser;
use http::header::{CONNECTION, HOST, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(about = "A bare hyper reverse proxy: the yardstick for tether's per-request cost")]
struct Args {
    /// HTTP/1.1 listening address.
    #[arg(long)]
    listen: SocketAddr,
    /// Cleartext HTTP/2 (prior knowledge) listening address.
    #[arg(long)]
    listen_h2: Option<SocketAddr>,
    /// The HTTP/1.1 upstream every request goes to.
    #[arg(long)]
    upstream: SocketAddr,
}

thread_local! {
    /// Idle upstream connections; one thread, so no lock.
    static POOL: RefCell<Vec<SendRequest<Incoming>>> = const { RefCell::new(Vec::new()) };
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let h1 = TcpListener::bind(args.listen).await?;
        let h2 = match args.listen_h2 {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        let upstream = args.upstream;
        if let Some(h2) = h2 {
            tokio::spawn(accept(h2, upstream, true));
        }
        accept(h1, upstream, false).await;
        Ok(())
    })
}

async fn accept(listener: TcpListener, upstream: SocketAddr, h2: bool) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let svc = service_fn(move |req| proxy(req, upstream));
        let io = TokioIo::new(tcp);
        if h2 {
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc)
                    .await;
            });
        } else {
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    }
}

async fn proxy(
    req: Request<Incoming>,
    upstream: SocketAddr,
) -> Result<Response<PoolBody>, Infallible> {
    let (mut parts, body) = req.into_parts();
    parts.headers.remove(CONNECTION);
    parts.headers.remove(KEEP_ALIVE);
    if !parts.headers.contains_key(HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(HOST, v);
    }
    let path = std::mem::take(&mut parts.uri)
        .into_parts()
        .path_and_query
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(path);
    parts.version = Version::HTTP_11;
    let Some(mut sender) = checkout(upstream).await else {
        return Ok(bad_gateway());
    };
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            parts.headers.remove(CONNECTION);
            parts.headers.remove(KEEP_ALIVE);
            Ok(Response::from_parts(
                parts,
                PoolBody {
                    inner: Some(body),
                    sender: Some(sender),
                },
            ))
        }
        Err(_) => Ok(bad_gateway()),
    }
}

/// A pooled connection that is ready for a request, or a new one.
async fn checkout(upstream: SocketAddr) -> Option<SendRequest<Incoming>> {
    while let Some(mut s) = POOL.with(|p| p.borrow_mut().pop()) {
        if s.ready().await.is_ok() {
            return Some(s);
        }
    }
    let tcp = TcpStream::connect(upstream).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

fn bad_gateway() -> Response<PoolBody> {
    let mut r = Response::new(PoolBody {
        inner: None,
        sender: None,
    });
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// The upstream's response body; its connection goes back to the pool when the body has ended.
struct PoolBody {
    inner: Option<Incoming>,
    sender: Option<SendRequest<Incoming>>,
}

impl PoolBody {
    fn give_back(&mut self) {
        if let Some(s) = self.sender.take() {
            POOL.with(|p| p.borrow_mut().push(s));
        }
    }
}

impl Body for PoolBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.inner.as_ref().is_some_and(Body::is_end_stream) => {
                this.give_back()
            }
            // A failed body leaves the connection unusable: dropped with the sender.
            Poll::Ready(Some(Err(_))) => this.sender = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
