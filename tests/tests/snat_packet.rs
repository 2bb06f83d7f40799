//! Packet tests of the SNAT for `externalTrafficPolicy: Cluster` front ends
//! whose backend runs on another node (lb-ebpf/src/snat.rs): the real
//! programs via BPF_PROG_TEST_RUN, XDP and TC, both program sets. Every
//! expected frame is built from scratch by the packet builder (checksums
//! computed there, independently of the kernel's incremental updates).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use lb_agent::datapath::programs::{self, ProgramSet};
use lb_agent::datapath::scratch::{Hook, ScratchDatapath};
use lb_agent::datapath::{Datapath, PortRange};
use lb_api::{Algorithm, Protocol, ServiceAddr};
use rpclb_tests::packet::{
    self, ACK, FIN, Pkt, SYN, Verdict as V, XDP_DROP, XDP_PASS, assert_bytes_eq, service,
};

/// The client, outside the cluster.
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
const CLIENT2: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 101);
/// This node's address (`--snat-address`).
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
/// Front ends: an external IP (TCP and UDP) with a backend on another node,
/// and one with a backend on this node.
const FE: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 1);
const FE_LOCAL: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 2);
/// A pod on node B, and one on this node.
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 32, 2);
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 16, 2);

fn can_run(set: ProgramSet) -> bool {
    if !rpclb_tests::lab::require() {
        return false;
    }
    if set == ProgramSet::Full && !programs::kernel_has_full_set() {
        eprintln!(
            "SKIP: the full program set needs {} (this is Linux {})",
            programs::FULL_NEEDS,
            programs::kernel_release()
        );
        return false;
    }
    true
}

