//! What every serving task (L4 and gRPC) shares: the accept loop and the
//! waits it selects on.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lb_api::Protocol;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, warn};

use super::handover::Handed;
use super::select::ServiceShared;
use super::stats::DropReason;

/// A connection task started with the service (a resumed one).
pub(crate) type ConnTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The proxy-wide handover: when `pause` turns true, every service gives
/// its socket (a dup) to `sink`, and every TCP flow parks and gives its
/// two sockets too (see `handover`).
#[derive(Clone, Debug)]
pub(crate) struct HandoverCtx {
    pub(crate) pause: watch::Receiver<bool>,
    pub(crate) sink: Arc<Mutex<Vec<Handed>>>,
}

impl HandoverCtx {
    pub(crate) fn give(&self, h: Handed) {
        self.sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(h);
    }

    /// Gives a dup of a service's socket.
    pub(crate) fn give_listener(&self, protocol: Protocol, svc: &ServiceShared, s: &impl AsFd) {
        match s.as_fd().try_clone_to_owned() {
            Ok(fd) => self.give(Handed::Listener {
                protocol,
                addr: SocketAddr::new(svc.addr.vip, svc.addr.port),
                fd,
            }),
            Err(e) => error!(service = %svc.addr, "handover: dup of the service socket: {e}"),
        }
    }
}

thread_local! {
    /// Which worker runtime this thread runs: 1.. for the per-thread
    /// runtimes' threads, 0 elsewhere (the shared runtime).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as worker `i` (1..); see [`worker`].
pub(crate) fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The worker runtime of this thread (0: the shared runtime). Per-thread
/// state (the gRPC mode's per-worker pools) is keyed by it, so that a call
/// and its backend connection run on the same thread.
pub(crate) fn worker() -> usize {
    WORKER.with(std::cell::Cell::get)
}

/// The single-threaded runtimes that run TCP connections
/// (`ProxyOptions::per_thread_runtimes`, `grpc_per_thread_runtimes`);
/// none: they run where they are accepted.
#[derive(Clone, Debug, Default)]
pub(crate) struct Workers(Arc<WorkersInner>);

#[derive(Debug, Default)]
struct WorkersInner {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    pub(crate) fn new(handles: Vec<Handle>) -> Self {
        Workers(Arc::new(WorkersInner {
            handles,
            next: AtomicUsize::new(0),
        }))
    }

    /// The next runtime in turn, if there are any.
    fn next(&self) -> Option<&Handle> {
        let h = &self.0.handles;
        (!h.is_empty()).then(|| &h[self.0.next.fetch_add(1, Relaxed) % h.len()])
    }
}

/// `s`, registered with the reactor of `h` instead of the current one.
fn rebind(s: TcpStream, h: &Handle) -> std::io::Result<TcpStream> {
    let s = s.into_std()?;
    let _in = h.enter();
    TcpStream::from_std(s)
}

/// Resolves once a handover pauses the proxy; never if its sender is gone.
pub(crate) async fn pause_requested(pause: &mut watch::Receiver<bool>) {
    if pause.wait_for(|p| *p).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Accepts until `stop` turns true (or its sender goes), running `conn` on
/// a task of its own for each client, on the next of `workers` (if
/// any) in turn, else here; then closes the listener and
/// every connection, and returns. `initial` run from the start (resumed
/// connections). On a handover pause the listener is handed over and, with
/// `park`, the connections are waited for (they park and hand themselves
/// over); without, they are closed. On a stop, connections get `linger`
/// to end by themselves.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn accept_loop_on<F, Fut>(
    workers: &Workers,
    svc: &ServiceShared,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    ho: HandoverCtx,
    park: bool,
    initial: Vec<ConnTask>,
    linger: Duration,
    mut conn: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    for t in initial {
        conns.spawn(t);
    }
    let mut pause = ho.pause.clone();
    loop {
        tokio::select! {
            () = stop_requested(&mut stop) => break,
            () = pause_requested(&mut pause) => {
                ho.give_listener(Protocol::Tcp, svc, &listener);
                drop(listener);
                if park {
                    while conns.join_next().await.is_some() {}
                } else {
                    conns.shutdown().await;
                }
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match workers.next() {
                    Some(h) => match rebind(stream, h) {
                        Ok(stream) => {
                            conns.spawn_on(conn(stream, peer), h);
                        }
                        Err(e) => debug!(%peer, "moving a connection to its worker: {e}"),
                    },
                    None => {
                        conns.spawn(conn(stream, peer));
                    }
                },
                Err(e) => {
                    svc.counters.dropped(DropReason::AcceptFailed);
                    warn!(service = %svc.addr, "accept: {e}");
                    // Out of fds or memory: back off instead of spinning.
                    sleep(Duration::from_millis(50)).await;
                }
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done && e.is_panic() {
                    error!(service = %svc.addr, "connection task panicked: {e}");
                }
            }
        }
    }
    drop(listener);
    // Connections that end themselves on a stop (the gRPC mode's GOAWAY)
    // get `linger` to do so; what is left is cut.
    if !linger.is_zero() {
        let _ = tokio::time::timeout(linger, async { while conns.join_next().await.is_some() {} })
            .await;
    }
    conns.shutdown().await;
}

/// Resolves once `stop` is true or its sender is gone.
pub(crate) async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Resolves once nothing was seen for `idle`; never if `idle` is zero.
pub(crate) async fn idle_expired(start: Instant, last: &AtomicU64, idle: Duration) {
    if idle.is_zero() {
        return std::future::pending().await;
    }
    loop {
        let seen = Duration::from_millis(last.load(Relaxed));
        let Some(at) = start.checked_add(seen).and_then(|t| t.checked_add(idle)) else {
            return std::future::pending().await;
        };
        if Instant::now() >= at {
            return;
        }
        sleep_until(at).await;
    }
}
