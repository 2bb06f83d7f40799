//! Flow keys, entries and the TCP state machine.

use lb_common::{CtValue, FlowKey, LAST_SEEN_GRANULARITY_NS, ct_dir, ct_state};

use crate::{
    maps::CONNTRACK,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

#[inline(always)]
pub fn key(p: &Packet) -> FlowKey {
    FlowKey {
        src_ip: p.saddr,
        dst_ip: p.daddr,
        src_port: p.sport,
        dst_port: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    }
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
    let rev = FlowKey {
        src_ip: ip,
        dst_ip: fwd.src_ip,
        src_port: port,
        dst_port: fwd.src_port,
        proto: fwd.proto,
        _pad: [0; 3],
    };
    let rv = CtValue {
        nat_ip: fwd.dst_ip,
        nat_port: fwd.dst_port,
        dir: ct_dir::REVERSE,
        _pad: 0,
        svc_id,
        backend_id,
        state: 0,
        created_ns: now,
        last_seen_ns: now,
    };
    let fv = CtValue {
        nat_ip: ip,
        nat_port: port,
        dir: ct_dir::FORWARD,
        _pad: 0,
        svc_id,
        backend_id,
        state,
        created_ns: now,
        last_seen_ns: now,
    };
    let ok = CONNTRACK.insert(&rev, &rv, 0).is_ok() && CONNTRACK.insert(fwd, &fv, 0).is_ok();
    stats::conn_open(backend_id);
    ok
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
/// (compare-and-swap), which is when the backend's active count drops.
#[inline(always)]
pub fn tcp_state(fwd: *mut CtValue, flags: u8, from_client: bool) {
    let st = unsafe { &raw mut (*fwd).state };
    let cur = unsafe { *st };
    if flags & (TCP_FIN | TCP_RST) != 0 {
        if (cur == ct_state::SYN || cur == ct_state::ESTABLISHED)
            && unsafe { crate::atomic_cas(st, cur, ct_state::CLOSING) }
        {
            stats::conn_close(unsafe { (*fwd).backend_id });
        }
    } else if cur == ct_state::SYN && flags & TCP_ACK != 0 && (from_client || flags & TCP_SYN != 0)
    {
        unsafe { crate::atomic_cas(st, cur, ct_state::ESTABLISHED) };
    }
}

/// A fresh SYN on a closed flow (port reuse) starts a new flow.
#[inline(always)]
pub fn is_reopen(v: *const CtValue, flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN && unsafe { (*v).state } == ct_state::CLOSING
}
