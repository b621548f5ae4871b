//! One request through the gateway: route, rewrite, obtain an upstream connection, send, wait
//! for the head, stream the body back. Every wait is raced against the request's context, so a
//! client that leaves (or a deadline that passes) stops the upstream work at once.

pub mod auth;
pub mod compress;
pub mod headers;
pub mod mirror;
pub mod request_body;
pub mod response_body;
pub mod response_buffer;
pub mod retry;
pub mod subrequest;
pub mod tracker;
pub mod tunnel;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::SystemTime;

use http::header::{HOST, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use tether::RequestId;
use tokio::time::Instant;

use crate::cancel::ConnCancel;
use crate::deadline;
use crate::error::{ErrorKind, ProxyError, Side, Stage};
use crate::grpc::Flavor;
use crate::listen::{ListenerShared, Worker};
use crate::observe::access::{RequestRecord, RequestText};
use crate::observe::trace_context;
use crate::respond::{self, REQUEST_ID};
use crate::route::Route;
use crate::upstream::{Checkout, Upstream, Want};
use request_body::RequestBody;
use response_body::{PoolReturn, ProxyBody, Streaming};
use tracker::{Teardown, Tracker};

/// The budget header every route reads unless configured otherwise: the header scan looks for it.
const DEFAULT_BUDGET: http::HeaderName =
    http::HeaderName::from_static(tether::budget::DEFAULT_BUDGET_HEADER);

/// What a request knows about the connection it arrived on.
#[derive(Debug)]
pub struct Conn {
    /// Client address.
    pub client: SocketAddr,
    /// Local address.
    pub local: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// What the connection's TLS handshake settled (the client's certificate included).
    pub tls_session: Option<Arc<crate::downstream::tls::TlsSession>>,
    /// Its cancellation state.
    pub cancel: Arc<ConnCancel>,
    /// Its forwarding header text, made for its first request.
    forwarding: OnceLock<headers::ClientForwarding>,
    /// The client's side of the switch each request in flight asked for (an HTTP/1 upgrade, one
    /// at a time; HTTP/2 extended CONNECTs, one per stream), by [`upgrade_key`]: kept here
    /// rather than in the request's state, which every request allocates.
    upgrade: std::sync::Mutex<Vec<(usize, hyper::upgrade::OnUpgrade)>>,
    /// Ends when the tunnel the connection was handed to (an upgrade) ends.
    tunnel: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// Its own upstream connection, for upstreams whose connections name their client
    /// (`proxy_protocol`); made on first use.
    private: OnceLock<Arc<crate::upstream::Private>>,
}

impl Conn {
    /// A connection from `client` to `local`.
    pub fn new(client: SocketAddr, local: SocketAddr, tls: bool, cancel: Arc<ConnCancel>) -> Conn {
        Conn {
            client,
            local,
            tls,
            tls_session: None,
            cancel,
            forwarding: OnceLock::new(),
            upgrade: std::sync::Mutex::new(Vec::new()),
            tunnel: std::sync::Mutex::new(None),
            private: OnceLock::new(),
        }
    }

    /// Where the connection keeps its own upstream connection (see
    /// [`crate::upstream::Private`]).
    fn private(&self) -> &Arc<crate::upstream::Private> {
        self.private.get_or_init(Arc::default)
    }

    /// Notes that the connection becomes a tunnel; it is over when the returned sender drops.
    fn open_tunnel(&self) -> tokio::sync::oneshot::Sender<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        *crate::lock(&self.tunnel) = Some(rx);
        tx
    }

    /// Waits for the end of the tunnel the connection was handed to, if it was: until then the
    /// connection counts as open (toward the listener's limit and the drain at shutdown).
    pub async fn tunnel_closed(&self) {
        let rx = crate::lock(&self.tunnel).take();
        if let Some(rx) = rx {
            let _ = rx.await;
        }
    }

    /// Keeps the client's side of the switch request `key` asked for.
    fn hold_upgrade(&self, key: usize, on: hyper::upgrade::OnUpgrade) {
        crate::lock(&self.upgrade).push((key, on));
    }

    /// Takes the client's side of the switch request `key` asked for, if it is still here.
    fn take_upgrade(&self, key: usize) -> Option<hyper::upgrade::OnUpgrade> {
        let mut slots = crate::lock(&self.upgrade);
        let i = slots.iter().position(|(k, _)| *k == key)?;
        Some(slots.swap_remove(i).1)
    }

    fn forwarding(&self) -> &headers::ClientForwarding {
        self.forwarding
            .get_or_init(|| headers::ClientForwarding::new(self.client.ip(), self.tls))
    }
}

/// hyper's service function for every downstream request.
pub async fn handle(
    worker: Arc<Worker>,
    listener: Arc<ListenerShared>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // One pass over the names settles which headers are there; lookups that would miss are skipped.
    let found = headers::scan(req.headers(), Some(&DEFAULT_BUDGET));
    // Looked up once per request: the request id, forwarding headers and budget all ask.
    let trusted = listener.trusts(conn.client.ip());
    let id = (trusted && found.request_id)
        .then(|| incoming_request_id(req.headers()))
        .flatten()
        .unwrap_or_else(RequestId::generate);
    let authority = match req.uri().authority() {
        Some(a) => RequestText::authority(a),
        None => req
            .headers()
            .get(HOST)
            .and_then(RequestText::header)
            .unwrap_or_default(),
    };
    // A request that may ask to switch protocols leaves the client's side of the switch with the
    // connection, under this key.
    let upgrade_key =
        (found.hop_by_hop || req.method() == Method::CONNECT).then(|| upgrade_key(&id.as_arc()));
    let rec = RequestRecord {
        method: Some(req.method().clone()),
        authority,
        path: RequestText::path(req.uri()),
        tls: conn.tls_session.clone(),
        ..RequestRecord::new(
            SystemTime::now(),
            id.as_arc(),
            conn.client,
            conn.local,
            conn.cancel.protocol().as_str(),
        )
    };
    let ctx = conn.cancel.request_context(id);
    let tracker = Tracker::new(rec, ctx, conn.cancel.clone(), worker.observer.clone());
    // Boxed once here: the request's whole state machine is several KiB, and hyper moves the
    // service future into its slot, so an unboxed one would be copied on every request.
    let resp = Box::pin(proxy(
        &worker, &listener, &conn, req, found, trusted, tracker,
    ))
    .await;
    // An upgrade request that failed or was cancelled before its answer left the client's side
    // of the switch with the connection; it is of no use past this point.
    if let Some(key) = upgrade_key {
        conn.take_upgrade(key);
    }
    Ok(resp)
}

