//! A client that dies silently (its link is cut: no FIN, no RST) while its request is in
//! flight: the gateway's dead-peer probing must abort the upstream work with reason `peer_dead`
//! within the default bound (about 2 s after the client was last heard).
//!
//! The client runs in a network namespace the test creates, joined to the test's own namespace by
//! a veth pair with private /30 addresses the test chooses; traffic stays inside these two
//! namespaces. Needs root and iproute2 (`ip`); without them the test fails with a message saying
//! so, it never skips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::{BOUND, bounded};
use test_support::behavior::{Behavior, routes};
use test_support::netns::Netns;
use test_support::{EventKind, UpstreamH1};
use tether::CancelReason;
use tether_gateway::config::*;
use tether_gateway::observe::access::MemoryAccessLog;
use tether_gateway::{Gateway, RunningGateway};
use tokio::io::AsyncWriteExt;

/// Detection with the defaults: keepalive armed after 1 s in flight, 1 s idle + 1 probe at 1 s.
/// Measured from the cut, which comes right after the request: about 2 s. Slack for a loaded
/// machine.
const DEAD_PEER_BOUND: Duration = Duration::from_millis(3500);

async fn start(ns: &Netns, up: &UpstreamH1) -> (RunningGateway, MemoryAccessLog, SocketAddr) {
    let listener = ListenerConfig::new(
        SocketAddr::new(IpAddr::V4(ns.outer), 0),
        vec![RouteConfig::new("/", "up")],
    );
    let upstream = UpstreamConfig::new("up", vec![up.addr().into()], UpstreamProtocol::Http1);
    let mut config = Config::new(vec![listener], vec![upstream]);
    config.workers = std::num::NonZeroUsize::new(1);
    let access = MemoryAccessLog::new();
    let gw = Gateway::start(config, Arc::new(access.clone())).unwrap();
    let addr = gw.listener_addrs()[0];
    (gw, access, addr)
}

async fn record_of(
    access: &MemoryAccessLog,
    path: &str,
) -> tether_gateway::observe::access::RequestRecord {
    bounded(BOUND, async {
        loop {
            if let Some(r) = access.records().into_iter().find(|r| r.path == path) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Waits for the upstream to see the request's connection close, returning when.
async fn upstream_abort(up: &UpstreamH1, path: &str) -> tokio::time::Instant {
    let ev = up
        .log()
        .wait_for(Duration::from_secs(10), |e| {
            (e.path == path && e.kind == EventKind::HandlerCancelled)
                || (e.kind.is_h1_close() && e.conn == 1)
        })
        .await
        .expect("upstream never saw the abort");
    ev.at
}

#[tokio::test]
async fn silent_h1_client_is_dead_within_bound() {
    let ns = Netns::create();
    let up = UpstreamH1::start(routes(vec![("/wait", Behavior::Never)]))
        .await
        .unwrap();
    let (gw, access, addr) = start(&ns, &up).await;
    let std = ns.connect(addr).unwrap();
    std.set_nonblocking(true).unwrap();
    let mut client = tokio::net::TcpStream::from_std(std).unwrap();
    client
        .write_all(b"GET /wait HTTP/1.1\r\nhost: dead.test\r\n\r\n")
        .await
        .unwrap();
    up.log()
        .wait_request("/wait", BOUND)
        .await
        .expect("request reached the upstream");
    let cut_at = tokio::time::Instant::now();
    ns.cut().unwrap();
    let aborted = bounded(Duration::from_secs(12), upstream_abort(&up, "/wait")).await;
    let took = aborted - cut_at;
    let rec = record_of(&access, "/wait").await;
    assert_eq!(rec.abort_reason, Some(CancelReason::PeerDead), "{rec:?}");
    assert!(
        took <= DEAD_PEER_BOUND,
        "dead client found after {took:?}, bound {DEAD_PEER_BOUND:?}"
    );
    eprintln!("h1: dead client detected {took:?} after the cut");
    drop(client);
    let _ = tokio::task::spawn_blocking(move || gw.shutdown(Duration::from_millis(100))).await;
}

#[tokio::test]
async fn silent_h2_client_is_dead_within_bound() {
    let ns = Netns::create();
    let up = UpstreamH1::start(routes(vec![("/wait2", Behavior::Never)]))
        .await
        .unwrap();
    let (gw, access, addr) = start(&ns, &up).await;
    let std = ns.connect(addr).unwrap();
    std.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(std).unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = http::Request::get("http://dead.test/wait2")
        .body(())
        .unwrap();
    let (_resp, _stream) = send.send_request(req, true).unwrap();
    up.log()
        .wait_request("/wait2", BOUND)
        .await
        .expect("request reached the upstream");
    let cut_at = tokio::time::Instant::now();
    ns.cut().unwrap();
    let aborted = bounded(Duration::from_secs(12), upstream_abort(&up, "/wait2")).await;
    let took = aborted - cut_at;
    let rec = record_of(&access, "/wait2").await;
    assert_eq!(rec.abort_reason, Some(CancelReason::PeerDead), "{rec:?}");
    assert!(
        took <= DEAD_PEER_BOUND,
        "dead client found after {took:?}, bound {DEAD_PEER_BOUND:?}"
    );
    eprintln!("h2: dead client detected {took:?} after the cut");
    conn.abort();
    let _ = tokio::task::spawn_blocking(move || gw.shutdown(Duration::from_millis(100))).await;
}
