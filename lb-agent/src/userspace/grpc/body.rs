//! The bodies of a proxied call: the client's request on its way to the
//! backend ([`UpBody`]) and what goes back to the client ([`DownBody`]).
//! Both count DATA frames and bytes; the response side also enforces the
//! call's deadline once headers have gone out, and holds the call's counts
//! (outstanding on its backend, active on the service) until it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Sleep;
use tracing::debug;

use super::balance::CallLease;
use super::calls::CallEnd;
use super::client::RespBody;
use super::pool::Slot;
use super::status::{Code, status_headers};
use crate::userspace::select::ServiceShared;
use crate::userspace::stats::BackendCounters;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the request body stopped: the call ended on the proxy's side.
#[derive(Debug, thiserror::Error)]
#[error("the call ended")]
struct CallEnded;

/// Request bytes kept per call so that a call a backend did not process
/// can be sent again (gRFC A6 transparent retry); a call whose request
/// grew past this is not retried.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// The client's request body as the attempts of one call share it.
struct Shared {
    /// None: an empty body (tests).
    inner: Option<Incoming>,
    over: Option<oneshot::Receiver<()>>,
    /// DATA read from the client so far, while under [`REPLAY_LIMIT`].
    kept: Vec<Bytes>,
    kept_len: usize,
    /// More than [`REPLAY_LIMIT`] was read: no replay.
    overflow: bool,
    /// The client's trailers, if it sent some.
    trailers: Option<http::HeaderMap>,
    /// The client's body ended.
    ended: bool,
    /// The attempt that may read (older ones, which hyper may still poll
    /// for a moment, end at once).
    attempt: u32,
}

/// The client's request body, sent on to the backend. It fails (which
/// resets the backend's stream) once the call's [`CallOver`] is dropped:
/// deadline, client gone, or call done. [`UpBody::retry`] makes the body
/// of another attempt: what was read so far, replayed, then the rest.
pub(crate) struct UpBody {
    shared: Arc<std::sync::Mutex<Shared>>,
    /// None: not counted (tests).
    svc: Option<Arc<ServiceShared>>,
    /// The backend the body goes to; set at each send.
    backend: Option<Arc<BackendCounters>>,
    attempt: u32,
    /// Kept frames this attempt has sent.
    pos: usize,
    trailers_sent: bool,
    done: bool,
}

