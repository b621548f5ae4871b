//! The peers checked against each other, so integration tests can trust them.

use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use http::Method;

use crate::behavior::{Behavior, Ending, Reply, routes};
use crate::client::{Closed, H1Client, H2Client, HttpClient, Proto, full};
use crate::events::{EventKind, EventLog};
use crate::tls::{ALPN_H2, ALPN_HTTP1, TestPki};
use crate::{Checksum, UpstreamH1, UpstreamH2};

const T: Duration = Duration::from_secs(2);

fn table() -> crate::behavior::Script {
    routes(vec![
        ("/ok", Behavior::ok("hello")),
        ("/stall", Behavior::stall_ms(5_000, "late")),
        ("/never", Behavior::Never),
        ("/stream", Behavior::stream("tick\n", 50, 50)),
        ("/chunks", Behavior::stream("tick\n", 5, 10)),
        ("/sum", Behavior::Summary),
        (
            "/trailers",
            Behavior::Respond(Reply::ok("body").trailer("x-checksum", "abc")),
        ),
        (
            "/truncate-rst",
            Behavior::Truncate {
                content_length: Some(100),
                sent: Bytes::from_static(b"0123456789"),
                ending: Ending::Rst,
            },
        ),
        (
            "/truncate-reset",
            Behavior::Truncate {
                content_length: None,
                sent: Bytes::from_static(b"0123456789"),
                ending: Ending::StreamReset(Reason::INTERNAL_ERROR),
            },
        ),
    ])
}

async fn stopped(log: &EventLog, path: &str, what: impl Fn(&EventKind) -> bool) {
    let ev = log
        .wait_for(T, |e| e.path == path && what(&e.kind))
        .await
        .unwrap_or_else(|| panic!("no matching event for {path}: {:#?}", log.events()));
    let _ = ev;
    assert!(
        log.wait_for(T, |e| e.path == path
            && e.kind == EventKind::HandlerCancelled)
            .await
            .is_some()
    );
    assert!(!log.any(|e| e.path == path && e.kind == EventKind::HandlerCompleted));
}

