//! The access log: one [`RequestRecord`] per request, handed to an [`AccessLog`] sink.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use tether::CancelReason;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A response was sent in full.
    Ok,
    /// The client left before the response was complete (logged with status 499).
    ClientAbort,
    /// A deadline or timeout ended the request.
    Timeout,
    /// The upstream failed.
    UpstreamError,
    /// tether refused the request (no route, bad request, overload).
    Rejected,
}

impl Outcome {
    /// Stable label: `ok`, `client_abort`, `timeout`, `upstream_error`, `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientAbort => "client_abort",
            Outcome::Timeout => "timeout",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Rejected => "rejected",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything logged about one request.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// Wall-clock time the request head arrived.
    pub time: SystemTime,
    /// Request id (sent upstream and returned to the client as `x-request-id`).
    pub request_id: String,
    /// Client address.
    pub client: SocketAddr,
    /// Local address the request arrived on.
    pub local: SocketAddr,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// Request method.
    pub method: String,
    /// Host or :authority.
    pub authority: String,
    /// Path (without query).
    pub path: String,
    /// Status sent, or 499 when the client left first.
    pub status: u16,
    /// Response body bytes sent downstream.
    pub bytes_sent: u64,
    /// Request body bytes received from the client.
    pub bytes_received: u64,
    /// From the request head's arrival to the end of the request.
    pub duration: Duration,
    /// Route name, if one matched.
    pub route: Option<String>,
    /// Upstream name, if routed.
    pub upstream: Option<String>,
    /// Upstream endpoint actually used.
    pub upstream_addr: Option<SocketAddr>,
    /// tether's end of the upstream connection (its local address and port).
    pub upstream_local: Option<SocketAddr>,
    /// Upstream protocol label.
    pub upstream_protocol: Option<&'static str>,
    /// How the request ended.
    pub outcome: Outcome,
    /// Why it was cancelled, when it was.
    pub abort_reason: Option<CancelReason>,
    /// The stage the request was in when it failed or was aborted.
    pub stage: Option<&'static str>,
    /// Time to connect to the upstream (zero on a reused connection).
    pub upstream_connect: Option<Duration>,
    /// From sending the request upstream to its response head.
    pub upstream_first_byte: Option<Duration>,
    /// Time the upstream spent on this request (first attempt start to end or abort).
    pub upstream_time: Option<Duration>,
    /// From tether learning of the cancellation to the upstream teardown being written.
    pub propagation: Option<Duration>,
    /// Whether the upstream connection was reused from the pool.
    pub upstream_reused: Option<bool>,
    /// Extra attempts made (retries).
    pub retries: u32,
    /// Time spent in each stage of the upstream exchange (the last attempt).
    pub timings: StageTimings,
    /// W3C trace id of the request (from its `traceparent`, or started by tether).
    pub trace_id: Option<String>,
    /// tether's own span id, sent upstream as the `traceparent` parent id (route setting
    /// `trace_context = "span"`).
    pub span_id: Option<String>,
}

/// Time spent in each stage of the upstream exchange. A stage not reached, or skipped (DNS,
/// connect and TLS on a reused connection), is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimings {
    /// Resolving the upstream name.
    pub dns: Option<Duration>,
    /// The TCP connect (the Happy Eyeballs race).
    pub connect: Option<Duration>,
    /// The TLS handshake.
    pub tls: Option<Duration>,
    /// From handing the request to the connection until its body was fully handed over (zero
    /// for a request without a body: its head is written at once).
    pub send: Option<Duration>,
    /// From the end of sending to the response head.
    pub first_byte: Option<Duration>,
    /// From the response head to the end of the response body (or the abort).
    pub body: Option<Duration>,
}

