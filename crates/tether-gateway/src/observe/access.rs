//! The access log: one [`RequestRecord`] per request, handed to an [`AccessLog`] sink.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::lock;
use serde_json::Value;
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
    /// How many outcomes there are (`as usize` of each is below this).
    pub const COUNT: usize = 5;

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
    pub request_id: Arc<str>,
    /// Client address.
    pub client: SocketAddr,
    /// Local address the request arrived on.
    pub local: SocketAddr,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// Request method (`None` when no request head was complete, e.g. a slow head logged as 408).
    pub method: Option<http::Method>,
    /// Host or :authority.
    pub authority: RequestText,
    /// Path (without query).
    pub path: RequestText,
    /// Status sent, or 499 when the client left first.
    pub status: u16,
    /// Response body bytes sent downstream.
    pub bytes_sent: u64,
    /// Request body bytes received from the client.
    pub bytes_received: u64,
    /// From the request head's arrival to the end of the request.
    pub duration: Duration,
    /// Route name, if one matched.
    pub route: Option<Arc<str>>,
    /// Upstream name, if routed.
    pub upstream: Option<Arc<str>>,
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
    /// The client connection's TLS session (version, cipher, SNI, client certificate); `None`
    /// for cleartext.
    pub tls: Option<std::sync::Arc<crate::downstream::tls::TlsSession>>,
    /// The `grpc-status` of tether's own answer to a gRPC request (`status` is then the HTTP
    /// status other clients get for the same failure).
    pub grpc_status: Option<u8>,
    /// Time spent waiting for room at an upstream whose endpoints were all full; `None` when
    /// the request did not wait.
    pub queued: Option<Duration>,
    /// Time the route's auth service took to check the request; `None` without one.
    pub auth: Option<Duration>,
    /// Headers the route's auth service passed on for the client's response (its
    /// `client_headers`, a refreshed session cookie): held here until the response head. Not
    /// logged.
    pub auth_to_client: Option<Box<Vec<(http::HeaderName, http::HeaderValue)>>>,
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

/// Text taken from a request (its host or path) and kept without a copy: it shares the
/// request's buffer.
#[derive(Clone, Default)]
pub struct RequestText(TextRepr);

#[derive(Clone, Default)]
enum TextRepr {
    #[default]
    Empty,
    /// A header value already checked to be visible ASCII.
    Header(http::HeaderValue),
    Authority(http::uri::Authority),
    /// The path part of it.
    Path(http::uri::PathAndQuery),
    Owned(Box<str>),
}

impl RequestText {
    /// A header value's text; `None` if it is not visible ASCII.
    pub fn header(v: &http::HeaderValue) -> Option<RequestText> {
        v.to_str().ok()?;
        Some(RequestText(TextRepr::Header(v.clone())))
    }

    /// A URI's authority.
    pub fn authority(a: &http::uri::Authority) -> RequestText {
        RequestText(TextRepr::Authority(a.clone()))
    }

    /// A URI's path, without its query.
    pub fn path(uri: &http::Uri) -> RequestText {
        match uri.path_and_query() {
            Some(p) => RequestText(TextRepr::Path(p.clone())),
            None => RequestText::from(uri.path()),
        }
    }

    /// The text; for a path, with its query.
    pub fn target(&self) -> &str {
        match &self.0 {
            TextRepr::Path(p) => p.as_str(),
            _ => self.as_str(),
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            TextRepr::Empty => "",
            // Checked to be visible ASCII when made; this only re-reads it as UTF-8 (fast).
            TextRepr::Header(v) => std::str::from_utf8(v.as_bytes()).unwrap_or(""),
            TextRepr::Authority(a) => a.as_str(),
            TextRepr::Path(p) => p.path(),
            TextRepr::Owned(s) => s,
        }
    }

    /// The text's bytes, without re-reading a header value as UTF-8.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            TextRepr::Header(v) => v.as_bytes(),
            _ => self.as_str().as_bytes(),
        }
    }

    /// Whether the text is empty.
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }
}

impl From<&str> for RequestText {
    fn from(s: &str) -> RequestText {
        RequestText(TextRepr::Owned(s.into()))
    }
}

