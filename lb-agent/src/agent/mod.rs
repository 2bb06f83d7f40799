//! The agent's run loop: load the desired state (a config file, or the
//! controller's stream), load and attach the data path, apply the state,
//! serve metrics, then follow the source, sweep conntrack, and exit cleanly
//! on a signal.
//!
//! ```text
//! startup:  config -> pin path check (owner, mode) -> bpffs check -> bind metrics -> load (adopt pins) -> attach -> apply -> ready
//!           (--controller: no config; ready once the first snapshot is applied. Until then
//!            a restarted agent's pinned state keeps serving.)
//! loop:     SIGHUP or file change -> parse -> apply (diff-only) | keep the running state on error
//!           controller update     -> apply (diff-only) -> ack
//!           every --gc-interval   -> gc::sweep -> metrics
//!           SIGTERM / SIGINT      -> stop; the data path stays attached unless --detach-on-exit
//! ```
//!
//! The data path (`Datapath`, which owns the `MapWriter`) sits behind one
//! mutex shared by the reload path, the GC task and the metrics endpoint;
//! every user takes it on a blocking thread, so a long sweep never stalls the
//! runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use lb_api::Refusal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

mod http;

use crate::config::{Config, Timeouts};
use crate::datapath::attach;
pub use crate::datapath::attach::ModeChoice;
use crate::datapath::{self, Datapath, DatapathConfig};
use crate::engines::{Engines, SharedDp, lock};
use crate::gc;
use crate::metrics::{GcSample, Metrics};
use crate::reconcile;
use crate::stream::{self, StreamOptions, StreamStatus, Update};
use crate::userspace::handover;
use lb_api::config_file::{ConfigFile, Reload};

/// Where the desired state comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A YAML file, reloaded on change and on SIGHUP.
    File(PathBuf),
    /// The controller's gRPC stream for this node; `tls` for `https://` URLs.
    Controller {
        stream: StreamOptions,
        tls: Option<TlsFiles>,
    },
}

/// The agent's TLS files for the controller stream, and how often they are checked.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub paths: lb_api::tls::TlsPaths,
    pub poll: Duration,
}

/// Everything `run` needs (the binary's flags, parsed).
#[derive(Clone, Debug)]
pub struct Options {
    pub source: Source,
    pub interfaces: Vec<String>,
    pub datapath_kind: DatapathKind,
    pub mode: ModeChoice,
    pub datapath: DatapathConfig,
    pub metrics_addr: SocketAddr,
    pub gc_interval: Duration,
    /// How often the config file is checked for changes.
    pub config_poll: Duration,
    /// On SIGTERM/SIGINT, detach the programs and unpin everything.
    pub detach_on_exit: bool,
    /// Graceful restart over a unix socket (`userspace::handover`).
    pub handover: Option<Handover>,
    /// The userspace proxy's threads; 0: one per CPU.
    pub userspace_threads: usize,
    /// This node's name and addresses (`--node-name`, `--node-addresses`).
    pub node: crate::external::NodeInfo,
    /// The gRPC mode's pools, retries and drain (`--grpc-*`).
    pub grpc: crate::userspace::GrpcOptions,
    /// Where a selector NAME is looked for (`--selector-dir`: `NAME.o`).
    pub selector_dir: PathBuf,
}

/// `--handover-socket` and `--handover-wait`.
#[derive(Clone, Debug)]
pub struct Handover {
    pub path: PathBuf,
    /// After SIGTERM, how long to wait for a successor.
    pub wait: Duration,
}

/// How long the handover waits for each record, for parked flows, and for
/// the successor's ack.
const HANDOVER_RECV: Duration = Duration::from_secs(10);
const HANDOVER_PARK: Duration = Duration::from_secs(3);

/// Takes over from an agent listening at `path`: its sockets, or `None`
/// when none runs there. Blocking.
fn take_over(path: &std::path::Path) -> std::io::Result<Option<handover::Inherited>> {
    let Some(sock) = handover::connect(path)? else {
        return Ok(None);
    };
    let inh = handover::receive(&sock, HANDOVER_RECV)?;
    handover::ack(&sock)?;
    Ok(Some(inh))
}

/// `/healthz` fails when the run loop has not ticked for this long.
const STALL: Duration = Duration::from_secs(30);

