//! DNAT/SNAT rewrites, incremental checksums (RFC 1624) and the RST reply.
//!
//! Checksum words are used exactly as loaded from the packet (network byte
//! order in a native integer): one's-complement sums do not depend on byte
//! order, so no swapping is needed.

use crate::{
    ctx::Ctx,
    parse::{IP_OFF, L4_OFF, Packet, TCP_ACK, TCP_RST},
};

#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// New checksum after a 32-bit field changed from `old` to `new`.
#[inline(always)]
pub fn csum_update4(hc: u16, old: u32, new: u32) -> u16 {
    let o = !old;
    let s = (!hc) as u64
        + (o & 0xffff) as u64
        + (o >> 16) as u64
        + (new & 0xffff) as u64
        + (new >> 16) as u64;
    !fold(s)
}

/// New checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn csum_update2(hc: u16, old: u16, new: u16) -> u16 {
    let s = (!hc) as u64 + (!old) as u64 + new as u64;
    !fold(s)
}

/// A computed UDP checksum of 0 is sent as 0xffff (0 means "none").
#[inline(always)]
pub fn l4_fix(c: u16, udp: bool) -> u16 {
    if udp && c == 0 { 0xffff } else { c }
}

/// Client -> VIP becomes client -> backend.
#[inline(always)]
pub fn dnat<C: Ctx>(ctx: &mut C, p: &mut Packet, ip: u32, port: u16) -> Option<()> {
    let udp = p.is_udp();
    ctx.rewrite_addr(IP_OFF + 16, p.daddr, ip, IP_OFF + 10, p.l4_csum, udp)?;
    ctx.rewrite_port(L4_OFF + 2, p.dport, port, p.l4_csum, udp)?;
    p.daddr = ip;
    p.dport = port;
    Some(())
}

/// Backend -> client becomes VIP -> client.
#[inline(always)]
pub fn snat<C: Ctx>(ctx: &mut C, p: &mut Packet, ip: u32, port: u16) -> Option<()> {
    let udp = p.is_udp();
    ctx.rewrite_addr(IP_OFF + 12, p.saddr, ip, IP_OFF + 10, p.l4_csum, udp)?;
    ctx.rewrite_port(L4_OFF, p.sport, port, p.l4_csum, udp)?;
    p.saddr = ip;
    p.sport = port;
    Some(())
}

/// Ethernet + IPv4 + TCP, no options, no payload.
pub const RST_LEN: usize = 54;

#[inline(always)]
fn sum_words(b: &[u8; RST_LEN], from: usize, words: usize, mut s: u64) -> u64 {
    let mut i = 0;
    while i < words {
        s += u16::from_be_bytes([b[from + 2 * i], b[from + 2 * i + 1]]) as u64;
        i += 1;
    }
    s
}

/// The RST|ACK answer to a SYN for a service with no usable backend, as the
/// client would get from a closed port: addresses and ports swapped,
/// `ack = seq + 1 + payload`, IP id 0, DF, TTL 64.
#[inline(always)]
pub fn build_rst(eth: &[u8; 12], p: &Packet) -> [u8; RST_LEN] {
    let mut b = [0u8; RST_LEN];
    b[..6].copy_from_slice(&eth[6..12]);
    b[6..12].copy_from_slice(&eth[..6]);
    b[12] = 0x08;
    // IPv4
    b[14] = 0x45;
    b[16..18].copy_from_slice(&40u16.to_be_bytes());
    b[20] = 0x40; // DF
    b[22] = 64;
    b[23] = 6;
    b[26..30].copy_from_slice(&p.daddr.to_ne_bytes());
    b[30..34].copy_from_slice(&p.saddr.to_ne_bytes());
    let ipc = !fold(sum_words(&b, 14, 10, 0));
    b[24..26].copy_from_slice(&ipc.to_be_bytes());
    // TCP
    b[34..36].copy_from_slice(&p.dport.to_ne_bytes());
    b[36..38].copy_from_slice(&p.sport.to_ne_bytes());
    let ack = u32::from_be(p.seq)
        .wrapping_add(1)
        .wrapping_add(p.payload_len);
    b[42..46].copy_from_slice(&ack.to_be_bytes());
    b[46] = 5 << 4;
    b[47] = TCP_RST | TCP_ACK;
    // Pseudo-header: addresses, protocol, TCP length (20).
    let s = sum_words(&b, 26, 4, 6 + 20);
    let tc = !fold(sum_words(&b, 34, 10, s));
    b[50..52].copy_from_slice(&tc.to_be_bytes());
    b
}
