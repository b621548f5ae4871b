//! Dead-peer probing of a downstream connection, armed only while a request is in flight.
//!
//! A client that vanishes without a FIN or RST (Wi-Fi off, NAT entry dropped) is invisible to
//! the read side. The kernel finds it: TCP keepalive probes while tether waits for the upstream
//! (with `TCP_USER_TIMEOUT` set to the same bound, in case earlier bytes are still unacknowledged
//! and the kernel retransmits instead of probing), and `TCP_USER_TIMEOUT` = `write_timeout` while
//! a response is being written. When it gives up, reads fail with `ETIMEDOUT`, which
//! [`crate::cancel`] maps to `peer_dead`.
//!
//! Probing an idle keep-alive connection would cost a packet per second per connection for
//! nothing, so the options are switched on only once a request has been in flight for
//! `arm_after`, and off again when the connection has nothing in flight. Requests shorter than
//! `arm_after` cost no system call and no timer of their own: only counter updates.
//!
//! LIFECYCLE: idle (no options) → request in flight → after `arm_after`: armed (keepalive;
//! plus the user timeout while a response body is being written) → nothing in flight: idle.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use socket2::SockRef;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::cancel::ConnCancel;
use crate::config::DeadPeerConfig;

/// What a connection has in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Requests started and not finished (response body included).
    pub in_flight: u32,
    /// Of those, the ones whose response is being written.
    pub writing: u32,
    /// Requests started on the connection so far.
    pub started: u64,
}

/// Per-connection activity, shared by the requests, the socket wrapper and the connection's
/// loop (dead-peer probing, and parking an idle HTTP/1 connection).
///
/// Plain counters: a request costs a few atomic updates and wakes nobody, unless the prober
/// asked to hear of changes ([`run`] does so only while it has no timer running or while the
/// socket is armed, which a busy connection reaches about once per `arm_after`).
#[derive(Debug)]
pub struct Activity {
    created: Instant,
    in_flight: AtomicU32,
    writing: AtomicU32,
    started: AtomicU64,
    /// When `in_flight` last went from 0 to 1, in nanoseconds after `created`.
    busy_since: AtomicU64,
    /// When the last request ended, in nanoseconds after `created` (0: none has).
    last_end: AtomicU64,
    /// `reads` when the last request ended.
    reads_at_end: AtomicU32,
    /// Reads that returned bytes (wrapping): tells whether the client sent anything since.
    reads: AtomicU32,
    /// The last write could not complete: a response is still leaving.
    write_stalled: AtomicBool,
    /// The connection is being parked: its socket must not be shut down.
    parking: AtomicBool,
    /// The prober waits for changes: starts, ends and writes are signalled on `changed`.
    listening: AtomicBool,
    changed: Notify,
}

