//! The userspace data path: an L4 proxy on the service VIPs, for
//! `--datapath userspace` and as the fallback when eBPF cannot be loaded,
//! and the gRPC (L7) mode, which balances each call (see `grpc`).
//!
//! # Decisions
//!
//! - **Receiving VIP traffic.** Each service gets a socket bound to exactly
//!   VIP:port with `IP_FREEBIND` (so the VIP need not be local yet), and each
//!   VIP gets a route `local <vip>/32 dev lo table local proto 114`
//!   ([`ROUTE_PROTOCOL`]), added over rtnetlink when the first service on the
//!   VIP starts and removed when the last one goes or the proxy shuts down.
//!   With it the kernel delivers the VIP's packets to local sockets instead
//!   of forwarding them, and the service socket can send from the VIP. A VIP
//!   that was local already (an address of the node) is used as is and never
//!   removed. [`UserspaceProxy::start`] also removes routes with that protocol
//!   that a crashed proxy left behind; so run one proxy per namespace.
//! - **Network namespace.** Everything happens in the namespace of the thread
//!   that calls [`UserspaceProxy::start`]: its netlink socket is opened there,
//!   and the proxy's own tokio runtime (a multi-thread runtime, built in
//!   `start`) runs every thread there, entering it on thread start if need
//!   be. Sockets are only made on that runtime, so `apply`, `stats` and
//!   `shutdown` may be called from any thread.
//! - **Sources.** Backends see the node's address as the source, not the
//!   client's: there is no client IP preservation in userspace mode. Clients
//!   see replies from VIP:port (TCP: the accepted socket; UDP: replies are
//!   sent from the service socket).
//! - **TCP.** Accept, pick a backend, connect with a timeout (default 2 s);
//!   a failed connect is retried on another backend, up to
//!   [`ProxyOptions::connect_attempts`] backends, then the client gets a
//!   reset, as the kernel answers a SYN it cannot serve. Then both directions
//!   are copied; an EOF is passed on as a half-close (FIN) while the other
//!   direction goes on. A connection with no data either way for the idle
//!   timeout (default: the established timeout, 6 h) is closed.
//! - **UDP.** One session per client address, with its own socket connected
//!   to the chosen backend. A session idle for the UDP timeout (default 60 s)
//!   expires. Sessions are bounded per service; datagrams that would need one
//!   more are dropped (`drop_sessions_full`).
//! - **Algorithms** are the kernel's (see `select.rs`): random, exact
//!   round-robin, maglev and source-hash on the same Maglev table and hashes,
//!   and exact least-connections. Affinity and weights as in the kernel.
//! - **Changes** apply as a diff. A changed backend set applies to new flows
//!   only; open connections and sessions keep their backend, including one
//!   that was removed or is terminating. A removed service's socket is closed
//!   before `apply` returns, and its open connections and sessions are cut
//!   (its VIP stops being local when its last service goes, so they could not
//!   go on anyway). Sockets are closed before the route goes: without it the
//!   kernel cannot send from the VIP, not even the FIN that tells the client.
//!   [`UserspaceProxy::shutdown`] (or drop) cuts every connection, closes
//!   every socket and removes the routes.
//! - **Scope.** The caller passes the services this proxy should serve. A
//!   service with `grpc: None` is served at L4 (TCP or UDP); one with
//!   `grpc: Some` (TCP only) in the gRPC mode: HTTP/2 is terminated on the
//!   VIP and each call goes to a backend of its own (module `grpc`). Changing
//!   a service between the two modes restarts it (its connections are cut);
//!   a changed gRPC policy applies to new calls.
//! - **Graceful restart.** [`UserspaceProxy::hand_over`] parks every TCP
//!   flow between two writes and returns every socket; a new proxy started
//!   with [`UserspaceProxy::start_with`] serves on them and adopts the VIP
//!   routes (`handover` has the protocol between the two agents).
//! - **Counters** are exact atomics, read by [`UserspaceProxy::stats`].
//!   Active counts include connects in progress (so least-conn sees them).

mod export;
mod grpc;
pub mod handover;
mod l4;
mod options;
mod route;
mod select;
mod stats;
mod tasks;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lb_api::{DesiredState, Protocol, Service, ServiceAddr};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use handover::{Handed, Inherited};
use l4::{tcp, udp};
pub use options::{GrpcOptions, ProxyOptions};
use route::RouteSocket;
use select::{BackendEntry, BackendKey, Selector, ServiceShared};
use tasks::{HandoverCtx, Workers};

