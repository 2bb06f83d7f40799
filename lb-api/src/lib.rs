//! The desired-state model: what services a node must balance, and to which
//! backends. The controller produces it from Kubernetes, `--config` produces it
//! from a YAML file, and the agent applies it. One model, used by all.

pub mod model;

pub use model::*;
