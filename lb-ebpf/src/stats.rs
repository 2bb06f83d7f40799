//! Counters: drop/pass reasons, per-service and per-backend traffic.

use lb_common::Counters;

use crate::maps::{BACKEND_CONNS, BACKEND_STATS, REASONS, SVC_STATS};

#[inline(always)]
pub fn reason(r: u32) {
    if let Some(p) = REASONS.get_ptr_mut(r) {
        // Per-CPU slot: no other writer.
        unsafe { *p += 1 };
    }
}

/// Adds to a per-CPU entry: no other writer.
#[inline(always)]
fn bump(p: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = p {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

/// `bump` for a shared entry: other CPUs add to it at the same time.
#[inline(always)]
fn bump_atomic(p: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = p {
        unsafe {
            crate::atomic_add(&raw mut (*c).packets, 1);
            crate::atomic_add(&raw mut (*c).bytes, bytes);
            if new_flow {
                crate::atomic_add(&raw mut (*c).new_flows, 1);
            }
        }
    }
}

#[inline(always)]
pub fn traffic(svc_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    bump(SVC_STATS.get_ptr_mut(svc_id), bytes, new_flow);
    bump_atomic(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_flow);
}

/// A flow cache entry's pending hits (`FlowCacheEntry::pending_packets`),
/// added to the maps a full-path packet counts in: `traffic`, `nat_reason`
/// and `FWD_REDIRECT`.
#[inline(always)]
pub fn flush(svc_id: u32, backend_id: u32, nat_reason: u32, packets: u64, bytes: u64) {
    if let Some(c) = SVC_STATS.get_ptr_mut(svc_id) {
        unsafe {
            (*c).packets += packets;
            (*c).bytes += bytes;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe {
            crate::atomic_add(&raw mut (*c).packets, packets);
            crate::atomic_add(&raw mut (*c).bytes, bytes);
        }
    }
    reason_add(nat_reason, packets);
    reason_add(lb_common::reason::FWD_REDIRECT, packets);
}

#[inline(always)]
fn reason_add(r: u32, n: u64) {
    if let Some(p) = REASONS.get_ptr_mut(r) {
        // Per-CPU slot: no other writer.
        unsafe { *p += n };
    }
}

#[inline(always)]
pub fn svc_drop(svc_id: u32) {
    if let Some(c) = SVC_STATS.get_ptr_mut(svc_id) {
        unsafe { (*c).drops += 1 };
    }
}

#[inline(always)]
pub fn conn_open(backend_id: u32) {
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(backend_id) {
        unsafe { crate::atomic_add(&raw mut (*c).opens, 1) };
    }
}

#[inline(always)]
pub fn conn_close(backend_id: u32) {
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(backend_id) {
        unsafe { crate::atomic_add(&raw mut (*c).closes, 1) };
    }
}
