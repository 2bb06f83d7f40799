//! Support for `rpclb-bench`: options, the stop flag, small statistics, tables and the
//! summary of targets. The sections live in `live` (XDP live frames, scale), `maglev`,
//! `throughput` (netns lab), `stream` (controller -> agent -> maps), `counters`, `newflow`
//! (fill), `fanout` and `grpc` (the gRPC mode vs direct).
//!
//! Safety rules (DESIGN.md, "Network safety"): every packet this benchmark makes lives in
//! namespaces it creates (`rpclb_tests::lab`, deleted on drop, on panic too, and on SIGINT /
//! SIGTERM / SIGHUP, which only set a flag that every loop checks); every loop is bounded in
//! count and in time.

pub mod counters;
pub mod cpu;
pub mod fanout;
pub mod gc;
pub mod gcsweep;
pub mod grpc;
pub mod live;
pub mod maglev;
pub mod newflow;
pub mod sink;
pub mod stream;
pub mod throughput;
pub mod wrk;

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Xdp,
    Scale,
    Maglev,
    Lab,
    Stream,
    Counters,
    Fill,
    Fanout,
    Grpc,
    Tc,
    Gc,
}

impl Section {
    pub const ALL: [Section; 11] = [
        Section::Xdp,
        Section::Tc,
        Section::Scale,
        Section::Maglev,
        Section::Lab,
        Section::Stream,
        Section::Counters,
        Section::Fill,
        Section::Fanout,
        Section::Grpc,
        Section::Gc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Section::Xdp => "xdp",
            Section::Scale => "scale",
            Section::Maglev => "maglev",
            Section::Lab => "lab",
            Section::Stream => "stream",
            Section::Counters => "counters",
            Section::Fill => "fill",
            Section::Fanout => "fanout",
            Section::Grpc => "grpc",
            Section::Tc => "tc",
            Section::Gc => "gc",
        }
    }

    pub fn parse(s: &str) -> Result<Section> {
        Section::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown section {s:?} (xdp, tc, scale, maglev, lab, stream, counters, fill, fanout, grpc, gc)"
                )
            })
    }
}

/// Knobs; `Opts::full()` and `Opts::quick()` give the two presets, flags override them.
#[derive(Clone, Debug)]
pub struct Opts {
    pub quick: bool,
    pub sections: Vec<Section>,
    /// Live-frames repeat count per timed run (before the time cap).
    pub repeat: u32,
    /// Cap on one timed live-frames run.
    pub run_cap: Duration,
    /// Timed rounds per live-frames case (the median is reported).
    pub rounds: usize,
    /// Distinct new flows timed one by one (plain mode, repeat = 1).
    pub new_flows: u32,
    /// Services and backends of the scale section.
    pub scale_services: u32,
    pub scale_backends: u32,
    /// Maglev builds timed.
    pub maglev_runs: usize,
    /// Seconds per lab throughput run, rounds of the lab section, client threads.
    pub lab_secs: f64,
    pub lab_rounds: usize,
    pub lab_threads: usize,
    /// `--lab-paths`: only these lab paths (direct always runs); empty = all.
    pub lab_paths: Vec<String>,
    /// `--lab-wrk`: the wrk and nginx part of the lab section (on, off, only).
    pub lab_wrk: String,
    /// `--profile CASE`: run only that live-frames case of section 1 for `profile_secs`, for
    /// `perf record` (tx, established, reply, floor, established-nocache,
    /// reply-nocache), or plain runs of new flows (new).
    pub profile: Option<String>,
    pub profile_secs: f64,
    /// `--profile new`: how full (% of its flows) the map is kept.
    pub profile_fill: u32,
    /// Single plain runs per case and round where live frames are refused (section 1's
    /// fallback).
    pub plain_runs: u32,
    /// `--ab-object PATH`: section 1 also times this eBPF object (cases marked B), interleaved
    /// with the built-in one, for A/B comparisons of the programs in one run.
    pub ab_object: Option<std::path::PathBuf>,
    /// `--gc-flows`: the flow counts of the gc section (empty: its defaults).
    pub gc_flows: Vec<u32>,
}

