//! Per-call backend choice: least outstanding requests over two random
//! choices (P2C), weighted.
//!
//! Two distinct backends are drawn at random with probability proportional
//! to their weight, and the one with fewer outstanding calls per unit of
//! weight wins; on a tie, the first drawn. With no load this gives every
//! backend its weight's share; under load, a busy or slow backend loses to
//! almost any other. No lock is taken: two concurrent picks may see the same
//! counts, which P2C tolerates (it never sends everything to one "least"
//! backend, as a global minimum would).
//!
//! Candidates are the selector's backends that take new flows (active,
//! weight > 0): terminating and weight-0 backends get no new calls; nor do
//! backends ejected by outlier detection (`outlier::skipped`).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crate::userspace::select::{BackendEntry, BackendKey, ServiceShared, random_u64};

/// Picks one index among `n` candidates. `weight(i)` is 0 for one that must
/// not be picked; `outstanding(i)` is its calls in flight; `below(k)` is a
/// random number in `0..k` (k > 0).
pub(crate) fn p2c(
    n: usize,
    weight: impl Fn(usize) -> u32,
    outstanding: impl Fn(usize) -> u64,
    mut below: impl FnMut(u64) -> u64,
) -> Option<usize> {
    let total: u64 = (0..n).map(|i| u64::from(weight(i))).sum();
    if total == 0 {
        return None;
    }
    let a = weighted(n, &weight, None, below(total));
    let wa = u64::from(weight(a));
    if total == wa {
        return Some(a);
    }
    let b = weighted(n, &weight, Some(a), below(total - wa));
    let wb = u64::from(weight(b));
    // outstanding(b) / wb < outstanding(a) / wa, without division.
    let (oa, ob) = (
        u128::from(outstanding(a)) * u128::from(wb),
        u128::from(outstanding(b)) * u128::from(wa),
    );
    Some(if ob < oa { b } else { a })
}

/// The candidate whose weight interval holds `r`, leaving out `skip`.
fn weighted(n: usize, weight: &impl Fn(usize) -> u32, skip: Option<usize>, r: u64) -> usize {
    let mut r = r;
    let mut last = 0;
    for i in (0..n).filter(|&i| Some(i) != skip) {
        let w = u64::from(weight(i));
        if w == 0 {
            continue;
        }
        if r < w {
            return i;
        }
        r -= w;
        last = i;
    }
    // Only if weights changed between the sum and here; any usable one will do.
    last
}

/// A uniform random number in `0..k`.
fn below(k: u64) -> u64 {
    ((u128::from(random_u64()) * u128::from(k)) >> 64) as u64
}

/// A backend picked for a call: counted as an outstanding call until dropped.
#[derive(Debug)]
pub(crate) struct CallLease {
    backend: Arc<BackendEntry>,
}

impl CallLease {
    pub(crate) fn new(backend: Arc<BackendEntry>) -> Self {
        backend.counters.active_requests.fetch_add(1, Relaxed);
        CallLease { backend }
    }

    pub(crate) fn backend(&self) -> &Arc<BackendEntry> {
        &self.backend
    }
}

impl Drop for CallLease {
    fn drop(&mut self) {
        self.backend.counters.active_requests.fetch_sub(1, Relaxed);
    }
}

