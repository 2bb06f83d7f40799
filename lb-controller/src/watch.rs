//! Watches the Kubernetes API and publishes a [`ClusterSnapshot`] on every
//! change.
//!
//! [`run`] keeps four kube-rs reflectors (in-memory caches kept current by
//! watches): Services, the endpoints (EndpointSlices from
//! discovery.k8s.io/v1, or core v1 Endpoints: see [`crate::endpoints`]),
//! Nodes (metadata only) and Pods (metadata only, and of that only their
//! `rpclb.io/` annotations: a backend's own weight and QoS limit, joined to
//! the endpoints by `targetRef`). A Pod change that leaves its `rpclb.io/`
//! annotations as they were (a status update, a label) is not a change.
//! After all four have listed once, each change opens a
//! short window ([`WatchConfig::coalesce`], 50 ms by default); when it
//! closes, the whole cluster is translated again
//! ([`ClusterState::build`]) and, if anything differs, the new snapshot is
//! sent on a `tokio::sync::watch` channel with the next generation number.
//! Nothing is sent before that first full list, so an agent never gets the
//! empty state of a controller that has not synced yet.
//!
//! The snapshot holds the translation of the whole cluster, not one state
//! per node: a node's state is cut from it on demand
//! ([`ClusterSnapshot::node_state`]), for the nodes that have an agent
//! connected. Most nodes share one state
//! ([`ClusterState::default_state`]); only the nodes in
//! [`ClusterState::local_nodes`] (with endpoints of
//! `internalTrafficPolicy: Local` services) differ.
//!
//! Every replica watches and publishes; leadership (see
//! [`leader`](crate::leader)) only decides who writes Kubernetes Events. The
//! leader writes one Event (type Warning) on the Service for each
//! [`Problem`] that the previous translation did not have
//! ([`ProblemTracker`]): a problem is reported when it appears, not on every
//! recompute. See [`crate::events`] for how an Event stays one Event across
//! a change of leader.

use std::collections::{BTreeMap, HashMap};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service as KubeService, ServiceStatus};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use lb_api::DesiredState;
use lb_api::locality::{NodeLocation, NodeLocations};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::annotations;
use crate::endpoints::{EndpointsSource, slices_from_endpoints};
use crate::events::EventWriter;
pub use crate::events::{EVENT_ACTION, ProblemTracker, Report, event_note};
use crate::translate::{ClusterState, Pods, Problem, Subject};

/// A Kubernetes resource the controller lists and watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatchedResource {
    /// API group; `""` is the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural resource name, as in RBAC rules.
    pub resource: &'static str,
}

/// Everything [`run`] may list and watch (the endpoints from one of the
/// two sources): the controller's ClusterRole must grant `list` and `watch`
/// on exactly these (deploy/ is tested against it).
pub const WATCHED: [WatchedResource; 5] = [
    WatchedResource {
        group: "",
        version: "v1",
        resource: "services",
    },
    WatchedResource {
        group: "discovery.k8s.io",
        version: "v1",
        resource: "endpointslices",
    },
    WatchedResource {
        group: "",
        version: "v1",
        resource: "endpoints",
    },
    WatchedResource {
        group: "",
        version: "v1",
        resource: "nodes",
    },
    WatchedResource {
        group: "",
        version: "v1",
        resource: "pods",
    },
];

/// The default coalescing window.
pub const DEFAULT_COALESCE: Duration = Duration::from_millis(50);

/// What [`run`] publishes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSnapshot {
    /// 1 for the first snapshot, then one more for each change.
    pub generation: u64,
    /// The names of the cluster's Nodes, sorted.
    pub nodes: Vec<String>,
    /// Every Service, translated; cut per node with
    /// [`node_state`](Self::node_state).
    pub cluster: ClusterState,
}

impl ClusterSnapshot {
    /// The desired state of `node`.
    pub fn node_state(&self, node: &str) -> DesiredState {
        self.cluster.node_state(node)
    }
}