/// An error and its causes on one line, without repeating a cause that the
/// message above it already quotes (the data-path errors embed their source).
pub fn render_error(e: &anyhow::Error) -> String {
    lb_api::errors::one_line(e.chain())
}

/// Which data path to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatapathKind {
    /// The kernel programs; failing to load or attach them is an error.
    Ebpf,
    /// The userspace proxy only.
    Userspace,
    /// The kernel programs, or the userspace proxy when they cannot be
    /// loaded or attached.
    Auto,
}

/// State the HTTP handlers and the loops share.
struct Shared {
    metrics: Metrics,
    /// What the data path is and where it is attached (fixed at start).
    datapath: DatapathStatus,
    ready: AtomicBool,
    started: Instant,
    /// Milliseconds since `started` at the run loop's last tick.
    heartbeat_ms: AtomicU64,
    timeouts: Mutex<Timeouts>,
    /// The controller stream's status (unused with a config file).
    stream: Arc<StreamStatus>,
    /// Conntrack fill and evictions, from the last GC sweep (eBPF only).
    conntrack: Mutex<Option<crate::pressure::Pressure>>,
    /// The backends' health checks (for `/status`).
    health: crate::health::HealthChecker,
    /// The userspace proxy's stats (for `/grpc`).
    proxy: crate::engines::ProxyStats,
    /// The services' selectors after the last apply (for `/status`).
    selectors: crate::engines::SharedSelectors,
}

