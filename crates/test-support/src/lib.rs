//! Real peers for tether's tests: fault-injecting upstreams that report what they saw on the wire,
//! and downstream clients that can abort a request every way a real client does.
//!
//! - [`tls`]: a throwaway CA and a `localhost` leaf, generated at test time, with rustls configs.
//! - [`upstream_h1`]: a raw-TCP HTTP/1.1 upstream that records EOF / ECONNRESET per connection.
//! - [`upstream_h2`]: a raw `h2` upstream that records RST_STREAM reasons per stream.
//! - [`behavior`]: what an upstream does with a request (respond, stall, stream, break).
//! - [`blackhole`]: a loopback address whose SYNs are dropped (a full accept queue).
//! - [`dns_stub`]: a stub DNS server answering from a table.
//! - [`events`]: the event log both upstreams write, with [`events::EventLog::wait_for`].
//! - [`client`]: raw HTTP/1.1 and HTTP/2 clients that can FIN, RST or RST_STREAM, and a hyper
//!   client for ordinary requests.
//!
//! Everything binds `127.0.0.1:0` and lives only as long as its handle: dropping an upstream or a
//! client stops its tasks.

pub mod behavior;
pub mod blackhole;
pub mod client;
pub mod dns_stub;
pub mod events;
mod h1wire;
mod net;
pub mod netns;
pub mod tls;
pub mod upstream_h1;
pub mod upstream_h2;

pub use behavior::{Behavior, Ending, Reply, RequestInfo};
pub use blackhole::BlackHole;
pub use dns_stub::DnsStub;
pub use events::{Event, EventKind, EventLog};
pub use tls::TestPki;
pub use upstream_h1::{H1Options, UpstreamH1};
pub use upstream_h2::UpstreamH2;

/// The error type of the peers: test code, so any error will do, but it must carry its cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A position-independent checksum of a byte stream (Fletcher-style over u64), identical however
/// the stream is split into chunks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checksum {
    a: u64,
    b: u64,
    len: u64,
}

impl Checksum {
    /// An empty checksum.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        let (mut a, mut b) = (self.a, self.b);
        for &x in data {
            a = a.wrapping_add(u64::from(x));
            b = b.wrapping_add(a);
        }
        self.a = a;
        self.b = b;
        self.len += data.len() as u64;
    }

    /// Bytes seen.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no bytes were seen.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The checksum value.
    pub fn value(&self) -> u64 {
        self.b ^ self.a.rotate_left(32)
    }

    /// The checksum of one buffer.
    pub fn of(data: &[u8]) -> u64 {
        let mut c = Checksum::new();
        c.update(data);
        c.value()
    }
}

/// A deterministic byte pattern of `len` bytes, for uploads and downloads whose content is checked.
pub fn pattern(len: usize) -> bytes::Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[cfg(test)]
mod tests;

/// A loopback address nothing listens on: connections to it are refused. The port is bound,
/// never listening, and held until the process ends, so that no other test's listener (nor a
/// connection's source port) can take it, as one could a port that was only freed.
pub fn refused_addr() -> std::net::SocketAddr {
    static HELD: std::sync::Mutex<Vec<socket2::Socket>> = std::sync::Mutex::new(Vec::new());
    let bound = (|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        s.bind(&any.into())?;
        let addr = s.local_addr()?.as_socket();
        Ok::<_, std::io::Error>((s, addr))
    })();
    match bound {
        Ok((s, Some(addr))) => {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(s);
            addr
        }
        Ok((_, None)) => panic!("a loopback socket has an IP address"),
        Err(e) => panic!("cannot bind a loopback socket: {e}"),
    }
}
