//! Limits and malformed input, through the proxy with raw sockets: what the client gets, and
//! that nothing is forwarded when the request must not reach the upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use common::{BOUND, Down, Env, Up, bounded};
use test_support::behavior::{Behavior, routes, script};
use test_support::client::{Closed, H1Client};
use test_support::{EventKind, Reply};
use tether_gateway::config::{AdminConfig, HashKey, Protocols, RateLimit};

fn no_request_reached(env: &Env) {
    let started = env
        .log()
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, EventKind::RequestStarted { .. }))
        .count();
    assert_eq!(
        started,
        0,
        "a request reached the upstream: {:?}",
        env.log().events()
    );
}

#[tokio::test]
async fn oversized_head_gets_431_and_nothing_is_forwarded() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/", Behavior::ok("x"))]),
        |c| {
            c.listeners[0].limits.max_header_bytes = 8192;
        },
    )
    .await;
    let mut c = H1Client::connect(env.addr).await.unwrap();
    let big = "a".repeat(16 * 1024);
    c.send_request("GET", "/", &[("x-big", &big)], None, b"")
        .await
        .unwrap();
    let head = bounded(BOUND, c.read_final_head()).await.unwrap();
    assert_eq!(head.status, 431);
    no_request_reached(&env);
    env.stop().await;
}

#[tokio::test]
async fn declared_body_over_limit_gets_413_json_and_nothing_is_forwarded() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/up", Behavior::Summary)]),
        |c| {
            c.listeners[0].limits.max_body_bytes = Some(1000);
        },
    )
    .await;
    let mut c = H1Client::connect(env.addr).await.unwrap();
    c.send_request("POST", "/up", &[], Some(5000), &[b'x'; 100])
        .await
        .unwrap();
    let head = bounded(BOUND, c.read_final_head()).await.unwrap();
    assert_eq!(head.status, 413);
    let body = bounded(BOUND, c.read_body("POST", &head)).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "request_too_large");
    assert_eq!(v["stage"], "request_body");
    no_request_reached(&env);
    let rec = env.record("/up").await;
    assert_eq!(rec.status, 413);
    env.stop().await;
}

/// A route's own `max_body_bytes` replaces the listener's: an upload route takes bodies the
/// listener's limit would refuse, a strict route refuses bodies it would take, declared or
/// streamed.
#[tokio::test]
async fn a_routes_body_limit_replaces_the_listeners() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![
            ("/upload", Behavior::Summary),
            ("/api", Behavior::Summary),
            ("/other", Behavior::Summary),
        ]),
        |c| {
            let l = &mut c.listeners[0];
            l.limits.max_body_bytes = Some(1000);
            let base = l.routes[0].clone();
            let mut upload = base.clone();
            upload.path_prefix = "/upload".into();
            upload.max_body_bytes = Some(10_000);
            let mut api = base;
            api.path_prefix = "/api".into();
            api.max_body_bytes = Some(100);
            l.routes.insert(0, api);
            l.routes.insert(0, upload);
        },
    )
    .await;
    for (path, len, status) in [
        ("/upload", 5000, 200),
        ("/upload", 20_000, 413),
        ("/api", 50, 200),
        ("/api", 500, 413),
        ("/other", 500, 200),
        ("/other", 5000, 413),
    ] {
        let mut c = H1Client::connect(env.addr).await.unwrap();
        c.send_request("POST", path, &[], Some(len), &vec![b'x'; len as usize])
            .await
            .ok();
        let head = bounded(BOUND, c.read_final_head()).await.unwrap();
        assert_eq!(head.status, status, "{path} with {len} bytes");
    }
    // Streamed (chunked) past the route's limit: cut, never complete upstream.
    let mut c = H1Client::connect(env.addr).await.unwrap();
    c.send_raw(b"POST /api HTTP/1.1\r\nhost: l\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let _ = c.send_raw(b"c8\r\n").await;
    let _ = c.send_raw(&[b'y'; 200]).await;
    let _ = c.send_raw(b"\r\n0\r\n\r\n").await;
    let head = bounded(BOUND, c.read_final_head()).await.unwrap();
    assert_eq!(head.status, 413);
    let completed = env
        .log()
        .events()
        .iter()
        .filter(|e| e.path == "/api" && matches!(e.kind, EventKind::BodyComplete { .. }))
        .count();
    assert_eq!(
        completed, 1,
        "only the 50-byte body reached the upstream whole"
    );
    env.stop().await;
}

