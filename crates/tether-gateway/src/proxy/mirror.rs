//! Request mirroring (shadow traffic): a copy of a route's request goes to another upstream too,
//! as nginx's `mirror` and Envoy's request mirror policies send it, to try a new version of a
//! service on real traffic. The copy never delays the request nor changes its answer: it runs in
//! a task of its own and its answer is read and dropped. It is still the client's work: when
//! the client leaves or the request's deadline passes, the copy is cancelled like the request
//! (its upstream connection closed, or its HTTP/2 stream reset). Only a request whose body is
//! whole in tether can be copied: bodiless, or read ahead (`retry_body_bytes`,
//! `request_buffer_bytes`); one whose body streams is not mirrored.

use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Uri, Version};
use http_body_util::BodyExt;
use tether::RequestContext;

use super::Replay;
use super::request_body::RequestBody;
use crate::admission::Limit;
use crate::error::{ErrorKind, ProxyError, Stage};
use crate::observe::metrics::Metrics;
use crate::upstream::{Checkout, Upstream, Want};

/// Where a route's copies go.
#[derive(Debug)]
pub struct MirrorTarget {
    /// Index of the upstream in the worker's list.
    pub upstream: usize,
    /// Requests copied in a million.
    pub per_million: u32,
    /// Copies in flight, all workers together (kept across reloads like the route's own limit).
    pub in_flight: Arc<Limit>,
}

/// Sends a copy of `req` (the request as it goes to the route's own upstream) to the mirror, if
/// request `id` is among those the mirror takes, in a task of its own; `ctx` is the request's.
#[allow(
    clippy::too_many_arguments,
    reason = "the request's parts, each used once"
)]
pub fn start(
    target: &MirrorTarget,
    upstream: &Arc<Upstream>,
    req: &Request<RequestBody>,
    id: &str,
    ctx: &RequestContext,
    connect_timeout: Duration,
    metrics: &Arc<Metrics>,
    route: &Arc<str>,
) {
    if !crate::config::sampled(id, target.per_million) {
        return;
    }
    let skipped = || metrics.mirrored(route, "skipped");
    let Some(copy) = copy_for(req, upstream) else {
        return skipped();
    };
    let Some(permit) = target.in_flight.try_acquire() else {
        return skipped();
    };
    let (upstream, ctx, metrics, route) = (
        upstream.clone(),
        ctx.clone(),
        metrics.clone(),
        route.clone(),
    );
    tokio::spawn(async move {
        let outcome = tokio::select! {
            biased;
            _ = ctx.cancelled() => "cancelled",
            r = exchange(&upstream, copy, connect_timeout) => match r {
                // By class: a mirror answering 5xx where the route's upstream does not is what
                // shadow traffic is there to show.
                Ok(status) => match status {
                    100..=199 => "1xx",
                    200..=299 => "2xx",
                    300..=399 => "3xx",
                    400..=499 => "4xx",
                    _ => "5xx",
                },
                Err(e) => {
                    tracing::debug!(route = %route, upstream = %upstream.name, stage = %e.stage, error = %e, "mirrored request failed");
                    "failed"
                }
            },
        };
        metrics.mirrored(&route, outcome);
        drop(permit);
    });
}

/// A copy of `req` for `upstream`, in the form its protocol takes (HTTP/2: an absolute URI;
/// HTTP/1.1: a path and a `Host`); `None` when the body streams, so cannot be copied.
fn copy_for(req: &Request<RequestBody>, upstream: &Upstream) -> Option<Request<RequestBody>> {
    // What a resend would copy: the head, and the body when it is whole.
    let Replay {
        method,
        uri,
        mut headers,
        body,
        ..
    } = Replay::of(req)?;
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let authority = match uri.authority() {
        Some(a) => Some(a.clone()),
        None => headers
            .get(HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok()),
    };
    let mut copy = Request::new(body.map_or_else(RequestBody::empty, RequestBody::from_whole));
    *copy.method_mut() = method;
    if upstream.protocol.is_h2() {
        let scheme = if upstream.is_tls() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let mut uri = Uri::builder().scheme(scheme).path_and_query(path);
        if let Some(a) = authority {
            uri = uri.authority(a);
        }
        *copy.uri_mut() = uri.build().ok()?;
        *copy.version_mut() = Version::HTTP_2;
        headers.remove(HOST);
    } else {
        *copy.uri_mut() = Uri::from(path);
        *copy.version_mut() = Version::HTTP_11;
        if !headers.contains_key(HOST)
            && let Some(a) = authority
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            headers.insert(HOST, v);
        }
    }
    *copy.headers_mut() = headers;
    Some(copy)
}

/// One exchange with the mirror: an endpoint, a connection (pooled if one is ready), the copy
/// sent and its answer read to the end; the status it answered.
async fn exchange(
    upstream: &Upstream,
    req: Request<RequestBody>,
    connect_timeout: Duration,
) -> Result<u16, ProxyError> {
    let (idx, ep) = upstream.pick(None, 0);
    // A full endpoint is not waited for: a copy is not worth a place in its queue.
    let _held = upstream
        .hold(idx)
        .map_err(|_| ProxyError::gateway(Stage::Admission, ErrorKind::Overloaded))?;
    let (checkout, _) = match upstream.take_ready(ep) {
        Some(c) => c,
        None => {
            let r = upstream
                .checkout(ep, connect_timeout, Want::Pooled, None)
                .await;
            upstream.report_connect(idx, r.as_ref().err());
            r?
        }
    };
    // `send_request`, as the health checks send theirs: a copy is never sent again, so it need
    // not come back unsent (and the requests' own `try_send_request` keeps its one caller).
    let failed = |e: hyper::Error| super::classify_send_error(e, false);
    let body_failed =
        |e: hyper::Error| ProxyError::upstream(Stage::Body, ErrorKind::Reset).with_source(e);
    match checkout {
        Checkout::H1(mut c) => {
            let resp = c.sender.send_request(req).await.map_err(failed)?;
            let status = resp.status().as_u16();
            let keep_alive = crate::upstream::pool::keep_alive_timeout(resp.headers());
            drain(resp.into_body()).await.map_err(body_failed)?;
            // Read to its end: the connection may serve another request.
            upstream.release(idx, c, keep_alive);
            Ok(status)
        }
        Checkout::H2(mut c, _place) => {
            let resp = c.sender.send_request(req).await.map_err(failed)?;
            let status = resp.status().as_u16();
            drain(resp.into_body()).await.map_err(body_failed)?;
            Ok(status)
        }
    }
}

/// Reads `body` to its end, dropping what it carries.
async fn drain(mut body: hyper::body::Incoming) -> Result<(), hyper::Error> {
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}
