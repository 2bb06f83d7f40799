//! The standalone config file lives in lb-api (the controller reads it too);
//! this re-export keeps `lb_agent::config` paths working.

pub use lb_api::config::*;