#[tokio::test]
async fn chunked_body_over_limit_is_cut_and_never_completes_upstream() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/up", Behavior::Summary)]),
        |c| {
            c.listeners[0].limits.max_body_bytes = Some(1000);
        },
    )
    .await;
    let mut c = H1Client::connect(env.addr).await.unwrap();
    c.send_raw(b"POST /up HTTP/1.1\r\nhost: l\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let mut body = Vec::new();
    for _ in 0..4 {
        body.extend_from_slice(b"200\r\n");
        body.extend_from_slice(&[b'y'; 0x200]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    // tether may answer 413 and close as soon as the limit is passed, while this is still being
    // written: a failed write is part of the outcome, the answer is what is checked.
    let _ = c.send_raw(&body).await;
    let head = bounded(BOUND, c.read_final_head()).await.unwrap();
    assert_eq!(head.status, 413);
    // The upstream may have seen the start of the body, never its end.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !env.log()
            .any(|e| matches!(e.kind, EventKind::BodyComplete { .. })),
        "{:?}",
        env.log().events()
    );
    env.stop().await;
}

#[tokio::test]
async fn route_in_flight_limit_sheds_with_503_and_retry_after() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/slow", Behavior::stall_ms(600, "done"))]),
        |c| {
            c.listeners[0].routes[0].max_in_flight = NonZeroUsize::new(1);
        },
    )
    .await;
    let mut first = H1Client::connect(env.addr).await.unwrap();
    first
        .send_request("GET", "/slow", &[], None, b"")
        .await
        .unwrap();
    env.log().wait_request("/slow", BOUND).await.unwrap();
    let mut second = H1Client::connect(env.addr).await.unwrap();
    second
        .send_request("GET", "/slow", &[], None, b"")
        .await
        .unwrap();
    let head = bounded(BOUND, second.read_final_head()).await.unwrap();
    assert_eq!(head.status, 503);
    assert_eq!(head.header("retry-after"), Some("1"));
    assert!(head.header("proxy-status").unwrap().contains("admission"));
    let body = bounded(BOUND, second.read_body("GET", &head))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["stage"], "admission");
    // The first one completes, and then the route has room again.
    let head = bounded(BOUND, first.read_final_head()).await.unwrap();
    assert_eq!(head.status, 200);
    bounded(BOUND, first.read_body("GET", &head)).await.unwrap();
    let (head, _) = bounded(BOUND, second.get("/slow")).await.unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(env.log().requests("/slow").len(), 2);
    env.stop().await;
}

#[tokio::test]
async fn connection_limit_stops_accepting_until_one_closes() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/", Behavior::ok("hi"))]),
        |c| {
            c.listeners[0].limits.max_connections = NonZeroUsize::new(1);
        },
    )
    .await;
    let mut a = H1Client::connect(env.addr).await.unwrap();
    let (h, _) = bounded(BOUND, a.get("/")).await.unwrap();
    assert_eq!(h.status, 200);
    // Connects (the kernel's backlog) but is not served while `a` is open.
    let mut b = H1Client::connect(env.addr).await.unwrap();
    b.send_request("GET", "/", &[], None, b"").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.read_final_head())
            .await
            .is_err(),
        "a second connection was served beyond max_connections = 1"
    );
    drop(a);
    let head = bounded(BOUND, b.read_final_head()).await.unwrap();
    assert_eq!(head.status, 200);
    env.stop().await;
}

