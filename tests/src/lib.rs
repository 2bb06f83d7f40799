//! Integration-test support for rpclb: packet fixtures (`packet`), the gRPC test backend
//! (`grpc`) and its TLS (`tls`: test CAs and rustls configurations), the network-namespace
//! lab harness (`lab`), the agent and controller processes the lab tests run (`procs`,
//! `relay`), a real Kubernetes API server (`kube`) and the agent's capability list
//! (`privileges`). Everything in `lab` needs root; see
//! `lab::can_run`. `kube` needs the binary `cargo xtask kube-apiserver` builds.

pub mod grpc;
pub mod kube;
pub mod lab;
pub mod packet;
pub mod privileges;
pub mod procs;
pub mod relay;
pub mod tls;
