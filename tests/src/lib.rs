//! Integration-test support for rpclb: packet fixtures (`packet`) and the network-namespace
//! lab harness (`lab`). Everything in `lab` needs root; see `lab::can_run`.

pub mod lab;
pub mod packet;
