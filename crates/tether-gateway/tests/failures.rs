//! Failure attribution on real sockets: each way an upstream can fail (refused, black-holed,
//! unknown name, wrong certificate, silent, reset before headers, reset mid-body) must reach the
//! client as tether's own marked JSON error with the right status and stage (or, once the
//! response has started, as an abnormal end), and the access log must name the same stage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use h2::Reason;
use http::response::Parts;
use test_support::behavior::{Behavior, Ending, routes};
use test_support::client::H1Client;
use test_support::{BlackHole, DnsStub, EventKind, TestPki};
use tether::CancelReason;
use tether_gateway::config::UpstreamAddress;
use tether_gateway::observe::access::{Outcome, RequestRecord};
use tokio::time::Instant;

/// Asserts a response is tether's own error: status, marking header, JSON body.
fn assert_tether_error(parts: &Parts, body: &[u8], status: u16, code: &str, stage: &str) {
    let text = String::from_utf8_lossy(body);
    assert_eq!(parts.status.as_u16(), status, "body: {text}");
    let ps = parts
        .headers
        .get("proxy-status")
        .expect("proxy-status header")
        .to_str()
        .unwrap();
    assert!(ps.starts_with("tether;"), "{ps}");
    assert!(ps.contains(&format!("details=\"{stage}\"")), "{ps}");
    assert_eq!(parts.headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(body).expect("json body");
    assert_eq!(v["error"], code, "{text}");
    assert_eq!(v["stage"], stage, "{text}");
    assert_eq!(
        v["request_id"].as_str().unwrap(),
        parts.headers["x-request-id"].to_str().unwrap()
    );
}

fn assert_record(rec: &RequestRecord, status: u16, stage: &str, outcome: Outcome) {
    assert_eq!(rec.status, status, "{rec:?}");
    assert_eq!(rec.stage, Some(stage), "{rec:?}");
    assert_eq!(rec.outcome, outcome, "{rec:?}");
}

async fn get(env: &Env, path: &str) -> (Parts, Bytes) {
    let mut c = env.http().await;
    c.get(path).await.unwrap()
}

#[tokio::test]
async fn refused_port_is_502_at_connect_after_retries() {
    bounded(Duration::from_secs(10), async {
        let dead = refused_addr();
        let env = Env::with(Down::H1, Up::H1, routes(vec![]), |c| {
            c.upstreams[0].addresses = vec![dead.into()];
        })
        .await;
        let (parts, body) = get(&env, "/refused").await;
        assert_tether_error(&parts, &body, 502, "upstream_connect_failed", "connect");
        assert_eq!(
            parts.headers["proxy-status"],
            "tether; error=connection_refused; details=\"connect\""
        );
        let rec = env.record("/refused").await;
        assert_record(&rec, 502, "connect", Outcome::UpstreamError);
        // Nothing was sent: a refused connect is retried up to the route's limit (2).
        assert_eq!(rec.retries, 2, "{rec:?}");
        env.stop().await;
    })
    .await;
}

/// The kernel drops SYNs to a listener whose accept queue is full (verified by
/// `BlackHole::bind`), so the connect hangs until tether's connect timeout.
#[tokio::test]
async fn full_accept_queue_is_504_after_the_connect_timeout() {
    bounded(Duration::from_secs(10), async {
        let hole = BlackHole::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let env = Env::with(Down::H1, Up::H1, routes(vec![]), |c| {
            c.upstreams[0].addresses = vec![hole.addr().into()];
            let r = &mut c.listeners[0].routes[0];
            r.timeouts.connect = Duration::from_millis(300);
            r.max_retries = 0;
        })
        .await;
        let mut client = env.http().await;
        let t0 = Instant::now();
        let (parts, body) = client.get("/blackhole").await.unwrap();
        let took = t0.elapsed();
        assert_tether_error(&parts, &body, 504, "upstream_connect_timeout", "connect");
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_millis(1500),
            "answered after {took:?}"
        );
        let rec = env.record("/blackhole").await;
        assert_record(&rec, 504, "connect", Outcome::Timeout);
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_name_is_502_at_dns() {
    bounded(Duration::from_secs(10), async {
        let stub = DnsStub::start(&[("known.test", vec!["127.0.0.1".parse().unwrap()])])
            .await
            .unwrap();
        let env = Env::with(Down::H1, Up::H1, routes(vec![]), |c| {
            c.dns.nameservers = vec![stub.addr()];
            c.dns.timeout = Duration::from_secs(2);
            c.upstreams[0].addresses = vec![UpstreamAddress::new("missing.test", 80)];
            c.listeners[0].routes[0].max_retries = 0;
        })
        .await;
        let (parts, body) = get(&env, "/nxdomain").await;
        assert_tether_error(&parts, &body, 502, "upstream_dns_failed", "dns");
        let rec = env.record("/nxdomain").await;
        assert_record(&rec, 502, "dns", Outcome::UpstreamError);
        assert!(
            stub.queries().iter().any(|q| q.name == "missing.test"),
            "the stub was asked: {:?}",
            stub.queries()
        );
        env.stop().await;
    })
    .await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_502_at_tls() {
    bounded(Duration::from_secs(10), async {
        let other = TestPki::generate().unwrap();
        let env = Env::with(
            Down::H1,
            Up::H2Tls,
            routes(vec![("/tls", Behavior::ok("never"))]),
            |c| {
                c.upstreams[0].tls.as_mut().unwrap().ca = vec![other.ca_der()];
            },
        )
        .await;
        let (parts, body) = get(&env, "/tls").await;
        assert_tether_error(&parts, &body, 502, "upstream_tls_failed", "tls");
        let rec = env.record("/tls").await;
        assert_record(&rec, 502, "tls", Outcome::UpstreamError);
        assert!(env.log().requests("/tls").is_empty());
        env.stop().await;
    })
    .await;
}

/// No response head within the first-byte timeout: 504, and the upstream sees the request
/// abandoned on the wire (HTTP/1 EOF, HTTP/2 RST_STREAM(CANCEL)).
#[tokio::test]
async fn silent_upstream_is_504_at_first_byte_and_is_aborted() {
    bounded(Duration::from_secs(15), async {
        for up in [Up::H1, Up::H2c] {
            let env = Env::with(
                Down::H1,
                up,
                routes(vec![("/silent", Behavior::Never)]),
                |c| {
                    c.listeners[0].routes[0].timeouts.first_byte = Some(Duration::from_millis(300));
                },
            )
            .await;
            let mut client = env.http().await;
            let t0 = Instant::now();
            let (parts, body) = client.get("/silent").await.unwrap();
            let took = t0.elapsed();
            assert_tether_error(&parts, &body, 504, "upstream_timeout", "first_byte");
            assert!(
                took >= Duration::from_millis(290) && took < Duration::from_millis(1500),
                "{up:?}: answered after {took:?}"
            );
            let aborted = env
                .log()
                .wait_for(BOUND, |e| match up {
                    Up::H1 => e.path == "/silent" && e.kind.is_h1_close(),
                    _ => {
                        e.path == "/silent"
                            && e.kind
                                == EventKind::StreamReset {
                                    reason: Reason::CANCEL,
                                }
                    }
                })
                .await;
            assert!(
                aborted.is_some(),
                "{up:?}: upstream did not see the abort: {:?}",
                env.log().events()
            );
            assert!(!env.log().any(|e| e.kind == EventKind::HandlerCompleted));
            let rec = env.record("/silent").await;
            assert_record(&rec, 504, "first_byte", Outcome::Timeout);
            // No retry: the request reached the upstream's handler.
            assert_eq!(rec.retries, 0);
            env.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn reset_before_headers_is_502_upstream_reset() {
    bounded(Duration::from_secs(15), async {
        let cases = [
            (Up::H1, Ending::Rst),
            (Up::H1, Ending::Fin),
            (Up::H2c, Ending::StreamReset(Reason::INTERNAL_ERROR)),
        ];
        for (up, ending) in cases {
            let env = Env::new(
                Down::H1,
                up,
                routes(vec![("/hangup", Behavior::CloseBeforeHeaders(ending))]),
            )
            .await;
            let (parts, body) = get(&env, "/hangup").await;
            assert_tether_error(&parts, &body, 502, "upstream_reset", "first_byte");
            let rec = env.record("/hangup").await;
            assert_record(&rec, 502, "first_byte", Outcome::UpstreamError);
            assert_eq!(
                env.log().requests("/hangup").len(),
                1,
                "{up:?} {ending:?}: sent once"
            );
            env.stop().await;
        }
    })
    .await;
}

/// Once the head has gone downstream, an upstream failure can only end the response abnormally:
/// HTTP/1 without the final chunk or short of Content-Length, HTTP/2 with RST_STREAM.
#[tokio::test]
async fn reset_mid_body_ends_the_response_abnormally() {
    bounded(Duration::from_secs(20), async {
        for (up, length) in [(Up::H1, Some(1000)), (Up::H1, None), (Up::H2c, Some(1000))] {
            for down in [Down::H1, Down::H2c] {
                let ending = match up {
                    Up::H1 => Ending::Rst,
                    _ => Ending::StreamReset(Reason::INTERNAL_ERROR),
                };
                let env = Env::new(
                    down,
                    up,
                    routes(vec![(
                        "/cut",
                        Behavior::Truncate {
                            content_length: length,
                            sent: Bytes::from(vec![b'x'; 100]),
                            ending,
                        },
                    )]),
                )
                .await;
                let case = format!("{down:?} <- {up:?} (length {length:?})");
                match down {
                    Down::H1 => {
                        let mut c = env.h1().await;
                        c.send_request("GET", "/cut", &[], None, b"").await.unwrap();
                        let head = c.read_final_head().await.unwrap();
                        assert_eq!(head.status, 200, "{case}");
                        let body = c.read_body("GET", &head).await;
                        assert!(body.is_err(), "{case}: body ended cleanly: {body:?}");
                        assert!(head.header("proxy-status").is_none());
                    }
                    _ => {
                        let mut c = env.h2().await;
                        let mut s = c.start("GET", "/cut", &[], true).await.unwrap();
                        let parts = s.response().await.unwrap();
                        assert_eq!(parts.status, 200, "{case}");
                        let err = s.read_to_end().await.expect_err("stream must be reset");
                        assert_eq!(err.reason(), Some(Reason::INTERNAL_ERROR), "{case}: {err}");
                    }
                }
                let rec = env.record("/cut").await;
                assert_record(&rec, 200, "body", Outcome::UpstreamError);
                env.stop().await;
            }
        }
    })
    .await;
}

/// The route's total deadline passing before the response head: 504 at first_byte, the upstream
/// aborted, and the record's reason is `deadline`.
#[tokio::test]
async fn route_deadline_before_the_head_is_504_with_reason_deadline() {
    bounded(Duration::from_secs(10), async {
        let env = Env::with(
            Down::H1,
            Up::H1,
            routes(vec![("/slow", Behavior::Never)]),
            |c| {
                c.listeners[0].routes[0].timeouts.total = Some(Duration::from_millis(300));
            },
        )
        .await;
        let mut c: H1Client = env.h1().await;
        c.send_request("GET", "/slow", &[], None, b"")
            .await
            .unwrap();
        let head = c.read_final_head().await.unwrap();
        let body = c.read_body("GET", &head).await.unwrap();
        assert_eq!(head.status, 504, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["stage"], "first_byte");
        assert!(head.header("proxy-status").unwrap().starts_with("tether;"));
        let rec = env.record("/slow").await;
        assert_record(&rec, 504, "first_byte", Outcome::Timeout);
        assert_eq!(rec.abort_reason, Some(CancelReason::Deadline));
        assert!(
            env.log()
                .wait_for(BOUND, |e| e.path == "/slow" && e.kind.is_h1_close())
                .await
                .is_some()
        );
        env.stop().await;
    })
    .await;
}