pub use export::datapath_snapshot;
pub use route::ROUTE_PROTOCOL;
pub use stats::{
    BackendStats, BackendStatus, CODE_SLOTS, CallStats, DropReason, LATENCY_BUCKETS, ServiceStats,
};

/// How long shutdown waits for the runtime's tasks to finish dropping.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// What an [`UserspaceProxy::apply`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub added: usize,
    pub removed: usize,
    /// Services whose spec changed (backends, algorithm, name, mode, ...).
    pub updated: usize,
    pub unchanged: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("starting the proxy runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("network namespace of the calling thread: {0}")]
    Netns(#[source] io::Error),
    #[error("rtnetlink: {0}")]
    Netlink(#[source] io::Error),
    #[error("duplicate service {0}")]
    DuplicateService(ServiceAddr),
    #[error("service {name} ({addr}): {reason}")]
    InvalidService {
        name: String,
        addr: ServiceAddr,
        reason: String,
    },
    #[error("service {name}: listening on {addr}: {source}")]
    Listen {
        name: String,
        addr: ServiceAddr,
        #[source]
        source: io::Error,
    },
    #[error("local route for {vip}: {source}")]
    Route {
        vip: IpAddr,
        #[source]
        source: io::Error,
    },
    /// Some services could not start or stop; everything else was done.
    #[error("{}", list(.0))]
    Several(Vec<ProxyError>),
    #[error("the userspace proxy has shut down")]
    Closed,
}

fn list(errors: &[ProxyError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The userspace proxy (L4, and the gRPC mode). Dropping it is the same as
/// [`Self::shutdown`], with errors logged.
pub struct UserspaceProxy {
    inner: Arc<Inner>,
    rt: Option<Runtime>,
    /// `per_thread_runtimes`: each worker runtime's thread; it shuts its
    /// runtime down when `stop_workers` turns true.
    worker_threads: Vec<std::thread::JoinHandle<()>>,
    stop_workers: watch::Sender<bool>,
}

impl fmt::Debug for UserspaceProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserspaceProxy")
            .field("opts", &self.inner.opts)
            .field("running", &self.rt.is_some())
            .finish_non_exhaustive()
    }
}

/// Reads the proxy's counters; cheap to clone, usable from any thread, and
/// a [`crate::metrics::StatsSource`] for the metrics.
#[derive(Clone)]
pub struct StatsHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for StatsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatsHandle").finish_non_exhaustive()
    }
}

impl StatsHandle {
    pub fn stats(&self) -> Vec<ServiceStats> {
        self.inner.stats()
    }
}

struct Inner {
    opts: Arc<ProxyOptions>,
    handle: Handle,
    state: Mutex<State>,
    /// One apply at a time.
    apply_lock: tokio::sync::Mutex<()>,
    routes: Option<Mutex<RouteSocket>>,
    /// True pauses every service and flow for a handover.
    pause: watch::Sender<bool>,
    /// What the paused services and flows hand over.
    sink: Arc<Mutex<Vec<Handed>>>,
    /// Sockets from the previous agent, taken by the services that start.
    inherited: Mutex<Option<Inherited>>,
    /// VIP routes the previous agent owned: ours now.
    adopted: HashSet<IpAddr>,
    /// Handed over: leave the routes to the successor.
    keep_routes: AtomicBool,
    /// The per-thread runtimes (`per_thread_runtimes` for L4 TCP,
    /// `grpc_per_thread_runtimes` for the gRPC mode); none if neither.
    workers: Workers,
}

#[derive(Default)]
struct State {
    services: BTreeMap<ServiceAddr, Running>,
    vips: HashMap<IpAddr, VipRoute>,
    closed: bool,
}

struct VipRoute {
    /// Running services on this VIP.
    users: usize,
    /// Whether we added its route (and so remove it).
    owned: bool,
}

/// A service being served.
struct Running {
    spec: Service,
    shared: Arc<ServiceShared>,
    /// Every backend in the spec.
    entries: HashMap<BackendKey, Arc<BackendEntry>>,
    /// Backends gone from the spec that still had open flows.
    retired: Vec<Arc<BackendEntry>>,
    /// gRPC mode: the backends' pooled connections.
    pools: Option<Arc<grpc::Pools>>,
    /// Asks the task to close its socket and flows, and finish.
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The calling thread's network namespace.
struct Netns {
    file: File,
    id: (u64, u64),
}

const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

impl Netns {
    fn current() -> io::Result<Self> {
        let file = File::open(THREAD_NETNS)?;
        let m = file.metadata()?;
        Ok(Netns {
            id: (m.dev(), m.ino()),
            file,
        })
    }

