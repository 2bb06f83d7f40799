//! Section `lab`: real TCP through the node namespace, side by side in one run: direct to the
//! pod IPs, rpclb XDP and TC on the node's veths, kube-proxy-style iptables DNAT (in a second,
//! identical lab, so that netfilter's conntrack never touches the others), direct with a
//! trivial XDP_PASS, and the agent's userspace proxy.
//!
//! Three workloads with the bench's own client and server: a new connection per 64-byte
//! exchange with the client closing first, the same with the server closing first, and
//! keep-alive. Each path connects from its own client address (see `source_of`). Then the
//! "wrk and nginx" part (`wrk.rs`) through direct, TC and userspace. Each run is bounded by
//! time (`--lab-secs`), every socket operation by a timeout, and the order of the paths
//! rotates each round.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{TcAttachType, XdpMode};
use lb_agent::datapath::DatapathConfig;
use lb_agent::userspace::{ProxyOptions, UserspaceProxy};
use rpclb_tests::lab::{self, Netns};

use super::cpu::{PerConn, RunCpu, Snap};
use super::gc::AgentGc;
use super::live::{BACKEND_PORT, PinnedDp, Topo, VIP, VIP_PORT, lab_service};
use super::sink::PassProg;
use super::{
    Opts, Table, check_stop, count, header, median, ratio, ratio_of_rounds, stopped, verdict,
};

const MSG: usize = 64;
const TICK: Duration = Duration::from_millis(50);
const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// A client thread gives up a run after this many failed attempts.
const MAX_ERRORS: u64 = 2_000;

// ---------------------------------------------------------------------------------------------
// Server

