//! The TOML config file: [`FileConfig`] (serde, unknown keys refused) → typed
//! [`tether_gateway::Config`], validated. Every error names the dotted key
//! (`listeners[0].routes[1].upstream`) and its line; `docs/config.md` documents each key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tether_gateway::config::{
    AccessLogMode, AdminConfig, Balance, ClientAuth, Compression, Config, ContentCoding,
    DEFAULT_AUTH_TIMEOUT, DEFAULT_MIRROR_IN_FLIGHT, DeadPeerConfig, Discovery, ForwardAuth,
    HalfClose, HashKey, HeaderRules, HealthCheck, IpNet, ListenerConfig, ListenerLimits,
    ListenerTls, MAX_WEIGHT, Mirror, Protocols, RateLimit, Redirect, Respond, RouteConfig,
    RouteTimeouts, ServerTls, SplitTarget, TcpKeepalive, TraceContext, UpstreamAddress,
    UpstreamConfig, UpstreamProtocol, UpstreamTls,
};

use crate::duration::parse_duration;
use tether_gateway::downstream::tls;

/// Default grace period for draining in-flight requests on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The file as written. Field names are the file's keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Worker threads; default one per core.
    pub workers: Option<usize>,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Option<String>,
    /// The admin listener.
    pub admin: Option<FileAdmin>,
    /// Name resolution for upstream addresses.
    pub dns: Option<FileDns>,
    /// Downstream listeners.
    #[serde(default)]
    pub listeners: Vec<FileListener>,
    /// Named upstreams.
    #[serde(default)]
    pub upstreams: Vec<FileUpstream>,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    /// `ip:port` to bind.
    pub address: String,
}

/// `[dns]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDns {
    /// `ip:port` nameservers queried directly; absent or empty: the system resolver.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Longest a lookup may take.
    pub timeout: Option<String>,
}

/// `[[listeners]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    /// `ip:port` to bind.
    pub address: String,
    /// `http1`, `h2c` (cleartext) or `h2` (TLS).
    pub protocols: Option<Vec<String>>,
    /// TLS termination.
    pub tls: Option<FileListenerTls>,
    /// Peers whose request id, forwarding and budget headers are believed.
    #[serde(default)]
    pub trusted_peers: Vec<String>,
    /// Every connection starts with a PROXY protocol header.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// `[[listeners.routes]]`, first match wins.
    #[serde(default)]
    pub routes: Vec<FileRoute>,
    /// `[listeners.dead_peer]`.
    pub dead_peer: Option<FileDeadPeer>,
    /// `[listeners.limits]`.
    pub limits: Option<FileLimits>,
}

/// `[listeners.dead_peer]`: detecting clients that vanished without closing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDeadPeer {
    /// How long a request must be in flight before its connection is probed.
    pub arm_after: Option<String>,
    /// Silence before the first keepalive probe, or `"off"` (no keepalive).
    pub keepalive_idle: Option<String>,
    /// Between keepalive probes.
    pub keepalive_interval: Option<String>,
    /// Unanswered probes before the client is declared dead.
    pub keepalive_probes: Option<u32>,
    /// `TCP_USER_TIMEOUT` while a response is written, or `"off"`.
    pub write_timeout: Option<String>,
    /// HTTP/2 PING interval, or `"off"`.
    pub h2_ping_interval: Option<String>,
    /// HTTP/2 PING timeout.
    pub h2_ping_timeout: Option<String>,
}

/// `[listeners.limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    /// Open connections at once.
    pub max_connections: Option<usize>,
    /// Listen backlog.
    pub backlog: Option<u32>,
    /// Largest request head in bytes.
    pub max_header_bytes: Option<usize>,
    /// Time allowed for an HTTP/1 request head.
    pub header_read_timeout: Option<String>,
    /// Idle time before an HTTP/1 keep-alive connection is parked, or `"off"`.
    pub park_idle_after: Option<String>,
    /// Largest request body in bytes.
    pub max_body_bytes: Option<u64>,
    /// HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: Option<u32>,
    /// HTTP/2 streams reset before being accepted, per connection.
    pub h2_max_pending_reset_streams: Option<usize>,
    /// HTTP/2 streams reset or refused for client errors, per connection.
    pub h2_max_local_error_resets: Option<usize>,
    /// Client resets of accepted HTTP/2 streams allowed at once; 0 disables the budget.
    pub h2_reset_burst: Option<u32>,
    /// Client resets of accepted HTTP/2 streams allowed per second after the burst.
    pub h2_reset_per_second: Option<u32>,
    /// Requests one client connection carries before it is closed.
    pub max_requests_per_connection: Option<u32>,
    /// Longest a client connection is used.
    pub max_connection_age: Option<String>,
}

/// A certificate and its key: `{ cert, key }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServerTls {
    /// PEM certificate chain, leaf first.
    pub cert: String,
    /// PEM private key.
    pub key: String,
}

/// `tls = { cert, key, certificates, client_ca, client_auth }` on a listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListenerTls {
    /// PEM certificate chain, leaf first: the default certificate.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// More certificates, chosen by the server name a client asks for.
    pub certificates: Option<Vec<FileServerTls>>,
    /// PEM trust anchors client certificates are verified against.
    pub client_ca: Option<String>,
    /// `"required"` (default) or `"optional"`.
    pub client_auth: Option<String>,
}

/// `[[listeners.routes]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    /// Name for logs and metrics; default: the upstream name.
    pub name: Option<String>,
    /// A host, or a list of them; absent matches any.
    pub host: Option<FileHosts>,
    /// Path prefix on whole segments; default `/`.
    pub path_prefix: Option<String>,
    /// The one path matched, in place of a prefix.
    pub path: Option<String>,
    /// A regular expression the whole path must match, in place of a prefix.
    pub path_regex: Option<String>,
    /// With `path` or `path_regex`: the path sent upstream instead (`$1`, `${name}`: groups).
    pub rewrite_path: Option<String>,
    /// Upstream name; required unless the route redirects or responds.
    pub upstream: Option<String>,
    /// `{ to, status }`: answer with a redirect instead of proxying.
    pub redirect: Option<FileRedirect>,
    /// `{ status, body, content_type }`: answer with a fixed response instead of proxying.
    pub respond: Option<FileRespond>,
    /// `[{ upstream, weight }, ...]`: spread requests over several upstreams.
    pub split: Option<Vec<FileSplitTarget>>,
    /// `client_ip`, `path`, `header:NAME` or `cookie:NAME`: keeps a key's requests on one
    /// upstream of the split.
    pub split_key: Option<String>,
    /// Methods the route is for; default any.
    pub methods: Option<Vec<String>>,
    /// Headers a request must carry (`*`: any value).
    pub match_headers: Option<BTreeMap<String, String>>,
    /// Total deadline, or `"off"`.
    pub timeout: Option<String>,
    /// Upstream connect (and TLS handshake) timeout.
    pub connect_timeout: Option<String>,
    /// Request sent → response head, or `"off"`.
    pub first_byte_timeout: Option<String>,
    /// Longest gap between body chunks, or `"off"`.
    pub idle_timeout: Option<String>,
    /// `abort` or `continue`.
    pub client_half_close: Option<FileHalfClose>,
    /// Extra attempts after a failure that is safe to retry; 0 disables.
    pub max_retries: Option<u32>,
    /// Header carrying the remaining budget in milliseconds, or `"off"`.
    pub budget_header: Option<String>,
    /// 5xx statuses on which idempotent bodiless requests are retried.
    pub retry_statuses: Option<Vec<u16>>,
    /// An idempotent request's declared body up to this size is read whole, to be sent again.
    pub retry_body_bytes: Option<u64>,
    /// Request bodies read ahead up to this size before an upstream connection is taken.
    pub request_buffer_bytes: Option<u64>,
    /// Where bodies read ahead go past their first MiB.
    pub request_buffer_dir: Option<String>,
    /// Response bodies read ahead of the client up to this size.
    pub response_buffer_bytes: Option<u64>,
    /// `{ upstream, share, max_in_flight }`: copies of the requests sent to another upstream.
    pub mirror: Option<FileMirror>,
    /// `{ upstream, path, copy_headers, timeout }`: an auth service that checks each request
    /// first.
    pub auth: Option<FileAuth>,
    /// Retries as a fraction of requests.
    pub retry_budget: Option<f64>,
    /// Retries always allowed per second.
    pub retry_budget_min_per_second: Option<u32>,
    /// `passthrough` or `span`.
    pub trace_context: Option<FileTraceContext>,
    /// `all`, `errors` or `off`: which requests get an access-log line.
    pub access_log: Option<FileAccessLog>,
    /// The share of successful requests logged (0 < share ≤ 1); the others are always logged.
    pub access_log_sample: Option<f64>,
    /// Requests in flight at once; beyond it 503 with `Retry-After`.
    pub max_in_flight: Option<usize>,
    /// The largest request body, in place of the listener's.
    pub max_body_bytes: Option<u64>,
    /// Requests per client over time; beyond it 429 with `Retry-After`.
    pub rate_limit: Option<FileRateLimit>,
    /// Addresses or networks of the clients served; others get 403.
    pub allow_clients: Option<Vec<String>>,
    /// Addresses or networks of clients answered 403.
    pub deny_clients: Option<Vec<String>>,
    /// Response compression.
    pub compression: Option<FileCompression>,
    /// Replaces the matched path prefix upstream.
    pub rewrite_prefix: Option<String>,
    /// Changes to upstream requests' headers.
    #[serde(default)]
    pub request_headers: FileHeaderRules,
    /// Changes to responses' headers.
    #[serde(default)]
    pub response_headers: FileHeaderRules,
}

