//! Pooled HTTP/2 connections to one backend.
//!
//! A call takes a stream on the first connection with one free: fewer calls
//! in flight than the backend's SETTINGS_MAX_CONCURRENT_STREAMS (read off
//! the wire, see `frames`; unlimited when it sets none). When none has, one
//! more connection is opened, up to `max_connections`; at that bound the
//! call goes to the least busy connection and waits in h2 for a stream.
//! Filling the first connections first lets the extra ones go idle and
//! close after `idle` when the load drops.
//!
//! Connects are one at a time per backend, and shared by the calls that
//! wait meanwhile: a failed connect fails them too, so a dead backend costs
//! each waiting call one connect timeout at most. A connect is done when the
//! TCP, TLS (for a service with `grpc.tls.upstream`; see `tls`) and HTTP/2
//! handshakes are and the backend's first SETTINGS arrived (so its stream
//! limit is known before calls pile onto it). The SETTINGS/GOAWAY sniffer
//! reads the plaintext side of TLS.
//!
//! A connection leaves the pool when it closes, when the backend sends
//! GOAWAY (its calls in flight go on; new calls go to other connections,
//! and a new one is opened if needed), when it has been idle for `idle`,
//! and when the pool drains. Leaving the pool drops the pool's handle:
//! h2 closes the connection once its last stream is done. PINGs (gRFC
//! A8) after `keepalive_interval` without a frame from the backend find
//! dead connections: unanswered within `keepalive_timeout`, the connection
//! closes and its calls fail.
//!
//! Draining (backend terminating, weight 0 or removed): the pool lets go of
//! its connections and refuses new calls; calls in flight keep theirs.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use super::client::{self, KeepAlive};
use super::frames::{Event, PeerState, Sniffer};
use super::tls::{self, Holder, MaybeTls, Upstream};
use crate::userspace::options::ProxyOptions;
use crate::userspace::stats::BackendCounters;

/// How long a new connection waits for the backend's first SETTINGS before
/// it is used anyway (as if the backend set no stream limit).
const SETTINGS_WAIT: Duration = Duration::from_secs(2);

pub(crate) type Sender = client::Sender;

/// The pool's settings (from [`ProxyOptions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolOptions {
    /// Per connect (TCP, HTTP/2 handshake, first SETTINGS); zero: none.
    pub(crate) connect_timeout: Duration,
    pub(crate) max_connections: usize,
    /// Zero: idle connections stay.
    pub(crate) idle: Duration,
    /// Zero: no PINGs.
    pub(crate) keepalive_interval: Duration,
    pub(crate) keepalive_timeout: Duration,
}

impl From<&ProxyOptions> for PoolOptions {
    fn from(o: &ProxyOptions) -> Self {
        PoolOptions {
            connect_timeout: o.connect_timeout,
            max_connections: o.grpc_max_connections.max(1),
            idle: o.grpc_idle_timeout,
            keepalive_interval: o.grpc_keepalive_interval,
            keepalive_timeout: o.grpc_keepalive_timeout,
        }
    }
}

/// Why no connection could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect: {0}")]
    Connect(String),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(String),
    /// The TLS handshake failed (e.g. the backend's certificate is not
    /// signed by the service's `upstream.ca`).
    #[error("{0}")]
    Tls(String),
    /// Not a failure: the backend takes no new calls.
    #[error("the backend is draining")]
    Draining,
}

/// One pooled connection.
#[derive(Debug)]
struct Entry {
    id: u64,
    sender: Sender,
    peer: Arc<PeerState>,
    /// Calls holding a [`Slot`] on it.
    in_flight: u32,
    /// When `in_flight` last went to 0.
    idle_since: Instant,
}

impl Entry {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && !self.peer.goaway.load(Relaxed)
    }

    fn has_free_stream(&self) -> bool {
        self.in_flight < self.peer.max_streams.load(Relaxed)
    }
}

#[derive(Debug, Default)]
struct State {
    conns: Vec<Entry>,
    /// Only changed under this lock, so that a connect that ends after a
    /// drain never stores its connection.
    draining: bool,
    next_id: u64,
}

type Shared = Arc<Mutex<State>>;

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// A stream on the first connection with one free; when none is and
    /// `max` connections are open, on the least busy one.
    fn take(&mut self, shared: &Shared, addr: SocketAddr, max: usize) -> Option<(Sender, Slot)> {
        self.conns.retain(|e| {
            let keep = e.usable();
            if !keep {
                debug!(backend = %addr, "gRPC backend connection closed or going away; left the pool");
            }
            keep
        });
        let i = self
            .conns
            .iter()
            .position(Entry::has_free_stream)
            .or_else(|| {
                let least = self
                    .conns
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.in_flight);
                least.filter(|_| self.conns.len() >= max).map(|(i, _)| i)
            })?;
        let e = &mut self.conns[i];
        e.in_flight += 1;
        e.peer.calls.fetch_add(1, Relaxed);
        let slot = Slot {
            shared: Arc::downgrade(shared),
            id: e.id,
            peer: e.peer.clone(),
        };
        Some((e.sender.clone(), slot))
    }
}

