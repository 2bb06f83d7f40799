//! Lab tests of the gRPC (L7) mode: the userspace proxy runs in the lab's
//! node namespace with a `grpc: Some` service, three `grpc.testing.TestService`
//! backends run in the backend namespaces, and a tonic client in the client
//! namespace calls the VIP over one HTTP/2 connection. Need root; each test
//! prints SKIP and passes otherwise (fails under CI).
//!
//! The backends are `rpclb_tests::grpc`'s TestService (the demo's too),
//! served by hyper directly (not tonic's server, which enforces
//! `grpc-timeout` itself and would race the proxy's deadline). They log the
//! headers of every call, can sleep (`x-sleep-ms`) or hold a call until
//! released (`x-hold`), and count handlers cancelled before they finished.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use lb_agent::userspace::{
    BackendStatus, DropReason, ProxyOptions, ServiceStats, UserspaceProxy, datapath_snapshot,
};
use lb_api::{Algorithm, Backend, BackendState, DesiredState, GrpcPolicy, Protocol, Service};
use rpclb_tests::grpc::proto::test_service_client::TestServiceClient;
use rpclb_tests::grpc::proto::{
    ResponseParameters, SimpleRequest, SimpleResponse, StreamingOutputCallRequest,
};
use rpclb_tests::grpc::{
    GrpcServer, HOLD, Journal, SLEEP, Seen, ServerOptions, TEST_HEADER, TestBackend, text,
};
use rpclb_tests::lab::Lab;
use rpclb_tests::skip_unless_lab;
use tonic::codegen::http::HeaderMap;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const PORT: u16 = 50051;
const BACKEND_PORT: u16 = 50051;
/// A port nothing listens on, in the backends.
const DEAD_PORT: u16 = 50999;

const ADDED: (&str, &str) = ("x-rpclb-env", "lab");

/// Bound of every single call and wait in these tests.
const CALL: Duration = Duration::from_secs(5);

// ---- backends -------------------------------------------------------------

/// A TestService in every backend namespace, answering `backend-<i>`.
struct Backends {
    journal: Arc<Journal>,
    servers: Vec<Option<GrpcServer>>,
    accepted: Vec<Arc<AtomicU64>>,
    /// Per backend: the status its unary calls fail with (0: none).
    failing: Vec<Arc<std::sync::atomic::AtomicI32>>,
}

impl Backends {
    fn start(lab: &Lab) -> Backends {
        Self::start_with(lab, &ServerOptions::default())
    }

    fn start_with(lab: &Lab, opts: &ServerOptions) -> Backends {
        let journal = Arc::new(Journal::default());
        let mut accepted = Vec::new();
        let mut failing = Vec::new();
        let servers = (1..=lab.backends().len())
            .map(|i| {
                let backend = TestBackend::new(i, format!("backend-{i}"), journal.clone());
                failing.push(backend.failing());
                let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT));
                let opts = ServerOptions {
                    accepted: Arc::default(),
                    ..opts.clone()
                };
                accepted.push(opts.accepted.clone());
                Some(
                    GrpcServer::start_with(&lab.backend(i).ns, any, backend, opts)
                        .expect("gRPC backend"),
                )
            })
            .collect();
        Backends {
            journal,
            servers,
            accepted,
            failing,
        }
    }

    fn log(&self) -> Vec<Seen> {
        self.journal.log()
    }

    fn cancelled(&self) -> u64 {
        self.journal.cancelled()
    }

    /// Connections backend `i` (1-based) accepted.
    fn accepted(&self, i: usize) -> u64 {
        self.accepted[i - 1].load(Relaxed)
    }

    /// Backend `i` answers every unary call with `code` (trailers-only).
    fn fail_with(&self, i: usize, code: Code) {
        self.failing[i - 1].store(code as i32, Relaxed);
    }

    /// Stops backend `i` at once: its runtime and sockets go, calls in
    /// flight included (as a killed process's would).
    fn kill(&mut self, i: usize) {
        self.servers[i - 1].take();
    }
}

// ---- proxy and client helpers ---------------------------------------------

/// Starts the proxy from inside the node namespace.
fn proxy(lab: &Lab) -> UserspaceProxy {
    proxy_with(lab, |_| {})
}

/// [`proxy`], with options changed by `f`.
fn proxy_with(lab: &Lab, f: impl FnOnce(&mut ProxyOptions)) -> UserspaceProxy {
    rpclb_tests::grpc::start_proxy(lab, f)
}

fn policy(default_timeout: Duration) -> GrpcPolicy {
    GrpcPolicy {
        default_timeout,
        add_headers: vec![(ADDED.0.to_string(), ADDED.1.to_string())],
        ..GrpcPolicy::default()
    }
}

fn grpc_service(backends: Vec<Backend>, policy: GrpcPolicy) -> Service {
    let mut s = Service::new(
        "lab/grpc:grpc",
        VIP,
        PORT,
        Protocol::Tcp,
        // Does not apply in the gRPC mode.
        Algorithm::Maglev,
        backends,
    );
    s.grpc = Some(policy);
    s
}

fn backends(lab: &Lab) -> Vec<Backend> {
    lab.backends()
        .iter()
        .map(|h| Backend::new(h.ip(), BACKEND_PORT))
        .collect()
}

fn state(s: &Service) -> DesiredState {
    DesiredState {
        services: vec![s.clone()],
    }
}

fn stats(p: &UserspaceProxy) -> ServiceStats {
    p.stats()
        .into_iter()
        .find(|s| s.addr.vip == VIP && s.addr.port == PORT)
        .expect("stats of the gRPC service")
}

