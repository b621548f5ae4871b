//! Reaching an upstream endpoint: resolve, connect, TLS. Each step fails with its own
//! [`Stage`], naming the target.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{UpstreamAddress, UpstreamProtocol, UpstreamTls};
use crate::error::{ErrorKind, ProxyError, Stage};

/// A connected upstream transport: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum UpstreamIo {
    /// Cleartext.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A fresh connection and what it cost.
#[derive(Debug)]
pub struct Connected {
    /// The transport.
    pub io: UpstreamIo,
    /// The address actually connected to.
    pub peer: SocketAddr,
    /// Resolve + connect + TLS.
    pub elapsed: Duration,
}

/// Connects to the endpoints of one upstream.
#[derive(Clone)]
pub struct Connector {
    tls: Option<(TlsConnector, Option<ServerName<'static>>)>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
    /// A CA certificate was rejected.
    #[error("unusable CA certificate: {0}")]
    Ca(rustls::Error),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(rustls::Error),
}

impl Connector {
    /// A connector for `protocol` with optional TLS settings.
    pub fn new(
        protocol: UpstreamProtocol,
        tls: Option<&UpstreamTls>,
    ) -> Result<Connector, TlsSetupError> {
        let Some(tls) = tls else {
            return Ok(Connector { tls: None });
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Rustls)?;
        let mut config = if tls.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            if tls.ca.is_empty() {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            } else {
                for ca in &tls.ca {
                    roots.add(ca.clone()).map_err(TlsSetupError::Ca)?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = match protocol {
            UpstreamProtocol::H2 => vec![b"h2".to_vec()],
            _ => vec![b"http/1.1".to_vec()],
        };
        let name = match &tls.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|_| TlsSetupError::ServerName(n.clone()))?,
            ),
            None => None,
        };
        Ok(Connector {
            tls: Some((TlsConnector::from(Arc::new(config)), name)),
        })
    }

    /// Resolves `addr`, connects to the first candidate that answers, and handshakes TLS when
    /// configured. The whole attempt is bounded by `timeout`.
    pub async fn connect(
        &self,
        addr: &UpstreamAddress,
        timeout: Duration,
    ) -> Result<Connected, ProxyError> {
        let start = Instant::now();
        match tokio::time::timeout(timeout, self.connect_inner(addr, start)).await {
            Ok(r) => r,
            Err(_) => {
                Err(ProxyError::upstream(Stage::Connect, ErrorKind::Timeout).with_target(addr))
            }
        }
    }

    async fn connect_inner(
        &self,
        addr: &UpstreamAddress,
        start: Instant,
    ) -> Result<Connected, ProxyError> {
        let candidates = resolve(addr).await?;
        let mut last: Option<(SocketAddr, io::Error)> = None;
        let mut tcp = None;
        for cand in candidates {
            match TcpStream::connect(cand).await {
                Ok(s) => {
                    tcp = Some((s, cand));
                    break;
                }
                Err(e) => last = Some((cand, e)),
            }
        }
        let (tcp, peer) = match (tcp, last) {
            (Some(t), _) => t,
            (None, Some((cand, e))) => {
                let kind = if e.kind() == io::ErrorKind::TimedOut {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::Refused
                };
                return Err(ProxyError::upstream(Stage::Connect, kind)
                    .with_target(cand)
                    .with_source(e));
            }
            (None, None) => {
                return Err(
                    ProxyError::upstream(Stage::Dns, ErrorKind::DnsFailed).with_target(addr)
                );
            }
        };
        // Nagle would delay small request heads behind the previous segment's ACK.
        let _ = tcp.set_nodelay(true);
        let io = match &self.tls {
            None => UpstreamIo::Plain(tcp),
            Some((connector, name)) => {
                let name = match name {
                    Some(n) => n.clone(),
                    None => server_name_for(addr)?,
                };
                let tls = connector.connect(name, tcp).await.map_err(|e| {
                    ProxyError::upstream(Stage::Tls, ErrorKind::TlsFailed)
                        .with_target(peer)
                        .with_source(e)
                })?;
                UpstreamIo::Tls(Box::new(tls))
            }
        };
        Ok(Connected {
            io,
            peer,
            elapsed: start.elapsed(),
        })
    }

    /// Whether this connector wraps connections in TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

fn server_name_for(addr: &UpstreamAddress) -> Result<ServerName<'static>, ProxyError> {
    ServerName::try_from(addr.host.clone()).map_err(|e| {
        ProxyError::upstream(Stage::Tls, ErrorKind::TlsFailed)
            .with_target(addr)
            .with_source(e)
    })
}

/// Candidate socket addresses for `addr`, in resolver order.
async fn resolve(addr: &UpstreamAddress) -> Result<Vec<SocketAddr>, ProxyError> {
    if let Ok(ip) = addr.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, addr.port)]);
    }
    let found = tokio::net::lookup_host((addr.host.as_str(), addr.port))
        .await
        .map_err(|e| {
            ProxyError::upstream(Stage::Dns, ErrorKind::DnsFailed)
                .with_target(addr)
                .with_source(e)
        })?;
    Ok(found.collect())
}

/// Accepts any certificate: only for upstreams configured with `insecure_skip_verify`.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
