//! The `rpclb.io/` annotations on a Kubernetes Service: its load-balancing
//! policy.
//!
//! | annotation | value | default |
//! |---|---|---|
//! | `rpclb.io/algorithm` | `random`, `round-robin`, `maglev`, `source-hash` or `least-conn` (case-insensitive) | `random` |
//! | `rpclb.io/weights` | a list of `IP=WEIGHT`, see below | every backend weight 1 |
//! | `rpclb.io/maglev-table-size` | a prime > 100 | the agent's default (16381, or larger for many backends) |
//! | `rpclb.io/mode` | `l4` or `grpc` (per-call gRPC balancing in the agent, TCP ports only) | `l4` |
//! | `rpclb.io/grpc-timeout` | seconds, 1-86400: the deadline of a call without `grpc-timeout` (gRPC mode) | 30 |
//! | `rpclb.io/health-check` | `grpc` (grpc.health.v1 Check) or `tcp` (connect): active health checks of the backends (TCP ports only) | none |
//! | `rpclb.io/health-check-service` | the Check request's service name (`grpc` checks only) | empty: the whole server |
//! | `rpclb.io/health-check-interval` | a duration (`500ms`, `5s`, `1m`; a bare number is seconds), 100ms-1h | `5s` |
//! | `rpclb.io/health-check-timeout` | a duration, 10ms up to the interval | `1s` (or the interval, if shorter) |
//! | `rpclb.io/health-check-unhealthy-threshold` | failures in a row that take a backend out, 1-100 | 3 |
//! | `rpclb.io/health-check-healthy-threshold` | passes in a row that put it back, 1-100 | 2 |
//! | `rpclb.io/grpc-retry-max-attempts` | 2-5 attempts, the first included: a retry policy (gRFC A6) for the gRPC mode | no retries |
//! | `rpclb.io/grpc-retry-status-codes` | comma-separated gRPC status names (`UNAVAILABLE, RESOURCE_EXHAUSTED`) or numbers | `UNAVAILABLE` |
//! | `rpclb.io/grpc-retry-initial-backoff` | a duration, 1ms-5m | `100ms` |
//! | `rpclb.io/grpc-retry-max-backoff` | a duration, 1ms-5m, not below the initial backoff | `1s` |
//! | `rpclb.io/grpc-retry-backoff-multiplier` | a number from 1 to 100 (up to 3 decimals) | `2` |
//! | `rpclb.io/grpc-retry-max-tokens` | the retry throttle's tokens, 1-1000 (turns the throttle on) | no throttle; `10` when the ratio is set |
//! | `rpclb.io/grpc-retry-token-ratio` | tokens a success gives back, 0.001 up to max-tokens (turns the throttle on) | `0.1` |
//! | `rpclb.io/grpc-outlier-consecutive-failures` | failures in a row that eject a backend, 1-1000 (any `grpc-outlier-*` key turns outlier ejection on) | 5 |
//! | `rpclb.io/grpc-outlier-base-ejection-time` | a duration, 1ms-1h: the first ejection's length (the n-th lasts n times it) | `30s` |
//! | `rpclb.io/grpc-outlier-max-ejection-time` | a duration, 1ms-1h, not below the base | `300s` (or the base, if longer) |
//! | `rpclb.io/grpc-outlier-max-ejection-percent` | 0-100: most of the backends ejected at once (at least one; below 100 one always stays) | 10 |
//!
//! The `rpclb.io/grpc-outlier-*` settings need `rpclb.io/mode: grpc`;
//! without it each is reported and ignored. Any of them turns outlier
//! ejection on; an invalid one is reported and its default used.
//! | `rpclb.io/grpc-balancing` | `p2c` (least outstanding calls, two random choices) or `orca_wrr` (weighted round-robin from ORCA load reports, gRFC A58) | `p2c` |
//! | `rpclb.io/grpc-balancing-blackout-period` | a duration, 0-1h: how long a backend reports before its weight is used | `10s` |
//! | `rpclb.io/grpc-balancing-weight-expiration-period` | a duration, 100ms-1h: a weight without a report for this long is dropped | `3m` |
//! | `rpclb.io/grpc-balancing-weight-update-period` | a duration, 100ms-1m: how often the weights are taken anew | `1s` |
//! | `rpclb.io/grpc-balancing-error-utilization-penalty` | a number from 0 to 100 (up to 3 decimals) | `1` |
//!
//! `rpclb.io/grpc-balancing` needs `rpclb.io/mode: grpc`, and its
//! `-period`/`-penalty` settings need `rpclb.io/grpc-balancing: orca_wrr`;
//! without them each is reported and ignored. An invalid setting is
//! reported and its default used.
//!
//! | `rpclb.io/grpc-tls-secret` | a Secret name: the listener terminates TLS with its `tls.crt`/`tls.key` (gRPC mode) | plaintext (h2c) |
//! | `rpclb.io/grpc-tls-client-ca-secret` | a Secret name: clients must present a certificate signed by its `ca.crt` (mutual TLS) | no client certificates |
//! | `rpclb.io/grpc-upstream-tls-ca-secret` | a Secret name: the proxy speaks TLS to the backends and verifies them with its `ca.crt` | plaintext (h2c) |
//! | `rpclb.io/grpc-upstream-tls-secret` | a Secret name: the client certificate (`tls.crt`/`tls.key`) presented to the backends | none |
//! | `rpclb.io/grpc-upstream-tls-server-name` | the name verified in the backends' certificates (DNS name or IP) | each backend's IP |
//!
//! | `rpclb.io/locality` | comma-separated tiers, narrowest first: `node`, `zone`, `region` (docs/policies.md) | none (`trafficDistribution`'s) |
//! | `rpclb.io/locality-min-backends` | 1-10000: the spill-over threshold; needs `rpclb.io/locality` | 1 |
//! | `rpclb.io/locality-spill-outstanding` | 1-1000000: gRPC mode: spill over while every backend of the chosen tier has this many calls outstanding; needs `rpclb.io/locality` and `rpclb.io/mode: grpc` | none |
//! | `rpclb.io/headers` | `name: value` lines: headers the gRPC mode adds to every call ([`parse_headers`]); needs `rpclb.io/mode: grpc` | none |
//! | `rpclb.io/selector` | `example:geo`, or a NAME (`[a-z0-9][a-z0-9._-]{0,62}`): a user-defined selector for the kernel path, which each agent loads from `<--selector-dir>/NAME.o` on its node ([`parse_selector`]; never a path). IPv4, L4 (not `rpclb.io/mode: grpc`), at most 16 backends; a port it cannot serve is reported and keeps its algorithm | none |
//!
//! The `rpclb.io/grpc-*tls*` annotations name Secrets that the operator
//! mounts into the agent's DaemonSet at
//! `/etc/rpclb/grpc-tls/<namespace>/<secret>/` ([`GRPC_TLS_DIR`]; see
//! docs/kubernetes.md): the agent reads files on its node and never Secrets
//! from the API. A Service can only name directories of its own namespace.
//! They need `rpclb.io/mode: grpc`; the client CA needs
//! `rpclb.io/grpc-tls-secret`, and the upstream client certificate and
//! server name need `rpclb.io/grpc-upstream-tls-ca-secret`; without them
//! each is reported and ignored. An invalid one is reported and ignored
//! (that side stays plaintext).
//!
//! The `rpclb.io/grpc-retry-*` settings need `rpclb.io/mode: grpc` and
//! `rpclb.io/grpc-retry-max-attempts`; without them each is reported and
//! ignored. An invalid setting is reported and its default used.
//!
//! The `rpclb.io/health-check-*` settings need `rpclb.io/health-check`;
//! without it each is reported and ignored. An invalid setting is reported
//! and its default used; the check itself stays on.
//!
//! `rpclb.io/weights` format: comma-separated `IP=WEIGHT` entries, for
//! example `"10.244.2.2=3, 10.244.2.3=1"`.
//!
//! - `IP` is a backend pod's IPv4 or IPv6 address, as in the EndpointSlice. The
//!   weight applies to every port of that pod.
//! - `WEIGHT` is a whole number from 0 to 65535 (`lb_api::MAX_WEIGHT`),
//!   relative to the other backends; 0 drains the pod (no new flows).
//! - Spaces around entries and around `=` are ignored, and so is a trailing
//!   comma. Each IP may appear once.
//! - Backends not listed get weight 1. Listed IPs that are not (or no longer)
//!   endpoints of the Service are ignored, so the annotation may run ahead of
//!   a rollout.
//! - The list is all or nothing: if any entry is invalid, the whole
//!   annotation is ignored (every backend weight 1) and each bad entry is
//!   reported.
//!
//! `rpclb.io/maglev-table-size` is used by `maglev` and `source-hash` and
//! ignored by the other algorithms. Whether it is also greater than 100 x the
//! number of backends is checked where the backends are known, when the
//! desired state is built.
//!
//! **On Pods** ([`parse_pod_annotations`]): a backend's own settings, in
//! every Service it serves, joined to the endpoints by their `targetRef`:
//!
//! | annotation | value | default |
//! |---|---|---|
//! | `rpclb.io/weight` | 0-65535; 0 drains the pod. The Service's `rpclb.io/weights` entry for the pod's IP wins over it | the Service's entry, else 1 |
//! | `rpclb.io/max` | 1-1000000: the pod's QoS limit; wins over the Service's `rpclb.io/max-per-backend` | the Service's limit, if any |
//!
//! An invalid one (or an unknown `rpclb.io/` key on a Pod) is reported on
//! the Pod and ignored.
//!
//! An invalid annotation never stops the Service from being balanced: the
//! default is used, and [`parse_annotations`] returns an [`AnnotationError`]
//! for it, which the controller turns into a Kubernetes Event on the Service
//! (reason [`AnnotationError::EVENT_REASON`]). An unknown `rpclb.io/` key (a
//! typo such as `rpclb.io/algoritm`) is reported the same way. Annotations
//! with other prefixes are not ours and are skipped.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use lb_api::{Algorithm, validate};

