//! Active health checks: an endpoint whose checks fail is taken out of rotation on every worker
//! before a request finds it broken, and put back once its checks pass again. Two endpoints of
//! one upstream, each a server that answers its own name and a health path whose status the test
//! sets; passive health and retries are off, so only the checks decide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
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

/// Backends `a` and `b` behind a [`gateway`], once `b` is seen in rotation.
async fn checked_pair(up: Up) -> (Backend, Backend, Env) {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let env = gateway(up, vec![a.addr.into(), b.addr.into()]).await;
    wait_health(&env, b.addr, true).await;
    (a, b, env)
}

/// Reloads `env` with its upstream's health check changed by `f`.
fn reload_check(env: &mut Env, f: impl FnOnce(&mut HealthCheck)) {
    env.reload(|c| f(c.upstreams[0].health_check.as_mut().unwrap()));
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
            let (_a, b, env) = checked_pair(up).await;
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
        let (a, b, mut env) = checked_pair(Up::H1).await;
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
        let (_a, b, mut env) = checked_pair(Up::H1).await;

        // Only 204 passes now: b's 200 takes it out, and its 204 brings it back.
        reload_check(&mut env, |check| {
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
        reload_check(&mut env, |check| {
            check.expect_status.clear();
            check.expect_body = Some("ready".into());
        });
        wait_health(&env, b.addr, false).await;
        reload_check(&mut env, |check| {
            check.expect_body = Some("alt".into());
        });
        wait_health(&env, b.addr, true).await;
        env.stop().await;
    })
    .await;
}

/// What a gRPC server's health service answers: `SERVING` (1), `NOT_SERVING` (2), or (0) no
/// health service at all (`UNIMPLEMENTED`, trailers-only).
struct GrpcBackend {
    addr: std::net::SocketAddr,
    status: Arc<AtomicU8>,
    /// Each check's content-type, te and the service it asked about.
    checks: Arc<Mutex<Vec<(String, String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A body of the given frames, trailers included.
struct Frames(VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

impl GrpcBackend {
    /// An HTTP/2 server answering `name` to any request, and gRPC health checks.
    async fn start(name: &'static str) -> GrpcBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU8::new(1));
        let checks = Arc::new(Mutex::new(Vec::new()));
        let (st, seen) = (status.clone(), checks.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (st, seen) = (st.clone(), seen.clone());
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (st, seen) = (st.clone(), seen.clone());
                    async move {
                        let mut frames = VecDeque::new();
                        if req.uri().path() != "/grpc.health.v1.Health/Check" {
                            frames.push_back(Frame::data(Bytes::from_static(name.as_bytes())));
                            return Ok::<_, std::convert::Infallible>(Response::new(Frames(
                                frames,
                            )));
                        }
                        let (ct, te) = (header_text(&req, "content-type"), header_text(&req, "te"));
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        // One message: field 1, the service name, short enough for a 1-byte length.
                        let service = match &body[5..] {
                            [0x0a, n, rest @ ..] if usize::from(*n) == rest.len() => {
                                String::from_utf8(rest.to_vec()).unwrap()
                            }
                            other => format!("{other:?}"),
                        };
                        seen.lock().unwrap().push((ct, te, service));
                        let resp = Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc");
                        let status = st.load(Ordering::Relaxed);
                        if status == 0 {
                            let resp = resp
                                .header("grpc-status", "12")
                                .header("grpc-message", "unknown service grpc.health.v1.Health");
                            return Ok(resp.body(Frames(frames)).unwrap());
                        }
                        frames
                            .push_back(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status])));
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        frames.push_back(Frame::trailers(trailers));
                        Ok(resp.body(Frames(frames)).unwrap())
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(sock), svc),
                );
            }
        });
        GrpcBackend {
            addr,
            status,
            checks,
            task,
        }
    }
}

/// gRPC's health checking protocol towards an HTTP/2 upstream: an endpoint whose service is
/// NOT_SERVING, or that has no health service, leaves rotation; SERVING brings it back. Each
/// check is a gRPC call (`application/grpc`, `te: trailers`) naming the configured service.
#[tokio::test]
async fn grpc_health_checks_follow_the_services_serving_status() {
    bounded(Duration::from_secs(30), async {
        let (a, b) = (GrpcBackend::start("a").await, GrpcBackend::start("b").await);
        let mut env = gateway(Up::H2c, vec![a.addr.into(), b.addr.into()]).await;
        env.reload(|c| {
            let mut check = HealthCheck::grpc("app.Users");
            check.interval = Duration::from_millis(50);
            check.timeout = Duration::from_millis(500);
            c.upstreams[0].health_check = Some(check);
        });
        wait_health(&env, b.addr, true).await;
        let (bodies, _) = answers(&env, 10).await;
        assert!(bodies.iter().any(|b| b == "b"), "{bodies:?}");

        b.status.store(2, Ordering::Relaxed);
        wait_health(&env, b.addr, false).await;
        let (bodies, failed) = answers(&env, 10).await;
        assert_eq!(failed, 0);
        assert!(bodies.iter().all(|b| b == "a"), "{bodies:?}");

        b.status.store(1, Ordering::Relaxed);
        wait_health(&env, b.addr, true).await;
        b.status.store(0, Ordering::Relaxed);
        wait_health(&env, b.addr, false).await;
        b.status.store(1, Ordering::Relaxed);
        wait_health(&env, b.addr, true).await;

        let seen = b.checks.lock().unwrap().clone();
        assert!(seen.len() >= 4, "{seen:?}");
        let want = (
            "application/grpc".to_owned(),
            "trailers".to_owned(),
            "app.Users".to_owned(),
        );
        assert!(seen.iter().all(|s| *s == want), "{seen:?}");
        env.stop().await;
    })
    .await;
}

/// Checks start again with each reload; an endpoint's failures in a row go on counting across
/// them. Reloaded faster than its checks run, a failing endpoint still leaves rotation after
/// `unhealthy_after` failures (were the count to start again, it never would).
#[tokio::test]
async fn failures_in_a_row_count_across_reloads() {
    bounded(Duration::from_secs(30), async {
        let (_a, b, mut env) = checked_pair(Up::H1).await;
        reload_check(&mut env, |check| {
            check.interval = Duration::from_secs(1);
            check.unhealthy_after = 3;
        });
        b.health.store(503, Ordering::Relaxed);
        let out = format!(
            "tether_upstream_endpoint_healthy{{upstream=\"up\",endpoint=\"{}\"}} 0",
            b.addr
        );
        // Each reload starts b's checks again, at once; none lasts long enough for a second.
        let mut reloads = 0;
        while !env.metrics_text().unwrap().lines().any(|l| l == out) {
            assert!(reloads < 40, "still in rotation after {reloads} reloads");
            reloads += 1;
            env.reload(|c| c.listeners[0].routes[0].max_retries = reloads % 2);
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        env.stop().await;
    })
    .await;
}
