//! The orchestrator: lab, pods, agent, names, client, live event, report, teardown.
//!
//! The client runs three phases: (1) calls to B and C through their L4 VIPs, a new connection
//! per call; the live event marks one B pod terminating; (2) the same again while long-lived
//! calls opened before the event go on; (3) one connection per VIP carrying many calls, to B's
//! L4 VIP and to `rpc-service-b-grpc`, a gRPC-mode service with B's pods that lb-agent's
//! userspace proxy balances per call. Last, the GOAWAY phase: C's pods close every connection
//! after `GOAWAY_AGE` (MAX_CONNECTION_AGE), and one connection to `rpc-service-c-grpc` (C's
//! pods in the gRPC mode) carries calls spread over several ages: none may fail. The report has a table and checks per part, the
//! agent's per-call counters from its /metrics, and lbctl's view of the kernel's services.
//!
//! Everything runs inside namespaces that the lab creates (DESIGN.md, network safety): the
//! root namespace's links, addresses and routes are never touched, no namespace has a route
//! out, and every loop is bounded by a count and by `--timeout`.

use crate::procs::{self, Agent, AgentOpts, ControllerOpts, Guarded, interrupted};
use crate::report::{self, Checks, OneChannelReport, PodInfo, ProxyCounts, ServiceReport};
use crate::server::Pods;
use crate::wire::{Call, Event, Inflight, OneChannel, Phase};
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use lb_api::Algorithm;
use rpclb_tests::lab::{self, Lab};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const NAMESPACE: &str = "my-rpc";
const METRICS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9100));
/// The controller's gRPC and metrics addresses, on the node namespace's loopback.
const CONTROLLER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 50551));
const CONTROLLER_METRICS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9101));
const NODE_NAME: &str = "rpclb-demo-node";
/// C's pods close every connection at this age (a gRPC server's MAX_CONNECTION_AGE: a graceful
/// GOAWAY), and the GOAWAY phase spreads its calls over `GOAWAY_SPAN`: several ages.
const GOAWAY_AGE: Duration = Duration::from_secs(1);
const GOAWAY_SPAN: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Xdp,
    Tc,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Xdp => "xdp",
            Mode::Tc => "tc",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct DemoOpts {
    /// How the load balancer picks a pod for each new connection.
    #[arg(long, default_value = "random", value_parser = parse_algorithm,
          value_name = "random|round-robin|maglev|source-hash|least-conn")]
    pub algorithm: Algorithm,
    /// Calls to each service (B and C), half before and half after the live event
    /// [default: 1000; 60 with --quick]. The third phase (one connection per VIP) makes 300
    /// calls over each connection (60 with --quick; at least 30 per active B pod).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=100_000))]
    pub calls: Option<u32>,
    /// Pods per service (B and C).
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(2..=50))]
    pub pods: u32,
    /// Where the agent attaches its programs on the node.
    #[arg(long, value_enum, default_value_t = Mode::Xdp)]
    pub mode: Mode,
    /// Leave the lab up after the run for exploring with lbctl; Ctrl-C tears it down.
    #[arg(long)]
    pub keep: bool,
    /// Short form (60 calls per service and per connection in the third phase), as the test
    /// runs it.
    #[arg(long)]
    pub quick: bool,
    /// Calls in flight at once (in every phase; in the third, over the one connection).
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,
    /// Give up (and tear down) after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// Folder with the lb-agent, lb-controller and lbctl binaries [default: this binary's folder].
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// The same scenario over IPv6: the pods get ULA addresses (fd00:10:244:<net>::2) beside
    /// their IPv4 ones, and the services IPv6 VIPs (fd00:10:96::11 to ::14).
    #[arg(long)]
    pub ipv6: bool,
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    s.parse()
        .map_err(|e: lb_api::UnknownAlgorithm| e.to_string())
}

/// What went wrong, for the exit code.
pub enum Outcome {
    Passed,
    ChecksFailed,
}

/// Progress lines with the time since the start.
struct Progress(Instant);

impl Progress {
    fn say(&self, msg: impl AsRef<str>) {
        println!("[{:5.1}s] {}", self.0.elapsed().as_secs_f64(), msg.as_ref());
        let _ = std::io::stdout().flush();
    }
}

/// One service of the demo: B and C (L4, balanced by the kernel per connection), and B's
/// gRPC-mode twin (balanced by lb-agent's userspace proxy per call).
struct Svc {
    key: &'static str,
    name: String,
    host: String,
    vip: IpAddr,
    port: u16,
    pods: Vec<PodInfo>,
    /// `grpc: {}` in the config: the gRPC (L7) mode.
    grpc: bool,
}

impl Svc {
    fn config_name(&self) -> String {
        format!("{NAMESPACE}/{}:grpc", self.name)
    }

    /// A gRPC-mode service in front of this service's pods (same backends and port, so
    /// `config_yaml` writes the same backend list and the same terminating marking).
    fn grpc_twin(&self, key: &'static str, vip: impl Into<IpAddr>) -> Svc {
        let name = format!("{}-grpc", self.name);
        Svc {
            key,
            host: format!("{name}.{NAMESPACE}.svc.cluster.local"),
            name,
            vip: vip.into(),
            port: self.port,
            pods: self.pods.clone(),
            grpc: true,
        }
    }

    /// "host -> vip:port (config name)".
    fn describe(&self) -> String {
        format!(
            "{} -> {} ({})",
            self.host,
            SocketAddr::new(self.vip, self.port),
            self.config_name()
        )
    }

    /// A pod's `ip:port` as lb-agent's /metrics labels it (`[ip]:port` for IPv6).
    fn backend_label(&self, pod_ip: &str) -> String {
        match pod_ip.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, self.port).to_string(),
            Err(_) => format!("{pod_ip}:{}", self.port),
        }
    }
}

