//! The IPv6 answers for a service with no usable backend, as `reject` and
//! `nat::build_rst` give them for IPv4 (kube-proxy's REJECT): a TCP SYN gets
//! a RST|ACK, a UDP datagram an ICMPv6 port unreachable, both back out of
//! the ingress interface from the service address. The rest is dropped.
//!
//! The RST is built in the per-CPU scratch (`Scratch6::frame`) and replaces
//! the frame (74 bytes, no extension headers). The ICMPv6 error is built in
//! place as `reject` does: the frame grows by 48 bytes at the front, so the
//! datagram's IPv6 and UDP headers, as received, become the quote:
//!
//! ```text
//! before: [eth 14][ipv6 40][udp 8][payload ...]
//! after:  [eth 14][ipv6 40][icmpv6 8][ipv6 40][udp 8]      110 bytes
//! ```
//! The quote is the headers only (RFC 4443 asks for as much of the packet as
//! fits in 1280 bytes; the headers are what the client's stack matches its
//! socket on). A datagram with extension headers, or from a multicast or
//! unspecified source (RFC 4443 2.4 e), is dropped instead. Hop limit 64,
//! traffic class 0, flow label 0.

use lb_common::{proto, reason};

use crate::{
    ctx::{Ctx, Verdict, ptr_at},
    nat::{fold, put_eth, sum_words},
    parse::{TCP_ACK, TCP_RST, TCP_SYN, TcpHdr},
    stats,
    v6::{IP6_OFF, L4_OFF6, Packet6, Scratch6},
};

/// Ethernet + IPv6 + TCP (no options).
pub const RST6_LEN: usize = 74;
/// Ethernet + IPv6 + ICMPv6 header + the quoted IPv6 and UDP headers.
pub const UNREACH6_LEN: usize = 110;
const GROW: usize = 48;
const QUOTE: usize = 62;

/// A service without backends for the new flow `p` (the caller counted
/// the service's drop). Counted as `main::no_backend`.
#[inline(always)]
pub fn no_backend<C: Ctx>(ctx: &mut C, p: &Packet6, s: *mut Scratch6) -> Verdict {
    // The answer leaves through the ingress, which native XDP on a veth
    // without a receiving peer cannot do: dropped instead.
    if !ctx.can_redirect(ctx.ifindex()) || !unicast(&p.saddr) {
        stats::reason(reason::DROP_NO_BACKEND);
        return Verdict::Drop;
    }
    if p.proto == proto::TCP && p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        if rst(ctx, p, s).is_some() {
            stats::reason(reason::TX_RST_NO_BACKEND);
            return Verdict::Bounce;
        }
        stats::reason(reason::DROP_RST_BUILD);
        return Verdict::Drop;
    }
    if p.proto == proto::UDP && p.l4_off == L4_OFF6 {
        if port_unreachable(ctx, &p.saddr, &p.daddr).is_some() {
            stats::reason(reason::TX_ICMP_NO_BACKEND);
            return Verdict::Bounce;
        }
        // The frame may be half-written.
        stats::reason(reason::DROP_RST_BUILD);
        return Verdict::Drop;
    }
    stats::reason(reason::DROP_NO_BACKEND);
    Verdict::Drop
}

/// Not multicast (ff00::/8) and not the unspecified address.
#[inline(always)]
fn unicast(a: &[u32; 4]) -> bool {
    // The first byte is the low byte of the native (little-endian) load.
    a[0] & 0xff != 0xff && (a[0] | a[1] | a[2] | a[3]) != 0
}

/// Ethernet and IPv6 headers at the front of `b`: the MACs of `eth` (as
/// received) swapped, then version 6, traffic class and flow label 0, the
/// payload length, the next header, hop limit 64, `src` and `dst`.
#[inline(always)]
fn put_headers<const N: usize>(
    b: &mut [u8; N],
    eth: &[u8; 12],
    payload_len: u8,
    next: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
) {
    put_eth(b, eth, 0x86dd);
    b[14] = 0x60;
    b[15] = 0;
    b[16] = 0;
    b[17] = 0;
    b[18] = 0;
    b[19] = payload_len;
    b[20] = next;
    b[21] = 64;
    put_addr(b, IP6_OFF + 8, src);
    put_addr(b, IP6_OFF + 24, dst);
}