/// `None` until the first full list of every watched resource.
pub type SnapshotSender = watch::Sender<Option<Arc<ClusterSnapshot>>>;
/// The receiving side of [`SnapshotSender`].
pub type SnapshotReceiver = watch::Receiver<Option<Arc<ClusterSnapshot>>>;

/// A channel for [`run`], holding `None` until the first snapshot.
pub fn snapshot_channel() -> (SnapshotSender, SnapshotReceiver) {
    watch::channel(None)
}

/// How [`run`] behaves.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// How long changes are gathered before the state is recomputed.
    pub coalesce: Duration,
    /// The Events' `reportingController`, a qualified name such as
    /// `rpclb.io/controller`.
    pub controller: String,
    /// The Events' `reportingInstance`: this replica (its pod name).
    pub instance: Option<String>,
    /// Where the endpoints come from.
    pub source: EndpointsSource,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            coalesce: DEFAULT_COALESCE,
            controller: "rpclb.io/controller".into(),
            instance: None,
            source: EndpointsSource::EndpointSlices,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The watch streams never end on their own (they retry with backoff),
    /// so this is a bug or a shutdown of the runtime.
    #[error("the Kubernetes watch streams ended")]
    StreamsEnded,
}

/// Which watch a change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services = 0,
    Endpoints = 1,
    Nodes = 2,
    Pods = 3,
}

/// What a watcher event means for the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// An object was added, changed or deleted.
    Updated,
    /// A (re)list finished: the store now holds the full, current list.
    Synced,
}

/// What a watcher event means for the snapshot; `None`: nothing yet. During
/// a (re)list the reflector keeps the previous contents until `InitDone`,
/// when it swaps in the new list at once.
pub fn classify<K>(event: &watcher::Event<K>) -> Option<Change> {
    match event {
        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Some(Change::Updated),
        watcher::Event::InitDone => Some(Change::Synced),
        watcher::Event::Init | watcher::Event::InitApply(_) => None,
    }
}

/// Gathers a burst of changes into one recompute.
///
/// The first change opens a window; later changes join it without moving its
/// end, so a steady stream of changes still gets a recompute every window
/// (a bounded delay rather than a debounce that could wait forever).
#[derive(Clone, Debug)]
pub struct Coalescer {
    window: Duration,
    deadline: Option<Instant>,
}

impl Coalescer {
    pub fn new(window: Duration) -> Self {
        Coalescer {
            window,
            deadline: None,
        }
    }

    /// Records a change at `now`.
    pub fn changed(&mut self, now: Instant) {
        self.deadline.get_or_insert(now + self.window);
    }

    /// When the open window ends; `None` when no change is pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether a recompute is due at `now`; if so, closes the window.
    pub fn take_due(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if d <= now => {
                self.deadline = None;
                true
            }
            _ => false,
        }
    }
}

/// The endpoints cache of either source.
enum EndpointStore {
    Slices(Store<EndpointSlice>),
    Endpoints(Store<Endpoints>),
}

impl EndpointStore {
    /// Translates `services` with these endpoints, on nodes at `nodes`,
    /// with the backend Pods' annotations.
    fn translate(
        &self,
        services: &[Arc<KubeService>],
        nodes: NodeLocations,
        pods: &Pods,
    ) -> ClusterState {
        match self {
            EndpointStore::Slices(s) => {
                ClusterState::build_with_pods(services, &s.state(), nodes, pods)
            }
            EndpointStore::Endpoints(e) => {
                let slices: Vec<EndpointSlice> = e
                    .state()
                    .iter()
                    .flat_map(|x| slices_from_endpoints(x))
                    .collect();
                ClusterState::build_with_pods(services, &slices, nodes, pods)
            }
        }
    }
}

