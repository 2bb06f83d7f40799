//! The controller's `/metrics` (Prometheus text), `/healthz` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use lb_api::tls::ServerConfig;
use lb_api::tls::reload::{Loaded, ReloadStats};
use tokio::sync::watch;

use crate::grpc::{Agents, Publisher, RefusalReason, StreamRefusals};

/// Counters the run loop bumps; the rest is read at scrape time.
#[derive(Debug, Default)]
pub struct Counters {
    pub config_reloads: AtomicU64,
    pub config_errors: AtomicU64,
    /// Published at least once (standalone) / leading with a synced cache (kube).
    pub ready: AtomicBool,
}

/// What the handlers read.
#[derive(Debug)]
pub struct HttpState {
    pub publisher: Arc<Publisher>,
    pub agents: Arc<Agents>,
    pub counters: Arc<Counters>,
    pub refusals: Arc<StreamRefusals>,
    /// The stream's TLS; `None` with `--insecure`.
    pub tls: Option<TlsMetrics>,
}

/// What the metrics show of the stream's TLS files.
#[derive(Debug)]
pub struct TlsMetrics {
    pub stats: Arc<ReloadStats>,
    pub current: watch::Receiver<Arc<Loaded<ServerConfig>>>,
}

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders every metric.
pub fn render(s: &HttpState) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    let cur = s.publisher.current();
    let g = |v: u64| {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    r.register(
        "rpclb_controller_published_version",
        "The version of the state last published to agents",
        g(cur.version),
    );
    r.register(
        "rpclb_controller_services",
        "Services in the published default node state",
        g(cur.default.state.services.len() as u64),
    );
    let c = &s.counters;
    let counter = |v: u64| {
        let x: prometheus_client::metrics::counter::Counter = Default::default();
        x.inc_by(v);
        x
    };
    r.register(
        "rpclb_controller_config_reloads",
        "Desired-state updates read from the source",
        counter(c.config_reloads.load(Ordering::Relaxed)),
    );
    r.register(
        "rpclb_controller_config_errors",
        "Source updates refused (the last good state stays published)",
        counter(c.config_errors.load(Ordering::Relaxed)),
    );
    let refusals: Family<Vec<(String, String)>, prometheus_client::metrics::counter::Counter> =
        Family::default();
    for r in RefusalReason::ALL {
        refusals
            .get_or_create(&vec![("reason".to_string(), r.label().to_string())])
            .inc_by(s.refusals.get(r));
    }
    r.register(
        "rpclb_controller_stream_refusals",
        "Agent connections and streams refused, by reason (tls_handshake, no_identity, \
         node_mismatch, invalid_node_name, no_hello, too_many_streams)",
        refusals,
    );
    r.register(
        "rpclb_controller_insecure",
        "1 when the agent stream is plaintext (--insecure), 0 with mutual TLS",
        g(u64::from(s.tls.is_none())),
    );
    if let Some(t) = &s.tls {
        r.register(
            "rpclb_controller_tls_reloads",
            "New TLS certificate files taken into use",
            counter(t.stats.reloads.load(Ordering::Relaxed)),
        );
        r.register(
            "rpclb_controller_tls_reload_errors",
            "TLS file changes that were not usable (the last good files stay in use)",
            counter(t.stats.errors.load(Ordering::Relaxed)),
        );
        r.register(
            "rpclb_controller_tls_cert_expiry_timestamp_seconds",
            "When the controller's serving certificate expires (Unix time)",
            g(t.current.borrow().leaf.not_after_unix()),
        );
    }
    let agents = s.agents.snapshot();
    r.register(
        "rpclb_controller_agents_connected",
        "Agents with an open stream",
        g(agents.values().filter(|a| a.connected).count() as u64),
    );
    let acked: Family<Vec<(String, String)>, Gauge> = Family::default();
    let failing: Family<Vec<(String, String)>, Gauge> = Family::default();
    let streams: Family<Vec<(String, String)>, Gauge> = Family::default();
    let refused: Family<Vec<(String, String)>, Gauge> = Family::default();
    for (node, a) in &agents {
        let l = vec![("node".to_string(), node.clone())];
        acked
            .get_or_create(&l)
            .set(i64::try_from(a.acked).unwrap_or(i64::MAX));
        failing.get_or_create(&l).set(i64::from(a.error.is_some()));
        refused
            .get_or_create(&l)
            .set(i64::try_from(a.refused.len()).unwrap_or(i64::MAX));
        streams
            .get_or_create(&l)
            .set(i64::try_from(a.streams).unwrap_or(i64::MAX));
    }
    r.register(
        "rpclb_controller_agent_acked_version",
        "The last version each node's agent acked as applied",
        acked,
    );
    r.register(
        "rpclb_controller_agent_apply_failing",
        "1 when the node's last ack reported an apply error",
        failing,
    );
    r.register(
        "rpclb_controller_agent_refused_services",
        "Services the node's agent refused in its last ack (each alone; it applied the rest); the controller's log says which and why",
        refused,
    );
    r.register(
        "rpclb_controller_agent_streams",
        "Streams each node's agent has opened",
        streams,
    );
    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<Arc<HttpState>>) -> Response {
    match render(&s) {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn readyz(State(s): State<Arc<HttpState>>) -> (StatusCode, &'static str) {
    if s.counters.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
