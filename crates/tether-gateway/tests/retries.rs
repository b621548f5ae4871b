//! Retries on real sockets: what may be sent again (never a POST that reached the upstream; a GET
//! answered with a configured status), how many (the retry budget holds retries to a fraction of
//! requests under total failure), and when (backoff grows between attempts).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use http::Method;
use test_support::DnsStub;
use test_support::behavior::{Behavior, Ending, Reply, routes, script};
use test_support::client::full;
use tether_gateway::config::UpstreamAddress;
use tether_gateway::observe::access::Outcome;

/// A POST that reached the upstream is never sent twice, even when the upstream resets before
/// answering on a reused keep-alive connection (the case that looks like a stale connection).
#[tokio::test]
async fn post_is_not_retried_once_sent() {
    bounded(Duration::from_secs(10), async {
        let env = Env::new(
            Down::H1,
            Up::H1,
            routes(vec![
                ("/warm", Behavior::ok("warm")),
                ("/post", Behavior::CloseBeforeHeaders(Ending::Rst)),
            ]),
        )
        .await;
        let mut client = env.http().await;
        // Fills the pool, so the POST goes out on a reused connection.
        let (p, _) = client.get("/warm").await.unwrap();
        assert_eq!(p.status, 200);
        for body in ["", "payload"] {
            let req = client
                .request(Method::POST, "/post")
                .body(full(body))
                .unwrap();
            let (parts, _, _) = client.fetch(req).await.unwrap();
            assert_eq!(parts.status, 502, "body {body:?}");
            assert!(parts.headers.contains_key("proxy-status"));
        }
        let recs = env.records("/post");
        assert_eq!(recs.len(), 2);
        assert!(recs.iter().all(|r| r.retries == 0), "{recs:?}");
        assert_eq!(recs[0].upstream_reused, Some(true), "{:?}", recs[0]);
        // Exactly one upstream request per POST.
        assert_eq!(env.log().requests("/post").len(), 2);
        env.stop().await;
    })
    .await;
}

/// A GET answered 503 is sent again when the route lists 503; a POST answered 503 is not, and
/// the origin's 503 reaches the client unmarked.
#[tokio::test]
async fn get_is_retried_on_a_configured_status_post_is_not() {
    bounded(Duration::from_secs(10), async {
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let env = Env::with(
            Down::H1,
            Up::H1,
            script(move |req| {
                if req.path == "/flaky" && counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    Behavior::Respond(Reply::new(503, "busy"))
                } else if req.path == "/flaky" {
                    Behavior::ok("second time lucky")
                } else {
                    Behavior::Respond(Reply::new(503, "busy"))
                }
            }),
            |c| c.listeners[0].routes[0].retry_statuses = vec![503],
        )
        .await;
        let mut client = env.http().await;
        let (parts, body) = client.get("/flaky").await.unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(&body[..], b"second time lucky");
        assert_eq!(env.log().requests("/flaky").len(), 2);
        let rec = env.record("/flaky").await;
        assert_eq!((rec.retries, rec.outcome), (1, Outcome::Ok), "{rec:?}");

        let req = client
            .request(Method::POST, "/busy")
            .body(full(""))
            .unwrap();
        let (parts, body, _) = client.fetch(req).await.unwrap();
        assert_eq!(parts.status, 503);
        assert_eq!(&body[..], b"busy");
        assert!(!parts.headers.contains_key("proxy-status"));
        assert_eq!(env.log().requests("/busy").len(), 1);
        assert_eq!(env.record("/busy").await.retries, 0);
        env.stop().await;
    })
    .await;
}

/// A PUT with a small body answered 503 is sent again, body and all (it was read whole before
/// the first send); one whose body is over the route's `retry_body_bytes` streams, and its 503
/// reaches the client.
#[tokio::test]
async fn a_put_with_a_small_body_is_retried_on_a_configured_status_a_larger_one_is_not() {
    bounded(Duration::from_secs(10), async {
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let env = Env::with(
            Down::H1,
            Up::H1,
            script(move |_| {
                if counter.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                    Behavior::Respond(Reply::new(503, "busy"))
                } else {
                    Behavior::Summary
                }
            }),
            |c| {
                let r = &mut c.listeners[0].routes[0];
                r.retry_statuses = vec![503];
                r.retry_body_bytes = 16;
            },
        )
        .await;
        let mut client = env.http().await;
        let mut sum = test_support::Checksum::new();
        sum.update(b"payload");
        let req = client
            .request(Method::PUT, "/small")
            .body(full("payload"))
            .unwrap();
        let (parts, body, _) = client.fetch(req).await.unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(body, format!("7 {}", sum.value()).as_bytes());
        assert_eq!(env.log().requests("/small").len(), 2);
        let rec = env.record("/small").await;
        assert_eq!((rec.retries, rec.bytes_received), (1, 7), "{rec:?}");

        let large = "x".repeat(17);
        let req = client
            .request(Method::PUT, "/large")
            .body(full(large))
            .unwrap();
        let (parts, body, _) = client.fetch(req).await.unwrap();
        assert_eq!((parts.status.as_u16(), &body[..]), (503, &b"busy"[..]));
        assert_eq!(env.log().requests("/large").len(), 1);
        assert_eq!(env.record("/large").await.retries, 0);
        env.stop().await;
    })
    .await;
}

