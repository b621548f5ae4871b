//! The stale keep-alive race (nodejs#47130): an upstream closes idle connections after a timeout
//! it does not announce, and requests arrive with gaps around that timeout, so tether regularly
//! picks a pooled connection just as the upstream closes it. No error may reach a client: a
//! connection found closed is skipped, and a request lost on one is sent again on a fresh
//! connection. Scaled down (a 200 ms idle timeout instead of 1 s) so 1,000 requests take seconds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use test_support::behavior::{Behavior, Reply, script};
use test_support::client::{HttpClient, Proto};
use test_support::{EventKind, H1Options, UpstreamH1};
use tether_gateway::config::*;
use tether_gateway::observe::access::{MemoryAccessLog, Outcome};
use tether_gateway::{Gateway, RunningGateway};

/// A small deterministic generator: the gaps must vary, the test must not.
struct Lcg(u64);

impl Lcg {
    fn next_in(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        lo + (self.0 >> 33) % (hi - lo + 1)
    }
}

struct Run {
    errors: Vec<String>,
    retries: u64,
    retried_requests: usize,
    reused: usize,
    records: usize,
    upstream_conns: usize,
}

/// A gateway with one route and one upstream (its own pool) per client, all to `up`: each pool
/// then sees exactly its client's gaps, so every reuse happens after about one gap of idleness.
async fn start(
    up: &UpstreamH1,
    lanes: usize,
    retry_body_bytes: u64,
) -> (RunningGateway, MemoryAccessLog, std::net::SocketAddr) {
    let upstreams = (0..lanes)
        .map(|i| {
            UpstreamConfig::new(
                format!("up{i}"),
                vec![up.addr().into()],
                UpstreamProtocol::Http1,
            )
        })
        .collect();
    let routes = (0..lanes)
        .map(|i| {
            let mut r = RouteConfig::new(format!("/lane{i}/"), format!("up{i}"));
            // No retries at all: resending on a fresh connection after a stale one is not a
            // retry of a failure and must not need any.
            r.max_retries = 0;
            r.retry_budget_ratio = 0.0;
            r.retry_budget_min_per_second = 0;
            r.retry_body_bytes = retry_body_bytes;
            r
        })
        .collect();
    let listener = ListenerConfig::new("127.0.0.1:0".parse().unwrap(), routes);
    let mut config = Config::new(vec![listener], upstreams);
    config.workers = std::num::NonZeroUsize::new(1);
    let access = MemoryAccessLog::new();
    let gw = Gateway::start(config, Arc::new(access.clone())).unwrap();
    let addr = gw.listener_addrs()[0];
    (gw, access, addr)
}

/// How the clients ask.
#[derive(Debug, Clone, Copy)]
enum Ask {
    /// `GET`, no body.
    Get,
    /// `PUT` with a small body, read whole before it is sent when `retry_body_bytes` allows.
    Put { retry_body_bytes: u64 },
}

/// `clients` keep-alive clients, each sending `per_client` requests with gaps drawn from
/// `gap_ms`.
async fn hammer(
    up: &UpstreamH1,
    clients: usize,
    per_client: usize,
    gap_ms: (u64, u64),
    ask: Ask,
) -> Run {
    let retry_body_bytes = match ask {
        Ask::Get => DEFAULT_RETRY_BODY_BYTES,
        Ask::Put { retry_body_bytes } => retry_body_bytes,
    };
    let (gw, access, addr) = start(up, clients, retry_body_bytes).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        tasks.spawn(async move {
            let mut rng = Lcg(i as u64 + 1);
            let mut errors = Vec::new();
            let mut client = HttpClient::connect(addr, Proto::Http1, None).await.unwrap();
            // Spread the clients' phases over one gap.
            tokio::time::sleep(Duration::from_millis(rng.next_in(0, gap_ms.1))).await;
            let path = format!("/lane{i}/ka");
            for n in 0..per_client {
                let sent = match ask {
                    Ask::Get => client.get(&path).await,
                    Ask::Put { .. } => {
                        let req = client
                            .request(http::Method::PUT, &path)
                            .body(test_support::client::full("state"))
                            .unwrap();
                        client.fetch(req).await.map(|(p, b, _)| (p, b))
                    }
                };
                match sent {
                    Ok((p, b)) if p.status == 200 && &b[..] == b"alive" => {}
                    Ok((p, b)) => errors.push(format!(
                        "client {i} request {n}: {} {}",
                        p.status,
                        String::from_utf8_lossy(&b)
                    )),
                    Err(e) => {
                        errors.push(format!("client {i} request {n}: {e}"));
                        client = HttpClient::connect(addr, Proto::Http1, None).await.unwrap();
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.next_in(gap_ms.0, gap_ms.1))).await;
            }
            errors
        });
    }
    let mut errors = Vec::new();
    while let Some(r) = tasks.join_next().await {
        errors.extend(r.unwrap());
    }
    // Records land just after the responses.
    let want = clients * per_client;
    for _ in 0..100 {
        if access.records().len() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recs = access.records();
    for r in &recs {
        if r.outcome != Outcome::Ok || r.status != 200 {
            errors.push(format!("record: {r:?}"));
        }
    }
    let _ = tokio::task::spawn_blocking(move || gw.shutdown(Duration::from_millis(200))).await;
    Run {
        errors,
        retries: recs.iter().map(|r| u64::from(r.retries)).sum(),
        retried_requests: recs.iter().filter(|r| r.retries > 0).count(),
        reused: recs
            .iter()
            .filter(|r| r.upstream_reused == Some(true))
            .count(),
        records: recs.len(),
        upstream_conns: up
            .log()
            .events()
            .iter()
            .filter(|e| e.kind == EventKind::Accepted)
            .count(),
    }
}