    /// Moves the calling thread into this namespace if it is elsewhere (a
    /// thread inherits its creator's namespace, which is not always ours).
    fn enter_if_elsewhere(&self) {
        if let Ok(m) = std::fs::metadata(THREAD_NETNS)
            && (m.dev(), m.ino()) == self.id
        {
            return;
        }
        // SAFETY: a valid nsfs fd; CLONE_NEWNET changes only this thread.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            error!(
                "userspace proxy thread cannot enter its network namespace: {}",
                io::Error::last_os_error()
            );
        }
    }
}

impl UserspaceProxy {
    /// Starts the proxy, serving nothing yet, in the calling thread's network
    /// namespace (see the module docs). It runs on its own tokio runtime, so
    /// it can be called from inside or outside another runtime.
    pub fn start(opts: ProxyOptions) -> Result<Self, ProxyError> {
        Self::start_with(opts, None)
    }

    /// [`Self::start`], taking over the sockets and VIP routes a previous
    /// agent handed over (`handover`): services that start on the same
    /// address use its socket, and its connections go on.
    pub fn start_with(
        opts: ProxyOptions,
        inherited: Option<Inherited>,
    ) -> Result<Self, ProxyError> {
        let netns = Arc::new(Netns::current().map_err(ProxyError::Netns)?);
        let adopted: HashSet<IpAddr> = inherited
            .as_ref()
            .map(|i| i.vips.iter().copied().collect())
            .unwrap_or_default();
        let routes = if opts.manage_routes {
            let mut rs = RouteSocket::open().map_err(ProxyError::Netlink)?;
            // After a handover the routes are in use: they are adopted.
            let stale = rs.list_local().map_err(ProxyError::Netlink)?;
            for vip in stale.into_iter().filter(|v| !adopted.contains(v)) {
                match rs.del_local(vip) {
                    Ok(_) => warn!(%vip, "removed a VIP route left by an earlier proxy"),
                    Err(e) => {
                        warn!(%vip, "cannot remove a VIP route left by an earlier proxy: {e}")
                    }
                }
            }
            Some(Mutex::new(rs))
        } else {
            None
        };
        let threads = match opts.worker_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        // Per-thread runtimes: the shared one only accepts and applies.
        let shared_threads = if opts.per_thread_runtimes { 1 } else { threads };
        let ns = netns.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(shared_threads)
            .thread_name("rpclb-proxy")
            .enable_all()
            .on_thread_start(move || ns.enter_if_elsewhere())
            .build()
            .map_err(ProxyError::Runtime)?;
        let (stop_workers, stopped) = watch::channel(false);
        let mut handles = Vec::new();
        let mut worker_threads = Vec::new();
        if opts.per_thread_runtimes || opts.grpc_per_thread_runtimes {
            for i in 0..threads {
                let wrt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(ProxyError::Runtime)?;
                handles.push(wrt.handle().clone());
                let (ns, mut stopped) = (netns.clone(), stopped.clone());
                let t = std::thread::Builder::new()
                    .name(format!("rpclb-proxy-w{i}"))
                    .spawn(move || {
                        ns.enter_if_elsewhere();
                        tasks::set_worker(i + 1);
                        wrt.block_on(tasks::stop_requested(&mut stopped));
                        wrt.shutdown_timeout(SHUTDOWN_WAIT);
                    })
                    .map_err(ProxyError::Runtime)?;
                worker_threads.push(t);
            }
        }
        info!(
            threads,
            per_thread_runtimes = opts.per_thread_runtimes,
            grpc_per_thread_runtimes = opts.grpc_per_thread_runtimes,
            manage_routes = opts.manage_routes,
            "userspace proxy started"
        );
        Ok(UserspaceProxy {
            inner: Arc::new(Inner {
                opts: Arc::new(opts),
                handle: rt.handle().clone(),
                state: Mutex::default(),
                apply_lock: tokio::sync::Mutex::new(()),
                routes,
                pause: watch::channel(false).0,
                sink: Arc::default(),
                inherited: Mutex::new(inherited),
                adopted,
                keep_routes: AtomicBool::new(false),
                workers: Workers::new(handles),
            }),
            rt: Some(rt),
            worker_threads,
            stop_workers,
        })
    }

