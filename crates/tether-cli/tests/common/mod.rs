//! Helpers shared by the tests that run the `tether` binary: a child process killed on drop,
//! its output line by line, and temporary config files.
// Each test binary uses a different subset.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

pub const LIMIT: Duration = Duration::from_secs(20);

pub struct Tether {
    pub child: Child,
    pub stderr: Receiver<String>,
    pub stdout: Receiver<String>,
}

impl Tether {
    pub fn spawn(args: &[&str]) -> Tether {
        Tether::spawn_command(Command::new(env!("CARGO_BIN_EXE_tether")), args)
    }

    /// Runs tether with at most `nofile` open file descriptors (util-linux `prlimit`, which execs
    /// it: the child's pid is tether's).
    pub fn spawn_with_nofile(nofile: u64, args: &[&str]) -> Tether {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_tether"));
        Tether::spawn_command(cmd, args)
    }

    fn spawn_command(mut cmd: Command, args: &[&str]) -> Tether {
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = lines(child.stderr.take().unwrap());
        let stdout = lines(child.stdout.take().unwrap());
        Tether {
            child,
            stderr,
            stdout,
        }
    }

    pub fn listening(&self) -> SocketAddr {
        let line = wait_line(&self.stderr, |l| l.starts_with("listening on http://"));
        let rest = line.trim_start_matches("listening on http://");
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses.
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // utime and stime (fields 14 and 15) are in clock ticks of 10 ms.
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "serve did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Tether {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

pub fn wait_line(rx: &Receiver<String>, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + LIMIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if want(&l) => return l,
            Ok(l) => seen.push(l),
            Err(e) => panic!("no matching line ({e}); got: {seen:#?}"),
        }
    }
}

/// A file in the temp directory, removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(name: &str, text: &str) -> TempFile {
        let p = std::env::temp_dir().join(format!("tether-test-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads an HTTP head byte by byte, up to and including its blank line (nothing after it).
/// `None` if the peer closed or failed first.
pub fn read_head(c: &mut impl Read) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(head)
}

/// An upstream answering every request with `name` (connection: close); `/slow` after 1.5 s.
pub fn named_upstream(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(LIMIT));
                let Some(head) = read_head(&mut c) else {
                    return;
                };
                if head.starts_with(b"GET /slow") {
                    std::thread::sleep(Duration::from_millis(1500));
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
            });
        }
    });
    addr
}
