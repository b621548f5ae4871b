//! The gateway's typed, validated configuration. No file format lives here: the `tether` binary
//! turns TOML into these types, tests build them directly.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Everything the gateway runs from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Worker threads, each with its own runtime and upstream pools. Default: one per core.
    pub workers: Option<NonZeroUsize>,
    /// Downstream listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Named upstreams that routes point at.
    pub upstreams: Vec<UpstreamConfig>,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`); none by default.
    pub admin: Option<AdminConfig>,
    /// Name resolution for upstream addresses.
    pub dns: crate::upstream::dns::DnsConfig,
}

impl Config {
    /// A configuration with default settings around the given listeners and upstreams.
    pub fn new(listeners: Vec<ListenerConfig>, upstreams: Vec<UpstreamConfig>) -> Config {
        Config {
            workers: None,
            listeners,
            upstreams,
            admin: None,
            dns: Default::default(),
        }
    }
}

/// The admin listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address to bind.
    pub address: SocketAddr,
}

/// One downstream listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Address to bind; port 0 picks a free port.
    pub address: SocketAddr,
    /// Which HTTP versions are served.
    pub protocols: Protocols,
    /// TLS termination; cleartext when `None`.
    pub tls: Option<ListenerTls>,
    /// Routes, first match wins.
    pub routes: Vec<RouteConfig>,
    /// Peers (proxies, load balancers) whose `X-Request-Id`, `X-Forwarded-For`, `Forwarded` and
    /// deadline budget headers are believed. From anyone else they are replaced. Default: none.
    pub trusted_peers: Vec<IpNet>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from a load balancer,
    /// whose source address is then the client; a connection without one is closed. Off by
    /// default.
    pub proxy_protocol: bool,
    /// How clients that vanish without closing are detected.
    pub dead_peer: DeadPeerConfig,
    /// Connection, head, body and stream limits.
    pub limits: ListenerLimits,
}

/// Detecting clients that vanished without a FIN or RST (Wi-Fi off, cable pulled, NAT entry
/// dropped). Idle keep-alive connections are not probed at all: the socket options are switched
/// on only once a request has been in flight for [`arm_after`](Self::arm_after), and off again
/// when the connection is idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadPeerConfig {
    /// How long a request must be in flight before its connection is probed. Default 1 s.
    pub arm_after: Duration,
    /// TCP keepalive while armed; `None` disables. Default 1 s idle, 1 s interval, 1 probe: a
    /// client that died while its request waits is dropped about 2 s after it was last heard
    /// (idle + interval × probes). On lossy networks raise `probes`: one lost probe is enough
    /// to drop a live client with the default.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `TCP_USER_TIMEOUT` while a response is being written and the connection is armed: how long
    /// written bytes may stay unacknowledged (a dead peer, or one that stopped reading) before the
    /// connection is dropped. Default 10 s; `None` disables.
    pub write_timeout: Option<Duration>,
    /// HTTP/2 PING interval (the whole connection, idle or not). Default 20 s; `None` disables.
    pub h2_ping_interval: Option<Duration>,
    /// How long an HTTP/2 PING may go unanswered before the connection is closed. Default 10 s.
    pub h2_ping_timeout: Duration,
}

/// TCP keepalive parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// Silence before the first probe.
    pub idle: Duration,
    /// Between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub probes: u32,
}

impl Default for DeadPeerConfig {
    fn default() -> Self {
        DeadPeerConfig {
            arm_after: Duration::from_secs(1),
            tcp_keepalive: Some(TcpKeepalive {
                idle: Duration::from_secs(1),
                interval: Duration::from_secs(1),
                probes: 1,
            }),
            write_timeout: Some(Duration::from_secs(10)),
            h2_ping_interval: Some(Duration::from_secs(20)),
            h2_ping_timeout: Duration::from_secs(10),
        }
    }
}

/// Limits of one listener. Each protects the gateway from one kind of abusive or broken client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Open connections at once, all workers together; beyond it tether stops accepting (clients
    /// wait in the listen backlog). Default: none.
    pub max_connections: Option<NonZeroUsize>,
    /// Listen backlog. Default 1024.
    pub backlog: u32,
    /// Largest request head (HTTP/1: the read buffer while parsing the head; HTTP/2: the header
    /// list size). Larger heads get 431. Default 64 KiB; at least 8 KiB.
    pub max_header_bytes: usize,
    /// How long an HTTP/1 client may take to send a request head (also bounds an idle
    /// keep-alive connection). The connection is closed when it passes. Default 30 s.
    pub header_read_timeout: Duration,
    /// How long a plain-TCP HTTP/1 keep-alive connection must be idle before it is parked
    /// (only its socket kept: no task, no buffers); `None` never parks. Shorter: less memory per
    /// idle connection after a burst; longer: fewer clients that pause between requests pay a
    /// park and a wake-up (each about as much CPU as a request). Default 500 ms, at least
    /// [`MIN_PARK_IDLE_AFTER`].
    pub park_idle_after: Option<Duration>,
    /// Largest request body: a larger `Content-Length` gets 413, a longer chunked or HTTP/2 body
    /// is cut (the upstream sees the request abort). Default: none.
    pub max_body_bytes: Option<u64>,
    /// Concurrent HTTP/2 streams per connection (`SETTINGS_MAX_CONCURRENT_STREAMS`). Default 256.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams the client may reset before tether accepted them; beyond it the
    /// connection gets GOAWAY(ENHANCE_YOUR_CALM). Default 20.
    pub h2_max_pending_reset_streams: usize,
    /// HTTP/2 streams tether may reset or refuse because of client errors; beyond it the
    /// connection gets GOAWAY(ENHANCE_YOUR_CALM). Default 1024.
    pub h2_max_local_error_resets: usize,
    /// Client stream resets of accepted HTTP/2 streams allowed per connection: a burst, refilled
    /// at a rate per second. Beyond it the connection is told to go away (GOAWAY) and its
    /// streams are cancelled. Default 200 and 50/s; `None` disables.
    pub h2_reset_budget: Option<ResetBudget>,
    /// Requests one client connection carries (nginx's `keepalive_requests`): the last one's
    /// response closes it (HTTP/1: `Connection: close`; HTTP/2: GOAWAY, streams in flight
    /// finishing), so that clients behind an L4 balancer spread over tethers again. Default:
    /// none.
    pub max_requests_per_connection: Option<std::num::NonZeroU32>,
    /// Longest a client connection is used (nginx's `keepalive_time`): the first response
    /// after it closes the connection (HTTP/1), or GOAWAY is sent when it passes (HTTP/2).
    /// Default: none.
    pub max_connection_age: Option<Duration>,
}

/// The shortest `park_idle_after`: a connection with a request in flight looks at its idleness
/// that often, so a shorter one would turn its loop for nothing.
pub const MIN_PARK_IDLE_AFTER: Duration = Duration::from_millis(100);

/// A token bucket for client stream resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetBudget {
    /// Resets allowed at once.
    pub burst: u32,
    /// Resets allowed per second after the burst.
    pub per_second: u32,
}

impl ListenerLimits {
    /// The limits on a client connection's use.
    pub fn lifetime(&self) -> crate::lifetime::Lifetime {
        crate::lifetime::Lifetime {
            max_requests: self.max_requests_per_connection,
            max_age: self.max_connection_age,
        }
    }
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: None,
            backlog: 1024,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            park_idle_after: Some(crate::downstream::h1::PARK_AFTER),
            max_body_bytes: None,
            h2_max_concurrent_streams: 256,
            h2_max_pending_reset_streams: 20,
            h2_max_local_error_resets: 1024,
            h2_reset_budget: Some(ResetBudget {
                burst: 200,
                per_second: 50,
            }),
            max_requests_per_connection: None,
            max_connection_age: None,
        }
    }
}

impl ListenerConfig {
    /// A listener on `address` serving HTTP/1 and HTTP/2 in cleartext, trusting no peer.
    pub fn new(address: SocketAddr, routes: Vec<RouteConfig>) -> ListenerConfig {
        ListenerConfig {
            address,
            protocols: Protocols::BOTH,
            tls: None,
            routes,
            trusted_peers: Vec::new(),
            proxy_protocol: false,
            dead_peer: DeadPeerConfig::default(),
            limits: ListenerLimits::default(),
        }
    }
}

/// An IP network (`10.0.0.0/8`, `::1/128`, or a bare address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

/// A string that is not an IP network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or network (like 10.0.0.0/8 or ::1)")]
pub struct IpNetError(String);

impl IpNet {
    /// The address as written (host bits are kept: `10.1.2.3/8` stays `10.1.2.3`).
    pub fn addr(&self) -> std::net::IpAddr {
        self.addr
    }

    /// The prefix length: 0..=32 for IPv4, 0..=128 for IPv6.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside the network. IPv4-mapped IPv6 addresses match IPv4 networks.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        // Compare in the network's own family: an IPv4 peer seen on a dual-stack socket arrives
        // IPv4-mapped, and a network may be written either way.
        match self.addr {
            IpAddr::V4(n) => {
                let a = match ip {
                    IpAddr::V4(a) => a,
                    IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                        Some(a) => a,
                        None => return false,
                    },
                };
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            IpAddr::V6(n) => {
                let a = match ip {
                    IpAddr::V6(a) => a,
                    IpAddr::V4(a) => a.to_ipv6_mapped(),
                };
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
        }
    }
}

impl std::fmt::Display for IpNet {
    /// `addr/prefix`, which parses back to the same network.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<IpNet, IpNetError> {
        let err = || IpNetError(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| err())?)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(err());
        }
        Ok(IpNet { addr, prefix })
    }
}

/// HTTP versions a listener serves. Cleartext: `http1` and/or `h2` (h2c with prior knowledge;
/// both together are told apart by the connection preface). With TLS, ALPN chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocols {
    /// HTTP/1.1 (and 1.0).
    pub http1: bool,
    /// HTTP/2 (h2c on cleartext, h2 over TLS).
    pub h2: bool,
}

impl Protocols {
    /// Both versions.
    pub const BOTH: Protocols = Protocols {
        http1: true,
        h2: true,
    };
}

/// A certificate chain and its private key: what tether presents when it terminates TLS, or
/// to an upstream that asks for a client certificate.
#[derive(Debug)]
pub struct ServerTls {
    /// Leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.cert_chain == other.cert_chain && self.key.secret_der() == other.key.secret_der()
    }
}

impl Eq for ServerTls {}

impl Clone for ServerTls {
    fn clone(&self) -> Self {
        ServerTls {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// TLS termination on a listener.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// The certificates served. Each is chosen for the server names (SNI) its leaf's subject
    /// alternative names cover, exact names before wildcards and earlier certificates before
    /// later ones; the first is also served to clients whose name none covers, or who send none.
    /// At least one.
    pub certificates: Vec<ServerTls>,
    /// Client certificates asked for and verified; `None` asks for none.
    pub client_auth: Option<ClientAuth>,
}

impl From<ServerTls> for ListenerTls {
    /// One certificate for every client, no client certificates.
    fn from(cert: ServerTls) -> ListenerTls {
        ListenerTls {
            certificates: vec![cert],
            client_auth: None,
        }
    }
}

/// Client certificates on a TLS listener (mutual TLS).
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// Trust anchors a client's chain must lead to.
    pub ca: Vec<CertificateDer<'static>>,
    /// Whether a client without a certificate is refused in the handshake. When not, it is
    /// served and its requests carry no client certificate; a certificate that fails
    /// verification is refused either way.
    pub required: bool,
}

/// What to do when an HTTP/1 client half-closes (FIN) with its request in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HalfClose {
    /// Treat it as the client leaving: cancel the upstream work (nginx, HAProxy `abortonclose`).
    #[default]
    Abort,
    /// Keep going and send the answer (RFC 9112 §9.6 lets a half-closed client still read). A reset
    /// still aborts.
    Continue,
}

/// What tether does with W3C trace context (`traceparent`) on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TraceContext {
    /// Forward `traceparent` and `tracestate` untouched (the trace id is logged).
    #[default]
    Passthrough,
    /// Add tether's own span: the upstream request carries a `traceparent` whose parent id is
    /// tether's span id (logged as `span_id`); a trace is started when the request has none.
    Span,
}

/// Which of a route's requests get an access-log line. Metrics count every request either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessLogMode {
    /// Every request.
    #[default]
    All,
    /// Only requests that did not end well: a status of 400 or more, or an outcome other than
    /// `ok` (an abort, a timeout, an upstream error). For a health-check route: quiet while it
    /// passes, seen when it fails.
    Errors,
    /// None.
    Off,
    /// Every request that did not end well (as [`AccessLogMode::Errors`]), and of those that
    /// did, `per_million` in a million. Which ones is decided by the request id, so that
    /// gateways passing the id on to each other log the same requests.
    Sampled {
        /// Successful requests logged per million, 1 to 1 000 000.
        per_million: u32,
    },
}

impl AccessLogMode {
    /// Whether a request with id `id` that ended with `status` and `ok` (its outcome) gets a
    /// line.
    #[inline]
    pub fn logs(self, status: u16, ok: bool, id: &str) -> bool {
        match self {
            AccessLogMode::All => true,
            AccessLogMode::Errors => status >= 400 || !ok,
            AccessLogMode::Off => false,
            AccessLogMode::Sampled { per_million } => {
                status >= 400 || !ok || sampled(id, per_million)
            }
        }
    }
}

/// Whether request id `id` is among `per_million` in a million, chosen by the stable hash that
/// keys balancing: the same requests in every tether.
#[inline]
pub(crate) fn sampled(id: &str, per_million: u32) -> bool {
    per_million >= 1_000_000 || sample_point(id) < u64::from(per_million)
}

/// Where request id `id` falls in 0..1 000 000.
fn sample_point(id: &str) -> u64 {
    crate::upstream::balance::stable_hash(id.as_bytes()) % 1_000_000
}

/// An upstream's list `name` given per address (`n` entries for `addresses` addresses): one
/// each, or none at all.
fn one_per_address(key: &str, name: &str, n: usize, addresses: usize) -> Result<(), ConfigError> {
    if n == 0 || n == addresses {
        return Ok(());
    }
    Err(ConfigError::new(
        format!("{key}.{name}"),
        format!("{n} {name} for {addresses} addresses: give one per address, or none"),
    ))
}

/// An upstream's addresses: each has a host and a port, but for an SRV name (whose records give
/// the ports), which takes no port and no weight of its own.
fn validate_ports(key: &str, u: &UpstreamConfig) -> Result<(), ConfigError> {
    let srv = u.discovery.is_some_and(|d| d.srv);
    for (j, a) in u.addresses.iter().enumerate() {
        // An endpoint discovery found has its port.
        let service = srv && a.is_name() && a.pinned.is_none();
        if service && a.port != 0 {
            return Err(ConfigError::new(
                format!("{key}.addresses[{j}]"),
                format!(
                    "{:?} is an SRV name, whose records give the ports: write it without one",
                    a.authority()
                ),
            ));
        }
        if a.host.is_empty() || (!service && a.port == 0) {
            return Err(ConfigError::new(
                format!("{key}.addresses[{j}]"),
                format!("{a} is not a usable host:port"),
            ));
        }
        if service && u.weights.get(j).is_some_and(|&w| w != 1) {
            return Err(ConfigError::new(
                format!("{key}.addresses[{j}].weight"),
                "an SRV name's records give the weights",
            ));
        }
    }
    Ok(())
}

/// Whether `p` is a path starting with `/`, without a query or fragment.
fn is_plain_path(p: &str) -> bool {
    p.starts_with('/') && !p.contains(['?', '#']) && PathAndQuery::try_from(p).is_ok()
}

/// Whether `label` is one label of a DNS name as tether takes them: letters, digits, `-` and `_`
/// (SRV names' `_http._tcp`), at least one.
pub fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A route's `host`: a name, or `*.` and a name (every name under it).
fn validate_host(rkey: &str, host: &str) -> Result<(), ConfigError> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    // An IPv6 literal, bracketed or not, matches as written.
    let literal = host.parse::<IpAddr>().is_ok() || host.starts_with('[');
    if !literal && !name.split('.').all(is_dns_label) {
        return Err(ConfigError::new(
            format!("{rkey}.host"),
            format!(
                "{host:?} is not a host name: write \"api.example.com\", or \"*.example.com\" for every name under example.com"
            ),
        ));
    }
    Ok(())
}

/// A route's `path_exact`, `path_regex` and `rewrite_path`: one way of matching the path, and a
/// rewrite that fits it.
fn validate_path_rule(rkey: &str, r: &RouteConfig) -> Result<(), ConfigError> {
    let other = "a route matches its path by path_prefix, path or path_regex: one of them";
    if r.path_exact.is_some() && r.path_regex.is_some() {
        return Err(ConfigError::new(format!("{rkey}.path_regex"), other));
    }
    let rule = r.path_exact.is_some() || r.path_regex.is_some();
    if rule && r.path_prefix != "/" {
        return Err(ConfigError::new(format!("{rkey}.path_prefix"), other));
    }
    if rule && r.rewrite_prefix.is_some() {
        return Err(ConfigError::new(
            format!("{rkey}.rewrite_prefix"),
            "replaces a path_prefix: with path or path_regex, use rewrite_path",
        ));
    }
    if let Some(p) = &r.path_exact
        && !is_plain_path(p)
    {
        return Err(ConfigError::new(
            format!("{rkey}.path"),
            format!("{p:?} must be a path starting with '/', without a query"),
        ));
    }
    let regex = match &r.path_regex {
        Some(re) => Some(
            crate::route::PathRule::regex(re)
                .map_err(|e| ConfigError::new(format!("{rkey}.path_regex"), e))?,
        ),
        None => None,
    };
    if let Some(to) = &r.rewrite_path {
        let key = format!("{rkey}.rewrite_path");
        if !rule {
            return Err(ConfigError::new(
                key,
                "only with path or path_regex (with path_prefix, use rewrite_prefix)",
            ));
        }
        // The path starts with `/` whatever the groups hold: the template itself does.
        let literal = crate::route::template_text(to);
        if !to.starts_with('/') || !is_plain_path(&literal) {
            return Err(ConfigError::new(
                key,
                format!("{to:?} must be a path starting with '/', without a query"),
            ));
        }
        if let Some(regex) = regex {
            regex
                .check_template(to)
                .map_err(|e| ConfigError::new(key, e))?;
        }
    }
    Ok(())
}

/// The longest [`UpstreamConfig::slow_start`].
pub const MAX_SLOW_START: Duration = Duration::from_secs(3600);

/// The default [`RouteConfig::retry_body_bytes`].
pub const DEFAULT_RETRY_BODY_BYTES: u64 = 64 * 1024;

/// The largest [`RouteConfig::retry_body_bytes`] and [`RouteConfig::request_buffer_bytes`]: a
/// body read ahead is held in memory.
pub const MAX_RETRY_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// The largest [`RouteConfig::request_buffer_bytes`] with a [`RouteConfig::request_buffer_dir`].
pub const MAX_SPILLED_BODY_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// One route: which requests go to which upstream, and under which limits.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// A name for logs and metrics; defaults to the upstream name with the route index.
    pub name: String,
    /// The hosts the route is for (the request's port ignored): names, or `*.example.com` for
    /// every name under `example.com`. Empty: any host.
    pub hosts: Vec<String>,
    /// Path prefix, matched on whole segments (`/api` matches `/api` and `/api/x`, not `/apix`).
    pub path_prefix: String,
    /// Name of an entry in [`Config::upstreams`].
    pub upstream: String,
    /// Timeouts for requests on this route.
    pub timeouts: RouteTimeouts,
    /// HTTP/1 half-close policy.
    pub client_half_close: HalfClose,
    /// Extra attempts after a failure that is provably safe to retry. Default 2; 0 disables.
    pub max_retries: u32,
    /// Response statuses on which idempotent requests are retried (bodiless, or with a body
    /// read whole, see `retry_body_bytes`). Default none.
    pub retry_statuses: Vec<u16>,
    /// An idempotent request (PUT, DELETE, ...) declaring a body of at most this many bytes is
    /// read whole before it is sent, so that it can be sent again: after a stale keep-alive
    /// connection, or on a `retry_statuses` answer. Towards an HTTP/2 upstream any request's
    /// (a POST's too), so that a stream the upstream did not process is sent again. Larger
    /// bodies, bodies without a declared length and `Expect: 100-continue` requests stream and
    /// are not sent twice. Default 64 KiB; 0 streams every body.
    pub retry_body_bytes: u64,
    /// Request bodies are read ahead, up to this many bytes, before an upstream connection is
    /// taken (nginx's `proxy_request_buffering`): a body that ends within it goes upstream whole,
    /// with a `Content-Length`, so a slow client's upload never holds an upstream connection or
    /// a backend worker, and a client that leaves mid-upload costs the upstream nothing; a
    /// longer body goes with what was read first and streams the rest. gRPC requests and
    /// upgrades always stream. Default 0: bodies stream from the first byte.
    pub request_buffer_bytes: u64,
    /// Where a body read ahead goes past its first MiB (nginx's `client_body_temp_path`): a
    /// file there, unlinked as soon as made, so that `request_buffer_bytes` can reach
    /// [`MAX_SPILLED_BODY_BYTES`] while each upload holds little memory. Default none: bodies
    /// read ahead are held in memory.
    pub request_buffer_dir: Option<std::path::PathBuf>,
    /// Response bodies are read ahead of the client, up to this many bytes, by a task of their
    /// own (nginx's `proxy_buffering`): a response that fits is read from the upstream at the
    /// upstream's pace, not a slow client's, so the backend worker that wrote it is free at
    /// once and its HTTP/1.1 connection goes back to the pool. Frames are passed on as they
    /// come (server-sent events are not held back). Default 0: the upstream is read at the
    /// client's pace. At most [`MAX_RETRY_BODY_BYTES`]: it is memory.
    pub response_buffer_bytes: u64,
    /// Retries allowed as a fraction of requests (the retry budget). Default 0.2.
    pub retry_budget_ratio: f64,
    /// Retries always allowed per second, whatever the ratio says. Default 10.
    pub retry_budget_min_per_second: u32,
    /// Header carrying the remaining budget in milliseconds: stamped on upstream requests, and
    /// read from trusted peers to shorten the deadline. Default `x-request-timeout-ms`; `None`
    /// disables both.
    pub budget_header: Option<String>,
    /// W3C trace context handling. Default [`TraceContext::Passthrough`].
    pub trace_context: TraceContext,
    /// Requests in flight on this route at once, all workers together; beyond it requests are
    /// shed with 503 and `Retry-After`. Default: none.
    pub max_in_flight: Option<NonZeroUsize>,
    /// Which requests get an access-log line. Default: all.
    pub access_log: AccessLogMode,
    /// The largest request body on this route, in place of its listener's
    /// `limits.max_body_bytes` (larger for an upload route, smaller for an API). Default: the
    /// listener's.
    pub max_body_bytes: Option<u64>,
    /// Requests each client may send on this route over time; none by default.
    pub rate_limit: Option<RateLimit>,
    /// The clients the route serves, by address or network; others are answered 403. Empty:
    /// every client. The client is the one `rate_limit` counts (behind `trusted_peers`, the
    /// address they forwarded).
    pub allow_clients: Vec<IpNet>,
    /// Clients the route answers 403, even those `allow_clients` lists. Empty by default.
    pub deny_clients: Vec<IpNet>,
    /// Compress responses for clients that accept it; off by default.
    pub compression: Option<Compression>,
    /// Answer every request with this fixed response instead of proxying it (then `upstream`
    /// is empty).
    pub respond: Option<Respond>,
    /// Spread the route's requests over several upstreams by weight instead of sending them to
    /// `upstream` (then empty): a canary release, a migration.
    pub split: Vec<SplitTarget>,
    /// With `split`: requests carrying this key (a user's cookie or header, the client's
    /// address) always go to the same upstream of the split, picked by weighted rendezvous
    /// hashing of the key over the upstreams' names, so that raising one weight moves keys only
    /// towards it. Requests without the key take the next turn. Default: none (every request
    /// takes the next turn).
    pub split_key: Option<HashKey>,
    /// Answer every request with this redirect instead of proxying it (then `upstream` is
    /// empty). None by default.
    pub redirect: Option<Redirect>,
    /// Methods the route is for; empty: any.
    pub methods: Vec<String>,
    /// Headers a request must carry for the route to match (name, value; `*`: any value);
    /// empty: none asked.
    pub match_headers: Vec<(String, String)>,
    /// Changes to the request's headers on the way upstream, made after tether's own (hop-by-hop
    /// removal, forwarding headers, request id). Default: none.
    pub request_headers: HeaderRules,
    /// Changes to the upstream's response headers on the way to the client. Default: none.
    pub response_headers: HeaderRules,
    /// Replaces the matched `path_prefix` in the path sent upstream (`"/"` strips it). Default:
    /// none, the path goes as it came.
    pub rewrite_prefix: Option<String>,
    /// The one path the route matches (the query aside), in place of `path_prefix`. Default:
    /// none.
    pub path_exact: Option<String>,
    /// A regular expression the whole path must match (the query aside), in place of
    /// `path_prefix`: `^/users/[0-9]+$` is implied by `/users/[0-9]+`. Linear-time matching
    /// (no backtracking), so no path can make it slow. Default: none.
    pub path_regex: Option<String>,
    /// With `path_exact` or `path_regex`: the path sent upstream instead, the query kept; with
    /// `path_regex`, `$1` or `${name}` stand for what a group matched. Default: none.
    pub rewrite_path: Option<String>,
    /// A copy of the route's requests (or of a share of them) sent to another upstream too, its
    /// answer read and dropped (shadow traffic). Default: none.
    pub mirror: Option<Mirror>,
    /// Each request is first put to an auth service, and goes on only when it answers 2xx
    /// (nginx's `auth_request`, Caddy's `forward_auth`, Envoy's HTTP `ext_authz`). Default:
    /// none.
    pub auth: Option<ForwardAuth>,
}

/// A route's auth service: see [`RouteConfig::auth`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuth {
    /// The upstream that answers.
    pub upstream: String,
    /// The path (and query) each check asks for.
    pub path: String,
    /// Headers of a 2xx answer that go on to the route's upstream (an authenticated user's id,
    /// say), in place of any the client sent of the same name, which never reach it.
    pub copy_headers: Vec<String>,
    /// Headers of a 2xx answer added to the client's response (a refreshed session cookie:
    /// `Set-Cookie`, what nginx passes with `auth_request_set`).
    pub client_headers: Vec<String>,
    /// Longest a check may take, connection included.
    pub timeout: Duration,
}

/// Headers an auth service's answer cannot pass on besides those no header rule may touch
/// ([`is_framing`](crate::proxy::headers::is_framing)): they describe the answer's own message.
const AUTH_ANSWER_ONLY: [http::HeaderName; 4] = [
    http::header::CONTENT_ENCODING,
    http::header::HOST,
    http::header::EXPECT,
    http::header::CONTENT_TYPE,
];

/// The default [`ForwardAuth::timeout`].
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a route's requests are mirrored: see [`RouteConfig::mirror`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// The upstream the copies go to.
    pub upstream: String,
    /// Requests mirrored in a million (chosen by request id, as `access_log_sample` chooses).
    pub per_million: u32,
    /// Copies in flight at once on the route, all workers together; beyond it requests are not
    /// mirrored, so a slow shadow cannot pile work up in tether.
    pub max_in_flight: u32,
}

/// The default [`Mirror::max_in_flight`].
pub const DEFAULT_MIRROR_IN_FLIGHT: u32 = 100;

/// Header changes a route makes: `remove` first, then `set`, then `add`. Names are
/// case-insensitive; values are sent as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    /// Headers removed, every value.
    pub remove: Vec<String>,
    /// Headers given this value, replacing any already there.
    pub set: Vec<(String, String)>,
    /// Values added, keeping any already there.
    pub add: Vec<(String, String)>,
}

impl HeaderRules {
    /// True when the rules change nothing.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// Per-route timeouts; `None` disables one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTimeouts {
    /// Total deadline from the request head's arrival to the end of the response body.
    pub total: Option<Duration>,
    /// TCP connect (and TLS handshake) to the upstream. Default 5 s.
    pub connect: Duration,
    /// From the request being sent to the response head. Default: none (the total deadline bounds it).
    pub first_byte: Option<Duration>,
    /// Longest gap between body chunks, either direction. Default: none.
    pub idle: Option<Duration>,
}

impl Default for RouteTimeouts {
    fn default() -> Self {
        RouteTimeouts {
            total: None,
            connect: Duration::from_secs(5),
            first_byte: None,
            idle: None,
        }
    }
}

/// A version of the PROXY protocol tether sends to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocolVersion {
    /// The text header.
    V1,
    /// The binary header.
    V2,
}

/// The protocol spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over cleartext, or over TLS when [`UpstreamConfig::tls`] is set.
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
}

impl UpstreamProtocol {
    /// The label used in logs: `http1`, `h2c` or `h2`.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
        }
    }

    /// True for the multiplexed protocols.
    pub fn is_h2(self) -> bool {
        !matches!(self, UpstreamProtocol::Http1)
    }
}

/// A `host:port` an upstream is reached at; the host may be a name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamAddress {
    /// Name or IP literal (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The one address of the name this endpoint stands for, when [`UpstreamConfig::discovery`]
    /// made each of the name's addresses an endpoint of its own: connections go there without
    /// a lookup, and TLS still names `host`. None for a configured address.
    pub pinned: Option<IpAddr>,
}

impl UpstreamAddress {
    /// `host:port`, resolved when connecting.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        UpstreamAddress {
            host: host.into(),
            port,
            pinned: None,
        }
    }

    /// `host:port` as a `Host` header writes it (IPv6 in brackets), without the pinned address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Whether the host is a name (not an IP literal).
    pub fn is_name(&self) -> bool {
        self.host.parse::<IpAddr>().is_err()
    }
}

impl fmt::Display for UpstreamAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.pinned {
            // `name/ip:port`: one endpoint per address of the name.
            return write!(f, "{}/{}", self.host, SocketAddr::new(ip, self.port));
        }
        f.write_str(&self.authority())
    }
}

impl From<SocketAddr> for UpstreamAddress {
    fn from(a: SocketAddr) -> Self {
        UpstreamAddress::new(a.ip().to_string(), a.port())
    }
}

/// An upstream whose names stand for as many endpoints as they have addresses (Envoy's
/// `STRICT_DNS`, HAProxy's `server-template`): each address is balanced, capped, counted and
/// health-checked on its own, and the names are looked up again every `interval`, endpoints
/// coming and going with the answers. A failed lookup keeps the addresses last found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discovery {
    /// How often the names are looked up again.
    pub interval: Duration,
    /// The names are SRV names (`_http._tcp.api.service.consul`), written without a port: each
    /// of their records names a host and port, its addresses the endpoints, the records'
    /// priorities and weights their order and shares. Otherwise their A and AAAA records are
    /// looked up, with the port written.
    pub srv: bool,
}

/// The shortest [`Discovery::interval`].
pub const MIN_DISCOVERY_INTERVAL: Duration = Duration::from_millis(100);

/// TLS towards an upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// SNI and the name the certificate must match; default: the address's host.
    pub server_name: Option<String>,
    /// Extra trust anchors (a private CA). When empty, the built-in web PKI roots are used.
    pub ca: Vec<CertificateDer<'static>>,
    /// Skip certificate verification. Off by default; for test setups only.
    pub insecure_skip_verify: bool,
    /// The client certificate presented to an upstream that asks for one (mutual TLS). None by
    /// default.
    pub client_cert: Option<ServerTls>,
}

/// A named group of upstream endpoints.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Name routes refer to.
    pub name: String,
    /// One or more endpoints; requests are spread over them.
    pub addresses: Vec<UpstreamAddress>,
    /// Protocol to speak.
    pub protocol: UpstreamProtocol,
    /// TLS settings; required for [`UpstreamProtocol::H2`], optional (enables TLS) for HTTP/1.
    pub tls: Option<UpstreamTls>,
    /// Idle keep-alive connections kept per endpoint and worker. Default 64.
    pub max_idle_per_endpoint: usize,
    /// How long an idle HTTP/1 connection is kept. Default 4 s, below Node's 5 s keep-alive.
    pub idle_timeout: Duration,
    /// Requests one connection carries before it is closed (nginx's `keepalive_requests`,
    /// Envoy's `max_requests_per_connection`; HTTP/2: streams started on it), so that
    /// long-lived connections do not pin an endpoint's traffic to one of the servers behind it.
    /// None by default.
    pub max_requests_per_connection: Option<std::num::NonZeroU32>,
    /// Longest a connection is used from its opening (nginx's `keepalive_time`, Envoy's
    /// `max_connection_duration`): an HTTP/1 connection past it is closed rather than pooled,
    /// an HTTP/2 one takes no new streams and closes once its last one ends. None by default.
    pub max_connection_age: Option<Duration>,
    /// Start every connection with a PROXY protocol header naming the client (HAProxy's
    /// `send-proxy`), for upstreams that learn the client's address from it. Such a connection
    /// carries only that client's requests: it is kept with the client's connection, not
    /// pooled, and closes with it. HTTP/1 only. None by default.
    pub proxy_protocol: Option<ProxyProtocolVersion>,
    /// Failed connection attempts in a row (DNS, connect or TLS: the endpoint never got the
    /// request) after which an endpoint is skipped for [`fail_timeout`](Self::fail_timeout).
    /// 0 never skips. Default 1. An upstream with one address never skips it.
    pub max_fails: u32,
    /// How long an endpoint is skipped after `max_fails` failed attempts. Default 10 s.
    pub fail_timeout: Duration,
    /// Response statuses that count as failures toward `max_fails` too (an endpoint that is up
    /// but failing, e.g. `[502, 503, 504]`); any other answer clears the count. Default none.
    pub fail_statuses: Vec<u16>,
    /// Active health checks of every endpoint; none by default (only the passive
    /// [`max_fails`](Self::max_fails)).
    pub health_check: Option<HealthCheck>,
    /// How each request's endpoint is chosen. Default round robin.
    pub balance: Balance,
    /// Each address's share of the requests, in the order of
    /// [`addresses`](Self::addresses); empty: every address weighs 1. Each from 1 to
    /// [`MAX_WEIGHT`].
    pub weights: Vec<u32>,
    /// Which of [`addresses`](Self::addresses) are backups (nginx's and HAProxy's `backup`),
    /// in their order; empty: none. A backup takes requests only while no other endpoint can:
    /// every one is skipped (`max_fails`), out of rotation (`health_check`) or full
    /// (`max_in_flight_per_endpoint`). Not with `hash` balancing.
    pub backups: Vec<bool>,
    /// An endpoint coming back (its health checks pass again, its `fail_timeout` skip ends) or
    /// new (added by a reload or by discovery) gets its share of requests gradually over this
    /// long, from a tenth of it to all of it (nginx's `slow_start`, HAProxy's `slowstart`), so
    /// that a cold server (empty caches, a JIT not warmed up) is not swamped. None by default.
    /// Not with `hash` balancing.
    pub slow_start: Option<Duration>,
    /// Requests in flight to each endpoint at once, all workers together (HAProxy's `maxconn`,
    /// nginx's `max_conns`). A full endpoint is passed over for one with room; when every one is
    /// full, a request waits its turn for up to [`queue_timeout`](Self::queue_timeout), then
    /// gets 503. None by default.
    pub max_in_flight_per_endpoint: Option<std::num::NonZeroU32>,
    /// How long a request may wait for room at a full endpoint. Default 5 s.
    pub queue_timeout: Duration,
    /// HTTP/2 upstreams: streams one connection carries at once before tether opens another to
    /// the same endpoint; the upstream's own `SETTINGS_MAX_CONCURRENT_STREAMS` counts too, once
    /// the connection has heard it (beyond it, requests would wait inside the connection).
    pub max_streams_per_connection: std::num::NonZeroU32,
    /// Each address a name in [`addresses`](Self::addresses) resolves to is an endpoint of its
    /// own, found again periodically. None by default: a name is one endpoint, its addresses
    /// raced when connecting.
    pub discovery: Option<Discovery>,
}

/// One upstream of a route's `split`, and its share of the requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitTarget {
    /// The upstream's name.
    pub upstream: String,
    /// Its share: requests go to each target in proportion to its weight, 0 to [`MAX_WEIGHT`]
    /// (0: none, while it stays in the configuration).
    pub weight: u32,
}

/// A route's fixed response (nginx's `return 503 "..."`, Caddy's `respond`, Envoy's
/// `direct_response`): for a maintenance page, a path that must never reach the upstream, or a
/// health check answered by tether itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Respond {
    /// The status: 200 to 599.
    pub status: u16,
    /// The body; empty for 204 and 304.
    pub body: String,
    /// The body's `Content-Type`.
    pub content_type: String,
}

impl Respond {
    /// A `status` response with `body` as plain UTF-8 text.
    pub fn new(status: u16, body: impl Into<String>) -> Respond {
        Respond {
            status,
            body: body.into(),
            content_type: "text/plain; charset=utf-8".into(),
        }
    }
}

/// A route's redirect: `Location` is `to` with `{host}` (the request's host, without a port),
/// `{path}` (its path) and `{uri}` (its path and query) filled in, e.g.
/// `https://{host}{uri}`; `status` is 301, 302, 303, 307 or 308.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The `Location` template.
    pub to: String,
    /// The status.
    pub status: u16,
}

