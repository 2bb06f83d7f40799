//! rpclb kernel programs: one code base attached as XDP or as TC (clsact
//! ingress). Entry points only; the packet walk is in `process`.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]
#![feature(asm_experimental_arch)]

mod conntrack;
mod ctx;
mod fib;
mod flowcache;
mod frag;
mod fwd;
mod maps;
mod nat;
mod parse;
mod reject;
mod reject6;
mod select;
mod selector;
mod set;
mod snat;
mod snat6;
mod stats;
mod v6;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use core::intrinsics::AtomicOrdering;
use ctx::{Ctx, Tc, Verdict, Xdp, ptr_at};
use lb_common::{backend_flags, ct_dir, ct_flags, proto, reason};
use parse::{TCP_ACK, TCP_SYN};
use set::{Compat, Full, ProgramSet};

// Two program sets of one code base (`set`): the names are
// `lb_common::prog_names`. `inline(always)` applies to the function the
// `xdp` and `classifier` macros wrap: left to LLVM, the body grew into a
// called function, whose extra stack frame took the call chain past the
// verifier's 512 bytes, and whose tail call (IPv6) the verifier refuses in
// a subprogram ("tail_call is not allowed in subprogs without BTF").

#[xdp]
#[inline(always)]
pub fn rpclb_xdp(ctx: XdpContext) -> u32 {
    if v6::is_ipv6_xdp(&ctx) {
        return v6::dispatch_xdp(&ctx, 0);
    }
    xdp_main::<Full>(ctx)
}

#[xdp]
#[inline(always)]
pub fn rpclb_xdp_compat(ctx: XdpContext) -> u32 {
    if v6::is_ipv6_xdp(&ctx) {
        return v6::dispatch_xdp(&ctx, 1);
    }
    xdp_main::<Compat>(ctx)
}

#[classifier]
#[inline(always)]
pub fn rpclb_tc(ctx: TcContext) -> i32 {
    if v6::is_ipv6_tc(&ctx) {
        return v6::dispatch_tc(&ctx, 0);
    }
    tc_main::<Full>(ctx)
}

#[classifier]
#[inline(always)]
pub fn rpclb_tc_compat(ctx: TcContext) -> i32 {
    if v6::is_ipv6_tc(&ctx) {
        return v6::dispatch_tc(&ctx, 1);
    }
    tc_main::<Compat>(ctx)
}

#[inline(always)]
fn xdp_main<S: ProgramSet>(ctx: XdpContext) -> u32 {
    // An established flow's packet in the flow cache, before the full parse.
    if let Some(ifindex) = flowcache::fast::<S>(&ctx) {
        return Xdp(&ctx).ret(Verdict::Redirect(ifindex));
    }
    let mut c = Xdp(&ctx);
    let v = process::<_, S>(&mut c);
    c.ret(v)
}

#[inline(always)]
fn tc_main<S: ProgramSet>(ctx: TcContext) -> i32 {
    // Make the headers linear so direct packet access sees them: the IPv4
    // walk reads and writes at most Ethernet, IPv4 without options and a
    // TCP header without options (`parse::TC_LINEAR`). Not more: pulling
    // payload into a cloned skb's head copies the head.
    let want = ctx.len().min(parse::TC_LINEAR as u32);
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        let _ = ctx.pull_data(want);
    }
    let mut c = Tc(&ctx);
    let v = process::<_, S>(&mut c);
    c.ret(v) as i32
}

// The IPv6 walk (`v6`): programs of their own, tail-called by the four
// above (`V6_XDP_PROGS`, `V6_TC_PROGS`: full at 0, compat at 1); inlined
// into the macros' wrappers as those are.

#[xdp]
#[inline(always)]
pub fn rpclb_xdp6(ctx: XdpContext) -> u32 {
    v6::xdp::<Full>(ctx)
}

#[xdp]
#[inline(always)]
pub fn rpclb_xdp6_compat(ctx: XdpContext) -> u32 {
    v6::xdp::<Compat>(ctx)
}

#[classifier]
#[inline(always)]
pub fn rpclb_tc6(ctx: TcContext) -> i32 {
    v6::tc::<Full>(ctx)
}

#[classifier]
#[inline(always)]
pub fn rpclb_tc6_compat(ctx: TcContext) -> i32 {
    v6::tc::<Compat>(ctx)
}

/// Baseline for `cargo xtask bench`: the cheapest program that transmits.
/// Never attached by the agent.
#[xdp]
pub fn bench_xdp_tx(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_TX
}

/// Sink for `cargo xtask bench`: drops what the benchmark delivers.
#[xdp]
pub fn bench_xdp_drop(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_DROP
}

