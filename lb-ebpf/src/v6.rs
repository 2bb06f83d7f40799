//! The IPv6 data path: parse, conntrack, selection, NAT and forwarding of
//! Ethernet/IPv6/TCP|UDP, beside (not inside) the IPv4 walk of `main.rs`.
//!
//! Maps of its own for what holds addresses (`SERVICES6`, `BACKENDS6`,
//! `CONNTRACK6`, as Cilium keeps its v4 and v6 maps apart: an IPv4 key
//! stays 16 bytes), everything else shared with IPv4: service and backend
//! ids, the selection tables (`SLOTS`), `BACKENDS` (port, state, weight;
//! the address is in `BACKENDS6`), the counters, the affinity map and the
//! TCP state machine (`conntrack::tcp_state`, on the `CtValue` inside
//! `CtValue6`).
//!
//! Hashes see an IPv6 address folded to one word (`lb_common::fold6`), as
//! the userspace proxy folds it, so Maglev, source hash and the random
//! pick agree between the kernel and userspace paths.
//!
//! What is not done here (yet), each counted:
//! - extension headers: hop-by-hop, destination options and routing
//!   headers with no segments left are skipped, up to `IPV6_MAX_EXT`
//!   headers and `IPV6_MAX_EXT_BYTES` bytes; a longer chain, a routing
//!   header with segments left, a jumbogram and unknown headers pass
//!   (`pass_ipv6_ext`); a Fragment header passes (`pass_fragment`);
//!   ICMPv6 (neighbour discovery included) passes (`pass_not_tcp_udp`);
//! - SNAT (`snat6`) and the source-port rewrite of a new flow whose
//!   reverse tuple another flow holds (one client ip:port through two VIPs
//!   to one backend; `ct_port_rewrite`, `drop_ports_exhausted` when the
//!   collision range has no free candidate) are IPv4's;
//! - no usable backend: a SYN gets a RST, a UDP datagram without extension
//!   headers an ICMPv6 port unreachable (`reject6`), the rest is dropped;
//! - XDP: a check field equal to the packet's seed is taken for a
//!   CHECKSUM_PARTIAL seed without verifying the segment
//!   (`pass_csum_unverified`; IPv4 verifies it, `nat::classify`).

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{
    CtValue6, FIB_FAILED, FlowKey6, IPV6_MAX_EXT, IPV6_MAX_EXT_BYTES, ServiceKey6, config_idx,
    ct_dir, ct_flags, ct_state, fold6, proto, reason,
};

use crate::{
    conntrack,
    ctx::{Ctx, Tc, Verdict, Xdp, ptr_at},
    fib,
    maps::{BACKENDS6, CONNTRACK6, SCRATCH6, SERVICES6, V6_TC_PROGS, V6_XDP_PROGS, config},
    nat::{self, L4Csum},
    parse::{self, ETH_LEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TcpHdr, UdpHdr},
    select,
    set::ProgramSet,
    stats,
};

/// EtherType 0x86dd as loaded from the frame (network order, native load).
pub const ETH_P_IPV6_BE: u16 = 0xdd86;
pub const IP6_OFF: usize = ETH_LEN;
pub const IP6_LEN: usize = 40;
/// The L4 header without extension headers.
pub const L4_OFF6: usize = ETH_LEN + IP6_LEN;
/// Bounds every L4 offset for the verifier (`IPV6_MAX_EXT_BYTES` past `L4_OFF6` fits).
pub(crate) const OFF_MASK: usize = 0x1ff;
const _: () = assert!(L4_OFF6 + IPV6_MAX_EXT_BYTES <= OFF_MASK);

const NH_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_DEST: u8 = 60;

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

/// What the IPv6 path needs of a packet (network order, as `parse::Packet`).
#[derive(Clone, Copy)]
pub struct Packet6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub flags: u8,
    pub hop: u8,
    /// IPv6 payload length (host order): extension headers and L4.
    pub payload_len: u16,
    /// L4 header offset (after the extension headers) and length (host order).
    pub l4_off: usize,
    pub l4_len: u16,
    /// Offset of the L4 checksum field.
    pub l4_csum: usize,
    pub csum: L4Csum,
}

