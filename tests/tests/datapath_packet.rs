//! Packet tests: the real programs in the real kernel via BPF_PROG_TEST_RUN.
//!
//! Fixtures in the style of Katran's: a description, an input frame from the
//! packet builder, map setup through the agent's `MapWriter`, the expected
//! verdict and the exact expected output bytes (checksums included). Each
//! table runs against XDP and against TC, and on both program sets (full,
//! and compat for kernels before 5.12; `both_sets!`).
//!
//! Checksums: `main_table` has full checksums; `checksum_table` has the seeds
//! of CHECKSUM_PARTIAL packets (`Pkt::partial`) and full checksums that equal
//! the seed by chance (`Pkt::seed_collision`). Every expected frame is built
//! from scratch: a seed is the pseudo-header sum after the NAT, a full
//! checksum the real one.

use std::net::Ipv4Addr;

use lb_agent::datapath::programs::{self, ProgramSet};
use lb_agent::datapath::scratch::{Hook, ScratchDatapath};
use lb_agent::datapath::{Datapath, PortRange};
use lb_api::{Algorithm, Backend, BackendState, Protocol, ServiceAddr};
use rpclb_tests::packet::{
    self, ACK, FIN, PSH, Pkt, RST, SYN, TC_REDIRECT, Verdict as V, XDP_DROP, XDP_PASS,
    XDP_REDIRECT, assert_bytes_eq, service,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);

fn b(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 10 + i, 2)
}

/// Root, and for the full program set a kernel that has what it needs
/// (5.12+; older kernels run the compat set only, and the full set's tests
/// print SKIP there even under RPCLB_REQUIRE_PRIVILEGES).
fn can_run(set: ProgramSet) -> bool {
    if !lb_agent::datapath::scratch::require_root("packet tests") {
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

/// A test on each program set (lb-ebpf/src/set.rs): `$full` loads the full
/// set, `$compat` the compat set, which must give the same verdicts and bytes.
macro_rules! both_sets {
    ($full:ident, $compat:ident, $run:expr) => {
        #[test]
        fn $full() {
            if can_run(ProgramSet::Full) {
                ($run)(ProgramSet::Full);
            }
        }

        #[test]
        fn $compat() {
            if can_run(ProgramSet::Compat) {
                ($run)(ProgramSet::Compat);
            }
        }
    };
}

/// A loaded data path pinned in a private directory, unpinned on drop.
struct Harness(ScratchDatapath);

impl Harness {
    /// Loads program set `set` (never the other one: no fallback).
    fn new(fib: bool, set: ProgramSet) -> Harness {
        let mut h = Harness(
            ScratchDatapath::new(|c| {
                c.fib_redirect = fib;
                c.programs = set.into();
            })
            .expect("load data path"),
        );
        assert_eq!(h.dp().programs(), set, "the program set asked for");
        h
    }

    /// [`Harness::new`] (no fib redirect) with the source ports for
    /// colliding flows set to `ports` (`--collision-ports`).
    fn with_collision_ports(set: ProgramSet, ports: Option<PortRange>) -> Harness {
        let mut h = Harness(
            ScratchDatapath::new(|c| {
                c.fib_redirect = false;
                c.programs = set.into();
                c.collision_ports = ports;
            })
            .expect("load data path"),
        );
        assert_eq!(h.dp().programs(), set, "the program set asked for");
        h
    }

    fn dp(&mut self) -> &mut Datapath {
        self.0.dp()
    }

    fn run(&mut self, hook: Hook, input: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(hook, input)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN ({hook:?}, {} bytes): {e}", input.len()))
    }

    fn try_run(
        &mut self,
        hook: Hook,
        input: &[u8],
    ) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        self.0.run(hook, input)
    }

    fn reasons(&mut self) -> Vec<(&'static str, u64)> {
        self.dp().writer().reasons().unwrap()
    }
}

/// Destination address of a frame.
fn dst_of(frame: &[u8]) -> Ipv4Addr {
    packet::parse(frame).unwrap().ip.dst
}

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Pkt {
    Pkt::tcp()
        .ip(src, dst)
        .ports(sport, dport)
        .flags(flags)
        .seq(1000)
        .id(7)
}

/// The backend that Maglev (or source-hash) picks, predicted in userspace
/// from the table in the map and the same hash the kernel uses.
fn predict(
    h: &mut Harness,
    addr: &ServiceAddr,
    src: Ipv4Addr,
    sport: u16,
    source_hash: bool,
) -> (Ipv4Addr, u16) {
    let w = h.dp().writer();
    let t = w.service_table(addr).unwrap();
    let wire = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets());
    let hash = if source_hash {
        lb_common::src_hash(wire(src))
    } else {
        lb_common::flow_hash(
            wire(src),
            wire(lb_agent::datapath::reader::v4_only(addr.vip)),
            sport.to_be(),
            addr.port.to_be(),
            lb_agent::datapath::abi::proto_number(addr.protocol),
        )
    };
    let id = t[(hash % t.len() as u32) as usize];
    let bs = w.backend_stats(addr).unwrap();
    let b = bs
        .iter()
        .find(|b| b.id == id)
        .expect("table names a backend of the service");
    (lb_agent::datapath::reader::v4_only(b.ip), b.port)
}

/// The ICMP port unreachable a closed UDP port answers `query` with, built
/// here byte by byte: MACs swapped; IPv4 from the service to the client, TOS
/// 0xc0, id 0, no DF, TTL 64, protocol 1, total length 56; ICMP type 3 code 3,
/// then the query's IPv4 header and UDP header as they arrived.
fn port_unreachable(query: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&query[6..12]);
    f.extend_from_slice(&query[..6]);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0xc0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&query[30..34]); // from the service address
    ip.extend_from_slice(&query[26..30]); // to the client
    let c = packet::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&query[14..42]);
    let c = packet::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend(ip);
    f.extend(icmp);
    assert_eq!(f.len(), 70);
    f
}

struct Fixture {
    desc: &'static str,
    input: Vec<u8>,
    verdict: V,
    output: Vec<u8>,
}

fn check(h: &mut Harness, hook: Hook, f: &Fixture) {
    let (rc, out) = h.run(hook, &f.input);
    assert_eq!(rc, f.verdict.code(hook), "{hook:?}: {}: verdict", f.desc);
    if let Err(e) = packet::verify_checksums(&out) {
        panic!("{hook:?}: {}: bad checksum in output: {e}", f.desc);
    }
    eprintln!("{hook:?}: {}: ok", f.desc);
    assert_bytes_eq(&out, &f.output);
}

/// The main table: SYN, follow-up, reply, FIN, UDP, non-VIP, no backend.
fn main_table(hook: Hook, set: ProgramSet) {
    let mut h = Harness::new(false, set);
    let tcp_svc = service(
        "demo/rpc:grpc",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Maglev,
        &[(b(1), 8080), (b(2), 8080), (b(3), 8080)],
    );
    let udp_svc = service(
        "demo/dns:dns",
        UDP_VIP,
        53,
        Protocol::Udp,
        Algorithm::Maglev,
        &[(b(1), 5353), (b(2), 5353)],
    );
    let empty = service(
        "demo/empty:http",
        EMPTY_VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        &[],
    );
    let empty_udp = service(
        "demo/empty:dns",
        EMPTY_VIP,
        53,
        Protocol::Udp,
        Algorithm::Random,
        &[],
    );
    let w = h.dp().writer();
    w.upsert_service(&tcp_svc).unwrap();
    w.upsert_service(&udp_svc).unwrap();
    w.upsert_service(&empty).unwrap();
    w.upsert_service(&empty_udp).unwrap();
    let udp_query = Pkt::udp()
        .ip(CLIENT, EMPTY_VIP)
        .ports(41001, 53)
        .id(9)
        .payload(b"a DNS query longer than 28 bytes")
        .build();

    let (bk, bport) = predict(&mut h, &tcp_svc.addr(), CLIENT, 40000, false);
    let (uk, uport) = predict(&mut h, &udp_svc.addr(), CLIENT, 41000, false);
    let fixtures = vec![
        Fixture {
            desc: "SYN to VIP: DNAT to the Maglev-chosen backend",
            input: tcp(CLIENT, 40000, VIP, 80, SYN).build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 40000, bk, bport, SYN).build(),
        },
        Fixture {
            desc: "follow-up with payload: same backend",
            input: tcp(CLIENT, 40000, VIP, 80, ACK | PSH)
                .ack(5)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 40000, bk, bport, ACK | PSH)
                .ack(5)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .build(),
        },
        Fixture {
            desc: "backend reply: source back to VIP:port",
            input: tcp(bk, bport, CLIENT, 40000, ACK | PSH)
                .ack(1019)
                .payload(b"HTTP/1.1 200 OK\r\n\r\n")
                .build(),
            verdict: V::Pass,
            output: tcp(VIP, 80, CLIENT, 40000, ACK | PSH)
                .ack(1019)
                .payload(b"HTTP/1.1 200 OK\r\n\r\n")
                .build(),
        },
        Fixture {
            desc: "client FIN: still translated",
            input: tcp(CLIENT, 40000, VIP, 80, FIN | ACK).build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 40000, bk, bport, FIN | ACK).build(),
        },
        Fixture {
            desc: "UDP datagram to VIP: DNAT with UDP checksum",
            input: Pkt::udp()
                .ip(CLIENT, UDP_VIP)
                .ports(41000, 53)
                .payload(b"query")
                .build(),
            verdict: V::Pass,
            output: Pkt::udp()
                .ip(CLIENT, uk)
                .ports(41000, uport)
                .payload(b"query")
                .build(),
        },
        Fixture {
            desc: "UDP reply: source back to VIP",
            input: Pkt::udp()
                .ip(uk, CLIENT)
                .ports(uport, 41000)
                .payload(b"answer")
                .build(),
            verdict: V::Pass,
            output: Pkt::udp()
                .ip(UDP_VIP, CLIENT)
                .ports(53, 41000)
                .payload(b"answer")
                .build(),
        },
        Fixture {
            desc: "UDP without checksum (0) keeps 0",
            input: Pkt::udp()
                .ip(CLIENT, UDP_VIP)
                .ports(41000, 53)
                .payload(b"q2")
                .udp_no_csum()
                .build(),
            verdict: V::Pass,
            output: Pkt::udp()
                .ip(CLIENT, uk)
                .ports(41000, uport)
                .payload(b"q2")
                .udp_no_csum()
                .build(),
        },
        Fixture {
            desc: "traffic to a non-VIP: untouched",
            input: tcp(CLIENT, 40001, b(1), 8080, SYN).build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 40001, b(1), 8080, SYN).build(),
        },
        Fixture {
            desc: "VIP on another port: untouched",
            input: tcp(CLIENT, 40002, VIP, 81, SYN).build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 40002, VIP, 81, SYN).build(),
        },
        Fixture {
            desc: "SYN to a service with no backend: RST|ACK back to the client",
            input: tcp(CLIENT, 40003, EMPTY_VIP, 80, SYN)
                .tcp_options(&[2, 4, 5, 0xb4, 1, 1, 4, 2])
                .build(),
            verdict: V::Tx,
            output: Pkt::tcp()
                .eth([0x02, 0, 0, 0, 0, 0x02], [0x02, 0, 0, 0, 0, 0x01])
                .ip(EMPTY_VIP, CLIENT)
                .id(0)
                .ports(80, 40003)
                .flags(RST | ACK)
                .seq(0)
                .ack(1001)
                .window(0)
                .build(),
        },
        Fixture {
            desc: "UDP to a service with no backend: ICMP port unreachable back to the client",
            input: udp_query.clone(),
            verdict: V::Tx,
            output: port_unreachable(&udp_query),
        },
        Fixture {
            desc: "ACK to a service with no backend: dropped",
            input: tcp(CLIENT, 40004, EMPTY_VIP, 80, ACK).build(),
            verdict: V::Drop,
            output: tcp(CLIENT, 40004, EMPTY_VIP, 80, ACK).build(),
        },
    ];
    let before = h.reasons();
    for f in &fixtures {
        check(&mut h, hook, f);
    }
    let after = h.reasons();
    let delta = |n: &str| {
        after.iter().find(|r| r.0 == n).unwrap().1 - before.iter().find(|r| r.0 == n).unwrap().1
    };
    assert_eq!(delta("nat_forward"), 5, "forward NATs");
    assert_eq!(delta("nat_reverse"), 2, "reverse NATs");
    assert_eq!(delta("pass_no_service"), 2);
    assert_eq!(delta("tx_rst_no_backend"), 1);
    assert_eq!(delta("tx_icmp_no_backend"), 1);
    assert_eq!(delta("drop_no_backend"), 1);

    // Counters and conntrack saw it.
    let w = h.dp().writer();
    let st = w.service_stats(&tcp_svc.addr()).unwrap();
    assert_eq!((st.packets, st.new_flows), (4, 1), "service counters");
    let bs = w.backend_stats(&tcp_svc.addr()).unwrap();
    let chosen = bs.iter().find(|x| x.ip == bk).unwrap();
    assert_eq!(
        (chosen.packets, chosen.new_flows, chosen.active),
        (4, 1, 0),
        "FIN closed the flow"
    );
    let ct = w.conntrack().unwrap();
    let e = ct
        .iter()
        .find(|e| e.client == (CLIENT, 40000))
        .expect("flow in conntrack");
    assert_eq!((e.backend, e.state), ((bk, bport), "closing"));
    assert_eq!(w.service_stats(&empty.addr()).unwrap().drops, 2);
}

both_sets!(xdp_main_table, xdp_main_table_compat, |set| main_table(
    Hook::Xdp,
    set
));

both_sets!(tc_main_table, tc_main_table_compat, |set| main_table(
    Hook::Tc,
    set
));

/// The payload of a frame (after `seed_collision` chose its first two bytes).
fn payload_of(frame: &[u8]) -> Vec<u8> {
    let p = packet::parse(frame).unwrap();
    match (p.tcp(), p.udp()) {
        (Some(t), _) => t.payload.clone(),
        (_, Some(u)) => u.payload.clone(),
        _ => panic!("no L4 payload"),
    }
}

