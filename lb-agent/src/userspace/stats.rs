//! The proxy's counters: atomics updated on the data path, and the plain
//! snapshots [`super::UserspaceProxy::stats`] returns.
//!
//! Direction: `in` is client -> backend, `out` is backend -> client. A packet
//! is a datagram for UDP, one successful `read` for TCP, and one HTTP/2 DATA
//! frame of a call's body for gRPC (headers are not counted).
//!
//! gRPC (L7) services count connections too: client connections at the
//! service level, pooled HTTP/2 connections at the backend level; their calls
//! are in `requests` and `active_requests`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use lb_api::{Algorithm, OutlierDetection, ServiceAddr};
use serde::{Deserialize, Serialize};

use super::grpc::outlier::BackendOutlier;

/// Upper bounds (seconds) of the gRPC call latency buckets; one more
/// bucket (+Inf) follows. 0.5 ms to 10 s: a proxied unary call on a LAN
/// takes ~0.2-1 ms, a slow backend or a stream seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Status code slots: the codes 0..=16, then one for any other.
pub const CODE_SLOTS: usize = 18;
const BUCKETS: usize = LATENCY_BUCKETS.len() + 1;

/// gRPC calls (or attempts) by status code and latency.
#[derive(Debug, Default)]
pub(crate) struct CallCounters {
    codes: [AtomicU64; CODE_SLOTS],
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl CallCounters {
    /// One call that ended with `code` after `took`.
    pub(crate) fn record(&self, code: u32, took: Duration) {
        let slot = (code as usize).min(CODE_SLOTS - 1);
        self.codes[slot].fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        let b = LATENCY_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(BUCKETS - 1);
        self.buckets[b].fetch_add(1, Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn read(&self) -> CallStats {
        CallStats {
            codes: std::array::from_fn(|i| self.codes[i].load(Relaxed)),
            latency: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            latency_sum_us: self.sum_us.load(Relaxed),
        }
    }
}

/// gRPC calls by status and latency at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallStats {
    /// By status: index = code (0 OK .. 16 UNAUTHENTICATED), 17 = any other.
    pub codes: [u64; CODE_SLOTS],
    /// By latency: index i counts those above bucket i-1 and at most
    /// [`LATENCY_BUCKETS`]`[i]`; the last, those above 10 s.
    pub latency: [u64; BUCKETS],
    /// Sum of the latencies, microseconds.
    pub latency_sum_us: u64,
}

impl CallStats {
    /// Every call counted.
    pub fn total(&self) -> u64 {
        self.codes.iter().sum()
    }

    /// Calls that ended with a status other than OK.
    pub fn errors(&self) -> u64 {
        self.total() - self.codes[0]
    }

    /// Calls that ended with `code` (17 and above: the "other" slot).
    pub fn code(&self, code: u32) -> u64 {
        self.codes[(code as usize).min(CODE_SLOTS - 1)]
    }

    /// The label of slot `i`: the status name, or `OTHER`.
    pub fn code_label(i: usize) -> &'static str {
        lb_api::GRPC_STATUS_NAMES.get(i).copied().unwrap_or("OTHER")
    }
}

/// Why a new flow or a datagram was dropped; for a gRPC service, why a call
/// was answered UNAVAILABLE without reaching a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The service had no backend that takes new flows.
    NoBackend,
    /// The last connect attempt to a backend timed out.
    ConnectTimeout,
    /// The last connect attempt to a backend failed (refused, unreachable).
    ConnectFailed,
    /// UDP: the service's session table was full.
    SessionsFull,
    /// UDP: a datagram could not be passed on (socket buffer full or error).
    SendFailed,
    /// TCP: `accept` failed (e.g. out of file descriptors).
    AcceptFailed,
    /// Every backend was at its QoS limit (connections in the L4 mode,
    /// outstanding calls in the gRPC mode; docs/policies.md).
    BackendsFull,
}

impl DropReason {
    pub const COUNT: usize = 7;
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::NoBackend,
        DropReason::ConnectTimeout,
        DropReason::ConnectFailed,
        DropReason::SessionsFull,
        DropReason::SendFailed,
        DropReason::AcceptFailed,
        DropReason::BackendsFull,
    ];

    /// The reason's name, in the kernel's `<kind>_<what>` style
    /// (`lb_common::reason::NAMES`): `drop_no_backend` is the same event there.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoBackend => "drop_no_backend",
            DropReason::ConnectTimeout => "drop_connect_timeout",
            DropReason::ConnectFailed => "drop_connect_failed",
            DropReason::SessionsFull => "drop_sessions_full",
            DropReason::SendFailed => "drop_send_failed",
            DropReason::AcceptFailed => "drop_accept_failed",
            DropReason::BackendsFull => "drop_backends_full",
        }
    }
}

