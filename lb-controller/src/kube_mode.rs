//! Kubernetes mode (`lb-controller --kube`): the watchers ([`crate::watch`])
//! publish cluster snapshots; this turns each into per-node states for the
//! agents' streams ([`crate::grpc::Publisher`]), and runs leader election
//! ([`crate::leader`]) so that only one replica writes Events.
//!
//! At start it asks the API server what it serves and picks the endpoints
//! source ([`crate::endpoints`]); a source that is not served is an error
//! that ends the controller, never a replica that waits forever.
//!
//! Every replica serves agents; `/readyz` turns ready after the first full
//! list of Services, endpoints and Nodes has been published, so a
//! replica that has not synced gets no agent streams. Conntrack timeouts in
//! this mode are the controller's `--timeout-*` flags (the defaults of
//! docs/config.md unless set).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lb_api::config::Timeouts;
use lb_api::locality::NodeLocation;
use lb_api::wire::NodeState;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::endpoints::{self, SourceChoice, SourceError};
use crate::grpc::Publisher;
use crate::http::Counters;
use crate::leader::{LeaderElector, LeaseConfig};
use crate::watch::{self as kwatch, ClusterSnapshot, WatchConfig};

/// Where this replica is (from the downward API in deploy/20-controller.yaml).
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// `RPCLB_POD_NAME`: the Lease identity and the Events' instance.
    pub identity: String,
    /// `RPCLB_POD_NAMESPACE`: where the Lease lives.
    pub namespace: String,
    pub lease_name: String,
    /// Lease duration, renew deadline and retry period (`LeaseConfig`).
    pub lease_timing: (Duration, Duration, Duration),
    /// Run without leader election (a single replica writes Events).
    pub no_leader_election: bool,
    pub timeouts: Timeouts,
    pub watch: WatchConfig,
    /// `--endpoints-source`; decides `watch.source` at start.
    pub endpoints_source: SourceChoice,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeModeError {
    #[error("no Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    Leader(#[from] crate::leader::LeaderError),
    #[error(transparent)]
    Watch(#[from] kwatch::WatchError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// The per-node states of one snapshot. Every node gets the default state
/// except: the nodes of [`ClusterState::local_nodes`] (endpoints of
/// `internalTrafficPolicy: Local` services, node hints, node tiers of
/// locality policies), each its own; and, when zones matter
/// ([`ClusterState::location_dependent`]), the nodes of each zone/region
/// whose state differs from the default, which share one `Arc` per
/// location, computed once.
///
/// [`ClusterState::local_nodes`]: crate::ClusterState::local_nodes
/// [`ClusterState::location_dependent`]: crate::ClusterState::location_dependent
pub fn node_states(
    snap: &ClusterSnapshot,
    timeouts: Timeouts,
) -> (NodeState, BTreeMap<String, Arc<NodeState>>) {
    let cluster = &snap.cluster;
    let default = NodeState {
        state: cluster.default_state(),
        timeouts,
    };
    let local = cluster.local_nodes();
    let mut nodes = BTreeMap::new();
    if cluster.location_dependent() {
        let mut by_location: BTreeMap<&NodeLocation, Option<Arc<NodeState>>> = BTreeMap::new();
        for (n, loc) in cluster.node_locations() {
            if local.contains(n.as_str()) {
                continue;
            }
            let shared = by_location.entry(loc).or_insert_with(|| {
                let state = cluster.location_state(loc);
                (state != default.state).then(|| Arc::new(NodeState { state, timeouts }))
            });
            if let Some(s) = shared {
                nodes.insert(n.clone(), Arc::clone(s));
            }
        }
    }
    for n in local {
        let state = cluster.node_state(n);
        nodes.insert(n.to_string(), Arc::new(NodeState { state, timeouts }));
    }
    (default, nodes)
}

/// Runs until `stop` turns true.
pub async fn run(
    opts: KubeOptions,
    publisher: Arc<Publisher>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), KubeModeError> {
    let client = kube::Client::try_default()
        .await
        .map_err(KubeModeError::Client)?;
    let served = endpoints::discover(&client).await?;
    let source = endpoints::decide(opts.endpoints_source, &served)?;
    info!(
        apiserver = served.version,
        endpointslices_v1 = served.endpointslices_v1,
        choice = ?opts.endpoints_source,
        "reading endpoints from {source}"
    );
    let (leader_tx, leader_rx) = watch::channel(opts.no_leader_election);
    let elector = if opts.no_leader_election {
        None
    } else {
        let (lease_duration, renew_deadline, retry_period) = opts.lease_timing;
        let cfg = LeaseConfig {
            lease_duration,
            renew_deadline,
            retry_period,
            ..LeaseConfig::new(&opts.namespace, &opts.lease_name, &opts.identity)
        };
        let e = LeaderElector::new(client.clone(), cfg)?;
        let mut s = stop.clone();
        Some(tokio::spawn(e.run(leader_tx, async move {
            let _ = s.wait_for(|v| *v).await;
        })))
    };
    let (snap_tx, mut snap_rx) = kwatch::snapshot_channel();
    let watch_cfg = WatchConfig {
        instance: Some(opts.identity.clone()),
        source,
        ..opts.watch.clone()
    };
    let watcher = tokio::spawn(kwatch::run(client, watch_cfg, snap_tx, leader_rx));
    info!(
        identity = opts.identity,
        "watching Services, {source} and Nodes"
    );
    let result = loop {
        tokio::select! {
            _ = stop.wait_for(|v| *v) => break Ok(()),
            r = snap_rx.changed() => {
                if r.is_err() {
                    break Err(kwatch::WatchError::StreamsEnded.into());
                }
                let Some(snap) = snap_rx.borrow_and_update().clone() else { continue };
                let (default, nodes) = node_states(&snap, opts.timeouts);
                let v = publisher.publish_shared(default, nodes);
                counters.config_reloads.fetch_add(1, Ordering::Relaxed);
                if !counters.ready.swap(true, Ordering::Relaxed) {
                    info!(version = v, "first cluster snapshot published; ready");
                }
                info!(
                    version = v,
                    generation = snap.generation,
                    services = snap.cluster.service_count(),
                    problems = snap.cluster.problems().len(),
                    "published"
                );
            }
        }
    };
    watcher.abort();
    if let Some(e) = elector
        && let Err(err) = e.await
    {
        warn!("leader election task: {err}");
    }
    result
}
