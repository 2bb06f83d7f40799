use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default Maglev table size (prime, > 100 x 163 backends).
pub const DEFAULT_MAGLEV_M: u32 = 16_381;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    Random,
    RoundRobin,
    Maglev,
    SourceHash,
    LeastConn,
}

impl Algorithm {
    pub const ALL: [Algorithm; 5] = [
        Algorithm::Random,
        Algorithm::RoundRobin,
        Algorithm::Maglev,
        Algorithm::SourceHash,
        Algorithm::LeastConn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::RoundRobin => "round-robin",
            Algorithm::Maglev => "maglev",
            Algorithm::SourceHash => "source-hash",
            Algorithm::LeastConn => "least-conn",
        }
    }

    /// Maglev and source-hash select through a Maglev table.
    pub fn uses_maglev_table(self) -> bool {
        matches!(self, Algorithm::Maglev | Algorithm::SourceHash)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown algorithm {0:?} (expected one of: random, round-robin, maglev, source-hash, least-conn)"
)]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAlgorithm(s.to_string()))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Active,
    /// Gets no new flows; keeps its existing ones until they close or time out.
    Terminating,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Terminating => "terminating",
        }
    }
}

/// One backend (pod) of a service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// Of the service's VIP's family (checked by validation).
    pub ip: IpAddr,
    pub port: u16,
    /// Relative weight; 0 drains the backend (no new flows).
    pub weight: u32,
    pub state: BackendState,
    /// The node the backend runs on (EndpointSlice `nodeName`), if known. An
    /// agent started with `--node-name` takes the backends on its own node as
    /// local: [`TrafficPolicy::Local`] uses only those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// This backend's QoS limit, over the service's `max_per_backend`
    /// (docs/policies.md, "QoS limits"); `None`: the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Set by the locality resolution ([`crate::locality::drain_others`])
    /// on a backend it drained (weight 0) when the policy has
    /// [`Locality::spill_outstanding`]: its weight before, for the gRPC
    /// mode's spill-over on outstanding calls. Read by nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_weight: Option<u32>,
}

impl Backend {
    pub fn new(ip: impl Into<IpAddr>, port: u16) -> Self {
        Backend {
            ip: ip.into(),
            port,
            weight: 1,
            state: BackendState::Active,
            node: None,
            max: None,
            spill_weight: None,
        }
    }

    /// Whether new flows may go to this backend.
    pub fn takes_new_flows(&self) -> bool {
        self.weight > 0 && self.state == BackendState::Active
    }
}

/// The identity of a service in the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceAddr {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vip {
            IpAddr::V4(v4) => write!(f, "{v4}:{}/{}", self.port, self.protocol),
            IpAddr::V6(v6) => write!(f, "[{v6}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// Default deadline of a gRPC call without a `grpc-timeout` header (L7 mode).
pub const DEFAULT_GRPC_TIMEOUT: Duration = Duration::from_secs(30);

/// The gRPC (L7) mode of a service: the agent terminates HTTP/2 on the VIP
/// and balances each call over pooled backend connections.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GrpcPolicy {
    /// Deadline of a call that carries no `grpc-timeout`.
    pub default_timeout: Duration,
    /// Headers added to every request (name lowercase), in order.
    pub add_headers: Vec<(String, String)>,
    /// `Some`: calls answered with a retryable status are sent again (gRFC
    /// A6); `None`: no retries beyond the transparent ones.
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
    /// `Some`: passive outlier ejection: a backend that fails
    /// `consecutive_failures` calls in a row gets no calls for a while.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// How each call's backend is chosen (default: P2C least outstanding).
    #[serde(default)]
    pub balancing: Balancing,
    /// `Some`: TLS towards clients, backends or both (files on the node).
    #[serde(default)]
    pub tls: Option<GrpcTls>,
}

