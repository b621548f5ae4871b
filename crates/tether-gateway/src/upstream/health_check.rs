//! Active health checks. Every `interval`, each endpoint of an upstream with a `health_check`
//! gets `GET path` on a connection of its own, made by the same connector (DNS, address racing,
//! TLS) and HTTP client the requests use. After `unhealthy_after` failed checks in a row (no
//! connection, no answer within `timeout`, or a status outside 200–399) the endpoint is taken out
//! of rotation on every worker; after `healthy_after` passed ones it is put back. Endpoints start
//! in rotation. The checks run on a thread of their own (started by `listen`) and start again
//! with each reload; an upstream the reload leaves as it was keeps what they found.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{HOST, HeaderValue, USER_AGENT};
use http::{Method, Request, Uri};
use tokio::task::JoinSet;

use super::{Checkout, Upstream, dns};
use crate::config::{HealthCheck, UpstreamConfig};
use crate::observe::metrics::Metrics;
use crate::proxy::request_body::RequestBody;

/// Which endpoints of one upstream the checks took out of rotation, shared by every worker.
#[derive(Debug)]
pub struct ActiveHealth {
    down: Vec<AtomicBool>,
}

impl ActiveHealth {
    /// State for `endpoints` endpoints, all in rotation.
    pub fn new(endpoints: usize) -> Arc<ActiveHealth> {
        Arc::new(ActiveHealth {
            down: (0..endpoints).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// Whether endpoint `i` failed its checks and is out of rotation.
    pub fn is_down(&self, i: usize) -> bool {
        self.down.get(i).is_some_and(|d| d.load(Ordering::Relaxed))
    }

    fn set_down(&self, i: usize, down: bool) {
        if let Some(d) = self.down.get(i) {
            d.store(down, Ordering::Relaxed);
        }
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
    for i in 0..config.addresses.len() {
        let (upstream, t, metrics) = (upstream.clone(), t.clone(), metrics.clone());
        checks.spawn(async move { endpoint(upstream, t, i, metrics).await });
    }
}

/// Checks endpoint `i` until aborted, moving it in and out of rotation.
async fn endpoint(upstream: Arc<Upstream>, t: Target, i: usize, metrics: Arc<Metrics>) {
    let Some(address) = upstream.endpoint_address(i).cloned() else {
        return;
    };
    let endpoint = address.to_string();
    metrics.endpoint_health(&upstream.name, &endpoint, !t.state.is_down(i));
    let (mut fails, mut passes) = (0u32, 0u32);
    loop {
        let result = check(&upstream, i, &t).await;
        metrics.health_check(&upstream.name, result.is_ok());
        let down = t.state.is_down(i);
        match result {
            Ok(()) => {
                fails = 0;
                passes = passes.saturating_add(1);
                if down && passes >= t.check.healthy_after {
                    t.state.set_down(i, false);
                    metrics.endpoint_health(&upstream.name, &endpoint, true);
                    tracing::info!(upstream = %upstream.name, endpoint, "endpoint passed its health checks and is back in rotation");
                }
            }
            Err(reason) => {
                passes = 0;
                fails = fails.saturating_add(1);
                if !down && fails >= t.check.unhealthy_after {
                    t.state.set_down(i, true);
                    metrics.endpoint_health(&upstream.name, &endpoint, false);
                    tracing::warn!(upstream = %upstream.name, endpoint, reason, "endpoint failed its health checks and is out of rotation");
                }
            }
        }
        tokio::time::sleep(t.check.interval).await;
    }
}

/// One check of endpoint `i`: `Err` says why it failed.
async fn check(upstream: &Upstream, i: usize, t: &Target) -> Result<(), String> {
    let timeout = t.check.timeout;
    let attempt = async {
        let address = upstream
            .endpoint_address(i)
            .ok_or_else(|| "no such endpoint".to_owned())?;
        let req = request(upstream, &t.config, address, &t.check.path)?;
        let checkout = upstream
            .connect_once(i, timeout)
            .await
            .map_err(|e| format!("{}: {e}", e.stage))?;
        // `send_request`, not the `try_send_request` requests use: see `connect_once`.
        let resp = match checkout {
            Checkout::H1(mut c) => c.sender.send_request(req).await,
            Checkout::H2(mut c) => c.sender.send_request(req).await,
        }
        .map_err(|e| format!("no answer: {e}"))?;
        let status = resp.status();
        // The body is not read: dropping it closes the connection (HTTP/1) or resets the
        // stream (HTTP/2).
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("status {}", status.as_u16()))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// `GET path`, addressed to the endpoint (the TLS server name when one is set).
fn request(
    upstream: &Upstream,
    config: &UpstreamConfig,
    address: &crate::config::UpstreamAddress,
    path: &str,
) -> Result<Request<RequestBody>, String> {
    let host = match config.tls.as_ref().and_then(|t| t.server_name.as_deref()) {
        Some(name) => name.to_owned(),
        None => address.to_string(),
    };
    let uri: Uri = if upstream.protocol.is_h2() {
        let scheme = if upstream.is_tls() { "https" } else { "http" };
        format!("{scheme}://{host}{path}").parse()
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
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_start_in_rotation_and_out_of_range_is_never_down() {
        let s = ActiveHealth::new(2);
        assert!(!s.is_down(0) && !s.is_down(1));
        s.set_down(1, true);
        assert!(!s.is_down(0) && s.is_down(1));
        s.set_down(7, true);
        assert!(!s.is_down(7));
    }
}
