//! `local <vip>/32 dev lo table local proto 114` routes over a raw rtnetlink
//! socket: with one, the kernel delivers packets for the VIP to local sockets
//! (the proxy's listeners) instead of forwarding them, and lets those sockets
//! send from the VIP.
//!
//! A netlink socket belongs to the network namespace it was opened in, so a
//! [`RouteSocket`] changes that namespace's routes whichever thread uses it.
//! Routes carry their own protocol number ([`ROUTE_PROTOCOL`]), so that
//! deleting one never removes a route someone else made for the same address,
//! and leftovers of a crashed proxy can be found and removed.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The `proto` of the routes the proxy adds (`ip route show table local proto 114`).
pub const ROUTE_PROTOCOL: u8 = 114;
/// `lo` is ifindex 1 in every network namespace (`LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;

// linux/netlink.h, linux/rtnetlink.h.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_TABLE_LOCAL: u8 = 255;
const RT_SCOPE_HOST: u8 = 254;
const RT_SCOPE_NOWHERE: u8 = 255;
const RTN_LOCAL: u8 = 2;
const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;

/// An rtnetlink socket, bound to the namespace it was opened in.
#[derive(Debug)]
pub(crate) struct RouteSocket {
    fd: OwnedFd,
    seq: u32,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl RouteSocket {
    /// Opens a socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(last_err());
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is valid.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid fd and address of the right size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(last_err());
        }
        // Never wait for the kernel forever: 5 s.
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: valid fd, option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(last_err());
        }
        Ok(RouteSocket { fd, seq: 0 })
    }

    /// Adds the VIP's local route. `Ok(false)`: a local route for it existed
    /// already (ours from before, or an address of the node), left alone.
    pub(crate) fn add_local(&mut self, vip: IpAddr) -> io::Result<bool> {
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let rtm = rtmsg(vip, RT_SCOPE_HOST);
        let oif = LOOPBACK_IFINDEX.to_ne_bytes();
        let attrs: [(u16, &[u8]); 2] = [(RTA_DST, &octets(&vip)), (RTA_OIF, &oif)];
        match self.request(RTM_NEWROUTE, flags, &rtm, &attrs) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes the VIP's local route if it is one of ours; `Ok(false)` if
    /// there was none.
    pub(crate) fn del_local(&mut self, vip: IpAddr) -> io::Result<bool> {
        // Scope "nowhere" matches any scope; the protocol must be ours.
        let rtm = rtmsg(vip, RT_SCOPE_NOWHERE);
        let attrs: [(u16, &[u8]); 1] = [(RTA_DST, &octets(&vip))];
        match self.request(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, &rtm, &attrs) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The VIPs (IPv4 and IPv6) that have one of our local routes.
    pub(crate) fn list_local(&mut self) -> io::Result<Vec<IpAddr>> {
        let mut found = self.list_family(libc::AF_INET)?;
        found.extend(self.list_family(libc::AF_INET6)?);
        Ok(found)
    }

    fn list_family(&mut self, family: libc::c_int) -> io::Result<Vec<IpAddr>> {
        let mut rtm = [0u8; RTMSG_LEN];
        rtm[0] = family as u8;
        let seq = self.send(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, &rtm, &[])?;
        let mut found = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        // A dump ends with NLMSG_DONE; bound the reads anyway.
        for _ in 0..100_000 {
            let n = self.recv(&mut buf)?;
            for (ty, flags, mseq, payload) in messages(&buf[..n]) {
                if mseq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(found),
                    NLMSG_ERROR => {
                        error_code(payload)?;
                        return Ok(found);
                    }
                    RTM_NEWROUTE => found.extend(ours(payload)),
                    _ => {}
                }
                if flags & NLM_F_MULTI == 0 {
                    return Ok(found);
                }
            }
        }
        Err(io::Error::other("route dump did not end"))
    }

    fn send(&mut self, ty: u16, flags: u16, rtm: &[u8], attrs: &[(u16, &[u8])]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        msg.extend_from_slice(rtm);
        for (aty, data) in attrs {
            let len = 4 + data.len();
            msg.extend_from_slice(&(len as u16).to_ne_bytes());
            msg.extend_from_slice(&aty.to_ne_bytes());
            msg.extend_from_slice(data);
            msg.resize(align4(msg.len()), 0);
        }
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: sockaddr_nl is plain data; all-zero (pid 0) is the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid fd, buffer and address.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(last_err());
        }
        Ok(self.seq)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: valid fd and buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = last_err();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends a request and waits for its acknowledgement.
    fn request(
        &mut self,
        ty: u16,
        flags: u16,
        rtm: &[u8],
        attrs: &[(u16, &[u8])],
    ) -> io::Result<()> {
        let seq = self.send(ty, flags, rtm, attrs)?;
        let mut buf = vec![0u8; 8192];
        for _ in 0..1000 {
            let n = self.recv(&mut buf)?;
            for (mty, _, mseq, payload) in messages(&buf[..n]) {
                if mty == NLMSG_ERROR && mseq == seq {
                    return error_code(payload);
                }
            }
        }
        Err(io::Error::other("no netlink acknowledgement"))
    }
}

