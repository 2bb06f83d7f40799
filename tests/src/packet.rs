//! Packet fixtures for BPF_PROG_TEST_RUN: a builder of Ethernet II + IPv4 + TCP/UDP frames with
//! checksums computed from scratch (full ones, or the seeds of CHECKSUM_PARTIAL packets), a
//! strict parser, checksum verifiers and a readable byte-diff assertion.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use lb_agent::datapath::reader::ip_wire;
use lb_common::{CtValue, FlowKey, ct_dir};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;

/// Program return codes (XDP actions and TC verdicts) the packet tests compare.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_OK: u32 = 0;
pub const TC_SHOT: u32 = 2;
pub const TC_REDIRECT: u32 = 7;

/// A verdict independent of the hook; [`Verdict::code`] gives the hook's return code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// Sent back out of the ingress (a redirect to it).
    Tx,
    /// A SNATed packet to its backend in the SNAT tests' namespaces: XDP drops it
    /// there (no route for the rewritten frame), TC redirects it.
    SnatOut,
}

impl Verdict {
    pub fn code(self, h: lb_agent::datapath::scratch::Hook) -> u32 {
        use lb_agent::datapath::scratch::Hook;
        match (self, h) {
            (Verdict::Pass, Hook::Xdp) => XDP_PASS,
            (Verdict::Drop | Verdict::SnatOut, Hook::Xdp) => XDP_DROP,
            (Verdict::Tx, Hook::Xdp) => XDP_REDIRECT,
            (Verdict::Pass, Hook::Tc) => TC_OK,
            (Verdict::Drop, Hook::Tc) => TC_SHOT,
            (Verdict::Tx | Verdict::SnatOut, Hook::Tc) => TC_REDIRECT,
        }
    }
}

/// The client and VIPs of the map-level tests (gc, lbctl, write order).
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);

/// One answered flow's two conntrack entries as the kernel writes them, for map-level tests
/// and the GC bench: the reverse entry (backend -> client), then the forward entry (client ->
/// VIP, DNAT to `backend` = (id, ip, port)), both created and last seen at `seen`.
pub fn answered_flow(
    proto: u8,
    client: (Ipv4Addr, u16),
    vip: (Ipv4Addr, u16),
    backend: (u32, Ipv4Addr, u16),
    svc_id: u32,
    state: u32,
    seen: u64,
) -> [(FlowKey, CtValue); 2] {
    let fk = FlowKey {
        src_ip: ip_wire(client.0),
        dst_ip: ip_wire(vip.0),
        src_port: client.1.to_be(),
        dst_port: vip.1.to_be(),
        proto,
        _pad: [0; 3],
    };
    let fv = CtValue {
        nat_ip: ip_wire(backend.1),
        nat_port: backend.2.to_be(),
        dir: ct_dir::FORWARD,
        svc_id,
        backend_id: backend.0,
        state,
        created_ns: seen,
        last_seen_ns: seen,
        ..Default::default()
    };
    let rv = CtValue {
        nat_ip: ip_wire(vip.0),
        nat_port: vip.1.to_be(),
        dir: ct_dir::REVERSE,
        state: 0,
        ..fv
    };
    [(fk.reverse_of_forward(&fv), rv), (fk, fv)]
}

/// A well-formed frame from `src:sport` to `dst:dport`: TCP with `flags`
/// (seq 1000, ack 1 when ACK is set), or UDP carrying `ping`.
pub fn frame(
    proto: u8,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let p = match proto {
        IPPROTO_TCP => Pkt::tcp()
            .flags(flags)
            .seq(1000)
            .ack(if flags & ACK != 0 { 1 } else { 0 }),
        _ => Pkt::udp().payload(b"ping"),
    };
    p.ip(src, dst).ports(sport, dport).build()
}

pub type Mac = [u8; 6];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("not IPv4: ethertype {0:#06x}")]
    NotIpv4(u16),
    #[error("bad {what}: {value}")]
    Malformed { what: &'static str, value: usize },
    #[error("bad IPv4 header checksum: found {found:#06x}, expected {expected:#06x}")]
    IpChecksum { found: u16, expected: u16 },
    #[error("bad {proto} checksum: found {found:#06x}, expected {expected:#06x}")]
    L4Checksum {
        proto: &'static str,
        found: u16,
        expected: u16,
    },
}

// ---------------------------------------------------------------------------------------------
// Checksums

/// RFC 1071 one's-complement sum of `data` (odd length padded with a zero byte), folded to
/// 16 bits, added to `init`.
pub fn csum_add(init: u32, data: &[u8]) -> u32 {
    let mut sum = init as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u32
}

/// The Internet checksum of `data`: the complement of its one's-complement sum.
pub fn checksum(data: &[u8]) -> u16 {
    !(csum_add(0, data) as u16)
}

/// TCP/UDP checksum over the IPv4 pseudo-header and `segment` (taken as is, so zero the
/// checksum field first to compute one; a correct segment yields 0).
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&(segment.len() as u16).to_be_bytes());
    !(csum_add(csum_add(0, &pseudo), segment) as u16)
}

/// The seed of a CHECKSUM_PARTIAL TCP/UDP packet: the folded, *uncomplemented* one's-complement
/// sum of the IPv4 pseudo-header (addresses, protocol, L4 length `len`). The kernel writes it
/// into the check field of a packet whose checksum a NIC (or the stack, in software) completes
/// later by summing the L4 header and payload onto it (`~tcp_v4_check(len, saddr, daddr, 0)`,
/// `udp4_hwcsum`). Never 0.
pub fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: u16) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&len.to_be_bytes());
    csum_add(0, &pseudo) as u16
}

