//! Passive endpoint health: an endpoint that cannot be connected to is skipped for
//! `fail_timeout` after `max_fails` failed attempts in a row, then tried again. One live and
//! one refusing endpoint behind one upstream; no retries, so every attempt shows to the client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use test_support::behavior::{Behavior, script};
use tether_gateway::config::{AdminConfig, UpstreamAddress};

/// An address nothing listens on (connections to it are refused).
fn refused() -> UpstreamAddress {
    refused_addr().into()
}

async fn env(max_fails: u32, fail_timeout: Duration) -> Env {
    let dead = refused();
    Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("hi")), move |c| {
        c.upstreams[0].addresses.push(dead);
        c.upstreams[0].max_fails = max_fails;
        c.upstreams[0].fail_timeout = fail_timeout;
        c.listeners[0].routes[0].max_retries = 0;
        c.admin = Some(AdminConfig {
            address: "127.0.0.1:0".parse().unwrap(),
        });
    })
    .await
}

/// Sends `n` requests one after another; returns how many were answered 502.
async fn failures(env: &Env, n: usize) -> usize {
    let mut client = env.http().await;
    let mut failed = 0;
    for i in 0..n {
        let (parts, _) = client.get(&format!("/r{i}")).await.unwrap();
        match parts.status.as_u16() {
            200 => {}
            502 => failed += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    failed
}

#[tokio::test]
async fn an_unreachable_endpoint_is_skipped_after_a_failure() {
    bounded(Duration::from_secs(20), async {
        let env = env(1, Duration::from_secs(30)).await;
        assert_eq!(
            failures(&env, 20).await,
            1,
            "only the first attempt reaches it"
        );
        let metrics = env.metrics_text().unwrap();
        let skips: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("tether_upstream_endpoint_skips_total{"))
            .collect();
        assert_eq!(skips.len(), 1, "{metrics}");
        assert!(
            skips[0].contains("upstream=\"up\"") && skips[0].ends_with(" 1"),
            "{skips:?}"
        );
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn without_passive_health_the_round_robin_keeps_choosing_it() {
    bounded(Duration::from_secs(20), async {
        let env = env(0, Duration::from_secs(30)).await;
        let failed = failures(&env, 20).await;
        assert!(failed >= 8, "{failed} of 20 failed");
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_skipped_endpoint_is_tried_again_after_fail_timeout() {
    bounded(Duration::from_secs(20), async {
        let fail_timeout = Duration::from_millis(300);
        let env = env(1, fail_timeout).await;
        assert_eq!(failures(&env, 6).await, 1);
        tokio::time::sleep(fail_timeout + Duration::from_millis(100)).await;
        // Tried once more (it still refuses), then skipped again.
        assert_eq!(failures(&env, 6).await, 1);
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn max_fails_counts_failures_in_a_row() {
    bounded(Duration::from_secs(20), async {
        let env = env(3, Duration::from_secs(30)).await;
        // Every other pick is the refusing endpoint: three failures, then it is skipped.
        assert_eq!(failures(&env, 20).await, 3);
        env.stop().await;
    })
    .await;
}

/// Two endpoints: the env's own upstream answering every request 503, and `a` answering 200
/// `a`. `fail_statuses` and `max_fails` as given; `n` requests one after another: how many
/// were answered 503.
async fn answered_503(fail_statuses: Vec<u16>, max_fails: u32, n: usize) -> (usize, Env) {
    let a = Backend::start("a").await;
    let failing = script(|_| Behavior::Respond(test_support::Reply::new(503, "busy")));
    let addr = a.addr;
    let env = Env::with(Down::H1, Up::H1, failing, move |c| {
        let u = &mut c.upstreams[0];
        u.addresses.push(addr.into());
        u.max_fails = max_fails;
        u.fail_timeout = Duration::from_secs(30);
        u.fail_statuses = fail_statuses;
        c.listeners[0].routes[0].max_retries = 0;
        c.admin = Some(AdminConfig {
            address: "127.0.0.1:0".parse().unwrap(),
        });
    })
    .await;
    let mut client = env.http().await;
    let mut busy = 0;
    for i in 0..n {
        let (parts, body) = client.get(&format!("/r{i}")).await.unwrap();
        match parts.status.as_u16() {
            200 => assert_eq!(&body[..], b"a"),
            503 => busy += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    drop(a);
    (busy, env)
}

#[tokio::test]
async fn an_endpoint_answering_fail_statuses_is_skipped_after_max_fails_in_a_row() {
    bounded(Duration::from_secs(20), async {
        // Its answers alternate with the other endpoint's, and still count in a row.
        let (busy, env) = answered_503(vec![502, 503, 504], 2, 20).await;
        assert_eq!(busy, 2);
        let metrics = env.metrics_text().unwrap();
        assert!(
            metrics.lines().any(
                |l| l.starts_with("tether_upstream_endpoint_skips_total{") && l.ends_with(" 1")
            ),
            "{metrics}"
        );
        env.stop().await;
        // Without fail_statuses, a 503 is an answer like any other.
        let (busy, env) = answered_503(Vec::new(), 2, 20).await;
        assert_eq!(busy, 10);
        env.stop().await;
    })
    .await;
}

/// A reload keeps what the workers learned about an endpoint: one skipped for `fail_timeout`
/// stays skipped, where starting afresh would send it requests again.
#[tokio::test]
async fn a_reload_keeps_a_skipped_endpoint_skipped() {
    bounded(Duration::from_secs(20), async {
        let mut env = env(1, Duration::from_secs(30)).await;
        assert_eq!(failures(&env, 4).await, 1);
        env.reload(|c| c.listeners[0].routes[0].timeouts.total = Some(Duration::from_secs(9)));
        assert_eq!(
            failures(&env, 10).await,
            0,
            "the skipped endpoint was tried again"
        );
        // Its pool settings changed: still the same endpoint, still skipped.
        env.reload(|c| c.upstreams[0].idle_timeout = Duration::from_secs(3));
        assert_eq!(failures(&env, 10).await, 0);
        env.stop().await;
    })
    .await;
}
