//! Forward authentication: a route's requests are first put to an auth service (HTTP/1.1 or
//! h2c) that sees their headers and where they were going; a 2xx lets a request go on with the
//! headers the service named (never the client's own of those names), any other answer goes to
//! the client as it came, and the route's upstream never sees a request turned away. A service
//! that fails or is too slow is answered 502 or 504 at stage `auth`; a client that leaves
//! during the check cancels it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use test_support::behavior::{Behavior, Reply, Script, routes, script};
use test_support::client::full;
use tether_gateway::config::{AdminConfig, ForwardAuth, UpstreamConfig, UpstreamProtocol};

/// Allows a request carrying `authorization: Bearer good` as user alice (her id in two headers,
/// one of them twice); sends a request without one to log in; answers any other 401.
fn verifier() -> Script {
    script(|req| match req.header("authorization") {
        Some("Bearer good") => Behavior::Respond(
            Reply::new(200, "")
                .header("x-auth-user", "alice")
                .header("x-auth-groups", "admin")
                .header("x-auth-groups", "ops")
                .header("x-not-copied", "1")
                .header("set-cookie", "session=refreshed"),
        ),
        None => Behavior::Respond(
            Reply::new(302, "")
                .header("location", "https://login.test/?next=1")
                .header("set-cookie", "state=abc"),
        ),
        Some(_) => Behavior::Respond(
            Reply::new(401, "who are you?\n")
                .header("www-authenticate", "Bearer realm=\"tether\"")
                .header("content-type", "text/plain"),
        ),
    })
}

/// A gateway over `down` whose route asks `service` first, at `/verify?from=tether`.
async fn gateway(down: Down, main: Script, service: UpstreamConfig, timeout: Duration) -> Env {
    Env::with(down, Up::H1, main, move |c| {
        c.upstreams.push(service);
        c.listeners[0].routes[0].auth = Some(ForwardAuth {
            upstream: "auth".into(),
            path: "/verify?from=tether".into(),
            copy_headers: vec!["X-Auth-User".into(), "x-auth-groups".into()],
            client_headers: vec!["Set-Cookie".into()],
            timeout,
        });
        c.admin = Some(AdminConfig {
            address: "127.0.0.1:0".parse().unwrap(),
        });
    })
    .await
}

fn checks(env: &Env, outcome: &str) -> Option<f64> {
    let series = format!("tether_auth_checks_total{{route=\"up\",outcome=\"{outcome}\"}}");
    metric(&env.metrics_text().unwrap(), &series)
}

/// Allowed, a 401 and a redirect to log in, over HTTP/1.1 and HTTP/2 downstream and either
/// protocol towards the service: the allowed request reaches the upstream with the service's
/// headers in place of the ones the client forged; the others get the service's own answer and
/// never reach the upstream.
#[tokio::test]
async fn the_auth_service_decides_which_requests_go_on_and_who_they_are_from() {
    bounded(Duration::from_secs(60), async {
        for (down, h2) in [(Down::H1, false), (Down::H2c, true), (Down::H1, true)] {
            let service = Upstream::start(h2, verifier()).await;
            let env = gateway(
                down,
                script(|_| {
                    Behavior::Respond(Reply::ok("from the app").header("set-cookie", "app=1"))
                }),
                service.config("auth"),
                Duration::from_secs(5),
            )
            .await;
            let case = format!("{down:?}, service over h2 {h2}");
            let mut c = env.http().await;

            let req = c
                .request(http::Method::GET, "/a?x=1")
                .header("authorization", "Bearer good")
                .header("x-auth-user", "mallory")
                .header("cookie", "session=1")
                .body(full(""))
                .unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(
                (p.status.as_u16(), &body[..]),
                (200, &b"from the app"[..]),
                "{case}"
            );
            // The service's refreshed session cookie reaches the client beside the app's own.
            let cookies: Vec<_> = p.headers.get_all("set-cookie").iter().collect();
            assert_eq!(cookies, ["app=1", "session=refreshed"], "{case}");
            let seen = env.log().requests("/a");
            assert_eq!(seen.len(), 1, "{case}");
            let h = &seen[0].1;
            assert_eq!(values(h, "x-auth-user"), ["alice"], "{case}: {h:?}");
            assert_eq!(
                values(h, "x-auth-groups"),
                ["admin", "ops"],
                "{case}: {h:?}"
            );
            assert!(values(h, "x-not-copied").is_empty(), "{case}: {h:?}");
            assert!(values(h, "set-cookie").is_empty(), "{case}: {h:?}");
            assert_eq!(values(h, "cookie"), ["session=1"], "{case}");

            // What the service was asked: its path, the client's headers, where it was going.
            let asked = service.log().requests("/verify");
            assert_eq!(asked.len(), 1, "{case}");
            let (method, h) = &asked[0];
            assert_eq!(method, "GET", "{case}");
            assert_eq!(values(h, "authorization"), ["Bearer good"], "{case}");
            assert_eq!(values(h, "cookie"), ["session=1"], "{case}");
            assert_eq!(values(h, "x-forwarded-method"), ["GET"], "{case}");
            assert_eq!(values(h, "x-forwarded-uri"), ["/a?x=1"], "{case}");
            assert_eq!(values(h, "x-forwarded-host").len(), 1, "{case}: {h:?}");
            assert!(!values(h, "x-request-id").is_empty(), "{case}: {h:?}");
            let host = if h2 { ":authority" } else { "host" };
            assert_eq!(values(h, host).len(), 1, "{case}: {h:?}");
            let rec = env.record("/a").await;
            assert!(rec.auth.is_some(), "{case}");
            assert_eq!(rec.upstream.as_deref(), Some("up"), "{case}");

            // A wrong token: the service's 401 as it came, with its body and headers; a POST's
            // body is never read.
            let req = c
                .request(http::Method::POST, "/b")
                .header("authorization", "Bearer bad")
                .body(full("order=7"))
                .unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 401, "{case}");
            assert_eq!(&body[..], b"who are you?\n", "{case}");
            assert_eq!(
                p.headers["www-authenticate"], "Bearer realm=\"tether\"",
                "{case}"
            );
            assert!(p.headers.contains_key("x-request-id"), "{case}");
            let rec = env.record("/b").await;
            assert_eq!(
                (rec.status, rec.outcome.as_str(), rec.stage),
                (401, "rejected", Some("auth")),
                "{case}"
            );
            assert_eq!(rec.upstream.as_deref(), Some("auth"), "{case}");
            assert_eq!(service.log().requests("/verify")[1].0, "GET", "{case}");

            // No token: sent to log in.
            let (p, _) = c.get("/c").await.unwrap();
            assert_eq!(p.status, 302, "{case}");
            assert_eq!(
                p.headers["location"], "https://login.test/?next=1",
                "{case}"
            );
            assert_eq!(p.headers["set-cookie"], "state=abc", "{case}");

            assert!(env.log().requests("/b").is_empty(), "{case}");
            assert!(env.log().requests("/c").is_empty(), "{case}");
            assert_eq!(env.log().body_lengths().iter().sum::<u64>(), 0, "{case}");
            assert_eq!(checks(&env, "allowed"), Some(1.0), "{case}");
            assert_eq!(checks(&env, "denied"), Some(2.0), "{case}");
            env.stop().await;
        }
    })
    .await;
}