    /// Applies `desired` as a diff against what is served: new services get
    /// a socket (and their VIP a route), removed ones are closed, changed
    /// ones get a new selection for new flows. A service that is invalid
    /// (`lb_api::validate`; what runs at its address keeps running) or that
    /// cannot start (e.g. its port is taken) is reported in
    /// [`ProxyError::Several`] while the rest is applied; the next apply
    /// tries it again.
    ///
    /// Blocks until done (socket and netlink calls, and waiting for removed
    /// services to close). From async code, prefer [`Self::apply_async`].
    pub fn apply(&self, desired: &DesiredState) -> Result<ApplySummary, ProxyError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (inner, desired) = (self.inner.clone(), desired.clone());
        self.inner.handle.spawn(async move {
            let _ = tx.send(inner.apply(desired).await);
        });
        rx.recv().map_err(|_| ProxyError::Closed)?
    }

    /// [`Self::apply`] for async callers.
    pub async fn apply_async(&self, desired: &DesiredState) -> Result<ApplySummary, ProxyError> {
        let (inner, desired) = (self.inner.clone(), desired.clone());
        let task = self.inner.handle.spawn(inner.apply(desired));
        task.await.map_err(|_| ProxyError::Closed)?
    }

    /// Every service's counters, ordered by address.
    pub fn stats(&self) -> Vec<ServiceStats> {
        self.inner.stats()
    }

    /// A handle that reads the counters, e.g. for the metrics.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            inner: self.inner.clone(),
        }
    }

    /// The VIPs whose local route this proxy added, sorted.
    pub fn routes(&self) -> Vec<IpAddr> {
        let st = lock(&self.inner.state);
        let mut v: Vec<IpAddr> = st
            .vips
            .iter()
            .filter(|(_, r)| r.owned)
            .map(|(vip, _)| *vip)
            .collect();
        v.sort();
        v
    }

    /// For a graceful restart: stops accepting, parks every TCP flow, and
    /// returns every socket (dups) with the VIP routes this proxy owns; the
    /// routes then stay when it shuts down. Services or flows that do not
    /// park within `wait` are cut. Blocks; no apply works after it.
    pub fn hand_over(&self, wait: Duration) -> (Vec<Handed>, Vec<IpAddr>) {
        let (tasks, vips): (Vec<(String, tokio::task::AbortHandle)>, Vec<IpAddr>) = {
            let mut st = lock(&self.inner.state);
            st.closed = true;
            let tasks = st
                .services
                .values()
                .map(|r| (r.spec.name.clone(), r.task.abort_handle()))
                .collect();
            let vips = st
                .vips
                .iter()
                .filter(|(_, v)| v.owned)
                .map(|(vip, _)| *vip)
                .collect();
            (tasks, vips)
        };
        self.inner.keep_routes.store(true, Ordering::Relaxed);
        let _ = self.inner.pause.send(true);
        let deadline = Instant::now() + wait;
        while tasks.iter().any(|(_, t)| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for (name, t) in &tasks {
            if !t.is_finished() {
                warn!(service = %name, "handover: not parked in time; its flows are cut");
                t.abort();
            }
        }
        let items = std::mem::take(&mut *lock(&self.inner.sink));
        (items, vips)
    }

    /// Closes what a previous agent handed over that no service took (its
    /// service is gone); returns how many sockets that was.
    pub fn drop_inherited(&self) -> usize {
        lock(&self.inner.inherited)
            .take()
            .map_or(0, |i| i.listeners.len() + i.conns.len())
    }

    /// Stops serving: cuts every connection and session, closes every socket
    /// (all done when this returns, within a few seconds), then removes the
    /// routes it added. Blocks meanwhile; from async code, prefer calling it
    /// in `spawn_blocking`.
    pub fn shutdown(mut self) -> Result<(), ProxyError> {
        self.close()
    }

    fn close(&mut self) -> Result<(), ProxyError> {
        let Some(rt) = self.rt.take() else {
            return Ok(());
        };
        let (services, vips) = {
            let mut st = lock(&self.inner.state);
            st.closed = true;
            (
                std::mem::take(&mut st.services),
                std::mem::take(&mut st.vips),
            )
        };
        // gRPC services first drain: GOAWAY to their clients, and up to
        // `grpc_drain_timeout` for the calls in flight.
        let deadline = services
            .values()
            .map(|r| self.inner.drain_time(&r.spec))
            .max()
            .filter(|d| !d.is_zero())
            .map(|d| Instant::now() + d + Duration::from_millis(500));
        if let Some(deadline) = deadline {
            for r in services.values() {
                let _ = r.stop.send(true);
            }
            while services.values().any(|r| !r.task.is_finished()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        drop(services);
        // Shutting the runtime down drops every task (closing every socket
        // while the VIPs are still local) and waits for that; it must not
        // happen on an async thread, so use a plain one.
        std::thread::scope(|s| {
            let _ = s.spawn(move || rt.shutdown_timeout(SHUTDOWN_WAIT)).join();
        });
        // Then the connections' runtimes, if any: what is left on them goes.
        let _ = self.stop_workers.send(true);
        for t in self.worker_threads.drain(..) {
            let _ = t.join();
        }
        let mut errors = Vec::new();
        if self.inner.keep_routes.load(Ordering::Relaxed) {
            info!(
                vips = vips.len(),
                "userspace proxy handed over; its VIP routes stay"
            );
        } else if let Some(r) = &self.inner.routes {
            let mut r = lock(r);
            for (vip, v) in vips {
                if v.owned
                    && let Err(source) = r.del_local(vip)
                {
                    errors.push(ProxyError::Route { vip, source });
                }
            }
        }
        info!("userspace proxy stopped");
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ProxyError::Several(errors)),
        }
    }
}

