//! Where and how the programs attach: `Datapath::attach` (one interface, one
//! mode, a link that outlives the agent, an atomic program swap on a
//! restart) and the agent's policy over all its interfaces ([`attach_all`],
//! [`ModeChoice`]), and the check made before loading that the pin path is
//! on bpffs.
//!
//! # TC: TCX links, or netlink filters
//! TC attaches as a TCX link (`bpf_link`, Linux 6.6+) where the kernel has
//! TCX, else as a direct-action `cls_bpf` filter on the `clsact` qdisc over
//! netlink (any kernel rpclb supports). [`TcAttach`] chooses (`--tc-attach`):
//! `auto` tries TCX and falls back to netlink with a warning naming the
//! reason.
//!
//! Both outlive the agent, so traffic flows while it is down: a TCX link is
//! pinned under `links/tc_<iface>`; a netlink filter belongs to the qdisc,
//! not to a file descriptor, so it stays by itself. rpclb's filter always has
//! priority [`TC_PRIORITY`] and handle [`TC_HANDLE`], and an empty directory
//! `links/tcnl_<hex of the interface name>` on bpffs marks it (bpffs holds
//! directories, not files). On a restart the program inside is replaced
//! atomically (a netlink replace of that priority and handle), as a TCX
//! link's is; cleanup and a change of mode delete the filter and its marker.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, Link, PinnedLink};
use aya::programs::tc::{
    NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle, qdisc_add_clsact,
};
use aya::programs::xdp::XdpLink;
use aya::programs::{LinkOrder, TcAttachType, XdpMode};
use lb_common::xdp_iface;
use tracing::{info, warn};

use super::{AttachMode, Datapath, DatapathError, ProgramLoading};

/// How the agent attaches its programs (`--mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeChoice {
    /// TC on virtual devices (veth, ...); native (driver) XDP on physical
    /// ones where the driver supports it, else TC. On a restart, an interface
    /// keeps the kind of link it has.
    Auto,
    Fixed(AttachMode),
}

/// How TC attaches (`--tc-attach`; see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttach {
    /// TCX where the kernel has it, else a netlink filter.
    #[default]
    Auto,
    Tcx,
    Netlink,
}

impl std::str::FromStr for TcAttach {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(TcAttach::Auto),
            "tcx" => Ok(TcAttach::Tcx),
            "netlink" => Ok(TcAttach::Netlink),
            _ => Err(format!(
                "unknown TC attach {s:?} (expected auto, tcx or netlink)"
            )),
        }
    }
}

/// The netlink filter's priority (lower runs first; `tc` starts at 49152).
pub const TC_PRIORITY: u16 = 0x5200;
/// The netlink filter's handle ("RP" "LB").
pub const TC_HANDLE: TcHandle = TcHandle::new(0x5250, 0x4c42);

/// What one interface got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub iface: String,
    pub mode: AttachMode,
    /// `xdp` (native or the driver's default), `xdp-generic`, `tcx` or
    /// `tc-netlink`.
    pub how: &'static str,
    /// The link (or filter) was there already and got the new program.
    pub reused: bool,
    /// Why this is not what was tried first, if it is not.
    pub fallback: Option<String>,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.iface, self.how)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The marker directory of rpclb's netlink TC filter on `iface`.
pub fn netlink_marker(iface: &str) -> String {
    let hex: String = iface.bytes().map(|b| format!("{b:02x}")).collect();
    format!("tcnl_{hex}")
}

/// The interface a netlink marker names.
fn marker_iface(name: &str) -> Option<String> {
    let hex = name.strip_prefix("tcnl_")?;
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Deletes rpclb's netlink TC filter on `iface` (gone already: fine).
fn detach_netlink(iface: &str) -> Result<(), DatapathError> {
    let link =
        SchedClassifierLink::attached(iface, TcAttachType::Ingress, TC_PRIORITY, TC_HANDLE, None);
    match link {
        // The interface is gone, and its filters with it.
        Err(_) => Ok(()),
        Ok(l) => match l.detach() {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(DatapathError::Attach {
                iface: iface.to_string(),
                mode: "tc-netlink",
                source: Box::new(source),
            }),
        },
    }
}

fn is_not_found(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if let Some(io) = x.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENODEV))
        {
            return true;
        }
        cur = x.source();
    }
    let s = e.to_string();
    s.contains("No such file") || s.contains("No such device")
}