/// Polls the stats until `ok` holds (at most 5 s); returns the last ones
/// either way, for the caller's exact assertions.
fn settled(p: &UserspaceProxy, ok: impl Fn(&ServiceStats) -> bool) -> ServiceStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = stats(p);
        if ok(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (at most 5 s) until `ok` holds; whether it did.
async fn eventually(ok: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !ok() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Runs `f` on a fresh single-thread runtime in the client namespace (every
/// socket it opens is the client's).
fn in_client<F, Fut, R>(lab: &Lab, f: F) -> R
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = R>,
    R: Send,
{
    rpclb_tests::grpc::block_on_in(&lab.client().ns, f)
}

/// One channel, connected now: one HTTP/2 connection for every call on it.
async fn channel() -> TestServiceClient<Channel> {
    rpclb_tests::grpc::connect(VIP, PORT).await
}

/// A unary call with these headers, bounded by [`CALL`].
async fn unary(
    c: &mut TestServiceClient<Channel>,
    headers: &[(&'static str, &str)],
) -> Result<SimpleResponse, Status> {
    let mut req = Request::new(SimpleRequest::default());
    for (k, v) in headers {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    match tokio::time::timeout(CALL, c.unary_call(req)).await {
        Ok(r) => r.map(Response::into_inner),
        Err(_) => Err(Status::unknown("test: call not answered in time")),
    }
}

/// `n` unary calls, `width` at a time, on clones of one channel; each sends
/// `x-test-header: call-<k>` and must echo it. Returns the serving backend of
/// each call, in call order.
async fn many_calls(c: &TestServiceClient<Channel>, n: usize, width: usize) -> Vec<String> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..width {
        let mut c = c.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            for k in (w..n).step_by(width) {
                let tag = format!("call-{k}");
                let r = unary(&mut c, &[(TEST_HEADER, &tag)]).await;
                let r = r.unwrap_or_else(|e| panic!("call {k}: {e}"));
                assert_eq!(r.test_header, tag, "x-test-header echoed");
                out.push((k, r.served_by));
            }
            out
        });
    }
    let mut all: Vec<(usize, String)> = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("caller task"));
    }
    all.sort();
    assert_eq!(all.len(), n);
    all.into_iter().map(|(_, b)| b).collect()
}

fn per_backend(served: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for b in served {
        *m.entry(b.clone()).or_default() += 1;
    }
    m
}

/// A gRPC response as [`raw_call`] got it.
struct Raw {
    headers: HeaderMap,
    trailers: Option<HeaderMap>,
    took: Duration,
}

impl Raw {
    /// `grpc-status` and `grpc-message`, from a trailers-only response or the
    /// trailers.
    fn status(&self) -> (String, String) {
        let h = match &self.headers.get("grpc-status") {
            Some(_) => &self.headers,
            None => self.trailers.as_ref().expect("trailers"),
        };
        (text(h, "grpc-status"), text(h, "grpc-message"))
    }
}

/// One UnaryCall made by hand over a new HTTP/2 connection, with these extra
/// headers: tonic's client would enforce a `grpc-timeout` itself and race
/// the proxy's deadline.
async fn raw_call(headers: &[(&str, &str)]) -> Raw {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect((VIP, PORT))
        .await
        .expect("connect to the VIP");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let mut req = tonic::codegen::http::Request::post(format!(
        "http://{VIP}:{PORT}/grpc.testing.TestService/UnaryCall"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    // One empty message: not compressed, length 0.
    let body = http_body_util::Full::new(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]));
    let t0 = Instant::now();
    let resp = tokio::time::timeout(CALL, send.send_request(req.body(body).unwrap()))
        .await
        .expect("response in time")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(CALL, body.collect())
        .await
        .expect("body in time")
        .expect("body");
    Raw {
        headers: parts.headers,
        trailers: body.trailers().cloned(),
        took: t0.elapsed(),
    }
}

/// W3C traceparent, version 00.
fn valid_traceparent(v: &str) -> bool {
    let p: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    };
    p.len() == 4
        && p[0] == "00"
        && hex(p[1], 32)
        && p[1] != "0".repeat(32)
        && hex(p[2], 16)
        && p[2] != "0".repeat(16)
        && hex(p[3], 2)
}

/// A `grpc-timeout` value as a duration.
fn grpc_timeout(v: &str) -> Duration {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().expect("grpc-timeout digits");
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("grpc-timeout unit {unit:?}"),
    }
}

// ---- tests ----------------------------------------------------------------