/// A reload that changes `max_connections` counts the connections already open: lowered below
/// them, no new connection is served until enough have closed; raised, new ones are served at
/// once.
#[tokio::test]
async fn a_reload_changing_the_connection_limit_counts_the_open_connections() {
    let mut env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/", Behavior::ok("hi"))]),
        |c| c.listeners[0].limits.max_connections = NonZeroUsize::new(2),
    )
    .await;
    let served = async |c: &mut H1Client| {
        c.send_request("GET", "/", &[], None, b"").await.unwrap();
        let head = bounded(BOUND, c.read_final_head()).await.unwrap();
        assert_eq!(head.status, 200);
    };
    let mut a = H1Client::connect(env.addr).await.unwrap();
    let mut b = H1Client::connect(env.addr).await.unwrap();
    served(&mut a).await;
    served(&mut b).await;
    env.reload(|c| c.listeners[0].limits.max_connections = NonZeroUsize::new(1));
    drop(a);
    // `b` is still open, and the limit is 1 now.
    let mut c = H1Client::connect(env.addr).await.unwrap();
    c.send_request("GET", "/", &[], None, b"").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.read_final_head())
            .await
            .is_err(),
        "served beyond the lowered limit"
    );
    drop(b);
    let head = bounded(BOUND, c.read_final_head()).await.unwrap();
    assert_eq!(head.status, 200);
    env.reload(|c| c.listeners[0].limits.max_connections = NonZeroUsize::new(3));
    let mut d = H1Client::connect(env.addr).await.unwrap();
    let mut e = H1Client::connect(env.addr).await.unwrap();
    served(&mut d).await;
    served(&mut e).await;
    env.stop().await;
}

#[tokio::test]
async fn slow_head_is_closed_after_the_header_read_timeout() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/", Behavior::ok("hi"))]),
        |c| {
            c.listeners[0].limits.header_read_timeout = Duration::from_millis(300);
        },
    )
    .await;
    let mut c = H1Client::connect(env.addr).await.unwrap();
    c.send_raw(b"GET / HTTP/1.1\r\nhost: l\r\nx-slow: ")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    // The connection is closed without a response (no 408).
    let closed = c.wait_closed(Duration::from_secs(3)).await;
    assert_ne!(closed, Closed::StillOpen);
    assert!(started.elapsed() < Duration::from_secs(2));
    no_request_reached(&env);
    env.stop().await;
}

