//! Load-aware balancing (`balancing: orca_wrr`): weighted round-robin from
//! the backends' own load reports, as gRPC clients do it.
//!
//! - **Reports** (gRFC A51, per call): a backend puts an ORCA
//!   `OrcaLoadReport` in its answer, as `endpoint-load-metrics-bin` (the
//!   protobuf, base64 as every `-bin` metadata) or as
//!   `endpoint-load-metrics: BIN <base64>` / `TEXT cpu_utilization=0.3,
//!   rps_fractional=10, ...`; in the trailers, or in the headers of a
//!   trailers-only answer. JSON is not read. Reports are read whatever the
//!   service's balancing, so weights are ready when it changes; the headers
//!   go on to the client as they are.
//! - **Weights** (gRFC A58): `qps / (utilization + eps / qps x
//!   error_utilization_penalty)`, where utilization is
//!   `application_utilization` when set, else `cpu_utilization`, and qps is
//!   `rps_fractional`. A report without utilization or qps is ignored. A
//!   weight counts once the backend has reported for `blackout_period`, and
//!   not after `weight_expiration_period` without a report (then the
//!   blackout starts again with the next report). A backend that stops
//!   taking calls (weight 0, unhealthy, terminating) loses its weight: back,
//!   it goes through the blackout again.
//! - **The mixed rule.** While fewer than two candidates have a weight, the
//!   call is picked by P2C least outstanding (`balance`), the mode's
//!   default, which already avoids slow backends; A58 uses plain
//!   round-robin there. From two on, every candidate goes into the
//!   scheduler, those without a weight at the mean weight of the others
//!   (A58). As gRPC's schedulers do, no weight counts for more than 10x the
//!   mean, nor for less than 1% of the largest.
//! - **Configured weights** multiply: a backend of weight 2 gets twice the
//!   share its reports give it. Weight-0 backends are not candidates.
//! - **Scheduler**: earliest deadline first (A58): each backend's period is
//!   1 / weight, its first deadline random within one period. It is built
//!   again on the first pick after `weight_update_period`, and at once when
//!   the candidates or the settings change.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use http::HeaderMap;
use lb_api::OrcaWrr;

use crate::userspace::select::{BackendKey, Selector, random_u64};

/// The binary report (base64 protobuf).
pub(crate) const LOAD_METRICS_BIN: &str = "endpoint-load-metrics-bin";
/// The report with a format word: `BIN <base64>` or `TEXT k=v, ...`.
pub(crate) const LOAD_METRICS: &str = "endpoint-load-metrics";

/// Weights above this many times the mean count as this.
const MAX_RATIO: f64 = 10.0;
/// Weights below this share of the largest count as this.
const MIN_RATIO: f64 = 0.01;

/// The fields of `xds.data.orca.v3.OrcaLoadReport` that weights use (the
/// maps are skipped as unknown fields).
#[derive(Clone, PartialEq, prost::Message)]
struct OrcaLoadReport {
    #[prost(double, tag = "1")]
    cpu_utilization: f64,
    #[prost(double, tag = "6")]
    rps_fractional: f64,
    #[prost(double, tag = "7")]
    eps: f64,
    #[prost(double, tag = "9")]
    application_utilization: f64,
}

/// What a load report says, for a weight.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Report {
    /// `application_utilization` if set (> 0), else `cpu_utilization`.
    pub(crate) utilization: f64,
    /// `rps_fractional`.
    pub(crate) qps: f64,
    pub(crate) eps: f64,
}

impl Report {
    fn new(cpu: f64, application: f64, qps: f64, eps: f64) -> Option<Report> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !(ok(cpu) && ok(application) && ok(qps) && ok(eps)) {
            return None;
        }
        Some(Report {
            utilization: if application > 0.0 { application } else { cpu },
            qps,
            eps,
        })
    }

    /// gRFC A58's weight: `qps / (utilization + eps / qps x penalty)`; 0
    /// when the report has no utilization or no qps.
    pub(crate) fn weight(&self, penalty: f64) -> f64 {
        if self.utilization <= 0.0 || self.qps <= 0.0 {
            return 0.0;
        }
        let w = self.qps / (self.utilization + self.eps / self.qps * penalty);
        if w.is_finite() { w } else { 0.0 }
    }
}

