//! The HTTP/1 disconnect watcher: notices a client that closed or reset its connection even when
//! the HTTP stack is not reading from it.
//!
//! hyper's HTTP/1 server reads the socket only when it wants bytes: while a handler has not read
//! the request body, while pipelined bytes are buffered, or with `half_close(true)`, a client FIN
//! or RST goes unseen until the response is written. The watcher registers a duplicate of the
//! socket's file descriptor with the reactor and waits for the peer's close (EPOLLRDHUP / HUP).
//! The duplicate has its own registration, so it never steals readiness from the HTTP stack and
//! never reads a byte.

use std::io;
use std::os::fd::AsFd;
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::reason::CancelReason;

/// How the peer left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerGone {
    /// The peer closed its side (TCP FIN).
    Closed,
    /// The peer reset the connection (TCP RST), or the connection failed with an error.
    Reset,
    /// The kernel gave up on the peer (keepalive probes or `TCP_USER_TIMEOUT` expired).
    Dead,
}

impl PeerGone {
    /// The cancel reason this implies for a request in flight on an HTTP/1 connection.
    pub fn reason(self) -> CancelReason {
        match self {
            PeerGone::Closed => CancelReason::ClientClosed,
            PeerGone::Reset => CancelReason::ClientReset,
            PeerGone::Dead => CancelReason::PeerDead,
        }
    }
}

/// Watches one TCP connection for the peer going away. See the [module docs](self).
#[derive(Debug)]
pub struct DisconnectWatcher {
    dup: TcpStream,
}

impl DisconnectWatcher {
    /// Starts watching `socket`. Must be called inside a Tokio runtime.
    pub fn new(socket: &impl AsFd) -> io::Result<DisconnectWatcher> {
        let fd = socket.as_fd().try_clone_to_owned()?;
        let std = std::net::TcpStream::from(fd);
        // O_NONBLOCK is shared with the original; set it anyway in case the caller's is blocking.
        std.set_nonblocking(true)?;
        Ok(DisconnectWatcher {
            dup: TcpStream::from_std(std)?,
        })
    }

    /// Completes when the peer has gone. Cancel safe.
    pub async fn gone(&self) -> PeerGone {
        loop {
            match self.dup.ready(Interest::READABLE).await {
                Ok(ready) if ready.is_read_closed() => return self.classify(),
                Ok(_) => {
                    // Ordinary data for the HTTP stack: forget this readiness on our registration
                    // only and wait for the next edge. READ_CLOSED is never cleared by tokio.
                    let _ = self.dup.try_io(Interest::READABLE, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                }
                Err(_) => return PeerGone::Reset,
            }
        }
    }

    /// Non-blocking check: `Some` if the reactor has already seen the peer go.
    pub fn poll_gone_now(&self) -> Option<PeerGone> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let fut = self.dup.ready(Interest::READABLE);
        let mut fut = std::pin::pin!(fut);
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(r)) if r.is_read_closed() => Some(self.classify()),
            Poll::Ready(Err(_)) => Some(PeerGone::Reset),
            _ => None,
        }
    }

    /// Non-blocking check that does not wait for the reactor: [`poll_gone_now`](Self::poll_gone_now),
    /// else a `MSG_PEEK` of one byte on the socket (which consumes nothing).
    ///
    /// The HTTP stack may read a FIN or RST from the socket before the reactor has reported it
    /// on the watcher's registration (both happen between two reactor turns); this sees it
    /// anyway. With unread data in the socket a FIN behind it is invisible here, but the reactor
    /// path reports it.
    pub fn check_now(&self) -> Option<PeerGone> {
        if let Some(gone) = self.poll_gone_now() {
            return Some(gone);
        }
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        match socket2::SockRef::from(&self.dup).peek(&mut byte) {
            Ok(0) => Some(self.classify()),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Some(PeerGone::Dead),
            Err(_) => Some(PeerGone::Reset),
        }
    }

    fn classify(&self) -> PeerGone {
        match self.dup.take_error() {
            Ok(Some(e)) if e.kind() == io::ErrorKind::TimedOut => PeerGone::Dead,
            Ok(Some(_)) | Err(_) => PeerGone::Reset,
            // The pending error is consumed by whoever reads first: when the HTTP stack read the
            // ECONNRESET, the socket is still in state CLOSE, where getpeername fails, while after
            // a FIN (CLOSE_WAIT) it succeeds.
            Ok(None) if self.dup.peer_addr().is_err() => PeerGone::Reset,
            Ok(None) => PeerGone::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    #[tokio::test]
    async fn fin_with_unread_data_is_closed() {
        let (mut client, server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        client
            .write_all(b"pipelined bytes nobody reads")
            .await
            .unwrap();
        drop(client);
        let gone = tokio::time::timeout(Duration::from_secs(5), w.gone())
            .await
            .unwrap();
        assert_eq!(gone, PeerGone::Closed);
        assert_eq!(w.poll_gone_now(), Some(PeerGone::Closed));
    }

    #[tokio::test]
    async fn rst_is_reset() {
        let (client, server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
        let gone = tokio::time::timeout(Duration::from_secs(5), w.gone())
            .await
            .unwrap();
        assert_eq!(gone, PeerGone::Reset);
    }

    #[tokio::test]
    async fn check_now_sees_fin_and_rst_without_the_reactor() {
        let (client, server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        assert_eq!(w.check_now(), None);
        drop(client);
        // No await in between: the reactor has not run, the socket already knows.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(w.check_now(), Some(PeerGone::Closed));

        let (client, server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(w.check_now(), Some(PeerGone::Reset));
        // The pending error was consumed by that peek; the state still says reset.
        assert_eq!(w.check_now(), Some(PeerGone::Reset));
    }

    #[tokio::test]
    async fn data_does_not_fire_and_is_left_for_the_reader() {
        let (mut client, mut server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        client.write_all(b"hello").await.unwrap();
        let fired = tokio::time::timeout(Duration::from_millis(200), w.gone()).await;
        assert!(fired.is_err(), "watcher fired on plain data");
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(w.poll_gone_now(), None);
    }
}
