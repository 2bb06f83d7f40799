//! The controller <-> agent gRPC contract (`proto/rpclb/v1/state.proto`) and
//! its conversions to and from the model.
//!
//! Conversions from the wire are checked with the one validation
//! (`lb_api::validate`), as a config file is: an agent never applies a
//! service it would refuse from its own file. It refuses such a service
//! alone, keeps the rest, and says which and why in its ack.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::config::Timeouts;
use crate::model::{
    Algorithm, Backend, BackendState, Balancing, DEFAULT_GRPC_TIMEOUT, DesiredState, External,
    GrpcPolicy, GrpcTls, HealthCheck, HealthCheckKind, ListenTls, Locality, LocalityTier, OrcaWrr,
    OutlierDetection, Protocol, RetryPolicy, RetryThrottle, Service, ServiceAddr, TrafficPolicy,
    UpstreamTls,
};
use crate::validate::Refusal;

/// A duration in whole milliseconds, as the wire carries it.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The generated messages, client and server.
pub mod pb {
    tonic::include_proto!("rpclb.v1");
}

pub use pb::state_stream_client::StateStreamClient;
pub use pb::state_stream_server::{StateStream, StateStreamServer};

/// A message from the controller that the agent cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{0}: missing field `{1}`")]
    Missing(String, &'static str),
    #[error("{0}: {1}")]
    Invalid(String, String),
    #[error("services {0} and {1} have the same address {2}")]
    Duplicate(String, String, ServiceAddr),
    #[error("delta from version {base} does not apply to version {have}")]
    WrongBase { base: u64, have: u64 },
    #[error("the message has no body")]
    Empty,
}

fn protocol_to_pb(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
    }
}

fn algorithm_to_pb(a: Algorithm) -> pb::Algorithm {
    match a {
        Algorithm::Random => pb::Algorithm::Random,
        Algorithm::RoundRobin => pb::Algorithm::RoundRobin,
        Algorithm::Maglev => pb::Algorithm::Maglev,
        Algorithm::SourceHash => pb::Algorithm::SourceHash,
        Algorithm::LeastConn => pb::Algorithm::LeastConn,
    }
}

impl From<ServiceAddr> for pb::ServiceAddr {
    fn from(a: ServiceAddr) -> Self {
        let (vip, vip6) = ip_to_pb(a.vip);
        pb::ServiceAddr {
            vip,
            port: u32::from(a.port),
            protocol: protocol_to_pb(a.protocol) as i32,
            vip6,
        }
    }
}

impl From<&Service> for pb::Service {
    fn from(s: &Service) -> Self {
        pb::Service {
            name: s.name.clone(),
            addr: Some(s.addr().into()),
            algorithm: algorithm_to_pb(s.algorithm) as i32,
            affinity_timeout_s: s
                .affinity_timeout
                .map_or(0, |d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)),
            maglev_table_size: s.maglev_table_size.unwrap_or(0),
            backends: s
                .backends
                .iter()
                .map(|b| pb::Backend {
                    ip: ip_to_pb(b.ip).0,
                    ip6: ip_to_pb(b.ip).1,
                    port: u32::from(b.port),
                    weight: b.weight,
                    state: match b.state {
                        BackendState::Active => pb::BackendState::Active,
                        BackendState::Terminating => pb::BackendState::Terminating,
                    } as i32,
                    node: b.node.clone().unwrap_or_default(),
                    max: b.max.unwrap_or(0),
                    spill_weight: b.spill_weight.unwrap_or(0),
                })
                .collect(),
            grpc: s.grpc.as_ref().map(|g| pb::GrpcPolicy {
                default_timeout_ms: u64::try_from(g.default_timeout.as_millis())
                    .unwrap_or(u64::MAX),
                add_headers: g
                    .add_headers
                    .iter()
                    .map(|(name, value)| pb::Header {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                retry: g.retry.as_ref().map(|r| pb::RetryPolicy {
                    max_attempts: r.max_attempts,
                    initial_backoff_ms: u64::try_from(r.initial_backoff.as_millis())
                        .unwrap_or(u64::MAX),
                    max_backoff_ms: u64::try_from(r.max_backoff.as_millis()).unwrap_or(u64::MAX),
                    backoff_multiplier_milli: r.backoff_multiplier_milli,
                    retryable_status_codes: r.retryable_status_codes.clone(),
                    throttle: r.throttle.map(|t| pb::RetryThrottle {
                        max_tokens: t.max_tokens,
                        token_ratio_milli: t.token_ratio_milli,
                    }),
                }),
                outlier_detection: g.outlier_detection.map(|o| pb::OutlierDetection {
                    consecutive_failures: o.consecutive_failures,
                    base_ejection_time_ms: u64::try_from(o.base_ejection_time.as_millis())
                        .unwrap_or(u64::MAX),
                    max_ejection_time_ms: u64::try_from(o.max_ejection_time.as_millis())
                        .unwrap_or(u64::MAX),
                    max_ejection_percent: o.max_ejection_percent,
                }),
                orca_wrr: match g.balancing {
                    Balancing::P2c => None,
                    Balancing::OrcaWrr(w) => Some(pb::OrcaWrr {
                        blackout_period_ms: millis(w.blackout_period),
                        weight_expiration_period_ms: millis(w.weight_expiration_period),
                        weight_update_period_ms: millis(w.weight_update_period),
                        error_utilization_penalty_milli: w.error_utilization_penalty_milli,
                    }),
                },
                tls: g.tls.as_ref().map(|t| pb::GrpcTls {
                    listen: t.listen.as_ref().map(|l| pb::ListenTls {
                        cert: l.cert.clone(),
                        key: l.key.clone(),
                        client_ca: l.client_ca.clone().unwrap_or_default(),
                    }),
                    upstream: t.upstream.as_ref().map(|u| pb::UpstreamTls {
                        ca: u.ca.clone(),
                        server_name: u.server_name.clone().unwrap_or_default(),
                        cert: u.cert.clone().unwrap_or_default(),
                        key: u.key.clone().unwrap_or_default(),
                    }),
                }),
            }),
            health_check: s.health_check.as_ref().map(|h| pb::HealthCheck {
                kind: match h.kind {
                    HealthCheckKind::Grpc => pb::HealthCheckKind::Grpc,
                    HealthCheckKind::Tcp => pb::HealthCheckKind::Tcp,
                } as i32,
                service: h.service.clone(),
                interval_ms: u64::try_from(h.interval.as_millis()).unwrap_or(u64::MAX),
                timeout_ms: u64::try_from(h.timeout.as_millis()).unwrap_or(u64::MAX),
                unhealthy_threshold: h.unhealthy_threshold,
                healthy_threshold: h.healthy_threshold,
            }),
            node_port: s.external.node_port.map_or(0, u32::from),
            external_ips: s
                .external
                .ips
                .iter()
                .filter_map(|ip| match ip {
                    std::net::IpAddr::V4(v4) => Some(u32::from(*v4)),
                    std::net::IpAddr::V6(_) => None,
                })
                .collect(),
            external_ips6: s
                .external
                .ips
                .iter()
                .filter_map(|ip| match ip {
                    std::net::IpAddr::V4(_) => None,
                    std::net::IpAddr::V6(v6) => Some(v6.octets().to_vec()),
                })
                .collect(),
            external_traffic_local: s.external.traffic_policy == TrafficPolicy::Local,
            health_check_node_port: s.external.health_check_node_port.map_or(0, u32::from),
            max_per_backend: s.max_per_backend.unwrap_or(0),
            // A resolved state keeps only a gRPC spill-over policy.
            locality: s
                .locality
                .as_ref()
                .filter(|l| l.spill_outstanding.is_some())
                .map(|l| pb::Locality {
                    tiers: l.tiers.iter().map(|t| t.as_str().to_string()).collect(),
                    min_backends: l.min_backends,
                    spill_outstanding: l.spill_outstanding.unwrap_or(0),
                }),
            selector: s.selector.clone().unwrap_or_default(),
        }
    }
}

impl From<&Timeouts> for pb::Timeouts {
    fn from(t: &Timeouts) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        pb::Timeouts {
            tcp_syn_ms: ms(t.tcp_syn),
            tcp_established_ms: ms(t.tcp_established),
            tcp_closing_ms: ms(t.tcp_closing),
            udp_ms: ms(t.udp),
        }
    }
}

