//! Header rewriting between downstream and upstream: hop-by-hop removal, forwarding headers, and
//! the changes a route's configuration asks for.

use std::net::IpAddr;
use std::sync::OnceLock;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::HeaderRules;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the legacy ones
/// proxies are expected to drop.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Forwarding headers, which only a trusted peer may set.
const FORWARDING: [HeaderName; 5] = [
    X_FORWARDED_FOR,
    header::FORWARDED,
    X_FORWARDED_PROTO,
    HeaderName::from_static("x-forwarded-host"),
    X_FORWARDED_CLIENT_CERT,
];

/// What one pass over a message's header names found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// A hop-by-hop header (one of [`strip_hop_by_hop`]'s).
    pub hop_by_hop: bool,
    /// A forwarding header (one of [`strip_forwarding`]'s).
    pub forwarding: bool,
    /// The caller's `extra` name.
    pub extra: bool,
    /// `x-request-id`.
    pub request_id: bool,
    /// `content-type` (gRPC is told by it).
    pub content_type: bool,
    /// `traceparent`.
    pub traceparent: bool,
    /// `host`.
    pub host: bool,
}

/// One pass over the names, without hashing: most messages carry no hop-by-hop or forwarding
/// header, and this settles it (and whether `extra` and the few headers a request is looked up
/// for are there) for all of them at once. A lookup that would miss is then never made.
pub fn scan(headers: &HeaderMap, extra: Option<&HeaderName>) -> Found {
    let mut found = Found::default();
    for n in headers.keys() {
        // Matched as text: a switch on the length, then one comparison.
        match n.as_str() {
            "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate" => found.hop_by_hop = true,
            "x-forwarded-for"
            | "forwarded"
            | "x-forwarded-proto"
            | "x-forwarded-host"
            | "x-forwarded-client-cert" => found.forwarding = true,
            "x-request-id" => found.request_id = true,
            "content-type" => found.content_type = true,
            "traceparent" => found.traceparent = true,
            "host" => found.host = true,
            _ => {}
        }
        if extra.is_some_and(|e| e == n) {
            found.extra = true;
        }
    }
    found
}

/// Removes hop-by-hop headers, including those named by `Connection`. `TE: trailers` survives on
/// requests (gRPC needs it end to end).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    if scan(headers, None).hop_by_hop {
        remove_hop_by_hop(headers, keep_te_trailers);
    }
}

/// The elements of the comma-separated lists in every `name` field (values that are not visible
/// ASCII are skipped), trimmed.
pub(crate) fn list_elements<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
}

/// [`strip_hop_by_hop`] once [`scan`] found one.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let te_trailers = keep_te_trailers
        && list_elements(headers, &header::TE).any(|t| t.eq_ignore_ascii_case("trailers"));
    let named: Vec<HeaderName> = list_elements(headers, &header::CONNECTION)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove(header::PROXY_AUTHENTICATE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The protocols an HTTP/1.1 message asks to switch to (RFC 9110 §7.8): its `Upgrade` values,
/// when its `Connection` header names `upgrade`. `None` for any other message.
pub fn upgrade_of(headers: &HeaderMap) -> Option<Vec<HeaderValue>> {
    if !list_elements(headers, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return None;
    }
    let protocols: Vec<HeaderValue> = headers.get_all(header::UPGRADE).iter().cloned().collect();
    (!protocols.is_empty()).then_some(protocols)
}

/// Puts an upgrade back once the hop-by-hop headers are gone: `Connection: upgrade` and the
/// `Upgrade` values, for the next hop to switch protocols too.
pub fn restore_upgrade(headers: &mut HeaderMap, protocols: &[HeaderValue]) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let mut protocols = protocols.iter().cloned();
    let Some(first) = protocols.next() else {
        headers.remove(header::UPGRADE);
        return;
    };
    // Through the entry (not `append`, which parsing calls for every field): this runs only for
    // an upgrade, and must not change how the per-request parsing is compiled.
    let mut entry = match headers.entry(header::UPGRADE) {
        header::Entry::Occupied(mut e) => {
            e.insert(first);
            e
        }
        header::Entry::Vacant(e) => e.insert_entry(first),
    };
    for p in protocols {
        entry.append(p);
    }
}

