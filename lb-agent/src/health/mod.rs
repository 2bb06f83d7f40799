//! Active health checks: the agent probes every backend of each service with
//! a `health_check` from its own node (its network namespace), and takes a
//! failing backend out of selection.
//!
//! - One task per (service, backend) runs [`probe::check`] every `interval`
//!   (the first at once), each bounded by `timeout`; a [`state::Tracker`]
//!   applies the thresholds.
//! - Out of selection is the drain the data paths already have: the state
//!   that [`crate::engines::Engines`] applies is [`HealthChecker::effective`],
//!   the desired state with every unhealthy backend at weight 0. So the
//!   kernel maps (L4), the userspace L4 proxy and the gRPC mode's pick
//!   (`userspace::grpc::balance`) all give it no new flows or calls, and
//!   established flows (conntrack) and calls in flight keep their backend.
//! - A change of health wakes [`HealthChecker::changed`]; the agent then
//!   applies the current state again (diff-only: one backend's weight).
//! - Panic mode (as Envoy's): when no backend of a service that takes new
//!   flows is healthy, all of them take traffic, as if unchecked. Zeroing
//!   them all would turn a failing health endpoint (or a network problem
//!   between the node and the pods) into a full outage.
//!
//! - The spill backends of a gRPC locality spill-over (a `spill_weight`)
//!   are checked too: an unhealthy one loses its spill weight, so the
//!   balancer does not spill over to it. They do not count for panic mode.
//! - `grpc` checks of a service with `grpc.tls.upstream` speak TLS with the
//!   proxy's settings (lb-api's `tls::service`, the files followed by the
//!   same `Reloader`, polled before each check).
//!
//! Worst case from a backend's failure to no new flows: `unhealthy_threshold`
//! × `interval` + `timeout` (the last check's) + one apply (milliseconds).

pub mod probe;
pub mod state;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use lb_api::tls::reload::{Polled, Reloader};
use lb_api::tls::rustls::ClientConfig;
use lb_api::{DesiredState, HealthCheck, ServiceAddr, UpstreamTls};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use state::Tracker;

/// One checked backend of one service.
type Key = (ServiceAddr, SocketAddr);

/// The live part of one backend's checks, shared with its task.
#[derive(Debug, Default)]
struct Shared {
    tracker: Mutex<Tracker>,
    passed: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug)]
struct Probe {
    service: String,
    check: HealthCheck,
    /// The service's backend TLS (`grpc.tls.upstream`), for gRPC checks.
    tls: Option<UpstreamTls>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The checks of every backend of every checked service.
#[derive(Clone, Default)]
pub struct HealthChecker {
    probes: Arc<Mutex<HashMap<Key, Probe>>>,
    changed: Arc<Notify>,
}

impl fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthChecker").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One backend's health, for metrics and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub service: String,
    pub addr: ServiceAddr,
    pub backend: SocketAddr,
    pub kind: &'static str,
    pub healthy: bool,
    pub passed: u64,
    pub failed: u64,
}

/// For `/status` and `lbctl status`: the health checks: how many backends are checked, and those out of
/// selection.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Health {
    pub checked: usize,
    pub unhealthy: Vec<Unhealthy>,
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct Unhealthy {
    pub service: String,
    pub backend: String,
    pub check: String,
}

impl Health {
    pub fn of(all: &[BackendHealth]) -> Health {
        Health {
            checked: all.len(),
            unhealthy: all
                .iter()
                .filter(|b| !b.healthy)
                .map(|b| Unhealthy {
                    service: b.service.clone(),
                    backend: b.backend.to_string(),
                    check: b.kind.to_string(),
                })
                .collect(),
        }
    }
}

