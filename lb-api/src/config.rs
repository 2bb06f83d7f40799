//! Standalone configuration: a YAML file (`lb-agent --config FILE`, or
//! `lb-controller --config FILE`) turned
//! into the desired-state model. The format is documented in docs/config.md.
//!
//! Every error names the file, the line and column, and the field path, as in
//! `services.yaml:7:16: services[0].algorithm: unknown algorithm "fastest" (...)`.
//!
//! # The YAML crate: serde-saphyr
//!
//! serde_yaml is deprecated upstream. serde-saphyr replaces it: it is
//! maintained (2.2, 40 releases; fuzzed, no `unsafe`), reads YAML 1.2
//! (anchors, aliases, merge keys, flow and block style, quoting, comments)
//! and multi-document streams (the deploy/ manifest tests need those), builds
//! on our Rust (MSRV 1.89), is already in Cargo.lock through kube-client, and
//! has `Spanned<T>`: one serde parse into typed structs gives the line and
//! column of every value. The others: serde_yaml_ng and serde_norway are forks
//! of serde_yaml on (unsafe-)libyaml, with positions only in errors, so the
//! second, position-finding pass would stay; saphyr has a node tree with marks
//! but no serde (saphyr-serde is an empty 0.0.0); yaml-rust2 is in
//! maintenance only (saphyr is its successor) and has marks only in parser
//! events; marked-yaml refuses anchors and aliases; serde_yml says itself that
//! it is unmaintained, and is now a shim over another crate.
//!
//! # How positions are found
//!
//! Every value in the file is read as an `At<T>`: the value and its position
//! (serde-saphyr's `Spanned`). Field-level checks (addresses, ports, names,
//! algorithms, weights, Maglev primality, ...) run inside the field's own
//! `Deserialize` impl, so serde-saphyr gives their errors the value's
//! position, and `serde_path_to_error` gives their field path. Missing fields
//! and the checks that span fields (`Service::normalise` from
//! `lb_api::validate`, duplicate services) run after parsing, on values that
//! carry their positions. There is one parse, and no second pass for
//! positions.
//!
//! Positions and field paths serve only error messages, and cost more than
//! half of the parse (serde_path_to_error copies every key; 5,000 services:
//! 1.3-1.6 s with them, 0.45-0.57 s without). So [`parse`] first reads the
//! file without them (`read_fast`: the same types and checks, every `At` at
//! `Location::UNKNOWN`) and, only when that fails, again with them for the
//! message; that second read decides.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use crate::locality::{NodeLocation, NodeLocations};
use crate::model::{
    Algorithm, Backend, BackendState, Balancing, DEFAULT_GRPC_TIMEOUT, DesiredState, External,
    GrpcPolicy, GrpcTls, HealthCheck, HealthCheckKind, ListenTls, Locality, LocalityTier, OrcaWrr,
    OutlierDetection, Protocol, RetryPolicy, RetryThrottle, Service, TrafficPolicy, UpstreamTls,
};
use crate::validate::{
    self, BackendField, Field, HeaderField, OrcaWrrField, OutlierField, RetryField, TlsField,
};
use serde::Deserialize;
use serde::de::{self, Deserializer, Expected, MapAccess, SeqAccess, Unexpected, Visitor};
use serde_saphyr::{Location, Spanned};

pub use crate::model::MAX_WEIGHT;
pub use crate::validate::MAX_MAGLEV_M;

/// What a config file describes: the services to balance and the conntrack
/// idle timeouts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub state: DesiredState,
    pub timeouts: Timeouts,
    /// `nodes:`: where each node is (zone, region), for the services'
    /// locality policies (docs/policies.md). Not sent to agents: the
    /// controller resolves each node's state with it.
    pub nodes: NodeLocations,
}

/// Conntrack idle timeouts: a flow idle for longer than its state's timeout is
/// expired by the agent's GC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP flow that has seen only the client's SYN.
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    /// TCP flow after a FIN or RST.
    pub tcp_closing: Duration,
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn: Duration::from_secs(60),
            tcp_established: Duration::from_secs(6 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: cannot read config: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(InvalidConfig),
}

impl ConfigError {
    /// The details of an invalid config; `None` for a read error.
    pub fn invalid(&self) -> Option<&InvalidConfig> {
        match self {
            ConfigError::Invalid(e) => Some(e),
            ConfigError::Read { .. } => None,
        }
    }
}

/// Where a config is wrong, and why. Displays as
/// `ORIGIN:LINE:COLUMN: PATH: MESSAGE` (position and path when known).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidConfig {
    /// The file name (or other origin) given to [`parse`] or [`load`].
    pub origin: String,
    /// 1-based line and column.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Field path such as `services[0].backends[1].port`; empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        origin: origin.clone(),
        source,
    })?;
    parse(&text, &origin)
}

/// Parses and validates config text; `origin` (usually the file name) starts
/// every error message.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    // The fast path: the same parse and checks without positions or field
    // paths (those cost more than half of the parse: a file of 5,000
    // services took 1.6 s). Positions serve only error messages, so a file
    // the fast path refuses is read again with them, for the message; that
    // slower read decides.
    if let Ok(config) = read_fast(text).and_then(build) {
        return Ok(config);
    }
    read(text).and_then(build).map_err(|p| {
        let known = p.at.filter(|l| *l != Location::UNKNOWN);
        let number = |n: u64| usize::try_from(n).ok();
        ConfigError::Invalid(InvalidConfig {
            origin: origin.to_string(),
            line: known.and_then(|l| number(l.line())),
            column: known.and_then(|l| number(l.column())),
            path: path_string(&p.path),
            message: p.message,
        })
    })
}

/// Services parsed from a file before, by the exact text of their entry
/// under `services:`: see [`parse_cached`].
#[derive(Debug, Default)]
pub struct EntryCache {
    entries: HashMap<Box<str>, Service>,
}

/// [`parse`], parsing again only the service entries whose text changed
/// since the last call with this cache. The result is what [`parse`] gives:
/// the file is cut into its entries only where the cut cannot change what
/// they mean (see [`cut`]); any other file, and any file that fails a check,
/// goes to [`parse`] whole.
pub fn parse_cached(
    text: &str,
    origin: &str,
    cache: &mut EntryCache,
) -> Result<Config, ConfigError> {
    match from_entries(text, cache) {
        Some(config) => Ok(config),
        None => {
            cache.entries.clear();
            parse(text, origin)
        }
    }
}

/// The most bytes [`parse_cached`] cuts: below it, no file can hold
/// `MAX_YAML_NODES` nodes, a budget the whole-file read enforces and the
/// cut reads do not see.
const MAX_CUT_BYTES: usize = MAX_YAML_NODES;

fn from_entries(text: &str, cache: &mut EntryCache) -> Option<Config> {
    let (skeleton, entries) = cut(text)?;
    let rest = read_fast(&skeleton).and_then(build).ok()?;
    if !rest.state.services.is_empty() {
        return None;
    }
    let mut kept = HashMap::with_capacity(entries.len());
    let mut services = Vec::with_capacity(entries.len());
    let mut by_addr = HashMap::new();
    let mut by_name = HashMap::new();
    for entry in entries {
        let svc = match cache.entries.remove(entry).or_else(|| kept.remove(entry)) {
            Some(svc) => svc,
            None => {
                let one = format!("services:\n{entry}");
                let mut c = read_fast(&one).and_then(build).ok()?;
                if c.state.services.len() != 1 {
                    return None;
                }
                c.state.services.pop()?
            }
        };
        // `build`'s checks across services (the rest are the entry's own).
        if by_name.insert(svc.name.clone(), ()).is_some()
            || by_addr.insert(svc.addr(), ()).is_some()
        {
            return None;
        }
        services.push(svc.clone());
        kept.insert(Box::from(entry), svc);
    }
    cache.entries = kept;
    Some(Config {
        state: DesiredState { services },
        timeouts: rest.timeouts,
        nodes: rest.nodes,
    })
}

/// Cuts a file into the entries of its top-level `services:` block
/// sequence and the rest (with `services: []` in their place), or `None`
/// when the cut could change what the text means: anything that refers
/// across entries or spans lines in ways the cut does not follow (anchors,
/// aliases, tags, block scalars, directives, documents, tabs, CR), a
/// `services` key not alone on its line at column 0, a line in the sequence
/// indented less than its entries. A quote or flow collection left open at
/// the end of an entry fails that entry's own read.
fn cut(text: &str) -> Option<(String, Vec<&str>)> {
    if text.len() > MAX_CUT_BYTES
        || text
            .bytes()
            .any(|b| matches!(b, b'&' | b'*' | b'!' | b'|' | b'>' | b'%' | b'\t' | b'\r'))
        || text.contains("---")
        || text.contains("...")
        || !text.ends_with('\n')
    {
        return None;
    }
    let mut skeleton = String::new();
    let mut entries = Vec::new();
    let mut lines = text.split_inclusive('\n').peekable();
    // Before `services:`.
    loop {
        let line = lines.next()?;
        if line == "services:\n" {
            skeleton.push_str("services: []\n");
            break;
        }
        skeleton.push_str(line);
    }
    let blank = |l: &str| {
        let t = l.trim_start_matches(' ');
        t == "\n" || t.starts_with('#')
    };
    // Blank and comment lines before the first entry.
    while let Some(line) = lines.next_if(|l| blank(l)) {
        skeleton.push_str(line);
    }
    let first = *lines.peek()?;
    let indent = first.len() - first.trim_start_matches(' ').len();
    if !first[indent..].starts_with("- ") {
        return None;
    }
    // Entries: from a line `{indent}- ` to the next, at column 0, or the end.
    let mut start: Option<usize> = None;
    let mut offset = text.len() - lines.clone().map(str::len).sum::<usize>();
    let mut end = text.len();
    for line in lines {
        let spaces = line.len() - line.trim_start_matches(' ').len();
        if blank(line) || spaces > indent {
        } else if spaces == indent && line[indent..].starts_with("- ") {
            if let Some(s) = start {
                entries.push(&text[s..offset]);
            }
            start = Some(offset);
        } else if spaces == 0 {
            end = offset;
            break;
        } else {
            return None;
        }
        offset += line.len();
    }
    entries.push(&text[start?..end]);
    skeleton.push_str(&text[end..]);
    Some((skeleton, entries))
}

/// An error before it gets its origin: the field path, the position (if
/// known) and the message.
struct Problem {
    path: Vec<Seg>,
    at: Option<Location>,
    message: String,
}

/// A path segment: a mapping key or a sequence index.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

fn path_string(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

// ---------------------------------------------------------------------------
// Raw file structure. Every value is an `At<T>` (the top node is a
// `Spanned<Top>`): `file_path` relies on that. Field types check themselves
// (see `checked` below), so that their errors carry the value's position.
//
// Required fields are `Option`s read with `required`: a missing one is
// reported by `build`, at the position of the mapping that lacks it (serde
// would report it after the mapping's last key, at that key).

const EMPTY_DOCUMENT: &str = "no services: an empty file, or `services:` with nothing \
    after it, is refused (a half-written file looks like that); write `services: []` to \
    remove every service";

/// Always read from a mapping (see `Top`).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Required: `None` for a missing key and for `services:` with nothing
    /// after it (all entries commented out); both are refused.
    #[serde(default)]
    services: Option<At<Vec<At<RawService>>>>,
    #[serde(default)]
    timeouts: Option<At<RawTimeouts>>,
    /// Where the nodes are, for locality policies.
    #[serde(default)]
    nodes: Option<At<Vec<At<RawNode>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a node mapping (name, zone, region)")]
struct RawNode {
    #[serde(default, deserialize_with = "required")]
    name: Option<At<NodeName>>,
    zone: Option<At<NodeName>>,
    region: Option<At<NodeName>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a locality mapping (tiers, min_backends, spill_outstanding)"
)]
struct RawLocality {
    #[serde(default, deserialize_with = "required")]
    tiers: Option<At<Vec<At<TierField>>>>,
    min_backends: Option<At<MinBackends>>,
    spill_outstanding: Option<At<SpillOutstanding>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of timeouts in seconds")]
struct RawTimeouts {
    tcp_syn: Option<At<Seconds>>,
    tcp_established: Option<At<Seconds>>,
    tcp_closing: Option<At<Seconds>>,
    udp: Option<At<Seconds>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service mapping (name, vip, port, ...)"
)]
struct RawService {
    #[serde(default, deserialize_with = "required")]
    name: Option<At<Name>>,
    #[serde(default, deserialize_with = "required")]
    vip: Option<At<Ip>>,
    #[serde(default, deserialize_with = "required")]
    port: Option<At<Port>>,
    protocol: Option<At<ProtocolField>>,
    algorithm: Option<At<AlgorithmField>>,
    affinity_timeout: Option<At<AffinityTimeout>>,
    maglev_table_size: Option<At<MaglevSize>>,
    #[serde(default)]
    backends: Option<At<Vec<At<RawBackend>>>>,
    /// Present (even `grpc: {}`): the gRPC (L7) mode.
    grpc: Option<At<RawGrpc>>,
    /// Present: active health checks of the backends.
    health_check: Option<At<RawHealthCheck>>,
    /// Kubernetes nodePort.
    node_port: Option<At<Port>>,
    /// externalIPs and load-balancer ingress IPs.
    external_ips: Option<At<Vec<At<Ip>>>>,
    external_traffic_policy: Option<At<TrafficPolicyField>>,
    health_check_node_port: Option<At<Port>>,
    /// Present: a locality policy (docs/policies.md).
    locality: Option<At<RawLocality>>,
    /// QoS limit per backend (docs/policies.md, "QoS limits").
    max_per_backend: Option<At<QosLimit>>,
    /// A user-defined selector (docs/policies.md): an object file or `example:geo`.
    selector: Option<At<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a health check mapping (kind, service, interval, timeout, unhealthy_threshold, healthy_threshold)"
)]
struct RawHealthCheck {
    #[serde(default, deserialize_with = "required")]
    kind: Option<At<HealthKindField>>,
    service: Option<At<String>>,
    interval: Option<At<DurationField>>,
    timeout: Option<At<DurationField>>,
    unhealthy_threshold: Option<At<Threshold>>,
    healthy_threshold: Option<At<Threshold>>,
}