impl fmt::Debug for RequestText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for RequestText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for RequestText {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
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
    /// The record of a request that got no further than its arrival: no method or path yet, no
    /// status, no route, nothing upstream. The caller fills in what it knows.
    pub fn new(
        time: SystemTime,
        request_id: Arc<str>,
        client: SocketAddr,
        local: SocketAddr,
        protocol: &'static str,
    ) -> RequestRecord {
        RequestRecord {
            time,
            request_id,
            client,
            local,
            protocol,
            method: None,
            authority: RequestText::default(),
            path: RequestText::default(),
            status: 0,
            bytes_sent: 0,
            bytes_received: 0,
            duration: Default::default(),
            route: None,
            upstream: None,
            upstream_addr: None,
            upstream_local: None,
            upstream_protocol: None,
            outcome: Outcome::Ok,
            abort_reason: None,
            stage: None,
            upstream_connect: None,
            queued: None,
            auth: None,
            auth_to_client: None,
            grpc_status: None,
            tls: None,
            upstream_first_byte: None,
            upstream_time: None,
            propagation: None,
            upstream_reused: None,
            retries: 0,
            timings: Default::default(),
            trace_id: None,
            span_id: None,
        }
    }

    /// The record as a JSON object. Durations are in microseconds (`*_us`).
    pub fn to_json(&self) -> Value {
        let mut line = Vec::new();
        self.write_json_bytes(&mut line);
        serde_json::from_slice(&line).unwrap_or(Value::Null)
    }

    /// Appends the record as one JSON object (no newline) to `out`.
    pub fn write_json(&self, out: &mut String) {
        let mut bytes = Vec::new();
        self.write_json_bytes(&mut bytes);
        // Only ever UTF-8: every value is escaped text or ASCII.
        out.push_str(&String::from_utf8_lossy(&bytes));
    }

    /// Appends the record as one JSON object (no newline, UTF-8) to `out`. Written field by field
    /// into the caller's buffer: this runs once per request, so it builds no intermediate map, and
    /// it writes bytes, so nothing is re-checked as UTF-8.
    pub fn write_json_bytes(&self, out: &mut Vec<u8>) {
        let unix_ms = self
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // Each key comes with its separator and quotes as one literal: one copy per field.
        macro_rules! k {
            ($name:literal) => {
                concat!(",\"", $name, "\":").as_bytes()
            };
        }
        out.reserve(1024);
        let mut o = JsonObject { out };
        o.num(b"{\"time_unix_ms\":", Some(unix_ms));
        o.str(k!("request_id"), Some(self.request_id.as_bytes()));
        o.addr(k!("client"), Some(&self.client));
        o.addr(k!("local"), Some(&self.local));
        o.label(k!("protocol"), Some(self.protocol));
        // A method is a token (RFC 9110 §9.1): nothing in it needs escaping.
        o.label(k!("method"), self.method.as_ref().map(http::Method::as_str));
        o.str(k!("authority"), Some(self.authority.as_bytes()));
        o.str(k!("path"), Some(self.path.as_bytes()));
        o.num(k!("status"), Some(u64::from(self.status)));
        if let Some(code) = self.grpc_status {
            o.num(k!("grpc_status"), Some(u64::from(code)));
        }
        o.num(k!("bytes_sent"), Some(self.bytes_sent));
        o.num(k!("bytes_received"), Some(self.bytes_received));
        o.num(k!("duration_us"), Some(micros(self.duration)));
        o.str(k!("route"), self.route.as_deref().map(str::as_bytes));
        o.str(k!("upstream"), self.upstream.as_deref().map(str::as_bytes));
        o.addr(k!("upstream_addr"), self.upstream_addr.as_ref());
        o.addr(k!("upstream_local"), self.upstream_local.as_ref());
        o.label(k!("upstream_protocol"), self.upstream_protocol);
        o.label(k!("outcome"), Some(self.outcome.as_str()));
        o.label(k!("abort_reason"), self.abort_reason.map(|r| r.as_str()));
        o.label(k!("stage"), self.stage);
        o.num(k!("upstream_connect_us"), self.upstream_connect.map(micros));
        // Only requests that waited have it: most never do.
        if let Some(q) = self.queued {
            o.num(k!("queue_us"), Some(micros(q)));
        }
        if let Some(a) = self.auth {
            o.num(k!("auth_us"), Some(micros(a)));
        }
        o.num(
            k!("upstream_first_byte_us"),
            self.upstream_first_byte.map(micros),
        );
        o.num(k!("upstream_time_us"), self.upstream_time.map(micros));
        o.num(k!("propagation_us"), self.propagation.map(micros));
        o.num(k!("dns_us"), self.timings.dns.map(micros));
        o.num(k!("connect_us"), self.timings.connect.map(micros));
        o.num(k!("tls_us"), self.timings.tls.map(micros));
        o.num(k!("send_us"), self.timings.send.map(micros));
        o.num(k!("first_byte_us"), self.timings.first_byte.map(micros));
        o.num(k!("body_us"), self.timings.body.map(micros));
        o.bool(k!("upstream_reused"), self.upstream_reused);
        o.num(k!("retries"), Some(u64::from(self.retries)));
        o.str(k!("trace_id"), self.trace_id.as_deref().map(str::as_bytes));
        o.str(k!("span_id"), self.span_id.as_deref().map(str::as_bytes));
        if let Some(tls) = &self.tls {
            o.label(k!("tls_version"), Some(tls.version));
            o.label(k!("tls_cipher"), Some(tls.cipher));
            o.str(k!("sni"), tls.server_name.as_deref().map(str::as_bytes));
            if let Some(cert) = &tls.client_cert {
                o.str(k!("client_cert"), Some(cert.as_bytes()));
            }
        }
        o.end();
    }
}

