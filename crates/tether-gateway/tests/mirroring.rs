//! Request mirroring: a copy of each request goes to a second upstream (HTTP/1.1 or h2c) that
//! records what it saw; the client only ever gets the route's own upstream's answer, a slow
//! mirror never delays it, the copy is cancelled with the request when the client leaves, and
//! copies that cannot be made (a streamed body, the mirror's `max_in_flight` reached) are
//! counted as skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use test_support::behavior::{Behavior, Reply, Script, routes, script};
use test_support::client::full;
use tether_gateway::config::{AdminConfig, Mirror};

/// A gateway whose route mirrors every request to `shadow`, at most `max_in_flight` at once,
/// reading bodies ahead (so that they can be copied) when `buffer`.
async fn gateway(main: Script, shadow: &Upstream, max_in_flight: u32, buffer: bool) -> Env {
    let shadow = shadow.config("shadow");
    Env::with(Down::H1, Up::H1, main, move |c| {
        c.upstreams.push(shadow);
        let route = &mut c.listeners[0].routes[0];
        route.mirror = Some(Mirror {
            upstream: "shadow".into(),
            per_million: 1_000_000,
            max_in_flight,
        });
        if buffer {
            route.request_buffer_bytes = 64 * 1024;
        }
        c.admin = Some(AdminConfig {
            address: "127.0.0.1:0".parse().unwrap(),
        });
    })
    .await
}

/// Waits until the route's mirror counted `n` copies with `outcome`.
async fn wait_mirrored(env: &Env, outcome: &str, n: f64) {
    let series = format!("tether_mirror_requests_total{{route=\"up\",outcome=\"{outcome}\"}}");
    bounded(Duration::from_secs(10), async {
        while metric(&env.metrics_text().unwrap(), &series) != Some(n) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A GET and a POST with a small body: each reaches the mirror too, in its protocol's form,
/// with its host, query and body; the client gets the route's upstream's answers only, never
/// the mirror's (a 500 here).
#[tokio::test]
async fn every_request_is_copied_to_the_mirror_and_only_the_routes_upstream_answers() {
    bounded(Duration::from_secs(30), async {
        for h2 in [false, true] {
            let shadow =
                Upstream::start(h2, script(|_| Behavior::Respond(Reply::new(500, "shadow")))).await;
            let env = gateway(script(|_| Behavior::Summary), &shadow, 100, true).await;
            let mut c = env.http().await;
            let (p, body) = c.get("/m?x=1").await.unwrap();
            assert_eq!(
                (p.status.as_u16(), &body[..]),
                (200, &b"0 0"[..]),
                "h2 {h2}"
            );
            let req = c
                .request(http::Method::POST, "/m")
                .body(full("order=7"))
                .unwrap();
            let (p, _, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 200, "h2 {h2}");
            // Counted by the mirror's status class.
            wait_mirrored(&env, "5xx", 2.0).await;

            let seen = shadow.log().requests("/m");
            let methods: Vec<&str> = seen.iter().map(|(m, _)| m.as_str()).collect();
            assert_eq!(methods, ["GET", "POST"], "h2 {h2}");
            let host = if h2 { ":authority" } else { "host" };
            let hosts: Vec<&str> = seen.iter().flat_map(|(_, h)| values(h, host)).collect();
            // The host the route's own upstream was sent.
            let main = env.log().requests("/m");
            let sent = values(&main[0].1, "host")[0];
            assert_eq!(hosts, [sent, sent], "h2 {h2}: {seen:?}");
            let bodies = shadow.log().body_lengths();
            assert!(bodies.contains(&7), "h2 {h2}: {bodies:?}");
            env.stop().await;
        }
    })
    .await;
}

/// A mirror that never answers: the client's answer comes at once all the same. While that
/// copy is in flight, a second request finds the mirror's `max_in_flight` (1) reached and is
/// not copied; a POST whose body streams (no read-ahead) cannot be copied either.
#[tokio::test]
async fn a_slow_mirror_never_delays_the_answer_and_copies_beyond_its_limit_are_skipped() {
    bounded(Duration::from_secs(30), async {
        let shadow = Upstream::start(false, routes(vec![("/m", Behavior::Never)])).await;
        let env = gateway(script(|_| Behavior::ok("main")), &shadow, 1, false).await;
        let mut c = env.http().await;
        for _ in 0..2 {
            let (p, body) = c.get("/m").await.unwrap();
            assert_eq!((p.status.as_u16(), &body[..]), (200, &b"main"[..]));
        }
        let req = c
            .request(http::Method::POST, "/m")
            .body(full("streamed"))
            .unwrap();
        let (p, _, _) = c.fetch(req).await.unwrap();
        assert_eq!(p.status, 200);
        wait_mirrored(&env, "skipped", 2.0).await;
        assert_eq!(shadow.log().requests("/m").len(), 1);
        env.stop().await;
    })
    .await;
}

/// The client leaves while its request is in flight: the copy is cancelled with it, and the
/// mirror sees its connection close.
#[tokio::test]
async fn the_copy_is_cancelled_when_the_client_leaves() {
    bounded(Duration::from_secs(30), async {
        let shadow = Upstream::start(false, routes(vec![("/m", Behavior::Never)])).await;
        let env = gateway(routes(vec![("/m", Behavior::Never)]), &shadow, 100, false).await;
        let mut c = env.h1().await;
        c.send_request("GET", "/m", &[], None, b"").await.unwrap();
        bounded(Duration::from_secs(10), async {
            while shadow.log().requests("/m").is_empty() || env.log().requests("/m").is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        c.rst().unwrap();
        wait_mirrored(&env, "cancelled", 1.0).await;
        wait_cancelled_at(shadow.log()).await;
        env.stop().await;
    })
    .await;
}
