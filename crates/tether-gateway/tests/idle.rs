//! Idle HTTP/1 keep-alive connections are parked (only the socket is kept) and served again on
//! the next request: keep-alive across a park, pipelining across park boundaries, the idle
//! timeout, shutdown, and the client leaving while parked. Raw sockets through the proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{BOUND, Down, Env, Up, bounded};
use test_support::behavior::{Behavior, script};
use test_support::client::{Closed, H1Client};
use tether_gateway::config::HalfClose;
use tether_gateway::downstream::h1::PARK_AFTER;

async fn env() -> Env {
    Env::new(Down::H1, Up::H1, script(|_| Behavior::ok("hi"))).await
}

/// An environment whose idle keep-alive timeout (`header_read_timeout`) is `timeout`.
async fn env_with_idle_timeout(timeout: Duration) -> Env {
    Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("hi")), |c| {
        c.listeners[0].limits.header_read_timeout = timeout
    })
    .await
}

async fn get_ok(c: &mut H1Client, path: &str) {
    let (head, body) = bounded(BOUND, c.get(path)).await.unwrap();
    assert_eq!(head.status, 200, "{path}");
    assert_eq!(&body[..], b"hi", "{path}");
}

/// Reads one response to a request already sent: 200 with body `hi`.
async fn read_ok(c: &mut H1Client) {
    let head = bounded(BOUND, c.read_final_head()).await.unwrap();
    assert_eq!(head.status, 200);
    let body = bounded(BOUND, c.read_body("GET", &head)).await.unwrap();
    assert_eq!(&body[..], b"hi");
}

/// A client whose connection served `GET /a` and is now parked.
async fn parked_client(env: &Env) -> H1Client {
    let mut c = env.h1().await;
    get_ok(&mut c, "/a").await;
    env.wait_parked(1).await;
    c
}

#[tokio::test]
async fn keep_alive_across_a_park() {
    let env = env().await;
    let mut c = parked_client(&env).await;
    get_ok(&mut c, "/b").await;
    assert_eq!(env.parked(), 0, "served, so no longer parked");
    env.wait_parked(1).await;
    get_ok(&mut c, "/c").await;
    // One connection: the same client address on every request.
    let a = env.record("/a").await.client;
    assert_eq!(env.record("/b").await.client, a);
    assert_eq!(env.record("/c").await.client, a);
    env.stop().await;
}

#[tokio::test]
async fn a_connection_in_use_is_not_parked() {
    let env = env().await;
    let mut c = env.h1().await;
    let until = tokio::time::Instant::now() + PARK_AFTER * 3;
    while tokio::time::Instant::now() < until {
        get_ok(&mut c, "/busy").await;
        assert_eq!(env.parked(), 0);
        tokio::time::sleep(PARK_AFTER / 4).await;
    }
    env.stop().await;
}

/// `park_idle_after`: "off" never parks, and a delay longer than the idle spell does not park
/// either; the connection keeps serving (one client address throughout).
#[tokio::test]
async fn park_idle_after_off_or_longer_than_the_pause_keeps_the_connection_active() {
    for setting in [None, Some(Duration::from_secs(30))] {
        let env = Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("hi")), |c| {
            c.listeners[0].limits.park_idle_after = setting
        })
        .await;
        let mut c = env.h1().await;
        get_ok(&mut c, "/a").await;
        tokio::time::sleep(PARK_AFTER * 3).await;
        assert_eq!(env.parked(), 0, "parked with park_idle_after = {setting:?}");
        get_ok(&mut c, "/b").await;
        assert_eq!(env.record("/b").await.client, env.record("/a").await.client);
        env.stop().await;
    }
}

/// A shorter `park_idle_after` parks, and the parked connection is served as with the default.
#[tokio::test]
async fn a_shorter_park_idle_after_parks_and_serves_again() {
    let env = Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("hi")), |c| {
        c.listeners[0].limits.park_idle_after = Some(Duration::from_millis(150))
    })
    .await;
    let mut c = parked_client(&env).await;
    get_ok(&mut c, "/b").await;
    env.stop().await;
}

#[tokio::test]
async fn a_fresh_connection_that_sends_nothing_is_parked_and_served() {
    // HTTP/1 only: with HTTP/2 on too, the first bytes are awaited to tell the protocols apart.
    let env = Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("hi")), |c| {
        c.listeners[0].protocols.h2 = false;
    })
    .await;
    let mut c = env.h1().await;
    env.wait_parked(1).await;
    get_ok(&mut c, "/late").await;
    env.stop().await;
}

#[tokio::test]
async fn pipelined_requests_in_one_write_after_a_park() {
    let env = env().await;
    let mut c = env.h1().await;
    get_ok(&mut c, "/first").await;
    env.wait_parked(1).await;
    c.send_raw(b"GET /p1 HTTP/1.1\r\nhost: l\r\n\r\nGET /p2 HTTP/1.1\r\nhost: l\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..2 {
        read_ok(&mut c).await;
    }
    assert_eq!(
        env.record("/p1").await.client,
        env.record("/p2").await.client
    );
    env.stop().await;
}

