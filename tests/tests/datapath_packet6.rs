//! IPv6 packet tests: the real programs (lb-ebpf/src/v6.rs) in the real
//! kernel via BPF_PROG_TEST_RUN, on XDP and TC and on both program sets,
//! with exact expected bytes. Every frame is built here from scratch, and
//! every expected L4 checksum is computed here over the IPv6 pseudo-header
//! (RFC 8200 8.1), independently of the programs' incremental updates.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr};

use lb_agent::datapath::PortRange;
use lb_agent::datapath::programs::{self, ProgramSet};
use lb_agent::datapath::scratch::{Hook, ScratchDatapath};
use lb_api::{Algorithm, Backend, Protocol, Service, ServiceAddr};
use rpclb_tests::packet::{ACK, FIN, PSH, RST, SYN, Verdict as V, assert_bytes_eq};

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn client() -> Ipv6Addr {
    ip6("fd00:10:244:1::2")
}
fn vip() -> Ipv6Addr {
    ip6("fd00:10:96::10")
}
fn udp_vip() -> Ipv6Addr {
    ip6("fd00:10:96::53")
}
fn backend(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0x10 + i, 0, 0, 0, 2)
}

fn can_run(set: ProgramSet) -> bool {
    if !lb_agent::datapath::scratch::require_root("IPv6 packet tests") {
        return false;
    }
    if set == ProgramSet::Full && !programs::kernel_has_full_set() {
        eprintln!("SKIP: the full program set needs {}", programs::FULL_NEEDS);
        return false;
    }
    true
}

// ---- an IPv6 frame builder, with its own checksum code ----

/// One's-complement sum of `data` (big-endian words, an odd byte padded).
fn sum(mut s: u64, data: &[u8]) -> u64 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += w as u64;
    }
    s
}

fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The TCP/UDP checksum over IPv6: pseudo-header (source, destination,
/// upper-layer length as 32 bits, three zero bytes, next header) and the
/// segment with its check field zero. UDP sends a computed 0 as 0xffff.
fn l4_csum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, seg: &[u8]) -> u16 {
    let mut ph = Vec::new();
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&(seg.len() as u32).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, proto]);
    let c = !fold(sum(sum(0, &ph), seg));
    if proto == 17 && c == 0 { 0xffff } else { c }
}

/// The seed the kernel writes into a CHECKSUM_PARTIAL packet's check field:
/// the pseudo-header sum, folded, not complemented.
fn seed(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u16 {
    let mut ph = Vec::new();
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&(len as u32).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, proto]);
    fold(sum(0, &ph))
}

#[derive(Clone)]
struct P6 {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u8,
    hop: u8,
    /// Extension headers between IPv6 and L4: (next-header code of this
    /// header, its bytes with the next-header byte left 0).
    ext: Vec<(u8, Vec<u8>)>,
    payload: Vec<u8>,
    /// Protocol number in the IPv6 header / last extension header instead of the L4 one.
    raw_next: Option<u8>,
    /// Payload length in the IPv6 header instead of the real one.
    plen: Option<u16>,
    /// What the L4 check field holds.
    sum: Sum,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sum {
    /// The real checksum.
    Full,
    /// A CHECKSUM_PARTIAL seed: the folded pseudo-header sum, not complemented.
    Seed,
    /// UDP without a checksum.
    Zero,
}

const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

impl P6 {
    fn tcp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> P6 {
        P6 {
            src,
            dst,
            proto: 6,
            sport,
            dport,
            flags,
            hop: 64,
            ext: Vec::new(),
            payload: Vec::new(),
            raw_next: None,
            plen: None,
            sum: Sum::Full,
        }
    }
    fn udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> P6 {
        P6 {
            proto: 17,
            ..P6::tcp(src, sport, dst, dport, 0)
        }
    }
    fn payload(mut self, p: &[u8]) -> P6 {
        self.payload = p.to_vec();
        self
    }
    fn ext(mut self, code: u8, bytes: Vec<u8>) -> P6 {
        self.ext.push((code, bytes));
        self
    }
    fn addrs(mut self, src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> P6 {
        self.src = src;
        self.sport = sport;
        self.dst = dst;
        self.dport = dport;
        self
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == 6 {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(5 << 4);
            l4.push(self.flags);
            l4.extend_from_slice(&64240u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // check, urgent
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        let c = match self.sum {
            Sum::Full => l4_csum(self.src, self.dst, self.proto, &l4),
            Sum::Seed => seed(self.src, self.dst, self.proto, l4.len()),
            Sum::Zero => 0,
        };
        let at = if self.proto == 6 { 16 } else { 6 };
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        l4
    }

    fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAC_DST);
        f.extend_from_slice(&MAC_SRC);
        f.extend_from_slice(&[0x86, 0xdd]);
        // The chain: IPv6 -> ext[0] -> ... -> L4.
        let codes: Vec<u8> = self.ext.iter().map(|e| e.0).collect();
        let last = self.raw_next.unwrap_or(self.proto);
        let first = codes.first().copied().unwrap_or(last);
        let mut ext = Vec::new();
        for (i, (_, bytes)) in self.ext.iter().enumerate() {
            let mut b = bytes.clone();
            b[0] = codes.get(i + 1).copied().unwrap_or(last);
            ext.extend(b);
        }
        let l4 = self.l4();
        let plen = self.plen.unwrap_or((ext.len() + l4.len()) as u16);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&plen.to_be_bytes());
        f.push(first);
        f.push(self.hop);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend(ext);
        f.extend(l4);
        f
    }
}

/// A hop-by-hop or destination-options header of 8 bytes (a PadN option).
fn opts8() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

// ---- the harness ----

struct H(ScratchDatapath);

impl H {
    fn new(set: ProgramSet) -> H {
        let mut h = H(ScratchDatapath::new(|c| {
            c.fib_redirect = false;
            c.programs = set.into();
        })
        .expect("load data path"));
        assert_eq!(h.0.dp().programs(), set);
        h
    }

    fn apply(&mut self, svcs: Vec<Service>) {
        let refused = self
            .0
            .writer()
            .apply(&lb_api::DesiredState { services: svcs })
            .expect("apply");
        assert!(refused.is_empty(), "{refused:?}");
    }

    fn reason(&mut self, name: &str) -> u64 {
        self.0
            .writer()
            .reasons()
            .unwrap()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no reason {name}"))
            .1
    }

