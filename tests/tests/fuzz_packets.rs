//! Mutated packets through the real XDP and TC programs (BPF_PROG_TEST_RUN):
//! seeded truncations, random header bytes, bogus lengths, options and
//! fragments, built from a corpus of valid frames to, from and past the VIPs.
//!
//! Every run must return (no kernel error); every verdict must be PASS, DROP
//! or REDIRECT (never XDP_ABORTED or an unknown code); and the verdict must
//! agree with the reason counters the packet moved: each packet counts
//! exactly one outcome (a translation, or one pass/drop/answer reason), a
//! drop reason means DROP, a pass reason PASS, an answer or a redirect
//! REDIRECT, and a packet passed untranslated leaves the program unchanged.
//!
//! `RPCLB_FUZZ_PACKETS` (default 100,000) and `RPCLB_FUZZ_SEED` size the run;
//! `cargo xtask fuzz-packets` runs 1,000,000 with a fresh seed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use lb_agent::datapath::scratch::{Hook, ScratchDatapath, require_root};
use lb_api::{Algorithm, Protocol};
use lb_common::reason;
use rpclb_tests::packet::{
    self, ACK, FIN, PSH, Pkt, RST, SYN, TC_OK, TC_REDIRECT, TC_SHOT, XDP_ABORTED, XDP_DROP,
    XDP_PASS, XDP_REDIRECT, XDP_TX, service,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
/// A TCP and a UDP service whose one backend takes one flow (QoS limit 1).
const FULL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 98);

fn b(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 10 + i, 2)
}

/// xorshift64*: small, seeded, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Valid frames of every kind the programs meet.
fn corpus() -> Vec<Vec<u8>> {
    let tcp = |src, sport, dst, dport, flags| {
        Pkt::tcp()
            .ip(src, dst)
            .ports(sport, dport)
            .flags(flags)
            .seq(1000)
            .id(7)
    };
    let mut c = Vec::new();
    for sport in [40000u16, 40001, 40002] {
        c.push(tcp(CLIENT, sport, VIP, 80, SYN).build());
        c.push(
            tcp(CLIENT, sport, VIP, 80, ACK)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .build(),
        );
        c.push(tcp(CLIENT, sport, VIP, 80, FIN | ACK).build());
        c.push(tcp(CLIENT, sport, VIP, 80, RST).build());
        for i in 1..=3 {
            c.push(tcp(b(i), 8080, CLIENT, sport, SYN | ACK).build());
            c.push(
                tcp(b(i), 8080, CLIENT, sport, PSH | ACK)
                    .payload(&[7; 100])
                    .build(),
            );
        }
        c.push(
            Pkt::udp()
                .ip(CLIENT, UDP_VIP)
                .ports(sport, 53)
                .payload(&[1; 40])
                .build(),
        );
        for i in 1..=2 {
            c.push(
                Pkt::udp()
                    .ip(b(i), CLIENT)
                    .ports(5353, sport)
                    .payload(&[2; 40])
                    .build(),
            );
        }
    }
    c.push(tcp(CLIENT, 40010, EMPTY_VIP, 80, SYN).build());
    c.push(tcp(CLIENT, 40010, EMPTY_VIP, 80, ACK).build());
    let udp = |src, sport, dst, dport| Pkt::udp().ip(src, dst).ports(sport, dport);
    c.push(udp(CLIENT, 40010, EMPTY_VIP, 53).payload(&[9; 20]).build());
    // The first flow of each takes the backend; the others find it full.
    for sport in [40030u16, 40031] {
        c.push(tcp(CLIENT, sport, FULL_VIP, 80, SYN).build());
        c.push(udp(CLIENT, sport, FULL_VIP, 53).payload(&[9; 20]).build());
    }
    c.push(tcp(CLIENT, 40011, Ipv4Addr::new(10, 96, 0, 77), 80, SYN).build());
    c.push(tcp(CLIENT, 40012, VIP, 81, SYN).build());
    c.push(
        tcp(CLIENT, 40013, VIP, 80, SYN)
            .ip_options(&[1, 1, 1, 0])
            .build(),
    );
    c.push(
        tcp(CLIENT, 40014, VIP, 80, SYN)
            .tcp_options(&[2, 4, 5, 0xb4, 1, 1, 4, 2])
            .build(),
    );
    c.push(
        tcp(CLIENT, 40015, VIP, 80, ACK)
            .frag(0, true)
            .payload(&[3; 64])
            .build(),
    );
    c.push(
        tcp(CLIENT, 40015, VIP, 80, ACK)
            .frag(8, false)
            .payload(&[3; 64])
            .build(),
    );
    // A fragmented UDP datagram to the VIP and its fragmented reply: later
    // fragments that follow their first one through the fragment map.
    for (src, sport, dst, dport) in [(CLIENT, 40023, UDP_VIP, 53), (b(1), 5353, CLIENT, 40023)] {
        let whole = Pkt::udp()
            .ip(src, dst)
            .ports(sport, dport)
            .id(11)
            .df(false)
            .payload(&[8; 2000])
            .build();
        c.extend(packet::fragment(&whole, 1500));
    }
    c.push(tcp(CLIENT, 40016, VIP, 80, ACK).payload(&[4; 1400]).build());
    c.push(
        tcp(CLIENT, 40017, VIP, 80, ACK)
            .payload(&[5; 600])
            .partial()
            .build(),
    );
    c.push(
        Pkt::udp()
            .ip(CLIENT, UDP_VIP)
            .ports(40018, 53)
            .udp_no_csum()
            .build(),
    );
    c.push(
        Pkt::udp()
            .ip(CLIENT, UDP_VIP)
            .ports(40019, 53)
            .payload(&[6; 300])
            .partial()
            .build(),
    );
    c.push(tcp(CLIENT, 40020, VIP, 80, SYN).ttl(1).build());
    c.push(tcp(CLIENT, 40021, VIP, 80, SYN).ethertype(0x86dd).build());
    c.push(tcp(CLIENT, 40022, VIP, 80, SYN).ethertype(0x0806).build());
    c.push(Pkt::tcp().ip(CLIENT, VIP).ip_proto(1).build());
    c
}

