//! gRPC clients through tether, judged by a real gRPC client (tonic): tether's own answers reach
//! it as gRPC statuses (trailers-only responses), an upstream's gRPC responses pass untouched,
//! and a gRPC-Web client over HTTP/1.1 finds the status in the response head.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use common::*;
use test_support::EventKind;
use test_support::behavior::{Behavior, Ending, Reply, routes};
use test_support::client::{HttpClient, full};
use tether::CancelReason;
use tether_gateway::observe::access::Outcome;
use tonic::Code;
use tonic::codec::{DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Messages as raw bytes: the tests need gRPC's framing and statuses, not a schema.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A gRPC client of the gateway, on a connection of its own.
async fn client(env: &Env) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", env.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc
}

/// One unary call to `path` through the gateway, over a connection of its own.
async fn call(env: &Env, path: &'static str) -> Result<tonic::Response<Bytes>, tonic::Status> {
    let mut grpc = client(env).await;
    grpc.unary(
        tonic::Request::new(Bytes::from_static(b"ping")),
        http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
}

/// A gRPC message frame: uncompressed, length-prefixed.
fn frame(message: &[u8]) -> Bytes {
    let mut b = bytes::BytesMut::new();
    b.put_u8(0);
    b.put_u32(u32::try_from(message.len()).unwrap());
    b.put_slice(message);
    b.freeze()
}

/// The route's deadline passes while the upstream works: the client is told DEADLINE_EXCEEDED
/// (not UNAVAILABLE, as a bare 504 would read), the upstream's work is stopped, and the log keeps
/// the 504 it stands for beside the gRPC code.
#[tokio::test]
async fn a_passed_deadline_reaches_the_client_as_deadline_exceeded() {
    bounded(Duration::from_secs(30), async {
        for up in [Up::H1, Up::H2c] {
            let env = Env::with(
                Down::H2c,
                up,
                routes(vec![("/test.Echo/Slow", Behavior::Never)]),
                |c| c.listeners[0].routes[0].timeouts.total = Some(Duration::from_millis(300)),
            )
            .await;
            let status = call(&env, "/test.Echo/Slow").await.unwrap_err();
            assert_eq!(status.code(), Code::DeadlineExceeded, "{up:?}: {status:?}");
            assert_eq!(
                status.message(),
                "tether: upstream_timeout at first_byte",
                "{up:?}"
            );
            let md = status.metadata();
            assert!(md.get("x-request-id").is_some(), "{up:?}: {md:?}");
            assert!(
                md.get("proxy-status")
                    .is_some_and(|v| v.to_str().unwrap().starts_with("tether;")),
                "{up:?}: {md:?}"
            );
            let stopped = env
                .log()
                .wait_for(BOUND, |e| {
                    e.path == "/test.Echo/Slow"
                        && (e.kind.is_h1_close() || matches!(e.kind, EventKind::StreamReset { .. }))
                })
                .await;
            assert!(stopped.is_some(), "{up:?}: {:?}", env.log().events());
            let rec = env.record("/test.Echo/Slow").await;
            assert_eq!(rec.status, 504, "{up:?}");
            assert_eq!(rec.grpc_status, Some(4), "{up:?}");
            assert_eq!(rec.outcome, Outcome::Timeout, "{up:?}");
            assert_eq!(rec.abort_reason, Some(CancelReason::Deadline), "{up:?}");
            env.stop().await;
        }
    })
    .await;
}

/// Each of tether's refusals and upstream failures is a gRPC status a client can act on:
/// UNAVAILABLE (retry elsewhere) for an upstream that cannot be reached, UNIMPLEMENTED for a call
/// no route serves, PERMISSION_DENIED for a client the route refuses, RESOURCE_EXHAUSTED for one
/// over its rate limit.
#[tokio::test]
async fn refusals_and_failures_reach_the_client_as_grpc_statuses() {
    bounded(Duration::from_secs(30), async {
        let dead = refused_addr();
        let env = Env::with(
            Down::H2c,
            Up::H2c,
            routes(vec![("/", Behavior::ok("unused"))]),
            |c| {
                let mut unreachable = c.upstreams[0].clone();
                unreachable.name = "dead".into();
                unreachable.addresses = vec![dead.into()];
                unreachable.max_fails = 0;
                c.upstreams.push(unreachable);
                let l = &mut c.listeners[0];
                let base = l.routes[0].clone();
                let mut to_dead = base.clone();
                to_dead.name = "dead".into();
                to_dead.path_prefix = "/test.Dead/".into();
                to_dead.upstream = "dead".into();
                to_dead.max_retries = 0;
                let mut denied = base.clone();
                denied.name = "denied".into();
                denied.path_prefix = "/test.Denied/".into();
                denied.deny_clients = vec!["127.0.0.0/8".parse().unwrap()];
                let mut limited = base.clone();
                limited.name = "limited".into();
                limited.path_prefix = "/test.Limited/".into();
                limited.rate_limit = Some(tether_gateway::config::RateLimit {
                    requests: 1,
                    per: Duration::from_secs(60),
                    burst: 0,
                    queue: 0,
                    key: None,
                });
                let mut served = base;
                served.path_prefix = "/test.Echo/".into();
                l.routes = vec![to_dead, denied, limited, served];
            },
        )
        .await;
        let cases: [(&'static str, Code, &str); 3] = [
            (
                "/test.Dead/Call",
                Code::Unavailable,
                "tether: upstream_connect_failed at connect",
            ),
            (
                "/test.Nowhere/Call",
                Code::Unimplemented,
                "tether: no_route at route",
            ),
            (
                "/test.Denied/Call",
                Code::PermissionDenied,
                "tether: forbidden at admission",
            ),
        ];
        for (path, code, message) in cases {
            let status = call(&env, path).await.unwrap_err();
            assert_eq!((status.code(), status.message()), (code, message), "{path}");
        }
        // The first call of the limited route reaches the (non-gRPC) upstream; the next is
        // refused by tether.
        let _ = call(&env, "/test.Limited/Call").await;
        let status = call(&env, "/test.Limited/Call").await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.metadata().get("retry-after").is_some());
        let rec = env.record("/test.Dead/Call").await;
        assert_eq!((rec.status, rec.grpc_status), (502, Some(14)));
        assert_eq!(env.record("/test.Nowhere/Call").await.grpc_status, Some(12));
        env.stop().await;
    })
    .await;
}

/// The upstream's own gRPC response, status in its trailers, passes through as it was sent.
#[tokio::test]
async fn an_upstream_grpc_response_passes_untouched() {
    bounded(Duration::from_secs(20), async {
        let reply = Reply::ok(frame(b"pong"))
            .header("content-type", "application/grpc")
            .trailer("grpc-status", "0");
        let failing = Reply::ok(Bytes::new())
            .header("content-type", "application/grpc")
            .trailer("grpc-status", "5")
            .trailer("grpc-message", "no such key");
        let env = Env::with(
            Down::H2c,
            Up::H2c,
            routes(vec![
                ("/test.Echo/Ping", Behavior::Respond(reply)),
                ("/test.Echo/Missing", Behavior::Respond(failing)),
            ]),
            |_| {},
        )
        .await;
        let got = call(&env, "/test.Echo/Ping").await.unwrap();
        assert_eq!(got.into_inner(), Bytes::from_static(b"pong"));
        let status = call(&env, "/test.Echo/Missing").await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, "no such key")
        );
        assert_eq!(env.record("/test.Echo/Missing").await.grpc_status, None);
        env.stop().await;
    })
    .await;
}

