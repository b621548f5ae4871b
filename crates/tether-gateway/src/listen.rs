//! Binding, worker threads, the accept loop and draining.
//!
//! tether runs one single-threaded Tokio runtime per worker thread (one per core by default).
//! Each worker accepts from every listener, and a connection, its requests and the upstream
//! connections they use stay on that worker: no work stealing, no cross-thread wake-ups, and
//! per-worker upstream pools whose locks are never contended.
//!
//! Reloading publishes a new generation (routes, TLS, limits, upstreams with fresh pools) to every
//! worker. A connection reads its worker's current generation when it is accepted (TLS, protocol
//! and connection limits come from it). An HTTP/1 connection keeps it to the end; an HTTP/2
//! connection reads the current one again for each new stream. A request keeps the generation it
//! started with, so requests in flight during a reload finish on their configuration. A
//! generation is dropped when the last connection or request holding it ends.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tether::{CancelReason, RequestContext};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Protocols};
use crate::downstream;
use crate::downstream::parking::{Parking, Poller};
use crate::lock;
use crate::observe::Observer;
use crate::observe::access::AccessLog;
use crate::observe::admin::{self, AdminState};
use crate::observe::metrics::Metrics;
use crate::route::Router;
use crate::upstream::connect::TlsSetupError;
use crate::upstream::dns::{DnsError, Resolver};
use crate::upstream::health_check::{self, ActiveHealth};
use crate::upstream::{Upstream, discovery};

/// Listen backlog of the admin listener.
const ADMIN_BACKLOG: i32 = 128;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("listeners[{index}]: cannot listen on {address}: {source}")]
    Bind {
        /// Listener index.
        index: usize,
        /// Address.
        address: SocketAddr,
        /// Cause.
        source: io::Error,
    },
    /// A listener's certificates, keys or client trust anchors were rejected.
    #[error("listeners[{index}].tls: {source}")]
    ListenerTls {
        /// Listener index.
        index: usize,
        /// Cause.
        source: crate::downstream::tls::TlsSetupError,
    },
    /// An upstream's TLS settings were rejected.
    #[error("upstreams[{index}].tls: {source}")]
    UpstreamTls {
        /// Upstream index.
        index: usize,
        /// Cause.
        source: TlsSetupError,
    },
    /// The DNS settings are unusable.
    #[error("dns: {0}")]
    Dns(DnsError),
    /// A worker thread could not be started.
    #[error("cannot start worker thread: {0}")]
    Thread(io::Error),
    /// A worker's set of parked connections (an epoll instance) could not be created.
    #[error("cannot create a worker's parked-connection set: {0}")]
    Parking(io::Error),
}

/// One configuration as every worker shares it: the config and each listener's routes, TLS and
/// limits. Workers build their own upstreams (and pools) from `config`.
#[derive(Debug)]
struct Published {
    /// The configuration as given; `config` is it with the discovered names expanded.
    declared: Arc<Config>,
    config: Arc<Config>,
    listeners: Vec<Arc<ListenerShared>>,
    /// Per upstream (in configuration order), the state its active health checks keep.
    health: Vec<Option<Arc<ActiveHealth>>>,
}

/// Hands configurations to the workers: a reload's, and discovery's when a name's addresses
/// change.
#[derive(Debug)]
struct Publisher {
    tx: watch::Sender<Arc<Published>>,
    /// One publication at a time: a reload and a discovery round must not undo one another.
    turn: Mutex<()>,
    /// What discovery found so far.
    answers: Mutex<discovery::Answers>,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// Publishes `declared`, expanded with the answers found so far. With `reload`, checks that
    /// listeners stay as they are.
    fn publish(&self, declared: Arc<Config>, reload: bool) -> Result<(), StartError> {
        let _turn = lock(&self.turn);
        let previous = self.tx.borrow().clone();
        if reload {
            check_reloadable(&previous.declared, &declared)?;
        }
        let answers = lock(&self.answers).clone();
        let next = Arc::new(prepare(declared, &answers, Some(&previous))?);
        self.tx.send_replace(next.clone());
        self.metrics.retain_endpoint_loads(&next.config);
        self.metrics.set_endpoints(&next.config);
        Ok(())
    }

