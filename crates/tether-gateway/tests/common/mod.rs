//! The harness shared by the integration tests: a gateway between a test upstream and a test
//! client, for any pair of downstream and upstream protocols.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use test_support::behavior::Script;
use test_support::client::{H1Client, H2Client, HttpClient, Proto};
use test_support::tls::{ALPN_H2, ALPN_HTTP1};
use test_support::{BlackHole, DnsStub, EventLog, TestPki, UpstreamH1, UpstreamH2};
use tether_gateway::config::*;
use tether_gateway::observe::access::{MemoryAccessLog, RequestRecord};
use tether_gateway::{Gateway, RunningGateway};

/// The bound for anything that should be quick (a loaded 2-core machine: generous).
pub const BOUND: Duration = Duration::from_secs(2);

/// The client side of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// HTTP/1.1 cleartext.
    H1,
    /// HTTP/2 cleartext, prior knowledge.
    H2c,
    /// HTTP/2 over TLS (ALPN h2).
    H2Tls,
}

/// The origin side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Up {
    /// HTTP/1.1 cleartext.
    H1,
    /// HTTP/2 cleartext, prior knowledge.
    H2c,
    /// HTTP/2 over TLS.
    H2Tls,
}

pub const ALL_DOWN: [Down; 3] = [Down::H1, Down::H2c, Down::H2Tls];
pub const ALL_UP: [Up; 3] = [Up::H1, Up::H2c, Up::H2Tls];

pub enum Upstream {
    H1(UpstreamH1),
    H2(UpstreamH2),
}

impl Upstream {
    /// An upstream of its own beside the gateway's (a mirror, an auth service): h2c with
    /// `h2`, else HTTP/1.1, answering `script`.
    pub async fn start(h2: bool, script: Script) -> Upstream {
        if h2 {
            Upstream::H2(UpstreamH2::start(script).await.unwrap())
        } else {
            Upstream::H1(UpstreamH1::start(script).await.unwrap())
        }
    }

    /// Its configuration as the gateway's upstream `name`.
    pub fn config(&self, name: &str) -> UpstreamConfig {
        let protocol = match self {
            Upstream::H1(_) => UpstreamProtocol::Http1,
            Upstream::H2(_) => UpstreamProtocol::H2c,
        };
        UpstreamConfig::new(name, vec![self.addr().into()], protocol)
    }

    pub fn log(&self) -> &EventLog {
        match self {
            Upstream::H1(u) => u.log(),
            Upstream::H2(u) => u.log(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Upstream::H1(u) => u.addr(),
            Upstream::H2(u) => u.addr(),
        }
    }
}

/// One gateway with one upstream behind it.
pub struct Env {
    pub down: Down,
    pub up_kind: Up,
    pub pki: TestPki,
    pub up: Upstream,
    pub access: MemoryAccessLog,
    pub addr: SocketAddr,
    gw: Option<RunningGateway>,
    /// The configuration the gateway runs.
    config: Config,
}

/// A loopback address whose SYNs a [`BlackHole`] drops: a dead connect candidate.
pub const DEAD_IP: &str = "127.0.0.2";

/// An [`Env`] whose HTTP/1 upstream is reached by a name that a stub DNS server answers with a
/// dead candidate first ([`DEAD_IP`], a black hole on the live upstream's port) and the live
/// upstream second: every new upstream connection waits out the Happy Eyeballs stagger. Keep
/// all three while the test runs: without the stub the name no longer resolves.
pub struct DeadFirst {
    pub env: Env,
    pub stub: DnsStub,
    pub hole: BlackHole,
}

impl DeadFirst {
    /// The gateway in front of `script`, its upstream named `name`; `tweak` adjusts the config.
    pub async fn start(name: &str, script: Script, tweak: impl FnOnce(&mut Config)) -> DeadFirst {
        let dead: std::net::IpAddr = DEAD_IP.parse().unwrap();
        let stub = DnsStub::start(&[(name, vec![dead, "127.0.0.1".parse().unwrap()])])
            .await
            .unwrap();
        let mut hole = None;
        let env = Env::with(Down::H1, Up::H1, script, |c| {
            // Same port as the live upstream, on another loopback address.
            let port = c.upstreams[0].addresses[0].port;
            hole = Some(BlackHole::bind(SocketAddr::new(dead, port)).unwrap());
            c.dns.nameservers = vec![stub.addr()];
            c.upstreams[0].addresses = vec![UpstreamAddress::new(name, port)];
            tweak(c);
        })
        .await;
        DeadFirst {
            env,
            stub,
            hole: hole.unwrap(),
        }
    }
}

impl Env {
    pub async fn new(down: Down, up: Up, script: Script) -> Env {
        Env::with(down, up, script, |_| {}).await
    }

