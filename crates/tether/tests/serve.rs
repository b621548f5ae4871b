//! End-to-end cancellation through `serve` on real loopback sockets: the client leaves in each way
//! hyper and the watcher can see, and the handler, its spawned task and its blocking work must
//! all stop with the matching reason.

// Helpers outside #[test] functions panic on purpose too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tether::serve::{ServeOptions, serve};
use tether::{CancelReason, ContextLayer, RequestContext, work};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

/// How long the handler's child work would run if nobody stopped it.
const PLANNED: Duration = Duration::from_millis(1200);
/// Upper bound for any single wait in these tests.
const BOUND: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Flags {
    spawned_done: AtomicBool,
    spawned_dropped: AtomicBool,
    blocking_done: AtomicBool,
    blocking_stopped: AtomicBool,
}

#[derive(Clone)]
struct App {
    flags: Arc<Flags>,
    started: mpsc::UnboundedSender<()>,
    reasons: mpsc::UnboundedSender<CancelReason>,
    upstream: Option<std::net::SocketAddr>,
    outbound: mpsc::UnboundedSender<Result<String, tether::client::ClientError>>,
}

struct SetOnDrop(Arc<Flags>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        if !self.0.spawned_done.load(Ordering::SeqCst) {
            self.0.spawned_dropped.store(true, Ordering::SeqCst);
        }
    }
}

/// Starts child work of both kinds and reports the context's reason when it fires. The handler
/// itself ignores the context: it must be stopped from outside.
async fn slow(State(app): State<App>, ctx: RequestContext) -> &'static str {
    let reasons = app.reasons.clone();
    let watched = ctx.clone();
    work::detached(async move {
        let _ = reasons.send(watched.cancelled().await);
    });

    let flags = app.flags.clone();
    let _task = work::spawn(&ctx, async move {
        let _guard = SetOnDrop(flags.clone());
        sleep(PLANNED).await;
        flags.spawned_done.store(true, Ordering::SeqCst);
    });

    let flags = app.flags.clone();
    let (running_tx, running) = tokio::sync::oneshot::channel();
    let _blocking = work::spawn_blocking(&ctx, move |check| {
        let _ = running_tx.send(());
        let start = std::time::Instant::now();
        while start.elapsed() < PLANNED {
            if let Err(e) = check.check() {
                flags.blocking_stopped.store(true, Ordering::SeqCst);
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        flags.blocking_done.store(true, Ordering::SeqCst);
        Ok(())
    });

    // Report "started" only once the blocking work really runs, so that it must stop mid-way.
    let _ = running.await;
    let _ = app.started.send(());
    sleep(Duration::from_secs(30)).await;
    "finished"
}

async fn fast() -> &'static str {
    "fast"
}

