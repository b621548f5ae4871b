//! Deadlines on real sockets: the budget stamped upstream (`x-request-timeout-ms`) is what is
//! left of the route's deadline when the request is actually sent, and a deadline that passes
//! while the response streams ends it there, aborting the upstream like a client cancel would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use h2::Reason;
use test_support::EventKind;
use test_support::behavior::{Behavior, Reply, routes, script};
use tether::CancelReason;
use tether_gateway::observe::access::Outcome;
use tokio::time::Instant;

const BUDGET: &str = "x-request-timeout-ms";

fn budgets(env: &Env, path: &str) -> Vec<u64> {
    env.log()
        .requests(path)
        .iter()
        .map(|(_, h)| {
            h.iter()
                .find(|(n, _)| n == BUDGET)
                .unwrap_or_else(|| panic!("no {BUDGET} in {h:?}"))
                .1
                .parse()
                .unwrap()
        })
        .collect()
}

/// Time spent before the send (here: Happy Eyeballs waiting 250 ms on a dead first candidate) is
/// taken off the budget the upstream receives.
#[tokio::test]
async fn budget_sent_upstream_excludes_connect_time() {
    bounded(Duration::from_secs(10), async {
        let DeadFirst {
            env,
            hole,
            stub: _stub,
        } = DeadFirst::start(
            "slow.test",
            routes(vec![("/budget", Behavior::ok("ok"))]),
            |c| c.listeners[0].routes[0].timeouts.total = Some(Duration::from_secs(2)),
        )
        .await;
        let mut client = env.http().await;
        let (parts, _) = client.get("/budget").await.unwrap();
        assert_eq!(parts.status, 200);
        let connect = env.record("/budget").await.upstream_connect.unwrap();
        assert!(connect >= Duration::from_millis(240), "{connect:?}");
        let b = budgets(&env, "/budget");
        assert_eq!(b.len(), 1);
        assert!(
            b[0] <= 2000 - 240 && b[0] >= 1000,
            "upstream saw {} ms after a {connect:?} connect",
            b[0]
        );
        drop(hole);
        env.stop().await;
    })
    .await;
}

/// A retried attempt carries what is left after the first one (which took 300 ms).
#[tokio::test]
async fn retried_attempt_carries_the_remaining_budget() {
    bounded(Duration::from_secs(10), async {
        let n = Arc::new(AtomicUsize::new(0));
        let counter = n.clone();
        let env = Env::with(
            Down::H1,
            Up::H1,
            script(move |_| {
                if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    Behavior::Stall {
                        delay: Duration::from_millis(300),
                        reply: Reply::new(503, "busy"),
                    }
                } else {
                    Behavior::ok("ok")
                }
            }),
            |c| {
                let r = &mut c.listeners[0].routes[0];
                r.timeouts.total = Some(Duration::from_secs(2));
                r.retry_statuses = vec![503];
            },
        )
        .await;
        let mut client = env.http().await;
        let (parts, _) = client.get("/again").await.unwrap();
        assert_eq!(parts.status, 200);
        let b = budgets(&env, "/again");
        assert_eq!(b.len(), 2, "{b:?}");
        assert!(b[0] <= 2000 && b[0] >= 1800, "first attempt saw {}", b[0]);
        assert!(b[1] <= 1700 && b[1] >= 1000, "retry saw {}", b[1]);
        env.stop().await;
    })
    .await;
}

/// A client's own budget header is not trusted from an untrusted peer: the upstream sees the
/// route's budget, never the client's larger (or smaller) number.
#[tokio::test]
async fn untrusted_budget_header_is_replaced() {
    bounded(Duration::from_secs(10), async {
        let env = Env::with(
            Down::H1,
            Up::H1,
            routes(vec![("/b", Behavior::ok("ok"))]),
            |c| c.listeners[0].routes[0].timeouts.total = Some(Duration::from_secs(2)),
        )
        .await;
        let mut c = env.h1().await;
        c.send_request("GET", "/b", &[(BUDGET, "99999")], None, b"")
            .await
            .unwrap();
        let head = c.read_final_head().await.unwrap();
        assert_eq!(head.status, 200);
        let b = budgets(&env, "/b");
        assert!(b[0] <= 2000 && b[0] >= 1800, "{b:?}");
        env.stop().await;
    })
    .await;
}