/// An address as the wire's two fields: IPv4 in the `fixed32` (host order),
/// IPv6 in the `bytes` (16, network order) with 0 in the `fixed32`, which an
/// IPv4-only peer reads as 0.0.0.0 and refuses.
fn ip_to_pb(ip: IpAddr) -> (u32, Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => (u32::from(v4), Vec::new()),
        IpAddr::V6(v6) => (0, v6.octets().to_vec()),
    }
}

/// The address of the wire's two fields: IPv6 when the `bytes` are set
/// (16 of them, and the `fixed32` 0), else IPv4.
fn ip_from_pb(what: &str, v4: u32, v6: &[u8]) -> Result<IpAddr, WireError> {
    if v6.is_empty() {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    let octets: [u8; 16] = v6.try_into().map_err(|_| {
        WireError::Invalid(
            what.to_string(),
            format!("IPv6 address of {} bytes (expected 16)", v6.len()),
        )
    })?;
    if v4 != 0 {
        return Err(WireError::Invalid(
            what.to_string(),
            format!("both an IPv4 ({}) and an IPv6 address", Ipv4Addr::from(v4)),
        ));
    }
    Ok(IpAddr::V6(Ipv6Addr::from(octets)))
}

fn port(what: &str, v: u32) -> Result<u16, WireError> {
    u16::try_from(v)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| WireError::Invalid(what.to_string(), format!("port {v} out of 1..=65535")))
}

/// Checks and converts a service address.
pub fn addr_from_pb(what: &str, a: &pb::ServiceAddr) -> Result<ServiceAddr, WireError> {
    let protocol = match pb::Protocol::try_from(a.protocol) {
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        Ok(pb::Protocol::Udp) => Protocol::Udp,
        _ => {
            return Err(WireError::Invalid(
                what.to_string(),
                format!("protocol {} is not tcp or udp", a.protocol),
            ));
        }
    };
    Ok(ServiceAddr {
        vip: ip_from_pb(what, a.vip, &a.vip6)?,
        port: port(what, a.port)?,
        protocol,
    })
}