/// `out` with the L4 check field that keeps `input`'s residual (the sum of
/// pseudo-header and segment, 0xffff when correct): what an RFC 1624 update
/// of whatever the field held gives, the answer for a skb that says
/// CHECKSUM_NONE whatever the field holds.
fn same_residual(input: &[u8], out: Pkt) -> Vec<u8> {
    let r_in = packet::l4_residual(input).unwrap();
    let zero = out.clone().l4_csum(0).build();
    let r0 = packet::l4_residual(&zero).unwrap();
    // fold(r0 + x) == r_in  =>  x = r_in - r0 (one's complement).
    let x = packet::csum_add(r_in as u32, &(!r0).to_be_bytes()) as u16;
    let f = out.l4_csum(x).build();
    assert_eq!(packet::l4_residual(&f).unwrap(), r_in);
    f
}

/// What the L4 check field of a fixture's output must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sum {
    /// A correct full checksum.
    Full,
    /// The seed of a CHECKSUM_PARTIAL packet.
    Seed,
    /// Whatever keeps the input's residual (see `same_residual`).
    Kept,
}

/// Partial checksums (seeds) and full checksums that collide with the seed,
/// both directions, TCP and UDP, short and full-size segments.
///
/// XDP sees only bytes: it must update a seed as a seed (addresses only, no
/// complement, ports left out) and hand the packet to the stack, and take a
/// colliding full checksum for what it is. BPF_PROG_TEST_RUN gives TC a
/// CHECKSUM_NONE skb, so TC updates whatever the field holds as a full
/// checksum (the helpers follow the skb's state; the lab covers real
/// CHECKSUM_PARTIAL skbs in TC): a seed's "error" is kept, and a colliding
/// full checksum comes out correct, as from XDP.
fn checksum_table(hook: Hook, set: ProgramSet) {
    let mut h = Harness::new(false, set);
    let (bk, bport, uport) = (b(1), 8080, 5353);
    let w = h.dp().writer();
    w.upsert_service(&service(
        "demo/rpc:grpc",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Maglev,
        &[(bk, bport)],
    ))
    .unwrap();
    w.upsert_service(&service(
        "demo/dns:dns",
        UDP_VIP,
        53,
        Protocol::Udp,
        Algorithm::Maglev,
        &[(bk, uport)],
    ))
    .unwrap();

    let mss = [2, 4, 5, 0xb4, 4, 2, 1, 1];
    let big: Vec<u8> = (0..1448u32).map(|i| (i * 31 + 7) as u8).collect();
    let odd = b"GET /odd HTTP/1.1\r\n\r\n!";
    let fwd = |flags: u8, dst: Ipv4Addr, dport: u16| tcp(CLIENT, 40000, dst, dport, flags).ack(1);
    let rev =
        |flags: u8, src: Ipv4Addr, sport: u16| tcp(src, sport, CLIENT, 40000, flags).ack(1001);
    let udp = |src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16| {
        Pkt::udp().ip(src, dst).ports(sport, dport).id(9)
    };
    // (description, input, expected output without its check field, kind of check in it)
    let mut cases: Vec<(&str, Vec<u8>, Pkt, Sum)> = vec![
        (
            "partial SYN to the VIP: the seed follows the address, not the port",
            tcp(CLIENT, 40000, VIP, 80, SYN)
                .tcp_options(&mss)
                .partial()
                .build(),
            tcp(CLIENT, 40000, bk, bport, SYN).tcp_options(&mss),
            Sum::Seed,
        ),
        (
            "partial data, odd length",
            fwd(ACK | PSH, VIP, 80).payload(odd).partial().build(),
            fwd(ACK | PSH, bk, bport).payload(odd),
            Sum::Seed,
        ),
        (
            "partial full-size segment (1448 bytes)",
            fwd(ACK, VIP, 80).payload(&big).partial().build(),
            fwd(ACK, bk, bport).payload(&big),
            Sum::Seed,
        ),
        (
            "partial reply: SNAT back to the VIP",
            rev(ACK | PSH, bk, bport)
                .payload(b"HTTP/1.1 200 OK\r\n\r\n")
                .partial()
                .build(),
            rev(ACK | PSH, VIP, 80).payload(b"HTTP/1.1 200 OK\r\n\r\n"),
            Sum::Seed,
        ),
        (
            "partial full-size reply",
            rev(ACK, bk, bport).payload(&big[..1001]).partial().build(),
            rev(ACK, VIP, 80).payload(&big[..1001]),
            Sum::Seed,
        ),
        (
            "partial UDP datagram to the VIP",
            udp(CLIENT, 41000, UDP_VIP, 53)
                .payload(b"query")
                .partial()
                .build(),
            udp(CLIENT, 41000, bk, uport).payload(b"query"),
            Sum::Seed,
        ),
        (
            "partial UDP, same flow, odd length",
            udp(CLIENT, 41000, UDP_VIP, 53)
                .payload(b"query 2")
                .partial()
                .build(),
            udp(CLIENT, 41000, bk, uport).payload(b"query 2"),
            Sum::Seed,
        ),
        (
            "partial UDP reply",
            udp(bk, uport, CLIENT, 41000)
                .payload(b"answer")
                .partial()
                .build(),
            udp(UDP_VIP, 53, CLIENT, 41000).payload(b"answer"),
            Sum::Seed,
        ),
    ];
    // Full checksums equal to the seed: verified, and updated as full ones.
    for (desc, input) in [
        (
            "full checksum equal to the seed: data",
            fwd(ACK | PSH, VIP, 80)
                .payload(b"collide")
                .seed_collision()
                .build(),
        ),
        (
            "full checksum equal to the seed: full-size segment",
            fwd(ACK, VIP, 80).payload(&big).seed_collision().build(),
        ),
        (
            "full checksum equal to the seed: reply",
            rev(ACK, bk, bport)
                .payload(&big[..777])
                .seed_collision()
                .build(),
        ),
        (
            "full checksum equal to the seed: UDP",
            udp(CLIENT, 41000, UDP_VIP, 53)
                .payload(b"collide!")
                .seed_collision()
                .build(),
        ),
        (
            "full checksum equal to the seed: UDP reply",
            udp(bk, uport, CLIENT, 41000)
                .payload(b"collide!!")
                .seed_collision()
                .build(),
        ),
    ] {
        packet::verify_checksums(&input).unwrap();
        packet::verify_seed(&input).unwrap();
        let p = packet::parse(&input).unwrap();
        let body = payload_of(&input);
        let out = match (p.tcp(), p.ip.src == CLIENT) {
            (Some(t), true) => fwd(t.flags, bk, bport).payload(&body),
            (Some(t), false) => rev(t.flags, VIP, 80).payload(&body),
            (None, true) => udp(CLIENT, 41000, bk, uport).payload(&body),
            (None, false) => udp(UDP_VIP, 53, CLIENT, 41000).payload(&body),
        };
        cases.push((desc, input, out, Sum::Full));
    }

    let before = h.reasons();
    let mut seeds = 0;
    for (desc, input, out, sum) in cases {
        let sum = if hook == Hook::Tc && sum == Sum::Seed {
            Sum::Kept
        } else {
            sum
        };
        let want = match sum {
            Sum::Full => out.build(),
            Sum::Seed => out.partial().build(),
            Sum::Kept => same_residual(&input, out),
        };
        seeds += (sum == Sum::Seed) as u64;
        let (rc, got) = h.run(hook, &input);
        assert_eq!(rc, V::Pass.code(hook), "{hook:?}: {desc}: verdict");
        let ok = match sum {
            Sum::Full => packet::verify_checksums(&got),
            Sum::Seed => packet::verify_seed(&got),
            Sum::Kept => Ok(()),
        };
        if let Err(e) = ok {
            panic!("{hook:?}: {desc}: output checksum ({sum:?}): {e}");
        }
        eprintln!("{hook:?}: {desc}: ok");
        assert_bytes_eq(&got, &want);
    }
    let after = h.reasons();
    let delta = |n: &str| {
        after.iter().find(|r| r.0 == n).unwrap().1 - before.iter().find(|r| r.0 == n).unwrap().1
    };
    assert_eq!(
        delta("pass_csum_partial"),
        seeds,
        "{hook:?}: seeds handed to the stack"
    );
    assert_eq!(delta("pass_csum_unverified"), 0);
    assert_eq!(delta("nat_forward") + delta("nat_reverse"), 13);
}

both_sets!(xdp_checksum_table, xdp_checksum_table_compat, |set| {
    checksum_table(Hook::Xdp, set)
});

both_sets!(
    xdp_checksum_lengths,
    xdp_checksum_lengths_compat,
    xdp_checksum_lengths_on
);

/// Every segment length around the verification's steps (4-byte words,
/// 512-byte chunks, odd tails), up to what a test run takes: a seed stays a
/// seed, a colliding full checksum stays full.
fn xdp_checksum_lengths_on(set: ProgramSet) {
    let mut h = Harness::new(false, set);
    h.dp()
        .writer()
        .upsert_service(&service(
            "demo/rpc:grpc",
            VIP,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(b(1), 8080)],
        ))
        .unwrap();
    let lens = (2..=40)
        .chain(500..=530)
        .chain(1010..=1040)
        .chain([1448, 1535, 1536, 1537, 2047, 2048, 2049, 3000]);
    let mut n = 0;
    for len in lens {
        let body: Vec<u8> = (0..len).map(|i| (i * 13 + len) as u8).collect();
        let pkt = |dst: Ipv4Addr, dport: u16| tcp(CLIENT, 40000, dst, dport, ACK).ack(1);
        let seed = pkt(VIP, 80).payload(&body).partial().build();
        let (_, out) = h.run(Hook::Xdp, &seed);
        assert_bytes_eq(&out, &pkt(b(1), 8080).payload(&body).partial().build());
        let full = pkt(VIP, 80).payload(&body).seed_collision().build();
        let (_, out) = h.run(Hook::Xdp, &full);
        let want = pkt(b(1), 8080).payload(&payload_of(&full)).build();
        if out != want {
            panic!(
                "payload {len}: colliding full checksum: {}",
                packet::bytes_diff(&out, &want)
            );
        }
        n += 1;
    }
    let r: std::collections::BTreeMap<_, _> = h.reasons().into_iter().collect();
    assert_eq!(r["pass_csum_partial"], n, "one per seed");
    assert_eq!(r["pass_csum_unverified"], 0);
}

both_sets!(tc_checksum_table, tc_checksum_table_compat, |set| {
    checksum_table(Hook::Tc, set)
});

/// Runs one fragment, checks verdict, exact bytes and that exactly `reason`
/// moved, by one.
fn frag_step(h: &mut Harness, hook: Hook, desc: &str, input: &[u8], want: &[u8], reason: &str) {
    frag_step_reasons(h, hook, desc, input, want, &[reason]);
}

/// [`frag_step`] where exactly `reasons` (in `reason::NAMES` order) moved.
fn frag_step_reasons(
    h: &mut Harness,
    hook: Hook,
    desc: &str,
    input: &[u8],
    want: &[u8],
    reasons: &[&str],
) {
    let before = h.reasons();
    let (rc, out) = h.run(hook, input);
    let after = h.reasons();
    assert_eq!(rc, V::Pass.code(hook), "{hook:?}: {desc}: verdict");
    eprintln!("{hook:?}: {desc}");
    assert_bytes_eq(&out, want);
    packet::verify_checksums(&out).unwrap();
    let moved: Vec<_> = after
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    let want: Vec<_> = reasons.iter().map(|r| (*r, 1)).collect();
    assert_eq!(moved, want, "{hook:?}: {desc}: counters");
}

/// The fragment tests, each checked on its own (`fragments`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FragCase {
    /// The first fragment is balanced and translated.
    First,
    /// Later fragments follow it.
    Later,
    /// Later fragments without an entry pass untouched.
    Unknown,
    /// The fragmented reply is translated back.
    Reply,
}

/// IPv4 fragments (issue 10): a 3,000-byte UDP datagram to the VIP, cut
/// for a 1,500 MTU as the kernel cuts it (`packet::fragment`). The first
/// fragment is balanced by its ports; the later ones (no UDP header) get
/// the same destination through the fragment map, the IP checksum only.
/// The expected frames are the fragments of the translated datagram built
/// from scratch: the first fragment's UDP checksum must be the one of the
/// whole translated datagram. The backend's 3,000-byte reply comes back the
/// same way, its source turned back into the VIP. A later fragment whose
/// first fragment was not seen passes untouched (`pass_fragment`).
fn fragments(hook: Hook, set: ProgramSet, case: FragCase) {
    let mut h = Harness::new(false, set);
    let udp_svc = service(
        "demo/dns:dns",
        UDP_VIP,
        53,
        Protocol::Udp,
        Algorithm::Maglev,
        &[(b(1), 5353), (b(2), 5353)],
    );
    h.dp().writer().upsert_service(&udp_svc).unwrap();
    let (uk, uport) = predict(&mut h, &udp_svc.addr(), CLIENT, 41000, false);
    let body: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 3) as u8).collect();
    let dgram = |src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, id: u16| {
        let whole = Pkt::udp()
            .ip(src, dst)
            .ports(sport, dport)
            .id(id)
            .df(false)
            .payload(&body)
            .build();
        packet::fragment(&whole, 1500)
    };
    let query = dgram(CLIENT, 41000, UDP_VIP, 53, 0x1234);
    let query_out = dgram(CLIENT, 41000, uk, uport, 0x1234);
    assert_eq!(query.len(), 3);

    if case == FragCase::Unknown {
        frag_step(
            &mut h,
            hook,
            "later fragment before the first: passes untouched",
            &query[1],
            &query[1],
            "pass_fragment",
        );
    }
    frag_step(
        &mut h,
        hook,
        "first fragment: balanced by its ports, DNAT, UDP checksum of the whole datagram",
        &query[0],
        &query_out[0],
        "nat_forward",
    );
    match case {
        FragCase::First => {}
        FragCase::Later => {
            for i in 1..3 {
                frag_step(
                    &mut h,
                    hook,
                    &format!("later fragment {i}: same backend, IP header only"),
                    &query[i],
                    &query_out[i],
                    "nat_fragment",
                );
            }
        }
        FragCase::Unknown => {
            // Another datagram of the same flow whose first fragment never came.
            let stray = dgram(CLIENT, 41000, UDP_VIP, 53, 0x1235);
            frag_step(
                &mut h,
                hook,
                "later fragment of another datagram (no entry): passes untouched",
                &stray[2],
                &stray[2],
                "pass_fragment",
            );
            // Not of a VIP flow.
            let other = dgram(CLIENT, 41000, b(1), 5353, 0x1234);
            frag_step(
                &mut h,
                hook,
                "later fragment to a non-VIP: passes untouched",
                &other[1],
                &other[1],
                "pass_fragment",
            );
        }
        FragCase::Reply => {
            // The reply, fragmented by the backend: source back to VIP:53.
            let reply = dgram(uk, uport, CLIENT, 41000, 0x4321);
            let reply_out = dgram(UDP_VIP, 53, CLIENT, 41000, 0x4321);
            // The flow's first reply: its reverse entry is written now
            // (the backend has one frontend).
            frag_step_reasons(
                &mut h,
                hook,
                "first reply fragment: SNAT back to the VIP",
                &reply[0],
                &reply_out[0],
                &["nat_reverse", "ct_reverse_lazy"],
            );
            for i in 1..3 {
                frag_step(
                    &mut h,
                    hook,
                    &format!("later reply fragment {i}: source back to the VIP"),
                    &reply[i],
                    &reply_out[i],
                    "nat_fragment",
                );
            }
        }
    }

    // One flow, and every translated fragment counted on it.
    let w = h.dp().writer();
    let st = w.service_stats(&udp_svc.addr()).unwrap();
    let packets = match case {
        FragCase::First | FragCase::Unknown => 1,
        FragCase::Later => 3,
        FragCase::Reply => 4,
    };
    assert_eq!((st.packets, st.new_flows), (packets, 1), "service counters");
    let ct = w.conntrack().unwrap();
    assert_eq!(ct.len(), 1, "one flow");
    assert_eq!(ct[0].backend, (uk, uport));
}

