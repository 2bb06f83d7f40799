//! The agent's Prometheus metrics (text format 0.0.4, via `prometheus-client`).
//!
//! Two kinds:
//! - the agent's own (reloads, GC runs, readiness): ordinary registered
//!   metrics, updated by the run loop;
//! - the kernel's counters (per service, per backend, per reason): read from
//!   the maps at scrape time by a [`Collector`], so a scrape always shows the
//!   maps as they are, with nothing cached in between.
//!
//! Every series is labelled by name, never by raw id: `service` is the
//! service's `namespace/name:port`, `backend` its `ip:port`. Service-level and
//! backend-level counters are separate families (`rpclb_service_*`,
//! `rpclb_backend_*`) so that `sum()` over either is meaningful; one family
//! holding both levels would count every packet twice.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::warn;

use crate::datapath::{BackendStats, DatapathError, GrpcBackendCounts, MapReader, ServiceStats};
use crate::userspace::{CODE_SLOTS, CallStats, LATENCY_BUCKETS};

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// One service's counters, with its backends'.
#[derive(Clone, Debug, Default)]
pub struct ServiceSnapshot {
    /// `namespace/name:port`.
    pub name: String,
    pub stats: ServiceStats,
    pub backends: Vec<BackendStats>,
    /// gRPC mode: the calls by final status and latency.
    pub grpc_calls: Option<crate::userspace::CallStats>,
    /// gRPC mode with TLS (`grpc.tls`): handshakes and certificate reloads.
    pub grpc_tls: Option<GrpcTlsCounts>,
}

/// A gRPC-mode service's TLS counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpcTlsCounts {
    /// Client TLS handshakes that succeeded.
    pub handshakes: u64,
    /// Client TLS handshakes that failed or timed out.
    pub handshake_failures: u64,
    /// Changed certificate files taken.
    pub reloads: u64,
    /// Changed certificate files refused (the last good set stayed).
    pub reload_errors: u64,
}

/// The kernel's counters at one instant.
#[derive(Clone, Debug, Default)]
pub struct DatapathSnapshot {
    pub services: Vec<ServiceSnapshot>,
    /// Drop / pass / forward counters by reason name.
    pub reasons: Vec<(&'static str, u64)>,
}

impl DatapathSnapshot {
    /// Reads every counter the metrics show.
    pub fn read(w: &MapReader) -> Result<Self, DatapathError> {
        // The flow cache's pending counts once, before the counter maps.
        let pending = w.pending_counts()?;
        let services = w
            .services()
            .into_iter()
            .map(|s| {
                Ok(ServiceSnapshot {
                    stats: w.service_stats_with(&s.addr, &pending)?,
                    backends: w.backend_stats_with(&s.addr, &pending)?,
                    name: s.name,
                    grpc_calls: None,
                    grpc_tls: None,
                })
            })
            .collect::<Result<_, DatapathError>>()?;
        Ok(DatapathSnapshot {
            services,
            reasons: w.reasons_with(&pending)?,
        })
    }
}

/// Where the scrape-time collector gets the kernel's counters.
pub trait StatsSource: Send + Sync + 'static {
    fn snapshot(&self) -> Result<DatapathSnapshot, String>;
}

/// One GC sweep, as the metrics see it.
#[derive(Clone, Debug, Default)]
pub struct GcSample {
    pub duration: Duration,
    /// Conntrack map entries (both directions) left after the sweep.
    pub entries: Option<u64>,
    /// Flows (forward entries) left after the sweep.
    pub flows: Option<u64>,
    /// Flows expired, by conntrack state (`syn`, `established`, ...).
    pub expired: Vec<(String, u64)>,
    /// Entries removed without a live partner or backend.
    pub orphans: u64,
}

