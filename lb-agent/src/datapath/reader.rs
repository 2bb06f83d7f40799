//! The read-only view of the maps: services, backends, tables, counters and
//! conntrack, as lbctl, the metrics and the GC read them. [`MapReader`]
//! opened from pins ([`MapReader::open_pinned`], lbctl) holds read-only fds:
//! the kernel refuses any write through it. The writer
//! ([`super::writer::MapWriter`]) is a reader plus the writes.

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::Duration;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_api::{Algorithm, Protocol, Service, ServiceAddr};
use lb_common::{
    AffinityKey, AffinityValue, BackendValue, ConnCounts, Counters, CtValue, CtValue6,
    FlowCacheEntry, FlowKey, FlowKey6, NAME_MAX, NameValue, ServiceKey, ServiceKey6, ServiceValue,
    backend_state, ct_dir, map_names, reason, svc_flags,
};
use serde::Serialize;

use super::{DatapathError, abi, sys};

pub(super) fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

/// Counts of the kernel's flow cache hits not yet added to the counter maps
/// (`FlowCacheEntry::pending_packets`), summed over CPUs and slots. Readers
/// add them to what the maps say, so the counters are exact whenever no
/// packet is in flight. The cache is read before the maps: an entry flushed
/// between the two reads is counted twice in that one reading (never missed).
#[derive(Clone, Debug, Default)]
pub struct PendingCounts {
    /// (packets, bytes) by service id.
    pub svc: StdHashMap<u32, (u64, u64)>,
    /// (packets, bytes) by backend id.
    pub backend: StdHashMap<u32, (u64, u64)>,
    /// Packets by reason (`NAT_FORWARD`/`NAT_REVERSE`, `FWD_REDIRECT`).
    pub reasons: StdHashMap<u32, u64>,
}

/// A backend as the index knows it.
#[derive(Clone, Debug)]
pub(super) struct BackendSlot {
    pub(super) id: u32,
    pub(super) value: BackendValue,
    /// Its `BACKEND_LIMITS` entry (0: none); `u32::MAX` when read from
    /// pinned maps (unknown: the writer rewrites it).
    pub(super) limit: u32,
}

/// A service as the index knows it.
#[derive(Clone, Debug)]
pub(super) struct SvcState {
    pub(super) name: String,
    pub(super) value: ServiceValue,
    /// By backend address (either family: a service's backends are of its VIP's).
    pub(super) backends: BTreeMap<(IpAddr, u16), BackendSlot>,
    /// The service as last written by the writer; `None` when read from
    /// pinned maps (then the writer's next `apply` rewrites it once).
    pub(super) spec: Option<Service>,
}

/// Per-service counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub drops: u64,
}

/// One backend and its counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendStats {
    pub id: u32,
    pub ip: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub active: u64,
    /// Its QoS limit (docs/policies.md): `active` (L4) or outstanding calls
    /// (gRPC mode) stop at it. `None`: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The gRPC mode's connection counts (userspace proxy only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcBackendCounts>,
}

/// A gRPC-mode backend's pooled connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GrpcBackendCounts {
    /// HTTP/2 connections opened to it.
    pub connections_opened: u64,
    /// Of those, the ones it sent a GOAWAY on.
    pub goaways: u64,
    /// Calls it did not process, sent again (gRFC A6 transparent retry).
    pub transparent_retries: u64,
    /// Calls retried by the retry policy after it answered a retryable status.
    pub retries: u64,
    /// Its retryable answers not retried because the retry throttle was low.
    pub retries_throttled: u64,
    /// Attempts sent to it, by status and latency.
    pub calls: crate::userspace::CallStats,
    /// Ejected by outlier detection now.
    pub ejected: bool,
    /// Times it was ejected.
    pub ejections: u64,
}