/// `fragments` for each case, hook and program set.
macro_rules! fragment_tests {
    ($($case:ident: $xdp:ident, $xdp_c:ident, $tc:ident, $tc_c:ident;)*) => {$(
        both_sets!($xdp, $xdp_c, |set| fragments(Hook::Xdp, set, FragCase::$case));
        both_sets!($tc, $tc_c, |set| fragments(Hook::Tc, set, FragCase::$case));
    )*};
}

fragment_tests! {
    First: xdp_first_fragment, xdp_first_fragment_compat,
        tc_first_fragment, tc_first_fragment_compat;
    Later: xdp_later_fragments, xdp_later_fragments_compat,
        tc_later_fragments, tc_later_fragments_compat;
    Unknown: xdp_later_fragment_without_entry, xdp_later_fragment_without_entry_compat,
        tc_later_fragment_without_entry, tc_later_fragment_without_entry_compat;
    Reply: xdp_reply_fragments, xdp_reply_fragments_compat,
        tc_reply_fragments, tc_reply_fragments_compat;
}

/// Terminating backends get no new flows but keep theirs; a backend-set
/// change leaves an established flow on its backend.
fn backend_changes(hook: Hook, set: ProgramSet) {
    let mut h = Harness::new(false, set);
    let mut svc = service(
        "demo/rpc:grpc",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Maglev,
        &[(b(1), 8080), (b(2), 8080)],
    );
    h.dp().writer().upsert_service(&svc).unwrap();
    // Find a client port whose flow lands on backend 1.
    let sport = (30000..31000)
        .find(|&p| predict(&mut h, &svc.addr(), CLIENT, p, false).0 == b(1))
        .unwrap();
    let syn = tcp(CLIENT, sport, VIP, 80, SYN).build();
    let (rc, out) = h.run(hook, &syn);
    assert_eq!(rc, V::Pass.code(hook));
    assert_bytes_eq(&out, &tcp(CLIENT, sport, b(1), 8080, SYN).build());

    // Backend 1 starts terminating.
    svc.backends[0].state = BackendState::Terminating;
    h.dp().writer().upsert_service(&svc).unwrap();
    let data = tcp(CLIENT, sport, VIP, 80, ACK)
        .payload(b"still here")
        .build();
    let (rc, out) = h.run(hook, &data);
    assert_eq!(rc, V::Pass.code(hook), "old flow kept");
    assert_bytes_eq(
        &out,
        &tcp(CLIENT, sport, b(1), 8080, ACK)
            .payload(b"still here")
            .build(),
    );
    for p in 31000..31200u16 {
        let (_, out) = h.run(hook, &tcp(CLIENT, p, VIP, 80, SYN).build());
        let dst = dst_of(&out);
        assert_eq!(dst, b(2), "new flow {p} avoided the terminating backend");
    }

    // Replace the whole backend set except the flow's backend.
    svc.backends = vec![
        Backend {
            state: BackendState::Terminating,
            ..Backend::new(b(1), 8080)
        },
        Backend::new(b(3), 8080),
        Backend::new(b(4), 8080),
    ];
    h.dp().writer().upsert_service(&svc).unwrap();
    let (rc, out) = h.run(hook, &data);
    assert_eq!(rc, V::Pass.code(hook));
    assert_bytes_eq(
        &out,
        &tcp(CLIENT, sport, b(1), 8080, ACK)
            .payload(b"still here")
            .build(),
    );
    // And even after the backend is removed entirely, conntrack holds the flow.
    svc.backends.remove(0);
    h.dp().writer().upsert_service(&svc).unwrap();
    let (_, out) = h.run(hook, &data);
    assert_bytes_eq(
        &out,
        &tcp(CLIENT, sport, b(1), 8080, ACK)
            .payload(b"still here")
            .build(),
    );
    // New flows only go to the new set.
    for p in 32000..32100u16 {
        let (_, out) = h.run(hook, &tcp(CLIENT, p, VIP, 80, SYN).build());
        let dst = dst_of(&out);
        assert!(dst == b(3) || dst == b(4), "new flow to {dst}");
    }
    // Weight 0 drains too.
    svc.backends[0].weight = 0;
    h.dp().writer().upsert_service(&svc).unwrap();
    for p in 33000..33050u16 {
        let (_, out) = h.run(hook, &tcp(CLIENT, p, VIP, 80, SYN).build());
        assert_eq!(dst_of(&out), b(4));
    }
}

both_sets!(xdp_backend_changes, xdp_backend_changes_compat, |set| {
    backend_changes(Hook::Xdp, set)
});

both_sets!(tc_backend_changes, tc_backend_changes_compat, |set| {
    backend_changes(Hook::Tc, set)
});

/// Sends `n` SYNs of distinct flows and counts the backends chosen.
fn spread(h: &mut Harness, hook: Hook, n: u32, distinct_clients: bool) -> Vec<(Ipv4Addr, u32)> {
    let mut counts: std::collections::BTreeMap<Ipv4Addr, u32> = Default::default();
    for i in 0..n {
        let (src, sport) = if distinct_clients {
            (
                Ipv4Addr::new(10, 244, 100 + (i / 250) as u8, 1 + (i % 250) as u8),
                40000,
            )
        } else {
            (CLIENT, 20000 + i as u16)
        };
        let (rc, out) = h.run(hook, &tcp(src, sport, VIP, 80, SYN).build());
        assert_eq!(rc, V::Pass.code(hook));
        *counts.entry(dst_of(&out)).or_default() += 1;
    }
    counts.into_iter().collect()
}

fn within(counts: &[(Ipv4Addr, u32)], weights: &[u32], tol: f64, what: &str) {
    let total: u32 = counts.iter().map(|c| c.1).sum();
    let wsum: u32 = weights.iter().sum();
    assert_eq!(
        counts.len(),
        weights.len(),
        "{what}: every backend used: {counts:?}"
    );
    for (i, &(ip, c)) in counts.iter().enumerate() {
        let want = total as f64 * weights[i] as f64 / wsum as f64;
        let dev = (c as f64 - want).abs() / want;
        assert!(
            dev <= tol,
            "{what}: {ip} got {c}, expected {want:.0} +/- {:.0}%: {counts:?}",
            tol * 100.0
        );
    }
    eprintln!("{what}: {counts:?}");
}

fn algorithms(hook: Hook, set: ProgramSet) {
    const N: u32 = 10_000;
    let backends = [(b(1), 8080), (b(2), 8080), (b(3), 8080)];
    for (algo, weights, tol, distinct) in [
        (Algorithm::Random, [1, 1, 1], 0.10, false),
        (Algorithm::Random, [1, 2, 1], 0.10, false),
        (Algorithm::RoundRobin, [1, 1, 1], 0.0003, false),
        (Algorithm::RoundRobin, [1, 2, 1], 0.0, false),
        (Algorithm::Maglev, [1, 1, 1], 0.10, false),
        (Algorithm::Maglev, [1, 2, 1], 0.10, false),
        (Algorithm::SourceHash, [1, 1, 1], 0.10, true),
        (Algorithm::LeastConn, [1, 1, 1], 0.02, false),
        (Algorithm::LeastConn, [1, 2, 1], 0.05, false),
    ] {
        let mut h = Harness::new(false, set);
        let mut svc = service("demo/spread:http", VIP, 80, Protocol::Tcp, algo, &backends);
        for (b, w) in svc.backends.iter_mut().zip(weights) {
            b.weight = w;
        }
        h.dp().writer().upsert_service(&svc).unwrap();
        let counts = spread(&mut h, hook, N, distinct);
        within(
            &counts,
            &weights,
            tol,
            &format!("{hook:?} {algo} weights {weights:?}"),
        );
        if algo == Algorithm::RoundRobin && weights == [1, 1, 1] {
            let (min, max) = (
                counts.iter().map(|c| c.1).min().unwrap(),
                counts.iter().map(|c| c.1).max().unwrap(),
            );
            assert!(max - min <= 1, "round-robin exactly even: {counts:?}");
        }
        if algo == Algorithm::LeastConn {
            // Every flow is still open: the active counts are the spread.
            let bs = h.dp().writer().backend_stats(&svc.addr()).unwrap();
            let total: u64 = bs.iter().map(|b| b.active).sum();
            assert_eq!(total, N as u64, "active counts: {bs:?}");
        }
        if algo == Algorithm::SourceHash {
            // The same client always lands on the same backend, as predicted.
            let src = Ipv4Addr::new(10, 244, 200, 7);
            let want = predict(&mut h, &svc.addr(), src, 0, true);
            for p in 0..50u16 {
                let (_, out) = h.run(hook, &tcp(src, 1000 + p, VIP, 80, SYN).build());
                assert_eq!(dst_of(&out), want.0);
            }
        }
    }
}

both_sets!(xdp_algorithm_spread, xdp_algorithm_spread_compat, |set| {
    algorithms(Hook::Xdp, set)
});

both_sets!(tc_algorithm_spread, tc_algorithm_spread_compat, |set| {
    algorithms(Hook::Tc, set)
});

both_sets!(
    least_conn_avoids_loaded_backend,
    least_conn_avoids_loaded_backend_compat,
    least_conn_avoids_loaded_backend_on
);

/// Least-conn: with one backend holding many open flows, new flows go to the others.
fn least_conn_avoids_loaded_backend_on(set: ProgramSet) {
    let mut h = Harness::new(false, set);
    let mut svc = service(
        "demo/lc:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::LeastConn,
        &[(b(1), 8080)],
    );
    h.dp().writer().upsert_service(&svc).unwrap();
    for p in 0..100u16 {
        h.run(Hook::Xdp, &tcp(CLIENT, 10000 + p, VIP, 80, SYN).build());
    }
    svc.backends.push(Backend::new(b(2), 8080));
    svc.backends.push(Backend::new(b(3), 8080));
    h.dp().writer().upsert_service(&svc).unwrap();
    let counts = spread(&mut h, Hook::Xdp, 100, false);
    let to_loaded = counts
        .iter()
        .find(|c| c.0 == b(1))
        .map(|c| c.1)
        .unwrap_or(0);
    assert_eq!(
        to_loaded, 0,
        "no new flow to the loaded backend: {counts:?}"
    );
}

both_sets!(affinity_sticks, affinity_sticks_compat, affinity_sticks_on);

/// Client-IP affinity: a client sticks to its backend under random selection.
fn affinity_sticks_on(set: ProgramSet) {
    let mut h = Harness::new(false, set);
    let mut svc = service(
        "demo/aff:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        &[(b(1), 8080), (b(2), 8080), (b(3), 8080)],
    );
    svc.affinity_timeout = Some(std::time::Duration::from_secs(600));
    h.dp().writer().upsert_service(&svc).unwrap();
    for c in 1..20u8 {
        let src = Ipv4Addr::new(10, 244, 50, c);
        let first = dst_of(&h.run(Hook::Xdp, &tcp(src, 5000, VIP, 80, SYN).build()).1);
        for p in 1..20u16 {
            let dst = dst_of(
                &h.run(Hook::Xdp, &tcp(src, 5000 + p, VIP, 80, SYN).build())
                    .1,
            );
            assert_eq!(dst, first, "client {src} stays on {first}");
        }
    }
}

fn reason_delta(h: &mut Harness, hook: Hook, input: &[u8], want: V, reason: &str) {
    let before = h.reasons();
    let (rc, out) = h.run(hook, input);
    let after = h.reasons();
    assert_eq!(
        rc,
        want.code(hook),
        "verdict for {reason}, len {}",
        input.len()
    );
    if want == V::Pass {
        assert_eq!(out, input, "passed packets are untouched");
    }
    let moved: Vec<_> = after
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    assert_eq!(moved, vec![(reason, 1)], "counter for len {}", input.len());
}