    /// Runs `input`, checks the verdict and the exact output bytes, and
    /// that `reason` went up by one.
    fn check(&mut self, hook: Hook, desc: &str, input: &[u8], v: V, output: &[u8], reason: &str) {
        let before = self.reason(reason);
        let (rc, out) = self
            .0
            .run(hook, input)
            .unwrap_or_else(|e| panic!("{hook:?}: {desc}: test run: {e}"));
        assert_eq!(rc, v.code(hook), "{hook:?}: {desc}: verdict");
        assert_bytes_eq(&out, output);
        assert_eq!(
            self.reason(reason),
            before + 1,
            "{hook:?}: {desc}: reason {reason}"
        );
        eprintln!("{hook:?}: {desc}: ok");
    }
}

fn svc(
    name: &str,
    vip: Ipv6Addr,
    port: u16,
    p: Protocol,
    a: Algorithm,
    bs: &[(Ipv6Addr, u16)],
) -> Service {
    Service::new(
        name,
        vip,
        port,
        p,
        a,
        bs.iter()
            .map(|&(ip, port)| Backend::new(ip, port))
            .collect(),
    )
}

/// The backend the kernel must pick: the service's table (as the agent
/// wrote it) indexed by `lb_common::flow_hash` of the folded addresses,
/// as the userspace proxy computes it.
fn predict(h: &mut H, addr: &ServiceAddr, src: Ipv6Addr, sport: u16) -> (Ipv6Addr, u16) {
    let w = h.0.writer();
    let t = w.service_table(addr).unwrap();
    let fold = |a: Ipv6Addr| lb_common::fold6(&lb_agent::datapath::reader::ip6_wire(a));
    let IpAddr::V6(vip) = addr.vip else { panic!() };
    let hash = lb_common::flow_hash(
        fold(src),
        fold(vip),
        sport.to_be(),
        addr.port.to_be(),
        lb_agent::datapath::abi::proto_number(addr.protocol),
    );
    let id = t[(hash % t.len() as u32) as usize];
    let b = w
        .backend_stats(addr)
        .unwrap()
        .into_iter()
        .find(|b| b.id == id)
        .expect("the table names a backend of the service");
    let IpAddr::V6(ip) = b.ip else {
        panic!("an IPv4 backend")
    };
    (ip, b.port)
}

fn services() -> Vec<Service> {
    vec![
        svc(
            "demo/rpc6:http",
            vip(),
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(backend(1), 8080), (backend(2), 8080), (backend(3), 8080)],
        ),
        svc(
            "demo/dns6:dns",
            udp_vip(),
            53,
            Protocol::Udp,
            Algorithm::Maglev,
            &[(backend(1), 5353), (backend(2), 5353)],
        ),
    ]
}

fn tcp_addr() -> ServiceAddr {
    services()[0].addr()
}

// ---- the tables ----

/// SYN, the next segment, FIN, the backend's reply, a UDP datagram each
/// way, and a packet to no service.
fn flows(hook: Hook, set: ProgramSet) {
    let mut h = H::new(set);
    h.apply(services());
    let addr = tcp_addr();
    let c = client();
    // Different ports per hook: each run is a new flow.
    let cport = if hook == Hook::Xdp { 40_001 } else { 40_002 };
    let (bip, bport) = predict(&mut h, &addr, c, cport);

    let syn = P6::tcp(c, cport, vip(), 80, SYN);
    let out = syn.clone().addrs(c, cport, bip, bport);
    h.check(
        hook,
        "SYN to the VIP",
        &syn.build(),
        V::Pass,
        &out.build(),
        "nat_forward",
    );

    let data = P6::tcp(c, cport, vip(), 80, ACK | PSH).payload(b"GET / HTTP/1.1\r\n\r\n");
    let out = data.clone().addrs(c, cport, bip, bport);
    h.check(
        hook,
        "established, with payload",
        &data.build(),
        V::Pass,
        &out.build(),
        "nat_forward",
    );

    let reply = P6::tcp(bip, bport, c, cport, SYN | ACK).payload(b"odd");
    let out = reply.clone().addrs(vip(), 80, c, cport);
    h.check(
        hook,
        "the backend's reply",
        &reply.build(),
        V::Pass,
        &out.build(),
        "nat_reverse",
    );

    let fin = P6::tcp(c, cport, vip(), 80, FIN | ACK);
    let out = fin.clone().addrs(c, cport, bip, bport);
    h.check(
        hook,
        "FIN",
        &fin.build(),
        V::Pass,
        &out.build(),
        "nat_forward",
    );

    // UDP: the predicted backend of the DNS service, and its answer.
    let uaddr = services()[1].addr();
    let (ubip, ubport) = predict(&mut h, &uaddr, c, cport);
    let q = P6::udp(c, cport, udp_vip(), 53).payload(b"query");
    let out = q.clone().addrs(c, cport, ubip, ubport);
    h.check(
        hook,
        "UDP to the VIP",
        &q.build(),
        V::Pass,
        &out.build(),
        "nat_forward",
    );
    let a = P6::udp(ubip, ubport, c, cport).payload(b"answer!");
    let out = a.clone().addrs(udp_vip(), 53, c, cport);
    h.check(
        hook,
        "UDP answer",
        &a.build(),
        V::Pass,
        &out.build(),
        "nat_reverse",
    );

    let other = P6::tcp(c, cport, ip6("fd00:10:96::77"), 80, SYN).build();
    h.check(
        hook,
        "no service",
        &other,
        V::Pass,
        &other,
        "pass_no_service",
    );
}
rpclb_tests::each_hook_and_set!(flows, flows);