#[inline(always)]
fn process<C: Ctx, S: ProgramSet>(ctx: &mut C) -> Verdict {
    let mut p = match parse::parse(ctx) {
        Ok(p) => p,
        Err((r, drop)) => {
            stats::reason(r);
            return if drop { Verdict::Drop } else { Verdict::Pass };
        }
    };
    // With the flow cache, the clock is read after it (a hit mostly needs
    // none); without (TC, the compat set), here, as the stack budget of
    // those programs was measured.
    let cache = C::FLOW_CACHE && S::FLOW_CACHE;
    let early_now = if cache { 0 } else { S::now() };
    if p.frag == parse::FRAG_LATER {
        return frag::later(ctx, &mut p, if cache { S::now() } else { early_now });
    }
    let bytes = p.tot_len as u64 + parse::ETH_LEN as u64;
    let key = conntrack::key(&p);
    // Before any rewrite: the later fragments carry the addresses as sent.
    frag::record(&p, &key);
    let map_gen = flowcache::generation::<C, S>();
    if C::FLOW_CACHE && S::FLOW_CACHE {
        if let Some(v) = flowcache::hit::<C, S>(ctx, &p, &key, map_gen) {
            return v;
        }
    }
    let now = if cache { S::now() } else { early_now };
    let tcp = p.proto == proto::TCP;

    let mut hit = conntrack::lookup(&key);
    // A miss that is no service's packet may be the first reply of a flow
    // whose SYN wrote only its forward entry (`conntrack::first_reply`). A
    // TCP SYN-ACK that misses is nearly always that reply: it tries
    // `FRONTENDS` first, and `SERVICES` only if that finds no flow (a
    // SYN-ACK to a VIP would need a client whose address is the VIP).
    let mut svc = None;
    if hit.is_none() {
        if tcp && p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            p.wrote_reverse = conntrack::first_reply::<S>(&key, p.flags, now);
            if !p.wrote_reverse {
                svc = select::service(&p);
            }
        } else {
            svc = select::service(&p);
            p.wrote_reverse = svc.is_none() && conntrack::first_reply::<S>(&key, p.flags, now);
        }
        if p.wrote_reverse {
            stats::reason(reason::CT_REVERSE_LAZY);
            hit = conntrack::lookup(&key);
        }
        if svc.is_none() && hit.is_none() {
            stats::reason(reason::PASS_NO_SERVICE);
            return Verdict::Pass;
        }
    }

    if let Some(mut v) = hit {
        let mut e = unsafe { *v };
        if e.dir == ct_dir::REVERSE {
            // The packets that look the forward entry up anyway (TCP's SYN,
            // FIN, RST; every UDP reply) check that it still points back: a
            // stale entry (its flow gone, and a new flow of this tuple
            // writing its reverse entry only now) is written anew. Not the
            // entry `first_reply` just wrote: it checked exactly that.
            if !p.wrote_reverse
                && (!tcp || p.flags & (parse::TCP_FIN | parse::TCP_RST | TCP_SYN) != 0)
            {
                match conntrack::owner(&key, v) {
                    Some(f) => {
                        if tcp {
                            conntrack::tcp_state::<S>(f, p.flags, false);
                        }
                    }
                    None => {
                        if conntrack::first_reply::<S>(&key, p.flags, now) {
                            if let Some(n) = conntrack::lookup(&key) {
                                stats::reason(reason::CT_REVERSE_LAZY);
                                v = n;
                                e = unsafe { *v };
                            }
                        }
                    }
                }
            }
            conntrack::touch(v, now);
            stats::traffic(e.svc_id, e.backend_id, bytes, false);
            if nat::snat(ctx, &mut p, e.nat_ip, e.nat_port, e.client_port).is_none()
                || (e.flags & ct_flags::SNAT != 0
                    && snat::destination(ctx, &mut p, e.state).is_none())
            {
                stats::reason(reason::DROP_TRUNCATED_L4);
                return Verdict::Drop;
            }
            stats::reason(reason::NAT_REVERSE);
            return forward_and_fill::<C, S>(ctx, &key, &p, v, now, map_gen);
        }
        if !(tcp && conntrack::is_reopen(v, p.flags)) {
            conntrack::touch(v, now);
            if tcp {
                conntrack::tcp_state::<S>(v, p.flags, true);
            }
            stats::traffic(e.svc_id, e.backend_id, bytes, false);
            if nat::dnat(ctx, &mut p, e.nat_ip, e.nat_port, e.client_port).is_none()
                || (e.flags & ct_flags::SNAT != 0 && snat::source(ctx, &mut p, e.flags).is_none())
            {
                stats::reason(reason::DROP_TRUNCATED_L4);
                return Verdict::Drop;
            }
            stats::reason(reason::NAT_FORWARD);
            let verdict = forward_and_fill::<C, S>(ctx, &key, &p, v, now, map_gen);
            if e.flags & ct_flags::SNAT != 0 && matches!(verdict, Verdict::Pass) {
                return snat::unpassable(ctx, &p);
            }
            return verdict;
        }
    }

    // A new flow.
    let svc = match svc {
        Some(s) => s,
        None => match select::service(&p) {
            Some(s) => s,
            None => {
                stats::reason(reason::PASS_NO_SERVICE);
                return Verdict::Pass;
            }
        },
    };
    // A user-defined selector first (`selector`; may re-enter this program).
    let chosen = if S::SELECTOR && svc.flags & lb_common::svc_flags::SELECTOR != 0 {
        selector::choose::<C, S>(ctx, svc.id, svc.flags, &p)
    } else {
        None
    };
    let picked = match chosen {
        Some(id) => select::Pick::Backend(id),
        None => select::pick::<S>(&svc, &p, now),
    };
    let id = match picked {
        select::Pick::Backend(id) => id,
        select::Pick::None if svc.table_len == 0 => {
            return no_backend(ctx, &p, svc.id, Miss::Empty);
        }
        select::Pick::None => return no_backend(ctx, &p, svc.id, Miss::BadTable),
        select::Pick::Full => return no_backend(ctx, &p, svc.id, Miss::Full),
    };
    let b = match select::backend(id) {
        Some(b) => b,
        None => return no_backend(ctx, &p, svc.id, Miss::BadTable),
    };
    // The route first: the forward entry is written with it, so the flow's
    // next packet does not look it up, and the new entry is not looked up
    // again to store it.
    let route = fwd::new_flow_route(ctx, &p, b.ip, b.port, now);
    // A Cluster front end's backend on another node: SNAT (`snat`). A
    // backend that is the client itself (hairpin): SNAT to the service
    // loopback address, so that its reply comes back through here.
    let snat_flags = if b.flags & backend_flags::SNAT != 0 {
        ct_flags::SNAT
    } else if b.ip == p.saddr {
        ct_flags::SNAT | ct_flags::HAIRPIN
    } else {
        0
    };
    let masq = snat_flags != 0;
    let created = if masq {
        snat::create(
            &key,
            snat_flags,
            conntrack::new_state(&p),
            svc.id,
            id,
            b.ip,
            b.port,
            now,
            &route,
        )
    } else {
        conntrack::create(
            &key,
            &p,
            svc.id,
            id,
            b.ip,
            b.port,
            now,
            &route,
            b.flags & backend_flags::ONE_FRONTEND != 0,
        )
    };
    let sport = match created {
        conntrack::Created::Flow { sport, ok } => {
            if !ok {
                stats::reason(reason::DROP_CT_INSERT);
            }
            if snat_flags & ct_flags::HAIRPIN != 0 {
                stats::reason(reason::CT_HAIRPIN);
            } else if masq {
                stats::reason(reason::CT_SNAT);
            } else if sport != 0 {
                stats::reason(reason::CT_PORT_REWRITE);
            }
            sport
        }
        conntrack::Created::Exhausted => {
            // The flow holding the tuple keeps it; the client retries its SYN.
            stats::svc_drop(svc.id);
            stats::reason(if masq {
                reason::DROP_SNAT_EXHAUSTED
            } else {
                reason::DROP_PORTS_EXHAUSTED
            });
            return Verdict::Drop;
        }
    };
    // A flow seen first at its FIN or RST (its entry was evicted or expired)
    // closes at once: the only case that needs the entry just written.
    if tcp && p.flags & (parse::TCP_FIN | parse::TCP_RST) != 0 {
        if let Some(v) = conntrack::lookup(&key) {
            conntrack::tcp_state::<S>(v, p.flags, true);
        }
    }
    stats::traffic(svc.id, id, bytes, true);
    if nat::dnat(ctx, &mut p, b.ip, b.port, sport).is_none()
        || (masq && snat::source(ctx, &mut p, snat_flags).is_none())
    {
        stats::reason(reason::DROP_TRUNCATED_L4);
        return Verdict::Drop;
    }
    stats::reason(reason::NAT_FORWARD);
    if p.csum.is_seed() {
        stats::reason(p.csum.pass_reason());
        if masq {
            return snat::unpassable(ctx, &p);
        }
        return Verdict::Pass;
    }
    let verdict = fwd::new_flow_forward(ctx, route);
    if masq && matches!(verdict, Verdict::Pass) {
        return snat::unpassable(ctx, &p);
    }
    verdict
}

