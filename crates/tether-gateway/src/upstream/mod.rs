//! The upstream side: endpoints, their connector and pools, and handing a request a connection.

pub mod balance;
pub mod connect;
pub mod discovery;
pub mod dns;
pub mod health;
pub mod health_check;
pub mod pool;
pub mod proxy_header;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use crate::config::{
    Balance, ProxyProtocolVersion, UpstreamAddress, UpstreamConfig, UpstreamProtocol,
};
use crate::error::{ErrorKind, ProxyError, Stage};
use crate::observe::metrics::ConnCounts;
use balance::{Affinity, InFlight, Load};
use connect::{Connector, TlsSetupError};
use health::EndpointHealth;
use health_check::ActiveHealth;
use pool::{EndpointPool, H1Conn, H2Conn, OpenConn, StreamPlace};

/// One named upstream as seen by one worker.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the configuration.
    pub name: Arc<str>,
    /// Protocol spoken.
    pub protocol: UpstreamProtocol,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    /// The weighted turns (endpoint indexes; backups have none); `None` when every weight is 1
    /// and no endpoint is a backup.
    schedule: Option<Box<[u32]>>,
    /// The backups' endpoint indexes, taken in turn only when no other endpoint can be.
    backups: Box<[u32]>,
    /// How long an endpoint coming back or joining takes to get its whole share.
    slow_start: Option<Duration>,
    /// With `least_requests` or a cap: the endpoints' requests in flight over every worker.
    loads: Option<Box<[Load]>>,
    /// Balancing by `least_requests` (the loads are compared).
    least: bool,
    /// Requests in flight allowed per endpoint, when capped.
    cap: Option<u64>,
    /// How long a request waits for room at a full endpoint.
    pub queue_timeout: Duration,
    /// Streams one HTTP/2 connection takes before another is opened.
    max_streams: usize,
    /// With `hash`: what is hashed.
    affinity: Option<Affinity>,
    connector: Connector,
    counts: Arc<ConnCounts>,
    max_fails: u32,
    fail_timeout: Duration,
    /// Response statuses that count as an endpoint's failures.
    fail_statuses: Box<[u16]>,
    /// The origin of the endpoints' skip deadlines.
    born: Instant,
    /// Which endpoints the active health checks took out of rotation, when the upstream has them.
    active: Option<Arc<ActiveHealth>>,
    /// Connections start with a PROXY protocol header naming their client, and are
    /// [`Private`] to it.
    pub proxy_protocol: Option<ProxyProtocolVersion>,
}

/// The upstream connection a downstream connection keeps for itself, for an upstream whose
/// connections name their client in a PROXY protocol header: such a connection may carry no
/// one else's requests, so it is kept with its client's connection instead of in the pool (one
/// at a time; others close when their response ends) and closes with it.
#[derive(Debug, Default)]
pub struct Private(std::sync::Mutex<Option<Kept>>);

#[derive(Debug)]
struct Kept {
    /// Which upstream (of which configuration) it belongs to: held weakly, so that the
    /// address is not reused by another while kept.
    upstream: std::sync::Weak<Upstream>,
    endpoint: usize,
    conn: H1Conn,
    /// Past this the upstream may close it (its idle timeout): never reused.
    expires: Instant,
}

/// One address of an upstream, with its pool.
#[derive(Debug)]
pub struct Endpoint {
    /// Where.
    pub address: UpstreamAddress,
    /// Its connections; shared with the same endpoint of the configuration before a reload,
    /// when it connects alike.
    pub pool: Arc<EndpointPool>,
    /// Failed connection attempts and whether it is skipped.
    pub health: EndpointHealth,
    /// Its share of the requests.
    pub weight: u32,
    /// Its address's stable hash, for `hash` balancing.
    seed: u64,
    /// Taken only while no other endpoint can be (see [`UpstreamConfig::backups`]).
    pub backup: bool,
}

/// The share of its requests an endpoint gets as its slow start begins.
const MIN_SLOW_START_SHARE: f64 = 0.1;

