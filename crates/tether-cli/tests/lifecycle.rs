//! `tether serve` under real signals: SIGTERM stops accepting (HTTP/2 clients get GOAWAY), lets
//! requests in flight finish within the grace period and cancels the rest with reason `shutdown`;
//! SIGHUP reloads the config file for new connections and new HTTP/2 streams while requests in
//! flight finish on the old one.
// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

mod common;
use common::{LIMIT, TempFile, Tether, named_upstream, read_head, wait_line};

/// An upstream that answers `/quick` after 300 ms and `/long` after 30 s, and reports on the
/// channel when a `/long` connection was closed by tether.
fn slow_upstream() -> (SocketAddr, Receiver<&'static str>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(LIMIT));
                let Some(head) = read_head(&mut c) else {
                    return;
                };
                let head = String::from_utf8_lossy(&head);
                if head.starts_with("GET /quick") {
                    std::thread::sleep(Duration::from_millis(300));
                    let _ = c.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nquick",
                    );
                } else {
                    // Wait for tether to close the connection (the abort), up to 30 s.
                    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                    if let Ok(0) = c.read(&mut [0u8; 1]) {
                        let _ = tx.send("long closed");
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn send_get(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&addr, LIMIT).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    s
}

#[test]
fn sigterm_drains_then_cancels_with_reason_shutdown() {
    let (up, closed) = slow_upstream();
    let cfg = TempFile::new(
        "drain.toml",
        &format!(
            r#"workers = 1
shutdown_grace = "1s"
[[listeners]]
address = "127.0.0.1:0"
  [[listeners.routes]]
  upstream = "slow"
[[upstreams]]
name = "slow"
addresses = ["{up}"]
"#
        ),
    );
    let mut t = Tether::spawn(&[
        "serve",
        "--config",
        cfg.0.to_str().unwrap(),
        "--log-format",
        "json",
    ]);
    let addr = t.listening();
    let mut long = send_get(addr, "/long");
    std::thread::sleep(Duration::from_millis(100));
    let mut quick = send_get(addr, "/quick");
    std::thread::sleep(Duration::from_millis(50));
    let signalled = Instant::now();
    t.signal("TERM");

    // The request in flight finishes during the grace period.
    let mut out = String::new();
    quick.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("quick"), "{out}");

    // New connections are no longer accepted.
    std::thread::sleep(Duration::from_millis(100));
    let refused = match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.write_all(b"GET /quick HTTP/1.1\r\nhost: l\r\n\r\n");
            let mut b = [0u8; 64];
            !matches!(s.read(&mut b), Ok(n) if n > 0)
        }
    };
    assert!(refused, "a new connection was served after SIGTERM");

    // The long one is cancelled when the grace period ends: the upstream sees the close.
    let got = closed.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(got, "long closed");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "aborted after {took:?}, grace 1s"
    );
    let line = wait_line(&t.stdout, |l| l.contains("\"/long\""));
    assert!(line.contains("\"abort_reason\":\"shutdown\""), "{line}");
    let mut b = Vec::new();
    let _ = long.read_to_end(&mut b);
    let status = t.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
}

fn reload_config(upstream: SocketAddr) -> String {
    format!(
        r#"workers = 2
[[listeners]]
address = "127.0.0.1:0"
  [[listeners.routes]]
  upstream = "backend"
[[upstreams]]
name = "backend"
addresses = ["{upstream}"]
"#
    )
}

/// Opens a new connection, sends one request and reads the whole response.
fn get_once(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&addr, LIMIT).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    s
}

fn body_of(mut s: TcpStream) -> String {
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.rsplit("\r\n\r\n").next().unwrap().to_string()
}