impl HealthChecker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves when some backend's health changed since the last call
    /// (a change before the first call counts).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Checks exactly the backends of `state`'s checked services that take
    /// new flows or are spill backends (active, with a spill weight):
    /// starts what is new, stops what is gone. A backend whose
    /// check settings changed keeps its health. Call within a tokio runtime.
    pub fn set_targets(&self, state: &DesiredState) {
        let mut want: HashMap<Key, (&str, &HealthCheck, Option<&UpstreamTls>)> = HashMap::new();
        for s in &state.services {
            let Some(hc) = &s.health_check else { continue };
            let tls = s.grpc.as_ref().and_then(|g| g.tls.as_ref());
            let tls = tls.and_then(|t| t.upstream.as_ref());
            let spill = s
                .backends
                .iter()
                .filter(|b| b.state == lb_api::BackendState::Active)
                .filter(|b| b.spill_weight.is_some_and(|w| w > 0));
            for b in lb_api::validate::live_backends(&s.backends).chain(spill) {
                want.insert(
                    (s.addr(), SocketAddr::new(b.ip, b.port)),
                    (s.name.as_str(), hc, tls),
                );
            }
        }
        let mut probes = lock(&self.probes);
        let mut old = std::mem::take(&mut *probes);
        let mut started = 0;
        for (key, (name, hc, tls)) in want {
            let prev = match old.remove(&key) {
                Some(mut p) if p.check == *hc && p.tls.as_ref() == tls => {
                    p.service = name.to_string();
                    probes.insert(key, p);
                    continue;
                }
                prev => prev,
            };
            // New settings keep the health and counters so far.
            let shared = prev.as_ref().map(|p| p.shared.clone()).unwrap_or_default();
            drop(prev);
            let task = tokio::spawn(run(
                key.1,
                name.to_string(),
                hc.clone(),
                tls.cloned(),
                shared.clone(),
                self.changed.clone(),
            ));
            probes.insert(
                key,
                Probe {
                    service: name.to_string(),
                    check: hc.clone(),
                    tls: tls.cloned(),
                    shared,
                    task,
                },
            );
            started += 1;
        }
        let stopped = old.len();
        drop(old);
        if started > 0 || stopped > 0 {
            debug!(started, stopped, checked = probes.len(), "health checks");
        }
    }

    /// Whether this backend of this service is healthy (unchecked ones are).
    pub fn is_healthy(&self, svc: ServiceAddr, backend: SocketAddr) -> bool {
        lock(&self.probes)
            .get(&(svc, backend))
            .is_none_or(|p| lock(&p.shared.tracker).healthy())
    }

    /// `state` with every unhealthy backend of a checked service at weight 0
    /// (drained: no new flows, established ones kept), except in panic mode
    /// (no healthy backend left: all take traffic).
    pub fn effective(&self, state: &DesiredState) -> DesiredState {
        let mut out = state.clone();
        let probes = lock(&self.probes);
        let healthy = |svc: ServiceAddr, b: &lb_api::Backend| {
            probes
                .get(&(svc, SocketAddr::new(b.ip, b.port)))
                .is_none_or(|p| lock(&p.shared.tracker).healthy())
        };
        for s in out.services.iter_mut().filter(|s| s.health_check.is_some()) {
            let addr = s.addr();
            // No spill-over to an unhealthy backend.
            for b in s.backends.iter_mut() {
                if b.spill_weight.is_some() && !healthy(addr, b) {
                    b.spill_weight = None;
                }
            }
            let live = s.backends.iter().filter(|b| b.takes_new_flows());
            let (mut n, mut up) = (0, 0);
            for b in live {
                n += 1;
                up += usize::from(healthy(addr, b));
            }
            if up == 0 && n > 0 {
                // Panic mode: the check is ignored.
                continue;
            }
            for b in s.backends.iter_mut() {
                if b.takes_new_flows() && !healthy(addr, b) {
                    b.weight = 0;
                }
            }
        }
        out
    }

    /// Whether `svc` is in panic mode in `state` (every backend that takes
    /// new flows is unhealthy).
    pub fn panics(&self, state: &DesiredState) -> Vec<String> {
        state
            .services
            .iter()
            .filter(|s| s.health_check.is_some())
            .filter(|s| {
                let addr = s.addr();
                let mut live = s.backends.iter().filter(|b| b.takes_new_flows()).peekable();
                live.peek().is_some()
                    && live.all(|b| !self.is_healthy(addr, SocketAddr::new(b.ip, b.port)))
            })
            .map(|s| s.name.clone())
            .collect()
    }

    /// Every checked backend, sorted by service and backend.
    pub fn snapshot(&self) -> Vec<BackendHealth> {
        let mut v: Vec<BackendHealth> = lock(&self.probes)
            .iter()
            .map(|((addr, backend), p)| BackendHealth {
                service: p.service.clone(),
                addr: *addr,
                backend: *backend,
                kind: p.check.kind.as_str(),
                healthy: lock(&p.shared.tracker).healthy(),
                passed: p.shared.passed.load(Relaxed),
                failed: p.shared.failed.load(Relaxed),
            })
            .collect();
        v.sort_by(|a, b| (&a.service, a.backend).cmp(&(&b.service, b.backend)));
        v
    }

    /// The `/metrics` families of the checks.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(HealthCollector(self.clone()))
    }
}

