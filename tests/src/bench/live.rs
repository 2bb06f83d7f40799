//! Sections `xdp` and `scale`: the kernel programs timed with BPF_PROG_TEST_RUN.
//!
//! Topology: the standard lab (`Lab::new(3)`: node, client 10.244.1.2 via 10.244.1.1, backends
//! 10.244.(10+i).2 via 10.244.(10+i).1), plus:
//! - a sink XDP program attached natively to the client's and every backend's veth end, so a
//!   frame that the node transmits (live frames really transmit TX and REDIRECT verdicts) is
//!   delivered to that veth and dropped there. It also gives the veth the NAPI that an
//!   XDP_REDIRECT into it needs. Nothing reaches a socket, nothing answers. The sink writes
//!   the original frame back before dropping it (see `sink` for why: live-frames pages are
//!   reused without being re-initialised).
//! - static neighbour entries in the node (`nud permanent`), so `bpf_fib_lookup` succeeds
//!   without ARP.
//!
//! Every timed run happens on a thread inside the node namespace (the ingress ifindex of a
//! live-frames run must be an interface of the caller's namespace), pinned to one CPU.
//!
//! Timing: with the restoring sink every run of the program sees the requested frame. The
//! kernel reports the mean time per frame, which includes the redirect and the delivery into
//! the peer veth (its NAPI, and the sink, run when a batch ends), for the baseline and the
//! load balancer alike. The XDP_TX baseline on the same interface is timed the same way,
//! interleaved round by round, and the ratio of the two is the figure that matters. New flows
//! cannot be timed with `repeat` (the first run creates the flow), so they are timed one by
//! one in plain mode (repeat = 1) over distinct source ports, against the trivial program
//! timed the same way.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, TestRunResult, Xdp};
use lb_agent::datapath::{Datapath, DatapathConfig, cleanup};
use lb_api::{Algorithm, Backend, Protocol, Service};
use lb_common::prog_names;
use rpclb_tests::lab::{Host, Iface, Lab, LinkStats};
use rpclb_tests::packet::{self, ACK, PSH, Pkt, SYN};

use super::sink::{
    ADD64_IMM, CALL, EXIT, JGT_REG, MOV64_IMM, MOV64_REG, Sink, insn, load_xdp, put32, put64,
    sys_bpf,
};
use super::{
    Deadline, Opts, Table, bench_cpu, check_stop, count, header, median, ns, pin_to_cpu, ratio,
    ratio_of_rounds, verdict,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const VIP_PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
/// Live-frames batch size (the kernel's default, NAPI_POLL_WEIGHT).
const BATCH: u32 = 64;
/// TCP payload of the established-flow and reply frames: 14 + 20 + 20 + 100 = 154 bytes.
const PAYLOAD: usize = 100;
/// Source ports of the measured established flow and of the new-flow series.
const FLOW_SPORT: u16 = 65_000;
const NEW_FLOW_SPORT: u16 = 10_000;

pub(super) fn verdict_name(v: u32) -> &'static str {
    match v {
        0 => "ABORTED",
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        XDP_TX => "TX",
        XDP_REDIRECT => "REDIRECT",
        _ => "?",
    }
}

// ---------------------------------------------------------------------------------------------
// Topology and data paths

/// The lab plus static neighbours in the node. Dropping it deletes every namespace.
pub struct Topo {
    lab: Lab,
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Topo {
    pub fn new(n_backends: usize) -> Result<Topo> {
        let lab = Lab::new(n_backends).context("building the lab")?;
        let t = Topo { lab };
        for h in t.hosts() {
            t.lab.node().ip(&[
                "neigh",
                "replace",
                &h.iface.ip.to_string(),
                "lladdr",
                &mac_str(&h.iface.mac),
                "dev",
                &h.node_iface.name,
                "nud",
                "permanent",
            ])?;
        }
        Ok(t)
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    fn hosts(&self) -> impl Iterator<Item = &Host> {
        std::iter::once(self.lab.client()).chain(self.lab.backends())
    }

    /// Load a restoring sink for `len`-byte frames and attach it natively to the client's and
    /// the backends' veth ends (see `sink`). Dropping the sink detaches it.
    pub fn sinks(&self, len: usize) -> Result<Sink> {
        let mut sink = Sink::load(len)?;
        for h in self.hosts() {
            let idx = h.iface.ifindex;
            h.ns.run(|| sink.attach_here(idx))?
                .with_context(|| format!("sink on {} in {}", h.iface.name, h.ns.name()))?;
        }
        Ok(sink)
    }

    /// Run `f` on a thread in the node namespace, pinned to the benchmark CPU.
    pub fn in_node<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        Ok(self.lab.node().run(move || {
            pin_to_cpu(bench_cpu());
            f()
        })?)
    }

    pub fn node_stats(&self, ifname: &str) -> Result<LinkStats> {
        Ok(self.lab.node().link_stats(ifname)?)
    }

    pub fn client(&self) -> &Host {
        self.lab.client()
    }

    pub fn backend_by_ip(&self, ip: Ipv4Addr) -> Option<&Host> {
        self.lab.backends().iter().find(|h| h.iface.ip == ip)
    }

    /// Marks every node-side veth as a native XDP redirect target
    /// (`lb_common::xdp_iface`): their peers have GRO on (Linux 5.13+) or
    /// run a sink, so they take XDP frames. The benchmarks attach the
    /// programs themselves, not through `Datapath::attach`.
    pub fn mark_xdp_targets(&self, dp: &mut Datapath) -> Result<()> {
        for i in self.lab.node_ifaces() {
            dp.writer()
                .set_xdp_iface(i.ifindex, lb_common::xdp_iface::REDIRECT_TARGET)?;
        }
        Ok(())
    }

    /// The pin directory for a data path named `name`, in the lab's private bpffs.
    pub fn pin_dir(&self, name: &str) -> PathBuf {
        self.lab.bpffs().join(name)
    }
}

/// A loaded data path that unpins its maps and links on drop (before the lab goes).
pub struct PinnedDp {
    dp: Option<Datapath>,
    dir: PathBuf,
}

impl PinnedDp {
    pub fn load(cfg: &DatapathConfig) -> Result<PinnedDp> {
        let dp = Datapath::load(cfg)
            .with_context(|| format!("loading the data path at {}", cfg.pin_path.display()))?;
        Ok(PinnedDp {
            dp: Some(dp),
            dir: cfg.pin_path.clone(),
        })
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("loaded")
    }
}

impl Drop for PinnedDp {
    fn drop(&mut self) {
        self.dp.take();
        if let Err(e) = cleanup(&self.dir) {
            eprintln!("bench teardown: {}: {e}", self.dir.display());
        }
    }
}

pub(super) fn service(
    name: &str,
    vip: Ipv4Addr,
    algo: Algorithm,
    backends: Vec<Backend>,
) -> Service {
    Service {
        max_per_backend: None,
        selector: None,
        external: Default::default(),
        name: name.into(),
        vip: vip.into(),
        port: VIP_PORT,
        protocol: Protocol::Tcp,
        algorithm: algo,
        affinity_timeout: None,
        maglev_table_size: None,
        locality: None,
        backends,
        grpc: None,
        health_check: None,
    }
}

/// The measured service: VIP 10.96.0.10:80, Maglev over every lab backend's :8080.
pub fn lab_service(topo: &Topo) -> Service {
    service(
        "bench/web:http",
        VIP,
        Algorithm::Maglev,
        topo.lab
            .backends()
            .iter()
            .map(|h| Backend::new(h.ip(), BACKEND_PORT))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN

/// `struct xdp_md` for ctx_in: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
/// egress_ifindex.
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let mut b = [0u8; 24];
    for (i, v) in [0u32, len as u32, 0, ifindex, 0, 0].into_iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b
}

/// One plain run (repeat = 1) of any packet program with context `ctx`: verdict, output
/// frame, kernel-reported duration.
fn run_once<P>(prog: &P, frame: &[u8], ctx: &[u8]) -> Result<(u32, Vec<u8>, Duration)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(ctx),
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out, r.duration))
}

/// One plain run (repeat = 1) of an XDP program: verdict, output frame, kernel-reported duration.
pub(super) fn plain(
    prog: &mut Xdp,
    frame: &[u8],
    ifindex: u32,
) -> Result<(u32, Vec<u8>, Duration)> {
    run_once(prog, frame, &xdp_md(frame.len(), ifindex))
}

