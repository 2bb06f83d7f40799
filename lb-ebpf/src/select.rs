//! Service lookup and backend selection.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    AffinityKey, AffinityValue, BackendValue, QOS_PROBE, ServiceKey, ServiceValue, algo,
    backend_state, flow_hash, src_hash, svc_flags,
};

use crate::{
    maps::{
        AFFINITY, BACKEND_CONNS, BACKEND_GC, BACKEND_LIMITS, BACKENDS, RR_COUNTERS, SERVICES,
        SLOTS,
    },
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

/// Whether backend `id` is at its QoS limit (`BACKEND_LIMITS`, 0: none):
/// its active flows, as least-conn counts them, reach the limit.
#[inline(always)]
fn full(id: u32) -> bool {
    let limit = match BACKEND_LIMITS.get(id) {
        Some(l) => *l,
        None => return false,
    };
    limit != 0 && active(id) >= limit as u64
}

/// A backend below its limit in the slots after `i` (at most
/// `QOS_PROBE - 1` of them, and at most the table's other slots), or `None`:
/// the service is full. Slots in order: a weighted list holds each backend
/// once per turn, a Maglev table's neighbours are other backends.
#[inline(always)]
fn probe(svc: &ServiceValue, i: u32) -> Option<u32> {
    let len = svc.table_len;
    let mut k = 1;
    while k < QOS_PROBE {
        if k >= len {
            return None;
        }
        let j = (i + k) % len;
        if let Some(id) = slot(svc, j) {
            if backend(id).is_some() && !full(id) {
                return Some(id);
            }
        }
        k += 1;
    }
    None
}

/// What [`pick`] found for a new flow.
pub enum Pick {
    Backend(u32),
    /// No usable backend (an empty table, or a slot naming a backend that
    /// takes no new flows).
    None,
    /// Every backend probed is at its QoS limit.
    Full,
}

/// Power of two choices over two distinct slots: the one whose backend has
/// fewer active flows per unit of weight; its slot and backend id.
#[inline(always)]
fn least_conn(svc: &ServiceValue) -> Option<(u32, u32)> {
    let len = svc.table_len;
    let i = unsafe { bpf_get_prandom_u32() } % len;
    let a = slot(svc, i)?;
    if len == 1 {
        return Some((i, a));
    }
    // A second, distinct slot.
    let j = (i + 1 + unsafe { bpf_get_prandom_u32() } % (len - 1)) % len;
    let b = slot(svc, j)?;
    if a == b {
        return Some((i, a));
    }
    let wa = BACKENDS.get(a).map(|x| x.weight).unwrap_or(0) as u64;
    let wb = BACKENDS.get(b).map(|x| x.weight).unwrap_or(0) as u64;
    // active_a / wa <= active_b / wb, without division.
    // Clamped to u32 so the products fit in u64.
    let (ca, cb) = (
        active(a).min(u32::MAX as u64),
        active(b).min(u32::MAX as u64),
    );
    if ca * wb <= cb * wa {
        Some((i, a))
    } else {
        Some((j, b))
    }
}

/// Picks a backend id for a new flow.
///
/// A service with QoS limits (`svc_flags::LIMITED`; no other service reads
/// `BACKEND_LIMITS`): a backend at its limit takes no new flow; the flow
/// goes to the first backend below its limit in the next slots (`probe`),
/// else the service is full.
#[inline(always)]
pub fn pick<S: ProgramSet>(svc: &ServiceValue, p: &Packet, now: u64) -> Pick {
    match pick_inner::<S>(svc, p, now) {
        Some(id) if id == FULL => Pick::Full,
        Some(id) => Pick::Backend(id),
        None => Pick::None,
    }
}

/// Never a backend id (`limits::MAX_BACKENDS` is far below).
const FULL: u32 = u32::MAX;

#[inline(always)]
fn pick_inner<S: ProgramSet>(svc: &ServiceValue, p: &Packet, now: u64) -> Option<u32> {
    let len = svc.table_len;
    if len == 0 {
        return None;
    }
    let limited = svc.flags & svc_flags::LIMITED != 0;
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
                    // A backend at its limit loses its clients' new flows too.
                    if b.svc_id == svc.id && !(limited && full(a.backend_id)) {
                        // The timeout runs from the client's last new flow, as
                        // kube-proxy's `recent --set` on every connection.
                        a.last_seen_ns = now;
                        return Some(a.backend_id);
                    }
                }
            }
        }
    }
    // The slot and its backend.
    let (i, mut id) = match svc.algo {
        algo::ROUND_ROBIN => {
            let ctr = RR_COUNTERS.get_ptr_mut(svc.id)?;
            let n = unsafe { S::next(ctr) };
            let i = (n % len as u64) as u32;
            (i, slot(svc, i)?)
        }
        algo::MAGLEV => {
            let i = flow_hash(p.saddr, p.daddr, p.sport, p.dport, p.proto) % len;
            (i, slot(svc, i)?)
        }
        algo::SOURCE_HASH => {
            let i = src_hash(p.saddr) % len;
            (i, slot(svc, i)?)
        }
        algo::LEAST_CONN => least_conn(svc)?,
        // Random: a hash of the 5-tuple, not a fresh draw. The spread is a
        // random one's, and a flow whose conntrack entry was lost (evicted
        // from a full map) gets the same backend back on its next packet.
        _ => {
            let i = flow_hash(p.saddr, p.daddr, p.sport, p.dport, p.proto) % len;
            (i, slot(svc, i)?)
        }
    };
    backend(id)?;
    if limited && full(id) {
        id = match probe(svc, i) {
            Some(id) => id,
            None => return Some(FULL),
        };
    }
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

/// Whether backend `id` may take a new flow of service `svc_id` with
/// `flags` (a user-defined selector's answer, `selector`): active, weight >
/// 0, of this service, and below its QoS limit if the service has limits.
#[inline(always)]
pub fn takes_new_flow(svc_id: u32, flags: u8, id: u32) -> bool {
    match backend(id) {
        Some(b) => b.svc_id == svc_id && !(flags & svc_flags::LIMITED != 0 && full(id)),
        None => false,
    }
}
