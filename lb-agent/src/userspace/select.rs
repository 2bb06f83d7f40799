//! Backend selection, the kernel's algorithms over an immutable snapshot.
//!
//! A [`Selector`] is built from a service's spec at every change and swapped
//! in whole, so a pick never sees half an update. It holds the backends that
//! take new flows (active, weight > 0) and the same table the kernel would:
//! the weighted slot list ([`table::weighted_slots`]) for random and
//! round-robin, the Maglev table ([`maglev::build`], keyed by
//! [`maglev::backend_key`]) for maglev and source-hash. Maglev hashes the
//! 5-tuple and source-hash the client IP with `lb_common`'s `flow_hash` and
//! `src_hash`, fed the wire-order values the kernel sees, so both paths send a
//! flow to the same backend.
//!
//! Least-conn is exact here: the backend with the fewest open connections per
//! unit of weight, ties broken round-robin, where the kernel samples two. The
//! count includes connects in progress and is taken under a per-service lock
//! together with the increment, so concurrent picks cannot pile onto one
//! backend.
//!
//! Affinity (`affinity_timeout`) works as in `lb-ebpf/src/select.rs`: for any
//! algorithm, a client IP that picked a backend less than the timeout ago gets
//! it again while it still takes new flows; the entry's clock starts at the
//! pick that made it and is not refreshed by later hits.
//!
//! QoS limits (docs/policies.md): a backend whose open flows reach its limit
//! is skipped, as if a retry had tried it: the next slot's backend takes
//! the flow (every slot is looked at, where the kernel looks at
//! `lb_common::QOS_PROBE`). The count and the increment are taken under the
//! pick lock, so the limit is never passed. Nothing left: `BackendsFull`.
//!
//! A gRPC (L7) service ignores `algorithm` and affinity: its calls are picked
//! by `grpc::balance` over [`Selector::candidates`], and no table is built.
//! With a locality policy's `spill_outstanding` (docs/policies.md,
//! "Locality"), the selector also holds the backends the resolution drained
//! that have a `spill_weight`, after the others ([`Selector::with_spill`]);
//! the pick turns to them only while every candidate is busy.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use lb_api::{Algorithm, GrpcPolicy, Service, ServiceAddr};
use lb_common::limits;

use crate::datapath::{maglev, table};
use crate::userspace::stats::{BackendCounters, DropReason, ServiceCounters};

/// A backend's identity within a service.
pub(crate) type BackendKey = (IpAddr, u16);

/// A backend and its counters; shared by the service and its open flows.
#[derive(Debug)]
pub(crate) struct BackendEntry {
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    /// Shared with the backend's connections (L4 flows, gRPC pools), which
    /// must not keep the entry alive.
    pub(crate) counters: Arc<BackendCounters>,
}

impl BackendEntry {
    pub(crate) fn new(ip: IpAddr, port: u16) -> Self {
        BackendEntry {
            ip,
            port,
            counters: Arc::default(),
        }
    }
    pub(crate) fn key(&self) -> BackendKey {
        (self.ip, self.port)
    }
    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
    fn active(&self) -> u64 {
        self.counters.active.load(Relaxed)
    }
}

/// A new flow as the algorithms see it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Flow {
    pub(crate) client: SocketAddr,
    pub(crate) service: ServiceAddr,
}

/// Network order in a native integer, as the kernel reads it from a packet.
/// An IPv6 address folds to the XOR of its four 32-bit words (each read
/// the same way): what the kernel's IPv6 path must hash to agree.
fn wire(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => u32::from_ne_bytes(v4.octets()),
        IpAddr::V6(v6) => v6
            .octets()
            .chunks_exact(4)
            .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
            .fold(0, |a, w| a ^ w),
    }
}

impl Flow {
    /// The kernel's Maglev key (`lb_common::flow_hash` on the wire values).
    pub(crate) fn flow_hash(&self) -> u32 {
        lb_common::flow_hash(
            wire(self.client.ip()),
            wire(self.service.vip),
            self.client.port().to_be(),
            self.service.port.to_be(),
            crate::datapath::abi::proto_number(self.service.protocol),
        )
    }
    /// The kernel's source-hash key.
    pub(crate) fn src_hash(&self) -> u32 {
        lb_common::src_hash(wire(self.client.ip()))
    }
}