impl Shared {
    fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    fn since_beat(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn set_ready(&self, r: bool) {
        self.ready.store(r, Ordering::Relaxed);
        self.metrics.set_ready(r);
    }

    fn timeouts(&self) -> Timeouts {
        *self.timeouts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    info!(version = env!("CARGO_PKG_VERSION"), "lb-agent starting");
    if opts.interfaces.is_empty() && opts.datapath_kind != DatapathKind::Userspace {
        bail!("no interfaces: pass --interfaces IF1,IF2 (or RPCLB_INTERFACES)");
    }
    // Handlers first: a SIGHUP during startup must not kill the agent (its
    // default action), and a SIGTERM then is a clean stop once started.
    let signals = Signals::new()?;
    // 1. The config (or the TLS files): a bad one stops us before anything is touched.
    let mut client_tls = None;
    let file = match &opts.source {
        Source::File(path) => {
            // A change takes effect once two polls saw the same bytes.
            let mut file = ConfigFile::new(path, opts.config_poll);
            let cfg = match file.read(true) {
                Reload::Changed(r) => r.map_err(|e| anyhow!("{e}"))?,
                Reload::Unchanged | Reload::Settling => unreachable!("a forced read is a change"),
            };
            info!(
                config = %path.display(),
                services = cfg.state.services.len(),
                "config loaded"
            );
            Some((file, cfg))
        }
        Source::Controller { stream: s, tls } => {
            if s.node.is_empty() {
                bail!("--controller needs a node name: pass --node-name (or RPCLB_NODE_NAME)");
            }
            lb_api::tls::validate_node_name(&s.node).context("--node-name")?;
            info!(
                controller = s.url,
                node = s.node,
                "desired state from the controller"
            );
            if let Some(t) = tls {
                let node = s.node.clone();
                let r = lb_api::tls::reload::Reloader::new(t.paths.clone(), move |m| {
                    lb_api::tls::client_config(m, Some(&node))
                })
                .context("the controller stream's TLS files")?;
                let cur = r.current();
                info!(
                    identity = lb_api::tls::node_uri(&s.node),
                    cert = %t.paths.cert.display(),
                    serial = cur.leaf.serial,
                    not_after = cur.leaf.not_after_unix(),
                    "controller stream: mutual TLS; presenting this node's certificate"
                );
                client_tls = Some(r.subscribe());
                // Runs until the stream task drops its receiver.
                drop(r.spawn(t.poll, "lb-agent"));
            }
            None
        }
    };
    // 2. Map sizes the kernel would refuse are a configuration to fix, in
    //    `auto` too. A pin path that another user could write is refused
    //    outright, in auto mode too: falling back to userspace (and cleaning up
    //    the pins) would act on what that user put there. Pins only survive on
    //    bpffs.
    if opts.datapath_kind != DatapathKind::Userspace {
        datapath::memory::check_sizes(&opts.datapath)?;
        datapath::pin::check(&opts.datapath.pin_path)?;
    }
    if opts.datapath_kind == DatapathKind::Ebpf {
        attach::check_bpffs(&opts.datapath.pin_path)?;
    }
    // 3. A graceful restart: the agent running before hands over its
    //    userspace sockets (and lets go of the metrics address). Then listen
    //    for the next one.
    let mut inherited = None;
    let mut successor = None;
    if let Some(h) = &opts.handover {
        let path = h.path.clone();
        match tokio::task::spawn_blocking(move || take_over(&path))
            .await
            .context("handover task")?
        {
            Ok(Some(i)) => {
                info!(
                    listeners = i.listeners(),
                    connections = i.connections(),
                    vips = ?i.vips(),
                    "took over from the previous agent"
                );
                inherited = Some(i);
            }
            Ok(None) => info!(socket = %h.path.display(), "no previous agent to take over from"),
            Err(e) => warn!("taking over from the previous agent failed, starting afresh: {e}"),
        }
        let l = handover::listen(&h.path)
            .with_context(|| format!("--handover-socket {}", h.path.display()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || {
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            let _ = tx.blocking_send(s);
                            return;
                        }
                        Err(e) => {
                            warn!("handover socket: accept: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .context("handover thread")?;
        successor = Some(rx);
    }
    // 4. The metrics address, before the data path, so a busy port changes nothing
    //    (after a handover, the previous agent may take a moment to let it go).
    let bind_until = Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match tokio::net::TcpListener::bind(opts.metrics_addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && inherited.is_some()
                    && Instant::now() < bind_until =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => break r.with_context(|| format!("metrics address {}", opts.metrics_addr))?,
        }
    };
    // 5. Load (adopting pinned maps), attach, apply.
    let (kernel, status) = match opts.datapath_kind {
        DatapathKind::Userspace => {
            info!("datapath userspace: the userspace proxy serves every service");
            (None, DatapathStatus::userspace(None))
        }
        DatapathKind::Ebpf => {
            let (dp, attached) = load_and_attach(&opts)?;
            let st = DatapathStatus::ebpf(&dp, attached);
            (Some(dp), st)
        }
        DatapathKind::Auto => match load_and_attach(&opts) {
            Ok((dp, attached)) => {
                let st = DatapathStatus::ebpf(&dp, attached);
                (Some(dp), st)
            }
            // An interface that cannot attach in any mode, or a program set
            // asked for by name that the kernel refuses, is a configuration
            // to fix, not a reason to move the whole node to userspace.
            Err(e @ (StartError::Attach(_) | StartError::Config(_))) => return Err(e.into()),
            Err(StartError::Load(e)) => {
                let why = render_error(&anyhow!(e));
                // Nothing of the kernel path may stay behind: programs left
                // attached would catch the VIPs' packets with old maps.
                match datapath::cleanup(&opts.datapath.pin_path) {
                    Ok(removed) if !removed.is_empty() => warn!(
                        removed = removed.len(),
                        "detached and unpinned the eBPF data path before falling back"
                    ),
                    Ok(_) => {}
                    Err(c) => warn!("cleaning up after the failed eBPF data path: {c}"),
                }
                warn!(
                    "eBPF data path unavailable ({why}); falling back to the userspace data path, \
                     which serves every service"
                );
                (None, DatapathStatus::userspace(Some(why)))
            }
        },
    };
    for a in &status.interfaces {
        match &a.fallback {
            Some(why) => warn!(
                iface = a.iface,
                attach = a.how,
                "attached after a fallback: {why}"
            ),
            None => info!(iface = a.iface, attach = a.how, "attached"),
        }
    }
    let mut engines = Engines::new(kernel.map(|d| Arc::new(Mutex::new(d))));
    engines.proxy_threads = opts.userspace_threads;
    engines.node = opts.node.clone();
    // `Cluster` front ends to other nodes' backends are SNATed in the kernel.
    engines.node.snat = engines.kernel.is_some() && opts.datapath.snat();
    engines.node.snat6 = engines.kernel.is_some() && opts.datapath.snat6();
    engines.grpc = opts.grpc.clone();
    let engines = Arc::new(engines);
    if let Some(i) = inherited {
        engines.set_inherited(i);
    }
    let metrics = Metrics::with_collectors(
        engines.stats_source(),
        vec![
            engines.health.collector(),
            crate::metrics::selector_collector(engines.selectors.clone()),
        ],
    );
    metrics.set_datapath(&status);
    let attached: Vec<String> = status.interfaces.iter().map(ToString::to_string).collect();
    let shared = Arc::new(Shared {
        datapath: status,
        metrics,
        ready: AtomicBool::new(false),
        started: Instant::now(),
        heartbeat_ms: AtomicU64::new(0),
        timeouts: Mutex::new(file.as_ref().map(|f| f.1.timeouts).unwrap_or_default()),
        stream: Arc::new(StreamStatus::default()),
        conntrack: Mutex::new(None),
        health: engines.health.clone(),
        proxy: engines.proxy_stats(),
        selectors: engines.selectors.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(listener, shared.clone(), stop_rx.clone()));
    info!(addr = %opts.metrics_addr, "serving /metrics, /healthz, /readyz, /status, /grpc");

    let (source, current) = match file {
        Some((file, cfg)) => {
            let cfg = resolve_locality(cfg, engines.node.name.as_deref());
            let refused = engines
                .apply(&cfg.state, &cfg.timeouts)
                .await
                .context("applying the config")?;
            for r in &refused {
                warn!("service refused: {r}");
            }
            shared.metrics.set_refused(&refused);
            let backends: usize = cfg.state.services.iter().map(|s| s.backends.len()).sum();
            info!(
                services = cfg.state.services.len(),
                backends,
                datapath = engines.mode(),
                interfaces = ?attached,
                "ready"
            );
            shared.set_ready(true);
            (LoopSource::File(file), Some(cfg))
        }
        None => {
            let Source::Controller { stream: mut so, .. } = opts.source.clone() else {
                unreachable!("no file means a controller source")
            };
            so.tls = client_tls.take();
            info!(interfaces = ?attached, "attached; waiting for the controller's first snapshot");
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let task = tokio::spawn(stream::follow(
                so,
                tx,
                shared.stream.clone(),
                stop_rx.clone(),
            ));
            (LoopSource::Controller { updates: rx, task }, None)
        }
    };

    let gc_task = engines.kernel.clone().map(|dp| {
        tokio::spawn(gc_loop(
            dp,
            shared.clone(),
            opts.gc_interval,
            stop_rx.clone(),
        ))
    });

    let mut lp = Loop {
        source,
        current,
        engines: engines.clone(),
        shared: shared.clone(),
        successor,
        handed_to: None,
        handover_wait: opts.handover.as_ref().map_or(Duration::ZERO, |h| h.wait),
    };
    let why = lp.run(signals, opts.config_poll).await;

    // Shutdown.
    info!("{why}: shutting down");
    shared.set_ready(false);
    let _ = stop_tx.send(true);
    if let Some(t) = gc_task {
        let _ = t.await;
    }
    if let LoopSource::Controller { task, .. } = lp.source {
        let _ = task.await;
    }
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => warn!("metrics server: {e}"),
        Err(_) => warn!("metrics server did not stop within 5 s"),
        _ => {}
    }
    let handed = lp.handed_to.is_some();
    if let Some(sock) = lp.handed_to.take() {
        let e2 = engines.clone();
        let t = Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            let (items, vips) = e2.hand_over(HANDOVER_PARK);
            let conns = items
                .iter()
                .filter(|h| matches!(h, handover::Handed::Conn { .. }))
                .count();
            let r = handover::send_all(&sock, &items, &vips, HANDOVER_RECV);
            (items.len() - conns, conns, vips.len(), r)
        })
        .await;
        match r {
            Ok((listeners, connections, vips, Ok(acked))) => info!(
                listeners,
                connections,
                vips,
                acked,
                took = ?t.elapsed(),
                "handed the userspace data path over to the new agent"
            ),
            Ok((.., Err(e))) => error!("handing over to the new agent: {e}"),
            Err(e) => error!("handover task: {e}"),
        }
    }
    let e2 = engines.clone();
    match tokio::task::spawn_blocking(move || e2.shutdown_proxy()).await {
        Ok(Err(e)) => warn!("stopping the userspace proxy: {}", render_error(&e)),
        Err(e) => warn!("stopping the userspace proxy: {e}"),
        Ok(Ok(())) => {}
    }
    if engines.kernel.is_none() {
        if handed {
            info!("exiting; the new agent serves the userspace data path");
        } else {
            info!("exiting; the userspace data path stops with the agent");
        }
        return Ok(());
    }
    let pin = opts.datapath.pin_path.clone();
    if opts.detach_on_exit {
        let removed = datapath::cleanup(&pin).map_err(|e| anyhow!(e))?;
        info!(
            pin_path = %pin.display(),
            removed = removed.len(),
            "detached the programs and unpinned the maps (--detach-on-exit)"
        );
    } else {
        info!(
            pin_path = %pin.display(),
            "exiting; the data path stays attached and pinned (traffic keeps flowing). \
             `lb-agent cleanup` removes it"
        );
    }
    Ok(())
}

/// What the agent runs: the kernel path and where it is attached, or the
/// userspace proxy and why. Shown at start, in `rpclb_datapath_info`, on
/// `/readyz` and on `/status` (`lbctl status`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct DatapathStatus {
    /// `ebpf` or `userspace`.
    pub datapath: &'static str,
    /// The eBPF program set, `full` or `compat` (`--bpf-programs`); none
    /// for userspace.
    pub programs: Option<&'static str>,
    /// Why the program set is not the one tried first (the kernel refused
    /// the full set).
    pub programs_fallback: Option<String>,
    pub interfaces: Vec<AttachedStatus>,
    /// Why the kernel path is not running, when it fell back.
    pub fallback: Option<String>,
}

/// One interface in [`DatapathStatus`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttachedStatus {
    pub iface: String,
    /// `xdp`, `xdp-generic`, `tcx` or `tc-netlink`.
    pub how: &'static str,
    pub reused: bool,
    pub fallback: Option<String>,
}

impl std::fmt::Display for AttachedStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.iface, self.how)
    }
}

