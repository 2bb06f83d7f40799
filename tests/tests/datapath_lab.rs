//! Lab tests: real kernel TCP and UDP sockets through the programs attached
//! to a node namespace, in XDP mode (native and generic) and in TC mode.
//!
//! client ── node (programs on every node-side veth) ── backends 1..3.
//! Everything lives in namespaces that the lab creates and deletes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use lb_agent::datapath::attach::{Attached, TC_HANDLE, TC_PRIORITY, TcAttach, netlink_marker};
use lb_agent::datapath::{AttachMode, BpfPrograms, Datapath, DatapathConfig, ProgramSet};
use lb_api::{Algorithm, Backend, Protocol, Service};
use rpclb_tests::lab::{self, Checksums, CsumErrors, HeldConn, Lab, Limits};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);

fn service(
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    proto: Protocol,
    algo: Algorithm,
    backends: Vec<Backend>,
) -> Service {
    Service::new(name, vip, port, proto, algo, backends)
}

/// Loads the data path pinned in the lab's bpffs and attaches it to every
/// node-side interface, from inside the node namespace.
fn datapath(lab: &Lab, mode: AttachMode) -> Datapath {
    datapath_with(lab, mode, |_| {}).0
}

/// [`datapath`] with its config changed by `tune` (fib redirect off, TC
/// attached as netlink filters); also what each interface got.
fn datapath_with(
    lab: &Lab,
    mode: AttachMode,
    tune: impl FnOnce(&mut DatapathConfig),
) -> (Datapath, Vec<Attached>) {
    let ifaces: Vec<String> = lab.node_ifaces().iter().map(|i| i.name.clone()).collect();
    let mut cfg = DatapathConfig::small(lab.bpffs().join("rpclb"));
    if gro_peers_take_xdp() {
        // The lab's client and backend veth ends have GRO on.
        cfg.xdp_redirect_to = ifaces.clone();
    }
    tune(&mut cfg);
    lab.node()
        .run(move || {
            let mut dp = Datapath::load(&cfg).expect("load");
            let got = ifaces
                .iter()
                .map(|i| dp.attach(i, mode).expect("attach"))
                .collect();
            (dp, got)
        })
        .expect("node namespace")
}

/// From Linux 5.13 a veth whose peer has GRO on takes native XDP redirects;
/// before, only one whose peer runs an XDP program does.
fn gro_peers_take_xdp() -> bool {
    lb_agent::datapath::programs::kernel_version() >= Some((5, 13))
}

/// Round-robin over every backend of `lab`: TCP VIP:80 -> 8080 and UDP
/// UDP_VIP:53 -> 5353, written to `dp`.
fn round_robin_services(lab: &Lab, dp: &mut Datapath) -> (Service, Service) {
    let bk = |port| {
        lab.backends()
            .iter()
            .map(|h| Backend::new(h.ip(), port))
            .collect::<Vec<_>>()
    };
    let tcp_svc = service(
        "lab/web:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::RoundRobin,
        bk(8080),
    );
    let udp_svc = service(
        "lab/dns:dns",
        UDP_VIP,
        53,
        Protocol::Udp,
        Algorithm::RoundRobin,
        bk(5353),
    );
    dp.writer().upsert_service(&tcp_svc).unwrap();
    dp.writer().upsert_service(&udp_svc).unwrap();
    (tcp_svc, udp_svc)
}

fn counts(replies: &[lab::Reply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.backend.clone()).or_default() += 1;
    }
    m
}

fn balance(mode: AttachMode) {
    balance_with(mode, BpfPrograms::Auto);
}

