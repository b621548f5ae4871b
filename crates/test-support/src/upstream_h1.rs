//! A raw-TCP HTTP/1.1 upstream that reports what it saw on the wire.
//!
//! Each connection reads requests one after the other. For each: the head is logged
//! ([`EventKind::RequestStarted`]), `100 Continue` is sent if asked for, the body is read in full
//! ([`EventKind::BodyComplete`], or [`EventKind::BodyAborted`] when the connection ends first),
//! then the [`Behavior`] plays while the read side is watched: a read returning 0 is logged as
//! [`EventKind::Eof`], ECONNRESET as [`EventKind::Reset`], and the handler is stopped
//! ([`EventKind::HandlerCancelled`]) like a real server's request context would be.
//!
//! With [`H1Options::idle_timeout`], a connection that waits that long for its next request head
//! is closed (FIN), as Node's `server.keepAliveTimeout` does, without announcing it in a
//! `Keep-Alive` header: the stale keep-alive race, on demand.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::behavior::{Behavior, Ending, Reply, RequestInfo, Script};
use crate::events::{EventKind, EventLog};
use crate::h1wire::{self, Framing};
use crate::net::{self, Accepted, BoxIo, SocketHandle};
use crate::{BoxError, Checksum};

/// Connection-level settings of an [`UpstreamH1`].
#[derive(Debug, Clone, Copy, Default)]
pub struct H1Options {
    /// Close a connection that has waited this long for a request head (none: wait forever).
    pub idle_timeout: Option<Duration>,
}

/// A running HTTP/1.1 upstream; stops when dropped.
#[derive(Debug)]
pub struct UpstreamH1 {
    addr: SocketAddr,
    log: EventLog,
    task: JoinHandle<()>,
}

impl Drop for UpstreamH1 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UpstreamH1 {
    /// Starts a cleartext upstream on `127.0.0.1:0`.
    pub async fn start(script: Script) -> Result<UpstreamH1, BoxError> {
        Self::start_inner(script, None, H1Options::default()).await
    }

    /// Starts a cleartext upstream on `127.0.0.1:0` with connection settings.
    pub async fn start_with(script: Script, options: H1Options) -> Result<UpstreamH1, BoxError> {
        Self::start_inner(script, None, options).await
    }

    /// Starts a cleartext upstream on `addr` (a loopback address; port 0 for any).
    pub async fn start_on(addr: SocketAddr, script: Script) -> Result<UpstreamH1, BoxError> {
        Self::start_inner_on(addr, script, None, H1Options::default()).await
    }

    /// Starts a TLS upstream (use a server config with ALPN `http/1.1` or none).
    pub async fn start_tls(
        script: Script,
        tls: Arc<rustls::ServerConfig>,
    ) -> Result<UpstreamH1, BoxError> {
        Self::start_inner(script, Some(tls), H1Options::default()).await
    }

    async fn start_inner(
        script: Script,
        tls: Option<Arc<rustls::ServerConfig>>,
        options: H1Options,
    ) -> Result<UpstreamH1, BoxError> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_inner_on(any, script, tls, options).await
    }

    async fn start_inner_on(
        addr: SocketAddr,
        script: Script,
        tls: Option<Arc<rustls::ServerConfig>>,
        options: H1Options,
    ) -> Result<UpstreamH1, BoxError> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let log = EventLog::new();
        let (l1, l2) = (log.clone(), log.clone());
        let task = tokio::spawn(async move {
            net::accept_loop(
                listener,
                tls,
                move || l1.accept(),
                move |a, conn| serve(a, conn, l2.clone(), script.clone(), options),
            )
            .await;
        });
        Ok(UpstreamH1 { addr, log, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it saw.
    pub fn log(&self) -> &EventLog {
        &self.log
    }
}

/// How the read side ended.
fn classify(e: &io::Error) -> EventKind {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        EventKind::Eof
    } else {
        EventKind::Reset
    }
}

