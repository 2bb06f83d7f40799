//! The L4 proxy: TCP connections and UDP sessions on a service VIP, each to
//! one backend chosen by the service's algorithm, with the bytes copied
//! both ways. The gRPC mode (`super::grpc`) is its sibling: both read the
//! service's selection state (`super::select`) and counters
//! (`super::stats`), and neither imports the other.

pub(crate) mod tcp;
pub(crate) mod udp;