// ---------------------------------------------------------------------------------------------
// Builder

/// Builder for one Ethernet/IPv4/TCP-or-UDP frame. Defaults: locally administered MACs,
/// 10.244.1.2 -> 10.96.0.1, TTL 64, DF set, ports 40000 -> 80, TCP window 65535.
#[derive(Debug, Clone)]
pub struct Pkt {
    proto: u8,
    src_mac: Mac,
    dst_mac: Mac,
    ethertype: u16,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    tos: u8,
    ttl: u8,
    id: u16,
    df: bool,
    mf: bool,
    frag_off: u16,
    ip_options: Vec<u8>,
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    window: u16,
    urg_ptr: u16,
    tcp_options: Vec<u8>,
    payload: Vec<u8>,
    // Knobs for malformed input; `None` means "correct value".
    ihl: Option<u8>,
    tot_len: Option<u16>,
    ip_proto: Option<u8>,
    ip_csum: Option<u16>,
    udp_len: Option<u16>,
    l4_csum: Option<u16>,
    truncate: Option<usize>,
    partial: bool,
    seed_collision: bool,
}

impl Pkt {
    fn new(proto: u8) -> Self {
        Pkt {
            proto,
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            ethertype: ETH_P_IP,
            src: Ipv4Addr::new(10, 244, 1, 2),
            dst: Ipv4Addr::new(10, 96, 0, 1),
            tos: 0,
            ttl: 64,
            id: 0,
            df: true,
            mf: false,
            frag_off: 0,
            ip_options: Vec::new(),
            sport: 40000,
            dport: 80,
            flags: 0,
            seq: 0,
            ack: 0,
            window: 65535,
            urg_ptr: 0,
            tcp_options: Vec::new(),
            payload: Vec::new(),
            ihl: None,
            tot_len: None,
            ip_proto: None,
            ip_csum: None,
            udp_len: None,
            l4_csum: None,
            truncate: None,
            partial: false,
            seed_collision: false,
        }
    }
    pub fn tcp() -> Self {
        Self::new(IPPROTO_TCP)
    }
    pub fn udp() -> Self {
        Self::new(IPPROTO_UDP)
    }
    pub fn eth(mut self, src: Mac, dst: Mac) -> Self {
        (self.src_mac, self.dst_mac) = (src, dst);
        self
    }
    pub fn ethertype(mut self, t: u16) -> Self {
        self.ethertype = t;
        self
    }
    pub fn ip(mut self, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        (self.src, self.dst) = (src, dst);
        self
    }
    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }
    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }
    pub fn df(mut self, df: bool) -> Self {
        self.df = df;
        self
    }
    /// Fragment offset in 8-byte units, and the More Fragments flag.
    pub fn frag(mut self, offset: u16, more: bool) -> Self {
        (self.frag_off, self.mf) = (offset & 0x1fff, more);
        self
    }
    /// IP options, zero-padded (EOL) to a multiple of 4 bytes; at most 40 bytes.
    pub fn ip_options(mut self, opts: &[u8]) -> Self {
        self.ip_options = opts.to_vec();
        self
    }
    pub fn ports(mut self, sport: u16, dport: u16) -> Self {
        (self.sport, self.dport) = (sport, dport);
        self
    }
    pub fn flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }
    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }
    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }
    pub fn window(mut self, window: u16) -> Self {
        self.window = window;
        self
    }
    pub fn urg_ptr(mut self, p: u16) -> Self {
        self.urg_ptr = p;
        self
    }
    /// TCP options, zero-padded (EOL) to a multiple of 4 bytes; at most 40 bytes.
    pub fn tcp_options(mut self, opts: &[u8]) -> Self {
        self.tcp_options = opts.to_vec();
        self
    }
    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }
    /// Malformed: write this IHL (in 4-byte words) instead of the real header length.
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl & 0x0f);
        self
    }
    /// Malformed: write this IPv4 total length instead of the real one.
    pub fn tot_len(mut self, len: u16) -> Self {
        self.tot_len = Some(len);
        self
    }
    /// Write this IP protocol number (the L4 header is still built as TCP/UDP).
    pub fn ip_proto(mut self, proto: u8) -> Self {
        self.ip_proto = Some(proto);
        self
    }
    /// Malformed: write this IPv4 header checksum instead of the correct one.
    pub fn ip_csum(mut self, csum: u16) -> Self {
        self.ip_csum = Some(csum);
        self
    }
    /// Malformed: write this UDP length instead of the real one.
    pub fn udp_len(mut self, len: u16) -> Self {
        self.udp_len = Some(len);
        self
    }
    /// Write this TCP/UDP checksum instead of the correct one.
    pub fn l4_csum(mut self, csum: u16) -> Self {
        self.l4_csum = Some(csum);
        self
    }
    /// A CHECKSUM_PARTIAL packet as the kernel hands it on before the checksum is completed:
    /// the check field holds the seed ([`pseudo_sum`] over the L4 length), not a checksum.
    pub fn partial(mut self) -> Self {
        self.partial = true;
        self
    }
    /// A full checksum that equals the seed by chance (1 in 65,536 packets): the first two
    /// payload bytes are replaced by the word that makes it so. Needs a payload of at least 2
    /// bytes; panics if the packet's seed is 0xffff (no TCP checksum can take that value).
    pub fn seed_collision(mut self) -> Self {
        self.seed_collision = true;
        self
    }
    /// UDP without checksum (checksum field 0, legal for UDP over IPv4).
    pub fn udp_no_csum(self) -> Self {
        self.l4_csum(0)
    }
    /// Cut the finished frame to at most `n` bytes (after all checksums are computed).
    pub fn truncate(mut self, n: usize) -> Self {
        self.truncate = Some(n);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let ip_opts = pad4(&self.ip_options);
        let tcp_opts = pad4(&self.tcp_options);
        assert!(
            ip_opts.len() <= 40 && tcp_opts.len() <= 40,
            "options longer than 40 bytes"
        );

        let mut l4 = if self.proto == IPPROTO_TCP {
            let mut h = Vec::with_capacity(20 + tcp_opts.len());
            h.extend_from_slice(&self.sport.to_be_bytes());
            h.extend_from_slice(&self.dport.to_be_bytes());
            h.extend_from_slice(&self.seq.to_be_bytes());
            h.extend_from_slice(&self.ack.to_be_bytes());
            h.push((((20 + tcp_opts.len()) / 4) as u8) << 4);
            h.push(self.flags);
            h.extend_from_slice(&self.window.to_be_bytes());
            h.extend_from_slice(&[0, 0]); // checksum
            h.extend_from_slice(&self.urg_ptr.to_be_bytes());
            h.extend_from_slice(&tcp_opts);
            h
        } else {
            let len = self.udp_len.unwrap_or((8 + self.payload.len()) as u16);
            let mut h = Vec::with_capacity(8);
            h.extend_from_slice(&self.sport.to_be_bytes());
            h.extend_from_slice(&self.dport.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&[0, 0]); // checksum
            h
        };
        let csum_at = if self.proto == IPPROTO_TCP { 16 } else { 6 };
        let payload_at = l4.len();
        l4.extend_from_slice(&self.payload);
        let seed = pseudo_sum(self.src, self.dst, self.proto, l4.len() as u16);
        if self.seed_collision {
            assert!(
                self.payload.len() >= 2,
                "seed_collision needs 2 payload bytes"
            );
            assert_ne!(seed, 0xffff, "no checksum equals a seed of 0xffff");
            // The full checksum is !fold(seed + h), h the segment's sum (check field 0). It
            // equals the seed when fold(seed + h) == !seed: with w the word at `payload_at`
            // and h0 the sum without it, w = !seed - seed - h0 (one's complement).
            l4[payload_at..payload_at + 2].fill(0);
            let h0 = csum_add(0, &l4) as u16;
            let w = csum_add(0, &[!seed, !seed, !h0].map(u16::to_be_bytes).concat()) as u16;
            l4[payload_at..payload_at + 2].copy_from_slice(&w.to_be_bytes());
        }
        let csum = self.l4_csum.unwrap_or_else(|| {
            if self.partial {
                return seed;
            }
            match l4_checksum(self.src, self.dst, self.proto, &l4) {
                0 if self.proto == IPPROTO_UDP => 0xffff, // 0 means "no checksum" in UDP
                c => c,
            }
        });
        if self.seed_collision && self.l4_csum.is_none() && !self.partial {
            assert_eq!(
                csum, seed,
                "seed_collision: the full checksum equals the seed"
            );
        }
        l4[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());

        let hlen = 20 + ip_opts.len();
        let mut ip = Vec::with_capacity(hlen);
        ip.push(0x40 | self.ihl.unwrap_or((hlen / 4) as u8));
        ip.push(self.tos);
        let tot_len = self.tot_len.unwrap_or((hlen + l4.len()) as u16);
        ip.extend_from_slice(&tot_len.to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        let frag = (u16::from(self.df) << 14) | (u16::from(self.mf) << 13) | self.frag_off;
        ip.extend_from_slice(&frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.ip_proto.unwrap_or(self.proto));
        ip.extend_from_slice(&[0, 0]); // checksum
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&ip_opts);
        let csum = self.ip_csum.unwrap_or_else(|| checksum(&ip));
        ip[10..12].copy_from_slice(&csum.to_be_bytes());

        let mut f = Vec::with_capacity(ETH_HLEN + ip.len() + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&self.ethertype.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        if let Some(n) = self.truncate {
            f.truncate(n);
        }
        f
    }
}

