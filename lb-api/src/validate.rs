//! What a valid service is: the one set of rules that the config file, the
//! controller's translation and annotations, the wire, the map writer and the
//! userspace path all apply, so that the same service gets the same answer
//! everywhere.
//!
//! - [`Service::validate`] checks a whole service and names the first field
//!   that breaks a rule ([`InvalidService`]).
//! - [`Service::normalise`] fills in what a service may leave out (a Maglev
//!   table size large enough for its backends), then validates.
//! - The per-field checks ([`weight`], [`maglev_table_size`],
//!   [`affinity_timeout`], ...) are what `validate` calls; parsers that see
//!   one value at a time (annotations, YAML fields) call them too.
//!
//! # The Maglev sizing rule
//! A table must be prime and larger than 100 × the backends *in the table*:
//! those that take new flows (active, weight > 0), each `ip:port` once.
//! Terminating and drained backends are not in the table and do not count.
//! The rule applies to `maglev` and `source-hash` services in the L4 mode;
//! the gRPC mode does not use the algorithm.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::model::{
    Backend, Balancing, DEFAULT_MAGLEV_M, GrpcTls, HealthCheckKind, Locality,
    MAX_LOCALITY_MIN_BACKENDS, MAX_QOS_LIMIT, MAX_RETRY_ATTEMPTS, MAX_SPILL_OUTSTANDING,
    MAX_WEIGHT, OrcaWrr, OutlierDetection, Protocol, RetryPolicy, Service, ServiceAddr,
    check_added_header, is_prime,
};

/// The largest client-IP affinity timeout (as in Kubernetes).
pub const MAX_AFFINITY_TIMEOUT: Duration = Duration::from_secs(86_400);
/// The largest Maglev table a service may have (it must fit the data path's
/// `SLOTS` map; lb-agent asserts the two agree).
pub const MAX_MAGLEV_M: u32 = 1 << 24;

/// Where in a service a rule is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Name,
    Vip,
    Port,
    AffinityTimeout,
    MaglevTableSize,
    /// The backend list as a whole (too many for the largest Maglev table).
    Backends,
    Backend(usize, BackendField),
    /// The gRPC mode as a whole (it needs TCP).
    Grpc,
    GrpcTimeout,
    GrpcHeader(usize, HeaderField),
    GrpcRetry(RetryField),
    GrpcOutlier(OutlierField),
    GrpcOrcaWrr(OrcaWrrField),
    GrpcTls(TlsField),
    /// The health check as a whole (it needs TCP).
    HealthCheck,
    HealthCheckService,
    HealthCheckInterval,
    HealthCheckTimeout,
    HealthCheckUnhealthyThreshold,
    HealthCheckHealthyThreshold,
    NodePort,
    ExternalIp(usize),
    HealthCheckNodePort,
    /// The locality policy (its tiers or `min_backends`).
    Locality,
    /// The locality policy's `spill_outstanding` (gRPC mode only).
    LocalitySpillOutstanding,
    /// The QoS limit per backend.
    MaxPerBackend,
    /// The user-defined selector.
    Selector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendField {
    Ip,
    Port,
    Weight,
    /// Its own QoS limit.
    Max,
}

/// A field of a gRPC retry policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryField {
    MaxAttempts,
    InitialBackoff,
    MaxBackoff,
    BackoffMultiplier,
    StatusCodes,
    MaxTokens,
    TokenRatio,
}

impl RetryField {
    /// The field's YAML name (under `grpc.retry`).
    pub fn name(self) -> &'static str {
        match self {
            RetryField::MaxAttempts => "max_attempts",
            RetryField::InitialBackoff => "initial_backoff",
            RetryField::MaxBackoff => "max_backoff",
            RetryField::BackoffMultiplier => "backoff_multiplier",
            RetryField::StatusCodes => "retryable_status_codes",
            RetryField::MaxTokens => "throttle.max_tokens",
            RetryField::TokenRatio => "throttle.token_ratio",
        }
    }
}

/// A field of a gRPC service's outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutlierField {
    ConsecutiveFailures,
    BaseEjectionTime,
    MaxEjectionTime,
    MaxEjectionPercent,
}

impl OutlierField {
    /// The field's YAML name (under `grpc.outlier_detection`).
    pub fn name(self) -> &'static str {
        match self {
            OutlierField::ConsecutiveFailures => "consecutive_failures",
            OutlierField::BaseEjectionTime => "base_ejection_time",
            OutlierField::MaxEjectionTime => "max_ejection_time",
            OutlierField::MaxEjectionPercent => "max_ejection_percent",
        }
    }
}

/// A field of the `orca_wrr` balancing settings (gRFC A58).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrcaWrrField {
    BlackoutPeriod,
    WeightExpirationPeriod,
    WeightUpdatePeriod,
    ErrorUtilizationPenalty,
}

impl OrcaWrrField {
    /// The field's YAML name (under `grpc.orca_wrr`).
    pub fn name(self) -> &'static str {
        match self {
            OrcaWrrField::BlackoutPeriod => "blackout_period",
            OrcaWrrField::WeightExpirationPeriod => "weight_expiration_period",
            OrcaWrrField::WeightUpdatePeriod => "weight_update_period",
            OrcaWrrField::ErrorUtilizationPenalty => "error_utilization_penalty",
        }
    }
}

/// A field of a gRPC service's TLS (`grpc.tls`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsField {
    /// `grpc.tls` as a whole.
    Tls,
    ListenCert,
    ListenKey,
    ListenClientCa,
    UpstreamCa,
    UpstreamServerName,
    UpstreamCert,
    UpstreamKey,
}

impl TlsField {
    /// The field's YAML name (under `grpc.tls`; empty for the whole).
    pub fn name(self) -> &'static str {
        match self {
            TlsField::Tls => "",
            TlsField::ListenCert => "listen.cert",
            TlsField::ListenKey => "listen.key",
            TlsField::ListenClientCa => "listen.client_ca",
            TlsField::UpstreamCa => "upstream.ca",
            TlsField::UpstreamServerName => "upstream.server_name",
            TlsField::UpstreamCert => "upstream.cert",
            TlsField::UpstreamKey => "upstream.key",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderField {
    Name,
    Value,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Name => f.write_str("name"),
            Field::Vip => f.write_str("vip"),
            Field::Port => f.write_str("port"),
            Field::AffinityTimeout => f.write_str("affinity_timeout"),
            Field::MaglevTableSize => f.write_str("maglev_table_size"),
            Field::Backends => f.write_str("backends"),
            Field::Backend(i, b) => {
                let b = match b {
                    BackendField::Ip => "ip",
                    BackendField::Port => "port",
                    BackendField::Weight => "weight",
                    BackendField::Max => "max",
                };
                write!(f, "backends[{i}].{b}")
            }
            Field::Grpc => f.write_str("grpc"),
            Field::GrpcTimeout => f.write_str("grpc.timeout"),
            Field::GrpcHeader(i, h) => {
                let h = match h {
                    HeaderField::Name => "name",
                    HeaderField::Value => "value",
                };
                write!(f, "grpc.headers[{i}].{h}")
            }
            Field::GrpcRetry(r) => write!(f, "grpc.retry.{}", r.name()),
            Field::GrpcOutlier(o) => write!(f, "grpc.outlier_detection.{}", o.name()),
            Field::GrpcOrcaWrr(o) => write!(f, "grpc.orca_wrr.{}", o.name()),
            Field::GrpcTls(TlsField::Tls) => f.write_str("grpc.tls"),
            Field::GrpcTls(t) => write!(f, "grpc.tls.{}", t.name()),
            Field::HealthCheck => f.write_str("health_check"),
            Field::HealthCheckService => f.write_str("health_check.service"),
            Field::HealthCheckInterval => f.write_str("health_check.interval"),
            Field::HealthCheckTimeout => f.write_str("health_check.timeout"),
            Field::HealthCheckUnhealthyThreshold => f.write_str("health_check.unhealthy_threshold"),
            Field::HealthCheckHealthyThreshold => f.write_str("health_check.healthy_threshold"),
            Field::NodePort => f.write_str("node_port"),
            Field::ExternalIp(i) => write!(f, "external_ips[{i}]"),
            Field::HealthCheckNodePort => f.write_str("health_check_node_port"),
            Field::Locality => f.write_str("locality"),
            Field::LocalitySpillOutstanding => f.write_str("locality.spill_outstanding"),
            Field::MaxPerBackend => f.write_str("max_per_backend"),
            Field::Selector => f.write_str("selector"),
        }
    }
}

/// A service that breaks a rule: the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidService {
    pub field: Field,
    pub message: String,
}

fn at(field: Field) -> impl FnOnce(String) -> InvalidService {
    move |message| InvalidService { field, message }
}

/// The gRPC mode's added headers (YAML `grpc.headers`, the
/// `rpclb.io/headers` annotation): each by [`check_added_header`], no name
/// twice. The error: the entry's index, which part, what is wrong.
pub fn added_headers(headers: &[(String, String)]) -> Result<(), (usize, HeaderField, String)> {
    let mut names = HashSet::new();
    for (i, (n, v)) in headers.iter().enumerate() {
        check_added_header(n, v).map_err(|m| {
            let f = if check_added_header(n, "").is_err() {
                HeaderField::Name
            } else {
                HeaderField::Value
            };
            (i, f, m)
        })?;
        if !names.insert(n.as_str()) {
            return Err((i, HeaderField::Name, format!("header {n} is listed twice")));
        }
    }
    Ok(())
}