impl Drop for UserspaceProxy {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            warn!("userspace proxy shutdown: {e}");
        }
    }
}

/// Removes every VIP route a userspace proxy added in the calling thread's
/// network namespace (for cleanup after a crash); returns their VIPs.
pub fn remove_stale_routes() -> Result<Vec<IpAddr>, ProxyError> {
    let mut rs = RouteSocket::open().map_err(ProxyError::Netlink)?;
    let vips = rs.list_local().map_err(ProxyError::Netlink)?;
    for &vip in &vips {
        rs.del_local(vip)
            .map_err(|source| ProxyError::Route { vip, source })?;
    }
    Ok(vips)
}

impl Inner {
    /// The per-thread runtimes if `on`, else none (connections run on the
    /// shared runtime).
    fn workers_for(&self, on: bool) -> Workers {
        if on {
            self.workers.clone()
        } else {
            Workers::default()
        }
    }

    fn stats(&self) -> Vec<ServiceStats> {
        lock(&self.state)
            .services
            .values()
            .map(Running::stats)
            .collect()
    }

    /// Runs on the proxy's runtime.
    async fn apply(self: Arc<Self>, desired: DesiredState) -> Result<ApplySummary, ProxyError> {
        let _one_at_a_time = self.apply_lock.lock().await;
        // An invalid service is refused alone; what runs at its address
        // keeps running.
        let mut want: BTreeMap<ServiceAddr, &Service> = BTreeMap::new();
        let mut keep: HashSet<ServiceAddr> = HashSet::new();
        let mut failures = Vec::new();
        for s in &desired.services {
            if let Err(e) = s.validate() {
                failures.push(ProxyError::InvalidService {
                    name: s.name.clone(),
                    addr: s.addr(),
                    reason: e.to_string(),
                });
                keep.insert(s.addr());
            } else if let std::collections::btree_map::Entry::Vacant(e) = want.entry(s.addr()) {
                e.insert(s);
            } else {
                failures.push(ProxyError::DuplicateService(s.addr()));
            }
        }
        let mut summary = ApplySummary::default();

        // Removed services first: stop each task and wait until it is gone,
        // so its socket is closed when apply returns. A service that changes
        // between L4 and the gRPC mode is stopped too and started again
        // below, keeping its VIP (and route).
        let (gone, switched): (Vec<Running>, HashSet<ServiceAddr>) = {
            let mut st = lock(&self.state);
            if st.closed {
                return Err(ProxyError::Closed);
            }
            let switched: HashSet<ServiceAddr> = st
                .services
                .iter()
                .filter(|(a, r)| {
                    want.get(a)
                        .is_some_and(|w| w.grpc.is_some() != r.spec.grpc.is_some())
                })
                .map(|(a, _)| *a)
                .collect();
            let addrs: Vec<ServiceAddr> = st
                .services
                .keys()
                .filter(|a| (!want.contains_key(a) && !keep.contains(a)) || switched.contains(a))
                .copied()
                .collect();
            let gone = addrs.iter().filter_map(|a| st.services.remove(a)).collect();
            (gone, switched)
        };
        for r in gone {
            // The task closes every flow's socket before it ends, while the
            // VIP is still local: the kernel cannot send from the VIP (not
            // even a FIN) once its route is gone.
            let _ = r.stop.send(true);
            let mut task = r.task;
            // A gRPC service's calls in flight get up to SHUTDOWN_WAIT of
            // their drain time here (apply must not wait longer); then cut.
            if tokio::time::timeout(SHUTDOWN_WAIT, &mut task)
                .await
                .is_err()
            {
                warn!(service = %r.spec.name, "service task did not stop in time");
                task.abort();
                // Its sockets close when the aborted task is dropped: wait
                // for that too, so that a restarted service can bind again.
                let _ = tokio::time::timeout(SHUTDOWN_WAIT, &mut task).await;
            }
            if switched.contains(&r.spec.addr()) {
                // Its VIP is released after the restart below.
                continue;
            }
            self.release_vip(&mut lock(&self.state), r.spec.vip);
            info!(service = %r.spec.name, addr = %r.spec.addr(), "userspace: service removed");
            summary.removed += 1;
        }

        let mut st = lock(&self.state);
        if st.closed {
            return Err(ProxyError::Closed);
        }
        for (addr, svc) in want {
            match st.services.get_mut(&addr) {
                Some(run) if run.spec == *svc => summary.unchanged += 1,
                Some(run) => match run.update(svc, self.opts.grpc_tls_poll) {
                    Ok(()) => {
                        info!(service = %svc.name, %addr, "userspace: service updated");
                        summary.updated += 1;
                    }
                    Err(reason) => failures.push(ProxyError::InvalidService {
                        name: svc.name.clone(),
                        addr,
                        reason,
                    }),
                },
                None => {
                    let held = switched.contains(&addr);
                    match self.start_service(&mut st, svc) {
                        Ok(()) if held => {
                            info!(service = %svc.name, %addr, grpc = svc.grpc.is_some(),
                                "userspace: service restarted in its new mode");
                            summary.updated += 1;
                        }
                        Ok(()) => {
                            info!(service = %svc.name, %addr, grpc = svc.grpc.is_some(),
                                "userspace: service added");
                            summary.added += 1;
                        }
                        Err(e) => {
                            warn!("userspace: {e}");
                            failures.push(e);
                        }
                    }
                    if held {
                        // The stopped task's hold: the route stayed meanwhile.
                        self.release_vip(&mut st, svc.vip);
                    }
                }
            }
        }
        drop(st);
        if failures.is_empty() {
            Ok(summary)
        } else {
            Err(ProxyError::Several(failures))
        }
    }