/// Runs `f` in a namespace of its own (torn down after): forwarding on, a
/// veth `d0` on 10.244.32.1/24 (`REMOTE`'s network, no neighbour entry) and
/// 192.168.50.1/24. There a SNATed packet that the walk would hand to the
/// stack (these tests turn the fib redirect off) goes out with
/// `bpf_redirect_neigh` in TC, and is dropped in XDP.
fn in_ns(f: impl FnOnce() + Send) {
    let ns = rpclb_tests::lab::Netns::new("snatpkt").unwrap();
    for args in [
        vec!["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
        vec!["link", "set", "d0", "up"],
        vec!["link", "set", "d1", "up"],
        vec!["addr", "add", "10.244.32.1/24", "dev", "d0"],
        vec!["addr", "add", "192.168.50.1/24", "dev", "d0"],
    ] {
        ns.ip(&args).unwrap();
    }
    ns.exec("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
        .unwrap();
    ns.run(f).unwrap();
}

/// A data path (no fib redirect: translated packets pass) with SNAT on
/// `NODE` and `ports`, the front ends `FE:80` (TCP, UDP: backend
/// `REMOTE:8080`, SNATed) and `FE_LOCAL:80` (TCP: backend `LOCAL:8080`).
struct H(ScratchDatapath);

impl H {
    fn new(set: ProgramSet, ports: Option<PortRange>) -> H {
        let mut h = H(ScratchDatapath::new(|c| {
            c.fib_redirect = false;
            c.programs = set.into();
            c.snat_address = Some(NODE);
            c.snat_ports = ports;
        })
        .expect("load data path"));
        let svcs = [
            service(
                "fe/tcp",
                FE,
                80,
                Protocol::Tcp,
                Algorithm::Maglev,
                &[(REMOTE, 8080)],
            ),
            service(
                "fe/udp",
                FE,
                80,
                Protocol::Udp,
                Algorithm::Maglev,
                &[(REMOTE, 8080)],
            ),
            service(
                "fe/local",
                FE_LOCAL,
                80,
                Protocol::Tcp,
                Algorithm::Maglev,
                &[(LOCAL, 8080)],
            ),
        ];
        let snat: HashSet<(ServiceAddr, IpAddr, u16)> = svcs[..2]
            .iter()
            .map(|s| (s.addr(), IpAddr::from(REMOTE), 8080))
            .collect();
        let w = h.dp().writer();
        w.set_snat(snat);
        for s in &svcs {
            w.upsert_service(s).unwrap();
        }
        h
    }

    fn dp(&mut self) -> &mut Datapath {
        self.0.dp()
    }

    fn reasons(&mut self) -> Vec<(&'static str, u64)> {
        self.dp().writer().reasons().unwrap()
    }

    /// Runs `input`; checks the verdict, the output's checksums and bytes.
    fn step(&mut self, hook: Hook, desc: &str, input: &[u8], code: u32, want: &[u8]) {
        self.step_csum(hook, desc, input, code, want, true)
    }

    /// [`Self::step`]; `verify`: false for a CHECKSUM_PARTIAL seed, which is
    /// no checksum (the expected bytes hold the seed computed from scratch).
    fn step_csum(
        &mut self,
        hook: Hook,
        desc: &str,
        input: &[u8],
        code: u32,
        want: &[u8],
        verify: bool,
    ) {
        let (rc, out) = self
            .0
            .run(hook, input)
            .unwrap_or_else(|e| panic!("{hook:?}: {desc}: test run: {e}"));
        assert_eq!(rc, code, "{hook:?}: {desc}: verdict");
        if verify && let Err(e) = packet::verify_checksums(&out) {
            panic!("{hook:?}: {desc}: bad checksum in output: {e}");
        }
        assert_bytes_eq(&out, want);
        eprintln!("{hook:?}: {desc}: ok");
    }
}

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Pkt {
    Pkt::tcp()
        .ip(src, dst)
        .ports(sport, dport)
        .flags(flags)
        .seq(1000)
        .id(7)
        .payload(b"snat me")
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Pkt {
    Pkt::udp()
        .ip(src, dst)
        .ports(sport, dport)
        .id(9)
        .payload(b"query")
}

fn wire(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The `i`-th candidate SNAT port of a flow (`lb_common::collision_port`
/// over the flow's hash), computed here from the published functions.
fn candidate(r: PortRange, client: Ipv4Addr, sport: u16, fe: Ipv4Addr, proto: u8, i: u32) -> u16 {
    let h = lb_common::flow_hash(wire(client), wire(fe), sport.to_be(), 80u16.to_be(), proto);
    lb_common::collision_port(r.first.into(), r.count(), h, i) as u16
}

fn deltas(
    before: &[(&'static str, u64)],
    after: &[(&'static str, u64)],
) -> impl Fn(&str) -> u64 + use<> {
    let d: Vec<(&'static str, u64)> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    move |n: &str| d.iter().find(|r| r.0 == n).expect("reason name").1
}

/// A SYN to a front end whose backend is on another node leaves SNATed and
/// DNATed (node:port -> backend); the reply comes back un-SNATed and
/// un-DNATed in one step (front end -> client at its own port); the flow's
/// next packets and its FIN take the same rewrite. UDP alike. A front end
/// with a local backend is DNATed only.
fn snat_dnat_and_back(hook: Hook, set: ProgramSet) {
    let r = PortRange::DEFAULT_SNAT;
    let mut h = H::new(set, Some(r));
    let before = h.reasons();
    let p = candidate(r, CLIENT, 40000, FE, 6, 0);
    let (out, back) = (V::SnatOut.code(hook), V::Pass.code(hook));
    let steps: Vec<(&str, Vec<u8>, u32, Vec<u8>)> = vec![
        (
            "SYN to the front end: SNAT + DNAT",
            tcp(CLIENT, 40000, FE, 80, SYN).build(),
            out,
            tcp(NODE, p, REMOTE, 8080, SYN).build(),
        ),
        (
            "SYN|ACK from the backend to the node: un-SNAT + un-DNAT",
            tcp(REMOTE, 8080, NODE, p, SYN | ACK).ack(1001).build(),
            back,
            tcp(FE, 80, CLIENT, 40000, SYN | ACK).ack(1001).build(),
        ),
        (
            "ACK from the client: the same rewrite (conntrack hit)",
            tcp(CLIENT, 40000, FE, 80, ACK).build(),
            out,
            tcp(NODE, p, REMOTE, 8080, ACK).build(),
        ),
        (
            "data from the backend",
            tcp(REMOTE, 8080, NODE, p, ACK).ack(1008).build(),
            back,
            tcp(FE, 80, CLIENT, 40000, ACK).ack(1008).build(),
        ),
        (
            "FIN from the client",
            tcp(CLIENT, 40000, FE, 80, FIN | ACK).build(),
            out,
            tcp(NODE, p, REMOTE, 8080, FIN | ACK).build(),
        ),
    ];
    for (desc, input, code, want) in &steps {
        h.step(hook, desc, input, *code, want);
    }
    let up = candidate(r, CLIENT, 5353, FE, 17, 0);
    h.step(
        hook,
        "UDP to the front end: SNAT + DNAT",
        &udp(CLIENT, 5353, FE, 80).build(),
        V::SnatOut.code(hook),
        &udp(NODE, up, REMOTE, 8080).build(),
    );
    h.step(
        hook,
        "UDP reply: un-SNAT + un-DNAT",
        &udp(REMOTE, 8080, NODE, up).build(),
        V::Pass.code(hook),
        &udp(FE, 80, CLIENT, 5353).build(),
    );
    h.step(
        hook,
        "SYN to the front end with a local backend: DNAT only",
        &tcp(CLIENT, 40001, FE_LOCAL, 80, SYN).build(),
        V::Pass.code(hook),
        &tcp(CLIENT, 40001, LOCAL, 8080, SYN).build(),
    );
    h.step(
        hook,
        "its reply",
        &tcp(LOCAL, 8080, CLIENT, 40001, SYN | ACK).ack(1001).build(),
        V::Pass.code(hook),
        &tcp(FE_LOCAL, 80, CLIENT, 40001, SYN | ACK)
            .ack(1001)
            .build(),
    );
    let d = deltas(&before, &h.reasons());
    assert_eq!(d("ct_snat"), 2, "the TCP and the UDP flow");
    assert_eq!(d("ct_port_rewrite"), 0);
    assert_eq!(d("drop_snat_exhausted"), 0);
    assert_eq!(d("drop_ct_insert"), 0);
    assert_eq!(d("nat_forward"), 5);
    assert_eq!(d("nat_reverse"), 4);
    // The four SNATed packets to the backend: never to the stack.
    let (neigh, dropped) = match hook {
        Hook::Tc => (4, 0),
        Hook::Xdp => (0, 4),
    };
    assert_eq!(d("fwd_redirect_neigh"), neigh);
    assert_eq!(d("drop_snat_unrouted"), dropped);

    // The entries: the forward one records the backend and the SNAT port,
    // the reverse one (keyed backend -> node:port) the front end, the
    // client's port and address.
    let w = h.dp().writer();
    let key = |src: Ipv4Addr, sp: u16, dst: Ipv4Addr, dp: u16, proto: u8| lb_common::FlowKey {
        src_ip: wire(src),
        dst_ip: wire(dst),
        src_port: sp.to_be(),
        dst_port: dp.to_be(),
        proto,
        _pad: [0; 3],
    };
    let fk = key(CLIENT, 40000, FE, 80, 6);
    let rk = key(REMOTE, 8080, NODE, p, 6);
    let ct = w.conntrack_map();
    let f = ct.get(&fk, 0).expect("forward entry");
    let rv = ct.get(&rk, 0).expect("reverse entry");
    assert_eq!(f.flags, lb_common::ct_flags::SNAT);
    assert_eq!(
        (f.nat_ip, f.nat_port, f.client_port),
        (wire(REMOTE), 8080u16.to_be(), p.to_be())
    );
    assert_eq!(rv.flags, lb_common::ct_flags::SNAT);
    assert_eq!(
        (rv.nat_ip, rv.nat_port, rv.client_port, rv.state),
        (wire(FE), 80u16.to_be(), 40000u16.to_be(), wire(CLIENT))
    );
    assert_eq!(
        rk.forward_of_reverse(&rv),
        fk,
        "the reverse entry names its flow"
    );
    assert!(
        ct.get(&key(REMOTE, 8080, CLIENT, 40000, 6), 0).is_err(),
        "no reverse entry at the client's own tuple"
    );
}

rpclb_tests::each_hook_and_set!(snat_dnat_and_back, snat_dnat_and_back, in in_ns);

/// A client:port of a seed (CHECKSUM_PARTIAL) TCP SYN, in XDP: the seed is
/// updated as a seed for both addresses (the ports are not in it).
fn snat_partial_checksum(set: ProgramSet) {
    let r = PortRange::DEFAULT_SNAT;
    let mut h = H::new(set, Some(r));
    let p = candidate(r, CLIENT, 40002, FE, 6, 0);
    h.step_csum(
        Hook::Xdp,
        "SYN with a seed",
        &tcp(CLIENT, 40002, FE, 80, SYN).partial().build(),
        XDP_DROP,
        &tcp(NODE, p, REMOTE, 8080, SYN).partial().build(),
        false,
    );
    h.step_csum(
        Hook::Xdp,
        "reply with a seed",
        &tcp(REMOTE, 8080, NODE, p, SYN | ACK)
            .ack(1001)
            .partial()
            .build(),
        XDP_PASS,
        &tcp(FE, 80, CLIENT, 40002, SYN | ACK)
            .ack(1001)
            .partial()
            .build(),
        false,
    );
}

#[test]
fn xdp_snat_partial_checksum() {
    if can_run(ProgramSet::Full) {
        in_ns(|| snat_partial_checksum(ProgramSet::Full));
    }
}

#[test]
fn xdp_snat_partial_checksum_compat() {
    if can_run(ProgramSet::Compat) {
        in_ns(|| snat_partial_checksum(ProgramSet::Compat));
    }
}

/// Two clients whose flows hash to the same first SNAT port: the second
/// takes its next candidate, and each reply goes back to its own client.
fn snat_port_collision(hook: Hook, set: ProgramSet) {
    let r = PortRange::DEFAULT_SNAT;
    let mut h = H::new(set, Some(r));
    let p = candidate(r, CLIENT, 40000, FE, 6, 0);
    // A port of CLIENT2 whose first candidate is p.
    let sport2 = (1024..=65535u16)
        .find(|&s| candidate(r, CLIENT2, s, FE, 6, 0) == p)
        .expect("a port of CLIENT2 with the same first candidate");
    let p2 = (1..16)
        .map(|i| candidate(r, CLIENT2, sport2, FE, 6, i))
        .find(|&c| c != p)
        .unwrap();
    h.step(
        hook,
        "client 1: first candidate",
        &tcp(CLIENT, 40000, FE, 80, SYN).build(),
        V::SnatOut.code(hook),
        &tcp(NODE, p, REMOTE, 8080, SYN).build(),
    );
    h.step(
        hook,
        "client 2: first candidate taken, the next one",
        &tcp(CLIENT2, sport2, FE, 80, SYN).build(),
        V::SnatOut.code(hook),
        &tcp(NODE, p2, REMOTE, 8080, SYN).build(),
    );
    h.step(
        hook,
        "reply to client 2",
        &tcp(REMOTE, 8080, NODE, p2, SYN | ACK).ack(1001).build(),
        V::Pass.code(hook),
        &tcp(FE, 80, CLIENT2, sport2, SYN | ACK).ack(1001).build(),
    );
    h.step(
        hook,
        "reply to client 1",
        &tcp(REMOTE, 8080, NODE, p, SYN | ACK).ack(1001).build(),
        V::Pass.code(hook),
        &tcp(FE, 80, CLIENT, 40000, SYN | ACK).ack(1001).build(),
    );
}

rpclb_tests::each_hook_and_set!(snat_port_collision, snat_port_collision, in in_ns);

/// A one-port SNAT range: the second flow finds no free port; its SYN is
/// dropped and counted (`drop_snat_exhausted`, a drop of the service), the
/// first flow keeps working. Once the first flow's entries are gone (as GC
/// expiry deletes them), the port serves the next flow. SNAT off (no
/// ports): dropped and counted too.
fn snat_exhaustion(hook: Hook, set: ProgramSet) {
    let r = PortRange {
        first: 62000,
        last: 62000,
    };
    let mut h = H::new(set, Some(r));
    let before = h.reasons();
    h.step(
        hook,
        "client 1 takes the one port",
        &tcp(CLIENT, 40000, FE, 80, SYN).build(),
        V::SnatOut.code(hook),
        &tcp(NODE, 62000, REMOTE, 8080, SYN).build(),
    );
    let syn2 = tcp(CLIENT2, 40000, FE, 80, SYN).build();
    h.step(
        hook,
        "client 2: no free port",
        &syn2,
        V::Drop.code(hook),
        &syn2,
    );
    h.step(hook, "client 2 again", &syn2, V::Drop.code(hook), &syn2);
    h.step(
        hook,
        "client 1's reply still its own",
        &tcp(REMOTE, 8080, NODE, 62000, SYN | ACK).ack(1001).build(),
        V::Pass.code(hook),
        &tcp(FE, 80, CLIENT, 40000, SYN | ACK).ack(1001).build(),
    );
    let d = deltas(&before, &h.reasons());
    assert_eq!(d("drop_snat_exhausted"), 2);
    assert_eq!(d("ct_snat"), 1);
    let addr = ServiceAddr {
        vip: FE.into(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let st = h.dp().writer().service_stats(&addr).unwrap();
    assert_eq!((st.new_flows, st.drops), (1, 2));

    // Client 1's forward entry expires (GC deletes it): the port is free.
    let fk = lb_common::FlowKey {
        src_ip: wire(CLIENT),
        dst_ip: wire(FE),
        src_port: 40000u16.to_be(),
        dst_port: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    h.dp().writer().conntrack_map().remove(&fk).unwrap();
    h.step(
        hook,
        "client 2 after client 1's flow is gone",
        &syn2,
        V::SnatOut.code(hook),
        &tcp(NODE, 62000, REMOTE, 8080, SYN).build(),
    );
    h.step(
        hook,
        "the port's replies are client 2's",
        &tcp(REMOTE, 8080, NODE, 62000, SYN | ACK).ack(1001).build(),
        V::Pass.code(hook),
        &tcp(FE, 80, CLIENT2, 40000, SYN | ACK).ack(1001).build(),
    );

    // SNAT off: the flow is dropped, counted.
    let mut h = H::new(set, None);
    let before = h.reasons();
    h.step(hook, "SNAT off", &syn2, V::Drop.code(hook), &syn2);
    assert_eq!(deltas(&before, &h.reasons())("drop_snat_exhausted"), 1);
}

rpclb_tests::each_hook_and_set!(snat_exhaustion, snat_exhaustion, in in_ns);

/// A ClusterIP whose one backend is `POD` (TCP and UDP), on `REMOTE`'s
/// network (on `d0`, see [`in_ns`]), and the pod beside it.
const CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 32, 5);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 32, 6);
/// `lb_common::SERVICE_LOOPBACK_V4`.
const LOOPBACK: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// A data path as [`H::new`]'s (SNAT on `NODE`, `ports`) with the ClusterIP
/// `CIP:80` (TCP and UDP) to `POD:8080` only, never marked for SNAT.
fn hairpin_dp(set: ProgramSet, ports: Option<PortRange>) -> H {
    let mut h = H(ScratchDatapath::new(|c| {
        c.fib_redirect = false;
        c.programs = set.into();
        c.snat_address = Some(NODE);
        c.snat_ports = ports;
    })
    .expect("load data path"));
    let w = h.dp().writer();
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let s = service(
            &format!("pod/self-{proto:?}"),
            CIP,
            80,
            proto,
            Algorithm::Random,
            &[(POD, 8080)],
        );
        w.upsert_service(&s).unwrap();
    }
    h
}

/// Hairpin: the pod reaches itself through its ClusterIP. The SYN leaves
/// SNATed to the service loopback address at a port of the SNAT range (as
/// well as DNATed), so the pod's SYN|ACK comes back to rpclb, which sends it
/// to the pod from the ClusterIP at the pod's own port. Every packet to the
/// pod is a SNATed one: never to the stack (TC: `bpf_redirect_neigh`; XDP,
/// which cannot here: dropped). UDP alike. Another pod to the same service is
/// DNATed only. Counted as `ct_hairpin`, not `ct_snat`.
fn hairpin(hook: Hook, set: ProgramSet) {
    let r = PortRange::DEFAULT_SNAT;
    let mut h = hairpin_dp(set, Some(r));
    let before = h.reasons();
    let p = candidate(r, POD, 40000, CIP, 6, 0);
    let (out, back) = (V::SnatOut.code(hook), V::Pass.code(hook));
    let steps: Vec<(&str, Vec<u8>, u32, Vec<u8>)> = vec![
        (
            "SYN from the pod to its own service: SNAT to the loopback + DNAT",
            tcp(POD, 40000, CIP, 80, SYN).build(),
            out,
            tcp(LOOPBACK, p, POD, 8080, SYN).build(),
        ),
        (
            "SYN|ACK from the pod to the loopback: un-SNAT + un-DNAT",
            tcp(POD, 8080, LOOPBACK, p, SYN | ACK).ack(1001).build(),
            back,
            tcp(CIP, 80, POD, 40000, SYN | ACK).ack(1001).build(),
        ),
        (
            "ACK: the same rewrite (conntrack hit)",
            tcp(POD, 40000, CIP, 80, ACK).build(),
            out,
            tcp(LOOPBACK, p, POD, 8080, ACK).build(),
        ),
        (
            "data from the serving side",
            tcp(POD, 8080, LOOPBACK, p, ACK).ack(1008).build(),
            back,
            tcp(CIP, 80, POD, 40000, ACK).ack(1008).build(),
        ),
        (
            "FIN",
            tcp(POD, 40000, CIP, 80, FIN | ACK).build(),
            out,
            tcp(LOOPBACK, p, POD, 8080, FIN | ACK).build(),
        ),
    ];
    for (desc, input, code, want) in &steps {
        h.step(hook, desc, input, *code, want);
    }
    let up = candidate(r, POD, 5353, CIP, 17, 0);
    h.step(
        hook,
        "UDP from the pod to its own service: SNAT + DNAT",
        &udp(POD, 5353, CIP, 80).build(),
        V::SnatOut.code(hook),
        &udp(LOOPBACK, up, POD, 8080).build(),
    );
    h.step(
        hook,
        "UDP reply: un-SNAT + un-DNAT",
        &udp(POD, 8080, LOOPBACK, up).build(),
        V::Pass.code(hook),
        &udp(CIP, 80, POD, 5353).build(),
    );
    h.step(
        hook,
        "another pod to the service: DNAT only",
        &tcp(POD2, 40000, CIP, 80, SYN).build(),
        V::Pass.code(hook),
        &tcp(POD2, 40000, POD, 8080, SYN).build(),
    );
    let d = deltas(&before, &h.reasons());
    assert_eq!(d("ct_hairpin"), 2, "the TCP and the UDP hairpin flow");
    assert_eq!(d("ct_snat"), 0);
    assert_eq!(d("ct_port_rewrite"), 0);
    assert_eq!(d("drop_snat_exhausted"), 0);
    assert_eq!(d("drop_ct_insert"), 0);
    assert_eq!(d("nat_forward"), 5);
    assert_eq!(d("nat_reverse"), 3);
    let (neigh, dropped) = match hook {
        Hook::Tc => (4, 0),
        Hook::Xdp => (0, 4),
    };
    assert_eq!(d("fwd_redirect_neigh"), neigh);
    assert_eq!(d("drop_snat_unrouted"), dropped);

    // The entries: as a SNATed flow's, with the hairpin flag; the reverse
    // key ends at the loopback address, and names its flow.
    let w = h.dp().writer();
    let key = |src: Ipv4Addr, sp: u16, dst: Ipv4Addr, dp: u16| lb_common::FlowKey {
        src_ip: wire(src),
        dst_ip: wire(dst),
        src_port: sp.to_be(),
        dst_port: dp.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    let (fk, rk) = (key(POD, 40000, CIP, 80), key(POD, 8080, LOOPBACK, p));
    let ct = w.conntrack_map();
    let f = ct.get(&fk, 0).expect("forward entry");
    let rv = ct.get(&rk, 0).expect("reverse entry");
    let flags = lb_common::ct_flags::SNAT | lb_common::ct_flags::HAIRPIN;
    assert_eq!((f.flags, rv.flags), (flags, flags));
    assert_eq!(
        (f.nat_ip, f.nat_port, f.client_port),
        (wire(POD), 8080u16.to_be(), p.to_be())
    );
    assert_eq!(
        (rv.nat_ip, rv.nat_port, rv.client_port, rv.state),
        (wire(CIP), 80u16.to_be(), 40000u16.to_be(), wire(POD))
    );
    assert_eq!(rk.forward_of_reverse(&rv), fk);
    assert_eq!(
        lb_common::SERVICE_LOOPBACK_V4,
        wire(LOOPBACK),
        "the published address"
    );
}

rpclb_tests::each_hook_and_set!(hairpin, hairpin, in in_ns);

/// Hairpin with `--snat-ports off`: no port to SNAT from, so the pod's SYN
/// is dropped and counted (`drop_snat_exhausted`) rather than DNATed into a
/// packet from the pod to itself. With the ports but without a node address
/// (`--snat-address` unset and none found), hairpin still works: its address
/// is the loopback one.
fn hairpin_without_ports(hook: Hook, set: ProgramSet) {
    let mut h = hairpin_dp(set, None);
    let before = h.reasons();
    let syn = tcp(POD, 40000, CIP, 80, SYN).build();
    h.step(hook, "SNAT ports off", &syn, V::Drop.code(hook), &syn);
    let d = deltas(&before, &h.reasons());
    assert_eq!((d("drop_snat_exhausted"), d("ct_hairpin")), (1, 0));

    let r = PortRange {
        first: 62000,
        last: 62000,
    };
    let mut h = H(ScratchDatapath::new(|c| {
        c.fib_redirect = false;
        c.programs = set.into();
        c.snat_address = None;
        c.snat_ports = Some(r);
    })
    .expect("load data path"));
    let s = service(
        "pod/self",
        CIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        &[(POD, 8080)],
    );
    h.dp().writer().upsert_service(&s).unwrap();
    h.step(
        hook,
        "no node address: the loopback still",
        &syn,
        V::SnatOut.code(hook),
        &tcp(LOOPBACK, 62000, POD, 8080, SYN).build(),
    );
}

rpclb_tests::each_hook_and_set!(hairpin_without_ports, hairpin_without_ports, in in_ns);
