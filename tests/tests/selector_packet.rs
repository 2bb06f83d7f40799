//! The user-defined selector (docs/policies.md, "User-defined selector") in
//! the real kernel via BPF_PROG_TEST_RUN: the shipped example (by client
//! subnet, `example:geo`) loaded by the agent's writer, exact output bytes
//! (checksums included), both hooks; the compat set's fallback; the fallbacks to
//! the built-in algorithm with their counters; a bad object reported while
//! the service keeps working.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use lb_agent::datapath::programs::{self, ProgramSet};
use lb_agent::datapath::scratch::{Hook, ScratchDatapath};
use lb_agent::datapath::selector::{SelectorSource, SelectorStatus};
use lb_api::{Algorithm, BackendState, Protocol, Service, ServiceAddr};
use rpclb_tests::packet::{self, Pkt, SYN, TC_OK, XDP_PASS, assert_bytes_eq, service};
use std::os::unix::fs::PermissionsExt;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn b(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 10 + i, 2)
}

fn wire(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn can_run(set: ProgramSet) -> bool {
    if !lb_agent::datapath::scratch::require_root("selector packet tests") {
        return false;
    }
    if set == ProgramSet::Full && !programs::kernel_has_full_set() {
        eprintln!("SKIP: the full program set needs {}", programs::FULL_NEEDS);
        return false;
    }
    true
}

fn scratch(set: ProgramSet) -> ScratchDatapath {
    ScratchDatapath::new(|c| {
        c.fib_redirect = false;
        c.programs = set.into();
    })
    .expect("load data path")
}

fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    Pkt::tcp()
        .ip(src, dst)
        .ports(sport, dport)
        .flags(SYN)
        .seq(1000)
        .id(7)
        .build()
}

fn reason(h: &mut ScratchDatapath, name: &str) -> u64 {
    h.writer()
        .reasons()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
}

/// Runs a SYN from `src:sport` to the VIP and checks the output is that SYN
/// DNATed to `to:8080`, byte for byte.
fn expect(h: &mut ScratchDatapath, hook: Hook, src: Ipv4Addr, sport: u16, to: Ipv4Addr) {
    let (rc, out) = h.run(hook, &syn(src, sport, VIP, 80)).expect("test run");
    let pass = if hook == Hook::Xdp { XDP_PASS } else { TC_OK };
    assert_eq!(rc, pass, "{hook:?} {src}:{sport}: verdict");
    packet::verify_checksums(&out).expect("checksums");
    assert_bytes_eq(&out, &syn(src, sport, to, 8080));
}

/// The built-in algorithm's (random: a hash of the 5-tuple over the table)
/// backend for a flow, predicted from the table in the map.
fn builtin(h: &mut ScratchDatapath, addr: &ServiceAddr, src: Ipv4Addr, sport: u16) -> Ipv4Addr {
    let w = h.writer();
    let t = w.service_table(addr).unwrap();
    let hash = lb_common::flow_hash(wire(src), wire(VIP), sport.to_be(), 80u16.to_be(), 6);
    let id = t[(hash % t.len() as u32) as usize];
    let bs = w.backend_stats(addr).unwrap();
    let b = bs.iter().find(|b| b.id == id).unwrap();
    lb_agent::datapath::reader::v4_only(b.ip)
}

/// The example's answer for a flow: the k-th candidate of the subnet's set
/// (`mask`), k = the 5-tuple's hash modulo the set's size.
fn geo_pick(mask: u32, src: Ipv4Addr, sport: u16) -> u8 {
    let set: Vec<u8> = (0..16).filter(|i| mask & (1 << i) != 0).collect();
    let hash = lb_common::flow_hash(wire(src), wire(VIP), sport.to_be(), 80u16.to_be(), 6);
    set[(hash % set.len() as u32) as usize]
}

