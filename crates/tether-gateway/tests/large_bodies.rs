//! 100 MB through the proxy each way with the process's memory bounded: bodies must stream, never
//! be buffered. Its own test binary, so nothing else moves the RSS while it is measured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use http::Method;
use http_body_util::BodyExt;
use test_support::behavior::{Behavior, routes};
use test_support::client::{empty, pattern_body};
use test_support::{Checksum, EventKind};

const LEN: u64 = 100 * 1024 * 1024;
/// Allowed RSS growth while 100 MB flows (a buffered body would add at least 100 MB).
const RSS_LIMIT: u64 = 40 * 1024 * 1024;

fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples the RSS every 10 ms until dropped; `peak()` is the highest seen.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss()));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn expected_checksum(len: u64) -> u64 {
    let block = test_support::pattern(251 * 256);
    let mut c = Checksum::new();
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).unwrap().min(block.len());
        c.update(&block[..n]);
        left -= n as u64;
    }
    c.value()
}

async fn transfer(down: Down, up: Up, expected: u64) {
    let script = routes(vec![
        ("/upload", Behavior::Summary),
        ("/download", Behavior::Download { len: LEN }),
    ]);
    let env = Env::new(down, up, script).await;
    let mut c = env.http().await;
    // Warm up the connections so the baseline includes their buffers.
    let _ = c.get("/none").await.unwrap();

    let baseline = rss();
    let sampler = RssSampler::start();
    let started = tokio::time::Instant::now();
    let req = c
        .request(Method::POST, "/upload")
        .header("content-length", LEN.to_string())
        .body(pattern_body(LEN))
        .unwrap();
    let (p, b, _) = c.fetch(req).await.unwrap();
    assert_eq!(p.status, 200);
    assert_eq!(String::from_utf8_lossy(&b), format!("{LEN} {expected}"));
    assert!(env.log().any(|e| e.kind
        == EventKind::BodyComplete {
            len: LEN,
            checksum: expected
        }));
    let up_time = started.elapsed();

    let started = tokio::time::Instant::now();
    let req = c.request(Method::GET, "/download").body(empty()).unwrap();
    let resp = c.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut sum = Checksum::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            sum.update(&d);
        }
    }
    assert_eq!(sum.len(), LEN);
    assert_eq!(sum.value(), expected);
    let down_time = started.elapsed();

    let growth = sampler.peak().saturating_sub(baseline);
    drop(sampler);
    eprintln!(
        "{down:?} -> {up:?}: upload {up_time:?}, download {down_time:?}, rss growth {} MiB",
        growth / (1024 * 1024)
    );
    assert!(
        growth < RSS_LIMIT,
        "RSS grew by {growth} bytes while 100 MB flowed"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_each_way_with_bounded_memory() {
    bounded(Duration::from_secs(90), async {
        let expected = expected_checksum(LEN);
        transfer(Down::H1, Up::H1, expected).await;
        transfer(Down::H2c, Up::H2c, expected).await;
        transfer(Down::H2Tls, Up::H2Tls, expected).await;
    })
    .await
}