/// A number in [0, 1), random enough to spread requests.
fn random_unit() -> f64 {
    (crate::observe::trace_context::random_nonzero() >> 11) as f64 / (1u64 << 53) as f64
}

/// An endpoint at its `max_in_flight_per_endpoint`.
#[derive(Debug, Clone, Copy)]
pub struct Full;

/// A connection handed to one request.
#[derive(Debug)]
pub enum Checkout {
    /// An HTTP/1 connection owned by the request until its response ends.
    H1(H1Conn),
    /// A handle on a shared HTTP/2 connection, and the request's place among its streams.
    H2(H2Conn, StreamPlace),
}

/// What kind of connection a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A pooled one if any is usable, else a new one.
    Pooled,
    /// A new one (after a pooled one turned out dead).
    Fresh,
    /// A new HTTP/1 one that can switch protocols: the request asks to upgrade.
    Upgradable,
}

/// How a connection was obtained.
#[derive(Debug, Clone, Copy)]
pub struct CheckoutInfo {
    /// Whether it came from the pool.
    pub reused: bool,
    /// Time spent connecting (zero when reused).
    pub connect: Duration,
    /// The steps of a fresh connection; `None` when reused.
    pub timings: Option<connect::ConnectTimings>,
    /// tether's end of the connection.
    pub local: Option<std::net::SocketAddr>,
}

impl Upstream {
    /// Builds the worker-local view of `config`; `active` is the state its health checks keep,
    /// if it has them, and `loads` the endpoints' shared in-flight counts (one per address),
    /// compared when it balances by `least_requests` and checked against
    /// `max_in_flight_per_endpoint`; without them it balances in turn, uncapped.
    pub fn new(
        config: &UpstreamConfig,
        resolver: dns::Resolver,
        counts: Arc<ConnCounts>,
        active: Option<Arc<ActiveHealth>>,
        loads: Option<Box<[Load]>>,
    ) -> Result<Upstream, TlsSetupError> {
        let connector = Connector::new(config.protocol, config.tls.as_ref(), resolver)?;
        let loads =
            loads.filter(|l| config.counts_in_flight() && l.len() == config.addresses.len());
        let counted = loads.is_some();
        let weight = |i: usize| config.weights.get(i).copied().unwrap_or(1).max(1);
        let backup = |i: usize| config.backups.get(i).copied().unwrap_or(false);
        // Endpoint indexes: the backups, and the others, which take turns.
        let (backups, others): (Vec<u32>, Vec<u32>) = (0..config.addresses.len())
            .filter_map(|i| u32::try_from(i).ok())
            .partition(|&i| backup(i as usize));
        Ok(Upstream {
            name: Arc::from(config.name.as_str()),
            protocol: config.protocol,
            endpoints: config
                .addresses
                .iter()
                .enumerate()
                .map(|(i, a)| Endpoint {
                    weight: weight(i),
                    backup: backup(i),
                    seed: balance::stable_hash(a.to_string().as_bytes()),
                    address: a.clone(),
                    pool: Arc::new(EndpointPool::new(
                        config.max_idle_per_endpoint,
                        config.idle_timeout,
                        config.lifetime(),
                        counts.clone(),
                    )),
                    health: EndpointHealth::default(),
                })
                .collect(),
            next: AtomicUsize::new(0),
            schedule: if !backups.is_empty() {
                // Turns for the others only, named by their endpoint indexes.
                let weights: Vec<u32> = others.iter().map(|&i| weight(i as usize)).collect();
                Some(match balance::schedule(&weights) {
                    Some(turns) => turns.iter().map(|&t| others[t as usize]).collect(),
                    None => others.into_boxed_slice(),
                })
            } else if config.weights.is_empty() {
                None
            } else {
                balance::schedule(&config.weights)
            },
            backups: backups.into_boxed_slice(),
            slow_start: config.slow_start,
            loads,
            least: counted && config.balance == Balance::LeastRequests,
            cap: config
                .max_in_flight_per_endpoint
                .filter(|_| counted)
                .map(|n| u64::from(n.get())),
            queue_timeout: config.queue_timeout,
            max_streams: usize::try_from(config.max_streams_per_connection.get())
                .unwrap_or(usize::MAX),
            affinity: match &config.balance {
                Balance::Hash(key) => Affinity::new(key),
                _ => None,
            },
            connector,
            counts,
            max_fails: config.max_fails,
            fail_timeout: config.fail_timeout,
            fail_statuses: config.fail_statuses.clone().into_boxed_slice(),
            born: Instant::now(),
            active,
            proxy_protocol: config.proxy_protocol,
        })
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.connector.is_tls()
    }

