//! UDP: one session per client address, each with its own socket connected
//! to the chosen backend. Replies go back through the service's socket, so
//! they leave from VIP:port.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use socket2::{SockRef, Type};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};
use tracing::{debug, error};

use crate::userspace::options::ProxyOptions;
use crate::userspace::select::{Flow, Lease, Opened, ServiceShared};
use crate::userspace::stats::DropReason;
use crate::userspace::tasks::{HandoverCtx, idle_expired, pause_requested, stop_requested};

/// Larger than any UDP payload (65,507 bytes over IPv4).
const MAX_DATAGRAM: usize = 65_536;
/// Replies relayed per wake-up before the session task yields.
const BURST: usize = 64;

/// The service's socket on `addr`, which need not be local yet (IP_FREEBIND).
pub(crate) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = super::bound_freebind(addr, Type::DGRAM, socket2::Protocol::UDP)?;
    UdpSocket::from_std(s.into())
}

struct Session {
    upstream: UdpSocket,
    lease: Lease,
    _open: Opened,
    /// Milliseconds from the service's start to the last datagram either way.
    last: AtomicU64,
}

/// What a service's receive loop shares with its session tasks.
struct Shared {
    svc: Arc<ServiceShared>,
    opts: Arc<ProxyOptions>,
    /// The service's socket, on VIP:port.
    sock: UdpSocket,
    sessions: Mutex<HashMap<SocketAddr, Arc<Session>>>,
    /// Zero of the sessions' `last` clocks.
    start: Instant,
}

impl Shared {
    fn sessions(&self) -> MutexGuard<'_, HashMap<SocketAddr, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// Receives until `stop` turns true (or its sender goes), then closes the
/// socket and every session and returns. Aborting drops them too, but
/// without waiting for the sessions.
pub(crate) async fn serve(
    svc: Arc<ServiceShared>,
    sock: UdpSocket,
    opts: Arc<ProxyOptions>,
    mut stop: watch::Receiver<bool>,
    ho: HandoverCtx,
) {
    let mut pause = ho.pause.clone();
    let sh = Arc::new(Shared {
        svc,
        opts,
        sock,
        sessions: Mutex::default(),
        start: Instant::now(),
    });
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            () = stop_requested(&mut stop) => break,
            // The service socket goes to the next agent; sessions end here.
            () = pause_requested(&mut pause) => {
                ho.give_listener(lb_api::Protocol::Udp, &sh.svc, &sh.sock);
                break;
            }
            r = sh.sock.recv_from(&mut buf) => match r {
                Ok((n, client)) => {
                    if let Some(new) = forward(&sh, client, &buf[..n]) {
                        tasks.spawn(relay(sh.clone(), client, new));
                    }
                }
                Err(e) => {
                    debug!(service = %sh.svc.addr, "recv: {e}");
                    // A persistent error must not spin.
                    sleep(Duration::from_millis(10)).await;
                }
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done && e.is_panic() {
                    error!(service = %sh.svc.addr, "session task panicked: {e}");
                }
            }
        }
    }
    tasks.shutdown().await;
    sh.sessions().clear();
}

/// Passes a client's datagram on, through its session or a new one; returns
/// the new session, whose replies need relaying.
fn forward(sh: &Shared, client: SocketAddr, datagram: &[u8]) -> Option<Arc<Session>> {
    let found = sh.sessions().get(&client).cloned();
    let (s, new) = match found {
        Some(s) => (s, None),
        None => {
            let s = open(sh, client)?;
            (s.clone(), Some(s))
        }
    };
    let be = s.lease.backend();
    match send(&s.upstream, datagram, None) {
        Ok(_) => {
            sh.svc.counters.traffic.add_in(datagram.len());
            be.counters.traffic.add_in(datagram.len());
            s.last.store(sh.now_ms(), Relaxed);
        }
        Err(e) => {
            sh.svc.counters.dropped(DropReason::SendFailed);
            debug!(%client, backend = %be.addr(), "send: {e}");
        }
    }
    new
}