/// One mutation of `f` (a copy), at least 14 bytes (BPF_PROG_TEST_RUN's
/// floor for an skb) and at most 1,514.
fn mutate(rng: &mut Rng, f: &[u8]) -> Vec<u8> {
    let mut m = f.to_vec();
    for _ in 0..1 + rng.below(3) {
        match rng.below(9) {
            // Truncate anywhere past the Ethernet header.
            0 => m.truncate(14 + rng.below(m.len().saturating_sub(14).max(1))),
            // Random bytes in the headers (Ethernet, IPv4, the L4 header).
            1 | 2 => {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(m.len().min(64));
                    m[i] = rng.byte();
                }
            }
            // A random byte anywhere.
            3 => {
                let i = rng.below(m.len());
                m[i] = rng.byte();
            }
            // Bogus IPv4 total length, header length or protocol.
            4 if m.len() >= 34 => {
                let v = rng.next() as u16;
                m[16..18].copy_from_slice(&v.to_be_bytes());
            }
            5 if m.len() >= 34 => m[14] = 0x40 | (rng.byte() & 0x0f),
            6 if m.len() >= 34 => {
                // Fragment bits and offset.
                let v = (rng.next() as u16) & 0x3fff;
                m[20..22].copy_from_slice(&v.to_be_bytes());
            }
            // Bytes appended past the datagram.
            7 => {
                for _ in 0..rng.below(64) {
                    m.push(rng.byte());
                }
            }
            // A UDP length or TCP data offset out of range.
            _ if m.len() >= 54 => {
                let ihl = usize::from(m[14] & 0x0f) * 4;
                let l4 = 14 + ihl.max(20);
                if l4 + 13 < m.len() {
                    m[l4 + 4] = rng.byte();
                    m[l4 + 12] = rng.byte();
                }
            }
            _ => {}
        }
    }
    m.truncate(1514);
    if m.len() < 14 {
        m.resize(14, 0);
    }
    m
}

