//! Section `gc`: the CPU of the agent's conntrack GC per sweep, per scanned entry and per
//! expired flow.
//!
//! A data path's maps (the programs are never loaded: nothing runs a packet) in a private
//! bpffs directory, `CONNTRACK` created as `lb-agent --max-conntrack 1048576` creates it. Each
//! round writes `flows` flows from userspace with `BPF_MAP_UPDATE_BATCH`, as the kernel writes
//! an answered flow (forward entry: client -> VIP, DNAT to one of 4 backends of a real
//! service; reverse entry: backend -> client), plus orphan reverse entries (1%); states
//! cycle SYN, established, closing, UDP; every [`IDLE_EVERY`]th flow and every orphan is idle
//! past its timeout (the agent's default timeouts), the others were seen 1 s ago. Then it
//! times one `gc::tick` (the agent's tick: baseline, `expire_recount`, credit and recount,
//! `sweep6`) on the section's thread, pinned to the benchmark CPU: wall time and the thread's
//! CPU (`getrusage(RUSAGE_THREAD)`: the sum is the scheduler's exact runtime, its split into
//! user and system the kernel's tick-sampled estimate, rough for sweeps of a few ms). Then a
//! second tick right after it, where nothing expires: the steady cost of the scan. The refill
//! is not timed, and runs on a thread of its own ([`FILL_THREAD`]): `perf report --sort
//! pid,sym` shows the sweeps apart. Medians of the rounds.
//!
//! Nothing here sends a packet; the maps are unpinned on drop (and on panic).

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_agent::datapath::reader::{ip_wire, monotonic_ns, v4_only};
use lb_agent::datapath::scratch::ScratchDatapath;
use lb_agent::datapath::{MapWriter, sys};
use lb_agent::gc;
use lb_api::config::Timeouts;
use lb_api::{Algorithm, Backend};
use lb_common::{CtValue, FlowKey, ct_dir, ct_state};

use super::live::{BACKEND_PORT, VIP, VIP_PORT, service};
use super::{
    Deadline, Opts, Table, bench_cpu, check_stop, count, header, median, pin_to_cpu, verdict,
};
use rpclb_tests::packet::answered_flow;

/// `--max-conntrack` of the measured map (room for 500,000 answered flows).
pub const MAP_FLOWS: u32 = 1 << 20;

/// One flow in this many is idle past its timeout when the sweep runs.
pub const IDLE_EVERY: u32 = 4;

const S: u64 = 1_000_000_000;

/// The thread that empties and refills the map between timed sweeps (the sweeps run on the
/// section's thread).
pub const FILL_THREAD: &str = "rpclb-gc-fill";

/// Timeouts under which every flow is expired: empties the map.
const ZERO: Timeouts = Timeouts {
    tcp_syn: Duration::ZERO,
    tcp_established: Duration::ZERO,
    tcp_closing: Duration::ZERO,
    udp: Duration::ZERO,
};

/// The flow counts of the section: `--gc-flows`, else these.
pub fn default_sizes(quick: bool) -> Vec<u32> {
    if quick {
        vec![10_000, 40_000]
    } else {
        vec![100_000, 400_000]
    }
}

/// A thread's CPU time so far (`getrusage(RUSAGE_THREAD)`): (user, system).
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: a zeroed rusage filled by the kernel for the calling thread.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// One timed tick.
#[derive(Clone, Copy, Debug, Default)]
struct Timed {
    wall: Duration,
    user: Duration,
    sys: Duration,
    scanned: u64,
    expired: u64,
    orphans: u64,
}

impl Timed {
    fn cpu(&self) -> Duration {
        self.user + self.sys
    }
}

fn timed_tick(w: &Mutex<MapWriter>, t: &Timeouts) -> Result<Timed> {
    let (u0, s0) = thread_cpu();
    let t0 = Instant::now();
    let tick = gc::tick(w, t).context("GC tick")?;
    let wall = t0.elapsed();
    let (u1, s1) = thread_cpu();
    tick.v6.context("IPv6 sweep")?;
    Ok(Timed {
        wall,
        user: u1 - u0,
        sys: s1 - s0,
        scanned: tick.report.scanned,
        expired: tick.report.expired,
        orphans: tick.report.orphans,
    })
}