/// The IPv6 walk's big temporaries, in a per-CPU map (`SCRATCH6`) rather
/// than on the stack: the packet's flow key, a second key (the reverse
/// entry's, or the forward entry of a reply), a third (the owner of a taken
/// reverse key), a conntrack value being written (and a new SNATed flow's
/// state, `snat6`) and a RST being built.
#[repr(C)]
pub struct Scratch6 {
    pub key: FlowKey6,
    pub rev: FlowKey6,
    pub other: FlowKey6,
    pub ct: CtValue6,
    /// The forward entry's state of a new SNATed flow (`snat6::create`).
    pub state: u32,
    pub _pad: u32,
    /// A RST being built (`reject6`).
    pub frame: [u8; crate::reject6::RST6_LEN],
}

/// The frame's EtherType is IPv6 (direct access; in TC, a load where the
/// Ethernet header is not linear, which at ingress it always is).
#[inline(always)]
pub fn is_ipv6_xdp(ctx: &XdpContext) -> bool {
    let c = Xdp(ctx);
    let eth: Option<*mut parse::EthHdr> = ptr_at(&c, 0);
    matches!(eth, Some(e) if unsafe { (*e).proto } == ETH_P_IPV6_BE)
}

#[inline(always)]
pub fn is_ipv6_tc(ctx: &TcContext) -> bool {
    let c = Tc(ctx);
    match ptr_at::<_, parse::EthHdr>(&c, 0) {
        Some(e) => (unsafe { (*e).proto }) == ETH_P_IPV6_BE,
        None => matches!(ctx.load::<u16>(12), Ok(p) if p == ETH_P_IPV6_BE),
    }
}

/// Tail-calls the IPv6 program `idx` (`V6_XDP_PROGS`); returns only if it
/// is missing: the frame then goes to the stack, counted.
#[inline(always)]
pub fn dispatch_xdp(ctx: &XdpContext, idx: u32) -> u32 {
    unsafe { V6_XDP_PROGS.tail_call(ctx, idx) };
    stats::reason(reason::PASS_IPV6_NO_PROGRAM);
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// [`dispatch_xdp`] for TC.
#[inline(always)]
pub fn dispatch_tc(ctx: &TcContext, idx: u32) -> i32 {
    unsafe { V6_TC_PROGS.tail_call(ctx, idx) };
    stats::reason(reason::PASS_IPV6_NO_PROGRAM);
    aya_ebpf::bindings::TC_ACT_OK
}

/// The XDP IPv6 program's walk (a program of its own: the IPv4 walk's
/// stack and this one's would not fit in one program's 512 bytes).
#[inline(always)]
pub fn xdp<S: ProgramSet>(ctx: XdpContext) -> u32 {
    let mut c = Xdp(&ctx);
    let v = process::<_, S>(&mut c);
    c.ret(v)
}

/// The TC IPv6 program's walk (see [`xdp`]).
#[inline(always)]
pub fn tc<S: ProgramSet>(ctx: TcContext) -> i32 {
    // The headers linear, extension headers included.
    let want = ctx.len().min((L4_OFF6 + IPV6_MAX_EXT_BYTES + 20) as u32);
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        let _ = ctx.pull_data(want);
    }
    let mut c = Tc(&ctx);
    let v = process::<_, S>(&mut c);
    c.ret(v) as i32
}