fn malformed(hook: Hook, set: ProgramSet) {
    let mut h = Harness::new(false, set);
    h.dp()
        .writer()
        .upsert_service(&service(
            "demo/rpc:grpc",
            VIP,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(b(1), 8080)],
        ))
        .unwrap();
    let full = tcp(CLIENT, 40000, VIP, 80, SYN)
        .payload(b"0123456789")
        .build();
    // The kernel's test-run refuses frames shorter than an Ethernet header, and
    // skb (TC) frames whose IPv4 header is cut; XDP covers those lengths.
    let first = if hook == Hook::Xdp { 14 } else { 34 };
    if hook == Hook::Tc {
        assert!(
            h.try_run(hook, &full[..33]).is_err(),
            "the kernel refuses a cut IPv4 header for skbs"
        );
    }
    for len in first..full.len() {
        let t = &full[..len];
        let r = if len < 34 {
            "drop_truncated_ip"
        } else {
            "drop_bad_total_len"
        };
        reason_delta(&mut h, hook, t, V::Drop, r);
    }
    let cases: Vec<(&str, Vec<u8>, V, &str)> = vec![
        (
            "IP options",
            tcp(CLIENT, 40000, VIP, 80, SYN)
                .ip_options(&[1, 1, 1, 0])
                .build(),
            V::Pass,
            "pass_ip_options",
        ),
        // A first fragment is balanced (`fragments`); a later one without
        // its first passes.
        (
            "fragment offset",
            tcp(CLIENT, 40000, VIP, 80, SYN).frag(64, false).build(),
            V::Pass,
            "pass_fragment",
        ),
        (
            "ihl 4",
            tcp(CLIENT, 40000, VIP, 80, SYN).ihl(4).build(),
            V::Drop,
            "drop_bad_ihl",
        ),
        (
            "ihl 0",
            tcp(CLIENT, 40000, VIP, 80, SYN).ihl(0).build(),
            V::Drop,
            "drop_bad_ihl",
        ),
        (
            "total length > frame",
            tcp(CLIENT, 40000, VIP, 80, SYN).tot_len(200).build(),
            V::Drop,
            "drop_bad_total_len",
        ),
        (
            "total length < header",
            tcp(CLIENT, 40000, VIP, 80, SYN).tot_len(10).build(),
            V::Drop,
            "drop_bad_total_len",
        ),
        (
            "TCP header cut by total length",
            tcp(CLIENT, 40000, VIP, 80, SYN).tot_len(30).build(),
            V::Drop,
            "drop_truncated_l4",
        ),
        (
            "UDP header cut",
            Pkt::udp()
                .ip(CLIENT, UDP_VIP)
                .ports(1, 53)
                .tot_len(24)
                .build(),
            V::Drop,
            "drop_truncated_l4",
        ),
        (
            "ICMP",
            Pkt::tcp().ip(CLIENT, VIP).ip_proto(1).build(),
            V::Pass,
            "pass_not_tcp_udp",
        ),
        (
            "ARP",
            Pkt::tcp().ethertype(0x0806).build(),
            V::Pass,
            "pass_not_ipv4",
        ),
    ];
    for (what, input, v, r) in cases {
        eprintln!("{hook:?}: malformed: {what}");
        reason_delta(&mut h, hook, &input, v, r);
    }
    // Nothing above created a flow.
    assert!(h.dp().writer().conntrack().unwrap().is_empty());
}

both_sets!(xdp_malformed, xdp_malformed_compat, |set| malformed(
    Hook::Xdp,
    set
));

both_sets!(tc_malformed, tc_malformed_compat, |set| malformed(
    Hook::Tc,
    set
));

both_sets!(
    xdp_fib_redirect_and_route_cache,
    xdp_fib_redirect_and_route_cache_compat,
    xdp_fib_redirect_and_route_cache_on
);

/// A namespace with forwarding on, a veth `d0` (02:00:00:00:0b:01) on
/// 10.244.11.1/24 and a permanent neighbour 10.244.11.2 (02:00:00:00:0b:02):
/// `bpf_fib_lookup` for a backend there succeeds with those MACs.
fn fib_ns() -> rpclb_tests::lab::Netns {
    let ns = rpclb_tests::lab::Netns::new("pktfib").unwrap();
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    for args in [
        vec![
            "link",
            "add",
            "d0",
            "address",
            "02:00:00:00:0b:01",
            "type",
            "veth",
            "peer",
            "name",
            "d1",
        ],
        vec!["link", "set", "d0", "up"],
        vec!["link", "set", "d1", "up"],
        vec!["addr", "add", "10.244.11.1/24", "dev", "d0"],
        vec![
            "neigh",
            "add",
            "10.244.11.2",
            "lladdr",
            "02:00:00:00:0b:02",
            "dev",
            "d0",
            "nud",
            "permanent",
        ],
    ] {
        ns.ip(&args).unwrap();
    }
    ns.exec("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
        .unwrap();
    ns
}

/// Forwarding with `bpf_fib_lookup` in a namespace with a route and a
/// neighbour: the verdict is a redirect, the MACs come from the neighbour
/// table, TTL drops by one, and the flow caches the route.
fn xdp_fib_redirect_and_route_cache_on(set: ProgramSet) {
    if !rpclb_tests::lab::require() {
        return;
    }
    let ns = fib_ns();
    ns.run(|| {
        let ifindex = rpclb_tests::lab::sys::ifindex("d0").unwrap();
        let mut h = Harness::new(true, set);
        // d0 takes XDP frames (as a physical NIC running native XDP would).
        h.dp()
            .writer()
            .set_xdp_iface(ifindex, lb_common::xdp_iface::REDIRECT_TARGET)
            .unwrap();
        let svc = service(
            "demo/rpc:grpc",
            VIP,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(b(1), 8080)],
        );
        h.dp().writer().upsert_service(&svc).unwrap();
        let routed = |flags: u8| {
            tcp(CLIENT, 40000, b(1), 8080, flags)
                .eth([0x02, 0, 0, 0, 0x0b, 0x01], [0x02, 0, 0, 0, 0x0b, 0x02])
                .ttl(63)
                .build()
        };
        let (rc, out) = h.run(Hook::Xdp, &tcp(CLIENT, 40000, VIP, 80, SYN).build());
        assert_eq!(rc, 4, "XDP_REDIRECT");
        assert_bytes_eq(&out, &routed(SYN));
        let (rc, out) = h.run(Hook::Xdp, &tcp(CLIENT, 40000, VIP, 80, ACK).build());
        assert_eq!(rc, 4);
        assert_bytes_eq(&out, &routed(ACK));
        let ct = h
            .dp()
            .writer()
            .conntrack_map()
            .get(
                &lb_common::FlowKey {
                    src_ip: u32::from_ne_bytes(CLIENT.octets()),
                    dst_ip: u32::from_ne_bytes(VIP.octets()),
                    src_port: 40000u16.to_be(),
                    dst_port: 80u16.to_be(),
                    proto: 6,
                    _pad: [0; 3],
                },
                0,
            )
            .unwrap();
        assert_eq!(ct.fib_ifindex, ifindex, "route cached");
        assert_eq!(ct.fib_mac, [2, 0, 0, 0, 0x0b, 2, 2, 0, 0, 0, 0x0b, 1]);
        // Served from the cache: same bytes.
        let (rc, out) = h.run(Hook::Xdp, &tcp(CLIENT, 40000, VIP, 80, ACK).build());
        assert_eq!(rc, 4);
        assert_bytes_eq(&out, &routed(ACK));
        // TTL 1 is left to the stack (ICMP time exceeded).
        let (rc, _) = h.run(Hook::Xdp, &tcp(CLIENT, 40000, VIP, 80, ACK).ttl(1).build());
        assert_eq!(rc, XDP_PASS);
        // A partial checksum is never redirected: an XDP frame has no checksum
        // state, so the seed would arrive as a (wrong) full checksum. The stack
        // gets it, translated, with the seed updated (no TTL or MAC change).
        let seed = |dst: Ipv4Addr, dport: u16| {
            tcp(CLIENT, 40000, dst, dport, ACK)
                .payload(b"seed")
                .partial()
                .build()
        };
        let (rc, out) = h.run(Hook::Xdp, &seed(VIP, 80));
        assert_eq!(rc, XDP_PASS, "a seed goes to the stack");
        assert_bytes_eq(&out, &seed(b(1), 8080));
        // A full checksum that equals the seed is still redirected.
        let input = tcp(CLIENT, 40000, VIP, 80, ACK)
            .payload(b"collide")
            .seed_collision()
            .build();
        let (rc, out) = h.run(Hook::Xdp, &input);
        assert_eq!(rc, 4, "a colliding full checksum is redirected");
        assert_bytes_eq(
            &out,
            &tcp(CLIENT, 40000, b(1), 8080, ACK)
                .eth([0x02, 0, 0, 0, 0x0b, 0x01], [0x02, 0, 0, 0, 0x0b, 0x02])
                .ttl(63)
                .payload(&payload_of(&input))
                .build(),
        );
    })
    .unwrap();
}

both_sets!(
    xdp_never_redirects_into_an_incapable_interface,
    xdp_never_redirects_into_an_incapable_interface_compat,
    xdp_never_redirects_into_an_incapable_interface_on
);

/// Native XDP redirects only into interfaces marked in `XDP_IFACES` (a veth
/// whose peer runs no XDP program drops redirected frames): an unmarked
/// route gets the translated packet through the stack, MACs and TTL
/// untouched (`pass_xdp_target`), from the route cache too; generic XDP on
/// the ingress may redirect anywhere; and a RST that could not leave the
/// ingress is not built (the SYN is dropped). TC is never restricted.
fn xdp_never_redirects_into_an_incapable_interface_on(set: ProgramSet) {
    use lb_common::xdp_iface::{GENERIC, REDIRECT_TARGET};
    if !rpclb_tests::lab::require() {
        return;
    }
    let ns = fib_ns();
    ns.run(|| {
        let d0 = rpclb_tests::lab::sys::ifindex("d0").unwrap();
        let lo = rpclb_tests::lab::sys::ifindex("lo").unwrap();
        let mut h = Harness::new(true, set);
        let svc = service(
            "demo/rpc:grpc",
            VIP,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(b(1), 8080)],
        );
        h.dp().writer().upsert_service(&svc).unwrap();
        let empty = service(
            "demo/none:grpc",
            EMPTY_VIP,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[],
        );
        h.dp().writer().upsert_service(&empty).unwrap();
        let translated = |flags: u8| tcp(CLIENT, 40000, b(1), 8080, flags).build();
        let routed = |flags: u8| {
            tcp(CLIENT, 40000, b(1), 8080, flags)
                .eth([0x02, 0, 0, 0, 0x0b, 0x01], [0x02, 0, 0, 0, 0x0b, 0x02])
                .ttl(63)
                .build()
        };
        let count = |h: &mut Harness| {
            h.reasons()
                .into_iter()
                .find(|(n, _)| *n == "pass_xdp_target")
                .map(|(_, v)| v)
                .unwrap()
        };
        h.dp().writer().set_xdp_iface(lo, 0).unwrap();
        // d0 unmarked: new flow and cached route both go to the stack.
        let (rc, out) = h.run(Hook::Xdp, &tcp(CLIENT, 40000, VIP, 80, SYN).build());
        assert_eq!(rc, XDP_PASS, "not redirected into an unmarked interface");
        assert_bytes_eq(&out, &translated(SYN));
        let (rc, out) = h.run(Hook::Xdp, &tcp(CLIENT, 40000, VIP, 80, ACK).build());
        assert_eq!(rc, XDP_PASS, "nor from the route cache");
        assert_bytes_eq(&out, &translated(ACK));
        assert_eq!(count(&mut h), 2);
        // TC redirects: an skb transmit, which every device takes.
        let (rc, out) = h.run(Hook::Tc, &tcp(CLIENT, 40000, VIP, 80, ACK).build());
        assert_eq!(rc, TC_REDIRECT);
        assert_bytes_eq(&out, &routed(ACK));
        // Generic XDP on the ingress (lo here) may redirect anywhere.
        h.dp().writer().set_xdp_iface(lo, GENERIC).unwrap();
        let (rc, out) = h.run(Hook::Xdp, &tcp(CLIENT, 40000, VIP, 80, ACK).build());
        assert_eq!(rc, XDP_REDIRECT);
        assert_bytes_eq(&out, &routed(ACK));
        // d0 marked: redirected.
        h.dp().writer().set_xdp_iface(lo, 0).unwrap();
        h.dp().writer().set_xdp_iface(d0, REDIRECT_TARGET).unwrap();
        let (rc, out) = h.run(Hook::Xdp, &tcp(CLIENT, 40000, VIP, 80, ACK).build());
        assert_eq!(rc, XDP_REDIRECT);
        assert_bytes_eq(&out, &routed(ACK));
        assert_eq!(count(&mut h), 2);
        // No backend: the RST would leave through lo, which is unmarked.
        let syn = tcp(CLIENT, 40001, EMPTY_VIP, 80, SYN).build();
        let (rc, _) = h.run(Hook::Xdp, &syn);
        assert_eq!(rc, XDP_DROP, "no RST into an unmarked ingress");
        let (rc, _) = h.run(Hook::Tc, &syn);
        assert_eq!(rc, TC_REDIRECT, "TC still answers with a RST");
        h.dp().writer().set_xdp_iface(lo, REDIRECT_TARGET).unwrap();
        let (rc, _) = h.run(Hook::Xdp, &syn);
        assert_eq!(rc, XDP_REDIRECT, "a marked ingress gets the RST");
    })
    .unwrap();
}

/// Runs the calling thread on `cpu` only, if that CPU exists.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Now on the clock of `bpf_ktime_get_ns` (CLOCK_MONOTONIC), in ns.
fn ktime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

both_sets!(
    counters_exact_across_cpus,
    counters_exact_across_cpus_compat,
    counters_exact_across_cpus_on
);

/// Counters stay exact when two CPUs run packets of one flow at once: the
/// shared per-backend entry takes atomic adds (a plain add there would lose
/// updates), the per-service entry is per-CPU and summed.
fn counters_exact_across_cpus_on(set: ProgramSet) {
    const N: u64 = 50_000;
    let mut h = Harness::new(false, set);
    let svc = service(
        "demo/cpus:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Maglev,
        &[(b(1), 8080)],
    );
    h.dp().writer().upsert_service(&svc).unwrap();
    let (v, _) = h.run(Hook::Xdp, &tcp(CLIENT, 41000, VIP, 80, SYN).build());
    assert_eq!(v, XDP_PASS, "new flow balanced, handed to the stack");
    let ack = tcp(CLIENT, 41000, VIP, 80, ACK).build();
    // A second instance of the programs on the same maps, one per thread.
    let mut twin =
        h.0.twin(|c| {
            c.fib_redirect = false;
            c.programs = set.into();
        })
        .unwrap();
    std::thread::scope(|s| {
        for (cpu, dp) in [h.0.dp(), &mut twin].into_iter().enumerate() {
            let ack = &ack;
            s.spawn(move || {
                pin_to_cpu(cpu);
                for _ in 0..N {
                    let (v, _) = lb_agent::datapath::scratch::test_run(dp, Hook::Xdp, ack).unwrap();
                    assert_eq!(v, XDP_PASS);
                }
            });
        }
    });
    let w = h.dp().writer();
    let st = w.service_stats(&svc.addr()).unwrap();
    let bs = w.backend_stats(&svc.addr()).unwrap();
    let want = 1 + 2 * N;
    assert_eq!((st.packets, st.new_flows), (want, 1), "service counters");
    assert_eq!(
        (bs[0].packets, bs[0].new_flows, bs[0].bytes),
        (want, 1, st.bytes),
        "backend counters"
    );
}