/// [`balance`] with the program set `programs` (`--bpf-programs`).
fn balance_with(mode: AttachMode, programs: BpfPrograms) {
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let _udp = lab.start_udp_servers(5353).unwrap();
    let (mut dp, _) = datapath_with(&lab, mode, |c| c.programs = programs);
    if programs == BpfPrograms::Compat {
        assert_eq!(dp.programs(), ProgramSet::Compat);
    }
    let (tcp_svc, udp_svc) = round_robin_services(&lab, &mut dp);

    // TCP: every connection succeeds, replies come from the VIP, round-robin is exact.
    let replies = lab.client_tcp(SocketAddrV4::new(VIP, 80), 60).unwrap();
    for r in &replies {
        assert_eq!(r.peer, SocketAddr::from((VIP, 80)), "reply from the VIP");
    }
    let c = counts(&replies);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![20, 20, 20],
        "{mode:?} TCP round-robin: {c:?}"
    );

    // UDP likewise.
    let replies = lab.client_udp(SocketAddrV4::new(UDP_VIP, 53), 30).unwrap();
    for r in &replies {
        assert_eq!(r.peer, SocketAddr::from((UDP_VIP, 53)));
    }
    let c = counts(&replies);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{mode:?} UDP round-robin: {c:?}"
    );

    // The kernel counted it: 60 new TCP flows, 30 UDP flows.
    let w = dp.writer();
    assert_eq!(w.service_stats(&tcp_svc.addr()).unwrap().new_flows, 60);
    assert_eq!(w.service_stats(&udp_svc.addr()).unwrap().new_flows, 30);
    let reasons: BTreeMap<_, _> = w.reasons().unwrap().into_iter().collect();
    assert!(
        reasons["nat_forward"] >= 90 && reasons["nat_reverse"] >= 90,
        "{reasons:?}"
    );
    if mode == AttachMode::XdpGeneric || (mode == AttachMode::Xdp && gro_peers_take_xdp()) {
        // XDP forwards with fib lookup + redirect, not through the stack.
        assert!(reasons["fwd_redirect"] >= 180, "redirected: {reasons:?}");
    } else if mode == AttachMode::Xdp {
        // Veths that cannot take XDP frames get them through the stack.
        assert!(reasons["pass_xdp_target"] >= 180, "passed: {reasons:?}");
        assert_eq!(reasons["fwd_redirect"], 0, "{reasons:?}");
    }
    eprintln!("{mode:?}: {reasons:?}");

    // Maglev spreads too (every backend used), and random.
    for algo in [Algorithm::Maglev, Algorithm::Random, Algorithm::LeastConn] {
        let svc = service(
            "lab/web:http",
            VIP,
            80,
            Protocol::Tcp,
            algo,
            tcp_svc.backends.clone(),
        );
        dp.writer().upsert_service(&svc).unwrap();
        let c = counts(&lab.client_tcp(SocketAddrV4::new(VIP, 80), 60).unwrap());
        assert_eq!(c.len(), 3, "{mode:?} {algo}: every backend used: {c:?}");
        assert!(c.values().all(|&n| n >= 8), "{mode:?} {algo}: spread {c:?}");
    }
}

#[test]
fn xdp_lab_balances_tcp_and_udp() {
    if lab::require() {
        balance(AttachMode::Xdp);
    }
}

/// Generic (skb) XDP: the same program on the stack's XDP hook, for
/// drivers without native XDP; the kernel matrix (`cargo xtask
/// test-kernels`) runs it as its own mode.
/// Native XDP on veths whose peers have neither XDP nor GRO (a pod's, as a
/// CNI leaves them): a redirect into them would be dropped, so the
/// translated packets go through the node's stack. Every request is
/// answered (before `XDP_IFACES`, none was).
#[test]
fn xdp_on_pod_veths_never_black_holes() {
    if !lab::require() {
        return;
    }
    let lab = Lab::pod_like(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let _udp = lab.start_udp_servers(5353).unwrap();
    let (mut dp, got) = datapath_with(&lab, AttachMode::Xdp, |c| c.xdp_redirect_to.clear());
    assert!(got.iter().all(|a| a.how == "xdp"), "native XDP: {got:?}");
    round_robin_services(&lab, &mut dp);
    let c = counts(&lab.client_tcp(SocketAddrV4::new(VIP, 80), 30).unwrap());
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "TCP: {c:?}"
    );
    let c = counts(&lab.client_udp(SocketAddrV4::new(UDP_VIP, 53), 15).unwrap());
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![5, 5, 5],
        "UDP: {c:?}"
    );
    let reasons: BTreeMap<_, _> = dp.writer().reasons().unwrap().into_iter().collect();
    assert!(reasons["pass_xdp_target"] >= 90, "{reasons:?}");
    assert_eq!(reasons["fwd_redirect"], 0, "{reasons:?}");
}

#[test]
fn xdp_generic_lab_balances_tcp_and_udp() {
    if lab::require() {
        balance(AttachMode::XdpGeneric);
    }
}

#[test]
fn tc_lab_balances_tcp_and_udp() {
    if lab::require() {
        balance(AttachMode::Tc);
    }
}

/// The compat program set (kernels before 5.12: no atomic fetch/cmpxchg, no
/// coarse clock) balances real traffic as the full set does; on such a
/// kernel the other lab tests get it through `auto` as well.
#[test]
fn xdp_lab_compat_balances_tcp_and_udp() {
    if lab::require() {
        balance_with(AttachMode::Xdp, BpfPrograms::Compat);
    }
}

#[test]
fn tc_lab_compat_balances_tcp_and_udp() {
    if lab::require() {
        balance_with(AttachMode::Tc, BpfPrograms::Compat);
    }
}