/// What a scratch data path loads (lb-agent/src/datapath/scratch.rs): no
/// program before a run; a hook's entry program for its first IPv4 frame;
/// the IPv6 program that entry program tail-calls for its first IPv6 frame,
/// which then goes through both, as in production. A frame that reaches the
/// tail call while the IPv6 program is missing (forced here: a run that
/// skips loading it) panics instead of passing to the stack unnoticed.
fn loads_on_first_use(hook: Hook, set: ProgramSet) {
    use rpclb_tests::packet::{CLIENT, VIP, frame};
    let mut h = H::new(set);
    h.apply(services());
    let loaded = |h: &mut H| h.0.dp().loaded_programs();
    assert_eq!(loaded(&mut h), Vec::<&str>::new(), "nothing before a run");
    let (entry, v6) = match hook {
        Hook::Xdp => (set.xdp(), set.xdp6()),
        Hook::Tc => (set.tc(), set.tc6()),
    };

    let v4 = frame(6, CLIENT, 40_000, VIP, 80, SYN);
    h.check(
        hook,
        "IPv4, no service",
        &v4,
        V::Pass,
        &v4,
        "pass_no_service",
    );
    assert_eq!(loaded(&mut h), vec![entry], "the entry program only");

    let c = client();
    let syn = P6::tcp(c, 40_003, vip(), 80, SYN);
    let missing = h.reason("pass_ipv6_no_program");
    let forced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lb_agent::datapath::scratch::test_run_without_ipv6(h.0.dp(), hook, &syn.build())
    }));
    let msg = match forced {
        Ok(r) => panic!("a run into the missing IPv6 program returned {r:?}"),
        Err(p) => p
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "(not a String)".into()),
    };
    assert!(msg.contains("IPv6 program, which is not loaded"), "{msg}");
    assert_eq!(
        h.reason("pass_ipv6_no_program"),
        missing + 1,
        "the entry program found no IPv6 program"
    );
    assert_eq!(loaded(&mut h), vec![entry]);

    let (bip, bport) = predict(&mut h, &tcp_addr(), c, 40_003);
    let out = syn.clone().addrs(c, 40_003, bip, bport);
    h.check(
        hook,
        "IPv6 SYN to the VIP",
        &syn.build(),
        V::Pass,
        &out.build(),
        "nat_forward",
    );
    assert_eq!(loaded(&mut h), vec![entry, v6], "and the IPv6 program");
    assert_eq!(h.reason("pass_ipv6_no_program"), missing + 1);
}
rpclb_tests::each_hook_and_set!(loads_on_first_use, loads_on_first_use);

/// Extension headers: hop-by-hop and destination options are skipped (the
/// L4 header behind them rewritten); a Fragment header, ICMPv6 and a
/// routing header with segments left pass untouched.
fn extension_headers(hook: Hook, set: ProgramSet) {
    let mut h = H::new(set);
    h.apply(services());
    let addr = tcp_addr();
    let c = client();
    let cport = if hook == Hook::Xdp { 41_001 } else { 41_002 };
    let (bip, bport) = predict(&mut h, &addr, c, cport);

    let syn = P6::tcp(c, cport, vip(), 80, SYN)
        .ext(0, opts8())
        .ext(60, opts8());
    let out = syn.clone().addrs(c, cport, bip, bport);
    h.check(
        hook,
        "hop-by-hop + destination options",
        &syn.build(),
        V::Pass,
        &out.build(),
        "nat_forward",
    );

    // A Fragment header (first fragment, more to come).
    let frag = P6::tcp(c, cport + 100, vip(), 80, SYN)
        .ext(44, vec![0, 0, 0, 1, 0, 0, 0, 9])
        .build();
    h.check(hook, "fragment", &frag, V::Pass, &frag, "pass_fragment");

    // ICMPv6: a neighbour solicitation for the VIP.
    let mut ns = P6::tcp(c, 0, vip(), 0, 0);
    ns.raw_next = Some(58);
    let mut f = ns.build();
    // Replace the TCP bytes by an ICMPv6 NS (type 135) of 24 bytes.
    f.truncate(54);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&vip().octets());
    let c6 = l4_csum(c, vip(), 58, &icmp);
    icmp[2..4].copy_from_slice(&c6.to_be_bytes());
    f[18..20].copy_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend(icmp);
    h.check(
        hook,
        "ICMPv6 neighbour solicitation",
        &f,
        V::Pass,
        &f,
        "pass_not_tcp_udp",
    );

    // A routing header (type 4) with one segment left.
    let rh = P6::tcp(c, cport + 200, vip(), 80, SYN)
        .ext(43, vec![0, 0, 4, 1, 0, 0, 0, 0])
        .build();
    h.check(
        hook,
        "routing header, segments left",
        &rh,
        V::Pass,
        &rh,
        "pass_ipv6_ext",
    );

    // Five option headers: more than the program walks.
    let mut long = P6::tcp(c, cport + 300, vip(), 80, SYN);
    for _ in 0..5 {
        long = long.ext(60, opts8());
    }
    let long = long.build();
    h.check(
        hook,
        "five extension headers",
        &long,
        V::Pass,
        &long,
        "pass_ipv6_ext",
    );
}
rpclb_tests::each_hook_and_set!(extension_headers, extension_headers);

/// Truncated and inconsistent packets are dropped, as IPv4's are.
fn truncated(hook: Hook, set: ProgramSet) {
    let mut h = H::new(set);
    h.apply(services());
    let c = client();
    let syn = P6::tcp(c, 42_000, vip(), 80, SYN).build();

    // Every cut of the frame: inside the IPv6 header, then past it (the
    // payload length then runs past the frame). The kernel's test run
    // refuses skb (TC) frames whose IP header is cut; XDP covers those.
    if hook == Hook::Tc {
        assert!(
            h.0.run(hook, &syn[..53]).is_err(),
            "the kernel refuses a cut IPv6 header for skbs"
        );
    }
    let first = if hook == Hook::Xdp { 14 } else { 54 };
    for len in first..syn.len() {
        let cut = syn[..len].to_vec();
        let r = if len < 54 {
            "drop_truncated_ip"
        } else {
            "drop_bad_total_len"
        };
        h.check(hook, &format!("cut at {len}"), &cut, V::Drop, &cut, r);
    }

    // A payload length that ends inside the TCP header (the frame is padded).
    let mut short = P6::tcp(c, 42_001, vip(), 80, SYN);
    short.plen = Some(12);
    let short = short.build();
    h.check(
        hook,
        "payload length inside the TCP header",
        &short,
        V::Drop,
        &short,
        "drop_truncated_l4",
    );

    let mut udp = P6::udp(c, 42_002, udp_vip(), 53);
    udp.plen = Some(6);
    let udp = udp.build();
    h.check(
        hook,
        "payload length inside the UDP header",
        &udp,
        V::Drop,
        &udp,
        "drop_truncated_l4",
    );

    let mut bad = syn.clone();
    bad[14] = 0x40;
    h.check(
        hook,
        "version 4 in an IPv6 frame",
        &bad,
        V::Drop,
        &bad,
        "drop_bad_ihl",
    );
}
rpclb_tests::each_hook_and_set!(truncated, truncated);

/// Ethernet (MACs swapped: the answer goes back to the sender) and an IPv6
/// header from `src` to `dst` with hop limit 64, then `l4`.
fn answer(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC_SRC);
    f.extend_from_slice(&MAC_DST);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(l4);
    f
}

