//! Choosing an upstream's endpoint for a request: the weighted round-robin order, the
//! in-flight counts that `least_requests` compares, and the rendezvous hashing of `hash`.

use std::hash::Hasher as _;
use std::net::IpAddr;

use http::HeaderMap;
use http::header::{COOKIE, HeaderName};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::metrics::gauge::Gauge;
use siphasher::sip::SipHasher13;
use tokio::sync::Notify;

use crate::config::HashKey;

/// The order in which endpoints with `weights` take their turns: smooth weighted round robin
/// (nginx's), so that an endpoint of weight 3 beside one of weight 1 gets `a a b a`, not
/// `a a a b`. One turn per unit of weight; `None` when every weight is 1 (plain rotation).
pub fn schedule(weights: &[u32]) -> Option<Box<[u32]>> {
    if weights.iter().all(|&w| w == 1) {
        return None;
    }
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(u32::try_from(best).unwrap_or(0));
    }
    Some(order.into_boxed_slice())
}

/// Requests in flight to one endpoint, over every worker and configuration generation: the
/// `tether_upstream_endpoint_in_flight` gauge itself, so what is compared (and capped) is what
/// is shown.
#[derive(Debug, Clone)]
pub struct Load {
    gauge: Gauge,
    /// Where requests waiting for room under a cap are woken: one for all the endpoints of an
    /// upstream, as a waiting request may take any of them.
    freed: Arc<Room>,
}

/// Requests waiting for room at an upstream's endpoints, woken as requests end.
#[derive(Debug, Default)]
pub struct Room {
    notify: Notify,
    /// How many wait (the `tether_upstream_queued` gauge): with none, a request that ends
    /// wakes no one, so the common case costs no lock.
    waiting: Gauge,
}

impl Room {
    /// Waiters counted in `waiting`.
    pub fn new(waiting: Gauge) -> Room {
        Room {
            notify: Notify::new(),
            waiting,
        }
    }

    /// Waits until `take` gives a place (it is asked again each time a request ends).
    pub async fn wait<T>(&self, mut take: impl FnMut() -> Option<T>) -> T {
        self.waiting.inc();
        // The gauge counts with relaxed order; this pairs with the fence in `freed` so that
        // either this wait sees the place freed or `freed` sees this wait.
        std::sync::atomic::fence(Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before looking: a place freed in between still wakes this wait.
            notified.as_mut().enable();
            if let Some(held) = take() {
                return held;
            }
            notified.await;
        }
    }

    fn freed(&self) {
        // Ordered after the count's decrement: a waiter that registered after this looked
        // sees the room itself.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.get() > 0 {
            // Every waiter looks again: each may be waiting for a different endpoint.
            self.notify.notify_waiters();
        }
    }
}

/// One waiter counted in [`Room::waiting`].
struct Waiting<'a>(&'a Gauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Load {
    /// A count kept in `gauge`; `freed` is shared by every endpoint of the upstream.
    pub fn new(gauge: Gauge, freed: Arc<Room>) -> Load {
        Load { gauge, freed }
    }

    /// Where requests wait for room at any endpoint of the upstream.
    pub fn room(&self) -> &Room {
        &self.freed
    }

    /// Requests in flight now.
    pub fn get(&self) -> u64 {
        u64::try_from(self.gauge.get()).unwrap_or(0)
    }

    /// Counts one more request until the returned guard is dropped.
    pub fn hold(&self) -> InFlight {
        self.gauge.inc();
        self.guard()
    }

    /// [`Load::hold`] if fewer than `cap` requests are in flight.
    pub fn try_hold(&self, cap: u64) -> Option<InFlight> {
        // Counted first, then checked: two requests racing for the last place cannot both
        // take it.
        let before = u64::try_from(self.gauge.inc()).unwrap_or(0);
        if before >= cap {
            self.gauge.dec();
            return None;
        }
        Some(self.guard())
    }

    fn guard(&self) -> InFlight {
        InFlight {
            gauge: self.gauge.clone(),
            freed: self.freed.clone(),
        }
    }
}

/// One request counted in its endpoint's [`Load`] while it lives.
#[derive(Debug)]
pub struct InFlight {
    gauge: Gauge,
    freed: Arc<Room>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
        self.freed.freed();
    }
}

