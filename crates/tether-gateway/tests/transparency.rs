//! The proxy changes nothing it should not: methods, statuses, repeated headers, trailers, HEAD,
//! 100-continue, chunk timing; and it does what a proxy must: removes hop-by-hop headers, adds
//! `X-Forwarded-For` / `Forwarded`, and makes an upstream's death mid-body visible downstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use h2::Reason;
use http::Method;
use http_body_util::BodyExt;
use test_support::behavior::{Behavior, Ending, Reply, routes, script};
use test_support::client::{empty, full};
use test_support::{Checksum, EventKind};
use tether_gateway::config::{HeaderRules, Redirect, Respond, RouteConfig};
use tether_gateway::observe::access::Outcome;
use tokio::time::Instant;

fn pairs() -> impl Iterator<Item = (Down, Up)> {
    ALL_DOWN
        .into_iter()
        .flat_map(|d| ALL_UP.into_iter().map(move |u| (d, u)))
}

#[tokio::test]
async fn methods_and_head() {
    bounded(Duration::from_secs(30), async {
        for (down, up) in pairs() {
            let s = script(|r| {
                Behavior::Respond(Reply::ok(r.method.clone()).header("x-method", &r.method))
            });
            let env = Env::new(down, up, s).await;
            let mut c = env.http().await;
            for m in ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"] {
                let method = Method::from_bytes(m.as_bytes()).unwrap();
                let body = if matches!(m, "POST" | "PUT") {
                    full("data")
                } else {
                    empty()
                };
                let req = c.request(method, "/m").body(body).unwrap();
                let (p, b, _) = c.fetch(req).await.unwrap();
                assert_eq!(p.status, 200, "{down:?}->{up:?} {m}");
                assert_eq!(p.headers["x-method"], m, "{down:?}->{up:?}");
                if m == "HEAD" {
                    assert!(b.is_empty(), "{down:?}->{up:?}: HEAD response with a body");
                } else {
                    assert_eq!(&b[..], m.as_bytes(), "{down:?}->{up:?}");
                }
            }
            let seen: Vec<String> = env
                .log()
                .requests("/m")
                .into_iter()
                .map(|(m, _)| m)
                .collect();
            assert_eq!(
                seen,
                ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"],
                "{down:?}->{up:?}"
            );
            let bodies = env.log().body_lengths();
            assert_eq!(bodies, [0, 4, 4, 0, 0, 0], "{down:?}->{up:?}");
            env.stop().await;
        }
    })
    .await
}

#[tokio::test]
async fn statuses_pass_through() {
    bounded(Duration::from_secs(30), async {
        for (down, up) in pairs() {
            let s = script(|r| {
                let status: u16 = r.path.trim_start_matches("/s/").parse().unwrap_or(400);
                let body = if matches!(status, 204 | 304) {
                    ""
                } else {
                    "status body"
                };
                Behavior::Respond(Reply::new(status, body).header("x-status", &status.to_string()))
            });
            let env = Env::new(down, up, s).await;
            let mut c = env.http().await;
            for status in [204u16, 304, 404, 500] {
                let (p, b) = c.get(&format!("/s/{status}")).await.unwrap();
                assert_eq!(p.status.as_u16(), status, "{down:?}->{up:?}");
                assert_eq!(p.headers["x-status"], status.to_string().as_str());
                if matches!(status, 204 | 304) {
                    assert!(b.is_empty());
                } else {
                    assert_eq!(&b[..], b"status body");
                }
            }
            env.stop().await;
        }
    })
    .await
}

#[tokio::test]
async fn repeated_headers_keep_every_value_in_order() {
    bounded(Duration::from_secs(30), async {
        for (down, up) in pairs() {
            let s = routes(vec![(
                "/h",
                Behavior::Respond(
                    Reply::ok("h")
                        .header("set-cookie", "a=1")
                        .header("set-cookie", "b=2")
                        .header("x-multi", "one")
                        .header("x-multi", "two"),
                ),
            )]);
            let env = Env::new(down, up, s).await;
            let mut c = env.http().await;
            let req = c
                .request(Method::GET, "/h")
                .header("x-req", "first")
                .header("x-req", "second")
                .body(empty())
                .unwrap();
            let (p, _, _) = c.fetch(req).await.unwrap();
            let cookies: Vec<_> = p.headers.get_all("set-cookie").iter().collect();
            assert_eq!(cookies, ["a=1", "b=2"], "{down:?}->{up:?}");
            let multi: Vec<_> = p.headers.get_all("x-multi").iter().collect();
            assert_eq!(multi, ["one", "two"], "{down:?}->{up:?}");
            let (_, headers) = env.log().requests("/h").remove(0);
            assert_eq!(
                values(&headers, "x-req"),
                ["first", "second"],
                "{down:?}->{up:?}"
            );
            env.stop().await;
        }
    })
    .await
}

