//! Turns the client's call records into the per-service tables and the checks.

use crate::wire::{Call, Inflight, Kind, Phase};
use lb_api::Algorithm;
use std::fmt::Write as _;
use std::time::Duration;

pub const OK: &str = "✓";
pub const FAIL: &str = "✗";

/// A pod of a service, as the report shows it.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub name: String,
    pub ip: String,
}

/// One service's part of the run.
pub struct ServiceReport<'a> {
    pub title: String,
    pub algorithm: Algorithm,
    pub pods: &'a [PodInfo],
    /// Calls the client was to make (some may be missing if the run stopped early).
    pub planned: usize,
    pub calls: Vec<&'a Call>,
    /// The live event, when it happened to this service: the pod marked terminating, the
    /// in-flight streams, and when (Unix µs) the agent was seen to have applied it.
    pub event: Option<Event<'a>>,
}

pub struct Event<'a> {
    pub victim: String,
    pub inflight: &'a [Inflight],
    pub at_us: i64,
}

#[derive(Default)]
pub struct Checks {
    pub lines: Vec<(bool, String)>,
}

impl Checks {
    pub fn add(&mut self, ok: bool, text: impl Into<String>) {
        self.lines.push((ok, text.into()));
    }

    pub fn all_ok(&self) -> bool {
        self.lines.iter().all(|(ok, _)| *ok)
    }

    pub fn render(&self, indent: &str) -> String {
        let mut s = String::new();
        for (ok, text) in &self.lines {
            let _ = writeln!(s, "{indent}{} {text}", if *ok { OK } else { FAIL });
        }
        s
    }
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(us: Option<u64>) -> String {
    us.map_or_else(|| "-".into(), |u| format!("{:.2} ms", u as f64 / 1000.0))
}

/// The spread check for `n` calls over the `k` pods that take new flows, with its
/// tolerance in words. `counts` are the calls per pod (only those pods).
fn spread(algo: Algorithm, counts: &[usize], in_flight_load: bool) -> (bool, String) {
    let n: usize = counts.iter().sum();
    let k = counts.len();
    let list = counts
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("/");
    if k == 0 || n == 0 {
        return (false, format!("no calls to spread ({list})"));
    }
    let (min, max) = (
        *counts.iter().min().expect("k > 0"),
        *counts.iter().max().expect("k > 0"),
    );
    match algo {
        Algorithm::RoundRobin => (
            max - min <= 1,
            format!("{list}: round-robin, every pod within 1 call of the others"),
        ),
        Algorithm::SourceHash => {
            let used = counts.iter().filter(|&&c| c > 0).count();
            (
                used == 1,
                format!("{list}: source-hash, one client IP so every call on one pod"),
            )
        }
        Algorithm::LeastConn if in_flight_load => {
            let used = counts.iter().filter(|&&c| c > 0).count();
            (
                used == k,
                format!(
                    "{list}: least-conn, every pod used (the long-lived calls weigh on the \
                     pods that carry them, so no even split is expected)"
                ),
            )
        }
        Algorithm::Random | Algorithm::Maglev | Algorithm::LeastConn => {
            // Binomial: each pod's count ~ B(n, 1/k). Allow 4 standard deviations (a false
            // alarm about once in 10,000 runs per pod) plus one call.
            let p = 1.0 / k as f64;
            let mean = n as f64 * p;
            let tol = 4.0 * (n as f64 * p * (1.0 - p)).sqrt() + 1.0;
            let ok = counts.iter().all(|&c| (c as f64 - mean).abs() <= tol);
            (
                ok,
                format!(
                    "{list}: {algo}, each pod within {mean:.0} ± {tol:.0} (4σ of an even split)"
                ),
            )
        }
    }
}

impl ServiceReport<'_> {
    fn count(&self, pod: &str, phase: Option<Phase>) -> usize {
        self.calls
            .iter()
            .filter(|c| c.ok && c.pod == pod && phase.is_none_or(|p| c.phase == p))
            .count()
    }

