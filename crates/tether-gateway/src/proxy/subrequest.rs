//! tether's own exchanges with an upstream beside a request's: the copies a mirror gets and the
//! checks an auth service answers. Each takes an endpoint and a connection (pooled when one is
//! ready), sends once, and reads the answer to its end, so that an HTTP/1.1 connection goes back
//! to the pool. An idempotent request that a pooled connection lost (the upstream closed it
//! while idle) goes once more on a new one. The caller races the exchange against the request's
//! context: dropping it closes the HTTP/1.1 connection, or resets the HTTP/2 stream.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::HOST;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Uri, Version};
use http_body_util::BodyExt;

use super::Replay;
use super::request_body::RequestBody;
use crate::error::{ErrorKind, ProxyError, Stage};
use crate::upstream::{Checkout, Upstream, Want};

/// `head` in the form `upstream`'s protocol takes: over HTTP/2 an absolute URI and no `Host`;
/// over HTTP/1.1 a path and a `Host`. The authority is the URI's, else the `Host` header's.
pub(super) fn addressed(mut head: Replay, upstream: &Upstream) -> Option<Replay> {
    let path = head
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let authority = match head.uri.authority() {
        Some(a) => Some(a.clone()),
        None => head
            .headers
            .get(HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok()),
    };
    if upstream.protocol.is_h2() {
        let mut uri = Uri::builder()
            .scheme(upstream.scheme())
            .path_and_query(path);
        if let Some(a) = authority {
            uri = uri.authority(a);
        }
        head.uri = uri.build().ok()?;
        head.version = Version::HTTP_2;
        head.headers.remove(HOST);
    } else {
        head.uri = Uri::from(path);
        head.version = Version::HTTP_11;
        if !head.headers.contains_key(HOST)
            && let Some(a) = authority
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            head.headers.insert(HOST, v);
        }
    }
    Some(head)
}

/// What an exchange's answer body is for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Keep {
    /// Read and dropped.
    Nothing,
    /// Kept, up to this many bytes; a longer one fails the exchange.
    Upto(usize),
}

/// One exchange with `upstream`: `req` sent, the answer's head and (as `keep` says) body.
pub(super) async fn exchange(
    upstream: &Upstream,
    req: &Replay,
    connect_timeout: Duration,
    keep: Keep,
) -> Result<(http::response::Parts, Bytes), ProxyError> {
    let mut want = Want::Pooled;
    loop {
        let (idx, ep) = upstream.pick(None, 0);
        // A full endpoint is not waited for: tether's own exchanges take no place in its queue.
        let _held = upstream
            .hold(idx)
            .map_err(|_| ProxyError::gateway(Stage::Admission, ErrorKind::Overloaded))?;
        let ready = match want {
            Want::Pooled => upstream.take_ready(ep),
            _ => None,
        };
        let (checkout, info) = match ready {
            Some(c) => c,
            None => {
                let r = upstream.checkout(ep, connect_timeout, want, None).await;
                upstream.report_connect(idx, r.as_ref().err());
                r?
            }
        };
        match send(upstream, idx, checkout, req.build(), keep).await {
            // A pooled connection the upstream had closed: nothing was answered, and an
            // idempotent request may go again on a new one.
            Err(e)
                if info.reused
                    && matches!(want, Want::Pooled)
                    && matches!(e.stage, Stage::Send | Stage::FirstByte)
                    && e.kind == ErrorKind::Reset
                    && super::retry::is_idempotent(req.method.as_str()) =>
            {
                want = Want::Fresh;
            }
            r => return r,
        }
    }
}

/// Sends `req` on `checkout` and reads the answer; an HTTP/1.1 connection read to the end goes
/// back to endpoint `idx`'s pool.
async fn send(
    upstream: &Upstream,
    idx: usize,
    checkout: Checkout,
    req: http::Request<RequestBody>,
    keep: Keep,
) -> Result<(http::response::Parts, Bytes), ProxyError> {
    // `send_request`, as the health checks send theirs: the requests' own `try_send_request`
    // keeps its one caller, so the compiler inlines it into the request path.
    let failed = |e: hyper::Error| super::classify_send_error(e, false);
    match checkout {
        Checkout::H1(mut c) => {
            let resp = c.sender.send_request(req).await.map_err(failed)?;
            let keep_alive = crate::upstream::pool::keep_alive_timeout(resp.headers());
            let (parts, body) = resp.into_parts();
            let body = read(body, keep).await?;
            upstream.release(idx, c, keep_alive);
            Ok((parts, body))
        }
        Checkout::H2(mut c, _place) => {
            let resp = c.sender.send_request(req).await.map_err(failed)?;
            let (parts, body) = resp.into_parts();
            Ok((parts, read(body, keep).await?))
        }
    }
}

/// Reads `body` to its end, keeping what `keep` says.
async fn read(mut body: hyper::body::Incoming, keep: Keep) -> Result<Bytes, ProxyError> {
    let failed =
        |e: hyper::Error| ProxyError::upstream(Stage::Body, ErrorKind::Reset).with_source(e);
    let mut kept = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(failed)?.into_data() else {
            continue;
        };
        if let Keep::Upto(limit) = keep {
            if kept.len() + data.len() > limit {
                return Err(ProxyError::upstream(Stage::Body, ErrorKind::TooLarge));
            }
            kept.extend_from_slice(&data);
        }
    }
    Ok(kept.freeze())
}
