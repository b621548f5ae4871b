use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Demo;

const LIMIT: Duration = Duration::from_secs(10);

/// Sends one HTTP/1.1 request with `Connection: close`; returns what arrived and how the read
/// ended.
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (Vec<u8>, std::io::Result<()>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Err(e)),
        }
    }
}

async fn get(addr: SocketAddr, path: &str) -> (Vec<u8>, std::io::Result<()>) {
    let head = format!("GET {path} HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n");
    raw(addr, &head, b"").await
}

fn split(resp: &[u8]) -> (String, &[u8]) {
    let end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (
        String::from_utf8_lossy(&resp[..end]).into_owned(),
        &resp[end + 4..],
    )
}

#[tokio::test]
async fn endpoints_answer() {
    tokio::time::timeout(LIMIT, async {
        let demo = Demo::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = demo.addr();

        let (resp, r) = get(addr, "/work?ms=10").await;
        r.unwrap();
        let (head, body) = split(&resp);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(String::from_utf8_lossy(body).starts_with("worked for"));

        let (resp, r) = get(addr, "/large?bytes=200000").await;
        r.unwrap();
        let (head, body) = split(&resp);
        assert!(head.contains("content-length: 200000"), "{head}");
        assert_eq!(body.len(), 200_000);

        let (resp, r) = get(addr, "/stream?chunks=3&interval_ms=5").await;
        r.unwrap();
        let (head, body) = split(&resp);
        assert!(head.contains("text/event-stream"), "{head}");
        let body = String::from_utf8_lossy(body);
        assert_eq!(body.matches("data: ").count(), 3, "{body}");

        let payload = vec![7u8; 100_000];
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: demo\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            payload.len()
        );
        let (resp, r) = raw(addr, &head, &payload).await;
        r.unwrap();
        let (_, body) = split(&resp);
        assert_eq!(body, b"{\"bytes\":100000}\n");

        let (resp, r) = get(addr, "/").await;
        r.unwrap();
        assert!(String::from_utf8_lossy(&resp).contains("/fail/reset-mid-body"));

        let (resp, _) = get(addr, "/work?ms=abc").await;
        assert!(resp.starts_with(b"HTTP/1.1 400"));
        demo.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn close_before_headers_sends_nothing() {
    tokio::time::timeout(LIMIT, async {
        let demo = Demo::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let (resp, r) = get(demo.addr(), "/fail/close-before-headers").await;
        r.unwrap();
        assert!(resp.is_empty(), "{}", String::from_utf8_lossy(&resp));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn reset_mid_body_resets() {
    tokio::time::timeout(LIMIT, async {
        let demo = Demo::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let (resp, r) = get(demo.addr(), "/fail/reset-mid-body").await;
        let (head, body) = split(&resp);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!body.is_empty());
        let e = r.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    })
    .await
    .unwrap();
}

/// Collects formatted log output.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn dropped_work_is_logged() {
    let logs = Capture::default();
    let w = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    // Current-thread runtime: every demo task runs on this thread, under this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    tokio::time::timeout(LIMIT, async {
        let demo = Demo::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut s = TcpStream::connect(demo.addr()).await.unwrap();
        s.write_all(b"GET /work?ms=60000 HTTP/1.1\r\nhost: demo\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
        while !logs.text().contains("demo: /work cancelled after") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no cancel log; logs: {}", logs.text()));
}