/// Whether an endpoint with `load` requests in flight and weight `weight` is less loaded than
/// one with `other_load` and `other_weight`: `load / weight < other_load / other_weight`,
/// compared without division (nginx's `least_conn` rule). Idle endpoints tie, so the weighted
/// turns decide between them.
pub fn lighter(load: u64, weight: u32, other_load: u64, other_weight: u32) -> bool {
    u128::from(load) * u128::from(other_weight) < u128::from(other_load) * u128::from(weight)
}

/// Fixed keys: every worker, every restart and every tether in front of the same upstreams
/// hashes a key to the same endpoint.
const SIP_KEYS: (u64, u64) = (0x7465_7468_6572_2d68, 0x6173_682d_6b65_7973);

/// A stable 64-bit hash of `bytes`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(SIP_KEYS.0, SIP_KEYS.1);
    h.write(bytes);
    h.finish()
}

/// What a `hash` upstream hashes, ready to read from requests.
#[derive(Debug, Clone)]
pub enum Affinity {
    /// The client's address.
    ClientIp,
    /// A header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The path.
    Path,
}

impl Affinity {
    /// From the configuration; `None` for a header name that is not one (refused at load).
    pub fn new(key: &HashKey) -> Option<Affinity> {
        Some(match key {
            HashKey::ClientIp => Affinity::ClientIp,
            HashKey::Header(h) => Affinity::Header(HeaderName::from_bytes(h.as_bytes()).ok()?),
            HashKey::Cookie(c) => Affinity::Cookie(c.clone()),
            HashKey::Path => Affinity::Path,
        })
    }