/// What no L4 balancer can do: the calls of one HTTP/2 connection spread
/// over every backend. Also headers, streaming, pooling and counters.
#[test]
fn grpc_calls_of_one_connection_spread_over_backends() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let be = Backends::start(&lab);
    let p = proxy(&lab);
    let svc = grpc_service(backends(&lab), policy(Duration::from_secs(30)));
    let sum = p.apply(&state(&svc)).unwrap();
    assert_eq!(sum.added, 1);
    assert_eq!(p.routes(), vec![VIP]);

    const N: usize = 300;
    let good_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (served, streamed, bidi, kept, replaced) = in_client(&lab, || async {
        let mut c = channel().await;
        let served = many_calls(&c, N, 10).await;

        // The client's own ids go through as they are; an invalid
        // traceparent is replaced.
        let kept = unary(
            &mut c,
            &[
                ("x-request-id", "client-id-1"),
                ("traceparent", good_parent),
                (TEST_HEADER, "ids"),
            ],
        )
        .await
        .expect("call with ids");
        let replaced = unary(
            &mut c,
            &[
                ("x-request-id", "client-id-2"),
                ("traceparent", "00-bad"),
                (TEST_HEADER, "ids"),
            ],
        )
        .await
        .expect("call with a bad traceparent");

        // Server streaming: 5 messages, all from one backend.
        let mut req = Request::new(StreamingOutputCallRequest {
            response_parameters: vec![ResponseParameters::default(); 5],
            payload: None,
        });
        req.metadata_mut()
            .insert(TEST_HEADER, "streaming".parse().unwrap());
        let mut s = c
            .streaming_output_call(req)
            .await
            .expect("stream")
            .into_inner();
        let mut streamed = Vec::new();
        for _ in 0..10 {
            match tokio::time::timeout(CALL, s.message()).await {
                Ok(Ok(Some(m))) => streamed.push(m),
                Ok(Ok(None)) => break,
                Ok(Err(e)) => panic!("stream: {e}"),
                Err(_) => panic!("stream: no message in time"),
            }
        }

        // Bidi: three messages in, one reply each, then a clean end.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert(TEST_HEADER, "bidi".parse().unwrap());
        let mut s = c.full_duplex_call(req).await.expect("bidi").into_inner();
        let mut bidi = Vec::new();
        for _ in 0..3 {
            tx.send(StreamingOutputCallRequest::default())
                .await
                .unwrap();
            let m = tokio::time::timeout(CALL, s.message()).await;
            bidi.push(
                m.expect("bidi reply in time")
                    .expect("bidi reply")
                    .expect("a reply"),
            );
        }
        drop(tx);
        let end = tokio::time::timeout(CALL, s.message()).await;
        assert!(matches!(end, Ok(Ok(None))), "bidi ends OK: {end:?}");
        (served, streamed, bidi, kept, replaced)
    });

    // Spread: each backend within 100 +- 40 of the 300 calls (pure random
    // choice would give a standard deviation of 8.2; least-outstanding
    // narrows it further).
    let per = per_backend(&served);
    assert_eq!(per.len(), 3, "{per:?}");
    for (b, n) in &per {
        assert!((60..=140).contains(n), "{b}: {n} of {N}: {per:?}");
    }

    // Streams: every message, from one backend, metadata echoed.
    assert_eq!(streamed.len(), 5);
    assert!(
        streamed
            .iter()
            .all(|m| m.served_by == streamed[0].served_by)
    );
    assert!(streamed.iter().all(|m| m.test_header == "streaming"));
    assert_eq!(bidi.len(), 3);
    assert!(bidi.iter().all(|m| m.test_header == "bidi"));

    // Headers as the backends saw them.
    let log = be.log();
    let unary_log: Vec<&Seen> = log.iter().filter(|s| s.method == "unary").collect();
    assert_eq!(unary_log.len(), N + 2);
    let mut ids = HashSet::new();
    for s in &log {
        let id = s.header("x-request-id").expect("x-request-id");
        assert!(ids.insert(id.to_string()), "x-request-id {id} repeated");
        let tp = s.header("traceparent").expect("traceparent");
        assert!(valid_traceparent(tp), "traceparent {tp:?}");
        assert_eq!(s.header(ADDED.0), Some(ADDED.1), "added header");
        // The time left of the 30 s default deadline.
        let t = grpc_timeout(s.header("grpc-timeout").expect("grpc-timeout"));
        assert!(
            t <= Duration::from_secs(30) && t > Duration::from_secs(25),
            "{t:?}"
        );
        assert!(s.header("x-test-header").is_some(), "metadata propagated");
    }
    let by_tag = |tag: &str| {
        log.iter()
            .find(|s| s.header("x-request-id") == Some(tag))
            .unwrap_or_else(|| panic!("no call with {tag}"))
    };
    assert_eq!(
        by_tag("client-id-1").header("traceparent"),
        Some(good_parent)
    );
    let fresh = by_tag("client-id-2").header("traceparent").unwrap();
    assert!(valid_traceparent(fresh) && fresh != "00-bad", "{fresh}");
    assert!(!kept.served_by.is_empty() && !replaced.served_by.is_empty());
    // Which backend answered agrees with which backend logged the call.
    for (k, by) in served.iter().enumerate() {
        let tag = format!("call-{k}");
        let seen = log
            .iter()
            .find(|s| s.header(TEST_HEADER) == Some(tag.as_str()))
            .unwrap();
        assert_eq!(*by, format!("backend-{}", seen.backend));
    }

    // Counters: one client connection; one pooled connection per backend;
    // calls per backend exactly as the backends logged them.
    let calls = log.len() as u64;
    let s = settled(&p, |s| {
        s.active_requests == 0 && s.backends.iter().all(|b| b.active_requests == 0)
    });
    assert!(s.grpc);
    assert_eq!(s.new_connections, 1, "one client connection: {s:?}");
    assert_eq!((s.requests, s.active_requests), (calls, 0));
    assert_eq!((s.deadline_exceeded, s.bad_requests), (0, 0));
    assert_eq!((s.total_drops(), s.connect_failures), (0, 0));
    assert!(s.bytes_in > 0 && s.bytes_out > 0 && s.packets_out >= calls);
    for b in &s.backends {
        let i = lab.backends().iter().position(|h| h.ip() == b.ip).unwrap() + 1;
        let logged = log.iter().filter(|x| x.backend == i).count() as u64;
        assert_eq!(b.requests, logged, "{b:?}");
        assert_eq!(b.active_requests, 0);
        assert_eq!(
            (b.new_connections, b.active_connections),
            (1, 1),
            "one pooled connection: {b:?}"
        );
        assert_eq!(b.status, BackendStatus::Active);
    }
    assert_eq!(s.backends.iter().map(|b| b.requests).sum::<u64>(), calls);
    assert_eq!(
        s.backends.iter().map(|b| b.bytes_out).sum::<u64>(),
        s.bytes_out
    );
    // The metrics count calls as the flows of a gRPC service.
    let snap = datapath_snapshot(&p.stats());
    let m = &snap.services[0];
    assert_eq!(m.stats.new_flows, calls);
    assert_eq!(m.backends.iter().map(|b| b.new_flows).sum::<u64>(), calls);

    p.shutdown().unwrap();
}

