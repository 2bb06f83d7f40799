//! Section `fanout`: the controller's fan-out to many agent streams, and the control plane at
//! Kubernetes scale.
//!
//! 1. One real controller process (`lb-controller --config FILE --insecure`, standalone), in a
//!    namespace of its own (gRPC on that namespace's 127.0.0.1). This process opens N agent
//!    streams to it: real tonic clients of the Watch API, one HTTP/2 connection and one
//!    distinct node name each, that check every message's version chain and ack every
//!    version as an agent does (they write no maps). Then one-backend changes: the file is
//!    rewritten and the controller gets SIGHUP (it re-reads the file at once); each change is
//!    timed until every agent acked its version. Memory: the controller's VmRSS / VmHWM
//!    (/proc/PID/status) before and after the streams; CPU per change: its utime + stime
//!    (/proc/PID/stat) over the changes.
//! 2. In process: 10,000 Kubernetes Services with one EndpointSlice of 10 endpoints each
//!    (100,000 endpoints). Each change replaces one endpoint of one slice and runs what the
//!    watcher runs when its coalescing window closes (`ClusterState::build` over every object,
//!    the comparison with the previous snapshot), then `kube_mode::node_states`, `publish`,
//!    and gRPC to agents that ack; timed until every agent acked. A full resync is a new
//!    stream: from its connect to the ack of its snapshot.
//! 3. The kube-proxy-style baseline: the iptables-restore input that kube-proxy's iptables
//!    mode writes for the same 10,000 services / 100,000 endpoints (KUBE-SERVICES, KUBE-SVC-*,
//!    KUBE-SEP-* with statistic matches), timed with `iptables-restore` inside a namespace of
//!    its own; also `nft -f` of the same rules when nft is installed.
//!
//! Every loop is bounded in count and in time; the controller process and every namespace are
//! removed on return, on error and on panic.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::{Service as KubeService, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_api::config::Timeouts;
use lb_api::wire::{self, pb};
use lb_controller::ClusterState;
use lb_controller::grpc::{Agents, Publisher};
use lb_controller::watch::ClusterSnapshot;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use super::{LocalWatch, Opts, Table, check_stop, count, header, max, median, percentile, verdict};
use rpclb_tests::lab::Netns;

const PER_SERVICE: u32 = 10;
const GRPC_ADDR: &str = "127.0.0.1:50551";

// ---------------------------------------------------------------------------------------------
// Simulated agents

/// Per version: how many agents acked it, when it was first received and when the last agent
/// acked it.
#[derive(Default)]
struct Board {
    by_version: Mutex<HashMap<u64, Tally>>,
    all_acked: Notify,
    agents: AtomicUsize,
}

#[derive(Clone, Copy, Debug)]
struct Tally {
    acks: usize,
    first_seen: Instant,
    all: Option<Instant>,
    /// The largest message of this version, bytes (protobuf, without the 5-byte prefix).
    largest: usize,
    /// Messages of this version, over all agents.
    msgs: usize,
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tally>> {
        self.by_version.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn seen(&self, v: u64, len: usize) {
        let mut m = self.lock();
        let t = m.entry(v).or_insert(Tally {
            acks: 0,
            first_seen: Instant::now(),
            all: None,
            largest: 0,
            msgs: 0,
        });
        t.largest = t.largest.max(len);
        t.msgs += 1;
    }

    fn acked(&self, v: u64) {
        let n = self.agents.load(Ordering::Relaxed);
        let mut m = self.lock();
        if let Some(t) = m.get_mut(&v) {
            t.acks += 1;
            if t.acks >= n && t.all.is_none() {
                t.all = Some(Instant::now());
                self.all_acked.notify_waiters();
            }
        }
    }

    /// The newest version that every agent acked, with its tally.
    fn newest_all(&self) -> Option<(u64, Tally)> {
        self.lock()
            .iter()
            .filter(|(_, t)| t.all.is_some())
            .max_by_key(|(v, _)| **v)
            .map(|(v, t)| (*v, *t))
    }

    /// Waits until every agent acked a version above `above`.
    async fn wait_all_above(&self, above: u64, limit: Duration) -> Result<(u64, Tally)> {
        let t0 = Instant::now();
        loop {
            let notified = self.all_acked.notified();
            if let Some((v, t)) = self.newest_all().filter(|(v, _)| *v > above) {
                return Ok((v, t));
            }
            let left = limit.checked_sub(t0.elapsed()).ok_or_else(|| {
                anyhow!("not every agent acked a version above {above} within {limit:?}")
            })?;
            let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), notified).await;
            check_stop()?;
        }
    }
}

