//! Pooled HTTP/2 connections to one backend.
//!
//! One connection per backend carries all its calls (HTTP/2 multiplexes
//! them; past the backend's stream limit they queue in hyper). It is opened
//! on the first call, replaced when it closes, and shared by the calls that
//! wait while it is being opened: a failed connect fails them too, so a dead
//! backend costs each waiting call one connect timeout at most.
//!
//! Draining (backend terminating, weight 0 or removed): the pool lets go of
//! its connection and refuses new calls; calls in flight keep the connection
//! (hyper keeps it while any stream is open) and it closes when they are done.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use super::body::UpBody;
use crate::userspace::stats::BackendCounters;

/// HTTP/2 PINGs on busy backend connections, so a backend that vanished
/// without a FIN is noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type Sender = SendRequest<UpBody>;

/// Why no connection could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect: {0}")]
    Connect(String),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(String),
    /// Not a failure: the backend takes no new calls.
    #[error("the backend is draining")]
    Draining,
}

#[derive(Debug, Default)]
struct Conn {
    sender: Option<Sender>,
    /// Only changed under this lock, so that a connect that ends after a
    /// drain never stores its connection.
    draining: bool,
}

/// A backend's connections; empty (and inert) for L4 services.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    /// The connection; held only to look or swap, never across an await.
    conn: Mutex<Conn>,
    /// One connect at a time; holds the last failure, for the calls that
    /// waited on it.
    connecting: tokio::sync::Mutex<Option<(Instant, ConnectError)>>,
}

fn lock(m: &Mutex<Conn>) -> MutexGuard<'_, Conn> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    /// A sender on the backend's connection, opening one if needed; the
    /// connect (TCP and HTTP/2 handshake) is bounded by `timeout` (zero: none).
    pub(crate) async fn get(
        &self,
        addr: SocketAddrV4,
        counters: &Arc<BackendCounters>,
        timeout: Duration,
    ) -> Result<Sender, ConnectError> {
        if let Some(s) = self.ready(addr)? {
            return Ok(s);
        }
        let asked = Instant::now();
        let mut failed = self.connecting.lock().await;
        // Connected (or drained) while this call waited?
        if let Some(s) = self.ready(addr)? {
            return Ok(s);
        }
        if let Some((at, e)) = &*failed
            && *at >= asked
        {
            return Err(e.clone());
        }
        let res = if timeout.is_zero() {
            connect(addr, counters).await
        } else {
            tokio::time::timeout(timeout, connect(addr, counters))
                .await
                .unwrap_or(Err(ConnectError::Timeout))
        };
        match res {
            Ok(s) => {
                *failed = None;
                let mut c = lock(&self.conn);
                if c.draining {
                    // Drained while connecting: the new connection closes unused.
                    return Err(ConnectError::Draining);
                }
                c.sender = Some(s.clone());
                Ok(s)
            }
            Err(e) => {
                *failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// The open connection, if any; an error if draining.
    fn ready(&self, addr: SocketAddrV4) -> Result<Option<Sender>, ConnectError> {
        let mut c = lock(&self.conn);
        if c.draining {
            return Err(ConnectError::Draining);
        }
        match &c.sender {
            Some(s) if !s.is_closed() => Ok(Some(s.clone())),
            Some(_) => {
                debug!(backend = %addr, "gRPC backend connection closed; reconnecting");
                c.sender = None;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// No new calls; the idle connection goes now, a busy one when its calls
    /// are done.
    pub(crate) fn drain(&self) {
        let mut c = lock(&self.conn);
        c.draining = true;
        c.sender = None;
    }

    /// New calls again (the backend is back in service).
    pub(crate) fn undrain(&self) {
        lock(&self.conn).draining = false;
    }

    #[cfg(test)]
    pub(crate) fn is_draining(&self) -> bool {
        lock(&self.conn).draining
    }

    #[cfg(test)]
    fn has_connection(&self) -> bool {
        lock(&self.conn).sender.is_some()
    }
}

async fn connect(
    addr: SocketAddrV4,
    counters: &Arc<BackendCounters>,
) -> Result<Sender, ConnectError> {
    let tcp = TcpStream::connect(SocketAddr::V4(addr))
        .await
        .map_err(|e| ConnectError::Connect(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let io = BackendIo {
        io: tcp,
        _open: OpenConn::new(counters.clone()),
    };
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    counters.new.fetch_add(1, Relaxed);
    // Dispatches the calls; the socket itself lives in a task of hyper's and
    // closes when no sender and no stream is left.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(backend = %addr, "gRPC backend connection: {e}");
        }
    });
    Ok(sender)
}

/// Counts an open backend connection until its socket is dropped.
#[derive(Debug)]
struct OpenConn(Arc<BackendCounters>);

impl OpenConn {
    fn new(c: Arc<BackendCounters>) -> Self {
        c.active.fetch_add(1, Relaxed);
        OpenConn(c)
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// A backend socket that counts itself open while it exists.
struct BackendIo {
    io: TcpStream,
    _open: OpenConn,
}

impl AsyncRead for BackendIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for BackendIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::Ipv4Addr;

    use super::*;

    /// An HTTP/2 server on localhost answering every request with 200.
    async fn h2_server() -> SocketAddrV4 {
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let SocketAddr::V4(addr) = l.local_addr().unwrap() else {
            unreachable!("bound to IPv4")
        };
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(http::Response::new(String::new()))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    async fn until(ok: impl Fn() -> bool) -> bool {
        for _ in 0..500 {
            if ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ok()
    }

    #[tokio::test]
    async fn one_shared_connection_closed_when_drained() {
        let addr = h2_server().await;
        let counters = Arc::new(BackendCounters::default());
        let pool = Pool::default();
        let t = Duration::from_secs(2);
        // Calls arriving together share one connect.
        let (a, b, c) = tokio::join!(
            pool.get(addr, &counters, t),
            pool.get(addr, &counters, t),
            pool.get(addr, &counters, t)
        );
        let senders = [a.unwrap(), b.unwrap(), c.unwrap()];
        let d = pool.get(addr, &counters, t).await.unwrap();
        assert_eq!(counters.new.load(Relaxed), 1);
        assert_eq!(counters.active.load(Relaxed), 1);
        // Drained: refused at once, and the idle connection closes once the
        // last sender (standing for calls in flight) is gone.
        pool.drain();
        assert!(!pool.has_connection());
        assert_eq!(
            pool.get(addr, &counters, t).await.unwrap_err(),
            ConnectError::Draining
        );
        assert_eq!(counters.active.load(Relaxed), 1, "busy: kept");
        drop((senders, d));
        assert!(until(|| counters.active.load(Relaxed) == 0).await);
        // Back in service: a new connection.
        pool.undrain();
        pool.get(addr, &counters, t).await.unwrap();
        assert_eq!(counters.new.load(Relaxed), 2);
        assert_eq!(counters.active.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn refused_connects_fail_and_draining_refuses() {
        // A port nobody listens on: bind, note it, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
        let counters = Arc::new(BackendCounters::default());
        let pool = Pool::default();
        let e = pool
            .get(addr, &counters, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::Connect(_)), "{e:?}");
        assert_eq!(counters.active.load(Relaxed), 0);
        pool.drain();
        assert!(pool.is_draining());
        let e = pool
            .get(addr, &counters, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e, ConnectError::Draining);
        pool.undrain();
        assert!(!pool.is_draining());
    }
}