#[tokio::test]
async fn trailers_from_h2_upstream_reach_h2_client() {
    bounded(Duration::from_secs(20), async {
        for down in [Down::H2c, Down::H2Tls] {
            for up in [Up::H2c, Up::H2Tls] {
                let s = routes(vec![(
                    "/t",
                    Behavior::Respond(
                        Reply::ok("payload")
                            .trailer("grpc-status", "0")
                            .trailer("x-digest", "abc"),
                    ),
                )]);
                let env = Env::new(down, up, s).await;
                let mut c = env.http().await;
                let req = c
                    .request(Method::POST, "/t")
                    .header("te", "trailers")
                    .body(full("x"))
                    .unwrap();
                let (p, b, trailers) = c.fetch(req).await.unwrap();
                assert_eq!(p.status, 200);
                assert_eq!(&b[..], b"payload");
                let t = trailers.unwrap_or_else(|| panic!("{down:?}->{up:?}: trailers lost"));
                assert_eq!(t["grpc-status"], "0");
                assert_eq!(t["x-digest"], "abc");
                env.stop().await;
            }
        }
    })
    .await
}

#[tokio::test]
async fn expect_100_continue() {
    bounded(Duration::from_secs(20), async {
        for up in ALL_UP {
            let env = Env::new(Down::H1, up, routes(vec![("/up", Behavior::Summary)])).await;
            let mut c = env.h1().await;
            let body = test_support::pattern(50_000);
            c.send_request(
                "POST",
                "/up",
                &[("expect", "100-continue")],
                Some(50_000),
                b"",
            )
            .await
            .unwrap();
            let h = tokio::time::timeout(BOUND, c.read_head())
                .await
                .unwrap_or_else(|_| panic!("{up:?}: no 100 Continue"))
                .unwrap();
            assert_eq!(h.status, 100, "{up:?}");
            c.send_raw(&body).await.unwrap();
            let h = c.read_final_head().await.unwrap();
            assert_eq!(h.status, 200);
            let b = c.read_body("POST", &h).await.unwrap();
            assert_eq!(
                String::from_utf8_lossy(&b),
                format!("50000 {}", Checksum::of(&body))
            );
            env.stop().await;
        }
    })
    .await
}

/// Server-sent events: chunks 200 ms apart upstream arrive about 200 ms apart downstream (no
/// buffering in between).
async fn sse_timing(down: Down, up: Up) {
    bounded(Duration::from_secs(10), async {
        let s = routes(vec![(
            "/events",
            Behavior::stream(Bytes::from_static(b"data: tick\n\n"), 5, 200),
        )]);
        let env = Env::new(down, up, s).await;
        let mut c = env.http().await;
        let req = c.request(Method::GET, "/events").body(empty()).unwrap();
        let resp = c.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut arrivals: Vec<Instant> = Vec::new();
        let mut total = 0;
        while let Some(f) = body.frame().await {
            if let Ok(d) = f.unwrap().into_data() {
                total += d.len();
                let now = Instant::now();
                // Pieces of one chunk arriving together count once.
                if arrivals
                    .last()
                    .is_none_or(|l| now - *l > Duration::from_millis(50))
                {
                    arrivals.push(now);
                }
            }
        }
        assert_eq!(total, 5 * 12);
        assert_eq!(arrivals.len(), 5, "{down:?}->{up:?}: chunks were batched");
        for w in arrivals.windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap >= Duration::from_millis(100) && gap <= Duration::from_millis(700),
                "{down:?}->{up:?}: gap {gap:?}"
            );
        }
        env.stop().await;
    })
    .await
}

#[tokio::test]
async fn sse_timing_h1_h1() {
    sse_timing(Down::H1, Up::H1).await
}
#[tokio::test]
async fn sse_timing_h1_h2c() {
    sse_timing(Down::H1, Up::H2c).await
}
#[tokio::test]
async fn sse_timing_h2c_h1() {
    sse_timing(Down::H2c, Up::H1).await
}
#[tokio::test]
async fn sse_timing_h2tls_h2tls() {
    sse_timing(Down::H2Tls, Up::H2Tls).await
}