/// A service as stored in the maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceInfo {
    pub id: u32,
    pub name: String,
    pub addr: ServiceAddr,
    pub algorithm: Algorithm,
    pub table_len: u32,
    pub affinity_timeout_s: u32,
    pub backends_active: usize,
    pub backends_terminating: usize,
}

/// One flow (its forward entry, with the reverse entry's last-seen merged in).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConntrackEntry {
    pub proto: Protocol,
    pub client: (Ipv4Addr, u16),
    pub vip: (Ipv4Addr, u16),
    pub backend: (Ipv4Addr, u16),
    /// The source port the backend sees, when the kernel rewrote the
    /// client's (its own was taken: a reverse-conntrack collision).
    pub backend_sees: Option<u16>,
    pub svc_id: u32,
    pub backend_id: u32,
    pub state: &'static str,
    pub state_code: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
}

/// One IPv6 flow (its forward entry in `CONNTRACK6`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConntrackEntry6 {
    pub proto: Protocol,
    pub client: (Ipv6Addr, u16),
    pub vip: (Ipv6Addr, u16),
    pub backend: (Ipv6Addr, u16),
    /// The source port the backend sees when the kernel rewrote the
    /// client's (a SNATed flow's SNAT port).
    pub backend_sees: Option<u16>,
    /// The source address the backend sees when the flow is SNATed (the
    /// node's, or the service loopback for a hairpin flow).
    pub snat_address: Option<Ipv6Addr>,
    /// `lb_common::ct_flags` of the forward entry.
    pub flags: u8,
    pub svc_id: u32,
    pub backend_id: u32,
    pub state: &'static str,
    pub state_code: u32,
    pub created_ns: u64,
    /// The forward entry's last-seen (the reverse entry's is not merged in).
    pub last_seen_ns: u64,
    /// The last-seen of the flow's own reverse entry, if it has one (replies).
    pub reverse_seen_ns: Option<u64>,
}

pub(super) fn key_of(addr: &ServiceAddr) -> ServiceKey {
    ServiceKey {
        vip: ip_wire(v4_only(addr.vip)),
        port: addr.port.to_be(),
        proto: abi::proto_number(addr.protocol),
        _pad: 0,
    }
}

/// The `SERVICES6` key of an IPv6 service.
pub(super) fn key6_of(addr: &ServiceAddr) -> ServiceKey6 {
    ServiceKey6 {
        vip: match addr.vip {
            IpAddr::V6(v6) => ip6_wire(v6),
            IpAddr::V4(_) => [0; 4],
        },
        port: addr.port.to_be(),
        proto: abi::proto_number(addr.protocol),
        _pad: 0,
    }
}

fn addr6_of(k: &ServiceKey6) -> Option<ServiceAddr> {
    let protocol = match k.proto {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        _ => return None,
    };
    Some(ServiceAddr {
        vip: ip6_from_wire(k.vip).into(),
        port: u16::from_be(k.port),
        protocol,
    })
}

/// Wire (the 16 bytes as four native words, as the kernel loads them) <-> `Ipv6Addr`.
pub fn ip6_wire(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}
pub fn ip6_from_wire(w: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, v) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

fn addr_of(k: &ServiceKey) -> Option<ServiceAddr> {
    let protocol = match k.proto {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        _ => return None,
    };
    Some(ServiceAddr {
        vip: Ipv4Addr::from(k.vip.to_ne_bytes()).into(),
        port: u16::from_be(k.port),
        protocol,
    })
}

/// The IPv4 address the kernel maps hold (they hold IPv4 only until the
/// programs handle IPv6): an IPv6 address gives 0.0.0.0, which no service
/// or backend has. `MapWriter` refuses IPv6 services before any map write,
/// and the agent sends them to the userspace proxy (`crate::engines`).
pub fn v4_only(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }
}