/// A request's key among its connection's pending switches: the address of its id's text,
/// unique while the request lives.
fn upgrade_key(id: &Arc<str>) -> usize {
    Arc::as_ptr(id).cast::<u8>() as usize
}

/// The protocol an HTTP/2 extended CONNECT (RFC 8441) asks the stream to carry, such as
/// `websocket`.
fn extended_connect(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.method() != Method::CONNECT {
        return None;
    }
    let protocol = req.extensions().get::<hyper::ext::Protocol>()?;
    HeaderValue::from_str(protocol.as_str()).ok()
}

/// The request's whole exchange. Written as a function returning an `async move` block rather
/// than an `async fn`: an `async fn` keeps each argument twice in its state (as passed, and moved
/// into the body), and this state is the largest thing each request allocates.
#[allow(clippy::manual_async_fn)]
fn proxy<'a>(
    worker: &'a Worker,
    listener: &'a ListenerShared,
    conn: &'a Conn,
    mut req: Request<Incoming>,
    found: headers::Found,
    trusted: bool,
    mut t: Tracker,
) -> impl Future<Output = Response<ProxyBody>> + Send + 'a {
    async move {
        // A copy that shares the text, kept while the record changes; read as bytes (a Host
        // header's text would be checked as UTF-8 again).
        let authority = t.rec.authority.clone();
        let host = authority.as_bytes();
        if found.content_type {
            t.grpc = crate::grpc::Flavor::of(req.headers());
        }
        let Some(route) = listener.router.select_host(
            (!host.is_empty()).then_some(host),
            req.uri().path(),
            Some((req.method(), req.headers())),
        ) else {
            t.stage = Stage::Route;
            return fail(t, ProxyError::gateway(Stage::Route, ErrorKind::NoRoute));
        };
        t.rec.route = Some(route.name.clone());
        t.route_metrics = Some(route.metrics(&worker.observer.metrics));
        t.access_log = route.access_log;
        let turn =
            match crate::admission::admit(route, listener, &req, conn.client.ip(), trusted, &mut t)
            {
                Ok(turn) => turn,
                Err(refusal) => return refuse(t, refusal),
            };
        conn.cancel.begin_h1_request(&t.ctx, route.half_close);
        let budget_header = route.budget_header.as_ref();
        // Whether the client sent the route's budget header (stamping replaces or removes it).
        let budget_sent = match budget_header {
            None => false,
            Some(n) if *n == DEFAULT_BUDGET => found.extra,
            Some(n) => req.headers().contains_key(n),
        };
        let grpc = t.grpc.is_some();
        // The deadline runs from the arrival of the request head, not from the end of its body.
        if let Some(d) = deadline::request_deadline(
            route,
            t.started(),
            req.headers(),
            trusted && budget_sent,
            grpc,
        ) {
            t.ctx = t.ctx.child_with_deadline(d);
        }
        if let Some(turn) = turn {
            // Boxed: only a request that waits pays for the wait's state.
            match Box::pin(wait_turn(&mut t, route, turn)).await {
                Ok(()) => {}
                Err(Stopped::Refused(refusal)) => return refuse(t, refusal),
                Err(Stopped::Cancelled(reason)) => return cancelled(t, reason),
            }
        }
        if let Some(redirect) = &route.redirect {
            return redirected(t, route, redirect, host, req.uri());
        }
        if let Some(fixed) = &route.respond {
            return responded(t, route, fixed);
        }
        // Before any of the body is read: a request turned away uploads nothing.
        let granted = match &route.auth {
            None => None,
            Some(target) => {
                let question =
                    auth::question(target, &req, &t, conn.client.ip(), conn.tls, trusted);
                // Boxed: only a route with an auth service pays for the check's state.
                let checked = Box::pin(auth::check(
                    target,
                    &worker.upstreams[target.upstream],
                    question,
                    &mut t,
                    route.timeouts.connect,
                ))
                .await;
                match checked {
                    Ok(granted) => Some(granted),
                    Err(auth::Refused::Denied(head, body)) => {
                        return auth::denied(t, route, head, body);
                    }
                    Err(auth::Refused::Failed(e)) => return fail(t, e),
                    Err(auth::Refused::Cancelled(reason)) => return cancelled(t, reason),
                }
            }
        };
        let upstream: &Arc<Upstream> = &worker.upstreams[route.next_upstream(|key| {
            key.of(
                req.headers(),
                req.uri().path(),
                conn.client.ip(),
                trusted,
                |ip| listener.trusts(ip),
            )
        })];
        t.rec.upstream = Some(upstream.name.clone());
        t.rec.upstream_protocol = Some(upstream.protocol.as_str());
        // An HTTP/1.1 request asking to switch protocols (WebSocket), or an HTTP/2 extended
        // CONNECT (RFC 8441: a WebSocket over an HTTP/2 stream), is tunnelled when its upstream
        // speaks HTTP/1.1 (see `tunnel`). An HTTP/2 upstream cannot switch: the request goes as
        // a plain one, its hop-by-hop `Upgrade` dropped.
        let may_upgrade = (req.method() == Method::CONNECT
            || (found.hop_by_hop && req.version() == Version::HTTP_11))
            && !upstream.protocol.is_h2();

        let idle = route.timeouts.idle;
        // Chosen from the request, used on the response.
        let coding = route
            .compression
            .as_ref()
            .and_then(|c| compress::negotiate(c, req.method(), req.headers()));
        // In a block: a binding left at the top of an async body keeps its bytes in the
        // request's state for as long as the request lives, even once moved out.
        let (mut next_req, id_value, resendable, upgrading) = {
            let extended = extended_connect(&req);
            let protocols = match &extended {
                Some(p) => may_upgrade.then(|| vec![p.clone()]),
                None => (may_upgrade && req.method() != Method::CONNECT)
                    .then(|| headers::upgrade_of(req.headers()))
                    .flatten(),
            };
            // The client connection's side of the switch, taken before the request goes on.
            if protocols.is_some() {
                conn.hold_upgrade(upgrade_key(&t.rec.request_id), hyper::upgrade::on(&mut req));
            }
            let (mut up_req, id_value) = match build_upstream_request(
                req, host, route, found, conn, listener, upstream, trusted, idle, &mut t,
            ) {
                Ok(r) => r,
                Err(e) => return fail(t, e),
            };
            if let Some(protocols) = &protocols {
                headers::restore_upgrade(up_req.headers_mut(), protocols);
            }
            if extended.is_some() {
                headers::from_extended_connect(&mut up_req, protocols.is_some());
            }
            let ids =
                trace_context::apply(up_req.headers_mut(), route.trace_context, found.traceparent);
            t.rec.trace_id = ids.trace_id;
            t.rec.span_id = ids.span_id;
            // What the auth service passed on, then the route's own changes last, so that
            // they win over tether's.
            if let (Some(target), Some(granted)) = (&route.auth, granted) {
                auth::grant(target, granted, up_req.headers_mut());
            }
            if !route.request_headers.is_empty() {
                route.request_headers.apply(up_req.headers_mut());
            }
            // Any request an HTTP/2 upstream turns away unprocessed (REFUSED_STREAM, or a
            // GOAWAY below its stream) may go again, a POST too: kept when it can be.
            let idempotent = retry::is_idempotent(method_of(&t));
            let keep = idempotent || upstream.protocol.is_h2();
            let bodiless = http_body::Body::is_end_stream(up_req.body());
            let mut resendable = keep && bodiless;
            // A small body is read whole before the send, so that a stale connection (idempotent
            // requests), a retryable status (idempotent too) or an unprocessed HTTP/2 stream (any
            // request) can have it sent again. With request buffering, any body is read ahead,
            // whole or in part, before an upstream connection is taken (a gRPC call or a tunnel
            // may need answers before its body ends: those stream).
            let whole = keep && !bodiless && protocols.is_none() && reads_whole(route, &up_req);
            let buffered =
                route.request_buffer_bytes > 0 && !bodiless && protocols.is_none() && !grpc;
            if whole || buffered {
                t.stage = Stage::RequestBody;
                let limit = match (whole, buffered) {
                    (true, true) => route.retry_body_bytes.max(route.request_buffer_bytes),
                    (true, false) => route.retry_body_bytes,
                    _ => route.request_buffer_bytes,
                };
                let read = tokio::select! {
                    biased;
                    reason = t.ctx.cancelled() => return cancelled(t, reason),
                    read = up_req.body_mut().read_ahead(
                        limit,
                        route.request_buffer_dir.as_ref().filter(|_| buffered),
                    ) => read,
                };
                if let Err(e) = &read
                    && e.is::<request_body::SpillFailed>()
                {
                    tracing::warn!(error = %e, "a request body read ahead could not be written");
                    return fail(
                        t,
                        ProxyError::gateway(Stage::RequestBody, ErrorKind::Overloaded),
                    );
                }
                if read.is_err() {
                    if t.upload
                        .too_large
                        .load(std::sync::atomic::Ordering::Relaxed)
                    {
                        let err = ProxyError::downstream(Stage::RequestBody, ErrorKind::TooLarge);
                        return fail(t, err);
                    }
                    // The body's failure cancelled the request, saying why.
                    let reason = match t.ctx.check() {
                        Err(c) => c.reason,
                        Ok(()) => conn.cancel.fallback_reason(),
                    };
                    return cancelled(t, reason);
                }
                // The client sent its body without waiting: the upstream has nothing to allow.
                up_req.headers_mut().remove(http::header::EXPECT);
                resendable = keep && read.is_ok_and(|ended| ended);
            }
            if let Some(target) = &route.mirror
                && protocols.is_none()
            {
                mirror::start(
                    target,
                    &worker.upstreams[target.upstream],
                    &up_req,
                    &t.rec.request_id,
                    &t.ctx,
                    route.timeouts.connect,
                    &worker.observer.metrics,
                    &route.name,
                );
            }
            (Some(up_req), id_value, resendable, protocols.is_some())
        };

        route.retry.on_request();
        // A copy to send again, taken only where a resend can follow a send (see below).
        let mut replay: Option<Replay> = None;
        let mut attempt: u32 = 0;
        // Resends after a dead pooled connection (at most one), logged as retries all the same.
        let mut resent: u32 = 0;
        let mut fresh_only = false;
        t.upstream_started = Some(Instant::now());
        let (resp, pool, ep_idx) = loop {
            let Some(mut up_req) = next_req
                .take()
                .or_else(|| replay.as_ref().map(Replay::build))
            else {
                // Unreachable: a retry is only chosen when the request can be sent again.
                return fail(t, ProxyError::upstream(Stage::Send, ErrorKind::Reset));
            };
            t.rec.retries = attempt + resent;
            if attempt > 0 {
                let pause = retry::backoff(attempt, fresh_only);
                tokio::select! {
                    biased;
                    reason = t.ctx.cancelled() => return cancelled(t, reason),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            // Connect (or take a pooled connection).
            t.stage = Stage::Connect;
            let key =
                upstream.affinity(&up_req, conn.client.ip(), trusted, |ip| listener.trusts(ip));
            let (mut ep_idx, mut ep) = upstream.pick(key, attempt);
            // Counted from now: requests waiting for a connection load an endpoint too. A retry
            // moves the count to its own endpoint (given up first: it may be the same one).
            t.endpoint_load = None;
            t.endpoint_load = match upstream.hold(ep_idx) {
                Ok(held) => held,
                Err(crate::upstream::Full) => {
                    // Every endpoint is full: wait for room, or for the client to leave.
                    t.stage = Stage::Admission;
                    let since = Instant::now();
                    let room = Box::pin(upstream.wait_for_room(key, attempt));
                    let held = tokio::select! {
                        biased;
                        reason = t.ctx.cancelled() => Err(reason),
                        held = room => Ok(held),
                    };
                    t.rec.queued = Some(t.rec.queued.unwrap_or_default() + since.elapsed());
                    let held = match held {
                        Ok(held) => held,
                        Err(reason) => return cancelled(t, reason),
                    };
                    match held.and_then(|(idx, held)| Some((idx, upstream.endpoint(idx)?, held))) {
                        Some((idx, endpoint, held)) => {
                            t.stage = Stage::Connect;
                            (ep_idx, ep) = (idx, endpoint);
                            Some(held)
                        }
                        None => {
                            return fail(
                                t,
                                ProxyError::gateway(Stage::Admission, ErrorKind::Overloaded)
                                    .with_target(ep.address.to_string()),
                            );
                        }
                    }
                }
            };
            // A pooled connection ready now needs no wait, so nothing to race. (The lookup is the
            // match's own operand, so it holds no place in the request's state.)
            let (checkout, info) = match (!fresh_only && !upgrading && !t.ctx.is_cancelled())
                .then(|| match upstream.proxy_protocol {
                    None => upstream.take_ready(ep),
                    Some(_) => upstream.take_private(ep_idx, conn.private()),
                })
                .flatten()
            {
                Some(c) => c,
                None => {
                    let r = tokio::select! {
                        // The client leaving or the deadline passing wins over a connection
                        // becoming ready.
                        biased;
                        reason = t.ctx.cancelled() => return cancelled(t, reason),
                        r = upstream.checkout(
                            ep,
                            route.timeouts.connect,
                            want(upgrading, fresh_only),
                            upstream.proxy_protocol.map(|_| (&conn.client, &conn.local)),
                        ) => r,
                    };
                    match r {
                        Ok(c) => {
                            if !c.1.reused {
                                upstream.report_connect(ep_idx, None);
                            }
                            c
                        }
                        Err(e) => {
                            if upstream.report_connect(ep_idx, Some(&e)) {
                                skipped(worker, upstream, ep_idx);
                            }
                            // Nothing was sent: any request may go to the next endpoint.
                            if route.retry.may_retry(&e, attempt, true) {
                                worker.observer.metrics.upstream_error(&upstream.name, &e);
                                tracing::debug!(stage = %e.stage, side = %e.side, error = %e, attempt, "upstream attempt failed, retrying");
                                next_req = Some(up_req);
                                attempt += 1;
                                continue;
                            }
                            return fail(t, e);
                        }
                    }
                }
            };
            // Once written, the request is gone: a resend needs a copy, made before the first
            // write that may need one. Only a reused connection can turn out stale after the write
            // (a request never written comes back without one), or an HTTP/2 one go away with
            // the stream unprocessed (a new one too), and only a route with retryable statuses
            // resends after an answer.
            let may_go_stale = info.reused || upstream.protocol.is_h2();
            if replay.is_none() && resendable && (may_go_stale || route.retry.retries_statuses()) {
                replay = Replay::of(&up_req);
            }
            t.rec.upstream_reused = Some(info.reused);
            t.rec.upstream_connect = Some(info.connect);
            t.rec.upstream_local = info.local;
            t.rec.timings.dns = info.timings.map(|c| c.dns);
            t.rec.timings.connect = info.timings.map(|c| c.connect);
            t.rec.timings.tls = info.timings.and_then(|c| c.tls);

            // The budget is what is left now, after any backoff and connect time, so the upstream
            // never believes it has more time than the request really has.
            // Without a deadline, stamping only removes a budget header the client sent: skipped
            // when there is none (a lookup saved).
            if budget_sent || grpc || t.ctx.deadline().is_some() {
                deadline::stamp(up_req.headers_mut(), budget_header, &t.ctx, grpc);
            }

            // Send and wait for the response head.
            t.stage = Stage::FirstByte;
            let sent_at = Instant::now();
            t.sent_at = Some(sent_at);
            let first_byte = route.timeouts.first_byte;
            let (head, pool) = match checkout {
                Checkout::H1(mut c) => {
                    t.rec.upstream_addr = Some(c.peer);
                    t.teardown = Teardown::H1(c.closed.clone());
                    let head =
                        await_head(&t.ctx, c.sender.try_send_request(up_req), first_byte).await;
                    (head, Some(c))
                }
                Checkout::H2(mut c, place) => {
                    t.rec.upstream_addr = Some(c.peer);
                    t.teardown = Teardown::H2(place);
                    let mut head =
                        await_head(&t.ctx, c.sender.try_send_request(up_req), first_byte).await;
                    // The stream sees only that the connection ended; its transport saw why.
                    if let Head::Failed(err, _) = &mut head
                        && c.tls_failed.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        (err.stage, err.kind) = (Stage::Tls, ErrorKind::TlsFailed);
                    }
                    (head, None)
                }
            };
            match head {
                Head::Response(r) => {
                    let status = r.status().as_u16();
                    if upstream.report_status(ep_idx, status) {
                        skipped(worker, upstream, ep_idx);
                    }
                    if route.retry.retries_status(
                        status,
                        attempt,
                        retry::is_idempotent(method_of(&t)),
                        replay.is_some(),
                    ) {
                        tracing::debug!(
                            status,
                            attempt,
                            "upstream answered a retryable status, retrying"
                        );
                        // Dropping the response closes an HTTP/1 connection (its body is unread) or
                        // resets an HTTP/2 stream.
                        drop((r, pool));
                        t.teardown = Teardown::None;
                        attempt += 1;
                        continue;
                    }
                    // One clock read for both.
                    let head_at = Instant::now();
                    t.rec.upstream_first_byte = Some(head_at.saturating_duration_since(sent_at));
                    t.head_at = Some(head_at);
                    break (r, pool, ep_idx);
                }
                Head::Cancelled(reason) => {
                    // The exchange was dropped with the wait: its upstream connection's task
                    // (closing an HTTP/1 socket, resetting an HTTP/2 stream) is woken. It runs
                    // first, before this task writes the answer and tidies the client's
                    // connection up, so the upstream hears of the abort a few system calls
                    // sooner.
                    drop(pool);
                    tokio::task::yield_now().await;
                    return cancelled(t, reason);
                }
                Head::Failed(_, _)
                    if t.upload
                        .too_large
                        .load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    drop(pool);
                    return fail(
                        t,
                        ProxyError::downstream(Stage::RequestBody, ErrorKind::TooLarge),
                    );
                }
                Head::Failed(err, unsent) => {
                    drop(pool);
                    let idempotent = retry::is_idempotent(method_of(&t));
                    // Not written at all: safe to send again, on a fresh connection.
                    let unsent_retry = unsent.is_some();
                    // A reused connection the upstream closed before answering: the stale
                    // keep-alive race. Replayed for idempotent requests without a body.
                    let stale = info.reused
                        && replay.is_some()
                        && idempotent
                        && err.kind == ErrorKind::Reset;
                    // Written but provably not processed (HTTP/2 refused the stream, or went away
                    // below it): sent again from the copy.
                    let unprocessed = err.stage == Stage::Send && replay.is_some();
                    let again = unsent_retry || stale || unprocessed;
                    // A pooled connection found dead is the pool's miss, not an upstream failure:
                    // one resend on a fresh connection, outside the attempt limit and the retry
                    // budget. Only one: from then on every attempt connects afresh.
                    let pool_miss = info.reused && again;
                    if pool_miss || (again && route.retry.may_retry(&err, attempt, again)) {
                        tracing::debug!(stage = %err.stage, error = %err, attempt, reused = info.reused, "upstream attempt failed before the response, retrying on a fresh connection");
                        if pool_miss {
                            resent += 1;
                        } else {
                            worker.observer.metrics.upstream_error(&upstream.name, &err);
                            attempt += 1;
                        }
                        next_req = unsent;
                        fresh_only = true;
                        t.teardown = Teardown::None;
                        continue;
                    }
                    if err.kind == ErrorKind::Timeout {
                        t.ctx.cancel(tether::CancelReason::Deadline);
                    }
                    return fail(t, err);
                }
            }
        };

        let downstream = upgrading
            .then(|| conn.take_upgrade(upgrade_key(&t.rec.request_id)))
            .flatten();
        let connect = t.rec.method == Some(Method::CONNECT);
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
            && let Some(downstream) = downstream
            && let Some(upstream) = pool
        {
            // An HTTP/2 stream is not switched: its `200` to the CONNECT opens the tunnel, and
            // the connection goes on serving others.
            let open = (!connect).then(|| conn.open_tunnel());
            return tunnel::open(t, resp, downstream, upstream, route, id_value, open);
        }
        if connect && resp.status().is_success() {
            // A success to a CONNECT opens a tunnel: an upstream that answered without
            // switching must not pass for one that did.
            drop((resp, pool));
            return fail(
                t,
                ProxyError::upstream(Stage::FirstByte, ErrorKind::Protocol),
            );
        }

        // Stream the response back.
        t.stage = Stage::Body;
        let (mut parts, body) = resp.into_parts();
        t.rec.status = parts.status.as_u16();
        // `Keep-Alive` is hop-by-hop: without any, there is nothing to look up.
        let keep_alive = if headers::scan(&parts.headers, None).hop_by_hop {
            let k = crate::upstream::pool::keep_alive_timeout(&parts.headers);
            headers::remove_hop_by_hop(&mut parts.headers, false);
            k
        } else {
            None
        };
        parts.version = Version::HTTP_11;
        if let Some(v) = id_value {
            parts.headers.insert(REQUEST_ID, v);
        }
        // A redirect to the host or prefix the route sends upstream is mapped back to the
        // client's.
        if route.maps_location()
            && let Some(v) = parts.headers.get(http::header::LOCATION)
            && let Some(v) = route.client_location(v)
        {
            parts.headers.insert(http::header::LOCATION, v);
        }
        let compressing = match (coding, &route.compression) {
            (Some(coding), Some(c)) if compress::applies(c, parts.status, &parts.headers) => {
                match compress::Compressing::new(coding) {
                    Ok(compressing) => {
                        compress::mark(&mut parts.headers, coding);
                        Some(Box::new(compressing))
                    }
                    // The encoder could not be set up (out of memory): sent as it is.
                    Err(e) => {
                        tracing::warn!(error = %e, coding = coding.token(), "cannot compress a response");
                        None
                    }
                }
            }
            _ => None,
        };
        // What the auth service passed on for the client (a refreshed session cookie).
        if let Some(added) = t.rec.auth_to_client.take() {
            for (name, value) in *added {
                parts.headers.append(name, value);
            }
        }
        if !route.response_headers.is_empty() {
            route.response_headers.apply(&mut parts.headers);
        }
        // A connection made for an upgrade is not kept: it closes after this response.
        let pool = pool.filter(|_| !upgrading).map(|c| PoolReturn {
            upstream: upstream.clone(),
            endpoint: ep_idx,
            conn: c,
            keep_alive,
            private: upstream.proxy_protocol.map(|_| conn.private().clone()),
        });
        // A gRPC response cut between messages can still end with a status: in trailers for
        // gRPC over HTTP/2, in a last body frame for gRPC-Web (in base64 for gRPC-Web-text;
        // unless a Content-Length leaves no room for one).
        let grpc_framing = match t.grpc {
            _ if compressing.is_some() => None,
            Some(Flavor::Grpc)
                if conn.cancel.protocol() == crate::cancel::DownstreamProtocol::H2
                    && Flavor::of(&parts.headers) == Some(Flavor::Grpc) =>
            {
                Some(Flavor::Grpc)
            }
            Some(web @ (Flavor::Web | Flavor::WebText))
                if Flavor::of(&parts.headers) == Some(web)
                    && !parts.headers.contains_key(http::header::CONTENT_LENGTH) =>
            {
                Some(web)
            }
            _ => None,
        };
        let mut body = Box::new(Streaming::new(
            body,
            t,
            route.timeouts.idle,
            pool,
            compressing,
        ));
        if let Some(flavor) = grpc_framing {
            body.frame_grpc(flavor);
        }
        if route.response_buffer_bytes > 0 {
            body.read_ahead(route.response_buffer_bytes);
        }
        Response::from_parts(parts, ProxyBody::Stream(body))
    }
}

