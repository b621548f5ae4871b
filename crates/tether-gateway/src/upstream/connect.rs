//! Reaching an upstream endpoint: resolve, connect, TLS. Each step fails with its own
//! [`Stage`], naming the target.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{UpstreamAddress, UpstreamProtocol, UpstreamTls};
use crate::error::{ErrorKind, ProxyError, Stage};
use crate::upstream::dns::{DnsError, Resolver};

/// A connected upstream transport: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum UpstreamIo {
    /// Cleartext.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamIo {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamIo::Plain(s) => s,
            UpstreamIo::Tls(s) => s.get_ref().0,
        }
    }

    /// Nothing received and not yet read: TLS holds no decrypted bytes the HTTP layer has not
    /// seen (plain TCP buffers nothing of its own).
    pub fn drained(&self) -> bool {
        match self {
            UpstreamIo::Plain(_) => true,
            UpstreamIo::Tls(s) => s.get_ref().1.wants_read(),
        }
    }
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

/// An HTTP/2 connection's transport, noting a TLS failure (an alert after the handshake): h2
/// keeps only the text of an I/O error, so neither the connection's error nor its streams' say
/// it was TLS.
#[derive(Debug)]
pub struct TlsWatch {
    io: UpstreamIo,
    failed: Arc<AtomicBool>,
}

impl TlsWatch {
    /// Watches `io`.
    pub fn new(io: UpstreamIo) -> TlsWatch {
        TlsWatch {
            io,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Set once a read or write failed in TLS.
    pub fn failed(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    fn note<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r
            && e.get_ref().is_some_and(|i| i.is::<rustls::Error>())
        {
            self.failed.store(true, Ordering::Relaxed);
        }
        r
    }

    /// [`TlsWatch::note`], and more. An upstream that refuses the connection in TLS sends an
    /// alert and closes; a write (or the write TLS does before a read) can fail on the closed
    /// socket before the alert is read, so on such a failure whatever the socket still holds is
    /// read now and given to TLS (the connection is over either way). Read from the socket
    /// itself: the runtime may not know yet that it is readable.
    fn note_closed<T>(&mut self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r
            && matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            )
            && let UpstreamIo::Tls(s) = &mut self.io
        {
            let (tcp, tls) = s.get_mut();
            let mut scratch = [0u8; 1024];
            let sock = socket2::SockRef::from(&*tcp);
            if let Ok(n) = std::io::Read::read(&mut &*sock, &mut scratch)
                && tls.read_tls(&mut &scratch[..n]).is_ok()
                && tls.process_new_packets().is_err()
            {
                self.failed.store(true, Ordering::Relaxed);
            }
        }
        self.note(r)
    }
}

impl AsyncRead for TlsWatch {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        this.note_closed(r)
    }
}

