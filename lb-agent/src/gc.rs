//! Conntrack GC and timeout accounting.
//!
//! The kernel writes two entries per flow (forward: client -> VIP, reverse:
//! backend -> client) and refreshes each entry's `last_seen_ns` on its own, at
//! most once a second. It counts a flow as closed (`BACKEND_CONNS.closes`)
//! when it sees a FIN or RST, which moves the forward entry to `CLOSING`. Flows
//! that just stop (a client that vanished, every UDP flow) are never closed by
//! the kernel; this sweep finds them and credits them to the backend's
//! agent-owned expired counter (`BACKEND_GC`), so that
//! `active = opens - closes - expired` stays right for least-conn.
//!
//! One sweep:
//! 1. **Scan** the whole map with `BPF_MAP_LOOKUP_BATCH` (4,096 entries per
//!    syscall). A 1M-entry map costs a few hundred syscalls, not millions.
//! 2. **Plan** (pure, see [`plan`]): pair each forward entry with its reverse
//!    entry. A flow is idle since `max(forward.last_seen, reverse.last_seen)`
//!    and expires when that exceeds the timeout of the forward entry's state.
//!    A reverse entry that no forward entry points at (the forward entry was
//!    evicted, or a port reuse re-pointed the flow at another backend) is an
//!    orphan, deleted once idle past the longest timeout. A flow owns only the
//!    reverse entry whose value points back at it ([`FlowKey::owns_reverse`]):
//!    one at its reverse key that names another flow is never its to delete.
//!    Only candidates are hashed: flows idle on their forward entry alone,
//!    reverse entries idle past the longest timeout (see [`plan`]; cost:
//!    docs/benchmarks.md, "The agent's conntrack GC").
//! 3. **Delete** each expired flow with `BPF_MAP_LOOKUP_AND_DELETE_ELEM`,
//!    reverse entry first, then forward entry. The state that is counted is
//!    the state at deletion, not at the scan: a FIN that closed the flow in
//!    the meantime was already counted by the kernel and is not counted
//!    again. If the entries saw a packet since the scan, the flow is put back
//!    (`BPF_NOEXIST`, so a flow the kernel re-created in between wins).
//!    Reverse first, because the kernel re-creates a flow only when its
//!    forward entry is missing, and then writes both entries: deleting the
//!    forward entry last means a re-created flow's entries are never ours to
//!    delete. At worst a reply in the microseconds between the two deletes
//!    goes out untranslated. On kernels older than 5.14 (no lookup-and-delete
//!    on hash maps) plain deletes are used, and the scanned state counts.
//! 4. **Account**: expired flows whose state was not `CLOSING`, and (with a
//!    [`Tracker`] kept across sweeps) open flows that the LRU evicted since
//!    the last sweep, are summed per
//!    backend and added with one `add_expired` per backend. A flow whose
//!    backend id no longer names the same backend (freed, or reused: reuse
//!    resets the counters) is not credited.
//!
//! 5. **Recount** (the agent's sweeps, [`expire_recount`]): the credits of
//!    step 4 miss every open flow that the LRU evicts between two sweeps
//!    (created and evicted in between, as a full map does by the hundred), so
//!    the agent does not add to `BACKEND_GC`: it sets it, per backend, so that
//!    `active` is the number of open flows the scan found on that backend
//!    less those this sweep removed. See [`recount_one`] for the arithmetic
//!    and its bounded error. What the counters believed open and the map no
//!    longer holds is counted as evicted.
//!
//! The remaining race is inherent to a userspace GC: a packet that is inside
//! the program between step 3's delete and its own state update can still
//! count a close for a flow that was just expired. It needs a flow that was
//! idle for its whole timeout to send a FIN within microseconds of the sweep.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lb_common::{ConnCounts, CtValue, FlowKey, ct_dir, ct_flags, ct_state};
use serde::{Serialize, Serializer};
use tracing::debug;

use crate::config::Timeouts;
use crate::datapath::reader::{ip_wire, monotonic_ns};
use crate::datapath::{DatapathError, MapReader, MapWriter, sys};

/// A map keyed by flow, for the sweep's per-entry work (an insert per reverse entry, a
/// lookup per forward entry): foldhash's keyed hasher (a random seed per map)
/// instead of SipHash, which took about a third of a sweep's CPU. The keys come from remote
/// clients, hence keyed.
pub type FlowMap<V> = HashMap<FlowKey, V, foldhash::fast::RandomState>;

/// A map keyed by backend id (or a credit key), looked up once per scanned flow by the
/// recount: the same fast hasher.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Entries per `BPF_MAP_LOOKUP_BATCH` call.
pub const BATCH: u32 = 4096;

/// The idle timeout of a forward entry in `state` (unknown states get the
/// established timeout: they are TCP flows the kernel did not classify).
pub fn timeout_for(t: &Timeouts, state: u32) -> Duration {
    match state {
        ct_state::SYN => t.tcp_syn,
        ct_state::CLOSING => t.tcp_closing,
        ct_state::UDP => t.udp,
        _ => t.tcp_established,
    }
}

/// The longest of the timeouts (orphan reverse entries wait this long).
pub fn longest(t: &Timeouts) -> Duration {
    t.tcp_syn
        .max(t.tcp_established)
        .max(t.tcp_closing)
        .max(t.udp)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether a flow is idle past its timeout. `rev_last_seen` is the reverse
/// entry's last-seen, if the flow has one.
pub fn is_expired(fwd: &CtValue, rev_last_seen: Option<u64>, t: &Timeouts, now_ns: u64) -> bool {
    let last = fwd.last_seen_ns.max(rev_last_seen.unwrap_or(0));
    now_ns.saturating_sub(last) > nanos(timeout_for(t, fwd.state))
}

/// Whether the kernel has already counted this flow's close (so an expiry
/// must not count it again).
pub fn closed_by_kernel(state: u32) -> bool {
    state == ct_state::CLOSING
}

/// Expired flows by the state they were in when deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ByState {
    pub syn: u64,
    pub established: u64,
    pub closing: u64,
    pub udp: u64,
}