/// The connection a request needs: one that can switch protocols for an upgrade, a new one after
/// a pooled one failed, else any.
fn want(upgrading: bool, fresh_only: bool) -> Want {
    match (upgrading, fresh_only) {
        (true, _) => Want::Upgradable,
        (false, true) => Want::Fresh,
        (false, false) => Want::Pooled,
    }
}

/// The outcome of waiting for a response head.
// One value per attempt, moved once: boxing the large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Head {
    Response(Response<Incoming>),
    Cancelled(tether::CancelReason),
    /// The attempt failed; the request comes back if it was never written.
    Failed(ProxyError, Option<Request<RequestBody>>),
}

/// Waits for the upstream's response head, racing the request context and the first-byte timeout.
fn await_head<F>(
    ctx: &tether::RequestContext,
    fut: F,
    first_byte: Option<std::time::Duration>,
) -> AwaitHead<'_, impl Future<Output = tether::CancelReason> + '_, F>
where
    F: Future<Output = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>>,
{
    AwaitHead {
        ctx,
        cancelled: ctx.cancelled(),
        timer: first_byte.map(tokio::time::sleep),
        fut,
    }
}

pin_project_lite::pin_project! {
    /// See [`await_head`]. A future of its own rather than `select!` in an `async fn`: the request
    /// and its send are held once, not once as the argument and again in the race.
    struct AwaitHead<'a, C, F> {
        ctx: &'a tether::RequestContext,
        #[pin]
        cancelled: C,
        #[pin]
        timer: Option<tokio::time::Sleep>,
        #[pin]
        fut: F,
    }
}