/// An upstream that dies mid-body must not look like a complete response: HTTP/1 clients see the
/// connection end without the final chunk (or short of the content-length), HTTP/2 clients see
/// RST_STREAM.
#[tokio::test]
async fn upstream_death_mid_body_is_visible_downstream() {
    bounded(Duration::from_secs(30), async {
        let endings: [(Up, Option<u64>, Ending); 4] = [
            (Up::H1, Some(1000), Ending::Rst),
            (Up::H1, None, Ending::Fin),
            (
                Up::H2c,
                Some(1000),
                Ending::StreamReset(Reason::INTERNAL_ERROR),
            ),
            (Up::H2Tls, None, Ending::StreamReset(Reason::INTERNAL_ERROR)),
        ];
        for down in ALL_DOWN {
            for (up, content_length, ending) in endings {
                let s = routes(vec![(
                    "/die",
                    Behavior::Truncate {
                        content_length,
                        sent: Bytes::from_static(b"0123456789"),
                        ending,
                    },
                )]);
                let env = Env::new(down, up, s).await;
                let what = format!("{down:?}->{up:?} {content_length:?} {ending:?}");
                match down {
                    Down::H1 => {
                        let mut c = env.h1().await;
                        c.send_request("GET", "/die", &[], None, b"").await.unwrap();
                        let h = c.read_final_head().await.unwrap();
                        assert_eq!(h.status, 200, "{what}");
                        let r = tokio::time::timeout(BOUND, c.read_body("GET", &h)).await;
                        assert!(
                            matches!(r, Ok(Err(_))),
                            "{what}: the client did not see an incomplete body: {r:?}"
                        );
                    }
                    Down::H2c | Down::H2Tls => {
                        let mut c = env.h2().await;
                        let mut st = c.start("GET", "/die", &[], true).await.unwrap();
                        assert_eq!(st.response().await.unwrap().status, 200, "{what}");
                        let r = tokio::time::timeout(BOUND, st.read_to_end()).await;
                        match r {
                            Ok(Err(e)) => {
                                assert!(e.is_reset(), "{what}: not a stream reset: {e}");
                                assert_eq!(e.reason(), Some(Reason::INTERNAL_ERROR), "{what}");
                            }
                            other => panic!("{what}: the client did not see a reset: {other:?}"),
                        }
                    }
                }
                let rec = env.record("/die").await;
                assert_eq!(rec.outcome, Outcome::UpstreamError, "{what}: {rec:?}");
                assert_eq!(rec.stage, Some("body"), "{what}: {rec:?}");
                env.stop().await;
            }
        }
    })
    .await
}

#[tokio::test]
async fn hop_by_hop_removed_and_forwarding_headers_added() {
    bounded(Duration::from_secs(20), async {
        for up in ALL_UP {
            let reply = if up == Up::H1 {
                // Connection-specific response headers only exist in HTTP/1.
                Reply::ok("ok")
                    .header("connection", "x-resp-hop")
                    .header("x-resp-hop", "1")
                    .header("keep-alive", "timeout=5")
                    .header("x-resp-end", "kept")
            } else {
                Reply::ok("ok").header("x-resp-end", "kept")
            };
            let env = Env::new(Down::H1, up, routes(vec![("/f", Behavior::Respond(reply))])).await;
            let mut c = env.h1().await;
            c.send_request(
                "GET",
                "/f",
                &[
                    ("connection", "keep-alive, x-hop"),
                    ("x-hop", "1"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-connection", "keep-alive"),
                    ("te", "gzip"),
                    ("x-forwarded-for", "10.9.9.9"),
                    ("x-end", "kept"),
                ],
                None,
                b"",
            )
            .await
            .unwrap();
            let h = c.read_final_head().await.unwrap();
            assert_eq!(h.status, 200);
            assert_eq!(h.header("x-resp-end"), Some("kept"));
            assert_eq!(
                h.header("x-resp-hop"),
                None,
                "{up:?}: response hop-by-hop header forwarded"
            );
            assert_eq!(h.header("keep-alive"), None, "{up:?}");

            let (_, headers) = env.log().requests("/f").remove(0);
            let get = |n: &str| values(&headers, n);
            for hop in [
                "connection",
                "x-hop",
                "keep-alive",
                "proxy-connection",
                "te",
            ] {
                assert!(
                    get(hop).is_empty(),
                    "{up:?}: {hop} reached the upstream: {headers:?}"
                );
            }
            assert_eq!(get("x-end"), ["kept"]);
            let xff = get("x-forwarded-for").join(",");
            assert!(xff.contains("127.0.0.1"), "{up:?}: x-forwarded-for {xff:?}");
            assert!(
                !xff.contains("10.9.9.9"),
                "{up:?}: untrusted x-forwarded-for kept: {xff:?}"
            );
            let fwd = get("forwarded").join(",");
            assert!(
                fwd.contains("for=") && fwd.contains("127.0.0.1"),
                "{up:?}: forwarded {fwd:?}"
            );
            env.stop().await;
        }
    })
    .await
}

#[tokio::test]
async fn a_routes_header_rules_change_the_request_and_the_response() {
    bounded(Duration::from_secs(30), async {
        for (down, up) in pairs() {
            let reply = Reply::ok("ok")
                .header("server", "app/1.2")
                .header("x-powered-by", "framework")
                .header("via", "1.1 app");
            let env = Env::with(
                down,
                up,
                routes(vec![("/r", Behavior::Respond(reply))]),
                |c| {
                    let route = &mut c.listeners[0].routes[0];
                    let pair = |n: &str, v: &str| (n.to_owned(), v.to_owned());
                    route.request_headers = HeaderRules {
                        remove: vec!["Forwarded".into(), "x-debug".into()],
                        set: vec![pair("host", "app.internal:8080"), pair("x-env", "prod")],
                        add: vec![pair("x-tag", "edge")],
                    };
                    route.response_headers = HeaderRules {
                        remove: vec!["x-powered-by".into(), "x-request-id".into()],
                        set: vec![pair("server", "tether")],
                        add: vec![pair("via", "1.1 tether")],
                    };
                },
            )
            .await;
            let mut c = env.http().await;
            let req = c
                .request(Method::GET, "/r")
                .header("x-env", "dev")
                .header("x-debug", "1")
                .header("x-tag", "client")
                .body(empty())
                .unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 200, "{down:?}->{up:?}");
            assert_eq!(&body[..], b"ok", "{down:?}->{up:?}");
            let all = |n: &str| -> Vec<&str> {
                p.headers
                    .get_all(n)
                    .iter()
                    .map(|v| v.to_str().unwrap())
                    .collect()
            };
            assert_eq!(all("server"), ["tether"], "{down:?}->{up:?}");
            assert!(all("x-powered-by").is_empty(), "{down:?}->{up:?}");
            assert!(all("x-request-id").is_empty(), "{down:?}->{up:?}");
            assert_eq!(all("via"), ["1.1 app", "1.1 tether"], "{down:?}->{up:?}");

            let (_, headers) = env.log().requests("/r").remove(0);
            let get = |n: &str| values(&headers, n);
            let host = if up == Up::H1 { "host" } else { ":authority" };
            assert_eq!(
                get(host),
                ["app.internal:8080"],
                "{down:?}->{up:?}: {headers:?}"
            );
            assert_eq!(get("x-env"), ["prod"], "{down:?}->{up:?}");
            assert!(get("x-debug").is_empty(), "{down:?}->{up:?}");
            assert_eq!(get("x-tag"), ["client", "edge"], "{down:?}->{up:?}");
            // Only what the rules name changes: tether's other forwarding headers stay.
            assert!(get("forwarded").is_empty(), "{down:?}->{up:?}");
            assert_eq!(get("x-forwarded-for"), ["127.0.0.1"], "{down:?}->{up:?}");
            assert_eq!(get("x-request-id").len(), 1, "{down:?}->{up:?}");
            // The access log keeps the host the client asked for.
            let rec = env.record("/r").await;
            assert_ne!(rec.authority.as_str(), "app.internal:8080");
            env.stop().await;
        }
    })
    .await
}

