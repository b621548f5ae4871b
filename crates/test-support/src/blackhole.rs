//! A loopback address that black-holes TCP connects: a listener whose accept queue is full.
//!
//! Linux drops a SYN when the listener's accept queue is full (`sk_acceptq_is_full`), with or
//! without SYN cookies, so the connecting side sees no answer at all and keeps retransmitting:
//! exactly like a firewalled or dead host, but on loopback. The listener is bound with backlog 0
//! (room for one connection), never accepts, and the queue is filled with one connection first.
//! [`BlackHole::bind`] checks that a further connect really hangs before returning.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// A listening socket that never accepts and whose queue is full; dropped, it closes.
#[derive(Debug)]
pub struct BlackHole {
    addr: SocketAddr,
    _listener: Socket,
    _fillers: Vec<TcpStream>,
}

impl BlackHole {
    /// Binds `addr` (port 0 for any), fills its accept queue, and checks that a connect to it now
    /// goes unanswered for 200 ms. Blocking: call it before starting timing-sensitive work.
    pub fn bind(addr: SocketAddr) -> io::Result<BlackHole> {
        let listener = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        listener.bind(&addr.into())?;
        listener.listen(0)?;
        let addr = listener
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an inet socket"))?;
        let mut fillers = Vec::new();
        // Connects complete (the kernel answers SYNs) until the queue is full; then they hang.
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => fillers.push(s),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Ok(BlackHole {
                        addr,
                        _listener: listener,
                        _fillers: fillers,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(
            "connects to a full accept queue still complete: SYNs are not dropped here",
        ))
    }

    /// The address connects to which go unanswered.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Whether a TCP socket in SYN-SENT state towards `remote` exists on this host (Linux
/// `/proc/net/tcp{,6}`): a connect attempt that is still trying.
pub fn syn_sent_to(remote: SocketAddr) -> io::Result<bool> {
    let path = if remote.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let table = std::fs::read_to_string(path)?;
    let want = proc_net_addr(remote);
    Ok(table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st ...; state 02 is SYN_SENT.
        f.len() > 3 && f[2].eq_ignore_ascii_case(&want) && f[3] == "02"
    }))
}

/// An address as `/proc/net/tcp` prints it: the address in host byte order words, then the port.
fn proc_net_addr(a: SocketAddr) -> String {
    let ip = match a {
        SocketAddr::V4(v4) => format!("{:08X}", u32::from_le_bytes(v4.ip().octets())),
        SocketAddr::V6(v6) => v6
            .ip()
            .octets()
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    };
    format!("{ip}:{:04X}", a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_format() {
        let a: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(proc_net_addr(a), "0100007F:0050");
    }
}
