//! gRPC clients: which requests are gRPC, and how tether's own answers reach them. A gRPC client
//! reads a call's outcome from `grpc-status`, not from the HTTP status: a 504 with a JSON body
//! would surface as `UNAVAILABLE: unexpected HTTP status code` whatever happened. So a gRPC
//! request that tether answers itself (no route, admission, a failed upstream, its deadline) gets
//! a trailers-only response: HTTP 200, `grpc-status` and `grpc-message` in the head, no body.
//!
//! A response tether has to cut once it has started (its deadline passed, the upstream failed
//! or went idle) ends with `grpc-status` trailers when it is cut between two messages, as
//! [`Framing`] follows them; cut inside a message it is reset, as any other response. A
//! gRPC-Web response (without a `Content-Length`) ends the same way with the trailers frame
//! gRPC-Web clients read from the body ([`web_trailers`]), over HTTP/1.1 as over HTTP/2; for
//! gRPC-Web-text (base64, the JavaScript client's default mode) the body's base64 is followed
//! too, and the frame is sent in base64 when the body stopped at the end of a base64 group.

use base64::Engine as _;
use http::HeaderMap;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};

/// The status code header of a gRPC response.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The status message header of a gRPC response (percent-encoded).
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The kind of gRPC a request speaks, by its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `application/grpc`, `application/grpc+proto`, ...
    Grpc,
    /// gRPC-Web: `application/grpc-web`, `application/grpc-web+proto`.
    Web,
    /// gRPC-Web in base64: `application/grpc-web-text`.
    WebText,
}

impl Flavor {
    /// The flavor of a request with these headers, or `None` when it is not gRPC.
    pub fn of(headers: &HeaderMap) -> Option<Flavor> {
        let ct = headers.get(CONTENT_TYPE)?.as_bytes();
        let rest = strip_prefix_ignore_case(ct, b"application/grpc")?;
        let flavor = if let Some(rest) = strip_prefix_ignore_case(rest, b"-web-text") {
            (Flavor::WebText, rest)
        } else if let Some(rest) = strip_prefix_ignore_case(rest, b"-web") {
            (Flavor::Web, rest)
        } else {
            (Flavor::Grpc, rest)
        };
        // `application/grpcfoo` is some other type.
        matches!(flavor.1.first(), None | Some(b'+' | b';' | b' ')).then_some(flavor.0)
    }

    /// The `Content-Type` of tether's answers to this flavor.
    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Flavor::Grpc => "application/grpc",
            Flavor::Web => "application/grpc-web",
            Flavor::WebText => "application/grpc-web-text",
        })
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// gRPC status codes tether answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// 2: the failure has no closer code.
    Unknown = 2,
    /// 4: the call's own deadline passed (the route's `timeout`, the client's `grpc-timeout`).
    DeadlineExceeded = 4,
    /// 7: the route does not serve this client.
    PermissionDenied = 7,
    /// 8: a rate limit or a size limit.
    ResourceExhausted = 8,
    /// 12: no route serves the call.
    Unimplemented = 12,
    /// 13: the request was malformed.
    Internal = 13,
    /// 14: the upstream could not be reached, failed, was too slow, or had no room; another
    /// try may succeed.
    Unavailable = 14,
}