/// Bytes and packets in both directions.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    packets_in: AtomicU64,
    packets_out: AtomicU64,
}

impl Traffic {
    pub(crate) fn add_in(&self, bytes: usize) {
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
        self.packets_in.fetch_add(1, Relaxed);
    }
    pub(crate) fn add_out(&self, bytes: usize) {
        self.bytes_out.fetch_add(bytes as u64, Relaxed);
        self.packets_out.fetch_add(1, Relaxed);
    }
    fn read(&self) -> [u64; 4] {
        [
            self.bytes_in.load(Relaxed),
            self.bytes_out.load(Relaxed),
            self.packets_in.load(Relaxed),
            self.packets_out.load(Relaxed),
        ]
    }
}

/// One backend's counters. They live as long as the backend is in the
/// service or still has open connections or calls.
#[derive(Debug, Default)]
pub(crate) struct BackendCounters {
    /// Connections established / UDP sessions opened.
    pub(crate) new: AtomicU64,
    /// Open connections and sessions, including connects in progress.
    pub(crate) active: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    /// gRPC calls handed to this backend.
    pub(crate) requests: AtomicU64,
    /// gRPC calls picked for this backend and not finished (least outstanding
    /// requests reads it).
    pub(crate) active_requests: AtomicU64,
    /// gRPC: pooled connections that received a GOAWAY.
    pub(crate) goaways: AtomicU64,
    /// gRPC: calls sent again (to any backend) after this one did not
    /// process them (REFUSED_STREAM, above a GOAWAY's last stream).
    pub(crate) transparent_retries: AtomicU64,
    /// gRPC: calls retried (retry policy) after this backend answered a
    /// retryable status.
    pub(crate) retries: AtomicU64,
    /// gRPC: of such answers, those not retried because the service's
    /// retry throttle was low.
    pub(crate) retries_throttled: AtomicU64,
    /// gRPC: attempts sent to it, by the status it answered (a reset or
    /// refused stream or a broken connection: UNAVAILABLE) and latency.
    pub(crate) calls: CallCounters,
    /// gRPC: passive outlier ejection.
    pub(crate) outlier: BackendOutlier,
    pub(crate) traffic: Traffic,
}

impl BackendCounters {
    /// Whether connections or calls still use the backend.
    pub(crate) fn in_use(&self) -> bool {
        self.active.load(Relaxed) > 0 || self.active_requests.load(Relaxed) > 0
    }
}

/// One service's counters.
#[derive(Debug, Default)]
pub(crate) struct ServiceCounters {
    /// Flows handed to a backend (TCP connected upstream, UDP session opened).
    pub(crate) new: AtomicU64,
    /// Of those, the ones still open.
    pub(crate) active: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) idle_timeouts: AtomicU64,
    /// gRPC calls received (valid ones: HTTP/2, POST, gRPC content type).
    pub(crate) requests: AtomicU64,
    /// Of those, the ones not finished.
    pub(crate) active_requests: AtomicU64,
    /// gRPC calls the proxy ended with DEADLINE_EXCEEDED.
    pub(crate) deadline_exceeded: AtomicU64,
    /// Requests refused as not gRPC (HTTP/1, wrong method or content type,
    /// malformed `grpc-timeout`).
    pub(crate) bad_requests: AtomicU64,
    /// gRPC calls by the final status the client got, and latency (from
    /// the request to the end of the response).
    pub(crate) calls: CallCounters,
    /// gRPC with `grpc.tls.listen`: client connections whose TLS handshake
    /// succeeded, and those whose handshake failed or timed out.
    pub(crate) tls_handshakes: AtomicU64,
    pub(crate) tls_handshake_failed: AtomicU64,
    pub(crate) traffic: Traffic,
    drops: [AtomicU64; DropReason::COUNT],
}

impl ServiceCounters {
    pub(crate) fn dropped(&self, r: DropReason) {
        self.drops[r as usize].fetch_add(1, Relaxed);
    }

    /// A connect to `backend` failed: counted on both.
    pub(crate) fn connect_failed(&self, backend: &BackendCounters) {
        backend.connect_failures.fetch_add(1, Relaxed);
        self.connect_failures.fetch_add(1, Relaxed);
    }
}

/// How a backend in [`BackendStats`] stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendStatus {
    Active,
    /// Terminating or weight 0: no new flows.
    Draining,
    /// No longer in the service, listed while it still has open connections.
    Removed,
}

impl BackendStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendStatus::Active => "active",
            BackendStatus::Draining => "draining",
            BackendStatus::Removed => "removed",
        }
    }
}

