//! The L4 proxy: TCP connections and UDP sessions on a service VIP, each to
//! one backend chosen by the service's algorithm, with the bytes copied
//! both ways. The gRPC mode (`super::grpc`) is its sibling: both read the
//! service's selection state (`super::select`) and counters
//! (`super::stats`), and neither imports the other.

pub(crate) mod tcp;
pub(crate) mod udp;

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

/// A non-blocking socket bound to `addr`, which need not be a local address
/// yet (IP_FREEBIND), with SO_REUSEADDR.
fn bound_freebind(addr: SocketAddr, ty: Type, proto: socket2::Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => s.set_freebind_v4(true)?,
        SocketAddr::V6(_) => s.set_freebind_v6(true)?,
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}