/// Slowloris: a head trickled slower than the header read timeout is cut off within the bound
/// while another client is served, and is recorded (access-log line with status 408, counter).
/// Connections that are merely idle (before the first request, or kept alive after one) are
/// closed by the same timer without a 408.
#[tokio::test]
async fn trickled_head_is_closed_and_logged_as_408_while_others_are_served() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/", Behavior::ok("hi"))]),
        |c| {
            c.listeners[0].limits.header_read_timeout = Duration::from_millis(400);
            // HTTP/1 only: hyper, not the protocol sniffer, sees the silent connection.
            c.listeners[0].protocols = Protocols {
                http1: true,
                h2: false,
            };
            c.admin = Some(AdminConfig {
                address: "127.0.0.1:0".parse().unwrap(),
            });
        },
    )
    .await;
    // Idle connections: one that never sends, one kept alive after a request.
    let mut silent = H1Client::connect(env.addr).await.unwrap();
    let mut kept = H1Client::connect(env.addr).await.unwrap();
    let (head, _) = bounded(BOUND, kept.get("/")).await.unwrap();
    assert_eq!(head.status, 200);

    let mut slow = H1Client::connect(env.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let head = b"GET /slow HTTP/1.1\r\nhost: l\r\nx-slow: 0123456789abcdef\r\n\r\n";
    let trickle = async {
        // A byte every 50 ms: the whole head would take about 2.5 s.
        for b in head.chunks(1) {
            if slow.send_raw(b).await.is_err() {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the whole trickled head was accepted");
    };
    let served = async {
        // Others are served meanwhile.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = env.http().await;
        let (parts, body) = c.get("/").await.unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(&body[..], b"hi");
        started.elapsed()
    };
    let (cut, other) = bounded(BOUND, async { tokio::join!(trickle, served) }).await;
    assert!(
        other < Duration::from_millis(400),
        "other client took {other:?}"
    );
    let closed = slow.wait_closed(Duration::from_secs(2)).await;
    assert_ne!(closed, Closed::StillOpen);
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(350) && closed_after < Duration::from_millis(1500),
        "closed after {closed_after:?} (writes failed after {cut:?}), header timeout 400ms"
    );

    // The idle ones are closed by the same timer.
    assert_ne!(
        silent.wait_closed(Duration::from_secs(2)).await,
        Closed::StillOpen
    );
    assert_ne!(
        kept.wait_closed(Duration::from_secs(2)).await,
        Closed::StillOpen
    );

    // Exactly one 408: the slow head, at stage request_head.
    let rec = env.record("").await;
    assert_eq!(rec.status, 408);
    assert_eq!(rec.stage, Some("request_head"));
    assert_eq!(rec.outcome.as_str(), "timeout");
    assert!(
        rec.duration >= Duration::from_millis(300),
        "{:?}",
        rec.duration
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let all: Vec<u16> = env.access.records().iter().map(|r| r.status).collect();
    assert_eq!(all.iter().filter(|&&s| s == 408).count(), 1, "{all:?}");
    let text = env.metrics_text().unwrap();
    assert_eq!(
        common::metric(&text, "tether_header_read_timeouts_total "),
        Some(1.0),
        "{text}"
    );
    env.stop().await;
}

/// Raw requests that must be refused (400, or the connection closed) without reaching the
/// upstream.
#[tokio::test]
async fn smuggling_vectors_get_400_and_are_not_forwarded() {
    let cases: &[(&str, &[u8])] = &[
        (
            "duplicate differing content-length",
            b"POST / HTTP/1.1\r\nhost: l\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        ),
        (
            "bad chunk size",
            b"POST / HTTP/1.1\r\nhost: l\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nhost: l\r\nx-a: one\r\n two\r\n\r\n",
        ),
        (
            "invalid header byte",
            b"GET / HTTP/1.1\r\nhost: l\r\nx-a: a\x01b\r\n\r\n",
        ),
        (
            "space before colon",
            b"GET / HTTP/1.1\r\nhost: l\r\ncontent-length : 5\r\n\r\nhello",
        ),
        (
            "non-chunked final transfer-encoding",
            b"POST / HTTP/1.1\r\nhost: l\r\ntransfer-encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ),
        (
            "transfer-encoding on HTTP/1.0",
            b"POST / HTTP/1.0\r\nhost: l\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "negative content-length",
            b"POST / HTTP/1.1\r\nhost: l\r\ncontent-length: -1\r\n\r\n",
        ),
    ];
    let env = Env::new(
        Down::H1,
        Up::H1,
        script(|_| Behavior::Respond(Reply::ok("forwarded"))),
    )
    .await;
    for (name, raw) in cases {
        let mut c = H1Client::connect(env.addr).await.unwrap();
        c.send_raw(raw).await.unwrap();
        match tokio::time::timeout(BOUND, c.read_final_head()).await {
            Ok(Ok(h)) => {
                // A chunk-size error is found only once the body is read, after the upstream
                // request started: then the upstream must see the body abort, never complete.
                if h.status != 400 {
                    assert!(
                        *name == "bad chunk size" && h.status >= 400,
                        "{name}: got {}",
                        h.status
                    );
                }
            }
            Ok(Err(_)) => {} // closed without a response
            Err(_) => panic!("{name}: no answer and the connection stayed open"),
        }
        assert_ne!(
            c.wait_closed(BOUND).await,
            Closed::StillOpen,
            "{name}: connection left open"
        );
        let forwarded_complete = env.log().any(|e| {
            matches!(
                e.kind,
                EventKind::BodyComplete { .. } | EventKind::HandlerCompleted
            )
        });
        assert!(
            !forwarded_complete,
            "{name}: forwarded: {:?}",
            env.log().events()
        );
    }
    env.stop().await;
}

/// Content-Length together with Transfer-Encoding: hyper decodes the body as chunked, drops the
/// Content-Length and closes the connection after the response (RFC 9112 §6.1). The upstream
/// must see one unambiguous framing: never both headers.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_never_forwarded_ambiguously() {
    let env = Env::new(Down::H1, Up::H1, routes(vec![("/up", Behavior::Summary)])).await;
    let mut c = H1Client::connect(env.addr).await.unwrap();
    c.send_raw(
        b"POST /up HTTP/1.1\r\nhost: l\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let head = bounded(BOUND, c.read_final_head()).await.unwrap();
    if head.status == 200 {
        let body = bounded(BOUND, c.read_body("POST", &head)).await.unwrap();
        assert!(body.starts_with(b"5 "), "upstream saw {body:?}");
        for (_, headers) in env.log().requests("/up") {
            let cl = headers.iter().any(|(n, _)| n == "content-length");
            let te = headers.iter().any(|(n, _)| n == "transfer-encoding");
            assert!(!(cl && te), "forwarded both framings: {headers:?}");
        }
    } else {
        assert_eq!(head.status, 400);
        no_request_reached(&env);
    }
    assert_ne!(c.wait_closed(BOUND).await, Closed::StillOpen);
    env.stop().await;
}

/// HTTP/2 requests with broken pseudo-headers are refused by the h2 layer (stream reset or
/// 400) and never forwarded.
#[tokio::test]
async fn h2_pseudo_header_abuse_is_not_forwarded() {
    let env = Env::new(
        Down::H2c,
        Up::H1,
        script(|_| Behavior::Respond(Reply::ok("forwarded"))),
    )
    .await;
    // A connect-like request without :authority, and a request whose :path is empty, built with
    // the raw h2 client (http's builder refuses most abuse itself, so use what it lets through).
    let tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = http::Request::builder()
        .method("CONNECT")
        .uri("/nope")
        .body(())
        .unwrap();
    if let Ok((resp, _)) = send.send_request(req, true) {
        // A reset is fine too.
        if let Ok(r) = bounded(BOUND, resp).await {
            assert!(r.status().is_client_error(), "{:?}", r.status());
        }
    }
    let req = http::Request::builder()
        .method("GET")
        .uri("http://l/ok")
        .header("connection", "keep-alive")
        .body(())
        .unwrap();
    // Connection-specific headers are forbidden in HTTP/2; the client library may refuse it.
    if let Ok(mut s) = send.clone().ready().await
        && let Ok((resp, _)) = s.send_request(req, true)
        && let Ok(r) = bounded(BOUND, resp).await
    {
        assert!(r.status().is_client_error(), "{:?}", r.status());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    no_request_reached(&env);
    conn.abort();
    env.stop().await;
}

/// `GET /` on `c` as the client `xff` names (through a trusted peer); the status, `Retry-After`
/// and body.
async fn get_as(c: &mut H1Client, xff: &str) -> (u16, Option<String>, bytes::Bytes) {
    c.send_request("GET", "/", &[("x-forwarded-for", xff)], None, b"")
        .await
        .unwrap();
    let head = bounded(BOUND, c.read_final_head()).await.unwrap();
    let body = bounded(BOUND, c.read_body("GET", &head)).await.unwrap();
    let retry_after = head.header("retry-after").map(str::to_owned);
    (head.status, retry_after, body)
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_its_own_wait_and_other_clients_do_not() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/", Behavior::ok("hi"))]),
        |c| {
            let l = &mut c.listeners[0];
            l.trusted_peers = vec!["127.0.0.1".parse().unwrap()];
            // One request an hour, and two more at once.
            l.routes[0].rate_limit = Some(RateLimit {
                requests: 1,
                per: Duration::from_secs(3600),
                burst: 2,
                queue: 0,
                key: None,
            });
            c.admin = Some(AdminConfig {
                address: "127.0.0.1:0".parse().unwrap(),
            });
        },
    )
    .await;
    let mut c = H1Client::connect(env.addr).await.unwrap();
    for _ in 0..3 {
        assert_eq!(get_as(&mut c, "192.0.2.1").await.0, 200);
    }
    let (status, retry_after, body) = get_as(&mut c, "192.0.2.1").await;
    assert_eq!(status, 429);
    // The next request of this client is allowed in an hour.
    assert_eq!(retry_after.as_deref(), Some("3600"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (&v["error"], &v["stage"]),
        (&"rate_limited".into(), &"admission".into())
    );
    assert_eq!(
        env.log().requests("/").len(),
        3,
        "a refused request reached the upstream"
    );

    // Another client behind the same proxy has its own allowance; the proxy's own address
    // (trusted) is looked past.
    assert_eq!(get_as(&mut c, "192.0.2.2, 127.0.0.1").await.0, 200);
    // IPv6 clients count by their /64.
    for _ in 0..3 {
        assert_eq!(get_as(&mut c, "2001:db8::1").await.0, 200);
    }
    assert_eq!(get_as(&mut c, "2001:db8::ffff").await.0, 429);
    assert_eq!(get_as(&mut c, "2001:db8:0:1::1").await.0, 200);
    let metrics = env.metrics_text().unwrap();
    assert!(
        metrics.contains("tether_rate_limited_total{route=\"up\"} 2"),
        "{metrics}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_route_serves_only_the_clients_it_allows_and_not_those_it_denies() {
    let mut env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/", Behavior::ok("hi"))]),
        |c| {
            let l = &mut c.listeners[0];
            l.trusted_peers = vec!["127.0.0.1".parse().unwrap()];
            l.routes[0].allow_clients = vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ];
            l.routes[0].deny_clients = vec!["10.6.6.6".parse().unwrap()];
            c.admin = Some(AdminConfig {
                address: "127.0.0.1:0".parse().unwrap(),
            });
        },
    )
    .await;
    let mut c = H1Client::connect(env.addr).await.unwrap();
    // Behind the trusted proxy (127.0.0.1), the client is the address it forwarded.
    assert_eq!(get_as(&mut c, "10.1.2.3").await.0, 200);
    assert_eq!(get_as(&mut c, "2001:db8::7, 127.0.0.1").await.0, 200);
    let (status, _, body) = get_as(&mut c, "10.6.6.6").await;
    assert_eq!(status, 403, "a denied client inside an allowed network");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (&v["error"], &v["stage"]),
        (&"forbidden".into(), &"admission".into())
    );
    assert_eq!(get_as(&mut c, "192.0.2.1").await.0, 403);
    // The proxy forwarding no one is the client itself, and not allowed.
    c.send_request("GET", "/", &[], None, b"").await.unwrap();
    let head = bounded(BOUND, c.read_final_head()).await.unwrap();
    assert_eq!(head.status, 403);
    bounded(BOUND, c.read_body("GET", &head)).await.unwrap();
    assert_eq!(
        env.log().requests("/").len(),
        2,
        "a refused request reached the upstream"
    );
    let metrics = env.metrics_text().unwrap();
    assert!(
        metrics.contains("tether_client_denied_total{route=\"up\"} 3"),
        "{metrics}"
    );

    // From a peer that is not trusted, a forwarded address is not believed.
    env.reload(|c| c.listeners[0].trusted_peers.clear());
    let mut c = H1Client::connect(env.addr).await.unwrap();
    assert_eq!(get_as(&mut c, "10.1.2.3").await.0, 403);
    env.stop().await;
}

#[tokio::test]
async fn a_reload_that_keeps_a_rate_limit_keeps_what_clients_have_used() {
    let mut env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/", Behavior::ok("hi"))]),
        |c| {
            c.listeners[0].routes[0].rate_limit = Some(RateLimit {
                requests: 1,
                per: Duration::from_secs(3600),
                burst: 0,
                queue: 0,
                key: None,
            });
        },
    )
    .await;
    let mut c = H1Client::connect(env.addr).await.unwrap();
    assert_eq!(get_as(&mut c, "-").await.0, 200);
    // A reload that changes something else: the client's allowance stays spent.
    env.reload(|c| c.listeners[0].routes[0].timeouts.total = Some(Duration::from_secs(20)));
    let mut c = H1Client::connect(env.addr).await.unwrap();
    assert_eq!(get_as(&mut c, "-").await.0, 429);
    // A reload that changes the limit starts it afresh.
    env.reload(|c| {
        if let Some(rl) = &mut c.listeners[0].routes[0].rate_limit {
            rl.requests = 2;
        }
    });
    let mut c = H1Client::connect(env.addr).await.unwrap();
    assert_eq!(get_as(&mut c, "-").await.0, 200);
    env.stop().await;
}

/// A rate limit counted by an API key: each key has its own allowance, whatever address its
/// requests come from, and a request without a key is counted by its client's address.
#[tokio::test]
async fn a_rate_limit_by_key_counts_each_key_apart_and_keyless_requests_by_address() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/", Behavior::ok("hi"))]),
        |c| {
            c.listeners[0].routes[0].rate_limit = Some(RateLimit {
                requests: 1,
                per: Duration::from_secs(3600),
                burst: 0,
                queue: 0,
                key: Some(HashKey::Header("x-api-key".into())),
            });
        },
    )
    .await;
    let mut c = H1Client::connect(env.addr).await.unwrap();
    let mut get = async |headers: &[(&str, &str)]| {
        c.send_request("GET", "/", headers, None, b"")
            .await
            .unwrap();
        let head = bounded(BOUND, c.read_final_head()).await.unwrap();
        bounded(BOUND, c.read_body("GET", &head)).await.unwrap();
        head.status
    };
    assert_eq!(get(&[("x-api-key", "alpha")]).await, 200);
    assert_eq!(get(&[("x-api-key", "alpha")]).await, 429);
    // Another key from the same address has its own allowance.
    assert_eq!(get(&[("x-api-key", "beta")]).await, 200);
    // No key: the address, which has used nothing yet.
    assert_eq!(get(&[]).await, 200);
    assert_eq!(get(&[]).await, 429);
    assert_eq!(get(&[("x-api-key", "beta")]).await, 429);
    env.stop().await;
}