/// `Ok(packet)` to balance, `Err((reason, drop))` to hand back untouched
/// (as `parse::parse`).
#[inline(always)]
pub fn parse<C: Ctx>(ctx: &C) -> Result<Packet6, (u32, bool)> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, IP6_OFF).ok_or((reason::DROP_TRUNCATED_IP, true))?;
    let ip = unsafe { &*ip };
    // The version: the high nibble of the first byte (the low byte of the native load).
    if (ip.vtc & 0xf0) != 0x60 {
        return Err((reason::DROP_BAD_IHL, true));
    }
    let plen = u16::from_be(ip.payload_len);
    if plen == 0 {
        // A jumbogram (hop-by-hop option): left to the stack.
        return Err((reason::PASS_IPV6_EXT, false));
    }
    let frame_l3 = ctx.frame_len().saturating_sub(ETH_LEN);
    if IP6_LEN + plen as usize > frame_l3 {
        return Err((reason::DROP_BAD_TOTAL_LEN, true));
    }
    let mut nh = ip.nexthdr;
    let mut off = L4_OFF6;
    let mut i = 0;
    while i < IPV6_MAX_EXT {
        if nh == proto::TCP || nh == proto::UDP {
            break;
        }
        if nh == NH_FRAGMENT {
            return Err((reason::PASS_FRAGMENT, false));
        }
        if nh != NH_HOP && nh != NH_DEST && nh != NH_ROUTING {
            return Err((reason::PASS_NOT_TCP_UDP, false));
        }
        let h: *const [u8; 4] =
            ptr_at(ctx, off & OFF_MASK).ok_or((reason::DROP_TRUNCATED_IP, true))?;
        let h = unsafe { &*h };
        // Segments left: the destination is not the final one yet.
        if nh == NH_ROUTING && h[3] != 0 {
            return Err((reason::PASS_IPV6_EXT, false));
        }
        nh = h[0];
        off += (h[1] as usize + 1) * 8;
        if off > L4_OFF6 + IPV6_MAX_EXT_BYTES {
            return Err((reason::PASS_IPV6_EXT, false));
        }
        i += 1;
    }
    if nh != proto::TCP && nh != proto::UDP {
        return Err(if nh == NH_HOP || nh == NH_DEST || nh == NH_ROUTING {
            (reason::PASS_IPV6_EXT, false)
        } else if nh == NH_FRAGMENT {
            (reason::PASS_FRAGMENT, false)
        } else {
            (reason::PASS_NOT_TCP_UDP, false)
        });
    }
    let off = off & OFF_MASK;
    let ext = off - L4_OFF6;
    if ext > plen as usize {
        return Err((reason::DROP_BAD_TOTAL_LEN, true));
    }
    let l4_len = plen - ext as u16;
    let mut p = Packet6 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        proto: nh,
        flags: 0,
        hop: ip.hop,
        payload_len: plen,
        l4_off: off,
        l4_len,
        l4_csum: 0,
        csum: L4Csum::Full,
    };
    if nh == proto::TCP {
        let t: *const TcpHdr = ptr_at(ctx, off).ok_or((reason::DROP_TRUNCATED_L4, true))?;
        let t = unsafe { &*t };
        let doff = (t.doff >> 4) as u16 * 4;
        if doff < 20 || l4_len < doff {
            return Err((reason::DROP_TRUNCATED_L4, true));
        }
        p.sport = t.sport;
        p.dport = t.dport;
        p.flags = t.flags;
        p.l4_csum = off + 16;
    } else {
        let u: *const UdpHdr = ptr_at(ctx, off).ok_or((reason::DROP_TRUNCATED_L4, true))?;
        if l4_len < 8 {
            return Err((reason::DROP_TRUNCATED_L4, true));
        }
        let u = unsafe { &*u };
        p.sport = u.sport;
        p.dport = u.dport;
        p.l4_csum = off + 6;
    }
    Ok(p)
}

/// The seed of an IPv6 packet: the folded pseudo-header sum (addresses,
/// upper-layer length, next header), as the kernel writes it into the check
/// field of a CHECKSUM_PARTIAL packet (`~tcp_v6_check(len, saddr, daddr, 0)`).
#[inline(always)]
pub fn pseudo_sum(p: &Packet6) -> u16 {
    let mut s = (p.proto as u16).to_be() as u64 + p.l4_len.to_be() as u64;
    let mut i = 0;
    while i < 4 {
        s += (p.saddr[i] & 0xffff) as u64
            + (p.saddr[i] >> 16) as u64
            + (p.daddr[i] & 0xffff) as u64
            + (p.daddr[i] >> 16) as u64;
        i += 1;
    }
    nat::fold(s)
}

/// What the L4 check field holds, from the bytes alone (XDP; the IPv4
/// rules of `nat::classify`, except that a seed-valued field is not
/// verified: see the module docs).
#[inline(always)]
pub fn classify<C: Ctx>(ctx: &C, p: &Packet6) -> L4Csum {
    let c: *const u16 = match ptr_at(ctx, p.l4_csum & OFF_MASK) {
        Some(c) => c,
        None => return L4Csum::Full,
    };
    let c = unsafe { *c };
    if p.proto == proto::UDP && c == 0 {
        L4Csum::None
    } else if c != pseudo_sum(p) {
        L4Csum::Full
    } else {
        L4Csum::SeedUnverified
    }
}

