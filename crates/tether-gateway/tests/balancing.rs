//! How an upstream's endpoints share the requests: `least_requests` sends them away from an
//! endpoint busy with work until that work ends (the client leaving included), and weights set
//! each endpoint's share. Two endpoints, each a server that answers its own name and holds
//! `/hold` requests until they are cancelled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use test_support::behavior::{Behavior, script};
use tether_gateway::config::{
    AdminConfig, Balance, Config, HashKey, HealthCheck, SplitTarget, UpstreamAddress,
};

/// A gateway in front of `addresses`, with passive health and retries off so that only the
/// balancing decides.
async fn gateway(up: Up, addresses: Vec<UpstreamAddress>, tweak: impl FnOnce(&mut Config)) -> Env {
    Env::with(Down::H1, up, script(|_| Behavior::ok("unused")), move |c| {
        let u = &mut c.upstreams[0];
        u.addresses = addresses;
        u.max_fails = 0;
        c.listeners[0].routes[0].max_retries = 0;
        c.admin = Some(AdminConfig {
            address: "127.0.0.1:0".parse().unwrap(),
        });
        tweak(c);
    })
    .await
}

/// The bodies of `n` requests sent one after another on one connection.
async fn bodies(env: &Env, n: usize) -> Vec<String> {
    let mut client = env.http().await;
    let mut out = Vec::new();
    for i in 0..n {
        let (parts, body) = client.get(&format!("/r{i}")).await.unwrap();
        assert_eq!(parts.status, 200);
        out.push(String::from_utf8(body.to_vec()).unwrap());
    }
    out
}

fn in_flight(env: &Env, endpoint: &Backend) -> Option<f64> {
    metric(
        &env.metrics_text().unwrap(),
        &format!(
            "tether_upstream_endpoint_in_flight{{upstream=\"up\",endpoint=\"{}\"}}",
            endpoint.addr
        ),
    )
}

fn queued(env: &Env) -> Option<f64> {
    metric(
        &env.metrics_text().unwrap(),
        "tether_upstream_queued{upstream=\"up\"}",
    )
}

