//! Passive outlier ejection (per service and agent; off unless the
//! service's `grpc.outlier_detection` is set).
//!
//! - **Failures**: an attempt answered UNAVAILABLE (14), a connect that
//!   failed, a stream the backend reset or refused, or a connection that
//!   broke under a call. Not failures: the proxy's own deadline, a client
//!   that went away, a graceful GOAWAY's unprocessed streams, and any other
//!   status (INVALID_ARGUMENT, NOT_FOUND, ... are the application's
//!   answers: the backend is alive). Any answer that is not a failure
//!   resets the count.
//! - **Ejection**: `consecutive_failures` in a row eject the backend for
//!   `base_ejection_time` × its multiplier (the ejections counted so far,
//!   this one included), capped at `max(base, max_ejection_time)`. Each
//!   `base_ejection_time` spent back in the pick without a new ejection
//!   takes one off the multiplier (gRFC A50 lowers it once per interval).
//! - **Share**: an ejection is made only while fewer than
//!   [`max_ejected`] of the service's candidates (backends that take new
//!   calls: active, weight > 0, healthy) are ejected. It is at least one
//!   (as Envoy: a small service still ejects its one bad backend) and, below
//!   100%, at most all but one. A failure refused for the share keeps the
//!   backend's count at the threshold: its next failure tries again.
//! - **Return**: lazily, when the time is up (no timer): the pick compares
//!   the deadline with the clock. The pick reads one atomic per candidate
//!   (`BackendOutlier::ejected_at`); failures at the threshold take the
//!   service's lock.
//! - **Panic**: if every candidate that the pick may use is ejected (only
//!   with `max_ejection_percent: 100`, or when the candidates shrank under
//!   the ejections), the pick ignores ejection, as the health checks' panic
//!   mode does.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use lb_api::OutlierDetection;
use tracing::{debug, warn};

use crate::userspace::select::{BackendEntry, BackendKey, ServiceShared};

/// The clock origin of [`BackendOutlier::until_ms`].
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// `t` in milliseconds since [`origin`], at least 1 (0 means "not ejected").
fn millis(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(origin()).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// How many of `n` candidates may be ejected at once with `percent`.
pub(crate) fn max_ejected(n: usize, percent: u32) -> usize {
    if n == 0 || percent == 0 {
        return 0;
    }
    if percent >= 100 {
        return n;
    }
    if n == 1 {
        return 0;
    }
    (n * percent as usize / 100).clamp(1, n - 1)
}

/// One backend's ejections, as the service's lock sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tracker {
    /// The next ejection lasts `base × (multiplier + 1)`.
    multiplier: u32,
    /// Ejected until then.
    until: Option<Instant>,
    /// Since when the multiplier has not decayed (the last return).
    back_since: Option<Instant>,
}

impl Tracker {
    #[cfg(test)]
    fn ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Ends an ejection whose time is up and lowers the multiplier by one
    /// per `base_ejection_time` spent back since.
    fn settle(&mut self, cfg: &OutlierDetection, now: Instant) {
        if let Some(u) = self.until
            && now >= u
        {
            self.until = None;
            self.back_since = Some(u);
        }
        let base = cfg.base_ejection_time.max(Duration::from_millis(1));
        if let (None, Some(since)) = (self.until, self.back_since)
            && self.multiplier > 0
        {
            let periods = now.saturating_duration_since(since).as_nanos() / base.as_nanos();
            let k = u32::try_from(periods)
                .unwrap_or(u32::MAX)
                .min(self.multiplier);
            self.multiplier -= k;
            self.back_since = Some(since + base * k);
        }
    }

    /// Ejects the backend at `now`; how long for.
    pub(crate) fn eject(&mut self, cfg: &OutlierDetection, now: Instant) -> Duration {
        self.settle(cfg, now);
        self.multiplier = self.multiplier.saturating_add(1);
        let cap = cfg.max_ejection_time.max(cfg.base_ejection_time);
        let t = cfg
            .base_ejection_time
            .saturating_mul(self.multiplier)
            .min(cap);
        self.until = Some(now + t);
        t
    }

    #[cfg(test)]
    fn multiplier(&self, cfg: &OutlierDetection, now: Instant) -> u32 {
        let mut t = *self;
        t.settle(cfg, now);
        t.multiplier
    }
}

/// One backend's outlier state; it lives in the backend's counters.
#[derive(Debug, Default)]
pub(crate) struct BackendOutlier {
    /// Failures in a row.
    consecutive: AtomicU32,
    /// Ejected until then ([`millis`]); 0: not ejected. The pick reads it.
    until_ms: AtomicU64,
    /// Times ejected.
    ejections: AtomicU64,
    tracker: Mutex<Tracker>,
}