/// base64 as gRPC `-bin` metadata comes: standard alphabet, padded or not.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn decode_bin(b64: &[u8]) -> Option<Report> {
    let bytes = BASE64.decode(b64).ok()?;
    let r = <OrcaLoadReport as prost::Message>::decode(bytes.as_slice()).ok()?;
    Report::new(
        r.cpu_utilization,
        r.application_utilization,
        r.rps_fractional,
        r.eps,
    )
}

/// `cpu_utilization=0.3, rps_fractional=10, named_metrics.x=1`: the
/// fields weights use; other keys are skipped; a malformed pair voids it.
fn decode_text(text: &str) -> Option<Report> {
    let (mut cpu, mut app, mut qps, mut eps) = (0.0, 0.0, 0.0, 0.0);
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        let v: f64 = v.trim().parse().ok()?;
        match k.trim() {
            "cpu_utilization" => cpu = v,
            "application_utilization" => app = v,
            "rps_fractional" => qps = v,
            "eps" => eps = v,
            _ => {}
        }
    }
    Report::new(cpu, app, qps, eps)
}

/// The load report in a backend's trailers (or trailers-only headers), if
/// there is a readable one.
pub(crate) fn from_headers(h: &HeaderMap) -> Option<Report> {
    if let Some(v) = h.get(LOAD_METRICS_BIN) {
        return decode_bin(v.as_bytes().trim_ascii());
    }
    let v = h.get(LOAD_METRICS)?.to_str().ok()?.trim();
    let (format, rest) = v.split_once(' ')?;
    match format {
        "BIN" => decode_bin(rest.trim().as_bytes()),
        "TEXT" => decode_text(rest),
        _ => None,
    }
}

/// One backend's last usable report and its A58 timestamps.
#[derive(Debug, Default)]
struct LoadState {
    report: Report,
    /// When the reports began (since the last expiry or reset).
    non_empty_since: Option<Instant>,
    last_updated: Option<Instant>,
}

/// The reports of one backend.
#[derive(Debug, Default)]
pub(crate) struct Load(Mutex<LoadState>);

impl Load {
    fn lock(&self) -> std::sync::MutexGuard<'_, LoadState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A report arrived. One without a weight is ignored (A58); the
    /// penalty does not decide that (it only adds to a utilization > 0).
    pub(crate) fn record(&self, r: Report, now: Instant) {
        if r.weight(1.0) <= 0.0 {
            return;
        }
        let mut st = self.lock();
        st.non_empty_since.get_or_insert(now);
        st.last_updated = Some(now);
        st.report = r;
    }

    /// The weight to use now (0: none), with A58's expiry and blackout.
    pub(crate) fn weight(&self, cfg: &OrcaWrr, now: Instant) -> f64 {
        let mut st = self.lock();
        let Some(last) = st.last_updated else {
            return 0.0;
        };
        if now.saturating_duration_since(last) >= cfg.weight_expiration_period {
            st.non_empty_since = None;
            return 0.0;
        }
        let since = *st.non_empty_since.get_or_insert(last);
        if !cfg.blackout_period.is_zero()
            && now.saturating_duration_since(since) < cfg.blackout_period
        {
            return 0.0;
        }
        st.report
            .weight(f64::from(cfg.error_utilization_penalty_milli) / 1000.0)
    }

    /// The utilization of the last usable report, if any.
    fn utilization(&self) -> Option<f64> {
        let st = self.lock();
        st.last_updated.map(|_| st.report.utilization)
    }

    /// The backend stopped taking calls: its weight is forgotten.
    fn reset(&self) {
        *self.lock() = LoadState::default();
    }
}