impl<C, F> Future for AwaitHead<'_, C, F>
where
    C: Future<Output = tether::CancelReason>,
    F: Future<Output = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>>,
{
    type Output = Head;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Head> {
        let this = self.project();
        // Cancellation first: dropping `fut` then is what closes the HTTP/1 upstream connection
        // or resets the HTTP/2 stream with CANCEL.
        if let Poll::Ready(reason) = this.cancelled.poll(cx) {
            return Poll::Ready(Head::Cancelled(reason));
        }
        if let Some(timer) = this.timer.as_pin_mut()
            && timer.poll(cx).is_ready()
        {
            let err = ProxyError::upstream(Stage::FirstByte, ErrorKind::Timeout);
            return Poll::Ready(Head::Failed(err, None));
        }
        let head = match std::task::ready!(this.fut.poll(cx)) {
            Ok(resp) => Head::Response(resp),
            // The send failed because the client's body failed: that is a cancellation.
            Err(_) if this.ctx.is_cancelled() => Head::Cancelled(
                this.ctx
                    .reason()
                    .unwrap_or(tether::CancelReason::ClientClosed),
            ),
            Err(mut e) => {
                let unsent = e.take_message();
                Head::Failed(
                    classify_send_error(e.into_error(), unsent.is_some()),
                    unsent,
                )
            }
        };
        Poll::Ready(head)
    }
}