/// Passive outlier ejection of a gRPC-mode service (per agent): a backend
/// that fails `consecutive_failures` calls in a row (UNAVAILABLE answers,
/// connect errors, reset or refused streams) is left out of the pick for
/// `base_ejection_time` × the number of times it was ejected (capped at
/// `max_ejection_time`), while no more than `max_ejection_percent` of the
/// service's backends are out at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OutlierDetection {
    /// Failures in a row that eject a backend (1..=1000); a success resets
    /// the count.
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th lasts n times this.
    pub base_ejection_time: Duration,
    /// No ejection lasts longer (it is at least `base_ejection_time`).
    pub max_ejection_time: Duration,
    /// At most this share of the service's backends is ejected at once
    /// (0..=100); at least one may be, and below 100 one always stays.
    pub max_ejection_percent: u32,
}

/// Envoy's and gRPC's (gRFC A50) defaults: 5 failures in a row, 30 s,
/// at most 300 s, at most 10% of the backends (at least one).
pub const DEFAULT_OUTLIER_CONSECUTIVE_FAILURES: u32 = 5;
pub const DEFAULT_OUTLIER_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
pub const DEFAULT_OUTLIER_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
pub const DEFAULT_OUTLIER_MAX_EJECTION_PERCENT: u32 = 10;

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: DEFAULT_OUTLIER_CONSECUTIVE_FAILURES,
            base_ejection_time: DEFAULT_OUTLIER_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_OUTLIER_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_OUTLIER_MAX_EJECTION_PERCENT,
        }
    }
}

/// How a gRPC-mode service picks the backend of each call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Balancing {
    /// Least outstanding calls over two weighted random choices (P2C).
    #[default]
    P2c,
    /// Weighted round-robin from the backends' ORCA load reports (gRFC
    /// A51 per-call `endpoint-load-metrics` trailers, A58 weights); P2C
    /// while fewer than two backends have a usable report.
    OrcaWrr(OrcaWrr),
}

/// The gRFC A58 (`weighted_round_robin`) settings. The penalty is in
/// thousandths so that the model stays `Eq` and `Hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OrcaWrr {
    /// A backend must report for this long before its weight is used (0:
    /// at once); again after its weight expired or it came back.
    pub blackout_period: Duration,
    /// A weight not refreshed by a report for this long is dropped.
    pub weight_expiration_period: Duration,
    /// How often the scheduler is rebuilt from the current weights.
    pub weight_update_period: Duration,
    /// weight = qps / (utilization + eps / qps x penalty), in thousandths.
    pub error_utilization_penalty_milli: u32,
}

impl Default for OrcaWrr {
    /// A58's defaults: 10 s, 3 min, 1 s, 1.0.
    fn default() -> Self {
        OrcaWrr {
            blackout_period: Duration::from_secs(10),
            weight_expiration_period: Duration::from_secs(180),
            weight_update_period: Duration::from_secs(1),
            error_utilization_penalty_milli: 1000,
        }
    }
}

impl Balancing {
    /// The name used in YAML and annotations.
    pub fn name(&self) -> &'static str {
        match self {
            Balancing::P2c => "p2c",
            Balancing::OrcaWrr(_) => "orca_wrr",
        }
    }
}

/// TLS of a gRPC-mode service. Each part is optional: terminate only
/// (`listen`), originate only (`upstream`), or both. Paths are absolute
/// paths of PEM files on the node the agent runs on; the agent follows
/// them and uses a changed, valid set for new connections.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GrpcTls {
    /// `Some`: the service's listener speaks TLS to clients (ALPN `h2`).
    #[serde(default)]
    pub listen: Option<ListenTls>,
    /// `Some`: the proxy speaks TLS to the service's backends (ALPN `h2`).
    #[serde(default)]
    pub upstream: Option<UpstreamTls>,
}

/// The TLS a gRPC service's listener presents to clients.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListenTls {
    /// The certificate chain (leaf first).
    pub cert: String,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// `Some`: clients must present a certificate signed by this CA bundle
    /// (mutual TLS); `None`: no client certificate is asked for.
    #[serde(default)]
    pub client_ca: Option<String>,
}

