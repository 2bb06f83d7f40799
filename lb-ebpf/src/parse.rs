//! Bounds-checked Ethernet/IPv4/TCP/UDP parsing. Fields stay in network byte
//! order; only lengths and flags are decoded.

use lb_common::{proto, reason};

use crate::{
    ctx::{Ctx, ptr_at},
    nat::L4Csum,
};

pub const ETH_LEN: usize = 14;
pub const IP_OFF: usize = ETH_LEN;
/// Only option-less IPv4 headers are balanced (others pass, counted).
pub const L4_OFF: usize = ETH_LEN + 20;
const ETH_P_IP_BE: u16 = 0x0008;
/// What the IPv4 walk needs linear in TC (`tc_main`): Ethernet, IPv4
/// without options and a TCP header without options; UDP's ends before.
pub const TC_LINEAR: usize = L4_OFF + 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub csum: u16,
    pub urg: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub csum: u16,
}

/// `Packet::frag`: not a fragment.
pub const FRAG_NONE: u8 = 0;
/// `Packet::frag`: a first fragment (offset 0, More Fragments set): it has
/// the L4 header, and its L4 checksum covers the whole datagram.
pub const FRAG_FIRST: u8 = 1;
/// `Packet::frag`: a later fragment (offset > 0): no L4 header; `sport`,
/// `dport` and `l4_csum` are 0.
pub const FRAG_LATER: u8 = 2;

/// What the rest of the data path needs of a packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub flags: u8,
    pub ttl: u8,
    /// IPv4 total length (host order).
    pub tot_len: u16,
    /// Offset of the L4 checksum field.
    pub l4_csum: usize,
    /// TCP sequence number and payload length (for the RST reply).
    pub seq: u32,
    pub ack: u32,
    pub payload_len: u32,
    /// What the L4 check field holds; set by the NAT (`nat::classify`).
    pub csum: L4Csum,
    /// `FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER`.
    pub frag: u8,
    /// IPv4 identification (network byte order), which ties fragments together.
    pub ip_id: u16,
    /// This packet wrote its flow's reverse entry (`conntrack::first_reply`),
    /// which checked the forward entry and advanced its TCP state. In the
    /// packet, not a variable of its own: the compat XDP walk's stack has
    /// no 8 bytes to spare (the struct's padding has).
    pub wrote_reverse: bool,
}

impl Packet {
    #[inline(always)]
    pub fn is_udp(&self) -> bool {
        self.proto == proto::UDP
    }
}

/// `Ok(packet)` to balance, `Err((reason, drop))` to hand back untouched.
#[inline(always)]
pub fn parse<C: Ctx>(ctx: &C) -> Result<Packet, (u32, bool)> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or((reason::DROP_TRUNCATED_ETH, true))?;
    if unsafe { (*eth).proto } != ETH_P_IP_BE {
        return Err((reason::PASS_NOT_IPV4, false));
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or((reason::DROP_TRUNCATED_IP, true))?;
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Err((reason::DROP_BAD_IHL, true));
    }
    let tot_len = u16::from_be(ip.tot_len);
    let frame_l3 = ctx.frame_len().saturating_sub(ETH_LEN);
    if (tot_len as usize) > frame_l3 || (tot_len as usize) < ihl * 4 {
        return Err((reason::DROP_BAD_TOTAL_LEN, true));
    }
    if ihl != 5 {
        return Err((reason::PASS_IP_OPTIONS, false));
    }
    // A non-zero offset: a later fragment; else the More Fragments flag: a first one.
    let frag_off = u16::from_be(ip.frag_off);
    let frag = if frag_off & 0x1fff != 0 {
        FRAG_LATER
    } else if frag_off & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    let mut p = Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        proto: ip.proto,
        flags: 0,
        ttl: ip.ttl,
        tot_len,
        l4_csum: 0,
        seq: 0,
        ack: 0,
        payload_len: 0,
        csum: L4Csum::Full,
        frag,
        ip_id: ip.id,
        wrote_reverse: false,
    };
    if frag == FRAG_LATER {
        // No L4 header: `frag::later` finds the flow of the first fragment.
        if ip.proto != proto::TCP && ip.proto != proto::UDP {
            return Err((reason::PASS_FRAGMENT, false));
        }
        return Ok(p);
    }
    match ip.proto {
        proto::TCP => {
            let t: *const TcpHdr = ptr_at(ctx, L4_OFF).ok_or((reason::DROP_TRUNCATED_L4, true))?;
            let t = unsafe { &*t };
            let doff = (t.doff >> 4) as u32 * 4;
            if doff < 20 || tot_len < 20 + doff as u16 {
                return Err((reason::DROP_TRUNCATED_L4, true));
            }
            p.sport = t.sport;
            p.dport = t.dport;
            p.flags = t.flags;
            p.seq = t.seq;
            p.ack = t.ack;
            p.payload_len = tot_len as u32 - 20 - doff;
            p.l4_csum = L4_OFF + 16;
        }
        proto::UDP => {
            let u: *const UdpHdr = ptr_at(ctx, L4_OFF).ok_or((reason::DROP_TRUNCATED_L4, true))?;
            if tot_len < 28 {
                return Err((reason::DROP_TRUNCATED_L4, true));
            }
            let u = unsafe { &*u };
            p.sport = u.sport;
            p.dport = u.dport;
            p.l4_csum = L4_OFF + 6;
        }
        _ => return Err((reason::PASS_NOT_TCP_UDP, false)),
    }
    Ok(p)
}