/// `request_headers` / `response_headers`: `{ remove = [..], set = { name = "value" }, add = { .. } }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeaderRules {
    /// Header names removed.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Headers replaced (or added).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Values added beside any already there.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
}

impl FileHeaderRules {
    fn rules(&self) -> HeaderRules {
        let pairs = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        HeaderRules {
            remove: self.remove.clone(),
            set: pairs(&self.set),
            add: pairs(&self.add),
        }
    }
}

/// A route's `access_log` values.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileAccessLog {
    /// Every request.
    All,
    /// Only those that did not end well.
    Errors,
    /// None.
    Off,
}

/// `trace_context` values.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileTraceContext {
    /// Forward `traceparent` untouched.
    Passthrough,
    /// Add tether's span.
    Span,
}

/// `client_half_close` values.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileHalfClose {
    /// Cancel the upstream work.
    Abort,
    /// Keep going.
    Continue,
}

/// `[[upstreams]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    /// Name routes refer to.
    pub name: String,
    /// `host:port` or `[v6]:port` entries, each alone or with its weight.
    pub addresses: Vec<FileAddress>,
    /// `round_robin` (default), `least_requests` or `hash`.
    pub balance: Option<FileBalance>,
    /// With `balance = "hash"`: `client_ip` (default), `path`, `header:NAME` or `cookie:NAME`.
    pub hash_key: Option<String>,
    /// `http1` (default), `h2c` or `h2`.
    pub protocol: Option<FileUpstreamProtocol>,
    /// TLS towards the upstream.
    pub tls: Option<FileUpstreamTls>,
    /// Idle pooled connections per endpoint and worker; 0 disables pooling.
    pub max_idle_per_endpoint: Option<usize>,
    /// Requests in flight per endpoint, all workers together; more wait their turn.
    pub max_in_flight_per_endpoint: Option<u32>,
    /// How long a request waits for room at a full endpoint.
    pub queue_timeout: Option<String>,
    /// HTTP/2: streams per connection before another connection is opened.
    pub max_streams_per_connection: Option<u32>,
    /// How long an idle pooled connection is kept.
    pub idle_timeout: Option<String>,
    /// Requests (HTTP/2: streams) one connection carries before it is closed.
    pub max_requests_per_connection: Option<u32>,
    /// Longest a connection is used from its opening.
    pub max_connection_age: Option<String>,
    /// `v1` or `v2`: start each connection with a PROXY protocol header naming the client.
    pub proxy_protocol: Option<FileProxyProtocol>,
    /// Failed connection attempts in a row before an endpoint is skipped; 0 never skips.
    pub max_fails: Option<u32>,
    /// How long an endpoint is skipped after `max_fails` failed attempts.
    pub fail_timeout: Option<String>,
    /// How long an endpoint coming back or joining takes to get its whole share.
    pub slow_start: Option<String>,
    /// Response statuses that count as failures toward `max_fails`.
    pub fail_statuses: Option<Vec<u16>>,
    /// Active health checks.
    pub health_check: Option<FileHealthCheck>,
    /// `dns`: each address a name resolves to is an endpoint of its own.
    pub discovery: Option<FileDiscovery>,
    /// How often discovered names are looked up again; default 5s.
    pub discovery_interval: Option<String>,
}

/// `discovery` values of an upstream.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileDiscovery {
    /// A and AAAA records looked up in DNS, periodically.
    Dns,
    /// SRV records looked up in DNS, periodically; the names are written without ports.
    Srv,
}

/// How often discovered names are looked up again by default.
const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);

/// An entry of an upstream's `addresses`: `"host:port"`, or
/// `{ address = "host:port", weight = 3, backup = true }`.
#[derive(Debug)]
pub struct FileAddress {
    /// `host:port`.
    pub address: String,
    /// Its share of the requests; default 1.
    pub weight: Option<u32>,
    /// Taken only while no other endpoint can be; default false.
    pub backup: bool,
}

impl<'de> Deserialize<'de> for FileAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FileAddress, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            address: String,
            weight: Option<u32>,
            #[serde(default)]
            backup: bool,
        }
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = FileAddress;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "\"host:port\" or { address = \"host:port\", weight = N, backup = true }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<FileAddress, E> {
                Ok(FileAddress {
                    address: s.to_owned(),
                    weight: None,
                    backup: false,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FileAddress, A::Error> {
                let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(FileAddress {
                    address: t.address,
                    weight: t.weight,
                    backup: t.backup,
                })
            }
        }
        d.deserialize_any(Entry)
    }
}

/// `mirror = { upstream, share, max_in_flight }` of a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMirror {
    /// The upstream the copies go to. Required.
    pub upstream: String,
    /// The share of requests copied, from 0.000001 to 1; default 1.
    pub share: Option<f64>,
    /// Copies in flight at once; default 100.
    pub max_in_flight: Option<u32>,
}

/// A route's `host`: one, or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileHosts {
    /// `host = "api.example.com"`.
    One(String),
    /// `host = ["example.com", "www.example.com"]`.
    Many(Vec<String>),
}

/// `auth = { upstream, path, copy_headers, timeout }` of a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    /// The upstream that answers the checks. Required.
    pub upstream: String,
    /// The path each check asks for. Required.
    pub path: String,
    /// Headers of an allowing answer that go on with the request; default none.
    pub copy_headers: Option<Vec<String>>,
    /// Headers of an allowing answer added to the client's response; default none.
    pub client_headers: Option<Vec<String>>,
    /// Longest a check may take; default 5 s.
    pub timeout: Option<String>,
}

/// `redirect = { to, status }` of a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRedirect {
    /// The `Location` template. Required.
    pub to: String,
    /// 301, 302, 303, 307 or 308 (default).
    pub status: Option<u16>,
}