/// Sends a line and reads its echo.
fn echo(s: &mut BufReader<TcpStream>, line: &str) -> String {
    s.get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .expect("write");
    let mut got = String::new();
    s.read_line(&mut got).expect("read echo");
    got.trim_end().to_string()
}

fn long_lived(mode: AttachMode) {
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let mut dp = datapath(&lab, mode);
    let ip = |i: usize| lab.backend(i).ip();
    let mut svc = service(
        "lab/web:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Maglev,
        vec![Backend::new(ip(1), 8080), Backend::new(ip(2), 8080)],
    );
    dp.writer().upsert_service(&svc).unwrap();

    let stream = lab
        .client()
        .ns
        .run(|| {
            let s =
                TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(2))
                    .expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        })
        .unwrap();
    assert_eq!(stream.peer_addr().unwrap(), SocketAddr::from((VIP, 80)));
    let mut s = BufReader::new(stream);
    let mut who = String::new();
    s.read_line(&mut who).unwrap();
    let who = who.trim_end().to_string();
    let mine: usize = who.trim_start_matches("backend-").parse().unwrap();
    assert_eq!(echo(&mut s, "one"), "one");
    // Full-size segments: in TC mode their payload sits outside the skb's
    // linear part, which the program must not mistake for truncation.
    let big = "x".repeat(64 * 1024);
    assert_eq!(echo(&mut s, &big), big, "{mode:?}: 64 KiB echoed");

    // Remove the other backend, add the third, then swap again: the flow stays.
    let other = 3 - mine;
    svc.backends = vec![Backend::new(ip(mine), 8080), Backend::new(ip(3), 8080)];
    dp.writer().upsert_service(&svc).unwrap();
    assert_eq!(echo(&mut s, "two"), "two");
    svc.backends = vec![
        Backend::new(ip(other), 8080),
        Backend::new(ip(3), 8080),
        Backend::new(ip(mine), 8080),
    ];
    dp.writer().upsert_service(&svc).unwrap();
    assert_eq!(echo(&mut s, "three"), "three");
    // Drop the flow's own backend from the service: conntrack keeps it going.
    svc.backends = vec![Backend::new(ip(other), 8080), Backend::new(ip(3), 8080)];
    dp.writer().upsert_service(&svc).unwrap();
    assert_eq!(echo(&mut s, "four"), "four");
    // New connections meanwhile go only to the current set.
    let c = counts(&lab.client_tcp(SocketAddrV4::new(VIP, 80), 30).unwrap());
    assert!(
        !c.contains_key(&who),
        "{mode:?}: no new flow to the removed {who}: {c:?}"
    );
    assert_eq!(echo(&mut s, "five"), "five");
    // The long-lived flow is one conntrack entry, still on its backend.
    let ct = dp.writer().conntrack().unwrap();
    let local = s.get_ref().local_addr().unwrap();
    let e = ct
        .iter()
        .find(|e| SocketAddr::from(e.client) == local)
        .expect("long-lived flow in conntrack");
    assert_eq!(e.backend, (ip(mine), 8080));
    assert_eq!(e.state, "established");
}

#[test]
fn xdp_lab_long_lived_connection_survives_backend_changes() {
    if lab::require() {
        long_lived(AttachMode::Xdp);
    }
}

#[test]
fn xdp_generic_lab_long_lived_connection_survives_backend_changes() {
    if lab::require() {
        long_lived(AttachMode::XdpGeneric);
    }
}

#[test]
fn tc_lab_long_lived_connection_survives_backend_changes() {
    if lab::require() {
        long_lived(AttachMode::Tc);
    }
}

/// A SYN to a service without backends is refused at once (RST), not timed out.
#[test]
fn lab_no_backend_refuses_fast() {
    if !lab::require() {
        return;
    }
    let lab = Lab::new(1).expect("lab");
    let mut dp = datapath(&lab, AttachMode::Xdp);
    dp.writer()
        .upsert_service(&service(
            "lab/empty:http",
            VIP,
            80,
            Protocol::Tcp,
            Algorithm::Random,
            vec![],
        ))
        .unwrap();
    let (kind, took) = lab
        .client()
        .ns
        .run(|| {
            let t = std::time::Instant::now();
            let e =
                TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(3))
                    .unwrap_err();
            (e.kind(), t.elapsed())
        })
        .unwrap();
    let reasons: BTreeMap<_, _> = dp.writer().reasons().unwrap().into_iter().collect();
    assert_eq!(kind, std::io::ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_secs(1), "refused fast, took {took:?}");
    assert_eq!(reasons["tx_rst_no_backend"], 1);
}