/// A gRPC-Web client (HTTP/1.1) reads the status from the head of a bodiless 200, with the
/// gRPC-Web content type; a plain HTTP client still gets the JSON error body.
#[tokio::test]
async fn a_grpc_web_client_gets_the_status_in_the_response_head() {
    bounded(Duration::from_secs(20), async {
        let dead = refused_addr();
        let env = Env::with(
            Down::H1,
            Up::H1,
            routes(vec![("/", Behavior::ok("unused"))]),
            |c| {
                c.upstreams[0].addresses = vec![dead.into()];
                c.upstreams[0].max_fails = 0;
                c.listeners[0].routes[0].max_retries = 0;
            },
        )
        .await;
        let mut c = env.h1().await;
        c.send_request(
            "POST",
            "/test.Echo/Ping",
            &[("content-type", "application/grpc-web+proto")],
            None,
            &frame(b"ping"),
        )
        .await
        .unwrap();
        let head = c.read_final_head().await.unwrap();
        assert_eq!(head.status, 200);
        let header = |name: &str| {
            head.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header("content-type"), Some("application/grpc-web"));
        assert_eq!(header("grpc-status"), Some("14"));
        assert_eq!(
            header("grpc-message"),
            Some("tether: upstream_connect_failed at connect")
        );
        assert_eq!(header("content-length"), Some("0"));

        c.send_request("GET", "/plain", &[], None, b"")
            .await
            .unwrap();
        let head = c.read_final_head().await.unwrap();
        assert_eq!(head.status, 502);
        env.stop().await;
    })
    .await;
}

