//! Active health checks. Every `interval` (plus up to a tenth of it at random, so that endpoints
//! and gateways drift apart), each endpoint of an upstream with a `health_check` gets `GET path`
//! on a connection of its own, made by the same connector (DNS, address racing, TLS) and HTTP
//! client the requests use. After `unhealthy_after` failed checks in a row (no connection, no
//! answer within `timeout`, a status not expected, or a body without the expected text) the
//! endpoint is taken out of rotation on every worker; after `healthy_after` passed ones it is put
//! back. Endpoints start in rotation. The checks run on a thread of their own (started by
//! `listen`) and start again with each reload; an upstream the reload leaves as it was keeps what
//! they found.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use http::header::{CONTENT_TYPE, HOST, HeaderValue, TE, USER_AGENT};
use http::{Method, Request, Uri};
use http_body_util::BodyExt;
use tokio::task::JoinSet;

use super::{Checkout, Upstream, dns};
use crate::config::{HEALTH_BODY_LIMIT, HealthCheck, UpstreamAddress, UpstreamConfig};
use crate::observe::metrics::Metrics;
use crate::proxy::headers::Rewrite;
use crate::proxy::request_body::RequestBody;

/// Which endpoints of one upstream the checks took out of rotation, shared by every worker, and
/// each one's run of results.
#[derive(Debug)]
pub struct ActiveHealth {
    endpoints: Vec<Checked>,
    /// What the endpoints' `up_at` count from.
    epoch: tokio::time::Instant,
}

/// One endpoint's checks: whether they took it out, and its results in a row. Kept here rather
/// than in the task checking it, so that checks started again (a reload, a discovery change)
/// go on counting.
#[derive(Debug, Default)]
struct Checked {
    down: AtomicBool,
    fails: AtomicU32,
    passes: AtomicU32,
    /// Milliseconds after the epoch when its checks last put it back in rotation; 0: never.
    up_at: AtomicU64,
}

impl ActiveHealth {
    /// State for `endpoints` endpoints, all in rotation.
    pub fn new(endpoints: usize) -> Arc<ActiveHealth> {
        Arc::new(ActiveHealth {
            endpoints: (0..endpoints).map(|_| Checked::default()).collect(),
            epoch: tokio::time::Instant::now(),
        })
    }

    /// State for the endpoints `now`, each that was among `before` keeping what its checks
    /// found in `state` (in or out of rotation, and its results in a row); the others in
    /// rotation until their checks say otherwise.
    pub fn carried(
        state: &ActiveHealth,
        before: &[UpstreamAddress],
        now: &[UpstreamAddress],
    ) -> Arc<ActiveHealth> {
        let load = |a: &AtomicU32| a.load(Ordering::Relaxed);
        Arc::new(ActiveHealth {
            epoch: state.epoch,
            endpoints: now
                .iter()
                .map(|a| {
                    let was = before.iter().position(|b| b == a);
                    match was.and_then(|i| state.endpoints.get(i)) {
                        Some(c) => Checked {
                            down: AtomicBool::new(c.down.load(Ordering::Relaxed)),
                            fails: AtomicU32::new(load(&c.fails)),
                            passes: AtomicU32::new(load(&c.passes)),
                            up_at: AtomicU64::new(c.up_at.load(Ordering::Relaxed)),
                        },
                        None => Checked::default(),
                    }
                })
                .collect(),
        })
    }

    /// Whether endpoint `i` failed its checks and is out of rotation.
    pub fn is_down(&self, i: usize) -> bool {
        self.endpoints
            .get(i)
            .is_some_and(|c| c.down.load(Ordering::Relaxed))
    }

    /// When the checks last put endpoint `i` back in rotation, if they ever did.
    pub fn up_since(&self, i: usize) -> Option<tokio::time::Instant> {
        let at = self.endpoints.get(i)?.up_at.load(Ordering::Relaxed);
        (at != 0).then(|| self.epoch + Duration::from_millis(at))
    }

    fn set_down(&self, i: usize, down: bool) {
        if let Some(c) = self.endpoints.get(i) {
            if !down && c.down.load(Ordering::Relaxed) {
                let ms = self.epoch.elapsed().as_millis();
                c.up_at.store(
                    u64::try_from(ms).unwrap_or(u64::MAX).max(1),
                    Ordering::Relaxed,
                );
            }
            c.down.store(down, Ordering::Relaxed);
        }
    }

