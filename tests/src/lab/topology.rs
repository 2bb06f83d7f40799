//! The standard lab: a router namespace `node`, a `client` and N backends, each wired to the
//! node by a veth pair, plus a private bpffs.
//!
//! ```text
//! client 10.244.1.2/24 ── 10.244.1.1 ┐
//!                                     node (ip_forward=1, no routes but connected ones)
//! backend i 10.244.(10+i).2/24 ── 10.244.(10+i).1 ┘
//! ```
//! Client and backends route 10.244.0.0/16 and 10.96.0.0/16 (VIPs) via the node and have no
//! default route, so nothing can leave the lab.
//!
//! [`Checksums`] says which veth ends compute checksums in software: by default the client and
//! backends put full checksums on the wire; [`Checksums::Partial`] makes them send
//! CHECKSUM_PARTIAL packets instead, as pods do.

use super::netns::{prefix_of, suffix};
use super::traffic::{Limits, Reply, TcpServer, UdpServer, tcp_attempts, udp_attempts};
use super::{LabError, Netns, Result, io_err, sys};
use crate::packet::Mac;
use std::ffi::CString;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

pub(super) static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Where the lab's TCP/UDP checksums are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksums {
    /// Client and backend veth ends have tx checksum offload off (`ethtool -K tx off`): their
    /// packets carry full checksums, and every receiver verifies what it gets.
    #[default]
    Full,
    /// Client and backend veth ends keep tx checksum offload on (the veth default, as in a
    /// pod): their TCP and UDP packets reach the node as CHECKSUM_PARTIAL, the check field
    /// holding only the pseudo-header sum (the "seed"). The node-side ends have tx offload off,
    /// so whatever the node's stack forwards is completed in software from that seed, arrives
    /// as CHECKSUM_NONE and is verified by the receiver: a seed the node mangled shows up as
    /// `InCsumErrors` in the receiver's `/proc/net/snmp` (see `Netns::csum_errors`).
    Partial,
}

/// One end of a veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub ifindex: u32,
    pub mac: Mac,
    pub ip: Ipv4Addr,
}

/// A client or backend namespace and its link to the node.
#[derive(Debug)]
pub struct Host {
    pub ns: Netns,
    /// The veth end inside `ns`.
    pub iface: Iface,
    /// The peer veth end inside the node namespace.
    pub node_iface: Iface,
}

impl Host {
    pub fn ip(&self) -> Ipv4Addr {
        self.iface.ip
    }

    /// Wire `ns` to `node` over 10.244.`net`.0/24: node side .1, host side .2.
    pub(super) fn wire(
        node: &Netns,
        ns: Netns,
        tag: &str,
        role: &str,
        net: u8,
        csum: Checksums,
        gro: bool,
    ) -> Result<Host> {
        let (node_if, host_if) = (format!("{tag}n{role}"), format!("{tag}{role}"));
        let (node_ip, host_ip) = (
            Ipv4Addr::new(10, 244, net, 1),
            Ipv4Addr::new(10, 244, net, 2),
        );
        // Created inside the node namespace with its peer straight in `ns`: a crash can never
        // leave a veth in the root namespace.
        node.ip(&[
            "link",
            "add",
            &node_if,
            "type",
            "veth",
            "peer",
            "name",
            &host_if,
            "netns",
            ns.name(),
        ])?;
        node.ip(&["addr", "add", &format!("{node_ip}/24"), "dev", &node_if])?;
        node.ip(&["link", "set", &node_if, "up"])?;
        ns.ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
        ns.ip(&["link", "set", &host_if, "up"])?;
        for net in ["10.244.0.0/16", "10.96.0.0/16"] {
            ns.ip(&["route", "add", net, "via", &node_ip.to_string()])?;
        }
        // Full checksums on the wire (`ethtool -K tx off`), so the receiver verifies them, or
        // partial ones (see `Checksums`); GRO (unless `gro` is false) gives the veth NAPI, which
        // native XDP_REDIRECT from the node into it needs from Linux 5.13 (before, only an XDP
        // program on it does).
        let partial = csum == Checksums::Partial;
        let iface = ns.run(|| -> std::io::Result<Iface> {
            sys::ethtool_set(&host_if, sys::ETHTOOL_STXCSUM, partial)?;
            sys::ethtool_set(&host_if, sys::ETHTOOL_SGRO, gro)?;
            Ok(Iface {
                ifindex: sys::ifindex(&host_if)?,
                mac: sys::mac(&host_if)?,
                name: host_if.clone(),
                ip: host_ip,
            })
        })?;
        let iface = iface.map_err(io_err(format!("configure {host_if} in {}", ns.name())))?;
        let node_iface = node
            .run(|| -> std::io::Result<Iface> {
                if partial {
                    sys::ethtool_set(&node_if, sys::ETHTOOL_STXCSUM, false)?;
                }
                Ok(Iface {
                    ifindex: sys::ifindex(&node_if)?,
                    mac: sys::mac(&node_if)?,
                    name: node_if.clone(),
                    ip: node_ip,
                })
            })?
            .map_err(io_err(format!("query {node_if}")))?;
        Ok(Host {
            ns,
            iface,
            node_iface,
        })
    }
}