impl Activity {
    /// New activity state.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            created: Instant::now(),
            in_flight: AtomicU32::new(0),
            writing: AtomicU32::new(0),
            started: AtomicU64::new(0),
            busy_since: AtomicU64::new(0),
            last_end: AtomicU64::new(0),
            reads_at_end: AtomicU32::new(0),
            reads: AtomicU32::new(0),
            write_stalled: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    /// What is in flight now.
    pub fn load(&self) -> Load {
        Load {
            in_flight: self.in_flight.load(Ordering::SeqCst),
            writing: self.writing.load(Ordering::SeqCst),
            started: self.started.load(Ordering::SeqCst),
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// When the last request ended (when the activity began, if none has).
    pub fn last_end(&self) -> Instant {
        self.created + Duration::from_nanos(self.last_end.load(Ordering::Relaxed))
    }

    /// How many reads had returned bytes when the last request ended.
    pub fn reads_at_end(&self) -> u32 {
        self.reads_at_end.load(Ordering::Relaxed)
    }

    fn nanos_now(&self) -> u64 {
        let since = Instant::now().saturating_duration_since(self.created);
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Since when requests have been in flight without a pause.
    fn busy_since(&self) -> Instant {
        self.created + Duration::from_nanos(self.busy_since.load(Ordering::Relaxed))
    }

    fn note_end(&self) {
        self.last_end.store(self.nanos_now(), Ordering::Relaxed);
        self.reads_at_end.store(self.reads(), Ordering::Relaxed);
    }

    /// Requests started so far (wrapping).
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Reads that returned bytes so far (wrapping).
    pub fn reads(&self) -> u32 {
        self.reads.load(Ordering::Relaxed)
    }

    /// A read returned bytes.
    pub fn note_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// A write or flush completed (`false`) or could not (`true`).
    pub fn note_write(&self, stalled: bool) {
        self.write_stalled.store(stalled, Ordering::Relaxed);
    }

    /// Whether the last write or flush could not complete.
    pub fn write_stalled(&self) -> bool {
        self.write_stalled.load(Ordering::Relaxed)
    }

    /// Marks the connection as being parked.
    pub fn set_parking(&self) {
        self.parking.store(true, Ordering::Relaxed);
    }

    /// Whether the connection is being parked.
    pub fn parking(&self) -> bool {
        self.parking.load(Ordering::Relaxed)
    }

    /// A request started; it is in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) == 0 {
            self.busy_since.store(self.nanos_now(), Ordering::Relaxed);
        }
        self.started.fetch_add(1, Ordering::SeqCst);
        self.signal();
        RequestGuard {
            activity: self.clone(),
            writing: false,
        }
    }

    fn signal(&self) {
        // SeqCst pairs with the prober's store of `listening` and its load of the counters:
        // either it sees this change, or this sees it listening.
        if self.listening.load(Ordering::SeqCst) {
            self.changed.notify_one();
        }
    }
}

/// Counts one request as in flight until dropped.
#[derive(Debug)]
pub struct RequestGuard {
    activity: Arc<Activity>,
    writing: bool,
}

impl RequestGuard {
    /// The response head is out: its body is being written.
    pub fn writing(mut self) -> RequestGuard {
        if !self.writing {
            self.writing = true;
            self.activity.writing.fetch_add(1, Ordering::SeqCst);
            self.activity.signal();
        }
        self
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        a.note_end();
        if self.writing {
            a.writing.fetch_sub(1, Ordering::SeqCst);
        }
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
        a.signal();
    }
}

/// A response body that keeps its request counted as in flight until it ends or is dropped.
#[derive(Debug)]
pub struct GuardedBody<B> {
    inner: B,
    guard: Option<RequestGuard>,
}

impl<B> GuardedBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, guard: RequestGuard) -> Self {
        GuardedBody {
            inner,
            guard: Some(guard.writing()),
        }
    }
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket the prober sets its options on. HTTP/1 borrows the disconnect watcher's duplicate,
/// which lives as long as the connection's cancellation state; HTTP/2 has no watcher and takes a
/// duplicate of its own.
#[derive(Debug)]
pub enum ProbeSocket {
    /// A duplicate of the connection's socket.
    Own(OwnedFd),
    /// The connection's disconnect watcher's duplicate.
    Watcher(Arc<ConnCancel>),
}

impl ProbeSocket {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            ProbeSocket::Own(fd) => Some(fd.as_fd()),
            ProbeSocket::Watcher(c) => c.watcher().map(AsFd::as_fd),
        }
    }
}

/// Whether `cfg` asks for probing at all.
pub fn configured(cfg: &DeadPeerConfig) -> bool {
    cfg.tcp_keepalive.is_some() || cfg.write_timeout.is_some()
}

