//! `lb-agent`: the rpclb node daemon.
//!
//! ```text
//! lb-agent [run] --config services.yaml --interfaces IF1,IF2 [--mode auto|xdp|xdp-generic|tc] ...
//! lb-agent [run] --controller https://CONTROLLER:50551 --tls-ca ca.pem --tls-cert node.pem
//!                --tls-key node-key.pem [--node-name N] --interfaces ...
//! lb-agent [run] --controller http://CONTROLLER:50551 --insecure ...   (plaintext: tests, debugging)
//! lb-agent cleanup [--pin-path P]        (or: lb-agent --cleanup [--pin-path P])
//! ```
//!
//! Every flag also reads an environment variable (`RPCLB_*`, shown in
//! `--help`). Errors print as `lb-agent: ...` and exit with status 1. See
//! docs/operations.md.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::builder::BoolishValueParser;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use lb_agent::agent::{self, DatapathKind, ModeChoice, Options, Source, TlsFiles};
use lb_agent::datapath::BpfPrograms;
use lb_agent::datapath::attach::TcAttach;
use lb_agent::datapath::{self, AttachMode, DEFAULT_PIN_PATH, DatapathConfig};
use lb_agent::stream::StreamOptions;
use lb_common::limits;

#[derive(Parser, Debug)]
#[command(
    name = "lb-agent",
    version,
    about = "rpclb node agent: loads and attaches the eBPF data path, applies the services \
             from a config file or the controller, runs conntrack GC and serves metrics",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Detach and unpin everything under --pin-path, then exit (same as `lb-agent cleanup`).
    #[arg(long, env = "RPCLB_CLEANUP", value_parser = BoolishValueParser::new())]
    cleanup: bool,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the agent (the default when no subcommand is given).
    Run(Box<RunArgs>),
    /// Detach the programs and unpin every map and link under the pin path.
    Cleanup(CleanupArgs),
    /// Mount bpffs on PATH unless it is bpffs already, then exit. Needs CAP_SYS_ADMIN: on
    /// Kubernetes, the DaemonSet's privileged init container runs it, so that the agent's
    /// own container needs no mount rights (deploy/30-agent.yaml).
    MountBpffs(MountBpffsArgs),
}