/// One live-frames run of `repeat` frames: (kernel ns per frame, wall-clock ns per frame).
/// The kernel's figure is an integer and leaves out the time the run was scheduled out; the
/// wall clock includes the syscall, the page pool setup and whatever else ran on the CPU.
fn live(prog: &mut Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(f64, f64)> {
    let ctx = xdp_md(frame.len(), ifindex);
    let t = Instant::now();
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat,
        attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
        ..Default::default()
    })?;
    let wall = t.elapsed();
    Ok((
        r.duration.as_nanos() as f64,
        wall.as_nanos() as f64 / f64::from(repeat),
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    Lb,
    Tx,
    /// The floor (`floor_program`), loaded by the section: its fd.
    Floor(RawFd),
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const BPF_FUNC_REDIRECT: i32 = 23;

/// The floor of the load balancer's work, assembled here (no maps): check that the frame
/// holds Ethernet + a 20-byte IPv4 header + TCP (54 bytes), EtherType IPv4, IHL 5, protocol
/// TCP, then `bpf_redirect(ifindex, 0)`; anything else XDP_PASS. What the LB must at least do
/// to send a frame to another interface.
fn floor_program(ifindex: u32) -> Vec<[u8; 8]> {
    const LDX_W: u8 = 0x61;
    const LDX_H: u8 = 0x69;
    const LDX_B: u8 = 0x71;
    const JNE_IMM: u8 = 0x55;
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),                  // r2 = ctx->data
        insn(LDX_W, 3, 1, 4, 0),                  // r3 = ctx->data_end
        insn(MOV64_REG, 4, 2, 0, 0),              // r4 = r2
        insn(ADD64_IMM, 4, 0, 0, 54),             // r4 += 54
        insn(JGT_REG, 4, 3, 0, 0),                // if r4 > r3 goto pass (patched)
        insn(LDX_H, 5, 2, 12, 0),                 // r5 = eth proto (as loaded: 0x0008 for IPv4)
        insn(JNE_IMM, 5, 0, 0, 0x0008),           // if r5 != IPv4 goto pass (patched)
        insn(LDX_B, 5, 2, 14, 0),                 // r5 = version | IHL
        insn(JNE_IMM, 5, 0, 0, 0x45),             // if r5 != 0x45 goto pass (patched)
        insn(LDX_B, 5, 2, 23, 0),                 // r5 = IP protocol
        insn(JNE_IMM, 5, 0, 0, 6),                // if r5 != TCP goto pass (patched)
        insn(MOV64_IMM, 1, 0, 0, ifindex as i32), // r1 = ifindex
        insn(MOV64_IMM, 2, 0, 0, 0),              // r2 = 0
        insn(CALL, 0, 0, 0, BPF_FUNC_REDIRECT),   // r0 = bpf_redirect(r1, r2)
        insn(EXIT, 0, 0, 0, 0),
    ];
    let pass = p.len();
    p.push(insn(MOV64_IMM, 0, 0, 0, XDP_PASS as i32));
    p.push(insn(EXIT, 0, 0, 0, 0));
    for at in [4usize, 6, 8, 10] {
        let rel = (pass - at - 1) as i16;
        p[at][2..4].copy_from_slice(&rel.to_le_bytes());
    }
    p
}