/// Deadlines (the client's and the service default), no backend, failed
/// connects, malformed timeouts and HTTP/1.
#[test]
fn grpc_deadlines_and_errors() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let be = Backends::start(&lab);
    let p = proxy(&lab);
    let relaxed = policy(Duration::from_secs(30));
    let mut svc = grpc_service(backends(&lab), relaxed.clone());
    p.apply(&state(&svc)).unwrap();
    // Warm up: every backend gets its pooled connection first, so that the
    // short deadlines below are not spent connecting.
    const WARM: usize = 30;
    in_client(&lab, || async {
        many_calls(&channel().await, WARM, 3).await
    });
    let s = settled(&p, |s| s.backends.iter().all(|b| b.active_connections == 1));
    assert!(
        s.backends.iter().all(|b| b.active_connections == 1),
        "{s:?}"
    );

    // A shorter default deadline, for new calls from now on.
    let default = Duration::from_secs(1);
    svc.grpc = Some(policy(default));
    assert_eq!(p.apply(&state(&svc)).unwrap().updated, 1);

    let (by_client, by_default, malformed, streamed) = in_client(&lab, || async {
        // grpc-timeout 100 ms to a backend that sleeps 1 s.
        let by_client = raw_call(&[("grpc-timeout", "100m"), (SLEEP, "1000")]).await;

        // No grpc-timeout: the service's 1 s, to a 3 s sleeper.
        let t0 = Instant::now();
        let r = unary(&mut channel().await, &[(SLEEP, "3000")]).await;
        let by_default = (r.map(|_| ()), t0.elapsed());

        let malformed = raw_call(&[("grpc-timeout", "soon")]).await;

        // Deadline after the response headers: a stream of 20 messages, one
        // per 100 ms, under the 1 s default. The first ones arrive, then the
        // proxy ends the stream with DEADLINE_EXCEEDED trailers.
        let mut req = Request::new(StreamingOutputCallRequest {
            response_parameters: vec![
                ResponseParameters {
                    size: 0,
                    interval_us: 100_000,
                };
                20
            ],
            payload: None,
        });
        req.metadata_mut()
            .insert(TEST_HEADER, "slow".parse().unwrap());
        let mut s = channel().await;
        let t0 = Instant::now();
        let mut s = s
            .streaming_output_call(req)
            .await
            .expect("stream")
            .into_inner();
        let mut got = 0;
        let end = loop {
            match tokio::time::timeout(CALL, s.message()).await {
                Ok(Ok(Some(_))) if got < 20 => got += 1,
                other => break other,
            }
        };
        let streamed = (got, end, t0.elapsed());
        (by_client, by_default, malformed, streamed)
    });

    // Trailers-only DEADLINE_EXCEEDED from the proxy, before the backend's
    // answer at 1 s.
    assert_eq!(
        by_client.headers.get("content-type").unwrap(),
        "application/grpc"
    );
    let (code, message) = by_client.status();
    assert_eq!(code, "4", "{message}");
    assert!(message.contains("rpclb: deadline exceeded"), "{message}");
    assert!(by_client.trailers.is_none(), "trailers-only");
    let took = by_client.took;
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(900),
        "answered after {took:?}"
    );
    let (r, took) = by_default;
    let e = r.expect_err("default deadline exceeded");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("rpclb: deadline exceeded"), "{e:?}");
    assert!(
        took >= default && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let (code, message) = malformed.status();
    assert_eq!(code, "13", "{message}");
    assert!(message.contains("malformed grpc-timeout"), "{message}");

    let (got, end, took) = streamed;
    let e = match end {
        Ok(Err(e)) => e,
        other => panic!("stream should end with an error: {other:?}"),
    };
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("rpclb: deadline exceeded"), "{e:?}");
    assert!((1..20).contains(&got), "{got} messages before the deadline");
    assert!(took >= default, "{took:?}");

    // The backends got the time left, and every call was cancelled there.
    let log = be.log().split_off(WARM);
    assert_eq!(
        log.len(),
        3,
        "the malformed call never reached a backend: {log:?}"
    );
    let t = grpc_timeout(log[0].header("grpc-timeout").unwrap());
    assert!(t <= Duration::from_millis(100), "{t:?}");
    for x in &log[1..] {
        let t = grpc_timeout(x.header("grpc-timeout").unwrap());
        assert!(t <= default && t >= default / 4, "{t:?}");
    }
    let deadline = Instant::now() + CALL;
    while be.cancelled() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(be.cancelled(), 3, "backend handlers cancelled");
    let s = settled(&p, |s| s.active_requests == 0);
    assert_eq!((s.deadline_exceeded, s.bad_requests), (3, 1));
    assert_eq!((s.requests, s.active_requests), (WARM as u64 + 3, 0));

    // A backend that refuses connections: calls are retried elsewhere
    // (nothing was sent), and all succeed.
    let b1 = lab.backend(1).ip();
    svc.grpc = Some(relaxed);
    svc.backends.push(Backend::new(b1, DEAD_PORT));
    let sum = p.apply(&state(&svc)).unwrap();
    assert_eq!(sum.updated, 1);
    let served = in_client(&lab, || async { many_calls(&channel().await, 60, 4).await });
    assert_eq!(served.len(), 60);
    let s = stats(&p);
    let dead = s.backend(b1, DEAD_PORT).unwrap();
    assert!(dead.connect_failures > 0, "{dead:?}");
    assert_eq!((dead.requests, dead.new_connections), (0, 0));
    assert_eq!(s.connect_failures, dead.connect_failures);
    assert_eq!(s.total_drops(), 0, "{s:?}");

    // Only dead backends: UNAVAILABLE, after trying them.
    svc.backends = vec![Backend::new(b1, DEAD_PORT)];
    p.apply(&state(&svc)).unwrap();
    let r = in_client(&lab, || async { unary(&mut channel().await, &[]).await });
    let e = r.expect_err("unreachable");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("no backend reachable"), "{e:?}");
    assert_eq!(stats(&p).drops_for(DropReason::ConnectFailed), 1);

    // No usable backend (none, or terminating only): UNAVAILABLE at once.
    for backends in [vec![], {
        let mut b = Backend::new(b1, BACKEND_PORT);
        b.state = BackendState::Terminating;
        vec![b]
    }] {
        svc.backends = backends;
        p.apply(&state(&svc)).unwrap();
        let r = in_client(&lab, || async { unary(&mut channel().await, &[]).await });
        let e = r.expect_err("no backend");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("no backend available"), "{e:?}");
    }
    assert_eq!(stats(&p).drops_for(DropReason::NoBackend), 2);

    // HTTP/1.1 gets a clear 505 and the connection closes.
    let reply = lab
        .client()
        .ns
        .run(|| {
            use std::io::{Read, Write};
            let mut s = TcpStream::connect_timeout(&SocketAddrV4::new(VIP, PORT).into(), CALL)?;
            s.set_read_timeout(Some(CALL))?;
            s.write_all(b"POST /x HTTP/1.1\r\nHost: vip\r\nContent-Length: 0\r\n\r\n")?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
        })
        .unwrap()
        .expect("HTTP/1.1 exchange");
    assert!(reply.starts_with("HTTP/1.1 505"), "{reply}");
    assert!(reply.contains("HTTP/2"), "{reply}");
    assert_eq!(stats(&p).bad_requests, 2);
}

/// A backend marked terminating mid-run: its calls in flight complete, new
/// calls avoid it, its pooled connection closes once idle; back in service,
/// it gets calls again.
#[test]
fn grpc_terminating_backend_drains() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let be = Backends::start(&lab);
    let p = proxy(&lab);
    let mut svc = grpc_service(backends(&lab), policy(Duration::from_secs(30)));
    p.apply(&state(&svc)).unwrap();
    let b1 = lab.backend(1).ip();

    let (p_ref, be_ref) = (&p, &be);
    let (held, during, after) = in_client(&lab, move || async move {
        let (p, be) = (p_ref, be_ref);
        let c = channel().await;
        // Held calls, one at a time, until backend 1 has one (P2C gives each
        // new call to a less loaded backend; at most 12).
        let mut holds = tokio::task::JoinSet::new();
        for k in 0..12 {
            let mut c2 = c.clone();
            holds.spawn(async move { unary(&mut c2, &[(HOLD, "1")]).await });
            assert!(
                eventually(|| be.log().len() > k).await,
                "held call {k} reached no backend"
            );
            if be.log().iter().any(|s| s.backend == 1) {
                break;
            }
        }
        let on_b1 = be.log().iter().filter(|s| s.backend == 1).count();
        assert!(on_b1 >= 1, "no held call on backend 1: {:?}", be.log());

        svc.backends[0].state = BackendState::Terminating;
        let sum = p.apply_async(&state(&svc)).await.unwrap();
        assert_eq!(sum.updated, 1);
        let s = stats(p);
        let b = s.backend(b1, BACKEND_PORT).unwrap();
        assert_eq!(b.status, BackendStatus::Draining);
        assert_eq!(b.active_requests, on_b1 as u64, "{b:?}");

        // New calls avoid it while its held calls go on.
        let during = many_calls(&c, 60, 4).await;

        // Release: every held call completes, those on backend 1 too.
        be.journal.release();
        let mut held = Vec::new();
        while let Some(r) = holds.join_next().await {
            held.push(r.unwrap().expect("held call completes").served_by);
        }
        // Its connection, idle and drained, closes.
        let closed = eventually(|| {
            let s = stats(p);
            s.backend(b1, BACKEND_PORT).unwrap().active_connections == 0
        })
        .await;
        assert!(closed, "drained connection still open: {:?}", stats(p));

        // Back in service: it gets calls again, on a new connection.
        svc.backends[0].state = BackendState::Active;
        p.apply_async(&state(&svc)).await.unwrap();
        let after = many_calls(&c, 60, 4).await;
        (held, during, after)
    });

    assert!(held.iter().any(|b| b == "backend-1"), "{held:?}");
    let per = per_backend(&during);
    assert!(
        !per.contains_key("backend-1"),
        "terminating got calls: {per:?}"
    );
    assert_eq!(per.values().sum::<usize>(), 60);
    let per = per_backend(&after);
    assert!(
        per.get("backend-1").is_some_and(|&n| n >= 5),
        "back in service: {per:?}"
    );
    let s = settled(&p, |s| s.active_requests == 0);
    let b = s.backend(b1, BACKEND_PORT).unwrap();
    assert_eq!(b.status, BackendStatus::Active);
    assert_eq!(b.new_connections, 2, "reconnected once: {b:?}");
    assert_eq!(s.total_drops(), 0);
    assert_eq!(s.new_connections, 1, "one client connection throughout");
}

