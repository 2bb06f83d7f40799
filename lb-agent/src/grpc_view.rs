//! The gRPC mode per service and backend, as the agent's `/grpc` endpoint
//! serves it (JSON) and `lbctl grpc` shows it: calls in flight, calls and
//! errors by status, health, outlier ejection, retries and GOAWAYs.
//!
//! Counts are totals since the service started; rates are not kept by the
//! agent: `lbctl grpc` reads `/grpc` twice and divides the difference by
//! the time between (the `rate` fields, absent from the agent's answer).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use lb_api::{OutlierDetection, ServiceAddr};
use serde::{Deserialize, Serialize};

use crate::health::BackendHealth;
use crate::userspace::{CODE_SLOTS, CallStats, ServiceStats};

/// Every gRPC-mode service the agent serves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpcView {
    pub services: Vec<GrpcService>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrpcService {
    /// `namespace/name:port`.
    pub name: String,
    /// `VIP:port/tcp`.
    pub addr: String,
    /// Calls ended, by the final status the client got.
    pub calls: u64,
    /// Calls in flight.
    pub active: u64,
    /// Calls that ended with a status other than OK.
    pub errors: u64,
    /// Calls by status name (only those with calls).
    pub codes: BTreeMap<String, u64>,
    /// Calls ended per second (`lbctl grpc`: between its two reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// The service's outlier detection, if on.
    pub outlier_detection: Option<OutlierDetection>,
    pub backends: Vec<GrpcBackend>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrpcBackend {
    /// `ip:port`.
    pub backend: String,
    /// The weight applied (0: drained, or out for failing its health check).
    pub weight: u32,
    /// `active`, `draining` or `removed` (still has calls).
    pub status: String,
    /// `healthy`, `unhealthy` (out of selection) or `unchecked`.
    pub health: String,
    /// Calls picked for it and not finished.
    pub outstanding: u64,
    /// Its QoS limit of `outstanding` (docs/policies.md), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Attempts sent to it and ended.
    pub calls: u64,
    /// Of those, the ones not answered OK (reset, refused, UNAVAILABLE, ...).
    pub errors: u64,
    /// Attempts by status name (only those with attempts).
    pub codes: BTreeMap<String, u64>,
    /// Attempts ended per second (`lbctl grpc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Milliseconds of outlier ejection left; 0: in the pick.
    pub ejected_for_ms: u64,
    /// Times outlier detection ejected it.
    pub ejections: u64,
    /// Its failures in a row now.
    pub consecutive_failures: u32,
    /// Calls retried (retry policy) after it answered a retryable status.
    pub retries: u64,
    /// Its retryable answers not retried because of the retry throttle.
    pub retries_throttled: u64,
    /// Calls it did not process, sent again (transparent retries).
    pub transparent_retries: u64,
    /// Its connections that got a GOAWAY.
    pub goaways: u64,
    /// HTTP/2 connections opened to it.
    pub connections: u64,
    /// The utilization of its last ORCA load report, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orca_utilization: Option<f64>,
    /// With `balancing: orca_wrr`: the weight its load reports give it now
    /// (none: no report yet, in blackout or expired; the pick is then P2C
    /// or the mean weight, see docs/grpc.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orca_weight: Option<f64>,
}

fn codes(c: &CallStats) -> BTreeMap<String, u64> {
    (0..CODE_SLOTS)
        .filter(|&i| c.codes[i] > 0)
        .map(|i| (CallStats::code_label(i).to_string(), c.codes[i]))
        .collect()
}

/// The view of the gRPC services in `stats`, with the health checks' state.
pub fn build(stats: &[ServiceStats], health: &[BackendHealth]) -> GrpcView {
    let checked: HashMap<(ServiceAddr, SocketAddr), bool> = health
        .iter()
        .map(|h| ((h.addr, h.backend), h.healthy))
        .collect();
    let services = stats
        .iter()
        .filter(|s| s.grpc)
        .map(|s| GrpcService {
            name: s.name.clone(),
            addr: s.addr.to_string(),
            calls: s.calls.total(),
            active: s.active_requests,
            errors: s.calls.errors(),
            codes: codes(&s.calls),
            rate: None,
            outlier_detection: s.outlier_detection,
            backends: s
                .backends
                .iter()
                .map(|b| GrpcBackend {
                    backend: SocketAddr::new(b.ip, b.port).to_string(),
                    weight: b.weight,
                    status: b.status.as_str().to_string(),
                    health: match checked.get(&(s.addr, SocketAddr::new(b.ip, b.port))) {
                        Some(true) => "healthy",
                        Some(false) => "unhealthy",
                        None => "unchecked",
                    }
                    .to_string(),
                    outstanding: b.active_requests,
                    limit: b.limit,
                    calls: b.calls.total(),
                    errors: b.calls.errors(),
                    codes: codes(&b.calls),
                    rate: None,
                    ejected_for_ms: b.ejected_for_ms,
                    ejections: b.ejections,
                    consecutive_failures: b.consecutive_failures,
                    retries: b.retries,
                    retries_throttled: b.retries_throttled,
                    transparent_retries: b.transparent_retries,
                    goaways: b.goaways,
                    connections: b.new_connections,
                    orca_utilization: b.orca_utilization,
                    orca_weight: b.orca_weight,
                })
                .collect(),
        })
        .collect();
    GrpcView { services }
}

impl GrpcView {
    /// Fills in the rates from an earlier read `secs` seconds before.
    pub fn set_rates(&mut self, before: &GrpcView, secs: f64) {
        if secs <= 0.0 {
            return;
        }
        let per_s = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        for s in &mut self.services {
            let Some(p) = before.services.iter().find(|p| p.name == s.name) else {
                continue;
            };
            s.rate = Some(per_s(s.calls, p.calls));
            for b in &mut s.backends {
                if let Some(pb) = p.backends.iter().find(|pb| pb.backend == b.backend) {
                    b.rate = Some(per_s(b.calls, pb.calls));
                }
            }
        }
    }
}