/// BPF_PROG_TEST_RUN of a program loaded here (not through aya): (verdict, kernel ns per
/// frame). `live`: live-frames mode with `repeat` frames, as [`live`].
fn raw_run(fd: RawFd, frame: &[u8], ifindex: u32, repeat: u32, live: bool) -> Result<(u32, f64)> {
    let ctx = xdp_md(frame.len(), ifindex);
    let mut a = [0u8; 80];
    put32(&mut a, 0, fd as u32);
    put32(&mut a, 8, frame.len() as u32);
    put64(&mut a, 16, frame.as_ptr() as u64);
    put32(&mut a, 32, repeat);
    put32(&mut a, 40, ctx.len() as u32);
    put64(&mut a, 48, ctx.as_ptr() as u64);
    if live {
        put32(&mut a, 64, BPF_F_TEST_XDP_LIVE_FRAMES);
        put32(&mut a, 72, BATCH);
    }
    sys_bpf(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN (floor)")?;
    let rv = u32::from_ne_bytes(a[4..8].try_into().expect("4 bytes"));
    let dur = u32::from_ne_bytes(a[36..40].try_into().expect("4 bytes"));
    Ok((rv, f64::from(dur)))
}

pub(super) fn prog(dp: &mut Datapath, p: Prog) -> Result<&mut Xdp> {
    Ok(match p {
        Prog::Lb => dp.xdp_program(),
        Prog::Tx => dp.bench_program(prog_names::BENCH_TX)?,
        Prog::Floor(_) => bail!("the floor program is not aya's"),
    })
}

// ---------------------------------------------------------------------------------------------
// Flows

/// An established flow client -> VIP through one data path, and its frames.
pub struct Flow {
    /// ACK + payload, client -> VIP, as it arrives on the node's client-facing veth.
    pub fwd: Vec<u8>,
    /// ACK + payload, backend -> client, as it arrives on the node's backend-facing veth.
    pub reply: Vec<u8>,
    pub client_if: Iface,
    pub backend_if: Iface,
    pub backend_ip: Ipv4Addr,
}

fn client_frame(topo: &Topo, sport: u16, flags: u8) -> Pkt {
    let c = topo.client();
    Pkt::tcp()
        .eth(c.iface.mac, c.node_iface.mac)
        .ip(c.ip(), VIP)
        .ports(sport, VIP_PORT)
        .flags(flags)
        .seq(1)
}

/// Create a flow with one SYN (plain run), then check the ACK + payload of the same flow and
/// the backend's reply: both must be redirected, rewritten, with valid checksums.
pub fn establish(topo: &Topo, dp: &mut Datapath, sport: u16) -> Result<Flow> {
    let c = topo.client();
    let syn = client_frame(topo, sport, SYN).build();
    let ack = client_frame(topo, sport, ACK | PSH)
        .seq(2)
        .ack(1)
        .payload(&[0x5a; PAYLOAD])
        .build();
    let cidx = c.node_iface.ifindex;
    let (v_syn, out_syn, v_ack, out_ack) = topo.in_node(|| -> Result<_> {
        let p = dp.xdp_program();
        let (v1, o1, _) = plain(p, &syn, cidx)?;
        let (v2, o2, _) = plain(p, &ack, cidx)?;
        Ok((v1, o1, v2, o2))
    })??;
    ensure!(
        v_syn == XDP_REDIRECT && v_ack == XDP_REDIRECT,
        "SYN / ACK verdicts {} / {}, expected REDIRECT (fib lookup failed? reasons: {:?})",
        verdict_name(v_syn),
        verdict_name(v_ack),
        dp.writer().reasons().unwrap_or_default()
    );
    let s = packet::parse(&out_syn)?;
    let a = packet::parse(&out_ack)?;
    packet::verify_checksums(&out_ack).context("DNATed frame checksums")?;
    ensure!(
        s.ip.dst == a.ip.dst && a.ports() == Some((sport, BACKEND_PORT)),
        "SYN went to {}, ACK to {} {:?}",
        s.ip.dst,
        a.ip.dst,
        a.ports()
    );
    let b = topo
        .backend_by_ip(a.ip.dst)
        .with_context(|| format!("DNAT to {}, not a lab backend", a.ip.dst))?;
    ensure!(
        a.eth.dst == b.iface.mac && a.eth.src == b.node_iface.mac,
        "redirected frame has MACs {:?} -> {:?}",
        a.eth.src,
        a.eth.dst
    );
    let reply = Pkt::tcp()
        .eth(b.iface.mac, b.node_iface.mac)
        .ip(b.ip(), c.ip())
        .ports(BACKEND_PORT, sport)
        .flags(ACK | PSH)
        .seq(1)
        .ack(2 + PAYLOAD as u32)
        .payload(&[0xa5; PAYLOAD])
        .build();
    let bidx = b.node_iface.ifindex;
    let (v_rep, out_rep) = topo.in_node(|| -> Result<_> {
        let (v, o, _) = plain(dp.xdp_program(), &reply, bidx)?;
        Ok((v, o))
    })??;
    ensure!(
        v_rep == XDP_REDIRECT,
        "reply verdict {}",
        verdict_name(v_rep)
    );
    let r = packet::parse(&out_rep)?;
    packet::verify_checksums(&out_rep).context("reverse-NATed frame checksums")?;
    ensure!(
        r.ip.src == VIP && r.ports() == Some((VIP_PORT, sport)) && r.eth.dst == c.iface.mac,
        "reply rewritten to {}:{:?}",
        r.ip.src,
        r.ports()
    );
    Ok(Flow {
        fwd: ack,
        reply,
        client_if: c.node_iface.clone(),
        backend_if: b.node_iface.clone(),
        backend_ip: b.ip(),
    })
}

// ---------------------------------------------------------------------------------------------
// Live-frames series

/// One thing to time in live mode.
#[derive(Clone)]
pub struct Case {
    pub label: String,
    /// Index into the data paths given to `run_series`.
    pub dp: usize,
    pub prog: Prog,
    pub frame: Vec<u8>,
    pub ingress: Iface,
    /// The node-side interface the frames leave by (its tx counter proves delivery).
    pub egress: String,
    pub expect: u32,
    /// For `Prog::Lb`: the data path's per-CPU flow cache on (the default) or off
    /// (`MapWriter::set_flow_cache`), set before each run of the case.
    pub flow_cache: bool,
}

#[derive(Default, Clone, Debug)]
pub struct Series {
    pub kernel_ns: Vec<f64>,
    pub wall_ns: Vec<f64>,
    pub frames: u64,
    pub delivered: u64,
    pub tx_dropped: u64,
}

impl Series {
    pub fn median(&self) -> f64 {
        median(&self.kernel_ns)
    }
    pub fn delivered_pct(&self) -> f64 {
        100.0 * self.delivered as f64 / self.frames.max(1) as f64
    }
}

fn one_live(topo: &Topo, dps: &mut [&mut PinnedDp], c: &Case, repeat: u32) -> Result<(f64, f64)> {
    let dp = dps[c.dp].dp();
    if c.prog == Prog::Lb {
        dp.writer().set_flow_cache(c.flow_cache)?;
    }
    let idx = c.ingress.ifindex;
    if let Prog::Floor(fd) = c.prog {
        return topo.in_node(|| {
            let t = Instant::now();
            let (_, kns) = raw_run(fd, &c.frame, idx, repeat, true)?;
            Ok((kns, t.elapsed().as_nanos() as f64 / f64::from(repeat)))
        })?;
    }
    topo.in_node(|| live(prog(dp, c.prog)?, &c.frame, idx, repeat))?
}

/// Check each case's verdict with a plain run (live mode reports none).
fn check_verdicts(topo: &Topo, dps: &mut [&mut PinnedDp], cases: &[Case]) -> Result<()> {
    for c in cases {
        let dp = dps[c.dp].dp();
        if c.prog == Prog::Lb {
            dp.writer().set_flow_cache(c.flow_cache)?;
        }
        let idx = c.ingress.ifindex;
        let v = match c.prog {
            Prog::Floor(fd) => topo.in_node(|| raw_run(fd, &c.frame, idx, 1, false))??.0,
            p => topo.in_node(|| plain(prog(dp, p)?, &c.frame, idx))??.0,
        };
        ensure!(
            v == c.expect,
            "{}: verdict {}, expected {}",
            c.label,
            verdict_name(v),
            verdict_name(c.expect)
        );
    }
    Ok(())
}

/// Check the verdicts, then warm up and pick the repeat count: `opts.repeat`, or less so that
/// the slowest case's run takes about `run_cap`.
fn calibrate(
    topo: &Topo,
    sink: &Sink,
    dps: &mut [&mut PinnedDp],
    cases: &[Case],
    opts: &Opts,
) -> Result<u32> {
    check_verdicts(topo, dps, cases)?;
    let mut slowest = 1.0f64;
    for c in cases {
        sink.set_template(&c.frame)?;
        let (_, wall) = one_live(topo, dps, c, 20 * BATCH * 16)?;
        slowest = slowest.max(wall);
    }
    let by_time = (opts.run_cap.as_nanos() as f64 / slowest) as u32;
    Ok((opts.repeat.min(by_time) / BATCH).max(160) * BATCH)
}

/// One timed live-frames run of `c`, added to `s`, with the egress veth's counters.
fn sample(
    topo: &Topo,
    sink: &Sink,
    dps: &mut [&mut PinnedDp],
    c: &Case,
    repeat: u32,
    s: &mut Series,
) -> Result<()> {
    sink.set_template(&c.frame)?;
    let before = topo.node_stats(&c.egress)?;
    let (kns, wns) = one_live(topo, dps, c, repeat)?;
    // The peer's NAPI runs when the batch ends; give stragglers a moment.
    std::thread::sleep(Duration::from_millis(20));
    let after = topo.node_stats(&c.egress)?;
    s.kernel_ns.push(kns);
    s.wall_ns.push(wns);
    s.frames += u64::from(repeat);
    s.delivered += after.tx_packets.saturating_sub(before.tx_packets);
    s.tx_dropped += after.tx_dropped.saturating_sub(before.tx_dropped);
    Ok(())
}

/// Time every case `rounds` times, interleaved (the order rotates each round). Returns the
/// series and the repeat used.
pub fn run_series(
    topo: &Topo,
    sink: &Sink,
    dps: &mut [&mut PinnedDp],
    cases: &[Case],
    opts: &Opts,
    deadline: Deadline,
) -> Result<(Vec<Series>, u32)> {
    let repeat = calibrate(topo, sink, dps, cases, opts)?;
    let mut out = vec![Series::default(); cases.len()];
    for round in 0..opts.rounds {
        check_stop()?;
        if round >= 3 && deadline.passed() {
            eprintln!("  (time budget reached after {round} rounds)");
            break;
        }
        for k in 0..cases.len() {
            let i = (k + round) % cases.len();
            sample(topo, sink, dps, &cases[i], repeat, &mut out[i])?;
        }
    }
    Ok((out, repeat))
}

/// `n` SYNs from distinct source ports: each one a new flow.
fn syn_frames(topo: &Topo, n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| client_frame(topo, NEW_FLOW_SPORT + i as u16, SYN).build())
        .collect()
}

/// One plain run (repeat = 1, a fresh copy of the frame each time) per frame and program:
/// `progs` are (data path index, program), interleaved frame by frame. Returns per-program
/// kernel ns and the count of LB runs that did not redirect. Bounded by `deadline`.
fn plain_series(
    topo: &Topo,
    dps: &mut [&mut PinnedDp],
    progs: &[(usize, Prog)],
    frames: &[Vec<u8>],
    deadline: Deadline,
) -> Result<(Vec<Vec<f64>>, u64)> {
    let n = frames.len();
    let idx = topo.client().node_iface.ifindex;
    let mut dps: Vec<&mut Datapath> = dps.iter_mut().map(|d| d.dp()).collect();
    topo.in_node(|| -> Result<(Vec<Vec<f64>>, u64)> {
        let mut out = vec![Vec::with_capacity(n); progs.len()];
        let mut bad = 0u64;
        for (i, f) in frames.iter().enumerate() {
            if i % 256 == 0 {
                check_stop()?;
                if i > 0 && deadline.passed() {
                    break;
                }
            }
            for (j, &(d, p)) in progs.iter().enumerate() {
                let (v, _, dur) = plain(prog(dps[d], p)?, f, idx)?;
                if p == Prog::Lb && v != XDP_REDIRECT {
                    bad += 1;
                }
                out[j].push(dur.as_nanos() as f64);
            }
        }
        Ok((out, bad))
    })?
}

fn delivered_cell(s: &Series) -> String {
    let mut c = format!(
        "{} / {} ({:.1}%)",
        count(s.delivered),
        count(s.frames),
        s.delivered_pct()
    );
    if s.tx_dropped > 0 {
        c += &format!(", {} tx_dropped", count(s.tx_dropped));
    }
    c
}

fn reason_count(dp: &mut Datapath, name: &str) -> u64 {
    dp.writer()
        .reasons()
        .unwrap_or_default()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap_or(0)
}