/// VIPs of services that share one backend (reverse-conntrack collisions).
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const VIP3: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const UDP_VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 54);

/// The port the kernel gives a flow whose backend-side tuple is taken: its
/// first candidate (`lb_common::collision_port`), when that one is free.
fn rewritten_port(r: PortRange, vip: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> u16 {
    let wire = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets());
    let h = lb_common::flow_hash(wire(CLIENT), wire(vip), sport.to_be(), dport.to_be(), proto);
    lb_common::collision_port(r.first.into(), r.count(), h, 0) as u16
}

/// Reason counters that moved between two snapshots.
fn reason_deltas(
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

/// One client ip:port through two VIPs to one backend (issue 10): the
/// second flow's backend-side tuple is the first one's, so its source port is
/// rewritten (to its first candidate of the default `--collision-ports`
/// range) and restored on replies; the first flow is untouched. TCP and UDP,
/// full checksums (and in XDP a CHECKSUM_PARTIAL seed, which a port rewrite
/// leaves alone).
fn collision_rewrite(hook: Hook, set: ProgramSet) {
    let r = PortRange::DEFAULT_COLLISION;
    let mut h = Harness::with_collision_ports(set, Some(r));
    let (bk, bport, uport) = (b(1), 8080, 5353);
    let svc = |name: &str, vip, port, proto, bp| {
        service(name, vip, port, proto, Algorithm::Maglev, &[(bk, bp)])
    };
    let w = h.dp().writer();
    w.upsert_service(&svc("demo/a:http", VIP, 80, Protocol::Tcp, bport))
        .unwrap();
    w.upsert_service(&svc("demo/b:http", VIP2, 80, Protocol::Tcp, bport))
        .unwrap();
    w.upsert_service(&svc("demo/a:dns", UDP_VIP, 53, Protocol::Udp, uport))
        .unwrap();
    w.upsert_service(&svc("demo/b:dns", UDP_VIP2, 53, Protocol::Udp, uport))
        .unwrap();
    let p = rewritten_port(r, VIP2, 40000, 80, 6);
    let up = rewritten_port(r, UDP_VIP2, 41000, 53, 17);
    assert_ne!(p, 40000);
    let udp = |src, sport, dst, dport, body: &[u8]| {
        Pkt::udp()
            .ip(src, dst)
            .ports(sport, dport)
            .id(9)
            .payload(body)
    };
    let mut fixtures = vec![
        Fixture {
            desc: "A: SYN to VIP1: its own port is free",
            input: tcp(CLIENT, 40000, VIP, 80, SYN).build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 40000, bk, bport, SYN).build(),
        },
        Fixture {
            desc: "B: SYN from the same ip:port to VIP2: source port rewritten",
            input: tcp(CLIENT, 40000, VIP2, 80, SYN)
                .tcp_options(&[2, 4, 5, 0xb4])
                .build(),
            verdict: V::Pass,
            output: tcp(CLIENT, p, bk, bport, SYN)
                .tcp_options(&[2, 4, 5, 0xb4])
                .build(),
        },
        Fixture {
            desc: "B: SYN|ACK from the backend to the rewritten port: VIP2 and the client's port restored",
            input: tcp(bk, bport, CLIENT, p, SYN | ACK).ack(1001).build(),
            verdict: V::Pass,
            output: tcp(VIP2, 80, CLIENT, 40000, SYN | ACK).ack(1001).build(),
        },
        Fixture {
            desc: "A: SYN|ACK to the client's own port: still A's, from VIP1",
            input: tcp(bk, bport, CLIENT, 40000, SYN | ACK).ack(1001).build(),
            verdict: V::Pass,
            output: tcp(VIP, 80, CLIENT, 40000, SYN | ACK).ack(1001).build(),
        },
        Fixture {
            desc: "B: data keeps the rewritten port",
            input: tcp(CLIENT, 40000, VIP2, 80, ACK | PSH)
                .ack(5)
                .payload(b"GET /b HTTP/1.1\r\n\r\n")
                .build(),
            verdict: V::Pass,
            output: tcp(CLIENT, p, bk, bport, ACK | PSH)
                .ack(5)
                .payload(b"GET /b HTTP/1.1\r\n\r\n")
                .build(),
        },
        Fixture {
            desc: "A: data keeps the client's port",
            input: tcp(CLIENT, 40000, VIP, 80, ACK | PSH)
                .ack(5)
                .payload(b"GET /a HTTP/1.1\r\n\r\n")
                .build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 40000, bk, bport, ACK | PSH)
                .ack(5)
                .payload(b"GET /a HTTP/1.1\r\n\r\n")
                .build(),
        },
        Fixture {
            desc: "B: reply with payload restored",
            input: tcp(bk, bport, CLIENT, p, ACK | PSH)
                .ack(1020)
                .payload(b"HTTP/1.1 200 OK\r\n\r\nb")
                .build(),
            verdict: V::Pass,
            output: tcp(VIP2, 80, CLIENT, 40000, ACK | PSH)
                .ack(1020)
                .payload(b"HTTP/1.1 200 OK\r\n\r\nb")
                .build(),
        },
        Fixture {
            desc: "UDP A: datagram to VIP1: own port",
            input: udp(CLIENT, 41000, UDP_VIP, 53, b"qa").build(),
            verdict: V::Pass,
            output: udp(CLIENT, 41000, bk, uport, b"qa").build(),
        },
        Fixture {
            desc: "UDP B: datagram to VIP2: port rewritten, UDP checksum fixed",
            input: udp(CLIENT, 41000, UDP_VIP2, 53, b"qb").build(),
            verdict: V::Pass,
            output: udp(CLIENT, up, bk, uport, b"qb").build(),
        },
        Fixture {
            desc: "UDP B: reply restored",
            input: udp(bk, uport, CLIENT, up, b"answer-b").build(),
            verdict: V::Pass,
            output: udp(UDP_VIP2, 53, CLIENT, 41000, b"answer-b").build(),
        },
        Fixture {
            desc: "UDP B without checksum: port rewritten, checksum stays 0",
            input: udp(CLIENT, 41000, UDP_VIP2, 53, b"q0")
                .udp_no_csum()
                .build(),
            verdict: V::Pass,
            output: udp(CLIENT, up, bk, uport, b"q0").udp_no_csum().build(),
        },
        Fixture {
            desc: "UDP A: reply to the client's own port: from VIP1",
            input: udp(bk, uport, CLIENT, 41000, b"answer-a").build(),
            verdict: V::Pass,
            output: udp(UDP_VIP, 53, CLIENT, 41000, b"answer-a").build(),
        },
    ];
    if hook == Hook::Xdp {
        // A seed covers addresses, not ports: only the address moves it.
        fixtures.push(Fixture {
            desc: "B: CHECKSUM_PARTIAL data: the seed follows the address, not the ports",
            input: tcp(CLIENT, 40000, VIP2, 80, ACK | PSH)
                .ack(5)
                .payload(b"partial")
                .partial()
                .build(),
            verdict: V::Pass,
            output: tcp(CLIENT, p, bk, bport, ACK | PSH)
                .ack(5)
                .payload(b"partial")
                .partial()
                .build(),
        });
        fixtures.push(Fixture {
            desc: "B: CHECKSUM_PARTIAL reply restored",
            input: tcp(bk, bport, CLIENT, p, ACK | PSH)
                .ack(1020)
                .payload(b"partial reply")
                .partial()
                .build(),
            verdict: V::Pass,
            output: tcp(VIP2, 80, CLIENT, 40000, ACK | PSH)
                .ack(1020)
                .payload(b"partial reply")
                .partial()
                .build(),
        });
    }
    let before = h.reasons();
    for f in &fixtures {
        let (rc, out) = h.run(hook, &f.input);
        assert_eq!(rc, f.verdict.code(hook), "{hook:?}: {}: verdict", f.desc);
        let sums = if f.desc.contains("PARTIAL") {
            packet::verify_seed(&out)
        } else {
            packet::verify_checksums(&out)
        };
        if let Err(e) = sums {
            panic!("{hook:?}: {}: bad checksum in output: {e}", f.desc);
        }
        eprintln!("{hook:?}: {}: ok", f.desc);
        assert_bytes_eq(&out, &f.output);
    }
    let delta = reason_deltas(&before, &h.reasons());
    assert_eq!(
        delta("ct_port_rewrite"),
        2,
        "one TCP, one UDP flow rewritten"
    );
    assert_eq!(delta("drop_ports_exhausted"), 0);
    assert_eq!(delta("drop_ct_insert"), 0);

    // Conntrack: four flows, two with the port the backend sees.
    let w = h.dp().writer();
    let ct = w.conntrack().unwrap();
    assert_eq!(ct.len(), 4, "{ct:?}");
    let seen = |vip: Ipv4Addr| ct.iter().find(|e| e.vip.0 == vip).unwrap().backend_sees;
    assert_eq!(seen(VIP), None);
    assert_eq!(seen(VIP2), Some(p));
    assert_eq!(seen(UDP_VIP), None);
    assert_eq!(seen(UDP_VIP2), Some(up));
}

both_sets!(xdp_collision_rewrite, xdp_collision_rewrite_compat, |set| {
    collision_rewrite(Hook::Xdp, set)
});

both_sets!(tc_collision_rewrite, tc_collision_rewrite_compat, |set| {
    collision_rewrite(Hook::Tc, set)
});

