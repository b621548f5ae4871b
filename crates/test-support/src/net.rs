//! Socket plumbing shared by the peers: boxed streams, TLS wrapping, and a duplicate of the fd to
//! FIN or RST a connection whose stream is owned by someone else (a TLS layer, the h2 crate).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::BoxError;

/// A bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

// Lets the peers derive Debug.
impl std::fmt::Debug for dyn Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Io")
    }
}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// A duplicate of a connection's fd. Socket options and `shutdown` act on the socket itself, so
/// this controls how the connection ends even when another layer owns the stream.
#[derive(Debug)]
pub struct SocketHandle(OwnedFd);

impl SocketHandle {
    /// Duplicates `s`'s fd.
    pub fn of(s: &impl AsFd) -> io::Result<SocketHandle> {
        Ok(SocketHandle(s.as_fd().try_clone_to_owned()?))
    }

    /// Makes the final close send RST instead of FIN (SO_LINGER 0). The RST goes out when the
    /// last fd of the socket (the owner's and this one) is closed.
    pub fn rst_on_close(&self) -> io::Result<()> {
        SockRef::from(&self.0).set_linger(Some(Duration::ZERO))
    }

    /// Sends FIN now (`shutdown(SHUT_WR)`), whoever owns the stream.
    pub fn shutdown_write(&self) -> io::Result<()> {
        SockRef::from(&self.0).shutdown(std::net::Shutdown::Write)
    }

    /// Shuts down both directions now.
    pub fn shutdown_both(&self) -> io::Result<()> {
        SockRef::from(&self.0).shutdown(std::net::Shutdown::Both)
    }
}

/// Connects over TCP and, with a TLS config, handshakes for `localhost`. Returns the stream, a
/// handle on its socket, and the negotiated ALPN protocol.
pub async fn connect(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(BoxIo, SocketHandle, Option<Vec<u8>>), BoxError> {
    connect_as(addr, tls, "localhost").await
}

/// [`connect`], with TLS asking for and verifying `server_name` (an IP address sends no SNI).
pub async fn connect_as(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    server_name: &str,
) -> Result<(BoxIo, SocketHandle, Option<Vec<u8>>), BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let handle = SocketHandle::of(&tcp)?;
    match tls {
        None => Ok((Box::new(tcp), handle, None)),
        Some(cfg) => {
            let name = ServerName::try_from(server_name)?.to_owned();
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            let alpn = s.get_ref().1.alpn_protocol().map(|p| p.to_vec());
            Ok((Box::new(s), handle, alpn))
        }
    }
}

/// An accepted connection, TLS already terminated when configured.
pub struct Accepted {
    /// The stream.
    pub io: BoxIo,
    /// A handle on its socket.
    pub handle: SocketHandle,
}

/// Accepts forever, wrapping each connection in TLS when configured, and runs `serve` on each in
/// a [`JoinSet`] (so dropping the loop's task stops every connection). `on_accept` runs first, in
/// accept order, and returns the connection number.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    on_accept: impl Fn() -> u64,
    serve: F,
) where
    F: Fn(Accepted, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let conn = on_accept();
        let _ = tcp.set_nodelay(true);
        let Ok(handle) = SocketHandle::of(&tcp) else {
            continue;
        };
        let acceptor = acceptor.clone();
        let serve = serve.clone();
        // The TLS handshake runs inside the connection's task so a slow client cannot block the
        // accept loop.
        conns.spawn(async move {
            let io: BoxIo = match acceptor {
                None => Box::new(tcp),
                Some(acc) => match acc.accept(tcp).await {
                    Ok(s) => Box::new(s),
                    Err(_) => return,
                },
            };
            serve(Accepted { io, handle }, conn).await;
        });
    }
}
