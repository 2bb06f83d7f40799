//! Forwarding after the rewrite: `bpf_fib_lookup` + redirect, or the stack.
//!
//! Routes are cached at two levels, both kept for `FIB_CACHE_NS` (1 s) from
//! the lookup, a failed lookup for `FIB_FAIL_NS`:
//! - in the flow's conntrack entry, per direction (`CtValue::fib_*`);
//! - per destination address and ingress interface (`ROUTE_CACHE`, per
//!   CPU): a flow without a fresh route of its own (its first packet in each
//!   direction, or once a second) takes the destination's from here, and
//!   only a miss calls `bpf_fib_lookup`, whose result fills both.
//!
//! A flow's entry keeps the time of the lookup it copies, so no route is
//! used more than `FIB_CACHE_NS` after it was looked up: a route or
//! neighbour change reaches every flow, new or old, within that second.

use lb_common::{
    CtValue, FIB_CACHE_NS, FIB_FAIL_NS, FIB_FAILED, ROUTE_CACHE_SLOTS, RouteCacheEntry, config_idx,
    reason,
};

use crate::{
    ctx::{Ctx, Verdict},
    fib,
    maps::{ROUTE_CACHE, config},
    parse::{IP_OFF, Packet},
    stats,
};


const ROUTE_BITS: u32 = ROUTE_CACHE_SLOTS.trailing_zeros();
const _: () = assert!(ROUTE_CACHE_SLOTS.is_power_of_two());

/// Whether a route taken at `ns` (egress `ifindex`, `FIB_FAILED` for a
/// failed lookup, 0 for none) may still be used at `now`.
#[inline(always)]
pub(crate) fn usable(ifindex: u32, ns: u64, now: u64) -> bool {
    let age = now.wrapping_sub(ns);
    if ifindex == FIB_FAILED {
        age < FIB_FAIL_NS
    } else {
        ifindex != 0 && age < FIB_CACHE_NS
    }
}

/// The redirect to `ifindex` with the MACs `mac` (destination, then source).
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
    if ctx.route_rewrite(IP_OFF, smac, dmac).is_none() {
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    }
    stats::reason(reason::FWD_REDIRECT);
    Verdict::Redirect(ifindex)
}

/// Forwards a translated packet. `ct` is the flow's conntrack entry for this
/// direction: its cached route is used while fresh (`FIB_CACHE_NS`); else
/// the destination's from `ROUTE_CACHE`, else `bpf_fib_lookup`, and the
/// flow's entry takes what was used. A failed lookup is remembered for
/// `FIB_FAIL_NS` (`FIB_FAILED`): the destination's packets go to the stack
/// meanwhile (`pass_fib_cached`).
#[inline(always)]
pub fn forward<C: Ctx>(ctx: &mut C, p: &Packet, ct: Option<*mut CtValue>, now: u64) -> Verdict {
    // A TTL that would expire is left to the stack, which answers with ICMP.
    if config(config_idx::FIB_REDIRECT) == 0 || p.ttl <= 1 {
        return Verdict::Pass;
    }
    if let Some(v) = ct {
        let e = unsafe { &*v };
        if usable(e.fib_ifindex, e.fib_ns, now) {
            if e.fib_ifindex == FIB_FAILED {
                // The last lookup failed: the stack gets the flow for a while.
                stats::reason(reason::PASS_FIB_CACHED);
                return Verdict::Pass;
            }
            return redirect(ctx, e.fib_ifindex, &e.fib_mac);
        }
    }
    let Some((r, rc)) = route(ctx, p, p.daddr, p.dport, now) else {
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    };
    if rc != fib::RET_SUCCESS {
        if let Some(v) = ct {
            // Remembered for FIB_FAIL_NS: a flow without a route does
            // not repeat the lookup on every packet.
            unsafe {
                (*v).fib_ns = r.ns;
                (*v).fib_ifindex = FIB_FAILED;
            }
        }
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    }
    if let Some(v) = ct {
        // The flow's entry takes the route with the time of its lookup
        // (`fib_ns`, `fib_ifindex`, `fib_mac`: the layout of the slot's
        // last three words, lb-common asserts it). Concurrent writers store
        // the same result, so a torn write is harmless.
        unsafe {
            let src = r as *const RouteCacheEntry as *const u64;
            let dst = v as *mut u64;
            *dst.add(5) = *src.add(1);
            *dst.add(6) = *src.add(2);
            *dst.add(7) = *src.add(3);
        }
    }
    if r.ifindex == FIB_FAILED {
        stats::reason(reason::PASS_FIB_CACHED);
        return Verdict::Pass;
    }
    redirect(ctx, r.ifindex, &r.mac)
}