/// The TLS the proxy speaks to a gRPC service's backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UpstreamTls {
    /// The CA bundle the backends' certificates are verified against.
    pub ca: String,
    /// The name sent (SNI) and verified in each backend's certificate;
    /// `None`: the backend's IP address (an IP SAN).
    #[serde(default)]
    pub server_name: Option<String>,
    /// A client certificate for the backends (with `key`; both or neither).
    #[serde(default)]
    pub cert: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
}

/// A retry policy of a gRPC-mode service (gRFC A6 `retryPolicy`, plus its
/// `retryThrottling`). Ratios are in thousandths (A6 allows three decimals),
/// so that the model stays `Eq` and `Hash`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts of a call, the first included (2..=5).
    pub max_attempts: u32,
    /// The first retry waits a random time in [0, initial_backoff).
    pub initial_backoff: Duration,
    /// No retry waits longer (before the jitter).
    pub max_backoff: Duration,
    /// Each further retry's bound is the previous one times this, in
    /// thousandths (1500 = 1.5).
    pub backoff_multiplier_milli: u32,
    /// gRPC status codes (1..=16) that make a call retryable; sorted, no
    /// duplicates.
    pub retryable_status_codes: Vec<u32>,
    /// `Some`: the service's retries are throttled (token bucket).
    pub throttle: Option<RetryThrottle>,
}

/// gRFC A6 `retryThrottling`, per service and agent: a token bucket that
/// starts full at `max_tokens`; each attempt answered with a retryable
/// status takes one token, each other answer gives `token_ratio`; retries
/// are made only while more than half of `max_tokens` is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RetryThrottle {
    /// 1..=1000.
    pub max_tokens: u32,
    /// Tokens a success gives back, in thousandths (1..=max_tokens x 1000).
    pub token_ratio_milli: u32,
}

impl Default for RetryThrottle {
    /// gRPC's usual example: 10 tokens, 0.1 per success.
    fn default() -> Self {
        RetryThrottle {
            max_tokens: 10,
            token_ratio_milli: 100,
        }
    }
}

/// Defaults of a retry policy's backoff (as gRPC examples use them).
pub const DEFAULT_RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
pub const DEFAULT_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(1);
pub const DEFAULT_RETRY_BACKOFF_MULTIPLIER_MILLI: u32 = 2000;
/// gRFC A6 caps maxAttempts at 5.
pub const MAX_RETRY_ATTEMPTS: u32 = 5;

impl RetryPolicy {
    /// `max_attempts` attempts on UNAVAILABLE, default backoff, no throttle.
    pub fn new(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts,
            initial_backoff: DEFAULT_RETRY_INITIAL_BACKOFF,
            max_backoff: DEFAULT_RETRY_MAX_BACKOFF,
            backoff_multiplier_milli: DEFAULT_RETRY_BACKOFF_MULTIPLIER_MILLI,
            retryable_status_codes: vec![14],
            throttle: None,
        }
    }
}

/// The gRPC status codes by name (index = code).
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status code from its name (`UNAVAILABLE`, any case) or number;
/// OK (0) is not a failure and is refused.
pub fn parse_status_code(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let code = match s.parse::<u32>() {
        Ok(n) => n,
        Err(_) => GRPC_STATUS_NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(s))
            .map(|i| i as u32)
            .ok_or_else(|| {
                format!("unknown gRPC status code {s:?} (expected a name like UNAVAILABLE)")
            })?,
    };
    match code {
        0 => Err("OK is not a retryable status".into()),
        1..=16 => Ok(code),
        _ => Err(format!("gRPC status code {code} is out of range (1-16)")),
    }
}

/// A status code's name (`UNAVAILABLE`), or its number if unknown.
pub fn status_code_name(code: u32) -> String {
    GRPC_STATUS_NAMES
        .get(code as usize)
        .map_or_else(|| code.to_string(), |n| (*n).to_string())
}