impl ByState {
    fn add(&mut self, state: u32) {
        match state {
            ct_state::SYN => self.syn += 1,
            ct_state::CLOSING => self.closing += 1,
            ct_state::UDP => self.udp += 1,
            _ => self.established += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.syn + self.established + self.closing + self.udp
    }

    /// `(state name, count)`, for metrics labels.
    pub fn iter(&self) -> [(&'static str, u64); 4] {
        [
            ("syn", self.syn),
            ("established", self.established),
            ("closing", self.closing),
            ("udp", self.udp),
        ]
    }
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Entries read (forward + reverse).
    pub scanned: u64,
    /// Flows seen (forward entries).
    pub flows: u64,
    /// Flows deleted (both entries).
    pub expired: u64,
    pub expired_by_state: ByState,
    /// Expired flows credited to their backend's expired counter (those not
    /// closed by the kernel, whose backend still exists).
    pub accounted: u64,
    /// Expired, not closed, but their backend id was freed or reused: not
    /// credited (the counters of that id were reset).
    pub stale_backend: u64,
    /// Orphan reverse entries deleted.
    pub orphans: u64,
    /// Flows that saw a packet between the scan and the delete; kept.
    pub revived: u64,
    /// Forward entries that vanished between scan and delete (LRU eviction).
    pub vanished: u64,
    /// Open flows that the kernel's LRU evicted since the last tracked sweep
    /// (or between scan and delete), credited like expiries. Needs a
    /// [`Tracker`]; see [`expire_tracked`]. With a recount
    /// ([`expire_recount`]), instead: what the counters believed open and
    /// the scan did not find, plus open flows gone before their delete.
    pub evicted: u64,
    /// With a recount: backends whose active count was recomputed.
    pub recounted: u64,
    /// With a recount: open flows the map held beyond what the counters
    /// believed (the recount raised the active counts by this much; opens
    /// racing the scan, or a count lost to an earlier error).
    pub undercounted: u64,
    /// Entries left after the sweep (an estimate: the kernel adds and evicts
    /// concurrently).
    pub entries_after: u64,
    /// Wall time of the whole sweep.
    #[serde(rename = "duration_seconds", serialize_with = "ser_secs")]
    pub duration: Duration,
}

fn ser_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Entries read by a scan, split by direction, in the order the walk found
/// them (no key twice: a key always hashes to the same bucket, and the walk
/// visits each bucket once).
#[derive(Debug, Default)]
pub struct Scan {
    pub scanned: u64,
    pub forward: Vec<(FlowKey, CtValue)>,
    /// Reverse (and unknown-direction) entries.
    pub reverse: Vec<(FlowKey, Rev)>,
}

/// A reverse entry as the plan needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rev {
    pub last_seen: u64,
    /// The forward key its value points back at (`None`: an entry of
    /// unknown direction, owned by no flow).
    pub owner: Option<FlowKey>,
}

impl Scan {
    pub fn push(&mut self, k: FlowKey, v: CtValue) {
        self.scanned += 1;
        if v.dir == ct_dir::FORWARD {
            self.forward.push((k, v));
        } else {
            let owner = (v.dir == ct_dir::REVERSE).then(|| k.forward_of_reverse(&v));
            self.reverse.push((
                k,
                Rev {
                    last_seen: v.last_seen_ns,
                    owner,
                },
            ));
        }
    }

    /// The reverse entries by key, built at the size the scan found.
    pub fn reverse_map(&self) -> FlowMap<Rev> {
        let mut m = FlowMap::with_capacity_and_hasher(self.reverse.len(), Default::default());
        m.extend(self.reverse.iter().copied());
        m
    }
}

/// An expired flow to delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    pub key: FlowKey,
    /// The forward entry as scanned.
    pub value: CtValue,
    /// Its reverse entry, if the scan found one that belongs to it.
    pub reverse: Option<FlowKey>,
    pub reverse_last_seen: Option<u64>,
}

/// What a sweep should delete.
#[derive(Debug, Default)]
pub struct Plan {
    pub scanned: u64,
    pub flows: u64,
    pub expire: Vec<Expiry>,
    /// Reverse entries no forward entry points at, idle past the longest timeout.
    pub orphans: Vec<FlowKey>,
}

/// Decides, from the scanned entries alone, which flows and orphans expire.
///
/// Without a map of every entry: a flow can expire only if its forward
/// entry alone is idle past its timeout (the reverse entry can only make it
/// younger), and a reverse entry can be an orphan only if it is idle past
/// the longest timeout. Only those candidates go into (small) maps, which
/// one pass over the other side probes: the reverse entries, for the idle
/// flows' own entries; the forward entries, for the owners of old reverse
/// entries that no idle flow claimed. A sweep where little expires hashes
/// little.
pub fn plan(scan: Scan, t: &Timeouts, now_ns: u64) -> Plan {
    let Scan {
        scanned,
        forward,
        reverse,
    } = scan;
    let mut p = Plan {
        scanned,
        flows: forward.len() as u64,
        ..Default::default()
    };
    // A SNATed flow's reverse key ends at the node's address, which its
    // forward entry does not hold: found from the reverse entries' side.
    let snat_rev: FlowMap<FlowKey> = if forward.iter().any(|(_, v)| v.flags & ct_flags::SNAT != 0) {
        reverse
            .iter()
            .filter_map(|(r, e)| e.owner.map(|f| (f, *r)))
            .collect()
    } else {
        FlowMap::default()
    };
    // The key of the reverse entry a flow owns, if it has one.
    let rk_of = |k: &FlowKey, v: &CtValue| -> FlowKey {
        if v.flags & ct_flags::SNAT != 0
            && let Some(rk) = snat_rev.get(k)
        {
            return *rk;
        }
        k.reverse_of_forward(v)
    };
    let max = nanos(longest(t));
    let old = |seen: u64| now_ns.saturating_sub(seen) > max;
    // Flows idle on their forward entry alone, by forward key.
    let idle: Vec<usize> = (0..forward.len())
        .filter(|&i| is_expired(&forward[i].1, None, t, now_ns))
        .collect();
    let mut idle_at: FlowMap<u32> =
        FlowMap::with_capacity_and_hasher(idle.len(), Default::default());
    for (n, &i) in idle.iter().enumerate() {
        idle_at.insert(forward[i].0, n as u32);
    }
    // Each idle flow's own reverse entry: (key, last seen).
    let mut idle_rev: Vec<Option<(FlowKey, u64)>> = vec![None; idle.len()];
    // Old reverse entries whose owner is not an idle flow: orphans unless a
    // flow that is not idle owns them.
    let mut unclaimed: Vec<(FlowKey, Option<FlowKey>)> = Vec::new();
    for (rk, e) in &reverse {
        let at = match e.owner {
            Some(o) if !idle_at.is_empty() => idle_at.get(&o).copied(),
            _ => None,
        };
        match at {
            Some(n) => {
                let (fk, fv) = &forward[idle[n as usize]];
                // Only the entry that points back at its flow is the flow's own;
                // and only its owner could claim it.
                if rk_of(fk, fv) == *rk {
                    idle_rev[n as usize] = Some((*rk, e.last_seen));
                } else if old(e.last_seen) {
                    p.orphans.push(*rk);
                }
            }
            None if old(e.last_seen) => unclaimed.push((*rk, e.owner)),
            None => {}
        }
    }
    if !unclaimed.is_empty() {
        let mut owned: FlowMap<(Option<FlowKey>, bool)> =
            FlowMap::with_capacity_and_hasher(unclaimed.len(), Default::default());
        owned.extend(unclaimed.iter().map(|&(k, o)| (k, (o, false))));
        for (fk, fv) in &forward {
            if let Some(e) = owned.get_mut(&rk_of(fk, fv))
                && e.0 == Some(*fk)
            {
                e.1 = true;
            }
        }
        p.orphans.extend(
            unclaimed
                .iter()
                .filter(|(k, _)| !owned[k].1)
                .map(|(k, _)| *k),
        );
    }
    for (n, &i) in idle.iter().enumerate() {
        let (key, value) = forward[i];
        let rev = idle_rev[n];
        if is_expired(&value, rev.map(|r| r.1), t, now_ns) {
            p.expire.push(Expiry {
                key,
                value,
                reverse: rev.map(|r| r.0),
                reverse_last_seen: rev.map(|r| r.1),
            });
        }
    }
    p
}