/// A bpffs mounted at `/run/rpclb-<pid>-...-bpf/bpf`, outside /sys so that it is visible from
/// every namespace and from `ip netns exec`. Unmounted and removed on drop.
#[derive(Debug)]
pub struct BpfFs {
    dir: PathBuf,
}

impl BpfFs {
    pub fn mount(dir: PathBuf) -> Result<Self> {
        let path = dir.join("bpf");
        std::fs::create_dir_all(&path).map_err(io_err(format!("mkdir {}", path.display())))?;
        let fs = BpfFs { dir }; // from here on, Drop cleans up
        let target = CString::new(path.to_string_lossy().as_bytes()).expect("path has no NUL");
        // SAFETY: all pointers are valid NUL-terminated strings; no mount data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io_err(format!("mount bpffs on {}", path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(fs)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("bpf")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        remove_bpffs_dir(&self.dir);
    }
}

/// Unmount `<dir>/bpf` if mounted and remove both directories (best effort).
pub(crate) fn remove_bpffs_dir(dir: &Path) {
    let path = dir.join("bpf");
    if let Ok(c) = CString::new(path.to_string_lossy().as_bytes()) {
        // SAFETY: valid path; MNT_DETACH so pinned objects held open elsewhere cannot block us.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_dir(&path);
    if let Err(e) = std::fs::remove_dir(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("lab teardown: rmdir {}: {e}", dir.display());
    }
}

/// The standard topology. Dropping it (also while unwinding) unmounts the bpffs and deletes
/// every namespace, and with them every veth.
#[derive(Debug)]
pub struct Lab {
    // Field order is drop order: bpffs first, the node last.
    bpffs: BpfFs,
    backends: Vec<Host>,
    client: Host,
    node: Netns,
}

impl Lab {
    /// Build a lab with `n_backends` (1..=200) backend namespaces and full checksums.
    pub fn new(n_backends: usize) -> Result<Lab> {
        Lab::with_checksums(n_backends, Checksums::Full)
    }

    /// [`Lab::new`] with the given checksum placement.
    pub fn with_checksums(n_backends: usize, csum: Checksums) -> Result<Lab> {
        Lab::build(n_backends, csum, true)
    }

    /// [`Lab::new`] with GRO off on the client and backend veth ends, as a CNI
    /// leaves a pod's: their veths have no NAPI, so a native XDP redirect
    /// from the node into them is dropped.
    pub fn pod_like(n_backends: usize) -> Result<Lab> {
        Lab::build(n_backends, Checksums::Full, false)
    }

    fn build(n_backends: usize, csum: Checksums, gro: bool) -> Result<Lab> {
        assert!((1..=200).contains(&n_backends), "1..=200 backends");
        // Once per process, clear what crashed or killed earlier runs left behind.
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| {
            let gone = super::sweep_orphans();
            if !gone.is_empty() {
                tracing::warn!(?gone, "removed leftovers of dead test processes");
            }
        });
        let pid = std::process::id();
        let id = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        // Interface names (max 15 chars): rl<pid%10000><lab%100> + n?c | n?b<i>, at most 12.
        // They only need to be unique per namespace, and every namespace here is new.
        let tag = format!("rl{:04}{:02}", pid % 10000, id % 100);

        let node = Netns::new("node")?;
        let client_ns = Netns::new("client")?;
        let backend_ns = (1..=n_backends)
            .map(|i| Netns::new(&format!("b{i}")))
            .collect::<Result<Vec<_>>>()?;
        let bpffs = BpfFs::mount(PathBuf::from(format!(
            "/run/{}lab{id}-{:04x}",
            prefix_of(pid),
            suffix()
        )))?;

        // Forwarding on in the node namespace only.
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let client = Host::wire(&node, client_ns, &tag, "c", 1, csum, gro)?;
        let backends = backend_ns
            .into_iter()
            .enumerate()
            .map(|(i, ns)| {
                let role = format!("b{}", i + 1);
                Host::wire(&node, ns, &tag, &role, 11 + i as u8, csum, gro)
            })
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(node = node.name(), backends = n_backends, "lab up");
        Ok(Lab {
            bpffs,
            backends,
            client,
            node,
        })
    }

    pub fn node(&self) -> &Netns {
        &self.node
    }

    pub fn client(&self) -> &Host {
        &self.client
    }

    pub fn backends(&self) -> &[Host] {
        &self.backends
    }

    /// Backend `i`, 1-based as in the address plan.
    pub fn backend(&self, i: usize) -> &Host {
        &self.backends[i - 1]
    }

    /// The node-side interfaces (client's first), where the agent attaches XDP/TC.
    pub fn node_ifaces(&self) -> Vec<&Iface> {
        std::iter::once(&self.client)
            .chain(&self.backends)
            .map(|h| &h.node_iface)
            .collect()
    }

    /// Root of the lab's private bpffs: pin here, not under /sys/fs/bpf.
    pub fn bpffs(&self) -> PathBuf {
        self.bpffs.path()
    }

    /// Every namespace name, node first.
    pub fn namespaces(&self) -> Vec<&str> {
        let hosts = std::iter::once(&self.client).chain(&self.backends);
        std::iter::once(self.node.name())
            .chain(hosts.map(|h| h.ns.name()))
            .collect()
    }

    /// A TCP server on 0.0.0.0:`port` in every backend, answering `backend-<i>`.
    pub fn start_tcp_servers(&self, port: u16) -> Result<Vec<TcpServer>> {
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        (1..=self.backends.len())
            .map(|i| TcpServer::start(&self.backend(i).ns, any, &format!("backend-{i}")))
            .collect()
    }

    /// A UDP server on 0.0.0.0:`port` in every backend, answering `backend-<i>`.
    pub fn start_udp_servers(&self, port: u16) -> Result<Vec<UdpServer>> {
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        (1..=self.backends.len())
            .map(|i| UdpServer::start(&self.backend(i).ns, any, &format!("backend-{i}")))
            .collect()
    }

    /// `n` TCP connections from the client to `target`, each a new flow; fails on the first
    /// failed attempt. Bounded by `Limits::default()`.
    pub fn client_tcp(&self, target: SocketAddrV4, n: usize) -> Result<Vec<Reply>> {
        all_ok(
            self.client
                .ns
                .run(|| tcp_attempts(target, n, Limits::default()))?,
            target,
        )
    }

    /// `n` UDP exchanges from the client to `target`, each from a new source port.
    pub fn client_udp(&self, target: SocketAddrV4, n: usize) -> Result<Vec<Reply>> {
        all_ok(
            self.client
                .ns
                .run(|| udp_attempts(target, n, Limits::default()))?,
            target,
        )
    }
}

fn all_ok(attempts: Vec<std::io::Result<Reply>>, target: SocketAddrV4) -> Result<Vec<Reply>> {
    attempts
        .into_iter()
        .enumerate()
        .map(|(attempt, r)| {
            r.map_err(|source| LabError::Probe {
                attempt,
                target: SocketAddr::V4(target),
                source,
            })
        })
        .collect()
}