/// Turns an HTTP/2 extended CONNECT (RFC 8441) into the request an HTTP/1.1 upstream expects:
/// a `GET` (with `switching`, already carrying `Connection: upgrade` and the protocol in
/// `Upgrade`). A WebSocket's HTTP/1.1 handshake needs a `Sec-WebSocket-Key`, which RFC 8441
/// clients do not send: a fresh one is made. The upstream's `Sec-WebSocket-Accept` answers it,
/// so it is not passed back.
pub fn from_extended_connect<B>(req: &mut http::Request<B>, switching: bool) {
    *req.method_mut() = http::Method::GET;
    let websocket = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if switching && websocket && !req.headers().contains_key(header::SEC_WEBSOCKET_KEY) {
        use base64::Engine as _;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&crate::observe::trace_context::random_nonzero().to_le_bytes());
        nonce[8..].copy_from_slice(&crate::observe::trace_context::random_nonzero().to_le_bytes());
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        if let Ok(v) = HeaderValue::from_str(&key) {
            req.headers_mut().insert(header::SEC_WEBSOCKET_KEY, v);
        }
    }
}

/// Removes forwarding headers (from a peer that is not trusted to set them).
pub fn strip_forwarding(headers: &mut HeaderMap) {
    if scan(headers, None).forwarding {
        remove_forwarding(headers);
    }
}

/// [`strip_forwarding`] once [`scan`] found one.
pub fn remove_forwarding(headers: &mut HeaderMap) {
    for n in &FORWARDING {
        headers.remove(n);
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, and sets `X-Forwarded-Proto`.
pub fn add_forwarding(headers: &mut HeaderMap, client: IpAddr, tls: bool, host: Option<&str>) {
    add_forwarding_for(
        headers,
        &ClientForwarding::new(client, tls),
        host.map(str::as_bytes),
    );
}

/// The forwarding text of one client connection, made once and used for each of its requests.
#[derive(Debug, Clone)]
pub struct ClientForwarding {
    /// The client address as an `X-Forwarded-For` element.
    ip: HeaderValue,
    /// `for=<node>;proto=<proto>`, the start of its `Forwarded` element.
    node: String,
    proto: &'static str,
    /// The whole `Forwarded` element for the first host asked for on the connection, kept for
    /// the requests after it that ask for the same one (nearly all do): made once, then shared.
    forwarded: OnceLock<(Option<Box<[u8]>>, HeaderValue)>,
}

impl ClientForwarding {
    /// The forwarding text for `client` on a connection that is TLS or not.
    pub fn new(client: IpAddr, tls: bool) -> ClientForwarding {
        let proto = if tls { "https" } else { "http" };
        let (ip_text, node) = match client {
            // Made again for every connection (and after each park): no formatter pass.
            IpAddr::V4(v4) => {
                let mut buf = [0u8; 24];
                let n = crate::observe::access::ipv4_text(v4, &mut buf);
                let ip = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut node = String::with_capacity(4 + n + 7 + proto.len());
                node.push_str("for=");
                node.push_str(&ip);
                node.push_str(";proto=");
                node.push_str(proto);
                (ip, node)
            }
            IpAddr::V6(_) => {
                let ip = client.to_string();
                let node = format!("for=\"[{ip}]\";proto={proto}");
                (ip, node)
            }
        };
        ClientForwarding {
            // An address's text is always a valid header value.
            ip: HeaderValue::from_maybe_shared(bytes::Bytes::from(ip_text))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            node,
            proto,
            forwarded: OnceLock::new(),
        }
    }

    /// The `Forwarded` element for a request that asked for `host` (`None`: no usable host).
    fn forwarded(&self, host: Option<&[u8]>) -> Option<HeaderValue> {
        if let Some((cached, v)) = self.forwarded.get()
            && cached.as_deref() == host
        {
            return Some(v.clone());
        }
        let mut fwd = Vec::with_capacity(self.node.len() + host.map_or(0, |h| h.len() + 8));
        fwd.extend_from_slice(self.node.as_bytes());
        if let Some(h) = host {
            fwd.extend_from_slice(b";host=\"");
            fwd.extend_from_slice(h);
            fwd.push(b'"');
        }
        let v = HeaderValue::from_maybe_shared(bytes::Bytes::from(fwd)).ok()?;
        // The first host only: a connection that switches hosts builds each element afresh.
        let _ = self.forwarded.set((host.map(Box::from), v.clone()));
        Some(v)
    }
}

/// [`add_forwarding`] with the connection's text made beforehand.
/// The host is taken as bytes, as the request carries it.
pub fn add_forwarding_for(headers: &mut HeaderMap, client: &ClientForwarding, host: Option<&[u8]>) {
    // One lookup for both reading and writing the header.
    match headers.entry(X_FORWARDED_FOR) {
        header::Entry::Occupied(mut e) => {
            // A prior value that is not visible ASCII is not carried on: it is replaced.
            let xff = match e.get().to_str() {
                Ok(prev) => {
                    let mut v = Vec::with_capacity(prev.len() + 2 + client.ip.len());
                    v.extend_from_slice(prev.as_bytes());
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(client.ip.as_bytes());
                    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
                }
                Err(_) => Some(client.ip.clone()),
            };
            if let Some(v) = xff {
                e.insert(v);
            }
        }
        header::Entry::Vacant(e) => {
            e.insert(client.ip.clone());
        }
    }
    // Only what fits a quoted-string unescaped: a `"` or `\` would end it or escape its end.
    let host = host.filter(|h| {
        h.iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    });
    if let Some(v) = client.forwarded(host) {
        headers.append(header::FORWARDED, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.proto));
}

/// Appends the client certificate's `X-Forwarded-Client-Cert` element. Out of line: only
/// mutual-TLS listeners call it, and inlined it costs every request.
#[cold]
pub fn add_client_cert(headers: &mut HeaderMap, element: &HeaderValue) {
    headers.append(X_FORWARDED_CLIENT_CERT, element.clone());
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// The client certificate a TLS listener verified (Envoy's format); from an untrusted peer,
/// removed with the other forwarding headers.
pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Whether a configured rule may not touch `name`: it frames the message or describes the
/// connection, and tether (with hyper) sets it itself. (`Proxy-Authorization`, dropped from
/// requests as hop-by-hop, may be set for the upstream.)
pub(crate) fn is_framing(name: &HeaderName) -> bool {
    *name == header::CONTENT_LENGTH
        || (*name != header::PROXY_AUTHORIZATION && HOP_BY_HOP.contains(name))
}

/// A configured header name, or why it is not one.
pub fn header_name(n: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?} is not a valid header name"))
}

/// A configured value of header `n`, or why no header can carry it.
pub fn header_value(n: &str, v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|_| {
        format!("the value for {n:?} has a character no header can carry (a control character or line break)")
    })
}

/// A route's header changes ([`HeaderRules`]), checked and parsed once.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    /// The `host` a request rule sets: the upstream request's `Host`, or its `:authority` over
    /// HTTP/2.
    host: Option<HeaderValue>,
}