/// One backend's counters at one instant.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendStats {
    pub ip: IpAddr,
    pub port: u16,
    /// 0 for a removed backend.
    pub weight: u32,
    pub status: BackendStatus,
    /// TCP connections established to it / UDP sessions opened to it.
    pub new_connections: u64,
    /// Open connections and sessions, connects in progress included; exact.
    pub active_connections: u64,
    /// Its QoS limit: of `active_connections` (L4) or `active_requests`
    /// (gRPC mode). `None`: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    /// Failed connect attempts (timeouts included).
    pub connect_failures: u64,
    /// gRPC: calls handed to it (0 for L4 services).
    pub requests: u64,
    /// gRPC: calls picked for it and not finished; exact.
    pub active_requests: u64,
    /// gRPC: its pooled connections that received a GOAWAY.
    pub goaways: u64,
    /// gRPC: calls it did not process, sent again (gRFC A6 transparent retry).
    pub transparent_retries: u64,
    /// gRPC: calls retried (retry policy) after it answered a retryable status.
    pub retries: u64,
    /// gRPC: retryable answers of it not retried because of the throttle.
    pub retries_throttled: u64,
    /// gRPC: attempts sent to it, by status and latency.
    pub calls: CallStats,
    /// gRPC: milliseconds of outlier ejection left (0: in the pick).
    pub ejected_for_ms: u64,
    /// gRPC: times it was ejected.
    pub ejections: u64,
    /// gRPC: its failures in a row now (outlier detection).
    pub consecutive_failures: u32,
    /// gRPC: the utilization of its last ORCA load report (gRFC A51), if
    /// it sent one.
    pub orca_utilization: Option<f64>,
    /// gRPC with `balancing: orca_wrr`: the weight its reports give it now
    /// (gRFC A58; none: no report, in blackout or expired).
    pub orca_weight: Option<f64>,
}

/// One service's counters at one instant, with its backends'.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceStats {
    /// `namespace/name:port`.
    pub name: String,
    pub addr: ServiceAddr,
    pub algorithm: Algorithm,
    /// Served in the gRPC (L7) mode: calls are balanced, not connections.
    pub grpc: bool,
    /// Flows handed to a backend (TCP: connected upstream; UDP: new session;
    /// gRPC: client connections accepted).
    pub new_connections: u64,
    /// Of those, the ones open now; exact.
    pub active_connections: u64,
    /// Client -> backend.
    pub bytes_in: u64,
    /// Backend -> client.
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    /// Failed connect attempts over all backends (a retried flow counts each).
    pub connect_failures: u64,
    /// TCP connections closed and UDP sessions expired by the idle timeout.
    pub idle_timeouts: u64,
    /// gRPC: calls received.
    pub requests: u64,
    /// gRPC: calls not finished; exact.
    pub active_requests: u64,
    /// gRPC: calls the proxy ended with DEADLINE_EXCEEDED.
    pub deadline_exceeded: u64,
    /// gRPC: requests refused as not gRPC over HTTP/2.
    pub bad_requests: u64,
    /// gRPC: calls by the final status the client got, and latency.
    pub calls: CallStats,
    /// gRPC: the service's outlier detection, if on.
    pub outlier_detection: Option<OutlierDetection>,
    /// gRPC: whether the service has TLS (`grpc.tls`, listener or upstream).
    pub tls: bool,
    /// gRPC with TLS: client TLS handshakes that succeeded, and that failed
    /// or timed out.
    pub tls_handshakes: u64,
    pub tls_handshake_failures: u64,
    /// gRPC with TLS: changed certificate files taken, and changed sets
    /// refused (the last good one stayed).
    pub tls_reloads: u64,
    pub tls_reload_errors: u64,
    /// Every reason, zeros included, in [`DropReason::ALL`] order.
    pub drops: Vec<(DropReason, u64)>,
    /// The service's backends in its order, then removed ones still in use.
    pub backends: Vec<BackendStats>,
}

impl ServiceStats {
    pub fn drops_for(&self, r: DropReason) -> u64 {
        self.drops
            .iter()
            .find(|(x, _)| *x == r)
            .map_or(0, |(_, n)| *n)
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|(_, n)| n).sum()
    }

    /// The backend at `ip:port`, if listed.
    pub fn backend(&self, ip: impl Into<IpAddr>, port: u16) -> Option<&BackendStats> {
        let ip = ip.into();
        self.backends.iter().find(|b| b.ip == ip && b.port == port)
    }
}