/// Forwards a translated packet (`fwd::forward`), except one whose L4
/// checksum is a CHECKSUM_PARTIAL seed: that one goes to the stack, which
/// completes the checksum or hands it to the offload. A redirect would turn
/// it into an XDP frame without checksum state (see `nat`'s module docs).
#[inline(always)]
fn forward<C: Ctx>(
    ctx: &mut C,
    p: &parse::Packet,
    ct: Option<*mut lb_common::CtValue>,
    now: u64,
) -> Verdict {
    if p.csum.is_seed() {
        stats::reason(p.csum.pass_reason());
        return Verdict::Pass;
    }
    fwd::forward(ctx, p, ct, now)
}

/// [`forward`] for a conntrack hit, then the flow cache remembers the
/// rewrite (`key`: the flow as it arrived) for the flow's next packets.
#[inline(always)]
fn forward_and_fill<C: Ctx, S: ProgramSet>(
    ctx: &mut C,
    key: &lb_common::FlowKey,
    p: &parse::Packet,
    v: *mut lb_common::CtValue,
    now: u64,
    map_gen: u32,
) -> Verdict {
    let verdict = forward(ctx, p, Some(v), now);
    flowcache::fill::<C, S>(ctx, key, p, v, verdict, map_gen);
    verdict
}