/// Rewrites the address at `off` from `old` to `new`, word by word (only
/// the words that differ), fixing the L4 checksum.
#[inline(always)]
pub(crate) fn rewrite_addr<C: Ctx>(
    ctx: &mut C,
    off: usize,
    old: &[u32; 4],
    new: &[u32; 4],
    p: &Packet6,
    k: L4Csum,
) -> Option<()> {
    let udp = p.proto == proto::UDP;
    let mut i = 0;
    while i < 4 {
        if old[i] != new[i] {
            ctx.rewrite_word6(off + 4 * i, old[i], new[i], p.l4_csum & OFF_MASK, k, udp)?;
        }
        i += 1;
    }
    Some(())
}

/// Client -> VIP becomes client -> backend `ip:port`. Sets `p.csum`.
#[inline(always)]
fn dnat<C: Ctx>(ctx: &mut C, p: &mut Packet6, ip: &[u32; 4], port: u16) -> Option<()> {
    let k = ctx.l4_csum_kind6(p);
    p.csum = k;
    rewrite_addr(ctx, IP6_OFF + 24, &p.daddr, ip, p, k)?;
    let udp = p.proto == proto::UDP;
    let l4 = p.l4_off & OFF_MASK;
    ctx.rewrite_port(l4 + 2, p.dport, port, p.l4_csum & OFF_MASK, k, udp)?;
    p.daddr = *ip;
    p.dport = port;
    Some(())
}

/// Backend -> client becomes VIP `ip:port` -> client. Sets `p.csum`.
#[inline(always)]
fn snat<C: Ctx>(ctx: &mut C, p: &mut Packet6, ip: &[u32; 4], port: u16) -> Option<()> {
    let k = ctx.l4_csum_kind6(p);
    p.csum = k;
    rewrite_addr(ctx, IP6_OFF + 8, &p.saddr, ip, p, k)?;
    let udp = p.proto == proto::UDP;
    let l4 = p.l4_off & OFF_MASK;
    ctx.rewrite_port(l4, p.sport, port, p.l4_csum & OFF_MASK, k, udp)?;
    p.saddr = *ip;
    p.sport = port;
    Some(())
}

/// Writes the flow key `src:sport -> dst:dport` to `k`.
#[inline(always)]
pub(crate) fn set_key(k: *mut FlowKey6, src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) {
    let w = k as *mut u64;
    // SAFETY: FlowKey6 is repr(C), 40 bytes, 8-aligned in the scratch map
    // value (little endian: the ports and protocol are the last word).
    unsafe {
        *w = src[0] as u64 | (src[1] as u64) << 32;
        *w.add(1) = src[2] as u64 | (src[3] as u64) << 32;
        *w.add(2) = dst[0] as u64 | (dst[1] as u64) << 32;
        *w.add(3) = dst[2] as u64 | (dst[3] as u64) << 32;
        *w.add(4) = sport as u64 | (dport as u64) << 16 | (proto as u64) << 32;
    }
}

#[inline(always)]
pub(crate) fn same_addr(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

#[inline(always)]
fn same_key(a: *const FlowKey6, b: *const FlowKey6) -> bool {
    let (a, b) = (a as *const u64, b as *const u64);
    // SAFETY: two 40-byte keys, compared as five words.
    unsafe {
        *a == *b
            && *a.add(1) == *b.add(1)
            && *a.add(2) == *b.add(2)
            && *a.add(3) == *b.add(3)
            && *a.add(4) == *b.add(4)
    }
}

/// Writes a conntrack value (the IPv4 layout, `nat_ip` 0, no route yet; no
/// flags, client port or `snat_ip6`) to `out`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn set_ct(
    out: *mut CtValue6,
    nat_ip6: &[u32; 4],
    nat_port: u16,
    dir: u8,
    svc_id: u32,
    backend_id: u32,
    state: u32,
    now: u64,
) {
    let w = out as *mut u64;
    // SAFETY: CtValue6 is repr(C), 96 bytes without implicit padding,
    // 8-aligned in the scratch map value (little endian).
    unsafe {
        *w = (nat_port as u64) << 32 | (dir as u64) << 48;
        *w.add(1) = svc_id as u64 | (backend_id as u64) << 32;
        *w.add(2) = state as u64;
        *w.add(3) = now;
        *w.add(4) = now;
        *w.add(5) = now;
        // fib_ifindex 0: no route.
        *w.add(6) = now << 32;
        *w.add(7) = now;
        *w.add(8) = nat_ip6[0] as u64 | (nat_ip6[1] as u64) << 32;
        *w.add(9) = nat_ip6[2] as u64 | (nat_ip6[3] as u64) << 32;
        *w.add(10) = 0;
        *w.add(11) = 0;
    }
}

