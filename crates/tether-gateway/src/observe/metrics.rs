//! Prometheus metrics. Every label comes from a closed set (outcomes, reasons, stages, status
//! classes) or from the configuration (route and upstream names), never from request data.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::ProxyError;
use crate::observe::access::{Outcome, RequestRecord};
use crate::upstream::balance::Load;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status_class: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AbortLabels {
    route: String,
    reason: &'static str,
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    upstream: String,
    stage: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    upstream: String,
    endpoint: String,
}

impl EndpointLabels {
    fn new(upstream: &str, endpoint: &str) -> EndpointLabels {
        EndpointLabels {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOutcomeLabels {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    route: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthCheckLabels {
    upstream: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PropagationLabels {
    upstream_protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    upstream: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabels {
    name: String,
}

/// Live counts of one upstream's connections on all workers, updated on the hot path with plain
/// atomics and copied into gauges at scrape time.
#[derive(Debug, Default)]
pub struct ConnCounts {
    /// Connections open (active or idle).
    pub open: AtomicI64,
    /// Connections idle in a pool.
    pub idle: AtomicI64,
    /// Connection attempts under way.
    pub connecting: AtomicI64,
    /// Idle connections resting with only their socket (part of `idle`).
    pub resting: AtomicI64,
}

/// A tunnel's byte counters, one per direction.
#[derive(Debug, Clone, Default)]
pub struct TunnelCounters {
    /// Bytes the client sent.
    pub from_client: Counter,
    /// Bytes the upstream sent.
    pub from_upstream: Counter,
}

/// An open tunnel, counted in `tether_tunnels_open` until dropped.
#[derive(Debug)]
pub struct TunnelOpen(Gauge);

impl Drop for TunnelOpen {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The gateway's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    aborts: Family<AbortLabels, Counter>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    in_flight: Gauge,
    request_duration: Family<RouteLabels, Histogram>,
    upstream_duration: Family<RouteLabels, Histogram>,
    propagation: Family<PropagationLabels, Histogram>,
    wasted: Family<RouteLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    conns: Family<ConnLabels, Gauge>,
    resting: Family<UpstreamLabels, Gauge>,
    /// By upstream name; upstreams added by a reload join on first use.
    conn_counts: Mutex<Vec<(String, Arc<ConnCounts>)>>,
    accept_errors: Family<KindLabels, Counter>,
    endpoint_skips: Family<EndpointLabels, Counter>,
    endpoint_healthy: Family<EndpointLabels, Gauge>,
    endpoint_in_flight: Family<EndpointLabels, Gauge>,
    upstream_queued: Family<UpstreamLabels, Gauge>,
    upstream_endpoints: Family<UpstreamLabels, Gauge>,
    discovery_failures: Family<NameLabels, Counter>,
    /// The series of `endpoint_in_flight`, so that a reload can drop those it removed.
    /// With the wake-up each series' waiters share.
    in_flight_series: Mutex<Vec<(EndpointLabels, Arc<crate::upstream::balance::Room>)>>,
    health_checks: Family<HealthCheckLabels, Counter>,
    mirrors: Family<RouteOutcomeLabels, Counter>,
    auth_checks: Family<RouteOutcomeLabels, Counter>,
    tunnels_open: Gauge,
    tunnel_bytes: Family<TunnelLabels, Counter>,
    header_timeouts: Counter,
    rate_limited: Family<RouteLabels, Counter>,
    /// Requests over their client's rate that waited for their turn (`rate_limit.queue`).
    rate_delayed: Family<RouteLabels, Counter>,
    /// Requests answered 403 by a route's client rules, by route.
    client_denied: Family<RouteLabels, Counter>,
    /// Requests that matched no route, counted under the empty route name.
    unrouted: RouteMetrics,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

fn propagation_buckets() -> impl Iterator<Item = f64> {
    [
        0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
        0.1, 1.0,
    ]
    .into_iter()
}

impl Metrics {
    /// Registers every metric; `upstreams` names the upstreams whose connections are counted.
    pub fn new(upstreams: &[String]) -> Metrics {
        let mut registry = Registry::with_prefix("tether");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests by route, status class and outcome",
            requests.clone(),
        );
        let aborts = Family::default();
        registry.register(
            "aborts",
            "Requests cancelled before completion, by reason and the stage they were in",
            aborts.clone(),
        );
        let upstream_errors = Family::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by stage and kind",
            upstream_errors.clone(),
        );
        let retries = Family::default();
        registry.register("retries", "Upstream attempts retried", retries.clone());
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being served",
            in_flight.clone(),
        );
        let request_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "request_duration_seconds",
            "From the request head to the end of the response",
            request_duration.clone(),
        );
        let upstream_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "upstream_duration_seconds",
            "Time the upstream spent on a request",
            upstream_duration.clone(),
        );
        let propagation = Family::<PropagationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(propagation_buckets())
        });
        registry.register(
            "cancel_propagation_seconds",
            "From tether learning a request was cancelled to the upstream teardown being written",
            propagation.clone(),
        );
        let wasted = Family::default();
        registry.register(
            "upstream_wasted_seconds",
            "Upstream time spent on requests whose client left",
            wasted.clone(),
        );
        let conns = Family::default();
        registry.register(
            "upstream_connections",
            "Upstream connections by state",
            conns.clone(),
        );
        let resting = Family::default();
        registry.register(
            "upstream_resting_connections",
            "Idle upstream connections resting with only their socket (counted as idle too)",
            resting.clone(),
        );
        let accept_errors = Family::default();
        registry.register(
            "accept_errors",
            "Failed accepts on the listeners, by kind (emfile, enfile, enomem, other)",
            accept_errors.clone(),
        );
        let endpoint_skips = Family::default();
        registry.register(
            "upstream_endpoint_skips",
            "Times an upstream endpoint was skipped for fail_timeout after max_fails failed connection attempts",
            endpoint_skips.clone(),
        );
        let endpoint_healthy = Family::default();
        registry.register(
            "upstream_endpoint_healthy",
            "1 while an actively checked upstream endpoint is in rotation, 0 while its health checks keep it out",
            endpoint_healthy.clone(),
        );
        let endpoint_in_flight = Family::default();
        registry.register(
            "upstream_endpoint_in_flight",
            "Requests in flight to an upstream endpoint (upstreams balanced by least_requests or capped by max_in_flight_per_endpoint), over every worker",
            endpoint_in_flight.clone(),
        );
        let upstream_queued = Family::default();
        registry.register(
            "upstream_queued",
            "Requests waiting for room at an upstream whose endpoints are all at max_in_flight_per_endpoint",
            upstream_queued.clone(),
        );
        let upstream_endpoints = Family::default();
        registry.register(
            "upstream_endpoints",
            "Endpoints of an upstream: its addresses, and with discovery each address its names resolved to",
            upstream_endpoints.clone(),
        );
        let discovery_failures = Family::default();
        registry.register(
            "discovery_lookup_failures",
            "Failed lookups of a discovered upstream name (the addresses found before are kept)",
            discovery_failures.clone(),
        );
        let health_checks = Family::default();
        registry.register(
            "upstream_health_checks",
            "Active health checks by upstream and result (pass, fail)",
            health_checks.clone(),
        );
        let mirrors = Family::default();
        registry.register(
            "mirror_requests",
            "Copies of requests for a route's mirror, by outcome: the class of the mirror's status (2xx, 3xx, 4xx, 5xx), failed (no answer), cancelled (the client left or the deadline passed), skipped (a streamed body, or max_in_flight reached)",
            mirrors.clone(),
        );
        let auth_checks = Family::default();
        registry.register(
            "auth_checks",
            "Checks of requests by a route's auth service, by outcome: allowed (it answered 2xx), denied (its other answers, passed to the client), failed (no usable answer: the request was answered 502 or 504), cancelled (the client left or the deadline passed)",
            auth_checks.clone(),
        );
        let tunnels_open = Gauge::default();
        registry.register(
            "tunnels_open",
            "Tunnels open: connections joined after an upgrade (WebSocket)",
            tunnels_open.clone(),
        );
        let tunnel_bytes = Family::default();
        registry.register(
            "tunnel_bytes",
            "Bytes carried by tunnels, by route and direction (from_client, from_upstream), counted as they cross",
            tunnel_bytes.clone(),
        );
        let header_timeouts = Counter::default();
        registry.register(
            "header_read_timeouts",
            "HTTP/1 connections closed because a request head arrived too slowly (logged as 408)",
            header_timeouts.clone(),
        );
        let rate_limited = Family::default();
        registry.register(
            "rate_limited",
            "Requests answered 429 because their client was over the route's rate_limit, by route",
            rate_limited.clone(),
        );
        let rate_delayed = Family::default();
        registry.register(
            "rate_delayed",
            "Requests over their client's rate that waited for their turn (rate_limit.queue) instead of being answered 429, by route",
            rate_delayed.clone(),
        );
        let client_denied = Family::default();
        registry.register(
            "client_denied",
            "Requests answered 403 because the route does not serve their client (allow_clients, deny_clients), by route",
            client_denied.clone(),
        );
        Metrics {
            registry,
            requests,
            aborts,
            upstream_errors,
            retries,
            in_flight,
            request_duration,
            upstream_duration,
            propagation,
            wasted,
            conns,
            resting,
            conn_counts: Mutex::new(
                upstreams
                    .iter()
                    .map(|u| (u.clone(), Arc::default()))
                    .collect(),
            ),
            accept_errors,
            endpoint_skips,
            endpoint_healthy,
            endpoint_in_flight,
            upstream_queued,
            upstream_endpoints,
            discovery_failures,
            in_flight_series: Mutex::default(),
            health_checks,
            mirrors,
            auth_checks,
            tunnels_open,
            tunnel_bytes,
            header_timeouts,
            rate_limited,
            rate_delayed,
            client_denied,
            unrouted: RouteMetrics::named(""),
        }
    }