impl Opts {
    pub fn full() -> Opts {
        Opts {
            quick: false,
            sections: Section::ALL.to_vec(),
            repeat: 1_000_000,
            run_cap: Duration::from_millis(700),
            rounds: 7,
            new_flows: 20_000,
            scale_services: 10_000,
            scale_backends: 100_000,
            maglev_runs: 20,
            lab_secs: 1.5,
            lab_rounds: 5,
            lab_threads: 2,
            lab_paths: Vec::new(),
            lab_wrk: "on".into(),
            profile: None,
            profile_secs: 5.0,
            profile_fill: 0,
            plain_runs: 4_000,
            ab_object: None,
            gc_flows: Vec::new(),
        }
    }

    pub fn quick() -> Opts {
        Opts {
            quick: true,
            sections: Section::ALL.to_vec(),
            repeat: 100_000,
            run_cap: Duration::from_millis(200),
            rounds: 3,
            new_flows: 2_000,
            scale_services: 1_000,
            scale_backends: 10_000,
            maglev_runs: 5,
            lab_secs: 0.5,
            lab_rounds: 2,
            lab_threads: 2,
            lab_paths: Vec::new(),
            lab_wrk: "on".into(),
            profile: None,
            profile_secs: 5.0,
            profile_fill: 0,
            plain_runs: 500,
            ab_object: None,
            gc_flows: Vec::new(),
        }
    }
}

pub const USAGE: &str = "\
rpclb-bench: rpclb's benchmarks (needs root; everything runs in private network namespaces)

usage: rpclb-bench [--quick] [--section NAME]... [options]
       cargo xtask bench [same arguments]

sections (default: all, in this order):
  xdp      per-packet cost with XDP live frames vs a trivial XDP_TX program, and new-flow cost
  tc       informational: rpclb_tc in plain mode, a connection's first four packets (SYN,
           SYN-ACK, ACK + data, reply), A/B with --ab-object
  scale    the same with 10,000 services and 100,000 backends loaded vs one service
  maglev   Maglev table build, M = 65537, 1,000 backends
  lab      netns lab: connections/s and keep-alive requests/s, XDP, TC and userspace vs direct
           vs iptables DNAT; then wrk and nginx through direct, TC and userspace
  stream   endpoints change -> node maps through the controller's gRPC stream (p50/p99)
  counters one counter update, per-CPU vs shared with atomic adds, on one and on two CPUs
  fill     new-flow cost as the default-size conntrack map fills (0% to 90% of its flows)
  fanout   one controller process, 1,000 and 5,000 agent streams: change -> all acked,
           memory per stream, CPU per change; 10,000 Services / 100,000 endpoints in
           process; kube-proxy's iptables-restore for the same
  grpc     the gRPC mode: unary calls over one client connection through the agent's proxy
           (1 and 3 backends) vs direct to a pod: max calls/s with 16 in flight, p50/p99 at
           a moderate paced rate, the spread over 3 backends (uses --lab-secs, --lab-rounds)
  gc       the agent's conntrack GC tick over 100,000 and 400,000 flows (quick: 10,000 and
           40,000), a quarter of them idle: CPU per sweep, per scanned entry and per expired
           flow, and a sweep where nothing expires (uses --rounds)

options:
  --quick              small counts (a smoke run of about 20 s)
  --section NAME       run only this section; repeat or use commas for several
  --repeat N           live-frames repeat per timed run (default 1000000; quick 100000)
  --rounds N           timed rounds per live-frames case, median reported (default 7; quick 3)
  --new-flows N        distinct new flows timed in plain mode (default 20000)
  --services N         services in the scale section (default 10000)
  --backends N         backends in the scale section (default 100000)
  --lab-secs S         seconds per lab (and grpc) run (default 1.5; quick 0.5)
  --lab-rounds N       rounds of the lab (and grpc) section, median reported (default 5;
                       quick 2)
  --lab-threads N      client threads in the lab section (default 2)
  --lab-paths LIST     only these lab paths (comma-separated: xdp, tc, iptables, pass,
                       userspace; direct always runs)
  --lab-wrk on|off|only  the lab's wrk and nginx part (default on; skipped if either is
                       missing)
  --profile CASE       only run one live-frames case of section 1 (tx, established, reply,
                       floor, established-nocache, reply-nocache) in a loop, for
                       `perf record -C <cpu>`; --profile-secs S (default 5);
                       `new`: plain runs of SYNs of distinct flows into a default-size
                       map kept --profile-fill PCT full (default 0: --new-flows flows)
  --plain-runs N       section 1 where live frames are refused: single plain runs per case
                       and round (default 4000; quick 500)
  --ab-object PATH     sections xdp and tc also time this eBPF object (rows marked B)
                       interleaved with the built-in one, e.g. a copy of target/ebpf/.../lb-ebpf
                       from another build, for A/B comparisons in one run
  --gc-flows LIST      the gc section's flow counts (comma-separated, each <= 500,000)
  -h, --help           this text