impl Default for GrpcPolicy {
    fn default() -> Self {
        GrpcPolicy {
            default_timeout: DEFAULT_GRPC_TIMEOUT,
            add_headers: Vec::new(),
            retry: None,
            outlier_detection: None,
            balancing: Balancing::P2c,
            tls: None,
        }
    }
}

/// Checks a header name the gRPC mode may add: lowercase token characters,
/// not a pseudo-header and not one the proxy owns (`grpc-*`, `te`,
/// `content-type`, `host`, connection-specific ones, `x-request-id`,
/// `traceparent`).
pub fn check_added_header(name: &str, value: &str) -> Result<(), String> {
    let token =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!(
            "header name {name:?} must be lowercase token characters (a-z, 0-9, -, ...)"
        ));
    }
    const OWNED: [&str; 10] = [
        "te",
        "content-type",
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "x-request-id",
        "traceparent",
    ];
    if OWNED.contains(&name) || name.starts_with("grpc-") {
        return Err(format!("header {name:?} is set by the proxy itself"));
    }
    if !value
        .chars()
        .all(|c| c == ' ' || c == '\t' || c.is_ascii_graphic())
    {
        return Err(format!(
            "header {name}: value {value:?} must be visible ASCII"
        ));
    }
    Ok(())
}

/// What an active health check probes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// `grpc.health.v1.Health/Check` over HTTP/2 (h2c, or TLS with the
    /// service's `grpc.tls.upstream`); passes
    /// on `SERVING` only.
    #[default]
    Grpc,
    /// A TCP connect to the backend's port; passes when it is accepted.
    Tcp,
}

impl HealthCheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthCheckKind::Grpc => "grpc",
            HealthCheckKind::Tcp => "tcp",
        }
    }
}

impl fmt::Display for HealthCheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HealthCheckKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(HealthCheckKind::Grpc),
            "tcp" => Ok(HealthCheckKind::Tcp),
            _ => Err(format!(
                "unknown health check kind {s:?} (expected grpc or tcp)"
            )),
        }
    }
}

/// Defaults of a health check (as Kubernetes probes and Envoy use them,
/// with a shorter interval).
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;

/// An active health check of every backend of a service, run by each agent
/// from its node. A backend that fails `unhealthy_threshold` checks in a
/// row takes no new flows or calls (as with weight 0: established flows
/// stay) until it passes `healthy_threshold` in a row. If no backend of the
/// service is healthy, all take traffic again (panic mode).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    /// gRPC: the `service` field of the Check request; empty asks about the
    /// server as a whole. Must be empty for `tcp`.
    pub service: String,
    /// Time between the starts of two checks of one backend.
    pub interval: Duration,
    /// A check not answered within this fails.
    pub timeout: Duration,
    /// Consecutive failures that take a healthy backend out.
    pub unhealthy_threshold: u32,
    /// Consecutive passes that put an unhealthy backend back.
    pub healthy_threshold: u32,
}

impl HealthCheck {
    /// A check of this kind with the default timings.
    pub fn new(kind: HealthCheckKind) -> Self {
        HealthCheck {
            kind,
            service: String::new(),
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
        }
    }
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck::new(HealthCheckKind::Grpc)
    }
}