/// Watches the cluster and publishes snapshots on `snapshots` until the
/// watch streams end (they do not, in normal operation: errors are logged and
/// retried with backoff). Writes Events while `leader` holds `true`; pass a
/// receiver that always holds `true` to run without leader election.
pub async fn run(
    client: Client,
    config: WatchConfig,
    snapshots: SnapshotSender,
    mut leader: watch::Receiver<bool>,
) -> Result<(), WatchError> {
    let (services, services_writer) = reflector::store::<KubeService>();
    let services_stream = reflector::reflector(
        services_writer,
        watcher(
            Api::<KubeService>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|s| {
            // Keep only what the translation reads: memory, not meaning.
            s.managed_fields_mut().clear();
            s.annotations_mut()
                .retain(|k, _| k.starts_with(annotations::PREFIX));
            // The status's load-balancer ingress IPs are front ends
            // (translate::external_of); its conditions are not read.
            s.status = s.status.take().and_then(|st| {
                st.load_balancer.map(|lb| ServiceStatus {
                    load_balancer: Some(lb),
                    conditions: None,
                })
            });
        }),
    );
    let (endpoints, endpoints_stream) = match config.source {
        EndpointsSource::EndpointSlices => {
            let (store, writer) = reflector::store::<EndpointSlice>();
            let stream = reflector::reflector(
                writer,
                watcher(
                    Api::<EndpointSlice>::all(client.clone()),
                    watcher::Config::default(),
                )
                .modify(|s| s.managed_fields_mut().clear()),
            );
            (
                EndpointStore::Slices(store),
                tagged(Kind::Endpoints, stream).boxed(),
            )
        }
        EndpointsSource::Endpoints => {
            let (store, writer) = reflector::store::<Endpoints>();
            let stream = reflector::reflector(
                writer,
                watcher(
                    Api::<Endpoints>::all(client.clone()),
                    watcher::Config::default(),
                )
                .modify(|s| s.managed_fields_mut().clear()),
            );
            (
                EndpointStore::Endpoints(store),
                tagged(Kind::Endpoints, stream).boxed(),
            )
        }
    };
    let (nodes, nodes_writer) = reflector::store::<PartialObjectMeta<Node>>();
    let nodes_stream = reflector::reflector(
        nodes_writer,
        // Metadata only (names and the topology labels): Node status is
        // large and changes often.
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|n| {
            n.managed_fields_mut().clear();
            n.annotations_mut().clear();
            n.labels_mut()
                .retain(|k, _| k == ZONE_LABEL || k == REGION_LABEL);
        }),
    );
    let (pods, pods_writer) = reflector::store::<PartialObjectMeta<Pod>>();
    let pods_stream = reflector::reflector(
        pods_writer,
        // Metadata only, and of that what the translation and the Events
        // read: name, namespace, uid and the rpclb.io/ annotations.
        watcher(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|p| {
            p.managed_fields_mut().clear();
            p.labels_mut().clear();
            p.owner_references_mut().clear();
            p.finalizers_mut().clear();
            p.annotations_mut()
                .retain(|k, _| k.starts_with(annotations::PREFIX));
        }),
    );
    let changes = futures::stream::select(
        futures::stream::select(
            tagged(Kind::Services, services_stream),
            tagged_pods(pods_stream),
        ),
        futures::stream::select(endpoints_stream, tagged(Kind::Nodes, nodes_stream)),
    );
    let mut changes = pin!(changes);

    let (problems_tx, problems_rx) = mpsc::channel::<(Problem, Report)>(1024);
    let writer = EventWriter::new(
        client,
        config.controller.clone(),
        config
            .instance
            .clone()
            .unwrap_or_else(|| "lb-controller".into()),
    );
    tokio::spawn(write_events(
        writer,
        services.clone(),
        pods.clone(),
        problems_rx,
    ));

    let mut synced = [false; 4];
    let mut coalescer = Coalescer::new(config.coalesce);
    let mut tracker = ProblemTracker::default();
    let mut leader_open = true;
    let mut generation = 0u64;
    info!(endpoints = %config.source, "watching services, {}, nodes and pods", config.source);
    loop {
        let deadline = coalescer.deadline();
        tokio::select! {
            item = changes.next() => match item {
                None => return Err(WatchError::StreamsEnded),
                Some((kind, Err(e))) => {
                    warn!(watch = ?kind, error = %e, "watch failed; retrying with backoff");
                }
                Some((_, Ok(None))) => {}
                Some((kind, Ok(Some(change)))) => {
                    if change == Change::Synced && !synced[kind as usize] {
                        synced[kind as usize] = true;
                        debug!(watch = ?kind, "listed");
                    }
                    coalescer.changed(Instant::now());
                }
            },
            changed = leader.changed(), if leader_open => {
                if changed.is_err() {
                    // The elector is gone; keep its last word.
                    leader_open = false;
                } else {
                    // Report the current problems under the new role.
                    tracker.clear();
                    coalescer.changed(Instant::now());
                }
            }
            () = sleep_until(deadline), if deadline.is_some() => {
                if !coalescer.take_due(Instant::now()) || !synced.iter().all(|&s| s) {
                    continue;
                }
                let snapshot = Arc::new(ClusterSnapshot {
                    generation: generation + 1,
                    nodes: node_names(&nodes),
                    cluster: endpoints.translate(
                        &services.state(),
                        node_locations(&nodes),
                        &pod_annotations(&pods),
                    ),
                });
                // This is the only sender: nothing changes between the
                // borrow and the send.
                let same = snapshots.borrow().as_ref().is_some_and(|c| {
                    c.nodes == snapshot.nodes && c.cluster == snapshot.cluster
                });
                if !same {
                    generation += 1;
                    snapshots.send_replace(Some(Arc::clone(&snapshot)));
                    debug!(
                        generation,
                        services = snapshot.cluster.service_count(),
                        nodes = snapshot.nodes.len(),
                        problems = snapshot.cluster.problems().len(),
                        "published a snapshot"
                    );
                }
                if *leader.borrow() {
                    for (p, how) in tracker.new_problems(snapshot.cluster.problems()) {
                        if problems_tx.try_send((p.clone(), how)).is_err() {
                            warn!(object = %p.subject, reason = p.reason(), "event queue full; event dropped");
                        }
                    }
                } else {
                    tracker.clear();
                }
            }
        }
    }
}