/// The same service switched between L4 and the gRPC mode: at L4 every call
/// of a connection goes to one backend; in the gRPC mode they spread. The
/// switch restarts the service but keeps its VIP route.
#[test]
fn grpc_mode_switches_with_l4() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _be = Backends::start(&lab);
    let p = proxy(&lab);
    let mut svc = grpc_service(backends(&lab), policy(Duration::from_secs(30)));
    svc.grpc = None;
    svc.algorithm = Algorithm::RoundRobin;
    assert_eq!(p.apply(&state(&svc)).unwrap().added, 1);
    let one_channel = || in_client(&lab, || async { many_calls(&channel().await, 30, 3).await });

    let l4 = per_backend(&one_channel());
    assert_eq!(l4.len(), 1, "L4: one connection, one backend: {l4:?}");
    assert!(!stats(&p).grpc);

    svc.grpc = Some(policy(Duration::from_secs(30)));
    let sum = p.apply(&state(&svc)).unwrap();
    assert_eq!((sum.added, sum.removed, sum.updated), (0, 0, 1));
    assert_eq!(p.routes(), vec![VIP]);
    let l7 = per_backend(&one_channel());
    assert_eq!(l7.len(), 3, "gRPC mode: every backend: {l7:?}");
    let s = stats(&p);
    assert!(s.grpc);
    assert_eq!(s.requests, 30);

    svc.grpc = None;
    let sum = p.apply(&state(&svc)).unwrap();
    assert_eq!((sum.added, sum.removed, sum.updated), (0, 0, 1));
    assert_eq!(p.routes(), vec![VIP]);
    let l4 = per_backend(&one_channel());
    assert_eq!(l4.len(), 1, "L4 again: {l4:?}");
    p.shutdown().unwrap();
}

/// `n` unary calls, `width` at a time, on clones of `c`, each with `headers`:
/// per call its start (since `t0`), its result (the serving backend) and
/// how long it took.
async fn timed_calls(
    c: &TestServiceClient<Channel>,
    n: usize,
    width: usize,
    headers: &'static [(&'static str, &'static str)],
    t0: Instant,
) -> Vec<(Duration, Result<String, Status>, Duration)> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..width {
        let mut c = c.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            for _ in (w..n).step_by(width) {
                let start = Instant::now();
                let r = unary(&mut c, headers).await.map(|r| r.served_by);
                out.push((start - t0, r, start.elapsed()));
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("caller task"));
    }
    all.sort_by_key(|x| x.0);
    all
}

/// A backend that takes 10 streams per connection, 100 calls at once over
/// one client connection: the pool opens more connections (the old single
/// connection queued them 10 at a time, and the calls, 500 ms each, timed
/// out); once idle, they close.
#[test]
fn grpc_pool_opens_connections_when_streams_run_out() {
    skip_unless_lab!();
    let lab = Lab::new(1).expect("lab");
    let opts = ServerOptions {
        max_concurrent_streams: Some(10),
        ..ServerOptions::default()
    };
    let be = Backends::start_with(&lab, &opts);
    let idle = Duration::from_secs(1);
    let p = proxy_with(&lab, |o| o.grpc_idle_timeout = idle);
    let svc = grpc_service(backends(&lab), policy(Duration::from_secs(30)));
    p.apply(&state(&svc)).unwrap();

    const N: usize = 100;
    let t0 = Instant::now();
    let res = in_client(&lab, || async {
        let c = channel().await;
        timed_calls(&c, N, N, &[(SLEEP, "500")], Instant::now()).await
    });
    let took = t0.elapsed();
    let failed: Vec<_> = res.iter().filter(|r| r.1.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {N} failed: {failed:?}",
        failed.len()
    );
    assert_eq!(res.len(), N);
    // 100 calls of 500 ms, 10 streams per connection: at once only with 10
    // connections (one would take 5 s).
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    let accepted = be.accepted(1);
    eprintln!("100 calls in {took:?} over {accepted} backend connections");
    assert!((10..=16).contains(&accepted), "{accepted} connections");
    let s = stats(&p);
    let b = &s.backends[0];
    assert_eq!(b.new_connections, accepted, "{b:?}");
    assert_eq!(b.requests, N as u64);
    assert_eq!((b.goaways, b.transparent_retries), (0, 0));
    assert_eq!(s.new_connections, 1, "one client connection");

    // Idle for `idle` (the first look comes after 2 s): all close.
    let s = settled(&p, |s| s.backends[0].active_connections == 0);
    assert_eq!(s.backends[0].active_connections, 0, "{s:?}");
    p.shutdown().unwrap();
}

