//! Section `grpc`: unary gRPC calls over ONE client HTTP/2 connection, direct to a pod vs
//! through the agent's gRPC (L7) mode with 1 and with 3 backends, side by side in one run.
//!
//! The lab is section 4's (`Topo`: a client, the node, 3 backends). Each backend namespace
//! serves `rpclb_tests::grpc`'s `grpc.testing.TestService` (hyper, one thread each); the
//! agent's userspace proxy runs in process in the node namespace with two gRPC-mode
//! services, one per backend count. A tonic client in the client namespace opens one channel
//! (one TCP connection) per run and measures:
//!
//! - **max calls/s**: `IN_FLIGHT` calls in flight at all times (closed loop);
//! - **latency at a moderate rate**: calls started one by one on a fixed schedule (open loop,
//!   a pacer thread: see [`paced`]) at `LOAD_SHARE` of the direct path's max (at most
//!   `MAX_SHARE` of the slowest path's max), each timed from its start to its answer; p50 and
//!   p99 per run.
//!
//! The paths rotate each round; ratios and overheads are per-round figures, then their median.
//! The spread over 3 backends comes from the backends' own counts of the calls they served.
//! Every run is bounded in time and in calls, every call by `CALL_TIMEOUT`.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::throughput::{Sched, thread_sched};
use anyhow::{Context, Result, ensure};
use lb_agent::userspace::UserspaceProxy;
use lb_api::{Algorithm, Backend, DesiredState, GrpcPolicy, Protocol, Service};
use rpclb_tests::grpc::proto::SimpleRequest;
use rpclb_tests::grpc::proto::test_service_client::TestServiceClient;
use rpclb_tests::grpc::{GrpcServer, Journal, ServerOptions, TestBackend};
use rpclb_tests::lab::Netns;
use tonic::transport::{Channel, Endpoint};

use super::live::Topo;
use super::{Opts, Table, check_stop, count, header, median, percentile, stopped, verdict};

const PORT: u16 = 50051;
const VIP1: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const VIP3: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
/// Calls in flight in the max-calls/s runs.
const IN_FLIGHT: usize = 16;
/// The paced runs' rate: this share of the direct path's max calls/s...
const LOAD_SHARE: f64 = 0.3;
/// ... but at most this share of the slowest path's max.
const MAX_SHARE: f64 = 0.4;
/// Bound of every call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds of one paced run: calls, and calls in flight (a call due when this many are
/// still open is skipped and counted).
const MAX_PACED_CALLS: usize = 50_000;
const MAX_OUTSTANDING: usize = 256;
/// A closed-loop task gives up after this many failed calls.
const MAX_ERRORS: u64 = 1_000;
/// Bytes of each response's payload (the request is empty).
const RESPONSE_SIZE: i32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Direct,
    Vip1,
    Vip3,
}