/// A service without backends answers as a closed port would, as kube-proxy's
/// REJECT does: a SYN gets a RST|ACK from the VIP, a UDP datagram an ICMPv6
/// port unreachable quoting its IPv6 and UDP headers; other packets, and
/// datagrams with extension headers, are dropped. All counted.
fn no_backend(hook: Hook, set: ProgramSet) {
    let mut h = H::new(set);
    h.apply(vec![
        svc(
            "demo/empty6:http",
            vip(),
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[],
        ),
        svc(
            "demo/empty6:dns",
            udp_vip(),
            53,
            Protocol::Udp,
            Algorithm::Maglev,
            &[],
        ),
    ]);
    // The SYN (seq 1000, 4 payload bytes): RST|ACK, seq 0, ack 1005, window 0.
    let syn = P6::tcp(client(), 43_000, vip(), 80, SYN)
        .payload(b"abcd")
        .build();
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&80u16.to_be_bytes());
    tcp.extend_from_slice(&43_000u16.to_be_bytes());
    tcp.extend_from_slice(&0u32.to_be_bytes());
    tcp.extend_from_slice(&1005u32.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, RST | ACK, 0, 0, 0, 0, 0, 0]);
    let c = l4_csum(vip(), client(), 6, &tcp);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let rst = answer(vip(), client(), 6, &tcp);
    assert_eq!(rst.len(), 74);
    h.check(
        hook,
        "SYN, no backend",
        &syn,
        V::Tx,
        &rst,
        "tx_rst_no_backend",
    );

    // A datagram: ICMPv6 type 1 code 4, the quote is its IPv6 + UDP headers.
    let dgram = P6::udp(client(), 41_000, udp_vip(), 53)
        .payload(b"query")
        .build();
    let mut icmp = vec![1, 4, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&dgram[14..62]);
    let c = l4_csum(udp_vip(), client(), 58, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let unreach = answer(udp_vip(), client(), 58, &icmp);
    assert_eq!(unreach.len(), 110);
    h.check(
        hook,
        "UDP, no backend",
        &dgram,
        V::Tx,
        &unreach,
        "tx_icmp_no_backend",
    );

    // Not a SYN; a datagram with a destination-options header: dropped.
    let ack = P6::tcp(client(), 43_001, vip(), 80, ACK).build();
    h.check(
        hook,
        "ACK, no backend",
        &ack,
        V::Drop,
        &ack,
        "drop_no_backend",
    );
    let ext = P6::udp(client(), 41_001, udp_vip(), 53)
        .ext(60, opts8())
        .payload(b"q")
        .build();
    h.check(
        hook,
        "UDP with an extension header, no backend",
        &ext,
        V::Drop,
        &ext,
        "drop_no_backend",
    );
}
rpclb_tests::each_hook_and_set!(no_backend, no_backend);

/// The kernel's picks follow the Maglev table for many flows (the
/// kernel folds the addresses as userspace does), and the conntrack
/// entries it writes are IPv6 flows.
fn maglev_agrees(hook: Hook, set: ProgramSet) {
    let mut h = H::new(set);
    h.apply(services());
    let addr = tcp_addr();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..64u16 {
        let c = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, i, 2);
        let port = 50_000 + i;
        let (bip, bport) = predict(&mut h, &addr, c, port);
        seen.insert(bip);
        let syn = P6::tcp(c, port, vip(), 80, SYN);
        let out = syn.clone().addrs(c, port, bip, bport);
        h.check(
            hook,
            "SYN",
            &syn.build(),
            V::Pass,
            &out.build(),
            "nat_forward",
        );
    }
    assert_eq!(seen.len(), 3, "64 flows reach every backend: {seen:?}");
    // Each flow has its forward entry (and the reverse one, not listed).
    let flows = h.0.writer().conntrack6().unwrap();
    assert_eq!(flows.len(), 64, "{flows:?}");
    assert!(
        flows
            .iter()
            .all(|f| f.vip == (vip(), 80) && f.state == "syn"),
        "{flows:?}"
    );
}
rpclb_tests::each_hook_and_set!(maglev_agrees, maglev_agrees);

/// Check fields that are not full checksums. XDP: a seed (the pod's own
/// CHECKSUM_PARTIAL packets) is updated as a seed (the addresses only) and
/// handed to the stack, counted; TC's helpers follow the skb instead, and a
/// test run's skb has no partial checksum, so only XDP gets seeds here.
/// Both: a UDP datagram without a checksum keeps 0.
fn other_sums(hook: Hook, set: ProgramSet) {
    let mut h = H::new(set);
    h.apply(services());
    let c = client();
    let cport = if hook == Hook::Xdp { 44_001 } else { 44_002 };
    if hook == Hook::Xdp {
        let addr = tcp_addr();
        let (bip, bport) = predict(&mut h, &addr, c, cport);
        let mut syn = P6::tcp(c, cport, vip(), 80, SYN).payload(b"seeded");
        syn.sum = Sum::Seed;
        let out = syn.clone().addrs(c, cport, bip, bport);
        h.check(
            hook,
            "seeded SYN",
            &syn.build(),
            V::Pass,
            &out.build(),
            "pass_csum_unverified",
        );
        let mut reply = P6::tcp(bip, bport, c, cport, SYN | ACK);
        reply.sum = Sum::Seed;
        let out = reply.clone().addrs(vip(), 80, c, cport);
        h.check(
            hook,
            "seeded reply",
            &reply.build(),
            V::Pass,
            &out.build(),
            "pass_csum_unverified",
        );
    }
    let uaddr = services()[1].addr();
    let (ubip, ubport) = predict(&mut h, &uaddr, c, cport);
    let mut q = P6::udp(c, cport, udp_vip(), 53).payload(b"no checksum");
    q.sum = Sum::Zero;
    let out = q.clone().addrs(c, cport, ubip, ubport);
    h.check(
        hook,
        "UDP without a checksum",
        &q.build(),
        V::Pass,
        &out.build(),
        "nat_forward",
    );
}
rpclb_tests::each_hook_and_set!(other_sums, other_sums);

