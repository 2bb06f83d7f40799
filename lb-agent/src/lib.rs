//! The rpclb node agent as a library: the data-path loader and typed map
//! writer, the Maglev and weighted table builders, the config loader and the
//! controller stream client.

pub mod agent;
pub mod config;
pub mod datapath;
pub mod duration;
pub mod engines;
pub mod external;
pub mod gc;
pub mod gc6;
pub mod grpc_view;
pub mod health;
pub mod metrics;
pub mod pressure;
pub mod reconcile;
pub mod stream;
pub mod userspace;
