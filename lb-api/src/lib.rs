//! The desired-state model: what services a node must balance, and to which
//! backends. The controller produces it from Kubernetes, `--config` produces it
//! from a YAML file, and the agent applies it. One model, used by all.
//!
//! - [`model`]: services, backends, algorithms.
//! - [`config`]: the standalone YAML file; [`config_file`] follows one by polling.
//! - [`wire`]: the controller -> agent gRPC stream and its conversions.
//! - [`locality`]: the locality policy, resolved for one node.
//! - [`validate`]: what a valid service is, for every producer and consumer.
//! - [`tls`]: the stream's mutual TLS: files, reloads, identities, listener and connector.

pub mod config;
pub mod config_file;
pub mod errors;
pub mod locality;
pub mod model;
pub mod tls;
pub mod validate;
pub mod wire;

pub use model::*;
pub use validate::{InvalidService, Refusal};
