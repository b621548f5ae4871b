//! Upstream connections after a burst: many concurrent requests open many HTTP/1 upstream
//! connections, but once they are over only the pool's idle connections may stay open; every other
//! one is closed (socket and task), and the connection gauges say so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use test_support::behavior::{Behavior, script};
use test_support::client::H1Client;
use test_support::{EventKind, UpstreamH1};
use tether_gateway::Gateway;
use tether_gateway::config::*;
use tether_gateway::observe::access::MemoryAccessLog;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Connections the upstream accepted and has not seen closed.
fn upstream_open(up: &UpstreamH1) -> usize {
    let mut closed = HashSet::new();
    for e in up.log().events() {
        if matches!(
            e.kind,
            EventKind::Eof | EventKind::Reset | EventKind::ConnectionClosed
        ) {
            closed.insert(e.conn);
        }
    }
    up.log().accepted() as usize - closed.len()
}

/// Established TCP connections of this process whose remote end is `port` (the gateway's side of
/// its upstream connections; the upstream's own sockets have `port` as their local end).
fn sockets_to(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/self/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "01"
                && f[2]
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

/// `GET path` on the admin listener, body only.
async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}

struct Burst {
    up: UpstreamH1,
    admin: SocketAddr,
    gw: tether_gateway::RunningGateway,
    clients: Vec<H1Client>,
}

/// A gateway with `workers` workers and an admin listener in front of `up` (upstream `up`),
/// keeping `cap` idle connections per worker for `idle_timeout`; with its listener and admin
/// addresses.
fn gateway(
    up: &UpstreamH1,
    workers: usize,
    cap: usize,
    idle_timeout: Duration,
) -> (tether_gateway::RunningGateway, SocketAddr, SocketAddr) {
    let (gw, addr, admin, _) = gateway_to(up.addr(), workers, cap, idle_timeout, |_| {});
    (gw, addr, admin)
}

/// Like [`gateway`], for an upstream at `upstream`, with the gateway's access log.
fn gateway_to(
    upstream: SocketAddr,
    workers: usize,
    cap: usize,
    idle_timeout: Duration,
    tweak: impl FnOnce(&mut UpstreamConfig),
) -> (
    tether_gateway::RunningGateway,
    SocketAddr,
    SocketAddr,
    MemoryAccessLog,
) {
    let mut upstream = UpstreamConfig::new("up", vec![upstream.into()], UpstreamProtocol::Http1);
    upstream.max_idle_per_endpoint = cap;
    upstream.idle_timeout = idle_timeout;
    tweak(&mut upstream);
    let mut config = Config::new(
        vec![ListenerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            vec![RouteConfig::new("/", "up")],
        )],
        vec![upstream],
    );
    config.workers = NonZeroUsize::new(workers);
    config.admin = Some(AdminConfig {
        address: "127.0.0.1:0".parse().unwrap(),
    });
    let access = MemoryAccessLog::new();
    let gw = Gateway::start(config, Arc::new(access.clone())).unwrap();
    let addr = gw.listener_addrs()[0];
    let admin = gw.admin_addr().unwrap();
    (gw, addr, admin, access)
}

