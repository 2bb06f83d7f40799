//! Conntrack GC against the real maps (needs root).
//!
//! Flows are opened by running real packets through the XDP program
//! (BPF_PROG_TEST_RUN), so the kernel counts the opens and closes; then their
//! timestamps are aged by rewriting the entries, and a sweep with short
//! timeouts must remove exactly the idle ones and bring the active counts
//! back down. A second test sweeps 1,000,000 entries.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use lb_agent::config::Timeouts;
use lb_agent::datapath::reader::{ip_wire, monotonic_ns};
use lb_agent::datapath::scratch::{Hook, ScratchDatapath};
use lb_agent::datapath::{MapWriter, sys};
use lb_agent::gc;
use lb_api::{Algorithm, Backend, Protocol, Service, ServiceAddr};
use lb_common::{CtValue, FlowKey, ct_dir, ct_state};
use rpclb_tests::packet::{ACK, CLIENT, FIN, SYN, UDP_VIP, VIP, answered_flow, frame};

const S: u64 = 1_000_000_000;

fn can_run() -> bool {
    lb_agent::datapath::scratch::require_root("GC tests")
}

/// A data path pinned in a private directory, unpinned on drop (and on panic).
struct Harness(ScratchDatapath);

impl Harness {
    fn new(max_conntrack: Option<u32>) -> Harness {
        let dp = ScratchDatapath::new(|c| {
            c.fib_redirect = false;
            if let Some(n) = max_conntrack {
                c.max_conntrack = n;
            }
        });
        Harness(dp.expect("load data path"))
    }

    fn w(&mut self) -> &mut MapWriter {
        self.0.writer()
    }

    /// Runs a frame through the XDP program; returns its verdict.
    fn run(&mut self, frame: &[u8]) -> u32 {
        self.0.run(Hook::Xdp, frame).expect("BPF_PROG_TEST_RUN").0
    }
}

fn service(name: &str, vip: Ipv4Addr, port: u16, proto: Protocol, bs: &[(u8, u16)]) -> Service {
    Service {
        max_per_backend: None,
        selector: None,
        external: Default::default(),
        name: name.into(),
        vip: vip.into(),
        port,
        protocol: proto,
        algorithm: Algorithm::RoundRobin,
        affinity_timeout: None,
        maglev_table_size: None,
        locality: None,
        grpc: None,
        health_check: None,
        backends: bs
            .iter()
            .map(|&(i, p)| Backend::new(Ipv4Addr::new(10, 244, 10 + i, 2), p))
            .collect(),
    }
}

/// `svc`'s backends behind a second frontend (another VIP): a backend with two
/// frontends keeps the eager path, whose SYN writes both conntrack entries
/// (with one frontend the reverse entry waits for the first reply; those
/// flows are tested in datapath_packet). The GC tests below want both
/// entries from the start.
fn twin(svc: &Service, last: u8) -> Service {
    Service {
        name: format!("{}-twin", svc.name),
        vip: Ipv4Addr::new(10, 96, 1, last).into(),
        ..svc.clone()
    }
}