/// Whether `e` is the kernel refusing live frames (EPERM from BPF_PROG_TEST_RUN).
fn is_eperm(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
    }) || format!("{e:#}").contains("Operation not permitted")
}

/// Whether this process's effective capabilities lack CAP_SYS_RESOURCE (bit 24).
fn lacks_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) == 0)
}

/// The stand-in for live frames where the kernel refuses them: `runs` single plain runs
/// (repeat = 1, a fresh copy of the frame each: plain mode with repeat > 1 would run the
/// program again on its own output) per case and round, the cases interleaved run by run
/// (the order rotates), first those with the flow cache on, then those with it off. Each round's median goes into the case's series, so that
/// `ratio_of_rounds` compares cases as for live frames. Verdicts are checked on every run.
/// Nothing is transmitted: the figure is the program's cost plus the timer's.
fn plain_rounds(
    topo: &Topo,
    dps: &mut [&mut PinnedDp],
    cases: &[Case],
    runs: u32,
    rounds: usize,
    deadline: Deadline,
) -> Result<Vec<Series>> {
    check_verdicts(topo, dps, cases)?;
    let mut dps: Vec<&mut Datapath> = dps.iter_mut().map(|d| d.dp()).collect();
    let mut out = vec![Series::default(); cases.len()];
    for round in 0..rounds {
        check_stop()?;
        if round >= 3 && deadline.passed() {
            eprintln!("  (time budget reached after {round} rounds)");
            break;
        }
        let per = topo.in_node(|| -> Result<Vec<Vec<f64>>> {
            let mut per = vec![Vec::with_capacity(runs as usize); cases.len()];
            // The flow-cache switch changes between the two groups only: a map write
            // between two runs leaves the next one colder (~20 ns here).
            for on in [true, false] {
                let group: Vec<usize> = (0..cases.len())
                    .filter(|&i| cases[i].flow_cache == on)
                    .collect();
                if group.is_empty() {
                    continue;
                }
                for d in dps.iter_mut() {
                    d.writer().set_flow_cache(on)?;
                }
                for r in 0..runs as usize {
                    for k in 0..group.len() {
                        let i = group[(k + r + round) % group.len()];
                        let c = &cases[i];
                        let dp = &mut *dps[c.dp];
                        let idx = c.ingress.ifindex;
                        let (v, kns) = match c.prog {
                            Prog::Floor(fd) => raw_run(fd, &c.frame, idx, 1, false)?,
                            p => {
                                let (v, _, d) = plain(prog(dp, p)?, &c.frame, idx)?;
                                (v, d.as_nanos() as f64)
                            }
                        };
                        ensure!(
                            v == c.expect,
                            "{}: verdict {}, expected {}",
                            c.label,
                            verdict_name(v),
                            verdict_name(c.expect)
                        );
                        per[i].push(kns);
                    }
                }
            }
            Ok(per)
        })??;
        for (s, v) in out.iter_mut().zip(per) {
            s.frames += v.len() as u64;
            s.kernel_ns.push(trimmed_mean(&v));
        }
    }
    for d in dps {
        d.writer().set_flow_cache(true)?;
    }
    Ok(out)
}

/// The mean of the values up to the 90th percentile: the kernel's per-run figure is a whole
/// number of ns (and this host's clock moves in steps of about 10 ns), so a median cannot
/// tell programs a few ns apart; the mean can, and the cut drops the runs an interrupt or
/// another process hit.
fn trimmed_mean(v: &[f64]) -> f64 {
    let cut = super::percentile(v, 90.0);
    let kept: Vec<f64> = v.iter().copied().filter(|x| *x <= cut).collect();
    kept.iter().sum::<f64>() / kept.len().max(1) as f64
}

/// Section 1 where live frames are refused: the same cases in plain mode ([`plain_rounds`]),
/// labelled as such, with their ratios to the trivial program and the differences.
fn xdp_fallback(
    topo: &Topo,
    dps: &mut [&mut PinnedDp],
    cases: &[Case],
    opts: &Opts,
    deadline: Deadline,
) -> Result<()> {
    let series = plain_rounds(topo, dps, cases, opts.plain_runs, opts.rounds, deadline)?;
    println!(
        "PLAIN-MODE FALLBACK (not live frames): {} single runs (repeat = 1) per case and \
         round, the cases interleaved run by run (those with the flow cache on, then those with \
         it off), {} rounds, CPU {}; per round the mean of the \
         runs up to the 90th percentile, the median of those reported. Nothing is transmitted (a REDIRECT or TX verdict is only \
         returned), and every figure includes the test run's own timer (about the trivial \
         program's figure), so ratios here are smaller than live-frames ratios would be: \
         \"minus trivial\" is the program's own cost.",
        count(u64::from(opts.plain_runs)),
        series[0].kernel_ns.len(),
        bench_cpu(),
    );
    let base = &series[0];
    let mut t = Table::new(&[
        "case (plain mode, fallback)",
        "ns/run",
        "rounds min..max",
        "vs XDP_TX",
        "minus trivial",
    ]);
    for (c, s) in cases.iter().zip(&series) {
        t.row(vec![
            c.label.clone(),
            ns1(s.median()),
            format!(
                "{}..{}",
                ns1(super::min(&s.kernel_ns)),
                ns1(super::max(&s.kernel_ns))
            ),
            ratio(ratio_of_rounds(&s.kernel_ns, &base.kernel_ns)),
            ns1(s.median() - base.median()),
        ]);
    }
    print!("{}", t.render());
    let est = ratio_of_rounds(&series[1].kernel_ns, &base.kernel_ns);
    let rep = ratio_of_rounds(&series[2].kernel_ns, &base.kernel_ns);
    let minus = |i: usize| {
        let d: Vec<f64> = series[i]
            .kernel_ns
            .iter()
            .zip(&base.kernel_ns)
            .map(|(a, b)| a - b)
            .collect();
        median(&d)
    };
    ab_lines(cases, &series);
    verdict(
        "established-flow packet, live frames, vs a trivial XDP_TX timed the same way",
        "<= 1.3x",
        format!(
            "live frames refused here; plain-mode fallback {} ({} vs {} ns, {} ns beyond \
             the trivial program)",
            ratio(est),
            ns1(series[1].median()),
            ns1(base.median()),
            ns1(minus(1))
        ),
        None,
    );
    verdict(
        "reply packet, same",
        "<= 1.3x",
        format!(
            "live frames refused here; plain-mode fallback {} ({} ns, {} ns beyond the \
             trivial program)",
            ratio(rep),
            ns1(series[2].median()),
            ns1(minus(2))
        ),
        None,
    );
    Ok(())
}

/// One decimal: plain-mode figures are means, a few ns apart.
fn ns1(v: f64) -> String {
    format!("{v:.1}")
}