impl Rewrite {
    /// Rules for upstream requests. `host` may only be set (a request carries exactly one);
    /// `budget_header`, stamped on every attempt, is left to its own setting.
    pub fn request(rules: &HeaderRules, budget_header: Option<&str>) -> Result<Rewrite, String> {
        let mut r = Rewrite::parse(rules)?;
        if r.remove.contains(&header::HOST) || r.add.iter().any(|(n, _)| n == header::HOST) {
            return Err("\"host\" can only be set: a request carries exactly one".into());
        }
        // (Names compared as names: no text is taken from them, which keeps the map's name
        // code inlined where requests use it.)
        if let Some(b) = budget_header
            && let Ok(budget) = HeaderName::from_bytes(b.as_bytes())
            && r.names().any(|n| *n == budget)
        {
            return Err(format!(
                "{b:?} is the route's budget header, stamped on every attempt; set budget_header instead"
            ));
        }
        if let Some(i) = r.set.iter().position(|(n, _)| n == header::HOST) {
            let host = r.set.remove(i).1;
            // Also an HTTP/2 upstream's `:authority`.
            if http::uri::Authority::try_from(host.as_bytes()).is_err() {
                return Err(format!(
                    "{host:?} is not a host (name or address, optional port)"
                ));
            }
            r.host = Some(host);
            if r.set.iter().any(|(n, _)| n == header::HOST) {
                return Err("\"host\" is set twice".into());
            }
        }
        Ok(r)
    }

    /// Rules for responses on their way to the client.
    pub fn response(rules: &HeaderRules) -> Result<Rewrite, String> {
        Rewrite::parse(rules)
    }

    fn parse(rules: &HeaderRules) -> Result<Rewrite, String> {
        let name = |n: &str| {
            let name = header_name(n)?;
            if is_framing(&name) {
                return Err(format!(
                    "{n:?} frames the message or describes the connection; tether sets it itself"
                ));
            }
            Ok(name)
        };
        let pair = |(n, v): &(String, String)| Ok::<_, String>((name(n)?, header_value(n, v)?));
        Ok(Rewrite {
            remove: rules
                .remove
                .iter()
                .map(|n| name(n))
                .collect::<Result<_, _>>()?,
            set: rules.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: rules.add.iter().map(pair).collect::<Result<_, _>>()?,
            host: None,
        })
    }