    /// Like [`Env::new`], letting the test adjust the config (routes, timeouts) first.
    pub async fn with(
        down: Down,
        up_kind: Up,
        script: Script,
        tweak: impl FnOnce(&mut Config),
    ) -> Env {
        let pki = TestPki::generate().unwrap();
        let up = match up_kind {
            Up::H1 => Upstream::H1(UpstreamH1::start(script).await.unwrap()),
            Up::H2c => Upstream::H2(UpstreamH2::start(script).await.unwrap()),
            Up::H2Tls => Upstream::H2(
                UpstreamH2::start_tls(script, pki.server_config(&[ALPN_H2]).unwrap())
                    .await
                    .unwrap(),
            ),
        };
        let mut upstream = UpstreamConfig::new(
            "up",
            vec![up.addr().into()],
            match up_kind {
                Up::H1 => UpstreamProtocol::Http1,
                Up::H2c => UpstreamProtocol::H2c,
                Up::H2Tls => UpstreamProtocol::H2,
            },
        );
        if up_kind == Up::H2Tls {
            upstream.tls = Some(UpstreamTls {
                server_name: Some("localhost".into()),
                ca: vec![pki.ca_der()],
                insecure_skip_verify: false,
                client_cert: None,
            });
        }
        let mut listener = ListenerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            vec![RouteConfig::new("/", "up")],
        );
        if down == Down::H2Tls {
            listener.tls = Some(
                ServerTls {
                    cert_chain: pki.cert_chain(),
                    key: pki.key(),
                }
                .into(),
            );
        }
        let mut config = Config::new(vec![listener], vec![upstream]);
        config.workers = NonZeroUsize::new(1);
        tweak(&mut config);
        let access = MemoryAccessLog::new();
        let gw = Gateway::start(config.clone(), Arc::new(access.clone())).unwrap();
        let addr = gw.listener_addrs()[0];
        Env {
            down,
            up_kind,
            pki,
            up,
            access,
            addr,
            gw: Some(gw),
            config,
        }
    }

    /// Reloads the gateway with its configuration adjusted by `tweak`.
    pub fn reload(&mut self, tweak: impl FnOnce(&mut Config)) {
        tweak(&mut self.config);
        let gw = self.gw.as_ref().expect("gateway running");
        gw.reload(self.config.clone()).unwrap();
    }

    pub fn log(&self) -> &EventLog {
        self.up.log()
    }

    pub fn up_is_h2(&self) -> bool {
        self.up_kind != Up::H1
    }

    /// A raw HTTP/1.1 client (cleartext, or TLS with ALPN http/1.1 on a TLS listener).
    pub async fn h1(&self) -> H1Client {
        match self.down {
            Down::H2Tls => {
                H1Client::connect_tls(self.addr, self.pki.client_config(&[ALPN_HTTP1]).unwrap())
                    .await
                    .unwrap()
            }
            _ => H1Client::connect(self.addr).await.unwrap(),
        }
    }

    /// A raw HTTP/2 client of this env's downstream kind (h2c for `H1`).
    pub async fn h2(&self) -> H2Client {
        match self.down {
            Down::H2Tls => {
                H2Client::connect_tls(self.addr, self.pki.client_config(&[ALPN_H2]).unwrap())
                    .await
                    .unwrap()
            }
            _ => H2Client::connect(self.addr).await.unwrap(),
        }
    }

    /// A hyper client speaking this env's downstream protocol.
    pub async fn http(&self) -> HttpClient {
        match self.down {
            Down::H1 => HttpClient::connect(self.addr, Proto::Http1, None)
                .await
                .unwrap(),
            Down::H2c => HttpClient::connect(self.addr, Proto::H2, None)
                .await
                .unwrap(),
            Down::H2Tls => HttpClient::connect(
                self.addr,
                Proto::H2,
                Some(self.pki.client_config(&[ALPN_H2]).unwrap()),
            )
            .await
            .unwrap(),
        }
    }

