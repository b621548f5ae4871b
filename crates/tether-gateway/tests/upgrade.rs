//! HTTP/1.1 upgrades (WebSocket and the like): the request reaches an HTTP/1.1 upstream with its
//! `Connection: upgrade` and `Upgrade` headers, the upstream's 101 joins client and upstream byte
//! for byte, and the tunnel ends with either side, its idle timeout or its deadline, closing the
//! other side's connection at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use test_support::behavior::{Behavior, Reply, script};
use tether_gateway::config::{Config, HalfClose, RouteConfig, UpstreamTls};
use tether_gateway::observe::access::Outcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the upgrade upstream saw.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A request head: its path, `Connection`, `Upgrade` and `Sec-WebSocket-Key` headers.
    Request {
        path: String,
        connection: String,
        upgrade: String,
        key: String,
    },
    /// The tunnel's read side ended (the client, through tether, closed).
    TunnelEnd,
}

/// A hyper HTTP/1.1 server that switches to the `echo` (or `websocket`) protocol when a request
/// asks for it (unless `refuse`): after its 101 it sends back whatever it reads, and closes when
/// it reads `close`. Any other request is answered 200 `plain`.
struct EchoUpstream {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: JoinHandle<()>,
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoUpstream {
    async fn start(refuse: bool) -> EchoUpstream {
        Self::start_with(refuse, None).await
    }

    /// With `tls`, the upstream speaks HTTP/1.1 over TLS.
    async fn start_with(
        refuse: bool,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    ) -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| serve(req, tx.clone(), refuse));
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        Some(tls) => {
                            let Ok(sock) = tls.accept(sock).await else {
                                return;
                            };
                            http.serve_connection(TokioIo::new(sock), svc)
                                .with_upgrades()
                                .await
                        }
                        None => {
                            http.serve_connection(TokioIo::new(sock), svc)
                                .with_upgrades()
                                .await
                        }
                    };
                });
            }
        });
        EchoUpstream { addr, seen, task }
    }

    async fn next(&mut self) -> Seen {
        bounded(BOUND, self.seen.recv()).await.unwrap()
    }
}

async fn serve(
    mut req: Request<Incoming>,
    tx: mpsc::UnboundedSender<Seen>,
    refuse: bool,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let header = |n: &str| header_text(&req, n);
    let (connection, upgrade) = (header("connection"), header("upgrade"));
    let key = header("sec-websocket-key");
    let _ = tx.send(Seen::Request {
        path: req.uri().path().to_owned(),
        connection,
        upgrade: upgrade.clone(),
        key: key.clone(),
    });
    if refuse || (upgrade != "echo" && upgrade != "websocket") {
        return Ok(Response::new(Full::new(Bytes::from_static(b"plain"))));
    }
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let mut io = TokioIo::new(up);
        let mut buf = [0u8; 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) if &buf[..n] == b"close" => {
                    let _ = io.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(Seen::TunnelEnd);
    });
    let mut resp = Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", upgrade)
        .header("x-from", "upstream");
    if !key.is_empty() {
        // (Not the real digest: nothing here checks it.)
        resp = resp.header("sec-websocket-accept", format!("accept-{key}"));
    }
    Ok(resp.body(Full::new(Bytes::new())).unwrap())
}

/// A gateway whose only upstream is at `addr`; `tweak` adjusts the route.
async fn gateway(addr: SocketAddr, tweak: impl FnOnce(&mut RouteConfig)) -> Env {
    gateway_with(addr, |c| tweak(&mut c.listeners[0].routes[0])).await
}

/// A gateway whose only upstream is at `addr`; `tweak` adjusts the whole config.
async fn gateway_with(addr: SocketAddr, tweak: impl FnOnce(&mut Config)) -> Env {
    Env::with(
        Down::H1,
        Up::H1,
        script(|_| Behavior::Respond(Reply::ok("unused"))),
        move |c| {
            c.upstreams[0].addresses = vec![addr.into()];
            tweak(c);
        },
    )
    .await
}

/// A gateway whose only upstream is at `addr`, over TLS trusting `ca`.
async fn tls_gateway(addr: SocketAddr, ca: rustls::pki_types::CertificateDer<'static>) -> Env {
    gateway_with(addr, |c| {
        c.upstreams[0].tls = Some(UpstreamTls {
            server_name: Some("localhost".into()),
            ca: vec![ca],
            insecure_skip_verify: false,
            client_cert: None,
        });
    })
    .await
}

/// The status and outcome of the tunnel's access-log line.
async fn ended(env: &Env) -> (u16, Outcome) {
    let rec = env.record("/ws").await;
    (rec.status, rec.outcome)
}

