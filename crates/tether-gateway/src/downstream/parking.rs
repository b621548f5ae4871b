//! A worker's parked HTTP/1 connections: idle plain-TCP keep-alive connections held as a socket
//! and a few fields each, with no task, no buffers and no registration with tokio's reactor.
//!
//! A connection parks once it has been idle for [`h1::PARK_AFTER`]. Its
//! socket moves to the worker's own epoll set (a `mio::Poll`, itself watched by tokio through one
//! [`AsyncFd`]), and one timer per worker, on the earliest idle deadline, closes those that stay
//! idle too long. A task per parked connection would cost its future and tokio's registration
//! (about 0.9 KiB); a parked entry costs [`ENTRY_BYTES`] or less.
//!
//! LIFECYCLE of an entry: parked (socket in the worker's set, deadline in the timer queue) →
//! bytes from the client: the socket goes back to tokio and a new task serves it | FIN, RST,
//! the idle deadline or shutdown: closed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Peer;
use super::h1::{self, TcpConn};
use crate::listen::{ConfigSource, ConnPermit};
use crate::lock;

/// Most a parked entry may take in the worker's table (checked by a test).
pub const ENTRY_BYTES: usize = 104;

/// Readiness events taken from the worker's epoll set per system call.
const EVENTS: usize = 256;

/// The worker's parked connections. Shared by every configuration generation of one worker.
pub struct Parking {
    lot: Mutex<Lot>,
    registry: Registry,
    /// A connection parked with an earlier deadline than the timer was set for.
    earlier: Notify,
    /// Gateway shutdown.
    stop: CancellationToken,
}

/// What [`Parking::run`] needs: the epoll set itself.
#[derive(Debug)]
pub struct Poller(Poll);

#[derive(Default)]
struct Lot {
    conns: Slab<Entry>,
    /// Idle deadlines, earliest first, with the token of their entry. A heap, in one
    /// allocation: a tree's many small nodes, made while a burst of connections parks, would
    /// each keep a page of the allocator's from being given back. A connection that comes back
    /// leaves its deadline behind; it is skipped when it comes up (its token no longer matches)
    /// and swept out once such stale deadlines outnumber the parked connections.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Deadlines in `deadlines` whose connection is no longer parked.
    stale: usize,
    /// Bumped per park, so a stale readiness event can never reach a reused slot.
    generation: u32,
    /// After shutdown, nothing parks any more.
    closed: bool,
    /// The use so far of parked connections whose listener limits it, by key.
    worn: std::collections::HashMap<usize, crate::lifetime::Wear>,
}

/// Only what serving the connection again needs: the worker, listener settings and local
/// address are looked up again then (a reload meanwhile applies), the rest is the worker's.
struct Entry {
    tcp: std::net::TcpStream,
    generation: u32,
    deadline: Instant,
    client: std::net::SocketAddr,
    source: ConfigSource,
    permit: ConnPermit,
}

impl Lot {
    /// The use kept for the connection parked under `key`, which leaves.
    fn forget_worn(&mut self, key: usize) -> Option<crate::lifetime::Wear> {
        if self.worn.is_empty() {
            return None;
        }
        self.worn.remove(&key)
    }

    /// Whether `token` is a connection parked now (not one that came back, or a reused slot).
    fn is_parked(&self, token: u64) -> bool {
        let key = key_of(token);
        self.conns
            .get(key)
            .is_some_and(|e| token_of(key, e) == token)
    }

    /// A connection came back: its deadline stays in the heap until it comes up, or until
    /// stale ones outnumber the parked connections and are swept out (each sweep pays for
    /// itself over as many returns as there are deadlines left).
    fn leave_deadline_behind(&mut self) {
        self.stale += 1;
        if self.stale > self.conns.len() + 64 {
            let mut deadlines = std::mem::take(&mut self.deadlines);
            deadlines.retain(|Reverse((_, token))| self.is_parked(*token));
            self.deadlines = deadlines;
            self.stale = 0;
        }
    }
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parking")
            .field("parked", &lock(&self.lot).conns.len())
            .finish()
    }
}

fn token(key: usize, generation: u32) -> u64 {
    (key as u64 & u64::from(u32::MAX)) | (u64::from(generation) << 32)
}