#[tokio::test]
async fn least_requests_keeps_requests_away_from_a_busy_endpoint_until_its_client_leaves() {
    bounded(Duration::from_secs(40), async {
        for up in [Up::H1, Up::H2c] {
            let (a, b) = (Backend::start("a").await, Backend::start("b").await);
            let env = gateway(up, vec![a.addr.into(), b.addr.into()], |c| {
                c.upstreams[0].balance = Balance::LeastRequests;
                // The count is shared: the busy request and the others may be on either worker.
                c.workers = NonZeroUsize::new(2);
            })
            .await;

            let mut holder = env.http().await;
            let held = tokio::spawn(async move { holder.get("/hold").await });
            bounded(Duration::from_secs(10), async {
                while a.held.load(Ordering::SeqCst) + b.held.load(Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            let (busy, idle) = if a.held.load(Ordering::SeqCst) == 1 {
                (&a, &b)
            } else {
                (&b, &a)
            };
            let idle_name = if std::ptr::eq(idle, &a) { "a" } else { "b" };
            let got = bodies(&env, 10).await;
            assert!(got.iter().all(|n| n == idle_name), "{up:?}: {got:?}");
            assert_eq!(in_flight(&env, busy), Some(1.0), "{up:?}");
            assert_eq!(in_flight(&env, idle), Some(0.0), "{up:?}");

            // The client gives up: the upstream work stops, and the endpoint is free again.
            held.abort();
            busy.wait_held(0).await;
            bounded(Duration::from_secs(10), async {
                while in_flight(&env, busy) != Some(0.0) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            let got = bodies(&env, 10).await;
            assert!(got.iter().any(|n| n == "a"), "{up:?}: {got:?}");
            assert!(got.iter().any(|n| n == "b"), "{up:?}: {got:?}");
            env.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn weights_set_each_endpoints_share_in_turn() {
    bounded(Duration::from_secs(30), async {
        for balance in [Balance::RoundRobin, Balance::LeastRequests] {
            let (a, b) = (Backend::start("a").await, Backend::start("b").await);
            let env = gateway(Up::H1, vec![a.addr.into(), b.addr.into()], |c| {
                c.upstreams[0].balance = balance.clone();
                c.upstreams[0].weights = vec![3, 1];
            })
            .await;
            // One worker, one request at a time: the turns alone decide (least_requests finds
            // every endpoint idle, a tie).
            let got = bodies(&env, 40).await;
            let to_a = got.iter().filter(|n| *n == "a").count();
            assert_eq!((to_a, got.len() - to_a), (30, 10), "{balance:?}: {got:?}");
            // Spread, not in blocks: never more than three in a row to the heavier endpoint.
            assert!(
                !got.windows(4).any(|w| w.iter().all(|n| n == "a")),
                "{balance:?}: {got:?}"
            );
            env.stop().await;
        }
    })
    .await;
}

/// A route's split sends each upstream its weight's share of the requests, spread out; each
/// request is logged with the upstream that served it, and a reload that sets a target's
/// weight to 0 sends it nothing more.
#[tokio::test]
async fn a_split_route_gives_each_upstream_its_share() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (
            Backend::start("stable").await,
            Backend::start("canary").await,
        );
        let split = |weights: [u32; 2]| {
            vec![
                SplitTarget {
                    upstream: "up".into(),
                    weight: weights[0],
                },
                SplitTarget {
                    upstream: "canary".into(),
                    weight: weights[1],
                },
            ]
        };
        let mut env = gateway(Up::H1, vec![a.addr.into()], |c| {
            let mut canary = c.upstreams[0].clone();
            canary.name = "canary".into();
            canary.addresses = vec![b.addr.into()];
            c.upstreams.push(canary);
            let r = &mut c.listeners[0].routes[0];
            r.upstream = String::new();
            r.split = split([3, 1]);
        })
        .await;
        let got = bodies(&env, 40).await;
        let stable = got.iter().filter(|n| *n == "stable").count();
        assert_eq!((stable, got.len() - stable), (30, 10), "{got:?}");
        assert!(
            !got.windows(4).any(|w| w.iter().all(|n| n == "stable")),
            "{got:?}"
        );
        for (i, body) in got.iter().enumerate() {
            let rec = env.record(&format!("/r{i}")).await;
            let want = if body == "stable" { "up" } else { "canary" };
            assert_eq!(rec.upstream.as_deref(), Some(want), "/r{i}");
        }
        env.reload(|c| c.listeners[0].routes[0].split = split([1, 0]));
        let got = bodies(&env, 10).await;
        assert!(got.iter().all(|n| n == "stable"), "{got:?}");
        env.stop().await;
    })
    .await;
}

/// A split with a key keeps each user on one side of a canary (each user's requests all reach
/// the same upstream, whichever worker takes them), raising the canary's weight only moves
/// users to it, and requests without the key still take turns.
#[tokio::test]
async fn a_keyed_split_keeps_each_user_on_one_side_of_the_canary() {
    bounded(Duration::from_secs(40), async {
        let (a, b) = (
            Backend::start("stable").await,
            Backend::start("canary").await,
        );
        let split = |canary: u32| {
            vec![
                SplitTarget {
                    upstream: "up".into(),
                    weight: 100 - canary,
                },
                SplitTarget {
                    upstream: "canary".into(),
                    weight: canary,
                },
            ]
        };
        let mut env = gateway(Up::H1, vec![a.addr.into()], |c| {
            let mut canary = c.upstreams[0].clone();
            canary.name = "canary".into();
            canary.addresses = vec![b.addr.into()];
            c.upstreams.push(canary);
            let r = &mut c.listeners[0].routes[0];
            r.upstream = String::new();
            r.split = split(20);
            r.split_key = Some(HashKey::Header("x-user".into()));
            c.workers = NonZeroUsize::new(2);
        })
        .await;
        let users: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
        let before = sides(&env, &users).await;
        let on_canary = before.iter().filter(|s| *s == "canary").count();
        assert!(
            (1..30).contains(&on_canary),
            "{on_canary} of 60 on the canary"
        );
        env.reload(|c| c.listeners[0].routes[0].split = split(50));
        let after = sides(&env, &users).await;
        for (i, (was, is)) in before.iter().zip(&after).enumerate() {
            assert!(
                was == is || is == "canary",
                "user-{i} moved from {was} to {is}"
            );
        }
        assert!(after.iter().filter(|s| *s == "canary").count() > on_canary);
        // Without the key: the weighted turns (1 in 2 now).
        let got = bodies(&env, 20).await;
        let canary = got.iter().filter(|n| *n == "canary").count();
        assert_eq!(canary, 10, "{got:?}");
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_reload_removes_the_in_flight_series_of_endpoints_it_drops() {
    bounded(Duration::from_secs(20), async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let mut env = gateway(Up::H1, vec![a.addr.into(), b.addr.into()], |c| {
            c.upstreams[0].balance = Balance::LeastRequests;
        })
        .await;
        bodies(&env, 2).await;
        assert_eq!(in_flight(&env, &b), Some(0.0));
        env.reload(|c| c.upstreams[0].addresses = vec![a.addr.into()]);
        bodies(&env, 2).await;
        assert_eq!(in_flight(&env, &a), Some(0.0));
        assert_eq!(in_flight(&env, &b), None);
        assert_eq!(queued(&env), Some(0.0));
        // Nothing counted any more: no series left for the upstream.
        env.reload(|c| c.upstreams[0].balance = Balance::RoundRobin);
        bodies(&env, 2).await;
        assert_eq!(in_flight(&env, &a), None);
        assert_eq!(queued(&env), None);
        env.stop().await;
    })
    .await;
}

/// The upstream each user's requests reached, checking that all three of them reached the same
/// one (each on a connection of its own: another worker may take it).
async fn sides(env: &Env, users: &[String]) -> Vec<String> {
    let mut sides = Vec::new();
    for u in users {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let mut c = env.http().await;
            seen.push(as_user(&mut c, "x-user", u).await);
        }
        assert!(seen.iter().all(|s| *s == seen[0]), "{u}: {seen:?}");
        sides.push(seen[0].clone());
    }
    sides
}

/// The body of `GET /` with header `name: value`, on `client`.
async fn as_user(client: &mut test_support::client::HttpClient, name: &str, value: &str) -> String {
    let req = client
        .request(http::Method::GET, "/")
        .header(name, value)
        .body(test_support::client::empty())
        .unwrap();
    let (parts, body, _) = client.fetch(req).await.unwrap();
    assert_eq!(parts.status, 200);
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn hash_keeps_each_key_on_one_endpoint_and_moves_only_the_keys_of_one_that_leaves() {
    bounded(Duration::from_secs(40), async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let env = gateway(Up::H1, vec![a.addr.into(), b.addr.into()], |c| {
            c.upstreams[0].balance = Balance::Hash(HashKey::Header("x-user".into()));
            let mut check = HealthCheck::new("/healthz");
            check.interval = Duration::from_millis(50);
            c.upstreams[0].health_check = Some(check);
            c.workers = NonZeroUsize::new(2);
        })
        .await;
        let users: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
        // Each user's requests, on connections of their own (so on either worker), reach one
        // endpoint; the users are spread over both.
        let mut home = Vec::new();
        for u in &users {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let mut client = env.http().await;
                seen.push(as_user(&mut client, "x-user", u).await);
            }
            assert!(seen.iter().all(|s| *s == seen[0]), "{u}: {seen:?}");
            home.push(seen[0].clone());
        }
        assert!(
            home.iter().any(|h| h == "a") && home.iter().any(|h| h == "b"),
            "{home:?}"
        );

        // b fails its checks: its users move to a, a's stay.
        b.health.store(503, Ordering::Relaxed);
        wait_health(&env, b.addr, false).await;
        let mut client = env.http().await;
        for u in &users {
            assert_eq!(as_user(&mut client, "x-user", u).await, "a", "{u}");
        }
        // Back: every user is home again.
        b.health.store(200, Ordering::Relaxed);
        wait_health(&env, b.addr, true).await;
        for (u, h) in users.iter().zip(&home) {
            assert_eq!(&as_user(&mut client, "x-user", u).await, h, "{u}");
        }
        // Requests without the key go in turn.
        let got = bodies(&env, 4).await;
        assert!(
            got.iter().any(|n| n == "a") && got.iter().any(|n| n == "b"),
            "{got:?}"
        );
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn hash_by_cookie_follows_the_session() {
    bounded(Duration::from_secs(20), async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let env = gateway(Up::H2c, vec![a.addr.into(), b.addr.into()], |c| {
            c.upstreams[0].balance = Balance::Hash(HashKey::Cookie("sid".into()));
        })
        .await;
        let mut client = env.http().await;
        let mut homes = std::collections::HashSet::new();
        for s in 0..16 {
            let cookie = format!("theme=dark; sid=s{s}");
            let first = as_user(&mut client, "cookie", &cookie).await;
            for _ in 0..3 {
                assert_eq!(as_user(&mut client, "cookie", &cookie).await, first, "s{s}");
            }
            homes.insert(first);
        }
        assert_eq!(homes.len(), 2, "{homes:?}");
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_hashed_request_retries_on_its_keys_next_endpoint() {
    bounded(Duration::from_secs(20), async {
        let a = Backend::start("a").await;
        // A port nothing listens on: connections are refused.
        let dead = refused_addr();
        // max_fails = 0 (as `gateway` sets it): nothing takes the dead endpoint out of rotation,
        // so only the retry's choice keeps its keys served.
        let env = gateway(Up::H1, vec![a.addr.into(), dead.into()], |c| {
            c.upstreams[0].balance = Balance::Hash(HashKey::Header("x-user".into()));
            let route = &mut c.listeners[0].routes[0];
            route.max_retries = 1;
            // Every request may retry: the addresses (and so which keys hash to the dead
            // endpoint) change from run to run, and the default budget (a fifth of the
            // requests, plus 10 a second) refuses the retries when most of them do.
            route.retry_budget_ratio = 1.0;
        })
        .await;
        let mut client = env.http().await;
        for i in 0..20 {
            assert_eq!(
                as_user(&mut client, "x-user", &format!("user-{i}")).await,
                "a"
            );
        }
        let retried = env
            .access
            .records()
            .iter()
            .filter(|r| r.retries > 0)
            .count();
        assert!(retried > 0, "no key hashed to the dead endpoint");
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_full_endpoint_is_passed_over_and_when_all_are_full_requests_wait_their_turn() {
    bounded(Duration::from_secs(40), async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let mut env = gateway(Up::H1, vec![a.addr.into(), b.addr.into()], |c| {
            c.upstreams[0].max_in_flight_per_endpoint = std::num::NonZeroU32::new(1);
            c.upstreams[0].queue_timeout = Duration::from_secs(10);
            // The cap is shared: the requests below may be on either worker.
            c.workers = NonZeroUsize::new(2);
        })
        .await;
        // One endpoint busy: every request goes to the other, not in turn.
        let first = hold(&env).await;
        bounded(Duration::from_secs(10), async {
            while a.held.load(Ordering::SeqCst) + b.held.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let (busy, free) = if a.held.load(Ordering::SeqCst) == 1 {
            (&a, "b")
        } else {
            (&b, "a")
        };
        let got = bodies(&env, 6).await;
        assert!(got.iter().all(|n| n == free), "{got:?}");

        // Both busy: the next requests wait. One whose client leaves while waiting is gone from
        // the queue and never reaches an upstream; the other is served once a place frees.
        let second = hold(&env).await;
        bounded(Duration::from_secs(10), async {
            while a.held.load(Ordering::SeqCst) + b.held.load(Ordering::SeqCst) != 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let mut waiting = env.http().await;
        let waiting = tokio::spawn(async move { waiting.get("/waits").await });
        let mut leaving = env.http().await;
        let leaving = tokio::spawn(async move { leaving.get("/leaves").await });
        bounded(Duration::from_secs(10), async {
            while queued(&env) != Some(2.0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(!waiting.is_finished() && !leaving.is_finished());
        leaving.abort();
        let gone = env.record("/leaves").await;
        assert_eq!(gone.status, 499);
        assert_eq!(gone.upstream_addr, None, "it reached an upstream");
        assert!(gone.queued.is_some(), "its wait is not in the log");
        bounded(Duration::from_secs(10), async {
            while queued(&env) != Some(1.0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        first.abort();
        busy.wait_held(0).await;
        let (parts, body) = waiting.await.unwrap().unwrap();
        assert_eq!(parts.status, 200);
        assert!(body == "a" || body == "b");
        let served = env.record("/waits").await;
        // It waited from before the 100 ms pause until `first` ended.
        assert!(
            served
                .queued
                .is_some_and(|q| q >= Duration::from_millis(100)),
            "{:?}",
            served.queued
        );
        assert_eq!(queued(&env), Some(0.0));

        // No room within queue_timeout: 503, and nothing sent upstream.
        env.reload(|c| c.upstreams[0].queue_timeout = Duration::from_millis(100));
        let third = hold(&env).await;
        bounded(Duration::from_secs(10), async {
            while a.held.load(Ordering::SeqCst) + b.held.load(Ordering::SeqCst) != 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let mut c = env.http().await;
        let (parts, body) = c.get("/shed").await.unwrap();
        assert_eq!(parts.status, 503);
        assert_eq!(parts.headers["retry-after"], "1");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (&v["error"], &v["stage"]),
            (&"no_capacity".into(), &"admission".into())
        );
        second.abort();
        third.abort();
        env.stop().await;
    })
    .await;
}

/// A `/hold` request sent on a connection of its own, held until the task is aborted.
/// A backup endpoint takes no request while another endpoint can take it: with active health
/// checks, it serves only while both others fail theirs, and the first to pass again takes the
/// traffic back.
#[tokio::test]
async fn a_backup_serves_only_while_no_other_endpoint_is_in_rotation() {
    bounded(Duration::from_secs(40), async {
        let (a, b, c) = (
            Backend::start("a").await,
            Backend::start("b").await,
            Backend::start("c").await,
        );
        // The backup between the two others: the one in turn after `a` is `c`, passed over.
        let addresses = vec![a.addr.into(), c.addr.into(), b.addr.into()];
        let env = gateway(Up::H1, addresses, |cfg| {
            let u = &mut cfg.upstreams[0];
            u.backups = vec![false, true, false];
            let mut check = HealthCheck::new("/healthz");
            check.interval = Duration::from_millis(50);
            check.timeout = Duration::from_millis(500);
            u.health_check = Some(check);
        })
        .await;
        for e in [&a, &b, &c] {
            wait_health(&env, e.addr, true).await;
        }
        let got = bodies(&env, 12).await;
        assert!(got.iter().all(|n| n == "a" || n == "b"), "{got:?}");
        assert!(got.iter().any(|n| n == "a") && got.iter().any(|n| n == "b"));

        // One of the two out: the other takes everything, the backup still nothing.
        a.health.store(503, Ordering::Relaxed);
        wait_health(&env, a.addr, false).await;
        let got = bodies(&env, 8).await;
        assert!(got.iter().all(|n| n == "b"), "{got:?}");

        // Both out: the backup serves, and no request fails.
        b.health.store(503, Ordering::Relaxed);
        wait_health(&env, b.addr, false).await;
        let got = bodies(&env, 8).await;
        assert!(got.iter().all(|n| n == "c"), "{got:?}");

        // One back: it takes the traffic back from the backup.
        b.health.store(200, Ordering::Relaxed);
        wait_health(&env, b.addr, true).await;
        let got = bodies(&env, 8).await;
        assert!(got.iter().all(|n| n == "b"), "{got:?}");
        env.stop().await;
    })
    .await;
}

/// With passive health and retries, an endpoint refusing connections sends its requests to the
/// backup after its first failure, and the client never sees it; with
/// `max_in_flight_per_endpoint`, a request finding every other endpoint full goes to the backup
/// rather than waiting for room, under `least_requests` as in turn.
#[tokio::test]
async fn a_backup_takes_requests_that_no_other_endpoint_can() {
    bounded(Duration::from_secs(40), async {
        let backup = Backend::start("backup").await;
        let env = gateway(
            Up::H1,
            vec![refused_addr().into(), backup.addr.into()],
            |cfg| {
                cfg.upstreams[0].backups = vec![false, true];
                cfg.upstreams[0].max_fails = 1;
                cfg.listeners[0].routes[0].max_retries = 1;
            },
        )
        .await;
        let got = bodies(&env, 6).await;
        assert!(got.iter().all(|n| n == "backup"), "{got:?}");
        env.stop().await;

        for balance in [Balance::RoundRobin, Balance::LeastRequests] {
            let (a, backup) = (Backend::start("a").await, Backend::start("backup").await);
            let env = gateway(Up::H1, vec![a.addr.into(), backup.addr.into()], |cfg| {
                let u = &mut cfg.upstreams[0];
                u.backups = vec![false, true];
                u.balance = balance.clone();
                u.max_in_flight_per_endpoint = std::num::NonZeroU32::new(1);
                u.queue_timeout = Duration::from_secs(10);
            })
            .await;
            let got = bodies(&env, 4).await;
            assert!(got.iter().all(|n| n == "a"), "{balance:?}: {got:?}");
            let held = hold(&env).await;
            a.wait_held(1).await;
            let got = bodies(&env, 4).await;
            assert!(got.iter().all(|n| n == "backup"), "{balance:?}: {got:?}");
            // Room again at `a`: the backup is left alone.
            held.abort();
            bounded(Duration::from_secs(10), async {
                while in_flight(&env, &a) != Some(0.0) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            let got = bodies(&env, 4).await;
            assert!(got.iter().all(|n| n == "a"), "{balance:?}: {got:?}");
            env.stop().await;
        }
    })
    .await;
}

/// How many of `n` requests endpoint `name` answered.
async fn share(env: &Env, name: &str, n: usize) -> usize {
    bodies(env, n).await.iter().filter(|b| *b == name).count()
}

/// With `slow_start`, an endpoint whose health checks put it back in rotation gets a small
/// share of the requests at first (a tenth, growing over the window) where its peer keeps the
/// rest, in turn as by `least_requests`; endpoints there from the start are not ramped.
#[tokio::test]
async fn an_endpoint_back_in_rotation_gets_its_share_gradually() {
    for balance in [Balance::RoundRobin, Balance::LeastRequests] {
        back_in_rotation(balance).await;
    }
}

async fn back_in_rotation(balance: Balance) {
    bounded(Duration::from_secs(40), async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let env = gateway(Up::H1, vec![a.addr.into(), b.addr.into()], |cfg| {
            let u = &mut cfg.upstreams[0];
            u.balance = balance.clone();
            u.slow_start = Some(Duration::from_secs(60));
            let mut check = HealthCheck::new("/healthz");
            check.interval = Duration::from_millis(50);
            check.timeout = Duration::from_millis(500);
            u.health_check = Some(check);
        })
        .await;
        wait_health(&env, b.addr, true).await;
        // In turn (idle endpoints tie, and ties go in turn): half each.
        assert_eq!(share(&env, "b", 60).await, 30, "{balance:?}");

        b.health.store(503, Ordering::Relaxed);
        wait_health(&env, b.addr, false).await;
        b.health.store(200, Ordering::Relaxed);
        wait_health(&env, b.addr, true).await;
        // Seconds into a minute's start: about a tenth of its turns, 3 of 60 (30 without).
        let got = share(&env, "b", 60).await;
        assert!(
            got <= 15,
            "{balance:?}: b answered {got} of 60 at the start of its slow start"
        );
        env.stop().await;
    })
    .await;
}

/// An endpoint a reload adds beside others is cold: with `slow_start` it gets few requests at
/// first, and its whole share once the window has passed.
#[tokio::test]
async fn an_endpoint_a_reload_adds_starts_slowly_then_gets_its_share() {
    bounded(Duration::from_secs(40), async {
        let (a, c) = (Backend::start("a").await, Backend::start("c").await);
        let mut env = gateway(Up::H1, vec![a.addr.into()], |cfg| {
            cfg.upstreams[0].slow_start = Some(Duration::from_secs(60));
        })
        .await;
        assert_eq!(share(&env, "a", 10).await, 10);
        let added: UpstreamAddress = c.addr.into();
        env.reload(|cfg| cfg.upstreams[0].addresses.push(added.clone()));
        let got = share(&env, "c", 60).await;
        assert!(
            got <= 15,
            "c answered {got} of 60 at the start of its slow start"
        );
        assert!(got < 30);

        // A short window, over by the time the requests come: half each, in turn. (A reload
        // that changes only the window keeps the time `c` joined.)
        env.reload(|cfg| cfg.upstreams[0].slow_start = Some(Duration::from_millis(100)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(share(&env, "c", 60).await, 30);
        env.stop().await;
    })
    .await;
}

async fn hold(
    env: &Env,
) -> tokio::task::JoinHandle<Result<(http::response::Parts, bytes::Bytes), test_support::BoxError>>
{
    let mut c = env.http().await;
    tokio::spawn(async move { c.get("/hold").await })
}
