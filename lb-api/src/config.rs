//! Standalone configuration: a YAML file (`lb-agent --config FILE`, or
//! `lb-controller --config FILE`) turned
//! into the desired-state model. The format is documented in docs/config.md.
//!
//! Every error names the file, the line and column, and the field path, as in
//! `services.yaml:7:16: services[0].algorithm: unknown algorithm "fastest" (...)`.
//!
//! How positions are found: field-level checks (addresses, ports, names,
//! algorithms, weights, Maglev primality, ...) run inside the field's own
//! `Deserialize` impl, so serde_yaml attaches the position and path of the
//! offending value itself. Checks that span fields (duplicate services or
//! backends, Maglev size against backend count) run after parsing; their
//! position is found by parsing the text a second time with a seed that walks
//! down to the field's path and fails there on purpose, which makes
//! serde_yaml report that node's position. Both use the real YAML parser, so
//! block and flow styles, comments, quoting and anchors are all handled. A
//! position is missing only where serde_yaml has none (e.g. an empty file).

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use crate::model::{
    Algorithm, Backend, BackendState, DEFAULT_GRPC_TIMEOUT, DesiredState, GrpcPolicy, Protocol,
    Service,
};
use crate::validate::{self, BackendField, Field, HeaderField};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

pub use crate::model::MAX_WEIGHT;
pub use crate::validate::MAX_MAGLEV_M;

/// What a config file describes: the services to balance and the conntrack
/// idle timeouts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub state: DesiredState,
    pub timeouts: Timeouts,
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
    let raw: Option<RawConfig> = serde_yaml::from_str(text)
        .map_err(|e| ConfigError::Invalid(from_yaml_error(&e, origin)))?;
    let raw = raw.unwrap_or_default();
    build(raw).map_err(|(segs, message)| {
        let (line, column) = locate(text, &segs);
        ConfigError::Invalid(InvalidConfig {
            origin: origin.to_string(),
            line,
            column,
            path: path_string(&segs),
            message,
        })
    })
}

// ---------------------------------------------------------------------------
// Raw file structure. Field types check themselves (see `checked` below), so
// that serde_yaml reports their position.

#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `services` and `timeouts`"
)]
struct RawConfig {
    /// `services:` with nothing after it (all entries commented out) is empty.
    #[serde(default)]
    services: Option<Vec<RawService>>,
    #[serde(default)]
    timeouts: Option<RawTimeouts>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of timeouts in seconds")]
struct RawTimeouts {
    tcp_syn: Option<Seconds>,
    tcp_established: Option<Seconds>,
    tcp_closing: Option<Seconds>,
    udp: Option<Seconds>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service mapping (name, vip, port, ...)"
)]
struct RawService {
    name: Name,
    vip: Ip,
    port: Port,
    protocol: Option<ProtocolField>,
    algorithm: Option<AlgorithmField>,
    affinity_timeout: Option<AffinityTimeout>,
    maglev_table_size: Option<MaglevSize>,
    #[serde(default)]
    backends: Option<Vec<RawBackend>>,
    /// Present (even `grpc: {}`): the gRPC (L7) mode.
    grpc: Option<RawGrpc>,
}

#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a gRPC mode mapping (timeout, headers)"
)]
struct RawGrpc {
    timeout: Option<Seconds>,
    #[serde(default)]
    headers: Option<Vec<RawHeader>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a header mapping (name, value)")]
struct RawHeader {
    name: HeaderName,
    value: String,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a backend mapping (ip, port, weight, state)"
)]
struct RawBackend {
    ip: Ip,
    port: Port,
    weight: Option<Weight>,
    state: Option<StateField>,
}

// ---------------------------------------------------------------------------
// Cross-field validation, into the model.

/// A path segment: a mapping key or a sequence index.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(&'static str),
    Index(usize),
}

type BuildError = (Vec<Seg>, String);