fn classify_send_error(e: hyper::Error, unsent: bool) -> ProxyError {
    // A TLS 1.3 server checks a client certificate after the handshake has completed on tether's
    // side, so refusing it (or any late TLS failure) shows up here: it is still TLS.
    if crate::upstream::connect::tls_failure(&e) {
        return ProxyError::upstream(Stage::Tls, ErrorKind::TlsFailed).with_source(e);
    }
    let kind = if e.is_parse() || e.is_parse_status() {
        ErrorKind::Protocol
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Reset
    };
    // Nothing written (the connection closed first), or nothing processed (HTTP/2
    // REFUSED_STREAM, or a GOAWAY whose last stream id is below this stream's: RFC 9113 §6.8)
    // is a send failure, safe to send again.
    let refused = h2_error(&e).is_some_and(|h| {
        h.reason() == Some(h2::Reason::REFUSED_STREAM) || (h.is_go_away() && h.is_remote())
    });
    let stage = if unsent || e.is_canceled() || refused {
        Stage::Send
    } else {
        Stage::FirstByte
    };
    ProxyError::upstream(stage, kind).with_source(e)
}

/// The HTTP/2 error under a hyper error. A remote GOAWAY reaches a stream only when it was not
/// processed: opened after it, or above its last stream id (streams below it that the
/// connection's end cuts see a broken pipe instead).
fn h2_error(e: &hyper::Error) -> Option<&h2::Error> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<h2::Error>() {
            return Some(h);
        }
        src = s.source();
    }
    None
}