/// The backends that take new flows, first occurrence of each ip:port.
fn eligible(svc: &Service) -> impl Iterator<Item = &lb_api::Backend> {
    lb_api::validate::live_backends(&svc.backends)
}

/// One version of a service's selection state.
#[derive(Debug)]
pub(crate) struct Selector {
    algorithm: Algorithm,
    affinity: Option<Duration>,
    /// Backends that take new flows, in the service's order; then (gRPC
    /// mode) the spill backends, from `preferred` on.
    backends: Vec<Arc<BackendEntry>>,
    weights: Vec<u32>,
    /// How many of `backends` are candidates; the rest are spill backends.
    preferred: usize,
    /// Outstanding calls on every candidate that open the spill backends
    /// (0: never).
    spill_at: u32,
    /// QoS limit of each of `backends` (0: none); all 0 without limits.
    limits: Vec<u32>,
    limited: bool,
    /// Indexes into `backends`: the weighted slot list or the Maglev table
    /// (empty for least-conn, which looks at every backend).
    table: Vec<u32>,
    index: HashMap<BackendKey, usize>,
}

impl Selector {
    /// Builds the selection for `svc`; `entries` must hold every backend of
    /// the service (what is missing is left out).
    pub(crate) fn new(
        svc: &Service,
        entries: &HashMap<BackendKey, Arc<BackendEntry>>,
    ) -> Result<Selector, String> {
        let mut backends = Vec::new();
        let mut weights = Vec::new();
        let mut limits = Vec::new();
        for b in eligible(svc) {
            if let Some(e) = entries.get(&(b.ip, b.port)) {
                backends.push(e.clone());
                weights.push(b.weight);
                limits.push(svc.limit_of(b).unwrap_or(0));
            }
        }
        let preferred = backends.len();
        // The gRPC spill-over: active backends the locality resolution
        // drained, with their weight before it (each ip:port once).
        let spill_at = match (&svc.grpc, &svc.locality) {
            (Some(_), Some(l)) => l.spill_outstanding.unwrap_or(0),
            _ => 0,
        };
        if spill_at != 0 {
            let mut seen: std::collections::HashSet<BackendKey> =
                backends.iter().map(|b| b.key()).collect();
            for b in &svc.backends {
                let Some(w) = b.spill_weight.filter(|&w| w > 0) else {
                    continue;
                };
                if b.state != lb_api::BackendState::Active || !seen.insert((b.ip, b.port)) {
                    continue;
                }
                if let Some(e) = entries.get(&(b.ip, b.port)) {
                    backends.push(e.clone());
                    weights.push(w);
                    limits.push(svc.limit_of(b).unwrap_or(0));
                }
            }
        }
        let limited = limits.iter().any(|&l| l != 0);
        let table = match svc.algorithm {
            _ if backends.is_empty() || svc.grpc.is_some() => Vec::new(),
            Algorithm::LeastConn => Vec::new(),
            Algorithm::Maglev | Algorithm::SourceHash => {
                let mb: Vec<maglev::MaglevBackend> = backends
                    .iter()
                    .zip(&weights)
                    .enumerate()
                    .map(|(i, (b, &weight))| maglev::MaglevBackend {
                        id: i as u32,
                        key: maglev::backend_key(b.ip, b.port),
                        weight,
                    })
                    .collect();
                maglev::build(&mb, svc.maglev_m()).map_err(|e| e.to_string())?
            }
            Algorithm::Random | Algorithm::RoundRobin => {
                let wb: Vec<(u32, u32)> = (0..backends.len() as u32).zip(weights.clone()).collect();
                table::weighted_slots(&wb, limits::MAX_WEIGHTED_TABLE)
            }
        };
        let index = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.key(), i))
            .collect();
        Ok(Selector {
            algorithm: svc.algorithm,
            affinity: svc.affinity_timeout,
            backends,
            weights,
            preferred,
            spill_at,
            limits,
            limited,
            table,
            index,
        })
    }

    /// The outstanding calls on every candidate at which the pick also
    /// takes the spill backends (0: never, or none to spill to).
    pub(crate) fn spill_at(&self) -> u32 {
        if self.backends.len() > self.preferred {
            self.spill_at
        } else {
            0
        }
    }

    /// [`Self::candidates`] followed by the spill backends and their
    /// weights: indexes below `candidates().0.len()` are the same.
    pub(crate) fn with_spill(&self) -> (&[Arc<BackendEntry>], &[u32]) {
        (&self.backends, &self.weights)
    }

    /// The QoS limit of backend `i` (0: none).
    pub(crate) fn limit(&self, i: usize) -> u32 {
        self.limits.get(i).copied().unwrap_or(0)
    }

    /// Whether backend `i`'s open flows (L4) reach its limit.
    fn full(&self, i: usize) -> bool {
        let l = self.limit(i);
        l != 0 && self.backends[i].active() >= u64::from(l)
    }

    /// Index of the backend for a new flow, skipping `excluded` (backends a
    /// retry already tried); `None` if nothing is left. `rr` is the service's
    /// round-robin counter.
    pub(crate) fn choose(
        &self,
        rr: &AtomicU64,
        flow: &Flow,
        excluded: &[BackendKey],
    ) -> Option<usize> {
        if self.backends.is_empty() {
            return None;
        }
        let start = match self.algorithm {
            Algorithm::LeastConn => return self.least_conn(rr, excluded),
            Algorithm::RoundRobin => rr.fetch_add(1, Relaxed) as usize,
            Algorithm::Maglev => flow.flow_hash() as usize,
            Algorithm::SourceHash => flow.src_hash() as usize,
            Algorithm::Random => random_u32() as usize,
        };
        // The kernel's slot, or (on a retry) the next slot whose backend was
        // not tried yet.
        let len = self.table.len();
        if len == 0 {
            return None;
        }
        (0..len)
            .map(|k| self.table[(start % len + k) % len] as usize)
            .find(|&i| !excluded.contains(&self.backends[i].key()) && !self.full(i))
    }

    /// The fewest active connections per unit of weight; among equals, the
    /// first at or after a rotating start.
    fn least_conn(&self, rr: &AtomicU64, excluded: &[BackendKey]) -> Option<usize> {
        let n = self.backends.len();
        let start = (rr.fetch_add(1, Relaxed) % n as u64) as usize;
        let mut best: Option<(usize, u128, u128)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if excluded.contains(&self.backends[i].key()) || self.full(i) {
                continue;
            }
            let (a, w) = (
                u128::from(self.backends[i].active()),
                u128::from(self.weights[i]),
            );
            // a / w < best_a / best_w, without division.
            if best.is_none_or(|(_, ba, bw)| a * bw < ba * w) {
                best = Some((i, a, w));
            }
        }
        best.map(|(i, _, _)| i)
    }

    /// The backends that take new flows and their weights (all > 0), in the
    /// service's order.
    pub(crate) fn candidates(&self) -> (&[Arc<BackendEntry>], &[u32]) {
        (
            &self.backends[..self.preferred],
            &self.weights[..self.preferred],
        )
    }

    #[cfg(test)]
    pub(crate) fn table(&self) -> &[u32] {
        &self.table
    }
}

