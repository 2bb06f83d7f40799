//! The backend side of a call, on h2 directly rather than through hyper's
//! client.
//!
//! hyper's HTTP/2 client hands each request to the connection's task over a
//! channel, spawns a task per request that waits for the response and sends
//! it back over a oneshot, and wraps the bodies. Here the call's own task
//! opens the stream, writes the request (the body frames it already has,
//! which for a unary call is all of it) and waits for the response headers:
//! no channel, no task, no oneshot per call. Only a request body still
//! streaming when the response headers come (client- and bidi-streaming
//! calls) goes on in a task of its own, as with hyper.
//!
//! The connection's task (`pool`) drives the socket and does what hyper's
//! did besides: keep-alive PINGs (gRFC A8) and telling the pool the
//! connection ended.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{self, SendRequest};
use h2::{Ping, PingPong, RecvStream, SendStream};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tracing::debug;

use super::body::UpBody;
use super::frames::PeerState;

// hyper's client defaults, kept.
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUF_SIZE: usize = 1024 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// The HTTP/2 client settings of a backend connection (hyper's defaults).
pub(crate) fn builder() -> client::Builder {
    let mut b = client::Builder::new();
    b.initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUF_SIZE)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_frame_size(MAX_FRAME_SIZE)
        .enable_push(false);
    b
}

/// Sends calls on one backend connection.
#[derive(Clone)]
pub(crate) struct Sender {
    tx: SendRequest<Bytes>,
    peer: Arc<PeerState>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Why a call got no response headers.
pub(crate) enum SendError {
    /// Nothing was sent (the connection had closed or gone away); the
    /// request comes back.
    Unsent(Box<Request<UpBody>>, h2::Error),
    /// The request went out (at least its headers) and then failed: reset,
    /// GOAWAY, the connection lost.
    Failed(h2::Error),
}

impl Sender {
    pub(crate) fn new(tx: SendRequest<Bytes>, peer: Arc<PeerState>) -> Self {
        Sender { tx, peer }
    }

    /// The connection's task ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.peer.closed.load(Relaxed)
    }

    /// Sends the call and waits for the response headers, writing the
    /// request body meanwhile; what is left of the body then goes on in a
    /// task of its own. Dropping the future (the deadline) resets the stream.
    pub(crate) async fn send(self, req: Request<UpBody>) -> Result<Response<RespBody>, SendError> {
        // Waits while this handle's previous stream is not yet open (h2
        // queues streams beyond the peer's limit).
        let mut tx = match self.tx.ready().await {
            Ok(tx) => tx,
            Err(e) => return Err(SendError::Unsent(Box::new(req), e)),
        };
        let (parts, body) = req.into_parts();
        let eos = body.is_end_stream();
        let (mut response, stream) = tx
            .send_request(Request::from_parts(parts, ()), eos)
            .map_err(SendError::Failed)?;
        let mut pipe = (!eos).then(|| Pipe::new(body, stream));
        let head = std::future::poll_fn(|cx| {
            if let Some(p) = &mut pipe
                && p.poll(cx).is_ready()
            {
                pipe = None;
            }
            Pin::new(&mut response).poll(cx)
        })
        .await;
        let head = head.map_err(SendError::Failed)?;
        if let Some(mut p) = pipe {
            // A request still streaming (client- or bidi-streaming calls).
            tokio::spawn(std::future::poll_fn(move |cx| p.poll(cx)));
        }
        Ok(head.map(|recv| RespBody {
            recv,
            data_done: false,
        }))
    }
}

/// Writes a request body to its stream, with HTTP/2 flow control (as
/// hyper's `PipeToSendStream`).
struct Pipe {
    body: UpBody,
    tx: SendStream<Bytes>,
    /// A DATA chunk waiting for send capacity, and whether it ends the body.
    waiting: Option<(Bytes, bool)>,
}

impl Pipe {
    fn new(body: UpBody, tx: SendStream<Bytes>) -> Self {
        Pipe {
            body,
            tx,
            waiting: None,
        }
    }

    /// Ready when the body is all sent, or failed (the stream is then reset).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.poll_inner(cx) {
            Poll::Ready(Err(e)) => {
                debug!("gRPC request body to the backend: {e}");
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        loop {
            // A reset from the backend ends the pipe.
            if let Poll::Ready(r) = self.tx.poll_reset(cx) {
                return Poll::Ready(Err(r.map_or_else(|e| e, h2::Error::from)));
            }
            if self.waiting.is_some() {
                while self.tx.capacity() == 0 {
                    match ready!(self.tx.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(e)) => return Poll::Ready(Err(e)),
                        None => return Poll::Ready(Err(h2::Reason::CANCEL.into())),
                    }
                }
                let Some((data, eos)) = self.waiting.take() else {
                    continue;
                };
                self.tx.send_data(data, eos)?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // The next frame before any capacity is reserved (hyper #4003).
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = self.body.is_end_stream();
                        if data.is_empty() {
                            self.tx.send_data(data, eos)?;
                            if eos {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        self.tx.reserve_capacity(1);
                        self.waiting = Some((data, eos));
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            self.tx.reserve_capacity(0);
                            self.tx.send_trailers(t)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    // The call ended on the proxy's side: reset the stream.
                    debug!("gRPC request body ended: {e}");
                    self.tx.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(Ok(()));
                }
                None => {
                    self.tx.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// A backend's response body: DATA (its flow-control window given back as
/// it is read), then trailers.
#[derive(Debug)]
pub(crate) struct RespBody {
    recv: RecvStream,
    data_done: bool,
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(d)) => {
                    let _ = this.recv.flow_control().release_capacity(d.len());
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Keep-alive PINGs (gRFC A8, as hyper's client did them): after
/// `interval` without a byte from the backend while calls are open, a PING;
/// no PONG within `timeout` and the connection is to be closed.
pub(crate) struct KeepAlive {
    pp: PingPong,
    interval: Duration,
    timeout: Duration,
    peer: Arc<PeerState>,
    /// A PING is out.
    waiting: bool,
    sleep: Pin<Box<Sleep>>,
}

impl KeepAlive {
    pub(crate) fn new(
        pp: PingPong,
        interval: Duration,
        timeout: Duration,
        peer: Arc<PeerState>,
    ) -> Self {
        KeepAlive {
            pp,
            interval,
            timeout,
            peer,
            waiting: false,
            sleep: Box::pin(tokio::time::sleep(interval)),
        }
    }

    /// Ready when the backend left a PING unanswered for `timeout`.
    pub(crate) fn poll_dead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.waiting {
                if self.pp.poll_pong(cx).is_ready() {
                    // Answered (or the connection is going: its task sees it).
                    self.waiting = false;
                    self.sleep.as_mut().reset(Instant::now() + self.interval);
                    continue;
                }
                ready!(self.sleep.as_mut().poll(cx));
                return Poll::Ready(());
            }
            ready!(self.sleep.as_mut().poll(cx));
            let now = Instant::now();
            let quiet = self.peer.since_read();
            if self.peer.calls.load(Relaxed) == 0 {
                // No PINGs without calls (servers punish them).
                self.sleep.as_mut().reset(now + self.interval);
                continue;
            }
            if quiet < self.interval {
                self.sleep.as_mut().reset(now + (self.interval - quiet));
                continue;
            }
            match self.pp.send_ping(Ping::opaque()) {
                Ok(()) => {
                    self.waiting = true;
                    self.sleep.as_mut().reset(now + self.timeout);
                }
                Err(_) => self.sleep.as_mut().reset(now + self.interval),
            }
        }
    }
}