impl DatapathStatus {
    fn ebpf(dp: &Datapath, attached: Vec<attach::Attached>) -> Self {
        DatapathStatus {
            datapath: "ebpf",
            programs: Some(dp.programs().as_str()),
            programs_fallback: dp.programs_fallback().map(str::to_string),
            interfaces: attached
                .into_iter()
                .map(|a| AttachedStatus {
                    iface: a.iface,
                    how: a.how,
                    reused: a.reused,
                    fallback: a.fallback,
                })
                .collect(),
            fallback: None,
        }
    }

    fn userspace(fallback: Option<String>) -> Self {
        DatapathStatus {
            datapath: "userspace",
            programs: None,
            programs_fallback: None,
            interfaces: Vec::new(),
            fallback,
        }
    }

    /// Lines for `/readyz`.
    fn describe(&self) -> String {
        let mut s = format!("datapath {}", self.datapath);
        if let Some(why) = &self.fallback {
            s.push_str(&format!(" (fallback: {why})"));
        }
        s.push('\n');
        if let Some(set) = self.programs {
            s.push_str(&format!("  programs {set}"));
            if let Some(why) = &self.programs_fallback {
                s.push_str(&format!(" ({why})"));
            }
            s.push('\n');
        }
        for a in &self.interfaces {
            s.push_str(&format!("  {} {}", a.iface, a.how));
            if let Some(why) = &a.fallback {
                s.push_str(&format!(" ({why})"));
            }
            s.push('\n');
        }
        s
    }
}