fn build(raw: RawConfig) -> Result<Config, BuildError> {
    let t = raw.timeouts.unwrap_or_default();
    let d = Timeouts::default();
    let timeouts = Timeouts {
        tcp_syn: t.tcp_syn.map_or(d.tcp_syn, |s| s.0),
        tcp_established: t.tcp_established.map_or(d.tcp_established, |s| s.0),
        tcp_closing: t.tcp_closing.map_or(d.tcp_closing, |s| s.0),
        udp: t.udp.map_or(d.udp, |s| s.0),
    };

    let raw_services = raw.services.unwrap_or_default();
    let mut services = Vec::with_capacity(raw_services.len());
    let mut by_addr = HashMap::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (i, rs) in raw_services.into_iter().enumerate() {
        let at = |field: &'static str| vec![Seg::Key("services"), Seg::Index(i), Seg::Key(field)];
        let name = rs.name.0;
        if let Some(&j) = by_name.get(&name) {
            return Err((
                at("name"),
                format!("duplicate service name {name:?} (also services[{j}])"),
            ));
        }
        by_name.insert(name.clone(), i);

        let backends = rs
            .backends
            .unwrap_or_default()
            .into_iter()
            .map(|rb| Backend {
                ip: rb.ip.0,
                port: rb.port.0,
                weight: rb.weight.map_or(1, |w| w.0),
                state: rb.state.map_or(BackendState::Active, |s| s.0),
            })
            .collect();
        let grpc = rs.grpc.map(|g| GrpcPolicy {
            default_timeout: g.timeout.map_or(DEFAULT_GRPC_TIMEOUT, |t| t.0),
            add_headers: g
                .headers
                .unwrap_or_default()
                .into_iter()
                .map(|h| (h.name.0, h.value))
                .collect(),
        });
        let mut svc = Service {
            name,
            vip: rs.vip.0,
            port: rs.port.0,
            protocol: rs.protocol.map_or(Protocol::Tcp, |p| p.0),
            algorithm: rs.algorithm.map_or(Algorithm::default(), |a| a.0),
            affinity_timeout: rs.affinity_timeout.map(|a| a.0),
            maglev_table_size: rs.maglev_table_size.map(|m| m.0),
            backends,
            grpc,
        };
        // The one validation (lb_api::validate), with the file's positions.
        svc.normalise()
            .map_err(|e| (field_path(i, e.field), e.message))?;
        if let Some(j) = by_addr.insert(svc.addr(), i) {
            return Err((
                at("vip"),
                format!("duplicate service {} (also services[{j}])", svc.addr()),
            ));
        }
        services.push(svc);
    }
    Ok(Config {
        state: DesiredState { services },
        timeouts,
    })
}