/// `n` keep-alive clients each send one request at once through a gateway with `workers` workers
/// and a pool of `cap` idle connections per worker, then stay connected and idle.
async fn burst(n: usize, workers: usize, cap: usize, behavior: Behavior) -> Burst {
    let up = UpstreamH1::start(script(move |_| behavior.clone()))
        .await
        .unwrap();
    let (gw, addr, admin) = gateway(&up, workers, cap, Duration::from_secs(60));

    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(async move {
            let mut c = H1Client::connect(addr).await.unwrap();
            let (head, _) = c.get(&format!("/b/{i}")).await.unwrap();
            assert_eq!(head.status, 200);
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    Burst {
        up,
        admin,
        gw,
        clients,
    }
}

/// The gauges, the gateway's sockets and the upstream's view of the connections, in one line.
async fn state(b: &Burst) -> (usize, usize, f64, f64) {
    let m = admin_get(b.admin, "/metrics").await;
    (
        upstream_open(&b.up),
        sockets_to(b.up.addr().port()),
        sample(
            &m,
            r#"tether_upstream_connections{upstream="up",state="idle"}"#,
        ),
        sample(
            &m,
            r#"tether_upstream_connections{upstream="up",state="active"}"#,
        ),
    )
}

/// 150 requests at once on 150 keep-alive clients open many more upstream connections than the
/// pools keep (8 per worker, 2 workers). Once they are over, with the clients still connected, the
/// surplus is closed: the upstream sees at most 16 connections open, the gateway holds that many
/// sockets to it, and the gauges count them all as idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_leaves_at_most_the_pool_open() {
    const N: usize = 150;
    const CAP: usize = 8;
    const WORKERS: usize = 2;
    tokio::time::timeout(Duration::from_secs(20), async {
        // The stall keeps every request in flight at once, each on its own connection.
        let b = burst(N, WORKERS, CAP, Behavior::stall_ms(100, "hello")).await;
        let accepted = b.up.log().accepted() as usize;
        assert!(
            accepted > 2 * WORKERS * CAP,
            "the burst opened only {accepted} upstream connections"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut s = state(&b).await;
        loop {
            let (up_open, sockets, idle, active) = s;
            if up_open <= WORKERS * CAP
                && sockets == up_open
                && idle == sockets as f64
                && active == 0.0
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after a burst of {N} ({accepted} connections): upstream sees {up_open} open, \
                 gateway holds {sockets} sockets, gauges idle={idle} active={active}; the pools \
                 keep at most {}",
                WORKERS * CAP
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            s = state(&b).await;
        }
        // The pooled connections are the ones used next: no new connection for a second round.
        let mut clients = b.clients;
        for (i, c) in clients.iter_mut().take(WORKERS * CAP).enumerate() {
            let (head, _) = c.get(&format!("/again/{i}")).await.unwrap();
            assert_eq!(head.status, 200);
        }
        assert!(b.up.log().accepted() as usize <= accepted + WORKERS * CAP);
        drop(clients);
        drop(b.gw);
    })
    .await
    .expect("bounded");
}

/// Measurement, not a check: prints the counts over time after a burst.
/// `BURST_N=2000 BURST_CAP=64 cargo test -p tether-gateway --all-features --test upstream_pool
/// -- --ignored --nocapture measure`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("BURST_N", 2000);
    let cap = env("BURST_CAP", 64);
    let workers = env("BURST_WORKERS", 2);
    let stall = env("BURST_STALL_MS", 0) as u64;
    let started = Instant::now();
    let behavior = match std::env::var("BURST_KIND").as_deref() {
        Ok("stream") => Behavior::stream("chunk", 3, stall),
        Ok("download") => Behavior::Download { len: 200_000 },
        _ => Behavior::stall_ms(stall, "hello"),
    };
    let b = burst(n, workers, cap, behavior).await;
    println!(
        "burst of {n} done in {:?}; upstream accepted {}",
        started.elapsed(),
        b.up.log().accepted()
    );
    let port = b.up.addr().port();
    let t0 = Instant::now();
    for wait_ms in [0u64, 100, 500, 1000, 2000, 5000] {
        tokio::time::sleep_until(t0 + Duration::from_millis(wait_ms)).await;
        let m = admin_get(b.admin, "/metrics").await;
        println!(
            "t+{wait_ms:>5}ms upstream_open={} gw_sockets={} gauge idle={} active={} connecting={}",
            upstream_open(&b.up),
            sockets_to(port),
            sample(
                &m,
                r#"tether_upstream_connections{upstream="up",state="idle"}"#
            ),
            sample(
                &m,
                r#"tether_upstream_connections{upstream="up",state="active"}"#
            ),
            sample(
                &m,
                r#"tether_upstream_connections{upstream="up",state="connecting"}"#
            ),
        );
    }
    drop(b.clients);
    drop(b.gw);
}

/// An idle upstream connection is closed once its idle timeout has passed, even when no request
/// comes to take it: the upstream sees the close, and the gauges count it no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout_without_traffic() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let up = UpstreamH1::start(script(|_| Behavior::ok("hello")))
            .await
            .unwrap();
        let (gw, addr, admin) = gateway(&up, 1, 64, Duration::from_millis(300));
        let mut c = H1Client::connect(addr).await.unwrap();
        let (head, _) = c.get("/").await.unwrap();
        assert_eq!(head.status, 200);
        let idle = r#"tether_upstream_connections{upstream="up",state="idle"}"#;
        assert_eq!(sample(&admin_get(admin, "/metrics").await, idle), 1.0);
        assert_eq!(upstream_open(&up), 1);

        // Closed within the timeout plus the sweep period, with nothing else happening.
        let started = Instant::now();
        while upstream_open(&up) > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "the idle connection is still open after {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(sample(&admin_get(admin, "/metrics").await, idle), 0.0);
        assert_eq!(sockets_to(up.addr().port()), 0);
        // The next request connects afresh.
        let (head, _) = c.get("/").await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(up.log().accepted(), 2);
        drop(c);
        drop(gw);
    })
    .await
    .expect("bounded");
}

