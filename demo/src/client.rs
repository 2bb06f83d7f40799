//! Service A, the client pod. It runs as `ip netns exec <client-ns> rpclb-demo client ...`, so
//! that the namespace's `/etc/netns/<ns>/hosts` is bind-mounted over /etc/hosts and the
//! cluster names resolve through the system resolver, as they would in a pod.
//!
//! Phases one and two: every call opens a new channel (a new TCP connection), so each call is
//! a new flow that the load balancer places; each sends `x-test-header` with a random value and
//! has a deadline. `go` on stdin starts the second phase.
//!
//! Phase three (`--one-channel`, after the in-flight calls are done): per target, ONE channel
//! (one TCP connection, counted by its connector) carries `--one-channel-calls` unary calls,
//! `--concurrency` in flight at once, multiplexed by HTTP/2, as a long-lived gRPC client does.
//! An L4 balancer places that connection once; a gRPC-mode VIP places each call.
//!
//! The GOAWAY phase (`--goaway`, last): one channel to a gRPC-mode VIP whose pods close every
//! connection at a short age (MAX_CONNECTION_AGE: a graceful GOAWAY); `--goaway-calls` calls
//! started evenly over `--goaway-secs`, so that they span several ages. None may fail.
//!
//! Results go to stdout as JSON lines (`wire::Event`).

use crate::proto::test_service_client::TestServiceClient;
use crate::proto::{ResponseParameters, SimpleRequest, StreamingOutputCallRequest};
use crate::server::TEST_HEADER;
use crate::wire::{Call, Event, Inflight, Kind, OneChannel, Phase};
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// KEY=HOST:PORT, e.g. b=rpc-service-b.my-rpc.svc.cluster.local:50052. The first target
    /// gets the in-flight streams.
    #[arg(long = "target", required = true)]
    pub targets: Vec<String>,
    /// Calls per target before the event.
    #[arg(long)]
    pub before: usize,
    /// Calls per target after the event.
    #[arg(long)]
    pub after: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Every Nth call is a server-streaming call (0: none).
    #[arg(long, default_value_t = 5)]
    pub stream_every: usize,
    /// Long-lived calls (FullDuplexCall) to the first target that stay open across the event.
    #[arg(long, default_value_t = 6)]
    pub inflight: usize,
    /// One ping-pong on each in-flight call this often, milliseconds.
    #[arg(long, default_value_t = 100)]
    pub inflight_interval_ms: u64,
    /// In-flight calls end (OK) after the second phase, once each has had this many answers
    /// after the event.
    #[arg(long, default_value_t = 10)]
    pub inflight_after: u32,
    /// Deadline of each call (grpc-timeout), milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub deadline_ms: u64,
    /// Stop a phase early after this many failed calls (the rest count as not made).
    #[arg(long, default_value_t = 20)]
    pub max_failures: usize,
    /// Give up after this long in total, seconds.
    #[arg(long, default_value_t = 90)]
    pub total_secs: u64,
    /// KEY=HOST:PORT for the third phase (repeatable): after the in-flight calls end, ONE
    /// channel (one TCP connection) to it carries --one-channel-calls unary calls,
    /// --concurrency in flight at once.
    #[arg(long = "one-channel")]
    pub one_channel: Vec<String>,
    /// Unary calls over each --one-channel channel.
    #[arg(long, default_value_t = 300)]
    pub one_channel_calls: usize,
    /// KEY=HOST:PORT for the last phase (GOAWAY): ONE channel to it carries --goaway-calls
    /// unary calls started evenly over --goaway-secs, at most --concurrency in flight, so that
    /// the calls span several connection ages of the pods behind it.
    #[arg(long)]
    pub goaway: Option<String>,
    /// Unary calls of the GOAWAY phase.
    #[arg(long, default_value_t = 200)]
    pub goaway_calls: usize,
    /// How long the GOAWAY phase's calls are spread over, seconds (at most 60).
    #[arg(long, default_value_t = 4.0)]
    pub goaway_secs: f64,
}