/// Removes what `links/<name>` stands for: a pinned link (unpinning it
/// detaches it) or a netlink marker (the filter is deleted first).
pub(super) fn remove_link(links: &Path, name: &str) -> Result<(), DatapathError> {
    let p = links.join(name);
    if let Some(iface) = marker_iface(name) {
        detach_netlink(&iface)?;
        return std::fs::remove_dir(&p).map_err(io_err(&p));
    }
    std::fs::remove_file(&p).map_err(io_err(&p))
}

impl Datapath {
    fn link_path(&self, iface: &str, mode: AttachMode) -> PathBuf {
        self.pin_path.join("links").join(link_name(mode, iface))
    }

    /// Attaches to `iface` (in the calling thread's network namespace) so
    /// that the attachment outlives the agent. If one exists (a restart), its
    /// program is swapped atomically for this one; traffic never sees a gap.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, DatapathError> {
        let a = self.attach_unmarked(iface, mode)?;
        self.mark_xdp(&a)?;
        Ok(a)
    }

    /// Records in `XDP_IFACES` what native XDP may do with `a`'s interface
    /// (see `lb_common::xdp_iface`): a physical NIC running native XDP and
    /// the interfaces of `--xdp-redirect-to` take redirected XDP frames;
    /// generic XDP may redirect anywhere. Everything else gets translated
    /// packets through the stack (`pass_xdp_target`), never a black hole.
    pub(super) fn mark_xdp(&mut self, a: &Attached) -> Result<(), DatapathError> {
        let Some(ifindex) = ifindex(&a.iface) else {
            return Ok(());
        };
        let mut flags = match a.how {
            "xdp-generic" => xdp_iface::GENERIC,
            "xdp" if !is_virtual(&a.iface) => xdp_iface::REDIRECT_TARGET,
            _ => 0,
        };
        if self.xdp_redirect_to.iter().any(|n| n == &a.iface) {
            flags |= xdp_iface::REDIRECT_TARGET;
        } else if a.how == "xdp" && flags == 0 {
            info!(
                iface = %a.iface,
                "native XDP on a virtual device: packets routed into it go through the stack \
                 (--xdp-redirect-to if its peer takes XDP frames)"
            );
        }
        self.writer().set_xdp_iface(ifindex, flags)?;
        self.xdp_marks.insert(ifindex, flags);
        Ok(())
    }

    /// Makes `XDP_IFACES` hold the marks of this process's attachments and
    /// the `--xdp-redirect-to` interfaces, and nothing a previous run left.
    pub fn sync_xdp_ifaces(&mut self) -> Result<(), DatapathError> {
        let mut want = self.xdp_marks.clone();
        for name in &self.xdp_redirect_to {
            match ifindex(name) {
                Some(i) => *want.entry(i).or_default() |= xdp_iface::REDIRECT_TARGET,
                None => warn!(iface = %name, "--xdp-redirect-to: no such interface"),
            }
        }
        want.retain(|_, f| *f != 0);
        self.writer().sync_xdp_ifaces(&want)
    }

    fn attach_unmarked(
        &mut self,
        iface: &str,
        mode: AttachMode,
    ) -> Result<Attached, DatapathError> {
        let dir = self.pin_path.join("links");
        super::pin::create_private_dir(&dir).map_err(io_err(&dir))?;
        if mode == AttachMode::Tc {
            return self.attach_tc(iface);
        }
        let path = self.link_path(iface, mode);
        let attach_err = |source| DatapathError::Attach {
            iface: iface.to_string(),
            mode: mode.as_str(),
            source: Box::new(source),
        };
        let link_err = |source| DatapathError::Link {
            path: path.clone(),
            source: Box::new(source),
        };
        let existing = PinnedLink::from_pin(&path).ok().map(FdLink::from);
        let reused = existing.is_some();
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
        let fd_link = FdLink::try_from(link).map_err(link_err)?;
        self.keep_link(fd_link, &path, reused)?;
        info!(iface, mode = mode.as_str(), reused, "attached");
        Ok(Attached {
            iface: iface.to_string(),
            mode,
            how: mode.as_str(),
            reused,
            fallback: None,
        })
    }

    /// Pins a new link (a reused one is pinned already; dropping our fd
    /// keeps it).
    fn keep_link(&self, fd_link: FdLink, path: &Path, reused: bool) -> Result<(), DatapathError> {
        if !reused {
            fd_link.pin(path).map_err(|source| DatapathError::Pin {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    /// TC: the TCX link or netlink filter there is (a restart), else a new
    /// one as [`TcAttach`] says.
    fn attach_tc(&mut self, iface: &str) -> Result<Attached, DatapathError> {
        let links = self.pin_path.join("links");
        let tcx_path = links.join(link_name(AttachMode::Tc, iface));
        let marker = links.join(netlink_marker(iface));
        let done = |how, reused, fallback| {
            info!(iface, mode = how, reused, "attached");
            Attached {
                iface: iface.to_string(),
                mode: AttachMode::Tc,
                how,
                reused,
                fallback,
            }
        };
        if let Ok(pinned) = PinnedLink::from_pin(&tcx_path) {
            let link_err = |source| DatapathError::Link {
                path: tcx_path.clone(),
                source: Box::new(source),
            };
            let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
            let p = self.tc_program();
            let id = p
                .attach_to_link(link)
                .map_err(|source| DatapathError::Attach {
                    iface: iface.to_string(),
                    mode: "tcx",
                    source: Box::new(source),
                })?;
            // The pin still refers to the link.
            drop(p.take_link(id));
            return Ok(done("tcx", true, None));
        }
        if marker.is_dir() {
            let reused = self.attach_netlink(iface, true)?;
            return Ok(done("tc-netlink", reused, None));
        }
        let tcx_err = match self.tc_attach {
            TcAttach::Netlink => None,
            TcAttach::Tcx | TcAttach::Auto => match self.attach_tcx(iface, &tcx_path) {
                Ok(()) => return Ok(done("tcx", false, None)),
                Err(e) if self.tc_attach == TcAttach::Tcx => return Err(e),
                Err(e) => Some(e),
            },
        };
        self.attach_netlink(iface, false)?;
        super::pin::create_private_dir(&marker).map_err(io_err(&marker))?;
        let why = tcx_err.map(|e| {
            let why = format!(
                "TCX unavailable ({}); TC attached as a netlink filter",
                one_line(&e)
            );
            warn!(iface, "{why}");
            why
        });
        Ok(done("tc-netlink", false, why))
    }

    fn attach_tcx(&mut self, iface: &str, path: &Path) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach {
            iface: iface.to_string(),
            mode: "tcx",
            source: Box::new(source),
        };
        let p = self.tc_program();
        let id = p
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err)?;
        let link = p.take_link(id).map_err(attach_err)?;
        let fd = FdLink::try_from(link).map_err(|source| DatapathError::Link {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        self.keep_link(fd, path, false)
    }

    /// Replaces the program in rpclb's netlink filter on `iface`, or creates
    /// the filter (and the clsact qdisc). Returns whether one was there.
    fn attach_netlink(&mut self, iface: &str, try_replace: bool) -> Result<bool, DatapathError> {
        let attach_err = |source| DatapathError::Attach {
            iface: iface.to_string(),
            mode: "tc-netlink",
            source: Box::new(source),
        };
        let p = self.tc_program();
        if try_replace
            && let Ok(existing) = SchedClassifierLink::attached(
                iface,
                TcAttachType::Ingress,
                TC_PRIORITY,
                TC_HANDLE,
                None,
            )
            && let Ok(id) = p.attach_to_link(existing)
        {
            keep_filter(p.take_link(id));
            return Ok(true);
        }
        // The qdisc may exist already (ours, or someone else's clsact).
        if let Err(e) = qdisc_add_clsact(iface) {
            let exists = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .is_some_and(|io| io.raw_os_error() == Some(libc::EEXIST))
                || e.to_string().contains("File exists");
            if !exists {
                return Err(attach_err(e.into()));
            }
        }
        let id = p
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: TC_PRIORITY,
                    handle: TC_HANDLE,
                    classid: None,
                }),
            )
            .map_err(attach_err)?;
        keep_filter(p.take_link(id));
        Ok(false)
    }
}