const RESTING: &str = r#"tether_upstream_resting_connections{upstream="up"}"#;

/// Waits (at most 5 s) until the gateway reports `n` resting upstream connections.
async fn wait_resting(admin: SocketAddr, n: f64) {
    let started = Instant::now();
    loop {
        let m = admin_get(admin, "/metrics").await;
        if sample(&m, RESTING) == n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "resting connections: {} (waiting for {n})",
            sample(&m, RESTING)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An idle connection rests (its task and buffers freed, its socket kept) and the next request
/// uses it: the upstream sees one connection throughout, never closed, and the request is logged
/// as sent on a reused connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rested_connection_serves_the_next_request() {
    let up = UpstreamH1::start(script(|_| Behavior::ok("hello")))
        .await
        .unwrap();
    rest_and_reuse(up, |_| {}).await;
}

/// The same over TLS: the TLS session rests with its socket and carries on, with no new
/// handshake (the upstream accepts one connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rested_tls_connection_serves_the_next_request() {
    let pki = test_support::tls::TestPki::generate().unwrap();
    let up = UpstreamH1::start_tls(
        script(|_| Behavior::ok("hello")),
        pki.server_config(&[b"http/1.1"]).unwrap(),
    )
    .await
    .unwrap();
    rest_and_reuse(up, move |u| {
        u.tls = Some(UpstreamTls {
            server_name: Some("localhost".into()),
            ca: vec![pki.ca_der()],
            insecure_skip_verify: false,
            client_cert: None,
        });
    })
    .await;
}

async fn rest_and_reuse(up: UpstreamH1, tweak: impl FnOnce(&mut UpstreamConfig)) {
    tokio::time::timeout(Duration::from_secs(20), async {
        let (gw, addr, admin, access) = gateway_to(up.addr(), 1, 8, Duration::from_secs(60), tweak);
        let mut c = H1Client::connect(addr).await.unwrap();
        assert_eq!(c.get("/one").await.unwrap().0.status, 200);
        assert_eq!(sample(&admin_get(admin, "/metrics").await, RESTING), 0.0);

        wait_resting(admin, 1.0).await;
        // Resting, not closed: both ends still hold the connection.
        assert_eq!(upstream_open(&up), 1);
        assert_eq!(sockets_to(up.addr().port()), 1);
        let m = admin_get(admin, "/metrics").await;
        assert_eq!(
            sample(
                &m,
                r#"tether_upstream_connections{upstream="up",state="idle"}"#
            ),
            1.0
        );

        let (head, body) = c.get("/two").await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(&body[..], b"hello");
        assert_eq!(up.log().accepted(), 1, "the rested connection was not used");
        assert_eq!(upstream_open(&up), 1);
        assert_eq!(sample(&admin_get(admin, "/metrics").await, RESTING), 0.0);
        let recs = access.records();
        let last = recs.last().unwrap();
        assert_eq!(last.upstream_reused, Some(true));
        assert_eq!(last.retries, 0);

        // It rests again, and serves again.
        wait_resting(admin, 1.0).await;
        assert_eq!(c.get("/three").await.unwrap().0.status, 200);
        assert_eq!(up.log().accepted(), 1);
        drop(c);
        drop(gw);
    })
    .await
    .expect("bounded");
}