    /// After a discovery round that changed `answers`: publishes the current configuration
    /// expanded anew, unless it already shows exactly these endpoints.
    fn rediscovered(&self) {
        let current = self.tx.borrow().clone();
        let answers = lock(&self.answers).clone();
        let expanded = discovery::expand(&current.declared, &answers);
        let same = expanded
            .upstreams
            .iter()
            .zip(&current.config.upstreams)
            .all(|(a, b)| a.addresses == b.addresses);
        if same {
            return;
        }
        if let Err(e) = self.publish(current.declared.clone(), false) {
            // Validated when it was loaded; expansion keeps it valid.
            tracing::error!(error = %e, "cannot apply discovered endpoints");
        }
    }
}

/// One worker's view of a configuration generation.
#[derive(Debug)]
struct Generation {
    /// The configuration its upstreams were built from.
    config: Arc<Config>,
    worker: Arc<Worker>,
    listeners: Vec<Arc<ListenerShared>>,
}

/// A worker's current generation. A std lock is enough: it is read once per accepted connection
/// and written once per reload, never held across an await.
type Slot = Arc<RwLock<Arc<Generation>>>;

fn current(slot: &Slot) -> Arc<Generation> {
    match slot.read() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// What every worker shares about a listener.
pub struct ListenerShared {
    /// Routes.
    pub router: Router,
    /// TLS termination, if any.
    pub tls: Option<TlsAcceptor>,
    /// Protocols served.
    pub protocols: Protocols,
    /// Peers whose forwarding, request-id and budget headers are believed.
    pub trusted_peers: Vec<crate::config::IpNet>,
    /// Dead-peer detection settings.
    pub dead_peer: crate::config::DeadPeerConfig,
    /// Limits.
    pub limits: crate::config::ListenerLimits,
    /// Open connections, when limited; shared by every worker and kept across reloads.
    pub conn_limit: Option<Arc<ConnLimit>>,
    /// Every connection starts with a PROXY protocol header naming the client.
    pub proxy_protocol: bool,
}

/// A listener's `max_connections`: one permit per open connection. A reload resizes it rather
/// than replacing it, so that the connections already open count against the new limit.
#[derive(Debug)]
pub struct ConnLimit {
    permits: Arc<Semaphore>,
    /// The configured limit.
    max: std::sync::atomic::AtomicUsize,
    /// Permits still to withdraw after the limit was lowered below what is in use: each one
    /// returned by a closing connection is withdrawn until none is owed.
    owed: std::sync::atomic::AtomicUsize,
}

impl ConnLimit {
    /// A limit of `max` connections.
    pub fn new(max: usize) -> Arc<ConnLimit> {
        Arc::new(ConnLimit {
            permits: Arc::new(Semaphore::new(max)),
            max: max.into(),
            owed: 0.into(),
        })
    }

    /// Changes the limit to `max`, the open connections counting against it.
    pub fn resize(&self, max: usize) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let was = self.max.swap(max, AcqRel);
        if max > was {
            // Raising first forgives what is owed.
            let more = max - was;
            let forgiven = match self
                .owed
                .fetch_update(AcqRel, Acquire, |o| Some(o.saturating_sub(more)))
            {
                Ok(o) | Err(o) => o.min(more),
            };
            self.permits.add_permits(more - forgiven);
        } else if max < was {
            let less = was - max;
            let withdrawn = self.permits.forget_permits(less);
            self.owed.fetch_add(less - withdrawn, AcqRel);
        }
    }

    /// A permit for one more connection, once there is room.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        loop {
            let permit = self.permits.clone().acquire_owned().await?;
            if self
                .owed
                .fetch_update(AcqRel, Acquire, |o| o.checked_sub(1))
                .is_ok()
            {
                permit.forget();
                continue;
            }
            return Ok(permit);
        }
    }
}

impl ListenerShared {
    /// Whether `ip` is a trusted peer.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_peers.iter().any(|n| n.contains(ip))
    }
}

impl std::fmt::Debug for ListenerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerShared")
            .field("router", &self.router)
            .field("tls", &self.tls.is_some())
            .field("protocols", &self.protocols)
            .finish()
    }
}

/// A worker's state: its upstream pools and the root of its request contexts.
#[derive(Debug)]
pub struct Worker {
    /// Upstreams in configuration order.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Access log and metrics.
    pub observer: Observer,
    /// Cancelled with [`CancelReason::Shutdown`] when the drain period ends.
    pub root: RequestContext,
    conns: Arc<ConnCount>,
    /// This worker's parked HTTP/1 connections.
    pub parking: Arc<Parking>,
}

