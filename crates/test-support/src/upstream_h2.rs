//! A raw `h2` upstream (h2c with prior knowledge, or TLS with ALPN `h2`) that reports what it saw
//! on the wire, per stream.
//!
//! Each stream logs its head ([`EventKind::RequestStarted`]), reads its body in full
//! ([`EventKind::BodyComplete`] / [`EventKind::BodyAborted`]), then plays the [`Behavior`] while
//! polling `poll_reset`: a peer RST_STREAM is logged as [`EventKind::StreamReset`] with its reason
//! (CANCEL is what a proxy must send), a connection failure as [`EventKind::StreamError`], and the
//! handler stops ([`EventKind::HandlerCancelled`]). The connection task keeps `accept()` polled,
//! since that drives the whole connection.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::behavior::{Behavior, Ending, Reply, RequestInfo, Script};
use crate::events::{EventKind, EventLog};
use crate::net::{self, Accepted};
use crate::{BoxError, Checksum};

/// A running HTTP/2 upstream; stops when dropped.
#[derive(Debug)]
pub struct UpstreamH2 {
    addr: SocketAddr,
    log: EventLog,
    task: JoinHandle<()>,
}

impl Drop for UpstreamH2 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UpstreamH2 {
    /// Starts an h2c (prior knowledge) upstream on `127.0.0.1:0`.
    pub async fn start(script: Script) -> Result<UpstreamH2, BoxError> {
        Self::start_inner(script, None, None).await
    }

    /// Starts an h2c upstream whose connections allow at most `max_streams` concurrent streams
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub async fn start_limited(script: Script, max_streams: u32) -> Result<UpstreamH2, BoxError> {
        Self::start_inner(script, None, Some(max_streams)).await
    }

    /// Starts an h2-over-TLS upstream; the config should offer ALPN `h2`.
    pub async fn start_tls(
        script: Script,
        tls: Arc<rustls::ServerConfig>,
    ) -> Result<UpstreamH2, BoxError> {
        Self::start_inner(script, Some(tls), None).await
    }

    async fn start_inner(
        script: Script,
        tls: Option<Arc<rustls::ServerConfig>>,
        max_streams: Option<u32>,
    ) -> Result<UpstreamH2, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let log = EventLog::new();
        let (l1, l2) = (log.clone(), log.clone());
        let task = tokio::spawn(async move {
            net::accept_loop(
                listener,
                tls,
                move || l1.accept(),
                move |a, conn| serve(a, conn, l2.clone(), script.clone(), max_streams),
            )
            .await;
        });
        Ok(UpstreamH2 { addr, log, task })
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

async fn serve(a: Accepted, conn: u64, log: EventLog, script: Script, max_streams: Option<u32>) {
    let Accepted { io, handle } = a;
    let mut builder = h2::server::Builder::new();
    if let Some(n) = max_streams {
        builder.max_concurrent_streams(n);
    }
    let Ok(mut h2) = builder.handshake::<_, Bytes>(io).await else {
        log.push(conn, 0, "", EventKind::ConnectionClosed);
        return;
    };
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Ending>();
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            // Accepting drives the connection: frames for every stream move only while polled.
            next = h2.accept() => match next {
                Some(Ok((req, respond))) => {
                    streams.spawn(stream(req, respond, conn, log.clone(), script.clone(), ctl_tx.clone()));
                }
                Some(Err(e)) => {
                    log.push(conn, 0, "", EventKind::StreamError { message: e.to_string() });
                    break;
                }
                None => break,
            },
            // Connection-level endings asked for by a stream's behaviour.
            Some(ending) = ctl_rx.recv() => match ending {
                Ending::GoAway(reason) => h2.abrupt_shutdown(reason),
                Ending::Fin => {
                    let _ = handle.shutdown_both();
                    break;
                }
                Ending::Rst => {
                    let _ = handle.rst_on_close();
                    break;
                }
                Ending::StreamReset(_) => {}
            },
        }
    }
    drop(h2);
    drop(handle);
    log.push(conn, 0, "", EventKind::ConnectionClosed);
    // Let the streams log how the connection's end reached them.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while streams.join_next().await.is_some() {}
    })
    .await;
}