/// A rested connection the upstream closed is found closed before anything is sent on it: the
/// next request goes out on a new connection at once, with no failed attempt and no retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rested_connection_the_upstream_closed_is_not_used() {
    tokio::time::timeout(Duration::from_secs(20), async {
        // A keep-alive upstream that answers every request on a connection until told to close
        // the first one.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = listener.local_addr().unwrap();
        let close_first = Arc::new(tokio::sync::Notify::new());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = {
            let (close_first, accepted, requests) =
                (close_first.clone(), accepted.clone(), requests.clone());
            tokio::spawn(async move {
                loop {
                    let (mut s, _) = listener.accept().await.unwrap();
                    let n = accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let (close_first, requests) = (close_first.clone(), requests.clone());
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        loop {
                            let mut chunk = [0u8; 1024];
                            let read = tokio::select! {
                                r = s.read(&mut chunk) => r.unwrap_or(0),
                                () = close_first.notified(), if n == 0 => 0,
                            };
                            if read == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..read]);
                            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                buf.drain(..end + 4);
                                requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                    .await
                                    .unwrap();
                            }
                        }
                    });
                }
            })
        };
        let (gw, addr, admin, access) = gateway_to(up_addr, 1, 8, Duration::from_secs(60), |_| {});
        let mut c = H1Client::connect(addr).await.unwrap();
        assert_eq!(c.get("/one").await.unwrap().0.status, 200);
        wait_resting(admin, 1.0).await;

        // The upstream closes the resting connection; the next request follows at once, well
        // before the next sweep.
        close_first.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (head, body) = c.get("/two").await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(&body[..], b"ok");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 2);
        let recs = access.records();
        let last = recs.last().unwrap();
        assert_eq!(last.upstream_reused, Some(false));
        assert_eq!(last.retries, 0);
        assert_eq!(sample(&admin_get(admin, "/metrics").await, RESTING), 0.0);
        drop(c);
        drop(gw);
        server.abort();
    })
    .await
    .expect("bounded");
}

/// An HTTP/2 upstream allowing `streams` streams per connection, holding `/hold...` requests
/// for ever and answering others.
async fn holding_h2_upstream(streams: u32) -> test_support::UpstreamH2 {
    test_support::UpstreamH2::start_limited(
        script(|r| {
            if r.path.starts_with("/hold") {
                Behavior::Never
            } else {
                Behavior::ok("ok")
            }
        }),
        streams,
    )
    .await
    .unwrap()
}

/// `/hold...` requests that reached `up`.
fn holds_started(up: &test_support::UpstreamH2) -> usize {
    up.log()
        .events()
        .iter()
        .filter(|e| {
            e.path.starts_with("/hold") && matches!(e.kind, EventKind::RequestStarted { .. })
        })
        .count()
}