/// Why the kernel path did not start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    /// The programs or maps could not be loaded (no BPF, the verifier, the
    /// memory budget, a bad pin path): `auto` falls back to userspace.
    #[error(transparent)]
    Load(datapath::DatapathError),
    /// An interface could not be attached in any mode: an error either way.
    #[error(transparent)]
    Attach(datapath::DatapathError),
    /// The program set named by `--bpf-programs full|compat` was refused:
    /// an error either way (`auto` picks the set itself).
    #[error(transparent)]
    Config(datapath::DatapathError),
}

/// Loads the programs (adopting pinned maps) and attaches them.
fn load_and_attach(opts: &Options) -> Result<(Datapath, Vec<attach::Attached>), StartError> {
    attach::check_bpffs(&opts.datapath.pin_path).map_err(StartError::Load)?;
    let mut cfg = opts.datapath.clone();
    if cfg.program_loading == datapath::ProgramLoading::All {
        // Only what the interfaces will run: each program costs the verifier ~1 s.
        cfg.program_loading = attach::hooks_for(opts.mode, &opts.interfaces, &cfg.pin_path);
    }
    let mut dp = Datapath::load(&cfg).map_err(|e| match e {
        datapath::DatapathError::Refused { .. }
            if opts.datapath.programs != datapath::BpfPrograms::Auto =>
        {
            StartError::Config(e)
        }
        e => StartError::Load(e),
    })?;
    // Who may name what: a path only from the agent's own config file.
    dp.writer()
        .set_selector_source(datapath::selector::SelectorSource {
            dir: opts.selector_dir.clone(),
            paths: matches!(opts.source, Source::File(_)),
        });
    let attached =
        attach::attach_all(&mut dp, &opts.interfaces, opts.mode).map_err(StartError::Attach)?;
    dp.sync_xdp_ifaces().map_err(StartError::Attach)?;
    Ok((dp, attached))
}