impl Redirect {
    /// A permanent redirect that keeps the method (308) to `to`.
    pub fn new(to: impl Into<String>) -> Redirect {
        Redirect {
            to: to.into(),
            status: 308,
        }
    }
}

/// A per-client request rate: `requests` every `per` on average, and up to `burst` more at
/// once (nginx's `limit_req` with `nodelay`). A client is its address (IPv6: its /64), or for a
/// trusted peer the address it forwarded for; or, with a `key`, the key's value. Requests
/// beyond it are answered 429 with a `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per `per`.
    pub requests: u32,
    /// The period `requests` are counted over.
    pub per: Duration,
    /// Requests allowed at once beyond the steady rate.
    pub burst: u32,
    /// Requests beyond `burst` that wait for their turn at the steady rate instead of being
    /// refused (nginx's `limit_req` `burst` without `nodelay`). 0: none wait.
    pub queue: u32,
    /// What the requests are counted by, when not the client's address: an API key's header, a
    /// session cookie, the path. A request without it is counted by its client's address.
    pub key: Option<HashKey>,
}

/// Response compression on a route (nginx's `gzip`, Caddy's `encode`): a response is compressed
/// with the first of `encodings` the client accepts (by its `Accept-Encoding` q-values) when
/// its type is among `types`, it is not already encoded, and it is not declared smaller than
/// `min_bytes`. Each chunk is compressed as it arrives and flushed, so streams stay streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    /// Content codings offered, in tether's order of preference. At least one.
    pub encodings: Vec<ContentCoding>,
    /// Media types compressed: `type/subtype`, or `type/*`; lower case, compared without
    /// parameters.
    pub types: Vec<String>,
    /// Responses whose `Content-Length` is below this are sent as they are.
    pub min_bytes: u64,
}

