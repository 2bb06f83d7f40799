//! The gRPC (L7) mode: per-call balancing of a service with `grpc: Some`.
//!
//! # Decisions
//!
//! - **Listening** is the L4 TCP path's: a socket bound to VIP:port with
//!   `IP_FREEBIND`, and the VIP's local route (see the parent module).
//! - **Client side.** hyper serves each accepted connection. HTTP/2 comes
//!   with prior knowledge (h2c, gRPC without TLS). A request that is not gRPC
//!   gets a plain HTTP error and is counted in `bad_requests`: HTTP/1.x
//!   (including an `Upgrade: h2c` attempt) gets `505 HTTP Version Not
//!   Supported` and the connection closes; a method other than POST gets 405;
//!   a content type other than `application/grpc[+...]` gets 415, as the gRPC
//!   spec asks of servers.
//! - **Per call** (one HTTP/2 stream): pick a backend (`balance`: least
//!   outstanding requests, two weighted random choices, only backends that
//!   take new flows; with `balancing: orca_wrr`, weighted round-robin from
//!   the backends' ORCA load reports, `orca`; `algorithm` and affinity do
//!   not apply), take a stream
//!   on one of its pooled connections (`pool`: as many connections as the
//!   backend's SETTINGS_MAX_CONCURRENT_STREAMS asks for, up to
//!   `grpc_max_connections`), and send the request with its headers
//!   rewritten (`headers`). Request and response bodies stream through
//!   frame by frame, trailers included, so unary, client-, server- and
//!   bidi-streaming calls all work. The backend side is h2 itself, not
//!   hyper's client (`client`): the call's task opens the stream and
//!   writes the request, with no task, channel or oneshot per call.
//! - **Retries.** When nothing of the call reached a backend (its connect,
//!   TCP or HTTP/2 handshake, failed or timed out, or its pooled connection
//!   had closed before the request was sent), the call goes to
//!   another backend, up to `connect_attempts` backends. When a backend got
//!   the call but did not process it (RST_STREAM REFUSED_STREAM, or a stream
//!   above the last stream id of its GOAWAY), the call is sent again (gRFC
//!   A6 transparent retry) to any backend, a new connection if needed, up
//!   to `grpc_transparent_retries` times: the request's first
//!   `body::REPLAY_LIMIT` bytes are kept for that, and a call that sent more
//!   is not retried. Any other failure once the request may have been
//!   processed is final (gRPC calls are not idempotent in general), except
//!   under the service's retry policy (`retry`, gRFC A6): a trailers-only
//!   answer with a retryable status is sent again, preferably to another
//!   backend, after a jittered backoff (or the server's
//!   `grpc-retry-pushback-ms`, which can also forbid the retry), within
//!   `max_attempts`, the deadline, the replay limit and the service's retry
//!   throttle.
//!   Failures answer UNAVAILABLE (14); no usable backend counts as
//!   `drop_no_backend`, and all attempts failing as
//!   `drop_connect_failed`/`drop_connect_timeout`.
//! - **Deadlines.** The call's `grpc-timeout` (a malformed one is answered
//!   INTERNAL, as gRPC servers do), else the policy's `default_timeout` (zero:
//!   none). The backend gets `grpc-timeout` with the time left. When the
//!   deadline passes before the backend's response headers, the client gets
//!   a trailers-only DEADLINE_EXCEEDED (4); after them, the response ends
//!   with DEADLINE_EXCEEDED trailers. Either way the backend's stream is
//!   reset (cancelled) and `deadline_exceeded` counts it.
//! - **Draining.** A backend that is terminating, weight 0 or removed gets no
//!   new calls; its calls in flight go on; its pooled connection is let go
//!   and closes once those calls are done. A call picked just before the
//!   change may still start there.
//! - **The proxy's own drain** (service removed, mode switch, proxy
//!   shutdown): the listener closes (new connections are refused) and each
//!   client connection gets hyper's graceful shutdown, h2's two-step GOAWAY
//!   (gRFC A9 style: GOAWAY with the largest stream id and a PING, then
//!   GOAWAY with the last stream taken once the PING is answered). Calls in
//!   flight go on for up to `grpc_drain_timeout` (on a removal, at most the
//!   5 s an apply waits); what is left then is cut. On a handover, open
//!   HTTP/2 connections are closed (the listener goes on in the next agent).
//! - **Idle connections.** `tcp_idle_timeout` does not apply: an idle HTTP/2
//!   connection is normal for gRPC clients. HTTP/2 PINGs find dead clients
//!   instead (every 60 s, 20 s to answer). Backend connections: PINGs after
//!   `grpc_keepalive_interval` without a frame while calls are open, closed
//!   unanswered after `grpc_keepalive_timeout` (gRFC A8); one without calls
//!   for `grpc_idle_timeout` closes.
//! - **TLS** (`grpc.tls`, see `tls`): the listener may terminate TLS
//!   (ALPN h2, optional client certificates) before serving HTTP/2 as
//!   above, and the pool may connect to the backends over TLS; the files
//!   are followed and a new valid set applies to new connections.
//! - **Counters.** Service: client connections (`new`/`active_connections`),
//!   calls (`requests`/`active_requests`), DATA bytes and frames both ways.
//!   Backend: its pooled connections (opened, open, GOAWAYs received), the
//!   calls handed to it, and the calls it did not process that were sent
//!   again.

