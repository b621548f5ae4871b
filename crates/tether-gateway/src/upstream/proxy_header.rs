//! The PROXY protocol header (HAProxy's, version 1 or 2) tether writes first on a connection to
//! an upstream that asks for one (`proxy_protocol`), before TLS and HTTP: it names the client the
//! connection carries requests for, as HAProxy's `send-proxy` and Envoy's upstream PROXY
//! protocol do.

use std::net::{IpAddr, SocketAddr};

use ppp::v2::{Command, Protocol, Version};

use crate::config::ProxyProtocolVersion;

/// The header of a connection carrying the requests of `client`, who reached tether at `local`.
pub fn for_client(version: ProxyProtocolVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(client, local);
    match version {
        ProxyProtocolVersion::V1 => ppp::v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes(),
        ProxyProtocolVersion::V2 => v2(
            Command::Proxy,
            ppp::v2::Addresses::from((source, destination)),
        ),
    }
}

/// The header of a connection tether makes for itself (a health check): it names no client
/// (v2 `LOCAL`, v1 `UNKNOWN`), and the upstream takes the connection's own addresses.
pub fn own(version: ProxyProtocolVersion) -> Vec<u8> {
    match version {
        ProxyProtocolVersion::V1 => ppp::v1::Addresses::Unknown.to_string().into_bytes(),
        ProxyProtocolVersion::V2 => v2(Command::Local, ppp::v2::Addresses::Unspecified),
    }
}

fn v2(command: Command, addresses: ppp::v2::Addresses) -> Vec<u8> {
    let protocol = match addresses {
        ppp::v2::Addresses::Unspecified => Protocol::Unspecified,
        _ => Protocol::Stream,
    };
    // Two addresses and no TLVs: far below the length limit, so building cannot fail.
    ppp::v2::Builder::with_addresses(Version::Two | command, protocol, addresses)
        .build()
        .unwrap_or_default()
}

/// Both addresses in one family, as the header has one: an IPv4-mapped IPv6 address (a client
/// on a dual-stack listener) as IPv4, and an IPv4 address beside an IPv6 one as IPv4-mapped.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |s: SocketAddr| SocketAddr::new(s.ip().to_canonical(), s.port());
    let (a, b) = (canonical(a), canonical(b));
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (v6(a), v6(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_names_the_client_and_the_address_it_reached() {
        let h = for_client(
            ProxyProtocolVersion::V1,
            addr("192.0.2.7:51000"),
            addr("10.0.0.1:443"),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n");
        // A dual-stack listener's IPv4 client.
        let h = for_client(
            ProxyProtocolVersion::V1,
            addr("[::ffff:192.0.2.7]:51000"),
            addr("[::ffff:10.0.0.1]:443"),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n");
        let h = for_client(
            ProxyProtocolVersion::V1,
            addr("[2001:db8::7]:51000"),
            addr("10.0.0.1:443"),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::7 ::ffff:10.0.0.1 51000 443\r\n");
        assert_eq!(own(ProxyProtocolVersion::V1), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_parses_back_to_the_same_addresses() {
        let h = for_client(
            ProxyProtocolVersion::V2,
            addr("[2001:db8::7]:51000"),
            addr("[2001:db8::1]:8443"),
        );
        let parsed = ppp::v2::Header::try_from(h.as_slice()).unwrap();
        assert_eq!(parsed.command, Command::Proxy);
        assert_eq!(
            parsed.addresses,
            ppp::v2::Addresses::from((addr("[2001:db8::7]:51000"), addr("[2001:db8::1]:8443")))
        );
        let local = own(ProxyProtocolVersion::V2);
        let parsed = ppp::v2::Header::try_from(local.as_slice()).unwrap();
        assert_eq!(parsed.command, Command::Local);
        assert_eq!(parsed.addresses, ppp::v2::Addresses::Unspecified);
    }
}
