//! TCP: accept on VIP:port, connect to a backend, copy both ways.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use socket2::{SockRef, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tracing::{debug, warn};

use crate::userspace::handover::Handed;
use crate::userspace::options::ProxyOptions;
use crate::userspace::select::{BackendEntry, Flow, ServiceShared};
use crate::userspace::stats::{DropReason, ServiceCounters};
use crate::userspace::tasks::{
    ConnTask, HandoverCtx, Workers, accept_loop_on, idle_expired, pause_requested,
};

/// Per direction and connection.
const BUF_SIZE: usize = 16 * 1024;

/// A listener on `addr`, which need not be a local address yet (IP_FREEBIND).
/// Must run on the proxy's runtime (in its network namespace).
pub(crate) fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let s = super::bound_freebind(addr, Type::STREAM, socket2::Protocol::TCP)?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(s.into())
}

/// Accepts until `stop` turns true (or its sender goes), then closes the
/// listener and every connection and returns. Aborting drops them too, but
/// without waiting for the connections.
pub(crate) async fn serve(
    svc: Arc<ServiceShared>,
    listener: TcpListener,
    opts: Arc<ProxyOptions>,
    stop: watch::Receiver<bool>,
    ho: HandoverCtx,
    resumed: Vec<Handed>,
    workers: Workers,
) {
    let initial: Vec<ConnTask> = resumed
        .into_iter()
        .map(|h| Box::pin(resume(svc.clone(), h, opts.clone(), ho.clone())) as ConnTask)
        .collect();
    accept_loop_on(
        &workers,
        &svc.clone(),
        listener,
        stop,
        ho.clone(),
        true,
        initial,
        Duration::ZERO,
        |stream, peer| connection(svc.clone(), stream, peer, opts.clone(), ho.clone()),
    )
    .await;
}

/// Why a proxied connection ended.
enum End {
    Closed,
    Idle,
    /// Parked for a handover; which directions had passed their EOF on.
    Parked {
        client_done: bool,
        upstream_done: bool,
    },
}

/// A connection handed over by the previous agent: copying goes on with
/// the same backend.
async fn resume(svc: Arc<ServiceShared>, h: Handed, opts: Arc<ProxyOptions>, ho: HandoverCtx) {
    let Handed::Conn {
        backend,
        client,
        upstream,
        client_done,
        upstream_done,
        ..
    } = h
    else {
        return;
    };
    let stream = |fd: OwnedFd| -> io::Result<TcpStream> {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)?;
        TcpStream::from_std(s)
    };
    let (client, upstream) = match (stream(client), stream(upstream)) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            warn!(service = %svc.addr, %backend, "resuming a handed-over connection: {e}");
            return;
        }
    };
    let (lease, _open) = svc.resume(backend);
    let peer = client.peer_addr().ok();
    run_pipe(
        &svc,
        client,
        upstream,
        lease.backend(),
        &opts,
        (client_done, upstream_done),
        &ho,
        peer,
    )
    .await;
}

/// Copies until the end, and hands the sockets over if a handover parks it.
#[allow(clippy::too_many_arguments)]
async fn run_pipe(
    svc: &Arc<ServiceShared>,
    mut client: TcpStream,
    mut upstream: TcpStream,
    be: &BackendEntry,
    opts: &ProxyOptions,
    done: (bool, bool),
    ho: &HandoverCtx,
    peer: Option<SocketAddr>,
) {
    let r = pipe(
        &mut client,
        &mut upstream,
        &svc.counters,
        be,
        opts.tcp_idle_timeout,
        done,
        ho.pause.clone(),
    )
    .await;
    match r {
        Ok(End::Closed) => {}
        Ok(End::Idle) => {
            svc.counters.idle_timeouts.fetch_add(1, Relaxed);
            debug!(?peer, backend = %be.addr(), "idle timeout");
        }
        Ok(End::Parked {
            client_done,
            upstream_done,
        }) => match (
            client.as_fd().try_clone_to_owned(),
            upstream.as_fd().try_clone_to_owned(),
        ) {
            (Ok(c), Ok(u)) => ho.give(Handed::Conn {
                service: svc.addr,
                backend: be.addr(),
                client: c,
                upstream: u,
                client_done,
                upstream_done,
            }),
            (Err(e), _) | (_, Err(e)) => {
                warn!(?peer, backend = %be.addr(), "handover: dup of a connection: {e}")
            }
        },
        Err(e) => debug!(?peer, backend = %be.addr(), "connection ended: {e}"),
    }
}