/// A client that leaves while its PUT's small body is being read whole: nothing reached the
/// upstream, not even a connection, and the abort is logged at stage `request_body`.
#[tokio::test]
async fn a_client_leaving_while_its_body_is_read_whole_costs_the_upstream_nothing() {
    bounded(Duration::from_secs(10), async {
        let env = Env::new(Down::H1, Up::H1, routes(vec![("/put", Behavior::Summary)])).await;
        let mut c = env.h1().await;
        c.send_request("PUT", "/put", &[], Some(100), b"only ten..")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.rst().unwrap();
        let rec = env.record("/put").await;
        assert_eq!(
            (rec.outcome, rec.stage, rec.bytes_received),
            (Outcome::ClientAbort, Some("request_body"), 10),
            "{rec:?}"
        );
        assert_eq!(rec.abort_reason, Some(tether::CancelReason::ClientReset));
        assert!(env.log().events().is_empty(), "{:?}", env.log().events());
        env.stop().await;
    })
    .await;
}

/// Under 100 % failure, a budget of 10 % (and no per-second floor) holds retries to a tenth of
/// the requests, however many attempts each request would be allowed.
#[tokio::test]
async fn retry_budget_holds_retries_to_the_ratio() {
    bounded(Duration::from_secs(20), async {
        const N: usize = 200;
        let env = Env::with(
            Down::H1,
            Up::H1,
            routes(vec![("/down", Behavior::Respond(Reply::new(503, "down")))]),
            |c| {
                let r = &mut c.listeners[0].routes[0];
                r.retry_statuses = vec![503];
                r.max_retries = 2;
                r.retry_budget_ratio = 0.1;
                r.retry_budget_min_per_second = 0;
            },
        )
        .await;
        let mut client = env.http().await;
        for _ in 0..N {
            let (parts, _) = client.get("/down").await.unwrap();
            assert_eq!(parts.status, 503);
        }
        let sent = env.log().requests("/down").len();
        let retries = sent - N;
        let logged: u32 = env.records("/down").iter().map(|r| r.retries).sum();
        eprintln!("retry budget: {N} requests, {retries} retries");
        assert_eq!(logged as usize, retries);
        assert!(
            (N / 10 - 2..=N / 10).contains(&retries),
            "{retries} retries for {N} requests with a 10 % budget"
        );
        env.stop().await;
    })
    .await;
}

/// The pause before each retry grows (exponential backoff). Connect failures are retried; each
/// attempt resolves the name afresh (the stub answers with TTL 0), so the stub's query times are
/// the attempt times.
#[tokio::test]
async fn backoff_grows_between_connect_attempts() {
    bounded(Duration::from_secs(10), async {
        let refused = refused_addr();
        let stub = DnsStub::start(&[("refused.test", vec![refused.ip()])])
            .await
            .unwrap();
        let env = Env::with(Down::H1, Up::H1, routes(vec![]), |c| {
            c.dns.nameservers = vec![stub.addr()];
            c.upstreams[0].addresses = vec![UpstreamAddress::new("refused.test", refused.port())];
            let r = &mut c.listeners[0].routes[0];
            r.max_retries = 3;
            r.retry_budget_min_per_second = 100;
        })
        .await;
        let mut client = env.http().await;
        let (parts, _) = client.get("/backoff").await.unwrap();
        assert_eq!(parts.status, 502);
        assert_eq!(env.record("/backoff").await.retries, 3);
        let times: Vec<_> = stub
            .queries()
            .iter()
            .filter(|q| q.name == "refused.test" && q.qtype == 1)
            .map(|q| q.at)
            .collect();
        assert_eq!(
            times.len(),
            4,
            "one lookup per attempt: {:?}",
            stub.queries()
        );
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        eprintln!("backoff gaps: {gaps:?}");
        assert!(gaps[0] >= Duration::from_millis(20), "{gaps:?}");
        assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "{gaps:?}");
        env.stop().await;
    })
    .await;
}