/// Backends that send every connection a graceful GOAWAY after 1 s (as a
/// gRPC server's MAX_CONNECTION_AGE): 2,000 calls over one client
/// connection, 32 in flight, none fails; the GOAWAYs are counted.
#[test]
fn grpc_goaway_every_second_fails_no_call() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let opts = ServerOptions {
        max_connection_age: Some(Duration::from_secs(1)),
        age_grace: Duration::from_secs(5),
        ..ServerOptions::default()
    };
    let be = Backends::start_with(&lab, &opts);
    let p = proxy(&lab);
    let svc = grpc_service(backends(&lab), policy(Duration::from_secs(30)));
    p.apply(&state(&svc)).unwrap();

    const N: usize = 2000;
    // 20 ms per call: the run lasts over 1 s (2000 / 32 * 20 ms), so that
    // every backend's connections reach their age.
    let t0 = Instant::now();
    let res = in_client(&lab, || async {
        let c = channel().await;
        timed_calls(&c, N, 32, &[(SLEEP, "20")], Instant::now()).await
    });
    let took = t0.elapsed();
    let failed: Vec<_> = res.iter().filter(|r| r.1.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {N} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(res.len(), N);
    let per = per_backend(&res.iter().map(|r| r.1.clone().unwrap()).collect::<Vec<_>>());
    assert_eq!(per.len(), 3, "{per:?}");

    let s = settled(&p, |s| s.active_requests == 0);
    let goaways: u64 = s.backends.iter().map(|b| b.goaways).sum();
    let retries: u64 = s.backends.iter().map(|b| b.transparent_retries).sum();
    let opened: u64 = s.backends.iter().map(|b| b.new_connections).sum();
    let accepted: u64 = (1..=3).map(|i| be.accepted(i)).sum();
    eprintln!(
        "{N} calls in {took:?}: {per:?}; {opened} backend connections, {goaways} GOAWAYs, {retries} transparent retries"
    );
    assert!(took > Duration::from_secs(1), "{took:?}");
    assert!(s.backends.iter().all(|b| b.goaways >= 1), "{s:?}");
    assert_eq!(opened, accepted);
    assert!(opened >= 3 + goaways.min(3), "connections replaced: {s:?}");
    assert_eq!(s.total_drops(), 0);
    assert_eq!(s.new_connections, 1, "one client connection");
    // The same counts as /metrics exports them.
    let snap = datapath_snapshot(&p.stats());
    let g: Vec<_> = snap.services[0]
        .backends
        .iter()
        .map(|b| b.grpc.expect("gRPC counts"))
        .collect();
    assert_eq!(g.iter().map(|g| g.goaways).sum::<u64>(), goaways);
    assert_eq!(g.iter().map(|g| g.connections_opened).sum::<u64>(), opened);
    p.shutdown().unwrap();
}

/// A backend killed mid-run: only calls that started before the kill plus
/// the detection time (DETECT: the proxy sees the connection close at once;
/// 1 s covers that and the calls in flight) fail, at most the calls in
/// flight on it; every later call succeeds on the other two.
#[test]
fn grpc_backend_killed_mid_run() {
    skip_unless_lab!();
    const DETECT: Duration = Duration::from_secs(1);
    const N: usize = 4000;
    let lab = Lab::new(3).expect("lab");
    let mut be = Backends::start(&lab);
    let p = proxy(&lab);
    let svc = grpc_service(backends(&lab), policy(Duration::from_secs(30)));
    p.apply(&state(&svc)).unwrap();

    let t0 = Instant::now();
    let (res, killed_at) = std::thread::scope(|sc| {
        let client = sc.spawn(|| {
            in_client(&lab, || async {
                let c = channel().await;
                timed_calls(&c, N, 32, &[(SLEEP, "20")], t0).await
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        let at = t0.elapsed();
        be.kill(1);
        (client.join().expect("client thread"), at)
    });
    let failed: Vec<_> = res.iter().filter(|r| r.1.is_err()).collect();
    eprintln!(
        "backend 1 killed at {killed_at:?}; {} of {N} calls failed: {:?}",
        failed.len(),
        failed.iter().map(|f| (f.0, f.2)).collect::<Vec<_>>()
    );
    assert_eq!(res.len(), N);
    assert!(
        res.last().unwrap().0 > killed_at + DETECT + Duration::from_millis(500),
        "the run outlasts the kill"
    );
    for (start, r, _) in &res {
        if *start >= killed_at + DETECT {
            let by = r
                .as_ref()
                .unwrap_or_else(|e| panic!("call at {start:?}: {e}"));
            assert_ne!(by, "backend-1", "call at {start:?}");
        }
        if let Err(e) = r {
            assert!(*start < killed_at + DETECT, "{start:?}: {e}");
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        }
    }
    assert!(failed.len() <= 32, "only calls in flight fail");
    let s = settled(&p, |s| s.active_requests == 0);
    assert_eq!(s.new_connections, 1, "one client connection");
    p.shutdown().unwrap();
}

/// The proxy drains (agent shutdown): its client connections get GOAWAY, a
/// call in flight completes, a new connection is refused, and the shutdown
/// ends when the call does (not at the drain timeout).
#[test]
fn grpc_proxy_drain_lets_calls_in_flight_finish() {
    skip_unless_lab!();
    let lab = Lab::new(1).expect("lab");
    let be = Backends::start(&lab);
    let drain = Duration::from_secs(8);
    let p = proxy_with(&lab, |o| o.grpc_drain_timeout = drain);
    let svc = grpc_service(backends(&lab), policy(Duration::from_secs(30)));
    p.apply(&state(&svc)).unwrap();

    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (held, refused, shutdown_took) = std::thread::scope(|sc| {
        let (be, lab) = (&be, &lab);
        let client = sc.spawn(move || {
            in_client(lab, || async move {
                let mut c = channel().await;
                let call = tokio::spawn(async move { unary(&mut c, &[(HOLD, "1")]).await });
                assert!(eventually(|| !be.log().is_empty()).await, "held call");
                tx.send(()).unwrap();
                call.await.unwrap()
            })
        });
        rx.recv_timeout(CALL).expect("held call started");
        let t0 = Instant::now();
        let stopper = sc.spawn(move || p.shutdown());
        // Draining: new connections are refused.
        std::thread::sleep(Duration::from_millis(300));
        let refused = lab
            .client()
            .ns
            .run(|| TcpStream::connect_timeout(&SocketAddrV4::new(VIP, PORT).into(), CALL))
            .unwrap();
        // The held call is still on: release it, it completes.
        assert!(!stopper.is_finished(), "shutdown waits for the call");
        be.journal.release();
        let held = client.join().expect("client");
        stopper.join().expect("stopper").expect("shutdown");
        (held, refused, t0.elapsed())
    });
    let r = held.expect("the call in flight completes");
    assert_eq!(r.served_by, "backend-1");
    let e = refused.expect_err("new connection refused while draining");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(
        shutdown_took < drain,
        "ended with the call: {shutdown_took:?}"
    );
}

/// A raw HTTP/2 backend (h2's server) in `ns` on BACKEND_PORT: it refuses
/// (RST_STREAM REFUSED_STREAM, unprocessed) the first stream of each
/// `x-test-header` value and answers the next one with a SimpleResponse
/// from `refuser`. Returns how many it refused; stops when `stop` drops.
fn refusing_backend(
    ns: &rpclb_tests::lab::Netns,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> std::thread::JoinHandle<u64> {
    use prost::Message;
    ns.spawn("grpc-refuser", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT))
                .await
                .expect("bind");
            let seen = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
            let refused = Arc::new(AtomicU64::new(0));
            let serve = async {
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    let (seen, refused) = (seen.clone(), refused.clone());
                    tokio::spawn(async move {
                        let Ok(mut conn) = h2::server::handshake(s).await else {
                            return;
                        };
                        while let Some(Ok((req, mut respond))) = conn.accept().await {
                            let tag = req
                                .headers()
                                .get(TEST_HEADER)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            if seen.lock().unwrap().insert(tag.clone()) {
                                refused.fetch_add(1, Relaxed);
                                respond.send_reset(h2::Reason::REFUSED_STREAM);
                                continue;
                            }
                            tokio::spawn(async move {
                                let mut body = req.into_body();
                                while let Some(Ok(d)) = body.data().await {
                                    let _ = body.flow_control().release_capacity(d.len());
                                }
                                let msg = SimpleResponse {
                                    served_by: "refuser".into(),
                                    test_header: tag,
                                    ..SimpleResponse::default()
                                }
                                .encode_to_vec();
                                let mut framed = vec![0u8];
                                framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                                framed.extend_from_slice(&msg);
                                let head = tonic::codegen::http::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(())
                                    .unwrap();
                                let Ok(mut send) = respond.send_response(head, false) else {
                                    return;
                                };
                                let _ = send.send_data(framed.into(), false);
                                let mut t = HeaderMap::new();
                                t.insert("grpc-status", "0".parse().unwrap());
                                let _ = send.send_trailers(t);
                            });
                        }
                    });
                }
            };
            tokio::select! {
                () = serve => {}
                _ = stop => {}
            }
            refused.load(Relaxed)
        })
    })
    .expect("refusing backend")
}

