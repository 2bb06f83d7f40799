//! The client side of the gRPC mode on h2 directly rather than through
//! hyper's server.
//!
//! hyper's HTTP/2 server spawns a task per stream (the service's future,
//! then the response body's pipe), so each call woke the connection's task
//! and its own. Here the connection's task drives its calls itself: the
//! HTTP/2 connection and every call of it are polled in one task, the calls
//! in a `FuturesUnordered` (only the woken ones are polled). What hyper's
//! server did besides is done here too:
//!
//! - **HTTP/1 refusal.** The connection's first bytes are compared with the
//!   HTTP/2 client preface. Anything else (HTTP/1.x, an `Upgrade: h2c`
//!   attempt) is handed to hyper's HTTP/1 server with those bytes put back,
//!   which answers `505 HTTP Version Not Supported` and closes.
//! - **PINGs** every [`KEEPALIVE_INTERVAL`]; one unanswered within
//!   [`KEEPALIVE_TIMEOUT`] closes the connection (hyper's server pinged
//!   after that much time without a frame; here the PINGs go out on a busy
//!   connection too, one a minute).
//! - **Two-step GOAWAY** on a drain: h2's graceful shutdown (GOAWAY with the
//!   largest stream id and a PING, then GOAWAY with the last stream taken
//!   once the PING is answered); calls in flight go on.
//! - A client's RST_STREAM cancels its call, before the response headers
//!   (the call's future is dropped: the backend's stream is reset) and
//!   after them (the response body is dropped, the same).
//! - The connection ends when h2 says it is closed (the client went away,
//!   or the drain is done); calls still open then are dropped (cancelled).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{Ping, PingPong, Reason, RecvStream};
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderValue};
use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use super::client::{Pipe, RespBody};
use super::{Pools, handle};
use crate::userspace::options::ProxyOptions;
use crate::userspace::select::ServiceShared;
use crate::userspace::tasks::stop_requested;

/// PINGs on client connections, so that dead clients are noticed.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The HTTP/2 client connection preface (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// hyper's server defaults, kept.
const CONN_WINDOW: u32 = 1024 * 1024;
const STREAM_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUF_SIZE: usize = 400 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const MAX_CONCURRENT_STREAMS: u32 = 200;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

fn builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_send_buffer_size(MAX_SEND_BUF_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    b
}

/// Reads the connection's first bytes: whether they are the HTTP/2 preface,
/// and what was read (to be put back). Reads only while the bytes so far
/// are a prefix of the preface.
pub(crate) async fn sniff<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<(bool, Vec<u8>)> {
    let mut buf = vec![0u8; PREFACE.len()];
    let mut n = 0;
    while n < PREFACE.len() {
        let r = io.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n] != PREFACE[..n] {
            buf.truncate(n);
            return Ok((false, buf));
        }
    }
    buf.truncate(n);
    Ok((n == PREFACE.len(), buf))
}