const PATHS: [Path; 3] = [Path::Direct, Path::Vip1, Path::Vip3];

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct to a pod",
            Path::Vip1 => "gRPC mode, 1 backend",
            Path::Vip3 => "gRPC mode, 3 backends",
        }
    }

    fn target(self, pod: Ipv4Addr) -> SocketAddr {
        match self {
            Path::Direct => SocketAddr::from((pod, PORT)),
            Path::Vip1 => SocketAddr::from((VIP1, PORT)),
            Path::Vip3 => SocketAddr::from((VIP3, PORT)),
        }
    }

    fn vip(self) -> Option<Ipv4Addr> {
        match self {
            Path::Direct => None,
            Path::Vip1 => Some(VIP1),
            Path::Vip3 => Some(VIP3),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Load {
    /// `IN_FLIGHT` calls in flight at all times.
    Max,
    /// Calls started at this rate (per second).
    Paced(f64),
}

/// Direct's p99 above which the p99 overhead is not judged (the machine is busy).
const BUSY_P99_US: f64 = 1_000.0;

/// One run of one path.
#[derive(Clone, Debug, Default)]
struct Run {
    ok: u64,
    errors: u64,
    secs: f64,
    /// Paced runs: per successful call, µs.
    lat_us: Vec<f64>,
    /// Paced runs: calls skipped because `MAX_OUTSTANDING` were open.
    skipped: u64,
    first_error: Option<String>,
    /// Calls each backend served in the run (backends 1, 2, 3).
    served: [u64; 3],
    /// The proxy threads' CPU time in the run, ns.
    proxy_cpu_ns: u64,
    /// The proxy threads' schedstat over the run.
    proxy: Sched,
    /// The schedstat of every thread of this process (client, pacer, backends, proxy).
    all: Sched,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }
    fn p(&self, q: f64) -> f64 {
        percentile(&self.lat_us, q)
    }
}

async fn connect(t: SocketAddr) -> Result<TestServiceClient<Channel>> {
    let ch = Endpoint::from_shared(format!("http://{t}"))?
        .connect_timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect to {t}"))?;
    Ok(TestServiceClient::new(ch))
}

async fn one_call(c: &mut TestServiceClient<Channel>) -> Result<(), String> {
    let req = SimpleRequest {
        response_size: RESPONSE_SIZE,
        payload: None,
    };
    match tokio::time::timeout(CALL_TIMEOUT, c.unary_call(req)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

/// `width` callers, each making one call after the other, for `secs`.
async fn closed_loop(c: TestServiceClient<Channel>, width: usize, secs: f64) -> Run {
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(secs);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..width {
        let mut c = c.clone();
        set.spawn(async move {
            let (mut ok, mut errors, mut first) = (0u64, 0u64, None);
            while Instant::now() < until && !stopped() && errors < MAX_ERRORS {
                match one_call(&mut c).await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        errors += 1;
                        first.get_or_insert(e);
                    }
                }
            }
            (ok, errors, first)
        });
    }
    let mut r = Run::default();
    while let Some(x) = set.join_next().await {
        let (ok, errors, first) = x.unwrap_or((0, 1, Some("a caller task failed".into())));
        r.ok += ok;
        r.errors += errors;
        if r.first_error.is_none() {
            r.first_error = first;
        }
    }
    r.secs = t0.elapsed().as_secs_f64();
    r
}

/// Calls started on a fixed schedule, `rate` per second, for `secs` (at most
/// `MAX_PACED_CALLS`), each on its own task, each timed from its start to its answer.
///
/// The schedule runs on a thread of its own (`pacer`), not on tokio's timer: that one has a
/// 1 ms resolution, so the calls due in one millisecond (6 at 6,000/s) would start together,
/// a burst that queues behind whatever serves them. The pacer sleeps to each call's due time
/// (timer slack 1 µs) and hands the start to the client's runtime, which starts the call at
/// once: calls start one by one, `1 / rate` apart, the same for every path.
async fn paced(c: TestServiceClient<Channel>, rate: f64, secs: f64) -> Run {
    let n = ((rate * secs) as usize).clamp(1, MAX_PACED_CALLS);
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let errors = Arc::new(AtomicU64::new(0));
    let first = Arc::new(Mutex::new(None::<String>));
    let open = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let hard_end = t0 + Duration::from_secs_f64(secs * 2.0) + CALL_TIMEOUT;
    let (tx, mut due) = tokio::sync::mpsc::unbounded_channel::<()>();
    let pacer = std::thread::Builder::new()
        .name("rpclb-pacer".into())
        .spawn(move || pacer(t0, rate, n, hard_end, &tx));
    let mut set = tokio::task::JoinSet::new();
    let mut skipped = 0u64;
    while let Some(()) = due.recv().await {
        while set.try_join_next().is_some() {}
        if open.load(Ordering::Relaxed) >= MAX_OUTSTANDING {
            skipped += 1;
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (mut c, lat, errors, first, open) = (
            c.clone(),
            lat.clone(),
            errors.clone(),
            first.clone(),
            open.clone(),
        );
        set.spawn(async move {
            let s = Instant::now();
            let r = one_call(&mut c).await;
            let us = s.elapsed().as_secs_f64() * 1e6;
            open.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(()) => lock(&lat).push(us),
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    lock(&first).get_or_insert(e);
                }
            }
        });
    }
    if let Ok(p) = pacer {
        let _ = p.join();
    }
    while set.join_next().await.is_some() {}
    let lat_us = std::mem::take(&mut *lock(&lat));
    Run {
        ok: lat_us.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        secs: t0.elapsed().as_secs_f64(),
        lat_us,
        skipped,
        first_error: lock(&first).take(),
        ..Run::default()
    }
}