/// The config file the controller reads, rewritten for the live event.
fn config_yaml(svcs: &[Svc], algo: Algorithm, terminating: Option<&str>) -> String {
    let mut y = String::from(
        "# Generated by rpclb-demo; lb-controller reloads it on change and streams it to lb-agent.\nservices:\n",
    );
    for s in svcs {
        let _ = writeln!(y, "  - name: {}", s.config_name());
        let _ = writeln!(y, "    vip: {}", s.vip);
        let _ = writeln!(y, "    port: {}", s.port);
        let _ = writeln!(y, "    protocol: tcp");
        if s.grpc {
            // The agent's proxy balances each call (least outstanding, P2C); no algorithm.
            let _ = writeln!(y, "    grpc: {{}}");
        } else {
            let _ = writeln!(y, "    algorithm: {algo}");
        }
        let _ = writeln!(y, "    backends:");
        for p in &s.pods {
            let state = if terminating == Some(p.name.as_str()) {
                "terminating"
            } else {
                "active"
            };
            let _ = writeln!(
                y,
                "      - {{ ip: {}, port: {}, weight: 1, state: {state} }}  # {}",
                p.ip, s.port, p.name
            );
        }
    }
    y
}

/// Write atomically (rename), so the agent never reads half a file.
fn write_config(path: &Path, text: &str) -> Result<()> {
    lb_agent::config::parse(text, &path.display().to_string())
        .map_err(|e| anyhow!("generated config is invalid: {e}"))?;
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

/// A folder removed on drop: `/etc/netns/<ns>` (hosts for the client pod) or the run folder.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("teardown: remove {}: {e}", self.0.display());
        }
    }
}

/// Per-namespace files for the client pod. `ip netns exec` bind-mounts each over /etc/<file>:
/// the cluster names in `hosts`, lookups from files only, and no reachable DNS server, so no
/// lookup ever leaves the namespace.
fn client_etc(ns: &str, svcs: &[Svc]) -> Result<DirGuard> {
    let dir = PathBuf::from("/etc/netns").join(ns);
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let guard = DirGuard(dir.clone());
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for s in svcs {
        let short = s.host.split('.').next().unwrap_or(&s.host);
        let _ = writeln!(hosts, "{} {} {short}", s.vip, s.host);
    }
    std::fs::write(dir.join("hosts"), hosts)?;
    if Path::new("/etc/nsswitch.conf").exists() {
        std::fs::write(dir.join("nsswitch.conf"), "hosts: files\n")?;
    }
    if Path::new("/etc/resolv.conf").exists() {
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
    }
    Ok(guard)
}

/// `/etc/netns/rpclb-<pid>-*` and `/tmp/rpclb-demo-<pid>` left by demos that were killed
/// (SIGKILL skips every guard; the lab sweeps its own namespaces and mounts).
fn sweep_leftovers() {
    let entries = ["/etc/netns", "/tmp"]
        .into_iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("rpclb-demo-")
            .or_else(|| name.strip_prefix("rpclb-"))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if e.path().starts_with("/tmp") && !name.starts_with("rpclb-demo-") {
            continue;
        }
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn find_bin(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not found; build it with `cargo build --release -p lb-agent` (or use \
             `cargo xtask demo`, which does), or point --bin-dir at it",
            p.display()
        );
    }
    Ok(p)
}

/// Does `lbctl backends SERVICE -o json` show `ip` as terminating? The check reads any JSON
/// shape: an object that mentions the IP and, in some field, the state.
fn shows_terminating(json: &str, ip: &str) -> bool {
    fn walk(v: &serde_json::Value, ip: &str) -> bool {
        match v {
            serde_json::Value::Array(a) => a.iter().any(|x| walk(x, ip)),
            serde_json::Value::Object(o) => {
                let strings: Vec<&str> = o.values().filter_map(|x| x.as_str()).collect();
                let has_ip = strings
                    .iter()
                    .any(|s| *s == ip || s.starts_with(&format!("{ip}:")));
                let term = o.iter().any(|(k, x)| {
                    x.as_str()
                        .is_some_and(|s| s.eq_ignore_ascii_case("terminating"))
                        || (k == "terminating" && x.as_bool() == Some(true))
                });
                (has_ip && term) || o.values().any(|x| walk(x, ip))
            }
            _ => false,
        }
    }
    serde_json::from_str::<serde_json::Value>(json).is_ok_and(|v| walk(&v, ip))
}

/// The value of the Prometheus series `name{labels...}` (every given label must match; others
/// may be present), from the text format.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        if n != name {
            return None;
        }
        let body = rest.strip_suffix('}')?;
        let have: Vec<(&str, &str)> = body
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim(), v.trim().strip_prefix('"')?.strip_suffix('"')?))
            })
            .collect();
        labels
            .iter()
            .all(|want| have.contains(want))
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// The gRPC-mode service's call counters from lb-agent's /metrics text: calls per service
/// and per backend (`new_flows` counts calls in the gRPC mode).
fn proxy_counts(text: &str, svc: &Svc) -> Result<ProxyCounts, String> {
    let name = svc.config_name();
    let calls = sample(text, "rpclb_service_new_flows_total", &[("service", &name)])
        .ok_or_else(|| format!("no rpclb_service_new_flows_total{{service=\"{name}\"}}"))?;
    let mut per_ip = BTreeMap::new();
    for p in &svc.pods {
        let backend = svc.backend_label(&p.ip);
        let n = sample(
            text,
            "rpclb_backend_new_flows_total",
            &[("service", &name), ("backend", &backend)],
        )
        .unwrap_or(0.0);
        per_ip.insert(p.ip.clone(), n as u64);
    }
    Ok(ProxyCounts {
        calls: calls as u64,
        per_ip,
    })
}

