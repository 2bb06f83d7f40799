//! IPv6 SNAT, the twin of `snat` (IPv4) in the IPv6 walk (`v6`): a
//! `Cluster` front end's new flow to a backend on another node
//! (`backend_flags::SNAT`) leaves from the node's IPv6 address
//! (`CONFIG[SNAT_ADDR6..+4]`, the agent's `--snat-address6`), and a hairpin
//! flow (the backend chosen is the client itself) from the service loopback
//! `SERVICE_LOOPBACK_V6`; both with a port of the SNAT range
//! (`--snat-ports`, shared with IPv4), picked as IPv4 picks it: up to
//! `COLLISION_PROBES` candidates by the flow's hash (the folded addresses,
//! `fold6`), the first whose reverse key (backend -> source:port) no live
//! flow holds. None free, or no address: the packet is dropped
//! (`drop_snat_exhausted`).
//!
//! Entries (`CtValue6`), both written at the first packet:
//! - forward, at the client's key: `nat_*` the backend, `client_port` the
//!   SNAT port, `snat_ip6` the source address, `flags` SNAT (| HAIRPIN);
//! - reverse, at backend -> source:port: `nat_*` the front end,
//!   `client_port` the client's port, `snat_ip6` the client's address.
//!
//! Unlike IPv4, the forward entry keeps the source address: the reverse key
//! follows from it (GC pairs the two as any others), and a flow keeps its
//! address when the agent's changes.
//!
//! The reply is un-SNATed and un-DNATed in one pass ([`destination`] after
//! `v6::snat`). A SNATed packet to the backend never goes to the stack
//! ([`unpassable`]: TC `bpf_redirect_neigh`, XDP drops), as IPv4's.
//!
//! Kept apart from `v6` (and out of its inlined walk where it loops): the
//! IPv6 programs' stack is close to the verifier's 512 bytes.

use lb_common::{
    CtValue6, SERVICE_LOOPBACK_V6, backend_flags, collision_port, config_idx, ct_dir, ct_flags,
    flow_hash, fold6, limits, proto, reason,
};

use crate::{
    ctx::{Ctx, Verdict},
    fib,
    maps::{CONNTRACK6, config},
    v6::{self, IP6_LEN, IP6_OFF, Packet6, Scratch6},
    stats,
};

/// The `ct_flags` of a new flow to a backend with `BACKENDS` flags
/// `bflags` at `ip`, from `saddr`: SNAT for another node's backend of a
/// `Cluster` front end, SNAT | HAIRPIN when the backend is the client, else 0.
#[inline(always)]
pub fn new_flags(bflags: u8, ip: &[u32; 4], saddr: &[u32; 4]) -> u8 {
    if bflags & backend_flags::SNAT != 0 {
        ct_flags::SNAT
    } else if v6::same_addr(ip, saddr) {
        ct_flags::SNAT | ct_flags::HAIRPIN
    } else {
        0
    }
}

/// Writes the source address of a new flow with `flags` to `out`: the
/// service loopback for a hairpin flow, else the node's. `false`: none
/// (IPv6 SNAT to the node's address is off).
#[inline(always)]
fn source_addr(flags: u8, out: *mut [u32; 4]) -> bool {
    let a = if flags & ct_flags::HAIRPIN != 0 {
        SERVICE_LOOPBACK_V6
    } else {
        [
            config(config_idx::SNAT_ADDR6),
            config(config_idx::SNAT_ADDR6 + 1),
            config(config_idx::SNAT_ADDR6 + 2),
            config(config_idx::SNAT_ADDR6 + 3),
        ]
    };
    unsafe { *out = a };
    a[0] | a[1] | a[2] | a[3] != 0
}

/// Writes a SNATed new flow's entries: reverse first, at a free port of
/// the SNAT range, then forward. In the scratch: `key` the flow's key,
/// `rev` the backend (`src_ip`, `src_port`, `proto`), `ct` the reverse
/// value ([`reverse_value`]) and `state` the forward entry's TCP/UDP
/// state. Returns the SNAT port (network order); 0: no port free or no
/// address (nothing written). A failed forward insert is counted here
/// (`drop_ct_insert`); the packet still goes.
/// Not inlined, and everything in the scratch: the probe loop is verified
/// once, on a frame small enough for the walk's (chains <= 512 bytes).
#[inline(never)]
pub fn create(s: *mut Scratch6) -> u16 {
    let sc = unsafe { &mut *s };
    if !source_addr(sc.ct.ct.flags, &raw mut sc.rev.dst_ip) {
        return 0;
    }
    let sport = probe(s, config_idx::SNAT_PORT_MIN);
    if sport == 0 {
        return 0;
    }
    // The forward value: the reverse one turned around (ids, times and
    // the empty route stay).
    let sc = unsafe { &mut *s };
    sc.ct.ct.nat_port = sc.rev.src_port;
    sc.ct.ct.dir = ct_dir::FORWARD;
    sc.ct.ct.state = sc.state;
    sc.ct.ct.client_port = sport;
    sc.ct.nat_ip6 = sc.rev.src_ip;
    sc.ct.snat_ip6 = sc.rev.dst_ip;
    if CONNTRACK6.insert(&sc.key, &sc.ct, 0).is_ok() {
        stats::conn_open(sc.ct.ct.backend_id);
    } else {
        stats::reason(reason::DROP_CT_INSERT);
    }
    sport
}

