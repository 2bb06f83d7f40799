//! Section `lab`: real TCP through the node namespace, three ways, side by side in one run.
//!
//! - direct: the client connects to the backends' pod IPs; the node forwards (no XDP, no
//!   netfilter rules);
//! - xdp: the client connects to the VIP 10.96.0.10:80; `rpclb_xdp` is attached natively to
//!   every node-side veth (Maglev over the three backends' :8080);
//! - iptables: the client connects to the VIP; the node DNATs it with kube-proxy-style rules
//!   (`-m statistic --mode random` chains in `nat PREROUTING`). This runs in a second,
//!   identical lab, so that netfilter's conntrack never touches the direct and xdp runs.
//!
//! Two workloads: `Connection: close`-style (connect, one 64-byte request and response, the
//! client closes; the client namespaces have tcp_tw_reuse=1 and ports 1024-65535) and keep-alive (one connection per client thread, 64-byte requests and
//! responses back to back). Each run is bounded by time (`--lab-secs`), every socket operation
//! by a timeout, and the order of the paths rotates each round.

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
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Clients

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Close,
    KeepAlive,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::Close => "new connections/s (Connection: close)",
            Workload::KeepAlive => "keep-alive requests/s",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    ok: u64,
    errors: u64,
    secs: f64,
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

