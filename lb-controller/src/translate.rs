//! Kubernetes Services and EndpointSlices → the desired state of one node.
//!
//! Pure: no I/O, no clock, no logging. Equal inputs give equal outputs, in
//! any input order.
//!
//! # Rules
//!
//! **Services.** One [`lb_api::Service`] per (ClusterIP, service port), named
//! `namespace/name:port`, where `port` is the service port's name, or its
//! number when it is unnamed. Its [`External`] front ends come from the same
//! port: `nodePort` (types NodePort and LoadBalancer), `externalIPs`, the
//! `status.loadBalancer.ingress[].ip`s (type LoadBalancer),
//! `externalTrafficPolicy` and `healthCheckNodePort` (Local only). Each
//! family's service gets the node port and the addresses of its own family
//! (a dual-stack Service's IPv4 service the IPv4 external IPs, its IPv6
//! service the IPv6 ones; the agent puts each node port on the node's
//! addresses of the service's family). Each
//! backend carries its endpoint's `nodeName`: the agent of that node takes it
//! as local (externalTrafficPolicy Local).
//!
//! - `type: ExternalName` and headless Services (`clusterIP: None`) are
//!   skipped, and so is a Service whose ClusterIP is not allocated yet.
//! - IPv4, IPv6 and dual-stack: one service per address of `spec.clusterIPs`
//!   (else `spec.clusterIP`), in that order, which is `spec.ipFamilies`'
//!   order (Kubernetes keeps them in step; the family is read from the
//!   address). The first (primary) family's services are named as above; a
//!   dual-stack Service's second family's get `@ipv4` or `@ipv6` appended
//!   (`shop/cart:grpc@ipv6`), so that names (lbctl, metrics) stay unique. A
//!   ClusterIP that is not an IP address is skipped with a [`Problem`].
//! - Protocols: TCP (the default) and UDP. An SCTP port is skipped with a
//!   [`Problem`]; the Service's other ports are still balanced.
//!
//! **Backends.** An EndpointSlice belongs to a Service when it is in the same
//! namespace and its label `kubernetes.io/service-name` names the Service.
//! `addressType: IPv4` slices give the backends of the IPv4 ClusterIP,
//! `IPv6` slices those of the IPv6 one (`FQDN` slices are ignored); of each
//! endpoint only its first address is read (the EndpointSlice controller
//! writes exactly one; kube-proxy reads only the first).
//!
//! - Target ports: a slice port serves a service port when their names are
//!   equal (an unnamed port has the empty name), as in Kubernetes, and their
//!   protocols agree. The slice port's number is the backend port. This
//!   covers named and numbered `targetPort`s alike: the EndpointSlice
//!   controller has already resolved them, per pod. A slice port without a
//!   number is ignored.
//! - Conditions: `ready` (a missing value counts as true) →
//!   [`BackendState::Active`]; not ready, but `serving: true` and
//!   `terminating: true` → [`BackendState::Terminating`] (keeps its flows,
//!   gets no new ones); anything else is left out. A terminating endpoint
//!   that is still `ready` (possible with `publishNotReadyAddresses`) is
//!   Active, as in kube-proxy.
//! - The same `ip:port` in several slices (they overlap while the
//!   EndpointSlice controller moves endpoints) is one backend, Active if any
//!   copy is.
//! - `internalTrafficPolicy: Local`: a node gets only the endpoints whose
//!   `nodeName` is that node (none: the Service has no backends there, and
//!   new connections are refused). This is why the state is per node.
//! - Topology hints (`hints.forNodes`, `hints.forZones`; `trafficDistribution`
//!   and topology-aware routing), as kube-proxy reads them (`topology`).
//!   The backends not for the node (or its zone, given to
//!   [`ClusterState::node_state_in_zone`]) are drained (weight 0).
//!
//! **Policy.** The `rpclb.io/` annotations, read by [`parse_annotations`],
//! give the algorithm, the weights (by backend IP) and the Maglev table size.
//!
//! - A backend Pod's own annotations ([`Pods`], read by
//!   [`parse_pod_annotations`]): the endpoint's `targetRef` (kind `Pod`, in
//!   the slice's namespace; another namespace's is not followed) names the
//!   Pod. Its `rpclb.io/weight` is the backend's weight unless the Service's
//!   `rpclb.io/weights` lists the backend's IP (the Service's entry wins);
//!   its `rpclb.io/max` is the backend's own `max`, which wins over the
//!   Service's `rpclb.io/max-per-backend`. An invalid one is a [`Problem`] on
//!   the Pod ([`Subject::Pod`]), once per Pod, and the default is used.
//!
//! - `sessionAffinity: ClientIP` sets the affinity timeout from
//!   `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800 s, at
//!   most 86400 s) and makes the algorithm `source-hash`, unless a valid
//!   `rpclb.io/algorithm` chose another.
//! - An invalid annotation gives a [`Problem`], and its default is used.
//! - Maglev table size (for `maglev` and `source-hash`): the table must be
//!   larger than 100 × the backends that take new flows, counted over the
//!   whole cluster (so the size also suits every node's subset under the
//!   Local policy). An annotated size that is too small gives a [`Problem`]
//!   and the default is used. When the default (16381) is too small, the
//!   smallest prime that is large enough is used, with no problem; beyond
//!   the data path's largest table (2^24 slots) the service falls back to
//!   `random`, with a [`Problem`].
//! - Two Services on the same VIP, port and protocol (only possible with
//!   inconsistent input): the first in `namespace/name` order keeps it, the
//!   other gets a [`Problem`].
//!
//! **Order.** Services are sorted by (VIP, port, protocol) and backends by
//! (IP, port). Problems are sorted by Service (`namespace/name`).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service as KubeService, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use lb_api::locality::{self, NodeLocation, NodeLocations, Place};
use lb_api::{
    Algorithm, Backend, BackendState, DEFAULT_MAGLEV_M, DesiredState, External, Locality,
    LocalityTier, Protocol, Service, ServiceAddr, TrafficPolicy, validate,
};

use crate::annotations::{
    self, AnnotationError, PodPolicy, ServicePolicy, parse_annotations, parse_pod_annotations,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Client-IP affinity timeout when the Service gives none (as in Kubernetes).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);
/// The longest client-IP affinity timeout Kubernetes allows.
pub const MAX_AFFINITY_TIMEOUT: Duration = validate::MAX_AFFINITY_TIMEOUT;
/// The largest Maglev table the data path holds (the config file's limit).
pub const MAX_MAGLEV_TABLE_SIZE: u32 = validate::MAX_MAGLEV_M;

/// The desired state of one node, and what was wrong on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub state: DesiredState,
    pub problems: Vec<Problem>,
}

/// The desired state of `node`: see the [module docs](self) for the rules.
///
/// To compute many nodes' states from one set of objects, build a
/// [`ClusterState`] once and call [`ClusterState::node_state`] per node.
pub fn node_state(services: &[KubeService], slices: &[EndpointSlice], node: &str) -> Translation {
    let cluster = ClusterState::build(services, slices);
    Translation {
        state: cluster.node_state(node),
        problems: cluster.problems,
    }
}

/// A Kubernetes Service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The `rpclb.io/` annotations of the Pods that have any, by namespace and
/// name: what the controller keeps of its Pod watch (metadata only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pods {
    by_namespace: HashMap<String, HashMap<String, BTreeMap<String, String>>>,
}

impl Pods {
    /// Records Pod `namespace/name`'s `rpclb.io/` annotations (the others
    /// are dropped); a Pod without any is not kept.
    pub fn insert(&mut self, namespace: &str, name: &str, annotations: &BTreeMap<String, String>) {
        let ours: BTreeMap<String, String> = annotations
            .iter()
            .filter(|(k, _)| k.starts_with(annotations::PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !ours.is_empty() {
            self.by_namespace
                .entry(namespace.to_string())
                .or_default()
                .insert(name.to_string(), ours);
        }
    }

    /// How many Pods have `rpclb.io/` annotations.
    pub fn len(&self) -> usize {
        self.by_namespace.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, namespace: &str, name: &str) -> Option<(&str, &str, &BTreeMap<String, String>)> {
        let (ns, pods) = self.by_namespace.get_key_value(namespace)?;
        let (n, a) = pods.get_key_value(name)?;
        Some((ns, n, a))
    }
}

/// The Pods' policies, each read once per translation, and the problems of
/// the Pods that are backends.
struct PodBook<'a> {
    pods: &'a Pods,
    read: BTreeMap<(&'a str, &'a str), (PodPolicy, Vec<AnnotationError>)>,
}

impl<'a> PodBook<'a> {
    fn new(pods: &'a Pods) -> Self {
        PodBook {
            pods,
            read: BTreeMap::new(),
        }
    }

    /// Pod `namespace/name`'s policy (none without annotations).
    fn policy(&mut self, namespace: &str, name: &str) -> PodPolicy {
        let Some((ns, n, a)) = self.pods.get(namespace, name) else {
            return PodPolicy::default();
        };
        self.read
            .entry((ns, n))
            .or_insert_with(|| parse_pod_annotations(a))
            .0
    }

    /// One problem per invalid annotation of each Pod read (each Pod once,
    /// however many Services and ports it serves).
    fn problems(self) -> impl Iterator<Item = Problem> {
        self.read.into_iter().flat_map(|((ns, n), (_, errors))| {
            errors.into_iter().map(move |e| Problem {
                subject: Subject::Pod(PodRef {
                    namespace: ns.to_string(),
                    name: n.to_string(),
                }),
                fallback: e.fallback().to_string(),
                kind: ProblemKind::Annotation(e),
            })
        })
    }
}

/// A Pod, by namespace and name: what an endpoint's `targetRef` names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// What a [`Problem`] is about: the object its Event is on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Service(ServiceRef),
    /// A backend Pod's own annotations (`rpclb.io/weight`, `rpclb.io/max`).
    Pod(PodRef),
}

impl Subject {
    pub fn namespace(&self) -> &str {
        match self {
            Subject::Service(r) => &r.namespace,
            Subject::Pod(r) => &r.namespace,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Subject::Service(r) => &r.name,
            Subject::Pod(r) => &r.name,
        }
    }
}

/// `namespace/name` for a Service, `pod namespace/name` for a Pod.
impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Service(r) => write!(f, "{r}"),
            Subject::Pod(r) => write!(f, "pod {}/{}", r.namespace, r.name),
        }
    }
}

/// Something in a Service (or a backend Pod's annotations) that rpclb could
/// not use as given. It becomes a Kubernetes Event (type Warning) on that
/// object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub subject: Subject,
    /// What was wrong.
    pub kind: ProblemKind,
    /// What was done instead: the default used, or what was skipped.
    pub fallback: String,
}

impl Problem {
    /// The Event's `reason`.
    pub fn reason(&self) -> &'static str {
        self.kind.reason()
    }
}

/// The Event's note: what was wrong, then what was done instead.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; {}", self.kind, self.fallback)
    }
}

/// What was wrong with a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// An `rpclb.io/` annotation could not be used.
    Annotation(AnnotationError),
    /// `rpclb.io/maglev-table-size` is not larger than 100 × the backends.
    MaglevTableTooSmall {
        port: String,
        size: u32,
        backends: usize,
    },
    /// Even the largest Maglev table is too small for this many backends.
    TooManyBackendsForMaglev {
        port: String,
        algorithm: Algorithm,
        backends: usize,
    },
    /// A port whose protocol the data path does not balance (SCTP).
    UnsupportedProtocol { port: String, protocol: String },
    /// A port number outside 1..=65535.
    InvalidPort { port: String, number: i32 },
    /// A ClusterIP that is not an IP address (it is skipped).
    InvalidClusterIp { cluster_ip: String },
    /// `sessionAffinityConfig.clientIP.timeoutSeconds` outside 1..=86400.
    InvalidAffinityTimeout { seconds: i32 },
    /// Another Service already has this VIP, port and protocol.
    DuplicateAddress { addr: ServiceAddr, owner: String },
    /// What the port would become breaks a rule of `lb_api::validate` (a
    /// backend on a broadcast address, say); agents would refuse it.
    InvalidService {
        port: String,
        error: lb_api::InvalidService,
    },
}

impl ProblemKind {
    /// The Event's `reason` (UpperCamelCase, as Kubernetes reasons are).
    pub fn reason(&self) -> &'static str {
        match self {
            ProblemKind::Annotation(_) | ProblemKind::MaglevTableTooSmall { .. } => {
                AnnotationError::EVENT_REASON
            }
            ProblemKind::TooManyBackendsForMaglev { .. } => "TooManyBackends",
            ProblemKind::UnsupportedProtocol { .. } => "UnsupportedProtocol",
            ProblemKind::InvalidPort { .. } => "InvalidPort",
            ProblemKind::InvalidClusterIp { .. } => "InvalidClusterIP",
            ProblemKind::InvalidAffinityTimeout { .. } => "InvalidSessionAffinity",
            ProblemKind::DuplicateAddress { .. } => "DuplicateServiceAddress",
            ProblemKind::InvalidService { .. } => "InvalidService",
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProblemKind::Annotation(e) => {
                write!(
                    f,
                    "invalid annotation {}={:?}: {}",
                    e.key, e.value, e.problem
                )
            }
            ProblemKind::MaglevTableTooSmall {
                port,
                size,
                backends,
            } => write!(
                f,
                "port {port}: {} {size} is too small for {backends} backends (it must be > 100 x backends)",
                annotations::MAGLEV_TABLE_SIZE
            ),
            ProblemKind::TooManyBackendsForMaglev {
                port,
                algorithm,
                backends,
            } => write!(
                f,
                "port {port}: {algorithm} needs a Maglev table larger than 100 x {backends} backends, \
                 above the largest the data path holds ({MAX_MAGLEV_TABLE_SIZE})"
            ),
            ProblemKind::UnsupportedProtocol { port, protocol } => {
                write!(f, "port {port}: protocol {protocol} is not supported")
            }
            ProblemKind::InvalidPort { port, number } => {
                write!(f, "port {port}: {number} is not a port number")
            }
            ProblemKind::InvalidClusterIp { cluster_ip } => {
                write!(f, "ClusterIP {cluster_ip:?} is not an IP address")
            }
            ProblemKind::InvalidAffinityTimeout { seconds } => write!(
                f,
                "sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is outside 1..={}",
                MAX_AFFINITY_TIMEOUT.as_secs()
            ),
            ProblemKind::DuplicateAddress { addr, owner } => {
                write!(f, "{addr} is already the address of {owner}")
            }
            ProblemKind::InvalidService { port, error } => write!(f, "port {port}: {error}"),
        }
    }
}