impl Default for Compression {
    fn default() -> Compression {
        Compression {
            encodings: vec![ContentCoding::Brotli, ContentCoding::Gzip],
            types: DEFAULT_COMPRESSED_TYPES
                .iter()
                .map(|t| (*t).to_owned())
                .collect(),
            min_bytes: 1024,
        }
    }
}

/// Text types compressed by default.
pub const DEFAULT_COMPRESSED_TYPES: &[&str] = &[
    "text/html",
    "text/css",
    "text/plain",
    "text/javascript",
    "text/xml",
    "text/csv",
    "text/markdown",
    "application/javascript",
    "application/json",
    "application/xml",
    "application/wasm",
    "application/manifest+json",
    "application/ld+json",
    "image/svg+xml",
];

/// A content coding tether can compress with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentCoding {
    /// `br` (RFC 7932).
    Brotli,
    /// `gzip` (RFC 1952).
    Gzip,
    /// `zstd` (RFC 8878).
    Zstd,
}

impl ContentCoding {
    /// The coding's token in `Accept-Encoding` and `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            ContentCoding::Brotli => "br",
            ContentCoding::Gzip => "gzip",
            ContentCoding::Zstd => "zstd",
        }
    }
}

/// The most clients one route's rate limit keeps track of at once. Clients that have used none
/// of their allowance hold no place; when the table is full anyway, the counts of an arbitrary
/// eighth of its clients are forgotten.
pub const RATE_LIMIT_CLIENTS: usize = 100_000;