/// One `{ upstream, weight }` of a route's `split`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSplitTarget {
    /// The upstream's name. Required.
    pub upstream: String,
    /// Its share, 0 to 100. Required.
    pub weight: u32,
}

/// `respond = { status, body, content_type }` of a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRespond {
    /// 200 (default) to 599.
    pub status: Option<u16>,
    /// The body; default empty.
    pub body: Option<String>,
    /// A file holding the body (UTF-8 text, at most 1 MiB), read when the configuration loads.
    pub body_file: Option<String>,
    /// The body's type; default `text/plain; charset=utf-8` (`text/html` for an `.html` file,
    /// `application/json` for a `.json` one).
    pub content_type: Option<String>,
}

/// `rate_limit = { requests, per, burst, queue, key }` of a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRateLimit {
    /// Requests allowed per `per`. Required.
    pub requests: u32,
    /// The period; default 1 s.
    pub per: Option<String>,
    /// Requests allowed at once beyond the steady rate; default 0.
    pub burst: Option<u32>,
    /// Requests beyond `burst` that wait for their turn; default 0.
    pub queue: Option<u32>,
    /// What requests are counted by: `client_ip` (the default), `header:NAME`, `cookie:NAME`
    /// or `path`.
    pub key: Option<String>,
}

/// `compression = { encodings, types, min_bytes }` of a route; `{}` takes every default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCompression {
    /// `"br"` and/or `"gzip"`, in order of preference.
    pub encodings: Option<Vec<String>>,
    /// Media types compressed.
    pub types: Option<Vec<String>>,
    /// Smallest declared length compressed.
    pub min_bytes: Option<u64>,
}

/// `balance` values of an upstream.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileBalance {
    /// In turn, by weight.
    RoundRobin,
    /// Fewest requests in flight for the weight.
    LeastRequests,
    /// The same endpoint for the same key.
    Hash,
}

/// `health_check` of an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    /// Path requested; or `grpc_service`.
    pub path: Option<String>,
    /// A gRPC health check of this service (`""`: the whole server) instead of `GET path`.
    pub grpc_service: Option<String>,
    /// Between checks; default 5 s.
    pub interval: Option<String>,
    /// Longest a check may take; default 2 s.
    pub timeout: Option<String>,
    /// Failed checks in a row that take an endpoint out; default 2.
    pub unhealthy_after: Option<u32>,
    /// Passed checks in a row that put it back; default 2.
    pub healthy_after: Option<u32>,
    /// Statuses that pass: codes (`200`) and classes (`"2xx"`); default 200–399.
    pub expect_status: Option<Vec<FileStatus>>,
    /// Text the body must contain.
    pub expect_body: Option<String>,
    /// Headers each check sends.
    pub headers: Option<BTreeMap<String, String>>,
}

/// An entry of `expect_status`: a status code, or a class such as `"2xx"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileStatus {
    /// One status.
    Code(i64),
    /// A class, as written.
    Class(String),
}

impl<'de> Deserialize<'de> for FileStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FileStatus, D::Error> {
        struct Entry;
        impl serde::de::Visitor<'_> for Entry {
            type Value = FileStatus;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status (200) or a class (\"2xx\")")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<FileStatus, E> {
                Ok(FileStatus::Code(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<FileStatus, E> {
                Ok(FileStatus::Class(s.to_owned()))
            }
        }
        d.deserialize_any(Entry)
    }
}

impl FileStatus {
    /// The statuses it covers.
    fn range(&self) -> Result<std::ops::RangeInclusive<u16>, String> {
        let bad =
            || format!("{self} is not a status from 100 to 599 or a class from \"1xx\" to \"5xx\"");
        match self {
            FileStatus::Code(n) => match u16::try_from(*n) {
                Ok(n) if (100..=599).contains(&n) => Ok(n..=n),
                _ => Err(bad()),
            },
            FileStatus::Class(c) => match c.as_bytes() {
                [d @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                    let from = u16::from(d - b'0') * 100;
                    Ok(from..=from + 99)
                }
                _ => Err(bad()),
            },
        }
    }
}

impl fmt::Display for FileStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileStatus::Code(n) => write!(f, "{n}"),
            FileStatus::Class(c) => write!(f, "{c:?}"),
        }
    }
}

/// `proxy_protocol` values of an upstream.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileProxyProtocol {
    /// The text header.
    V1,
    /// The binary header.
    V2,
}

/// `protocol` values of an upstream.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileUpstreamProtocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 cleartext, prior knowledge.
    H2c,
    /// HTTP/2 over TLS.
    H2,
}

/// `tls = { server_name, ca, insecure_skip_verify }` on an upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTls {
    /// SNI and verified name; default the address's host.
    pub server_name: Option<String>,
    /// PEM file of extra trust anchors.
    pub ca: Option<String>,
    /// Skip certificate verification (test setups only).
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// PEM client certificate chain, for upstreams that ask for one.
    pub cert: Option<String>,
    /// PEM private key of `cert`.
    pub key: Option<String>,
}

/// A config file that cannot be used, located in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {key}: {message}")]
pub struct LoadError {
    /// The file as given on the command line.
    pub file: String,
    /// 1-based line; 0 when the file could not be read at all.
    pub line: usize,
    /// Dotted key at fault (`listeners[0].routes[1].upstream`), or `file` / `toml`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// The result of loading: the gateway's config and the settings the binary keeps for itself.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Validated gateway configuration.
    pub config: Config,
    /// How long `serve` waits for in-flight requests on shutdown.
    pub shutdown_grace: Duration,
    /// The file's text, to locate errors found later (when the gateway starts).
    pub source: String,
}

/// Reads, parses, converts and validates a config file.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| LoadError {
        file: file.clone(),
        line: 0,
        key: "file".into(),
        message: format!("cannot read: {e}"),
    })?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let mut loaded = parse(&src, base).map_err(|e| LoadError {
        file,
        line: e.line,
        key: e.key,
        message: e.message,
    })?;
    loaded.source = src;
    Ok(loaded)
}

/// Locates an error found after loading (the gateway refusing a certificate, say) in the file.
pub fn locate(path: &Path, source: &str, key: String, message: String) -> LoadError {
    LoadError {
        file: path.display().to_string(),
        line: SpanIndex::build(source).line_of_key(&key),
        key,
        message,
    }
}

/// An error located by line, before the file name is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// 1-based line.
    pub line: usize,
    /// Dotted key.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// An error from conversion, located by key only; the [`SpanIndex`] finds its line.
#[derive(Debug)]
struct KeyError {
    key: String,
    message: String,
}

impl KeyError {
    fn new(key: impl Into<String>, message: impl fmt::Display) -> Self {
        KeyError {
            key: key.into(),
            message: message.to_string(),
        }
    }
}

/// Parses config text; relative file paths (certificates, keys, CAs) are resolved against `base`.
pub fn parse(src: &str, base: &Path) -> Result<Loaded, Located> {
    let index = SpanIndex::build(src);
    let file: FileConfig = toml::from_str(src).map_err(|e| index.locate_toml_error(&e))?;
    let loaded = convert(file, base).map_err(|e| index.locate_key(e.key, e.message))?;
    loaded
        .config
        .validate()
        .map_err(|e| index.locate_key(e.key, e.message))?;
    Ok(loaded)
}