/// A backend picked for a flow: counted as active until dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    backend: Arc<BackendEntry>,
}

impl Lease {
    fn new(backend: Arc<BackendEntry>) -> Self {
        backend.counters.active.fetch_add(1, Relaxed);
        Lease { backend }
    }
    pub(crate) fn backend(&self) -> &BackendEntry {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.counters.active.fetch_sub(1, Relaxed);
    }
}

/// A flow handed to a backend: counted as the service's new and active flow
/// (and the backend's new one) until dropped.
#[derive(Debug)]
pub(crate) struct Opened {
    svc: Arc<ServiceShared>,
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.svc.counters.active.fetch_sub(1, Relaxed);
    }
}

#[derive(Clone, Copy, Debug)]
struct Affinity {
    backend: BackendKey,
    since: Instant,
}

/// A running service's selection and counters, shared by its tasks.
#[derive(Debug)]
pub(crate) struct ServiceShared {
    pub(crate) addr: ServiceAddr,
    selector: RwLock<Arc<Selector>>,
    rr: AtomicU64,
    /// Held across least-conn's choice and the lease's increment.
    pick_lock: Mutex<()>,
    affinity: Mutex<HashMap<IpAddr, Affinity>>,
    max_affinity: usize,
    /// `Some` for a gRPC (L7) service.
    policy: RwLock<Option<Arc<GrpcPolicy>>>,
    pub(crate) counters: ServiceCounters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ServiceShared {
    pub(crate) fn new(addr: ServiceAddr, selector: Selector, max_affinity: usize) -> Self {
        ServiceShared {
            addr,
            selector: RwLock::new(Arc::new(selector)),
            rr: AtomicU64::new(0),
            pick_lock: Mutex::new(()),
            affinity: Mutex::new(HashMap::new()),
            max_affinity,
            policy: RwLock::new(None),
            counters: ServiceCounters::default(),
        }
    }

    /// The gRPC policy calls use from now on.
    pub(crate) fn set_policy(&self, policy: Option<GrpcPolicy>) {
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = policy.map(Arc::new);
    }

    pub(crate) fn policy(&self) -> Option<Arc<GrpcPolicy>> {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// New flows use `selector` from now on; open ones keep their backend.
    pub(crate) fn set_selector(&self, selector: Selector) {
        *self
            .selector
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(selector);
    }

    pub(crate) fn selector(&self) -> Arc<Selector> {
        self.selector
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Picks a backend for a new flow, not one of `excluded`.
    #[cfg(test)]
    pub(crate) fn pick(&self, flow: &Flow, excluded: &[BackendKey]) -> Option<Lease> {
        self.try_pick(flow, excluded).ok()
    }

    /// [`Self::pick`], saying why nothing was picked: `NoBackend` (none left
    /// that takes new flows, `excluded` aside) or `BackendsFull` (the others
    /// are at their QoS limits).
    pub(crate) fn try_pick(
        &self,
        flow: &Flow,
        excluded: &[BackendKey],
    ) -> Result<Lease, DropReason> {
        let sel = self.selector();
        if sel.backends.is_empty() {
            return Err(DropReason::NoBackend);
        }
        let _exact =
            (sel.algorithm == Algorithm::LeastConn || sel.limited).then(|| lock(&self.pick_lock));
        let now = Instant::now();
        let client = flow.client.ip();
        let sticky = sel.affinity.filter(|_| excluded.is_empty()).and_then(|t| {
            let a = *lock(&self.affinity).get(&client)?;
            let fresh = now.saturating_duration_since(a.since) < t;
            fresh.then(|| sel.index.get(&a.backend).copied()).flatten()
        });
        // A backend at its limit loses its clients' new flows too.
        let sticky = sticky.filter(|&i| !sel.full(i));
        let i = match sticky {
            Some(i) => i,
            None => {
                let Some(i) = sel.choose(&self.rr, flow, excluded) else {
                    let left =
                        (0..sel.backends.len()).any(|i| !excluded.contains(&sel.backends[i].key()));
                    return Err(if sel.limited && left {
                        DropReason::BackendsFull
                    } else {
                        DropReason::NoBackend
                    });
                };
                if let Some(t) = sel.affinity {
                    self.remember(client, sel.backends[i].key(), now, t);
                }
                i
            }
        };
        Ok(Lease::new(sel.backends[i].clone()))
    }

    /// A flow handed over by the previous agent, to `backend`: active (not
    /// new) until the guards drop. A backend the service no longer has gets
    /// an entry of its own.
    pub(crate) fn resume(self: &Arc<Self>, backend: SocketAddr) -> (Lease, Opened) {
        let key = (backend.ip(), backend.port());
        let sel = self.selector();
        let entry = sel
            .index
            .get(&key)
            .map(|&i| sel.backends[i].clone())
            .unwrap_or_else(|| Arc::new(BackendEntry::new(key.0, key.1)));
        self.counters.active.fetch_add(1, Relaxed);
        (Lease::new(entry), Opened { svc: self.clone() })
    }

    /// Counts a flow that reached `backend`; the guard keeps it active.
    pub(crate) fn opened(self: &Arc<Self>, backend: &BackendEntry) -> Opened {
        backend.counters.new.fetch_add(1, Relaxed);
        self.counters.new.fetch_add(1, Relaxed);
        self.counters.active.fetch_add(1, Relaxed);
        Opened { svc: self.clone() }
    }

    fn remember(&self, client: IpAddr, backend: BackendKey, now: Instant, timeout: Duration) {
        let mut m = lock(&self.affinity);
        if m.len() >= self.max_affinity && !m.contains_key(&client) {
            m.retain(|_, a| now.saturating_duration_since(a.since) < timeout);
            if m.len() >= self.max_affinity {
                // Still full of live entries: this client goes without.
                return;
            }
        }
        m.insert(
            client,
            Affinity {
                backend,
                since: now,
            },
        );
    }
}

/// A fast per-thread xorshift64* generator, seeded from the std hasher's keys.
pub(crate) fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> =
            Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

fn random_u32() -> u32 {
    (random_u64() >> 32) as u32
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use lb_api::{Backend, BackendState, Protocol};

    fn ip(i: u8) -> IpAddr {
        Ipv4Addr::new(10, 244, 10 + i, 2).into()
    }

    fn svc(algo: Algorithm, weights: &[u32]) -> Service {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Backend {
                weight: w,
                ..Backend::new(ip(i as u8 + 1), 8080)
            })
            .collect();
        Service::new(
            "t/s:p",
            Ipv4Addr::new(10, 96, 0, 1),
            80,
            Protocol::Tcp,
            algo,
            backends,
        )
    }

    fn entries(s: &Service) -> HashMap<BackendKey, Arc<BackendEntry>> {
        s.backends
            .iter()
            .map(|b| ((b.ip, b.port), Arc::new(BackendEntry::new(b.ip, b.port))))
            .collect()
    }

    fn shared(s: &Service) -> ServiceShared {
        let sel = Selector::new(s, &entries(s)).unwrap();
        ServiceShared::new(s.addr(), sel, 1024)
    }

    fn flow(s: &Service, client: IpAddr, port: u16) -> Flow {
        Flow {
            client: SocketAddr::new(client, port),
            service: s.addr(),
        }
    }

    fn v4(ip: IpAddr) -> Ipv4Addr {
        match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => panic!("not IPv4"),
        }
    }

    fn client(n: u32) -> IpAddr {
        Ipv4Addr::from(0x0af4_0000 + n).into()
    }

    /// Picks `n` flows from distinct clients, keeping (`hold`) or dropping
    /// each lease; returns how many went to each backend ip.
    fn picks(
        sh: &ServiceShared,
        s: &Service,
        n: u32,
        hold: bool,
    ) -> (HashMap<IpAddr, u32>, Vec<Lease>) {
        let mut held = Vec::new();
        let mut c = HashMap::new();
        for k in 0..n {
            let l = sh
                .pick(&flow(s, client(k), 40_000 + (k % 20_000) as u16), &[])
                .expect("a backend");
            *c.entry(l.backend().ip).or_insert(0) += 1;
            if hold {
                held.push(l);
            }
        }
        (c, held)
    }

    #[test]
    fn round_robin_is_exact_and_weighted() {
        let s = svc(Algorithm::RoundRobin, &[1, 1, 1]);
        let sh = shared(&s);
        // In order, one each, every cycle.
        let order: Vec<IpAddr> = (0..9)
            .map(|k| {
                sh.pick(&flow(&s, client(k), 1000), &[])
                    .unwrap()
                    .backend()
                    .ip
            })
            .collect();
        let one = [ip(1), ip(2), ip(3)];
        assert_eq!(order, [one, one, one].concat());
        let s = svc(Algorithm::RoundRobin, &[3, 1, 2]);
        let (c, _) = picks(&shared(&s), &s, 600, false);
        assert_eq!((c[&ip(1)], c[&ip(2)], c[&ip(3)]), (300, 100, 200));
    }

    #[test]
    fn random_respects_weights() {
        let s = svc(Algorithm::Random, &[1, 3]);
        let (c, _) = picks(&shared(&s), &s, 8000, false);
        let share = f64::from(c[&ip(2)]) / 8000.0;
        assert!((share - 0.75).abs() < 0.03, "{c:?}");
    }

    #[test]
    fn drained_backends_get_nothing() {
        let mut s = svc(Algorithm::RoundRobin, &[1, 1, 0, 1]);
        s.backends[1].state = BackendState::Terminating;
        for algo in Algorithm::ALL {
            s.algorithm = algo;
            let (c, _) = picks(&shared(&s), &s, 300, false);
            assert!(!c.contains_key(&ip(2)), "{algo}: terminating got {c:?}");
            assert!(!c.contains_key(&ip(3)), "{algo}: weight 0 got {c:?}");
            assert_eq!(c.values().sum::<u32>(), 300);
        }
        // Nothing that takes new flows: no pick.
        let mut s = svc(Algorithm::LeastConn, &[0, 1]);
        s.backends[1].state = BackendState::Terminating;
        let sh = shared(&s);
        assert!(sh.pick(&flow(&s, client(1), 1), &[]).is_none());
        let s = svc(Algorithm::Maglev, &[]);
        assert!(shared(&s).pick(&flow(&s, client(1), 1), &[]).is_none());
    }

    #[test]
    fn least_conn_picks_the_minimum_exactly() {
        let s = svc(Algorithm::LeastConn, &[1, 1, 1]);
        let sh = shared(&s);
        // Held leases spread exactly evenly: ties go round-robin.
        let (c, mut held) = picks(&sh, &s, 9, true);
        assert_eq!((c[&ip(1)], c[&ip(2)], c[&ip(3)]), (3, 3, 3));
        // Free two on backend 2: the next two picks go there, and only there.
        let mut freed = 0;
        held.retain(|l| {
            let keep = !(l.backend().ip == ip(2) && freed < 2);
            freed += usize::from(!keep);
            keep
        });
        let (c, more) = picks(&sh, &s, 2, true);
        assert_eq!(c, HashMap::from([(ip(2), 2)]));
        held.extend(more);
        // Active counts are exact, and dropping leases brings them to zero.
        let sel = sh.selector();
        let active: Vec<u64> = sel.backends.iter().map(|b| b.active()).collect();
        assert_eq!(active, [3, 3, 3]);
        drop(held);
        assert!(sel.backends.iter().all(|b| b.active() == 0));
    }

    #[test]
    fn least_conn_is_weighted() {
        let s = svc(Algorithm::LeastConn, &[2, 1]);
        let sh = shared(&s);
        let (c, _held) = picks(&sh, &s, 30, true);
        assert_eq!((c[&ip(1)], c[&ip(2)]), (20, 10));
        // With everything free again, a single pick never goes above min.
        let s = svc(Algorithm::LeastConn, &[1, 1, 1]);
        let sh = shared(&s);
        let a = sh.pick(&flow(&s, client(0), 1), &[]).unwrap();
        let b = sh.pick(&flow(&s, client(0), 2), &[]).unwrap();
        assert_ne!(a.backend().ip, b.backend().ip);
        let c = sh.pick(&flow(&s, client(0), 3), &[]).unwrap();
        assert_ne!(c.backend().ip, a.backend().ip);
        assert_ne!(c.backend().ip, b.backend().ip);
    }

    #[test]
    fn maglev_agrees_with_the_kernel_table() {
        for algo in [Algorithm::Maglev, Algorithm::SourceHash] {
            let mut s = svc(algo, &[1, 2, 1, 1]);
            s.maglev_table_size = Some(1009);
            let sh = shared(&s);
            // The same table the map writer would build (ids are backend ips here).
            let mb: Vec<maglev::MaglevBackend> = s
                .backends
                .iter()
                .map(|b| maglev::MaglevBackend {
                    id: u32::from(v4(b.ip)),
                    key: maglev::backend_key(b.ip, b.port),
                    weight: b.weight,
                })
                .collect();
            let want = maglev::build(&mb, 1009).unwrap();
            let sel = sh.selector();
            let got: Vec<u32> = sel
                .table()
                .iter()
                .map(|&i| u32::from(v4(sel.backends[i as usize].ip)))
                .collect();
            assert_eq!(got, want, "{algo}: same table");
            // Each flow lands where the kernel's hash of its wire values says.
            for k in 0..200u32 {
                let (cip, cport) = (client(k * 7919), 1024 + k as u16 * 13);
                let w = |ip: IpAddr| u32::from_ne_bytes(v4(ip).octets());
                let h = if algo == Algorithm::Maglev {
                    lb_common::flow_hash(w(cip), w(s.vip), cport.to_be(), s.port.to_be(), 6)
                } else {
                    lb_common::src_hash(w(cip))
                };
                let expect = IpAddr::from(Ipv4Addr::from(want[(h % 1009) as usize]));
                let l = sh.pick(&flow(&s, cip, cport), &[]).unwrap();
                assert_eq!(l.backend().ip, expect, "{algo} flow {k}");
            }
        }
    }

    #[test]
    fn retries_skip_tried_backends() {
        for algo in Algorithm::ALL {
            let s = svc(algo, &[1, 1, 1]);
            let sh = shared(&s);
            let f = flow(&s, client(5), 5555);
            let a = sh.pick(&f, &[]).unwrap().backend().key();
            let b = sh.pick(&f, &[a]).unwrap().backend().key();
            let c = sh.pick(&f, &[a, b]).unwrap().backend().key();
            assert!(a != b && b != c && a != c, "{algo}: {a:?} {b:?} {c:?}");
            assert!(sh.pick(&f, &[a, b, c]).is_none(), "{algo}");
        }
    }

    #[test]
    fn affinity_sticks_until_timeout_and_follows_drains() {
        let mut s = svc(Algorithm::RoundRobin, &[1, 1, 1]);
        s.affinity_timeout = Some(Duration::from_secs(2));
        let sh = shared(&s);
        let pick = |c: u32, p: u16| sh.pick(&flow(&s, client(c), p), &[]).unwrap().backend().ip;
        let first = pick(1, 1);
        for p in 2..20 {
            assert_eq!(pick(1, p), first, "sticky");
        }
        // Another client is not affected (round-robin moved on once).
        assert_ne!(pick(2, 1), first);
        // A drained backend loses its clients at once.
        let mut drained = s.clone();
        for b in &mut drained.backends {
            if b.ip == first {
                b.weight = 0;
            }
        }
        sh.set_selector(Selector::new(&drained, &entries(&s)).unwrap());
        let moved = pick(1, 50);
        assert_ne!(moved, first);
        // The new choice sticks, and expires the timeout after the pick that
        // made it: the hit in between does not refresh it.
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(pick(1, 51), moved);
        std::thread::sleep(Duration::from_millis(1000));
        let after = pick(1, 52);
        assert_ne!(after, moved);
        assert_eq!(pick(1, 53), after, "sticky again");
    }

    #[test]
    fn affinity_table_is_bounded() {
        let mut s = svc(Algorithm::RoundRobin, &[1, 1]);
        s.affinity_timeout = Some(Duration::from_secs(60));
        let sel = Selector::new(&s, &entries(&s)).unwrap();
        let sh = ServiceShared::new(s.addr(), sel, 4);
        for k in 0..10 {
            sh.pick(&flow(&s, client(k), 1), &[]).unwrap();
        }
        assert_eq!(lock(&sh.affinity).len(), 4);
        // Clients without an entry still get a backend.
        assert!(sh.pick(&flow(&s, client(99), 1), &[]).is_some());
    }

    #[test]
    fn the_grpc_mode_builds_no_table() {
        // The algorithm's rules do not apply to per-call balancing.
        let mut g = svc(Algorithm::Maglev, &[1, 1]);
        g.maglev_table_size = Some(101);
        g.grpc = Some(GrpcPolicy::default());
        assert_eq!(g.validate(), Ok(()));
        assert!(Selector::new(&g, &entries(&g)).unwrap().table().is_empty());
    }

    /// QoS limits in the L4 proxy: a backend at its limit is skipped for
    /// every algorithm; all at their limit: `BackendsFull`; a closed flow
    /// frees a slot.
    #[test]
    fn limits_skip_full_backends() {
        for algo in [
            Algorithm::Random,
            Algorithm::RoundRobin,
            Algorithm::Maglev,
            Algorithm::SourceHash,
            Algorithm::LeastConn,
        ] {
            let mut s = svc(algo, &[1, 1, 1]);
            s.max_per_backend = Some(2);
            s.backends[0].max = Some(1);
            let sh = shared(&s);
            let mut held = Vec::new();
            for k in 0..5 {
                held.push(
                    sh.try_pick(&flow(&s, client(1), 1000 + k), &[])
                        .expect("room"),
                );
            }
            let n = |i: usize| {
                held.iter()
                    .filter(|l: &&Lease| l.backend().ip == ip(i as u8 + 1))
                    .count()
            };
            assert_eq!((n(0), n(1), n(2)), (1, 2, 2), "{algo}");
            assert_eq!(
                sh.try_pick(&flow(&s, client(1), 2000), &[]).err(),
                Some(DropReason::BackendsFull),
                "{algo}"
            );
            let k = held.iter().position(|l| l.backend().ip == ip(1)).unwrap();
            held.remove(k);
            let l = sh.try_pick(&flow(&s, client(1), 2001), &[]).unwrap();
            assert_eq!(l.backend().ip, ip(1), "{algo}: the freed slot");
        }
        let s = svc(Algorithm::Random, &[]);
        assert_eq!(
            shared(&s).try_pick(&flow(&s, client(1), 1), &[]).err(),
            Some(DropReason::NoBackend)
        );
    }
}
