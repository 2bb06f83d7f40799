//! What every serving task (L4 and gRPC) shares: the accept loop and the
//! waits it selects on.

use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, warn};

use super::select::ServiceShared;
use super::stats::DropReason;

/// Accepts until `stop` turns true (or its sender goes), running `conn` on
/// a task of its own for each IPv4 client; then closes the listener and
/// every connection, and returns.
pub(crate) async fn accept_loop<F, Fut>(
    svc: &ServiceShared,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    mut conn: F,
) where
    F: FnMut(TcpStream, SocketAddrV4) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stop_requested(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, SocketAddr::V4(peer))) => {
                    conns.spawn(conn(stream, peer));
                }
                Ok((_, peer)) => debug!(%peer, "not IPv4, closed"),
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
