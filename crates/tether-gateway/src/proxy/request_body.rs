//! The request body sent upstream: the client's body, streamed (or read ahead, whole or in
//! part, before the send: in memory, or past its first MiB in a file), with a failure turned
//! into cancellation.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::cancel::ConnCancel;
use crate::error::BoxError;
use tether::{CancelReason, RequestContext};
use tokio::time::{Instant, Sleep};

/// Progress of the upload, shared with the request's tracker.
#[derive(Debug, Default)]
pub struct UploadProgress {
    /// Bytes received from the client so far.
    pub bytes: AtomicU64,
    /// The body ended cleanly.
    pub complete: AtomicBool,
    /// The client went quiet mid-body for longer than the idle timeout.
    pub idle_expired: AtomicBool,
    /// When the last of it was handed to the upstream connection.
    pub completed_at: OnceLock<tokio::time::Instant>,
    /// The body went past the listener's size limit and was cut.
    pub too_large: AtomicBool,
}

impl UploadProgress {
    fn mark_complete(&self) {
        self.complete.store(true, Ordering::Relaxed);
        let _ = self.completed_at.set(tokio::time::Instant::now());
    }
}

/// The body of an upstream request.
///
/// A client that leaves mid-upload makes hyper's body yield an error. That error is treated as
/// cancellation of the request, and the upstream is told with an HTTP/2 `CANCEL` (an error carrying
/// `h2::Reason::CANCEL` makes hyper's h2 client reset with CANCEL instead of INTERNAL_ERROR; an
/// HTTP/1 upstream connection is closed mid-body), so the upstream never sees a silently
/// truncated body.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    ctx: Option<(RequestContext, Arc<ConnCancel>)>,
    progress: Arc<UploadProgress>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    limit: Option<u64>,
    /// A body read ahead before it is sent, and what of it is still to send. Boxed: every
    /// request's state holds a body or two, and few read ahead.
    ahead: Option<Box<Ahead>>,
}

/// A body read ahead.
#[derive(Debug)]
enum Ahead {
    /// In memory: whole, so that it can be sent again; or its start, sent first, then the rest
    /// streams.
    Memory(Whole, WholeLeft),
    /// In a file: sent from it, then (if the client's body had not ended) the rest streams.
    File(Spilled),
}

/// How much of a body read ahead is held in memory when it may go to a file past that.
pub const MEMORY_PART_BYTES: usize = 1024 * 1024;

/// A body read ahead into an unlinked file: gone with the body, whatever happens.
#[derive(Debug)]
struct Spilled {
    file: tokio::fs::File,
    /// Bytes of it still to send.
    left: u64,
    buf: bytes::BytesMut,
    /// The client's body had ended, with these trailers; else the rest streams after the file.
    ended: Option<Option<http::HeaderMap>>,
}

/// A request body read whole: its bytes and trailers. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct Whole {
    data: Bytes,
    trailers: Option<http::HeaderMap>,
}

/// What of a [`Whole`] body is still to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WholeLeft {
    /// Not whole: its start, to send before the rest streams.
    Start,
    Data,
    Trailers,
    Nothing,
}

impl RequestBody {
    /// Wraps the client's body.
    /// `idle` bounds the gap between two chunks from the client.
    pub fn new(
        inner: Incoming,
        ctx: RequestContext,
        conn: Arc<ConnCancel>,
        progress: Arc<UploadProgress>,
        idle: Option<Duration>,
        limit: Option<u64>,
    ) -> Self {
        RequestBody {
            inner: Some(inner),
            ctx: Some((ctx, conn)),
            progress,
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            limit,
            ahead: None,
        }
    }

