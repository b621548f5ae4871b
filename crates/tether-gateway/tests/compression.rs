//! Response compression on a route: what is compressed and how it is marked, what passes as it
//! is, and a compressed stream that still reaches the client event by event and is still
//! cancelled when the client leaves. The origin is a hyper server of the test's own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Method;
use http_body::Frame;
use http_body_util::BodyExt;
use test_support::behavior::{Behavior, script};
use test_support::client::empty;
use tether_gateway::config::{Compression, ContentCoding};
use tokio::sync::mpsc;

/// A body whose chunks the test sends.
struct Fed(mpsc::Receiver<Bytes>);

impl http_body::Body for Fed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What the origin saw and the feed of its `/events` stream.
#[derive(Default)]
struct Origin {
    accept_encoding: Mutex<Vec<String>>,
    events: Mutex<Option<mpsc::Sender<Bytes>>>,
}

/// Text that compresses well, `n` bytes of it.
fn page(n: usize) -> Bytes {
    let line = b"<p>the quick brown fox jumps over the lazy dog</p>\n";
    Bytes::from(line.iter().copied().cycle().take(n).collect::<Vec<_>>())
}

async fn origin() -> (SocketAddr, Arc<Origin>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(Origin::default());
    let shared = state.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let state = shared.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let state = state.clone();
                    async move {
                        let _: &hyper::body::Incoming = req.body();
                        state
                            .accept_encoding
                            .lock()
                            .unwrap()
                            .push(header_text(&req, "accept-encoding"));
                        let full =
                            |b: Bytes| http_body_util::Full::new(b).map_err(|e| match e {}).boxed();
                        let mut resp = http::Response::builder();
                        let body: OriginBody = match req.uri().path() {
                            "/page" => {
                                resp = resp
                                    .header("content-type", "text/html; charset=utf-8")
                                    .header("etag", "\"v1\"")
                                    .header("accept-ranges", "bytes");
                                full(page(5000))
                            }
                            "/small" => {
                                resp = resp.header("content-type", "text/html");
                                full(page(100))
                            }
                            "/png" => {
                                resp = resp.header("content-type", "image/png");
                                full(page(5000))
                            }
                            "/pre" => {
                                resp = resp
                                    .header("content-type", "text/html")
                                    .header("content-encoding", "gzip");
                                full(page(5000))
                            }
                            "/fixed" => {
                                resp = resp
                                    .header("content-type", "text/html")
                                    .header("cache-control", "no-transform");
                                full(page(5000))
                            }
                            "/range" => {
                                resp = resp
                                    .status(206)
                                    .header("content-type", "text/html")
                                    .header("content-range", "bytes 0-4999/9000");
                                full(page(5000))
                            }
                            _ => {
                                let (tx, rx) = mpsc::channel(4);
                                *state.events.lock().unwrap() = Some(tx);
                                resp = resp.header("content-type", "text/event-stream");
                                Fed(rx).boxed()
                            }
                        };
                        Ok::<_, Infallible>(resp.body(body).unwrap())
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                .await;
            });
        }
    });
    (addr, state)
}

async fn env(down: Down, addr: SocketAddr) -> Env {
    Env::with(down, Up::H1, script(|_| Behavior::ok("unused")), |c| {
        c.upstreams[0].addresses = vec![addr.into()];
        c.listeners[0].routes[0].compression = Some(Compression::default());
    })
    .await
}

/// Whatever of `bytes` decodes (all of it once the body has ended).
fn decode(coding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = match coding {
        "gzip" => flate2::read::GzDecoder::new(bytes).read_to_end(&mut out),
        "br" => brotli::Decompressor::new(bytes, 4096).read_to_end(&mut out),
        "zstd" => zstd::stream::read::Decoder::new(bytes)
            .unwrap()
            .read_to_end(&mut out),
        other => panic!("unexpected coding {other}"),
    };
    out
}