/// A netlink filter belongs to its qdisc and must outlive the agent, but
/// aya deletes it when its link value is dropped: forget the value.
fn keep_filter<T>(link: Result<T, aya::programs::ProgramError>) {
    if let Ok(l) = link {
        std::mem::forget(l);
    }
}

/// The pinned link's (or marker's) file name for TCX and XDP links; the
/// same scheme as `Datapath::attach` (bpffs refuses dots, which VLAN
/// interface names have).
pub fn link_name(mode: AttachMode, iface: &str) -> String {
    let kind = if mode == AttachMode::Tc { "tc" } else { "xdp" };
    format!("{kind}_{}", iface.replace('.', "_"))
}

/// Native XDP only (no silent generic fallback), pinned like
/// [`Datapath::attach`] pins it. `Err(why)`: the driver (or kernel) refused
/// native XDP.
fn attach_native_xdp(
    dp: &mut Datapath,
    iface: &str,
) -> Result<Result<Attached, String>, DatapathError> {
    let links = dp.pin_path().join("links");
    super::pin::create_private_dir(&links).map_err(io_err(&links))?;
    let path = links.join(link_name(AttachMode::Xdp, iface));
    let attach_err = |source| DatapathError::Attach {
        iface: iface.to_string(),
        mode: "xdp (native)",
        source: Box::new(source),
    };
    let p = dp.xdp_program();
    let id = match p.attach(iface, XdpMode::Driver) {
        Ok(id) => id,
        Err(e) => return Ok(Err(one_line(&e))),
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
    let a = Attached {
        iface: iface.to_string(),
        mode: AttachMode::Xdp,
        how: "xdp",
        reused: false,
        fallback: None,
    };
    dp.mark_xdp(&a)?;
    Ok(Ok(a))
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

/// The ifindex of `iface` in the calling thread's network namespace.
fn ifindex(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

/// A device without a bus (`ethtool -i`'s bus-info empty or `N/A`) is
/// virtual: veth, bridge, dummy, vxlan, ... Asked over an ethtool ioctl in
/// the calling thread's namespace (sysfs may show another one's); where that
/// fails, a device without a `device` link in sysfs. Unknown names count as
/// physical, so auto mode tries XDP.
fn is_virtual(iface: &str) -> bool {
    match bus_info(iface) {
        Some(bus) => bus.is_empty() || bus == "N/A",
        None => {
            let dir = Path::new("/sys/class/net").join(iface);
            dir.exists() && !dir.join("device").exists()
        }
    }
}

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    counts: [u32; 5],
}

/// The bus-info of `ETHTOOL_GDRVINFO`, if the device answers it.
fn bus_info(iface: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: both are plain old data, valid when all-zero.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: a plain socket call; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: ifr points at info, both outlive the call.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL as _, &mut ifr as *mut libc::ifreq) };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return None;
    }
    let end = info.bus_info.iter().position(|&c| c == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.bus_info[..end]).into_owned())
}