#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a gRPC mode mapping (timeout, headers, retry, outlier_detection, balancing, orca_wrr, tls)"
)]
struct RawGrpc {
    timeout: Option<At<Seconds>>,
    #[serde(default)]
    headers: Option<At<Vec<At<RawHeader>>>>,
    /// Present: a retry policy (gRFC A6).
    retry: Option<At<RawRetry>>,
    /// Present (even `{}`): passive outlier ejection.
    outlier_detection: Option<At<RawOutlier>>,
    /// `p2c` (the default) or `orca_wrr`.
    balancing: Option<At<BalancingField>>,
    /// The `orca_wrr` settings (gRFC A58); only with `balancing: orca_wrr`.
    orca_wrr: Option<At<RawOrcaWrr>>,
    /// Present: TLS to clients and/or backends.
    tls: Option<At<RawTls>>,
}

#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an outlier detection mapping (consecutive_failures, base_ejection_time, max_ejection_time, max_ejection_percent)"
)]
struct RawOutlier {
    consecutive_failures: Option<At<Count>>,
    base_ejection_time: Option<At<DurationField>>,
    max_ejection_time: Option<At<DurationField>>,
    max_ejection_percent: Option<At<Count>>,
}

#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an orca_wrr mapping (blackout_period, weight_expiration_period, weight_update_period, error_utilization_penalty)"
)]
struct RawOrcaWrr {
    blackout_period: Option<At<DurationField>>,
    weight_expiration_period: Option<At<DurationField>>,
    weight_update_period: Option<At<DurationField>>,
    error_utilization_penalty: Option<At<Milli>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a TLS mapping (listen, upstream)")]
struct RawTls {
    listen: Option<At<RawListenTls>>,
    upstream: Option<At<RawUpstreamTls>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a listener TLS mapping (cert, key, client_ca)"
)]
struct RawListenTls {
    #[serde(default, deserialize_with = "required")]
    cert: Option<At<String>>,
    #[serde(default, deserialize_with = "required")]
    key: Option<At<String>>,
    client_ca: Option<At<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an upstream TLS mapping (ca, server_name, cert, key)"
)]
struct RawUpstreamTls {
    #[serde(default, deserialize_with = "required")]
    ca: Option<At<String>>,
    server_name: Option<At<String>>,
    cert: Option<At<String>>,
    key: Option<At<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a retry policy mapping (max_attempts, initial_backoff, max_backoff, backoff_multiplier, retryable_status_codes, throttle)"
)]
struct RawRetry {
    #[serde(default, deserialize_with = "required")]
    max_attempts: Option<At<Count>>,
    initial_backoff: Option<At<DurationField>>,
    max_backoff: Option<At<DurationField>>,
    backoff_multiplier: Option<At<Milli>>,
    retryable_status_codes: Option<At<Vec<At<StatusCode>>>>,
    throttle: Option<At<RawThrottle>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a retry throttle mapping (max_tokens, token_ratio)"
)]
struct RawThrottle {
    max_tokens: Option<At<Count>>,
    token_ratio: Option<At<Milli>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a header mapping (name, value)")]
struct RawHeader {
    #[serde(default, deserialize_with = "required")]
    name: Option<At<HeaderName>>,
    /// Any scalar, as written (`1.10` stays `1.10`).
    #[serde(default, deserialize_with = "required")]
    value: Option<At<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a backend mapping (ip, port, weight, state, node, max)"
)]
struct RawBackend {
    #[serde(default, deserialize_with = "required")]
    ip: Option<At<Ip>>,
    #[serde(default, deserialize_with = "required")]
    port: Option<At<Port>>,
    weight: Option<At<Weight>>,
    state: Option<At<StateField>>,
    /// The backend's node (`--node-name` of the agent there).
    node: Option<At<NodeName>>,
    /// Its own QoS limit, over the service's `max_per_backend`.
    max: Option<At<QosLimit>>,
}

/// For a required field: `None` only when the key is absent (the field's
/// `#[serde(default)]`); a null value is read as `T`, so it is a type error at
/// the value rather than a missing field.
fn required<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

// ---------------------------------------------------------------------------
// Cross-field validation, into the model.

fn build(raw: Option<RawConfig>) -> Result<Config, Problem> {
    let raw = raw.unwrap_or_default();
    // An empty document is what a file caught half-written looks like (a
    // truncation before the rewrite): it never removes every service.
    if raw.services.is_none() {
        return Err(Problem {
            path: Vec::new(),
            at: None,
            message: EMPTY_DOCUMENT.to_string(),
        });
    }
    let t = raw.timeouts.map(|t| t.value).unwrap_or_default();
    let d = Timeouts::default();
    let secs = |s: Option<At<Seconds>>, default| s.map_or(default, |s| s.value.0);
    let timeouts = Timeouts {
        tcp_syn: secs(t.tcp_syn, d.tcp_syn),
        tcp_established: secs(t.tcp_established, d.tcp_established),
        tcp_closing: secs(t.tcp_closing, d.tcp_closing),
        udp: secs(t.udp, d.udp),
    };

    let mut nodes = NodeLocations::new();
    for (i, rn) in raw.nodes.iter().flat_map(|n| &n.value).enumerate() {
        let here = vec![key("nodes"), Seg::Index(i)];
        let name = need(&rn.value.name, "name", &here, rn.at)?.0.clone();
        let text = |v: &Option<At<NodeName>>| v.as_ref().map(|v| v.value.0.clone());
        let loc = NodeLocation {
            zone: text(&rn.value.zone),
            region: text(&rn.value.region),
        };
        if nodes.insert(name.clone(), loc).is_some() {
            return Err(Problem {
                path: [&here[..], &[key("name")]].concat(),
                at: rn.value.name.as_ref().map(|n| n.at),
                message: format!("duplicate node {name:?}"),
            });
        }
    }
    let raw_services = raw.services.map(|s| s.value).unwrap_or_default();
    let mut services = Vec::with_capacity(raw_services.len());
    let mut by_addr = HashMap::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (i, rs) in raw_services.iter().enumerate() {
        let mut svc = service(i, rs)?;
        if let Some(&j) = by_name.get(&svc.name) {
            return Err(field_problem(
                i,
                rs,
                Field::Name,
                format!("duplicate service name {:?} (also services[{j}])", svc.name),
            ));
        }
        by_name.insert(svc.name.clone(), i);
        // The one validation (lb_api::validate), with the file's positions.
        svc.normalise()
            .map_err(|e| field_problem(i, rs, e.field, e.message))?;
        if let Some(j) = by_addr.insert(svc.addr(), i) {
            return Err(field_problem(
                i,
                rs,
                Field::Vip,
                format!("duplicate service {} (also services[{j}])", svc.addr()),
            ));
        }
        services.push(svc);
    }
    Ok(Config {
        state: DesiredState { services },
        timeouts,
        nodes,
    })
}

/// `services[i]` as a model service (not yet normalised); fails only on a
/// missing field.
fn service(i: usize, rs: &At<RawService>) -> Result<Service, Problem> {
    let here = vec![key("services"), Seg::Index(i)];
    let s = &rs.value;
    let name = need(&s.name, "name", &here, rs.at)?.0.clone();
    let vip = need(&s.vip, "vip", &here, rs.at)?.0;
    let port = need(&s.port, "port", &here, rs.at)?.0;
    let mut backends = Vec::new();
    for (j, rb) in s.backends.iter().flat_map(|b| &b.value).enumerate() {
        let here = [&here[..], &[key("backends"), Seg::Index(j)]].concat();
        let b = &rb.value;
        backends.push(Backend {
            ip: need(&b.ip, "ip", &here, rb.at)?.0,
            port: need(&b.port, "port", &here, rb.at)?.0,
            weight: b.weight.as_ref().map_or(1, |w| w.value.0),
            state: b.state.as_ref().map_or(BackendState::Active, |s| s.value.0),
            node: b.node.as_ref().map(|n| n.value.0.clone()),
            max: b.max.as_ref().map(|m| m.value.0),
            // Only the locality resolution sets it.
            spill_weight: None,
        });
    }
    let grpc = match &s.grpc {
        None => None,
        Some(g) => {
            let mut add_headers = Vec::new();
            for (k, rh) in g.value.headers.iter().flat_map(|h| &h.value).enumerate() {
                let here = [&here[..], &[key("grpc"), key("headers"), Seg::Index(k)]].concat();
                add_headers.push((
                    need(&rh.value.name, "name", &here, rh.at)?.0.clone(),
                    need(&rh.value.value, "value", &here, rh.at)?.clone(),
                ));
            }
            Some(GrpcPolicy {
                default_timeout: g
                    .value
                    .timeout
                    .as_ref()
                    .map_or(DEFAULT_GRPC_TIMEOUT, |t| t.value.0),
                add_headers,
                balancing: match (&g.value.balancing, &g.value.orca_wrr) {
                    (
                        None
                        | Some(At {
                            value: BalancingField(false),
                            ..
                        }),
                        Some(o),
                    ) => {
                        return Err(Problem {
                            path: [&here[..], &[key("grpc"), key("orca_wrr")]].concat(),
                            at: Some(o.at),
                            message: "orca_wrr settings need `balancing: orca_wrr`".into(),
                        });
                    }
                    (
                        None
                        | Some(At {
                            value: BalancingField(false),
                            ..
                        }),
                        None,
                    ) => Balancing::P2c,
                    (Some(_), o) => {
                        let d = OrcaWrr::default();
                        let o = o.as_ref().map(|o| &o.value);
                        let dur = |f: Option<&Option<At<DurationField>>>, default: Duration| {
                            f.and_then(Option::as_ref).map_or(default, |v| v.value.0)
                        };
                        Balancing::OrcaWrr(OrcaWrr {
                            blackout_period: dur(o.map(|o| &o.blackout_period), d.blackout_period),
                            weight_expiration_period: dur(
                                o.map(|o| &o.weight_expiration_period),
                                d.weight_expiration_period,
                            ),
                            weight_update_period: dur(
                                o.map(|o| &o.weight_update_period),
                                d.weight_update_period,
                            ),
                            error_utilization_penalty_milli: o
                                .and_then(|o| o.error_utilization_penalty.as_ref())
                                .map_or(d.error_utilization_penalty_milli, |m| m.value.0),
                        })
                    }
                },
                retry: match &g.value.retry {
                    None => None,
                    Some(r) => {
                        let here = [&here[..], &[key("grpc"), key("retry")]].concat();
                        let v = &r.value;
                        let d =
                            RetryPolicy::new(need(&v.max_attempts, "max_attempts", &here, r.at)?.0);
                        let mut codes: Vec<u32> = match &v.retryable_status_codes {
                            Some(c) => c.value.iter().map(|c| c.value.0).collect(),
                            None => d.retryable_status_codes.clone(),
                        };
                        codes.sort_unstable();
                        codes.dedup();
                        Some(RetryPolicy {
                            initial_backoff: v
                                .initial_backoff
                                .as_ref()
                                .map_or(d.initial_backoff, |b| b.value.0),
                            max_backoff: v
                                .max_backoff
                                .as_ref()
                                .map_or(d.max_backoff, |b| b.value.0),
                            backoff_multiplier_milli: v
                                .backoff_multiplier
                                .as_ref()
                                .map_or(d.backoff_multiplier_milli, |m| m.value.0),
                            retryable_status_codes: codes,
                            throttle: v.throttle.as_ref().map(|t| {
                                let dt = RetryThrottle::default();
                                RetryThrottle {
                                    max_tokens: t
                                        .value
                                        .max_tokens
                                        .as_ref()
                                        .map_or(dt.max_tokens, |m| m.value.0),
                                    token_ratio_milli: t
                                        .value
                                        .token_ratio
                                        .as_ref()
                                        .map_or(dt.token_ratio_milli, |m| m.value.0),
                                }
                            }),
                            ..d
                        })
                    }
                },
                outlier_detection: g.value.outlier_detection.as_ref().map(|o| {
                    let (v, d) = (&o.value, OutlierDetection::default());
                    let base = v
                        .base_ejection_time
                        .as_ref()
                        .map_or(d.base_ejection_time, |t| t.value.0);
                    OutlierDetection {
                        consecutive_failures: v
                            .consecutive_failures
                            .as_ref()
                            .map_or(d.consecutive_failures, |n| n.value.0),
                        base_ejection_time: base,
                        // The default, but never below the base.
                        max_ejection_time: v
                            .max_ejection_time
                            .as_ref()
                            .map_or(d.max_ejection_time.max(base), |t| t.value.0),
                        max_ejection_percent: v
                            .max_ejection_percent
                            .as_ref()
                            .map_or(d.max_ejection_percent, |n| n.value.0),
                    }
                }),
                tls: match &g.value.tls {
                    None => None,
                    Some(t) => {
                        let here = [&here[..], &[key("grpc"), key("tls")]].concat();
                        let text = |v: &Option<At<String>>| v.as_ref().map(|v| v.value.clone());
                        let listen = match &t.value.listen {
                            None => None,
                            Some(l) => {
                                let here = [&here[..], &[key("listen")]].concat();
                                Some(ListenTls {
                                    cert: need(&l.value.cert, "cert", &here, l.at)?.clone(),
                                    key: need(&l.value.key, "key", &here, l.at)?.clone(),
                                    client_ca: text(&l.value.client_ca),
                                })
                            }
                        };
                        let upstream = match &t.value.upstream {
                            None => None,
                            Some(u) => {
                                let here = [&here[..], &[key("upstream")]].concat();
                                Some(UpstreamTls {
                                    ca: need(&u.value.ca, "ca", &here, u.at)?.clone(),
                                    server_name: text(&u.value.server_name),
                                    cert: text(&u.value.cert),
                                    key: text(&u.value.key),
                                })
                            }
                        };
                        Some(GrpcTls { listen, upstream })
                    }
                },
            })
        }
    };
    let health_check = match &s.health_check {
        None => None,
        Some(h) => {
            let here = [&here[..], &[key("health_check")]].concat();
            let r = &h.value;
            let d = HealthCheck::new(need(&r.kind, "kind", &here, h.at)?.0);
            let interval = r.interval.as_ref().map_or(d.interval, |v| v.value.0);
            Some(HealthCheck {
                service: r.service.as_ref().map_or(d.service, |v| v.value.clone()),
                interval,
                // The default timeout, but never above the interval.
                timeout: r
                    .timeout
                    .as_ref()
                    .map_or(d.timeout.min(interval), |v| v.value.0),
                unhealthy_threshold: r
                    .unhealthy_threshold
                    .as_ref()
                    .map_or(d.unhealthy_threshold, |v| v.value.0),
                healthy_threshold: r
                    .healthy_threshold
                    .as_ref()
                    .map_or(d.healthy_threshold, |v| v.value.0),
                ..d
            })
        }
    };
    Ok(Service {
        name,
        vip,
        port,
        protocol: s.protocol.as_ref().map_or(Protocol::Tcp, |p| p.value.0),
        algorithm: s
            .algorithm
            .as_ref()
            .map_or(Algorithm::default(), |a| a.value.0),
        affinity_timeout: s.affinity_timeout.as_ref().map(|a| a.value.0),
        maglev_table_size: s.maglev_table_size.as_ref().map(|m| m.value.0),
        backends,
        grpc,
        health_check,
        external: External {
            node_port: s.node_port.as_ref().map(|p| p.value.0),
            ips: s
                .external_ips
                .iter()
                .flat_map(|v| &v.value)
                .map(|ip| ip.value.0)
                .collect(),
            traffic_policy: s
                .external_traffic_policy
                .as_ref()
                .map_or(TrafficPolicy::Cluster, |p| p.value.0),
            health_check_node_port: s.health_check_node_port.as_ref().map(|p| p.value.0),
        },
        locality: match &s.locality {
            None => None,
            Some(l) => {
                let here = [&here[..], &[key("locality")]].concat();
                Some(Locality {
                    tiers: need(&l.value.tiers, "tiers", &here, l.at)?
                        .iter()
                        .map(|t| t.value.0)
                        .collect(),
                    min_backends: l.value.min_backends.as_ref().map_or(1, |m| m.value.0),
                    spill_outstanding: l.value.spill_outstanding.as_ref().map(|m| m.value.0),
                })
            }
        },
        max_per_backend: s.max_per_backend.as_ref().map(|m| m.value.0),
        selector: s.selector.as_ref().map(|x| x.value.clone()),
    })
}