#[tokio::test]
async fn an_untrusted_client_cannot_escape_its_rate_limit_by_claiming_to_forward() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(vec![("/", Behavior::ok("hi"))]),
        |c| {
            c.listeners[0].routes[0].rate_limit = Some(RateLimit {
                requests: 1,
                per: Duration::from_secs(3600),
                burst: 1,
                queue: 0,
                key: None,
            });
        },
    )
    .await;
    let mut c = H1Client::connect(env.addr).await.unwrap();
    assert_eq!(get_as(&mut c, "192.0.2.1").await.0, 200);
    assert_eq!(get_as(&mut c, "192.0.2.2").await.0, 200);
    assert_eq!(get_as(&mut c, "192.0.2.3").await.0, 429);
    env.stop().await;
}

/// Waits until the counter `line` (name and labels) reads `n`.
async fn wait_counter(env: &Env, line: &str, n: f64) {
    bounded(BOUND, async {
        while common::metric(&env.metrics_text().unwrap(), line) != Some(n) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

const DELAYED: &str = "tether_rate_delayed_total{route=\"up\"}";

/// Sends `GET path` on a connection of its own, as the client `xff` names.
async fn send_as(env: &Env, path: &str, xff: &str) -> H1Client {
    let mut c = H1Client::connect(env.addr).await.unwrap();
    c.send_request("GET", path, &[("x-forwarded-for", xff)], None, b"")
        .await
        .unwrap();
    c
}

/// With `queue`, requests over the rate wait for their turn instead of being refused (nginx's
/// `limit_req` without `nodelay`): the upstream sees them one interval apart, and a request
/// beyond the queue gets 429.
#[tokio::test]
async fn requests_over_the_rate_wait_their_turn_up_to_the_queue() {
    let env = Env::with(
        Down::H1,
        Up::H1,
        routes(
            ["/a", "/b", "/c", "/d"]
                .map(|p| (p, Behavior::ok("hi")))
                .to_vec(),
        ),
        |c| {
            let l = &mut c.listeners[0];
            l.trusted_peers = vec!["127.0.0.1".parse().unwrap()];
            // 5 a second: one every 200 ms, and two more waiting.
            l.routes[0].rate_limit = Some(RateLimit {
                requests: 5,
                per: Duration::from_secs(1),
                burst: 0,
                queue: 2,
                key: None,
            });
            c.admin = Some(AdminConfig {
                address: "127.0.0.1:0".parse().unwrap(),
            });
        },
    )
    .await;
    let mut a = send_as(&env, "/a", "192.0.2.1").await;
    let head = bounded(BOUND, a.read_final_head()).await.unwrap();
    assert_eq!(head.status, 200);
    let mut b = send_as(&env, "/b", "192.0.2.1").await;
    wait_counter(&env, DELAYED, 1.0).await;
    let mut c = send_as(&env, "/c", "192.0.2.1").await;
    wait_counter(&env, DELAYED, 2.0).await;
    // The queue is full: the next one is refused at once.
    let mut d = send_as(&env, "/d", "192.0.2.1").await;
    let head = bounded(BOUND, d.read_final_head()).await.unwrap();
    assert_eq!(head.status, 429);
    // A place in the queue comes free within the second.
    assert_eq!(head.header("retry-after"), Some("1"));
    // Another client is not held back by this one's queue.
    let mut other = send_as(&env, "/d", "192.0.2.2").await;
    let head = bounded(BOUND, other.read_final_head()).await.unwrap();
    assert_eq!(head.status, 200);
    for w in [&mut b, &mut c] {
        let head = bounded(BOUND, w.read_final_head()).await.unwrap();
        assert_eq!(head.status, 200);
    }
    let started = |path: &str| {
        let ev = env.log().events();
        ev.iter()
            .find(|e| e.path == path && matches!(e.kind, EventKind::RequestStarted { .. }))
            .map(|e| e.at)
            .unwrap()
    };
    // Each reached the upstream at its slot, 200 ms after the one before (less a little: the
    // first slot ran from the first request's arrival, a moment before the upstream saw it).
    let (ta, tb, tc) = (started("/a"), started("/b"), started("/c"));
    assert!(tb - ta >= Duration::from_millis(150), "{:?}", tb - ta);
    assert!(tc - tb >= Duration::from_millis(150), "{:?}", tc - tb);
    let waited = env.record("/c").await.queued.unwrap();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert_eq!(env.record("/a").await.queued, None);
    let metrics = env.metrics_text().unwrap();
    assert_eq!(
        common::metric(&metrics, "tether_rate_limited_total{route=\"up\"}"),
        Some(1.0)
    );
    env.stop().await;
}

/// A request waiting its turn ends when its client leaves: logged 499 at stage `admission`,
/// nothing sent upstream, and its slot given back to the client's next request. One whose
/// deadline would pass before its slot is refused at once.
#[tokio::test]
async fn a_client_leaving_the_rate_queue_gives_its_slot_back() {
    let mut env = Env::with(
        Down::H1,
        Up::H1,
        routes(
            ["/a", "/b", "/c", "/d"]
                .map(|p| (p, Behavior::ok("hi")))
                .to_vec(),
        ),
        |c| {
            c.listeners[0].routes[0].rate_limit = Some(RateLimit {
                requests: 1,
                per: Duration::from_secs(60),
                burst: 0,
                queue: 1,
                key: None,
            });
            c.admin = Some(AdminConfig {
                address: "127.0.0.1:0".parse().unwrap(),
            });
        },
    )
    .await;
    let mut a = send_as(&env, "/a", "-").await;
    assert_eq!(
        bounded(BOUND, a.read_final_head()).await.unwrap().status,
        200
    );
    // Waits a minute for its slot; its client leaves.
    let b = send_as(&env, "/b", "-").await;
    wait_counter(&env, DELAYED, 1.0).await;
    drop(b);
    let rec = env.record("/b").await;
    assert_eq!(
        (rec.status, rec.stage, rec.abort_reason),
        (
            499,
            Some("admission"),
            Some(tether::CancelReason::ClientClosed)
        )
    );
    assert!(rec.queued.is_some());
    // The slot is free again: the next request waits for it rather than being refused (the
    // queue holds one).
    let c = send_as(&env, "/c", "-").await;
    wait_counter(&env, DELAYED, 2.0).await;
    drop(c);
    assert_eq!(env.record("/c").await.status, 499);
    // With a 2 s deadline, a minute's wait is pointless: 429 at once, the slot given back.
    env.reload(|c| c.listeners[0].routes[0].timeouts.total = Some(Duration::from_secs(2)));
    let mut d = send_as(&env, "/d", "-").await;
    let head = bounded(BOUND, d.read_final_head()).await.unwrap();
    assert_eq!(head.status, 429);
    assert_eq!(head.header("retry-after"), Some("60"));
    for path in ["/b", "/c", "/d"] {
        assert!(
            env.log().requests(path).is_empty(),
            "{path} reached the upstream"
        );
    }
    env.stop().await;
}
