//! Request buffering (`request_buffer_bytes`): a body is read ahead before an upstream
//! connection is taken, so a slow upload holds no upstream connection and reaches the upstream
//! whole, with a `Content-Length`; a client leaving mid-upload costs the upstream nothing; a
//! longer body goes with its start and streams the rest; gRPC streams as always. A raw HTTP/1.1
//! client sends the bodies in pieces, and the upstream records what it saw and when.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use test_support::Checksum;
use test_support::behavior::{Behavior, routes};
use test_support::client::full;
use tether_gateway::observe::access::Outcome;

/// A gateway in front of an upstream answering every request with its body's summary, reading
/// request bodies ahead up to `buffer` bytes.
async fn gateway(up: Up, buffer: u64) -> Env {
    gateway_for(Down::H1, up, buffer).await
}

/// [`gateway`] for clients of protocol `down`.
async fn gateway_for(down: Down, up: Up, buffer: u64) -> Env {
    Env::with(down, up, routes(vec![("/up", Behavior::Summary)]), |c| {
        c.listeners[0].routes[0].request_buffer_bytes = buffer;
    })
    .await
}

/// The upstream's summary of `body`: its length and checksum.
fn summary(body: &[u8]) -> String {
    let mut sum = Checksum::new();
    sum.update(body);
    format!("{} {}", sum.len(), sum.value())
}