async fn serve(a: Accepted, conn: u64, log: EventLog, script: Script, options: H1Options) {
    let Accepted { io, handle } = a;
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = BytesMut::new();
    let mut n: u32 = 0;
    loop {
        let next = h1wire::read_head(&mut rd, &mut buf);
        let next = match options.idle_timeout {
            Some(idle) => match tokio::time::timeout(idle, next).await {
                Ok(r) => r,
                // Idle too long: close, as a keep-alive timeout does.
                Err(_) => break,
            },
            None => next.await,
        };
        let head = match next {
            Ok(Some(h)) => h,
            Ok(None) => {
                log.push(conn, 0, "", EventKind::Eof);
                break;
            }
            Err(e) => {
                log.push(conn, 0, "", classify(&e));
                break;
            }
        };
        n += 1;
        let mut parts = head.start.split(' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        let path = target.split('?').next().unwrap_or_default().to_owned();
        log.push(
            conn,
            n,
            &path,
            EventKind::RequestStarted {
                method: method.clone(),
                headers: head.headers.clone(),
            },
        );
        let info = RequestInfo {
            method,
            target,
            path: path.clone(),
            headers: head.headers.clone(),
        };
        let behavior = script(&info);

        if head.has_token("expect", "100-continue")
            && wr
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            log.push(conn, n, &path, EventKind::Reset);
            break;
        }
        let mut sum = Checksum::new();
        let body = match h1wire::request_framing(&head) {
            Ok(f) => h1wire::read_body(&mut rd, &mut buf, f, |d| sum.update(d)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = body {
            log.push(conn, n, &path, EventKind::BodyAborted { len: sum.len() });
            log.push(conn, n, &path, classify(&e));
            log.push(conn, n, &path, EventKind::HandlerCancelled);
            break;
        }
        log.push(
            conn,
            n,
            &path,
            EventKind::BodyComplete {
                len: sum.len(),
                checksum: sum.value(),
            },
        );
        let close_after = head.has_token("connection", "close");

        let played = tokio::select! {
            // The behaviour: ends with whether the connection may be reused.
            r = play(&mut wr, &handle, &info, behavior, sum) => r,
            // The peer leaving stops the handler, as a real server's request context would.
            gone = watch_read(&mut rd, &mut buf) => {
                log.push(conn, n, &path, gone);
                log.push(conn, n, &path, EventKind::HandlerCancelled);
                break;
            }
        };
        match played {
            Ok(keep) => {
                log.push(conn, n, &path, EventKind::HandlerCompleted);
                if !keep || close_after {
                    break;
                }
            }
            Err(e) => {
                log.push(conn, n, &path, classify(&e));
                log.push(conn, n, &path, EventKind::HandlerCancelled);
                break;
            }
        }
    }
    // Dropping the halves closes the socket (RST if linger 0 was set by the behaviour).
    drop((rd, wr));
    drop(handle);
    log.push(conn, 0, "", EventKind::ConnectionClosed);
}

/// Reads (and keeps, for pipelining) whatever arrives until the peer closes or resets.
async fn watch_read(rd: &mut ReadHalf<BoxIo>, buf: &mut BytesMut) -> EventKind {
    loop {
        buf.reserve(4096);
        match rd.read_buf(buf).await {
            Ok(0) => return EventKind::Eof,
            Ok(_) => {}
            Err(e) => return classify(&e),
        }
    }
}

async fn write_head<W: AsyncWrite + Unpin>(
    wr: &mut W,
    status: u16,
    headers: &[(String, String)],
    framing: Option<Framing>,
) -> io::Result<()> {
    let mut h = format!("HTTP/1.1 {status} {}\r\n", h1wire::reason(status));
    for (n, v) in headers {
        h.push_str(&format!("{n}: {v}\r\n"));
    }
    match framing {
        Some(Framing::Length(n)) => h.push_str(&format!("content-length: {n}\r\n")),
        Some(Framing::Chunked) => h.push_str("transfer-encoding: chunked\r\n"),
        Some(Framing::UntilClose) | None => {}
    }
    h.push_str("\r\n");
    wr.write_all(h.as_bytes()).await?;
    wr.flush().await
}

async fn write_chunk<W: AsyncWrite + Unpin>(wr: &mut W, data: &[u8]) -> io::Result<()> {
    wr.write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    wr.write_all(data).await?;
    wr.write_all(b"\r\n").await?;
    wr.flush().await
}

async fn respond<W: AsyncWrite + Unpin>(
    wr: &mut W,
    info: &RequestInfo,
    reply: &Reply,
) -> io::Result<()> {
    let no_body = matches!(reply.status, 100..=199 | 204 | 304);
    let framing = (!no_body).then_some(Framing::Length(reply.body.len() as u64));
    write_head(wr, reply.status, &reply.headers, framing).await?;
    if !no_body && !info.method.eq_ignore_ascii_case("HEAD") {
        wr.write_all(&reply.body).await?;
        wr.flush().await?;
    }
    Ok(())
}

async fn end(wr: &mut WriteHalf<BoxIo>, handle: &SocketHandle, ending: Ending) -> io::Result<()> {
    match ending {
        Ending::Rst | Ending::StreamReset(_) => handle.rst_on_close(),
        Ending::Fin | Ending::GoAway(_) => wr.shutdown().await,
    }
}

/// Plays a behaviour; `Ok(true)` when the connection can carry another request.
async fn play(
    wr: &mut WriteHalf<BoxIo>,
    handle: &SocketHandle,
    info: &RequestInfo,
    behavior: Behavior,
    body: Checksum,
) -> io::Result<bool> {
    match behavior {
        Behavior::Respond(reply) => respond(wr, info, &reply).await.map(|()| true),
        Behavior::Stall { delay, reply } => {
            tokio::time::sleep(delay).await;
            respond(wr, info, &reply).await.map(|()| true)
        }
        Behavior::Summary => {
            let reply = Reply::ok(format!("{} {}", body.len(), body.value()));
            respond(wr, info, &reply).await.map(|()| true)
        }
        Behavior::Stream {
            chunk,
            count,
            interval,
        } => {
            write_head(wr, 200, &[], Some(Framing::Chunked)).await?;
            for i in 0..count {
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                write_chunk(wr, &chunk).await?;
            }
            wr.write_all(b"0\r\n\r\n").await?;
            wr.flush().await?;
            Ok(true)
        }
        Behavior::Download { len } => {
            write_head(wr, 200, &[], Some(Framing::Length(len))).await?;
            let block = crate::pattern(251 * 256);
            let mut left = len;
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(block.len());
                wr.write_all(&block[..n]).await?;
                left -= n as u64;
            }
            wr.flush().await?;
            Ok(true)
        }
        Behavior::Truncate {
            content_length,
            sent,
            ending,
        } => {
            let framing = Some(content_length.map_or(Framing::Chunked, Framing::Length));
            write_head(wr, 200, &[], framing).await?;
            if content_length.is_some() {
                wr.write_all(&sent).await?;
                wr.flush().await?;
            } else {
                write_chunk(wr, &sent).await?;
            }
            // Let the head and the first bytes travel on before the break.
            tokio::time::sleep(Duration::from_millis(100)).await;
            end(wr, handle, ending).await?;
            Ok(false)
        }
        Behavior::CloseBeforeHeaders(ending) => {
            end(wr, handle, ending).await?;
            Ok(false)
        }
        Behavior::Never => std::future::pending().await,
    }
}
