//! Watches the Kubernetes API and publishes a [`ClusterSnapshot`] on every
//! change.
//!
//! [`run`] keeps three kube-rs reflectors (in-memory caches kept current by
//! watches): Services, EndpointSlices (discovery.k8s.io/v1) and Nodes
//! (metadata only). After all three have listed once, each change opens a
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
//! recompute, and again if it goes away and comes back. A replica that
//! becomes leader reports the problems present at that moment once more.

use std::collections::HashSet;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use lb_api::DesiredState;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::annotations;
use crate::translate::{ClusterState, Problem, ServiceRef};

/// A Kubernetes resource the controller lists and watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatchedResource {
    /// API group; `""` is the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural resource name, as in RBAC rules.
    pub resource: &'static str,
}

/// Everything [`run`] lists and watches: the controller's ClusterRole must
/// grant `list` and `watch` on exactly these (deploy/ is tested against it).
pub const WATCHED: [WatchedResource; 3] = [
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
        resource: "nodes",
    },
];

/// The default coalescing window.
pub const DEFAULT_COALESCE: Duration = Duration::from_millis(50);

/// The Events' `action`.
pub const EVENT_ACTION: &str = "Translate";

/// The Event API limits a note to 1 kB.
const MAX_NOTE_BYTES: usize = 1024;

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
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            coalesce: DEFAULT_COALESCE,
            controller: "rpclb.io/controller".into(),
            instance: None,
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
    EndpointSlices = 1,
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

/// Remembers which problems were reported, so that each is reported once
/// while it lasts.
#[derive(Clone, Debug, Default)]
pub struct ProblemTracker {
    reported: HashSet<(ServiceRef, &'static str, String)>,
}

impl ProblemTracker {
    /// The problems in `current` that the previous call's did not have (each
    /// once), in their order. Then `current` becomes the reported set: a
    /// problem missing from it is forgotten, and reported again if it comes
    /// back.
    pub fn new_problems<'a>(&mut self, current: &'a [Problem]) -> Vec<&'a Problem> {
        let mut now = HashSet::with_capacity(current.len());
        let mut fresh = Vec::new();
        for p in current {
            let key = (p.service.clone(), p.reason(), p.to_string());
            if !self.reported.contains(&key) && !now.contains(&key) {
                fresh.push(p);
            }
            now.insert(key);
        }
        self.reported = now;
        fresh
    }

    /// Forgets everything: the next call reports all its problems.
    pub fn clear(&mut self) {
        self.reported.clear();
    }
}