/// Sends `GET path` on a keep-alive connection and reads exactly one response; its body.
fn get_on(s: &mut TcpStream, path: &str) -> String {
    write!(s, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    let head = String::from_utf8(read_head(s).expect("a response head")).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

#[test]
fn sighup_reloads_for_new_connections_and_keeps_serving_on_a_bad_file() {
    let a = named_upstream("A");
    let b = named_upstream("B");
    let cfg = TempFile::new("reload.toml", &reload_config(a));
    let t = Tether::spawn(&["serve", "--config", cfg.0.to_str().unwrap()]);
    let addr = t.listening();
    assert_eq!(body_of(get_once(addr, "/")), "A");
    // Keep-alive connections opened before the reload: one busy right up to it, one idle
    // (parked) across it.
    let mut busy = TcpStream::connect_timeout(&addr, LIMIT).unwrap();
    busy.set_read_timeout(Some(LIMIT)).unwrap();
    let mut idle = TcpStream::connect_timeout(&addr, LIMIT).unwrap();
    idle.set_read_timeout(Some(LIMIT)).unwrap();
    assert_eq!(get_on(&mut idle, "/"), "A");

    // A slow request in flight on A across the reload.
    let slow = get_once(addr, "/slow");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(get_on(&mut busy, "/"), "A");
    std::fs::write(&cfg.0, reload_config(b)).unwrap();
    t.signal("HUP");
    wait_line(&t.stderr, |l| l.contains("reloaded"));
    // New connections, on either worker, get the new config; so do the next requests on the
    // connections opened before.
    for _ in 0..6 {
        assert_eq!(body_of(get_once(addr, "/")), "B");
    }
    assert_eq!(get_on(&mut busy, "/"), "B");
    assert_eq!(get_on(&mut idle, "/"), "B");
    assert!(
        started.elapsed() < Duration::from_millis(1300),
        "the slow request must still be in flight"
    );
    assert_eq!(body_of(slow), "A");

    // A broken file is reported with its line, and B keeps serving.
    std::fs::write(
        &cfg.0,
        reload_config(b).replace(r#"upstream = "backend""#, r#"upstream = "nope""#),
    )
    .unwrap();
    t.signal("HUP");
    let line = wait_line(&t.stderr, |l| l.contains("reload failed"));
    let at = format!("{}:5: listeners[0].routes[0].upstream", cfg.0.display());
    assert!(line.contains(&at), "{line}");
    assert_eq!(body_of(get_once(addr, "/")), "B");

    // Changing what needs a rebind is refused, and B keeps serving.
    std::fs::write(
        &cfg.0,
        reload_config(b).replace("127.0.0.1:0", "127.0.0.1:1"),
    )
    .unwrap();
    t.signal("HUP");
    let line = wait_line(&t.stderr, |l| l.contains("reload failed"));
    assert!(line.contains(":3: listeners[0].address"), "{line}");
    assert_eq!(body_of(get_once(addr, "/")), "B");
}

#[test]
fn sigterm_sends_h2_goaway_and_finishes_the_stream_in_flight() {
    let up = named_upstream("drained");
    let cfg = TempFile::new(
        "goaway.toml",
        &format!(
            r#"workers = 1
shutdown_grace = "10s"
[[listeners]]
address = "127.0.0.1:0"
protocols = ["http1", "h2c"]
  [[listeners.routes]]
  upstream = "slow"
[[upstreams]]
name = "slow"
addresses = ["{up}"]
"#
        ),
    );
    let mut t = Tether::spawn(&["serve", "--config", cfg.0.to_str().unwrap()]);
    let addr = t.listening();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(LIMIT, async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (send, conn) = h2::client::handshake(tcp).await.unwrap();
            let conn = tokio::spawn(conn);
            let request = |path: &str| {
                http::Request::get(format!("http://localhost{path}"))
                    .body(())
                    .unwrap()
            };
            // The upstream answers /slow after 1.5 s: in flight across the signal.
            let mut send = send.ready().await.unwrap();
            let (in_flight, _) = send.send_request(request("/slow"), true).unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let signalled = Instant::now();
            t.signal("TERM");

            // GOAWAY arrives: the connection refuses new streams, and says why.
            let refused = loop {
                let attempt = match send.clone().ready().await {
                    Ok(mut s) => s.send_request(request("/"), true).map(|_| ()),
                    Err(e) => Err(e),
                };
                match attempt {
                    Err(e) => break e,
                    Ok(()) => {
                        assert!(
                            signalled.elapsed() < Duration::from_secs(1),
                            "no GOAWAY within 1s of SIGTERM"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
            assert!(refused.is_go_away(), "{refused:?}");
            assert!(refused.is_remote(), "{refused:?}");
            assert_eq!(refused.reason(), Some(h2::Reason::NO_ERROR), "{refused:?}");

            // New TCP connections are refused.
            let connected = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await;
            assert!(
                !matches!(connected, Ok(Ok(_))),
                "a new connection was accepted after SIGTERM"
            );

            // The stream in flight still completes, body and all.
            let resp = in_flight.await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got, b"drained");
            assert!(
                signalled.elapsed() >= Duration::from_millis(1000),
                "answered before the upstream did"
            );
            // Then tether closes the connection cleanly.
            let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
            assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
        })
        .await
        .expect("test timed out");
    });
    let status = t.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
}

/// A GET on an open HTTP/2 connection: the stream's response future.
fn h2_start(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    path: &str,
) -> h2::client::ResponseFuture {
    let req = http::Request::get(format!("http://localhost{path}"))
        .body(())
        .unwrap();
    send.send_request(req, true).unwrap().0
}

/// Status and body of an HTTP/2 response.
async fn h2_body(resp: h2::client::ResponseFuture) -> (u16, String) {
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (status, String::from_utf8(got).unwrap())
}

fn admin_addr(t: &Tether) -> SocketAddr {
    let line = wait_line(&t.stderr, |l| l.starts_with("admin on http://"));
    let rest = line.trim_start_matches("admin on http://");
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

fn metrics(admin: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&admin, LIMIT).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn sighup_applies_to_new_h2_streams_on_open_connections_and_adds_gauges() {
    let a = named_upstream("A");
    let b = named_upstream("B");
    let config = |upstream: &str, addr: SocketAddr| {
        format!(
            r#"workers = 1
[admin]
address = "127.0.0.1:0"
[[listeners]]
address = "127.0.0.1:0"
protocols = ["http1", "h2c"]
  [[listeners.routes]]
  upstream = "{upstream}"
[[upstreams]]
name = "{upstream}"
addresses = ["{addr}"]
"#
        )
    };
    let cfg = TempFile::new("reload-h2.toml", &config("first", a));
    let t = Tether::spawn(&["serve", "--config", cfg.0.to_str().unwrap()]);
    let addr = t.listening();
    let admin = admin_addr(&t);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(LIMIT, async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (send, conn) = h2::client::handshake(tcp).await.unwrap();
            let conn = tokio::spawn(conn);
            let mut send = send.ready().await.unwrap();
            assert_eq!(h2_body(h2_start(&mut send, "/")).await, (200, "A".into()));
            // In flight across the reload (the upstream answers /slow after 1.5 s).
            let slow = h2_start(&mut send, "/slow");
            tokio::time::sleep(Duration::from_millis(200)).await;

            let started = Instant::now();
            std::fs::write(&cfg.0, config("second", b)).unwrap();
            t.signal("HUP");
            wait_line(&t.stderr, |l| l.contains("reloaded"));
            // New streams on the connection opened before the reload use the new config (the
            // worker applies it a moment after the reload is logged).
            loop {
                let mut s = send.clone().ready().await.unwrap();
                let (status, body) = h2_body(h2_start(&mut s, "/")).await;
                assert_eq!(status, 200);
                if body == "B" {
                    break;
                }
                assert_eq!(body, "A");
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "new streams still use the old config"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(
                started.elapsed() < Duration::from_millis(1300),
                "the slow request must still be in flight"
            );
            // The stream in flight finishes on the config it started with.
            assert_eq!(h2_body(slow).await, (200, "A".into()));
            drop(send);
            conn.abort();
        })
        .await
        .expect("test timed out");
    });

    // The upstream added by the reload has its connection gauges.
    let text = metrics(admin);
    for state in ["idle", "active", "connecting"] {
        let line = format!("tether_upstream_connections{{upstream=\"second\",state=\"{state}\"}}");
        assert!(text.contains(&line), "no {line} in:\n{text}");
    }
}

/// Waits until the file at `path` contains `text`.
fn wait_for_text(path: &std::path::Path, text: &str) {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{} never had {text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigusr1_and_sighup_reopen_the_access_log_after_rotation() {
    let up = named_upstream("A");
    let cfg = TempFile::new("reopen.toml", &reload_config(up));
    let log = TempFile::new("reopen.log", "");
    let rotated = [1, 2].map(|n| TempFile(log.0.with_extension(format!("log.{n}"))));
    let t = Tether::spawn(&[
        "serve",
        "--config",
        cfg.0.to_str().unwrap(),
        "--access-log",
        log.0.to_str().unwrap(),
    ]);
    let addr = t.listening();
    assert_eq!(body_of(get_once(addr, "/before")), "A");
    wait_for_text(&log.0, "\"/before\"");

    // Rotation by rename, as logrotate does, then the signal: new lines go to a new file.
    for (signal, path, file) in [
        ("USR1", "/after-usr1", &rotated[0]),
        ("HUP", "/after-hup", &rotated[1]),
    ] {
        std::fs::rename(&log.0, &file.0).unwrap();
        t.signal(signal);
        wait_line(&t.stderr, |l| l.contains("access log reopened"));
        assert_eq!(body_of(get_once(addr, path)), "A");
        wait_for_text(&log.0, path);
        let old = std::fs::read_to_string(&file.0).unwrap();
        assert!(!old.contains(path), "{signal}: {old}");
    }
    let first = std::fs::read_to_string(&rotated[0].0).unwrap();
    assert!(first.contains("\"/before\""), "{first}");
}