/// A server-streaming call whose deadline passes mid-stream: cut between two messages, the
/// response ends with trailers, so the client reads every message sent and then
/// DEADLINE_EXCEEDED (not a reset, which it would report as an internal error); the upstream
/// stream is stopped. Cut inside a message, the response can only be reset.
#[tokio::test]
async fn a_stream_cut_between_messages_ends_with_a_grpc_status() {
    bounded(Duration::from_secs(30), async {
        for up in [Up::H1, Up::H2c] {
            // Whole messages, or a prefix promising more than ever comes.
            let whole = frame(b"tick");
            let partial = Bytes::from_static(&[0, 0, 0, 1, 0, b'x']);
            let env = Env::with(
                Down::H2c,
                up,
                routes(vec![
                    ("/test.Clock/Ticks", Behavior::stream(whole, 100, 50)),
                    ("/test.Clock/Broken", Behavior::stream(partial, 100, 50)),
                ]),
                |c| {
                    let r = &mut c.listeners[0].routes[0];
                    r.timeouts.total = Some(Duration::from_millis(400));
                    // The test upstream sends no content type of its own.
                    r.response_headers.set =
                        vec![("content-type".into(), "application/grpc".into())];
                },
            )
            .await;
            let mut grpc = client(&env).await;
            let mut stream = grpc
                .server_streaming(
                    tonic::Request::new(Bytes::from_static(b"")),
                    http::uri::PathAndQuery::from_static("/test.Clock/Ticks"),
                    Raw,
                )
                .await
                .unwrap()
                .into_inner();
            let mut ticks = 0;
            let status = loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        assert_eq!(m, Bytes::from_static(b"tick"), "{up:?}");
                        ticks += 1;
                    }
                    Ok(None) => panic!("{up:?}: the stream ended without a status"),
                    Err(status) => break status,
                }
            };
            assert!((2..20).contains(&ticks), "{up:?}: {ticks} messages");
            assert_eq!(
                (status.code(), status.message()),
                (Code::DeadlineExceeded, "tether: deadline at body"),
                "{up:?}"
            );
            let rec = env.record("/test.Clock/Ticks").await;
            assert_eq!(
                (rec.outcome, rec.grpc_status, rec.stage),
                (Outcome::Timeout, Some(4), Some("body")),
                "{up:?}"
            );
            let stopped = env
                .log()
                .wait_for(BOUND, |e| {
                    e.path == "/test.Clock/Ticks"
                        && (e.kind.is_h1_close() || matches!(e.kind, EventKind::StreamReset { .. }))
                })
                .await;
            assert!(stopped.is_some(), "{up:?}: {:?}", env.log().events());

            let mut grpc = client(&env).await;
            let mut stream = grpc
                .server_streaming(
                    tonic::Request::new(Bytes::from_static(b"")),
                    http::uri::PathAndQuery::from_static("/test.Clock/Broken"),
                    Raw,
                )
                .await
                .unwrap()
                .into_inner();
            let status = loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("{up:?}: a cut message ended cleanly"),
                    Err(status) => break status,
                }
            };
            assert_ne!(status.code(), Code::DeadlineExceeded, "{up:?}: {status:?}");
            let rec = env.record("/test.Clock/Broken").await;
            assert_eq!(
                (rec.outcome, rec.grpc_status),
                (Outcome::Timeout, None),
                "{up:?}"
            );
            env.stop().await;
        }
    })
    .await;
}