/// A service nothing listens at: 502 `auth_failed`; one slower than the check's timeout: 504
/// `auth_timeout`. Neither request reaches the upstream.
#[tokio::test]
async fn a_failing_or_slow_auth_service_is_answered_at_stage_auth() {
    bounded(Duration::from_secs(30), async {
        let dead =
            UpstreamConfig::new("auth", vec![refused_addr().into()], UpstreamProtocol::Http1);
        let env = gateway(
            Down::H1,
            script(|_| Behavior::ok("app")),
            dead,
            Duration::from_secs(5),
        )
        .await;
        let mut c = env.http().await;
        let (p, body) = c.get("/dead").await.unwrap();
        assert_eq!(p.status, 502);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (v["error"].as_str(), v["stage"].as_str()),
            (Some("auth_failed"), Some("auth"))
        );
        let rec = env.record("/dead").await;
        assert_eq!((rec.status, rec.stage), (502, Some("auth")));
        assert_eq!(checks(&env, "failed"), Some(1.0));
        env.stop().await;

        let slow = Upstream::start(false, routes(vec![("/verify", Behavior::Never)])).await;
        let env = gateway(
            Down::H1,
            script(|_| Behavior::ok("app")),
            slow.config("auth"),
            Duration::from_millis(300),
        )
        .await;
        let mut c = env.http().await;
        let (p, body) = c.get("/slow").await.unwrap();
        assert_eq!(p.status, 504);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"].as_str(), Some("auth_timeout"));
        assert!(env.log().requests("/dead").is_empty() && env.log().requests("/slow").is_empty());
        // The check given up is closed at the service.
        wait_cancelled_at(slow.log()).await;
        env.stop().await;
    })
    .await;
}

/// The client leaves while its request is being checked: the check is cancelled (the service
/// sees its HTTP/1.1 connection close, or its HTTP/2 stream reset), the request is logged 499 at
/// stage `auth`, and the upstream never sees it.
#[tokio::test]
async fn a_client_leaving_during_the_check_cancels_it() {
    bounded(Duration::from_secs(30), async {
        for h2 in [false, true] {
            let service = Upstream::start(h2, routes(vec![("/verify", Behavior::Never)])).await;
            let env = gateway(
                Down::H1,
                script(|_| Behavior::ok("app")),
                service.config("auth"),
                Duration::from_secs(20),
            )
            .await;
            let mut c = env.h1().await;
            c.send_request("GET", "/gone", &[], None, b"")
                .await
                .unwrap();
            bounded(Duration::from_secs(10), async {
                while service.log().requests("/verify").is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            c.rst().unwrap();
            wait_cancelled_at(service.log()).await;
            let rec = env.record("/gone").await;
            assert_eq!((rec.status, rec.stage), (499, Some("auth")), "h2 {h2}");
            assert!(env.log().requests("/gone").is_empty(), "h2 {h2}");
            assert_eq!(checks(&env, "cancelled"), Some(1.0), "h2 {h2}");
            env.stop().await;
        }
    })
    .await;
}