/// Converts and checks a service with the one validation
/// ([`Service::normalise`]), as a config file's services are.
pub fn service_from_pb(s: &pb::Service) -> Result<Service, WireError> {
    let what = if s.name.is_empty() {
        "service <unnamed>".to_string()
    } else {
        format!("service {}", s.name)
    };
    let bad = |m: String| WireError::Invalid(what.clone(), m);
    if s.name.is_empty() {
        return Err(WireError::Missing(what, "name"));
    }
    let addr = addr_from_pb(
        &what,
        s.addr
            .as_ref()
            .ok_or_else(|| WireError::Missing(what.clone(), "addr"))?,
    )?;
    let algorithm = match pb::Algorithm::try_from(s.algorithm) {
        Ok(pb::Algorithm::Random) => Algorithm::Random,
        Ok(pb::Algorithm::RoundRobin) => Algorithm::RoundRobin,
        Ok(pb::Algorithm::Maglev) => Algorithm::Maglev,
        Ok(pb::Algorithm::SourceHash) => Algorithm::SourceHash,
        Ok(pb::Algorithm::LeastConn) => Algorithm::LeastConn,
        _ => return Err(bad(format!("unknown algorithm {}", s.algorithm))),
    };
    let mut backends = Vec::with_capacity(s.backends.len());
    for b in &s.backends {
        let ip = ip_from_pb(&what, b.ip, &b.ip6)?;
        let bport = port(&what, b.port)?;
        let state = match pb::BackendState::try_from(b.state) {
            Ok(pb::BackendState::Active) => BackendState::Active,
            Ok(pb::BackendState::Terminating) => BackendState::Terminating,
            Err(_) => {
                return Err(bad(format!(
                    "backend {ip}:{bport}: unknown state {}",
                    b.state
                )));
            }
        };
        backends.push(Backend {
            ip,
            port: bport,
            weight: b.weight,
            state,
            node: Some(b.node.clone()).filter(|n| !n.is_empty()),
            max: Some(b.max).filter(|&m| m != 0),
            spill_weight: Some(b.spill_weight).filter(|&w| w != 0),
        });
    }
    let grpc = s.grpc.as_ref().map(|g| GrpcPolicy {
        default_timeout: match g.default_timeout_ms {
            0 => DEFAULT_GRPC_TIMEOUT,
            ms => Duration::from_millis(ms),
        },
        add_headers: g
            .add_headers
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
        // Checked by `normalise` below.
        retry: g.retry.as_ref().map(|r| RetryPolicy {
            max_attempts: r.max_attempts,
            initial_backoff: Duration::from_millis(r.initial_backoff_ms),
            max_backoff: Duration::from_millis(r.max_backoff_ms),
            backoff_multiplier_milli: r.backoff_multiplier_milli,
            retryable_status_codes: r.retryable_status_codes.clone(),
            throttle: r.throttle.as_ref().map(|t| RetryThrottle {
                max_tokens: t.max_tokens,
                token_ratio_milli: t.token_ratio_milli,
            }),
        }),
        // Checked by `normalise` below.
        outlier_detection: g.outlier_detection.as_ref().map(|o| OutlierDetection {
            consecutive_failures: o.consecutive_failures,
            base_ejection_time: Duration::from_millis(o.base_ejection_time_ms),
            max_ejection_time: Duration::from_millis(o.max_ejection_time_ms),
            max_ejection_percent: o.max_ejection_percent,
        }),
        balancing: match &g.orca_wrr {
            None => Balancing::P2c,
            Some(w) => Balancing::OrcaWrr(OrcaWrr {
                blackout_period: Duration::from_millis(w.blackout_period_ms),
                weight_expiration_period: Duration::from_millis(w.weight_expiration_period_ms),
                weight_update_period: Duration::from_millis(w.weight_update_period_ms),
                error_utilization_penalty_milli: w.error_utilization_penalty_milli,
            }),
        },
        // Checked by `normalise` below; an empty string is an absent value.
        tls: g.tls.as_ref().map(|t| {
            let opt = |s: &String| Some(s.clone()).filter(|s| !s.is_empty());
            GrpcTls {
                listen: t.listen.as_ref().map(|l| ListenTls {
                    cert: l.cert.clone(),
                    key: l.key.clone(),
                    client_ca: opt(&l.client_ca),
                }),
                upstream: t.upstream.as_ref().map(|u| UpstreamTls {
                    ca: u.ca.clone(),
                    server_name: opt(&u.server_name),
                    cert: opt(&u.cert),
                    key: opt(&u.key),
                }),
            }
        }),
    });
    let health_check = match &s.health_check {
        None => None,
        Some(h) => {
            let kind = match pb::HealthCheckKind::try_from(h.kind) {
                Ok(pb::HealthCheckKind::Grpc) => HealthCheckKind::Grpc,
                Ok(pb::HealthCheckKind::Tcp) => HealthCheckKind::Tcp,
                _ => return Err(bad(format!("unknown health check kind {}", h.kind))),
            };
            let d = HealthCheck::new(kind);
            let ms = |v: u64, default: Duration| match v {
                0 => default,
                v => Duration::from_millis(v),
            };
            let n = |v: u32, default: u32| if v == 0 { default } else { v };
            Some(HealthCheck {
                kind,
                service: h.service.clone(),
                interval: ms(h.interval_ms, d.interval),
                timeout: ms(h.timeout_ms, d.timeout),
                unhealthy_threshold: n(h.unhealthy_threshold, d.unhealthy_threshold),
                healthy_threshold: n(h.healthy_threshold, d.healthy_threshold),
            })
        }
    };
    let mut svc = Service {
        name: s.name.clone(),
        vip: addr.vip,
        port: addr.port,
        protocol: addr.protocol,
        algorithm,
        affinity_timeout: match s.affinity_timeout_s {
            0 => None,
            t => Some(Duration::from_secs(u64::from(t))),
        },
        maglev_table_size: match s.maglev_table_size {
            0 => None,
            m => Some(m),
        },
        backends,
        grpc,
        health_check,
        external: External {
            node_port: match s.node_port {
                0 => None,
                p => Some(port(&what, p)?),
            },
            ips: s
                .external_ips
                .iter()
                .map(|ip| Ok(Ipv4Addr::from(*ip).into()))
                .chain(s.external_ips6.iter().map(|ip6| ip_from_pb(&what, 0, ip6)))
                .collect::<Result<_, _>>()?,
            traffic_policy: if s.external_traffic_local {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            },
            health_check_node_port: match s.health_check_node_port {
                0 => None,
                p => Some(port(&what, p)?),
            },
        },
        // Only a resolved state's gRPC spill-over policy is on the wire; the
        // rest is resolved by the controller into each node's weights.
        locality: match &s.locality {
            None => None,
            Some(l) => Some(Locality {
                tiers: l
                    .tiers
                    .iter()
                    .map(|t| t.parse::<LocalityTier>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad(format!("locality: {e}")))?,
                min_backends: l.min_backends,
                spill_outstanding: Some(l.spill_outstanding).filter(|&n| n != 0),
            }),
        },
        max_per_backend: Some(s.max_per_backend).filter(|&m| m != 0),
        // Checked by `normalise` below (the syntax; the agent's writer
        // refuses a path from the stream: who may name what).
        selector: Some(s.selector.clone()).filter(|x| !x.is_empty()),
    };
    svc.normalise().map_err(|e| bad(e.to_string()))?;
    Ok(svc)
}