/// A one-port collision range: the second colliding flow finds no free
/// port; its SYN is dropped and counted, and the flows holding the tuple keep
/// working. A re-opened flow takes its own port again, and a reverse entry
/// whose flow is gone (evicted) is free to take.
fn collision_exhaustion(hook: Hook, set: ProgramSet) {
    let r = PortRange {
        first: 61000,
        last: 61000,
    };
    let mut h = Harness::with_collision_ports(set, Some(r));
    let (bk, bport) = (b(1), 8080);
    let w = h.dp().writer();
    for (name, vip) in [
        ("demo/a:http", VIP),
        ("demo/b:http", VIP2),
        ("demo/c:http", VIP3),
    ] {
        w.upsert_service(&service(
            name,
            vip,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(bk, bport)],
        ))
        .unwrap();
    }
    let c_syn = tcp(CLIENT, 40000, VIP3, 80, SYN).build();
    let steps = vec![
        Fixture {
            desc: "A: SYN to VIP1: own port",
            input: tcp(CLIENT, 40000, VIP, 80, SYN).build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 40000, bk, bport, SYN).build(),
        },
        Fixture {
            desc: "B: SYN to VIP2: the range's one port",
            input: tcp(CLIENT, 40000, VIP2, 80, SYN).build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 61000, bk, bport, SYN).build(),
        },
        Fixture {
            desc: "C: SYN to VIP3: no free port, dropped",
            input: c_syn.clone(),
            verdict: V::Drop,
            output: c_syn.clone(),
        },
        Fixture {
            desc: "A: reply still A's",
            input: tcp(bk, bport, CLIENT, 40000, SYN | ACK).ack(1001).build(),
            verdict: V::Pass,
            output: tcp(VIP, 80, CLIENT, 40000, SYN | ACK).ack(1001).build(),
        },
        Fixture {
            desc: "B: reply still B's",
            input: tcp(bk, bport, CLIENT, 61000, SYN | ACK).ack(1001).build(),
            verdict: V::Pass,
            output: tcp(VIP2, 80, CLIENT, 40000, SYN | ACK).ack(1001).build(),
        },
        Fixture {
            desc: "C: retransmitted SYN: dropped again",
            input: c_syn.clone(),
            verdict: V::Drop,
            output: c_syn.clone(),
        },
        Fixture {
            desc: "B: FIN closes it",
            input: tcp(CLIENT, 40000, VIP2, 80, FIN | ACK).build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 61000, bk, bport, FIN | ACK).build(),
        },
        Fixture {
            desc: "B: re-opened (SYN on the closed flow): takes its own port again",
            input: tcp(CLIENT, 40000, VIP2, 80, SYN).build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 61000, bk, bport, SYN).build(),
        },
    ];
    let before = h.reasons();
    for f in &steps {
        check(&mut h, hook, f);
    }
    let delta = reason_deltas(&before, &h.reasons());
    assert_eq!(delta("drop_ports_exhausted"), 2, "C's two SYNs");
    assert_eq!(delta("ct_port_rewrite"), 2, "B, and B re-opened");
    let w = h.dp().writer();
    let c_addr = ServiceAddr {
        vip: VIP3.into(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let st = w.service_stats(&c_addr).unwrap();
    assert_eq!((st.new_flows, st.drops), (0, 2), "C: no flow, two drops");
    assert_eq!(w.conntrack().unwrap().len(), 2, "A and B only");

    // A's forward entry evicted: its reverse entry is stale, and C may take
    // the client's own port.
    let a = lb_common::FlowKey {
        src_ip: u32::from_ne_bytes(CLIENT.octets()),
        dst_ip: u32::from_ne_bytes(VIP.octets()),
        src_port: 40000u16.to_be(),
        dst_port: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    w.conntrack_map().remove(&a).unwrap();
    check(
        &mut h,
        hook,
        &Fixture {
            desc: "C: SYN after A's flow is gone: own port",
            input: c_syn,
            verdict: V::Pass,
            output: tcp(CLIENT, 40000, bk, bport, SYN).build(),
        },
    );
    check(
        &mut h,
        hook,
        &Fixture {
            desc: "C: reply to the client's own port is now C's",
            input: tcp(bk, bport, CLIENT, 40000, SYN | ACK).ack(1001).build(),
            verdict: V::Pass,
            output: tcp(VIP3, 80, CLIENT, 40000, SYN | ACK).ack(1001).build(),
        },
    );

    // Port rewrites off: a colliding flow is dropped.
    let mut h = Harness::with_collision_ports(set, None);
    let w = h.dp().writer();
    for (name, vip) in [("demo/a:http", VIP), ("demo/b:http", VIP2)] {
        w.upsert_service(&service(
            name,
            vip,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(bk, bport)],
        ))
        .unwrap();
    }
    let b_syn = tcp(CLIENT, 40000, VIP2, 80, SYN).build();
    let before = h.reasons();
    for f in [
        Fixture {
            desc: "off: A's SYN",
            input: tcp(CLIENT, 40000, VIP, 80, SYN).build(),
            verdict: V::Pass,
            output: tcp(CLIENT, 40000, bk, bport, SYN).build(),
        },
        Fixture {
            desc: "off: B's colliding SYN dropped",
            input: b_syn.clone(),
            verdict: V::Drop,
            output: b_syn,
        },
    ] {
        check(&mut h, hook, &f);
    }
    let delta = reason_deltas(&before, &h.reasons());
    assert_eq!(
        (delta("drop_ports_exhausted"), delta("ct_port_rewrite")),
        (1, 0)
    );
}

both_sets!(
    xdp_collision_exhaustion,
    xdp_collision_exhaustion_compat,
    |set| collision_exhaustion(Hook::Xdp, set)
);

both_sets!(
    tc_collision_exhaustion,
    tc_collision_exhaustion_compat,
    |set| collision_exhaustion(Hook::Tc, set)
);

both_sets!(
    xdp_flow_cache_rules,
    xdp_flow_cache_rules_compat,
    xdp_flow_cache_rules_on
);

/// The conntrack key of client port `sport` to VIP:80 (TCP).
fn vip_key(sport: u16) -> lb_common::FlowKey {
    lb_common::FlowKey {
        src_ip: u32::from_ne_bytes(CLIENT.octets()),
        dst_ip: u32::from_ne_bytes(VIP.octets()),
        src_port: sport.to_be(),
        dst_port: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

/// The per-CPU flow cache (lb-ebpf/src/flowcache.rs; full program set
/// only) answers exactly as the full path would, and only while it may: a hit gives the same bytes and
/// counters (both directions); it is not used after the agent changes a map
/// (generation), nor once older than `FLOW_CACHE_NS`; TCP FIN and RST always
/// take the full path (the TCP state and the backend's active count move);
/// and a flow still in state SYN is not cached, so the ACK that establishes
/// it is seen. Cache hits are told apart from the full path by deleting the
/// conntrack entry behind the cache's back: the full path would then see a
/// new flow (`new_flows` grows), or, for a reply, no flow at all.
fn xdp_flow_cache_rules_on(set: ProgramSet) {
    use lb_common::{ct_state, xdp_iface::REDIRECT_TARGET};
    if !rpclb_tests::lab::require() {
        return;
    }
    // The compat set has no flow cache (lb-ebpf/src/set.rs); its packets
    // all take the full path, which the other tests check.
    if set == ProgramSet::Compat {
        eprintln!("SKIP: the compat program set has no flow cache");
        return;
    }
    let ns = fib_ns();
    // The client's side: c0 (02:00:00:00:01:01) on 10.244.1.1/24, the
    // client 10.244.1.2 a permanent neighbour (02:00:00:00:01:02).
    for args in [
        vec![
            "link",
            "add",
            "c0",
            "address",
            "02:00:00:00:01:01",
            "type",
            "veth",
            "peer",
            "name",
            "c1",
        ],
        vec!["link", "set", "c0", "up"],
        vec!["link", "set", "c1", "up"],
        vec!["addr", "add", "10.244.1.1/24", "dev", "c0"],
        vec![
            "neigh",
            "add",
            "10.244.1.2",
            "lladdr",
            "02:00:00:00:01:02",
            "dev",
            "c0",
            "nud",
            "permanent",
        ],
    ] {
        ns.ip(&args).unwrap();
    }
    ns.run(|| {
        // The cache is per CPU: every run on one CPU, so that a hit is not
        // missed because the thread moved (then the full path answers).
        pin_to_cpu(0);
        let d0 = rpclb_tests::lab::sys::ifindex("d0").unwrap();
        let c0 = rpclb_tests::lab::sys::ifindex("c0").unwrap();
        let svc = service(
            "demo/cache:http",
            VIP,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(b(1), 8080)],
        );
        let addr = svc.addr();
        let setup = || {
            let mut h = Harness::new(true, set);
            h.dp().writer().set_xdp_iface(d0, REDIRECT_TARGET).unwrap();
            h.dp().writer().set_xdp_iface(c0, REDIRECT_TARGET).unwrap();
            h.dp().writer().upsert_service(&svc).unwrap();
            h
        };
        let fwd = |sport: u16, flags: u8| {
            tcp(CLIENT, sport, VIP, 80, flags)
                .payload(b"cached?")
                .build()
        };
        let routed = |sport: u16, flags: u8| {
            tcp(CLIENT, sport, b(1), 8080, flags)
                .eth([0x02, 0, 0, 0, 0x0b, 0x01], [0x02, 0, 0, 0, 0x0b, 0x02])
                .ttl(63)
                .payload(b"cached?")
                .build()
        };
        let reply = |sport: u16| {
            tcp(b(1), 8080, CLIENT, sport, ACK)
                .payload(b"reply")
                .build()
        };
        let replied = |sport: u16| {
            tcp(VIP, 80, CLIENT, sport, ACK)
                .eth([0x02, 0, 0, 0, 0x01, 0x01], [0x02, 0, 0, 0, 0x01, 0x02])
                .ttl(63)
                .payload(b"reply")
                .build()
        };
        let new_flows = |h: &mut Harness| h.dp().writer().service_stats(&addr).unwrap().new_flows;
        let reason = |h: &mut Harness, name: &str| {
            h.reasons()
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v)
                .unwrap()
        };
        let send = |h: &mut Harness, frame: &[u8], want: &[u8]| {
            let (rc, out) = h.run(Hook::Xdp, frame);
            assert_eq!(rc, XDP_REDIRECT);
            assert_bytes_eq(&out, want);
        };
        let syn = |h: &mut Harness, sport: u16| {
            let routed = tcp(CLIENT, sport, b(1), 8080, SYN)
                .eth([0x02, 0, 0, 0, 0x0b, 0x01], [0x02, 0, 0, 0, 0x0b, 0x02])
                .ttl(63)
                .build();
            send(h, &tcp(CLIENT, sport, VIP, 80, SYN).build(), &routed);
        };

        let rev = lb_common::FlowKey {
            src_ip: u32::from_ne_bytes(b(1).octets()),
            dst_ip: u32::from_ne_bytes(CLIENT.octets()),
            src_port: 8080u16.to_be(),
            dst_port: 40000u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        // The age of a flow's cache entries: they are used for FLOW_CACHE_NS
        // after the route lookup of the flow's forward entry (`fib_ns`, on
        // the programs' clock), the reverse entry's being later.
        let age = |h: &mut Harness, sport: u16| {
            let ct = h
                .dp()
                .writer()
                .conntrack_map()
                .get(&vip_key(sport), 0)
                .unwrap();
            move || ktime_ns() - ct.fib_ns
        };
        // Flow 1: SYN, then ACKs (the first establishes the flow and fills
        // the cache), replies likewise. Then hits: with both conntrack
        // entries gone, the cache still translates, but only within
        // FLOW_CACHE_NS of the lookup. A loaded machine (qemu TCG at idle
        // priority) can take longer; then the full path answered the same
        // bytes, and the flow is tried again on fresh maps.
        let mut tries = 0;
        let mut h = loop {
            tries += 1;
            let mut h = setup();
            syn(&mut h, 40000);
            for _ in 0..3 {
                send(&mut h, &fwd(40000, ACK), &routed(40000, ACK));
                send(&mut h, &reply(40000), &replied(40000));
            }
            let took = age(&mut h, 40000);
            h.dp()
                .writer()
                .conntrack_map()
                .remove(&vip_key(40000))
                .unwrap();
            h.dp().writer().conntrack_map().remove(&rev).unwrap();
            send(&mut h, &fwd(40000, ACK), &routed(40000, ACK));
            send(&mut h, &reply(40000), &replied(40000));
            let took = took();
            if took < lb_common::FLOW_CACHE_NS {
                break h;
            }
            eprintln!("try {tries}: the hits came {took} ns after the lookup, past FLOW_CACHE_NS");
            assert!(tries < 8, "{tries} tries, each past FLOW_CACHE_NS");
        };
        assert_eq!(new_flows(&mut h), 1, "served from the cache");
        assert_eq!(reason(&mut h, "nat_forward"), 5);
        assert_eq!(reason(&mut h, "nat_reverse"), 4);
        // Hits count in their cache entry (no shared atomic add per packet);
        // the readers add what is pending, so the totals stay exact.
        let bytes = tcp(CLIENT, 40000, VIP, 80, SYN).build().len()
            + 4 * fwd(40000, ACK).len()
            + 4 * reply(40000).len();
        let pending = |h: &mut Harness| {
            let id = h.dp().writer().backend_stats(&addr).unwrap()[0].id;
            let p = h.dp().writer().pending_counts().unwrap();
            p.backend.get(&id).copied().unwrap_or_default()
        };
        let st = h.dp().writer().service_stats(&addr).unwrap();
        let bs = h.dp().writer().backend_stats(&addr).unwrap();
        assert_eq!((st.packets, st.bytes), (9, bytes as u64));
        assert_eq!((bs[0].packets, bs[0].bytes), (9, bytes as u64));
        assert_eq!(reason(&mut h, "fwd_redirect"), 9);
        assert_eq!(
            pending(&mut h),
            (6, 3 * (fwd(40000, ACK).len() + reply(40000).len()) as u64),
            "six hits wait in the cache"
        );

        // Generation: after a map change by the agent, the full path again.
        h.dp().writer().invalidate_flow_cache().unwrap();
        let (rc, out) = h.run(Hook::Xdp, &reply(40000));
        assert_eq!(rc, XDP_PASS, "no reverse entry: not translated");
        assert_bytes_eq(&out, &reply(40000));
        send(&mut h, &fwd(40000, ACK), &routed(40000, ACK));
        assert_eq!(new_flows(&mut h), 2, "the full path saw no flow");
        // ... also for a change of XDP_IFACES: d0 cannot take frames now.
        send(&mut h, &fwd(40000, ACK), &routed(40000, ACK));
        // That packet (the new flow's first known one) refilled the forward
        // slot: its three hits went to the maps; the reverse slot's three
        // still wait. The totals: two packets more.
        assert_eq!(
            pending(&mut h),
            (3, 3 * reply(40000).len() as u64),
            "the refill flushed the forward hits"
        );
        let bs = h.dp().writer().backend_stats(&addr).unwrap();
        assert_eq!(
            (bs[0].packets, bs[0].bytes),
            (11, (bytes + 2 * fwd(40000, ACK).len()) as u64)
        );
        h.dp().writer().set_xdp_iface(d0, 0).unwrap();
        let (rc, _) = h.run(Hook::Xdp, &fwd(40000, ACK));
        assert_eq!(rc, XDP_PASS, "not redirected from a stale cache");
        h.dp().writer().set_xdp_iface(d0, REDIRECT_TARGET).unwrap();

        // FIN and RST take the full path: the flow closes once.
        send(&mut h, &fwd(40000, ACK), &routed(40000, ACK));
        send(&mut h, &fwd(40000, ACK), &routed(40000, ACK));
        let active = |h: &mut Harness| h.dp().writer().backend_stats(&addr).unwrap()[0].active;
        let open = active(&mut h);
        send(&mut h, &fwd(40000, FIN | ACK), &routed(40000, FIN | ACK));
        let ct = h
            .dp()
            .writer()
            .conntrack_map()
            .get(&vip_key(40000), 0)
            .unwrap();
        assert_eq!(ct.state, ct_state::CLOSING, "FIN seen");
        assert_eq!(active(&mut h), open - 1, "closed");

        // A flow still in state SYN is not cached: the client's first ACK
        // (after a packet without one) establishes it.
        syn(&mut h, 40001);
        send(&mut h, &fwd(40001, PSH), &routed(40001, PSH));
        send(&mut h, &fwd(40001, ACK), &routed(40001, ACK));
        let ct = h
            .dp()
            .writer()
            .conntrack_map()
            .get(&vip_key(40001), 0)
            .unwrap();
        assert_eq!(ct.state, ct_state::ESTABLISHED, "the ACK was seen");
        let rst = tcp(CLIENT, 40001, VIP, 80, RST).build();
        let (rc, _) = h.run(Hook::Xdp, &rst);
        assert_eq!(rc, XDP_REDIRECT);
        let ct = h
            .dp()
            .writer()
            .conntrack_map()
            .get(&vip_key(40001), 0)
            .unwrap();
        assert_eq!(ct.state, ct_state::CLOSING, "RST seen");

        // Age: an entry is used for at most FLOW_CACHE_NS (a new flow for
        // each try that a loaded machine made slower than that).
        for (tries, sport) in (40002..40010).enumerate() {
            let before = new_flows(&mut h);
            syn(&mut h, sport);
            send(&mut h, &fwd(sport, ACK), &routed(sport, ACK));
            let took = age(&mut h, sport);
            h.dp()
                .writer()
                .conntrack_map()
                .remove(&vip_key(sport))
                .unwrap();
            send(&mut h, &fwd(sport, ACK), &routed(sport, ACK));
            let took = took();
            if took >= lb_common::FLOW_CACHE_NS {
                eprintln!("age, try {}: {took} ns after the lookup", tries + 1);
                assert!(tries < 7, "eight tries, each past FLOW_CACHE_NS");
                continue;
            }
            assert_eq!(new_flows(&mut h), before + 1, "still cached");
            std::thread::sleep(std::time::Duration::from_nanos(
                lb_common::FLOW_CACHE_NS + 100_000_000,
            ));
            send(&mut h, &fwd(sport, ACK), &routed(sport, ACK));
            assert_eq!(
                new_flows(&mut h),
                before + 2,
                "expired: the full path again"
            );
            break;
        }
    })
    .unwrap();
}

both_sets!(
    xdp_failed_route_lookup_cached,
    xdp_failed_route_lookup_cached_compat,
    xdp_failed_route_lookup_cached_on
);

/// A flow whose backend has no route: the failed `bpf_fib_lookup` is
/// remembered for `FIB_FAIL_NS` (`pass_fib_cached`) in the conntrack entry
/// and for the destination (`ROUTE_CACHE`), not repeated on every packet nor
/// by the next new flow to that backend, and tried again after that.
fn xdp_failed_route_lookup_cached_on(set: ProgramSet) {
    if !rpclb_tests::lab::require() {
        return;
    }
    let ns = fib_ns();
    ns.run(|| {
        // The destination's cache is per CPU: every run on one CPU.
        pin_to_cpu(0);
        let mut h = Harness::new(true, set);
        // 10.244.99.2: no route in this namespace.
        let nowhere = Ipv4Addr::new(10, 244, 99, 2);
        let svc = service(
            "demo/noroute:http",
            VIP,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(nowhere, 8080)],
        );
        h.dp().writer().upsert_service(&svc).unwrap();
        let count = |h: &mut Harness, name: &str| {
            h.reasons()
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v)
                .unwrap()
        };
        let run = |h: &mut Harness, sport: u16, flags: u8| {
            let (rc, out) = h.run(Hook::Xdp, &tcp(CLIENT, sport, VIP, 80, flags).build());
            assert_eq!(rc, XDP_PASS, "to the stack, translated");
            assert_bytes_eq(&out, &tcp(CLIENT, sport, nowhere, 8080, flags).build());
        };
        // The SYN looks up, and its failure is kept; the next packets come
        // within FIB_FAIL_NS of it (the lookup's time, `fib_ns`, on the
        // programs' clock), with no counter read between them (a read is
        // slow under qemu: it sums the flow cache).
        run(&mut h, 40000, SYN);
        let looked_up = h
            .dp()
            .writer()
            .conntrack_map()
            .get(&vip_key(40000), 0)
            .unwrap()
            .fib_ns;
        run(&mut h, 40000, ACK);
        run(&mut h, 40000, ACK);
        // Another flow to the same backend: the destination's failure.
        run(&mut h, 40001, SYN);
        let took = ktime_ns() - looked_up;
        let got = (count(&mut h, "pass_fib"), count(&mut h, "pass_fib_cached"));
        if took < lb_common::FIB_FAIL_NS {
            assert_eq!(got, (1, 3), "the SYN's lookup, then three cached failures");
        } else {
            // Only on a loaded machine (qemu TCG at idle priority): the runs
            // outlasted the window, so a later one may look up again.
            eprintln!("four runs took {took} ns, more than FIB_FAIL_NS: {got:?}");
            assert_eq!(
                got.0 + got.1,
                4,
                "every packet looked up or cached: {got:?}"
            );
        }
        std::thread::sleep(std::time::Duration::from_nanos(
            lb_common::FIB_FAIL_NS + 50_000_000,
        ));
        let before = count(&mut h, "pass_fib");
        run(&mut h, 40000, ACK);
        assert_eq!(count(&mut h, "pass_fib"), before + 1, "looked up again");
    })
    .unwrap();
}

