//! Graceful restart of the userspace data path: the running proxy hands its
//! sockets (service listeners and established TCP connections) to its
//! successor over a unix socket, with SCM_RIGHTS.
//!
//! # Protocol
//!
//! The running agent listens on a `SOCK_SEQPACKET` unix socket (its
//! `--handover-socket`). A new agent connects to it before it applies its
//! first state. The old one then:
//!
//! 1. stops accepting and parks every proxied TCP connection at a byte
//!    boundary (a copy loop parks only while it waits to read, never with
//!    bytes read but not yet written, so nothing is lost or sent twice);
//! 2. sends one record per socket: a JSON header, and the socket's file
//!    descriptors as SCM_RIGHTS ancillary data (a listener: one fd; a
//!    connection: the client and the backend sockets, and which directions
//!    have already seen their EOF); then the VIP routes it owns, then `end`;
//! 3. waits for the new agent's one-byte ack, sent once it serves (its first
//!    state applied on the inherited sockets), and exits without closing
//!    any connection or removing any route.
//!
//! The new agent adopts the listeners (connections waiting in their accept
//! queues are accepted by it), resumes copying on every connection with the
//! same backend, and adopts the VIP routes. Not handed over: UDP sessions
//! (the service socket is; a session starts again on the next datagram) and
//! gRPC-mode connections (the listener is; open HTTP/2 connections are
//! closed, and clients reconnect).

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use lb_api::{Protocol, ServiceAddr};
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

/// The largest header record.
const MAX_RECORD: usize = 64 * 1024;
/// At most this many fds per record.
const MAX_FDS: usize = 2;

/// A socket taken from a predecessor, or to be given to a successor.
#[derive(Debug)]
pub enum Handed {
    /// A service's listening TCP socket, or its UDP socket.
    Listener {
        protocol: Protocol,
        addr: SocketAddr,
        fd: OwnedFd,
    },
    /// A proxied TCP connection, parked between two writes.
    Conn {
        service: ServiceAddr,
        backend: SocketAddr,
        client: OwnedFd,
        upstream: OwnedFd,
        /// The client's EOF was seen and passed on (the backend got a FIN).
        client_done: bool,
        /// The backend's EOF was seen and passed on (the client got a FIN).
        upstream_done: bool,
    },
}

/// What a new proxy takes over: its predecessor's sockets and VIP routes.
#[derive(Debug, Default)]
pub struct Inherited {
    pub(crate) listeners: HashMap<(Protocol, SocketAddr), OwnedFd>,
    pub(crate) conns: Vec<Handed>,
    pub(crate) vips: Vec<IpAddr>,
}

impl Inherited {
    pub fn listeners(&self) -> usize {
        self.listeners.len()
    }
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
    pub fn vips(&self) -> &[IpAddr] {
        &self.vips
    }
}

/// The header of one record.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Header {
    Listener {
        protocol: Protocol,
        addr: SocketAddr,
    },
    Conn {
        service: ServiceAddr,
        backend: SocketAddr,
        client_done: bool,
        upstream_done: bool,
    },
    Routes {
        vips: Vec<IpAddr>,
    },
    End,
}

/// Listens for a successor at `path` (replacing a stale socket file).
pub fn listen(path: &Path) -> io::Result<Socket> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let s = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    s.bind(&SockAddr::unix(path)?)?;
    // Only root (the agent's user) may take the sockets.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    s.listen(1)?;
    Ok(s)
}

