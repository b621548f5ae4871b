//! HTTP/2 rapid reset (CVE-2023-44487): a client opening and resetting streams as fast as it can
//! is told to go away, while a well-behaved client on another connection is served throughout;
//! the gateway's CPU and memory stay bounded, and the upstream connections stay within the
//! route's in-flight limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Down, Env, Up, bounded, cpu_time, metric, rss_bytes, thread_cpu_time};
use test_support::behavior::{Behavior, routes};
use tether_gateway::config::AdminConfig;
use tokio::time::Instant;

const FLOOD: Duration = Duration::from_secs(3);
const MAX_IN_FLIGHT: usize = 32;

/// One attacking connection: HEADERS then RST_STREAM(CANCEL), as fast as the connection allows,
/// until the server sends GOAWAY or the flood ends. Returns (streams opened, got GOAWAY).
async fn attack_once(addr: std::net::SocketAddr, until: Instant) -> (u64, bool) {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return (0, false);
    };
    let Ok((mut send, conn)) = h2::client::handshake(tcp).await else {
        return (0, false);
    };
    let conn = tokio::spawn(conn);
    let mut opened = 0;
    let mut goaway = false;
    while Instant::now() < until {
        send = match send.ready().await {
            Ok(s) => s,
            Err(e) => {
                goaway = sent_away(&e);
                break;
            }
        };
        let req = http::Request::get("http://flood.test/slow")
            .body(())
            .unwrap();
        match send.send_request(req, false) {
            Ok((_resp, mut body)) => {
                body.send_reset(h2::Reason::CANCEL);
                opened += 1;
            }
            Err(e) => {
                goaway = sent_away(&e);
                break;
            }
        }
        // Let the connection task write: without it the client only buffers.
        if opened % 16 == 0 {
            tokio::task::yield_now().await;
        }
    }
    if !goaway {
        goaway = match tokio::time::timeout(Duration::from_millis(500), conn).await {
            Ok(Ok(Err(e))) => sent_away(&e),
            // The client still holds its sender: a clean end means the gateway closed the
            // connection after a graceful GOAWAY.
            Ok(Ok(Ok(()))) => true,
            _ => false,
        };
    }
    (opened, goaway)
}

/// Whether the gateway ended the attacking connection: a GOAWAY or reset it sent, or the socket it
/// closed after its GOAWAY (the attacker, still writing, then sees a broken pipe or a reset before
/// it reads the frame). The attacker never closes its side itself.
fn sent_away(e: &h2::Error) -> bool {
    if e.is_go_away() || e.reason().is_some() {
        return true;
    }
    e.get_io().is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_flood_is_sent_away_and_others_are_served() {
    let env = Env::with(
        Down::H2c,
        Up::H1,
        routes(vec![
            ("/slow", Behavior::stall_ms(50, "slow")),
            ("/ok", Behavior::ok("fine")),
        ]),
        |c| {
            c.listeners[0].routes[0].max_in_flight = NonZeroUsize::new(MAX_IN_FLIGHT);
            c.admin = Some(AdminConfig {
                address: "127.0.0.1:0".parse().unwrap(),
            });
        },
    )
    .await;
    // Warm up (allocator, first connections) before taking the baselines.
    let mut good = env.http().await;
    assert_eq!(good.get("/ok").await.unwrap().0.status, 200);
    let cpu0 = cpu_time();
    let gw_cpu0 = thread_cpu_time("tether-worker");
    let rss0 = rss_bytes();
    let started = Instant::now();
    let until = started + FLOOD;

    let addr = env.addr;
    let attacker = tokio::spawn(async move {
        let (mut streams, mut conns, mut goaways) = (0u64, 0u64, 0u64);
        while Instant::now() < until {
            let (n, g) = attack_once(addr, until).await;
            streams += n;
            // A connection still going when the flood ends was not given a chance to be sent
            // away: it does not count either way.
            if g || Instant::now() < until {
                conns += 1;
                goaways += u64::from(g);
            }
        }
        (streams, conns, goaways)
    });

    // Sample the upstream connections the gateway holds while the flood runs.
    let max_up = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (max_up, sampling) = (max_up.clone(), sampling.clone());
        let text = {
            let env = &env;
            move || env.metrics_text().unwrap()
        };
        let mut samples = Vec::new();
        while sampling.load(Ordering::Relaxed) && Instant::now() < until {
            let t = text();
            let active = metric(
                &t,
                "tether_upstream_connections{upstream=\"up\",state=\"active\"}",
            )
            .unwrap_or(0.0);
            let connecting = metric(
                &t,
                "tether_upstream_connections{upstream=\"up\",state=\"connecting\"}",
            )
            .unwrap_or(0.0);
            let n = (active + connecting) as usize;
            max_up.fetch_max(n, Ordering::Relaxed);
            samples.push(n);
            // Meanwhile the well-behaved client keeps going.
            let (parts, body) = bounded(Duration::from_secs(2), good.get("/ok"))
                .await
                .expect("well-behaved request failed during the flood");
            assert_eq!(parts.status, 200);
            assert_eq!(&body[..], b"fine");
        }
        samples.len()
    };
    let good_requests = sampler;
    let (streams, conns, goaways) = bounded(FLOOD + Duration::from_secs(5), attacker)
        .await
        .unwrap();
    let cpu = cpu_time() - cpu0;
    let gw_cpu = thread_cpu_time("tether-worker") - gw_cpu0;
    let rss_growth = rss_bytes().saturating_sub(rss0);
    let wall = started.elapsed();
    eprintln!(
        "flood: {streams} streams on {conns} connections, {goaways} GOAWAYs; {good_requests} good \
         requests; cpu {cpu:?} (gateway {gw_cpu:?}) over {wall:?}; rss +{} KiB; max upstream conns {}; upstream accepts {}",
        rss_growth / 1024,
        max_up.load(Ordering::Relaxed),
        env.log().accepted(),
    );
    assert!(streams > 0, "the attacker opened no stream");
    assert!(goaways > 0, "the attacker was never sent away");
    assert!(
        goaways * 2 >= conns,
        "most attacking connections should be ended by the gateway ({goaways} of {conns})"
    );
    assert!(good_requests > 0);
    assert!(
        max_up.load(Ordering::Relaxed) <= MAX_IN_FLIGHT + 2,
        "upstream connections beyond the in-flight limit"
    );
    // The gateway's cost per attacking stream stays small: a reset stream is dropped before any
    // upstream work, and no amplification (say, a connect per stream) happens.
    let per_stream = gw_cpu.as_secs_f64() / streams as f64;
    assert!(
        per_stream < 100e-6,
        "gateway cpu {gw_cpu:?} for {streams} streams ({:.1} µs each)",
        per_stream * 1e6
    );
    // And the upstream was not stormed with connections.
    assert!(
        env.log().accepted() <= 2 * MAX_IN_FLIGHT as u64,
        "upstream accepted {} connections",
        env.log().accepted()
    );
    assert!(
        rss_growth < 200 * 1024 * 1024,
        "rss grew by {rss_growth} bytes"
    );
    // Afterwards nothing is left in flight.
    let settled = bounded(Duration::from_secs(3), async {
        loop {
            let t = env.metrics_text().unwrap();
            if metric(&t, "tether_in_flight_requests") == Some(0.0) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(settled.contains("tether_in_flight_requests 0"));
    sampling.store(false, Ordering::Relaxed);
    env.stop().await;
}
