//! `tether trace URL`: one request, stage by stage, with the gateway's own connector pieces (its
//! resolver, the Happy Eyeballs race, its TLS setup), so what it shows is what tether would see.
//!
//! Stages: `dns` (every candidate with its family), `connect` (the race; local and remote
//! endpoints of the winner), `tls` (version, cipher, ALPN, certificate subject, names and
//! expiry), `send` (the request written), `first_byte` (the response head), `body` (the first
//! body bytes). A failure is placed on its stage with the OS error name and a hint, and the exit
//! code names the stage ([`exit_code`]).

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use clap::Args;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tether_gateway::config::{UpstreamAddress, UpstreamProtocol, UpstreamTls};
use tether_gateway::upstream::connect::{
    Connector, HAPPY_EYEBALLS_STAGGER, UpstreamIo, interleave, race,
};
use tether_gateway::upstream::dns::{DnsConfig, Resolver};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::duration::parse_duration;

/// Exit status for an unusable command line (bad URL, unreadable `--cacert`): `EX_USAGE`.
pub const EXIT_USAGE: u8 = 64;

/// Options of `tether trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The URL to request: `http://` or `https://`.
    url: String,
    /// Speak HTTP/2 (h2c with prior knowledge for http://, ALPN h2 for https://).
    #[arg(long)]
    http2: bool,
    /// Print one JSON object instead of the timeline.
    #[arg(long)]
    json: bool,
    /// Use these addresses for HOST:PORT instead of resolving it, like curl
    /// (`HOST:PORT:ADDR[,ADDR...]`, or `HOST:ADDR` for any port). Repeatable.
    #[arg(long, value_name = "HOST:PORT:ADDR")]
    resolve: Vec<String>,
    /// Query this nameserver (`IP:PORT`) instead of the system resolver. Repeatable.
    #[arg(long, value_name = "IP:PORT")]
    dns_server: Vec<SocketAddr>,
    /// Longest the name lookup may take.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    dns_timeout: Duration,
    /// Longest the TCP connect race may take.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Longest the whole trace may take (TLS, send, first byte and body included).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    max_time: Duration,
    /// Do not verify the server certificate (its details are still shown).
    #[arg(long, short = 'k')]
    insecure: bool,
    /// Trust the CA certificates in this PEM file instead of the built-in web roots.
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Request method.
    #[arg(long, short = 'X', default_value = "GET")]
    request: String,
    /// Extra request header, `Name: value`. Repeatable.
    #[arg(long, short = 'H', value_name = "HEADER")]
    header: Vec<String>,
}

/// A stage of the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Name resolution.
    Dns,
    /// TCP connect race.
    Connect,
    /// TLS handshake.
    Tls,
    /// Writing the request.
    Send,
    /// Waiting for the response head.
    FirstByte,
    /// Reading the first body bytes.
    Body,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Dns => "dns",
            Stage::Connect => "connect",
            Stage::Tls => "tls",
            Stage::Send => "send",
            Stage::FirstByte => "first_byte",
            Stage::Body => "body",
        }
    }
}

/// The exit status for a failure at `stage`: 10 dns, 11 connect, 12 tls, 13 send, 14 first
/// byte, 15 body. 0 is success (whatever the HTTP status), 64 a bad command line.
pub fn exit_code(stage: Stage) -> u8 {
    match stage {
        Stage::Dns => 10,
        Stage::Connect => 11,
        Stage::Tls => 12,
        Stage::Send => 13,
        Stage::FirstByte => 14,
        Stage::Body => 15,
    }
}

/// One finished stage.
#[derive(Debug)]
struct StageLine {
    stage: Stage,
    took: Duration,
    detail: String,
}

/// A failure, placed on its stage.
#[derive(Debug)]
struct Failure {
    stage: Stage,
    took: Duration,
    code: String,
    message: String,
    hint: &'static str,
}

/// What the certificate and handshake said.
#[derive(Debug, Default)]
struct TlsInfo {
    version: String,
    cipher: String,
    alpn: Option<String>,
    subject: Option<String>,
    issuer: Option<String>,
    names: Vec<String>,
    not_after: Option<i64>,
}