fn convert(f: FileConfig, base: &Path) -> Result<Loaded, KeyError> {
    let workers = match f.workers {
        None => None,
        Some(n) => Some(NonZeroUsize::new(n).ok_or_else(|| {
            KeyError::new(
                "workers",
                "must be at least 1; omit it for one worker per core",
            )
        })?),
    };
    let shutdown_grace = match &f.shutdown_grace {
        None => DEFAULT_SHUTDOWN_GRACE,
        Some(s) => parse_duration(s).map_err(|e| KeyError::new("shutdown_grace", e))?,
    };
    let admin = match &f.admin {
        None => None,
        Some(a) => Some(AdminConfig {
            address: socket_addr("admin.address", &a.address)?,
        }),
    };
    let mut dns = tether_gateway::upstream::dns::DnsConfig::default();
    if let Some(d) = &f.dns {
        for (i, ns) in d.nameservers.iter().enumerate() {
            dns.nameservers
                .push(socket_addr(&format!("dns.nameservers[{i}]"), ns)?);
        }
        if let Some(t) = &d.timeout {
            dns.timeout = parse_duration(t).map_err(|e| KeyError::new("dns.timeout", e))?;
            if dns.timeout.is_zero() {
                return Err(KeyError::new("dns.timeout", "must be greater than zero"));
            }
        }
    }
    let listeners = f
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| listener(&format!("listeners[{i}]"), l, base))
        .collect::<Result<Vec<_>, _>>()?;
    let upstreams = f
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| upstream(&format!("upstreams[{i}]"), u, base))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Loaded {
        config: Config {
            workers,
            listeners,
            upstreams,
            admin,
            dns,
        },
        shutdown_grace,
        source: String::new(),
    })
}

fn socket_addr(key: &str, s: &str) -> Result<SocketAddr, KeyError> {
    s.parse().map_err(|_| {
        KeyError::new(
            key,
            format!("{s:?} is not an ip:port address (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")"),
        )
    })
}

fn listener(key: &str, l: &FileListener, base: &Path) -> Result<ListenerConfig, KeyError> {
    let address = socket_addr(&format!("{key}.address"), &l.address)?;
    let tls = match &l.tls {
        None => None,
        Some(t) => Some(listener_tls(&format!("{key}.tls"), t, base)?),
    };
    let protocols = match &l.protocols {
        None => Protocols::BOTH,
        Some(list) => {
            let mut p = Protocols {
                http1: false,
                h2: false,
            };
            for (j, name) in list.iter().enumerate() {
                let pkey = format!("{key}.protocols[{j}]");
                match (name.as_str(), tls.is_some()) {
                    ("http1", _) => p.http1 = true,
                    ("h2c", false) | ("h2", true) => p.h2 = true,
                    ("h2", false) => {
                        return Err(KeyError::new(
                            pkey,
                            "\"h2\" needs tls on the listener; use \"h2c\" for cleartext HTTP/2",
                        ));
                    }
                    ("h2c", true) => {
                        return Err(KeyError::new(
                            pkey,
                            "\"h2c\" is cleartext; with tls write \"h2\"",
                        ));
                    }
                    (other, has_tls) => {
                        let allowed = if has_tls {
                            "\"http1\", \"h2\""
                        } else {
                            "\"http1\", \"h2c\""
                        };
                        return Err(KeyError::new(
                            pkey,
                            format!("unknown protocol {other:?}, expected one of {allowed}"),
                        ));
                    }
                }
            }
            p
        }
    };
    let routes = l
        .routes
        .iter()
        .enumerate()
        .map(|(j, r)| route(&format!("{key}.routes[{j}]"), r, base))
        .collect::<Result<Vec<_>, _>>()?;
    let trusted_peers = networks(&format!("{key}.trusted_peers"), &l.trusted_peers)?;
    let mut cfg = ListenerConfig::new(address, routes);
    cfg.protocols = protocols;
    cfg.tls = tls;
    cfg.trusted_peers = trusted_peers;
    cfg.proxy_protocol = l.proxy_protocol;
    if let Some(d) = &l.dead_peer {
        cfg.dead_peer = dead_peer(&format!("{key}.dead_peer"), d)?;
    }
    if let Some(lim) = &l.limits {
        cfg.limits = limits(&format!("{key}.limits"), lim)?;
    }
    Ok(cfg)
}

/// A share of requests (above 0, at most 1) as requests in a million, rounded (0 for a share
/// below half a millionth).
fn per_million(key: &str, share: f64) -> Result<u32, KeyError> {
    if !(share > 0.0 && share <= 1.0) {
        return Err(KeyError::new(
            key,
            format!("{share} is not a share of requests: from 0.000001 to 1"),
        ));
    }
    // In [0, 1e6] once checked: no truncation can surprise.
    Ok((share * 1_000_000.0).round() as u32)
}

fn duration_key(key: &str, s: &str) -> Result<Duration, KeyError> {
    parse_duration(s).map_err(|e| KeyError::new(key, e))
}

fn dead_peer(key: &str, d: &FileDeadPeer) -> Result<DeadPeerConfig, KeyError> {
    let mut cfg = DeadPeerConfig::default();
    if let Some(s) = &d.arm_after {
        cfg.arm_after = duration_key(&format!("{key}.arm_after"), s)?;
    }
    let default_ka = cfg.tcp_keepalive.unwrap_or(TcpKeepalive {
        idle: Duration::from_secs(1),
        interval: Duration::from_secs(1),
        probes: 1,
    });
    cfg.tcp_keepalive = match d.keepalive_idle.as_deref() {
        Some("off") => None,
        idle => {
            let mut ka = default_ka;
            if let Some(s) = idle {
                ka.idle = duration_key(&format!("{key}.keepalive_idle"), s)?;
            }
            if let Some(s) = &d.keepalive_interval {
                ka.interval = duration_key(&format!("{key}.keepalive_interval"), s)?;
            }
            if let Some(n) = d.keepalive_probes {
                ka.probes = n;
            }
            for (name, v) in [
                ("keepalive_idle", ka.idle),
                ("keepalive_interval", ka.interval),
            ] {
                if v < Duration::from_secs(1) || v.subsec_nanos() != 0 {
                    return Err(KeyError::new(
                        format!("{key}.{name}"),
                        "must be whole seconds, at least \"1s\" (the kernel counts seconds)",
                    ));
                }
            }
            if ka.probes == 0 {
                return Err(KeyError::new(
                    format!("{key}.keepalive_probes"),
                    "must be at least 1; write keepalive_idle = \"off\" to disable keepalive",
                ));
            }
            Some(ka)
        }
    };
    cfg.write_timeout = opt_timeout(
        &format!("{key}.write_timeout"),
        &d.write_timeout,
        cfg.write_timeout,
    )?;
    cfg.h2_ping_interval = opt_timeout(
        &format!("{key}.h2_ping_interval"),
        &d.h2_ping_interval,
        cfg.h2_ping_interval,
    )?;
    if let Some(s) = &d.h2_ping_timeout {
        cfg.h2_ping_timeout = duration_key(&format!("{key}.h2_ping_timeout"), s)?;
    }
    Ok(cfg)
}

/// A limit that must be at least 1, as `NonZero*::new` made it.
fn nonzero<N>(key: String, made: Option<N>) -> Result<N, KeyError> {
    made.ok_or_else(|| KeyError::new(key, "must be at least 1; omit it for no limit"))
}