/// The file path of a field of `services[i]`.
fn field_path(i: usize, field: Field) -> Vec<Seg> {
    let mut p = vec![Seg::Key("services"), Seg::Index(i)];
    match field {
        Field::Name => p.push(Seg::Key("name")),
        Field::Vip => p.push(Seg::Key("vip")),
        Field::Port => p.push(Seg::Key("port")),
        Field::AffinityTimeout => p.push(Seg::Key("affinity_timeout")),
        Field::MaglevTableSize => p.push(Seg::Key("maglev_table_size")),
        Field::Backends => p.push(Seg::Key("backends")),
        Field::Backend(j, f) => p.extend([
            Seg::Key("backends"),
            Seg::Index(j),
            Seg::Key(match f {
                BackendField::Ip => "ip",
                BackendField::Port => "port",
                BackendField::Weight => "weight",
            }),
        ]),
        Field::Grpc => p.push(Seg::Key("grpc")),
        Field::GrpcTimeout => p.extend([Seg::Key("grpc"), Seg::Key("timeout")]),
        Field::GrpcHeader(k, f) => p.extend([
            Seg::Key("grpc"),
            Seg::Key("headers"),
            Seg::Index(k),
            Seg::Key(match f {
                HeaderField::Name => "name",
                HeaderField::Value => "value",
            }),
        ]),
    }
    p
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
// serde_yaml errors -> InvalidConfig.

fn from_yaml_error(e: &serde_yaml::Error, origin: &str) -> InvalidConfig {
    let loc = e.location();
    let (line, column) = match &loc {
        Some(l) => (Some(l.line()), Some(l.column())),
        None => (None, None),
    };
    // serde_yaml writes "PATH: MESSAGE at line L column C"; take the position
    // out (it goes in front) and split the path off.
    let mut text = e.to_string();
    if let (Some(l), Some(c)) = (line, column) {
        let at = format!(" at line {l} column {c}");
        if let Some(p) = text.find(&at) {
            text.replace_range(p..p + at.len(), "");
        }
    }
    let (path, message) = match text.split_once(": ") {
        Some((p, m)) if looks_like_path(p) => (p.to_string(), m.to_string()),
        _ => (String::new(), text),
    };
    InvalidConfig {
        origin: origin.to_string(),
        line,
        column,
        path,
        message,
    }
}

/// serde_yaml's paths: `services[0].backends[1].port`, `?` for unknown parts.
/// Messages never start this way: they have a space before their first colon.
fn looks_like_path(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.[]?".contains(c))
}

// ---------------------------------------------------------------------------
// Finding the position of a field path, by failing there on purpose.

const LOCATE_MARKER: &str = "\u{0}rpclb-locate";

/// Line and column (1-based) of the node at `segs`, if the text has it.
fn locate(text: &str, segs: &[Seg]) -> (Option<usize>, Option<usize>) {
    let de = serde_yaml::Deserializer::from_str(text);
    match (Locate { segs }).deserialize(de) {
        Err(e) if e.to_string().contains(LOCATE_MARKER) => match e.location() {
            Some(l) => (Some(l.line()), Some(l.column())),
            None => (None, None),
        },
        _ => (None, None),
    }
}

struct Locate<'a> {
    segs: &'a [Seg],
}

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.segs {
            [] => d.deserialize_any(Found),
            [first, rest @ ..] => d.deserialize_any(Walk { first, rest }),
        }
    }
}

/// Fails on whatever node it meets, so serde_yaml marks the error with its position.
struct Found;

impl Found {
    fn err<E: de::Error>() -> Result<(), E> {
        Err(E::custom(LOCATE_MARKER))
    }
}

impl<'de> Visitor<'de> for Found {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("anything")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Self::err()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Self::err()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Self::err()
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        Self::err()
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        Self::err()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Self::err()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Self::err()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Self::err()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Self::err()
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Self::err()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Self::err()
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Self::err()
    }
}

