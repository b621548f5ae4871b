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

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{BOUND, bounded};
use test_support::behavior::{Behavior, routes};
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

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A namespace with one veth link to the test's namespace. Removed on drop.
struct Netns {
    name: String,
    outer_if: String,
    inner_if: String,
    outer: Ipv4Addr,
    inner: Ipv4Addr,
}

impl Netns {
    fn create() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{n}", pid % 0xfffff);
        // Private addresses, unique per process and namespace: 10.(200+n).(pid % 256).{1,2}/30.
        let b = u8::try_from(200 + n % 50).unwrap();
        let c = (pid % 256) as u8;
        let ns = Netns {
            name: format!("tether-dp-{tag}"),
            outer_if: format!("tdo{tag}"),
            inner_if: format!("tdi{tag}"),
            outer: Ipv4Addr::new(10, b, c, 1),
            inner: Ipv4Addr::new(10, b, c, 2),
        };
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &ns.name])?;
            ip(&[
                "link",
                "add",
                &ns.outer_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns.inner_if,
                "netns",
                &ns.name,
            ])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/30", ns.outer),
                "dev",
                &ns.outer_if,
            ])?;
            ip(&["link", "set", &ns.outer_if, "up"])?;
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{}/30", ns.inner),
                "dev",
                &ns.inner_if,
            ])?;
            ip(&["-n", &ns.name, "link", "set", &ns.inner_if, "up"])?;
            ip(&["-n", &ns.name, "link", "set", "lo", "up"])
        };
        if let Err(e) = setup() {
            drop(ns);
            panic!(
                "the dead-peer test needs root and iproute2 to create a network namespace and a \
                 veth pair, and could not: {e}"
            );
        }
        ns
    }

    /// Connects to `addr` from inside the namespace.
    fn connect(&self, addr: SocketAddr) -> std::net::TcpStream {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open the namespace");
            // This thread only: the socket is created in the namespace and keeps it.
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the test namespace");
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .expect("connect from the namespace")
        })
        .join()
        .unwrap()
    }

    /// Cuts the client's link: nothing more leaves or reaches it, and no FIN or RST is sent.
    fn cut(&self) {
        ip(&["-n", &self.name, "link", "set", &self.inner_if, "down"]).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.outer_if]);
    }
}

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
    let std = ns.connect(addr);
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
    ns.cut();
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
    let std = ns.connect(addr);
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
    ns.cut();
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