/// Calls the upstream under the request context and reports the outcome.
async fn proxy(State(app): State<App>, ctx: RequestContext) -> StatusCode {
    let client = tether::client::Client::new();
    let upstream = app.upstream.expect("upstream address");
    let req = Request::get(format!("http://{upstream}/work"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let _ = app.started.send(());
    let out = match client.request(&ctx, req).await {
        Ok(resp) => match resp.into_body().collect().await {
            Ok(b) => Ok(String::from_utf8_lossy(&b.to_bytes()).into_owned()),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let status = if out.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::GATEWAY_TIMEOUT
    };
    let _ = app.outbound.send(out);
    status
}

struct Harness {
    addr: std::net::SocketAddr,
    flags: Arc<Flags>,
    started: mpsc::UnboundedReceiver<()>,
    reasons: mpsc::UnboundedReceiver<CancelReason>,
    outbound: mpsc::UnboundedReceiver<Result<String, tether::client::ClientError>>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

async fn start(layer: ContextLayer, upstream: Option<std::net::SocketAddr>) -> Harness {
    start_with(layer, upstream, |o| o).await
}

async fn start_with(
    layer: ContextLayer,
    upstream: Option<std::net::SocketAddr>,
    tweak: impl FnOnce(ServeOptions) -> ServeOptions,
) -> Harness {
    start_on("127.0.0.1:0".parse().unwrap(), layer, upstream, tweak).await
}

async fn start_on(
    bind: std::net::SocketAddr,
    layer: ContextLayer,
    upstream: Option<std::net::SocketAddr>,
    tweak: impl FnOnce(ServeOptions) -> ServeOptions,
) -> Harness {
    let (started_tx, started) = mpsc::unbounded_channel();
    let (reasons_tx, reasons) = mpsc::unbounded_channel();
    let (outbound_tx, outbound) = mpsc::unbounded_channel();
    let flags = Arc::new(Flags::default());
    let app = App {
        flags: flags.clone(),
        started: started_tx,
        reasons: reasons_tx,
        upstream,
        outbound: outbound_tx,
    };
    let router = Router::new()
        .route("/slow", get(slow))
        .route("/slow", post(slow))
        .route("/fast", get(fast))
        .route("/proxy", get(proxy))
        .with_state(app);
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let options = ServeOptions::new()
        .layer(layer)
        .shutdown(shutdown.clone())
        .grace(Duration::from_millis(200))
        .cleanup_window(Duration::from_millis(200));
    let server = tokio::spawn(serve(listener, router, tweak(options)));
    Harness {
        addr,
        flags,
        started,
        reasons,
        outbound,
        shutdown,
        server,
    }
}

impl Harness {
    async fn wait_started(&mut self) {
        timeout(BOUND, self.started.recv())
            .await
            .expect("handler did not start")
            .unwrap();
    }

    async fn reason(&mut self) -> CancelReason {
        timeout(BOUND, self.reasons.recv())
            .await
            .expect("context was not cancelled")
            .unwrap()
    }

    /// The child work stopped early, and never completes.
    async fn assert_work_stopped(&self) {
        let begun = Instant::now();
        let f = &self.flags;
        while !(f.spawned_dropped.load(Ordering::SeqCst)
            && f.blocking_stopped.load(Ordering::SeqCst))
        {
            assert!(
                begun.elapsed() < BOUND,
                "child work did not stop: task dropped {}, blocking stopped {}",
                f.spawned_dropped.load(Ordering::SeqCst),
                f.blocking_stopped.load(Ordering::SeqCst)
            );
            sleep(Duration::from_millis(5)).await;
        }
        sleep(PLANNED + Duration::from_millis(200)).await;
        assert!(
            !f.spawned_done.load(Ordering::SeqCst),
            "spawned task ran to completion"
        );
        assert!(
            !f.blocking_done.load(Ordering::SeqCst),
            "blocking work ran to completion"
        );
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(BOUND, self.server)
            .await
            .expect("server did not shut down")
            .unwrap();
    }
}

fn rst(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

/// Sends `wire` on a new HTTP/1 connection, waits for the handler to start, ends the connection
/// with `end` and checks that the work stopped for `expected`.
async fn h1_abort(wire: &[u8], end: fn(TcpStream), expected: CancelReason) {
    let mut h = start(ContextLayer::new(), None).await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(wire).await.unwrap();
    h.wait_started().await;
    end(s);
    assert_eq!(h.reason().await, expected);
    h.assert_work_stopped().await;
    h.stop().await;
}

#[tokio::test]
async fn h1_fin_cancels_with_client_closed() {
    h1_abort(
        b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n",
        drop,
        CancelReason::ClientClosed,
    )
    .await;
}

#[tokio::test]
async fn h1_rst_cancels_with_client_reset() {
    h1_abort(
        b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n",
        rst,
        CancelReason::ClientReset,
    )
    .await;
}

/// hyper alone misses this one: the handler never reads the body, so hyper never reads the
/// socket.
#[tokio::test]
async fn h1_abort_mid_body_cancels() {
    let mut wire = b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n".to_vec();
    wire.extend_from_slice(&[b'x'; 500]);
    h1_abort(&wire, drop, CancelReason::ClientClosed).await;
}

/// hyper alone misses this one too: the pipelined bytes sit in its buffer, so it stops reading.
#[tokio::test]
async fn h1_pipelined_then_close_cancels() {
    h1_abort(
        b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET /fast HTTP/1.1\r\nHost: t\r\n\r\n",
        drop,
        CancelReason::ClientClosed,
    )
    .await;
}

async fn h2_client(
    addr: std::net::SocketAddr,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, task)
}

#[tokio::test]
async fn h2_stream_reset_cancels_that_stream_only() {
    let mut h = start(ContextLayer::new(), None).await;
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    h2_reset_cancels_that_stream_only(&mut h, tcp, "http").await;
    h.stop().await;
}

/// Over `io` (an HTTP/2 connection to `h`): a stream reset by the client cancels its request
/// with `StreamReset` and stops its work, and the connection goes on serving other streams.
async fn h2_reset_cancels_that_stream_only<T>(h: &mut Harness, io: T, scheme: &str)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let req = Request::get(format!("{scheme}://{}/slow", h.addr))
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    h.wait_started().await;
    send.send_reset(h2::Reason::CANCEL);
    drop(resp);
    assert_eq!(h.reason().await, CancelReason::StreamReset);
    h.assert_work_stopped().await;

    // The connection still serves other streams.
    let mut client = client.ready().await.unwrap();
    let req = Request::get(format!("{scheme}://{}/fast", h.addr))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = timeout(BOUND, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(client);
    conn.abort();
}

#[tokio::test]
async fn h2_connection_loss_cancels_with_connection_lost() {
    let mut h = start(ContextLayer::new(), None).await;
    let (client, conn) = h2_client(h.addr).await;
    let mut client = client.ready().await.unwrap();
    let req = Request::get(format!("http://{}/slow", h.addr))
        .body(())
        .unwrap();
    let (resp, _send) = client.send_request(req, true).unwrap();
    h.wait_started().await;
    // Drop the whole connection: the task owns the socket.
    conn.abort();
    let _ = conn.await;
    drop((resp, client));
    assert_eq!(h.reason().await, CancelReason::ConnectionLost);
    h.assert_work_stopped().await;
    h.stop().await;
}

#[tokio::test]
async fn h2_ping_left_unanswered_cancels_with_peer_dead() {
    let ping = Duration::from_millis(200);
    let mut h = start_with(ContextLayer::new(), None, |o| o.h2_ping(Some((ping, ping)))).await;
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let (freeze, frozen) = tokio::sync::oneshot::channel::<()>();
    // Drives the client until told to freeze; then keeps the socket open without reading or
    // writing a byte, like a peer whose host died.
    let task = tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = frozen => std::future::pending::<()>().await,
        }
    });
    let mut client = client.ready().await.unwrap();
    let req = Request::get(format!("http://{}/slow", h.addr))
        .body(())
        .unwrap();
    let (resp, _send) = client.send_request(req, true).unwrap();
    h.wait_started().await;
    freeze.send(()).unwrap();
    let frozen_at = Instant::now();
    assert_eq!(h.reason().await, CancelReason::PeerDead);
    let took = frozen_at.elapsed();
    assert!(
        took >= ping,
        "cancelled after {took:?}, before any PING could time out"
    );
    h.assert_work_stopped().await;
    drop((resp, client));
    task.abort();
    h.stop().await;
}

/// The client's link is cut while its request is in flight (no FIN, no RST): TCP keepalive
/// probes find it dead. The client runs in a network namespace the test creates (needs root and
/// iproute2).
#[tokio::test]
async fn h1_silent_client_is_found_dead_by_tcp_keepalive() {
    let ns = test_support::netns::Netns::create();
    let second = Duration::from_secs(1);
    let bind = std::net::SocketAddr::new(ns.outer.into(), 0);
    let mut h = start_on(bind, ContextLayer::new(), None, |o| {
        o.tcp_keepalive(Some((second, second, 1)))
    })
    .await;
    let std = ns.connect(h.addr).unwrap();
    std.set_nonblocking(true).unwrap();
    let mut client = TcpStream::from_std(std).unwrap();
    client
        .write_all(b"GET /slow HTTP/1.1\r\nhost: dead.test\r\n\r\n")
        .await
        .unwrap();
    h.wait_started().await;
    ns.cut().unwrap();
    let cut_at = Instant::now();
    // Idle 1 s, then one probe answered by nobody within 1 s: about 2 s.
    let reason = timeout(Duration::from_secs(6), h.reasons.recv())
        .await
        .expect("the dead client was not noticed")
        .unwrap();
    assert_eq!(reason, CancelReason::PeerDead);
    let took = cut_at.elapsed();
    // The handler's child work is planned shorter than detection takes: only the reason and
    // the time are checked here.
    assert!(took >= second, "noticed after {took:?}");
    drop(client);
    h.stop().await;
}

#[tokio::test]
async fn deadline_cancels_and_sends_nothing_more() {
    let mut h = start(
        ContextLayer::new().timeout(Duration::from_millis(300)),
        None,
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    h.wait_started().await;
    assert_eq!(h.reason().await, CancelReason::Deadline);
    h.assert_work_stopped().await;
    drop(s);
    h.stop().await;
}

#[tokio::test]
async fn shutdown_cancels_after_grace() {
    let mut h = start(ContextLayer::new(), None).await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    h.wait_started().await;
    h.shutdown.cancel();
    assert_eq!(h.reason().await, CancelReason::Shutdown);
    h.assert_work_stopped().await;
    drop(s);
    h.stop().await;
}

/// A raw HTTP/1.1 upstream that reads one request head, optionally answers with a head and part
/// of a body, then waits for EOF. Reports the head it read and when it saw EOF.
async fn upstream(
    answer_partially: bool,
) -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<String>,
    mpsc::UnboundedReceiver<()>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (head_tx, head_rx) = mpsc::unbounded_channel();
    let (eof_tx, eof_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.unwrap();
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let _ = head_tx.send(String::from_utf8_lossy(&buf).into_owned());
        if answer_partially {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst bytes")
                .await
                .unwrap();
        }
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = eof_tx.send(());
    });
    (addr, head_rx, eof_rx)
}

