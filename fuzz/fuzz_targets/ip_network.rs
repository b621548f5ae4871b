//! Trusted-peer networks (`trusted_peers = ["10.0.0.0/8", "::1"]`): parsing never panics, a parsed
//! network prints and parses back to itself, contains its own address, agrees with std's address
//! parser, and membership is consistent across prefixes and IPv4-mapped IPv6.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use tether_gateway::config::IpNet;

fuzz_target!(|data: &[u8]| {
    // The first 16 bytes are a probe address; the rest is the network text.
    if data.len() < 16 {
        return;
    }
    let (probe, text) = data.split_at(16);
    let probe: [u8; 16] = probe.try_into().unwrap_or_default();
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(net) = text.parse::<IpNet>() else {
        return;
    };
    let (addr, prefix) = (net.addr(), net.prefix());
    let max = if addr.is_ipv4() { 32 } else { 128 };
    assert!(prefix <= max, "{text:?}");
    let written = text.split_once('/').map_or(text, |(a, _)| a);
    assert_eq!(written.parse::<IpAddr>().ok(), Some(addr), "{text:?}");
    assert_eq!(net.to_string().parse::<IpNet>(), Ok(net), "{text:?}");
    assert!(net.contains(addr), "{text:?}");

    let v6 = IpAddr::from(probe);
    let v4 = IpAddr::from([probe[0], probe[1], probe[2], probe[3]]);
    for ip in [v6, v4] {
        let inside = net.contains(ip);
        // A shorter prefix is a larger network.
        for shorter in [0, prefix / 2, prefix.saturating_sub(1)] {
            let wider: IpNet = format!("{addr}/{shorter}").parse().expect("shorter prefix");
            assert!(!inside || wider.contains(ip), "{text:?} {ip} /{shorter}");
        }
        // An IPv4 peer matches the same whether it arrives plain or IPv4-mapped.
        if let IpAddr::V4(a) = ip {
            assert_eq!(
                inside,
                net.contains(IpAddr::V6(a.to_ipv6_mapped())),
                "{text:?} {ip}"
            );
        }
    }
    // /0 holds every address of its family (and IPv4-mapped ones for IPv4).
    if prefix == 0 {
        assert!(
            net.contains(if addr.is_ipv4() { v4 } else { v6 }),
            "{text:?}"
        );
    }
});
