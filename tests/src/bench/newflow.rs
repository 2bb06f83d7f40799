//! New flows: section `fill` (the cost of a new flow as the conntrack map fills) and
//! `--profile new` (SYNs of distinct flows in a loop, for `perf record`).
//!
//! Both time plain runs (repeat = 1, a fresh copy of the frame each time, nothing transmitted)
//! of SYNs from distinct client addresses and ports on the node's client-facing veth, in the
//! node namespace, on the benchmark CPU, as section 1's new-flow row does. Every SYN is a new
//! flow: conntrack miss, service lookup, Maglev, the conntrack entries, DNAT, fib lookup,
//! redirect. The trivial program runs on the same frame right after each timed SYN.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_agent::datapath::reader::ip_wire;
use lb_agent::datapath::{Datapath, DatapathConfig, conntrack_map_entries};
use lb_common::{FlowKey, limits};
use rpclb_tests::packet::{self, ACK, Pkt, SYN};

use super::live::{
    BACKEND_PORT, PinnedDp, Prog, Topo, VIP, VIP_PORT, XDP_REDIRECT, lab_service, plain, prog,
    verdict_name,
};
use super::{
    Deadline, Opts, Table, bench_cpu, check_stop, count, header, median, ns, percentile, ratio,
    verdict,
};

/// Client ports per client address of the new-flow series: 1024.. (below the collision range).
const PORTS_PER_IP: u32 = 50_000;

/// Client address and port of new flow `i` (distinct for every `i` up to millions): clients
/// 10.244.128.1, .2, ... (inside the pod range, never on the wire: nothing is transmitted).
fn flow_addr(i: u32) -> (Ipv4Addr, u16) {
    let ip = u32::from(Ipv4Addr::new(10, 244, 128, 1)) + i / PORTS_PER_IP;
    (Ipv4Addr::from(ip), 1024 + (i % PORTS_PER_IP) as u16)
}

/// The SYN of new flow `i`, as it arrives on the node's client-facing veth.
fn syn(topo: &Topo, i: u32) -> Vec<u8> {
    let c = topo.client();
    let (ip, port) = flow_addr(i);
    Pkt::tcp()
        .eth(c.iface.mac, c.node_iface.mac)
        .ip(ip, VIP)
        .ports(port, VIP_PORT)
        .flags(SYN)
        .seq(1)
        .build()
}

