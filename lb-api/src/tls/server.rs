//! The controller's listener: accepts TCP connections, runs each TLS
//! handshake on a task of its own (bounded in number and time, so a slow or
//! silent client holds up nobody), and hands finished connections to
//! `tonic`'s `Server::serve_with_incoming`. Each handshake takes the
//! configuration current at that moment, so a reloaded certificate or CA
//! bundle applies to every new connection.
//!
//! A connection carries [`PeerInfo`] into each request's extensions (tonic's
//! `Connected`): the peer's address and, over TLS, its verified certificate.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use super::LeafInfo;
use super::reload::Loaded;

/// What the server knows of a connection's peer.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The client certificate (verified against the CA bundle); `None` on a
    /// plaintext (`--insecure`) listener.
    pub cert: Option<Arc<PeerCert>>,
}

/// A client's verified leaf certificate.
#[derive(Clone, Debug)]
pub struct PeerCert {
    pub leaf: LeafInfo,
}

/// How the listener runs.
pub struct Acceptor {
    /// The current server configuration; `None`: plaintext.
    pub tls: Option<watch::Receiver<Arc<Loaded<ServerConfig>>>>,
    /// A handshake that takes longer is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in flight at most; further connections wait in the backlog.
    pub max_handshakes: usize,
    /// Called for each failed handshake (for a counter).
    pub on_handshake_error: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("tls", &self.tls.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection, TLS or plaintext.
pub struct ServerConn {
    io: Io,
    info: PeerInfo,
}

impl Connected for ServerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for ServerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The stream of connections `listener` accepts, for `serve_with_incoming`.
/// It ends when the server drops it.
pub fn incoming(listener: TcpListener, a: Acceptor) -> ReceiverStream<io::Result<ServerConn>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(listener, a, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(l: TcpListener, a: Acceptor, tx: mpsc::Sender<io::Result<ServerConn>>) {
    let slots = Arc::new(Semaphore::new(a.max_handshakes.max(1)));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = tx.closed() => return,
        };
        let (tcp, remote) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = tx.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &a.tls else {
            drop(permit);
            let conn = ServerConn {
                io: Io::Plain(tcp),
                info: PeerInfo {
                    remote: Some(remote),
                    cert: None,
                },
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
            continue;
        };
        let config = tls.borrow().config.clone();
        let (tx, timeout, on_err) = (
            tx.clone(),
            a.handshake_timeout,
            a.on_handshake_error.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let r = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
            let conn = match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    on_err();
                    warn!(peer = %remote, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    on_err();
                    warn!(peer = %remote, "TLS handshake not done within {timeout:?}; closed");
                    return;
                }
            };
            // The verifier required a certificate: there is one.
            let leaf = conn
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| LeafInfo::parse(c));
            let cert = match leaf {
                Some(Ok(leaf)) => Arc::new(PeerCert { leaf }),
                Some(Err(e)) => {
                    on_err();
                    warn!(peer = %remote, "unreadable client certificate: {e}");
                    return;
                }
                None => {
                    on_err();
                    warn!(peer = %remote, "no client certificate");
                    return;
                }
            };
            debug!(peer = %remote, subject = cert.leaf.subject, "TLS handshake done");
            let _ = tx
                .send(Ok(ServerConn {
                    io: Io::Tls(Box::new(conn)),
                    info: PeerInfo {
                        remote: Some(remote),
                        cert: Some(cert),
                    },
                }))
                .await;
        });
    }
}