/// The GOAWAY phase's per-backend counters (by pod IP) from lb-agent's /metrics text.
fn goaway_counts(text: &str, svc: &Svc) -> BTreeMap<String, report::GoawayBackend> {
    let name = svc.config_name();
    svc.pods
        .iter()
        .map(|p| {
            let backend = svc.backend_label(&p.ip);
            let labels = [("service", name.as_str()), ("backend", backend.as_str())];
            let get = |metric: &str| sample(text, metric, &labels).unwrap_or(0.0) as u64;
            let b = report::GoawayBackend {
                calls: get("rpclb_backend_new_flows_total"),
                goaways: get("rpclb_backend_grpc_goaways_total"),
                opened: get("rpclb_backend_grpc_connections_opened_total"),
                resent: get("rpclb_backend_grpc_transparent_retries_total"),
            };
            (p.ip.clone(), b)
        })
        .collect()
}

/// GET lb-agent's /metrics from inside the node namespace.
fn agent_metrics(lab: &Lab) -> Result<String> {
    lab.node().run(|| procs::http_get(METRICS, "/metrics"))?
}

pub fn run(o: DemoOpts) -> Result<Outcome> {
    let p = Progress(Instant::now());
    let deadline = Instant::now() + Duration::from_secs(o.timeout);
    if !lab::can_run() {
        bail!("the demo needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF) and `ip`/`sysctl`");
    }
    let bin_dir = match &o.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary has no folder")?
            .to_path_buf(),
    };
    let agent_bin = find_bin(&bin_dir, "lb-agent")?;
    let controller_bin = find_bin(&bin_dir, "lb-controller")?;
    let lbctl_bin = find_bin(&bin_dir, "lbctl")?;
    let calls = o.calls.unwrap_or(if o.quick { 60 } else { 1000 }) as usize;
    let pods = o.pods as usize;
    procs::catch_signals();
    sweep_leftovers();

    // The run folder: config and agent log.
    let run_dir = PathBuf::from(format!("/tmp/rpclb-demo-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let run_guard = DirGuard(run_dir.clone());

    p.say(format!(
        "building the lab: a node, the client pod (service A) and {} pods for services B and C",
        2 * pods
    ));
    let lab = Lab::new(2 * pods).context("building the netns lab")?;
    if o.ipv6 {
        lab.add_ipv6().context("IPv6 addresses in the lab")?;
        p.say(format!(
            "  --ipv6: ULA addresses beside the IPv4 ones (pods fd00:10:244:<net>::2, routes to {} and {} via the node)",
            rpclb_tests::lab::ipv6::POD_NET6,
            rpclb_tests::lab::ipv6::VIP_NET6
        ));
    }
    let pod_ip = |h: &rpclb_tests::lab::Host| -> String {
        if o.ipv6 {
            h.ip6().to_string()
        } else {
            h.ip().to_string()
        }
    };
    // B, C and their gRPC-mode twins: 10.96.0.11-14, or fd00:10:96::11-14 with --ipv6.
    let vip = |n: u8| -> IpAddr {
        if o.ipv6 {
            rpclb_tests::lab::ipv6::vip6(0x10 + u16::from(n - 10)).into()
        } else {
            Ipv4Addr::new(10, 96, 0, n).into()
        }
    };
    let pin_path = lab.bpffs().join("rpclb");
    let mk = |key, name: &str, vip, port, first: usize| Svc {
        key,
        name: name.into(),
        host: format!("{name}.{NAMESPACE}.svc.cluster.local"),
        vip,
        port,
        pods: (first..first + pods)
            .map(|i| PodInfo {
                name: format!("{name}-{}", i + 1 - first),
                ip: pod_ip(lab.backend(i)),
            })
            .collect(),
        grpc: false,
    };
    let b = mk("b", "rpc-service-b", vip(11), 50052, 1);
    let c = mk("c", "rpc-service-c", vip(12), 50053, 1 + pods);
    // B's pods again, behind a gRPC-mode VIP: lb-agent's proxy balances each call.
    let b_grpc = b.grpc_twin("b-grpc", vip(13));
    // C's pods (which close every connection at GOAWAY_AGE) behind a gRPC-mode VIP: the
    // GOAWAY phase.
    let c_grpc = c.grpc_twin("c-grpc", vip(14));
    let svcs = vec![b, c, b_grpc, c_grpc];
    let (l4_svcs, twin, goaway_twin) = (&svcs[..2], &svcs[2], &svcs[3]);

    // The pods' gRPC servers, each inside its own namespace.
    let mut servers = Pods::new();
    for (si, s) in l4_svcs.iter().enumerate() {
        for (pi, pod) in s.pods.iter().enumerate() {
            let host = lab.backend(1 + si * pods + pi);
            let any: IpAddr = if o.ipv6 {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            let addr = SocketAddr::new(any, s.port);
            let age = (s.key == "c").then_some(GOAWAY_AGE);
            servers.start(&host.ns, &pod.name, addr, age)?;
        }
    }
    for s in l4_svcs {
        let list: Vec<String> = s
            .pods
            .iter()
            .map(|p| format!("{} {}", p.name, p.ip))
            .collect();
        p.say(format!(
            "  {}: grpc.testing.TestService on :{} in {}{}",
            s.name,
            s.port,
            list.join(", "),
            if s.key == "c" {
                format!(
                    "; MAX_CONNECTION_AGE {} (each connection gets a graceful GOAWAY at that age)",
                    report::fmt_duration(GOAWAY_AGE)
                )
            } else {
                String::new()
            }
        ));
    }
    for (t, of) in [(twin, &svcs[0]), (goaway_twin, &svcs[1])] {
        p.say(format!(
            "  {}: the pods of {} again, in the gRPC mode (grpc: {{}}): lb-agent's userspace \
             proxy balances each call",
            t.name, of.name
        ));
    }
    check_interrupt(&p)?;

    // The controller, standalone, with a generated config; the agent follows its stream.
    let config = run_dir.join("services.yaml");
    write_config(&config, &config_yaml(&svcs, o.algorithm, None))?;
    // Mutual TLS on the stream: a CA, the controller's certificate and the node's.
    let certs = lb_api::tls::certs::Bundle::write(
        &run_dir.join("certs"),
        &[NODE_NAME],
        &[],
        lb_api::tls::certs::Validity::days(1),
    )
    .context("writing the demo's certificates")?;
    let tls_args = |p: lb_api::tls::TlsPaths| -> Vec<String> {
        vec![
            "--tls-ca".into(),
            p.ca.display().to_string(),
            "--tls-cert".into(),
            p.cert.display().to_string(),
            "--tls-key".into(),
            p.key.display().to_string(),
        ]
    };
    let controller_tls = tls_args(certs.controller_paths());
    let agent_tls = tls_args(certs.node_paths(NODE_NAME));
    p.say(format!(
        "mutual TLS on the controller stream: a CA, the controller's certificate and {NODE_NAME}'s \
         (SAN URI {}) in {}",
        lb_api::tls::node_uri(NODE_NAME),
        certs.dir.display()
    ));
    p.say(format!(
        "starting lb-controller in the node namespace: --config {} (standalone), gRPC on {CONTROLLER}",
        config.display()
    ));
    let mut controller = Agent::controller(
        lab.node(),
        ControllerOpts {
            bin: &controller_bin,
            config: &config,
            listen: CONTROLLER,
            metrics: CONTROLLER_METRICS,
            log: run_dir.join("lb-controller.log"),
            tls: &controller_tls,
        },
    )?;
    controller.wait_ready(lab.node(), Duration::from_secs(20))?;
    let ifaces: Vec<String> = lab.node_ifaces().iter().map(|i| i.name.clone()).collect();
    p.say(format!(
        "starting lb-agent in the node namespace: --controller https://{CONTROLLER} (mutual TLS), --mode {} on {} interfaces, algorithm {}",
        o.mode.as_str(),
        ifaces.len(),
        o.algorithm
    ));
    let controller_url = format!("https://{CONTROLLER}");
    let mut agent = Agent::start(
        lab.node(),
        AgentOpts {
            bin: &agent_bin,
            controller: &controller_url,
            node_name: NODE_NAME,
            interfaces: &ifaces,
            mode: o.mode.as_str(),
            pin_path: &pin_path,
            metrics: METRICS,
            log: run_dir.join("lb-agent.log"),
            tls: &agent_tls,
        },
    )?;
    let took = agent
        .wait_ready(lab.node(), Duration::from_secs(20))
        .inspect_err(|_| {
            if interrupted() {
                p.say("interrupted: tearing down the lab");
            }
        })?;
    p.say(format!(
        "  lb-agent ready in {}: the controller's snapshot is applied (GET /readyz on {METRICS} in the node namespace)",
        report::fmt_duration(took)
    ));

    let client_ns = lab.client().ns.name().to_string();
    let _etc = client_etc(&client_ns, &svcs)?;
    for s in &svcs {
        p.say(format!(
            "  {} -> {} (/etc/netns/{client_ns}/hosts){}",
            s.host,
            SocketAddr::new(s.vip, s.port),
            if s.grpc { ", gRPC mode" } else { "" }
        ));
    }
    check_interrupt(&p)?;

    // The client pod.
    let before = calls / 2;
    let after = calls - before;
    let inflight = if o.quick { 3 } else { 6 };
    // The third phase: enough calls for the per-call spread check (30 per active B pod).
    let one_calls = (if o.quick { 60 } else { 300 }).max(30 * (pods - 1));
    let mut args: Vec<String> = vec!["client".into()];
    for s in l4_svcs {
        args.push("--target".into());
        args.push(format!("{}={}:{}", s.key, s.host, s.port));
    }
    for s in [&svcs[0], twin] {
        args.push("--one-channel".into());
        args.push(format!("{}={}:{}", s.key, s.host, s.port));
    }
    // The GOAWAY phase: calls spread over several of C's connection ages.
    let goaway_calls = if o.quick { 200 } else { 1000 };
    args.push("--goaway".into());
    args.push(format!(
        "{}={}:{}",
        goaway_twin.key, goaway_twin.host, goaway_twin.port
    ));
    for (k, v) in [
        ("--before", before.to_string()),
        ("--after", after.to_string()),
        ("--concurrency", o.concurrency.to_string()),
        ("--inflight", inflight.to_string()),
        ("--inflight-interval-ms", "100".into()),
        ("--one-channel-calls", one_calls.to_string()),
        ("--goaway-calls", goaway_calls.to_string()),
        ("--goaway-secs", GOAWAY_SPAN.as_secs_f64().to_string()),
        ("--deadline-ms", "2000".into()),
        (
            "--total-secs",
            deadline
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1)
                .to_string(),
        ),
    ] {
        args.push(k.into());
        args.push(v);
    }
    let me = std::env::current_exe()?;
    let child = procs::netns_command(&lab.client().ns, &me, &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the client pod")?;
    let mut client = Guarded::new("client", child, Duration::from_secs(2));
    let events = procs::lines(client.take_stdout().context("client stdout")?);
    let errs = procs::lines(client.take_stderr().context("client stderr")?);
    let mut stdin = client.take_stdin();
    p.say(format!(
        "client pod: {calls} calls to each service, a new channel (TCP connection) per call, \
         {} at a time; every call sends x-test-header and a 2 s deadline",
        o.concurrency
    ));

    let mut all_calls: Vec<Call> = Vec::new();
    let mut inflight_done: Vec<Inflight> = Vec::new();
    let mut one_done: Vec<OneChannel> = Vec::new();
    let mut victim: Option<(String, String)> = None; // (pod, ip)
    let mut event_at = 0i64;
    let mut fatal: Option<String> = None;
    let mut next_tick = 0usize;
    let tick = (calls / 2).max(1);
    let mut done = false;
    // Errors in here end the run but not the demo: the report still shows what happened (and
    // --keep still keeps the lab, for a look at what went wrong). An interrupt ends both.
    let mut drive = || -> Result<()> {
        while !done {
            check_interrupt(&p)?;
            if Instant::now() > deadline {
                bail!("timed out after {} s", o.timeout);
            }
            let line = match events.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    let stderr: Vec<String> = errs.try_iter().collect();
                    bail!(
                        "the client pod exited early ({:?}): {}",
                        client.wait_timeout(Duration::from_secs(1)),
                        stderr.join("\n")
                    );
                }
            };
            let ev: Event = serde_json::from_str(&line)
                .with_context(|| format!("client said something odd: {line:?}"))?;
            match ev {
                Event::Resolved { svc, name, addr } => {
                    p.say(format!("  client resolved {name} -> {addr} ({svc})"));
                }
                Event::Call(c) => {
                    if !c.ok && !all_calls.iter().any(|c| !c.ok) {
                        p.say(format!(
                            "  first failed call ({} to {}): {}",
                            match c.kind {
                                crate::wire::Kind::Unary => "UnaryCall",
                                crate::wire::Kind::Stream => "StreamingOutputCall",
                            },
                            c.svc.to_uppercase(),
                            c.error.as_deref().unwrap_or("?")
                        ));
                    }
                    all_calls.push(c);
                    if all_calls.len() >= next_tick + tick {
                        next_tick += tick;
                        let failed = all_calls.iter().filter(|c| !c.ok).count();
                        p.say(format!("  {} calls done, {failed} failed", all_calls.len()));
                    }
                }
                Event::PhaseDone { phase } => {
                    let n = all_calls.iter().filter(|c| c.phase == phase).count();
                    let which = match phase {
                        Phase::Before => "first",
                        Phase::After => "second",
                    };
                    p.say(format!("  {which} phase done: {n} calls"));
                }
                Event::InflightOpen { pods } => {
                    // Terminate the B pod that carries the most in-flight calls.
                    let b = &svcs[0];
                    let pick = b
                        .pods
                        .iter()
                        .max_by_key(|pod| {
                            (
                                pods.iter().filter(|x| **x == pod.name).count(),
                                std::cmp::Reverse(pod.name.clone()),
                            )
                        })
                        .expect("pods >= 2");
                    let on = pods.iter().filter(|x| **x == pick.name).count();
                    p.say(format!(
                        "live event: {} long-lived calls open to {} ({}); marking {} terminating \
                     ({on} of them on it)",
                        pods.len(),
                        b.name,
                        pods.join(", "),
                        pick.name
                    ));
                    write_config(&config, &config_yaml(&svcs, o.algorithm, Some(&pick.name)))?;
                    let t0 = Instant::now();
                    // The controller also watches the file; SIGHUP makes the reload immediate.
                    controller.proc.signal(libc::SIGHUP)?;
                    let svc_name = b.config_name();
                    // lbctl reads the kernel's maps; an IPv6 service the kernel does not hold
                    // (the userspace proxy serves it) shows on /metrics only.
                    let (bname, blabel) = (b.config_name(), b.backend_label(&pick.ip));
                    let seen_by = loop {
                        let out = procs::lbctl(
                            &lbctl_bin,
                            &pin_path,
                            &["backends", &svc_name, "-o", "json"],
                        );
                        if out.as_ref().is_ok_and(|j| shows_terminating(j, &pick.ip)) {
                            break "`lbctl backends` shows";
                        }
                        let labels = [("service", bname.as_str()), ("backend", blabel.as_str())];
                        if o.ipv6
                            && agent_metrics(&lab).is_ok_and(|m| {
                                sample(&m, "rpclb_backend_terminating", &labels) == Some(1.0)
                            })
                        {
                            break "lb-agent's /metrics shows";
                        }
                        if let Some(s) = agent.proc.try_wait() {
                            bail!("lb-agent exited ({s}) on reload\n{}", agent.log_tail(20));
                        }
                        if let Some(s) = controller.proc.try_wait() {
                            bail!(
                                "lb-controller exited ({s}) on reload\n{}",
                                controller.log_tail(20)
                            );
                        }
                        if t0.elapsed() > Duration::from_secs(10) || interrupted() {
                            bail!(
                                "lb-agent did not apply the change within 10 s (lbctl: {out:?})\n{}\n{}",
                                controller.log_tail(10),
                                agent.log_tail(20)
                            );
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    };
                    event_at = now_us();
                    p.say(format!(
                    "  config rewritten + SIGHUP to lb-controller; it streamed the delta and {seen_by} {} terminating after {}",
                    pick.name,
                    report::fmt_duration(t0.elapsed()),
                ));
                    // The gRPC-mode twin is the proxy's: its state is on /metrics.
                    let (tname, backend) = (twin.config_name(), twin.backend_label(&pick.ip));
                    let labels = [("service", tname.as_str()), ("backend", backend.as_str())];
                    loop {
                        let m = agent_metrics(&lab);
                        if m.as_ref().is_ok_and(|m| {
                            sample(m, "rpclb_backend_terminating", &labels) == Some(1.0)
                        }) {
                            break;
                        }
                        if t0.elapsed() > Duration::from_secs(10) || interrupted() {
                            bail!(
                                "lb-agent's /metrics did not show {backend} terminating in {tname} \
                                 within 10 s ({:?})\n{}",
                                m.map(|_| "not terminating"),
                                agent.log_tail(20)
                            );
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    p.say(format!(
                        "  and lb-agent's /metrics shows it terminating in {tname} (gRPC mode) \
                         after {}",
                        report::fmt_duration(t0.elapsed()),
                    ));
                    // The terminating pod still carries its in-flight calls (ACTIVE).
                    if let Ok(table) = procs::lbctl(&lbctl_bin, &pin_path, &["backends", &svc_name])
                    {
                        p.say(format!("  $ lbctl backends {svc_name}"));
                        for l in table.lines() {
                            println!("            {l}");
                        }
                    }
                    victim = Some((pick.name.clone(), pick.ip.clone()));
                }
                Event::Waiting => {
                    if victim.is_none() {
                        bail!("the client is waiting, but no live event happened");
                    }
                    if let Some(w) = stdin.as_mut() {
                        writeln!(w, "go").context("tell the client to go on")?;
                        w.flush()?;
                    }
                    p.say("  second phase: new calls while the long-lived calls go on");
                }
                Event::InflightDone(f) => {
                    inflight_done.push(f);
                    if inflight_done.len() == inflight {
                        p.say(format!("  the {inflight} long-lived calls ended"));
                    }
                }
                Event::OneChannelOpen { svc, name, addr } => {
                    if one_done.is_empty() && svc == svcs[0].key {
                        p.say(format!(
                            "third phase: one connection per VIP, {one_calls} unary calls over \
                             each, {} in flight at once",
                            o.concurrency
                        ));
                    }
                    if svc == goaway_twin.key {
                        p.say(format!(
                            "GOAWAY phase: {goaway_calls} unary calls over one connection to the \
                             gRPC-mode twin of {} (its pods close each connection after {}), \
                             started evenly over {}, {} in flight at most",
                            svcs[1].name,
                            report::fmt_duration(GOAWAY_AGE),
                            report::fmt_duration(GOAWAY_SPAN),
                            o.concurrency
                        ));
                    }
                    let how = if svc == twin.key || svc == goaway_twin.key {
                        "gRPC mode: lb-agent balances each call"
                    } else {
                        "L4: the kernel balances the connection"
                    };
                    p.say(format!("  one connection to {name} -> {addr} ({how})"));
                }
                Event::OneChannel(r) => {
                    let pods: Vec<String> =
                        r.per_pod.iter().map(|(p, n)| format!("{p} {n}")).collect();
                    p.say(format!(
                        "  {} calls over it, {} failed, {} TCP connection(s): {}",
                        r.ok + r.failed,
                        r.failed,
                        r.connections,
                        if pods.is_empty() {
                            r.error.clone().unwrap_or_else(|| "no answers".into())
                        } else {
                            pods.join(", ")
                        }
                    ));
                    one_done.push(r);
                }
                Event::Done => done = true,
                Event::Fatal { error } => {
                    fatal = Some(error);
                    done = true;
                }
            }
        }
        Ok(())
    };
    let mut run_error = drive().err().map(|e| format!("{e:#}"));
    if interrupted() {
        bail!("interrupted");
    }
    drop(stdin.take());
    let status = match client.wait_timeout(Duration::from_secs(3)) {
        Some(s) => Some(s),
        None => client.stop(),
    };
    let stderr: Vec<String> = errs.try_iter().collect();
    if let Some(e) = fatal {
        run_error.get_or_insert(format!("the client pod failed: {e}"));
    }
    if !status.is_some_and(|s| s.success()) {
        run_error.get_or_insert(format!(
            "the client pod exited with {}: {}",
            status.map_or_else(|| "?".into(), |s| s.to_string()),
            stderr.join(" | ")
        ));
    }
    match &run_error {
        None => p.say(format!(
            "done: {} calls, {} long-lived calls, {} calls over {} single connections",
            all_calls.len(),
            inflight_done.len(),
            one_done.iter().map(|r| r.ok + r.failed).sum::<usize>(),
            one_done.len()
        )),
        Some(e) => p.say(format!("the run failed: {e}")),
    }
    // The proxy's per-call counters, while the agent is up.
    let metrics = agent_metrics(&lab).map_err(|e| format!("{e:#}"));
    let proxy = metrics
        .as_ref()
        .map_err(|e| format!("GET /metrics failed: {e}"))
        .and_then(|m| proxy_counts(m, twin));
    let goaway_counts = metrics
        .as_ref()
        .map_err(|e| format!("GET /metrics failed: {e}"))
        .map(|m| goaway_counts(m, goaway_twin));

    // The report.
    println!();
    let mut checks = Checks::default();
    for s in l4_svcs {
        let event = match (&victim, s.key) {
            (Some((pod, _)), "b") => Some(report::Event {
                victim: pod.clone(),
                inflight: &inflight_done,
                at_us: event_at,
            }),
            _ => None,
        };
        let r = ServiceReport {
            title: format!(
                "service {}: {} -> {} ({}), algorithm {}",
                s.key.to_uppercase(),
                s.host,
                SocketAddr::new(s.vip, s.port),
                s.config_name(),
                o.algorithm
            ),
            algorithm: o.algorithm,
            pods: &s.pods,
            planned: calls,
            calls: all_calls.iter().filter(|c| c.svc == s.key).collect(),
            event,
        };
        println!("{}", r.render(&mut checks));
    }
    let proxy_calls = proxy.as_ref().ok().map(|p| p.calls);
    let one = OneChannelReport {
        pods: &svcs[0].pods,
        victim: victim.as_ref().map(|(v, _)| v.as_str()),
        planned: one_calls,
        concurrency: o.concurrency as usize,
        l4_desc: svcs[0].describe(),
        l7_desc: format!(
            "{} -> {} ({}, grpc: {{}})",
            twin.host,
            SocketAddr::new(twin.vip, twin.port),
            twin.config_name()
        ),
        l7_service: twin.config_name(),
        l4: one_done.iter().find(|r| r.svc == svcs[0].key),
        l7: one_done.iter().find(|r| r.svc == twin.key),
        proxy,
    };
    println!("{}", one.render(&mut checks));
    let goaway = report::GoawayReport {
        pods: &goaway_twin.pods,
        age: GOAWAY_AGE,
        span: GOAWAY_SPAN,
        desc: goaway_twin.describe(),
        run: one_done.iter().find(|r| r.svc == goaway_twin.key),
        proxy: goaway_counts,
    };
    println!("{}", goaway.render(&mut checks));
    // The pods' own counts must agree with what the client saw (all three phases).
    let seen = |pod: &str| {
        all_calls.iter().filter(|c| c.ok && c.pod == pod).count()
            + inflight_done.iter().filter(|f| f.pod == pod).count()
            + one_done
                .iter()
                .filter_map(|r| r.per_pod.get(pod))
                .sum::<usize>()
    };
    let disagree: Vec<String> = servers
        .pods
        .iter()
        .filter(|s| s.served() != seen(&s.name) as u64)
        .map(|s| {
            format!(
                "{} served {} but the client saw {}",
                s.name,
                s.served(),
                seen(&s.name)
            )
        })
        .collect();
    let line = if disagree.is_empty() {
        "every pod's own count of served calls matches the client's".to_string()
    } else {
        disagree.join("; ")
    };
    let mut overall = Checks::default();
    overall.add(
        run_error.is_none(),
        match &run_error {
            None => "the client pod finished its run".to_string(),
            Some(e) => format!("the run did not complete: {e}"),
        },
    );
    overall.add(disagree.is_empty(), line);
    println!("{}", overall.render(""));
    checks.lines.extend(overall.lines);

    for (title, args) in [
        ("lbctl services", vec!["services"]),
        ("lbctl backends", vec!["backends"]),
    ] {
        println!("$ {title}");
        match procs::lbctl(&lbctl_bin, &pin_path, &args) {
            Ok(out) => print!("{out}"),
            Err(e) => {
                println!("{e:#}");
                checks.add(false, format!("{title} failed"));
            }
        }
        if title == "lbctl services" {
            println!(
                "(lbctl reads the kernel's maps. {} at {} is in the gRPC mode: lb-agent's \
                 userspace proxy serves it, and its per-call counters are on the agent's \
                 /metrics: rpclb_service_new_flows_total{{service=\"{}\"}} {})",
                twin.config_name(),
                SocketAddr::new(twin.vip, twin.port),
                twin.config_name(),
                proxy_calls.map_or_else(|| "?".into(), |n| n.to_string())
            );
        }
        println!();
    }

    if !checks.all_ok() {
        // The data path's own counters, drop reasons first: where a failure starts.
        println!("$ lbctl stats");
        match procs::lbctl(&lbctl_bin, &pin_path, &["stats"]) {
            Ok(out) => print!("{out}"),
            Err(e) => println!("{e:#}"),
        }
        println!();
    }
    let outcome = if checks.all_ok() {
        println!("{} all {} checks passed", report::OK, checks.lines.len());
        Outcome::Passed
    } else {
        let n = checks.lines.iter().filter(|(ok, _)| !ok).count();
        println!(
            "{} {n} of {} checks failed",
            report::FAIL,
            checks.lines.len()
        );
        Outcome::ChecksFailed
    };

    if o.keep {
        let lbctl = lbctl_bin.display();
        let pin = pin_path.display();
        println!();
        println!("The lab is up (--keep). From another shell, as root:");
        println!("  {lbctl} --pin-path {pin} services");
        println!(
            "  {lbctl} --pin-path {pin} backends {}",
            svcs[0].config_name()
        );
        println!("  {lbctl} --pin-path {pin} conntrack");
        println!("  ip netns exec {client_ns} getent hosts {}", svcs[0].host);
        println!(
            "  ip netns exec {} curl -s http://{METRICS}/metrics | grep {}   # the gRPC mode's per-call counters",
            lab.node().name(),
            twin.name
        );
        println!(
            "  edit {} and lb-controller streams the change to lb-agent (logs: {}, {})",
            config.display(),
            controller.log.display(),
            agent.log.display()
        );
        println!("Namespaces: {}", lab.namespaces().join(" "));
        println!("Press Ctrl-C to tear it down.");
        while !interrupted() {
            if let Some(s) = agent.proc.try_wait() {
                println!("lb-agent exited ({s}); tearing down");
                break;
            }
            if let Some(s) = controller.proc.try_wait() {
                println!("lb-controller exited ({s}); tearing down");
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    p.say("teardown: stopping lb-agent, lb-controller, the pods and the lab");
    drop(client);
    let agent_status = agent.proc.stop();
    let _ = controller.proc.stop();
    drop(servers);
    drop(lab);
    drop(run_guard);
    p.say(format!(
        "teardown done (lb-agent exit: {})",
        agent_status.map_or_else(|| "?".into(), |s| s.to_string())
    ));
    Ok(outcome)
}

fn check_interrupt(p: &Progress) -> Result<()> {
    if interrupted() {
        p.say("interrupted: tearing down the lab");
        bail!("interrupted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svcs() -> Vec<Svc> {
        let pod = |n: &str, ip: &str| PodInfo {
            name: n.into(),
            ip: ip.into(),
        };
        vec![Svc {
            key: "b",
            name: "rpc-service-b".into(),
            host: "rpc-service-b.my-rpc.svc.cluster.local".into(),
            vip: Ipv4Addr::new(10, 96, 0, 11).into(),
            port: 50052,
            pods: vec![
                pod("rpc-service-b-1", "10.244.11.2"),
                pod("rpc-service-b-2", "10.244.12.2"),
            ],
            grpc: false,
        }]
    }

    #[test]
    fn generated_config_is_valid_and_marks_the_victim() {
        for algo in Algorithm::ALL {
            let y = config_yaml(&svcs(), algo, Some("rpc-service-b-2"));
            let cfg = lb_agent::config::parse(&y, "demo.yaml").unwrap();
            let s = &cfg.state.services[0];
            assert_eq!(s.name, "my-rpc/rpc-service-b:grpc");
            assert_eq!(s.algorithm, algo);
            assert_eq!(s.backends[0].state, lb_api::BackendState::Active);
            assert_eq!(s.backends[1].state, lb_api::BackendState::Terminating);
        }
    }

    #[test]
    fn the_grpc_twin_has_b_s_backends_and_victim() {
        let mut v = svcs();
        let twin = v[0].grpc_twin("b-grpc", Ipv4Addr::new(10, 96, 0, 13));
        assert_eq!(twin.host, "rpc-service-b-grpc.my-rpc.svc.cluster.local");
        v.push(twin);
        let y = config_yaml(&v, Algorithm::Random, Some("rpc-service-b-2"));
        let cfg = lb_agent::config::parse(&y, "demo.yaml").unwrap();
        let (b, g) = (&cfg.state.services[0], &cfg.state.services[1]);
        assert_eq!(g.name, "my-rpc/rpc-service-b-grpc:grpc");
        assert!(b.grpc.is_none());
        assert!(g.grpc.is_some());
        assert_eq!(g.vip, Ipv4Addr::new(10, 96, 0, 13));
        assert_eq!(g.port, 50052);
        assert_eq!(b.backends, g.backends);
        assert_eq!(g.backends[1].state, lb_api::BackendState::Terminating);
    }

    #[test]
    fn metrics_samples_are_found_by_labels() {
        let text = "# HELP rpclb_service_new_flows New flows\n\
            # TYPE rpclb_service_new_flows counter\n\
            rpclb_service_new_flows_total{service=\"my-rpc/rpc-service-b:grpc\"} 63\n\
            rpclb_service_new_flows_total{service=\"my-rpc/rpc-service-b-grpc:grpc\"} 120\n\
            rpclb_backend_new_flows_total{service=\"my-rpc/rpc-service-b-grpc:grpc\",backend=\"10.244.11.2:50052\"} 61\n\
            rpclb_backend_new_flows_total{service=\"my-rpc/rpc-service-b-grpc:grpc\",backend=\"10.244.12.2:50052\"} 59\n\
            rpclb_services 3\n";
        let name = "rpclb_service_new_flows_total";
        let s = |v| [("service", v)];
        assert_eq!(
            sample(text, name, &s("my-rpc/rpc-service-b:grpc")),
            Some(63.0)
        );
        assert_eq!(sample(text, name, &s("my-rpc/rpc-service-x:grpc")), None);
        assert_eq!(sample(text, "rpclb_services", &[]), Some(3.0));
        let mut v = svcs();
        v.push(v[0].grpc_twin("b-grpc", Ipv4Addr::new(10, 96, 0, 13)));
        let p = proxy_counts(text, &v[1]).unwrap();
        assert_eq!(p.calls, 120);
        assert_eq!(p.per_ip["10.244.11.2"], 61);
        assert_eq!(p.per_ip["10.244.12.2"], 59);
        assert!(
            proxy_counts(text, &v[0])
                .unwrap()
                .per_ip
                .values()
                .all(|&n| n == 0)
        );
    }

    #[test]
    fn goaway_counters_are_read_per_pod() {
        let s = "my-rpc/rpc-service-b-grpc:grpc";
        let line = |m: &str, ip: &str, v: u64| {
            format!("{m}{{service=\"{s}\",backend=\"{ip}:50052\"}} {v}\n")
        };
        let text = [
            line("rpclb_backend_new_flows_total", "10.244.11.2", 61),
            line("rpclb_backend_grpc_goaways_total", "10.244.11.2", 3),
            line(
                "rpclb_backend_grpc_connections_opened_total",
                "10.244.11.2",
                4,
            ),
            line(
                "rpclb_backend_grpc_transparent_retries_total",
                "10.244.11.2",
                2,
            ),
            line("rpclb_backend_grpc_goaways_total", "10.244.12.2", 1),
        ]
        .concat();
        let twin = svcs()[0].grpc_twin("b-grpc", Ipv4Addr::new(10, 96, 0, 13));
        let m = goaway_counts(&text, &twin);
        assert_eq!(
            m["10.244.11.2"],
            report::GoawayBackend {
                calls: 61,
                goaways: 3,
                opened: 4,
                resent: 2
            }
        );
        assert_eq!(m["10.244.12.2"].goaways, 1);
        assert_eq!(m["10.244.12.2"].opened, 0);
    }

    #[test]
    fn terminating_is_found_in_any_json_shape() {
        let ip = "10.244.12.2";
        assert!(shows_terminating(
            r#"[{"backend":"10.244.12.2:50052","state":"terminating"}]"#,
            ip
        ));
        assert!(shows_terminating(
            r#"{"services":[{"backends":[{"ip":"10.244.12.2","port":50052,"state":"Terminating"}]}]}"#,
            ip
        ));
        assert!(!shows_terminating(
            r#"[{"ip":"10.244.12.2","state":"active"},{"ip":"10.244.11.2","state":"terminating"}]"#,
            ip
        ));
        assert!(!shows_terminating("not json", ip));
    }
}