mod balance;
mod body;
mod calls;
mod client;
mod frames;
mod headers;
mod orca;
pub(crate) mod outlier;
mod pool;
mod retry;
mod status;
mod timeout;
mod tls;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use lb_api::GrpcPolicy;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::userspace::options::ProxyOptions;
use crate::userspace::select::{BackendKey, ServiceShared, random_u64};
use crate::userspace::stats::DropReason;
use crate::userspace::tasks::{self, HandoverCtx, Workers, accept_loop_on, stop_requested};
use balance::CallLease;
use body::{ActiveCall, CallBody, DownBody, UpBody};
use calls::{Attempt, CallEnd, CallRecord};
use client::{RespBody, SendError};
use outlier::{Outcome, Outliers};
use pool::{ConnectError, PoolOptions, Slot};
use status::{Code, http_error, trailers_only};

use pool::Pool;

/// The pooled connections of one gRPC-mode service, one pool per backend
/// and worker runtime (`ProxyOptions::grpc_per_thread_runtimes`: a call then
/// runs on the thread of its client connection and of its backend
/// connection, with no wake-up of another thread; on the shared runtime,
/// one pool per backend). The proxy keeps it beside the service's
/// selection state (`ServiceShared`, which both modes share) and tells it
/// which backends take new calls.
#[derive(Debug, Default)]
pub(crate) struct Pools {
    pools: std::sync::Mutex<HashMap<(usize, BackendKey), Arc<Pool>>>,
    /// The service's retry throttle (its retry policy's token bucket).
    throttle: retry::Throttle,
    /// The service's outlier ejections (`outlier`).
    outliers: Arc<Outliers>,
    /// The backends' load reports and the weighted round-robin
    /// (`balancing: orca_wrr`).
    orca: orca::Orca,
    /// The service's TLS (`grpc.tls`): listener and backend connections.
    tls: tls::Holder,
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, BackendKey), Arc<Pool>>> {
        self.pools
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn outliers(&self) -> &Arc<Outliers> {
        &self.outliers
    }

    /// The pool of backend `key` for this thread's worker runtime, made on
    /// first use.
    fn of(&self, key: BackendKey) -> Arc<Pool> {
        self.lock()
            .entry((tasks::worker(), key))
            .or_default()
            .clone()
    }

    /// Makes the service's TLS `spec` (none: plaintext), its files followed
    /// every `poll`. Unchanged settings keep what runs; missing or bad files
    /// are the error, and the TLS in use stays.
    pub(crate) fn set_tls(
        &self,
        spec: Option<&lb_api::GrpcTls>,
        poll: Duration,
        service: &str,
    ) -> Result<(), lb_api::tls::TlsError> {
        self.tls.set(spec, poll, service)
    }

    /// Fills in the backends' ORCA utilization and, with `balancing:
    /// orca_wrr`, weight (`lbctl grpc`).
    pub(crate) fn orca_stats(
        &self,
        policy: &GrpcPolicy,
        backends: &mut [crate::userspace::stats::BackendStats],
    ) {
        let cfg = match &policy.balancing {
            lb_api::Balancing::OrcaWrr(c) => Some(c),
            _ => None,
        };
        let now = std::time::Instant::now();
        for b in backends {
            (b.orca_utilization, b.orca_weight) = self.orca.seen((b.ip, b.port), cfg, now);
        }
    }

    /// TLS file reloads taken and refused so far (zeros without TLS).
    pub(crate) fn tls_reloads(&self) -> (u64, u64) {
        self.tls.reloads()
    }

    /// After a change of the service: the pools of `live` backends take new
    /// calls, the others drain (their calls in flight go on), and the pools
    /// of backends not in `known` are let go.
    pub(crate) fn update(&self, live: &HashSet<BackendKey>, known: &HashSet<BackendKey>) {
        self.orca.update(live, known);
        let mut pools = self.lock();
        pools.retain(|(_, k), p| {
            if live.contains(k) {
                p.undrain();
            } else {
                p.drain();
            }
            known.contains(k)
        });
    }
}