fn fwd_key(i: u32) -> FlowKey {
    let (ip, port) = flow_addr(i);
    FlowKey {
        src_ip: ip_wire(ip),
        dst_ip: ip_wire(VIP),
        src_port: port.to_be(),
        dst_port: VIP_PORT.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

/// Runs flows `from..to` untimed: each one's SYN, then its backend's SYN|ACK, so that
/// every flow holds its two entries (forward and reverse) as an answered flow does, whether
/// the SYN writes both (the eager path) or the first reply writes the reverse one (a backend
/// of one frontend). Errors unless each packet is redirected.
fn fill(topo: &Topo, dp: &mut Datapath, from: u32, to: u32) -> Result<()> {
    let idx = topo.client().node_iface.ifindex;
    let frames: Vec<Vec<u8>> = (from..to).map(|i| syn(topo, i)).collect();
    topo.in_node(|| -> Result<()> {
        for (k, f) in frames.iter().enumerate() {
            if k % 4096 == 0 {
                check_stop()?;
            }
            let i = from as usize + k;
            let (v, out, _) = plain(prog(dp, Prog::Lb)?, f, idx)?;
            if v != XDP_REDIRECT {
                bail!("new flow {i}: verdict {}", verdict_name(v));
            }
            let to = packet::parse(&out)?.ip.dst;
            let b = topo
                .backend_by_ip(to)
                .with_context(|| format!("new flow {i}: DNAT to {to}, not a backend"))?;
            let (cip, cport) = flow_addr(i as u32);
            let reply = Pkt::tcp()
                .eth(b.iface.mac, b.node_iface.mac)
                .ip(b.ip(), cip)
                .ports(BACKEND_PORT, cport)
                .flags(SYN | ACK)
                .seq(1)
                .ack(2)
                .build();
            // Translated back (the client addresses have no route: the verdict may be a
            // pass), so the reverse entry is there.
            let (v, out, _) = plain(prog(dp, Prog::Lb)?, &reply, b.node_iface.ifindex)?;
            if packet::parse(&out)?.ip.src != VIP {
                bail!(
                    "new flow {i}: reply not translated (verdict {})",
                    verdict_name(v)
                );
            }
        }
        Ok(())
    })?
}

/// Times the SYNs of flows `from..to`, each followed by the trivial program on the same
/// frame: (LB ns, trivial ns) per flow.
fn timed(topo: &Topo, dp: &mut Datapath, from: u32, to: u32) -> Result<(Vec<f64>, Vec<f64>)> {
    let idx = topo.client().node_iface.ifindex;
    let frames: Vec<Vec<u8>> = (from..to).map(|i| syn(topo, i)).collect();
    topo.in_node(|| -> Result<(Vec<f64>, Vec<f64>)> {
        let (mut lb, mut tx) = (Vec::new(), Vec::new());
        for (k, f) in frames.iter().enumerate() {
            if k % 1024 == 0 {
                check_stop()?;
            }
            let (v, _, d) = plain(prog(dp, Prog::Lb)?, f, idx)?;
            if v != XDP_REDIRECT {
                bail!(
                    "new flow {}: verdict {}",
                    from as usize + k,
                    verdict_name(v)
                );
            }
            lb.push(d.as_nanos() as f64);
            let (_, _, d) = plain(prog(dp, Prog::Tx)?, f, idx)?;
            tx.push(d.as_nanos() as f64);
        }
        Ok((lb, tx))
    })?
}

/// `--profile new`: SYNs of distinct flows, one plain run each, for `secs`, into a fresh
/// default-size map first filled (untimed) to `fill_pct` % of its flows; from then on the
/// entries of flow `i - window` are deleted from userspace after flow `i`, so the fill stays
/// constant (`window`: the fill, at least `min_window` flows). The deletions show in the
/// profile under the `bpf` syscall's map operations, apart from `bpf_prog_test_run`.
pub fn profile_new(topo: &Topo, secs: f64, fill_pct: u32, min_window: u32) -> Result<()> {
    let mut cfg = DatapathConfig::small(topo.pin_dir("profile-new"));
    cfg.max_conntrack = limits::MAX_CONNTRACK;
    cfg.fib_redirect = true;
    let mut pd = PinnedDp::load(&cfg)?;
    topo.mark_xdp_targets(pd.dp())?;
    pd.dp().writer().upsert_service(&lab_service(topo))?;
    let dp = pd.dp();
    let cap_flows = limits::MAX_CONNTRACK / limits::CT_ENTRIES_PER_FLOW;
    let filled = (u64::from(cap_flows) * u64::from(fill_pct.min(100)) / 100) as u32;
    fill(topo, dp, 0, filled)?;
    let window = filled.max(min_window);
    println!(
        "profiling new flows (plain runs of SYNs, {} flows kept in a map of {} flows) on CPU {} \
         for {secs} s: e.g. `perf record -e cpu-clock -C {} -g -- sleep {}` now",
        count(window.into()),
        count(cap_flows.into()),
        bench_cpu(),
        bench_cpu(),
        secs.floor()
    );
    let idx = topo.client().node_iface.ifindex;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let max_flows = 20_000_000u32;
    let (n, kns) = topo.in_node(|| -> Result<(u32, Vec<f64>)> {
        let mut kns = Vec::new();
        let mut i = filled;
        while i < max_flows {
            if i.is_multiple_of(1024) {
                check_stop()?;
                if Instant::now() >= until {
                    break;
                }
            }
            let f = syn(topo, i);
            let (v, _, d) = plain(prog(dp, Prog::Lb)?, &f, idx)?;
            if v != XDP_REDIRECT {
                bail!("new flow {i}: verdict {}", verdict_name(v));
            }
            kns.push(d.as_nanos() as f64);
            if i >= window {
                let k = fwd_key(i - window);
                let ct = dp.writer().conntrack_map();
                if let Ok(fv) = ct.get(&k, 0) {
                    let rk = k.reverse_of_forward(&fv);
                    let _ = ct.remove(&rk);
                    let _ = ct.remove(&k);
                }
            }
            i += 1;
        }
        Ok((i - filled, kns))
    })??;
    println!(
        "{} new flows, median {} ns, p99 {} ns, mean {} ns (kernel-reported, timer included)",
        count(n.into()),
        ns(median(&kns)),
        ns(percentile(&kns, 99.0)),
        ns(kns.iter().sum::<f64>() / kns.len().max(1) as f64)
    );
    Ok(())
}

/// A conntrack map layout to compare (`RPCLB_BENCH_CT_VARIANTS`, comma-separated; the
/// first is judged): `default` (what the agent creates: `conntrack_map_entries`), `exact`
/// (exactly `--max-conntrack` entries, a power of two: one bucket per entry, as before),
/// `percpu` (the agent's size with `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists, each holding
/// entries / possible CPUs), or `exact+percpu`. Non-default variants are created and pinned
/// here before the data path loads, which adopts pinned maps as they are.
#[derive(Clone, Debug)]
struct Variant {
    name: String,
    /// `Some((max_entries, flags))`: pre-created.
    create: Option<(u32, u32)>,
}

fn variants() -> Result<Vec<Variant>> {
    let spec = std::env::var("RPCLB_BENCH_CT_VARIANTS").unwrap_or_else(|_| "default".into());
    spec.split(',')
        .filter(|s| !s.is_empty())
        .map(|name| {
            let (mut flags, mut entries) = (0, conntrack_map_entries(limits::MAX_CONNTRACK));
            for part in name.split('+') {
                match part {
                    "default" => {}
                    "percpu" => flags |= 2, // BPF_F_NO_COMMON_LRU
                    "exact" => entries = limits::MAX_CONNTRACK,
                    other => bail!("RPCLB_BENCH_CT_VARIANTS: unknown variant {other:?}"),
                }
            }
            Ok(Variant {
                name: name.to_string(),
                create: (name != "default").then_some((entries, flags)),
            })
        })
        .collect()
}

/// Creates an LRU hash `CONNTRACK` of `entries` with `flags` and pins it in `dir`.
fn precreate_conntrack(dir: &std::path::Path, entries: u32, flags: u32) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut attr = [0u8; 128];
    let w =
        |a: &mut [u8; 128], off: usize, v: u32| a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    w(&mut attr, 0, 9); // BPF_MAP_TYPE_LRU_HASH
    w(&mut attr, 4, std::mem::size_of::<FlowKey>() as u32);
    w(
        &mut attr,
        8,
        std::mem::size_of::<lb_common::CtValue>() as u32,
    );
    w(&mut attr, 12, entries);
    w(&mut attr, 16, flags);
    attr[28..37].copy_from_slice(b"CONNTRACK");
    // SAFETY: BPF_MAP_CREATE (0) with a zeroed attr of the size given.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        bail!("BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    }
    let path = std::ffi::CString::new(dir.join("CONNTRACK").as_os_str().as_bytes())?;
    let mut pin = [0u8; 16];
    pin[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    pin[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: BPF_OBJ_PIN (6): pathname and fd.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_ptr(), pin.len()) };
    let e = std::io::Error::last_os_error();
    // SAFETY: our fd; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    if r < 0 {
        bail!("BPF_OBJ_PIN {}: {e}", path.to_string_lossy());
    }
    Ok(())
}