    /// The scheme of its requests' URIs (HTTP/2 sends it as `:scheme`).
    pub fn scheme(&self) -> http::uri::Scheme {
        if self.is_tls() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        }
    }

    /// The endpoint for the next request, with its index: with `hash` and a request `key`
    /// (see [`Upstream::affinity`]), the endpoint the key hashes to among those available;
    /// otherwise the next in turn (weighted round robin), or with `least_requests` the one with
    /// the fewest requests in flight for its weight (ties go in turn). Endpoints skipped after
    /// failed connection attempts, or taken out of rotation by the health checks, are passed
    /// over; when every endpoint but the backups is, a backup is chosen the same way; when
    /// every one is, the one in turn (or the key's) is tried anyway (the request fails only if
    /// it fails). `attempt` counts the request's retries: a hashed request's retry goes to the
    /// key's next endpoint, so that one endpoint failing does not fail all its keys' retries
    /// too.
    #[inline]
    pub fn pick(&self, key: Option<u64>, attempt: u32) -> (usize, &Endpoint) {
        if let Some(key) = key {
            let n = self.hashed(key, attempt as usize);
            return (n, &self.endpoints[n]);
        }
        let len = self.endpoints.len();
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let first = match &self.schedule {
            Some(order) => order[turn % order.len()] as usize % len,
            None => turn % len,
        };
        if len > 1
            && (self.max_fails > 0
                || self.active.is_some()
                || self.loads.is_some()
                || self.slow_start.is_some())
        {
            let now = Instant::now();
            if let Some(n) = self.usable(first, false, now) {
                return (n, &self.endpoints[n]);
            }
            if !self.backups.is_empty() {
                let first = self.backups[turn % self.backups.len()] as usize;
                if let Some(n) = self.usable(first, true, now) {
                    return (n, &self.endpoints[n]);
                }
            }
        }
        (first, &self.endpoints[first])
    }

    /// From `first` on, the first endpoint in rotation with room (with `least_requests`, the
    /// lightest), among the backups or among the others. One in its slow start is passed over
    /// at random, less often as its start goes on; when every one is, the first (or lightest)
    /// of them.
    #[inline]
    fn usable(&self, first: usize, backups: bool, now: Instant) -> Option<usize> {
        let len = self.endpoints.len();
        let mut best: Option<(usize, u64)> = None;
        let mut ramping: Option<(usize, u64)> = None;
        for i in 0..len {
            let n = (first + i) % len;
            let ep = &self.endpoints[n];
            if ep.backup != backups || !self.in_rotation(n, ep, now) {
                continue;
            }
            let load = match &self.loads {
                Some(loads) => {
                    let load = loads[n].get();
                    // A full endpoint is passed over like one out of rotation.
                    if self.cap.is_some_and(|cap| load >= cap) {
                        continue;
                    }
                    load
                }
                None => 0,
            };
            let kept = match self.slow_start {
                Some(window)
                    if self
                        .ramp(n, ep, now, window)
                        .is_some_and(|share| random_unit() >= share) =>
                {
                    &mut ramping
                }
                _ if !self.least => return Some(n),
                _ => &mut best,
            };
            if kept.is_none_or(|(b, b_load)| {
                self.least && balance::lighter(load, ep.weight, b_load, self.endpoints[b].weight)
            }) {
                *kept = Some((n, load));
            }
        }
        best.or(ramping).map(|(n, _)| n)
    }

    /// The share of its requests endpoint `n` gets at `now` when it is in its slow start of
    /// `window` (from [`MIN_SLOW_START_SHARE`] to 1); `None` when it is not.
    #[cold]
    fn ramp(&self, n: usize, ep: &Endpoint, now: Instant, window: Duration) -> Option<f64> {
        let passive = ep.health.back_since(self.born);
        let active = self.active.as_ref().and_then(|a| a.up_since(n));
        let since = passive.max(active)?;
        // Times are noted to the millisecond: one a little ahead is now.
        let elapsed = now.saturating_duration_since(since);
        (elapsed < window)
            .then(|| (elapsed.as_secs_f64() / window.as_secs_f64()).max(MIN_SLOW_START_SHARE))
    }

    /// Whether endpoint `n` (`ep`) may be chosen: not skipped after failures (`max_fails`), nor
    /// out of rotation by its health checks.
    #[inline]
    fn in_rotation(&self, n: usize, ep: &Endpoint, now: Instant) -> bool {
        ep.health.available(self.born, now) && !self.active.as_ref().is_some_and(|a| a.is_down(n))
    }

    /// The endpoint `key` hashes to: the highest rendezvous score among the available endpoints,
    /// or among all when none is. For the `nth` retry, the `nth` next in that order (in turn
    /// among the available ones).
    #[cold]
    fn hashed(&self, key: u64, nth: usize) -> usize {
        let now = Instant::now();
        if nth > 0 {
            let mut ranked: Vec<(bool, f64, usize)> = self
                .endpoints
                .iter()
                .enumerate()
                .map(|(n, ep)| {
                    (
                        self.in_rotation(n, ep, now),
                        balance::score(key, ep.seed, ep.weight),
                        n,
                    )
                })
                .collect();
            ranked.sort_by(|a, b| {
                (b.0, b.1)
                    .partial_cmp(&(a.0, a.1))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            let available = ranked.iter().filter(|r| r.0).count();
            let among = if available > 0 {
                available
            } else {
                ranked.len()
            };
            return ranked.get(nth % among.max(1)).map_or(0, |r| r.2);
        }
        let mut best: Option<(usize, f64, bool)> = None;
        for (n, ep) in self.endpoints.iter().enumerate() {
            let up = self.in_rotation(n, ep, now);
            let score = balance::score(key, ep.seed, ep.weight);
            // An available endpoint beats any that is not; then the higher score.
            if best.is_none_or(|(_, s, b_up)| (up, score) > (b_up, s)) {
                best = Some((n, score, up));
            }
        }
        best.map_or(0, |(n, _, _)| n)
    }

    /// With `hash` balancing, the hash of the request's key (its client, header, cookie or
    /// path); `None` otherwise, or when the request lacks the key.
    pub fn affinity<B>(
        &self,
        req: &http::Request<B>,
        client: std::net::IpAddr,
        trusted: bool,
        is_trusted: impl Fn(std::net::IpAddr) -> bool,
    ) -> Option<u64> {
        let affinity = self.affinity.as_ref()?;
        affinity.of(req.headers(), req.uri().path(), client, trusted, is_trusted)
    }

    /// Counts a request in endpoint `idx`'s load until the guard drops (`None` when loads are
    /// not counted); `Err` when the endpoint is at its cap (see [`Upstream::wait_for_room`]).
    pub fn hold(&self, idx: usize) -> Result<Option<InFlight>, Full> {
        let Some(load) = self.loads.as_ref().and_then(|l| l.get(idx)) else {
            return Ok(None);
        };
        match self.cap {
            None => Ok(Some(load.hold())),
            Some(cap) => load.try_hold(cap).map(Some).ok_or(Full),
        }
    }

    /// Waits, for up to the upstream's `queue_timeout`, until an endpoint `pick(key, attempt)`
    /// would choose has room, and holds a place there; `None` when the time ran out.
    pub async fn wait_for_room(&self, key: Option<u64>, attempt: u32) -> Option<(usize, InFlight)> {
        let room = self.loads.as_ref()?.first()?.room();
        let take = || {
            let (idx, _) = self.pick(key, attempt);
            self.hold(idx).ok().flatten().map(|held| (idx, held))
        };
        tokio::time::timeout(self.queue_timeout, room.wait(take))
            .await
            .ok()
    }

    /// Endpoint `idx`.
    pub fn endpoint(&self, idx: usize) -> Option<&Endpoint> {
        self.endpoints.get(idx)
    }

    /// Reports how a fresh connection attempt to endpoint `idx` went (`None`: it worked). True
    /// when this failure made the endpoint skipped.
    pub fn report_connect(&self, idx: usize, error: Option<&ProxyError>) -> bool {
        match error {
            None => {
                if let Some(ep) = self.endpoints.get(idx) {
                    ep.health.succeeded();
                }
                false
            }
            Some(e) if health::counts_against_endpoint(e) => self.failed(idx, e),
            Some(_) => false,
        }
    }

    /// Reports the status endpoint `idx` answered: with `fail_statuses`, one of them counts as a
    /// failure toward `max_fails`, and any other clears the count. True when this answer made
    /// the endpoint skipped.
    pub fn report_status(&self, idx: usize, status: u16) -> bool {
        if self.fail_statuses.is_empty() {
            return false;
        }
        if self.fail_statuses.contains(&status) {
            return self.failed(idx, &format_args!("status {status}"));
        }
        if let Some(ep) = self.endpoints.get(idx) {
            ep.health.succeeded();
        }
        false
    }

    /// Counts a failure of endpoint `idx` (`why`); true when it made the endpoint skipped.
    #[cold]
    fn failed(&self, idx: usize, why: &dyn std::fmt::Display) -> bool {
        let Some(ep) = self.endpoints.get(idx) else {
            return false;
        };
        // One address: nothing else to pick, so never skipped.
        if self.endpoints.len() > 1
            && ep
                .health
                .failed(self.born, self.max_fails, self.fail_timeout)
        {
            tracing::warn!(
                upstream = %self.name,
                endpoint = %ep.address,
                max_fails = self.max_fails,
                fail_timeout = ?self.fail_timeout,
                error = %why,
                "upstream endpoint failing; skipped for fail_timeout"
            );
            return true;
        }
        false
    }

    /// Takes over from `before` (the same upstream in the configuration before a reload, on
    /// this worker) what its endpoints that `self` has too (the same address) learned: their
    /// passive health (a skipped endpoint stays skipped), and with `pools` their pools, so that
    /// a reload, or endpoints found by discovery, do not cost the unchanged endpoints their open
    /// connections. `pools` only for an upstream that
    /// [connects alike](UpstreamConfig::connects_like).
    pub fn adopt(&mut self, before: &Upstream, pools: bool) {
        // Skip deadlines are counted from `born`.
        self.born = before.born;
        let now = Instant::now();
        for ep in &mut self.endpoints {
            if let Some(old) = before.endpoints.iter().find(|o| o.address == ep.address) {
                ep.health.carry(&old.health);
                if pools {
                    ep.pool = old.pool.clone();
                }
            } else {
                // New beside the others: a cold server, for slow start.
                ep.health.joined(self.born, now);
            }
        }
    }

    /// The address of endpoint `idx`, as configured.
    pub fn endpoint_address(&self, idx: usize) -> Option<&UpstreamAddress> {
        self.endpoints.get(idx).map(|e| &e.address)
    }

    /// Returns an HTTP/1 connection whose exchange ended cleanly to endpoint `idx`'s pool.
    pub fn release(&self, idx: usize, conn: H1Conn, upstream_keep_alive: Option<Duration>) {
        if let Some(ep) = self.endpoints.get(idx) {
            ep.pool.put_h1(conn, upstream_keep_alive);
        }
    }

    /// Closes idle connections that expired or that the upstream closed (see
    /// [`EndpointPool::sweep`]).
    pub fn sweep_idle(&self) {
        for ep in &self.endpoints {
            ep.pool.sweep();
        }
    }

    /// A pooled HTTP/1 connection to `ep` that can take a request now, without waiting.
    pub fn take_ready(&self, ep: &Endpoint) -> Option<(Checkout, CheckoutInfo)> {
        if self.protocol.is_h2() {
            return None;
        }
        ep.pool.take_h1_ready().map(pooled_h1)
    }

    /// A connection to `ep`: pooled if one is usable and `want` allows it, otherwise new. For an
    /// upstream with `proxy_protocol`, always new, its header naming `client` (the client's and
    /// tether's ends of the downstream connection).
    pub async fn checkout(
        &self,
        ep: &Endpoint,
        connect_timeout: Duration,
        want: Want,
        client: Option<(&std::net::SocketAddr, &std::net::SocketAddr)>,
    ) -> Result<(Checkout, CheckoutInfo), ProxyError> {
        if self.protocol.is_h2() {
            return self
                .checkout_h2(ep, connect_timeout, want == Want::Pooled)
                .await;
        }
        if let (Some(version), Some((from, to))) = (self.proxy_protocol, client) {
            let header = proxy_header::for_client(version, *from, *to);
            return Box::pin(self.connect_h1(
                ep,
                connect_timeout,
                want == Want::Upgradable,
                Some(&header),
            ))
            .await;
        }
        if want == Want::Pooled
            && let Some(mut c) = ep.pool.take_h1()
        {
            // A returned connection may still be finishing the previous exchange.
            if c.sender.ready().await.is_ok() {
                return Ok(pooled_h1(c));
            }
        }
        // Boxed: the connect path (DNS, address racing, TLS) is a large future, and inline it would
        // make every request's future as large, pooled or not.
        Box::pin(self.connect_h1(ep, connect_timeout, want == Want::Upgradable, None)).await
    }

    /// The connection `private` kept for endpoint `idx` of this upstream, if it can take a
    /// request now.
    pub fn take_private(
        self: &Arc<Self>,
        idx: usize,
        private: &Private,
    ) -> Option<(Checkout, CheckoutInfo)> {
        let kept = crate::lock(&private.0).take()?;
        let ours = std::ptr::eq(kept.upstream.as_ptr(), Arc::as_ptr(self)) && kept.endpoint == idx;
        // Anything else is dropped, which closes it.
        (ours && Instant::now() < kept.expires && kept.conn.sender.is_ready())
            .then(|| pooled_h1(kept.conn))
    }

    /// Keeps `conn`, whose exchange with endpoint `idx` ended cleanly, in `private` (see
    /// [`Private`]), as the pool would keep it; it replaces (closes) one kept before.
    pub fn keep_private(
        self: &Arc<Self>,
        idx: usize,
        conn: H1Conn,
        upstream_keep_alive: Option<Duration>,
        private: &Private,
    ) {
        let Some(ep) = self.endpoints.get(idx) else {
            return;
        };
        let Some(expires) = ep
            .pool
            .keep_until(&conn, upstream_keep_alive, Instant::now())
        else {
            return;
        };
        *crate::lock(&private.0) = Some(Kept {
            upstream: Arc::downgrade(self),
            endpoint: idx,
            conn,
            expires,
        });
    }

    /// A new HTTP/1 connection to `ep`; `upgradable`: one that can switch protocols (101).
    async fn connect_h1(
        &self,
        ep: &Endpoint,
        connect_timeout: Duration,
        upgradable: bool,
        preface: Option<&[u8]>,
    ) -> Result<(Checkout, CheckoutInfo), ProxyError> {
        let started = Instant::now();
        let connected = self.connect(ep, connect_timeout, preface).await?;
        let (peer, local, timings) = (connected.peer, connected.local, connected.timings);
        let open = OpenConn::new(self.counts.clone());
        let conn = pool::start_h1(connected.io, peer, local, open, upgradable)?;
        Ok((
            Checkout::H1(conn),
            CheckoutInfo {
                reused: false,
                connect: started.elapsed(),
                timings: Some(timings),
                local,
            },
        ))
    }

    async fn connect(
        &self,
        ep: &Endpoint,
        timeout: Duration,
        preface: Option<&[u8]>,
    ) -> Result<connect::Connected, ProxyError> {
        // A guard, not a decrement after the await: a cancelled request drops this future mid-connect.
        struct Connecting<'a>(&'a AtomicI64);
        impl Drop for Connecting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.counts.connecting.fetch_add(1, Ordering::Relaxed);
        let _connecting = Connecting(&self.counts.connecting);
        self.connector.connect(&ep.address, timeout, preface).await
    }

    async fn checkout_h2(
        &self,
        ep: &Endpoint,
        connect_timeout: Duration,
        reuse: bool,
    ) -> Result<(Checkout, CheckoutInfo), ProxyError> {
        let mut slot = ep.pool.h2_slot().lock().await;
        if reuse
            && let Some((c, place)) =
                slot.take(self.max_streams, ep.pool.idle_timeout(), ep.pool.lifetime())
        {
            let local = c.local;
            return Ok((
                Checkout::H2(c, place),
                CheckoutInfo {
                    reused: true,
                    connect: Duration::ZERO,
                    timings: None,
                    local,
                },
            ));
        }
        let started = Instant::now();
        let connected = Box::pin(self.connect(ep, connect_timeout, None)).await?;
        let timings = connected.timings;
        let c = self.start_h2(connected).await?;
        let local = c.local;
        let place = slot.add(c.clone());
        Ok((
            Checkout::H2(c, place),
            CheckoutInfo {
                reused: false,
                connect: started.elapsed(),
                timings: Some(timings),
                local,
            },
        ))
    }
}

