//! Flow keys, entries and the TCP state machine.

use lb_common::{CtValue, FlowKey, LAST_SEEN_GRANULARITY_NS, ct_dir, ct_state};

use crate::{
    maps::CONNTRACK,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    set::ProgramSet,
    stats,
};

/// A flow key built as two 8-byte words: no `memset` call for the padding.
#[inline(always)]
pub fn flow_key(src_ip: u32, dst_ip: u32, src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
    let w0 = src_ip as u64 | (dst_ip as u64) << 32;
    let w1 = src_port as u64 | (dst_port as u64) << 16 | (proto as u64) << 32;
    // SAFETY: FlowKey is repr(C), 16 bytes, every bit pattern valid (little endian).
    unsafe { core::mem::transmute::<[u64; 2], FlowKey>([w0, w1]) }
}

#[inline(always)]
pub fn key(p: &Packet) -> FlowKey {
    flow_key(p.saddr, p.daddr, p.sport, p.dport, p.proto)
}

/// A conntrack value built as eight 8-byte words: LLVM turns a zeroed
/// struct into a call to a byte-by-byte `memset`.
#[inline(always)]
fn ct_value(
    nat_ip: u32,
    nat_port: u16,
    dir: u8,
    svc_id: u32,
    backend_id: u32,
    state: u32,
    now: u64,
) -> CtValue {
    let w = [
        nat_ip as u64 | (nat_port as u64) << 32 | (dir as u64) << 48,
        svc_id as u64 | (backend_id as u64) << 32,
        state as u64,
        now,
        now,
        // The route cache is empty while fib_ifindex (low half of word 6) is
        // 0; fib_ns and fib_mac then hold filler, which keeps LLVM from
        // turning a run of zero words into a byte-wise `memset` call.
        now,
        now << 32,
        now,
    ];
    // SAFETY: CtValue is repr(C), 64 bytes without implicit padding, every
    // bit pattern valid (little endian).
    unsafe { core::mem::transmute::<[u64; 8], CtValue>(w) }
}

#[inline(always)]
pub fn lookup(k: &FlowKey) -> Option<*mut CtValue> {
    CONNTRACK.get_ptr_mut(k)
}

/// Writes the reverse, then the forward entry of a new flow. Returns false if
/// either insert failed (the packet is still forwarded; the event is counted).
#[inline(always)]
pub fn create(
    fwd: &FlowKey,
    p: &Packet,
    svc_id: u32,
    backend_id: u32,
    ip: u32,
    port: u16,
    now: u64,
) -> bool {
    let state = if p.is_udp() {
        ct_state::UDP
    } else if p.flags & TCP_SYN != 0 && p.flags & TCP_ACK == 0 {
        ct_state::SYN
    } else {
        ct_state::ESTABLISHED
    };
    let rev = flow_key(ip, fwd.src_ip, port, fwd.src_port, fwd.proto);
    let rv = ct_value(
        fwd.dst_ip,
        fwd.dst_port,
        ct_dir::REVERSE,
        svc_id,
        backend_id,
        0,
        now,
    );
    let fv = ct_value(ip, port, ct_dir::FORWARD, svc_id, backend_id, state, now);
    let rev_ok = CONNTRACK.insert(&rev, &rv, 0).is_ok();
    let fwd_ok = CONNTRACK.insert(fwd, &fv, 0).is_ok();
    // The open counts only with a forward entry: without one, no close or
    // expiry could ever balance it.
    if fwd_ok {
        stats::conn_open(backend_id);
    }
    rev_ok && fwd_ok
}

#[inline(always)]
pub fn touch(v: *mut CtValue, now: u64) {
    unsafe {
        if now.wrapping_sub((*v).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*v).last_seen_ns = now;
        }
    }
}

/// Advances the TCP state of a forward entry. FIN or RST closes the flow once
/// (`ProgramSet::transition`: compare-and-swap in the full set), which is when the backend's active count drops.
#[inline(always)]
pub fn tcp_state<S: ProgramSet>(fwd: *mut CtValue, flags: u8, from_client: bool) {
    let st = unsafe { &raw mut (*fwd).state };
    let cur = unsafe { *st };
    if flags & (TCP_FIN | TCP_RST) != 0 {
        if (cur == ct_state::SYN || cur == ct_state::ESTABLISHED)
            && unsafe { S::transition(st, cur, ct_state::CLOSING) }
        {
            stats::conn_close(unsafe { (*fwd).backend_id });
        }
    } else if cur == ct_state::SYN && flags & TCP_ACK != 0 && (from_client || flags & TCP_SYN != 0)
    {
        unsafe { S::transition(st, cur, ct_state::ESTABLISHED) };
    }
}

/// A fresh SYN on a closed flow (port reuse) starts a new flow.
#[inline(always)]
pub fn is_reopen(v: *const CtValue, flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN && unsafe { (*v).state } == ct_state::CLOSING
}