#[tokio::test]
async fn a_route_with_rewrite_prefix_sends_the_path_with_its_prefix_replaced_and_maps_redirects_back()
 {
    bounded(Duration::from_secs(30), async {
        for up in ALL_UP {
            // The upstream answers with the request target it saw, and `/go` with a redirect
            // to one of its own paths.
            let s = script(|r| {
                if r.path == "/go" {
                    return Behavior::Respond(Reply::new(302, "").header("location", "/login?n=1"));
                }
                if r.path == "/go-abs" {
                    let to = "http://app.internal:8080/login";
                    return Behavior::Respond(Reply::new(302, "").header("location", to));
                }
                Behavior::Respond(Reply::ok(r.target.clone()))
            });
            let env = Env::with(Down::H1, up, s, |c| {
                let routes = &mut c.listeners[0].routes;
                let mut api = RouteConfig::new("/api", "up");
                api.rewrite_prefix = Some("/".into());
                let mut v1 = RouteConfig::new("/v1", "up");
                v1.rewrite_prefix = Some("/internal/v2".into());
                // An upstream that knows itself by another name.
                let mut named = RouteConfig::new("/named", "up");
                named.rewrite_prefix = Some("/".into());
                named
                    .request_headers
                    .set
                    .push(("host".into(), "app.internal:8080".into()));
                routes.insert(0, named);
                routes.insert(0, v1);
                routes.insert(0, api);
            })
            .await;
            let mut c = env.http().await;
            for (asked, seen) in [
                ("/api/users?id=7", "/users?id=7"),
                ("/api", "/"),
                ("/api?q=1", "/?q=1"),
                ("/apix", "/apix"),
                ("/v1/items/3", "/internal/v2/items/3"),
                ("/other/path", "/other/path"),
            ] {
                let req = c.request(Method::GET, asked).body(empty()).unwrap();
                let (p, body, _) = c.fetch(req).await.unwrap();
                assert_eq!(p.status, 200, "{up:?} {asked}");
                assert_eq!(&body[..], seen.as_bytes(), "{up:?} {asked}");
            }
            // A redirect to the upstream's path comes back under the route's prefix.
            let req = c.request(Method::GET, "/api/go").body(empty()).unwrap();
            let (p, _, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 302, "{up:?}");
            assert_eq!(p.headers["location"], "/api/login?n=1", "{up:?}");
            // So does one to its own name, on the client's host.
            let req = c
                .request(Method::GET, "/named/go-abs")
                .body(empty())
                .unwrap();
            let (p, _, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 302, "{up:?}");
            assert_eq!(p.headers["location"], "/named/login", "{up:?}");
            // The same URL from a route that sends the client's host is not the upstream's own.
            let req = c.request(Method::GET, "/go-abs").body(empty()).unwrap();
            let (p, _, _) = c.fetch(req).await.unwrap();
            assert_eq!(
                p.headers["location"], "http://app.internal:8080/login",
                "{up:?}"
            );
            // The access log keeps the path the client asked for.
            let rec = env.record("/api/users").await;
            assert_eq!(rec.route.as_deref(), Some("up"));
            env.stop().await;
        }
    })
    .await
}