#[derive(Clone)]
struct Target {
    key: String,
    uri: String,
}

fn emit(e: &Event) {
    let line = serde_json::to_string(e).expect("events serialise");
    let mut out = std::io::stdout().lock();
    // The orchestrator reads these; if it is gone there is nobody to tell.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A random `x-test-header` value per call (no crate needed: std's random hasher keys).
fn random_token() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let v = RandomState::new().hash_one(N.fetch_add(1, Ordering::Relaxed));
    format!("{v:016x}")
}

fn split_target(t: &str) -> Result<(&str, &str)> {
    t.split_once('=')
        .with_context(|| format!("target {t:?}: expected KEY=HOST:PORT"))
}

fn short(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    s.chars().take(160).collect()
}

pub fn main(args: ClientArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let total = Duration::from_secs(args.total_secs);
    let r = rt.block_on(async {
        match tokio::time::timeout(total, run(args)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("client gave up after {total:?}")),
        }
    });
    if let Err(e) = &r {
        emit(&Event::Fatal {
            error: format!("{e:#}"),
        });
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

async fn run(args: ClientArgs) -> Result<()> {
    // Refuse bad --one-channel values now, not after the first two phases.
    for t in args.one_channel.iter().chain(&args.goaway) {
        split_target(t)?;
    }
    let mut targets = Vec::new();
    for t in &args.targets {
        let (key, hostport) = split_target(t)?;
        // Resolve once up front to show it; every channel resolves again on connect.
        let addr = tokio::net::lookup_host(hostport)
            .await
            .with_context(|| format!("resolve {hostport}"))?
            .next()
            .with_context(|| format!("{hostport} has no address"))?;
        emit(&Event::Resolved {
            svc: key.into(),
            name: hostport.into(),
            addr: addr.to_string(),
        });
        targets.push(Target {
            key: key.into(),
            uri: format!("http://{hostport}"),
        });
    }
    let targets = Arc::new(targets);
    let deadline = Duration::from_millis(args.deadline_ms);

    phase(&targets, Phase::Before, args.before, &args, deadline).await;
    emit(&Event::PhaseDone {
        phase: Phase::Before,
    });

    // Long-lived calls that are open while the event happens.
    let first = &targets[0];
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let (finish_tx, finish_rx) = tokio::sync::watch::channel(false);
    let mut opened = Vec::new();
    for _ in 0..args.inflight {
        let (t, a) = (first.clone(), args.clone());
        let ctl = (go_rx.clone(), finish_rx.clone());
        opened.push(tokio::spawn(async move {
            open_inflight(&t, &a, deadline, ctl).await
        }));
    }
    let mut streams = Vec::new();
    let mut pods = Vec::new();
    for o in opened {
        match o.await.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((pod, task)) => {
                pods.push(pod);
                streams.push(task);
            }
            Err(e) => {
                emit(&Event::InflightDone(Inflight {
                    pod: String::new(),
                    messages: 0,
                    after_event: 0,
                    ok: false,
                    echoed: false,
                    last_server_us: 0,
                    error: Some(short(&format_err(&e))),
                }));
            }
        }
    }
    emit(&Event::InflightOpen { pods });
    emit(&Event::Waiting);

    let go = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await??;
    if line_is_go(&go) {
        let _ = go_tx.send(true);
        phase(&targets, Phase::After, args.after, &args, deadline).await;
        emit(&Event::PhaseDone {
            phase: Phase::After,
        });
        let _ = finish_tx.send(true);
    } else {
        for s in streams {
            s.abort();
        }
        bail!("orchestrator said {:?} instead of go", go.trim());
    }
    for s in streams {
        if let Ok(r) = s.await {
            emit(&Event::InflightDone(r));
        }
    }

    // Third phase: one channel per target, many calls over it.
    for t in &args.one_channel {
        let (key, hostport) = split_target(t)?;
        let r = one_channel(key, hostport, &args, deadline, args.one_channel_calls, None).await;
        emit(&Event::OneChannel(r));
    }

    // The GOAWAY phase: one channel, calls paced over several connection ages.
    if let Some(t) = &args.goaway {
        let (key, hostport) = split_target(t)?;
        let span = Duration::from_secs_f64(args.goaway_secs.clamp(0.0, 60.0));
        let r = one_channel(
            key,
            hostport,
            &args,
            deadline,
            args.goaway_calls,
            Some(span),
        )
        .await;
        emit(&Event::OneChannel(r));
    }
    emit(&Event::Done);
    Ok(())
}

