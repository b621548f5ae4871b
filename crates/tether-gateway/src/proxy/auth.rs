//! Forward authentication (nginx's `auth_request`, Caddy's `forward_auth`, Envoy's HTTP
//! `ext_authz`): before a route's request goes on, its auth service is asked about it, with a
//! `GET` of the configured path that carries the request's headers (its cookies and
//! `Authorization` among them) and where it was going (`X-Forwarded-Method`, `X-Forwarded-Uri`,
//! `X-Forwarded-Host`). A 2xx answer lets it go on, with the headers named in `copy_headers`
//! copied from the answer; any other answer (a 401 with `WWW-Authenticate`, a 302 to a login
//! page) goes to the client as it came. The check is the client's work like the rest: when the
//! client leaves or the deadline passes it is cancelled (its HTTP/1.1 connection closed, or its
//! HTTP/2 stream reset), and the request's body is not read before the check allowed it, so a
//! client turned away uploads nothing.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HeaderMap, HeaderName,
    HeaderValue, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use tether::CancelReason;
use tokio::time::Instant;

use super::headers;
use super::response_body::ProxyBody;
use super::subrequest::{self, Keep};
use super::tracker::Tracker;
use super::{Replay, id_header};
use crate::error::{ErrorKind, ProxyError, Side, Stage};
use crate::respond::{self, REQUEST_ID};
use crate::route::Route;
use crate::upstream::Upstream;

/// The longest answer body kept for the client (a login page, a JSON error); a longer one fails
/// the check.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A route's auth service.
#[derive(Debug)]
pub struct AuthTarget {
    /// Index of its upstream in the worker's list.
    pub upstream: usize,
    /// The path (and query) each check asks for.
    pub path: PathAndQuery,
    /// Headers of an allowing answer that go on with the request, in place of the client's own.
    pub copy_headers: Box<[HeaderName]>,
    /// Headers of an allowing answer added to the client's response.
    pub client_headers: Box<[HeaderName]>,
    /// Longest a check may take.
    pub timeout: Duration,
}

/// Why a request does not go on.
#[derive(Debug)]
pub enum Refused {
    /// The service answered otherwise than 2xx: its answer, for the client.
    Denied(http::response::Parts, Bytes),
    /// No usable answer.
    Failed(ProxyError),
    /// The client left, or the deadline passed.
    Cancelled(CancelReason),
}

/// Headers of the request the check does not carry: it is a `GET` without a body, and its
/// connection is tether's.
const NOT_ASKED: [HeaderName; 9] = [
    CONTENT_LENGTH,
    TRANSFER_ENCODING,
    CONTENT_TYPE,
    CONTENT_ENCODING,
    EXPECT,
    TE,
    TRAILER,
    CONNECTION,
    UPGRADE,
];

const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What an allowing answer passes on: the values of the route's `copy_headers` it carried.
pub type Granted = Vec<(HeaderName, HeaderValue)>;

/// Asks `upstream`, `target`'s service, `question` (see [`question`]); the headers an allowing
/// answer passes on, for [`grant`].
pub(super) async fn check(
    target: &AuthTarget,
    upstream: &Upstream,
    question: Option<Replay>,
    t: &mut Tracker,
    connect_timeout: Duration,
) -> Result<Granted, Refused> {
    let started = Instant::now();
    t.stage = Stage::Auth;
    // Until it allows the request, failures and answers are the auth service's.
    let own = t.rec.upstream.replace(upstream.name.clone());
    let failed = |e: ProxyError| ProxyError {
        stage: Stage::Auth,
        side: Side::Upstream,
        ..e
    };
    let verdict = match question.and_then(|q| subrequest::addressed(q, upstream)) {
        None => Err(Refused::Failed(
            ProxyError::gateway(Stage::Auth, ErrorKind::BadRequest).with_target(&upstream.name),
        )),
        Some(q) => {
            let exchange =
                subrequest::exchange(upstream, &q, connect_timeout, Keep::Upto(MAX_ANSWER_BYTES));
            tokio::select! {
                biased;
                reason = t.ctx.cancelled() => Err(Refused::Cancelled(reason)),
                r = tokio::time::timeout(target.timeout, exchange) => match r {
                    Err(_) => Err(Refused::Failed(
                        ProxyError::upstream(Stage::Auth, ErrorKind::Timeout)
                            .with_target(&upstream.name),
                    )),
                    Ok(Err(e)) => Err(Refused::Failed(failed(e))),
                    Ok(Ok((head, _))) if head.status.is_success() => {
                        let to_client = picked(&target.client_headers, &head.headers);
                        if !to_client.is_empty() {
                            t.rec.auth_to_client = Some(Box::new(to_client));
                        }
                        Ok(picked(&target.copy_headers, &head.headers))
                    }
                    Ok(Ok((head, body))) => Err(Refused::Denied(head, body)),
                },
            }
        }
    };
    t.rec.auth = Some(started.elapsed());
    let outcome = match &verdict {
        Ok(_) => {
            t.rec.upstream = own;
            "allowed"
        }
        Err(Refused::Denied(..)) => "denied",
        Err(Refused::Failed(e)) => {
            tracing::debug!(request_id = %t.rec.request_id, upstream = %upstream.name, error = %e, "auth check failed");
            "failed"
        }
        Err(Refused::Cancelled(_)) => "cancelled",
    };
    if let Some(route) = &t.rec.route {
        t.metrics().auth_checked(route, outcome);
    }
    verdict
}

