//! DNS discovery on real sockets: a name answered by a stub DNS server with loopback addresses
//! (127.0.0.1, .2, .3, one backend on each, all on one port), whose answers the test changes.
//! Each address must become an endpoint of its own, endpoints must follow the answers, a failed
//! lookup must keep them, and endpoints that stay must keep their pooled connections; a reload
//! that leaves an upstream's connections alike must keep them too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use test_support::behavior::{Behavior, script};
use test_support::client::HttpClient;
use test_support::{DnsStub, EventKind, EventLog, UpstreamH1};
use tether_gateway::config::{AdminConfig, Discovery, UpstreamAddress};

const INTERVAL: Duration = Duration::from_millis(200);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

fn accepted(log: &EventLog) -> usize {
    log.events()
        .iter()
        .filter(|e| e.kind == EventKind::Accepted)
        .count()
}

/// Sends one request with a path of its own; returns the backend address that served it.
async fn served_by(env: &Env, client: &mut HttpClient, n: &AtomicUsize) -> IpAddr {
    let path = format!("/d{}", n.fetch_add(1, Ordering::Relaxed));
    let (parts, body) = client.get(&path).await.unwrap();
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));
    env.record(&path).await.upstream_addr.unwrap().ip()
}

/// Sends `count` requests one after the other; the backend address that served each.
async fn served_in_turn(
    env: &Env,
    client: &mut HttpClient,
    n: &AtomicUsize,
    count: usize,
) -> Vec<IpAddr> {
    let mut turns = Vec::with_capacity(count);
    for _ in 0..count {
        turns.push(served_by(env, client, n).await);
    }
    turns
}