#[derive(Args, Debug)]
struct MountBpffsArgs {
    /// Where bpffs must be mounted (the parent of the agent's --pin-path).
    #[arg(long, default_value = "/sys/fs/bpf")]
    path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TcAttachArg {
    /// TCX links where the kernel has them (6.6+), else netlink clsact filters.
    Auto,
    /// TCX links only.
    Tcx,
    /// Netlink clsact filters only.
    Netlink,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BpfProgramsArg {
    /// The full set (Linux 5.12+), else the compat set when the kernel refuses it (one WARN).
    Auto,
    /// The full set only; an error (the agent exits) if the kernel refuses it.
    Full,
    /// The compat set (no atomic fetch/cmpxchg, no coarse clock), for kernels before 5.12.
    Compat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DatapathArg {
    /// The eBPF programs, or the userspace proxy when they cannot be loaded or attached
    /// (everything of the eBPF path is detached first).
    Auto,
    /// The eBPF programs; an error if they cannot be loaded.
    Ebpf,
    /// The userspace L4/gRPC proxy only (no BPF needed).
    Userspace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Native XDP where the driver has it, else TC.
    Auto,
    /// XDP (native where supported, else the kernel's generic mode).
    Xdp,
    /// Generic (skb) XDP.
    XdpGeneric,
    /// TC clsact ingress (a TCX link, or a netlink filter: see --tc-attach).
    Tc,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Services and timeouts (YAML, see docs/config.md). Reloaded on change and on SIGHUP.
    #[arg(
        long,
        env = "RPCLB_CONFIG",
        value_name = "FILE",
        conflicts_with = "controller"
    )]
    config: Option<PathBuf>,
    /// Follow the controller's gRPC stream instead of a file
    /// (https://rpclb-controller.rpclb-system.svc:50551, with the --tls-* files; http://
    /// is plaintext and needs --insecure).
    #[arg(long, env = "RPCLB_CONTROLLER", value_name = "URL")]
    controller: Option<String>,
    /// This node's name in the controller's stream (default: the host name). The client
    /// certificate must name the same node (SAN URI rpclb://node/<name>).
    #[arg(long, env = "RPCLB_NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// This node's addresses where node ports are balanced, IPv4 and IPv6, comma-separated
    /// (default: every IPv4 address of the node's interfaces but loopback and every global or
    /// unique-local IPv6 one that is not tentative, read at each state change, as kube-proxy's
    /// default `--nodeport-addresses`). An IPv4 service's node port goes on the IPv4 ones,
    /// an IPv6 service's on the IPv6 ones.
    #[arg(
        long,
        env = "RPCLB_NODE_ADDRESSES",
        value_delimiter = ',',
        value_name = "IP1,IP2"
    )]
    node_addresses: Vec<std::net::IpAddr>,
    /// CA bundle (PEM) that signed the controller's certificate. Re-read when it changes.
    #[arg(long, env = "RPCLB_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This node's client certificate (PEM). Re-read when it changes: the agent reconnects
    /// with a new one at once (and at two thirds of a certificate's lifetime).
    #[arg(long, env = "RPCLB_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM). Re-read when it changes.
    #[arg(long, env = "RPCLB_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// How often TLS files are checked for changes: the controller stream's (--tls-*) and the
    /// gRPC-mode services' (grpc.tls).
    #[arg(long, env = "RPCLB_TLS_POLL", default_value = "5s", value_parser = lb_agent::duration::parse)]
    tls_poll: Duration,
    /// Allow a plaintext http:// controller URL: no encryption, no authentication of either
    /// side. Tests and debugging only.
    #[arg(long, env = "RPCLB_INSECURE", value_parser = BoolishValueParser::new(),
          conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    insecure: bool,
    /// Interfaces to attach to, comma-separated.
    #[arg(
        long,
        env = "RPCLB_INTERFACES",
        value_delimiter = ',',
        value_name = "IF1,IF2"
    )]
    interfaces: Vec<String>,
    /// Which data path serves the services (gRPC-mode services always use the userspace proxy).
    #[arg(long, env = "RPCLB_DATAPATH", value_enum, default_value_t = DatapathArg::Auto)]
    datapath: DatapathArg,
    /// How to attach the eBPF programs.
    #[arg(long, env = "RPCLB_MODE", value_enum, default_value_t = Mode::Auto)]
    mode: Mode,
    /// How TC attaches: TCX links or netlink filters (both outlive the agent).
    #[arg(long, env = "RPCLB_TC_ATTACH", value_enum, default_value_t = TcAttachArg::Auto)]
    tc_attach: TcAttachArg,
    /// Which eBPF program set to load: full (Linux 5.12+) or compat (older kernels).
    #[arg(long, env = "RPCLB_BPF_PROGRAMS", value_enum, default_value_t = BpfProgramsArg::Auto)]
    bpf_programs: BpfProgramsArg,
    /// bpffs directory where maps and links are pinned.
    #[arg(long, env = "RPCLB_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// Where a user-defined selector named NAME (a Service's
    /// `rpclb.io/selector`, the YAML `selector`) is loaded from: NAME.o in
    /// this directory (docs/policies.md).
    #[arg(long, env = "RPCLB_SELECTOR_DIR", default_value = lb_agent::datapath::selector::DEFAULT_SELECTOR_DIR)]
    selector_dir: PathBuf,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "RPCLB_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// Conntrack GC period (e.g. 5s, 500ms, 1m).
    #[arg(long, env = "RPCLB_GC_INTERVAL", default_value = "5s", value_parser = lb_agent::duration::parse)]
    gc_interval: Duration,
    /// How often the config file is checked for changes.
    #[arg(long, env = "RPCLB_CONFIG_POLL", default_value = "1s", value_parser = lb_agent::duration::parse)]
    config_poll: Duration,
    /// Size of the service maps.
    #[arg(long, env = "RPCLB_MAX_SERVICES", default_value_t = limits::MAX_SERVICES)]
    max_services: u32,
    /// Size of the backend maps.
    #[arg(long, env = "RPCLB_MAX_BACKENDS", default_value_t = limits::MAX_BACKENDS)]
    max_backends: u32,
    /// Size of the conntrack map (two entries per flow).
    #[arg(long, env = "RPCLB_MAX_CONNTRACK", default_value_t = limits::MAX_CONNTRACK)]
    max_conntrack: u32,
    /// Size of the IPv6 conntrack map (`CONNTRACK6`, two entries per flow).
    #[arg(long, env = "RPCLB_MAX_CONNTRACK6", default_value_t = limits::MAX_CONNTRACK6)]
    max_conntrack6: u32,
    /// Size of the client-IP affinity map.
    #[arg(long, env = "RPCLB_MAX_AFFINITY", default_value_t = limits::MAX_AFFINITY)]
    max_affinity: u32,
    /// Size of the fragment map: fragmented TCP/UDP datagrams through the node tracked at
    /// once, so that the later fragments of a VIP flow's datagram follow the first
    /// (docs/reliability.md, "IPv4 fragments").
    #[arg(long, env = "RPCLB_MAX_FRAGMENTS", default_value_t = limits::MAX_FRAGMENTS)]
    max_fragments: u32,
    /// Size of the selection-table map (Maglev and weighted tables of all services).
    #[arg(long, env = "RPCLB_MAX_SLOTS", default_value_t = limits::MAX_SLOTS)]
    max_slots: u32,
    /// Kernel memory all maps together may take, in MiB; the agent refuses to load more
    /// (docs/operations.md, "Map memory").
    #[arg(
        long,
        env = "RPCLB_MAP_MEMORY_BUDGET_MIB",
        value_name = "MIB",
        default_value_t = datapath::memory::DEFAULT_BUDGET / datapath::memory::MIB
    )]
    map_memory_budget_mib: u64,
    /// Over the budget, log a warning and load anyway.
    #[arg(
        long,
        env = "RPCLB_ALLOW_MAP_MEMORY_OVER_BUDGET",
        value_parser = BoolishValueParser::new()
    )]
    allow_map_memory_over_budget: bool,
    /// Interfaces that take natively redirected XDP frames, besides physical NICs running
    /// native XDP: veths whose peer runs an XDP program (or, from Linux 5.13, has GRO on).
    /// Native XDP hands packets routed anywhere else to the kernel stack.
    #[arg(
        long,
        env = "RPCLB_XDP_REDIRECT_TO",
        value_delimiter = ',',
        value_name = "IF1,IF2"
    )]
    xdp_redirect_to: Vec<String>,
    /// Hand every packet to the kernel stack instead of bpf_fib_lookup + redirect.
    #[arg(long, env = "RPCLB_NO_FIB_REDIRECT", value_parser = BoolishValueParser::new())]
    no_fib_redirect: bool,
    /// Source ports (FIRST-LAST) for a new flow whose backend-side tuple another flow holds
    /// (one client ip:port to one backend through two VIPs); `off` drops such flows instead
    /// (docs/reliability.md, "Reverse-conntrack collisions").
    #[arg(
        long,
        env = "RPCLB_COLLISION_PORTS",
        value_name = "FIRST-LAST|off",
        default_value = "61000-61999",
        value_parser = parse_collision_ports
    )]
    collision_ports: CollisionPorts,
    /// Source ports (FIRST-LAST) of SNATed flows: front ends (node ports, external and
    /// load-balancer IPs) with externalTrafficPolicy Cluster to a backend on another node
    /// (docs/kubernetes.md), and hairpin flows (a pod reaching itself through its Service,
    /// SNATed to 169.254.42.1); must not overlap --collision-ports. `off`: no SNAT (such
    /// front ends use this node's backends when it has any; hairpin flows are dropped).
    #[arg(
        long,
        env = "RPCLB_SNAT_PORTS",
        value_name = "FIRST-LAST|off",
        default_value = "62000-65535",
        value_parser = parse_collision_ports
    )]
    snat_ports: CollisionPorts,
    /// The node address SNATed flows leave from. Default: the first IPv4 address of the
    /// first of --interfaces (no address there: SNAT off, with a warning).
    #[arg(long, env = "RPCLB_SNAT_ADDRESS", value_name = "IPV4")]
    snat_address: Option<std::net::Ipv4Addr>,
    /// The node address SNATed IPv6 flows leave from (the ports are --snat-ports). Default:
    /// the first usable global-scope IPv6 address of the first of --interfaces (none there:
    /// IPv6 SNAT off, with a warning).
    #[arg(long, env = "RPCLB_SNAT_ADDRESS6", value_name = "IPV6")]
    snat_address6: Option<std::net::Ipv6Addr>,
    /// On SIGTERM/SIGINT, detach the programs and unpin everything (default: leave the
    /// data path running).
    #[arg(long, env = "RPCLB_DETACH_ON_EXIT", value_parser = BoolishValueParser::new())]
    detach_on_exit: bool,
    /// Graceful restart of the userspace data path: listen on this unix socket for the next
    /// agent, and at start take over from the agent listening there (its service sockets and
    /// open TCP connections; docs/operations.md, "Graceful restart"). Off when unset.
    #[arg(long, env = "RPCLB_HANDOVER_SOCKET", value_name = "PATH")]
    handover_socket: Option<PathBuf>,
    /// With --handover-socket: after SIGTERM, keep serving this long for the next agent to
    /// take over before shutting down (0: shut down at once).
    #[arg(long, env = "RPCLB_HANDOVER_WAIT", default_value = "30s", value_parser = lb_agent::duration::parse)]
    handover_wait: Duration,
    /// Threads of the userspace proxy (0: one per CPU). On a small node that its clients and
    /// backends share, 1 costs less CPU per request (docs/benchmarks.md, "Userspace proxy").
    #[arg(long, env = "RPCLB_USERSPACE_THREADS", default_value_t = 0)]
    userspace_threads: usize,
    /// gRPC mode: HTTP/2 connections per backend at most. Another is opened when the open ones
    /// have no free stream (the backend's SETTINGS_MAX_CONCURRENT_STREAMS); at the bound,
    /// calls wait for a stream (docs/grpc.md, "Connection pools").
    #[arg(long, env = "RPCLB_GRPC_MAX_CONNECTIONS", default_value_t = 16)]
    grpc_max_connections: usize,
    /// gRPC mode: a backend connection without calls for this long closes (0: never).
    #[arg(long, env = "RPCLB_GRPC_IDLE_TIMEOUT", default_value = "5m", value_parser = lb_agent::duration::parse)]
    grpc_idle_timeout: Duration,
    /// gRPC mode: PING a backend connection that sent nothing for this long while calls are
    /// open (gRFC A8; 0: no PINGs).
    #[arg(long, env = "RPCLB_GRPC_KEEPALIVE_INTERVAL", default_value = "20s", value_parser = lb_agent::duration::parse)]
    grpc_keepalive_interval: Duration,
    /// gRPC mode: a PING unanswered for this long closes the connection, failing its calls.
    #[arg(long, env = "RPCLB_GRPC_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = lb_agent::duration::parse)]
    grpc_keepalive_timeout: Duration,
    /// gRPC mode: transparent retries per call of calls a backend did not process
    /// (REFUSED_STREAM, above a GOAWAY's last stream; gRFC A6). 0: none.
    #[arg(long, env = "RPCLB_GRPC_TRANSPARENT_RETRIES", default_value_t = 3)]
    grpc_transparent_retries: u32,
    /// gRPC mode: on agent shutdown, calls in flight get this long to finish after the
    /// clients' GOAWAY (on a service's removal, at most 5 s of it).
    #[arg(long, env = "RPCLB_GRPC_DRAIN_TIMEOUT", default_value = "20s", value_parser = lb_agent::duration::parse)]
    grpc_drain_timeout: Duration,
}