impl BackendOutlier {
    /// Whether the pick skips it at `now_ms` ([`now_ms`]).
    pub(crate) fn ejected_at(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms.load(Relaxed)
    }

    /// Milliseconds of ejection left (0: not ejected).
    pub(crate) fn ejected_for_ms(&self) -> u64 {
        self.until_ms.load(Relaxed).saturating_sub(now_ms())
    }

    pub(crate) fn ejections(&self) -> u64 {
        self.ejections.load(Relaxed)
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Relaxed)
    }

    /// Back in the pick at once (outlier detection turned off).
    pub(crate) fn clear(&self) {
        self.until_ms.store(0, Relaxed);
        self.consecutive.store(0, Relaxed);
    }
}

/// The clock the pick compares [`BackendOutlier::ejected_at`] with.
pub(crate) fn now_ms() -> u64 {
    millis(Instant::now())
}

/// A service's ejection decisions, one at a time (the share needs a
/// consistent count).
#[derive(Debug, Default)]
pub(crate) struct Outliers(Mutex<()>);

/// How an attempt on a backend ended, as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Resets the count.
    Success,
    /// Counts toward an ejection.
    Failure,
}

impl Outcome {
    /// A backend's gRPC status: only UNAVAILABLE is a failure.
    pub(crate) fn of_status(code: u32) -> Outcome {
        if code == 14 {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }
}

impl Outliers {
    /// Records how an attempt on `be` ended; ejects it at the threshold if
    /// the service's share allows. Nothing without a configuration.
    pub(crate) fn record(&self, svc: &ServiceShared, be: &BackendEntry, outcome: Outcome) {
        let Some(cfg) = svc.policy().and_then(|p| p.outlier_detection) else {
            return;
        };
        self.record_with(&cfg, svc, be, outcome, Instant::now());
    }

    fn record_with(
        &self,
        cfg: &OutlierDetection,
        svc: &ServiceShared,
        be: &BackendEntry,
        outcome: Outcome,
        now: Instant,
    ) {
        let o = &be.counters.outlier;
        if outcome == Outcome::Success {
            if o.consecutive.load(Relaxed) != 0 {
                o.consecutive.store(0, Relaxed);
            }
            return;
        }
        let now_ms = millis(now);
        if o.ejected_at(now_ms) {
            // A call that was in flight when it was ejected.
            return;
        }
        let n = o.consecutive.fetch_add(1, Relaxed).saturating_add(1);
        if n < cfg.consecutive_failures {
            return;
        }
        let _one = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if o.ejected_at(now_ms) {
            return;
        }
        let sel = svc.selector();
        // The spill backends too (locality spill-over): calls go there.
        let (candidates, _) = sel.with_spill();
        if !candidates.iter().any(|c| c.key() == be.key()) {
            // Takes no new calls anyway (drained, unhealthy, removed).
            return;
        }
        let out = candidates
            .iter()
            .filter(|c| c.counters.outlier.ejected_at(now_ms))
            .count();
        let limit = max_ejected(candidates.len(), cfg.max_ejection_percent);
        if out >= limit {
            debug!(
                service = %svc.addr,
                backend = %be.addr(),
                failures = n,
                ejected = out,
                limit,
                "gRPC backend not ejected: max_ejection_percent reached"
            );
            return;
        }
        let t = o
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .eject(cfg, now);
        o.until_ms.store(millis(now + t), Relaxed);
        o.consecutive.store(0, Relaxed);
        let times = o.ejections.fetch_add(1, Relaxed) + 1;
        warn!(
            service = %svc.addr,
            backend = %be.addr(),
            failures = n,
            ejected_for = ?t,
            times,
            "gRPC backend ejected (outlier detection)"
        );
    }
}

/// The pick's hook: which of `backends` it must skip now (the ejected
/// ones), or `None` when it skips none. When skipping would leave no
/// backend outside `excluded`, none is skipped (panic).
pub(crate) fn skipped(
    svc: &ServiceShared,
    backends: &[Arc<BackendEntry>],
    excluded: &[BackendKey],
) -> Option<Vec<bool>> {
    let now = now_ms();
    if !backends.iter().any(|b| b.counters.outlier.ejected_at(now)) {
        return None;
    }
    // Ejections of a service whose outlier detection was turned off end.
    if svc.policy().and_then(|p| p.outlier_detection).is_none() {
        backends.iter().for_each(|b| b.counters.outlier.clear());
        return None;
    }
    let mask: Vec<bool> = backends
        .iter()
        .map(|b| b.counters.outlier.ejected_at(now))
        .collect();
    let left = backends
        .iter()
        .zip(&mask)
        .any(|(b, &out)| !out && !excluded.contains(&b.key()));
    left.then_some(mask)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_api::{Algorithm, Backend, GrpcPolicy, Protocol, Service};

    use super::*;
    use crate::userspace::select::Selector;

    fn cfg(consecutive: u32, percent: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: consecutive,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(35),
            max_ejection_percent: percent,
        }
    }