/// What is needed to send a request again: its head, and its body when it was read whole.
struct Replay {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
    /// The body, read whole; `None` for a request without one.
    body: Option<request_body::Whole>,
}

impl Replay {
    /// `Some` when the request has no body, or one read whole, so it can be rebuilt exactly.
    fn of(req: &Request<RequestBody>) -> Option<Replay> {
        let body = match req.body().whole() {
            Some(whole) => Some(whole.clone()),
            None if http_body::Body::is_end_stream(req.body()) => None,
            None => return None,
        };
        Some(Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
        })
    }

    fn build(&self) -> Request<RequestBody> {
        let body = match &self.body {
            Some(whole) => RequestBody::from_whole(whole.clone()),
            None => RequestBody::empty(),
        };
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

// One call site; the arguments are the parts of the request it is built from.
#[allow(clippy::too_many_arguments)]
fn build_upstream_request(
    req: Request<Incoming>,
    host: &[u8],
    route: &Route,
    found: headers::Found,
    conn: &Conn,
    listener: &ListenerShared,
    upstream: &Upstream,
    trusted: bool,
    idle: Option<std::time::Duration>,
    t: &mut Tracker,
) -> Result<(Request<RequestBody>, Option<HeaderValue>), ProxyError> {
    let (mut parts, body) = req.into_parts();
    if found.hop_by_hop {
        headers::remove_hop_by_hop(&mut parts.headers, true);
    }
    if !trusted && found.forwarding {
        // Anyone can claim to be a proxy: forwarding headers from an untrusted peer are lies
        // until proven otherwise.
        headers::remove_forwarding(&mut parts.headers);
    }

    headers::add_forwarding_for(
        &mut parts.headers,
        conn.forwarding(),
        (!host.is_empty()).then_some(host),
    );
    if let Some(cert) = conn
        .tls_session
        .as_ref()
        .and_then(|s| s.client_cert.as_ref())
    {
        headers::add_client_cert(&mut parts.headers, cert);
    }
    // Also the response's: the second use is a reference count, not a copy.
    let id_value = id_header(&t.rec.request_id);
    if let Some(v) = &id_value {
        parts.headers.insert(REQUEST_ID, v.clone());
    }
    // The path and query are passed on as they came (no copy), unless the route rewrites the
    // prefix it matched.
    let mut path = std::mem::take(&mut parts.uri)
        .into_parts()
        .path_and_query
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if let Some(p) = route.upstream_path(&path) {
        path = p;
    }
    let host_rule = route.request_headers.host();
    let bad = |e: http::Error| {
        ProxyError::downstream(Stage::RequestHead, ErrorKind::BadRequest).with_source(e)
    };
    if upstream.protocol.is_h2() {
        let authority: &[u8] = match host_rule {
            Some(h) => h.as_bytes(),
            None if host.is_empty() => b"localhost",
            None => host,
        };
        parts.uri = Uri::builder()
            .scheme(upstream.scheme())
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(bad)?;
        parts.headers.remove(HOST);
        parts.version = Version::HTTP_2;
    } else {
        let mut uri = http::uri::Parts::default();
        uri.path_and_query = Some(path);
        parts.uri = Uri::from_parts(uri).map_err(|e| bad(e.into()))?;
        // A `Connection` header may have named Host: looked up again once one was removed.
        let has_host = if let Some(h) = host_rule {
            parts.headers.insert(HOST, h.clone());
            true
        } else if found.hop_by_hop {
            parts.headers.contains_key(HOST)
        } else {
            found.host
        };
        if !has_host
            && !host.is_empty()
            && let Ok(v) = HeaderValue::from_bytes(host)
        {
            parts.headers.insert(HOST, v);
        }
        parts.version = Version::HTTP_11;
    }
    t.expects_body = !http_body::Body::is_end_stream(&body);
    let body = RequestBody::new(
        body,
        t.ctx.clone(),
        conn.cancel.clone(),
        t.upload.clone(),
        idle,
        route.max_body_bytes.or(listener.limits.max_body_bytes),
    );
    Ok((Request::from_parts(parts, body), id_value))
}

/// Whether `req`'s body is read whole before it is sent: it declares a length within the
/// route's `retry_body_bytes`, and the client does not wait to hear whether to send it
/// (`Expect: 100-continue` lets the upstream answer first).
fn reads_whole(route: &Route, req: &Request<RequestBody>) -> bool {
    route.retry_body_bytes > 0
        && http_body::Body::size_hint(req.body())
            .exact()
            .is_some_and(|n| n <= route.retry_body_bytes)
        && !req
            .headers()
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The request id as a header value that shares the id's text.
fn id_header(id: &Arc<str>) -> Option<HeaderValue> {
    struct Text(Arc<str>);
    impl AsRef<[u8]> for Text {
        fn as_ref(&self) -> &[u8] {
            self.0.as_bytes()
        }
    }
    let mut v = HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(Text(id.clone()))).ok()?;
    // Never indexed by HPACK: a value seen once would only push useful entries out of the
    // table, and the encoder would compare every later id against every one kept.
    v.set_sensitive(true);
    Some(v)
}

/// A client-supplied request id, if it is short and printable.
fn incoming_request_id(headers: &http::HeaderMap) -> Option<RequestId> {
    let v = headers.get(REQUEST_ID)?.to_str().ok()?;
    let ok = !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| RequestId::new(v))
}