/// Checksum errors counted by the client and every backend.
fn csum_errors(lab: &Lab) -> Vec<(String, CsumErrors)> {
    std::iter::once(("client".to_string(), lab.client()))
        .chain(
            lab.backends()
                .iter()
                .enumerate()
                .map(|(i, h)| (format!("backend-{}", i + 1), h)),
        )
        .map(|(n, h)| (n, h.ns.csum_errors().expect("/proc/net/snmp")))
        .collect()
}

fn no_csum_errors(e: &[(String, CsumErrors)]) -> bool {
    e.iter().all(|(_, c)| c.tcp == 0 && c.udp == 0)
}

/// TCP and UDP traffic from the client to `tcp` and `udp`: short connections,
/// one connection echoing large lines (full-size and, without native XDP on
/// the node, GSO segments), and datagrams. Every failure, as text.
fn mixed_traffic(lab: &Lab, tcp: SocketAddrV4, udp: SocketAddrV4, n: usize) -> Vec<String> {
    let lim = Limits {
        per_op: Duration::from_secs(2),
        total: Duration::from_secs(20),
    };
    let ns = &lab.client().ns;
    let mut failed = Vec::new();
    let tcp_res = ns.run(|| lab::tcp_attempts(tcp, n, lim)).unwrap();
    failed.extend(
        tcp_res
            .into_iter()
            .enumerate()
            .filter_map(|(k, r)| r.err().map(|e| format!("TCP {k} to {tcp}: {e}"))),
    );
    match HeldConn::open(ns, tcp) {
        Ok(mut c) => {
            for k in 0..3 {
                let line = format!("{k}").repeat(20_000 + 1000 * k);
                if let Err(e) = c.try_echo(&line) {
                    failed.push(format!("echo {k} of {} bytes: {e}", line.len()));
                    break;
                }
            }
        }
        Err(e) => failed.push(format!("held connection: {e}")),
    }
    let udp_res = ns.run(|| lab::udp_attempts(udp, n, lim)).unwrap();
    failed.extend(
        udp_res
            .into_iter()
            .enumerate()
            .filter_map(|(k, r)| r.err().map(|e| format!("UDP {k} to {udp}: {e}"))),
    );
    failed
}

/// Pods send CHECKSUM_PARTIAL packets: with tx checksum offload on (the veth
/// default), a TCP/UDP packet's check field holds only the pseudo-header sum
/// (the seed) until someone completes it. Here the client and backends keep
/// tx offload on and the node's veths have it off, so the node's stack
/// completes in software whatever it forwards, and the receivers verify it
/// (`Checksums::Partial`). A data path that rewrites a seed as if it were a
/// full checksum, or redirects a seed as an XDP frame (which loses the
/// partial state), makes the receiver count `InCsumErrors` and the traffic
/// fail. Run in every mode, with and without fib redirect.
fn partial_checksums(mode: AttachMode, fib_redirect: bool) {
    let lab = Lab::with_checksums(2, Checksums::Partial).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let _udp = lab.start_udp_servers(5353).unwrap();
    let what = format!("{mode:?}, fib_redirect {fib_redirect}");

    // The control: without the load balancer, the node completes the seeds
    // correctly and nothing is counted.
    let b1 = lab.backend(1).ip();
    let failed = mixed_traffic(
        &lab,
        SocketAddrV4::new(b1, 8080),
        SocketAddrV4::new(b1, 5353),
        5,
    );
    let errs = csum_errors(&lab);
    assert!(
        failed.is_empty() && no_csum_errors(&errs),
        "{what}: direct traffic without the LB: {failed:?} {errs:?}"
    );

    let (mut dp, _) = datapath_with(&lab, mode, |c| c.fib_redirect = fib_redirect);
    round_robin_services(&lab, &mut dp);

    let failed = mixed_traffic(
        &lab,
        SocketAddrV4::new(VIP, 80),
        SocketAddrV4::new(UDP_VIP, 53),
        20,
    );
    let errs = csum_errors(&lab);
    let reasons: BTreeMap<_, _> = dp.writer().reasons().unwrap().into_iter().collect();
    eprintln!("{what}: failures {failed:?}\n  checksum errors {errs:?}\n  reasons {reasons:?}");
    // XDP cannot see an skb's checksum state: a seed whose bytes also verify as a full
    // checksum (1 seed in 65,536; lb-ebpf/src/nat.rs, "classify") is taken for one and
    // reaches its receiver wrong once (TCP sends it again). With ~300 seeds per run that is
    // ~0.5% of runs (seen once, in CI on 2026-12-07: one TCP error at backend-1 of 296
    // seeds); two in one run is a 1 in ~100,000 event, and a data path that mangles seeds
    // mangles hundreds. TC reads the skb's state: none allowed there.
    let allowed = if mode == AttachMode::Tc { 0 } else { 1 };
    let total: u64 = errs.iter().map(|(_, c)| c.tcp + c.udp).sum();
    assert!(
        failed.is_empty() && total <= allowed,
        "{what}: through the VIP: {} failure(s) {failed:?}, checksum errors {errs:?} \
         (at most {allowed})",
        failed.len()
    );
    assert!(
        reasons["nat_forward"] >= 40 && reasons["nat_reverse"] >= 40,
        "{reasons:?}"
    );
    if mode != AttachMode::Tc {
        // The XDP program really saw partial checksums, and left them to the
        // stack. (In generic XDP, GSO packets longer than the verification
        // bound count as `pass_csum_unverified`.)
        let seeds = reasons.get("pass_csum_partial").copied().unwrap_or(0)
            + reasons.get("pass_csum_unverified").copied().unwrap_or(0);
        assert!(seeds >= 80, "{what}: seeds seen: {reasons:?}");
    }
}