/// BPF_PROG_TEST_RUN for an skb refuses (EINVAL) an IPv4 frame shorter than
/// an IPv4 header, and an IPv6 one shorter than an IPv6 header (kernel
/// 6.18): those go through XDP only.
fn tc_refuses(f: &[u8]) -> bool {
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => f.len() < 14 + 20,
        0x86dd => f.len() < 14 + 40,
        _ => false,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Pass,
    Drop,
    Redirect,
}

fn class(hook: Hook, rc: u32) -> Option<Class> {
    Some(match (hook, rc) {
        (Hook::Xdp, XDP_PASS) | (Hook::Tc, TC_OK) => Class::Pass,
        (Hook::Xdp, XDP_DROP) | (Hook::Tc, TC_SHOT) => Class::Drop,
        (Hook::Xdp, XDP_TX | XDP_REDIRECT) | (Hook::Tc, TC_REDIRECT) => Class::Redirect,
        _ => return None,
    })
}

/// The class each reason implies (`None`: not an outcome on its own, it
/// comes with a translation or another outcome). Every reason is listed
/// (`every_reason_has_a_class`): a new one must be classified here.
const CLASSES: &[(u32, Option<Class>)] = {
    use Class::{Drop, Pass, Redirect};
    &[
        (reason::PASS_NOT_IPV4, Some(Pass)),
        (reason::PASS_NOT_TCP_UDP, Some(Pass)),
        (reason::PASS_FRAGMENT, Some(Pass)),
        (reason::PASS_IP_OPTIONS, Some(Pass)),
        (reason::PASS_NO_SERVICE, Some(Pass)),
        (reason::PASS_FIB, Some(Pass)),
        (reason::DROP_TRUNCATED_ETH, Some(Drop)),
        (reason::DROP_TRUNCATED_IP, Some(Drop)),
        (reason::DROP_BAD_IHL, Some(Drop)),
        (reason::DROP_BAD_TOTAL_LEN, Some(Drop)),
        (reason::DROP_TRUNCATED_L4, Some(Drop)),
        (reason::DROP_NO_BACKEND, Some(Drop)),
        (reason::TX_RST_NO_BACKEND, Some(Redirect)),
        (reason::DROP_BAD_TABLE, Some(Drop)),
        (reason::DROP_CT_INSERT, None),
        (reason::FWD_REDIRECT, Some(Redirect)),
        (reason::NAT_FORWARD, None),
        (reason::NAT_REVERSE, None),
        (reason::DROP_RST_BUILD, Some(Drop)),
        (reason::PASS_CSUM_PARTIAL, Some(Pass)),
        (reason::PASS_CSUM_UNVERIFIED, Some(Pass)),
        (reason::CT_PORT_REWRITE, None),
        (reason::DROP_PORTS_EXHAUSTED, Some(Drop)),
        (reason::PASS_XDP_TARGET, Some(Pass)),
        (reason::NAT_FRAGMENT, None),
        (reason::PASS_FIB_CACHED, Some(Pass)),
        (reason::TX_ICMP_NO_BACKEND, Some(Redirect)),
        (reason::PASS_IPV6_EXT, Some(Pass)),
        (reason::PASS_IPV6_NO_PROGRAM, Some(Pass)),
        (reason::CT_REVERSE_LAZY, None),
        (reason::CT_SNAT, None),
        (reason::DROP_SNAT_EXHAUSTED, Some(Drop)),
        (reason::FWD_REDIRECT_NEIGH, Some(Redirect)),
        (reason::DROP_SNAT_UNROUTED, Some(Drop)),
        (reason::TX_RST_BACKENDS_FULL, Some(Redirect)),
        (reason::TX_ICMP_BACKENDS_FULL, Some(Redirect)),
        (reason::DROP_BACKENDS_FULL, Some(Drop)),
        (reason::CT_HAIRPIN, None),
        (reason::SELECTOR_CHOSEN, None),
        (reason::SELECTOR_MISSING, None),
        (reason::SELECTOR_NO_ANSWER, None),
        (reason::SELECTOR_REFUSED, None),
    ]
};