/// POSTs `body` (its length declared) over a new connection, its first `first` bytes at once and
/// the rest only once the upstream has the request (its `nth` to `/up`): the request must start
/// before the body ends. Asserts that the upstream got every byte.
async fn upload_started_early(env: &Env, body: &[u8], first: usize, nth: usize) {
    let mut c = env.h1().await;
    let len = body.len() as u64;
    c.send_request("POST", "/up", &[], Some(len), &body[..first])
        .await
        .unwrap();
    bounded(Duration::from_secs(20), async {
        while env.log().requests("/up").len() < nth {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    c.send_raw(&body[first..]).await.unwrap();
    let head = c.read_final_head().await.unwrap();
    let answer = c.read_body("POST", &head).await.unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(answer, summary(body).as_bytes());
}

/// One chunk of a chunked body.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// A chunked upload sent in two pieces with a pause between: nothing reaches the upstream, not
/// even a connection, until the body has ended; then the request goes whole, its length
/// declared (a backend that cannot read chunked bodies gets one it can).
#[tokio::test]
async fn a_slow_chunked_upload_reaches_the_upstream_whole_with_its_length() {
    bounded(Duration::from_secs(20), async {
        for up in [Up::H1, Up::H2c] {
            let env = gateway(up, 64 * 1024).await;
            let mut c = env.h1().await;
            let head = [("transfer-encoding", "chunked")];
            c.send_request("POST", "/up", &head, None, &chunk(b"hello "))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(env.log().accepted(), 0, "{up:?}: connected mid-upload");
            assert!(env.log().requests("/up").is_empty(), "{up:?}");

            let mut rest = chunk(b"world");
            rest.extend_from_slice(b"0\r\n\r\n");
            c.send_raw(&rest).await.unwrap();
            let head = c.read_final_head().await.unwrap();
            let body = c.read_body("POST", &head).await.unwrap();
            assert_eq!(head.status, 200, "{up:?}");
            assert_eq!(body, summary(b"hello world").as_bytes(), "{up:?}");
            let (_, headers) = env.log().requests("/up").remove(0);
            let get = |n: &str| values(&headers, n);
            assert_eq!(get("content-length"), ["11"], "{up:?}: {headers:?}");
            assert!(get("transfer-encoding").is_empty(), "{up:?}: {headers:?}");
            let rec = env.record("/up").await;
            assert_eq!((rec.status, rec.bytes_received), (200, 11), "{rec:?}");
            env.stop().await;
        }
    })
    .await;
}

/// A client that leaves mid-upload: the upstream saw nothing at all, and the abort is logged at
/// stage `request_body`.
#[tokio::test]
async fn a_client_leaving_mid_upload_costs_the_upstream_nothing() {
    bounded(Duration::from_secs(10), async {
        let env = gateway(Up::H1, 64 * 1024).await;
        let mut c = env.h1().await;
        c.send_request("POST", "/up", &[], Some(5000), &[b'x'; 1000])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.rst().unwrap();
        let rec = env.record("/up").await;
        assert_eq!(
            (rec.outcome, rec.stage, rec.bytes_received),
            (Outcome::ClientAbort, Some("request_body"), 1000),
            "{rec:?}"
        );
        assert!(env.log().events().is_empty(), "{:?}", env.log().events());
        env.stop().await;
    })
    .await;
}

/// A body longer than the buffer: what was read ahead goes with the request, at once, and the
/// rest streams after it; the upstream gets every byte. (Longer than `retry_body_bytes` too,
/// which an HTTP/2 upstream's small bodies are read whole for.)
#[tokio::test]
async fn a_body_longer_than_the_buffer_goes_with_its_start_and_streams_the_rest() {
    bounded(Duration::from_secs(20), async {
        for up in [Up::H1, Up::H2c] {
            let env = gateway(up, 1024).await;
            let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            // Past the buffer: the request starts before the rest of the body is sent.
            upload_started_early(&env, &body, 1500, 1).await;
            env.stop().await;
        }
    })
    .await;
}

/// A gRPC call streams on a buffering route: its messages may need answers before its body
/// ends, so the upstream gets the request at once.
#[tokio::test]
async fn a_grpc_call_streams_on_a_buffering_route() {
    bounded(Duration::from_secs(10), async {
        let env = gateway(Up::H1, 64 * 1024).await;
        let mut c = env.h1().await;
        let head = [
            ("transfer-encoding", "chunked"),
            ("content-type", "application/grpc-web+proto"),
        ];
        c.send_request("POST", "/up", &head, None, &chunk(&[0, 0, 0, 0, 1, 7]))
            .await
            .unwrap();
        bounded(Duration::from_secs(5), async {
            while env.log().requests("/up").is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        c.send_raw(b"0\r\n\r\n").await.unwrap();
        let head = c.read_final_head().await.unwrap();
        assert_eq!(head.status, 200);
        env.stop().await;
    })
    .await;
}

/// An HTTP/2 client's body larger than the stream's initial flow-control window (64 KiB): tether
/// opens the window as it reads ahead, so the whole body arrives before the send and goes
/// upstream with its length.
#[tokio::test]
async fn an_http2_body_past_the_flow_control_window_is_read_ahead_whole() {
    bounded(Duration::from_secs(20), async {
        for down in [Down::H2c, Down::H2Tls] {
            let env = gateway_for(down, Up::H1, 1 << 20).await;
            let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
            let mut c = env.http().await;
            let req = c
                .request(http::Method::POST, "/up")
                .body(full(body.clone()))
                .unwrap();
            let (p, answer, _) = c.fetch(req).await.unwrap();
            assert_eq!(p.status, 200, "{down:?}");
            assert_eq!(answer, summary(&body).as_bytes(), "{down:?}");
            let (_, headers) = env.log().requests("/up").remove(0);
            assert_eq!(values(&headers, "content-length"), ["200000"], "{down:?}");
            env.stop().await;
        }
    })
    .await;
}

/// With a `request_buffer_dir`, a chunked upload past the first MiB goes on into a file there
/// (unlinked as soon as made: the directory stays empty) while nothing reaches the upstream;
/// then the body goes whole from the file, with its length. One longer than the buffer goes
/// with the file's part first and streams the rest. Every byte arrives, in order.
#[tokio::test]
async fn a_body_past_memory_is_read_ahead_into_a_file_and_sent_from_it() {
    bounded(Duration::from_secs(60), async {
        for up in [Up::H1, Up::H2c] {
            let dir = tempfile::tempdir().unwrap();
            let env = spilling_gateway(up, dir.path()).await;
            let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
            let mut c = env.h1().await;
            let head = [("transfer-encoding", "chunked")];
            let mut first = Vec::new();
            for piece in body[..2_000_000].chunks(100_000) {
                first.extend_from_slice(&chunk(piece));
            }
            c.send_request("POST", "/up", &head, None, &first)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(env.log().accepted(), 0, "{up:?}: connected mid-upload");
            // The file is open, and already unlinked.
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
            assert_eq!(open_files_in(dir.path()), 1, "{up:?}");
            let mut rest = Vec::new();
            for piece in body[2_000_000..].chunks(100_000) {
                rest.extend_from_slice(&chunk(piece));
            }
            rest.extend_from_slice(b"0\r\n\r\n");
            c.send_raw(&rest).await.unwrap();
            let head = c.read_final_head().await.unwrap();
            let answer = c.read_body("POST", &head).await.unwrap();
            assert_eq!(head.status, 200, "{up:?}");
            assert_eq!(answer, summary(&body).as_bytes(), "{up:?}");
            let (_, headers) = env.log().requests("/up").remove(0);
            assert_eq!(
                values(&headers, "content-length"),
                ["3000000"],
                "{up:?}: {headers:?}"
            );
            // Closed once sent.
            bounded(Duration::from_secs(10), async {
                while open_files_in(dir.path()) > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;

            // Longer than the buffer (5 MB past 4 MiB): the request starts once the buffer is
            // full, and the rest follows the file's part.
            let long: Vec<u8> = (0..5_000_000u32).map(|i| (i % 241) as u8).collect();
            upload_started_early(&env, &long, 4_500_000, 2).await;
            env.stop().await;
        }
    })
    .await;
}

/// [`gateway`] with a 4 MiB buffer whose bodies go past their first MiB into files in `dir`.
async fn spilling_gateway(up: Up, dir: &std::path::Path) -> Env {
    let dir = dir.to_owned();
    Env::with(
        Down::H1,
        up,
        routes(vec![("/up", Behavior::Summary)]),
        |c| {
            let route = &mut c.listeners[0].routes[0];
            route.request_buffer_bytes = 4 * 1024 * 1024;
            route.request_buffer_dir = Some(dir);
        },
    )
    .await
}

/// Files this process has open under `dir` (unlinked ones included).
fn open_files_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

/// A `request_buffer_dir` that is gone when a body needs it: the body streams after its first
/// MiB (the request reaches the upstream before the body ends), and is served all the same.
#[tokio::test]
async fn a_body_that_cannot_go_to_a_file_streams() {
    bounded(Duration::from_secs(30), async {
        let dir = tempfile::tempdir().unwrap();
        let env = spilling_gateway(Up::H1, dir.path()).await;
        drop(dir);
        let body: Vec<u8> = (0..2_000_000u32).map(|i| (i % 239) as u8).collect();
        upload_started_early(&env, &body, 1_500_000, 1).await;
        env.stop().await;
    })
    .await;
}