fn geo_service() -> Service {
    let mut s = service(
        "demo/geo:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        &[
            (b(0), 8080),
            (b(1), 8080),
            (b(2), 8080),
            (b(3), 8080),
            (b(4), 8080),
        ],
    );
    s.selector = Some(lb_api::validate::EXAMPLE_GEO_SELECTOR.into());
    s
}

const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// In no subnet of the table.
const C: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 2);
/// A subnet whose set is only candidates past the service's backends.
const D: Ipv4Addr = Ipv4Addr::new(10, 244, 4, 2);
/// A subnet whose set is backend 4 alone, which is then drained.
const E: Ipv4Addr = Ipv4Addr::new(10, 244, 5, 2);

fn fill_geo(h: &ScratchDatapath) {
    let p =
        lb_agent::datapath::selector::maps_dir(h.dir()).join(lb_agent::datapath::selector::GEO_MAP);
    let md = MapData::from_pin(&p).expect("the example's table is pinned");
    let mut t: LpmTrie<MapData, u32, u32> = LpmTrie::try_from(aya::maps::Map::LpmTrie(md)).unwrap();
    let net = |a: [u8; 4]| Key::new(24, u32::from_ne_bytes(a));
    t.insert(&net([10, 244, 1, 0]), 0b0011, 0).unwrap();
    t.insert(&net([10, 244, 2, 0]), 0b1100, 0).unwrap();
    t.insert(&net([10, 244, 4, 0]), 0b1_0000_0000, 0).unwrap();
    t.insert(&net([10, 244, 5, 0]), 0b1_0000, 0).unwrap();
}

fn geo(set: ProgramSet) {
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut h = scratch(set);
        let mut svc = geo_service();
        let addr = svc.addr();
        h.writer().upsert_service(&svc).unwrap();
        assert!(
            h.writer().selector_in_place(&addr),
            "{:?}",
            h.writer().selector_errors()
        );
        fill_geo(&h);

        // Subnet A to backends 0 and 1, subnet B to 2 and 3, over many ports.
        let chosen = reason(&mut h, "selector_chosen");
        let (mut seen_a, mut seen_b) = (BTreeSet::new(), BTreeSet::new());
        for sport in 40000..40016u16 {
            let ia = geo_pick(0b0011, A, sport);
            expect(&mut h, hook, A, sport, b(ia));
            seen_a.insert(ia);
            let ib = geo_pick(0b1100, B, sport);
            expect(&mut h, hook, B, sport, b(ib));
            seen_b.insert(ib);
        }
        assert_eq!(seen_a, BTreeSet::from([0, 1]), "{hook:?}");
        assert_eq!(seen_b, BTreeSet::from([2, 3]), "{hook:?}");
        assert_eq!(reason(&mut h, "selector_chosen") - chosen, 32, "{hook:?}");

        // No subnet, or a set past the candidates: -1, the built-in algorithm.
        let no = reason(&mut h, "selector_no_answer");
        for (src, sport) in [(C, 41000), (C, 41001), (D, 41002)] {
            let to = builtin(&mut h, &addr, src, sport);
            expect(&mut h, hook, src, sport, to);
        }
        assert_eq!(reason(&mut h, "selector_no_answer") - no, 3, "{hook:?}");

        // Its answer drained: refused, the built-in algorithm (among the others).
        svc.backends[4].state = BackendState::Terminating;
        h.writer().upsert_service(&svc).unwrap();
        assert!(h.writer().selector_in_place(&addr));
        let refused = reason(&mut h, "selector_refused");
        let to = builtin(&mut h, &addr, E, 42000);
        assert_ne!(to, b(4));
        expect(&mut h, hook, E, 42000, to);
        assert_eq!(reason(&mut h, "selector_refused") - refused, 1, "{hook:?}");

        // An empty slot (the flag still on): the built-in algorithm, counted.
        let id = h
            .writer()
            .services()
            .into_iter()
            .find(|s| s.addr == addr)
            .unwrap()
            .id;
        lb_agent::datapath::selector::put(h.dir(), id, None).unwrap();
        let missing = reason(&mut h, "selector_missing");
        let to = builtin(&mut h, &addr, A, 43000);
        expect(&mut h, hook, A, 43000, to);
        assert_eq!(reason(&mut h, "selector_missing") - missing, 1, "{hook:?}");

        // No selector any more: the flag goes, nothing is asked.
        svc.selector = None;
        h.writer().upsert_service(&svc).unwrap();
        assert!(!h.writer().selector_in_place(&addr));
        let to = builtin(&mut h, &addr, A, 43001);
        expect(&mut h, hook, A, 43001, to);
        assert_eq!(reason(&mut h, "selector_missing") - missing, 1, "{hook:?}");
    }
}