/// A locality policy: at least one tier, narrowest first (node, zone,
/// region), each once; `min_backends` 1..=[`MAX_LOCALITY_MIN_BACKENDS`].
pub fn locality(l: &Locality) -> Result<(), String> {
    if l.tiers.is_empty() {
        return Err("needs at least one tier (node, zone or region)".into());
    }
    if !l.tiers.windows(2).all(|w| w[0] < w[1]) {
        let tiers: Vec<&str> = l.tiers.iter().map(|t| t.as_str()).collect();
        return Err(format!(
            "tiers {} must be narrowest first (node, zone, region), each once",
            tiers.join(",")
        ));
    }
    locality_min_backends(l.min_backends)
}

/// A locality policy's spill-over threshold.
pub fn locality_min_backends(n: u32) -> Result<(), String> {
    if (1..=MAX_LOCALITY_MIN_BACKENDS).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "min_backends {n} is out of range (expected 1-{MAX_LOCALITY_MIN_BACKENDS})"
        ))
    }
}

/// A locality policy's spill-over threshold on outstanding calls (the gRPC
/// mode's; [`Service::validate`] checks the mode).
pub fn locality_spill_outstanding(n: u32) -> Result<(), String> {
    if (1..=MAX_SPILL_OUTSTANDING).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "spill_outstanding {n} is out of range (expected 1-{MAX_SPILL_OUTSTANDING} outstanding calls)"
        ))
    }
}

/// A service name: not blank, no control characters.
pub fn name(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else if s.chars().any(char::is_control) {
        Err(format!("{s:?} contains control characters"))
    } else {
        Ok(())
    }
}

/// An address that can be a VIP or a backend: not unspecified (0.0.0.0,
/// ::), broadcast or multicast; an IPv6 address must not be IPv4-mapped
/// (`::ffff:a.b.c.d`: write the IPv4 address).
pub fn unicast(ip: impl Into<IpAddr>) -> Result<(), String> {
    let ip = ip.into();
    let bad = match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast(),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return Err(format!(
                    "{ip} is an IPv4-mapped IPv6 address; write the IPv4 address {v4}"
                ));
            }
            v6.is_unspecified() || v6.is_multicast()
        }
    };
    if bad {
        Err(format!("{ip} is not a unicast address"))
    } else {
        Ok(())
    }
}

/// The family of an address, for messages.
pub fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// A port: 1-65535.
pub fn port(p: u16) -> Result<(), String> {
    if p == 0 {
        Err("port 0 is not allowed (expected 1-65535)".into())
    } else {
        Ok(())
    }
}

/// A weight: 0 (drain) to [`MAX_WEIGHT`].
pub fn weight(w: u32) -> Result<(), String> {
    if w > MAX_WEIGHT {
        Err(format!("weight {w} is too large (maximum {MAX_WEIGHT})"))
    } else {
        Ok(())
    }
}

/// The most backends of a service with a selector (`lb_common::selector::MAX_CANDIDATES`).
pub const MAX_SELECTOR_BACKENDS: usize = 16;
/// The shipped example selector, by client subnet (docs/policies.md).
pub const EXAMPLE_GEO_SELECTOR: &str = "example:geo";
/// The examples built into the agent (`example:NAME`).
pub const SELECTOR_EXAMPLES: &[&str] = &[EXAMPLE_GEO_SELECTOR];
/// The longest selector NAME (`[a-z0-9][a-z0-9._-]{0,62}`).
pub const MAX_SELECTOR_NAME: usize = 63;