fn method_of(t: &Tracker) -> &str {
    t.rec.method.as_ref().map_or("", http::Method::as_str)
}

fn fail(mut t: Tracker, err: ProxyError) -> Response<ProxyBody> {
    let resp = respond::error_response(&err, &t.rec.request_id);
    let status = resp.status().as_u16();
    let resp = as_asked(&mut t, resp, &err, false);
    t.finish_error(&err, Some(status));
    resp
}

/// tether's answer `resp` to the request, in the form it asked for: a gRPC status for a gRPC
/// request (see [`crate::grpc`]; `deadline`: its deadline passed), the head alone for a HEAD.
fn as_asked(
    t: &mut Tracker,
    resp: Response<ProxyBody>,
    err: &ProxyError,
    deadline: bool,
) -> Response<ProxyBody> {
    let resp = match t.grpc {
        None => resp,
        Some(flavor) => grpc_answered(t, resp, err, flavor, deadline),
    };
    if t.rec.method == Some(Method::HEAD) {
        respond::head_only(resp)
    } else {
        resp
    }
}

#[cold]
fn grpc_answered(
    t: &mut Tracker,
    resp: Response<ProxyBody>,
    err: &ProxyError,
    flavor: crate::grpc::Flavor,
    deadline: bool,
) -> Response<ProxyBody> {
    let (resp, code) = respond::for_grpc(resp, err, flavor, deadline);
    t.rec.grpc_status = Some(code.as_u8());
    resp
}