/// The translation of a whole cluster, from which each node's state is cut
/// cheaply: every Service with all its backends, and which of them are
/// node-local. Build it once per change; call [`node_state`](Self::node_state)
/// per node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// Sorted by (VIP, port, protocol).
    services: Vec<ClusterService>,
    problems: Vec<Problem>,
    /// Where the nodes are (their `topology.kubernetes.io/` labels).
    nodes: NodeLocations,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ClusterService {
    /// With the backends of every node.
    service: Service,
    /// `internalTrafficPolicy: Local`.
    local_only: bool,
    /// Each backend's `nodeName`, in the order of `service.backends`.
    nodes: Vec<Option<String>>,
    /// Each backend's topology hints, in the same order.
    hints: Vec<Hints>,
    /// Each backend's zone and region, in the same order: the endpoint's
    /// `zone`, else its node's label; its node's region label, else the
    /// region of another node in its zone.
    places: Vec<(Option<String>, Option<String>)>,
}

impl ClusterService {
    fn place(&self, i: usize) -> Place<'_> {
        Place {
            node: self.nodes[i].as_deref(),
            zone: self.places[i].0.as_deref(),
            region: self.places[i].1.as_deref(),
        }
    }
}

/// The locality of a Service: `rpclb.io/locality`, else its
/// `trafficDistribution` (`PreferSameZone` and its older name `PreferClose`:
/// this zone's endpoints; `PreferSameNode`: this node's, else this zone's).
fn locality_of(spec: &ServiceSpec, annotated: Option<&Locality>) -> Option<Locality> {
    if let Some(l) = annotated {
        return Some(l.clone());
    }
    match spec.traffic_distribution.as_deref() {
        Some("PreferSameZone" | "PreferClose") => Some(Locality::prefer_same_zone()),
        Some("PreferSameNode") => Some(Locality::prefer_same_node()),
        _ => None,
    }
}

/// An endpoint's topology hints (EndpointSlice `hints.forNodes`,
/// `hints.forZones`), written by the EndpointSlice controller for
/// `trafficDistribution` and topology-aware routing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Hints {
    nodes: Vec<String>,
    zones: Vec<String>,
}

/// kube-proxy's topology mode for a node (pkg/proxy/topology.go,
/// `topologyModeFromHints`), over the backends that take new flows: if every
/// one has node hints and one is for `node`, only those for `node`; else if
/// every one has zone hints and one is for `zone`, only those for `zone`;
/// else all. `Some(keep)`: which backends keep taking new flows.
fn topology(
    backends: &[Backend],
    hints: &[Hints],
    node: Option<&str>,
    zone: Option<&str>,
) -> Option<Vec<bool>> {
    let live: Vec<&Hints> = backends
        .iter()
        .zip(hints)
        .filter(|(b, _)| b.takes_new_flows())
        .map(|(_, h)| h)
        .collect();
    if live.is_empty() {
        return None;
    }
    let has = |v: &[String], x: Option<&str>| x.is_some_and(|x| v.iter().any(|n| n == x));
    if live.iter().all(|h| !h.nodes.is_empty()) && live.iter().any(|h| has(&h.nodes, node)) {
        return Some(hints.iter().map(|h| has(&h.nodes, node)).collect());
    }
    if live.iter().all(|h| !h.zones.is_empty()) && live.iter().any(|h| has(&h.zones, zone)) {
        return Some(hints.iter().map(|h| has(&h.zones, zone)).collect());
    }
    None
}

impl ClusterState {
    /// Translates every Service. Takes `&[Service]` as well as the
    /// `&[Arc<Service>]` that a reflector store hands out.
    pub fn build<S, E>(services: &[S], slices: &[E]) -> Self
    where
        S: Borrow<KubeService>,
        E: Borrow<EndpointSlice>,
    {
        Self::build_with_nodes(services, slices, NodeLocations::new())
    }

    /// As [`build`](Self::build), knowing where the nodes are (each Node's
    /// `topology.kubernetes.io/zone` and `region` labels): zone hints and
    /// locality policies use them.
    pub fn build_with_nodes<S, E>(services: &[S], slices: &[E], nodes: NodeLocations) -> Self
    where
        S: Borrow<KubeService>,
        E: Borrow<EndpointSlice>,
    {
        Self::build_with_pods(services, slices, nodes, &Pods::default())
    }

    /// As [`build_with_nodes`](Self::build_with_nodes), with the backend
    /// Pods' own annotations (`rpclb.io/weight`, `rpclb.io/max`), joined to
    /// the endpoints by their `targetRef`.
    pub fn build_with_pods<S, E>(
        services: &[S],
        slices: &[E],
        nodes: NodeLocations,
        pods: &Pods,
    ) -> Self
    where
        S: Borrow<KubeService>,
        E: Borrow<EndpointSlice>,
    {
        let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in slices.iter().map(Borrow::borrow) {
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let Some(owner) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            by_service
                .entry((namespace_of(&slice.metadata), owner.as_str()))
                .or_default()
                .push(slice);
        }

        let mut ordered: Vec<(ServiceRef, &KubeService)> = services
            .iter()
            .map(Borrow::borrow)
            .filter_map(|s| {
                let name = s.metadata.name.as_deref()?;
                let r = ServiceRef {
                    namespace: namespace_of(&s.metadata).to_string(),
                    name: name.to_string(),
                };
                Some((r, s))
            })
            .collect();
        ordered.sort_by(|a, b| a.0.cmp(&b.0));

        // A zone's region: the first by node name that names one.
        let mut zone_region = BTreeMap::new();
        for l in nodes.values() {
            if let (Some(z), Some(r)) = (&l.zone, &l.region) {
                zone_region.entry(z.as_str()).or_insert(r.as_str());
            }
        }
        let topo = Topo {
            nodes: &nodes,
            zone_region,
        };
        let mut out = Vec::new();
        let mut problems = Vec::new();
        let mut book = PodBook::new(pods);
        for (r, svc) in &ordered {
            let slices = by_service
                .get(&(r.namespace.as_str(), r.name.as_str()))
                .map_or(&[][..], Vec::as_slice);
            translate_service(r, svc, slices, &topo, &mut book, &mut out, &mut problems);
        }
        problems.extend(book.problems());

        // One owner per address; `out` is in namespace/name order, and the
        // stable sort keeps that order among equal addresses.
        out.sort_by_key(|(_, s)| s.service.addr());
        let mut services: Vec<ClusterService> = Vec::with_capacity(out.len());
        for (r, s) in out {
            if let Some(prev) = services.last()
                && prev.service.addr() == s.service.addr()
            {
                problems.push(Problem {
                    subject: Subject::Service(r.clone()),
                    kind: ProblemKind::DuplicateAddress {
                        addr: s.service.addr(),
                        owner: prev.service.name.clone(),
                    },
                    fallback: format!("port {} is not balanced", port_of(&s.service.name)),
                });
                continue;
            }
            services.push(s);
        }
        problems.sort_by(|a, b| a.subject.cmp(&b.subject));
        ClusterState {
            services,
            problems,
            nodes,
        }
    }

    /// The desired state of `node`, at its location if known.
    pub fn node_state(&self, node: &str) -> DesiredState {
        let here = Place::of_node(Some(node), &self.nodes);
        self.state_for(&here)
    }

    /// The desired state of `node` in `zone` (its `topology.kubernetes.io/zone`):
    /// zone hints apply too.
    pub fn node_state_in_zone(&self, node: &str, zone: Option<&str>) -> DesiredState {
        let region = self.nodes.get(node).and_then(|l| l.region.as_deref());
        self.state_for(&Place {
            node: Some(node),
            zone,
            region,
        })
    }

    /// The state of every node at `loc` that is not in
    /// [`local_nodes`](Self::local_nodes): computed once per location and
    /// shared by those nodes.
    pub fn location_state(&self, loc: &NodeLocation) -> DesiredState {
        self.state_for(&Place {
            node: None,
            zone: loc.zone.as_deref(),
            region: loc.region.as_deref(),
        })
    }

    /// Where the nodes are, as given to [`build_with_nodes`](Self::build_with_nodes).
    pub fn node_locations(&self) -> &NodeLocations {
        &self.nodes
    }

    /// Whether a node's zone or region can change its state: some service
    /// has zone hints or a locality tier `zone` or `region`. When not, every
    /// node outside [`local_nodes`](Self::local_nodes) has the default state.
    pub fn location_dependent(&self) -> bool {
        self.services.iter().filter(|cs| !cs.local_only).any(|cs| {
            cs.service.locality.as_ref().is_some_and(|l| {
                l.tiers
                    .iter()
                    .any(|t| matches!(t, LocalityTier::Zone | LocalityTier::Region))
            }) || cs.hints.iter().any(|h| !h.zones.is_empty())
        })
    }

    /// The state of every node outside [`local_nodes`](Self::local_nodes)
    /// whose location is unknown: services with
    /// `internalTrafficPolicy: Local` have no backends there.
    pub fn default_state(&self) -> DesiredState {
        self.state_for(&Place::default())
    }

    /// The nodes whose state differs from the [default](Self::default_state):
    /// those with a backend of a service with `internalTrafficPolicy: Local`,
    /// and those named in a node hint (`trafficDistribution: PreferSameNode`).
    pub fn local_nodes(&self) -> BTreeSet<&str> {
        let hinted = self.services.iter().flat_map(|cs| {
            cs.hints
                .iter()
                .flat_map(|h| h.nodes.iter().map(String::as_str))
        });
        // A node tier: the nodes that run one of the service's backends.
        let node_tier = self
            .services
            .iter()
            .filter(|cs| {
                cs.service
                    .locality
                    .as_ref()
                    .is_some_and(|l| l.tiers.contains(&LocalityTier::Node))
            })
            .flat_map(|cs| cs.nodes.iter().flatten().map(String::as_str));
        self.services
            .iter()
            .filter(|cs| cs.local_only)
            .flat_map(|cs| cs.nodes.iter().flatten().map(String::as_str))
            .chain(hinted)
            .chain(node_tier)
            .collect()
    }

    /// `here.node` `None`: a node with no local backends. A locality policy
    /// (resolved here: the state sent carries none, but a gRPC
    /// `spill_outstanding` and the spill weights) or else topology hints
    /// drain (weight 0) the backends not for this place: their flows go on.
    fn state_for(&self, here: &Place<'_>) -> DesiredState {
        let (node, zone) = (here.node, here.zone);
        let services = self
            .services
            .iter()
            .map(|cs| {
                if !cs.local_only {
                    let mut s = cs.service.clone();
                    if s.locality.is_some() {
                        locality::apply(&mut s, here, |i| cs.place(i));
                    } else if let Some(keep) = topology(&s.backends, &cs.hints, node, zone) {
                        for (b, k) in s.backends.iter_mut().zip(keep) {
                            if !k {
                                b.weight = 0;
                            }
                        }
                    }
                    return s;
                }
                let s = &cs.service;
                Service {
                    max_per_backend: s.max_per_backend,
                    selector: s.selector.clone(),
                    external: s.external.clone(),
                    name: s.name.clone(),
                    vip: s.vip,
                    port: s.port,
                    protocol: s.protocol,
                    algorithm: s.algorithm,
                    affinity_timeout: s.affinity_timeout,
                    maglev_table_size: s.maglev_table_size,
                    grpc: s.grpc.clone(),
                    health_check: s.health_check.clone(),
                    // Only this node's backends: no locality to resolve.
                    locality: None,
                    backends: s
                        .backends
                        .iter()
                        .zip(&cs.nodes)
                        .filter(|(_, n)| node.is_some() && n.as_deref() == node)
                        .map(|(b, _)| b.clone())
                        .collect(),
                }
            })
            .collect();
        DesiredState { services }
    }

    /// Every problem found, sorted by Service.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// How many services (VIP, port, protocol) there are.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }
}

/// The namespace of an object; Kubernetes' `default` when unset (objects
/// read from the API always have one).
fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// The `port` part of `namespace/name:port`.
fn port_of(name: &str) -> &str {
    name.rsplit_once(':').map_or(name, |(_, p)| p)
}

/// Which ClusterIPs a Service is balanced on.
#[derive(Debug, PartialEq, Eq)]
enum ClusterIp {
    /// One per family, primary first; and the addresses that did not parse.
    Ips(Vec<IpAddr>, Vec<String>),
    Headless,
    Unallocated,
}

fn cluster_ip(spec: &ServiceSpec) -> ClusterIp {
    let ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(&spec.cluster_ip)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    if ips.is_empty() {
        ClusterIp::Unallocated
    } else if ips.contains(&"None") {
        ClusterIp::Headless
    } else {
        let (mut good, mut bad): (Vec<IpAddr>, Vec<String>) = (Vec::new(), Vec::new());
        for ip in ips {
            match ip.parse::<IpAddr>() {
                // `clusterIP` repeats `clusterIPs[0]`; one address per family.
                Ok(a) if !good.iter().any(|g| g.is_ipv4() == a.is_ipv4()) => good.push(a),
                Ok(_) => {}
                Err(_) if !bad.iter().any(|b| b == ip) => bad.push(ip.to_string()),
                Err(_) => {}
            }
        }
        ClusterIp::Ips(good, bad)
    }
}