/// The values of `names` in `headers`, each name's in order.
fn picked(names: &[HeaderName], headers: &HeaderMap) -> Granted {
    names
        .iter()
        .flat_map(|name| {
            headers
                .get_all(name)
                .iter()
                .map(|v| (name.clone(), v.clone()))
        })
        .collect()
}

/// `headers` of an allowed request as it goes on: the client's own values of the route's
/// `copy_headers` gone, the service's in their place.
pub fn grant(target: &AuthTarget, granted: Granted, headers: &mut HeaderMap) {
    for name in &target.copy_headers {
        headers.remove(name);
    }
    for (name, value) in granted {
        headers.append(name, value);
    }
}

/// The check's request for `req`: a bodiless `GET` of the service's path with `req`'s headers
/// as they would go upstream (hop-by-hop ones and, from a peer not `trusted`, forwarding ones
/// removed; the client added to the forwarding headers; the request id) and where `req` was
/// going; `None` when that cannot be written as headers.
pub(super) fn question(
    target: &AuthTarget,
    req: &Request<Incoming>,
    t: &Tracker,
    client: IpAddr,
    tls: bool,
    trusted: bool,
) -> Option<Replay> {
    let mut headers = req.headers().clone();
    headers::strip_hop_by_hop(&mut headers, false);
    if !trusted {
        headers::strip_forwarding(&mut headers);
    }
    for name in &NOT_ASKED {
        headers.remove(name);
    }
    let host = t.rec.authority.as_str();
    headers::add_forwarding(
        &mut headers,
        client,
        tls,
        (!host.is_empty()).then_some(host),
    );
    if let Some(v) = id_header(&t.rec.request_id) {
        headers.insert(REQUEST_ID, v);
    }
    let method = t.rec.method.as_ref().map_or("", Method::as_str);
    headers.insert(X_FORWARDED_METHOD, HeaderValue::from_str(method).ok()?);
    headers.insert(
        X_FORWARDED_URI,
        HeaderValue::from_str(t.rec.path.target()).ok()?,
    );
    if !host.is_empty() {
        headers.insert(X_FORWARDED_HOST, HeaderValue::from_str(host).ok()?);
    }
    let uri = match req.uri().authority() {
        Some(authority) => Uri::builder()
            .scheme(req.uri().scheme().cloned().unwrap_or(Scheme::HTTP))
            .authority(authority.clone())
            .path_and_query(target.path.clone())
            .build()
            .ok()?,
        None => Uri::from(target.path.clone()),
    };
    Some(Replay {
        method: Method::GET,
        uri,
        version: Version::HTTP_11,
        headers,
        body: None,
    })
}

/// The client's answer when the service denied its request: the service's status, headers
/// (less hop-by-hop ones) and body, with the request id and the route's response headers.
#[cold]
pub fn denied(
    mut t: Tracker,
    route: &Route,
    head: http::response::Parts,
    body: Bytes,
) -> Response<ProxyBody> {
    let status = head.status;
    let mut headers = head.headers;
    headers::strip_hop_by_hop(&mut headers, false);
    // Set again for the body as it goes.
    headers.remove(CONTENT_LENGTH);
    t.rec.bytes_sent = body.len() as u64;
    let mut resp = Response::new(if body.is_empty() {
        ProxyBody::empty()
    } else {
        ProxyBody::full(body)
    });
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if let Some(v) = id_header(&t.rec.request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    if !route.response_headers.is_empty() {
        route.response_headers.apply(resp.headers_mut());
    }
    let head_only = t.rec.method == Some(Method::HEAD);
    if head_only {
        t.rec.bytes_sent = 0;
    }
    t.finish_refused(Stage::Auth, status.as_u16());
    if head_only {
        respond::head_only(resp)
    } else {
        resp
    }
}