/// What a selector's value names (docs/policies.md, "Naming, and who may
/// name what"). Who may use which is decided where the source is known: a
/// Service annotation and the controller's stream never a [`Path`]
/// (the agent loads a path only from its own `--config` file).
///
/// [`Path`]: SelectorRef::Path
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorRef<'a> {
    /// `example:NAME`: built into the agent (the whole value, e.g. `example:geo`).
    Example(&'a str),
    /// A bare NAME: the agent loads `<--selector-dir>/NAME.o`.
    Name(&'a str),
    /// An absolute path of an object file on the node.
    Path(&'a str),
}

/// The syntax of a selector: `example:geo`, a NAME
/// (`[a-z0-9][a-z0-9._-]{0,62}`, no `/`), or an absolute path.
pub fn selector(s: &str) -> Result<SelectorRef<'_>, String> {
    const WHAT: &str = "example:geo, a NAME ([a-z0-9][a-z0-9._-]{0,62}: <--selector-dir>/NAME.o on the node), or an absolute path";
    if s.trim().is_empty() {
        return Err(format!("empty: expected {WHAT}"));
    }
    if s.starts_with("example:") {
        return if SELECTOR_EXAMPLES.contains(&s) {
            Ok(SelectorRef::Example(s))
        } else {
            Err(format!(
                "unknown example {s:?} (the example is {EXAMPLE_GEO_SELECTOR})"
            ))
        };
    }
    if s.starts_with('/') {
        if s.chars().any(char::is_control) {
            return Err(format!("{s:?}: a path without control characters"));
        }
        if s.len() > 4096 {
            return Err("a path of at most 4096 bytes".into());
        }
        return Ok(SelectorRef::Path(s));
    }
    if s.contains('/') {
        return Err(format!("{s:?} is a relative path: expected {WHAT}"));
    }
    let ok_first = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = |c: u8| ok_first(c) || matches!(c, b'.' | b'_' | b'-');
    let b = s.as_bytes();
    if b.len() > MAX_SELECTOR_NAME {
        return Err(format!(
            "name {s:?} is longer than {MAX_SELECTOR_NAME} characters"
        ));
    }
    if !ok_first(b[0]) || !b.iter().all(|&c| ok(c)) {
        return Err(format!(
            "name {s:?}: lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"
        ));
    }
    Ok(SelectorRef::Name(s))
}

/// A QoS limit (`max_per_backend`, a backend's `max`): 1 to [`MAX_QOS_LIMIT`].
pub fn qos_limit(n: u32) -> Result<(), String> {
    if n == 0 || n > MAX_QOS_LIMIT {
        Err(format!(
            "limit {n} is out of range (expected 1-{MAX_QOS_LIMIT}; omit it for no limit)"
        ))
    } else {
        Ok(())
    }
}

/// A client-IP affinity timeout: 1 s to [`MAX_AFFINITY_TIMEOUT`], whole seconds.
pub fn affinity_timeout(d: Duration) -> Result<(), String> {
    if d < Duration::from_secs(1) || d > MAX_AFFINITY_TIMEOUT || d.subsec_nanos() != 0 {
        Err(format!(
            "affinity timeout {d:?} is out of range (expected 1-{} whole seconds; omit it to disable affinity)",
            MAX_AFFINITY_TIMEOUT.as_secs()
        ))
    } else {
        Ok(())
    }
}

/// A Maglev table size on its own: prime and at most [`MAX_MAGLEV_M`]. Whether
/// it holds the service's backends is [`maglev_fits`].
pub fn maglev_table_size(m: u32) -> Result<(), String> {
    if m > MAX_MAGLEV_M {
        Err(format!(
            "maglev table size {m} is too large (maximum {MAX_MAGLEV_M})"
        ))
    } else if !is_prime(m) {
        Err(format!("maglev table size {m} is not prime"))
    } else {
        Ok(())
    }
}

/// Whether a table of `m` slots is large enough for `live` backends (> 100 × live).
pub fn maglev_fits(m: u32, live: usize) -> Result<(), String> {
    let min = 100u64.saturating_mul(live as u64);
    if u64::from(m) <= min {
        Err(format!(
            "maglev table size {m} must be > 100 x {live} backends that take new flows = {min}"
        ))
    } else {
        Ok(())
    }
}

/// The smallest valid table for `live` backends: the default when it fits,
/// else the smallest prime above 100 × live; `None` beyond [`MAX_MAGLEV_M`].
pub fn maglev_size_for(live: usize) -> Option<u32> {
    let min = 100u64.checked_mul(live as u64)?;
    if u64::from(DEFAULT_MAGLEV_M) > min {
        return Some(DEFAULT_MAGLEV_M);
    }
    let start = u32::try_from(min.checked_add(1)?).ok()?;
    (start..=MAX_MAGLEV_M).find(|&c| is_prime(c))
}

/// The gRPC mode's default call deadline: at least 1 ms.
pub fn grpc_timeout(d: Duration) -> Result<(), String> {
    if d < Duration::from_millis(1) {
        Err("the gRPC timeout must be at least 1 ms".into())
    } else {
        Ok(())
    }
}

/// The longest retry backoff.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);
/// The largest backoff multiplier, in thousandths.
pub const MAX_RETRY_MULTIPLIER_MILLI: u32 = 100_000;
/// gRFC A6: retryThrottling.maxTokens is at most 1000.
pub const MAX_RETRY_TOKENS: u32 = 1000;

/// A retry policy (gRFC A6 rules): 2..=5 attempts, backoffs of 1 ms to
/// [`MAX_RETRY_BACKOFF`] in whole milliseconds with the initial one not
/// above the maximum, a multiplier of 1 to 100, at least one status code
/// (1..=16, sorted, no duplicates), and a throttle of 1..=1000 tokens whose
/// ratio is above 0 and at most `max_tokens`. The one check of a policy;
/// the YAML, annotation and wire parsers call it.
pub fn retry_policy(r: &RetryPolicy) -> Result<(), (RetryField, String)> {
    let e = |f: RetryField, m: String| Err((f, m));
    if !(2..=MAX_RETRY_ATTEMPTS).contains(&r.max_attempts) {
        return e(
            RetryField::MaxAttempts,
            format!(
                "max_attempts {} is out of range (expected 2-{MAX_RETRY_ATTEMPTS}, the first attempt included)",
                r.max_attempts
            ),
        );
    }
    let backoff = |d: Duration, f: RetryField| {
        if d < Duration::from_millis(1) || d > MAX_RETRY_BACKOFF {
            e(
                f,
                format!("backoff {d:?} is out of range (expected 1ms to {MAX_RETRY_BACKOFF:?})"),
            )
        } else if !d.subsec_nanos().is_multiple_of(1_000_000) {
            e(f, format!("backoff {d:?} must be whole milliseconds"))
        } else {
            Ok(())
        }
    };
    backoff(r.initial_backoff, RetryField::InitialBackoff)?;
    backoff(r.max_backoff, RetryField::MaxBackoff)?;
    if r.initial_backoff > r.max_backoff {
        return e(
            RetryField::MaxBackoff,
            format!(
                "max_backoff {:?} is below initial_backoff {:?}",
                r.max_backoff, r.initial_backoff
            ),
        );
    }
    if !(1000..=MAX_RETRY_MULTIPLIER_MILLI).contains(&r.backoff_multiplier_milli) {
        return e(
            RetryField::BackoffMultiplier,
            format!(
                "backoff_multiplier {} is out of range (expected 1 to 100)",
                f64::from(r.backoff_multiplier_milli) / 1000.0
            ),
        );
    }
    if r.retryable_status_codes.is_empty() {
        return e(
            RetryField::StatusCodes,
            "retryable_status_codes must name at least one status (e.g. UNAVAILABLE)".into(),
        );
    }
    if let Some(c) = r
        .retryable_status_codes
        .iter()
        .find(|c| !(1..=16).contains(*c))
    {
        return e(
            RetryField::StatusCodes,
            format!("gRPC status code {c} is out of range (1-16; OK is not retryable)"),
        );
    }
    if !r.retryable_status_codes.is_sorted_by(|a, b| a < b) {
        return e(
            RetryField::StatusCodes,
            "retryable_status_codes must be sorted without duplicates".into(),
        );
    }
    if let Some(t) = &r.throttle {
        if !(1..=MAX_RETRY_TOKENS).contains(&t.max_tokens) {
            return e(
                RetryField::MaxTokens,
                format!(
                    "max_tokens {} is out of range (expected 1-{MAX_RETRY_TOKENS})",
                    t.max_tokens
                ),
            );
        }
        if t.token_ratio_milli == 0 || t.token_ratio_milli > t.max_tokens * 1000 {
            return e(
                RetryField::TokenRatio,
                format!(
                    "token_ratio {} is out of range (expected 0.001 up to max_tokens, {})",
                    f64::from(t.token_ratio_milli) / 1000.0,
                    t.max_tokens
                ),
            );
        }
    }
    Ok(())
}

/// The most failures in a row an outlier detection may wait for.
pub const MAX_OUTLIER_CONSECUTIVE_FAILURES: u32 = 1000;
/// The longest ejection time (base or max).
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(3600);

/// An outlier detection: 1..=1000 failures in a row, ejection times of
/// 1 ms to [`MAX_EJECTION_TIME`] in whole milliseconds with the maximum not
/// below the base, and a percentage of 0..=100. The one check of it; the
/// YAML, annotation and wire parsers call it.
pub fn outlier_detection(o: &OutlierDetection) -> Result<(), (OutlierField, String)> {
    let e = |f: OutlierField, m: String| Err((f, m));
    if !(1..=MAX_OUTLIER_CONSECUTIVE_FAILURES).contains(&o.consecutive_failures) {
        return e(
            OutlierField::ConsecutiveFailures,
            format!(
                "consecutive_failures {} is out of range (expected 1-{MAX_OUTLIER_CONSECUTIVE_FAILURES})",
                o.consecutive_failures
            ),
        );
    }
    let time = |d: Duration, f: OutlierField| {
        if d < Duration::from_millis(1) || d > MAX_EJECTION_TIME {
            e(
                f,
                format!(
                    "ejection time {d:?} is out of range (expected 1ms to {MAX_EJECTION_TIME:?})"
                ),
            )
        } else if !d.subsec_nanos().is_multiple_of(1_000_000) {
            e(f, format!("ejection time {d:?} must be whole milliseconds"))
        } else {
            Ok(())
        }
    };
    time(o.base_ejection_time, OutlierField::BaseEjectionTime)?;
    time(o.max_ejection_time, OutlierField::MaxEjectionTime)?;
    if o.max_ejection_time < o.base_ejection_time {
        return e(
            OutlierField::MaxEjectionTime,
            format!(
                "max_ejection_time {:?} is below base_ejection_time {:?}",
                o.max_ejection_time, o.base_ejection_time
            ),
        );
    }
    if o.max_ejection_percent > 100 {
        return e(
            OutlierField::MaxEjectionPercent,
            format!(
                "max_ejection_percent {} is out of range (expected 0-100)",
                o.max_ejection_percent
            ),
        );
    }
    Ok(())
}

/// The longest `orca_wrr` blackout period.
pub const MAX_ORCA_BLACKOUT: Duration = Duration::from_secs(3600);
/// The shortest and longest `orca_wrr` weight expiration period.
pub const MIN_ORCA_EXPIRATION: Duration = Duration::from_millis(100);
pub const MAX_ORCA_EXPIRATION: Duration = Duration::from_secs(3600);
/// The shortest (gRFC A58's floor) and longest weight update period.
pub const MIN_ORCA_UPDATE: Duration = Duration::from_millis(100);
pub const MAX_ORCA_UPDATE: Duration = Duration::from_secs(60);
/// The largest error utilization penalty, in thousandths.
pub const MAX_ORCA_PENALTY_MILLI: u32 = 100_000;

/// The `orca_wrr` balancing settings (gRFC A58): a blackout of 0 to
/// [`MAX_ORCA_BLACKOUT`], an expiration of [`MIN_ORCA_EXPIRATION`] to
/// [`MAX_ORCA_EXPIRATION`], an update period of [`MIN_ORCA_UPDATE`] to
/// [`MAX_ORCA_UPDATE`] (all whole milliseconds), and an error penalty of 0
/// to 100. The one check; the YAML, annotation and wire parsers call it.
pub fn orca_wrr(w: &OrcaWrr) -> Result<(), (OrcaWrrField, String)> {
    let range = |d: Duration, min: Duration, max: Duration, f: OrcaWrrField| {
        if d < min || d > max {
            Err((
                f,
                format!(
                    "{} {d:?} is out of range (expected {min:?} to {max:?})",
                    f.name()
                ),
            ))
        } else if !d.subsec_nanos().is_multiple_of(1_000_000) {
            Err((f, format!("{} {d:?} must be whole milliseconds", f.name())))
        } else {
            Ok(())
        }
    };
    range(
        w.blackout_period,
        Duration::ZERO,
        MAX_ORCA_BLACKOUT,
        OrcaWrrField::BlackoutPeriod,
    )?;
    range(
        w.weight_expiration_period,
        MIN_ORCA_EXPIRATION,
        MAX_ORCA_EXPIRATION,
        OrcaWrrField::WeightExpirationPeriod,
    )?;
    range(
        w.weight_update_period,
        MIN_ORCA_UPDATE,
        MAX_ORCA_UPDATE,
        OrcaWrrField::WeightUpdatePeriod,
    )?;
    if w.error_utilization_penalty_milli > MAX_ORCA_PENALTY_MILLI {
        return Err((
            OrcaWrrField::ErrorUtilizationPenalty,
            format!(
                "error_utilization_penalty {} is out of range (expected 0 to 100)",
                f64::from(w.error_utilization_penalty_milli) / 1000.0
            ),
        ));
    }
    Ok(())
}

/// Parses a ratio with up to three decimals (`1.5`, `0.1`) into thousandths.
pub fn parse_milli(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let bad = || format!("{s:?} is not a number with at most 3 decimals (e.g. 1.5)");
    if int.is_empty() && frac.is_empty()
        || !int.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
        || frac.len() > 3
    {
        return Err(bad());
    }
    let i: u32 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let f: u32 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
    i.checked_mul(1000)
        .and_then(|v| v.checked_add(f))
        .ok_or_else(bad)
}

/// The shortest health check interval (bounds the probe load: a service of
/// 100 backends at 100 ms is 1,000 checks/s from every node).
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);
/// The longest health check interval.
pub const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(3600);
/// The shortest health check timeout.
pub const MIN_HEALTH_TIMEOUT: Duration = Duration::from_millis(10);
/// The largest health check threshold.
pub const MAX_HEALTH_THRESHOLD: u32 = 100;
/// The longest gRPC health service name.
pub const MAX_HEALTH_SERVICE_LEN: usize = 255;

/// A duration as written in a config file or an annotation: `500ms`, `2s`,
/// `1.5s`, `1m`, or a bare number of seconds; rounded to whole milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 500ms, 2s, 1m)"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n * 1e3,
        "m" => n * 60e3,
        "h" => n * 3600e3,
        u => return Err(format!("unknown unit {u:?} in {s:?} (use ms, s, m or h)")),
    };
    if ms > 1e12 {
        return Err(format!("{s:?} is too long"));
    }
    Ok(Duration::from_millis(ms.round() as u64))
}