/// Counts endpoint `idx` of `upstream` skipped for its `fail_timeout`.
#[cold]
fn skipped(worker: &Worker, upstream: &Upstream, idx: usize) {
    if let Some(address) = upstream.endpoint_address(idx) {
        worker
            .observer
            .metrics
            .endpoint_skipped(&upstream.name, &address.to_string());
    }
}

/// The answer of a route that redirects: its status and `Location`, with no body.
#[cold]
fn redirected(
    mut t: Tracker,
    route: &Route,
    redirect: &crate::route::RedirectTemplate,
    host: &[u8],
    uri: &Uri,
) -> Response<ProxyBody> {
    let Some(location) = redirect.location(host, uri) else {
        return fail(
            t,
            ProxyError::downstream(Stage::RequestHead, ErrorKind::BadRequest),
        );
    };
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = redirect.status;
    let headers = resp.headers_mut();
    headers.insert(http::header::LOCATION, location);
    if let Some(v) = id_header(&t.rec.request_id) {
        headers.insert(REQUEST_ID, v);
    }
    if !route.response_headers.is_empty() {
        route.response_headers.apply(headers);
    }
    t.rec.status = redirect.status.as_u16();
    t.finish_ok();
    resp
}

/// The answer of a route that responds itself: its fixed status, type and body.
#[cold]
fn responded(
    mut t: Tracker,
    route: &Route,
    fixed: &crate::route::FixedResponse,
) -> Response<ProxyBody> {
    let mut resp = Response::new(if fixed.body.is_empty() {
        ProxyBody::empty()
    } else {
        ProxyBody::full(fixed.body.clone())
    });
    *resp.status_mut() = fixed.status;
    let headers = resp.headers_mut();
    if let Some(ct) = &fixed.content_type {
        headers.insert(http::header::CONTENT_TYPE, ct.clone());
    }
    if let Some(v) = id_header(&t.rec.request_id) {
        headers.insert(REQUEST_ID, v);
    }
    if !route.response_headers.is_empty() {
        route.response_headers.apply(headers);
    }
    t.rec.status = fixed.status.as_u16();
    if t.rec.method == Some(Method::HEAD) {
        t.finish_ok();
        return respond::head_only(resp);
    }
    t.rec.bytes_sent = fixed.body.len() as u64;
    t.finish_ok();
    resp
}

/// Why a request waiting for its turn does not go on.
enum Stopped {
    Refused(crate::admission::Refusal),
    Cancelled(tether::CancelReason),
}

/// Waits for the slot a request over its client's rate took (`rate_limit.queue`), then takes
/// its place under the route's in-flight limit. Stops instead when its client leaves or its
/// deadline passes (the slot is given back), when the deadline would pass before the slot
/// (429 at once), or when the route is full (503).
async fn wait_turn(
    t: &mut Tracker,
    route: &Route,
    turn: Box<crate::admission::Turn>,
) -> Result<(), Stopped> {
    t.stage = Stage::Admission;
    if t.ctx.remaining().is_some_and(|left| left < turn.wait) {
        return Err(Stopped::Refused(turn.refuse(t, route)));
    }
    t.metrics().rate_delayed(&route.name);
    let since = Instant::now();
    // Boxed: only a waiting request pays for the timer.
    let waited = tokio::select! {
        biased;
        reason = t.ctx.cancelled() => Err(reason),
        () = Box::pin(tokio::time::sleep(turn.wait)) => Ok(()),
    };
    t.rec.queued = Some(since.elapsed());
    if let Err(reason) = waited {
        turn.give_back();
        return Err(Stopped::Cancelled(reason));
    }
    crate::admission::admit_in_flight(route, t).map_err(Stopped::Refused)
}

/// The answer to a request admission refused; a rate-limited client is told its own wait.
#[cold]
fn refuse(t: Tracker, refusal: crate::admission::Refusal) -> Response<ProxyBody> {
    let mut resp = fail(t, refusal.error);
    if let Some(secs) = refusal.retry_after {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    }
    resp
}

fn cancelled(t: Tracker, reason: tether::CancelReason) -> Response<ProxyBody> {
    if reason.is_client_gone() {
        t.finish_cancelled(reason);
        return respond::client_gone();
    }
    // A client that went quiet mid-upload is answered 408; any other deadline 504 at the stage
    // the request was in.
    let err = if t
        .upload
        .idle_expired
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        ProxyError::downstream(Stage::RequestBody, ErrorKind::Timeout)
    } else {
        ProxyError::upstream(t.stage, ErrorKind::Timeout)
    };
    let resp = respond::error_response(&err, &t.rec.request_id);
    let mut t = t;
    t.rec.status = resp.status().as_u16();
    let deadline = reason == tether::CancelReason::Deadline && err.side == Side::Upstream;
    let resp = as_asked(&mut t, resp, &err, deadline);
    t.finish_cancelled(reason);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_request_has_the_same_head_as_the_original() {
        let mut req = Request::builder()
            .method(http::Method::PUT)
            .uri("/a/b?c=d")
            .header("host", "example.test")
            .header("accept", "text/html")
            .header("x-multi", "1")
            .header("cookie", "a=1")
            .header("x-multi", "2")
            .header("cookie", "b=2")
            .body(RequestBody::empty())
            .unwrap();
        *req.version_mut() = Version::HTTP_11;
        let replay = Replay::of(&req).expect("a bodiless request can be replayed");
        let again = replay.build();
        assert_eq!(again.method(), req.method());
        assert_eq!(again.uri(), req.uri());
        assert_eq!(again.version(), req.version());
        assert_eq!(again.headers(), req.headers());
        // Repeated fields keep their order, as they are sent.
        let order = |r: &Request<RequestBody>| {
            r.headers()
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&again), order(&req));
        // A second build is as good as the first (the replay is kept for later attempts).
        assert_eq!(replay.build().headers(), req.headers());
    }
}