    fn names(&self) -> impl Iterator<Item = &HeaderName> {
        let pairs = self.set.iter().chain(&self.add).map(|(n, _)| n);
        self.remove.iter().chain(pairs)
    }

    /// True when [`Rewrite::apply`] changes nothing (a `host` is applied apart).
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// The `host` the rules set, if any.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// Removes, then sets, then adds.
    // Names passed by reference: calls with owned names would share the one copy of the map's
    // insert and append code with the request's path, where the compiler then stopped inlining
    // them (about 80 instructions more per request).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n, v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(remove: &[&str], set: &[(&str, &str)], add: &[(&str, &str)]) -> HeaderRules {
        let pairs = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        HeaderRules {
            remove: remove.iter().map(|n| n.to_string()).collect(),
            set: pairs(set),
            add: pairs(add),
        }
    }

    #[test]
    fn route_rules_remove_then_set_then_add() {
        let r = Rewrite::response(&rules(
            &["Server", "x-gone"],
            &[("X-Env", "prod"), ("server", "edge")],
            &[("via", "1.1 tether"), ("x-env", "extra")],
        ))
        .unwrap();
        let mut h = map(&[
            ("server", "app"),
            ("x-gone", "1"),
            ("x-gone", "2"),
            ("x-env", "dev"),
            ("via", "1.1 lb"),
            ("x-kept", "yes"),
        ]);
        r.apply(&mut h);
        let all =
            |n: &str| -> Vec<&str> { h.get_all(n).iter().map(|v| v.to_str().unwrap()).collect() };
        assert_eq!(all("server"), ["edge"]);
        assert!(all("x-gone").is_empty());
        assert_eq!(all("x-env"), ["prod", "extra"]);
        assert_eq!(all("via"), ["1.1 lb", "1.1 tether"]);
        assert_eq!(all("x-kept"), ["yes"]);
        assert!(
            Rewrite::response(&HeaderRules::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_request_rule_setting_host_is_kept_apart_as_the_upstream_host() {
        let r = Rewrite::request(&rules(&[], &[("Host", "app.internal:8080")], &[]), None).unwrap();
        assert_eq!(
            r.host().map(HeaderValue::as_bytes),
            Some(&b"app.internal:8080"[..])
        );
        assert!(
            r.is_empty(),
            "host is applied by the request's builder, not by apply"
        );
        let mut h = map(&[("host", "client.example")]);
        r.apply(&mut h);
        assert_eq!(h["host"], "client.example");
    }

    #[test]
    fn bad_route_rules_are_refused_with_the_reason() {
        let refused =
            |r: HeaderRules| Rewrite::request(&r, Some("x-request-timeout-ms")).unwrap_err();
        for framing in [
            "connection",
            "Transfer-Encoding",
            "content-length",
            "upgrade",
            "te",
        ] {
            let e = refused(rules(&[framing], &[], &[]));
            assert!(e.contains("tether sets it itself"), "{framing}: {e}");
        }
        assert!(refused(rules(&[], &[("bad name", "v")], &[])).contains("not a valid header name"));
        let e = refused(rules(&[], &[("x-a", "one\r\nx-b: two")], &[]));
        assert!(e.contains("line break"), "{e}");
        assert!(refused(rules(&["host"], &[], &[])).contains("can only be set"));
        assert!(refused(rules(&[], &[], &[("host", "a")])).contains("can only be set"));
        assert!(refused(rules(&[], &[("host", "a b")], &[])).contains("not a host"));
        assert!(refused(rules(&[], &[("Host", "a"), ("host", "b")], &[])).contains("set twice"));
        let e = refused(rules(&["X-Request-Timeout-Ms"], &[], &[]));
        assert!(e.contains("budget header"), "{e}");
        // Without a budget header the name is free, and a response may name any host.
        assert!(Rewrite::request(&rules(&["x-request-timeout-ms"], &[], &[]), None).is_ok());
        assert!(Rewrite::response(&rules(&["host"], &[], &[])).is_ok());
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn an_upgrade_is_asked_for_by_connection_upgrade_with_an_upgrade_header() {
        let asked = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(
            upgrade_of(&asked),
            Some(vec![HeaderValue::from_static("websocket")])
        );
        // `Upgrade` alone, or `Connection: upgrade` alone, asks for nothing.
        assert_eq!(upgrade_of(&map(&[("upgrade", "websocket")])), None);
        assert_eq!(upgrade_of(&map(&[("connection", "upgrade")])), None);
        assert_eq!(
            upgrade_of(&map(&[
                ("connection", "upgraded"),
                ("upgrade", "websocket")
            ])),
            None
        );
    }

    #[test]
    fn an_upgrade_survives_hop_by_hop_removal_when_restored() {
        let mut h = map(&[
            ("connection", "Upgrade, x-private"),
            ("upgrade", "websocket"),
            ("upgrade", "h2c"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let protocols = upgrade_of(&h).unwrap();
        remove_hop_by_hop(&mut h, false);
        restore_upgrade(&mut h, &protocols);
        assert_eq!(h["connection"], "upgrade");
        let up: Vec<_> = h.get_all("upgrade").iter().collect();
        assert_eq!(up, ["websocket", "h2c"]);
        // Everything else `Connection` named, and the other hop-by-hop headers, stay removed;
        // end-to-end headers stay.
        assert!(!h.contains_key("x-private") && !h.contains_key("keep-alive"));
        assert!(h.contains_key("sec-websocket-key"));
    }

    #[test]
    fn a_clients_forwarding_text_is_its_address_as_display_writes_it() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.99.100",
            "127.0.0.1",
            "192.168.1.254",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
            "::ffff:10.1.2.3",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            for (tls, proto) in [(false, "http"), (true, "https")] {
                let f = ClientForwarding::new(addr, tls);
                assert_eq!(f.ip.to_str().unwrap(), ip, "{ip}");
                let node = if addr.is_ipv4() {
                    format!("for={ip};proto={proto}")
                } else {
                    format!("for=\"[{ip}]\";proto={proto}")
                };
                assert_eq!(f.node, node);
                assert_eq!(f.proto, proto);
            }
        }
    }

    #[test]
    fn removes_hop_by_hop_and_connection_listed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("x-private").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get_all("x-multi").iter().count(), 2);
    }

    #[test]
    fn strips_each_hop_by_hop_name_alone_and_leaves_others() {
        for name in [
            "proxy-authenticate",
            "keep-alive",
            "upgrade",
            "proxy-connection",
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false);
            assert!(h.get(name).is_none(), "{name} kept");
            assert_eq!(h.len(), 1);
        }
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn scan_finds_each_listed_name_and_the_extra_one() {
        let extra = HeaderName::from_static("x-budget");
        for (names, want) in [
            (
                &HOP_BY_HOP[..],
                Found {
                    hop_by_hop: true,
                    ..Found::default()
                },
            ),
            (
                &[header::PROXY_AUTHENTICATE][..],
                Found {
                    hop_by_hop: true,
                    ..Found::default()
                },
            ),
            (
                &FORWARDING[..],
                Found {
                    forwarding: true,
                    ..Found::default()
                },
            ),
            (
                &[extra.clone()][..],
                Found {
                    extra: true,
                    ..Found::default()
                },
            ),
        ] {
            for n in names {
                let mut h = HeaderMap::new();
                h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
                h.insert(n.clone(), HeaderValue::from_static("x"));
                h.insert("x-kept", HeaderValue::from_static("1"));
                assert_eq!(scan(&h, Some(&extra)), want, "{n}");
            }
        }
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static("a"));
        h.insert("x-budgets", HeaderValue::from_static("1"));
        h.insert("x-request-ids", HeaderValue::from_static("1"));
        assert_eq!(scan(&h, Some(&extra)), Found::default());
        // The headers a request is looked up for, each alone.
        type Flag = fn(&Found) -> bool;
        let flags: [(&str, Flag); 4] = [
            ("x-request-id", |f| f.request_id),
            ("content-type", |f| f.content_type),
            ("traceparent", |f| f.traceparent),
            ("host", |f| f.host),
        ];
        for (name, flag) in flags {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            h.insert(name, HeaderValue::from_static("x"));
            let found = scan(&h, None);
            assert!(flag(&found), "{name}");
            let others = flags.iter().filter(|(n, f)| *n != name && f(&found));
            assert_eq!(others.count(), 0, "{name}");
            assert_eq!((found.hop_by_hop, found.forwarding), (false, false));
        }
    }

    #[test]
    fn strips_every_forwarding_header() {
        let mut h = HeaderMap::new();
        for name in [
            "x-forwarded-for",
            "forwarded",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-forwarded-client-cert",
        ] {
            h.insert(name, HeaderValue::from_static("spoofed"));
        }
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_forwarding(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarding_replaces_a_prior_value_that_is_not_visible_ascii() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"10.0.0.1, \xe9").unwrap(),
        );
        add_forwarding(&mut h, "192.0.2.7".parse().unwrap(), false, None);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.7");
    }

    #[test]
    fn forwarding_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarding(&mut h, "::1".parse().unwrap(), true, Some("example.com"));
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, ::1");
        assert_eq!(
            h.get(header::FORWARDED).unwrap(),
            "for=\"[::1]\";proto=https;host=\"example.com\""
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    }

    #[test]
    fn each_request_on_a_connection_gets_its_own_hosts_element() {
        let conn = ClientForwarding::new("192.0.2.7".parse().unwrap(), false);
        let forwarded = |host: Option<&str>| {
            let mut h = HeaderMap::new();
            add_forwarding_for(&mut h, &conn, host.map(str::as_bytes));
            h.get(header::FORWARDED)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        };
        // The first host is kept for the requests after it; any other is built afresh.
        for (host, want) in [
            (Some("a.test"), "for=192.0.2.7;proto=http;host=\"a.test\""),
            (Some("a.test"), "for=192.0.2.7;proto=http;host=\"a.test\""),
            (Some("b.test"), "for=192.0.2.7;proto=http;host=\"b.test\""),
            (None, "for=192.0.2.7;proto=http"),
            (Some("a.tes"), "for=192.0.2.7;proto=http;host=\"a.tes\""),
            (Some("a.test"), "for=192.0.2.7;proto=http;host=\"a.test\""),
        ] {
            assert_eq!(forwarded(host), want, "{host:?}");
        }
        let none_first = ClientForwarding::new("192.0.2.8".parse().unwrap(), true);
        for host in [None, Some("c.test"), None] {
            let mut h = HeaderMap::new();
            add_forwarding_for(&mut h, &none_first, host.map(str::as_bytes));
            let want = match host {
                Some(host) => format!("for=192.0.2.8;proto=https;host=\"{host}\""),
                None => "for=192.0.2.8;proto=https".to_owned(),
            };
            assert_eq!(h.get(header::FORWARDED).unwrap(), want.as_str());
        }
    }

    #[test]
    fn host_that_would_break_the_quoted_string_is_left_out() {
        // `host="a\"` would escape its closing quote: the element would run on unterminated.
        for host in ["a\\", "a\"b", "a\\\"b"] {
            let mut h = HeaderMap::new();
            add_forwarding(&mut h, "192.0.2.7".parse().unwrap(), false, Some(host));
            assert_eq!(
                h.get(header::FORWARDED).unwrap(),
                "for=192.0.2.7;proto=http"
            );
        }
    }

    #[test]
    fn fuzz_smoke_forwarding_never_emits_bad_values() {
        // Fixed-seed xorshift64*: arbitrary prior X-Forwarded-For values and Host strings.
        let mut x = 0x5EED_0004u64;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let pieces = [
            "a",
            "example.com",
            ":",
            "8080",
            "\"",
            ";",
            ",",
            "=",
            " ",
            "\t",
            "[",
            "]",
            "::1",
            "for=",
            "\u{e9}",
            "\r",
            "\n",
            "\0",
            "\u{7f}",
        ];
        for _ in 0..10_000 {
            let mut text = || {
                let n = next() % 4;
                (0..n)
                    .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                    .collect::<String>()
            };
            let prior = text();
            let host = text();
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&prior) {
                h.insert("x-forwarded-for", v);
            }
            let client = if next().is_multiple_of(2) {
                IpAddr::from([127, 0, 0, 1])
            } else {
                IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
            };
            let tls = next().is_multiple_of(2);
            add_forwarding(&mut h, client, tls, Some(&host));
            let fwd = h.get_all(header::FORWARDED).iter().next_back().unwrap();
            let fwd = fwd.to_str().unwrap();
            assert!(fwd.starts_with("for="), "{fwd:?}");
            assert_eq!(fwd.matches('"').count() % 2, 0, "{fwd:?}");
            assert!(h.get("x-forwarded-for").is_some());
            assert_eq!(
                h.get("x-forwarded-proto").unwrap(),
                if tls { "https" } else { "http" }
            );
        }
    }
}
