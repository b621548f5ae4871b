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

use http::Request;
use tether::RequestContext;

use super::Replay;
use super::request_body::RequestBody;
use super::subrequest::{self, Keep};
use crate::admission::Limit;
use crate::observe::metrics::Metrics;
use crate::upstream::Upstream;

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
            r = subrequest::exchange(&upstream, &copy, connect_timeout, Keep::Nothing) => match r {
                // By class: a mirror answering 5xx where the route's upstream does not is what
                // shadow traffic is there to show.
                Ok((head, _)) => match head.status.as_u16() {
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

/// A copy of `req` for `upstream`, in the form its protocol takes; `None` when the body streams,
/// so cannot be copied.
fn copy_for(req: &Request<RequestBody>, upstream: &Upstream) -> Option<Replay> {
    // What a resend would copy: the head, and the body when it is whole.
    subrequest::addressed(Replay::of(req)?, upstream)
}