/// A watch stream's items, tagged with its kind and classified.
fn tagged<K, S>(
    kind: Kind,
    stream: S,
) -> impl Stream<Item = (Kind, Result<Option<Change>, watcher::Error>)> + Send
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    stream
        .default_backoff()
        .map(move |r| (kind, r.map(|e| classify(&e))))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The Node label that names its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The Node label that names its region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// Where a Node is, from its labels; `None` when it has neither label.
pub fn node_location(labels: &std::collections::BTreeMap<String, String>) -> Option<NodeLocation> {
    let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
    let loc = NodeLocation {
        zone: get(ZONE_LABEL),
        region: get(REGION_LABEL),
    };
    (loc.zone.is_some() || loc.region.is_some()).then_some(loc)
}

/// The Nodes that have a zone or region label, by name.
fn node_locations(nodes: &Store<PartialObjectMeta<Node>>) -> NodeLocations {
    nodes
        .state()
        .iter()
        .filter_map(|n| Some((n.name_any(), node_location(n.labels())?)))
        .collect()
}

fn node_names(nodes: &Store<PartialObjectMeta<Node>>) -> Vec<String> {
    let mut names: Vec<String> = nodes.state().iter().map(|n| n.name_any()).collect();
    names.sort();
    names
}

/// Writes one Warning Event per problem, on its Service or Pod
/// ([`crate::events`]).
async fn write_events(
    writer: EventWriter,
    services: Store<KubeService>,
    pods: Store<PartialObjectMeta<Pod>>,
    mut problems: mpsc::Receiver<(Problem, Report)>,
) {
    while let Some((p, how)) = problems.recv().await {
        match &p.subject {
            Subject::Service(r) => {
                let key = ObjectRef::<KubeService>::new(&r.name).within(&r.namespace);
                match services.get(&key) {
                    Some(svc) => writer.report(&p, &*svc, how).await,
                    None => debug!(object = %p.subject, "service gone; no event"),
                }
            }
            Subject::Pod(r) => {
                let key = ObjectRef::<PartialObjectMeta<Pod>>::new(&r.name).within(&r.namespace);
                match pods.get(&key) {
                    Some(pod) => writer.report(&p, &*pod, how).await,
                    None => debug!(object = %p.subject, "pod gone; no event"),
                }
            }
        }
    }
}