/// Checks and converts timeouts (each must be > 0).
pub fn timeouts_from_pb(t: &pb::Timeouts) -> Result<Timeouts, WireError> {
    let d = |name: &str, ms: u64| {
        if ms == 0 {
            Err(WireError::Invalid(
                format!("timeouts.{name}"),
                "must be > 0".into(),
            ))
        } else {
            Ok(Duration::from_millis(ms))
        }
    };
    Ok(Timeouts {
        tcp_syn: d("tcp_syn", t.tcp_syn_ms)?,
        tcp_established: d("tcp_established", t.tcp_established_ms)?,
        tcp_closing: d("tcp_closing", t.tcp_closing_ms)?,
        udp: d("udp", t.udp_ms)?,
    })
}

/// A node's desired state as the agent holds it: the services and the
/// conntrack timeouts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    pub state: DesiredState,
    pub timeouts: Timeouts,
}

/// The full-state message.
/// Low bits of a version that count changes; the high bits are the
/// controller's epoch (see `lb_controller::grpc::Publisher`).
pub const VERSION_SEQ_BITS: u32 = 12;

/// The first version of a controller whose epoch is `epoch_ms`.
pub fn first_version(epoch_ms: u64) -> u64 {
    (epoch_ms << VERSION_SEQ_BITS) + 1
}

/// The epoch (milliseconds since the Unix epoch) of `version`'s controller,
/// for a version below 4,096 changes from its start.
pub fn version_epoch_ms(version: u64) -> u64 {
    version >> VERSION_SEQ_BITS
}

/// Milliseconds since the Unix epoch (1 if the clock is before it).
pub fn now_epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
}

pub fn snapshot(version: u64, node: &NodeState) -> pb::ControllerMessage {
    pb::ControllerMessage {
        version,
        body: Some(pb::controller_message::Body::Snapshot(pb::Snapshot {
            services: node.state.services.iter().map(Into::into).collect(),
            timeouts: Some((&node.timeouts).into()),
        })),
    }
}

/// The change from `old` (sent as `base`) to `new` (sent as `version`);
/// `None` when nothing changed.
pub fn delta(
    base: u64,
    old: &NodeState,
    version: u64,
    new: &NodeState,
) -> Option<pb::ControllerMessage> {
    let before: BTreeMap<ServiceAddr, &Service> =
        old.state.services.iter().map(|s| (s.addr(), s)).collect();
    let after: BTreeMap<ServiceAddr, &Service> =
        new.state.services.iter().map(|s| (s.addr(), s)).collect();
    let upserts: Vec<pb::Service> = after
        .iter()
        .filter(|(a, s)| before.get(a) != Some(*s))
        .map(|(_, s)| (*s).into())
        .collect();
    let removals: Vec<pb::ServiceAddr> = before
        .keys()
        .filter(|a| !after.contains_key(a))
        .map(|a| (*a).into())
        .collect();
    let timeouts = (old.timeouts != new.timeouts).then(|| (&new.timeouts).into());
    if upserts.is_empty() && removals.is_empty() && timeouts.is_none() {
        return None;
    }
    Some(pb::ControllerMessage {
        version,
        body: Some(pb::controller_message::Body::Delta(pb::Delta {
            base_version: base,
            upserts,
            removals,
            timeouts,
        })),
    })
}

/// A controller message applied: the node's new state, and the services in
/// the message that it did not take.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub state: NodeState,
    pub refused: Vec<Refusal>,
}