    /// Binds the service's socket, makes its VIP local, and starts serving.
    fn start_service(&self, st: &mut State, svc: &Service) -> Result<(), ProxyError> {
        let addr = svc.addr();
        let at = SocketAddr::new(svc.vip, svc.port);
        let listen_err = |source| ProxyError::Listen {
            name: svc.name.clone(),
            addr,
            source,
        };
        let entries = entries_for(svc, &HashMap::new(), &[]);
        let selector =
            Selector::new(svc, &entries).map_err(|reason| ProxyError::InvalidService {
                name: svc.name.clone(),
                addr,
                reason,
            })?;
        let shared = Arc::new(ServiceShared::new(
            addr,
            selector,
            self.opts.max_affinity_entries,
        ));
        shared.set_policy(svc.grpc.clone());
        let (stop, stopped) = watch::channel(false);
        let pools = match &svc.grpc {
            None => None,
            Some(g) => {
                // Missing or bad TLS files refuse the service (it does not
                // start in plaintext instead).
                let p = grpc::Pools::default();
                p.set_tls(g.tls.as_ref(), self.opts.grpc_tls_poll, &svc.name)
                    .map_err(|e| ProxyError::InvalidService {
                        name: svc.name.clone(),
                        addr,
                        reason: format!("grpc.tls: {e}"),
                    })?;
                Some(Arc::new(p))
            }
        };
        let ho = HandoverCtx {
            pause: self.pause.subscribe(),
            sink: self.sink.clone(),
        };
        // The previous agent's socket for this address, and its flows.
        let (inherited, resumed) = self.take_inherited(svc.protocol, at, addr);
        if inherited.is_some() {
            info!(service = %svc.name, %addr, flows = resumed.len(),
                "userspace: took over the previous agent's socket and flows");
        }
        let tcp_listener = |fd: Option<OwnedFd>| match fd {
            Some(fd) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            }
            None => l4::retry_in_use(|| tcp::bind(at, self.opts.listen_backlog)),
        };
        // Bind before the route, so that the first packet finds the socket.
        let task = match (svc.protocol, &pools) {
            (Protocol::Tcp, Some(pools)) => {
                let l = tcp_listener(inherited).map_err(listen_err)?;
                self.acquire_vip(st, svc.vip)?;
                self.handle.spawn(grpc::serve(
                    shared.clone(),
                    pools.clone(),
                    l,
                    self.opts.clone(),
                    stopped,
                    ho,
                    self.workers_for(self.opts.grpc_per_thread_runtimes),
                ))
            }
            (Protocol::Tcp, None) => {
                let l = tcp_listener(inherited).map_err(listen_err)?;
                self.acquire_vip(st, svc.vip)?;
                self.handle.spawn(tcp::serve(
                    shared.clone(),
                    l,
                    self.opts.clone(),
                    stopped,
                    ho,
                    resumed,
                    self.workers_for(self.opts.per_thread_runtimes),
                ))
            }
            (Protocol::Udp, _) => {
                let s = match inherited {
                    Some(fd) => {
                        let s = std::net::UdpSocket::from(fd);
                        s.set_nonblocking(true)
                            .and_then(|()| tokio::net::UdpSocket::from_std(s))
                    }
                    None => l4::retry_in_use(|| udp::bind(at)),
                }
                .map_err(listen_err)?;
                self.acquire_vip(st, svc.vip)?;
                self.handle.spawn(udp::serve(
                    shared.clone(),
                    s,
                    self.opts.clone(),
                    stopped,
                    ho,
                ))
            }
        };
        st.services.insert(
            addr,
            Running {
                spec: svc.clone(),
                shared,
                entries,
                retired: Vec::new(),
                pools,
                stop,
                task,
            },
        );
        Ok(())
    }

    /// The inherited socket at `at` and the flows of service `addr`, if any.
    fn take_inherited(
        &self,
        protocol: Protocol,
        at: SocketAddr,
        addr: ServiceAddr,
    ) -> (Option<OwnedFd>, Vec<Handed>) {
        let mut inh = lock(&self.inherited);
        let Some(inh) = inh.as_mut() else {
            return (None, Vec::new());
        };
        let fd = inh.listeners.remove(&(protocol, at));
        let (mine, rest): (Vec<Handed>, Vec<Handed>) = std::mem::take(&mut inh.conns)
            .into_iter()
            .partition(|h| matches!(h, Handed::Conn { service, .. } if *service == addr));
        inh.conns = rest;
        (fd, mine)
    }

    fn acquire_vip(&self, st: &mut State, vip: IpAddr) -> Result<(), ProxyError> {
        if let Some(v) = st.vips.get_mut(&vip) {
            v.users += 1;
            return Ok(());
        }
        let owned = match &self.routes {
            Some(r) => {
                lock(r)
                    .add_local(vip)
                    .map_err(|source| ProxyError::Route { vip, source })?
                    || self.adopted.contains(&vip)
            }
            None => false,
        };
        if !owned && self.routes.is_some() {
            debug!(%vip, "VIP is local already; its route is left alone");
        }
        st.vips.insert(vip, VipRoute { users: 1, owned });
        Ok(())
    }

    /// How long a stopped service may take to end its connections itself:
    /// the drain time of a gRPC service, nothing for L4 ones.
    fn drain_time(&self, spec: &Service) -> Duration {
        if spec.grpc.is_some() {
            self.opts.grpc_drain_timeout
        } else {
            Duration::ZERO
        }
    }

    fn release_vip(&self, st: &mut State, vip: IpAddr) {
        let Some(v) = st.vips.get_mut(&vip) else {
            return;
        };
        v.users -= 1;
        if v.users > 0 {
            return;
        }
        let owned = st.vips.remove(&vip).is_some_and(|v| v.owned);
        if let (true, Some(r)) = (owned, &self.routes)
            && let Err(e) = lock(r).del_local(vip)
        {
            warn!(%vip, "removing the VIP route: {e}");
        }
    }
}

