//! The PROXY protocol (HAProxy's, versions 1 and 2): a load balancer in front of tether that
//! passes TCP through (AWS NLB, HAProxy in TCP mode, …) puts the client's address in a header
//! before the connection's own bytes. On a listener with `proxy_protocol`, every connection must
//! start with one; its source address is then the client for everything tether does (logs,
//! `X-Forwarded-For`, `trusted_peers`, rate limits, hashing). The header is parsed by the `ppp`
//! crate and consumed exactly, so TLS or HTTP starts at the next byte.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The largest header taken: a v1 header is at most 107 bytes; a v2 one has 16, its addresses
/// (at most 216) and its TLVs, which load balancers keep short.
const MAX_HEADER: usize = 4096;

/// The longest v1 header, its line end included.
const V1_MAX: usize = 107;

/// Why a connection's PROXY protocol header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The connection closed (or failed) before the header was complete.
    #[error("the connection ended before its PROXY protocol header: {0}")]
    Closed(std::io::Error),
    /// The bytes are not a PROXY protocol header.
    #[error("not a PROXY protocol header: {0}")]
    Invalid(String),
    /// Longer than [`MAX_HEADER`].
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
}

/// Reads the PROXY protocol header at the start of `tcp`, taking exactly its bytes. The client
/// it names, or `None` for a connection the balancer made itself (v2 `LOCAL`, v1 `UNKNOWN`, or
/// an address family other than IP): then the peer is the client. A header that never
/// completes is waited for: the caller bounds the wait.
pub async fn read(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, HeaderError> {
    let mut buf = vec![0u8; MAX_HEADER];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = tcp.peek(&mut buf).await.map_err(HeaderError::Closed)?;
        if n == 0 {
            return Err(HeaderError::Closed(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        let seen = &buf[..n];
        // A v1 header is one line: until its end has arrived, a part of it can read as a
        // wrong one ("... 5555 " has no destination port yet), so it is not parsed before.
        let v1_unfinished = seen.starts_with(b"PROXY") && !seen.windows(2).any(|w| w == b"\r\n");
        if v1_unfinished && n >= V1_MAX {
            return Err(HeaderError::Invalid(format!(
                "no end of line within {V1_MAX} bytes"
            )));
        }
        let header = HeaderResult::parse(seen);
        if v1_unfinished || header.is_incomplete() {
            if n == buf.len() {
                return Err(HeaderError::TooLong);
            }
            // Not all here yet: peek again once more bytes can have arrived (a peek does not
            // wait for new bytes, so the pauses grow).
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            continue;
        }
        let (len, client) = match header {
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_client(&h.addresses)),
            HeaderResult::V2(Ok(h)) => (h.len(), v2_client(&h)),
            HeaderResult::V1(Err(e)) => return Err(HeaderError::Invalid(e.to_string())),
            HeaderResult::V2(Err(e)) => return Err(HeaderError::Invalid(e.to_string())),
        };
        tcp.read_exact(&mut buf[..len])
            .await
            .map_err(HeaderError::Closed)?;
        return Ok(client);
    }
}

fn v1_client(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    }
}

fn v2_client(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == v2::Command::Local {
        return None;
    }
    match header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// What `read` makes of `sent` (written in pieces of `chunk` bytes), and the bytes left
    /// after it.
    async fn read_sent(
        sent: Vec<u8>,
        chunk: usize,
    ) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            for piece in sent.chunks(chunk) {
                c.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let (mut s, _) = l.accept().await.unwrap();
        let got = match tokio::time::timeout(Duration::from_secs(2), read(&mut s)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("never complete".to_owned()),
        };
        writer.await.unwrap();
        let mut rest = Vec::new();
        if got.is_ok() {
            s.read_to_end(&mut rest).await.unwrap();
        }
        (got, rest)
    }

    fn v2(command: v2::Command, addresses: impl Into<v2::Addresses>) -> Vec<u8> {
        v2::Builder::with_addresses(v2::Version::Two | command, v2::Protocol::Stream, addresses)
            .write_tlv(v2::Type::NoOp, &[0; 8])
            .unwrap()
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn headers_name_the_client_and_only_their_bytes_are_taken() {
        let with_rest = |mut h: Vec<u8>| {
            h.extend_from_slice(b"GET / HTTP/1.1\r\n");
            h
        };
        let client: SocketAddr = "192.0.2.7:5555".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:443".parse().unwrap();
        let to: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let to6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        for (sent, want) in [
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 80\r\n".to_vec(),
                Some(client),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 443 80\r\n".to_vec(),
                Some(v6),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), None),
            (v2(v2::Command::Proxy, (client, to)), Some(client)),
            (v2(v2::Command::Proxy, (v6, to6)), Some(v6)),
            (v2(v2::Command::Local, (client, to)), None),
        ] {
            for chunk in [1, 7, 35, 4096] {
                let (got, rest) = read_sent(with_rest(sent.clone()), chunk).await;
                assert_eq!(got, Ok(want), "{sent:?} in pieces of {chunk}");
                assert_eq!(rest, b"GET / HTTP/1.1\r\n");
            }
        }
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for sent in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 192.0.2.7 nonsense\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00",
        ] {
            let (got, _) = read_sent(sent.to_vec(), 4096).await;
            assert!(got.is_err(), "{sent:?}: {got:?}");
        }
        // Ended before the header did: it never completes.
        let (got, _) = read_sent(b"PROXY TCP4 192.0".to_vec(), 4096).await;
        assert_eq!(got, Err("never complete".to_owned()));
        let (got, _) = read_sent(vec![b'P'; 10_000], 4096).await;
        assert!(got.is_err(), "{got:?}");
        // A v1 line that does not end where the longest one must.
        let mut long = b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 80".to_vec();
        long.extend_from_slice(&[b' '; 100]);
        let (got, _) = read_sent(long, 4096).await;
        assert_eq!(
            got,
            Err("not a PROXY protocol header: no end of line within 107 bytes".to_owned())
        );
    }
}