/// Switches the socket's probing on and off as requests come and go. Never returns; runs as a
/// branch of the connection's loop, so it ends with the connection.
///
/// A busy connection costs one timer per `arm_after`, not one per request: the timer runs from
/// the start of a busy period and, when it fires, is moved to the current period's end of
/// `arm_after` if the connection paused in between.
pub async fn run(socket: Option<ProbeSocket>, cfg: DeadPeerConfig, activity: Arc<Activity>) {
    let Some(fd) = socket.as_ref().and_then(ProbeSocket::fd) else {
        return std::future::pending().await;
    };
    if !configured(&cfg) {
        return std::future::pending().await;
    }
    let sock = SockRef::from(&fd);
    loop {
        if activity.in_flight() == 0 {
            // Nothing in flight: wait for a request to start.
            changed(&activity, |l| l.in_flight > 0).await;
            continue;
        }
        let due = activity.busy_since() + cfg.arm_after;
        if Instant::now() < due {
            tokio::time::sleep_until(due).await;
            // Looked at again: the connection may have paused (a new busy period) or be idle.
            continue;
        }
        if let Some(k) = cfg.tcp_keepalive {
            // SO_KEEPALIVE is switched on before the idle time is set, so the kernel counts the
            // silence that already passed: a peer quiet since the request arrived is probed now.
            let ka = socket2::TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.probes);
            if let Err(e) = sock.set_tcp_keepalive(&ka) {
                tracing::debug!(error = %e, "cannot arm tcp keepalive");
            }
        }
        let mut user_timeout: Option<Duration> = None;
        let mut seen = activity.load();
        while seen.in_flight > 0 {
            let want = if seen.writing > 0 {
                cfg.write_timeout
            } else {
                // Waiting for the upstream: bytes tether sent earlier (an HTTP/2 frame, say) may
                // still be unacknowledged, and then the kernel retransmits instead of probing,
                // for many minutes. The user timeout bounds that case to the keepalive bound.
                cfg.tcp_keepalive.map(|k| k.idle + k.interval * k.probes)
            };
            if want != user_timeout {
                if let Err(e) = sock.set_tcp_user_timeout(want) {
                    tracing::debug!(error = %e, "cannot set tcp user timeout");
                }
                user_timeout = want;
            }
            let last = seen;
            seen = changed(&activity, |l| l.in_flight == 0 || l.writing != last.writing).await;
        }
        if cfg.tcp_keepalive.is_some() {
            let _ = sock.set_keepalive(false);
        }
        if user_timeout.is_some() {
            let _ = sock.set_tcp_user_timeout(None);
        }
    }
}

/// Waits, listening for signals, until the load satisfies `done`.
async fn changed(activity: &Activity, done: impl Fn(&Load) -> bool) -> Load {
    activity.listening.store(true, Ordering::SeqCst);
    let load = loop {
        let notified = activity.changed.notified();
        let mut notified = pin!(notified);
        // Registered before the counters are read, so a change in between is not missed.
        notified.as_mut().enable();
        let load = activity.load();
        if done(&load) {
            break load;
        }
        notified.await;
    };
    activity.listening.store(false, Ordering::SeqCst);
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_in_flight_and_writing() {
        let a = Activity::new();
        let g1 = a.begin();
        let g2 = a.begin().writing();
        assert_eq!(
            a.load(),
            Load {
                in_flight: 2,
                writing: 1,
                started: 2
            }
        );
        drop(g2);
        assert_eq!(
            a.load(),
            Load {
                in_flight: 1,
                writing: 0,
                started: 2
            }
        );
        drop(g1);
        assert_eq!((a.load().in_flight, a.load().writing), (0, 0));
    }

    #[tokio::test]
    async fn arms_only_after_the_delay_and_disarms_when_idle() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let dup = {
            use std::os::fd::AsFd;
            s.as_fd().try_clone_to_owned().unwrap()
        };
        let cfg = DeadPeerConfig {
            arm_after: std::time::Duration::from_millis(50),
            ..Default::default()
        };
        let a = Activity::new();
        let task = tokio::spawn(run(Some(ProbeSocket::Own(dup)), cfg, a.clone()));
        let sock = SockRef::from(&s);
        let g = a.begin();
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(!sock.keepalive().unwrap(), "armed before the delay");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(sock.keepalive().unwrap(), "not armed after the delay");
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(std::time::Duration::from_secs(2))
        );
        let g = g.writing();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(std::time::Duration::from_secs(10))
        );
        drop(g);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!sock.keepalive().unwrap(), "still armed when idle");
        assert_eq!(sock.tcp_user_timeout().unwrap(), None);
        task.abort();
        drop(c);
    }
}