/// A health check interval: [`MIN_HEALTH_INTERVAL`] to [`MAX_HEALTH_INTERVAL`].
pub fn health_interval(d: Duration) -> Result<(), String> {
    if d < MIN_HEALTH_INTERVAL || d > MAX_HEALTH_INTERVAL {
        Err(format!(
            "interval {d:?} is out of range (expected {MIN_HEALTH_INTERVAL:?} to {MAX_HEALTH_INTERVAL:?})"
        ))
    } else if !d.subsec_nanos().is_multiple_of(1_000_000) {
        Err(format!("interval {d:?} must be whole milliseconds"))
    } else {
        Ok(())
    }
}

/// A health check timeout: [`MIN_HEALTH_TIMEOUT`] up to the interval.
pub fn health_timeout(d: Duration, interval: Duration) -> Result<(), String> {
    if d < MIN_HEALTH_TIMEOUT || d > interval {
        Err(format!(
            "timeout {d:?} is out of range (expected {MIN_HEALTH_TIMEOUT:?} up to the interval, {interval:?})"
        ))
    } else if !d.subsec_nanos().is_multiple_of(1_000_000) {
        Err(format!("timeout {d:?} must be whole milliseconds"))
    } else {
        Ok(())
    }
}

/// A health check threshold: 1 to [`MAX_HEALTH_THRESHOLD`] checks in a row.
pub fn health_threshold(n: u32) -> Result<(), String> {
    if n == 0 || n > MAX_HEALTH_THRESHOLD {
        Err(format!(
            "threshold {n} is out of range (expected 1-{MAX_HEALTH_THRESHOLD} checks in a row)"
        ))
    } else {
        Ok(())
    }
}

/// A gRPC health service name: visible ASCII, at most
/// [`MAX_HEALTH_SERVICE_LEN`] bytes (empty: the whole server).
pub fn health_service(s: &str) -> Result<(), String> {
    if s.len() > MAX_HEALTH_SERVICE_LEN {
        Err(format!(
            "service name is {} bytes long (maximum {MAX_HEALTH_SERVICE_LEN})",
            s.len()
        ))
    } else if !s.chars().all(|c| c.is_ascii_graphic()) {
        Err(format!(
            "service name {s:?} must be visible ASCII without spaces"
        ))
    } else {
        Ok(())
    }
}

/// The longest TLS file path.
pub const MAX_TLS_PATH_LEN: usize = 4096;

/// A TLS file's path: absolute (it names a file on the node), no control
/// characters, at most [`MAX_TLS_PATH_LEN`] bytes.
pub fn tls_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        Err("must not be empty (an absolute path of a PEM file on the node)".into())
    } else if p.len() > MAX_TLS_PATH_LEN {
        Err(format!(
            "path is {} bytes long (maximum {MAX_TLS_PATH_LEN})",
            p.len()
        ))
    } else if p.chars().any(char::is_control) {
        Err(format!("path {p:?} contains control characters"))
    } else if !p.starts_with('/') {
        Err(format!(
            "path {p:?} must be absolute (a PEM file on the node)"
        ))
    } else {
        Ok(())
    }
}

/// The name a backend's certificate is verified against: a DNS name or an
/// IP address.
pub fn tls_server_name(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 253 || n.trim() != n {
        return Err(format!("server name {n:?} is not a DNS name or IP address"));
    }
    rustls::pki_types::ServerName::try_from(n)
        .map(|_| ())
        .map_err(|_| format!("server name {n:?} is not a DNS name or IP address"))
}

/// Checks a gRPC service's TLS settings (not the files: they are the
/// node's, and the agent reads them).
pub fn grpc_tls(t: &GrpcTls) -> Result<(), (TlsField, String)> {
    if t.listen.is_none() && t.upstream.is_none() {
        return Err((
            TlsField::Tls,
            "names neither listen nor upstream (leave tls out for plaintext)".into(),
        ));
    }
    let path = |f: TlsField, p: &str| tls_path(p).map_err(|m| (f, m));
    if let Some(l) = &t.listen {
        path(TlsField::ListenCert, &l.cert)?;
        path(TlsField::ListenKey, &l.key)?;
        if let Some(ca) = &l.client_ca {
            path(TlsField::ListenClientCa, ca)?;
        }
    }
    if let Some(u) = &t.upstream {
        path(TlsField::UpstreamCa, &u.ca)?;
        if let Some(n) = &u.server_name {
            tls_server_name(n).map_err(|m| (TlsField::UpstreamServerName, m))?;
        }
        match (&u.cert, &u.key) {
            (Some(c), Some(k)) => {
                path(TlsField::UpstreamCert, c)?;
                path(TlsField::UpstreamKey, k)?;
            }
            (Some(_), None) => {
                return Err((
                    TlsField::UpstreamKey,
                    "missing: a client certificate (cert) needs its key".into(),
                ));
            }
            (None, Some(_)) => {
                return Err((
                    TlsField::UpstreamCert,
                    "missing: a key needs its client certificate (cert)".into(),
                ));
            }
            (None, None) => {}
        }
    }
    Ok(())
}

/// The backends that take new flows (active, weight > 0), each `ip:port` once.
pub fn live_backends(backends: &[Backend]) -> impl Iterator<Item = &Backend> {
    let mut seen = HashSet::new();
    backends
        .iter()
        .filter(move |b| b.takes_new_flows() && seen.insert((b.ip, b.port)))
}

impl Service {
    /// How many backends its selection table holds (see [`live_backends`]).
    pub fn live_backends(&self) -> usize {
        live_backends(&self.backends).count()
    }

    /// Whether the Maglev sizing rule applies (see the [module docs](self)).
    pub fn needs_maglev_table(&self) -> bool {
        self.grpc.is_none() && self.algorithm.uses_maglev_table()
    }

    /// Checks every rule; the first broken one is the error.
    /// The external front ends: a node port and health-check node port in
    /// 1..=65535 and different, unicast external IPs without repeats, and a
    /// health-check node port only with `externalTrafficPolicy: Local` (as in
    /// Kubernetes).
    /// A user-defined selector (docs/policies.md): the kernel path's, for an
    /// IPv4 L4 service of at most [`MAX_SELECTOR_BACKENDS`] backends (the
    /// selector's candidates are the backends by their index in the list).
    /// The syntax is [`selector`]'s; who may name a path is decided where
    /// the source is known (the controller's parsers, the agent's writer).
    pub fn validate_selector(&self, s: &str) -> Result<(), String> {
        selector(s)?;
        if !self.vip.is_ipv4() {
            return Err("a selector serves IPv4 services only".into());
        }
        if self.grpc.is_some() {
            return Err("a selector serves the kernel (L4) path, not the gRPC mode".into());
        }
        if self.backends.len() > MAX_SELECTOR_BACKENDS {
            return Err(format!(
                "a service with a selector has at most {MAX_SELECTOR_BACKENDS} backends (its \
                 candidates), not {}",
                self.backends.len()
            ));
        }
        Ok(())
    }

