//! Forwarding after the rewrite: `bpf_fib_lookup` + redirect, or the stack.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, helpers::bpf_fib_lookup};
use lb_common::{config_idx, reason};

use crate::{
    ctx::{Ctx, Verdict},
    maps::config,
    parse::{IP_OFF, Packet},
    stats,
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

#[inline(always)]
pub fn forward<C: Ctx>(ctx: &mut C, p: &Packet) -> Verdict {
    // A TTL that would expire is left to the stack, which answers with ICMP.
    if config(config_idx::FIB_REDIRECT) == 0 || p.ttl <= 1 {
        return Verdict::Pass;
    }
    let mut f: FibParams = unsafe { core::mem::zeroed() };
    f.family = AF_INET;
    f.l4_protocol = p.proto;
    f.sport = p.sport;
    f.dport = p.dport;
    f.__bindgen_anon_1.tot_len = p.tot_len;
    f.ifindex = ctx.ifindex();
    f.__bindgen_anon_3.ipv4_src = p.saddr;
    f.__bindgen_anon_4.ipv4_dst = p.daddr;
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.raw(),
            &mut f,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    }
    if ctx.route_rewrite(IP_OFF, &f.smac, &f.dmac).is_none() {
        stats::reason(reason::PASS_FIB);
        return Verdict::Pass;
    }
    stats::reason(reason::FWD_REDIRECT);
    Verdict::Redirect(f.ifindex)
}