/// An HTTP/2 upstream that allows 2 streams per connection (its SETTINGS_MAX_CONCURRENT_STREAMS)
/// with `max_streams_per_connection` left at its default of 100: tether follows the upstream's
/// own limit, and a third request at once opens a second connection instead of waiting inside
/// the first for a stream to end.
#[tokio::test]
async fn an_h2_upstreams_own_stream_limit_opens_another_connection() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let up = holding_h2_upstream(2).await;
        let (gw, addr, _admin, _) = gateway_to(up.addr(), 1, 8, Duration::from_millis(300), |u| {
            u.protocol = UpstreamProtocol::H2c;
        });
        let mut c = H1Client::connect(addr).await.unwrap();
        assert_eq!(c.get("/warm").await.unwrap().0.status, 200);
        // One at a time, each once the one before reached the upstream: a connection learns
        // its upstream's limit as its streams start (a burst on a connection too new to have
        // heard it can pass the limit, up to max_streams_per_connection).
        let mut holds = Vec::new();
        for i in 0..5 {
            holds.push(tokio::spawn(async move {
                let mut c = H1Client::connect(addr).await.unwrap();
                c.get(&format!("/hold/{i}")).await
            }));
            let deadline = Instant::now() + Duration::from_secs(5);
            while holds_started(&up) < i + 1 {
                assert!(
                    Instant::now() < deadline,
                    "{} of {} requests reached the upstream over {} connections",
                    holds_started(&up),
                    i + 1,
                    up.log().accepted()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert_eq!(up.log().accepted(), 3);
        for h in holds {
            h.abort();
        }
        drop(gw);
    })
    .await
    .expect("bounded");
}

/// An HTTP/2 upstream that allows 2 streams per connection, with `max_streams_per_connection`
/// set to match: a third request at once opens a second connection and reaches the upstream at
/// once, rather than waiting inside the first connection for a stream to end (unseen by
/// timeouts and balancing). Once traffic is back to one stream at a time, the extra connection
/// is closed after `idle_timeout`, and the first one keeps serving.
#[tokio::test]
async fn streams_past_the_per_connection_limit_open_another_h2_connection() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let up = holding_h2_upstream(2).await;
        let (gw, addr, _admin, _) = gateway_to(up.addr(), 1, 8, Duration::from_millis(300), |u| {
            u.protocol = UpstreamProtocol::H2c;
            u.max_streams_per_connection = std::num::NonZeroU32::new(2).unwrap();
        });
        let mut holds = Vec::new();
        for i in 0..3 {
            holds.push(tokio::spawn(async move {
                let mut c = H1Client::connect(addr).await.unwrap();
                c.get(&format!("/hold/{i}")).await
            }));
        }
        // Bounded well below the test's limit: queued inside a connection, the third request
        // would never start, as the holds never end.
        let deadline = Instant::now() + Duration::from_secs(10);
        while holds_started(&up) < 3 {
            assert!(
                Instant::now() < deadline,
                "{} of 3 requests reached the upstream over {} connections",
                holds_started(&up),
                up.log().accepted()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(up.log().accepted(), 2);
        for h in holds {
            h.abort();
        }

        // One stream at a time from now on: the extra connection goes idle and is closed.
        let closed = |up: &test_support::UpstreamH2| {
            up.log()
                .events()
                .iter()
                .filter(|e| e.kind == EventKind::ConnectionClosed)
                .count()
        };
        let mut c = H1Client::connect(addr).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while closed(&up) == 0 {
            assert!(
                Instant::now() < deadline,
                "the extra connection stayed open"
            );
            let (head, _) = c.get("/one").await.unwrap();
            assert_eq!(head.status, 200);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (head, _) = c.get("/after").await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(closed(&up), 1, "{:?}", up.log().events());
        assert_eq!(up.log().accepted(), 2, "a connection was opened again");
        drop(gw);
    })
    .await
    .expect("bounded");
}

/// The upstream connection each request of `paths` arrived on, in order.
fn conns_of(log: &test_support::EventLog, paths: &[String]) -> Vec<u64> {
    let events = log.events();
    paths
        .iter()
        .map(|p| {
            events
                .iter()
                .find(|e| &e.path == p && matches!(e.kind, EventKind::RequestStarted { .. }))
                .map(|e| e.conn)
                .unwrap()
        })
        .collect()
}

