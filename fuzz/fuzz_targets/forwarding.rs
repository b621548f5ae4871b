//! Forwarding and hop-by-hop header handling. Input: one flags byte (bit 0 TLS, bit 1 trusted
//! peer, bit 2 IPv6 client), 16 bytes of client address, then `\n`-separated lines: the prior
//! `X-Forwarded-For`, the host, and `name: value` request headers.
//!
//! Checked: every `Forwarded` element tether adds is well-formed RFC 7239 (`token=token` or
//! `token="quoted"` pairs split by `;`), names the client and the scheme, and carries the host
//! unchanged; `X-Forwarded-For` ends with the client; untrusted forwarding headers are gone;
//! hop-by-hop headers and those named by `Connection` are removed, `TE` survives only as
//! `trailers`.
#![no_main]

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tether_gateway::proxy::headers::{add_forwarding, strip_forwarding, strip_hop_by_hop};

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let flags = data[0];
    let (tls, trusted, v6) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
    let raw: [u8; 16] = data[1..17].try_into().unwrap_or_default();
    let client = if v6 {
        IpAddr::from(raw)
    } else {
        IpAddr::from([raw[0], raw[1], raw[2], raw[3]])
    };
    let mut lines = data[17..].split(|&b| b == b'\n');
    let prior = lines.next().unwrap_or_default();
    let host = lines.next().map(String::from_utf8_lossy);
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(prior) {
        h.insert("x-forwarded-for", v);
    }
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        h.append(n, v);
    }

    let connection_named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    strip_hop_by_hop(&mut h, true);
    for n in &connection_named {
        if n != header::TE {
            assert!(!h.contains_key(n), "{n} named by Connection survived");
        }
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        assert!(!h.contains_key(n), "{n} survived");
    }
    let te: Vec<_> = h.get_all(header::TE).iter().collect();
    assert!(
        te.is_empty() || te == [HeaderValue::from_static("trailers")],
        "{te:?}"
    );

    if !trusted {
        strip_forwarding(&mut h);
        for n in [
            "x-forwarded-for",
            "forwarded",
            "x-forwarded-proto",
            "x-forwarded-host",
        ] {
            assert!(!h.contains_key(n), "untrusted {n} survived");
        }
    }
    let before = h.get_all(header::FORWARDED).iter().count();
    add_forwarding(&mut h, client, tls, host.as_deref());

    let proto = if tls { "https" } else { "http" };
    assert_eq!(h.get_all("x-forwarded-proto").iter().count(), 1);
    assert_eq!(
        h.get("x-forwarded-proto").map(|v| v.as_bytes()),
        Some(proto.as_bytes())
    );

    let xff = h.get("x-forwarded-for").expect("x-forwarded-for set");
    let xff = xff.to_str().expect("x-forwarded-for is visible ASCII");
    let last = xff.rsplit(',').next().unwrap_or_default().trim();
    assert_eq!(last.parse::<IpAddr>().ok(), Some(client), "{xff:?}");

    let all: Vec<_> = h.get_all(header::FORWARDED).iter().collect();
    assert_eq!(all.len(), before + 1);
    let added = all[before].to_str().expect("forwarded is visible ASCII");
    let pairs = parse_forwarded_element(added).unwrap_or_else(|e| panic!("{added:?}: {e}"));
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let node = get("for").expect("for=");
    let node = node
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(node);
    assert_eq!(node.parse::<IpAddr>().ok(), Some(client), "{added:?}");
    assert_eq!(get("proto"), Some(proto), "{added:?}");
    if let Some(got) = get("host") {
        assert_eq!(Some(got), host.as_deref(), "{added:?}");
    }
});

/// One RFC 7239 forwarded-element: `pair *( ";" pair )`, `pair = token "=" value`,
/// `value = token / quoted-string` (RFC 9110 §5.6.4). Returns the pairs, quotes removed.
fn parse_forwarded_element(s: &str) -> Result<Vec<(String, String)>, String> {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let eq = rest.find('=').ok_or("pair without =")?;
        let name = &rest[..eq];
        if name.is_empty() || !name.chars().all(is_tchar) {
            return Err(format!("bad name {name:?}"));
        }
        rest = &rest[eq + 1..];
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("unterminated quoted-string".into()),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) if c == '\t' || c == ' ' || c.is_ascii_graphic() => v.push(c),
                        _ => return Err("bad quoted-pair".into()),
                    },
                    Some((_, c)) if c == '\t' || c == ' ' || c.is_ascii_graphic() => v.push(c),
                    Some((_, c)) => return Err(format!("bad qdtext {c:?}")),
                }
            };
            value = v;
            rest = &q[end + 1..];
        } else {
            let end = rest.find(';').unwrap_or(rest.len());
            value = rest[..end].to_owned();
            if value.is_empty() || !value.chars().all(is_tchar) {
                return Err(format!("bad token {value:?}"));
            }
            rest = &rest[end..];
        }
        out.push((name.to_ascii_lowercase(), value));
        match rest.strip_prefix(';') {
            Some(r) => rest = r,
            None if rest.is_empty() => return Ok(out),
            None => return Err(format!("junk after value: {rest:?}")),
        }
    }
}