/// With `--ab-object`: B (the given object) against A (the built-in one), per round.
fn ab_lines(cases: &[Case], series: &[Series]) {
    for (a, what) in [(1usize, "established"), (2, "reply")] {
        let Some(b) = cases
            .iter()
            .position(|c| c.dp == 1 && c.frame == cases[a].frame)
        else {
            continue;
        };
        let d: Vec<f64> = series[b]
            .kernel_ns
            .iter()
            .zip(&series[a].kernel_ns)
            .map(|(x, y)| x - y)
            .collect();
        println!(
            "A/B {what}: B {} ns, A {} ns; B/A {:.3}x (median of the rounds' ratios), B - A {} \
             ns (median of the rounds' differences)",
            ns1(series[b].median()),
            ns1(series[a].median()),
            ratio_of_rounds(&series[b].kernel_ns, &series[a].kernel_ns),
            ns1(median(&d))
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Section 1

pub fn section_xdp(opts: &Opts) -> Result<()> {
    header("1. Per-packet cost, XDP live frames");
    let deadline = Deadline::after(Duration::from_secs(if opts.quick { 30 } else { 120 }));
    let topo = Topo::new(3)?;
    let mut cfg = DatapathConfig::small(topo.pin_dir("xdp"));
    cfg.fib_redirect = true;
    let mut pd = PinnedDp::load(&cfg)?;
    topo.mark_xdp_targets(pd.dp())?;
    pd.dp().writer().upsert_service(&lab_service(&topo))?;
    let flow = establish(&topo, pd.dp(), FLOW_SPORT)?;
    let sink = topo.sinks(flow.fwd.len())?;
    let floor: OwnedFd = load_xdp(&floor_program(flow.backend_if.ifindex), b"bench_floor")?;
    // `--ab-object`: the same service and flow through a second data path built from that
    // object (its own maps), timed as B beside the built-in A.
    let mut pdb = match &opts.ab_object {
        Some(path) => {
            let mut cfg = DatapathConfig::small(topo.pin_dir("xdp-b"));
            cfg.fib_redirect = true;
            cfg.object_file = Some(path.clone());
            let mut p = PinnedDp::load(&cfg)?;
            topo.mark_xdp_targets(p.dp())?;
            p.dp().writer().upsert_service(&lab_service(&topo))?;
            let fb = establish(&topo, p.dp(), FLOW_SPORT)?;
            ensure!(
                fb.fwd == flow.fwd && fb.reply == flow.reply,
                "A and B chose different backends"
            );
            Some(p)
        }
        None => None,
    };

    let mut cases = vec![
        Case {
            label: "XDP_TX baseline (bench_xdp_tx), client-facing veth".into(),
            dp: 0,
            prog: Prog::Tx,
            frame: flow.fwd.clone(),
            ingress: flow.client_if.clone(),
            egress: flow.client_if.name.clone(),
            expect: XDP_TX,
            flow_cache: true,
        },
        Case {
            label: "LB established flow, client -> VIP (DNAT + fib + redirect)".into(),
            dp: 0,
            prog: Prog::Lb,
            frame: flow.fwd.clone(),
            ingress: flow.client_if.clone(),
            egress: flow.backend_if.name.clone(),
            expect: XDP_REDIRECT,
            flow_cache: true,
        },
        Case {
            label: "LB reply, backend -> client (reverse NAT + fib + redirect)".into(),
            dp: 0,
            prog: Prog::Lb,
            frame: flow.reply.clone(),
            ingress: flow.backend_if.clone(),
            egress: flow.client_if.name.clone(),
            expect: XDP_REDIRECT,
            flow_cache: true,
        },
        Case {
            label: "floor: parse + bpf_redirect to the backend's veth (no maps)".into(),
            dp: 0,
            prog: Prog::Floor(floor.as_raw_fd()),
            frame: flow.fwd.clone(),
            ingress: flow.client_if.clone(),
            egress: flow.backend_if.name.clone(),
            expect: XDP_REDIRECT,
            flow_cache: true,
        },
        Case {
            label: "LB established flow, flow cache off".into(),
            dp: 0,
            prog: Prog::Lb,
            frame: flow.fwd.clone(),
            ingress: flow.client_if.clone(),
            egress: flow.backend_if.name.clone(),
            expect: XDP_REDIRECT,
            flow_cache: false,
        },
        Case {
            label: "LB reply, flow cache off".into(),
            dp: 0,
            prog: Prog::Lb,
            frame: flow.reply.clone(),
            ingress: flow.backend_if.clone(),
            egress: flow.client_if.name.clone(),
            expect: XDP_REDIRECT,
            flow_cache: false,
        },
    ];
    if pdb.is_some() {
        for i in [1, 2] {
            let mut c = cases[i].clone();
            c.dp = 1;
            c.label = format!("B: {}", c.label);
            cases.push(c);
        }
    }
    if opts.profile.as_deref() == Some("new") {
        drop(pd);
        return super::newflow::profile_new(
            &topo,
            opts.profile_secs,
            opts.profile_fill,
            opts.new_flows,
        );
    }
    if let Some(which) = &opts.profile {
        return profile(&topo, &sink, &mut pd, &cases, which, opts.profile_secs);
    }
    let mut dps: Vec<&mut PinnedDp> = vec![&mut pd];
    if let Some(b) = pdb.as_mut() {
        dps.push(b);
    }
    // One short live run of the trivial program: some hosts refuse live frames (EPERM).
    sink.set_template(&cases[0].frame)?;
    if let Err(e) = one_live(&topo, &mut dps, &cases[0], BATCH) {
        if !is_eperm(&e) {
            return Err(e);
        }
        println!(
            "live frames refused by this kernel/host: EPERM from BPF_PROG_TEST_RUN with \
             BPF_F_TEST_XDP_LIVE_FRAMES, even for the 2-instruction XDP_TX program (plain runs \
             work){}; falling back to plain-mode runs (docs/benchmarks.md, section 1)",
            if lacks_cap_sys_resource() {
                "; this process lacks CAP_SYS_RESOURCE"
            } else {
                ""
            }
        );
        xdp_fallback(&topo, &mut dps, &cases, opts, deadline)?;
        drop(dps);
        return plain_newflow(&topo, &mut pd, &flow, opts);
    }
    drop(dps);
    let redirects_before = reason_count(pd.dp(), "fwd_redirect");
    let mut dps: Vec<&mut PinnedDp> = vec![&mut pd];
    if let Some(b) = pdb.as_mut() {
        dps.push(b);
    }
    let (series, repeat) = run_series(&topo, &sink, &mut dps, &cases, opts, deadline)?;
    drop(dps);
    // The cache-off cases may have run last.
    pd.dp().writer().set_flow_cache(true)?;
    let redirects = reason_count(pd.dp(), "fwd_redirect") - redirects_before;

    println!(
        "{} frames of {} bytes per timed run, batch {BATCH}, {} rounds interleaved, CPU {}; \
         service: Maglev over 3 backends; flow to {}",
        count(u64::from(repeat)),
        flow.fwd.len(),
        series[0].kernel_ns.len(),
        bench_cpu(),
        flow.backend_ip
    );
    let base = &series[0];
    let mut t = Table::new(&[
        "case (live frames)",
        "ns/pkt median",
        "min..max",
        "wall ns/pkt",
        "vs XDP_TX",
        "delivered (egress tx_packets)",
    ]);
    for (c, s) in cases.iter().zip(&series) {
        t.row(vec![
            c.label.clone(),
            ns(s.median()),
            format!(
                "{}..{}",
                ns(super::min(&s.kernel_ns)),
                ns(super::max(&s.kernel_ns))
            ),
            ns(median(&s.wall_ns)),
            ratio(ratio_of_rounds(&s.kernel_ns, &base.kernel_ns)),
            delivered_cell(s),
        ]);
    }
    print!("{}", t.render());
    ab_lines(&cases, &series);
    let lb_frames: u64 = series[1].frames + series[2].frames + series[4].frames + series[5].frames;
    println!(
        "kernel counted {} fwd_redirect for {} LB frames (plus the calibration runs)",
        count(redirects),
        count(lb_frames)
    );
    let est = ratio_of_rounds(&series[1].kernel_ns, &base.kernel_ns);
    let rep = ratio_of_rounds(&series[2].kernel_ns, &base.kernel_ns);
    let fl = ratio_of_rounds(&series[3].kernel_ns, &base.kernel_ns);
    let (tx_ns, floor_ns) = (base.median(), series[3].median());
    println!(
        "beyond XDP_TX ({} ns): the redirect to another veth (floor) {} ns ({}); rpclb's own \
         work on top of the floor: established {} ns ({} of the floor), reply {} ns ({})",
        ns(tx_ns),
        ns(floor_ns - tx_ns),
        ratio(fl),
        ns(series[1].median() - floor_ns),
        ratio(ratio_of_rounds(&series[1].kernel_ns, &series[3].kernel_ns)),
        ns(series[2].median() - floor_ns),
        ratio(ratio_of_rounds(&series[2].kernel_ns, &series[3].kernel_ns)),
    );
    println!(
        "flow cache: established {} ns with, {} ns without ({} of without); reply {} ns with, \
         {} ns without ({})",
        ns(series[1].median()),
        ns(series[4].median()),
        ratio(ratio_of_rounds(&series[1].kernel_ns, &series[4].kernel_ns)),
        ns(series[2].median()),
        ns(series[5].median()),
        ratio(ratio_of_rounds(&series[2].kernel_ns, &series[5].kernel_ns)),
    );
    let delivered_ok = series.iter().all(|s| s.delivered_pct() >= 95.0);
    verdict(
        "established-flow packet, live frames, vs a trivial XDP_TX timed the same way",
        "<= 1.3x",
        format!(
            "{} ({} vs {} ns; floor {}){}",
            ratio(est),
            ns(series[1].median()),
            ns(tx_ns),
            ratio(fl),
            if delivered_ok {
                ""
            } else {
                ", delivery < 95%!"
            }
        ),
        Some(est <= 1.3 && delivered_ok),
    );
    verdict(
        "reply packet, same",
        "<= 1.3x",
        format!("{} ({} ns)", ratio(rep), ns(series[2].median())),
        Some(rep <= 1.3 && delivered_ok),
    );
    plain_newflow(&topo, &mut pd, &flow, opts)
}

/// Section 1's plain-mode part: new flows and the established flow, one run each.
fn plain_newflow(topo: &Topo, pd: &mut PinnedDp, flow: &Flow, opts: &Opts) -> Result<()> {
    // Plain mode, repeat = 1 (a fresh copy of the frame per run, no transmit): the program's
    // own cost. New flows: a fresh source port each; established: the flow above.
    check_stop()?;
    let both = [(0, Prog::Lb), (0, Prog::Tx)];
    let budget = || Deadline::after(Duration::from_secs(if opts.quick { 10 } else { 40 }));
    let syns = syn_frames(topo, opts.new_flows);
    let (nf, bad) = plain_series(topo, &mut [pd], &both, &syns, budget())?;
    if bad > 0 {
        bail!("{bad} of {} new flows were not redirected", nf[0].len());
    }
    let est = vec![flow.fwd.clone(); opts.new_flows as usize];
    let (pe, bad) = plain_series(topo, &mut [pd], &both, &est, budget())?;
    if bad > 0 {
        bail!("{bad} established-flow plain runs were not redirected");
    }
    let sel = selector_newflow(topo, pd, &both, opts.new_flows, budget())?;
    println!();
    println!(
        "plain mode (repeat = 1 per run, fresh copy, nothing transmitted): {} new flows (SYN, a \
         fresh source port each) and {} runs of the established flow, each interleaved with \
         the trivial program on the same frame",
        count(nf[0].len() as u64),
        count(pe[0].len() as u64)
    );
    let mut t = Table::new(&[
        "case (plain mode, one run each)",
        "median ns",
        "p90 ns",
        "mean ns",
        "minus trivial",
    ]);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for (label, v, base) in [
        ("trivial program (bench_xdp_tx), SYN frames", &nf[1], &nf[1]),
        ("LB established flow: program only", &pe[0], &pe[1]),
        (
            "LB new flow: service + Maglev + 2 conntrack inserts",
            &nf[0],
            &nf[1],
        ),
        (
            "LB new flow, example selector (example:geo, docs/policies.md)",
            &sel[0],
            &sel[1],
        ),
    ] {
        t.row(vec![
            label.into(),
            ns(median(v)),
            ns(super::percentile(v, 90.0)),
            ns(mean(v)),
            ns(median(v) - median(base)),
        ]);
    }
    print!("{}", t.render());
    let (lb, tx) = (&nf[0], &nf[1]);
    let (ml, mt) = (median(lb), median(tx));
    println!(
        "the timer's own cost (about the trivial program's figure) is in every row; \
         \"minus trivial\" is the program's cost beyond an XDP_TX"
    );
    verdict(
        "new flow (SYN), plain mode, minus the trivial program",
        "<= 550 ns (about 0.7x Katran)",
        format!("{} ns ({} ns, trivial {} ns)", ns(ml - mt), ns(ml), ns(mt)),
        Some(ml - mt <= 550.0),
    );
    let sl = median(&sel[0]) - median(&sel[1]);
    verdict(
        "new flow with the example selector vs the built-in Maglev, minus the trivial program",
        "- (informational, issue 15)",
        format!(
            "{} ns vs {} ns: +{} ns ({:.2}x)",
            ns(sl),
            ns(ml - mt),
            ns(sl - (ml - mt)),
            sl / (ml - mt)
        ),
        None,
    );
    Ok(())
}

/// New flows of the same service with the example selector (`selector: example:geo`, the
/// client's /24 mapped to every backend): each SYN is walked, handed to the selector by a tail
/// call and walked again with its answer. Source ports after the built-in series' ones (those
/// flows are established now). Returns the LB and trivial series; the service is put back.
fn selector_newflow(
    topo: &Topo,
    pd: &mut PinnedDp,
    both: &[(usize, Prog)],
    new_flows: u32,
    deadline: Deadline,
) -> Result<Vec<Vec<f64>>> {
    use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
    use lb_agent::datapath::selector::{GEO_MAP, maps_dir};
    let mut svc = lab_service(topo);
    svc.selector = Some(lb_api::validate::EXAMPLE_GEO_SELECTOR.into());
    pd.dp().writer().upsert_service(&svc)?;
    ensure!(
        pd.dp().writer().selector_in_place(&svc.addr()),
        "the example selector did not load: {:?}",
        pd.dp().writer().selector_errors()
    );
    let pin = pd.dp().pin_path().to_path_buf();
    let md = MapData::from_pin(maps_dir(&pin).join(GEO_MAP)).context("the example's table")?;
    let mut geo: LpmTrie<MapData, u32, u32> = LpmTrie::try_from(Map::LpmTrie(md))?;
    let o = topo.client().ip().octets();
    let every = (1u32 << svc.backends.len()) - 1;
    geo.insert(
        &Key::new(24, u32::from_ne_bytes([o[0], o[1], o[2], 0])),
        every,
        0,
    )?;
    let first = u32::from(NEW_FLOW_SPORT) + new_flows;
    let n = new_flows.min(u32::from(u16::MAX) - first);
    let syns: Vec<Vec<u8>> = (0..n)
        .map(|i| client_frame(topo, (first + i) as u16, SYN).build())
        .collect();
    let chosen = reason_count(pd.dp(), "selector_chosen");
    let (series, bad) = plain_series(topo, &mut [&mut *pd], both, &syns, deadline)?;
    let chosen = reason_count(pd.dp(), "selector_chosen") - chosen;
    pd.dp().writer().upsert_service(&lab_service(topo))?;
    ensure!(
        bad == 0,
        "{bad} of {} selector new flows were not redirected",
        series[0].len()
    );
    ensure!(
        chosen == series[0].len() as u64,
        "the selector chose {chosen} of {} new flows",
        series[0].len()
    );
    Ok(series)
}

/// `--profile CASE`: that case only, in live-frames runs of about 0.2 s, for `secs`.
fn profile(
    topo: &Topo,
    sink: &Sink,
    pd: &mut PinnedDp,
    cases: &[Case],
    which: &str,
    secs: f64,
) -> Result<()> {
    let c = &cases[match which {
        "tx" => 0,
        "established" => 1,
        "floor" => 3,
        "established-nocache" => 4,
        "reply-nocache" => 5,
        _ => 2,
    }];
    sink.set_template(&c.frame)?;
    println!(
        "profiling {:?} on CPU {} for {secs} s: e.g. `perf record -C {} -g -- sleep {}` now",
        c.label,
        bench_cpu(),
        bench_cpu(),
        secs.floor()
    );
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let (mut frames, mut kns) = (0u64, Vec::new());
    let repeat = 640_000;
    while Instant::now() < until {
        check_stop()?;
        let (k, _) = one_live(topo, &mut [pd], c, repeat)?;
        frames += u64::from(repeat);
        kns.push(k);
    }
    println!(
        "{} frames, median {} ns/frame",
        count(frames),
        ns(median(&kns))
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Section 2

/// Bulk services for the scale test: round-robin (small weighted tables), `n_backends` spread
/// over `n_services`, VIPs 10.96.1.0 onwards, backends in 10.244.128.0/17 with ports 8080+.
fn bulk_services(n_services: u32, n_backends: u32) -> Vec<Service> {
    let per = n_backends / n_services;
    let extra = n_backends % n_services;
    let mut g = 0u32;
    (0..n_services)
        .map(|i| {
            let k = per + u32::from(i < extra);
            let backends = (0..k)
                .map(|_| {
                    let ip =
                        Ipv4Addr::new(10, 244, 128 + ((g / 254) % 127) as u8, 1 + (g % 254) as u8);
                    let port = 8080 + (g / (254 * 127)) as u16;
                    g += 1;
                    Backend::new(ip, port)
                })
                .collect();
            service(
                &format!("bench/svc-{i}:http"),
                Ipv4Addr::new(10, 96, 1 + (i / 256) as u8, (i % 256) as u8),
                Algorithm::RoundRobin,
                backends,
            )
        })
        .collect()
}

pub fn section_scale(opts: &Opts) -> Result<()> {
    header("2. Scale: one service vs many, XDP live frames");
    let deadline = Deadline::after(Duration::from_secs(if opts.quick { 45 } else { 180 }));
    let topo = Topo::new(3)?;
    let measured = lab_service(&topo);
    let n_bulk = opts.scale_services - 1;
    let n_bulk_backends = opts.scale_backends - measured.backends.len() as u32;
    let bulk = bulk_services(n_bulk, n_bulk_backends);
    let mut cfg = DatapathConfig::small(topo.pin_dir("scale"));
    cfg.max_services = (opts.scale_services + 64).next_power_of_two();
    cfg.max_backends = (opts.scale_backends + 1024).next_power_of_two();
    cfg.max_conntrack = 131_072;
    cfg.max_slots = 1 << 20;
    cfg.fib_redirect = true;
    // One data path instance, measured with one service and with many, loaded and removed
    // between rounds. Two instances with the same content differ by up to +-5% here (JIT
    // image placement, hash seeds), more than the effect under test.
    let mut pd = PinnedDp::load(&cfg)?;
    topo.mark_xdp_targets(pd.dp())?;
    pd.dp().writer().upsert_service(&measured)?;
    let flow = establish(&topo, pd.dp(), FLOW_SPORT)?;
    let sink = topo.sinks(flow.fwd.len())?;
    let case = |label: &str, reply: bool| Case {
        label: label.into(),
        dp: 0,
        prog: Prog::Lb,
        frame: if reply {
            flow.reply.clone()
        } else {
            flow.fwd.clone()
        },
        ingress: if reply {
            flow.backend_if.clone()
        } else {
            flow.client_if.clone()
        },
        egress: if reply {
            flow.client_if.name.clone()
        } else {
            flow.backend_if.name.clone()
        },
        expect: XDP_REDIRECT,
        flow_cache: true,
    };
    let cases = [case("established", false), case("reply", true)];
    // As in section 1: where the kernel refuses live frames, plain-mode runs stand in for
    // them (the ratio of many services to one is what this section reports).
    sink.set_template(&cases[0].frame)?;
    let live = match one_live(&topo, &mut [&mut pd], &cases[0], BATCH) {
        Ok(_) => true,
        Err(e) if is_eperm(&e) => {
            println!(
                "live frames refused by this kernel/host (EPERM, see section 1): PLAIN-MODE \
                 FALLBACK, {} single runs per case, state and round, interleaved run by run; \
                 nothing is transmitted",
                count(u64::from(opts.plain_runs))
            );
            false
        }
        Err(e) => return Err(e),
    };
    let repeat = if live {
        calibrate(&topo, &sink, &mut [&mut pd], &cases, opts)?
    } else {
        1
    };
    let syns = syn_frames(&topo, opts.new_flows);
    let chunk = (syns.len() / (2 * opts.rounds)).max(1);
    let mut chunks = syns.chunks(chunk);
    let mut one = vec![Series::default(); cases.len()];
    let mut many = vec![Series::default(); cases.len()];
    let (mut nf_one, mut nf_many) = (Vec::<f64>::new(), Vec::<f64>::new());
    // Per-round medians of the new-flow series, for per-round ratios.
    let (mut nfr_one, mut nfr_many) = (Vec::<f64>::new(), Vec::<f64>::new());
    let (mut load_s, mut unload_s) = (Vec::new(), Vec::new());
    let mut n_services = 1;
    let mut bad = 0;
    let flows_budget = Duration::from_secs(if opts.quick { 5 } else { 10 });
    for round in 0..opts.rounds {
        check_stop()?;
        if round >= 3 && deadline.passed() {
            eprintln!("  (time budget reached after {round} rounds)");
            break;
        }
        // The order alternates by round (1, many; many, 1; ...): a host whose speed drifts
        // within a round biases the rounds' ratios in turn both ways, and their median cancels.
        let states = if round % 2 == 0 {
            [(false, &mut one), (true, &mut many)]
        } else {
            [(true, &mut many), (false, &mut one)]
        };
        for (state, series) in states {
            if state {
                let t = Instant::now();
                for (i, s) in bulk.iter().enumerate() {
                    if i % 256 == 0 {
                        check_stop()?;
                    }
                    pd.dp()
                        .writer()
                        .upsert_service(s)
                        .with_context(|| format!("writing {}", s.name))?;
                }
                load_s.push(t.elapsed().as_secs_f64());
                n_services = pd.dp().writer().services().len();
            }
            if live {
                for (i, c) in cases.iter().enumerate() {
                    sample(&topo, &sink, &mut [&mut pd], c, repeat, &mut series[i])?;
                }
            } else {
                let got = plain_rounds(
                    &topo,
                    &mut [&mut pd],
                    &cases,
                    opts.plain_runs,
                    1,
                    Deadline::after(flows_budget),
                )?;
                for (s, g) in series.iter_mut().zip(got) {
                    s.frames += g.frames;
                    s.kernel_ns.extend(g.kernel_ns);
                }
            }
            if let Some(frames) = chunks.next() {
                let (v, b) = plain_series(
                    &topo,
                    &mut [&mut pd],
                    &[(0, Prog::Lb)],
                    frames,
                    Deadline::after(flows_budget),
                )?;
                bad += b;
                let (all, per_round) = if state {
                    (&mut nf_many, &mut nfr_many)
                } else {
                    (&mut nf_one, &mut nfr_one)
                };
                per_round.push(median(&v[0]));
                all.extend_from_slice(&v[0]);
            }
            if state {
                let t = Instant::now();
                for (i, s) in bulk.iter().enumerate() {
                    if i % 256 == 0 {
                        check_stop()?;
                    }
                    pd.dp().writer().remove_service(&s.addr())?;
                }
                unload_s.push(t.elapsed().as_secs_f64());
            }
        }
    }
    if bad > 0 {
        bail!("{bad} new flows were not redirected");
    }
    println!(
        "one data path; each round: 1 service, then {} services and {} backends written \
         (round-robin, {} backends each; median {:.2} s), then removed again (median {:.2} s)",
        count(n_services as u64),
        count(u64::from(opts.scale_backends)),
        n_bulk_backends / n_bulk.max(1),
        median(&load_s),
        median(&unload_s),
    );
    println!(
        "{} frames per timed run, {} rounds; new flows: {} per state per round, {} flows in \
         conntrack at the end",
        count(u64::from(repeat)),
        one[0].kernel_ns.len(),
        count(chunk as u64),
        count(nf_one.len() as u64 + nf_many.len() as u64 + 1)
    );
    let mut t = Table::new(&[
        "case",
        "1 service ns",
        &format!("{} services ns", count(n_services as u64)),
        "many / one",
        "delivered (many)",
    ]);
    let est = ratio_of_rounds(&many[0].kernel_ns, &one[0].kernel_ns);
    let rep = ratio_of_rounds(&many[1].kernel_ns, &one[1].kernel_ns);
    let newr = ratio_of_rounds(&nfr_many, &nfr_one);
    let mode = if live {
        "live frames"
    } else {
        "plain-mode fallback"
    };
    let delivered = |s: &Series| {
        if live {
            delivered_cell(s)
        } else {
            "- (plain mode)".into()
        }
    };
    t.row(vec![
        format!("established flow, {mode}"),
        ns(one[0].median()),
        ns(many[0].median()),
        ratio(est),
        delivered(&many[0]),
    ]);
    t.row(vec![
        format!("reply (reverse NAT), {mode}"),
        ns(one[1].median()),
        ns(many[1].median()),
        ratio(rep),
        delivered(&many[1]),
    ]);
    t.row(vec![
        format!(
            "new flow (SYN), plain mode, {} flows",
            count(nf_one.len() as u64 + nf_many.len() as u64)
        ),
        ns(median(&nf_one)),
        ns(median(&nf_many)),
        ratio(newr),
        "-".into(),
    ]);
    print!("{}", t.render());
    let scale_label = format!(
        "per-packet cost, {} services / {} backends",
        count(n_services as u64),
        count(u64::from(opts.scale_backends))
    );
    // Plain mode transmits nothing; its verdicts are checked on every run instead.
    let delivered_ok = !live || many.iter().chain(&one).all(|s| s.delivered_pct() >= 95.0);
    let fallback = if live { "" } else { " (plain-mode fallback)" };
    verdict(
        &format!("{scale_label}, established"),
        "within 5% of 1 service",
        format!("{} ({:+.1}%){fallback}", ratio(est), (est - 1.0) * 100.0),
        Some((est - 1.0).abs() <= 0.05 && delivered_ok),
    );
    verdict(
        &format!("{scale_label}, reply"),
        "(same as above)",
        format!("{} ({:+.1}%){fallback}", ratio(rep), (rep - 1.0) * 100.0),
        Some((rep - 1.0).abs() <= 0.05 && delivered_ok),
    );
    verdict(
        &format!("{scale_label}, new flow"),
        "(informational)",
        format!("{} ({:+.1}%)", ratio(newr), (newr - 1.0) * 100.0),
        None,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Section "tc": the TC program in plain mode

/// `TC_ACT_REDIRECT`: what `rpclb_tc` returns for a packet it redirects.
const TC_ACT_REDIRECT: u32 = 7;

/// One plain run of a TC program (repeat = 1: the kernel builds a fresh, linear, uncloned skb
/// from `frame`, CHECKSUM_NONE): verdict, output frame, kernel-reported duration. `ifindex`
/// is the skb's device (`__sk_buff.ifindex`, 40 bytes in), as the ingress interface.
fn plain_tc(
    prog: &mut aya::programs::SchedClassifier,
    frame: &[u8],
    ifindex: u32,
) -> Result<(u32, Vec<u8>, Duration)> {
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    run_once(prog, frame, &ctx)
}

/// The packets of one connection timed by [`section_tc`], in their order.
/// Per data path, per packet kind: kernel ns of each connection's packet.
type TcTimes = Vec<Vec<Vec<f64>>>;

const TC_KINDS: [&str; 4] = [
    "SYN, client -> VIP (new flow: service, Maglev, forward entry)",
    "SYN-ACK, backend -> client (first reply: the lazy reverse entry)",
    "ACK + 100 B, client -> VIP (established)",
    "reply 100 B, backend -> client (established)",
];

/// Informational: `rpclb_tc`'s cost per packet in plain mode, for the first four packets of
/// each of `--new-flows` connections (a fresh source port each). With `--ab-object`, the same
/// packets through a second data path built from that object (its own maps), A and B
/// alternating packet by packet (which goes first alternates by connection). Plain mode's skb
/// is linear, not cloned and without checksum offload: it shows the program's instructions,
/// helpers and maps, not what a cloned skb from a local TCP stack costs in the pull.
pub fn section_tc(opts: &Opts) -> Result<()> {
    header("TC program, plain mode (informational)");
    let deadline = Deadline::after(Duration::from_secs(if opts.quick { 10 } else { 40 }));
    let topo = Topo::new(3)?;
    let load = |name: &str, object: Option<PathBuf>| -> Result<PinnedDp> {
        let mut cfg = DatapathConfig::small(topo.pin_dir(name));
        cfg.fib_redirect = true;
        cfg.object_file = object;
        let mut p = PinnedDp::load(&cfg)?;
        p.dp().writer().upsert_service(&lab_service(&topo))?;
        Ok(p)
    };
    let mut dps = vec![load("tc-a", None)?];
    if let Some(path) = &opts.ab_object {
        dps.push(load("tc-b", Some(path.clone()))?);
    }
    let flows = opts.new_flows.min(20_000);
    let n = dps.len();
    let mut dpr: Vec<&mut Datapath> = dps.iter_mut().map(|d| d.dp()).collect();
    let topo = &topo;
    // Per data path, per kind: kernel ns of each connection's packet. One thread in the node's
    // namespace for the whole loop (the fib lookups run there).
    let (t, bad, done) = topo.in_node(|| -> Result<(TcTimes, Vec<String>, u32)> {
        let mut t: TcTimes = vec![vec![Vec::new(); TC_KINDS.len()]; n];
        let mut bad: Vec<String> = Vec::new();
        let c = topo.client();
        let cidx = c.node_iface.ifindex;
        let mut done = 0u32;
        for i in 0..flows {
            if i % 256 == 0 {
                check_stop()?;
                if i > 0 && deadline.passed() {
                    break;
                }
            }
            let sport = 20_000 + i as u16;
            let syn = client_frame(topo, sport, SYN).build();
            let order: Vec<usize> = if i % 2 == 0 {
                (0..n).collect()
            } else {
                (0..n).rev().collect()
            };
            // The SYN first, through every data path: its output names the backend.
            let mut backend = None;
            for &d in &order {
                let (v, out, dur) = plain_tc(dpr[d].tc_program(), &syn, cidx)?;
                if v != TC_ACT_REDIRECT {
                    bad.push(format!("{}: SYN verdict {v}", ["A", "B"][d]));
                }
                let dst = packet::parse(&out)?.ip.dst;
                ensure!(
                    backend.is_none_or(|b| b == dst),
                    "A and B chose different backends"
                );
                backend = Some(dst);
                t[d][0].push(dur.as_nanos() as f64);
            }
            let b = topo
                .backend_by_ip(backend.unwrap_or(VIP))
                .context("the SYN went to no lab backend")?;
            let bidx = b.node_iface.ifindex;
            let from_backend = |flags: u8| {
                Pkt::tcp()
                    .eth(b.iface.mac, b.node_iface.mac)
                    .ip(b.ip(), c.ip())
                    .ports(BACKEND_PORT, sport)
                    .flags(flags)
            };
            let frames = [
                (from_backend(SYN | ACK).seq(1000).ack(2).build(), bidx),
                (
                    client_frame(topo, sport, ACK | PSH)
                        .seq(2)
                        .ack(1001)
                        .payload(&[0x5a; PAYLOAD])
                        .build(),
                    cidx,
                ),
                (
                    from_backend(ACK | PSH)
                        .seq(1001)
                        .ack(2 + PAYLOAD as u32)
                        .payload(&[0xa5; PAYLOAD])
                        .build(),
                    bidx,
                ),
            ];
            for (k, (f, idx)) in frames.iter().enumerate() {
                for &d in &order {
                    let (v, _, dur) = plain_tc(dpr[d].tc_program(), f, *idx)?;
                    if v != TC_ACT_REDIRECT {
                        bad.push(format!(
                            "{}: {} verdict {v}",
                            ["A", "B"][d],
                            TC_KINDS[k + 1]
                        ));
                    }
                    t[d][k + 1].push(dur.as_nanos() as f64);
                }
            }
            done += 1;
        }
        Ok((t, bad, done))
    })??;
    drop(dpr);
    ensure!(
        bad.is_empty(),
        "{} TC runs not redirected, first: {}",
        bad.len(),
        bad[0]
    );
    println!(
        "{} connections, their first four packets each through rpclb_tc (plain mode, repeat = \
         1, a fresh skb per run); CPU {}; {}",
        count(u64::from(done)),
        bench_cpu(),
        if n > 1 {
            "A: the built-in object, B: --ab-object, alternating packet by packet"
        } else {
            "the built-in object (--ab-object PATH adds B)"
        }
    );
    let mut tab = Table::new(&[
        "packet (plain mode, TC)",
        "A median ns",
        "B median ns",
        "B - A",
    ]);
    let (mut sa, mut sb) = (0.0, 0.0);
    for (k, kind) in TC_KINDS.iter().enumerate() {
        let a = median(&t[0][k]);
        sa += a;
        let (b, d) = match t.get(1) {
            Some(tb) => {
                let d: Vec<f64> = tb[k].iter().zip(&t[0][k]).map(|(x, y)| x - y).collect();
                sb += median(&tb[k]);
                (ns(median(&tb[k])), ns(median(&d)))
            }
            None => ("-".into(), "-".into()),
        };
        tab.row(vec![kind.to_string(), ns(a), b, d]);
    }
    print!("{}", tab.render());
    if n > 1 {
        println!(
            "A/B TC, the four packets: B {} ns, A {} ns, B - A {} ns (sum of the medians; B - A \
             per packet: the median of the connections' differences)",
            ns(sb),
            ns(sa),
            ns(sb - sa)
        );
    }
    Ok(())
}