/// A backend that refuses the first attempt of every call (REFUSED_STREAM:
/// not processed): the proxy sends each again (gRFC A6 transparent retry)
/// and every call succeeds; each retry is counted. Without the retry, every
/// call failed with UNAVAILABLE.
#[test]
fn grpc_refused_streams_are_retried_transparently() {
    skip_unless_lab!();
    let lab = Lab::new(1).expect("lab");
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let server = refusing_backend(&lab.backend(1).ns, stopped);
    let p = proxy(&lab);
    let svc = grpc_service(backends(&lab), policy(Duration::from_secs(30)));
    p.apply(&state(&svc)).unwrap();

    const N: usize = 50;
    let served = in_client(&lab, || async { many_calls(&channel().await, N, 5).await });
    assert!(served.iter().all(|b| b == "refuser"), "{served:?}");
    drop(stop);
    let refused = server.join().expect("refusing backend");
    assert_eq!(refused, N as u64, "every call refused once");
    let s = settled(&p, |s| s.active_requests == 0);
    let b = &s.backends[0];
    assert_eq!(b.transparent_retries, N as u64, "{b:?}");
    assert_eq!(b.requests, N as u64, "processed calls only: {b:?}");
    assert_eq!(s.total_drops(), 0);
    p.shutdown().unwrap();
}

// ---- retry policy (gRFC A6) -------------------------------------------------

/// `n` unary calls, `width` at a time, on clones of one channel: each call's
/// serving backend, or its status code.
async fn outcomes(
    c: &TestServiceClient<Channel>,
    n: usize,
    width: usize,
) -> Vec<Result<String, Code>> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..width {
        let mut c = c.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            for k in (w..n).step_by(width) {
                let r = unary(&mut c, &[]).await;
                out.push((k, r.map(|r| r.served_by).map_err(|e| e.code())));
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("caller task"));
    }
    all.sort_by_key(|(k, _)| *k);
    assert_eq!(all.len(), n);
    all.into_iter().map(|(_, r)| r).collect()
}

fn retry_policy(max_attempts: u32, codes: &[Code]) -> lb_api::RetryPolicy {
    let mut codes: Vec<u32> = codes.iter().map(|c| *c as u32).collect();
    codes.sort_unstable();
    lb_api::RetryPolicy {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        retryable_status_codes: codes,
        ..lb_api::RetryPolicy::new(max_attempts)
    }
}

fn with_retry(r: Option<lb_api::RetryPolicy>) -> GrpcPolicy {
    GrpcPolicy {
        retry: r,
        ..policy(Duration::from_secs(30))
    }
}

fn backend_stats<'a>(
    s: &'a ServiceStats,
    lab: &Lab,
    i: usize,
) -> &'a lb_agent::userspace::BackendStats {
    let ip = lab.backend(i).ip();
    s.backends
        .iter()
        .find(|b| b.ip == ip)
        .expect("backend stats")
}

/// Calls each backend got, by `grpc-previous-rpc-attempts` (None: a first
/// attempt).
fn attempts_seen(log: &[Seen]) -> BTreeMap<(usize, Option<String>), usize> {
    let mut m = BTreeMap::new();
    for s in log {
        let prev = s.header("grpc-previous-rpc-attempts").map(str::to_string);
        *m.entry((s.backend, prev)).or_default() += 1;
    }
    m
}