/// The `ROUTE_CACHE` slot of destination `daddr` (from this packet's
/// ingress interface), filled by `bpf_fib_lookup` unless it holds a usable
/// route; with the lookup's result (`fib::RET_SUCCESS` for a cached
/// route or failure). `None`: no slot (never for an array index in range).
#[inline(always)]
fn route<C: Ctx>(
    ctx: &mut C,
    p: &Packet,
    daddr: u32,
    dport: u16,
    now: u64,
) -> Option<(&'static mut RouteCacheEntry, i64)> {
    let key = daddr as u64 | (ctx.ifindex() as u64) << 32;
    let slot = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - ROUTE_BITS)) as u32;
    let r = ROUTE_CACHE.get_ptr_mut(slot)?;
    // SAFETY: this CPU's slot; the program is not re-entered on one CPU
    // while it runs.
    let r = unsafe { &mut *r };
    if r.key == key && usable(r.ifindex, r.ns, now) {
        return Some((r, fib::RET_SUCCESS));
    }
    // The slot is this destination's from here on (fewer values live
    // across the helper call: the stack is near its limit).
    r.key = key;
    r.ns = now;
    let rc = lookup(ctx, p, daddr, dport, r);
    if rc != fib::RET_SUCCESS {
        // Too large for the egress MTU: this packet's failure, not the
        // destination's (the slot is left empty).
        r.ifindex = if rc == fib::RET_FRAG_NEEDED {
            0
        } else {
            FIB_FAILED
        };
    }
    Some((r, rc))
}

/// A new flow's route, resolved before its conntrack entries are written:
/// the forward entry is created with it ([`NewRoute::entry_words`]) instead
/// of being looked up again to store it.
#[derive(Clone, Copy)]
pub struct NewRoute {
    /// The destination's `ROUTE_CACHE` slot; null: the stack forwards.
    r: *const RouteCacheEntry,
    /// This packet's lookup failed (`pass_fib`, not `pass_fib_cached`).
    failed: bool,
}

impl NewRoute {
    /// The entry's last three words (`fib_ns`, `fib_ifindex` and
    /// `fib_mac`: the layout of the slot's last three words, lb-common
    /// asserts it). Without a route, filler with `fib_ifindex` 0 (none);
    /// after a failed lookup, `FIB_FAILED` (also for `FRAG_NEEDED`, which
    /// the slot does not keep).
    #[inline(always)]
    pub fn entry_words(&self, now: u64) -> [u64; 3] {
        if self.r.is_null() {
            // Not zeros: a run of zero words becomes a byte-wise `memset`.
            return [now, now << 32, now];
        }
        // SAFETY: a map value of this CPU (see `route`).
        let src = self.r as *const u64;
        let (w5, mut w6, w7) = unsafe { (*src.add(1), *src.add(2), *src.add(3)) };
        if self.failed {
            w6 = (w6 & !0xffff_ffff) | FIB_FAILED as u64;
        }
        [w5, w6, w7]
    }
}

/// Resolves a new flow's route to backend `daddr:dport` before the rewrite
/// (the packet still has the VIP; its source port is the client's, which a
/// collision rewrite may change: `bpf_fib_lookup` sees ports only in
/// policy routing on ports).
#[inline(always)]
pub fn new_flow_route<C: Ctx>(
    ctx: &mut C,
    p: &Packet,
    daddr: u32,
    dport: u16,
    now: u64,
) -> NewRoute {
    let none = NewRoute {
        r: core::ptr::null(),
        failed: false,
    };
    // A TTL that would expire is left to the stack, which answers with ICMP.
    if config(config_idx::FIB_REDIRECT) == 0 || p.ttl <= 1 {
        return none;
    }
    match route(ctx, p, daddr, dport, now) {
        Some((r, rc)) => NewRoute {
            r,
            failed: rc != fib::RET_SUCCESS,
        },
        None => {
            stats::reason(reason::PASS_FIB);
            none
        }
    }
}

/// Forwards a new flow's translated packet by its [`NewRoute`].
#[inline(always)]
pub fn new_flow_forward<C: Ctx>(ctx: &mut C, route: NewRoute) -> Verdict {
    if route.r.is_null() {
        return Verdict::Pass;
    }
    if route.failed {
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    }
    // SAFETY: see `entry_words`.
    let r = unsafe { &*route.r };
    if r.ifindex == FIB_FAILED {
        stats::reason(reason::PASS_FIB_CACHED);
        return Verdict::Pass;
    }
    redirect(ctx, r.ifindex, &r.mac)
}

/// `bpf_fib_lookup` for `p` to `daddr:dport`; on success the egress
/// interface and MACs go to `r`.
#[inline(always)]
fn lookup<C: Ctx>(
    ctx: &mut C,
    p: &Packet,
    daddr: u32,
    dport: u16,
    r: &mut RouteCacheEntry,
) -> i64 {
    let addrs = fib::Addrs::V4 {
        src: p.saddr,
        dst: daddr,
    };
    let Some((rc, f)) = fib::lookup(ctx, p.proto, p.sport, dport, p.tot_len, addrs) else {
        return -1;
    };
    if rc == fib::RET_SUCCESS {
        r.mac[..6].copy_from_slice(&f.dmac);
        r.mac[6..].copy_from_slice(&f.smac);
        r.ifindex = f.ifindex;
    }
    rc
}