/// The scheduler weights of the candidates from their report weights
/// (0: none) and configured weights; `None` while fewer than two have a
/// report weight (the caller then picks by P2C).
pub(crate) fn effective_weights(reported: &[f64], configured: &[u32]) -> Option<Vec<f64>> {
    let with: Vec<f64> = reported.iter().copied().filter(|w| *w > 0.0).collect();
    if with.len() < 2 {
        return None;
    }
    let mean = with.iter().sum::<f64>() / with.len() as f64;
    let capped: Vec<f64> = reported
        .iter()
        .map(|&w| {
            if w > 0.0 {
                w.min(mean * MAX_RATIO)
            } else {
                mean
            }
        })
        .collect();
    let max = capped.iter().copied().fold(0.0, f64::max);
    Some(
        capped
            .iter()
            .zip(configured)
            .map(|(&w, &c)| w.max(max * MIN_RATIO) * f64::from(c))
            .collect(),
    )
}

/// An entry of the EDF queue: the earliest deadline first, then the
/// earliest (re)inserted.
#[derive(Debug, Clone, Copy)]
struct Job {
    deadline: f64,
    seq: u64,
    index: usize,
    period: f64,
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Job {
    /// Reversed: `BinaryHeap` is a max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .deadline
            .total_cmp(&self.deadline)
            .then(other.seq.cmp(&self.seq))
    }
}

/// Earliest deadline first over weights (gRFC A58's scheduler).
#[derive(Debug)]
pub(crate) struct Edf {
    heap: BinaryHeap<Job>,
    seq: u64,
}

impl Edf {
    /// `weights` all > 0; `unit()` is a random number in [0, 1).
    pub(crate) fn new(weights: &[f64], mut unit: impl FnMut() -> f64) -> Edf {
        let heap = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let period = 1.0 / w;
                Job {
                    deadline: unit() * period,
                    seq: i as u64,
                    index: i,
                    period,
                }
            })
            .collect();
        Edf {
            heap,
            seq: weights.len() as u64,
        }
    }

    /// The next index.
    pub(crate) fn next(&mut self) -> Option<usize> {
        let mut job = self.heap.pop()?;
        let index = job.index;
        job.deadline += job.period;
        job.seq = self.seq;
        self.seq += 1;
        self.heap.push(job);
        Some(index)
    }
}

fn unit() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The scheduler of one version of the candidates and settings.
#[derive(Debug)]
struct Sched {
    sel: Arc<Selector>,
    cfg: OrcaWrr,
    built: Instant,
    /// `None`: fewer than two weights; P2C picks.
    edf: Option<Edf>,
}

/// A gRPC service's load reports and weighted round-robin.
#[derive(Debug, Default)]
pub(crate) struct Orca {
    loads: RwLock<HashMap<BackendKey, Arc<Load>>>,
    /// Over the candidates, and over them and the spill backends
    /// (locality spill-over), each kept while the other is used.
    sched: Mutex<[Option<Sched>; 2]>,
}

impl Orca {
    /// The reports of backend `key`, made on first use.
    /// For the stats: backend `key`'s last reported utilization, and with
    /// `cfg` (the service balances by ORCA) the weight its reports give it
    /// now (none: no report, in blackout or expired).
    pub(crate) fn seen(
        &self,
        key: BackendKey,
        cfg: Option<&OrcaWrr>,
        now: Instant,
    ) -> (Option<f64>, Option<f64>) {
        let loads = self.loads.read().unwrap_or_else(PoisonError::into_inner);
        let Some(l) = loads.get(&key) else {
            return (None, None);
        };
        let w = cfg.map(|c| l.weight(c, now)).filter(|w| *w > 0.0);
        (l.utilization(), w)
    }

