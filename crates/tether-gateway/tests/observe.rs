//! What operators see, checked on real requests: the JSON access log (written to a file and
//! parsed back) and the Prometheus metrics scraped over HTTP from the admin listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use test_support::behavior::routes;
use test_support::client::H1Client;
use test_support::{Behavior, EventKind, UpstreamH1};
use tether_gateway::config::*;
use tether_gateway::observe::access::{JsonLines, LineSink, MemoryAccessLog};
use tether_gateway::{Gateway, RunningGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const BOUND: Duration = Duration::from_secs(10);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    match tokio::time::timeout(BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {BOUND:?}"),
    }
}

/// A port nothing listens on.
fn refused_port() -> SocketAddr {
    test_support::refused_addr()
}

fn route(prefix: &str, name: &str, upstream: &str) -> RouteConfig {
    let mut r = RouteConfig::new(prefix, upstream);
    r.name = name.to_owned();
    r
}

fn upstream(name: &str, addrs: &[SocketAddr]) -> UpstreamConfig {
    UpstreamConfig::new(
        name,
        addrs.iter().map(|a| (*a).into()).collect(),
        UpstreamProtocol::Http1,
    )
}

fn stop(gw: RunningGateway) {
    gw.shutdown(Duration::from_millis(100));
}

/// A temporary file path, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(format!(
            "tether-{tag}-{}-{}.log",
            std::process::id(),
            tether::RequestId::generate().as_str()
        )))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits for the access-log line of `path` in the JSON-lines file.
