//! Per-request overhead of tether's serving path against plain hyper, on small responses.
//!
//! Run with:
//!
//! ```text
//! cargo bench -p tether --bench layer_overhead
//! ```
//!
//! Three groups, each on loopback with one keep-alive HTTP/1.1 connection driven by hyper's
//! client, so the numbers are round trips (client + server on one multi-thread runtime, each
//! iteration entered with `block_on`, which costs the same in every group):
//! - `plain_hyper`: `hyper::server::conn::http1` with a `service_fn`;
//! - `context_layer`: the same server with the service wrapped in `ContextLayer` (context per
//!   request, guard, body wrapper);
//! - `tether_serve`: `tether::serve::serve` (auto h1/h2, disconnect watcher, layer).
//!
//! Plus `layer_only`: the layer's `call` + response future in memory, no sockets.
//! Results depend heavily on the machine; compare the groups, not absolute numbers.

// A benchmark harness: a failure should abort loudly.
#![allow(missing_docs, clippy::unwrap_used)]

use std::convert::Infallible;
use std::future::Ready;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tether::ContextLayer;
use tether::serve::{ServeOptions, serve};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tower_layer::Layer;
use tower_service::Service;

#[derive(Clone, Copy)]
struct Hello;

impl<B> Service<Request<B>> for Hello {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"hello")))))
    }
}

/// Adapts a cloneable tower service for hyper's `serve_connection`.
#[derive(Clone)]
struct Hyper<S>(S);

impl<S> hyper::service::Service<Request<Incoming>> for Hyper<S>
where
    S: Service<Request<Incoming>> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.0.clone().call(req)
    }
}

async fn plain_server<S, B>(svc: S) -> std::net::SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let svc = Hyper(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

async fn client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn round_trip(send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) {
    send.ready().await.unwrap();
    let resp = send
        .send_request(Request::get("/").body(Empty::new()).unwrap())
        .await
        .unwrap();
    let _ = resp.into_body().collect().await.unwrap();
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();

    let mut group = c.benchmark_group("round_trip");
    group.measurement_time(Duration::from_secs(5));

    let mut plain = rt.block_on(async { client(plain_server(Hello).await).await });
    group.bench_function("plain_hyper", |b| {
        b.iter(|| rt.block_on(round_trip(&mut plain)))
    });

    let layered = ContextLayer::new()
        .timeout(Duration::from_secs(30))
        .layer(Hello);
    let mut with_layer = rt.block_on(async { client(plain_server(layered).await).await });
    group.bench_function("context_layer", |b| {
        b.iter(|| rt.block_on(round_trip(&mut with_layer)))
    });

    let mut served = rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let opts = ServeOptions::new().layer(ContextLayer::new().timeout(Duration::from_secs(30)));
        tokio::spawn(serve(l, Hello, opts));
        client(addr).await
    });
    group.bench_function("tether_serve", |b| {
        b.iter(|| rt.block_on(round_trip(&mut served)))
    });
    group.finish();

    let mut svc = ContextLayer::new()
        .timeout(Duration::from_secs(30))
        .layer(Hello);
    c.bench_function("layer_only", |b| {
        b.iter(|| {
            let fut = svc.call(Request::new(()));
            rt.block_on(async move {
                let resp = fut.await.unwrap();
                let _ = resp.into_body().collect().await.unwrap();
            })
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
