//! Clients and parsers of the side-by-side benchmark. Each measuring subcommand prints one JSON
//! object on stdout, which `run.sh` files under its scenario, proxy and case.
//!
//! - `cancel`: requests `/work` and aborts each one after a random delay (h1: closes the socket;
//!   h2: RST_STREAM(CANCEL)), then reads the backend's records: abort → backend saw it, per request.
//! - `mix`: closed-loop clients, a share of which give up at random times; wasted upstream
//!   work-time (after the client left) as a fraction of all upstream work-time.
//! - `idle`: opens N HTTP/1.1 connections, one request on each, then holds them idle.
//! - `parse-wrk`, `parse-h2load`: turn the load generators' output into JSON.
//! - `free-ports N`: N currently free loopback ports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use compare_harness::clock::mono_ns;
use compare_harness::records::{Outcome, Records};
use compare_harness::stats::{Rng, percentile};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Downstream protocol of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Proto {
    /// HTTP/1.1.
    H1,
    /// HTTP/2 with prior knowledge (h2c).
    H2,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Abort requests in flight and measure how fast the backend notices.
    Cancel {
        /// Where requests go (the proxy, or the backend for the baseline).
        #[arg(long)]
        target: SocketAddr,
        /// The backend, for `/records`.
        #[arg(long)]
        backend: SocketAddr,
        #[arg(long, value_enum)]
        proto: Proto,
        /// Requests in total.
        #[arg(long, default_value_t = 100)]
        n: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 10)]
        concurrency: usize,
        /// Upstream work per request.
        #[arg(long, default_value_t = 2000)]
        work_ms: u64,
        /// Earliest abort after sending.
        #[arg(long, default_value_t = 50)]
        abort_min_ms: u64,
        /// Latest abort after sending.
        #[arg(long, default_value_t = 500)]
        abort_max_ms: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Closed-loop clients; a share of the requests is given up at a random time.
    Mix {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        backend: SocketAddr,
        #[arg(long, value_enum)]
        proto: Proto,
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// How long new requests are started.
        #[arg(long, default_value_t = 5)]
        duration_s: u64,
        /// Share of requests the client gives up on.
        #[arg(long, default_value_t = 0.3)]
        abort_share: f64,
        #[arg(long, default_value_t = 100)]
        work_min_ms: u64,
        #[arg(long, default_value_t = 600)]
        work_max_ms: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Open N idle keep-alive connections (one request each) and hold them.
    Idle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        n: usize,
        /// Connections being set up at once.
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
        /// How long to hold them once open.
        #[arg(long, default_value_t = 30)]
        hold_s: u64,
        /// Written (JSON) once all connections are open and idle.
        #[arg(long)]
        ready_file: PathBuf,
    },
    /// wrk's output (with --latency) as JSON.
    ParseWrk { file: PathBuf },
    /// h2load's output as JSON; with --log, latency percentiles from its per-request log.
    ParseH2load {
        file: PathBuf,
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// N free loopback ports, one per line.
    FreePorts { n: usize },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("compare-client: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = rt.block_on(async {
        match cli.cmd {
            Cmd::Cancel {
                target,
                backend,
                proto,
                n,
                concurrency,
                work_ms,
                abort_min_ms,
                abort_max_ms,
                seed,
            } => {
                cancel(
                    target,
                    backend,
                    proto,
                    n,
                    concurrency,
                    work_ms,
                    (abort_min_ms, abort_max_ms),
                    seed,
                )
                .await
            }
            Cmd::Mix {
                target,
                backend,
                proto,
                clients,
                duration_s,
                abort_share,
                work_min_ms,
                work_max_ms,
                seed,
            } => {
                mix(
                    target,
                    backend,
                    proto,
                    clients,
                    Duration::from_secs(duration_s),
                    abort_share,
                    (work_min_ms, work_max_ms),
                    seed,
                )
                .await
            }
            Cmd::Idle {
                target,
                n,
                concurrency,
                hold_s,
                ready_file,
            } => idle(target, n, concurrency, hold_s, ready_file).await,
            Cmd::ParseWrk { file } => parse_wrk(&file),
            Cmd::ParseH2load { file, log } => parse_h2load(&file, log.as_deref()),
            Cmd::FreePorts { n } => free_ports(n),
        }
    });
    match out {
        Ok(v) => {
            if !v.is_null() {
                println!("{v}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("compare-client: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A unique prefix for this process's request ids.
fn run_prefix(seed: u64) -> String {
    format!("r{}s{seed}", mono_ns() % 1_000_000_000)
}

/// What the client did with one request.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    /// When the client gave up (CLOCK_MONOTONIC ns); `None` if it did not.
    abort_ns: Option<u64>,
    /// The response (or a close) arrived before the planned abort.
    early: bool,
    /// The request failed on the client side (connect, protocol).
    failed: bool,
}

/// One h1 request on a fresh connection, aborted by closing the socket after `after`.
async fn h1_abort(target: SocketAddr, id: String, work_ms: u64, after: Duration) -> Sent {
    let mut s = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => return failed(id),
    };
    let _ = s.set_nodelay(true);
    let req = format!("GET /work?ms={work_ms}&id={id} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return failed(id);
    }
    let mut buf = [0u8; 1024];
    // Either the proxy answers or closes first (early), or the planned abort time comes.
    let early = tokio::select! {
        biased;
        _ = s.read(&mut buf) => true,
        _ = sleep(after) => false,
    };
    if early {
        return Sent {
            id,
            abort_ns: None,
            early: true,
            failed: false,
        };
    }
    let t = mono_ns();
    drop(s);
    Sent {
        id,
        abort_ns: Some(t),
        early: false,
        failed: false,
    }
}

fn failed(id: String) -> Sent {
    Sent {
        id,
        abort_ns: None,
        early: false,
        failed: true,
    }
}

/// One h2 stream on a shared connection, aborted with RST_STREAM(CANCEL) after `after`.
async fn h2_abort(
    client: &mut h2::client::SendRequest<Bytes>,
    target: SocketAddr,
    id: String,
    work_ms: u64,
    after: Duration,
) -> Sent {
    let mut ready = match client.clone().ready().await {
        Ok(c) => c,
        Err(_) => return failed(id),
    };
    let req = match Request::get(format!("http://{target}/work?ms={work_ms}&id={id}")).body(()) {
        Ok(r) => r,
        Err(_) => return failed(id),
    };
    let (resp, mut send) = match ready.send_request(req, true) {
        Ok(x) => x,
        Err(_) => return failed(id),
    };
    let early = tokio::select! {
        biased;
        _ = resp => true,
        _ = sleep(after) => false,
    };
    if early {
        return Sent {
            id,
            abort_ns: None,
            early: true,
            failed: false,
        };
    }
    let t = mono_ns();
    send.send_reset(h2::Reason::CANCEL);
    drop(send);
    *client = ready;
    Sent {
        id,
        abort_ns: Some(t),
        early: false,
        failed: false,
    }
}

async fn h2_connect(target: SocketAddr) -> Result<h2::client::SendRequest<Bytes>, BoxError> {
    let tcp = TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    let (client, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// GET on the backend, `Connection: close`, body as text.
async fn backend_get(backend: SocketAddr, path: &str) -> Result<Vec<u8>, BoxError> {
    let mut s = TcpStream::connect(backend).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let at = find(&buf, b"\r\n\r\n").ok_or("backend: no response head")?;
    Ok(buf[at + 4..].to_vec())
}

async fn records(backend: SocketAddr, clear: bool) -> Result<Records, BoxError> {
    let path = if clear {
        "/records?clear=1"
    } else {
        "/records"
    };
    Ok(serde_json::from_slice(&backend_get(backend, path).await?)?)
}

/// Polls the backend until every id in `ids` has ended, or `deadline`; then takes the records.
async fn settle(
    backend: SocketAddr,
    ids: &[String],
    deadline: Instant,
) -> Result<Records, BoxError> {
    loop {
        let r = records(backend, false).await?;
        let open = ids
            .iter()
            .any(|id| r.get(id).is_some_and(|w| w.end_ns.is_none()));
        if !open || Instant::now() >= deadline {
            break;
        }
        sleep(Duration::from_millis(100)).await;
    }
    records(backend, true).await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn ms(ns: f64) -> f64 {
    (ns / 1e6 * 1000.0).round() / 1000.0
}

#[allow(clippy::too_many_arguments)]
async fn cancel(
    target: SocketAddr,
    backend: SocketAddr,
    proto: Proto,
    n: usize,
    concurrency: usize,
    work_ms: u64,
    (abort_min, abort_max): (u64, u64),
    seed: u64,
) -> Result<Value, BoxError> {
    // Forget what earlier runs left behind.
    records(backend, true).await?;
    let prefix = run_prefix(seed);
    let concurrency = concurrency.clamp(1, n.max(1));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let prefix = prefix.clone();
        let mut rng = Rng::new(seed.wrapping_mul(1000).wrapping_add(w as u64 + 1));
        let mine: Vec<usize> = (0..n).filter(|i| i % concurrency == w).collect();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut h2c = match proto {
                Proto::H2 => h2_connect(target).await.ok(),
                Proto::H1 => None,
            };
            for i in mine {
                let id = format!("{prefix}-{i}");
                let after = Duration::from_millis(rng.range(abort_min, abort_max));
                let sent = match (&proto, h2c.as_mut()) {
                    (Proto::H1, _) => h1_abort(target, id, work_ms, after).await,
                    (Proto::H2, Some(c)) => h2_abort(c, target, id, work_ms, after).await,
                    (Proto::H2, None) => failed(id),
                };
                out.push(sent);
            }
            out
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await?);
    }
    let ids: Vec<String> = sent.iter().map(|s| s.id.clone()).collect();
    let recs = settle(
        backend,
        &ids,
        Instant::now() + Duration::from_millis(work_ms + 1000),
    )
    .await?;

    let mut lat = Vec::new();
    let (mut completed, mut running, mut missing, mut cancelled) = (0, 0, 0, 0);
    for s in &sent {
        let Some(abort) = s.abort_ns else { continue };
        match recs.get(&s.id) {
            None => missing += 1,
            Some(r) => match (r.outcome, r.end_ns) {
                (Outcome::Cancelled, Some(end)) => {
                    cancelled += 1;
                    lat.push(end as f64 - abort as f64);
                }
                (Outcome::Completed, _) => completed += 1,
                _ => running += 1,
            },
        }
    }
    let p = |q: f64| percentile(&lat, q).map(ms);
    Ok(json!({
        "n": n,
        "aborted": sent.iter().filter(|s| s.abort_ns.is_some()).count(),
        "early": sent.iter().filter(|s| s.early).count(),
        "failed": sent.iter().filter(|s| s.failed).count(),
        "cancelled": cancelled,
        "completed": completed,
        "still_running": running,
        "never_reached": missing,
        "p50_ms": p(50.0),
        "p95_ms": p(95.0),
        "p99_ms": p(99.0),
        "max_ms": p(100.0),
    }))
}

/// A reusable downstream connection of one `mix` client.
enum MixConn {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn mix_connect(target: SocketAddr, proto: Proto) -> Result<MixConn, BoxError> {
    let tcp = TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    let io = TokioIo::new(tcp);
    Ok(match proto {
        Proto::H1 => {
            let (s, c) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(async move {
                let _ = c.await;
            });
            MixConn::H1(s)
        }
        Proto::H2 => {
            let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(async move {
                let _ = c.await;
            });
            MixConn::H2(s)
        }
    })
}

/// One request of a `mix` client. Dropping the response future is the abort: hyper closes the
/// h1 connection, or resets the h2 stream with CANCEL.
async fn mix_one(
    conn: &mut Option<MixConn>,
    target: SocketAddr,
    proto: Proto,
    id: &str,
    work_ms: u64,
    abort_after: Option<Duration>,
) -> Result<Option<u64>, BoxError> {
    if conn.is_none() {
        *conn = Some(mix_connect(target, proto).await?);
    }
    // h1: origin-form and a Host header (proxies refuse an absolute URI whose authority differs
    // from Host); h2: the absolute URI gives :scheme and :authority.
    let path = format!("/work?ms={work_ms}&id={id}");
    let req = match proto {
        Proto::H1 => Request::get(path).header("host", target.to_string()),
        Proto::H2 => Request::get(format!("http://{target}{path}")),
    }
    .body(Empty::<Bytes>::new())?;
    let fut: std::pin::Pin<Box<dyn Future<Output = Result<_, hyper::Error>> + Send>> =
        match conn.as_mut() {
            Some(MixConn::H1(s)) => {
                s.ready().await?;
                Box::pin(s.send_request(req))
            }
            Some(MixConn::H2(s)) => {
                s.ready().await?;
                Box::pin(s.send_request(req))
            }
            None => return Err("no connection".into()),
        };
    let Some(after) = abort_after else {
        let resp = fut.await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        if !status.is_success() {
            return Err(format!("status {status}").into());
        }
        return Ok(None);
    };
    tokio::select! {
        biased;
        r = fut => {
            // Finished before the client's patience ran out: not an abort after all.
            let resp = r?;
            let status = resp.status();
            resp.into_body().collect().await?;
            if !status.is_success() {
                return Err(format!("status {status}").into());
            }
            Ok(None)
        }
        _ = sleep(after) => {
            let t = mono_ns();
            if proto == Proto::H1 {
                // The h1 connection is closed by the abort; the next request opens a new one.
                *conn = None;
            }
            Ok(Some(t))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn mix(
    target: SocketAddr,
    backend: SocketAddr,
    proto: Proto,
    clients: usize,
    duration: Duration,
    abort_share: f64,
    (work_min, work_max): (u64, u64),
    seed: u64,
) -> Result<Value, BoxError> {
    records(backend, true).await?;
    let prefix = run_prefix(seed);
    let stop = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let prefix = prefix.clone();
        let mut rng = Rng::new(seed.wrapping_mul(7919).wrapping_add(c as u64 + 1));
        tasks.push(tokio::spawn(async move {
            let mut out: Vec<(String, Option<u64>)> = Vec::new();
            let mut errors = 0u64;
            let mut first_error: Option<String> = None;
            let mut conn = None;
            let mut i = 0u64;
            while Instant::now() < stop {
                let id = format!("{prefix}-{c}-{i}");
                i += 1;
                let work = rng.range(work_min, work_max);
                let abort = rng
                    .chance(abort_share)
                    .then(|| Duration::from_millis(rng.range(1, work)));
                match mix_one(&mut conn, target, proto, &id, work, abort).await {
                    Ok(a) => out.push((id, a)),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                        conn = None;
                        out.push((id, None));
                        sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (out, errors, first_error)
        }));
    }
    let mut sent = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (o, e, f) = t.await?;
        sent.extend(o);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    let recs = settle(
        backend,
        &ids,
        Instant::now() + Duration::from_millis(work_max + 1000),
    )
    .await?;
    let now = mono_ns();
    let aborts: HashMap<&str, u64> = sent
        .iter()
        .filter_map(|(id, a)| a.map(|t| (id.as_str(), t)))
        .collect();
    let (mut total, mut wasted) = (0u128, 0u128);
    let mut aborted_completed = 0;
    for id in &ids {
        let Some(r) = recs.get(id) else { continue };
        let end = r.end_ns.unwrap_or(now);
        total += u128::from(end.saturating_sub(r.start_ns));
        if let Some(&a) = aborts.get(id.as_str()) {
            wasted += u128::from(end.saturating_sub(a.max(r.start_ns)));
            if r.outcome == Outcome::Completed {
                aborted_completed += 1;
            }
        }
    }
    let pct = if total > 0 {
        (wasted as f64 / total as f64 * 100.0 * 1000.0).round() / 1000.0
    } else {
        0.0
    };
    Ok(json!({
        "requests": ids.len(),
        "aborted": aborts.len(),
        "aborted_completed": aborted_completed,
        "errors": errors,
        "first_error": first_error,
        "total_work_s": total as f64 / 1e9,
        "wasted_work_s": wasted as f64 / 1e9,
        "wasted_pct": pct,
    }))
}

/// Sends `GET /` and reads the whole response, leaving the connection idle and reusable.
async fn one_request(target: SocketAddr) -> Result<TcpStream, BoxError> {
    let mut s = TcpStream::connect(target).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err("closed before the response ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(h) = find(&buf, b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(format!("status: {}", head.lines().next().unwrap_or("")).into());
        }
        let cl = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let done = match cl {
            Some(cl) => buf.len() >= h + 4 + cl,
            None => buf.ends_with(b"0\r\n\r\n"),
        };
        if done {
            return Ok(s);
        }
    }
}

async fn idle(
    target: SocketAddr,
    n: usize,
    concurrency: usize,
    hold_s: u64,
    ready_file: PathBuf,
) -> Result<Value, BoxError> {
    let start = Instant::now();
    let per = n.div_ceil(concurrency.max(1));
    let mut tasks = Vec::new();
    for w in 0..concurrency.max(1) {
        let count = per.min(n.saturating_sub(w * per));
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(count);
            let mut failed = 0usize;
            let mut first_error = None;
            for _ in 0..count {
                match timeout(Duration::from_secs(10), one_request(target)).await {
                    Ok(Ok(s)) => held.push(s),
                    Ok(Err(e)) => {
                        failed += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                    Err(_) => {
                        failed += 1;
                        first_error.get_or_insert("timeout".to_owned());
                    }
                }
            }
            (held, failed, first_error)
        }));
    }
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    let mut first_error = None;
    for t in tasks {
        let (h, f, e) = t.await?;
        held.extend(h);
        failed += f;
        if first_error.is_none() {
            first_error = e;
        }
    }
    let report = json!({
        "open": held.len(),
        "failed": failed,
        "first_error": first_error,
        "setup_s": start.elapsed().as_secs_f64(),
    });
    std::fs::write(&ready_file, report.to_string())?;
    sleep(Duration::from_secs(hold_s)).await;
    drop(held);
    Ok(Value::Null)
}

/// `1.23ms` / `850.00us` / `1.20s` / `2.00m` → milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60_000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

/// `12.34MB` / `1.2GB/s` / `512KB` / `100B` → megabytes (10^6) per unit.
fn size_mb(s: &str) -> Option<f64> {
    let s = s.trim().trim_end_matches("/s");
    for (suffix, mult) in [
        ("GB", 1024.0 * 1024.0 * 1024.0),
        ("MB", 1024.0 * 1024.0),
        ("KB", 1024.0),
        ("B", 1.0),
    ] {
        if let Some(v) = s.strip_suffix(suffix) {
            return v.parse::<f64>().ok().map(|v| v * mult / 1e6);
        }
    }
    None
}

fn parse_wrk(file: &std::path::Path) -> Result<Value, BoxError> {
    let text = std::fs::read_to_string(file)?;
    let mut out = serde_json::Map::new();
    let mut errors = 0u64;
    for line in text.lines() {
        let t = line.trim();
        let mut words = t.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => {
                out.insert("p50_ms".into(), json!(duration_ms(v)));
            }
            (Some("99%"), Some(v)) => {
                out.insert("p99_ms".into(), json!(duration_ms(v)));
            }
            (Some("Requests/sec:"), Some(v)) => {
                out.insert("rps".into(), json!(v.parse::<f64>().ok()));
            }
            (Some("Transfer/sec:"), Some(v)) => {
                out.insert("mbps".into(), json!(size_mb(v)));
            }
            (Some("Socket"), Some("errors:")) => {
                errors += t
                    .split(',')
                    .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                    .sum::<u64>();
            }
            (Some("Non-2xx"), _) => {
                errors += t
                    .split_whitespace()
                    .last()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            _ => {
                if let Some(rest) = t.split_once(" requests in ") {
                    out.insert("requests".into(), json!(rest.0.parse::<u64>().ok()));
                }
            }
        }
    }
    out.insert("errors".into(), json!(errors));
    if !out.contains_key("rps") {
        return Err(format!("{}: no Requests/sec line", file.display()).into());
    }
    Ok(Value::Object(out))
}

fn parse_h2load(file: &std::path::Path, log: Option<&std::path::Path>) -> Result<Value, BoxError> {
    let text = std::fs::read_to_string(file)?;
    let mut out = serde_json::Map::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("finished in ") {
            // finished in 6.00s, 31234.50 req/s, 3.21MB/s
            let parts: Vec<&str> = rest.split(", ").collect();
            if let Some(rps) = parts.get(1).and_then(|p| p.strip_suffix(" req/s")) {
                out.insert("rps".into(), json!(rps.parse::<f64>().ok()));
            }
            if let Some(bw) = parts.get(2) {
                out.insert("mbps".into(), json!(size_mb(bw)));
            }
        } else if let Some(rest) = t.strip_prefix("requests: ") {
            // 187407 total, 187407 started, 187407 done, 187407 succeeded, 0 failed, 0 errored, 0 timeout
            for part in rest.split(", ") {
                if let Some((n, what)) = part.split_once(' ')
                    && matches!(
                        what,
                        "done" | "succeeded" | "failed" | "errored" | "timeout"
                    )
                {
                    out.insert(what.into(), json!(n.parse::<u64>().ok()));
                }
            }
        } else if let Some(rest) = t.strip_prefix("status codes: ") {
            let non2xx: u64 = rest
                .split(", ")
                .filter(|p| !p.ends_with("2xx"))
                .filter_map(|p| p.split_whitespace().next()?.parse::<u64>().ok())
                .sum();
            out.insert("non2xx".into(), json!(non2xx));
        }
    }
    let errors: u64 = ["failed", "errored", "timeout", "non2xx"]
        .iter()
        .filter_map(|k| out.get(*k)?.as_u64())
        .sum();
    out.insert("errors".into(), json!(errors));
    if let Some(log) = log {
        // start-time(us) \t status \t duration(us)
        let text = std::fs::read_to_string(log)?;
        let lat: Vec<f64> = text
            .lines()
            .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
            .map(|us| us / 1000.0)
            .collect();
        out.insert("p50_ms".into(), json!(percentile(&lat, 50.0)));
        out.insert("p99_ms".into(), json!(percentile(&lat, 99.0)));
    }
    if !out.contains_key("rps") {
        return Err(format!("{}: no 'finished in' line", file.display()).into());
    }
    Ok(Value::Object(out))
}

fn free_ports(n: usize) -> Result<Value, BoxError> {
    // Below the kernel's ephemeral range: a port from it could be taken by an outgoing
    // connection (a load generator's, thousands per run) between being chosen here and being
    // bound by the proxy that is given it.
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    let span = u32::from(ephemeral_low.saturating_sub(LOW));
    // Hold all of them until every one is chosen, so the N are distinct.
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    if span > 0 {
        // Start somewhere different each run, so that runs side by side rarely meet.
        let start = std::process::id() % span;
        for i in 0..span {
            if listeners.len() == n {
                break;
            }
            let port = LOW + u16::try_from((start + i) % span).unwrap_or(0);
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                listeners.push(l);
            }
        }
    }
    while listeners.len() < n {
        listeners.push(std::net::TcpListener::bind("127.0.0.1:0")?);
    }
    for l in &listeners {
        println!("{}", l.local_addr()?.port());
    }
    Ok(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(duration_ms("850.00us"), Some(0.85));
        assert_eq!(duration_ms("1.50ms"), Some(1.5));
        assert_eq!(duration_ms("1.20s"), Some(1200.0));
        assert!((size_mb("1.00GB").unwrap_or(0.0) - 1073.741824).abs() < 1e-6);
        assert!((size_mb("2.00MB/s").unwrap_or(0.0) - 2.097152).abs() < 1e-6);
    }

    #[test]
    fn wrk_output() {
        let dir = std::env::temp_dir().join(format!("compare-wrk-{}", std::process::id()));
        let text = "Running 6s test @ http://127.0.0.1:1/\n  2 threads and 64 connections\n  Latency Distribution\n     50%    1.02ms\n     75%    1.50ms\n     90%    2.00ms\n     99%  850.00us\n  123456 requests in 6.00s, 12.34MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\nRequests/sec:  20576.00\nTransfer/sec:      2.06MB\n";
        std::fs::write(&dir, text).unwrap();
        let v = parse_wrk(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(v["rps"], json!(20576.0));
        assert_eq!(v["p50_ms"], json!(1.02));
        assert_eq!(v["p99_ms"], json!(0.85));
        assert_eq!(v["requests"], json!(123456));
        assert_eq!(v["errors"], json!(3));
    }
}