/// The agent's IPv6 conntrack GC (`lb_agent::gc6`): an idle UDP flow's two
/// entries go, and its expiry is credited to its backend (`BACKEND_GC`), so
/// least-conn's active count drops back to 0; a fresh flow stays.
fn gc6_expires_idle_flows(hook: Hook, set: ProgramSet) {
    let mut h = H::new(set);
    h.apply(services());
    let c = client();
    let cport = if hook == Hook::Xdp { 45_001 } else { 45_002 };
    let uaddr = services()[1].addr();
    let (ubip, ubport) = predict(&mut h, &uaddr, c, cport);
    let q = P6::udp(c, cport, udp_vip(), 53).payload(b"q");
    let out = q.clone().addrs(c, cport, ubip, ubport);
    h.check(
        hook,
        "UDP to the VIP",
        &q.build(),
        V::Pass,
        &out.build(),
        "nat_forward",
    );
    let w = h.0.writer();
    let id = w.backend_id(&uaddr, ubip, ubport).expect("backend id");
    let (conns, gc) = w.backend_conn_counts(id).unwrap();
    assert_eq!((conns.opens, gc), (1, 0));
    assert_eq!(w.conntrack6_entries().unwrap().len(), 2);
    let t = lb_agent::config::Timeouts::default();
    let now = lb_agent::datapath::reader::monotonic_ns();
    // Not idle yet: kept.
    let r = lb_agent::gc6::sweep6(w, &t, now).unwrap();
    assert_eq!((r.flows, r.expired), (1, 0), "{r:?}");
    // Past the UDP timeout: both entries go, the expiry is credited.
    let later = now + t.udp.as_nanos() as u64 + 1_000_000_000;
    let r = lb_agent::gc6::sweep6(w, &t, later).unwrap();
    assert_eq!(
        (r.flows, r.expired, r.accounted, r.orphans),
        (1, 1, 1, 0),
        "{r:?}"
    );
    assert!(w.conntrack6_entries().unwrap().is_empty());
    let (conns, gc) = w.backend_conn_counts(id).unwrap();
    assert_eq!(conns.active(gc), 0);
}
rpclb_tests::each_hook_and_set!(gc6_expires_idle_flows, gc6_expires_idle_flows);

// ---- IPv6 SNAT (lb-ebpf/src/snat6.rs) ----

/// The client, outside the cluster, and a second one.
fn sclient(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x100 + i)
}
/// This node's IPv6 address (`--snat-address6`).
fn node6() -> Ipv6Addr {
    ip6("fd00:50::1")
}
/// A front end (an external IP, TCP and UDP) whose backend runs on another
/// node, and that backend (on the network of `d0`, see [`in_ns6`]).
fn fe6() -> Ipv6Addr {
    ip6("fd00:60::10")
}
fn remote6() -> Ipv6Addr {
    ip6("fd00:10:244:32::2")
}

/// Runs `f` in a namespace of its own (torn down after): IPv6 forwarding
/// on, a veth `d0` with `remote6()`'s network (no neighbour entry) and
/// `node6()`, without duplicate address detection. There a SNATed packet
/// that the walk would hand to the stack (these tests turn the fib redirect
/// off) goes out with `bpf_redirect_neigh` in TC, and is dropped in XDP.
fn in_ns6(f: impl FnOnce() + Send) {
    let ns = rpclb_tests::lab::Netns::new("snat6pkt").unwrap();
    for args in [
        vec!["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
        vec!["link", "set", "d0", "up"],
        vec!["link", "set", "d1", "up"],
        vec![
            "-6",
            "addr",
            "add",
            "fd00:10:244:32::1/64",
            "dev",
            "d0",
            "nodad",
        ],
        vec!["-6", "addr", "add", "fd00:50::1/64", "dev", "d0", "nodad"],
    ] {
        ns.ip(&args).unwrap();
    }
    ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])
        .unwrap();
    ns.run(f).unwrap();
}

/// A data path (no fib redirect) with IPv6 SNAT on `node6()` and `ports`
/// (`addr6`: the SNAT address, `None` for IPv6 SNAT off), and the front
/// ends `fe6():80` TCP and UDP to `remote6():8080`, marked for SNAT as the
/// agent marks a `Cluster` front end's backend on another node.
fn snat_h(set: ProgramSet, ports: Option<PortRange>, addr6: Option<Ipv6Addr>) -> H {
    let mut h = H(ScratchDatapath::new(|c| {
        c.fib_redirect = false;
        c.programs = set.into();
        c.snat_ports = ports;
        c.snat_address6 = addr6;
    })
    .expect("load data path"));
    let svcs = [Protocol::Tcp, Protocol::Udp].map(|p| {
        svc(
            &format!("fe6/{p:?}"),
            fe6(),
            80,
            p,
            Algorithm::Maglev,
            &[(remote6(), 8080)],
        )
    });
    let snat: HashSet<(ServiceAddr, IpAddr, u16)> = svcs
        .iter()
        .map(|s| (s.addr(), IpAddr::from(remote6()), 8080))
        .collect();
    let w = h.0.writer();
    w.set_snat(snat);
    for s in &svcs {
        w.upsert_service(s).unwrap();
    }
    h
}

impl H {
    fn reasons(&mut self) -> Vec<(&'static str, u64)> {
        self.0.writer().reasons().unwrap()
    }