    /// A body with no bytes.
    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            ctx: None,
            progress: Arc::default(),
            idle: None,
            limit: None,
            ahead: None,
        }
    }

    /// A body of these bytes.
    pub fn from_bytes(data: Bytes) -> Self {
        RequestBody::from_whole(Whole {
            data,
            trailers: None,
        })
    }

    /// A body read whole before: `whole` again.
    pub fn from_whole(whole: Whole) -> Self {
        RequestBody {
            ahead: Some(Box::new(Ahead::Memory(whole, WholeLeft::Data))),
            ..RequestBody::empty()
        }
    }

    /// Reads the client's body ahead of the send (its idle timeout, size limit and the client
    /// leaving apply as when it streams), to its end or until more than `limit` bytes came;
    /// with a `spill` directory, past [`MEMORY_PART_BYTES`] into a file there.
    /// `Ok(true)`: it ended, and is kept whole in memory, to be sent and sent again;
    /// `Ok(false)`: what came is sent first (from memory or the file) and the rest, if any,
    /// streams. `Err` when the body failed (the request's context says why) or the file could
    /// not be written ([`SpillFailed`]).
    pub async fn read_ahead(
        &mut self,
        limit: u64,
        // A thin pointer: this future is part of every request's state.
        spill: Option<&Arc<std::path::Path>>,
    ) -> Result<bool, BoxError> {
        use http_body_util::BodyExt;
        let mut data = bytes::BytesMut::new();
        let mut trailers = None;
        let mut to_file = false;
        while let Some(frame) = self.frame().await {
            match frame?.into_data() {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    if spill.is_some()
                        && data.len() > MEMORY_PART_BYTES
                        && limit > MEMORY_PART_BYTES as u64
                    {
                        to_file = true;
                        break;
                    }
                    if data.len() as u64 > limit {
                        let start = Whole {
                            data: data.freeze(),
                            trailers: None,
                        };
                        self.ahead = Some(Box::new(Ahead::Memory(start, WholeLeft::Start)));
                        return Ok(false);
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        // Awaited out of the loop, so that none of the loop's state is kept across it.
        if to_file && let Some(dir) = spill {
            // Boxed: only a body that goes to a file pays for the file's state.
            return Box::pin(self.spill(dir.clone(), data.freeze(), limit)).await;
        }
        *self = RequestBody::from_whole(Whole {
            data: data.freeze(),
            trailers,
        });
        Ok(true)
    }

    /// Goes on reading ahead into a file in `dir`, `start` first; see [`Self::read_ahead`]. A
    /// file that cannot be made leaves the body to stream after `start`.
    #[cold]
    async fn spill(
        &mut self,
        dir: Arc<std::path::Path>,
        start: Bytes,
        limit: u64,
    ) -> Result<bool, BoxError> {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        let made = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let mut file = match made {
            Ok(f) => tokio::fs::File::from_std(f),
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a file for a request body read ahead; it streams");
                self.ahead = Some(Box::new(Ahead::Memory(
                    Whole {
                        data: start,
                        trailers: None,
                    },
                    WholeLeft::Start,
                )));
                return Ok(false);
            }
        };
        let failed = |e: std::io::Error| -> BoxError { Box::new(SpillFailed(e)) };
        file.write_all(&start).await.map_err(failed)?;
        let mut len = start.len() as u64;
        let mut ended = Some(None);
        while len <= limit {
            match self.frame().await {
                None => break,
                Some(frame) => match frame?.into_data() {
                    Ok(chunk) => {
                        file.write_all(&chunk).await.map_err(failed)?;
                        len += chunk.len() as u64;
                    }
                    Err(frame) => ended = Some(frame.into_trailers().ok()),
                },
            }
        }
        if len > limit {
            ended = None;
        }
        file.flush().await.map_err(failed)?;
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(failed)?;
        if ended.is_some() {
            // Nothing more comes from the client.
            self.inner = None;
        }
        self.ahead = Some(Box::new(Ahead::File(Spilled {
            file,
            left: len,
            buf: bytes::BytesMut::new(),
            ended,
        })));
        Ok(false)
    }

    /// The body, when it was read whole.
    pub fn whole(&self) -> Option<&Whole> {
        match self.ahead.as_deref() {
            Some(Ahead::Memory(w, left)) if *left != WholeLeft::Start => Some(w),
            _ => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(ahead) = this.ahead.as_deref_mut() {
            match ahead {
                Ahead::Memory(_, WholeLeft::Start) => {
                    if let Some(start) = this.ahead.take()
                        && let Ahead::Memory(start, _) = *start
                    {
                        return Poll::Ready(Some(Ok(Frame::data(start.data))));
                    }
                }
                Ahead::Memory(body, left) => {
                    return Poll::Ready(match *left {
                        WholeLeft::Data => {
                            *left = WholeLeft::Trailers;
                            Some(Ok(Frame::data(body.data.clone())))
                        }
                        WholeLeft::Trailers => {
                            *left = WholeLeft::Nothing;
                            body.trailers.clone().map(|t| Ok(Frame::trailers(t)))
                        }
                        WholeLeft::Nothing | WholeLeft::Start => None,
                    });
                }
                Ahead::File(spilled) => match spilled.poll_frame(cx) {
                    // Its part sent: the rest streams.
                    Poll::Ready(None) if spilled.ended.is_none() => this.ahead = None,
                    polled => return polled,
                },
            }
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if polled.is_pending()
            && let Some((_, sleep)) = this.idle.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            // The client stopped sending mid-body: end the request (408) and tell the upstream
            // the body will never complete.
            this.inner = None;
            this.progress.idle_expired.store(true, Ordering::Relaxed);
            if let Some((ctx, _)) = this.ctx.take() {
                ctx.cancel(CancelReason::Deadline);
            }
            return Poll::Ready(Some(Err(Box::new(h2::Error::from(h2::Reason::CANCEL)))));
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let total = this
                        .progress
                        .bytes
                        .fetch_add(d.len() as u64, Ordering::Relaxed)
                        + d.len() as u64;
                    if this.limit.is_some_and(|max| total > max) {
                        // Too long a body (chunked or HTTP/2, no Content-Length to refuse up
                        // front): the upstream sees the request abort, never a truncated body.
                        this.inner = None;
                        this.progress.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(h2::Error::from(
                            h2::Reason::CANCEL,
                        )))));
                    }
                }
                if let Some((d, sleep)) = this.idle.as_mut() {
                    sleep.as_mut().reset(Instant::now() + *d);
                }
                // hyper does not poll again once a body with a known length says it has ended.
                if this.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
                    this.progress.mark_complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => {
                this.inner = None;
                if let Some((ctx, conn)) = this.ctx.take() {
                    ctx.cancel(conn.fallback_reason());
                }
                Poll::Ready(Some(Err(Box::new(h2::Error::from(h2::Reason::CANCEL)))))
            }
            Poll::Ready(None) => {
                this.progress.mark_complete();
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.ahead.as_deref() {
            Some(Ahead::File(s)) => {
                s.left == 0 && s.ended.as_ref().is_some_and(Option::is_none) && self.inner.is_none()
            }
            Some(Ahead::Memory(w, left)) => match left {
                WholeLeft::Start => false,
                WholeLeft::Data => w.data.is_empty() && w.trailers.is_none(),
                WholeLeft::Trailers => w.trailers.is_none(),
                WholeLeft::Nothing => true,
            },
            None => self.inner.as_ref().is_none_or(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        // What was read ahead and is still to send, and what is still to come.
        let plus = |ahead: u64, rest: &Incoming| {
            let rest = rest.size_hint();
            let mut hint = SizeHint::new();
            hint.set_lower(rest.lower() + ahead);
            if let Some(upper) = rest.upper() {
                hint.set_upper(upper + ahead);
            }
            hint
        };
        match (self.ahead.as_deref(), &self.inner) {
            (Some(Ahead::File(s)), Some(b)) => plus(s.left, b),
            (Some(Ahead::File(s)), None) => SizeHint::with_exact(s.left),
            (Some(Ahead::Memory(start, WholeLeft::Start)), Some(b)) => {
                plus(start.data.len() as u64, b)
            }
            (Some(Ahead::Memory(w, WholeLeft::Data | WholeLeft::Start)), _) => {
                SizeHint::with_exact(w.data.len() as u64)
            }
            (Some(Ahead::Memory(..)), _) => SizeHint::with_exact(0),
            (None, Some(b)) => b.size_hint(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

impl Spilled {
    /// The file's next chunk; once it is sent, the trailers (if the client's body ended with
    /// some) and the end.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(match &mut self.ended {
                Some(trailers) => trailers.take().map(|t| Ok(Frame::trailers(t))),
                None => None,
            });
        }
        use bytes::BufMut;
        const CHUNK: u64 = 64 * 1024;
        let want = self.left.min(CHUNK) as usize;
        self.buf.reserve(want);
        let polled = {
            let mut chunk = (&mut self.buf).limit(want);
            tokio_util::io::poll_read_buf(Pin::new(&mut self.file), cx, &mut chunk)
        };
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(Box::new(SpillFailed(e))))),
            Poll::Ready(Ok(0)) => Poll::Ready(Some(Err(Box::new(SpillFailed(
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ))))),
            Poll::Ready(Ok(n)) => {
                self.left -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(self.buf.split().freeze()))))
            }
        }
    }
}

/// A body read ahead into a file could not be written or read back (the disk is full, say).
#[derive(Debug, thiserror::Error)]
#[error("request body file: {0}")]
pub struct SpillFailed(#[source] pub std::io::Error);