/// Checks a gRPC-Web body cut by its deadline: a few `tick` messages, then a trailers frame
/// with DEADLINE_EXCEEDED, then nothing.
fn deadline_after_ticks(mut body: Bytes, tick: &[u8], down: Down) {
    let mut ticks = 0;
    let trailers = loop {
        assert!(
            body.len() >= 5,
            "{down:?}: the body ended without a trailers frame"
        );
        let flags = body.get_u8();
        let len = body.get_u32() as usize;
        let message = body.split_to(len);
        if flags & 0x80 != 0 {
            break message;
        }
        assert_eq!(&message[..], tick, "{down:?}");
        ticks += 1;
    };
    assert!(
        body.is_empty(),
        "{down:?}: {body:?} after the trailers frame"
    );
    assert!((2..20).contains(&ticks), "{down:?}: {ticks} messages");
    assert_eq!(
        &trailers[..],
        b"grpc-status:4\r\ngrpc-message:tether: deadline at body\r\n",
        "{down:?}"
    );
}

/// A gRPC-Web server stream whose deadline passes mid-stream, cut between two messages: the
/// body ends cleanly with a trailers frame carrying DEADLINE_EXCEEDED (what gRPC-Web clients
/// read their status from), over HTTP/1.1 and HTTP/2. A response with a `Content-Length` has no
/// room for the frame and is cut as before.
#[tokio::test]
async fn a_grpc_web_stream_cut_between_messages_ends_with_a_trailers_frame() {
    bounded(Duration::from_secs(30), async {
        // Two whole messages, then the upstream connection ends mid-response.
        let broken = |content_length| Behavior::Truncate {
            content_length,
            sent: [frame(b"tick"), frame(b"tick")].concat().into(),
            ending: Ending::Fin,
        };
        for down in [Down::H1, Down::H2c] {
            let env = Env::with(
                down,
                Up::H1,
                routes(vec![
                    (
                        "/test.Clock/Ticks",
                        Behavior::stream(frame(b"tick"), 100, 50),
                    ),
                    ("/test.Clock/Broken", broken(None)),
                    ("/test.Clock/Sized", broken(Some(1000))),
                ]),
                |c| {
                    let r = &mut c.listeners[0].routes[0];
                    r.timeouts.total = Some(Duration::from_millis(400));
                    r.response_headers.set =
                        vec![("content-type".into(), "application/grpc-web+proto".into())];
                },
            )
            .await;
            let mut c = env.http().await;
            let req = c
                .request(http::Method::POST, "/test.Clock/Ticks")
                .header("content-type", "application/grpc-web+proto")
                .body(full(frame(b"")))
                .unwrap();
            let (parts, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(parts.status, 200, "{down:?}");
            deadline_after_ticks(body, b"tick", down);
            let rec = env.record("/test.Clock/Ticks").await;
            assert_eq!(
                (rec.outcome, rec.grpc_status, rec.stage),
                (Outcome::Timeout, Some(4), Some("body")),
                "{down:?}"
            );

            // The upstream failing between messages: UNAVAILABLE, saying what failed.
            let call = |c: &HttpClient, path: &'static str| {
                c.request(http::Method::POST, path)
                    .header("content-type", "application/grpc-web+proto")
                    .body(full(frame(b"")))
                    .unwrap()
            };
            let req = call(&c, "/test.Clock/Broken");
            let (_, body, _) = c.fetch(req).await.unwrap();
            let mut want = [frame(b"tick"), frame(b"tick")].concat();
            let end = b"grpc-status:14\r\ngrpc-message:tether: upstream_body_failed at body\r\n";
            want.push(0x80);
            want.extend_from_slice(&(end.len() as u32).to_be_bytes());
            want.extend_from_slice(end);
            assert_eq!(&body[..], &want[..], "{down:?}");
            assert_eq!(
                env.record("/test.Clock/Broken").await.grpc_status,
                Some(14),
                "{down:?}"
            );

            // With a Content-Length there is no room for the frame: the response is cut.
            let mut c = env.http().await;
            let req = call(&c, "/test.Clock/Sized");
            assert!(c.fetch(req).await.is_err(), "{down:?}");
            assert_eq!(env.record("/test.Clock/Sized").await.grpc_status, None);
            env.stop().await;
        }
    })
    .await;
}