/// The 16 bytes of an address as loaded (network order in memory).
#[inline(always)]
fn put_addr<const N: usize>(b: &mut [u8; N], at: usize, a: &[u32; 4]) {
    let mut i = 0;
    while i < 4 {
        let w = a[i].to_ne_bytes();
        b[at + 4 * i] = w[0];
        b[at + 4 * i + 1] = w[1];
        b[at + 4 * i + 2] = w[2];
        b[at + 4 * i + 3] = w[3];
        i += 1;
    }
}

/// The RST|ACK answer to the SYN `p`: addresses and ports swapped, MACs
/// swapped, `ack = seq + 1 + payload`, window 0.
#[inline(always)]
fn rst<C: Ctx>(ctx: &mut C, p: &Packet6, s: *mut Scratch6) -> Option<()> {
    let eth: *const [u8; 12] = ptr_at(ctx, 0)?;
    let tcp: *const TcpHdr = ptr_at(ctx, p.l4_off & 0x1ff)?;
    let (eth, tcp) = unsafe { (&*eth, &*tcp) };
    let doff = (tcp.doff >> 4) as u32 * 4;
    let ack = u32::from_be(tcp.seq)
        .wrapping_add(1)
        .wrapping_add((p.l4_len as u32).wrapping_sub(doff));
    let b = unsafe { &mut (*s).frame };
    build_rst(b, eth, p, ack);
    ctx.replace(b)
}

/// Writes every byte of the RST frame (the scratch holds the last one's).
#[inline(always)]
pub fn build_rst(b: &mut [u8; RST6_LEN], eth: &[u8; 12], p: &Packet6, ack: u32) {
    // IPv6: from the service address (the SYN's destination) to the client.
    put_headers(b, eth, 20, proto::TCP, &p.daddr, &p.saddr);
    // TCP at 54.
    let (sp, dp) = (p.dport.to_ne_bytes(), p.sport.to_ne_bytes());
    b[54] = sp[0];
    b[55] = sp[1];
    b[56] = dp[0];
    b[57] = dp[1];
    let a = ack.to_be_bytes();
    let mut i = 0;
    while i < 4 {
        b[58 + i] = 0; // seq
        b[62 + i] = a[i];
        b[68 + i] = 0; // window, checksum
        i += 1;
    }
    b[66] = 5 << 4;
    b[67] = TCP_RST | TCP_ACK;
    b[72] = 0;
    b[73] = 0;
    // Pseudo-header (addresses, TCP length 20, next header) and the header.
    let s = sum_words(b, IP6_OFF + 8, 16, 20 + proto::TCP as u64);
    let c = (!fold(sum_words(b, 54, 10, s))).to_be_bytes();
    b[70] = c[0];
    b[71] = c[1];
}

/// Rewrites the frame (a UDP datagram, IPv6 header without extension
/// headers) into the ICMPv6 port unreachable answer from `daddr` to `saddr`.
#[inline(always)]
fn port_unreachable<C: Ctx>(ctx: &mut C, saddr: &[u32; 4], daddr: &[u32; 4]) -> Option<()> {
    let (saddr, daddr) = (*saddr, *daddr);
    ctx.reframe(GROW, UNREACH6_LEN)?;
    // The old Ethernet header is at 48..62 now.
    let old: *mut [u8; 12] = ptr_at(ctx, GROW)?;
    let head: *mut [u8; QUOTE] = ptr_at(ctx, 0)?;
    let quote: *mut [u16; 24] = ptr_at(ctx, QUOTE)?;
    unsafe {
        let (o, h) = (&*old, &mut *head);
        let mut m = [0u8; 12];
        let mut i = 0;
        while i < 12 {
            m[i] = o[i];
            i += 1;
        }
        put_headers(h, &m, 56, 58, &daddr, &saddr);
        // ICMPv6 type 1 (destination unreachable) code 4 (port unreachable).
        h[54] = 1;
        h[55] = 4;
        let mut i = 56;
        while i < 62 {
            h[i] = 0;
            i += 1;
        }
        // Pseudo-header (addresses, length 56, next header 58), the ICMPv6
        // header and the quote.
        let mut s = sum_words(h, IP6_OFF + 8, 16, 56 + 58 + 0x0104);
        let q = &*quote;
        let mut i = 0;
        while i < 24 {
            s += u16::from_be(q[i]) as u64;
            i += 1;
        }
        let c = (!fold(s)).to_be_bytes();
        h[56] = c[0];
        h[57] = c[1];
    }
    Some(())
}