#[test]
fn tc_lab_partial_checksums() {
    if lab::require() {
        partial_checksums(AttachMode::Tc, true);
        partial_checksums(AttachMode::Tc, false);
    }
}

#[test]
fn xdp_lab_partial_checksums() {
    if lab::require() {
        partial_checksums(AttachMode::Xdp, false);
        partial_checksums(AttachMode::Xdp, true);
    }
}

#[test]
fn xdp_generic_lab_partial_checksums() {
    if lab::require() {
        partial_checksums(AttachMode::XdpGeneric, false);
        partial_checksums(AttachMode::XdpGeneric, true);
    }
}

/// TC as a netlink clsact filter (what kernels without TCX get): it
/// balances like a TCX link, survives the agent (a restart replaces the
/// program in the same filter, and a held connection keeps going), and
/// cleanup deletes the filter and its marker.
#[test]
fn tc_netlink_lab_balances_survives_a_restart_and_cleans_up() {
    if !lab::require() {
        return;
    }
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let (mut dp, got) = datapath_with(&lab, AttachMode::Tc, |c| c.tc_attach = TcAttach::Netlink);
    assert!(
        got.iter().all(|a| a.how == "tc-netlink" && !a.reused),
        "{got:?}"
    );
    let svc = service(
        "lab/web:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::RoundRobin,
        lab.backends()
            .iter()
            .map(|h| Backend::new(h.ip(), 8080))
            .collect(),
    );
    dp.writer().upsert_service(&svc).unwrap();
    let node_if = lab.node_ifaces()[0].name.clone();
    let filters = |ns: &lab::Netns| {
        ns.exec("tc", &["filter", "show", "dev", &node_if, "ingress"])
            .unwrap()
    };
    let f = filters(lab.node());
    let pref = format!("pref {TC_PRIORITY}");
    let handle = format!("handle 0x{:x}", u32::from(TC_HANDLE));
    assert!(
        f.contains(&pref) && f.contains(&handle) && f.contains("direct-action"),
        "{f}"
    );
    let c = counts(&lab.client_tcp(SocketAddrV4::new(VIP, 80), 30).unwrap());
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{c:?}"
    );
    let pin = lab.bpffs().join("rpclb");
    assert!(pin.join("links").join(netlink_marker(&node_if)).is_dir());

    // The agent goes (the filter stays and keeps balancing), and comes back.
    let mut held = HeldConn::open(&lab.client().ns, SocketAddrV4::new(VIP, 80)).unwrap();
    held.echo("before");
    drop(dp);
    held.echo("while the agent is gone");
    let c = counts(&lab.client_tcp(SocketAddrV4::new(VIP, 80), 6).unwrap());
    assert_eq!(c.len(), 3, "still balancing with no agent: {c:?}");
    let (dp, got) = datapath_with(&lab, AttachMode::Tc, |_| {});
    assert!(
        got.iter().all(|a| a.how == "tc-netlink" && a.reused),
        "the filter found and its program replaced: {got:?}"
    );
    held.echo("after the restart");
    assert_eq!(
        filters(lab.node()).matches("direct-action").count(),
        1,
        "one filter, replaced"
    );
    let c = counts(&lab.client_tcp(SocketAddrV4::new(VIP, 80), 6).unwrap());
    assert_eq!(c.len(), 3, "{c:?}");

    // Cleanup deletes the filters and the markers.
    let ifaces = lab.node_ifaces().len();
    let removed = lab
        .node()
        .run(move || lb_agent::datapath::cleanup(&pin))
        .unwrap()
        .unwrap();
    assert!(removed.len() >= ifaces, "{removed:?}");
    let f = filters(lab.node());
    assert!(!f.contains(&pref), "filter left: {f}");
    drop(dp);
}