/// Walks down one segment; anything else is skipped.
struct Walk<'a> {
    first: &'a Seg,
    rest: &'a [Seg],
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("anything")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<serde_yaml::Value>()? {
            match (self.first, key.as_str()) {
                (Seg::Key(k), Some(s)) if *k == s => {
                    map.next_value_seed(Locate { segs: self.rest })?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let more = if *self.first == Seg::Index(i) {
                seq.next_element_seed(Locate { segs: self.rest })?.is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
}

// ---------------------------------------------------------------------------
// Self-checking field types. Each check runs inside serde_yaml's call to the
// visitor, which is what gives its error the field's position and path.

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
            None => Err(E::invalid_type(de::Unexpected::Str(v), &self)),
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        match self.from_int {
            Some(parse) => parse(v).map_err(E::custom),
            None => Err(E::invalid_type(de::Unexpected::Unsigned(v), &self)),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        match (self.from_int, u64::try_from(v)) {
            (Some(parse), Ok(u)) => parse(u).map_err(E::custom),
            (Some(_), Err(_)) => Err(E::custom(format!(
                "{v} is negative; expected {}",
                self.expecting
            ))),
            (None, _) => Err(E::invalid_type(de::Unexpected::Signed(v), &self)),
        }
    }
}

fn str_field<'de, D: Deserializer<'de>, T>(
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
    Name(String) = str_field("a service name", |s| {
        validate::name(s).map(|()| s.to_string())
    })
);

checked!(
    Ip(Ipv4Addr) = str_field("an IPv4 address", |s| {
        s.parse::<Ipv4Addr>().map_err(|_| {
            if s.parse::<std::net::Ipv6Addr>().is_ok() {
                format!("{s:?} is an IPv6 address; only IPv4 is supported")
            } else {
                format!("invalid IPv4 address {s:?}")
            }
        })
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
    HeaderName(String) = str_field("a header name", |s| {
        crate::model::check_added_header(s, "").map(|()| s.to_string())
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
    use super::*;

    fn err(text: &str) -> InvalidConfig {
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
        assert_eq!(s.len(), 3);

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
                    ip: Ipv4Addr::new(10, 244, 2, 2),
                    port: 50052,
                    weight: 1,
                    state: BackendState::Active
                },
                Backend {
                    ip: Ipv4Addr::new(10, 244, 2, 3),
                    port: 50052,
                    weight: 3,
                    state: BackendState::Active
                },
                Backend {
                    ip: Ipv4Addr::new(10, 244, 3, 7),
                    port: 50052,
                    weight: 1,
                    state: BackendState::Terminating
                },
                Backend {
                    ip: Ipv4Addr::new(10, 244, 3, 8),
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

    #[test]
    fn empty_documents() {
        for text in [
            "",
            "\n",
            "# nothing yet\n",
            "services:\n",
            "services: []\n",
            "---\n",
        ] {
            let c = parse(text, "x").unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(c, Config::default(), "{text:?}");
        }
        // A service without backends is valid (SYNs get a RST).
        let c = parse(&format!("{ONE}    backends:\n"), "x").unwrap();
        assert!(c.state.services[0].backends.is_empty());
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
    fn timeouts() {
        let c = parse("timeouts:\n  tcp_established: 3600\n  udp: 30\n", "x").unwrap();
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
    }

    #[test]
    fn syntax_error() {
        let e = err(&format!("{ONE}   bad: indent\n"));
        assert_eq!((e.line, e.column), (Some(5), Some(4)));
        assert_eq!(e.path, "");
        assert!(
            e.to_string()
                .starts_with("services.yaml:5:4: did not find expected"),
            "{e}"
        );
    }

    #[test]
    fn addresses() {
        let svc = |vip: &str| format!("services:\n  - name: a\n    vip: {vip}\n    port: 80\n");
        assert_err(
            &svc("10.96.0.300"),
            (3, 10),
            "services[0].vip",
            "invalid IPv4 address \"10.96.0.300\"",
        );
        assert_err(
            &svc("fe80::1"),
            (3, 10),
            "services[0].vip",
            "only IPv4 is supported",
        );
        assert_err(
            &svc("\"\""),
            (3, 10),
            "services[0].vip",
            "invalid IPv4 address \"\"",
        );
        assert_err(
            &svc("[1, 2]"),
            (3, 10),
            "services[0].vip",
            "expected an IPv4 address",
        );
        assert_err(
            &format!("{ONE}    backends:\n      - ip: 10.244.0\n        port: 1\n"),
            (6, 13),
            "services[0].backends[0].ip",
            "invalid IPv4 address",
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
        // Anchors and comments do not confuse the locator.
        let anchors = "# top\nservices:\n  - &svc\n    name: a # trailing\n    vip: 10.96.0.1\n    port: 80\n  - name: b\n    vip: 10.96.0.1\n    port: 80\n";
        assert_err(anchors, (8, 10), "services[1].vip", "duplicate service");
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
        // serde reports a duplicate key at the start of its mapping.
        assert!(
            e.to_string()
                .starts_with(&format!("{shown}:2:5: services[0]: duplicate field `port`")),
            "{e}"
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
