//! Happy Eyeballs on real sockets: a name (answered by a stub DNS server) resolving to a dead
//! first candidate (a loopback address whose SYNs are dropped) and a live second one. tether must
//! start the second attempt after the stagger (250 ms), connect through it, and close the loser
//! (no connect attempt towards the dead address may linger).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use test_support::behavior::{Behavior, routes};
use test_support::blackhole::syn_sent_to;
use test_support::{DnsStub, EventKind, EventLog, UpstreamH1};
use tether_gateway::config::UpstreamAddress;
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

/// A name resolving to two live addresses: each new upstream connection starts with the next
/// one, so both share the name's connections (as nginx's servers from one name do).
#[tokio::test]
async fn a_names_addresses_take_turns_at_new_connections() {
    bounded(Duration::from_secs(15), async {
        let script = routes(vec![("/turn", Behavior::ok("ok"))]);
        let stub = DnsStub::start(&[(
            "pair.test",
            vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
        )])
        .await
        .unwrap();
        let mut port = 0;
        let env = Env::with(Down::H1, Up::H1, script.clone(), |c| {
            port = c.upstreams[0].addresses[0].port;
            c.dns.nameservers = vec![stub.addr()];
            c.upstreams[0].addresses = vec![UpstreamAddress::new("pair.test", port)];
            // Every request on a connection of its own.
            c.upstreams[0].max_idle_per_endpoint = 0;
        })
        .await;
        // The same port on the other loopback address (taken on 127.0.0.1, so free on any).
        let second = UpstreamH1::start_on(SocketAddr::from(([127, 0, 0, 2], port)), script)
            .await
            .unwrap();

        let mut client = env.http().await;
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (parts, _) = client.get("/turn").await.unwrap();
            assert_eq!(parts.status, 200);
        }
        for rec in env.access.records() {
            seen.push(rec.upstream_addr.unwrap().ip().to_string());
        }
        let accepted = |log: &EventLog| {
            log.events()
                .iter()
                .filter(|e| e.kind == EventKind::Accepted)
                .count()
        };
        assert_eq!(accepted(env.log()), 2, "{seen:?}");
        assert_eq!(accepted(second.log()), 2, "{seen:?}");
        assert_eq!(seen.len(), 4);
        env.stop().await;
    })
    .await;
}

/// An address that lost a race (here: never answered while the other one did) is tried after
/// the name's other addresses for a while: only the first new connection waits out the stagger,
/// although the turns come back round to the dead address.
#[tokio::test]
async fn an_address_that_lost_a_race_is_tried_last_for_a_while() {
    bounded(Duration::from_secs(15), async {
        let paths = ["/lost1", "/lost2", "/lost3"];
        let DeadFirst {
            env,
            stub: _stub,
            hole: _hole,
        } = DeadFirst::start(
            "lost.test",
            routes(paths.iter().map(|p| (*p, Behavior::ok("ok"))).collect()),
            |c| c.upstreams[0].max_idle_per_endpoint = 0,
        )
        .await;
        let mut client = env.http().await;
        for p in paths {
            let (parts, _) = client.get(p).await.unwrap();
            assert_eq!(parts.status, 200);
        }
        let first = env.record(paths[0]).await.upstream_connect.unwrap();
        assert!(first >= Duration::from_millis(240), "{first:?}");
        for p in &paths[1..] {
            let rec = env.record(p).await;
            assert_eq!(rec.upstream_reused, Some(false), "{rec:?}");
            let connect = rec.upstream_connect.unwrap();
            assert!(connect < Duration::from_millis(240), "{p}: {connect:?}");
        }
        env.stop().await;
    })
    .await;
}