fn implied(r: u32) -> Option<Class> {
    CLASSES
        .iter()
        .find(|(x, _)| *x == r)
        .unwrap_or_else(|| panic!("reason {} has no class", reason::NAMES[r as usize]))
        .1
}

/// Each reason is classified once, and a reason's name agrees with its
/// class (`drop_` drops, `pass_` passes, `tx_`/`fwd_` answer or redirect).
#[test]
fn every_reason_has_a_class() {
    for r in 0..reason::COUNT {
        let n = CLASSES.iter().filter(|(x, _)| *x == r).count();
        let name = reason::NAMES[r as usize];
        assert_eq!(n, 1, "{name} classified {n} times");
        let by_name = match name.split('_').next().unwrap() {
            "pass" => Some(Class::Pass),
            "tx" | "fwd" => Some(Class::Redirect),
            "drop" if r != reason::DROP_CT_INSERT => Some(Class::Drop),
            _ => None,
        };
        assert_eq!(implied(r), by_name, "{name}");
    }
    assert_eq!(CLASSES.len() as u32, reason::COUNT);
}

fn reasons(dp: &mut ScratchDatapath) -> Vec<u64> {
    dp.writer()
        .reasons()
        .expect("read REASONS")
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

fn harness(fib: bool) -> ScratchDatapath {
    let mut dp = ScratchDatapath::new(|c| c.fib_redirect = fib).expect("load data path");
    let w = dp.writer();
    let tcp = service(
        "fuzz/rpc:grpc",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Maglev,
        &[(b(1), 8080), (b(2), 8080), (b(3), 8080)],
    );
    let udp = service(
        "fuzz/dns:dns",
        UDP_VIP,
        53,
        Protocol::Udp,
        Algorithm::RoundRobin,
        &[(b(1), 5353), (b(2), 5353)],
    );
    let empty = service(
        "fuzz/empty:http",
        EMPTY_VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        &[],
    );
    let empty_udp = service(
        "fuzz/empty:dns",
        EMPTY_VIP,
        53,
        Protocol::Udp,
        Algorithm::Random,
        &[],
    );
    let mut full_tcp = service(
        "fuzz/full:http",
        FULL_VIP,
        80,
        Protocol::Tcp,
        Algorithm::RoundRobin,
        &[(b(4), 8080)],
    );
    full_tcp.max_per_backend = Some(1);
    let mut full_udp = service(
        "fuzz/full:dns",
        FULL_VIP,
        53,
        Protocol::Udp,
        Algorithm::RoundRobin,
        &[(b(4), 5353)],
    );
    full_udp.max_per_backend = Some(1);
    for s in [&tcp, &udp, &empty, &empty_udp, &full_tcp, &full_udp] {
        w.upsert_service(s).expect("upsert");
    }
    dp
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: not a number")),
        Err(_) => default,
    }
}

