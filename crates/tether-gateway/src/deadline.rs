//! Request deadlines: a route's total deadline, shortened (never extended) by the budget a
//! trusted peer sent or by a gRPC client's own `grpc-timeout`; and the remaining budget stamped on
//! the request sent upstream, so the backend can stop on time without a cancel signal.

use http::HeaderMap;
use http::header::HeaderName;
use tether::budget::{
    GRPC_TIMEOUT_HEADER, format_budget_ms, format_grpc_timeout, parse_budget_header,
    parse_grpc_timeout_header,
};
use tether::{Deadline, RequestContext};
use tokio::time::Instant;

use crate::route::Route;

/// The deadline for a request whose head arrived at `started`, if any applies. `budget`: the
/// request carries the route's budget header and comes from a trusted peer; `grpc`: it is a gRPC
/// request (gRPC-Web included, see [`crate::grpc::Flavor`]), so its own `grpc-timeout` counts.
/// Both are known from the header scan, so no header is looked up that is not there.
pub fn request_deadline(
    route: &Route,
    started: Instant,
    headers: &HeaderMap,
    budget: bool,
    grpc: bool,
) -> Option<Deadline> {
    let mut deadline = route
        .timeouts
        .total
        .map(|d| Deadline::starting_at(started, d));
    let mut shorten = |budget| {
        let d = Deadline::starting_at(started, budget);
        deadline = Some(match deadline {
            Some(cur) => cur.min(d),
            None => d,
        });
    };
    // A budget from a peer tether does not trust could only ever shorten the client's own
    // request, but it is ignored all the same: it is the peer's hop budget, not the client's.
    if budget
        && let Some(name) = &route.budget_header
        && let Some(Ok(b)) = headers.get(name).map(parse_budget_header)
    {
        shorten(b);
    }
    if grpc
        && let Some(Ok(b)) = headers
            .get(GRPC_TIMEOUT_HEADER)
            .map(parse_grpc_timeout_header)
    {
        shorten(b);
    }
    deadline
}

/// Writes the time left to the upstream request's budget headers (and `grpc-timeout` for gRPC).
/// Without a deadline, a budget header the client sent is removed: only tether speaks for it.
pub fn stamp(
    headers: &mut HeaderMap,
    budget_header: Option<&HeaderName>,
    ctx: &RequestContext,
    grpc: bool,
) {
    let Some(left) = ctx.remaining() else {
        if let Some(name) = budget_header {
            headers.remove(name);
        }
        return;
    };
    if let Some(name) = budget_header {
        headers.insert(name.clone(), format_budget_ms(left));
    }
    if grpc {
        headers.insert(
            HeaderName::from_static(GRPC_TIMEOUT_HEADER),
            format_grpc_timeout(left),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::RouteConfig;
    use crate::route::Router;

    fn route(total: Option<Duration>) -> Router {
        let mut r = RouteConfig::new("/", "up");
        r.timeouts.total = total;
        Router::new(&[r], |_| Some(0))
    }

    fn is_grpc(h: &HeaderMap) -> bool {
        crate::grpc::Flavor::of(h).is_some()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[tokio::test(start_paused = true)]
    async fn trusted_budget_shortens_never_extends() {
        let r = route(Some(Duration::from_secs(2)));
        let route = r.select(None, "/").unwrap();
        let now = Instant::now();
        let short = headers(&[("x-request-timeout-ms", "500")]);
        let long = headers(&[("x-request-timeout-ms", "9000")]);
        assert_eq!(
            request_deadline(route, now, &short, true, is_grpc(&short))
                .unwrap()
                .budget(),
            Duration::from_millis(500)
        );
        assert_eq!(
            request_deadline(route, now, &long, true, is_grpc(&long))
                .unwrap()
                .budget(),
            Duration::from_secs(2)
        );
        assert_eq!(
            request_deadline(route, now, &short, false, is_grpc(&short))
                .unwrap()
                .budget(),
            Duration::from_secs(2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_timeout_applies_to_grpc_only() {
        let r = route(None);
        let route = r.select(None, "/").unwrap();
        let now = Instant::now();
        let grpc = headers(&[
            ("content-type", "application/grpc"),
            ("grpc-timeout", "250m"),
        ]);
        let plain = headers(&[("grpc-timeout", "250m")]);
        assert_eq!(
            request_deadline(route, now, &grpc, false, is_grpc(&grpc))
                .unwrap()
                .budget(),
            Duration::from_millis(250)
        );
        assert!(request_deadline(route, now, &plain, false, is_grpc(&plain)).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn stamps_time_left() {
        let ctx =
            RequestContext::new().child_with_deadline(Deadline::after(Duration::from_millis(1500)));
        tokio::time::advance(Duration::from_millis(400)).await;
        let mut h = HeaderMap::new();
        let name = HeaderName::from_static("x-request-timeout-ms");
        stamp(&mut h, Some(&name), &ctx, true);
        assert_eq!(h["x-request-timeout-ms"], "1100");
        let grpc = tether::budget::parse_grpc_timeout_header(&h["grpc-timeout"]).unwrap();
        assert_eq!(grpc, Duration::from_millis(1100));
        let mut spoofed = headers(&[("x-request-timeout-ms", "99999")]);
        stamp(&mut spoofed, Some(&name), &RequestContext::new(), false);
        assert!(spoofed.get("x-request-timeout-ms").is_none());
    }
}