/// The largest endpoint weight.
pub const MAX_WEIGHT: u32 = 100;

/// How an upstream's endpoint is chosen for a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Balance {
    /// In turn, each endpoint as often as its weight says (smooth weighted round robin, as
    /// nginx's).
    #[default]
    RoundRobin,
    /// The endpoint with the fewest requests in flight for its weight, counted over every
    /// worker (nginx's `least_conn` rule); ties are broken by the weighted turns.
    LeastRequests,
    /// The same endpoint for the same key (session affinity): weighted rendezvous hashing of
    /// the key, so that an endpoint leaving or coming back moves only its own share of keys.
    /// Requests without the key go in turn.
    Hash(HashKey),
}

/// What a [`Balance::Hash`] upstream hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's address (IPv6: its /64), or behind a trusted proxy the address it forwarded
    /// for, as a rate limit counts clients.
    ClientIp,
    /// A request header's value (lowercase name).
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The request's path (without the query).
    Path,
}

impl Balance {
    /// The name used in the configuration file: `round_robin`, `least_requests` or `hash`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastRequests => "least_requests",
            Balance::Hash(_) => "hash",
        }
    }
}

/// Active health checks: every `interval`, each endpoint gets `GET path` on a connection of its
/// own. An endpoint is taken out of rotation after `unhealthy_after` failed checks in a row (no
/// connection, no answer within `timeout`, a status not in `expect_status`, or a body without
/// `expect_body`) and put back after `healthy_after` passed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path (and query) requested.
    pub path: String,
    /// Between the end of one check and the start of the next.
    pub interval: Duration,
    /// Longest a check may take, connection included.
    pub timeout: Duration,
    /// Failed checks in a row that take an endpoint out.
    pub unhealthy_after: u32,
    /// Passed checks in a row that put it back.
    pub healthy_after: u32,
    /// Statuses that pass, as inclusive ranges; empty: 200–399.
    pub expect_status: Vec<RangeInclusive<u16>>,
    /// Text the response body must contain, looked for in its first
    /// [`HEALTH_BODY_LIMIT`] bytes; `None`: the body is not read.
    pub expect_body: Option<String>,
    /// Headers each check sends (name, value), replacing tether's own (`User-Agent`); `host`
    /// sets the `Host`, or `:authority` over HTTP/2.
    pub headers: Vec<(String, String)>,
    /// A gRPC health check instead (`grpc.health.v1.Health/Check`, HTTP/2 upstreams): the
    /// service asked about, `""` for the server as a whole. Passes when it is `SERVING`.
    pub grpc: Option<String>,
}