/// Connects to a running predecessor at `path`: `Ok(None)` when there is
/// none (no socket file, or nobody listening: it was killed).
pub fn connect(path: &Path) -> io::Result<Option<Socket>> {
    let s = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    match s.connect(&SockAddr::unix(path)?) {
        Ok(()) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Sends everything to the successor on `s` (blocking), then waits up to
/// `ack_wait` for its ack. `Ok(true)`: acknowledged.
pub fn send_all(
    s: &Socket,
    items: &[Handed],
    vips: &[IpAddr],
    ack_wait: Duration,
) -> io::Result<bool> {
    for h in items {
        match h {
            Handed::Listener { protocol, addr, fd } => send(
                s,
                &Header::Listener {
                    protocol: *protocol,
                    addr: *addr,
                },
                &[fd.as_raw_fd()],
            )?,
            Handed::Conn {
                service,
                backend,
                client,
                upstream,
                client_done,
                upstream_done,
            } => send(
                s,
                &Header::Conn {
                    service: *service,
                    backend: *backend,
                    client_done: *client_done,
                    upstream_done: *upstream_done,
                },
                &[client.as_raw_fd(), upstream.as_raw_fd()],
            )?,
        }
    }
    send(
        s,
        &Header::Routes {
            vips: vips.to_vec(),
        },
        &[],
    )?;
    send(s, &Header::End, &[])?;
    s.set_read_timeout(Some(ack_wait))?;
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match s.recv(&mut b) {
        Ok(1) => Ok(true),
        Ok(_) => Ok(false),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Receives a predecessor's sockets (blocking, each record within `wait`).
pub fn receive(s: &Socket, wait: Duration) -> io::Result<Inherited> {
    s.set_read_timeout(Some(wait))?;
    let mut inh = Inherited::default();
    loop {
        let (header, mut fds) = recv(s)?;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        match header {
            Header::Listener { protocol, addr } => {
                let fd = fds.pop().ok_or_else(|| bad("a listener without its fd"))?;
                inh.listeners.insert((protocol, addr), fd);
            }
            Header::Conn {
                service,
                backend,
                client_done,
                upstream_done,
            } => {
                if fds.len() != 2 {
                    return Err(bad("a connection without its two fds"));
                }
                let upstream = fds.pop().expect("two fds");
                let client = fds.pop().expect("two fds");
                inh.conns.push(Handed::Conn {
                    service,
                    backend,
                    client,
                    upstream,
                    client_done,
                    upstream_done,
                });
            }
            Header::Routes { vips } => inh.vips = vips,
            Header::End => return Ok(inh),
        }
    }
}

/// Tells the predecessor that we serve: it exits.
pub fn ack(s: &Socket) -> io::Result<()> {
    s.send(&[1]).map(drop)
}

/// Space for `n` fds of control data.
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure computation.
    unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as u32) as usize }
}

fn send(s: &Socket, h: &Header, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(h).map_err(io::Error::other)?;
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    // u64 alignment for the cmsghdr.
    let mut control = vec![0u64; cmsg_space(MAX_FDS).div_ceil(8)];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives
    // the sendmsg call, and the cmsg fits in `control` (at most MAX_FDS fds).
    unsafe {
        let mut msg: libc::msghdr = zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            assert!(fds.len() <= MAX_FDS);
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = cmsg_space(fds.len()) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c) as *mut RawFd,
                fds.len(),
            );
        }
        if libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn recv(s: &Socket) -> io::Result<(Header, Vec<OwnedFd>)> {
    let mut body = vec![0u8; MAX_RECORD];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    let mut control = vec![0u64; cmsg_space(MAX_FDS).div_ceil(8)];
    let mut fds = Vec::new();
    // SAFETY: as in `send`; the kernel writes at most msg_controllen bytes of
    // control data, and every fd it passes is new and ours (MSG_CMSG_CLOEXEC).
    let n = unsafe {
        let mut msg: libc::msghdr = zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = cmsg_space(MAX_FDS) as _;
        let n = libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..len / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a handover record was truncated",
            ));
        }
        n as usize
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the predecessor closed the handover socket",
        ));
    }
    let h = serde_json::from_slice(&body[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((h, fds))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// Sockets cross a socketpair and still work on the other side.
    #[test]
    fn records_and_fds_cross() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        let (srv, _) = l.accept().unwrap();
        let svc = ServiceAddr {
            vip: Ipv4Addr::new(10, 96, 0, 1).into(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let items = vec![
            Handed::Listener {
                protocol: Protocol::Tcp,
                addr,
                fd: OwnedFd::from(l),
            },
            Handed::Conn {
                service: svc,
                backend: addr,
                client: OwnedFd::from(srv),
                upstream: OwnedFd::from(c.try_clone().unwrap()),
                client_done: true,
                upstream_done: false,
            },
        ];
        let t = std::thread::spawn(move || {
            let inh = receive(&b, Duration::from_secs(5)).unwrap();
            ack(&b).unwrap();
            inh
        });
        let vips = [IpAddr::from(Ipv4Addr::new(10, 96, 0, 1))];
        assert!(send_all(&a, &items, &vips, Duration::from_secs(5)).unwrap());
        drop(items);
        let mut inh = t.join().unwrap();
        assert_eq!(inh.vips, vips);
        let l = TcpListener::from(inh.listeners.remove(&(Protocol::Tcp, addr)).unwrap());
        let Some(Handed::Conn {
            service,
            client,
            client_done: true,
            upstream_done: false,
            ..
        }) = inh.conns.pop()
        else {
            panic!("one connection")
        };
        assert_eq!(service, svc);
        // The received accepted socket talks to `c`.
        let mut srv = TcpStream::from(client);
        c.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        srv.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        // The received listener accepts.
        let _c2 = TcpStream::connect(addr).unwrap();
        l.accept().unwrap();
    }
}
