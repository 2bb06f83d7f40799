//! TCP: accept on VIP:port, connect to a backend, copy both ways.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tracing::debug;

use crate::userspace::options::ProxyOptions;
use crate::userspace::select::{BackendEntry, Flow, ServiceShared};
use crate::userspace::stats::{DropReason, ServiceCounters};
use crate::userspace::tasks::{accept_loop, idle_expired};

/// Per direction and connection.
const BUF_SIZE: usize = 16 * 1024;

/// A listener on `addr`, which need not be a local address yet (IP_FREEBIND).
/// Must run on the proxy's runtime (in its network namespace).
pub(crate) fn bind(addr: SocketAddrV4, backlog: u32) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_freebind_v4(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V4(addr).into())?;
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
) {
    accept_loop(&svc.clone(), listener, stop, |stream, peer| {
        connection(svc.clone(), stream, peer, opts.clone())
    })
    .await;
}

/// Why a proxied connection ended.
enum End {
    Closed,
    Idle,
}

async fn connection(
    svc: Arc<ServiceShared>,
    client: TcpStream,
    peer: SocketAddrV4,
    opts: Arc<ProxyOptions>,
) {
    let flow = Flow {
        client: peer,
        service: svc.addr,
    };
    let mut tried = Vec::new();
    let mut failure = DropReason::NoBackend;
    for _ in 0..opts.connect_attempts.max(1) {
        let Some(lease) = svc.pick(&flow, &tried) else {
            break;
        };
        let be = lease.backend();
        let connect = TcpStream::connect(SocketAddr::V4(be.addr()));
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
                match pipe(client, upstream, &svc.counters, be, opts.tcp_idle_timeout).await {
                    Ok(End::Closed) => {}
                    Ok(End::Idle) => {
                        svc.counters.idle_timeouts.fetch_add(1, Relaxed);
                        debug!(%peer, backend = %be.addr(), "idle timeout");
                    }
                    Err(e) => debug!(%peer, backend = %be.addr(), "connection ended: {e}"),
                }
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
/// half-close (FIN), and the other direction goes on.
async fn pipe(
    mut client: TcpStream,
    mut upstream: TcpStream,
    svc: &ServiceCounters,
    be: &BackendEntry,
    idle: Duration,
) -> io::Result<End> {
    let start = Instant::now();
    // Milliseconds from `start` to the last data seen.
    let last = AtomicU64::new(0);
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let forward = copy(&mut cr, &mut uw, start, &last, |n| {
        svc.traffic.add_in(n);
        be.counters.traffic.add_in(n);
    });
    let back = copy(&mut ur, &mut cw, start, &last, |n| {
        svc.traffic.add_out(n);
        be.counters.traffic.add_out(n);
    });
    tokio::select! {
        r = async { tokio::try_join!(forward, back) } => r.map(|_| End::Closed),
        () = idle_expired(start, &last, idle) => Ok(End::Idle),
    }
}

async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    start: Instant,
    last: &AtomicU64,
    count: impl Fn(usize),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        count(n);
        last.store(start.elapsed().as_millis() as u64, Relaxed);
        w.write_all(&buf[..n]).await?;
    }
}