/// A required field's value, or the error for its absence: at the mapping
/// that lacks it (`here`, at `mapping`), as serde words it.
fn need<'a, T>(
    field: &'a Option<At<T>>,
    name: &str,
    here: &[Seg],
    mapping: Location,
) -> Result<&'a T, Problem> {
    field.as_ref().map(|f| &f.value).ok_or_else(|| Problem {
        path: here.to_vec(),
        at: Some(mapping),
        message: format!("missing field `{name}`"),
    })
}

/// An error about `field` of `services[i]`: its path in the file and its
/// position. Where the field is absent (a value the service left out), the
/// position is that of the nearest enclosing value that is there.
fn field_problem(i: usize, rs: &At<RawService>, field: Field, message: String) -> Problem {
    fn at<T>(v: &Option<At<T>>) -> Option<Location> {
        v.as_ref().map(|v| v.at)
    }
    let s = &rs.value;
    let backend = |j: usize| s.backends.as_ref().and_then(|b| b.value.get(j));
    let header = |k: usize| {
        let headers = s.grpc.as_ref().and_then(|g| g.value.headers.as_ref());
        headers.and_then(|h| h.value.get(k))
    };
    let grpc_headers = || s.grpc.as_ref().and_then(|g| at(&g.value.headers));
    let health = |name: &str, pos: fn(&RawHealthCheck) -> Option<Location>| {
        vec![
            (key("health_check"), at(&s.health_check)),
            (
                key(name),
                s.health_check.as_ref().and_then(|h| pos(&h.value)),
            ),
        ]
    };
    // (segment, its position if present), from the service down to the field.
    let steps: Vec<(Seg, Option<Location>)> = match field {
        Field::Name => vec![(key("name"), at(&s.name))],
        Field::Vip => vec![(key("vip"), at(&s.vip))],
        Field::Port => vec![(key("port"), at(&s.port))],
        Field::AffinityTimeout => vec![(key("affinity_timeout"), at(&s.affinity_timeout))],
        Field::MaglevTableSize => vec![(key("maglev_table_size"), at(&s.maglev_table_size))],
        Field::Backends => vec![(key("backends"), at(&s.backends))],
        Field::NodePort => vec![(key("node_port"), at(&s.node_port))],
        Field::HealthCheckNodePort => {
            vec![(key("health_check_node_port"), at(&s.health_check_node_port))]
        }
        Field::ExternalIp(j) => {
            let ip = s.external_ips.as_ref().and_then(|v| v.value.get(j));
            vec![
                (key("external_ips"), at(&s.external_ips)),
                (Seg::Index(j), ip.map(|ip| ip.at)),
            ]
        }
        Field::Backend(j, f) => {
            let b = backend(j);
            let (name, pos) = match f {
                BackendField::Ip => ("ip", b.and_then(|b| at(&b.value.ip))),
                BackendField::Port => ("port", b.and_then(|b| at(&b.value.port))),
                BackendField::Weight => ("weight", b.and_then(|b| at(&b.value.weight))),
                BackendField::Max => ("max", b.and_then(|b| at(&b.value.max))),
            };
            vec![
                (key("backends"), at(&s.backends)),
                (Seg::Index(j), b.map(|b| b.at)),
                (key(name), pos),
            ]
        }
        Field::Grpc => vec![(key("grpc"), at(&s.grpc))],
        Field::GrpcTimeout => vec![
            (key("grpc"), at(&s.grpc)),
            (
                key("timeout"),
                s.grpc.as_ref().and_then(|g| at(&g.value.timeout)),
            ),
        ],
        Field::GrpcHeader(k, f) => {
            let h = header(k);
            let (name, pos) = match f {
                HeaderField::Name => ("name", h.and_then(|h| at(&h.value.name))),
                HeaderField::Value => ("value", h.and_then(|h| at(&h.value.value))),
            };
            vec![
                (key("grpc"), at(&s.grpc)),
                (key("headers"), grpc_headers()),
                (Seg::Index(k), h.map(|h| h.at)),
                (key(name), pos),
            ]
        }
        Field::GrpcRetry(f) => {
            let retry = s.grpc.as_ref().and_then(|g| g.value.retry.as_ref());
            let throttle = retry.and_then(|r| r.value.throttle.as_ref());
            let mut v = vec![
                (key("grpc"), at(&s.grpc)),
                (key("retry"), retry.map(|r| r.at)),
            ];
            let r = retry.map(|r| &r.value);
            v.extend(match f {
                RetryField::MaxAttempts => {
                    vec![(key("max_attempts"), r.and_then(|r| at(&r.max_attempts)))]
                }
                RetryField::InitialBackoff => {
                    vec![(
                        key("initial_backoff"),
                        r.and_then(|r| at(&r.initial_backoff)),
                    )]
                }
                RetryField::MaxBackoff => {
                    vec![(key("max_backoff"), r.and_then(|r| at(&r.max_backoff)))]
                }
                RetryField::BackoffMultiplier => vec![(
                    key("backoff_multiplier"),
                    r.and_then(|r| at(&r.backoff_multiplier)),
                )],
                RetryField::StatusCodes => vec![(
                    key("retryable_status_codes"),
                    r.and_then(|r| at(&r.retryable_status_codes)),
                )],
                RetryField::MaxTokens => vec![
                    (key("throttle"), throttle.map(|t| t.at)),
                    (
                        key("max_tokens"),
                        throttle.and_then(|t| at(&t.value.max_tokens)),
                    ),
                ],
                RetryField::TokenRatio => vec![
                    (key("throttle"), throttle.map(|t| t.at)),
                    (
                        key("token_ratio"),
                        throttle.and_then(|t| at(&t.value.token_ratio)),
                    ),
                ],
            });
            v
        }
        Field::GrpcOutlier(f) => {
            let o = s
                .grpc
                .as_ref()
                .and_then(|g| g.value.outlier_detection.as_ref());
            let v = o.map(|o| &o.value);
            let pos = match f {
                OutlierField::ConsecutiveFailures => v.and_then(|v| at(&v.consecutive_failures)),
                OutlierField::BaseEjectionTime => v.and_then(|v| at(&v.base_ejection_time)),
                OutlierField::MaxEjectionTime => v.and_then(|v| at(&v.max_ejection_time)),
                OutlierField::MaxEjectionPercent => v.and_then(|v| at(&v.max_ejection_percent)),
            };
            vec![
                (key("grpc"), at(&s.grpc)),
                (key("outlier_detection"), o.map(|o| o.at)),
                (key(f.name()), pos),
            ]
        }
        Field::GrpcOrcaWrr(f) => {
            let o = s.grpc.as_ref().and_then(|g| g.value.orca_wrr.as_ref());
            let pos = o.and_then(|o| match f {
                OrcaWrrField::BlackoutPeriod => at(&o.value.blackout_period),
                OrcaWrrField::WeightExpirationPeriod => at(&o.value.weight_expiration_period),
                OrcaWrrField::WeightUpdatePeriod => at(&o.value.weight_update_period),
                OrcaWrrField::ErrorUtilizationPenalty => at(&o.value.error_utilization_penalty),
            });
            vec![
                (key("grpc"), at(&s.grpc)),
                (key("orca_wrr"), o.map(|o| o.at)),
                (key(f.name()), pos),
            ]
        }
        Field::GrpcTls(f) => {
            let tls = s.grpc.as_ref().and_then(|g| g.value.tls.as_ref());
            let listen = tls.and_then(|t| t.value.listen.as_ref());
            let upstream = tls.and_then(|t| t.value.upstream.as_ref());
            let mut v = vec![(key("grpc"), at(&s.grpc)), (key("tls"), tls.map(|t| t.at))];
            let l = |name: &str, pos: fn(&RawListenTls) -> Option<Location>| {
                vec![
                    (key("listen"), listen.map(|l| l.at)),
                    (key(name), listen.and_then(|l| pos(&l.value))),
                ]
            };
            let u = |name: &str, pos: fn(&RawUpstreamTls) -> Option<Location>| {
                vec![
                    (key("upstream"), upstream.map(|u| u.at)),
                    (key(name), upstream.and_then(|u| pos(&u.value))),
                ]
            };
            v.extend(match f {
                TlsField::Tls => vec![],
                TlsField::ListenCert => l("cert", |r| at(&r.cert)),
                TlsField::ListenKey => l("key", |r| at(&r.key)),
                TlsField::ListenClientCa => l("client_ca", |r| at(&r.client_ca)),
                TlsField::UpstreamCa => u("ca", |r| at(&r.ca)),
                TlsField::UpstreamServerName => u("server_name", |r| at(&r.server_name)),
                TlsField::UpstreamCert => u("cert", |r| at(&r.cert)),
                TlsField::UpstreamKey => u("key", |r| at(&r.key)),
            });
            v
        }
        Field::HealthCheck => vec![(key("health_check"), at(&s.health_check))],
        Field::Locality => vec![(key("locality"), at(&s.locality))],
        Field::LocalitySpillOutstanding => vec![
            (key("locality"), at(&s.locality)),
            (
                key("spill_outstanding"),
                s.locality
                    .as_ref()
                    .and_then(|l| at(&l.value.spill_outstanding)),
            ),
        ],
        Field::MaxPerBackend => vec![(key("max_per_backend"), at(&s.max_per_backend))],
        Field::Selector => vec![(key("selector"), at(&s.selector))],
        Field::HealthCheckService => health("service", |h| at(&h.service)),
        Field::HealthCheckInterval => health("interval", |h| at(&h.interval)),
        Field::HealthCheckTimeout => health("timeout", |h| at(&h.timeout)),
        Field::HealthCheckUnhealthyThreshold => {
            health("unhealthy_threshold", |h| at(&h.unhealthy_threshold))
        }
        Field::HealthCheckHealthyThreshold => {
            health("healthy_threshold", |h| at(&h.healthy_threshold))
        }
    };
    let mut path = vec![key("services"), Seg::Index(i)];
    let mut pos = rs.at;
    for (seg, p) in steps {
        path.push(seg);
        pos = p.unwrap_or(pos);
    }
    Problem {
        path,
        at: Some(pos),
        message,
    }
}

// ---------------------------------------------------------------------------
// Reading the YAML, and its errors.

/// The most YAML nodes (mappings, sequences, scalars) a file may hold.
pub const MAX_YAML_NODES: usize = 4_000_000;

/// The parser's options, the same for [`read`] and [`read_fast`].
fn read_options() -> serde_saphyr::Options {
    // Messages are ours (`yaml_problem`); serde-saphyr's snippets are not wanted.
    // Booleans are YAML 1.2's `true` and `false` only: `protocol: on` is the
    // string "on" (an unknown protocol), not `true`.
    // The parser's default budget (250,000 nodes) refused a file of ~4,100
    // services of 10 backends; the sizes rpclb supports (16,000 services,
    // 250,000 backends at about 5 nodes each) need more. Anchors and aliases
    // keep their default limits.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = MAX_YAML_NODES;
    budget.max_events = 2 * MAX_YAML_NODES;
    serde_saphyr::options! {
        with_snippet: false,
        strict_booleans: true,
        budget: Some(budget),
    }
}

/// Parses the text into the raw structure (`None` for an empty document),
/// with every value's position and, on an error, its field path.
fn read(text: &str) -> Result<Option<RawConfig>, Problem> {
    let mut path = None;
    let top = serde_saphyr::with_deserializer_from_str_with_options(text, read_options(), |de| {
        serde_path_to_error::deserialize::<_, Option<Spanned<Top>>>(de).map_err(|e| {
            path = Some(e.path().clone());
            e.into_inner()
        })
    });
    match top {
        Ok(None) => Ok(None),
        Ok(Some(Spanned {
            value: Top::Config(raw),
            ..
        })) => Ok(Some(*raw)),
        Ok(Some(Spanned {
            value: Top::Other(found),
            referenced,
            ..
        })) => Err(Problem {
            path: Vec::new(),
            at: Some(referenced),
            message: format!("invalid type: {found}, expected {TOP}"),
        }),
        Err(e) => Err(yaml_problem(&e, path.as_ref())),
    }
}

