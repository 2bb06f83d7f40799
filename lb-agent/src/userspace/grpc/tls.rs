//! TLS of a gRPC-mode service (`grpc.tls`; docs/grpc.md, "TLS").
//!
//! - **Termination** (`listen`): each accepted connection does a TLS
//!   handshake with the listener configuration current at that moment (a
//!   reloaded certificate applies to new connections; open ones keep
//!   theirs), bounded by [`HANDSHAKE_TIMEOUT`] and by the service's stop.
//!   ALPN offers `h2` only: a client that offers only other protocols gets
//!   rustls's `no_application_protocol` alert; one that offers none is
//!   served as a plaintext client would be (HTTP/2 works, HTTP/1.x gets 505).
//!   With `client_ca`, a client without a certificate signed by it fails
//!   the handshake (mutual TLS).
//! - **Origination** (`upstream`): the pool's connects do TCP, then TLS
//!   (ALPN `h2`, the name `server_name` or the backend's IP, verified
//!   against `ca`), then HTTP/2. The frame sniffer reads the plaintext side.
//! - **Files** are followed by lb-api's [`Reloader`] (the one the
//!   controller stream uses), polled every `grpc_tls_poll`: a changed, valid
//!   set applies to new connections; an invalid one is logged and counted
//!   and the last good one stays. Missing or bad files when the service
//!   starts (or its `tls` changes) refuse the service (or the change).

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use lb_api::GrpcTls;
use lb_api::tls::reload::{Loaded, ReloadStats, Reloader};
use lb_api::tls::rustls::pki_types::ServerName;
use lb_api::tls::rustls::{ClientConfig, ServerConfig};
use lb_api::tls::service::{listen_reloader, upstream_name, upstream_reloader};
use lb_api::tls::{ALPN_H2, TlsError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A client's TLS handshake must end within this.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Follow<C> = watch::Receiver<Arc<Loaded<C>>>;

/// The followed TLS configurations of one service.
pub(crate) struct ServiceTls {
    spec: GrpcTls,
    listen: Option<Follow<ServerConfig>>,
    upstream: Option<Follow<ClientConfig>>,
    stats: Vec<Arc<ReloadStats>>,
    /// The reloaders' tasks, stopped with this.
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for ServiceTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceTls")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Drop for ServiceTls {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ServiceTls {
    /// Reads the files of `spec` and follows them every `poll` (call within
    /// a tokio runtime). A missing or bad file is the error.
    pub(crate) fn start(spec: &GrpcTls, poll: Duration, service: &str) -> Result<Self, TlsError> {
        let listen = spec.listen.as_ref().map(listen_reloader).transpose()?;
        let upstream = spec.upstream.as_ref().map(upstream_reloader).transpose()?;
        let mut t = ServiceTls {
            spec: spec.clone(),
            listen: listen.as_ref().map(Reloader::subscribe),
            upstream: upstream.as_ref().map(Reloader::subscribe),
            stats: Vec::new(),
            tasks: Vec::new(),
        };
        let poll = poll.max(Duration::from_millis(10));
        if let Some(r) = listen {
            t.stats.push(r.stats.clone());
            t.tasks
                .push(r.spawn(poll, format!("gRPC service {service}: listener")));
        }
        if let Some(r) = upstream {
            t.stats.push(r.stats.clone());
            t.tasks
                .push(r.spawn(poll, format!("gRPC service {service}: backends")));
        }
        Ok(t)
    }

    pub(crate) fn spec(&self) -> &GrpcTls {
        &self.spec
    }

    /// The listener's configuration for a new client connection.
    fn listen(&self) -> Option<Arc<ServerConfig>> {
        self.listen.as_ref().map(|r| r.borrow().config.clone())
    }

    /// The configuration and name for a new connection to `backend`.
    fn upstream(&self, backend: IpAddr) -> Option<Upstream> {
        let (rx, spec) = (self.upstream.as_ref()?, self.spec.upstream.as_ref()?);
        Some(Upstream {
            config: rx.borrow().config.clone(),
            name: upstream_name(spec, backend)?,
        })
    }

    /// Reloads taken and sets refused so far.
    fn reloads(&self) -> (u64, u64) {
        self.stats.iter().fold((0, 0), |(r, e), s| {
            (r + s.reloads.load(Relaxed), e + s.errors.load(Relaxed))
        })
    }
}

/// What a backend connect needs for TLS.
#[derive(Clone)]
pub(crate) struct Upstream {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) name: ServerName<'static>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A service's TLS, swapped whole when its `grpc.tls` changes.
#[derive(Debug, Default)]
pub(crate) struct Holder(RwLock<Option<Arc<ServiceTls>>>);

impl Holder {
    /// Plaintext both ways.
    #[cfg(test)]
    pub(crate) const fn plain() -> Self {
        Holder(RwLock::new(None))
    }

    fn get(&self) -> Option<Arc<ServiceTls>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Makes the service's TLS `spec` (none: plaintext). Unchanged settings
    /// keep what is followed; new ones are read first, so that bad files
    /// leave the current TLS in place and are the error.
    pub(crate) fn set(
        &self,
        spec: Option<&GrpcTls>,
        poll: Duration,
        service: &str,
    ) -> Result<(), TlsError> {
        let cur = self.get();
        if cur.as_ref().map(|t| t.spec()) == spec {
            return Ok(());
        }
        let next = spec
            .map(|s| ServiceTls::start(s, poll, service).map(Arc::new))
            .transpose()?;
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        Ok(())
    }

    /// The listener configuration for a new client connection (`None`: plaintext).
    pub(crate) fn listen(&self) -> Option<Arc<ServerConfig>> {
        self.get()?.listen()
    }

    /// The TLS for a new connection to `backend` (`None`: h2c).
    pub(crate) fn upstream(&self, backend: IpAddr) -> Option<Upstream> {
        self.get()?.upstream(backend)
    }

    /// Reloads taken and sets refused so far by the current TLS.
    pub(crate) fn reloads(&self) -> (u64, u64) {
        self.get().map_or((0, 0), |t| t.reloads())
    }
}

/// Why a TLS connection could not be had.
pub(crate) fn handshake_error(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|i| i.downcast_ref::<lb_api::tls::rustls::Error>())
    {
        Some(r) => format!("TLS handshake: {r}"),
        None => format!("TLS handshake: {e}"),
    }
}

/// TCP, then TLS to a backend; fails unless the backend agreed on `h2`
/// or on no protocol (HTTP/2 is spoken either way).
pub(crate) async fn connect(
    tcp: TcpStream,
    up: &Upstream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let s = tokio_rustls::TlsConnector::from(up.config.clone())
        .connect(up.name.clone(), tcp)
        .await
        .map_err(|e| handshake_error(&e))?;
    match s.get_ref().1.alpn_protocol() {
        None => Ok(s),
        Some(p) if p == ALPN_H2 => Ok(s),
        Some(p) => Err(format!(
            "the backend chose ALPN {:?}, not h2",
            String::from_utf8_lossy(p)
        )),
    }
}

/// A socket that may speak TLS: what hyper reads and writes.
pub(crate) enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