impl Code {
    /// The code of tether's answer `status` (the HTTP status it gives other clients);
    /// `deadline`: the request's deadline passed, rather than one of its upstream timeouts.
    /// Follows gRPC's HTTP-to-gRPC mapping, made more precise where tether knows more.
    pub fn for_status(status: u16, deadline: bool) -> Code {
        match status {
            _ if deadline => Code::DeadlineExceeded,
            408 => Code::DeadlineExceeded,
            400 => Code::Internal,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            413 | 429 | 431 => Code::ResourceExhausted,
            502..=504 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }

    /// The numeric code.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Where a gRPC response body is among its length-prefixed messages (a flag byte, a 4-byte
/// big-endian length, the message).
#[derive(Debug, Default, Clone)]
pub struct Framing {
    /// The current message's prefix, as far as it has arrived.
    prefix: [u8; 5],
    /// Prefix bytes seen.
    have: usize,
    /// Message bytes still to come.
    left: u64,
    /// gRPC-Web: the status goes in a trailers frame of the body, not in HTTP trailers.
    web: bool,
    /// A gRPC-Web trailers frame (flag bit 0x80) has begun: the upstream sent its status.
    trailers_sent: bool,
    /// gRPC-Web-text: the body is base64, followed through this.
    text: Option<Text>,
}

/// Where a gRPC-Web-text body is in its base64: groups of four characters, each decoded alone
/// (a group may end with padding: servers encode each chunk on its own).
#[derive(Debug, Default, Clone)]
struct Text {
    /// The current group's characters, as far as they have arrived.
    group: [u8; 4],
    have: usize,
    /// A character that is not base64 arrived: the body cannot be followed any more.
    lost: bool,
}

impl Framing {
    /// Follows a gRPC-Web body, which ends with a trailers frame rather than HTTP trailers.
    pub fn web() -> Framing {
        Framing {
            web: true,
            ..Framing::default()
        }
    }

    /// Follows a gRPC-Web-text body: gRPC-Web in base64.
    pub fn web_text() -> Framing {
        Framing {
            text: Some(Text::default()),
            ..Framing::web()
        }
    }

    /// Whether the body is gRPC-Web's.
    pub fn is_web(&self) -> bool {
        self.web
    }

    /// Whether the body is gRPC-Web-text's (its end goes in base64).
    pub fn is_text(&self) -> bool {
        self.text.is_some()
    }

    /// Follows `data`, the body's next bytes.
    pub fn advance(&mut self, data: &[u8]) {
        let Some(mut text) = self.text.take() else {
            return self.advance_binary(data);
        };
        for &c in data {
            if text.lost {
                break;
            }
            if c.is_ascii_whitespace() {
                continue;
            }
            text.group[text.have] = c;
            text.have += 1;
            if text.have == 4 {
                text.have = 0;
                let mut bytes = [0u8; 3];
                // Each group decoded alone, its padding included.
                match base64::engine::general_purpose::STANDARD.decode_slice(text.group, &mut bytes)
                {
                    Ok(n) => self.advance_binary(&bytes[..n]),
                    Err(_) => text.lost = true,
                }
            }
        }
        self.text = Some(text);
    }

    fn advance_binary(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                let [flags, a, b, c, d] = self.prefix;
                self.trailers_sent |= flags & 0x80 != 0;
                self.left = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.have = 0;
            }
        }
    }

    /// Whether every message so far arrived whole, and none was the upstream's own gRPC-Web
    /// trailers: the body can end here with tether's status.
    pub fn between_messages(&self) -> bool {
        self.have == 0
            && self.left == 0
            && !self.trailers_sent
            && self.text.as_ref().is_none_or(|t| t.have == 0 && !t.lost)
    }
}