/// Routes matching a path exactly or by a regular expression, in file order with a prefix
/// route after them: each request reaches the route it matches, with the path rewritten from
/// the regular expression's groups and the query kept; a path the expression matches only in
/// part goes on to the next route.
#[tokio::test]
async fn routes_match_exact_paths_and_regular_expressions_and_rewrite_from_their_groups() {
    bounded(Duration::from_secs(30), async {
        for up in ALL_UP {
            // The upstream answers with the request target it saw.
            let s = script(|r| Behavior::Respond(Reply::ok(r.target.clone())));
            let env = Env::with(Down::H1, up, s, |c| {
                let routes = &mut c.listeners[0].routes;
                let mut exact = RouteConfig::new("/", "up");
                exact.name = "exact".into();
                exact.path_exact = Some("/status".into());
                exact.rewrite_path = Some("/internal/health".into());
                let mut users = RouteConfig::new("/", "up");
                users.name = "users".into();
                users.path_regex = Some("/users/(?<id>[0-9]+)(/.*)?".into());
                users.rewrite_path = Some("/v2/accounts/${id}$2".into());
                // Matched, not rewritten.
                let mut images = RouteConfig::new("/", "up");
                images.name = "images".into();
                images.path_regex = Some(r"/.*\.(png|jpg)".into());
                routes.insert(0, images);
                routes.insert(0, users);
                routes.insert(0, exact);
            })
            .await;
            let mut c = env.http().await;
            for (asked, seen, route) in [
                ("/status", "/internal/health", "exact"),
                ("/status?verbose=1", "/internal/health?verbose=1", "exact"),
                ("/status/more", "/status/more", "up"),
                ("/users/42", "/v2/accounts/42", "users"),
                (
                    "/users/42/orders?page=2",
                    "/v2/accounts/42/orders?page=2",
                    "users",
                ),
                ("/users/me", "/users/me", "up"),
                ("/a/b/logo.png", "/a/b/logo.png", "images"),
                ("/logo.png.txt", "/logo.png.txt", "up"),
            ] {
                let req = c.request(Method::GET, asked).body(empty()).unwrap();
                let (p, body, _) = c.fetch(req).await.unwrap();
                assert_eq!(p.status, 200, "{up:?} {asked}");
                assert_eq!(&body[..], seen.as_bytes(), "{up:?} {asked}");
                let path = asked.split('?').next().unwrap();
                let rec = env.record(path).await;
                assert_eq!(rec.route.as_deref(), Some(route), "{up:?} {asked}");
            }
            env.stop().await;
        }
    })
    .await
}

#[tokio::test]
async fn a_redirect_route_answers_itself_and_the_upstream_never_hears_of_it() {
    bounded(Duration::from_secs(30), async {
        for down in ALL_DOWN {
            let env = Env::with(
                down,
                Up::H1,
                script(|_| Behavior::Respond(Reply::ok("up"))),
                |c| {
                    let routes = &mut c.listeners[0].routes;
                    let mut https = RouteConfig::new("/moved", "");
                    https.name = "to-https".into();
                    https.redirect = Some(Redirect::new("https://{host}{uri}"));
                    https.response_headers.set =
                        vec![("strict-transport-security".into(), "max-age=60".into())];
                    let mut gone = RouteConfig::new("/gone", "");
                    gone.name = "gone".into();
                    gone.redirect = Some(Redirect {
                        to: "/new{path}".into(),
                        status: 301,
                    });
                    routes.insert(0, gone);
                    routes.insert(0, https);
                },
            )
            .await;
            let mut c = env.http().await;
            let req = c
                .request(Method::POST, "/moved/x?y=1")
                .body(full("data"))
                .unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 308, "{down:?}");
            assert_eq!(
                p.headers["location"], "https://localhost/moved/x?y=1",
                "{down:?}"
            );
            assert_eq!(p.headers["strict-transport-security"], "max-age=60");
            assert!(p.headers.contains_key("x-request-id"));
            assert!(body.is_empty());
            let req = c.request(Method::GET, "/gone/a?b").body(empty()).unwrap();
            let (p, _, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 301, "{down:?}");
            assert_eq!(p.headers["location"], "/new/gone/a", "{down:?}");
            // Other routes still proxy, on the same connection.
            let req = c.request(Method::GET, "/other").body(empty()).unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(
                (p.status.as_u16(), &body[..]),
                (200, &b"up"[..]),
                "{down:?}"
            );
            let rec = env.record("/moved/x").await;
            assert_eq!((rec.status, rec.outcome), (308, Outcome::Ok));
            assert_eq!(rec.route.as_deref(), Some("to-https"));
            assert_eq!(rec.upstream, None);
            let upstream_saw = env
                .log()
                .events()
                .into_iter()
                .filter(|e| matches!(e.kind, EventKind::RequestStarted { .. }))
                .count();
            assert_eq!(upstream_saw, 1, "{down:?}");
            env.stop().await;
        }
    })
    .await
}

