//! Interface queries and offload settings by ioctl. They act on the calling thread's network
//! namespace, so call them inside `Netns::run`. The offload knobs are the legacy ethtool
//! ioctls behind `ethtool -K <if> tx|gro on|off`, so the lab needs no ethtool binary.

use crate::packet::Mac;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const ETHTOOL_GTXCSUM: u32 = 0x16;
pub const ETHTOOL_STXCSUM: u32 = 0x17;
pub const ETHTOOL_GTSO: u32 = 0x1e;
pub const ETHTOOL_GGRO: u32 = 0x2b;
pub const ETHTOOL_SGRO: u32 = 0x2c;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned on success.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad ifname {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(ifr)
}

fn ioctl(req: libc::c_ulong, ifr: &mut libc::ifreq) -> io::Result<()> {
    let s = socket()?;
    // SAFETY: ifr is a valid ifreq for this request and outlives the call.
    if unsafe { libc::ioctl(s.as_raw_fd(), req, ifr as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

pub fn mac(name: &str) -> io::Result<Mac> {
    let mut ifr = ifreq(name)?;
    ioctl(libc::SIOCGIFHWADDR, &mut ifr)?;
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    Ok(std::array::from_fn(|i| sa.sa_data[i] as u8))
}

fn ethtool(name: &str, cmd: u32, data: u32) -> io::Result<u32> {
    let mut v = EthtoolValue { cmd, data };
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
    ioctl(libc::SIOCETHTOOL, &mut ifr)?;
    Ok(v.data)
}

/// Read one legacy ethtool feature (`ETHTOOL_G*`).
pub fn ethtool_get(name: &str, cmd: u32) -> io::Result<bool> {
    ethtool(name, cmd, 0).map(|d| d != 0)
}

/// Set one legacy ethtool feature (`ETHTOOL_S*`).
pub fn ethtool_set(name: &str, cmd: u32, on: bool) -> io::Result<()> {
    ethtool(name, cmd, on.into()).map(drop)
}

/// The offloads the lab cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    pub tx_csum: bool,
    pub tso: bool,
    pub gro: bool,
}

pub fn offloads(name: &str) -> io::Result<Offloads> {
    Ok(Offloads {
        tx_csum: ethtool_get(name, ETHTOOL_GTXCSUM)?,
        tso: ethtool_get(name, ETHTOOL_GTSO)?,
        gro: ethtool_get(name, ETHTOOL_GGRO)?,
    })
}
