//! Turns the client's call records into the per-service tables and the checks.

use crate::wire::{Call, Inflight, Kind, OneChannel, Phase};
use lb_api::Algorithm;
use std::collections::BTreeMap;
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

/// The width of the tables' ip column: 13, or the longest pod address (IPv6).
fn ip_width(pods: &[PodInfo]) -> usize {
    pods.iter().map(|p| p.ip.len()).max().unwrap_or(0).max(13)
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
        let iw = ip_width(self.pods);
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.title);
        let total_ok = self.calls.iter().filter(|c| c.ok).count();
        let _ = writeln!(
            s,
            "  {:<18} {:<iw$} {:>6} {:>6} {:>6} {:>7} {:>9} {:>9}",
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
                "  {:<18} {:<iw$} {:>6} {:>6} {:>6} {:>6.1}% {:>9} {:>9}{note}",
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
            "  {:<18} {:<iw$} {:>6} {:>6} {:>6} {:>6.1}% {:>9} {:>9}",
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

/// The lowest count each of `k` pods must get from `n` calls balanced per call: half an even
/// share, `n / (2k)`, lowered to 4σ below the even share of random placement when that is
/// lower (few calls per pod), and at least 1. Least-outstanding P2C, with calls in flight,
/// spreads at least as evenly as random placement.
pub fn per_call_floor(n: usize, k: usize) -> usize {
    if k == 0 {
        return 0;
    }
    let half = n / (2 * k);
    let p = 1.0 / k as f64;
    let mean = n as f64 * p;
    let sigma4 = 4.0 * (n as f64 * p * (1.0 - p)).sqrt();
    let random = (mean - sigma4).floor().max(0.0) as usize;
    half.min(random).max(1)
}

/// What lb-agent's /metrics said about the gRPC-mode service.
pub struct ProxyCounts {
    /// `rpclb_service_new_flows_total{service=...}`: calls the proxy took.
    pub calls: u64,
    /// `rpclb_backend_new_flows_total{service=...,backend="IP:PORT"}` by IP: calls it handed
    /// to each backend.
    pub per_ip: BTreeMap<String, u64>,
}

/// The third phase: one connection per VIP, the same pods behind both.
pub struct OneChannelReport<'a> {
    pub pods: &'a [PodInfo],
    /// The pod marked terminating during the live event.
    pub victim: Option<&'a str>,
    /// Calls over each connection.
    pub planned: usize,
    pub concurrency: usize,
    /// "host -> vip:port (service name)" of each VIP.
    pub l4_desc: String,
    pub l7_desc: String,
    /// The gRPC-mode service's name, for the metrics line.
    pub l7_service: String,
    pub l4: Option<&'a OneChannel>,
    pub l7: Option<&'a OneChannel>,
    /// The agent's counters, or why they could not be read.
    pub proxy: Result<ProxyCounts, String>,
}