    /// Runs `input`; checks the verdict code and the exact output bytes
    /// (whose checksums the builder computed from scratch).
    fn step(&mut self, hook: Hook, desc: &str, input: &P6, code: u32, want: &P6) {
        let (rc, out) = self
            .0
            .run(hook, &input.build())
            .unwrap_or_else(|e| panic!("{hook:?}: {desc}: test run: {e}"));
        assert_eq!(rc, code, "{hook:?}: {desc}: verdict");
        assert_bytes_eq(&out, &want.build());
        eprintln!("{hook:?}: {desc}: ok");
    }
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

fn w6(a: Ipv6Addr) -> [u32; 4] {
    lb_agent::datapath::reader::ip6_wire(a)
}

/// The `i`-th candidate SNAT port of a flow to `fe6():80`
/// (`lb_common::collision_port` over the hash of the folded addresses),
/// computed here from the published functions.
fn candidate(r: PortRange, client: Ipv6Addr, sport: u16, proto: u8, i: u32) -> u16 {
    let h = lb_common::flow_hash(
        lb_common::fold6(&w6(client)),
        lb_common::fold6(&w6(fe6())),
        sport.to_be(),
        80u16.to_be(),
        proto,
    );
    lb_common::collision_port(r.first.into(), r.count(), h, i) as u16
}

fn key6(src: Ipv6Addr, sp: u16, dst: Ipv6Addr, dp: u16, proto: u8) -> lb_common::FlowKey6 {
    lb_common::FlowKey6 {
        src_ip: w6(src),
        dst_ip: w6(dst),
        src_port: sp.to_be(),
        dst_port: dp.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// A SYN to a `Cluster` front end whose backend is on another node leaves
/// SNATed and DNATed (node6:port -> backend); the backend's reply comes
/// back un-SNATed and un-DNATed in one step (front end -> client at its
/// own port); the flow's next packets and its FIN take the same rewrite.
/// UDP alike. The entries name each other (GC pairs them), and the GC
/// expires both.
fn snat6_round_trip(hook: Hook, set: ProgramSet) {
    let r = PortRange::DEFAULT_SNAT;
    let mut h = snat_h(set, Some(r), Some(node6()));
    let before = h.reasons();
    let (c, fe, b, n) = (sclient(1), fe6(), remote6(), node6());
    let p = candidate(r, c, 40000, 6, 0);
    let (out, back) = (V::SnatOut.code(hook), V::Pass.code(hook));
    let steps = [
        (
            "SYN to the front end: SNAT + DNAT",
            P6::tcp(c, 40000, fe, 80, SYN).payload(b"snat me"),
            out,
            P6::tcp(n, p, b, 8080, SYN).payload(b"snat me"),
        ),
        (
            "SYN|ACK from the backend to the node: un-SNAT + un-DNAT",
            P6::tcp(b, 8080, n, p, SYN | ACK),
            back,
            P6::tcp(fe, 80, c, 40000, SYN | ACK),
        ),
        (
            "ACK from the client: the same rewrite (conntrack hit)",
            P6::tcp(c, 40000, fe, 80, ACK),
            out,
            P6::tcp(n, p, b, 8080, ACK),
        ),
        (
            "data from the backend",
            P6::tcp(b, 8080, n, p, ACK | PSH).payload(b"odd"),
            back,
            P6::tcp(fe, 80, c, 40000, ACK | PSH).payload(b"odd"),
        ),
        (
            "FIN from the client",
            P6::tcp(c, 40000, fe, 80, FIN | ACK),
            out,
            P6::tcp(n, p, b, 8080, FIN | ACK),
        ),
        (
            "FIN from the backend",
            P6::tcp(b, 8080, n, p, FIN | ACK),
            back,
            P6::tcp(fe, 80, c, 40000, FIN | ACK),
        ),
    ];
    for (desc, input, code, want) in &steps {
        h.step(hook, desc, input, *code, want);
    }
    let up = candidate(r, c, 5353, 17, 0);
    h.step(
        hook,
        "UDP to the front end: SNAT + DNAT",
        &P6::udp(c, 5353, fe, 80).payload(b"query"),
        out,
        &P6::udp(n, up, b, 8080).payload(b"query"),
    );
    h.step(
        hook,
        "UDP reply: un-SNAT + un-DNAT",
        &P6::udp(b, 8080, n, up).payload(b"answer"),
        back,
        &P6::udp(fe, 80, c, 5353).payload(b"answer"),
    );
    let d = deltas(&before, &h.reasons());
    assert_eq!(d("ct_snat"), 2, "the TCP and the UDP flow");
    assert_eq!(d("ct_hairpin"), 0);
    assert_eq!(d("drop_snat_exhausted"), 0);
    assert_eq!(d("drop_ct_insert"), 0);
    assert_eq!(d("nat_forward"), 4);
    assert_eq!(d("nat_reverse"), 4);
    // The four SNATed packets to the backend: never to the stack.
    let (neigh, unrouted) = match hook {
        Hook::Tc => (4, 0),
        Hook::Xdp => (0, 4),
    };
    assert_eq!(d("fwd_redirect_neigh"), neigh);
    assert_eq!(d("drop_snat_unrouted"), unrouted);

    // The entries: forward at the client's key (backend, SNAT port, the
    // source address); reverse at backend -> node:port (front end, the
    // client's port and address). Each names the other.
    let w = h.0.writer();
    let (fk, rk) = (key6(c, 40000, fe, 80, 6), key6(b, 8080, n, p, 6));
    let f = w.conntrack6_get(&fk).unwrap().expect("forward entry");
    let rv = w.conntrack6_get(&rk).unwrap().expect("reverse entry");
    assert_eq!((f.ct.flags, rv.ct.flags), (1, 1), "ct_flags::SNAT");
    assert_eq!(
        (f.nat_ip6, f.ct.nat_port, f.ct.client_port, f.snat_ip6),
        (w6(b), 8080u16.to_be(), p.to_be(), w6(n))
    );
    assert_eq!(f.ct.state, lb_common::ct_state::CLOSING);
    assert_eq!(
        (rv.nat_ip6, rv.ct.nat_port, rv.ct.client_port, rv.snat_ip6),
        (w6(fe), 80u16.to_be(), 40000u16.to_be(), w6(c))
    );
    assert_eq!(fk.reverse_of_forward(&f), rk);
    assert_eq!(rk.forward_of_reverse(&rv), fk);
    assert!(fk.owns_reverse(&f, &rk, &rv));
    assert!(
        w.conntrack6_get(&key6(b, 8080, c, 40000, 6))
            .unwrap()
            .is_none(),
        "no reverse entry at the client's own tuple"
    );
    // GC: past the timeouts, both flows' entries go, in pairs (no orphan).
    let t = lb_agent::config::Timeouts::default();
    let later = lb_agent::datapath::reader::monotonic_ns() + 7 * 3600 * 1_000_000_000;
    let g = lb_agent::gc6::sweep6(w, &t, later).unwrap();
    assert_eq!((g.flows, g.expired, g.orphans), (2, 2, 0), "{g:?}");
    assert!(w.conntrack6_entries().unwrap().is_empty());
}
rpclb_tests::each_hook_and_set!(snat6_round_trip, snat6_round_trip, in in_ns6);

/// Two clients whose flows hash to the same first SNAT port: the second
/// takes its next candidate, and each reply goes back to its own client.
fn snat6_port_collision(hook: Hook, set: ProgramSet) {
    let r = PortRange::DEFAULT_SNAT;
    let mut h = snat_h(set, Some(r), Some(node6()));
    let (c1, c2, fe, b, n) = (sclient(1), sclient(2), fe6(), remote6(), node6());
    let p = candidate(r, c1, 40000, 6, 0);
    let sport2 = (1024..=65535u16)
        .find(|&s| candidate(r, c2, s, 6, 0) == p)
        .expect("a port of client 2 with the same first candidate");
    let p2 = (1..16)
        .map(|i| candidate(r, c2, sport2, 6, i))
        .find(|&x| x != p)
        .unwrap();
    let out = V::SnatOut.code(hook);
    h.step(
        hook,
        "client 1: first candidate",
        &P6::tcp(c1, 40000, fe, 80, SYN),
        out,
        &P6::tcp(n, p, b, 8080, SYN),
    );
    h.step(
        hook,
        "client 2: first candidate taken, the next one",
        &P6::tcp(c2, sport2, fe, 80, SYN),
        out,
        &P6::tcp(n, p2, b, 8080, SYN),
    );
    h.step(
        hook,
        "reply to client 2",
        &P6::tcp(b, 8080, n, p2, SYN | ACK),
        V::Pass.code(hook),
        &P6::tcp(fe, 80, c2, sport2, SYN | ACK),
    );
    h.step(
        hook,
        "reply to client 1",
        &P6::tcp(b, 8080, n, p, SYN | ACK),
        V::Pass.code(hook),
        &P6::tcp(fe, 80, c1, 40000, SYN | ACK),
    );
}
rpclb_tests::each_hook_and_set!(snat6_port_collision, snat6_port_collision, in in_ns6);

/// A one-port SNAT range: the second flow finds no free port; its SYN is
/// dropped and counted (`drop_snat_exhausted`, a drop of the service), the
/// first flow keeps working. Once the first flow's forward entry is gone
/// (as GC deletes it), the port serves the next flow. No IPv6 SNAT address
/// (the agent then never marks IPv6 backends for SNAT): dropped, counted.
fn snat6_exhaustion(hook: Hook, set: ProgramSet) {
    let r = PortRange {
        first: 62000,
        last: 62000,
    };
    let mut h = snat_h(set, Some(r), Some(node6()));
    let before = h.reasons();
    let (c1, c2, fe, b, n) = (sclient(1), sclient(2), fe6(), remote6(), node6());
    h.step(
        hook,
        "client 1 takes the one port",
        &P6::tcp(c1, 40000, fe, 80, SYN),
        V::SnatOut.code(hook),
        &P6::tcp(n, 62000, b, 8080, SYN),
    );
    let syn2 = P6::tcp(c2, 40000, fe, 80, SYN);
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
        &P6::tcp(b, 8080, n, 62000, SYN | ACK),
        V::Pass.code(hook),
        &P6::tcp(fe, 80, c1, 40000, SYN | ACK),
    );
    let d = deltas(&before, &h.reasons());
    assert_eq!((d("drop_snat_exhausted"), d("ct_snat")), (2, 1));
    let addr = ServiceAddr {
        vip: fe.into(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let st = h.0.writer().service_stats(&addr).unwrap();
    assert_eq!((st.new_flows, st.drops), (1, 2));

    h.0.writer()
        .conntrack6_remove(&key6(c1, 40000, fe, 80, 6))
        .unwrap();
    h.step(
        hook,
        "client 2 after client 1's flow is gone",
        &syn2,
        V::SnatOut.code(hook),
        &P6::tcp(n, 62000, b, 8080, SYN),
    );
    h.step(
        hook,
        "the port's replies are client 2's",
        &P6::tcp(b, 8080, n, 62000, SYN | ACK),
        V::Pass.code(hook),
        &P6::tcp(fe, 80, c2, 40000, SYN | ACK),
    );

    // No IPv6 SNAT address, or no ports: dropped, counted.
    for (ports, addr6) in [(Some(r), None), (None, Some(node6()))] {
        let mut h = snat_h(set, ports, addr6);
        let before = h.reasons();
        h.step(hook, "IPv6 SNAT off", &syn2, V::Drop.code(hook), &syn2);
        assert_eq!(deltas(&before, &h.reasons())("drop_snat_exhausted"), 1);
    }
}
rpclb_tests::each_hook_and_set!(snat6_exhaustion, snat6_exhaustion, in in_ns6);

/// IPv6 hairpin: a ClusterIP whose one backend is `pod6(5)` (TCP and UDP),
/// on `remote6()`'s network (on `d0`, see [`in_ns6`]).
fn cip6() -> Ipv6Addr {
    ip6("fd00:10:96::40")
}
fn pod6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0x32, 0, 0, 0, i)
}
/// `lb_common::SERVICE_LOOPBACK_V6`.
fn loopback6() -> Ipv6Addr {
    ip6("100::a9fe:2a01")
}

/// The first candidate SNAT port of a flow from `src:sport` to `dst:80`.
fn candidate_to(r: PortRange, src: Ipv6Addr, sport: u16, dst: Ipv6Addr, proto: u8) -> u16 {
    let h = lb_common::flow_hash(
        lb_common::fold6(&w6(src)),
        lb_common::fold6(&w6(dst)),
        sport.to_be(),
        80u16.to_be(),
        proto,
    );
    lb_common::collision_port(r.first.into(), r.count(), h, 0) as u16
}

/// A pod reaches itself through its IPv6 ClusterIP: the SYN leaves SNATed
/// to the IPv6 service loopback 100::a9fe:2a01 at a port of the SNAT range
/// (and DNATed), so the pod's SYN|ACK comes back to rpclb, which sends it to
/// the pod from the ClusterIP at the pod's own port. No node address needed
/// (`--snat-address6` unset). Every packet to the pod is a SNATed one:
/// never to the stack (TC: `bpf_redirect_neigh`; XDP, which cannot here:
/// dropped). UDP alike. Another pod is DNATed only. Counted as
/// `ct_hairpin`, not `ct_snat`. Without ports: dropped, counted.
fn hairpin6(hook: Hook, set: ProgramSet) {
    assert_eq!(
        lb_common::SERVICE_LOOPBACK_V6,
        w6(loopback6()),
        "the published address"
    );
    let r = PortRange::DEFAULT_SNAT;
    let mut h = snat_h(set, Some(r), None);
    for p in [Protocol::Tcp, Protocol::Udp] {
        let s = svc(
            &format!("pod/self-{p:?}"),
            cip6(),
            80,
            p,
            Algorithm::Random,
            &[(pod6(5), 8080)],
        );
        h.0.writer().upsert_service(&s).unwrap();
    }
    let before = h.reasons();
    let (pod, cip, lo) = (pod6(5), cip6(), loopback6());
    let p = candidate_to(r, pod, 40000, cip, 6);
    let (out, back) = (V::SnatOut.code(hook), V::Pass.code(hook));
    let steps = [
        (
            "SYN from the pod to its own service: SNAT to the loopback + DNAT",
            P6::tcp(pod, 40000, cip, 80, SYN),
            out,
            P6::tcp(lo, p, pod, 8080, SYN),
        ),
        (
            "SYN|ACK from the pod to the loopback: un-SNAT + un-DNAT",
            P6::tcp(pod, 8080, lo, p, SYN | ACK),
            back,
            P6::tcp(cip, 80, pod, 40000, SYN | ACK),
        ),
        (
            "ACK: the same rewrite (conntrack hit)",
            P6::tcp(pod, 40000, cip, 80, ACK).payload(b"ping"),
            out,
            P6::tcp(lo, p, pod, 8080, ACK).payload(b"ping"),
        ),
        (
            "FIN",
            P6::tcp(pod, 40000, cip, 80, FIN | ACK),
            out,
            P6::tcp(lo, p, pod, 8080, FIN | ACK),
        ),
    ];
    for (desc, input, code, want) in &steps {
        h.step(hook, desc, input, *code, want);
    }
    let up = candidate_to(r, pod, 5353, cip, 17);
    h.step(
        hook,
        "UDP from the pod to its own service",
        &P6::udp(pod, 5353, cip, 80).payload(b"q"),
        out,
        &P6::udp(lo, up, pod, 8080).payload(b"q"),
    );
    h.step(
        hook,
        "UDP reply",
        &P6::udp(pod, 8080, lo, up).payload(b"a"),
        back,
        &P6::udp(cip, 80, pod, 5353).payload(b"a"),
    );
    h.step(
        hook,
        "another pod to the service: DNAT only",
        &P6::tcp(pod6(6), 40000, cip, 80, SYN),
        back,
        &P6::tcp(pod6(6), 40000, pod, 8080, SYN),
    );
    let d = deltas(&before, &h.reasons());
    assert_eq!((d("ct_hairpin"), d("ct_snat")), (2, 0));
    assert_eq!((d("drop_snat_exhausted"), d("drop_ct_insert")), (0, 0));
    let (neigh, unrouted) = match hook {
        Hook::Tc => (4, 0),
        Hook::Xdp => (0, 4),
    };
    assert_eq!(d("fwd_redirect_neigh"), neigh);
    assert_eq!(d("drop_snat_unrouted"), unrouted);
    let w = h.0.writer();
    let (fk, rk) = (key6(pod, 40000, cip, 80, 6), key6(pod, 8080, lo, p, 6));
    let f = w.conntrack6_get(&fk).unwrap().expect("forward entry");
    let rv = w.conntrack6_get(&rk).unwrap().expect("reverse entry");
    let flags = lb_common::ct_flags::SNAT | lb_common::ct_flags::HAIRPIN;
    assert_eq!((f.ct.flags, rv.ct.flags), (flags, flags));
    assert_eq!((f.snat_ip6, rv.snat_ip6), (w6(lo), w6(pod)));
    assert_eq!(rk.forward_of_reverse(&rv), fk);
    assert_eq!(fk.reverse_of_forward(&f), rk);

    // No SNAT ports: no way to hairpin; dropped and counted rather than
    // DNATed into a packet from the pod to itself.
    let mut h = snat_h(set, None, None);
    let s = svc(
        "pod/self",
        cip,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        &[(pod, 8080)],
    );
    h.0.writer().upsert_service(&s).unwrap();
    let before = h.reasons();
    let syn = P6::tcp(pod, 40000, cip, 80, SYN);
    h.step(hook, "SNAT ports off", &syn, V::Drop.code(hook), &syn);
    let d = deltas(&before, &h.reasons());
    assert_eq!((d("drop_snat_exhausted"), d("ct_hairpin")), (1, 0));
}
rpclb_tests::each_hook_and_set!(hairpin6, hairpin6, in in_ns6);

/// A reverse-tuple collision over IPv6 (docs/reliability.md): one client
/// ip:port reaches two VIPs that share one backend. The second flow's
/// reverse key (backend -> client ip:port) is the first flow's, so it gets
/// a client port of the collision range (`--collision-ports`), rewritten on
/// the way in and restored on its replies; the first flow is untouched.
/// Counted `ct_port_rewrite`. No collision ports: dropped, counted
/// (`drop_ports_exhausted`). Before, IPv6 always dropped such a flow.
fn collision_rewrite(hook: Hook, set: ProgramSet) {
    let (c, b) = (client(), backend(1));
    let (v1, v2) = (ip6("fd00:10:96::51"), ip6("fd00:10:96::52"));
    let mk = |name: &str, vip| {
        svc(
            name,
            vip,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(b, 8080)],
        )
    };
    let cport: u16 = if hook == Hook::Xdp { 47_001 } else { 47_002 };
    let r = PortRange::DEFAULT_COLLISION;
    let h = lb_common::flow_hash(
        lb_common::fold6(&w6(c)),
        lb_common::fold6(&w6(v2)),
        cport.to_be(),
        80u16.to_be(),
        6,
    );
    let rp = lb_common::collision_port(r.first.into(), r.count(), h, 0) as u16;
    let mut t = H::new(set);
    t.apply(vec![mk("demo/a", v1), mk("demo/b", v2)]);
    let before = t.reasons();
    let steps = [
        (
            "SYN to VIP 1: DNAT",
            P6::tcp(c, cport, v1, 80, SYN),
            V::Pass,
            P6::tcp(c, cport, b, 8080, SYN),
        ),
        (
            "SYN to VIP 2 from the same ip:port: DNAT, another client port",
            P6::tcp(c, cport, v2, 80, SYN).payload(b"two"),
            V::Pass,
            P6::tcp(c, rp, b, 8080, SYN).payload(b"two"),
        ),
        (
            "the second flow's reply: from VIP 2 to the client's own port",
            P6::tcp(b, 8080, c, rp, SYN | ACK),
            V::Pass,
            P6::tcp(v2, 80, c, cport, SYN | ACK),
        ),
        (
            "the first flow's reply: from VIP 1",
            P6::tcp(b, 8080, c, cport, SYN | ACK),
            V::Pass,
            P6::tcp(v1, 80, c, cport, SYN | ACK),
        ),
        (
            "the second flow's next packet: the same rewrite",
            P6::tcp(c, cport, v2, 80, ACK),
            V::Pass,
            P6::tcp(c, rp, b, 8080, ACK),
        ),
    ];
    for (desc, input, v, want) in &steps {
        t.step(hook, desc, input, v.code(hook), want);
    }
    let d = deltas(&before, &t.reasons());
    assert_eq!((d("ct_port_rewrite"), d("drop_ports_exhausted")), (1, 0));
    assert_eq!((d("nat_forward"), d("nat_reverse")), (3, 2));

    // No collision ports: the second flow is dropped, counted.
    let mut t = H(ScratchDatapath::new(|cfg| {
        cfg.fib_redirect = false;
        cfg.programs = set.into();
        cfg.collision_ports = None;
    })
    .expect("load data path"));
    t.apply(vec![mk("demo/a", v1), mk("demo/b", v2)]);
    let before = t.reasons();
    t.step(
        hook,
        "SYN to VIP 1",
        &P6::tcp(c, cport, v1, 80, SYN),
        V::Pass.code(hook),
        &P6::tcp(c, cport, b, 8080, SYN),
    );
    let syn2 = P6::tcp(c, cport, v2, 80, SYN);
    t.step(
        hook,
        "SYN to VIP 2: no port",
        &syn2,
        V::Drop.code(hook),
        &syn2,
    );
    let d = deltas(&before, &t.reasons());
    assert_eq!((d("ct_port_rewrite"), d("drop_ports_exhausted")), (0, 1));
}
rpclb_tests::each_hook_and_set!(collision_rewrite, collision_rewrite);