/// Released at an agent's first ack: limits how many agents connect at once.
struct Gate {
    permit: Option<OwnedSemaphorePermit>,
    ready: Arc<AtomicUsize>,
}

/// One simulated agent: a tonic client of the Watch API on its own connection. It checks that
/// the first message is a snapshot and that each delta starts from the version it has, and
/// acks every version. Returns when the stream ends.
async fn agent(url: String, node: String, board: Arc<Board>, mut gate: Gate) -> Result<()> {
    let mut tries = 0;
    let ch = loop {
        match tonic::transport::Endpoint::from_shared(url.clone())?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect()
            .await
        {
            Ok(ch) => break ch,
            Err(e) if tries < 5 => {
                tries += 1;
                tracing::debug!("{node}: connect: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context(format!("{node}: connect")),
        }
    };
    let mut client = wire::StateStreamClient::new(ch).max_decoding_message_size(64 << 20);
    let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(4);
    out_tx
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                node: node.clone(),
                agent_version: "bench".into(),
                applied_version: 0,
            })),
        })
        .await
        .map_err(|_| anyhow!("outbound closed"))?;
    let mut inbound = client
        .watch(ReceiverStream::new(out_rx))
        .await
        .with_context(|| format!("{node}: watch"))?
        .into_inner();
    let mut have = 0u64;
    while let Some(m) = inbound
        .message()
        .await
        .with_context(|| format!("{node}: stream"))?
    {
        use prost::Message as _;
        board.seen(m.version, m.encoded_len());
        match &m.body {
            Some(pb::controller_message::Body::Snapshot(_)) => {}
            Some(pb::controller_message::Body::Delta(d)) => {
                ensure!(have != 0, "{node}: a delta before the snapshot");
                ensure!(
                    d.base_version == have,
                    "{node}: a delta from {} while at {have}",
                    d.base_version
                );
            }
            None => bail!("{node}: a message without a body"),
        }
        have = m.version;
        drop(m);
        out_tx
            .send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Ack(pb::Ack {
                    version: have,
                    error: String::new(),
                    refused: Vec::new(),
                })),
            })
            .await
            .map_err(|_| anyhow!("outbound closed"))?;
        board.acked(have);
        if gate.permit.take().is_some() {
            gate.ready.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Starts `n` agents (at most 64 connecting at once) and waits until each acked a snapshot.
async fn start_agents(
    url: &str,
    prefix: &str,
    n: usize,
    board: &Arc<Board>,
    limit: Duration,
) -> Result<Vec<JoinHandle<Result<()>>>> {
    board.agents.store(n, Ordering::Relaxed);
    let gate = Arc::new(Semaphore::new(64));
    let ready = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (url, board, gate, ready) =
            (url.to_string(), board.clone(), gate.clone(), ready.clone());
        let node = format!("{prefix}-{i:05}");
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let g = Gate {
                permit: Some(permit),
                ready,
            };
            agent(url, node, board, g).await
        }));
    }
    let t0 = Instant::now();
    while ready.load(Ordering::Relaxed) < n {
        check_stop()?;
        if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
            let t = tasks.swap_remove(i);
            for t in &tasks {
                t.abort();
            }
            return Err(match t.await {
                Ok(Ok(())) => anyhow!("an agent stream ended early"),
                Ok(Err(e)) => e.context("an agent failed"),
                Err(e) => anyhow!("an agent panicked: {e}"),
            });
        }
        if t0.elapsed() > limit {
            for t in &tasks {
                t.abort();
            }
            bail!(
                "only {} of {n} agents had their snapshot after {limit:?}",
                ready.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(tasks)
}

// ---------------------------------------------------------------------------------------------
// Process figures

/// VmRSS and VmHWM of `pid`, KiB.
fn mem_kib(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// MemAvailable of /proc/meminfo, KiB.
fn mem_available_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemAvailable:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// utime + stime of `pid`, seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces), from field 3 on.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of proc(5); field 3 (state) is index 0 here.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11) + ticks(12)) as f64 / hz)
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit (inherited by the controller).
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            return r.rlim_cur;
        }
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Part 1: one standalone controller process, many streams

fn vip(s: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (s / 250) as u8, (s % 250 + 1) as u8)
}