#[derive(Debug, Default)]
struct ConnCount {
    open: AtomicUsize,
    zero: Notify,
}

/// What an accepted connection holds until it ends: its place in the worker's drain count and,
/// when limited, in the listener's connection limit.
#[derive(Debug)]
pub struct ConnPermit {
    _open: ConnGuard,
    _limit: Option<OwnedSemaphorePermit>,
}

/// Counts a connection as open until dropped.
#[derive(Debug)]
pub struct ConnGuard(Arc<ConnCount>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

impl Worker {
    fn conn_guard(&self) -> ConnGuard {
        self.conns.open.fetch_add(1, Ordering::AcqRel);
        ConnGuard(self.conns.clone())
    }

    async fn drained(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.conns.zero.notified();
                if self.conns.open.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// Starts gateways.
#[derive(Debug)]
pub struct Gateway;

/// A started gateway. Dropping it stops the workers without waiting for them.
#[derive(Debug)]
pub struct RunningGateway {
    addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    admin: Option<Arc<AdminState>>,
    stop: CancellationToken,
    grace: Arc<Mutex<Duration>>,
    threads: Vec<JoinHandle<()>>,
    published: Arc<Publisher>,
    /// Every worker's parked connections.
    parked: Vec<Arc<Parking>>,
}

impl Gateway {
    /// Validates `config`, binds every listener and starts the worker threads. Returns once the
    /// listeners are bound, so their addresses can be used at once.
    pub fn start(config: Config, log: Arc<dyn AccessLog>) -> Result<RunningGateway, StartError> {
        let names: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
        let metrics = Arc::new(Metrics::new(&names));
        let observer = Observer { log, metrics };
        let workers = config
            .workers
            .or_else(|| std::thread::available_parallelism().ok())
            .unwrap_or(NonZeroUsize::MIN)
            .get();
        // Each worker's own socket of every listener, in configuration order.
        let mut per_worker: Vec<Vec<std::net::TcpListener>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut addrs = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let bind_err = |source| StartError::Bind {
                index,
                address: l.address,
                source,
            };
            let group =
                bind_group(l.address, l.limits.backlog as i32, workers).map_err(bind_err)?;
            let first = group.first().ok_or_else(|| {
                bind_err(io::Error::new(io::ErrorKind::InvalidInput, "no workers"))
            })?;
            addrs.push(first.local_addr().map_err(bind_err)?);
            for (sockets, l) in per_worker.iter_mut().zip(group) {
                sockets.push(l);
            }
        }
        let admin_config = config.admin.clone();
        let declared = Arc::new(config);
        let published = Arc::new(prepare(declared.clone(), &discovery::Answers::new(), None)?);
        let stop = CancellationToken::new();
        let (admin_addr, admin) = match &admin_config {
            Some(a) => {
                let (addr, state) = start_admin(a.address, observer.metrics.clone(), stop.clone())?;
                (Some(addr), Some(state))
            }
            None => (None, None),
        };
        let (tx, updates) = watch::channel(published);
        let published = Arc::new(Publisher {
            tx,
            turn: Mutex::new(()),
            answers: Mutex::new(discovery::Answers::new()),
            metrics: observer.metrics.clone(),
        });
        published
            .metrics
            .set_endpoints(&published.tx.borrow().config);
        // Until discovery's first round answers (at once, without delaying the start), a
        // discovered name is one endpoint resolved when connecting.
        let mut threads = vec![
            spawn_discovery(published.clone(), updates.clone(), stop.clone())
                .map_err(StartError::Thread)?,
        ];
        let grace = Arc::new(Mutex::new(Duration::from_secs(10)));
        let mut parked = Vec::new();
        for (n, listeners) in per_worker.into_iter().enumerate() {
            let (updates, observer, stop, grace) = (
                updates.clone(),
                observer.clone(),
                stop.clone(),
                grace.clone(),
            );
            let (parking, poller) = Parking::new(stop.clone()).map_err(StartError::Parking)?;
            parked.push(parking.clone());
            let shared = WorkerShared {
                observer,
                stop,
                grace,
                parking: (parking, poller),
            };
            let t = std::thread::Builder::new()
                .name(format!("tether-worker-{n}"))
                .spawn(move || run_worker(updates, listeners, shared))
                .map_err(StartError::Thread)?;
            threads.push(t);
        }
        threads.push(
            spawn_health_checks(updates, observer.metrics.clone(), stop.clone())
                .map_err(StartError::Thread)?,
        );
        Ok(RunningGateway {
            addrs,
            admin_addr,
            admin,
            stop,
            grace,
            threads,
            published,
            parked,
        })
    }
}

/// Validates `config` and builds what the workers share. With `previous`, the listeners' connection
/// limits are kept when unchanged, so connections of both generations count against one limit.
fn prepare(
    declared: Arc<Config>,
    answers: &discovery::Answers,
    previous: Option<&Published>,
) -> Result<Published, StartError> {
    declared.validate()?;
    let config = discovery::expand(&declared, answers);
    // Fail on bad DNS or upstream TLS settings now, not on the first request.
    let resolver = Resolver::new(&config.dns).map_err(StartError::Dns)?;
    for (index, u) in config.upstreams.iter().enumerate() {
        Upstream::new(u, resolver.clone(), Arc::default(), None, None)
            .map_err(|source| StartError::UpstreamTls { index, source })?;
    }
    let health = config
        .upstreams
        .iter()
        .map(|u| {
            let check = u.health_check.as_ref()?;
            // An endpoint kept by an upstream checked on the same path keeps what its checks
            // found: a reload (or discovery) does not put a failing endpoint back in rotation.
            let kept = previous.and_then(|p| {
                let (old, state) = p.config.upstreams.iter().zip(&p.health).find(|(old, _)| {
                    old.name == u.name
                        && old.protocol == u.protocol
                        && old.health_check.as_ref().map(|c| &c.path) == Some(&check.path)
                })?;
                Some(ActiveHealth::carried(
                    state.as_ref()?,
                    &old.addresses,
                    &u.addresses,
                ))
            });
            Some(kept.unwrap_or_else(|| ActiveHealth::new(u.addresses.len())))
        })
        .collect();
    let mut listeners = Vec::new();
    for (index, l) in config.listeners.iter().enumerate() {
        let kept = previous
            .and_then(|p| p.listeners.get(index))
            .and_then(|old| old.conn_limit.clone());
        let conn_limit = match (kept, l.limits.max_connections) {
            (Some(limit), Some(n)) => {
                limit.resize(n.get());
                Some(limit)
            }
            (None, Some(n)) => Some(ConnLimit::new(n.get())),
            (_, None) => None,
        };
        listeners.push(Arc::new(ListenerShared {
            router: Router::reloaded(
                &l.routes,
                previous
                    .and_then(|p| p.listeners.get(index))
                    .map(|old| &old.router),
                |name| config.upstreams.iter().position(|u| u.name == name),
            ),
            tls: crate::downstream::tls::acceptor(l)
                .map_err(|source| StartError::ListenerTls { index, source })?,
            protocols: l.protocols,
            trusted_peers: l.trusted_peers.clone(),
            proxy_protocol: l.proxy_protocol,
            dead_peer: l.dead_peer,
            limits: l.limits,
            conn_limit,
        }));
    }
    Ok(Published {
        declared,
        config: Arc::new(config),
        listeners,
        health,
    })
}

/// What a reload cannot change: the listening sockets are not rebound.
fn check_reloadable(old: &Config, new: &Config) -> Result<(), ConfigError> {
    let fixed = |key: String, what: &str| ConfigError {
        key,
        message: format!("{what} cannot change on reload (restart tether to change it)"),
    };
    if old.listeners.len() != new.listeners.len() {
        return Err(fixed("listeners".into(), "the number of listeners"));
    }
    for (i, (o, n)) in old.listeners.iter().zip(&new.listeners).enumerate() {
        if o.address != n.address {
            return Err(fixed(format!("listeners[{i}].address"), "the address"));
        }
        if o.protocols != n.protocols {
            return Err(fixed(format!("listeners[{i}].protocols"), "the protocols"));
        }
        if o.tls.is_some() != n.tls.is_some() {
            return Err(fixed(format!("listeners[{i}].tls"), "whether TLS is on"));
        }
        if o.limits.backlog != n.limits.backlog {
            return Err(fixed(
                format!("listeners[{i}].limits.backlog"),
                "the backlog",
            ));
        }
    }
    Ok(())
}

impl RunningGateway {
    /// The bound address of each listener, in configuration order.
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The bound admin address, when an admin listener is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// HTTP/1 connections parked right now: idle keep-alive connections holding only their
    /// socket until the client sends the next request.
    pub fn parked_connections(&self) -> usize {
        self.parked.iter().map(|p| p.len()).sum()
    }

    /// The Prometheus text exposition of the metrics (what `/metrics` serves).
    pub fn metrics_text(&self) -> Option<String> {
        self.admin.as_ref().map(|a| a.metrics.encode())
    }

    /// Switches to `config` for new connections and new HTTP/2 streams. Requests in flight, and
    /// HTTP/1 connections already open, keep the configuration they started under. The new
    /// config is validated like at start; listeners are not rebound, so changing their number,
    /// addresses, protocols, backlog or whether they terminate TLS is refused. On error nothing
    /// changes. `workers` and `admin` take effect only on restart. Upstreams it adds get their
    /// connection gauges.
    pub fn reload(&self, config: Config) -> Result<(), StartError> {
        let previous = self.published.tx.borrow().declared.clone();
        if config.workers != previous.workers
            || config.admin.as_ref().map(|a| a.address)
                != previous.admin.as_ref().map(|a| a.address)
        {
            tracing::warn!("workers and admin settings take effect on restart only");
        }
        self.published.publish(Arc::new(config), true)
    }

    /// A token that, when cancelled, starts the shutdown (as [`shutdown`](Self::shutdown) does,
    /// without waiting).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops accepting, lets requests in flight finish for up to `grace`, cancels the rest with
    /// reason `shutdown`, and waits for the worker threads to end. Blocking.
    pub fn shutdown(mut self, grace: Duration) {
        if let Ok(mut g) = self.grace.lock() {
            *g = grace;
        }
        if let Some(a) = &self.admin {
            a.draining.store(true, Ordering::Release);
        }
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds `addr` once per worker. With more than one worker the sockets share the port with
/// `SO_REUSEPORT`, so the kernel spreads new connections across the workers: with one shared
/// socket, whichever worker wakes first takes a whole burst of connections, and the other
/// idles while it saturates.
fn bind_group(
    addr: SocketAddr,
    backlog: i32,
    workers: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    if workers <= 1 {
        return Ok(vec![bind(addr, backlog)?]);
    }
    // A plain bind first: it fails if anything (another tether included) already uses the
    // address, which a `SO_REUSEPORT` bind alone would join instead. It also picks the port
    // when `addr` asks for any.
    let probe = bound(addr, false)?;
    let actual = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP address"))?;
    drop(probe);
    (0..workers)
        .map(|_| listening(bound(actual, true)?, backlog))
        .collect()
}

fn bind(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    listening(bound(addr, false)?, backlog)
}

/// A TCP socket bound to `addr`, not yet listening.
fn bound(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    Ok(sock)
}

fn listening(sock: Socket, backlog: i32) -> io::Result<std::net::TcpListener> {
    sock.listen(backlog)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// What every worker thread gets from the gateway.
struct WorkerShared {
    observer: Observer,
    stop: CancellationToken,
    grace: Arc<Mutex<Duration>>,
    parking: (Arc<Parking>, Poller),
}

/// Process-wide housekeeping run by a worker thread that has gone quiet.
static WORKER_IDLE: OnceLock<fn()> = OnceLock::new();

/// How long a worker must have started no request before the idle hook runs. Longer than the
/// pauses of a steady trickle of clients (a browser's next request, a poller every second or
/// two), whose memory is needed again at the next request.
const IDLE_HOOK_QUIET: Duration = Duration::from_secs(3);

thread_local! {
    /// Requests started on this thread: the idle hook runs once this stops moving.
    static STARTED: Cell<u64> = const { Cell::new(0) };
}

/// Counts a request started on the calling (worker) thread.
pub(crate) fn note_request() {
    STARTED.with(|c| c.set(c.get().wrapping_add(1)));
}

/// Runs `hook` on a worker thread once it has started no request for 3 s (`IDLE_HOOK_QUIET`): at
/// the first time it runs out of work after that (the pool sweep wakes it every second), once
/// per quiet spell. For per-thread housekeeping of process-wide state,
/// such as handing an allocator's free memory back to the system, which a worker still serving
/// requests would only have to take back. The first hook set wins; set it before starting a
/// gateway.
pub fn on_worker_idle(hook: fn()) {
    let _ = WORKER_IDLE.set(hook);
}

/// A worker's progress towards its idle hook.
struct Quiet {
    /// [`STARTED`] when last looked at.
    seen: u64,
    /// When it was first seen at that count.
    since: std::time::Instant,
    /// The hook has run for this quiet spell.
    done: bool,
}

/// How often a worker closes expired idle upstream connections.
const POOL_SWEEP: Duration = Duration::from_secs(1);

fn run_worker(
    mut updates: watch::Receiver<Arc<Published>>,
    listeners: Vec<std::net::TcpListener>,
    shared: WorkerShared,
) {
    let WorkerShared {
        observer,
        stop,
        grace,
        parking: (parking, poller),
    } = shared;
    let log = observer.log.clone();
    let idle_hook = WORKER_IDLE.get().copied();
    let quiet = Mutex::new(Quiet {
        seen: 0,
        since: std::time::Instant::now(),
        done: false,
    });
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Out of work: write the access-log lines gathered meanwhile.
        .on_thread_park(move || {
            log.flush();
            if let Some(hook) = idle_hook {
                let now = std::time::Instant::now();
                let started = STARTED.with(Cell::get);
                let mut q = lock(&quiet);
                if started != q.seen {
                    *q = Quiet {
                        seen: started,
                        since: now,
                        done: false,
                    };
                } else if !q.done && now.duration_since(q.since) >= IDLE_HOOK_QUIET {
                    q.done = true;
                    drop(q);
                    hook();
                }
            }
        })
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot build worker runtime");
            return;
        }
    };
    rt.block_on(async move {
        // Shared by every generation of this worker: the drain count and the shutdown root.
        let root = RequestContext::new();
        let conns: Arc<ConnCount> = Arc::default();
        tokio::spawn(parking.clone().run(poller));
        let kept = Kept {
            root: &root,
            conns: &conns,
            parking: &parking,
        };
        let first = updates.borrow_and_update().clone();
        let generation = match build_generation(&first, &observer, kept, None) {
            Ok(g) => g,
            // Checked in Gateway::start; unreachable in practice.
            Err(e) => return tracing::error!(error = %e, "cannot build worker"),
        };
        let slot: Slot = Arc::new(RwLock::new(Arc::new(generation)));
        for (index, l) in listeners.into_iter().enumerate() {
            match TcpListener::from_std(l) {
                Ok(l) => {
                    tokio::spawn(accept_loop(l, slot.clone(), index, stop.clone()));
                }
                Err(e) => tracing::error!(error = %e, "cannot register listener"),
            }
        }
        let reloads = async {
            while updates.changed().await.is_ok() {
                let next = updates.borrow_and_update().clone();
                let previous = current(&slot);
                match build_generation(&next, &observer, kept, Some(&previous)) {
                    Ok(g) => match slot.write() {
                        Ok(mut s) => *s = Arc::new(g),
                        Err(poisoned) => *poisoned.into_inner() = Arc::new(g),
                    },
                    // Validated by reload(); unreachable in practice.
                    Err(e) => tracing::error!(error = %e, "cannot apply reloaded config"),
                }
            }
        };
        // Idle upstream connections past their idle timeout are closed even when no request
        // comes to take them.
        let sweep = async {
            let mut tick = tokio::time::interval(POOL_SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                for u in &current(&slot).worker.upstreams {
                    u.sweep_idle();
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = reloads => stop.cancelled().await,
            () = sweep => {}
        }
        let worker = current(&slot).worker.clone();
        drop(slot);
        let grace = grace.lock().map(|g| *g).unwrap_or(Duration::from_secs(10));
        if !worker.drained(grace).await {
            worker.root.cancel(CancelReason::Shutdown);
            worker.drained(Duration::from_secs(1)).await;
        }
        // Parked connections hold their worker: closing them ends that cycle even if the
        // parking's own task never saw the stop.
        parking.shutdown();
        observer.log.flush();
    });
}

/// Runs the active health checks of every published configuration on a thread of its own, each
/// reload's replacing the previous one's, until `stop`.
fn spawn_health_checks(
    mut updates: watch::Receiver<Arc<Published>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> io::Result<JoinHandle<()>> {
    on_own_thread("tether-health", async move {
        loop {
            let p = updates.borrow_and_update().clone();
            // Dropped (so aborted) when the next configuration is published.
            let mut checks = tokio::task::JoinSet::new();
            metrics.reset_endpoint_health();
            let targets: Vec<_> = p
                .config
                .upstreams
                .iter()
                .zip(&p.health)
                .filter_map(|(u, state)| {
                    Some(health_check::Target {
                        check: u.health_check.clone()?,
                        state: state.clone()?,
                        config: u.clone(),
                    })
                })
                .collect();
            if !targets.is_empty() {
                match Resolver::new(&p.config.dns) {
                    Ok(resolver) => {
                        for t in targets {
                            health_check::start(&mut checks, t, resolver.clone(), &metrics);
                        }
                    }
                    // Checked when the configuration was loaded.
                    Err(e) => tracing::error!(error = %e, "cannot run the health checks"),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                r = updates.changed() => if r.is_err() { return },
            }
        }
    })
}

/// Looks the discovered names of the published configuration up every interval on a thread of
/// its own, and publishes the configuration anew when their addresses change, until `stop`. A
/// reload starts a round at once (its names may be new).
fn spawn_discovery(
    publisher: Arc<Publisher>,
    mut updates: watch::Receiver<Arc<Published>>,
    stop: CancellationToken,
) -> io::Result<JoinHandle<()>> {
    on_own_thread("tether-discovery", async move {
        loop {
            let p = updates.borrow_and_update().clone();
            let every = match discovery::names(&p.declared) {
                Some((names, every)) => {
                    match Resolver::new(&p.declared.dns) {
                        Ok(resolver) => {
                            let found = tokio::select! {
                                _ = stop.cancelled() => return,
                                found = discovery::lookup(&resolver, &names) => found,
                            };
                            let failed = |name: &str| publisher.metrics.discovery_failed(name);
                            if discovery::learn(&mut lock(&publisher.answers), found, failed) {
                                publisher.rediscovered();
                                // Its own publication is not a reload to answer at once.
                                let _turn = lock(&publisher.turn);
                                if Arc::ptr_eq(&updates.borrow().declared, &p.declared) {
                                    updates.borrow_and_update();
                                }
                            }
                        }
                        // Checked when the configuration was loaded.
                        Err(e) => tracing::error!(error = %e, "cannot run discovery"),
                    }
                    Some(every)
                }
                None => None,
            };
            let wait = async {
                match every {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                () = wait => {}
                r = updates.changed() => if r.is_err() { return },
            }
        }
    })
}

/// Runs `work` on a thread of its own, named `name`, in a current-thread runtime.
fn on_own_thread(
    name: &'static str,
    work: impl Future<Output = ()> + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(work),
                Err(e) => {
                    tracing::error!(error = %e, "cannot build a runtime for the {name} thread")
                }
            }
        })
}

/// What every generation of one worker shares.
#[derive(Clone, Copy)]
struct Kept<'a> {
    root: &'a RequestContext,
    conns: &'a Arc<ConnCount>,
    parking: &'a Arc<Parking>,
}

/// Builds this worker's upstreams for a published configuration. An endpoint the `previous`
/// generation has too, in an upstream of the same name, keeps its passive health, and its pool
/// when the upstream connects alike.
fn build_generation(
    p: &Published,
    observer: &Observer,
    kept: Kept<'_>,
    previous: Option<&Generation>,
) -> Result<Generation, StartError> {
    let resolver = Resolver::new(&p.config.dns).map_err(StartError::Dns)?;
    let mut upstreams = Vec::new();
    for (index, u) in p.config.upstreams.iter().enumerate() {
        let counts = observer.metrics.conn_counts(&u.name);
        let active = p.health.get(index).cloned().flatten();
        // Every worker gets the same counts: the metrics hold them by upstream and endpoint.
        let loads = u.counts_in_flight().then(|| {
            u.addresses
                .iter()
                .map(|a| observer.metrics.endpoint_load(&u.name, &a.to_string()))
                .collect()
        });
        let mut up = Upstream::new(u, resolver.clone(), counts, active, loads)
            .map_err(|source| StartError::UpstreamTls { index, source })?;
        let before = previous.and_then(|g| {
            let i = g.config.upstreams.iter().position(|o| o.name == u.name)?;
            let pools = g.config.upstreams.get(i)?.connects_like(u);
            Some((g.worker.upstreams.get(i)?, pools))
        });
        if let Some((before, pools)) = before {
            up.adopt(before, pools);
        }
        upstreams.push(Arc::new(up));
    }
    Ok(Generation {
        config: p.config.clone(),
        worker: Arc::new(Worker {
            upstreams,
            observer: observer.clone(),
            root: kept.root.clone(),
            conns: kept.conns.clone(),
            parking: kept.parking.clone(),
        }),
        listeners: p.listeners.clone(),
    })
}

async fn accept_loop(listener: TcpListener, slot: Slot, index: usize, stop: CancellationToken) {
    let mut backoff = FIRST_BACKOFF;
    // Failed accepts since the last success: one warning per burst, not one per error.
    let mut failed = 0u64;
    loop {
        // At the connection limit, stop accepting: new clients wait in the listen backlog
        // (and see their connect time out) rather than being accepted and dropped.
        let limit = current(&slot)
            .listeners
            .get(index)
            .and_then(|l| l.conn_limit.clone());
        let permit = match limit {
            Some(limit) => tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                p = limit.acquire() => match p {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
            },
            None => None,
        };
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, client)) => {
                if failed > 0 {
                    tracing::info!(failed, "accepting again");
                    failed = 0;
                }
                backoff = FIRST_BACKOFF;
                // Read after accepting, so a connection that arrives after a reload gets the new
                // generation even when this loop was already waiting.
                let generation = current(&slot);
                let Some(shared) = generation.listeners.get(index).cloned() else {
                    return;
                };
                let worker = generation.worker.clone();
                let guard = worker.conn_guard();
                tokio::spawn(downstream::serve(
                    worker,
                    shared,
                    ConfigSource {
                        slot: slot.clone(),
                        index,
                    },
                    tcp,
                    client,
                    stop.clone(),
                    ConnPermit {
                        _open: guard,
                        _limit: permit,
                    },
                ));
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning on a full fd table (the
                // listener stays readable, so retrying at once would burn a core).
                let kind = accept_error_kind(&e);
                current(&slot).worker.observer.metrics.accept_error(kind);
                if failed == 0 {
                    tracing::warn!(error = %e, kind, "accept failed; backing off until it works again");
                }
                failed += 1;
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// First wait after a failed accept; doubled on each failure in a row up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(5);

/// Longest wait between accepts while they keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The `kind` label of an accept error.
fn accept_error_kind(e: &io::Error) -> &'static str {
    // Linux errno values (std has no ErrorKind for these).
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const ENOBUFS: i32 = 105;
    match e.raw_os_error() {
        Some(EMFILE) => "emfile",
        Some(ENFILE) => "enfile",
        Some(ENOMEM | ENOBUFS) => "enomem",
        _ => "other",
    }
}

/// Where a connection finds the configuration for each new request: its worker's current
/// generation. HTTP/2 connections read it per stream, so streams opened after a reload use the
/// new routes and upstreams while streams in flight keep theirs.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    slot: Slot,
    index: usize,
}

impl ConfigSource {
    /// The current worker and listener settings, or `None` if the listener is gone.
    pub fn current(&self) -> Option<(Arc<Worker>, Arc<ListenerShared>)> {
        let g = current(&self.slot);
        let listener = g.listeners.get(self.index)?.clone();
        Some((g.worker.clone(), listener))
    }
}

fn start_admin(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<(SocketAddr, Arc<AdminState>), StartError> {
    let bind_err = |source| StartError::Bind {
        index: usize::MAX,
        address,
        source,
    };
    let sock = bind(address, ADMIN_BACKLOG).map_err(bind_err)?;
    let addr = sock.local_addr().map_err(bind_err)?;
    let state = Arc::new(AdminState {
        metrics,
        draining: Default::default(),
    });
    let st = state.clone();
    on_own_thread("tether-admin", async move {
        match TcpListener::from_std(sock) {
            Ok(l) => admin::serve(l, st, stop).await,
            Err(e) => tracing::error!(error = %e, "cannot register admin listener"),
        }
    })
    .map_err(StartError::Thread)?;
    Ok((addr, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_limit_resized_below_its_use_withdraws_what_comes_back() {
        let limit = ConnLimit::new(2);
        let (a, b) = (
            limit.acquire().await.unwrap(),
            limit.acquire().await.unwrap(),
        );
        limit.resize(1);
        drop(a);
        // The permit `a` gave back was owed: still no room while `b` is open.
        let more = tokio::time::timeout(Duration::from_millis(50), limit.acquire()).await;
        assert!(more.is_err());
        drop(b);
        let c = limit.acquire().await.unwrap();
        assert_eq!(limit.permits.available_permits(), 0);
        // Lowered and raised again before anything came back: nothing is owed any more.
        limit.resize(0);
        limit.resize(1);
        drop(c);
        assert_eq!(limit.permits.available_permits(), 1);
        limit.resize(3);
        assert_eq!(limit.permits.available_permits(), 3);
    }
}