fn line_is_go(l: &str) -> bool {
    l.trim() == "go"
}

/// `n` calls to every target, interleaved, `concurrency` at a time.
async fn phase(targets: &Arc<Vec<Target>>, phase: Phase, n: usize, args: &ClientArgs, d: Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let total = n * targets.len();
    let stream_every = args.stream_every;
    let max_failures = args.max_failures;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (next, failed, targets) = (next.clone(), failed.clone(), targets.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || failed.load(Ordering::Relaxed) >= max_failures {
                    return;
                }
                let t = &targets[i % targets.len()];
                let k = i / targets.len();
                let kind = if stream_every > 0 && k % stream_every == stream_every - 1 {
                    Kind::Stream
                } else {
                    Kind::Unary
                };
                let c = call(t, phase, kind, d).await;
                if !c.ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                emit(&Event::Call(c));
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

async fn connect(t: &Target, deadline: Duration) -> Result<TestServiceClient<Channel>> {
    let ch = Endpoint::from_shared(t.uri.clone())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(deadline)
        .connect()
        .await?;
    Ok(TestServiceClient::new(ch))
}

fn request<T>(msg: T, token: &str, deadline: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert(TEST_HEADER, token.parse().expect("hex is valid metadata"));
    req.set_timeout(deadline);
    req
}

async fn call(t: &Target, phase: Phase, kind: Kind, deadline: Duration) -> Call {
    let token = random_token();
    let start = Instant::now();
    let mut c = Call {
        svc: t.key.clone(),
        phase,
        kind,
        pod: String::new(),
        ok: false,
        echoed: false,
        us: 0,
        error: None,
    };
    let r: Result<()> = async {
        let mut client = connect(t, deadline).await?;
        match kind {
            Kind::Unary => {
                let req = SimpleRequest {
                    response_size: 64,
                    payload: None,
                };
                let resp = client
                    .unary_call(request(req, &token, deadline))
                    .await?
                    .into_inner();
                c.pod = resp.served_by;
                c.echoed = resp.test_header == token;
            }
            Kind::Stream => {
                let req = StreamingOutputCallRequest {
                    response_parameters: vec![
                        ResponseParameters {
                            size: 64,
                            interval_us: 0,
                        };
                        3
                    ],
                    payload: None,
                };
                let mut s = client
                    .streaming_output_call(request(req, &token, deadline))
                    .await?
                    .into_inner();
                let (mut n, mut echoed) = (0, true);
                while let Some(m) = s.message().await? {
                    if c.pod.is_empty() {
                        c.pod = m.served_by.clone();
                    } else if c.pod != m.served_by {
                        bail!("stream moved from {} to {}", c.pod, m.served_by);
                    }
                    echoed &= m.test_header == token;
                    n += 1;
                }
                if n != 3 {
                    bail!("stream ended after {n} of 3 messages");
                }
                c.echoed = echoed;
            }
        }
        Ok(())
    }
    .await;
    c.us = start.elapsed().as_micros() as u64;
    match r {
        Ok(()) => c.ok = true,
        Err(e) => c.error = Some(short(&format_err(&e))),
    }
    c
}

/// A connector for one channel that counts the TCP connections it opens and remembers the
/// last peer: the proof that the calls of the third phase shared one connection (tonic's
/// channel would reconnect, through here, if it lost it).
#[derive(Clone, Default)]
struct CountingConnector {
    connects: Arc<AtomicUsize>,
    peer: Arc<Mutex<Option<SocketAddr>>>,
}

impl tonic::codegen::Service<Uri> for CountingConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "no host:port");
            let host = uri.host().ok_or_else(bad)?.to_string();
            let port = uri.port_u16().ok_or_else(bad)?;
            // Resolves through the pod's /etc/hosts, as every other call does.
            let s = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            s.set_nodelay(true)?;
            me.connects.fetch_add(1, Ordering::Relaxed);
            *me.peer.lock().unwrap_or_else(|e| e.into_inner()) = s.peer_addr().ok();
            Ok(TokioIo::new(s))
        })
    }
}