";

/// Parse the command line (without argv[0]). `Ok(None)` means: help was printed.
pub fn parse_args(args: &[String]) -> Result<Option<Opts>> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = if quick { Opts::quick() } else { Opts::full() };
    let mut sections = Vec::new();
    let mut it = args.iter();
    fn val<'a>(it: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a str> {
        it.next()
            .map(String::as_str)
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
    }
    fn num<T: std::str::FromStr>(s: &str, flag: &str) -> Result<T> {
        s.replace('_', "")
            .parse()
            .map_err(|_| anyhow::anyhow!("{flag}: bad number {s:?}"))
    }
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v)),
            _ => (a.as_str(), None),
        };
        let mut value = || -> Result<&str> {
            match inline {
                Some(v) => Ok(v),
                None => val(&mut it, flag),
            }
        };
        match flag {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "--quick" => {}
            "--" => {}
            "--section" | "-s" => {
                for s in value()?.split(',').filter(|s| !s.is_empty()) {
                    sections.push(Section::parse(s)?);
                }
            }
            "--repeat" => o.repeat = num(value()?, flag)?,
            "--rounds" => o.rounds = num(value()?, flag)?,
            "--new-flows" => o.new_flows = num(value()?, flag)?,
            "--services" => o.scale_services = num(value()?, flag)?,
            "--backends" => o.scale_backends = num(value()?, flag)?,
            "--lab-secs" => o.lab_secs = num(value()?, flag)?,
            "--lab-rounds" => o.lab_rounds = num(value()?, flag)?,
            "--lab-threads" => o.lab_threads = num(value()?, flag)?,
            "--lab-paths" => {
                for p in value()?.split(',').filter(|s| !s.is_empty()) {
                    if !["direct", "xdp", "tc", "iptables", "pass", "userspace"].contains(&p) {
                        bail!("--lab-paths: direct, xdp, tc, iptables, pass, userspace; not {p:?}");
                    }
                    o.lab_paths.push(p.to_string());
                }
            }
            "--lab-wrk" => {
                let v = value()?;
                if !["on", "off", "only"].contains(&v) {
                    bail!("--lab-wrk: on, off or only, not {v:?}");
                }
                o.lab_wrk = v.to_string();
            }
            "--profile" => {
                let c = value()?;
                if ![
                    "tx",
                    "established",
                    "reply",
                    "floor",
                    "established-nocache",
                    "reply-nocache",
                    "new",
                ]
                .contains(&c)
                {
                    bail!(
                        "--profile: tx, established, reply, floor, established-nocache, reply-nocache or new, not {c:?}"
                    );
                }
                o.profile = Some(c.to_string());
                sections.push(Section::Xdp);
            }
            "--profile-secs" => o.profile_secs = num(value()?, flag)?,
            "--profile-fill" => o.profile_fill = num(value()?, flag)?,
            "--plain-runs" => o.plain_runs = num(value()?, flag)?,
            "--ab-object" => o.ab_object = Some(value()?.into()),
            "--gc-flows" => {
                for n in value()?.split(',').filter(|s| !s.is_empty()) {
                    let n: u32 = num(n, flag)?;
                    if !(1_000..=500_000).contains(&n) {
                        bail!("--gc-flows: 1000 to 500000 flows each, not {n}");
                    }
                    o.gc_flows.push(n);
                }
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    if !sections.is_empty() {
        o.sections = Section::ALL
            .into_iter()
            .filter(|s| sections.contains(s))
            .collect();
    }
    // Hard bounds, whatever the flags say.
    o.repeat = o.repeat.clamp(1_000, 10_000_000);
    o.rounds = o.rounds.clamp(1, 51);
    o.new_flows = o.new_flows.clamp(100, 50_000);
    o.scale_services = o.scale_services.clamp(2, 16_000);
    o.scale_backends = o.scale_backends.clamp(o.scale_services, 250_000);
    o.lab_secs = o.lab_secs.clamp(0.2, 30.0);
    o.lab_rounds = o.lab_rounds.clamp(1, 10);
    o.lab_threads = o.lab_threads.clamp(1, 32);
    o.profile_secs = o.profile_secs.clamp(0.5, 60.0);
    Ok(Some(o))
}

// ---------------------------------------------------------------------------------------------
// Stop flag

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGINT, SIGTERM and SIGHUP set the stop flag instead of killing the process, so the
/// benchmark unwinds and its Drop guards delete every namespace and unmount every bpffs.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// An error once a signal asked us to stop.
pub fn check_stop() -> Result<()> {
    if stopped() {
        bail!("interrupted by a signal; tearing down");
    }
    Ok(())
}

/// A deadline for a whole section or phase.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn after(d: Duration) -> Deadline {
        Deadline(Instant::now() + d)
    }
    pub fn passed(self) -> bool {
        Instant::now() >= self.0
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// The `p`-th percentile (0..=100), nearest rank.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Per-round ratios `a[i] / b[i]`, then their median: noise shared by a round cancels.
pub fn ratio_of_rounds(a: &[f64], b: &[f64]) -> f64 {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&r)
}