    pub(crate) fn load(&self, key: BackendKey) -> Arc<Load> {
        if let Some(l) = self
            .loads
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return l.clone();
        }
        self.loads
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone()
    }

    /// After a change of the service: backends not `live` forget their
    /// weight; those not `known` are let go.
    pub(crate) fn update(&self, live: &HashSet<BackendKey>, known: &HashSet<BackendKey>) {
        let mut loads = self.loads.write().unwrap_or_else(PoisonError::into_inner);
        loads.retain(|k, l| {
            if !live.contains(k) {
                l.reset();
            }
            known.contains(k)
        });
    }

    /// The candidate (an index into `sel.candidates()`, or with `spill`
    /// into `sel.with_spill()`) for a call, among those `usable`; `None`
    /// when P2C should pick (fewer than two weights, or the scheduler
    /// offered no usable one in a round).
    pub(crate) fn pick(
        &self,
        sel: &Arc<Selector>,
        spill: bool,
        cfg: &OrcaWrr,
        usable: impl Fn(usize) -> bool,
        now: Instant,
    ) -> Option<usize> {
        let mut scheds = self.sched.lock().unwrap_or_else(PoisonError::into_inner);
        let guard = &mut scheds[usize::from(spill)];
        let stale = guard.as_ref().is_none_or(|s| {
            !Arc::ptr_eq(&s.sel, sel)
                || s.cfg != *cfg
                || now.saturating_duration_since(s.built) >= cfg.weight_update_period
        });
        if stale {
            *guard = Some(self.build(sel, spill, cfg, now));
        }
        let edf = guard.as_mut()?.edf.as_mut()?;
        let n = edf_len(sel, spill);
        (0..n).find_map(|_| edf.next().filter(|&i| usable(i)))
    }

    fn build(&self, sel: &Arc<Selector>, spill: bool, cfg: &OrcaWrr, now: Instant) -> Sched {
        let (backends, configured) = if spill {
            sel.with_spill()
        } else {
            sel.candidates()
        };
        let reported: Vec<f64> = {
            let loads = self.loads.read().unwrap_or_else(PoisonError::into_inner);
            backends
                .iter()
                .map(|b| loads.get(&b.key()).map_or(0.0, |l| l.weight(cfg, now)))
                .collect()
        };
        let edf = effective_weights(&reported, configured).map(|w| Edf::new(&w, unit));
        Sched {
            sel: sel.clone(),
            cfg: *cfg,
            built: now,
            edf,
        }
    }
}

