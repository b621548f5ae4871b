//! Admission: how much work the gateway takes on. Connections per listener, requests in flight
//! per route (beyond it: 503 with `Retry-After`, stage `admission`), requests per client and route
//! over time (beyond it: a wait for the client's turn, up to the limit's `queue`, then 429 with
//! `Retry-After`), and the budget of HTTP/2 stream resets a client
//! may spend per connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;

use tokio::time::Instant;

use crate::config::{IpNet, RATE_LIMIT_CLIENTS, RateLimit, ResetBudget, RouteConfig};
use crate::error::{ErrorKind, ProxyError, Stage};
use crate::listen::ListenerShared;
use crate::proxy::tracker::Tracker;
use crate::route::Route;

/// Seconds a shed client is told to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u32 = 1;

/// A cap on concurrent holders, shared by every worker.
#[derive(Debug)]
pub struct Limit {
    /// Changed by a reload that keeps the limit (and its holders).
    max: AtomicUsize,
    current: AtomicUsize,
}

impl Limit {
    /// A limit of `max` holders.
    pub fn new(max: usize) -> Arc<Limit> {
        Arc::new(Limit {
            max: AtomicUsize::new(max),
            current: AtomicUsize::new(0),
        })
    }

    /// Changes the cap; holders beyond a lowered one keep their permits, and no new one is
    /// given until they are below it.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A permit if the limit is not reached.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let max = self.max.load(Ordering::Relaxed);
        self.current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.clone()))
    }

    /// Holders now.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }
}