const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// Whether the reverse entry at `s.rev` belongs to a live flow other than
/// `s.key` (as `conntrack::held_by_other`): the forward key it names (a
/// SNATed flow's client is its `snat_ip6`, a rewritten port its
/// `client_port`) holds a forward entry that points back at `s.rev`. Uses
/// `s.other`.
#[inline(always)]
fn held_by_other(s: *mut Scratch6) -> bool {
    let s = unsafe { &mut *s };
    let v = match CONNTRACK6.get_ptr_mut(&s.rev) {
        Some(v) => v,
        None => return false,
    };
    let v = unsafe { &*v };
    if v.ct.dir != ct_dir::REVERSE {
        return true;
    }
    let cport = if v.ct.client_port != 0 {
        v.ct.client_port
    } else {
        s.rev.dst_port
    };
    let client = if v.ct.flags & ct_flags::SNAT != 0 {
        &v.snat_ip6
    } else {
        &s.rev.dst_ip
    };
    set_key(
        &mut s.other,
        client,
        &v.nat_ip6,
        cport,
        v.ct.nat_port,
        s.rev.proto,
    );
    if same_key(&s.other, &s.key) {
        return false;
    }
    match CONNTRACK6.get_ptr_mut(&s.other) {
        Some(f) => {
            let f = unsafe { &*f };
            // The source port the backend sees: rewritten, or the client's.
            let seen = if f.ct.client_port != 0 {
                f.ct.client_port
            } else {
                s.other.src_port
            };
            f.ct.dir == ct_dir::FORWARD
                && same_addr(&f.nat_ip6, &s.rev.src_ip)
                && f.ct.nat_port == s.rev.src_port
                && seen == s.rev.dst_port
        }
        None => false,
    }
}

/// Writes the reverse entry `s.ct` at `s.rev` unless another live flow
/// holds that key (`BPF_NOEXIST` first: the common case costs one update;
/// a stale entry is taken over). `true`: written.
#[inline(always)]
pub(crate) fn claim(s: *mut Scratch6) -> bool {
    let sc = unsafe { &*s };
    match CONNTRACK6.insert(&sc.rev, &sc.ct, BPF_NOEXIST) {
        Ok(()) => true,
        Err(e) if e == -EEXIST => {
            if held_by_other(s) {
                return false;
            }
            let sc = unsafe { &*s };
            CONNTRACK6.insert(&sc.rev, &sc.ct, BPF_ANY).is_ok()
        }
        Err(_) => false,
    }
}

/// The state of a new flow's forward entry, from its first packet.
#[inline(always)]
fn new_state(p: &Packet6) -> u32 {
    if p.proto == proto::UDP {
        ct_state::UDP
    } else if p.flags & TCP_SYN != 0 && p.flags & TCP_ACK == 0 {
        ct_state::SYN
    } else {
        ct_state::ESTABLISHED
    }
}