// ---------------------------------------------------------------------------------------------
// Tables

/// A plain text table: the first column left-aligned, the others right-aligned.
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(head: &[&str]) -> Table {
        Table {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.head.len();
        let mut w = vec![0usize; n];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |r: &[String]| {
            let mut s = String::new();
            for (i, wi) in w.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                if i == 0 {
                    let _ = write!(s, "{c:<wi$}");
                } else {
                    let _ = write!(s, "  {c:>wi$}");
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line(&self.head);
        out += &(w
            .iter()
            .enumerate()
            .map(|(i, wi)| "-".repeat(*wi + if i == 0 { 0 } else { 2 }))
            .collect::<String>()
            + "\n");
        for r in &self.rows {
            out += &line(r);
        }
        out
    }
}

pub fn ns(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

pub fn ratio(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.2}x")
    }
}

/// Thousands separators: 1234567 -> "1,234,567".
pub fn count(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn header(title: &str) {
    println!();
    println!("== {title} ==");
}

// ---------------------------------------------------------------------------------------------
// Targets

/// One DESIGN.md target and what this run measured for it.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// `Some(true)` met, `Some(false)` missed, `None` not judged (informational).
    pub met: Option<bool>,
}

static VERDICTS: Mutex<Vec<Verdict>> = Mutex::new(Vec::new());

pub fn verdict(what: &str, target: &str, measured: String, met: Option<bool>) {
    VERDICTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Verdict {
            what: what.into(),
            target: target.into(),
            measured,
            met,
        });
}

pub fn verdicts() -> Vec<Verdict> {
    VERDICTS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

pub fn print_summary() {
    let v = verdicts();
    if v.is_empty() {
        return;
    }
    header("Targets (DESIGN.md, \"Performance targets\")");
    let mut t = Table::new(&["what", "target", "measured", "result"]);
    for x in &v {
        t.row(vec![
            x.what.clone(),
            x.target.clone(),
            x.measured.clone(),
            match x.met {
                Some(true) => "met".into(),
                Some(false) => "MISSED".into(),
                None => "-".into(),
            },
        ]);
    }
    print!("{}", t.render());
}

/// Pin the calling thread to one CPU (best effort), so a timed run does not migrate.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The CPU used for timed single-threaded runs: the last one.
pub fn bench_cpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0)
}

/// The controller's Watch service (plaintext) on a loopback port of the current namespace,
/// as sections 5 and 8 run it in process.
pub struct LocalWatch {
    pub addr: std::net::SocketAddr,
    /// `true` ends the service and its streams; `subscribe()` for other tasks to stop with it.
    pub stop: tokio::sync::watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl LocalWatch {
    pub async fn start(
        publisher: &lb_controller::grpc::Publisher,
        agents: std::sync::Arc<lb_controller::grpc::Agents>,
    ) -> Result<LocalWatch> {
        use anyhow::Context as _;
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .await
            .context("bind the controller's gRPC port")?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let svc = lb_controller::grpc::StateService::new(publisher, agents)
            .insecure()
            .with_shutdown(stop_rx.clone())
            .into_server();
        let mut s2 = stop_rx;
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = s2.wait_for(|s| *s).await;
                    },
                ),
        );
        Ok(LocalWatch { addr, stop, task })
    }
}