impl OneChannelReport<'_> {
    pub fn render(&self, checks: &mut Checks) -> String {
        let iw = ip_width(self.pods);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "one connection per VIP, {} unary calls over each, {} in flight at once (HTTP/2 \
             multiplexes them): the pods of service B behind two VIPs",
            self.planned, self.concurrency
        );
        let count = |o: Option<&OneChannel>, pod: &str| {
            o.map_or(0, |o| o.per_pod.get(pod).copied().unwrap_or(0))
        };
        let proxy = self.proxy.as_ref().ok();
        let cell = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        let _ = writeln!(
            s,
            "  {:<18} {:<iw$} {:>9} {:>14} {:>18}",
            "pod", "ip", "L4 VIP", "gRPC-mode VIP", "lb-agent /metrics"
        );
        for pod in self.pods {
            let note = if self.victim == Some(pod.name.as_str()) {
                "  ← terminating"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "  {:<18} {:<iw$} {:>9} {:>14} {:>18}{note}",
                pod.name,
                pod.ip,
                count(self.l4, &pod.name),
                count(self.l7, &pod.name),
                cell(proxy.map(|p| p.per_ip.get(&pod.ip).copied().unwrap_or(0))),
            );
        }
        let _ = writeln!(
            s,
            "  {:<18} {:<iw$} {:>9} {:>14} {:>18}",
            "all",
            "",
            self.l4.map_or(0, |o| o.ok),
            self.l7.map_or(0, |o| o.ok),
            cell(proxy.map(|p| p.calls)),
        );
        let lat =
            |o: Option<&OneChannel>, f: fn(&OneChannel) -> u64| ms(o.map(f).filter(|&us| us > 0));
        let _ = writeln!(
            s,
            "  {:<18} {:<iw$} {:>9} {:>14}",
            "p50 per call",
            "",
            lat(self.l4, |o| o.p50_us),
            lat(self.l7, |o| o.p50_us)
        );
        let _ = writeln!(
            s,
            "  {:<18} {:<iw$} {:>9} {:>14}",
            "p99 per call",
            "",
            lat(self.l4, |o| o.p99_us),
            lat(self.l7, |o| o.p99_us)
        );
        let _ = writeln!(
            s,
            "  L4 VIP:        {}: the kernel places each new connection",
            self.l4_desc
        );
        let _ = writeln!(
            s,
            "  gRPC-mode VIP: {}: lb-agent's proxy places each call",
            self.l7_desc
        );
        let _ = writeln!(
            s,
            "  lb-agent /metrics (GET in the node namespace): rpclb_service_new_flows_total and \
             rpclb_backend_new_flows_total of {} (calls, in the gRPC mode){}",
            self.l7_service,
            match &self.proxy {
                Ok(_) => String::new(),
                Err(e) => format!(": {e}"),
            }
        );

        let mut c = Checks::default();
        self.check_calls(&mut c);
        self.check_l4(&mut c);
        self.check_l7(&mut c);
        self.check_proxy(&mut c);
        s.push('\n');
        s.push_str(&c.render("  "));
        checks.lines.extend(c.lines);
        s
    }

    /// Every call of both channels succeeded and echoed, one connection each.
    fn check_calls(&self, c: &mut Checks) {
        let chans: Vec<&OneChannel> = [self.l4, self.l7].into_iter().flatten().collect();
        let planned = 2 * self.planned;
        let ok: usize = chans.iter().map(|o| o.ok).sum();
        let echoed: usize = chans.iter().map(|o| o.echoed).sum();
        let conns: Vec<String> = chans.iter().map(|o| o.connections.to_string()).collect();
        let one_each = chans.len() == 2 && chans.iter().all(|o| o.connections == 1);
        let mut text = format!(
            "{ok}/{planned} calls succeeded and {echoed}/{planned} echoed x-test-header, over {} \
             (TCP connections the client opened per VIP: {})",
            if one_each {
                "one connection per VIP"
            } else {
                "NOT one connection per VIP"
            },
            conns.join(", ")
        );
        if chans.len() < 2 {
            let _ = write!(text, "; {} of 2 channels reported", chans.len());
        }
        if let Some(e) = chans.iter().find_map(|o| o.error.as_deref()) {
            let _ = write!(text, "; first failure: {e}");
        }
        c.add(
            planned > 0 && ok == planned && echoed == planned && one_each,
            text,
        );
    }

    /// Through the L4 VIP, the one connection lands on one pod, which takes new flows.
    fn check_l4(&self, c: &mut Checks) {
        let Some(o) = self.l4 else {
            c.add(false, "L4 VIP: no report from its channel");
            return;
        };
        let used: Vec<(&String, &usize)> = o.per_pod.iter().filter(|(_, n)| **n > 0).collect();
        match used.as_slice() {
            [(pod, n)] if Some(pod.as_str()) != self.victim => c.add(
                true,
                format!(
                    "L4 VIP: all {n} calls of the one connection went to {pod}: expected, an L4 \
                     balancer places connections, not calls",
                ),
            ),
            [(pod, n)] => c.add(
                false,
                format!("L4 VIP: all {n} calls went to {pod}, which is terminating (no new flows)"),
            ),
            [] => c.add(false, "L4 VIP: no call was answered"),
            _ => c.add(
                false,
                format!(
                    "L4 VIP: the calls of one connection were answered by {} pods ({}): one \
                     TCP connection must stay on one pod",
                    used.len(),
                    used.iter()
                        .map(|(p, n)| format!("{p} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }
    }

    /// Through the gRPC-mode VIP, the calls spread over every active pod, none on the
    /// terminating one (and no pod outside the service).
    fn check_l7(&self, c: &mut Checks) {
        let Some(o) = self.l7 else {
            c.add(false, "gRPC-mode VIP: no report from its channel");
            return;
        };
        let active: Vec<&PodInfo> = self
            .pods
            .iter()
            .filter(|p| Some(p.name.as_str()) != self.victim)
            .collect();
        let floor = per_call_floor(o.ok, active.len());
        let counts: Vec<usize> = active
            .iter()
            .map(|p| o.per_pod.get(&p.name).copied().unwrap_or(0))
            .collect();
        let list = counts
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("/");
        let on_victim = self
            .victim
            .map_or(0, |v| o.per_pod.get(v).copied().unwrap_or(0));
        let strangers: usize = o
            .per_pod
            .iter()
            .filter(|(p, _)| !self.pods.iter().any(|x| &x.name == *p))
            .map(|(_, n)| n)
            .sum();
        let spread = o.ok > 0 && counts.iter().all(|&n| n >= floor);
        let mut text = format!(
            "gRPC-mode VIP: the calls of the one connection spread over the {} active pods: \
             {list} (each at least {floor}: half an even share, or 4σ below it if lower)",
            active.len()
        );
        if let Some(v) = self.victim {
            let _ = write!(text, "; {on_victim} to {v} (terminating: no new calls)");
        }
        if strangers > 0 {
            let _ = write!(text, "; {strangers} answered by pods outside the service");
        }
        c.add(spread && on_victim == 0 && strangers == 0, text);
    }

    /// The proxy's own counters agree with the calls made through it.
    fn check_proxy(&self, c: &mut Checks) {
        let p = match &self.proxy {
            Ok(p) => p,
            Err(e) => {
                c.add(false, format!("lb-agent /metrics: {e}"));
                return;
            }
        };
        let made = self.l7.map_or(0, |o| (o.ok + o.failed) as u64);
        let mismatched: Vec<String> = self
            .pods
            .iter()
            .filter_map(|pod| {
                let proxy = p.per_ip.get(&pod.ip).copied().unwrap_or(0);
                let client = self
                    .l7
                    .and_then(|o| o.per_pod.get(&pod.name))
                    .copied()
                    .unwrap_or(0) as u64;
                (proxy != client).then(|| format!("{}: {proxy} vs {client}", pod.name))
            })
            .collect();
        let mut text = format!(
            "lb-agent's proxy counted {} calls to {} (rpclb_service_new_flows_total), the client \
             made {made} through it",
            p.calls, self.l7_service
        );
        if mismatched.is_empty() {
            text.push_str("; per backend as the pods answered");
        } else {
            let _ = write!(
                text,
                "; per backend, proxy vs client: {}",
                mismatched.join(", ")
            );
        }
        c.add(made > 0 && p.calls == made && mismatched.is_empty(), text);
    }
}

/// One backend of the GOAWAY phase's service, from lb-agent's /metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GoawayBackend {
    /// `rpclb_backend_new_flows_total`: calls the proxy handed to it.
    pub calls: u64,
    /// `rpclb_backend_grpc_goaways_total`: its connections that got a GOAWAY.
    pub goaways: u64,
    /// `rpclb_backend_grpc_connections_opened_total`.
    pub opened: u64,
    /// `rpclb_backend_grpc_transparent_retries_total`: calls it did not process, sent again.
    pub resent: u64,
}

/// The GOAWAY phase: one connection to a gRPC-mode VIP whose pods close every connection at a
/// short age (MAX_CONNECTION_AGE).
pub struct GoawayReport<'a> {
    pub pods: &'a [PodInfo],
    /// The pods' MAX_CONNECTION_AGE.
    pub age: Duration,
    /// How long the calls were spread over.
    pub span: Duration,
    /// "host -> vip:port (service name)".
    pub desc: String,
    pub run: Option<&'a OneChannel>,
    /// Per pod IP, or why /metrics could not be read.
    pub proxy: Result<BTreeMap<String, GoawayBackend>, String>,
}

impl GoawayReport<'_> {
    pub fn render(&self, checks: &mut Checks) -> String {
        let iw = ip_width(self.pods);
        let mut s = String::new();
        let planned = self.run.map_or(0, |o| o.planned);
        let _ = writeln!(
            s,
            "GOAWAY: backends with a short MAX_CONNECTION_AGE ({}): {planned} unary calls over \
             one connection, started evenly over {}",
            fmt_duration(self.age),
            fmt_duration(self.span)
        );
        let _ = writeln!(s, "  gRPC-mode VIP: {}", self.desc);
        let m = self.proxy.as_ref().ok();
        let cell = |f: fn(&GoawayBackend) -> u64, ip: &str| {
            m.map_or_else(
                || "-".to_string(),
                |m| f(&m.get(ip).copied().unwrap_or_default()).to_string(),
            )
        };
        let _ = writeln!(
            s,
            "  {:<18} {:<iw$} {:>7} {:>13} {:>8} {:>20} {:>7}",
            "pod", "ip", "calls", "proxy: calls", "GOAWAYs", "connections opened", "resent"
        );
        let answered = |pod: &str| {
            self.run
                .map_or(0, |o| o.per_pod.get(pod).copied().unwrap_or(0))
        };
        for pod in self.pods {
            let _ = writeln!(
                s,
                "  {:<18} {:<iw$} {:>7} {:>13} {:>8} {:>20} {:>7}",
                pod.name,
                pod.ip,
                answered(&pod.name),
                cell(|b| b.calls, &pod.ip),
                cell(|b| b.goaways, &pod.ip),
                cell(|b| b.opened, &pod.ip),
                cell(|b| b.resent, &pod.ip),
            );
        }
        let total = |f: fn(&GoawayBackend) -> u64| m.map(|m| m.values().map(f).sum::<u64>());
        let (calls, goaways, opened, resent) = (
            total(|b| b.calls),
            total(|b| b.goaways),
            total(|b| b.opened),
            total(|b| b.resent),
        );
        let show = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        let _ = writeln!(
            s,
            "  {:<18} {:<iw$} {:>7} {:>13} {:>8} {:>20} {:>7}",
            "all",
            "",
            self.run.map_or(0, |o| o.ok),
            show(calls),
            show(goaways),
            show(opened),
            show(resent),
        );
        let _ = writeln!(
            s,
            "  calls: as the pods answered; from lb-agent's /metrics: the calls its proxy \
             handed to each pod (rpclb_backend_new_flows_total), the GOAWAYs, the connections \
             opened and the calls resent transparently (above a GOAWAY's last stream; \
             rpclb_backend_grpc_*_total){}",
            match &self.proxy {
                Ok(_) => String::new(),
                Err(e) => format!(": {e}"),
            }
        );

        let mut c = Checks::default();
        match self.run {
            None => c.add(false, "GOAWAY: no report from its channel"),
            Some(o) => {
                let mut text = format!(
                    "GOAWAY: {}/{planned} calls succeeded, {} failed, over {} while the pods \
                     sent {} GOAWAYs",
                    o.ok,
                    o.failed,
                    if o.connections == 1 {
                        "one client connection".to_string()
                    } else {
                        format!("{} client connections (NOT one)", o.connections)
                    },
                    show(goaways)
                );
                if let Some(e) = &o.error {
                    let _ = write!(text, "; first failure: {e}");
                }
                c.add(
                    planned > 0
                        && o.ok == planned
                        && o.failed == 0
                        && o.connections == 1
                        && goaways.is_some_and(|g| g > 0),
                    text,
                );
            }
        }
        match m {
            None => c.add(
                false,
                format!(
                    "GOAWAY: lb-agent /metrics: {}",
                    self.proxy.as_ref().err().map_or("?", String::as_str)
                ),
            ),
            Some(m) => {
                let per: Vec<GoawayBackend> = self
                    .pods
                    .iter()
                    .map(|p| m.get(&p.ip).copied().unwrap_or_default())
                    .collect();
                let list = |f: fn(&GoawayBackend) -> u64| {
                    per.iter()
                        .map(|b| f(b).to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                };
                c.add(
                    !per.is_empty() && per.iter().all(|b| b.goaways >= 1 && b.opened >= 2),
                    format!(
                        "GOAWAY: every pod closed connections of the proxy (GOAWAYs {}) and the \
                         proxy opened new ones (connections {}); calls resent transparently: {}",
                        list(|b| b.goaways),
                        list(|b| b.opened),
                        show(resent)
                    ),
                );
            }
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
    fn goaway_checks_need_zero_failures_and_goaways_on_every_pod() {
        let pods: Vec<PodInfo> = (1..=2)
            .map(|i| PodInfo {
                name: format!("p{i}"),
                ip: format!("10.0.0.{i}"),
            })
            .collect();
        let b = |goaways, opened| GoawayBackend {
            calls: 50,
            goaways,
            opened,
            resent: 0,
        };
        let m = |x: GoawayBackend,
                 y: GoawayBackend|
         -> Result<BTreeMap<String, GoawayBackend>, String> {
            Ok([("10.0.0.1".to_string(), x), ("10.0.0.2".to_string(), y)]
                .into_iter()
                .collect())
        };
        let lines = |run: &OneChannel, proxy| {
            let r = GoawayReport {
                pods: &pods,
                age: Duration::from_secs(1),
                span: Duration::from_secs(4),
                desc: "d".into(),
                run: Some(run),
                proxy,
            };
            let mut c = Checks::default();
            let text = r.render(&mut c);
            assert!(text.contains("GOAWAY: backends with a short MAX_CONNECTION_AGE (1.0 s)"));
            c.lines.iter().map(|(ok, _)| *ok).collect::<Vec<_>>()
        };
        let good = one(&[("p1", 50), ("p2", 50)], 1);
        assert_eq!(lines(&good, m(b(3, 4), b(2, 3))), [true, true]);
        // A failed call, or a pod that never sent GOAWAY, fails a check.
        let mut bad = good.clone();
        bad.failed = 1;
        bad.ok = 99;
        assert_eq!(lines(&bad, m(b(3, 4), b(2, 3))), [false, true]);
        assert_eq!(lines(&good, m(b(3, 4), b(0, 1))), [true, false]);
        assert_eq!(lines(&good, Err("down".into())), [false, false]);
    }

    #[test]
    fn per_call_floors() {
        // Half an even share where random placement clears it by 4σ.
        assert_eq!(per_call_floor(300, 2), 75);
        assert_eq!(per_call_floor(300, 3), 50);
        // 60 over 2: half is 15, 4σ below 30 is 14.5.
        assert_eq!(per_call_floor(60, 2), 14);
        // Many pods, few calls each: 4σ below the mean, at least 1.
        assert_eq!(per_call_floor(60, 49), 1);
        assert_eq!(per_call_floor(1470, 49), 8);
        assert_eq!(per_call_floor(10, 0), 0);
    }

    fn one(pods: &[(&str, usize)], connections: usize) -> OneChannel {
        let ok = pods.iter().map(|(_, n)| n).sum();
        OneChannel {
            svc: "x".into(),
            name: "x:1".into(),
            planned: ok,
            per_pod: pods.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
            ok,
            failed: 0,
            echoed: ok,
            connections,
            p50_us: 100,
            p99_us: 200,
            error: None,
        }
    }

    fn report<'a>(
        pods: &'a [PodInfo],
        l4: &'a OneChannel,
        l7: &'a OneChannel,
        proxy: Result<ProxyCounts, String>,
    ) -> Vec<(bool, String)> {
        let r = OneChannelReport {
            pods,
            victim: Some("p3"),
            planned: 60,
            concurrency: 4,
            l4_desc: "l4".into(),
            l7_desc: "l7".into(),
            l7_service: "ns/s:grpc".into(),
            l4: Some(l4),
            l7: Some(l7),
            proxy,
        };
        let mut c = Checks::default();
        r.render(&mut c);
        c.lines
    }

    #[test]
    fn one_channel_checks_fail_when_the_behaviour_is_wrong() {
        let pods: Vec<PodInfo> = (1..=3)
            .map(|i| PodInfo {
                name: format!("p{i}"),
                ip: format!("10.0.0.{i}"),
            })
            .collect();
        let proxy = |a: u64, b: u64, c: u64| {
            Ok(ProxyCounts {
                calls: a + b + c,
                per_ip: [("10.0.0.1", a), ("10.0.0.2", b), ("10.0.0.3", c)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            })
        };
        let good_l4 = one(&[("p1", 60)], 1);
        let good_l7 = one(&[("p1", 31), ("p2", 29)], 1);
        let ok = |v: &[(bool, String)]| v.iter().map(|(ok, _)| *ok).collect::<Vec<_>>();
        assert_eq!(
            ok(&report(&pods, &good_l4, &good_l7, proxy(31, 29, 0))),
            [true; 4]
        );
        // L4: split over pods, or on the terminating pod.
        let split = one(&[("p1", 30), ("p2", 30)], 1);
        assert!(!report(&pods, &split, &good_l7, proxy(31, 29, 0))[1].0);
        let on_victim = one(&[("p3", 60)], 1);
        assert!(!report(&pods, &on_victim, &good_l7, proxy(31, 29, 0))[1].0);
        // gRPC mode: one pod took (nearly) everything, or the terminating pod got calls.
        let lopsided = one(&[("p1", 50), ("p2", 10)], 1);
        assert!(!report(&pods, &good_l4, &lopsided, proxy(50, 10, 0))[2].0);
        let leak = one(&[("p1", 29), ("p2", 29), ("p3", 2)], 1);
        assert!(!report(&pods, &good_l4, &leak, proxy(29, 29, 2))[2].0);
        // More than one connection.
        let two = one(&[("p1", 31), ("p2", 29)], 2);
        assert!(!report(&pods, &good_l4, &two, proxy(31, 29, 0))[0].0);
        // A failed or unechoed call.
        let mut bad = good_l7.clone();
        bad.echoed -= 1;
        assert!(!report(&pods, &good_l4, &bad, proxy(31, 29, 0))[0].0);
        // The proxy's counts disagree, or could not be read.
        assert!(!report(&pods, &good_l4, &good_l7, proxy(31, 28, 0))[3].0);
        assert!(!report(&pods, &good_l4, &good_l7, proxy(30, 30, 0))[3].0);
        assert!(!report(&pods, &good_l4, &good_l7, Err("down".into()))[3].0);
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
