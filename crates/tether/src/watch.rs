//! The HTTP/1 disconnect watcher: notices a client that closed or reset its connection even when
//! the HTTP stack is not reading from it.
//!
//! hyper's HTTP/1 server reads the socket only when it wants bytes: while a handler has not read
//! the request body, while pipelined bytes are buffered, or with `half_close(true)`, a client FIN
//! or RST goes unseen until the response is written. The watcher registers a duplicate of the
//! socket's file descriptor and waits for the peer's close (EPOLLRDHUP / HUP / ERR). The
//! duplicate has its own registration, so it never steals readiness from the HTTP stack and
//! never reads a byte. On Linux that registration is in an epoll set of the thread's own that
//! asks for nothing but those events, so the requests arriving on a busy connection never wake
//! it; elsewhere the duplicate is registered with the reactor for reading, which wakes the
//! watcher (only to wait again) for each request.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use crate::reason::CancelReason;

/// How the peer left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerGone {
    /// The peer closed its side (TCP FIN).
    Closed,
    /// The peer reset the connection (TCP RST), or the connection failed with an error.
    Reset,
    /// The kernel gave up on the peer (keepalive probes or `TCP_USER_TIMEOUT` expired).
    Dead,
}

impl PeerGone {
    /// The cancel reason this implies for a request in flight on an HTTP/1 connection.
    pub fn reason(self) -> CancelReason {
        match self {
            PeerGone::Closed => CancelReason::ClientClosed,
            PeerGone::Reset => CancelReason::ClientReset,
            PeerGone::Dead => CancelReason::PeerDead,
        }
    }
}

/// Watches one TCP connection for the peer going away. See the [module docs](self).
#[derive(Debug)]
pub struct DisconnectWatcher {
    /// The duplicate: its registration is the watcher's alone, and it stays open (so its
    /// descriptor number cannot be reused) until the registration is removed.
    dup: OwnedFd,
    reg: Registration,
}

#[cfg(any(target_os = "linux", target_os = "android"))]
use hangup::Registration;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
use reactor::Registration;

impl DisconnectWatcher {
    /// Starts watching `socket`. Must be called inside a Tokio runtime.
    pub fn new(socket: &impl AsFd) -> io::Result<DisconnectWatcher> {
        let dup = socket.as_fd().try_clone_to_owned()?;
        let reg = Registration::new(&dup)?;
        Ok(DisconnectWatcher { dup, reg })
    }

    /// Completes when the peer has gone. Cancel safe.
    pub async fn gone(&self) -> PeerGone {
        self.reg.fired().await;
        self.classify()
    }

    /// Non-blocking check: `Some` if the watcher has already seen the peer go.
    pub fn poll_gone_now(&self) -> Option<PeerGone> {
        self.reg.fired_now().then(|| self.classify())
    }

    /// Non-blocking check that does not wait for the reactor: [`poll_gone_now`](Self::poll_gone_now),
    /// else a `MSG_PEEK` of one byte on the socket (which consumes nothing).
    ///
    /// The HTTP stack may read a FIN or RST from the socket before the watcher has been told
    /// (both happen between two reactor turns); this sees it anyway. With unread data in the
    /// socket a FIN behind it is invisible here, but the watcher reports it.
    pub fn check_now(&self) -> Option<PeerGone> {
        if let Some(gone) = self.poll_gone_now() {
            return Some(gone);
        }
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        // MSG_DONTWAIT: never blocks, even on a socket its owner left blocking, and without
        // changing the descriptor's flags (shared with the owner's).
        let peek = libc::MSG_PEEK | libc::MSG_DONTWAIT;
        match socket2::SockRef::from(&self.dup).recv_with_flags(&mut byte, peek) {
            Ok(0) => Some(self.classify()),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Some(PeerGone::Dead),
            Err(_) => Some(PeerGone::Reset),
        }
    }

    fn classify(&self) -> PeerGone {
        let sock = socket2::SockRef::from(&self.dup);
        match sock.take_error() {
            Ok(Some(e)) if e.kind() == io::ErrorKind::TimedOut => PeerGone::Dead,
            Ok(Some(_)) | Err(_) => PeerGone::Reset,
            // The pending error is consumed by whoever reads first: when the HTTP stack read the
            // ECONNRESET, the socket is still in state CLOSE, where getpeername fails, while after
            // a FIN (CLOSE_WAIT) it succeeds.
            Ok(None) if sock.peer_addr().is_err() => PeerGone::Reset,
            Ok(None) => PeerGone::Closed,
        }
    }
}

impl AsFd for DisconnectWatcher {
    /// The watcher's own duplicate of the socket, open as long as the watcher: for setting socket
    /// options (keepalive, user timeout) where the socket itself is out of reach, inside an HTTP
    /// or TLS stack. Reading from it would take bytes from the socket's owner.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dup.as_fd()
    }
}