    /// The key's hash for a request with `headers` and `path` from `client` (`trusted`: a
    /// trusted proxy, looked past through `X-Forwarded-For`); `None` when the request lacks the
    /// header or cookie.
    pub fn of(
        &self,
        headers: &HeaderMap,
        path: &str,
        client: IpAddr,
        trusted: bool,
        is_trusted: impl Fn(IpAddr) -> bool,
    ) -> Option<u64> {
        match self {
            Affinity::ClientIp => {
                let key = crate::admission::client_key(client, trusted, headers, is_trusted);
                Some(stable_hash(&key.to_le_bytes()))
            }
            Affinity::Header(name) => headers.get(name).map(|v| stable_hash(v.as_bytes())),
            Affinity::Cookie(name) => cookie(headers, name).map(stable_hash),
            Affinity::Path => Some(stable_hash(path.as_bytes())),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

/// Endpoint `seed`'s score for `key`, weighted (rendezvous hashing: the highest score wins, and
/// each endpoint wins about its weight's share of keys): `weight / -ln(u)`, `u` the pair's
/// hash mapped into (0, 1).
pub fn score(key: u64, seed: u64, weight: u32) -> f64 {
    // splitmix64's finaliser over the pair.
    let mut z = key ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight) / -u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cap_holds_its_count_and_a_request_ending_lets_a_waiter_in() {
        let room = Arc::new(Room::default());
        let load = Load::new(Gauge::default(), room.clone());
        let first = load.try_hold(2).unwrap();
        let _second = load.try_hold(2).unwrap();
        assert!(load.try_hold(2).is_none());
        assert_eq!(load.get(), 2, "a refused request is not counted");
        let waiter = {
            let load = load.clone();
            tokio::spawn(async move {
                let room = load.room();
                room.wait(|| load.try_hold(2)).await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(first);
        let third = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter was not let in")
            .unwrap();
        assert_eq!(load.get(), 2);
        drop(third);
        assert_eq!(load.get(), 1);
        assert_eq!(room.waiting.get(), 0);
    }

    fn turns(weights: &[u32]) -> Vec<u32> {
        schedule(weights).map(|s| s.to_vec()).unwrap_or_default()
    }

    #[test]
    fn equal_weights_need_no_schedule() {
        assert!(schedule(&[1, 1, 1]).is_none());
        assert!(schedule(&[1]).is_none());
    }

    #[test]
    fn turns_follow_the_weights_and_are_spread() {
        assert_eq!(turns(&[3, 1]), [0, 0, 1, 0]);
        assert_eq!(turns(&[1, 2]), [1, 0, 1]);
        // nginx's own example: a b a c a b a.
        assert_eq!(turns(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        let t = turns(&[2, 3, 5]);
        assert_eq!(t.len(), 10);
        for (i, w) in [2, 3, 5].into_iter().enumerate() {
            assert_eq!(t.iter().filter(|&&n| n as usize == i).count(), w);
        }
        // The heaviest never takes more than two turns in a row here.
        assert!(!t.windows(3).any(|w| w.iter().all(|&n| n == 2)), "{t:?}");
    }

    #[test]
    fn lighter_compares_load_for_the_weight() {
        assert!(lighter(0, 1, 1, 1));
        assert!(!lighter(1, 1, 1, 1));
        // Idle endpoints tie whatever their weights.
        assert!(!lighter(0, 3, 0, 1));
        assert!(!lighter(0, 1, 0, 3));
        // Two in flight of a weight 3 is lighter than one of a weight 1.
        assert!(lighter(2, 3, 1, 1));
        assert!(!lighter(3, 3, 1, 1));
    }

    #[test]
    fn keys_spread_by_weight_and_a_leaving_endpoint_moves_only_its_own() {
        let seeds: Vec<u64> = ["a:80", "b:80", "c:80"]
            .iter()
            .map(|a| stable_hash(a.as_bytes()))
            .collect();
        let pick = |key: u64, weights: &[u32], present: &[bool]| {
            (0..seeds.len())
                .filter(|&i| present[i])
                .max_by(|&i, &j| {
                    score(key, seeds[i], weights[i]).total_cmp(&score(key, seeds[j], weights[j]))
                })
                .unwrap()
        };
        let keys: Vec<u64> = (0..30_000u32)
            .map(|k| stable_hash(&k.to_le_bytes()))
            .collect();
        let all = [true, true, true];
        let mut counts = [0usize; 3];
        for &k in &keys {
            counts[pick(k, &[1, 1, 2], &all)] += 1;
        }
        // Shares of 1/4, 1/4 and 1/2, within a few percent.
        for (c, want) in counts.iter().zip([7_500, 7_500, 15_000]) {
            assert!(c.abs_diff(want) < 600, "{counts:?}");
        }
        // Without b, only b's keys move.
        for &k in &keys {
            let before = pick(k, &[1, 1, 2], &all);
            let after = pick(k, &[1, 1, 2], &[true, false, true]);
            assert!(before == 1 || before == after);
        }
    }

    #[test]
    fn a_key_is_read_from_the_client_a_header_a_cookie_or_the_path() {
        let mut h = HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        h.append(COOKIE, "theme=dark; session = s1 ".parse().unwrap());
        h.append(COOKIE, "other=1".parse().unwrap());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let of = |a: Affinity| a.of(&h, "/p", ip, false, |_| false);
        let header = HeaderName::from_static("x-user");
        assert_eq!(of(Affinity::Header(header)), Some(stable_hash(b"alice")));
        assert_eq!(
            of(Affinity::Cookie("session".into())),
            Some(stable_hash(b"s1"))
        );
        assert_eq!(
            of(Affinity::Cookie("other".into())),
            Some(stable_hash(b"1"))
        );
        assert_eq!(of(Affinity::Cookie("sess".into())), None);
        assert_eq!(
            of(Affinity::Header(HeaderName::from_static("x-none"))),
            None
        );
        assert_eq!(of(Affinity::Path), Some(stable_hash(b"/p")));
        // A client's /64 is one key.
        let v6 = |s: &str| {
            Affinity::ClientIp.of(&HeaderMap::new(), "/", s.parse().unwrap(), false, |_| false)
        };
        assert_eq!(v6("2001:db8::1"), v6("2001:db8::2"));
        assert_ne!(v6("2001:db8::1"), v6("2001:db8:0:1::1"));
        // The same on every run: the hash is keyed by constants.
        assert_eq!(stable_hash(b"alice"), stable_hash(b"alice"));
    }

    #[test]
    fn a_hold_counts_until_dropped() {
        let load = Load::new(Gauge::default(), Arc::default());
        let a = load.hold();
        let b = load.hold();
        assert_eq!(load.get(), 2);
        drop(a);
        assert_eq!(load.get(), 1);
        drop(b);
        assert_eq!(load.get(), 0);
    }
}
