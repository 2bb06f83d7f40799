//! The desired-state model: what services a node must balance, and to which
//! backends. The controller produces it from Kubernetes, `--config` produces it
//! from a YAML file, and the agent applies it. One model, used by all.
//!
//! - [`model`]: services, backends, algorithms.
//! - [`config`]: the standalone YAML file.
//! - [`wire`]: the controller -> agent gRPC stream and its conversions.
//! - [`maglev_size`]: Maglev table size rules.

pub mod config;
pub mod errors;
pub mod maglev_size;
pub mod model;
pub mod wire;

pub use model::*;