/// Backend `i` of service `s`: distinct addresses in 10.244.0.0/16, never .0 or .255.
fn pod_ip(s: u32, i: u32) -> Ipv4Addr {
    let n = (s * PER_SERVICE + i) % 62_500;
    Ipv4Addr::new(10, 244, (n / 250) as u8, (n % 250 + 1) as u8)
}

/// The config file: `services` services of 10 backends; `bumps` gives, per (service, backend),
/// how many times its port changed.
fn config_yaml(services: u32, bumps: &HashMap<(u32, u32), u16>) -> String {
    let mut y = String::with_capacity(services as usize * 400);
    y.push_str("services:\n");
    for s in 0..services {
        let _ = write!(
            y,
            "  - {{name: \"bench/svc-{s}:grpc\", vip: {}, port: 50051, algorithm: maglev, backends: [",
            vip(s)
        );
        for i in 0..PER_SERVICE {
            let port = 8080 + bumps.get(&(s, i)).copied().unwrap_or(0);
            let _ = write!(
                y,
                "{}{{ip: {}, port: {port}}}",
                if i == 0 { "" } else { ", " },
                pod_ip(s, i)
            );
        }
        y.push_str("]}\n");
    }
    y
}

/// The controller binary: `RPCLB_BENCH_CONTROLLER` if set (to compare builds), else built
/// (`cargo build --release`) when run through cargo, else taken from beside this executable.
fn controller_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RPCLB_BENCH_CONTROLLER") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("exe dir")?;
    let bin = dir.join("lb-controller");
    if let Ok(cargo) = std::env::var("CARGO") {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "lb-controller",
                "--bin",
                "lb-controller",
            ])
            .arg("--manifest-path")
            .arg(&manifest)
            .status()
            .context("cargo build -p lb-controller")?;
        ensure!(status.success(), "building lb-controller failed");
    }
    ensure!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p lb-controller`",
        bin.display()
    );
    Ok(bin)
}

/// The controller process; killed on drop.
struct Controller {
    child: Child,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Controller {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// SIGHUP to the controller (our child): it re-reads its file at once.
fn hup(pid: u32) -> Result<()> {
    // SAFETY: a signal to our own child process.
    let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    ensure!(r == 0, "SIGHUP: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Figures of one run of part 1.
struct FanoutRun {
    streams: usize,
    services: u32,
    /// Controller memory, KiB: after the config was loaded (no stream), after every stream had
    /// its snapshot, after the changes; and the high-water mark.
    rss_before: u64,
    rss_streams: u64,
    rss_after: u64,
    hwm: u64,
    /// SIGHUP -> every agent acked, ms; first agent received -> every agent acked, ms.
    total_ms: Vec<f64>,
    spread_ms: Vec<f64>,
    /// Controller CPU per change, ms.
    cpu_per_change_ms: f64,
    connect_s: f64,
    snapshot_bytes: usize,
    delta_bytes: usize,
}

fn run_standalone(
    bin: &Path,
    dir: &Path,
    streams: usize,
    services: u32,
    changes: usize,
) -> Result<FanoutRun> {
    let ns = Netns::new("bench-fanout")?;
    let cfg = dir.join(format!("services-{streams}-{services}.yaml"));
    let mut bumps: HashMap<(u32, u32), u16> = HashMap::new();
    std::fs::write(&cfg, config_yaml(services, &bumps))?;
    let log = std::fs::File::create(dir.join(format!("controller-{streams}-{services}.log")))?;
    let (bin, cfg2) = (bin.to_path_buf(), cfg.clone());
    let ctl = ns.run(move || -> Result<Controller> {
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&cfg2)
            .args(["--insecure", "--listen", GRPC_ADDR])
            .args([
                "--metrics-addr",
                "127.0.0.1:9465",
                "--config-poll-ms",
                "3600000",
            ])
            .args(["--max-streams-per-node", "2"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Controller { child })
    })??;
    let pid = ctl.pid();
    // Wait for the listener (the config is parsed first).
    let t0 = Instant::now();
    loop {
        check_stop()?;
        let up = ns.run(|| std::net::TcpStream::connect(GRPC_ADDR).is_ok())?;
        if up {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "the controller did not listen within 60 s (see {})",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (rss_before, _) = mem_kib(pid)?;

    let url = format!("http://{GRPC_ADDR}");
    let run = ns.run(move || -> Result<FanoutRun> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let board = Arc::new(Board::default());
            let t = Instant::now();
            let tasks =
                start_agents(&url, "node", streams, &board, Duration::from_secs(300)).await?;
            let connect_s = t.elapsed().as_secs_f64();
            let (mut have, snap) = board
                .newest_all()
                .ok_or_else(|| anyhow!("no version acked by all"))?;
            // Let buffers settle before reading memory.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (rss_streams, _) = mem_kib(pid)?;
            let cpu0 = cpu_secs(pid)?;
            let mut total_ms = Vec::new();
            let mut spread_ms = Vec::new();
            let mut delta_bytes = 0;
            for k in 0..changes {
                check_stop()?;
                let s = (k as u32 * 7919) % services;
                let i = k as u32 % PER_SERVICE;
                *bumps.entry((s, i)).or_default() += 1;
                std::fs::write(&cfg, config_yaml(services, &bumps))?;
                let t0 = Instant::now();
                hup(pid)?;
                let (v, tally) = board.wait_all_above(have, Duration::from_secs(60)).await?;
                let all = tally.all.unwrap_or_else(Instant::now);
                total_ms.push(all.duration_since(t0).as_secs_f64() * 1e3);
                spread_ms.push(all.duration_since(tally.first_seen).as_secs_f64() * 1e3);
                delta_bytes = delta_bytes.max(tally.largest);
                have = v;
            }
            let cpu = cpu_secs(pid)? - cpu0;
            let (rss_after, hwm) = mem_kib(pid)?;
            for t in &tasks {
                t.abort();
            }
            Ok(FanoutRun {
                streams,
                services,
                rss_before,
                rss_streams,
                rss_after,
                hwm,
                total_ms,
                spread_ms,
                cpu_per_change_ms: cpu * 1e3 / changes.max(1) as f64,
                connect_s,
                snapshot_bytes: snap.largest,
                delta_bytes,
            })
        })
    })??;
    drop(ctl);
    Ok(run)
}

// ---------------------------------------------------------------------------------------------
// Part 2: 10,000 Services / 100,000 endpoints, in process

fn kube_service(s: u32) -> KubeService {
    KubeService {
        metadata: ObjectMeta {
            name: Some(format!("svc-{s}")),
            namespace: Some("bench".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip(s).to_string()),
            cluster_ips: Some(vec![vip(s).to_string()]),
            ports: Some(vec![ServicePort {
                name: Some("grpc".into()),
                port: 50051,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn kube_slice(s: u32, moved: &HashMap<(u32, u32), u32>) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{s}-abcde")),
            namespace: Some("bench".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                format!("svc-{s}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            (0..PER_SERVICE)
                .map(|i| {
                    let g = moved.get(&(s, i)).copied().unwrap_or(0);
                    Endpoint {
                        addresses: vec![pod_ip(s + g * 7, i).to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        node_name: Some(format!("node-{:05}", (s * PER_SERVICE + i) % 1000)),
                        ..Default::default()
                    }
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("grpc".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

struct ScaleRun {
    services: u32,
    agents: usize,
    change_ms: Vec<f64>,
    translate_ms: Vec<f64>,
    publish_ms: Vec<f64>,
    resync_ms: Vec<f64>,
    first_ms: f64,
    snapshot_bytes: usize,
    delta_bytes: usize,
    /// 100 endpoints changed at once: ms to every ack, the delta's bytes, messages per agent.
    batch: (f64, usize, f64),
}

fn run_scale(services: u32, agents: usize, changes: usize, resyncs: usize) -> Result<ScaleRun> {
    let ns = Netns::new("bench-ctlscale")?;
    ns.run(move || -> Result<ScaleRun> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(scale(services, agents, changes, resyncs))
    })?
}

async fn scale(services: u32, agents: usize, changes: usize, resyncs: usize) -> Result<ScaleRun> {
    let publisher = Arc::new(Publisher::new());
    let states = Arc::new(Agents::default());
    let server = LocalWatch::start(&publisher, states.clone()).await?;
    let addr = server.addr;
    let timeouts = Timeouts::default();
    let kube: Vec<Arc<KubeService>> = (0..services).map(|s| Arc::new(kube_service(s))).collect();
    let mut moved: HashMap<(u32, u32), u32> = HashMap::new();
    let mut slices: Vec<Arc<EndpointSlice>> = (0..services)
        .map(|s| Arc::new(kube_slice(s, &moved)))
        .collect();
    // What the watcher does when its window closes, then kube_mode's publish.
    let step = |slices: &[Arc<EndpointSlice>],
                prev: Option<&ClusterSnapshot>,
                generation: u64|
     -> (ClusterSnapshot, bool, f64) {
        let t = Instant::now();
        let snap = ClusterSnapshot {
            generation,
            nodes: Vec::new(),
            cluster: ClusterState::build(&kube, slices),
        };
        let same = prev.is_some_and(|p| p.cluster == snap.cluster);
        (snap, same, t.elapsed().as_secs_f64() * 1e3)
    };
    let t = Instant::now();
    let (mut snap, _, _) = step(&slices, None, 1);
    let (d, n) = lb_controller::kube_mode::node_states(&snap, timeouts);
    publisher.publish_shared(d, n);
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    ensure!(
        publisher.current().default.state.services.len() == services as usize,
        "the translation lost services: {} of {services}",
        publisher.current().default.state.services.len()
    );

    let url = format!("http://{addr}");
    let board = Arc::new(Board::default());
    let tasks = start_agents(&url, "node", agents, &board, Duration::from_secs(300)).await?;
    let (mut have, snap_tally) = board.newest_all().context("no snapshot acked")?;
    let mut change_ms = Vec::new();
    let mut translate_ms = Vec::new();
    let mut publish_ms = Vec::new();
    let mut delta_bytes = 0;
    for k in 0..changes {
        check_stop()?;
        let s = (k as u32 * 7919) % services;
        let i = k as u32 % PER_SERVICE;
        *moved.entry((s, i)).or_default() += 1;
        // The watch event: one slice replaced.
        slices[s as usize] = Arc::new(kube_slice(s, &moved));
        let t0 = Instant::now();
        let (next, same, tr) = step(&slices, Some(&snap), k as u64 + 2);
        ensure!(!same, "change {k} changed nothing");
        snap = next;
        let tp = Instant::now();
        let (d, n) = lb_controller::kube_mode::node_states(&snap, timeouts);
        publisher.publish_shared(d, n);
        publish_ms.push(tp.elapsed().as_secs_f64() * 1e3);
        translate_ms.push(tr);
        let (v, tally) = board.wait_all_above(have, Duration::from_secs(30)).await?;
        let all = tally.all.unwrap_or_else(Instant::now);
        change_ms.push(all.duration_since(t0).as_secs_f64() * 1e3);
        delta_bytes = delta_bytes.max(tally.largest);
        have = v;
    }
    // One change of 100 endpoints at once (every endpoint of 10 slices): one delta per agent.
    check_stop()?;
    for j in 0..10 {
        let s = (j * 997 + 13) % services;
        for i in 0..PER_SERVICE {
            *moved.entry((s, i)).or_default() += 1;
        }
        slices[s as usize] = Arc::new(kube_slice(s, &moved));
    }
    let t0 = Instant::now();
    let (next, _, _) = step(&slices, Some(&snap), changes as u64 + 2);
    snap = next;
    let (d, n) = lb_controller::kube_mode::node_states(&snap, timeouts);
    publisher.publish_shared(d, n);
    let (_, tally) = board.wait_all_above(have, Duration::from_secs(30)).await?;
    let batch = (
        tally
            .all
            .unwrap_or_else(Instant::now)
            .duration_since(t0)
            .as_secs_f64()
            * 1e3,
        tally.largest,
        tally.msgs as f64 / agents as f64,
    );
    drop(snap);
    // Full resyncs: one more agent at a time, from connect to the ack of its snapshot.
    let mut resync_ms = Vec::new();
    for r in 0..resyncs {
        check_stop()?;
        let one = Arc::new(Board::default());
        let t = Instant::now();
        let extra = start_agents(
            &url,
            &format!("resync-{r}"),
            1,
            &one,
            Duration::from_secs(30),
        )
        .await?;
        resync_ms.push(t.elapsed().as_secs_f64() * 1e3);
        for e in extra {
            e.abort();
        }
    }
    for t in &tasks {
        t.abort();
    }
    let _ = server.stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), server.task).await;
    Ok(ScaleRun {
        services,
        agents,
        change_ms,
        translate_ms,
        publish_ms,
        resync_ms,
        first_ms,
        snapshot_bytes: snap_tally.largest,
        delta_bytes,
        batch,
    })
}

// ---------------------------------------------------------------------------------------------
// Part 3: kube-proxy's iptables mode

/// A short chain-name hash, as kube-proxy's (base32 of a SHA-256) but simpler.
fn chain(prefix: &str, key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{prefix}-{:016X}", h)
}

/// The nat table that kube-proxy's iptables mode restores for `services` ClusterIP services
/// of 10 endpoints each (`moved` moves endpoints, as in part 2).
fn iptables_rules(services: u32, moved: &HashMap<(u32, u32), u32>) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    chains.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    for s in 0..services {
        let name = format!("bench/svc-{s}:grpc");
        let svc = chain("KUBE-SVC", &name);
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 50051 -j {svc}",
            vip(s)
        );
        for i in 0..PER_SERVICE {
            let g = moved.get(&(s, i)).copied().unwrap_or(0);
            let ip = pod_ip(s + g * 7, i);
            let sep = chain("KUBE-SEP", &format!("{name}/{ip}:8080"));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let left = PER_SERVICE - i;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{name} -> {ip}:8080\" -m statistic --mode random --probability {:.10} -j {sep}",
                    1.0 / f64::from(left)
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{name} -> {ip}:8080\" -j {sep}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -m comment --comment \"{name}\" -s {ip}/32 -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -m comment --comment \"{name}\" -m tcp -p tcp -j DNAT --to-destination {ip}:8080"
            );
        }
    }
    chains + &rules + "COMMIT\n"
}

struct IptablesRun {
    tool: &'static str,
    rules: usize,
    /// `None`: timed out.
    first_ms: Option<f64>,
    change_ms: Vec<f64>,
}

/// Longest one restore may take.
const RESTORE_LIMIT_S: u64 = 150;

/// Restores the rules with `tool` (iptables-nft-restore or iptables-legacy-restore), first
/// into an empty namespace, then after each one-endpoint change (the whole table again, as
/// kube-proxy's iptables mode does on a sync).
fn run_iptables(
    dir: &Path,
    tool: &'static str,
    services: u32,
    changes: usize,
) -> Result<IptablesRun> {
    let ns = Netns::new("bench-kproxy")?;
    let mut moved = HashMap::new();
    let file = dir.join("kube-proxy.rules");
    let restore = |text: &str| -> Result<Option<f64>> {
        std::fs::write(&file, text)?;
        let t = Instant::now();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "timeout",
                &RESTORE_LIMIT_S.to_string(),
            ])
            .args([tool, "--noflush"])
            .arg(&file)
            .output()
            .with_context(|| format!("run {tool}"))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if out.status.code() == Some(124) {
            return Ok(None);
        }
        ensure!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Some(ms))
    };
    let text = iptables_rules(services, &moved);
    let rules = text.lines().filter(|l| l.starts_with("-A")).count();
    let t0 = Instant::now();
    let first_ms = restore(&text)?;
    let mut change_ms = Vec::new();
    for k in 0..changes {
        check_stop()?;
        if first_ms.is_none() || t0.elapsed() > Duration::from_secs(RESTORE_LIMIT_S) {
            break;
        }
        let s = (k as u32 * 7919) % services;
        *moved.entry((s, k as u32 % PER_SERVICE)).or_default() += 1;
        match restore(&iptables_rules(services, &moved))? {
            Some(ms) => change_ms.push(ms),
            None => break,
        }
    }
    Ok(IptablesRun {
        tool,
        rules,
        first_ms,
        change_ms,
    })
}

// ---------------------------------------------------------------------------------------------
// The section

fn kib(v: u64) -> String {
    if v >= 10 * 1024 {
        format!("{:.0} MiB", v as f64 / 1024.0)
    } else {
        format!("{v} KiB")
    }
}

pub fn section_fanout(opts: &Opts) -> Result<()> {
    header("8. Controller fan-out and control-plane scale");
    let nofile = raise_nofile();
    let dir = std::env::temp_dir().join(format!("rpclb-bench-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    let bin = controller_bin()?;

    // Part 1.
    // RPCLB_BENCH_FANOUT="STREAMSxSERVICESxCHANGES,..." replaces the plan, and runs part 1
    // only (to compare controller builds, with RPCLB_BENCH_CONTROLLER).
    let custom = std::env::var("RPCLB_BENCH_FANOUT").ok();
    let plan: Vec<(usize, u32, usize)> = match &custom {
        Some(p) => p
            .split(',')
            .map(|r| {
                let n: Vec<u64> = r.split('x').filter_map(|v| v.trim().parse().ok()).collect();
                match n[..] {
                    [a, b, c] => Ok((
                        (a as usize).clamp(1, 8_000),
                        (b as u32).clamp(1, 16_000),
                        (c as usize).clamp(1, 200),
                    )),
                    _ => Err(anyhow!(
                        "RPCLB_BENCH_FANOUT: {r:?} is not STREAMSxSERVICESxCHANGES"
                    )),
                }
            })
            .collect::<Result<_>>()?,
        None if opts.quick => vec![(100, 500, 10)],
        None => vec![(1_000, 1_000, 20), (1_000, 5_000, 20), (5_000, 5_000, 10)],
    };
    let mut runs = Vec::new();
    for &(streams, services, changes) in &plan {
        check_stop()?;
        if streams as u64 * 2 + 64 > nofile {
            println!("  skipped {streams} streams: RLIMIT_NOFILE is {nofile}");
            continue;
        }
        // This process holds each agent's decode buffer (about a snapshot each): skip what
        // does not fit in the memory available.
        let need_kib = streams as u64 * (u64::from(services) * 400 / 1024 + 256) + (2 << 20);
        if let Some(avail) = mem_available_kib()
            && avail < need_kib
        {
            println!(
                "  skipped {streams} streams x {services} services: needs about {}, {} available",
                kib(need_kib),
                kib(avail)
            );
            continue;
        }
        runs.push(run_standalone(&bin, &dir, streams, services, changes)?);
    }
    let mut t = Table::new(&[
        "standalone controller, one-backend changes",
        "p50 ms",
        "p99 ms",
        "max ms",
        "fan-out p99",
        "KiB/stream",
        "RSS / HWM",
        "CPU/change",
    ]);
    for r in &runs {
        let per_stream = r.rss_streams.saturating_sub(r.rss_before) as f64 / r.streams as f64;
        t.row(vec![
            format!(
                "{} streams, {} services x {PER_SERVICE}: SIGHUP -> all acked ({} changes)",
                count(r.streams as u64),
                count(u64::from(r.services)),
                r.total_ms.len()
            ),
            format!("{:.1}", median(&r.total_ms)),
            format!("{:.1}", percentile(&r.total_ms, 99.0)),
            format!("{:.1}", max(&r.total_ms)),
            format!("{:.1}", percentile(&r.spread_ms, 99.0)),
            format!("{per_stream:.1}"),
            format!(
                "{} -> {} -> {} / {}",
                kib(r.rss_before),
                kib(r.rss_streams),
                kib(r.rss_after),
                kib(r.hwm)
            ),
            format!("{:.1} ms", r.cpu_per_change_ms),
        ]);
    }
    print!("{}", t.render());
    for r in &runs {
        println!(
            "  {} streams, {} services: all connected with their snapshot in {:.1} s; snapshot \
             {} B, largest delta {} B",
            count(r.streams as u64),
            count(u64::from(r.services)),
            r.connect_s,
            count(r.snapshot_bytes as u64),
            count(r.delta_bytes as u64)
        );
    }
    println!(
        "  (SIGHUP -> all acked includes the controller's re-read of the YAML file; fan-out is \
         from the first agent's receipt to the last agent's ack)"
    );
    if !runs.is_empty() {
        let worst_p99 = runs
            .iter()
            .map(|r| percentile(&r.total_ms, 99.0))
            .fold(0.0, f64::max);
        let worst_kib = runs
            .iter()
            .map(|r| r.rss_streams.saturating_sub(r.rss_before) as f64 / r.streams as f64)
            .fold(0.0, f64::max);
        let desc = runs
            .iter()
            .map(|r| {
                format!(
                    "{}x{}: p99 {:.0} ms, {:.0} KB/stream",
                    r.streams,
                    r.services,
                    percentile(&r.total_ms, 99.0),
                    r.rss_streams.saturating_sub(r.rss_before) as f64 * 1.024 / r.streams as f64
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        verdict(
            "one controller (standalone), 1,000 Watch streams, 1,000 services x 10 backends: a one-backend change reaches all",
            "p99 < 1 s and < 100 KB per stream, also with 5,000 services",
            desc,
            (!opts.quick).then_some(worst_p99 < 1000.0 && worst_kib * 1.024 < 100.0),
        );
    }

    if custom.is_some() {
        return Ok(());
    }

    // Part 2.
    check_stop()?;
    let (services, agents, changes, resyncs) = if opts.quick {
        (1_000, 20, 10, 3)
    } else {
        (10_000, 200, 30, 5)
    };
    let s = run_scale(services, agents, changes, resyncs)?;
    let mut t = Table::new(&[
        "controller, Kubernetes objects in process",
        "p50 ms",
        "p99 ms",
        "max ms",
    ]);
    t.row(vec![
        format!(
            "{} Services / {} endpoints: slice change -> {} agents acked ({} changes)",
            count(u64::from(s.services)),
            count(u64::from(s.services * PER_SERVICE)),
            s.agents,
            s.change_ms.len()
        ),
        format!("{:.1}", median(&s.change_ms)),
        format!("{:.1}", percentile(&s.change_ms, 99.0)),
        format!("{:.1}", max(&s.change_ms)),
    ]);
    t.row(vec![
        "  of which ClusterState::build + compare (the watcher)".into(),
        format!("{:.1}", median(&s.translate_ms)),
        format!("{:.1}", percentile(&s.translate_ms, 99.0)),
        format!("{:.1}", max(&s.translate_ms)),
    ]);
    t.row(vec![
        "  of which node_states + publish (diff, encode)".into(),
        format!("{:.1}", median(&s.publish_ms)),
        format!("{:.1}", percentile(&s.publish_ms, 99.0)),
        format!("{:.1}", max(&s.publish_ms)),
    ]);
    t.row(vec![
        format!(
            "full resync of one agent: connect -> snapshot acked ({} runs)",
            s.resync_ms.len()
        ),
        format!("{:.1}", median(&s.resync_ms)),
        format!("{:.1}", percentile(&s.resync_ms, 99.0)),
        format!("{:.1}", max(&s.resync_ms)),
    ]);
    t.row(vec![
        format!(
            "100 endpoints at once (10 slices): {:.1} msg/agent of {} B",
            s.batch.2,
            count(s.batch.1 as u64)
        ),
        format!("{:.1}", s.batch.0),
        String::new(),
        String::new(),
    ]);
    print!("{}", t.render());
    println!(
        "  first translation + publish {:.0} ms; snapshot {} B, largest delta {} B; the \
         watcher's 50 ms coalescing window and the API server's watch delay come on top",
        s.first_ms,
        count(s.snapshot_bytes as u64),
        count(s.delta_bytes as u64)
    );
    let p99 = percentile(&s.change_ms, 99.0);
    let resync = max(&s.resync_ms);
    verdict(
        "controller: 10,000 Services / 100,000 endpoints, from the watch event to every agent's ack",
        "p99 < 250 ms per change; full resync of one agent < 2 s",
        format!(
            "p99 {p99:.0} ms ({} agents); resync max {resync:.0} ms",
            s.agents
        ),
        (!opts.quick).then_some(p99 < 250.0 && resync < 2000.0),
    );

    // Part 3.
    check_stop()?;
    let (services, changes) = if opts.quick { (1_000, 2) } else { (10_000, 3) };
    let mut t = Table::new(&[
        "kube-proxy-style baseline (iptables mode): full restore",
        "first ms",
        "per change, median ms",
    ]);
    let mut best: Option<(f64, &'static str)> = None;
    for tool in ["iptables-nft-restore", "iptables-legacy-restore"] {
        check_stop()?;
        if which(tool).is_none() {
            println!("  {tool} is not installed");
            continue;
        }
        match run_iptables(&dir, tool, services, changes) {
            Ok(r) => {
                let over = format!("> {RESTORE_LIMIT_S} s");
                let first = r.first_ms.map_or(over.clone(), |v| format!("{v:.0}"));
                let per = if r.change_ms.is_empty() {
                    if r.first_ms.is_none() {
                        over
                    } else {
                        "-".into()
                    }
                } else {
                    format!("{:.0}", median(&r.change_ms))
                };
                t.row(vec![
                    format!(
                        "{}, {} services / {} endpoints ({} rules)",
                        r.tool,
                        count(u64::from(services)),
                        count(u64::from(services * PER_SERVICE)),
                        count(r.rules as u64)
                    ),
                    first,
                    per,
                ]);
                let ms = if r.change_ms.is_empty() {
                    r.first_ms.unwrap_or(RESTORE_LIMIT_S as f64 * 1e3)
                } else {
                    median(&r.change_ms)
                };
                if best.is_none_or(|(b, _)| ms < b) {
                    best = Some((ms, r.tool));
                }
            }
            Err(e) => println!("  {tool}: skipped: {e:#}"),
        }
    }
    print!("{}", t.render());
    if which("nft").is_none() {
        println!("  nft is not installed: no nftables figure");
    }
    if let Some((ms, tool)) = best {
        verdict(
            "kube-proxy-style baseline: iptables-restore of 10,000 services / 100,000 endpoints on every change",
            "(baseline, for comparison)",
            format!(
                "{} services: {ms:.0} ms per change ({tool}); rpclb: p99 {p99:.0} ms to every agent's ack",
                count(u64::from(services))
            ),
            None,
        );
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.exists())
    })
}

/// Removes a folder on drop.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