/// The entries for `svc`'s backends: the current one for each ip:port, or a
/// retired one coming back (its counters go on), or a new one.
fn entries_for(
    svc: &Service,
    current: &HashMap<BackendKey, Arc<BackendEntry>>,
    retired: &[Arc<BackendEntry>],
) -> HashMap<BackendKey, Arc<BackendEntry>> {
    let mut next = HashMap::new();
    for b in &svc.backends {
        let k = (b.ip, b.port);
        if next.contains_key(&k) {
            continue;
        }
        let e = current
            .get(&k)
            .or_else(|| retired.iter().find(|e| e.key() == k))
            .cloned()
            .unwrap_or_else(|| Arc::new(BackendEntry::new(b.ip, b.port)));
        next.insert(k, e);
    }
    next
}

impl Running {
    /// A new spec for the same address (and mode): new flows use the new
    /// selection, new gRPC calls the new policy.
    fn update(&mut self, svc: &Service, tls_poll: Duration) -> Result<(), String> {
        let next = entries_for(svc, &self.entries, &self.retired);
        let selector = Selector::new(svc, &next)?;
        // New TLS settings first: bad files refuse the change, and the
        // service goes on as it was.
        if let (Some(pools), Some(g)) = (&self.pools, &svc.grpc) {
            pools
                .set_tls(g.tls.as_ref(), tls_poll, &svc.name)
                .map_err(|e| format!("grpc.tls: {e}"))?;
        }
        // Pools of backends that take no new calls let their connection go
        // (it closes once its calls are done); the others (spill backends
        // included) may connect.
        let (live, _) = selector.with_spill();
        let live: HashSet<BackendKey> = live.iter().map(|e| e.key()).collect();
        self.shared.set_selector(selector);
        self.shared.set_policy(svc.grpc.clone());
        let old = std::mem::replace(&mut self.entries, next);
        self.retired.extend(
            old.into_values()
                .filter(|e| !self.entries.contains_key(&e.key())),
        );
        self.retired
            .retain(|e| !self.entries.contains_key(&e.key()) && e.counters.in_use());
        if let Some(pools) = &self.pools {
            let known: HashSet<BackendKey> = self
                .entries
                .keys()
                .copied()
                .chain(self.retired.iter().map(|e| e.key()))
                .collect();
            pools.update(&live, &known);
        }
        self.spec = svc.clone();
        Ok(())
    }