/// Why a new flow has no backend (`no_backend`).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Miss {
    /// The service has no backend that takes new flows.
    Empty,
    /// Every backend probed is at its QoS limit: answered as `Empty`, counted apart.
    Full,
    /// A slot names a backend that takes no new flows: dropped.
    BadTable,
}

/// No usable backend: a TCP SYN gets a RST (the client fails fast), a UDP
/// datagram an ICMP port unreachable, the rest is dropped.
#[inline(never)]
fn no_backend<C: Ctx>(ctx: &mut C, p: &parse::Packet, svc_id: u32, why: Miss) -> Verdict {
    stats::svc_drop(svc_id);
    if why == Miss::BadTable {
        stats::reason(reason::DROP_BAD_TABLE);
        return Verdict::Drop;
    }
    let full = why == Miss::Full;
    let dropped = if full {
        reason::DROP_BACKENDS_FULL
    } else {
        reason::DROP_NO_BACKEND
    };
    // The RST goes back out of the ingress interface, which native XDP on a
    // veth without a receiving peer cannot do: the SYN is dropped instead.
    if p.proto == proto::TCP
        && p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && ctx.can_redirect(ctx.ifindex())
    {
        let eth: Option<*mut [u8; 12]> = ptr_at(ctx, 0);
        if let Some(eth) = eth {
            let rst = nat::build_rst(unsafe { &*eth }, p);
            if ctx.replace(&rst).is_some() {
                stats::reason(if full {
                    reason::TX_RST_BACKENDS_FULL
                } else {
                    reason::TX_RST_NO_BACKEND
                });
                return Verdict::Bounce;
            }
        }
        stats::reason(reason::DROP_RST_BUILD);
        return Verdict::Drop;
    }
    if p.proto == proto::UDP && p.frag != parse::FRAG_LATER && ctx.can_redirect(ctx.ifindex()) {
        if reject::port_unreachable(ctx, p.saddr, p.daddr).is_some() {
            stats::reason(if full {
                reason::TX_ICMP_BACKENDS_FULL
            } else {
                reason::TX_ICMP_NO_BACKEND
            });
            return Verdict::Bounce;
        }
    }
    stats::reason(dropped);
    Verdict::Drop
}

/// An all-zero `T`, written as volatile 8-byte stores: LLVM would turn plain
/// zero stores into a call to a byte-by-byte `memset`.
///
/// # Safety
/// `T` must be 8-aligned, a multiple of 8 bytes, and valid when all-zero.
#[inline(always)]
pub unsafe fn zeroed<T>() -> T {
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    let p = v.as_mut_ptr() as *mut u64;
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
        i += 1;
    }
    unsafe { v.assume_init() }
}

/// `x`, unknown to the optimiser: keeps LLVM from rewriting a packet bounds
/// check into a form the verifier refuses (arithmetic on `data_end`).
#[inline(always)]
pub fn opaque(mut x: usize) -> usize {
    unsafe {
        core::arch::asm!("/* {0} */", inout(reg) x, options(nomem, nostack, preserves_flags))
    };
    x
}

/// Atomic add on a shared map value, its result unused: BPF_XADD (BPF_ATOMIC
/// with imm BPF_ADD), which every eBPF kernel has.
#[inline(always)]
pub unsafe fn atomic_add(p: *mut u64, v: u64) {
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