fn fwd_key(proto: u8, client: Ipv4Addr, sport: u16, vip: Ipv4Addr, dport: u16) -> FlowKey {
    FlowKey {
        src_ip: ip_wire(client),
        dst_ip: ip_wire(vip),
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// Sets an entry's last-seen to `age_s` seconds before `now`.
fn age(w: &mut MapWriter, k: &FlowKey, now: u64, age_s: u64) {
    let m = w.conntrack_map();
    let mut v = m.get(k, 0).expect("entry exists");
    v.last_seen_ns = now - age_s * S;
    m.insert(k, v, 0).unwrap();
}

fn all_entries(w: &MapWriter) -> HashMap<FlowKey, CtValue> {
    let mut m = HashMap::new();
    gc::for_each_entry(w.conntrack_fd(), |k, v| {
        m.insert(*k, *v);
    })
    .unwrap();
    m
}

fn total_active(w: &MapWriter, addrs: &[ServiceAddr]) -> u64 {
    addrs
        .iter()
        .flat_map(|a| w.backend_stats(a).unwrap())
        .map(|b| b.active)
        .sum()
}

#[test]
fn sweep_expires_exactly_the_idle_flows_and_fixes_active_counts() {
    if !can_run() {
        return;
    }
    let mut h = Harness::new(None);
    let web = service(
        "demo/web:http",
        VIP,
        80,
        Protocol::Tcp,
        &[(1, 8080), (2, 8080)],
    );
    let dns = service("demo/dns:dns", UDP_VIP, 53, Protocol::Udp, &[(3, 5353)]);
    h.w().upsert_service(&web).unwrap();
    h.w().upsert_service(&dns).unwrap();
    h.w().upsert_service(&twin(&web, 1)).unwrap();
    h.w().upsert_service(&twin(&dns, 2)).unwrap();
    let addrs = [web.addr(), dns.addr()];

    // Open flows with real packets. Client ports name the cases:
    // 1001 SYN idle (expires), 1002 SYN fresh, 1003 established idle on both
    // entries (expires), 1004 established with a fresh reverse entry,
    // 1005 closed and idle (expires, not credited: the kernel counted the
    // close), 1006 closed and fresh, 2001 UDP idle (expires), 2002 UDP fresh.
    for p in 1001..=1006 {
        h.run(&frame(6, CLIENT, p, VIP, 80, SYN));
    }
    for p in [1003, 1004] {
        h.run(&frame(6, CLIENT, p, VIP, 80, ACK));
    }
    for p in [1005, 1006] {
        h.run(&frame(6, CLIENT, p, VIP, 80, FIN | ACK));
    }
    for p in [2001, 2002] {
        h.run(&frame(17, CLIENT, p, UDP_VIP, 53, 0));
    }
    let before = all_entries(h.w());
    assert_eq!(before.len(), 16, "8 flows, 2 entries each");
    assert_eq!(total_active(h.w(), &addrs), 6, "8 opens - 2 closes");

    let key = |p: u16| {
        if p >= 2000 {
            fwd_key(17, CLIENT, p, UDP_VIP, 53)
        } else {
            fwd_key(6, CLIENT, p, VIP, 80)
        }
    };
    let state_of = |p: u16| before[&key(p)].state;
    assert_eq!(state_of(1001), ct_state::SYN);
    assert_eq!(state_of(1003), ct_state::ESTABLISHED);
    assert_eq!(state_of(1005), ct_state::CLOSING);
    assert_eq!(state_of(2001), ct_state::UDP);

    // Age the entries. Timeouts: SYN 5 s, established 100 s, closing 5 s,
    // UDP 30 s (the longest, 100 s, applies to orphans).
    let t = Timeouts {
        tcp_syn: Duration::from_secs(5),
        tcp_established: Duration::from_secs(100),
        tcp_closing: Duration::from_secs(5),
        udp: Duration::from_secs(30),
    };
    let now = monotonic_ns();
    let ages: &[(u16, u64, u64)] = &[
        // (port, forward age, reverse age)
        (1001, 10, 10),
        (1002, 1, 1),
        (1003, 200, 200),
        (1004, 200, 50),
        (1005, 10, 10),
        (1006, 1, 1),
        (2001, 100, 100),
        (2002, 1, 29),
    ];
    for &(p, fa, ra) in ages {
        let k = key(p);
        let rk = k.reverse_of_forward(&before[&k]);
        age(h.w(), &k, now, fa);
        age(h.w(), &rk, now, ra);
    }
    // Orphan reverse entries (no forward entry): one past the longest
    // timeout, one not; and a forward entry without a reverse entry whose
    // backend id names no backend (its credit must be dropped).
    let orphan = |port: u16, age_s: u64| {
        let k = FlowKey {
            src_ip: ip_wire(Ipv4Addr::new(10, 244, 11, 2)),
            dst_ip: ip_wire(Ipv4Addr::new(10, 244, 9, 9)),
            src_port: 8080u16.to_be(),
            dst_port: port.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        let v = CtValue {
            nat_ip: ip_wire(VIP),
            nat_port: 80u16.to_be(),
            dir: ct_dir::REVERSE,
            svc_id: 1,
            backend_id: 1,
            created_ns: now - age_s * S,
            last_seen_ns: now - age_s * S,
            ..Default::default()
        };
        (k, v)
    };
    let (old_orphan, ov) = orphan(3001, 1000);
    let (young_orphan, yv) = orphan(3002, 10);
    let lone = fwd_key(6, Ipv4Addr::new(10, 244, 9, 9), 3003, VIP, 80);
    let lone_v = CtValue {
        nat_ip: ip_wire(Ipv4Addr::new(10, 244, 99, 2)),
        nat_port: 8080u16.to_be(),
        dir: ct_dir::FORWARD,
        svc_id: 1,
        backend_id: 4000,
        state: ct_state::ESTABLISHED,
        created_ns: now - 1000 * S,
        last_seen_ns: now - 1000 * S,
        ..Default::default()
    };
    {
        let m = h.w().conntrack_map();
        m.insert(old_orphan, ov, 0).unwrap();
        m.insert(young_orphan, yv, 0).unwrap();
        m.insert(lone, lone_v, 0).unwrap();
    }

    // Expected credits per backend: the idle flows that never closed.
    let mut want_active: HashMap<u32, u64> = HashMap::new();
    for p in [1002, 1004, 2002] {
        *want_active.entry(before[&key(p)].backend_id).or_default() += 1;
    }

    let r = gc::sweep(h.w(), &t, now).unwrap();
    eprintln!("{}", serde_json::to_string(&r).unwrap());
    assert_eq!(r.scanned, 19);
    assert_eq!(r.flows, 9);
    assert_eq!(r.expired, 5);
    assert_eq!(
        r.expired_by_state,
        gc::ByState {
            syn: 1,
            established: 2,
            closing: 1,
            udp: 1
        }
    );
    assert_eq!(r.accounted, 3);
    assert_eq!(r.stale_backend, 1);
    assert_eq!(r.orphans, 1);
    assert_eq!(r.revived, 0);
    assert_eq!(r.entries_after, 9);

    let after = all_entries(h.w());
    let kept: BTreeSet<u16> = after
        .iter()
        .filter(|(_, v)| v.dir == ct_dir::FORWARD)
        .map(|(k, _)| u16::from_be(k.src_port))
        .collect();
    assert_eq!(kept, BTreeSet::from([1002, 1004, 1006, 2002]));
    for p in [1002, 1004, 1006, 2002] {
        let k = key(p);
        assert!(after.contains_key(&k.reverse_of_forward(&before[&k])));
    }
    for p in [1001, 1003, 1005, 2001] {
        let k = key(p);
        assert!(!after.contains_key(&k.reverse_of_forward(&before[&k])));
    }
    assert!(!after.contains_key(&old_orphan));
    assert!(after.contains_key(&young_orphan));
    assert!(!after.contains_key(&lone));
    assert_eq!(after.len(), 9);

    // Active counts: back down to the flows still open.
    assert_eq!(total_active(h.w(), &addrs), 3);
    for a in &addrs {
        for b in h.w().backend_stats(a).unwrap() {
            assert_eq!(
                b.active,
                want_active.get(&b.id).copied().unwrap_or(0),
                "backend {}:{}",
                b.ip,
                b.port
            );
        }
    }

    // A second sweep at the same time finds nothing more to do. (Split in
    // two, as an agent holding its writer behind a lock would run it: the
    // conntrack half on its own dup of the fd, then the credit.)
    let fd = h.w().conntrack_fd().try_clone_to_owned().unwrap();
    let pending = gc::expire(fd.as_fd(), &t, now).unwrap();
    assert_eq!(pending.report().expired, 0);
    let r2 = pending.credit(h.w()).unwrap();
    assert_eq!((r2.expired, r2.orphans, r2.accounted), (0, 0, 0));
    assert_eq!(r2.scanned, 9);

    // Later, everything is idle: all flows go. 1006 was closed in the
    // kernel, so only 1002, 1004 and 2002 are credited, and every backend
    // ends with opens = closes + expired.
    let later = now + 1000 * S;
    let r3 = gc::sweep(h.w(), &t, later).unwrap();
    assert_eq!(r3.expired, 4);
    assert_eq!(r3.accounted, 3);
    assert_eq!(r3.orphans, 1);
    assert_eq!(all_entries(h.w()).len(), 0);
    assert_eq!(total_active(h.w(), &addrs), 0);
    for a in &addrs {
        for b in h.w().backend_stats(a).unwrap() {
            let (c, expired) = h.w().backend_conn_counts(b.id).unwrap();
            assert_eq!(
                c.opens,
                c.closes + expired,
                "backend {}:{}: opens = closes + expired",
                b.ip,
                b.port
            );
        }
    }
}

/// Inserts entries with BPF_MAP_UPDATE_BATCH (8,192 per call).
fn insert_batch(w: &MapWriter, keys: &[FlowKey], vals: &[CtValue]) {
    sys::update_batch(w.conntrack_fd().as_raw_fd(), keys, vals, 8192)
        .expect("BPF_MAP_UPDATE_BATCH");
}

#[test]
fn sweep_one_million_entries() {
    if !can_run() {
        return;
    }
    const FLOWS: u32 = 500_000; // 1,000,000 entries
    const ORPHANS: u32 = 1_000;
    let mut h = Harness::new(Some(1 << 21));
    let svc = service(
        "demo/big:http",
        VIP,
        80,
        Protocol::Tcp,
        &[(1, 8080), (2, 8080), (3, 8080), (4, 8080)],
    );
    h.w().upsert_service(&svc).unwrap();
    let backends: Vec<(u32, std::net::IpAddr, u16)> = h
        .w()
        .backend_stats(&svc.addr())
        .unwrap()
        .iter()
        .map(|b| (b.id, b.ip, b.port))
        .collect();
    let svc_id = h.w().service_id(&svc.addr()).unwrap();
    let now = monotonic_ns();
    let t = Timeouts {
        tcp_syn: Duration::from_secs(10),
        tcp_established: Duration::from_secs(100),
        tcp_closing: Duration::from_secs(10),
        udp: Duration::from_secs(30),
    };
    let states = [
        ct_state::SYN,
        ct_state::ESTABLISHED,
        ct_state::CLOSING,
        ct_state::UDP,
    ];
    // Flow i: state i % 4, backend (i / 4) % 4, idle 1000 s when i % 8 < 4
    // (expires), else 1 s.
    let idle = |i: u32| i % 8 < 4;
    let mut keys = Vec::with_capacity(2 * FLOWS as usize + ORPHANS as usize);
    let mut vals = Vec::with_capacity(keys.capacity());
    let mut want_credit: HashMap<u32, u64> = HashMap::new();
    for i in 0..FLOWS {
        let state = states[(i % 4) as usize];
        let (bid, bip, bport) = backends[((i / 4) % 4) as usize];
        let proto = if state == ct_state::UDP { 17 } else { 6 };
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i);
        let seen = now - if idle(i) { 1000 } else { 1 } * S;
        let bip = lb_agent::datapath::reader::v4_only(bip);
        for (k, v) in answered_flow(
            proto,
            (client, 40000),
            (VIP, 80),
            (bid, bip, bport),
            svc_id,
            state,
            seen,
        ) {
            keys.push(k);
            vals.push(v);
        }
        if idle(i) && state != ct_state::CLOSING {
            *want_credit.entry(bid).or_default() += 1;
        }
    }
    for j in 0..ORPHANS {
        let k = FlowKey {
            src_ip: ip_wire(lb_agent::datapath::reader::v4_only(backends[0].1)),
            dst_ip: ip_wire(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + j)),
            src_port: 8080u16.to_be(),
            dst_port: 40000u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        keys.push(k);
        vals.push(CtValue {
            nat_ip: ip_wire(VIP),
            nat_port: 80u16.to_be(),
            dir: ct_dir::REVERSE,
            svc_id,
            backend_id: backends[0].0,
            created_ns: now - 1000 * S,
            last_seen_ns: now - 1000 * S,
            ..Default::default()
        });
    }
    let t0 = Instant::now();
    insert_batch(h.w(), &keys, &vals);
    eprintln!("inserted {} entries in {:?}", keys.len(), t0.elapsed());
    drop((keys, vals));

    let expired_before: HashMap<u32, u64> = backends
        .iter()
        .map(|&(id, ..)| (id, h.w().backend_conn_counts(id).unwrap().1))
        .collect();
    let r = gc::sweep(h.w(), &t, now).unwrap();
    eprintln!(
        "sweep of {} entries: {:?} ({} flows expired, {} orphans)",
        r.scanned, r.duration, r.expired, r.orphans
    );
    assert_eq!(r.scanned, (2 * FLOWS + ORPHANS) as u64);
    assert_eq!(r.flows, FLOWS as u64);
    assert_eq!(r.expired, (FLOWS / 2) as u64);
    let q = (FLOWS / 8) as u64;
    assert_eq!(
        r.expired_by_state,
        gc::ByState {
            syn: q,
            established: q,
            closing: q,
            udp: q
        }
    );
    assert_eq!(r.accounted, 3 * q);
    assert_eq!(r.orphans, ORPHANS as u64);
    assert_eq!(r.entries_after, FLOWS as u64);
    for &(id, ..) in &backends {
        let now_expired = h.w().backend_conn_counts(id).unwrap().1;
        assert_eq!(
            now_expired - expired_before[&id],
            want_credit.get(&id).copied().unwrap_or(0),
            "backend id {id}"
        );
    }

    // What is left is exactly the fresh flows.
    let mut left = 0u64;
    let mut bad = 0u64;
    gc::for_each_entry(h.w().conntrack_fd(), |k, v| {
        left += 1;
        let client = if v.dir == ct_dir::FORWARD {
            k.src_ip
        } else {
            k.dst_ip
        };
        let i = u32::from(Ipv4Addr::from(client.to_ne_bytes()))
            .wrapping_sub(u32::from(Ipv4Addr::new(10, 128, 0, 0)));
        if i >= FLOWS || idle(i) {
            bad += 1;
        }
    })
    .unwrap();
    assert_eq!(left, FLOWS as u64);
    assert_eq!(bad, 0);

    // A sweep with nothing to expire: the cost of the scan alone.
    let r2 = gc::sweep(h.w(), &t, now).unwrap();
    eprintln!(
        "sweep of {} entries, none expired: {:?}",
        r2.scanned, r2.duration
    );
    assert_eq!((r2.expired, r2.orphans), (0, 0));
    assert_eq!(r2.scanned, FLOWS as u64);
}

/// Flows that the conntrack LRU evicts never close and never expire; a
/// tracked sweep finds them gone and corrects the active counts.
#[test]
fn tracked_sweep_credits_evicted_flows() {
    if !can_run() {
        return;
    }
    let mut h = Harness::new(None);
    let web = service("demo/web:http", VIP, 80, Protocol::Tcp, &[(1, 8080)]);
    h.w().upsert_service(&web).unwrap();
    for p in 3001..=3004 {
        h.run(&frame(6, CLIENT, p, VIP, 80, SYN));
    }
    h.run(&frame(6, CLIENT, 3004, VIP, 80, FIN | ACK));
    assert_eq!(total_active(h.w(), &[web.addr()]), 3);
    let t = Timeouts::default();
    let mut tracker = gc::Tracker::default();
    let fd = h.w().conntrack_fd().try_clone_to_owned().unwrap();
    let r = gc::expire_tracked(fd.as_fd(), &t, monotonic_ns(), &mut tracker)
        .unwrap()
        .credit(h.w())
        .unwrap();
    assert_eq!((r.expired, r.evicted), (0, 0));
    assert_eq!(
        tracker.len(),
        3,
        "three open flows tracked, the closed one not"
    );

    // "Evict" two open flows and the closed one, as the LRU would.
    for p in [3001, 3002, 3004] {
        h.w()
            .conntrack_map()
            .remove(&fwd_key(6, CLIENT, p, VIP, 80))
            .unwrap();
    }
    // A re-created flow (new created_ns) also means the old one was evicted.
    let k3 = fwd_key(6, CLIENT, 3003, VIP, 80);
    let mut v3 = h.w().conntrack_map().get(&k3, 0).unwrap();
    v3.created_ns += 1;
    h.w().conntrack_map().insert(k3, v3, 0).unwrap();
    let r = gc::expire_tracked(fd.as_fd(), &t, monotonic_ns(), &mut tracker)
        .unwrap()
        .credit(h.w())
        .unwrap();
    assert_eq!(
        r.evicted, 3,
        "3001, 3002 evicted, 3003 re-created; the closed 3004 is not credited"
    );
    assert_eq!(r.accounted, 3);
    // 4 opens - 1 close - 3 credited; the re-created 3003 entry itself was not
    // opened by the kernel in this test, so the count is 0.
    assert_eq!(total_active(h.w(), &[web.addr()]), 0);
    assert_eq!(tracker.len(), 1, "the re-created flow is tracked");
}

/// The agent's recount: whatever the counters say, one sweep sets each
/// backend's active count to the open flows conntrack holds, and what they
/// believed open beyond that is reported as evicted.
#[test]
fn recount_heals_active_counts_and_counts_evictions() {
    if !can_run() {
        return;
    }
    let mut h = Harness::new(None);
    let web = service(
        "demo/web:http",
        VIP,
        80,
        Protocol::Tcp,
        &[(1, 8080), (2, 8080)],
    );
    h.w().upsert_service(&web).unwrap();
    h.w().upsert_service(&twin(&web, 1)).unwrap();
    let addrs = [web.addr()];
    for p in 4001..=4010 {
        h.run(&frame(6, CLIENT, p, VIP, 80, SYN));
    }
    h.run(&frame(6, CLIENT, 4010, VIP, 80, FIN | ACK));
    assert_eq!(total_active(h.w(), &addrs), 9);
    // The LRU evicts four open flows (both entries): nobody counts a close.
    for p in 4001..=4004 {
        let k = fwd_key(6, CLIENT, p, VIP, 80);
        let v = h.w().conntrack_map().get(&k, 0).unwrap();
        h.w().conntrack_map().remove(&k).unwrap();
        h.w()
            .conntrack_map()
            .remove(&k.reverse_of_forward(&v))
            .unwrap();
    }
    let t = Timeouts::default();
    // The incremental sweep (no tracker) cannot see them: 9 stays 9.
    let r = gc::sweep(h.w(), &t, monotonic_ns()).unwrap();
    assert_eq!((r.expired, r.evicted), (0, 0));
    assert_eq!(total_active(h.w(), &addrs), 9, "stale without a recount");

    let fd = h.w().conntrack_fd().try_clone_to_owned().unwrap();
    let recount = |h: &mut Harness, now: u64| {
        let base = gc::Baseline::read(h.w()).unwrap();
        gc::expire_recount(fd.as_fd(), &t, now, base)
            .unwrap()
            .credit(h.w())
            .unwrap()
    };
    let r = recount(&mut h, monotonic_ns());
    // Recounted: web's two backends and the twin's two.
    assert_eq!((r.evicted, r.undercounted, r.recounted), (4, 0, 4));
    assert_eq!(total_active(h.w(), &addrs), 5, "healed in one sweep");
    // Per backend: exactly the open flows conntrack holds on it.
    let open_on = |w: &MapWriter, id: u32| {
        all_entries(w)
            .values()
            .filter(|v| {
                v.dir == ct_dir::FORWARD && v.backend_id == id && v.state != ct_state::CLOSING
            })
            .count() as u64
    };
    for b in h.w().backend_stats(&web.addr()).unwrap() {
        assert_eq!(b.active, open_on(h.w(), b.id), "backend {}", b.ip);
    }

    // From there the kernel's own counting goes on exactly.
    h.run(&frame(6, CLIENT, 4020, VIP, 80, SYN));
    h.run(&frame(6, CLIENT, 4021, VIP, 80, SYN));
    h.run(&frame(6, CLIENT, 4005, VIP, 80, FIN | ACK));
    assert_eq!(total_active(h.w(), &addrs), 6);
    let r = recount(&mut h, monotonic_ns());
    assert_eq!((r.evicted, r.undercounted), (0, 0));
    assert_eq!(total_active(h.w(), &addrs), 6);

    // Expiry under a recount: everything idle, all gone, nothing evicted.
    let r = recount(&mut h, monotonic_ns() + 86_400 * S);
    assert_eq!(r.expired, 8);
    assert_eq!(r.evicted, 0);
    assert_eq!(all_entries(h.w()).len(), 0);
    assert_eq!(total_active(h.w(), &addrs), 0);
}

/// Reverse-conntrack collisions (docs/reliability.md): GC deletes a reverse
/// entry only with the flow that owns it.
///
/// First the kernel's own entries: A (client:5000 -> VIP, closed) and B
/// (client:5000 -> VIP2, open) through one backend; B got a rewritten source
/// port, so A's expiry takes A's two entries and leaves B's, whose replies
/// still translate. Then the case the rule is for: a reverse entry at A's
/// reverse key that belongs to another, live flow D (as a kernel without port
/// rewrites left it); A's expiry must leave it.
#[test]
fn sweep_leaves_a_reverse_entry_it_does_not_own() {
    if !can_run() {
        return;
    }
    const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
    const VIP3: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
    let mut h = Harness::new(None);
    for (name, vip) in [("demo/a:http", VIP), ("demo/b:http", VIP2)] {
        h.w()
            .upsert_service(&service(name, vip, 80, Protocol::Tcp, &[(1, 8080)]))
            .unwrap();
    }
    let t = Timeouts {
        tcp_syn: Duration::from_secs(5),
        tcp_established: Duration::from_secs(100),
        tcp_closing: Duration::from_secs(5),
        udp: Duration::from_secs(30),
    };
    let a = fwd_key(6, CLIENT, 5000, VIP, 80);
    let b = fwd_key(6, CLIENT, 5000, VIP2, 80);
    h.run(&frame(6, CLIENT, 5000, VIP, 80, SYN));
    h.run(&frame(6, CLIENT, 5000, VIP, 80, FIN | ACK));
    h.run(&frame(6, CLIENT, 5000, VIP2, 80, SYN));
    let before = all_entries(h.w());
    assert_eq!(before.len(), 4, "two flows, two entries each");
    let (av, bv) = (before[&a], before[&b]);
    assert_eq!(av.state, ct_state::CLOSING);
    assert_ne!(bv.client_port, 0, "B's source port was rewritten");
    let (ark, brk) = (a.reverse_of_forward(&av), b.reverse_of_forward(&bv));
    assert_ne!(ark, brk);
    assert!(a.owns_reverse(&av, &ark, &before[&ark]));
    assert!(b.owns_reverse(&bv, &brk, &before[&brk]));
    let now = monotonic_ns();
    age(h.w(), &a, now, 10);
    age(h.w(), &ark, now, 10);
    let r = gc::sweep(h.w(), &t, now).unwrap();
    assert_eq!((r.expired, r.orphans), (1, 0));
    let after = all_entries(h.w());
    assert_eq!(after.len(), 2, "A's entries gone");
    assert!(
        after.contains_key(&b) && after.contains_key(&brk),
        "B's kept"
    );
    // B's reply still goes back to VIP2 and the client's own port.
    let reply = frame(
        6,
        Ipv4Addr::new(10, 244, 11, 2),
        8080,
        CLIENT,
        u16::from_be(bv.client_port),
        SYN | ACK,
    );
    let (_, out) = h.0.run(Hook::Xdp, &reply).unwrap();
    let p = rpclb_tests::packet::parse(&out).unwrap();
    let tcp = p.tcp().unwrap();
    assert_eq!((p.ip.src, tcp.sport, tcp.dport), (VIP2, 80, 5000));

    // A closed flow A2 (client:6000 -> VIP), idle, and at its reverse key
    // an entry of the live flow D (client:6000 -> VIP3) through the same
    // backend, with D's forward entry: A2's expiry deletes A2's forward
    // entry only.
    let a2 = fwd_key(6, CLIENT, 6000, VIP, 80);
    let d = fwd_key(6, CLIENT, 6000, VIP3, 80);
    let fwd_v = |state, age_s: u64| CtValue {
        nat_ip: ip_wire(Ipv4Addr::new(10, 244, 11, 2)),
        nat_port: 8080u16.to_be(),
        dir: ct_dir::FORWARD,
        svc_id: 1,
        backend_id: 1,
        state,
        created_ns: now - age_s * S,
        last_seen_ns: now - age_s * S,
        ..Default::default()
    };
    let (a2v, dv) = (
        fwd_v(ct_state::CLOSING, 10),
        fwd_v(ct_state::ESTABLISHED, 1),
    );
    let rk = a2.reverse_of_forward(&a2v);
    assert_eq!(rk, d.reverse_of_forward(&dv), "one reverse key");
    let dr = CtValue {
        nat_ip: ip_wire(VIP3),
        nat_port: 80u16.to_be(),
        dir: ct_dir::REVERSE,
        svc_id: 1,
        backend_id: 1,
        created_ns: now - 10 * S,
        // Idle past A2's timeout (D's client is sending, the backend is
        // not): what made the old GC take it for A2's.
        last_seen_ns: now - 10 * S,
        ..Default::default()
    };
    assert!(d.owns_reverse(&dv, &rk, &dr) && !a2.owns_reverse(&a2v, &rk, &dr));
    {
        let m = h.w().conntrack_map();
        m.insert(a2, a2v, 0).unwrap();
        m.insert(d, dv, 0).unwrap();
        m.insert(rk, dr, 0).unwrap();
    }
    let r = gc::sweep(h.w(), &t, now).unwrap();
    assert_eq!((r.expired, r.orphans), (1, 0));
    let after = all_entries(h.w());
    assert!(!after.contains_key(&a2), "A2 expired");
    assert_eq!(after.get(&rk), Some(&dr), "D's reverse entry kept");
    assert!(after.contains_key(&d));
    assert_eq!(after.len(), 4, "B's two entries and D's two");
}