async fn line_for(file: &TempFile, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&file.0).unwrap_or_default();
        // Only finished lines: the writer may be mid-line when the file is read.
        let finished = text.rsplit_once('\n').map_or("", |(done, _)| done);
        for line in finished.lines() {
            let v: Value = serde_json::from_str(line).expect("each line is one JSON object");
            if v["path"] == path {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no access-log line for {path}; have:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn us(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn addr(v: &Value, key: &str) -> SocketAddr {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_of_real_requests() {
    bounded(async {
        let up = UpstreamH1::start(routes(vec![
            ("/ok", Behavior::ok("hello")),
            ("/span", Behavior::ok("hello")),
            ("/retry", Behavior::ok("second")),
            ("/slow", Behavior::stall_ms(5000, "late")),
            ("/deadline", Behavior::stall_ms(5000, "late")),
        ]))
        .await
        .unwrap();
        let dead = refused_port();
        let mut deadline_route = route("/deadline", "deadline", "up");
        deadline_route.timeouts.total = Some(Duration::from_millis(300));
        let mut dead_route = route("/dead", "dead", "dead");
        dead_route.max_retries = 0;
        let mut span_route = route("/span", "span", "up");
        span_route.trace_context = TraceContext::Span;
        let mut config = Config::new(
            vec![ListenerConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                vec![
                    deadline_route,
                    dead_route,
                    route("/retry", "retry", "flaky"),
                    span_route,
                    route("/", "main", "up"),
                ],
            )],
            vec![
                upstream("up", &[up.addr()]),
                upstream("dead", &[dead]),
                // Round robin starts with the refused endpoint: one retry, then the live one.
                upstream("flaky", &[dead, up.addr()]),
            ],
        );
        config.workers = NonZeroUsize::new(1);
        let file = TempFile::new("access");
        let log = JsonLines::new(LineSink::append(&file.0).unwrap());
        let gw = Gateway::start(config, Arc::new(log)).unwrap();
        let gw_addr = gw.listener_addrs()[0];

        // Completed, with a client trace context passed through.
        let mut c = H1Client::connect(gw_addr).await.unwrap();
        c.send_request("GET", "/ok", &[("traceparent", TRACEPARENT)], None, b"")
            .await
            .unwrap();
        let head = c.read_final_head().await.unwrap();
        assert_eq!(head.status, 200);
        c.read_body("GET", &head).await.unwrap();
        let ok = line_for(&file, "/ok").await;
        assert_eq!(ok["status"], 200, "{ok}");
        assert_eq!(ok["outcome"], "ok");
        assert_eq!(ok["stage"], Value::Null);
        assert_eq!(ok["route"], "main");
        assert_eq!(ok["upstream"], "up");
        assert_eq!(ok["upstream_protocol"], "http1");
        assert_eq!(ok["protocol"], "HTTP/1.1");
        assert_eq!(ok["method"], "GET");
        assert_eq!(ok["bytes_sent"], 5);
        assert_eq!(ok["retries"], 0);
        assert_eq!(ok["upstream_reused"], false);
        assert_eq!(addr(&ok, "upstream_addr"), up.addr());
        assert_eq!(addr(&ok, "local"), gw_addr);
        assert!(addr(&ok, "client").ip().is_loopback());
        let upstream_local = addr(&ok, "upstream_local");
        assert!(upstream_local.ip().is_loopback() && upstream_local.port() != 0);
        assert_eq!(ok["request_id"], head.header("x-request-id").unwrap());
        assert_eq!(ok["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ok["span_id"], Value::Null);
        for k in [
            "dns_us",
            "connect_us",
            "send_us",
            "first_byte_us",
            "body_us",
        ] {
            us(&ok, k);
        }
        assert_eq!(ok["tls_us"], Value::Null, "cleartext upstream");
        assert!(us(&ok, "duration_us") >= us(&ok, "first_byte_us"));
        assert!(us(&ok, "upstream_connect_us") >= us(&ok, "connect_us"));
        let seen = up.log().events();
        let started = seen
            .iter()
            .find(|e| e.path == "/ok" && matches!(e.kind, EventKind::RequestStarted { .. }))
            .unwrap();
        let EventKind::RequestStarted { headers, .. } = &started.kind else {
            unreachable!()
        };
        let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(header("traceparent").as_deref(), Some(TRACEPARENT));
        assert_eq!(
            header("x-request-id").as_deref(),
            ok["request_id"].as_str(),
            "the request id goes upstream"
        );

        // tether's own span: same trace, tether's span id as the parent.
        c.send_request("GET", "/span", &[("traceparent", TRACEPARENT)], None, b"")
            .await
            .unwrap();
        let head = c.read_final_head().await.unwrap();
        c.read_body("GET", &head).await.unwrap();
        let span = line_for(&file, "/span").await;
        let span_id = span["span_id"].as_str().unwrap().to_owned();
        assert_eq!(span_id.len(), 16);
        assert_eq!(span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let sent = up
            .log()
            .events()
            .into_iter()
            .find_map(|e| match e.kind {
                EventKind::RequestStarted { headers, .. } if e.path == "/span" => headers
                    .into_iter()
                    .find(|(k, _)| k == "traceparent")
                    .map(|(_, v)| v),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            sent,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span_id}-01")
        );

        // A client that leaves while the upstream works.
        let mut quitter = H1Client::connect(gw_addr).await.unwrap();
        quitter
            .send_request("GET", "/slow", &[], None, b"")
            .await
            .unwrap();
        up.log()
            .wait_for(Duration::from_secs(3), |e| {
                e.path == "/slow" && matches!(e.kind, EventKind::RequestStarted { .. })
            })
            .await
            .expect("the upstream got /slow");
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(quitter);
        let abort = line_for(&file, "/slow").await;
        assert_eq!(abort["status"], 499, "{abort}");
        assert_eq!(abort["outcome"], "client_abort");
        assert_eq!(abort["abort_reason"], "client_closed");
        assert_eq!(abort["stage"], "first_byte");
        let prop = us(&abort, "propagation_us");
        assert!(prop < 500_000, "propagation {prop} us");
        assert!(us(&abort, "upstream_time_us") >= 190_000, "{abort}");
        assert!(us(&abort, "first_byte_us") >= 190_000, "{abort}");
        assert_eq!(abort["body_us"], Value::Null);

        // The route deadline.
        let mut c2 = H1Client::connect(gw_addr).await.unwrap();
        let t0 = Instant::now();
        let (head, body) = c2.get("/deadline").await.unwrap();
        assert_eq!(head.status, 504, "{}", String::from_utf8_lossy(&body));
        assert!(t0.elapsed() < Duration::from_secs(2));
        let late = line_for(&file, "/deadline").await;
        assert_eq!(late["status"], 504, "{late}");
        assert_eq!(late["outcome"], "timeout");
        assert_eq!(late["abort_reason"], "deadline");
        assert_eq!(late["stage"], "first_byte");
        assert_eq!(late["route"], "deadline");
        let d = us(&late, "duration_us");
        assert!((290_000..2_000_000).contains(&d), "duration {d} us");

        // A refused upstream.
        let (head, body) = c2.get("/dead/x").await.unwrap();
        assert_eq!(head.status, 502);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["stage"], "connect");
        let failed = line_for(&file, "/dead/x").await;
        assert_eq!(failed["status"], 502, "{failed}");
        assert_eq!(failed["outcome"], "upstream_error");
        assert_eq!(failed["stage"], "connect");
        assert_eq!(failed["upstream"], "dead");
        assert_eq!(failed["abort_reason"], Value::Null);
        assert_eq!(failed["retries"], 0);

        // First endpoint refused, the second answers: one retry.
        let (head, body) = c2.get("/retry").await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(&body[..], b"second");
        let retried = line_for(&file, "/retry").await;
        assert_eq!(retried["status"], 200, "{retried}");
        assert_eq!(retried["outcome"], "ok");
        assert_eq!(retried["retries"], 1);
        assert_eq!(addr(&retried, "upstream_addr"), up.addr());

        drop(c);
        drop(c2);
        tokio::task::spawn_blocking(move || stop(gw)).await.unwrap();
    })
    .await;
}

/// How many requests for `path` the upstream has seen start.
fn started(up: &UpstreamH1, path: &str) -> usize {
    up.log()
        .events()
        .iter()
        .filter(|e| e.path == path && matches!(e.kind, EventKind::RequestStarted { .. }))
        .count()
}

/// `GET path` on the admin listener.
async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample written exactly as `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent() {
    bounded(async {
        let up = UpstreamH1::start(routes(vec![
            ("/ok", Behavior::ok("hello")),
            ("/slow", Behavior::stall_ms(5000, "late")),
        ]))
        .await
        .unwrap();
        let mut dead_route = route("/dead", "dead", "dead");
        dead_route.max_retries = 0;
        let mut config = Config::new(
            vec![ListenerConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                vec![dead_route, route("/", "up", "up")],
            )],
            vec![
                upstream("up", &[up.addr()]),
                upstream("dead", &[refused_port()]),
            ],
        );
        config.workers = NonZeroUsize::new(1);
        config.admin = Some(AdminConfig {
            address: "127.0.0.1:0".parse().unwrap(),
        });
        let log = MemoryAccessLog::new();
        let gw = Gateway::start(config, Arc::new(log.clone())).unwrap();
        let gw_addr = gw.listener_addrs()[0];
        let admin = gw.admin_addr().unwrap();
        assert_eq!(admin_get(admin, "/healthz").await.0, 200);
        assert_eq!(admin_get(admin, "/readyz").await.0, 200);

        // 3 completed, 2 aborted after ~300 ms of upstream work each, 2 refused upstream.
        let mut c = H1Client::connect(gw_addr).await.unwrap();
        for _ in 0..3 {
            let (head, _) = c.get("/ok").await.unwrap();
            assert_eq!(head.status, 200);
        }
        let abort_after = Duration::from_millis(300);
        for n in 1..=2 {
            let mut quitter = H1Client::connect(gw_addr).await.unwrap();
            quitter
                .send_request("GET", "/slow", &[], None, b"")
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(3);
            while started(&up, "/slow") < n {
                assert!(Instant::now() < deadline, "the upstream did not get /slow");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(abort_after).await;
            drop(quitter);
        }
        for _ in 0..2 {
            let (head, _) = c.get("/dead/x").await.unwrap();
            assert_eq!(head.status, 502);
        }
        // Every request has been reported once all 7 records exist.
        let deadline = Instant::now() + Duration::from_secs(5);
        while log.records().len() < 7 {
            assert!(Instant::now() < deadline, "{:?}", log.records());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let (status, text) = admin_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        let get = |series: &str| {
            sample(&text, series).unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        };
        assert_eq!(
            get(r#"tether_requests_total{route="up",status_class="2xx",outcome="ok"}"#),
            3.0
        );
        assert_eq!(
            get(r#"tether_requests_total{route="up",status_class="499",outcome="client_abort"}"#),
            2.0
        );
        assert_eq!(
            get(
                r#"tether_requests_total{route="dead",status_class="5xx",outcome="upstream_error"}"#
            ),
            2.0
        );
        assert_eq!(
            get(r#"tether_aborts_total{route="up",reason="client_closed",stage="first_byte"}"#),
            2.0
        );
        assert_eq!(
            get(r#"tether_upstream_errors_total{upstream="dead",stage="connect",kind="refused"}"#),
            2.0
        );
        assert_eq!(get("tether_in_flight_requests"), 0.0);
        assert_eq!(
            get(r#"tether_cancel_propagation_seconds_count{upstream_protocol="http1"}"#),
            2.0
        );
        assert_eq!(
            get(r#"tether_request_duration_seconds_count{route="up"}"#),
            5.0
        );
        assert_eq!(
            get(r#"tether_request_duration_seconds_count{route="dead"}"#),
            2.0
        );
        // The upstream time of the two aborted requests: ~2 x 300 ms.
        let wasted = get(r#"tether_upstream_wasted_seconds_total{route="up"}"#);
        assert!((0.55..1.5).contains(&wasted), "wasted {wasted} s");
        assert_eq!(
            get(r#"tether_upstream_connections{upstream="up",state="connecting"}"#),
            0.0
        );
        assert!(
            !text.contains("tether_retries_total{"),
            "no retries: {text}"
        );

        drop(c);
        tokio::task::spawn_blocking(move || stop(gw)).await.unwrap();
    })
    .await;
}
