//! `tether trace` as a process against servers on loopback: success over HTTP/1.1, h2c and TLS,
//! and each failure placed on its stage with its OS error name and exit code. Names are served
//! by a stub DNS server on loopback; nothing leaves the host.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::behavior::routes;
use test_support::tls::{ALPN_H2, ALPN_HTTP1};
use test_support::{Behavior, BlackHole, DnsStub, TestPki, UpstreamH1, UpstreamH2};

const LIMIT: Duration = Duration::from_secs(20);

/// Runs `tether trace ARGS` (off the async threads) and returns its exit code and output.
async fn trace(args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("trace")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tether trace {args:?} did not finish within {LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(err.is_empty() || status.code() == Some(64), "stderr: {err}");
        (status.code().unwrap_or(-1), out)
    })
    .await
    .unwrap()
}

/// `tether trace --json ARGS`: the exit code and the parsed report.
async fn trace_json(args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out) = trace(&all).await;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["exit_code"], code, "{v}");
    (code, v)
}

fn stages(v: &Value) -> Vec<(String, bool)> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["stage"].as_str().unwrap().to_owned(), s["ok"] == true))
        .collect()
}

fn ok_stages(v: &Value) -> Vec<String> {
    stages(v)
        .into_iter()
        .filter(|(_, ok)| *ok)
        .map(|(s, _)| s)
        .collect()
}

fn hello() -> test_support::behavior::Script {
    routes(vec![("/hello", Behavior::ok("hi there"))])
}