both_sets!(
    xdp_route_kept_and_cached_per_destination,
    xdp_route_kept_and_cached_per_destination_compat,
    xdp_route_kept_and_cached_per_destination_on
);

/// A new flow's route: the SYN's `bpf_fib_lookup` result is kept in the
/// flow's forward entry (its next packet does not look it up again) and in
/// `ROUTE_CACHE` for the destination (a second flow to the backend within
/// `FIB_CACHE_NS` takes it); once older than `FIB_CACHE_NS`, new and old
/// flows look it up again. A lookup is told apart from a cached route by the
/// destination MAC: the neighbour's MAC changes after the first SYN, and
/// only a lookup sees the new one.
fn xdp_route_kept_and_cached_per_destination_on(set: ProgramSet) {
    if !rpclb_tests::lab::require() {
        return;
    }
    let ns = fib_ns();
    ns.run(|| {
        // The destination's cache is per CPU: every run on one CPU.
        pin_to_cpu(0);
        let ifindex = rpclb_tests::lab::sys::ifindex("d0").unwrap();
        let mut h = Harness::new(true, set);
        h.dp()
            .writer()
            .set_xdp_iface(ifindex, lb_common::xdp_iface::REDIRECT_TARGET)
            .unwrap();
        let svc = service(
            "demo/routes:http",
            VIP,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            &[(b(1), 8080)],
        );
        h.dp().writer().upsert_service(&svc).unwrap();
        const D0: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x01];
        const OLD: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x02];
        const NEW: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x03];
        let routed_to = |out: &[u8], sport: u16, flags: u8, mac: [u8; 6], what: &str| {
            assert_eq!(&out[..6], &mac[..], "{what}: destination MAC");
            let want = tcp(CLIENT, sport, b(1), 8080, flags)
                .eth(D0, mac)
                .ttl(63)
                .build();
            assert_bytes_eq(out, &want);
        };
        let send = |h: &mut Harness, sport: u16, flags: u8, mac: [u8; 6], what: &str| {
            let (rc, out) = h.run(Hook::Xdp, &tcp(CLIENT, sport, VIP, 80, flags).build());
            assert_eq!(rc, XDP_REDIRECT, "{what}");
            routed_to(&out, sport, flags, mac, what);
        };
        // A packet that must take a kept route (OLD) if it ran within
        // FIB_CACHE_NS of the SYN's lookup (`looked_up`: its `fib_ns`). A
        // loaded machine (qemu TCG, or the `ip` command below) can take
        // longer: then a lookup (NEW) is right too.
        let kept = |h: &mut Harness, looked_up: u64, sport: u16, flags: u8, what: &str| {
            let (rc, out) = h.run(Hook::Xdp, &tcp(CLIENT, sport, VIP, 80, flags).build());
            let took = ktime_ns() - looked_up;
            assert_eq!(rc, XDP_REDIRECT, "{what}");
            let mac = if took < lb_common::FIB_CACHE_NS {
                OLD
            } else {
                eprintln!("{what}: {took} ns after the lookup, past FIB_CACHE_NS");
                if out[..6] == NEW { NEW } else { OLD }
            };
            routed_to(&out, sport, flags, mac, what);
        };
        send(&mut h, 40000, SYN, OLD, "the first SYN looks up");
        let ct = h
            .dp()
            .writer()
            .conntrack_map()
            .get(
                &lb_common::FlowKey {
                    src_ip: u32::from_ne_bytes(CLIENT.octets()),
                    dst_ip: u32::from_ne_bytes(VIP.octets()),
                    src_port: 40000u16.to_be(),
                    dst_port: 80u16.to_be(),
                    proto: 6,
                    _pad: [0; 3],
                },
                0,
            )
            .unwrap();
        assert_eq!(
            ct.fib_ifindex, ifindex,
            "the SYN's route in the flow's entry"
        );
        assert_eq!(ct.fib_mac, [OLD, D0].concat()[..]);
        ns.ip(&[
            "neigh",
            "replace",
            "10.244.11.2",
            "lladdr",
            "02:00:00:00:0b:03",
            "dev",
            "d0",
            "nud",
            "permanent",
        ])
        .unwrap();
        let looked_up = ct.fib_ns;
        kept(
            &mut h,
            looked_up,
            40000,
            ACK,
            "the flow's next packet: the SYN's route",
        );
        kept(
            &mut h,
            looked_up,
            40001,
            SYN,
            "a second flow: the destination's route",
        );
        kept(
            &mut h,
            looked_up,
            40001,
            ACK,
            "the second flow's next packet",
        );
        std::thread::sleep(std::time::Duration::from_nanos(
            lb_common::FIB_CACHE_NS + 100_000_000,
        ));
        send(
            &mut h,
            40002,
            SYN,
            NEW,
            "a new flow after FIB_CACHE_NS: looked up",
        );
        send(
            &mut h,
            40000,
            ACK,
            NEW,
            "an old flow after FIB_CACHE_NS: refreshed",
        );
    })
    .unwrap();
}

