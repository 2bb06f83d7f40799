//! Watches the Kubernetes API and publishes a [`ClusterSnapshot`] on every
//! change.
//!
//! [`run`] keeps three kube-rs reflectors (in-memory caches kept current by
//! watches): Services, the endpoints (EndpointSlices from
//! discovery.k8s.io/v1, or core v1 Endpoints: see [`crate::endpoints`]) and
//! Nodes (metadata only). After all three have listed once, each change opens a
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

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Endpoints, Node, Service as KubeService};
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
use crate::translate::{ClusterState, Problem};

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
pub const WATCHED: [WatchedResource; 4] = [
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
    /// Translates `services` with these endpoints, on nodes at `nodes`.
    fn translate(&self, services: &[Arc<KubeService>], nodes: NodeLocations) -> ClusterState {
        match self {
            EndpointStore::Slices(s) => ClusterState::build_with_nodes(services, &s.state(), nodes),
            EndpointStore::Endpoints(e) => {
                let slices: Vec<EndpointSlice> = e
                    .state()
                    .iter()
                    .flat_map(|x| slices_from_endpoints(x))
                    .collect();
                ClusterState::build_with_nodes(services, &slices, nodes)
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
            s.status = None;
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
    let changes = futures::stream::select(
        tagged(Kind::Services, services_stream),
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
    tokio::spawn(write_events(writer, services.clone(), problems_rx));

    let mut synced = [false; 3];
    let mut coalescer = Coalescer::new(config.coalesce);
    let mut tracker = ProblemTracker::default();
    let mut leader_open = true;
    let mut generation = 0u64;
    info!(endpoints = %config.source, "watching services, {} and nodes", config.source);
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
                    cluster: endpoints.translate(&services.state(), node_locations(&nodes)),
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
                            warn!(service = %p.service, reason = p.reason(), "event queue full; event dropped");
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

/// Writes one Warning Event per problem, on its Service ([`crate::events`]).
async fn write_events(
    writer: EventWriter,
    services: Store<KubeService>,
    mut problems: mpsc::Receiver<(Problem, Report)>,
) {
    while let Some((p, how)) = problems.recv().await {
        let key = ObjectRef::<KubeService>::new(&p.service.name).within(&p.service.namespace);
        let Some(svc) = services.get(&key) else {
            debug!(service = %p.service, "service gone; no event");
            continue;
        };
        writer.report(&p, &svc, how).await;
    }
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
                of::<Node>()
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