/// The Pods' `rpclb.io/` annotations (the watch keeps no others).
fn pod_annotations(pods: &Store<PartialObjectMeta<Pod>>) -> Pods {
    let mut out = Pods::default();
    for p in pods.state() {
        if !p.annotations().is_empty() {
            out.insert(
                p.namespace().as_deref().unwrap_or("default"),
                &p.name_any(),
                p.annotations(),
            );
        }
    }
    out
}

/// A Pod's identity, for [`PodFilter`].
type PodKey = (String, String);

/// Keeps, of the Pod watch's events, those that change what the translation
/// reads: a Pod's `rpclb.io/` annotations (added, changed, gone with the
/// Pod). The Pods watch sees every status update of every Pod; the others
/// must not recompute the cluster.
#[derive(Debug, Default)]
pub struct PodFilter {
    /// The annotations of the Pods that have any.
    known: HashMap<PodKey, BTreeMap<String, String>>,
    /// A (re)list in progress; swapped in at its end.
    listing: HashMap<PodKey, BTreeMap<String, String>>,
}

impl PodFilter {
    /// What `event` means for the snapshot (as [`classify`]), given only
    /// `rpclb.io/` annotations matter.
    pub fn classify(&mut self, event: &watcher::Event<PartialObjectMeta<Pod>>) -> Option<Change> {
        let key = |p: &PartialObjectMeta<Pod>| -> PodKey {
            (p.namespace().unwrap_or_default(), p.name_any())
        };
        let ours = |p: &PartialObjectMeta<Pod>| -> BTreeMap<String, String> {
            p.annotations()
                .iter()
                .filter(|(k, _)| k.starts_with(annotations::PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        match event {
            watcher::Event::Apply(p) => {
                let (k, a) = (key(p), ours(p));
                let changed = if a.is_empty() {
                    self.known.remove(&k).is_some()
                } else {
                    self.known.insert(k, a.clone()).as_ref() != Some(&a)
                };
                changed.then_some(Change::Updated)
            }
            watcher::Event::Delete(p) => self
                .known
                .remove(&key(p))
                .is_some()
                .then_some(Change::Updated),
            watcher::Event::Init => {
                self.listing.clear();
                None
            }
            watcher::Event::InitApply(p) => {
                let a = ours(p);
                if !a.is_empty() {
                    self.listing.insert(key(p), a);
                }
                None
            }
            watcher::Event::InitDone => {
                self.known = std::mem::take(&mut self.listing);
                Some(Change::Synced)
            }
        }
    }
}

/// The Pod watch's items, tagged and filtered by [`PodFilter`].
fn tagged_pods<S>(
    stream: S,
) -> impl Stream<Item = (Kind, Result<Option<Change>, watcher::Error>)> + Send
where
    S: Stream<Item = Result<watcher::Event<PartialObjectMeta<Pod>>, watcher::Error>> + Send,
{
    let mut filter = PodFilter::default();
    stream
        .default_backoff()
        .map(move |r| (Kind::Pods, r.map(|e| filter.classify(&e))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_resources_are_the_watched_types() {
        fn of<K: kube::Resource<DynamicType = ()>>() -> (String, String, String) {
            (
                K::group(&()).into_owned(),
                K::version(&()).into_owned(),
                K::plural(&()).into_owned(),
            )
        }
        let watched: Vec<(String, String, String)> = WATCHED
            .iter()
            .map(|w| (w.group.into(), w.version.into(), w.resource.into()))
            .collect();
        assert_eq!(
            watched,
            [
                of::<KubeService>(),
                of::<EndpointSlice>(),
                of::<Endpoints>(),
                of::<Node>(),
                of::<Pod>()
            ]
        );
    }

    #[test]
    fn classify_events() {
        use watcher::Event as E;
        assert_eq!(classify(&E::Apply(1)), Some(Change::Updated));
        assert_eq!(classify(&E::Delete(1)), Some(Change::Updated));
        assert_eq!(classify(&E::InitDone::<u8>), Some(Change::Synced));
        assert_eq!(classify(&E::Init::<u8>), None);
        assert_eq!(classify(&E::InitApply(1)), None);
    }

    #[test]
    fn only_a_change_of_a_pods_rpclb_annotations_is_a_change() {
        use watcher::Event as E;
        let pod = |name: &str, kv: &[(&str, &str)]| {
            let mut p = PartialObjectMeta::<Pod>::default();
            p.metadata.name = Some(name.into());
            p.metadata.namespace = Some("shop".into());
            p.metadata.annotations = Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            p
        };
        let weight = |v| [(annotations::POD_WEIGHT, v)];
        let mut f = PodFilter::default();
        // The first list: a change (synced) at its end only.
        assert_eq!(f.classify(&E::Init), None);
        assert_eq!(f.classify(&E::InitApply(pod("a", &weight("2")))), None);
        assert_eq!(f.classify(&E::InitApply(pod("b", &[]))), None);
        assert_eq!(f.classify(&E::InitDone), Some(Change::Synced));
        // Status updates, other annotations: nothing.
        assert_eq!(f.classify(&E::Apply(pod("a", &weight("2")))), None);
        assert_eq!(f.classify(&E::Apply(pod("b", &[("x.io/y", "1")]))), None);
        // A new Pod without ours, one with ours.
        assert_eq!(f.classify(&E::Apply(pod("c", &[]))), None);
        assert_eq!(
            f.classify(&E::Apply(pod("d", &weight("0")))),
            Some(Change::Updated)
        );
        // Ours changed, removed, added.
        assert_eq!(
            f.classify(&E::Apply(pod("a", &weight("3")))),
            Some(Change::Updated)
        );
        assert_eq!(
            f.classify(&E::Apply(pod("a", &[("x.io/y", "1")]))),
            Some(Change::Updated)
        );
        assert_eq!(
            f.classify(&E::Apply(pod("b", &[(annotations::POD_MAX, "5")]))),
            Some(Change::Updated)
        );
        // Deleted: a change only if it had ours.
        assert_eq!(f.classify(&E::Delete(pod("c", &[]))), None);
        assert_eq!(f.classify(&E::Delete(pod("d", &[]))), Some(Change::Updated));
        // A relist starts over from what it lists.
        f.classify(&E::Init);
        f.classify(&E::InitApply(pod("b", &[(annotations::POD_MAX, "5")])));
        assert_eq!(f.classify(&E::InitDone), Some(Change::Synced));
        assert_eq!(
            f.classify(&E::Apply(pod("b", &[(annotations::POD_MAX, "5")]))),
            None
        );
        assert_eq!(
            f.classify(&E::Apply(pod("a", &weight("3")))),
            Some(Change::Updated)
        );
    }

    #[test]
    fn a_burst_of_changes_is_one_recompute() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut c = Coalescer::new(ms(50));
        assert_eq!(c.deadline(), None);
        assert!(!c.take_due(t0 + ms(1000)), "nothing pending");

        c.changed(t0);
        c.changed(t0 + ms(10));
        c.changed(t0 + ms(49));
        // Later changes do not push the end of the window back.
        assert_eq!(c.deadline(), Some(t0 + ms(50)));
        assert!(!c.take_due(t0 + ms(49)));
        assert!(c.take_due(t0 + ms(50)));
        assert_eq!(c.deadline(), None);
        assert!(!c.take_due(t0 + ms(51)), "one recompute per window");

        // A change after the window opens the next one.
        c.changed(t0 + ms(60));
        assert_eq!(c.deadline(), Some(t0 + ms(110)));
        assert!(c.take_due(t0 + ms(200)));
    }

    #[test]
    fn the_channel_holds_nothing_before_the_first_list() {
        let (tx, rx) = snapshot_channel();
        assert!(rx.borrow().is_none());
        tx.send_replace(Some(Arc::new(ClusterSnapshot::default())));
        assert_eq!(
            rx.borrow().as_ref().unwrap().node_state("node-a"),
            DesiredState::default()
        );
    }
}