#[tokio::test]
async fn a_partial_request_read_ahead_survives_a_park() {
    let env = env().await;
    let mut c = env.h1().await;
    // One write: a whole request and the start of the next, whose rest comes after the park.
    c.send_raw(b"GET /q1 HTTP/1.1\r\nhost: l\r\n\r\nGET /q2 HTTP/1.1\r\nho")
        .await
        .unwrap();
    read_ok(&mut c).await;
    tokio::time::sleep(PARK_AFTER * 2).await;
    c.send_raw(b"st: l\r\n\r\n").await.unwrap();
    read_ok(&mut c).await;
    assert_eq!(
        env.record("/q2").await.client,
        env.record("/q1").await.client
    );
    env.stop().await;
}

#[tokio::test]
async fn the_idle_timeout_closes_a_parked_connection_on_time() {
    // Longer than the park delay, so that the connection parks before it times out.
    let timeout = PARK_AFTER + Duration::from_millis(800);
    let env = env_with_idle_timeout(timeout).await;
    let mut c = env.h1().await;
    get_ok(&mut c, "/a").await;
    let idle_since = tokio::time::Instant::now();
    env.wait_parked(1).await;
    let closed = c.wait_closed(Duration::from_secs(5)).await;
    let waited = idle_since.elapsed();
    assert_eq!(closed, Closed::Eof);
    // The time already idle before the park counts: closed at the timeout, not park + timeout.
    assert!(
        waited >= timeout - Duration::from_millis(50) && waited < timeout + PARK_AFTER,
        "closed after {waited:?}"
    );
    assert_eq!(env.parked(), 0);
    env.stop().await;
}

/// Connections that come back leave their idle deadlines behind, swept out once they outnumber
/// the parked connections. The sweep keeps the deadlines of the connections still parked: those
/// that never came back are closed by the idle timeout like the others.
#[tokio::test]
async fn idle_timeouts_hold_after_many_connections_came_back() {
    const N: usize = 100;
    const BACK: usize = 90;
    let timeout = PARK_AFTER + Duration::from_millis(800);
    let env = env_with_idle_timeout(timeout).await;
    let mut clients = Vec::new();
    for _ in 0..N {
        let mut c = env.h1().await;
        get_ok(&mut c, "/a").await;
        clients.push(c);
    }
    env.wait_parked(N).await;
    // 90 come back: more stale deadlines than parked connections, so they are swept while the
    // last 10 are still parked.
    for c in clients.iter_mut().take(BACK) {
        get_ok(c, "/b").await;
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_ne!(
            c.wait_closed(timeout + Duration::from_secs(2)).await,
            Closed::StillOpen,
            "connection {i} outlived the idle timeout"
        );
    }
    assert_eq!(env.parked(), 0);
    env.stop().await;
}

#[tokio::test]
async fn the_idle_timeout_still_bounds_a_slow_head_after_a_park() {
    // Longer than the park delay, so that the connection parks before it times out.
    let timeout = PARK_AFTER + Duration::from_millis(800);
    let env = env_with_idle_timeout(timeout).await;
    let mut c = env.h1().await;
    get_ok(&mut c, "/a").await;
    let idle_since = tokio::time::Instant::now();
    env.wait_parked(1).await;
    // Wakes the connection, then stalls: the head must still come within the idle timeout.
    c.send_raw(b"GET /slow HTTP/1.1\r\nx-slow: ").await.unwrap();
    let closed = c.wait_closed(Duration::from_secs(5)).await;
    let waited = idle_since.elapsed();
    assert_ne!(closed, Closed::StillOpen);
    assert!(waited < timeout + PARK_AFTER, "closed after {waited:?}");
    assert!(env.records("/slow").is_empty());
    env.stop().await;
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let env = env().await;
    let mut c = parked_client(&env).await;
    let started = tokio::time::Instant::now();
    // A long grace: a parked connection has nothing in flight and must not wait for it.
    let stopping = tokio::spawn(env.stop_with_grace(Duration::from_secs(30)));
    assert_eq!(c.wait_closed(Duration::from_secs(5)).await, Closed::Eof);
    bounded(Duration::from_secs(5), stopping).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_fin_while_parked_closes_the_connection() {
    let env = env().await;
    let mut c = parked_client(&env).await;
    c.fin().unwrap();
    assert_eq!(c.wait_closed(BOUND).await, Closed::Eof);
    env.wait_parked(0).await;
    env.stop().await;
}

/// A request and a FIN in one go to a parked connection (one readiness event that says both):
/// the request is served, not taken for a close. The route keeps serving half-closed clients.
#[tokio::test]
async fn a_request_then_a_fin_while_parked_is_served() {
    let env = Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("hi")), |c| {
        c.listeners[0].routes[0].client_half_close = HalfClose::Continue;
    })
    .await;
    let mut c = parked_client(&env).await;
    c.send_raw(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    c.fin().unwrap();
    read_ok(&mut c).await;
    assert_eq!(env.record("/b").await.status, 200);
    env.stop().await;
}

