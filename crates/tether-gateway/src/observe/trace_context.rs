//! W3C Trace Context (`traceparent`): read the trace id for the access log and, when a route asks
//! for it, put tether's own span between the client and the upstream.
//!
//! `traceparent: 00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>`. In span mode the
//! upstream request carries the same trace id and flags with tether's span id as the parent id,
//! so a backend's spans hang under tether's access-log line (`span_id`). A request without a
//! valid `traceparent` starts a new trace (flags `01`, sampled: tether records every request in
//! its access log), and an invalid one is replaced along with its `tracestate`, as the
//! specification asks.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

use crate::config::TraceContext;

/// The `traceparent` header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The `tracestate` header.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A parsed `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits, not all zero.
    pub parent_id: String,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a header value; `None` if it is not a valid `traceparent`.
    pub fn parse(v: &str) -> Option<TraceParent> {
        let mut parts = v.trim().split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let parent_id = parts.next()?;
        let flags = parts.next()?;
        // Version 00 has exactly four fields; later versions may append more.
        if !is_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !is_hex(trace_id, 32) || !is_hex(parent_id, 16) || !is_hex(flags, 2) {
            return None;
        }
        if trace_id.bytes().all(|b| b == b'0') || parent_id.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(TraceParent {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// The header value (version 00).
    pub fn to_header(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What trace context handling decided for one request, for the access log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceIds {
    /// The trace the request belongs to, if any.
    pub trace_id: Option<String>,
    /// tether's span, in span mode.
    pub span_id: Option<String>,
}

/// Applies `mode` to the headers of the request about to go upstream. `present`: whether they
/// hold a `traceparent` (known from the header scan; without one there is nothing to look up).
pub fn apply(headers: &mut HeaderMap, mode: TraceContext, present: bool) -> TraceIds {
    let incoming = present
        .then(|| headers.get(TRACEPARENT))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    match mode {
        TraceContext::Passthrough => TraceIds {
            trace_id: incoming.map(|t| t.trace_id),
            span_id: None,
        },
        TraceContext::Span => {
            let span_id = hex(random_nonzero(), 16);
            let out = match incoming {
                Some(t) => TraceParent {
                    parent_id: span_id.clone(),
                    ..t
                },
                None => {
                    // Absent or invalid: restart the trace; a tracestate without a valid parent
                    // is meaningless.
                    headers.remove(TRACESTATE);
                    TraceParent {
                        trace_id: format!(
                            "{}{}",
                            hex(random_nonzero(), 16),
                            hex(random_nonzero(), 16)
                        ),
                        parent_id: span_id.clone(),
                        flags: 0x01,
                    }
                }
            };
            if let Ok(v) = HeaderValue::from_str(&out.to_header()) {
                headers.insert(TRACEPARENT, v);
            }
            TraceIds {
                trace_id: Some(out.trace_id),
                span_id: Some(span_id),
            }
        }
    }
}

fn hex(v: u64, digits: usize) -> String {
    format!("{v:0digits$x}")
}

/// A random non-zero u64. Trace and span ids must be unique, not secret: the standard library's
/// randomly keyed SipHash over a counter and the clock is enough.
pub(crate) fn random_nonzero() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.write_u128(nanos);
        let v = h.finish();
        if v != 0 {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `apply` told whether there is a `traceparent`, as the header scan tells it.
    fn scanned(h: &mut HeaderMap, mode: TraceContext) -> TraceIds {
        let present = h.contains_key(TRACEPARENT);
        apply(h, mode, present)
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_rejects() {
        let t = TraceParent::parse(TP).unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, "00f067aa0ba902b7");
        assert_eq!(t.flags, 1);
        assert_eq!(t.to_header(), TP);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(TraceParent::parse(&format!("01{}-extra", &TP[2..])).is_some());
    }

    #[test]
    fn passthrough_leaves_headers_alone() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        h.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        let ids = scanned(&mut h, TraceContext::Passthrough);
        assert_eq!(
            ids.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(ids.span_id, None);
        assert_eq!(h.get(TRACEPARENT).unwrap(), TP);
        assert_eq!(h.get(TRACESTATE).unwrap(), "k=v");
    }

    #[test]
    fn span_replaces_the_parent_id_only() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        h.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        let ids = scanned(&mut h, TraceContext::Span);
        let span = ids.span_id.unwrap();
        let out = TraceParent::parse(h.get(TRACEPARENT).unwrap().to_str().unwrap()).unwrap();
        assert_eq!(out.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(out.parent_id, span);
        assert_ne!(span, "00f067aa0ba902b7");
        assert_eq!(out.flags, 1);
        assert_eq!(h.get(TRACESTATE).unwrap(), "k=v");
    }

    #[test]
    fn span_starts_a_trace() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        h.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        let a = scanned(&mut h, TraceContext::Span);
        let out = TraceParent::parse(h.get(TRACEPARENT).unwrap().to_str().unwrap()).unwrap();
        assert_eq!(Some(out.trace_id), a.trace_id);
        assert!(h.get(TRACESTATE).is_none());
        let b = scanned(&mut HeaderMap::new(), TraceContext::Span);
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
    }
}