/// A temporary file, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn with(contents: &str) -> TempFile {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tether-trace-{}-{}.pem",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, contents).unwrap();
        TempFile(p)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn assert_success(v: &Value, with_tls: bool) {
    let mut want = vec!["dns", "connect"];
    if with_tls {
        want.push("tls");
    }
    want.extend(["send", "first_byte", "body"]);
    assert_eq!(ok_stages(v), want, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["status"], 200);
    assert_eq!(v["body_first_bytes"], 8);
    let local: SocketAddr = v["local"].as_str().unwrap().parse().unwrap();
    assert!(local.ip().is_loopback() && local.port() != 0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_success_and_the_timeline() {
    let up = UpstreamH1::start(hello()).await.unwrap();
    let url = format!("http://{}/hello", up.addr());
    let (code, v) = trace_json(&[&url]).await;
    assert_eq!(code, 0, "{v}");
    assert_success(&v, false);
    assert_eq!(v["http_version"], "HTTP/1.1");
    assert_eq!(v["resolved_by"], "literal");
    assert_eq!(v["remote"], up.addr().to_string());
    assert_eq!(v["candidates"][0]["family"], "ipv4");

    let (code, text) = trace(&[&url]).await;
    assert_eq!(code, 0, "{text}");
    for want in [
        "dns",
        "connect",
        "send",
        "first_byte",
        "200 OK",
        "body",
        "status 200",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    assert!(text.contains(&format!("-> {}", up.addr())), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_success() {
    let up = UpstreamH2::start(hello()).await.unwrap();
    let (code, v) = trace_json(&["--http2", &format!("http://{}/hello", up.addr())]).await;
    assert_eq!(code, 0, "{v}");
    assert_success(&v, false);
    assert_eq!(v["http_version"], "HTTP/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_success_over_h1_and_h2() {
    let pki = TestPki::generate().unwrap();
    let ca = TempFile::with(pki.ca_pem());
    let h1 = UpstreamH1::start_tls(hello(), pki.server_config(&[ALPN_HTTP1]).unwrap())
        .await
        .unwrap();
    let port = h1.addr().port();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let (code, v) = trace_json(&[
        "--cacert",
        ca.path(),
        "--resolve",
        &resolve,
        &format!("https://localhost:{port}/hello"),
    ])
    .await;
    assert_eq!(code, 0, "{v}");
    assert_success(&v, true);
    assert_eq!(v["resolved_by"], "--resolve");
    let tls = &v["tls"];
    assert_eq!(tls["version"], "TLSv1.3", "{tls}");
    assert_eq!(tls["alpn"], "http/1.1");
    assert!(
        tls["subject"].as_str().unwrap().contains("CN=localhost"),
        "{tls}"
    );
    assert!(
        tls["issuer"].as_str().unwrap().contains("tether test CA"),
        "{tls}"
    );
    let names: Vec<&str> = tls["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"localhost") && names.contains(&"127.0.0.1"),
        "{tls}"
    );
    assert!(tls["not_after_unix"].as_i64().unwrap() > 0);

    let h2 = UpstreamH2::start_tls(hello(), pki.server_config(&[ALPN_H2]).unwrap())
        .await
        .unwrap();
    let (code, v) = trace_json(&[
        "--http2",
        "--cacert",
        ca.path(),
        &format!("https://127.0.0.1:{}/hello", h2.addr().port()),
    ])
    .await;
    assert_eq!(code, 0, "{v}");
    assert_success(&v, true);
    assert_eq!(v["tls"]["alpn"], "h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_port_fails_at_connect() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (code, v) = trace_json(&[&format!("http://127.0.0.1:{port}/")]).await;
    assert_eq!(code, 11, "{v}");
    assert_eq!(v["error"]["stage"], "connect");
    assert_eq!(v["error"]["code"], "ECONNREFUSED");
    assert!(!v["error"]["hint"].as_str().unwrap().is_empty());
    assert_eq!(
        stages(&v),
        [("dns".into(), true), ("connect".into(), false)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_accept_queue_times_out_at_connect() {
    let hole = tokio::task::spawn_blocking(|| BlackHole::bind("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap()
        .unwrap();
    let t0 = Instant::now();
    let (code, v) = trace_json(&[
        "--connect-timeout",
        "500ms",
        &format!("http://{}/", hole.addr()),
    ])
    .await;
    assert_eq!(code, 11, "{v}");
    assert_eq!(v["error"]["stage"], "connect");
    assert_eq!(v["error"]["code"], "ETIMEDOUT");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(500), "{took:?}");
    let d = v["stages"][1]["duration_us"].as_u64().unwrap();
    assert!((480_000..3_000_000).contains(&d), "{d} us");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_the_request_fails_at_first_byte() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        // SO_LINGER 0: close sends RST, like a crashing or overloaded server.
        s.set_zero_linger().unwrap();
        drop(s);
    });
    let (code, v) = trace_json(&[&format!("http://{addr}/")]).await;
    assert_eq!(code, 14, "{v}");
    assert_eq!(v["error"]["stage"], "first_byte");
    assert_eq!(v["error"]["code"], "ECONNRESET");
    assert_eq!(
        ok_stages(&v),
        ["dns", "connect", "send"],
        "the request was written"
    );
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_fail_at_tls() {
    let pki = TestPki::generate().unwrap();
    let up = UpstreamH1::start_tls(hello(), pki.server_config(&[ALPN_HTTP1]).unwrap())
        .await
        .unwrap();
    let port = up.addr().port();
    // Not signed by a CA the client trusts (the built-in web roots).
    let (code, v) = trace_json(&[&format!("https://127.0.0.1:{port}/hello")]).await;
    assert_eq!(code, 12, "{v}");
    assert_eq!(v["error"]["stage"], "tls");
    assert_eq!(v["error"]["code"], "CERT_UNKNOWN_ISSUER");
    // Trusted CA, but a name the certificate does not list.
    let ca = TempFile::with(pki.ca_pem());
    let (code, v) = trace_json(&[
        "--cacert",
        ca.path(),
        "--resolve",
        &format!("other.test:{port}:127.0.0.1"),
        &format!("https://other.test:{port}/hello"),
    ])
    .await;
    assert_eq!(code, 12, "{v}");
    assert_eq!(v["error"]["code"], "CERT_NAME_MISMATCH");
    // --insecure looks past it and still shows the certificate.
    let (code, v) = trace_json(&["-k", &format!("https://127.0.0.1:{port}/hello")]).await;
    assert_eq!(code, 0, "{v}");
    assert!(v["tls"]["subject"].as_str().unwrap().contains("localhost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_from_a_stub_dns_server() {
    let up = UpstreamH1::start(hello()).await.unwrap();
    let stub = DnsStub::start(&[("app.test", vec!["127.0.0.1".parse().unwrap()])])
        .await
        .unwrap();
    let ns = stub.addr().to_string();
    let port = up.addr().port();
    let (code, v) = trace_json(&[
        "--dns-server",
        &ns,
        &format!("http://app.test:{port}/hello"),
    ])
    .await;
    assert_eq!(code, 0, "{v}");
    assert_success(&v, false);
    assert_eq!(v["resolved_by"], "nameserver");
    assert_eq!(v["candidates"][0]["address"], up.addr().to_string());

    let (code, v) = trace_json(&[
        "--dns-server",
        &ns,
        &format!("http://missing.test:{port}/hello"),
    ])
    .await;
    assert_eq!(code, 10, "{v}");
    assert_eq!(v["error"]["stage"], "dns");
    assert_eq!(v["error"]["code"], "ENOTFOUND");
    assert!(stub.queries().iter().any(|q| q.name == "missing.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_exit_64() {
    let (code, _) = trace(&["ftp://example.invalid/"]).await;
    assert_eq!(code, 64);
}