/// The EndpointSlice `addressType` of an address's family.
fn address_type(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// The backend state of an endpoint with these conditions; `None`: left out.
pub fn endpoint_state(conditions: Option<&EndpointConditions>) -> Option<BackendState> {
    let is = |f: fn(&EndpointConditions) -> Option<bool>| conditions.and_then(f);
    if is(|c| c.ready).unwrap_or(true) {
        Some(BackendState::Active)
    } else if is(|c| c.serving) == Some(true) && is(|c| c.terminating) == Some(true) {
        Some(BackendState::Terminating)
    } else {
        None
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// Translates one Service's ports into `out`, and its problems into
/// `problems`.
fn translate_service(
    r: &ServiceRef,
    svc: &KubeService,
    slices: &[&EndpointSlice],
    topo: &Topo<'_>,
    pods: &mut PodBook<'_>,
    out: &mut Vec<(ServiceRef, ClusterService)>,
    problems: &mut Vec<Problem>,
) {
    let Some(spec) = &svc.spec else { return };
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let problem = |kind: ProblemKind, fallback: String| Problem {
        subject: Subject::Service(r.clone()),
        kind,
        fallback,
    };
    let vips = match cluster_ip(spec) {
        ClusterIp::Ips(good, bad) => {
            for cluster_ip in bad {
                problems.push(problem(
                    ProblemKind::InvalidClusterIp { cluster_ip },
                    "this ClusterIP is not balanced by rpclb".into(),
                ));
            }
            good
        }
        ClusterIp::Headless | ClusterIp::Unallocated => return,
    };

    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let seconds = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        let Some(seconds) = seconds else {
            return DEFAULT_AFFINITY_TIMEOUT;
        };
        let max = MAX_AFFINITY_TIMEOUT.as_secs();
        match u64::try_from(seconds)
            .ok()
            .filter(|s| (1..=max).contains(s))
        {
            Some(s) => Duration::from_secs(s),
            None => {
                problems.push(problem(
                    ProblemKind::InvalidAffinityTimeout { seconds },
                    format!(
                        "using the default timeout ({} s)",
                        DEFAULT_AFFINITY_TIMEOUT.as_secs()
                    ),
                ));
                DEFAULT_AFFINITY_TIMEOUT
            }
        }
    });

    let empty = BTreeMap::new();
    let annotations = svc.metadata.annotations.as_ref().unwrap_or(&empty);
    let (policy, errors) = parse_annotations(annotations);
    let algorithm_annotated = annotations.contains_key(annotations::ALGORITHM)
        && !errors.iter().any(|e| e.key == annotations::ALGORITHM);
    let algorithm = if affinity.is_some() && !algorithm_annotated {
        Algorithm::SourceHash
    } else {
        policy.algorithm
    };
    for e in errors {
        let fallback = if e.key == annotations::ALGORITHM && affinity.is_some() {
            "using source-hash (the default with sessionAffinity: ClientIP)".to_string()
        } else {
            e.fallback().to_string()
        };
        problems.push(problem(ProblemKind::Annotation(e), fallback));
    }

    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
    let locality = locality_of(spec, policy.locality.as_ref());
    // `rpclb.io/selector` on a port it cannot serve: one Event per Service.
    let mut selector_reported = false;
    // Each port once per ClusterIP (family); a port's own problems are
    // reported once, with the first.
    let per_vip = vips.iter().enumerate().flat_map(|(i, &vip)| {
        let suffix = match (i, vip.is_ipv4()) {
            (0, _) => "",
            (_, true) => "@ipv4",
            (_, false) => "@ipv6",
        };
        spec.ports.iter().flatten().map(move |sp| (vip, suffix, sp))
    });
    for (vip, suffix, sp) in per_vip {
        let first = suffix.is_empty();
        let port_name = sp.name.as_deref().unwrap_or("");
        let label = if port_name.is_empty() {
            sp.port.to_string()
        } else {
            port_name.to_string()
        };
        let protocol = match sp.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                problems.extend(first.then(|| {
                    problem(
                        ProblemKind::UnsupportedProtocol {
                            port: label.clone(),
                            protocol: other.to_string(),
                        },
                        "this port is not balanced by rpclb".into(),
                    )
                }));
                continue;
            }
        };
        let Some(port) = u16::try_from(sp.port).ok().filter(|&p| p != 0) else {
            problems.extend(first.then(|| {
                problem(
                    ProblemKind::InvalidPort {
                        port: label.clone(),
                        number: sp.port,
                    },
                    "this port is not balanced".into(),
                )
            }));
            continue;
        };

        let (backends, backend_nodes, hints, zones) =
            backends_for(slices, vip, port_name, protocol, &policy, pods);
        let places = place_backends(&backend_nodes, zones, topo);
        let mut service = Service {
            max_per_backend: policy.max_per_backend,
            selector: policy.selector.clone(),
            external: external_of(svc, spec, sp, vip.is_ipv4()),
            name: format!("{r}:{label}{suffix}"),
            vip,
            port,
            protocol,
            algorithm,
            affinity_timeout: affinity,
            maglev_table_size: policy.maglev_table_size,
            backends,
            // The gRPC mode is TCP only; a UDP port of the Service stays L4.
            grpc: policy
                .grpc_policy(&r.namespace)
                .filter(|_| protocol == Protocol::Tcp),
            // Health checks are TCP (connect or h2c); a UDP port goes unchecked.
            health_check: policy
                .health_check
                .clone()
                .filter(|_| protocol == Protocol::Tcp),
            locality: locality.clone(),
        };
        if service.needs_maglev_table()
            && let Some((kind, fallback)) = choose_table_size(&mut service, &label)
        {
            problems.push(problem(kind, fallback));
        }
        // A selector this port cannot have (IPv6, the gRPC mode, more than
        // 16 backends): the port keeps its algorithm, reported once.
        if let Some(sel) = service.selector.clone()
            && let Err(why) = service.validate_selector(&sel)
        {
            service.selector = None;
            if !selector_reported {
                selector_reported = true;
                let e = AnnotationError {
                    key: annotations::SELECTOR.to_string(),
                    value: annotations
                        .get(annotations::SELECTOR)
                        .cloned()
                        .unwrap_or_default(),
                    problem: annotations::AnnotationProblem::SelectorValue(format!(
                        "port {label}{suffix}: {why}"
                    )),
                };
                let fallback = e.fallback().to_string();
                problems.push(problem(ProblemKind::Annotation(e), fallback));
            }
        }
        // The one validation: what passes here, every agent takes.
        if let Err(error) = service.validate() {
            problems.push(problem(
                ProblemKind::InvalidService {
                    port: label.clone(),
                    error,
                },
                "this port is not balanced".into(),
            ));
            continue;
        }
        out.push((
            r.clone(),
            ClusterService {
                service,
                local_only,
                nodes: backend_nodes,
                hints,
                places,
            },
        ));
    }
}

/// The external front ends of one service port of one family (`ipv4`: the
/// IPv4 ClusterIP's, else the IPv6 one's): `nodePort` (types NodePort and
/// LoadBalancer; each family's service has it, and the agent puts it on the
/// node's addresses of that family), the `externalIPs` and, for type
/// LoadBalancer, the `status.loadBalancer.ingress[].ip`s of that family
/// (sorted, without repeats; hostname-only ingresses are left out),
/// `externalTrafficPolicy` and `healthCheckNodePort` (only with `Local`).
fn external_of(svc: &KubeService, spec: &ServiceSpec, sp: &ServicePort, ipv4: bool) -> External {
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    let lb = ty == "LoadBalancer";
    let node_port = sp
        .node_port
        .filter(|_| lb || ty == "NodePort")
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0);
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .filter(|_| lb)
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref());
    // Each address goes with the ClusterIP of its family (as kube-proxy's
    // per-family proxiers take them).
    let ips: BTreeSet<IpAddr> = spec
        .external_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .chain(ingress)
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .filter(|ip| ip.is_ipv4() == ipv4)
        .collect();
    let traffic_policy = match spec.external_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let health_check_node_port = spec
        .health_check_node_port
        .filter(|_| traffic_policy == TrafficPolicy::Local && lb)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0);
    External {
        node_port,
        ips: ips.into_iter().collect(),
        traffic_policy,
        health_check_node_port,
    }
}

/// The backends, and each one's node, hints and endpoint zone.
type Found = (
    Vec<Backend>,
    Vec<Option<String>>,
    Vec<Hints>,
    Vec<Option<String>>,
);

/// The backends of one service port, sorted by (IP, port), with their nodes,
/// hints and zones.
fn backends_for(
    slices: &[&EndpointSlice],
    vip: IpAddr,
    port_name: &str,
    protocol: Protocol,
    policy: &ServicePolicy,
    pods: &mut PodBook<'_>,
) -> Found {
    type Seen<'a> = (
        BackendState,
        Option<&'a str>,
        Hints,
        Option<&'a str>,
        Option<(&'a str, &'a str)>,
    );
    let mut found: BTreeMap<(IpAddr, u16), Seen> = BTreeMap::new();
    // The slices of the VIP's family only.
    for slice in slices
        .iter()
        .filter(|s| s.address_type == address_type(vip))
    {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or("") == port_name
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol_name(protocol)
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
        else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let Some(state) = endpoint_state(ep.conditions.as_ref()) else {
                continue;
            };
            let Some(ip) = ep
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .filter(|a| a.is_ipv4() == vip.is_ipv4())
            else {
                continue;
            };
            let node = ep.node_name.as_deref();
            let h = ep.hints.as_ref();
            let hints = Hints {
                nodes: h
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
                zones: h
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
            };
            let zone = ep.zone.as_deref();
            let pod = pod_of(ep, namespace_of(&slice.metadata));
            found
                .entry((ip, port))
                .and_modify(|(s, n, hs, z, p)| {
                    if state == BackendState::Active {
                        *s = BackendState::Active;
                        *n = node;
                        *hs = hints.clone();
                        *z = zone;
                        *p = pod;
                    }
                })
                .or_insert((state, node, hints, zone, pod));
        }
    }
    let mut out = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((ip, port), (state, node, hints, zone, pod)) in found {
        let own = pod.map_or_else(PodPolicy::default, |(ns, n)| pods.policy(ns, n));
        out.0.push(Backend {
            // The Pod's own limit wins over the Service's max_per_backend
            // (the agent applies the backend's first, as the YAML's `max`).
            max: own.max,
            // Set per node by the locality resolution.
            spill_weight: None,
            node: node.map(str::to_string),
            ip,
            port,
            weight: policy.backend_weight(ip, own.weight),
            state,
        });
        out.1.push(node.map(str::to_string));
        out.2.push(hints);
        out.3.push(zone.map(str::to_string));
    }
    out
}

/// The Pod an endpoint's `targetRef` names: kind `Pod`, in the slice's own
/// namespace (a reference to another namespace's Pod is not followed: a
/// Service's weights come from its own namespace only).
fn pod_of<'a>(ep: &'a Endpoint, slice_namespace: &'a str) -> Option<(&'a str, &'a str)> {
    let r = ep.target_ref.as_ref()?;
    if r.kind.as_deref() != Some("Pod") {
        return None;
    }
    let name = r.name.as_deref().filter(|n| !n.is_empty())?;
    match r.namespace.as_deref() {
        None | Some("") => Some((slice_namespace, name)),
        Some(ns) if ns == slice_namespace => Some((ns, name)),
        Some(_) => None,
    }
}

/// The nodes' locations, and each zone's region.
struct Topo<'a> {
    nodes: &'a NodeLocations,
    zone_region: BTreeMap<&'a str, &'a str>,
}

/// Each backend's (zone, region): the endpoint's `zone`, else its node's
/// zone label; its node's region label, else the region of a node in its
/// zone (the first by name).
fn place_backends(
    backend_nodes: &[Option<String>],
    zones: Vec<Option<String>>,
    topo: &Topo<'_>,
) -> Vec<(Option<String>, Option<String>)> {
    let loc = |n: &Option<String>| n.as_ref().and_then(|n| topo.nodes.get(n));
    backend_nodes
        .iter()
        .zip(zones)
        .map(|(n, zone)| {
            let zone = zone.or_else(|| loc(n).and_then(|l| l.zone.clone()));
            let region = loc(n).and_then(|l| l.region.clone()).or_else(|| {
                let z = zone.as_deref()?;
                topo.zone_region.get(z).map(|r| r.to_string())
            });
            (zone, region)
        })
        .collect()
}