/// [`read`] without positions (every `At` has `Location::UNKNOWN`) and
/// without the field path: what the file holds is the same, the errors are
/// not worded (`parse` reads the file again with [`read`] for those).
fn read_fast(text: &str) -> Result<Option<RawConfig>, Problem> {
    let unworded = || Problem {
        path: Vec::new(),
        at: None,
        message: String::new(),
    };
    let _fast = Unspanned::enter();
    let top = serde_saphyr::with_deserializer_from_str_with_options(text, read_options(), |de| {
        Option::<Top>::deserialize(de)
    })
    .map_err(|_| unworded())?;
    match top {
        None => Ok(None),
        Some(Top::Config(raw)) => Ok(Some(*raw)),
        Some(Top::Other(_)) => Err(unworded()),
    }
}

thread_local! {
    /// Set while [`read_fast`] runs: `At` reads its value without `Spanned`.
    static UNSPANNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Sets [`UNSPANNED`] until dropped (also on a panic).
struct Unspanned(bool);

impl Unspanned {
    fn enter() -> Self {
        Unspanned(UNSPANNED.with(|u| u.replace(true)))
    }
}

impl Drop for Unspanned {
    fn drop(&mut self) {
        UNSPANNED.with(|u| u.set(self.0));
    }
}

const TOP: &str = "a mapping with `services` and `timeouts`";

/// The top node of the file. serde-saphyr gives no position to an error
/// about the top node itself, so a top node of another kind than a mapping
/// is not an error here: `read` reports it, at the node (`Spanned`).
enum Top {
    Config(Box<RawConfig>),
    /// What was found instead, as serde words it (`sequence`, `integer `3``).
    Other(String),
}

impl<'de> Deserialize<'de> for Top {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TopVisitor)
    }
}

struct TopVisitor;

impl TopVisitor {
    fn other<E>(found: Unexpected) -> Result<Top, E> {
        Ok(Top::Other(found.to_string()))
    }
}

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(TOP)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Top, A::Error> {
        let raw = RawConfig::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Top::Config(Box::new(raw)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Self::other(Unexpected::Seq)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Top, E> {
        Self::other(Unexpected::Str(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Top, E> {
        Self::other(Unexpected::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Top, E> {
        Self::other(Unexpected::Signed(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Top, E> {
        Self::other(Unexpected::Unsigned(v))
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Top, E> {
        Self::other(Unexpected::Other("integer"))
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Top, E> {
        Self::other(Unexpected::Other("integer"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Top, E> {
        Self::other(Unexpected::Float(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Top, E> {
        Ok(Top::Config(Box::default()))
    }
}

fn yaml_problem(e: &serde_saphyr::Error, path: Option<&serde_path_to_error::Path>) -> Problem {
    use serde_saphyr::Error as E;
    use serde_saphyr::MessageFormatter;
    use serde_saphyr::localizer::ExternalMessageSource;
    // The error itself, out of the wrappers that add a snippet or an alias's
    // definition site (the position stays the one serde-saphyr reports).
    let mut inner = e;
    while let E::WithSnippet { error, .. } | E::AliasError { error, .. } = inner {
        inner = error;
    }
    let syntax = matches!(inner, E::Eof { .. } | E::InvalidUtf8Input)
        || matches!(inner, E::ExternalMessage { source, .. }
            if matches!(**source, ExternalMessageSource::Parser(_)));
    let mut segs = match path {
        Some(p) if !syntax => file_path(p),
        _ => Vec::new(),
    };
    let message = match inner {
        // serde's wording, as serde_yaml gave it. serde-saphyr's lacks the
        // backticks and says "mapping key" where every mapping here is a struct.
        E::SerdeUnknownField {
            field, expected, ..
        } => {
            // The path ends at the unknown key; the error is about its mapping.
            segs.pop();
            match expected.as_slice() {
                [] => format!("unknown field `{field}`, there are no fields"),
                [one] => format!("unknown field `{field}`, expected `{one}`"),
                [a, b] => format!("unknown field `{field}`, expected `{a}` or `{b}`"),
                all => format!(
                    "unknown field `{field}`, expected one of {}",
                    all.iter()
                        .map(|f| format!("`{f}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        E::DuplicateMappingKey { key: Some(k), .. } => format!("duplicate field `{k}`"),
        other => serde_saphyr::UserMessageFormatter
            .format_message(other)
            .into_owned(),
    };
    Problem {
        path: segs,
        at: e.location(),
        message,
    }
}

/// The file's field path from the deserializer's: each `At` (serde-saphyr's
/// `Spanned`, as is the top node) reads its node as a mapping
/// `{value: ...}`, which adds a `value` segment at the start and after every
/// key and index; those go. An unknown segment (`?`: a key that failed to
/// read, such as a duplicate) goes too.
fn file_path(p: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment;
    let mut segs = Vec::new();
    let mut spanned_next = true;
    for seg in p {
        match seg {
            Segment::Map { key } if spanned_next && key == "value" => spanned_next = false,
            Segment::Map { key } => {
                segs.push(Seg::Key(key.clone()));
                spanned_next = true;
            }
            Segment::Seq { index } => {
                segs.push(Seg::Index(*index));
                spanned_next = true;
            }
            Segment::Enum { .. } | Segment::Unknown => spanned_next = false,
        }
    }
    segs
}

// ---------------------------------------------------------------------------
// Values with positions, and node kinds.

/// serde's `invalid type: X, expected Y`, made as a custom error: serde-saphyr
/// places a custom error at the node that the visitor refused, but its own
/// `invalid_type` at the enclosing key.
fn wrong_kind<E: de::Error>(unexp: Unexpected, exp: &dyn Expected) -> E {
    E::custom(format_args!("invalid type: {unexp}, expected {exp}"))
}

/// Visitor methods that refuse a kind of scalar node with [`wrong_kind`].
macro_rules! refuse {
    ($($kind:ident),*) => { $(refuse!(@ $kind);)* };
    (@bool) => {
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Err(wrong_kind(Unexpected::Bool(v), &self))
        }
    };
    (@i64) => {
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Err(wrong_kind(Unexpected::Signed(v), &self))
        }
        fn visit_i128<E: de::Error>(self, _: i128) -> Result<Self::Value, E> {
            Err(wrong_kind(Unexpected::Other("integer"), &self))
        }
    };
    (@u64) => {
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Err(wrong_kind(Unexpected::Unsigned(v), &self))
        }
        fn visit_u128<E: de::Error>(self, _: u128) -> Result<Self::Value, E> {
            Err(wrong_kind(Unexpected::Other("integer"), &self))
        }
    };
    (@f64) => {
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(wrong_kind(Unexpected::Float(v), &self))
        }
    };
    (@str) => {
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Err(wrong_kind(Unexpected::Str(v), &self))
        }
    };
    (@null) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(wrong_kind(Unexpected::Other("null"), &self))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(wrong_kind(Unexpected::Other("null"), &self))
        }
    };
    (@seq) => {
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(wrong_kind(Unexpected::Seq, &self))
        }
    };
    (@map) => {
        fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(wrong_kind(Unexpected::Map, &self))
        }
    };
}

/// A value from the file and its position (where it is used: for an alias,
/// the `*alias`).
struct At<T> {
    value: T,
    at: Location,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for At<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if UNSPANNED.with(|u| u.get()) {
            return Ok(At {
                value: Kind::<T>::deserialize(d)?.0,
                at: Location::UNKNOWN,
            });
        }
        let s = Spanned::<Kind<T>>::deserialize(d)?;
        Ok(At {
            value: s.value.0,
            at: s.referenced,
        })
    }
}

/// `T` read from a node of any kind. serde-saphyr refuses a node of the wrong
/// kind for a struct or a list itself ("expected mapping start"); this hands
/// every node to `T`'s visitor instead, so the error is serde's usual
/// `invalid type: sequence, expected a service mapping (...)`, and at the
/// node. Scalars go through unchanged.
struct Kind<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Kind<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(AnyNode(d)).map(Kind)
    }
}

struct AnyNode<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for AnyNode<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(v)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.deserialize_map(v)
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Only {
            mapping: true,
            inner: v,
        })
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Only {
            mapping: false,
            inner: v,
        })
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_str(v)
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_string(v)
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_option(v)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_newtype_struct(name, v)
    }
    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf
        unit unit_struct tuple tuple_struct enum identifier ignored_any
    }
}

/// Passes a mapping (or a sequence) to `inner`, and refuses any other node.
struct Only<V> {
    mapping: bool,
    inner: V,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Only<V> {
    type Value = V::Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.inner.expecting(f)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        if self.mapping {
            self.inner.visit_map(map)
        } else {
            Err(wrong_kind(Unexpected::Map, &self))
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        if self.mapping {
            Err(wrong_kind(Unexpected::Seq, &self))
        } else {
            self.inner.visit_seq(seq)
        }
    }
    refuse!(bool, i64, u64, f64, str, null);
}

// ---------------------------------------------------------------------------
// Self-checking field types. Each check runs inside serde-saphyr's call to the
// visitor, which is what gives its error the value's position.

/// A visitor for one scalar field: strings go through `from_str`, integers
/// through `from_int`; anything else is a type error naming `expecting`.
struct Scalar<T> {
    expecting: &'static str,
    from_str: Option<ParseStr<T>>,
    from_int: Option<ParseInt<T>>,
}

type ParseStr<T> = fn(&str) -> Result<T, String>;
type ParseInt<T> = fn(u64) -> Result<T, String>;

impl<'de, T> Visitor<'de> for Scalar<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        match self.from_str {
            Some(parse) => parse(v).map_err(E::custom),
            None => Err(wrong_kind(Unexpected::Str(v), &self)),
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        match self.from_int {
            Some(parse) => parse(v).map_err(E::custom),
            None => Err(wrong_kind(Unexpected::Unsigned(v), &self)),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        match (self.from_int, u64::try_from(v)) {
            (Some(parse), Ok(u)) => parse(u).map_err(E::custom),
            (Some(_), Err(_)) => Err(E::custom(format!(
                "{v} is negative; expected {}",
                self.expecting
            ))),
            (None, _) => Err(wrong_kind(Unexpected::Signed(v), &self)),
        }
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<T, E> {
        Err(wrong_kind(Unexpected::Other("integer"), &self))
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<T, E> {
        Err(wrong_kind(Unexpected::Other("integer"), &self))
    }
    refuse!(bool, f64, null, seq, map);
}

/// A keyword or address field: a string (a YAML string scalar; a number,
/// list or mapping is a type error at the value).
fn str_field<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    parse: ParseStr<T>,
) -> Result<T, D::Error> {
    d.deserialize_any(Scalar {
        expecting,
        from_str: Some(parse),
        from_int: None,
    })
}

/// A free-text field (a name): any scalar, as written (`name: 8080` is the
/// name "8080").
fn text_field<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    parse: ParseStr<T>,
) -> Result<T, D::Error> {
    d.deserialize_str(Scalar {
        expecting,
        from_str: Some(parse),
        from_int: None,
    })
}

fn int_field<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    parse: ParseInt<T>,
) -> Result<T, D::Error> {
    d.deserialize_any(Scalar {
        expecting,
        from_str: None,
        from_int: Some(parse),
    })
}

macro_rules! checked {
    ($(#[$doc:meta])* $name:ident($t:ty) = $kind:ident($expecting:literal, $parse:expr)) => {
        $(#[$doc])*
        struct $name($t);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $kind(d, $expecting, $parse).map($name)
            }
        }
    };
}

checked!(
    /// A service name: not empty, no control characters.
    Name(String) = text_field("a service name", |s| {
        validate::name(s).map(|()| s.to_string())
    })
);

checked!(
    /// IPv4 (`10.96.0.1`) or IPv6 (`fd00:10:96::1`, no brackets).
    Ip(IpAddr) = str_field("an IPv4 or IPv6 address", |s| {
        s.parse::<IpAddr>()
            .map_err(|_| format!("invalid IP address {s:?} (expected IPv4 or IPv6)"))
    })
);

checked!(
    Port(u16) = int_field("a port number (1-65535)", |v| match u16::try_from(v) {
        Ok(p) => validate::port(p).map(|()| p),
        Err(_) => Err(format!("port {v} is out of range (expected 1-65535)")),
    })
);

checked!(
    /// `tcp` or `udp`; Kubernetes' `TCP` and `UDP` are accepted too.
    ProtocolField(Protocol) = str_field("a protocol (tcp or udp)", |s| {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("unknown protocol {s:?} (expected one of: tcp, udp)")),
        }
    })
);

checked!(
    /// `cluster` or `local`; Kubernetes' `Cluster` and `Local` are accepted too.
    TrafficPolicyField(TrafficPolicy) = str_field("a traffic policy (cluster or local)", |s| {
        match s.to_ascii_lowercase().as_str() {
            "cluster" => Ok(TrafficPolicy::Cluster),
            "local" => Ok(TrafficPolicy::Local),
            _ => Err(format!("unknown traffic policy {s:?} (expected one of: cluster, local)")),
        }
    })
);

checked!(
    /// A node name (as `--node-name`): not empty, no control characters.
    NodeName(String) = text_field("a node name", |s| {
        validate::name(s).map(|()| s.to_string())
    })
);

checked!(
    /// `node`, `zone` or `region`.
    TierField(LocalityTier) = str_field("a locality tier (node, zone or region)", |s| {
        s.parse::<LocalityTier>()
    })
);

checked!(
    MinBackends(u32) = int_field("a number of backends (1-10000)", |v| {
        let n = u32::try_from(v).unwrap_or(u32::MAX);
        validate::locality_min_backends(n).map(|()| n)
    })
);

checked!(
    SpillOutstanding(u32) = int_field("a number of outstanding calls (1-1000000)", |v| {
        let n = u32::try_from(v).unwrap_or(u32::MAX);
        validate::locality_spill_outstanding(n).map(|()| n)
    })
);

checked!(
    AlgorithmField(Algorithm) = str_field("an algorithm name", |s| {
        s.parse::<Algorithm>().map_err(|e| e.to_string())
    })
);

checked!(
    StateField(BackendState) = str_field("a backend state (active or terminating)", |s| match s {
        "active" => Ok(BackendState::Active),
        "terminating" => Ok(BackendState::Terminating),
        _ => Err(format!(
            "unknown backend state {s:?} (expected one of: active, terminating)"
        )),
    })
);

checked!(
    Weight(u32) = int_field("a weight (0-65535)", |v| {
        let w = u32::try_from(v).unwrap_or(u32::MAX);
        validate::weight(w).map(|()| w)
    })
);

checked!(
    QosLimit(u32) = int_field("a limit (1-1000000)", |v| {
        let n = u32::try_from(v).unwrap_or(u32::MAX);
        validate::qos_limit(n).map(|()| n)
    })
);

checked!(
    AffinityTimeout(Duration) = int_field("a timeout in seconds (1-86400)", |v| {
        let d = Duration::from_secs(v);
        validate::affinity_timeout(d).map(|()| d)
    })
);

checked!(
    MaglevSize(u32) = int_field("a prime maglev table size", |v| {
        let m = u32::try_from(v).unwrap_or(u32::MAX);
        validate::maglev_table_size(m).map(|()| m)
    })
);

checked!(
    /// A header name for the gRPC mode to add (see `model::check_added_header`).
    HeaderName(String) = text_field("a header name", |s| {
        crate::model::check_added_header(s, "").map(|()| s.to_string())
    })
);

checked!(
    /// `p2c` (false) or `orca_wrr` (true; `orca-wrr` too).
    BalancingField(bool) = str_field("a balancing policy (p2c or orca_wrr)", |s| {
        match s.to_ascii_lowercase().as_str() {
            "p2c" => Ok(false),
            "orca_wrr" | "orca-wrr" => Ok(true),
            _ => Err(format!(
                "unknown balancing {s:?} (expected one of: p2c, orca_wrr)"
            )),
        }
    })
);

checked!(
    HealthKindField(HealthCheckKind) = str_field("a health check kind (grpc or tcp)", |s| {
        s.parse::<HealthCheckKind>()
    })
);

/// A duration: `500ms`, `2s`, `1m`, or a whole number of seconds. Its range
/// is checked by `Service::validate` (it depends on the field).
struct DurationField(Duration);

impl<'de> Deserialize<'de> for DurationField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Scalar {
            expecting: "a duration (e.g. 500ms, 2s, or a number of seconds)",
            from_str: Some(validate::parse_duration),
            from_int: Some(|v| {
                v.checked_mul(1000)
                    .map(Duration::from_millis)
                    .ok_or_else(|| format!("{v} seconds is too long"))
            }),
        })
        .map(DurationField)
    }
}

