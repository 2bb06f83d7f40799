//! Integration-test support for rpclb: packet fixtures (`packet`), the network-namespace
//! lab harness (`lab`) and the agent and controller processes the lab tests run
//! (`procs`). Everything in `lab` needs root; see `lab::can_run`.

pub mod lab;
pub mod packet;
pub mod procs;
pub mod relay;
