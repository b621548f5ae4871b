//! Failures on the request path: where they happened ([`Stage`]), who is at fault ([`Side`]),
//! what went wrong ([`ErrorKind`]), and the one place ([`ProxyError::classify`]) that turns them
//! into a status, an error code and a retry decision.

use std::fmt;

/// Boxed error used for causes and body errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where on the request path a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Reading the request head from the client.
    RequestHead,
    /// Choosing a route.
    Route,
    /// Admission: capacity, healthy endpoints.
    Admission,
    /// Asking the route's auth service whether the request may go on (`auth`).
    Auth,
    /// Resolving the upstream name.
    Dns,
    /// TCP connect to the upstream.
    Connect,
    /// TLS handshake with the upstream.
    Tls,
    /// Writing the request (head or body) upstream.
    Send,
    /// Waiting for the upstream's response head.
    FirstByte,
    /// Streaming the response body from upstream.
    Body,
    /// Reading the request body from the client.
    RequestBody,
    /// Writing the response to the client.
    ResponseWrite,
}

impl Stage {
    /// Stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::RequestHead => "request_head",
            Stage::Route => "route",
            Stage::Admission => "admission",
            Stage::Auth => "auth",
            Stage::Dns => "dns",
            Stage::Connect => "connect",
            Stage::Tls => "tls",
            Stage::Send => "send",
            Stage::FirstByte => "first_byte",
            Stage::Body => "body",
            Stage::RequestBody => "request_body",
            Stage::ResponseWrite => "response_write",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client.
    Downstream,
    /// The origin.
    Upstream,
    /// tether itself (configuration, capacity).
    Gateway,
}

impl Side {
    /// Stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Gateway => "gateway",
        }
    }
}

/// What went wrong, independent of where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No route matched the request.
    NoRoute,
    /// The name did not resolve.
    DnsFailed,
    /// Connection refused or unreachable.
    Refused,
    /// A timer ran out (connect, first byte, idle, total).
    Timeout,
    /// TLS handshake or certificate failure.
    TlsFailed,
    /// The peer closed or reset the connection.
    Reset,
    /// The peer broke the protocol.
    Protocol,
    /// The request was malformed.
    BadRequest,
    /// The request (its body) is larger than allowed.
    TooLarge,
    /// The gateway is at a configured capacity limit.
    Overloaded,
    /// The client sent more requests than its rate limit allows.
    RateLimited,
    /// The route does not serve this client (`allow_clients`, `deny_clients`).
    Forbidden,
}

impl ErrorKind {
    /// Stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no_route",
            ErrorKind::DnsFailed => "dns_failed",
            ErrorKind::Refused => "refused",
            ErrorKind::Timeout => "timeout",
            ErrorKind::TlsFailed => "tls_failed",
            ErrorKind::Reset => "reset",
            ErrorKind::Protocol => "protocol",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Forbidden => "forbidden",
        }
    }
}

/// Whether a failed attempt may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Nothing reached the upstream: any request may be retried.
    Safe,
    /// The request may have reached the upstream's handler: only idempotent requests, by policy.
    IdempotentOnly,
    /// Never retried (client errors, exhausted deadline).
    Never,
}

/// How a failure is answered; produced only by [`ProxyError::classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// HTTP status for the client (if the response has not started).
    pub status: u16,
    /// Machine-readable code for the JSON body (`upstream_connect_failed`, ...).
    pub code: &'static str,
    /// RFC 9209 Proxy-Status error type.
    pub proxy_status: &'static str,
    /// Retry safety.
    pub retry: Retry,
}

/// A failure on the request path.
#[derive(Debug, thiserror::Error)]
#[error("{side} {stage}: {kind}{}", target.as_ref().map(|t| format!(" ({t})")).unwrap_or_default())]
pub struct ProxyError {
    /// Where.
    pub stage: Stage,
    /// Who is at fault.
    pub side: Side,
    /// What.
    pub kind: ErrorKind,
    /// The endpoint or name involved, if any.
    pub target: Option<String>,
    /// The underlying error.
    #[source]
    pub source: Option<BoxError>,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ProxyError {
    /// A new upstream-side error.
    pub fn upstream(stage: Stage, kind: ErrorKind) -> ProxyError {
        ProxyError {
            stage,
            side: Side::Upstream,
            kind,
            target: None,
            source: None,
        }
    }

    /// A new gateway-side error.
    pub fn gateway(stage: Stage, kind: ErrorKind) -> ProxyError {
        ProxyError {
            stage,
            side: Side::Gateway,
            kind,
            target: None,
            source: None,
        }
    }

    /// A new downstream-side error.
    pub fn downstream(stage: Stage, kind: ErrorKind) -> ProxyError {
        ProxyError {
            stage,
            side: Side::Downstream,
            kind,
            target: None,
            source: None,
        }
    }

    /// Names the endpoint or host involved.
    pub fn with_target(mut self, target: impl fmt::Display) -> ProxyError {
        self.target = Some(target.to_string());
        self
    }

    /// Attaches the cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> ProxyError {
        self.source = Some(source.into());
        self
    }