fn limits(key: &str, l: &FileLimits) -> Result<ListenerLimits, KeyError> {
    let mut cfg = ListenerLimits::default();
    if let Some(n) = l.max_connections {
        cfg.max_connections = Some(nonzero(
            format!("{key}.max_connections"),
            NonZeroUsize::new(n),
        )?);
    }
    if let Some(n) = l.backlog {
        cfg.backlog = n;
    }
    if let Some(n) = l.max_header_bytes {
        cfg.max_header_bytes = n;
    }
    if let Some(s) = &l.header_read_timeout {
        cfg.header_read_timeout = duration_key(&format!("{key}.header_read_timeout"), s)?;
    }
    cfg.park_idle_after = opt_timeout(
        &format!("{key}.park_idle_after"),
        &l.park_idle_after,
        cfg.park_idle_after,
    )?;
    if let Some(n) = l.max_body_bytes {
        cfg.max_body_bytes = Some(n);
    }
    if let Some(n) = l.h2_max_concurrent_streams {
        cfg.h2_max_concurrent_streams = n;
    }
    if let Some(n) = l.h2_max_pending_reset_streams {
        cfg.h2_max_pending_reset_streams = n;
    }
    if let Some(n) = l.h2_max_local_error_resets {
        cfg.h2_max_local_error_resets = n;
    }
    if let Some(n) = l.max_requests_per_connection {
        cfg.max_requests_per_connection = Some(nonzero(
            format!("{key}.max_requests_per_connection"),
            std::num::NonZeroU32::new(n),
        )?);
    }
    if let Some(s) = &l.max_connection_age {
        cfg.max_connection_age = Some(duration_key(&format!("{key}.max_connection_age"), s)?);
    }
    if l.h2_reset_burst == Some(0) {
        cfg.h2_reset_budget = None;
    } else if let Some(b) = &mut cfg.h2_reset_budget {
        if let Some(n) = l.h2_reset_burst {
            b.burst = n;
        }
        if let Some(n) = l.h2_reset_per_second {
            b.per_second = n;
        }
    }
    Ok(cfg)
}

/// The largest `respond.body_file`.
const MAX_BODY_FILE: u64 = 1024 * 1024;

/// The text of a fixed response's `body_file` and the type its name suggests.
fn body_file(base: &Path, file: &str) -> Result<(String, String), String> {
    use std::io::Read;
    let path = resolve(base, file);
    let cannot = |e: &dyn fmt::Display| format!("cannot read {}: {e}", path.display());
    let f = std::fs::File::open(&path).map_err(|e| cannot(&e))?;
    let mut bytes = Vec::new();
    f.take(MAX_BODY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot(&e))?;
    if bytes.len() as u64 > MAX_BODY_FILE {
        return Err(format!("{} is larger than 1 MiB", path.display()));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let ty = match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("json") => "application/json",
        _ => "text/plain; charset=utf-8",
    };
    Ok((text, ty.to_owned()))
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn load_certs(
    key: &str,
    base: &Path,
    file: &str,
) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let path = resolve(base, file);
    let bad = |e: &dyn fmt::Display| {
        KeyError::new(
            key,
            format!("cannot load certificates from {}: {e}", path.display()),
        )
    };
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no PEM certificate found"));
    }
    Ok(certs)
}

fn server_tls(key: &str, t: &FileServerTls, base: &Path) -> Result<ServerTls, KeyError> {
    let cert_chain = load_certs(&format!("{key}.cert"), base, &t.cert)?;
    let key_path = resolve(base, &t.key);
    let private = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        KeyError::new(
            format!("{key}.key"),
            format!("cannot load a private key from {}: {e}", key_path.display()),
        )
    })?;
    Ok(ServerTls {
        cert_chain,
        key: private,
    })
}