/// `--collision-ports`: a range, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CollisionPorts(Option<datapath::PortRange>);

fn parse_collision_ports(s: &str) -> Result<CollisionPorts, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(CollisionPorts(None));
    }
    s.parse().map(|r| CollisionPorts(Some(r)))
}

#[derive(Args, Debug)]
struct CleanupArgs {
    /// bpffs directory where maps and links are pinned.
    #[arg(long, env = "RPCLB_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The kernel's host name (what Kubernetes uses as the node name by default).
fn hostname() -> anyhow::Result<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(h.trim().to_string())
}

fn mount_bpffs(path: &Path) -> anyhow::Result<()> {
    match datapath::pin::mount_bpffs(path)
        .with_context(|| format!("mounting bpffs on {}", path.display()))?
    {
        datapath::pin::Mounted::Already => println!("{} is bpffs already", path.display()),
        datapath::pin::Mounted::New => println!("mounted bpffs on {}", path.display()),
    }
    Ok(())
}

fn cleanup(pin: &Path) -> anyhow::Result<()> {
    // VIP routes a userspace data path left behind (a killed agent).
    match lb_agent::userspace::remove_stale_routes() {
        Ok(vips) => {
            for v in vips {
                println!("removed the userspace proxy's local route to {v}");
            }
        }
        Err(e) => eprintln!("lb-agent: cannot check for userspace proxy routes: {e}"),
    }
    if !pin.exists() {
        println!("nothing pinned under {}", pin.display());
        return Ok(());
    }
    let removed = datapath::cleanup(pin).map_err(|e| anyhow!(e))?;
    for p in &removed {
        println!("removed {}", p.display());
    }
    println!(
        "detached and unpinned {} objects under {}",
        removed.len(),
        pin.display()
    );
    Ok(())
}