fn pad4(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    v.resize(b.len().div_ceil(4) * 4, 0);
    v
}

// ---------------------------------------------------------------------------------------------
// Parser

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eth {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4 {
    pub ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub df: bool,
    pub mf: bool,
    /// In 8-byte units.
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub options: Vec<u8>,
}

impl Ipv4 {
    pub fn is_fragment(&self) -> bool {
        self.mf || self.frag_off != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// Header length in bytes.
    pub hlen: u8,
    pub flags: u8,
    pub window: u16,
    pub csum: u16,
    pub urg_ptr: u16,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Udp {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub csum: u16,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    Tcp(Tcp),
    Udp(Udp),
}

/// A parsed Ethernet/IPv4 frame. `l4` is `None` for protocols other than TCP and UDP and for
/// non-first fragments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub eth: Eth,
    pub ip: Ipv4,
    pub l4: Option<L4>,
}

impl Parsed {
    pub fn tcp(&self) -> Option<&Tcp> {
        match &self.l4 {
            Some(L4::Tcp(t)) => Some(t),
            _ => None,
        }
    }
    pub fn udp(&self) -> Option<&Udp> {
        match &self.l4 {
            Some(L4::Udp(u)) => Some(u),
            _ => None,
        }
    }
    /// (source port, destination port) of TCP or UDP.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match &self.l4 {
            Some(L4::Tcp(t)) => Some((t.sport, t.dport)),
            Some(L4::Udp(u)) => Some((u.sport, u.dport)),
            None => None,
        }
    }
}