/// A new session for `client`, or `None` (counted) if it cannot have one.
fn open(sh: &Shared, client: SocketAddr) -> Option<Arc<Session>> {
    let svc = &sh.svc;
    if sh.sessions().len() >= sh.opts.max_udp_sessions {
        svc.counters.dropped(DropReason::SessionsFull);
        return None;
    }
    let flow = Flow {
        client,
        service: svc.addr,
    };
    let mut tried = Vec::new();
    let mut failure = DropReason::NoBackend;
    for _ in 0..sh.opts.connect_attempts.max(1) {
        let lease = match svc.try_pick(&flow, &tried) {
            Ok(l) => l,
            Err(r) => {
                // All full at the first pick; after failures, the last failure.
                if tried.is_empty() {
                    failure = r;
                }
                break;
            }
        };
        let be = lease.backend();
        match connect(be.addr()) {
            Ok(upstream) => {
                let s = Arc::new(Session {
                    upstream,
                    _open: svc.opened(be),
                    lease,
                    last: AtomicU64::new(sh.now_ms()),
                });
                sh.sessions().insert(client, s.clone());
                return Some(s);
            }
            Err(e) => {
                debug!(%client, backend = %be.addr(), "udp connect: {e}");
                failure = DropReason::ConnectFailed;
                svc.counters.connect_failed(&be.counters);
                tried.push(be.key());
            }
        }
    }
    svc.counters.dropped(failure);
    None
}

/// A plain non-blocking send. Tokio's `try_send` would also refuse while the
/// reactor has not yet reported the socket writable, as with a new session's
/// socket before its first event; this fails only when the buffer is full.
fn send(sock: &UdpSocket, data: &[u8], to: Option<SocketAddr>) -> io::Result<usize> {
    let s = SockRef::from(sock);
    match to {
        Some(to) => s.send_to(data, &to.into()),
        None => s.send(data),
    }
}

fn connect(backend: SocketAddr) -> io::Result<UdpSocket> {
    let any: IpAddr = match backend {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let s = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
    s.connect(backend)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// Relays the backend's replies to the client until the session is idle,
/// then ends the session.
async fn relay(sh: Arc<Shared>, client: SocketAddr, s: Arc<Session>) {
    loop {
        tokio::select! {
            r = s.upstream.readable() => match r {
                Ok(()) => pass_replies(&sh, client, &s),
                Err(e) => {
                    debug!(%client, "upstream: {e}");
                    break;
                }
            },
            () = idle_expired(sh.start, &s.last, sh.opts.udp_idle_timeout) => {
                sh.svc.counters.idle_timeouts.fetch_add(1, Relaxed);
                break;
            }
        }
    }
    let mut m = sh.sessions();
    if m.get(&client).is_some_and(|x| Arc::ptr_eq(x, &s)) {
        m.remove(&client);
    }
}

fn pass_replies(sh: &Shared, client: SocketAddr, s: &Session) {
    thread_local! {
        static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_DATAGRAM]);
    }
    let be = s.lease.backend();
    BUF.with_borrow_mut(|buf| {
        for _ in 0..BURST {
            match s.upstream.try_recv(buf) {
                Ok(n) => match send(&sh.sock, &buf[..n], Some(client)) {
                    Ok(_) => {
                        sh.svc.counters.traffic.add_out(n);
                        be.counters.traffic.add_out(n);
                        s.last.store(sh.now_ms(), Relaxed);
                    }
                    Err(e) => {
                        sh.svc.counters.dropped(DropReason::SendFailed);
                        debug!(%client, "reply: {e}");
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP errors from the backend (port unreachable) surface
                // here; the session stays, as a conntrack entry would.
                Err(e) => debug!(%client, backend = %be.addr(), "upstream: {e}"),
            }
        }
    });
}