/// Everything found out, successful or not.
#[derive(Debug, Default)]
struct Trace {
    url: String,
    method: String,
    http_version: &'static str,
    resolved_by: &'static str,
    candidates: Vec<SocketAddr>,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    tls: Option<TlsInfo>,
    status: Option<u16>,
    reason: Option<String>,
    headers: Vec<(String, String)>,
    body_bytes: Option<usize>,
    stages: Vec<StageLine>,
    failure: Option<Failure>,
    total: Duration,
}

impl Trace {
    fn done(&mut self, stage: Stage, took: Duration, detail: String) {
        self.stages.push(StageLine {
            stage,
            took,
            detail,
        });
    }

    fn fail(
        &mut self,
        stage: Stage,
        took: Duration,
        code: impl Into<String>,
        message: impl Into<String>,
    ) {
        let code = code.into();
        self.failure = Some(Failure {
            stage,
            took,
            hint: hint(stage, &code),
            code,
            message: message.into(),
        });
    }
}

/// A command-line mistake.
#[derive(Debug, thiserror::Error)]
enum UsageError {
    #[error("{0:?} is not an http:// or https:// URL")]
    Url(String),
    #[error("--resolve {0:?}: expected HOST:PORT:ADDR[,ADDR...] or HOST:ADDR")]
    Resolve(String),
    #[error("--cacert {path}: {message}")]
    CaCert { path: String, message: String },
    #[error("-H {0:?}: expected \"Name: value\"")]
    Header(String),
    #[error("-X {0:?} is not a method")]
    Method(String),
    #[error("{0}")]
    Setup(String),
}

/// Runs `trace` to completion and returns the process exit status.
pub fn run(args: TraceArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.json;
    let trace = match rt.block_on(trace(args)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tether trace: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if json {
        println!("{}", to_json(&trace));
    } else {
        print!("{}", to_text(&trace));
    }
    match &trace.failure {
        Some(f) => ExitCode::from(exit_code(f.stage)),
        None => ExitCode::SUCCESS,
    }
}

struct Target {
    https: bool,
    host: String,
    port: u16,
    path: String,
    authority: String,
}

fn parse_url(url: &str) -> Result<Target, UsageError> {
    let bad = || UsageError::Url(url.to_owned());
    let uri: Uri = url.parse().map_err(|_| bad())?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad()),
    };
    let auth = uri.authority().ok_or_else(bad)?;
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad());
    }
    let port = auth.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    Ok(Target {
        https,
        host,
        port,
        path,
        authority: auth.as_str().to_owned(),
    })
}