pub fn section_lab(opts: &Opts) -> Result<()> {
    header(
        "4. Netns lab throughput: rpclb XDP, TC and userspace vs direct routing vs iptables DNAT",
    );
    // Lab A: direct and xdp. Lab B: iptables.
    let a = Topo::new(3)?;
    let b = Topo::new(3)?;
    for t in [&a, &b] {
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
    let mut servers = Vec::new();
    for t in [&a, &b] {
        for h in t.lab().backends() {
            servers.push(Server::start(&h.ns, BACKEND_PORT, opts.lab_threads + 2)?);
        }
    }
    let mut dp = PinnedDp::load(&DatapathConfig::small(a.pin_dir("lab")))?;
    a.mark_xdp_targets(dp.dp())?;
    dp.dp().writer().upsert_service(&lab_service(&a))?;
    let have_ipt = install_iptables(&b)?;

    let direct: Vec<SocketAddr> = a
        .lab()
        .backends()
        .iter()
        .map(|h| SocketAddr::from((h.ip(), BACKEND_PORT)))
        .collect();
    let vip = vec![SocketAddr::from((VIP, VIP_PORT))];
    let mut paths = vec![Path::Direct, Path::Xdp, Path::Tc];
    if have_ipt {
        paths.push(Path::Iptables);
    }
    paths.push(Path::DirectPass);
    paths.push(Path::Userspace);
    let at = |p: Path| paths.iter().position(|&x| x == p);
    let pass = PassProg::load()?;
    let workloads = [Workload::Close, Workload::KeepAlive];
    let threads = opts.lab_threads;
    // results[w][p] = outcome per round
    let mut results = vec![vec![Vec::<Outcome>::new(); paths.len()]; workloads.len()];
    let redirects_before = reason_count(&mut dp, "fwd_redirect");
    let run = |p: Path, w: Workload, secs: f64, dp: &mut PinnedDp| -> Result<Outcome> {
        check_stop()?;
        match p {
            Path::Direct => run_clients(&a.lab().client().ns, &direct, w, threads, secs),
            Path::DirectPass => {
                let names: Vec<u32> = a.lab().node_ifaces().iter().map(|i| i.ifindex).collect();
                let links = a.lab().node().run(|| {
                    names
                        .iter()
                        .map(|&i| pass.attach_here(i))
                        .collect::<Result<Vec<_>>>()
                })??;
                let r = run_clients(&a.lab().client().ns, &direct, w, threads, secs);
                drop(links);
                r
            }
            Path::Xdp => {
                let ids = attach_xdp(&a, dp)?;
                let r = run_clients(&a.lab().client().ns, &vip, w, threads, secs);
                detach_xdp(&a, dp, ids)?;
                r
            }
            Path::Tc => {
                let ids = attach_tc(&a, dp)?;
                let r = run_clients(&a.lab().client().ns, &vip, w, threads, secs);
                detach_tc(&a, dp, ids)?;
                r
            }
            Path::Iptables => run_clients(&b.lab().client().ns, &vip, w, threads, secs),
            Path::Userspace => {
                // The agent's userspace proxy in the node namespace, for this run only.
                let svc = lb_api::DesiredState {
                    services: vec![lab_service(&a)],
                };
                let proxy = a.lab().node().run(|| -> Result<UserspaceProxy> {
                    let p = UserspaceProxy::start(ProxyOptions::default())
                        .map_err(|e| anyhow::anyhow!("userspace proxy: {e}"))?;
                    p.apply(&svc)
                        .map_err(|e| anyhow::anyhow!("userspace proxy: {e}"))?;
                    Ok(p)
                })??;
                let r = run_clients(&a.lab().client().ns, &vip, w, threads, secs);
                proxy
                    .shutdown()
                    .map_err(|e| anyhow::anyhow!("userspace proxy: {e}"))?;
                r
            }
        }
    };
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
                if std::env::var_os("RPCLB_BENCH_DEBUG").is_some() {
                    let t = if paths[pi] == Path::Iptables { &b } else { &a };
                    debug_tcp_counters(t, &format!("{:?} {:?}", paths[pi], w));
                }
                results[wi][pi].push(o);
            }
        }
    }
    let redirects = reason_count(&mut dp, "fwd_redirect") - redirects_before;

    println!(
        "{} client threads, {:.1} s per run, {} round(s), paths rotated each round; 3 backends, \
         64-byte requests and responses; every CPU shared by clients, servers and forwarding; \
         rate: median (min..max) of the rounds; ratios: median of per-round ratios",
        threads, opts.lab_secs, opts.lab_rounds
    );
    let mut head = vec!["workload".to_string()];
    head.extend(paths.iter().map(|p| format!("{} /s", p.label())));
    head.push("xdp / direct".into());
    if have_ipt {
        head.push("xdp / iptables".into());
    }
    head.push("xdp / direct+PASS".into());
    head.push("tc / direct".into());
    head.push("userspace / direct".into());
    head.push("errors".into());
    let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
    let mut t = Table::new(&head_refs);
    // Per-round ratios, then their median: the other load of a shared machine changes from
    // second to second, and a round's paths run back to back.
    // ratios[w] = (xdp / direct, xdp / iptables, xdp / direct+PASS)
    let mut ratios = vec![(f64::NAN, f64::NAN, f64::NAN); workloads.len()];
    let mut tc_ratios = vec![f64::NAN; workloads.len()];
    let mut tc_ipt = vec![f64::NAN; workloads.len()];
    let mut us_ratios = vec![f64::NAN; workloads.len()];
    let (pd, px) = (
        at(Path::Direct).expect("direct"),
        at(Path::Xdp).expect("xdp"),
    );
    let pp = at(Path::DirectPass).expect("control");
    for (wi, w) in workloads.iter().enumerate() {
        let mut row = vec![w.label().to_string()];
        let mut errors = 0;
        let per: Vec<Vec<f64>> = (0..paths.len())
            .map(|pi| results[wi][pi].iter().map(Outcome::rate).collect())
            .collect();
        for p in &per {
            row.push(format!(
                "{} ({}..{})",
                count(median(p) as u64),
                count(super::min(p) as u64),
                count(super::max(p) as u64)
            ));
        }
        for r in &results[wi] {
            errors += r.iter().map(|o| o.errors).sum::<u64>();
        }
        ratios[wi].0 = ratio_of_rounds(&per[px], &per[pd]);
        row.push(ratio(ratios[wi].0));
        if let Some(pi) = at(Path::Iptables) {
            ratios[wi].1 = ratio_of_rounds(&per[px], &per[pi]);
            row.push(ratio(ratios[wi].1));
        }
        ratios[wi].2 = ratio_of_rounds(&per[px], &per[pp]);
        row.push(ratio(ratios[wi].2));
        let ptc = at(Path::Tc).expect("tc");
        tc_ratios[wi] = ratio_of_rounds(&per[ptc], &per[pd]);
        row.push(ratio(tc_ratios[wi]));
        if let Some(pi) = at(Path::Iptables) {
            tc_ipt[wi] = ratio_of_rounds(&per[ptc], &per[pi]);
        }
        let pu = at(Path::Userspace).expect("userspace");
        us_ratios[wi] = ratio_of_rounds(&per[pu], &per[pd]);
        row.push(ratio(us_ratios[wi]));
        row.push(count(errors));
        t.row(row);
    }
    print!("{}", t.render());
    let hits = if have_ipt { iptables_hits(&b) } else { 0 };
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

    let (close_x, close_i, close_p) = ratios[0];
    verdict(
        "netns lab, new connections/s through the VIP",
        ">= 0.9x direct, > iptables",
        if have_ipt {
            format!(
                "{} direct, {} iptables ({} direct+PASS)",
                ratio(close_x),
                ratio(close_i),
                ratio(close_p)
            )
        } else {
            format!(
                "{} direct, no iptables ({} direct+PASS)",
                ratio(close_x),
                ratio(close_p)
            )
        },
        Some(close_x >= 0.9 && (!have_ipt || close_i > 1.0)),
    );
    let (ka, ka_i, ka_p) = ratios[1];
    verdict(
        "netns lab, new connections/s through the VIP, TC mode",
        ">= 0.9x direct, > iptables",
        if have_ipt {
            format!(
                "{} direct, {} iptables",
                ratio(tc_ratios[0]),
                ratio(tc_ipt[0])
            )
        } else {
            format!("{} direct, no iptables", ratio(tc_ratios[0]))
        },
        Some(tc_ratios[0] >= 0.9 && (!have_ipt || tc_ipt[0] > 1.0)),
    );
    verdict(
        "netns lab, keep-alive requests/s, TC mode",
        ">= 0.97x direct",
        format!("{} direct", ratio(tc_ratios[1])),
        Some(tc_ratios[1] >= 0.97),
    );
    verdict(
        "netns lab, keep-alive requests/s",
        ">= 0.97x direct",
        format!(
            "{}{} ({} direct+PASS)",
            ratio(ka),
            if have_ipt {
                format!(", {} iptables", ratio(ka_i))
            } else {
                String::new()
            },
            ratio(ka_p)
        ),
        Some(ka >= 0.97),
    );
    verdict(
        "userspace L4 path, keep-alive",
        ">= 0.5x direct",
        format!(
            "{} direct (new connections: {} direct)",
            ratio(us_ratios[1]),
            ratio(us_ratios[0])
        ),
        Some(us_ratios[1] >= 0.5),
    );
    drop(servers);
    Ok(())
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
    ];
    let hosts = std::iter::once(t.lab().client()).chain(t.lab().backends());
    for h in hosts {
        let mut args = vec!["-az"];
        args.extend_from_slice(KEYS);
        let out = h.ns.exec("nstat", &args).unwrap_or_default();
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
        eprintln!("  debug {what} {}: {}", h.ns.name(), v.join(" "));
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
