//! Slow request heads (slowloris). An HTTP/1 connection whose request head does not arrive
//! within `limits.header_read_timeout` is closed without a response (the connection's loop in
//! [`super::h1`] enforces it). The same timeout also ends idle keep-alive connections, which are
//! normal and not worth a log line. [`HeadWatch`] tells the two apart: it notes when bytes arrive
//! while no request is in flight (the start of a head), so a timeout after that is a head that
//! came too slowly. Those are recorded like nginx does: an access-log line with status 408
//! (stage `request_head`, outcome `timeout`) and the counter `tether_header_read_timeouts_total`.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use hyper::rt::{Read, ReadBuf, ReadBufCursor, Write};
use tether::RequestId;
use tokio::time::Instant;

use super::Peer;
use super::probe::Activity;
use crate::error::Stage;
use crate::listen::Worker;
use crate::observe::access::{Outcome, RequestRecord};

/// The status logged for a connection closed in the middle of a request head.
const STATUS: u16 = 408;

/// What [`HeadWatch`] saw, readable after hyper has dropped the connection.
#[derive(Debug)]
pub struct HeadState {
    activity: Arc<Activity>,
    /// `started + 1` of the [`Activity`] when bytes last arrived with nothing in flight; 0 for never.
    partial_after: AtomicU64,
    /// When that partial head began, in nanoseconds since `opened`.
    partial_since: AtomicU64,
    opened: Instant,
}

impl HeadState {
    /// When the connection ended in the middle of a request head: how long that head took so far.
    /// `None` when it was idle between requests (or busy with one).
    pub fn partial_head(&self) -> Option<std::time::Duration> {
        let load = self.activity.load();
        let after = self.partial_after.load(Ordering::Acquire);
        if load.in_flight != 0 || after != load.started.wrapping_add(1) {
            return None;
        }
        let since = std::time::Duration::from_nanos(self.partial_since.load(Ordering::Acquire));
        Some(self.opened.elapsed().saturating_sub(since))
    }

    /// Records a slow head: the access-log line with status 408 and the counter.
    pub fn record(&self, worker: &Worker, peer: &Peer, took: std::time::Duration) {
        tracing::debug!(client = %peer.client, "request head timed out; connection closed, logged as 408");
        worker.observer.metrics.header_read_timeout();
        worker.observer.log.record(&RequestRecord {
            status: STATUS,
            duration: took,
            outcome: Outcome::Timeout,
            stage: Some(Stage::RequestHead.as_str()),
            ..RequestRecord::new(
                SystemTime::now()
                    .checked_sub(took)
                    .unwrap_or_else(SystemTime::now),
                RequestId::generate().as_arc(),
                peer.client,
                peer.local,
                "HTTP/1.1",
            )
        });
    }
}

/// The connection's IO, watched for the first bytes of each request head.
#[derive(Debug)]
pub struct HeadWatch<I> {
    inner: I,
    state: Arc<HeadState>,
}

impl<I> HeadWatch<I> {
    /// Wraps `inner`; `activity` is the connection's request activity.
    pub fn new(inner: I, activity: Arc<Activity>) -> (HeadWatch<I>, Arc<HeadState>) {
        let state = Arc::new(HeadState {
            activity,
            partial_after: AtomicU64::new(0),
            partial_since: AtomicU64::new(0),
            opened: Instant::now(),
        });
        (
            HeadWatch {
                inner,
                state: state.clone(),
            },
            state,
        )
    }

    /// The wrapped IO.
    pub fn into_inner(self) -> I {
        self.inner
    }
}

/// Largest read made while no request is in flight (through a stack buffer, to see its length;
/// hyper reads request heads into 8 KiB first).
const IDLE_READ: usize = 8192;

impl<I: Read + Unpin> Read for HeadWatch<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let load = this.state.activity.load();
        // Bodies and pipelined heads read during a request go straight through.
        if load.in_flight != 0 || buf.remaining() == 0 {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut tmp = [const { MaybeUninit::<u8>::uninit() }; IDLE_READ];
        let n = buf.remaining().min(IDLE_READ);
        let mut read = ReadBuf::uninit(&mut tmp[..n]);
        ready!(Pin::new(&mut this.inner).poll_read(cx, read.unfilled()))?;
        let got = read.filled();
        if !got.is_empty() {
            let mark = load.started.wrapping_add(1);
            let s = &this.state;
            if s.partial_after.load(Ordering::Acquire) != mark {
                let since = u64::try_from(s.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
                s.partial_since.store(since, Ordering::Release);
                s.partial_after.store(mark, Ordering::Release);
            }
        }
        buf.put_slice(got);
        Poll::Ready(Ok(()))
    }
}

impl<I: Write + Unpin> Write for HeadWatch<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}