/// A route with a fixed response answers every request itself, with its status, type and body
/// (HEAD: the same head, no body), its response headers and a request id; a request body it
/// never reads does not spoil the connection, and the upstream hears of none of it.
#[tokio::test]
async fn a_route_with_a_fixed_response_answers_itself() {
    bounded(Duration::from_secs(30), async {
        for down in ALL_DOWN {
            let env = Env::with(
                down,
                Up::H1,
                script(|_| Behavior::Respond(Reply::ok("up"))),
                |c| {
                    let routes = &mut c.listeners[0].routes;
                    let mut maintenance = RouteConfig::new("/shop", "");
                    maintenance.name = "maintenance".into();
                    maintenance.respond = Some(Respond::new(503, "down for maintenance\n"));
                    maintenance.response_headers.set = vec![("retry-after".into(), "600".into())];
                    let mut blocked = RouteConfig::new("/internal", "");
                    blocked.respond = Some(Respond {
                        status: 403,
                        body: "{\"error\":\"forbidden\"}".into(),
                        content_type: "application/json".into(),
                    });
                    let mut ping = RouteConfig::new("/ping", "");
                    ping.respond = Some(Respond::new(204, ""));
                    routes.insert(0, ping);
                    routes.insert(0, blocked);
                    routes.insert(0, maintenance);
                },
            )
            .await;
            let mut c = env.http().await;
            let req = c.request(Method::GET, "/shop/cart").body(empty()).unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 503, "{down:?}");
            assert_eq!(&body[..], b"down for maintenance\n", "{down:?}");
            assert_eq!(p.headers["content-type"], "text/plain; charset=utf-8");
            assert_eq!(p.headers["content-length"], "21", "{down:?}");
            assert_eq!(p.headers["retry-after"], "600");
            assert!(p.headers.contains_key("x-request-id"));
            let req = c.request(Method::HEAD, "/shop").body(empty()).unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!((p.status.as_u16(), body.len()), (503, 0), "{down:?}");
            assert_eq!(p.headers["content-length"], "21", "{down:?}");
            let req = c
                .request(Method::POST, "/internal/admin")
                .body(full("a body that is never read"))
                .unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 403, "{down:?}");
            assert_eq!(p.headers["content-type"], "application/json");
            assert_eq!(&body[..], br#"{"error":"forbidden"}"#);
            for method in [Method::GET, Method::HEAD] {
                let req = c.request(method.clone(), "/ping").body(empty()).unwrap();
                let (p, body, _) = c.fetch(req).await.unwrap();
                assert_eq!(
                    (p.status.as_u16(), body.len()),
                    (204, 0),
                    "{down:?} {method}"
                );
                assert!(!p.headers.contains_key("content-type"));
                assert!(
                    !p.headers.contains_key("content-length"),
                    "{down:?} {method}: {:?}",
                    p.headers
                );
            }
            // Other routes still proxy, on the same connection.
            let req = c.request(Method::GET, "/other").body(empty()).unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(
                (p.status.as_u16(), &body[..]),
                (200, &b"up"[..]),
                "{down:?}"
            );
            let rec = env.record("/shop/cart").await;
            assert_eq!((rec.status, rec.outcome), (503, Outcome::Ok));
            assert_eq!(rec.route.as_deref(), Some("maintenance"));
            assert_eq!((rec.upstream, rec.bytes_sent), (None, 21));
            let upstream_saw = env
                .log()
                .events()
                .into_iter()
                .filter(|e| matches!(e.kind, EventKind::RequestStarted { .. }))
                .count();
            assert_eq!(upstream_saw, 1, "{down:?}");
            env.stop().await;
        }
    })
    .await
}

/// A route's `access_log` decides which of its requests get a line: `off` none, `errors` only
/// those that did not end well; the rest of the routes log every request.
#[tokio::test]
async fn a_routes_access_log_setting_picks_its_lines() {
    use tether_gateway::config::AccessLogMode;
    bounded(Duration::from_secs(30), async {
        let env = Env::with(
            Down::H1,
            Up::H1,
            script(|r| {
                if r.path.ends_with("/fail") {
                    Behavior::Respond(Reply::new(503, "down"))
                } else {
                    Behavior::Respond(Reply::ok("up"))
                }
            }),
            |c| {
                let routes = &mut c.listeners[0].routes;
                let mut health = routes[0].clone();
                health.path_prefix = "/healthz".into();
                health.name = "health".into();
                health.access_log = AccessLogMode::Off;
                let mut quiet = routes[0].clone();
                quiet.path_prefix = "/quiet".into();
                quiet.access_log = AccessLogMode::Errors;
                routes.insert(0, quiet);
                routes.insert(0, health);
                c.admin = Some(tether_gateway::config::AdminConfig {
                    address: "127.0.0.1:0".parse().unwrap(),
                });
            },
        )
        .await;
        let mut c = env.http().await;
        for path in [
            "/healthz",
            "/healthz/fail",
            "/quiet",
            "/quiet/fail",
            "/other",
        ] {
            let req = c.request(Method::GET, path).body(empty()).unwrap();
            c.fetch(req).await.unwrap();
        }
        // The last request's line is there: every line before it has been written.
        env.record("/other").await;
        let logged: Vec<String> = env
            .access
            .records()
            .into_iter()
            .map(|r| r.path.to_string())
            .collect();
        assert_eq!(logged, ["/quiet/fail", "/other"]);
        // Counted all the same.
        let metrics = env.metrics_text().unwrap();
        for class in ["2xx", "5xx"] {
            let series =
                format!("tether_requests_total{{route=\"health\",status_class=\"{class}\"");
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with(&series) && l.ends_with(" 1")),
                "{series}: {metrics}"
            );
        }
        env.stop().await;
    })
    .await
}

