//! A tiny "hello" server, served either by plain hyper or by `tether::serve` (disconnect
//! watcher, request context, body wrappers), to measure what tether costs per request.
//!
//! Run with:
//!
//! ```text
//! cargo run --release -p tether --example overhead_server -- plain 127.0.0.1:3000
//! cargo run --release -p tether --example overhead_server -- tether 127.0.0.1:3001
//! ```
//!
//! `bench/layer-overhead.sh` runs both under wrk, side by side.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(
        b"hello, world\n",
    ))))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "tether".into());
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3000".into());
    // One thread: the server's CPU is what is compared.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        eprintln!("{mode} serving on http://{}", listener.local_addr()?);
        match mode.as_str() {
            "plain" => plain(listener).await,
            "tether" => {
                let svc = tower_service_fn(hello);
                tether::serve::serve(listener, svc, tether::serve::ServeOptions::new()).await;
                Ok(())
            }
            other => Err(format!("unknown mode {other:?}: plain | tether").into()),
        }
    })
}

async fn plain(listener: TcpListener) -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let builder = std::sync::Arc::new(builder);
    loop {
        let (tcp, _) = listener.accept().await?;
        let builder = builder.clone();
        tokio::spawn(async move {
            let _ = builder
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(hello))
                .await;
        });
    }
}

/// A `tower_service::Service` from an async fn, so the example needs no extra crate.
fn tower_service_fn<F, Fut>(f: F) -> ServiceFn<F>
where
    F: Fn(Request<Incoming>) -> Fut + Clone,
{
    ServiceFn(f)
}

#[derive(Clone)]
struct ServiceFn<F>(F);

impl<F, Fut> tower_service::Service<Request<Incoming>> for ServiceFn<F>
where
    F: Fn(Request<Incoming>) -> Fut + Clone,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Fut;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Fut {
        (self.0)(req)
    }
}