/// How much of a health check's response body is searched for
/// [`HealthCheck::expect_body`].
pub const HEALTH_BODY_LIMIT: usize = 64 * 1024;

impl HealthCheck {
    /// Checks of `path` every 5 s with a 2 s timeout, 2 failures out and 2 passes back.
    pub fn new(path: impl Into<String>) -> HealthCheck {
        HealthCheck {
            path: path.into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            unhealthy_after: 2,
            healthy_after: 2,
            expect_status: Vec::new(),
            expect_body: None,
            headers: Vec::new(),
            grpc: None,
        }
    }

    /// A gRPC health check of `service` (`""`: the whole server), with the defaults of
    /// [`new`](Self::new).
    pub fn grpc(service: impl Into<String>) -> HealthCheck {
        HealthCheck {
            grpc: Some(service.into()),
            ..HealthCheck::new(crate::grpc::HEALTH_CHECK_PATH)
        }
    }

    /// Whether a check answered `status` passes on its status.
    pub fn status_passes(&self, status: u16) -> bool {
        if self.expect_status.is_empty() {
            return (200..=399).contains(&status);
        }
        self.expect_status.iter().any(|r| r.contains(&status))
    }

    /// The checks' header changes, validated as a route's `request_headers` `set` rules are.
    pub fn header_rules(&self) -> Result<crate::proxy::headers::Rewrite, String> {
        let rules = HeaderRules {
            set: self.headers.clone(),
            ..HeaderRules::default()
        };
        crate::proxy::headers::Rewrite::request(&rules, None)
    }
}

/// The default of [`UpstreamConfig::max_streams_per_connection`]: the fewest streams RFC 9113
/// (6.5.2) recommends a server allow.
pub const DEFAULT_H2_STREAMS_PER_CONNECTION: std::num::NonZeroU32 =
    match std::num::NonZeroU32::new(100) {
        Some(n) => n,
        None => std::num::NonZeroU32::MIN,
    };

impl UpstreamConfig {
    /// The limits on an upstream connection's use.
    pub fn lifetime(&self) -> crate::lifetime::Lifetime {
        crate::lifetime::Lifetime {
            max_requests: self.max_requests_per_connection,
            max_age: self.max_connection_age,
        }
    }

    /// Whether connections made for `self` may serve `other` too: the same protocol, TLS and
    /// PROXY protocol settings, and the same pool settings. A reload keeps an endpoint's pooled
    /// connections when they may.
    pub fn connects_like(&self, other: &UpstreamConfig) -> bool {
        self.protocol == other.protocol
            && self.tls == other.tls
            && self.proxy_protocol == other.proxy_protocol
            && self.max_idle_per_endpoint == other.max_idle_per_endpoint
            && self.idle_timeout == other.idle_timeout
            && self.max_requests_per_connection == other.max_requests_per_connection
            && self.max_connection_age == other.max_connection_age
    }

    /// Whether any address is a backup.
    pub fn has_backups(&self) -> bool {
        self.backups.iter().any(|&b| b)
    }

    /// Whether requests in flight to each endpoint are counted (for `least_requests`, or a cap).
    pub fn counts_in_flight(&self) -> bool {
        self.balance == Balance::LeastRequests || self.max_in_flight_per_endpoint.is_some()
    }

    /// An upstream with default pool settings.
    pub fn new(
        name: impl Into<String>,
        addresses: Vec<UpstreamAddress>,
        protocol: UpstreamProtocol,
    ) -> Self {
        UpstreamConfig {
            name: name.into(),
            addresses,
            protocol,
            tls: None,
            max_idle_per_endpoint: 64,
            max_in_flight_per_endpoint: None,
            queue_timeout: Duration::from_secs(5),
            max_streams_per_connection: DEFAULT_H2_STREAMS_PER_CONNECTION,
            idle_timeout: Duration::from_secs(4),
            max_requests_per_connection: None,
            max_connection_age: None,
            proxy_protocol: None,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            fail_statuses: Vec::new(),
            health_check: None,
            balance: Balance::RoundRobin,
            weights: Vec::new(),
            backups: Vec::new(),
            slow_start: None,
            discovery: None,
        }
    }
}

impl RouteConfig {
    /// A route matching every host under `path_prefix`, with default timeouts and policy.
    pub fn new(path_prefix: impl Into<String>, upstream: impl Into<String>) -> Self {
        let upstream = upstream.into();
        RouteConfig {
            name: upstream.clone(),
            hosts: Vec::new(),
            path_prefix: path_prefix.into(),
            upstream,
            timeouts: RouteTimeouts::default(),
            client_half_close: HalfClose::Abort,
            max_retries: 2,
            retry_statuses: Vec::new(),
            retry_body_bytes: DEFAULT_RETRY_BODY_BYTES,
            request_buffer_bytes: 0,
            request_buffer_dir: None,
            response_buffer_bytes: 0,
            retry_budget_ratio: 0.2,
            retry_budget_min_per_second: 10,
            budget_header: Some(tether::budget::DEFAULT_BUDGET_HEADER.to_owned()),
            trace_context: TraceContext::Passthrough,
            access_log: AccessLogMode::All,
            max_in_flight: None,
            max_body_bytes: None,
            rate_limit: None,
            allow_clients: Vec::new(),
            deny_clients: Vec::new(),
            compression: None,
            respond: None,
            split: Vec::new(),
            split_key: None,
            redirect: None,
            methods: Vec::new(),
            match_headers: Vec::new(),
            request_headers: HeaderRules::default(),
            response_headers: HeaderRules::default(),
            rewrite_prefix: None,
            path_exact: None,
            path_regex: None,
            rewrite_path: None,
            mirror: None,
            auth: None,
        }
    }
}