/// A request/response server in a backend namespace: `workers` threads accept on one
/// listener (as many as there are client threads, so keep-alive connections never queue); each serves a connection until the client closes it. Stops and joins on drop.
struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, port: u16, workers: usize) -> Result<Server> {
        let l = ns
            .run(|| -> io::Result<TcpListener> {
                let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?
            .with_context(|| format!("bind :{port} in {}", ns.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..workers {
            let (l, stop) = (l.try_clone()?, stop.clone());
            threads.push(std::thread::spawn(move || accept_loop(&l, &stop)));
        }
        Ok(Server { stop, threads })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn readable(fd: &impl AsRawFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, TICK.as_millis() as i32) > 0 }
}

fn accept_loop(l: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if !readable(l) {
            continue;
        }
        match l.accept() {
            Ok((c, _)) => {
                let _ = serve(c, stop);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

/// Fill `buf`; `Ok(false)` on a clean EOF before the first byte, on stop, or after 5 s idle.
fn read_msg(c: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> io::Result<bool> {
    let mut got = 0;
    let mut idle = Duration::ZERO;
    while got < buf.len() {
        if stop.load(Ordering::Relaxed) || idle > Duration::from_secs(5) {
            return Ok(false);
        }
        match c.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                got += n;
                idle = Duration::ZERO;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                idle += TICK
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn serve(mut c: TcpStream, stop: &AtomicBool) -> io::Result<()> {
    c.set_nonblocking(false)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(TICK))?;
    c.set_write_timeout(Some(OP_TIMEOUT))?;
    let mut buf = [0u8; MSG];
    let resp = [b'R'; MSG];
    while read_msg(&mut c, &mut buf, stop)? {
        c.write_all(&resp)?;
        if buf[0] == b'S' {
            // The server closes first (as after `Connection: close`): its TIME_WAIT stays here.
            return Ok(());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Clients

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// Connect, one exchange, the client closes first.
    Close,
    /// Connect, one exchange, the server closes first; the client closes on its EOF.
    ServerClose,
    KeepAlive,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::Close => "new connections/s (client closes first)",
            Workload::ServerClose => "new connections/s (server closes first)",
            Workload::KeepAlive => "keep-alive requests/s",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    ok: u64,
    errors: u64,
    secs: f64,
    /// The userspace path: CPU time of the proxy's threads in the run, in ns.
    proxy_cpu_ns: u64,
    /// The wrk runs: where the CPU went.
    cpu: RunCpu,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }
}

fn exchange(s: &mut TcpStream, kind: u8) -> io::Result<()> {
    s.write_all(&[kind; MSG])?;
    let mut r = [0u8; MSG];
    s.read_exact(&mut r)?;
    Ok(())
}

fn connect(t: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&t, OP_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(OP_TIMEOUT))?;
    s.set_write_timeout(Some(OP_TIMEOUT))?;
    Ok(s)
}

fn client_thread(id: usize, targets: &[SocketAddr], w: Workload, until: Instant) -> Outcome {
    let start = Instant::now();
    let mut o = Outcome::default();
    let mut k = id;
    let mut conn: Option<TcpStream> = None;
    while Instant::now() < until && !stopped() && o.errors < MAX_ERRORS {
        let t = targets[k % targets.len()];
        let r = match w {
            Workload::Close => {
                k += 1;
                // One exchange, then the client closes first (as an HTTP/1.1 client does
                // after `Connection: close`), so TIME_WAIT stays on the client, where
                // tcp_tw_reuse recycles it; a server-side TIME_WAIT would make a reused client
                // port's SYN wait for a 1 s retransmit.
                connect(t).and_then(|mut s| exchange(&mut s, b'C'))
            }
            Workload::ServerClose => {
                k += 1;
                // The server closes after its response; the client waits for that EOF.
                connect(t).and_then(|mut s| {
                    exchange(&mut s, b'S')?;
                    match s.read(&mut [0u8; 1])? {
                        0 => Ok(()),
                        _ => Err(io::ErrorKind::InvalidData.into()),
                    }
                })
            }
            Workload::KeepAlive => {
                if conn.is_none() {
                    k += 1;
                    conn = connect(t).ok();
                }
                match conn.as_mut() {
                    Some(s) => exchange(s, b'K'),
                    None => Err(io::ErrorKind::NotConnected.into()),
                }
            }
        };
        match r {
            Ok(()) => o.ok += 1,
            Err(_) => {
                o.errors += 1;
                conn = None;
            }
        }
    }
    o.secs = start.elapsed().as_secs_f64();
    o
}

/// `threads` client threads in `ns` for `secs`; the summed outcome.
fn run_clients(
    ns: &Netns,
    targets: &[SocketAddr],
    w: Workload,
    threads: usize,
    secs: f64,
) -> Result<Outcome> {
    let parts = ns.run(|| {
        let until = Instant::now() + Duration::from_secs_f64(secs);
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|i| s.spawn(move || client_thread(i, targets, w, until)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect::<Vec<_>>()
        })
    })?;
    Ok(Outcome {
        ok: parts.iter().map(|p| p.ok).sum(),
        errors: parts.iter().map(|p| p.errors).sum(),
        secs: parts.iter().map(|p| p.secs).fold(0.0, f64::max),
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------------------------
// Paths

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Direct,
    /// Direct, with a trivial XDP_PASS program on every node-side veth: the control that
    /// shows what native XDP on a veth costs by itself.
    DirectPass,
    Xdp,
    /// rpclb's TC program (TCX ingress) on the same veths: no skb-to-XDP copy.
    Tc,
    Iptables,
    Userspace,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct to pod IPs",
            Path::DirectPass => "direct + XDP_PASS",
            Path::Xdp => "VIP via rpclb XDP",
            Path::Tc => "VIP via rpclb TC",
            Path::Iptables => "VIP via iptables DNAT",
            Path::Userspace => "VIP via rpclb userspace",
        }
    }
}

/// Attach `rpclb_xdp` natively to every node-side veth of `topo`, from inside the node.
fn attach_xdp(topo: &Topo, dp: &mut PinnedDp) -> Result<Vec<XdpLinkId>> {
    let names: Vec<String> = topo
        .lab()
        .node_ifaces()
        .iter()
        .map(|i| i.name.clone())
        .collect();
    let p = dp.dp().xdp_program();
    topo.lab().node().run(|| -> Result<Vec<XdpLinkId>> {
        let mut ids = Vec::new();
        for n in &names {
            match p.attach(n, XdpMode::Driver) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        let _ = p.detach(id);
                    }
                    return Err(anyhow::Error::new(e).context(format!("attach XDP to {n}")));
                }
            }
        }
        Ok(ids)
    })?
}

/// Attach `rpclb_tc` (TCX ingress) to every node-side veth of `topo`, from inside the node.
fn attach_tc(topo: &Topo, dp: &mut PinnedDp) -> Result<Vec<SchedClassifierLinkId>> {
    let names: Vec<String> = topo
        .lab()
        .node_ifaces()
        .iter()
        .map(|i| i.name.clone())
        .collect();
    let p = dp.dp().tc_program();
    topo.lab()
        .node()
        .run(|| -> Result<Vec<SchedClassifierLinkId>> {
            let mut ids = Vec::new();
            for n in &names {
                match p.attach(n, TcAttachType::Ingress) {
                    Ok(id) => ids.push(id),
                    Err(e) => {
                        for id in ids {
                            let _ = p.detach(id);
                        }
                        return Err(anyhow::Error::new(e).context(format!("attach TC to {n}")));
                    }
                }
            }
            Ok(ids)
        })?
}

fn detach_tc(topo: &Topo, dp: &mut PinnedDp, ids: Vec<SchedClassifierLinkId>) -> Result<()> {
    let p = dp.dp().tc_program();
    topo.lab().node().run(|| -> Result<()> {
        for id in ids {
            p.detach(id)?;
        }
        Ok(())
    })?
}

fn detach_xdp(topo: &Topo, dp: &mut PinnedDp, ids: Vec<XdpLinkId>) -> Result<()> {
    let p = dp.dp().xdp_program();
    topo.lab().node().run(|| -> Result<()> {
        for id in ids {
            p.detach(id)?;
        }
        Ok(())
    })?
}

/// kube-proxy-style DNAT for the VIP in the node of `topo`. `Ok(false)` when iptables is not
/// usable here (missing binary or nat table).
fn install_iptables(topo: &Topo) -> Result<bool> {
    if lab::cmd("iptables", &["-V"]).is_err() {
        println!("iptables not found: skipping the iptables DNAT comparison");
        return Ok(false);
    }
    let node = topo.lab().node();
    let ips: Vec<Ipv4Addr> = topo.lab().backends().iter().map(|h| h.ip()).collect();
    let n = ips.len();
    for (i, ip) in ips.iter().enumerate() {
        let vip = format!("{VIP}/32");
        let port = VIP_PORT.to_string();
        let to = format!("{ip}:{BACKEND_PORT}");
        let prob = format!("{:.5}", 1.0 / (n - i) as f64);
        let mut args = vec![
            "-w",
            "5",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            &vip,
            "-p",
            "tcp",
            "--dport",
            &port,
        ];
        if i + 1 < n {
            args.extend([
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &prob,
            ]);
        }
        args.extend(["-j", "DNAT", "--to-destination", &to]);
        if let Err(e) = node.exec("iptables", &args) {
            println!("iptables DNAT unavailable in the lab ({e}): skipping that comparison");
            return Ok(false);
        }
    }
    Ok(true)
}

/// Packets that hit the DNAT rules so far.
fn iptables_hits(topo: &Topo) -> u64 {
    topo.lab()
        .node()
        .exec(
            "iptables",
            &["-w", "5", "-t", "nat", "-L", "PREROUTING", "-n", "-v", "-x"],
        )
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("DNAT"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Section 4

/// Client source address of each path (10.244.1.`n`), so that no path meets the TIME_WAIT
/// entries another path left on the client or the backends. A backend's TIME_WAIT from a
/// direct connection (client:port -> pod:8080) accepts a new SYN on the same tuple only if its
/// sequence number or timestamp is newer; the client derives both from the address it connects
/// to, so a SYN through the VIP (DNATed onto that tuple) has an unrelated ISN and timestamp
/// offset, is refused about half the time, and waits for a 1 s SYN retransmit.
/// `RPCLB_BENCH_SHARED_SOURCE=1` shares one source, to show that.
fn source_of(p: Path) -> u8 {
    if std::env::var_os("RPCLB_BENCH_SHARED_SOURCE").is_some() {
        return 2;
    }
    match p {
        Path::Direct => 2,
        Path::DirectPass => 3,
        Path::Xdp => 4,
        Path::Tc => 5,
        Path::Iptables => 2,
        Path::Userspace => 6,
    }
}

/// Extra client addresses (10.244.1.3-9) and the node's permanent neighbour entries for them.
fn add_client_sources(t: &Topo) -> Result<()> {
    let c = t.lab().client();
    let mac = c
        .iface
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    for n in 3..=9u8 {
        let ip = Ipv4Addr::new(10, 244, 1, n).to_string();
        c.ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &c.iface.name])?;
        t.lab().node().ip(&[
            "neigh",
            "replace",
            &ip,
            "lladdr",
            &mac,
            "dev",
            &c.node_iface.name,
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

/// Route the client's traffic to pods and VIPs from 10.244.1.`n`.
fn use_source(t: &Topo, n: u8) -> Result<()> {
    let c = t.lab().client();
    let src = Ipv4Addr::new(10, 244, 1, n).to_string();
    let via = c.node_iface.ip.to_string();
    for net in ["10.244.0.0/16", "10.96.0.0/16"] {
        c.ns.ip(&["route", "replace", net, "via", &via, "src", &src])?;
    }
    Ok(())
}

/// CPU time so far of this process's userspace proxy threads (named `rpclb-proxy*`), from
/// each thread's schedstat, in ns. A proxy runs for one run only, so this is that run's.
pub(super) fn proxy_cpu_ns() -> u64 {
    thread_sched(|c| c.starts_with("rpclb-proxy")).cpu_ns
}

/// Sums of this process's threads' schedstat (`/proc/self/task/*/schedstat`) so far.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Sched {
    /// Time on a CPU, ns.
    pub cpu_ns: u64,
    /// Time runnable but waiting for a CPU (the run queue), ns.
    pub wait_ns: u64,
    /// Times the thread was put on a CPU.
    pub slices: u64,
}

impl Sched {
    pub fn since(self, before: Sched) -> Sched {
        Sched {
            cpu_ns: self.cpu_ns.saturating_sub(before.cpu_ns),
            wait_ns: self.wait_ns.saturating_sub(before.wait_ns),
            slices: self.slices.saturating_sub(before.slices),
        }
    }
}

/// [`Sched`] of this process's threads whose name (`comm`) passes `keep`.
pub(super) fn thread_sched(keep: impl Fn(&str) -> bool) -> Sched {
    let mut out = Sched::default();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        if !std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| keep(c.trim())) {
            continue;
        }
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        let v: Vec<u64> = s
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [cpu, wait, slices, ..] = v[..] {
            out.cpu_ns += cpu;
            out.wait_ns += wait;
            out.slices += slices;
        }
    }
    out
}

/// Options of the userspace proxy in the lab (and the gRPC section).
pub(super) fn proxy_options() -> ProxyOptions {
    let mut o = ProxyOptions::default();
    // For experiments: RPCLB_BENCH_US_THREADS=N runs the proxy on N worker threads.
    if let Some(n) = std::env::var("RPCLB_BENCH_US_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        o.worker_threads = n;
    }
    // RPCLB_BENCH_US_RUNTIME=shared|per-thread: the proxy's runtime layout.
    match std::env::var("RPCLB_BENCH_US_RUNTIME").as_deref() {
        Ok("shared") => o.per_thread_runtimes = false,
        Ok("per-thread") => o.per_thread_runtimes = true,
        _ => {}
    }
    o
}

pub fn section_lab(opts: &Opts) -> Result<()> {
    header(
        "4. Netns lab throughput: rpclb XDP, TC and userspace vs direct routing vs iptables DNAT",
    );
    let want = |name: &str| opts.lab_paths.is_empty() || opts.lab_paths.iter().any(|p| p == name);
    // Lab A: direct and xdp. Lab B: iptables.
    let a = Topo::new(3)?;
    let b = if want("iptables") && opts.lab_wrk != "only" {
        Some(Topo::new(3)?)
    } else {
        None
    };
    for t in std::iter::once(&a).chain(b.as_ref()) {
        // Inside the lab's own client namespaces only.
        t.lab().client().ns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65535",
            ],
        )?;
    }
    add_client_sources(&a)?;
    // The userspace proxy's upstream connections end in TIME_WAIT on the node when the client
    // closes first; without reuse, connect() then searches a port range full of them (its CPU
    // per connection grew from ~60 us to ~2 ms within a few runs). docs/operations.md
    // recommends this for the userspace data path; no other path opens connections from the
    // node. RPCLB_BENCH_NODE_TW_REUSE=0 leaves the default (2: loopback only).
    if std::env::var("RPCLB_BENCH_NODE_TW_REUSE").as_deref() != Ok("0") {
        a.lab()
            .node()
            .exec("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    }
    let mut servers_a = Vec::new();
    for h in a.lab().backends() {
        servers_a.push(Server::start(&h.ns, BACKEND_PORT, opts.lab_threads + 2)?);
    }
    let mut servers_b = Vec::new();
    for t in b.iter() {
        for h in t.lab().backends() {
            servers_b.push(Server::start(&h.ns, BACKEND_PORT, opts.lab_threads + 2)?);
        }
    }
    let mut cfg = DatapathConfig::small(a.pin_dir("lab"));
    // RPCLB_BENCH_LAB_CT=N: the conntrack map's size (the lab's default: 65,536; the agent's:
    // 524,288). A full LRU map evicts on every new flow's insert.
    if let Some(n) = std::env::var("RPCLB_BENCH_LAB_CT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.max_conntrack = n;
    }
    println!("conntrack map: {} entries", count(cfg.max_conntrack as u64));
    let mut dp = PinnedDp::load(&cfg)?;
    a.mark_xdp_targets(dp.dp())?;
    dp.dp().writer().upsert_service(&lab_service(&a))?;
    let have_ipt = match &b {
        Some(b) => install_iptables(b)?,
        None => false,
    };

    let direct: Vec<SocketAddr> = a
        .lab()
        .backends()
        .iter()
        .map(|h| SocketAddr::from((h.ip(), BACKEND_PORT)))
        .collect();
    let vip = vec![SocketAddr::from((VIP, VIP_PORT))];
    let mut paths = vec![Path::Direct];
    for (name, p) in [("xdp", Path::Xdp), ("tc", Path::Tc)] {
        if want(name) {
            paths.push(p);
        }
    }
    if have_ipt {
        paths.push(Path::Iptables);
    }
    if want("pass") {
        paths.push(Path::DirectPass);
    }
    if want("userspace") {
        paths.push(Path::Userspace);
    }
    let at = |p: Path| paths.iter().position(|&x| x == p);
    let pass = PassProg::load()?;
    let workloads = [Workload::Close, Workload::ServerClose, Workload::KeepAlive];
    let threads = opts.lab_threads;
    let debug = std::env::var_os("RPCLB_BENCH_DEBUG").is_some();
    // Sets path `p` up, runs `f` through it, takes it down.
    let on_path = |p: Path, dp: &mut PinnedDp, f: &mut dyn FnMut() -> Result<Outcome>| {
        check_stop()?;
        if p != Path::Iptables {
            use_source(&a, source_of(p))?;
        }
        match p {
            Path::Direct | Path::Iptables => f(),
            Path::DirectPass => {
                let names: Vec<u32> = a.lab().node_ifaces().iter().map(|i| i.ifindex).collect();
                let links = a.lab().node().run(|| {
                    names
                        .iter()
                        .map(|&i| pass.attach_here(i))
                        .collect::<Result<Vec<_>>>()
                })??;
                let r = f();
                drop(links);
                r
            }
            Path::Xdp => {
                let ids = attach_xdp(&a, dp)?;
                let r = f();
                detach_xdp(&a, dp, ids)?;
                r
            }
            Path::Tc => {
                let ids = attach_tc(&a, dp)?;
                let r = f();
                detach_tc(&a, dp, ids)?;
                r
            }
            Path::Userspace => {
                // The agent's userspace proxy in the node namespace, for this run only.
                let svc = lb_api::DesiredState {
                    services: vec![lab_service(&a)],
                };
                let proxy = a.lab().node().run(|| -> Result<UserspaceProxy> {
                    let p = UserspaceProxy::start(proxy_options())
                        .map_err(|e| anyhow::anyhow!("userspace proxy: {e}"))?;
                    p.apply(&svc)
                        .map_err(|e| anyhow::anyhow!("userspace proxy: {e}"))?;
                    Ok(p)
                })??;
                let r = f().map(|mut o| {
                    o.proxy_cpu_ns = proxy_cpu_ns();
                    o
                });
                proxy
                    .shutdown()
                    .map_err(|e| anyhow::anyhow!("userspace proxy: {e}"))?;
                r
            }
        }
    };
    let run = |p: Path, w: Workload, secs: f64, dp: &mut PinnedDp| -> Result<Outcome> {
        let (ns, targets) = match p {
            Path::Direct | Path::DirectPass => (&a.lab().client().ns, &direct),
            Path::Iptables => (&b.as_ref().expect("lab B").lab().client().ns, &vip),
            _ => (&a.lab().client().ns, &vip),
        };
        on_path(p, dp, &mut || run_clients(ns, targets, w, threads, secs))
    };
    let redirects_before = reason_count(&mut dp, "fwd_redirect");
    let own = opts.lab_wrk != "only";
    // results[w][p] = outcome per round
    let mut results = vec![vec![Vec::<Outcome>::new(); paths.len()]; workloads.len()];
    if own {
        // Warm-up: each path once, briefly, and a check that it works at all.
        for &p in &paths {
            let o = run(p, Workload::Close, 0.3, &mut dp)?;
            anyhow::ensure!(
                o.ok > 0,
                "{}: no connection succeeded in the warm-up ({} errors)",
                p.label(),
                o.errors
            );
        }
        for round in 0..opts.lab_rounds {
            for (wi, &w) in workloads.iter().enumerate() {
                for k in 0..paths.len() {
                    let pi = (k + round) % paths.len();
                    let o = run(paths[pi], w, opts.lab_secs, &mut dp)?;
                    if debug {
                        let t = if paths[pi] == Path::Iptables {
                            b.as_ref().expect("lab B")
                        } else {
                            &a
                        };
                        debug_tcp_counters(t, &format!("{:?} {:?}", paths[pi], w));
                    }
                    results[wi][pi].push(o);
                }
            }
        }
    }
    let redirects = reason_count(&mut dp, "fwd_redirect") - redirects_before;

    // ratios[w][p] = median of per-round ratios of path p to direct
    let pd = at(Path::Direct).expect("direct");
    let per: Vec<Vec<Vec<f64>>> = (0..workloads.len())
        .map(|wi| {
            (0..paths.len())
                .map(|pi| results[wi][pi].iter().map(Outcome::rate).collect())
                .collect()
        })
        .collect();
    let vs = |wi: usize, p: Path, base: Path| -> f64 {
        match (at(p), at(base)) {
            (Some(x), Some(y)) if own => ratio_of_rounds(&per[wi][x], &per[wi][y]),
            _ => f64::NAN,
        }
    };
    if own {
        println!(
            "{} client threads, {:.1} s per run, {} round(s), paths rotated each round; 3 \
             backends, 64-byte requests and responses; every CPU shared by clients, servers and \
             forwarding; rate: median (min..max) of the rounds; ratios: median of per-round \
             ratios; each path has its own client source address",
            threads, opts.lab_secs, opts.lab_rounds
        );
        let mut head = vec!["workload".to_string()];
        head.extend(paths.iter().map(|p| format!("{} /s", p.label())));
        head.extend(
            paths
                .iter()
                .filter(|&&p| p != Path::Direct)
                .map(|p| format!("{} / direct", p.label())),
        );
        head.push("errors".into());
        let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
        let mut t = Table::new(&head_refs);
        for (wi, w) in workloads.iter().enumerate() {
            let mut row = vec![w.label().to_string()];
            for p in &per[wi] {
                row.push(format!(
                    "{} ({}..{})",
                    count(median(p) as u64),
                    count(super::min(p) as u64),
                    count(super::max(p) as u64)
                ));
            }
            for (pi, _) in paths.iter().enumerate().filter(|&(pi, _)| pi != pd) {
                row.push(ratio(ratio_of_rounds(&per[wi][pi], &per[wi][pd])));
            }
            let errors: u64 = results[wi]
                .iter()
                .flat_map(|r| r.iter().map(|o| o.errors))
                .sum();
            row.push(count(errors));
            t.row(row);
        }
        print!("{}", t.render());
        if let Some(pu) = at(Path::Userspace) {
            println!(
                "{}",
                proxy_cpu_line(&workloads.map(Workload::label), &results, pu)
            );
        }
        let hits = b.as_ref().filter(|_| have_ipt).map_or(0, iptables_hits);
        let nonzero: Vec<String> = dp
            .dp()
            .writer()
            .reasons()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, v)| *v > 0)
            .map(|(n, v)| format!("{n}={}", count(v)))
            .collect();
        println!("rpclb counters: {}", nonzero.join(" "));
        println!(
            "proof of path: rpclb redirected {} packets; the iptables DNAT rules matched {} \
             connections",
            count(redirects),
            count(hits)
        );
    }

    // The wrk and nginx part: direct, TC and userspace.
    let mut wrk_ratios: Vec<(Path, [f64; 2])> = Vec::new();
    if opts.lab_wrk != "off" {
        match super::wrk::missing_tools() {
            Some(m) => println!(
                "wrk and nginx: {m} not installed (`cargo xtask setup` installs them as root): \
                 skipping those rows"
            ),
            None => {
                drop(servers_a);
                servers_a = Vec::new();
                let wpaths: Vec<Path> = [Path::Direct, Path::Tc, Path::Userspace]
                    .into_iter()
                    .filter(|p| at(*p).is_some())
                    .collect();
                wrk_ratios = wrk_part(opts, &a, &wpaths, &mut dp, &on_path)?;
            }
        }
    }
    let wr = |p: Path, wi: usize| -> f64 {
        wrk_ratios
            .iter()
            .find(|(x, _)| *x == p)
            .map_or(f64::NAN, |(_, r)| r[wi])
    };

    let (wc, ws, wk) = (0, 1, 2);
    if own && at(Path::Xdp).is_some() {
        let (x, xi, xp) = (
            vs(wc, Path::Xdp, Path::Direct),
            vs(wc, Path::Xdp, Path::Iptables),
            vs(wc, Path::Xdp, Path::DirectPass),
        );
        verdict(
            "netns lab, new connections/s through the VIP",
            ">= 0.9x direct, > iptables",
            format!(
                "{} direct, {} iptables ({} direct+PASS)",
                ratio(x),
                ratio(xi),
                ratio(xp)
            ),
            Some(x >= 0.9 && (!have_ipt || xi > 1.0)),
        );
        let (k, ki, kp) = (
            vs(wk, Path::Xdp, Path::Direct),
            vs(wk, Path::Xdp, Path::Iptables),
            vs(wk, Path::Xdp, Path::DirectPass),
        );
        verdict(
            "netns lab, keep-alive requests/s",
            ">= 0.97x direct",
            format!(
                "{} direct, {} iptables ({} direct+PASS)",
                ratio(k),
                ratio(ki),
                ratio(kp)
            ),
            Some(k >= 0.97),
        );
    }
    if own && at(Path::Tc).is_some() {
        let (c, ci) = (
            vs(wc, Path::Tc, Path::Direct),
            vs(wc, Path::Tc, Path::Iptables),
        );
        verdict(
            "netns lab, new connections/s through the VIP, TC mode",
            ">= 0.9x direct, > iptables",
            format!("{} direct, {} iptables", ratio(c), ratio(ci)),
            Some(c >= 0.9 && (!have_ipt || ci > 1.0)),
        );
        let k = vs(wk, Path::Tc, Path::Direct);
        verdict(
            "netns lab, keep-alive requests/s, TC mode",
            ">= 0.97x direct",
            format!("{} direct", ratio(k)),
            Some(k >= 0.97),
        );
    }
    if at(Path::Tc).is_some() {
        let (own_s, own_c, w) = (
            vs(ws, Path::Tc, Path::Direct),
            vs(wc, Path::Tc, Path::Direct),
            wr(Path::Tc, 0),
        );
        verdict(
            "new connections/s through a VIP in TC mode vs direct, wrk and nginx with \
             `Connection: close` (the server closes first)",
            ">= 0.95x in both (wrk and nginx; the bench, server closes first)",
            format!(
                "wrk+nginx {}; bench {} (server closes first), {} (client closes first)",
                ratio(w),
                ratio(own_s),
                ratio(own_c)
            ),
            (!w.is_nan() || !own_s.is_nan()).then(|| {
                [w, own_s]
                    .iter()
                    .filter(|v| !v.is_nan())
                    .all(|&v| v >= 0.95)
            }),
        );
    }
    if at(Path::Userspace).is_some() {
        let both = |vals: [f64; 2]| {
            (vals.iter().any(|v| !v.is_nan()))
                .then(|| vals.iter().filter(|v| !v.is_nan()).all(|&v| v >= 0.8))
        };
        let (k, wk_) = (
            vs(wk, Path::Userspace, Path::Direct),
            wr(Path::Userspace, 1),
        );
        verdict(
            "userspace L4 proxy, keep-alive requests/s vs direct",
            ">= 0.8x in both (the bench; wrk and nginx)",
            format!("bench {}; wrk+nginx {}", ratio(k), ratio(wk_)),
            both([k, wk_]),
        );
        let (c, s, wc_) = (
            vs(wc, Path::Userspace, Path::Direct),
            vs(ws, Path::Userspace, Path::Direct),
            wr(Path::Userspace, 0),
        );
        verdict(
            "userspace L4 proxy, new connections/s vs direct",
            ">= 0.8x in both (the bench; wrk and nginx)",
            format!(
                "bench {} (client closes first; server first {}); wrk+nginx {}",
                ratio(c),
                ratio(s),
                ratio(wc_)
            ),
            both([c, wc_]),
        );
        if own {
            verdict(
                "userspace L4 path, keep-alive",
                ">= 0.5x direct",
                format!("{} direct (new connections: {} direct)", ratio(k), ratio(c)),
                Some(k >= 0.5),
            );
        }
    }
    drop(servers_a);
    drop(servers_b);
    Ok(())
}

/// Sets a path up, runs the closure through it, takes it down.
type OnPath<'a> =
    dyn Fn(Path, &mut PinnedDp, &mut dyn FnMut() -> Result<Outcome>) -> Result<Outcome> + 'a;

/// wrk against nginx through `paths` (direct first), rounds rotated as in the own part;
/// prints its table and returns, per path, the median per-round ratio to direct for
/// `Connection: close` and keep-alive.
fn wrk_part(
    opts: &Opts,
    a: &Topo,
    paths: &[Path],
    dp: &mut PinnedDp,
    on_path: &OnPath<'_>,
) -> Result<Vec<(Path, [f64; 2])>> {
    let mut hosts: Vec<(&Netns, Ipv4Addr)> =
        a.lab().backends().iter().map(|h| (&h.ns, h.ip())).collect();
    // RPCLB_BENCH_WRK_BACKENDS=N: only the first N backends, for the VIP's service too. With
    // one, every path has the same fan-out (all wrk threads on one nginx), so that the paths
    // differ only in the node's forwarding: direct gives each wrk thread its own backend,
    // while the VIP spreads every thread's connections over all of them.
    if let Some(n) = std::env::var("RPCLB_BENCH_WRK_BACKENDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n >= 1 && n < hosts.len())
    {
        hosts.truncate(n);
        let mut svc = lab_service(a);
        svc.backends.truncate(n);
        dp.dp().writer().upsert_service(&svc)?;
        println!("wrk and nginx: {n} backend(s) only (RPCLB_BENCH_WRK_BACKENDS)");
    }
    let _nginx = super::wrk::Nginx::start(&hosts, BACKEND_PORT)?;
    let pods: Vec<SocketAddrV4> = hosts
        .iter()
        .map(|(_, ip)| SocketAddrV4::new(*ip, BACKEND_PORT))
        .collect();
    let secs = opts.lab_secs.ceil().max(1.0) as u64;
    let client = &a.lab().client().ns;
    let debug = std::env::var_os("RPCLB_BENCH_DEBUG").is_some();
    let servers = _nginx.pids();
    let softirqd = super::cpu::ksoftirqd_pids();
    // The agent's GC, as a deployed agent runs it beside the data path (all paths: its cost
    // on the direct runs is a scan of what the TC runs left).
    let gc_every = super::gc::interval_from_env()?;
    let gc = match gc_every.map(|every| AgentGc::start(&a.pin_dir("lab"), every)) {
        Some(Ok(g)) => Some(g),
        Some(Err(e)) => {
            println!("wrk and nginx: the agent's GC did not start ({e:#}); measuring without it");
            None
        }
        None => None,
    };
    // RPCLB_BENCH_PERF=DIR: a system-wide `perf record -a -g` over every measured wrk run,
    // one file per path, mode and round.
    let perf_dir = std::env::var_os("RPCLB_BENCH_PERF").map(std::path::PathBuf::from);
    // The TC runs' requests and the data path's counters over them, by mode (close?).
    type Counted = BTreeMap<bool, (u64, BTreeMap<&'static str, u64>)>;
    let counted: RefCell<Counted> = RefCell::new(BTreeMap::new());
    let reasons = |dp: &mut PinnedDp| dp.dp().writer().reasons().unwrap_or_default();
    let one = |p: Path, close: bool, dp: &mut PinnedDp, tag: Option<usize>| -> Result<Outcome> {
        let mut f = || -> Result<Outcome> {
            let (url, pods) = match p {
                Path::Direct => (format!("http://{}/", pods[0]), &pods[..]),
                _ => (format!("http://{VIP}:{VIP_PORT}/"), &[][..]),
            };
            let perf = match (&perf_dir, tag) {
                (Some(d), Some(round)) => Some(super::wrk::perf_record(
                    &d.join(format!(
                        "wrk-{:?}-{}-r{round}.data",
                        p,
                        if close { "close" } else { "keepalive" }
                    )),
                    secs,
                )?),
                _ => None,
            };
            let before = Snap::take(&servers, &softirqd);
            let o = super::wrk::run(client, &url, pods, close, secs)?;
            let after = Snap::take(&servers, &softirqd);
            if let Some(c) = perf {
                super::wrk::perf_wait(c, secs)?;
            }
            let done = if o.requests > 0 {
                o.requests
            } else {
                (o.rate * secs as f64) as u64
            };
            Ok(Outcome {
                ok: done,
                errors: o.errors,
                // wrk's own rate: its requests over its own measured time.
                secs: if o.rate > 0.0 {
                    done as f64 / o.rate
                } else {
                    secs as f64
                },
                proxy_cpu_ns: 0,
                cpu: before.run(after, (o.cpu_ns, o.cpu_sys_ns), done),
            })
        };
        let before = reasons(dp);
        let o = on_path(p, dp, &mut f)?;
        if tag.is_some() && p == Path::Tc {
            let mut c = counted.borrow_mut();
            let e = c.entry(close).or_default();
            e.0 += o.ok;
            for ((n, v), (_, b)) in reasons(dp).into_iter().zip(before) {
                *e.1.entry(n).or_default() += v.saturating_sub(b);
            }
        }
        Ok(o)
    };
    // Warm-up, and a check that every path answers.
    for &p in paths {
        let o = one(p, true, dp, None)?;
        anyhow::ensure!(o.ok > 0, "wrk through {}: no request succeeded", p.label());
    }
    let modes = [true, false];
    let mut res = vec![vec![Vec::<Outcome>::new(); paths.len()]; modes.len()];
    for round in 0..opts.lab_rounds {
        for (mi, &close) in modes.iter().enumerate() {
            for k in 0..paths.len() {
                let pi = (k + round) % paths.len();
                let o = one(paths[pi], close, dp, Some(round))?;
                if debug {
                    debug_tcp_counters(a, &format!("wrk {:?} close={close}", paths[pi]));
                }
                res[mi][pi].push(o);
            }
        }
    }
    println!(
        "wrk and nginx: wrk -t{} -c{} -d{secs}s, nginx-light (one worker per backend, a {}-byte \
         body, keep-alive on); `Connection: close` makes nginx close first; direct: each wrk \
         thread on one pod address; {} round(s)",
        super::wrk::WRK_THREADS,
        super::wrk::WRK_CONNS,
        super::wrk::BODY,
        opts.lab_rounds
    );
    let mut head = vec!["wrk and nginx".to_string()];
    head.extend(paths.iter().map(|p| format!("{} /s", p.label())));
    head.extend(paths[1..].iter().map(|p| format!("{} / direct", p.label())));
    head.push("errors".into());
    let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
    let mut t = Table::new(&head_refs);
    let mut out: Vec<(Path, [f64; 2])> = paths[1..].iter().map(|&p| (p, [f64::NAN; 2])).collect();
    for (mi, label) in ["requests/s, Connection: close", "keep-alive requests/s"]
        .iter()
        .enumerate()
    {
        let per: Vec<Vec<f64>> = res[mi]
            .iter()
            .map(|r| r.iter().map(Outcome::rate).collect())
            .collect();
        let mut row = vec![label.to_string()];
        for p in &per {
            row.push(format!(
                "{} ({}..{})",
                count(median(p) as u64),
                count(super::min(p) as u64),
                count(super::max(p) as u64)
            ));
        }
        for (i, o) in out.iter_mut().enumerate() {
            o.1[mi] = ratio_of_rounds(&per[i + 1], &per[0]);
            row.push(ratio(o.1[mi]));
        }
        let errors: u64 = res[mi]
            .iter()
            .flat_map(|r| r.iter().map(|o| o.errors))
            .sum();
        row.push(count(errors));
        t.row(row);
    }
    print!("{}", t.render());
    if let Some(pu) = paths.iter().position(|&p| p == Path::Userspace) {
        let labels = ["Connection: close", "keep-alive"];
        println!("wrk: {}", proxy_cpu_line(&labels, &res, pu));
    }
    let gc_totals = gc.map(AgentGc::stop);
    print_cpu(paths, &res, gc_every, gc_totals);
    for (close, (n, r)) in counted.into_inner().into_iter().rev() {
        let per = |k: &str| r.get(k).copied().unwrap_or(0) as f64 / n.max(1) as f64;
        let runs = per("nat_forward") + per("nat_reverse");
        let other: Vec<String> = r
            .iter()
            .filter(|&(k, &v)| {
                v > 0 && !matches!(*k, "nat_forward" | "nat_reverse" | "fwd_redirect")
            })
            .map(|(k, v)| format!("{k} {:.3}", *v as f64 / n.max(1) as f64))
            .collect();
        println!(
            "wrk and nginx, TC {}: per request, rpclb translated {:.2} packets ({:.2} client to \
             backend, {:.2} back) and redirected {:.2}; other counters per request: {}",
            if close {
                "Connection: close"
            } else {
                "keep-alive"
            },
            runs,
            per("nat_forward"),
            per("nat_reverse"),
            per("fwd_redirect"),
            if other.is_empty() {
                "none".into()
            } else {
                other.join(", ")
            }
        );
    }
    Ok(out)
}

/// The wrk part's CPU per request, per path and mode, and TC's difference to direct.
fn print_cpu(
    paths: &[Path],
    res: &[Vec<Vec<Outcome>>],
    gc_every: Option<std::time::Duration>,
    gc: Option<super::gc::GcTotals>,
) {
    println!(
        "wrk and nginx, CPU per request in µs (all rounds' CPU over all their requests): wrk = its rusage, nginx = \
         the 3 servers' schedstat, each with the softirq work (forwarding, the eBPF program) run \
         in its context, kernel part in brackets; ksoftirqd = what overflowed there; agent GC = \
         a thread running lb-agent's GC tick {}; machine = /proc/stat, all CPUs and every process \
         (other load included), softirq in brackets",
        match gc_every {
            Some(d) => format!("every {d:?}"),
            None => "(off: RPCLB_BENCH_AGENT_GC=off)".into(),
        }
    );
    let mut t = super::Table::new(&[
        "wrk and nginx",
        "path",
        "wrk",
        "nginx",
        "ksoftirqd",
        "agent GC",
        "sum",
        "machine",
    ]);
    let direct = paths.iter().position(|&p| p == Path::Direct);
    for (mi, label) in ["Connection: close", "keep-alive"].iter().enumerate() {
        let per: Vec<PerConn> = res[mi]
            .iter()
            .map(|r| PerConn::of(&r.iter().map(|o| o.cpu).collect::<Vec<_>>()))
            .collect();
        for (pi, p) in paths.iter().enumerate() {
            let mut row = vec![label.to_string(), p.label().to_string()];
            row.extend(per[pi].cells());
            t.row(row);
        }
        if let (Some(d), Some(tc)) = (direct, paths.iter().position(|&p| p == Path::Tc)) {
            let (a, b) = (per[tc], per[d]);
            t.row(vec![
                label.to_string(),
                "TC - direct".into(),
                format!("{:+.1}", a.client - b.client),
                format!("{:+.1}", a.servers - b.servers),
                format!("{:+.2}", a.ksoftirqd - b.ksoftirqd),
                format!("{:+.2}", a.agent - b.agent),
                format!(
                    "{:+.1} ({:+.1}%)",
                    a.tasks - b.tasks,
                    (a.tasks / b.tasks - 1.0) * 100.0
                ),
                format!("{:+.1}", a.machine_busy - b.machine_busy),
            ]);
        }
    }
    print!("{}", t.render());
    if let Some(g) = gc {
        // Nearly every flow of the part came from the TC runs with `Connection: close`
        // (direct and the userspace proxy leave no entries, keep-alive 6 per run).
        let tc_conns: u64 = paths
            .iter()
            .position(|&p| p == Path::Tc)
            .map_or(0, |pi| res[0][pi].iter().map(|o| o.ok).sum());
        println!(
            "agent GC over the wrk part: {} sweeps, {} entries scanned per sweep, {} flows \
             expired, {} evicted by the LRU (recount), longest sweep {:.1} ms, {} errors; its CPU \
             {:.0} ms in all, {:.2} ms per sweep, {:.2} µs per expired flow, {:.2} µs per \
             connection of the TC `Connection: close` runs",
            g.sweeps,
            super::count(g.scanned / g.sweeps.max(1)),
            super::count(g.expired),
            super::count(g.evicted),
            g.max_sweep.as_secs_f64() * 1e3,
            g.errors,
            g.cpu_ns as f64 / 1e6,
            g.cpu_ns as f64 / 1e6 / g.sweeps.max(1) as f64,
            g.cpu_ns as f64 / 1e3 / g.expired.max(1) as f64,
            g.cpu_ns as f64 / 1e3 / tc_conns.max(1) as f64,
        );
    }
}

/// "userspace proxy CPU per request: ..." from the outcomes `res[workload][path]` of path `pu`:
/// the proxy threads' CPU time per completed request, median of the rounds. A figure that the
/// other load of a shared machine changes much less than the rates.
fn proxy_cpu_line(labels: &[&str], res: &[Vec<Vec<Outcome>>], pu: usize) -> String {
    let parts: Vec<String> = labels
        .iter()
        .zip(res)
        .map(|(l, r)| {
            let per: Vec<f64> = r[pu]
                .iter()
                .filter(|o| o.ok > 0)
                .map(|o| o.proxy_cpu_ns as f64 / o.ok as f64 / 1000.0)
                .collect();
            format!("{l} {:.1} µs", median(&per))
        })
        .collect();
    format!(
        "userspace proxy CPU per request (its threads' schedstat): {}",
        parts.join(", ")
    )
}

/// `RPCLB_BENCH_DEBUG=1`: the client's and backends' non-zero TCP trouble counters
/// (cumulative), to spot retransmits, resets and TIME_WAIT trouble.
fn debug_tcp_counters(t: &Topo, what: &str) {
    const KEYS: &[&str] = &[
        "TcpRetransSegs",
        "TcpExtTCPSynRetrans",
        "TcpExtTCPTimeouts",
        "TcpOutRsts",
        "TcpAttemptFails",
        "TcpEstabResets",
        "TcpExtTW",
        "TcpExtTWRecycled",
        "TcpExtTCPTimeWaitOverflow",
        "TcpExtListenDrops",
        "TcpExtTCPChallengeACK",
        "TcpCurrEstab",
        "TcpActiveOpens",
    ];
    let hosts = std::iter::once(t.lab().node())
        .chain(std::iter::once(&t.lab().client().ns))
        .chain(t.lab().backends().iter().map(|h| &h.ns));
    for ns in hosts {
        let mut args = vec!["-az"];
        args.extend_from_slice(KEYS);
        let out = ns.exec("nstat", &args).unwrap_or_default();
        let v: Vec<String> = out
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let k = it.next()?;
                let v: u64 = it.next()?.parse().ok()?;
                (v > 0).then(|| format!("{k}={v}"))
            })
            .collect();
        eprintln!("  debug {what} {}: {}", ns.name(), v.join(" "));
    }
}

fn reason_count(dp: &mut PinnedDp, name: &str) -> u64 {
    dp.dp()
        .writer()
        .reasons()
        .unwrap_or_default()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap_or(0)
}
