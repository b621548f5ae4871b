//! One request through the gateway: route, rewrite, obtain an upstream connection, send, wait
//! for the head, stream the body back. Every wait is raced against the request's context, so a
//! client that leaves (or a deadline that passes) stops the upstream work at once.

pub mod headers;
pub mod request_body;
pub mod response_body;
pub mod tracker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::{HOST, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use tether::{Deadline, RequestId};
use tokio::time::Instant;

use crate::cancel::ConnCancel;
use crate::error::{ErrorKind, ProxyError, Stage};
use crate::listen::{ListenerShared, Worker};
use crate::observe::access::{Outcome, RequestRecord};
use crate::respond::{self, REQUEST_ID};
use crate::upstream::{Checkout, Upstream};
use request_body::RequestBody;
use response_body::{PoolReturn, ProxyBody, Streaming};
use tracker::{Teardown, Tracker};

/// What a request knows about the connection it arrived on.
#[derive(Debug)]
pub struct Conn {
    /// Client address.
    pub client: SocketAddr,
    /// Local address.
    pub local: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Its cancellation state.
    pub cancel: Arc<ConnCancel>,
}

/// hyper's service function for every downstream request.
pub async fn handle(
    worker: Arc<Worker>,
    listener: Arc<ListenerShared>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let id = RequestId::generate();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let rec = RequestRecord {
        time: SystemTime::now(),
        request_id: id.as_str().to_owned(),
        client: conn.client,
        local: conn.local,
        protocol: conn.cancel.protocol().as_str(),
        method: req.method().as_str().to_owned(),
        authority,
        path: req.uri().path().to_owned(),
        status: 0,
        bytes_sent: 0,
        bytes_received: 0,
        duration: Default::default(),
        route: None,
        upstream: None,
        upstream_addr: None,
        upstream_protocol: None,
        outcome: Outcome::Ok,
        abort_reason: None,
        stage: None,
        upstream_connect: None,
        upstream_first_byte: None,
        upstream_time: None,
        propagation: None,
        upstream_reused: None,
        retries: 0,
    };
    let ctx = conn.cancel.request_context(id);
    let tracker = Tracker::new(rec, ctx, conn.cancel.clone(), worker.log.clone());
    Ok(proxy(&worker, &listener, &conn, req, tracker).await)
}

async fn proxy(
    worker: &Worker,
    listener: &ListenerShared,
    conn: &Conn,
    req: Request<Incoming>,
    mut t: Tracker,
) -> Response<ProxyBody> {
    let host = (!t.rec.authority.is_empty()).then_some(t.rec.authority.as_str());
    let Some(route) = listener.router.select(host, req.uri().path()) else {
        t.stage = Stage::Route;
        return fail(t, ProxyError::gateway(Stage::Route, ErrorKind::NoRoute));
    };
    t.rec.route = Some(route.name.to_string());
    conn.cancel.begin_h1_request(&t.ctx, route.half_close);
    if let Some(total) = route.timeouts.total {
        // The deadline runs from the arrival of the request head.
        t.ctx = t
            .ctx
            .child_with_deadline(Deadline::starting_at(t.started(), total));
    }
    let upstream: &Arc<Upstream> = &worker.upstreams[route.upstream];
    t.rec.upstream = Some(upstream.name.to_string());
    t.rec.upstream_protocol = Some(upstream.protocol.as_str());

    let up_req = match build_upstream_request(req, conn, upstream, &mut t) {
        Ok(r) => r,
        Err(e) => return fail(t, e),
    };

    // Connect (or take a pooled connection).
    t.stage = Stage::Connect;
    t.upstream_started = Some(Instant::now());
    let (ep_idx, ep) = upstream.pick();
    let checkout = tokio::select! {
        // The client leaving or the deadline passing wins over a connection becoming ready.
        biased;
        reason = t.ctx.cancelled() => return cancelled(t, reason),
        r = upstream.checkout(ep, route.timeouts.connect) => r,
    };
    let (checkout, info) = match checkout {
        Ok(c) => c,
        Err(e) => return fail(t, e),
    };
    t.rec.upstream_reused = Some(info.reused);
    t.rec.upstream_connect = Some(info.connect);

    // Send and wait for the response head.
    t.stage = Stage::FirstByte;
    let sent_at = Instant::now();
    let first_byte = route.timeouts.first_byte;
    let (resp, pool) = match checkout {
        Checkout::H1(mut c) => {
            t.rec.upstream_addr = Some(c.peer);
            t.teardown = Teardown::H1(c.closed.clone());
            let fut = c.sender.send_request(up_req);
            match await_head(t, fut, first_byte).await {
                Ok((r, tr)) => {
                    t = tr;
                    (r, Some(c))
                }
                Err(resp) => return *resp,
            }
        }
        Checkout::H2(mut c) => {
            t.rec.upstream_addr = Some(c.peer);
            t.teardown = Teardown::H2;
            let fut = c.sender.send_request(up_req);
            match await_head(t, fut, first_byte).await {
                Ok((r, tr)) => {
                    t = tr;
                    (r, None)
                }
                Err(resp) => return *resp,
            }
        }
    };
    t.rec.upstream_first_byte = Some(sent_at.elapsed());

    // Stream the response back.
    t.stage = Stage::Body;
    let (mut parts, body) = resp.into_parts();
    t.rec.status = parts.status.as_u16();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    parts.version = Version::HTTP_11;
    if let Ok(v) = HeaderValue::from_str(&t.rec.request_id) {
        parts.headers.insert(REQUEST_ID, v);
    }
    let pool = pool.map(|conn| PoolReturn {
        upstream: upstream.clone(),
        endpoint: ep_idx,
        conn,
    });
    let body = Streaming::new(body, t, route.timeouts.idle, pool);
    Response::from_parts(parts, ProxyBody::Stream(Box::new(body)))
}

/// Waits for the upstream's response head, racing the request context and the first-byte timeout.
async fn await_head<F>(
    t: Tracker,
    fut: F,
    first_byte: Option<std::time::Duration>,
) -> Result<(Response<Incoming>, Tracker), Box<Response<ProxyBody>>>
where
    F: Future<Output = Result<Response<Incoming>, hyper::Error>>,
{
    let timer = async {
        match first_byte {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let ctx = t.ctx.clone();
    let out = tokio::select! {
        // Cancellation first: dropping `fut` here is what closes the HTTP/1 upstream connection
        // or resets the HTTP/2 stream with CANCEL.
        biased;
        reason = ctx.cancelled() => Err(Err(reason)),
        _ = timer => Err(Ok(ProxyError::upstream(Stage::FirstByte, ErrorKind::Timeout))),
        r = fut => r.map_err(|e| Ok(classify_send_error(e))),
    };
    match out {
        Ok(r) => Ok((r, t)),
        Err(Err(reason)) => Err(Box::new(cancelled(t, reason))),
        Err(Ok(err)) => {
            if t.ctx.is_cancelled() {
                // The send failed because the client's body failed: that is a cancellation.
                let reason = t.ctx.reason().unwrap_or(tether::CancelReason::ClientClosed);
                return Err(Box::new(cancelled(t, reason)));
            }
            if err.kind == ErrorKind::Timeout {
                t.ctx.cancel(tether::CancelReason::Deadline);
            }
            Err(Box::new(fail(t, err)))
        }
    }
}

fn classify_send_error(e: hyper::Error) -> ProxyError {
    let kind = if e.is_parse() || e.is_parse_status() {
        ErrorKind::Protocol
    } else {
        ErrorKind::Reset
    };
    // hyper reports "canceled" when the connection closed before the request was written.
    let stage = if e.is_canceled() {
        Stage::Send
    } else {
        Stage::FirstByte
    };
    ProxyError::upstream(stage, kind).with_source(e)
}

fn build_upstream_request(
    req: Request<Incoming>,
    conn: &Conn,
    upstream: &Upstream,
    t: &mut Tracker,
) -> Result<Request<RequestBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let host = t.rec.authority.clone();
    headers::strip_hop_by_hop(&mut parts.headers, true);
    headers::add_forwarding(
        &mut parts.headers,
        conn.client.ip(),
        conn.tls,
        (!host.is_empty()).then_some(host.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(&t.rec.request_id) {
        parts.headers.insert(REQUEST_ID, v);
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let bad = |e: http::Error| {
        ProxyError::downstream(Stage::RequestHead, ErrorKind::BadRequest).with_source(e)
    };
    if upstream.protocol.is_h2() {
        let scheme = if upstream.is_tls() { "https" } else { "http" };
        let authority = if host.is_empty() {
            "localhost"
        } else {
            host.as_str()
        };
        parts.uri = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(bad)?;
        parts.headers.remove(HOST);
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = Uri::builder().path_and_query(path).build().map_err(bad)?;
        if !parts.headers.contains_key(HOST)
            && !host.is_empty()
            && let Ok(v) = HeaderValue::from_str(&host)
        {
            parts.headers.insert(HOST, v);
        }
        parts.version = Version::HTTP_11;
    }
    t.expects_body = !http_body::Body::is_end_stream(&body);
    let body = RequestBody::new(body, t.ctx.clone(), conn.cancel.clone(), t.upload.clone());
    Ok(Request::from_parts(parts, body))
}

fn fail(t: Tracker, err: ProxyError) -> Response<ProxyBody> {
    let resp = respond::error_response(&err, &t.rec.request_id);
    let status = resp.status().as_u16();
    t.finish_error(&err, Some(status));
    resp
}

fn cancelled(t: Tracker, reason: tether::CancelReason) -> Response<ProxyBody> {
    if reason.is_client_gone() {
        t.finish_cancelled(reason);
        return respond::client_gone();
    }
    // A deadline: answer 504 at the stage the request was in.
    let err = ProxyError::upstream(t.stage, ErrorKind::Timeout);
    let resp = respond::error_response(&err, &t.rec.request_id);
    let mut t = t;
    t.rec.status = resp.status().as_u16();
    t.finish_cancelled(reason);
    resp
}