    fn validate_external(&self) -> Result<(), InvalidService> {
        let e = &self.external;
        if let Some(p) = e.node_port {
            port(p).map_err(at(Field::NodePort))?;
        }
        let mut seen = HashSet::new();
        for (i, ip) in e.ips.iter().enumerate() {
            unicast(*ip).map_err(at(Field::ExternalIp(i)))?;
            if ip.is_ipv4() != self.vip.is_ipv4() {
                return Err(InvalidService {
                    field: Field::ExternalIp(i),
                    message: format!(
                        "external IP {ip} is {} but the VIP {} is {}",
                        family(*ip),
                        self.vip,
                        family(self.vip)
                    ),
                });
            }
            if !seen.insert(*ip) {
                return Err(InvalidService {
                    field: Field::ExternalIp(i),
                    message: format!("duplicate external IP {ip}"),
                });
            }
        }
        if let Some(p) = e.health_check_node_port {
            port(p).map_err(at(Field::HealthCheckNodePort))?;
            if e.traffic_policy != crate::model::TrafficPolicy::Local {
                return Err(InvalidService {
                    field: Field::HealthCheckNodePort,
                    message: "needs external_traffic_policy: local".into(),
                });
            }
            if e.node_port == Some(p) {
                return Err(InvalidService {
                    field: Field::HealthCheckNodePort,
                    message: format!("{p} is the node_port too"),
                });
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), InvalidService> {
        name(&self.name).map_err(at(Field::Name))?;
        unicast(self.vip).map_err(at(Field::Vip))?;
        port(self.port).map_err(at(Field::Port))?;
        if let Some(d) = self.affinity_timeout {
            affinity_timeout(d).map_err(at(Field::AffinityTimeout))?;
        }
        let mut seen: HashMap<(IpAddr, u16), usize> = HashMap::new();
        for (i, b) in self.backends.iter().enumerate() {
            unicast(b.ip).map_err(at(Field::Backend(i, BackendField::Ip)))?;
            if b.ip.is_ipv4() != self.vip.is_ipv4() {
                return Err(InvalidService {
                    field: Field::Backend(i, BackendField::Ip),
                    message: format!(
                        "backend {} is {} but the VIP {} is {}: a service's backends must be \
                         of its VIP's family (a dual-stack service is one service per family)",
                        b.ip,
                        family(b.ip),
                        self.vip,
                        family(self.vip)
                    ),
                });
            }
            port(b.port).map_err(at(Field::Backend(i, BackendField::Port)))?;
            weight(b.weight).map_err(at(Field::Backend(i, BackendField::Weight)))?;
            if let Some(m) = b.max {
                qos_limit(m).map_err(at(Field::Backend(i, BackendField::Max)))?;
            }
            if let Some(j) = seen.insert((b.ip, b.port), i) {
                return Err(InvalidService {
                    field: Field::Backend(i, BackendField::Ip),
                    message: format!("duplicate backend {}:{} (also backends[{j}])", b.ip, b.port),
                });
            }
        }
        if let Some(m) = self.maglev_table_size {
            maglev_table_size(m).map_err(at(Field::MaglevTableSize))?;
        }
        if let Some(m) = self.max_per_backend {
            qos_limit(m).map_err(at(Field::MaxPerBackend))?;
        }
        if let Some(s) = &self.selector {
            self.validate_selector(s).map_err(at(Field::Selector))?;
        }
        self.validate_external()?;
        if self.needs_maglev_table() {
            let live = self.live_backends();
            match self.maglev_table_size {
                Some(m) => maglev_fits(m, live).map_err(at(Field::MaglevTableSize))?,
                None if maglev_fits(DEFAULT_MAGLEV_M, live).is_err() => {
                    return Err(InvalidService {
                        field: Field::Backends,
                        message: match maglev_size_for(live) {
                            Some(m) => format!(
                                "{live} backends need a maglev table larger than the default \
                                 ({DEFAULT_MAGLEV_M}), e.g. {m}"
                            ),
                            None => format!(
                                "{live} backends need a maglev table larger than the maximum \
                                 ({MAX_MAGLEV_M})"
                            ),
                        },
                    });
                }
                None => {}
            }
        }
        if let Some(g) = &self.grpc {
            if self.protocol != Protocol::Tcp {
                return Err(InvalidService {
                    field: Field::Grpc,
                    message: "the gRPC mode needs protocol tcp".into(),
                });
            }
            grpc_timeout(g.default_timeout).map_err(at(Field::GrpcTimeout))?;
            added_headers(&g.add_headers).map_err(|(i, f, message)| InvalidService {
                field: Field::GrpcHeader(i, f),
                message,
            })?;
            if let Some(r) = &g.retry {
                retry_policy(r).map_err(|(f, message)| InvalidService {
                    field: Field::GrpcRetry(f),
                    message,
                })?;
            }
            if let Some(o) = &g.outlier_detection {
                outlier_detection(o).map_err(|(f, message)| InvalidService {
                    field: Field::GrpcOutlier(f),
                    message,
                })?;
            }
            if let Balancing::OrcaWrr(w) = &g.balancing {
                orca_wrr(w).map_err(|(f, message)| InvalidService {
                    field: Field::GrpcOrcaWrr(f),
                    message,
                })?;
            }
            if let Some(t) = &g.tls {
                grpc_tls(t).map_err(|(f, message)| InvalidService {
                    field: Field::GrpcTls(f),
                    message,
                })?;
            }
        }
        if let Some(l) = &self.locality {
            locality(l).map_err(at(Field::Locality))?;
            if let Some(n) = l.spill_outstanding {
                if self.grpc.is_none() {
                    return Err(InvalidService {
                        field: Field::LocalitySpillOutstanding,
                        message: "spill_outstanding needs the gRPC mode (grpc): the L4 mode \
                                  counts no calls; its spill-over is min_backends"
                            .into(),
                    });
                }
                locality_spill_outstanding(n).map_err(at(Field::LocalitySpillOutstanding))?;
            }
        }
        let spills = self
            .locality
            .as_ref()
            .is_some_and(|l| l.spill_outstanding.is_some());
        for (i, b) in self.backends.iter().enumerate() {
            let Some(w) = b.spill_weight else { continue };
            let f = Field::Backend(i, BackendField::Weight);
            if !spills || b.weight != 0 {
                return Err(InvalidService {
                    field: f,
                    message: format!(
                        "spill_weight {w} is for a backend drained (weight 0) by a locality \
                         policy with spill_outstanding"
                    ),
                });
            }
            if w == 0 {
                return Err(InvalidService {
                    field: f,
                    message: "spill_weight must be > 0".into(),
                });
            }
            weight(w).map_err(at(f))?;
        }
        if let Some(h) = &self.health_check {
            if self.protocol != Protocol::Tcp {
                return Err(InvalidService {
                    field: Field::HealthCheck,
                    message: "health checks need protocol tcp".into(),
                });
            }
            match h.kind {
                HealthCheckKind::Grpc => {
                    health_service(&h.service).map_err(at(Field::HealthCheckService))?
                }
                HealthCheckKind::Tcp if !h.service.is_empty() => {
                    return Err(InvalidService {
                        field: Field::HealthCheckService,
                        message: "a service name applies to grpc checks only, not tcp".into(),
                    });
                }
                HealthCheckKind::Tcp => {}
            }
            health_interval(h.interval).map_err(at(Field::HealthCheckInterval))?;
            health_timeout(h.timeout, h.interval).map_err(at(Field::HealthCheckTimeout))?;
            health_threshold(h.unhealthy_threshold)
                .map_err(at(Field::HealthCheckUnhealthyThreshold))?;
            health_threshold(h.healthy_threshold)
                .map_err(at(Field::HealthCheckHealthyThreshold))?;
        }
        Ok(())
    }

    /// Fills in what may be left out, then validates: a Maglev or
    /// source-hash service without a table size whose backends do not fit
    /// the default gets the smallest size that fits ([`maglev_size_for`]).
    pub fn normalise(&mut self) -> Result<(), InvalidService> {
        if self.needs_maglev_table() && self.maglev_table_size.is_none() {
            let live = self.live_backends();
            if maglev_fits(DEFAULT_MAGLEV_M, live).is_err()
                && let Some(m) = maglev_size_for(live)
            {
                self.maglev_table_size = Some(m);
            }
        }
        self.validate()
    }
}

/// A service that a node did not take, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The service's name (`namespace/name:port`), or `<unnamed>`.
    pub service: String,
    /// Its address, when that much was readable.
    pub addr: Option<ServiceAddr>,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(a) => write!(f, "{} ({a}): {}", self.service, self.reason),
            None => write!(f, "{}: {}", self.service, self.reason),
        }
    }
}

