//! Where and how the programs attach: `Datapath::attach` (one interface,
//! one mode, pinned link, atomic program swap on a restart) and the agent's
//! policy over all its interfaces ([`attach_all`], [`ModeChoice`]), and the
//! check made before loading that the pin path is on bpffs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::xdp::XdpLink;
use aya::programs::{LinkOrder, TcAttachType, XdpMode};
use tracing::{info, warn};

use super::{AttachMode, Datapath, DatapathError};

/// How the agent attaches its programs (`--mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeChoice {
    /// TC on virtual devices (veth, ...); native (driver) XDP on physical
    /// ones where the driver supports it, else TC. On a restart, an interface
    /// keeps the kind of link pinned for it.
    Auto,
    Fixed(AttachMode),
}

impl Datapath {
    fn link_path(&self, iface: &str, mode: AttachMode) -> PathBuf {
        let kind = if mode == AttachMode::Tc { "tc" } else { "xdp" };
        // bpffs refuses names with dots, which interface names may have (VLANs).
        self.pin_path
            .join("links")
            .join(format!("{kind}_{}", iface.replace('.', "_")))
    }

    /// Attaches to `iface` (in the calling thread's network namespace) and pins
    /// the link. If a pinned link exists (a restart), its program is swapped
    /// atomically for this one; traffic never sees a gap.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), DatapathError> {
        let path = self.link_path(iface, mode);
        let dir = path.parent().expect("links dir");
        std::fs::create_dir_all(dir).map_err(|source| DatapathError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let attach_err = |source| DatapathError::Attach {
            iface: iface.to_string(),
            mode: mode.as_str(),
            source: Box::new(source),
        };
        let link_err = |source| DatapathError::Link {
            path: path.clone(),
            source: Box::new(source),
        };
        let existing = match PinnedLink::from_pin(&path) {
            Ok(l) => Some(FdLink::from(l)),
            Err(_) => None,
        };
        let reused = existing.is_some();
        let fd_link: FdLink = if mode == AttachMode::Tc {
            let p = self.tc_program();
            let id = match existing {
                Some(l) => p
                    .attach_to_link(SchedClassifierLink::try_from(l).map_err(link_err)?)
                    .map_err(attach_err)?,
                None => p
                    .attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(attach_err)?,
            };
            let link = p.take_link(id).map_err(attach_err)?;
            FdLink::try_from(link).map_err(link_err)?
        } else {
            let xmode = if mode == AttachMode::XdpGeneric {
                XdpMode::Skb
            } else {
                XdpMode::default()
            };
            let p = self.xdp_program();
            let id = match existing {
                Some(l) => p
                    .attach_to_link(XdpLink::try_from(l).map_err(link_err)?)
                    .map_err(attach_err)?,
                None => p.attach(iface, xmode).map_err(attach_err)?,
            };
            let link = p.take_link(id).map_err(attach_err)?;
            FdLink::try_from(link).map_err(link_err)?
        };
        if reused {
            // The pin still refers to the same link; dropping our fd keeps it.
            drop(fd_link);
        } else {
            fd_link.pin(&path).map_err(|source| DatapathError::Pin {
                path: path.clone(),
                source: Box::new(source),
            })?;
        }
        info!(iface, mode = mode.as_str(), reused, "attached");
        Ok(())
    }
}

/// The pinned link's file name; the same scheme as `Datapath::attach`
/// (bpffs refuses dots, which VLAN interface names have).
pub fn link_name(mode: AttachMode, iface: &str) -> String {
    let kind = if mode == AttachMode::Tc { "tc" } else { "xdp" };
    format!("{kind}_{}", iface.replace('.', "_"))
}

/// Native XDP only (no silent generic fallback), pinned like
/// [`Datapath::attach`] pins it. `Ok(false)`: the driver (or kernel) refused
/// native XDP.
fn attach_native_xdp(dp: &mut Datapath, iface: &str) -> Result<bool, DatapathError> {
    let links = dp.pin_path().join("links");
    std::fs::create_dir_all(&links).map_err(|source| DatapathError::Io {
        path: links.clone(),
        source,
    })?;
    let path = links.join(link_name(AttachMode::Xdp, iface));
    let attach_err = |source| DatapathError::Attach {
        iface: iface.to_string(),
        mode: "xdp (native)",
        source: Box::new(source),
    };
    let p = dp.xdp_program();
    let id = match p.attach(iface, XdpMode::Driver) {
        Ok(id) => id,
        Err(e) => {
            warn!(iface, "native XDP unavailable ({}); using TC", one_line(&e));
            return Ok(false);
        }
    };
    let link = p.take_link(id).map_err(attach_err)?;
    let fd = FdLink::try_from(link).map_err(|source| DatapathError::Link {
        path: path.clone(),
        source: Box::new(source),
    })?;
    fd.pin(&path).map_err(|source| DatapathError::Pin {
        path: path.clone(),
        source: Box::new(source),
    })?;
    info!(iface, mode = "xdp (native)", reused = false, "attached");
    Ok(true)
}

fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    lb_api::errors::one_line(std::iter::successors(Some(e), |e| e.source()))
}

fn on(iface: &str) -> impl FnOnce(DatapathError) -> DatapathError + '_ {
    move |e| DatapathError::Interface {
        iface: iface.to_string(),
        source: Box::new(e),
    }
}

/// A device without a `device` link in sysfs is virtual (veth, bridge,
/// dummy, ...). Unknown names count as physical, so auto mode tries XDP.
fn is_virtual(iface: &str) -> bool {
    let dir = Path::new("/sys/class/net").join(iface);
    dir.exists() && !dir.join("device").exists()
}

/// Attaches to every interface, then drops links a previous run left on
/// interfaces (or in modes) that are no longer asked for.
pub fn attach_all(
    dp: &mut Datapath,
    ifaces: &[String],
    mode: ModeChoice,
) -> Result<Vec<String>, DatapathError> {
    let links = dp.pin_path().join("links");
    let mut keep = HashSet::new();
    let mut done = Vec::new();
    for iface in ifaces {
        let pinned = |m| links.join(link_name(m, iface)).exists();
        let m = match mode {
            ModeChoice::Fixed(m) => {
                dp.attach(iface, m).map_err(on(iface))?;
                m
            }
            // A restart keeps the kind of link it finds, swapping the program in place.
            ModeChoice::Auto if pinned(AttachMode::Tc) || pinned(AttachMode::Xdp) => {
                let m = if pinned(AttachMode::Tc) {
                    AttachMode::Tc
                } else {
                    AttachMode::Xdp
                };
                dp.attach(iface, m).map_err(on(iface))?;
                m
            }
            // Virtual devices (veth, bridges, ...) get TC: native XDP on a veth
            // copies every skb into a page first, which made it slower than TC
            // in the lab (docs/benchmarks.md, section 4).
            ModeChoice::Auto if is_virtual(iface) => {
                dp.attach(iface, AttachMode::Tc).map_err(on(iface))?;
                AttachMode::Tc
            }
            ModeChoice::Auto => {
                if attach_native_xdp(dp, iface).map_err(on(iface))? {
                    AttachMode::Xdp
                } else {
                    dp.attach(iface, AttachMode::Tc).map_err(on(iface))?;
                    AttachMode::Tc
                }
            }
        };
        keep.insert(link_name(m, iface));
        done.push(format!("{iface}:{}", m.as_str()));
    }
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            match std::fs::remove_file(e.path()) {
                Ok(()) => info!(link = %name, "detached a link no longer asked for"),
                Err(err) => warn!(link = %name, "cannot remove stale link: {err}"),
            }
        }
    }
    Ok(done)
}

/// Refuses a pin path that is not on bpffs: pins elsewhere fail, or (under
/// `ip netns exec`, which remounts /sys) silently vanish with the process.
pub fn check_bpffs(pin: &Path) -> Result<(), DatapathError> {
    const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
    let mut p = pin;
    while !p.exists() {
        match p.parent() {
            Some(q) => p = q,
            None => return Ok(()),
        }
    }
    let io = |source| DatapathError::Io {
        path: p.to_path_buf(),
        source,
    };
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path contains a NUL byte",
        ))
    })?;
    // SAFETY: statfs fills the zeroed struct; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    if (st.f_type as u64) & 0xffff_ffff != BPF_FS_MAGIC {
        return Err(DatapathError::NotBpffs {
            pin: pin.to_path_buf(),
            on: p.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_match_the_datapath_scheme() {
        assert_eq!(link_name(AttachMode::Tc, "eth0.100"), "tc_eth0_100");
        assert_eq!(link_name(AttachMode::XdpGeneric, "veth1"), "xdp_veth1");
    }

    #[test]
    fn bpffs_check_refuses_other_filesystems() {
        let e = check_bpffs(Path::new("/proc/self/rpclb-test")).unwrap_err();
        assert!(e.to_string().contains("not on a bpffs mount"), "{e}");
    }
}