/// One load-balanced service: a VIP, port and protocol, and its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// `namespace/name:port`, shown by lbctl and in metrics.
    pub name: String,
    /// IPv4 or IPv6; every backend is of the same family.
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub algorithm: Algorithm,
    /// Client-IP affinity (Kubernetes `sessionAffinity: ClientIP`).
    pub affinity_timeout: Option<Duration>,
    /// Maglev table size M (prime, > 100 x backends); `None` = default.
    pub maglev_table_size: Option<u32>,
    pub backends: Vec<Backend>,
    /// `Some`: per-call gRPC balancing in the agent (L7 mode, TCP only);
    /// `None`: connection balancing (L4) in the kernel.
    #[serde(default)]
    pub grpc: Option<GrpcPolicy>,
    /// `Some`: active health checks of the backends (TCP services only);
    /// `None`: every backend is taken as healthy.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Addresses outside the cluster network where the service is also
    /// balanced: its node port and external/load-balancer IPs.
    #[serde(default)]
    pub external: External,
    /// `Some`: prefer backends near the client's node, by tier, with
    /// spill-over (docs/policies.md; [`crate::locality`]). Resolved per node
    /// into weights (the lower tiers get weight 0) before the data path sees
    /// it, and taken out, except a policy with `spill_outstanding` (kept for
    /// the gRPC balancer, with the drained backends' `spill_weight`);
    /// `None`: every backend, wherever it runs.
    #[serde(default)]
    pub locality: Option<Locality>,
    /// QoS limit per backend (docs/policies.md, "QoS limits"): in the L4
    /// mode, its concurrent connections (UDP: flows); in the gRPC mode, its
    /// outstanding calls. A backend at its limit gets no new flows (calls);
    /// all at their limit: the service answers as one without backends.
    /// A backend's own `max` wins. `None`: no limit.
    #[serde(default)]
    pub max_per_backend: Option<u32>,
    /// `Some`: a user-defined selector for the kernel path (docs/policies.md,
    /// "User-defined selector"): an eBPF object file's path, or
    /// `example:geo` (the shipped example, by client subnet). IPv4 L4
    /// services only; the userspace path uses the built-in algorithm.
    #[serde(default)]
    pub selector: Option<String>,
}

impl Service {
    /// `b`'s QoS limit: its own `max`, else the service's `max_per_backend`.
    pub fn limit_of(&self, b: &Backend) -> Option<u32> {
        b.max.or(self.max_per_backend)
    }

    /// Whether any backend of the service has a QoS limit.
    pub fn has_limits(&self) -> bool {
        self.max_per_backend.is_some() || self.backends.iter().any(|b| b.max.is_some())
    }
}

/// The largest QoS limit (`max_per_backend`, a backend's `max`).
pub const MAX_QOS_LIMIT: u32 = 1_000_000;

/// A tier of a [`Locality`] policy: backends on the client's node, in its
/// zone (`topology.kubernetes.io/zone`) or in its region
/// (`topology.kubernetes.io/region`). "Anywhere" is always the last tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalityTier {
    Node,
    Zone,
    Region,
}

impl LocalityTier {
    pub const ALL: [LocalityTier; 3] =
        [LocalityTier::Node, LocalityTier::Zone, LocalityTier::Region];

    pub fn as_str(self) -> &'static str {
        match self {
            LocalityTier::Node => "node",
            LocalityTier::Zone => "zone",
            LocalityTier::Region => "region",
        }
    }
}

impl fmt::Display for LocalityTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LocalityTier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown locality tier {s:?} (expected node, zone or region)"))
    }
}

/// A locality policy: new flows go to the backends of the first tier (in
/// `tiers` order) that has at least `min_backends` backends taking new
/// flows; when none has, to every backend (the "anywhere" tier).
/// Kubernetes `trafficDistribution: PreferSameZone` is `[zone]` with 1,
/// `PreferSameNode` is `[node, zone]` with 1.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Locality {
    /// Narrowest first, each tier at most once (validation).
    pub tiers: Vec<LocalityTier>,
    /// Spill-over: a tier with fewer backends taking new flows is skipped
    /// (1..=[`MAX_LOCALITY_MIN_BACKENDS`]).
    pub min_backends: u32,
    /// gRPC mode only: when every backend of the chosen tier that takes
    /// calls (not ejected) has at least this many calls outstanding, the
    /// agent's balancer also picks among the backends the resolution
    /// drained (their [`Backend::spill_weight`]), until one of the tier
    /// falls below it (1..=[`MAX_SPILL_OUTSTANDING`]). Unlike the rest of
    /// the policy, it stays in the resolved state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_outstanding: Option<u32>,
}