/// Makes `service.maglev_table_size` hold the backends that take new flows
/// (see the module docs and `lb_api::validate`). Returns what was wrong and
/// what was done instead, if anything.
fn choose_table_size(service: &mut Service, port: &str) -> Option<(ProblemKind, String)> {
    let live = service.live_backends();
    let mut too_small = None;
    if let Some(size) = service.maglev_table_size {
        if validate::maglev_fits(size, live).is_ok() {
            return None;
        }
        service.maglev_table_size = None;
        too_small = Some(ProblemKind::MaglevTableTooSmall {
            port: port.to_string(),
            size,
            backends: live,
        });
    }
    match validate::maglev_size_for(live) {
        Some(DEFAULT_MAGLEV_M) => {
            let fallback = format!("using the default maglev table size ({DEFAULT_MAGLEV_M})");
            too_small.map(|kind| (kind, fallback))
        }
        Some(m) => {
            service.maglev_table_size = Some(m);
            too_small.map(|kind| (kind, format!("using maglev table size {m}")))
        }
        None => {
            let kind = ProblemKind::TooManyBackendsForMaglev {
                port: port.to_string(),
                algorithm: service.algorithm,
                backends: live,
            };
            service.algorithm = Algorithm::Random;
            Some((kind, "using random".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use k8s_openapi::api::core::v1::{ClientIPConfig, ServicePort, SessionAffinityConfig};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    /// The last octet of an IPv4 address (tests use IPv4 only).
    fn last_octet(ip: std::net::IpAddr) -> u8 {
        match ip {
            std::net::IpAddr::V4(v4) => v4.octets()[3],
            std::net::IpAddr::V6(v6) => v6.octets()[15],
        }
    }

    const NS: &str = "shop";

    fn pairs(kv: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        (!kv.is_empty()).then(|| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
    }

    fn port(name: Option<&str>, number: i32, target: IntOrString) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            port: number,
            protocol: Some("TCP".into()),
            target_port: Some(target),
            ..Default::default()
        }
    }

    fn named(name: &str, number: i32, target: &str) -> ServicePort {
        port(Some(name), number, IntOrString::String(target.into()))
    }

    fn service(name: &str, ip: &str, ports: Vec<ServicePort>) -> KubeService {
        KubeService {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(NS.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                cluster_ip: Some(ip.into()),
                cluster_ips: Some(vec![ip.into()]),
                ports: Some(ports),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn with(mut svc: KubeService, f: impl FnOnce(&mut ServiceSpec)) -> KubeService {
        f(svc.spec.as_mut().unwrap());
        svc
    }

    fn annotated(mut svc: KubeService, kv: &[(&str, &str)]) -> KubeService {
        svc.metadata.annotations = pairs(kv);
        svc
    }

    fn slice(
        name: &str,
        service: &str,
        ports: &[(Option<&str>, i32)],
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(NS.into()),
                labels: pairs(&[(SERVICE_NAME_LABEL, service)]),
                ..Default::default()
            },
            ports: Some(
                ports
                    .iter()
                    .map(|&(n, p)| EndpointPort {
                        name: n.map(str::to_string),
                        port: Some(p),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: Some(endpoints),
        }
    }

    fn endpoint(
        ip: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..Default::default()
        }
    }

    fn ready(ip: &str) -> Endpoint {
        endpoint(ip, Some(true), Some(true), Some(false))
    }

    fn terminating(ip: &str) -> Endpoint {
        endpoint(ip, Some(false), Some(true), Some(true))
    }

    fn on(mut ep: Endpoint, node: &str) -> Endpoint {
        ep.node_name = Some(node.into());
        ep
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn backend(addr: &str, port: u16, state: BackendState) -> Backend {
        Backend {
            max: None,
            spill_weight: None,
            node: None,
            ip: ip(addr),
            port,
            weight: 1,
            state,
        }
    }

    fn active(addr: &str, port: u16) -> Backend {
        backend(addr, port, BackendState::Active)
    }

    fn translate(services: &[KubeService], slices: &[EndpointSlice]) -> Translation {
        node_state(services, slices, "node-a")
    }

    fn only(t: &Translation) -> &Service {
        assert_eq!(t.state.services.len(), 1, "{:#?}", t.state);
        &t.state.services[0]
    }

    fn names(t: &Translation) -> Vec<&str> {
        t.state.services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn named_target_port_resolves_through_the_slice_port_name() {
        let svc = service(
            "web",
            "10.96.0.10",
            vec![
                named("grpc", 80, "grpc-port"),
                named("metrics", 9100, "9100"),
            ],
        );
        // The pods disagree on the named port's number, so the EndpointSlice
        // controller put them in two slices.
        let slices = [
            slice(
                "web-a",
                "web",
                &[(Some("grpc"), 50051), (Some("metrics"), 9100)],
                vec![ready("10.244.1.5")],
            ),
            slice(
                "web-b",
                "web",
                &[(Some("grpc"), 8443), (Some("metrics"), 9100)],
                vec![ready("10.244.2.7")],
            ),
        ];
        let t = translate(&[svc], &slices);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let grpc = Service::new(
            "shop/web:grpc",
            ip("10.96.0.10"),
            80,
            Protocol::Tcp,
            Algorithm::Random,
            vec![active("10.244.1.5", 50051), active("10.244.2.7", 8443)],
        );
        let metrics = Service::new(
            "shop/web:metrics",
            ip("10.96.0.10"),
            9100,
            Protocol::Tcp,
            Algorithm::Random,
            vec![active("10.244.1.5", 9100), active("10.244.2.7", 9100)],
        );
        assert_eq!(t.state.services, [grpc, metrics]);
    }

    #[test]
    fn unnamed_port_is_named_by_number_and_matches_the_unnamed_slice_port() {
        let svc = service(
            "api",
            "10.96.0.11",
            vec![port(None, 80, IntOrString::Int(8080))],
        );
        let slices = [
            slice("api-a", "api", &[(None, 8080)], vec![ready("10.244.1.1")]),
            // An empty name is the same as no name.
            slice(
                "api-b",
                "api",
                &[(Some(""), 8080)],
                vec![ready("10.244.1.2")],
            ),
            // A named slice port does not serve an unnamed service port.
            slice(
                "api-c",
                "api",
                &[(Some("http"), 9999)],
                vec![ready("10.244.1.3")],
            ),
        ];
        let t = translate(&[svc], &slices);
        let s = only(&t);
        assert_eq!(s.name, "shop/api:80");
        assert_eq!(s.port, 80);
        assert_eq!(
            s.backends,
            [active("10.244.1.1", 8080), active("10.244.1.2", 8080)]
        );
    }

    #[test]
    fn endpoint_conditions() {
        use BackendState::{Active, Terminating};
        let c = |ready, serving, terminating| EndpointConditions {
            ready,
            serving,
            terminating,
        };
        let cases = [
            (None, Some(Active)),
            (Some(c(None, None, None)), Some(Active)),
            (Some(c(Some(true), Some(true), None)), Some(Active)),
            // publishNotReadyAddresses: ready although terminating.
            (Some(c(Some(true), Some(true), Some(true))), Some(Active)),
            (
                Some(c(Some(false), Some(true), Some(true))),
                Some(Terminating),
            ),
            (Some(c(Some(false), Some(false), Some(true))), None),
            (Some(c(Some(false), None, Some(true))), None),
            (Some(c(Some(false), Some(true), None)), None),
            (Some(c(Some(false), Some(true), Some(false))), None),
            (Some(c(Some(false), None, None)), None),
        ];
        for (conditions, want) in cases {
            assert_eq!(endpoint_state(conditions.as_ref()), want, "{conditions:?}");
        }

        let svc = service("db", "10.96.0.12", vec![named("sql", 5432, "sql")]);
        let mut no_conditions = ready("10.244.0.1");
        no_conditions.conditions = None;
        let slices = [slice(
            "db-a",
            "db",
            &[(Some("sql"), 5432)],
            vec![
                no_conditions,
                endpoint("10.244.0.2", None, None, None),
                terminating("10.244.0.3"),
                endpoint("10.244.0.4", Some(false), Some(false), Some(true)),
                endpoint("10.244.0.5", Some(false), Some(false), Some(false)),
                endpoint("10.244.0.6", Some(false), Some(true), None),
            ],
        )];
        let t = translate(&[svc], &slices);
        assert_eq!(
            only(&t).backends,
            [
                active("10.244.0.1", 5432),
                active("10.244.0.2", 5432),
                backend("10.244.0.3", 5432, Terminating),
            ]
        );
    }

    #[test]
    fn the_same_backend_in_two_slices_is_one_and_active_wins() {
        let svc = service("db", "10.96.0.12", vec![named("sql", 5432, "sql")]);
        let old = slice(
            "db-old",
            "db",
            &[(Some("sql"), 5432)],
            vec![terminating("10.244.0.1"), terminating("10.244.0.2")],
        );
        let new = slice(
            "db-new",
            "db",
            &[(Some("sql"), 5432)],
            vec![ready("10.244.0.1")],
        );
        let want = [
            active("10.244.0.1", 5432),
            backend("10.244.0.2", 5432, BackendState::Terminating),
        ];
        for slices in [[old.clone(), new.clone()], [new, old]] {
            let t = translate(std::slice::from_ref(&svc), &slices);
            assert_eq!(only(&t).backends, want);
        }
    }

    #[test]
    fn headless_external_name_and_unallocated_services_are_skipped() {
        let headless = service("headless", "None", vec![named("http", 80, "http")]);
        let external = with(service("ext", "", vec![]), |s| {
            s.type_ = Some("ExternalName".into());
            s.external_name = Some("db.example.com".into());
            s.cluster_ip = None;
            s.cluster_ips = None;
        });
        let pending = with(
            service("pending", "", vec![named("http", 80, "http")]),
            |s| {
                s.cluster_ips = None;
            },
        );
        let no_spec = KubeService {
            spec: None,
            ..service("no-spec", "10.96.0.1", vec![])
        };
        let slices = [slice(
            "headless-a",
            "headless",
            &[(Some("http"), 80)],
            vec![ready("10.244.0.1")],
        )];
        let t = translate(&[headless, external, pending, no_spec], &slices);
        assert_eq!(t, Translation::default());
    }

    #[test]
    fn dual_stack_is_one_service_per_cluster_ip_with_its_familys_slices() {
        // IPv6 primary (ipFamilies [IPv6, IPv4]); both families' slices, and
        // an FQDN slice that is ignored.
        let dual = with(
            service(
                "dual",
                "fd00:10:96::a",
                vec![named("http", 80, "http"), named("dns", 53, "dns")],
            ),
            |s| {
                s.cluster_ips = Some(vec!["fd00:10:96::a".into(), "10.96.0.20".into()]);
                s.ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
                s.ip_family_policy = Some("RequireDualStack".into());
            },
        );
        let ports = [(Some("http"), 8080), (Some("dns"), 5353)];
        let mut v6_slice = slice(
            "dual-v6",
            "dual",
            &ports,
            vec![ready("fd00:10:244::5"), terminating("fd00:10:244::6")],
        );
        v6_slice.address_type = "IPv6".into();
        let v4_slice = slice("dual-v4", "dual", &ports, vec![ready("10.244.0.5")]);
        let mut fqdn = slice("dual-fqdn", "dual", &ports, vec![ready("pod.example")]);
        fqdn.address_type = "FQDN".into();
        let t = translate(&[dual], &[v6_slice, v4_slice, fqdn]);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        // Sorted by (VIP, port, protocol): IPv4 addresses sort first.
        let got: Vec<(&str, IpAddr, u16, &[Backend])> = t
            .state
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.vip, s.port, s.backends.as_slice()))
            .collect();
        let v4 = [active("10.244.0.5", 8080)];
        let v4_dns = [active("10.244.0.5", 5353)];
        let v6 = [
            active("fd00:10:244::5", 8080),
            backend("fd00:10:244::6", 8080, BackendState::Terminating),
        ];
        let v6_dns = [
            active("fd00:10:244::5", 5353),
            backend("fd00:10:244::6", 5353, BackendState::Terminating),
        ];
        assert_eq!(
            got,
            [
                ("shop/dual:dns@ipv4", ip("10.96.0.20"), 53, &v4_dns[..]),
                ("shop/dual:http@ipv4", ip("10.96.0.20"), 80, &v4[..]),
                ("shop/dual:dns", ip("fd00:10:96::a"), 53, &v6_dns[..]),
                ("shop/dual:http", ip("fd00:10:96::a"), 80, &v6[..]),
            ]
        );
        for s in &t.state.services {
            assert_eq!(s.validate(), Ok(()), "{}", s.name);
        }

        // IPv4 primary: the IPv4 services keep the plain names.
        let dual4 = with(
            service("dual4", "10.96.0.30", vec![named("http", 80, "http")]),
            |s| {
                s.cluster_ips = Some(vec!["10.96.0.30".into(), "fd00:10:96::30".into()]);
                s.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
            },
        );
        let t = translate(&[dual4], &[]);
        let names: Vec<(&str, IpAddr)> = t
            .state
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.vip))
            .collect();
        assert_eq!(
            names,
            [
                ("shop/dual4:http", ip("10.96.0.30")),
                ("shop/dual4:http@ipv6", ip("fd00:10:96::30")),
            ]
        );

        // Only spec.clusterIP (an old object without clusterIPs).
        let old = with(
            service("old", "10.96.0.21", vec![named("http", 80, "http")]),
            |s| {
                s.cluster_ips = None;
            },
        );
        assert_eq!(only(&translate(&[old], &[])).vip, ip("10.96.0.21"));

        // IPv6-only: balanced on its IPv6 ClusterIP with the IPv6 slice's
        // backends; an IPv4 slice (inconsistent input) gives it none.
        let v6_only = service("v6", "fd00:10:96::b", vec![named("http", 80, "http")]);
        let mut s6 = slice(
            "v6-a",
            "v6",
            &[(Some("http"), 8080)],
            vec![ready("fd00:10:244::7")],
        );
        s6.address_type = "IPv6".into();
        let s4 = slice(
            "v6-b",
            "v6",
            &[(Some("http"), 8080)],
            vec![ready("10.244.0.7")],
        );
        let t = translate(&[v6_only], &[s6, s4]);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let s = only(&t);
        assert_eq!(
            (s.name.as_str(), s.vip),
            ("shop/v6:http", ip("fd00:10:96::b"))
        );
        assert_eq!(s.backends, [active("fd00:10:244::7", 8080)]);

        // A ClusterIP that is not an address is a problem; the others stay.
        let odd = with(
            service("odd", "10.96.0.40", vec![named("http", 80, "http")]),
            |s| {
                s.cluster_ips = Some(vec!["10.96.0.40".into(), "fd00::zz".into()]);
            },
        );
        let t = translate(&[odd], &[]);
        assert_eq!(only(&t).vip, ip("10.96.0.40"));
        assert_eq!(t.problems.len(), 1);
        assert_eq!(t.problems[0].reason(), "InvalidClusterIP");
        assert_eq!(
            t.problems[0].to_string(),
            "ClusterIP \"fd00::zz\" is not an IP address; this ClusterIP is not balanced by rpclb"
        );
    }

    fn client_ip(svc: KubeService, timeout: Option<i32>) -> KubeService {
        with(svc, |s| {
            s.session_affinity = Some("ClientIP".into());
            s.session_affinity_config = timeout.map(|t| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(t),
                }),
            });
        })
    }

    fn hinted(mut ep: Endpoint, nodes: &[&str], zones: &[&str]) -> Endpoint {
        use k8s_openapi::api::discovery::v1::{EndpointHints, ForNode, ForZone};
        ep.hints = Some(EndpointHints {
            for_nodes: (!nodes.is_empty()).then(|| {
                nodes
                    .iter()
                    .map(|n| ForNode {
                        name: n.to_string(),
                    })
                    .collect()
            }),
            for_zones: (!zones.is_empty()).then(|| {
                zones
                    .iter()
                    .map(|z| ForZone {
                        name: z.to_string(),
                    })
                    .collect()
            }),
        });
        ep
    }

    /// (last octet, weight) of the first service's backends.
    fn weights(st: &DesiredState) -> Vec<(u8, u32)> {
        st.services[0]
            .backends
            .iter()
            .map(|b| (last_octet(b.ip), b.weight))
            .collect()
    }

    #[test]
    fn topology_hints_as_kube_proxy() {
        let svc = || service("web", "10.96.0.60", vec![named("http", 80, "http")]);
        let t = |eps: Vec<Endpoint>| {
            ClusterState::build(
                &[svc()],
                &[slice("web-x", "web", &[(Some("http"), 8080)], eps)],
            )
        };
        // PreferSameNode: node and zone hints on every endpoint.
        let c = t(vec![
            hinted(on(ready("10.244.1.1"), "node-a"), &["node-a"], &["z1"]),
            hinted(on(ready("10.244.2.1"), "node-b"), &["node-b"], &["z1"]),
            hinted(on(ready("10.244.3.1"), "node-c"), &["node-c"], &["z2"]),
        ]);
        assert_eq!(weights(&c.node_state("node-a")), [(1, 1), (1, 0), (1, 0)]);
        assert_eq!(weights(&c.node_state("node-b")), [(1, 0), (1, 1), (1, 0)]);
        // No endpoint for node-d: its zone's, then all.
        assert_eq!(
            weights(&c.node_state_in_zone("node-d", Some("z1"))),
            [(1, 1), (1, 1), (1, 0)]
        );
        assert_eq!(
            weights(&c.node_state_in_zone("node-d", Some("z9"))),
            [(1, 1), (1, 1), (1, 1)]
        );
        assert_eq!(weights(&c.default_state()), [(1, 1), (1, 1), (1, 1)]);
        assert_eq!(
            c.local_nodes().into_iter().collect::<Vec<_>>(),
            ["node-a", "node-b", "node-c"]
        );

        // PreferSameZone: zone hints only; one ready endpoint without hints
        // turns them off; a terminating one does not count.
        let zoned = |extra: Option<Endpoint>| {
            let mut eps = vec![
                hinted(ready("10.244.1.2"), &[], &["z1"]),
                hinted(ready("10.244.2.2"), &[], &["z2"]),
            ];
            eps.extend(extra);
            t(eps)
        };
        let c = zoned(None);
        assert_eq!(
            weights(&c.node_state_in_zone("n", Some("z2"))),
            [(2, 0), (2, 1)]
        );
        assert_eq!(
            weights(&c.node_state("n")),
            [(2, 1), (2, 1)],
            "no zone known"
        );
        let c = zoned(Some(ready("10.244.3.2")));
        assert_eq!(
            weights(&c.node_state_in_zone("n", Some("z2"))),
            [(2, 1), (2, 1), (2, 1)]
        );
        let c = zoned(Some(terminating("10.244.3.2")));
        assert_eq!(
            weights(&c.node_state_in_zone("n", Some("z2"))),
            [(2, 0), (2, 1), (2, 0)]
        );
    }

    /// Node locations: a1, a2 in zone za; b1 in zb (both region r1); c1 in
    /// zc, region r2.
    fn locations() -> NodeLocations {
        let loc = |z: &str, r: &str| NodeLocation {
            zone: Some(z.into()),
            region: Some(r.into()),
        };
        [
            ("a1", loc("za", "r1")),
            ("a2", loc("za", "r1")),
            ("b1", loc("zb", "r1")),
            ("c1", loc("zc", "r2")),
        ]
        .into_iter()
        .map(|(n, l)| (n.to_string(), l))
        .collect()
    }

    /// One endpoint per node of `on`, 10.244.0.1, .2, ...
    fn spread(nodes: &[&str]) -> Vec<Endpoint> {
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| on(ready(&format!("10.244.0.{}", i + 1)), n))
            .collect()
    }

    fn web_slice(eps: Vec<Endpoint>) -> EndpointSlice {
        slice("web-x", "web", &[(Some("http"), 8080)], eps)
    }

    fn web() -> KubeService {
        service("web", "10.96.0.60", vec![named("http", 80, "http")])
    }

    /// The weights of the first service's backends, in backend order.
    fn w(st: &DesiredState) -> Vec<u32> {
        st.services[0].backends.iter().map(|b| b.weight).collect()
    }

    #[test]
    fn node_zone_labels_feed_zone_hints() {
        // Zone hints only (PreferSameZone as an older EndpointSlice
        // controller writes them, trafficDistribution not set here).
        let eps = vec![
            hinted(on(ready("10.244.0.1"), "a1"), &[], &["za"]),
            hinted(on(ready("10.244.0.2"), "b1"), &[], &["zb"]),
        ];
        let c = ClusterState::build_with_nodes(&[web()], &[web_slice(eps)], locations());
        // The node's zone comes from its label.
        assert_eq!(w(&c.node_state("a2")), [1, 0]);
        assert_eq!(w(&c.node_state("b1")), [0, 1]);
        // zc has no endpoint; an unknown node has no zone: all.
        assert_eq!(w(&c.node_state("c1")), [1, 1]);
        assert_eq!(w(&c.node_state("x9")), [1, 1]);
        assert!(c.location_dependent());
        assert_eq!(c.location_state(&locations()["a1"]), c.node_state("a2"));
        // Without labels, as before: no zone known.
        let c = ClusterState::build(
            &[web()],
            &[web_slice(vec![
                hinted(on(ready("10.244.0.1"), "a1"), &[], &["za"]),
                hinted(on(ready("10.244.0.2"), "b1"), &[], &["zb"]),
            ])],
        );
        assert_eq!(w(&c.node_state("a2")), [1, 1]);
    }

    #[test]
    fn locality_annotation_tiers_and_spill_over() {
        let four = ["a1", "a2", "b1", "c1"];
        let c = |kv: &[(&str, &str)]| {
            let t = ClusterState::build_with_nodes(
                &[annotated(web(), kv)],
                &[web_slice(spread(&four))],
                locations(),
            );
            assert!(t.problems().is_empty(), "{:?}", t.problems());
            t
        };
        let all = c(&[(annotations::LOCALITY, "node, zone, region")]);
        assert_eq!(w(&all.node_state("a1")), [1, 0, 0, 0]);
        assert_eq!(w(&all.node_state("b1")), [0, 0, 1, 0]);
        // No backend on x9, which has no labels: anywhere.
        assert_eq!(w(&all.node_state("x9")), [1, 1, 1, 1]);
        // The nodes that run a backend have their own states.
        assert_eq!(
            all.local_nodes().into_iter().collect::<Vec<_>>(),
            ["a1", "a2", "b1", "c1"]
        );
        // The resolved state carries no policy (agents get weights).
        assert_eq!(all.node_state("a1").services[0].locality, None);

        // gRPC mode with spill_outstanding: the drained backends keep their
        // weights as spill weights, and the resolved state keeps the policy.
        let spill = c(&[
            (annotations::MODE, "grpc"),
            (annotations::LOCALITY, "zone"),
            (annotations::LOCALITY_SPILL_OUTSTANDING, "50"),
        ]);
        let st = spill.node_state("a1");
        assert_eq!(w(&st), [1, 1, 0, 0]);
        let sw: Vec<Option<u32>> = st.services[0]
            .backends
            .iter()
            .map(|b| b.spill_weight)
            .collect();
        assert_eq!(sw, [None, None, Some(1), Some(1)]);
        let l = st.services[0].locality.as_ref().expect("kept");
        assert_eq!(l.spill_outstanding, Some(50));
        assert_eq!(l.tiers, [LocalityTier::Zone]);
        assert!(st.services[0].validate().is_ok());

        // Spill-over: fewer than 2 on the node, then in the zone.
        let two = c(&[
            (annotations::LOCALITY, "node,zone,region"),
            (annotations::LOCALITY_MIN_BACKENDS, "2"),
        ]);
        assert_eq!(w(&two.node_state("a1")), [1, 1, 0, 0]);
        // b1's zone has 1: region r1 has 3.
        assert_eq!(w(&two.node_state("b1")), [1, 1, 1, 0]);
        // c1's region r2 has 1: anywhere.
        assert_eq!(w(&two.node_state("c1")), [1, 1, 1, 1]);
        let loc = NodeLocation {
            zone: Some("za".into()),
            region: Some("r1".into()),
        };
        assert_eq!(w(&two.location_state(&loc)), [1, 1, 0, 0]);

        // Zone only, min 2: a node of zb spills over to all.
        let zone = c(&[
            (annotations::LOCALITY, "zone"),
            (annotations::LOCALITY_MIN_BACKENDS, "2"),
        ]);
        assert_eq!(w(&zone.node_state("a1")), [1, 1, 0, 0]);
        assert_eq!(w(&zone.node_state("b1")), [1, 1, 1, 1]);
        // No node tier: no node has a state of its own for it.
        assert!(zone.local_nodes().is_empty());
        // A backend that stops being ready drops the zone below 2.
        let mut eps = spread(&four);
        eps[1] = on(terminating("10.244.0.2"), "a2");
        let t = ClusterState::build_with_nodes(
            &[annotated(
                web(),
                &[
                    (annotations::LOCALITY, "zone"),
                    (annotations::LOCALITY_MIN_BACKENDS, "2"),
                ],
            )],
            &[web_slice(eps)],
            locations(),
        );
        assert_eq!(w(&t.node_state("a1")), [1, 1, 1, 1]);
    }

    #[test]
    fn traffic_distribution_is_a_locality_policy() {
        let four = ["a1", "a2", "b1", "c1"];
        let td = |v: &str| with(web(), |s| s.traffic_distribution = Some(v.into()));
        let c = |svc: KubeService, eps: Vec<Endpoint>| {
            ClusterState::build_with_nodes(&[svc], &[web_slice(eps)], locations())
        };
        // PreferSameZone (and PreferClose): this zone's, without hints.
        for v in ["PreferSameZone", "PreferClose"] {
            let z = c(td(v), spread(&four));
            assert_eq!(w(&z.node_state("a1")), [1, 1, 0, 0], "{v}");
            assert_eq!(w(&z.node_state("c1")), [0, 0, 0, 1], "{v}");
            assert_eq!(w(&z.node_state("x9")), [1, 1, 1, 1], "{v}: no zone");
        }
        // PreferSameNode: this node's, else this zone's, else all.
        let n = c(td("PreferSameNode"), spread(&["a1", "b1", "c1"]));
        assert_eq!(w(&n.node_state("a1")), [1, 0, 0]);
        assert_eq!(w(&n.node_state("a2")), [1, 0, 0], "a2: its zone");
        let loc = |z: &str| NodeLocation {
            zone: Some(z.into()),
            region: None,
        };
        assert_eq!(w(&n.location_state(&loc("zq"))), [1, 1, 1]);
        // The endpoint's own zone counts when its node is unknown.
        let mut eps = spread(&["a1", "b1"]);
        eps[1].node_name = None;
        eps[1].zone = Some("zb".into());
        let z = c(td("PreferSameZone"), eps);
        assert_eq!(w(&z.node_state("b1")), [0, 1]);
        // The annotation wins over trafficDistribution.
        let a = c(
            annotated(td("PreferSameNode"), &[(annotations::LOCALITY, "region")]),
            spread(&four),
        );
        assert_eq!(w(&a.node_state("a1")), [1, 1, 1, 0]);
        // Unknown values: no policy.
        assert!(!c(td("Nearby"), spread(&four)).location_dependent());
    }

    #[test]
    fn max_per_backend_annotation() {
        let eps = spread(&["a1", "b1"]);
        let t = |kv: &[(&str, &str)]| {
            ClusterState::build_with_nodes(
                &[annotated(web(), kv)],
                &[web_slice(eps.clone())],
                locations(),
            )
        };
        // Valid: on the service, in every node's state and on the wire.
        let c = t(&[(annotations::MAX_PER_BACKEND, " 250 ")]);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        for node in ["a1", "b1", "x9"] {
            let st = c.node_state(node);
            assert_eq!(st.services[0].max_per_backend, Some(250), "{node}");
            let back = lb_api::wire::service_from_pb(&(&st.services[0]).into()).unwrap();
            assert_eq!(back.max_per_backend, Some(250));
        }
        // Invalid: one Event each, and no limit.
        for v in ["0", "-1", "+5", "ten", "", "1000001"] {
            let c = t(&[(annotations::MAX_PER_BACKEND, v)]);
            assert_eq!(c.problems().len(), 1, "{v:?}: {:?}", c.problems());
            let p = &c.problems()[0];
            assert_eq!(p.reason(), "InvalidAnnotation", "{v:?}");
            assert_eq!(p.fallback, "no QoS limit", "{v:?}");
            assert_eq!(
                c.node_state("a1").services[0].max_per_backend,
                None,
                "{v:?}"
            );
        }
    }

    /// `rpclb.io/selector`: an example or a NAME reaches every node's state
    /// and the wire; a bad value, a path, or a port the selector cannot
    /// serve (gRPC mode, more than 16 backends, IPv6) is one Event, and the
    /// port is served with its algorithm and no selector.
    #[test]
    fn selector_annotation() {
        let t = |kv: &[(&str, &str)], n: usize| {
            let eps: Vec<Endpoint> = (1..=n)
                .map(|i| on(ready(&format!("10.244.0.{i}")), "a1"))
                .collect();
            ClusterState::build_with_nodes(&[annotated(web(), kv)], &[web_slice(eps)], locations())
        };
        for v in ["example:geo", " geo-eu "] {
            let c = t(&[(annotations::SELECTOR, v)], 16);
            assert!(c.problems().is_empty(), "{v:?}: {:?}", c.problems());
            for node in ["a1", "x9"] {
                let st = c.node_state(node);
                assert_eq!(st.services[0].selector.as_deref(), Some(v.trim()), "{node}");
                let back = lb_api::wire::service_from_pb(&(&st.services[0]).into()).unwrap();
                assert_eq!(back.selector.as_deref(), Some(v.trim()));
            }
        }
        // internalTrafficPolicy: Local (each node its own backends) keeps it too.
        let local = with(annotated(web(), &[(annotations::SELECTOR, "geo")]), |s| {
            s.internal_traffic_policy = Some("Local".into())
        });
        let c = ClusterState::build_with_nodes(
            &[local],
            &[web_slice(spread(&["a1", "b1"]))],
            locations(),
        );
        assert_eq!(
            c.node_state("a1").services[0].selector.as_deref(),
            Some("geo")
        );
        // Bad values and paths: no selector, one Event.
        let fallback = "no selector (the service's algorithm chooses)";
        for (kv, n, needle) in [
            (vec![(annotations::SELECTOR, "/opt/geo.o")], 2, "is a path"),
            (
                vec![(annotations::SELECTOR, "sel/geo.o")],
                2,
                "relative path",
            ),
            (vec![(annotations::SELECTOR, "Geo")], 2, "lowercase"),
            (
                vec![(annotations::SELECTOR, "example:x")],
                2,
                "unknown example",
            ),
            (
                vec![(annotations::SELECTOR, "geo"), (annotations::MODE, "grpc")],
                2,
                "port http: a selector serves the kernel (L4) path, not the gRPC mode",
            ),
            (
                vec![(annotations::SELECTOR, "geo")],
                17,
                "port http: a service with a selector has at most 16 backends",
            ),
        ] {
            let c = t(&kv, n);
            assert_eq!(c.problems().len(), 1, "{kv:?}: {:?}", c.problems());
            let p = &c.problems()[0];
            assert_eq!(p.reason(), "InvalidAnnotation", "{kv:?}");
            assert_eq!(p.fallback, fallback, "{kv:?}");
            assert!(p.to_string().contains(needle), "{kv:?}: {p}");
            assert!(p.to_string().contains("rpclb.io/selector"), "{p}");
            let st = c.node_state("a1");
            assert_eq!(st.services.len(), 1, "{kv:?}: still served");
            assert_eq!(st.services[0].backends.len(), n);
            assert_eq!(st.services[0].selector, None, "{kv:?}");
        }
        // Dual-stack: the IPv4 port has it; the IPv6 one is reported and has not.
        let dual = with(annotated(web(), &[(annotations::SELECTOR, "geo")]), |s| {
            s.cluster_ips = Some(vec!["10.96.0.60".into(), "fd00:10:96::60".into()]);
            s.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        });
        let mut v6 = slice(
            "web-6",
            "web",
            &[(Some("http"), 8080)],
            vec![ready("fd00:10:244::5")],
        );
        v6.address_type = "IPv6".into();
        let c =
            ClusterState::build_with_nodes(&[dual], &[web_slice(spread(&["a1"])), v6], locations());
        assert_eq!(c.problems().len(), 1, "{:?}", c.problems());
        assert!(
            c.problems()[0]
                .to_string()
                .contains("port http@ipv6: a selector serves IPv4 services only"),
            "{}",
            c.problems()[0]
        );
        let st = c.node_state("a1");
        let by_family: Vec<(bool, Option<&str>)> = st
            .services
            .iter()
            .map(|s| (s.vip.is_ipv4(), s.selector.as_deref()))
            .collect();
        assert_eq!(by_family, [(true, Some("geo")), (false, None)]);
    }

    #[test]
    fn locality_and_header_annotations_bad_values_are_one_problem_each() {
        let eps = spread(&["a1", "b1"]);
        let t = |kv: &[(&str, &str)]| {
            ClusterState::build_with_nodes(
                &[annotated(web(), kv)],
                &[web_slice(eps.clone())],
                locations(),
            )
        };
        for (kv, fallback) in [
            (
                vec![(annotations::LOCALITY, "zone,node")],
                "no locality policy (trafficDistribution, if set, still applies)",
            ),
            (
                vec![(annotations::LOCALITY, "rack")],
                "no locality policy (trafficDistribution, if set, still applies)",
            ),
            (
                vec![(annotations::LOCALITY_MIN_BACKENDS, "2")],
                "using the default min backends (1)",
            ),
            (
                vec![
                    (annotations::LOCALITY, "zone"),
                    (annotations::LOCALITY_MIN_BACKENDS, "0"),
                ],
                "using the default min backends (1)",
            ),
            (
                vec![(annotations::LOCALITY_SPILL_OUTSTANDING, "50")],
                "no spill-over on outstanding calls",
            ),
            (
                vec![
                    (annotations::LOCALITY, "zone"),
                    (annotations::LOCALITY_SPILL_OUTSTANDING, "50"),
                ],
                "no spill-over on outstanding calls",
            ),
            (
                vec![
                    (annotations::MODE, "grpc"),
                    (annotations::LOCALITY, "zone"),
                    (annotations::LOCALITY_SPILL_OUTSTANDING, "0"),
                ],
                "no spill-over on outstanding calls",
            ),
            (
                vec![
                    (annotations::MODE, "grpc"),
                    (annotations::LOCALITY, "zone"),
                    (annotations::LOCALITY_SPILL_OUTSTANDING, "lots"),
                ],
                "no spill-over on outstanding calls",
            ),
            (
                vec![(annotations::HEADERS, "x-team: pay")],
                "adding no headers from the annotation",
            ),
            (
                vec![
                    (annotations::MODE, "grpc"),
                    (annotations::HEADERS, "x-team: pay\nX-Bad: 1"),
                ],
                "adding no headers from the annotation",
            ),
            (
                vec![
                    (annotations::MODE, "grpc"),
                    (annotations::HEADERS, "x-request-id: 7"),
                ],
                "adding no headers from the annotation",
            ),
            (
                vec![
                    (annotations::MODE, "grpc"),
                    (annotations::HEADERS, "x-a: 1\nx-a: 2"),
                ],
                "adding no headers from the annotation",
            ),
            (
                vec![(annotations::MODE, "grpc"), (annotations::HEADERS, "x-a")],
                "adding no headers from the annotation",
            ),
        ] {
            let c = t(&kv);
            assert_eq!(c.problems().len(), 1, "{kv:?}: {:?}", c.problems());
            let p = &c.problems()[0];
            assert_eq!(p.reason(), "InvalidAnnotation", "{kv:?}");
            assert_eq!(p.fallback, fallback, "{kv:?}");
            // Ignored: no headers, min 1 where the tier stays, no spill.
            let st = c.node_state("a1");
            assert!(
                st.services[0]
                    .backends
                    .iter()
                    .all(|b| b.spill_weight.is_none()),
                "{kv:?}"
            );
            assert!(
                st.services[0]
                    .grpc
                    .as_ref()
                    .is_none_or(|g| g.add_headers.is_empty()),
                "{kv:?}"
            );
        }
        let c = t(&[
            (annotations::LOCALITY, "zone"),
            (annotations::LOCALITY_MIN_BACKENDS, "0"),
        ]);
        assert_eq!(w(&c.node_state("a1")), [1, 0], "the tier stays, with min 1");
        assert!(
            t(&[(annotations::LOCALITY, "rack")]).problems()[0]
                .to_string()
                .contains("unknown locality tier \"rack\"")
        );
    }

    #[test]
    fn headers_annotation_reaches_the_grpc_policy() {
        let svc = annotated(
            web(),
            &[
                (annotations::MODE, "grpc"),
                (
                    annotations::HEADERS,
                    "x-team: payments\n\n  x-env :  prod eu  \n",
                ),
            ],
        );
        let t = translate(&[svc], &[web_slice(spread(&["a1"]))]);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let g = only(&t).grpc.as_ref().unwrap();
        assert_eq!(
            g.add_headers,
            [
                ("x-team".to_string(), "payments".to_string()),
                ("x-env".to_string(), "prod eu".to_string())
            ]
        );
        // What the agents get over the wire has them too.
        let n = lb_api::wire::NodeState {
            state: t.state.clone(),
            timeouts: Default::default(),
        };
        let msg = lb_api::wire::snapshot(1, &n);
        let Some(lb_api::wire::pb::controller_message::Body::Snapshot(snap)) = msg.body else {
            panic!("not a snapshot: {msg:?}");
        };
        let back = lb_api::wire::service_from_pb(&snap.services[0]).unwrap();
        assert_eq!(back.grpc.unwrap().add_headers, g.add_headers);
    }

    #[test]
    fn node_ports_external_ips_and_load_balancer_ingress() {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        let with_np = |p: &str, np: i32| ServicePort {
            node_port: Some(np),
            ..named(p, 80, p)
        };
        let ports = || {
            vec![with_np("http", 30080), {
                let mut u = with_np("dns", 30053);
                u.port = 53;
                u.protocol = Some("UDP".into());
                u
            }]
        };
        let mut lb = with(service("lb", "10.96.0.50", ports()), |s| {
            s.type_ = Some("LoadBalancer".into());
            s.external_ips = Some(vec!["192.168.60.2".into(), "fd00::1".into()]);
            s.external_traffic_policy = Some("Local".into());
            s.health_check_node_port = Some(32000);
        });
        lb.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    LoadBalancerIngress {
                        ip: Some("192.168.60.1".into()),
                        ..Default::default()
                    },
                    LoadBalancerIngress {
                        ip: Some("192.168.60.2".into()),
                        ..Default::default()
                    },
                    LoadBalancerIngress {
                        hostname: Some("lb.example".into()),
                        ..Default::default()
                    },
                ]),
            }),
            ..Default::default()
        });
        let np = with(service("np", "10.96.0.51", ports()), |s| {
            s.type_ = Some("NodePort".into());
            // Only with Local and type LoadBalancer.
            s.health_check_node_port = Some(32001);
        });
        // A ClusterIP Service's nodePort (stale after a type change) is not used.
        let cip = with(service("cip", "10.96.0.52", ports()), |s| {
            s.external_ips = Some(vec!["192.168.60.3".into()]);
        });
        let t = translate(&[lb, np, cip], &[]);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let ext: Vec<(&str, &External)> = t
            .state
            .services
            .iter()
            .map(|s| (s.name.as_str(), &s.external))
            .collect();
        let e = |node_port, ips: &[[u8; 4]], local, hc| External {
            node_port,
            ips: ips
                .iter()
                .map(|o| IpAddr::from(Ipv4Addr::from(*o)))
                .collect(),
            traffic_policy: if local {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            },
            health_check_node_port: hc,
        };
        let lb_ips = [[192, 168, 60, 1], [192, 168, 60, 2]];
        assert_eq!(
            ext,
            vec![
                ("shop/lb:dns", &e(Some(30053), &lb_ips, true, Some(32000))),
                ("shop/lb:http", &e(Some(30080), &lb_ips, true, Some(32000))),
                ("shop/np:dns", &e(Some(30053), &[], false, None)),
                ("shop/np:http", &e(Some(30080), &[], false, None)),
                ("shop/cip:dns", &e(None, &[[192, 168, 60, 3]], false, None)),
                ("shop/cip:http", &e(None, &[[192, 168, 60, 3]], false, None)),
            ]
        );
    }

    /// Each family's service gets the node port and the external and
    /// load-balancer IPs of its own family: a dual-stack LoadBalancer's IPv4
    /// service the IPv4 ones, its IPv6 service the IPv6 ones, both the node
    /// port, the policy and the health-check node port; a single-stack IPv6
    /// Service its IPv6 addresses (an IPv4 one is left out).
    #[test]
    fn front_ends_go_with_the_cluster_ip_of_their_family() {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        let ingress = |ips: &[&str]| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    ips.iter()
                        .map(|ip| LoadBalancerIngress {
                            ip: Some(ip.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        };
        let np = |p: i32| {
            vec![ServicePort {
                node_port: Some(p),
                ..named("http", 80, "http")
            }]
        };
        let mut dual = with(service("dual", "10.96.0.60", np(30080)), |s| {
            s.type_ = Some("LoadBalancer".into());
            s.cluster_ips = Some(vec!["10.96.0.60".into(), "fd00:10:96::60".into()]);
            s.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
            s.ip_family_policy = Some("RequireDualStack".into());
            s.external_ips = Some(vec![
                "fd00:60::2".into(),
                "192.168.60.2".into(),
                "fd00:60::2".into(),
            ]);
            s.external_traffic_policy = Some("Local".into());
            s.health_check_node_port = Some(32000);
        });
        dual.status = Some(ingress(&["192.168.60.1", "fd00:60::1", "nonsense"]));
        // IPv6 only, IPv6 primary: its IPv4 external IP has no ClusterIP to go with.
        let mut v6 = with(service("v6", "fd00:10:96::61", np(30081)), |s| {
            s.type_ = Some("LoadBalancer".into());
            s.ip_families = Some(vec!["IPv6".into()]);
            s.external_ips = Some(vec!["192.168.60.3".into(), "fd00:60::3".into()]);
        });
        v6.status = Some(ingress(&["fd00:60::4"]));
        let t = translate(&[dual, v6], &[]);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let got: Vec<(&str, IpAddr, &External)> = t
            .state
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.vip, &s.external))
            .collect();
        let e = |node_port, ips: &[&str], local, hc| External {
            node_port: Some(node_port),
            ips: ips.iter().map(|s| ip(s)).collect(),
            traffic_policy: if local {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            },
            health_check_node_port: hc,
        };
        assert_eq!(
            got,
            vec![
                (
                    "shop/dual:http",
                    ip("10.96.0.60"),
                    &e(30080, &["192.168.60.1", "192.168.60.2"], true, Some(32000))
                ),
                (
                    "shop/dual:http@ipv6",
                    ip("fd00:10:96::60"),
                    &e(30080, &["fd00:60::1", "fd00:60::2"], true, Some(32000))
                ),
                (
                    "shop/v6:http",
                    ip("fd00:10:96::61"),
                    &e(30081, &["fd00:60::3", "fd00:60::4"], false, None)
                ),
            ]
        );
        // Every one passes the agents' validation and the wire.
        for s in &t.state.services {
            assert_eq!(s.validate(), Ok(()), "{}", s.name);
            let back = lb_api::wire::service_from_pb(&s.into()).unwrap();
            assert_eq!(&back, s);
        }
    }

    #[test]
    fn session_affinity_client_ip() {
        let base = || service("sticky", "10.96.0.30", vec![named("http", 80, "http")]);

        let none = with(base(), |s| s.session_affinity = Some("None".into()));
        let s = only(&translate(&[none], &[])).clone();
        assert_eq!((s.algorithm, s.affinity_timeout), (Algorithm::Random, None));

        let t = translate(&[client_ip(base(), None)], &[]);
        assert!(t.problems.is_empty());
        let s = only(&t);
        assert_eq!(s.algorithm, Algorithm::SourceHash);
        assert_eq!(s.affinity_timeout, Some(Duration::from_secs(10_800)));

        let s = only(&translate(&[client_ip(base(), Some(600))], &[])).clone();
        assert_eq!(s.affinity_timeout, Some(Duration::from_secs(600)));
        assert_eq!(s.algorithm, Algorithm::SourceHash);

        // A valid algorithm annotation wins over source-hash; affinity stays.
        let chosen = annotated(
            client_ip(base(), Some(600)),
            &[(annotations::ALGORITHM, "maglev")],
        );
        let s = only(&translate(&[chosen], &[])).clone();
        assert_eq!(s.algorithm, Algorithm::Maglev);
        assert_eq!(s.affinity_timeout, Some(Duration::from_secs(600)));

        // An invalid one does not: source-hash, and the problem says so.
        let bad = annotated(
            client_ip(base(), None),
            &[(annotations::ALGORITHM, "sticky")],
        );
        let t = translate(&[bad], &[]);
        assert_eq!(only(&t).algorithm, Algorithm::SourceHash);
        assert_eq!(t.problems.len(), 1);
        assert_eq!(
            t.problems[0].fallback,
            "using source-hash (the default with sessionAffinity: ClientIP)"
        );

        // Out of range (the API server rejects it; the default is used).
        for bad in [0, -5, 86_401] {
            let t = translate(&[client_ip(base(), Some(bad))], &[]);
            assert_eq!(only(&t).affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
            assert_eq!(
                t.problems[0].kind,
                ProblemKind::InvalidAffinityTimeout { seconds: bad }
            );
            assert_eq!(t.problems[0].reason(), "InvalidSessionAffinity");
        }
        let t = translate(&[client_ip(base(), Some(86_400))], &[]);
        assert_eq!(only(&t).affinity_timeout, Some(MAX_AFFINITY_TIMEOUT));
        assert!(t.problems.is_empty());
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
        let local = with(
            service("local", "10.96.0.40", vec![named("http", 80, "http")]),
            |s| {
                s.internal_traffic_policy = Some("Local".into());
            },
        );
        let cluster = service("cluster", "10.96.0.41", vec![named("http", 80, "http")]);
        let eps = || {
            vec![
                on(ready("10.244.1.1"), "node-a"),
                on(terminating("10.244.1.2"), "node-a"),
                on(ready("10.244.2.1"), "node-b"),
                ready("10.244.3.1"), // no nodeName
            ]
        };
        let slices = [
            slice("local-x", "local", &[(Some("http"), 8080)], eps()),
            slice("cluster-x", "cluster", &[(Some("http"), 8080)], eps()),
        ];
        let services = [local, cluster];
        let on_node = |b: Backend, n: &str| Backend {
            node: Some(n.into()),
            ..b
        };
        // Each backend carries its node (the agents' externalTrafficPolicy: Local).
        let all = [
            on_node(active("10.244.1.1", 8080), "node-a"),
            on_node(
                backend("10.244.1.2", 8080, BackendState::Terminating),
                "node-a",
            ),
            on_node(active("10.244.2.1", 8080), "node-b"),
            active("10.244.3.1", 8080),
        ];
        let backends_on = |node: &str| -> (Vec<Backend>, Vec<Backend>) {
            let st = node_state(&services, &slices, node).state;
            assert_eq!(st.services[0].name, "shop/local:http");
            (
                st.services[0].backends.clone(),
                st.services[1].backends.clone(),
            )
        };
        assert_eq!(backends_on("node-a"), (all[..2].to_vec(), all.to_vec()));
        assert_eq!(backends_on("node-b"), (vec![all[2].clone()], all.to_vec()));
        // A node without local endpoints keeps the service, with no backends
        // (new connections are refused, as with kube-proxy).
        assert_eq!(backends_on("node-c"), (vec![], all.to_vec()));

        let c = ClusterState::build(&services, &slices);
        assert_eq!(
            c.local_nodes().into_iter().collect::<Vec<_>>(),
            ["node-a", "node-b"]
        );
        assert_eq!(c.default_state(), c.node_state("node-c"));
        assert_eq!(c.default_state(), c.node_state(""));
    }

    #[test]
    fn an_invalid_annotation_is_a_problem_and_the_default_is_used() {
        let svc = annotated(
            service("pay", "10.96.0.50", vec![named("grpc", 443, "grpc")]),
            &[
                (annotations::ALGORITHM, "fastest"),
                (annotations::WEIGHTS, "10.244.0.1=3"),
            ],
        );
        let slices = [slice(
            "pay-a",
            "pay",
            &[(Some("grpc"), 8443)],
            vec![ready("10.244.0.1"), ready("10.244.0.2")],
        )];
        let t = translate(&[svc], &slices);
        let s = only(&t);
        assert_eq!(s.algorithm, Algorithm::Random);
        // The valid annotation still applies.
        assert_eq!(
            s.backends,
            [
                Backend {
                    weight: 3,
                    ..active("10.244.0.1", 8443)
                },
                active("10.244.0.2", 8443)
            ]
        );
        assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
        let p = &t.problems[0];
        assert_eq!(p.subject.to_string(), "shop/pay");
        assert_eq!(p.reason(), "InvalidAnnotation");
        assert!(matches!(&p.kind, ProblemKind::Annotation(e) if e.key == annotations::ALGORITHM));
        assert_eq!(p.fallback, "using the default algorithm (random)");
        assert_eq!(
            p.to_string(),
            "invalid annotation rpclb.io/algorithm=\"fastest\": unknown algorithm \"fastest\" \
             (expected one of: random, round-robin, maglev, source-hash, least-conn); \
             using the default algorithm (random)"
        );

        let bad_weights = annotated(
            service("pay", "10.96.0.50", vec![named("grpc", 443, "grpc")]),
            &[(annotations::WEIGHTS, "10.244.0.1=lots")],
        );
        let t = translate(&[bad_weights], &slices);
        assert!(only(&t).backends.iter().all(|b| b.weight == 1));
        assert_eq!(
            t.problems[0].fallback,
            "ignoring all weights (every backend has weight 1)"
        );
    }

    /// `rpclb.io/health-check*` reach the model on TCP ports (not UDP); an
    /// invalid setting is one problem (one Event) and its default is used.
    #[test]
    fn health_check_annotations_reach_tcp_ports() {
        let mut udp = named("dns", 53, "dns");
        udp.protocol = Some("UDP".into());
        let svc = annotated(
            service("rpc", "10.96.0.61", vec![named("grpc", 50051, "grpc"), udp]),
            &[
                (annotations::HEALTH_CHECK, "grpc"),
                (annotations::HEALTH_CHECK_SERVICE, "shop.Cart"),
                (annotations::HEALTH_CHECK_INTERVAL, "2s"),
                (annotations::HEALTH_CHECK_HEALTHY, "zero"),
            ],
        );
        let t = translate(&[svc], &[]);
        assert_eq!(names(&t), ["shop/rpc:dns", "shop/rpc:grpc"]);
        assert_eq!(t.state.services[0].health_check, None, "UDP: no check");
        assert_eq!(
            t.state.services[1].health_check,
            Some(lb_api::HealthCheck {
                service: "shop.Cart".into(),
                interval: Duration::from_secs(2),
                ..lb_api::HealthCheck::default()
            })
        );
        assert_eq!(
            t.problems
                .iter()
                .map(|p| (p.reason(), p.to_string()))
                .collect::<Vec<_>>(),
            [(
                "InvalidAnnotation",
                "invalid annotation rpclb.io/health-check-healthy-threshold=\"zero\": \"zero\" is not a whole number; using the default healthy threshold (2)"
                    .to_string()
            )]
        );
    }

    #[test]
    fn sctp_ports_are_skipped_with_a_problem() {
        let mut sctp = named("signal", 3868, "signal");
        sctp.protocol = Some("SCTP".into());
        let mut udp = named("dns", 53, "dns");
        udp.protocol = Some("UDP".into());
        let mut no_protocol = named("http", 80, "http");
        no_protocol.protocol = None;
        let svc = service("mixed", "10.96.0.60", vec![sctp, udp, no_protocol]);
        let mut s = slice(
            "mixed-a",
            "mixed",
            &[
                (Some("http"), 8080),
                (Some("dns"), 5353),
                (Some("signal"), 3868),
            ],
            vec![ready("10.244.0.1")],
        );
        let ports = s.ports.as_mut().unwrap();
        ports[1].protocol = Some("UDP".into());
        ports[2].protocol = Some("SCTP".into());
        let t = translate(&[svc], &[s]);
        assert_eq!(names(&t), ["shop/mixed:dns", "shop/mixed:http"]);
        assert_eq!(t.state.services[0].protocol, Protocol::Udp);
        assert_eq!(t.state.services[0].backends, [active("10.244.0.1", 5353)]);
        assert_eq!(t.state.services[1].protocol, Protocol::Tcp);
        assert_eq!(
            t.problems
                .iter()
                .map(|p| (p.reason(), p.to_string()))
                .collect::<Vec<_>>(),
            [(
                "UnsupportedProtocol",
                "port signal: protocol SCTP is not supported; this port is not balanced by rpclb"
                    .to_string()
            )]
        );
    }

    #[test]
    fn slices_must_match_namespace_label_and_protocol() {
        let svc = service("web", "10.96.0.70", vec![named("http", 80, "http")]);
        let mut other_ns = slice(
            "web-x",
            "web",
            &[(Some("http"), 1)],
            vec![ready("10.244.9.1")],
        );
        other_ns.metadata.namespace = Some("elsewhere".into());
        let mut no_label = slice(
            "web-y",
            "web",
            &[(Some("http"), 2)],
            vec![ready("10.244.9.2")],
        );
        no_label.metadata.labels = None;
        let other_service = slice(
            "api-z",
            "api",
            &[(Some("http"), 3)],
            vec![ready("10.244.9.3")],
        );
        let mut udp = slice(
            "web-u",
            "web",
            &[(Some("http"), 4)],
            vec![ready("10.244.9.4")],
        );
        udp.ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
        let mut no_number = slice(
            "web-n",
            "web",
            &[(Some("http"), 5)],
            vec![ready("10.244.9.5")],
        );
        no_number.ports.as_mut().unwrap()[0].port = None;
        let mut bad_address = slice("web-b", "web", &[(Some("http"), 6)], vec![ready("bogus")]);
        bad_address
            .endpoints
            .as_mut()
            .unwrap()
            .push(ready("10.244.9.6"));
        let t = translate(
            &[svc],
            &[
                other_ns,
                no_label,
                other_service,
                udp,
                no_number,
                bad_address,
            ],
        );
        assert_eq!(only(&t).backends, [active("10.244.9.6", 6)]);
    }

    #[test]
    fn maglev_table_size_fits_the_backends() {
        let eps = |n: u32| {
            (0..n)
                .map(|i| ready(&Ipv4Addr::from(0x0af4_0000 + i).to_string()))
                .collect::<Vec<_>>()
        };
        let svc = |kv: &[(&str, &str)]| {
            annotated(
                service("mg", "10.96.0.80", vec![named("grpc", 80, "grpc")]),
                kv,
            )
        };
        let run = |kv: &[(&str, &str)], n: u32| {
            let slices = [slice("mg-a", "mg", &[(Some("grpc"), 9000)], eps(n))];
            translate(&[svc(kv)], &slices)
        };
        let maglev = (annotations::ALGORITHM, "maglev");
        let size = |m: &'static str| (annotations::MAGLEV_TABLE_SIZE, m);

        // 101 holds one backend, not two.
        let t = run(&[maglev, size("101")], 1);
        assert_eq!(only(&t).maglev_table_size, Some(101));
        assert!(t.problems.is_empty());
        let t = run(&[maglev, size("101")], 2);
        assert_eq!(only(&t).maglev_table_size, None);
        assert_eq!(t.problems.len(), 1);
        assert_eq!(t.problems[0].reason(), "InvalidAnnotation");
        assert_eq!(
            t.problems[0].to_string(),
            "port grpc: rpclb.io/maglev-table-size 101 is too small for 2 backends \
             (it must be > 100 x backends); using the default maglev table size (16381)"
        );

        // Terminating and weight-0 backends take no new flows: not counted.
        let mut slices = [slice("mg-a", "mg", &[(Some("grpc"), 9000)], eps(1))];
        slices[0]
            .endpoints
            .as_mut()
            .unwrap()
            .push(terminating("10.244.1.1"));
        let t = translate(&[svc(&[maglev, size("101")])], &slices);
        assert_eq!(only(&t).maglev_table_size, Some(101));

        // The default is too small for 200 backends: the next prime above
        // 20000 is used, with no problem.
        let t = run(&[maglev], 200);
        assert_eq!(only(&t).maglev_table_size, Some(20_011));
        assert!(t.problems.is_empty());
        // ... and also when an annotated size was too small.
        let t = run(&[maglev, size("16381")], 200);
        assert_eq!(only(&t).maglev_table_size, Some(20_011));
        assert_eq!(t.problems[0].fallback, "using maglev table size 20011");
        // Other algorithms keep the annotation and ignore it.
        let t = run(&[size("101")], 5);
        assert_eq!(only(&t).maglev_table_size, Some(101));
        assert!(t.problems.is_empty());
    }

    #[test]
    fn maglev_sizes_beyond_the_data_path_fall_back_to_random() {
        let too_many = (MAX_MAGLEV_TABLE_SIZE / 100) + 1;
        let mut s = Service::new(
            "shop/big:80",
            ip("10.96.0.81"),
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            (0..too_many)
                .map(|i| Backend::new(Ipv4Addr::from(0x0a00_0001 + i), 80))
                .collect(),
        );
        let (kind, fallback) = choose_table_size(&mut s, "80").unwrap();
        assert_eq!(s.algorithm, Algorithm::Random);
        assert_eq!(s.maglev_table_size, None);
        assert_eq!(kind.reason(), "TooManyBackends");
        assert_eq!(fallback, "using random");
        assert_eq!(s.validate(), Ok(()));
    }

    /// A rolling update of a Maglev Service with 200 ready pods and 10
    /// terminating ones: the table is sized for the 200, and an agent takes
    /// the state as the controller sends it (it once refused every update
    /// of every service until the rollout ended).
    #[test]
    fn a_rollout_state_is_taken_by_the_agents() {
        let mut eps: Vec<Endpoint> = (1..=200)
            .map(|i| ready(&Ipv4Addr::from(0x0af4_0000 + i).to_string()))
            .collect();
        eps.extend((1..=10).map(|i| terminating(&format!("10.245.0.{i}"))));
        let svc = annotated(
            service("mg", "10.96.0.80", vec![named("grpc", 80, "grpc")]),
            &[(annotations::ALGORITHM, "maglev")],
        );
        let t = translate(&[svc], &[slice("mg-a", "mg", &[(Some("grpc"), 9000)], eps)]);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert_eq!(only(&t).maglev_table_size, Some(20_011));
        assert_eq!(only(&t).backends.len(), 210);
        let node = lb_api::wire::NodeState {
            state: t.state.clone(),
            timeouts: Default::default(),
        };
        let got =
            lb_api::wire::apply_message(&Default::default(), 0, &lb_api::wire::snapshot(1, &node))
                .unwrap();
        assert_eq!(got.refused, vec![]);
        assert_eq!(got.state, node);
    }

    #[test]
    fn a_port_that_breaks_a_rule_is_not_balanced() {
        let svc = service("bc", "10.96.0.82", vec![named("http", 80, "http")]);
        let t = translate(
            &[svc],
            &[slice(
                "bc-a",
                "bc",
                &[(Some("http"), 8080)],
                vec![ready("10.244.0.1"), ready("255.255.255.255")],
            )],
        );
        assert!(t.state.services.is_empty());
        assert_eq!(t.problems.len(), 1);
        assert_eq!(t.problems[0].reason(), "InvalidService");
        assert_eq!(
            t.problems[0].to_string(),
            "port http: backends[1].ip: 255.255.255.255 is not a unicast address; this port is not balanced"
        );
    }

    #[test]
    fn output_is_sorted_and_independent_of_input_order() {
        let svcs = vec![
            service(
                "b",
                "10.96.0.2",
                vec![named("x", 90, "x"), named("y", 80, "y")],
            ),
            service("a", "10.96.0.9", vec![named("x", 80, "x")]),
            annotated(
                service("c", "10.96.0.1", vec![named("x", 80, "x")]),
                &[(annotations::ALGORITHM, "nope"), ("rpclb.io/typo", "1")],
            ),
            service("d", "fd00::zz", vec![]),
        ];
        let mut udp = named("x", 80, "x");
        udp.protocol = Some("UDP".into());
        let svcs = [svcs, vec![service("e", "10.96.0.2", vec![udp])]].concat();
        let slices = vec![
            slice(
                "b-1",
                "b",
                &[(Some("x"), 1), (Some("y"), 2)],
                vec![ready("10.244.0.9"), ready("10.244.0.3")],
            ),
            slice(
                "b-2",
                "b",
                &[(Some("x"), 1), (Some("y"), 2)],
                vec![ready("10.244.0.5"), ready("10.244.0.1")],
            ),
            slice("a-1", "a", &[(Some("x"), 7)], vec![ready("10.244.1.1")]),
        ];
        let t = translate(&svcs, &slices);
        let addrs: Vec<String> = t
            .state
            .services
            .iter()
            .map(|s| s.addr().to_string())
            .collect();
        assert_eq!(
            addrs,
            [
                "10.96.0.1:80/tcp",
                "10.96.0.2:80/tcp",
                "10.96.0.2:80/udp",
                "10.96.0.2:90/tcp",
                "10.96.0.9:80/tcp"
            ]
        );
        let b_y = &t.state.services[1];
        assert_eq!(b_y.name, "shop/b:y");
        let ips: Vec<String> = b_y.backends.iter().map(|b| b.ip.to_string()).collect();
        assert_eq!(
            ips,
            ["10.244.0.1", "10.244.0.3", "10.244.0.5", "10.244.0.9"]
        );
        let problem_services: Vec<String> =
            t.problems.iter().map(|p| p.subject.to_string()).collect();
        assert_eq!(problem_services, ["shop/c", "shop/c", "shop/d"]);

        let mut svcs_rev = svcs.clone();
        svcs_rev.reverse();
        let mut slices_rev = slices.clone();
        slices_rev.reverse();
        for e in slices_rev.iter_mut().flat_map(|s| s.endpoints.iter_mut()) {
            e.reverse();
        }
        assert_eq!(translate(&svcs_rev, &slices_rev), t);
        // Arcs (as a reflector store gives) translate the same.
        let arcs: Vec<_> = svcs.iter().cloned().map(std::sync::Arc::new).collect();
        assert_eq!(
            ClusterState::build(&arcs, &slices).node_state("node-a"),
            t.state
        );
    }

    #[test]
    fn two_services_on_one_address_keep_the_first() {
        let a = service("a", "10.96.0.90", vec![named("http", 80, "http")]);
        let b = service("b", "10.96.0.90", vec![named("web", 80, "web")]);
        let t = translate(&[b, a], &[]);
        assert_eq!(names(&t), ["shop/a:http"]);
        assert_eq!(t.problems.len(), 1);
        assert_eq!(t.problems[0].subject.name(), "b");
        assert_eq!(t.problems[0].reason(), "DuplicateServiceAddress");
        assert_eq!(
            t.problems[0].to_string(),
            "10.96.0.90:80/tcp is already the address of shop/a:http; port web is not balanced"
        );
    }

    #[test]
    fn out_of_range_port_is_a_problem() {
        let svc = service(
            "p",
            "10.96.0.91",
            vec![named("big", 70_000, "big"), named("ok", 80, "ok")],
        );
        let t = translate(&[svc], &[]);
        assert_eq!(names(&t), ["shop/p:ok"]);
        assert_eq!(
            t.problems[0].kind,
            ProblemKind::InvalidPort {
                port: "big".into(),
                number: 70_000
            }
        );
    }

    // --- A backend Pod's own annotations (rpclb.io/weight, rpclb.io/max) ---

    /// `ep`, with a `targetRef` to Pod `namespace/name`.
    fn of_pod(mut ep: Endpoint, namespace: Option<&str>, name: &str) -> Endpoint {
        ep.target_ref = Some(k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("Pod".into()),
            namespace: namespace.map(str::to_string),
            name: Some(name.into()),
            ..Default::default()
        });
        ep
    }

    /// Pods in `shop` with these annotations.
    fn pods(list: &[(&str, &[(&str, &str)])]) -> Pods {
        let mut p = Pods::default();
        for (name, kv) in list {
            p.insert(NS, name, &pairs(kv).unwrap_or_default());
        }
        p
    }

    /// (last octet, weight, max) of the first service's backends.
    fn weights_and_limits(st: &DesiredState) -> Vec<(u8, u32, Option<u32>)> {
        st.services[0]
            .backends
            .iter()
            .map(|b| (last_octet(b.ip), b.weight, b.max))
            .collect()
    }

    /// Three endpoints of `web`: pod-1, pod-2 (by targetRef) and one
    /// without a targetRef.
    fn web_with_pods() -> EndpointSlice {
        web_slice(vec![
            of_pod(ready("10.244.0.1"), Some(NS), "pod-1"),
            of_pod(ready("10.244.0.2"), Some(NS), "pod-2"),
            ready("10.244.0.3"),
        ])
    }

    #[test]
    fn a_pods_annotations_give_its_weight_and_limit() {
        let svc = annotated(web(), &[(annotations::MAX_PER_BACKEND, "100")]);
        let p = pods(&[
            (
                "pod-1",
                &[
                    (annotations::POD_WEIGHT, " 5 "),
                    (annotations::POD_MAX, "20"),
                    ("example.com/other", "x"),
                ],
            ),
            // Not ours: ignored, as a Pod without annotations.
            ("pod-2", &[("example.com/weight", "9")]),
        ]);
        let c = ClusterState::build_with_pods(&[svc], &[web_with_pods()], NodeLocations::new(), &p);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert_eq!(p.len(), 1, "only Pods with rpclb.io/ annotations are kept");
        let st = c.default_state();
        // pod-1: its own weight and limit; pod-2 (no rpclb.io/ annotation)
        // and the endpoint without a targetRef: weight 1 and the Service's
        // limit (no backend limit).
        assert_eq!(
            weights_and_limits(&st),
            [(1, 5, Some(20)), (2, 1, None), (3, 1, None)]
        );
        assert_eq!(st.services[0].max_per_backend, Some(100));
        // On the wire as well: what the agents get.
        let back = lb_api::wire::service_from_pb(&(&st.services[0]).into()).unwrap();
        assert_eq!(back.backends[0].weight, 5);
        assert_eq!(back.backends[0].max, Some(20));

        // Weight 0 drains the pod (no new flows; still a backend).
        let p = pods(&[("pod-2", &[(annotations::POD_WEIGHT, "0")])]);
        let c =
            ClusterState::build_with_pods(&[web()], &[web_with_pods()], NodeLocations::new(), &p);
        assert_eq!(
            weights_and_limits(&c.default_state()),
            [(1, 1, None), (2, 0, None), (3, 1, None)]
        );
        assert_eq!(c.default_state().services[0].live_backends(), 2);

        // The same without any Pod: every backend weight 1, no limit.
        let c = ClusterState::build_with_pods(
            &[web()],
            &[web_with_pods()],
            NodeLocations::new(),
            &Pods::default(),
        );
        assert_eq!(
            weights_and_limits(&c.default_state()),
            [(1, 1, None), (2, 1, None), (3, 1, None)]
        );
    }

    #[test]
    fn the_services_weights_entry_wins_over_the_pods_weight() {
        let svc = annotated(web(), &[(annotations::WEIGHTS, "10.244.0.1=2")]);
        let p = pods(&[
            ("pod-1", &[(annotations::POD_WEIGHT, "7")]),
            ("pod-2", &[(annotations::POD_WEIGHT, "3")]),
        ]);
        let c = ClusterState::build_with_pods(&[svc], &[web_with_pods()], NodeLocations::new(), &p);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        // pod-1: the Service's entry (2), not its own (7); pod-2: not in
        // the list, its own (3); the third: neither, 1.
        assert_eq!(w(&c.default_state()), [2, 3, 1]);
    }

    #[test]
    fn invalid_pod_annotations_are_one_problem_each_on_the_pod_and_ignored() {
        // pod-1 serves two Services, one of them on two ports: its problems
        // are still reported once each, on the Pod.
        let svc = annotated(
            web(),
            &[
                (annotations::WEIGHTS, "10.244.0.1=4"),
                (annotations::MAX_PER_BACKEND, "50"),
            ],
        );
        let api = service(
            "api",
            "10.96.0.61",
            vec![named("http", 80, "http"), named("grpc", 81, "grpc")],
        );
        let api_slice = slice(
            "api-x",
            "api",
            &[(Some("http"), 8080), (Some("grpc"), 9090)],
            vec![of_pod(ready("10.244.0.1"), Some(NS), "pod-1")],
        );
        for (kv, key) in [
            (annotations::POD_WEIGHT, "65536"),
            (annotations::POD_WEIGHT, "-1"),
            (annotations::POD_WEIGHT, "heavy"),
            (annotations::POD_WEIGHT, ""),
            (annotations::POD_MAX, "0"),
            (annotations::POD_MAX, "1000001"),
            (annotations::POD_MAX, "+3"),
        ]
        .map(|(k, v)| ([(k, v)], k))
        {
            let p = pods(&[
                ("pod-1", &kv),
                // Not a backend of anything: not read, not reported.
                ("pod-9", &[(annotations::POD_WEIGHT, "x")]),
            ]);
            let c = ClusterState::build_with_pods(
                &[svc.clone(), api.clone()],
                &[web_with_pods(), api_slice.clone()],
                NodeLocations::new(),
                &p,
            );
            assert_eq!(c.problems().len(), 1, "{kv:?}: {:?}", c.problems());
            let pr = &c.problems()[0];
            assert_eq!(pr.reason(), "InvalidAnnotation", "{kv:?}");
            assert_eq!(
                pr.subject,
                Subject::Pod(PodRef {
                    namespace: NS.into(),
                    name: "pod-1".into()
                }),
                "{kv:?}"
            );
            assert_eq!(pr.subject.to_string(), "pod shop/pod-1");
            assert!(pr.to_string().contains(key), "{pr}");
            // The defaults: web's entry (4) and limit (50) for pod-1; api: 1,
            // no limit.
            let st = c.default_state();
            let web = st
                .services
                .iter()
                .find(|s| s.name == "shop/web:http")
                .unwrap();
            assert_eq!((web.backends[0].weight, web.backends[0].max), (4, None));
            assert_eq!(web.max_per_backend, Some(50));
            for s in st
                .services
                .iter()
                .filter(|s| s.name.starts_with("shop/api"))
            {
                assert_eq!(
                    (s.backends[0].weight, s.backends[0].max),
                    (1, None),
                    "{}",
                    s.name
                );
            }
        }

        // Both wrong, and a Service key put on a Pod (unknown there): one
        // problem per key, in key order.
        let p = pods(&[(
            "pod-1",
            &[
                (annotations::POD_WEIGHT, "x"),
                (annotations::POD_MAX, "y"),
                (annotations::MAX_PER_BACKEND, "5"),
            ],
        )]);
        let c =
            ClusterState::build_with_pods(&[web()], &[web_with_pods()], NodeLocations::new(), &p);
        let keys: Vec<&str> = c
            .problems()
            .iter()
            .map(|p| match &p.kind {
                ProblemKind::Annotation(e) => e.key.as_str(),
                k => panic!("{k:?}"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                annotations::POD_MAX,
                annotations::MAX_PER_BACKEND,
                annotations::POD_WEIGHT
            ]
        );
        assert!(
            c.problems()[1]
                .to_string()
                .contains("unknown rpclb.io annotation on a Pod"),
            "{}",
            c.problems()[1]
        );
        assert_eq!(weights_and_limits(&c.default_state())[0], (1, 1, None));

        // One valid and one invalid: the valid one applies.
        let p = pods(&[(
            "pod-1",
            &[
                (annotations::POD_WEIGHT, "6"),
                (annotations::POD_MAX, "none"),
            ],
        )]);
        let c =
            ClusterState::build_with_pods(&[web()], &[web_with_pods()], NodeLocations::new(), &p);
        assert_eq!(c.problems().len(), 1);
        assert_eq!(weights_and_limits(&c.default_state())[0], (1, 6, None));
    }

    #[test]
    fn the_pod_is_found_by_target_ref_only() {
        let p = pods(&[("pod-1", &[(annotations::POD_WEIGHT, "9")])]);
        let mut other_ns = Pods::default();
        other_ns.insert(
            "other",
            "pod-1",
            &pairs(&[(annotations::POD_WEIGHT, "9")]).unwrap(),
        );
        let build = |ep: Endpoint, pods: &Pods| {
            let c = ClusterState::build_with_pods(
                &[web()],
                &[web_slice(vec![ep])],
                NodeLocations::new(),
                pods,
            );
            assert!(c.problems().is_empty(), "{:?}", c.problems());
            w(&c.default_state())[0]
        };
        // Found: kind Pod in the slice's namespace, named or implied.
        assert_eq!(build(of_pod(ready("10.244.0.1"), Some(NS), "pod-1"), &p), 9);
        assert_eq!(build(of_pod(ready("10.244.0.1"), None, "pod-1"), &p), 9);
        // No targetRef (an endpoint written by hand): the default.
        assert_eq!(build(ready("10.244.0.1"), &p), 1);
        // Another Pod's name, or a Pod that does not exist (yet).
        assert_eq!(build(of_pod(ready("10.244.0.1"), Some(NS), "pod-2"), &p), 1);
        // Not a Pod.
        let mut node_ref = of_pod(ready("10.244.0.1"), Some(NS), "pod-1");
        node_ref.target_ref.as_mut().unwrap().kind = Some("Node".into());
        assert_eq!(build(node_ref, &p), 1);
        // A Pod of another namespace is not followed, even if it exists.
        assert_eq!(
            build(
                of_pod(ready("10.244.0.1"), Some("other"), "pod-1"),
                &other_ns
            ),
            1
        );
        // The same IP in two slices (a terminating copy naming pod-2, a
        // ready one naming pod-1): the copy that wins (ready) decides, as
        // for its node.
        let c = ClusterState::build_with_pods(
            &[web()],
            &[
                web_slice(vec![of_pod(terminating("10.244.0.1"), Some(NS), "pod-2")]),
                slice(
                    "web-y",
                    "web",
                    &[(Some("http"), 8080)],
                    vec![of_pod(ready("10.244.0.1"), Some(NS), "pod-1")],
                ),
            ],
            NodeLocations::new(),
            &p,
        );
        assert_eq!(w(&c.default_state()), [9]);
    }

    #[test]
    fn core_v1_endpoints_keep_the_target_ref() {
        use k8s_openapi::api::core::v1::{
            EndpointAddress, EndpointSubset, Endpoints, ObjectReference,
        };
        let ep = Endpoints {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some(NS.into()),
                ..Default::default()
            },
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![EndpointAddress {
                    ip: "10.244.0.1".into(),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        namespace: Some(NS.into()),
                        name: Some("pod-1".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ports: Some(vec![k8s_openapi::api::core::v1::EndpointPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Some("TCP".into()),
                    app_protocol: None,
                }]),
                ..Default::default()
            }]),
        };
        let p = pods(&[(
            "pod-1",
            &[(annotations::POD_WEIGHT, "3"), (annotations::POD_MAX, "7")],
        )]);
        let slices = crate::endpoints::slices_from_endpoints(&ep);
        let c = ClusterState::build_with_pods(&[web()], &slices, NodeLocations::new(), &p);
        assert_eq!(weights_and_limits(&c.default_state()), [(1, 3, Some(7))]);
    }
}