type Labels = Vec<(&'static str, String)>;

impl Metrics {
    /// Shows what the data path is and where it is attached.
    pub fn set_datapath(&self, st: &crate::agent::DatapathStatus) {
        self.datapath_info.clear();
        let flag = |b: bool| if b { "true" } else { "false" }.to_string();
        let programs = st.programs.unwrap_or_default().to_string();
        if st.interfaces.is_empty() {
            self.datapath_info
                .get_or_create(&vec![
                    ("datapath", st.datapath.to_string()),
                    ("iface", String::new()),
                    ("attach", String::new()),
                    ("programs", programs.clone()),
                    (
                        "fallback",
                        flag(st.fallback.is_some() || st.programs_fallback.is_some()),
                    ),
                ])
                .set(1);
        }
        for a in &st.interfaces {
            self.datapath_info
                .get_or_create(&vec![
                    ("datapath", st.datapath.to_string()),
                    ("iface", a.iface.clone()),
                    ("attach", a.how.to_string()),
                    ("programs", programs.clone()),
                    (
                        "fallback",
                        flag(a.fallback.is_some() || st.programs_fallback.is_some()),
                    ),
                ])
                .set(1);
        }
    }

    /// Shows the refusals of the last apply (and only those).
    pub fn set_refused(&self, refused: &[lb_api::Refusal]) {
        self.refused.clear();
        for r in refused {
            self.refused
                .get_or_create(&vec![("service", r.service.clone())])
                .set(1);
        }
    }
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub config_reloads: Counter,
    pub config_reload_errors: Counter,
    pub ready: Gauge,
    pub gc_duration: Histogram,
    pub gc_errors: Counter,
    pub gc_expired: Family<Labels, Counter>,
    pub gc_orphans: Counter,
    pub conntrack_entries: Gauge,
    pub conntrack_flows: Gauge,
    pub conntrack_capacity: Gauge,
    /// 1 during an eviction episode (`crate::pressure`).
    pub conntrack_pressure: Gauge,
    pub conntrack_pressure_episodes: Counter,
    /// With `--controller`: 1 while the stream is open.
    pub controller_connected: Gauge,
    /// With `--controller`: the last version applied.
    pub controller_version: Gauge,
    /// With `--controller`: streams that ended (each is followed by a reconnect).
    pub controller_reconnects: Gauge,
    /// With `--controller https://`: streams restarted to present a new certificate.
    pub controller_cert_rotations: Gauge,
    /// With `--controller https://`: when the presented certificate expires (Unix time).
    pub controller_cert_expiry: Gauge,
    /// 1 per service of the desired state that the agent did not take.
    pub refused: Family<Labels, Gauge>,
    /// 1 per interface and how it is attached (or one series for userspace).
    pub datapath_info: Family<Labels, Gauge>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers everything; `source` feeds the kernel counters at scrape time.
    pub fn new(source: Box<dyn StatsSource>) -> Self {
        Self::with_collectors(source, Vec::new())
    }

    /// [`Metrics::new`], plus more families read at scrape time (the
    /// health checks').
    pub fn with_collectors(
        source: Box<dyn StatsSource>,
        extra: Vec<Box<dyn prometheus_client::collector::Collector>>,
    ) -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            config_reloads: Counter::default(),
            config_reload_errors: Counter::default(),
            ready: Gauge::default(),
            gc_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            gc_errors: Counter::default(),
            gc_expired: Family::default(),
            gc_orphans: Counter::default(),
            conntrack_entries: Gauge::default(),
            conntrack_flows: Gauge::default(),
            conntrack_capacity: Gauge::default(),
            conntrack_pressure: Gauge::default(),
            conntrack_pressure_episodes: Counter::default(),
            controller_connected: Gauge::default(),
            controller_version: Gauge::default(),
            controller_reconnects: Gauge::default(),
            controller_cert_rotations: Gauge::default(),
            controller_cert_expiry: Gauge::default(),
            refused: Family::default(),
            datapath_info: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rpclb_config_reloads",
            "Config reloads applied (file change or SIGHUP)",
            m.config_reloads.clone(),
        );
        registry.register(
            "rpclb_config_reload_errors",
            "Config reloads rejected (unreadable, invalid or not applicable); the running state was kept",
            m.config_reload_errors.clone(),
        );
        registry.register(
            "rpclb_ready",
            "1 once the programs are attached and the first state is applied",
            m.ready.clone(),
        );
        registry.register(
            "rpclb_gc_duration_seconds",
            "Time taken by each conntrack GC sweep",
            m.gc_duration.clone(),
        );
        registry.register(
            "rpclb_gc_errors",
            "Conntrack GC sweeps that failed",
            m.gc_errors.clone(),
        );
        registry.register(
            "rpclb_gc_expired",
            "Conntrack flows expired by GC, by state",
            m.gc_expired.clone(),
        );
        registry.register(
            "rpclb_gc_orphans",
            "Conntrack entries removed by GC without a live partner entry or backend",
            m.gc_orphans.clone(),
        );
        registry.register(
            "rpclb_conntrack_entries",
            "Conntrack map entries (two per flow) after the last GC sweep",
            m.conntrack_entries.clone(),
        );
        registry.register(
            "rpclb_conntrack_flows",
            "Conntrack flows after the last GC sweep",
            m.conntrack_flows.clone(),
        );
        registry.register(
            "rpclb_conntrack_capacity",
            "Conntrack map capacity in entries (two per flow)",
            m.conntrack_capacity.clone(),
        );
        registry.register(
            "rpclb_conntrack_pressure",
            "1 while the conntrack map evicts open flows (from the first eviction until a sweep sees none and the map below 90%)",
            m.conntrack_pressure.clone(),
        );
        registry.register(
            "rpclb_conntrack_pressure_episodes",
            "Eviction episodes of the conntrack map (one WARN each)",
            m.conntrack_pressure_episodes.clone(),
        );
        registry.register(
            "rpclb_controller_connected",
            "1 while the agent's stream to the controller is open (--controller)",
            m.controller_connected.clone(),
        );
        registry.register(
            "rpclb_controller_version",
            "The last controller state version the agent received and applied (--controller)",
            m.controller_version.clone(),
        );
        registry.register(
            "rpclb_datapath_info",
            "1 per interface the kernel path is attached to: datapath=\"ebpf\", iface, attach (xdp, xdp-generic, tcx, tc-netlink), programs (the eBPF program set: full, or compat for kernels before 5.12), fallback=\"true\" when the attachment or the program set is not what was tried first; or one series datapath=\"userspace\" (programs empty; fallback=\"true\" when eBPF could not load)",
            m.datapath_info.clone(),
        );
        registry.register(
            "rpclb_service_refused",
            "1 for each service of the desired state that the agent did not take (invalid, or a full map; the log and the controller's ack say why); its previous version, if any, is still served",
            m.refused.clone(),
        );
        registry.register(
            "rpclb_controller_reconnects",
            "Controller streams that ended and were retried (--controller)",
            m.controller_reconnects.clone(),
        );
        registry.register(
            "rpclb_controller_cert_rotations",
            "Controller streams restarted to present a new client certificate (--controller https://)",
            m.controller_cert_rotations.clone(),
        );
        registry.register(
            "rpclb_controller_cert_expiry_timestamp_seconds",
            "When the client certificate presented to the controller expires, Unix time (0: plaintext)",
            m.controller_cert_expiry.clone(),
        );
        registry.register_collector(Box::new(DatapathCollector {
            source,
            errors: AtomicU64::new(0),
        }));
        for c in extra {
            registry.register_collector(c);
        }
        Metrics { registry, ..m }
    }

    /// Records one finished GC sweep.
    pub fn record_gc(&self, s: &GcSample) {
        self.gc_duration.observe(s.duration.as_secs_f64());
        for (state, n) in &s.expired {
            self.gc_expired
                .get_or_create(&vec![("state", state.clone())])
                .inc_by(*n);
        }
        self.gc_orphans.inc_by(s.orphans);
        if let Some(e) = s.entries {
            self.conntrack_entries.set(e.try_into().unwrap_or(i64::MAX));
        }
        if let Some(f) = s.flows {
            self.conntrack_flows.set(f.try_into().unwrap_or(i64::MAX));
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready.into());
    }

    /// Everything, in the Prometheus text format. Reads the maps: call it
    /// where blocking is fine.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Reads the kernel counters at scrape time.