pub(crate) fn backend_stats(
    ip: IpAddr,
    port: u16,
    weight: u32,
    status: BackendStatus,
    limit: Option<u32>,
    c: &BackendCounters,
) -> BackendStats {
    let [bytes_in, bytes_out, packets_in, packets_out] = c.traffic.read();
    BackendStats {
        ip,
        port,
        weight,
        status,
        new_connections: c.new.load(Relaxed),
        active_connections: c.active.load(Relaxed),
        limit,
        bytes_in,
        bytes_out,
        packets_in,
        packets_out,
        connect_failures: c.connect_failures.load(Relaxed),
        requests: c.requests.load(Relaxed),
        active_requests: c.active_requests.load(Relaxed),
        goaways: c.goaways.load(Relaxed),
        transparent_retries: c.transparent_retries.load(Relaxed),
        retries: c.retries.load(Relaxed),
        retries_throttled: c.retries_throttled.load(Relaxed),
        calls: c.calls.read(),
        ejected_for_ms: c.outlier.ejected_for_ms(),
        ejections: c.outlier.ejections(),
        consecutive_failures: c.outlier.consecutive_failures(),
        orca_utilization: None,
        orca_weight: None,
    }
}

pub(crate) fn service_stats(
    name: &str,
    addr: ServiceAddr,
    algorithm: Algorithm,
    grpc: Option<&lb_api::GrpcPolicy>,
    c: &ServiceCounters,
    backends: Vec<BackendStats>,
) -> ServiceStats {
    let [bytes_in, bytes_out, packets_in, packets_out] = c.traffic.read();
    ServiceStats {
        name: name.to_string(),
        addr,
        algorithm,
        grpc: grpc.is_some(),
        new_connections: c.new.load(Relaxed),
        active_connections: c.active.load(Relaxed),
        bytes_in,
        bytes_out,
        packets_in,
        packets_out,
        connect_failures: c.connect_failures.load(Relaxed),
        idle_timeouts: c.idle_timeouts.load(Relaxed),
        requests: c.requests.load(Relaxed),
        active_requests: c.active_requests.load(Relaxed),
        deadline_exceeded: c.deadline_exceeded.load(Relaxed),
        bad_requests: c.bad_requests.load(Relaxed),
        calls: c.calls.read(),
        outlier_detection: grpc.and_then(|g| g.outlier_detection),
        tls: grpc.is_some_and(|g| g.tls.is_some()),
        tls_handshakes: c.tls_handshakes.load(Relaxed),
        tls_handshake_failures: c.tls_handshake_failed.load(Relaxed),
        tls_reloads: 0,
        tls_reload_errors: 0,
        drops: DropReason::ALL
            .iter()
            .map(|&r| (r, c.drops[r as usize].load(Relaxed)))
            .collect(),
        backends,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(r.as_str().starts_with("drop_"));
        }
        let c = ServiceCounters::default();
        c.dropped(DropReason::SessionsFull);
        c.dropped(DropReason::SessionsFull);
        c.dropped(DropReason::NoBackend);
        let addr = ServiceAddr {
            vip: Ipv4Addr::new(10, 96, 0, 1).into(),
            port: 53,
            protocol: lb_api::Protocol::Udp,
        };
        let s = service_stats("a", addr, Algorithm::Random, None, &c, vec![]);
        assert_eq!(s.drops_for(DropReason::SessionsFull), 2);
        assert_eq!(s.drops_for(DropReason::NoBackend), 1);
        assert_eq!(s.drops_for(DropReason::SendFailed), 0);
        assert_eq!(s.total_drops(), 3);
        assert_eq!(s.drops.len(), DropReason::COUNT);
    }

    #[test]
    fn calls_count_by_status_and_latency_bucket() {
        let c = CallCounters::default();
        let ms = Duration::from_micros;
        c.record(0, ms(300)); // <= 0.5 ms
        c.record(0, ms(500)); // <= 0.5 ms (bounds are inclusive)
        c.record(14, ms(501)); // <= 1 ms
        c.record(4, Duration::from_secs(3)); // <= 5 s
        c.record(16, Duration::from_secs(11)); // +Inf
        c.record(99, ms(20_000)); // other, <= 25 ms
        let s = c.read();
        assert_eq!(s.total(), 6);
        assert_eq!(s.errors(), 4);
        assert_eq!((s.code(0), s.code(14), s.code(4), s.code(16)), (2, 1, 1, 1));
        assert_eq!((s.code(17), s.code(99), s.codes[17]), (1, 1, 1));
        let mut want = [0u64; 15];
        want[0] = 2;
        want[1] = 1;
        want[5] = 1;
        want[12] = 1;
        want[14] = 1;
        assert_eq!(s.latency, want);
        assert_eq!(
            s.latency_sum_us,
            300 + 500 + 501 + 3_000_000 + 11_000_000 + 20_000
        );
        assert_eq!(CallStats::code_label(14), "UNAVAILABLE");
        assert_eq!(CallStats::code_label(17), "OTHER");
    }
}