/// The entries of `flows` answered flows and `flows / 100` orphans, idle as the module docs
/// say at `now`; and how many flows expire.
fn entries(
    flows: u32,
    svc_id: u32,
    backends: &[(u32, Ipv4Addr, u16)],
    t: &Timeouts,
    now: u64,
) -> (Vec<FlowKey>, Vec<CtValue>, u64) {
    let states = [
        ct_state::SYN,
        ct_state::ESTABLISHED,
        ct_state::CLOSING,
        ct_state::UDP,
    ];
    let old = now - (gc::longest(t).as_secs() + 10) * S;
    let orphans = flows / 100;
    let n = 2 * flows as usize + orphans as usize;
    let (mut keys, mut vals) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut expiring = 0;
    for i in 0..flows {
        let state = states[(i % 4) as usize];
        // Backends change every 4 flows: every state on every backend.
        let (bid, bip, bport) = backends[((i / 4) as usize) % backends.len()];
        let idle = i % IDLE_EVERY == IDLE_EVERY - 1;
        expiring += idle as u64;
        let seen = if idle { old } else { now - S };
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i / 16);
        let proto = if state == ct_state::UDP { 17 } else { 6 };
        let sport = 40_000 + (i % 16) as u16;
        for (k, v) in answered_flow(
            proto,
            (client, sport),
            (VIP, VIP_PORT),
            (bid, bip, bport),
            svc_id,
            state,
            seen,
        ) {
            keys.push(k);
            vals.push(v);
        }
    }
    let (bid, bip, bport) = backends[0];
    for j in 0..orphans {
        keys.push(FlowKey {
            src_ip: ip_wire(bip),
            dst_ip: ip_wire(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + j)),
            src_port: bport.to_be(),
            dst_port: 40_000u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        });
        vals.push(CtValue {
            nat_ip: ip_wire(VIP),
            nat_port: VIP_PORT.to_be(),
            dir: ct_dir::REVERSE,
            svc_id,
            backend_id: bid,
            created_ns: old,
            last_seen_ns: old,
            ..Default::default()
        });
    }
    (keys, vals, expiring)
}

/// Per size: (flows, expiring sweeps, quiet sweeps).
type Results = Vec<(u32, Vec<Timed>, Vec<Timed>)>;