#[test]
fn geo_selector_full() {
    if can_run(ProgramSet::Full) {
        geo(ProgramSet::Full);
    }
}

/// The compat set (kernels before 5.12) never asks a selector (its XDP
/// stack has no room for the call): the built-in algorithm, nothing counted.
#[test]
fn compat_set_uses_the_builtin_algorithm() {
    if !can_run(ProgramSet::Compat) {
        return;
    }
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut h = scratch(ProgramSet::Compat);
        let svc = geo_service();
        let addr = svc.addr();
        h.writer().upsert_service(&svc).unwrap();
        assert!(h.writer().selector_in_place(&addr));
        fill_geo(&h);
        for sport in 40000..40008u16 {
            let to = builtin(&mut h, &addr, A, sport);
            expect(&mut h, hook, A, sport, to);
        }
        for r in [
            "selector_chosen",
            "selector_missing",
            "selector_no_answer",
            "selector_refused",
        ] {
            assert_eq!(reason(&mut h, r), 0, "{hook:?} {r}");
        }
    }
}

/// A selector that cannot be put in place is reported, and its service
/// keeps its built-in algorithm: a missing file, and an object not of the
/// ABI (the data path's own, with its many programs).
#[test]
fn bad_selector_is_reported_and_the_service_keeps_working() {
    if !can_run(ProgramSet::Full) {
        return;
    }
    let mut h = scratch(ProgramSet::Full);
    // Paths, as from the agent's own --config.
    h.writer().set_selector_source(SelectorSource {
        paths: true,
        ..Default::default()
    });
    let tmp = std::env::temp_dir().join(format!("rpclb-bad-selector-{}.o", std::process::id()));
    std::fs::write(&tmp, lb_agent::datapath::EBPF_OBJECT).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (source, why) in [
        (
            "/nonexistent/selector.o",
            "cannot read /nonexistent/selector.o",
        ),
        (tmp.to_str().unwrap(), "not of the selector ABI"),
    ] {
        let mut svc = geo_service();
        svc.selector = Some(source.into());
        let addr = svc.addr();
        h.writer()
            .upsert_service(&svc)
            .expect("the service itself is written");
        assert!(!h.writer().selector_in_place(&addr));
        let err = h
            .writer()
            .selector_errors()
            .get(&addr)
            .cloned()
            .unwrap_or_default();
        assert!(err.contains(why), "{source}: {err}");
        let missing = reason(&mut h, "selector_missing");
        let to = builtin(&mut h, &addr, A, 44000);
        expect(&mut h, Hook::Xdp, A, 44000, to);
        assert_eq!(reason(&mut h, "selector_missing"), missing, "never asked");
    }
    let _ = std::fs::remove_file(&tmp);
}