/// The TLS of a gRPC check of a TLS-upstream service: lb-api's
/// [`Reloader`] (the proxy's too), polled before each check, so a check
/// uses the last good files as the proxy does. Files not readable yet fail
/// the check (with the reason) and are tried again at the next.
struct CheckTls {
    spec: UpstreamTls,
    files: Option<Reloader<ClientConfig>>,
}

impl CheckTls {
    fn current(
        &mut self,
        backend: SocketAddr,
        service: &str,
    ) -> Result<probe::Tls, probe::Failure> {
        if let Some(r) = self.files.as_mut() {
            if let Polled::Invalid(e) = r.poll() {
                debug!(
                    service,
                    "health check TLS files changed but not usable ({e}); keeping the last good ones"
                );
            }
        } else {
            let r = lb_api::tls::service::upstream_reloader(&self.spec)
                .map_err(|e| probe::Failure::Tls(e.to_string()))?;
            self.files = Some(r);
        }
        let config = self
            .files
            .as_ref()
            .map(|r| r.current().config.clone())
            .ok_or_else(|| probe::Failure::Tls("no TLS configuration".into()))?;
        let name = lb_api::tls::service::upstream_name(&self.spec, backend.ip())
            .ok_or_else(|| probe::Failure::Tls("invalid server_name".into()))?;
        Ok(probe::Tls { config, name })
    }
}

/// Checks one backend until aborted.
async fn run(
    backend: SocketAddr,
    service: String,
    hc: HealthCheck,
    tls: Option<UpstreamTls>,
    shared: Arc<Shared>,
    changed: Arc<Notify>,
) {
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Only gRPC checks speak TLS; a TCP check is a connect either way.
    let mut tls = tls
        .filter(|_| hc.kind == lb_api::HealthCheckKind::Grpc)
        .map(|spec| CheckTls { spec, files: None });
    loop {
        tick.tick().await;
        let result = match tls.as_mut().map(|t| t.current(backend, &service)) {
            None => probe::check(&hc, backend, None).await,
            Some(Ok(t)) => probe::check(&hc, backend, Some(&t)).await,
            Some(Err(e)) => Err(e),
        };
        let counter = if result.is_ok() {
            &shared.passed
        } else {
            &shared.failed
        };
        counter.fetch_add(1, Relaxed);
        let change = lock(&shared.tracker).record(
            result.is_ok(),
            hc.unhealthy_threshold,
            hc.healthy_threshold,
        );
        match (change, &result) {
            (Some(true), _) => {
                info!(service, %backend, check = %hc.kind, "backend healthy again: back in selection");
                changed.notify_one();
            }
            (Some(false), Err(e)) => {
                warn!(service, %backend, check = %hc.kind, "backend unhealthy, out of selection: {e}");
                changed.notify_one();
            }
            (_, Err(e)) => debug!(service, %backend, "health check failed: {e}"),
            _ => {}
        }
    }
}

#[derive(Debug)]
struct HealthCollector(HealthChecker);