    /// Counts a check of endpoint `i`; its results in a row of that kind so far.
    fn record(&self, i: usize, passed: bool) -> u32 {
        let Some(c) = self.endpoints.get(i) else {
            return 0;
        };
        let (run, other) = if passed {
            (&c.passes, &c.fails)
        } else {
            (&c.fails, &c.passes)
        };
        other.store(0, Ordering::Relaxed);
        run.fetch_add(1, Ordering::Relaxed).saturating_add(1)
    }
}

/// One upstream to check: its configuration, its checks and the state they update.
#[derive(Debug, Clone)]
pub struct Target {
    /// The upstream.
    pub config: UpstreamConfig,
    /// What to check.
    pub check: HealthCheck,
    /// Shared with the workers' view of the upstream.
    pub state: Arc<ActiveHealth>,
}

/// Starts one task in `checks` per endpoint of `t`; they run until the set is dropped.
pub fn start(checks: &mut JoinSet<()>, t: Target, resolver: dns::Resolver, metrics: &Arc<Metrics>) {
    // A view of the upstream of its own, with no idle connections: every check connects afresh.
    let mut config = t.config.clone();
    config.max_idle_per_endpoint = 0;
    let upstream = match Upstream::new(&config, resolver, Arc::default(), None, None) {
        Ok(u) => Arc::new(u),
        // Checked when the configuration was loaded.
        Err(e) => return tracing::error!(error = %e, upstream = %config.name, "cannot check"),
    };
    let rules = match t.check.header_rules() {
        Ok(r) => Arc::new(r),
        // Checked when the configuration was loaded.
        Err(e) => return tracing::error!(error = %e, upstream = %config.name, "cannot check"),
    };
    for i in 0..config.addresses.len() {
        let (upstream, t, rules, metrics) =
            (upstream.clone(), t.clone(), rules.clone(), metrics.clone());
        checks.spawn(async move { endpoint(upstream, t, rules, i, metrics).await });
    }
}

/// `interval` plus up to a tenth of it, from `random`.
fn jittered(interval: Duration, random: u64) -> Duration {
    let spread = u64::try_from(interval.as_micros() / 10).unwrap_or(u64::MAX);
    interval + Duration::from_micros(random % spread.saturating_add(1))
}

/// Checks endpoint `i` until aborted, moving it in and out of rotation.
async fn endpoint(
    upstream: Arc<Upstream>,
    t: Target,
    rules: Arc<Rewrite>,
    i: usize,
    metrics: Arc<Metrics>,
) {
    let Some(address) = upstream.endpoint_address(i).cloned() else {
        return;
    };
    let endpoint = address.to_string();
    metrics.endpoint_health(&upstream.name, &endpoint, !t.state.is_down(i));
    loop {
        let result = check(&upstream, i, &t, &rules).await;
        metrics.health_check(&upstream.name, result.is_ok());
        let down = t.state.is_down(i);
        let run = t.state.record(i, result.is_ok());
        match result {
            Ok(()) => {
                if down && run >= t.check.healthy_after {
                    t.state.set_down(i, false);
                    metrics.endpoint_health(&upstream.name, &endpoint, true);
                    tracing::info!(upstream = %upstream.name, endpoint, "endpoint passed its health checks and is back in rotation");
                }
            }
            Err(reason) => {
                if !down && run >= t.check.unhealthy_after {
                    t.state.set_down(i, true);
                    metrics.endpoint_health(&upstream.name, &endpoint, false);
                    tracing::warn!(upstream = %upstream.name, endpoint, reason, "endpoint failed its health checks and is out of rotation");
                }
            }
        }
        let random = crate::observe::trace_context::random_nonzero();
        tokio::time::sleep(jittered(t.check.interval, random)).await;
    }
}