/// Walks every conntrack entry with `BPF_MAP_LOOKUP_BATCH`, `BATCH` at a
/// time. Entries added or removed during the walk may or may not be seen.
/// Returns the number of entries visited.
pub fn for_each_entry(
    fd: BorrowedFd<'_>,
    f: impl FnMut(&FlowKey, &CtValue),
) -> Result<u64, DatapathError> {
    sys::for_each_batch(fd.as_raw_fd(), BATCH as usize, f)
        .map_err(|e| io_err("BPF_MAP_LOOKUP_BATCH", e))
}

/// Reads the whole conntrack map.
pub fn scan(w: &MapReader) -> Result<Scan, DatapathError> {
    let mut s = Scan::default();
    for_each_entry(w.conntrack_fd(), |k, v| s.push(*k, *v))?;
    Ok(s)
}

fn io_err(call: &str, source: std::io::Error) -> DatapathError {
    DatapathError::Io {
        path: format!("CONNTRACK ({call})").into(),
        source,
    }
}

/// One GC pass over conntrack: expires idle flows and orphans, and corrects
/// the per-backend active counts. `now_ns` is `monotonic_ns()` (the clock of
/// `bpf_ktime_get_ns`). Runs synchronously; call it from a blocking thread.
///
/// The same as `expire(w.conntrack_fd(), ..)` then `.credit(w)`. An agent
/// that shares its writer behind a lock can call [`expire`] on its own dup
/// of the conntrack fd without the lock (that is nearly all of the time) and
/// take the lock only for [`Expired::credit`].
pub fn sweep(w: &mut MapWriter, t: &Timeouts, now_ns: u64) -> Result<GcReport, DatapathError> {
    let e = expire(w.conntrack_fd(), t, now_ns)?;
    e.credit(w)
}

/// What one [`tick`] did.
#[derive(Debug)]
pub struct Tick {
    /// The IPv4 sweep (with its recount).
    pub report: GcReport,
    /// The IPv6 sweep; its error does not fail the tick (the IPv4 one is done).
    pub v6: Result<crate::gc6::Gc6Report, DatapathError>,
    /// `CONNTRACK`'s capacity, read with the baseline.
    pub capacity: u32,
}

/// One GC tick as the agent runs it, for a writer shared behind a lock
/// (`D`: the agent's `Datapath`, or a bare `MapWriter`): under the lock a
/// dup of the conntrack fd and the recount's [`Baseline`]; without it the
/// scan and deletes ([`expire_recount`], up to ~1.5 s at 1M entries); under
/// it again the credit and recount, then the IPv6 sweep
/// ([`crate::gc6::sweep6`]). Blocking: call it from a blocking thread.
pub fn tick<D: AsMut<MapWriter>>(dp: &Mutex<D>, t: &Timeouts) -> Result<Tick, DatapathError> {
    // A panic while holding the lock leaves the maps as consistent as the
    // kernel sees them at any time; keep going.
    let lock = || dp.lock().unwrap_or_else(|e| e.into_inner());
    let (fd, base, capacity) = {
        let mut g = lock();
        let w = g.as_mut();
        let fd = w
            .conntrack_fd()
            .try_clone_to_owned()
            .map_err(|source| DatapathError::Io {
                path: "CONNTRACK fd".into(),
                source,
            })?;
        (fd, Baseline::read(w)?, w.conntrack_capacity())
    };
    let expired = expire_recount(fd.as_fd(), t, monotonic_ns(), base)?;
    let report = expired.credit(lock().as_mut());
    // The IPv6 sweep runs even if the credit failed (as the agent always did).
    let v6 = crate::gc6::sweep6(lock().as_mut(), t, monotonic_ns());
    Ok(Tick {
        report: report?,
        v6,
        capacity,
    })
}

/// A sweep's deletions done, its credits not yet applied.
#[must_use = "call credit() to correct the backends' active counts"]
#[derive(Debug)]
pub struct Expired {
    report: GcReport,
    credit: Credit,
    start: Instant,
    recount: Option<Recount>,
}

impl Expired {
    /// The report so far (`accounted` and `stale_backend` are still 0).
    pub fn report(&self) -> &GcReport {
        &self.report
    }