/// Addresses from `--resolve` entries matching `host` and `port`, if any.
fn resolve_override(
    entries: &[String],
    host: &str,
    port: u16,
) -> Result<Option<Vec<SocketAddr>>, UsageError> {
    for e in entries {
        let bad = || UsageError::Resolve(e.clone());
        let (h, rest) = e.split_once(':').ok_or_else(bad)?;
        // `HOST:PORT:ADDRS` when a port follows, else `HOST:ADDRS` for any port.
        let (p, addrs) = match rest.split_once(':') {
            Some((p, a)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                (Some(p.parse::<u16>().map_err(|_| bad())?), a)
            }
            _ => (None, rest),
        };
        if !h.eq_ignore_ascii_case(host) || p.is_some_and(|p| p != port) {
            continue;
        }
        let ips = addrs
            .split(',')
            .map(|a| {
                a.trim()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .map(|ip| SocketAddr::new(ip, port))
                    .map_err(|_| bad())
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Some(ips));
    }
    Ok(None)
}

async fn trace(args: TraceArgs) -> Result<Trace, UsageError> {
    let target = parse_url(&args.url)?;
    let method = http::Method::from_bytes(args.request.as_bytes())
        .map_err(|_| UsageError::Method(args.request.clone()))?;
    let mut extra = Vec::new();
    for h in &args.header {
        let (n, v) = h
            .split_once(':')
            .ok_or_else(|| UsageError::Header(h.clone()))?;
        let n = http::HeaderName::from_bytes(n.trim().as_bytes())
            .map_err(|_| UsageError::Header(h.clone()))?;
        let v = http::HeaderValue::from_str(v.trim()).map_err(|_| UsageError::Header(h.clone()))?;
        extra.push((n, v));
    }
    let overridden = resolve_override(&args.resolve, &target.host, target.port)?;
    let ca = match &args.cacert {
        None => Vec::new(),
        Some(p) => {
            let err = |message: String| UsageError::CaCert {
                path: p.display().to_string(),
                message,
            };
            let certs = CertificateDer::pem_file_iter(p)
                .map_err(|e| err(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(e.to_string()))?;
            if certs.is_empty() {
                return Err(err("no certificate in the file".into()));
            }
            certs
        }
    };
    let resolver = Resolver::new(&DnsConfig {
        nameservers: args.dns_server.clone(),
        timeout: args.dns_timeout,
    })
    .map_err(|e| UsageError::Setup(format!("--dns-server: {e}")))?;
    let protocol = if args.http2 {
        UpstreamProtocol::H2
    } else {
        UpstreamProtocol::Http1
    };
    let tls_settings = target.https.then_some(UpstreamTls {
        server_name: None,
        ca,
        insecure_skip_verify: args.insecure,
        client_cert: None,
    });
    let connector = Connector::new(protocol, tls_settings.as_ref(), resolver.clone())
        .map_err(|e| UsageError::Setup(e.to_string()))?;

    let start = Instant::now();
    let deadline = start + args.max_time;
    let mut t = Trace {
        url: args.url.clone(),
        method: method.as_str().to_owned(),
        http_version: if args.http2 { "HTTP/2" } else { "HTTP/1.1" },
        ..Default::default()
    };
    run_stages(
        &mut t, &target, &args, &connector, &resolver, overridden, method, extra, deadline,
    )
    .await;
    t.total = start.elapsed();
    Ok(t)
}

#[allow(clippy::too_many_arguments)]
async fn run_stages(
    t: &mut Trace,
    target: &Target,
    args: &TraceArgs,
    connector: &Connector,
    resolver: &Resolver,
    overridden: Option<Vec<SocketAddr>>,
    method: http::Method,
    extra: Vec<(http::HeaderName, http::HeaderValue)>,
    deadline: Instant,
) {
    // dns
    let s = Instant::now();
    let literal = target.host.parse::<IpAddr>().is_ok();
    let found = match overridden {
        Some(a) => {
            t.resolved_by = "--resolve";
            Ok(a)
        }
        None => {
            t.resolved_by = if literal {
                "literal"
            } else if args.dns_server.is_empty() {
                "system"
            } else {
                "nameserver"
            };
            resolver.lookup(&target.host, target.port).await
        }
    };
    let candidates = match found {
        Ok(c) => interleave(c),
        Err(e) => {
            let via = match args.dns_server.first() {
                Some(ns) => format!("nameserver {ns}"),
                None => "the system resolver".to_owned(),
            };
            return t.fail(
                Stage::Dns,
                s.elapsed(),
                e.code(),
                format!("{}: {e} (via {via})", target.host),
            );
        }
    };
    t.candidates = candidates.clone();
    let how = match t.resolved_by {
        "literal" => "is an IP literal".to_owned(),
        "--resolve" => "from --resolve".to_owned(),
        "system" => "via the system resolver".to_owned(),
        _ => format!(
            "via {}",
            args.dns_server
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    t.done(
        Stage::Dns,
        s.elapsed(),
        format!(
            "{} {how}: {} candidate{}",
            target.host,
            candidates.len(),
            if candidates.len() == 1 { "" } else { "s" }
        ),
    );

    // connect
    let s = Instant::now();
    let raced = tokio::time::timeout(
        args.connect_timeout,
        race(candidates.clone(), HAPPY_EYEBALLS_STAGGER),
    )
    .await;
    let report = match raced {
        Ok(r) => r,
        Err(_) => {
            return t.fail(
                Stage::Connect,
                s.elapsed(),
                "ETIMEDOUT",
                format!(
                    "no candidate answered within {:?} ({})",
                    args.connect_timeout,
                    list(&candidates)
                ),
            );
        }
    };
    let lost: Vec<String> = report
        .failures
        .iter()
        .map(|(a, e)| format!("{a} {}", errno_name(e)))
        .chain(report.abandoned.iter().map(|a| format!("{a} abandoned")))
        .collect();
    let Some((tcp, peer)) = report.winner else {
        let code = report
            .failures
            .last()
            .map(|(_, e)| errno_name(e))
            .unwrap_or_else(|| "ECONNREFUSED".to_owned());
        let message = report
            .failures
            .iter()
            .map(|(a, e)| format!("{a}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        return t.fail(Stage::Connect, s.elapsed(), code, message);
    };
    let local = tcp.local_addr().ok();
    t.local = local;
    t.remote = Some(peer);
    let mut detail = format!(
        "{} -> {peer} ({})",
        local.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
        family(&peer)
    );
    if !lost.is_empty() {
        let _ = write!(detail, "; lost: {}", lost.join(", "));
    }
    t.done(Stage::Connect, s.elapsed(), detail);

    // tls
    let s = Instant::now();
    let addr = UpstreamAddress::new(target.host.clone(), target.port);
    let io = match tokio::time::timeout_at(deadline, connector.handshake(tcp, peer, &addr)).await {
        Err(_) => {
            return t.fail(
                Stage::Tls,
                s.elapsed(),
                "ETIMEDOUT",
                "no handshake before --max-time",
            );
        }
        Ok(Err(e)) => {
            let (code, message) = tls_failure(&e);
            return t.fail(Stage::Tls, s.elapsed(), code, message);
        }
        Ok(Ok(io)) => io,
    };
    if let UpstreamIo::Tls(tls) = &io {
        let info = tls_info(tls.get_ref().1);
        let took = s.elapsed();
        if args.http2 && info.alpn.as_deref() != Some("h2") {
            t.tls = Some(info);
            return t.fail(
                Stage::Tls,
                took,
                "NO_ALPN_H2",
                "the server did not select h2 by ALPN",
            );
        }
        let detail = tls_line(&info);
        t.tls = Some(info);
        t.done(Stage::Tls, took, detail);
    }

    // send, first byte, body
    exchange(t, target, args.http2, io, method, extra, deadline).await;
}

/// Sends the request over `io` and reads the head and the first body bytes.
async fn exchange(
    t: &mut Trace,
    target: &Target,
    http2: bool,
    io: UpstreamIo,
    method: http::Method,
    extra: Vec<(http::HeaderName, http::HeaderValue)>,
    deadline: Instant,
) {
    let probe = Arc::new(Mutex::new(IoLog::default()));
    let io = TokioIo::new(Timed {
        inner: io,
        log: probe.clone(),
    });
    let uri = if http2 {
        let scheme = if target.https { "https" } else { "http" };
        format!("{scheme}://{}{}", target.authority, target.path)
    } else {
        target.path.clone()
    };
    let mut req = Request::builder().method(method).uri(uri);
    if !http2 {
        req = req.header(http::header::HOST, &target.authority);
    }
    req = req
        .header(
            http::header::USER_AGENT,
            concat!("tether-trace/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::ACCEPT, "*/*");
    for (n, v) in extra {
        req = req.header(n, v);
    }
    let req = match req.body(Empty::<Bytes>::new()) {
        Ok(r) => r,
        Err(e) => return t.fail(Stage::Send, Duration::ZERO, "EINVAL", e.to_string()),
    };
    let line = format!("{} {} {}", req.method(), target.path, t.http_version);

    let s = Instant::now();
    arm(&probe, s);
    // The connection task is dropped with this function, closing the socket.
    let (head, _conn) = if http2 {
        match hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await {
            Ok((mut sender, conn)) => {
                let task = tokio::spawn(conn);
                (
                    tokio::time::timeout_at(deadline, sender.send_request(req)).await,
                    Abort(task),
                )
            }
            Err(e) => return t.fail(Stage::Send, s.elapsed(), "EPROTO", e.to_string()),
        }
    } else {
        match hyper::client::conn::http1::handshake(io).await {
            Ok((mut sender, conn)) => {
                let task = tokio::spawn(conn);
                (
                    tokio::time::timeout_at(deadline, sender.send_request(req)).await,
                    Abort(task),
                )
            }
            Err(e) => return t.fail(Stage::Send, s.elapsed(), "EPROTO", e.to_string()),
        }
    };
    let head_at = Instant::now();
    let log = snapshot(&probe);
    let sent_at = log.first_write;
    // The send stage ends with the first write after the request was handed over.
    if let Some(w) = sent_at {
        t.done(
            Stage::Send,
            w.saturating_duration_since(s),
            format!("{line}, {} bytes written", log.written),
        );
    }
    let resp = match head {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let (stage, since) = match sent_at {
                Some(w) => (Stage::FirstByte, w),
                None => (Stage::Send, s),
            };
            let code = match (stage, &log.write_error, &log.read_error) {
                (Stage::Send, Some(w), _) => w.0.clone(),
                (_, _, Some(r)) => r.0.clone(),
                _ if log.eof => "EOF".to_owned(),
                _ if e.is_parse() || e.is_parse_status() => "EPROTO".to_owned(),
                _ => "ECONNRESET".to_owned(),
            };
            let mut message = e.to_string();
            if let Some(src) = std::error::Error::source(&e) {
                let _ = write!(message, ": {src}");
            }
            if code == "EOF" {
                message.push_str(" (socket hang up)");
            }
            return t.fail(
                stage,
                head_at.saturating_duration_since(since),
                code,
                message,
            );
        }
        Err(_) => {
            let (stage, since) = match sent_at {
                Some(w) => (Stage::FirstByte, w),
                None => (Stage::Send, s),
            };
            return t.fail(
                stage,
                head_at.saturating_duration_since(since),
                "ETIMEDOUT",
                "no response head before --max-time",
            );
        }
    };
    let status = resp.status();
    t.status = Some(status.as_u16());
    t.reason = status.canonical_reason().map(str::to_owned);
    for name in [
        "content-type",
        "content-length",
        "server",
        "x-request-id",
        "proxy-status",
        "traceparent",
    ] {
        if let Some(v) = resp.headers().get(name).and_then(|v| v.to_str().ok()) {
            t.headers.push((name.to_owned(), v.to_owned()));
        }
    }
    t.done(
        Stage::FirstByte,
        head_at.saturating_duration_since(sent_at.unwrap_or(s)),
        format!(
            "{} {} ({:?})",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            resp.version()
        ),
    );

    let s = Instant::now();
    let mut body = resp.into_body();
    let first = loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return t.fail(
                    Stage::Body,
                    s.elapsed(),
                    "ETIMEDOUT",
                    "no body bytes before --max-time",
                );
            }
            Ok(None) => break 0,
            Ok(Some(Err(e))) => {
                let log = snapshot(&probe);
                let code = log
                    .read_error
                    .map(|r| r.0)
                    .unwrap_or_else(|| if log.eof { "EOF" } else { "EPROTO" }.to_owned());
                return t.fail(Stage::Body, s.elapsed(), code, e.to_string());
            }
            Ok(Some(Ok(f))) => match f.into_data() {
                Ok(d) if !d.is_empty() => break d.len(),
                // Trailers or an empty frame: keep reading.
                _ => continue,
            },
        }
    };
    t.body_bytes = Some(first);
    let detail = if first == 0 {
        "empty body".to_owned()
    } else {
        format!("first {first} bytes (the rest is not read)")
    };
    t.done(Stage::Body, s.elapsed(), detail);
}

/// Aborts the connection task when the trace is done with it.
struct Abort<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Abort<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the transport saw, to tell a send failure from a read failure and to time the send.
#[derive(Debug, Default, Clone)]
struct IoLog {
    armed: Option<Instant>,
    first_write: Option<Instant>,
    written: u64,
    write_error: Option<(String, String)>,
    read_error: Option<(String, String)>,
    eof: bool,
}

fn arm(log: &Mutex<IoLog>, at: Instant) {
    if let Ok(mut l) = log.lock() {
        l.armed = Some(at);
    }
}

fn snapshot(log: &Mutex<IoLog>) -> IoLog {
    match log.lock() {
        Ok(l) => l.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// A transport that records writes, read errors and EOF in an [`IoLog`].
struct Timed {
    inner: UpstreamIo,
    log: Arc<Mutex<IoLog>>,
}

impl Timed {
    fn note(&self, f: impl FnOnce(&mut IoLog)) {
        if let Ok(mut l) = self.log.lock() {
            f(&mut l);
        }
    }
}

impl AsyncRead for Timed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() == before => this.note(|l| l.eof = true),
            Poll::Ready(Err(e)) => {
                let rec = (errno_name(e), e.to_string());
                this.note(|l| {
                    l.read_error.get_or_insert(rec);
                });
            }
            _ => {}
        }
        r
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.record_write(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.record_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Timed {
    fn record_write(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) => {
                let n = *n as u64;
                self.note(|l| {
                    l.written += n;
                    if l.armed.is_some() && l.first_write.is_none() {
                        l.first_write = Some(Instant::now());
                    }
                });
            }
            Poll::Ready(Err(e)) => {
                let rec = (errno_name(e), e.to_string());
                self.note(|l| {
                    l.write_error.get_or_insert(rec);
                });
            }
            Poll::Pending => {}
        }
    }
}

fn family(a: &SocketAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The conventional name of an OS error: `ECONNREFUSED`, `ETIMEDOUT`, ...
fn errno_name(e: &io::Error) -> String {
    use io::ErrorKind as K;
    let by_kind = match e.kind() {
        K::ConnectionRefused => Some("ECONNREFUSED"),
        K::ConnectionReset => Some("ECONNRESET"),
        K::ConnectionAborted => Some("ECONNABORTED"),
        K::BrokenPipe => Some("EPIPE"),
        K::TimedOut => Some("ETIMEDOUT"),
        K::HostUnreachable => Some("EHOSTUNREACH"),
        K::NetworkUnreachable => Some("ENETUNREACH"),
        K::NetworkDown => Some("ENETDOWN"),
        K::AddrNotAvailable => Some("EADDRNOTAVAIL"),
        K::AddrInUse => Some("EADDRINUSE"),
        K::PermissionDenied => Some("EACCES"),
        K::UnexpectedEof => Some("EOF"),
        _ => None,
    };
    if let Some(n) = by_kind {
        return n.to_owned();
    }
    match e.raw_os_error() {
        Some(n) => format!("errno {n}"),
        None => "EIO".to_owned(),
    }
}

/// Names a TLS failure: a certificate problem, an alert from the server, or the transport.
fn tls_failure(e: &tether_gateway::error::ProxyError) -> (String, String) {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e
        .source
        .as_deref()
        .map(|s| s as &(dyn std::error::Error + 'static));
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return (rustls_code(r).to_owned(), r.to_string());
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if let Some(inner) = io.get_ref()
                && let Some(r) = inner.downcast_ref::<rustls::Error>()
            {
                return (rustls_code(r).to_owned(), r.to_string());
            }
            if io.get_ref().is_none() {
                return (errno_name(io), io.to_string());
            }
        }
        cur = err.source();
    }
    ("TLS_HANDSHAKE".to_owned(), e.to_string())
}

fn rustls_code(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "CERT_UNKNOWN_ISSUER",
            C::Expired | C::ExpiredContext { .. } => "CERT_EXPIRED",
            C::NotValidYet | C::NotValidYetContext { .. } => "CERT_NOT_YET_VALID",
            C::NotValidForName | C::NotValidForNameContext { .. } => "CERT_NAME_MISMATCH",
            C::Revoked => "CERT_REVOKED",
            C::BadSignature => "CERT_BAD_SIGNATURE",
            _ => "CERT_INVALID",
        },
        rustls::Error::AlertReceived(_) => "TLS_ALERT",
        rustls::Error::NoApplicationProtocol => "TLS_NO_ALPN",
        rustls::Error::PeerIncompatible(_) => "TLS_INCOMPATIBLE",
        rustls::Error::InvalidMessage(_) => "TLS_BAD_MESSAGE",
        _ => "TLS_HANDSHAKE",
    }
}

fn tls_info(conn: &rustls::ClientConnection) -> TlsInfo {
    let mut info = TlsInfo {
        version: conn
            .protocol_version()
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .replace('_', "."),
        cipher: conn
            .negotiated_cipher_suite()
            .and_then(|c| c.suite().as_str())
            .unwrap_or("?")
            .to_owned(),
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        ..Default::default()
    };
    let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
        return info;
    };
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) {
        info.subject = Some(cert.subject().to_string());
        info.issuer = Some(cert.issuer().to_string());
        info.not_after = Some(cert.validity().not_after.timestamp());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        info.names.push((*d).to_owned())
                    }
                    x509_parser::extensions::GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            info.names.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    info
}

fn tls_line(i: &TlsInfo) -> String {
    let mut s = format!(
        "{} {}, ALPN {}",
        i.version,
        i.cipher,
        i.alpn.as_deref().unwrap_or("none")
    );
    if let Some(sub) = &i.subject {
        let _ = write!(s, "; cert {sub}");
    }
    if !i.names.is_empty() {
        let _ = write!(s, " [{}]", i.names.join(", "));
    }
    if let Some(exp) = i.not_after {
        let _ = write!(s, ", expires {} ({})", date(exp), days_left(exp));
    }
    if let Some(iss) = &i.issuer {
        let _ = write!(s, ", issuer {iss}");
    }
    s
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn days_left(exp: i64) -> String {
    let d = (exp - now_unix()) / 86_400;
    if d < 0 {
        format!("expired {} days ago", -d)
    } else {
        format!("in {d} days")
    }
}

/// `YYYY-MM-DD` of a Unix time (civil-from-days, proleptic Gregorian).
fn date(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Where to look next, for a failure `code` at `stage`.
fn hint(stage: Stage, code: &str) -> &'static str {
    match (stage, code) {
        (Stage::Dns, "ENOTFOUND") => {
            "the name does not exist: check its spelling, the search domains, or the nameserver (--dns-server)"
        }
        (Stage::Dns, "EAI_AGAIN") => {
            "the resolver did not answer in time: check /etc/resolv.conf or --dns-server, and that port 53 is reachable"
        }
        (Stage::Dns, _) => "the resolver failed: try another one with --dns-server",
        (Stage::Connect, "ECONNREFUSED") => {
            "nothing listens there: is the service running, on this port, bound to this address (not only 127.0.0.1)?"
        }
        (Stage::Connect, "ETIMEDOUT") => {
            "no answer to the SYN: a firewall or security group drops it, the host is down, or the listener stopped accepting and its queue is full"
        }
        (Stage::Connect, "EHOSTUNREACH" | "ENETUNREACH" | "ENETDOWN") => {
            "no route to the host: check the address, the routing table, and firewall REJECT rules"
        }
        (Stage::Connect, _) => "the connect failed: check the address and the local network",
        (Stage::Tls, "CERT_UNKNOWN_ISSUER") => {
            "the certificate is not signed by a trusted CA: pass that CA with --cacert (or -k to look past it)"
        }
        (Stage::Tls, "CERT_EXPIRED") => "the certificate has expired: renew it on the server",
        (Stage::Tls, "CERT_NOT_YET_VALID") => {
            "the certificate is not valid yet: check the clocks of the server and this host"
        }
        (Stage::Tls, "CERT_NAME_MISMATCH") => {
            "the certificate does not cover this name: check its names, or connect with a name it lists"
        }
        (Stage::Tls, "CERT_INVALID" | "CERT_BAD_SIGNATURE" | "CERT_REVOKED") => {
            "the certificate was rejected for the reason shown: check how it was issued (a self-signed CA certificate cannot serve as a leaf), or use -k to look past it"
        }
        (Stage::Tls, "NO_ALPN_H2" | "TLS_NO_ALPN") => {
            "the server does not offer HTTP/2 here: drop --http2, or enable h2 on the server"
        }
        (Stage::Tls, "ECONNRESET" | "EOF" | "EPIPE") => {
            "the server closed the connection during the handshake: is this a TLS port? does it require SNI or a client certificate?"
        }
        (Stage::Tls, _) => {
            "the handshake failed: check that the port speaks TLS and that versions and ciphers overlap"
        }
        (Stage::Send, _) => {
            "the server closed the connection before taking the request: check its logs and connection limits"
        }
        (Stage::FirstByte, "ETIMEDOUT") => {
            "no response head in time: the handler is slow or stuck; check the server (raise --max-time to wait longer)"
        }
        (Stage::FirstByte, "EPROTO") => {
            "the answer is not HTTP as expected: check the scheme (https?), the port, and --http2"
        }
        (Stage::FirstByte, _) => {
            "the server dropped the connection after the request (\"socket hang up\"): its handler crashed, or a keep-alive or proxy timeout fired; check its logs"
        }
        (Stage::Body, _) => {
            "the response broke after its head: the server died or reset mid-response; check its logs"
        }
    }
}

/// `850us`, `2.5ms`, `1002ms`, `12.3s`.
fn human(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1000 {
        format!("{us}us")
    } else if us < 10_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else if us < 10_000_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn to_text(t: &Trace) -> String {
    let mut s = format!("{} {} ({})\n", t.method, t.url, t.http_version);
    for line in &t.stages {
        let _ = writeln!(
            s,
            "  {:<10} {:>8}  {}",
            line.stage.as_str(),
            human(line.took),
            line.detail
        );
        if line.stage == Stage::Dns {
            for c in &t.candidates {
                let _ = writeln!(s, "  {:<10} {:>8}    {c}  {}", "", "", family(c));
            }
        }
    }
    if let Some(f) = &t.failure {
        let _ = writeln!(
            s,
            "  {:<10} {:>8}  FAILED {}: {}",
            f.stage.as_str(),
            human(f.took),
            f.code,
            f.message
        );
        let _ = writeln!(s, "  hint: {}", f.hint);
    }
    for (n, v) in &t.headers {
        let _ = writeln!(s, "  < {n}: {v}");
    }
    let endpoints = match (t.local, t.remote) {
        (Some(l), Some(r)) => format!(", {l} -> {r}"),
        _ => String::new(),
    };
    let outcome = match (&t.failure, t.status) {
        (Some(f), _) => format!(
            "failed at {} (exit {})",
            f.stage.as_str(),
            exit_code(f.stage)
        ),
        (None, Some(st)) => format!("status {st}"),
        (None, None) => "done".to_owned(),
    };
    let _ = writeln!(
        s,
        "  {:<10} {:>8}  {outcome}{endpoints}",
        "total",
        human(t.total)
    );
    s
}

fn to_json(t: &Trace) -> Value {
    let stages: Vec<Value> = t
        .stages
        .iter()
        .map(|l| {
            json!({
                "stage": l.stage.as_str(),
                "duration_us": micros(l.took),
                "ok": true,
                "detail": l.detail,
            })
        })
        .chain(t.failure.iter().map(|f| {
            json!({
                "stage": f.stage.as_str(),
                "duration_us": micros(f.took),
                "ok": false,
                "detail": f.message,
            })
        }))
        .collect();
    let tls = t.tls.as_ref().map(|i| {
        json!({
            "version": i.version,
            "cipher": i.cipher,
            "alpn": i.alpn,
            "subject": i.subject,
            "issuer": i.issuer,
            "names": i.names,
            "not_after_unix": i.not_after,
            "not_after": i.not_after.map(date),
        })
    });
    json!({
        "url": t.url,
        "method": t.method,
        "http_version": t.http_version,
        "ok": t.failure.is_none(),
        "exit_code": t.failure.as_ref().map_or(0, |f| exit_code(f.stage)),
        "resolved_by": t.resolved_by,
        "candidates": t.candidates.iter().map(|c| json!({
            "address": c.to_string(),
            "family": if c.is_ipv4() { "ipv4" } else { "ipv6" },
        })).collect::<Vec<_>>(),
        "local": t.local.map(|a| a.to_string()),
        "remote": t.remote.map(|a| a.to_string()),
        "stages": stages,
        "tls": tls,
        "status": t.status,
        "reason": t.reason,
        "headers": t.headers.iter().map(|(n, v)| (n.clone(), Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
        "body_first_bytes": t.body_bytes,
        "error": t.failure.as_ref().map(|f| json!({
            "stage": f.stage.as_str(),
            "code": f.code,
            "message": f.message,
            "hint": f.hint,
        })),
        "total_us": micros(t.total),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("https://example.com/a?b=1").unwrap();
        assert!(t.https);
        assert_eq!((t.host.as_str(), t.port), ("example.com", 443));
        assert_eq!(t.path, "/a?b=1");
        let t = parse_url("http://[::1]:8080").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 8080, "/")
        );
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("example.com").is_err());
    }

    #[test]
    fn resolve_entries() {
        let e = |s: &str| vec![s.to_owned()];
        assert_eq!(
            resolve_override(&e("app.test:80:127.0.0.1,::1"), "app.test", 80).unwrap(),
            Some(vec![
                "127.0.0.1:80".parse().unwrap(),
                "[::1]:80".parse().unwrap()
            ])
        );
        assert_eq!(
            resolve_override(&e("app.test:81:127.0.0.1"), "app.test", 80).unwrap(),
            None
        );
        assert_eq!(
            resolve_override(&e("APP.test:[::1]"), "app.test", 443).unwrap(),
            Some(vec!["[::1]:443".parse().unwrap()])
        );
        assert!(resolve_override(&e("app.test:80:nope"), "app.test", 80).is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(1_767_225_600), "2026-01-01");
    }

    #[test]
    fn errno_names() {
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(errno_name(&e), "ECONNREFUSED");
        assert_eq!(exit_code(Stage::Connect), 11);
    }
}