/// One of three backends answers UNAVAILABLE to every call. Without a retry
/// policy about a third of the calls fail; with one (3 attempts, UNAVAILABLE
/// retryable), every call succeeds, each retry goes to a good backend with
/// `grpc-previous-rpc-attempts: 1`, and the bad backend's retry counter
/// says how many. A non-retryable status (INVALID_ARGUMENT) is not retried.
#[test]
fn grpc_retry_policy_retries_retryable_statuses() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let be = Backends::start(&lab);
    be.fail_with(1, Code::Unavailable);
    let p = proxy(&lab);
    let mut svc = grpc_service(backends(&lab), with_retry(None));
    p.apply(&state(&svc)).unwrap();
    const N: usize = 150;

    // No policy: the bad backend's share fails.
    let before = in_client(&lab, || async { outcomes(&channel().await, N, 3).await });
    let failed = before.iter().filter(|r| r.is_err()).count();
    assert!(
        before
            .iter()
            .all(|r| r.is_ok() || *r == Err(Code::Unavailable)),
        "{before:?}"
    );
    assert!(
        (N / 6..=N * 2 / 3).contains(&failed),
        "{failed} of {N} failed without retries"
    );
    assert_eq!(failed, be.journal.served(1) as usize);
    let s = stats(&p);
    assert_eq!(backend_stats(&s, &lab, 1).retries, 0);

    // With the policy: every call succeeds.
    svc.grpc = Some(with_retry(Some(retry_policy(3, &[Code::Unavailable]))));
    assert_eq!(p.apply(&state(&svc)).unwrap().updated, 1);
    let mark = be.log().len();
    let served1 = be.journal.served(1);
    let after = in_client(&lab, || async { outcomes(&channel().await, N, 3).await });
    assert!(after.iter().all(|r| r.is_ok()), "{after:?}");
    assert!(after.iter().all(|r| r.as_deref() != Ok("backend-1")));
    let bad_answers = be.journal.served(1) - served1;
    assert!(bad_answers > 0, "the bad backend got calls");
    eprintln!("without a policy {failed} of {N} failed; with one, 0 failed, {bad_answers} retried");
    let seen = attempts_seen(&be.log()[mark..]);
    // Every retry went to a good backend (the failed one is avoided), with
    // the attempt count; the bad backend only ever saw first attempts.
    let retried: usize = [2, 3]
        .iter()
        .map(|&i| seen.get(&(i, Some("1".into()))).copied().unwrap_or(0))
        .sum();
    assert_eq!(retried as u64, bad_answers, "{seen:?}");
    assert_eq!(seen.get(&(1, Some("1".into()))), None, "{seen:?}");
    let s = settled(&p, |s| s.active_requests == 0);
    assert_eq!(backend_stats(&s, &lab, 1).retries, bad_answers, "{s:?}");
    assert_eq!(backend_stats(&s, &lab, 2).retries, 0);
    assert_eq!(backend_stats(&s, &lab, 3).retries, 0);
    assert!(s.backends.iter().all(|b| b.retries_throttled == 0));

    // A status the policy does not name is not retried.
    be.fail_with(1, Code::InvalidArgument);
    let mark = be.log().len();
    let served1 = be.journal.served(1);
    let invalid = in_client(&lab, || async { outcomes(&channel().await, N, 3).await });
    let bad_answers = (be.journal.served(1) - served1) as usize;
    assert!(bad_answers > 0);
    assert_eq!(
        invalid
            .iter()
            .filter(|r| **r == Err(Code::InvalidArgument))
            .count(),
        bad_answers,
        "{invalid:?}"
    );
    assert_eq!(
        invalid.iter().filter(|r| r.is_ok()).count(),
        N - bad_answers
    );
    let seen = attempts_seen(&be.log()[mark..]);
    assert!(seen.keys().all(|(_, prev)| prev.is_none()), "{seen:?}");
    let s = settled(&p, |s| s.active_requests == 0);
    assert_eq!(
        s.backends.iter().map(|b| b.retries).sum::<u64>(),
        retried as u64
    );
    drop(be);
    p.shutdown().unwrap();
}

/// Every backend answers UNAVAILABLE. With 5 attempts and a throttle of 10
/// tokens (0.1 per success), the first call makes its 5 attempts (tokens
/// 10 -> 5), and from then on no call is retried (each failure leaves at
/// most 4 < 10/2): 100 calls make 104 attempts, not 500, and the 99 calls
/// not retried are counted as throttled.
#[test]
fn grpc_retry_throttle_stops_retries_in_an_outage() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let be = Backends::start(&lab);
    for i in 1..=3 {
        be.fail_with(i, Code::Unavailable);
    }
    let p = proxy(&lab);
    let mut r = retry_policy(5, &[Code::Unavailable]);
    r.throttle = Some(lb_api::RetryThrottle {
        max_tokens: 10,
        token_ratio_milli: 100,
    });
    let svc = grpc_service(backends(&lab), with_retry(Some(r)));
    p.apply(&state(&svc)).unwrap();
    const N: usize = 100;
    let out = in_client(&lab, || async { outcomes(&channel().await, N, 1).await });
    assert!(out.iter().all(|r| *r == Err(Code::Unavailable)), "{out:?}");
    let attempts: u64 = (1..=3).map(|i| be.journal.served(i)).sum();
    assert_eq!(attempts, N as u64 + 4, "attempts at the backends");
    let seen = attempts_seen(&be.log());
    let retries_seen: usize = seen
        .iter()
        .filter(|((_, prev), _)| prev.is_some())
        .map(|(_, n)| n)
        .sum();
    assert_eq!(retries_seen, 4, "{seen:?}");
    let s = settled(&p, |s| s.active_requests == 0);
    assert_eq!(
        s.backends.iter().map(|b| b.retries).sum::<u64>(),
        4,
        "{s:?}"
    );
    assert_eq!(
        s.backends.iter().map(|b| b.retries_throttled).sum::<u64>(),
        N as u64 - 1,
        "{s:?}"
    );
    drop(be);
    p.shutdown().unwrap();
}

/// A retry whose backoff would end past the call's deadline is not made:
/// the client gets the backend's UNAVAILABLE at once instead of waiting
/// into its deadline. The backoff is drawn in [0, BACKOFF) (full jitter),
/// so a call is retried only when its draw fits in the time left (here
/// about 1 in 300), and such a retry may then run out of time: its wait can
/// end just before the proxy's deadline, which starts when the proxy gets
/// the call, after the client's (with 5 s and 300 ms this failed about once
/// in 10 runs on a busy machine, a call cancelled by the client at 300 ms
/// whose retry never reached the backend). So the calls the proxy retried
/// (its `retries` counter) are not judged; every other call must end
/// UNAVAILABLE within its deadline. Without the check, every call waits for
/// its backoff and runs out of time (and `retries` counts all 10).
#[test]
fn grpc_retry_never_waits_past_the_deadline() {
    skip_unless_lab!();
    const BACKOFF: Duration = lb_api::validate::MAX_RETRY_BACKOFF;
    const DEADLINE: Duration = Duration::from_secs(1);
    let lab = Lab::new(1).expect("lab");
    let be = Backends::start(&lab);
    be.fail_with(1, Code::Unavailable);
    let p = proxy(&lab);
    let mut r = retry_policy(2, &[Code::Unavailable]);
    r.initial_backoff = BACKOFF;
    r.max_backoff = BACKOFF;
    let svc = grpc_service(backends(&lab), with_retry(Some(r)));
    p.apply(&state(&svc)).unwrap();
    const N: usize = 10;
    let out = in_client(&lab, || async {
        let mut c = channel().await;
        let mut out = Vec::new();
        for _ in 0..N {
            let mut req = Request::new(SimpleRequest::default());
            req.set_timeout(DEADLINE);
            let t0 = Instant::now();
            let r = tokio::time::timeout(CALL, c.unary_call(req)).await;
            out.push((r.map(|r| r.map(|_| ()).map_err(|e| e.code())), t0.elapsed()));
        }
        out
    });
    let s = settled(&p, |s| s.active_requests == 0);
    let retried = s.backends.iter().map(|b| b.retries).sum::<u64>() as usize;
    assert!(retried <= N / 2, "{retried} of {N} calls retried: {out:?}");
    let at_once = out
        .iter()
        .filter(|(r, took)| matches!(r, Ok(Err(Code::Unavailable))) && *took < DEADLINE)
        .count();
    assert!(
        at_once >= N - retried,
        "{at_once} of {N} calls answered UNAVAILABLE in time, {retried} retried: {out:?}"
    );
    p.shutdown().unwrap();
}