impl RequestRecord {
    /// The record as a JSON object. Durations are in microseconds (`*_us`).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        let unix_ms = self
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        m.insert("time_unix_ms".into(), unix_ms.into());
        m.insert("request_id".into(), self.request_id.clone().into());
        m.insert("client".into(), self.client.to_string().into());
        m.insert("local".into(), self.local.to_string().into());
        m.insert("protocol".into(), self.protocol.into());
        m.insert("method".into(), self.method.clone().into());
        m.insert("authority".into(), self.authority.clone().into());
        m.insert("path".into(), self.path.clone().into());
        m.insert("status".into(), self.status.into());
        m.insert("bytes_sent".into(), self.bytes_sent.into());
        m.insert("bytes_received".into(), self.bytes_received.into());
        m.insert("duration_us".into(), micros(self.duration).into());
        m.insert("route".into(), opt_str(&self.route));
        m.insert("upstream".into(), opt_str(&self.upstream));
        m.insert(
            "upstream_addr".into(),
            self.upstream_addr
                .map(|a| Value::from(a.to_string()))
                .unwrap_or(Value::Null),
        );
        m.insert(
            "upstream_local".into(),
            self.upstream_local
                .map(|a| Value::from(a.to_string()))
                .unwrap_or(Value::Null),
        );
        m.insert(
            "upstream_protocol".into(),
            self.upstream_protocol
                .map(Value::from)
                .unwrap_or(Value::Null),
        );
        m.insert("outcome".into(), self.outcome.as_str().into());
        m.insert(
            "abort_reason".into(),
            self.abort_reason
                .map(|r| Value::from(r.as_str()))
                .unwrap_or(Value::Null),
        );
        m.insert(
            "stage".into(),
            self.stage.map(Value::from).unwrap_or(Value::Null),
        );
        for (k, v) in [
            ("upstream_connect_us", self.upstream_connect),
            ("upstream_first_byte_us", self.upstream_first_byte),
            ("upstream_time_us", self.upstream_time),
            ("propagation_us", self.propagation),
            ("dns_us", self.timings.dns),
            ("connect_us", self.timings.connect),
            ("tls_us", self.timings.tls),
            ("send_us", self.timings.send),
            ("first_byte_us", self.timings.first_byte),
            ("body_us", self.timings.body),
        ] {
            m.insert(
                k.into(),
                v.map(|d| Value::from(micros(d))).unwrap_or(Value::Null),
            );
        }
        m.insert(
            "upstream_reused".into(),
            self.upstream_reused.map(Value::from).unwrap_or(Value::Null),
        );
        m.insert("retries".into(), self.retries.into());
        m.insert("trace_id".into(), opt_str(&self.trace_id));
        m.insert("span_id".into(), opt_str(&self.span_id));
        Value::Object(m)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn opt_str(s: &Option<String>) -> Value {
    s.as_ref()
        .map(|s| Value::from(s.as_str()))
        .unwrap_or(Value::Null)
}

/// Where request records go. Called once per request, on a worker thread: keep it cheap.
pub trait AccessLog: Send + Sync + fmt::Debug + 'static {
    /// Takes one finished request.
    fn record(&self, rec: &RequestRecord);
}

/// Writes one JSON object per line to standard output.
#[derive(Debug, Default)]
pub struct JsonLinesStdout;

impl AccessLog for JsonLinesStdout {
    fn record(&self, rec: &RequestRecord) {
        let mut line = rec.to_json().to_string();
        line.push('\n');
        // A closed stdout must not take the proxy down: drop the line.
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

/// Where access-log lines go: standard output or a file opened for appending. Each line is one
/// `write` call, so lines from several workers never interleave.
#[derive(Debug)]
pub enum LineSink {
    /// Standard output.
    Stdout,
    /// A file, opened with `O_APPEND` (log rotation by rename + reopen is not supported: use
    /// copytruncate, or let the service manager collect stdout).
    File(Mutex<std::fs::File>),
}

impl LineSink {
    /// Appends to `path`, creating it if needed.
    pub fn append(path: &std::path::Path) -> std::io::Result<LineSink> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(LineSink::File(Mutex::new(f)))
    }

    /// Writes `line` and a newline. A failing write (closed stdout, full disk) drops the line:
    /// the access log must not take the proxy down.
    pub fn write_line(&self, line: &str) {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let _ = match self {
            LineSink::Stdout => std::io::stdout().lock().write_all(&buf),
            LineSink::File(f) => match f.lock() {
                Ok(mut f) => f.write_all(&buf),
                Err(p) => p.into_inner().write_all(&buf),
            },
        };
    }
}

/// Writes one JSON object per line to a [`LineSink`].
#[derive(Debug)]
pub struct JsonLines {
    out: LineSink,
}

impl JsonLines {
    /// JSON lines to `out`.
    pub fn new(out: LineSink) -> JsonLines {
        JsonLines { out }
    }
}

impl AccessLog for JsonLines {
    fn record(&self, rec: &RequestRecord) {
        self.out.write_line(&rec.to_json().to_string());
    }
}

/// Discards records.
#[derive(Debug, Default)]
pub struct NoAccessLog;

impl AccessLog for NoAccessLog {
    fn record(&self, _rec: &RequestRecord) {}
}

/// Keeps records in memory; for tests and embedding.
#[derive(Debug, Default, Clone)]
pub struct MemoryAccessLog {
    records: Arc<Mutex<Vec<RequestRecord>>>,
}

impl MemoryAccessLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the records so far.
    pub fn records(&self) -> Vec<RequestRecord> {
        match self.records.lock() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl AccessLog for MemoryAccessLog {
    fn record(&self, rec: &RequestRecord) {
        match self.records.lock() {
            Ok(mut r) => r.push(rec.clone()),
            Err(p) => p.into_inner().push(rec.clone()),
        }
    }
}
