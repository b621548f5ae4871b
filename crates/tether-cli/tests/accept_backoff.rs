//! A full file-descriptor table: `accept` fails with EMFILE while the listener stays readable.
//! tether must back off (not spin on a core), count the errors, warn once per burst, and serve
//! again once descriptors are free.
// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

mod common;
use common::{LIMIT, TempFile, Tether, named_upstream, wait_line};

/// Descriptors tether may open: enough to start, few enough to fill quickly.
const NOFILE: u64 = 64;

fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: l\r\nconnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn full_fd_table_backs_off_without_spinning_and_serves_again() {
    let up = named_upstream("ok");
    let cfg = TempFile::new(
        "emfile.toml",
        &format!(
            r#"workers = 1
[admin]
address = "127.0.0.1:0"
[[listeners]]
address = "127.0.0.1:0"
protocols = ["http1"]
  [[listeners.routes]]
  upstream = "up"
[[upstreams]]
name = "up"
addresses = ["{up}"]
"#
        ),
    );
    let t = Tether::spawn_with_nofile(NOFILE, &["serve", "--config", cfg.0.to_str().unwrap()]);
    let addr = t.listening();
    let admin_line = wait_line(&t.stderr, |l| l.starts_with("admin on http://"));
    let admin: SocketAddr = admin_line
        .trim_start_matches("admin on http://")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(get(addr, "/").unwrap().ends_with("ok"));

    // Idle connections until tether cannot accept more (the rest wait in the backlog).
    let mut held = Vec::new();
    for _ in 0..NOFILE + 16 {
        held.push(TcpStream::connect_timeout(&addr, LIMIT).unwrap());
    }
    let warning = wait_line(&t.stderr, |l| l.contains("accept failed"));
    assert!(warning.contains("emfile"), "{warning}");

    // Backing off, not spinning: a spinning accept loop uses a whole core.
    let before = t.cpu_time();
    let measured = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let used = t.cpu_time() - before;
    let share = used.as_secs_f64() / measured.elapsed().as_secs_f64();
    assert!(share < 0.3, "{used:?} of CPU in {:?}", measured.elapsed());

    // Descriptors freed: tether serves again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(addr, "/again") {
            Ok(out) if out.ends_with("ok") => break,
            other => assert!(
                Instant::now() < deadline,
                "not serving again after the fds were freed: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // One warning for the whole burst (the first one was read above), then one line when
    // accepting works again.
    let mut more_warnings = 0;
    let recovered = loop {
        let l = t
            .stderr
            .recv_timeout(LIMIT)
            .expect("no 'accepting again' line");
        if l.contains("accepting again") {
            break l;
        }
        more_warnings += usize::from(l.contains("accept failed"));
    };
    assert_eq!(more_warnings, 0, "more than one warning for one burst");
    let mut s = TcpStream::connect_timeout(&admin, LIMIT).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let errors: f64 = text
        .lines()
        .find(|l| l.starts_with("tether_accept_errors_total{kind=\"emfile\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no accept error counter in:\n{text}"));
    assert!(errors >= 2.0, "{errors} accept errors counted; {recovered}");
}
