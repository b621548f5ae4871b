//! `proxy_protocol` on an upstream: every connection to it starts with a PROXY protocol header
//! naming the client it carries requests for, and carries no one else's. The upstream here is
//! a real HTTP/1.1 server (hyper) behind a reader of the header (`ppp`), as HAProxy or an
//! nginx `listen ... proxy_protocol` would be.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use test_support::behavior::{Behavior, script};
use test_support::client::H1Client;
use tether_gateway::config::{HealthCheck, ProxyProtocolVersion};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// What the upstream saw on each of its connections, in accept order.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// The header's source address, or `None` for a header naming no client (LOCAL, UNKNOWN).
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    /// Whether the header was version 2.
    v2: bool,
    paths: Vec<String>,
    closed: bool,
}

#[derive(Clone, Default)]
struct Backend {
    conns: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    fn seen(&self) -> Vec<Seen> {
        self.conns.lock().unwrap().clone()
    }

    /// Connections that carried a request for `path`.
    fn carrying(&self, path: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.paths.iter().any(|p| p == path))
            .collect()
    }
}

/// Reads a PROXY protocol header (either version) off the front of `sock`, and nothing more.
async fn read_header(sock: &mut TcpStream) -> (Option<SocketAddr>, Option<SocketAddr>, bool) {
    let mut first = [0u8; 16];
    sock.read_exact(&mut first[..5]).await.unwrap();
    if &first[..5] == b"PROXY" {
        let mut line = first[..5].to_vec();
        while !line.ends_with(b"\r\n") {
            assert!(line.len() <= 107, "v1 header too long: {line:?}");
            line.push(sock.read_u8().await.unwrap());
        }
        let header = ppp::v1::Header::try_from(std::str::from_utf8(&line).unwrap()).unwrap();
        return match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => (
                Some((a.source_address, a.source_port).into()),
                Some((a.destination_address, a.destination_port).into()),
                false,
            ),
            ppp::v1::Addresses::Tcp6(a) => (
                Some((a.source_address, a.source_port).into()),
                Some((a.destination_address, a.destination_port).into()),
                false,
            ),
            ppp::v1::Addresses::Unknown => (None, None, false),
        };
    }
    sock.read_exact(&mut first[5..]).await.unwrap();
    let len = usize::from(u16::from_be_bytes([first[14], first[15]]));
    let mut whole = first.to_vec();
    whole.resize(16 + len, 0);
    sock.read_exact(&mut whole[16..]).await.unwrap();
    let header = ppp::v2::Header::try_from(whole.as_slice()).unwrap();
    match (header.command, header.addresses) {
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => (
            Some((a.source_address, a.source_port).into()),
            Some((a.destination_address, a.destination_port).into()),
            true,
        ),
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => (
            Some((a.source_address, a.source_port).into()),
            Some((a.destination_address, a.destination_port).into()),
            true,
        ),
        (ppp::v2::Command::Local, _) => (None, None, true),
        other => panic!("unexpected v2 header {other:?}"),
    }
}

/// An HTTP/1.1 upstream that requires a PROXY protocol header on every connection and answers
/// each request with the client the header named.
async fn backend() -> (SocketAddr, Backend) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Backend::default();
    let shared = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let state = shared.clone();
            tokio::spawn(async move {
                let (source, destination, v2) = read_header(&mut sock).await;
                let idx = {
                    let mut conns = state.conns.lock().unwrap();
                    conns.push(Seen {
                        source,
                        destination,
                        v2,
                        ..Seen::default()
                    });
                    conns.len() - 1
                };
                let inner = state.clone();
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        inner.conns.lock().unwrap()[idx]
                            .paths
                            .push(req.uri().path().to_owned());
                        let body = source.map_or("local".to_owned(), |s| s.to_string());
                        async move {
                            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from(body),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
                state.conns.lock().unwrap()[idx].closed = true;
            });
        }
    });
    (addr, state)
}

async fn gateway(up: SocketAddr, version: ProxyProtocolVersion) -> Env {
    Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("unused")), |c| {
        c.upstreams[0].addresses = vec![up.into()];
        c.upstreams[0].proxy_protocol = Some(version);
    })
    .await
}

async fn get(c: &mut H1Client, path: &str) -> String {
    let (head, body) = bounded(BOUND, c.get(path)).await.unwrap();
    assert_eq!(head.status, 200);
    String::from_utf8(body.to_vec()).unwrap()
}

/// Each client's requests reach the upstream on a connection of its own whose header names
/// that client and the address it reached tether at; a client's next request reuses its
/// connection, and the connection closes when the client's does.
#[tokio::test]
async fn each_client_gets_upstream_connections_that_name_it() {
    for version in [ProxyProtocolVersion::V1, ProxyProtocolVersion::V2] {
        let (up, seen) = backend().await;
        let env = gateway(up, version).await;
        let mut a = H1Client::connect(env.addr).await.unwrap();
        let mut b = H1Client::connect(env.addr).await.unwrap();
        let a1 = get(&mut a, "/a1").await;
        let b1 = get(&mut b, "/b1").await;
        let a2 = get(&mut a, "/a2").await;
        let b2 = get(&mut b, "/b2").await;
        // The upstream was told each client's own address: the one tether logged for it.
        for (body, path) in [(&a1, "/a1"), (&a2, "/a2"), (&b1, "/b1"), (&b2, "/b2")] {
            assert_eq!(
                *body,
                env.record(path).await.client.to_string(),
                "{version:?}"
            );
        }
        assert_ne!(a1, b1);
        let conns = seen.seen();
        assert_eq!(conns.len(), 2, "{conns:?}");
        for (c, paths) in conns.iter().zip([["/a1", "/a2"], ["/b1", "/b2"]]) {
            assert_eq!(c.paths, paths, "{version:?} {conns:?}");
            assert_eq!(c.destination, Some(env.addr), "{version:?}");
            assert_eq!(c.v2, version == ProxyProtocolVersion::V2);
        }
        // The client leaves: its upstream connection goes with it; the other's stays.
        drop(a);
        bounded(BOUND, async {
            while !seen.carrying("/a1")[0].closed {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(!seen.carrying("/b1")[0].closed);
        assert_eq!(get(&mut b, "/b3").await, b1);
        assert_eq!(seen.seen().len(), 2, "{:?}", seen.seen());
        env.stop().await;
    }
}

/// The upstream's health checks are tether's own connections: their header names no client.
#[tokio::test]
async fn health_checks_send_a_header_naming_no_client() {
    let (up, seen) = backend().await;
    let env = Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("unused")), |c| {
        c.upstreams[0].addresses = vec![up.into()];
        c.upstreams[0].proxy_protocol = Some(ProxyProtocolVersion::V2);
        let mut check = HealthCheck::new("/healthz");
        check.interval = Duration::from_millis(50);
        c.upstreams[0].health_check = Some(check);
    })
    .await;
    bounded(BOUND, async {
        while seen.carrying("/healthz").is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let check = &seen.carrying("/healthz")[0];
    assert_eq!((check.source, check.v2), (None, true));
    // Requests still name their client.
    let mut c = H1Client::connect(env.addr).await.unwrap();
    let body = get(&mut c, "/x").await;
    assert_eq!(body, env.record("/x").await.client.to_string());
    env.stop().await;
}