/// gRPC-Web's trailers frame, the last of a body: flag 0x80, the length, and `grpc-status` and
/// `grpc-message` as header lines.
pub fn web_trailers(code: Code, message: &str) -> bytes::Bytes {
    let block = format!(
        "grpc-status:{}\r\ngrpc-message:{}\r\n",
        code.as_u8(),
        percent_encode(message)
    );
    let len = u32::try_from(block.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(5 + block.len());
    out.push(0x80);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(block.as_bytes());
    bytes::Bytes::from(out)
}

/// [`web_trailers`] in base64, for a gRPC-Web-text body.
pub fn web_text_trailers(code: Code, message: &str) -> bytes::Bytes {
    let frame = web_trailers(code, message);
    bytes::Bytes::from(base64::engine::general_purpose::STANDARD.encode(frame))
}

/// The method of gRPC's health checking protocol (`grpc.health.v1`).
pub const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// `HealthCheckResponse.status` of a service that serves.
pub const SERVING: u64 = 1;

/// The body of a `Check` call about `service`: one message, a `HealthCheckRequest` whose
/// field 1 is the service name (left out when empty, as protobuf leaves out defaults).
pub fn health_request(service: &str) -> bytes::Bytes {
    let mut message = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        message.push(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&message);
    bytes::Bytes::from(out)
}

/// `HealthCheckResponse.status` (field 1) of one response body holding one message; 0
/// (`UNKNOWN`) when the field is absent, `None` when the body is not one such message.
pub fn health_status(body: &[u8]) -> Option<u64> {
    let (&flags, rest) = body.split_first()?;
    let len = usize::try_from(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)).ok()?;
    let mut message = rest.get(4..4 + len)?;
    if flags != 0 || rest.len() != 4 + len {
        return None;
    }
    let mut status = 0;
    while !message.is_empty() {
        let key = take_varint(&mut message)?;
        // By wire type: the status's varint is kept, any other field skipped.
        match key & 7 {
            0 => {
                let value = take_varint(&mut message)?;
                if key >> 3 == 1 {
                    status = value;
                }
            }
            1 => message = message.get(8..)?,
            2 => {
                let n = usize::try_from(take_varint(&mut message)?).ok()?;
                message = message.get(n..)?;
            }
            5 => message = message.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(data: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = data.split_first()?;
        *data = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Trailers that end a gRPC response with `code` and `message`.
pub fn trailers(code: Code, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    put_status(&mut h, code, message);
    h
}

/// Sets `grpc-status` and `grpc-message` in `h`.
fn put_status(h: &mut HeaderMap, code: Code, message: &str) {
    h.insert(GRPC_STATUS, HeaderValue::from(u16::from(code.as_u8())));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
}

/// Turns a head of tether's own answer into a trailers-only gRPC response head: status 200,
/// `grpc-status`, and `grpc-message` saying what failed where (`upstream_timeout at first_byte`).
/// The other headers (`Proxy-Status`, `X-Request-Id`, `Retry-After`) stay.
pub fn trailers_only(parts: &mut http::response::Parts, flavor: Flavor, code: Code, message: &str) {
    parts.status = http::StatusCode::OK;
    let h = &mut parts.headers;
    h.remove(http::header::CONTENT_LENGTH);
    h.insert(CONTENT_TYPE, flavor.content_type());
    put_status(h, code, message);
}

/// gRPC's message encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    fn message(body: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn web_text_is_followed_through_padded_chunks_split_anywhere() {
        // Each message encoded alone (padding mid-body), the text cut at every offset.
        let text = [
            b64(&message(b"ticks")),
            b64(&message(b"tock")),
            b64(&message(b"t")),
        ]
        .concat()
        .into_bytes();
        assert!(text[..text.len() - 4].contains(&b'='));
        for cut in 0..text.len() {
            let mut f = Framing::web_text();
            f.advance(&text[..cut]);
            f.advance(&text[cut..]);
            assert!(f.between_messages(), "cut at {cut}");
        }
        // Mid-group, or mid-message: not between messages.
        let mut f = Framing::web_text();
        f.advance(&text[..text.len() - 1]);
        assert!(!f.between_messages());
        let mut f = Framing::web_text();
        f.advance(&b64(&message(b"ticks")).as_bytes()[..8]);
        assert!(!f.between_messages());
        // Not base64: lost for good.
        let mut f = Framing::web_text();
        f.advance(b"AA*A");
        f.advance(b64(&message(b"x")).as_bytes());
        assert!(!f.between_messages());
        // The upstream's own trailers frame.
        let mut f = Framing::web_text();
        f.advance(&web_text_trailers(Code::Unknown, "x"));
        assert!(!f.between_messages());
    }

    #[test]
    fn health_requests_and_responses_are_protobuf_in_one_message() {
        assert_eq!(&health_request("")[..], [0, 0, 0, 0, 0]);
        assert_eq!(&health_request("a.B")[..], b"\0\0\0\0\x05\x0a\x03a.B");
        let long = "s".repeat(200);
        let req = health_request(&long);
        // A two-byte varint length.
        assert_eq!(&req[5..8], [0x0a, 0xc8, 0x01]);
        assert_eq!(req.len(), 5 + 3 + 200);

        let one = |m: &[u8]| [&[0u8][..], &(m.len() as u32).to_be_bytes(), m].concat();
        assert_eq!(health_status(&one(&[0x08, 0x01])), Some(SERVING));
        assert_eq!(health_status(&one(&[0x08, 0x02])), Some(2));
        // Absent: UNKNOWN; unknown fields of each wire type skipped.
        assert_eq!(health_status(&one(&[])), Some(0));
        let mixed = [
            0x12, 0x02, b'h', b'i', 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0x25, 0, 0, 0, 0,
        ];
        let with_status = [&mixed[..], &[0x08, 0x01]].concat();
        assert_eq!(health_status(&one(&with_status)), Some(SERVING));
        // Not one whole message.
        assert_eq!(health_status(&one(&[0x08])), None);
        assert_eq!(health_status(&[0, 0, 0, 0, 5, 0x08]), None);
        assert_eq!(
            health_status(&[[1u8].as_slice(), &one(&[0x08, 1])[1..]].concat()),
            None
        );
        assert_eq!(
            health_status(&[one(&[0x08, 1]), one(&[0x08, 1])].concat()),
            None
        );
    }

    #[test]
    fn web_text_trailers_are_the_binary_frame_in_base64() {
        let text = web_text_trailers(Code::Unavailable, "gone");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&text[..])
            .unwrap();
        assert_eq!(decoded, web_trailers(Code::Unavailable, "gone"));
    }

    fn flavor(ct: &'static str) -> Option<Flavor> {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        Flavor::of(&h)
    }

    #[test]
    fn flavors_are_told_by_content_type() {
        assert_eq!(flavor("application/grpc"), Some(Flavor::Grpc));
        assert_eq!(flavor("application/grpc+proto"), Some(Flavor::Grpc));
        assert_eq!(flavor("Application/GRPC+json"), Some(Flavor::Grpc));
        assert_eq!(flavor("application/grpc-web"), Some(Flavor::Web));
        assert_eq!(flavor("application/grpc-web+proto"), Some(Flavor::Web));
        assert_eq!(flavor("application/grpc-web-text"), Some(Flavor::WebText));
        assert_eq!(
            flavor("application/grpc-web-text+proto"),
            Some(Flavor::WebText)
        );
        assert_eq!(flavor("application/grpcx"), None);
        assert_eq!(flavor("application/json"), None);
        assert_eq!(flavor("application/grp"), None);
        assert_eq!(Flavor::of(&HeaderMap::new()), None);
    }

    #[test]
    fn statuses_map_to_codes() {
        assert_eq!(Code::for_status(504, true), Code::DeadlineExceeded);
        assert_eq!(Code::for_status(504, false), Code::Unavailable);
        assert_eq!(Code::for_status(503, false), Code::Unavailable);
        assert_eq!(Code::for_status(502, false), Code::Unavailable);
        assert_eq!(Code::for_status(429, false), Code::ResourceExhausted);
        assert_eq!(Code::for_status(413, false), Code::ResourceExhausted);
        assert_eq!(Code::for_status(404, false), Code::Unimplemented);
        assert_eq!(Code::for_status(403, false), Code::PermissionDenied);
        assert_eq!(Code::for_status(400, false), Code::Internal);
        assert_eq!(Code::for_status(408, false), Code::DeadlineExceeded);
        assert_eq!(Code::for_status(500, false), Code::Unknown);
    }

    #[test]
    fn framing_follows_messages_across_chunks() {
        let mut f = Framing::default();
        assert!(f.between_messages());
        // Two messages (3 bytes, then empty), cut at every possible point.
        let body = [0u8, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 0];
        for cut in 0..=body.len() {
            let mut f = Framing::default();
            f.advance(&body[..cut]);
            assert_eq!(
                f.between_messages(),
                matches!(cut, 0 | 8 | 13),
                "cut at {cut}"
            );
            f.advance(&body[cut..]);
            assert!(f.between_messages(), "cut at {cut}");
        }
        // Byte by byte.
        for (i, b) in body.iter().enumerate() {
            f.advance(std::slice::from_ref(b));
            assert_eq!(f.between_messages(), matches!(i + 1, 8 | 13), "after {i}");
        }
    }

    #[test]
    fn a_web_body_that_sent_its_own_trailers_is_not_given_more() {
        let mut f = Framing::web();
        f.advance(&[0, 0, 0, 0, 1, b'a']);
        assert!(f.between_messages());
        let t = web_trailers(Code::Unavailable, "tether: upstream_reset at body");
        assert_eq!(&t[..], b"\x80\x00\x00\x00\x3dgrpc-status:14\r\ngrpc-message:tether: upstream_reset at body\r\n");
        f.advance(&t);
        assert!(!f.between_messages());
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("a b%c"), "a b%25c");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }
}
