//! Forwarding after the rewrite: `bpf_fib_lookup` + redirect, or the stack.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, helpers::bpf_fib_lookup};
use lb_common::{CtValue, FIB_CACHE_NS, FIB_FAIL_NS, FIB_FAILED, config_idx, reason};

use crate::{
    ctx::{Ctx, Verdict},
    maps::{FIB_SCRATCH, config},
    parse::{IP_OFF, Packet},
    stats,
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

/// The lookup parameters, 8-aligned so they can be zeroed word by word.
#[repr(C)]
union FibBuf {
    raw: [u64; 8],
    f: FibParams,
}

const _: () = assert!(core::mem::size_of::<FibParams>() == 64);

/// Forwards a translated packet. `ct` is the flow's conntrack entry for this
/// direction: its cached route is used while fresh (`FIB_CACHE_NS`), else
/// looked up and stored, so an established flow pays for `bpf_fib_lookup`
/// about once a second. A failed lookup is remembered for `FIB_FAIL_NS`
/// (`FIB_FAILED`): the flow's packets go to the stack meanwhile.
#[inline(always)]
pub fn forward<C: Ctx>(ctx: &mut C, p: &Packet, ct: Option<*mut CtValue>, now: u64) -> Verdict {
    // A TTL that would expire is left to the stack, which answers with ICMP.
    if config(config_idx::FIB_REDIRECT) == 0 || p.ttl <= 1 {
        return Verdict::Pass;
    }
    if let Some(v) = ct {
        let e = unsafe { &*v };
        if e.fib_ifindex == FIB_FAILED {
            // The last lookup failed: the stack gets the flow for a while.
            if now.wrapping_sub(e.fib_ns) < FIB_FAIL_NS {
                stats::reason(reason::PASS_FIB_CACHED);
                return Verdict::Pass;
            }
        } else if e.fib_ifindex != 0 && now.wrapping_sub(e.fib_ns) < FIB_CACHE_NS {
            let m = e.fib_mac;
            let dmac = [m[0], m[1], m[2], m[3], m[4], m[5]];
            let smac = [m[6], m[7], m[8], m[9], m[10], m[11]];
            let ifindex = e.fib_ifindex;
            if !ctx.can_redirect(ifindex) {
                stats::reason(reason::PASS_XDP_TARGET);
                return Verdict::Pass;
            }
            if ctx.route_rewrite(IP_OFF, &smac, &dmac).is_none() {
                stats::reason(reason::PASS_FIB);
                return Verdict::Pass;
            }
            stats::reason(reason::FWD_REDIRECT);
            return Verdict::Redirect(ifindex);
        }
    }
    let Some(raw) = FIB_SCRATCH.get_ptr_mut(0) else {
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    };
    // SAFETY: the per-CPU scratch is 8-aligned, 64 bytes, this CPU's alone
    // for the packet; all-zero is a valid bpf_fib_lookup.
    let buf = unsafe { &mut *(raw as *mut FibBuf) };
    buf.raw = [0; 8];
    let f = unsafe { &mut buf.f };
    f.family = AF_INET;
    f.l4_protocol = p.proto;
    f.sport = p.sport;
    f.dport = p.dport;
    f.__bindgen_anon_1.tot_len = p.tot_len;
    f.ifindex = ctx.ifindex();
    f.__bindgen_anon_3.ipv4_src = p.saddr;
    f.__bindgen_anon_4.ipv4_dst = p.daddr;
    let rc = unsafe { bpf_fib_lookup(ctx.raw(), f, core::mem::size_of::<FibParams>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        if let Some(v) = ct {
            // Remembered for FIB_FAIL_NS: a flow without a route does not
            // repeat the lookup on every packet.
            unsafe {
                (*v).fib_ns = now;
                (*v).fib_ifindex = FIB_FAILED;
            }
        }
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    }
    if let Some(v) = ct {
        // Concurrent writers store the same result, so a torn write is harmless.
        unsafe {
            let e = &mut *v;
            e.fib_mac[..6].copy_from_slice(&f.dmac);
            e.fib_mac[6..].copy_from_slice(&f.smac);
            e.fib_ns = now;
            e.fib_ifindex = f.ifindex;
        }
    }
    if !ctx.can_redirect(f.ifindex) {
        stats::reason(reason::PASS_XDP_TARGET);
        return Verdict::Pass;
    }
    if ctx.route_rewrite(IP_OFF, &f.smac, &f.dmac).is_none() {
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    }
    stats::reason(reason::FWD_REDIRECT);
    Verdict::Redirect(f.ifindex)
}