struct DatapathCollector {
    source: Box<dyn StatsSource>,
    /// Scrapes whose map reads failed.
    errors: AtomicU64,
}

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatapathCollector").finish_non_exhaustive()
    }
}

fn family<L: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    mtype: MetricType,
    rows: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut me = enc.encode_descriptor(name, help, None, mtype)?;
    for (labels, m) in rows {
        m.encode(me.encode_family(&labels)?)?;
    }
    Ok(())
}

fn svc_label(s: &ServiceSnapshot) -> Labels {
    vec![("service", s.name.clone())]
}

fn backend_label(s: &ServiceSnapshot, b: &BackendStats) -> Labels {
    vec![
        ("service", s.name.clone()),
        (
            "backend",
            std::net::SocketAddr::new(b.ip, b.port).to_string(),
        ),
    ]
}

/// A histogram read at scrape time (the gRPC call latencies).
struct ConstHistogram {
    sum: f64,
    count: u64,
    /// Per bucket (not cumulative), the last `+Inf`.
    buckets: Vec<(f64, u64)>,
}

impl ConstHistogram {
    fn latency(c: &CallStats) -> Self {
        ConstHistogram {
            sum: c.latency_sum_us as f64 / 1e6,
            count: c.latency.iter().sum(),
            buckets: LATENCY_BUCKETS
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(c.latency.iter().copied())
                .collect(),
        }
    }
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut e: MetricEncoder) -> fmt::Result {
        e.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// One row per status code with calls (at most [`CODE_SLOTS`] per series:
/// the codes 0-16 by name, `OTHER`), labelled `code`.
fn by_code(labels: &Labels, c: &CallStats) -> Vec<(Labels, ConstCounter)> {
    (0..CODE_SLOTS)
        .filter(|&i| c.codes[i] > 0)
        .map(|i| {
            let mut l = labels.clone();
            l.push(("code", CallStats::code_label(i).to_string()));
            (l, ConstCounter::new(c.codes[i]))
        })
        .collect()
}

/// The services' selectors at scrape time, as the last apply left them
/// (`crate::engines::SharedSelectors`).
pub fn selector_collector(sel: crate::engines::SharedSelectors) -> Box<dyn Collector> {
    Box::new(SelectorCollector(sel))
}

#[derive(Debug)]
struct SelectorCollector(crate::engines::SharedSelectors);

impl Collector for SelectorCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let sel = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        family(
            &mut enc,
            "rpclb_service_selector_failed",
            "Per service that names a user-defined selector: 1 while it is not in place (its error is on /status and `lbctl selector list`; the service uses its built-in algorithm), 0 while it is loaded",
            MetricType::Gauge,
            sel.iter().map(|s| {
                (
                    vec![
                        ("service", s.service.clone()),
                        ("selector", s.selector.clone()),
                    ],
                    ConstGauge::new(i64::from(!s.loaded())),
                )
            }),
        )
    }
}