const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

/// A connection from `local` (bound with SO_REUSEADDR, so two can share it)
/// to `target`, inside the client namespace; the backend's identity line read.
fn connect_from(lab: &Lab, local: SocketAddrV4, target: SocketAddrV4) -> BufReader<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = lab
        .client()
        .ns
        .run(move || {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from(local).into())?;
            s.connect_timeout(&SocketAddr::from(target).into(), Duration::from_secs(2))?;
            let s = TcpStream::from(s);
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.set_nodelay(true)?;
            Ok::<_, std::io::Error>(s)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("connect {local} -> {target}: {e}"));
    assert_eq!(s.peer_addr().unwrap(), SocketAddr::from(target));
    let mut s = BufReader::new(s);
    let mut who = String::new();
    s.read_line(&mut who).expect("identity line");
    assert_eq!(who.trim_end(), "backend-1");
    s
}

/// Sends a line and checks its echo, with a readable failure.
fn echo_ok(s: &mut BufReader<TcpStream>, what: &str, line: &str) {
    s.get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap_or_else(|e| panic!("{what}: write {line:?}: {e}"));
    let mut got = String::new();
    s.read_line(&mut got)
        .unwrap_or_else(|e| panic!("{what}: echo of {line:?}: {e}"));
    assert_eq!(got.trim_end(), line, "{what}");
}

/// Reverse-conntrack collisions (issue 10): two services, VIP1:80 and
/// VIP2:80, share backend-1 (10.244.11.2:8080), and a client bound to one
/// ip:port reaches both (`sequential`: A closed before B opens, then GC
/// expires A; else A stays open). Both connections keep echoing; the backend
/// sees two distinct client ports (B's from the collision range); no
/// checksum errors anywhere (full checksums on the wire, verified by every
/// receiver).
fn collisions(mode: AttachMode, sequential: bool) {
    let lab = Lab::new(1).expect("lab");
    let servers = lab.start_tcp_servers(8080).unwrap();
    let mut dp = datapath(&lab, mode);
    let bk = vec![Backend::new(lab.backend(1).ip(), 8080)];
    for (name, vip) in [("lab/a:http", VIP), ("lab/b:http", VIP2)] {
        let svc = service(name, vip, 80, Protocol::Tcp, Algorithm::Maglev, bk.clone());
        dp.writer().upsert_service(&svc).unwrap();
    }
    let client = lab.client().ip();
    let (vip1, vip2) = (SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP2, 80));
    let local = SocketAddrV4::new(client, 45_000);

    let mut a = connect_from(&lab, local, vip1);
    echo_ok(&mut a, "A", "a1");
    let mut b = if sequential {
        // A closed (CLOSING in conntrack), then B opened, then A expired by
        // a sweep.
        drop(a);
        let closing =
            || dp_flow_state(&mut dp, (client, 45_000), (VIP, 80)).as_deref() == Some("closing");
        wait_for(closing, "A closing in conntrack");
        let mut b = connect_from(&lab, local, vip2);
        echo_ok(&mut b, "B (A closed)", "b1");
        let t = lb_agent::config::Timeouts {
            tcp_syn: Duration::from_secs(60),
            tcp_established: Duration::from_secs(3600),
            tcp_closing: Duration::ZERO,
            udp: Duration::from_secs(60),
        };
        let now = lb_agent::datapath::reader::monotonic_ns();
        let r = lb_agent::gc::sweep(dp.writer(), &t, now).unwrap();
        assert_eq!(r.expired, 1, "{mode:?}: the sweep expired A: {r:?}");
        assert_eq!(dp_flow_state(&mut dp, (client, 45_000), (VIP, 80)), None);
        echo_ok(&mut b, "B after A's expiry", "b2");
        b
    } else {
        let mut b = connect_from(&lab, local, vip2);
        echo_ok(&mut b, "B (A open)", "b1");
        echo_ok(&mut a, "A (B open)", "a2");
        echo_ok(&mut b, "B", "b2");
        echo_ok(&mut a, "A", "a3");
        b
    };
    echo_ok(&mut b, "B", "b3");

    let ports: Vec<u16> = servers[0]
        .peers()
        .iter()
        .map(|p| {
            assert_eq!(p.ip(), client);
            p.port()
        })
        .collect();
    assert_eq!(ports.len(), 2, "{mode:?}: two connections accepted");
    assert_eq!(ports[0], 45_000, "A keeps the client's port");
    assert!(
        (61_000..=65_535).contains(&ports[1]),
        "{mode:?}: B from the collision range: {ports:?}"
    );
    let ct = dp.writer().conntrack().unwrap();
    let b_entry = ct
        .iter()
        .find(|e| e.vip == (VIP2, 80))
        .expect("B in conntrack");
    assert_eq!(b_entry.client, (client, 45_000));
    assert_eq!(b_entry.backend_sees, Some(ports[1]));
    let reasons: BTreeMap<_, _> = dp.writer().reasons().unwrap().into_iter().collect();
    assert_eq!(reasons["ct_port_rewrite"], 1, "{reasons:?}");
    assert_eq!(reasons["drop_ports_exhausted"], 0);
    let e = csum_errors(&lab);
    assert!(no_csum_errors(&e), "{mode:?}: checksum errors: {e:?}");
}