impl Collector for HealthCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snap = self.0.snapshot();
        let labels = |h: &BackendHealth| {
            vec![
                ("service", h.service.clone()),
                ("backend", h.backend.to_string()),
                ("check", h.kind.to_string()),
            ]
        };
        let mut me = enc.encode_descriptor(
            "rpclb_backend_healthy",
            "1 while a health-checked backend passes its checks, 0 while it is out of selection (unhealthy_threshold failures in a row; back after healthy_threshold passes)",
            None,
            MetricType::Gauge,
        )?;
        for h in &snap {
            ConstGauge::new(i64::from(h.healthy)).encode(me.encode_family(&labels(h))?)?;
        }
        let mut me = enc.encode_descriptor(
            "rpclb_health_checks",
            "Health checks run, by result (pass or fail)",
            None,
            MetricType::Counter,
        )?;
        for h in &snap {
            for (result, n) in [("pass", h.passed), ("fail", h.failed)] {
                let mut l = labels(h);
                l.push(("result", result.to_string()));
                ConstCounter::new(n).encode(me.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_api::{Algorithm, Backend, HealthCheckKind, Protocol, Service};

    use super::*;

    fn state(check: bool) -> DesiredState {
        let mut s = Service::new(
            "a/b:c",
            Ipv4Addr::new(10, 96, 0, 1),
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            // Loopback, a closed port: the probes' one check each (the
            // interval is 5 s) stays on this host and fails fast, below
            // the threshold of 3.
            (1..=3)
                .map(|i| Backend::new(Ipv4Addr::new(127, 0, 0, i), 9))
                .collect(),
        );
        if check {
            s.health_check = Some(HealthCheck::new(HealthCheckKind::Tcp));
        }
        DesiredState { services: vec![s] }
    }

    /// Marks a backend down by hand (the task's checks are not awaited).
    fn force(h: &HealthChecker, st: &DesiredState, i: usize, healthy: bool) {
        let s = &st.services[0];
        let b = &s.backends[i];
        let probes = lock(&h.probes);
        let p = &probes[&(s.addr(), SocketAddr::new(b.ip, b.port))];
        let mut t = lock(&p.shared.tracker);
        while t.healthy() != healthy {
            t.record(healthy, 1, 1);
        }
    }

    #[tokio::test]
    async fn unhealthy_backends_are_drained_and_all_down_is_panic_mode() {
        let h = HealthChecker::new();
        let st = state(true);
        h.set_targets(&st);
        assert_eq!(h.snapshot().len(), 3);
        assert_eq!(h.effective(&st), st, "all healthy: unchanged");
        force(&h, &st, 1, false);
        let e = h.effective(&st);
        let w: Vec<u32> = e.services[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, [1, 0, 1]);
        assert!(h.panics(&st).is_empty());
        force(&h, &st, 0, false);
        force(&h, &st, 2, false);
        assert_eq!(h.effective(&st), st, "panic mode: every backend");
        assert_eq!(h.panics(&st), ["a/b:c"]);
        // Unchecked services are left alone; their probes stop.
        let plain = state(false);
        h.set_targets(&plain);
        assert!(h.snapshot().is_empty());
        assert_eq!(h.effective(&plain), plain);
    }

    /// A spill backend (locality spill-over) is checked, and loses its
    /// spill weight while unhealthy; it is no part of panic mode.
    #[tokio::test]
    async fn spill_backends_are_checked_and_lose_their_spill_weight() {
        let h = HealthChecker::new();
        let mut st = state(true);
        let s = &mut st.services[0];
        s.grpc = Some(lb_api::GrpcPolicy::default());
        s.locality = Some(lb_api::Locality {
            spill_outstanding: Some(4),
            ..lb_api::Locality::prefer_same_zone()
        });
        s.backends[2].weight = 0;
        s.backends[2].spill_weight = Some(1);
        h.set_targets(&st);
        assert_eq!(h.snapshot().len(), 3, "the spill backend too");
        assert_eq!(h.effective(&st), st, "all healthy: unchanged");
        force(&h, &st, 2, false);
        let e = h.effective(&st);
        assert_eq!(e.services[0].backends[2].spill_weight, None);
        assert_eq!(e.services[0].backends[2].weight, 0);
        assert!(h.panics(&st).is_empty());
        // Both others down: panic mode for them; still no spill to it.
        force(&h, &st, 0, false);
        force(&h, &st, 1, false);
        let e = h.effective(&st);
        let w: Vec<u32> = e.services[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, [1, 1, 0]);
        assert_eq!(e.services[0].backends[2].spill_weight, None);
        force(&h, &st, 2, true);
        assert_eq!(
            h.effective(&st).services[0].backends[2].spill_weight,
            Some(1)
        );
    }

    #[tokio::test]
    async fn changed_settings_keep_the_health() {
        let h = HealthChecker::new();
        let mut st = state(true);
        h.set_targets(&st);
        force(&h, &st, 1, false);
        st.services[0]
            .health_check
            .as_mut()
            .unwrap()
            .unhealthy_threshold = 5;
        h.set_targets(&st);
        let down: Vec<bool> = h.snapshot().iter().map(|b| b.healthy).collect();
        assert_eq!(down, [true, false, true]);
        // A backend that leaves and comes back starts healthy.
        let mut fewer = st.clone();
        fewer.services[0].backends.remove(1);
        h.set_targets(&fewer);
        h.set_targets(&st);
        assert!(h.snapshot().iter().all(|b| b.healthy));
    }
}