#[tokio::test]
async fn h1_get_and_keepalive() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH1::start(table()).await.unwrap();
        let mut c = H1Client::connect(up.addr()).await.unwrap();
        let (h, b) = c.get("/ok").await.unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(&b[..], b"hello");
        let (h, _) = c.get("/nope").await.unwrap();
        assert_eq!(h.status, 404);
        assert_eq!(up.log().accepted(), 1);
        assert!(
            up.log()
                .any(|e| e.path == "/ok" && e.kind == EventKind::HandlerCompleted)
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h1_fin_while_stalled_is_eof() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH1::start(table()).await.unwrap();
        let mut c = H1Client::connect(up.addr()).await.unwrap();
        c.send_request("GET", "/stall", &[], None, b"")
            .await
            .unwrap();
        up.log().wait_request("/stall", T).await.unwrap();
        c.fin().unwrap();
        stopped(up.log(), "/stall", |k| *k == EventKind::Eof).await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h1_rst_while_never_is_reset() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH1::start(table()).await.unwrap();
        let mut c = H1Client::connect(up.addr()).await.unwrap();
        c.send_request("GET", "/never", &[], None, b"")
            .await
            .unwrap();
        up.log().wait_request("/never", T).await.unwrap();
        c.rst().unwrap();
        stopped(up.log(), "/never", |k| *k == EventKind::Reset).await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h1_partial_upload_then_fin_is_body_aborted() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH1::start(table()).await.unwrap();
        let mut c = H1Client::connect(up.addr()).await.unwrap();
        c.send_request("POST", "/sum", &[], Some(1000), &[7u8; 100])
            .await
            .unwrap();
        up.log().wait_request("/sum", T).await.unwrap();
        c.fin().unwrap();
        stopped(up.log(), "/sum", |k| {
            *k == EventKind::BodyAborted { len: 100 }
        })
        .await;
        assert!(
            up.log()
                .any(|e| e.path == "/sum" && e.kind == EventKind::Eof)
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h1_upload_summary_and_100_continue() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH1::start(table()).await.unwrap();
        let mut c = H1Client::connect(up.addr()).await.unwrap();
        let body = crate::pattern(10_000);
        c.send_request(
            "POST",
            "/sum",
            &[("expect", "100-continue")],
            Some(10_000),
            b"",
        )
        .await
        .unwrap();
        let h = c.read_head().await.unwrap();
        assert_eq!(h.status, 100);
        c.send_raw(&body).await.unwrap();
        let h = c.read_final_head().await.unwrap();
        let b = c.read_body("POST", &h).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&b),
            format!("10000 {}", Checksum::of(&body))
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h1_truncated_response_is_an_error() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH1::start(table()).await.unwrap();
        let mut c = H1Client::connect(up.addr()).await.unwrap();
        c.send_request("GET", "/truncate-rst", &[], None, b"")
            .await
            .unwrap();
        let h = c.read_final_head().await.unwrap();
        assert_eq!(h.status, 200);
        assert!(c.read_body("GET", &h).await.is_err());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h2_reset_cancel_is_seen_and_connection_survives() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH2::start(table()).await.unwrap();
        let mut c = H2Client::connect(up.addr()).await.unwrap();
        let s = c.start("GET", "/stall", &[], true).await.unwrap();
        up.log().wait_request("/stall", T).await.unwrap();
        s.reset(Reason::CANCEL);
        stopped(up.log(), "/stall", |k| {
            *k == EventKind::StreamReset {
                reason: Reason::CANCEL,
            }
        })
        .await;
        let (p, b) = c.get("/ok").await.unwrap();
        assert_eq!(p.status, 200);
        assert_eq!(&b[..], b"hello");
        assert_eq!(up.log().accepted(), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h2_abandoned_stream_mid_response_is_cancel() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH2::start(table()).await.unwrap();
        let mut c = H2Client::connect(up.addr()).await.unwrap();
        let mut s = c.start("GET", "/stream", &[], true).await.unwrap();
        let p = s.response().await.unwrap();
        assert_eq!(p.status, 200);
        assert_eq!(&s.data().await.unwrap().unwrap()[..], b"tick\n");
        s.abandon();
        stopped(up.log(), "/stream", |k| {
            *k == EventKind::StreamReset {
                reason: Reason::CANCEL,
            }
        })
        .await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h2_connection_kill_is_seen_by_every_stream() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH2::start(table()).await.unwrap();
        let mut c = H2Client::connect(up.addr()).await.unwrap();
        let _a = c.start("GET", "/never", &[], true).await.unwrap();
        let _b = c.start("GET", "/stall", &[], true).await.unwrap();
        up.log().wait_request("/never", T).await.unwrap();
        up.log().wait_request("/stall", T).await.unwrap();
        c.kill(true).unwrap();
        for p in ["/never", "/stall"] {
            stopped(up.log(), p, |k| matches!(k, EventKind::StreamError { .. })).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h2_upstream_reset_mid_body_reaches_client() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH2::start(table()).await.unwrap();
        let mut c = H2Client::connect(up.addr()).await.unwrap();
        let mut s = c.start("GET", "/truncate-reset", &[], true).await.unwrap();
        s.response().await.unwrap();
        let e = s.read_to_end().await.unwrap_err();
        assert_eq!(e.reason(), Some(Reason::INTERNAL_ERROR));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h2_partial_upload_reset_is_body_aborted() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH2::start(table()).await.unwrap();
        let mut c = H2Client::connect(up.addr()).await.unwrap();
        let mut s = c.start("POST", "/sum", &[], false).await.unwrap();
        s.send_data(vec![1u8; 50], false).unwrap();
        up.log().wait_for(T, |e| e.path == "/sum").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.reset(Reason::CANCEL);
        stopped(up.log(), "/sum", |k| {
            *k == EventKind::StreamReset {
                reason: Reason::CANCEL,
            }
        })
        .await;
        assert!(
            up.log()
                .any(|e| e.path == "/sum" && e.kind == EventKind::BodyAborted { len: 50 })
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn tls_peers_and_hyper_client() {
    tokio::time::timeout(T * 3, async {
        let pki = TestPki::generate().unwrap();
        let h2up = UpstreamH2::start_tls(table(), pki.server_config(&[ALPN_H2]).unwrap())
            .await
            .unwrap();
        let h1up = UpstreamH1::start_tls(table(), pki.server_config(&[ALPN_HTTP1]).unwrap())
            .await
            .unwrap();

        let mut raw = H2Client::connect_tls(h2up.addr(), pki.client_config(&[ALPN_H2]).unwrap())
            .await
            .unwrap();
        let mut s = raw.start("GET", "/trailers", &[], true).await.unwrap();
        s.response().await.unwrap();
        assert_eq!(&s.read_to_end().await.unwrap()[..], b"body");
        let t = s.trailers().await.unwrap().unwrap();
        assert_eq!(t["x-checksum"], "abc");

        let mut c = HttpClient::connect(
            h2up.addr(),
            Proto::H2,
            Some(pki.client_config(&[ALPN_H2]).unwrap()),
        )
        .await
        .unwrap();
        let req = c.request(Method::POST, "/sum").body(full("abc")).unwrap();
        let (p, b, _) = c.fetch(req).await.unwrap();
        assert_eq!(p.status, 200);
        assert_eq!(
            String::from_utf8_lossy(&b),
            format!("3 {}", Checksum::of(b"abc"))
        );

        let mut c = HttpClient::connect(
            h1up.addr(),
            Proto::Http1,
            Some(pki.client_config(&[ALPN_HTTP1]).unwrap()),
        )
        .await
        .unwrap();
        let (p, b) = c.get("/ok").await.unwrap();
        assert_eq!(p.status, 200);
        assert_eq!(&b[..], b"hello");

        let mut c = H1Client::connect_tls(h1up.addr(), pki.client_config(&[]).unwrap())
            .await
            .unwrap();
        c.send_request("GET", "/never", &[], None, b"")
            .await
            .unwrap();
        h1up.log().wait_request("/never", T).await.unwrap();
        c.rst().unwrap();
        stopped(h1up.log(), "/never", |k| k.is_h1_close()).await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn hyper_clients_cleartext() {
    tokio::time::timeout(T * 2, async {
        let h1up = UpstreamH1::start(table()).await.unwrap();
        let h2up = UpstreamH2::start(table()).await.unwrap();
        for (addr, proto) in [(h1up.addr(), Proto::Http1), (h2up.addr(), Proto::H2)] {
            let mut c = HttpClient::connect(addr, proto, None).await.unwrap();
            let (p, b) = c.get("/chunks").await.unwrap();
            assert_eq!(p.status, 200, "{proto:?}");
            assert_eq!(b.len(), 5 * 5);
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn server_close_is_seen_by_h1_client() {
    tokio::time::timeout(T * 2, async {
        let up = UpstreamH1::start(routes(vec![(
            "/close",
            Behavior::CloseBeforeHeaders(Ending::Fin),
        )]))
        .await
        .unwrap();
        let mut c = H1Client::connect(up.addr()).await.unwrap();
        c.send_request("GET", "/close", &[], None, b"")
            .await
            .unwrap();
        assert_eq!(c.wait_closed(T).await, Closed::Eof);
    })
    .await
    .unwrap();
}