/// An echo upstream, a gateway in front of it (its route adjusted by `tweak`) and a client it
/// switched to `echo`; the upstream's record of the request is taken.
async fn tunnel(tweak: impl FnOnce(&mut RouteConfig)) -> (EchoUpstream, Env, TcpStream) {
    let mut up = EchoUpstream::start(false).await;
    let env = gateway(up.addr, tweak).await;
    let (c, head) = ask_upgrade(env.addr, "/ws").await;
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(matches!(up.next().await, Seen::Request { .. }));
    (up, env, c)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Sends an upgrade request for `path` and reads the response head.
async fn ask_upgrade(addr: SocketAddr, path: &str) -> (TcpStream, String) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, Upgrade\r\nUpgrade: echo\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut c).await;
    (c, head)
}

/// Reads to the end of a response head, one byte at a time (nothing after it is taken).
async fn read_head(c: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = bounded(BOUND, c.read(&mut b)).await.unwrap();
        assert_eq!(n, 1, "connection closed in the response head: {head:?}");
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

/// A raw upstream's read of a request head, in whatever pieces it arrives.
async fn read_request_head(s: &mut (impl tokio::io::AsyncRead + Unpin)) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the request head ended");
        head.extend_from_slice(&buf[..n]);
    }
}

async fn read_exact(c: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    bounded(BOUND, c.read_exact(&mut buf)).await.unwrap();
    buf
}