    /// The table and the checks.
    pub fn render(&self, checks: &mut Checks) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.title);
        let total_ok = self.calls.iter().filter(|c| c.ok).count();
        let _ = writeln!(
            s,
            "  {:<18} {:<13} {:>6} {:>6} {:>6} {:>7} {:>9} {:>9}",
            "pod", "ip", "before", "after", "total", "share", "p50", "p99"
        );
        let mut all_lat = Vec::new();
        for pod in self.pods {
            let mut lat: Vec<u64> = self
                .calls
                .iter()
                .filter(|c| c.ok && c.pod == pod.name)
                .map(|c| c.us)
                .collect();
            lat.sort_unstable();
            all_lat.extend_from_slice(&lat);
            let total = lat.len();
            let share = if total_ok > 0 {
                100.0 * total as f64 / total_ok as f64
            } else {
                0.0
            };
            let note = match &self.event {
                Some(e) if e.victim == pod.name => "  ← marked terminating mid-run",
                _ => "",
            };
            let _ = writeln!(
                s,
                "  {:<18} {:<13} {:>6} {:>6} {:>6} {:>6.1}% {:>9} {:>9}{note}",
                pod.name,
                pod.ip,
                self.count(&pod.name, Some(Phase::Before)),
                self.count(&pod.name, Some(Phase::After)),
                total,
                share,
                ms(percentile(&lat, 50.0)),
                ms(percentile(&lat, 99.0)),
            );
        }
        all_lat.sort_unstable();
        let phase_n = |p| self.calls.iter().filter(|c| c.ok && c.phase == p).count();
        let _ = writeln!(
            s,
            "  {:<18} {:<13} {:>6} {:>6} {:>6} {:>6.1}% {:>9} {:>9}",
            "all",
            "",
            phase_n(Phase::Before),
            phase_n(Phase::After),
            total_ok,
            if total_ok > 0 { 100.0 } else { 0.0 },
            ms(percentile(&all_lat, 50.0)),
            ms(percentile(&all_lat, 99.0)),
        );
        let _ = writeln!(
            s,
            "  (latency: new connection + call, as the client sees it; before/after: the live event)"
        );

        let mut c = Checks::default();
        let n = self.planned.max(self.calls.len());
        let streams = self.calls.iter().filter(|c| c.kind == Kind::Stream).count();
        let failed: Vec<&&Call> = self.calls.iter().filter(|c| !c.ok).collect();
        let mut text = format!(
            "{total_ok}/{n} calls succeeded ({} unary, {streams} server-streaming)",
            self.calls.len() - streams
        );
        if self.calls.len() < n {
            let _ = write!(text, "; {} not made", n - self.calls.len());
        }
        if let Some(f) = failed.first() {
            let _ = write!(
                text,
                "; first failure: {}",
                f.error.as_deref().unwrap_or("?")
            );
        }
        c.add(n > 0 && total_ok == n, text);
        let echoed = self.calls.iter().filter(|c| c.ok && c.echoed).count();
        c.add(
            n > 0 && echoed == n,
            format!("{echoed}/{n} x-test-header values echoed back by the pod that served them"),
        );
        let victim = self.event.as_ref().map(|e| e.victim.as_str());
        for phase in [Phase::Before, Phase::After] {
            let takes: Vec<&PodInfo> = self
                .pods
                .iter()
                .filter(|p| phase == Phase::Before || Some(p.name.as_str()) != victim)
                .collect();
            let counts: Vec<usize> = takes
                .iter()
                .map(|p| self.count(&p.name, Some(phase)))
                .collect();
            let in_flight = phase == Phase::After && self.event.is_some();
            let (ok, text) = spread(self.algorithm, &counts, in_flight);
            let label = match phase {
                Phase::Before if self.event.is_some() => "spread before the event",
                Phase::Before => "spread, first half",
                Phase::After if self.event.is_some() => "spread after the event",
                Phase::After => "spread, second half",
            };
            c.add(ok, format!("{label}: {text}"));
        }
        if let Some(e) = &self.event {
            let on_victim: Vec<&Inflight> =
                e.inflight.iter().filter(|f| f.pod == e.victim).collect();
            let all_done = e.inflight.iter().all(|f| f.ok && f.echoed);
            let spanned = on_victim.iter().all(|f| f.last_server_us > e.at_us);
            let after_ms = on_victim
                .iter()
                .map(|f| (f.last_server_us - e.at_us) / 1000)
                .max()
                .unwrap_or(0);
            let (lo, hi) = (
                e.inflight.iter().map(|f| f.messages).min().unwrap_or(0),
                e.inflight.iter().map(|f| f.messages).max().unwrap_or(0),
            );
            let range = if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            };
            let n_ok = e.inflight.iter().filter(|f| f.ok && f.echoed).count();
            let mut text = if all_done {
                format!(
                    "in-flight: {} long-lived calls open across the event ({} on {}) all ended \
                     OK ({range} ping-pongs each, all answered by the pod they started on)",
                    e.inflight.len(),
                    on_victim.len(),
                    e.victim,
                )
            } else {
                format!(
                    "in-flight: {n_ok} of {} long-lived calls ended OK ({} on {})",
                    e.inflight.len(),
                    on_victim.len(),
                    e.victim,
                )
            };
            if !on_victim.is_empty() {
                if spanned {
                    let _ = write!(
                        text,
                        "; {} kept answering for {after_ms} ms after it was marked terminating",
                        e.victim
                    );
                } else {
                    let _ = write!(
                        text,
                        "; but a call on {} ended before the change was applied",
                        e.victim
                    );
                }
            }
            if let Some(bad) = e.inflight.iter().find(|f| !f.ok || !f.echoed) {
                let on = if bad.pod.is_empty() {
                    "a call that never got an answer".to_string()
                } else {
                    format!("a call on {}", bad.pod)
                };
                let _ = write!(
                    text,
                    "; {on} failed: {}",
                    bad.error.as_deref().unwrap_or("header not echoed")
                );
            }
            if e.inflight.is_empty() {
                text = "in-flight: no long-lived call was open across the event".into();
            }
            c.add(
                !e.inflight.is_empty() && !on_victim.is_empty() && all_done && spanned,
                text,
            );
            let leaked = self.count(&e.victim, Some(Phase::After));
            c.add(
                leaked == 0,
                format!(
                    "after the event {leaked} new calls went to {} (terminating: no new flows)",
                    e.victim
                ),
            );
        }
        s.push('\n');
        s.push_str(&c.render("  "));
        checks.lines.extend(c.lines);
        s
    }
}

pub fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn spread_tolerances() {
        assert!(spread(Algorithm::RoundRobin, &[50, 50, 49], false).0);
        assert!(!spread(Algorithm::RoundRobin, &[51, 50, 48], false).0);
        assert!(spread(Algorithm::Random, &[40, 55, 55], false).0);
        assert!(!spread(Algorithm::Random, &[10, 70, 70], false).0);
        assert!(spread(Algorithm::SourceHash, &[0, 150, 0], false).0);
        assert!(!spread(Algorithm::SourceHash, &[1, 149, 0], false).0);
        assert!(spread(Algorithm::LeastConn, &[10, 140], true).0);
        assert!(!spread(Algorithm::LeastConn, &[0, 150], true).0);
        assert!(!spread(Algorithm::Random, &[0, 0], false).0);
    }
}
