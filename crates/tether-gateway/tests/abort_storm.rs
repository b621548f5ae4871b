//! Abort storm: thousands of requests across protocol pairs, each either completed or given up at a
//! random phase (during the upload, before the first response byte, mid-stream). Afterwards nothing
//! is in flight, the only upstream connections left are idle pooled ones, the process's open fds
//! are back at their baseline, and every completed request got its body intact. Two of the pairs
//! read responses ahead of their clients (`response_buffer_bytes`), so the reading tasks are put
//! through the same storm.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Down, Env, Up, bounded, metric, open_fds};
use test_support::behavior::{Behavior, script};
use test_support::client::{H1Client, H2Client};
use test_support::{Checksum, pattern};
use tether_gateway::config::AdminConfig;
use tokio::time::Instant;

/// Concurrent clients per protocol pair.
const WORKERS: u64 = 8;
/// Requests per client.
const PER_WORKER: u64 = 100;
/// Bound for one request, completed or aborted.
const REQUEST_BOUND: Duration = Duration::from_secs(5);

/// A small fixed-seed generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one request does.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Upload `len` bytes to `/sum` and check the upstream's length and checksum.
    Upload(u64),
    /// Download `len` pattern bytes from `/dl` and check them.
    Download(u64),
    /// Send part of a declared upload, then give up.
    AbortUpload,
    /// Give up while the upstream holds the response.
    AbortBeforeFirstByte,
    /// Give up after the first chunk of a streaming response.
    AbortMidStream,
}

impl Plan {
    fn pick(rng: &mut Rng) -> Plan {
        match rng.below(10) {
            0..=2 => Plan::Upload(rng.below(64 * 1024)),
            3..=4 => Plan::Download(rng.below(256 * 1024)),
            5..=6 => Plan::AbortUpload,
            7..=8 => Plan::AbortBeforeFirstByte,
            _ => Plan::AbortMidStream,
        }
    }
}

#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    aborted: AtomicU64,
}

fn storm_script() -> test_support::behavior::Script {
    script(|req| match req.path.as_str() {
        "/sum" => Behavior::Summary,
        "/dl" => Behavior::Download {
            len: req
                .target
                .split_once("?n=")
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or(0),
        },
        "/stall" => Behavior::stall_ms(5_000, "late"),
        "/stream" => Behavior::stream(vec![b'x'; 1024], 200, 10),
        _ => Behavior::Respond(test_support::Reply::new(404, "no")),
    })
}

fn summary(body: &[u8]) -> String {
    format!("{} {}", body.len(), Checksum::of(body))
}

/// One HTTP/1.1 request on `slot`'s connection (opened if needed); an abort drops the connection,
/// by FIN or by RST.
async fn h1_request(env: &Env, slot: &mut Option<H1Client>, plan: Plan, rng: &mut Rng) -> bool {
    if slot.is_none() {
        *slot = Some(env.h1().await);
    }
    let c = slot.as_mut().unwrap();
    let aborted = match plan {
        Plan::Upload(len) => {
            let body = pattern(len as usize);
            c.send_request("POST", "/sum", &[], Some(len), &body)
                .await
                .unwrap();
            let head = c.read_final_head().await.unwrap();
            assert_eq!(head.status, 200);
            let got = c.read_body("POST", &head).await.unwrap();
            assert_eq!(got, summary(&body).as_bytes(), "upload corrupted");
            false
        }
        Plan::Download(len) => {
            let (head, got) = c.get(&format!("/dl?n={len}")).await.unwrap();
            assert_eq!(head.status, 200);
            assert_eq!(got.len() as u64, len, "download truncated");
            assert_eq!(Checksum::of(&got), Checksum::of(&pattern(len as usize)));
            false
        }
        Plan::AbortUpload => {
            let part = pattern(rng.below(8 * 1024) as usize);
            c.send_request("POST", "/sum", &[], Some(64 * 1024), &part)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
            true
        }
        Plan::AbortBeforeFirstByte => {
            c.send_request("GET", "/stall", &[], None, b"")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(rng.below(10))).await;
            true
        }
        Plan::AbortMidStream => {
            c.send_request("GET", "/stream", &[], None, b"")
                .await
                .unwrap();
            let head = c.read_final_head().await.unwrap();
            assert_eq!(head.status, 200);
            c.read_some_raw().await.unwrap();
            true
        }
    };
    if aborted {
        let c = slot.take().unwrap();
        if rng.below(2) == 0 {
            c.rst().unwrap();
        } else {
            drop(c);
        }
    }
    aborted
}