/// PINGs on client connections, so that dead clients are noticed.
const CLIENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const CLIENT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

type Server = auto::Builder<TokioExecutor>;

fn server() -> Server {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).keep_alive(false);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(CLIENT_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(CLIENT_KEEPALIVE_TIMEOUT);
    b
}

/// Accepts until `stop` turns true (or its sender goes), then closes the
/// listener and every connection (and so every call) and returns.
pub(crate) async fn serve(
    svc: Arc<ServiceShared>,
    pools: Arc<Pools>,
    listener: TcpListener,
    opts: Arc<ProxyOptions>,
    stop: watch::Receiver<bool>,
    ho: HandoverCtx,
    workers: Workers,
) {
    let server = Arc::new(server());
    // On a handover, the listener goes on; open HTTP/2 connections close.
    // On a stop, they get GOAWAY and `grpc_drain_timeout` to finish.
    let drain = stop.clone();
    // With per-thread runtimes, each client connection runs on one of
    // them, its calls and their backend connections too.
    accept_loop_on(
        &workers,
        &svc.clone(),
        listener,
        stop,
        ho,
        false,
        Vec::new(),
        opts.grpc_drain_timeout,
        |stream, peer| {
            connection(
                svc.clone(),
                pools.clone(),
                server.clone(),
                stream,
                peer,
                opts.clone(),
                drain.clone(),
            )
        },
    )
    .await;
}

/// A client connection, counted open until dropped.
struct ClientConn(Arc<ServiceShared>);

impl ClientConn {
    fn new(svc: Arc<ServiceShared>) -> Self {
        svc.counters.new.fetch_add(1, Relaxed);
        svc.counters.active.fetch_add(1, Relaxed);
        ClientConn(svc)
    }
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Relaxed);
    }
}

async fn connection(
    svc: Arc<ServiceShared>,
    pools: Arc<Pools>,
    server: Arc<Server>,
    stream: TcpStream,
    peer: SocketAddr,
    opts: Arc<ProxyOptions>,
    mut drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let _open = ClientConn::new(svc.clone());
    // TLS first, with the listener configuration current now.
    let stream = match pools.tls.listen() {
        None => tls::MaybeTls::Plain(stream),
        Some(config) => {
            let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
            let r = tokio::select! {
                r = tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, accept) => r,
                () = stop_requested(&mut drain) => return,
            };
            match r {
                Ok(Ok(s)) => {
                    svc.counters.tls_handshakes.fetch_add(1, Relaxed);
                    tls::MaybeTls::Tls(Box::new(s))
                }
                Ok(Err(e)) => {
                    svc.counters.tls_handshake_failed.fetch_add(1, Relaxed);
                    debug!(%peer, service = %svc.addr, "gRPC client refused: {}", tls::handshake_error(&e));
                    return;
                }
                Err(_) => {
                    svc.counters.tls_handshake_failed.fetch_add(1, Relaxed);
                    debug!(%peer, service = %svc.addr, "gRPC client: no TLS handshake within {:?}; closed", tls::HANDSHAKE_TIMEOUT);
                    return;
                }
            }
        }
    };
    let handler = {
        let svc = svc.clone();
        service_fn(move |req| {
            let (svc, pools, opts) = (svc.clone(), pools.clone(), opts.clone());
            async move { Ok::<_, Infallible>(handle(svc, &pools, opts, req).await) }
        })
    };
    let conn = server.serve_connection(TokioIo::new(stream), handler);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        () = stop_requested(&mut drain) => {
            // GOAWAY in two steps (gRFC A9; h2's graceful shutdown): the
            // largest stream id and a PING, then, once the PING is
            // answered, the last stream taken. Calls in flight go on; the
            // connection closes when they are done.
            debug!(%peer, service = %svc.addr, "gRPC client connection: draining");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        debug!(%peer, service = %svc.addr, "gRPC client connection ended: {e}");
    }
}

