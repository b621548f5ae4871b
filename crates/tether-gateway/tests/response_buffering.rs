//! Response buffering (`response_buffer_bytes`): the upstream's body is read ahead of a client
//! that reads slowly (here: an HTTP/2 client that leaves its flow-control window full for a
//! while; the window, unlike socket buffers, holds the same few KiB on every machine), so the
//! upstream finishes its response,
//! and its HTTP/1.1 connection serves the next request, long before the client has it all;
//! without it the upstream waits on the client. A client leaving while the upstream still sends
//! closes the upstream connection as before; server-sent events still pass one by one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use test_support::EventKind;
use test_support::behavior::{Behavior, routes};

/// Larger than what the window and the sockets between a client that does not read and the
/// upstream hold, smaller than the buffer.
const BIG: u64 = 14_000_000;

async fn gateway(up: Up, buffer: u64) -> Env {
    gateway_for(Down::H1, up, buffer).await
}

async fn gateway_for(down: Down, up: Up, buffer: u64) -> Env {
    let script = routes(vec![
        ("/big", Behavior::Download { len: BIG }),
        ("/huge", Behavior::Download { len: 200_000_000 }),
        ("/small", Behavior::ok("small")),
        ("/medium", Behavior::Download { len: 1_000_000 }),
        ("/events", Behavior::stream("data: tick\n\n", 5, 300)),
    ]);
    Env::with(down, up, script, move |c| {
        c.listeners[0].routes[0].response_buffer_bytes = buffer;
        // One stream per HTTP/2 connection: a stream still counted opens another connection.
        if up != Up::H1 {
            c.upstreams[0].max_streams_per_connection = std::num::NonZeroU32::MIN;
        }
    })
    .await
}

fn completed(env: &Env, path: &str) -> bool {
    env.log()
        .any(|e| e.path == path && e.kind == EventKind::HandlerCompleted)
}

async fn wait_completed(env: &Env, path: &str) {
    bounded(Duration::from_secs(15), async {
        while !completed(env, path) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A client that takes the head of a large response and then nothing: with the buffer, the
/// upstream finishes (and, over HTTP/1.1, its connection serves another client's request);
/// without, it is still waiting on the client. Either way every byte arrives once the client
/// reads.
#[tokio::test]
async fn a_slow_client_does_not_hold_the_upstream_when_responses_are_buffered() {
    bounded(Duration::from_secs(60), async {
        for up in [Up::H1, Up::H2c] {
            for buffer in [0, 16 * 1024 * 1024] {
                let case = format!("{up:?}, buffer {buffer}");
                let env = gateway_for(Down::H2c, up, buffer).await;
                let mut client = env.h2().await;
                let mut slow = client.start("GET", "/big", &[], true).await.unwrap();
                let head = slow.response().await.unwrap();
                assert_eq!(head.status, 200, "{case}");
                if buffer == 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    assert!(
                        !completed(&env, "/big"),
                        "{case}: the upstream did not wait"
                    );
                } else {
                    wait_completed(&env, "/big").await;
                    // The connection went back to the pool (HTTP/1.1), the stream's place on it
                    // was given back (HTTP/2, one stream a connection): another request takes it.
                    let (p, body) = env.http().await.get("/small").await.unwrap();
                    assert_eq!((p.status.as_u16(), &body[..]), (200, &b"small"[..]));
                    assert_eq!(env.log().accepted(), 1, "{case}");
                }
                let body = slow.read_to_end().await.unwrap();
                assert_eq!(body.len() as u64, BIG, "{case}");
                assert_eq!(body, test_support::pattern(BIG as usize), "{case}");
                let rec = env.record("/big").await;
                assert_eq!((rec.status, rec.bytes_sent), (200, BIG), "{case}");
                env.stop().await;
            }
        }
    })
    .await;
}

/// A client that leaves while the upstream is still sending (the body far past the buffer):
/// the upstream's connection is closed and its handler stopped, as without the buffer.
#[tokio::test]
async fn a_client_leaving_mid_body_still_stops_the_upstream() {
    bounded(Duration::from_secs(30), async {
        let env = gateway(Up::H1, 1024 * 1024).await;
        let mut c = env.h1().await;
        c.send_request("GET", "/huge", &[], None, b"")
            .await
            .unwrap();
        let head = c.read_final_head().await.unwrap();
        assert_eq!(head.status, 200);
        c.rst().unwrap();
        bounded(Duration::from_secs(10), async {
            while !env
                .log()
                .any(|e| e.path == "/huge" && matches!(e.kind, EventKind::HandlerCancelled))
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(!completed(&env, "/huge"));
        let rec = env.record("/huge").await;
        assert_eq!((rec.status, rec.stage), (499, Some("body")), "{rec:?}");
        env.stop().await;
    })
    .await;
}

/// A client that leaves after the upstream's part was over (the body all in the buffer): its
/// abort is logged, with nothing upstream to cancel, and the upstream connection stays in the
/// pool for the next request.
#[tokio::test]
async fn a_client_leaving_after_the_upstream_finished_cancels_nothing_upstream() {
    bounded(Duration::from_secs(30), async {
        let env = gateway_for(Down::H2c, Up::H1, 4 * 1024 * 1024).await;
        let mut client = env.h2().await;
        let mut c = client.start("GET", "/medium", &[], true).await.unwrap();
        c.response().await.unwrap();
        wait_completed(&env, "/medium").await;
        // The upstream wrote it all; a moment for tether to have read it from the socket.
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.reset(h2::Reason::CANCEL);
        let rec = env.record("/medium").await;
        assert_eq!(rec.status, 499, "{rec:?}");
        assert_eq!(rec.propagation, None, "{rec:?}");
        // The upstream's time ended with its body, not with the client's leaving.
        let upstream = rec.upstream_time.unwrap();
        assert!(
            rec.duration >= upstream + Duration::from_millis(150),
            "{rec:?}"
        );
        let (p, _) = env.http().await.get("/small").await.unwrap();
        assert_eq!(p.status, 200);
        assert_eq!(env.log().accepted(), 1);
        env.stop().await;
    })
    .await;
}

/// Server-sent events through a buffering route: the first event reaches the client while the
/// upstream is still sending the others.
#[tokio::test]
async fn events_pass_one_by_one_through_the_buffer() {
    bounded(Duration::from_secs(30), async {
        let env = gateway(Up::H1, 1024 * 1024).await;
        let mut c = env.h1().await;
        c.send_request("GET", "/events", &[], None, b"")
            .await
            .unwrap();
        let head = c.read_final_head().await.unwrap();
        assert_eq!(head.status, 200);
        let first = c.read_some_raw().await.unwrap();
        assert!(
            String::from_utf8_lossy(&first).contains("data: tick"),
            "{first:?}"
        );
        assert!(!completed(&env, "/events"), "held until the end");
        env.stop().await;
    })
    .await;
}
