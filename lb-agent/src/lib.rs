//! The rpclb node agent as a library: the data-path loader and typed map
//! writer, the Maglev and weighted table builders, and the config loader.

pub mod agent;
pub mod config;
pub mod datapath;
pub mod gc;
pub mod metrics;
pub mod reconcile;