    /// Waits for the access-log record of `path` (records land a little after the response).
    pub async fn record(&self, path: &str) -> RequestRecord {
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            let recs: Vec<_> = self
                .access
                .records()
                .into_iter()
                .filter(|r| r.path == path)
                .collect();
            if let Some(r) = recs.into_iter().next() {
                return r;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "no access record for {path}; have: {:?}",
                    self.access
                        .records()
                        .iter()
                        .map(|r| r.path.clone())
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every access-log record of `path`.
    pub fn records(&self, path: &str) -> Vec<RequestRecord> {
        self.access
            .records()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// The metrics text, when the config has an admin listener.
    pub fn metrics_text(&self) -> Option<String> {
        self.gw.as_ref().and_then(|g| g.metrics_text())
    }

    /// Stops the gateway (short grace) off the async threads.
    pub async fn stop(self) {
        self.stop_with_grace(Duration::from_millis(200)).await;
    }

    /// Stops the gateway with `grace` for the requests in flight, off the async threads.
    pub async fn stop_with_grace(mut self, grace: Duration) {
        if let Some(gw) = self.gw.take() {
            let _ = tokio::task::spawn_blocking(move || gw.shutdown(grace)).await;
        }
    }

    /// HTTP/1 connections parked right now.
    pub fn parked(&self) -> usize {
        self.gw.as_ref().map_or(0, |g| g.parked_connections())
    }

    /// Waits until `n` connections are parked (bounded by [`BOUND`]).
    pub async fn wait_parked(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + BOUND;
        while self.parked() != n {
            if tokio::time::Instant::now() > deadline {
                panic!("{} connections parked, expected {n}", self.parked());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Waits until an upstream saw a connection of its close (HTTP/1.1: EOF or RST) or a stream of
/// its reset (HTTP/2): how a cancelled exchange looks from the other end.
pub async fn wait_cancelled_at(log: &EventLog) {
    bounded(Duration::from_secs(10), async {
        while !log.any(|e| {
            matches!(
                e.kind,
                test_support::EventKind::Eof
                    | test_support::EventKind::Reset
                    | test_support::EventKind::StreamReset { .. }
            )
        }) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A loopback address nothing listens on: connections to it are refused.
pub fn refused_addr() -> SocketAddr {
    test_support::refused_addr()
}

/// Runs `f` bounded by `limit`; a hang is a test failure with a clear message.
pub async fn bounded<F: std::future::Future>(limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// The value of the metric line starting with `prefix` (name and labels), if present.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// CPU time (user + system) of this process so far.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the state field.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// CPU time (user + system) of this process's threads whose name starts with `prefix`
/// (`tether-worker` for the gateway's workers).
pub fn thread_cpu_time(prefix: &str) -> Duration {
    let mut ticks = 0u64;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        ticks += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    Duration::from_millis(ticks * 10)
}

/// Resident set size of this process in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split(' ').nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A server of several endpoints' tests: it answers `GET /healthz` with `health`'s status,
/// holds `/hold` requests until they are cancelled, and answers anything else with its name,
/// over HTTP/1.1 or cleartext HTTP/2. It records the health checks' `Host` and `User-Agent`, and
/// counts the `/hold` requests it is holding.
pub struct Backend {
    pub addr: SocketAddr,
    pub health: Arc<std::sync::atomic::AtomicU16>,
    pub checks: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    pub held: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One `/hold` request counted in [`Backend::held`] while its handler lives.
struct Holding(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Backend {
    pub async fn start(name: &'static str) -> Backend {
        use bytes::Bytes;
        use http_body_util::Full;
        use hyper::{Request, Response, body::Incoming};
        use std::sync::atomic::Ordering;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let checks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (h, c, hd) = (health.clone(), checks.clone(), held.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (h, c, hd) = (h.clone(), c.clone(), hd.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (h, c, hd) = (h.clone(), c.clone(), hd.clone());
                        async move {
                            match req.uri().path() {
                                "/healthz" => {}
                                "/hold" => {
                                    hd.fetch_add(1, Ordering::SeqCst);
                                    let _holding = Holding(hd);
                                    std::future::pending::<()>().await;
                                }
                                _ => {
                                    return Ok::<_, std::convert::Infallible>(Response::new(
                                        Full::new(Bytes::from_static(name.as_bytes())),
                                    ));
                                }
                            }
                            let host = req
                                .uri()
                                .authority()
                                .map(|a| a.to_string())
                                .unwrap_or_else(|| header_text(&req, "host"));
                            c.lock()
                                .unwrap()
                                .push((host, header_text(&req, "user-agent")));
                            let status = h.load(Ordering::Relaxed);
                            Ok(Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"health")))
                                .unwrap())
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
                });
            }
        });
        Backend {
            addr,
            health,
            checks,
            held,
            task,
        }
    }

    /// Waits until `n` `/hold` requests are being held.
    pub async fn wait_held(&self, n: usize) {
        bounded(Duration::from_secs(10), async {
            while self.held.load(std::sync::atomic::Ordering::SeqCst) != n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

/// Waits until the metrics say `endpoint` of upstream `up` is in rotation (`healthy`) or out of
/// it.
pub async fn wait_health(env: &Env, endpoint: SocketAddr, healthy: bool) {
    let want = format!(
        "tether_upstream_endpoint_healthy{{upstream=\"up\",endpoint=\"{endpoint}\"}} {}",
        u8::from(healthy)
    );
    bounded(Duration::from_secs(10), async {
        while !env.metrics_text().unwrap().lines().any(|l| l == want) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A request header's text, or "" when it is missing or not text.
pub fn header_text<B>(req: &http::Request<B>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The values of header `n` among `headers` (as the upstream recorded them), in order.
pub fn values<'a>(headers: &'a [(String, String)], n: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == n)
        .map(|(_, v)| v.as_str())
        .collect()
}