/// The paced runs' schedule: `n` starts from `t0`, `1 / rate` apart, each sent on `tx` at
/// its due time (a sleep with 1 µs of timer slack, no spinning). Stops early on a stop
/// request, at `hard_end`, or when the receiver is gone.
fn pacer(
    t0: Instant,
    rate: f64,
    n: usize,
    hard_end: Instant,
    tx: &tokio::sync::mpsc::UnboundedSender<()>,
) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack (default
    // 50 µs, which would blur a schedule of ~160 µs steps).
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1_000u64);
    }
    for k in 0..n {
        let at = t0 + Duration::from_secs_f64(k as f64 / rate);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        if stopped() || Instant::now() > hard_end || tx.send(()).is_err() {
            break;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a fresh single-thread runtime inside `ns`.
fn in_ns<F, Fut, R>(ns: &Netns, f: F) -> Result<R>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<R>>,
    R: Send,
{
    ns.run(move || -> Result<R> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })?
}

/// The proxy's options: the defaults, and for experiments
/// `RPCLB_BENCH_GRPC_RUNTIME=shared|per-thread` (where gRPC connections run: the shared
/// multi-thread runtime, or the default per-thread runtimes) besides the lab section's
/// `RPCLB_BENCH_US_THREADS`.
fn grpc_proxy_options() -> lb_agent::userspace::ProxyOptions {
    let mut o = super::throughput::proxy_options();
    match std::env::var("RPCLB_BENCH_GRPC_RUNTIME").as_deref() {
        Ok("shared") => o.grpc_per_thread_runtimes = false,
        Ok("per-thread") => o.grpc_per_thread_runtimes = true,
        _ => {}
    }
    o
}

fn grpc_service(name: &str, vip: Ipv4Addr, backends: Vec<Backend>) -> Service {
    let mut s = Service::new(
        name,
        vip,
        PORT,
        Protocol::Tcp,
        // Not used in the gRPC mode (per-call P2C).
        Algorithm::Maglev,
        backends,
    );
    s.grpc = Some(GrpcPolicy::default());
    s
}

/// Client connections the proxy accepted for the service on `vip`.
fn client_connections(p: &UserspaceProxy, vip: Ipv4Addr) -> u64 {
    p.stats()
        .iter()
        .find(|s| s.addr.vip == vip && s.addr.port == PORT)
        .map_or(0, |s| s.new_connections)
}

/// Max deviation from an even share, in %: max |n_i / mean - 1|.
fn spread_pct(n: &[u64]) -> f64 {
    let total: u64 = n.iter().sum();
    if total == 0 || n.is_empty() {
        return f64::NAN;
    }
    let mean = total as f64 / n.len() as f64;
    n.iter()
        .map(|&x| (x as f64 / mean - 1.0).abs() * 100.0)
        .fold(0.0, f64::max)
}

fn sum_served(runs: &[Run]) -> [u64; 3] {
    let mut s = [0u64; 3];
    for r in runs {
        for (a, b) in s.iter_mut().zip(r.served) {
            *a += b;
        }
    }
    s
}

fn us(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.0}")
    }
}

fn mmm(v: &[f64], f: fn(f64) -> String) -> String {
    format!(
        "{} ({}..{})",
        f(median(v)),
        f(super::min(v)),
        f(super::max(v))
    )
}

fn signed_us(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:+.0}")
    }
}