/// How many backends a schedule over `sel` (with `spill`) holds.
fn edf_len(sel: &Selector, spill: bool) -> usize {
    if spill {
        sel.with_spill().0.len()
    } else {
        sel.candidates().0.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A58's defaults with these periods.
    fn settings(blackout: Duration, expiration: Duration) -> OrcaWrr {
        OrcaWrr {
            blackout_period: blackout,
            weight_expiration_period: expiration,
            ..OrcaWrr::default()
        }
    }

    /// A report as a backend encodes it.
    fn bin(cpu: f64, app: f64, qps: f64, eps: f64) -> Vec<u8> {
        let r = OrcaLoadReport {
            cpu_utilization: cpu,
            rps_fractional: qps,
            eps,
            application_utilization: app,
        };
        prost::Message::encode_to_vec(&r)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a58_weight_formula() {
        let r = |u, qps, eps| Report {
            utilization: u,
            qps,
            eps,
        };
        assert_eq!(r(0.5, 100.0, 0.0).weight(1.0), 200.0);
        // 10% errors at penalty 1: utilization 0.5 + 0.1.
        assert!((r(0.5, 100.0, 10.0).weight(1.0) - 100.0 / 0.6).abs() < 1e-9);
        // Penalty 0 ignores errors; penalty 2 doubles them.
        assert_eq!(r(0.5, 100.0, 10.0).weight(0.0), 200.0);
        assert!((r(0.5, 100.0, 10.0).weight(2.0) - 100.0 / 0.7).abs() < 1e-9);
        // No utilization or no qps: no weight.
        assert_eq!(r(0.0, 100.0, 0.0).weight(1.0), 0.0);
        assert_eq!(r(0.5, 0.0, 0.0).weight(1.0), 0.0);
        // Utilization: the application's when set, else the CPU's.
        assert_eq!(Report::new(0.9, 0.3, 10.0, 0.0).unwrap().utilization, 0.3);
        assert_eq!(Report::new(0.9, 0.0, 10.0, 0.0).unwrap().utilization, 0.9);
        // Negative or non-finite values void the report.
        assert_eq!(Report::new(-0.1, 0.0, 10.0, 0.0), None);
        assert_eq!(Report::new(0.1, f64::NAN, 10.0, 0.0), None);
        assert_eq!(Report::new(0.1, 0.0, f64::INFINITY, 0.0), None);
    }

    #[test]
    fn trailers_decode() {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
        let want = Report {
            utilization: 0.3,
            qps: 120.5,
            eps: 2.0,
        };
        let b = bin(0.9, 0.3, 120.5, 2.0);
        // -bin metadata, padded or not (gRPC sends it unpadded).
        for enc in [STANDARD.encode(&b), STANDARD_NO_PAD.encode(&b)] {
            let h = headers(&[(LOAD_METRICS_BIN, &enc)]);
            assert_eq!(from_headers(&h), Some(want), "{enc}");
            let h = headers(&[(LOAD_METRICS, &format!("BIN {enc}"))]);
            assert_eq!(from_headers(&h), Some(want), "{enc}");
        }
        // The example of the ORCA spec: cpu_utilization 0.1, rps_fractional
        // 2.0 and two named metrics (skipped).
        let h = headers(&[(
            LOAD_METRICS_BIN,
            "CZqZmZmZmbk/MQAAAAAAAABAQg4KA2ZvbxGamZmZmZm5P0IOCgNiYXIRmpmZmZmZyT8=",
        )]);
        let r = from_headers(&h).unwrap();
        assert!((r.utilization - 0.1).abs() < 1e-12 && r.qps == 2.0, "{r:?}");
        assert!((r.weight(1.0) - 20.0).abs() < 1e-9);
        // A report without qps has no weight.
        let b = STANDARD.encode(bin(0.5, 0.0, 0.0, 0.0));
        let r = from_headers(&headers(&[(LOAD_METRICS_BIN, &b)])).unwrap();
        assert_eq!(r.weight(1.0), 0.0);
        // TEXT, with keys it does not use.
        let h = headers(&[(
            LOAD_METRICS,
            "TEXT cpu_utilization=0.3, mem_utilization=0.8, rps_fractional=10.0, eps=1, \
             named_metrics.custom_metric_util=0.4",
        )]);
        assert_eq!(
            from_headers(&h),
            Some(Report {
                utilization: 0.3,
                qps: 10.0,
                eps: 1.0
            })
        );
        // Unreadable: bad base64, bad protobuf, bad text, JSON, none.
        for (k, v) in [
            (LOAD_METRICS_BIN, "%%%"),
            (LOAD_METRICS_BIN, "/w"),
            (LOAD_METRICS, "TEXT cpu_utilization=x"),
            (LOAD_METRICS, "TEXT cpu_utilization"),
            (LOAD_METRICS, "TEXT cpu_utilization=-1, rps_fractional=3"),
            (LOAD_METRICS, "JSON {\"cpu_utilization\": 0.3}"),
            (LOAD_METRICS, "cpu_utilization=0.3"),
        ] {
            assert_eq!(from_headers(&headers(&[(k, v)])), None, "{k}: {v}");
        }
        assert_eq!(from_headers(&HeaderMap::new()), None);
    }

    #[test]
    fn blackout_and_expiration() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let c = settings(s(10), s(180));
        let l = Load::default();
        let r = Report {
            utilization: 0.5,
            qps: 100.0,
            eps: 0.0,
        };
        assert_eq!(l.weight(&c, t0), 0.0);
        l.record(r, t0);
        // Blackout: reports for 10 s before the weight counts.
        assert_eq!(l.weight(&c, t0 + s(9)), 0.0);
        l.record(r, t0 + s(9));
        assert_eq!(l.weight(&c, t0 + s(10)), 200.0);
        assert_eq!(l.weight(&settings(Duration::ZERO, s(180)), t0), 200.0);
        // A report without a weight changes nothing.
        l.record(Report { qps: 0.0, ..r }, t0 + s(100));
        // Expired 180 s after the last usable report...
        assert_eq!(l.weight(&c, t0 + s(188)), 200.0);
        assert_eq!(l.weight(&c, t0 + s(189)), 0.0);
        // ... and the next report starts a new blackout.
        l.record(r, t0 + s(200));
        assert_eq!(l.weight(&c, t0 + s(205)), 0.0);
        assert_eq!(l.weight(&c, t0 + s(210)), 200.0);
        // A reset backend starts over.
        l.reset();
        assert_eq!(l.weight(&c, t0 + s(211)), 0.0);
    }

    #[test]
    fn mixed_pools_and_clamps() {
        // Fewer than two reports: P2C.
        assert_eq!(effective_weights(&[0.0, 0.0, 0.0], &[1, 1, 1]), None);
        assert_eq!(effective_weights(&[5.0, 0.0, 0.0], &[1, 1, 1]), None);
        // Two reports: the silent one gets their mean.
        assert_eq!(
            effective_weights(&[100.0, 300.0, 0.0], &[1, 1, 1]),
            Some(vec![100.0, 300.0, 200.0])
        );
        // Configured weights multiply.
        assert_eq!(
            effective_weights(&[100.0, 300.0, 0.0], &[2, 1, 3]),
            Some(vec![200.0, 300.0, 600.0])
        );
        // At most 10x the mean (of those with a report); then at least 1%
        // of the largest.
        let mut r = vec![1.0; 11];
        r.push(1000.0);
        let w = effective_weights(&r, &[1; 12]).unwrap();
        let cap = 1011.0 / 12.0 * 10.0;
        assert_eq!(w[11], cap);
        assert_eq!(w[0], cap / 100.0);
        let w = effective_weights(&[1.0, 100_000.0, 100_000.0], &[1, 1, 1]).unwrap();
        assert_eq!(w, vec![1000.0, 100_000.0, 100_000.0]);
    }

    #[test]
    fn edf_follows_the_weights_smoothly() {
        // 0.9 / 0.3 / 0.3 utilization at equal qps: weights 1 : 3 : 3.
        let w: Vec<f64> = [0.9, 0.3, 0.3]
            .iter()
            .map(|u| Report {
                utilization: *u,
                qps: 100.0,
                eps: 0.0,
            })
            .map(|r| r.weight(1.0))
            .collect();
        let mut e = Edf::new(&w, || 0.5);
        let mut c = [0u32; 3];
        let mut gap = 0;
        let mut longest_gap = 0;
        for _ in 0..7000 {
            let i = e.next().unwrap();
            c[i] += 1;
            gap = if i == 0 { 0 } else { gap + 1 };
            longest_gap = longest_gap.max(gap);
        }
        for (got, want) in c.iter().zip([1000, 3000, 3000]) {
            assert!(got.abs_diff(want) <= 1, "{c:?}");
        }
        // Spread out, not in bursts: backend 0 comes about every 7 picks.
        assert!(longest_gap <= 8, "{longest_gap}");
        // Random first deadlines: still exact over whole rounds.
        let mut e = Edf::new(&[1.0, 2.0, 4.0], unit);
        let mut c = [0u32; 3];
        for _ in 0..700 {
            c[e.next().unwrap()] += 1;
        }
        for (got, want) in c.iter().zip([100, 200, 400]) {
            assert!(got.abs_diff(want) <= 1, "{c:?}");
        }
        assert_eq!(Edf::new(&[], unit).next(), None);
    }
}