/// `max_requests_per_connection`: an HTTP/1 upstream connection carries that many requests,
/// then is closed and the next request opens another (nginx's `keepalive_requests`).
#[tokio::test]
async fn an_h1_connection_is_closed_after_its_share_of_requests() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let up = UpstreamH1::start(script(|_| Behavior::ok("ok")))
            .await
            .unwrap();
        let (gw, addr, _admin, access) =
            gateway_to(up.addr(), 1, 8, Duration::from_secs(60), |u| {
                u.max_requests_per_connection = std::num::NonZeroU32::new(3);
            });
        let mut c = H1Client::connect(addr).await.unwrap();
        let paths: Vec<String> = (0..7).map(|i| format!("/r{i}")).collect();
        for p in &paths {
            assert_eq!(c.get(p).await.unwrap().0.status, 200);
        }
        assert_eq!(conns_of(up.log(), &paths), [1, 1, 1, 2, 2, 2, 3]);
        // The spent connections were closed, not left idle.
        let deadline = Instant::now() + Duration::from_secs(5);
        while upstream_open(&up) != 1 {
            assert!(Instant::now() < deadline, "{} open", upstream_open(&up));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reused: Vec<_> = access
            .records()
            .iter()
            .map(|r| r.upstream_reused == Some(true))
            .collect();
        assert_eq!(reused, [false, true, true, false, true, true, false]);
        drop(gw);
    })
    .await
    .expect("bounded");
}

/// `max_connection_age`: a connection older than that is not used again, idle or returning.
#[tokio::test]
async fn an_h1_connection_past_its_age_is_not_used_again() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let up = UpstreamH1::start(script(|_| Behavior::ok("ok")))
            .await
            .unwrap();
        let (gw, addr, _admin, _) = gateway_to(up.addr(), 1, 8, Duration::from_secs(60), |u| {
            u.max_connection_age = Some(Duration::from_millis(1500));
        });
        let mut c = H1Client::connect(addr).await.unwrap();
        let paths: Vec<String> = (0..3).map(|i| format!("/r{i}")).collect();
        assert_eq!(c.get(&paths[0]).await.unwrap().0.status, 200);
        assert_eq!(c.get(&paths[1]).await.unwrap().0.status, 200);
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert_eq!(c.get(&paths[2]).await.unwrap().0.status, 200);
        assert_eq!(conns_of(up.log(), &paths), [1, 1, 2]);
        // The old one was closed when its age came, not kept idle until the idle timeout.
        assert_eq!(upstream_open(&up), 1);
        drop(gw);
    })
    .await
    .expect("bounded");
}

/// Over HTTP/2 the limit counts streams: a connection that started its share takes no more
/// and closes once its last stream has ended, while new streams go to a new connection.
#[tokio::test]
async fn an_h2_connection_takes_no_new_streams_after_its_share_and_then_closes() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let up = test_support::UpstreamH2::start(script(|_| Behavior::ok("ok")))
            .await
            .unwrap();
        let (gw, addr, _admin, _) = gateway_to(up.addr(), 1, 8, Duration::from_secs(60), |u| {
            u.protocol = UpstreamProtocol::H2c;
            u.max_requests_per_connection = std::num::NonZeroU32::new(2);
        });
        let mut c = H1Client::connect(addr).await.unwrap();
        let paths: Vec<String> = (0..5).map(|i| format!("/r{i}")).collect();
        for p in &paths {
            assert_eq!(c.get(p).await.unwrap().0.status, 200);
        }
        assert_eq!(conns_of(up.log(), &paths), [1, 1, 2, 2, 3]);
        let closed = |up: &test_support::UpstreamH2| {
            let mut conns: Vec<u64> = up
                .log()
                .events()
                .iter()
                .filter(|e| e.kind == EventKind::ConnectionClosed)
                .map(|e| e.conn)
                .collect();
            conns.sort_unstable();
            conns
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while closed(&up) != [1, 2] {
            assert!(Instant::now() < deadline, "closed: {:?}", closed(&up));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(gw);
    })
    .await
    .expect("bounded");
}