fn percentile_us(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The third phase for one target: connect ONE channel, then `calls` unary calls over
/// clones of it (same connection), `--concurrency` at a time, each with its own
/// `x-test-header` and deadline. With `span`, call k starts no earlier than k × span / calls
/// after the first (the GOAWAY phase). Stops early after `--max-failures` failures.
async fn one_channel(
    key: &str,
    hostport: &str,
    args: &ClientArgs,
    deadline: Duration,
    calls: usize,
    span: Option<Duration>,
) -> OneChannel {
    let mut r = OneChannel {
        svc: key.into(),
        name: hostport.into(),
        planned: calls,
        ..OneChannel::default()
    };
    let conn = CountingConnector::default();
    let channel = match Endpoint::from_shared(format!("http://{hostport}")) {
        Ok(e) => {
            e.connect_timeout(Duration::from_secs(1))
                .timeout(deadline)
                .connect_with_connector(conn.clone())
                .await
        }
        Err(e) => Err(e),
    };
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            r.connections = conn.connects.load(Ordering::Relaxed);
            r.error = Some(short(&format_err(&e.into())));
            return r;
        }
    };
    let peer = *conn.peer.lock().unwrap_or_else(|e| e.into_inner());
    emit(&Event::OneChannelOpen {
        svc: key.into(),
        name: hostport.into(),
        addr: peer.map_or_else(|| "?".into(), |a| a.to_string()),
    });
    let client = TestServiceClient::new(channel);
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (n, max_failures) = (calls, args.max_failures);
    let gap = span.map(|s| s / n.max(1) as u32);
    let t0 = tokio::time::Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (next, failed, mut client) = (next.clone(), failed.clone(), client.clone());
        workers.spawn(async move {
            // (pod, echoed, µs) per successful call; the first error.
            let mut done: Vec<(String, bool, u64)> = Vec::new();
            let mut first_error = None;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n || failed.load(Ordering::Relaxed) >= max_failures {
                    break;
                }
                if let Some(gap) = gap {
                    tokio::time::sleep_until(t0 + gap * k as u32).await;
                }
                let token = random_token();
                let req = SimpleRequest {
                    response_size: 64,
                    payload: None,
                };
                let start = Instant::now();
                match client.unary_call(request(req, &token, deadline)).await {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        let us = start.elapsed().as_micros() as u64;
                        done.push((resp.served_by, resp.test_header == token, us));
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert_with(|| short(&e));
                    }
                }
            }
            (done, first_error)
        });
    }
    let mut lat = Vec::new();
    let mut per_pod = BTreeMap::new();
    while let Some(w) = workers.join_next().await {
        let Ok((done, err)) = w else {
            r.error.get_or_insert_with(|| "a worker panicked".into());
            continue;
        };
        for (pod, echoed, us) in done {
            *per_pod.entry(pod).or_insert(0) += 1;
            r.ok += 1;
            r.echoed += usize::from(echoed);
            lat.push(us);
        }
        if let Some(e) = err {
            r.error.get_or_insert(e);
        }
    }
    lat.sort_unstable();
    r.per_pod = per_pod;
    r.failed = failed.load(Ordering::Relaxed);
    r.p50_us = percentile_us(&lat, 50.0);
    r.p99_us = percentile_us(&lat, 99.0);
    r.connections = conn.connects.load(Ordering::Relaxed);
    r
}