impl AsyncWrite for TlsWatch {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note_closed(r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.note_closed(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note_closed(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A fresh connection and what it cost.
#[derive(Debug)]
pub struct Connected {
    /// The transport.
    pub io: UpstreamIo,
    /// The address actually connected to.
    pub peer: SocketAddr,
    /// tether's end of the connection.
    pub local: Option<SocketAddr>,
    /// Resolve + connect + TLS.
    pub elapsed: Duration,
    /// The same time, step by step.
    pub timings: ConnectTimings,
}

/// Time spent in each step of opening a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectTimings {
    /// Name resolution (near zero for an IP literal).
    pub dns: Duration,
    /// The TCP connect race, first attempt to the winner's handshake.
    pub connect: Duration,
    /// The TLS handshake; `None` for cleartext.
    pub tls: Option<Duration>,
}

/// Connects to the endpoints of one upstream.
#[derive(Clone)]
pub struct Connector {
    tls: Option<(TlsConnector, Option<ServerName<'static>>)>,
    resolver: Resolver,
    spread: Arc<std::sync::Mutex<Spread>>,
}

/// How long an address that lost a race (failed, or did not answer while another did) is tried
/// after its name's other addresses.
pub const LOSER_MEMORY: Duration = Duration::from_secs(30);

/// What a connector remembers of names that resolve to several addresses: how often each
/// address was tried first, and which addresses lately lost a race.
#[derive(Debug, Default)]
struct Spread {
    /// Connections for which each address was the first candidate.
    firsts: Vec<(SocketAddr, u64)>,
    /// Addresses that lost a race, and when.
    losers: Vec<(SocketAddr, Instant)>,
}

/// At most this many addresses and losers are remembered; past that the counts start afresh
/// and the oldest loser makes room.
const SPREAD_LIMIT: usize = 256;

impl Spread {
    /// The order in which to try `found` (a resolver's answer, two or more addresses): first the
    /// address tried first least often (the resolver's first among equals), so that a name's
    /// new connections share its addresses (as nginx's servers from one name, or Envoy's hosts
    /// from one DNS answer) whatever order the resolver answers in; an address that lost a race
    /// within [`LOSER_MEMORY`] last. An address new to the name starts level with the others,
    /// not below them, so that one added to a busy name is not handed every connection.
    fn order(&mut self, found: Vec<SocketAddr>, now: Instant) -> Vec<SocketAddr> {
        self.losers
            .retain(|(_, at)| now.saturating_duration_since(*at) < LOSER_MEMORY);
        if self.firsts.len() + found.len() > SPREAD_LIMIT {
            self.firsts.clear();
        }
        let count = |firsts: &[(SocketAddr, u64)], a: &SocketAddr| {
            firsts.iter().find(|(f, _)| f == a).map(|(_, n)| *n)
        };
        let level = found
            .iter()
            .filter_map(|a| count(&self.firsts, a))
            .min()
            .unwrap_or(0);
        for a in &found {
            if count(&self.firsts, a).is_none() {
                self.firsts.push((*a, level));
            }
        }
        let losers = &self.losers;
        order(
            found,
            |a| losers.iter().any(|(l, _)| l == a),
            &mut self.firsts,
        )
    }

    /// Remembers the addresses that lost a race to another one; forgets the winner's losses.
    fn lost(&mut self, winner: SocketAddr, losers: impl Iterator<Item = SocketAddr>, now: Instant) {
        self.losers.retain(|(l, _)| *l != winner);
        for a in losers {
            match self.losers.iter_mut().find(|(l, _)| *l == a) {
                Some((_, at)) => *at = now,
                None => {
                    if self.losers.len() >= SPREAD_LIMIT {
                        self.losers.remove(0);
                    }
                    self.losers.push((a, now));
                }
            }
        }
    }
}

/// `found` in the order to try it: the address `firsts` counts first least often among those
/// `lost` does not name (its count goes up), the others of them after it, then those `lost`
/// names (led the same way when every address is one); each part's families alternated (RFC
/// 8305), starting with its first address's. Ties go to the resolver's order.
fn order(
    found: Vec<SocketAddr>,
    lost: impl Fn(&SocketAddr) -> bool,
    firsts: &mut [(SocketAddr, u64)],
) -> Vec<SocketAddr> {
    let (mut losers, mut fresh): (Vec<_>, Vec<_>) = found.into_iter().partition(|a| lost(a));
    let lead = if fresh.is_empty() {
        &mut losers
    } else {
        &mut fresh
    };
    let count = |a: &SocketAddr| firsts.iter().position(|(f, _)| f == a);
    let least = lead
        .iter()
        .enumerate()
        .min_by_key(|(i, a)| (count(a).map_or(0, |at| firsts[at].1), *i))
        .map(|(i, _)| i);
    if let Some(i) = least {
        let first = lead.remove(i);
        if let Some(at) = count(&first) {
            firsts[at].1 += 1;
        }
        lead.insert(0, first);
    }
    let mut out = interleave(fresh);
    out.extend(interleave(losers));
    out
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Whether `e` comes from TLS (an alert from the upstream, or a TLS protocol error), which an
/// I/O error carries inside itself.
#[cold]
pub fn tls_failure(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        if s.is::<rustls::Error>() || inner.is_some_and(|i| i.is::<rustls::Error>()) {
            return true;
        }
        src = s.source();
    }
    false
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
    /// The client certificate or its key cannot be used.
    #[error("unusable client certificate: {0}")]
    ClientCert(rustls::Error),
}

impl Connector {
    /// A connector for `protocol` with optional TLS settings.
    pub fn new(
        protocol: UpstreamProtocol,
        tls: Option<&UpstreamTls>,
        resolver: Resolver,
    ) -> Result<Connector, TlsSetupError> {
        let Some(tls) = tls else {
            return Ok(Connector {
                tls: None,
                resolver,
                spread: Arc::default(),
            });
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Rustls)?;
        let builder = if tls.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        } else {
            let mut roots = rustls::RootCertStore::empty();
            if tls.ca.is_empty() {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            } else {
                for ca in &tls.ca {
                    roots.add(ca.clone()).map_err(TlsSetupError::Ca)?;
                }
            }
            builder.with_root_certificates(roots)
        };
        let mut config = match &tls.client_cert {
            Some(c) => builder
                .with_client_auth_cert(c.cert_chain.clone(), c.key.clone_key())
                .map_err(TlsSetupError::ClientCert)?,
            None => builder.with_no_client_auth(),
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
            resolver,
            spread: Arc::default(),
        })
    }

    /// Resolves `addr`, connects to the first candidate that answers, and handshakes TLS when
    /// configured. The whole attempt is bounded by `timeout`. A name's addresses take turns at
    /// being tried first, and those that lost a race in the last [`LOSER_MEMORY`] go last.
    pub async fn connect(
        &self,
        addr: &UpstreamAddress,
        timeout: Duration,
        preface: Option<&[u8]>,
    ) -> Result<Connected, ProxyError> {
        let start = Instant::now();
        match tokio::time::timeout(timeout, self.connect_inner(addr, start, preface)).await {
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
        preface: Option<&[u8]>,
    ) -> Result<Connected, ProxyError> {
        let mut candidates = self.resolve(addr).await?;
        let dns = start.elapsed();
        let racing = Instant::now();
        let several = candidates.len() > 1;
        if several {
            candidates = crate::lock(&self.spread).order(candidates, racing);
        }
        let report = race(candidates, HAPPY_EYEBALLS_STAGGER).await;
        let Some((mut tcp, peer)) = report.winner else {
            return Err(race_error(addr, report.failures));
        };
        if let Some(bytes) = preface {
            // A PROXY protocol header: the first bytes of the connection, before TLS.
            tcp.write_all(bytes).await.map_err(|e| {
                ProxyError::upstream(Stage::Connect, ErrorKind::Reset)
                    .with_target(peer)
                    .with_source(e)
            })?;
        }
        let connect = racing.elapsed();
        if several {
            let losers = report.failures.iter().map(|(a, _)| *a);
            let losers = losers.chain(report.abandoned.iter().copied());
            crate::lock(&self.spread).lost(peer, losers, Instant::now());
        }
        let local = tcp.local_addr().ok();
        let handshaking = Instant::now();
        let io = self.handshake(tcp, peer, addr).await?;
        let tls = self.is_tls().then(|| handshaking.elapsed());
        Ok(Connected {
            io,
            peer,
            local,
            elapsed: start.elapsed(),
            timings: ConnectTimings { dns, connect, tls },
        })
    }

    /// Wraps a connected socket in TLS when this connector is configured for it (the server name
    /// is the configured one, else `addr`'s host); returns it as it is otherwise.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        addr: &UpstreamAddress,
    ) -> Result<UpstreamIo, ProxyError> {
        // Nagle would delay small request heads behind the previous segment's ACK.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(UpstreamIo::Plain(tcp)),
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
                Ok(UpstreamIo::Tls(Box::new(tls)))
            }
        }
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

/// The error for a race every candidate lost: a timeout only if every attempt timed out, each
/// candidate's failure listed.
fn race_error(addr: &UpstreamAddress, failures: Vec<(SocketAddr, io::Error)>) -> ProxyError {
    let all_timed_out = failures
        .iter()
        .all(|(_, e)| e.kind() == io::ErrorKind::TimedOut);
    let kind = if all_timed_out {
        ErrorKind::Timeout
    } else {
        ErrorKind::Refused
    };
    let listed = failures
        .iter()
        .map(|(a, e)| format!("{a}: {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut err =
        ProxyError::upstream(Stage::Connect, kind).with_target(format!("{addr} [{listed}]"));
    if let Some((_, e)) = failures.into_iter().last() {
        err = err.with_source(e);
    }
    err
}

/// RFC 8305's recommended delay between connection attempts.
pub const HAPPY_EYEBALLS_STAGGER: Duration = Duration::from_millis(250);

impl Connector {
    /// Candidate socket addresses for `addr` (its pinned one alone, without a lookup), address
    /// families interleaved (RFC 8305 §4).
    pub async fn resolve(&self, addr: &UpstreamAddress) -> Result<Vec<SocketAddr>, ProxyError> {
        if let Some(ip) = addr.pinned {
            return Ok(vec![SocketAddr::new(ip, addr.port)]);
        }
        match self.resolver.lookup(&addr.host, addr.port).await {
            Ok(found) => Ok(interleave(found)),
            Err(e) => {
                let kind = match e {
                    DnsError::Timeout => ErrorKind::Timeout,
                    _ => ErrorKind::DnsFailed,
                };
                Err(ProxyError::upstream(Stage::Dns, kind)
                    .with_target(addr)
                    .with_source(e))
            }
        }
    }
}

/// Alternates address families, starting with the resolver's first choice.
pub fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    let (mut a, mut b): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|x| x.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(a.len() + b.len());
    a.reverse();
    b.reverse();
    loop {
        match (a.pop(), b.pop()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

type Attempt = (SocketAddr, io::Result<TcpStream>);

/// What a race did: the winner, if any, and every candidate that failed before the end.
#[derive(Debug)]
pub struct RaceReport {
    /// The connected socket and its address.
    pub winner: Option<(TcpStream, SocketAddr)>,
    /// Candidates that failed, in the order they failed.
    pub failures: Vec<(SocketAddr, io::Error)>,
    /// Candidates whose attempt was still under way when another won (closed unanswered).
    pub abandoned: Vec<SocketAddr>,
}

/// Happy Eyeballs (RFC 8305): start a connection attempt, start the next one if it has not
/// succeeded after `stagger` (or at once if it failed), first to connect wins. The losers are
/// aborted, which closes their sockets. The report names the winner and every candidate that
/// lost (each failure's error; the attempts abandoned), for the connector's memory of losers
/// and for `tether trace`.
pub async fn race(candidates: Vec<SocketAddr>, stagger: Duration) -> RaceReport {
    let mut pending = candidates.into_iter();
    let mut attempts: tokio::task::JoinSet<Attempt> = tokio::task::JoinSet::new();
    let mut started = Vec::new();
    let mut failures = Vec::new();
    let start = |set: &mut tokio::task::JoinSet<Attempt>, a: SocketAddr| {
        set.spawn(async move { (a, TcpStream::connect(a).await) });
    };
    let report = |winner: Option<(TcpStream, SocketAddr)>,
                  started: Vec<SocketAddr>,
                  failures: Vec<(SocketAddr, io::Error)>| {
        let abandoned = started
            .into_iter()
            .filter(|a| {
                winner.as_ref().is_none_or(|(_, w)| w != a) && !failures.iter().any(|(f, _)| f == a)
            })
            .collect();
        RaceReport {
            winner,
            failures,
            abandoned,
        }
    };
    match pending.next() {
        Some(a) => {
            started.push(a);
            start(&mut attempts, a);
        }
        None => return report(None, started, failures),
    }
    loop {
        tokio::select! {
            // Results first: a connection that is ready wins over starting another attempt.
            biased;
            done = attempts.join_next() => match done {
                Some(Ok((a, Ok(s)))) => return report(Some((s, a)), started, failures),
                Some(Ok((a, Err(e)))) => {
                    failures.push((a, e));
                    if let Some(next) = pending.next() {
                        started.push(next);
                        start(&mut attempts, next);
                    }
                }
                // A connect task cannot panic; treat it as a lost attempt all the same.
                Some(Err(_)) => {}
                None => return report(None, started, failures),
            },
            _ = tokio::time::sleep(stagger), if pending.len() > 0 => {
                if let Some(next) = pending.next() {
                    started.push(next);
                    start(&mut attempts, next);
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_alternate() {
        let v: Vec<SocketAddr> = ["[::1]:1", "[::2]:1", "127.0.0.1:1", "127.0.0.2:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let out: Vec<String> = interleave(v).iter().map(|a| a.to_string()).collect();
        assert_eq!(out, ["[::1]:1", "127.0.0.1:1", "[::2]:1", "127.0.0.2:1"]);
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn shown(list: &[SocketAddr]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn the_address_first_least_often_leads_and_losers_go_last() {
        let found = addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let none = |_: &SocketAddr| false;
        let mut firsts: Vec<(SocketAddr, u64)> = found.iter().map(|a| (*a, 0)).collect();
        // Ties go to the resolver's order; the others keep it.
        assert_eq!(
            shown(&order(found.clone(), none, &mut firsts)),
            ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
        );
        assert_eq!(
            shown(&order(found.clone(), none, &mut firsts)),
            ["10.0.0.2:80", "10.0.0.1:80", "10.0.0.3:80"]
        );
        let second: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(
            shown(&order(found.clone(), |a| *a == second, &mut firsts)),
            ["10.0.0.3:80", "10.0.0.1:80", "10.0.0.2:80"]
        );
        assert_eq!(firsts.iter().map(|f| f.1).collect::<Vec<_>>(), [1, 1, 1]);
        // Every address a loser: led the same way.
        assert_eq!(
            shown(&order(found, |_| true, &mut firsts))[0],
            "10.0.0.1:80"
        );
        // Families still alternate, within the fresh addresses and within the losers.
        let dual = addrs(&["[::1]:80", "[::2]:80", "10.0.0.1:80", "10.0.0.2:80"]);
        let v6_second: SocketAddr = "[::2]:80".parse().unwrap();
        assert_eq!(
            shown(&order(dual, |a| *a == v6_second, &mut [])),
            ["[::1]:80", "10.0.0.1:80", "10.0.0.2:80", "[::2]:80"]
        );
    }

    #[test]
    fn first_choices_balance_whatever_order_the_resolver_answers_in_and_losses_fade() {
        let mut spread = Spread::default();
        let (a, b) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let t0 = Instant::now();
        // A resolver that rotates its answers itself.
        let mut firsts = Vec::new();
        for i in 0..6 {
            let found = if i % 2 == 0 { vec![a, b] } else { vec![b, a] };
            firsts.push(spread.order(found, t0)[0]);
        }
        assert_eq!(firsts.iter().filter(|f| **f == a).count(), 3, "{firsts:?}");
        // An address new to the name starts level with the others: it does not take every
        // connection until it has caught up.
        let c: SocketAddr = "10.0.0.3:80".parse().unwrap();
        let next: Vec<_> = (0..3).map(|_| spread.order(vec![a, b, c], t0)[0]).collect();
        assert!(
            next.contains(&a) && next.contains(&b) && next.contains(&c),
            "{next:?}"
        );
        // a lost to b: last until the memory fades, or until it wins a race.
        spread.lost(b, [a].into_iter(), t0);
        for _ in 0..3 {
            assert_eq!(*spread.order(vec![a, b], t0).last().unwrap(), a);
        }
        let later = t0 + LOSER_MEMORY;
        let after: Vec<_> = (0..2).map(|_| spread.order(vec![a, b], later)[0]).collect();
        assert!(after.contains(&a), "{after:?}");
        spread.lost(b, [a].into_iter(), t0);
        spread.lost(a, std::iter::empty(), t0);
        let after: Vec<_> = (0..2).map(|_| spread.order(vec![a, b], t0)[0]).collect();
        assert!(after.contains(&a), "{after:?}");
    }

    #[tokio::test]
    async fn race_skips_a_refused_candidate_and_lists_failures() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (_, peer) = race(vec![dead, live_addr], HAPPY_EYEBALLS_STAGGER)
            .await
            .winner
            .unwrap();
        assert_eq!(peer, live_addr);
        let lost = race(vec![dead, dead], HAPPY_EYEBALLS_STAGGER).await;
        assert!(lost.winner.is_none());
        let failures = lost.failures;
        assert_eq!(failures.len(), 2);
        assert!(
            failures
                .iter()
                .all(|(_, e)| e.kind() == io::ErrorKind::ConnectionRefused)
        );
    }
}
