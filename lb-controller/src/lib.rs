//! The rpclb controller: watches the Kubernetes API and turns Services and
//! EndpointSlices into the desired state (`lb_api::DesiredState`) for each
//! node, then streams it to the agents.
//!
//! - [`annotations`]: the `rpclb.io/` Service annotations (algorithm,
//!   weights, Maglev table size).
//! - [`translate`]: the pure translation of Services and EndpointSlices into
//!   each node's desired state ([`node_state`], [`ClusterState`]), with the
//!   [`Problem`]s found on the way; its module docs hold the rules.
//! - [`endpoints`]: where endpoints come from: EndpointSlices, or core v1
//!   Endpoints (turned into the slices they describe), chosen at start.
//! - [`watch`]: kube-rs reflectors on Services, the endpoints, Nodes and
//!   Pods (metadata: a backend's own `rpclb.io/weight` and `rpclb.io/max`); on
//!   every change (coalesced), a new [`ClusterSnapshot`] on a
//!   `tokio::sync::watch` channel, and a Warning Event for each new problem.
//! - [`events`]: those Events, named after their problem so that each is
//!   written once, whichever replica leads.
//! - [`leader`]: leader election with a coordination.k8s.io Lease; the leader
//!   writes the Events.
//! - [`grpc`]: the stream of desired states to agents.
//! - [`http`]: `/metrics`, `/healthz` and `/readyz`.
//! - [`standalone`]: the state from a YAML file instead of Kubernetes.

pub mod annotations;
#[cfg(feature = "kube")]
pub mod endpoints;
#[cfg(feature = "kube")]
pub mod events;
pub mod grpc;
pub mod http;
#[cfg(feature = "kube")]
pub mod kube_mode;
#[cfg(feature = "kube")]
pub mod leader;
pub mod standalone;
#[cfg(feature = "kube")]
pub mod translate;
#[cfg(feature = "kube")]
pub mod watch;

pub use annotations::{AnnotationError, AnnotationProblem, ServicePolicy, parse_annotations};
#[cfg(feature = "kube")]
pub use leader::{LeaderElector, LeaseConfig};
#[cfg(feature = "kube")]
pub use translate::{
    ClusterState, PodRef, Pods, Problem, ProblemKind, ServiceRef, Subject, Translation, node_state,
};
#[cfg(feature = "kube")]
pub use watch::{ClusterSnapshot, SnapshotReceiver, SnapshotSender, WatchConfig};