    /// Adds the expiries to the backends they were opened on (one map
    /// update per backend), and completes the report.
    pub fn credit(self, w: &mut MapWriter) -> Result<GcReport, DatapathError> {
        let Expired {
            mut report,
            credit,
            start,
            recount,
        } = self;
        let index = w.backend_index();
        let mut per_backend: Vec<((u32, u32, u32, u16), u64)> = credit.into_iter().collect();
        per_backend.sort_unstable();
        for ((id, svc_id, ip, port), n) in per_backend {
            let same = index.get(&id).is_some_and(|&(s, bip, bport)| {
                s == svc_id && ip_wire(bip) == ip && bport.to_be() == port
            });
            if same {
                // A recount sets the counter instead (below).
                if recount.is_none() {
                    w.add_expired(id, n)?;
                }
                report.accounted += n;
            } else {
                report.stale_backend += n;
            }
        }
        if let Some(rc) = recount {
            rc.apply(w, &index, &mut report)?;
        }
        // The kernel's flow cache may still hold flows just deleted.
        w.invalidate_flow_cache()?;
        report.duration = start.elapsed();
        debug!(?report, "conntrack sweep");
        Ok(report)
    }
}

/// The conntrack half of a sweep: scan, plan, delete. Needs only the
/// conntrack map's fd (`MapWriter::conntrack_fd`, or a dup of it).
pub fn expire(fd: BorrowedFd<'_>, t: &Timeouts, now_ns: u64) -> Result<Expired, DatapathError> {
    expire_inner(fd, t, now_ns, None, None)
}

/// [`expire`], then, in [`Expired::credit`], a recount of every backend's
/// active flows from what the scan found (module docs, step 5). `base` must
/// be read just before the scan. This is what the agent runs: the counters
/// heal within one sweep, whatever the LRU evicted.
pub fn expire_recount(
    fd: BorrowedFd<'_>,
    t: &Timeouts,
    now_ns: u64,
    base: Baseline,
) -> Result<Expired, DatapathError> {
    expire_inner(fd, t, now_ns, None, Some(base))
}

/// Open flows between sweeps, to find those that the conntrack LRU evicted:
/// the kernel counted their open, nobody counts their close, and GC never
/// sees them expire. Keep one across sweeps and pass it to [`expire_tracked`].
#[derive(Debug, Default)]
pub struct Tracker {
    /// Forward key -> (created_ns, credit key) of flows that were open
    /// (not closing) at the end of the last sweep.
    open: FlowMap<(u64, CreditKey)>,
}

