//! The worker idle hook (`listen::on_worker_idle`): it runs once a worker has started no request
//! for a few seconds, once per quiet spell, and never while requests keep coming, however long
//! the worker sleeps between them. A test binary of its own: the hook is process-wide, and other
//! tests' gateways would run it too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tether_gateway::config::*;
use tether_gateway::observe::access::MemoryAccessLog;
use tether_gateway::{Config, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

static RUNS: AtomicUsize = AtomicUsize::new(0);

fn count_run() {
    RUNS.fetch_add(1, Ordering::Relaxed);
}

/// An HTTP/1.1 upstream that answers every request at once.
async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while s.read(&mut buf).await.unwrap_or(0) > 0 {
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn get(addr: SocketAddr) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

async fn wait_for_runs(n: usize, within: Duration) {
    let start = Instant::now();
    while RUNS.load(Ordering::Relaxed) < n {
        assert!(start.elapsed() < within, "the hook did not run a time {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_idle_hook_waits_for_a_quiet_spell_and_runs_once_per_spell() {
    tether_gateway::listen::on_worker_idle(count_run);
    let up = upstream().await;
    let config = Config {
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
    };
    let gw = Gateway::start(config, Arc::new(MemoryAccessLog::new())).unwrap();
    let addr = gw.listener_addrs()[0];

    // A request every 0.7 s for over 3 s: the worker sleeps between them, but requests keep
    // coming, so the hook does not run.
    for _ in 0..6 {
        get(addr).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(
        RUNS.load(Ordering::Relaxed),
        0,
        "the hook ran between requests"
    );

    // Quiet: it runs once, about 3 s after the last request (the worker wakes every second).
    get(addr).await;
    let last = Instant::now();
    wait_for_runs(1, Duration::from_secs(8)).await;
    assert!(
        last.elapsed() >= Duration::from_millis(2900),
        "ran {:?} after the last request",
        last.elapsed()
    );
    // Once per quiet spell.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        RUNS.load(Ordering::Relaxed),
        1,
        "the hook ran again while quiet"
    );

    // A request starts a new spell.
    get(addr).await;
    wait_for_runs(2, Duration::from_secs(8)).await;
    drop(gw);
}