/// One HTTP/2 request on `slot`'s connection; an abort resets or abandons the stream, and now and
/// then kills the whole connection.
async fn h2_request(env: &Env, slot: &mut Option<H2Client>, plan: Plan, rng: &mut Rng) -> bool {
    if slot.as_ref().is_none_or(|c| c.is_closed()) {
        *slot = Some(env.h2().await);
    }
    let c = slot.as_mut().unwrap();
    let stream = match plan {
        Plan::Upload(len) => {
            let body = pattern(len as usize);
            let mut s = c.start("POST", "/sum", &[], false).await.unwrap();
            s.send_data(body.clone(), true).unwrap();
            let parts = s.response().await.unwrap();
            assert_eq!(parts.status, 200);
            let got = s.read_to_end().await.unwrap();
            assert_eq!(got, summary(&body).as_bytes(), "upload corrupted");
            None
        }
        Plan::Download(len) => {
            let (parts, got) = c.get(&format!("/dl?n={len}")).await.unwrap();
            assert_eq!(parts.status, 200);
            assert_eq!(got.len() as u64, len, "download truncated");
            assert_eq!(Checksum::of(&got), Checksum::of(&pattern(len as usize)));
            None
        }
        Plan::AbortUpload => {
            let len = (64 * 1024).to_string();
            let mut s = c
                .start("POST", "/sum", &[("content-length", &len)], false)
                .await
                .unwrap();
            s.send_data(pattern(rng.below(8 * 1024) as usize), false)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
            Some(s)
        }
        Plan::AbortBeforeFirstByte => {
            let s = c.start("GET", "/stall", &[], true).await.unwrap();
            tokio::time::sleep(Duration::from_millis(rng.below(10))).await;
            Some(s)
        }
        Plan::AbortMidStream => {
            let mut s = c.start("GET", "/stream", &[], true).await.unwrap();
            let parts = s.response().await.unwrap();
            assert_eq!(parts.status, 200);
            s.data().await.unwrap().unwrap();
            Some(s)
        }
    };
    let Some(s) = stream else { return false };
    match rng.below(20) {
        0 => {
            drop(s);
            slot.take().unwrap().kill(true).unwrap();
        }
        1..=9 => s.reset(h2::Reason::CANCEL),
        _ => s.abandon(),
    }
    true
}