/// Applies a controller message to the agent's state at `have` (its
/// version). A snapshot replaces everything; a delta must start from `have`.
///
/// Each service is checked on its own: one that fails the checks is refused
/// (listed in [`Applied::refused`]) and the service the agent already has at
/// that address, if any, stays as it is; the rest is applied. Only a message
/// that cannot be read as a whole (no body, a delta from another version,
/// bad timeouts) is an error, and then nothing changes.
pub fn apply_message(
    current: &NodeState,
    have: u64,
    msg: &pb::ControllerMessage,
) -> Result<Applied, WireError> {
    use pb::controller_message::Body;
    let old: BTreeMap<ServiceAddr, &Service> = current
        .state
        .services
        .iter()
        .map(|s| (s.addr(), s))
        .collect();
    let mut refused = Vec::new();
    let mut refuse = |p: &pb::Service, e: &WireError| {
        let addr = p.addr.as_ref().and_then(|a| addr_from_pb("", a).ok());
        refused.push(Refusal {
            service: if p.name.is_empty() {
                "<unnamed>".into()
            } else {
                p.name.clone()
            },
            addr,
            reason: match e {
                WireError::Invalid(_, m) => m.clone(),
                e => e.to_string(),
            },
        });
        addr
    };
    let (by_addr, timeouts) = match msg.body.as_ref().ok_or(WireError::Empty)? {
        Body::Snapshot(s) => {
            let timeouts = match &s.timeouts {
                Some(t) => timeouts_from_pb(t)?,
                None => Timeouts::default(),
            };
            let mut by_addr: BTreeMap<ServiceAddr, Service> = BTreeMap::new();
            let mut keep = Vec::new();
            for p in &s.services {
                match service_from_pb(p) {
                    Ok(svc) => match by_addr.get(&svc.addr()) {
                        Some(first) => {
                            let e = WireError::Duplicate(
                                first.name.clone(),
                                svc.name.clone(),
                                svc.addr(),
                            );
                            refuse(p, &e);
                        }
                        None => {
                            by_addr.insert(svc.addr(), svc);
                        }
                    },
                    Err(e) => keep.extend(refuse(p, &e)),
                }
            }
            // A refused service's address keeps what the agent had there,
            // unless a valid service of this snapshot took it.
            for a in keep {
                if let (Some(o), false) = (old.get(&a), by_addr.contains_key(&a)) {
                    by_addr.insert(a, (*o).clone());
                }
            }
            (by_addr, timeouts)
        }
        Body::Delta(d) => {
            if d.base_version != have {
                return Err(WireError::WrongBase {
                    base: d.base_version,
                    have,
                });
            }
            let timeouts = match &d.timeouts {
                Some(t) => timeouts_from_pb(t)?,
                None => current.timeouts,
            };
            let mut by_addr: BTreeMap<ServiceAddr, Service> =
                old.into_iter().map(|(a, s)| (a, s.clone())).collect();
            for r in &d.removals {
                by_addr.remove(&addr_from_pb("removal", r)?);
            }
            for p in &d.upserts {
                match service_from_pb(p) {
                    Ok(svc) => {
                        by_addr.insert(svc.addr(), svc);
                    }
                    Err(e) => {
                        refuse(p, &e);
                    }
                }
            }
            (by_addr, timeouts)
        }
    };
    Ok(Applied {
        state: NodeState {
            state: DesiredState {
                services: by_addr.into_values().collect(),
            },
            timeouts,
        },
        refused,
    })
}

/// An agent's refusals, for its ack.
pub fn refusals_to_pb(refused: &[Refusal]) -> Vec<pb::Refusal> {
    refused
        .iter()
        .map(|r| pb::Refusal {
            service: r.service.clone(),
            addr: r.addr.map(Into::into),
            reason: r.reason.clone(),
        })
        .collect()
}