/// The signals the run loop handles.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }
}

/// Where the run loop gets new states.
enum LoopSource {
    File(ConfigFile),
    Controller {
        updates: tokio::sync::mpsc::Receiver<Update>,
        task: tokio::task::JoinHandle<()>,
    },
}

/// The run loop proper: reloads, controller updates and signals.
struct Loop {
    source: LoopSource,
    /// The config that is applied (`None` until the controller's first snapshot).
    current: Option<Config>,
    engines: Arc<Engines>,
    shared: Arc<Shared>,
    /// A new agent connecting to the handover socket.
    successor: Option<tokio::sync::mpsc::Receiver<socket2::Socket>>,
    /// The one that connected: it takes over at shutdown.
    handed_to: Option<socket2::Socket>,
    /// After SIGTERM, how long to wait for a successor.
    handover_wait: Duration,
}

/// The next agent to connect to the handover socket; never without one.
async fn next_successor(
    rx: &mut Option<tokio::sync::mpsc::Receiver<socket2::Socket>>,
) -> socket2::Socket {
    match rx {
        Some(rx) => match rx.recv().await {
            Some(s) => s,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Resolves at `at`; never when `None`.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Loop {
    /// Runs until a stop signal; returns its name.
    async fn run(&mut self, mut sig: Signals, poll: Duration) -> &'static str {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // After a SIGTERM, with a handover socket: serve on until a new
        // agent takes over, or until this deadline.
        let mut term_deadline = None;
        loop {
            self.shared.beat();
            let event = tokio::select! {
                _ = sig.term.recv() => {
                    if term_deadline.is_none()
                        && self.successor.is_some()
                        && !self.handover_wait.is_zero()
                    {
                        info!(wait = ?self.handover_wait,
                            "SIGTERM: serving on until a new agent takes over (a second SIGTERM stops now)");
                        term_deadline = Some(tokio::time::Instant::now() + self.handover_wait);
                        continue;
                    }
                    return "SIGTERM";
                }
                () = until(term_deadline) => return "SIGTERM, and no new agent came",
                s = next_successor(&mut self.successor) => {
                    self.handed_to = Some(s);
                    return "a new agent takes over";
                }
                _ = sig.int.recv() => return "SIGINT",
                _ = sig.hup.recv() => Event::Reload("SIGHUP"),
                _ = tick.tick() => Event::Tick,
                () = self.engines.health.changed() => Event::Health,
                u = next_update(&mut self.source) => match u {
                    Some(u) => Event::Update(u),
                    None => return "controller stream task ended",
                },
            };
            match event {
                Event::Tick => {
                    if matches!(self.source, LoopSource::File(_)) {
                        self.reload("file changed", false).await;
                    }
                }
                Event::Reload(why) => {
                    if matches!(self.source, LoopSource::File(_)) {
                        self.reload(why, true).await;
                    } else {
                        info!("{why}: nothing to reload (the state comes from the controller)");
                    }
                }
                Event::Health => self.health_changed().await,
                Event::Update(u) => {
                    let why = if u.snapshot {
                        format!("applied controller snapshot v{}", u.version)
                    } else {
                        format!("applied controller delta v{}", u.version)
                    };
                    let cfg = Config {
                        state: u.state.state,
                        timeouts: u.state.timeouts,
                        // The controller resolved the locality policies.
                        nodes: Default::default(),
                    };
                    let mut r = self.apply_config(cfg, &why).await;
                    if let Ok(refused) = &mut r {
                        // The stream's own refusals (services it could not
                        // take) and the data paths', in one list.
                        for x in &u.refused {
                            warn!(
                                "{why}: service refused, its previous version (if any) is kept: {x}"
                            );
                        }
                        refused.splice(0..0, u.refused);
                        self.shared.metrics.set_refused(refused);
                    }
                    if r.is_ok() && !self.shared.ready.load(Ordering::Relaxed) {
                        info!(version = u.version, "ready");
                        self.shared.set_ready(true);
                    }
                    let _ = u.done.send(r);
                }
            }
        }
    }

    /// Re-reads the config file and applies it when it changed (or when
    /// `force`). On any error the running state stays as it is, and the
    /// error is logged and counted.
    async fn reload(&mut self, why: &str, force: bool) {
        let LoopSource::File(file) = &mut self.source else {
            return;
        };
        let cfg = match file.read(force) {
            Reload::Unchanged => return,
            Reload::Settling => {
                debug!("config file changed; waiting for it to settle");
                return;
            }
            Reload::Changed(Ok(c)) => c,
            Reload::Changed(Err(e)) => {
                self.shared.metrics.config_reload_errors.inc();
                error!("config reload ({why}) failed, keeping the running state: {e}");
                return;
            }
        };
        if let Ok(refused) = self
            .apply_config(cfg, &format!("config reloaded ({why})"))
            .await
        {
            self.shared.metrics.set_refused(&refused);
        }
    }

    /// Applies the current state again with the backends' new health (the
    /// map writes are diff-only: the weights that changed).
    async fn health_changed(&mut self) {
        let Some(cfg) = &self.current else { return };
        let t = Instant::now();
        match self.engines.apply(&cfg.state, &cfg.timeouts).await {
            Ok(refused) => {
                for s in self.engines.health.panics(&cfg.state) {
                    warn!(
                        service = s,
                        "no healthy backend: panic mode, every backend takes traffic"
                    );
                }
                debug!(took = ?t.elapsed(), "applied a health change");
                self.shared.metrics.set_refused(&refused);
            }
            Err(e) => error!("applying a health change failed: {}", render_error(&e)),
        }
    }

    /// Applies a new desired state (only what changed) and its timeouts.
    /// Returns the services that were refused (each alone; the rest applied).
    async fn apply_config(&mut self, cfg: Config, why: &str) -> Result<Vec<Refusal>, String> {
        let cfg = resolve_locality(cfg, self.engines.node.name.as_deref());
        let empty = Config::default();
        let before = self.current.as_ref().unwrap_or(&empty);
        let diff = reconcile::diff(&before.state, &cfg.state);
        let timeouts_changed = cfg.timeouts != before.timeouts;
        let t = Instant::now();
        let refused = match self.engines.apply(&cfg.state, &cfg.timeouts).await {
            Ok(r) => r,
            Err(e) => {
                // Only a removal's map error ends an apply early; what was
                // written before is consistent. The next change (or SIGHUP)
                // applies the whole state again.
                self.shared.metrics.config_reload_errors.inc();
                let e = render_error(&e);
                error!("{why}: failed to apply, the data path may be partly updated: {e}");
                return Err(e);
            }
        };
        if timeouts_changed || self.current.is_none() {
            info!(timeouts = ?cfg.timeouts, "conntrack timeouts");
            *self
                .shared
                .timeouts
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = cfg.timeouts;
        }
        self.current = Some(cfg);
        self.shared.metrics.config_reloads.inc();
        info!(took = ?t.elapsed(), "{why}: {diff}");
        for r in &refused {
            warn!("{why}: service refused, its previous version (if any) is kept: {r}");
        }
        Ok(refused)
    }
}

/// A file's locality policies, resolved for this node (`--node-name` and
/// the file's `nodes:`), as the controller resolves them for its agents.
fn resolve_locality(cfg: Config, node: Option<&str>) -> Config {
    if !lb_api::locality::any(&cfg.state) {
        return cfg;
    }
    Config {
        state: lb_api::locality::resolve(&cfg.state, node, &cfg.nodes),
        ..cfg
    }
}

enum Event {
    Tick,
    /// A backend's health changed: apply the current state again.
    Health,
    Reload(&'static str),
    Update(Update),
}

/// The next controller update; never resolves for a file source.
async fn next_update(source: &mut LoopSource) -> Option<Update> {
    match source {
        LoopSource::Controller { updates, .. } => updates.recv().await,
        LoopSource::File(_) => std::future::pending().await,
    }
}

/// Periodic conntrack GC with the current timeouts.
async fn gc_loop(
    dp: SharedDp,
    shared: Arc<Shared>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pressure = crate::pressure::Pressure::default();
    // The first recount corrects whatever the counters held when this
    // process started (an older agent's drift): not evictions of ours.
    let mut first = true;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        // A selector's NAME.o put in --selector-dir after its service named it.
        let dp3 = dp.clone();
        let retried = tokio::task::spawn_blocking(move || {
            let mut g = lock(&dp3);
            let w = g.writer();
            match w.retry_missing_selectors() {
                Ok(true) => Some(w.selector_status()),
                Ok(false) => None,
                Err(e) => {
                    warn!("loading a selector whose file appeared: {e}");
                    Some(w.selector_status())
                }
            }
        })
        .await;
        if let Ok(Some(sel)) = retried {
            *shared.selectors.lock().unwrap_or_else(|e| e.into_inner()) = sel;
        }
        let t = shared.timeouts();
        let dp2 = dp.clone();
        // The scan and deletes run on a dup of the conntrack fd without the
        // writer lock; see `gc::tick`.
        let res = tokio::task::spawn_blocking(move || {
            let tick = gc::tick(&dp2, &t)?;
            match tick.v6 {
                Ok(r6) => tracing::debug!(?r6, "IPv6 conntrack sweep"),
                Err(e) => warn!("IPv6 conntrack sweep: {e}"),
            }
            Ok::<_, crate::datapath::DatapathError>((tick.report, tick.capacity))
        })
        .await;
        match res {
            Ok(Ok((mut r, capacity))) => {
                if std::mem::take(&mut first) && r.evicted > 0 {
                    info!(
                        corrected = r.evicted,
                        "active-flow counters recounted from conntrack at start"
                    );
                    r.evicted = 0;
                }
                match pressure.observe(r.evicted, r.entries_after, capacity.into()) {
                    Some(crate::pressure::Event::Started {
                        evicted_total,
                        evicted,
                    }) => {
                        shared.metrics.conntrack_pressure_episodes.inc();
                        warn!(
                            evicted,
                            evicted_total,
                            entries = r.entries_after,
                            capacity,
                            "conntrack map full: open flows evicted (the least recently used \
                             go first; TCP flows come back on their next packet where the \
                             algorithm re-picks the same backend). Raise --max-conntrack \
                             (docs/reliability.md, \"Full conntrack map\"); one warning per \
                             episode"
                        );
                    }
                    Some(crate::pressure::Event::Ended {
                        evicted_total,
                        episode_evicted,
                    }) => info!(
                        episode_evicted,
                        evicted_total,
                        entries = r.entries_after,
                        capacity,
                        "conntrack pressure over: no evictions, map below {}%",
                        crate::pressure::Pressure::END_BELOW_PCT
                    ),
                    None => {}
                }
                shared.metrics.conntrack_capacity.set(capacity.into());
                shared
                    .metrics
                    .conntrack_pressure
                    .set(pressure.evicting.into());
                *shared.conntrack.lock().unwrap_or_else(|e| e.into_inner()) = Some(pressure);
                if r.expired > 0 || r.orphans > 0 || r.evicted > 0 {
                    info!(
                        expired = r.expired,
                        evicted = r.evicted,
                        orphans = r.orphans,
                        flows = r.flows,
                        took = ?r.duration,
                        "conntrack GC"
                    );
                } else {
                    debug!(flows = r.flows, took = ?r.duration, "conntrack GC");
                }
                shared.metrics.record_gc(&GcSample {
                    duration: r.duration,
                    entries: Some(r.entries_after),
                    flows: Some(r.flows.saturating_sub(r.expired)),
                    expired: r
                        .expired_by_state
                        .iter()
                        .into_iter()
                        .map(|(s, n)| (s.to_string(), n))
                        // Open flows the conntrack LRU evicted, credited like expiries.
                        .chain(std::iter::once(("evicted".to_string(), r.evicted)))
                        .collect(),
                    orphans: r.orphans,
                });
            }
            Ok(Err(e)) => {
                shared.metrics.gc_errors.inc();
                warn!("conntrack GC failed: {}", render_error(&e.into()));
            }
            Err(e) => {
                shared.metrics.gc_errors.inc();
                warn!("conntrack GC task: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn render_error_skips_causes_already_quoted() {
        let e = anyhow::Error::new(Outer(std::io::Error::other("inner")));
        assert_eq!(render_error(&e), "outer: inner");
        let e = e.context("loading");
        assert_eq!(render_error(&e), "loading: outer: inner");
    }
}