/// One check of endpoint `i`: `Err` says why it failed.
async fn check(upstream: &Upstream, i: usize, t: &Target, rules: &Rewrite) -> Result<(), String> {
    let timeout = t.check.timeout;
    let attempt = async {
        let address = upstream
            .endpoint_address(i)
            .ok_or_else(|| "no such endpoint".to_owned())?;
        let mut req = request(upstream, &t.config, address, &t.check.path, rules)?;
        if let Some(service) = &t.check.grpc {
            *req.method_mut() = Method::POST;
            *req.body_mut() = RequestBody::from_bytes(crate::grpc::health_request(service));
            let h = req.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert(TE, HeaderValue::from_static("trailers"));
        }
        let checkout = upstream
            .connect_once(i, timeout)
            .await
            .map_err(|e| format!("{}: {e}", e.stage))?;
        // `send_request`, not the `try_send_request` requests use: see `connect_once`.
        let resp = match checkout {
            Checkout::H1(mut c) => c.sender.send_request(req).await,
            Checkout::H2(mut c, _place) => c.sender.send_request(req).await,
        }
        .map_err(|e| format!("no answer: {e}"))?;
        let status = resp.status().as_u16();
        if t.check.grpc.is_some() {
            return grpc_serving(resp).await;
        }
        if !t.check.status_passes(status) {
            return Err(format!("status {status}"));
        }
        // Without an expected text the body is not read: dropping it closes the connection
        // (HTTP/1) or resets the stream (HTTP/2).
        match &t.check.expect_body {
            None => Ok(()),
            Some(text) => body_contains(resp.into_body(), text.as_bytes()).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Whether a gRPC health check's answer says `SERVING`: status 200, `grpc-status` 0, and one
/// `HealthCheckResponse` whose status is `SERVING`.
async fn grpc_serving<B>(resp: http::Response<B>) -> Result<(), String>
where
    B: http_body::Body + Unpin,
    B::Data: bytes::Buf,
    B::Error: std::fmt::Display,
{
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(format!("status {status}"));
    }
    let (parts, mut body) = resp.into_parts();
    let mut data: Vec<u8> = Vec::new();
    // A trailers-only answer has its status in the head.
    let mut trailers = parts
        .headers
        .contains_key(crate::grpc::GRPC_STATUS)
        .then_some(parts.headers);
    while trailers.is_none() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        match frame.into_data() {
            Ok(mut d) => {
                let len = bytes::Buf::remaining(&d);
                if data.len() + len > HEALTH_BODY_LIMIT {
                    return Err("answer too long".into());
                }
                data.extend_from_slice(&bytes::Buf::copy_to_bytes(&mut d, len));
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let text = |name| {
        trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or("")
    };
    match text(crate::grpc::GRPC_STATUS) {
        "0" => {}
        "" => return Err("no grpc-status".into()),
        code => {
            return Err(format!(
                "grpc-status {code} {}",
                text(crate::grpc::GRPC_MESSAGE)
            ));
        }
    }
    match crate::grpc::health_status(&data) {
        Some(crate::grpc::SERVING) => Ok(()),
        Some(2) => Err("NOT_SERVING".into()),
        Some(3) => Err("SERVICE_UNKNOWN".into()),
        Some(s) => Err(format!("health status {s}")),
        None => Err("not a HealthCheckResponse".into()),
    }
}

/// Reads `body` until it contains `text`, ends, or passes [`HEALTH_BODY_LIMIT`] bytes.
async fn body_contains<B>(mut body: B, text: &[u8]) -> Result<(), String>
where
    B: http_body::Body + Unpin,
    B::Data: bytes::Buf,
    B::Error: std::fmt::Display,
{
    let mut seen: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        let len = bytes::Buf::remaining(&data);
        let data = bytes::Buf::copy_to_bytes(&mut data, len);
        // Search only what can hold a new match: the last bytes seen and the new ones.
        let from = seen.len().saturating_sub(text.len().saturating_sub(1));
        let room = HEALTH_BODY_LIMIT.saturating_sub(seen.len());
        seen.extend_from_slice(&data[..data.len().min(room)]);
        if seen[from..].windows(text.len()).any(|w| w == text) {
            return Ok(());
        }
        if seen.len() >= HEALTH_BODY_LIMIT {
            break;
        }
    }
    Err(format!(
        "body does not contain {:?}",
        String::from_utf8_lossy(text)
    ))
}

/// `GET path`, addressed to the endpoint (the TLS server name when one is set) unless the
/// check's headers set a `host`, with those headers.
fn request(
    upstream: &Upstream,
    config: &UpstreamConfig,
    address: &crate::config::UpstreamAddress,
    path: &str,
    rules: &Rewrite,
) -> Result<Request<RequestBody>, String> {
    let host = match (
        rules.host().and_then(|h| h.to_str().ok()),
        config.tls.as_ref().and_then(|t| t.server_name.as_deref()),
    ) {
        (Some(host), _) | (None, Some(host)) => host.to_owned(),
        (None, None) => address.authority(),
    };
    let uri: Uri = if upstream.protocol.is_h2() {
        format!("{}://{host}{path}", upstream.scheme()).parse()
    } else {
        path.parse()
    }
    .map_err(|e| format!("bad check target: {e}"))?;
    let mut req = Request::new(RequestBody::empty());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.insert(USER_AGENT, HeaderValue::from_static("tether-health-check"));
    if !upstream.protocol.is_h2() {
        let host = HeaderValue::from_str(&host).map_err(|e| format!("bad host: {e}"))?;
        headers.insert(HOST, host);
    }
    rules.apply(headers);
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_kept_by_a_new_configuration_keeps_its_state() {
        let a = |s: &str| UpstreamAddress::from(s.parse::<std::net::SocketAddr>().unwrap());
        let before = [a("10.0.0.1:80"), a("10.0.0.2:80"), a("10.0.0.3:80")];
        let state = ActiveHealth::new(3);
        state.set_down(1, true);
        state.set_down(2, true);
        assert_eq!(state.record(0, false), 1);
        let now = [a("10.0.0.2:80"), a("10.0.0.4:80"), a("10.0.0.1:80")];
        let carried = ActiveHealth::carried(&state, &before, &now);
        assert_eq!(
            (0..3).map(|i| carried.is_down(i)).collect::<Vec<_>>(),
            [true, false, false]
        );
        // Runs of results go on: 10.0.0.1 had one failure, the new one none.
        assert_eq!(carried.record(2, false), 2);
        assert_eq!(carried.record(1, false), 1);
        assert_eq!(
            carried.record(2, true),
            1,
            "a pass ends the run of failures"
        );
    }

    /// A body sent in the given chunks.
    struct Chunks(std::collections::VecDeque<&'static [u8]>);

    impl http_body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            let next = self.0.pop_front();
            std::task::Poll::Ready(
                next.map(|c| Ok(http_body::Frame::data(bytes::Bytes::from_static(c)))),
            )
        }
    }

    #[tokio::test]
    async fn the_expected_text_is_found_across_chunks_within_the_limit() {
        let found = |chunks: Vec<&'static [u8]>, text: &'static str| async move {
            body_contains(Chunks(chunks.into()), text.as_bytes())
                .await
                .is_ok()
        };
        assert!(found(vec![b"{\"status\":", b"\"ready\"}"], "\"ready\"").await);
        assert!(found(vec![b"re", b"a", b"dy"], "ready").await);
        assert!(!found(vec![b"rea", b"d"], "ready").await);
        assert!(!found(vec![], "ready").await);
        // Past the first 64 KiB nothing is looked at.
        static FILL: [u8; HEALTH_BODY_LIMIT] = [b'.'; HEALTH_BODY_LIMIT];
        assert!(!found(vec![&FILL, b"ready"], "ready").await);
        assert!(found(vec![&FILL[5..], b"ready"], "ready").await);
    }

    #[test]
    fn checks_wait_their_interval_and_at_most_a_tenth_more() {
        let interval = Duration::from_secs(5);
        for random in [0, 1, 499_999, 500_000, 500_001, u64::MAX] {
            let d = jittered(interval, random);
            assert!(
                d >= interval && d <= interval + interval / 10,
                "{random}: {d:?}"
            );
        }
        assert_eq!(jittered(Duration::ZERO, 7), Duration::ZERO);
    }

    #[test]
    fn endpoints_start_in_rotation_and_out_of_range_is_never_down() {
        let s = ActiveHealth::new(2);
        assert!(!s.is_down(0) && !s.is_down(1));
        s.set_down(1, true);
        assert!(!s.is_down(0) && s.is_down(1));
        s.set_down(7, true);
        assert!(!s.is_down(7));
        // Back in rotation: noted for slow start, and carried over.
        assert_eq!(s.up_since(1), None);
        s.set_down(1, false);
        let up = s.up_since(1).unwrap();
        // Noted to the millisecond, at least 1 ms after the epoch.
        assert!(up <= tokio::time::Instant::now() + Duration::from_millis(1));
        s.set_down(0, false);
        assert_eq!(s.up_since(0), None, "never out, so never back");
        let a = |s: &str| UpstreamAddress::from(s.parse::<std::net::SocketAddr>().unwrap());
        let addrs = [a("10.0.0.1:80"), a("10.0.0.2:80")];
        assert_eq!(
            ActiveHealth::carried(&s, &addrs, &addrs).up_since(1),
            Some(up)
        );
    }
}