/// `pass_no_service` -> `pass`: the verdict class of a reason.
fn reason_kind(reason: &str) -> &str {
    reason.split('_').next().unwrap_or(reason)
}

impl Collector for DatapathCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snap = self.source.snapshot();
        if let Err(e) = &snap {
            warn!("metrics: reading the data path maps failed: {e}");
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let c = ConstCounter::new(self.errors.load(Ordering::Relaxed));
        c.encode(enc.encode_descriptor(
            "rpclb_scrape_errors",
            "Scrapes that could not read the data path maps",
            None,
            MetricType::Counter,
        )?)?;
        let Ok(snap) = snap else { return Ok(()) };
        let svcs = &snap.services;

        family(
            &mut enc,
            "rpclb_services",
            "Services in the data path",
            MetricType::Gauge,
            [(Labels::new(), ConstGauge::new(svcs.len() as i64))],
        )?;
        type SvcField = fn(&ServiceStats) -> u64;
        let svc_counters: [(&str, &str, SvcField); 4] = [
            (
                "rpclb_service_packets",
                "Packets to the service (both directions), by service",
                |s| s.packets,
            ),
            (
                "rpclb_service_bytes",
                "Bytes to the service (both directions), by service",
                |s| s.bytes,
            ),
            (
                "rpclb_service_new_flows",
                "New flows (connections) balanced, by service",
                |s| s.new_flows,
            ),
            (
                "rpclb_service_drops",
                "Packets to the service dropped or refused, by service",
                |s| s.drops,
            ),
        ];
        for (name, help, get) in svc_counters {
            family(
                &mut enc,
                name,
                help,
                MetricType::Counter,
                svcs.iter()
                    .map(|s| (svc_label(s), ConstCounter::new(get(&s.stats)))),
            )?;
        }
        family(
            &mut enc,
            "rpclb_service_active_flows",
            "Open flows of the service (sum over its backends)",
            MetricType::Gauge,
            svcs.iter().map(|s| {
                let n: u64 = s.backends.iter().map(|b| b.active).sum();
                (svc_label(s), ConstGauge::new(n.min(i64::MAX as u64) as i64))
            }),
        )?;

        type BackendField = fn(&BackendStats) -> u64;
        let backend_counters: [(&str, &str, BackendField); 3] = [
            (
                "rpclb_backend_packets",
                "Packets of flows to the backend (both directions)",
                |b| b.packets,
            ),
            (
                "rpclb_backend_bytes",
                "Bytes of flows to the backend (both directions)",
                |b| b.bytes,
            ),
            (
                "rpclb_backend_new_flows",
                "New flows sent to the backend",
                |b| b.new_flows,
            ),
        ];
        let per_backend = || {
            svcs.iter()
                .flat_map(|s| s.backends.iter().map(move |b| (s, b)))
        };
        for (name, help, get) in backend_counters {
            family(
                &mut enc,
                name,
                help,
                MetricType::Counter,
                per_backend().map(|(s, b)| (backend_label(s, b), ConstCounter::new(get(b)))),
            )?;
        }
        type GrpcField = fn(&GrpcBackendCounts) -> u64;
        let grpc_counters: [(&str, &str, GrpcField); 5] = [
            (
                "rpclb_backend_grpc_connections_opened",
                "gRPC mode: HTTP/2 connections opened to the backend",
                |g| g.connections_opened,
            ),
            (
                "rpclb_backend_grpc_goaways",
                "gRPC mode: connections to the backend that it sent a GOAWAY on",
                |g| g.goaways,
            ),
            (
                "rpclb_backend_grpc_transparent_retries",
                "gRPC mode: calls the backend did not process (REFUSED_STREAM, above a GOAWAY's last stream), sent again",
                |g| g.transparent_retries,
            ),
            (
                "rpclb_backend_grpc_retries",
                "gRPC mode: calls retried by the service's retry policy after the backend answered a retryable status",
                |g| g.retries,
            ),
            (
                "rpclb_backend_grpc_retries_throttled",
                "gRPC mode: retryable answers of the backend not retried because the service's retry throttle was low",
                |g| g.retries_throttled,
            ),
        ];
        for (name, help, get) in grpc_counters {
            family(
                &mut enc,
                name,
                help,
                MetricType::Counter,
                per_backend().filter_map(|(s, b)| {
                    let g = b.grpc.as_ref()?;
                    Some((backend_label(s, b), ConstCounter::new(get(g))))
                }),
            )?;
        }
        let grpc_backends =
            || per_backend().filter_map(|(s, b)| Some((backend_label(s, b), b.grpc.as_ref()?)));
        family(
            &mut enc,
            "rpclb_service_grpc_calls",
            "gRPC mode: calls by the final status the client got (code: OK, CANCELLED, ..., UNAVAILABLE, ..., OTHER)",
            MetricType::Counter,
            svcs.iter()
                .filter_map(|s| Some(by_code(&svc_label(s), s.grpc_calls.as_ref()?)))
                .flatten(),
        )?;
        family(
            &mut enc,
            "rpclb_service_grpc_call_duration_seconds",
            "gRPC mode: time from a call's request to the end of its response (its final status)",
            MetricType::Histogram,
            svcs.iter().filter_map(|s| {
                Some((
                    svc_label(s),
                    ConstHistogram::latency(s.grpc_calls.as_ref()?),
                ))
            }),
        )?;
        let tls = || {
            svcs.iter()
                .filter_map(|s| Some((svc_label(s), s.grpc_tls?)))
        };
        let with_result = |l: &Labels, r: &str| {
            let mut l = l.clone();
            l.push(("result", r.to_string()));
            l
        };
        family(
            &mut enc,
            "rpclb_service_grpc_tls_handshakes",
            "gRPC mode with TLS: client TLS handshakes, by result (ok; failed: refused, bad certificate or no handshake within 10 s)",
            MetricType::Counter,
            tls().flat_map(|(l, t)| {
                [
                    (with_result(&l, "ok"), ConstCounter::new(t.handshakes)),
                    (
                        with_result(&l, "failed"),
                        ConstCounter::new(t.handshake_failures),
                    ),
                ]
            }),
        )?;
        family(
            &mut enc,
            "rpclb_service_grpc_tls_reloads",
            "gRPC mode with TLS: changed certificate files, by result (ok: taken; failed: refused, the last good set stays)",
            MetricType::Counter,
            tls().flat_map(|(l, t)| {
                [
                    (with_result(&l, "ok"), ConstCounter::new(t.reloads)),
                    (
                        with_result(&l, "failed"),
                        ConstCounter::new(t.reload_errors),
                    ),
                ]
            }),
        )?;
        family(
            &mut enc,
            "rpclb_backend_grpc_calls",
            "gRPC mode: attempts sent to the backend, by the status it answered (a reset or refused stream or a broken connection: UNAVAILABLE; cut by the proxy: CANCELLED)",
            MetricType::Counter,
            grpc_backends().flat_map(|(l, g)| by_code(&l, &g.calls)),
        )?;
        family(
            &mut enc,
            "rpclb_backend_grpc_call_duration_seconds",
            "gRPC mode: time from sending an attempt to the backend to its end",
            MetricType::Histogram,
            grpc_backends().map(|(l, g)| (l, ConstHistogram::latency(&g.calls))),
        )?;
        family(
            &mut enc,
            "rpclb_backend_grpc_ejected",
            "gRPC mode: 1 while outlier detection keeps the backend out of the pick",
            MetricType::Gauge,
            grpc_backends().map(|(l, g)| (l, ConstGauge::new(i64::from(g.ejected)))),
        )?;
        family(
            &mut enc,
            "rpclb_backend_grpc_ejections",
            "gRPC mode: times outlier detection ejected the backend",
            MetricType::Counter,
            grpc_backends().map(|(l, g)| (l, ConstCounter::new(g.ejections))),
        )?;
        family(
            &mut enc,
            "rpclb_backend_active_flows",
            "Open flows to the backend (opens - closes - GC expiries; least-conn uses it)",
            MetricType::Gauge,
            per_backend().map(|(s, b)| {
                (
                    backend_label(s, b),
                    ConstGauge::new(b.active.min(i64::MAX as u64) as i64),
                )
            }),
        )?;
        family(
            &mut enc,
            "rpclb_backend_weight",
            "Configured weight of the backend (0 = drained)",
            MetricType::Gauge,
            per_backend().map(|(s, b)| (backend_label(s, b), ConstGauge::new(b.weight as i64))),
        )?;
        family(
            &mut enc,
            "rpclb_backend_terminating",
            "1 if the backend is terminating (no new flows)",
            MetricType::Gauge,
            per_backend().map(|(s, b)| {
                (
                    backend_label(s, b),
                    ConstGauge::new((b.state != "active") as i64),
                )
            }),
        )?;
        family(
            &mut enc,
            "rpclb_datapath_events",
            "Packets by data-path verdict reason (kind: pass, drop, tx, fwd, nat, ct, selector)",
            MetricType::Counter,
            snap.reasons.iter().map(|&(r, n)| {
                (
                    vec![
                        ("reason", r.to_string()),
                        ("kind", reason_kind(r).to_string()),
                    ],
                    ConstCounter::new(n),
                )
            }),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    struct Fake(Result<DatapathSnapshot, String>);

    impl StatsSource for Fake {
        fn snapshot(&self) -> Result<DatapathSnapshot, String> {
            self.0.clone()
        }
    }

    fn backend(last: u8, new_flows: u64, active: u64) -> BackendStats {
        BackendStats {
            id: 7,
            ip: Ipv4Addr::new(10, 244, 0, last).into(),
            port: 8080,
            weight: 1,
            state: "active",
            packets: 10 * new_flows,
            bytes: 600 * new_flows,
            new_flows,
            active,
            limit: None,
            grpc: None,
        }
    }

    fn snapshot() -> DatapathSnapshot {
        DatapathSnapshot {
            services: vec![ServiceSnapshot {
                name: "lab/web:http".into(),
                stats: ServiceStats {
                    packets: 50,
                    bytes: 3000,
                    new_flows: 5,
                    drops: 1,
                },
                backends: vec![backend(2, 3, 1), backend(3, 2, 0)],
                grpc_calls: None,
                grpc_tls: None,
            }],
            reasons: vec![("nat_forward", 25), ("drop_no_backend", 1)],
        }
    }

    #[test]
    fn kernel_counters_carry_names_not_ids() {
        let m = Metrics::new(Box::new(Fake(Ok(snapshot()))));
        let out = m.render().unwrap();
        for line in [
            "# TYPE rpclb_service_new_flows_total counter",
            "rpclb_service_new_flows_total{service=\"lab/web:http\"} 5",
            "rpclb_service_packets_total{service=\"lab/web:http\"} 50",
            "rpclb_service_bytes_total{service=\"lab/web:http\"} 3000",
            "rpclb_service_drops_total{service=\"lab/web:http\"} 1",
            "rpclb_service_active_flows{service=\"lab/web:http\"} 1",
            "rpclb_backend_new_flows_total{service=\"lab/web:http\",backend=\"10.244.0.2:8080\"} 3",
            "rpclb_backend_new_flows_total{service=\"lab/web:http\",backend=\"10.244.0.3:8080\"} 2",
            "rpclb_backend_active_flows{service=\"lab/web:http\",backend=\"10.244.0.2:8080\"} 1",
            "rpclb_backend_packets_total{service=\"lab/web:http\",backend=\"10.244.0.3:8080\"} 20",
            "rpclb_datapath_events_total{reason=\"nat_forward\",kind=\"nat\"} 25",
            "rpclb_datapath_events_total{reason=\"drop_no_backend\",kind=\"drop\"} 1",
            "rpclb_services 1",
            "rpclb_ready 0",
            "rpclb_config_reloads_total 0",
            "rpclb_config_reload_errors_total 0",
            "rpclb_scrape_errors_total 0",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        assert!(!out.contains("id=\""), "no raw ids:\n{out}");
    }

    #[test]
    fn selector_failures_per_service() {
        use crate::datapath::selector::SelectorStatus;
        let sel: crate::engines::SharedSelectors = Default::default();
        let m = Metrics::with_collectors(
            Box::new(Fake(Ok(snapshot()))),
            vec![selector_collector(sel.clone())],
        );
        let out = m.render().unwrap();
        assert!(
            !out.contains("rpclb_service_selector_failed{"),
            "no series without selectors:\n{out}"
        );
        *sel.lock().unwrap() = vec![
            SelectorStatus {
                service: "lab/geo:http".into(),
                selector: "example:geo".into(),
                state: SelectorStatus::LOADED.into(),
            },
            SelectorStatus {
                service: "lab/web:http".into(),
                selector: "nosuch".into(),
                state: "selector nosuch: cannot read /var/lib/rpclb/selectors/nosuch.o: No such file or directory (os error 2)".into(),
            },
        ];
        let out = m.render().unwrap();
        for line in [
            "# TYPE rpclb_service_selector_failed gauge",
            "rpclb_service_selector_failed{service=\"lab/geo:http\",selector=\"example:geo\"} 0",
            "rpclb_service_selector_failed{service=\"lab/web:http\",selector=\"nosuch\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn grpc_tls_handshakes_and_reloads() {
        let mut snap = snapshot();
        let out = Metrics::new(Box::new(Fake(Ok(snap.clone()))))
            .render()
            .unwrap();
        assert!(
            !out.contains("rpclb_service_grpc_tls_handshakes_total{"),
            "{out}"
        );
        snap.services[0].grpc_tls = Some(GrpcTlsCounts {
            handshakes: 5,
            handshake_failures: 2,
            reloads: 1,
            reload_errors: 3,
        });
        let out = Metrics::new(Box::new(Fake(Ok(snap)))).render().unwrap();
        let svc = "service=\"lab/web:http\"";
        for line in [
            "# TYPE rpclb_service_grpc_tls_handshakes_total counter".to_string(),
            format!("rpclb_service_grpc_tls_handshakes_total{{{svc},result=\"ok\"}} 5"),
            format!("rpclb_service_grpc_tls_handshakes_total{{{svc},result=\"failed\"}} 2"),
            format!("rpclb_service_grpc_tls_reloads_total{{{svc},result=\"ok\"}} 1"),
            format!("rpclb_service_grpc_tls_reloads_total{{{svc},result=\"failed\"}} 3"),
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn grpc_calls_by_code_and_latency_histograms() {
        let mut calls = CallStats::default();
        calls.codes[0] = 7;
        calls.codes[14] = 2;
        calls.codes[17] = 1;
        calls.latency[0] = 6; // <= 0.5 ms
        calls.latency[3] = 3; // <= 5 ms
        calls.latency[14] = 1; // +Inf
        calls.latency_sum_us = 12_500_000;
        let mut snap = snapshot();
        snap.services[0].grpc_calls = Some(calls);
        snap.services[0].backends[0].grpc = Some(GrpcBackendCounts {
            calls,
            ejected: true,
            ejections: 3,
            ..GrpcBackendCounts::default()
        });
        let out = Metrics::new(Box::new(Fake(Ok(snap)))).render().unwrap();
        let svc = "service=\"lab/web:http\"";
        let be = "service=\"lab/web:http\",backend=\"10.244.0.2:8080\"";
        for line in [
            "# TYPE rpclb_service_grpc_calls_total counter".to_string(),
            format!("rpclb_service_grpc_calls_total{{{svc},code=\"OK\"}} 7"),
            format!("rpclb_service_grpc_calls_total{{{svc},code=\"UNAVAILABLE\"}} 2"),
            format!("rpclb_service_grpc_calls_total{{{svc},code=\"OTHER\"}} 1"),
            "# TYPE rpclb_service_grpc_call_duration_seconds histogram".to_string(),
            format!("rpclb_service_grpc_call_duration_seconds_count{{{svc}}} 10"),
            format!("rpclb_service_grpc_call_duration_seconds_sum{{{svc}}} 12.5"),
            format!("rpclb_service_grpc_call_duration_seconds_bucket{{{svc},le=\"0.0005\"}} 6"),
            format!("rpclb_service_grpc_call_duration_seconds_bucket{{{svc},le=\"0.0025\"}} 6"),
            format!("rpclb_service_grpc_call_duration_seconds_bucket{{{svc},le=\"0.005\"}} 9"),
            format!("rpclb_service_grpc_call_duration_seconds_bucket{{{svc},le=\"10\"}} 9"),
            format!("rpclb_service_grpc_call_duration_seconds_bucket{{{svc},le=\"+Inf\"}} 10"),
            format!("rpclb_backend_grpc_calls_total{{{be},code=\"UNAVAILABLE\"}} 2"),
            format!("rpclb_backend_grpc_call_duration_seconds_count{{{be}}} 10"),
            format!("rpclb_backend_grpc_ejected{{{be}}} 1"),
            format!("rpclb_backend_grpc_ejections_total{{{be}}} 3"),
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        // Only codes with calls: no zero series.
        assert!(!out.contains("code=\"CANCELLED\""), "{out}");
        // The L4 backend (no gRPC counts) has no gRPC series.
        assert!(!out.contains(
            "rpclb_backend_grpc_ejected{service=\"lab/web:http\",backend=\"10.244.0.3:8080\"}"
        ));
    }

    #[test]
    fn agent_metrics_and_gc() {
        let m = Metrics::new(Box::new(Fake(Ok(DatapathSnapshot::default()))));
        m.config_reloads.inc();
        m.config_reload_errors.inc();
        m.set_ready(true);
        m.record_gc(&GcSample {
            duration: Duration::from_millis(3),
            entries: Some(42),
            flows: Some(21),
            expired: vec![("established".into(), 2), ("udp".into(), 5)],
            orphans: 1,
        });
        m.record_gc(&GcSample {
            duration: Duration::from_millis(1),
            entries: Some(40),
            flows: Some(20),
            expired: vec![("udp".into(), 1)],
            orphans: 0,
        });
        let out = m.render().unwrap();
        for line in [
            "rpclb_config_reloads_total 1",
            "rpclb_config_reload_errors_total 1",
            "rpclb_ready 1",
            "rpclb_gc_expired_total{state=\"established\"} 2",
            "rpclb_gc_expired_total{state=\"udp\"} 6",
            "rpclb_gc_orphans_total 1",
            "rpclb_gc_duration_seconds_count 2",
            "rpclb_conntrack_entries 40",
            "rpclb_conntrack_flows 20",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn failed_map_read_counts_and_keeps_agent_metrics() {
        let m = Metrics::new(Box::new(Fake(Err("boom".into()))));
        let out = m.render().unwrap();
        assert!(out.contains("rpclb_scrape_errors_total 1"), "{out}");
        assert!(out.contains("rpclb_config_reloads_total 0"), "{out}");
        assert!(!out.contains("rpclb_service_packets_total"), "{out}");
    }
}
