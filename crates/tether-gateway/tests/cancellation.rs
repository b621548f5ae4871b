//! End-to-end cancellation, for every pair of downstream {h1, h2c, h2+TLS} and upstream
//! {h1, h2c, h2+TLS}: the client leaves (FIN, RST, RST_STREAM, connection loss) while uploading,
//! while waiting for the first byte, or while the response streams, and the test upstream must see
//! the abort on the wire (EOF for HTTP/1, RST_STREAM(CANCEL) for HTTP/2) within 2 s, its handler
//! must never complete, an HTTP/2 upstream connection must keep serving, and the access log must
//! hold one 499 record with the matching reason and stage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use h2::Reason;
use test_support::behavior::{Behavior, Script, routes};
use test_support::client::{H1Client, H2Client};
use test_support::{Event, EventKind};
use tether::CancelReason;
use tether_gateway::config::HalfClose;
use tether_gateway::observe::access::Outcome;
use tokio::time::Instant;

/// Declared upload size: large enough that no proxy would buffer it before forwarding.
const UPLOAD_LEN: u64 = 8 * 1024 * 1024;
/// What is actually sent before the client leaves.
const UPLOAD_SENT: usize = 256 * 1024;

fn script() -> Script {
    routes(vec![
        ("/upload", Behavior::Summary),
        ("/wait", Behavior::stall_ms(5_000, "too late")),
        (
            "/stream",
            Behavior::stream(Bytes::from(vec![b'x'; 1024]), 100, 50),
        ),
        ("/ok", Behavior::ok("fine")),
    ])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abort {
    /// HTTP/1: shutdown(SHUT_WR).
    Fin,
    /// HTTP/1: SO_LINGER 0 and close.
    Rst,
    /// HTTP/2: RST_STREAM(CANCEL) on the request's stream.
    StreamReset,
    /// HTTP/2: the TCP connection reset under the h2 client.
    ConnLost,
}

impl Abort {
    fn reason(self) -> CancelReason {
        match self {
            Abort::Fin => CancelReason::ClientClosed,
            Abort::Rst => CancelReason::ClientReset,
            Abort::StreamReset => CancelReason::StreamReset,
            Abort::ConnLost => CancelReason::ConnectionLost,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Mid request body.
    Upload,
    /// Request sent, no response head yet.
    FirstByte,
    /// Response head and some body received.
    Streaming,
}

impl Phase {
    fn path(self) -> &'static str {
        match self {
            Phase::Upload => "/upload",
            Phase::FirstByte => "/wait",
            Phase::Streaming => "/stream",
        }
    }

    fn stage(self) -> &'static str {
        match self {
            Phase::Upload => "request_body",
            Phase::FirstByte => "first_byte",
            Phase::Streaming => "body",
        }
    }
}

/// Holds the client until the checks are done (a FIN'd client must not close fully, which could
/// turn into an RST).
enum Kept {
    H1(#[allow(dead_code)] H1Client),
    H2(H2Client),
    None,
}

async fn h1_abort(env: &Env, phase: Phase, abort: Abort) -> (Kept, Instant) {
    let mut c = env.h1().await;
    let path = phase.path();
    match phase {
        Phase::Upload => c
            .send_request("POST", path, &[], Some(UPLOAD_LEN), &vec![1u8; UPLOAD_SENT])
            .await
            .unwrap(),
        Phase::FirstByte => c.send_request("GET", path, &[], None, b"").await.unwrap(),
        Phase::Streaming => {
            c.send_request("GET", path, &[], None, b"").await.unwrap();
            let h = c.read_final_head().await.unwrap();
            assert_eq!(h.status, 200);
            assert!(!c.read_some_raw().await.unwrap().is_empty());
        }
    }
    env.log()
        .wait_request(path, BOUND)
        .await
        .unwrap_or_else(|| panic!("upstream never saw {path}"));
    if phase == Phase::Upload {
        // Let part of the body reach the upstream.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at = Instant::now();
    match abort {
        Abort::Fin => {
            c.fin().unwrap();
            (Kept::H1(c), at)
        }
        Abort::Rst => {
            c.rst().unwrap();
            (Kept::None, at)
        }
        _ => unreachable!("not an HTTP/1 abort"),
    }
}

async fn h2_abort(env: &Env, phase: Phase, abort: Abort) -> (Kept, Instant) {
    let mut c = env.h2().await;
    let path = phase.path();
    let mut s = match phase {
        Phase::Upload => {
            let len = UPLOAD_LEN.to_string();
            let mut s = c
                .start("POST", path, &[("content-length", &len)], false)
                .await
                .unwrap();
            s.send_data(vec![1u8; UPLOAD_SENT], false).unwrap();
            s
        }
        Phase::FirstByte => c.start("GET", path, &[], true).await.unwrap(),
        Phase::Streaming => {
            let mut s = c.start("GET", path, &[], true).await.unwrap();
            assert_eq!(s.response().await.unwrap().status, 200);
            assert!(!s.data().await.unwrap().unwrap().is_empty());
            s
        }
    };
    env.log()
        .wait_request(path, BOUND)
        .await
        .unwrap_or_else(|| panic!("upstream never saw {path}"));
    if phase == Phase::Upload {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at = Instant::now();
    match abort {
        Abort::StreamReset => {
            s.reset(Reason::CANCEL);
            (Kept::H2(c), at)
        }
        Abort::ConnLost => {
            // Keep the stream handle: only the connection's death may end it.
            let _ = s.data().await;
            c.kill(true).unwrap();
            (Kept::None, at)
        }
        _ => unreachable!("not an HTTP/2 abort"),
    }
}

fn same_request(started: &Event) -> impl Fn(&Event) -> bool + '_ {
    move |e| e.conn == started.conn && e.stream == started.stream
}

/// The wire check on the upstream side; returns when the abort was seen.
async fn upstream_saw_abort(env: &Env, phase: Phase) -> Instant {
    let log = env.log();
    let started = log.wait_request(phase.path(), BOUND).await.unwrap();
    let req = same_request(&started);
    let seen = if env.up_is_h2() {
        let ev = log
            .wait_for(BOUND, |e| {
                req(e)
                    && matches!(
                        e.kind,
                        EventKind::StreamReset { .. } | EventKind::StreamError { .. }
                    )
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "h2 upstream saw no reset within {BOUND:?}: {:#?}",
                    log.events()
                )
            });
        assert_eq!(
            ev.kind,
            EventKind::StreamReset {
                reason: Reason::CANCEL
            },
            "the upstream stream must be reset with CANCEL"
        );
        ev
    } else {
        let ev = log
            .wait_for(BOUND, |e| e.conn == started.conn && e.kind.is_h1_close())
            .await
            .unwrap_or_else(|| {
                panic!(
                    "h1 upstream saw no close within {BOUND:?}: {:#?}",
                    log.events()
                )
            });
        if phase != Phase::Streaming {
            // Nothing unread on the proxy's side: the close must be a clean FIN.
            assert_eq!(ev.kind, EventKind::Eof);
        }
        ev
    };
    log.wait_for(BOUND, |e| req(e) && e.kind == EventKind::HandlerCancelled)
        .await
        .unwrap_or_else(|| panic!("upstream handler not stopped: {:#?}", log.events()));
    assert!(
        !log.any(|e| req(e) && e.kind == EventKind::HandlerCompleted),
        "an aborted upstream handler completed"
    );
    if phase == Phase::Upload {
        assert!(
            !log.any(|e| req(e) && matches!(e.kind, EventKind::BodyComplete { .. })),
            "the upstream saw a complete (silently truncated) request body"
        );
    }
    seen.at
}

async fn case(down: Down, up: Up, abort: Abort, phase: Phase) {
    bounded(Duration::from_secs(15), async {
        let env = Env::new(down, up, script()).await;
        let (kept, aborted_at) = match down {
            Down::H1 => h1_abort(&env, phase, abort).await,
            Down::H2c | Down::H2Tls => h2_abort(&env, phase, abort).await,
        };
        let seen_at = upstream_saw_abort(&env, phase).await;
        eprintln!(
            "{down:?} -> {up:?} {abort:?} during {phase:?}: upstream saw it after {:?}",
            seen_at.saturating_duration_since(aborted_at)
        );

        let rec = env.record(phase.path()).await;
        assert_eq!(rec.status, 499, "{rec:?}");
        assert_eq!(rec.outcome, Outcome::ClientAbort, "{rec:?}");
        assert_eq!(rec.abort_reason, Some(abort.reason()), "{rec:?}");
        assert_eq!(rec.stage, Some(phase.stage()), "{rec:?}");
        assert_eq!(env.records(phase.path()).len(), 1);

        if env.up_is_h2() {
            // The upstream connection survived the stream's reset and serves the next request.
            let mut c = env.http().await;
            let (p, b) = c.get("/ok").await.unwrap();
            assert_eq!(p.status, 200);
            assert_eq!(&b[..], b"fine");
            assert_eq!(
                env.log().accepted(),
                1,
                "the h2 upstream connection was replaced"
            );
        }
        if let Kept::H2(mut c) = kept {
            // The downstream connection too: only the one stream was reset.
            let (p, b) = c.get("/ok").await.unwrap();
            assert_eq!(p.status, 200);
            assert_eq!(&b[..], b"fine");
        }
        env.stop().await;
    })
    .await
}

macro_rules! h1_downstream {
    ($($m:ident => $up:expr),* $(,)?) => {$(
        mod $m {
            use super::*;
            #[tokio::test] async fn fin_upload() { case(Down::H1, $up, Abort::Fin, Phase::Upload).await }
            #[tokio::test] async fn fin_first_byte() { case(Down::H1, $up, Abort::Fin, Phase::FirstByte).await }
            #[tokio::test] async fn fin_streaming() { case(Down::H1, $up, Abort::Fin, Phase::Streaming).await }
            #[tokio::test] async fn rst_upload() { case(Down::H1, $up, Abort::Rst, Phase::Upload).await }
            #[tokio::test] async fn rst_first_byte() { case(Down::H1, $up, Abort::Rst, Phase::FirstByte).await }
            #[tokio::test] async fn rst_streaming() { case(Down::H1, $up, Abort::Rst, Phase::Streaming).await }
        }
    )*};
}

macro_rules! h2_downstream {
    ($($m:ident => $down:expr, $up:expr),* $(,)?) => {$(
        mod $m {
            use super::*;
            #[tokio::test] async fn stream_reset_upload() { case($down, $up, Abort::StreamReset, Phase::Upload).await }
            #[tokio::test] async fn stream_reset_first_byte() { case($down, $up, Abort::StreamReset, Phase::FirstByte).await }
            #[tokio::test] async fn stream_reset_streaming() { case($down, $up, Abort::StreamReset, Phase::Streaming).await }
            #[tokio::test] async fn conn_lost_upload() { case($down, $up, Abort::ConnLost, Phase::Upload).await }
            #[tokio::test] async fn conn_lost_first_byte() { case($down, $up, Abort::ConnLost, Phase::FirstByte).await }
            #[tokio::test] async fn conn_lost_streaming() { case($down, $up, Abort::ConnLost, Phase::Streaming).await }
        }
    )*};
}

h1_downstream!(
    h1_to_h1 => Up::H1,
    h1_to_h2c => Up::H2c,
    h1_to_h2tls => Up::H2Tls,
);

h2_downstream!(
    h2c_to_h1 => Down::H2c, Up::H1,
    h2c_to_h2c => Down::H2c, Up::H2c,
    h2c_to_h2tls => Down::H2c, Up::H2Tls,
    h2tls_to_h1 => Down::H2Tls, Up::H1,
    h2tls_to_h2c => Down::H2Tls, Up::H2c,
    h2tls_to_h2tls => Down::H2Tls, Up::H2Tls,
);

/// `client_half_close = "continue"`: an HTTP/1 client that half-closes after its GET still gets
/// the whole answer, and the upstream is not aborted.
#[tokio::test]
async fn half_close_continue_keeps_the_request() {
    bounded(Duration::from_secs(15), async {
        for up in ALL_UP {
            let script = routes(vec![("/slow", Behavior::stall_ms(300, "complete answer"))]);
            let env = Env::with(Down::H1, up, script, |c| {
                c.listeners[0].routes[0].client_half_close = HalfClose::Continue;
            })
            .await;
            let mut c = env.h1().await;
            c.send_request("GET", "/slow", &[], None, b"")
                .await
                .unwrap();
            env.log().wait_request("/slow", BOUND).await.unwrap();
            c.fin().unwrap();
            let h = c.read_final_head().await.unwrap();
            assert_eq!(h.status, 200, "{up:?}");
            assert_eq!(
                &c.read_body("GET", &h).await.unwrap()[..],
                b"complete answer"
            );
            let log = env.log();
            assert!(
                log.wait_for(BOUND, |e| e.path == "/slow"
                    && e.kind == EventKind::HandlerCompleted)
                    .await
                    .is_some()
            );
            assert!(!log.any(|e| e.path == "/slow"
                && (e.kind == EventKind::HandlerCancelled
                    || matches!(e.kind, EventKind::StreamReset { .. }))));
            let rec = env.record("/slow").await;
            assert_eq!(rec.status, 200);
            assert_eq!(rec.outcome, Outcome::Ok);
            env.stop().await;
        }
    })
    .await
}

/// The default policy (`abort`) on the same half-close: the upstream is stopped.
#[tokio::test]
async fn half_close_abort_is_the_default() {
    bounded(Duration::from_secs(10), async {
        let script = routes(vec![("/slow", Behavior::stall_ms(3_000, "late"))]);
        let env = Env::new(Down::H1, Up::H1, script).await;
        let mut c = env.h1().await;
        c.send_request("GET", "/slow", &[], None, b"")
            .await
            .unwrap();
        env.log().wait_request("/slow", BOUND).await.unwrap();
        c.fin().unwrap();
        assert!(
            env.log()
                .wait_for(BOUND, |e| e.kind == EventKind::Eof)
                .await
                .is_some()
        );
        let rec = env.record("/slow").await;
        assert_eq!(rec.status, 499);
        assert_eq!(rec.abort_reason, Some(CancelReason::ClientClosed));
        drop(c);
        env.stop().await;
    })
    .await
}