/// Attaches to every interface, then drops links a previous run left on
/// interfaces (or in modes) that are no longer asked for. Each interface
/// falls back on its own (native XDP -> TC; TCX -> netlink). When one
/// cannot attach at all, the attachments this call made are removed again
/// (those it found and reused stay: they carry a previous agent's traffic)
/// and the error names the interface.
pub fn attach_all(
    dp: &mut Datapath,
    ifaces: &[String],
    mode: ModeChoice,
) -> Result<Vec<Attached>, DatapathError> {
    let links = dp.pin_path().join("links");
    let mut done: Vec<Attached> = Vec::new();
    let result = attach_each(dp, ifaces, mode, &links, &mut done);
    if let Err(e) = result {
        for a in done.iter().filter(|a| !a.reused) {
            let name = attachment_name(a);
            if let Err(err) = remove_link(&links, &name) {
                warn!(link = %name, "cannot remove a link after a failed attach: {err}");
            }
        }
        return Err(e);
    }
    let keep: HashSet<String> = done.iter().map(attachment_name).collect();
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            match remove_link(&links, &name) {
                Ok(()) => info!(link = %name, "detached a link no longer asked for"),
                Err(err) => warn!(link = %name, "cannot remove stale link: {err}"),
            }
        }
    }
    Ok(done)
}

/// The name under `links/` that stands for an attachment.
fn attachment_name(a: &Attached) -> String {
    match a.how {
        "tc-netlink" => netlink_marker(&a.iface),
        _ => link_name(a.mode, &a.iface),
    }
}

/// How an interface is to be attached, decided before anything is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    Mode(AttachMode),
    /// Native XDP if the driver takes it, else TC.
    NativeXdpElseTc,
}

fn plan(mode: ModeChoice, iface: &str, links: &Path) -> Plan {
    let has = |name: String| links.join(name).exists();
    match mode {
        ModeChoice::Fixed(m) => Plan::Mode(m),
        // A restart keeps the kind of attachment it finds, swapping the
        // program in place.
        ModeChoice::Auto if has(link_name(AttachMode::Tc, iface)) || has(netlink_marker(iface)) => {
            Plan::Mode(AttachMode::Tc)
        }
        ModeChoice::Auto if has(link_name(AttachMode::Xdp, iface)) => Plan::Mode(AttachMode::Xdp),
        // Virtual devices (veth, bridges, ...) get TC: native XDP on a veth
        // copies every skb into a page first, which made it slower than TC
        // in the lab (docs/benchmarks.md, section 4).
        ModeChoice::Auto if is_virtual(iface) => Plan::Mode(AttachMode::Tc),
        ModeChoice::Auto => Plan::NativeXdpElseTc,
    }
}

