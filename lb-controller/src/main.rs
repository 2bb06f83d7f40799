//! `lb-controller`: streams each node's desired state to its agent.
//!
//! ```text
//! lb-controller --config services.yaml --tls-ca ca.pem --tls-cert controller.pem --tls-key controller-key.pem
//!               [--listen 127.0.0.1:50551] [--metrics-addr 127.0.0.1:9465]
//! lb-controller --kube --tls-ca ... [--listen 0.0.0.0:50551] ...   (in a cluster; see deploy/)
//! lb-controller --config services.yaml --insecure                 (plaintext: tests, debugging)
//! lb-controller certs --out DIR --nodes node-a,node-b             (a CA and certificates; docs/security.md)
//! ```
//!
//! Every flag also reads an environment variable (`RPCLB_*`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};
use lb_api::tls::certs::{Bundle, Ca, Validity};
use lb_api::tls::reload::Reloader;
use lb_api::tls::{TlsPaths, server_config};
use lb_controller::grpc::{Agents, Publisher, RefusalReason, StateService, StreamRefusals};
use lb_controller::http::{self, Counters, HttpState, TlsMetrics};
use lb_controller::standalone::FileSource;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "lb-controller",
    version,
    about = "rpclb controller: turns Services and EndpointSlices (or a config file) into each \
             node's desired state and streams it to the agents over gRPC (mutual TLS)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Standalone mode: the services come from this YAML file (the agent's format,
    /// docs/config.md), the same for every node. Reloaded on change and on SIGHUP.
    #[arg(
        long,
        env = "RPCLB_CONFIG",
        value_name = "FILE",
        conflicts_with = "kube"
    )]
    config: Option<PathBuf>,
    /// Kubernetes mode: watch Services, their endpoints (see --endpoints-source), Nodes and
    /// Pods' metadata (in-cluster config or KUBECONFIG).
    #[arg(long, env = "RPCLB_KUBE", value_parser = clap::builder::BoolishValueParser::new())]
    kube: bool,
    /// gRPC address agents connect to.
    #[arg(long, env = "RPCLB_LISTEN", default_value = "127.0.0.1:50551")]
    listen: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "RPCLB_METRICS_ADDR", default_value = "127.0.0.1:9465")]
    metrics_addr: SocketAddr,
    /// CA bundle (PEM) that signed the agents' client certificates. With --tls-cert and
    /// --tls-key the stream is mutual TLS; each stream is bound to the node its client
    /// certificate names (SAN URI rpclb://node/<name>). Re-read when it changes.
    #[arg(long, env = "RPCLB_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// The controller's certificate chain (PEM), leaf first. Re-read when it changes.
    #[arg(long, env = "RPCLB_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM). Re-read when it changes.
    #[arg(long, env = "RPCLB_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// How often the TLS files are checked for changes (milliseconds).
    #[arg(long, env = "RPCLB_TLS_POLL_MS", default_value_t = 5000)]
    tls_poll_ms: u64,
    /// Serve the agent stream in plaintext, without authentication: anyone who reaches
    /// --listen can read every node's state and report as any node. Tests and debugging only.
    #[arg(long, env = "RPCLB_INSECURE", value_parser = BoolishValueParser::new(),
          conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    insecure: bool,
    /// Streams one node may have open at once (more are refused, RESOURCE_EXHAUSTED).
    #[arg(long, env = "RPCLB_MAX_STREAMS_PER_NODE", default_value_t = lb_controller::grpc::DEFAULT_MAX_STREAMS_PER_NODE)]
    max_streams_per_node: u32,
    /// How often the config file is checked for changes (milliseconds).
    #[arg(long, env = "RPCLB_CONFIG_POLL_MS", default_value_t = 1000)]
    config_poll_ms: u64,
    /// --kube: this replica's name (Lease identity, Events' instance) [default: host name].
    #[arg(long, env = "RPCLB_POD_NAME")]
    pod_name: Option<String>,
    /// --kube: the namespace of the leader-election Lease.
    #[arg(long, env = "RPCLB_POD_NAMESPACE", default_value = "rpclb-system")]
    pod_namespace: String,
    /// --kube: the leader-election Lease's name.
    #[arg(long, env = "RPCLB_LEASE_NAME", default_value = "rpclb-controller")]
    lease_name: String,
    /// --kube: how long a leader's hold on the Lease lasts without renewal, seconds (how
    /// long a replica that died without releasing it keeps the lead).
    #[arg(long, env = "RPCLB_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// --kube: a leader that could not renew for this long steps down, seconds (less than
    /// --lease-duration).
    #[arg(long, env = "RPCLB_LEASE_RENEW_DEADLINE", default_value_t = 10)]
    lease_renew_deadline: u64,
    /// --kube: how often each replica tries to acquire or renew the Lease, seconds (less
    /// than --lease-renew-deadline).
    #[arg(long, env = "RPCLB_LEASE_RETRY_PERIOD", default_value_t = 2)]
    lease_retry_period: u64,
    /// --kube: no leader election (for a single replica, which then writes the Events).
    #[arg(long, env = "RPCLB_NO_LEADER_ELECTION", value_parser = clap::builder::BoolishValueParser::new())]
    no_leader_election: bool,
    /// --kube: where endpoints come from: `endpointslices` (discovery.k8s.io/v1),
    /// `endpoints` (core v1, served by every version; no terminating state), or `auto`
    /// (EndpointSlices when the API server serves them, else Endpoints; asked at start).
    #[arg(
        long,
        env = "RPCLB_ENDPOINTS_SOURCE",
        default_value = "auto",
        value_parser = ["auto", "endpointslices", "endpoints"]
    )]
    endpoints_source: String,
    /// --kube: how long watch events are gathered before the state is recomputed (ms).
    #[arg(long, env = "RPCLB_COALESCE_MS", default_value_t = 50)]
    coalesce_ms: u64,
    /// --kube: conntrack idle timeout of a TCP flow that has seen only a SYN, seconds (sent to
    /// agents with the state; config files carry their own).
    #[arg(long, env = "RPCLB_TIMEOUT_TCP_SYN", default_value_t = 60)]
    timeout_tcp_syn: u64,
    /// --kube: idle timeout of an established TCP flow, seconds.
    #[arg(long, env = "RPCLB_TIMEOUT_TCP_ESTABLISHED", default_value_t = 21_600)]
    timeout_tcp_established: u64,
    /// --kube: idle timeout of a closing TCP flow (after FIN or RST), seconds.
    #[arg(long, env = "RPCLB_TIMEOUT_TCP_CLOSING", default_value_t = 10)]
    timeout_tcp_closing: u64,
    /// --kube: idle timeout of a UDP flow, seconds.
    #[arg(long, env = "RPCLB_TIMEOUT_UDP", default_value_t = 60)]
    timeout_udp: u64,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write a CA, the controller's certificate and one per node (PEM) to a folder, for the
    /// lab, the demo or a first install. A CA already in the folder is reused (new node
    /// certificates for an install); see docs/security.md.
    Certs(CertsArgs),
}

