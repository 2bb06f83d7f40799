//! The rpclb controller: watches the Kubernetes API and turns Services and
//! EndpointSlices into the desired state (`lb_api::DesiredState`) for each
//! node, then streams it to the agents.
//!
//! For now this crate holds the pure parts that need no cluster. The kube-rs
//! watchers (Services, EndpointSlices, Nodes), the model builder, the gRPC
//! stream to agents and leader election arrive with the controller issue.
//!
//! - [`annotations`]: the `rpclb.io/` Service annotations (algorithm,
//!   weights, Maglev table size).

pub mod annotations;

pub use annotations::{AnnotationError, AnnotationProblem, ServicePolicy, parse_annotations};