fn listener_tls(key: &str, t: &FileListenerTls, base: &Path) -> Result<ListenerTls, KeyError> {
    let default = FileServerTls {
        cert: t.cert.clone(),
        key: t.key.clone(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Checked here as the listener will serve them, so that an error names the file's key.
    let checked = |k: &str, c: &FileServerTls, default: bool| {
        let cert = server_tls(k, c, base)?;
        tls::check_certificate(&cert, default, &provider)
            .map_err(|e| KeyError::new(format!("{k}.cert"), e.to_string()))?;
        Ok::<_, KeyError>(cert)
    };
    let mut certificates = vec![checked(key, &default, true)?];
    for (i, c) in t.certificates.iter().flatten().enumerate() {
        certificates.push(checked(&format!("{key}.certificates[{i}]"), c, false)?);
    }
    let required = match t.client_auth.as_deref() {
        None | Some("required") => true,
        Some("optional") => false,
        Some(other) => {
            return Err(KeyError::new(
                format!("{key}.client_auth"),
                format!("unknown client_auth {other:?}; expected \"required\" or \"optional\""),
            ));
        }
    };
    let client_auth = match &t.client_ca {
        Some(ca) => {
            let ca_key = format!("{key}.client_ca");
            let auth = ClientAuth {
                ca: load_certs(&ca_key, base, ca)?,
                required,
            };
            tls::client_verifier(&auth, provider.clone()).map_err(|e| {
                KeyError::new(ca_key, format!("cannot verify clients with it: {e}"))
            })?;
            Some(auth)
        }
        None if t.client_auth.is_some() => {
            return Err(KeyError::new(
                format!("{key}.client_auth"),
                "client certificates need client_ca, the trust anchors they are verified against",
            ));
        }
        None => None,
    };
    Ok(ListenerTls {
        certificates,
        client_auth,
    })
}

/// An optional timeout: absent → `default`, `"off"` → none, else a non-zero duration.
fn opt_timeout(
    key: &str,
    v: &Option<String>,
    default: Option<Duration>,
) -> Result<Option<Duration>, KeyError> {
    match v.as_deref() {
        None => Ok(default),
        Some("off") => Ok(None),
        Some(s) => {
            let d = parse_duration(s).map_err(|e| KeyError::new(key, e))?;
            if d.is_zero() {
                return Err(KeyError::new(
                    key,
                    "must be greater than zero; write \"off\" to disable",
                ));
            }
            Ok(Some(d))
        }
    }
}

fn route(key: &str, r: &FileRoute, base: &Path) -> Result<RouteConfig, KeyError> {
    let defaults = RouteTimeouts::default();
    let connect = match &r.connect_timeout {
        None => defaults.connect,
        Some(s) => {
            parse_duration(s).map_err(|e| KeyError::new(format!("{key}.connect_timeout"), e))?
        }
    };
    let timeouts = RouteTimeouts {
        total: opt_timeout(&format!("{key}.timeout"), &r.timeout, defaults.total)?,
        connect,
        first_byte: opt_timeout(
            &format!("{key}.first_byte_timeout"),
            &r.first_byte_timeout,
            defaults.first_byte,
        )?,
        idle: opt_timeout(
            &format!("{key}.idle_timeout"),
            &r.idle_timeout,
            defaults.idle,
        )?,
    };
    let client_half_close = match r.client_half_close {
        None => HalfClose::default(),
        Some(FileHalfClose::Abort) => HalfClose::Abort,
        Some(FileHalfClose::Continue) => HalfClose::Continue,
    };
    let hosts = match &r.host {
        None => Vec::new(),
        Some(FileHosts::One(h)) => vec![h.clone()],
        Some(FileHosts::Many(hs)) => hs.clone(),
    };
    if r.host.is_some() && hosts.iter().all(String::is_empty) {
        return Err(KeyError::new(
            format!("{key}.host"),
            "must not be empty; omit it to match any host",
        ));
    }
    // `split = []` is not the absence of a split: said here, as the converted route cannot
    // tell them apart. Which of upstream, split, redirect and respond a route may combine is
    // the validation's to say.
    if r.split.as_ref().is_some_and(Vec::is_empty) {
        return Err(KeyError::new(
            format!("{key}.split"),
            "must name at least one upstream",
        ));
    }
    if r.upstream.is_none() && r.split.is_none() && r.redirect.is_none() && r.respond.is_none() {
        return Err(KeyError::new(
            format!("{key}.upstream"),
            "missing field `upstream` (or a `split`, `redirect` or `respond`)",
        ));
    }
    let upstream = r.upstream.clone().unwrap_or_default();
    let mut cfg = RouteConfig::new(
        r.path_prefix.clone().unwrap_or_else(|| "/".into()),
        upstream,
    );
    cfg.methods = r.methods.clone().unwrap_or_default();
    cfg.match_headers = r
        .match_headers
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    if let Some(rd) = &r.redirect {
        let mut redirect = Redirect::new(rd.to.clone());
        if let Some(status) = rd.status {
            redirect.status = status;
        }
        cfg.redirect = Some(redirect);
        // Named for the logs by where it sends clients.
        cfg.name = "redirect".into();
    }
    if let Some(split) = &r.split {
        cfg.split = split
            .iter()
            .map(|t| SplitTarget {
                upstream: t.upstream.clone(),
                weight: t.weight,
            })
            .collect();
        // Named for the logs after the upstream it mainly sends to.
        cfg.name = split[0].upstream.clone();
    }
    if let Some(k) = &r.split_key {
        cfg.split_key =
            Some(hash_key(Some(k)).map_err(|e| KeyError::new(format!("{key}.split_key"), e))?);
    }
    if let Some(rs) = &r.respond {
        let (body, file_type) = match (&rs.body, &rs.body_file) {
            (Some(_), Some(_)) => {
                return Err(KeyError::new(
                    format!("{key}.respond.body_file"),
                    "a fixed response has a body or a body_file, not both",
                ));
            }
            (None, Some(file)) => {
                let (body, ty) = body_file(base, file)
                    .map_err(|e| KeyError::new(format!("{key}.respond.body_file"), e))?;
                (body, Some(ty))
            }
            (body, None) => (body.clone().unwrap_or_default(), None),
        };
        let mut respond = Respond::new(rs.status.unwrap_or(200), body);
        if let Some(ct) = rs.content_type.as_ref().or(file_type.as_ref()) {
            respond.content_type = ct.clone();
        }
        cfg.respond = Some(respond);
        cfg.name = "respond".into();
    }
    if let Some(n) = &r.name {
        cfg.name = n.clone();
    }
    cfg.hosts = hosts;
    cfg.timeouts = timeouts;
    cfg.client_half_close = client_half_close;
    cfg.access_log = match (r.access_log, r.access_log_sample) {
        (None | Some(FileAccessLog::All), None) => AccessLogMode::All,
        (Some(FileAccessLog::Errors), None) => AccessLogMode::Errors,
        (Some(FileAccessLog::Off), None) => AccessLogMode::Off,
        (None | Some(FileAccessLog::All), Some(share)) => {
            let key = format!("{key}.access_log_sample");
            let per_million = per_million(&key, share)?;
            if per_million == 0 {
                return Err(KeyError::new(
                    key,
                    format!("{share} logs no request: at least 0.000001"),
                ));
            }
            AccessLogMode::Sampled { per_million }
        }
        (Some(_), Some(_)) => {
            return Err(KeyError::new(
                format!("{key}.access_log_sample"),
                "samples the successful requests that access_log = \"all\" logs; with \"errors\" or \"off\" none are logged to sample",
            ));
        }
    };
    if let Some(m) = &r.mirror {
        // A share too small to round to one in a million is refused by validation.
        let per_million = match m.share {
            None => 1_000_000,
            Some(share) => per_million(&format!("{key}.mirror.share"), share)?,
        };
        cfg.mirror = Some(Mirror {
            upstream: m.upstream.clone(),
            per_million,
            max_in_flight: m.max_in_flight.unwrap_or(DEFAULT_MIRROR_IN_FLIGHT),
        });
    }
    if let Some(a) = &r.auth {
        cfg.auth = Some(ForwardAuth {
            upstream: a.upstream.clone(),
            path: a.path.clone(),
            copy_headers: a.copy_headers.clone().unwrap_or_default(),
            client_headers: a.client_headers.clone().unwrap_or_default(),
            timeout: match &a.timeout {
                Some(s) => duration_key(&format!("{key}.auth.timeout"), s)?,
                None => DEFAULT_AUTH_TIMEOUT,
            },
        });
    }
    cfg.trace_context = match r.trace_context {
        None | Some(FileTraceContext::Passthrough) => TraceContext::Passthrough,
        Some(FileTraceContext::Span) => TraceContext::Span,
    };
    match r.budget_header.as_deref() {
        None => {}
        Some("off") => cfg.budget_header = None,
        Some(h) => cfg.budget_header = Some(h.to_ascii_lowercase()),
    }
    if let Some(n) = r.retry_body_bytes {
        cfg.retry_body_bytes = n;
    }
    if let Some(n) = r.request_buffer_bytes {
        cfg.request_buffer_bytes = n;
    }
    if let Some(n) = r.response_buffer_bytes {
        cfg.response_buffer_bytes = n;
    }
    if let Some(d) = &r.request_buffer_dir {
        let dir = resolve(base, d);
        if !dir.is_dir() {
            return Err(KeyError::new(
                format!("{key}.request_buffer_dir"),
                format!("{} is not a directory", dir.display()),
            ));
        }
        cfg.request_buffer_dir = Some(dir);
    }
    if let Some(v) = &r.retry_statuses {
        cfg.retry_statuses = v.clone();
    }
    if let Some(v) = r.retry_budget {
        cfg.retry_budget_ratio = v;
    }
    if let Some(v) = r.retry_budget_min_per_second {
        cfg.retry_budget_min_per_second = v;
    }
    if let Some(n) = r.max_retries {
        cfg.max_retries = n;
    }
    cfg.rewrite_prefix = r.rewrite_prefix.clone();
    if r.path_prefix.is_some() && (r.path.is_some() || r.path_regex.is_some()) {
        return Err(KeyError::new(
            format!("{key}.path_prefix"),
            "a route matches its path by path_prefix, path or path_regex: one of them",
        ));
    }
    cfg.path_exact = r.path.clone();
    cfg.path_regex = r.path_regex.clone();
    cfg.rewrite_path = r.rewrite_path.clone();
    cfg.request_headers = r.request_headers.rules();
    cfg.response_headers = r.response_headers.rules();
    cfg.max_body_bytes = r.max_body_bytes;
    if let Some(n) = r.max_in_flight {
        cfg.max_in_flight = Some(nonzero(
            format!("{key}.max_in_flight"),
            NonZeroUsize::new(n),
        )?);
    }
    if let Some(rl) = &r.rate_limit {
        let per = match &rl.per {
            None => Duration::from_secs(1),
            Some(s) => {
                parse_duration(s).map_err(|e| KeyError::new(format!("{key}.rate_limit.per"), e))?
            }
        };
        let counted_by = match &rl.key {
            None => None,
            Some(k) => Some(
                hash_key(Some(k)).map_err(|e| KeyError::new(format!("{key}.rate_limit.key"), e))?,
            ),
        };
        cfg.rate_limit = Some(RateLimit {
            requests: rl.requests,
            per,
            burst: rl.burst.unwrap_or(0),
            queue: rl.queue.unwrap_or(0),
            key: counted_by,
        });
    }
    if let Some(list) = &r.allow_clients {
        if list.is_empty() {
            return Err(KeyError::new(
                format!("{key}.allow_clients"),
                "an empty list would refuse every client; omit it to serve all",
            ));
        }
        cfg.allow_clients = networks(&format!("{key}.allow_clients"), list)?;
    }
    if let Some(list) = &r.deny_clients {
        cfg.deny_clients = networks(&format!("{key}.deny_clients"), list)?;
    }
    if let Some(c) = &r.compression {
        let mut compression = Compression::default();
        if let Some(encodings) = &c.encodings {
            compression.encodings = encodings
                .iter()
                .enumerate()
                .map(|(i, e)| match e.as_str() {
                    "br" => Ok(ContentCoding::Brotli),
                    "gzip" => Ok(ContentCoding::Gzip),
                    "zstd" => Ok(ContentCoding::Zstd),
                    other => Err(KeyError::new(
                        format!("{key}.compression.encodings[{i}]"),
                        format!(
                            "unknown encoding {other:?}; expected \"br\", \"gzip\" or \"zstd\""
                        ),
                    )),
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(types) = &c.types {
            compression.types = types.iter().map(|t| t.to_ascii_lowercase()).collect();
        }
        if let Some(n) = c.min_bytes {
            compression.min_bytes = n;
        }
        cfg.compression = Some(compression);
    }
    Ok(cfg)
}

/// Parses a list of addresses or networks (`"10.0.0.0/8"`, `"::1"`).
fn networks(key: &str, list: &[String]) -> Result<Vec<IpNet>, KeyError> {
    list.iter()
        .enumerate()
        .map(|(j, p)| {
            p.parse::<IpNet>()
                .map_err(|e| KeyError::new(format!("{key}[{j}]"), e))
        })
        .collect()
}

/// Parses a `hash_key`: `client_ip` (the default), `path`, `header:NAME` or `cookie:NAME`.
fn hash_key(s: Option<&str>) -> Result<HashKey, String> {
    match s.map(|s| s.split_once(':').map_or((s, None), |(k, v)| (k, Some(v)))) {
        None | Some(("client_ip", None)) => Ok(HashKey::ClientIp),
        Some(("path", None)) => Ok(HashKey::Path),
        Some(("header", Some(name))) => Ok(HashKey::Header(name.to_ascii_lowercase())),
        Some(("cookie", Some(name))) => Ok(HashKey::Cookie(name.to_owned())),
        _ => Err(format!(
            "{:?} is not one of \"client_ip\", \"path\", \"header:NAME\", \"cookie:NAME\"",
            s.unwrap_or_default()
        )),
    }
}

/// An SRV name such as `_http._tcp.api.service.consul`, with no port.
fn service_name(key: &str, s: &str) -> Result<UpstreamAddress, KeyError> {
    let name = s.trim_end_matches('.');
    let label_ok = |l: &str| l.len() <= 63 && tether_gateway::config::is_dns_label(l);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(KeyError::new(
            key,
            format!(
                "{s:?} is not a DNS name; an SRV name reads like \"_http._tcp.api.service.consul\""
            ),
        ));
    }
    Ok(UpstreamAddress::new(name, 0))
}

/// Parses `host:port` or `[v6]:port`.
fn upstream_address(key: &str, s: &str) -> Result<UpstreamAddress, KeyError> {
    let bad = |why: &str| {
        KeyError::new(
            key,
            format!(
                "{s:?} {why}; write host:port, e.g. \"127.0.0.1:9000\", \"app.internal:80\" or \"[::1]:9000\""
            ),
        )
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("has no closing ']'"))?;
        let port = after.strip_prefix(':').ok_or_else(|| bad("has no port"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("has a bracketed host that is not an IPv6 address"));
        }
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
        if host.contains(':') {
            return Err(bad("looks like an IPv6 address without brackets"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    let port: u16 = port.parse().map_err(|_| bad("has an invalid port"))?;
    if port == 0 {
        return Err(bad("has port 0"));
    }
    Ok(UpstreamAddress::new(host, port))
}

fn upstream(key: &str, u: &FileUpstream, base: &Path) -> Result<UpstreamConfig, KeyError> {
    let addresses = u
        .addresses
        .iter()
        .enumerate()
        .map(|(j, a)| {
            let akey = format!("{key}.addresses[{j}]");
            // An SRV name's records give the ports.
            if matches!(u.discovery, Some(FileDiscovery::Srv))
                && !a.address.contains(':')
                && a.address.parse::<std::net::IpAddr>().is_err()
            {
                return service_name(&akey, &a.address);
            }
            upstream_address(&akey, &a.address)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut weights = Vec::new();
    if u.addresses.iter().any(|a| a.weight.is_some()) {
        for (j, a) in u.addresses.iter().enumerate() {
            let w = a.weight.unwrap_or(1);
            if !(1..=MAX_WEIGHT).contains(&w) {
                return Err(KeyError::new(
                    format!("{key}.addresses[{j}].weight"),
                    format!("must be from 1 to {MAX_WEIGHT}"),
                ));
            }
            weights.push(w);
        }
    }
    let protocol = match u.protocol {
        None | Some(FileUpstreamProtocol::Http1) => UpstreamProtocol::Http1,
        Some(FileUpstreamProtocol::H2c) => UpstreamProtocol::H2c,
        Some(FileUpstreamProtocol::H2) => UpstreamProtocol::H2,
    };
    let tls = match &u.tls {
        None => None,
        Some(t) => Some(UpstreamTls {
            server_name: t.server_name.clone(),
            ca: match &t.ca {
                None => Vec::new(),
                Some(ca) => load_certs(&format!("{key}.tls.ca"), base, ca)?,
            },
            insecure_skip_verify: t.insecure_skip_verify,
            client_cert: match (&t.cert, &t.key) {
                (None, None) => None,
                (Some(cert), Some(k)) => Some(server_tls(
                    &format!("{key}.tls"),
                    &FileServerTls {
                        cert: cert.clone(),
                        key: k.clone(),
                    },
                    base,
                )?),
                (Some(_), None) => {
                    return Err(KeyError::new(
                        format!("{key}.tls.key"),
                        "a client certificate needs its key",
                    ));
                }
                (None, Some(_)) => {
                    return Err(KeyError::new(
                        format!("{key}.tls.cert"),
                        "a key needs its client certificate",
                    ));
                }
            },
        }),
    };
    let mut cfg = UpstreamConfig::new(u.name.clone(), addresses, protocol);
    cfg.tls = tls;
    cfg.weights = weights;
    if u.addresses.iter().any(|a| a.backup) {
        cfg.backups = u.addresses.iter().map(|a| a.backup).collect();
    }
    let hkey = format!("{key}.hash_key");
    cfg.balance = match (u.balance, &u.hash_key) {
        (Some(FileBalance::Hash), k) => {
            Balance::Hash(hash_key(k.as_deref()).map_err(|e| KeyError::new(&hkey, e))?)
        }
        (_, Some(_)) => {
            return Err(KeyError::new(hkey, "only used with balance = \"hash\""));
        }
        (None | Some(FileBalance::RoundRobin), None) => Balance::RoundRobin,
        (Some(FileBalance::LeastRequests), None) => Balance::LeastRequests,
    };
    if let Some(n) = u.max_idle_per_endpoint {
        cfg.max_idle_per_endpoint = n;
    }
    if let Some(n) = u.max_in_flight_per_endpoint {
        cfg.max_in_flight_per_endpoint = Some(nonzero(
            format!("{key}.max_in_flight_per_endpoint"),
            std::num::NonZeroU32::new(n),
        )?);
    }
    if let Some(s) = &u.queue_timeout {
        let qkey = format!("{key}.queue_timeout");
        if cfg.max_in_flight_per_endpoint.is_none() {
            return Err(KeyError::new(
                qkey,
                "only used with max_in_flight_per_endpoint",
            ));
        }
        // Zero is allowed: no waiting, a full upstream answers 503 at once.
        cfg.queue_timeout = parse_duration(s).map_err(|e| KeyError::new(&qkey, e))?;
    }
    if let Some(n) = u.max_streams_per_connection {
        let skey = format!("{key}.max_streams_per_connection");
        if !protocol.is_h2() {
            return Err(KeyError::new(
                skey,
                "only used with protocol = \"h2\" or \"h2c\"",
            ));
        }
        cfg.max_streams_per_connection = std::num::NonZeroU32::new(n)
            .ok_or_else(|| KeyError::new(skey, "must be at least 1"))?;
    }
    if let Some(s) = &u.idle_timeout {
        let ikey = format!("{key}.idle_timeout");
        let d = parse_duration(s).map_err(|e| KeyError::new(&ikey, e))?;
        if d.is_zero() {
            return Err(KeyError::new(
                ikey,
                "must be greater than zero; set max_idle_per_endpoint = 0 to disable pooling",
            ));
        }
        cfg.idle_timeout = d;
    }
    if let Some(n) = u.max_requests_per_connection {
        cfg.max_requests_per_connection = Some(nonzero(
            format!("{key}.max_requests_per_connection"),
            std::num::NonZeroU32::new(n),
        )?);
    }
    cfg.proxy_protocol = u.proxy_protocol.map(|v| match v {
        FileProxyProtocol::V1 => tether_gateway::config::ProxyProtocolVersion::V1,
        FileProxyProtocol::V2 => tether_gateway::config::ProxyProtocolVersion::V2,
    });
    if let Some(s) = &u.max_connection_age {
        cfg.max_connection_age = Some(duration_key(&format!("{key}.max_connection_age"), s)?);
    }
    let dkey = format!("{key}.discovery_interval");
    cfg.discovery = match (u.discovery, &u.discovery_interval) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(KeyError::new(
                dkey,
                "only used with discovery = \"dns\" or \"srv\"",
            ));
        }
        (Some(kind), interval) => Some(Discovery {
            interval: match interval {
                Some(s) => duration_key(&dkey, s)?,
                None => DEFAULT_DISCOVERY_INTERVAL,
            },
            srv: matches!(kind, FileDiscovery::Srv),
        }),
    };
    if let Some(n) = u.max_fails {
        cfg.max_fails = n;
    }
    if let Some(s) = &u.fail_timeout {
        let fkey = format!("{key}.fail_timeout");
        let d = parse_duration(s).map_err(|e| KeyError::new(&fkey, e))?;
        if d.is_zero() {
            return Err(KeyError::new(
                fkey,
                "must be greater than zero; set max_fails = 0 to never skip an endpoint",
            ));
        }
        cfg.fail_timeout = d;
    }
    cfg.fail_statuses = u.fail_statuses.clone().unwrap_or_default();
    if let Some(s) = &u.slow_start {
        cfg.slow_start = Some(duration_key(&format!("{key}.slow_start"), s)?);
    }
    if let Some(h) = &u.health_check {
        let hkey = format!("{key}.health_check");
        let mut check = match (&h.path, &h.grpc_service) {
            (Some(path), None) => HealthCheck::new(path.clone()),
            (None, Some(service)) => HealthCheck::grpc(service.clone()),
            (None, None) => {
                return Err(KeyError::new(
                    format!("{hkey}.path"),
                    "required: the path to GET, or grpc_service for a gRPC health check",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(KeyError::new(
                    format!("{hkey}.grpc_service"),
                    "a gRPC health check calls grpc.health.v1.Health/Check, not a path: give path or grpc_service",
                ));
            }
        };
        if let Some(s) = &h.interval {
            let k = format!("{hkey}.interval");
            check.interval = parse_duration(s).map_err(|e| KeyError::new(k, e))?;
        }
        if let Some(s) = &h.timeout {
            let k = format!("{hkey}.timeout");
            check.timeout = parse_duration(s).map_err(|e| KeyError::new(k, e))?;
        }
        if let Some(n) = h.unhealthy_after {
            check.unhealthy_after = n;
        }
        if let Some(n) = h.healthy_after {
            check.healthy_after = n;
        }
        for (j, status) in h.expect_status.iter().flatten().enumerate() {
            let range = status
                .range()
                .map_err(|e| KeyError::new(format!("{hkey}.expect_status[{j}]"), e))?;
            check.expect_status.push(range);
        }
        check.expect_body = h.expect_body.clone();
        check.headers = h.headers.clone().unwrap_or_default().into_iter().collect();
        cfg.health_check = Some(check);
    }
    Ok(cfg)
}

/// One step of a dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for s in path {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Splits `a[0].b` into segments; quoted keys are not produced by the gateway, so not parsed.
fn split_key(key: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => part.split_at(i),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Seg::Key(name.to_owned()));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let Some((n, after)) = r.split_once(']') else {
                break;
            };
            if let Ok(i) = n.parse() {
                out.push(Seg::Index(i));
            }
            rest = after;
        }
    }
    out
}

/// Where each key and value of the file sits, by dotted path. Built from a tolerant parse, so it
/// also helps to locate syntax errors.
#[derive(Debug, Default)]
pub struct SpanIndex {
    line_starts: Vec<usize>,
    /// Rendered path → span of its key (tables) or of the element (arrays).
    keys: Vec<(String, Range<usize>)>,
    /// Rendered path → span of its value, for containment queries.
    values: Vec<(String, Range<usize>)>,
}

impl SpanIndex {
    /// Indexes `src`.
    pub fn build(src: &str) -> Self {
        let mut idx = SpanIndex {
            line_starts: std::iter::once(0)
                .chain(src.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
            ..SpanIndex::default()
        };
        let (root, _errors) = toml::de::DeTable::parse_recoverable(src);
        idx.walk_table(&mut Vec::new(), root.get_ref());
        idx
    }

    fn walk_table(&mut self, path: &mut Vec<Seg>, t: &toml::de::DeTable<'_>) {
        for (k, v) in t.iter() {
            path.push(Seg::Key(k.get_ref().to_string()));
            let p = render(path);
            self.keys.push((p.clone(), k.span()));
            self.values.push((p, v.span()));
            self.walk_value(path, v.get_ref());
            path.pop();
        }
    }

    fn walk_value(&mut self, path: &mut Vec<Seg>, v: &toml::de::DeValue<'_>) {
        match v {
            toml::de::DeValue::Table(t) => self.walk_table(path, t),
            toml::de::DeValue::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    path.push(Seg::Index(i));
                    let p = render(path);
                    self.keys.push((p.clone(), e.span()));
                    self.values.push((p, e.span()));
                    self.walk_value(path, e.get_ref());
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= offset).max(1)
    }

    /// The line of `key`, or of its nearest ancestor present in the file (line 1 for none).
    pub fn line_of_key(&self, key: &str) -> usize {
        let mut segs = split_key(key);
        while !segs.is_empty() {
            let p = render(&segs);
            if let Some((_, span)) = self.keys.iter().find(|(k, _)| *k == p) {
                return self.line_of(span.start);
            }
            segs.pop();
        }
        1
    }

    /// The most specific key whose key or value span contains `offset`.
    pub fn key_at(&self, offset: usize) -> Option<&str> {
        self.keys
            .iter()
            .chain(self.values.iter())
            .filter(|(_, s)| s.start <= offset && offset < s.end.max(s.start + 1))
            .min_by_key(|(p, s)| (s.end - s.start, usize::MAX - p.len()))
            .map(|(p, _)| p.as_str())
    }

    fn locate_key(&self, key: String, message: String) -> Located {
        Located {
            line: self.line_of_key(&key),
            key,
            message,
        }
    }

    /// Locates a parse or deserialisation error: the key from its span, refined with the field
    /// that serde names for unknown and missing fields.
    fn locate_toml_error(&self, e: &toml::de::Error) -> Located {
        let message = e.message().trim().replace('\n', " ");
        let Some(span) = e.span() else {
            return Located {
                line: 1,
                key: "toml".into(),
                message,
            };
        };
        let line = self.line_of(span.start);
        let mut key = self.key_at(span.start).unwrap_or("").to_owned();
        for prefix in ["unknown field `", "missing field `"] {
            if let Some(field) = message
                .strip_prefix(prefix)
                .and_then(|r| r.split_once('`'))
                .map(|(f, _)| f)
                && split_key(&key).last() != Some(&Seg::Key(field.to_owned()))
            {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(field);
            }
        }
        if key.is_empty() {
            key = "toml".into();
        }
        Located { line, key, message }
    }
}

#[cfg(test)]
mod tests;