async fn connection(
    svc: Arc<ServiceShared>,
    client: TcpStream,
    peer: SocketAddr,
    opts: Arc<ProxyOptions>,
    ho: HandoverCtx,
) {
    let flow = Flow {
        client: peer,
        service: svc.addr,
    };
    let mut tried = Vec::new();
    let mut failure = DropReason::NoBackend;
    for _ in 0..opts.connect_attempts.max(1) {
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
        let connect = TcpStream::connect(be.addr());
        let res = if opts.connect_timeout.is_zero() {
            Ok(connect.await)
        } else {
            timeout(opts.connect_timeout, connect).await
        };
        match res {
            Ok(Ok(upstream)) => {
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _open = svc.opened(be);
                let peer = Some(peer);
                run_pipe(&svc, client, upstream, be, &opts, (false, false), &ho, peer).await;
                return;
            }
            Ok(Err(e)) => {
                debug!(%peer, backend = %be.addr(), "connect: {e}");
                failure = DropReason::ConnectFailed;
            }
            Err(_) => {
                debug!(%peer, backend = %be.addr(), "connect timed out");
                failure = DropReason::ConnectTimeout;
            }
        }
        svc.counters.connect_failed(&be.counters);
        tried.push(be.key());
    }
    svc.counters.dropped(failure);
    debug!(%peer, service = %svc.addr, reason = failure.as_str(), "dropped");
    // Reset rather than close, as the kernel path answers a SYN it cannot
    // serve: the client fails at once.
    let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
}

/// Copies both ways until both sides have closed, an error, or `idle` with
/// no data either way (zero: no idle limit). A side's EOF is passed on as a
/// half-close (FIN), and the other direction goes on. `done`: the
/// directions (client to backend, back) that finished before. On `pause`,
/// each direction stops between a write and the next read: nothing is held
/// in userspace, and the sockets can be handed over.
async fn pipe(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    svc: &ServiceCounters,
    be: &BackendEntry,
    idle: Duration,
    done: (bool, bool),
    pause: watch::Receiver<bool>,
) -> io::Result<End> {
    let start = Instant::now();
    // Milliseconds from `start` to the last data seen.
    let last = AtomicU64::new(0);
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let forward = copy(&mut cr, &mut uw, start, &last, done.0, pause.clone(), |n| {
        svc.traffic.add_in(n);
        be.counters.traffic.add_in(n);
    });
    let back = copy(&mut ur, &mut cw, start, &last, done.1, pause, |n| {
        svc.traffic.add_out(n);
        be.counters.traffic.add_out(n);
    });
    tokio::select! {
        r = async { tokio::try_join!(forward, back) } => r.map(|(f, b)| {
            if f && b {
                End::Closed
            } else {
                End::Parked { client_done: f, upstream_done: b }
            }
        }),
        () = idle_expired(start, &last, idle) => Ok(End::Idle),
    }
}

/// One direction; `Ok(true)` once the EOF is passed on, `Ok(false)` when
/// parked by a handover.
async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    start: Instant,
    last: &AtomicU64,
    done: bool,
    mut pause: watch::Receiver<bool>,
    count: impl Fn(usize),
) -> io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if done {
        return Ok(true);
    }
    // Not zeroed: `read_buf` fills the spare capacity (for a new
    // connection, zeroing two buffers cost more than its first exchange).
    let mut buf: Vec<u8> = Vec::with_capacity(BUF_SIZE);
    // One wait for the pause per direction, not one per read: making and
    // dropping it around every read showed in the profile.
    let paused = pause_requested(&mut pause);
    tokio::pin!(paused);
    loop {
        buf.clear();
        // `read_buf` is cancel-safe: parked before it, no byte was taken.
        let n = tokio::select! {
            biased;
            () = &mut paused => return Ok(false),
            n = r.read_buf(&mut buf) => n?,
        };
        if n == 0 {
            w.shutdown().await?;
            return Ok(true);
        }
        count(n);
        last.store(start.elapsed().as_millis() as u64, Relaxed);
        w.write_all(&buf[..n]).await?;
    }
}