checked!(
    Count(u32) = int_field("a whole number", |v| {
        u32::try_from(v).map_err(|_| format!("{v} is too large"))
    })
);

checked!(
    Milli(u32) = text_field(
        "a number with at most 3 decimals (e.g. 1.5)",
        validate::parse_milli
    )
);

checked!(
    StatusCode(u32) = text_field(
        "a gRPC status code name (e.g. UNAVAILABLE)",
        crate::model::parse_status_code
    )
);

checked!(
    Threshold(u32) = int_field("a number of checks in a row (1-100)", |v| {
        let n = u32::try_from(v).unwrap_or(u32::MAX);
        validate::health_threshold(n).map(|()| n)
    })
);

checked!(
    Seconds(Duration) = int_field("a timeout in seconds (> 0)", |v| {
        if v == 0 {
            Err("timeout must be at least 1 second".to_string())
        } else {
            Ok(Duration::from_secs(v))
        }
    })
);

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// The issue-11 scale: 5,000 services of 10 backends (about 310,000 YAML
    /// nodes) once breached the parser's default budget of 250,000 nodes.
    #[test]
    fn a_file_of_5000_services_of_10_backends_loads() {
        let mut y = String::from("services:\n");
        for s in 0..5_000u32 {
            y.push_str(&format!(
                "  - name: ns/svc-{s}:grpc\n    vip: 10.96.{}.{}\n    port: 50051\n    backends:\n",
                s / 250,
                s % 250 + 1
            ));
            for i in 0..10u32 {
                let n = s * 10 + i;
                y.push_str(&format!(
                    "      - {{ ip: 10.244.{}.{}, port: 8080 }}\n",
                    n / 250,
                    n % 250 + 1
                ));
            }
        }
        let c = parse(&y, "big.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.state.services.len(), 5_000);
        let mut cache = EntryCache::default();
        assert_eq!(parse_cached(&y, "big.yaml", &mut cache).unwrap(), c);
        assert_eq!(cache.entries.len(), 5_000);
        assert!(c.state.services.iter().all(|s| s.backends.len() == 10));
    }

    /// The fast read (no positions) refuses what the positioned one refuses,
    /// and takes the same config from the rest.
    #[track_caller]
    fn assert_reads_agree(text: &str) {
        let fast = read_fast(text).and_then(build);
        let positioned = read(text).and_then(build);
        match (fast, positioned) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
            (Err(_), Err(_)) => {}
            (Ok(_), Err(p)) => panic!("the fast read took a refused file ({}): {text}", p.message),
            (Err(_), Ok(_)) => panic!("the fast read refused a good file: {text}"),
        }
    }

    #[test]
    fn fast_and_positioned_reads_agree() {
        let docs = include_str!("../../docs/config.md");
        let start = docs.find("<!-- full-example").unwrap();
        let body = &docs[start..][docs[start..].find("```yaml\n").unwrap() + 8..];
        assert_reads_agree(&body[..body.find("```").unwrap()]);
        assert_cached_agrees(ONE, &body[..body.find("```").unwrap()]);
        for text in [
            ONE,
            "services: []\n",
            "services:\n",
            "",
            "[]\n",
            "services:\n  - &a {name: x, vip: 10.96.0.1, port: 80, backends: [{ip: 10.0.0.1, port: 1}]}\n  - {<<: *a, name: y, port: 81}\n",
            "base: &b {ip: 10.0.0.1, port: 1}\nservices: []\n",
            "services:\n- name: a\n  vip: 10.96.0.1\n  port: 80\n  protocol: UDP\n  algorithm: random\n  backends:\n  - {ip: 10.0.0.1, port: 8, weight: 3, state: terminating}\n  - ip: 10.0.0.2\n    port: 9\n",
            "services:\n  - name: g\n    vip: 10.96.0.2\n    port: 50051\n    grpc: {timeout: 5, headers: [{name: x-a, value: 1.10}]}\ntimeouts: {udp: 30, tcp_syn: 5}\n",
            "services:\n  - name: a\n    vip: 10.96.0.1\n    port: 80\n  - name: a\n    vip: 10.96.0.2\n    port: 80\n",
            "services:\n  - name: a\n    vip: 10.96.0.1\n    port: 80\n    colour: red\n",
            "services:\n  - name: a\n    vip: 10.96.0.1\n",
            "services:\n  - {name: a, vip: 10.96.0.1, port: 80, backends: [{ip: 10.0.0.1, port: 1}, {ip: 10.0.0.1, port: 1}]}\n",
        ] {
            assert_reads_agree(text);
        }
    }

    /// `parse_cached`, from an empty cache and from one filled by `before`,
    /// gives what `parse` gives (the same config, or the same error).
    #[track_caller]
    fn assert_cached_agrees(before: &str, text: &str) {
        let want = parse(text, "f.yaml").map_err(|e| e.to_string());
        let mut cache = EntryCache::default();
        let cold = parse_cached(text, "f.yaml", &mut cache).map_err(|e| e.to_string());
        assert_eq!(cold, want, "{text}");
        let mut cache = EntryCache::default();
        let _ = parse_cached(before, "f.yaml", &mut cache);
        let warm = parse_cached(text, "f.yaml", &mut cache).map_err(|e| e.to_string());
        assert_eq!(warm, want, "after {before}: {text}");
    }

    #[test]
    fn cut_takes_entries_only_where_they_mean_the_same() {
        let block = "# c\ntimeouts:\n  udp: 30\nservices:\n\n  # first\n  - name: a\n    vip: 10.96.0.1\n    port: 80\n    backends:\n      - {ip: 10.0.0.1, port: 1}\n# between\n  - {name: b, vip: 10.96.0.2, port: 80}\ntimeouts2: 1\n";
        let (skeleton, entries) = cut(block).unwrap();
        assert_eq!(
            skeleton,
            "# c\ntimeouts:\n  udp: 30\nservices: []\n\n  # first\ntimeouts2: 1\n"
        );
        assert_eq!(
            entries,
            [
                "  - name: a\n    vip: 10.96.0.1\n    port: 80\n    backends:\n      - {ip: 10.0.0.1, port: 1}\n# between\n",
                "  - {name: b, vip: 10.96.0.2, port: 80}\n"
            ]
        );
        assert_eq!(
            cut("services:\n- {name: a}\n- {name: b}\n")
                .unwrap()
                .1
                .len(),
            2
        );
        for refused in [
            "services:\n  - &a {name: a}\n",
            "services:\n  - {name: !!str a}\n",
            "services:\n  - name: |\n      a\n",
            "---\nservices:\n  - {name: a}\n",
            "services: \n  - {name: a}\n",
            "services:\n  - {name: a}\n - {name: b}\n",
            "services:\n  - {name: a}",
            "services:\r\n  - {name: a}\r\n",
            "services:\n  -\n    name: a\n",
            "services: []\n",
            "services:\n",
        ] {
            assert!(cut(refused).is_none(), "{refused}");
        }
    }

    #[test]
    fn cached_parse_gives_what_parse_gives() {
        let svc = |n: u32, port: u32| {
            format!(
                "  - {{name: s{n}, vip: 10.96.0.{n}, port: 80, backends: [{{ip: 10.0.0.1, port: {port}}}]}}\n"
            )
        };
        let file = |ports: &[u32]| {
            let mut y = String::from("timeouts: {udp: 30}\nservices:\n");
            for (n, p) in ports.iter().enumerate() {
                y.push_str(&svc(n as u32 + 1, *p));
            }
            y
        };
        let base = file(&[1, 2, 3]);
        let texts = [
            base.clone(),
            file(&[1, 9, 3]),
            file(&[1, 2]),
            file(&[1, 2, 3, 4]),
            // Moved, duplicated, broken entries; a broken rest.
            format!("services:\n{}{}", svc(2, 2), svc(1, 1)),
            format!("services:\n{}{}", svc(1, 1), svc(1, 1)),
            format!("services:\n{}{}", svc(1, 1), svc(2, 1).replace("10.96.0.2", "10.96.0.1")),
            format!("services:\n{}  - {{name: x, vip: 10.96.0.300, port: 80}}\n", svc(1, 1)),
            format!("services:\n{}  - {{name: x, vip: 10.96.0.9, port: 80, backends: [\n", svc(1, 1)),
            format!("services:\n{}  - {{name: \"x\n  - y\", vip: 10.96.0.9, port: 80}}\n", svc(1, 1)),
            format!("services:\n{}  - {{name: \"x\ntimeouts: {{udp: 3}}\n", svc(1, 1)),
            format!("timeouts: {{udp: 0}}\nservices:\n{}", svc(1, 1)),
            format!("colour: red\nservices:\n{}", svc(1, 1)),
            format!("services:\n{}services:\n{}", svc(1, 1), svc(2, 2)),
            format!("services:\n{}  - {{name: y, vip: 10.96.0.8, port: 80, algorithm: maglev, maglev_table_size: 7, backends: [{{ip: 10.0.0.1, port: 1}}]}}\n", svc(1, 1)),
            "services:\n  - name: a\n    vip: 10.96.0.1\n    port: 80\n    grpc: {headers: [{name: x-a, value: 1.10}]}\n".to_string(),
            "services:\n- name: a\n  vip: 10.96.0.1\n  port: 80\n".to_string(),
        ];
        for before in [base.as_str(), "", texts[1].as_str()] {
            for text in &texts {
                assert_cached_agrees(before, text);
            }
        }
        // Unchanged entries come from the cache: the cut engages here.
        let mut cache = EntryCache::default();
        parse_cached(&base, "f.yaml", &mut cache).unwrap();
        assert_eq!(cache.entries.len(), 3);
        parse_cached(&texts[1], "f.yaml", &mut cache).unwrap();
        assert_eq!(cache.entries.len(), 3);
        assert!(parse_cached(&texts[7], "f.yaml", &mut cache).is_err());
        assert!(cache.entries.is_empty());
    }

    fn err(text: &str) -> InvalidConfig {
        assert_reads_agree(text);
        assert_cached_agrees(ONE, text);
        match parse(text, "services.yaml") {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(ConfigError::Invalid(e)) => e,
            Err(e) => panic!("unexpected {e}"),
        }
    }

    /// Asserts the error's position and path, and that its message contains `needle`.
    #[track_caller]
    fn assert_err(text: &str, pos: (usize, usize), path: &str, needle: &str) {
        let e = err(text);
        assert_eq!((e.line, e.column), (Some(pos.0), Some(pos.1)), "{e}");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(needle), "{e:?} lacks {needle:?}");
    }

    const ONE: &str = "services:\n  - name: a\n    vip: 10.96.0.1\n    port: 80\n";

    #[test]
    fn docs_example_parses() {
        let doc = include_str!("../../docs/config.md");
        let start = doc
            .find("<!-- full-example")
            .expect("marker in docs/config.md");
        let rest = &doc[start..];
        let body = &rest[rest.find("```yaml\n").unwrap() + 8..];
        let yaml = &body[..body.find("```").unwrap()];
        let c = parse(yaml, "docs/config.md").unwrap_or_else(|e| panic!("{e}"));
        let s = &c.state.services;
        assert_eq!(s.len(), 4);

        let b = &s[0];
        assert_eq!(b.name, "my-rpc/rpc-service-b:grpc");
        assert_eq!(b.vip, Ipv4Addr::new(10, 96, 0, 11));
        assert_eq!(b.port, 50052);
        assert_eq!(b.protocol, Protocol::Tcp);
        assert_eq!(b.algorithm, Algorithm::Maglev);
        assert_eq!(b.maglev_table_size, Some(16_381));
        assert_eq!(b.affinity_timeout, None);
        assert_eq!(
            b.backends,
            [
                Backend {
                    max: None,
                    spill_weight: None,
                    node: None,
                    ip: Ipv4Addr::new(10, 244, 2, 2).into(),
                    port: 50052,
                    weight: 1,
                    state: BackendState::Active
                },
                Backend {
                    max: None,
                    spill_weight: None,
                    node: None,
                    ip: Ipv4Addr::new(10, 244, 2, 3).into(),
                    port: 50052,
                    weight: 3,
                    state: BackendState::Active
                },
                Backend {
                    max: None,
                    spill_weight: None,
                    node: None,
                    ip: Ipv4Addr::new(10, 244, 3, 7).into(),
                    port: 50052,
                    weight: 1,
                    state: BackendState::Terminating
                },
                Backend {
                    max: None,
                    spill_weight: None,
                    node: None,
                    ip: Ipv4Addr::new(10, 244, 3, 8).into(),
                    port: 50052,
                    weight: 0,
                    state: BackendState::Active
                },
            ]
        );

        let a = &s[1];
        assert_eq!(a.algorithm, Algorithm::RoundRobin);
        assert_eq!(a.maglev_table_size, None);
        assert_eq!(a.backends.len(), 2);
        assert_eq!(a.backends[1].weight, 2);

        let dns = &s[2];
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.algorithm, Algorithm::SourceHash);
        assert_eq!(dns.affinity_timeout, Some(Duration::from_secs(10_800)));
        // Same VIP as services[1], different port: fine.
        assert_eq!(dns.vip, a.vip);

        let g = s[3].grpc.as_ref().expect("gRPC mode");
        assert_eq!(
            g.balancing,
            Balancing::OrcaWrr(OrcaWrr {
                blackout_period: Duration::from_secs(10),
                weight_update_period: Duration::from_secs(1),
                ..OrcaWrr::default()
            })
        );

        assert_eq!(c.timeouts, Timeouts::default());
    }

    #[test]
    fn defaults() {
        let c = parse(
            "services:\n  - name: a\n    vip: 10.96.0.1\n    port: 80\n    backends: [{ip: 10.244.0.1, port: 8080}]\n",
            "x",
        )
        .unwrap();
        let s = &c.state.services[0];
        assert_eq!(s.protocol, Protocol::Tcp);
        assert_eq!(s.algorithm, Algorithm::Random);
        assert_eq!(s.affinity_timeout, None);
        assert_eq!(s.maglev_table_size, None);
        assert_eq!(
            s.backends,
            [Backend::new(Ipv4Addr::new(10, 244, 0, 1), 8080)]
        );
        assert_eq!(
            c.timeouts,
            Timeouts {
                tcp_syn: Duration::from_secs(60),
                tcp_established: Duration::from_secs(21_600),
                tcp_closing: Duration::from_secs(10),
                udp: Duration::from_secs(60),
            }
        );
    }

    /// `selector` (docs/policies.md): parsed into the model; one validation
    /// refuses it where the kernel cannot call it, at its line.
    #[test]
    fn selector_field() {
        let svc = |vip: &str, extra: &str| {
            format!(
                "services:\n  - name: a\n    vip: {vip}\n    port: 80\n{extra}    selector: example:geo\n    backends: [{{ip: {b}, port: 8080}}]\n",
                b = if vip.contains(':') {
                    "fd00::1"
                } else {
                    "10.244.0.1"
                }
            )
        };
        let c = parse(&svc("10.96.0.1", ""), "x").unwrap();
        assert_eq!(c.state.services[0].selector.as_deref(), Some("example:geo"));
        let e = parse(&svc("fd00::a", ""), "x").unwrap_err().to_string();
        assert!(
            e.contains("selector") && e.contains("IPv4 services only"),
            "{e}"
        );
        let e = parse(&svc("10.96.0.1", "    grpc: {}\n"), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not the gRPC mode"), "{e}");
        let bad = "services:\n  - name: a\n    vip: 10.96.0.1\n    port: 80\n    selector: example:nope\n";
        let e = parse(bad, "x").unwrap_err().to_string();
        assert!(e.contains("unknown example") && e.contains("x:5"), "{e}");
        // A NAME, or an absolute path (this file is the node's own); not a relative path.
        for ok in ["geo-eu", "/opt/sel/geo.o"] {
            let text = svc("10.96.0.1", "").replace("example:geo", ok);
            let c = parse(&text, "x").unwrap();
            assert_eq!(c.state.services[0].selector.as_deref(), Some(ok));
        }
        let e = parse(&bad.replace("example:nope", "sel/geo.o"), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("relative path") && e.contains("x:5"), "{e}");
        let many: String = (1..=17)
            .map(|i| format!("      - {{ip: 10.244.0.{i}, port: 8080}}\n"))
            .collect();
        let text = format!(
            "services:\n  - name: a\n    vip: 10.96.0.1\n    port: 80\n    selector: /opt/sel.o\n    backends:\n{many}"
        );
        let e = parse(&text, "x").unwrap_err().to_string();
        assert!(e.contains("at most 16 backends"), "{e}");
    }

    #[test]
    fn empty_documents() {
        // What a half-written file looks like is refused ...
        for text in [
            "",
            "\n",
            "# nothing yet\n",
            "services:\n",
            "services:\n  # - name: a\n",
            "---\n",
            "timeouts:\n  udp: 30\n",
        ] {
            let e = parse(text, "x").expect_err(text);
            assert!(
                e.to_string().contains("write `services: []`"),
                "{text:?}: {e}"
            );
        }
        // ... and an explicit empty list removes every service.
        for text in ["services: []\n", "services: [] # none\ntimeouts: {}\n"] {
            let c = parse(text, "x").unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(c, Config::default(), "{text:?}");
        }
        // A service without backends is valid (SYNs get a RST).
        let c = parse(&format!("{ONE}    backends:\n"), "x").unwrap();
        assert!(c.state.services[0].backends.is_empty());
    }

    #[test]
    fn locality_and_nodes() {
        use crate::model::{Locality, LocalityTier};
        let text = format!(
            "{ONE}    locality: {{ tiers: [node, zone], min_backends: 2 }}\n\
             nodes:\n  - {{ name: node-a, zone: za, region: r1 }}\n  - {{ name: node-b }}\n"
        );
        assert_reads_agree(&text);
        let c = parse(&text, "x").unwrap();
        assert_eq!(
            c.state.services[0].locality,
            Some(Locality {
                tiers: vec![LocalityTier::Node, LocalityTier::Zone],
                min_backends: 2,
                spill_outstanding: None,
            })
        );
        assert_eq!(c.nodes["node-a"].zone.as_deref(), Some("za"));
        assert_eq!(c.nodes["node-a"].region.as_deref(), Some("r1"));
        assert_eq!(c.nodes["node-b"], NodeLocation::default());
        // min_backends defaults to 1.
        let c = parse(&format!("{ONE}    locality: {{ tiers: [zone] }}\n"), "x").unwrap();
        assert_eq!(
            c.state.services[0].locality,
            Some(Locality::prefer_same_zone())
        );
        assert!(c.nodes.is_empty());
        assert!(
            parse(ONE, "x").unwrap().state.services[0]
                .locality
                .is_none()
        );
        let bad = |extra: &str| err(&format!("{ONE}{extra}"));
        let e = bad("    locality: { tiers: [rack] }\n");
        assert_eq!(e.path, "services[0].locality.tiers[0]", "{e}");
        assert!(e.message.contains("unknown locality tier"), "{e}");
        let e = bad("    locality: { tiers: [zone, node] }\n");
        assert_eq!(e.path, "services[0].locality", "{e}");
        assert!(e.message.contains("narrowest first"), "{e}");
        let e = bad("    locality: { tiers: [] }\n");
        assert!(e.message.contains("at least one tier"), "{e}");
        let e = bad("    locality: { tiers: [zone], min_backends: 0 }\n");
        assert_eq!(e.path, "services[0].locality.min_backends", "{e}");
        // The gRPC mode's spill-over on outstanding calls.
        let text = format!(
            "{ONE}    grpc: {{}}\n    locality: {{ tiers: [zone], min_backends: 1, spill_outstanding: 50 }}\n"
        );
        assert_reads_agree(&text);
        let c = parse(&text, "x").unwrap();
        assert_eq!(
            c.state.services[0].locality,
            Some(Locality {
                spill_outstanding: Some(50),
                ..Locality::prefer_same_zone()
            })
        );
        let e = bad("    grpc: {}\n    locality: { tiers: [zone], spill_outstanding: 0 }\n");
        assert_eq!(e.path, "services[0].locality.spill_outstanding", "{e}");
        assert!(e.message.contains("1-1000000"), "{e}");
        let e = bad("    locality: { tiers: [zone], spill_outstanding: 50 }\n");
        assert_eq!(e.path, "services[0].locality.spill_outstanding", "{e}");
        assert!(e.message.contains("needs the gRPC mode"), "{e}");
        let e = bad("    locality: { min_backends: 2 }\n");
        assert!(e.message.contains("missing field `tiers`"), "{e}");
        let e = bad("nodes:\n  - { name: a, zone: z }\n  - { name: a }\n");
        assert_eq!(e.path, "nodes[1].name", "{e}");
        assert!(e.message.contains("duplicate node"), "{e}");
        let e = bad("nodes:\n  - { zone: z }\n");
        assert!(e.message.contains("missing field `name`"), "{e}");
    }

    #[test]
    fn grpc_mode() {
        let c = parse(&format!("{ONE}    grpc: {{}}\n"), "x").unwrap();
        assert_eq!(
            c.state.services[0].grpc,
            Some(crate::model::GrpcPolicy::default())
        );
        let c = parse(
            &format!(
                "{ONE}    grpc:\n      timeout: 5\n      headers:\n        - {{ name: x-cluster, value: east }}\n"
            ),
            "x",
        )
        .unwrap();
        let g = c.state.services[0].grpc.clone().unwrap();
        assert_eq!(g.default_timeout, Duration::from_secs(5));
        assert_eq!(g.add_headers, vec![("x-cluster".into(), "east".into())]);
        assert!(parse(ONE, "x").unwrap().state.services[0].grpc.is_none());
        assert_err(
            &format!("{ONE}    grpc:\n      headers:\n        - {{ name: X-Up, value: a }}\n"),
            (7, 19),
            "services[0].grpc.headers[0].name",
            "lowercase",
        );
        assert_err(
            &format!(
                "{ONE}    grpc:\n      headers:\n        - {{ name: grpc-timeout, value: 1S }}\n"
            ),
            (7, 19),
            "services[0].grpc.headers[0].name",
            "set by the proxy",
        );
        assert_err(
            &format!("{ONE}    protocol: udp\n    grpc: {{}}\n"),
            (6, 11),
            "services[0].grpc",
            "needs protocol tcp",
        );
        assert_err(
            &format!("{ONE}    grpc: {{ timeout: 0 }}\n"),
            (5, 22),
            "services[0].grpc.timeout",
            "at least 1 second",
        );
    }

    #[test]
    fn grpc_outlier_detection() {
        let od = |yaml: &str| {
            parse(
                &format!("{ONE}    grpc:\n      outlier_detection: {yaml}\n"),
                "x",
            )
            .map(|c| c.state.services[0].grpc.clone().unwrap().outlier_detection)
        };
        // Defaults (Envoy's and gRPC's): 5, 30s, 300s, 10%.
        assert_eq!(od("{}").unwrap(), Some(OutlierDetection::default()));
        assert!(
            parse(&format!("{ONE}    grpc: {{}}\n"), "x")
                .unwrap()
                .state
                .services[0]
                .grpc
                .as_ref()
                .unwrap()
                .outlier_detection
                .is_none(),
            "off unless configured"
        );
        assert_eq!(
            od("{ consecutive_failures: 3, base_ejection_time: 500ms, max_ejection_time: 4s, max_ejection_percent: 50 }")
                .unwrap(),
            Some(OutlierDetection {
                consecutive_failures: 3,
                base_ejection_time: Duration::from_millis(500),
                max_ejection_time: Duration::from_secs(4),
                max_ejection_percent: 50,
            })
        );
        // An omitted maximum is never below the base.
        assert_eq!(
            od("{ base_ejection_time: 10m }")
                .unwrap()
                .unwrap()
                .max_ejection_time,
            Duration::from_secs(600)
        );
        let bad = |yaml: &str, path: &str, needle: &str| {
            let e = od(yaml).unwrap_err().to_string();
            assert!(e.contains(path), "{e} should name {path}");
            assert!(e.contains(needle), "{e} should say {needle}");
        };
        bad(
            "{ consecutive_failures: 0 }",
            "services[0].grpc.outlier_detection.consecutive_failures",
            "out of range (expected 1-1000)",
        );
        bad(
            "{ max_ejection_percent: 150 }",
            "services[0].grpc.outlier_detection.max_ejection_percent",
            "out of range (expected 0-100)",
        );
        bad(
            "{ base_ejection_time: 1m, max_ejection_time: 10s }",
            "services[0].grpc.outlier_detection.max_ejection_time",
            "below base_ejection_time",
        );
        bad(
            "{ interval: 10s }",
            "services[0].grpc.outlier_detection",
            "unknown field `interval`",
        );
        assert_err(
            &format!("{ONE}    grpc:\n      outlier_detection: {{ max_ejection_percent: 101 }}\n"),
            (6, 50),
            "services[0].grpc.outlier_detection.max_ejection_percent",
            "expected 0-100",
        );
    }

    #[test]
    fn grpc_retry() {
        use crate::model::{RetryPolicy, RetryThrottle};
        let c = parse(
            &format!("{ONE}    grpc:\n      retry: {{ max_attempts: 3 }}\n"),
            "x",
        )
        .unwrap();
        let g = c.state.services[0].grpc.clone().unwrap();
        assert_eq!(g.retry, Some(RetryPolicy::new(3)));
        let c = parse(
            &format!(
                "{ONE}    grpc:\n      retry:\n        max_attempts: 5\n        \
                 initial_backoff: 20ms\n        max_backoff: 0.5s\n        \
                 backoff_multiplier: 1.5\n        \
                 retryable_status_codes: [unavailable, RESOURCE_EXHAUSTED, 14]\n        \
                 throttle: {{ max_tokens: 20, token_ratio: 0.25 }}\n"
            ),
            "x",
        )
        .unwrap();
        assert_eq!(
            c.state.services[0].grpc.clone().unwrap().retry,
            Some(RetryPolicy {
                max_attempts: 5,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(500),
                backoff_multiplier_milli: 1500,
                retryable_status_codes: vec![8, 14],
                throttle: Some(RetryThrottle {
                    max_tokens: 20,
                    token_ratio_milli: 250,
                }),
            })
        );
        // The throttle's defaults.
        let c = parse(
            &format!("{ONE}    grpc:\n      retry: {{ max_attempts: 2, throttle: {{}} }}\n"),
            "x",
        )
        .unwrap();
        let r = c.state.services[0].grpc.clone().unwrap().retry.unwrap();
        assert_eq!(r.throttle, Some(RetryThrottle::default()));
        let bad = |yaml: &str, path: &str, needle: &str| {
            let e = parse(&format!("{ONE}    grpc:\n      retry: {yaml}\n"), "x").unwrap_err();
            let text = e.to_string();
            assert!(text.contains(path), "{text} should name {path}");
            assert!(text.contains(needle), "{text} should say {needle}");
        };
        bad(
            "{}",
            "services[0].grpc.retry",
            "missing field `max_attempts`",
        );
        bad(
            "{ max_attempts: 6 }",
            "services[0].grpc.retry.max_attempts",
            "max_attempts 6 is out of range (expected 2-5",
        );
        bad(
            "{ max_attempts: 3, retryable_status_codes: [UNAVAILBLE] }",
            "services[0].grpc.retry.retryable_status_codes[0]",
            "unknown gRPC status code \"UNAVAILBLE\"",
        );
        bad(
            "{ max_attempts: 3, retryable_status_codes: [OK] }",
            "services[0].grpc.retry.retryable_status_codes[0]",
            "OK is not a retryable status",
        );
        bad(
            "{ max_attempts: 3, backoff_multiplier: 0.5 }",
            "services[0].grpc.retry.backoff_multiplier",
            "out of range (expected 1 to 100)",
        );
        bad(
            "{ max_attempts: 3, initial_backoff: 2s }",
            "services[0].grpc.retry.max_backoff",
            "below initial_backoff",
        );
        bad(
            "{ max_attempts: 3, throttle: { max_tokens: 2000 } }",
            "services[0].grpc.retry.throttle.max_tokens",
            "max_tokens 2000 is out of range",
        );
        bad(
            "{ max_attempts: 3, throttle: { token_ratio: 0 } }",
            "services[0].grpc.retry.throttle.token_ratio",
            "token_ratio 0 is out of range",
        );
        bad(
            "{ max_attempts: 3, tries: 2 }",
            "services[0].grpc.retry",
            "unknown field `tries`",
        );
    }

    #[test]
    fn grpc_balancing() {
        let balancing = |yaml: &str| {
            let c =
                parse(&format!("{ONE}    grpc:\n{yaml}"), "x").unwrap_or_else(|e| panic!("{e}"));
            c.state.services[0].grpc.clone().unwrap().balancing
        };
        assert_eq!(balancing("      timeout: 5\n"), Balancing::P2c);
        assert_eq!(balancing("      balancing: p2c\n"), Balancing::P2c);
        assert_eq!(
            balancing("      balancing: orca_wrr\n"),
            Balancing::OrcaWrr(OrcaWrr::default())
        );
        assert_eq!(
            balancing(
                "      balancing: ORCA-WRR\n      orca_wrr:\n        blackout_period: 0\n        \
                 weight_expiration_period: 1m\n        weight_update_period: 250ms\n        \
                 error_utilization_penalty: 0.5\n"
            ),
            Balancing::OrcaWrr(OrcaWrr {
                blackout_period: Duration::ZERO,
                weight_expiration_period: Duration::from_secs(60),
                weight_update_period: Duration::from_millis(250),
                error_utilization_penalty_milli: 500,
            })
        );
        let bad = |yaml: &str, path: &str, needle: &str| {
            let e = parse(&format!("{ONE}    grpc:\n{yaml}"), "x").unwrap_err();
            let text = e.to_string();
            assert!(text.contains(path), "{text} should name {path}");
            assert!(text.contains(needle), "{text} should say {needle}");
        };
        bad(
            "      balancing: wrr\n",
            "services[0].grpc.balancing",
            "unknown balancing \"wrr\" (expected one of: p2c, orca_wrr)",
        );
        bad(
            "      orca_wrr: { blackout_period: 1s }\n",
            "services[0].grpc.orca_wrr",
            "orca_wrr settings need `balancing: orca_wrr`",
        );
        bad(
            "      balancing: p2c\n      orca_wrr: {}\n",
            "services[0].grpc.orca_wrr",
            "need `balancing: orca_wrr`",
        );
        bad(
            "      balancing: orca_wrr\n      orca_wrr: { weight_update_period: 10ms }\n",
            "services[0].grpc.orca_wrr.weight_update_period",
            "weight_update_period 10ms is out of range",
        );
        bad(
            "      balancing: orca_wrr\n      orca_wrr: { error_utilization_penalty: 101 }\n",
            "services[0].grpc.orca_wrr.error_utilization_penalty",
            "out of range (expected 0 to 100)",
        );
        bad(
            "      balancing: orca_wrr\n      orca_wrr: { blackout: 1s }\n",
            "services[0].grpc.orca_wrr",
            "unknown field `blackout`",
        );
    }

    #[test]
    fn grpc_tls() {
        let c = parse(
            &format!(
                "{ONE}    grpc:\n      tls:\n        listen: {{ cert: /t/tls.crt, key: /t/tls.key }}\n        \
                 upstream: {{ ca: /u/ca.crt, server_name: api.shop, cert: /u/c.pem, key: /u/k.pem }}\n"
            ),
            "x",
        )
        .unwrap();
        assert_eq!(
            c.state.services[0].grpc.clone().unwrap().tls,
            Some(GrpcTls {
                listen: Some(ListenTls {
                    cert: "/t/tls.crt".into(),
                    key: "/t/tls.key".into(),
                    client_ca: None,
                }),
                upstream: Some(UpstreamTls {
                    ca: "/u/ca.crt".into(),
                    server_name: Some("api.shop".into()),
                    cert: Some("/u/c.pem".into()),
                    key: Some("/u/k.pem".into()),
                }),
            })
        );
        let bad = |yaml: &str, path: &str, needle: &str| {
            let e = parse(&format!("{ONE}    grpc:\n      tls: {yaml}\n"), "x").unwrap_err();
            let text = e.to_string();
            assert!(text.contains(path), "{text} should name {path}");
            assert!(text.contains(needle), "{text} should say {needle}");
        };
        bad(
            "{}",
            "services[0].grpc.tls",
            "names neither listen nor upstream",
        );
        bad(
            "{ listen: { cert: /a } }",
            "services[0].grpc.tls.listen",
            "missing field `key`",
        );
        bad(
            "{ listen: { cert: a.pem, key: /k } }",
            "services[0].grpc.tls.listen.cert",
            "must be absolute",
        );
        bad(
            "{ upstream: { ca: /ca, server_name: 'a b' } }",
            "services[0].grpc.tls.upstream.server_name",
            "not a DNS name",
        );
        bad(
            "{ upstream: { ca: /ca, cert: /c } }",
            "services[0].grpc.tls.upstream.key",
            "needs its key",
        );
        bad(
            "{ upstream: { ca: /ca, sni: x } }",
            "services[0].grpc.tls.upstream",
            "unknown field `sni`",
        );
    }

    #[test]
    fn health_check() {
        use crate::model::{HealthCheck, HealthCheckKind};
        let c = parse(&format!("{ONE}    health_check: {{ kind: tcp }}\n"), "x").unwrap();
        assert_eq!(
            c.state.services[0].health_check,
            Some(HealthCheck::new(HealthCheckKind::Tcp))
        );
        let c = parse(
            &format!(
                "{ONE}    health_check:\n      kind: grpc\n      service: shop.Cart\n      \
                 interval: 250ms\n      timeout: 0.1s\n      unhealthy_threshold: 2\n      \
                 healthy_threshold: 1\n"
            ),
            "x",
        )
        .unwrap();
        assert_eq!(
            c.state.services[0].health_check,
            Some(HealthCheck {
                kind: HealthCheckKind::Grpc,
                service: "shop.Cart".into(),
                interval: Duration::from_millis(250),
                timeout: Duration::from_millis(100),
                unhealthy_threshold: 2,
                healthy_threshold: 1,
            })
        );
        assert!(
            parse(ONE, "x").unwrap().state.services[0]
                .health_check
                .is_none()
        );
        // Whole seconds as a number.
        let c = parse(
            &format!("{ONE}    health_check: {{ kind: tcp, interval: 10, timeout: 2 }}\n"),
            "x",
        )
        .unwrap();
        let h = c.state.services[0].health_check.clone().unwrap();
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_secs(10), Duration::from_secs(2))
        );
        // No timeout: the default 1 s, cut to a shorter interval.
        let c = parse(
            &format!("{ONE}    health_check: {{ kind: tcp, interval: 200ms }}\n"),
            "x",
        )
        .unwrap();
        let h = c.state.services[0].health_check.clone().unwrap();
        assert_eq!(h.timeout, Duration::from_millis(200));
        assert_err(
            &format!("{ONE}    health_check: {{}}\n"),
            (5, 19),
            "services[0].health_check",
            "missing field `kind`",
        );
        assert_err(
            &format!("{ONE}    health_check: {{ kind: http }}\n"),
            (5, 27),
            "services[0].health_check.kind",
            "unknown health check kind \"http\" (expected grpc or tcp)",
        );
        assert_err(
            &format!("{ONE}    health_check: {{ kind: tcp, interval: 5 sec }}\n"),
            (5, 42),
            "services[0].health_check.interval",
            "unknown unit \"sec\"",
        );
        assert_err(
            &format!("{ONE}    health_check: {{ kind: tcp, interval: 1s, timeout: 2s }}\n"),
            (5, 55),
            "services[0].health_check.timeout",
            "timeout 2s is out of range (expected 10ms up to the interval, 1s)",
        );
        assert_err(
            &format!("{ONE}    health_check: {{ kind: grpc, healthy_threshold: 0 }}\n"),
            (5, 52),
            "services[0].health_check.healthy_threshold",
            "threshold 0 is out of range",
        );
        assert_err(
            &format!("{ONE}    protocol: udp\n    health_check: {{ kind: tcp }}\n"),
            (6, 19),
            "services[0].health_check",
            "health checks need protocol tcp",
        );
        assert_err(
            &format!("{ONE}    health_check: {{ kind: tcp, every: 5 }}\n"),
            (5, 32),
            "services[0].health_check",
            "unknown field `every`",
        );
    }

    #[test]
    fn timeouts() {
        let c = parse(
            "services: []\ntimeouts:\n  tcp_established: 3600\n  udp: 30\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.timeouts.tcp_established, Duration::from_secs(3600));
        assert_eq!(c.timeouts.udp, Duration::from_secs(30));
        assert_eq!(c.timeouts.tcp_syn, Duration::from_secs(60));
        assert_eq!(c.timeouts.tcp_closing, Duration::from_secs(10));
        assert_err(
            "timeouts: { tcp_syn: 0 }\n",
            (1, 22),
            "timeouts.tcp_syn",
            "at least 1 second",
        );
        assert_err(
            "timeouts:\n  tcp_fin: 3\n",
            (2, 3),
            "timeouts",
            "unknown field `tcp_fin`",
        );
        assert_err(
            "timeouts:\n  udp: 1m\n",
            (2, 8),
            "timeouts.udp",
            "invalid type: string \"1m\"",
        );
    }

    #[test]
    fn exact_error_string() {
        let text = "services:\n  - name: my-rpc/rpc-service-b:grpc\n    vip: 10.96.0.11\n    port: 50052\n    protocol: tcp\n    # pick one\n    algorithm: fastest\n";
        let e = parse(text, "services.yaml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "services.yaml:7:16: services[0].algorithm: unknown algorithm \"fastest\" \
             (expected one of: random, round-robin, maglev, source-hash, least-conn)"
        );
    }

    #[test]
    fn unknown_and_missing_fields() {
        assert_err("servicez: []\n", (1, 1), "", "unknown field `servicez`");
        assert_err(
            &format!("{ONE}    algo: maglev\n"),
            (5, 5),
            "services[0]",
            "unknown field `algo`",
        );
        assert_err(
            "services:\n  - name: a\n    port: 80\n",
            (2, 5),
            "services[0]",
            "missing field `vip`",
        );
        assert_err(
            &format!("{ONE}    backends:\n      - {{ ip: 10.244.0.1, port: 1, wieght: 2 }}\n"),
            (6, 36),
            "services[0].backends[0]",
            "unknown field `wieght`",
        );
        assert_err("services: 3\n", (1, 11), "services", "expected a sequence");
        assert_err(
            "- a\n- b\n",
            (1, 1),
            "",
            "expected a mapping with `services` and `timeouts`",
        );
        // A missing field is at the mapping that lacks it, at any depth and in
        // either style.
        assert_err(
            "services:\n  - {name: a, port: 80}\n",
            (2, 5),
            "services[0]",
            "missing field `vip`",
        );
        assert_err(
            &format!("{ONE}    backends:\n      - ip: 10.244.0.1\n"),
            (6, 9),
            "services[0].backends[0]",
            "missing field `port`",
        );
        assert_err(
            &format!("{ONE}    grpc:\n      headers:\n        - name: x-a\n"),
            (7, 11),
            "services[0].grpc.headers[0]",
            "missing field `value`",
        );
        // A required field that is there but null is a type error at the value.
        assert_err(
            "services:\n  - name: a\n    vip: 10.96.0.1\n    port: ~\n",
            (4, 11),
            "services[0].port",
            "invalid type: null, expected a port number",
        );
        // A node of the wrong kind, at the node, with what it should be.
        assert_err(
            "services: [a]\n",
            (1, 12),
            "services[0]",
            "invalid type: string \"a\", expected a service mapping",
        );
        assert_err(
            &format!("{ONE}    grpc: 3\n"),
            (5, 11),
            "services[0].grpc",
            "invalid type: integer `3`, expected a gRPC mode mapping",
        );
        assert_err(
            "hello\n",
            (1, 1),
            "",
            "invalid type: string \"hello\", expected a mapping with `services`",
        );
        // A key named like the span wrapper's own field is still a key.
        assert_err(
            &format!("{ONE}    value: 3\n"),
            (5, 5),
            "services[0]",
            "unknown field `value`, expected one of `name`, `vip`, ",
        );
    }

    #[test]
    fn scalars_as_written() {
        // Free text (names, header values) is taken as written, whatever it
        // looks like; keywords are YAML 1.2 strings (`on` is not `true`).
        let c = parse(
            "services:\n  - name: 8080\n    vip: 10.96.0.1\n    port: 80\n    grpc:\n      headers:\n        - { name: x-v, value: 1.10 }\n",
            "x",
        )
        .unwrap();
        let s = &c.state.services[0];
        assert_eq!(s.name, "8080");
        assert_eq!(
            s.grpc.as_ref().unwrap().add_headers,
            [("x-v".to_string(), "1.10".to_string())]
        );
        assert_err(
            &format!("{ONE}    protocol: on\n"),
            (5, 15),
            "services[0].protocol",
            "unknown protocol \"on\"",
        );
    }

    #[test]
    fn syntax_error() {
        let e = err(&format!("{ONE}   bad: indent\n"));
        assert_eq!((e.line, e.column), (Some(5), Some(4)));
        assert_eq!(e.path, "");
        // The parser's own words (granit-parser's, libyaml's before).
        assert_eq!(
            e.to_string(),
            "services.yaml:5:4: while parsing a block collection, \
             did not find expected '-' indicator"
        );
    }

    #[test]
    fn addresses() {
        let svc = |vip: &str| format!("services:\n  - name: a\n    vip: {vip}\n    port: 80\n");
        assert_err(
            &svc("10.96.0.300"),
            (3, 10),
            "services[0].vip",
            "invalid IP address \"10.96.0.300\"",
        );
        assert_err(
            &format!("{ONE}    backends:\n      - ip: fd00:10:244::1\n        port: 1\n"),
            (6, 13),
            "services[0].backends[0].ip",
            "is IPv6 but the VIP 10.96.0.1 is IPv4",
        );
        assert_err(
            &svc("\"[fd00::1]\""),
            (3, 10),
            "services[0].vip",
            "invalid IP address",
        );
        assert_err(
            &svc("\"\""),
            (3, 10),
            "services[0].vip",
            "invalid IP address \"\"",
        );
        assert_err(
            &svc("[1, 2]"),
            (3, 10),
            "services[0].vip",
            "expected an IPv4 or IPv6 address",
        );
        assert_err(
            &format!("{ONE}    backends:\n      - ip: 10.244.0\n        port: 1\n"),
            (6, 13),
            "services[0].backends[0].ip",
            "invalid IP address",
        );
    }

    #[test]
    fn ipv6_services() {
        let text = "services:\n  - name: ns/a:http\n    vip: fd00:10:96::a\n    port: 80\n    backends:\n      - {ip: \"fd00:10:244::2\", port: 8080}\n      - ip: fd00:10:244:1::3\n        port: 8080\n";
        let c = parse(text, "t").unwrap();
        let s = &c.state.services[0];
        assert_eq!(s.vip, "fd00:10:96::a".parse::<IpAddr>().unwrap());
        assert!(s.is_ipv6());
        assert_eq!(
            s.backends,
            [
                Backend::new("fd00:10:244::2".parse::<IpAddr>().unwrap(), 8080),
                Backend::new("fd00:10:244:1::3".parse::<IpAddr>().unwrap(), 8080),
            ]
        );
    }

    #[test]
    fn ports() {
        let svc =
            |port: &str| format!("services:\n  - name: a\n    vip: 10.96.0.1\n    port: {port}\n");
        assert_err(
            &svc("0"),
            (4, 11),
            "services[0].port",
            "port 0 is not allowed",
        );
        assert_err(
            &svc("65536"),
            (4, 11),
            "services[0].port",
            "port 65536 is out of range",
        );
        assert_err(&svc("-3"), (4, 11), "services[0].port", "-3 is negative");
        assert_err(
            &svc("\"80\""),
            (4, 11),
            "services[0].port",
            "invalid type: string \"80\"",
        );
        assert_err(
            &svc("8.5"),
            (4, 11),
            "services[0].port",
            "invalid type: floating point",
        );
        assert!(parse(&svc("65535"), "x").is_ok());
        assert_err(
            &format!("{ONE}    backends: [{{ip: 10.244.0.1, port: 0}}]\n"),
            (5, 39),
            "services[0].backends[0].port",
            "port 0 is not allowed",
        );
    }

    #[test]
    fn names() {
        assert_err(
            "services:\n  - name: ''\n    vip: 10.96.0.1\n    port: 80\n",
            (2, 11),
            "services[0].name",
            "must not be empty",
        );
        assert_err(
            "services:\n  - name: '  '\n    vip: 10.96.0.1\n    port: 80\n",
            (2, 11),
            "services[0].name",
            "must not be empty",
        );
        assert_err(
            "services: [ {name: a, vip: 10.96.0.1, port: 80}, {name: a, vip: 10.96.0.2, port: 80} ]\n",
            (1, 57),
            "services[1].name",
            "duplicate service name \"a\" (also services[0])",
        );
    }

    #[test]
    fn enums() {
        assert_err(
            &format!("{ONE}    protocol: sctp\n"),
            (5, 15),
            "services[0].protocol",
            "unknown protocol \"sctp\" (expected one of: tcp, udp)",
        );
        let c = parse(&format!("{ONE}    protocol: UDP\n"), "x").unwrap();
        assert_eq!(c.state.services[0].protocol, Protocol::Udp);
        assert_err(
            &format!("{ONE}    algorithm: Maglev\n"),
            (5, 16),
            "services[0].algorithm",
            "unknown algorithm \"Maglev\"",
        );
        for a in Algorithm::ALL {
            let c = parse(&format!("{ONE}    algorithm: {a}\n"), "x").unwrap();
            assert_eq!(c.state.services[0].algorithm, a);
        }
        assert_err(
            &format!("{ONE}    backends: [{{ip: 10.244.0.1, port: 1, state: draining}}]\n"),
            (5, 49),
            "services[0].backends[0].state",
            "unknown backend state \"draining\" (expected one of: active, terminating)",
        );
    }

    #[test]
    fn weights() {
        let b = |w: &str| {
            format!(
                "{ONE}    backends:\n      - ip: 10.244.0.1\n        port: 1\n        weight: {w}\n"
            )
        };
        assert_err(
            &b("70000"),
            (8, 17),
            "services[0].backends[0].weight",
            "weight 70000 is too large (maximum 65535)",
        );
        assert_err(
            &b("-1"),
            (8, 17),
            "services[0].backends[0].weight",
            "-1 is negative",
        );
        let c = parse(&b("65535"), "x").unwrap();
        assert_eq!(c.state.services[0].backends[0].weight, 65_535);
        let c = parse(&b("0"), "x").unwrap();
        assert!(!c.state.services[0].backends[0].takes_new_flows());
    }

    #[test]
    fn affinity() {
        let c = parse(&format!("{ONE}    affinity_timeout: 10800\n"), "x").unwrap();
        assert_eq!(
            c.state.services[0].affinity_timeout,
            Some(Duration::from_secs(10_800))
        );
        assert_err(
            &format!("{ONE}    affinity_timeout: 0\n"),
            (5, 23),
            "services[0].affinity_timeout",
            "out of range",
        );
        assert_err(
            &format!("{ONE}    affinity_timeout: 86401\n"),
            (5, 23),
            "services[0].affinity_timeout",
            "out of range",
        );
    }

    #[test]
    fn duplicate_services() {
        let two = |p2: &str| {
            format!(
                "services:\n  - name: a\n    vip: 10.96.0.1\n    port: 80\n  - name: b\n    vip: 10.96.0.1\n    port: 80\n{p2}"
            )
        };
        assert_err(
            &two(""),
            (6, 10),
            "services[1].vip",
            "duplicate service 10.96.0.1:80/tcp (also services[0])",
        );
        // Same VIP and port over UDP is a different service.
        let c = parse(&two("    protocol: udp\n"), "x").unwrap();
        assert_eq!(c.state.services.len(), 2);
    }

    #[test]
    fn duplicate_backends() {
        let text = format!(
            "{ONE}    backends:\n      - {{ ip: 10.244.2.2, port: 50052 }}\n      - {{ ip: 10.244.2.3, port: 50052 }}\n      - {{port: 50052,   ip: 10.244.2.2 }}\n"
        );
        assert_err(
            &text,
            (8, 29),
            "services[0].backends[2].ip",
            "duplicate backend 10.244.2.2:50052 (also backends[0])",
        );
        // Same IP, other port: fine.
        let ok = format!(
            "{ONE}    backends: [{{ip: 10.244.2.2, port: 1}}, {{ip: 10.244.2.2, port: 2}}]\n"
        );
        assert!(parse(&ok, "x").is_ok());
    }

    fn with_backends(algorithm: &str, size: Option<u32>, n: u32) -> String {
        let mut t = format!("{ONE}    algorithm: {algorithm}\n");
        if let Some(m) = size {
            t.push_str(&format!("    maglev_table_size: {m}\n"));
        }
        t.push_str("    backends:\n");
        for i in 0..n {
            t.push_str(&format!(
                "      - {{ ip: 10.244.{}.{}, port: 80 }}\n",
                i / 256,
                i % 256
            ));
        }
        t
    }

    #[test]
    fn maglev_sizes() {
        assert_err(
            &with_backends("maglev", Some(1000), 2),
            (6, 24),
            "services[0].maglev_table_size",
            "maglev table size 1000 is not prime",
        );
        assert_err(
            &with_backends("source-hash", Some(101), 2),
            (6, 24),
            "services[0].maglev_table_size",
            "maglev table size 101 must be > 100 x 2 backends that take new flows = 200",
        );
        assert_err(
            &with_backends("maglev", Some(4_294_967_291), 2),
            (6, 24),
            "services[0].maglev_table_size",
            "too large",
        );
        // Primality is checked for any algorithm; the size rule only where a table is used.
        assert_err(
            &with_backends("random", Some(1000), 2),
            (6, 24),
            "services[0].maglev_table_size",
            "not prime",
        );
        assert!(parse(&with_backends("random", Some(101), 2), "x").is_ok());
        // Drained and terminating backends do not count (they are not in
        // the table): the rolling-update case.
        let mut t = with_backends("maglev", Some(101), 1);
        t.push_str("      - { ip: 10.244.9.9, port: 80, weight: 0 }\n");
        t.push_str("      - { ip: 10.244.9.10, port: 80, state: terminating }\n");
        assert!(parse(&t, "x").is_ok());
        let c = parse(&with_backends("maglev", Some(65_537), 3), "x").unwrap();
        assert_eq!(c.state.services[0].maglev_table_size, Some(65_537));
    }

    #[test]
    fn maglev_size_grows_when_unset() {
        let c = parse(&with_backends("maglev", None, 163), "x").unwrap();
        assert_eq!(c.state.services[0].maglev_table_size, None);
        let c = parse(&with_backends("maglev", None, 200), "x").unwrap();
        assert_eq!(c.state.services[0].maglev_table_size, Some(20_011));
        // Not for algorithms without a Maglev table.
        let c = parse(&with_backends("least-conn", None, 200), "x").unwrap();
        assert_eq!(c.state.services[0].maglev_table_size, None);
    }

    #[test]
    fn positions_in_block_flow_and_quoted_styles() {
        // The same bad value, written three ways.
        let block = "services:\n- name: a\n  vip: 10.96.0.1\n  port: 80\n  backends:\n  - ip: \"10.244.0.1\"\n    port: 1\n  - ip: '10.244.0.1'\n    port: 1\n";
        assert_err(
            block,
            (8, 9),
            "services[0].backends[1].ip",
            "duplicate backend",
        );
        let flow = "{services: [{name: a, vip: 10.96.0.1, port: 80, backends: [{ip: 10.244.0.1, port: 1}, {ip: 10.244.0.1, port: 1}]}]}\n";
        assert_err(
            flow,
            (1, 92),
            "services[0].backends[1].ip",
            "duplicate backend",
        );
        // Anchors and comments do not confuse the positions.
        let anchors = "# top\nservices:\n  - &svc\n    name: a # trailing\n    vip: 10.96.0.1\n    port: 80\n  - name: b\n    vip: 10.96.0.1\n    port: 80\n";
        assert_err(anchors, (8, 10), "services[1].vip", "duplicate service");
        // A value that comes from an alias is where the alias is used.
        let alias =
            "services:\n  - &svc\n    name: a\n    vip: 10.96.0.1\n    port: 80\n  - *svc\n";
        assert_err(alias, (6, 5), "services[1].name", "duplicate service name");
        // Merge keys (`<<`) work; a merged value is where it is merged.
        let merge = "services:\n  - &svc\n    name: a\n    vip: 10.96.0.1\n    port: 80\n  - <<: *svc\n    name: b\n";
        assert_err(merge, (6, 9), "services[1].vip", "duplicate service");
    }

    #[test]
    fn display_without_position() {
        let e = InvalidConfig {
            origin: "f.yaml".into(),
            line: None,
            column: None,
            path: "services[0].vip".into(),
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "f.yaml: services[0].vip: boom");
    }

    #[test]
    fn load_reads_files_and_names_them() {
        let dir = std::env::temp_dir().join(format!("rpclb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.yaml");
        std::fs::write(&path, format!("{ONE}    port: 81\n")).unwrap();
        let e = load(&path).unwrap_err();
        let shown = path.display().to_string();
        // A duplicate key is reported at the duplicate.
        assert_eq!(
            e.to_string(),
            format!("{shown}:5:5: services[0]: duplicate field `port`")
        );
        std::fs::write(&path, ONE).unwrap();
        assert_eq!(load(&path).unwrap().state.services.len(), 1);

        let missing = dir.join("nope.yaml");
        let e = load(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.invalid().is_none());
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot read config: ", missing.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
