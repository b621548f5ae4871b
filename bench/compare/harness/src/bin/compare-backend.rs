//! The benchmark's upstream: a small hyper server (HTTP/1.1 and h2c on one port) that is not
//! tether, so every proxy is measured against the same independent peer.
//!
//! Run with `compare-backend --listen 127.0.0.1:9000 --threads 2`.
//!
//! - `GET /` a fixed 100-byte body (load tests);
//! - `GET /work?ms=N&id=X` answers after N ms, and records per id when the work started and when it
//!   completed or observed its cancellation (hyper drops the handler future when the proxy closes
//!   the h1 connection or resets the h2 stream);
//! - `GET /records` the records as JSON (`?clear=1` also forgets them);
//! - `GET /large?bytes=N` N bytes streamed in 64 KiB chunks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use compare_harness::clock::mono_ns;
use compare_harness::records::{Outcome, Records, WorkRecord};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::Full;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Options.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Runtime worker threads (fixed, so every proxy meets the same backend).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// The fixed body of `/`: 100 bytes, as in the earlier throughput spike.
const SMALL: &[u8; 100] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz\n\n";

/// Chunk size of `/large`.
const CHUNK: usize = 64 * 1024;

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

#[derive(Debug, Default)]
struct State {
    records: Mutex<Records>,
}

impl State {
    fn set(&self, id: &str, rec: WorkRecord) {
        if let Ok(mut m) = self.records.lock() {
            m.insert(id.to_owned(), rec);
        }
    }
}

/// Marks a `/work` request cancelled when its handler is dropped before it finished.
struct WorkGuard {
    state: Arc<State>,
    id: String,
    start_ns: u64,
    done: bool,
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        let now = mono_ns();
        let outcome = if self.done {
            Outcome::Completed
        } else {
            Outcome::Cancelled
        };
        self.state.set(
            &self.id,
            WorkRecord {
                start_ns: self.start_ns,
                end_ns: Some(now),
                outcome,
            },
        );
    }
}

/// `bytes` of 'x', handed out as slices of one shared chunk.
struct Large {
    remaining: u64,
    chunk: Bytes,
}

impl Body for Large {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    large: Bytes,
) -> Result<Response<RespBody>, Infallible> {
    let query = req.uri().query();
    let resp = match req.uri().path() {
        "/" => full(StatusCode::OK, Bytes::from_static(SMALL)),
        "/work" => {
            let ms: u64 = query_param(query, "ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            let id = query_param(query, "id").unwrap_or("none").to_owned();
            let start_ns = mono_ns();
            state.set(
                &id,
                WorkRecord {
                    start_ns,
                    end_ns: None,
                    outcome: Outcome::Running,
                },
            );
            let mut guard = WorkGuard {
                state: state.clone(),
                id,
                start_ns,
                done: false,
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            guard.done = true;
            drop(guard);
            full(StatusCode::OK, "done\n")
        }
        "/records" => {
            let clear = query_param(query, "clear") == Some("1");
            let body = match state.records.lock() {
                Ok(mut m) => {
                    let s = serde_json::to_vec(&*m).unwrap_or_default();
                    if clear {
                        m.clear();
                    }
                    s
                }
                Err(_) => b"{}".to_vec(),
            };
            full(StatusCode::OK, body)
        }
        "/large" => {
            let bytes: u64 = query_param(query, "bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1 << 20);
            Response::new(
                Large {
                    remaining: bytes,
                    chunk: large,
                }
                .boxed_unsync(),
            )
        }
        _ => full(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(resp)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("compare-backend: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(args.listen)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare-backend: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let state = Arc::new(State::default());
    let large = Bytes::from(vec![b'x'; CHUNK]);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of descriptors or similar: keep serving the connections we have.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let large = large.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, state.clone(), large.clone()));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(1024);
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