/// An address's bytes, as RTA_DST carries them.
fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The rtmsg of our routes: IPv4 /32 or IPv6 /128, table local, our
/// protocol, type local.
fn rtmsg(vip: IpAddr, scope: u8) -> [u8; RTMSG_LEN] {
    let mut m = [0u8; RTMSG_LEN];
    let (family, len) = match vip {
        IpAddr::V4(_) => (libc::AF_INET, 32),
        IpAddr::V6(_) => (libc::AF_INET6, 128),
    };
    m[0] = family as u8;
    m[1] = len; // dst_len
    m[4] = RT_TABLE_LOCAL;
    m[5] = ROUTE_PROTOCOL;
    m[6] = scope;
    m[7] = RTN_LOCAL;
    m
}

/// `(type, flags, seq, payload)` of each well-formed message in `buf`.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let h = buf.get(off..off + NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes(h[0..4].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(h[4..6].try_into().ok()?);
        let flags = u16::from_ne_bytes(h[6..8].try_into().ok()?);
        let seq = u32::from_ne_bytes(h[8..12].try_into().ok()?);
        if len < NLMSG_HDRLEN {
            return None;
        }
        let payload = buf.get(off + NLMSG_HDRLEN..off + len)?;
        off += align4(len);
        Some((ty, flags, seq, payload))
    })
}

/// An NLMSG_ERROR payload: 0 is an acknowledgement, else `-errno`.
fn error_code(payload: &[u8]) -> io::Result<()> {
    let code = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .ok_or_else(|| io::Error::other("short netlink error message"))?;
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    }
}

/// The destination of an RTM_NEWROUTE payload if it is one of our routes.
fn ours(payload: &[u8]) -> Option<IpAddr> {
    let rtm = payload.get(..RTMSG_LEN)?;
    let (family, dst_len, mut table, proto, ty) =
        (rtm[0], rtm[1], u32::from(rtm[4]), rtm[5], rtm[7]);
    let full = match i32::from(family) {
        libc::AF_INET => 32,
        libc::AF_INET6 => 128,
        _ => return None,
    };
    if dst_len != full || proto != ROUTE_PROTOCOL || ty != RTN_LOCAL {
        return None;
    }
    let mut dst = None;
    let mut off = RTMSG_LEN;
    while let Some(h) = payload.get(off..off + 4) {
        let len = usize::from(u16::from_ne_bytes([h[0], h[1]]));
        let aty = u16::from_ne_bytes([h[2], h[3]]);
        if len < 4 {
            break;
        }
        let data = payload.get(off + 4..off + len)?;
        match (aty, data.len()) {
            (RTA_DST, 4) if full == 32 => {
                dst = Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]).into())
            }
            (RTA_DST, 16) if full == 128 => {
                dst = <[u8; 16]>::try_from(data)
                    .ok()
                    .map(|a| Ipv6Addr::from(a).into())
            }
            (RTA_TABLE, 4) => table = u32::from_ne_bytes(data.try_into().ok()?),
            _ => {}
        }
        off += align4(len);
    }
    (table == u32::from(RT_TABLE_LOCAL))
        .then_some(dst)
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(proto: u8, table: u8, dst: IpAddr) -> Vec<u8> {
        let mut m = rtmsg(dst, RT_SCOPE_HOST).to_vec();
        m[4] = table;
        m[5] = proto;
        let dst = octets(&dst);
        m.extend_from_slice(&(4 + dst.len() as u16).to_ne_bytes());
        m.extend_from_slice(&RTA_DST.to_ne_bytes());
        m.extend_from_slice(&dst);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&RTA_TABLE.to_ne_bytes());
        m.extend_from_slice(&u32::from(table).to_ne_bytes());
        m
    }

    #[test]
    fn parses_only_our_local_routes() {
        let vip: IpAddr = Ipv4Addr::new(10, 96, 0, 10).into();
        let vip6: IpAddr = "fd00:10:96::10".parse().unwrap();
        assert_eq!(ours(&route(ROUTE_PROTOCOL, 255, vip)), Some(vip));
        assert_eq!(ours(&route(ROUTE_PROTOCOL, 255, vip6)), Some(vip6));
        assert_eq!(ours(&route(2, 255, vip)), None, "kernel's own");
        assert_eq!(ours(&route(2, 255, vip6)), None, "kernel's own");
        assert_eq!(ours(&route(ROUTE_PROTOCOL, 254, vip)), None, "main table");
        // Truncated or garbled input is ignored, never a panic.
        let full = route(ROUTE_PROTOCOL, 255, vip);
        for cut in 0..full.len() {
            let _ = ours(&full[..cut]);
        }
        let mut bad = full.clone();
        bad[RTMSG_LEN] = 200; // attribute longer than the message
        assert_eq!(ours(&bad), None);
    }

    #[test]
    fn splits_messages_and_reads_errors() {
        let mut buf = Vec::new();
        for (ty, code) in [(NLMSG_ERROR, 0i32), (NLMSG_ERROR, -libc::EEXIST)] {
            buf.extend_from_slice(&(NLMSG_HDRLEN as u32 + 4).to_ne_bytes());
            buf.extend_from_slice(&ty.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&7u32.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&code.to_ne_bytes());
        }
        let m: Vec<_> = messages(&buf).collect();
        assert_eq!(m.len(), 2);
        assert!(error_code(m[0].3).is_ok());
        assert_eq!(
            error_code(m[1].3).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        assert!(error_code(&[1]).is_err());
        // A header that claims to be shorter than itself ends the walk.
        let mut bad = buf.clone();
        bad[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(messages(&bad).count(), 0);
        assert_eq!(messages(&buf[..10]).count(), 0);
    }
}
