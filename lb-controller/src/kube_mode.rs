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
//! list of Services, endpoints, Nodes and Pods has been published, so a
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
        "watching Services, {source}, Nodes and Pods"
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterState;
    use k8s_openapi::api::core::v1::{Service as KubeService, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use lb_api::locality::NodeLocations;

    fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn svc(name: &str, ip: &str, traffic_distribution: Option<&str>) -> KubeService {
        KubeService {
            metadata: meta(name, &[]),
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }]),
                traffic_distribution: traffic_distribution.map(str::to_string),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn slice(service: &str, eps: &[(&str, &str)]) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            metadata: meta(service, &[(crate::translate::SERVICE_NAME_LABEL, service)]),
            ports: Some(vec![EndpointPort {
                port: Some(8080),
                ..Default::default()
            }]),
            endpoints: Some(
                eps.iter()
                    .map(|(ip, node)| Endpoint {
                        addresses: vec![ip.to_string()],
                        node_name: Some(node.to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    /// Zones from Node labels (as the watcher reads them): five nodes in
    /// three zones, one without labels.
    fn locations() -> NodeLocations {
        let label = |z: &str| {
            crate::watch::node_location(&std::collections::BTreeMap::from([
                (crate::watch::ZONE_LABEL.to_string(), z.to_string()),
                (crate::watch::REGION_LABEL.to_string(), "r1".to_string()),
            ]))
            .unwrap()
        };
        [
            ("a1", "za"),
            ("a2", "za"),
            ("a3", "za"),
            ("b1", "zb"),
            ("c1", "zc"),
        ]
        .into_iter()
        .map(|(n, z)| (n.to_string(), label(z)))
        .collect()
    }

    fn states(cluster: ClusterState) -> (NodeState, BTreeMap<String, Arc<NodeState>>) {
        let snap = ClusterSnapshot {
            generation: 1,
            nodes: vec![],
            cluster,
        };
        node_states(&snap, Timeouts::default())
    }

    #[test]
    fn one_shared_state_per_zone() {
        let services = [
            svc("web", "10.96.0.1", Some("PreferSameZone")),
            svc("db", "10.96.0.2", None),
        ];
        let slices = [
            slice("web", &[("10.244.0.1", "a1"), ("10.244.0.2", "b1")]),
            slice("db", &[("10.244.0.3", "a1")]),
        ];
        let (default, nodes) = states(ClusterState::build_with_nodes(
            &services,
            &slices,
            locations(),
        ));
        let weights = |s: &NodeState| -> Vec<u32> {
            s.state.services[0]
                .backends
                .iter()
                .map(|b| b.weight)
                .collect()
        };
        assert_eq!(weights(&default), [1, 1]);
        // Zone c has no web backend (all: the default state), and x9 no labels.
        assert_eq!(
            nodes.keys().map(String::as_str).collect::<Vec<_>>(),
            ["a1", "a2", "a3", "b1"]
        );
        assert_eq!(weights(&nodes["a1"]), [1, 0]);
        assert_eq!(weights(&nodes["b1"]), [0, 1]);
        // One Arc for the whole zone: computed once, not one copy per node.
        assert!(Arc::ptr_eq(&nodes["a1"], &nodes["a2"]));
        assert!(Arc::ptr_eq(&nodes["a1"], &nodes["a3"]));

        // No zone-dependent service: every node has the default state.
        let (_, nodes) = states(ClusterState::build_with_nodes(
            &services[1..],
            &slices[1..],
            locations(),
        ));
        assert!(nodes.is_empty());
    }
}