impl Tracker {
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// [`expire`], plus eviction accounting: a flow that was open at the last
/// sweep and whose forward entry is now gone (or was re-created: another
/// `created_ns`) without this GC deleting it was evicted by the LRU, and is
/// credited to its backend. A flow that closed and was then evicted before
/// the next sweep would be credited twice; LRU eviction picks the least
/// recently used entries, so a just-closed flow is an unlikely victim.
pub fn expire_tracked(
    fd: BorrowedFd<'_>,
    t: &Timeouts,
    now_ns: u64,
    tracker: &mut Tracker,
) -> Result<Expired, DatapathError> {
    expire_inner(fd, t, now_ns, Some(tracker), None)
}

fn credit_key(v: &CtValue) -> CreditKey {
    (v.backend_id, v.svc_id, v.nat_ip, v.nat_port)
}

fn expire_inner(
    fd: BorrowedFd<'_>,
    t: &Timeouts,
    now_ns: u64,
    mut tracker: Option<&mut Tracker>,
    base: Option<Baseline>,
) -> Result<Expired, DatapathError> {
    let start = Instant::now();
    let mut s = Scan::default();
    for_each_entry(fd, |k, v| s.push(*k, *v))?;
    let mut recount = base.map(|b| Recount::new(b, &s.forward));
    let mut credit = Credit::default();
    let mut evicted = 0u64;
    // Flows open at the end of this sweep (before removing what it deletes).
    let mut open_now: FlowMap<(u64, CreditKey)> = FlowMap::default();
    if let Some(tr) = tracker.as_deref_mut() {
        let present: FlowMap<u64> = s.forward.iter().map(|(k, v)| (*k, v.created_ns)).collect();
        for (k, (created, ck)) in tr.open.drain() {
            if present.get(&k) != Some(&created) {
                *credit.entry(ck).or_default() += 1;
                evicted += 1;
            }
        }
        open_now = s
            .forward
            .iter()
            .filter(|(_, v)| !closed_by_kernel(v.state))
            .map(|(k, v)| (*k, (v.created_ns, credit_key(v))))
            .collect();
    }
    let p = plan(s, t, now_ns);
    let fd = fd.as_raw_fd();
    let mut r = GcReport {
        scanned: p.scanned,
        flows: p.flows,
        evicted,
        ..Default::default()
    };
    let mut deleted = 0u64;
    let mut take = Take { fd, atomic: true };
    for e in &p.expire {
        // Reverse entry first: if a client packet re-creates the flow after
        // the forward entry is gone, the kernel writes both entries afresh,
        // and nothing of ours is left to delete them. The entries as they
        // are at deletion decide, not the scan.
        let rev = match e.reverse {
            Some(rk) => take_owned(&mut take, &rk, &e.key)?,
            None => None,
        };
        let Some(v) = take.take(&e.key)?.map(|v| v.unwrap_or(e.value)) else {
            // Gone already (LRU eviction); the reverse entry is an orphan.
            r.vanished += 1;
            deleted += rev.is_some() as u64;
            if let Some(rc) = recount.as_mut() {
                rc.removed(&e.value, true);
            }
            if tracker.is_some() && open_now.remove(&e.key).is_some() {
                *credit.entry(credit_key(&e.value)).or_default() += 1;
                r.evicted += 1;
            }
            continue;
        };
        deleted += 1 + rev.is_some() as u64;
        let rev = rev.flatten();
        let rev_seen = rev.map(|x| x.last_seen_ns).or(e.reverse_last_seen);
        if !is_expired(&v, rev_seen, t, now_ns) {
            // A packet arrived since the scan: put the flow back, unless the
            // kernel already re-created it (then ours is gone for good, and
            // the kernel wrote its own reverse entry).
            match sys::update(fd, &e.key, &v, sys::BPF_NOEXIST) {
                Ok(()) => {
                    deleted -= 1;
                    r.revived += 1;
                    if let (Some(rv), Some(rk)) = (rev, e.reverse) {
                        match sys::update(fd, &rk, &rv, sys::BPF_NOEXIST) {
                            Ok(()) => deleted -= 1,
                            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
                            Err(err) => return Err(io_err("BPF_MAP_UPDATE_ELEM", err)),
                        }
                    }
                    continue;
                }
                Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
                Err(err) => return Err(io_err("BPF_MAP_UPDATE_ELEM", err)),
            }
        }
        count_expiry(&mut r, &mut credit, &v);
        open_now.remove(&e.key);
        // Removed while open: out of the recount. (A flow that closed since
        // the scan stays in: its close, counted after the baseline,
        // balances it.)
        if let Some(rc) = recount.as_mut()
            && !closed_by_kernel(v.state)
        {
            rc.removed(&e.value, false);
        }
    }
    if let Some(tr) = tracker {
        tr.open = open_now;
    }
    let n = sys::delete_batch(fd, &p.orphans, BATCH as usize)
        .map_err(|e| io_err("BPF_MAP_DELETE_BATCH", e))?;
    r.orphans = n;
    deleted += n;

    r.entries_after = r.scanned.saturating_sub(deleted);
    Ok(Expired {
        report: r,
        credit,
        start,
        recount,
    })
}

/// The kernel's counts of every backend in use, read just before a scan:
/// the base of a recount. Read it under the writer's lock (the index must
/// match the maps), then scan without it.
#[derive(Clone, Debug, Default)]
pub struct Baseline {
    /// `monotonic_ns()` taken before the counters were read.
    at_ns: u64,
    backends: FastMap<u32, BaseEntry>,
}

#[derive(Clone, Copy, Debug)]
struct BaseEntry {
    /// (service id, IP, port): the backend the id named.
    ident: (u32, std::net::Ipv4Addr, u16),
    conns: ConnCounts,
    gc: u64,
}

impl Baseline {
    pub fn read(r: &MapReader) -> Result<Baseline, DatapathError> {
        let at_ns = crate::datapath::reader::monotonic_ns();
        let mut backends = FastMap::default();
        for (id, ident) in r.backend_index() {
            let (conns, gc) = r.backend_conn_counts(id)?;
            backends.insert(id, BaseEntry { ident, conns, gc });
        }
        Ok(Baseline { at_ns, backends })
    }
}

/// A backend's recount: `base` its counters at the baseline, `open_at_scan`
/// the open flows (not closing, created before the baseline) the scan found
/// on it, `removed` how many of those this sweep removed (expired while
/// open, or evicted before their delete). Returns the new `BACKEND_GC`
/// value, and what the counters believed open minus what the scan found
/// (positive: flows evicted without a close; negative: flows the counters
/// missed).
///
/// Why set-to-recount is safe next to the data path: the kernel never
/// writes `BACKEND_GC` (only `opens` and `closes`, with atomic adds), so the
/// write loses no kernel update. From then on `active = opens - closes - gc
/// = still_open + (opens since the baseline) - (closes since)`, exact for
/// every flow the kernel opens or closes after the baseline. The error is
/// bounded by the flows that closed between the baseline and the scan's
/// visit of their entry (seen closing, yet their close is after the
/// baseline: one too few each), and by opens whose entry was written just
/// before the baseline but counted just after (the full program set stamps
/// entries with the coarse clock, a tick behind: one too many each). It
/// never accumulates: the next sweep recounts from scratch.
pub fn recount_one(base: ConnCounts, base_gc: u64, open_at_scan: u64, removed: u64) -> (u64, i64) {
    let net = base.opens as i128 - base.closes as i128;
    let believed = net - base_gc as i128;
    let lost = believed - open_at_scan as i128;
    let still_open = open_at_scan.saturating_sub(removed) as i128;
    let gc = (net - still_open).clamp(0, u64::MAX as i128) as u64;
    (gc, lost.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
}

/// Open flows per backend at the scan, and those the sweep removed.
#[derive(Debug)]
struct Recount {
    base: Baseline,
    open: FastMap<u32, u64>,
    removed: FastMap<u32, u64>,
    /// Open flows evicted between the scan and their delete.
    vanished: u64,
}

impl Recount {
    fn new(base: Baseline, forward: &[(FlowKey, CtValue)]) -> Recount {
        let mut rc = Recount {
            base,
            open: FastMap::default(),
            removed: FastMap::default(),
            vanished: 0,
        };
        for (_, v) in forward {
            if rc.counts(v) {
                *rc.open.entry(v.backend_id).or_default() += 1;
            }
        }
        rc
    }

    /// Whether the scan counts this forward entry as an open flow: not
    /// closed, opened before the baseline (a later open is not in its
    /// counters), on a backend the baseline knows.
    fn counts(&self, v: &CtValue) -> bool {
        !closed_by_kernel(v.state)
            && v.created_ns <= self.base.at_ns
            && self.base.backends.contains_key(&v.backend_id)
    }

    /// The sweep removed the flow scanned as `v` (`vanished`: the LRU got it
    /// between the scan and the delete).
    fn removed(&mut self, v: &CtValue, vanished: bool) {
        if self.counts(v) {
            *self.removed.entry(v.backend_id).or_default() += 1;
            // Evicted, but after the scan saw it: the difference in
            // `recount_one` cannot see it.
            self.vanished += vanished as u64;
        }
    }

    /// Writes each backend's recounted `BACKEND_GC`.
    fn apply(
        self,
        w: &mut MapWriter,
        index: &HashMap<u32, (u32, std::net::Ipv4Addr, u16)>,
        r: &mut GcReport,
    ) -> Result<(), DatapathError> {
        let mut ids: Vec<(&u32, &BaseEntry)> = self.base.backends.iter().collect();
        ids.sort_unstable_by_key(|(id, _)| **id);
        for (&id, b) in ids {
            // Freed or reused since the baseline: its counters were reset.
            if index.get(&id) != Some(&b.ident) {
                continue;
            }
            let (now, gc) = w.backend_conn_counts(id)?;
            if now.opens < b.conns.opens || now.closes < b.conns.closes || gc != b.gc {
                continue;
            }
            let open = self.open.get(&id).copied().unwrap_or(0);
            let removed = self.removed.get(&id).copied().unwrap_or(0);
            let (new_gc, lost) = recount_one(b.conns, b.gc, open, removed);
            if lost > 0 {
                r.evicted += lost as u64;
            } else {
                r.undercounted += lost.unsigned_abs();
            }
            if new_gc != gc {
                w.set_expired(id, new_gc)?;
            }
            r.recounted += 1;
        }
        r.evicted += self.vanished;
        Ok(())
    }
}

/// [`Take::take`] of the reverse entry `rk` of the flow `owner`. If the
/// entry now belongs to another flow (re-created since the scan), it is put
/// back (`BPF_NOEXIST`: a newer write wins) and counts as not there.
fn take_owned(
    take: &mut Take,
    rk: &FlowKey,
    owner: &FlowKey,
) -> Result<Option<Option<CtValue>>, DatapathError> {
    let got = take.take(rk)?;
    if let Some(Some(v)) = got
        && rk.forward_of_reverse(&v) != *owner
    {
        match sys::update(take.fd, rk, &v, sys::BPF_NOEXIST) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
            Err(err) => return Err(io_err("BPF_MAP_UPDATE_ELEM", err)),
        }
        return Ok(None);
    }
    Ok(got)
}

/// Deletes entries, returning them as they were at deletion.
struct Take {
    fd: i32,
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` works on hash maps (Linux >= 5.14).
    atomic: bool,
}

impl Take {
    /// Deletes `k`. `None`: it was not there. `Some(Some(v))`: its value at
    /// deletion. `Some(None)`: deleted, value unknown (a kernel without
    /// lookup-and-delete; a plain delete was used).
    fn take(&mut self, k: &FlowKey) -> Result<Option<Option<CtValue>>, DatapathError> {
        if self.atomic {
            match sys::lookup_and_delete::<FlowKey, CtValue>(self.fd, k) {
                Ok(v) => return Ok(Some(Some(v))),
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(err)
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(524 /* ENOTSUPP */)
                    ) =>
                {
                    self.atomic = false;
                }
                Err(err) => return Err(io_err("BPF_MAP_LOOKUP_AND_DELETE_ELEM", err)),
            }
        }
        let gone = sys::delete(self.fd, k).map_err(|e| io_err("BPF_MAP_DELETE_ELEM", e))?;
        Ok(gone.then_some(None))
    }
}

/// Credits are keyed by the backend as the flow knew it: (id, service id,
/// IP and port in network order).
type CreditKey = (u32, u32, u32, u16);
type Credit = FastMap<CreditKey, u64>;

fn count_expiry(r: &mut GcReport, credit: &mut Credit, v: &CtValue) {
    r.expired += 1;
    r.expired_by_state.add(v.state);
    if !closed_by_kernel(v.state) {
        *credit.entry(credit_key(v)).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 10_000 * S;

    fn t() -> Timeouts {
        Timeouts {
            tcp_syn: Duration::from_secs(5),
            tcp_established: Duration::from_secs(100),
            tcp_closing: Duration::from_secs(2),
            udp: Duration::from_secs(30),
        }
    }

    fn ip(n: u8) -> u32 {
        u32::from_ne_bytes([10, 244, 0, n])
    }

    /// A flow's forward and reverse entries, with their last-seen ages.
    fn flow(
        client_port: u16,
        state: u32,
        fwd_age_s: u64,
        rev_age_s: u64,
        backend: u32,
    ) -> [(FlowKey, CtValue); 2] {
        let proto = if state == ct_state::UDP { 17 } else { 6 };
        let fk = FlowKey {
            src_ip: ip(1),
            dst_ip: u32::from_ne_bytes([10, 96, 0, 10]),
            src_port: client_port.to_be(),
            dst_port: 80u16.to_be(),
            proto,
            _pad: [0; 3],
        };
        let fv = CtValue {
            nat_ip: ip(100 + backend as u8),
            nat_port: 8080u16.to_be(),
            dir: ct_dir::FORWARD,
            svc_id: 1,
            backend_id: backend,
            state,
            created_ns: NOW - 1000 * S,
            last_seen_ns: NOW - fwd_age_s * S,
            ..Default::default()
        };
        let rk = fk.reverse_of_forward(&fv);
        let rv = CtValue {
            nat_ip: fk.dst_ip,
            nat_port: fk.dst_port,
            dir: ct_dir::REVERSE,
            svc_id: 1,
            backend_id: backend,
            state: 0,
            created_ns: fv.created_ns,
            last_seen_ns: NOW - rev_age_s * S,
            ..Default::default()
        };
        [(fk, fv), (rk, rv)]
    }

    fn scan_of(entries: impl IntoIterator<Item = (FlowKey, CtValue)>) -> Scan {
        let mut s = Scan::default();
        for (k, v) in entries {
            s.push(k, v);
        }
        s
    }

    fn expired_ports(p: &Plan) -> Vec<u16> {
        let mut v: Vec<u16> = p
            .expire
            .iter()
            .map(|e| u16::from_be(e.key.src_port))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn timeouts_per_state() {
        let t = t();
        assert_eq!(timeout_for(&t, ct_state::SYN), t.tcp_syn);
        assert_eq!(timeout_for(&t, ct_state::ESTABLISHED), t.tcp_established);
        assert_eq!(timeout_for(&t, ct_state::CLOSING), t.tcp_closing);
        assert_eq!(timeout_for(&t, ct_state::UDP), t.udp);
        assert_eq!(timeout_for(&t, 0), t.tcp_established);
        assert_eq!(longest(&t), Duration::from_secs(100));
    }

    #[test]
    fn expiry_uses_the_later_of_both_entries_and_the_forward_state() {
        let t = t();
        let mut e = Vec::new();
        e.extend(flow(1, ct_state::SYN, 6, 6, 1)); // syn, idle 6 > 5: expires
        e.extend(flow(2, ct_state::SYN, 4, 40, 1)); // idle 4: kept
        e.extend(flow(3, ct_state::ESTABLISHED, 101, 101, 1)); // expires
        e.extend(flow(4, ct_state::ESTABLISHED, 500, 50, 1)); // reverse fresh: kept
        e.extend(flow(5, ct_state::ESTABLISHED, 50, 500, 2)); // forward fresh: kept
        e.extend(flow(6, ct_state::CLOSING, 3, 3, 2)); // expires
        e.extend(flow(7, ct_state::CLOSING, 1, 9, 2)); // kept
        e.extend(flow(8, ct_state::UDP, 31, 31, 2)); // expires
        e.extend(flow(9, ct_state::UDP, 29, 31, 2)); // kept
        let p = plan(scan_of(e), &t, NOW);
        assert_eq!(p.scanned, 18);
        assert_eq!(p.flows, 9);
        assert_eq!(expired_ports(&p), vec![1, 3, 6, 8]);
        assert!(p.orphans.is_empty());
        for x in &p.expire {
            assert_eq!(x.reverse, Some(x.key.reverse_of_forward(&x.value)));
            assert!(x.reverse_last_seen.is_some());
        }
    }

    #[test]
    fn exactly_at_the_timeout_is_not_expired() {
        let t = t();
        let p = plan(scan_of(flow(1, ct_state::SYN, 5, 5, 1)), &t, NOW);
        assert!(p.expire.is_empty());
    }

    #[test]
    fn entries_newer_than_now_are_fresh() {
        // The kernel can write after `now` was taken.
        let t = t();
        let mut e = flow(1, ct_state::SYN, 0, 0, 1);
        e[0].1.last_seen_ns = NOW + 5 * S;
        e[1].1.last_seen_ns = NOW + 5 * S;
        assert!(plan(scan_of(e), &t, NOW).expire.is_empty());
    }

    #[test]
    fn forward_without_reverse_uses_its_own_last_seen() {
        let t = t();
        let [a, _] = flow(1, ct_state::ESTABLISHED, 101, 0, 1);
        let [b, _] = flow(2, ct_state::ESTABLISHED, 99, 0, 1);
        let p = plan(scan_of([a, b]), &t, NOW);
        assert_eq!(expired_ports(&p), vec![1]);
        assert_eq!(p.expire[0].reverse_last_seen, None);
    }

    #[test]
    fn orphans_wait_for_the_longest_timeout() {
        let t = t();
        let [_, old] = flow(1, ct_state::UDP, 0, 101, 1);
        let [_, young] = flow(2, ct_state::UDP, 0, 99, 1);
        let p = plan(scan_of([old, young]), &t, NOW);
        assert_eq!(p.flows, 0);
        assert_eq!(p.orphans, vec![old.0]);
    }

    #[test]
    fn reverse_of_a_re_pointed_flow_is_an_orphan() {
        // Port reuse: the forward entry now names backend 2; the old reverse
        // entry (backend 1) is referenced by nothing.
        let t = t();
        let [_, old_rev] = flow(1, ct_state::ESTABLISHED, 200, 200, 1);
        let [fwd, rev] = flow(1, ct_state::ESTABLISHED, 1, 1, 2);
        let p = plan(scan_of([old_rev, fwd, rev]), &t, NOW);
        assert!(p.expire.is_empty());
        assert_eq!(p.orphans, vec![old_rev.0]);
    }

    #[test]
    fn an_idle_re_pointed_flow_takes_its_own_entry_and_leaves_the_old_as_an_orphan() {
        // As above, but the flow is idle too: both of its reverse entries
        // point back at it; it expires with the one at its own reverse key,
        // the other is an orphan; a fresh flow's old entry is not.
        let t = t();
        let [_, old_rev] = flow(1, ct_state::ESTABLISHED, 300, 300, 1);
        let [fwd, rev] = flow(1, ct_state::ESTABLISHED, 200, 200, 2);
        let [_, kept_old_rev] = flow(2, ct_state::ESTABLISHED, 300, 300, 1);
        let [fresh, _] = flow(2, ct_state::ESTABLISHED, 1, 1, 1);
        let p = plan(scan_of([old_rev, fwd, rev, kept_old_rev, fresh]), &t, NOW);
        assert_eq!(p.expire.len(), 1);
        assert_eq!(p.expire[0].key, fwd.0);
        assert_eq!(p.expire[0].reverse, Some(rev.0));
        assert_eq!(p.orphans, vec![old_rev.0]);
    }

    /// Flow `f` moved to VIP `vip` (another service through the same backend).
    fn via_vip(mut f: [(FlowKey, CtValue); 2], vip: u8) -> [(FlowKey, CtValue); 2] {
        f[0].0.dst_ip = u32::from_ne_bytes([10, 96, 0, vip]);
        f[1].1.nat_ip = f[0].0.dst_ip;
        f
    }

    #[test]
    fn a_reverse_entry_of_another_flow_is_not_deleted() {
        // One client ip:port, one backend, two VIPs. A (closed, idle) and B
        // (open) map to the same reverse key, which B's entry holds (what a
        // kernel without port rewrites wrote): A's expiry must leave it.
        let t = t();
        let [a_fwd, _] = via_vip(flow(1, ct_state::CLOSING, 3, 3, 1), 10);
        let [b_fwd, b_rev] = via_vip(flow(1, ct_state::ESTABLISHED, 50, 50, 1), 20);
        assert_eq!(
            a_fwd.0.reverse_of_forward(&a_fwd.1),
            b_rev.0,
            "one reverse key"
        );
        let p = plan(scan_of([a_fwd, b_fwd, b_rev]), &t, NOW);
        assert_eq!(p.expire.len(), 1);
        assert_eq!(p.expire[0].key, a_fwd.0);
        assert_eq!(p.expire[0].reverse, None, "B's reverse entry is not A's");
        assert_eq!(p.expire[0].reverse_last_seen, None);
        assert!(p.orphans.is_empty(), "B owns it: no orphan");

        // With a port rewrite: B's reverse entry is at its own port, A's at
        // the client's; A's expiry takes exactly A's.
        let [a_fwd, a_rev] = via_vip(flow(1, ct_state::CLOSING, 3, 3, 1), 10);
        let [(bk, mut bv), (mut brk, mut brv)] =
            via_vip(flow(1, ct_state::ESTABLISHED, 50, 50, 1), 20);
        bv.client_port = 61_234u16.to_be();
        brv.client_port = bk.src_port;
        brk.dst_port = bv.client_port;
        assert!(bk.owns_reverse(&bv, &brk, &brv));
        assert!(a_fwd.0.owns_reverse(&a_fwd.1, &a_rev.0, &a_rev.1));
        assert!(!a_fwd.0.owns_reverse(&a_fwd.1, &brk, &brv));
        let p = plan(scan_of([a_fwd, a_rev, (bk, bv), (brk, brv)]), &t, NOW);
        assert_eq!(p.expire.len(), 1);
        assert_eq!(p.expire[0].reverse, Some(a_rev.0));
        assert!(p.orphans.is_empty());
    }

    #[test]
    fn a_snated_flow_pairs_with_its_reverse_entry_at_the_node_address() {
        // SNAT: the reverse key ends at the node's address, which the forward
        // entry does not hold; the pairing comes from the reverse entries'
        // side. An idle flow takes its own entry (no orphan); a fresh reverse
        // entry keeps its flow.
        let t = t();
        let node = u32::from_ne_bytes([192, 168, 0, 7]);
        let snat = |f: [(FlowKey, CtValue); 2]| {
            let [(fk, mut fv), (_, mut rv)] = f;
            fv.flags |= ct_flags::SNAT;
            rv.flags |= ct_flags::SNAT;
            rv.state = fk.src_ip;
            let mut rk = fk.reverse_of_forward(&fv);
            rk.dst_ip = node;
            assert_eq!(rk.forward_of_reverse(&rv), fk);
            [(fk, fv), (rk, rv)]
        };
        let idle = snat(flow(1, ct_state::ESTABLISHED, 200, 200, 1));
        let kept = snat(flow(2, ct_state::ESTABLISHED, 200, 50, 1));
        let p = plan(scan_of(idle.into_iter().chain(kept)), &t, NOW);
        assert_eq!(p.expire.len(), 1);
        assert_eq!(p.expire[0].key, idle[0].0);
        assert_eq!(p.expire[0].reverse, Some(idle[1].0));
        assert_eq!(p.expire[0].reverse_last_seen, Some(idle[1].1.last_seen_ns));
        assert!(p.orphans.is_empty(), "{:?}", p.orphans);
    }

    #[test]
    fn closing_flows_are_not_credited_again() {
        assert!(closed_by_kernel(ct_state::CLOSING));
        for s in [ct_state::SYN, ct_state::ESTABLISHED, ct_state::UDP] {
            assert!(!closed_by_kernel(s));
        }
        let mut r = GcReport::default();
        let mut c = Credit::default();
        let [(_, mut v), _] = flow(1, ct_state::CLOSING, 0, 0, 7);
        count_expiry(&mut r, &mut c, &v);
        v.state = ct_state::UDP;
        count_expiry(&mut r, &mut c, &v);
        count_expiry(&mut r, &mut c, &v);
        assert_eq!(r.expired, 3);
        assert_eq!(r.expired_by_state.closing, 1);
        assert_eq!(r.expired_by_state.udp, 2);
        assert_eq!(r.expired_by_state.total(), 3);
        assert_eq!(c.values().sum::<u64>(), 2);
        assert_eq!(c.keys().next().unwrap().0, 7);
    }

    #[test]
    fn report_serializes_with_stable_names() {
        let r = GcReport {
            duration: Duration::from_millis(1500),
            ..Default::default()
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["duration_seconds"], 1.5);
        assert_eq!(j["expired_by_state"]["established"], 0);
        for k in [
            "scanned",
            "flows",
            "expired",
            "orphans",
            "accounted",
            "revived",
        ] {
            assert!(j.get(k).is_some(), "{k}");
        }
    }
    #[test]
    fn recount_sets_the_counter_to_what_is_open() {
        let c = |opens, closes| ConnCounts { opens, closes };
        // 10 opened, 2 closed, GC credited 1: the counters believe 7 open.
        // The scan finds 3, the sweep expires 1 of them: 4 were evicted, 2
        // stay open (active = 10 - 2 - 6).
        assert_eq!(recount_one(c(10, 2), 1, 3, 1), (6, 4));
        // Nothing lost: the same value as the incremental credit (1 + 2).
        assert_eq!(recount_one(c(10, 2), 1, 7, 2), (3, 0));
        // The map holds one more than the counters believe (an open counted
        // after the baseline): raised, the counter clamped at 0.
        assert_eq!(recount_one(c(5, 0), 0, 6, 0), (0, -1));
        // A drifted count (the 288 with nothing open) heals at once.
        assert_eq!(recount_one(c(400, 112), 0, 0, 0), (288, 288));
        // After the write the kernel's own opens and closes apply exactly:
        // 3 opens and 1 close later, active = 2 + 3 - 1.
        let (gc, _) = recount_one(c(10, 2), 1, 3, 1);
        assert_eq!(c(13, 3).active(gc), 4);
    }

    #[test]
    fn recount_counts_open_flows_opened_before_the_baseline_on_known_backends() {
        let base = Baseline {
            at_ns: NOW,
            backends: [1u32, 2]
                .into_iter()
                .map(|id| {
                    let e = BaseEntry {
                        ident: (1, std::net::Ipv4Addr::new(10, 244, 0, id as u8), 8080),
                        conns: ConnCounts::default(),
                        gc: 0,
                    };
                    (id, e)
                })
                .collect(),
        };
        let mut fwd = Vec::new();
        let mut add = |port: u16, state: u32, backend: u32, created: u64| {
            let [(k, mut v), _] = flow(port, state, 0, 0, backend);
            v.created_ns = created;
            fwd.push((k, v));
        };
        add(1, ct_state::SYN, 1, NOW - S); // counted
        add(2, ct_state::ESTABLISHED, 1, NOW); // counted (at the baseline)
        add(3, ct_state::UDP, 2, NOW - S); // counted
        add(4, ct_state::CLOSING, 2, NOW - S); // closed: its close is counted
        add(5, ct_state::ESTABLISHED, 2, NOW + 1); // opened after the baseline
        add(6, ct_state::ESTABLISHED, 9, NOW - S); // backend unknown
        let mut rc = Recount::new(base, &fwd);
        assert_eq!(rc.open, FastMap::from_iter([(1, 2), (2, 1)]));
        rc.removed(&fwd[0].1, true);
        rc.removed(&fwd[4].1, false); // not counted: not removed either
        assert_eq!(rc.removed, FastMap::from_iter([(1, 1)]));
        assert_eq!(rc.vanished, 1);
    }
}