/// The prefix of every rpclb annotation.
pub const PREFIX: &str = "rpclb.io/";
/// The load-balancing algorithm.
pub const ALGORITHM: &str = "rpclb.io/algorithm";
/// Per-backend weights, `IP=WEIGHT,...`.
pub const WEIGHTS: &str = "rpclb.io/weights";
/// The Maglev table size (prime).
pub const MAGLEV_TABLE_SIZE: &str = "rpclb.io/maglev-table-size";
/// `l4` or `grpc`.
pub const MODE: &str = "rpclb.io/mode";
/// The gRPC mode's default call deadline, in seconds.
pub const GRPC_TIMEOUT: &str = "rpclb.io/grpc-timeout";
/// `grpc` or `tcp`: active health checks.
pub const HEALTH_CHECK: &str = "rpclb.io/health-check";
/// The gRPC health service name of the Check request.
pub const HEALTH_CHECK_SERVICE: &str = "rpclb.io/health-check-service";
pub const HEALTH_CHECK_INTERVAL: &str = "rpclb.io/health-check-interval";
pub const HEALTH_CHECK_TIMEOUT: &str = "rpclb.io/health-check-timeout";
pub const HEALTH_CHECK_UNHEALTHY: &str = "rpclb.io/health-check-unhealthy-threshold";
pub const HEALTH_CHECK_HEALTHY: &str = "rpclb.io/health-check-healthy-threshold";
/// 2-5: a retry policy for the gRPC mode.
pub const GRPC_RETRY_MAX_ATTEMPTS: &str = "rpclb.io/grpc-retry-max-attempts";
pub const GRPC_RETRY_STATUS_CODES: &str = "rpclb.io/grpc-retry-status-codes";
pub const GRPC_RETRY_INITIAL_BACKOFF: &str = "rpclb.io/grpc-retry-initial-backoff";
pub const GRPC_RETRY_MAX_BACKOFF: &str = "rpclb.io/grpc-retry-max-backoff";
pub const GRPC_RETRY_BACKOFF_MULTIPLIER: &str = "rpclb.io/grpc-retry-backoff-multiplier";
pub const GRPC_RETRY_MAX_TOKENS: &str = "rpclb.io/grpc-retry-max-tokens";
pub const GRPC_RETRY_TOKEN_RATIO: &str = "rpclb.io/grpc-retry-token-ratio";
/// Any of these: passive outlier ejection for the gRPC mode.
pub const GRPC_OUTLIER_CONSECUTIVE_FAILURES: &str = "rpclb.io/grpc-outlier-consecutive-failures";
pub const GRPC_OUTLIER_BASE_EJECTION_TIME: &str = "rpclb.io/grpc-outlier-base-ejection-time";
pub const GRPC_OUTLIER_MAX_EJECTION_TIME: &str = "rpclb.io/grpc-outlier-max-ejection-time";
pub const GRPC_OUTLIER_MAX_EJECTION_PERCENT: &str = "rpclb.io/grpc-outlier-max-ejection-percent";
/// `p2c` or `orca_wrr`: how the gRPC mode picks each call's backend.
pub const GRPC_BALANCING: &str = "rpclb.io/grpc-balancing";
pub const GRPC_BALANCING_BLACKOUT: &str = "rpclb.io/grpc-balancing-blackout-period";
pub const GRPC_BALANCING_EXPIRATION: &str = "rpclb.io/grpc-balancing-weight-expiration-period";
pub const GRPC_BALANCING_UPDATE: &str = "rpclb.io/grpc-balancing-weight-update-period";
pub const GRPC_BALANCING_PENALTY: &str = "rpclb.io/grpc-balancing-error-utilization-penalty";
/// A Secret (mounted on the node) whose `tls.crt`/`tls.key` the listener presents.
pub const GRPC_TLS_SECRET: &str = "rpclb.io/grpc-tls-secret";
/// A Secret whose `ca.crt` signs the clients' certificates (mutual TLS).
pub const GRPC_TLS_CLIENT_CA_SECRET: &str = "rpclb.io/grpc-tls-client-ca-secret";
/// A Secret whose `ca.crt` verifies the backends: TLS to the backends.
pub const GRPC_UPSTREAM_TLS_CA_SECRET: &str = "rpclb.io/grpc-upstream-tls-ca-secret";
/// A Secret whose `tls.crt`/`tls.key` the proxy presents to the backends.
pub const GRPC_UPSTREAM_TLS_SECRET: &str = "rpclb.io/grpc-upstream-tls-secret";
/// The name verified in the backends' certificates.
pub const GRPC_UPSTREAM_TLS_SERVER_NAME: &str = "rpclb.io/grpc-upstream-tls-server-name";
/// Where the agent's DaemonSet mounts the Secrets the TLS annotations name:
/// `<GRPC_TLS_DIR>/<namespace>/<secret>/{tls.crt,tls.key,ca.crt}`.
pub const GRPC_TLS_DIR: &str = "/etc/rpclb/grpc-tls";
/// `node,zone,region` (any of them, narrowest first): a locality policy.
pub const LOCALITY: &str = "rpclb.io/locality";
/// The locality policy's spill-over threshold (default 1).
pub const LOCALITY_MIN_BACKENDS: &str = "rpclb.io/locality-min-backends";
/// The gRPC mode's spill-over on outstanding calls (docs/policies.md).
pub const LOCALITY_SPILL_OUTSTANDING: &str = "rpclb.io/locality-spill-outstanding";
/// Headers the gRPC mode adds to every call: `name: value` lines.
pub const HEADERS: &str = "rpclb.io/headers";
/// QoS limit per backend (docs/policies.md): connections (L4) or
/// outstanding calls (gRPC mode), for every backend of the Service (a Pod's
/// own [`POD_MAX`] wins).
pub const MAX_PER_BACKEND: &str = "rpclb.io/max-per-backend";
/// A user-defined selector for the kernel path (docs/policies.md):
/// `example:geo` or a NAME (the agents' `<--selector-dir>/NAME.o`); never a path.
pub const SELECTOR: &str = "rpclb.io/selector";

/// On a Pod: its weight as a backend of every Service it serves, 0-65535
/// (0 drains it); the YAML backend `weight`.
pub const POD_WEIGHT: &str = "rpclb.io/weight";
/// On a Pod: its own QoS limit, 1-1000000; wins over the Service's
/// [`MAX_PER_BACKEND`], as the YAML backend `max` does.
pub const POD_MAX: &str = "rpclb.io/max";
/// Every Pod annotation this version understands.
pub const POD_KNOWN: [&str; 2] = [POD_WEIGHT, POD_MAX];
/// Every annotation this version understands.
pub const KNOWN: [&str; 38] = [
    ALGORITHM,
    WEIGHTS,
    MAGLEV_TABLE_SIZE,
    MODE,
    GRPC_TIMEOUT,
    HEALTH_CHECK,
    HEALTH_CHECK_SERVICE,
    HEALTH_CHECK_INTERVAL,
    HEALTH_CHECK_TIMEOUT,
    HEALTH_CHECK_UNHEALTHY,
    HEALTH_CHECK_HEALTHY,
    GRPC_RETRY_MAX_ATTEMPTS,
    GRPC_RETRY_STATUS_CODES,
    GRPC_RETRY_INITIAL_BACKOFF,
    GRPC_RETRY_MAX_BACKOFF,
    GRPC_RETRY_BACKOFF_MULTIPLIER,
    GRPC_RETRY_MAX_TOKENS,
    GRPC_RETRY_TOKEN_RATIO,
    GRPC_OUTLIER_CONSECUTIVE_FAILURES,
    GRPC_OUTLIER_BASE_EJECTION_TIME,
    GRPC_OUTLIER_MAX_EJECTION_TIME,
    GRPC_OUTLIER_MAX_EJECTION_PERCENT,
    GRPC_BALANCING,
    GRPC_BALANCING_BLACKOUT,
    GRPC_BALANCING_EXPIRATION,
    GRPC_BALANCING_UPDATE,
    GRPC_BALANCING_PENALTY,
    GRPC_TLS_SECRET,
    GRPC_TLS_CLIENT_CA_SECRET,
    GRPC_UPSTREAM_TLS_CA_SECRET,
    GRPC_UPSTREAM_TLS_SECRET,
    GRPC_UPSTREAM_TLS_SERVER_NAME,
    LOCALITY,
    LOCALITY_MIN_BACKENDS,
    LOCALITY_SPILL_OUTSTANDING,
    HEADERS,
    MAX_PER_BACKEND,
    SELECTOR,
];

/// A Service's load-balancing policy, from its annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePolicy {
    pub algorithm: Algorithm,
    /// Weights by backend IP; backends not listed have weight 1.
    pub weights: BTreeMap<IpAddr, u32>,
    /// `None`: the agent's default.
    pub maglev_table_size: Option<u32>,
    /// `rpclb.io/mode: grpc`: the gRPC (L7) mode, with `rpclb.io/grpc-timeout`.
    pub grpc: Option<lb_api::GrpcPolicy>,
    /// `rpclb.io/health-check` and its settings.
    pub health_check: Option<lb_api::HealthCheck>,
    /// The `rpclb.io/grpc-*tls*` annotations (gRPC mode only).
    pub tls: TlsSecrets,
    /// `rpclb.io/locality`, `rpclb.io/locality-min-backends` and
    /// `rpclb.io/locality-spill-outstanding`.
    pub locality: Option<lb_api::Locality>,
    /// `rpclb.io/max-per-backend`.
    pub max_per_backend: Option<u32>,
    /// `rpclb.io/selector`: an example or a NAME (never a path).
    pub selector: Option<String>,
}

/// The Secrets (mounted under [`GRPC_TLS_DIR`]) that the TLS annotations
/// name, checked: valid names, and each with what it needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSecrets {
    pub listen: Option<String>,
    pub client_ca: Option<String>,
    pub upstream_ca: Option<String>,
    pub upstream_cert: Option<String>,
    pub server_name: Option<String>,
}

impl TlsSecrets {
    /// The model's TLS for a Service in `namespace` (`None`: plaintext).
    pub fn to_model(&self, namespace: &str) -> Option<lb_api::GrpcTls> {
        let file = |secret: &str, name: &str| format!("{GRPC_TLS_DIR}/{namespace}/{secret}/{name}");
        let listen = self.listen.as_ref().map(|s| lb_api::ListenTls {
            cert: file(s, "tls.crt"),
            key: file(s, "tls.key"),
            client_ca: self.client_ca.as_ref().map(|c| file(c, "ca.crt")),
        });
        let upstream = self.upstream_ca.as_ref().map(|ca| lb_api::UpstreamTls {
            ca: file(ca, "ca.crt"),
            server_name: self.server_name.clone(),
            cert: self.upstream_cert.as_ref().map(|c| file(c, "tls.crt")),
            key: self.upstream_cert.as_ref().map(|c| file(c, "tls.key")),
        });
        (listen.is_some() || upstream.is_some()).then_some(lb_api::GrpcTls { listen, upstream })
    }
}

/// `rpclb.io/headers`: one header per line, `name: value` (as in HTTP;
/// blank lines are skipped, spaces around the name and the value are
/// trimmed), checked as the YAML `grpc.headers` list is
/// ([`validate::added_headers`]). All or nothing: the first bad line is
/// reported and no header is added.
pub fn parse_headers(value: &str) -> Result<Vec<(String, String)>, Vec<AnnotationProblem>> {
    let mut headers = Vec::new();
    for line in value.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Some((name, v)) = line.split_once(':') else {
            return Err(vec![AnnotationProblem::HeaderValue(format!(
                "line {line:?} is not of the form `name: value`"
            ))]);
        };
        headers.push((name.trim().to_string(), v.trim().to_string()));
    }
    if headers.is_empty() {
        return Err(vec![AnnotationProblem::Empty]);
    }
    validate::added_headers(&headers)
        .map(|()| headers)
        .map_err(|(_, _, m)| vec![AnnotationProblem::HeaderValue(m)])
}

/// `rpclb.io/locality`: comma-separated tiers, narrowest first.
fn parse_locality(value: &str) -> Result<lb_api::Locality, Vec<AnnotationProblem>> {
    if value.trim().is_empty() {
        return Err(vec![AnnotationProblem::Empty]);
    }
    let tiers = value
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::parse::<lb_api::LocalityTier>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| vec![AnnotationProblem::LocalityValue(e)])?;
    let l = lb_api::Locality {
        tiers,
        min_backends: 1,
        spill_outstanding: None,
    };
    validate::locality(&l)
        .map(|()| l)
        .map_err(|e| vec![AnnotationProblem::LocalityValue(e)])
}

/// `rpclb.io/selector`: `example:geo` or a NAME (the syntax of
/// `lb_api::validate::selector`). Never a path: a Service's author is not
/// the node's admin, and a path would let a Service make every agent load
/// any file of its node (docs/security.md). Surrounding blanks are ignored.
pub fn parse_selector(value: &str) -> Result<String, Vec<AnnotationProblem>> {
    let v = value.trim();
    if v.is_empty() {
        return Err(vec![AnnotationProblem::Empty]);
    }
    match validate::selector(v) {
        Ok(validate::SelectorRef::Path(_)) => Err(vec![AnnotationProblem::SelectorValue(format!(
            "{v:?} is a path: an annotation names example:geo or a NAME, which each agent \
                 loads from its --selector-dir (NAME.o, put there by the node's admin)"
        ))]),
        Ok(_) => Ok(v.to_string()),
        Err(e) => Err(vec![AnnotationProblem::SelectorValue(e)]),
    }
}

/// A decimal u32 (surrounding blanks ignored, no sign): `Empty` or `NotANumber` otherwise.
/// Each caller checks its own range.
fn parse_u32(value: &str) -> Result<u32, Vec<AnnotationProblem>> {
    let v = value.trim();
    if v.is_empty() {
        return Err(vec![AnnotationProblem::Empty]);
    }
    v.parse::<u32>()
        .ok()
        .filter(|_| !v.starts_with('+'))
        .ok_or_else(|| vec![AnnotationProblem::NotANumber(v.to_string())])
}