/// A socket with bytes already read from it put back in front.
pub(crate) struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(crate) fn new(pre: Vec<u8>, inner: T) -> Self {
        Rewind {
            pre: Bytes::from(pre),
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Serves one HTTP/2 client connection (its preface put back in `io`)
/// until it closes; on a stop, drains it with the two-step GOAWAY.
pub(crate) async fn serve<T>(
    io: T,
    svc: Arc<ServiceShared>,
    pools: Arc<Pools>,
    opts: Arc<ProxyOptions>,
    mut drain: watch::Receiver<bool>,
) -> Result<(), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = tokio::select! {
        r = builder().handshake::<_, Bytes>(io) => r?,
        () = stop_requested(&mut drain) => return Ok(()),
    };
    let mut keepalive = conn.ping_pong().map(KeepAlive::new);
    let mut calls = FuturesUnordered::new();
    let mut stop = Box::pin(stop_requested(&mut drain));
    let mut draining = false;
    std::future::poll_fn(|cx| {
        if !draining && stop.as_mut().poll(cx).is_ready() {
            draining = true;
            debug!(service = %svc.addr, "gRPC client connection: draining");
            conn.graceful_shutdown();
        }
        loop {
            // The calls first (a wake-up is mostly a backend's answer), then
            // the connection: it writes what they queued, reads frames and
            // takes new calls, which get their first poll at once.
            while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {}
            let mut accepted = false;
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        calls.push(call(svc.clone(), pools.clone(), opts.clone(), req, respond));
                        accepted = true;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            if !accepted {
                break;
            }
        }
        if let Some(k) = &mut keepalive
            && k.poll_dead(cx).is_ready()
        {
            debug!(service = %svc.addr, "gRPC client connection: PING unanswered within {KEEPALIVE_TIMEOUT:?}; closing");
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    })
    .await
}

/// One call: the proxied answer, watched for the client's RST_STREAM, then
/// its body piped to the client.
async fn call(
    svc: Arc<ServiceShared>,
    pools: Arc<Pools>,
    opts: Arc<ProxyOptions>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let req = req.map(RespBody::new);
    let res = {
        let answer = handle(svc, &pools, opts, req);
        tokio::pin!(answer);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            // The client reset the stream: the call is dropped (cancelled).
            match respond.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    };
    let Some(res) = res else {
        return;
    };
    let (mut parts, body) = res.into_parts();
    // HTTP/1 only; not allowed in HTTP/2.
    parts.headers.remove(CONNECTION);
    let eos = body.is_end_stream();
    if !eos
        && let Some(len) = body.size_hint().exact()
        && !parts.headers.contains_key(CONTENT_LENGTH)
    {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    let tx = match respond.send_response(Response::from_parts(parts, ()), eos) {
        Ok(tx) => tx,
        Err(e) => {
            debug!("gRPC response to the client: {e}");
            respond.send_reset(Reason::INTERNAL_ERROR);
            return;
        }
    };
    if !eos {
        let mut pipe = Pipe::new(body, tx);
        std::future::poll_fn(|cx| pipe.poll(cx)).await;
    }
}

/// PINGs every [`KEEPALIVE_INTERVAL`]; ready when one went unanswered for
/// [`KEEPALIVE_TIMEOUT`].
struct KeepAlive {
    pp: PingPong,
    waiting: bool,
    sleep: Pin<Box<Sleep>>,
}

impl KeepAlive {
    fn new(pp: PingPong) -> Self {
        KeepAlive {
            pp,
            waiting: false,
            sleep: Box::pin(tokio::time::sleep(KEEPALIVE_INTERVAL)),
        }
    }

    fn poll_dead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.waiting {
                if self.pp.poll_pong(cx).is_ready() {
                    self.waiting = false;
                    let next = Instant::now() + KEEPALIVE_INTERVAL;
                    self.sleep.as_mut().reset(next);
                    continue;
                }
                return self.sleep.as_mut().poll(cx);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if self.pp.send_ping(Ping::opaque()).is_ok() {
                self.waiting = true;
                self.sleep.as_mut().reset(now + KEEPALIVE_TIMEOUT);
            } else {
                self.sleep.as_mut().reset(now + KEEPALIVE_INTERVAL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_preface_is_told_from_http1() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, PREFACE)
            .await
            .unwrap();
        assert_eq!(sniff(&mut b).await.unwrap(), (true, PREFACE.to_vec()));

        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        // Stops at the first byte that differs; what was read comes back.
        let (h2, pre) = sniff(&mut b).await.unwrap();
        assert!(!h2);
        assert_eq!(pre, b"GET / HTTP/1.1\r\n\r\n"[..pre.len()].to_vec());
        let mut r = Rewind::new(pre, b);
        drop(a);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_short_connection_is_not_http2() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &PREFACE[..10])
            .await
            .unwrap();
        drop(a);
        assert_eq!(
            sniff(&mut b).await.unwrap(),
            (false, PREFACE[..10].to_vec())
        );
    }
}