impl Drop for DisconnectWatcher {
    fn drop(&mut self) {
        // Before the duplicate closes, so the descriptor number is still this socket's.
        self.reg.release(&self.dup);
    }
}

/// Elsewhere than Linux: the duplicate registered with the reactor for reading, which also
/// wakes the watcher for every request that arrives (it then waits again).
#[cfg(any(not(any(target_os = "linux", target_os = "android")), test))]
mod reactor {
    use std::io;
    use std::os::fd::OwnedFd;

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    #[derive(Debug)]
    pub(super) struct Registration {
        stream: TcpStream,
    }

    impl Registration {
        pub(super) fn new(dup: &OwnedFd) -> io::Result<Registration> {
            let own = std::net::TcpStream::from(dup.try_clone()?);
            // The reactor takes only non-blocking sockets (the flag is shared with the owner's).
            own.set_nonblocking(true)?;
            Ok(Registration {
                stream: TcpStream::from_std(own)?,
            })
        }

        pub(super) async fn fired(&self) {
            loop {
                match self.stream.ready(Interest::READABLE).await {
                    Ok(ready) if ready.is_read_closed() => return,
                    Ok(_) => {
                        // Ordinary data for the HTTP stack: forget this readiness on this
                        // registration only and wait for the next edge.
                        let _ = self.stream.try_io(Interest::READABLE, || {
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                    }
                    Err(_) => return,
                }
            }
        }

        pub(super) fn fired_now(&self) -> bool {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let fut = self.stream.ready(Interest::READABLE);
            let mut fut = std::pin::pin!(fut);
            match fut.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(Ok(r)) => r.is_read_closed(),
                std::task::Poll::Ready(Err(_)) => true,
                std::task::Poll::Pending => false,
            }
        }

        /// Nothing to do: the stream's own descriptor leaves the reactor when it is dropped.
        pub(super) fn release(&mut self, _dup: &OwnedFd) {}
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod hangup {
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
    use std::task::{Context, Poll, Waker};

    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    /// A watcher's place in its thread's [`HangupSet`].
    #[derive(Debug)]
    pub(super) struct Registration {
        slot: Arc<Slot>,
        set: Arc<HangupSet>,
        key: u64,
    }

    impl Registration {
        pub(super) fn new(dup: &OwnedFd) -> io::Result<Registration> {
            let set = HangupSet::for_this_thread()?;
            let slot = Arc::new(Slot::default());
            let key = set.add(dup, slot.clone())?;
            Ok(Registration { slot, set, key })
        }

        pub(super) async fn fired(&self) {
            std::future::poll_fn(|cx| self.poll_fired(cx)).await
        }

        fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
            if self.fired_now() {
                return Poll::Ready(());
            }
            {
                let mut w = lock(&self.slot.waker);
                match w.as_ref() {
                    Some(old) if old.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
            }
            // Fired while the waker was being stored: its wake may have found no waker.
            if self.fired_now() {
                return Poll::Ready(());
            }
            Poll::Pending
        }

        pub(super) fn fired_now(&self) -> bool {
            self.slot.fired.load(Ordering::Acquire)
        }

        pub(super) fn release(&mut self, dup: &OwnedFd) {
            self.set.remove(dup, self.key);
        }
    }

    /// What the set's driver writes and a watcher reads.
    #[derive(Debug, Default)]
    struct Slot {
        fired: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    impl Slot {
        fn fire(&self) {
            self.fired.store(true, Ordering::Release);
            if let Some(w) = lock(&self.waker).take() {
                w.wake();
            }
        }
    }

    /// The epoll set a thread's watchers are registered in, with `EPOLLRDHUP` and edge triggering
    /// only: the peer's close, a reset or an error reach it, ordinary data never does. Registered
    /// with the reactor the usual way (`EPOLLIN`), a watcher would be told of every request that
    /// arrives, and its task polled for each one.
    ///
    /// The set itself is registered with Tokio's reactor; a task of its own reads it when it becomes
    /// readable (only when a peer went away) and fires the watchers named.
    #[derive(Debug)]
    struct HangupSet {
        epoll: AsyncFd<EpollFd>,
        slots: Mutex<Slots>,
        /// Cleared when the driver task ends (its runtime shut down): a set whose driver is gone
        /// is not used for new watchers.
        alive: AtomicBool,
    }

    #[derive(Debug, Default)]
    struct Slots {
        /// Each slot's key: its index in `entries` in the low 32 bits, the generation of that
        /// index in the high ones, so a stale event for a removed slot never fires its successor.
        entries: Vec<(u32, Option<Arc<Slot>>)>,
        free: Vec<u32>,
    }

    thread_local! {
        static SET: std::cell::RefCell<Weak<HangupSet>> = const { std::cell::RefCell::new(Weak::new()) };
    }

    impl HangupSet {
        /// This thread's set, made (and its driver spawned) on first use, and again when the
        /// runtime that drove the previous one has shut down.
        fn for_this_thread() -> io::Result<Arc<HangupSet>> {
            SET.with(|cell| {
                if let Some(set) = cell.borrow().upgrade()
                    && set.alive.load(Ordering::Acquire)
                {
                    return Ok(set);
                }
                let set = HangupSet::start()?;
                *cell.borrow_mut() = Arc::downgrade(&set);
                Ok(set)
            })
        }

        fn start() -> io::Result<Arc<HangupSet>> {
            let epoll = EpollFd(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
            // SAFETY: `EpollFd` owns the descriptor it returns and never gives it up or swaps it:
            // it is open, and the same, for as long as the `AsyncFd` holding it lives.
            #[allow(unsafe_code)]
            let epoll = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }
                .map_err(io::Error::from)?;
            let set = Arc::new(HangupSet {
                epoll,
                slots: Mutex::new(Slots::default()),
                alive: AtomicBool::new(true),
            });
            tokio::spawn(drive(set.clone()));
            Ok(set)
        }

        fn add(&self, fd: &OwnedFd, slot: Arc<Slot>) -> io::Result<u64> {
            let mut slots = lock(&self.slots);
            let index = match slots.free.pop() {
                Some(i) => i,
                None => {
                    let i = u32::try_from(slots.entries.len())
                        .map_err(|_| io::ErrorKind::OutOfMemory)?;
                    slots.entries.push((0, None));
                    i
                }
            };
            let Some(entry) = slots.entries.get_mut(index as usize) else {
                return Err(io::ErrorKind::InvalidData.into());
            };
            entry.0 = entry.0.wrapping_add(1);
            entry.1 = Some(slot);
            let key = u64::from(entry.0) << 32 | u64::from(index);
            let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
            if let Err(e) = self.epoll.get_ref().0.add(fd, EpollEvent::new(flags, key)) {
                entry.1 = None;
                slots.free.push(index);
                return Err(e.into());
            }
            Ok(key)
        }

        fn remove(&self, fd: &OwnedFd, key: u64) {
            let mut slots = lock(&self.slots);
            // Fails only if the set's descriptor is gone with its runtime: nothing to remove then.
            let _ = self.epoll.get_ref().0.delete(fd);
            let index = key as u32;
            if let Some(entry) = slots.entries.get_mut(index as usize)
                && u64::from(entry.0) == key >> 32
                && entry.1.take().is_some()
            {
                slots.free.push(index);
            }
        }

        /// Fires the watchers of every event waiting in the set; false once it has none left.
        fn dispatch(&self, events: &mut [EpollEvent]) -> bool {
            let n = match self.epoll.get_ref().0.wait(events, EpollTimeout::ZERO) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => return true,
                Err(_) => return false,
            };
            let slots = lock(&self.slots);
            for ev in events.iter().take(n) {
                let key = ev.data();
                if let Some((generation, Some(slot))) = slots.entries.get(key as u32 as usize)
                    && u64::from(*generation) == key >> 32
                {
                    slot.fire();
                }
            }
            n == events.len()
        }
    }

    /// The set's epoll instance, as the reactor sees it.
    #[derive(Debug)]
    struct EpollFd(Epoll);

    impl AsRawFd for EpollFd {
        fn as_raw_fd(&self) -> RawFd {
            self.0.0.as_raw_fd()
        }
    }

    /// Reads the set whenever the reactor says it is readable.
    async fn drive(set: Arc<HangupSet>) {
        struct Alive(Arc<HangupSet>);
        impl Drop for Alive {
            fn drop(&mut self) {
                self.0.alive.store(false, Ordering::Release);
            }
        }
        let alive = Alive(set);
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            let Ok(mut guard) = alive.0.epoll.readable().await else {
                return;
            };
            while alive.0.dispatch(&mut events) {}
            guard.clear_ready();
        }
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    /// Closes `client` with an RST (linger 0).
    fn reset(client: TcpStream) {
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
    }

    /// What `w` saw, within 5 s.
    async fn gone_within(w: &DisconnectWatcher) -> PeerGone {
        tokio::time::timeout(Duration::from_secs(5), w.gone())
            .await
            .expect("the watcher fires")
    }

    #[tokio::test]
    async fn fin_with_unread_data_is_closed() {
        let (mut client, server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        client
            .write_all(b"pipelined bytes nobody reads")
            .await
            .unwrap();
        drop(client);
        let gone = tokio::time::timeout(Duration::from_secs(5), w.gone())
            .await
            .unwrap();
        assert_eq!(gone, PeerGone::Closed);
        assert_eq!(w.poll_gone_now(), Some(PeerGone::Closed));
    }

    #[tokio::test]
    async fn rst_is_reset() {
        let (client, server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        reset(client);
        assert_eq!(gone_within(&w).await, PeerGone::Reset);
    }

    #[tokio::test]
    async fn check_now_sees_fin_and_rst_without_the_reactor() {
        let (client, server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        assert_eq!(w.check_now(), None);
        drop(client);
        // No await in between: the reactor has not run, the socket already knows.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(w.check_now(), Some(PeerGone::Closed));

        let (client, server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        reset(client);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(w.check_now(), Some(PeerGone::Reset));
        // The pending error was consumed by that peek; the state still says reset.
        assert_eq!(w.check_now(), Some(PeerGone::Reset));
    }

    #[tokio::test]
    async fn check_now_never_blocks_on_a_blocking_socket_nor_changes_it() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(false).unwrap();
        let w = DisconnectWatcher::new(&server).unwrap();
        // On a thread of its own, bounded: a blocking peek would never return.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(w.check_now());
        });
        let seen = rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(seen, Ok(None), "check_now blocked or saw a close");
        // The owner's socket is still blocking: the watcher left the shared flags alone. (Not
        // elsewhere than Linux, where the watcher's reactor registration needs non-blocking.)
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert!(!socket2::SockRef::from(&server).nonblocking().unwrap());
        drop(client);
    }

    #[tokio::test]
    async fn data_does_not_fire_and_is_left_for_the_reader() {
        let (mut client, mut server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        client.write_all(b"hello").await.unwrap();
        let fired = tokio::time::timeout(Duration::from_millis(200), w.gone()).await;
        assert!(fired.is_err(), "watcher fired on plain data");
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(w.poll_gone_now(), None);
    }

    /// Counts the wake-ups of whatever was polled with it.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn requests_arriving_never_wake_the_watcher() {
        let (mut client, mut server) = pair().await;
        let w = DisconnectWatcher::new(&server).unwrap();
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut gone = std::pin::pin!(w.gone());
        assert!(
            gone.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        let mut buf = [0u8; 64];
        for i in 0..20 {
            client
                .write_all(format!("GET /{i} HTTP/1.1\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let n = server.read(&mut buf).await.unwrap();
            assert!(n > 0);
        }
        // Long enough for the reactor to have passed on anything it was told.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "woken by data");
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), async {
            while wakes.0.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the close wakes the watcher");
        assert_eq!(
            gone.as_mut().poll(&mut Context::from_waker(&waker)),
            Poll::Ready(PeerGone::Closed)
        );
    }

    #[tokio::test]
    async fn a_dropped_watcher_leaves_its_successor_alone() {
        let (client1, server1) = pair().await;
        let (client2, server2) = pair().await;
        let w1 = DisconnectWatcher::new(&server1).unwrap();
        drop(w1);
        // Takes the slot the first one left.
        let w2 = DisconnectWatcher::new(&server2).unwrap();
        drop(client1);
        let early = tokio::time::timeout(Duration::from_millis(200), w2.gone()).await;
        assert!(early.is_err(), "fired by another connection's close");
        drop(client2);
        let gone = tokio::time::timeout(Duration::from_secs(5), w2.gone())
            .await
            .unwrap();
        assert_eq!(gone, PeerGone::Closed);
        drop(server1);
    }

    #[test]
    fn a_thread_that_starts_another_runtime_still_watches() {
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (client, server) = pair().await;
                let w = DisconnectWatcher::new(&server).unwrap();
                drop(client);
                let gone = tokio::time::timeout(Duration::from_secs(5), w.gone())
                    .await
                    .expect("the watcher fires");
                assert_eq!(gone, PeerGone::Closed);
            });
            // The runtime ends here, and with it the set's driver.
        }
    }

    #[test]
    fn watchers_made_on_a_multi_thread_runtime_fire() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..8 {
                tasks.push(tokio::spawn(async {
                    let (client, server) = pair().await;
                    let w = DisconnectWatcher::new(&server).unwrap();
                    reset(client);
                    gone_within(&w).await
                }));
            }
            for t in tasks {
                assert_eq!(t.await.unwrap(), PeerGone::Reset);
            }
        });
    }

    /// The registration used where there is no epoll: fires on a close, not on data.
    #[tokio::test]
    async fn the_portable_registration_fires_on_close_only() {
        let (mut client, mut server) = pair().await;
        let dup = server.as_fd().try_clone_to_owned().unwrap();
        let mut reg = reactor::Registration::new(&dup).unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(server.read(&mut buf).await.unwrap() > 0);
        let early = tokio::time::timeout(Duration::from_millis(200), reg.fired()).await;
        assert!(early.is_err(), "fired on plain data");
        assert!(!reg.fired_now());
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), reg.fired())
            .await
            .expect("fires on the close");
        assert!(reg.fired_now());
        reg.release(&dup);
    }
}