/// Sends requests until `done` holds for the last `window` backends seen; bounded by the test.
async fn until(
    env: &Env,
    client: &mut HttpClient,
    n: &AtomicUsize,
    window: usize,
    done: impl Fn(&[IpAddr]) -> bool,
) -> Vec<IpAddr> {
    let mut seen = Vec::new();
    loop {
        seen.push(served_by(env, client, n).await);
        if seen.len() >= window && done(&seen[seen.len() - window..]) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The gateway's gauge of the upstream's endpoints, and its count of failed lookups.
fn endpoints(env: &Env) -> (Option<f64>, f64) {
    let text = env.metrics_text().unwrap_or_default();
    (
        metric(&text, "tether_upstream_endpoints{upstream=\"up\"} "),
        metric(
            &text,
            "tether_discovery_lookup_failures_total{name=\"svc.test\"} ",
        )
        .unwrap_or(0.0),
    )
}

async fn wait_endpoints(env: &Env, n: f64) {
    while endpoints(env).0 != Some(n) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_address_of_a_name_is_an_endpoint_and_endpoints_follow_the_answers() {
    bounded(Duration::from_secs(20), async {
        let stub = DnsStub::start(&[("svc.test", vec![ip(1), ip(2)])])
            .await
            .unwrap();
        let ok = script(|_| Behavior::ok("ok"));
        let mut port = 0;
        let env = Env::with(Down::H1, Up::H1, ok.clone(), |c| {
            port = c.upstreams[0].addresses[0].port;
            c.dns.nameservers = vec![stub.addr()];
            c.upstreams[0].addresses = vec![UpstreamAddress::new("svc.test", port)];
            c.upstreams[0].discovery = Some(Discovery {
                interval: INTERVAL,
                srv: false,
            });
            c.admin = Some(AdminConfig {
                address: "127.0.0.1:0".parse().unwrap(),
            });
        })
        .await;
        // The same port on the other loopback addresses (taken on 127.0.0.1, so free on any).
        let two = UpstreamH1::start_on(SocketAddr::new(ip(2), port), ok.clone())
            .await
            .unwrap();
        let three = UpstreamH1::start_on(SocketAddr::new(ip(3), port), ok)
            .await
            .unwrap();
        let n = AtomicUsize::new(0);
        let mut client = env.http().await;

        // Two addresses, two endpoints taking turns, each with its pooled connection (a name
        // raced at connect would keep reusing one connection to one of them).
        wait_endpoints(&env, 2.0).await;
        let turns = served_in_turn(&env, &mut client, &n, 6).await;
        assert_eq!(
            turns.iter().filter(|a| **a == ip(1)).count(),
            3,
            "{turns:?}"
        );
        assert_eq!(
            turns.iter().filter(|a| **a == ip(2)).count(),
            3,
            "{turns:?}"
        );
        assert_eq!((accepted(env.log()), accepted(two.log())), (1, 1));

        // The first address leaves and a third comes: no request reaches the first again, and
        // the second keeps its connection through the change.
        stub.set("svc.test", Some(vec![ip(2), ip(3)]));
        until(&env, &mut client, &n, 1, |s| s[0] == ip(3)).await;
        let turns = served_in_turn(&env, &mut client, &n, 6).await;
        assert!(!turns.contains(&ip(1)), "{turns:?}");
        assert_eq!(
            turns.iter().filter(|a| **a == ip(3)).count(),
            3,
            "{turns:?}"
        );
        assert_eq!((accepted(two.log()), accepted(three.log())), (1, 1));

        // Down to one.
        stub.set("svc.test", Some(vec![ip(2)]));
        wait_endpoints(&env, 1.0).await;
        for _ in 0..4 {
            assert_eq!(served_by(&env, &mut client, &n).await, ip(2));
        }

        // The name disappears: lookups fail (and are counted), the endpoint found before keeps
        // serving, on its connection.
        assert_eq!(endpoints(&env).1, 0.0);
        stub.set("svc.test", None);
        while endpoints(&env).1 < 3.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(endpoints(&env).0, Some(1.0));
        for _ in 0..4 {
            assert_eq!(served_by(&env, &mut client, &n).await, ip(2));
        }
        assert_eq!(accepted(two.log()), 1);
        assert_eq!(accepted(env.log()), 1);
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_reload_keeps_the_connections_of_an_upstream_that_connects_alike() {
    bounded(Duration::from_secs(15), async {
        let ok = script(|_| Behavior::ok("ok"));
        let mut env = Env::with(Down::H1, Up::H1, ok, |_| {}).await;
        let n = AtomicUsize::new(0);
        let mut client = env.http().await;
        served_by(&env, &mut client, &n).await;
        assert_eq!(accepted(env.log()), 1);

        // A route setting changes: the pooled connection serves the next request.
        env.reload(|c| c.listeners[0].routes[0].max_retries = 1);
        served_by(&env, &mut client, &n).await;
        let rec = env.record("/d1").await;
        assert_eq!(rec.upstream_reused, Some(true), "{rec:?}");
        assert_eq!(accepted(env.log()), 1);

        // The upstream's pool settings change: its connections are not carried over.
        env.reload(|c| c.upstreams[0].idle_timeout = Duration::from_secs(3));
        served_by(&env, &mut client, &n).await;
        let rec = env.record("/d2").await;
        assert_eq!(rec.upstream_reused, Some(false), "{rec:?}");
        assert_eq!(accepted(env.log()), 2);
        env.stop().await;
    })
    .await;
}

/// An SRV name: its records' targets (each resolved to a loopback address) become the
/// endpoints, at the records' port; the heavier record takes more requests; the later
/// priority's target takes none while the first priority's serve, and takes them when those
/// cannot (here: the first priority's one target refuses connections).
#[tokio::test]
async fn an_srv_name_gives_the_endpoints_their_ports_weights_and_priorities() {
    bounded(Duration::from_secs(20), async {
        let stub = DnsStub::start(&[
            ("a.test", vec![ip(2)]),
            ("b.test", vec![ip(3)]),
            ("c.test", vec![ip(1)]),
            ("gone.test", vec![ip(4)]),
        ])
        .await
        .unwrap();
        let ok = script(|_| Behavior::ok("ok"));
        let mut port = 0;
        let env = Env::with(Down::H1, Up::H1, ok.clone(), |c| {
            port = c.upstreams[0].addresses[0].port;
            c.dns.nameservers = vec![stub.addr()];
            c.upstreams[0].addresses = vec![UpstreamAddress::new("_http._tcp.svc.test", 0)];
            c.upstreams[0].discovery = Some(Discovery {
                interval: INTERVAL,
                srv: true,
            });
            c.admin = Some(AdminConfig {
                address: "127.0.0.1:0".parse().unwrap(),
            });
        })
        .await;
        stub.set_services(
            "_http._tcp.svc.test",
            Some(vec![
                (10, 25, port, "a.test".into()),
                (10, 100, port, "b.test".into()),
                (20, 1, port, "c.test".into()),
            ]),
        );
        let _two = UpstreamH1::start_on(SocketAddr::new(ip(2), port), ok.clone())
            .await
            .unwrap();
        let _three = UpstreamH1::start_on(SocketAddr::new(ip(3), port), ok)
            .await
            .unwrap();
        let n = AtomicUsize::new(0);
        let mut client = env.http().await;
        wait_endpoints(&env, 3.0).await;
        let turns = served_in_turn(&env, &mut client, &n, 20).await;
        let count = |a: IpAddr| turns.iter().filter(|t| **t == a).count();
        assert_eq!(count(ip(1)), 0, "the backup served: {turns:?}");
        assert!(count(ip(2)) >= 2 && count(ip(2)) <= 6, "{turns:?}");
        assert_eq!(count(ip(2)) + count(ip(3)), 20, "{turns:?}");

        // The first priority down to one target where nothing listens: the backup serves.
        stub.set_services(
            "_http._tcp.svc.test",
            Some(vec![
                (10, 1, port, "gone.test".into()),
                (20, 1, port, "c.test".into()),
            ]),
        );
        wait_endpoints(&env, 2.0).await;
        for _ in 0..4 {
            assert_eq!(served_by(&env, &mut client, &n).await, ip(1));
        }
        env.stop().await;
    })
    .await;
}