fn need(b: &[u8], n: usize, what: &'static str) -> Result<(), PacketError> {
    if b.len() < n {
        return Err(PacketError::Truncated {
            what,
            need: n,
            have: b.len(),
        });
    }
    Ok(())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Strict parse of an Ethernet/IPv4 frame: other ethertypes and lengths that point past the
/// buffer are errors. Bytes after the IPv4 total length (Ethernet padding) are ignored.
pub fn parse(frame: &[u8]) -> Result<Parsed, PacketError> {
    need(frame, ETH_HLEN, "ethernet header")?;
    let eth = Eth {
        dst: frame[0..6].try_into().unwrap(),
        src: frame[6..12].try_into().unwrap(),
        ethertype: be16(frame, 12),
    };
    if eth.ethertype != ETH_P_IP {
        return Err(PacketError::NotIpv4(eth.ethertype));
    }
    let b = &frame[ETH_HLEN..];
    need(b, 20, "IPv4 header")?;
    if b[0] >> 4 != 4 {
        return Err(PacketError::Malformed {
            what: "IP version",
            value: (b[0] >> 4).into(),
        });
    }
    let ihl = b[0] & 0x0f;
    let hlen = ihl as usize * 4;
    if hlen < 20 {
        return Err(PacketError::Malformed {
            what: "IPv4 IHL",
            value: ihl.into(),
        });
    }
    need(b, hlen, "IPv4 options")?;
    let tot_len = be16(b, 2);
    if (tot_len as usize) < hlen {
        return Err(PacketError::Malformed {
            what: "IPv4 total length",
            value: tot_len.into(),
        });
    }
    need(b, tot_len as usize, "IPv4 packet (total length)")?;
    let frag = be16(b, 6);
    let ip = Ipv4 {
        ihl,
        tos: b[1],
        tot_len,
        id: be16(b, 4),
        df: frag & 0x4000 != 0,
        mf: frag & 0x2000 != 0,
        frag_off: frag & 0x1fff,
        ttl: b[8],
        proto: b[9],
        csum: be16(b, 10),
        src: ip_at(b, 12),
        dst: ip_at(b, 16),
        options: b[20..hlen].to_vec(),
    };
    let seg = &b[hlen..tot_len as usize];
    let l4 = match ip.proto {
        _ if ip.frag_off != 0 => None,
        IPPROTO_TCP => {
            need(seg, 20, "TCP header")?;
            let thlen = (seg[12] >> 4) as usize * 4;
            if thlen < 20 {
                return Err(PacketError::Malformed {
                    what: "TCP data offset",
                    value: thlen / 4,
                });
            }
            need(seg, thlen, "TCP options")?;
            Some(L4::Tcp(Tcp {
                sport: be16(seg, 0),
                dport: be16(seg, 2),
                seq: be32(seg, 4),
                ack: be32(seg, 8),
                hlen: thlen as u8,
                flags: seg[13],
                window: be16(seg, 14),
                csum: be16(seg, 16),
                urg_ptr: be16(seg, 18),
                options: seg[20..thlen].to_vec(),
                payload: seg[thlen..].to_vec(),
            }))
        }
        IPPROTO_UDP => {
            need(seg, 8, "UDP header")?;
            let len = be16(seg, 4);
            // A first fragment holds only the start of the datagram its length counts.
            if (len as usize) < 8 || (len as usize > seg.len() && !ip.mf) {
                return Err(PacketError::Malformed {
                    what: "UDP length",
                    value: len.into(),
                });
            }
            Some(L4::Udp(Udp {
                sport: be16(seg, 0),
                dport: be16(seg, 2),
                len,
                csum: be16(seg, 6),
                payload: seg[8..(len as usize).min(seg.len())].to_vec(),
            }))
        }
        _ => None,
    };
    Ok(Parsed { eth, ip, l4 })
}

/// Check the IPv4 header checksum and, for unfragmented TCP/UDP, the L4 checksum with the
/// pseudo-header (UDP checksum 0 means "none" and is accepted). Frames that are not IPv4 pass.
pub fn verify_checksums(frame: &[u8]) -> Result<(), PacketError> {
    if frame.len() >= ETH_HLEN && be16(frame, 12) != ETH_P_IP {
        return Ok(());
    }
    let p = parse(frame)?;
    let ip = &p.ip;
    let b = &frame[ETH_HLEN..];
    let hdr = &b[..ip.ihl as usize * 4];
    if checksum(hdr) != 0 {
        let mut h = hdr.to_vec();
        h[10..12].fill(0);
        return Err(PacketError::IpChecksum {
            found: ip.csum,
            expected: checksum(&h),
        });
    }
    if ip.is_fragment() {
        return Ok(()); // the L4 checksum covers the reassembled datagram
    }
    let seg = &b[hdr.len()..ip.tot_len as usize];
    let (proto, at, found) = match &p.l4 {
        Some(L4::Tcp(t)) => ("TCP", 16, t.csum),
        Some(L4::Udp(u)) if u.csum == 0 => return Ok(()),
        Some(L4::Udp(u)) => {
            // The UDP checksum covers the UDP length, not the IP payload length.
            let seg = &seg[..u.len as usize];
            if l4_checksum(ip.src, ip.dst, ip.proto, seg) == 0 {
                return Ok(());
            }
            let mut s = seg.to_vec();
            s[6..8].fill(0);
            let expected = match l4_checksum(ip.src, ip.dst, ip.proto, &s) {
                0 => 0xffff,
                c => c,
            };
            return Err(PacketError::L4Checksum {
                proto: "UDP",
                found: u.csum,
                expected,
            });
        }
        None => return Ok(()),
    };
    if l4_checksum(ip.src, ip.dst, ip.proto, seg) != 0 {
        let mut s = seg.to_vec();
        s[at..at + 2].fill(0);
        let expected = l4_checksum(ip.src, ip.dst, ip.proto, &s);
        return Err(PacketError::L4Checksum {
            proto,
            found,
            expected,
        });
    }
    Ok(())
}

/// The L4 segment of an unfragmented TCP/UDP frame (UDP: as long as its length field says), its
/// pseudo-header sum and its check field.
fn l4_parts(frame: &[u8]) -> Result<(&'static str, u16, Vec<u8>, u16), PacketError> {
    let p = parse(frame)?;
    let ip = &p.ip;
    let b = &frame[ETH_HLEN..];
    let seg = &b[ip.ihl as usize * 4..ip.tot_len as usize];
    let (proto, seg, found) = match &p.l4 {
        Some(L4::Tcp(t)) => ("TCP", seg, t.csum),
        Some(L4::Udp(u)) => ("UDP", &seg[..u.len as usize], u.csum),
        None => {
            return Err(PacketError::Malformed {
                what: "L4 protocol for a checksum",
                value: ip.proto.into(),
            });
        }
    };
    let seed = pseudo_sum(ip.src, ip.dst, ip.proto, seg.len() as u16);
    Ok((proto, seed, seg.to_vec(), found))
}

/// Check the IPv4 header checksum and that the L4 check field holds the seed of a
/// CHECKSUM_PARTIAL packet ([`pseudo_sum`]), not a checksum.
pub fn verify_seed(frame: &[u8]) -> Result<(), PacketError> {
    let p = parse(frame)?;
    let hdr = &frame[ETH_HLEN..ETH_HLEN + p.ip.ihl as usize * 4];
    if checksum(hdr) != 0 {
        let mut h = hdr.to_vec();
        h[10..12].fill(0);
        return Err(PacketError::IpChecksum {
            found: p.ip.csum,
            expected: checksum(&h),
        });
    }
    let (proto, seed, _, found) = l4_parts(frame)?;
    if found != seed {
        return Err(PacketError::L4Checksum {
            proto,
            found,
            expected: seed,
        });
    }
    Ok(())
}

/// The one's-complement sum of the pseudo-header and the whole L4 segment, check field
/// included: 0xffff for a correct full checksum. A rewrite that updates a checksum correctly
/// (whatever the field held) keeps this value.
pub fn l4_residual(frame: &[u8]) -> Result<u16, PacketError> {
    let (_, seed, seg, _) = l4_parts(frame)?;
    Ok(csum_add(seed as u32, &seg) as u16)
}

// ---------------------------------------------------------------------------------------------
// Readable diffs

/// Classic 16-bytes-a-row hexdump.
pub fn hexdump(b: &[u8]) -> String {
    let mut s = String::new();
    for (row, chunk) in b.chunks(16).enumerate() {
        let _ = writeln!(s, "{:04x}  {}", row * 16, hex_row(chunk));
    }
    s
}

fn hex_row(chunk: &[u8]) -> String {
    chunk
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Name of the header field at byte `off` of an Ethernet/IPv4 frame laid out like `frame`.
pub fn field_name(frame: &[u8], off: usize) -> String {
    const ETH: [(usize, &str); 3] = [(6, "eth.dst"), (12, "eth.src"), (14, "eth.type")];
    const IP: [(usize, &str); 10] = [
        (1, "ip.ver_ihl"),
        (2, "ip.tos"),
        (4, "ip.tot_len"),
        (6, "ip.id"),
        (8, "ip.frag"),
        (9, "ip.ttl"),
        (10, "ip.proto"),
        (12, "ip.csum"),
        (16, "ip.src"),
        (20, "ip.dst"),
    ];
    const TCP: [(usize, &str); 9] = [
        (2, "tcp.sport"),
        (4, "tcp.dport"),
        (8, "tcp.seq"),
        (12, "tcp.ack"),
        (13, "tcp.doff"),
        (14, "tcp.flags"),
        (16, "tcp.window"),
        (18, "tcp.csum"),
        (20, "tcp.urg"),
    ];
    const UDP: [(usize, &str); 4] = [
        (2, "udp.sport"),
        (4, "udp.dport"),
        (6, "udp.len"),
        (8, "udp.csum"),
    ];
    let find = |tbl: &[(usize, &str)], o: usize| {
        tbl.iter()
            .find(|(end, _)| o < *end)
            .map(|(_, n)| n.to_string())
    };
    if off < ETH_HLEN {
        return find(&ETH, off).unwrap();
    }
    if frame.len() < ETH_HLEN + 20 || be16(frame, 12) != ETH_P_IP {
        return "l3".into();
    }
    let o = off - ETH_HLEN;
    let hlen = ((frame[ETH_HLEN] & 0x0f) as usize * 4).max(20);
    if o < 20 {
        return find(&IP, o).unwrap();
    }
    if o < hlen {
        return "ip.options".into();
    }
    let o = o - hlen;
    let seg = &frame[(ETH_HLEN + hlen).min(frame.len())..];
    match frame[ETH_HLEN + 9] {
        IPPROTO_TCP => {
            let thlen = seg.get(12).map_or(20, |d| ((d >> 4) as usize * 4).max(20));
            find(&TCP, o)
                .unwrap_or_else(|| if o < thlen { "tcp.options" } else { "payload" }.into())
        }
        IPPROTO_UDP => find(&UDP, o).unwrap_or_else(|| "payload".into()),
        _ => "l4".into(),
    }
}

/// Panic with an offset diff (rows with differences, marked, with field names) and the parsed
/// headers of both frames, unless `actual == expected`.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8]) {
    if actual == expected {
        return;
    }
    panic!("{}", bytes_diff(actual, expected));
}

/// The report `assert_bytes_eq` panics with.
pub fn bytes_diff(actual: &[u8], expected: &[u8]) -> String {
    let n = actual.len().max(expected.len());
    let differs = |i: usize| actual.get(i) != expected.get(i);
    let diffs: Vec<usize> = (0..n).filter(|&i| differs(i)).collect();
    let mut s = format!(
        "frames differ: actual {} bytes, expected {} bytes, {} differing byte(s)",
        actual.len(),
        expected.len(),
        diffs.len()
    );
    if let Some(&first) = diffs.first() {
        let _ = write!(
            s,
            ", first at {first:#06x} ({})",
            field_name(expected, first)
        );
    }
    s.push_str("\n\n");

    let rows: std::collections::BTreeSet<usize> = diffs.iter().map(|i| i / 16).collect();
    for row in rows.into_iter().take(8) {
        let at = row * 16;
        let part = |b: &[u8]| hex_row(&b[at.min(b.len())..(at + 16).min(b.len())]);
        let marks: String = (at..(at + 16).min(n))
            .map(|i| if differs(i) { "^^ " } else { "   " })
            .collect();
        let _ = writeln!(s, "{at:04x}  expected  {}", part(expected));
        let _ = writeln!(s, "      actual    {}", part(actual));
        let _ = writeln!(s, "                {}", marks.trim_end());
    }

    // Group differing bytes by field.
    let mut fields: Vec<(String, Vec<usize>)> = Vec::new();
    for &i in &diffs {
        let name = field_name(expected, i);
        match fields.last_mut() {
            Some((last, idx)) if *last == name => idx.push(i),
            _ => fields.push((name, vec![i])),
        }
    }
    let show = |b: &[u8], idx: &[usize]| -> String {
        idx.iter()
            .map(|&i| b.get(i).map_or("--".into(), |x| format!("{x:02x}")))
            .collect::<Vec<_>>()
            .join(" ")
    };
    s.push_str("\nfields:\n");
    for (name, idx) in fields.iter().take(16) {
        let _ = writeln!(
            s,
            "  {name:<12} @{:#06x}: expected {}, actual {}",
            idx[0],
            show(expected, idx),
            show(actual, idx)
        );
    }
    let _ = write!(
        s,
        "\nexpected: {:?}\nactual:   {:?}\n",
        parse(expected),
        parse(actual)
    );
    s
}

/// A service whose backends are `(ip, port)` pairs, for the packet tests.
pub fn service(
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    proto: lb_api::Protocol,
    algo: lb_api::Algorithm,
    backends: &[(Ipv4Addr, u16)],
) -> lb_api::Service {
    let backends = backends
        .iter()
        .map(|&(ip, port)| lb_api::Backend::new(ip, port))
        .collect();
    lb_api::Service::new(name, vip, port, proto, algo, backends)
}

/// Splits an unfragmented IPv4 frame without IP options into the frames the kernel sends for
/// it over a link of `mtu` (`ip_do_fragment`): each carries at most `mtu - 20` bytes of the
/// datagram (a multiple of 8 except in the last), the IP header copied with the same id, DF
/// clear, More Fragments on all but the last, the offset in 8-byte units and a fresh header
/// checksum. The L4 header, and its checksum over the whole datagram, stay in the first.
pub fn fragment(frame: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    let ip = &frame[ETH_HLEN..];
    assert_eq!(ip[0], 0x45, "IPv4 without options");
    let tot = be16(ip, 2) as usize;
    let data = &ip[20..tot];
    let step = (mtu - 20) / 8 * 8;
    let n = data.len().div_ceil(step);
    (0..n)
        .map(|i| {
            let chunk = &data[i * step..((i + 1) * step).min(data.len())];
            let mut h = ip[..20].to_vec();
            h[2..4].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
            let flags = (u16::from(i + 1 < n) << 13) | (i * step / 8) as u16;
            h[6..8].copy_from_slice(&flags.to_be_bytes());
            h[10..12].fill(0);
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            let mut f = frame[..ETH_HLEN].to_vec();
            f.extend_from_slice(&h);
            f.extend_from_slice(chunk);
            f
        })
        .collect()
}

/// The hook and the program set of one run of a packet test ([`each_hook_and_set!`]).
pub use lb_agent::datapath::{programs::ProgramSet, scratch::Hook};

/// A packet test run four ways: `each_hook_and_set!(name, run)` makes module `name` with the
/// tests `xdp_full`, `xdp_compat`, `tc_full` and `tc_compat`, each calling `run(hook, set)`
/// when the calling module's `can_run(set)` (a `fn(ProgramSet) -> bool` that prints SKIP or,
/// under CI, panics) lets that program set run here. With `in wrap`, the call runs inside
/// `wrap(|| ...)`: a network namespace of its own, for example.
#[macro_export]
macro_rules! each_hook_and_set {
    (@one $test:ident, $hook:ident, $set:ident, $run:expr) => {
        #[test]
        fn $test() {
            if can_run($crate::packet::ProgramSet::$set) {
                ($run)($crate::packet::Hook::$hook, $crate::packet::ProgramSet::$set);
            }
        }
    };
    (@one $test:ident, $hook:ident, $set:ident, $run:expr, $wrap:path) => {
        #[test]
        fn $test() {
            if can_run($crate::packet::ProgramSet::$set) {
                $wrap(|| ($run)($crate::packet::Hook::$hook, $crate::packet::ProgramSet::$set));
            }
        }
    };
    ($name:ident, $run:expr $(, in $wrap:path)?) => {
        mod $name {
            use super::*;
            $crate::each_hook_and_set!(@one xdp_full, Xdp, Full, $run $(, $wrap)?);
            $crate::each_hook_and_set!(@one xdp_compat, Xdp, Compat, $run $(, $wrap)?);
            $crate::each_hook_and_set!(@one tc_full, Tc, Full, $run $(, $wrap)?);
            $crate::each_hook_and_set!(@one tc_compat, Tc, Compat, $run $(, $wrap)?);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    #[test]
    fn rfc1071_example_sum() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(csum_add(0, &data), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
        // Odd length pads with a zero byte.
        assert_eq!(csum_add(0, &[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn ipv4_header_known_answer() {
        // Classic worked example: 4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7.
        let f = Pkt::udp()
            .ip(
                Ipv4Addr::new(192, 168, 0, 1),
                Ipv4Addr::new(192, 168, 0, 199),
            )
            .ttl(64)
            .id(0)
            .payload(&[0u8; 0x73 - 28])
            .build();
        let hdr = &f[ETH_HLEN..ETH_HLEN + 20];
        let want = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_bytes_eq(hdr, &want);
        verify_checksums(&f).unwrap();
    }

    #[test]
    fn tcp_syn_known_answer() {
        // Hand-computed: pseudo-header 0af4 0102 0a60 000a 0006 0014 sums to 0x167a, header
        // 9c40 0050 0000 0001 0000 0000 5002 ffff 0000 0000 to 0x1ec92; folded 0x030e,
        // complemented 0xfcf1.
        let f = Pkt::tcp()
            .ip(A, B)
            .ports(40000, 80)
            .flags(SYN)
            .seq(1)
            .build();
        assert_eq!(f.len(), ETH_HLEN + 40);
        assert_eq!(be16(&f, ETH_HLEN + 20 + 16), 0xfcf1);
        verify_checksums(&f).unwrap();
    }

    #[test]
    fn seeds_and_collisions() {
        // Hand-computed: 0af4 + 0102 + 0a60 + 000a + 0006 + 0014 = 0x167a (see tcp_syn_known_answer).
        assert_eq!(pseudo_sum(A, B, IPPROTO_TCP, 20), 0x167a);
        let f = Pkt::tcp().ip(A, B).flags(SYN).seq(1).partial().build();
        assert_eq!(be16(&f, ETH_HLEN + 36), 0x167a);
        verify_seed(&f).unwrap();
        assert!(verify_checksums(&f).is_err(), "a seed is not a checksum");
        // Completing a seed the way a NIC does (sum the segment onto it, complement) gives the
        // full checksum.
        let full = Pkt::tcp().ip(A, B).flags(SYN).seq(1).build();
        let seg = &f[ETH_HLEN + 20..];
        let completed = !(csum_add(0, seg) as u16);
        assert_eq!(completed, be16(&full, ETH_HLEN + 36));

        let u = Pkt::udp().ip(A, B).payload(b"abc").partial().build();
        assert_eq!(be16(&u, ETH_HLEN + 26), pseudo_sum(A, B, IPPROTO_UDP, 11));
        verify_seed(&u).unwrap();

        // Collisions: a correct full checksum equal to the seed, for odd and even lengths.
        for n in [2usize, 3, 4, 5, 100, 511, 1400, 1401] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 7 + 1) as u8).collect();
            for p in [Pkt::tcp().flags(ACK), Pkt::udp()] {
                let f = p.ip(A, B).payload(&payload).seed_collision().build();
                verify_checksums(&f).unwrap();
                verify_seed(&f).unwrap();
                assert_eq!(l4_residual(&f).unwrap(), 0xffff);
                assert_eq!(parse(&f).unwrap().ip.tot_len as usize, f.len() - ETH_HLEN);
            }
        }
    }

    #[test]
    fn build_parse_roundtrip() {
        let f = Pkt::tcp()
            .eth([2, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2])
            .ip(A, B)
            .ttl(17)
            .id(0x1234)
            .tos(0x10)
            .ip_options(&[0x94, 0x04, 0, 0]) // router alert
            .ports(41000, 8080)
            .flags(PSH | ACK)
            .seq(0xdeadbeef)
            .ack(7)
            .window(1000)
            .tcp_options(&[2, 4, 0x05, 0xb4, 1]) // MSS 1460, NOP, padded to 8
            .payload(b"hello, odd")
            .build();
        verify_checksums(&f).unwrap();
        let p = parse(&f).unwrap();
        assert_eq!(p.eth.src, [2, 1, 1, 1, 1, 1]);
        let ip = &p.ip;
        assert_eq!(
            (ip.src, ip.dst, ip.ttl, ip.id, ip.tos, ip.ihl),
            (A, B, 17, 0x1234, 0x10, 6)
        );
        assert_eq!(ip.tot_len as usize, f.len() - ETH_HLEN);
        assert!(ip.df && !ip.is_fragment());
        let t = p.tcp().unwrap();
        assert_eq!(
            (t.sport, t.dport, t.seq, t.ack, t.window, t.flags),
            (41000, 8080, 0xdeadbeef, 7, 1000, PSH | ACK)
        );
        assert_eq!(t.options, [2, 4, 0x05, 0xb4, 1, 0, 0, 0]);
        assert_eq!(t.payload, b"hello, odd");

        let arp = Pkt::tcp().ethertype(0x0806).build();
        assert_eq!(parse(&arp), Err(PacketError::NotIpv4(0x0806)));
        verify_checksums(&arp).unwrap();

        let u = Pkt::udp().ip(B, A).ports(53, 5353).payload(b"xyz").build();
        verify_checksums(&u).unwrap();
        let p = parse(&u).unwrap();
        assert_eq!(p.ports(), Some((53, 5353)));
        assert_eq!(p.udp().unwrap().len, 11);
        assert_eq!(p.udp().unwrap().payload, b"xyz");
    }

    #[test]
    fn verify_catches_every_corrupted_bit() {
        for f in [
            Pkt::tcp()
                .ip(A, B)
                .flags(SYN)
                .tcp_options(&[2, 4, 5, 0xb4])
                .payload(b"abc")
                .build(),
            Pkt::udp()
                .ip(A, B)
                .ip_options(&[1, 1, 1, 1])
                .payload(b"abcd")
                .build(),
        ] {
            for i in ETH_HLEN..f.len() {
                for bit in 0..8 {
                    let mut g = f.clone();
                    g[i] ^= 1 << bit;
                    assert!(
                        verify_checksums(&g).is_err(),
                        "flip of bit {bit} at {i:#x} not caught"
                    );
                }
            }
        }
    }

    #[test]
    fn wrong_checksums_on_purpose() {
        let f = Pkt::tcp()
            .ip(A, B)
            .flags(SYN)
            .seq(1)
            .l4_csum(0x1234)
            .build();
        let err = verify_checksums(&f).unwrap_err();
        assert_eq!(
            err,
            PacketError::L4Checksum {
                proto: "TCP",
                found: 0x1234,
                expected: 0xfcf1
            }
        );
        let f = Pkt::udp().ip(A, B).ip_csum(0xbeef).build();
        assert!(matches!(
            verify_checksums(&f),
            Err(PacketError::IpChecksum { found: 0xbeef, .. })
        ));
        // UDP without checksum is legal; TCP with 0 is not (its correct value here is not 0).
        verify_checksums(&Pkt::udp().ip(A, B).payload(b"x").udp_no_csum().build()).unwrap();
        assert!(verify_checksums(&Pkt::tcp().ip(A, B).l4_csum(0).build()).is_err());
    }

    #[test]
    fn malformed_knobs() {
        let base = Pkt::tcp().ip(A, B).flags(SYN);
        let f = base.clone().ihl(4).build();
        assert_eq!(f[ETH_HLEN], 0x44);
        assert!(matches!(
            parse(&f),
            Err(PacketError::Malformed {
                what: "IPv4 IHL",
                value: 4
            })
        ));
        // The header checksum still matches the bytes written.
        assert_eq!(checksum(&f[ETH_HLEN..ETH_HLEN + 20]), 0);

        let f = base.clone().tot_len(1000).build();
        assert!(matches!(parse(&f), Err(PacketError::Truncated { .. })));

        let f = base.clone().truncate(ETH_HLEN + 30).build();
        assert_eq!(f.len(), ETH_HLEN + 30);
        assert!(matches!(parse(&f), Err(PacketError::Truncated { .. })));

        let f = base.clone().frag(0, true).build();
        let p = parse(&f).unwrap();
        assert!(p.ip.mf && p.tcp().is_some());
        let f = base.clone().frag(185, false).build();
        let p = parse(&f).unwrap();
        assert_eq!(p.ip.frag_off, 185);
        assert!(p.l4.is_none(), "non-first fragment has no L4 header");
        verify_checksums(&f).unwrap();

        // 3,000 bytes of UDP over a 1,500 MTU: 1,480 + 1,480 + 48 bytes, as the kernel cuts it.
        let whole = Pkt::udp()
            .ip(A, B)
            .id(99)
            .df(false)
            .payload(&[7; 3000])
            .build();
        let frags = fragment(&whole, 1500);
        let lens: Vec<usize> = frags.iter().map(|f| f.len() - ETH_HLEN).collect();
        assert_eq!(lens, vec![1500, 1500, 68]);
        for (i, f) in frags.iter().enumerate() {
            verify_checksums(f).unwrap();
            let p = parse(f).unwrap();
            assert_eq!(
                (p.ip.id, p.ip.mf, p.ip.frag_off),
                (99, i < 2, 185 * i as u16)
            );
            assert_eq!(p.udp().is_some(), i == 0);
        }
        let mut again = frags[0][..ETH_HLEN + 20].to_vec();
        for f in &frags {
            again.extend_from_slice(&f[ETH_HLEN + 20..]);
        }
        assert_eq!(again[ETH_HLEN + 20..], whole[ETH_HLEN + 20..]);

        let f = Pkt::udp().ip(A, B).payload(b"abcd").udp_len(100).build();
        assert!(matches!(
            parse(&f),
            Err(PacketError::Malformed {
                what: "UDP length",
                ..
            })
        ));
    }

    #[test]
    fn diff_report_names_fields() {
        let a = Pkt::tcp().ip(A, B).flags(SYN).build();
        let b = Pkt::tcp()
            .ip(A, Ipv4Addr::new(10, 244, 11, 2))
            .flags(SYN)
            .build();
        let r = bytes_diff(&b, &a);
        assert!(r.contains("first at 0x0018 (ip.csum)"), "{r}");
        assert!(
            r.contains("ip.dst       @0x001f: expected 60 00 0a, actual f4 0b 02"),
            "{r}"
        );
        assert!(r.contains("tcp.csum"), "{r}");
        assert!(r.contains("^^"), "{r}");
        let err = std::panic::catch_unwind(|| assert_bytes_eq(&b, &a)).unwrap_err();
        assert!(err.downcast_ref::<String>().unwrap().contains("ip.dst"));
        assert_bytes_eq(&a, &a.clone());
    }
}