/// A sampled route logs every request that did not end well and a share of the others, picked
/// by request id (the same id is logged or not wherever it goes).
#[tokio::test]
async fn a_sampled_route_logs_its_failures_and_a_share_of_its_successes() {
    use tether_gateway::config::AccessLogMode;
    bounded(Duration::from_secs(60), async {
        let mode = AccessLogMode::Sampled {
            per_million: 250_000,
        };
        let env = Env::with(
            Down::H1,
            Up::H1,
            script(|r| {
                if r.path.ends_with("/fail") {
                    Behavior::Respond(Reply::new(503, "down"))
                } else {
                    Behavior::Respond(Reply::ok("up"))
                }
            }),
            |c| c.listeners[0].routes[0].access_log = mode,
        )
        .await;
        let mut c = env.http().await;
        let mut ok_ids = Vec::new();
        for i in 0..220 {
            let path = if i % 11 == 10 { "/s/fail" } else { "/s/ok" };
            let req = c.request(Method::GET, path).body(empty()).unwrap();
            let (p, _, _) = c.fetch(req).await.unwrap();
            if p.status == 200 {
                let id = p.headers["x-request-id"].to_str().unwrap().to_owned();
                ok_ids.push(id);
            }
        }
        assert_eq!(ok_ids.len(), 200);
        // A last failure: once its line is there, every line before it has been written.
        let req = c.request(Method::GET, "/last/fail").body(empty()).unwrap();
        c.fetch(req).await.unwrap();
        env.record("/last/fail").await;
        let records = env.access.records();
        let failed = records.iter().filter(|r| r.status == 503).count();
        assert_eq!(failed, 21, "every failure is logged");
        let mut logged: Vec<String> = records
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.request_id.to_string())
            .collect();
        let mut expected: Vec<String> = ok_ids
            .into_iter()
            .filter(|id| mode.logs(200, true, id))
            .collect();
        logged.sort();
        expected.sort();
        assert_eq!(logged, expected);
        // A quarter of 200, give or take five standard deviations.
        assert!(
            (20..=80).contains(&logged.len()),
            "{} of 200 logged",
            logged.len()
        );
        env.stop().await;
    })
    .await
}

/// tether's own error answer to a HEAD request is its head alone, the length of the body a GET
/// would get included: over HTTP/2 a body after a HEAD's response is a protocol error the client
/// must reset the stream for.
#[tokio::test]
async fn a_head_request_tether_answers_itself_gets_no_body() {
    bounded(Duration::from_secs(30), async {
        for down in ALL_DOWN {
            let dead = refused_addr();
            let env = Env::with(down, Up::H1, script(|_| Behavior::ok("up")), |c| {
                c.upstreams[0].addresses = vec![dead.into()];
                c.upstreams[0].max_fails = 0;
                c.listeners[0].routes[0].path_prefix = "/app".into();
                c.listeners[0].routes[0].max_retries = 0;
            })
            .await;
            let mut c = env.http().await;
            for (path, status) in [("/nowhere", 404), ("/app/x", 502)] {
                let req = c.request(Method::GET, path).body(empty()).unwrap();
                let (p, body, _) = c.fetch(req).await.unwrap();
                assert_eq!(p.status, status, "{down:?} GET {path}");
                let req = c.request(Method::HEAD, path).body(empty()).unwrap();
                let (h, none, _) = c
                    .fetch(req)
                    .await
                    .unwrap_or_else(|e| panic!("{down:?} HEAD {path}: {e}"));
                assert_eq!(h.status, status, "{down:?} HEAD {path}");
                assert!(none.is_empty(), "{down:?} HEAD {path}");
                assert_eq!(
                    h.headers["content-length"],
                    body.len().to_string().as_str(),
                    "{down:?} HEAD {path}"
                );
                assert_eq!(h.headers["content-type"], "application/json");
            }
            env.stop().await;
        }
    })
    .await
}

