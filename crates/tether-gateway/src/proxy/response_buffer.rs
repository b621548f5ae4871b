//! Response buffering (`response_buffer_bytes`, nginx's `proxy_buffering`): the upstream's body
//! is read as fast as the upstream sends it, up to so many bytes ahead of the client, by a task
//! of its own; the client's response takes it from there at the client's pace. A response that
//! fits is read whole while a slow client (a phone on a bad network) is still taking its start,
//! so the backend worker that wrote it (a Gunicorn sync worker, a Puma thread) is free at once,
//! and its HTTP/1.1 connection goes back to the pool. Nothing waits for the buffer to fill: each
//! frame is passed on as soon as it arrives, so server-sent events and gRPC streams are not
//! delayed. The client leaving still reaches the upstream while it is sending: the task stops,
//! and its connection is closed.

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use super::response_body::PoolReturn;

/// One frame from the upstream, and whether the upstream's body ended with it.
type Item = Result<(Frame<Bytes>, bool), hyper::Error>;

/// The client's side of a buffered upstream body.
#[derive(Debug)]
pub struct Ahead {
    rx: mpsc::UnboundedReceiver<Item>,
    /// Bytes the task may read ahead; given back as the client takes them.
    room: Arc<Semaphore>,
    cap: usize,
    /// When the upstream's body ended (its connection then went back to the pool) or failed.
    upstream_done: Arc<OnceLock<Instant>>,
    /// The last frame was taken.
    ended: bool,
    hint: SizeHint,
}

/// What the upstream side of a response holds until its body has been read: its HTTP/1.1
/// connection (given back to the pool at the end), its HTTP/2 stream's place on the connection,
/// and its count in the endpoint's load. Released when the upstream's part is over, not when
/// a slow client's is.
#[derive(Debug)]
pub struct Held {
    /// Where the HTTP/1.1 connection goes back to.
    pub pool: Option<PoolReturn>,
    /// The HTTP/2 stream's place among its connection's streams.
    pub place: Option<crate::upstream::pool::StreamPlace>,
    /// The request counted in its endpoint's load (`least_requests`).
    pub load: Option<crate::upstream::balance::InFlight>,
}

/// Reads `body` ahead of the client, up to `cap` bytes, in a task of its own, holding `held`
/// until the body has been read to its end (or failed, or the client's side is gone).
pub fn start(body: Incoming, cap: usize, held: Held) -> Ahead {
    let hint = body.size_hint();
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(cap));
    let upstream_done = Arc::new(OnceLock::new());
    tokio::spawn(read(
        body,
        tx,
        room.clone(),
        cap,
        held,
        upstream_done.clone(),
    ));
    Ahead {
        rx,
        room,
        cap,
        upstream_done,
        ended: false,
        hint,
    }
}

/// The task: frames from `body` into `tx` while there is room, until the body ends (its
/// connection then goes back to the pool), fails, or the client's side is gone (the connection
/// is then dropped, which closes it; an HTTP/2 stream is reset).
async fn read(
    mut body: Incoming,
    tx: mpsc::UnboundedSender<Item>,
    room: Arc<Semaphore>,
    cap: usize,
    held: Held,
    done: Arc<OnceLock<Instant>>,
) {
    let Held { pool, place, load } = held;
    // Released when the task ends, however it ends.
    let _upstream = (place, load);
    loop {
        let frame = tokio::select! {
            biased;
            () = tx.closed() => return,
            frame = body.frame() => frame,
        };
        let frame = match frame {
            None => break,
            Some(Err(e)) => {
                let _ = done.set(Instant::now());
                let _ = tx.send(Err(e));
                return;
            }
            Some(Ok(frame)) => frame,
        };
        let len = frame.data_ref().map_or(0, Bytes::len).min(cap);
        if len > 0 {
            // `u32` permits: a buffer is at most 16 MiB.
            let n = u32::try_from(len).unwrap_or(u32::MAX);
            tokio::select! {
                biased;
                () = tx.closed() => return,
                permit = room.acquire_many(n) => match permit {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                },
            }
        }
        let last = body.is_end_stream();
        if last {
            give_back(pool, &done);
            let _ = tx.send(Ok((frame, true)));
            return;
        }
        if tx.send(Ok((frame, false))).is_err() {
            return;
        }
    }
    give_back(pool, &done);
}

/// The body was read to its end: its connection can serve another request.
fn give_back(pool: Option<PoolReturn>, done: &OnceLock<Instant>) {
    let _ = done.set(Instant::now());
    if let Some(p) = pool {
        p.give_back();
    }
}

impl Ahead {
    /// When the upstream's part ended (its body read to the end, or failed), if it has: a
    /// client leaving after that has nothing upstream to cancel.
    pub fn upstream_done(&self) -> Option<Instant> {
        self.upstream_done.get().copied()
    }

    /// The next frame, as the upstream's body would give it.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok((frame, last)))) => {
                let len = frame.data_ref().map_or(0, Bytes::len).min(self.cap);
                self.room.add_permits(len);
                if let Some(d) = frame.data_ref() {
                    self.hint = taken(self.hint, d.len() as u64);
                }
                self.ended = last;
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    /// Whether the last frame was taken.
    pub fn is_end_stream(&self) -> bool {
        self.ended
    }

    /// What is still to come.
    pub fn size_hint(&self) -> SizeHint {
        if self.ended {
            return SizeHint::with_exact(0);
        }
        self.hint
    }
}

/// `hint` less `n` bytes taken.
fn taken(hint: SizeHint, n: u64) -> SizeHint {
    let mut left = SizeHint::new();
    left.set_lower(hint.lower().saturating_sub(n));
    if let Some(upper) = hint.upper() {
        left.set_upper(upper.saturating_sub(n));
    }
    left
}
