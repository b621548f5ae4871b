//! Active health checks: an endpoint whose checks fail is taken out of rotation on every worker
//! before a request finds it broken, and put back once its checks pass again. Two endpoints of
//! one upstream, each a server that answers its own name and a health path whose status the test
//! sets; passive health and retries are off, so only the checks decide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use test_support::behavior::{Behavior, script};
use tether_gateway::config::{AdminConfig, HealthCheck, UpstreamAddress};
use tokio::net::TcpListener;

/// A gateway in front of `addresses`, checking them every 50 ms (2 failures out, 2 passes back).
async fn gateway(up: Up, addresses: Vec<UpstreamAddress>) -> Env {
    Env::with(Down::H1, up, script(|_| Behavior::ok("unused")), move |c| {
        let u = &mut c.upstreams[0];
        u.addresses = addresses;
        u.max_fails = 0;
        let mut check = HealthCheck::new("/healthz");
        check.interval = Duration::from_millis(50);
        check.timeout = Duration::from_millis(500);
        u.health_check = Some(check);
        c.listeners[0].routes[0].max_retries = 0;
        c.admin = Some(AdminConfig {
            address: "127.0.0.1:0".parse().unwrap(),
        });
    })
    .await
}

/// Sends `n` requests one after another: the bodies of those answered 200, and how many were
/// answered 502.
async fn answers(env: &Env, n: usize) -> (Vec<String>, usize) {
    let mut client = env.http().await;
    let (mut bodies, mut failed) = (Vec::new(), 0);
    for i in 0..n {
        let (parts, body) = client.get(&format!("/r{i}")).await.unwrap();
        match parts.status.as_u16() {
            200 => bodies.push(String::from_utf8(body.to_vec()).unwrap()),
            502 => failed += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    (bodies, failed)
}

#[tokio::test]
async fn an_endpoint_failing_its_checks_leaves_rotation_and_comes_back_when_they_pass() {
    bounded(Duration::from_secs(40), async {
        for up in [Up::H1, Up::H2c] {
            let (a, b) = (Backend::start("a").await, Backend::start("b").await);
            let env = gateway(up, vec![a.addr.into(), b.addr.into()]).await;
            wait_health(&env, b.addr, true).await;
            let (bodies, _) = answers(&env, 10).await;
            assert!(bodies.iter().any(|b| b == "b"), "{up:?}: {bodies:?}");

            b.health.store(503, Ordering::Relaxed);
            wait_health(&env, b.addr, false).await;
            let (bodies, failed) = answers(&env, 20).await;
            assert_eq!(failed, 0, "{up:?}");
            assert!(bodies.iter().all(|b| b == "a"), "{up:?}: {bodies:?}");

            b.health.store(204, Ordering::Relaxed);
            wait_health(&env, b.addr, true).await;
            let (bodies, _) = answers(&env, 10).await;
            assert!(bodies.iter().any(|b| b == "b"), "{up:?}: {bodies:?}");

            // The checks name the endpoint they go to and themselves.
            let seen = b.checks.lock().unwrap().clone();
            assert!(seen.len() >= 4, "{up:?}: {seen:?}");
            let want = (b.addr.to_string(), "tether-health-check".to_owned());
            assert!(seen.iter().all(|s| *s == want), "{up:?}: {seen:?}");
            let metrics = env.metrics_text().unwrap();
            for result in ["pass", "fail"] {
                let line = format!(
                    "tether_upstream_health_checks_total{{upstream=\"up\",result=\"{result}\"}}"
                );
                assert!(metrics.contains(&line), "{up:?}: {result}: {metrics}");
            }
            env.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_endpoint_refusing_connections_is_out_of_rotation_before_a_request_finds_it() {
    bounded(Duration::from_secs(20), async {
        let a = Backend::start("a").await;
        let dead = refused_addr();
        let env = gateway(Up::H1, vec![a.addr.into(), dead.into()]).await;
        wait_health(&env, dead, false).await;
        let (bodies, failed) = answers(&env, 20).await;
        assert_eq!(failed, 0, "a request went to the dead endpoint");
        assert_eq!(bodies.len(), 20);
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_endpoint_that_answers_too_slowly_fails_its_checks() {
    bounded(Duration::from_secs(20), async {
        // Accepts connections and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                conns.push(s);
            }
        });
        let a = Backend::start("a").await;
        let env = gateway(Up::H1, vec![a.addr.into(), silent_addr.into()]).await;
        wait_health(&env, silent_addr, false).await;
        assert_eq!(answers(&env, 10).await.1, 0);
        env.stop().await;
        held.abort();
    })
    .await;
}

#[tokio::test]
async fn with_every_endpoint_out_of_rotation_requests_still_try_one() {
    bounded(Duration::from_secs(20), async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        a.health.store(500, Ordering::Relaxed);
        b.health.store(500, Ordering::Relaxed);
        let env = gateway(Up::H1, vec![a.addr.into(), b.addr.into()]).await;
        wait_health(&env, a.addr, false).await;
        wait_health(&env, b.addr, false).await;
        // The checks may be wrong (a health path that broke alone): traffic is not refused.
        let (bodies, failed) = answers(&env, 4).await;
        assert_eq!((bodies.len(), failed), (4, 0));
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_reload_that_keeps_the_upstream_keeps_an_endpoint_out_of_rotation() {
    bounded(Duration::from_secs(20), async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        b.health.store(503, Ordering::Relaxed);
        let mut env = gateway(Up::H1, vec![a.addr.into(), b.addr.into()]).await;
        wait_health(&env, b.addr, false).await;
        // Checked rarely from now on: right after the reload only the state it kept decides.
        env.reload(|c| {
            c.listeners[0].routes[0].name = "renamed".into();
            c.upstreams[0].health_check.as_mut().unwrap().interval = Duration::from_secs(30);
        });
        let (bodies, _) = answers(&env, 10).await;
        assert!(bodies.iter().all(|b| b == "a"), "{bodies:?}");
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_endpoint_a_reload_removes_leaves_no_health_series() {
    bounded(Duration::from_secs(20), async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let mut env = gateway(Up::H1, vec![a.addr.into(), b.addr.into()]).await;
        wait_health(&env, b.addr, true).await;
        let only_a: UpstreamAddress = a.addr.into();
        env.reload(move |c| c.upstreams[0].addresses = vec![only_a]);
        let gone = format!("endpoint=\"{}\"", b.addr);
        bounded(Duration::from_secs(10), async {
            while env.metrics_text().unwrap().contains(&gone) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        wait_health(&env, a.addr, true).await;
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn checks_can_expect_a_status_and_a_body_and_send_headers_of_their_own() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let mut env = gateway(Up::H1, vec![a.addr.into(), b.addr.into()]).await;
        wait_health(&env, b.addr, true).await;

        // Only 204 passes now: b's 200 takes it out, and its 204 brings it back.
        env.reload(|c| {
            let check = c.upstreams[0].health_check.as_mut().unwrap();
            check.expect_status = vec![204..=204];
            check.headers = vec![
                ("host".into(), "health.internal".into()),
                ("user-agent".into(), "probe/1".into()),
            ];
        });
        wait_health(&env, b.addr, false).await;
        b.health.store(204, Ordering::Relaxed);
        wait_health(&env, b.addr, true).await;
        let last = b.checks.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last, ("health.internal".into(), "probe/1".into()));

        // The body ("health"; a 204 has none) must contain the text.
        b.health.store(200, Ordering::Relaxed);
        env.reload(|c| {
            let check = c.upstreams[0].health_check.as_mut().unwrap();
            check.expect_status.clear();
            check.expect_body = Some("ready".into());
        });
        wait_health(&env, b.addr, false).await;
        env.reload(|c| {
            let check = c.upstreams[0].health_check.as_mut().unwrap();
            check.expect_body = Some("alt".into());
        });
        wait_health(&env, b.addr, true).await;
        env.stop().await;
    })
    .await;
}