/// A configuration that cannot run. `key` is the dotted path of the offending setting, in the
/// TOML file's terms (`listeners[0].routes[1].upstream`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// Dotted path of the setting at fault.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl Config {
    /// Checks the cross-references and values the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(ConfigError::new(
                "listeners",
                "at least one listener is required",
            ));
        }
        let mut names = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = format!("upstreams[{i}]");
            if u.name.is_empty() {
                return Err(ConfigError::new(format!("{key}.name"), "must not be empty"));
            }
            if !names.insert(u.name.as_str()) {
                return Err(ConfigError::new(
                    format!("{key}.name"),
                    format!("duplicate upstream name {:?}", u.name),
                ));
            }
            if u.addresses.is_empty() {
                return Err(ConfigError::new(
                    format!("{key}.addresses"),
                    "at least one address is required",
                ));
            }
            validate_ports(&key, u)?;
            if u.protocol == UpstreamProtocol::H2 && u.tls.is_none() {
                return Err(ConfigError::new(
                    format!("{key}.protocol"),
                    "\"h2\" is HTTP/2 over TLS and needs a tls table (use \"h2c\" for cleartext)",
                ));
            }
            if u.protocol == UpstreamProtocol::H2c && u.tls.is_some() {
                return Err(ConfigError::new(
                    format!("{key}.tls"),
                    "\"h2c\" is cleartext; use protocol = \"h2\" for HTTP/2 over TLS",
                ));
            }
            if let Some(h) = &u.health_check {
                validate_health_check(&format!("{key}.health_check"), h)?;
                if h.grpc.is_some() && !u.protocol.is_h2() {
                    return Err(ConfigError::new(
                        format!("{key}.health_check.grpc_service"),
                        "gRPC runs over HTTP/2: only with protocol = \"h2\" or \"h2c\"",
                    ));
                }
            }
            one_per_address(&key, "weights", u.weights.len(), u.addresses.len())?;
            if let Balance::Hash(k) = &u.balance {
                validate_hash_key(&format!("{key}.hash_key"), k)?;
            }
            if let Some(d) = u.slow_start {
                if d.is_zero() || d > MAX_SLOW_START {
                    return Err(ConfigError::new(
                        format!("{key}.slow_start"),
                        "must be from 1ms to 1h",
                    ));
                }
                if matches!(u.balance, Balance::Hash(_)) {
                    return Err(ConfigError::new(
                        format!("{key}.slow_start"),
                        "\"hash\" keeps each key on its endpoint, and ramping one up would move keys: use \"round_robin\" or \"least_requests\", or no slow start",
                    ));
                }
            }
            one_per_address(&key, "backups", u.backups.len(), u.addresses.len())?;
            if u.has_backups() {
                if u.backups.iter().all(|&b| b) {
                    return Err(ConfigError::new(
                        format!("{key}.addresses"),
                        "every address is a backup: at least one must not be",
                    ));
                }
                if matches!(u.balance, Balance::Hash(_)) {
                    return Err(ConfigError::new(
                        format!("{key}.balance"),
                        "\"hash\" keeps each key on its endpoint and has no use for backups: use \"round_robin\" or \"least_requests\", or no backup",
                    ));
                }
            }
            if u.proxy_protocol.is_some() && u.protocol.is_h2() {
                return Err(ConfigError::new(
                    format!("{key}.proxy_protocol"),
                    "only with protocol = \"http1\": an HTTP/2 connection carries many clients' requests, and a PROXY header names one",
                ));
            }
            validate_age(&key, u.max_connection_age)?;
            if u.discovery
                .is_some_and(|d| d.interval < MIN_DISCOVERY_INTERVAL)
            {
                return Err(ConfigError::new(
                    format!("{key}.discovery_interval"),
                    "must be at least 100ms",
                ));
            }
            if u.discovery.is_some() && !u.addresses.iter().any(UpstreamAddress::is_name) {
                return Err(ConfigError::new(
                    format!("{key}.discovery"),
                    "finds the addresses of names, and every address here is an IP address",
                ));
            }
            if let Some(j) = u
                .fail_statuses
                .iter()
                .position(|s| !(100..=599).contains(s))
            {
                return Err(ConfigError::new(
                    format!("{key}.fail_statuses[{j}]"),
                    "must be a status from 100 to 599",
                ));
            }
            if let Some(j) = u.weights.iter().position(|w| !(1..=MAX_WEIGHT).contains(w)) {
                return Err(ConfigError::new(
                    format!("{key}.weights[{j}]"),
                    format!("must be from 1 to {MAX_WEIGHT}"),
                ));
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("listeners[{i}]");
            if !l.protocols.http1 && !l.protocols.h2 {
                return Err(ConfigError::new(
                    format!("{key}.protocols"),
                    "at least one protocol is required",
                ));
            }
            validate_listener_limits(&key, l)?;
            if let Some(tls) = &l.tls {
                if tls.certificates.iter().any(|c| c.cert_chain.is_empty())
                    || tls.certificates.is_empty()
                {
                    return Err(ConfigError::new(
                        format!("{key}.tls"),
                        "at least one certificate, each with its chain, is required",
                    ));
                }
                if tls.client_auth.as_ref().is_some_and(|c| c.ca.is_empty()) {
                    return Err(ConfigError::new(
                        format!("{key}.tls.client_ca"),
                        "at least one trust anchor is required to verify clients",
                    ));
                }
            }
            if l.routes.is_empty() {
                return Err(ConfigError::new(
                    format!("{key}.routes"),
                    "at least one route is required",
                ));
            }
            for (j, r) in l.routes.iter().enumerate() {
                let rkey = format!("{key}.routes[{j}]");
                if !r.path_prefix.starts_with('/') {
                    return Err(ConfigError::new(
                        format!("{rkey}.path_prefix"),
                        format!("{:?} must start with '/'", r.path_prefix),
                    ));
                }
                if r.split_key.is_some() && r.split.is_empty() {
                    return Err(ConfigError::new(
                        format!("{rkey}.split_key"),
                        "keeps a key's requests on one upstream of a split: the route has no split",
                    ));
                }
                if !r.split.is_empty() {
                    let skey = format!("{rkey}.split");
                    if !r.upstream.is_empty() || r.redirect.is_some() || r.respond.is_some() {
                        return Err(ConfigError::new(
                            skey,
                            "a route proxies to an upstream, splits, redirects or responds: one of them",
                        ));
                    }
                    for (k, t) in r.split.iter().enumerate() {
                        if !names.contains(t.upstream.as_str()) {
                            return Err(ConfigError::new(
                                format!("{skey}[{k}].upstream"),
                                format!("no upstream named {:?}", t.upstream),
                            ));
                        }
                        if r.split[..k].iter().any(|o| o.upstream == t.upstream) {
                            return Err(ConfigError::new(
                                format!("{skey}[{k}].upstream"),
                                format!("{:?} is already in the split", t.upstream),
                            ));
                        }
                        if t.weight > MAX_WEIGHT {
                            return Err(ConfigError::new(
                                format!("{skey}[{k}].weight"),
                                format!("must be from 0 to {MAX_WEIGHT}"),
                            ));
                        }
                    }
                    if let Some(k) = &r.split_key {
                        validate_hash_key(&format!("{rkey}.split_key"), k)?;
                    }
                    if r.split.iter().all(|t| t.weight == 0) {
                        return Err(ConfigError::new(
                            skey,
                            "at least one weight must be above 0",
                        ));
                    }
                }
                if let Some(respond) = &r.respond {
                    if !r.upstream.is_empty() || r.redirect.is_some() {
                        return Err(ConfigError::new(
                            format!("{rkey}.respond"),
                            "a route proxies to an upstream, redirects or responds: one of them",
                        ));
                    }
                    crate::route::FixedResponse::parse(respond)
                        .map_err(|e| ConfigError::new(format!("{rkey}.respond"), e))?;
                }
                match &r.redirect {
                    Some(redirect) => {
                        if !r.upstream.is_empty() {
                            return Err(ConfigError::new(
                                format!("{rkey}.redirect"),
                                "a route either proxies to an upstream or redirects, not both",
                            ));
                        }
                        crate::route::RedirectTemplate::parse(redirect)
                            .map_err(|e| ConfigError::new(format!("{rkey}.redirect"), e))?;
                    }
                    None if r.respond.is_some() || !r.split.is_empty() => {}
                    None if !names.contains(r.upstream.as_str()) => {
                        return Err(ConfigError::new(
                            format!("{rkey}.upstream"),
                            format!("no upstream named {:?}", r.upstream),
                        ));
                    }
                    None => {}
                }
                if let Some(h) = &r.budget_header
                    && http::header::HeaderName::from_bytes(h.as_bytes()).is_err()
                {
                    return Err(ConfigError::new(
                        format!("{rkey}.budget_header"),
                        format!("{h:?} is not a valid header name"),
                    ));
                }
                if let Some(p) = &r.rewrite_prefix
                    && !is_plain_path(p)
                {
                    return Err(ConfigError::new(
                        format!("{rkey}.rewrite_prefix"),
                        format!("{p:?} must be a path starting with '/', without a query"),
                    ));
                }
                validate_path_rule(&rkey, r)?;
                for h in &r.hosts {
                    validate_host(&rkey, h)?;
                }
                if let Some(m) = &r.mirror {
                    let mkey = format!("{rkey}.mirror");
                    self.validate_side_upstream(&mkey, r, &m.upstream, "mirror")?;
                    if !(1..=1_000_000).contains(&m.per_million) {
                        return Err(ConfigError::new(
                            format!("{mkey}.share"),
                            "must be above 0 and at most 1",
                        ));
                    }
                    if m.max_in_flight == 0 {
                        return Err(ConfigError::new(
                            format!("{mkey}.max_in_flight"),
                            "must be at least 1",
                        ));
                    }
                }
                if let Some(a) = &r.auth {
                    self.validate_auth(&rkey, r, a)?;
                }
                let spills = r.request_buffer_dir.is_some();
                for (name, bytes, spills) in [
                    ("retry_body_bytes", r.retry_body_bytes, false),
                    ("request_buffer_bytes", r.request_buffer_bytes, spills),
                    ("response_buffer_bytes", r.response_buffer_bytes, false),
                ] {
                    if spills && bytes > MAX_SPILLED_BODY_BYTES {
                        return Err(ConfigError::new(
                            format!("{rkey}.{name}"),
                            format!("must be at most {MAX_SPILLED_BODY_BYTES} (4 GiB)"),
                        ));
                    }
                    if !spills && bytes > MAX_RETRY_BODY_BYTES {
                        let dir = if name == "request_buffer_bytes" {
                            " (a request_buffer_dir takes bodies past their first MiB)"
                        } else {
                            ""
                        };
                        return Err(ConfigError::new(
                            format!("{rkey}.{name}"),
                            format!(
                                "must be at most {MAX_RETRY_BODY_BYTES} (16 MiB): it is held in memory{dir}"
                            ),
                        ));
                    }
                }
                if spills && r.request_buffer_bytes == 0 {
                    return Err(ConfigError::new(
                        format!("{rkey}.request_buffer_dir"),
                        "holds bodies read ahead, and request_buffer_bytes reads none",
                    ));
                }
                if let AccessLogMode::Sampled { per_million } = r.access_log
                    && !(1..=1_000_000).contains(&per_million)
                {
                    return Err(ConfigError::new(
                        format!("{rkey}.access_log"),
                        "a sample must log from 1 to 1 000 000 successful requests in a million",
                    ));
                }
                if let Some(rl) = &r.rate_limit {
                    validate_rate_limit(&format!("{rkey}.rate_limit"), rl)?;
                }
                if let Some(c) = &r.compression {
                    validate_compression(&format!("{rkey}.compression"), c)?;
                }
                if let Err(e) = crate::route::check_condition(&r.methods, &[]) {
                    return Err(ConfigError::new(format!("{rkey}.methods"), e));
                }
                if let Err(e) = crate::route::check_condition(&[], &r.match_headers) {
                    return Err(ConfigError::new(format!("{rkey}.match_headers"), e));
                }
                let budget = r.budget_header.as_deref();
                crate::proxy::headers::Rewrite::request(&r.request_headers, budget)
                    .map_err(|e| ConfigError::new(format!("{rkey}.request_headers"), e))?;
                crate::proxy::headers::Rewrite::response(&r.response_headers)
                    .map_err(|e| ConfigError::new(format!("{rkey}.response_headers"), e))?;
                if !(0.0..=1000.0).contains(&r.retry_budget_ratio) {
                    return Err(ConfigError::new(
                        format!("{rkey}.retry_budget"),
                        "must be a fraction between 0 and 1000",
                    ));
                }
                if let Some(s) = r.retry_statuses.iter().find(|s| !(500..=599).contains(*s)) {
                    return Err(ConfigError::new(
                        format!("{rkey}.retry_statuses"),
                        format!("{s} is not a 5xx status"),
                    ));
                }
                if r.timeouts.connect.is_zero() {
                    return Err(ConfigError::new(
                        format!("{rkey}.connect_timeout"),
                        "must be greater than zero",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The upstream `name` that route `r` sends requests of tether's own to (to `what` them: a
    /// mirror's copies, an auth service's checks): the route proxies, the upstream exists, and
    /// its connections name no client (they carry no one client's requests).
    fn validate_side_upstream(
        &self,
        key: &str,
        r: &RouteConfig,
        name: &str,
        what: &str,
    ) -> Result<(), ConfigError> {
        if r.redirect.is_some() || r.respond.is_some() {
            return Err(ConfigError::new(
                key,
                format!("only a route that proxies has requests to {what}"),
            ));
        }
        let Some(u) = self.upstreams.iter().find(|u| u.name == name) else {
            return Err(ConfigError::new(
                format!("{key}.upstream"),
                format!("no upstream named {name:?}"),
            ));
        };
        if u.proxy_protocol.is_some() {
            return Err(ConfigError::new(
                format!("{key}.upstream"),
                format!("its connections name a client (proxy_protocol): {what} with another"),
            ));
        }
        Ok(())
    }

    /// A route's `auth`: an upstream tether can name no client to, a path, header names a
    /// request may carry, a timeout.
    fn validate_auth(
        &self,
        rkey: &str,
        r: &RouteConfig,
        a: &ForwardAuth,
    ) -> Result<(), ConfigError> {
        let akey = format!("{rkey}.auth");
        self.validate_side_upstream(&akey, r, &a.upstream, "check")?;
        if !a.path.starts_with('/')
            || a.path.contains('#')
            || PathAndQuery::try_from(a.path.as_str()).is_err()
        {
            return Err(ConfigError::new(
                format!("{akey}.path"),
                format!(
                    "{:?} must be a path starting with '/' (a query may follow)",
                    a.path
                ),
            ));
        }
        for (list, names) in [
            ("copy_headers", &a.copy_headers),
            ("client_headers", &a.client_headers),
        ] {
            for h in names {
                let name = crate::proxy::headers::header_name(h)
                    .map_err(|why| ConfigError::new(format!("{akey}.{list}"), why))?;
                // Headers about the message or the connection are tether's to set.
                if crate::proxy::headers::is_framing(&name) || AUTH_ANSWER_ONLY.contains(&name) {
                    return Err(ConfigError::new(
                        format!("{akey}.{list}"),
                        format!("{h:?} describes the message or its connection, not the client"),
                    ));
                }
            }
        }
        if a.timeout.is_zero() {
            return Err(ConfigError::new(
                format!("{akey}.timeout"),
                "must be above zero",
            ));
        }
        Ok(())
    }
}

fn validate_compression(key: &str, c: &Compression) -> Result<(), ConfigError> {
    if c.encodings.is_empty() {
        return Err(ConfigError::new(
            format!("{key}.encodings"),
            "at least one encoding is required",
        ));
    }
    for (i, t) in c.types.iter().enumerate() {
        let ok = t.split_once('/').is_some_and(|(ty, sub)| {
            let token = |s: &str| {
                !s.is_empty()
                    && s.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$&-^_.+".contains(&b)
                    })
            };
            token(ty) && (sub == "*" || token(sub))
        });
        if !ok {
            return Err(ConfigError::new(
                format!("{key}.types[{i}]"),
                format!("{t:?} is not a lower-case media type (\"text/html\", \"text/*\")"),
            ));
        }
    }
    Ok(())
}

/// A connection's `max_connection_age` (upstream or client side) must be above zero.
fn validate_age(key: &str, age: Option<Duration>) -> Result<(), ConfigError> {
    if age.is_some_and(|a| a.is_zero()) {
        return Err(ConfigError::new(
            format!("{key}.max_connection_age"),
            "must be greater than zero; omit it to keep connections as long as they work",
        ));
    }
    Ok(())
}

fn validate_rate_limit(key: &str, rl: &RateLimit) -> Result<(), ConfigError> {
    if rl.requests == 0 {
        return Err(ConfigError::new(
            format!("{key}.requests"),
            "must be at least 1 (to refuse a route, leave it out)",
        ));
    }
    if rl.per.is_zero() {
        return Err(ConfigError::new(
            format!("{key}.per"),
            "must be greater than zero",
        ));
    }
    if rl.per > Duration::from_secs(24 * 3600) {
        return Err(ConfigError::new(
            format!("{key}.per"),
            "must be at most 24h",
        ));
    }
    if rl.burst > 1_000_000 {
        return Err(ConfigError::new(
            format!("{key}.burst"),
            "must be at most 1000000",
        ));
    }
    if rl.queue > 1_000_000 {
        return Err(ConfigError::new(
            format!("{key}.queue"),
            "must be at most 1000000",
        ));
    }
    if let Some(k) = &rl.key {
        validate_hash_key(&format!("{key}.key"), k)?;
    }
    Ok(())
}

/// A hashed key's header or cookie name must be a token (the characters of a header name);
/// an empty or malformed one would key nothing. One check for every place a key is named
/// (an upstream's `hash_key`, a split's `split_key`, a rate limit's `key`).
fn validate_hash_key(key: &str, k: &HashKey) -> Result<(), ConfigError> {
    let (name, what) = match k {
        HashKey::Header(name) => (name, "header"),
        HashKey::Cookie(name) => (name, "cookie"),
        HashKey::ClientIp | HashKey::Path => return Ok(()),
    };
    if http::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(ConfigError::new(
            key,
            format!("{name:?} is not a {what} name"),
        ));
    }
    Ok(())
}

fn validate_health_check(key: &str, h: &HealthCheck) -> Result<(), ConfigError> {
    if h.grpc.is_some() {
        // A gRPC check passes on SERVING alone.
        if !h.expect_status.is_empty() || h.expect_body.is_some() {
            let which = if h.expect_body.is_some() {
                "expect_body"
            } else {
                "expect_status"
            };
            return Err(ConfigError::new(
                format!("{key}.{which}"),
                "not used by a gRPC health check, which passes when the service is SERVING",
            ));
        }
    }
    if !h.path.starts_with('/') || PathAndQuery::try_from(h.path.as_str()).is_err() {
        return Err(ConfigError::new(
            format!("{key}.path"),
            format!("{:?} must be a path starting with '/'", h.path),
        ));
    }
    for (name, d) in [("interval", h.interval), ("timeout", h.timeout)] {
        if d.is_zero() {
            return Err(ConfigError::new(
                format!("{key}.{name}"),
                "must be greater than zero",
            ));
        }
    }
    for (name, n) in [
        ("unhealthy_after", h.unhealthy_after),
        ("healthy_after", h.healthy_after),
    ] {
        if n == 0 {
            return Err(ConfigError::new(
                format!("{key}.{name}"),
                "must be at least 1",
            ));
        }
    }
    for (j, r) in h.expect_status.iter().enumerate() {
        if *r.start() < 100 || *r.end() > 599 || r.is_empty() {
            return Err(ConfigError::new(
                format!("{key}.expect_status[{j}]"),
                "must be a status from 100 to 599, or a class from \"1xx\" to \"5xx\"",
            ));
        }
    }
    if h.expect_body.as_ref().is_some_and(String::is_empty) {
        return Err(ConfigError::new(
            format!("{key}.expect_body"),
            "must not be empty",
        ));
    }
    h.header_rules()
        .map_err(|e| ConfigError::new(format!("{key}.headers"), e))?;
    Ok(())
}

fn validate_listener_limits(key: &str, l: &ListenerConfig) -> Result<(), ConfigError> {
    let lim = &l.limits;
    let lkey = format!("{key}.limits");
    if lim.max_header_bytes < 8192 {
        return Err(ConfigError::new(
            format!("{lkey}.max_header_bytes"),
            "must be at least 8192",
        ));
    }
    if lim.max_header_bytes > u32::MAX as usize {
        return Err(ConfigError::new(
            format!("{lkey}.max_header_bytes"),
            "must fit in 32 bits",
        ));
    }
    if lim.backlog == 0 || lim.backlog > i32::MAX as u32 {
        return Err(ConfigError::new(
            format!("{lkey}.backlog"),
            "must be between 1 and 2147483647",
        ));
    }
    if lim.header_read_timeout.is_zero() {
        return Err(ConfigError::new(
            format!("{lkey}.header_read_timeout"),
            "must be greater than zero",
        ));
    }
    if lim.park_idle_after.is_some_and(|d| d < MIN_PARK_IDLE_AFTER) {
        return Err(ConfigError::new(
            format!("{lkey}.park_idle_after"),
            "must be at least 100ms; write \"off\" to never park",
        ));
    }
    validate_age(&lkey, lim.max_connection_age)?;
    if lim.h2_max_concurrent_streams == 0 {
        return Err(ConfigError::new(
            format!("{lkey}.h2_max_concurrent_streams"),
            "must be at least 1",
        ));
    }
    if let Some(b) = lim.h2_reset_budget
        && b.burst == 0
    {
        return Err(ConfigError::new(
            format!("{lkey}.h2_reset_budget"),
            "burst must be at least 1; write \"off\" to disable",
        ));
    }
    let dp = &l.dead_peer;
    if let Some(k) = dp.tcp_keepalive
        && (k.idle < Duration::from_secs(1) || k.interval < Duration::from_secs(1) || k.probes == 0)
    {
        return Err(ConfigError::new(
            format!("{key}.dead_peer"),
            "keepalive idle and interval must be at least 1s (the kernel counts whole seconds), probes at least 1",
        ));
    }
    if dp.h2_ping_timeout.is_zero() {
        return Err(ConfigError::new(
            format!("{key}.dead_peer.h2_ping_timeout"),
            "must be greater than zero",
        ));
    }
    Ok(())
}

/// Shared, immutable configuration handed to every worker.
pub type SharedConfig = Arc<Config>;

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config {
            workers: None,
            admin: None,
            dns: Default::default(),
            listeners: vec![ListenerConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                vec![RouteConfig::new("/", "app")],
            )],
            upstreams: vec![UpstreamConfig::new(
                "app",
                vec!["127.0.0.1:9000".parse::<SocketAddr>().unwrap().into()],
                UpstreamProtocol::Http1,
            )],
        }
    }

    #[test]
    fn valid_config_passes() {
        base().validate().unwrap();
    }

    #[test]
    fn unknown_upstream_names_the_key() {
        let mut c = base();
        c.listeners[0].routes[0].upstream = "nope".into();
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "listeners[0].routes[0].upstream");
    }

    #[test]
    fn ip_networks() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        let one: IpNet = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        let mapped: IpNet = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(mapped.contains("10.1.2.3".parse().unwrap()));
        assert!(mapped.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!mapped.contains("11.1.2.3".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nope".parse::<IpNet>().is_err());
    }

    #[test]
    fn fuzz_smoke_ip_networks() {
        // Fixed-seed xorshift64*: valid networks mutated by inserting, replacing and truncating.
        let mut x = 0x5EED_0003u64;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let seeds = [
            "10.0.0.0/8",
            "::1",
            "fe80::1/64",
            "::ffff:1.2.3.4/96",
            "0.0.0.0/0",
            "1.2.3.4",
        ];
        let pieces = [
            "/",
            "//",
            ".",
            ":",
            "::",
            "0",
            "1",
            "255",
            "256",
            "32",
            "33",
            "128",
            "129",
            "ffff",
            "%",
            "-",
            "+",
            " ",
            "[",
            "]",
            "\u{e9}",
            "999999999999",
        ];
        for _ in 0..20_000 {
            let mut s = String::from(seeds[(next() % seeds.len() as u64) as usize]);
            for _ in 0..next() % 5 {
                let mut at = (next() % (s.len() as u64 + 1)) as usize;
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                match next() % 4 {
                    0 => s.truncate(at),
                    1 => {
                        let raw: Vec<u8> = (0..next() % 3).map(|_| next() as u8).collect();
                        s.insert_str(at, &String::from_utf8_lossy(&raw));
                    }
                    _ => s.insert_str(at, pieces[(next() % pieces.len() as u64) as usize]),
                }
            }
            let Ok(n) = s.parse::<IpNet>() else { continue };
            let max = if n.addr.is_ipv4() { 32 } else { 128 };
            assert!(n.prefix <= max, "{s:?}");
            assert!(n.contains(n.addr), "{s:?}");
            assert_eq!(format!("{}/{}", n.addr, n.prefix).parse(), Ok(n), "{s:?}");
            let probe = if next().is_multiple_of(2) {
                std::net::IpAddr::from((next() as u32).to_be_bytes())
            } else {
                std::net::IpAddr::from(
                    (u128::from(next()) << 64 | u128::from(next())).to_be_bytes(),
                )
            };
            let _ = n.contains(probe);
        }
    }

    #[test]
    fn a_sample_logs_its_share_of_successes_and_every_failure() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("{i:016x}")).collect();
        let logged = |per_million| {
            let mode = AccessLogMode::Sampled { per_million };
            ids.iter().filter(|id| mode.logs(200, true, id)).count()
        };
        assert_eq!(logged(1_000_000), 10_000);
        assert!(logged(1) <= 2, "{}", logged(1));
        let tenth = logged(100_000);
        assert!((800..=1200).contains(&tenth), "{tenth}");
        let mode = AccessLogMode::Sampled { per_million: 1 };
        assert!(
            ids.iter()
                .all(|id| mode.logs(502, false, id) && mode.logs(200, false, id))
        );
        // The same id, the same answer.
        let mode = AccessLogMode::Sampled {
            per_million: 500_000,
        };
        assert!(
            ids.iter()
                .all(|id| mode.logs(200, true, id) == mode.logs(200, true, id))
        );
        let mut c = Config::new(
            vec![ListenerConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                vec![RouteConfig::new("/", "up")],
            )],
            vec![UpstreamConfig::new(
                "up",
                vec![
                    "127.0.0.1:1"
                        .parse::<std::net::SocketAddr>()
                        .unwrap()
                        .into(),
                ],
                UpstreamProtocol::Http1,
            )],
        );
        for bad in [0, 1_000_001] {
            c.listeners[0].routes[0].access_log = AccessLogMode::Sampled { per_million: bad };
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, "listeners[0].routes[0].access_log", "{e:?}");
        }
    }

    #[test]
    fn h2_without_tls_is_rejected() {
        let mut c = base();
        c.upstreams[0].protocol = UpstreamProtocol::H2;
        assert_eq!(c.validate().unwrap_err().key, "upstreams[0].protocol");
    }

    #[test]
    fn weights_need_one_per_address_within_range() {
        let mut c = base();
        c.upstreams[0].weights = vec![2];
        c.validate().unwrap();
        c.upstreams[0].weights = vec![2, 3];
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "upstreams[0].weights");
        assert!(e.message.contains("2 weights for 1 addresses"), "{e:?}");
        for bad in [0, MAX_WEIGHT + 1] {
            c.upstreams[0].weights = vec![bad];
            assert_eq!(c.validate().unwrap_err().key, "upstreams[0].weights[0]");
        }
    }

    #[test]
    fn backups_need_one_flag_per_address_another_endpoint_and_no_hash() {
        let mut c = base();
        let second = c.upstreams[0].addresses[0].clone();
        c.upstreams[0].addresses.push(second);
        c.upstreams[0].backups = vec![false, true];
        c.validate().unwrap();
        c.upstreams[0].backups = vec![true];
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "upstreams[0].backups");
        assert!(e.message.contains("1 backups for 2 addresses"), "{e:?}");
        c.upstreams[0].backups = vec![true, true];
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "upstreams[0].addresses");
        assert!(e.message.contains("every address is a backup"), "{e:?}");
        c.upstreams[0].backups = vec![false, true];
        c.upstreams[0].balance = Balance::Hash(HashKey::ClientIp);
        assert_eq!(c.validate().unwrap_err().key, "upstreams[0].balance");
        // No backup among the flags: nothing to refuse.
        c.upstreams[0].backups = vec![false, false];
        c.validate().unwrap();
    }

    #[test]
    fn path_rules_are_one_way_of_matching_with_a_rewrite_that_fits() {
        let key = |f: &dyn Fn(&mut RouteConfig)| {
            let mut c = base();
            f(&mut c.listeners[0].routes[0]);
            c.validate().err().map(|e| (e.key, e.message))
        };
        assert_eq!(
            key(&|r| {
                r.path_regex = Some("/u/([0-9]+)".into());
                r.rewrite_path = Some("/users/$1".into());
            }),
            None
        );
        let at = |f: &dyn Fn(&mut RouteConfig)| key(f).map(|(k, _)| k).unwrap_or_default();
        let route = "listeners[0].routes[0]";
        assert_eq!(
            at(&|r| r.path_exact = Some("status".into())),
            format!("{route}.path")
        );
        assert_eq!(
            at(&|r| {
                r.path_exact = Some("/a".into());
                r.path_regex = Some("/b".into());
            }),
            format!("{route}.path_regex")
        );
        assert_eq!(
            at(&|r| {
                r.path_prefix = "/api".into();
                r.path_exact = Some("/a".into());
            }),
            format!("{route}.path_prefix")
        );
        assert_eq!(
            at(&|r| {
                r.path_exact = Some("/a".into());
                r.rewrite_prefix = Some("/b".into());
            }),
            format!("{route}.rewrite_prefix")
        );
        assert_eq!(
            at(&|r| r.path_regex = Some("/(".into())),
            format!("{route}.path_regex")
        );
        assert_eq!(
            at(&|r| r.rewrite_path = Some("/b".into())),
            format!("{route}.rewrite_path")
        );
        for bad in ["/users/$2", "users/$1", "/u?x=$1", "$1/x", "${1}"] {
            assert_eq!(
                at(&|r| {
                    r.path_regex = Some("/u/([0-9]+)".into());
                    r.rewrite_path = Some(bad.into());
                }),
                format!("{route}.rewrite_path"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_mirror_names_an_upstream_without_proxy_protocol_and_a_share() {
        let mut c = base();
        let mirror = |upstream: &str, per_million, max_in_flight| Mirror {
            upstream: upstream.into(),
            per_million,
            max_in_flight,
        };
        let up = c.upstreams[0].name.clone();
        c.listeners[0].routes[0].mirror = Some(mirror(&up, 1_000_000, 1));
        c.validate().unwrap();
        let route = "listeners[0].routes[0].mirror";
        for (m, key) in [
            (mirror("nowhere", 1, 1), format!("{route}.upstream")),
            (mirror(&up, 0, 1), format!("{route}.share")),
            (mirror(&up, 1, 0), format!("{route}.max_in_flight")),
        ] {
            c.listeners[0].routes[0].mirror = Some(m);
            assert_eq!(c.validate().unwrap_err().key, key);
        }
        c.listeners[0].routes[0].mirror = Some(mirror(&up, 1, 1));
        c.upstreams[0].proxy_protocol = Some(ProxyProtocolVersion::V2);
        assert_eq!(c.validate().unwrap_err().key, format!("{route}.upstream"));
    }

    #[test]
    fn a_route_host_is_a_name_or_a_wildcard_over_one() {
        let mut c = base();
        for good in [
            "api.example.com",
            "*.example.com",
            "localhost",
            "127.0.0.1",
            "::1",
        ] {
            c.listeners[0].routes[0].hosts = vec![good.into()];
            assert!(c.validate().is_ok(), "{good}: {:?}", c.validate());
        }
        for bad in [
            "api.example.com:8080",
            "a.*.com",
            "*example.com",
            "*.",
            "",
            "a b",
        ] {
            c.listeners[0].routes[0].hosts = vec!["ok.example.com".into(), bad.into()];
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, "listeners[0].routes[0].host", "{bad}");
        }
    }

    #[test]
    fn an_srv_name_takes_no_port_nor_weight_and_other_addresses_need_ports() {
        let mut c = base();
        let u = &mut c.upstreams[0];
        u.addresses = vec![
            UpstreamAddress::new("_http._tcp.app.test", 0),
            UpstreamAddress::new("10.0.0.1", 80),
        ];
        u.discovery = Some(Discovery {
            interval: Duration::from_secs(1),
            srv: true,
        });
        c.validate().unwrap();
        c.upstreams[0].weights = vec![2, 1];
        assert_eq!(
            c.validate().unwrap_err().key,
            "upstreams[0].addresses[0].weight"
        );
        c.upstreams[0].weights = vec![1, 2];
        c.validate().unwrap();
        c.upstreams[0].addresses[0].port = 80;
        assert_eq!(c.validate().unwrap_err().key, "upstreams[0].addresses[0]");
        c.upstreams[0].addresses[0].port = 0;
        c.upstreams[0].discovery = Some(Discovery {
            interval: Duration::from_secs(1),
            srv: false,
        });
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "upstreams[0].addresses[0]");
        assert!(e.message.contains("not a usable host:port"), "{e:?}");
    }

    #[test]
    fn an_auth_service_names_an_upstream_a_path_headers_and_a_timeout() {
        let mut c = base();
        let up = c.upstreams[0].name.clone();
        let auth = |upstream: &str, path: &str, header: &str, timeout| ForwardAuth {
            upstream: upstream.into(),
            path: path.into(),
            copy_headers: vec![header.into()],
            client_headers: vec!["set-cookie".into()],
            timeout,
        };
        let second = Duration::from_secs(1);
        c.listeners[0].routes[0].auth = Some(auth(&up, "/verify?x=1", "X-User", second));
        c.validate().unwrap();
        let route = "listeners[0].routes[0].auth";
        for (a, key) in [
            (
                auth("nowhere", "/v", "x-user", second),
                format!("{route}.upstream"),
            ),
            (
                auth(&up, "verify", "x-user", second),
                format!("{route}.path"),
            ),
            (auth(&up, "/v#f", "x-user", second), format!("{route}.path")),
            (
                auth(&up, "/v", "x user", second),
                format!("{route}.copy_headers"),
            ),
            (
                auth(&up, "/v", "Content-Length", second),
                format!("{route}.copy_headers"),
            ),
            (
                ForwardAuth {
                    client_headers: vec!["transfer-encoding".into()],
                    ..auth(&up, "/v", "x-user", second)
                },
                format!("{route}.client_headers"),
            ),
            (
                auth(&up, "/v", "x-user", Duration::ZERO),
                format!("{route}.timeout"),
            ),
        ] {
            c.listeners[0].routes[0].auth = Some(a);
            assert_eq!(c.validate().unwrap_err().key, key);
        }
        c.listeners[0].routes[0].auth = Some(auth(&up, "/v", "x-user", second));
        c.upstreams[0].proxy_protocol = Some(ProxyProtocolVersion::V2);
        assert_eq!(c.validate().unwrap_err().key, format!("{route}.upstream"));
    }

    #[test]
    fn request_buffering_is_held_to_what_memory_allows() {
        let mut c = base();
        c.listeners[0].routes[0].request_buffer_bytes = MAX_RETRY_BODY_BYTES;
        c.validate().unwrap();
        c.listeners[0].routes[0].request_buffer_bytes = MAX_RETRY_BODY_BYTES + 1;
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "listeners[0].routes[0].request_buffer_bytes");
        assert!(e.message.contains("16 MiB"), "{e:?}");
    }

    #[test]
    fn slow_start_is_bounded_and_not_with_hash() {
        let mut c = base();
        c.upstreams[0].slow_start = Some(Duration::from_secs(30));
        c.validate().unwrap();
        for bad in [Duration::ZERO, MAX_SLOW_START + Duration::from_millis(1)] {
            c.upstreams[0].slow_start = Some(bad);
            assert_eq!(c.validate().unwrap_err().key, "upstreams[0].slow_start");
        }
        c.upstreams[0].slow_start = Some(Duration::from_secs(30));
        c.upstreams[0].balance = Balance::Hash(HashKey::ClientIp);
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "upstreams[0].slow_start");
        assert!(e.message.contains("would move keys"), "{e:?}");
    }
}