/// The programs the agent loads at start: the hooks that [`attach_all`] can
/// use on `ifaces` in `mode` (with the links found under `pin_path`). The
/// verifier takes about a second per program, and a node whose interfaces
/// all get TC (virtual devices, `--mode tc`) need not wait for the XDP pair.
pub fn hooks_for(mode: ModeChoice, ifaces: &[String], pin_path: &Path) -> ProgramLoading {
    if ifaces.is_empty() {
        return ProgramLoading::All;
    }
    let links = pin_path.join("links");
    let (mut xdp, mut tc) = (false, false);
    for iface in ifaces {
        match plan(mode, iface, &links) {
            Plan::Mode(AttachMode::Tc) => tc = true,
            Plan::Mode(AttachMode::Xdp | AttachMode::XdpGeneric) => xdp = true,
            Plan::NativeXdpElseTc => (xdp, tc) = (true, true),
        }
    }
    ProgramLoading::Hooks { xdp, tc }
}

fn attach_each(
    dp: &mut Datapath,
    ifaces: &[String],
    mode: ModeChoice,
    links: &Path,
    done: &mut Vec<Attached>,
) -> Result<(), DatapathError> {
    for iface in ifaces {
        let a = match plan(mode, iface, links) {
            Plan::Mode(m) => dp.attach(iface, m).map_err(on(iface))?,
            Plan::NativeXdpElseTc => match attach_native_xdp(dp, iface).map_err(on(iface))? {
                Ok(a) => a,
                Err(why) => {
                    let why = format!("native XDP unavailable ({why}); using TC");
                    warn!(iface, "{why}");
                    let mut a = dp.attach(iface, AttachMode::Tc).map_err(on(iface))?;
                    a.fallback = Some(match a.fallback {
                        Some(more) => format!("{why}; {more}"),
                        None => why,
                    });
                    a
                }
            },
        };
        done.push(a);
    }
    Ok(())
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
    fn netlink_markers_name_their_interface() {
        for iface in ["eth0", "eth0.100", "vlan@x", "é"] {
            let m = netlink_marker(iface);
            assert!(
                m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{m}"
            );
            assert_eq!(marker_iface(&m).as_deref(), Some(iface));
        }
        assert_eq!(marker_iface("tc_eth0"), None);
        assert_eq!(marker_iface("tcnl_zz"), None);
    }

    /// The programs loaded at start are those the attach will use: by
    /// `--mode`, and in `auto` by the link a previous agent left.
    #[test]
    fn hooks_loaded_follow_the_mode_and_the_links_found() {
        let pin = std::env::temp_dir().join(format!("rpclb-hooks-{}", std::process::id()));
        let links = pin.join("links");
        std::fs::create_dir_all(&links).unwrap();
        let ifaces = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let hooks = |mode, v: &[&str]| hooks_for(mode, &ifaces(v), &pin);
        let (tc, xdp) = (
            ProgramLoading::Hooks {
                xdp: false,
                tc: true,
            },
            ProgramLoading::Hooks {
                xdp: true,
                tc: false,
            },
        );
        let fixed = ModeChoice::Fixed;
        assert_eq!(hooks(fixed(AttachMode::Tc), &["a", "b"]), tc);
        assert_eq!(hooks(fixed(AttachMode::Xdp), &["a"]), xdp);
        assert_eq!(hooks(fixed(AttachMode::XdpGeneric), &["a"]), xdp);
        assert_eq!(hooks(fixed(AttachMode::Tc), &[]), ProgramLoading::All);
        // Auto keeps what it finds: a TCX link, a netlink filter, an XDP link.
        std::fs::write(links.join(link_name(AttachMode::Tc, "a")), "").unwrap();
        std::fs::write(links.join(netlink_marker("b")), "").unwrap();
        std::fs::write(links.join(link_name(AttachMode::Xdp, "c")), "").unwrap();
        assert_eq!(hooks(ModeChoice::Auto, &["a", "b"]), tc);
        assert_eq!(hooks(ModeChoice::Auto, &["c"]), xdp);
        assert_eq!(
            hooks(ModeChoice::Auto, &["a", "c"]),
            ProgramLoading::Hooks {
                xdp: true,
                tc: true
            }
        );
        std::fs::remove_dir_all(&pin).unwrap();
    }

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