/// A gRPC-Web-text body as its client reads it: each group of four base64 characters decoded
/// alone (servers encode each chunk on its own, padding included).
fn from_text(text: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    assert_eq!(text.len() % 4, 0, "{:?}", String::from_utf8_lossy(text));
    text.chunks(4)
        .flat_map(|g| base64::engine::general_purpose::STANDARD.decode(g).unwrap())
        .collect()
}

fn to_text(b: &[u8]) -> Bytes {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b).into()
}

/// gRPC-Web-text (base64, the JavaScript client's default mode), cut between two messages: the
/// body ends with the trailers frame in base64, after upstream chunks that each carried their
/// own padding; cut inside a base64 group or a message, it is cut as before.
#[tokio::test]
async fn a_grpc_web_text_stream_cut_between_messages_ends_with_a_base64_trailers_frame() {
    bounded(Duration::from_secs(30), async {
        // "ticks" frames are 10 bytes: 16 characters, two of them padding.
        let tick = to_text(&frame(b"ticks"));
        assert!(tick.ends_with(b"=="));
        let two = [tick.clone(), tick.clone()].concat();
        let broken = |sent: Vec<u8>| Behavior::Truncate {
            content_length: None,
            sent: sent.into(),
            ending: Ending::Fin,
        };
        let text = "application/grpc-web-text+proto";
        for down in [Down::H1, Down::H2c] {
            let env = Env::with(
                down,
                Up::H1,
                routes(vec![
                    ("/test.Clock/Ticks", Behavior::stream(tick.clone(), 100, 50)),
                    ("/test.Clock/Broken", broken(two.clone())),
                    (
                        "/test.Clock/MidGroup",
                        broken(two[..two.len() - 2].to_vec()),
                    ),
                ]),
                |c| {
                    let r = &mut c.listeners[0].routes[0];
                    r.timeouts.total = Some(Duration::from_millis(400));
                    r.response_headers.set = vec![("content-type".into(), text.into())];
                },
            )
            .await;
            let mut c = env.http().await;
            let call = |c: &HttpClient, path: &'static str| {
                c.request(http::Method::POST, path)
                    .header("content-type", text)
                    .body(full(to_text(&frame(b""))))
                    .unwrap()
            };
            let (parts, body, _) = {
                let req = call(&c, "/test.Clock/Ticks");
                c.fetch(req)
            }
            .await
            .unwrap();
            assert_eq!(parts.status, 200, "{down:?}");
            deadline_after_ticks(Bytes::from(from_text(&body)), b"ticks", down);
            let rec = env.record("/test.Clock/Ticks").await;
            assert_eq!(
                (rec.grpc_status, rec.stage),
                (Some(4), Some("body")),
                "{down:?}"
            );

            // The upstream failing between messages: UNAVAILABLE, in base64 after its chunks.
            let (_, body, _) = {
                let req = call(&c, "/test.Clock/Broken");
                c.fetch(req)
            }
            .await
            .unwrap();
            let end = b"grpc-status:14\r\ngrpc-message:tether: upstream_body_failed at body\r\n";
            let mut want = [frame(b"ticks"), frame(b"ticks")].concat();
            want.push(0x80);
            want.extend_from_slice(&(end.len() as u32).to_be_bytes());
            want.extend_from_slice(end);
            assert_eq!(from_text(&body), want, "{down:?}");
            assert_eq!(env.record("/test.Clock/Broken").await.grpc_status, Some(14));

            // Cut inside a base64 group: no frame could follow it, so the response is cut.
            let mut c = env.http().await;
            assert!(
                {
                    let req = call(&c, "/test.Clock/MidGroup");
                    c.fetch(req)
                }
                .await
                .is_err(),
                "{down:?}"
            );
            assert_eq!(env.record("/test.Clock/MidGroup").await.grpc_status, None);
            env.stop().await;
        }
    })
    .await;
}
