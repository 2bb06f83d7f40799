//! SNAT for front ends with `externalTrafficPolicy: Cluster` whose chosen
//! backend runs on another node (`backend_flags::SNAT`, set by the agent).
//!
//! A new flow client:cport -> front end fe:fport to backend b:bport leaves
//! as node:sport -> b:bport, where node is `CONFIG[SNAT_ADDR]` (the agent's
//! `--snat-address`) and sport a port of the SNAT range (`--snat-ports`),
//! picked as the collision ports are: the flow's hash gives up to
//! `COLLISION_PROBES` candidates ([`lb_common::collision_port`]), and the
//! first whose reverse key (b:bport -> node:sport) no live flow holds is
//! taken (`conntrack::claim`, which also takes over the stale entry of a
//! flow that is gone). None free: the packet is dropped
//! (`drop_snat_exhausted`).
//!
//! Both entries are written at once (never lazily: the reverse key cannot
//! be derived from the backend alone):
//! - forward, at the client's key: `nat_*` the backend, `client_port` the
//!   SNAT port, `flags` `ct_flags::SNAT` (the source address is the
//!   configured one);
//! - reverse, at b:bport -> node:sport: `nat_*` the front end, `client_port`
//!   the client's port, `state` the client's address, `flags` SNAT.
//!
//! The reply is un-SNATed and un-DNATed in one pass: the usual reverse NAT
//! (source back to fe:fport, destination port to cport), then the
//! destination address back to the client. Entries expire by the usual
//! rules (the agent's GC pairs them through the reverse entry); a port is
//! free again as soon as its flow's forward entry is gone.
//!
//! A SNATed packet to the backend must never reach the stack: its source is
//! a local address, which the stack's input route drops as a martian. One
//! the walk would hand to the stack (no neighbour entry for the next hop
//! yet, mostly) goes out with `bpf_redirect_neigh` in TC, which resolves
//! the neighbour ([`unpassable`]); XDP cannot, and drops it (counted): the
//! client retransmits, and the route is looked up again after
//! `FIB_FAIL_NS`.
//!
//! Hairpin: a new flow whose chosen backend is the client itself (a pod
//! reaching itself through its Service) is SNATed the same way, to the
//! service loopback address `SERVICE_LOOPBACK_V4` (169.254.42.1) instead
//! of the node's, with a port of the same range (`ct_flags::HAIRPIN` beside
//! `SNAT`; `ct_hairpin`). Without it the pod would get a packet from itself
//! to itself, and its answer would never pass rpclb. The pod's packet and
//! its reply both arrive on the node end of the pod's veth, and both leave
//! through that same interface back into the pod (the fib lookup's egress).

use lb_common::{
    CtValue, FlowKey, SERVICE_LOOPBACK_V4, config_idx, ct_dir, ct_flags, flow_hash, limits,
};

use crate::{
    conntrack::{self, Claim, Created, ct_value, flow_key},
    ctx::{Ctx, Verdict},
    fib,
    fwd::NewRoute,
    maps::{CONNTRACK, config},
    parse::{IP_OFF, Packet},
    stats,
};

/// The client address of the reverse entry `v` at `rev`: its key's
/// destination, but a SNATed flow's is the node's (the client is in
/// `state`).
#[inline(always)]
pub fn client_of_reverse(rev: &FlowKey, v: *const CtValue) -> u32 {
    unsafe {
        if (*v).flags & ct_flags::SNAT != 0 {
            (*v).state
        } else {
            rev.dst_ip
        }
    }
}

/// The node's SNAT address, 0 if SNAT is off.
#[inline(always)]
pub fn addr() -> u32 {
    config(config_idx::SNAT_ADDR)
}

/// The source address of a SNATed flow with entry flags `flags`: the
/// service loopback address for a hairpin flow, else the node's (0: off).
#[inline(always)]
pub fn source_addr(flags: u8) -> u32 {
    if flags & ct_flags::HAIRPIN != 0 {
        SERVICE_LOOPBACK_V4
    } else {
        addr()
    }
}

/// Finds a free SNAT port for the new flow `fwd` to backend `ip:port`
/// (network order), writes its reverse entry `rv` there (its flags say
/// which source address: [`source_addr`]), and returns the port (network
/// order); 0 if none of the candidates was free.
/// Not inlined: the probe loop is verified once.
#[inline(never)]
fn alloc_port(fwd: &FlowKey, ip_port: u64, rv: &CtValue) -> u16 {
    let node = source_addr(rv.flags);
    let lo = config(config_idx::SNAT_PORT_MIN);
    let n = config(config_idx::SNAT_PORT_COUNT);
    if node == 0 || n == 0 || lo == 0 || lo > 65_535 || n > 65_536 - lo {
        return 0;
    }
    let (ip, port) = (ip_port as u32, (ip_port >> 32) as u16);
    let h = flow_hash(fwd.src_ip, fwd.dst_ip, fwd.src_port, fwd.dst_port, fwd.proto);
    let mut i = 0u32;
    while i < limits::COLLISION_PROBES {
        let cand = (lb_common::collision_port(lo, n, h, i) as u16).to_be();
        let rev = flow_key(ip, node, port, cand, fwd.proto);
        if conntrack::claim(&rev, rv, fwd) == Claim::Written {
            return cand;
        }
        i += 1;
    }
    0
}