/// `https://` means mutual TLS with the three files, or fail; `http://` is
/// plaintext, allowed only with `--insecure` (and said loudly).
fn controller_tls(
    url: &str,
    ca: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    insecure: bool,
) -> anyhow::Result<Option<lb_api::tls::TlsPaths>> {
    use lb_api::tls::client::{ControllerUrl, Scheme};
    let u = ControllerUrl::parse(url)?;
    match (u.scheme, insecure, ca, cert, key) {
        (Scheme::Tls, false, Some(ca), Some(cert), Some(key)) => Ok(Some(lb_api::tls::TlsPaths {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        })),
        (Scheme::Tls, true, ..) => Err(anyhow!(
            "--controller {url}: https:// always means TLS; --insecure is for plaintext http:// URLs"
        )),
        (Scheme::Tls, false, ..) => Err(anyhow!(
            "--controller {url}: https:// needs --tls-ca, --tls-cert and --tls-key \
             (RPCLB_TLS_CA, RPCLB_TLS_CERT, RPCLB_TLS_KEY)"
        )),
        (Scheme::Plain, false, ..) => Err(anyhow!(
            "--controller {url}: http:// is plaintext and unauthenticated; use https:// with \
             --tls-ca, --tls-cert and --tls-key, or pass --insecure to allow plaintext"
        )),
        (Scheme::Plain, true, ..) => {
            tracing::warn!(
                url,
                "--insecure: the controller stream is PLAINTEXT; neither side is authenticated \
                 and anyone on the path can read or change this node's services"
            );
            Ok(None)
        }
    }
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    // The node name: the controller stream's, and which backends are local
    // (externalTrafficPolicy: Local). Kubernetes' default is the host name.
    let node_name = match &a.node_name {
        Some(n) => Some(n.clone()),
        None => hostname().ok(),
    };
    let node = lb_agent::external::NodeInfo {
        name: node_name.clone(),
        addresses: a.node_addresses.clone(),
        snat: false,
        snat6: false,
    };
    if let (Some(s), Some(c)) = (a.snat_ports.0, a.collision_ports.0)
        && s.overlaps(&c)
    {
        anyhow::bail!("--snat-ports {s} overlaps --collision-ports {c}");
    }
    // SNAT to the node's address: the given one, else the first of --interfaces' own.
    let first_interface = a
        .interfaces
        .iter()
        .map(|i| i.trim())
        .find(|i| !i.is_empty());
    let snat_address = a.snat_ports.0.and_then(|_| {
        let found = || {
            node_address(
                first_interface,
                "IPv4",
                lb_agent::external::interface_address,
            )
        };
        let ip = a.snat_address.or_else(found);
        if ip.is_none() {
            tracing::warn!(
                "no IPv4 address on the first of --interfaces and no --snat-address: \
                 SNAT to the node's address off (Cluster front ends use this node's \
                 backends when it has any); hairpin flows still SNAT to 169.254.42.1"
            );
        }
        ip
    });
    let snat_address6 = a.snat_ports.0.and_then(|_| {
        let found = || {
            node_address(
                first_interface,
                "IPv6",
                lb_agent::external::interface_address6,
            )
        };
        let ip = a.snat_address6.or_else(found);
        if ip.is_none() {
            tracing::warn!(
                "no usable global IPv6 address on the first of --interfaces and no \
                 --snat-address6: IPv6 SNAT to the node's address off (IPv6 Cluster front \
                 ends use this node's backends when it has any)"
            );
        }
        ip
    });
    let source = match (a.config, a.controller) {
        (Some(path), None) => Source::File(path),
        (None, Some(url)) => {
            let node = match node_name {
                Some(n) => n,
                None => hostname().context("no --node-name, and the host name is unreadable")?,
            };
            let tls = controller_tls(&url, &a.tls_ca, &a.tls_cert, &a.tls_key, a.insecure)?;
            Source::Controller {
                stream: StreamOptions::new(url, node),
                tls: tls.map(|paths| TlsFiles {
                    paths,
                    poll: a.tls_poll,
                }),
            }
        }
        _ => Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "one of --config FILE (RPCLB_CONFIG) or --controller URL (RPCLB_CONTROLLER) is required",
            )
            .exit(),
    };
    let mode = match a.mode {
        Mode::Auto => ModeChoice::Auto,
        Mode::Xdp => ModeChoice::Fixed(AttachMode::Xdp),
        Mode::XdpGeneric => ModeChoice::Fixed(AttachMode::XdpGeneric),
        Mode::Tc => ModeChoice::Fixed(AttachMode::Tc),
    };
    let opts = Options {
        source,
        datapath_kind: match a.datapath {
            DatapathArg::Auto => DatapathKind::Auto,
            DatapathArg::Ebpf => DatapathKind::Ebpf,
            DatapathArg::Userspace => DatapathKind::Userspace,
        },
        interfaces: a
            .interfaces
            .into_iter()
            .map(|i| i.trim().to_string())
            .filter(|i| !i.is_empty())
            .collect(),
        mode,
        datapath: DatapathConfig {
            pin_path: a.pin_path,
            max_services: a.max_services,
            max_backends: a.max_backends,
            max_conntrack: a.max_conntrack,
            max_conntrack6: a.max_conntrack6,
            max_affinity: a.max_affinity,
            max_fragments: a.max_fragments,
            max_slots: a.max_slots,
            fib_redirect: !a.no_fib_redirect,
            xdp_redirect_to: a
                .xdp_redirect_to
                .into_iter()
                .map(|i| i.trim().to_string())
                .filter(|i| !i.is_empty())
                .collect(),
            collision_ports: a.collision_ports.0,
            snat_ports: a.snat_ports.0,
            snat_address,
            object_file: None,
            snat_address6,
            map_memory_budget: a
                .map_memory_budget_mib
                .saturating_mul(datapath::memory::MIB),
            allow_over_budget: a.allow_map_memory_over_budget,
            tc_attach: match a.tc_attach {
                TcAttachArg::Auto => TcAttach::Auto,
                TcAttachArg::Tcx => TcAttach::Tcx,
                TcAttachArg::Netlink => TcAttach::Netlink,
            },
            programs: match a.bpf_programs {
                BpfProgramsArg::Auto => BpfPrograms::Auto,
                BpfProgramsArg::Full => BpfPrograms::Full,
                BpfProgramsArg::Compat => BpfPrograms::Compat,
            },
            // At start, narrowed to the hooks the interfaces get (`attach::hooks_for`).
            program_loading: datapath::ProgramLoading::All,
        },
        metrics_addr: a.metrics_addr,
        gc_interval: a.gc_interval,
        config_poll: a.config_poll,
        detach_on_exit: a.detach_on_exit,
        handover: a.handover_socket.map(|path| lb_agent::agent::Handover {
            path,
            wait: a.handover_wait,
        }),
        userspace_threads: a.userspace_threads,
        node,
        grpc: lb_agent::userspace::GrpcOptions {
            max_connections: a.grpc_max_connections,
            idle_timeout: a.grpc_idle_timeout,
            keepalive_interval: a.grpc_keepalive_interval,
            keepalive_timeout: a.grpc_keepalive_timeout,
            transparent_retries: a.grpc_transparent_retries,
            drain_timeout: a.grpc_drain_timeout,
            // The one TLS poll: the controller stream's and the gRPC services' files.
            tls_poll: a.tls_poll,
        },
        selector_dir: a.selector_dir,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(agent::run(opts))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let res = match cli.cmd {
        Some(Cmd::Cleanup(c)) => cleanup(&c.pin_path),
        Some(Cmd::MountBpffs(m)) => mount_bpffs(&m.path),
        None if cli.cleanup => cleanup(&cli.run.pin_path),
        Some(Cmd::Run(a)) => run(*a),
        None => run(cli.run),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: {}", agent::render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// The first address of `interface` that `read` finds (`family` names it in the log).
fn node_address<T>(
    interface: Option<&str>,
    family: &str,
    read: fn(&str) -> std::io::Result<Option<T>>,
) -> Option<T> {
    let i = interface?;
    read(i)
        .inspect_err(|e| tracing::warn!("reading the {family} addresses of {i}: {e}"))
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_is_the_default_and_cleanup_has_two_spellings() {
        let c =
            Cli::try_parse_from(["lb-agent", "--config", "x.yaml", "--interfaces", "a,b"]).unwrap();
        assert!(c.cmd.is_none());
        assert_eq!(c.run.interfaces, vec!["a", "b"]);
        assert_eq!(c.run.mode, Mode::Auto);
        let c = Cli::try_parse_from(["lb-agent", "cleanup", "--pin-path", "/p"]).unwrap();
        assert!(matches!(c.cmd, Some(Cmd::Cleanup(ref a)) if a.pin_path == Path::new("/p")));
        let c = Cli::try_parse_from(["lb-agent", "--cleanup", "--pin-path", "/p"]).unwrap();
        assert!(c.cleanup);
        let c = Cli::try_parse_from(["lb-agent", "--config", "x", "--detach-on-exit"]).unwrap();
        assert!(c.run.detach_on_exit && !c.run.no_fib_redirect);
        assert_eq!(c.run.map_memory_budget_mib, 512);
        assert_eq!(
            c.run.collision_ports.0,
            Some(datapath::PortRange::DEFAULT_COLLISION)
        );
        assert!(!c.run.allow_map_memory_over_budget);
        let c = Cli::try_parse_from([
            "lb-agent",
            "--config",
            "x",
            "--map-memory-budget-mib",
            "2048",
            "--allow-map-memory-over-budget",
        ])
        .unwrap();
        assert_eq!(c.run.map_memory_budget_mib, 2048);
        assert!(c.run.allow_map_memory_over_budget);
        let p =
            |v: &str| Cli::try_parse_from(["lb-agent", "--config", "x", "--collision-ports", v]);
        let r = |first, last| Some(datapath::PortRange { first, last });
        assert_eq!(
            p("60000-60999").unwrap().run.collision_ports.0,
            r(60000, 60999)
        );
        assert_eq!(p("62000").unwrap().run.collision_ports.0, r(62000, 62000));
        assert_eq!(p("off").unwrap().run.collision_ports.0, None);
        // The default SNAT range is the rest of 61000-65535.
        let c = p("61000-61999").unwrap();
        assert_eq!(c.run.snat_ports.0, Some(datapath::PortRange::DEFAULT_SNAT));
        assert!(
            !datapath::PortRange::DEFAULT_SNAT.overlaps(&datapath::PortRange::DEFAULT_COLLISION)
        );
        assert!(
            r(62000, 62000)
                .unwrap()
                .overlaps(&datapath::PortRange::DEFAULT_SNAT)
        );
        for bad in ["0-10", "10-5", "x", "1-70000"] {
            assert!(p(bad).is_err(), "{bad}");
        }
        let c = Cli::try_parse_from([
            "lb-agent",
            "run",
            "--config",
            "x.yaml",
            "--interfaces",
            "a",
            "--gc-interval",
            "1s",
            "--mode",
            "tc",
        ])
        .unwrap();
        assert!(
            matches!(c.cmd, Some(Cmd::Run(ref a)) if a.gc_interval == Duration::from_secs(1) && a.mode == Mode::Tc)
        );
    }
}
