//! The downstream side: a client connection, from TLS and protocol choice to hyper's HTTP/1 or
//! HTTP/2 server with tether's cancellation hooks.
//!
//! LIFECYCLE: accepted → (with `proxy_protocol`: the balancer's header names the client) →
//! (TLS handshake, ALPN picks the protocol | cleartext: the HTTP/2
//! preface is sniffed when both protocols are on) → served by [`h1`] or [`h2`] → on shutdown:
//! graceful close (HTTP/1: after the response in flight; HTTP/2: GOAWAY) → connection context
//! cancelled with the reason the connection ended, which cancels whatever was still in flight.

pub mod gate;
pub mod h1;
pub mod h2;
pub mod head_timeout;
pub mod parking;
pub mod probe;
pub mod proxy_protocol;
pub mod tls;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tether::DisconnectWatcher;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::cancel::ConnCancel;
use crate::listen::{ConfigSource, ConnPermit, ListenerShared, Worker};
use crate::proxy::Conn;
use probe::ProbeSocket;

/// How long a client may take to finish the TLS handshake or send the first bytes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Where a connection came from.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Client address.
    pub client: SocketAddr,
    /// Local address.
    pub local: SocketAddr,
    /// TLS or cleartext.
    pub tls: bool,
    /// What its TLS handshake settled, once done.
    pub tls_session: Option<Arc<tls::TlsSession>>,
}

/// An HTTP/2 connection's socket as the dead-peer prober needs it: a duplicate descriptor (the
/// original belongs to the TLS or HTTP stack), taken only when probing is configured. (HTTP/1
/// borrows its disconnect watcher's.)
fn probe_socket(tcp: &TcpStream, listener: &ListenerShared) -> Option<ProbeSocket> {
    if !probe::configured(&listener.dead_peer) {
        return None;
    }
    tcp.as_fd().try_clone_to_owned().ok().map(ProbeSocket::Own)
}

impl Peer {
    /// What the requests on this connection know about it.
    pub fn conn(&self, cancel: Arc<ConnCancel>) -> Arc<Conn> {
        let mut conn = Conn::new(self.client, self.local, self.tls, cancel);
        conn.tls_session = self.tls_session.clone();
        Arc::new(conn)
    }
}

/// Serves one accepted connection to the end. `worker` and `listener` are the generation it was
/// accepted under; `source` gives each new request or HTTP/2 stream the current one.
///
/// The task's future is allocated for its largest state, so every protocol's state lives in
/// its own box and the future itself stays small: an idle (parked) HTTP/1 connection then costs
/// little more than its socket.
pub async fn serve(
    worker: Arc<Worker>,
    listener: Arc<ListenerShared>,
    source: ConfigSource,
    mut tcp: TcpStream,
    client: SocketAddr,
    stop: CancellationToken,
    permit: ConnPermit,
) {
    // Small responses must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or(client);
    let client = if listener.proxy_protocol {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, proxy_protocol::read(&mut tcp)).await {
            Ok(Ok(named)) => named.unwrap_or(client),
            Ok(Err(e)) => {
                tracing::debug!(peer = %client, stage = "proxy_protocol", error = %e, "downstream connection refused");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %client, stage = "proxy_protocol", "no PROXY protocol header in time");
                return;
            }
        }
    } else {
        client
    };
    if listener.tls.is_some() {
        let peer = Peer {
            client,
            local,
            tls: true,
            tls_session: None,
        };
        return boxed(serve_tls(worker, listener, source, tcp, peer, stop)).await;
    }
    let peer = Peer {
        client,
        local,
        tls: false,
        tls_session: None,
    };
    let is_h2 = match (listener.protocols.http1, listener.protocols.h2) {
        (true, true) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, sniff_h2(&tcp)).await {
            Ok(Some(h2)) => h2,
            _ => return,
        },
        (false, true) => true,
        _ => false,
    };
    if is_h2 {
        let probe = probe_socket(&tcp, &listener);
        boxed(h2::serve(
            worker,
            listener,
            source,
            TokioIo::new(tcp),
            peer,
            probe,
            stop,
        ))
        .await;
    } else {
        // A task of its own: this one's state (the sniffing above) is not kept while the
        // connection is parked.
        let conn = h1::TcpConn {
            worker,
            listener,
            source,
            peer,
            stop,
            permit,
            worn: crate::lifetime::Wear::new(),
        };
        tokio::spawn(h1::serve_tcp(conn, tcp, None));
    }
}

/// Boxes a future in a plain function, so that the unboxed future never takes room in the
/// caller's state.
fn boxed<F: Future<Output = ()> + Send + 'static>(
    f: F,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(f)
}

/// Serves a TLS connection: handshake, then the protocol ALPN chose.
async fn serve_tls(
    worker: Arc<Worker>,
    listener: Arc<ListenerShared>,
    source: ConfigSource,
    tcp: TcpStream,
    mut peer: Peer,
    stop: CancellationToken,
) {
    let Some(acceptor) = &listener.tls else {
        return;
    };
    let client = peer.client;
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(client = %client, stage = "tls_handshake", error = %e, "downstream handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(client = %client, stage = "tls_handshake", "downstream handshake timed out");
            return;
        }
    };
    peer.tls_session = Some(Arc::new(tls::TlsSession::of(tls.get_ref().1)));
    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice())
        || (listener.protocols.h2 && !listener.protocols.http1);
    if is_h2 {
        let probe = probe_socket(tls.get_ref().0, &listener);
        h2::serve(
            worker,
            listener,
            source,
            TokioIo::new(tls),
            peer,
            probe,
            stop,
        )
        .await;
    } else {
        let watcher = DisconnectWatcher::new(tls.get_ref().0).ok();
        h1::serve(
            worker,
            listener,
            source,
            TokioIo::new(tls),
            peer,
            watcher,
            stop,
        )
        .await;
    }
}

/// Tells an HTTP/2 prior-knowledge client from an HTTP/1 one by peeking at the first bytes.
/// `None` if the client closed before saying enough.
async fn sniff_h2(tcp: &TcpStream) -> Option<bool> {
    let mut buf = [0u8; 24];
    loop {
        let n = tcp.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != PREFACE[..n] {
            return Some(false);
        }
        if n == PREFACE.len() {
            return Some(true);
        }
        // A partial preface: peek again once more bytes can have arrived.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