/// Writes a SNATed new flow's entries (reverse first, at a free port of the
/// SNAT range; then forward), as `conntrack::create` does for the others.
/// `flags`: `ct_flags::SNAT`, with `HAIRPIN` for a hairpin flow.
/// `Created::Flow::sport` is the SNAT port; `Exhausted`: no port was free
/// (nothing written).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn create(
    fwd: &FlowKey,
    flags: u8,
    state: u32,
    svc_id: u32,
    backend_id: u32,
    ip: u32,
    port: u16,
    now: u64,
    route: &NewRoute,
) -> Created {
    let mut rv = ct_value(
        fwd.dst_ip,
        fwd.dst_port,
        ct_dir::REVERSE,
        svc_id,
        backend_id,
        fwd.src_ip,
        fwd.src_port,
        now,
        [now, now << 32, now],
    );
    rv.flags = flags;
    let sport = alloc_port(fwd, ip as u64 | (port as u64) << 32, &rv);
    if sport == 0 {
        return Created::Exhausted;
    }
    let mut fv = ct_value(
        ip,
        port,
        ct_dir::FORWARD,
        svc_id,
        backend_id,
        state,
        sport,
        now,
        route.entry_words(now),
    );
    fv.flags = flags;
    let ok = CONNTRACK.insert(fwd, &fv, 0).is_ok();
    if ok {
        stats::conn_open(backend_id);
    }
    Created::Flow { sport, ok }
}

/// A SNATed flow's packet to its backend (already DNATed, its source port
/// the SNAT port): the source address becomes the node's, or the service
/// loopback address for a hairpin flow (entry flags `flags`). `None`: the
/// packet is too short (or SNAT was turned off meanwhile: address 0).
#[inline(always)]
pub fn source<C: Ctx>(ctx: &mut C, p: &mut Packet, flags: u8) -> Option<()> {
    let node = source_addr(flags);
    if node == 0 {
        return None;
    }
    ctx.rewrite_addr(
        IP_OFF + 12,
        p.saddr,
        node,
        IP_OFF + 10,
        p.l4_csum,
        p.csum,
        p.is_udp(),
    )?;
    p.saddr = node;
    Some(())
}

/// A SNATed flow's reply (already un-DNATed: from the front end, to the
/// client's port): the destination goes back from the node's address to the
/// client's `client`.
#[inline(always)]
pub fn destination<C: Ctx>(ctx: &mut C, p: &mut Packet, client: u32) -> Option<()> {
    ctx.rewrite_addr(
        IP_OFF + 16,
        p.daddr,
        client,
        IP_OFF + 10,
        p.l4_csum,
        p.csum,
        p.is_udp(),
    )?;
    p.daddr = client;
    Some(())
}

/// A later fragment of a SNATed flow (no L4 header): the other address's
/// rewrite, IP checksum only. `forward`: a fragment from the client (source
/// to the flow's SNAT address, [`source_addr`] of `flags`), else one of the
/// reply (destination to `client`).
#[inline(always)]
pub fn fragment<C: Ctx>(
    ctx: &mut C,
    p: &mut Packet,
    forward: bool,
    client: u32,
    flags: u8,
) -> Option<()> {
    if forward {
        let node = source_addr(flags);
        if node == 0 {
            return None;
        }
        ctx.rewrite_ip(IP_OFF + 12, p.saddr, node, IP_OFF + 10)?;
        p.saddr = node;
    } else {
        ctx.rewrite_ip(IP_OFF + 16, p.daddr, client, IP_OFF + 10)?;
        p.daddr = client;
    }
    Some(())
}

/// A SNATed packet to its backend that the walk would hand to the stack:
/// in TC, its egress interface from `bpf_fib_lookup` (also when the next
/// hop has no neighbour entry yet) and `bpf_redirect_neigh`; else dropped.
/// Not inlined: off the common paths.
#[inline(never)]
pub fn unpassable<C: Ctx>(ctx: &mut C, p: &Packet) -> Verdict {
    let addrs = fib::Addrs::V4 {
        src: p.saddr,
        dst: p.daddr,
    };
    fib::unpassable(ctx, p.proto, p.sport, p.dport, p.tot_len, addrs)
}