/// A controller's view of an ack's refusals.
pub fn refusals_from_pb(refused: &[pb::Refusal]) -> Vec<Refusal> {
    refused
        .iter()
        .map(|r| Refusal {
            service: r.service.clone(),
            addr: r.addr.as_ref().and_then(|a| addr_from_pb("", a).ok()),
            reason: r.reason.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, port: u16, backends: &[(u8, u32)]) -> Service {
        let mut s = Service::new(
            name,
            Ipv4Addr::new(10, 96, 0, 1),
            port,
            Protocol::Tcp,
            Algorithm::Maglev,
            backends
                .iter()
                .map(|&(i, w)| Backend {
                    weight: w,
                    ..Backend::new(Ipv4Addr::new(10, 244, 0, i), 8080)
                })
                .collect(),
        );
        s.affinity_timeout = Some(Duration::from_secs(30));
        s
    }

    fn node(services: Vec<Service>) -> NodeState {
        NodeState {
            state: DesiredState { services },
            timeouts: Timeouts::default(),
        }
    }

    #[test]
    fn snapshot_round_trips() {
        let mut s = svc("a/b:http", 80, &[(1, 1), (2, 3)]);
        s.backends[1].state = BackendState::Terminating;
        s.maglev_table_size = Some(1009);
        s.grpc = Some(GrpcPolicy {
            default_timeout: Duration::from_millis(2500),
            add_headers: vec![("x-cluster".into(), "east".into())],
            retry: Some(RetryPolicy {
                max_attempts: 4,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(300),
                backoff_multiplier_milli: 1500,
                retryable_status_codes: vec![8, 14],
                throttle: Some(RetryThrottle {
                    max_tokens: 20,
                    token_ratio_milli: 250,
                }),
            }),
            outlier_detection: Some(OutlierDetection {
                consecutive_failures: 7,
                base_ejection_time: Duration::from_millis(1500),
                max_ejection_time: Duration::from_secs(20),
                max_ejection_percent: 34,
            }),
            balancing: Balancing::OrcaWrr(OrcaWrr {
                blackout_period: Duration::ZERO,
                weight_expiration_period: Duration::from_secs(30),
                weight_update_period: Duration::from_millis(200),
                error_utilization_penalty_milli: 1500,
            }),
            tls: Some(GrpcTls {
                listen: Some(ListenTls {
                    cert: "/etc/rpclb/grpc-tls/shop/cart/tls.crt".into(),
                    key: "/etc/rpclb/grpc-tls/shop/cart/tls.key".into(),
                    client_ca: Some("/etc/rpclb/grpc-tls/shop/clients/ca.crt".into()),
                }),
                upstream: Some(UpstreamTls {
                    ca: "/etc/rpclb/grpc-tls/shop/pods/ca.crt".into(),
                    server_name: Some("cart.shop.svc".into()),
                    cert: None,
                    key: None,
                }),
            }),
        });
        s.health_check = Some(HealthCheck {
            service: "shop.Cart".into(),
            interval: Duration::from_millis(250),
            timeout: Duration::from_millis(50),
            unhealthy_threshold: 4,
            healthy_threshold: 1,
            ..HealthCheck::default()
        });
        let mut tcp = svc("a/c:grpc", 81, &[]);
        tcp.health_check = Some(HealthCheck::new(HealthCheckKind::Tcp));
        let n = NodeState {
            state: DesiredState {
                services: vec![s, tcp],
            },
            timeouts: Timeouts {
                udp: Duration::from_millis(1500),
                ..Timeouts::default()
            },
        };
        let got = apply_message(&NodeState::default(), 0, &snapshot(7, &n)).unwrap();
        assert_eq!(got.state, n);
        assert!(got.refused.is_empty());
    }

    /// A selector goes on the wire as given (a name, an example, and a
    /// path too: the agent's writer refuses that, not the wire); a bad one
    /// is refused with its service, as any invalid field is.
    #[test]
    fn a_selector_round_trips() {
        let mut named = svc("a/geo:http", 80, &[(1, 1), (2, 1)]);
        named.selector = Some("geo-eu".into());
        let mut example = svc("a/ex:http", 81, &[(1, 1)]);
        example.selector = Some("example:geo".into());
        let mut path = svc("a/path:http", 82, &[(1, 1)]);
        path.selector = Some("/opt/geo.o".into());
        let none = svc("a/none:http", 83, &[(1, 1)]);
        for s in [&named, &example, &path, &none] {
            let p = pb::Service::from(s);
            assert_eq!(p.selector, s.selector.clone().unwrap_or_default());
            assert_eq!(&service_from_pb(&p).unwrap(), s);
        }
        let n = node(vec![named.clone(), example, path, none]);
        let got = apply_message(&NodeState::default(), 0, &snapshot(3, &n)).unwrap();
        assert_eq!(got.state, n);
        // A delta that only changes the selector carries it.
        let mut n2 = n.clone();
        n2.state.services[0].selector = Some("geo-us".into());
        let d = delta(3, &n, 4, &n2).expect("a change");
        let got = apply_message(&n, 3, &d).unwrap();
        assert_eq!(got.state, n2);
        // Invalid: refused with its service.
        let mut bad = pb::Service::from(&named);
        bad.selector = "Geo/x".into();
        assert!(matches!(service_from_pb(&bad), Err(WireError::Invalid(..))));
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A resolved state's gRPC spill-over (the policy and the drained
    /// backends' spill weights) reaches the agent as it left.
    #[test]
    fn a_spill_over_policy_round_trips() {
        let mut s = svc("a/b:grpc", 80, &[(1, 1), (2, 2), (3, 0), (4, 0)]);
        s.grpc = Some(GrpcPolicy::default());
        s.locality = Some(Locality {
            tiers: vec![LocalityTier::Node, LocalityTier::Zone],
            min_backends: 2,
            spill_outstanding: Some(50),
        });
        s.backends[2].spill_weight = Some(7);
        let p = pb::Service::from(&s);
        assert_eq!(p.backends[2].spill_weight, 7);
        assert_eq!(p.backends[3].spill_weight, 0);
        assert_eq!(p.locality.as_ref().unwrap().tiers, ["node", "zone"]);
        assert_eq!(p.locality.as_ref().unwrap().spill_outstanding, 50);
        let n = node(vec![s.clone()]);
        let got = apply_message(&NodeState::default(), 0, &snapshot(3, &n)).unwrap();
        assert_eq!(got.state, n);
        assert!(got.refused.is_empty());
        // A policy without the threshold is the controller's to resolve: it
        // is not sent.
        let mut plain = s.clone();
        plain.backends[2].spill_weight = None;
        plain.locality.as_mut().unwrap().spill_outstanding = None;
        assert!(pb::Service::from(&plain).locality.is_none());
        // A bad tier or threshold from the wire is refused.
        let mut bad = pb::Service::from(&s);
        bad.locality.as_mut().unwrap().tiers = vec!["rack".into()];
        let e = service_from_pb(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown locality tier"), "{e}");
        let mut l4 = s.clone();
        l4.grpc = None;
        let e = service_from_pb(&pb::Service::from(&l4))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs the gRPC mode"), "{e}");
    }

    #[test]
    fn an_ipv6_service_round_trips() {
        let mut s = svc("a/v6:http", 80, &[]);
        s.vip = v6("fd00:10:96::1");
        s.backends = vec![
            Backend::new(v6("fd00:10:244::2"), 8080),
            Backend::new(v6("fd00:10:244:1::3"), 8080),
        ];
        let p = pb::Service::from(&s);
        assert_eq!(p.addr.as_ref().unwrap().vip, 0);
        assert_eq!(p.addr.as_ref().unwrap().vip6, v6_octets("fd00:10:96::1"));
        assert_eq!(p.backends[0].ip, 0);
        assert_eq!(service_from_pb(&p).unwrap(), s);
        // Its front ends: the node port, and IPv6 external IPs in their own field.
        let mut fe = s.clone();
        fe.external.node_port = Some(30080);
        fe.external.ips = vec![v6("fd00:60::10"), v6("fd00:60::11")];
        let p6 = pb::Service::from(&fe);
        assert!(p6.external_ips.is_empty());
        assert_eq!(
            p6.external_ips6,
            vec![v6_octets("fd00:60::10"), v6_octets("fd00:60::11")]
        );
        assert_eq!(service_from_pb(&p6).unwrap(), fe);
        let mut bad = p6.clone();
        bad.external_ips6[1].pop();
        assert!(
            service_from_pb(&bad)
                .unwrap_err()
                .to_string()
                .contains("15 bytes")
        );
        // An IPv4 service leaves the new fields empty: old agents read it as before.
        let p4 = pb::Service::from(&svc("a/v4:http", 80, &[(1, 1)]));
        assert!(p4.addr.as_ref().unwrap().vip6.is_empty() && p4.backends[0].ip6.is_empty());
        // Malformed: a short address, or both families at once.
        let mut bad = p.clone();
        bad.addr.as_mut().unwrap().vip6.pop();
        assert!(
            service_from_pb(&bad)
                .unwrap_err()
                .to_string()
                .contains("15 bytes")
        );
        let mut bad = p.clone();
        bad.backends[0].ip = 1;
        assert!(
            service_from_pb(&bad)
                .unwrap_err()
                .to_string()
                .contains("both an IPv4")
        );
    }

    fn v6_octets(s: &str) -> Vec<u8> {
        s.parse::<Ipv6Addr>().unwrap().octets().to_vec()
    }

    /// An agent that predates the IPv6 fields skips them (unknown fields):
    /// it sees the IPv6 service at 0.0.0.0, refuses it alone and keeps the
    /// rest; a removal of it removes nothing it has.
    #[test]
    fn an_ipv4_only_agent_refuses_an_ipv6_service() {
        let mut s6 = svc("a/v6:http", 80, &[]);
        s6.vip = v6("fd00:10:96::1");
        s6.backends = vec![Backend::new(v6("fd00:10:244::2"), 8080)];
        let n = node(vec![svc("a/v4:http", 80, &[(1, 1)]), s6]);
        let mut msg = snapshot(1, &n);
        let Some(pb::controller_message::Body::Snapshot(snap)) = msg.body.as_mut() else {
            panic!("not a snapshot");
        };
        for p in &mut snap.services {
            p.addr.as_mut().unwrap().vip6.clear();
            for b in &mut p.backends {
                b.ip6.clear();
            }
        }
        let got = apply_message(&NodeState::default(), 0, &msg).unwrap();
        let names: Vec<_> = got
            .state
            .state
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["a/v4:http"]);
        assert_eq!(got.refused.len(), 1);
        assert_eq!(got.refused[0].service, "a/v6:http");
        assert!(
            got.refused[0]
                .reason
                .contains("0.0.0.0 is not a unicast address"),
            "{:?}",
            got.refused
        );
    }

    #[test]
    fn delta_carries_only_changes_and_applies() {
        let old = node(vec![
            svc("a/x:1", 1, &[(1, 1)]),
            svc("a/y:2", 2, &[(1, 1)]),
            svc("a/z:3", 3, &[(1, 1)]),
        ]);
        let mut new = old.clone();
        new.state.services.remove(0);
        new.state.services[0]
            .backends
            .push(Backend::new(Ipv4Addr::new(10, 244, 0, 9), 8080));
        new.state.services.push(svc("a/w:4", 4, &[]));
        let msg = delta(3, &old, 4, &new).unwrap();
        let pb::controller_message::Body::Delta(d) = msg.body.as_ref().unwrap() else {
            panic!("not a delta");
        };
        assert_eq!(d.base_version, 3);
        let names: Vec<_> = d.upserts.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a/y:2", "a/w:4"]);
        assert_eq!(d.removals.len(), 1);
        assert!(d.timeouts.is_none());
        let mut got = apply_message(&old, 3, &msg).unwrap().state;
        got.state.services.sort_by_key(|s| s.addr());
        let mut want = new.clone();
        want.state.services.sort_by_key(|s| s.addr());
        assert_eq!(got, want);
        assert!(delta(4, &new, 5, &new).is_none(), "no change, no message");
    }

    #[test]
    fn delta_with_the_wrong_base_is_refused() {
        let a = node(vec![svc("a/x:1", 1, &[(1, 1)])]);
        let b = node(vec![]);
        let msg = delta(3, &a, 4, &b).unwrap();
        assert_eq!(
            apply_message(&a, 2, &msg),
            Err(WireError::WrongBase { base: 3, have: 2 })
        );
    }

    #[test]
    fn a_bad_service_is_refused_alone() {
        let good = svc("a/x:1", 1, &[(1, 1)]);
        let other = svc("a/y:2", 2, &[(2, 1)]);
        let cases: Vec<(pb::Service, &str)> = vec![
            (
                pb::Service {
                    name: String::new(),
                    ..(&good).into()
                },
                "missing field `name`",
            ),
            (
                {
                    let mut p: pb::Service = (&good).into();
                    p.addr.as_mut().unwrap().port = 70000;
                    p
                },
                "port 70000",
            ),
            (
                {
                    let mut p: pb::Service = (&good).into();
                    p.addr.as_mut().unwrap().protocol = 0;
                    p
                },
                "protocol 0",
            ),
            (
                pb::Service {
                    algorithm: 42,
                    ..(&good).into()
                },
                "unknown algorithm 42",
            ),
            (
                {
                    let mut g = good.clone();
                    g.grpc = Some(GrpcPolicy {
                        retry: Some(RetryPolicy::new(3)),
                        ..GrpcPolicy::default()
                    });
                    let mut p: pb::Service = (&g).into();
                    let r = p.grpc.as_mut().unwrap().retry.as_mut().unwrap();
                    r.max_attempts = 9;
                    p
                },
                "grpc.retry.max_attempts: max_attempts 9 is out of range",
            ),
            (
                {
                    let mut g = good.clone();
                    g.grpc = Some(GrpcPolicy {
                        outlier_detection: Some(OutlierDetection::default()),
                        ..GrpcPolicy::default()
                    });
                    let mut p: pb::Service = (&g).into();
                    let o = p.grpc.as_mut().unwrap();
                    o.outlier_detection.as_mut().unwrap().max_ejection_percent = 101;
                    p
                },
                "grpc.outlier_detection.max_ejection_percent: max_ejection_percent 101 is out of range",
            ),
            (
                {
                    let mut g = good.clone();
                    g.grpc = Some(GrpcPolicy {
                        balancing: Balancing::OrcaWrr(OrcaWrr::default()),
                        ..GrpcPolicy::default()
                    });
                    let mut p: pb::Service = (&g).into();
                    let w = p.grpc.as_mut().unwrap().orca_wrr.as_mut().unwrap();
                    w.weight_update_period_ms = 0;
                    p
                },
                "grpc.orca_wrr.weight_update_period: weight_update_period 0ns is out of range",
            ),
            (
                {
                    let mut p: pb::Service = (&good).into();
                    p.backends[0].weight = crate::MAX_WEIGHT + 1;
                    p
                },
                "backends[0].weight: weight 65536 is too large",
            ),
            (
                {
                    let mut p: pb::Service = (&good).into();
                    p.backends.push(p.backends[0].clone());
                    p
                },
                "duplicate backend",
            ),
            (
                pb::Service {
                    maglev_table_size: 1000,
                    ..(&good).into()
                },
                "not prime",
            ),
            (
                pb::Service {
                    affinity_timeout_s: 86_401,
                    ..(&good).into()
                },
                "affinity timeout",
            ),
        ];
        // The agent has `good` (v1); v2 brings a broken `good` and `other`.
        let current = node(vec![good.clone()]);
        for (bad, want) in cases {
            let msg = pb::ControllerMessage {
                version: 2,
                body: Some(pb::controller_message::Body::Snapshot(pb::Snapshot {
                    services: vec![bad, (&other).into()],
                    timeouts: None,
                })),
            };
            let got = apply_message(&current, 1, &msg).unwrap();
            assert_eq!(got.refused.len(), 1, "{want}");
            let r = &got.refused[0];
            assert!(r.reason.contains(want), "{r:?} should contain {want:?}");
            let mut names: Vec<&str> = got
                .state
                .state
                .services
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            names.sort();
            if r.addr == Some(good.addr()) {
                // The address was readable: the old `good` stays.
                assert_eq!(names, ["a/x:1", "a/y:2"], "{want}");
                assert_eq!(got.state.state.services[0], good);
            } else {
                assert_eq!(names, ["a/y:2"], "{want}");
            }
            // The same in a delta: the old `good` stays.
            let msg = pb::ControllerMessage {
                version: 2,
                body: Some(pb::controller_message::Body::Delta(pb::Delta {
                    base_version: 1,
                    upserts: vec![
                        match &msg.body {
                            Some(pb::controller_message::Body::Snapshot(s)) => {
                                s.services[0].clone()
                            }
                            _ => unreachable!(),
                        },
                        (&other).into(),
                    ],
                    removals: vec![],
                    timeouts: None,
                })),
            };
            let got = apply_message(&current, 1, &msg).unwrap();
            assert_eq!(got.refused.len(), 1);
            assert_eq!(got.state.state.services, vec![good.clone(), other.clone()]);
        }
        // Two services on one address: the first keeps it.
        let mut twin = good.clone();
        twin.name = "a/twin:1".into();
        let n = node(vec![good.clone(), twin]);
        let got = apply_message(&current, 1, &snapshot(2, &n)).unwrap();
        assert_eq!(got.state.state.services, vec![good.clone()]);
        assert_eq!(got.refused.len(), 1);
        assert_eq!(got.refused[0].service, "a/twin:1");
        assert!(
            got.refused[0].reason.contains("same address"),
            "{:?}",
            got.refused
        );
        // What spoils the whole message changes nothing.
        let mut m = snapshot(2, &current);
        if let Some(pb::controller_message::Body::Snapshot(s)) = m.body.as_mut() {
            s.timeouts.as_mut().unwrap().udp_ms = 0;
        }
        let e = apply_message(&current, 1, &m).unwrap_err().to_string();
        assert!(e.contains("timeouts.udp"), "{e}");
        assert_eq!(
            apply_message(&current, 1, &pb::ControllerMessage::default()),
            Err(WireError::Empty)
        );
    }

    /// The rolling-update freeze: a table sized (by the controller) for the
    /// ready pods is accepted while some pods are terminating.
    #[test]
    fn a_maglev_table_sized_for_ready_pods_is_accepted_during_a_rollout() {
        let backends: Vec<(u8, u32)> = (1..=210).map(|i| (i, 1)).collect();
        let mut s = svc("a/big:1", 1, &backends);
        for b in &mut s.backends[200..] {
            b.state = BackendState::Terminating;
        }
        s.maglev_table_size = Some(20_011);
        let got = apply_message(
            &NodeState::default(),
            0,
            &snapshot(1, &node(vec![s.clone()])),
        )
        .unwrap();
        assert_eq!(got.refused, vec![]);
        assert_eq!(got.state.state.services, vec![s]);
    }
}