/// From a trusted peer the budget header shortens the deadline: the default name on a route that
/// keeps it, the configured name on a route that renames it (where the default name is just
/// another header, passed on as sent). A gRPC client's `grpc-timeout` counts from anyone.
#[tokio::test]
async fn trusted_budget_and_grpc_timeout_shorten_the_deadline() {
    bounded(Duration::from_secs(10), async {
        let env = Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("ok")), |c| {
            let l = &mut c.listeners[0];
            l.trusted_peers = vec!["127.0.0.0/8".parse().unwrap()];
            let mut renamed = l.routes[0].clone();
            renamed.path_prefix = "/renamed".into();
            renamed.budget_header = Some("x-budget".into());
            l.routes.insert(0, renamed);
            for r in &mut l.routes {
                r.timeouts.total = Some(Duration::from_secs(5));
            }
        })
        .await;
        let mut c = env.h1().await;
        c.send_request("GET", "/default", &[(BUDGET, "700")], None, b"")
            .await
            .unwrap();
        assert_eq!(c.read_final_head().await.unwrap().status, 200);
        let b = budgets(&env, "/default");
        assert!((500..=700).contains(&b[0]), "{b:?}");

        c.send_request(
            "GET",
            "/renamed",
            &[("x-budget", "800"), (BUDGET, "300")],
            None,
            b"",
        )
        .await
        .unwrap();
        assert_eq!(c.read_final_head().await.unwrap().status, 200);
        let sent = env.log().requests("/renamed");
        let header = |name: &str| {
            sent[0]
                .1
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.parse::<u64>().unwrap())
        };
        let renamed = header("x-budget").unwrap();
        assert!((600..=800).contains(&renamed), "{sent:?}");
        assert_eq!(header(BUDGET), Some(300), "{sent:?}");

        c.send_request(
            "POST",
            "/grpc",
            &[
                ("content-type", "application/grpc"),
                ("grpc-timeout", "400m"),
            ],
            None,
            b"",
        )
        .await
        .unwrap();
        assert_eq!(c.read_final_head().await.unwrap().status, 200);
        let b = budgets(&env, "/grpc");
        assert!((200..=400).contains(&b[0]), "{b:?}");
        env.stop().await;
    })
    .await;
}

/// A 300 ms deadline over a 2 s streaming response: the downstream response ends abnormally at
/// about 300 ms, the upstream is aborted on the wire (HTTP/1 EOF, HTTP/2 RST_STREAM(CANCEL)),
/// and the record says timeout / deadline.
#[tokio::test]
async fn deadline_cuts_a_streaming_response() {
    bounded(Duration::from_secs(20), async {
        for up in [Up::H1, Up::H2c] {
            for down in [Down::H1, Down::H2c] {
                let case = format!("{down:?} <- {up:?}");
                let env = Env::with(
                    down,
                    up,
                    routes(vec![(
                        "/stream",
                        Behavior::stream(Bytes::from_static(b"tick\n"), 20, 100),
                    )]),
                    |c| c.listeners[0].routes[0].timeouts.total = Some(Duration::from_millis(300)),
                )
                .await;
                let t0 = Instant::now();
                let got = match down {
                    Down::H1 => {
                        let mut c = env.h1().await;
                        c.send_request("GET", "/stream", &[], None, b"")
                            .await
                            .unwrap();
                        let head = c.read_final_head().await.unwrap();
                        assert_eq!(head.status, 200, "{case}");
                        c.read_body("GET", &head).await.map(|_| ())
                    }
                    _ => {
                        let mut c = env.h2().await;
                        let mut s = c.start("GET", "/stream", &[], true).await.unwrap();
                        let parts = s.response().await.unwrap();
                        assert_eq!(parts.status, 200, "{case}");
                        s.read_to_end().await.map(|_| ()).map_err(Into::into)
                    }
                };
                let took = t0.elapsed();
                assert!(got.is_err(), "{case}: the body ended cleanly");
                assert!(
                    took >= Duration::from_millis(280) && took < Duration::from_millis(1000),
                    "{case}: ended after {took:?}"
                );
                let aborted = env
                    .log()
                    .wait_for(BOUND, |e| {
                        e.path == "/stream"
                            && match up {
                                Up::H1 => e.kind.is_h1_close(),
                                _ => {
                                    e.kind
                                        == EventKind::StreamReset {
                                            reason: Reason::CANCEL,
                                        }
                                }
                            }
                    })
                    .await;
                assert!(
                    aborted.is_some(),
                    "{case}: upstream not aborted: {:?}",
                    env.log().events()
                );
                let at = aborted.unwrap().at;
                assert!(
                    at - t0 < Duration::from_millis(1000),
                    "{case}: upstream aborted after {:?}",
                    at - t0
                );
                assert!(!env.log().any(|e| e.kind == EventKind::HandlerCompleted));
                let rec = env.record("/stream").await;
                assert_eq!(rec.outcome, Outcome::Timeout, "{case}: {rec:?}");
                assert_eq!(rec.abort_reason, Some(CancelReason::Deadline), "{case}");
                assert_eq!(rec.stage, Some("body"), "{case}");
                env.stop().await;
            }
        }
    })
    .await;
}
