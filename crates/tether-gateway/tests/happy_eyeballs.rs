//! Happy Eyeballs on real sockets: a name (answered by a stub DNS server) resolving to a dead
//! first candidate (a loopback address whose SYNs are dropped) and a live second one. tether must
//! start the second attempt after the stagger (250 ms), connect through it, and close the loser
//! (no connect attempt towards the dead address may linger).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use test_support::EventKind;
use test_support::behavior::{Behavior, routes};
use test_support::blackhole::syn_sent_to;
use tether_gateway::observe::access::Outcome;
use tokio::time::Instant;

#[tokio::test]
async fn dead_first_candidate_loses_to_the_live_second_after_the_stagger() {
    bounded(Duration::from_secs(15), async {
        let DeadFirst { env, stub, hole } = DeadFirst::start(
            "app.test",
            routes(vec![("/he", Behavior::ok("through the second"))]),
            |_| {},
        )
        .await;
        let live = env.up.addr();

        let mut client = env.http().await;
        let t0 = Instant::now();
        let (parts, body) = client.get("/he").await.unwrap();
        let took = t0.elapsed();
        assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(&body[..], b"through the second");

        let rec = env.record("/he").await;
        assert_eq!(rec.outcome, Outcome::Ok);
        assert_eq!(rec.upstream_addr, Some(live), "{rec:?}");
        let connect = rec.upstream_connect.unwrap();
        // The second attempt starts after the stagger, not before and not much later.
        assert!(
            connect >= Duration::from_millis(240) && connect < Duration::from_millis(900),
            "connect took {connect:?} (request {took:?})"
        );
        assert!(took >= Duration::from_millis(240), "{took:?}");
        assert_eq!(
            env.log()
                .events()
                .iter()
                .filter(|e| e.kind == EventKind::Accepted)
                .count(),
            1
        );
        // The losing attempt towards the dead address is closed, not left retransmitting SYNs.
        let gone = async {
            while syn_sent_to(hole.addr()).unwrap() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(1), gone)
                .await
                .is_ok(),
            "a connect attempt to {} is still in SYN-SENT",
            hole.addr()
        );
        let a_queries = stub
            .queries()
            .iter()
            .filter(|q| q.name == "app.test")
            .count();
        assert!(a_queries >= 1);
        env.stop().await;
    })
    .await;
}

/// While the race is on, the dead candidate really was tried: a SYN-SENT socket towards it
/// exists during the stagger (so the test above proves closing, not absence).
#[tokio::test]
async fn the_dead_candidate_is_attempted_during_the_stagger() {
    bounded(Duration::from_secs(15), async {
        let DeadFirst {
            env,
            hole,
            stub: _stub,
        } = DeadFirst::start(
            "app.test",
            routes(vec![("/he", Behavior::ok("ok"))]),
            |_| {},
        )
        .await;
        let mut client = env.http().await;
        let req = tokio::spawn(async move { client.get("/he").await.map(|(p, _)| p.status) });
        // The attempt towards the dead candidate stays in SYN-SENT from its start until the race
        // is won (about the stagger later), so it is visible at some point before the request
        // completes, however late a loaded machine gets round to starting it.
        let mut seen = false;
        let t0 = Instant::now();
        while !seen && !req.is_finished() && t0.elapsed() < Duration::from_secs(5) {
            seen = syn_sent_to(hole.addr()).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(seen, "no connect attempt towards {} seen", hole.addr());
        assert_eq!(req.await.unwrap().unwrap(), 200);
        env.stop().await;
    })
    .await;
}