#[tokio::test]
async fn outbound_call_is_aborted_on_deadline_and_carries_the_budget() {
    let (up, mut heads, mut eof) = upstream(false).await;
    let mut h = start(
        ContextLayer::new().timeout(Duration::from_millis(400)),
        Some(up),
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"GET /proxy HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    h.wait_started().await;

    let head = timeout(BOUND, heads.recv()).await.unwrap().unwrap();
    let budget: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-timeout-ms: "))
        .expect("budget header sent upstream")
        .trim()
        .parse()
        .unwrap();
    assert!(budget > 0 && budget <= 400, "budget {budget}");

    let out = timeout(BOUND, h.outbound.recv()).await.unwrap().unwrap();
    let err = out.expect_err("outbound call must be cancelled");
    assert_eq!(
        err.cancelled().map(|c| c.reason),
        Some(CancelReason::Deadline)
    );
    timeout(BOUND, eof.recv())
        .await
        .expect("upstream did not see EOF")
        .unwrap();

    let mut resp = vec![0u8; 64];
    let n = timeout(BOUND, s.read(&mut resp)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&resp[..n]).starts_with("HTTP/1.1 504"));
    h.stop().await;
}

#[tokio::test]
async fn outbound_body_is_cut_when_the_context_fires() {
    let (up, _heads, mut eof) = upstream(true).await;
    let mut h = start(
        ContextLayer::new().timeout(Duration::from_millis(400)),
        Some(up),
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"GET /proxy HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    h.wait_started().await;
    let out = timeout(BOUND, h.outbound.recv()).await.unwrap().unwrap();
    let err = out.expect_err("body must be cut");
    assert_eq!(
        err.cancelled().map(|c| c.reason),
        Some(CancelReason::Deadline)
    );
    timeout(BOUND, eof.recv())
        .await
        .expect("upstream did not see EOF")
        .unwrap();
    drop(s);
    h.stop().await;
}

#[tokio::test]
async fn outbound_call_is_aborted_when_the_client_leaves() {
    let (up, mut heads, mut eof) = upstream(false).await;
    let mut h = start(ContextLayer::new(), Some(up)).await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"GET /proxy HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    h.wait_started().await;
    let head = timeout(BOUND, heads.recv()).await.unwrap().unwrap();
    assert!(
        !head.contains("x-request-timeout-ms"),
        "no deadline, no budget"
    );
    rst(s);
    timeout(BOUND, eof.recv())
        .await
        .expect("upstream did not see EOF")
        .unwrap();
    h.stop().await;
}

/// `serve` with TLS: the same cancellation over rustls, HTTP/1.1 and HTTP/2 chosen by ALPN, and
/// handshakes that fail or stall closed without disturbing the server.
#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use test_support::tls::TestPki;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    /// A TLS server whose config names no ALPN protocols (`serve` offers h2 and http/1.1).
    async fn start_tls(pki: &TestPki, tweak: fn(ServeOptions) -> ServeOptions) -> Harness {
        let config = pki.server_config(&[]).unwrap();
        start_with(ContextLayer::new(), None, move |o| tweak(o.tls(config))).await
    }

    /// A TLS client offering only `alpn`; checks the server chose it.
    async fn connect(
        pki: &TestPki,
        addr: std::net::SocketAddr,
        alpn: &[u8],
    ) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = TlsConnector::from(pki.client_config(&[alpn]).unwrap());
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = timeout(BOUND, connector.connect(name, tcp))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        tls
    }

    #[tokio::test]
    async fn tls_h1_request_is_served_and_a_client_leaving_cancels() {
        let pki = TestPki::generate().unwrap();
        let mut h = start_tls(&pki, |o| o).await;
        let mut s = connect(&pki, h.addr, b"http/1.1").await;
        s.write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"fast") {
            let mut buf = [0u8; 512];
            let n = timeout(BOUND, s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));

        s.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        h.wait_started().await;
        // The TCP connection ends under the TLS session, without close_notify.
        let (tcp, _) = s.into_inner();
        drop(tcp);
        assert_eq!(h.reason().await, CancelReason::ClientClosed);
        h.assert_work_stopped().await;
        h.stop().await;
    }

    #[tokio::test]
    async fn tls_h2_stream_reset_cancels_that_stream_only() {
        let pki = TestPki::generate().unwrap();
        let mut h = start_tls(&pki, |o| o).await;
        let tls = connect(&pki, h.addr, b"h2").await;
        h2_reset_cancels_that_stream_only(&mut h, tls, "https").await;
        h.stop().await;
    }

    /// Reads until EOF or an error: the server closed the connection.
    async fn assert_closed(s: &mut TcpStream) {
        let mut buf = [0u8; 256];
        loop {
            match timeout(BOUND, s.read(&mut buf)).await {
                Err(_) => panic!("the server kept the connection open"),
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn failed_and_stalled_handshakes_are_closed_and_the_server_goes_on() {
        let pki = TestPki::generate().unwrap();
        let h = start_tls(&pki, |o| {
            o.tls_handshake_timeout(Duration::from_millis(300))
        })
        .await;

        // Plain HTTP to a TLS port: not a ClientHello.
        let mut plain = TcpStream::connect(h.addr).await.unwrap();
        plain
            .write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        assert_closed(&mut plain).await;

        // Connected, silent: closed after the handshake timeout.
        let mut silent = TcpStream::connect(h.addr).await.unwrap();
        let began = Instant::now();
        assert_closed(&mut silent).await;
        assert!(began.elapsed() >= Duration::from_millis(250));

        // A proper client is served all the while.
        let mut s = connect(&pki, h.addr, b"http/1.1").await;
        s.write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        timeout(BOUND, s.read_to_end(&mut got)).await.unwrap().ok();
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        h.stop().await;
    }
}