/// Writes the reverse, then the forward entry of the new flow `s.key`. A
/// reverse tuple that another live flow holds gets another client port
/// (`snat6::rewrite_port`, counted `ct_port_rewrite`), kept in both
/// entries' `client_port`. `None`: no port of the range was free (nothing
/// written). `Some(ok)`: written, `ok` when both inserts succeeded.
#[inline(always)]
fn create(
    s: *mut Scratch6,
    p: &Packet6,
    svc_id: u32,
    backend_id: u32,
    ip: &[u32; 4],
    port: u16,
    now: u64,
) -> Option<bool> {
    let state = new_state(p);
    let sc = unsafe { &mut *s };
    set_key(&mut sc.rev, ip, &p.saddr, port, p.sport, p.proto);
    set_ct(
        &mut sc.ct,
        &p.daddr,
        p.dport,
        ct_dir::REVERSE,
        svc_id,
        backend_id,
        0,
        now,
    );
    let mut sport = 0u16;
    let rev_ok = match CONNTRACK6.insert(&sc.rev, &sc.ct, BPF_NOEXIST) {
        Ok(()) => true,
        Err(e) if e == -EEXIST => {
            if held_by_other(s) {
                sport = crate::snat6::rewrite_port(s);
                if sport == 0 {
                    return None;
                }
                stats::reason(reason::CT_PORT_REWRITE);
                true
            } else {
                let sc = unsafe { &*s };
                CONNTRACK6.insert(&sc.rev, &sc.ct, BPF_ANY).is_ok()
            }
        }
        Err(_) => false,
    };
    let sc = unsafe { &mut *s };
    set_ct(
        &mut sc.ct,
        ip,
        port,
        ct_dir::FORWARD,
        svc_id,
        backend_id,
        state,
        now,
    );
    sc.ct.ct.client_port = sport;
    let fwd_ok = CONNTRACK6.insert(&sc.key, &sc.ct, BPF_ANY).is_ok();
    if fwd_ok {
        stats::conn_open(backend_id);
    }
    Some(rev_ok && fwd_ok)
}