/// An HTTP/2 upstream that stops taking streams on a pooled connection, by refusing the stream
/// (RST_STREAM REFUSED_STREAM: not processed) or by going away (GOAWAY, then close): a GET sent
/// there is resent and succeeds; the client never sees the failure. After a refusal a POST is
/// resent too, bodiless or with a small body read whole first (the upstream did not process
/// it); after a GOAWAY whose last stream id includes its stream (it may have been processed), a
/// POST is not, and the client gets a 502.
#[tokio::test]
async fn h2_upstream_refusing_or_going_away_on_a_pooled_connection_is_resent() {
    for ending in [
        Ending::StreamReset(h2::Reason::REFUSED_STREAM),
        Ending::GoAway(h2::Reason::NO_ERROR),
    ] {
        for (method, body) in [
            (Method::GET, ""),
            (Method::POST, ""),
            (Method::POST, "order=7"),
        ] {
            bounded(Duration::from_secs(10), async {
                let first = Arc::new(AtomicUsize::new(0));
                let seen = first.clone();
                let env = Env::new(
                    Down::H1,
                    Up::H2c,
                    script(move |req| match req.path.as_str() {
                        "/warm" => Behavior::ok("warm"),
                        // Only the first attempt is turned away.
                        "/stale" if seen.fetch_add(1, Ordering::SeqCst) == 0 => {
                            Behavior::CloseBeforeHeaders(ending)
                        }
                        _ => Behavior::ok("fresh"),
                    }),
                )
                .await;
                let case = format!("{ending:?} {method} {body:?}");
                let mut client = env.http().await;
                let (p, _) = client.get("/warm").await.unwrap();
                assert_eq!(p.status, 200);
                let req = client
                    .request(method.clone(), "/stale")
                    .body(full(body))
                    .unwrap();
                let (p, answer, _) = client.fetch(req).await.unwrap();
                if matches!(ending, Ending::GoAway(_)) && method == Method::POST {
                    assert_eq!(p.status, 502, "{case}");
                    assert_eq!(env.record("/stale").await.retries, 0, "{case}");
                    assert_eq!(env.log().requests("/stale").len(), 1, "{case}");
                    env.stop().await;
                    return;
                }
                assert_eq!(p.status, 200, "{case}");
                assert_eq!(&answer[..], b"fresh", "{case}");
                let rec = env.record("/stale").await;
                assert_eq!(rec.retries, 1, "{case}: {rec:?}");
                assert_eq!(first.load(Ordering::SeqCst), 2, "{case}");
                // The resend carried the whole body.
                if !body.is_empty() {
                    let log = env.log();
                    let complete = log.body_lengths();
                    assert!(
                        complete.contains(&(body.len() as u64)),
                        "{case}: {complete:?}"
                    );
                }
                // After GOAWAY the resend needs a fresh connection.
                if matches!(ending, Ending::GoAway(_)) {
                    assert_eq!(env.log().accepted(), 2, "{case}");
                }
                env.stop().await;
            })
            .await;
        }
    }
}

/// An HTTP/2 upstream going away with a last stream id below the request's (RFC 9113 §6.8: the
/// stream was not processed, and may be retried on another connection), on a fresh connection
/// (so not a stale keep-alive one): the request is sent again on a new connection and
/// succeeds, a GET as well as a POST (its small body read whole first, and sent whole again).
/// The first connection is a raw peer that answers the first request's HEADERS with
/// GOAWAY(last_stream_id 0, NO_ERROR); later ones are served by hyper.
#[tokio::test]
async fn a_stream_an_h2_upstream_went_away_before_is_resent() {
    use hyper::body::Incoming;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    for (method, body) in [(Method::GET, ""), (Method::POST, "card=1")] {
        bounded(Duration::from_secs(10), async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (accepted, served) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let (acc, srv) = (accepted.clone(), served.clone());
            let server = tokio::spawn(async move {
                while let Ok((mut sock, _)) = listener.accept().await {
                    if acc.fetch_add(1, Ordering::SeqCst) == 0 {
                        tokio::spawn(async move {
                            let mut preface = [0u8; 24];
                            sock.read_exact(&mut preface).await.unwrap();
                            // Frames until the first HEADERS (type 1).
                            loop {
                                let mut head = [0u8; 9];
                                sock.read_exact(&mut head).await.unwrap();
                                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
                                let mut payload = vec![0u8; len as usize];
                                sock.read_exact(&mut payload).await.unwrap();
                                if head[3] == 1 {
                                    break;
                                }
                            }
                            // SETTINGS (empty), then GOAWAY: last stream 0, NO_ERROR.
                            sock.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
                            let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                            sock.write_all(&goaway).await.unwrap();
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        });
                        continue;
                    }
                    let srv = srv.clone();
                    // Answers `fresh` and the body it received.
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        srv.fetch_add(1, Ordering::SeqCst);
                        async {
                            use http_body_util::BodyExt;
                            let got = req.into_body().collect().await?.to_bytes();
                            let answer = [&b"fresh "[..], &got[..]].concat();
                            Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from(answer),
                            )))
                        }
                    });
                    tokio::spawn(
                        hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc),
                    );
                }
            });
            let env = Env::with(Down::H1, Up::H2c, script(|_| Behavior::ok("unused")), |c| {
                c.upstreams[0].addresses = vec![addr.into()];
            })
            .await;
            let mut client = env.http().await;
            let req = client
                .request(method.clone(), "/order")
                .body(full(body))
                .unwrap();
            let (p, answer, _) = client.fetch(req).await.unwrap();
            let answer = String::from_utf8_lossy(&answer);
            assert_eq!(p.status, 200, "{method}: {answer}");
            assert_eq!(answer, format!("fresh {body}"));
            let rec = env.record("/order").await;
            assert_eq!(rec.retries, 1, "{rec:?}");
            assert_eq!(
                (
                    accepted.load(Ordering::SeqCst),
                    served.load(Ordering::SeqCst)
                ),
                (2, 1)
            );
            env.stop().await;
            server.abort();
        })
        .await;
    }
}