impl Upstream {
    /// Drives a new HTTP/2 connection in a task of its own.
    async fn start_h2(&self, connected: connect::Connected) -> Result<H2Conn, ProxyError> {
        let (peer, local) = (connected.peer, connected.local);
        let io = connect::TlsWatch::new(connected.io);
        let tls_failed = io.failed();
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                ProxyError::upstream(Stage::Connect, ErrorKind::Protocol)
                    .with_target(peer)
                    .with_source(e)
            })?;
        let open = OpenConn::new(self.counts.clone());
        let failed = tls_failed.clone();
        let streams: Arc<pool::Streams> = Arc::default();
        let seen = streams.clone();
        tokio::spawn(async move {
            let _open = open;
            let mut conn = std::pin::pin!(conn);
            // After each turn of the connection, the upstream's limit on streams at once as
            // its SETTINGS last said, for the pool to open another connection at it.
            let driven = std::future::poll_fn(|cx| {
                let r = conn.as_mut().poll(cx);
                seen.set_allowed(conn.current_max_send_streams());
                r
            });
            // A TLS failure after the handshake (a client certificate the upstream refused)
            // ends the connection, not one request.
            if let Err(e) = driven.await
                && failed.load(std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(%peer, error = %e, "upstream HTTP/2 connection failed in TLS");
            }
        });
        Ok(H2Conn {
            streams,
            sender,
            peer,
            local,
            tls_failed,
            born: Instant::now(),
        })
    }

    /// A new connection to endpoint `i` for one exchange of its own, outside the pools (a health
    /// check). Kept apart from [`Upstream::checkout`]: a second caller of the request path's
    /// code would change how the compiler inlines it there.
    pub async fn connect_once(&self, i: usize, timeout: Duration) -> Result<Checkout, ProxyError> {
        let ep = self
            .endpoints
            .get(i)
            .ok_or_else(|| ProxyError::upstream(Stage::Connect, ErrorKind::Refused))?;
        if self.protocol.is_h2() {
            let connected = self.connect(ep, timeout, None).await?;
            let c = self.start_h2(connected).await?;
            let place = c.place();
            return Ok(Checkout::H2(c, place));
        }
        // A check is tether's own connection: its header names no client.
        let header = self.proxy_protocol.map(proxy_header::own);
        let (checkout, _) =
            Box::pin(self.connect_h1(ep, timeout, false, header.as_deref())).await?;
        Ok(checkout)
    }
}

/// The checkout of a pooled HTTP/1 connection.
fn pooled_h1(c: H1Conn) -> (Checkout, CheckoutInfo) {
    let local = c.local;
    (
        Checkout::H1(c),
        CheckoutInfo {
            reused: true,
            connect: Duration::ZERO,
            timings: None,
            local,
        },
    )
}