/// 1,000 requests (50 clients x 20) with gaps of 170-230 ms against an upstream that silently
/// closes connections idle for 200 ms: about half the reuses find the connection already closed,
/// and some hit the moment it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unannounced_idle_close_never_reaches_the_client() {
    bounded(Duration::from_secs(30), async {
        let up = UpstreamH1::start_with(
            script(|_| Behavior::ok("alive")),
            H1Options {
                idle_timeout: Some(Duration::from_millis(200)),
            },
        )
        .await
        .unwrap();
        let run = hammer(&up, 50, 20, (170, 230), Ask::Get).await;
        eprintln!(
            "stale keep-alive (unannounced 200 ms): {} requests, {} errors, {} reused, \
             {} retried sends on {} requests, {} upstream connections",
            run.records,
            run.errors.len(),
            run.reused,
            run.retries,
            run.retried_requests,
            run.upstream_conns
        );
        assert!(
            run.errors.is_empty(),
            "{} errors: {:#?}",
            run.errors.len(),
            &run.errors[..run.errors.len().min(10)]
        );
        assert_eq!(run.records, 1000);
        // The pool was used: otherwise this proves nothing about stale connections.
        assert!(run.reused > 100, "only {} reused", run.reused);
        assert!(
            run.upstream_conns > 100,
            "the upstream closed idle connections"
        );
    })
    .await;
}

/// The same upstream announcing `Keep-Alive: timeout=1` and closing after 1 s: tether keeps idle
/// connections for less than announced, so it never even races.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_keep_alive_timeout_is_honoured() {
    bounded(Duration::from_secs(30), async {
        let up = UpstreamH1::start_with(
            script(|_| Behavior::Respond(Reply::ok("alive").header("keep-alive", "timeout=1"))),
            H1Options {
                idle_timeout: Some(Duration::from_secs(1)),
            },
        )
        .await
        .unwrap();
        let run = hammer(&up, 20, 6, (900, 1100), Ask::Get).await;
        eprintln!(
            "stale keep-alive (announced 1 s): {} requests, {} errors, {} reused, {} retried sends",
            run.records,
            run.errors.len(),
            run.reused,
            run.retries
        );
        assert!(run.errors.is_empty(), "{:#?}", run.errors);
        assert_eq!(run.records, 120);
        assert_eq!(run.retries, 0, "no stale connection was ever used");
    })
    .await;
}

/// The same race with PUTs carrying a small body: the body is read whole before the send, so a
/// PUT lost on a connection the upstream closed as it arrived is sent again, body and all. With
/// `retry_body_bytes = 0` the body streams, cannot be sent twice, and such a PUT fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_with_a_small_body_survives_the_race_too() {
    bounded(Duration::from_secs(60), async {
        let up = || {
            UpstreamH1::start_with(
                script(|_| Behavior::ok("alive")),
                H1Options {
                    idle_timeout: Some(Duration::from_millis(200)),
                },
            )
        };
        let up_whole = up().await.unwrap();
        let whole = hammer(
            &up_whole,
            50,
            20,
            (170, 230),
            Ask::Put {
                retry_body_bytes: DEFAULT_RETRY_BODY_BYTES,
            },
        )
        .await;
        let up_streamed = up().await.unwrap();
        let streamed = hammer(
            &up_streamed,
            50,
            20,
            (170, 230),
            Ask::Put {
                retry_body_bytes: 0,
            },
        )
        .await;
        eprintln!(
            "stale keep-alive, PUT: read whole {} errors and {} resends, streamed {} errors and {} resends",
            whole.errors.len(),
            whole.retries,
            streamed.errors.len(),
            streamed.retries
        );
        assert!(
            whole.errors.is_empty(),
            "{} errors: {:#?}",
            whole.errors.len(),
            &whole.errors[..whole.errors.len().min(10)]
        );
        assert_eq!(whole.records, 1000);
        assert!(whole.reused > 100, "only {} reused", whole.reused);
        // Every body reached the upstream whole: 1,000 requests and their resends.
        let bodies = up_whole.log().body_lengths();
        assert!(bodies.len() >= 1000 && bodies.iter().all(|&n| n == 5), "{bodies:?}");
    })
    .await;
}
