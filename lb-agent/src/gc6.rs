//! Conntrack GC of the IPv6 flows (`CONNTRACK6`), the IPv4 sweep's rules
//! (`crate::gc`) in a simpler form: a flow expires when both of its entries
//! were idle past its state's timeout, and goes reverse entry first; an
//! expiry of a flow the kernel did not close is credited to its backend's
//! `BACKEND_GC` (one add per backend), so least-conn's active count stays
//! right; a reverse entry that no forward entry owns goes once idle past the
//! longest timeout.
//!
//! Simpler than the IPv4 sweep, and what that costs: the map is walked key
//! by key (no batch syscalls), under the writer's lock; a flow is checked
//! again just before its delete (a packet since the scan keeps it), but a
//! packet between that check and the delete can still lose its flow (the
//! next packet of a TCP flow re-creates it with the same backend under
//! Maglev or source-hash); open flows that the LRU evicted are not
//! recounted.

use std::collections::HashMap;

use lb_common::{CtValue6, FlowKey6, ct_dir};
use serde::Serialize;

use crate::config::Timeouts;
use crate::datapath::{DatapathError, MapWriter};
use crate::gc::{closed_by_kernel, longest, timeout_for};

/// What one IPv6 sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Gc6Report {
    /// Forward entries scanned (flows).
    pub flows: u64,
    /// Flows deleted as idle.
    pub expired: u64,
    /// Of those, the ones credited to their backend (not closed by the kernel).
    pub accounted: u64,
    /// Reverse entries deleted without a forward entry.
    pub orphans: u64,
}

fn idle(now_ns: u64, last: u64, limit: std::time::Duration) -> bool {
    now_ns.saturating_sub(last) > limit.as_nanos().min(u64::MAX as u128) as u64
}

/// One sweep of `CONNTRACK6` at `now_ns` (the programs' clock).
pub fn sweep6(w: &mut MapWriter, t: &Timeouts, now_ns: u64) -> Result<Gc6Report, DatapathError> {
    let entries = w.conntrack6_entries()?;
    let all: HashMap<FlowKey6, CtValue6> = entries.iter().copied().collect();
    let mut r = Gc6Report::default();
    let mut owned: Vec<FlowKey6> = Vec::new();
    let mut credit: HashMap<u32, u64> = HashMap::new();
    let backends = w.backend_services6();
    for (k, v) in &entries {
        if v.ct.dir != ct_dir::FORWARD {
            continue;
        }
        r.flows += 1;
        let rk = k.reverse_of_forward(v);
        let rev = all.get(&rk).filter(|rv| k.owns_reverse(v, &rk, rv));
        if rev.is_some() {
            owned.push(rk);
        }
        let last =
            v.ct.last_seen_ns
                .max(rev.map_or(0, |rv| rv.ct.last_seen_ns));
        if !idle(now_ns, last, timeout_for(t, v.ct.state)) {
            continue;
        }
        // Checked again at the delete: a packet since the scan keeps the flow.
        let Some(now_v) = w.conntrack6_get(k)? else {
            continue;
        };
        let now_rev = match rev {
            Some(_) => w.conntrack6_get(&rk)?,
            None => None,
        };
        let last = now_v
            .ct
            .last_seen_ns
            .max(now_rev.map_or(0, |rv| rv.ct.last_seen_ns));
        if !idle(now_ns, last, timeout_for(t, now_v.ct.state)) {
            continue;
        }
        if now_rev.is_some_and(|rv| k.owns_reverse(&now_v, &rk, &rv)) {
            w.conntrack6_remove(&rk)?;
        }
        w.conntrack6_remove(k)?;
        r.expired += 1;
        // Credited only to the backend the flow was opened on (a freed or
        // reused id has fresh counters).
        if !closed_by_kernel(now_v.ct.state)
            && backends.get(&now_v.ct.backend_id) == Some(&now_v.ct.svc_id)
        {
            *credit.entry(now_v.ct.backend_id).or_default() += 1;
        }
    }
    let owned: std::collections::HashSet<FlowKey6> = owned.into_iter().collect();
    for (k, v) in &entries {
        if v.ct.dir == ct_dir::REVERSE
            && !owned.contains(k)
            && idle(now_ns, v.ct.last_seen_ns, longest(t))
        {
            w.conntrack6_remove(k)?;
            r.orphans += 1;
        }
    }
    let mut ids: Vec<(u32, u64)> = credit.into_iter().collect();
    ids.sort_unstable();
    for (id, n) in ids {
        w.add_expired(id, n)?;
        r.accounted += n;
    }
    Ok(r)
}