/// Whether a content type is gRPC's (`application/grpc`, `application/grpc+proto`, ...).
fn is_grpc(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

/// Answers one request: refuses what is not gRPC, else proxies the call.
async fn handle(
    svc: Arc<ServiceShared>,
    pools: &Pools,
    opts: Arc<ProxyOptions>,
    req: Request<Incoming>,
) -> Response<DownBody> {
    let refuse = |status, message: &str, close| {
        svc.counters.bad_requests.fetch_add(1, Relaxed);
        debug!(service = %svc.addr, %status, "gRPC mode: refused a request: {message}");
        http_error(status, message, close)
    };
    if req.version() != Version::HTTP_2 {
        return refuse(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "rpclb: this is a gRPC service; it speaks HTTP/2 only (h2c with prior knowledge)",
            true,
        );
    }
    if req.method() != Method::POST {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "rpclb: gRPC calls are POST requests",
            false,
        );
    }
    if !is_grpc(req.headers().get(CONTENT_TYPE)) {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "rpclb: this is a gRPC service; content-type must be application/grpc",
            false,
        );
    }
    let Some(policy) = svc.policy() else {
        // Only gRPC services run this; never expected.
        return trailers_only(Code::Internal, "rpclb: service is not in the gRPC mode");
    };
    let timeout = match timeout::from_headers(req.headers()) {
        Ok(Some(t)) => Some(t),
        Ok(None) => Some(policy.default_timeout).filter(|t| !t.is_zero()),
        Err(e) => {
            svc.counters.bad_requests.fetch_add(1, Relaxed);
            return trailers_only(Code::Internal, &format!("rpclb: {e}"));
        }
    };
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let active = ActiveCall::new(svc.clone());
    let mut record = CallRecord::new(svc.clone());

    let (mut parts, body) = req.into_parts();
    let ids = headers::prepare_request(&mut parts.headers, &policy, &mut random_u64);
    parts.uri = upstream_uri(parts.uri);
    let (up, over) = UpBody::new(body, svc.clone());
    let req = Request::from_parts(parts, up);
    debug!(
        service = %svc.addr,
        path = req.uri().path(),
        request_id = ?ids.request_id,
        ?timeout,
        "gRPC call"
    );
    // Kept for the failure log only when that is on (no copy per call).
    let path = tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_string());

    let call = with_retries(&svc, pools, &opts, &policy, req, deadline);
    // One timer per call: it bounds the wait for the backend's headers,
    // then the response body (`CallBody`).
    let mut timer = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
    let res = match &mut timer {
        Some(t) => tokio::select! {
            biased;
            r = call => r,
            () = t.as_mut() => Err(Failure::Deadline),
        },
        None => call.await,
    };
    match res {
        Ok((resp, lease, slot, attempt)) => {
            let (mut parts, body) = resp.into_parts();
            let end = CallEnd::new(record, attempt, &parts.headers);
            headers::strip_hop_by_hop(&mut parts.headers);
            let body = CallBody::new(body, timer, lease, active, over, slot, end);
            Response::from_parts(parts, DownBody::Call(Box::new(body)))
        }
        Err(f) => {
            let (code, message) = match &f {
                Failure::Deadline => {
                    svc.counters.deadline_exceeded.fetch_add(1, Relaxed);
                    (
                        Code::DeadlineExceeded,
                        format!(
                            "rpclb: deadline exceeded ({:?}) before the backend answered",
                            timeout.unwrap_or_default()
                        ),
                    )
                }
                Failure::NoBackend => {
                    svc.counters.dropped(DropReason::NoBackend);
                    (
                        Code::Unavailable,
                        format!("rpclb: no backend available for {}", svc.addr),
                    )
                }
                Failure::BackendsFull => {
                    svc.counters.dropped(DropReason::BackendsFull);
                    (
                        Code::Unavailable,
                        format!(
                            "rpclb: every backend of {} is at its limit of outstanding calls",
                            svc.addr
                        ),
                    )
                }
                Failure::Connect(reason, last) => {
                    svc.counters.dropped(*reason);
                    (
                        Code::Unavailable,
                        format!("rpclb: no backend reachable for {}: {last}", svc.addr),
                    )
                }
                Failure::Backend(addr, e) => (
                    Code::Unavailable,
                    format!("rpclb: backend {addr} failed the call: {e}"),
                ),
            };
            debug!(service = %svc.addr, path = path.as_deref().unwrap_or("-"), "gRPC call failed: {message}");
            record.finish(code as u32);
            trailers_only(code, &message)
        }
    }
}