/// Reads until EOF or an error, bounded: the other side closed the tunnel.
async fn closed(c: &mut TcpStream) {
    let mut buf = [0u8; 64];
    loop {
        match bounded(BOUND, c.read(&mut buf)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn a_websocket_style_upgrade_is_tunnelled_and_ends_when_the_client_leaves() {
    bounded(Duration::from_secs(20), async {
        let mut up = EchoUpstream::start(false).await;
        let env = gateway(up.addr, |_| {}).await;
        let (mut c, head) = ask_upgrade(env.addr, "/ws").await;
        assert!(head.starts_with("http/1.1 101 "), "{head}");
        assert!(head.contains("\r\nupgrade: echo\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
        assert!(head.contains("\r\nx-from: upstream\r\n"), "{head}");
        assert!(head.contains("\r\nx-request-id: "), "{head}");
        // The upstream was asked to switch, with only `upgrade` left in `Connection`.
        assert_eq!(
            up.next().await,
            Seen::Request {
                path: "/ws".into(),
                connection: "upgrade".into(),
                upgrade: "echo".into(),
                key: String::new(),
            }
        );
        for msg in [&b"hello"[..], b"tunnel", b"bytes"] {
            c.write_all(msg).await.unwrap();
            assert_eq!(read_exact(&mut c, msg.len()).await, msg);
        }
        // The client leaves: the upstream's side of the tunnel ends at once.
        drop(c);
        assert_eq!(up.next().await, Seen::TunnelEnd);
        let rec = env.record("/ws").await;
        assert_eq!(rec.status, 101);
        assert_eq!(rec.outcome, Outcome::Ok);
        assert_eq!(rec.bytes_received, 16);
        assert_eq!(rec.bytes_sent, 16);
        assert_eq!(rec.upstream_reused, Some(false));
    })
    .await;
}

#[tokio::test]
async fn the_upstream_closing_the_tunnel_closes_the_client_connection() {
    bounded(Duration::from_secs(20), async {
        let up = EchoUpstream::start(false).await;
        let env = gateway(up.addr, |_| {}).await;
        let (mut c, head) = ask_upgrade(env.addr, "/ws").await;
        assert!(head.starts_with("http/1.1 101 "), "{head}");
        c.write_all(b"ping").await.unwrap();
        assert_eq!(read_exact(&mut c, 4).await, b"ping");
        c.write_all(b"close").await.unwrap();
        closed(&mut c).await;
        assert_eq!(ended(&env).await, (101, Outcome::Ok));
    })
    .await;
}

#[tokio::test]
async fn a_refused_upgrade_is_an_ordinary_response_and_the_connection_stays_http() {
    bounded(Duration::from_secs(20), async {
        let mut up = EchoUpstream::start(true).await;
        let env = gateway(up.addr, |_| {}).await;
        let (mut c, head) = ask_upgrade(env.addr, "/ws").await;
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        assert!(!head.contains("upgrade"), "{head}");
        assert_eq!(read_exact(&mut c, 5).await, b"plain");
        assert!(matches!(up.next().await, Seen::Request { upgrade, .. } if upgrade == "echo"));
        // The same connection serves a plain request next.
        c.write_all(b"GET /next HTTP/1.1\r\nHost: example.test\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await;
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        assert_eq!(read_exact(&mut c, 5).await, b"plain");
        assert!(matches!(up.next().await, Seen::Request { path, .. } if path == "/next"));
    })
    .await;
}

#[tokio::test]
async fn with_half_close_continue_a_clients_fin_is_passed_on_and_the_answer_still_arrives() {
    bounded(Duration::from_secs(20), async {
        let (mut up, env, mut c) = tunnel(|r| r.client_half_close = HalfClose::Continue).await;
        c.write_all(b"last words").await.unwrap();
        c.shutdown().await.unwrap();
        // The upstream reads them, then the FIN; its echo still reaches the client.
        assert_eq!(read_exact(&mut c, 10).await, b"last words");
        assert_eq!(up.next().await, Seen::TunnelEnd);
        closed(&mut c).await;
        let rec = env.record("/ws").await;
        assert_eq!((rec.status, rec.outcome), (101, Outcome::Ok));
        assert_eq!((rec.bytes_received, rec.bytes_sent), (10, 10));
    })
    .await;
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_the_routes_idle_timeout() {
    bounded(Duration::from_secs(20), async {
        let (mut up, env, mut c) = tunnel(|r| r.timeouts.idle = Some(ms(300))).await;
        // Traffic keeps it open past the timeout...
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            c.write_all(b"tick").await.unwrap();
            assert_eq!(read_exact(&mut c, 4).await, b"tick");
        }
        // ...and silence closes both sides.
        let quiet = tokio::time::Instant::now();
        closed(&mut c).await;
        assert!(
            quiet.elapsed() >= Duration::from_millis(250),
            "{:?}",
            quiet.elapsed()
        );
        assert_eq!(up.next().await, Seen::TunnelEnd);
        assert_eq!(ended(&env).await, (101, Outcome::Timeout));
    })
    .await;
}

#[tokio::test]
async fn the_routes_deadline_ends_a_tunnel() {
    bounded(Duration::from_secs(20), async {
        let (mut up, env, mut c) = tunnel(|r| r.timeouts.total = Some(ms(400))).await;
        c.write_all(b"x").await.unwrap();
        assert_eq!(read_exact(&mut c, 1).await, b"x");
        closed(&mut c).await;
        assert_eq!(up.next().await, Seen::TunnelEnd);
        let rec = env.record("/ws").await;
        assert_eq!(rec.abort_reason, Some(tether::CancelReason::Deadline));
    })
    .await;
}

#[tokio::test]
async fn an_http2_upstream_gets_a_plain_request_without_the_upgrade() {
    bounded(Duration::from_secs(20), async {
        let s = script(|r| {
            Behavior::Respond(
                Reply::ok("h2").header("x-saw-upgrade", r.header("upgrade").unwrap_or("none")),
            )
        });
        let env = Env::new(Down::H1, Up::H2c, s).await;
        let (mut c, head) = ask_upgrade(env.addr, "/ws").await;
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        assert!(head.contains("\r\nx-saw-upgrade: none\r\n"), "{head}");
        assert_eq!(read_exact(&mut c, 2).await, b"h2");
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_holds_its_place_in_the_listeners_connection_limit() {
    bounded(Duration::from_secs(20), async {
        let mut up = EchoUpstream::start(false).await;
        let addr = up.addr;
        let env = gateway_with(addr, |c| {
            c.listeners[0].limits.max_connections = std::num::NonZeroUsize::new(1);
        })
        .await;
        let (mut tunnel, head) = ask_upgrade(env.addr, "/ws").await;
        assert!(head.starts_with("http/1.1 101 "), "{head}");
        let _ = up.next().await;
        // A second client waits while the tunnel is open...
        let mut other = TcpStream::connect(env.addr).await.unwrap();
        other
            .write_all(b"GET /next HTTP/1.1\r\nHost: example.test\r\n\r\n")
            .await
            .unwrap();
        let mut b = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(400), other.read(&mut b)).await;
        assert!(
            early.is_err(),
            "served while the tunnel held the only place: {early:?}"
        );
        // ...and is served once it closes.
        tunnel.write_all(b"close").await.unwrap();
        closed(&mut tunnel).await;
        let head = read_head(&mut other).await;
        assert!(head.starts_with("http/1.1 200 "), "{head}");
    })
    .await;
}

#[tokio::test]
async fn shutdown_gives_a_tunnel_the_grace_period_then_closes_it() {
    bounded(Duration::from_secs(20), async {
        let (mut up, env, mut c) = tunnel(|_| {}).await;
        let access = env.access.clone();
        let started = tokio::time::Instant::now();
        let stopping = tokio::spawn(env.stop_with_grace(Duration::from_millis(300)));
        // Still open during the grace period.
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.write_all(b"still").await.unwrap();
        assert_eq!(read_exact(&mut c, 5).await, b"still");
        closed(&mut c).await;
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(up.next().await, Seen::TunnelEnd);
        bounded(BOUND, stopping).await.unwrap();
        let rec = access
            .records()
            .into_iter()
            .find(|r| r.path == "/ws")
            .expect("the tunnel's line");
        assert_eq!(rec.abort_reason, Some(tether::CancelReason::Shutdown));
        assert_eq!(rec.status, 101);
    })
    .await;
}

#[tokio::test]
async fn bytes_the_upstream_sends_right_behind_its_101_reach_the_client() {
    bounded(Duration::from_secs(20), async {
        // A raw upstream: its 101 and the new protocol's first bytes in one write, so that they
        // arrive together and tether's HTTP client reads past the head.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_request_head(&mut s).await;
            let mut buf = [0u8; 4096];
            s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\ngreetings",
            )
            .await
            .unwrap();
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                }
            }
        });
        let env = gateway(addr, |_| {}).await;
        let (mut c, head) = ask_upgrade(env.addr, "/ws").await;
        assert!(head.starts_with("http/1.1 101 "), "{head}");
        assert_eq!(read_exact(&mut c, 9).await, b"greetings");
        c.write_all(b"echo").await.unwrap();
        assert_eq!(read_exact(&mut c, 4).await, b"echo");
        drop(c);
        bounded(BOUND, up).await.unwrap();
        let rec = env.record("/ws").await;
        assert_eq!((rec.bytes_received, rec.bytes_sent), (4, 13));
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_to_an_upstream_over_tls() {
    bounded(Duration::from_secs(20), async {
        let pki = test_support::TestPki::generate().unwrap();
        let tls = pki.server_config(&[b"http/1.1"]).unwrap();
        let mut up = EchoUpstream::start_with(false, Some(tls)).await;
        let ca = pki.ca_der();
        let addr = up.addr;
        let env = tls_gateway(addr, ca).await;
        let (mut c, head) = ask_upgrade(env.addr, "/ws").await;
        assert!(head.starts_with("http/1.1 101 "), "{head}");
        assert!(matches!(up.next().await, Seen::Request { upgrade, .. } if upgrade == "echo"));
        c.write_all(b"over tls").await.unwrap();
        assert_eq!(read_exact(&mut c, 8).await, b"over tls");
        drop(c);
        assert_eq!(up.next().await, Seen::TunnelEnd);
        let rec = env.record("/ws").await;
        assert_eq!(
            (rec.status, rec.bytes_received, rec.bytes_sent),
            (101, 8, 8)
        );
    })
    .await;
}

#[tokio::test]
async fn a_connection_made_for_a_refused_upgrade_closes_cleanly_over_tls() {
    bounded(Duration::from_secs(20), async {
        // A raw TLS upstream that refuses the upgrade with a plain answer and then reports how
        // tether closed the connection made for it: `Ok(0)` after a close_notify, an
        // unexpected-EOF error after a bare FIN.
        let pki = test_support::TestPki::generate().unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(pki.server_config(&[b"http/1.1"]).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let mut s = tls.accept(sock).await.unwrap();
            read_request_head(&mut s).await;
            let mut buf = [0u8; 4096];
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
                .await
                .unwrap();
            s.flush().await.unwrap();
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.kind()),
                }
            }
        });
        let ca = pki.ca_der();
        let env = tls_gateway(addr, ca).await;
        let (mut c, head) = ask_upgrade(env.addr, "/ws").await;
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        assert_eq!(read_exact(&mut c, 5).await, b"plain");
        // Never pooled: closed once its response is through, with a close_notify first.
        assert_eq!(bounded(BOUND, up).await.unwrap(), Ok(()));
    })
    .await;
}

#[tokio::test]
async fn tunnels_are_counted_open_and_their_bytes_as_they_cross() {
    bounded(Duration::from_secs(20), async {
        let up = EchoUpstream::start(false).await;
        let env = gateway_with(up.addr, |c| {
            c.admin = Some(tether_gateway::config::AdminConfig {
                address: "127.0.0.1:0".parse().unwrap(),
            });
        })
        .await;
        let metric = |name: &str| -> Option<String> {
            let text = env.metrics_text().unwrap();
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        let (mut c, head) = ask_upgrade(env.addr, "/ws").await;
        assert!(head.starts_with("http/1.1 101 "), "{head}");
        c.write_all(b"hello").await.unwrap();
        assert_eq!(read_exact(&mut c, 5).await, b"hello");
        // Counted while the tunnel is still open.
        assert_eq!(metric("tether_tunnels_open ").as_deref(), Some("1"));
        let bytes = |direction: &str| {
            metric(&format!(
                "tether_tunnel_bytes_total{{route=\"up\",direction=\"{direction}\"}}"
            ))
        };
        assert_eq!(bytes("from_client").as_deref(), Some("5"));
        assert_eq!(bytes("from_upstream").as_deref(), Some("5"));
        drop(c);
        ended(&env).await;
        assert_eq!(metric("tether_tunnels_open ").as_deref(), Some("0"));
    })
    .await;
}

/// An HTTP/2 cleartext connection to `addr` whose peer's settings have arrived (a first request
/// to `warm_up` sees to it: extended CONNECT may only be sent once the server allowed it).
async fn h2_connection(
    addr: SocketAddr,
    warm_up: &str,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let first = Request::get(format!("http://example.test{warm_up}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    bounded(BOUND, send.send_request(first)).await.unwrap();
    send
}

/// An RFC 8441 extended CONNECT for `protocol` on `path`.
fn extended_connect(protocol: &'static str, path: &str) -> Request<http_body_util::Empty<Bytes>> {
    let mut req = Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://example.test{path}"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static(protocol));
    req
}

#[tokio::test]
async fn an_http2_websocket_is_tunnelled_to_an_http1_upstream_on_a_stream_of_its_own() {
    bounded(Duration::from_secs(20), async {
        let mut up = EchoUpstream::start(false).await;
        let env = gateway(up.addr, |_| {}).await;
        let mut send = h2_connection(env.addr, "/warm-up").await;
        assert!(matches!(up.next().await, Seen::Request { path, .. } if path == "/warm-up"));

        let resp = bounded(
            BOUND,
            send.send_request(extended_connect("websocket", "/ws")),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-from"], "upstream");
        for gone in ["sec-websocket-accept", "upgrade", "connection"] {
            assert!(
                !resp.headers().contains_key(gone),
                "{gone}: {:?}",
                resp.headers()
            );
        }
        // The upstream got an HTTP/1.1 WebSocket handshake, with a key of tether's making.
        match up.next().await {
            Seen::Request {
                path,
                connection,
                upgrade,
                key,
            } => {
                assert_eq!((path.as_str(), connection.as_str()), ("/ws", "upgrade"));
                assert_eq!(upgrade, "websocket");
                assert_eq!(key.len(), 24, "{key}");
            }
            other => panic!("{other:?}"),
        }
        let mut ws = TokioIo::new(bounded(BOUND, hyper::upgrade::on(resp)).await.unwrap());
        for msg in [&b"hello"[..], b"over h2"] {
            ws.write_all(msg).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            bounded(BOUND, ws.read_exact(&mut back)).await.unwrap();
            assert_eq!(back, msg);
        }
        // The connection serves other streams meanwhile.
        let plain = Request::get("http://example.test/plain")
            .body(http_body_util::Empty::new())
            .unwrap();
        let r = bounded(BOUND, send.send_request(plain)).await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(matches!(up.next().await, Seen::Request { path, .. } if path == "/plain"));

        // The client resets its stream: the upstream's side of the tunnel ends at once.
        drop(ws);
        assert_eq!(up.next().await, Seen::TunnelEnd);
        let rec = env.record("/ws").await;
        assert_eq!((rec.status, rec.outcome), (200, Outcome::Ok));
        assert_eq!((rec.bytes_received, rec.bytes_sent), (12, 12));
    })
    .await;
}

#[tokio::test]
async fn an_http2_connect_the_upstream_does_not_switch_for_is_answered_502() {
    bounded(Duration::from_secs(20), async {
        // An HTTP/1.1 upstream that refuses, and an HTTP/2 one (which cannot switch).
        let up = EchoUpstream::start(true).await;
        let h1 = gateway(up.addr, |_| {}).await;
        let h2 = Env::new(
            Down::H2c,
            Up::H2c,
            script(|_| Behavior::Respond(Reply::ok("plain"))),
        )
        .await;
        for env in [&h1, &h2] {
            let mut send = h2_connection(env.addr, "/warm-up").await;
            let resp = bounded(
                BOUND,
                send.send_request(extended_connect("websocket", "/ws")),
            )
            .await
            .unwrap();
            assert_eq!(resp.status(), 502, "{:?}", env.up_kind);
            let rec = env.record("/ws").await;
            assert_eq!(rec.status, 502);
        }
    })
    .await;
}