pub fn section_grpc(opts: &Opts) -> Result<()> {
    header(
        "9. gRPC mode: unary calls over one client connection, through the agent's proxy vs \
         direct to a pod",
    );
    let topo = Topo::new(3)?;
    let lab = topo.lab();
    let journal = Arc::new(Journal::counting());
    let mut servers = Vec::new();
    for (i, h) in lab.backends().iter().enumerate() {
        let backend = TestBackend::new(i + 1, format!("pod-{}", i + 1), journal.clone());
        let o = ServerOptions {
            grace: Duration::from_secs(1),
            ..ServerOptions::default()
        };
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT));
        servers.push(
            GrpcServer::start_with(&h.ns, any, backend, o)
                .with_context(|| format!("gRPC backend in {}", h.ns.name()))?,
        );
    }
    let pods: Vec<Ipv4Addr> = lab.backends().iter().map(|h| h.ip()).collect();
    let state = DesiredState {
        services: vec![
            grpc_service("bench/grpc-1:grpc", VIP1, vec![Backend::new(pods[0], PORT)]),
            grpc_service(
                "bench/grpc-3:grpc",
                VIP3,
                pods.iter().map(|&ip| Backend::new(ip, PORT)).collect(),
            ),
        ],
    };
    // The agent's gRPC mode, in process in the node namespace (as `lb-agent` runs it), for
    // the whole section: idle, it costs nothing to the direct runs.
    let proxy = lab.node().run(|| -> Result<UserspaceProxy> {
        let p = UserspaceProxy::start(grpc_proxy_options())
            .map_err(|e| anyhow::anyhow!("userspace proxy: {e}"))?;
        p.apply(&state)
            .map_err(|e| anyhow::anyhow!("userspace proxy: {e}"))?;
        Ok(p)
    })??;
    let client = &lab.client().ns;
    let served = || -> [u64; 3] { [1, 2, 3].map(|i| journal.served(i)) };

    let run = |p: Path, load: Load, secs: f64| -> Result<Run> {
        check_stop()?;
        let target = p.target(pods[0]);
        let is_proxy = |c: &str| c.starts_with("rpclb-proxy");
        let (before, conns, cpu, px0, all0) = (
            served(),
            p.vip().map(|v| client_connections(&proxy, v)),
            super::throughput::proxy_cpu_ns(),
            thread_sched(is_proxy),
            thread_sched(|_| true),
        );
        let mut r = in_ns(client, move || async move {
            let c = connect(target).await?;
            Ok::<Run, anyhow::Error>(match load {
                Load::Max => closed_loop(c, IN_FLIGHT, secs).await,
                Load::Paced(rate) => paced(c, rate, secs).await,
            })
        })?;
        r.proxy_cpu_ns = super::throughput::proxy_cpu_ns().saturating_sub(cpu);
        r.proxy = thread_sched(is_proxy).since(px0);
        r.all = thread_sched(|_| true).since(all0);
        let after = served();
        r.served = std::array::from_fn(|i| after[i] - before[i]);
        if let (Some(v), Some(c0)) = (p.vip(), conns) {
            let n = client_connections(&proxy, v) - c0;
            ensure!(n == 1, "{}: {n} client connections in one run", p.label());
        }
        Ok(r)
    };

    // Warm-up, and a check that every path answers.
    for p in PATHS {
        let r = run(p, Load::Max, 0.3)?;
        ensure!(
            r.ok > 0,
            "{}: no call succeeded in the warm-up ({} errors; {:?})",
            p.label(),
            r.errors,
            r.first_error
        );
    }
    let secs = opts.lab_secs;
    let rounds = opts.lab_rounds;
    let mut max: Vec<Vec<Run>> = vec![Vec::new(); PATHS.len()];
    for round in 0..rounds {
        for k in 0..PATHS.len() {
            let pi = (k + round) % PATHS.len();
            max[pi].push(run(PATHS[pi], Load::Max, secs)?);
        }
    }
    let rates: Vec<Vec<f64>> = max
        .iter()
        .map(|rs| rs.iter().map(Run::rate).collect())
        .collect();
    let slowest = rates
        .iter()
        .map(|r| median(r))
        .fold(f64::INFINITY, f64::min);
    let rate = (LOAD_SHARE * median(&rates[0]))
        .min(MAX_SHARE * slowest)
        .max(10.0);
    let mut lat: Vec<Vec<Run>> = vec![Vec::new(); PATHS.len()];
    for round in 0..rounds {
        for k in 0..PATHS.len() {
            let pi = (k + round) % PATHS.len();
            lat[pi].push(run(PATHS[pi], Load::Paced(rate), secs)?);
        }
    }
    let proxy_stats = proxy.stats();
    proxy
        .shutdown()
        .map_err(|e| anyhow::anyhow!("userspace proxy: {e}"))?;
    drop(servers);

    // Max calls/s.
    println!(
        "one client HTTP/2 connection (tonic) per run, unary calls (empty request, {RESPONSE_SIZE}-byte \
         response), backends: grpc.testing.TestService on hyper, one thread each; proxy: the \
         agent's gRPC mode in process in the node namespace ({} runtime(s)); {:.1} s per \
         run, {rounds} round(s), paths rotated each round; median (min..max) of the rounds, \
         ratios and differences: median of per-round figures",
        if grpc_proxy_options().grpc_per_thread_runtimes {
            "per-thread"
        } else {
            "shared"
        },
        secs
    );
    let head = format!("max calls/s, {IN_FLIGHT} in flight");
    let mut t = Table::new(&[
        head.as_str(),
        "calls/s",
        "vs direct",
        "proxy CPU µs/call",
        "errors",
    ]);
    for (pi, p) in PATHS.iter().enumerate() {
        let cpu: Vec<f64> = max[pi]
            .iter()
            .filter(|r| r.ok > 0)
            .map(|r| r.proxy_cpu_ns as f64 / r.ok as f64 / 1000.0)
            .collect();
        t.row(vec![
            p.label().into(),
            format!(
                "{} ({}..{})",
                count(median(&rates[pi]) as u64),
                count(super::min(&rates[pi]) as u64),
                count(super::max(&rates[pi]) as u64)
            ),
            super::ratio(super::ratio_of_rounds(&rates[pi], &rates[0])),
            if *p == Path::Direct {
                "-".into()
            } else {
                format!("{:.1}", median(&cpu))
            },
            count(max[pi].iter().map(|r| r.errors).sum()),
        ]);
    }
    print!("{}", t.render());

    // Latency at the moderate rate.
    let p50: Vec<Vec<f64>> = lat
        .iter()
        .map(|rs| rs.iter().map(|r| r.p(50.0)).collect())
        .collect();
    let p99: Vec<Vec<f64>> = lat
        .iter()
        .map(|rs| rs.iter().map(|r| r.p(99.0)).collect())
        .collect();
    let diff = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
    println!(
        "latency at {} calls/s ({:.0}% of direct's max, at most {:.0}% of the slowest path's), \
         calls started one by one on a schedule (a pacer thread, not tokio's 1 ms timer), \
         each timed from its start to its answer; per run at most {} calls, {} open",
        count(rate as u64),
        LOAD_SHARE * 100.0,
        MAX_SHARE * 100.0,
        count(MAX_PACED_CALLS as u64),
        MAX_OUTSTANDING
    );
    let mut t = Table::new(&[
        "latency, paced",
        "calls/s",
        "p50 µs",
        "p99 µs",
        "p50 - direct",
        "p99 - direct",
        "errors",
        "skipped",
    ]);
    let mut overhead = [f64::NAN; 3];
    for (pi, p) in PATHS.iter().enumerate() {
        let achieved: Vec<f64> = lat[pi].iter().map(Run::rate).collect();
        let (d50, d99) = (
            median(&diff(&p50[pi], &p50[0])),
            median(&diff(&p99[pi], &p99[0])),
        );
        overhead[pi] = d99;
        let is_direct = *p == Path::Direct;
        t.row(vec![
            p.label().into(),
            count(median(&achieved) as u64),
            mmm(&p50[pi], us),
            mmm(&p99[pi], us),
            if is_direct {
                "-".into()
            } else {
                signed_us(d50)
            },
            if is_direct {
                "-".into()
            } else {
                signed_us(d99)
            },
            count(lat[pi].iter().map(|r| r.errors).sum()),
            count(lat[pi].iter().map(|r| r.skipped).sum()),
        ]);
    }
    print!("{}", t.render());
    // Where a call's latency can go on a shared machine: the run queue. Per successful call,
    // the medians over the paced runs.
    let per_call = |rs: &[Run], f: &dyn Fn(&Run) -> f64| -> f64 {
        median(
            &rs.iter()
                .filter(|r| r.ok > 0)
                .map(|r| f(r) / r.ok as f64)
                .collect::<Vec<_>>(),
        )
    };
    let mut t = Table::new(&[
        "run queue, paced (per call)",
        "proxy wake-ups",
        "proxy wait µs",
        "all threads: wake-ups",
        "all threads: wait µs",
        "all threads: CPU µs",
    ]);
    for (pi, p) in PATHS.iter().enumerate() {
        let is_direct = *p == Path::Direct;
        let rs = &lat[pi];
        t.row(vec![
            p.label().into(),
            if is_direct {
                "-".into()
            } else {
                format!("{:.2}", per_call(rs, &|r| r.proxy.slices as f64))
            },
            if is_direct {
                "-".into()
            } else {
                format!("{:.1}", per_call(rs, &|r| r.proxy.wait_ns as f64 / 1000.0))
            },
            format!("{:.2}", per_call(rs, &|r| r.all.slices as f64)),
            format!("{:.1}", per_call(rs, &|r| r.all.wait_ns as f64 / 1000.0)),
            format!("{:.1}", per_call(rs, &|r| r.all.cpu_ns as f64 / 1000.0)),
        ]);
    }
    print!("{}", t.render());
    println!(
        "(schedstat of this process's threads over each paced run: \"wait\" is time runnable but \
         not on a CPU; the client, the pacer, the backends and the proxy all run in this process)"
    );
    for (pi, p) in PATHS.iter().enumerate() {
        if let Some(e) = max[pi]
            .iter()
            .chain(&lat[pi])
            .find_map(|r| r.first_error.as_deref())
        {
            println!("{}: first error: {e}", p.label());
        }
    }

    // The spread over 3 backends, as the backends counted their calls.
    let v3 = 2;
    let (s_max, s_lat) = (sum_served(&max[v3]), sum_served(&lat[v3]));
    let mut t = Table::new(&[
        "spread, gRPC mode, 3 backends",
        "pod-1",
        "pod-2",
        "pod-3",
        "max deviation from even",
    ]);
    for (what, s) in [
        (format!("{IN_FLIGHT} in flight"), s_max),
        ("paced".to_string(), s_lat),
    ] {
        t.row(vec![
            what,
            count(s[0]),
            count(s[1]),
            count(s[2]),
            format!("{:.1}%", spread_pct(&s)),
        ]);
    }
    print!("{}", t.render());
    let per_run: Vec<f64> = max[v3]
        .iter()
        .chain(&lat[v3])
        .map(|r| spread_pct(&r.served))
        .collect();
    println!(
        "per run: max deviation {:.1}% at most; every VIP run used one client connection \
         (proxy: {} client connections in all, {} calls)",
        super::max(&per_run),
        count(proxy_stats.iter().map(|s| s.new_connections).sum()),
        count(proxy_stats.iter().map(|s| s.requests).sum()),
    );

    let (o1, o3) = (overhead[1], overhead[2]);
    // A busy machine's own tail (direct's p99 over a millisecond) is larger than the effect
    // under test, and can make the overhead come out negative: no verdict then.
    let direct_p99 = median(&p99[0]);
    let judged = direct_p99 <= BUSY_P99_US;
    verdict(
        "gRPC mode, unary p99 overhead vs direct, moderate load, one connection",
        "< 150 µs (1 and 3 backends)",
        format!(
            "1 backend {} µs, 3 backends {} µs (p99 direct {} µs, at {} calls/s){}",
            signed_us(o1),
            signed_us(o3),
            us(direct_p99),
            count(rate as u64),
            if judged {
                ""
            } else {
                "; not judged: the machine is busy (direct's p99 over 1 ms)"
            }
        ),
        judged.then_some(o1 < 150.0 && o3 < 150.0),
    );
    let (d_max, d_lat) = (spread_pct(&s_max), spread_pct(&s_lat));
    verdict(
        "gRPC mode, spread of one connection's calls over 3 backends",
        "within ±10% of even",
        format!("{d_max:.1}% ({IN_FLIGHT} in flight), {d_lat:.1}% (paced)"),
        Some(d_max <= 10.0 && d_lat <= 10.0),
    );
    verdict(
        "gRPC mode, max calls/s vs direct, one connection",
        "- (informational)",
        format!(
            "1 backend {}, 3 backends {}",
            super::ratio(super::ratio_of_rounds(&rates[1], &rates[0])),
            super::ratio(super::ratio_of_rounds(&rates[2], &rates[0]))
        ),
        None,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_the_largest_deviation_from_even() {
        assert_eq!(spread_pct(&[100, 100, 100]), 0.0);
        assert!((spread_pct(&[110, 100, 90]) - 10.0).abs() < 1e-9);
        assert!((spread_pct(&[150, 75, 75]) - 50.0).abs() < 1e-9);
        assert!(spread_pct(&[0, 0, 0]).is_nan());
    }
}