/// One fill level's samples over all rounds.
#[derive(Default)]
struct Level {
    lb: Vec<f64>,
    tx: Vec<f64>,
    /// Per-round medians (LB, and LB minus trivial).
    round_lb: Vec<f64>,
    round_net: Vec<f64>,
}

/// Section `fill`: the new-flow cost at 0%, 25%, 50%, 75% and 90% of the default conntrack
/// map's capacity in flows (`--max-conntrack` entries / `CT_ENTRIES_PER_FLOW`), and at the
/// issue's 300,000 flows. Each round loads a fresh data path (an empty map) per variant, fills
/// it with untimed answered flows (SYN and SYN|ACK) up to each level in turn and times
/// `per_level` new flows (SYNs) there.
pub fn section_fill(opts: &Opts) -> Result<()> {
    header("7. New flows as the conntrack map fills");
    let deadline = Deadline::after(Duration::from_secs(if opts.quick { 60 } else { 240 }));
    let topo = Topo::new(3)?;
    let vars = variants()?;
    let entries = limits::MAX_CONNTRACK;
    let cap_flows = entries / limits::CT_ENTRIES_PER_FLOW;
    let per_level = (opts.new_flows / 5).max(200);
    let rounds = opts.rounds.min(5);
    // (label, flows in the map before the timed ones)
    let mut levels: Vec<(String, u32)> = [0u32, 25, 50, 75, 90]
        .iter()
        .map(|&p| {
            (
                format!("{p}%"),
                (u64::from(cap_flows) * u64::from(p) / 100) as u32,
            )
        })
        .collect();
    let issue = 300_000u32;
    levels.push((
        format!(
            "{} flows ({:.0}%)",
            count(issue.into()),
            100.0 * f64::from(issue) / f64::from(cap_flows)
        ),
        issue,
    ));
    let mut data: Vec<Vec<Level>> = vars
        .iter()
        .map(|_| levels.iter().map(|_| Level::default()).collect())
        .collect();
    let mut done_rounds = 0;
    for round in 0..rounds {
        check_stop()?;
        if round >= 2 && deadline.passed() {
            eprintln!("  (time budget reached after {round} rounds)");
            break;
        }
        for k in 0..vars.len() {
            let vi = (k + round) % vars.len();
            let var = &vars[vi];
            let mut cfg = DatapathConfig::small(topo.pin_dir(&format!("fill{round}-{vi}")));
            cfg.max_conntrack = entries;
            cfg.fib_redirect = true;
            if let Some((n, flags)) = var.create {
                precreate_conntrack(&cfg.pin_path, n, flags)?;
            }
            let mut pd = PinnedDp::load(&cfg)?;
            topo.mark_xdp_targets(pd.dp())?;
            pd.dp().writer().upsert_service(&lab_service(&topo))?;
            let mut next = 0u32;
            for (li, (_, at)) in levels.iter().enumerate() {
                if *at > next {
                    fill(&topo, pd.dp(), next, *at)?;
                    next = *at;
                }
                let (lb, tx) = timed(&topo, pd.dp(), next, next + per_level)?;
                next += per_level;
                let l = &mut data[vi][li];
                l.round_lb.push(median(&lb));
                l.round_net.push(median(&lb) - median(&tx));
                l.lb.extend(lb);
                l.tx.extend(tx);
            }
        }
        done_rounds += 1;
    }
    println!(
        "map: --max-conntrack {} (the default; created with {} entries), {} entries per flow: \
         {} flows of capacity; {} rounds, each a fresh map filled by untimed flows (SYN and SYN|ACK: \
         two entries each), {} timed new flows per level (each followed by the trivial program), CPU {}",
        count(entries.into()),
        count(conntrack_map_entries(entries).into()),
        limits::CT_ENTRIES_PER_FLOW,
        count(cap_flows.into()),
        done_rounds,
        count(per_level.into()),
        bench_cpu()
    );
    let per_round =
        |a: &[f64], b: &[f64]| median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<f64>>());
    let mut worst = Vec::new();
    for (vi, var) in vars.iter().enumerate() {
        if vars.len() > 1 {
            println!("conntrack map: {}", var.name);
        }
        let d = &data[vi];
        let mut t = Table::new(&[
            "flows in the map (of capacity)",
            "median ns",
            "minus trivial",
            "p90 ns",
            "p99 ns",
            "mean ns",
            "vs empty (median of rounds)",
            "minus trivial vs empty",
        ]);
        let (mut w, mut wl) = (0.0f64, String::new());
        for (li, (label, at)) in levels.iter().enumerate() {
            let l = &d[li];
            let r = per_round(&l.round_lb, &d[0].round_lb);
            let rn = per_round(&l.round_net, &d[0].round_net);
            if *at <= cap_flows * 9 / 10 && r > w {
                (w, wl) = (r, label.clone());
            }
            t.row(vec![
                format!("{label}: {}", count((*at).into())),
                ns(median(&l.lb)),
                ns(median(&l.lb) - median(&l.tx)),
                ns(percentile(&l.lb, 90.0)),
                ns(percentile(&l.lb, 99.0)),
                ns(l.lb.iter().sum::<f64>() / l.lb.len().max(1) as f64),
                ratio(r),
                ratio(rn),
            ]);
        }
        print!("{}", t.render());
        worst.push((w, wl));
    }
    println!(
        "\"full\" is the map's capacity in flows; a level's timed flows add {} flows on top of \
         it. Over 100% the LRU evicts the least recently used entries",
        count(per_level.into())
    );
    let (w, wl) = worst[0].clone();
    verdict(
        "new flow as the conntrack map fills (0% to 90% of the default map's flows)",
        "within 10% of the empty-map cost up to 90% full",
        format!(
            "worst {} at {} ({} ns empty, {} ns at 90%)",
            ratio(w),
            wl,
            ns(median(&data[0][0].lb)),
            ns(median(&data[0][4].lb))
        ),
        Some(w <= 1.10),
    );
    Ok(())
}
