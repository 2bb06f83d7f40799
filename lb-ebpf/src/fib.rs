//! `bpf_fib_lookup` for the four places that route a packet themselves: an
//! IPv4 flow (`fwd`), an IPv6 flow (`v6::forward`), and a SNATed packet the
//! stack must not see (`snat::unpassable`, `snat6::unpassable`). Its 64
//! bytes of parameters live in the per-CPU `FIB_SCRATCH`, off the stack.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, helpers::bpf_fib_lookup};
use lb_common::reason;

use crate::{
    ctx::{Ctx, Verdict},
    maps::FIB_SCRATCH,
    stats,
};

pub const RET_SUCCESS: i64 = 0;
/// No neighbour entry for the next hop yet (`bpf_redirect_neigh` resolves it).
pub const RET_NO_NEIGH: i64 = 7;
/// The packet is larger than the egress MTU: a failure of this packet, not
/// of the destination.
pub const RET_FRAG_NEEDED: i64 = 8;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

const _: () = assert!(core::mem::size_of::<FibParams>() == 64);

/// The addresses of a lookup (as on the wire).
pub enum Addrs {
    V4 { src: u32, dst: u32 },
    V6 { src: [u32; 4], dst: [u32; 4] },
}

/// One lookup from the packet's ingress interface: its return code and the
/// parameters as the kernel left them (egress `ifindex`, `dmac`, `smac`).
/// `None` only if the scratch is missing.
#[inline(always)]
pub fn lookup<C: Ctx>(
    ctx: &mut C,
    proto: u8,
    sport: u16,
    dport: u16,
    tot_len: u16,
    addrs: Addrs,
) -> Option<(i64, &'static mut FibParams)> {
    let raw = FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the per-CPU scratch, 64 bytes, 8-aligned, this CPU's alone for
    // the packet; all-zero is a valid bpf_fib_lookup.
    unsafe { *raw = [0; 8] };
    let f = unsafe { &mut *(raw as *mut FibParams) };
    f.l4_protocol = proto;
    f.sport = sport;
    f.dport = dport;
    f.__bindgen_anon_1.tot_len = tot_len;
    f.ifindex = ctx.ifindex();
    match addrs {
        Addrs::V4 { src, dst } => {
            f.family = AF_INET;
            f.__bindgen_anon_3.ipv4_src = src;
            f.__bindgen_anon_4.ipv4_dst = dst;
        }
        Addrs::V6 { src, dst } => {
            f.family = AF_INET6;
            f.__bindgen_anon_3.ipv6_src = src;
            f.__bindgen_anon_4.ipv6_dst = dst;
        }
    }
    let rc = unsafe { bpf_fib_lookup(ctx.raw(), f, core::mem::size_of::<FibParams>() as i32, 0) };
    Some((rc, f))
}

/// A SNATed packet to its backend that the walk would hand to the stack: in
/// TC, its egress from a lookup (also when the next hop has no neighbour
/// entry yet) and `bpf_redirect_neigh`; else dropped (`drop_snat_unrouted`).
#[inline(always)]
pub fn unpassable<C: Ctx>(
    ctx: &mut C,
    proto: u8,
    sport: u16,
    dport: u16,
    tot_len: u16,
    addrs: Addrs,
) -> Verdict {
    if C::NEIGH
        && let Some((rc, f)) = lookup(ctx, proto, sport, dport, tot_len, addrs)
        && (rc == RET_SUCCESS || rc == RET_NO_NEIGH)
        && f.ifindex != 0
    {
        stats::reason(reason::FWD_REDIRECT_NEIGH);
        return Verdict::RedirectNeigh(f.ifindex);
    }
    stats::reason(reason::DROP_SNAT_UNROUTED);
    Verdict::Drop
}