pub fn section_gc(opts: &Opts) -> Result<()> {
    header("GC: the agent's conntrack sweep, CPU per scanned entry and per expired flow");
    let sizes = if opts.gc_flows.is_empty() {
        default_sizes(opts.quick)
    } else {
        opts.gc_flows.clone()
    };
    let rounds = opts.rounds.clamp(1, 15);
    let deadline = Deadline::after(Duration::from_secs(300));
    let mut dp = ScratchDatapath::new(|c| c.max_conntrack = MAP_FLOWS).context("load maps")?;
    let svc = service(
        "bench/gc:http",
        VIP,
        Algorithm::RoundRobin,
        (1..=4)
            .map(|i| Backend::new(Ipv4Addr::new(10, 244, 10 + i, 2), BACKEND_PORT))
            .collect(),
    );
    dp.writer().upsert_service(&svc)?;
    let svc_id = dp.writer().service_id(&svc.addr()).context("service id")?;
    let backends: Vec<(u32, Ipv4Addr, u16)> = dp
        .writer()
        .backend_stats(&svc.addr())?
        .iter()
        .map(|b| (b.id, v4_only(b.ip), b.port))
        .collect();
    // The tick's own writer on the pinned maps, behind a lock as the agent's.
    let w = Mutex::new(MapWriter::open_pinned(dp.dir()).context("open the pinned maps")?);
    let fd = dp.writer().conntrack_fd().as_raw_fd();
    let t = Timeouts::default();
    pin_to_cpu(bench_cpu());
    let mut results: Results = Vec::new();
    for &flows in &sizes {
        if 2 * flows + flows / 100 > MAP_FLOWS {
            bail!("--gc-flows {flows}: more entries than the map's {MAP_FLOWS}");
        }
        let (mut exp, mut quiet) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            check_stop()?;
            if deadline.passed() && round > 0 {
                eprintln!("gc: time cap reached after {round} rounds of {flows} flows");
                break;
            }
            // Untimed, on its own thread (a profile tells it apart): empty the map (the
            // previous size's kept flows go too), then write the round's entries.
            let (n, expiring) = std::thread::scope(|sc| {
                std::thread::Builder::new()
                    .name(FILL_THREAD.into())
                    .spawn_scoped(sc, || -> Result<(usize, u64)> {
                        timed_tick(&w, &ZERO)?;
                        let now = monotonic_ns();
                        let (keys, vals, expiring) = entries(flows, svc_id, &backends, &t, now);
                        sys::update_batch(fd, &keys, &vals, 8192)
                            .context("BPF_MAP_UPDATE_BATCH")?;
                        Ok((keys.len(), expiring))
                    })
                    .context("spawn the fill thread")?
                    .join()
                    .map_err(|_| anyhow::anyhow!("the fill thread panicked"))?
            })?;
            let a = timed_tick(&w, &t)?;
            if a.scanned != n as u64 || a.expired != expiring {
                bail!(
                    "{flows} flows: the sweep scanned {} entries (wrote {}), expired {} (want {expiring})",
                    a.scanned,
                    n,
                    a.expired
                );
            }
            let b = timed_tick(&w, &t)?;
            if b.expired != 0 || b.orphans != 0 {
                bail!(
                    "{flows} flows: the second sweep expired {} flows",
                    b.expired
                );
            }
            exp.push(a);
            quiet.push(b);
        }
        results.push((flows, exp, quiet));
    }
    report(&results);
    Ok(())
}

fn report(results: &Results) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut tab = Table::new(&[
        "flows (sweep)",
        "entries",
        "expired",
        "wall ms",
        "CPU ms",
        "user ms",
        "sys ms",
        "µs/entry",
        "µs/expired",
    ]);
    let mut last = None;
    for (flows, exp, quiet) in results {
        for (what, v) in [("expiring", exp), ("nothing expires", quiet)] {
            if v.is_empty() {
                continue;
            }
            let med = |f: &dyn Fn(&Timed) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
            let cpu = med(&|x| ms(x.cpu()));
            let entries = v[0].scanned;
            let expired = v[0].expired;
            let per_exp = if expired > 0 {
                format!("{:.2}", cpu * 1e3 / expired as f64)
            } else {
                "-".into()
            };
            tab.row(vec![
                format!("{} ({what})", count(*flows as u64)),
                count(entries),
                count(expired),
                format!("{:.1}", med(&|x| ms(x.wall))),
                format!("{cpu:.1}"),
                format!("{:.1}", med(&|x| ms(x.user))),
                format!("{:.1}", med(&|x| ms(x.sys))),
                format!("{:.3}", cpu * 1e3 / entries.max(1) as f64),
                per_exp,
            ]);
            if what == "expiring" {
                last = Some((*flows, cpu, entries, expired));
            }
        }
    }
    print!("{}", tab.render());
    println!(
        "(medians of {} rounds; CPU = the sweeping thread's user + system time; one flow in {IDLE_EVERY} \
         and 1% orphans idle past their timeout; map of {} flows)",
        results.first().map_or(0, |r| r.1.len()),
        count(MAP_FLOWS as u64)
    );
    if let Some((flows, cpu, entries, expired)) = last {
        verdict(
            &format!("GC CPU per expired flow ({} flows)", count(flows as u64)),
            "informational",
            format!(
                "{:.2} µs ({cpu:.1} ms CPU per sweep of {} entries, {} expired)",
                cpu * 1e3 / expired.max(1) as f64,
                count(entries),
                count(expired)
            ),
            None,
        );
    }
}