#[derive(Args, Debug)]
struct CertsArgs {
    /// The folder (created): ca.pem, ca-key.pem, controller.pem, controller-key.pem,
    /// node-<name>.pem, node-<name>-key.pem.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Node names, comma-separated (Kubernetes node names).
    #[arg(long, value_delimiter = ',', value_name = "NODE1,NODE2")]
    nodes: Vec<String>,
    /// More DNS names or IP addresses for the controller's certificate, beyond the Service
    /// names of deploy/ (rpclb-controller.rpclb-system.svc, ...), localhost and 127.0.0.1.
    #[arg(long, value_delimiter = ',', value_name = "NAME1,NAME2")]
    controller_names: Vec<String>,
    /// Validity of the certificates, days.
    #[arg(long, default_value_t = 365)]
    days: u64,
    /// Write a new CA even if the folder has one (every certificate it signed stops working).
    #[arg(long)]
    new_ca: bool,
}

/// `lb-controller certs`.
fn certs(a: &CertsArgs) -> anyhow::Result<()> {
    let b = Bundle::at(&a.out);
    let v = Validity::days(a.days.max(1));
    let names: Vec<&str> = a.controller_names.iter().map(String::as_str).collect();
    let nodes: Vec<&str> = a
        .nodes
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .collect();
    for n in &nodes {
        lb_api::tls::validate_node_name(n).with_context(|| format!("--nodes {n:?}"))?;
    }
    let ca = if b.ca().exists() && !a.new_ca {
        let ca = b
            .load_ca()
            .with_context(|| format!("the CA in {} (or pass --new-ca)", a.out.display()))?;
        println!("using the CA in {}", b.ca().display());
        ca
    } else {
        Bundle::write(&a.out, &[], &[], v)?;
        println!(
            "wrote a new CA: {} (keep {} off the cluster)",
            b.ca().display(),
            b.ca_key().display()
        );
        b.load_ca()?
    };
    write_certs(&b, &ca, &nodes, &names, v)
}