/// Holds one unit of a [`Limit`] until dropped.
#[derive(Debug)]
pub struct Permit(Arc<Limit>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket of client stream resets for one HTTP/2 connection.
#[derive(Debug)]
pub struct ResetBucket {
    budget: ResetBudget,
    tokens: f64,
    at: Instant,
}

impl ResetBucket {
    /// A full bucket.
    pub fn new(budget: ResetBudget) -> ResetBucket {
        ResetBucket {
            budget,
            tokens: f64::from(budget.burst),
            at: Instant::now(),
        }
    }

    /// Spends one reset; false when the budget is exhausted.
    pub fn spend(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.saturating_duration_since(self.at).as_secs_f64()
            * f64::from(self.budget.per_second);
        self.tokens = (self.tokens + refill).min(f64::from(self.budget.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Requests per client over time for one route, shared by every worker: the generic cell rate
/// algorithm (a token bucket kept as one time per client). Each client has a theoretical
/// arrival time; a request is allowed when that time is no more than `burst` intervals ahead of
/// now, and moves it one interval on. Up to `queue` intervals further ahead, a request takes
/// the next slot and waits for it.
#[derive(Debug)]
pub struct RateLimiter {
    /// Nanoseconds between requests at the steady rate.
    interval: u64,
    /// How far ahead of now a client's arrival time may run (`burst` intervals).
    tolerance: u64,
    /// How much further ahead a request may still be queued (`queue` intervals).
    queue: u64,
    origin: Instant,
    /// Client → theoretical arrival time (nanoseconds after `origin`), split to keep workers
    /// from waiting on one lock.
    shards: Box<[Mutex<HashMap<u128, u64>>]>,
    per_shard: usize,
    /// What requests are counted by, when not their client's address.
    key: Option<crate::upstream::balance::Affinity>,
    /// The configured key, to tell whether a reload changed it.
    configured: Option<crate::config::HashKey>,
}

const RATE_SHARDS: usize = 16;

impl RateLimiter {
    /// A limiter for `limit`.
    pub fn new(limit: &RateLimit) -> Arc<RateLimiter> {
        let (interval, tolerance, queue) = Self::timing(limit);
        // Counting by the client's address needs no key of its own.
        let configured = limit
            .key
            .clone()
            .filter(|k| *k != crate::config::HashKey::ClientIp);
        Arc::new(RateLimiter {
            interval,
            tolerance,
            queue,
            origin: Instant::now(),
            shards: (0..RATE_SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: RATE_LIMIT_CLIENTS / RATE_SHARDS,
            key: configured
                .as_ref()
                .and_then(crate::upstream::balance::Affinity::new),
            configured,
        })
    }

    /// What `req` from `client` is counted against: its key's value, when the limit has a key
    /// and the request carries it, else its client.
    fn counted(&self, req: &http::Request<hyper::body::Incoming>, client: IpAddr) -> u128 {
        let hashed = self
            .key
            .as_ref()
            .and_then(|k| k.of(req.headers(), req.uri().path(), client, false, |_| false));
        match hashed {
            // In the high half, tagged with a bit no address key sets (an IPv4 key is below
            // 2^32, an IPv6 key's low half is exactly bit 63): a key never counts as an address.
            Some(h) => (u128::from(h) << 64) | (1 << 62),
            None => key_of(client),
        }
    }

    /// The interval, tolerance and queue span of `limit`, in nanoseconds.
    fn timing(limit: &RateLimit) -> (u64, u64, u64) {
        let per = u64::try_from(limit.per.as_nanos()).unwrap_or(u64::MAX);
        let interval = (per / u64::from(limit.requests.max(1))).max(1);
        (
            interval,
            interval.saturating_mul(u64::from(limit.burst)),
            interval.saturating_mul(u64::from(limit.queue)),
        )
    }

    /// Whether this limiter enforces `limit`: a reload that leaves a route's limit as it was
    /// keeps the limiter, and with it what each client has used.
    pub fn enforces(&self, limit: &RateLimit) -> bool {
        let key = limit
            .key
            .as_ref()
            .filter(|k| **k != crate::config::HashKey::ClientIp);
        Self::timing(limit) == (self.interval, self.tolerance, self.queue)
            && key == self.configured.as_ref()
    }

    /// The table `client` is kept in.
    fn shard(&self, client: u128) -> std::sync::MutexGuard<'_, HashMap<u128, u64>> {
        // Fibonacci hashing of both halves: neighbouring addresses spread over the shards.
        let mix = (client as u64 ^ (client >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.shards[(mix >> 60) as usize % RATE_SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a request of `client` at `now`: `Ok` with how long it must wait for its slot
    /// (zero: none; more only with a queue), `Err` with how long until it would be taken.
    pub fn check(&self, client: u128, now: Instant) -> Result<Duration, Duration> {
        let now = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        let mut clients = self.shard(client);
        let tat = clients.get(&client).map_or(now, |&t| t.max(now));
        let ahead = tat - now;
        let room = self.tolerance.saturating_add(self.queue);
        if ahead > room {
            return Err(Duration::from_nanos(ahead - room));
        }
        let next = tat.saturating_add(self.interval);
        if clients.len() >= self.per_shard && !clients.contains_key(&client) {
            // Clients whose allowance is whole again hold nothing worth keeping.
            clients.retain(|_, t| *t > now);
            if clients.len() >= self.per_shard {
                // Still full (many clients at once): an eighth goes, so that the clients coming
                // next do not each pay for a sweep.
                let gone: Vec<u128> = clients
                    .keys()
                    .take(self.per_shard / 8 + 1)
                    .copied()
                    .collect();
                for c in gone {
                    clients.remove(&c);
                }
            }
        }
        clients.insert(client, next);
        Ok(Duration::from_nanos(ahead.saturating_sub(self.tolerance)))
    }

    /// A request of `client` that took a slot will not use it (its client left while it waited
    /// its turn): the client's next request may come one interval sooner.
    fn give_back(&self, client: u128) {
        if let Some(t) = self.shard(client).get_mut(&client) {
            *t = t.saturating_sub(self.interval);
        }
    }

    /// Clients tracked now.
    pub fn clients(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |c| c.len()))
            .sum()
    }
}

/// The client a rate limit counts a request against: `peer`'s address or, when `peer` is a
/// trusted proxy, the nearest address in `X-Forwarded-For` that is not one (walking from the
/// right, as each proxy appends the address it saw). IPv6 clients are counted by their /64, the
/// block one host usually holds; IPv4-mapped addresses as IPv4.
pub fn client_key(
    peer: IpAddr,
    trusted: bool,
    headers: &HeaderMap,
    is_trusted: impl Fn(IpAddr) -> bool,
) -> u128 {
    key_of(client_ip(peer, trusted, headers, is_trusted))
}

/// The rate-limit key of `client` (a [`client_ip`]): its IPv4 address, or its IPv6 /64.
fn key_of(client: IpAddr) -> u128 {
    match client {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        // Tagged in the dropped half, so no IPv6 block can stand for an IPv4 address.
        IpAddr::V6(v6) => (u128::from(v6) & !((1u128 << 64) - 1)) | (1 << 63),
    }
}

/// The client a request is from: `peer`'s address or, when `peer` is a trusted proxy, the
/// nearest address in `X-Forwarded-For` that is not one. IPv4-mapped addresses as IPv4.
pub fn client_ip(
    peer: IpAddr,
    trusted: bool,
    headers: &HeaderMap,
    is_trusted: impl Fn(IpAddr) -> bool,
) -> IpAddr {
    let client = if trusted {
        forwarded_client(headers, is_trusted).unwrap_or(peer)
    } else {
        peer
    };
    client.to_canonical()
}

/// The clients a route serves: `allow_clients` (when any) less `deny_clients`.
#[derive(Debug, Clone)]
pub struct ClientAccess {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl ClientAccess {
    /// The route's access rules; `None` when it serves every client.
    pub fn of(r: &RouteConfig) -> Option<Box<ClientAccess>> {
        (!r.allow_clients.is_empty() || !r.deny_clients.is_empty()).then(|| {
            Box::new(ClientAccess {
                allow: r.allow_clients.clone(),
                deny: r.deny_clients.clone(),
            })
        })
    }

    /// Whether the route serves `client`.
    pub fn admits(&self, client: IpAddr) -> bool {
        !self.deny.iter().any(|n| n.contains(client))
            && (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(client)))
    }
}

/// The rightmost `X-Forwarded-For` address that `is_trusted` does not vouch for; `None` when an
/// entry on the way is not an address (or not text), or every entry is trusted.
fn forwarded_client(headers: &HeaderMap, is_trusted: impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
    let values: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
    for value in values.into_iter().rev() {
        for entry in value.to_str().ok()?.rsplit(',') {
            let entry = entry.trim();
            let ip = entry
                .parse::<IpAddr>()
                .or_else(|_| entry.parse::<std::net::SocketAddr>().map(|a| a.ip()))
                .ok()?;
            if !is_trusted(ip) {
                return Some(ip);
            }
        }
    }
    None
}

/// Why a request was not admitted: the error to answer with and, for a rate limit, how long the
/// client should wait.
#[derive(Debug)]
pub struct Refusal {
    /// The error.
    pub error: ProxyError,
    /// Seconds for `Retry-After`, when they are the client's own.
    pub retry_after: Option<u64>,
}

impl From<ProxyError> for Refusal {
    fn from(error: ProxyError) -> Refusal {
        Refusal {
            error,
            retry_after: None,
        }
    }
}

/// A request over its client's rate that took a later slot (the limit's `queue`) and must wait
/// for it before anything else is done for it.
#[derive(Debug)]
pub struct Turn {
    limiter: Arc<RateLimiter>,
    client: u128,
    /// How long until the slot.
    pub wait: Duration,
}

impl Turn {
    /// The request will not use its slot (its client left, or its deadline comes first).
    pub fn give_back(&self) {
        self.limiter.give_back(self.client);
    }

    /// The request cannot wait for its slot: its deadline comes first. The slot is given back
    /// and the client answered 429, told to come back once its wait is over.
    pub fn refuse(&self, t: &mut Tracker, route: &Route) -> Refusal {
        let wait = self.wait;
        self.give_back();
        rate_limited(t, route, wait)
    }
}

fn rate_limited(t: &mut Tracker, route: &Route, wait: Duration) -> Refusal {
    t.stage = Stage::Admission;
    t.metrics().rate_limited(&route.name);
    Refusal {
        error: ProxyError::downstream(Stage::Admission, ErrorKind::RateLimited),
        // Whole seconds, rounded up: a client that waits that long is let in.
        retry_after: Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)),
    }
}

/// Checks a routed request against the route's client rules, its body limit (its own or its
/// listener's), its rate limit for the client (`peer`, `trusted` as [`client_key`] takes them)
/// and its in-flight limit. `Ok` when it may go on: at once, or after waiting its [`Turn`]
/// (then [`admit_in_flight`] is left for after the wait); the in-flight permit is stored in the
/// tracker (released when the request ends). Otherwise why not: 403 for a client the route
/// does not serve, 413 for a declared body over the limit, 429 for a client over its rate, 503
/// (with `Retry-After`) when the route is full.
pub fn admit(
    route: &Route,
    listener: &ListenerShared,
    req: &http::Request<hyper::body::Incoming>,
    peer: IpAddr,
    trusted: bool,
    t: &mut Tracker,
) -> Result<Option<Box<Turn>>, Refusal> {
    // Who the client is, looked for (an `X-Forwarded-For` walk) once, and only when a rule
    // asks.
    let client = (route.access.is_some() || route.rate_limit.is_some())
        .then(|| client_ip(peer, trusted, req.headers(), |ip| listener.trusts(ip)));
    if let (Some(access), Some(client)) = (&route.access, client)
        && !access.admits(client)
    {
        t.stage = Stage::Admission;
        t.metrics().client_denied(&route.name);
        return Err(ProxyError::downstream(Stage::Admission, ErrorKind::Forbidden).into());
    }
    if let Some(max) = route.max_body_bytes.or(listener.limits.max_body_bytes)
        && http_body::Body::size_hint(req.body())
            .exact()
            .is_some_and(|len| len > max)
    {
        t.stage = Stage::RequestBody;
        return Err(ProxyError::downstream(Stage::RequestBody, ErrorKind::TooLarge).into());
    }
    if let (Some(limiter), Some(client)) = (&route.rate_limit, client) {
        let counted = limiter.counted(req, client);
        match limiter.check(counted, Instant::now()) {
            Err(wait) => return Err(rate_limited(t, route, wait)),
            Ok(wait) if !wait.is_zero() => {
                // The route's in-flight limit is for requests being worked on, not waiting.
                return Ok(Some(Box::new(Turn {
                    limiter: Arc::clone(limiter),
                    client: counted,
                    wait,
                })));
            }
            Ok(_) => {}
        }
    }
    admit_in_flight(route, t).map(|()| None)
}

/// Takes a place under the route's in-flight limit, if it has one: 503 when it is full.
pub fn admit_in_flight(route: &Route, t: &mut Tracker) -> Result<(), Refusal> {
    if let Some(limit) = &route.in_flight {
        match limit.try_acquire() {
            Some(p) => t.admission = Some(p),
            None => {
                t.stage = Stage::Admission;
                return Err(ProxyError::gateway(Stage::Admission, ErrorKind::Overloaded).into());
            }
        }
    }
    Ok(())
}

/// How long an HTTP/2 connection told to go away for abuse may take to finish its streams
/// before it is closed.
pub const CALM_DOWN_GRACE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_refuses_beyond_max_and_frees_on_drop() {
        let l = Limit::new(2);
        let a = l.try_acquire().unwrap();
        let _b = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        drop(a);
        assert!(l.try_acquire().is_some());
    }

    fn limiter(requests: u32, per_secs: u64, burst: u32) -> Arc<RateLimiter> {
        RateLimiter::new(&RateLimit {
            requests,
            per: Duration::from_secs(per_secs),
            burst,
            queue: 0,
            key: None,
        })
    }

    #[test]
    fn a_keyed_limit_is_kept_by_a_reload_only_with_the_same_key() {
        use crate::config::HashKey;
        let mut limit = RateLimit {
            requests: 1,
            per: Duration::from_secs(1),
            burst: 0,
            queue: 0,
            key: Some(HashKey::Header("x-api-key".into())),
        };
        let l = RateLimiter::new(&limit);
        assert!(l.enforces(&limit));
        limit.key = Some(HashKey::Cookie("x-api-key".into()));
        assert!(!l.enforces(&limit));
        limit.key = None;
        assert!(!l.enforces(&limit));
        // The client's address is the default key by another name.
        assert!(limiter(1, 1, 0).enforces(&RateLimit {
            key: Some(HashKey::ClientIp),
            ..limit
        }));
    }

    #[test]
    fn a_client_gets_its_burst_at_once_then_the_steady_rate() {
        let l = limiter(2, 1, 3);
        let t0 = Instant::now();
        // 1 + burst at once.
        for _ in 0..4 {
            assert!(l.check(7, t0).is_ok());
        }
        // The next slot is one interval (500 ms) after the last one allowed.
        assert_eq!(l.check(7, t0), Err(Duration::from_millis(500)));
        assert!(l.check(7, t0 + Duration::from_millis(499)).is_err());
        assert!(l.check(7, t0 + Duration::from_millis(500)).is_ok());
        assert!(l.check(7, t0 + Duration::from_millis(500)).is_err());
        // Another client is not held back, and a client idle long enough has it all back.
        assert!(l.check(8, t0).is_ok());
        let later = t0 + Duration::from_secs(10);
        for _ in 0..4 {
            assert!(l.check(7, later).is_ok());
        }
        assert!(l.check(7, later).is_err());
    }

    #[test]
    fn a_queue_takes_the_next_slots_and_a_slot_given_back_is_free_again() {
        // 2 a second (500 ms apart), one at once beyond the rate, two more waiting their turn.
        let l = RateLimiter::new(&RateLimit {
            requests: 2,
            per: Duration::from_secs(1),
            burst: 1,
            queue: 2,
            key: None,
        });
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(l.check(7, t0), Ok(Duration::ZERO));
        assert_eq!(l.check(7, t0), Ok(Duration::ZERO));
        assert_eq!(l.check(7, t0), Ok(ms(500)));
        assert_eq!(l.check(7, t0 + ms(100)), Ok(ms(900)));
        // The queue is full: refused, told when a place in it comes free.
        assert_eq!(l.check(7, t0 + ms(100)), Err(ms(400)));
        // A waiting request's client left: its slot goes to the next request.
        l.give_back(7);
        assert_eq!(l.check(7, t0 + ms(100)), Ok(ms(900)));
        assert!(l.check(7, t0 + ms(100)).is_err());
    }

    #[test]
    fn refused_requests_do_not_use_the_allowance() {
        let l = limiter(1, 1, 0);
        let t0 = Instant::now();
        assert!(l.check(1, t0).is_ok());
        for _ in 0..100 {
            assert!(l.check(1, t0 + Duration::from_millis(10)).is_err());
        }
        assert!(l.check(1, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn the_client_table_is_bounded() {
        let l = limiter(1, 3600, 0);
        let t0 = Instant::now();
        for c in 0..(RATE_LIMIT_CLIENTS as u128 + 5_000) {
            let _ = l.check(c, t0);
        }
        assert!(l.clients() <= RATE_LIMIT_CLIENTS, "{}", l.clients());
        // Once their allowance is whole again, clients hold no place.
        let _ = l.check(u128::MAX, t0 + Duration::from_secs(7200));
        assert!(l.clients() < RATE_LIMIT_CLIENTS, "{}", l.clients());
    }

    #[test]
    fn access_is_the_allowed_networks_less_the_denied_ones() {
        let mut r = RouteConfig::new("/", "up");
        assert!(ClientAccess::of(&r).is_none(), "no rules: no check at all");
        r.deny_clients = vec!["192.0.2.0/24".parse().unwrap()];
        let deny_only = ClientAccess::of(&r).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(deny_only.admits(ip("198.51.100.1")));
        assert!(!deny_only.admits(ip("192.0.2.9")));
        assert!(
            !deny_only.admits(ip("::ffff:192.0.2.9")),
            "an IPv4-mapped client is its IPv4 address"
        );
        r.allow_clients = vec!["192.0.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let both = ClientAccess::of(&r).unwrap();
        assert!(both.admits(ip("192.0.3.1")));
        assert!(!both.admits(ip("192.0.2.1")), "denied wins over allowed");
        assert!(both.admits(ip("fd12::1")));
        assert!(!both.admits(ip("198.51.100.1")));
        assert!(!both.admits(ip("fe80::1")));
    }

    #[test]
    fn clients_are_addresses_or_their_ipv6_64_and_trusted_proxies_are_looked_past() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let none = HeaderMap::new();
        let trusted = |i: IpAddr| i == ip("10.0.0.1") || i == ip("10.0.0.2");
        let key = |peer: &str, is_trusted: bool, h: &HeaderMap| {
            client_key(ip(peer), is_trusted, h, trusted)
        };
        assert_eq!(key("192.0.2.1", false, &none), 0xC000_0201);
        assert_eq!(
            key("::ffff:192.0.2.1", false, &none),
            key("192.0.2.1", false, &none)
        );
        assert_eq!(
            key("2001:db8::1", false, &none),
            key("2001:db8::ffff:1", false, &none)
        );
        assert_ne!(
            key("2001:db8::1", false, &none),
            key("2001:db8:0:1::1", false, &none)
        );
        assert!(key("::", false, &none) > u128::from(u32::MAX));

        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            "198.51.100.9, 192.0.2.1".parse().unwrap(),
        );
        h.append("x-forwarded-for", "10.0.0.2".parse().unwrap());
        // From a trusted peer: the rightmost address no trusted proxy stands for.
        assert_eq!(key("10.0.0.1", true, &h), key("192.0.2.1", false, &none));
        // From anyone else: the peer, whatever it claims.
        assert_eq!(
            key("203.0.113.5", false, &h),
            key("203.0.113.5", false, &none)
        );
        // Ports and brackets as some proxies write them.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(key("10.0.0.1", true, &h), key("2001:db8::1", false, &none));
        h.insert("x-forwarded-for", "192.0.2.1:5000".parse().unwrap());
        assert_eq!(key("10.0.0.1", true, &h), key("192.0.2.1", false, &none));
        // Nothing usable: the peer.
        for bad in ["unknown", "10.0.0.2", "192.0.2.1, junk"] {
            h.insert("x-forwarded-for", bad.parse().unwrap());
            assert_eq!(
                key("10.0.0.1", true, &h),
                key("10.0.0.1", false, &none),
                "{bad}"
            );
        }
        h.insert(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"192.0.2.1, \xff").unwrap(),
        );
        assert_eq!(key("10.0.0.1", true, &h), key("10.0.0.1", false, &none));
    }

    #[tokio::test(start_paused = true)]
    async fn reset_bucket_refills() {
        let mut b = ResetBucket::new(ResetBudget {
            burst: 3,
            per_second: 2,
        });
        assert!(b.spend() && b.spend() && b.spend());
        assert!(!b.spend());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.spend());
        assert!(!b.spend());
    }
}