#[tokio::test]
async fn tls_connections_are_not_parked() {
    let env = Env::new(Down::H2Tls, Up::H1, script(|_| Behavior::ok("hi"))).await;
    let mut c = env.h1().await;
    get_ok(&mut c, "/a").await;
    tokio::time::sleep(PARK_AFTER * 2).await;
    assert_eq!(env.parked(), 0);
    get_ok(&mut c, "/b").await;
    env.stop().await;
}

#[tokio::test]
async fn many_parked_connections_come_back_at_once_and_resets_close_them() {
    const N: usize = 100;
    let env = env().await;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut c = env.h1().await;
        get_ok(&mut c, &format!("/first/{i}")).await;
        clients.push(c);
    }
    env.wait_parked(N).await;
    // Every parked connection wakes in the same moment: each is served on its own socket.
    let served: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                get_ok(&mut c, &format!("/again/{i}")).await;
                c
            })
        })
        .collect();
    let mut clients = Vec::new();
    for s in served {
        clients.push(bounded(BOUND, s).await.unwrap());
    }
    for i in [0, N / 2, N - 1] {
        assert_eq!(
            env.record(&format!("/again/{i}")).await.client,
            env.record(&format!("/first/{i}")).await.client,
            "request {i} came back on its own connection"
        );
    }
    env.wait_parked(N).await;
    // A reset while parked closes the connection; the others stay parked.
    let mut clients = clients.into_iter();
    for c in clients.by_ref().take(N / 2) {
        c.rst().unwrap();
    }
    env.wait_parked(N / 2).await;
    for mut c in clients {
        get_ok(&mut c, "/last").await;
    }
    env.stop().await;
}

/// `max_requests_per_connection` on HTTP/1: the last request's response says `Connection:
/// close` and the connection ends after it; the count holds across parks.
#[tokio::test]
async fn an_h1_client_connection_closes_after_its_share_of_requests_parks_included() {
    let env = Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("hi")), |c| {
        c.listeners[0].limits.max_requests_per_connection = std::num::NonZeroU32::new(3);
    })
    .await;
    let mut c = parked_client(&env).await;
    let (head, _) = bounded(BOUND, c.get("/b")).await.unwrap();
    assert_eq!(head.header("connection"), None);
    env.wait_parked(1).await;
    let (head, body) = bounded(BOUND, c.get("/c")).await.unwrap();
    assert_eq!((head.status, &body[..]), (200, &b"hi"[..]));
    assert_eq!(head.header("connection"), Some("close"));
    assert_eq!(c.wait_closed(BOUND).await, Closed::Eof);
    // A new connection starts its count afresh.
    let mut c = env.h1().await;
    let (head, _) = bounded(BOUND, c.get("/d")).await.unwrap();
    assert_eq!(head.header("connection"), None);
    env.stop().await;
}

/// `max_connection_age` on HTTP/1: the first response after it closes the connection, even one
/// that was parked meanwhile.
#[tokio::test]
async fn an_h1_client_connection_past_its_age_closes_after_its_next_response() {
    let env = Env::with(Down::H1, Up::H1, script(|_| Behavior::ok("hi")), |c| {
        c.listeners[0].limits.max_connection_age = Some(Duration::from_millis(800));
    })
    .await;
    let mut c = parked_client(&env).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (head, _) = bounded(BOUND, c.get("/b")).await.unwrap();
    assert_eq!(
        (head.status, head.header("connection")),
        (200, Some("close"))
    );
    assert_eq!(c.wait_closed(BOUND).await, Closed::Eof);
    env.stop().await;
}

/// Waits until the server has ended `c`'s connection.
async fn h2_closed(c: &test_support::client::H2Client) {
    bounded(BOUND, async {
        while !c.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// On HTTP/2 the connection's last stream, or its age, sends GOAWAY: the streams in flight
/// finish and the connection ends.
#[tokio::test]
async fn an_h2_client_connection_is_sent_goaway_after_its_share_or_its_age() {
    let env = Env::with(Down::H2c, Up::H1, script(|_| Behavior::ok("hi")), |c| {
        c.listeners[0].limits.max_requests_per_connection = std::num::NonZeroU32::new(2);
    })
    .await;
    let mut c = env.h2().await;
    for path in ["/a", "/b"] {
        let (parts, body) = bounded(BOUND, c.get(path)).await.unwrap();
        assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"hi"[..]));
    }
    h2_closed(&c).await;
    env.stop().await;

    let env = Env::with(Down::H2c, Up::H1, script(|_| Behavior::ok("hi")), |c| {
        c.listeners[0].limits.max_connection_age = Some(Duration::from_millis(300));
    })
    .await;
    let mut c = env.h2().await;
    let (parts, _) = bounded(BOUND, c.get("/a")).await.unwrap();
    assert_eq!(parts.status, 200);
    h2_closed(&c).await;
    env.stop().await;
}