/// Two services on one address: the index of each later one and of the
/// first that holds its address.
pub fn duplicate_addrs(services: &[Service]) -> Vec<(usize, usize)> {
    let mut first: BTreeMap<ServiceAddr, usize> = BTreeMap::new();
    let mut dups = Vec::new();
    for (i, s) in services.iter().enumerate() {
        if let Some(&j) = first.get(&s.addr()) {
            dups.push((i, j));
        } else {
            first.insert(s.addr(), i);
        }
    }
    dups
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Algorithm, BackendState, GrpcPolicy, HealthCheck, RetryThrottle};

    #[test]
    fn durations_parse_with_units() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("2s"), Ok(ms(2000)));
        assert_eq!(parse_duration(" 1.5s "), Ok(ms(1500)));
        assert_eq!(parse_duration("0.1"), Ok(ms(100)));
        assert_eq!(parse_duration("1m"), Ok(ms(60_000)));
        assert_eq!(
            parse_duration("5 sec").unwrap_err(),
            "unknown unit \"sec\" in \"5 sec\" (use ms, s, m or h)"
        );
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(
            parse_duration("-1s")
                .unwrap_err()
                .contains("not a duration")
        );
    }

    /// Each bad value of an outlier detection names its field and says why.
    #[test]
    fn outlier_detection_values_are_checked() {
        use crate::model::OutlierDetection;
        let base = || {
            let mut s = svc(Algorithm::Random, 2, 0);
            s.grpc = Some(GrpcPolicy {
                outlier_detection: Some(OutlierDetection::default()),
                ..GrpcPolicy::default()
            });
            s
        };
        assert_eq!(base().validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut OutlierDetection)| {
            let mut s = base();
            f(s.grpc.as_mut().unwrap().outlier_detection.as_mut().unwrap());
            s.validate().unwrap_err().to_string()
        };
        let ms = Duration::from_millis;
        assert_eq!(
            bad(&|o| o.consecutive_failures = 0),
            "grpc.outlier_detection.consecutive_failures: consecutive_failures 0 is out of range (expected 1-1000)"
        );
        assert_eq!(
            bad(&|o| o.consecutive_failures = 1001),
            "grpc.outlier_detection.consecutive_failures: consecutive_failures 1001 is out of range (expected 1-1000)"
        );
        assert_eq!(
            bad(&|o| o.base_ejection_time = Duration::ZERO),
            "grpc.outlier_detection.base_ejection_time: ejection time 0ns is out of range (expected 1ms to 3600s)"
        );
        assert_eq!(
            bad(&|o| o.base_ejection_time = Duration::from_micros(1500)),
            "grpc.outlier_detection.base_ejection_time: ejection time 1.5ms must be whole milliseconds"
        );
        assert_eq!(
            bad(&|o| o.max_ejection_time = Duration::from_secs(3601)),
            "grpc.outlier_detection.max_ejection_time: ejection time 3601s is out of range (expected 1ms to 3600s)"
        );
        assert_eq!(
            bad(&|o| o.max_ejection_time = ms(29_999)),
            "grpc.outlier_detection.max_ejection_time: max_ejection_time 29.999s is below base_ejection_time 30s"
        );
        assert_eq!(
            bad(&|o| o.max_ejection_percent = 101),
            "grpc.outlier_detection.max_ejection_percent: max_ejection_percent 101 is out of range (expected 0-100)"
        );
        // The edges are valid.
        for f in [
            &(|o: &mut OutlierDetection| o.consecutive_failures = 1)
                as &dyn Fn(&mut OutlierDetection),
            &|o| o.consecutive_failures = 1000,
            &|o| o.max_ejection_percent = 0,
            &|o| o.max_ejection_percent = 100,
            &|o| {
                o.base_ejection_time = ms(1);
                o.max_ejection_time = ms(1);
            },
            &|o| {
                o.base_ejection_time = Duration::from_secs(3600);
                o.max_ejection_time = Duration::from_secs(3600);
            },
        ] {
            let mut s = base();
            f(s.grpc.as_mut().unwrap().outlier_detection.as_mut().unwrap());
            assert_eq!(s.validate(), Ok(()));
        }
    }

    /// Each bad TLS setting names its field and says why; the good shapes
    /// (terminate only, originate only, both) pass.
    #[test]
    fn grpc_tls_values_are_checked() {
        use crate::model::{GrpcTls, ListenTls, UpstreamTls};
        let listen = || ListenTls {
            cert: "/etc/rpclb/grpc-tls/a/tls.crt".into(),
            key: "/etc/rpclb/grpc-tls/a/tls.key".into(),
            client_ca: None,
        };
        let upstream = || UpstreamTls {
            ca: "/etc/rpclb/grpc-tls/b/ca.crt".into(),
            server_name: None,
            cert: None,
            key: None,
        };
        let with = |t: GrpcTls| {
            let mut s = svc(Algorithm::Random, 2, 0);
            s.grpc = Some(GrpcPolicy {
                tls: Some(t),
                ..GrpcPolicy::default()
            });
            s.validate()
        };
        let ok = [
            GrpcTls {
                listen: Some(listen()),
                upstream: None,
            },
            GrpcTls {
                listen: None,
                upstream: Some(upstream()),
            },
            GrpcTls {
                listen: Some(ListenTls {
                    client_ca: Some("/ca.pem".into()),
                    ..listen()
                }),
                upstream: Some(UpstreamTls {
                    server_name: Some("backend.shop.svc".into()),
                    cert: Some("/c.pem".into()),
                    key: Some("/k.pem".into()),
                    ..upstream()
                }),
            },
            GrpcTls {
                listen: None,
                upstream: Some(UpstreamTls {
                    server_name: Some("10.244.1.2".into()),
                    ..upstream()
                }),
            },
        ];
        for t in ok {
            assert_eq!(with(t.clone()), Ok(()), "{t:?}");
        }
        let bad: Vec<(GrpcTls, &str, &str)> = vec![
            (
                GrpcTls::default(),
                "grpc.tls",
                "names neither listen nor upstream",
            ),
            (
                GrpcTls {
                    listen: Some(ListenTls {
                        cert: "tls.crt".into(),
                        ..listen()
                    }),
                    upstream: None,
                },
                "grpc.tls.listen.cert",
                "must be absolute",
            ),
            (
                GrpcTls {
                    listen: Some(ListenTls {
                        key: String::new(),
                        ..listen()
                    }),
                    upstream: None,
                },
                "grpc.tls.listen.key",
                "must not be empty",
            ),
            (
                GrpcTls {
                    listen: Some(ListenTls {
                        client_ca: Some("/a\nb".into()),
                        ..listen()
                    }),
                    upstream: None,
                },
                "grpc.tls.listen.client_ca",
                "control characters",
            ),
            (
                GrpcTls {
                    listen: None,
                    upstream: Some(UpstreamTls {
                        ca: "ca.crt".into(),
                        ..upstream()
                    }),
                },
                "grpc.tls.upstream.ca",
                "must be absolute",
            ),
            (
                GrpcTls {
                    listen: None,
                    upstream: Some(UpstreamTls {
                        server_name: Some("bad name!".into()),
                        ..upstream()
                    }),
                },
                "grpc.tls.upstream.server_name",
                "not a DNS name or IP address",
            ),
            (
                GrpcTls {
                    listen: None,
                    upstream: Some(UpstreamTls {
                        cert: Some("/c.pem".into()),
                        ..upstream()
                    }),
                },
                "grpc.tls.upstream.key",
                "needs its key",
            ),
            (
                GrpcTls {
                    listen: None,
                    upstream: Some(UpstreamTls {
                        key: Some("/k.pem".into()),
                        ..upstream()
                    }),
                },
                "grpc.tls.upstream.cert",
                "needs its client certificate",
            ),
        ];
        for (t, field, why) in bad {
            let e = with(t).unwrap_err();
            assert_eq!(e.field.to_string(), field, "{e}");
            assert!(e.message.contains(why), "{e}");
        }
    }

    /// Each bad value of a health check names its field and says why.
    #[test]
    fn health_check_values_are_checked() {
        let base = || {
            let mut s = svc(Algorithm::Random, 2, 0);
            s.health_check = Some(HealthCheck::default());
            s
        };
        assert_eq!(base().validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut HealthCheck), proto: Protocol| {
            let mut s = base();
            s.protocol = proto;
            f(s.health_check.as_mut().unwrap());
            s.validate().unwrap_err().to_string()
        };
        let tcp = Protocol::Tcp;
        assert_eq!(
            bad(&|_| {}, Protocol::Udp),
            "health_check: health checks need protocol tcp"
        );
        assert_eq!(
            bad(&|h| h.interval = Duration::from_millis(50), tcp),
            "health_check.interval: interval 50ms is out of range (expected 100ms to 3600s)"
        );
        assert_eq!(
            bad(&|h| h.interval = Duration::from_micros(100_500), tcp),
            "health_check.interval: interval 100.5ms must be whole milliseconds"
        );
        assert_eq!(
            bad(&|h| h.timeout = Duration::from_secs(6), tcp),
            "health_check.timeout: timeout 6s is out of range (expected 10ms up to the interval, 5s)"
        );
        assert_eq!(
            bad(&|h| h.unhealthy_threshold = 0, tcp),
            "health_check.unhealthy_threshold: threshold 0 is out of range (expected 1-100 checks in a row)"
        );
        assert_eq!(
            bad(&|h| h.healthy_threshold = 101, tcp),
            "health_check.healthy_threshold: threshold 101 is out of range (expected 1-100 checks in a row)"
        );
        assert_eq!(
            bad(&|h| h.service = "my service".into(), tcp),
            "health_check.service: service name \"my service\" must be visible ASCII without spaces"
        );
        assert_eq!(
            bad(
                &|h| {
                    h.kind = HealthCheckKind::Tcp;
                    h.service = "x".into();
                },
                tcp
            ),
            "health_check.service: a service name applies to grpc checks only, not tcp"
        );
        // A TCP check on a gRPC-mode service, and the reverse, are fine.
        let mut s = base();
        s.health_check.as_mut().unwrap().kind = HealthCheckKind::Tcp;
        s.grpc = Some(GrpcPolicy::default());
        assert_eq!(s.validate(), Ok(()));
    }

    fn svc(algorithm: Algorithm, active: u32, terminating: u32) -> Service {
        let mut backends = Vec::new();
        for i in 0..active + terminating {
            let mut b = Backend::new(Ipv4Addr::from(0x0af4_0000 + i + 1), 8080);
            if i >= active {
                b.state = BackendState::Terminating;
            }
            backends.push(b);
        }
        Service::new(
            "shop/cart:grpc",
            Ipv4Addr::new(10, 96, 0, 10),
            80,
            Protocol::Tcp,
            algorithm,
            backends,
        )
    }

    /// The rolling-update freeze: 200 ready pods and 10 terminating get a
    /// table sized for the 200 from the controller; every other place must
    /// accept it too.
    #[test]
    fn terminating_backends_do_not_count_for_the_maglev_size() {
        let mut s = svc(Algorithm::Maglev, 200, 10);
        s.maglev_table_size = Some(20_011);
        assert_eq!(s.validate(), Ok(()));
        // Drained (weight 0) ones neither.
        let mut d = svc(Algorithm::SourceHash, 200, 0);
        d.backends.extend((0..5).map(|i| Backend {
            weight: 0,
            ..Backend::new(Ipv4Addr::new(10, 245, 0, i + 1), 8080)
        }));
        d.maglev_table_size = Some(20_011);
        assert_eq!(d.validate(), Ok(()));
        // 201 live backends do not fit.
        let mut t = svc(Algorithm::Maglev, 201, 0);
        t.maglev_table_size = Some(20_011);
        let e = t.validate().unwrap_err();
        assert_eq!(e.field, Field::MaglevTableSize);
        assert_eq!(
            e.to_string(),
            "maglev_table_size: maglev table size 20011 must be > 100 x 201 backends that take new flows = 20100"
        );
    }

    #[test]
    fn normalise_sizes_the_table_for_live_backends_only() {
        let mut s = svc(Algorithm::Maglev, 163, 50);
        s.normalise().unwrap();
        assert_eq!(s.maglev_table_size, None, "163 live fit the default");
        let mut s = svc(Algorithm::Maglev, 200, 10);
        s.normalise().unwrap();
        assert_eq!(s.maglev_table_size, Some(20_011));
        // Not for other algorithms, nor in the gRPC mode.
        let mut r = svc(Algorithm::Random, 500, 0);
        r.normalise().unwrap();
        assert_eq!(r.maglev_table_size, None);
        let mut g = svc(Algorithm::Maglev, 500, 0);
        g.grpc = Some(GrpcPolicy::default());
        g.normalise().unwrap();
        assert_eq!(g.maglev_table_size, None);
        // Without normalising, the default is too small for 200.
        let e = svc(Algorithm::Maglev, 200, 0).validate().unwrap_err();
        assert_eq!(e.field, Field::Backends);
        assert!(e.message.contains("e.g. 20011"), "{e}");
        assert_eq!(maglev_size_for(0), Some(DEFAULT_MAGLEV_M));
        assert_eq!(maglev_size_for(200_000), None);
    }

    #[test]
    fn milli_ratios() {
        assert_eq!(parse_milli("1.5"), Ok(1500));
        assert_eq!(parse_milli("0.1"), Ok(100));
        assert_eq!(parse_milli("2"), Ok(2000));
        assert_eq!(parse_milli(".25"), Ok(250));
        assert_eq!(parse_milli(" 0.001 "), Ok(1));
        for bad in ["", ".", "1.2345", "-1", "1e3", "x", "99999999"] {
            assert!(parse_milli(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_ipv6_service_with_ipv6_backends_is_valid() {
        let mut s = svc(Algorithm::Maglev, 2, 0);
        s.vip = "fd00:10:96::10".parse().unwrap();
        for (i, b) in s.backends.iter_mut().enumerate() {
            b.ip = format!("fd00:10:244::{}", i + 1).parse().unwrap();
        }
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.addr().to_string(), "[fd00:10:96::10]:80/tcp");
        s.backends[0].ip = Ipv4Addr::new(10, 244, 0, 1).into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, Field::Backend(0, BackendField::Ip));
        assert!(
            e.message
                .contains("is IPv4 but the VIP fd00:10:96::10 is IPv6"),
            "{e}"
        );
    }

    /// External front ends follow the VIP's family: an IPv4 service's
    /// external IPs are IPv4, an IPv6 service's IPv6 (its node port goes on
    /// the node's IPv6 addresses).
    #[test]
    fn external_front_ends_follow_the_vip_family() {
        let mut s = svc(Algorithm::Maglev, 2, 0);
        s.external.ips = vec!["192.168.60.1".parse().unwrap()];
        assert_eq!(s.validate(), Ok(()));
        s.external.ips.push("fd00:60::1".parse().unwrap());
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, Field::ExternalIp(1));
        assert!(e.message.contains("is IPv6 but the VIP"), "{e}");
        let mut v6 = svc(Algorithm::Maglev, 2, 0);
        v6.vip = "fd00:10:96::10".parse().unwrap();
        for (i, b) in v6.backends.iter_mut().enumerate() {
            b.ip = format!("fd00:10:244::{}", i + 1).parse().unwrap();
        }
        v6.external.node_port = Some(30080);
        v6.external.ips = vec!["fd00:60::1".parse().unwrap()];
        assert_eq!(v6.validate(), Ok(()));
        v6.external.ips.push("192.168.60.1".parse().unwrap());
        let e = v6.validate().unwrap_err();
        assert_eq!(e.field, Field::ExternalIp(1));
        assert!(e.message.contains("is IPv4 but the VIP"), "{e}");
    }

    #[test]
    fn each_rule_names_its_field() {
        let ok = svc(Algorithm::Maglev, 2, 0);
        assert_eq!(ok.validate(), Ok(()));
        type Change = Box<dyn Fn(&mut Service)>;
        let cases: Vec<(Change, Field, &str)> = vec![
            (Box::new(|s| s.name = " ".into()), Field::Name, "empty"),
            (Box::new(|s| s.name = "a\nb".into()), Field::Name, "control"),
            (
                Box::new(|s| s.vip = Ipv4Addr::UNSPECIFIED.into()),
                Field::Vip,
                "not a unicast",
            ),
            (
                Box::new(|s| s.vip = Ipv4Addr::new(224, 0, 0, 1).into()),
                Field::Vip,
                "not a unicast",
            ),
            (Box::new(|s| s.port = 0), Field::Port, "port 0"),
            (
                Box::new(|s| s.affinity_timeout = Some(Duration::from_secs(86_401))),
                Field::AffinityTimeout,
                "out of range",
            ),
            (
                Box::new(|s| s.affinity_timeout = Some(Duration::ZERO)),
                Field::AffinityTimeout,
                "out of range",
            ),
            (
                Box::new(|s| s.backends[1].port = 0),
                Field::Backend(1, BackendField::Port),
                "port 0",
            ),
            (
                Box::new(|s| s.backends[0].ip = Ipv4Addr::BROADCAST.into()),
                Field::Backend(0, BackendField::Ip),
                "unicast",
            ),
            (
                Box::new(|s| s.backends[1].ip = "fd00:10:244::2".parse().unwrap()),
                Field::Backend(1, BackendField::Ip),
                "backend fd00:10:244::2 is IPv6 but the VIP 10.96.0.10 is IPv4",
            ),
            (
                Box::new(|s| s.vip = "::".parse().unwrap()),
                Field::Vip,
                "not a unicast",
            ),
            (
                Box::new(|s| s.vip = "ff02::1".parse().unwrap()),
                Field::Vip,
                "not a unicast",
            ),
            (
                Box::new(|s| s.vip = "::ffff:10.96.0.1".parse().unwrap()),
                Field::Vip,
                "write the IPv4 address 10.96.0.1",
            ),
            (
                Box::new(|s| s.backends[1].weight = MAX_WEIGHT + 1),
                Field::Backend(1, BackendField::Weight),
                "weight 65536 is too large",
            ),
            (
                Box::new(|s| s.backends[1] = s.backends[0].clone()),
                Field::Backend(1, BackendField::Ip),
                "duplicate backend 10.244.0.1:8080 (also backends[0])",
            ),
            (
                Box::new(|s| s.maglev_table_size = Some(1000)),
                Field::MaglevTableSize,
                "not prime",
            ),
            (
                Box::new(|s| s.maglev_table_size = Some(MAX_MAGLEV_M + 1)),
                Field::MaglevTableSize,
                "too large",
            ),
            (
                Box::new(|s| s.maglev_table_size = Some(101)),
                Field::MaglevTableSize,
                "> 100 x 2",
            ),
            (
                Box::new(|s| {
                    s.protocol = Protocol::Udp;
                    s.grpc = Some(GrpcPolicy::default());
                }),
                Field::Grpc,
                "needs protocol tcp",
            ),
            (
                Box::new(|s| {
                    s.grpc = Some(GrpcPolicy {
                        default_timeout: Duration::ZERO,
                        ..GrpcPolicy::default()
                    })
                }),
                Field::GrpcTimeout,
                "at least 1 ms",
            ),
            (
                Box::new(|s| {
                    s.grpc = Some(GrpcPolicy {
                        add_headers: vec![("x-a".into(), "1".into()), ("Bad".into(), "2".into())],
                        ..GrpcPolicy::default()
                    })
                }),
                Field::GrpcHeader(1, HeaderField::Name),
                "lowercase",
            ),
            (
                Box::new(|s| {
                    s.grpc = Some(GrpcPolicy {
                        add_headers: vec![("x-a".into(), "\u{7f}".into())],
                        ..GrpcPolicy::default()
                    })
                }),
                Field::GrpcHeader(0, HeaderField::Value),
                "visible ASCII",
            ),
            (
                Box::new(|s| {
                    s.grpc = Some(GrpcPolicy {
                        add_headers: vec![("x-a".into(), "1".into()), ("x-a".into(), "2".into())],
                        ..GrpcPolicy::default()
                    })
                }),
                Field::GrpcHeader(1, HeaderField::Name),
                "listed twice",
            ),
        ];
        let retry = |f: fn(&mut RetryPolicy)| -> Change {
            Box::new(move |s| {
                let mut r = RetryPolicy::new(3);
                f(&mut r);
                s.grpc = Some(GrpcPolicy {
                    retry: Some(r),
                    ..GrpcPolicy::default()
                });
            })
        };
        let cases: Vec<(Change, Field, &str)> = cases
            .into_iter()
            .chain([
                (
                    retry(|r| r.max_attempts = 6),
                    Field::GrpcRetry(RetryField::MaxAttempts),
                    "max_attempts 6 is out of range (expected 2-5",
                ),
                (
                    retry(|r| r.max_attempts = 1),
                    Field::GrpcRetry(RetryField::MaxAttempts),
                    "out of range",
                ),
                (
                    retry(|r| r.initial_backoff = Duration::ZERO),
                    Field::GrpcRetry(RetryField::InitialBackoff),
                    "backoff 0ns is out of range",
                ),
                (
                    retry(|r| r.initial_backoff = Duration::from_secs(2)),
                    Field::GrpcRetry(RetryField::MaxBackoff),
                    "max_backoff 1s is below initial_backoff 2s",
                ),
                (
                    retry(|r| r.backoff_multiplier_milli = 500),
                    Field::GrpcRetry(RetryField::BackoffMultiplier),
                    "backoff_multiplier 0.5 is out of range",
                ),
                (
                    retry(|r| r.retryable_status_codes.clear()),
                    Field::GrpcRetry(RetryField::StatusCodes),
                    "at least one",
                ),
                (
                    retry(|r| r.retryable_status_codes = vec![0]),
                    Field::GrpcRetry(RetryField::StatusCodes),
                    "OK is not retryable",
                ),
                (
                    retry(|r| r.retryable_status_codes = vec![14, 8]),
                    Field::GrpcRetry(RetryField::StatusCodes),
                    "sorted",
                ),
                (
                    retry(|r| {
                        r.throttle = Some(RetryThrottle {
                            max_tokens: 0,
                            token_ratio_milli: 100,
                        })
                    }),
                    Field::GrpcRetry(RetryField::MaxTokens),
                    "max_tokens 0 is out of range (expected 1-1000)",
                ),
                (
                    retry(|r| {
                        r.throttle = Some(RetryThrottle {
                            max_tokens: 2,
                            token_ratio_milli: 2001,
                        })
                    }),
                    Field::GrpcRetry(RetryField::TokenRatio),
                    "token_ratio 2.001 is out of range",
                ),
            ])
            .collect();
        let wrr = |f: fn(&mut OrcaWrr)| -> Change {
            Box::new(move |s| {
                let mut w = OrcaWrr::default();
                f(&mut w);
                s.grpc = Some(GrpcPolicy {
                    balancing: Balancing::OrcaWrr(w),
                    ..GrpcPolicy::default()
                });
            })
        };
        let cases: Vec<(Change, Field, &str)> = cases
            .into_iter()
            .chain([
                (
                    wrr(|w| w.blackout_period = Duration::from_secs(3601)),
                    Field::GrpcOrcaWrr(OrcaWrrField::BlackoutPeriod),
                    "blackout_period 3601s is out of range",
                ),
                (
                    wrr(|w| w.blackout_period = Duration::from_micros(1500)),
                    Field::GrpcOrcaWrr(OrcaWrrField::BlackoutPeriod),
                    "whole milliseconds",
                ),
                (
                    wrr(|w| w.weight_expiration_period = Duration::from_millis(99)),
                    Field::GrpcOrcaWrr(OrcaWrrField::WeightExpirationPeriod),
                    "out of range (expected 100ms to 3600s)",
                ),
                (
                    wrr(|w| w.weight_update_period = Duration::from_millis(50)),
                    Field::GrpcOrcaWrr(OrcaWrrField::WeightUpdatePeriod),
                    "weight_update_period 50ms is out of range",
                ),
                (
                    wrr(|w| w.error_utilization_penalty_milli = 100_001),
                    Field::GrpcOrcaWrr(OrcaWrrField::ErrorUtilizationPenalty),
                    "error_utilization_penalty 100.001 is out of range",
                ),
            ])
            .collect();
        // A valid policy passes.
        let mut s = ok.clone();
        retry(|r| r.throttle = Some(RetryThrottle::default()))(&mut s);
        s.validate().unwrap();
        // So do A58's defaults, a blackout of 0 and a penalty of 0.
        wrr(|_| {})(&mut s);
        s.validate().unwrap();
        wrr(|w| {
            w.blackout_period = Duration::ZERO;
            w.error_utilization_penalty_milli = 0;
        })(&mut s);
        s.validate().unwrap();
        for (change, field, needle) in cases {
            let mut s = ok.clone();
            change(&mut s);
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(
                e.message.contains(needle),
                "{e:?} should contain {needle:?}"
            );
        }
    }

    #[test]
    fn duplicate_addresses_name_the_first_holder() {
        let a = svc(Algorithm::Random, 1, 0);
        let mut b = a.clone();
        b.name = "other".into();
        let mut c = a.clone();
        c.port = 81;
        assert_eq!(duplicate_addrs(&[a, c, b]), vec![(2, 0)]);
    }

    /// The gRPC spill-over threshold and the spill weights: each rule's
    /// error, on its field.
    #[test]
    fn locality_spill_outstanding_rules() {
        use crate::model::{Locality, LocalityTier};
        let spill = |n: u32| Locality {
            tiers: vec![LocalityTier::Zone],
            min_backends: 1,
            spill_outstanding: Some(n),
        };
        let mut g = svc(Algorithm::Random, 3, 0);
        g.grpc = Some(GrpcPolicy::default());
        g.locality = Some(spill(50));
        g.backends[2].weight = 0;
        g.backends[2].spill_weight = Some(3);
        assert_eq!(g.validate(), Ok(()));
        for n in [1, MAX_SPILL_OUTSTANDING] {
            g.locality = Some(spill(n));
            assert_eq!(g.validate(), Ok(()), "{n}");
        }
        let check = |s: &Service, field: Field, needle: &str| {
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(
                e.message.contains(needle),
                "{e:?} should contain {needle:?}"
            );
        };
        // Range.
        for n in [0, MAX_SPILL_OUTSTANDING + 1] {
            let mut s = g.clone();
            s.locality = Some(spill(n));
            check(
                &s,
                Field::LocalitySpillOutstanding,
                "out of range (expected 1-1000000",
            );
        }
        // The L4 mode has no outstanding calls.
        let mut l4 = g.clone();
        l4.grpc = None;
        l4.backends[2].spill_weight = None;
        check(&l4, Field::LocalitySpillOutstanding, "needs the gRPC mode");
        assert_eq!(
            l4.validate().unwrap_err().to_string(),
            "locality.spill_outstanding: spill_outstanding needs the gRPC mode (grpc): the L4 mode \
             counts no calls; its spill-over is min_backends"
        );
        // A spill weight on a backend that takes flows, or without the policy.
        let mut s = g.clone();
        s.backends[2].weight = 1;
        check(
            &s,
            Field::Backend(2, BackendField::Weight),
            "drained (weight 0)",
        );
        let mut s = g.clone();
        s.locality = Some(Locality {
            spill_outstanding: None,
            ..spill(1)
        });
        check(
            &s,
            Field::Backend(2, BackendField::Weight),
            "with spill_outstanding",
        );
        let mut s = g.clone();
        s.backends[2].spill_weight = Some(0);
        check(&s, Field::Backend(2, BackendField::Weight), "must be > 0");
        let mut s = g.clone();
        s.backends[2].spill_weight = Some(MAX_WEIGHT + 1);
        check(&s, Field::Backend(2, BackendField::Weight), "too large");
    }

    /// The selector's syntax (docs/policies.md, "Naming, and who may name
    /// what"), each error, and the service rules around it.
    #[test]
    fn selector_names() {
        assert_eq!(
            selector("example:geo"),
            Ok(SelectorRef::Example("example:geo"))
        );
        assert_eq!(
            selector("geo-eu.v2_1"),
            Ok(SelectorRef::Name("geo-eu.v2_1"))
        );
        assert_eq!(selector("0geo"), Ok(SelectorRef::Name("0geo")));
        let max = "a".repeat(MAX_SELECTOR_NAME);
        assert_eq!(selector(&max), Ok(SelectorRef::Name(max.as_str())));
        assert_eq!(
            selector("/opt/sel/geo.o"),
            Ok(SelectorRef::Path("/opt/sel/geo.o"))
        );
        for (bad, needle) in [
            ("", "empty"),
            ("  ", "empty"),
            ("example:nope", "unknown example"),
            ("example:", "unknown example"),
            ("sel/geo.o", "relative path"),
            ("./geo.o", "relative path"),
            ("../geo", "relative path"),
            ("Geo", "lowercase letters"),
            ("-geo", "starting with a letter or digit"),
            (".geo", "starting with a letter or digit"),
            ("_geo", "starting with a letter or digit"),
            ("geo o", "lowercase letters"),
            ("geo:x", "lowercase letters"),
            ("gé", "lowercase letters"),
            ("/opt/a\nb.o", "control characters"),
        ] {
            let e = selector(bad).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
        let long = "a".repeat(MAX_SELECTOR_NAME + 1);
        assert!(selector(&long).unwrap_err().contains("longer than 63"));
        let long_path = format!("/{}", "a".repeat(4096));
        assert!(selector(&long_path).unwrap_err().contains("4096"));

        // On a service: the syntax first, then what the selector can serve.
        let mut s = svc(Algorithm::Random, 16, 0);
        for ok in ["example:geo", "geo", "/opt/geo.o"] {
            s.selector = Some(ok.into());
            assert_eq!(s.validate(), Ok(()), "{ok}");
        }
        let at_selector = |s: &Service, needle: &str| {
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, Field::Selector, "{e}");
            assert!(
                e.message.contains(needle),
                "{e:?} should contain {needle:?}"
            );
        };
        s.selector = Some("Geo".into());
        at_selector(&s, "lowercase letters");
        s.selector = Some("geo".into());
        let mut many = s.clone();
        many.backends
            .push(Backend::new(Ipv4Addr::new(10, 244, 9, 9), 8080));
        at_selector(&many, "at most 16 backends");
        let mut grpc = s.clone();
        grpc.grpc = Some(GrpcPolicy::default());
        at_selector(&grpc, "not the gRPC mode");
        let mut v6 = svc(Algorithm::Random, 0, 0);
        v6.vip = "fd00::10".parse().unwrap();
        v6.selector = Some("geo".into());
        at_selector(&v6, "IPv4 services only");
    }
}