/// The event for a stream-level error.
fn error_event(e: &h2::Error) -> EventKind {
    match e.reason() {
        Some(reason) if e.is_reset() => EventKind::StreamReset { reason },
        _ => EventKind::StreamError {
            message: e.to_string(),
        },
    }
}

fn reset_event(r: Result<Reason, h2::Error>) -> EventKind {
    match r {
        Ok(reason) => EventKind::StreamReset { reason },
        Err(e) => error_event(&e),
    }
}

async fn stream(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    conn: u64,
    log: EventLog,
    script: Script,
    ctl: mpsc::UnboundedSender<Ending>,
) {
    let id = u32::from(respond.stream_id());
    let (parts, mut body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(a) = parts.uri.authority() {
        headers.push((":authority".into(), a.to_string()));
    }
    headers.extend(parts.headers.iter().map(|(n, v)| {
        (
            n.as_str().to_owned(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        )
    }));
    log.push(
        conn,
        id,
        &path,
        EventKind::RequestStarted {
            method: parts.method.to_string(),
            headers: headers.clone(),
        },
    );
    let info = RequestInfo {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| path.clone()),
        path: path.clone(),
        headers,
    };
    let behavior = script(&info);

    let mut sum = Checksum::new();
    loop {
        match body.data().await {
            Some(Ok(d)) => {
                sum.update(&d);
                let _ = body.flow_control().release_capacity(d.len());
            }
            Some(Err(e)) => {
                log.push(conn, id, &path, EventKind::BodyAborted { len: sum.len() });
                log.push(conn, id, &path, error_event(&e));
                log.push(conn, id, &path, EventKind::HandlerCancelled);
                return;
            }
            None => break,
        }
    }
    log.push(
        conn,
        id,
        &path,
        EventKind::BodyComplete {
            len: sum.len(),
            checksum: sum.value(),
        },
    );
    match play(&mut respond, &info, behavior, sum, &ctl).await {
        Ok(()) => log.push(conn, id, &path, EventKind::HandlerCompleted),
        Err(ev) => {
            log.push(conn, id, &path, ev);
            log.push(conn, id, &path, EventKind::HandlerCancelled);
        }
    }
}

/// Waits `delay` (forever when `None`) unless the stream is reset first; the reset's event then.
async fn wait_or_reset(
    delay: Option<Duration>,
    mut poll_reset: impl FnMut(&mut Context<'_>) -> Poll<Result<Reason, h2::Error>>,
) -> Result<(), EventKind> {
    let mut sleep = pin!(async move {
        match delay {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    });
    poll_fn(|cx| {
        if let Poll::Ready(r) = poll_reset(cx) {
            return Poll::Ready(Err(reset_event(r)));
        }
        sleep.as_mut().poll(cx).map(Ok)
    })
    .await
}

/// Sends `data` respecting flow control, noticing a reset while waiting for capacity.
async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end_of_stream: bool,
) -> Result<(), EventKind> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = poll_fn(|cx| {
            if let Poll::Ready(r) = send.poll_reset(cx) {
                return Poll::Ready(Err(reset_event(r)));
            }
            match send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(n))) if n > 0 => Poll::Ready(Ok(n)),
                Poll::Ready(Some(Ok(_))) => Poll::Pending,
                Poll::Ready(Some(Err(e))) => Poll::Ready(Err(error_event(&e))),
                Poll::Ready(None) => Poll::Ready(Err(EventKind::StreamError {
                    message: "stream closed while sending".into(),
                })),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        let piece = data.split_to(cap.min(data.len()));
        let last = data.is_empty() && end_of_stream;
        send.send_data(piece, last).map_err(|e| error_event(&e))?;
    }
    Ok(())
}

fn head(status: u16, headers: &[(String, String)]) -> Result<Response<()>, EventKind> {
    let mut b = Response::builder().status(status);
    for (n, v) in headers {
        b = b.header(n.as_str(), v.as_str());
    }
    b.body(()).map_err(|e| EventKind::StreamError {
        message: format!("bad response head: {e}"),
    })
}

fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (n, v) in pairs {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            m.append(n, v);
        }
    }
    m
}

async fn respond_with(
    respond: &mut SendResponse<Bytes>,
    info: &RequestInfo,
    reply: &Reply,
) -> Result<(), EventKind> {
    let no_body =
        matches!(reply.status, 100..=199 | 204 | 304) || info.method.eq_ignore_ascii_case("HEAD");
    let mut headers = reply.headers.clone();
    if !matches!(reply.status, 100..=199 | 204 | 304) {
        headers.push(("content-length".into(), reply.body.len().to_string()));
    }
    let bodyless = no_body || (reply.body.is_empty() && reply.trailers.is_empty());
    let mut send = respond
        .send_response(head(reply.status, &headers)?, bodyless)
        .map_err(|e| error_event(&e))?;
    if bodyless {
        return Ok(());
    }
    send_all(&mut send, reply.body.clone(), reply.trailers.is_empty()).await?;
    if !reply.trailers.is_empty() {
        send.send_trailers(header_map(&reply.trailers))
            .map_err(|e| error_event(&e))?;
    }
    Ok(())
}

fn connection_ending(ctl: &mpsc::UnboundedSender<Ending>, ending: Ending) {
    let _ = ctl.send(ending);
}

async fn play(
    respond: &mut SendResponse<Bytes>,
    info: &RequestInfo,
    behavior: Behavior,
    body: Checksum,
    ctl: &mpsc::UnboundedSender<Ending>,
) -> Result<(), EventKind> {
    match behavior {
        Behavior::Respond(reply) => respond_with(respond, info, &reply).await,
        Behavior::Stall { delay, reply } => {
            wait_or_reset(Some(delay), |cx| respond.poll_reset(cx)).await?;
            respond_with(respond, info, &reply).await
        }
        Behavior::Summary => {
            let reply = Reply::ok(format!("{} {}", body.len(), body.value()));
            respond_with(respond, info, &reply).await
        }
        Behavior::Stream {
            chunk,
            count,
            interval,
        } => {
            let mut send = respond
                .send_response(head(200, &[])?, false)
                .map_err(|e| error_event(&e))?;
            for i in 0..count {
                if i > 0 {
                    wait_or_reset(Some(interval), |cx| send.poll_reset(cx)).await?;
                }
                send_all(&mut send, chunk.clone(), false).await?;
            }
            send.send_data(Bytes::new(), true)
                .map_err(|e| error_event(&e))
        }
        Behavior::Download { len } => {
            let mut send = respond
                .send_response(
                    head(200, &[("content-length".into(), len.to_string())])?,
                    len == 0,
                )
                .map_err(|e| error_event(&e))?;
            let block = crate::pattern(251 * 256);
            let mut left = len;
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(block.len());
                left -= n as u64;
                send_all(&mut send, block.slice(..n), left == 0).await?;
            }
            Ok(())
        }
        Behavior::Truncate {
            content_length,
            sent,
            ending,
        } => {
            let headers: Vec<(String, String)> = content_length
                .map(|n| vec![("content-length".to_owned(), n.to_string())])
                .unwrap_or_default();
            let mut send = respond
                .send_response(head(200, &headers)?, false)
                .map_err(|e| error_event(&e))?;
            send_all(&mut send, sent, false).await?;
            // Let the head and the first bytes travel on before the break.
            wait_or_reset(Some(Duration::from_millis(100)), |cx| send.poll_reset(cx)).await?;
            match ending {
                Ending::StreamReset(reason) => send.send_reset(reason),
                other => connection_ending(ctl, other),
            }
            Ok(())
        }
        Behavior::CloseBeforeHeaders(ending) => {
            match ending {
                Ending::StreamReset(reason) => respond.send_reset(reason),
                other => connection_ending(ctl, other),
            }
            Ok(())
        }
        Behavior::Never => wait_or_reset(None, |cx| respond.poll_reset(cx)).await,
    }
}