/// The reverse value of a new SNATed flow `s.key` with `flags`, into
/// `s.ct`: to the front end, back to the client's ip:port.
#[inline(always)]
pub fn reverse_value(s: *mut Scratch6, flags: u8, svc_id: u32, backend_id: u32, now: u64) {
    let sc = unsafe { &mut *s };
    v6::set_ct(
        &mut sc.ct,
        &sc.key.dst_ip,
        sc.key.dst_port,
        ct_dir::REVERSE,
        svc_id,
        backend_id,
        0,
        now,
    );
    sc.ct.ct.flags = flags;
    sc.ct.ct.client_port = sc.key.src_port;
    sc.ct.snat_ip6 = sc.key.src_ip;
}

/// A new flow whose reverse key `s.rev` (backend -> client ip:port)
/// another live flow holds (one client ip:port through two front ends to
/// one backend): claims it at another client port of the collision range
/// (`--collision-ports`), as IPv4's `conntrack::rewrite_port`, for the
/// reverse value `s.ct` (its `client_port` set here to the client's own).
/// Returns the port (network order), 0 if none was free.
/// Not inlined, everything in the scratch (see [`create`]).
#[inline(never)]
pub fn rewrite_port(s: *mut Scratch6) -> u16 {
    unsafe { (*s).ct.ct.client_port = (*s).key.src_port };
    probe(s, config_idx::COLLISION_PORT_MIN)
}

/// Claims the reverse key `s.rev` (its destination port one candidate of
/// the range at `CONFIG[first_idx]`, its length at the next index, after
/// another) for the value `s.ct`; the port taken (network order), 0 if
/// none was free.
#[inline(always)]
fn probe(s: *mut Scratch6, first_idx: u32) -> u16 {
    let lo = config(first_idx);
    let n = config(first_idx + 1);
    if n == 0 || lo == 0 || lo > 65_535 || n > 65_536 - lo {
        return 0;
    }
    let sc = unsafe { &*s };
    let h = flow_hash(
        fold6(&sc.key.src_ip),
        fold6(&sc.key.dst_ip),
        sc.key.src_port,
        sc.key.dst_port,
        sc.key.proto,
    );
    let mut i = 0u32;
    while i < limits::COLLISION_PROBES {
        let cand = (collision_port(lo, n, h, i) as u16).to_be();
        unsafe { (*s).rev.dst_port = cand };
        if v6::claim(s) {
            return cand;
        }
        i += 1;
    }
    0
}

/// A forward packet of the flow of entry `v` (already DNATed, `p.csum`
/// set): its source port becomes the entry's `client_port` (a SNAT port, or
/// a collision rewrite) when set, and a SNATed flow's source address its
/// `snat_ip6`. `None`: the packet is too short.
#[inline(always)]
pub fn source<C: Ctx>(ctx: &mut C, p: &mut Packet6, v: *const CtValue6) -> Option<()> {
    let (port, flags) = unsafe { ((*v).ct.client_port, (*v).ct.flags) };
    let udp = p.proto == proto::UDP;
    if port != 0 {
        ctx.rewrite_port(
            p.l4_off & v6::OFF_MASK,
            p.sport,
            port,
            p.l4_csum & v6::OFF_MASK,
            p.csum,
            udp,
        )?;
        p.sport = port;
    }
    if flags & ct_flags::SNAT != 0 {
        let a = unsafe { &(*v).snat_ip6 };
        v6::rewrite_addr(ctx, IP6_OFF + 8, &p.saddr, a, p, p.csum)?;
        p.saddr = *a;
    }
    Some(())
}

/// A reply of the flow of reverse entry `v` (already un-DNATed by
/// `v6::snat`, `p.csum` set): its destination port goes back to the
/// client's own (`client_port`, when set), and a SNATed flow's destination
/// address to the client's (`snat_ip6`).
#[inline(always)]
pub fn destination<C: Ctx>(ctx: &mut C, p: &mut Packet6, v: *const CtValue6) -> Option<()> {
    let (port, flags) = unsafe { ((*v).ct.client_port, (*v).ct.flags) };
    let udp = p.proto == proto::UDP;
    if port != 0 {
        ctx.rewrite_port(
            (p.l4_off & v6::OFF_MASK) + 2,
            p.dport,
            port,
            p.l4_csum & v6::OFF_MASK,
            p.csum,
            udp,
        )?;
        p.dport = port;
    }
    if flags & ct_flags::SNAT != 0 {
        let a = unsafe { &(*v).snat_ip6 };
        v6::rewrite_addr(ctx, IP6_OFF + 24, &p.daddr, a, p, p.csum)?;
        p.daddr = *a;
    }
    Some(())
}

/// A SNATed packet to its backend that the walk would hand to the stack
/// (as `snat::unpassable`): in TC, its egress from `bpf_fib_lookup` (also
/// when the next hop has no neighbour entry yet) and `bpf_redirect_neigh`;
/// else dropped (`drop_snat_unrouted`).
/// Not inlined: off the common paths.
#[inline(never)]
pub fn unpassable<C: Ctx>(ctx: &mut C, p: &Packet6) -> Verdict {
    let tot_len = p.payload_len.wrapping_add(IP6_LEN as u16);
    let addrs = fib::Addrs::V6 {
        src: p.saddr,
        dst: p.daddr,
    };
    fib::unpassable(ctx, p.proto, p.sport, p.dport, tot_len, addrs)
}