/// The IPv6 packet walk (the IPv4 one is `main::process`).
#[inline(always)]
fn process<C: Ctx, S: ProgramSet>(ctx: &mut C) -> Verdict {
    let mut p = match parse(ctx) {
        Ok(p) => p,
        Err((r, drop)) => {
            stats::reason(r);
            return if drop { Verdict::Drop } else { Verdict::Pass };
        }
    };
    let Some(s) = SCRATCH6.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    let now = S::now();
    let bytes = p.payload_len as u64 + L4_OFF6 as u64;
    set_key(
        unsafe { &raw mut (*s).key },
        &p.saddr,
        &p.daddr,
        p.sport,
        p.dport,
        p.proto,
    );
    let tcp = p.proto == proto::TCP;

    if let Some(v) = CONNTRACK6.get_ptr_mut(unsafe { &(*s).key }) {
        let ct = unsafe { &raw mut (*v).ct };
        let (dir, svc_id, backend_id, nat_port) =
            unsafe { ((*ct).dir, (*ct).svc_id, (*ct).backend_id, (*ct).nat_port) };
        let nat_ip = unsafe { (*v).nat_ip6 };
        if dir == ct_dir::REVERSE {
            conntrack::touch(ct, now);
            if tcp && p.flags & (TCP_FIN | TCP_RST | TCP_SYN) != 0 {
                let cp = unsafe { (*ct).client_port };
                let cport = if cp != 0 { cp } else { p.dport };
                // A SNATed flow's client is not the reply's destination.
                let client = if unsafe { (*ct).flags } & ct_flags::SNAT != 0 {
                    unsafe { &(*v).snat_ip6 }
                } else {
                    &p.daddr
                };
                let fk = unsafe { &raw mut (*s).other };
                set_key(fk, client, &nat_ip, cport, nat_port, p.proto);
                if let Some(f) = CONNTRACK6.get_ptr_mut(unsafe { &*fk }) {
                    conntrack::tcp_state::<S>(unsafe { &raw mut (*f).ct }, p.flags, false);
                }
            }
            stats::traffic(svc_id, backend_id, bytes, false);
            if snat(ctx, &mut p, &nat_ip, nat_port).is_none()
                || crate::snat6::destination(ctx, &mut p, v).is_none()
            {
                stats::reason(reason::DROP_TRUNCATED_L4);
                return Verdict::Drop;
            }
            stats::reason(reason::NAT_REVERSE);
            return forward(ctx, &p, v, now);
        }
        if !(tcp && conntrack::is_reopen(ct, p.flags)) {
            conntrack::touch(ct, now);
            if tcp {
                conntrack::tcp_state::<S>(ct, p.flags, true);
            }
            stats::traffic(svc_id, backend_id, bytes, false);
            if dnat(ctx, &mut p, &nat_ip, nat_port).is_none()
                || crate::snat6::source(ctx, &mut p, v).is_none()
            {
                stats::reason(reason::DROP_TRUNCATED_L4);
                return Verdict::Drop;
            }
            stats::reason(reason::NAT_FORWARD);
            let verdict = forward(ctx, &p, v, now);
            if unsafe { (*ct).flags } & ct_flags::SNAT != 0 && verdict == Verdict::Pass {
                return crate::snat6::unpassable(ctx, &p);
            }
            return verdict;
        }
    }

    // A new flow.
    let skey = ServiceKey6 {
        vip: p.daddr,
        port: p.dport,
        proto: p.proto,
        _pad: 0,
    };
    let svc = match unsafe { SERVICES6.get(&skey) } {
        Some(s) => *s,
        None => {
            stats::reason(reason::PASS_NO_SERVICE);
            return Verdict::Pass;
        }
    };
    // The selection sees the addresses folded (`fold6`), as userspace does.
    let folded = parse::Packet {
        saddr: fold6(&p.saddr),
        daddr: fold6(&p.daddr),
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        flags: p.flags,
        ttl: p.hop,
        tot_len: 0,
        l4_csum: 0,
        seq: 0,
        ack: 0,
        payload_len: 0,
        csum: L4Csum::Full,
        frag: parse::FRAG_NONE,
        ip_id: 0,
        wrote_reverse: false,
    };
    let picked = match select::pick::<S>(&svc, &folded, now) {
        select::Pick::Backend(id) => Some(id),
        select::Pick::None => None,
        select::Pick::Full => {
            // As a service without backends here: dropped, counted apart.
            stats::svc_drop(svc.id);
            stats::reason(reason::DROP_BACKENDS_FULL);
            return Verdict::Drop;
        }
    };
    let picked = picked
        .and_then(|id| select::backend(id).map(|b| (id, b.port, b.flags)))
        .and_then(|(id, port, fl)| BACKENDS6.get(id).map(|a| (id, port, fl, *a)));
    let (id, port, bflags, ip) = match picked {
        Some(x) => x,
        None => {
            stats::svc_drop(svc.id);
            if svc.table_len != 0 {
                stats::reason(reason::DROP_BAD_TABLE);
                return Verdict::Drop;
            }
            return crate::reject6::no_backend(ctx, &p, s);
        }
    };
    // A `Cluster` front end's backend on another node, or the client
    // itself (hairpin): SNATed too (`snat6`).
    let masq = crate::snat6::new_flags(bflags, &ip, &p.saddr);
    if masq != 0 {
        set_key(
            unsafe { &raw mut (*s).rev },
            &ip,
            &ip,
            port,
            0,
            p.proto,
        );
        crate::snat6::reverse_value(s, masq, svc.id, id, now);
        unsafe { (*s).state = new_state(&p) };
        if crate::snat6::create(s) == 0 {
            stats::svc_drop(svc.id);
            stats::reason(reason::DROP_SNAT_EXHAUSTED);
            return Verdict::Drop;
        }
        stats::reason(if masq & ct_flags::HAIRPIN != 0 {
            reason::CT_HAIRPIN
        } else {
            reason::CT_SNAT
        });
    } else {
        match create(s, &p, svc.id, id, &ip, port, now) {
            Some(true) => {}
            Some(false) => stats::reason(reason::DROP_CT_INSERT),
            None => {
                stats::svc_drop(svc.id);
                stats::reason(reason::DROP_PORTS_EXHAUSTED);
                return Verdict::Drop;
            }
        }
    }
    let entry = CONNTRACK6.get_ptr_mut(unsafe { &(*s).key });
    if let Some(v) = entry {
        // A flow seen first at its FIN or RST closes at once.
        if tcp && p.flags & (TCP_FIN | TCP_RST) != 0 {
            conntrack::tcp_state::<S>(unsafe { &raw mut (*v).ct }, p.flags, true);
        }
    }
    stats::traffic(svc.id, id, bytes, true);
    if dnat(ctx, &mut p, &ip, port).is_none() {
        stats::reason(reason::DROP_TRUNCATED_L4);
        return Verdict::Drop;
    }
    if masq != 0 {
        // The source from the entry just written (its port, its address).
        let Some(v) = entry else {
            return Verdict::Drop;
        };
        if crate::snat6::source(ctx, &mut p, v).is_none() {
            stats::reason(reason::DROP_TRUNCATED_L4);
            return Verdict::Drop;
        }
        stats::reason(reason::NAT_FORWARD);
        let verdict = forward(ctx, &p, v, now);
        if verdict == Verdict::Pass {
            return crate::snat6::unpassable(ctx, &p);
        }
        return verdict;
    }
    match entry {
        Some(v) => {
            // A rewritten client port (a reverse-tuple collision).
            if crate::snat6::source(ctx, &mut p, v).is_none() {
                stats::reason(reason::DROP_TRUNCATED_L4);
                return Verdict::Drop;
            }
            stats::reason(reason::NAT_FORWARD);
            forward(ctx, &p, v, now)
        }
        None => {
            stats::reason(reason::NAT_FORWARD);
            forward_seed_or_pass(&p)
        }
    }
}