/// The backend-side URI: the client's path and authority, scheme `http`.
fn upstream_uri(uri: Uri) -> Uri {
    // hyper gives an HTTP/2 request's URI its :scheme and :authority.
    if uri.scheme() == Some(&Scheme::HTTP) && uri.authority().is_some() {
        return uri;
    }
    let mut parts = uri.into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if parts.authority.is_none() {
        parts.authority = Some(Authority::from_static("rpclb"));
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    // Scheme, authority and path are all set, so this cannot fail.
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("http://rpclb/"))
}

/// Why a call got no response from a backend.
#[derive(Debug)]
enum Failure {
    Deadline,
    NoBackend,
    /// Every backend was at its QoS limit of outstanding calls.
    BackendsFull,
    /// Every attempt failed before the request was written: the last
    /// attempt's reason and error.
    Connect(DropReason, ConnectError),
    /// The request went to this backend, which then failed it.
    Backend(SocketAddr, h2::Error),
}

/// Whether the backend refused the call's stream (RST_STREAM REFUSED_STREAM).
fn refused(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Whether a backend failed a call without processing it, so that it may
/// be sent again (gRFC A6): the stream was refused (RST_STREAM
/// REFUSED_STREAM), or it was above the last stream of a graceful GOAWAY
/// (h2 fails exactly those streams with the GOAWAY's NO_ERROR).
fn unprocessed(e: &h2::Error) -> bool {
    refused(e) || (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
}

/// A backend's response headers, the call's lease and stream, and the
/// attempt (ended by the response body).
type Answer = (Response<RespBody>, CallLease, Slot, Attempt);

/// [`forward`], then, under the service's retry policy (gRFC A6), again
/// while the answer is a trailers-only retryable status: on another backend
/// if there is one, after a jittered exponential backoff, up to
/// `max_attempts` attempts, not past the deadline, while the request is
/// all kept ([`body::REPLAY_LIMIT`]) and the retry throttle allows.
/// Otherwise the last answer goes to the client as it is.
async fn with_retries(
    svc: &Arc<ServiceShared>,
    pools: &Pools,
    opts: &ProxyOptions,
    policy: &GrpcPolicy,
    req: Request<UpBody>,
    deadline: Option<Instant>,
) -> Result<Answer, Failure> {
    let Some(rp) = &policy.retry else {
        return forward(svc, pools, opts, req, deadline, &[]).await;
    };
    let (method, uri, version) = (req.method().clone(), req.uri().clone(), req.version());
    let headers = req.headers().clone();
    let replay = req.body().replay();
    let mut req = req;
    let mut failed: Vec<BackendKey> = Vec::new();
    let mut attempt = 1;
    // The exponent of the next backoff; a server pushback resets it (A6).
    let mut backoff_n = 1;
    loop {
        let answer = forward(svc, pools, opts, req, deadline, &failed).await?;
        let be = answer.1.backend().clone();
        let status = retry::trailers_only_status(answer.0.headers());
        let retryable = status.is_some_and(|c| rp.retryable_status_codes.contains(&c));
        let allowed = pools.throttle.record(rp.throttle, retryable);
        if !retryable || attempt >= rp.max_attempts {
            return Ok(answer);
        }
        if !allowed {
            be.counters.retries_throttled.fetch_add(1, Relaxed);
            debug!(backend = %be.addr(), "gRPC call not retried: retry throttle");
            return Ok(answer);
        }
        let wait = match retry::pushback(answer.0.headers()) {
            Some(retry::Pushback::Stop) => {
                debug!(backend = %be.addr(), "gRPC call not retried: server pushback");
                return Ok(answer);
            }
            // Exactly the server's delay; the backoff starts over after it.
            Some(retry::Pushback::After(d)) => {
                backoff_n = 1;
                d
            }
            None => {
                backoff_n += 1;
                retry::backoff(rp, backoff_n - 1, random_u64())
            }
        };
        if deadline.is_some_and(|d| Instant::now() + wait >= d) {
            return Ok(answer);
        }
        // Built before the wait: a body past the replay limit is not retried.
        let Some(body) = replay.retry() else {
            return Ok(answer);
        };
        let mut next = Request::new(body);
        *next.method_mut() = method.clone();
        *next.uri_mut() = uri.clone();
        *next.version_mut() = version;
        *next.headers_mut() = headers.clone();
        next.headers_mut()
            .insert(retry::PREVIOUS_ATTEMPTS, HeaderValue::from(attempt));
        be.counters.retries.fetch_add(1, Relaxed);
        debug!(
            backend = %be.addr(),
            status = ?status,
            attempt,
            ?wait,
            "gRPC call answered with a retryable status; retrying"
        );
        failed.push(be.key());
        let mut answer = answer;
        answer.3.answered(status.unwrap_or(14));
        drop(answer);
        tokio::time::sleep(wait).await;
        req = next;
        attempt += 1;
    }
}

/// Sends the call to a backend, retrying on another while nothing was sent
/// and, up to `grpc_transparent_retries` times, when a backend did not
/// process it; the backend's response headers, the call's lease and stream.
/// Backends in `avoid` are picked only when no other one is left.
async fn forward(
    svc: &Arc<ServiceShared>,
    pools: &Pools,
    opts: &ProxyOptions,
    mut req: Request<UpBody>,
    deadline: Option<Instant>,
    avoid: &[BackendKey],
) -> Result<Answer, Failure> {
    let pool_opts = PoolOptions::from(opts);
    let mut tried: Vec<BackendKey> = Vec::new();
    let mut failure = None;
    let mut attempts = opts.connect_attempts.max(1);
    let mut retries = opts.grpc_transparent_retries;
    while attempts > 0 {
        attempts -= 1;
        // A transparent retry may go to the same backend (another connection).
        let avoided = (!avoid.is_empty())
            .then(|| balance::pick(svc, &pools.orca, &[&tried[..], avoid].concat()))
            .flatten();
        let lease = match avoided.map_or_else(|| balance::try_pick(svc, &pools.orca, &tried), Ok) {
            Ok(l) => l,
            Err(why) => {
                // Full at the first pick; after failures, the last failure.
                if why == balance::NoPick::Full && failure.is_none() {
                    failure = Some(Failure::BackendsFull);
                }
                break;
            }
        };
        let be = lease.backend().clone();
        let (sender, slot) = match pools
            .of(be.key())
            .get(be.addr(), &be.counters, &pool_opts, &pools.tls)
            .await
        {
            Ok(s) => s,
            // Drained since the pick: not a failure, try another.
            Err(ConnectError::Draining) => {
                tried.push(be.key());
                continue;
            }
            Err(e) => {
                tried.push(be.key());
                debug!(backend = %be.addr(), "gRPC backend: {e}");
                svc.counters.connect_failed(&be.counters);
                pools.outliers().record(svc, &be, Outcome::Failure);
                let reason = match e {
                    ConnectError::Timeout => DropReason::ConnectTimeout,
                    _ => DropReason::ConnectFailed,
                };
                failure = Some(Failure::Connect(reason, e));
                continue;
            }
        };
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Deadline);
            }
            if let Ok(v) = HeaderValue::try_from(timeout::format(left)) {
                req.headers_mut().insert(timeout::GRPC_TIMEOUT, v);
            }
        }
        // The head, kept for a transparent retry; the body keeps itself.
        let again = (retries > 0).then(|| {
            let mut b = Request::builder()
                .method(req.method().clone())
                .uri(req.uri().clone())
                .version(req.version());
            if let Some(h) = b.headers_mut() {
                *h = req.headers().clone();
            }
            (b, req.body().replay())
        });
        req.body_mut().send_to(be.counters.clone());
        be.counters.requests.fetch_add(1, Relaxed);
        let mut attempt = Attempt::new(svc.clone(), pools.outliers().clone(), be.clone());
        let err = match sender.send(req).await {
            Ok(resp) => {
                // A trailers-only answer's load report is in its headers.
                lease.report(resp.headers());
                return Ok((resp, lease, slot, attempt));
            }
            Err(e) => e,
        };
        // The backend did not take the call.
        be.counters.requests.fetch_sub(1, Relaxed);
        let err = match err {
            SendError::Failed(err) => err,
            SendError::Unsent(back, e) => {
                // Not sent: the connection closed or went away first.
                req = *back;
                attempt.unsent();
                if slot.went_away() && retries > 0 {
                    // Not the backend's failure: another connection.
                    retries -= 1;
                    attempts += 1;
                    be.counters.transparent_retries.fetch_add(1, Relaxed);
                    continue;
                }
                tried.push(be.key());
                svc.counters.connect_failed(&be.counters);
                pools.outliers().record(svc, &be, Outcome::Failure);
                debug!(backend = %be.addr(), "gRPC backend connection closed before the call was sent: {e}");
                let err = ConnectError::Connect(e.to_string());
                failure = Some(Failure::Connect(DropReason::ConnectFailed, err));
                continue;
            }
        };
        // A refused stream counts toward ejection; a graceful GOAWAY's
        // unprocessed one does not.
        attempt.failed(!unprocessed(&err) || refused(&err));
        if unprocessed(&err)
            && let Some((head, replay)) = again
            && let Some(body) = replay.retry()
            && let Ok(r) = head.body(body)
        {
            // gRFC A6 transparent retry: the backend did not process it.
            debug!(backend = %be.addr(), "gRPC call not processed by the backend ({err}); sending it again");
            retries -= 1;
            attempts += 1;
            be.counters.transparent_retries.fetch_add(1, Relaxed);
            req = r;
            continue;
        }
        be.counters.requests.fetch_add(1, Relaxed);
        return Err(Failure::Backend(be.addr(), err));
    }
    Err(failure.unwrap_or(Failure::NoBackend))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_per_backend_and_worker_thread() {
        let pools = Pools::default();
        let key = (std::net::IpAddr::from([10, 244, 0, 1]), 50051);
        let a = pools.of(key);
        assert!(Arc::ptr_eq(&a, &pools.of(key)), "one pool per backend here");
        let b = std::thread::scope(|s| {
            s.spawn(|| {
                tasks::set_worker(1);
                pools.of(key)
            })
            .join()
            .unwrap()
        });
        assert!(!Arc::ptr_eq(&a, &b), "worker 1 has its own pool");
        // A change of the service reaches every worker's pool.
        pools.update(&HashSet::new(), &HashSet::from([key]));
        assert!(a.is_draining() && b.is_draining());
        pools.update(&HashSet::from([key]), &HashSet::from([key]));
        assert!(!a.is_draining() && !b.is_draining());
    }

    #[test]
    fn grpc_content_types() {
        let ct = |s: &'static str| Some(HeaderValue::from_static(s));
        assert!(is_grpc(ct("application/grpc").as_ref()));
        assert!(is_grpc(ct("application/grpc+proto").as_ref()));
        assert!(is_grpc(ct("application/grpc+json").as_ref()));
        assert!(!is_grpc(ct("application/grpc-web").as_ref()));
        assert!(!is_grpc(ct("application/json").as_ref()));
        assert!(!is_grpc(None));
    }

    #[test]
    fn upstream_uris_are_absolute() {
        let u = upstream_uri(Uri::from_static("/grpc.testing.TestService/UnaryCall"));
        assert_eq!(
            u.to_string(),
            "http://rpclb/grpc.testing.TestService/UnaryCall"
        );
        let u = upstream_uri(Uri::from_static("http://10.96.0.1:50051/a.B/C"));
        assert_eq!(u.to_string(), "http://10.96.0.1:50051/a.B/C");
        // A call over TLS goes on as http (the backend side's own TLS aside).
        let u = upstream_uri(Uri::from_static("https://10.96.0.1:50051/a.B/C"));
        assert_eq!(u.to_string(), "http://10.96.0.1:50051/a.B/C");
    }
}