/// Wire (network order in a native int) <-> `Ipv4Addr`.
pub fn ip_wire(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}
pub fn ip_from_wire(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// The kernel's current monotonic clock (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Typed access to every map, and an index of the services and backends
/// in them (by address).
pub struct MapReader {
    pub(super) services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub(super) names: HashMap<MapData, u32, NameValue>,
    pub(super) backends: Array<MapData, BackendValue>,
    /// Backend ip:port:proto -> its one frontend (`map_names::FRONTENDS`).
    pub(super) frontends: HashMap<MapData, ServiceKey, ServiceKey>,
    pub(super) slots: MapData,
    pub(super) slots_cap: u32,
    pub(super) conntrack: HashMap<MapData, FlowKey, CtValue>,
    /// The conntrack map's max_entries (a pinned map keeps its size).
    pub(super) conntrack_cap: u32,
    /// A dup of the conntrack map's fd, for batch syscalls that aya lacks.
    pub(super) conntrack_fd: std::os::fd::OwnedFd,
    pub(super) affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub(super) rr: Array<MapData, u64>,
    pub(super) svc_stats: PerCpuArray<MapData, Counters>,
    pub(super) backend_stats: Array<MapData, Counters>,
    pub(super) backend_conns: Array<MapData, ConnCounts>,
    pub(super) backend_gc: Array<MapData, u64>,
    pub(super) reasons: PerCpuArray<MapData, u64>,
    pub(super) flow_cache: PerCpuArray<MapData, FlowCacheEntry>,
    /// A dup of the flow cache's fd, for the batch read aya lacks.
    pub(super) flow_cache_fd: std::os::fd::OwnedFd,
    pub(super) config: Array<MapData, u32>,
    pub(super) xdp_ifaces: Array<MapData, u32>,
    pub(super) services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    pub(super) backends6: Array<MapData, [u32; 4]>,
    pub(super) conntrack6: HashMap<MapData, FlowKey6, CtValue6>,
    pub(super) backend_limits: Array<MapData, u32>,
    pub(super) svcs: BTreeMap<ServiceAddr, SvcState>,
    /// The object's maps this reader does not use (`FRAGMENTS`,
    /// `ROUTE_CACHE`), kept open: a program loaded after the writer took the
    /// maps (on demand, `ProgramLoading::OnDemand`) names them by these fds.
    _kept: Vec<Map>,
}

impl MapReader {
    /// Opens the maps pinned under `pin_path` read-only (`BPF_F_RDONLY`):
    /// lbctl's view, which cannot change the data path.
    pub fn open_pinned(pin_path: &Path) -> Result<Self, DatapathError> {
        let mut maps = StdHashMap::new();
        for &name in map_names::ALL {
            let p = pin_path.join(name);
            let fd = sys::obj_get_rdonly(&p).map_err(|source| DatapathError::Io {
                path: p.clone(),
                source,
            })?;
            let md = MapData::from_fd(fd).map_err(map_err(name))?;
            maps.insert(name, Map::from_map_data(md).map_err(map_err(name))?);
        }
        Ok(Self::from_maps(maps)?.0)
    }

    /// Takes the maps and reads the index from them; also returns the ids of
    /// every backend entry in use (for the writer's allocator).
    pub(super) fn from_maps(
        mut maps: StdHashMap<&'static str, Map>,
    ) -> Result<(Self, Vec<u32>), DatapathError> {
        macro_rules! typed {
            ($name:expr) => {{
                let m = maps.remove($name).ok_or(DatapathError::MissingMap($name))?;
                m.try_into().map_err(map_err($name))?
            }};
        }
        let slots = match maps.remove(map_names::SLOTS) {
            Some(Map::Array(md)) => md,
            _ => return Err(DatapathError::MissingMap(map_names::SLOTS)),
        };
        let slots_cap = slots
            .info()
            .map_err(map_err(map_names::SLOTS))?
            .max_entries();
        let conntrack_cap = match maps.get(map_names::CONNTRACK) {
            Some(Map::LruHashMap(md)) | Some(Map::HashMap(md)) => md
                .info()
                .map_err(map_err(map_names::CONNTRACK))?
                .max_entries(),
            _ => return Err(DatapathError::MissingMap(map_names::CONNTRACK)),
        };
        let conntrack_fd = match maps.get(map_names::CONNTRACK) {
            Some(Map::LruHashMap(md)) | Some(Map::HashMap(md)) => md
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| DatapathError::Io {
                    path: "CONNTRACK fd".into(),
                    source,
                })?,
            _ => return Err(DatapathError::MissingMap(map_names::CONNTRACK)),
        };
        let backends_fd = match maps.get(map_names::BACKENDS) {
            Some(Map::Array(md)) => {
                md.fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| DatapathError::Io {
                        path: "BACKENDS fd".into(),
                        source,
                    })?
            }
            _ => return Err(DatapathError::MissingMap(map_names::BACKENDS)),
        };
        let flow_cache_fd = match maps.get(map_names::FLOW_CACHE) {
            Some(Map::PerCpuArray(md)) => {
                md.fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| DatapathError::Io {
                        path: "FLOW_CACHE fd".into(),
                        source,
                    })?
            }
            _ => return Err(DatapathError::MissingMap(map_names::FLOW_CACHE)),
        };
        let backends: Array<MapData, BackendValue> = typed!(map_names::BACKENDS);
        let mut r = MapReader {
            services: typed!(map_names::SERVICES),
            names: typed!(map_names::NAMES),
            backends,
            frontends: typed!(map_names::FRONTENDS),
            slots,
            slots_cap,
            conntrack: typed!(map_names::CONNTRACK),
            conntrack_cap,
            conntrack_fd,
            affinity: typed!(map_names::AFFINITY),
            rr: typed!(map_names::RR_COUNTERS),
            svc_stats: typed!(map_names::SVC_STATS),
            backend_stats: typed!(map_names::BACKEND_STATS),
            backend_conns: typed!(map_names::BACKEND_CONNS),
            backend_gc: typed!(map_names::BACKEND_GC),
            reasons: typed!(map_names::REASONS),
            flow_cache: typed!(map_names::FLOW_CACHE),
            flow_cache_fd,
            config: typed!(map_names::CONFIG),
            xdp_ifaces: typed!(map_names::XDP_IFACES),
            services6: typed!(map_names::SERVICES6),
            backends6: typed!(map_names::BACKENDS6),
            conntrack6: typed!(map_names::CONNTRACK6),
            backend_limits: typed!(map_names::BACKEND_LIMITS),
            svcs: BTreeMap::new(),
            _kept: Vec::new(),
        };
        r._kept = maps.into_values().collect();
        let used = r.index(backends_fd.as_fd())?;
        Ok((r, used))
    }

    /// Reads the index from the maps; returns the ids of every backend entry
    /// in use.
    fn index(
        &mut self,
        backends_fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Vec<u32>, DatapathError> {
        let mut by_id: StdHashMap<u32, ServiceAddr> = StdHashMap::new();
        let mut all_svcs = Vec::new();
        for item in self.services.iter() {
            let (k, v) = item.map_err(map_err(map_names::SERVICES))?;
            all_svcs.push((addr_of(&k), v));
        }
        for item in self.services6.iter() {
            let (k, v) = item.map_err(map_err(map_names::SERVICES6))?;
            all_svcs.push((addr6_of(&k), v));
        }
        for (addr, v) in all_svcs {
            let Some(addr) = addr else { continue };
            let name = self
                .names
                .get(&v.id, 0)
                .ok()
                .map(|n| {
                    String::from_utf8_lossy(&n.bytes[..(n.len as usize).min(NAME_MAX)]).into_owned()
                })
                .unwrap_or_else(|| addr.to_string());
            by_id.insert(v.id, addr);
            self.svcs.insert(
                addr,
                SvcState {
                    name,
                    value: v,
                    backends: BTreeMap::new(),
                    spec: None,
                },
            );
        }
        let mut used_backends = Vec::new();
        // One batched read: the array has up to --max-backends entries.
        let mut all: Vec<(u32, BackendValue)> = Vec::new();
        sys::for_each_batch(
            backends_fd.as_raw_fd(),
            8192,
            |&i: &u32, b: &BackendValue| all.push((i, *b)),
        )
        .map_err(|source| DatapathError::Io {
            path: "BACKENDS (BPF_MAP_LOOKUP_BATCH)".into(),
            source,
        })?;
        for (id, b) in all {
            if b.state == backend_state::UNUSED {
                continue;
            }
            used_backends.push(id);
            let Some(addr) = by_id.get(&b.svc_id) else {
                continue;
            };
            let ip: IpAddr = if addr.vip.is_ipv6() {
                let w = self
                    .backends6
                    .get(&id, 0)
                    .map_err(map_err(map_names::BACKENDS6))?;
                ip6_from_wire(w).into()
            } else {
                ip_from_wire(b.ip).into()
            };
            if let Some(s) = self.svcs.get_mut(addr) {
                s.backends.insert(
                    (ip, u16::from_be(b.port)),
                    BackendSlot {
                        id,
                        value: b,
                        limit: u32::MAX,
                    },
                );
            }
        }
        Ok(used_backends)
    }

    /// Reads `SLOTS[off..off+len]`.
    pub fn read_slots(&self, off: u32, len: u32) -> Result<Vec<u32>, DatapathError> {
        let fd = self.slots.fd().as_fd().as_raw_fd();
        (off..off + len)
            .map(|k| {
                sys::lookup::<u32, u32>(fd, &k).map_err(|source| DatapathError::Io {
                    path: "SLOTS".into(),
                    source,
                })
            })
            .collect()
    }

    pub fn services(&self) -> Vec<ServiceInfo> {
        self.svcs
            .iter()
            .map(|(addr, s)| ServiceInfo {
                id: s.value.id,
                name: s.name.clone(),
                addr: *addr,
                algorithm: abi::algorithm(s.value.algo).unwrap_or_default(),
                table_len: s.value.table_len,
                affinity_timeout_s: s.value.affinity_timeout_s,
                backends_active: s
                    .backends
                    .values()
                    .filter(|b| b.value.state == backend_state::ACTIVE)
                    .count(),
                backends_terminating: s
                    .backends
                    .values()
                    .filter(|b| b.value.state != backend_state::ACTIVE)
                    .count(),
            })
            .collect()
    }

    pub fn service_id(&self, addr: &ServiceAddr) -> Option<u32> {
        self.svcs.get(addr).map(|s| s.value.id)
    }

    /// The raw service value as stored in the map.
    pub fn service_value(&self, addr: &ServiceAddr) -> Result<ServiceValue, DatapathError> {
        if addr.vip.is_ipv6() {
            return self
                .services6
                .get(&key6_of(addr), 0)
                .map_err(map_err(map_names::SERVICES6));
        }
        self.services
            .get(&key_of(addr), 0)
            .map_err(map_err(map_names::SERVICES))
    }

    /// Backend id for `ip:port` of a service.
    pub fn backend_id(&self, addr: &ServiceAddr, ip: impl Into<IpAddr>, port: u16) -> Option<u32> {
        self.svcs
            .get(addr)?
            .backends
            .get(&(ip.into(), port))
            .map(|b| b.id)
    }

    /// The table a service selects from (`SLOTS` slice), as backend ids.
    pub fn service_table(&self, addr: &ServiceAddr) -> Result<Vec<u32>, DatapathError> {
        let v = self.service_value(addr)?;
        self.read_slots(v.table_off, v.table_len)
    }

    fn sum(
        &self,
        m: &PerCpuArray<MapData, Counters>,
        id: u32,
        name: &'static str,
    ) -> Result<Counters, DatapathError> {
        let v = m.get(&id, 0).map_err(map_err(name))?;
        Ok(v.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            new_flows: a.new_flows + c.new_flows,
            drops: a.drops + c.drops,
        }))
    }

    /// The flow cache's pending counts (see [`PendingCounts`]): one read
    /// of every slot on every CPU.
    pub fn pending_counts(&self) -> Result<PendingCounts, DatapathError> {
        let mut p = PendingCounts::default();
        let mut entries = Vec::new();
        let fd = self.flow_cache_fd.as_raw_fd();
        let cpus = super::memory::possible_cpus()? as usize;
        let batch =
            sys::for_each_percpu_value(fd, self.flow_cache.len(), cpus, |e: &FlowCacheEntry| {
                if e.pending_packets != 0 {
                    entries.push(*e);
                }
            });
        if batch.is_err() {
            // Kernels without batch ops on per-CPU arrays (5.10: ENOTSUPP):
            // one lookup per slot.
            entries.clear();
            for slot in 0..self.flow_cache.len() {
                let v = self
                    .flow_cache
                    .get(&slot, 0)
                    .map_err(map_err(map_names::FLOW_CACHE))?;
                entries.extend(v.iter().filter(|e| e.pending_packets != 0).copied());
            }
        }
        {
            for e in &entries {
                let (n, b) = (e.pending_packets, e.pending_bytes);
                let s = p.svc.entry(e.svc_id).or_default();
                *s = (s.0 + n, s.1 + b);
                let s = p.backend.entry(e.backend_id).or_default();
                *s = (s.0 + n, s.1 + b);
                *p.reasons.entry(e.nat_reason).or_default() += n;
                *p.reasons.entry(reason::FWD_REDIRECT).or_default() += n;
            }
        }
        Ok(p)
    }

    pub fn service_stats(&self, addr: &ServiceAddr) -> Result<ServiceStats, DatapathError> {
        self.service_stats_with(addr, &self.pending_counts()?)
    }

    /// [`Self::service_stats`] with the pending counts read once for many calls.
    pub fn service_stats_with(
        &self,
        addr: &ServiceAddr,
        pending: &PendingCounts,
    ) -> Result<ServiceStats, DatapathError> {
        let id = self.service_id(addr).ok_or_else(|| {
            DatapathError::InvalidService(addr.to_string(), "no such service".into())
        })?;
        let c = self.sum(&self.svc_stats, id, map_names::SVC_STATS)?;
        let (pp, pb) = pending.svc.get(&id).copied().unwrap_or_default();
        Ok(ServiceStats {
            packets: c.packets + pp,
            bytes: c.bytes + pb,
            new_flows: c.new_flows,
            drops: c.drops,
        })
    }

    /// Active flows of a backend: opens - closes - expired by GC.
    pub fn backend_active(&self, id: u32) -> Result<u64, DatapathError> {
        let (c, gc) = self.backend_conn_counts(id)?;
        Ok(c.active(gc))
    }

    pub fn backend_stats(&self, addr: &ServiceAddr) -> Result<Vec<BackendStats>, DatapathError> {
        self.backend_stats_with(addr, &self.pending_counts()?)
    }

    /// [`Self::backend_stats`] with the pending counts read once for many calls.
    pub fn backend_stats_with(
        &self,
        addr: &ServiceAddr,
        pending: &PendingCounts,
    ) -> Result<Vec<BackendStats>, DatapathError> {
        let Some(s) = self.svcs.get(addr) else {
            return Ok(Vec::new());
        };
        s.backends
            .iter()
            .map(|(&(ip, port), b)| {
                let c = self
                    .backend_stats
                    .get(&b.id, 0)
                    .map_err(map_err(map_names::BACKEND_STATS))?;
                let (pp, pb) = pending.backend.get(&b.id).copied().unwrap_or_default();
                Ok(BackendStats {
                    id: b.id,
                    ip,
                    port,
                    weight: b.value.weight,
                    state: if b.value.state == backend_state::ACTIVE {
                        "active"
                    } else {
                        "terminating"
                    },
                    packets: c.packets + pp,
                    bytes: c.bytes + pb,
                    new_flows: c.new_flows,
                    active: self.backend_active(b.id)?,
                    limit: if s.value.flags & svc_flags::LIMITED != 0 {
                        let l = self
                            .backend_limits
                            .get(&b.id, 0)
                            .map_err(map_err(map_names::BACKEND_LIMITS))?;
                        Some(l).filter(|&l| l != 0)
                    } else {
                        None
                    },
                    grpc: None,
                })
            })
            .collect()
    }

    /// The `XDP_IFACES` flags that are set, by ifindex.
    pub fn xdp_ifaces(&self) -> Result<BTreeMap<u32, u32>, DatapathError> {
        let mut m = BTreeMap::new();
        for i in 0..self.xdp_ifaces.len() {
            let v = self
                .xdp_ifaces
                .get(&i, 0)
                .map_err(map_err(map_names::XDP_IFACES))?;
            if v != 0 {
                m.insert(i, v);
            }
        }
        Ok(m)
    }

    /// Drop/pass/forward counters by reason, summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        self.reasons_with(&self.pending_counts()?)
    }

    /// [`Self::reasons`] with the pending counts read once for many calls.
    pub fn reasons_with(
        &self,
        pending: &PendingCounts,
    ) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        lb_common::reason::NAMES
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let v = self
                    .reasons
                    .get(&(i as u32), 0)
                    .map_err(map_err(map_names::REASONS))?;
                let p = pending.reasons.get(&(i as u32)).copied().unwrap_or(0);
                Ok((n, v.iter().sum::<u64>() + p))
            })
            .collect()
    }

    /// Every flow: forward entries, with the reverse entry's last-seen merged.
    pub fn conntrack(&self) -> Result<Vec<ConntrackEntry>, DatapathError> {
        let mut rev_seen: StdHashMap<FlowKey, u64> = StdHashMap::new();
        let mut fwd = Vec::new();
        for item in self.conntrack.iter() {
            let (k, v) = match item {
                Ok(kv) => kv,
                // Entries can vanish mid-walk (LRU eviction, GC).
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(map_names::CONNTRACK)(e)),
            };
            if v.dir == ct_dir::REVERSE {
                rev_seen.insert(k.forward_of_reverse(&v), v.last_seen_ns);
            } else {
                fwd.push((k, v));
            }
        }
        Ok(fwd
            .into_iter()
            .map(|(k, v)| ConntrackEntry {
                proto: if k.proto == 17 {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
                client: (ip_from_wire(k.src_ip), u16::from_be(k.src_port)),
                vip: (ip_from_wire(k.dst_ip), u16::from_be(k.dst_port)),
                backend: (ip_from_wire(v.nat_ip), u16::from_be(v.nat_port)),
                backend_sees: (v.client_port != 0).then(|| u16::from_be(v.client_port)),
                svc_id: v.svc_id,
                backend_id: v.backend_id,
                state: lb_common::ct_state::name(v.state),
                state_code: v.state,
                created_ns: v.created_ns,
                last_seen_ns: v.last_seen_ns.max(rev_seen.get(&k).copied().unwrap_or(0)),
            })
            .collect())
    }

    /// Name of a service id (from the `NAMES` map, via the index).
    pub fn service_name(&self, id: u32) -> Option<&str> {
        self.svcs
            .values()
            .find(|s| s.value.id == id)
            .map(|s| s.name.as_str())
    }

    /// The conntrack map's capacity in entries (two per flow).
    pub fn conntrack_capacity(&self) -> u32 {
        self.conntrack_cap
    }

    /// The conntrack map's fd (for BPF_MAP_*_BATCH calls).
    pub fn conntrack_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.conntrack_fd.as_fd()
    }

    /// Affinity timeout of a service, if any.
    pub fn affinity_timeout(&self, addr: &ServiceAddr) -> Option<Duration> {
        let s = self.svcs.get(addr)?;
        (s.value.affinity_timeout_s > 0)
            .then(|| Duration::from_secs(s.value.affinity_timeout_s as u64))
    }

    /// Number of affinity entries (for tests and metrics).
    pub fn affinity_len(&self) -> usize {
        self.affinity.keys().filter(|k| k.is_ok()).count()
    }

    /// The IPv6 flows (`CONNTRACK6`): one per forward entry.
    pub fn conntrack6(&self) -> Result<Vec<ConntrackEntry6>, DatapathError> {
        let mut all = std::collections::HashMap::new();
        for item in self.conntrack6.iter() {
            match item {
                Ok((k, v)) => all.insert(k, v),
                // An entry evicted between the key walk and its lookup.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(map_names::CONNTRACK6)(e)),
            };
        }
        let mut out = Vec::new();
        for (k, v) in &all {
            if v.ct.dir != ct_dir::FORWARD {
                continue;
            }
            let rk = k.reverse_of_forward(v);
            let reverse_seen_ns = all
                .get(&rk)
                .filter(|rv| k.owns_reverse(v, &rk, rv))
                .map(|rv| rv.ct.last_seen_ns);
            out.push(ConntrackEntry6 {
                proto: if k.proto == 17 {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
                client: (ip6_from_wire(k.src_ip), u16::from_be(k.src_port)),
                vip: (ip6_from_wire(k.dst_ip), u16::from_be(k.dst_port)),
                backend: (ip6_from_wire(v.nat_ip6), u16::from_be(v.ct.nat_port)),
                backend_sees: (v.ct.client_port != 0).then(|| u16::from_be(v.ct.client_port)),
                snat_address: (v.ct.flags & lb_common::ct_flags::SNAT != 0)
                    .then(|| ip6_from_wire(v.snat_ip6)),
                flags: v.ct.flags,
                svc_id: v.ct.svc_id,
                backend_id: v.ct.backend_id,
                state: lb_common::ct_state::name(v.ct.state),
                state_code: v.ct.state,
                created_ns: v.ct.created_ns,
                last_seen_ns: v.ct.last_seen_ns,
                reverse_seen_ns,
            });
        }
        Ok(out)
    }

    /// Every IPv4 backend in use, from the index: id -> (service id, IP,
    /// port). GC uses it to credit expiries only to the backend a flow was
    /// opened on (an id that was freed and reused has fresh counters), and
    /// recounts these backends' active flows from `CONNTRACK`; the IPv6
    /// backends' are `CONNTRACK6`'s (`crate::gc6`, [`Self::backend_services6`]).
    pub fn backend_index(&self) -> StdHashMap<u32, (u32, Ipv4Addr, u16)> {
        self.svcs
            .values()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter_map(move |(&(ip, port), b)| match ip {
                        IpAddr::V4(v4) => Some((b.id, (s.value.id, v4, port))),
                        IpAddr::V6(_) => None,
                    })
            })
            .collect()
    }

    /// Every IPv6 backend in use: id -> service id (`crate::gc6`).
    pub fn backend_services6(&self) -> StdHashMap<u32, u32> {
        self.svcs
            .values()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter(|((ip, _), _)| ip.is_ipv6())
                    .map(move |(_, b)| (b.id, s.value.id))
            })
            .collect()
    }

    /// A backend's raw counters: (opens, closes) from the kernel and the
    /// GC-expired count from the agent.
    pub fn backend_conn_counts(&self, id: u32) -> Result<(ConnCounts, u64), DatapathError> {
        let c = self
            .backend_conns
            .get(&id, 0)
            .map_err(map_err(map_names::BACKEND_CONNS))?;
        let gc = self
            .backend_gc
            .get(&id, 0)
            .map_err(map_err(map_names::BACKEND_GC))?;
        Ok((c, gc))
    }
}