/// `note`, cut at a character boundary to fit an Event.
pub fn event_note(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_string();
    }
    let mut end = MAX_NOTE_BYTES - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
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
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let slices_stream = reflector::reflector(
        slices_writer,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|s| s.managed_fields_mut().clear()),
    );
    let (nodes, nodes_writer) = reflector::store::<PartialObjectMeta<Node>>();
    let nodes_stream = reflector::reflector(
        nodes_writer,
        // Metadata only (names): Node status is large and changes often.
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|n| n.managed_fields_mut().clear()),
    );
    let changes = futures::stream::select(
        tagged(Kind::Services, services_stream),
        futures::stream::select(
            tagged(Kind::EndpointSlices, slices_stream),
            tagged(Kind::Nodes, nodes_stream),
        ),
    );
    let mut changes = pin!(changes);

    let (problems_tx, problems_rx) = mpsc::channel::<Problem>(1024);
    let reporter = Reporter {
        controller: config.controller.clone(),
        instance: config.instance.clone(),
    };
    tokio::spawn(write_events(
        client,
        reporter,
        services.clone(),
        problems_rx,
    ));

    let mut synced = [false; 3];
    let mut coalescer = Coalescer::new(config.coalesce);
    let mut tracker = ProblemTracker::default();
    let mut leader_open = true;
    let mut generation = 0u64;
    info!("watching services, endpointslices and nodes");
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
                    cluster: ClusterState::build(&services.state(), &slices.state()),
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
                    for p in tracker.new_problems(snapshot.cluster.problems()) {
                        if problems_tx.try_send(p.clone()).is_err() {
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

fn node_names(nodes: &Store<PartialObjectMeta<Node>>) -> Vec<String> {
    let mut names: Vec<String> = nodes.state().iter().map(|n| n.name_any()).collect();
    names.sort();
    names
}

/// Writes one Warning Event per problem, on its Service.
///
/// Each Event gets a [`Recorder`] of its own: a shared one folds every
/// Event with the same type, reason and action on the same object version
/// into one series (a PATCH of the first Event, keeping its note), so a
/// Service's second invalid annotation would be shown with the first one's
/// text. [`ProblemTracker`] already keeps repeats out.
async fn write_events(
    client: Client,
    reporter: Reporter,
    services: Store<KubeService>,
    mut problems: mpsc::Receiver<Problem>,
) {
    while let Some(p) = problems.recv().await {
        let recorder = Recorder::new(client.clone(), reporter.clone());
        let key = ObjectRef::<KubeService>::new(&p.service.name).within(&p.service.namespace);
        let Some(svc) = services.get(&key) else {
            debug!(service = %p.service, "service gone; no event");
            continue;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: p.reason().into(),
            note: Some(event_note(&p.to_string())),
            action: EVENT_ACTION.into(),
            secondary: None,
        };
        match recorder.publish(&event, &svc.object_ref(&())).await {
            Ok(()) => info!(service = %p.service, reason = p.reason(), "{p}"),
            Err(e) => warn!(service = %p.service, error = %e, "could not write event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::ProblemKind;

    #[test]
    fn watched_resources_are_the_watched_types() {
        fn of<K: Resource<DynamicType = ()>>() -> (String, String, String) {
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
            [of::<KubeService>(), of::<EndpointSlice>(), of::<Node>()]
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

    fn problem(service: &str, value: &str) -> Problem {
        let (_, errors) = annotations::parse_annotations(
            &[(annotations::ALGORITHM.to_string(), value.to_string())]
                .into_iter()
                .collect(),
        );
        let e = errors.into_iter().next().expect("an invalid value");
        Problem {
            service: ServiceRef {
                namespace: "shop".into(),
                name: service.into(),
            },
            fallback: e.fallback().into(),
            kind: ProblemKind::Annotation(e),
        }
    }

    #[test]
    fn each_problem_is_reported_once_while_it_lasts() {
        let mut t = ProblemTracker::default();
        let a = problem("a", "x");
        let b = problem("b", "x");
        let a2 = problem("a", "y");

        assert_eq!(t.new_problems(&[a.clone(), b.clone()]), [&a, &b]);
        // Recomputes with the same problems report nothing.
        assert!(t.new_problems(&[a.clone(), b.clone()]).is_empty());
        assert!(t.new_problems(&[b.clone(), a.clone()]).is_empty());
        // A changed value is a new problem.
        assert_eq!(t.new_problems(&[a2.clone(), b.clone()]), [&a2]);
        // A problem that went away and came back is reported again.
        assert!(t.new_problems(std::slice::from_ref(&b)).is_empty());
        assert_eq!(t.new_problems(&[a.clone(), b.clone()]), [&a]);
        // Duplicates within one translation: once.
        assert_eq!(
            t.new_problems(&[problem("c", "x"), problem("c", "x")])
                .len(),
            1
        );

        t.clear();
        assert_eq!(t.new_problems(std::slice::from_ref(&a)), [&a]);
    }

    #[test]
    fn event_notes_fit_the_event_api() {
        assert_eq!(event_note("short"), "short");
        let exact = "x".repeat(MAX_NOTE_BYTES);
        assert_eq!(event_note(&exact), exact);
        let long = "é".repeat(MAX_NOTE_BYTES);
        let note = event_note(&long);
        assert!(note.len() <= MAX_NOTE_BYTES, "{}", note.len());
        assert!(note.ends_with('…'));
        assert!(note.starts_with("éé"));
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