/// The state of the flow `client -> vip` in conntrack, if it is there.
fn dp_flow_state(
    dp: &mut Datapath,
    client: (Ipv4Addr, u16),
    vip: (Ipv4Addr, u16),
) -> Option<String> {
    dp.writer()
        .conntrack()
        .unwrap()
        .into_iter()
        .find(|e| e.client == client && e.vip == vip)
        .map(|e| e.state.to_string())
}

/// Polls `f` every 20 ms for up to 3 s.
fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let end = std::time::Instant::now() + Duration::from_secs(3);
    while !f() {
        assert!(std::time::Instant::now() < end, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn xdp_lab_concurrent_collision_gets_distinct_ports() {
    if lab::require() {
        collisions(AttachMode::Xdp, false);
    }
}

#[test]
fn tc_lab_concurrent_collision_gets_distinct_ports() {
    if lab::require() {
        collisions(AttachMode::Tc, false);
    }
}

#[test]
fn xdp_lab_sequential_collision_survives_gc() {
    if lab::require() {
        collisions(AttachMode::Xdp, true);
    }
}

#[test]
fn tc_lab_sequential_collision_survives_gc() {
    if lab::require() {
        collisions(AttachMode::Tc, true);
    }
}

/// A UDP echo server for datagrams of any size in a backend namespace: it
/// records the length of every datagram it gets and sends it back whole.
/// Stopped and joined on drop (on panic too).
struct BigEcho {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    lens: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BigEcho {
    fn start(ns: &lab::Netns, port: u16) -> BigEcho {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lens = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = ns
            .run(|| {
                let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok::<_, std::io::Error>(s)
            })
            .unwrap()
            .expect("bind the echo server");
        let (stop2, lens2) = (stop.clone(), lens.clone());
        // The socket belongs to the backend namespace wherever its thread runs.
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = s.recv_from(&mut buf) {
                    lens2.lock().unwrap().push(n);
                    let _ = s.send_to(&buf[..n], peer);
                }
            }
        });
        BigEcho {
            stop,
            lens,
            thread: Some(thread),
        }
    }

    fn lens(&self) -> Vec<usize> {
        self.lens.lock().unwrap().clone()
    }
}