/// A JSON object written straight into a byte buffer. Each `key` is the whole text before the
/// value: the separator, the quoted name and the colon.
///
/// Its methods are inlined so that each key, a literal, is copied with its length known: a few
/// stores instead of a `memcpy` call per field.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
}

impl JsonObject<'_> {
    /// A string value from a request or the configuration: escaped as needed.
    #[inline(always)]
    fn str(&mut self, key: &[u8], v: Option<&[u8]>) {
        self.out.extend_from_slice(key);
        match v {
            Some(v) => escape_into(self.out, v),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    /// One of tether's own labels, which never need escaping.
    #[inline(always)]
    fn label(&mut self, key: &[u8], v: Option<&str>) {
        self.out.extend_from_slice(key);
        match v {
            Some(v) => {
                debug_assert!(!needs_escape(v.as_bytes()));
                self.out.push(b'"');
                self.out.extend_from_slice(v.as_bytes());
                self.out.push(b'"');
            }
            None => self.out.extend_from_slice(b"null"),
        }
    }

    #[inline(always)]
    fn addr(&mut self, key: &[u8], v: Option<&SocketAddr>) {
        self.out.extend_from_slice(key);
        match v {
            Some(v) => {
                self.out.push(b'"');
                write_addr(self.out, v);
                self.out.push(b'"');
            }
            None => self.out.extend_from_slice(b"null"),
        }
    }

    #[inline(always)]
    fn num(&mut self, key: &[u8], v: Option<u64>) {
        self.out.extend_from_slice(key);
        match v {
            Some(v) => self
                .out
                .extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    #[inline(always)]
    fn bool(&mut self, key: &[u8], v: Option<bool>) {
        self.out.extend_from_slice(key);
        self.out.extend_from_slice(match v {
            Some(true) => b"true",
            Some(false) => b"false",
            None => b"null",
        });
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// Whether any byte of `s` must be escaped in a JSON string: a control character, `"` or `\`.
/// Eight bytes at a time: most values (ids, paths, hosts) need none, and this runs on each.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte of `w` is zero (or below `n`, for n <= 0x80): the classic bit trick, exact as to
    // whether any byte is.
    fn any_below(w: u64, n: u8) -> bool {
        w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH != 0
    }
    let special = |w: u64| {
        any_below(w, 0x20) || any_below(w ^ (ONES * 0x22), 1) || any_below(w ^ (ONES * 0x5c), 1)
    };
    let word = |c: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        u64::from_ne_bytes(w)
    };
    if s.len() < 8 {
        return s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
    }
    let mut chunks = s.chunks_exact(8);
    if chunks.any(|c| special(word(c))) {
        return true;
    }
    // The last eight bytes, overlapping the last whole word: no byte-by-byte tail.
    !chunks.remainder().is_empty() && special(word(&s[s.len() - 8..]))
}

/// Writes `s` (UTF-8) as a JSON string literal (RFC 8259 §7).
fn escape_into(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    if !needs_escape(s) {
        out.extend_from_slice(s);
        out.push(b'"');
        return;
    }
    // Multi-byte UTF-8 sequences never contain a byte below 0x80: copied as they are.
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b if b < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            b => out.push(b),
        }
    }
    out.push(b'"');
}

/// Each octet's digits followed by a dot, and how many bytes of that are used.
const OCTETS: [([u8; 4], usize); 256] = {
    let mut table = [([0u8; 4], 0usize); 256];
    let mut i = 0;
    while i < 256 {
        let v = i as u8;
        let mut text = [0u8; 4];
        let mut n = 0;
        if v >= 100 {
            text[n] = b'0' + v / 100;
            n += 1;
        }
        if v >= 10 {
            text[n] = b'0' + v / 10 % 10;
            n += 1;
        }
        text[n] = b'0' + v % 10;
        text[n + 1] = b'.';
        table[i] = (text, n + 2);
        i += 1;
    }
    table
};

/// Writes `ip` as `Display` does (`a.b.c.d`) at the start of `buf`, from a table rather than a
/// formatter pass, and returns its length, followed by one spare byte written as a dot.
pub(crate) fn ipv4_text(ip: std::net::Ipv4Addr, buf: &mut [u8; 24]) -> usize {
    let mut n = 0;
    for octet in ip.octets() {
        let (text, len) = OCTETS[usize::from(octet)];
        buf[n..n + 4].copy_from_slice(&text);
        n += len;
    }
    // Without the last octet's dot.
    n - 1
}

/// `00` to `99`: a port's digits are written two at a time.
const DIGIT_PAIRS: [[u8; 2]; 100] = {
    let mut table = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        table[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    table
};

/// Writes `a` as `ip:port` (IPv6 in brackets), as `Display` does, without a formatter pass for
/// the common IPv4 case.
fn write_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            // "255.255.255.255:65535" is 21 bytes: built on the stack from a table, copied once.
            let mut buf = [0u8; 24];
            let n = ipv4_text(*v4.ip(), &mut buf) + 1;
            // The last dot becomes the colon.
            buf[n - 1] = b':';
            let mut port = v4.port();
            let len = match port {
                0..=9 => 1,
                10..=99 => 2,
                100..=999 => 3,
                1000..=9999 => 4,
                _ => 5,
            };
            // Two digits at a time, from the right.
            let mut end = n + len;
            while port >= 100 {
                buf[end - 2..end].copy_from_slice(&DIGIT_PAIRS[usize::from(port % 100)]);
                port /= 100;
                end -= 2;
            }
            if port >= 10 {
                buf[end - 2..end].copy_from_slice(&DIGIT_PAIRS[usize::from(port)]);
            } else {
                buf[end - 1] = b'0' + port as u8;
            }
            // The whole buffer, then cut: a copy of known size is a few moves, not a call.
            let keep = out.len() + n + len;
            out.extend_from_slice(&buf);
            out.truncate(keep);
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{a}");
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Where request records go. Called once per request, on a worker thread: keep it cheap.
pub trait AccessLog: Send + Sync + fmt::Debug + 'static {
    /// Takes one finished request.
    fn record(&self, rec: &RequestRecord);

    /// Writes out anything gathered. Called when a worker runs out of work and at shutdown.
    fn flush(&self) {}

    /// Opens its file again, after log rotation moved it away (`tether serve` does this on
    /// SIGUSR1 and SIGHUP); lines gathered before go to the old file. True when a file was
    /// reopened; logs without a file have nothing to do.
    fn reopen(&self) -> std::io::Result<bool> {
        Ok(false)
    }
}

/// Where access-log lines go: standard output or a file opened for appending.
///
/// Lines are gathered in memory and written in batches: when `buffer_bytes` have gathered, and
/// whenever a worker runs out of work ([`AccessLog::flush`], called just before a worker thread
/// goes idle), so a quiet proxy writes each line at once and a busy one makes one `write` per
/// batch instead of one per request. Lines are never split or interleaved. `buffer_bytes = 0`
/// writes every line as it comes.
#[derive(Debug)]
pub struct LineSink {
    pending: Mutex<Vec<u8>>,
    out: Mutex<Output>,
    buffer_bytes: usize,
}

#[derive(Debug)]
struct Output {
    target: Target,
    /// The batch being written; swapped with `pending` so both keep their capacity.
    batch: Vec<u8>,
}

#[derive(Debug)]
enum Target {
    Stdout,
    /// Opened with `O_APPEND` at `path`; [`LineSink::reopen`] opens `path` again after rotation.
    File {
        file: std::fs::File,
        path: std::path::PathBuf,
    },
}

fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// The default batch size of a [`LineSink`].
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024;

impl LineSink {
    /// Standard output.
    pub fn stdout() -> LineSink {
        LineSink::new(Target::Stdout)
    }

    /// Appends to `path`, creating it if needed.
    pub fn append(path: &std::path::Path) -> std::io::Result<LineSink> {
        Ok(LineSink::new(Target::File {
            file: open_append(path)?,
            path: path.to_owned(),
        }))
    }

    fn new(target: Target) -> LineSink {
        LineSink {
            pending: Mutex::new(Vec::new()),
            out: Mutex::new(Output {
                target,
                batch: Vec::new(),
            }),
            buffer_bytes: DEFAULT_BUFFER_BYTES,
        }
    }

    /// Sets how many bytes gather before a write (0: every line is written at once).
    pub fn with_buffer_bytes(mut self, buffer_bytes: usize) -> LineSink {
        self.buffer_bytes = buffer_bytes;
        self
    }

    /// Appends a line and a newline.
    pub fn write_line(&self, line: &str) {
        self.append_with(|out| out.extend_from_slice(line.as_bytes()));
    }

    /// Appends the line `write` produces (UTF-8, without a newline), then a newline.
    pub fn append_with(&self, write: impl FnOnce(&mut Vec<u8>)) {
        let full = {
            let mut p = lock(&self.pending);
            write(&mut p);
            p.push(b'\n');
            p.len() >= self.buffer_bytes
        };
        if full {
            self.flush();
        }
    }

    /// Writes every gathered line. A failing write (closed stdout, full disk) drops the lines:
    /// the access log must not take the proxy down.
    pub fn flush(&self) {
        // `out` first: flushes are serialised, and each takes everything gathered before it, so
        // batches reach the target in order.
        let mut out = lock(&self.out);
        self.flush_into(&mut out);
    }

    /// With a file: writes what was gathered to the file open now, then opens the path again
    /// (a rotation renamed the file away: the new lines go to a new file at the path). On
    /// error the old file stays in use. True when there was a file to reopen.
    pub fn reopen(&self) -> std::io::Result<bool> {
        let mut out = lock(&self.out);
        self.flush_into(&mut out);
        match &mut out.target {
            Target::File { file, path } => {
                *file = open_append(path)?;
                Ok(true)
            }
            Target::Stdout => Ok(false),
        }
    }

    fn flush_into(&self, out: &mut Output) {
        {
            let mut p = lock(&self.pending);
            if p.is_empty() {
                return;
            }
            std::mem::swap(&mut *p, &mut out.batch);
        }
        let bytes = &out.batch[..];
        let _ = match &mut out.target {
            Target::Stdout => std::io::stdout().lock().write_all(bytes),
            Target::File { file, .. } => file.write_all(bytes),
        };
        out.batch.clear();
    }
}

impl Drop for LineSink {
    fn drop(&mut self) {
        self.flush();
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
        self.out.append_with(|line| rec.write_json_bytes(line));
    }

    fn flush(&self) {
        self.out.flush();
    }

    fn reopen(&self) -> std::io::Result<bool> {
        self.out.reopen()
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
        lock(&self.records).clone()
    }
}

impl AccessLog for MemoryAccessLog {
    fn record(&self, rec: &RequestRecord) {
        lock(&self.records).push(rec.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RequestRecord {
        RequestRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            request_id: "abc".into(),
            client: "127.0.0.1:5000".parse().unwrap(),
            local: "[::1]:8080".parse().unwrap(),
            protocol: "HTTP/1.1",
            method: Some(http::Method::GET),
            authority: "example.test".into(),
            path: "/a \"quoted\"\\path\n\u{1}é".into(),
            status: 499,
            bytes_sent: 10,
            bytes_received: 0,
            duration: Duration::from_micros(1500),
            route: Some("r".into()),
            upstream: None,
            upstream_addr: Some("127.0.0.1:9000".parse().unwrap()),
            upstream_local: None,
            upstream_protocol: Some("h2c"),
            outcome: Outcome::ClientAbort,
            abort_reason: Some(CancelReason::StreamReset),
            stage: Some("body"),
            upstream_connect: None,
            queued: None,
            auth: None,
            auth_to_client: None,
            grpc_status: None,
            tls: None,
            upstream_first_byte: Some(Duration::from_micros(42)),
            upstream_time: None,
            propagation: Some(Duration::from_micros(7)),
            upstream_reused: Some(true),
            retries: 1,
            timings: StageTimings::default(),
            trace_id: None,
            span_id: None,
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for a in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "127.0.0.1:8080",
            "10.20.3.4:443",
            "1.22.133.4:9",
            "100.10.1.0:10",
            "9.99.199.255:99",
            "0.0.0.1:100",
            "1.2.3.4:999",
            "1.2.3.4:1000",
            "1.2.3.4:9999",
            "1.2.3.4:10000",
            "[::1]:8080",
            "[2001:db8::7]:1",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let mut out = Vec::new();
            write_addr(&mut out, &a);
            assert_eq!(String::from_utf8(out).unwrap(), a.to_string());
        }
    }

    #[test]
    fn needs_escape_matches_a_byte_by_byte_check() {
        let slow = |s: &[u8]| s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        // Every byte value at every position of strings around the word size.
        for len in 1..=17 {
            for pos in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[pos] = b;
                    assert_eq!(needs_escape(&s), slow(&s), "{s:?}");
                }
            }
        }
        assert!(!needs_escape(b""));
        assert!(!needs_escape("é/path?x=ü&y=~".as_bytes()));
    }

    #[test]
    fn escapes_as_before() {
        let mut out = Vec::new();
        escape_into(&mut out, "a\"b\\c\n\r\t\u{1}\u{1f}é\u{7f}".as_bytes());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\"a\\\"b\\\\c\\n\\r\\t\\u0001\\u001fé\u{7f}\""
        );
    }

    #[test]
    fn reopen_sends_new_lines_to_a_new_file_at_the_path() {
        let dir = std::env::temp_dir().join(format!("tether-reopen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, rotated) = (dir.join("access.log"), dir.join("access.log.1"));
        let sink = LineSink::append(&path).unwrap();
        sink.write_line("one");
        // Rotated away while a line is still gathered: it belongs to the old file.
        std::fs::rename(&path, &rotated).unwrap();
        sink.write_line("two");
        assert!(sink.reopen().unwrap());
        sink.write_line("three");
        sink.flush();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "one\ntwo\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
        // A path that cannot be opened keeps the file in use.
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(sink.reopen().is_err());
        sink.write_line("four");
        sink.flush();
        assert!(!LineSink::stdout().reopen().unwrap());
    }

    #[test]
    fn json_line_is_valid_and_complete() {
        let mut line = String::new();
        record().write_json(&mut line);
        let v: Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["time_unix_ms"], 1_700_000_000_123u64);
        assert_eq!(v["path"], "/a \"quoted\"\\path\n\u{1}é");
        assert_eq!(v["local"], "[::1]:8080");
        assert_eq!(v["status"], 499);
        assert_eq!(v["outcome"], "client_abort");
        assert_eq!(v["abort_reason"], "stream_reset");
        assert_eq!(v["upstream"], Value::Null);
        assert_eq!(v["upstream_first_byte_us"], 42);
        assert_eq!(v["propagation_us"], 7);
        assert_eq!(v["upstream_reused"], true);
        assert_eq!(v["dns_us"], Value::Null);
        assert_eq!(v.as_object().unwrap().len(), 34);
        assert!(!line.contains('\n'), "one line per record");

        // The fields only some requests have.
        let mut rec = record();
        rec.grpc_status = Some(4);
        rec.queued = Some(Duration::from_micros(1500));
        rec.tls = Some(std::sync::Arc::new(crate::downstream::tls::TlsSession {
            version: "TLSv1.3",
            cipher: "TLS13_AES_128_GCM_SHA256",
            server_name: Some("api.example".into()),
            client_cert: Some(http::HeaderValue::from_static("Hash=ab;Subject=\"CN=c\"")),
        }));
        let mut line = String::new();
        rec.write_json(&mut line);
        let v: Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(
            (&v["grpc_status"], &v["queue_us"]),
            (&4.into(), &1500.into())
        );
        assert_eq!(
            (&v["tls_version"], &v["tls_cipher"], &v["sni"]),
            (
                &"TLSv1.3".into(),
                &"TLS13_AES_128_GCM_SHA256".into(),
                &"api.example".into()
            )
        );
        assert_eq!(v["client_cert"], "Hash=ab;Subject=\"CN=c\"");
        assert_eq!(v.as_object().unwrap().len(), 40);
    }
}
