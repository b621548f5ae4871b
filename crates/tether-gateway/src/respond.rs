//! tether's own responses. Every one is marked with an RFC 9209 `Proxy-Status` header naming
//! tether, so a client can tell tether's 502/504 from the origin's, and carries a JSON body:
//! `{"error": "...", "stage": "...", "request_id": "..."}`.

use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::error::ProxyError;
use crate::proxy::response_body::ProxyBody;

/// The header that marks a response as made by tether.
pub const PROXY_STATUS: HeaderName = HeaderName::from_static("proxy-status");

/// The request id header, returned on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// An error response for `err`, or `None` when the status is 499 (the client is gone and nothing
/// should be written).
pub fn error_response(err: &ProxyError, request_id: &str) -> Response<ProxyBody> {
    let c = err.classify();
    let body = serde_json::json!({
        "error": c.code,
        "stage": err.stage.as_str(),
        "request_id": request_id,
    })
    .to_string();
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = StatusCode::from_u16(c.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let ps = format!(
        "tether; error={}; details=\"{}\"",
        c.proxy_status,
        err.stage.as_str()
    );
    if let Ok(v) = HeaderValue::from_str(&ps) {
        h.insert(PROXY_STATUS, v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID, v);
    }
    if c.status == 503 {
        // Shed load: tell the client when trying again makes sense.
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(crate::admission::RETRY_AFTER_SECS),
        );
    }
    resp
}

/// `resp` as the answer to a HEAD request: the same head, its `Content-Length` the body's, and
/// no body. hyper drops a HEAD response's body over HTTP/1.1 but sends it over HTTP/2, where the
/// client must treat it as a protocol error.
pub fn head_only(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    // A 204 or 304 never carries a length (RFC 9110 8.6).
    let bodiless = matches!(parts.status.as_u16(), 204 | 304);
    if let Some(len) = http_body::Body::size_hint(&body).exact()
        && !bodiless
    {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Response::from_parts(parts, ProxyBody::empty())
}

/// `resp`, tether's answer `err` to a request, as a gRPC client understands it: a trailers-only
/// response with the code of its status (`deadline`: the request's deadline passed) and a
/// message naming the failure and its stage. Returns the code too, for the access log.
pub fn for_grpc(
    resp: Response<ProxyBody>,
    err: &ProxyError,
    flavor: crate::grpc::Flavor,
    deadline: bool,
) -> (Response<ProxyBody>, crate::grpc::Code) {
    let (mut parts, _) = resp.into_parts();
    let code = crate::grpc::Code::for_status(parts.status.as_u16(), deadline);
    let message = format!("tether: {} at {}", err.classify().code, err.stage.as_str());
    crate::grpc::trailers_only(&mut parts, flavor, code, &message);
    (Response::from_parts(parts, ProxyBody::empty()), code)
}

/// The response returned to hyper for a request whose client left: never delivered, since the
/// connection or stream is gone, but hyper needs one.
pub fn client_gone() -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, Stage};
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_body_is_json_and_marked() {
        let err = ProxyError::upstream(Stage::Connect, ErrorKind::Refused);
        let resp = error_response(&err, "abc");
        assert_eq!(resp.status(), 502);
        assert_eq!(
            resp.headers()[PROXY_STATUS],
            "tether; error=connection_refused; details=\"connect\""
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "upstream_connect_failed");
        assert_eq!(v["stage"], "connect");
        assert_eq!(v["request_id"], "abc");
    }
}
