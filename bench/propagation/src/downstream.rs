//! The bench clients: each iteration sends `GET /slow/<id>` (or `/stream/<id>`) through the
//! gateway, waits until the upstream has started the job (and, for a stream, until the response
//! head and first chunk have arrived), takes `t0`, aborts, and waits for the upstream to report
//! what it saw and when.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio::time::timeout_at;
use tokio_rustls::TlsConnector;

use crate::tls;
use crate::upstream::{Event, FIRST_CHUNK, Seen};

/// Where the request is when the client gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Waiting for the response head (`/slow/<id>`).
    FirstByte,
    /// Reading a response that has started (`/stream/<id>`): head and first chunk received.
    Body,
}

impl Phase {
    /// Every phase, in report order.
    pub const ALL: [Phase; 2] = [Phase::FirstByte, Phase::Body];

    /// The label used in the report.
    pub fn label(self) -> &'static str {
        match self {
            Phase::FirstByte => "first byte",
            Phase::Body => "body",
        }
    }

    fn path(self, id: u64) -> String {
        match self {
            Phase::FirstByte => format!("/slow/{id}"),
            Phase::Body => format!("/stream/{id}"),
        }
    }
}

/// How the client talks to the gateway and how it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HTTP/1.1; the client closes its socket (FIN).
    H1Fin,
    /// HTTP/1.1; the client closes with `SO_LINGER` 0 (RST).
    H1Rst,
    /// HTTP/2 prior knowledge; the client resets the stream with CANCEL.
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`); the client resets the stream with CANCEL.
    H2Tls,
}

impl Kind {
    /// Every downstream kind, in report order.
    pub const ALL: [Kind; 4] = [Kind::H1Fin, Kind::H1Rst, Kind::H2c, Kind::H2Tls];

    /// The label used in the report.
    pub fn label(self) -> &'static str {
        match self {
            Kind::H1Fin => "h1 (FIN)",
            Kind::H1Rst => "h1 (RST)",
            Kind::H2c => "h2c",
            Kind::H2Tls => "h2+TLS",
        }
    }
}

/// Why an iteration produced no measurement.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The upstream never reported the job as started within the bound.
    NotStarted,
    /// The gateway answered (or closed) before the upstream started.
    GatewayAnswered(String),
    /// The abort was sent but the upstream observed nothing within the bound.
    NotObserved,
    /// The client could not connect or send.
    Client(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NotStarted => f.write_str("upstream never started"),
            Failure::GatewayAnswered(what) => write!(f, "gateway answered first: {what}"),
            Failure::NotObserved => f.write_str("abort not observed upstream"),
            Failure::Client(e) => write!(f, "client error: {e}"),
        }
    }
}

/// One measured abort.
#[derive(Debug, Clone)]
pub struct Sample {
    /// What the upstream saw.
    pub seen: Seen,
    /// From the client's abort to the upstream's observation.
    pub latency: Duration,
}

/// The upstream's events, filtered per iteration (late events of earlier iterations are skipped).
#[derive(Debug)]
pub struct Events(pub UnboundedReceiver<Event>);

impl Events {
    async fn started(&mut self, id: u64, deadline: tokio::time::Instant) -> Result<(), Failure> {
        loop {
            match timeout_at(deadline, self.0.recv()).await {
                Ok(Some(Event::Started { id: got })) if got == id => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Err(Failure::NotStarted),
            }
        }
    }

    async fn done(
        &mut self,
        id: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(Seen, Instant), Failure> {
        loop {
            match timeout_at(deadline, self.0.recv()).await {
                Ok(Some(Event::Done { id: got, at, seen })) if got == id => return Ok((seen, at)),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Err(Failure::NotObserved),
            }
        }
    }
}

fn client_err(e: impl fmt::Display) -> Failure {
    Failure::Client(e.to_string())
}

/// One HTTP/1.1 iteration on a fresh connection, closed with FIN or, if `rst`, RST.
pub async fn h1_iteration(
    gateway: SocketAddr,
    id: u64,
    rst: bool,
    phase: Phase,
    events: &mut Events,
    deadline: tokio::time::Instant,
) -> Result<Sample, Failure> {
    let mut tcp = timeout_at(deadline, TcpStream::connect(gateway))
        .await
        .map_err(|_| client_err("connect timed out"))?
        .map_err(client_err)?;
    tcp.set_nodelay(true).map_err(client_err)?;
    if rst {
        // Set before t0 so the measured close is only the drop.
        SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .map_err(client_err)?;
    }
    let req = format!("GET {} HTTP/1.1\r\nhost: bench\r\n\r\n", phase.path(id));
    tcp.write_all(req.as_bytes()).await.map_err(client_err)?;
    if phase == Phase::Body {
        events.started(id, deadline).await?;
        first_chunk_h1(&mut tcp, deadline).await?;
        let t0 = Instant::now();
        drop(tcp);
        let (seen, at) = events.done(id, deadline).await?;
        return Ok(Sample {
            seen,
            latency: at.saturating_duration_since(t0),
        });
    }
    let mut first = [0u8; 64];
    tokio::select! {
        biased;
        r = events.started(id, deadline) => r?,
        // Anything from the gateway before the upstream started is an answer we did not want.
        r = tcp.read(&mut first) => {
            let what = match r {
                Ok(0) => "connection closed".to_string(),
                Ok(n) => String::from_utf8_lossy(&first[..n]).lines().next().unwrap_or("").to_string(),
                Err(e) => e.to_string(),
            };
            return Err(Failure::GatewayAnswered(what));
        }
    }
    let t0 = Instant::now();
    drop(tcp);
    let (seen, at) = events.done(id, deadline).await?;
    Ok(Sample {
        seen,
        latency: at.saturating_duration_since(t0),
    })
}

/// Reads until the response head and the stream's first chunk have arrived.
async fn first_chunk_h1(
    tcp: &mut TcpStream,
    deadline: tokio::time::Instant,
) -> Result<(), Failure> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(FIRST_CHUNK.len()).any(|w| w == FIRST_CHUNK) {
        match timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            Ok(Ok(_)) => return Err(Failure::GatewayAnswered("connection closed".to_string())),
            Ok(Err(e)) => return Err(client_err(e)),
            Err(_) => return Err(client_err("no first chunk")),
        }
    }
    Ok(())
}

/// A long-lived HTTP/2 connection to the gateway; one stream per iteration.
#[derive(Debug)]
pub struct H2Client {
    send: SendRequest<Bytes>,
    conn: JoinHandle<()>,
    base: &'static str,
}

impl Drop for H2Client {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl H2Client {
    /// Connects with prior knowledge, or over TLS with ALPN `h2` when `tls` is set.
    pub async fn connect(
        gateway: SocketAddr,
        tls: Option<&TlsConnector>,
    ) -> Result<H2Client, Failure> {
        let tcp = TcpStream::connect(gateway).await.map_err(client_err)?;
        tcp.set_nodelay(true).map_err(client_err)?;
        match tls {
            None => Self::handshake(tcp, "http://bench").await,
            Some(connector) => {
                let name = tls::server_name().map_err(client_err)?;
                let io = connector.connect(name, tcp).await.map_err(client_err)?;
                let alpn = io.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                if alpn.as_deref() != Some(b"h2") {
                    return Err(client_err("the gateway did not negotiate ALPN h2"));
                }
                Self::handshake(io, "https://localhost").await
            }
        }
    }

    async fn handshake<T>(io: T, base: &'static str) -> Result<H2Client, Failure>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = h2::client::handshake(io).await.map_err(client_err)?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H2Client { send, conn, base })
    }

    /// Whether the connection is gone (then the caller reconnects).
    pub fn is_closed(&self) -> bool {
        self.conn.is_finished()
    }

    /// One iteration: a stream on `/slow/<id>`, reset with CANCEL once the upstream started.
    pub async fn iteration(
        &mut self,
        id: u64,
        phase: Phase,
        events: &mut Events,
        deadline: tokio::time::Instant,
    ) -> Result<Sample, Failure> {
        let mut send = timeout_at(deadline, self.send.clone().ready())
            .await
            .map_err(|_| client_err("connection not ready"))?
            .map_err(client_err)?;
        let req = http::Request::get(format!("{}{}", self.base, phase.path(id)))
            .body(())
            .map_err(client_err)?;
        let (response, mut stream) = send.send_request(req, true).map_err(client_err)?;
        if phase == Phase::Body {
            events.started(id, deadline).await?;
            let head = timeout_at(deadline, response)
                .await
                .map_err(|_| client_err("no response head"))?
                .map_err(client_err)?;
            let mut body = head.into_body();
            match timeout_at(deadline, body.data()).await {
                Ok(Some(Ok(_))) => {}
                _ => return Err(client_err("no first chunk")),
            }
            let t0 = Instant::now();
            stream.send_reset(h2::Reason::CANCEL);
            drop(stream);
            drop(body);
            let (seen, at) = events.done(id, deadline).await?;
            return Ok(Sample {
                seen,
                latency: at.saturating_duration_since(t0),
            });
        }
        // Boxed so that it can be dropped right after the reset.
        let mut response = Box::pin(response);
        tokio::select! {
            biased;
            r = events.started(id, deadline) => r?,
            r = &mut response => {
                let what = match r {
                    Ok(resp) => format!("status {}", resp.status()),
                    Err(e) => e.to_string(),
                };
                return Err(Failure::GatewayAnswered(what));
            }
        }
        let t0 = Instant::now();
        stream.send_reset(h2::Reason::CANCEL);
        drop(stream);
        drop(response);
        let (seen, at) = events.done(id, deadline).await?;
        Ok(Sample {
            seen,
            latency: at.saturating_duration_since(t0),
        })
    }
}