#[inline(always)]
fn forward_seed_or_pass(p: &Packet6) -> Verdict {
    if p.csum.is_seed() {
        stats::reason(p.csum.pass_reason());
    }
    Verdict::Pass
}

#[inline(always)]
fn redirect<C: Ctx>(ctx: &mut C, ifindex: u32, mac: &[u8; 12]) -> Verdict {
    if !ctx.can_redirect(ifindex) {
        stats::reason(reason::PASS_XDP_TARGET);
        return Verdict::Pass;
    }
    // SAFETY: both halves are 6 bytes inside `mac`.
    let (dmac, smac) = unsafe {
        (
            &*(mac.as_ptr() as *const [u8; 6]),
            &*(mac.as_ptr().add(6) as *const [u8; 6]),
        )
    };
    if ctx.route_rewrite6(IP6_OFF, smac, dmac).is_none() {
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    }
    stats::reason(reason::FWD_REDIRECT);
    Verdict::Redirect(ifindex)
}


/// Forwards a translated packet as `fwd::forward` does for IPv4: a seed to
/// the stack; else the flow's cached route while fresh, else
/// `bpf_fib_lookup` (AF_INET6), whose result (or failure) the flow's entry
/// keeps. No per-destination cache (`ROUTE_CACHE` is IPv4's) yet.
/// Not inlined: one copy for the walk's four callers, and its locals off
/// the walk's frame (the IPv6 programs' stack is near the verifier's 512).
#[inline(never)]
fn forward<C: Ctx>(ctx: &mut C, p: &Packet6, v: *mut CtValue6, now: u64) -> Verdict {
    if p.csum.is_seed() {
        stats::reason(p.csum.pass_reason());
        return Verdict::Pass;
    }
    // A hop limit that would expire is left to the stack (ICMPv6 time exceeded).
    if config(config_idx::FIB_REDIRECT) == 0 || p.hop <= 1 {
        return Verdict::Pass;
    }
    let e = unsafe { &mut (*v).ct };
    if crate::fwd::usable(e.fib_ifindex, e.fib_ns, now) {
        if e.fib_ifindex == FIB_FAILED {
            stats::reason(reason::PASS_FIB_CACHED);
            return Verdict::Pass;
        }
        let mac = e.fib_mac;
        return redirect(ctx, e.fib_ifindex, &mac);
    }
    let tot_len = p.payload_len.wrapping_add(IP6_LEN as u16);
    let addrs = fib::Addrs::V6 {
        src: p.saddr,
        dst: p.daddr,
    };
    let Some((rc, f)) = fib::lookup(ctx, p.proto, p.sport, p.dport, tot_len, addrs) else {
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    };
    e.fib_ns = now;
    if rc != fib::RET_SUCCESS {
        // Too large for the egress MTU: this packet's failure (not kept).
        e.fib_ifindex = if rc == fib::RET_FRAG_NEEDED {
            0
        } else {
            FIB_FAILED
        };
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    }
    let mut mac = [0u8; 12];
    mac[..6].copy_from_slice(&f.dmac);
    mac[6..].copy_from_slice(&f.smac);
    e.fib_mac = mac;
    e.fib_ifindex = f.ifindex;
    redirect(ctx, f.ifindex, &mac)
}
