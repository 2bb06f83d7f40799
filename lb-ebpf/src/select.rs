//! Service lookup and backend selection.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    AffinityKey, AffinityValue, BackendValue, ServiceKey, ServiceValue, algo, backend_state,
    flow_hash, src_hash,
};

use crate::{
    maps::{AFFINITY, BACKEND_CONNS, BACKEND_GC, BACKENDS, RR_COUNTERS, SERVICES, SLOTS},
    parse::Packet,
    set::ProgramSet,
};

#[inline(always)]
pub fn service(p: &Packet) -> Option<ServiceValue> {
    let key = ServiceKey {
        vip: p.daddr,
        port: p.dport,
        proto: p.proto,
        _pad: 0,
    };
    unsafe { SERVICES.get(&key) }.copied()
}

#[inline(always)]
fn slot(svc: &ServiceValue, idx: u32) -> Option<u32> {
    SLOTS.get(svc.table_off.wrapping_add(idx)).copied()
}

#[inline(always)]
pub fn backend(id: u32) -> Option<BackendValue> {
    let b = BACKENDS.get(id)?;
    if b.state == backend_state::ACTIVE && b.weight > 0 {
        Some(*b)
    } else {
        None
    }
}

#[inline(always)]
fn active(id: u32) -> u64 {
    let c = match BACKEND_CONNS.get(id) {
        Some(c) => *c,
        None => return u64::MAX,
    };
    let gc = BACKEND_GC.get(id).copied().unwrap_or(0);
    c.active(gc)
}

/// Power of two choices over two distinct slots: the one whose backend has fewer active flows per unit of weight.
#[inline(always)]
fn least_conn(svc: &ServiceValue) -> Option<u32> {
    let len = svc.table_len;
    let i = unsafe { bpf_get_prandom_u32() } % len;
    let a = slot(svc, i)?;
    if len == 1 {
        return Some(a);
    }
    // A second, distinct slot.
    let j = (i + 1 + unsafe { bpf_get_prandom_u32() } % (len - 1)) % len;
    let b = slot(svc, j)?;
    if a == b {
        return Some(a);
    }
    let wa = BACKENDS.get(a).map(|x| x.weight).unwrap_or(0) as u64;
    let wb = BACKENDS.get(b).map(|x| x.weight).unwrap_or(0) as u64;
    // active_a / wa <= active_b / wb, without division.
    // Clamped to u32 so the products fit in u64.
    let (ca, cb) = (
        active(a).min(u32::MAX as u64),
        active(b).min(u32::MAX as u64),
    );
    if ca * wb <= cb * wa { Some(a) } else { Some(b) }
}

/// Picks a backend id for a new flow, or `None` if the service has no usable backend.
#[inline(always)]
pub fn pick<S: ProgramSet>(svc: &ServiceValue, p: &Packet, now: u64) -> Option<u32> {
    let len = svc.table_len;
    if len == 0 {
        return None;
    }
    let akey = AffinityKey {
        svc_id: svc.id,
        client_ip: p.saddr,
    };
    if svc.affinity_timeout_s != 0 {
        if let Some(a) = AFFINITY.get_ptr_mut(&akey) {
            let a = unsafe { &mut *a };
            let fresh =
                now.wrapping_sub(a.last_seen_ns) < svc.affinity_timeout_s as u64 * 1_000_000_000;
            // `backend` refuses a terminating or drained backend: its clients pick anew.
            if fresh {
                if let Some(b) = backend(a.backend_id) {
                    if b.svc_id == svc.id {
                        // The timeout runs from the client's last new flow, as
                        // kube-proxy's `recent --set` on every connection.
                        a.last_seen_ns = now;
                        return Some(a.backend_id);
                    }
                }
            }
        }
    }
    let id = match svc.algo {
        algo::ROUND_ROBIN => {
            let ctr = RR_COUNTERS.get_ptr_mut(svc.id)?;
            let n = unsafe { S::next(ctr) };
            slot(svc, (n % len as u64) as u32)?
        }
        algo::MAGLEV => slot(
            svc,
            flow_hash(p.saddr, p.daddr, p.sport, p.dport, p.proto) % len,
        )?,
        algo::SOURCE_HASH => slot(svc, src_hash(p.saddr) % len)?,
        algo::LEAST_CONN => least_conn(svc)?,
        // Random: a hash of the 5-tuple, not a fresh draw. The spread is a
        // random one's, and a flow whose conntrack entry was lost (evicted
        // from a full map) gets the same backend back on its next packet.
        _ => slot(
            svc,
            flow_hash(p.saddr, p.daddr, p.sport, p.dport, p.proto) % len,
        )?,
    };
    backend(id)?;
    if svc.affinity_timeout_s != 0 {
        let v = AffinityValue {
            backend_id: id,
            _pad: 0,
            last_seen_ns: now,
        };
        let _ = AFFINITY.insert(&akey, &v, 0);
    }
    Some(id)
}
