//! `tether serve` as a process: the embedded demo on port 0, a config file with an upstream the
//! test runs, and a bad config. Every child is killed when its test ends, pass or fail.
// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

mod common;
use common::{LIMIT, TempFile, Tether, named_upstream, wait_line};

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, LIMIT).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.set_write_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn embedded_demo_answers() {
    let t = Tether::spawn(&["serve", "--listen", "127.0.0.1:0", "--log-format", "json"]);
    let addr = t.listening();
    assert_ne!(addr.port(), 0);
    let resp = get(addr, "/work?ms=10");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("worked for"), "{resp}");
    let log = wait_line(&t.stdout, |l| l.contains("\"path\":\"/work\""));
    assert!(log.contains("\"status\":200"), "{log}");
    assert!(log.contains("\"outcome\":\"ok\""), "{log}");
}

#[test]
fn config_file_listener_on_port_zero() {
    let up = named_upstream("from-cfg");
    let cfg = TempFile::new(
        "good.toml",
        &format!(
            r#"workers = 1
[[listeners]]
address = "127.0.0.1:0"
  [[listeners.routes]]
  upstream = "fixed"
[[upstreams]]
name = "fixed"
addresses = ["{up}"]
"#
        ),
    );
    let path = cfg.0.to_str().unwrap();
    let t = Tether::spawn(&["serve", "--config", path, "--log-format", "pretty"]);
    let addr = t.listening();
    assert_ne!(addr.port(), 0);
    let resp = get(addr, "/anything");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("from-cfg"), "{resp}");
    let log = wait_line(&t.stdout, |l| l.contains("/anything"));
    assert!(log.starts_with("200 GET /anything"), "{log}");
}

#[test]
fn bad_config_exits_64() {
    let cfg = TempFile::new("bad.toml", "[[listeners]]\naddress = \"nowhere\"\n");
    let path = cfg.0.to_str().unwrap();
    let mut t = Tether::spawn(&["serve", "--config", path]);
    let line = wait_line(&t.stderr, |l| l.contains("listeners[0].address"));
    assert!(line.starts_with(&format!("{path}:2: ")), "{line}");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = t.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < LIMIT, "serve did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(64));
}