#[tokio::test]
async fn behind_a_proxy_protocol_balancer_the_client_is_the_one_its_header_names() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded(Duration::from_secs(20), async {
        let env = Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("hi")), |c| {
            c.listeners[0].proxy_protocol = true;
        })
        .await;
        // HTTP/1.1 after a version 1 header.
        let mut s = tokio::net::TcpStream::connect(env.addr).await.unwrap();
        s.write_all(
            b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 80\r\nGET /pp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let rec = env.record("/pp").await;
        assert_eq!(rec.client, "192.0.2.7:5555".parse().unwrap());
        let (_, headers) = env.log().requests("/pp").remove(0);
        assert_eq!(values(&headers, "x-forwarded-for"), ["192.0.2.7"]);

        // HTTP/2 with prior knowledge after a version 2 header.
        let client: std::net::SocketAddr = "[2001:db8::7]:443".parse().unwrap();
        let to: std::net::SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client, to),
        )
        .build()
        .unwrap();
        let mut s = tokio::net::TcpStream::connect(env.addr).await.unwrap();
        s.write_all(&header).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(s),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("http://x/pp2")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = bounded(BOUND, send.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(env.record("/pp2").await.client, client);

        // A connection without the header is closed unanswered.
        let mut s = tokio::net::TcpStream::connect(env.addr).await.unwrap();
        s.write_all(b"GET /none HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let _ = bounded(BOUND, s.read_to_end(&mut answer)).await;
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        assert!(env.records("/none").is_empty());
        env.stop().await;
    })
    .await
}

#[tokio::test]
async fn routes_matching_methods_and_headers_take_their_requests() {
    bounded(Duration::from_secs(20), async {
        for down in ALL_DOWN {
            let env = Env::with(down, Up::H1, script(|_| Behavior::ok("up")), |c| {
                let routes = &mut c.listeners[0].routes;
                // Canary requests to a redirect, to tell them apart; writes to no route's
                // upstream at all: a 404.
                let mut canary = RouteConfig::new("/", "");
                canary.name = "canary".into();
                canary.match_headers = vec![("x-canary".into(), "1".into())];
                canary.redirect = Some(Redirect::new("/canary{uri}"));
                let mut reads = RouteConfig::new("/", "up");
                reads.name = "reads".into();
                reads.methods = vec!["GET".into(), "HEAD".into()];
                routes.clear();
                routes.push(canary);
                routes.push(reads);
            })
            .await;
            let mut c = env.http().await;
            let req = c
                .request(Method::GET, "/a")
                .header("x-canary", "1")
                .body(empty())
                .unwrap();
            let (p, _, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 308, "{down:?}");
            assert_eq!(p.headers["location"], "/canary/a");
            let req = c.request(Method::GET, "/a").body(empty()).unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(
                (p.status.as_u16(), &body[..]),
                (200, &b"up"[..]),
                "{down:?}"
            );
            let req = c.request(Method::DELETE, "/a").body(empty()).unwrap();
            let (p, _, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 404, "{down:?}");
            env.stop().await;
        }
    })
    .await
}

#[tokio::test]
async fn an_upstream_that_asks_for_a_client_certificate_gets_the_configured_one() {
    use test_support::TestPki;
    use test_support::tls::{ALPN_H2, ALPN_HTTP1};
    use tether_gateway::config::{ServerTls, UpstreamProtocol, UpstreamTls};
    bounded(Duration::from_secs(20), async {
        let pki = TestPki::generate().unwrap();
        let h2 = test_support::UpstreamH2::start_tls(
            script(|_| Behavior::ok("mutual")),
            pki.server_config_requiring_clients(&[ALPN_H2]).unwrap(),
        )
        .await
        .unwrap();
        let h1 = test_support::UpstreamH1::start_tls(
            script(|_| Behavior::ok("mutual")),
            pki.server_config_requiring_clients(&[ALPN_HTTP1]).unwrap(),
        )
        .await
        .unwrap();
        let cases = [
            (UpstreamProtocol::Http1, h1.addr(), true),
            (UpstreamProtocol::Http1, h1.addr(), false),
            (UpstreamProtocol::H2, h2.addr(), true),
            (UpstreamProtocol::H2, h2.addr(), false),
        ];
        for (protocol, addr, with_cert) in cases {
            let pki = pki.clone();
            let env = Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("unused")), |c| {
                let u = &mut c.upstreams[0];
                u.addresses = vec![addr.into()];
                u.protocol = protocol;
                u.tls = Some(UpstreamTls {
                    server_name: Some("localhost".into()),
                    ca: vec![pki.ca_der()],
                    insecure_skip_verify: false,
                    client_cert: with_cert.then(|| ServerTls {
                        cert_chain: pki.client_chain(),
                        key: pki.client_key(),
                    }),
                });
                c.listeners[0].routes[0].max_retries = 0;
            })
            .await;
            let mut c = env.http().await;
            let req = c.request(Method::GET, "/m").body(empty()).unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            if with_cert {
                assert_eq!((p.status.as_u16(), &body[..]), (200, &b"mutual"[..]));
            } else {
                assert_eq!(p.status, 502, "{protocol:?}");
                // Refused after the handshake (TLS 1.3): over HTTP/1.1 the request's own read
                // fails with the alert; over HTTP/2 the connection fails, and its requests with
                // it. Either way the request is placed at TLS.
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["error"], "upstream_tls_failed", "{protocol:?}: {v}");
                assert_eq!(env.record("/m").await.stage, Some("tls"), "{protocol:?}");
            }
            env.stop().await;
        }
    })
    .await
}