fn token_of(key: usize, entry: &Entry) -> u64 {
    token(key, entry.generation)
}

fn key_of(token: u64) -> usize {
    (token & u64::from(u32::MAX)) as usize
}

impl Parking {
    /// A worker's parking, and the poller to [`run`](Self::run) on the worker's runtime. Parked
    /// connections are closed when `stop` is cancelled.
    pub fn new(stop: CancellationToken) -> io::Result<(Arc<Parking>, Poller)> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let parking = Arc::new(Parking {
            lot: Mutex::default(),
            registry,
            earlier: Notify::new(),
            stop,
        });
        Ok((parking, Poller(poll)))
    }

    /// How many connections are parked here.
    pub fn len(&self) -> usize {
        lock(&self.lot).conns.len()
    }

    /// True when no connection is parked here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parks an idle connection until its client sends bytes (it is then served by a new task),
    /// leaves, or stays idle past `deadline`. Closes it at once when that cannot be done.
    pub fn park(&self, conn: TcpConn, tcp: TcpStream, deadline: Instant) {
        if self.stop.is_cancelled() {
            return;
        }
        // Out of tokio's reactor: the registration is what a parked socket must not keep.
        let Ok(tcp) = tcp.into_std() else { return };
        let mut lot = lock(&self.lot);
        if lot.closed {
            drop(lot);
            return;
        }
        lot.generation = lot.generation.wrapping_add(1);
        let generation = lot.generation;
        let earliest = lot.deadlines.peek().map(|Reverse((at, _))| *at);
        let slot = lot.conns.vacant_entry();
        let token = token(slot.key(), generation);
        // Registered while the slot is reserved: readiness already there is reported at once.
        if let Err(e) = self.registry.register(
            &mut SourceFd(&tcp.as_raw_fd()),
            Token(token as usize),
            Interest::READABLE,
        ) {
            drop(lot);
            tracing::debug!(error = %e, "cannot park a connection; closing it");
            return;
        }
        slot.insert(Entry {
            tcp,
            generation,
            deadline,
            client: conn.peer.client,
            source: conn.source,
            permit: conn.permit,
        });
        // Only a listener that limits its connections' use needs their use kept; the entry
        // itself stays as small as it is.
        if conn.listener.limits.lifetime().is_limited() {
            lot.worn.insert(key_of(token), conn.worn);
        }
        lot.deadlines.push(Reverse((deadline, token)));
        drop(lot);
        if earliest.is_none_or(|at| deadline < at) {
            self.earlier.notify_one();
        }
    }

    /// Serves parked connections as their clients come back, and closes the ones that leave or
    /// stay idle too long, until `stop`; then closes them all.
    pub async fn run(self: Arc<Self>, poller: Poller) {
        let readable = tokio::io::Interest::READABLE;
        // SAFETY: the descriptor is the epoll instance the `Poll` owns: open for as long as the
        // `Poll` lives, which is as long as the `AsyncFd` holding it; the `Poll` is never
        // swapped out (only `poll` is called on it).
        #[allow(unsafe_code)]
        let registered = unsafe { AsyncFd::register_with_interest(poller.0, readable) };
        let mut poll = match registered {
            Ok(fd) => fd,
            Err(e) => {
                // Nothing can park on this worker: its idle connections are closed instead.
                tracing::error!(error = %e, "cannot watch parked connections");
                self.shutdown();
                return;
            }
        };
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let next = lock(&self.lot).deadlines.peek().map(|Reverse((at, _))| *at);
            // No deadline: the timer only has to be in the future; a park wakes the loop.
            let wake_at = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                ready = poll.readable_mut() => match ready {
                    Ok(mut guard) => {
                        if !self.drain(guard.get_inner_mut(), &mut events) {
                            guard.clear_ready();
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot watch parked connections");
                        break;
                    }
                },
                _ = tokio::time::sleep_until(wake_at) => self.expire(Instant::now()),
                _ = self.earlier.notified() => {}
            }
        }
        self.shutdown();
    }

    /// Handles the readiness events there are now. False once the set has none left (then the
    /// readiness of the set's own descriptor must be cleared), true if there may be more: only
    /// when they filled the buffer, so an ordinary wake costs one `epoll_wait`, not a second
    /// that finds nothing. (An event that comes after that one marks the set's descriptor
    /// ready again, so clearing its readiness loses nothing.)
    fn drain(&self, poll: &mut Poll, events: &mut Events) -> bool {
        match poll.poll(events, Some(Duration::ZERO)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read parked connections' readiness");
                return false;
            }
        }
        let mut n = 0;
        for event in events.iter() {
            n += 1;
            // Readable with no close or error: bytes are there to serve.
            let data = event.is_readable() && !event.is_read_closed() && !event.is_error();
            self.wake(event.token().0 as u64, data);
        }
        n == EVENTS
    }

    /// The client of a parked connection sent bytes (`data`: the event says so), or closed or
    /// reset it.
    fn wake(&self, token: u64, data: bool) {
        let mut lot = lock(&self.lot);
        let key = key_of(token);
        let Some(entry) = lot.conns.get(key) else {
            return;
        };
        if token_of(key, entry) != token {
            return;
        }
        let mut byte = [0u8; 1];
        // Otherwise a close, with or without a request before it: a peek tells.
        let resume = data
            || match entry.tcp.peek(&mut byte) {
                Ok(0) => false,
                Ok(_) => true,
                // Nothing to read after all; edge-triggered, so the next bytes report again.
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    return;
                }
                Err(_) => false,
            };
        let entry = lot.conns.remove(key);
        let worn = lot.forget_worn(key);
        lot.leave_deadline_behind();
        drop(lot);
        if !resume {
            return;
        }
        if self
            .registry
            .deregister(&mut SourceFd(&entry.tcp.as_raw_fd()))
            .is_err()
        {
            return;
        }
        let Entry {
            tcp,
            deadline,
            client,
            source,
            permit,
            ..
        } = entry;
        // The listener was removed by a reload: nothing serves this connection any more.
        let Some((worker, listener)) = source.current() else {
            return;
        };
        let tcp = match TcpStream::from_std(tcp) {
            Ok(tcp) => tcp,
            Err(e) => return tracing::debug!(error = %e, "cannot resume a parked connection"),
        };
        let peer = Peer {
            client,
            local: tcp.local_addr().unwrap_or(client),
            tls: false,
            tls_session: None,
        };
        let conn = TcpConn {
            worker,
            listener,
            source,
            peer,
            stop: self.stop.clone(),
            permit,
            worn: worn.unwrap_or_default(),
        };
        tokio::spawn(h1::serve_tcp(conn, tcp, Some(deadline)));
    }

    /// Closes the connections idle past their deadline.
    fn expire(&self, now: Instant) {
        let mut closed = Vec::new();
        let mut lot = lock(&self.lot);
        while let Some(&Reverse((at, token))) = lot.deadlines.peek() {
            if at > now {
                break;
            }
            lot.deadlines.pop();
            if lot.is_parked(token) {
                closed.push(lot.conns.remove(key_of(token)));
                lot.forget_worn(key_of(token));
            } else {
                lot.stale = lot.stale.saturating_sub(1);
            }
        }
        drop(lot);
        for e in &closed {
            tracing::trace!(client = %e.client, "idle keep-alive connection timed out");
        }
    }

    /// Closes every parked connection and takes no more (shutdown).
    pub fn shutdown(&self) {
        let mut lot = lock(&self.lot);
        lot.closed = true;
        let conns = std::mem::take(&mut lot.conns);
        lot.worn.clear();
        lot.deadlines.clear();
        lot.stale = 0;
        drop(lot);
        drop(conns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_entry_stays_small() {
        // The slab's slot adds at most a word (its vacant/occupied tag) to the entry.
        let size = std::mem::size_of::<Entry>() + std::mem::size_of::<usize>();
        assert!(size <= ENTRY_BYTES, "a parked entry takes {size} bytes");
    }

    #[test]
    fn tokens_keep_key_and_generation_apart() {
        let t = token(7, 3);
        assert_eq!(key_of(t), 7);
        assert_ne!(t, token(7, 4));
        assert_eq!(
            key_of(token(u32::MAX as usize, u32::MAX)),
            u32::MAX as usize
        );
    }
}
