//! The L4 proxy: TCP connections and UDP sessions on a service VIP, each to
//! one backend chosen by the service's algorithm, with the bytes copied
//! both ways. The gRPC mode (`super::grpc`) is its sibling: both read the
//! service's selection state (`super::select`) and counters
//! (`super::stats`), and neither imports the other.

pub(crate) mod tcp;
pub(crate) mod udp;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

/// How long [`retry_in_use`] tries again.
const IN_USE_WAIT: Duration = Duration::from_millis(500);
const IN_USE_STEP: Duration = Duration::from_millis(10);

/// `bind()` again while it fails with EADDRINUSE, for up to [`IN_USE_WAIT`]. A
/// service restarted in its other mode (L4 <-> gRPC) binds the address its old
/// task just closed; a child process that another thread forked and has not
/// yet exec'd holds a copy of that listener for a moment (seen under load in
/// `grpc_mode_switches_with_l4`). A real conflict fails after the wait.
pub(crate) fn retry_in_use<T>(mut bind: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let deadline = Instant::now() + IN_USE_WAIT;
    loop {
        match bind() {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(IN_USE_STEP)
            }
            r => return r,
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(addr: SocketAddr) -> io::Result<Socket> {
        let s = bound_freebind(addr, Type::STREAM, socket2::Protocol::TCP)?;
        s.listen(16)?;
        Ok(s)
    }

    /// A listener that another holder closes a moment later: the bind waits
    /// for it; one held for good fails after the wait.
    #[test]
    fn bind_waits_for_a_closing_listener() {
        let first = listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(
            listener(addr).err().map(|e| e.kind()),
            Some(io::ErrorKind::AddrInUse),
            "the premise: a second listener on the address fails at once"
        );
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(first);
        });
        let t = Instant::now();
        let second = retry_in_use(|| listener(addr)).expect("bound once the first closed");
        assert!(
            t.elapsed() >= Duration::from_millis(90),
            "{:?}",
            t.elapsed()
        );
        closer.join().unwrap();
        let t = Instant::now();
        let e = retry_in_use(|| listener(addr)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(t.elapsed() >= IN_USE_WAIT, "{:?}", t.elapsed());
        drop(second);
    }
}