/// anyhow's alternate form shows the source chain, where tonic keeps the useful part.
fn format_err(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

type InflightTask = tokio::task::JoinHandle<Inflight>;

/// Most ping-pongs on one in-flight call (a bound; it ends much sooner).
const MAX_PINGS: u32 = 1200;

fn ping() -> StreamingOutputCallRequest {
    StreamingOutputCallRequest {
        response_parameters: vec![ResponseParameters {
            size: 32,
            interval_us: 0,
        }],
        payload: None,
    }
}

/// Open a FullDuplexCall and wait for its first answer; then keep pinging in a task until
/// `finish` and `inflight_after` answers after `go`, and close our side, which ends the call
/// with OK. Every answer must come from the same pod and echo the header.
async fn open_inflight(
    t: &Target,
    args: &ClientArgs,
    deadline: Duration,
    (go, finish): (
        tokio::sync::watch::Receiver<bool>,
        tokio::sync::watch::Receiver<bool>,
    ),
) -> Result<(String, InflightTask)> {
    let token = random_token();
    let interval = Duration::from_millis(args.inflight_interval_ms);
    let min_after = args.inflight_after;
    let mut client = connect(t, deadline).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ping()).await?;
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut req = tonic::Request::new(outbound);
    req.metadata_mut()
        .insert(TEST_HEADER, token.parse().expect("hex is valid metadata"));
    // The call lives long: its deadline covers the whole run.
    req.set_timeout(Duration::from_secs(args.total_secs));
    let mut s = client.full_duplex_call(req).await?.into_inner();
    let answer = Duration::from_secs(2);
    let first = tokio::time::timeout(answer, s.message())
        .await
        .map_err(|_| anyhow!("no first answer within 2 s"))??
        .ok_or_else(|| anyhow!("call ended at once"))?;
    let pod = first.served_by.clone();
    let mut r = Inflight {
        pod: pod.clone(),
        messages: 1,
        after_event: 0,
        ok: false,
        echoed: first.test_header == token,
        last_server_us: first.server_time_us,
        error: None,
    };
    let task = tokio::spawn(async move {
        let _client = client; // keep the channel with the call
        for _ in 0..MAX_PINGS {
            if *finish.borrow() && r.after_event >= min_after {
                break;
            }
            tokio::time::sleep(interval).await;
            if tx.send(ping()).await.is_err() {
                r.error = Some("the call closed".into());
                return r;
            }
            match tokio::time::timeout(answer, s.message()).await {
                Ok(Ok(Some(m))) => {
                    if m.served_by != r.pod {
                        r.error = Some(format!(
                            "answer from {} on a call to {}",
                            m.served_by, r.pod
                        ));
                        return r;
                    }
                    r.messages += 1;
                    if *go.borrow() {
                        r.after_event += 1;
                    }
                    r.echoed &= m.test_header == token;
                    r.last_server_us = m.server_time_us;
                }
                Ok(Ok(None)) => {
                    r.error = Some(format!("ended by the server after {} answers", r.messages));
                    return r;
                }
                Ok(Err(e)) => {
                    r.error = Some(short(&e));
                    return r;
                }
                Err(_) => {
                    r.error = Some("no answer within 2 s".into());
                    return r;
                }
            }
        }
        drop(tx); // close our side: the server ends the call
        match tokio::time::timeout(answer, s.message()).await {
            Ok(Ok(None)) => {
                r.ok = r.after_event >= min_after;
                if !r.ok {
                    r.error = Some(format!("only {} answers after the event", r.after_event));
                }
            }
            Ok(Ok(Some(_))) => r.error = Some("an answer nobody asked for".into()),
            Ok(Err(e)) => r.error = Some(short(&e)),
            Err(_) => r.error = Some("did not end within 2 s".into()),
        }
        r
    });
    Ok((pod, task))
}