#[test]
fn mutated_packets_get_consistent_verdicts() {
    if !require_root("packet fuzzing") {
        return;
    }
    let total = env_u64("RPCLB_FUZZ_PACKETS", 100_000);
    let seed = env_u64("RPCLB_FUZZ_SEED", 0x5eed_0f1b_ca11);
    eprintln!("fuzz: {total} packets, RPCLB_FUZZ_SEED={seed}");
    let corpus = corpus();
    let mut rng = Rng(seed | 1);
    let mut tally: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    // Later fragments translated through the fragment map.
    let mut followed = 0u64;
    let t = std::time::Instant::now();
    for fib in [false, true] {
        let mut dp = harness(fib);
        let mut before = reasons(&mut dp);
        for n in 0..total / 2 {
            let base = &corpus[rng.below(corpus.len())];
            // One in eight goes in unmutated, to build conntrack state that
            // later mutants meet.
            let input = if rng.below(8) == 0 {
                base.clone()
            } else {
                mutate(&mut rng, base)
            };
            let hook = if n % 2 == 0 || tc_refuses(&input) {
                Hook::Xdp
            } else {
                Hook::Tc
            };
            let (rc, out) = dp.run(hook, &input).unwrap_or_else(|e| {
                panic!("fib {fib}, packet {n} ({hook:?}): kernel error {e:?}: {input:02x?}")
            });
            assert_ne!(
                (hook, rc),
                (Hook::Xdp, XDP_ABORTED),
                "aborted: {input:02x?}"
            );
            let got = class(hook, rc)
                .unwrap_or_else(|| panic!("{hook:?}: unknown verdict {rc}: {input:02x?}"));
            let after = reasons(&mut dp);
            let moved: Vec<u32> = (0..reason::COUNT)
                .filter(|&r| after[r as usize] != before[r as usize])
                .collect();
            for &r in &moved {
                assert_eq!(
                    after[r as usize] - before[r as usize],
                    1,
                    "{hook:?}: {} counted twice: {input:02x?}",
                    reason::NAMES[r as usize]
                );
            }
            let nat = moved.iter().any(|&r| {
                matches!(
                    r,
                    reason::NAT_FORWARD | reason::NAT_REVERSE | reason::NAT_FRAGMENT
                )
            });
            let outcomes: Vec<u32> = moved
                .iter()
                .copied()
                .filter(|&r| implied(r).is_some())
                .collect();
            let names: Vec<&str> = moved.iter().map(|&r| reason::NAMES[r as usize]).collect();
            assert!(
                outcomes.len() == 1 || (nat && outcomes.is_empty()),
                "{hook:?} fib {fib}: reasons {names:?} for one packet: {input:02x?}"
            );
            let want = outcomes
                .first()
                .map_or(Class::Pass, |&r| implied(r).unwrap());
            assert_eq!(
                got, want,
                "{hook:?} fib {fib}: verdict {rc} with reasons {names:?}: {input:02x?}"
            );
            if got == Class::Pass && !nat {
                assert_eq!(out, input, "{hook:?}: passed untranslated, yet changed");
            }
            followed += moved.contains(&reason::NAT_FRAGMENT) as u64;
            let label = outcomes
                .first()
                .map_or("nat, to the stack", |&r| reason::NAMES[r as usize]);
            let hook_name = if hook == Hook::Xdp { "xdp" } else { "tc" };
            *tally.entry((hook_name, label)).or_default() += 1;
            before = after;
        }
    }
    eprintln!(
        "fuzz: {total} packets in {:.1?}, {followed} later fragments followed their first",
        t.elapsed()
    );
    for ((hook, r), n) in &tally {
        eprintln!("fuzz: {hook:>3} {r:<24} {n}");
    }
    // The corpus and mutations reach the interesting outcomes.
    if total >= 2_000 {
        let seen = |r: &str| tally.keys().any(|(_, x)| *x == r);
        for want in [
            "nat, to the stack",
            "drop_truncated_ip",
            "drop_bad_ihl",
            "drop_bad_total_len",
            "drop_truncated_l4",
            "pass_fragment",
            "pass_ip_options",
            "pass_not_ipv4",
            "pass_not_tcp_udp",
            "pass_no_service",
            "tx_rst_no_backend",
            "tx_icmp_no_backend",
            "tx_rst_backends_full",
            "tx_icmp_backends_full",
        ] {
            assert!(seen(want), "no packet reached {want}: {tally:?}");
        }
        assert!(followed > 0, "no later fragment followed its first one");
    }
}