    fn stats(&self) -> ServiceStats {
        let mut seen = HashSet::new();
        let mut backends = Vec::new();
        for b in &self.spec.backends {
            let k = (b.ip, b.port);
            if !seen.insert(k) {
                continue;
            }
            if let Some(e) = self.entries.get(&k) {
                let status = if b.takes_new_flows() {
                    BackendStatus::Active
                } else {
                    BackendStatus::Draining
                };
                backends.push(stats::backend_stats(
                    b.ip,
                    b.port,
                    b.weight,
                    status,
                    self.spec.limit_of(b),
                    &e.counters,
                ));
            }
        }
        for e in &self.retired {
            if e.counters.in_use() {
                backends.push(stats::backend_stats(
                    e.ip,
                    e.port,
                    0,
                    BackendStatus::Removed,
                    None,
                    &e.counters,
                ));
            }
        }
        let mut s = stats::service_stats(
            &self.spec.name,
            self.spec.addr(),
            self.spec.algorithm,
            self.spec.grpc.as_ref(),
            &self.shared.counters,
            backends,
        );
        if let Some(p) = &self.pools {
            (s.tls_reloads, s.tls_reload_errors) = p.tls_reloads();
            if let Some(g) = &self.spec.grpc {
                p.orca_stats(g, &mut s.backends);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn several_errors_name_each() {
        let vip = Ipv4Addr::new(10, 96, 0, 1).into();
        let e = ProxyError::Several(vec![
            ProxyError::Route {
                vip,
                source: io::Error::from_raw_os_error(libc::EPERM),
            },
            ProxyError::Closed,
        ]);
        let s = e.to_string();
        assert!(s.starts_with("local route for 10.96.0.1: "), "{s}");
        assert!(s.ends_with("; the userspace proxy has shut down"), "{s}");
    }
}