/// Runs one client's share of the storm.
async fn worker(env: Arc<Env>, seed: u64, tally: Arc<Tally>) {
    let mut rng = Rng::new(seed);
    let mut h1 = None;
    let mut h2 = None;
    for i in 0..PER_WORKER {
        let plan = Plan::pick(&mut rng);
        let run = async {
            match env.down {
                Down::H1 => h1_request(&env, &mut h1, plan, &mut rng).await,
                _ => h2_request(&env, &mut h2, plan, &mut rng).await,
            }
        };
        let aborted = match tokio::time::timeout(REQUEST_BOUND, run).await {
            Ok(a) => a,
            Err(_) => panic!(
                "{:?}->{:?} seed {seed} request {i} ({plan:?}) hung",
                env.down, env.up_kind
            ),
        };
        let counter = if aborted {
            &tally.aborted
        } else {
            &tally.completed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The gauges that must be back at rest: (in flight, active, connecting, idle).
fn gauges(env: &Env) -> (f64, f64, f64, f64) {
    let t = env.metrics_text().expect("admin listener configured");
    let up = |state: &str| {
        metric(
            &t,
            &format!("tether_upstream_connections{{upstream=\"up\",state=\"{state}\"}}"),
        )
        .unwrap_or(0.0)
    };
    (
        metric(&t, "tether_in_flight_requests ").expect("in-flight gauge"),
        up("active"),
        up("connecting"),
        up("idle"),
    )
}

/// The downstream protocol matching `up`: the pairs that cross protocols read ahead.
fn up_down(up: Up) -> Down {
    match up {
        Up::H1 => Down::H1,
        Up::H2c => Down::H2c,
        Up::H2Tls => Down::H2Tls,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_storm_leaves_nothing_behind() {
    bounded(Duration::from_secs(60), async {
        let pairs = [
            (Down::H1, Up::H1),
            (Down::H2c, Up::H2c),
            (Down::H1, Up::H2c),
            (Down::H2c, Up::H1),
        ];
        let mut envs = Vec::new();
        for (down, up) in pairs {
            let env = Env::with(down, up, storm_script(), |c| {
                // No idle HTTP/1 upstream connection outlives its request, so the fd count
                // returns to the baseline exactly; HTTP/2 keeps its one shared connection.
                c.upstreams[0].max_idle_per_endpoint = 0;
                if down != up_down(up) {
                    c.listeners[0].routes[0].response_buffer_bytes = 64 * 1024;
                }
                c.admin = Some(AdminConfig {
                    address: "127.0.0.1:0".parse().unwrap(),
                });
            })
            .await;
            envs.push(Arc::new(env));
        }
        // Warm up: one completed request per pair opens the HTTP/2 upstream connections.
        for env in &envs {
            let mut rng = Rng::new(0);
            let aborted = match env.down {
                Down::H1 => h1_request(env, &mut None, Plan::Download(10), &mut rng).await,
                _ => h2_request(env, &mut None, Plan::Download(10), &mut rng).await,
            };
            assert!(!aborted);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let fds0 = open_fds();
        let g0: Vec<_> = envs.iter().map(|e| gauges(e)).collect();
        let idle0: f64 = g0.iter().map(|x| x.3).sum();

        let started = Instant::now();
        let tally = Arc::new(Tally::default());
        let mut tasks = Vec::new();
        for (p, env) in envs.iter().enumerate() {
            for w in 0..WORKERS {
                let seed = (p as u64) << 32 | w;
                tasks.push(tokio::spawn(worker(env.clone(), seed, tally.clone())));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let storm = started.elapsed();
        let completed = tally.completed.load(Ordering::Relaxed);
        let aborted = tally.aborted.load(Ordering::Relaxed);
        eprintln!("storm: {completed} completed, {aborted} aborted in {storm:?}");
        assert_eq!(completed + aborted, 4 * WORKERS * PER_WORKER);
        assert!(completed > 0 && aborted > 0);

        // Settle: aborts propagate, closed sockets are reaped.
        let deadline = Instant::now() + Duration::from_secs(5);
        let slack = 4;
        loop {
            let g: Vec<_> = envs.iter().map(|e| gauges(e)).collect();
            // An HTTP/2 upstream connection is shared, so it counts as active even with no
            // stream open: the warm-up's one may stay, nothing more.
            let busy = g
                .iter()
                .zip(&g0)
                .any(|(&(f, a, c, _), &(_, a0, _, _))| f != 0.0 || a > a0 || c != 0.0);
            // Each idle pooled connection beyond the warm-up's holds two fds here (the gateway's
            // end and the test upstream's).
            let idle: f64 = g.iter().map(|x| x.3).sum();
            let allowed = fds0 + slack + 2 * (idle - idle0).max(0.0) as usize;
            let fds = open_fds();
            if !busy && fds <= allowed {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "not at rest after the storm: baseline gauges {g0:?}, gauges (in flight, active, connecting, idle) \
                     {g:?}; fds {fds}, baseline {fds0}, allowed {allowed}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        for (env, g) in envs.iter().zip(&g0) {
            if env.up_kind == Up::H1 {
                assert_eq!(g.1, 0.0, "no HTTP/1 upstream connection outlives its request");
            }
        }
        for env in envs {
            Arc::into_inner(env).unwrap().stop().await;
        }
    })
    .await;
}