/// A conntrack key from wire-order fields (addresses, ports host order).
fn ct_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> lb_common::FlowKey {
    lb_common::FlowKey {
        src_ip: u32::from_ne_bytes(src.octets()),
        dst_ip: u32::from_ne_bytes(dst.octets()),
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

fn ct_get(h: &mut Harness, k: &lb_common::FlowKey) -> Option<lb_common::CtValue> {
    h.dp().writer().conntrack_map().get(k, 0).ok()
}

fn ct_len(h: &mut Harness) -> usize {
    h.dp().writer().conntrack_map().keys().count()
}

/// Runs `input`, checks the verdict (pass: no fib redirect here), the exact
/// bytes, and the change of `ct_reverse_lazy`.
fn step(h: &mut Harness, hook: Hook, desc: &str, input: Vec<u8>, want: Vec<u8>, lazy: u64) {
    let before = h.reasons();
    let (rc, out) = h.run(hook, &input);
    let d = reason_deltas(&before, &h.reasons());
    assert_eq!(rc, V::Pass.code(hook), "{hook:?}: {desc}: verdict");
    eprintln!("{hook:?}: {desc}");
    assert_bytes_eq(&out, &want);
    packet::verify_checksums(&out).unwrap();
    assert_eq!(
        d("ct_reverse_lazy"),
        lazy,
        "{hook:?}: {desc}: ct_reverse_lazy"
    );
}

/// One conntrack insert per flow (issue 11): a new flow to a backend with
/// one frontend writes only its forward entry; its first reply (TCP SYN|ACK,
/// or a UDP reply) finds the flow through `FRONTENDS`, writes the reverse
/// entry and is translated exactly; later replies use it. A backend reached
/// through two frontends keeps the eager write (both entries at the SYN),
/// and gets the lazy one back when the second frontend goes. A stale
/// reverse entry (an older flow of the tuple, through a frontend the backend
/// no longer has) is not used for the new flow's first reply; a reply with
/// no flow passes untouched.
fn one_insert_per_flow(hook: Hook, set: ProgramSet) {
    use lb_common::{ct_dir, ct_state};
    const OLD_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 77);
    let mut h = Harness::new(false, set);
    let (b1, b2) = (b(1), b(2));
    let one = |name: &str, vip, port, proto, bk, bp| {
        service(name, vip, port, proto, Algorithm::Maglev, &[(bk, bp)])
    };
    let w = h.dp().writer();
    w.upsert_service(&one("demo/a:http", VIP, 80, Protocol::Tcp, b1, 8080))
        .unwrap();
    w.upsert_service(&one("demo/a:dns", UDP_VIP, 53, Protocol::Udp, b1, 5353))
        .unwrap();
    // b2:8080 behind two frontends.
    w.upsert_service(&one("demo/b:http", VIP2, 80, Protocol::Tcp, b2, 8080))
        .unwrap();
    w.upsert_service(&one("demo/c:http", OLD_VIP, 81, Protocol::Tcp, b2, 8080))
        .unwrap();
    let udp = |src, sport, dst, dport, body: &[u8]| {
        Pkt::udp()
            .ip(src, dst)
            .ports(sport, dport)
            .id(9)
            .payload(body)
    };

    // TCP, one frontend.
    let fwd = ct_key(CLIENT, 40000, VIP, 80, 6);
    let rev = ct_key(b1, 8080, CLIENT, 40000, 6);
    let n0 = ct_len(&mut h);
    step(
        &mut h,
        hook,
        "SYN to a one-frontend backend: DNAT",
        tcp(CLIENT, 40000, VIP, 80, SYN).build(),
        tcp(CLIENT, 40000, b1, 8080, SYN).build(),
        0,
    );
    assert_eq!(ct_len(&mut h), n0 + 1, "{hook:?}: the SYN writes one entry");
    let f = ct_get(&mut h, &fwd).expect("forward entry");
    assert_eq!((f.dir, f.state), (ct_dir::FORWARD, ct_state::SYN));
    assert!(
        ct_get(&mut h, &rev).is_none(),
        "{hook:?}: no reverse entry yet"
    );
    step(
        &mut h,
        hook,
        "first reply (SYN|ACK): reverse entry written, SNAT back to the VIP",
        tcp(b1, 8080, CLIENT, 40000, SYN | ACK).ack(1001).build(),
        tcp(VIP, 80, CLIENT, 40000, SYN | ACK).ack(1001).build(),
        1,
    );
    assert_eq!(
        ct_len(&mut h),
        n0 + 2,
        "{hook:?}: two entries after the reply"
    );
    let r = ct_get(&mut h, &rev).expect("reverse entry");
    assert_eq!(r.dir, ct_dir::REVERSE);
    assert_eq!(r.nat_ip, u32::from_ne_bytes(VIP.octets()));
    assert_eq!(r.nat_port, 80u16.to_be());
    assert_eq!((r.svc_id, r.backend_id), (f.svc_id, f.backend_id));
    assert_eq!(r.client_port, 0);
    assert_eq!(
        ct_get(&mut h, &fwd).unwrap().state,
        ct_state::ESTABLISHED,
        "{hook:?}: the SYN|ACK moves the flow on"
    );
    step(
        &mut h,
        hook,
        "client's ACK with data: DNAT",
        tcp(CLIENT, 40000, VIP, 80, ACK | PSH)
            .ack(5)
            .payload(b"GET / HTTP/1.1\r\n\r\n")
            .build(),
        tcp(CLIENT, 40000, b1, 8080, ACK | PSH)
            .ack(5)
            .payload(b"GET / HTTP/1.1\r\n\r\n")
            .build(),
        0,
    );
    step(
        &mut h,
        hook,
        "second reply: the reverse entry, nothing written",
        tcp(b1, 8080, CLIENT, 40000, ACK | PSH)
            .ack(1019)
            .payload(b"HTTP/1.1 200 OK\r\n\r\n")
            .build(),
        tcp(VIP, 80, CLIENT, 40000, ACK | PSH)
            .ack(1019)
            .payload(b"HTTP/1.1 200 OK\r\n\r\n")
            .build(),
        0,
    );
    assert_eq!(ct_len(&mut h), n0 + 2);

    // A reply of no flow: untouched.
    let before = h.reasons();
    let stray = tcp(b1, 8080, CLIENT, 40999, SYN | ACK).ack(1).build();
    let (rc, out) = h.run(hook, &stray);
    let d = reason_deltas(&before, &h.reasons());
    assert_eq!(rc, V::Pass.code(hook));
    assert_bytes_eq(&out, &stray);
    assert_eq!((d("pass_no_service"), d("ct_reverse_lazy")), (1, 0));
    assert!(ct_get(&mut h, &ct_key(b1, 8080, CLIENT, 40999, 6)).is_none());

    // Two frontends: both entries at the SYN, no lazy write at the reply.
    let n1 = ct_len(&mut h);
    step(
        &mut h,
        hook,
        "SYN to a backend of two frontends: both entries",
        tcp(CLIENT, 40001, VIP2, 80, SYN).build(),
        tcp(CLIENT, 40001, b2, 8080, SYN).build(),
        0,
    );
    assert_eq!(ct_len(&mut h), n1 + 2, "{hook:?}: the eager SYN writes two");
    assert!(ct_get(&mut h, &ct_key(b2, 8080, CLIENT, 40001, 6)).is_some());
    step(
        &mut h,
        hook,
        "its SYN|ACK: the reverse entry written at the SYN",
        tcp(b2, 8080, CLIENT, 40001, SYN | ACK).ack(1001).build(),
        tcp(VIP2, 80, CLIENT, 40001, SYN | ACK).ack(1001).build(),
        0,
    );

    // The second frontend goes: b2 is lazy again.
    h.dp()
        .writer()
        .remove_service(&ServiceAddr {
            vip: OLD_VIP.into(),
            port: 81,
            protocol: Protocol::Tcp,
        })
        .unwrap();
    let n2 = ct_len(&mut h);
    // A stale reverse entry for the next flow's tuple: an older flow of
    // CLIENT:40002 through the frontend just removed, its forward entry gone.
    let stale_rev = ct_key(b2, 8080, CLIENT, 40002, 6);
    let stale = lb_common::CtValue {
        nat_ip: u32::from_ne_bytes(OLD_VIP.octets()),
        nat_port: 81u16.to_be(),
        dir: ct_dir::REVERSE,
        svc_id: f.svc_id,
        backend_id: f.backend_id,
        ..Default::default()
    };
    h.dp()
        .writer()
        .conntrack_map()
        .insert(stale_rev, stale, 0)
        .unwrap();
    step(
        &mut h,
        hook,
        "SYN after the second frontend went: one entry",
        tcp(CLIENT, 40002, VIP2, 80, SYN).build(),
        tcp(CLIENT, 40002, b2, 8080, SYN).build(),
        0,
    );
    assert_eq!(
        ct_len(&mut h),
        n2 + 2,
        "{hook:?}: the stale entry and one new"
    );
    step(
        &mut h,
        hook,
        "first reply over a stale reverse entry: from VIP2, not the old frontend",
        tcp(b2, 8080, CLIENT, 40002, SYN | ACK).ack(1001).build(),
        tcp(VIP2, 80, CLIENT, 40002, SYN | ACK).ack(1001).build(),
        1,
    );
    let r = ct_get(&mut h, &stale_rev).unwrap();
    assert_eq!(
        (r.nat_ip, r.nat_port),
        (u32::from_ne_bytes(VIP2.octets()), 80u16.to_be()),
        "{hook:?}: the stale entry rewritten"
    );

    // UDP, one frontend.
    let n3 = ct_len(&mut h);
    step(
        &mut h,
        hook,
        "UDP: first datagram: DNAT, one entry",
        udp(CLIENT, 41000, UDP_VIP, 53, b"q").build(),
        udp(CLIENT, 41000, b1, 5353, b"q").build(),
        0,
    );
    assert_eq!(ct_len(&mut h), n3 + 1);
    step(
        &mut h,
        hook,
        "UDP: first reply: reverse entry written, SNAT back to the VIP",
        udp(b1, 5353, CLIENT, 41000, b"answer").build(),
        udp(UDP_VIP, 53, CLIENT, 41000, b"answer").build(),
        1,
    );
    assert_eq!(ct_len(&mut h), n3 + 2);
    step(
        &mut h,
        hook,
        "UDP: second reply, no checksum: the reverse entry",
        udp(b1, 5353, CLIENT, 41000, b"more").udp_no_csum().build(),
        udp(UDP_VIP, 53, CLIENT, 41000, b"more")
            .udp_no_csum()
            .build(),
        0,
    );
    // UDP over a stale reverse entry of another frontend.
    let stale_udp = ct_key(b1, 5353, CLIENT, 41001, 17);
    let stale = lb_common::CtValue {
        nat_ip: u32::from_ne_bytes(OLD_VIP.octets()),
        nat_port: 54u16.to_be(),
        dir: ct_dir::REVERSE,
        ..Default::default()
    };
    h.dp()
        .writer()
        .conntrack_map()
        .insert(stale_udp, stale, 0)
        .unwrap();
    step(
        &mut h,
        hook,
        "UDP: a new flow over a stale reverse entry",
        udp(CLIENT, 41001, UDP_VIP, 53, b"q").build(),
        udp(CLIENT, 41001, b1, 5353, b"q").build(),
        0,
    );
    step(
        &mut h,
        hook,
        "UDP: its first reply: from the VIP, not the stale entry's",
        udp(b1, 5353, CLIENT, 41001, b"answer").build(),
        udp(UDP_VIP, 53, CLIENT, 41001, b"answer").build(),
        1,
    );
}

both_sets!(
    xdp_one_insert_per_flow,
    xdp_one_insert_per_flow_compat,
    |set| one_insert_per_flow(Hook::Xdp, set)
);
both_sets!(
    tc_one_insert_per_flow,
    tc_one_insert_per_flow_compat,
    |set| one_insert_per_flow(Hook::Tc, set)
);
/// The slot a flow hashes to under `random` (and Maglev): its index in the
/// service's table and the table itself.
fn slot_of(h: &mut Harness, addr: &ServiceAddr, src: Ipv4Addr, sport: u16) -> (usize, Vec<u32>) {
    let t = h.dp().writer().service_table(addr).unwrap();
    let wire = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets());
    let hash = lb_common::flow_hash(
        wire(src),
        wire(lb_agent::datapath::reader::v4_only(addr.vip)),
        sport.to_be(),
        addr.port.to_be(),
        lb_agent::datapath::abi::proto_number(addr.protocol),
    );
    ((hash % t.len() as u32) as usize, t)
}

/// The address of backend id `id` of the service at `addr`.
fn ip_of(h: &mut Harness, addr: &ServiceAddr, id: u32) -> Ipv4Addr {
    let bs = h.dp().writer().backend_stats(addr).unwrap();
    let b = bs
        .iter()
        .find(|b| b.id == id)
        .expect("a backend of the service");
    lb_agent::datapath::reader::v4_only(b.ip)
}

/// The RST|ACK the data path answers a SYN (as `tcp(CLIENT, sport, vip, 80, SYN)`) with.
fn rst_for(vip: Ipv4Addr, sport: u16) -> Vec<u8> {
    Pkt::tcp()
        .eth([0x02, 0, 0, 0, 0, 0x02], [0x02, 0, 0, 0, 0, 0x01])
        .ip(vip, CLIENT)
        .id(0)
        .ports(80, sport)
        .flags(RST | ACK)
        .seq(0)
        .ack(1001)
        .window(0)
        .build()
}

/// QoS limits (docs/policies.md): a SYN whose slot names a backend at its
/// limit goes to the next slot's backend; with every backend at its limit,
/// a SYN gets the no-backend RST and a UDP datagram the ICMP port
/// unreachable, counted as `*_backends_full`; established flows go on; a
/// close frees a slot.
fn qos_limits(hook: Hook, set: ProgramSet) {
    let mut h = Harness::new(false, set);
    let mut svc = service(
        "demo/qos:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        &[(b(1), 8080), (b(2), 8080), (b(3), 8080)],
    );
    svc.max_per_backend = Some(2);
    let addr = svc.addr();
    h.dp().writer().upsert_service(&svc).unwrap();
    let before = h.reasons();

    // Two flows to the backend of slot 0: it is at its limit.
    let (_, table) = slot_of(&mut h, &addr, CLIENT, 0);
    let first = table[0];
    let first_ip = ip_of(&mut h, &addr, first);
    let ports: Vec<u16> = (30000..40000)
        .filter(|&p| slot_of(&mut h, &addr, CLIENT, p).0 == 0)
        .take(3)
        .collect();
    for &p in &ports[..2] {
        let (rc, out) = h.run(hook, &tcp(CLIENT, p, VIP, 80, SYN).build());
        assert_eq!(rc, V::Pass.code(hook));
        assert_bytes_eq(&out, &tcp(CLIENT, p, first_ip, 8080, SYN).build());
    }
    // A third flow of that slot: the next slot's backend, exact bytes.
    let next_ip = ip_of(&mut h, &addr, table[1 % table.len()]);
    assert_ne!(next_ip, first_ip);
    let (rc, out) = h.run(hook, &tcp(CLIENT, ports[2], VIP, 80, SYN).build());
    assert_eq!(rc, V::Pass.code(hook), "the full backend is skipped");
    assert_bytes_eq(&out, &tcp(CLIENT, ports[2], next_ip, 8080, SYN).build());

    // Fill the others: 3 more flows, none to the full backend.
    let mut to: std::collections::BTreeMap<Ipv4Addr, u32> = Default::default();
    for p in 41000..41003u16 {
        let (rc, out) = h.run(hook, &tcp(CLIENT, p, VIP, 80, SYN).build());
        assert_eq!(rc, V::Pass.code(hook), "room left for flow {p}");
        *to.entry(dst_of(&out)).or_default() += 1;
    }
    assert!(!to.contains_key(&first_ip), "{to:?}");
    let bs = h.dp().writer().backend_stats(&addr).unwrap();
    let held: Vec<(u64, Option<u32>)> = bs.iter().map(|b| (b.active, b.limit)).collect();
    assert_eq!(held, vec![(2, Some(2)); 3], "every backend at its limit");

    // All full: the no-backend answer, counted as full.
    let (rc, out) = h.run(hook, &tcp(CLIENT, 42000, VIP, 80, SYN).build());
    assert_eq!(rc, V::Tx.code(hook), "all full: RST");
    assert_bytes_eq(&out, &rst_for(VIP, 42000));
    // A packet of no known flow that is not a SYN: dropped.
    let (rc, _) = h.run(hook, &tcp(CLIENT, 42001, VIP, 80, ACK).build());
    assert_eq!(rc, V::Drop.code(hook));

    // Established flows go on.
    let (rc, out) = h.run(
        hook,
        &tcp(CLIENT, ports[0], VIP, 80, ACK | PSH)
            .payload(b"x")
            .build(),
    );
    assert_eq!(rc, V::Pass.code(hook));
    assert_bytes_eq(
        &out,
        &tcp(CLIENT, ports[0], first_ip, 8080, ACK | PSH)
            .payload(b"x")
            .build(),
    );
    // A close frees a slot of that backend: the next new flow goes there,
    // whatever slot it hashes to.
    h.run(hook, &tcp(CLIENT, ports[0], VIP, 80, FIN | ACK).build());
    let (rc, out) = h.run(hook, &tcp(CLIENT, 42002, VIP, 80, SYN).build());
    assert_eq!(rc, V::Pass.code(hook), "a slot is free again");
    assert_bytes_eq(&out, &tcp(CLIENT, 42002, first_ip, 8080, SYN).build());

    // UDP, limits per backend (over a service limit): 1 flow each.
    let mut udp = service(
        "demo/qos:dns",
        UDP_VIP,
        53,
        Protocol::Udp,
        Algorithm::Random,
        &[(b(1), 5353), (b(2), 5353)],
    );
    udp.max_per_backend = Some(100);
    for b in &mut udp.backends {
        b.max = Some(1);
    }
    h.dp().writer().upsert_service(&udp).unwrap();
    let mut seen = Vec::new();
    for p in [43000u16, 43001] {
        let q = Pkt::udp()
            .ip(CLIENT, UDP_VIP)
            .ports(p, 53)
            .payload(b"query")
            .build();
        let (rc, out) = h.run(hook, &q);
        assert_eq!(rc, V::Pass.code(hook));
        seen.push(dst_of(&out));
    }
    seen.sort();
    assert_eq!(seen, vec![b(1), b(2)], "one flow each");
    let q = Pkt::udp()
        .ip(CLIENT, UDP_VIP)
        .ports(43002, 53)
        .id(9)
        .payload(b"a DNS query longer than 28 bytes")
        .build();
    let (rc, out) = h.run(hook, &q);
    assert_eq!(rc, V::Tx.code(hook), "all full: ICMP port unreachable");
    assert_bytes_eq(&out, &port_unreachable(&q));

    let after = h.reasons();
    let delta = |n: &str| {
        after.iter().find(|r| r.0 == n).unwrap().1 - before.iter().find(|r| r.0 == n).unwrap().1
    };
    assert_eq!(delta("tx_rst_backends_full"), 1);
    assert_eq!(delta("tx_icmp_backends_full"), 1);
    assert_eq!(delta("drop_backends_full"), 1);
    assert_eq!(
        (
            delta("tx_rst_no_backend"),
            delta("drop_no_backend"),
            delta("tx_icmp_no_backend")
        ),
        (0, 0, 0)
    );
    let w = h.dp().writer();
    assert_eq!(w.service_stats(&addr).unwrap().drops, 2);
    assert_eq!(w.service_stats(&udp.addr()).unwrap().drops, 1);

    // The limit lifted: the flag goes, every backend takes new flows again.
    svc.max_per_backend = None;
    h.dp().writer().upsert_service(&svc).unwrap();
    let (rc, _) = h.run(hook, &tcp(CLIENT, 42003, VIP, 80, SYN).build());
    assert_eq!(rc, V::Pass.code(hook), "no limit: forwarded");
    let bs = h.dp().writer().backend_stats(&addr).unwrap();
    assert!(bs.iter().all(|b| b.limit.is_none()), "{bs:?}");
}

both_sets!(xdp_qos_limits, xdp_qos_limits_compat, |set| qos_limits(
    Hook::Xdp,
    set
));
both_sets!(tc_qos_limits, tc_qos_limits_compat, |set| qos_limits(
    Hook::Tc,
    set
));