impl Drop for BigEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// IPv4 fragments through the VIP (issue 10): 3,000-byte UDP datagrams over
/// veths of MTU 1,500, so the client's kernel sends each in three
/// fragments, and the backend's kernel its 3,000-byte echo likewise. Each
/// arrives whole: at a backend (which records its length) and back at the
/// client (the same bytes, from the VIP). Before the fragment map, the later
/// fragments reached the node's stack still addressed to the VIP and the
/// datagram never arrived.
fn fragmented_udp(mode: AttachMode) {
    const N: usize = 6;
    const PORT: u16 = 7007;
    let lab = Lab::new(2).expect("lab");
    let echoes: Vec<BigEcho> = lab
        .backends()
        .iter()
        .map(|h| BigEcho::start(&h.ns, PORT))
        .collect();
    let (mut dp, _) = datapath_with(&lab, mode, |_| {});
    let svc = service(
        "lab/big:udp",
        UDP_VIP,
        53,
        Protocol::Udp,
        Algorithm::RoundRobin,
        lab.backends()
            .iter()
            .map(|h| Backend::new(h.ip(), PORT))
            .collect(),
    );
    dp.writer().upsert_service(&svc).unwrap();
    let snmp = |ns: &lab::Netns| ns.snmp().expect("/proc/net/snmp");
    let reasm_before: Vec<u64> = std::iter::once(lab.client())
        .chain(lab.backends())
        .map(|h| snmp(&h.ns)["Ip.ReasmOKs"])
        .collect();

    let sizes = [3000; N];
    let results = udp_echoes(&lab, &sizes);
    let reasons: BTreeMap<_, _> = dp.writer().reasons().unwrap().into_iter().collect();
    eprintln!("{mode:?}: {results:?}\n  reasons {reasons:?}");
    for (k, r) in results.iter().enumerate() {
        match r {
            Ok((same, len, peer)) => {
                assert!(*same, "{mode:?}: exchange {k}: echo of {len} bytes differs");
                assert_eq!(*peer, SocketAddr::from((UDP_VIP, 53)), "reply from the VIP");
            }
            Err(e) => panic!("{mode:?}: exchange {k}: no whole 3,000-byte echo: {e}"),
        }
    }
    // Whole at the backends, round-robin over both.
    let lens: Vec<Vec<usize>> = echoes.iter().map(|e| e.lens()).collect();
    assert_eq!(
        lens,
        vec![vec![3000; N / 2], vec![3000; N / 2]],
        "{mode:?}: datagrams at the backends"
    );
    // Really fragmented on the way: every receiver reassembled what it got.
    let reasm: Vec<u64> = std::iter::once(lab.client())
        .chain(lab.backends())
        .zip(&reasm_before)
        .map(|(h, b)| snmp(&h.ns)["Ip.ReasmOKs"] - b)
        .collect();
    assert_eq!(
        reasm,
        vec![N as u64, N as u64 / 2, N as u64 / 2],
        "{mode:?}: reassembled"
    );
    // Two later fragments each way per exchange followed their first.
    assert_eq!(reasons["nat_fragment"], 4 * N as u64, "{reasons:?}");
    assert!(
        reasons["nat_forward"] >= N as u64 && reasons["nat_reverse"] >= N as u64,
        "{reasons:?}"
    );
    assert_eq!(reasons["pass_fragment"], 0, "{reasons:?}");

    // Just over the MTU (2 fragments), a jumbo-sized datagram (7) and the
    // largest UDP datagram (65,507 bytes: 45 fragments).
    let sizes = [1473, 9000, 65507];
    let results = udp_echoes(&lab, &sizes);
    for (r, size) in results.iter().zip(sizes) {
        match r {
            Ok((same, len, _)) => assert!(*same && *len == size, "{mode:?}: {size} bytes"),
            Err(e) => panic!("{mode:?}: no whole {size}-byte echo: {e}"),
        }
    }
    let later: u64 = sizes
        .iter()
        .map(|s| (s + 8usize).div_ceil(1480) as u64 - 1)
        .sum();
    let after: BTreeMap<_, _> = dp.writer().reasons().unwrap().into_iter().collect();
    assert_eq!(
        after["nat_fragment"] - reasons["nat_fragment"],
        2 * later,
        "{after:?}"
    );
    assert_eq!(after["pass_fragment"], 0, "{after:?}");
    drop(echoes);
}

/// One UDP exchange with the VIP per size, each from a fresh socket (a new
/// flow; all kept open to the end): a datagram of that many bytes out, and
/// whether its echo came back the same, its length and its source.
fn udp_echoes(lab: &Lab, sizes: &[usize]) -> Vec<std::io::Result<(bool, usize, SocketAddr)>> {
    lab.client()
        .ns
        .run(|| {
            let mut open = Vec::new();
            let mut out = Vec::new();
            for (k, &size) in sizes.iter().enumerate() {
                let msg: Vec<u8> = (0..size).map(|i| (i * 11 + k * 17) as u8).collect();
                let r = (|| -> std::io::Result<(Vec<u8>, SocketAddr)> {
                    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.send_to(&msg, SocketAddrV4::new(UDP_VIP, 53))?;
                    let mut buf = vec![0u8; 65536];
                    let (n, peer) = s.recv_from(&mut buf)?;
                    open.push(s);
                    Ok((buf[..n].to_vec(), peer))
                })();
                out.push(r.map(|(got, peer)| (got == msg, got.len(), peer)));
            }
            out
        })
        .unwrap()
}

#[test]
fn tc_lab_fragmented_udp_arrives_whole() {
    if lab::require() {
        fragmented_udp(AttachMode::Tc);
    }
}

#[test]
fn xdp_lab_fragmented_udp_arrives_whole() {
    if lab::require() {
        fragmented_udp(AttachMode::Xdp);
    }
}

#[test]
fn xdp_generic_lab_fragmented_udp_arrives_whole() {
    if lab::require() {
        fragmented_udp(AttachMode::XdpGeneric);
    }
}