/// A stream taken on a pooled connection, given back when dropped (when
/// the call ends).
#[derive(Debug)]
pub(crate) struct Slot {
    shared: Weak<Mutex<State>>,
    id: u64,
    peer: Arc<PeerState>,
}

impl Slot {
    /// The backend sent GOAWAY on this call's connection.
    pub(crate) fn went_away(&self) -> bool {
        self.peer.goaway.load(Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.peer.calls.fetch_sub(1, Relaxed);
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut st = lock(&shared);
        if let Some(e) = st.conns.iter_mut().find(|e| e.id == self.id) {
            e.in_flight = e.in_flight.saturating_sub(1);
            if e.in_flight == 0 {
                e.idle_since = Instant::now();
            }
        }
    }
}

/// A backend's connections; empty (and inert) for L4 services.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    /// The connections; locked only to look or change, never across an await.
    state: Shared,
    /// One connect at a time; holds the last failure, for the calls that
    /// waited on it.
    connecting: tokio::sync::Mutex<Option<(Instant, ConnectError)>>,
}

impl Pool {
    /// A stream on one of the backend's connections, opening one if needed
    /// (over TLS when the service's `tls` says so).
    pub(crate) async fn get(
        &self,
        addr: SocketAddr,
        counters: &Arc<BackendCounters>,
        opts: &PoolOptions,
        tls: &Holder,
    ) -> Result<(Sender, Slot), ConnectError> {
        if let Some(s) = self.ready(addr, opts)? {
            return Ok(s);
        }
        let asked = Instant::now();
        let mut failed = self.connecting.lock().await;
        // A stream freed or a connection opened (or drained) meanwhile?
        if let Some(s) = self.ready(addr, opts)? {
            return Ok(s);
        }
        if let Some((at, e)) = &*failed
            && *at >= asked
        {
            return Err(e.clone());
        }
        let id = {
            let mut st = lock(&self.state);
            st.next_id += 1;
            st.next_id
        };
        let up = tls.upstream(addr.ip());
        let connect = connect(addr, counters, opts, up, Arc::downgrade(&self.state), id);
        let res = if opts.connect_timeout.is_zero() {
            connect.await
        } else {
            tokio::time::timeout(opts.connect_timeout, connect)
                .await
                .unwrap_or(Err(ConnectError::Timeout))
        };
        match res {
            Ok((sender, peer)) => {
                *failed = None;
                let mut st = lock(&self.state);
                if st.draining {
                    // Drained while connecting: the new connection closes unused.
                    return Err(ConnectError::Draining);
                }
                st.conns.push(Entry {
                    id,
                    sender,
                    peer,
                    in_flight: 0,
                    idle_since: Instant::now(),
                });
                // A connection that went away at once: the caller tries again.
                st.take(&self.state, addr, opts.max_connections)
                    .ok_or_else(|| ConnectError::Handshake("closed at once".into()))
            }
            Err(e) => {
                *failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// A stream on an open connection, if one is to be had without a new
    /// connection; an error if draining.
    fn ready(
        &self,
        addr: SocketAddr,
        opts: &PoolOptions,
    ) -> Result<Option<(Sender, Slot)>, ConnectError> {
        let mut st = lock(&self.state);
        if st.draining {
            return Err(ConnectError::Draining);
        }
        Ok(st.take(&self.state, addr, opts.max_connections))
    }

    /// No new calls; idle connections go now, busy ones when their calls
    /// are done.
    pub(crate) fn drain(&self) {
        let mut st = lock(&self.state);
        st.draining = true;
        st.conns.clear();
    }

    /// New calls again (the backend is back in service).
    pub(crate) fn undrain(&self) {
        lock(&self.state).draining = false;
    }

    #[cfg(test)]
    pub(crate) fn is_draining(&self) -> bool {
        lock(&self.state).draining
    }

    #[cfg(test)]
    fn connections(&self) -> usize {
        lock(&self.state).conns.len()
    }
}

async fn connect(
    addr: SocketAddr,
    counters: &Arc<BackendCounters>,
    opts: &PoolOptions,
    tls: Option<Upstream>,
    pool: Weak<Mutex<State>>,
    id: u64,
) -> Result<(Sender, Arc<PeerState>), ConnectError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| ConnectError::Connect(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let io = match &tls {
        None => MaybeTls::Plain(tcp),
        Some(up) => MaybeTls::Tls(Box::new(
            tls::connect(tcp, up).await.map_err(ConnectError::Tls)?,
        )),
    };
    let peer = Arc::new(PeerState::default());
    let io = BackendIo {
        io,
        _open: OpenConn::new(counters.clone()),
        sniffer: Sniffer::default(),
        peer: peer.clone(),
        counters: counters.clone(),
        addr,
    };
    let (tx, conn) = client::builder()
        .handshake::<_, bytes::Bytes>(io)
        .await
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    counters.new.fetch_add(1, Relaxed);
    let sender = Sender::new(tx, peer.clone());
    // Drives the connection; the socket lives in this task and closes when
    // the pool and the calls have let go of it and no stream is left, or
    // when a keep-alive PING goes unanswered (its calls then fail).
    let idle = opts.idle;
    let (interval, ka_timeout) = (opts.keepalive_interval, opts.keepalive_timeout);
    let closed = peer.clone();
    tokio::spawn(async move {
        let mut conn = conn;
        let mut keepalive = conn
            .ping_pong()
            .filter(|_| !interval.is_zero())
            .map(|pp| KeepAlive::new(pp, interval, ka_timeout, closed.clone()));
        // The first look comes after the connection joined the pool.
        let mut next = (!idle.is_zero()).then(|| Instant::now() + idle.max(SETTINGS_WAIT));
        loop {
            let tick = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let dead = std::future::poll_fn(|cx| match &mut keepalive {
                Some(k) => k.poll_dead(cx),
                None => Poll::Pending,
            });
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        debug!(backend = %addr, "gRPC backend connection: {e}");
                    }
                    break;
                }
                () = tick => next = idle_check(&pool, id, idle),
                () = dead => {
                    debug!(backend = %addr, "gRPC backend connection: keep-alive PING unanswered within {ka_timeout:?}; closing");
                    break;
                }
            }
        }
        // Dropping the connection fails the streams still open on it.
        closed.closed.store(true, Relaxed);
    });
    // Its first SETTINGS tell how many calls it takes at once.
    let mut seen = peer.settings.subscribe();
    let _ = tokio::time::timeout(SETTINGS_WAIT, seen.wait_for(|s| *s)).await;
    Ok((sender, peer))
}