/// Held while a call goes on; dropping it ends the call's request body.
#[derive(Debug)]
pub(crate) struct CallOver(#[allow(dead_code)] oneshot::Sender<()>);

impl UpBody {
    pub(crate) fn new(inner: Incoming, svc: Arc<ServiceShared>) -> (Self, CallOver) {
        let (body, tx) = Self::with(Some(inner), Some(svc));
        (body, CallOver(tx))
    }

    /// An empty request body, whose call never ends by itself.
    #[cfg(test)]
    pub(crate) fn empty() -> Self {
        let (body, tx) = Self::with(None, None);
        std::mem::forget(tx);
        body
    }

    fn with(
        inner: Option<Incoming>,
        svc: Option<Arc<ServiceShared>>,
    ) -> (Self, oneshot::Sender<()>) {
        let (tx, rx) = oneshot::channel();
        let shared = Shared {
            inner,
            over: Some(rx),
            kept: Vec::new(),
            kept_len: 0,
            overflow: false,
            trailers: None,
            ended: false,
            attempt: 0,
        };
        let body = UpBody {
            shared: Arc::new(std::sync::Mutex::new(shared)),
            svc,
            backend: None,
            attempt: 0,
            pos: 0,
            trailers_sent: false,
            done: false,
        };
        (body, tx)
    }

    pub(crate) fn send_to(&mut self, backend: Arc<BackendCounters>) {
        self.backend = Some(backend);
    }

    /// A handle to make the body of another attempt of this call.
    pub(crate) fn replay(&self) -> Replay {
        Replay {
            shared: self.shared.clone(),
            svc: self.svc.clone(),
        }
    }
}

/// Makes the bodies of further attempts of a call.
pub(crate) struct Replay {
    shared: Arc<std::sync::Mutex<Shared>>,
    svc: Option<Arc<ServiceShared>>,
}

impl Replay {
    /// The body of a new attempt, if what the earlier ones read is all
    /// kept; the earlier ones then end.
    pub(crate) fn retry(&self) -> Option<UpBody> {
        let mut sh = lock(&self.shared);
        if sh.overflow || sh.over.is_none() {
            return None;
        }
        sh.attempt += 1;
        Some(UpBody {
            shared: self.shared.clone(),
            svc: self.svc.clone(),
            backend: None,
            attempt: sh.attempt,
            pos: 0,
            trailers_sent: false,
            done: false,
        })
    }
}

fn lock(m: &std::sync::Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let shared = this.shared.clone();
        let mut sh = lock(&shared);
        if sh.attempt != this.attempt {
            // Superseded by a retry.
            this.done = true;
            return Poll::Ready(Some(Err(CallEnded.into())));
        }
        if let Some(over) = &mut sh.over
            && Pin::new(over).poll(cx).is_ready()
        {
            sh.over = None;
            this.done = true;
            return Poll::Ready(Some(Err(CallEnded.into())));
        }
        if sh.over.is_none() {
            this.done = true;
            return Poll::Ready(None);
        }
        // A retry: first what earlier attempts sent.
        if let Some(d) = sh.kept.get(this.pos) {
            let d = d.clone();
            this.pos += 1;
            if let Some(b) = &this.backend {
                b.traffic.add_in(d.len());
            }
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if sh.ended {
            this.done = true;
            return match sh.trailers.clone() {
                Some(t) if !this.trailers_sent => {
                    this.trailers_sent = true;
                    Poll::Ready(Some(Ok(Frame::trailers(t))))
                }
                _ => Poll::Ready(None),
            };
        }
        let Some(inner) = &mut sh.inner else {
            sh.ended = true;
            this.done = true;
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    if let Some(svc) = &this.svc {
                        svc.counters.traffic.add_in(d.len());
                    }
                    if let Some(b) = &this.backend {
                        b.traffic.add_in(d.len());
                    }
                    if !sh.overflow {
                        if sh.kept_len + d.len() <= REPLAY_LIMIT {
                            sh.kept_len += d.len();
                            sh.kept.push(d.clone());
                            this.pos = sh.kept.len();
                        } else {
                            sh.overflow = true;
                            sh.kept = Vec::new();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    sh.trailers = Some(t.clone());
                    sh.ended = true;
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => {
                sh.ended = true;
                this.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        let sh = lock(&self.shared);
        sh.attempt == self.attempt
            && self.pos >= sh.kept.len()
            && if sh.ended {
                sh.trailers.is_none() || self.trailers_sent
            } else {
                sh.inner.as_ref().is_none_or(Body::is_end_stream)
            }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A call counted as active on its service until dropped.
#[derive(Debug)]
pub(crate) struct ActiveCall(Arc<ServiceShared>);

impl ActiveCall {
    pub(crate) fn new(svc: Arc<ServiceShared>) -> Self {
        svc.counters.requests.fetch_add(1, Relaxed);
        svc.counters.active_requests.fetch_add(1, Relaxed);
        ActiveCall(svc)
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        self.0.counters.active_requests.fetch_sub(1, Relaxed);
    }
}

/// What the client gets back.
pub(crate) enum DownBody {
    /// Trailers-only answers.
    Empty,
    /// Plain HTTP errors.
    Text(Option<Bytes>),
    /// A backend's response.
    Call(Box<CallBody>),
}

/// A backend's response body on its way to the client.
pub(crate) struct CallBody {
    inner: Option<RespBody>,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Released as soon as the body ends, not when hyper drops it.
    held: Option<(CallLease, ActiveCall, CallOver, Slot)>,
    svc: Arc<ServiceShared>,
    /// The call's and its attempt's status and latency.
    end: CallEnd,
}

impl CallBody {
    pub(crate) fn new(
        inner: RespBody,
        deadline: Option<Pin<Box<Sleep>>>,
        lease: CallLease,
        active: ActiveCall,
        over: CallOver,
        slot: Slot,
        mut end: CallEnd,
    ) -> Self {
        let svc = active.0.clone();
        if inner.is_end_stream() {
            // A trailers-only answer: hyper will not poll the body.
            end.ended(None);
        }
        CallBody {
            inner: Some(inner),
            deadline,
            held: Some((lease, active, over, slot)),
            svc,
            end,
        }
    }

    /// Ends the call: drops the backend's stream (resetting it if still open)
    /// and the call's counts.
    fn finish(&mut self) {
        self.inner = None;
        self.deadline = None;
        self.held = None;
    }

    fn poll_call(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = &mut self.deadline
            && d.as_mut().poll(cx).is_ready()
        {
            self.end.deadline();
            self.finish();
            self.svc.counters.deadline_exceeded.fetch_add(1, Relaxed);
            debug!(service = %self.svc.addr, "gRPC call: deadline exceeded while streaming");
            let t = status_headers(Code::DeadlineExceeded, "rpclb: deadline exceeded");
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        let Some(inner) = &mut self.inner else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    self.svc.counters.traffic.add_out(d.len());
                    if let Some((lease, ..)) = &self.held {
                        lease.backend().counters.traffic.add_out(d.len());
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    if let Some((lease, ..)) = &self.held {
                        // The backend's ORCA load report, if it sent one.
                        lease.report(t);
                    }
                    self.end.ended(Some(t));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                // Headers went out already: end the call with a status.
                debug!(service = %self.svc.addr, "gRPC call: backend stream failed: {e}");
                self.end.stream_failed();
                self.finish();
                let t = status_headers(
                    Code::Unavailable,
                    &format!("rpclb: backend stream failed: {e}"),
                );
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            None => {
                self.end.ended(None);
                self.finish();
                Poll::Ready(None)
            }
        }
    }
}

impl Body for DownBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            DownBody::Empty => Poll::Ready(None),
            DownBody::Text(t) => Poll::Ready(t.take().map(|b| Ok(Frame::data(b)))),
            DownBody::Call(c) => c.poll_call(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownBody::Empty => true,
            DownBody::Text(t) => t.is_none(),
            DownBody::Call(c) => c.inner.as_ref().is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DownBody::Empty => SizeHint::with_exact(0),
            DownBody::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
            DownBody::Call(c) => c
                .inner
                .as_ref()
                .map_or_else(SizeHint::default, Body::size_hint),
        }
    }
}
