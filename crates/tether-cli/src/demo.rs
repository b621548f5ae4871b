//! The demo upstream that `tether serve` runs in-process when no config file is given: slow,
//! streaming and failing endpoints, each of which logs when tether cancels its work, so aborts can
//! be tried with curl at once.
//!
//! It speaks HTTP/1.1 and h2c (prior knowledge) on one port.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// Error type of demo response bodies.
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type DemoBody = BoxBody<Bytes, BoxError>;

/// Size of each `/large` chunk.
const CHUNK: usize = 64 * 1024;
/// Longest `/work` or `/stream` the demo accepts, so a typo cannot pin a task for days.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The running demo upstream. Dropping it stops it.
#[derive(Debug)]
pub struct Demo {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Demo {
    /// Binds `addr` (port 0 picks one) and serves on the current tokio runtime.
    pub async fn start(addr: SocketAddr) -> io::Result<Demo> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, stop.clone()));
        Ok(Demo {
            addr,
            stop,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and closes every connection.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                tokio::spawn(serve_conn(tcp, stop.child_token()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "demo: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Lets a handler end its own connection: `/fail/*` endpoints need to misbehave at TCP level.
#[derive(Debug, Default)]
struct ConnControl {
    /// Cancelled to drop the connection.
    end: CancellationToken,
    /// Send RST (SO_LINGER 0) instead of FIN.
    reset: AtomicBool,
}

impl ConnControl {
    fn close(&self) {
        self.end.cancel();
    }

    fn reset(&self) {
        self.reset.store(true, Ordering::Release);
        self.end.cancel();
    }
}

async fn serve_conn(tcp: TcpStream, stop: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    // A second descriptor for the same socket, so SO_LINGER can be set after hyper owns the stream.
    // Declared before `conn`, so it is closed last: that last close is what sends the RST.
    let dup = match socket2::SockRef::from(&tcp).try_clone() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "demo: cannot dup socket");
            return;
        }
    };
    let ctl = Arc::new(ConnControl::default());
    let svc_ctl = ctl.clone();
    let svc = hyper::service::service_fn(move |req| handle(req, svc_ctl.clone()));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
    tokio::pin!(conn);
    tokio::select! {
        biased;
        // A handler asked to end the connection abruptly.
        _ = ctl.end.cancelled() => {
            if ctl.reset.load(Ordering::Acquire) {
                let _ = dup.set_linger(Some(Duration::ZERO));
            }
        }
        // The demo is stopping.
        _ = stop.cancelled() => {}
        // The connection ended on its own.
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "demo: connection error");
            }
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    ctl: Arc<ConnControl>,
) -> Result<Response<DemoBody>, Infallible> {
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let path = req.uri().path().to_owned();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/") => text(StatusCode::OK, index_page()),
        (&Method::GET, "/work") => match query.duration_ms("ms", 1000) {
            Ok(d) => work(d).await,
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        },
        (&Method::GET, "/stream") => match (
            query.u64("chunks", 10),
            query.duration_ms("interval_ms", 1000),
        ) {
            (Ok(n), Ok(d)) => sse(n, d),
            (Err(e), _) | (_, Err(e)) => text(StatusCode::BAD_REQUEST, e),
        },
        (&Method::GET, "/large") => match query.u64("bytes", 100 * 1024 * 1024) {
            Ok(n) => large(n),
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        },
        (&Method::POST | &Method::PUT, "/upload") => upload(req.into_body()).await,
        (&Method::GET, "/fail/reset-mid-body") => reset_mid_body(req.version(), ctl),
        (_, "/fail/close-before-headers") => {
            ctl.close();
            // Never answers: the connection is dropped, and this future with it.
            std::future::pending().await
        }
        (_, "/" | "/work" | "/stream" | "/large" | "/upload" | "/fail/reset-mid-body") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            format!("no demo endpoint at {path}; see /\n"),
        ),
    };
    Ok(resp)
}

fn text(status: StatusCode, body: String) -> Response<DemoBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn full(b: impl Into<Bytes>) -> DemoBody {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}

fn index_page() -> String {
    "tether demo upstream. Through the gateway (default http://127.0.0.1:8080):\n\
     \n\
     GET  /work?ms=N                      answers after N ms (default 1000)\n\
     \x20    curl -m 1 'http://127.0.0.1:8080/work?ms=5000'   # give up after 1 s: the work is cancelled\n\
     GET  /stream?chunks=N&interval_ms=M  server-sent events, one per interval\n\
     \x20    curl -N 'http://127.0.0.1:8080/stream?chunks=100&interval_ms=200'   # Ctrl-C stops the stream\n\
     GET  /large?bytes=N                  N generated bytes, streamed in 64 KiB chunks\n\
     \x20    curl -o /dev/null 'http://127.0.0.1:8080/large?bytes=1000000000'\n\
     POST /upload                         reads the body, answers {\"bytes\":N}\n\
     \x20    curl --data-binary @/etc/hosts http://127.0.0.1:8080/upload\n\
     GET  /fail/reset-mid-body            some body, then a connection reset (HTTP/2: stream reset)\n\
     \x20    curl http://127.0.0.1:8080/fail/reset-mid-body\n\
     GET  /fail/close-before-headers      closes the connection without answering\n\
     \x20    curl http://127.0.0.1:8080/fail/close-before-headers\n\
     \n\
     HTTP/2 (h2c): add --http2-prior-knowledge. The demo logs to stderr when its work is cancelled.\n"
        .to_owned()
}

/// Logs on drop unless marked complete: the handler or body it lives in was dropped early.
#[derive(Debug)]
struct CancelGuard {
    what: &'static str,
    started: Instant,
    done: bool,
}