/// Picks a backend for a call among those that take new flows, not one of
/// `excluded` (tried already).
pub(crate) fn pick(svc: &ServiceShared, excluded: &[BackendKey]) -> Option<CallLease> {
    let sel = svc.selector();
    let (backends, weights) = sel.candidates();
    // Passive outlier ejection (`outlier`): ejected backends are skipped.
    let ejected = super::outlier::skipped(svc, backends, excluded);
    let weight = |i: usize| {
        if excluded.contains(&backends[i].key()) || ejected.as_ref().is_some_and(|e| e[i]) {
            0
        } else {
            weights[i]
        }
    };
    let outstanding = |i: usize| backends[i].counters.active_requests.load(Relaxed);
    let i = p2c(backends.len(), weight, outstanding, below)?;
    Some(CallLease::new(backends[i].clone()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    use lb_api::{Algorithm, Backend, BackendState, GrpcPolicy, Protocol, Service};

    use super::*;
    use crate::userspace::select::Selector;

    /// Draws from a fixed list, each taken modulo the bound.
    fn script(draws: &[u64]) -> impl FnMut(u64) -> u64 + '_ {
        let mut it = draws.iter().cycle();
        move |k| it.next().unwrap() % k
    }

    #[test]
    fn p2c_takes_the_less_loaded_of_two() {
        let w = |_| 1;
        let load = [5u64, 0, 7];
        let out = |i: usize| load[i];
        // Draw 0 then (among the other two) 0 = index 1: 1 has less load.
        assert_eq!(p2c(3, w, out, script(&[0, 0])), Some(1));
        // Draw 2 then 0 = index 0: 5 < 7.
        assert_eq!(p2c(3, w, out, script(&[2, 0])), Some(0));
        // Draw 1 then anything: nothing beats 0.
        assert_eq!(p2c(3, w, out, script(&[1, 0])), Some(1));
        assert_eq!(p2c(3, w, out, script(&[1, 1])), Some(1));
        // Ties go to the first drawn.
        let flat = |_| 3;
        assert_eq!(p2c(3, w, flat, script(&[2, 0])), Some(2));
        assert_eq!(p2c(3, w, flat, script(&[0, 1])), Some(0));
    }

    #[test]
    fn p2c_compares_load_per_weight() {
        // 4 calls on weight 4 (1 per unit) beat 2 calls on weight 1.
        let weights = [4u32, 1];
        let load = [4u64, 2];
        let w = |i: usize| weights[i];
        let out = |i: usize| load[i];
        for draws in [[0u64, 0], [4, 0]] {
            assert_eq!(p2c(2, w, out, script(&draws)), Some(0), "{draws:?}");
        }
        // With 2 on weight 1 and 12 on weight 4, the light one wins.
        let load = [12u64, 2];
        let out = |i: usize| load[i];
        assert_eq!(p2c(2, w, out, script(&[0, 0])), Some(1));
    }

    #[test]
    fn p2c_skips_unusable_candidates() {
        let weights = [0u32, 1, 0];
        let w = |i: usize| weights[i];
        for r in 0..10 {
            assert_eq!(p2c(3, w, |_| 0, script(&[r, r + 1])), Some(1));
        }
        assert_eq!(p2c(3, |_| 0, |_| 0, script(&[0])), None);
        assert_eq!(p2c(0, |_| 1, |_| 0, script(&[0])), None);
    }

    #[test]
    fn p2c_without_load_follows_the_weights() {
        let weights = [1u32, 3, 0, 4];
        let mut c = [0u32; 4];
        let n = 40_000;
        for _ in 0..n {
            let i = p2c(4, |i| weights[i], |_| 0, below).unwrap();
            c[i] += 1;
        }
        assert_eq!(c[2], 0);
        for (i, want) in [(0, 1.0 / 8.0), (1, 3.0 / 8.0), (3, 4.0 / 8.0)] {
            let share = f64::from(c[i]) / f64::from(n);
            assert!((share - want).abs() < 0.015, "{i}: {c:?}");
        }
    }

    #[test]
    fn p2c_under_load_evens_out() {
        // Calls that never finish: P2C keeps the counts close together.
        let mut load = [0u64; 3];
        for _ in 0..3000 {
            let snapshot = load;
            let i = p2c(3, |_| 1, |i| snapshot[i], below).unwrap();
            load[i] += 1;
        }
        let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
        assert!(max - min <= 3, "{load:?}");
    }

    fn grpc_service(weights: &[u32]) -> Service {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Backend {
                weight: w,
                ..Backend::new(Ipv4Addr::new(10, 244, 11 + i as u8, 2), 50051)
            })
            .collect();
        let mut s = Service::new(
            "t/grpc:g",
            Ipv4Addr::new(10, 96, 0, 9),
            50051,
            Protocol::Tcp,
            // Ignored in the gRPC mode, and no table is built for it.
            Algorithm::Maglev,
            backends,
        );
        s.grpc = Some(GrpcPolicy::default());
        s
    }

    fn shared(s: &Service) -> ServiceShared {
        let entries = s
            .backends
            .iter()
            .map(|b| ((b.ip, b.port), Arc::new(BackendEntry::new(b.ip, b.port))))
            .collect();
        ServiceShared::new(s.addr(), Selector::new(s, &entries).unwrap(), 16)
    }

    #[test]
    fn pick_skips_terminating_drained_and_excluded() {
        let mut s = grpc_service(&[1, 1, 0, 1]);
        s.backends[1].state = BackendState::Terminating;
        let sh = shared(&s);
        let mut seen = HashMap::new();
        for _ in 0..300 {
            let l = pick(&sh, &[]).unwrap();
            *seen.entry(l.backend().ip).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen.contains_key(&s.backends[0].ip));
        assert!(seen.contains_key(&s.backends[3].ip));
        let first = (s.backends[0].ip, 50051);
        for _ in 0..50 {
            assert_eq!(pick(&sh, &[first]).unwrap().backend().ip, s.backends[3].ip);
        }
        let last = (s.backends[3].ip, 50051);
        assert!(pick(&sh, &[first, last]).is_none());
    }

    #[test]
    fn leases_count_outstanding_calls() {
        let s = grpc_service(&[1, 1]);
        let sh = shared(&s);
        let held: Vec<CallLease> = (0..10).map(|_| pick(&sh, &[]).unwrap()).collect();
        let sel = sh.selector();
        let counts: Vec<u64> = sel
            .candidates()
            .0
            .iter()
            .map(|b| b.counters.active_requests.load(Relaxed))
            .collect();
        assert_eq!(counts.iter().sum::<u64>(), 10);
        // Least outstanding: held calls end up even (P2C with two backends
        // always compares both).
        assert_eq!(counts, [5, 5]);
        drop(held);
        assert!(
            sel.candidates()
                .0
                .iter()
                .all(|b| b.counters.active_requests.load(Relaxed) == 0)
        );
    }
}