fn parse_min_backends(value: &str) -> Result<u32, Vec<AnnotationProblem>> {
    let n = parse_u32(value)?;
    validate::locality_min_backends(n)
        .map(|()| n)
        .map_err(|e| vec![AnnotationProblem::LocalityValue(e)])
}

fn parse_spill_outstanding(value: &str) -> Result<u32, Vec<AnnotationProblem>> {
    let n = parse_u32(value)?;
    validate::locality_spill_outstanding(n)
        .map(|()| n)
        .map_err(|e| vec![AnnotationProblem::LocalityValue(e)])
}

/// A QoS limit (`rpclb.io/max-per-backend` on a Service, `rpclb.io/max` on a
/// Pod): 1-1000000.
pub fn parse_qos_limit(value: &str) -> Result<u32, Vec<AnnotationProblem>> {
    let n = parse_u32(value)?;
    validate::qos_limit(n)
        .map(|()| n)
        .map_err(|e| vec![AnnotationProblem::QosValue(e)])
}

/// A Secret name as Kubernetes allows it (a DNS-1123 subdomain): so it is
/// one path segment, never `..` or a path.
fn secret_name(v: &str) -> Result<String, Vec<AnnotationProblem>> {
    let v = v.trim();
    if v.is_empty() {
        return Err(vec![AnnotationProblem::Empty]);
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if v.len() > 253 || !v.split('.').all(label_ok) {
        return Err(vec![AnnotationProblem::TlsValue(format!(
            "{v:?} is not a Secret name (lowercase letters, digits, '-' and '.')"
        ))]);
    }
    Ok(v.to_string())
}

impl ServicePolicy {
    /// The gRPC mode's policy for a Service in `namespace`, its TLS included.
    pub fn grpc_policy(&self, namespace: &str) -> Option<lb_api::GrpcPolicy> {
        self.grpc.clone().map(|mut g| {
            g.tls = self.tls.to_model(namespace);
            g
        })
    }

    /// The weight of the backend at `ip`.
    pub fn weight(&self, ip: IpAddr) -> u32 {
        self.backend_weight(ip, None)
    }

    /// The weight of the backend at `ip` whose Pod says `pod`
    /// ([`POD_WEIGHT`]): the Service's `rpclb.io/weights` entry for `ip`
    /// wins (it names this Service and this backend; the Pod's applies in
    /// every Service the Pod serves), then the Pod's, else 1.
    pub fn backend_weight(&self, ip: IpAddr, pod: Option<u32>) -> u32 {
        self.weights.get(&ip).copied().or(pod).unwrap_or(1)
    }
}

/// An annotation whose value could not be used; its default applies instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnotationError {
    /// The annotation key, e.g. `rpclb.io/weights`.
    pub key: String,
    /// Its whole value, as given.
    pub value: String,
    pub problem: AnnotationProblem,
}

impl AnnotationError {
    /// The `reason` of the Kubernetes Event this error becomes.
    pub const EVENT_REASON: &'static str = "InvalidAnnotation";

    /// What is used instead of the annotation.
    pub fn fallback(&self) -> &'static str {
        if self.problem == AnnotationProblem::UnknownPodKey {
            // A Service's key on a Pod: not what that key falls back to.
            return "ignoring it";
        }
        match self.key.as_str() {
            ALGORITHM => "using the default algorithm (random)",
            WEIGHTS => "ignoring all weights (every backend has weight 1)",
            MAGLEV_TABLE_SIZE => "using the default maglev table size",
            MODE => "using the l4 mode",
            GRPC_TIMEOUT => "using the default gRPC timeout (30 s)",
            HEALTH_CHECK => "no health checks",
            HEALTH_CHECK_SERVICE => "checking the whole server (empty service name)",
            HEALTH_CHECK_INTERVAL => "using the default interval (5s)",
            HEALTH_CHECK_TIMEOUT => "using the default timeout (1s, or the interval if shorter)",
            HEALTH_CHECK_UNHEALTHY => "using the default unhealthy threshold (3)",
            HEALTH_CHECK_HEALTHY => "using the default healthy threshold (2)",
            GRPC_RETRY_MAX_ATTEMPTS => "no retry policy",
            GRPC_RETRY_STATUS_CODES => "retrying UNAVAILABLE only",
            GRPC_RETRY_INITIAL_BACKOFF => "using the default initial backoff (100ms)",
            GRPC_RETRY_MAX_BACKOFF => "using the default max backoff (1s)",
            GRPC_RETRY_BACKOFF_MULTIPLIER => "using the default backoff multiplier (2)",
            GRPC_RETRY_MAX_TOKENS => "using the default retry throttle tokens (10, or none)",
            GRPC_RETRY_TOKEN_RATIO => "using the default retry throttle ratio (0.1, or none)",
            GRPC_OUTLIER_CONSECUTIVE_FAILURES => "using the default consecutive failures (5)",
            GRPC_OUTLIER_BASE_EJECTION_TIME => "using the default base ejection time (30s)",
            GRPC_OUTLIER_MAX_EJECTION_TIME => {
                "using the default max ejection time (300s, or the base if longer)"
            }
            GRPC_OUTLIER_MAX_EJECTION_PERCENT => "using the default max ejection percent (10)",
            GRPC_BALANCING => "using p2c balancing",
            GRPC_BALANCING_BLACKOUT => "using the default blackout period (10s)",
            GRPC_BALANCING_EXPIRATION => "using the default weight expiration period (3m)",
            GRPC_BALANCING_UPDATE => "using the default weight update period (1s)",
            GRPC_BALANCING_PENALTY => "using the default error utilization penalty (1)",
            GRPC_TLS_SECRET => "no TLS to clients (h2c)",
            GRPC_TLS_CLIENT_CA_SECRET => "no client certificates asked for",
            GRPC_UPSTREAM_TLS_CA_SECRET => "no TLS to the backends (h2c)",
            GRPC_UPSTREAM_TLS_SECRET => "no client certificate for the backends",
            GRPC_UPSTREAM_TLS_SERVER_NAME => "verifying each backend's IP address",
            LOCALITY => "no locality policy (trafficDistribution, if set, still applies)",
            LOCALITY_MIN_BACKENDS => "using the default min backends (1)",
            LOCALITY_SPILL_OUTSTANDING => "no spill-over on outstanding calls",
            HEADERS => "adding no headers from the annotation",
            MAX_PER_BACKEND => "no QoS limit",
            SELECTOR => "no selector (the service's algorithm chooses)",
            POD_WEIGHT => {
                "the pod keeps its default weight (the Service's rpclb.io/weights, else 1)"
            }
            POD_MAX => "the pod keeps the Service's limit (rpclb.io/max-per-backend), if any",
            _ => "ignoring it",
        }
    }
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid annotation {}={:?}: {}; {}",
            self.key,
            self.value,
            self.problem,
            self.fallback()
        )
    }
}

impl std::error::Error for AnnotationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.problem)
    }
}

/// Why an annotation value is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationProblem {
    #[error(
        "unknown rpclb.io annotation (known: rpclb.io/algorithm, rpclb.io/weights, rpclb.io/maglev-table-size, rpclb.io/mode, rpclb.io/grpc-timeout, rpclb.io/health-check, rpclb.io/health-check-service, rpclb.io/health-check-interval, rpclb.io/health-check-timeout, rpclb.io/health-check-unhealthy-threshold, rpclb.io/health-check-healthy-threshold, rpclb.io/grpc-retry-max-attempts, rpclb.io/grpc-retry-status-codes, rpclb.io/grpc-retry-initial-backoff, rpclb.io/grpc-retry-max-backoff, rpclb.io/grpc-retry-backoff-multiplier, rpclb.io/grpc-retry-max-tokens, rpclb.io/grpc-retry-token-ratio, rpclb.io/grpc-outlier-consecutive-failures, rpclb.io/grpc-outlier-base-ejection-time, rpclb.io/grpc-outlier-max-ejection-time, rpclb.io/grpc-outlier-max-ejection-percent, rpclb.io/grpc-balancing, rpclb.io/grpc-balancing-blackout-period, rpclb.io/grpc-balancing-weight-expiration-period, rpclb.io/grpc-balancing-weight-update-period, rpclb.io/grpc-balancing-error-utilization-penalty, rpclb.io/grpc-tls-secret, rpclb.io/grpc-tls-client-ca-secret, rpclb.io/grpc-upstream-tls-ca-secret, rpclb.io/grpc-upstream-tls-secret, rpclb.io/grpc-upstream-tls-server-name, rpclb.io/locality, rpclb.io/locality-min-backends, rpclb.io/locality-spill-outstanding, rpclb.io/headers, rpclb.io/max-per-backend, rpclb.io/selector)"
    )]
    UnknownKey,
    #[error("the value is empty")]
    Empty,
    #[error(
        "unknown algorithm {0:?} (expected one of: random, round-robin, maglev, source-hash, least-conn)"
    )]
    UnknownAlgorithm(String),
    #[error("weight entry {entry:?} is not of the form IP=WEIGHT")]
    WeightSyntax { entry: String },
    #[error("weight entry {entry:?}: {ip:?} is not an IP address")]
    WeightIp { entry: String, ip: String },
    #[error("weight entry {entry:?}: {weight:?} is not a weight from 0 to 65535")]
    WeightValue { entry: String, weight: String },
    #[error("weight entry {entry:?}: {ip} is listed more than once")]
    WeightDuplicate { entry: String, ip: IpAddr },
    #[error("{0:?} is not a whole number")]
    NotANumber(String),
    /// Breaks `lb_api::validate`'s rule for a table (prime, at most 2^24,
    /// room for at least one backend).
    #[error("{0}")]
    TableSize(String),
    #[error("unknown mode {0:?} (expected l4 or grpc)")]
    UnknownMode(String),
    #[error("timeout {0} s is out of range (expected 1-86400)")]
    TimeoutRange(u64),
    #[error("unknown health check kind {0:?} (expected grpc or tcp)")]
    UnknownHealthCheck(String),
    /// Breaks a health check rule of `lb_api::validate` (range, format).
    #[error("{0}")]
    HealthValue(String),
    #[error("has no effect without rpclb.io/health-check")]
    NoHealthCheck,
    /// Breaks a retry policy rule of `lb_api::validate` (range, format).
    #[error("{0}")]
    RetryValue(String),
    #[error("has no effect without rpclb.io/grpc-retry-max-attempts")]
    NoRetry,
    #[error("has no effect without rpclb.io/mode: grpc")]
    NoGrpcMode,
    /// Breaks an outlier detection rule of `lb_api::validate`.
    #[error("{0}")]
    OutlierValue(String),
    #[error("unknown balancing {0:?} (expected p2c or orca_wrr)")]
    UnknownBalancing(String),
    /// Breaks an `orca_wrr` rule of `lb_api::validate` (range, format).
    #[error("{0}")]
    BalancingValue(String),
    #[error("has no effect without rpclb.io/grpc-balancing: orca_wrr")]
    NoOrcaWrr,
    /// A TLS annotation's value: not a Secret name or a server name.
    #[error("{0}")]
    TlsValue(String),
    /// A TLS annotation that needs another (named) one.
    #[error("has no effect without {0}")]
    NeedsAnnotation(&'static str),
    /// Breaks a locality rule of `lb_api::validate` (tiers, range).
    #[error("{0}")]
    LocalityValue(String),
    /// A `rpclb.io/headers` line that is not a header, or breaks the rule of
    /// `lb_api::validate::added_headers`.
    #[error("{0}")]
    HeaderValue(String),
    /// Breaks `lb_api::validate::qos_limit` (1-1000000).
    #[error("{0}")]
    QosValue(String),
    /// `rpclb.io/selector`: breaks `lb_api::validate::selector`, is a path,
    /// or names a selector the port cannot have (IPv6, gRPC mode, more
    /// than 16 backends: `Service::validate_selector`).
    #[error("{0}")]
    SelectorValue(String),
    /// Breaks `lb_api::validate::weight` (0-65535).
    #[error("{0:?} is not a weight from 0 to 65535")]
    WeightRange(String),
    #[error("unknown rpclb.io annotation on a Pod (known on Pods: rpclb.io/weight, rpclb.io/max)")]
    UnknownPodKey,
}