impl CancelGuard {
    fn new(what: &'static str) -> Self {
        CancelGuard {
            what,
            started: Instant::now(),
            done: false,
        }
    }

    fn elapsed_ms(&self) -> u128 {
        self.started.elapsed().as_millis()
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            let ms = self.elapsed_ms();
            tracing::info!(
                endpoint = self.what,
                elapsed_ms = ms as u64,
                "demo: {} cancelled after {ms} ms",
                self.what
            );
        }
    }
}

async fn work(d: Duration) -> Response<DemoBody> {
    let mut guard = CancelGuard::new("/work");
    tokio::time::sleep(d).await;
    guard.done = true;
    text(
        StatusCode::OK,
        format!("worked for {} ms\n", guard.elapsed_ms()),
    )
}

/// Server-sent events: the first at once, then one per interval.
#[derive(Debug)]
struct SseBody {
    total: u64,
    sent: u64,
    interval: Duration,
    sleep: Pin<Box<Sleep>>,
    guard: CancelGuard,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.sent == self.total {
            self.guard.done = true;
            return Poll::Ready(None);
        }
        if self.sent > 0 {
            ready!(self.sleep.as_mut().poll(cx));
        }
        let next = Instant::now() + self.interval;
        self.sleep.as_mut().reset(next);
        self.sent += 1;
        let event = format!(
            "data: {{\"event\":{},\"of\":{},\"elapsed_ms\":{}}}\n\n",
            self.sent,
            self.total,
            self.guard.elapsed_ms()
        );
        if self.sent == self.total {
            self.guard.done = true;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.total
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        if !self.guard.done {
            // One line with the event count instead of the guard's generic one.
            self.guard.done = true;
            let ms = self.guard.elapsed_ms();
            tracing::info!(
                endpoint = "/stream",
                elapsed_ms = ms as u64,
                sent = self.sent,
                total = self.total,
                "demo: /stream cancelled after {ms} ms ({} of {} events sent)",
                self.sent,
                self.total
            );
        }
    }
}

fn sse(total: u64, interval: Duration) -> Response<DemoBody> {
    let body = SseBody {
        total,
        sent: 0,
        interval,
        sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
        guard: CancelGuard::new("/stream"),
    };
    let mut r = Response::new(body.boxed());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    r
}

/// `remaining` generated bytes, one shared 64 KiB buffer sliced per frame: no buffering.
#[derive(Debug)]
struct LargeBody {
    chunk: Bytes,
    remaining: u64,
    guard: CancelGuard,
}

impl Body for LargeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            self.guard.done = true;
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.remaining).map_or(CHUNK, |r| r.min(CHUNK));
        self.remaining -= n as u64;
        if self.remaining == 0 {
            self.guard.done = true;
        }
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

fn large(bytes: u64) -> Response<DemoBody> {
    let chunk: Bytes = (0..CHUNK)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789\n"[i % 37])
        .collect::<Vec<u8>>()
        .into();
    let body = LargeBody {
        chunk,
        remaining: bytes,
        guard: CancelGuard::new("/large"),
    };
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    r
}

async fn upload(mut body: Incoming) -> Response<DemoBody> {
    let mut guard = CancelGuard::new("/upload");
    let mut bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    bytes += d.len() as u64;
                }
            }
            Err(e) => {
                guard.done = true;
                tracing::info!(bytes, error = %e, "demo: /upload body failed after {bytes} bytes");
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("request body failed after {bytes} bytes: {e}\n"),
                );
            }
        }
    }
    guard.done = true;
    let mut r = Response::new(full(format!("{{\"bytes\":{bytes}}}\n")));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Some body, then a failure: on HTTP/1 the TCP connection is reset (SO_LINGER 0); on HTTP/2
/// the body errors, so only that stream is reset.
#[derive(Debug)]
struct ResetBody {
    step: u8,
    sleep: Pin<Box<Sleep>>,
    h2: bool,
    ctl: Arc<ConnControl>,
}

impl Body for ResetBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.step {
            0 => {
                self.step = 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                    b"the first part of the body; the rest never comes\n",
                )))))
            }
            _ => {
                // Give the first part time to reach the peer before failing.
                ready!(self.sleep.as_mut().poll(cx));
                if self.h2 {
                    Poll::Ready(Some(Err("demo: reset mid-body".into())))
                } else {
                    self.ctl.reset();
                    Poll::Pending
                }
            }
        }
    }
}

fn reset_mid_body(version: Version, ctl: Arc<ConnControl>) -> Response<DemoBody> {
    let body = ResetBody {
        step: 0,
        sleep: Box::pin(tokio::time::sleep(Duration::from_millis(100))),
        h2: version == Version::HTTP_2,
        ctl,
    };
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // A length the body never reaches, so an HTTP/1 client sees a truncated response.
    r.headers_mut().insert(
        header::CONTENT_LENGTH,
        header::HeaderValue::from_static("1000000"),
    );
    r
}

/// `a=1&b=2`, enough for the demo's numeric parameters.
#[derive(Debug)]
struct Query<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Query<'a> {
    fn parse(q: &'a str) -> Self {
        Query(
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| p.split_once('=').unwrap_or((p, "")))
                .collect(),
        )
    }

    fn u64(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.0.iter().rev().find(|(k, _)| *k == name) {
            None => Ok(default),
            Some((_, v)) => v
                .parse()
                .map_err(|_| format!("{name}={v} is not a non-negative integer\n")),
        }
    }

    fn duration_ms(&self, name: &str, default_ms: u64) -> Result<Duration, String> {
        let d = Duration::from_millis(self.u64(name, default_ms)?);
        if d > MAX_WAIT {
            return Err(format!("{name} is capped at {} ms\n", MAX_WAIT.as_millis()));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests;