    #[test]
    fn the_share_is_at_least_one_and_leaves_one() {
        assert_eq!(max_ejected(0, 50), 0);
        assert_eq!(max_ejected(3, 0), 0);
        // Envoy: at least one, whatever the share.
        assert_eq!(max_ejected(3, 10), 1);
        assert_eq!(max_ejected(3, 50), 1);
        assert_eq!(max_ejected(3, 67), 2);
        assert_eq!(max_ejected(10, 10), 1);
        assert_eq!(max_ejected(10, 35), 3);
        // Below 100%, one always stays; a lone backend is never ejected.
        assert_eq!(max_ejected(3, 99), 2);
        assert_eq!(max_ejected(1, 99), 0);
        assert_eq!(max_ejected(2, 50), 1);
        // 100%: all may go.
        assert_eq!(max_ejected(1, 100), 1);
        assert_eq!(max_ejected(3, 100), 3);
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_to_its_cap_and_decays() {
        let c = cfg(5, 10);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = Tracker::default();
        assert!(!t.ejected(t0));
        // 10 s, then (back at once) 20 s, 30 s, then the cap (35 s).
        assert_eq!(t.eject(&c, t0), s(10));
        assert!(t.ejected(t0 + s(9)));
        assert!(!t.ejected(t0 + s(10)));
        assert_eq!(t.eject(&c, t0 + s(10)), s(20));
        assert_eq!(t.eject(&c, t0 + s(30)), s(30));
        assert_eq!(t.eject(&c, t0 + s(60)), s(35));
        assert_eq!(t.eject(&c, t0 + s(95)), s(35));
        // Back since 130 s: one less per 10 s back.
        assert_eq!(t.multiplier(&c, t0 + s(130)), 5);
        assert_eq!(t.multiplier(&c, t0 + s(139)), 5);
        assert_eq!(t.multiplier(&c, t0 + s(140)), 4);
        assert_eq!(t.multiplier(&c, t0 + s(165)), 2);
        // Ejected again after 45 s back: multiplier 2 (5 - 4, + 1): 20 s.
        assert_eq!(t.eject(&c, t0 + s(175)), s(20));
        // Long back: down to 0, so the next is the base again.
        assert_eq!(t.multiplier(&c, t0 + s(1000)), 0);
        assert_eq!(t.eject(&c, t0 + s(1000)), s(10));
    }

    fn service(n: usize, od: Option<OutlierDetection>) -> (Service, ServiceShared) {
        let backends = (0..n)
            .map(|i| Backend::new(Ipv4Addr::new(10, 244, 21 + i as u8, 2), 50051))
            .collect();
        let mut s = Service::new(
            "t/grpc:g",
            Ipv4Addr::new(10, 96, 0, 9),
            50051,
            Protocol::Tcp,
            Algorithm::Maglev,
            backends,
        );
        s.grpc = Some(GrpcPolicy {
            outlier_detection: od,
            ..GrpcPolicy::default()
        });
        let entries = s
            .backends
            .iter()
            .map(|b| ((b.ip, b.port), Arc::new(BackendEntry::new(b.ip, b.port))))
            .collect();
        let sh = ServiceShared::new(s.addr(), Selector::new(&s, &entries).unwrap(), 16);
        sh.set_policy(s.grpc.clone());
        (s, sh)
    }

    fn entry(sh: &ServiceShared, i: usize) -> Arc<BackendEntry> {
        sh.selector().candidates().0[i].clone()
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let c = cfg(3, 50);
        let (_, sh) = service(3, Some(c));
        let o = Outliers::default();
        let b0 = entry(&sh, 0);
        let t0 = Instant::now();
        let rec = |be: &BackendEntry, out, at| o.record_with(&c, &sh, be, out, at);
        rec(&b0, Outcome::Failure, t0);
        rec(&b0, Outcome::Failure, t0);
        rec(&b0, Outcome::Success, t0);
        rec(&b0, Outcome::Failure, t0);
        rec(&b0, Outcome::Failure, t0);
        assert_eq!(b0.counters.outlier.consecutive_failures(), 2);
        assert_eq!(b0.counters.outlier.ejections(), 0);
        assert!(!b0.counters.outlier.ejected_at(millis(t0)));
        rec(&b0, Outcome::Failure, t0);
        assert_eq!(b0.counters.outlier.ejections(), 1);
        assert_eq!(b0.counters.outlier.consecutive_failures(), 0);
        let s = Duration::from_secs;
        assert!(b0.counters.outlier.ejected_at(millis(t0 + s(9))));
        assert!(!b0.counters.outlier.ejected_at(millis(t0 + s(10))));
        // Failures of calls in flight while ejected do not count.
        rec(&b0, Outcome::Failure, t0 + s(1));
        assert_eq!(b0.counters.outlier.consecutive_failures(), 0);
    }

    #[test]
    fn never_more_than_the_share_and_the_next_failure_retries() {
        // 2 of 3 failing, 50%: one ejected, the other keeps its count.
        let c = cfg(2, 50);
        let (_, sh) = service(3, Some(c));
        let o = Outliers::default();
        let (b0, b1) = (entry(&sh, 0), entry(&sh, 1));
        let t0 = Instant::now();
        for b in [&b0, &b1, &b0, &b1, &b1, &b1] {
            o.record_with(&c, &sh, b, Outcome::Failure, t0);
        }
        assert_eq!(b0.counters.outlier.ejections(), 1);
        assert_eq!(b1.counters.outlier.ejections(), 0);
        assert_eq!(b1.counters.outlier.consecutive_failures(), 4);
        // Once b0 is back, b1's next failure ejects it.
        let later = t0 + Duration::from_secs(10);
        o.record_with(&c, &sh, &b1, Outcome::Failure, later);
        assert_eq!(b1.counters.outlier.ejections(), 1);
        assert!(b1.counters.outlier.ejected_at(millis(later)));
        assert!(!b0.counters.outlier.ejected_at(millis(later)));
    }

    #[test]
    fn the_pick_skips_ejected_backends_unless_none_is_left() {
        let c = OutlierDetection {
            base_ejection_time: Duration::from_secs(60),
            max_ejection_time: Duration::from_secs(60),
            ..cfg(1, 100)
        };
        let (_, sh) = service(3, Some(c));
        let o = Outliers::default();
        let bs: Vec<_> = (0..3).map(|i| entry(&sh, i)).collect();
        assert_eq!(skipped(&sh, &bs, &[]), None);
        o.record(&sh, &bs[1], Outcome::Failure);
        assert_eq!(skipped(&sh, &bs, &[]), Some(vec![false, true, false]));
        for _ in 0..300 {
            let l = super::super::balance::pick(&sh, &super::super::orca::Orca::default(), &[])
                .unwrap();
            assert_ne!(l.backend().key(), bs[1].key());
        }
        // With 0 excluded (tried) too, only 2 is left; then none: panic.
        assert_eq!(
            skipped(&sh, &bs, &[bs[0].key()]),
            Some(vec![false, true, false])
        );
        o.record(&sh, &bs[2], Outcome::Failure);
        assert_eq!(skipped(&sh, &bs, &[bs[0].key()]), None);
        o.record(&sh, &bs[0], Outcome::Failure);
        assert_eq!(skipped(&sh, &bs, &[]), None, "all ejected: panic");
        assert!(
            super::super::balance::pick(&sh, &super::super::orca::Orca::default(), &[]).is_some()
        );
        // Turned off: the ejections end at once.
        sh.set_policy(Some(GrpcPolicy::default()));
        assert_eq!(skipped(&sh, &bs, &[]), None);
        assert!(bs.iter().all(|b| b.counters.outlier.ejected_for_ms() == 0));
    }

    #[test]
    fn without_a_configuration_nothing_is_counted() {
        let (_, sh) = service(3, None);
        let o = Outliers::default();
        let b = entry(&sh, 0);
        for _ in 0..10 {
            o.record(&sh, &b, Outcome::Failure);
        }
        assert_eq!(b.counters.outlier.consecutive_failures(), 0);
        assert_eq!(b.counters.outlier.ejections(), 0);
    }

    #[test]
    fn only_unavailable_is_a_failure() {
        assert_eq!(Outcome::of_status(14), Outcome::Failure);
        for c in [0, 1, 2, 3, 4, 8, 13, 16, 99] {
            assert_eq!(Outcome::of_status(c), Outcome::Success, "{c}");
        }
    }
}