/// Lets connection `id` go from the pool if it has been idle for `idle`;
/// else when to look again (none: it left the pool).
fn idle_check(pool: &Weak<Mutex<State>>, id: u64, idle: Duration) -> Option<Instant> {
    let pool = pool.upgrade()?;
    let mut st = lock(&pool);
    let i = st.conns.iter().position(|e| e.id == id)?;
    let e = &st.conns[i];
    let now = Instant::now();
    if e.in_flight > 0 {
        return Some(now + idle);
    }
    let at = e.idle_since + idle;
    if at > now {
        return Some(at);
    }
    debug!("gRPC backend connection idle for {idle:?}; closing");
    st.conns.remove(i);
    None
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
    io: MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>,
    _open: OpenConn,
    /// Reads the backend's SETTINGS and GOAWAY frames into `peer`.
    sniffer: Sniffer,
    peer: Arc<PeerState>,
    counters: Arc<BackendCounters>,
    addr: SocketAddr,
}

impl AsyncRead for BackendIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.peer.read_now();
        }
        let (peer, counters, addr) = (&this.peer, &this.counters, this.addr);
        this.sniffer.feed(&buf.filled()[before..], |e| {
            if peer.apply(e) {
                counters.goaways.fetch_add(1, Relaxed);
                debug!(backend = %addr, "gRPC backend sent GOAWAY: {e:?}");
            }
            if let Event::Settings { max_streams } = e {
                debug!(backend = %addr, ?max_streams, "gRPC backend SETTINGS");
            }
        });
        r
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
    use crate::userspace::grpc::body::UpBody;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    static PLAIN: Holder = Holder::plain();

    /// An HTTP/2 server on localhost answering every request with 200, with
    /// this stream limit.
    async fn h2_server(max_streams: Option<u32>) -> SocketAddr {
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(http::Response::new(String::new()))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
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

    fn opts() -> PoolOptions {
        PoolOptions {
            connect_timeout: Duration::from_secs(2),
            max_connections: 3,
            idle: Duration::ZERO,
            keepalive_interval: Duration::ZERO,
            keepalive_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn one_shared_connection_closed_when_drained() {
        let addr = h2_server(None).await;
        let counters = Arc::new(BackendCounters::default());
        let pool = Pool::default();
        let o = opts();
        // Calls arriving together share one connect.
        let (a, b, c) = tokio::join!(
            pool.get(addr, &counters, &o, &PLAIN),
            pool.get(addr, &counters, &o, &PLAIN),
            pool.get(addr, &counters, &o, &PLAIN)
        );
        let senders = [a.unwrap(), b.unwrap(), c.unwrap()];
        let d = pool.get(addr, &counters, &o, &PLAIN).await.unwrap();
        assert_eq!(counters.new.load(Relaxed), 1);
        assert_eq!(counters.active.load(Relaxed), 1);
        // Drained: refused at once, and the idle connection closes once the
        // last sender (standing for calls in flight) is gone.
        pool.drain();
        assert_eq!(pool.connections(), 0);
        assert_eq!(
            pool.get(addr, &counters, &o, &PLAIN).await.unwrap_err(),
            ConnectError::Draining
        );
        assert_eq!(counters.active.load(Relaxed), 1, "busy: kept");
        drop((senders, d));
        assert!(until(|| counters.active.load(Relaxed) == 0).await);
        // Back in service: a new connection.
        pool.undrain();
        let _s = pool.get(addr, &counters, &o, &PLAIN).await.unwrap();
        assert_eq!(counters.new.load(Relaxed), 2);
        assert_eq!(counters.active.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn more_connections_when_streams_run_out_and_idle_ones_close() {
        // The backend takes 2 streams per connection; the pool opens at most 3.
        let addr = h2_server(Some(2)).await;
        let counters = Arc::new(BackendCounters::default());
        let pool = Pool::default();
        let o = PoolOptions {
            idle: Duration::from_millis(200),
            ..opts()
        };
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(pool.get(addr, &counters, &o, &PLAIN).await.unwrap());
        }
        assert_eq!(counters.new.load(Relaxed), 3, "2 streams on each of 3");
        assert_eq!(pool.connections(), 3);
        // At the bound: onto the least busy connection, no 4th.
        held.push(pool.get(addr, &counters, &o, &PLAIN).await.unwrap());
        assert_eq!(counters.new.load(Relaxed), 3);
        // A freed stream is taken again before anything new is opened.
        held.truncate(5);
        held.push(pool.get(addr, &counters, &o, &PLAIN).await.unwrap());
        assert_eq!(counters.new.load(Relaxed), 3);
        // All idle: every connection closes after the idle time.
        drop(held);
        assert!(until(|| counters.active.load(Relaxed) == 0).await);
        assert_eq!(pool.connections(), 0);
    }

    /// A relay from a new localhost port to `to` that forwards until `cut`
    /// turns true, then holds both sockets open and silent (a peer gone
    /// without a FIN).
    async fn cuttable_relay(to: SocketAddr, cut: tokio::sync::watch::Receiver<bool>) -> SocketAddr {
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut a, _)) = l.accept().await {
                let mut cut = cut.clone();
                tokio::spawn(async move {
                    let mut b = TcpStream::connect(to).await.unwrap();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = async { cut.wait_for(|c| *c).await.is_ok() } => {
                            // Silent, both sockets kept, for the test's length.
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn keepalive_pings_find_a_silent_backend() {
        let server = h2_server(None).await;
        let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
        let addr = cuttable_relay(server, cut_rx).await;
        let counters = Arc::new(BackendCounters::default());
        let pool = Pool::default();
        let o = PoolOptions {
            keepalive_interval: Duration::from_millis(200),
            keepalive_timeout: Duration::from_millis(300),
            ..opts()
        };
        let (sender, _slot) = pool.get(addr, &counters, &o, &PLAIN).await.unwrap();
        assert_eq!(counters.active.load(Relaxed), 1);
        // The backend goes silent; PINGs (sent while a call is open) go
        // unanswered and the connection closes within interval + timeout.
        cut_tx.send_replace(true);
        let t0 = Instant::now();
        let call = sender.clone().send(http::Request::new(UpBody::empty()));
        let r = tokio::time::timeout(Duration::from_secs(5), call).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "the call fails: {:?}",
            r.map(|r| r.is_ok())
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(until(|| counters.active.load(Relaxed) == 0).await);
        assert!(sender.is_closed());
    }

    #[tokio::test]
    async fn refused_connects_fail_and_draining_refuses() {
        // A port nobody listens on: bind, note it, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
        let counters = Arc::new(BackendCounters::default());
        let pool = Pool::default();
        let e = pool
            .get(addr, &counters, &opts(), &PLAIN)
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::Connect(_)), "{e:?}");
        assert_eq!(counters.active.load(Relaxed), 0);
        pool.drain();
        assert!(pool.is_draining());
        let e = pool
            .get(addr, &counters, &opts(), &PLAIN)
            .await
            .unwrap_err();
        assert_eq!(e, ConnectError::Draining);
        pool.undrain();
        assert!(!pool.is_draining());
    }
}