    /// The one mapping from failures to answers, retry safety and labels.
    pub fn classify(&self) -> Classification {
        use ErrorKind as K;
        use Stage as S;
        let c = |status, code, proxy_status, retry| Classification {
            status,
            code,
            proxy_status,
            retry,
        };
        match (self.stage, self.kind) {
            (S::Route, _) => c(404, "no_route", "destination_not_found", Retry::Never),
            (S::Admission, K::RateLimited) => {
                c(429, "rate_limited", "http_request_denied", Retry::Never)
            }
            (S::Admission, K::Forbidden) => {
                c(403, "forbidden", "http_request_denied", Retry::Never)
            }
            (S::Admission, _) => c(503, "no_capacity", "connection_limit_reached", Retry::Never),
            (S::Auth, K::Timeout) => c(504, "auth_timeout", "http_response_timeout", Retry::Never),
            (S::Auth, _) => c(502, "auth_failed", "destination_unavailable", Retry::Never),
            (S::RequestBody, K::Overloaded) => c(
                503,
                "request_buffer_failed",
                "proxy_internal_error",
                Retry::Never,
            ),
            (S::RequestHead | S::RequestBody, K::TooLarge) => {
                c(413, "request_too_large", "http_request_error", Retry::Never)
            }
            (S::RequestHead | S::RequestBody, K::Timeout) => {
                c(408, "request_timeout", "http_request_error", Retry::Never)
            }
            (S::RequestHead | S::RequestBody, _) => {
                c(400, "bad_request", "http_request_error", Retry::Never)
            }
            (S::Dns, K::Timeout) => c(504, "upstream_dns_timeout", "dns_timeout", Retry::Safe),
            (S::Dns, _) => c(502, "upstream_dns_failed", "dns_error", Retry::Safe),
            (S::Connect, K::Timeout) => c(
                504,
                "upstream_connect_timeout",
                "connection_timeout",
                Retry::Safe,
            ),
            (S::Connect, _) => c(
                502,
                "upstream_connect_failed",
                "connection_refused",
                Retry::Safe,
            ),
            (S::Tls, _) => c(
                502,
                "upstream_tls_failed",
                "tls_protocol_error",
                Retry::Never,
            ),
            (S::Send, _) => c(
                502,
                "upstream_send_failed",
                "connection_terminated",
                Retry::IdempotentOnly,
            ),
            (S::FirstByte, K::Timeout) => c(
                504,
                "upstream_timeout",
                "http_response_timeout",
                Retry::IdempotentOnly,
            ),
            (S::FirstByte, K::Protocol) => c(
                502,
                "upstream_bad_response",
                "http_protocol_error",
                Retry::IdempotentOnly,
            ),
            (S::FirstByte, _) => c(
                502,
                "upstream_reset",
                "connection_terminated",
                Retry::IdempotentOnly,
            ),
            (S::Body, K::Timeout) => c(
                504,
                "upstream_body_timeout",
                "http_response_timeout",
                Retry::Never,
            ),
            (S::Body, _) => c(
                502,
                "upstream_body_failed",
                "http_response_incomplete",
                Retry::Never,
            ),
            (S::ResponseWrite, _) => c(499, "client_gone", "http_request_error", Retry::Never),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(stage: Stage, kind: ErrorKind) -> (u16, &'static str, Retry) {
        let c = ProxyError::upstream(stage, kind).classify();
        (c.status, c.code, c.retry)
    }

    /// Locks the table in docs/errors.md.
    #[test]
    fn classification_table() {
        assert_eq!(
            row(Stage::Dns, ErrorKind::DnsFailed),
            (502, "upstream_dns_failed", Retry::Safe)
        );
        assert_eq!(
            row(Stage::Connect, ErrorKind::Refused),
            (502, "upstream_connect_failed", Retry::Safe)
        );
        assert_eq!(
            row(Stage::Connect, ErrorKind::Timeout),
            (504, "upstream_connect_timeout", Retry::Safe)
        );
        assert_eq!(
            row(Stage::Tls, ErrorKind::TlsFailed),
            (502, "upstream_tls_failed", Retry::Never)
        );
        assert_eq!(
            row(Stage::Send, ErrorKind::Reset),
            (502, "upstream_send_failed", Retry::IdempotentOnly)
        );
        assert_eq!(
            row(Stage::FirstByte, ErrorKind::Timeout),
            (504, "upstream_timeout", Retry::IdempotentOnly)
        );
        assert_eq!(
            row(Stage::FirstByte, ErrorKind::Reset),
            (502, "upstream_reset", Retry::IdempotentOnly)
        );
        assert_eq!(
            row(Stage::Body, ErrorKind::Reset),
            (502, "upstream_body_failed", Retry::Never)
        );
        assert_eq!(
            row(Stage::Route, ErrorKind::NoRoute),
            (404, "no_route", Retry::Never)
        );
        assert_eq!(
            row(Stage::Admission, ErrorKind::Overloaded),
            (503, "no_capacity", Retry::Never)
        );
        assert_eq!(
            row(Stage::Admission, ErrorKind::RateLimited),
            (429, "rate_limited", Retry::Never)
        );
        assert_eq!(
            row(Stage::Admission, ErrorKind::Forbidden),
            (403, "forbidden", Retry::Never)
        );
        assert_eq!(
            row(Stage::Auth, ErrorKind::Refused),
            (502, "auth_failed", Retry::Never)
        );
        assert_eq!(
            row(Stage::Auth, ErrorKind::Timeout),
            (504, "auth_timeout", Retry::Never)
        );
        assert_eq!(
            row(Stage::RequestBody, ErrorKind::Overloaded),
            (503, "request_buffer_failed", Retry::Never)
        );
        assert_eq!(
            row(Stage::RequestBody, ErrorKind::TooLarge),
            (413, "request_too_large", Retry::Never)
        );
    }

    #[test]
    fn display_names_side_stage_and_target() {
        let e = ProxyError::upstream(Stage::Connect, ErrorKind::Refused).with_target("127.0.0.1:9");
        assert_eq!(e.to_string(), "upstream connect: refused (127.0.0.1:9)");
    }
}