    /// The connection counters of the upstream named `name`, registered on first use (an upstream
    /// added by a reload). Every generation's pools of one upstream share them.
    pub fn conn_counts(&self, name: &str) -> Arc<ConnCounts> {
        let mut all = self
            .conn_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, c)) = all.iter().find(|(n, _)| n == name) {
            return c.clone();
        }
        let c = Arc::<ConnCounts>::default();
        all.push((name.to_owned(), c.clone()));
        c
    }

    /// A listener's accept failed; `kind` is from a closed set.
    pub fn accept_error(&self, kind: &'static str) {
        self.accept_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Whether an actively checked endpoint is in rotation.
    pub fn endpoint_health(&self, upstream: &str, endpoint: &str, healthy: bool) {
        self.endpoint_healthy
            .get_or_create(&EndpointLabels::new(upstream, endpoint))
            .set(i64::from(healthy));
    }

    /// The byte counters of a tunnel on `route`.
    pub fn tunnel_counters(&self, route: &str) -> TunnelCounters {
        let counter = |direction| {
            self.tunnel_bytes
                .get_or_create(&TunnelLabels {
                    route: route.to_owned(),
                    direction,
                })
                .clone()
        };
        TunnelCounters {
            from_client: counter("from_client"),
            from_upstream: counter("from_upstream"),
        }
    }

    /// Counts a tunnel as open until the returned guard drops.
    pub fn tunnel_open(&self) -> TunnelOpen {
        self.tunnels_open.inc();
        TunnelOpen(self.tunnels_open.clone())
    }

    /// The requests in flight to `upstream`'s `endpoint`, shared by every worker and every
    /// configuration that has the endpoint.
    pub fn endpoint_load(&self, upstream: &str, endpoint: &str) -> Load {
        let labels = EndpointLabels::new(upstream, endpoint);
        let gauge = self.endpoint_in_flight.get_or_create_owned(&labels);
        let mut series = self
            .in_flight_series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // One wake-up for all of an upstream's endpoints.
        let freed = series
            .iter()
            .find(|(l, _)| l.upstream == labels.upstream)
            .map(|(_, freed)| freed.clone())
            .unwrap_or_else(|| {
                let queued = self.upstream_queued.get_or_create_owned(&UpstreamLabels {
                    upstream: upstream.to_owned(),
                });
                Arc::new(crate::upstream::balance::Room::new(queued))
            });
        if !series.iter().any(|(l, _)| *l == labels) {
            series.push((labels, freed.clone()));
        }
        Load::new(gauge, freed)
    }

    /// Drops the in-flight series of endpoints that `config` neither balances by
    /// `least_requests` nor caps. Requests still in flight to them keep their own count.
    pub fn retain_endpoint_loads(&self, config: &crate::config::Config) {
        let mut series = self
            .in_flight_series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut before: Vec<String> = series.iter().map(|(l, _)| l.upstream.clone()).collect();
        before.sort_unstable();
        before.dedup();
        series.retain(|(l, _)| {
            let kept = config.upstreams.iter().any(|u| {
                u.name == l.upstream
                    && u.counts_in_flight()
                    && u.addresses.iter().any(|a| a.to_string() == l.endpoint)
            });
            if !kept {
                self.endpoint_in_flight.remove(l);
            }
            kept
        });
        // An upstream left with no counted endpoint has no queue either.
        for upstream in before {
            if !series.iter().any(|(l, _)| l.upstream == upstream) {
                self.upstream_queued.remove(&UpstreamLabels { upstream });
            }
        }
    }

    /// Sets each upstream's endpoint count from the configuration the workers now run; upstreams
    /// it no longer has leave no series behind.
    pub fn set_endpoints(&self, config: &crate::config::Config) {
        self.upstream_endpoints.clear();
        for u in &config.upstreams {
            self.upstream_endpoints
                .get_or_create(&UpstreamLabels {
                    upstream: u.name.clone(),
                })
                .set(i64::try_from(u.addresses.len()).unwrap_or(i64::MAX));
        }
    }

    /// A lookup of the discovered name `name` failed.
    pub fn discovery_failed(&self, name: &str) {
        self.discovery_failures
            .get_or_create(&NameLabels {
                name: name.to_owned(),
            })
            .inc();
    }

    /// Forgets every endpoint's health gauge: a new configuration's checks set theirs again, and
    /// endpoints it no longer has leave no series behind.
    pub fn reset_endpoint_health(&self) {
        self.endpoint_healthy.clear();
    }

    /// An active health check of one of `upstream`'s endpoints passed or failed.
    pub fn health_check(&self, upstream: &str, passed: bool) {
        self.health_checks
            .get_or_create(&HealthCheckLabels {
                upstream: upstream.to_owned(),
                result: if passed { "pass" } else { "fail" },
            })
            .inc();
    }

    /// A copy of one of `route`'s requests for its mirror ended with `outcome`.
    pub fn mirrored(&self, route: &str, outcome: &'static str) {
        self.mirrors
            .get_or_create(&RouteOutcomeLabels {
                route: route.to_owned(),
                outcome,
            })
            .inc();
    }

    /// One of `route`'s requests was checked by its auth service, with `outcome`.
    pub fn auth_checked(&self, route: &str, outcome: &'static str) {
        self.auth_checks
            .get_or_create(&RouteOutcomeLabels {
                route: route.to_owned(),
                outcome,
            })
            .inc();
    }

    /// A request of `route` was over its client's rate limit.
    pub fn rate_limited(&self, route: &str) {
        self.rate_limited
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }

    /// A request of `route` over its client's rate waits for its turn.
    pub fn rate_delayed(&self, route: &str) {
        self.rate_delayed
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }

    /// A request of `route` came from a client the route does not serve.
    pub fn client_denied(&self, route: &str) {
        self.client_denied
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }

    /// An upstream endpoint is skipped for its upstream's `fail_timeout`.
    pub fn endpoint_skipped(&self, upstream: &str, endpoint: &str) {
        self.endpoint_skips
            .get_or_create(&EndpointLabels::new(upstream, endpoint))
            .inc();
    }

    /// An HTTP/1 connection timed out in the middle of a request head.
    pub fn header_read_timeout(&self) {
        self.header_timeouts.inc();
    }

    /// A request started.
    pub fn request_started(&self) {
        self.in_flight.inc();
    }

    /// The handles of route `name`'s metrics, for [`Metrics::request_finished`]. Made once per
    /// route, so a request costs no label lookup.
    pub fn route(&self, name: &str) -> RouteMetrics {
        RouteMetrics::named(name)
    }

    /// A request ended; `rec` is its access-log record, `route` its route's handles (None when
    /// no route matched).
    pub fn request_finished(&self, rec: &RequestRecord, route: Option<&RouteMetrics>) {
        self.in_flight.dec();
        let route = route.unwrap_or(&self.unrouted);
        let class = status_class_index(rec.status);
        let outcome = rec.outcome as usize;
        route.requests[class][outcome]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        route: route.name.clone(),
                        status_class: status_class(rec.status),
                        outcome: rec.outcome.as_str(),
                    })
                    .clone()
            })
            .inc();
        let labels = || RouteLabels {
            route: route.name.clone(),
        };
        route
            .duration
            .get_or_init(|| self.request_duration.get_or_create(&labels()).clone())
            .observe(rec.duration.as_secs_f64());
        if let Some(u) = rec.upstream_time {
            route
                .upstream_duration
                .get_or_init(|| self.upstream_duration.get_or_create(&labels()).clone())
                .observe(u.as_secs_f64());
        }
        if rec.retries > 0 {
            route
                .retries
                .get_or_init(|| self.retries.get_or_create(&labels()).clone())
                .inc_by(u64::from(rec.retries));
        }
        if let Some(reason) = rec.abort_reason {
            self.aborts
                .get_or_create(&AbortLabels {
                    route: route.name.clone(),
                    reason: reason.as_str(),
                    stage: rec.stage.unwrap_or("unknown"),
                })
                .inc();
            if rec.outcome == Outcome::ClientAbort
                && let Some(u) = rec.upstream_time
            {
                route
                    .wasted
                    .get_or_init(|| self.wasted.get_or_create(&labels()).clone())
                    .inc_by(u.as_secs_f64());
            }
        }
        if let Some(p) = rec.propagation {
            self.propagation
                .get_or_create(&PropagationLabels {
                    upstream_protocol: rec.upstream_protocol.unwrap_or("none"),
                })
                .observe(p.as_secs_f64());
        }
    }

    /// An upstream attempt failed.
    pub fn upstream_error(&self, upstream: &str, err: &ProxyError) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                upstream: upstream.to_owned(),
                stage: err.stage.as_str(),
                kind: err.kind.as_str(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let counts = self
            .conn_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for (name, c) in &counts {
            let open = c.open.load(Ordering::Relaxed);
            let idle = c.idle.load(Ordering::Relaxed);
            let states = [
                ("idle", idle),
                ("active", (open - idle).max(0)),
                ("connecting", c.connecting.load(Ordering::Relaxed)),
            ];
            for (state, v) in states {
                self.conns
                    .get_or_create(&ConnLabels {
                        upstream: name.clone(),
                        state,
                    })
                    .set(v);
            }
            self.resting
                .get_or_create(&UpstreamLabels {
                    upstream: name.clone(),
                })
                .set(c.resting.load(Ordering::Relaxed));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

const STATUS_CLASSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "499", "5xx", "other"];

fn status_class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=498 => 3,
        499 => 4,
        500..=599 => 5,
        _ => 6,
    }
}

fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[status_class_index(status)]
}

/// One route's metric handles, taken from the families on first use (so a route that never saw
/// a retry exports no retry counter), then updated without a label lookup.
#[derive(Debug)]
pub struct RouteMetrics {
    name: String,
    requests: [[OnceLock<Counter>; Outcome::COUNT]; STATUS_CLASSES.len()],
    duration: OnceLock<Histogram>,
    upstream_duration: OnceLock<Histogram>,
    retries: OnceLock<Counter>,
    wasted: OnceLock<Counter<f64, std::sync::atomic::AtomicU64>>,
}

impl RouteMetrics {
    fn named(name: &str) -> RouteMetrics {
        RouteMetrics {
            name: name.to_owned(),
            requests: Default::default(),
            duration: OnceLock::new(),
            upstream_duration: OnceLock::new(),
            retries: OnceLock::new(),
            wasted: OnceLock::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_loads_are_shared_by_label_and_dropped_with_their_endpoint() {
        use crate::config::{Balance, Config, ListenerConfig, RouteConfig, UpstreamConfig};
        let m = Metrics::new(&["app".to_owned()]);
        // Two workers' views of one endpoint count together.
        let (one, two) = (
            m.endpoint_load("app", "a:80"),
            m.endpoint_load("app", "a:80"),
        );
        let held = one.hold();
        assert_eq!(two.get(), 1);
        let mut up = UpstreamConfig::new(
            "app",
            vec![crate::config::UpstreamAddress::new("a", 80)],
            crate::config::UpstreamProtocol::Http1,
        );
        up.balance = Balance::LeastRequests;
        let listener = ListenerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            vec![RouteConfig::new("/", "app")],
        );
        let config = Config::new(vec![listener], vec![up]);
        m.retain_endpoint_loads(&config);
        assert!(m.encode().contains("endpoint=\"a:80\"} 1"));
        let mut config = config;
        config.upstreams[0].balance = Balance::RoundRobin;
        m.retain_endpoint_loads(&config);
        assert!(!m.encode().contains("upstream_endpoint_in_flight{"));
        drop(held);
        assert_eq!(one.get(), 0);
    }

    #[test]
    fn status_classes() {
        for s in [100, 199, 200, 302, 404, 499, 500, 599, 600, 0] {
            assert_eq!(
                status_class(s),
                STATUS_CLASSES[status_class_index(s)],
                "{s}"
            );
        }
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(499), "499");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(504), "5xx");
    }

    #[test]
    fn encodes_registered_metrics() {
        let m = Metrics::new(&["app".to_owned()]);
        m.request_started();
        let text = m.encode();
        assert!(text.contains("tether_in_flight_requests 1"), "{text}");
        assert!(
            text.contains("tether_upstream_connections{upstream=\"app\",state=\"idle\"} 0"),
            "{text}"
        );
    }
}