fn write_certs(
    b: &Bundle,
    ca: &Ca,
    nodes: &[&str],
    names: &[&str],
    v: Validity,
) -> anyhow::Result<()> {
    b.write_controller(ca, names, v)?;
    let p = b.controller_paths();
    println!("wrote {} and {}", p.cert.display(), p.key.display());
    for n in nodes {
        b.write_node(ca, n, v)?;
        let p = b.node_paths(n);
        println!(
            "wrote {} and {} (SAN URI {})",
            p.cert.display(),
            p.key.display(),
            lb_api::tls::node_uri(n)
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Certs(a)) = &cli.cmd {
        return match certs(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-controller certs: {}", render_error(&e));
                ExitCode::FAILURE
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in log files (as lb-agent).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb-controller: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-controller: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line (kube's errors embed their sources).
fn render_error(e: &anyhow::Error) -> String {
    lb_api::errors::one_line(e.chain())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let publisher = Arc::new(Publisher::new());
    let agents = Arc::new(Agents::default());
    let counters = Arc::new(Counters::default());
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;

    // The source first: a bad config file stops us before we listen.
    let mut file = match (&cli.config, cli.kube) {
        (Some(path), false) => {
            // A change is published once two polls saw the same bytes.
            let poll = Duration::from_millis(cli.config_poll_ms.max(10));
            let mut f = FileSource::new(path, poll);
            match f.poll(&publisher, true) {
                lb_controller::standalone::Polled::Invalid(e) => bail!("{e}"),
                _ => {
                    counters.config_reloads.fetch_add(1, Ordering::Relaxed);
                    counters.ready.store(true, Ordering::Relaxed);
                    info!(
                        config = %path.display(),
                        services = publisher.current().default.state.services.len(),
                        "standalone mode: config published as version 1"
                    );
                }
            }
            Some(f)
        }
        (None, true) => None,
        _ => bail!("one of --config FILE (RPCLB_CONFIG) or --kube (RPCLB_KUBE) is required"),
    };

    // The stream's TLS: a bad file stops us before we listen, too.
    let tls = match (&cli.tls_ca, &cli.tls_cert, &cli.tls_key, cli.insecure) {
        (Some(ca), Some(cert), Some(key), false) => {
            let r = Reloader::new(
                TlsPaths {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                },
                server_config,
            )
            .context("the agent stream's TLS files")?;
            let cur = r.current();
            info!(
                cert = %cert.display(),
                subject = cur.leaf.subject,
                serial = cur.leaf.serial,
                names = ?cur.leaf.names,
                not_after = cur.leaf.not_after_unix(),
                "agent stream: mutual TLS; each stream is bound to its client certificate's node"
            );
            Some(r)
        }
        (None, None, None, true) => {
            warn!(
                addr = %cli.listen,
                "--insecure: the agent stream is PLAINTEXT and unauthenticated; anyone who reaches \
                 this address can read every node's state and report as any node"
            );
            None
        }
        _ => bail!(
            "the agent stream needs mutual TLS: pass --tls-ca, --tls-cert and --tls-key \
             (RPCLB_TLS_CA, RPCLB_TLS_CERT, RPCLB_TLS_KEY; `lb-controller certs` makes a set), \
             or --insecure for plaintext"
        ),
    };
    let tls_metrics = tls.as_ref().map(|r| TlsMetrics {
        stats: r.stats.clone(),
        current: r.subscribe(),
    });
    let tls_rx = tls.as_ref().map(Reloader::subscribe);
    let _tls_task = tls.map(|r| {
        r.spawn(
            Duration::from_millis(cli.tls_poll_ms.max(10)),
            "lb-controller",
        )
    });
    let refusals = Arc::new(StreamRefusals::default());

    let grpc_listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("gRPC address {}", cli.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(cli.metrics_addr)
        .await
        .with_context(|| format!("metrics address {}", cli.metrics_addr))?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut svc = StateService::new(&publisher, agents.clone())
        .with_shutdown(stop_rx.clone())
        .with_max_streams_per_node(cli.max_streams_per_node)
        .with_refusals(refusals.clone());
    if cli.insecure {
        svc = svc.insecure();
    }
    let svc = svc.into_server();
    let incoming = lb_api::tls::server::incoming(
        grpc_listener,
        lb_api::tls::server::Acceptor {
            tls: tls_rx,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            on_handshake_error: {
                let r = refusals.clone();
                Arc::new(move || r.count(RefusalReason::TlsHandshake))
            },
        },
    );
    let mut stop = stop_rx.clone();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            }),
    );
    info!(addr = %cli.listen, tls = !cli.insecure, "serving rpclb.v1.StateStream");
    let app = http::router(Arc::new(HttpState {
        publisher: publisher.clone(),
        agents: agents.clone(),
        counters: counters.clone(),
        refusals: refusals.clone(),
        tls: tls_metrics,
    }));
    let mut stop = stop_rx.clone();
    let web = tokio::spawn(async move {
        axum::serve(metrics_listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    });
    info!(addr = %cli.metrics_addr, "serving /metrics, /healthz, /readyz");

    let kube_task = if cli.kube {
        Some(start_kube(&cli, &publisher, &counters, &stop_rx)?)
    } else {
        None
    };

    let mut tick = tokio::time::interval(Duration::from_millis(cli.config_poll_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut kube_task = kube_task;
    let why = loop {
        let (force, why) = tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => (true, "SIGHUP"),
            _ = tick.tick() => (false, "file changed"),
            r = async { kube_task.as_mut().expect("guarded").await }, if kube_task.is_some() => {
                let _ = stop_tx.send(true);
                return match r {
                    Ok(r) => r,
                    Err(e) => Err(anyhow::anyhow!("the Kubernetes task failed: {e}")),
                };
            }
        };
        if let Some(f) = file.as_mut() {
            let before = publisher.current().version;
            if f.poll_logged(&publisher, force, why) {
                if publisher.current().version != before || force {
                    counters.config_reloads.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                counters.config_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    info!("{why}: shutting down; agents keep serving their last state");
    let _ = stop_tx.send(true);
    if let Some(t) = kube_task {
        match tokio::time::timeout(Duration::from_secs(5), t).await {
            Ok(Ok(Err(e))) => warn!("kubernetes watchers: {e:#}"),
            Err(_) => warn!("kubernetes watchers did not stop within 5 s"),
            _ => {}
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), web).await;
    Ok(())
}

type KubeTask = tokio::task::JoinHandle<anyhow::Result<()>>;

/// `--kube`: the watchers and leader election, publishing into `publisher`.
#[cfg(feature = "kube")]
fn start_kube(
    cli: &Cli,
    publisher: &Arc<Publisher>,
    counters: &Arc<Counters>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<KubeTask> {
    let secs = |name: &str, v: u64| {
        if v == 0 {
            bail!("--timeout-{name} must be > 0");
        }
        Ok(Duration::from_secs(v))
    };
    let opts = lb_controller::kube_mode::KubeOptions {
        identity: match &cli.pod_name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("no --pod-name, and the host name is unreadable")?
                .trim()
                .to_string(),
        },
        namespace: cli.pod_namespace.clone(),
        lease_name: cli.lease_name.clone(),
        lease_timing: (
            Duration::from_secs(cli.lease_duration),
            Duration::from_secs(cli.lease_renew_deadline),
            Duration::from_secs(cli.lease_retry_period),
        ),
        no_leader_election: cli.no_leader_election,
        timeouts: lb_api::config::Timeouts {
            tcp_syn: secs("tcp-syn", cli.timeout_tcp_syn)?,
            tcp_established: secs("tcp-established", cli.timeout_tcp_established)?,
            tcp_closing: secs("tcp-closing", cli.timeout_tcp_closing)?,
            udp: secs("udp", cli.timeout_udp)?,
        },
        watch: lb_controller::watch::WatchConfig {
            coalesce: Duration::from_millis(cli.coalesce_ms),
            ..Default::default()
        },
        endpoints_source: cli
            .endpoints_source
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))?,
    };
    let run =
        lb_controller::kube_mode::run(opts, publisher.clone(), counters.clone(), stop.clone());
    Ok(tokio::spawn(async move {
        run.await.map_err(anyhow::Error::from)
    }))
}

#[cfg(not(feature = "kube"))]
fn start_kube(
    _: &Cli,
    _: &Arc<Publisher>,
    _: &Arc<Counters>,
    _: &watch::Receiver<bool>,
) -> anyhow::Result<KubeTask> {
    bail!(
        "--kube: this lb-controller was built without the `kube` feature \
         (build it with `cargo build -p lb-controller`, default features)"
    )
}
