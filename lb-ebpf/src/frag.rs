//! IPv4 fragments, as Cilium handles them.
//!
//! A first fragment (offset 0, More Fragments set) carries the L4 header: it
//! is balanced by its ports like any packet (conntrack, DNAT or SNAT). Its
//! L4 checksum covers the whole datagram; the incremental update for the
//! new address and port is exact for it all the same (the changed words are
//! all in this fragment and the pseudo-header). [`record`] stores its ports
//! under (src, dst, proto, IP id) in `FRAGMENTS`.
//!
//! Every first TCP/UDP fragment is recorded, of a VIP flow or not, as Cilium
//! does: one call before the flow is looked up. Three calls (one per
//! translation) cost the program 16 bytes of stack that 5.10's verifier
//! does not have (512 bytes for the program and its calls, each frame
//! rounded up to 32).
//!
//! A later fragment (offset > 0) has no L4 header. [`later`] looks its
//! datagram up in `FRAGMENTS`, rebuilds the flow key from the ports stored
//! there and finds the flow's conntrack entry, forward (client -> VIP) or
//! reverse (backend -> client): it gets the same address rewrite as the
//! first fragment, the IP checksum only. Without an entry or a flow (it came
//! before its first fragment, its entry was evicted, or its datagram is not
//! a balanced flow's) it goes to the stack as before, counted as
//! `pass_fragment`.

use lb_common::{CtValue, FragKey, FragValue, FlowKey, ct_dir, ct_flags, reason};

use crate::{
    conntrack,
    ctx::{Ctx, Verdict},
    maps::FRAGMENTS,
    parse::{ETH_LEN, FRAG_FIRST, IP_OFF, Packet},
    stats,
};

/// A fragment key built as three 4-byte words: no `memset` for the padding.
#[inline(always)]
fn frag_key(src_ip: u32, dst_ip: u32, proto: u8, id: u16) -> FragKey {
    let w = [src_ip, dst_ip, id as u32 | (proto as u32) << 16];
    // SAFETY: FragKey is repr(C), 12 bytes, every bit pattern valid (little endian).
    unsafe { core::mem::transmute::<[u32; 3], FragKey>(w) }
}

/// For a first fragment: remembers its ports (`key` is its flow key as on
/// the wire, before any rewrite) for the later fragments of its datagram.
/// A datagram that reuses the IP id replaces the entry. Costs any other
/// packet one comparison.
#[inline(always)]
pub fn record(p: &Packet, key: &FlowKey) {
    if p.frag != FRAG_FIRST {
        return;
    }
    let k = frag_key(key.src_ip, key.dst_ip, key.proto, p.ip_id);
    let v = FragValue {
        src_port: key.src_port,
        dst_port: key.dst_port,
    };
    // An LRU insert evicts rather than fails; if it failed all the same, the
    // later fragments pass, counted as `pass_fragment`.
    let _ = FRAGMENTS.insert(&k, &v, 0);
}

/// The conntrack entry of a later fragment's flow, and the stored ports.
#[inline(always)]
fn find(p: &Packet) -> Option<(*mut CtValue, FragValue)> {
    let v = FRAGMENTS.get_ptr(&frag_key(p.saddr, p.daddr, p.proto, p.ip_id))?;
    let ports = unsafe { *v };
    let key = conntrack::flow_key(p.saddr, p.daddr, ports.src_port, ports.dst_port, p.proto);
    Some((conntrack::lookup(&key)?, ports))
}

/// A later fragment: the address rewrite of its first fragment, then the
/// same forwarding (with the flow's cached route).
#[inline(always)]
pub fn later<C: Ctx>(ctx: &mut C, p: &mut Packet, now: u64) -> Verdict {
    let Some((v, ports)) = find(p) else {
        stats::reason(reason::PASS_FRAGMENT);
        return Verdict::Pass;
    };
    let e = unsafe { &*v };
    let (dir, nat_ip, nat_port) = (e.dir, e.nat_ip, e.nat_port);
    let (svc_id, backend_id) = (e.svc_id, e.backend_id);
    let (masq, client, flags) = (e.flags & ct_flags::SNAT != 0, e.state, e.flags);
    conntrack::touch(v, now);
    let done = if dir == ct_dir::REVERSE {
        // Backend -> client becomes VIP -> client.
        let r = ctx.rewrite_ip(IP_OFF + 12, p.saddr, nat_ip, IP_OFF + 10);
        (p.saddr, p.sport, p.dport) = (nat_ip, nat_port, ports.dst_port);
        r
    } else {
        // Client -> VIP becomes client -> backend.
        let r = ctx.rewrite_ip(IP_OFF + 16, p.daddr, nat_ip, IP_OFF + 10);
        (p.daddr, p.sport, p.dport) = (nat_ip, ports.src_port, nat_port);
        r
    };
    // A SNATed flow's other address (`snat`).
    let done = done.and_then(|()| {
        if masq {
            crate::snat::fragment(ctx, p, dir != ct_dir::REVERSE, client, flags)
        } else {
            Some(())
        }
    });
    if done.is_none() {
        stats::reason(reason::DROP_TRUNCATED_IP);
        return Verdict::Drop;
    }
    stats::traffic(svc_id, backend_id, p.tot_len as u64 + ETH_LEN as u64, false);
    stats::reason(reason::NAT_FRAGMENT);
    crate::forward(ctx, p, Some(v), now)
}
