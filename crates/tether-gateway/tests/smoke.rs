//! A first end-to-end check: one request through the gateway, and one abandoned.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use tether_gateway::config::*;
use tether_gateway::observe::access::{MemoryAccessLog, Outcome};
use tether_gateway::{Config, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A raw HTTP/1.1 upstream: answers `/fast` at once, holds `/slow`, reports EOF on each connection.
async fn upstream() -> (SocketAddr, mpsc::UnboundedReceiver<&'static str>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        let _ = tx.send("eof");
                        return;
                    }
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    if head.starts_with("GET /fast") {
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                    } else {
                        let _ = tx.send("slow-started");
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn config(up: SocketAddr) -> Config {
    Config {
        workers: NonZeroUsize::new(1),
        admin: None,
        dns: Default::default(),
        listeners: vec![ListenerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            vec![RouteConfig::new("/", "up")],
        )],
        upstreams: vec![UpstreamConfig::new(
            "up",
            vec![up.into()],
            UpstreamProtocol::Http1,
        )],
    }
}

#[tokio::test]
async fn proxies_and_aborts() {
    let (up, mut events) = upstream().await;
    let log = MemoryAccessLog::new();
    let gw = Gateway::start(config(up), Arc::new(log.clone())).unwrap();
    let addr = gw.listener_addrs()[0];

    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok"), "{text}");

    c.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap();
    assert_eq!(ev, Some("slow-started"));
    drop(c);
    let ev = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .unwrap();
    assert_eq!(ev, Some("eof"));

    let rec = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Some(r) = log.records().into_iter().find(|r| r.path == "/slow") {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(rec.status, 499);
    assert_eq!(rec.outcome, Outcome::ClientAbort);
    assert_eq!(rec.abort_reason, Some(tether::CancelReason::ClientClosed));
    assert_eq!(rec.stage, Some("first_byte"));
    let p = rec.propagation.expect("propagation measured");
    assert!(p < Duration::from_secs(1), "{p:?}");
    eprintln!("propagation {p:?}");
    let ok = log
        .records()
        .into_iter()
        .find(|r| r.path == "/fast")
        .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(ok.outcome, Outcome::Ok);
}

#[tokio::test]
async fn quiet_upload_is_cut_with_408() {
    let (up, mut events) = upstream().await;
    let log = MemoryAccessLog::new();
    let mut cfg = config(up);
    cfg.listeners[0].routes[0].timeouts.idle = Some(Duration::from_millis(300));
    let gw = Gateway::start(cfg, Arc::new(log.clone())).unwrap();
    let mut c = TcpStream::connect(gw.listener_addrs()[0]).await.unwrap();
    c.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap();
    assert_eq!(ev, Some("slow-started"));
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error\":\"request_timeout\""), "{text}");
    assert!(text.contains("\"stage\":\"request_body\""), "{text}");
    // The upstream saw the request end abnormally, never a short body.
    let ev = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .unwrap();
    assert_eq!(ev, Some("eof"));
}