/// The largest `spill_outstanding` of a locality policy.
pub const MAX_SPILL_OUTSTANDING: u32 = 1_000_000;

/// The largest `min_backends` of a locality policy.
pub const MAX_LOCALITY_MIN_BACKENDS: u32 = 10_000;

impl Locality {
    /// `trafficDistribution: PreferSameZone` (and its older name `PreferClose`).
    pub fn prefer_same_zone() -> Self {
        Locality {
            tiers: vec![LocalityTier::Zone],
            min_backends: 1,
            spill_outstanding: None,
        }
    }

    /// `trafficDistribution: PreferSameNode`: this node's, else this zone's.
    pub fn prefer_same_node() -> Self {
        Locality {
            tiers: vec![LocalityTier::Node, LocalityTier::Zone],
            min_backends: 1,
            spill_outstanding: None,
        }
    }
}

/// Kubernetes `externalTrafficPolicy` (and `internalTrafficPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficPolicy {
    /// Every backend of the service.
    #[default]
    Cluster,
    /// Only the backends on the receiving node; the client address is kept.
    Local,
}

impl TrafficPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "cluster",
            TrafficPolicy::Local => "local",
        }
    }
}

/// A service's external front ends (Kubernetes NodePort, externalIPs and
/// LoadBalancer ingress IPs). The default is none: ClusterIP only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct External {
    /// `nodePort`: the service is also balanced on every node address at
    /// this port (same protocol).
    #[serde(default)]
    pub node_port: Option<u16>,
    /// `externalIPs` and `status.loadBalancer.ingress[].ip`: the service is
    /// also balanced on these addresses at its own port.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// `externalTrafficPolicy`, for the node port and the external IPs.
    #[serde(default)]
    pub traffic_policy: TrafficPolicy,
    /// `healthCheckNodePort` (with [`TrafficPolicy::Local`]): the agent
    /// answers HTTP on every node address at this port, 200 with the count of
    /// local backends, 503 when there are none (as kube-proxy).
    #[serde(default)]
    pub health_check_node_port: Option<u16>,
}

impl External {
    /// Whether the service has any external front end.
    pub fn any(&self) -> bool {
        self.node_port.is_some() || !self.ips.is_empty()
    }
}

impl Service {
    /// A service without affinity and with the default Maglev size.
    pub fn new(
        name: impl Into<String>,
        vip: impl Into<IpAddr>,
        port: u16,
        protocol: Protocol,
        algorithm: Algorithm,
        backends: Vec<Backend>,
    ) -> Self {
        Service {
            name: name.into(),
            vip: vip.into(),
            port,
            protocol,
            algorithm,
            affinity_timeout: None,
            maglev_table_size: None,
            backends,
            grpc: None,
            health_check: None,
            external: External::default(),
            locality: None,
            max_per_backend: None,
            selector: None,
        }
    }

    /// Whether the VIP is IPv6 (served by the userspace proxy until the
    /// kernel programs handle IPv6).
    pub fn is_ipv6(&self) -> bool {
        self.vip.is_ipv6()
    }

    pub fn addr(&self) -> ServiceAddr {
        ServiceAddr {
            vip: self.vip,
            port: self.port,
            protocol: self.protocol,
        }
    }

    /// The Maglev table size this service uses.
    pub fn maglev_m(&self) -> u32 {
        self.maglev_table_size.unwrap_or(DEFAULT_MAGLEV_M)
    }
}

/// Everything a node must balance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub services: Vec<Service>,
}

/// The largest backend weight accepted from a config file or an annotation.
pub const MAX_WEIGHT: u32 = 65_535;

/// Whether `n` is prime (deterministic trial division by 6k +- 1; at most
/// ~11,000 divisions for the largest `u32`). Maglev table sizes must be prime.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut i = 5u64;
    while i * i <= n {
        if n.is_multiple_of(i) || n.is_multiple_of(i + 2) {
            return false;
        }
        i += 6;
    }
    true
}