#[tokio::test]
async fn a_text_response_is_compressed_for_a_client_that_accepts_it() {
    bounded(Duration::from_secs(30), async {
        let (addr, origin) = origin().await;
        for down in [Down::H1, Down::H2c] {
            let env = env(down, addr).await;
            let cases = [
                ("gzip, deflate, br", "br"),
                ("gzip", "gzip"),
                ("br;q=0.5, gzip", "gzip"),
            ];
            for (n, (accept, coding)) in cases.into_iter().enumerate() {
                let mut c = env.http().await;
                let req = c
                    .request(Method::GET, "/page")
                    .header("accept-encoding", accept)
                    .body(empty())
                    .unwrap();
                let (p, body, _) = c.fetch(req).await.unwrap();
                let h = |n: &str| p.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
                assert_eq!(p.status, 200);
                assert_eq!(
                    h("content-encoding").as_deref(),
                    Some(coding),
                    "{down:?} {accept}"
                );
                assert_eq!(h("content-length"), None);
                assert_eq!(h("accept-ranges"), None);
                assert_eq!(h("vary").as_deref(), Some("accept-encoding"));
                assert_eq!(h("etag").as_deref(), Some("W/\"v1\""));
                assert!(body.len() < 1000, "{coding}: {} bytes", body.len());
                assert_eq!(decode(coding, &body), page(5000), "{down:?} {accept}");
                // The upstream is asked as the client asked; the log counts the bytes sent.
                assert_eq!(
                    origin.accept_encoding.lock().unwrap().last().unwrap(),
                    accept
                );
                // (Records land a little after the response.)
                let records = loop {
                    let r = env.records("/page");
                    if r.len() > n {
                        break r;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                assert_eq!(records[n].bytes_sent, body.len() as u64);
            }
            env.stop().await;
        }
    })
    .await
}

#[tokio::test]
async fn responses_that_must_not_change_pass_as_they_are() {
    bounded(Duration::from_secs(30), async {
        let (addr, _origin) = origin().await;
        let env = env(Down::H1, addr).await;
        let cases = [
            (Method::GET, "/page", None, "no accept-encoding"),
            (Method::GET, "/page", Some("identity"), "identity only"),
            (Method::GET, "/small", Some("gzip"), "below min_bytes"),
            (Method::GET, "/png", Some("gzip"), "a type not listed"),
            (Method::GET, "/pre", Some("gzip"), "already encoded"),
            (Method::GET, "/fixed", Some("gzip"), "no-transform"),
            (Method::GET, "/range", Some("gzip"), "a range"),
            (Method::HEAD, "/page", Some("gzip"), "HEAD"),
        ];
        for (method, path, accept, why) in cases {
            let mut c = env.http().await;
            let mut req = c.request(method.clone(), path);
            if let Some(a) = accept {
                req = req.header("accept-encoding", a);
            }
            let (p, body, _) = c.fetch(req.body(empty()).unwrap()).await.unwrap();
            let upstream_encoding = (path == "/pre").then_some("gzip");
            assert_eq!(
                p.headers
                    .get("content-encoding")
                    .map(|v| v.to_str().unwrap()),
                upstream_encoding,
                "{why}"
            );
            assert!(p.headers.get("vary").is_none(), "{why}");
            if method == Method::GET {
                let expected = if path == "/small" {
                    page(100)
                } else {
                    page(5000)
                };
                assert_eq!(body, expected, "{why}");
                assert_eq!(
                    p.headers.get("content-length").unwrap(),
                    &expected.len().to_string(),
                    "{why}"
                );
            }
        }
        env.stop().await;
    })
    .await
}

/// zstd, when the route offers it, for the clients that accept it (a browser's
/// `gzip, deflate, br, zstd`); the others still get what they accept.
#[tokio::test]
async fn zstd_is_sent_to_clients_that_accept_it_when_the_route_offers_it() {
    bounded(Duration::from_secs(30), async {
        let (addr, _origin) = origin().await;
        let env = Env::with(Down::H2c, Up::H1, script(|_| Behavior::ok("unused")), |c| {
            c.upstreams[0].addresses = vec![addr.into()];
            c.listeners[0].routes[0].compression = Some(Compression {
                encodings: vec![
                    ContentCoding::Zstd,
                    ContentCoding::Brotli,
                    ContentCoding::Gzip,
                ],
                ..Compression::default()
            });
        })
        .await;
        for (accept, coding) in [("gzip, deflate, br, zstd", "zstd"), ("gzip, br", "br")] {
            let mut c = env.http().await;
            let req = c
                .request(Method::GET, "/page")
                .header("accept-encoding", accept)
                .body(empty())
                .unwrap();
            let (p, body, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.headers["content-encoding"], coding, "{accept}");
            assert!(body.len() < 1000, "{coding}: {} bytes", body.len());
            assert_eq!(decode(coding, &body), page(5000), "{accept}");
        }
        env.stop().await;
    })
    .await
}

#[tokio::test]
async fn a_compressed_stream_reaches_the_client_event_by_event_and_its_client_leaving_cancels_it() {
    bounded(Duration::from_secs(30), async {
        let (addr, origin) = origin().await;
        let mut types = Compression::default().types;
        types.push("text/event-stream".into());
        for (down, coding) in [
            (Down::H1, ContentCoding::Gzip),
            (Down::H2c, ContentCoding::Brotli),
            (Down::H1, ContentCoding::Zstd),
        ] {
            let types = types.clone();
            let env = Env::with(down, Up::H1, script(|_| Behavior::ok("unused")), |c| {
                c.upstreams[0].addresses = vec![addr.into()];
                c.listeners[0].routes[0].compression = Some(Compression {
                    types,
                    encodings: vec![
                        ContentCoding::Zstd,
                        ContentCoding::Brotli,
                        ContentCoding::Gzip,
                    ],
                    ..Compression::default()
                });
            })
            .await;
            let mut c = env.http().await;
            let req = c
                .request(Method::GET, "/events")
                .header("accept-encoding", coding.token())
                .body(empty())
                .unwrap();
            let resp = c.send(req).await.unwrap();
            assert_eq!(resp.headers()["content-encoding"], coding.token());
            let mut body = resp.into_body();
            let feed = origin.events.lock().unwrap().clone().unwrap();
            let mut got = Vec::new();
            let mut expected = Vec::new();
            for i in 0..3 {
                let event = format!("data: event {i}\n\n");
                expected.extend_from_slice(event.as_bytes());
                feed.send(Bytes::from(event)).await.unwrap();
                // The event arrives before the next is sent: each chunk is flushed.
                while decode(coding.token(), &got) != expected {
                    let frame = body.frame().await.unwrap().unwrap();
                    got.extend_from_slice(frame.data_ref().unwrap());
                }
            }
            // The client leaves: the upstream's stream is dropped as without compression.
            drop(body);
            drop(c);
            tokio::time::timeout(Duration::from_secs(5), feed.closed())
                .await
                .expect("the upstream stream was not cancelled");
            env.stop().await;
        }
    })
    .await
}