/// A Pod's own settings as a backend, from its annotations
/// ([`POD_WEIGHT`], [`POD_MAX`]); `None`: not set (or invalid).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    pub weight: Option<u32>,
    pub max: Option<u32>,
}

/// Reads a Pod's `rpclb.io/` annotations.
///
/// Never fails: each invalid value (and each unknown `rpclb.io/` key) is
/// reported in the returned list, in key order, and ignored.
pub fn parse_pod_annotations(
    annotations: &BTreeMap<String, String>,
) -> (PodPolicy, Vec<AnnotationError>) {
    let mut policy = PodPolicy::default();
    let mut errors = Vec::new();
    for (key, value) in annotations {
        if !key.starts_with(PREFIX) {
            continue;
        }
        let r = match key.as_str() {
            POD_WEIGHT => parse_weight(value).map(|w| policy.weight = Some(w)),
            POD_MAX => parse_qos_limit(value).map(|n| policy.max = Some(n)),
            _ => Err(vec![AnnotationProblem::UnknownPodKey]),
        };
        if let Err(problems) = r {
            errors.extend(problems.into_iter().map(|problem| AnnotationError {
                key: key.clone(),
                value: value.clone(),
                problem,
            }));
        }
    }
    (policy, errors)
}

/// One weight (`rpclb.io/weight` on a Pod): 0-65535, by `validate::weight`.
fn parse_weight(value: &str) -> Result<u32, Vec<AnnotationProblem>> {
    let n = parse_u32(value)?;
    validate::weight(n)
        .map(|()| n)
        .map_err(|_| vec![AnnotationProblem::WeightRange(value.trim().to_string())])
}

/// Reads a Service's policy from its annotations.
///
/// Never fails: each invalid annotation is reported in the returned list (in
/// key order) and its default is used.
pub fn parse_annotations(
    annotations: &BTreeMap<String, String>,
) -> (ServicePolicy, Vec<AnnotationError>) {
    let mut policy = ServicePolicy::default();
    let mut errors = Vec::new();
    let mut grpc_timeout = None;
    let mut health = HealthSettings::default();
    let mut retry = RetrySettings::default();
    let mut outlier = OutlierSettings::default();
    let mut balancing = BalancingSettings::default();
    let mut min_backends = None;
    let mut spill_outstanding = None;
    let mut headers = None;
    for (key, value) in annotations {
        if !key.starts_with(PREFIX) {
            continue;
        }
        let problems = match key.as_str() {
            ALGORITHM => parse_algorithm(value).map(|a| policy.algorithm = a),
            WEIGHTS => parse_weights(value).map(|w| policy.weights = w),
            MAGLEV_TABLE_SIZE => {
                parse_maglev_table_size(value).map(|m| policy.maglev_table_size = Some(m))
            }
            MODE => match value.trim().to_ascii_lowercase().as_str() {
                "" => Err(vec![AnnotationProblem::Empty]),
                "l4" => Ok(()),
                "grpc" => {
                    policy.grpc = Some(lb_api::GrpcPolicy::default());
                    Ok(())
                }
                _ => Err(vec![AnnotationProblem::UnknownMode(value.clone())]),
            },
            GRPC_TIMEOUT => parse_timeout(value).map(|t| grpc_timeout = Some(t)),
            HEALTH_CHECK => match value.trim().to_ascii_lowercase().as_str() {
                "" => Err(vec![AnnotationProblem::Empty]),
                v => v
                    .parse::<lb_api::HealthCheckKind>()
                    .map(|k| health.kind = Some(k))
                    .map_err(|_| vec![AnnotationProblem::UnknownHealthCheck(value.clone())]),
            },
            HEALTH_CHECK_SERVICE => validate::health_service(value)
                .map(|()| health.service = Some((key, value.clone())))
                .map_err(|e| vec![AnnotationProblem::HealthValue(e)]),
            HEALTH_CHECK_INTERVAL => parse_health_duration(value).and_then(|d| {
                validate::health_interval(d)
                    .map_err(|e| vec![AnnotationProblem::HealthValue(e)])
                    .map(|()| health.interval = Some((key, d)))
            }),
            HEALTH_CHECK_TIMEOUT => {
                parse_health_duration(value).map(|d| health.timeout = Some((key, d)))
            }
            HEALTH_CHECK_UNHEALTHY => {
                parse_threshold(value).map(|n| health.unhealthy = Some((key, n)))
            }
            HEALTH_CHECK_HEALTHY => parse_threshold(value).map(|n| health.healthy = Some((key, n))),
            k if k.starts_with("rpclb.io/grpc-retry-") && KNOWN.contains(&k) => {
                retry.parse(key, value)
            }
            k if k.starts_with("rpclb.io/grpc-outlier-") && KNOWN.contains(&k) => {
                outlier.parse(key, value)
            }
            k if k.starts_with(GRPC_BALANCING) && KNOWN.contains(&k) => balancing.parse(key, value),
            GRPC_TLS_SECRET => secret_name(value).map(|v| policy.tls.listen = Some(v)),
            GRPC_TLS_CLIENT_CA_SECRET => secret_name(value).map(|v| policy.tls.client_ca = Some(v)),
            GRPC_UPSTREAM_TLS_CA_SECRET => {
                secret_name(value).map(|v| policy.tls.upstream_ca = Some(v))
            }
            GRPC_UPSTREAM_TLS_SECRET => {
                secret_name(value).map(|v| policy.tls.upstream_cert = Some(v))
            }
            GRPC_UPSTREAM_TLS_SERVER_NAME => match value.trim() {
                "" => Err(vec![AnnotationProblem::Empty]),
                v => validate::tls_server_name(v)
                    .map(|()| policy.tls.server_name = Some(v.to_string()))
                    .map_err(|e| vec![AnnotationProblem::TlsValue(e)]),
            },
            LOCALITY => parse_locality(value).map(|l| policy.locality = Some(l)),
            LOCALITY_MIN_BACKENDS => parse_min_backends(value).map(|n| min_backends = Some(n)),
            LOCALITY_SPILL_OUTSTANDING => {
                parse_spill_outstanding(value).map(|n| spill_outstanding = Some(n))
            }
            HEADERS => parse_headers(value).map(|h| headers = Some(h)),
            MAX_PER_BACKEND => parse_qos_limit(value).map(|n| policy.max_per_backend = Some(n)),
            SELECTOR => parse_selector(value).map(|v| policy.selector = Some(v)),
            _ => Err(vec![AnnotationProblem::UnknownKey]),
        };
        if let Err(problems) = problems {
            errors.extend(problems.into_iter().map(|problem| AnnotationError {
                key: key.clone(),
                value: value.clone(),
                problem,
            }));
        }
    }
    if let (Some(g), Some(t)) = (policy.grpc.as_mut(), grpc_timeout) {
        g.default_timeout = t;
    }
    policy.health_check = health.build(annotations, &mut errors);
    retry.build(policy.grpc.as_mut(), annotations, &mut errors);
    outlier.build(policy.grpc.as_mut(), annotations, &mut errors);
    balancing.build(policy.grpc.as_mut(), annotations, &mut errors);
    tls_needs(&mut policy, annotations, &mut errors);
    let mut need = |key: &str, problem| {
        errors.push(AnnotationError {
            key: key.to_string(),
            value: annotations.get(key).cloned().unwrap_or_default(),
            problem,
        })
    };
    match (policy.locality.as_mut(), min_backends) {
        (Some(l), Some(n)) => l.min_backends = n,
        (None, Some(_)) => need(
            LOCALITY_MIN_BACKENDS,
            AnnotationProblem::NeedsAnnotation(LOCALITY),
        ),
        _ => {}
    }
    match (policy.locality.as_mut(), spill_outstanding) {
        (_, None) => {}
        (None, Some(_)) => need(
            LOCALITY_SPILL_OUTSTANDING,
            AnnotationProblem::NeedsAnnotation(LOCALITY),
        ),
        (Some(_), Some(_)) if policy.grpc.is_none() => {
            need(LOCALITY_SPILL_OUTSTANDING, AnnotationProblem::NoGrpcMode)
        }
        (Some(l), Some(n)) => l.spill_outstanding = Some(n),
    }
    match (policy.grpc.as_mut(), headers) {
        (Some(g), Some(h)) => g.add_headers = h,
        (None, Some(_)) => need(HEADERS, AnnotationProblem::NoGrpcMode),
        _ => {}
    }
    errors.sort_by(|a, b| a.key.cmp(&b.key));
    (policy, errors)
}

