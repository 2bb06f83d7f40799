//! Integration-test support for rpclb: packet fixtures (`packet`), the network-namespace
//! lab harness (`lab`) and a real Kubernetes API server (`kube`). Everything in `lab` needs
//! root; see `lab::can_run`. `kube` needs the binary `cargo xtask kube-apiserver` builds.

pub mod kube;
pub mod lab;
pub mod packet;