/// Who may name what (docs/security.md): a bare NAME is
/// `<--selector-dir>/NAME.o`; an absolute path is loaded only where paths
/// are allowed (the agent's own --config), and refused from the
/// controller's stream: the service keeps its algorithm, the refusal is its
/// selector's state. A NAME whose file is missing is reported the same way.
#[test]
fn names_load_from_the_selector_dir_and_a_streamed_path_is_refused() {
    if !can_run(ProgramSet::Full) {
        return;
    }
    let mut h = scratch(ProgramSet::Full);
    let dir = std::env::temp_dir().join(format!("rpclb-selector-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The example's object under a name of the user's.
    let obj = dir.join("geo2.o");
    std::fs::write(&obj, lb_agent::datapath::selector::EXAMPLE_GEO_OBJECT).unwrap();
    std::fs::set_permissions(&obj, std::fs::Permissions::from_mode(0o644)).unwrap();
    let streamed = SelectorSource {
        dir: dir.clone(),
        paths: false,
    };
    h.writer().set_selector_source(streamed.clone());
    let mut svc = geo_service();
    let addr = svc.addr();
    let status = |h: &mut ScratchDatapath| -> Vec<SelectorStatus> { h.writer().selector_status() };

    // NAME: <dir>/geo2.o, in place; it answers from the (shared) table.
    svc.selector = Some("geo2".into());
    h.writer().upsert_service(&svc).unwrap();
    assert!(
        h.writer().selector_in_place(&addr),
        "{:?}",
        h.writer().selector_errors()
    );
    assert_eq!(
        status(&mut h),
        [SelectorStatus {
            service: "demo/geo:http".into(),
            selector: "geo2".into(),
            state: "loaded".into(),
        }]
    );
    fill_geo(&h);
    for sport in 46000..46004u16 {
        expect(&mut h, Hook::Xdp, A, sport, b(geo_pick(0b0011, A, sport)));
    }

    // The same file by its path, as the controller's stream would send it:
    // refused; the built-in algorithm, never asked.
    svc.selector = Some(obj.to_str().unwrap().into());
    h.writer().upsert_service(&svc).unwrap();
    assert!(!h.writer().selector_in_place(&addr));
    let st = status(&mut h);
    assert_eq!(st.len(), 1);
    assert!(
        st[0]
            .state
            .contains("refused: a path is loaded only from the agent's own --config file"),
        "{st:?}"
    );
    let missing = reason(&mut h, "selector_missing");
    let chosen = reason(&mut h, "selector_chosen");
    let to = builtin(&mut h, &addr, A, 46100);
    expect(&mut h, Hook::Xdp, A, 46100, to);
    assert_eq!(reason(&mut h, "selector_missing"), missing);
    assert_eq!(reason(&mut h, "selector_chosen"), chosen, "never asked");

    // From the agent's own config file, the path is loaded.
    h.writer().set_selector_source(SelectorSource {
        paths: true,
        ..streamed.clone()
    });
    h.writer().upsert_service(&svc).unwrap();
    assert!(h.writer().selector_in_place(&addr));
    expect(&mut h, Hook::Xdp, A, 46200, b(geo_pick(0b0011, A, 46200)));

    // A NAME without its file: reported with the path looked at.
    h.writer().set_selector_source(streamed);
    svc.selector = Some("nosuch".into());
    h.writer().upsert_service(&svc).unwrap();
    assert!(!h.writer().selector_in_place(&addr));
    let st = status(&mut h);
    let want = format!("selector nosuch: cannot read {}/nosuch.o", dir.display());
    assert!(st[0].state.starts_with(&want), "{st:?}");
    assert_eq!(st[0].selector, "nosuch");
    let to = builtin(&mut h, &addr, A, 46300);
    expect(&mut h, Hook::Xdp, A, 46300, to);
    // The file put there later: the next retry (the agent's GC tick) loads it.
    assert!(
        !h.writer().retry_missing_selectors().unwrap(),
        "still missing"
    );
    std::fs::copy(&obj, dir.join("nosuch.o")).unwrap();
    assert!(h.writer().retry_missing_selectors().unwrap());
    assert!(h.writer().selector_in_place(&addr));
    assert_eq!(status(&mut h)[0].state, "loaded");
    assert!(
        !h.writer().retry_missing_selectors().unwrap(),
        "nothing waits"
    );
    expect(&mut h, Hook::Xdp, A, 46400, b(geo_pick(0b0011, A, 46400)));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- real TCP through a VIP ----------------------------------------------------

/// The example selector in the netns lab (XDP on the node, full set): the
/// client's subnet sends every new connection to backend-3 alone; its set
/// changed to backends 1 and 2, to those two; its entry deleted, the
/// built-in algorithm again (counted as no answer).
#[test]
fn lab_geo_selector_sends_a_subnet_to_its_backends() {
    use lb_agent::datapath::{AttachMode, Datapath, DatapathConfig};
    use rpclb_tests::lab::{self, Lab};
    use std::collections::BTreeMap;
    use std::net::SocketAddrV4;

    rpclb_tests::skip_unless_lab!();
    if !programs::kernel_has_full_set() {
        eprintln!("SKIP: selectors run in the full program set only");
        return;
    }
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let ifaces: Vec<String> = lab.node_ifaces().iter().map(|i| i.name.clone()).collect();
    let pin = lab.bpffs().join("rpclb");
    let mut cfg = DatapathConfig::small(&pin);
    cfg.programs = ProgramSet::Full.into();
    if programs::kernel_version() >= Some((5, 13)) {
        cfg.xdp_redirect_to = ifaces.clone();
    }
    let mut dp = lab
        .node()
        .run(move || {
            let mut dp = Datapath::load(&cfg).expect("load");
            for i in &ifaces {
                dp.attach(i, AttachMode::Xdp).expect("attach");
            }
            dp
        })
        .expect("node namespace");
    let ip = |i: usize| lab.backend(i).ip();
    let mut svc = Service::new(
        "lab/geo:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        (1..=3).map(|i| lb_api::Backend::new(ip(i), 8080)).collect(),
    );
    svc.selector = Some(lb_api::validate::EXAMPLE_GEO_SELECTOR.into());
    dp.writer().upsert_service(&svc).unwrap();
    assert!(dp.writer().selector_in_place(&svc.addr()));

    let p =
        lb_agent::datapath::selector::maps_dir(&pin).join(lb_agent::datapath::selector::GEO_MAP);
    let mut geo: LpmTrie<MapData, u32, u32> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(MapData::from_pin(&p).unwrap())).unwrap();
    let client_net = {
        let o = lab.client().ip().octets();
        Key::new(24, u32::from_ne_bytes([o[0], o[1], o[2], 0]))
    };
    let counts = |replies: &[lab::Reply]| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for r in replies {
            *m.entry(r.backend.clone()).or_default() += 1;
        }
        m
    };
    let target = SocketAddrV4::new(VIP, 80);
    let reasons = |dp: &mut Datapath| -> BTreeMap<&'static str, u64> {
        dp.writer().reasons().unwrap().into_iter().collect()
    };

    // Index 2: backend-3 alone.
    geo.insert(&client_net, 0b100, 0).unwrap();
    let before = reasons(&mut dp)["selector_chosen"];
    let c = counts(&lab.client_tcp(target, 20).unwrap());
    assert_eq!(c, BTreeMap::from([("backend-3".to_string(), 20)]));
    assert_eq!(reasons(&mut dp)["selector_chosen"] - before, 20);

    // Indexes 0 and 1: backends 1 and 2, both.
    geo.insert(&client_net, 0b011, 0).unwrap();
    let c = counts(&lab.client_tcp(target, 30).unwrap());
    assert!(!c.contains_key("backend-3"), "{c:?}");
    assert_eq!(c.len(), 2, "{c:?}");
    assert_eq!(c.values().sum::<usize>(), 30);

    // No entry: -1, the built-in algorithm over all three.
    geo.remove(&client_net).unwrap();
    let before = reasons(&mut dp)["selector_no_answer"];
    let c = counts(&lab.client_tcp(target, 30).unwrap());
    assert_eq!(c.values().sum::<usize>(), 30);
    assert!(c.len() >= 2, "{c:?}");
    assert_eq!(reasons(&mut dp)["selector_no_answer"] - before, 30);
}