/// The `rpclb.io/health-check*` values that parsed, with their keys.
#[derive(Default)]
struct HealthSettings<'a> {
    kind: Option<lb_api::HealthCheckKind>,
    service: Option<(&'a String, String)>,
    interval: Option<(&'a String, std::time::Duration)>,
    timeout: Option<(&'a String, std::time::Duration)>,
    unhealthy: Option<(&'a String, u32)>,
    healthy: Option<(&'a String, u32)>,
}

impl HealthSettings<'_> {
    /// The check, with the rules that span settings (a settings without a
    /// check, a service name on a tcp check, a timeout above the interval)
    /// reported into `errors`.
    fn build(
        self,
        annotations: &BTreeMap<String, String>,
        errors: &mut Vec<AnnotationError>,
    ) -> Option<lb_api::HealthCheck> {
        let mut report = |key: &String, problem| {
            errors.push(AnnotationError {
                key: key.clone(),
                value: annotations.get(key).cloned().unwrap_or_default(),
                problem,
            })
        };
        let Some(kind) = self.kind else {
            let keys = [
                self.service.map(|s| s.0),
                self.interval.map(|s| s.0),
                self.timeout.map(|s| s.0),
                self.unhealthy.map(|s| s.0),
                self.healthy.map(|s| s.0),
            ];
            for k in keys.into_iter().flatten() {
                report(k, AnnotationProblem::NoHealthCheck);
            }
            return None;
        };
        let mut h = lb_api::HealthCheck::new(kind);
        if let Some((k, s)) = self.service {
            if kind == lb_api::HealthCheckKind::Tcp && !s.is_empty() {
                report(
                    k,
                    AnnotationProblem::HealthValue(
                        "a service name applies to grpc checks only, not tcp".into(),
                    ),
                );
            } else {
                h.service = s;
            }
        }
        if let Some((_, d)) = self.interval {
            h.interval = d;
        }
        h.timeout = h.timeout.min(h.interval);
        if let Some((k, d)) = self.timeout {
            match validate::health_timeout(d, h.interval) {
                Ok(()) => h.timeout = d,
                Err(e) => report(k, AnnotationProblem::HealthValue(e)),
            }
        }
        if let Some((_, n)) = self.unhealthy {
            h.unhealthy_threshold = n;
        }
        if let Some((_, n)) = self.healthy {
            h.healthy_threshold = n;
        }
        Some(h)
    }
}

/// One parsed `rpclb.io/grpc-retry-*` setting (other than max attempts).
#[derive(Clone, Debug)]
enum RetrySetting {
    // In the order they are applied: a maximum before what it bounds.
    MaxBackoff(std::time::Duration),
    InitialBackoff(std::time::Duration),
    Multiplier(u32),
    Codes(Vec<u32>),
    MaxTokens(u32),
    TokenRatio(u32),
}

impl RetrySetting {
    fn rank(&self) -> u8 {
        match self {
            RetrySetting::MaxBackoff(_) => 0,
            RetrySetting::InitialBackoff(_) => 1,
            RetrySetting::Multiplier(_) => 2,
            RetrySetting::Codes(_) => 3,
            RetrySetting::MaxTokens(_) => 4,
            RetrySetting::TokenRatio(_) => 5,
        }
    }

    fn apply(&self, r: &mut lb_api::RetryPolicy) {
        let throttle = |r: &mut lb_api::RetryPolicy| {
            *r.throttle
                .get_or_insert_with(lb_api::RetryThrottle::default)
        };
        match self {
            RetrySetting::MaxBackoff(d) => r.max_backoff = *d,
            RetrySetting::InitialBackoff(d) => r.initial_backoff = *d,
            RetrySetting::Multiplier(m) => r.backoff_multiplier_milli = *m,
            RetrySetting::Codes(c) => r.retryable_status_codes = c.clone(),
            RetrySetting::MaxTokens(n) => {
                let t = throttle(r);
                r.throttle = Some(lb_api::RetryThrottle {
                    max_tokens: *n,
                    ..t
                });
            }
            RetrySetting::TokenRatio(n) => {
                let t = throttle(r);
                r.throttle = Some(lb_api::RetryThrottle {
                    token_ratio_milli: *n,
                    ..t
                });
            }
        }
    }
}

/// The `rpclb.io/grpc-retry-*` values that parsed, with their keys.
#[derive(Default)]
struct RetrySettings<'a> {
    max_attempts: Option<(&'a String, u32)>,
    rest: Vec<(&'a String, RetrySetting)>,
}

impl<'a> RetrySettings<'a> {
    fn parse(&mut self, key: &'a String, value: &str) -> Result<(), Vec<AnnotationProblem>> {
        let v = value.trim();
        if v.is_empty() {
            return Err(vec![AnnotationProblem::Empty]);
        }
        let bad = |e: String| vec![AnnotationProblem::RetryValue(e)];
        let number = || parse_u32(v);
        let setting = match key.as_str() {
            GRPC_RETRY_MAX_ATTEMPTS => {
                let n = number()?;
                validate::retry_policy(&lb_api::RetryPolicy::new(n)).map_err(|(_, e)| bad(e))?;
                self.max_attempts = Some((key, n));
                return Ok(());
            }
            GRPC_RETRY_STATUS_CODES => {
                let mut codes = v
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(lb_api::parse_status_code)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(bad)?;
                codes.sort_unstable();
                codes.dedup();
                RetrySetting::Codes(codes)
            }
            GRPC_RETRY_INITIAL_BACKOFF => {
                RetrySetting::InitialBackoff(validate::parse_duration(v).map_err(bad)?)
            }
            GRPC_RETRY_MAX_BACKOFF => {
                RetrySetting::MaxBackoff(validate::parse_duration(v).map_err(bad)?)
            }
            GRPC_RETRY_BACKOFF_MULTIPLIER => {
                RetrySetting::Multiplier(validate::parse_milli(v).map_err(bad)?)
            }
            GRPC_RETRY_MAX_TOKENS => RetrySetting::MaxTokens(number()?),
            GRPC_RETRY_TOKEN_RATIO => {
                RetrySetting::TokenRatio(validate::parse_milli(v).map_err(bad)?)
            }
            _ => return Err(vec![AnnotationProblem::UnknownKey]),
        };
        self.rest.push((key, setting));
        Ok(())
    }

    /// The policy into `grpc`: each setting is kept only if the policy with
    /// it passes `lb_api::validate::retry_policy`; the others, and every
    /// setting without max attempts or the gRPC mode, are reported.
    fn build(
        mut self,
        grpc: Option<&mut lb_api::GrpcPolicy>,
        annotations: &BTreeMap<String, String>,
        errors: &mut Vec<AnnotationError>,
    ) {
        let mut report = |key: &String, problem| {
            errors.push(AnnotationError {
                key: key.clone(),
                value: annotations.get(key).cloned().unwrap_or_default(),
                problem,
            })
        };
        let keys = self
            .max_attempts
            .iter()
            .map(|m| m.0)
            .chain(self.rest.iter().map(|r| r.0));
        let Some(grpc) = grpc else {
            for k in keys {
                report(k, AnnotationProblem::NoGrpcMode);
            }
            return;
        };
        let Some((_, n)) = self.max_attempts else {
            for k in keys {
                report(k, AnnotationProblem::NoRetry);
            }
            return;
        };
        let mut r = lb_api::RetryPolicy::new(n);
        self.rest.sort_by_key(|(_, s)| s.rank());
        for (k, s) in &self.rest {
            let mut next = r.clone();
            s.apply(&mut next);
            match validate::retry_policy(&next) {
                Ok(()) => r = next,
                Err((_, e)) => report(k, AnnotationProblem::RetryValue(e)),
            }
        }
        grpc.retry = Some(r);
    }
}

/// The `rpclb.io/grpc-outlier-*` values that parsed, with their keys; the
/// keys seen (valid or not), which turn outlier ejection on.
#[derive(Default)]
struct OutlierSettings<'a> {
    seen: Vec<&'a String>,
    consecutive: Option<u32>,
    base: Option<std::time::Duration>,
    max: Option<(&'a String, std::time::Duration)>,
    percent: Option<u32>,
}

impl<'a> OutlierSettings<'a> {
    fn parse(&mut self, key: &'a String, value: &str) -> Result<(), Vec<AnnotationProblem>> {
        self.seen.push(key);
        let v = value.trim();
        if v.is_empty() {
            return Err(vec![AnnotationProblem::Empty]);
        }
        let bad =
            |(_, e): (validate::OutlierField, String)| vec![AnnotationProblem::OutlierValue(e)];
        let number = || parse_u32(v);
        let duration =
            || validate::parse_duration(v).map_err(|e| vec![AnnotationProblem::OutlierValue(e)]);
        let d = lb_api::OutlierDetection::default();
        match key.as_str() {
            GRPC_OUTLIER_CONSECUTIVE_FAILURES => {
                let n = number()?;
                validate::outlier_detection(&lb_api::OutlierDetection {
                    consecutive_failures: n,
                    ..d
                })
                .map_err(bad)?;
                self.consecutive = Some(n);
            }
            GRPC_OUTLIER_MAX_EJECTION_PERCENT => {
                let n = number()?;
                validate::outlier_detection(&lb_api::OutlierDetection {
                    max_ejection_percent: n,
                    ..d
                })
                .map_err(bad)?;
                self.percent = Some(n);
            }
            GRPC_OUTLIER_BASE_EJECTION_TIME => {
                let t = duration()?;
                validate::outlier_detection(&lb_api::OutlierDetection {
                    base_ejection_time: t,
                    max_ejection_time: t,
                    ..d
                })
                .map_err(bad)?;
                self.base = Some(t);
            }
            GRPC_OUTLIER_MAX_EJECTION_TIME => {
                let t = duration()?;
                validate::outlier_detection(&lb_api::OutlierDetection {
                    base_ejection_time: t,
                    max_ejection_time: t,
                    ..d
                })
                .map_err(bad)?;
                self.max = Some((key, t));
            }
            _ => return Err(vec![AnnotationProblem::UnknownKey]),
        }
        Ok(())
    }

    /// Outlier ejection into `grpc` when any key was seen: the defaults with
    /// the valid settings; a maximum below the base is reported (the base
    /// then bounds it). Without the gRPC mode each key is reported.
    fn build(
        self,
        grpc: Option<&mut lb_api::GrpcPolicy>,
        annotations: &BTreeMap<String, String>,
        errors: &mut Vec<AnnotationError>,
    ) {
        if self.seen.is_empty() {
            return;
        }
        let mut report = |key: &String, problem| {
            errors.push(AnnotationError {
                key: key.clone(),
                value: annotations.get(key).cloned().unwrap_or_default(),
                problem,
            })
        };
        let Some(grpc) = grpc else {
            for k in self.seen {
                report(k, AnnotationProblem::NoGrpcMode);
            }
            return;
        };
        let mut o = lb_api::OutlierDetection::default();
        if let Some(n) = self.consecutive {
            o.consecutive_failures = n;
        }
        if let Some(n) = self.percent {
            o.max_ejection_percent = n;
        }
        if let Some(t) = self.base {
            o.base_ejection_time = t;
            o.max_ejection_time = o.max_ejection_time.max(t);
        }
        if let Some((k, t)) = self.max {
            let next = lb_api::OutlierDetection {
                max_ejection_time: t,
                ..o
            };
            match validate::outlier_detection(&next) {
                Ok(()) => o = next,
                Err((_, e)) => report(k, AnnotationProblem::OutlierValue(e)),
            }
        }
        grpc.outlier_detection = Some(o);
    }
}

/// One parsed orca_wrr setting: what it changes.
type OrcaSetting = Box<dyn Fn(&mut lb_api::OrcaWrr)>;

/// The `rpclb.io/grpc-balancing*` values that parsed, with their keys.
#[derive(Default)]
struct BalancingSettings<'a> {
    /// `true`: orca_wrr.
    wrr: Option<(&'a String, bool)>,
    /// The orca_wrr settings, each applied to a policy.
    rest: Vec<(&'a String, OrcaSetting)>,
}

impl<'a> BalancingSettings<'a> {
    fn parse(&mut self, key: &'a String, value: &str) -> Result<(), Vec<AnnotationProblem>> {
        let v = value.trim();
        if v.is_empty() {
            return Err(vec![AnnotationProblem::Empty]);
        }
        let bad = |e: String| vec![AnnotationProblem::BalancingValue(e)];
        let duration = || validate::parse_duration(v).map_err(bad);
        let set: OrcaSetting = match key.as_str() {
            GRPC_BALANCING => {
                let wrr = match v.to_ascii_lowercase().as_str() {
                    "p2c" => false,
                    "orca_wrr" | "orca-wrr" => true,
                    _ => return Err(vec![AnnotationProblem::UnknownBalancing(v.to_string())]),
                };
                self.wrr = Some((key, wrr));
                return Ok(());
            }
            GRPC_BALANCING_BLACKOUT => {
                let d = duration()?;
                Box::new(move |w| w.blackout_period = d)
            }
            GRPC_BALANCING_EXPIRATION => {
                let d = duration()?;
                Box::new(move |w| w.weight_expiration_period = d)
            }
            GRPC_BALANCING_UPDATE => {
                let d = duration()?;
                Box::new(move |w| w.weight_update_period = d)
            }
            GRPC_BALANCING_PENALTY => {
                let m = validate::parse_milli(v).map_err(bad)?;
                Box::new(move |w| w.error_utilization_penalty_milli = m)
            }
            _ => return Err(vec![AnnotationProblem::UnknownKey]),
        };
        self.rest.push((key, set));
        Ok(())
    }

    /// The balancing into `grpc`: each orca_wrr setting is kept only if
    /// the settings with it pass `lb_api::validate::orca_wrr`; the others,
    /// and every setting without the gRPC mode or orca_wrr, are reported.
    fn build(
        self,
        grpc: Option<&mut lb_api::GrpcPolicy>,
        annotations: &BTreeMap<String, String>,
        errors: &mut Vec<AnnotationError>,
    ) {
        let mut report = |key: &String, problem| {
            errors.push(AnnotationError {
                key: key.clone(),
                value: annotations.get(key).cloned().unwrap_or_default(),
                problem,
            })
        };
        let Some(grpc) = grpc else {
            for k in self
                .wrr
                .iter()
                .map(|w| w.0)
                .chain(self.rest.iter().map(|r| r.0))
            {
                report(k, AnnotationProblem::NoGrpcMode);
            }
            return;
        };
        if !self.wrr.is_some_and(|w| w.1) {
            for (k, _) in &self.rest {
                report(k, AnnotationProblem::NoOrcaWrr);
            }
            return;
        }
        let mut w = lb_api::OrcaWrr::default();
        for (k, set) in &self.rest {
            let mut next = w;
            set(&mut next);
            match validate::orca_wrr(&next) {
                Ok(()) => w = next,
                Err((_, e)) => report(k, AnnotationProblem::BalancingValue(e)),
            }
        }
        grpc.balancing = lb_api::Balancing::OrcaWrr(w);
    }
}

/// Drops (and reports) each TLS annotation whose prerequisite is missing:
/// the gRPC mode for all; the listener's Secret for the client CA; the
/// upstream CA for the upstream certificate and server name.
fn tls_needs(
    policy: &mut ServicePolicy,
    annotations: &BTreeMap<String, String>,
    errors: &mut Vec<AnnotationError>,
) {
    let mut report = |key: &'static str, problem| {
        errors.push(AnnotationError {
            key: key.to_string(),
            value: annotations.get(key).cloned().unwrap_or_default(),
            problem,
        })
    };
    let t = &mut policy.tls;
    if policy.grpc.is_none() {
        let all = [
            (GRPC_TLS_SECRET, t.listen.take()),
            (GRPC_TLS_CLIENT_CA_SECRET, t.client_ca.take()),
            (GRPC_UPSTREAM_TLS_CA_SECRET, t.upstream_ca.take()),
            (GRPC_UPSTREAM_TLS_SECRET, t.upstream_cert.take()),
            (GRPC_UPSTREAM_TLS_SERVER_NAME, t.server_name.take()),
        ];
        for (k, _) in all.into_iter().filter(|(_, v)| v.is_some()) {
            report(k, AnnotationProblem::NoGrpcMode);
        }
        return;
    }
    if t.listen.is_none() && t.client_ca.take().is_some() {
        report(
            GRPC_TLS_CLIENT_CA_SECRET,
            AnnotationProblem::NeedsAnnotation(GRPC_TLS_SECRET),
        );
    }
    if t.upstream_ca.is_none() {
        for (k, v) in [
            (GRPC_UPSTREAM_TLS_SECRET, t.upstream_cert.take()),
            (GRPC_UPSTREAM_TLS_SERVER_NAME, t.server_name.take()),
        ] {
            if v.is_some() {
                report(
                    k,
                    AnnotationProblem::NeedsAnnotation(GRPC_UPSTREAM_TLS_CA_SECRET),
                );
            }
        }
    }
}

fn parse_health_duration(value: &str) -> Result<std::time::Duration, Vec<AnnotationProblem>> {
    if value.trim().is_empty() {
        return Err(vec![AnnotationProblem::Empty]);
    }
    validate::parse_duration(value).map_err(|e| vec![AnnotationProblem::HealthValue(e)])
}

fn parse_threshold(value: &str) -> Result<u32, Vec<AnnotationProblem>> {
    let n = parse_u32(value)?;
    validate::health_threshold(n)
        .map(|()| n)
        .map_err(|e| vec![AnnotationProblem::HealthValue(e)])
}

fn parse_timeout(value: &str) -> Result<std::time::Duration, Vec<AnnotationProblem>> {
    let v = value.trim();
    if v.is_empty() {
        return Err(vec![AnnotationProblem::Empty]);
    }
    let n: u64 = v
        .parse()
        .map_err(|_| vec![AnnotationProblem::NotANumber(v.to_string())])?;
    if n == 0 || n > 86_400 {
        return Err(vec![AnnotationProblem::TimeoutRange(n)]);
    }
    Ok(std::time::Duration::from_secs(n))
}

fn parse_algorithm(value: &str) -> Result<Algorithm, Vec<AnnotationProblem>> {
    let v = value.trim();
    if v.is_empty() {
        return Err(vec![AnnotationProblem::Empty]);
    }
    v.to_ascii_lowercase()
        .parse()
        .map_err(|_| vec![AnnotationProblem::UnknownAlgorithm(v.to_string())])
}

fn parse_weights(value: &str) -> Result<BTreeMap<IpAddr, u32>, Vec<AnnotationProblem>> {
    if value.trim().is_empty() {
        return Err(vec![AnnotationProblem::Empty]);
    }
    let mut weights = BTreeMap::new();
    let mut problems = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((ip, weight)) = entry.split_once('=') else {
            problems.push(AnnotationProblem::WeightSyntax {
                entry: entry.to_string(),
            });
            continue;
        };
        let (ip, weight) = (ip.trim(), weight.trim());
        let Ok(addr) = ip.parse::<IpAddr>() else {
            problems.push(AnnotationProblem::WeightIp {
                entry: entry.to_string(),
                ip: ip.to_string(),
            });
            continue;
        };
        let Some(w) = weight
            .parse::<u32>()
            .ok()
            .filter(|&w| validate::weight(w).is_ok() && !weight.starts_with('+'))
        else {
            problems.push(AnnotationProblem::WeightValue {
                entry: entry.to_string(),
                weight: weight.to_string(),
            });
            continue;
        };
        if weights.insert(addr, w).is_some() {
            problems.push(AnnotationProblem::WeightDuplicate {
                entry: entry.to_string(),
                ip: addr,
            });
        }
    }
    if problems.is_empty() {
        Ok(weights)
    } else {
        Err(problems)
    }
}

fn parse_maglev_table_size(value: &str) -> Result<u32, Vec<AnnotationProblem>> {
    let m = parse_u32(value)?;
    validate::maglev_table_size(m)
        .and_then(|()| validate::maglev_fits(m, 1))
        .map(|()| m)
        .map_err(|e| vec![AnnotationProblem::TableSize(e)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_retry_annotations() {
        use lb_api::{RetryPolicy, RetryThrottle};
        use std::time::Duration;
        let retry = |pairs: &[(&str, &str)]| {
            let (p, e) = parse(pairs);
            (p.grpc.and_then(|g| g.retry), e)
        };
        let (r, e) = retry(&[(MODE, "grpc"), (GRPC_RETRY_MAX_ATTEMPTS, "3")]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(r, Some(RetryPolicy::new(3)));
        let (r, e) = retry(&[
            (MODE, "grpc"),
            (GRPC_RETRY_MAX_ATTEMPTS, "5"),
            (
                GRPC_RETRY_STATUS_CODES,
                "unavailable, RESOURCE_EXHAUSTED,14",
            ),
            (GRPC_RETRY_INITIAL_BACKOFF, "2s"),
            (GRPC_RETRY_MAX_BACKOFF, "10s"),
            (GRPC_RETRY_BACKOFF_MULTIPLIER, "1.5"),
            (GRPC_RETRY_TOKEN_RATIO, "0.5"),
        ]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            r,
            Some(RetryPolicy {
                max_attempts: 5,
                initial_backoff: Duration::from_secs(2),
                max_backoff: Duration::from_secs(10),
                backoff_multiplier_milli: 1500,
                retryable_status_codes: vec![8, 14],
                throttle: Some(RetryThrottle {
                    max_tokens: 10,
                    token_ratio_milli: 500,
                }),
            })
        );
        // Invalid settings: one error each, the default kept.
        let (r, e) = retry(&[
            (MODE, "grpc"),
            (GRPC_RETRY_MAX_ATTEMPTS, "3"),
            (GRPC_RETRY_STATUS_CODES, "UNAVAILBLE"),
            (GRPC_RETRY_INITIAL_BACKOFF, "5s"),
            (GRPC_RETRY_MAX_TOKENS, "0"),
        ]);
        assert_eq!(r, Some(RetryPolicy::new(3)));
        let text: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "invalid annotation rpclb.io/grpc-retry-initial-backoff=\"5s\": max_backoff 1s is below initial_backoff 5s; using the default initial backoff (100ms)",
                "invalid annotation rpclb.io/grpc-retry-max-tokens=\"0\": max_tokens 0 is out of range (expected 1-1000); using the default retry throttle tokens (10, or none)",
                "invalid annotation rpclb.io/grpc-retry-status-codes=\"UNAVAILBLE\": unknown gRPC status code \"UNAVAILBLE\" (expected a name like UNAVAILABLE); retrying UNAVAILABLE only",
            ]
        );
        let (r, e) = retry(&[(MODE, "grpc"), (GRPC_RETRY_MAX_ATTEMPTS, "6")]);
        assert_eq!(r, None);
        assert_eq!(
            e[0].to_string(),
            "invalid annotation rpclb.io/grpc-retry-max-attempts=\"6\": max_attempts 6 is out of range (expected 2-5, the first attempt included); no retry policy"
        );
        // Settings without max attempts, or without the gRPC mode.
        assert_eq!(
            problems(&[(MODE, "grpc"), (GRPC_RETRY_STATUS_CODES, "UNAVAILABLE")]),
            [AnnotationProblem::NoRetry]
        );
        assert_eq!(
            problems(&[
                (GRPC_RETRY_MAX_ATTEMPTS, "2"),
                (GRPC_RETRY_TOKEN_RATIO, "1")
            ]),
            [AnnotationProblem::NoGrpcMode, AnnotationProblem::NoGrpcMode]
        );
    }

    #[test]
    fn grpc_balancing_annotations() {
        use lb_api::{Balancing, OrcaWrr};
        use std::time::Duration;
        let balancing = |pairs: &[(&str, &str)]| {
            let (p, e) = parse(pairs);
            (p.grpc.map(|g| g.balancing), e)
        };
        let (b, e) = balancing(&[(MODE, "grpc")]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(b, Some(Balancing::P2c));
        let (b, e) = balancing(&[(MODE, "grpc"), (GRPC_BALANCING, " ORCA_WRR ")]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(b, Some(Balancing::OrcaWrr(OrcaWrr::default())));
        let (b, e) = balancing(&[
            (MODE, "grpc"),
            (GRPC_BALANCING, "orca-wrr"),
            (GRPC_BALANCING_BLACKOUT, "0"),
            (GRPC_BALANCING_EXPIRATION, "1m"),
            (GRPC_BALANCING_UPDATE, "200ms"),
            (GRPC_BALANCING_PENALTY, "0.5"),
        ]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            b,
            Some(Balancing::OrcaWrr(OrcaWrr {
                blackout_period: Duration::ZERO,
                weight_expiration_period: Duration::from_secs(60),
                weight_update_period: Duration::from_millis(200),
                error_utilization_penalty_milli: 500,
            }))
        );
        // Bad settings are reported; the good ones stay.
        let (b, e) = balancing(&[
            (MODE, "grpc"),
            (GRPC_BALANCING, "orca_wrr"),
            (GRPC_BALANCING_BLACKOUT, "2h"),
            (GRPC_BALANCING_UPDATE, "10ms"),
            (GRPC_BALANCING_PENALTY, "-1"),
            (GRPC_BALANCING_EXPIRATION, "30s"),
        ]);
        assert_eq!(
            b,
            Some(Balancing::OrcaWrr(OrcaWrr {
                weight_expiration_period: Duration::from_secs(30),
                ..OrcaWrr::default()
            }))
        );
        let text: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "invalid annotation rpclb.io/grpc-balancing-blackout-period=\"2h\": blackout_period 7200s is out of range (expected 0ns to 3600s); using the default blackout period (10s)",
                "invalid annotation rpclb.io/grpc-balancing-error-utilization-penalty=\"-1\": \"-1\" is not a number with at most 3 decimals (e.g. 1.5); using the default error utilization penalty (1)",
                "invalid annotation rpclb.io/grpc-balancing-weight-update-period=\"10ms\": weight_update_period 10ms is out of range (expected 100ms to 60s); using the default weight update period (1s)",
            ]
        );
        let (b, e) = balancing(&[(MODE, "grpc"), (GRPC_BALANCING, "wrr")]);
        assert_eq!(b, Some(Balancing::P2c));
        assert_eq!(
            e[0].to_string(),
            "invalid annotation rpclb.io/grpc-balancing=\"wrr\": unknown balancing \"wrr\" (expected p2c or orca_wrr); using p2c balancing"
        );
        assert_eq!(
            problems(&[
                (MODE, "grpc"),
                (GRPC_BALANCING, "p2c"),
                (GRPC_BALANCING_BLACKOUT, "1s")
            ]),
            [AnnotationProblem::NoOrcaWrr]
        );
        assert_eq!(
            problems(&[(GRPC_BALANCING, "orca_wrr"), (GRPC_BALANCING_UPDATE, "1s")]),
            [AnnotationProblem::NoGrpcMode, AnnotationProblem::NoGrpcMode]
        );
    }

    #[test]
    fn health_check_annotations() {
        use lb_api::{HealthCheck, HealthCheckKind};
        use std::time::Duration;
        let (p, e) = parse(&[(HEALTH_CHECK, "TCP")]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.health_check, Some(HealthCheck::new(HealthCheckKind::Tcp)));
        let (p, e) = parse(&[
            (HEALTH_CHECK, "grpc"),
            (HEALTH_CHECK_SERVICE, "shop.Cart"),
            (HEALTH_CHECK_INTERVAL, "500ms"),
            (HEALTH_CHECK_UNHEALTHY, "2"),
            (HEALTH_CHECK_HEALTHY, "1"),
        ]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            p.health_check,
            Some(HealthCheck {
                kind: HealthCheckKind::Grpc,
                service: "shop.Cart".into(),
                interval: Duration::from_millis(500),
                // The default 1 s, cut to the interval.
                timeout: Duration::from_millis(500),
                unhealthy_threshold: 2,
                healthy_threshold: 1,
            })
        );
        // Each bad setting: reported once, its default used, the check on.
        let (p, e) = parse(&[
            (HEALTH_CHECK, "grpc"),
            (HEALTH_CHECK_INTERVAL, "10 parsecs"),
            (HEALTH_CHECK_TIMEOUT, "9s"),
            (HEALTH_CHECK_UNHEALTHY, "0"),
            (HEALTH_CHECK_HEALTHY, "many"),
            (HEALTH_CHECK_SERVICE, "a b"),
        ]);
        assert_eq!(p.health_check, Some(HealthCheck::default()));
        let got: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            vec![
                "invalid annotation rpclb.io/health-check-healthy-threshold=\"many\": \"many\" is not a whole number; using the default healthy threshold (2)",
                "invalid annotation rpclb.io/health-check-interval=\"10 parsecs\": unknown unit \"parsecs\" in \"10 parsecs\" (use ms, s, m or h); using the default interval (5s)",
                "invalid annotation rpclb.io/health-check-service=\"a b\": service name \"a b\" must be visible ASCII without spaces; checking the whole server (empty service name)",
                "invalid annotation rpclb.io/health-check-timeout=\"9s\": timeout 9s is out of range (expected 10ms up to the interval, 5s); using the default timeout (1s, or the interval if shorter)",
                "invalid annotation rpclb.io/health-check-unhealthy-threshold=\"0\": threshold 0 is out of range (expected 1-100 checks in a row); using the default unhealthy threshold (3)",
            ]
        );
        // Settings without the check; an unknown kind.
        let (p, e) = parse(&[(HEALTH_CHECK, "http"), (HEALTH_CHECK_INTERVAL, "1s")]);
        assert!(p.health_check.is_none());
        assert_eq!(
            e.iter().map(|e| e.problem.clone()).collect::<Vec<_>>(),
            vec![
                AnnotationProblem::UnknownHealthCheck("http".into()),
                AnnotationProblem::NoHealthCheck,
            ]
        );
        assert_eq!(e[0].fallback(), "no health checks");
        // A service name on a tcp check.
        let (p, e) = parse(&[(HEALTH_CHECK, "tcp"), (HEALTH_CHECK_SERVICE, "x")]);
        assert_eq!(p.health_check, Some(HealthCheck::new(HealthCheckKind::Tcp)));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, HEALTH_CHECK_SERVICE);
    }

    #[test]
    fn grpc_outlier_annotations() {
        use std::time::Duration;
        let od = |pairs: &[(&str, &str)]| {
            let (p, e) = parse(pairs);
            (p.grpc.and_then(|g| g.outlier_detection), e)
        };
        // Off unless an outlier key is given; any one turns it on.
        let (o, e) = od(&[(MODE, "grpc")]);
        assert!(o.is_none() && e.is_empty());
        let (o, e) = od(&[(MODE, "grpc"), (GRPC_OUTLIER_CONSECUTIVE_FAILURES, "3")]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            o,
            Some(lb_api::OutlierDetection {
                consecutive_failures: 3,
                ..Default::default()
            })
        );
        let (o, e) = od(&[
            (MODE, "grpc"),
            (GRPC_OUTLIER_BASE_EJECTION_TIME, "10m"),
            (GRPC_OUTLIER_MAX_EJECTION_PERCENT, "50"),
        ]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            o,
            Some(lb_api::OutlierDetection {
                base_ejection_time: Duration::from_secs(600),
                max_ejection_time: Duration::from_secs(600),
                max_ejection_percent: 50,
                ..Default::default()
            })
        );
        // Invalid values are reported; their defaults apply; still on.
        let (o, e) = od(&[
            (MODE, "grpc"),
            (GRPC_OUTLIER_CONSECUTIVE_FAILURES, "0"),
            (GRPC_OUTLIER_BASE_EJECTION_TIME, "1m"),
            (GRPC_OUTLIER_MAX_EJECTION_TIME, "10s"),
            (GRPC_OUTLIER_MAX_EJECTION_PERCENT, "lots"),
        ]);
        assert_eq!(
            e.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "invalid annotation rpclb.io/grpc-outlier-consecutive-failures=\"0\": consecutive_failures 0 is out of range (expected 1-1000); using the default consecutive failures (5)",
                "invalid annotation rpclb.io/grpc-outlier-max-ejection-percent=\"lots\": \"lots\" is not a whole number; using the default max ejection percent (10)",
                "invalid annotation rpclb.io/grpc-outlier-max-ejection-time=\"10s\": max_ejection_time 10s is below base_ejection_time 60s; using the default max ejection time (300s, or the base if longer)",
            ]
        );
        assert_eq!(
            o,
            Some(lb_api::OutlierDetection {
                base_ejection_time: Duration::from_secs(60),
                ..Default::default()
            })
        );
        // Without the gRPC mode: reported, ignored.
        assert_eq!(
            problems(&[(GRPC_OUTLIER_MAX_EJECTION_PERCENT, "50")]),
            [AnnotationProblem::NoGrpcMode]
        );
    }

    #[test]
    fn grpc_tls_annotations() {
        let (p, e) = parse(&[
            (MODE, "grpc"),
            (GRPC_TLS_SECRET, "cart-tls"),
            (GRPC_TLS_CLIENT_CA_SECRET, "clients"),
            (GRPC_UPSTREAM_TLS_CA_SECRET, "pods.ca"),
            (GRPC_UPSTREAM_TLS_SECRET, "proxy-client"),
            (GRPC_UPSTREAM_TLS_SERVER_NAME, "cart.shop.svc"),
        ]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            p.grpc_policy("shop").unwrap().tls,
            Some(lb_api::GrpcTls {
                listen: Some(lb_api::ListenTls {
                    cert: "/etc/rpclb/grpc-tls/shop/cart-tls/tls.crt".into(),
                    key: "/etc/rpclb/grpc-tls/shop/cart-tls/tls.key".into(),
                    client_ca: Some("/etc/rpclb/grpc-tls/shop/clients/ca.crt".into()),
                }),
                upstream: Some(lb_api::UpstreamTls {
                    ca: "/etc/rpclb/grpc-tls/shop/pods.ca/ca.crt".into(),
                    server_name: Some("cart.shop.svc".into()),
                    cert: Some("/etc/rpclb/grpc-tls/shop/proxy-client/tls.crt".into()),
                    key: Some("/etc/rpclb/grpc-tls/shop/proxy-client/tls.key".into()),
                }),
            })
        );
        // What the model's validation says of it: valid.
        let mut g = p.grpc_policy("shop").unwrap();
        lb_api::validate::grpc_tls(g.tls.as_ref().unwrap()).unwrap();
        // Without TLS annotations: plaintext.
        let (p, _) = parse(&[(MODE, "grpc")]);
        assert_eq!(p.grpc_policy("shop").unwrap().tls, None);
        // Bad names (a path, `..`): one error each, that side plaintext.
        let (p, e) = parse(&[
            (MODE, "grpc"),
            (GRPC_TLS_SECRET, "../../etc"),
            (GRPC_UPSTREAM_TLS_CA_SECRET, "Pods"),
        ]);
        assert_eq!(p.grpc_policy("shop").unwrap().tls, None);
        let text: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "invalid annotation rpclb.io/grpc-tls-secret=\"../../etc\": \"../../etc\" is not a Secret name (lowercase letters, digits, '-' and '.'); no TLS to clients (h2c)",
                "invalid annotation rpclb.io/grpc-upstream-tls-ca-secret=\"Pods\": \"Pods\" is not a Secret name (lowercase letters, digits, '-' and '.'); no TLS to the backends (h2c)",
            ]
        );
        let (_, e) = parse(&[
            (MODE, "grpc"),
            (GRPC_UPSTREAM_TLS_CA_SECRET, "ca"),
            (GRPC_UPSTREAM_TLS_SERVER_NAME, "a b"),
        ]);
        assert!(
            matches!(&e[..], [x] if x.to_string().contains("not a DNS name or IP address; verifying each backend's IP address")),
            "{e:?}"
        );
        // Prerequisites.
        assert_eq!(
            problems(&[(GRPC_TLS_SECRET, "a")]),
            [AnnotationProblem::NoGrpcMode]
        );
        assert_eq!(
            problems(&[
                (MODE, "grpc"),
                (GRPC_TLS_CLIENT_CA_SECRET, "a"),
                (GRPC_UPSTREAM_TLS_SERVER_NAME, "x.y")
            ]),
            [
                AnnotationProblem::NeedsAnnotation(GRPC_TLS_SECRET),
                AnnotationProblem::NeedsAnnotation(GRPC_UPSTREAM_TLS_CA_SECRET)
            ]
        );
        g.tls = None;
        assert_eq!(g, lb_api::GrpcPolicy::default());
    }

    #[test]
    fn grpc_mode_and_timeout() {
        let a = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let (p, e) = parse_annotations(&a(&[(MODE, "gRPC"), (GRPC_TIMEOUT, "5")]));
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            p.grpc.unwrap().default_timeout,
            std::time::Duration::from_secs(5)
        );
        let (p, e) = parse_annotations(&a(&[(MODE, "l4")]));
        assert!(e.is_empty() && p.grpc.is_none());
        let (p, e) = parse_annotations(&a(&[(MODE, "http"), (GRPC_TIMEOUT, "0")]));
        assert!(p.grpc.is_none());
        assert_eq!(
            e.iter().map(|e| e.problem.clone()).collect::<Vec<_>>(),
            vec![
                AnnotationProblem::TimeoutRange(0),
                AnnotationProblem::UnknownMode("http".into())
            ]
        );
        assert_eq!(e[1].fallback(), "using the l4 mode");
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|&(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(pairs: &[(&str, &str)]) -> (ServicePolicy, Vec<AnnotationError>) {
        parse_annotations(&annotations(pairs))
    }

    fn problems(pairs: &[(&str, &str)]) -> Vec<AnnotationProblem> {
        parse(pairs).1.into_iter().map(|e| e.problem).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_annotations_means_defaults() {
        let (p, e) = parse(&[]);
        assert_eq!(p, ServicePolicy::default());
        assert_eq!(p.algorithm, Algorithm::Random);
        assert_eq!(p.weight(ip("10.244.0.1")), 1);
        assert_eq!(p.maglev_table_size, None);
        assert!(e.is_empty());
    }

    #[test]
    fn all_valid() {
        let (p, e) = parse(&[
            (ALGORITHM, "maglev"),
            (WEIGHTS, "10.244.2.2=3,10.244.2.3=1"),
            (MAGLEV_TABLE_SIZE, "65537"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
            ("example.com/rpclb.io/weights", "nonsense"),
        ]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.algorithm, Algorithm::Maglev);
        assert_eq!(p.weight(ip("10.244.2.2")), 3);
        assert_eq!(p.weight(ip("10.244.2.3")), 1);
        assert_eq!(p.weight(ip("10.244.2.4")), 1);
        assert_eq!(p.weights.len(), 2);
        assert_eq!(p.maglev_table_size, Some(65_537));
    }

    #[test]
    fn algorithms() {
        for a in Algorithm::ALL {
            let (p, e) = parse(&[(ALGORITHM, a.as_str())]);
            assert!(e.is_empty());
            assert_eq!(p.algorithm, a);
        }
        let (p, e) = parse(&[(ALGORITHM, "  Least-Conn ")]);
        assert!(e.is_empty());
        assert_eq!(p.algorithm, Algorithm::LeastConn);

        let (p, e) = parse(&[(ALGORITHM, "fastest"), (WEIGHTS, "10.244.0.1=2")]);
        assert_eq!(p.algorithm, Algorithm::Random);
        assert_eq!(
            p.weight(ip("10.244.0.1")),
            2,
            "other annotations still apply"
        );
        assert_eq!(
            e,
            [AnnotationError {
                key: ALGORITHM.into(),
                value: "fastest".into(),
                problem: AnnotationProblem::UnknownAlgorithm("fastest".into()),
            }]
        );
        assert_eq!(
            e[0].to_string(),
            "invalid annotation rpclb.io/algorithm=\"fastest\": unknown algorithm \"fastest\" \
             (expected one of: random, round-robin, maglev, source-hash, least-conn); \
             using the default algorithm (random)"
        );
        assert_eq!(problems(&[(ALGORITHM, " ")]), [AnnotationProblem::Empty]);
    }

    #[test]
    fn weights_format() {
        let (p, e) = parse(&[(WEIGHTS, " 10.244.2.2 = 3 ,10.244.2.3=0, ")]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.weight(ip("10.244.2.2")), 3);
        assert_eq!(p.weight(ip("10.244.2.3")), 0);
        let (p, e) = parse(&[(WEIGHTS, "10.244.2.2=65535")]);
        assert!(e.is_empty());
        assert_eq!(p.weight(ip("10.244.2.2")), 65_535);
        // IPv6 pods (the weight applies to the IPv6 service of a dual-stack one).
        let (p, e) = parse(&[(WEIGHTS, "fd00:10:244::7=3, 10.244.2.2=2")]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.weight(ip("fd00:10:244::7")), 3);
        assert_eq!(p.weight(ip("10.244.2.2")), 2);
        assert_eq!(p.weight(ip("fd00:10:244::8")), 1);
    }

    #[test]
    fn weights_errors() {
        let cases: &[(&str, AnnotationProblem)] = &[
            ("", AnnotationProblem::Empty),
            (
                "10.244.2.2",
                AnnotationProblem::WeightSyntax {
                    entry: "10.244.2.2".into(),
                },
            ),
            (
                "10.244.2.2:3",
                AnnotationProblem::WeightSyntax {
                    entry: "10.244.2.2:3".into(),
                },
            ),
            (
                "pod-a=3",
                AnnotationProblem::WeightIp {
                    entry: "pod-a=3".into(),
                    ip: "pod-a".into(),
                },
            ),
            (
                "10.244.2.2=65536",
                AnnotationProblem::WeightValue {
                    entry: "10.244.2.2=65536".into(),
                    weight: "65536".into(),
                },
            ),
            (
                "10.244.2.2=-1",
                AnnotationProblem::WeightValue {
                    entry: "10.244.2.2=-1".into(),
                    weight: "-1".into(),
                },
            ),
            (
                "10.244.2.2=+1",
                AnnotationProblem::WeightValue {
                    entry: "10.244.2.2=+1".into(),
                    weight: "+1".into(),
                },
            ),
            (
                "10.244.2.2=1.5",
                AnnotationProblem::WeightValue {
                    entry: "10.244.2.2=1.5".into(),
                    weight: "1.5".into(),
                },
            ),
            (
                "10.244.2.2=1,10.244.2.2=2",
                AnnotationProblem::WeightDuplicate {
                    entry: "10.244.2.2=2".into(),
                    ip: ip("10.244.2.2"),
                },
            ),
        ];
        for (value, want) in cases {
            let (p, e) = parse(&[(WEIGHTS, value)]);
            assert!(p.weights.is_empty(), "{value:?}");
            assert_eq!(e.len(), 1, "{value:?}: {e:?}");
            assert_eq!(&e[0].problem, want, "{value:?}");
            assert_eq!(e[0].key, WEIGHTS);
            assert_eq!(e[0].value, *value);
        }
    }

    #[test]
    fn weights_all_or_nothing_reporting_every_bad_entry() {
        let (p, e) = parse(&[(WEIGHTS, "10.244.0.1=5,bad,10.244.0.2=x")]);
        assert!(p.weights.is_empty());
        assert_eq!(p.weight(ip("10.244.0.1")), 1);
        assert_eq!(e.len(), 2);
        assert!(matches!(
            e[0].problem,
            AnnotationProblem::WeightSyntax { .. }
        ));
        assert!(matches!(
            e[1].problem,
            AnnotationProblem::WeightValue { .. }
        ));
        assert_eq!(
            e[1].to_string(),
            "invalid annotation rpclb.io/weights=\"10.244.0.1=5,bad,10.244.0.2=x\": \
             weight entry \"10.244.0.2=x\": \"x\" is not a weight from 0 to 65535; \
             ignoring all weights (every backend has weight 1)"
        );
    }

    #[test]
    fn maglev_table_size() {
        assert_eq!(
            parse(&[(MAGLEV_TABLE_SIZE, " 16381 ")]).0.maglev_table_size,
            Some(16_381)
        );
        assert_eq!(
            parse(&[(MAGLEV_TABLE_SIZE, "101")]).0.maglev_table_size,
            Some(101)
        );
        let cases: &[(&str, AnnotationProblem)] = &[
            ("", AnnotationProblem::Empty),
            ("big", AnnotationProblem::NotANumber("big".into())),
            ("-7", AnnotationProblem::NotANumber("-7".into())),
            ("+101", AnnotationProblem::NotANumber("+101".into())),
            (
                "4294967296",
                AnnotationProblem::NotANumber("4294967296".into()),
            ),
            (
                "97",
                AnnotationProblem::TableSize(
                    "maglev table size 97 must be > 100 x 1 backends that take new flows = 100"
                        .into(),
                ),
            ),
            (
                "16380",
                AnnotationProblem::TableSize("maglev table size 16380 is not prime".into()),
            ),
            (
                "4294967291",
                AnnotationProblem::TableSize(
                    "maglev table size 4294967291 is too large (maximum 16777216)".into(),
                ),
            ),
        ];
        for (value, want) in cases {
            let (p, e) = parse(&[(MAGLEV_TABLE_SIZE, value)]);
            assert_eq!(p.maglev_table_size, None, "{value:?}");
            assert_eq!(e.len(), 1, "{value:?}");
            assert_eq!(&e[0].problem, want, "{value:?}");
        }
        let e = &parse(&[(MAGLEV_TABLE_SIZE, "1000")]).1[0];
        assert_eq!(
            e.to_string(),
            "invalid annotation rpclb.io/maglev-table-size=\"1000\": maglev table size 1000 \
             is not prime; using the default maglev table size"
        );
    }

    #[test]
    fn pod_annotations() {
        let pod = |kv: &[(&str, &str)]| parse_pod_annotations(&annotations(kv));
        assert_eq!(pod(&[]), (PodPolicy::default(), vec![]));
        let (p, e) = pod(&[(POD_WEIGHT, " 0 "), (POD_MAX, "1000000"), ("x.io/y", "z")]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            p,
            PodPolicy {
                weight: Some(0),
                max: Some(1_000_000)
            }
        );
        assert_eq!(pod(&[(POD_WEIGHT, "65535")]).0.weight, Some(65_535));
        // Out of range or not numbers: reported, ignored.
        for (k, v) in [
            (POD_WEIGHT, "65536"),
            (POD_WEIGHT, "-1"),
            (POD_WEIGHT, "+1"),
            (POD_WEIGHT, "1.5"),
            (POD_WEIGHT, " "),
            (POD_MAX, "0"),
            (POD_MAX, "1000001"),
            (POD_MAX, "many"),
        ] {
            let (p, e) = pod(&[(k, v)]);
            assert_eq!(p, PodPolicy::default(), "{k}={v:?}");
            assert_eq!(e.len(), 1, "{k}={v:?}: {e:?}");
            assert_eq!(e[0].key, k);
            assert!(e[0].fallback().starts_with("the pod keeps"), "{}", e[0]);
        }
        // Every other rpclb.io/ key, a Service's included, is unknown on a Pod.
        let (p, e) = pod(&[(MAX_PER_BACKEND, "5"), (WEIGHTS, "10.0.0.1=2")]);
        assert_eq!(p, PodPolicy::default());
        assert_eq!(e.len(), 2);
        for e in &e {
            assert_eq!(e.problem, AnnotationProblem::UnknownPodKey);
            assert_eq!(e.fallback(), "ignoring it", "{e}");
        }
        assert!(
            POD_KNOWN.iter().all(|k| !KNOWN.contains(k)),
            "Pod keys are not Service keys"
        );
    }

    /// `rpclb.io/selector`: an example or a NAME; a path (or bad syntax)
    /// is one error, and no selector.
    #[test]
    fn selector_annotation() {
        for ok in ["example:geo", "geo", " geo-eu.v2 ", "0_x"] {
            let (p, e) = parse(&[(SELECTOR, ok)]);
            assert!(e.is_empty(), "{ok}: {e:?}");
            assert_eq!(p.selector.as_deref(), Some(ok.trim()));
        }
        for (bad, needle) in [
            ("/var/lib/rpclb/selectors/geo.o", "is a path"),
            ("/etc/passwd", "is a path"),
            ("../geo", "relative path"),
            ("sel/geo.o", "relative path"),
            ("Geo", "lowercase letters"),
            ("example:nope", "unknown example"),
            ("", "empty"),
        ] {
            let (p, e) = parse(&[(SELECTOR, bad)]);
            assert_eq!(p.selector, None, "{bad:?}");
            assert_eq!(e.len(), 1, "{bad:?}: {e:?}");
            assert_eq!(e[0].key, SELECTOR);
            assert!(e[0].to_string().contains(needle), "{bad:?}: {}", e[0]);
            assert!(
                e[0].to_string()
                    .ends_with("; no selector (the service's algorithm chooses)"),
                "{}",
                e[0]
            );
        }
        assert!(KNOWN.contains(&SELECTOR));
        assert!(
            AnnotationProblem::UnknownKey
                .to_string()
                .contains("rpclb.io/selector)")
        );
    }

    #[test]
    fn unknown_rpclb_keys_are_reported() {
        let (p, e) = parse(&[("rpclb.io/algoritm", "maglev"), (ALGORITHM, "least-conn")]);
        assert_eq!(p.algorithm, Algorithm::LeastConn);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, "rpclb.io/algoritm");
        assert_eq!(e[0].problem, AnnotationProblem::UnknownKey);
        assert!(e[0].to_string().ends_with("; ignoring it"), "{}", e[0]);
    }

    #[test]
    fn errors_come_in_key_order_and_chain_their_problem() {
        let (_, e) = parse(&[(WEIGHTS, "x"), (ALGORITHM, "y"), (MAGLEV_TABLE_SIZE, "z")]);
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, [ALGORITHM, MAGLEV_TABLE_SIZE, WEIGHTS]);
        let source = std::error::Error::source(&e[0]).unwrap().to_string();
        assert_eq!(
            source,
            "unknown algorithm \"y\" (expected one of: random, round-robin, maglev, source-hash, least-conn)"
        );
        assert_eq!(AnnotationError::EVENT_REASON, "InvalidAnnotation");
    }
}
