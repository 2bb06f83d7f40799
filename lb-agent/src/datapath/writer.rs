//! The typed map writer: the one way userspace changes the data path.
//!
//! Ordering rules, so the kernel never sees a service pointing at something
//! missing: new backends are written before the table that names them, a new
//! table is written to a fresh slice of `SLOTS` before the service entry is
//! switched to it (one map update, atomic), and old backends and slices are
//! freed only after the switch.

use std::collections::{BTreeMap, HashMap as StdHashMap, VecDeque};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::Duration;

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
};
use lb_api::{Algorithm, BackendState, DesiredState, Protocol, Refusal, Service, ServiceAddr};
use lb_common::{
    AffinityKey, AffinityValue, BackendValue, ConnCounts, Counters, CtValue, FlowKey, NAME_MAX,
    NameValue, ServiceKey, ServiceValue, backend_state, config_idx, ct_dir, limits, map_names,
};
use serde::Serialize;
use tracing::debug;

use super::{DatapathError, abi, maglev, sys, table};

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

/// A backend as the writer tracks it.
#[derive(Clone, Debug)]
struct BackendSlot {
    id: u32,
    value: BackendValue,
}

/// See [`MapWriter::set_after_switch_hook`].
pub type SwitchHook = Box<dyn FnMut(&ServiceAddr) + Send>;

/// Whether the kernel may pick this backend for a new flow
/// (`select::backend` in lb-ebpf).
fn takes_new_flows(v: &BackendValue) -> bool {
    v.state == backend_state::ACTIVE && v.weight > 0
}

/// A service as the writer tracks it.
#[derive(Clone, Debug)]
struct SvcState {
    name: String,
    value: ServiceValue,
    backends: BTreeMap<(Ipv4Addr, u16), BackendSlot>,
    /// The service as last written by this writer; `None` when adopted
    /// from pinned maps (then the next `apply` rewrites it once).
    spec: Option<Service>,
}

/// Hands out ids; freed ids are reused oldest-first, so an id that conntrack
/// entries may still name is reused as late as possible.
#[derive(Debug)]
struct IdAlloc {
    next: u32,
    max: u32,
    free: VecDeque<u32>,
}

impl IdAlloc {
    fn new(max: u32) -> Self {
        // Id 0 is never handed out.
        IdAlloc {
            next: 1,
            max,
            free: VecDeque::new(),
        }
    }
    fn adopt(&mut self, used: &[u32]) {
        let top = used.iter().copied().max().unwrap_or(0);
        self.next = top + 1;
        let set: std::collections::HashSet<u32> = used.iter().copied().collect();
        self.free = (1..=top).filter(|i| !set.contains(i)).collect();
    }
    fn alloc(&mut self) -> Option<u32> {
        if self.next < self.max {
            self.next += 1;
            return Some(self.next - 1);
        }
        self.free.pop_front()
    }
    fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

/// First-fit allocator of `SLOTS` slices.
#[derive(Debug)]
struct RangeAlloc {
    /// offset -> length of free ranges, merged.
    free: BTreeMap<u32, u32>,
}

impl RangeAlloc {
    fn new(cap: u32, used: &[(u32, u32)]) -> Self {
        let mut used: Vec<_> = used.iter().copied().filter(|&(_, l)| l > 0).collect();
        used.sort();
        let mut free = BTreeMap::new();
        let mut at = 0u32;
        for (off, len) in used {
            if off > at {
                free.insert(at, off - at);
            }
            at = at.max(off + len);
        }
        if at < cap {
            free.insert(at, cap - at);
        }
        RangeAlloc { free }
    }
    fn alloc(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return Some(0);
        }
        let (&off, &flen) = self.free.iter().find(|&(_, &l)| l >= len)?;
        self.free.remove(&off);
        if flen > len {
            self.free.insert(off + len, flen - len);
        }
        Some(off)
    }
    fn release(&mut self, off: u32, len: u32) {
        if len == 0 {
            return;
        }
        let (mut off, mut len) = (off, len);
        if let Some((&p, &pl)) = self.free.range(..off).next_back()
            && p + pl == off
        {
            self.free.remove(&p);
            off = p;
            len += pl;
        }
        if let Some(&nl) = self.free.get(&(off + len)) {
            self.free.remove(&(off + len));
            len += nl;
        }
        self.free.insert(off, len);
    }
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
    pub ip: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub active: u64,
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
    pub svc_id: u32,
    pub backend_id: u32,
    pub state: &'static str,
    pub state_code: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
}

/// Zeroed per-CPU counters, one per possible CPU.
fn zero_counters() -> Result<PerCpuValues<Counters>, DatapathError> {
    let ncpu = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Io {
        path: "/sys/devices/system/cpu/possible".into(),
        source: e,
    })?;
    Ok(PerCpuValues::try_from(vec![Counters::default(); ncpu]).expect("one value per CPU"))
}

fn key_of(addr: &ServiceAddr) -> ServiceKey {
    ServiceKey {
        vip: u32::from_ne_bytes(addr.vip.octets()),
        port: addr.port.to_be(),
        proto: abi::proto_number(addr.protocol),
        _pad: 0,
    }
}

fn addr_of(k: &ServiceKey) -> Option<ServiceAddr> {
    let protocol = match k.proto {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        _ => return None,
    };
    Some(ServiceAddr {
        vip: Ipv4Addr::from(k.vip.to_ne_bytes()),
        port: u16::from_be(k.port),
        protocol,
    })
}

/// Wire (network order in a native int) <-> `Ipv4Addr`.
pub fn ip_wire(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}
pub fn ip_from_wire(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

fn table_hash(algo: u8, t: &[u32]) -> u32 {
    // FNV-1a over the algorithm and the slots.
    let mut h: u32 = 0x811c_9dc5 ^ algo as u32;
    for &v in t {
        for b in v.to_le_bytes() {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
    }
    h
}

fn backend_key(ip: Ipv4Addr, port: u16) -> u64 {
    ((u32::from(ip) as u64) << 16) | port as u64
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

/// Typed access to every map, plus the writer's index of what it wrote.
pub struct MapWriter {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    names: HashMap<MapData, u32, NameValue>,
    backends: Array<MapData, BackendValue>,
    slots: MapData,
    slots_cap: u32,
    conntrack: HashMap<MapData, FlowKey, CtValue>,
    /// A dup of the conntrack map's fd, for batch syscalls that aya lacks.
    conntrack_fd: std::os::fd::OwnedFd,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    rr: Array<MapData, u64>,
    svc_stats: PerCpuArray<MapData, Counters>,
    backend_stats: Array<MapData, Counters>,
    backend_conns: Array<MapData, ConnCounts>,
    backend_gc: Array<MapData, u64>,
    reasons: PerCpuArray<MapData, u64>,
    config: Array<MapData, u32>,
    svcs: BTreeMap<ServiceAddr, SvcState>,
    svc_ids: IdAlloc,
    backend_ids: IdAlloc,
    ranges: RangeAlloc,
    /// Test hook: runs right after a service entry switches to its new
    /// table, before backends leaving the table are marked (see
    /// [`Self::set_after_switch_hook`]).
    after_switch: Option<SwitchHook>,
}

impl MapWriter {
    /// Runs `hook` inside every [`Self::upsert_service`], right after the
    /// service entry switches to its new table: what the kernel sees between
    /// the two halves of a write (tests of the write order).
    pub fn set_after_switch_hook(&mut self, hook: Option<SwitchHook>) {
        self.after_switch = hook;
    }

    /// Takes the maps of a freshly loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let mut take = |name: &'static str| -> Result<Map, DatapathError> {
            ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))
        };
        let mut maps = StdHashMap::new();
        for &name in map_names::ALL {
            maps.insert(name, take(name)?);
        }
        Self::from_maps(maps)
    }

    /// Opens the maps pinned under `pin_path` (lbctl; needs no agent).
    pub fn open_pinned(pin_path: &Path) -> Result<Self, DatapathError> {
        let mut maps = StdHashMap::new();
        for &name in map_names::ALL {
            let p = pin_path.join(name);
            let md = MapData::from_pin(&p).map_err(map_err(name))?;
            maps.insert(name, Map::from_map_data(md).map_err(map_err(name))?);
        }
        Self::from_maps(maps)
    }

    fn from_maps(mut maps: StdHashMap<&'static str, Map>) -> Result<Self, DatapathError> {
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
        let backends: Array<MapData, BackendValue> = typed!(map_names::BACKENDS);
        let mut w = MapWriter {
            services: typed!(map_names::SERVICES),
            names: typed!(map_names::NAMES),
            svc_ids: IdAlloc::new(0),
            backend_ids: IdAlloc::new(backends.len()),
            backends,
            slots,
            slots_cap,
            conntrack: typed!(map_names::CONNTRACK),
            conntrack_fd,
            affinity: typed!(map_names::AFFINITY),
            rr: typed!(map_names::RR_COUNTERS),
            svc_stats: typed!(map_names::SVC_STATS),
            backend_stats: typed!(map_names::BACKEND_STATS),
            backend_conns: typed!(map_names::BACKEND_CONNS),
            backend_gc: typed!(map_names::BACKEND_GC),
            reasons: typed!(map_names::REASONS),
            config: typed!(map_names::CONFIG),
            svcs: BTreeMap::new(),
            ranges: RangeAlloc::new(0, &[]),
            after_switch: None,
        };
        w.svc_ids = IdAlloc::new(w.rr.len());
        w.adopt(backends_fd.as_fd())?;
        Ok(w)
    }

    /// Rebuilds the index from the maps (a restarted agent, or lbctl).
    fn adopt(&mut self, backends_fd: std::os::fd::BorrowedFd<'_>) -> Result<(), DatapathError> {
        let mut by_id: StdHashMap<u32, ServiceAddr> = StdHashMap::new();
        for item in self.services.iter() {
            let (k, v) = item.map_err(map_err(map_names::SERVICES))?;
            let Some(addr) = addr_of(&k) else { continue };
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
            if let Some(s) = by_id.get(&b.svc_id).and_then(|a| self.svcs.get_mut(a)) {
                s.backends.insert(
                    (ip_from_wire(b.ip), u16::from_be(b.port)),
                    BackendSlot { id, value: b },
                );
            }
        }
        let ids: Vec<u32> = by_id.keys().copied().collect();
        self.svc_ids.adopt(&ids);
        self.backend_ids.adopt(&used_backends);
        let ranges: Vec<(u32, u32)> = self
            .svcs
            .values()
            .map(|s| (s.value.table_off, s.value.table_len))
            .collect();
        self.ranges = RangeAlloc::new(self.slots_cap, &ranges);
        Ok(())
    }

    pub(crate) fn set_config(&mut self, fib_redirect: bool) -> Result<(), DatapathError> {
        self.config
            .set(config_idx::FIB_REDIRECT, fib_redirect as u32, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    /// Applies a whole desired state: upserts every service in it and removes
    /// the services that are not. Unchanged services cause no map writes.
    ///
    /// A service that cannot be written (invalid, or a full map) is refused
    /// alone: its previous version, if any, stays in the maps, the rest is
    /// applied, and the refusals are returned. Only a failure to remove a
    /// service (a map syscall error) ends the apply early.
    pub fn apply(&mut self, state: &DesiredState) -> Result<Vec<Refusal>, DatapathError> {
        let want: std::collections::BTreeSet<ServiceAddr> =
            state.services.iter().map(|s| s.addr()).collect();
        let gone: Vec<ServiceAddr> = self
            .svcs
            .keys()
            .filter(|a| !want.contains(a))
            .copied()
            .collect();
        let mut refused = Vec::new();
        for s in &state.services {
            // A service this writer wrote as it is now needs nothing (its
            // Maglev table alone costs ~0.3 ms to rebuild).
            if self
                .svcs
                .get(&s.addr())
                .is_some_and(|st| st.spec.as_ref() == Some(s))
            {
                continue;
            }
            if let Err(e) = self.upsert_service(s) {
                refused.push(Refusal {
                    service: s.name.clone(),
                    addr: Some(s.addr()),
                    reason: match e {
                        DatapathError::InvalidService(_, m) => m,
                        e => e.to_string(),
                    },
                });
            }
        }
        for a in gone {
            self.remove_service(&a)?;
        }
        Ok(refused)
    }

    /// Creates or updates one service and its backend set.
    pub fn upsert_service(&mut self, svc: &Service) -> Result<u32, DatapathError> {
        let addr = svc.addr();
        let invalid = |m: String| DatapathError::InvalidService(svc.name.clone(), m);
        svc.validate().map_err(|e| invalid(e.to_string()))?;
        let mut st = match self.svcs.get(&addr) {
            Some(s) => s.clone(),
            None => {
                let id = self
                    .svc_ids
                    .alloc()
                    .ok_or(DatapathError::Full("SERVICES", self.rr.len()))?;
                self.reset_service_counters(id)?;
                SvcState {
                    name: String::new(),
                    value: ServiceValue {
                        id,
                        ..Default::default()
                    },
                    backends: BTreeMap::new(),
                    spec: None,
                }
            }
        };
        let id = st.value.id;
        if st.name != svc.name {
            self.write_name(id, &svc.name)?;
            st.name = svc.name.clone();
        }

        // 1. Backends first: new ones get ids; changed ones that become (or
        //    stay) able to take new flows are rewritten now, before the new
        //    table can name them (an un-drain). The others wait for step 4.
        let mut next: BTreeMap<(Ipv4Addr, u16), BackendSlot> = BTreeMap::new();
        for b in &svc.backends {
            let k = (b.ip, b.port);
            let value = BackendValue {
                ip: ip_wire(b.ip),
                port: b.port.to_be(),
                state: match b.state {
                    BackendState::Active => backend_state::ACTIVE,
                    BackendState::Terminating => backend_state::TERMINATING,
                },
                _pad: 0,
                weight: b.weight,
                svc_id: id,
            };
            let slot = match st.backends.get(&k) {
                Some(old) => {
                    if old.value != value && b.takes_new_flows() {
                        self.backends
                            .set(old.id, value, 0)
                            .map_err(map_err(map_names::BACKENDS))?;
                    }
                    BackendSlot { id: old.id, value }
                }
                None => {
                    let bid = self
                        .backend_ids
                        .alloc()
                        .ok_or(DatapathError::Full("BACKENDS", self.backends.len()))?;
                    self.reset_backend_counters(bid)?;
                    self.backends
                        .set(bid, value, 0)
                        .map_err(map_err(map_names::BACKENDS))?;
                    BackendSlot { id: bid, value }
                }
            };
            next.insert(k, slot);
        }

        // 2. The table, into a fresh slice when it changed.
        let algo = abi::algo_code(svc.algorithm);
        let table = self.build_table(svc, &next).map_err(invalid)?;
        let hash = table_hash(algo, &table);
        let mut value = ServiceValue {
            id,
            table_off: st.value.table_off,
            table_len: st.value.table_len,
            affinity_timeout_s: svc
                .affinity_timeout
                .map(|d| d.as_secs().max(1) as u32)
                .unwrap_or(0),
            algo,
            _pad: [0; 3],
            table_hash: hash,
        };
        let old_range = (st.value.table_off, st.value.table_len);
        let table_changed = hash != st.value.table_hash || table.len() as u32 != st.value.table_len;
        if table_changed {
            let off = self
                .ranges
                .alloc(table.len() as u32)
                .ok_or(DatapathError::Full("SLOTS", self.slots_cap))?;
            if let Err(e) = self.write_slots(off, &table) {
                self.ranges.release(off, table.len() as u32);
                return Err(e);
            }
            value.table_off = off;
            value.table_len = table.len() as u32;
        }

        // 3. Switch the service (one atomic update).
        let existed = self.svcs.contains_key(&addr);
        if !existed || value != st.value {
            self.services
                .insert(key_of(&addr), value, 0)
                .map_err(map_err(map_names::SERVICES))?;
        }

        if let Some(hook) = self.after_switch.as_mut() {
            hook(&addr);
        }
        // 4. Existing backends that stop taking new flows (a drain): after
        //    the new table, so they are out of it before they are marked.
        for (k, slot) in &next {
            if let Some(old) = st.backends.get(k)
                && old.value != slot.value
                && !takes_new_flows(&slot.value)
            {
                self.backends
                    .set(slot.id, slot.value, 0)
                    .map_err(map_err(map_names::BACKENDS))?;
            }
        }
        // 5. Free what is no longer referenced.
        if table_changed {
            self.ranges.release(old_range.0, old_range.1);
        }
        for (k, old) in &st.backends {
            if !next.contains_key(k) {
                self.free_backend(old.id)?;
            }
        }
        st.value = value;
        st.backends = next;
        st.spec = Some(svc.clone());
        debug!(service = %svc.name, id, table_changed, "service written");
        self.svcs.insert(addr, st);
        Ok(id)
    }

    fn build_table(
        &self,
        svc: &Service,
        next: &BTreeMap<(Ipv4Addr, u16), BackendSlot>,
    ) -> Result<Vec<u32>, String> {
        let live: Vec<&BackendSlot> = next
            .values()
            .filter(|b| takes_new_flows(&b.value))
            .collect();
        if live.is_empty() {
            return Ok(Vec::new());
        }
        if svc.algorithm.uses_maglev_table() {
            let mb: Vec<maglev::MaglevBackend> = live
                .iter()
                .map(|b| maglev::MaglevBackend {
                    id: b.id,
                    key: backend_key(ip_from_wire(b.value.ip), u16::from_be(b.value.port)),
                    weight: b.value.weight,
                })
                .collect();
            maglev::build(&mb, svc.maglev_m()).map_err(|e| e.to_string())
        } else {
            let wb: Vec<(u32, u32)> = live.iter().map(|b| (b.id, b.value.weight)).collect();
            Ok(table::weighted_slots(&wb, limits::MAX_WEIGHTED_TABLE))
        }
    }

    /// Removes a service: its entry first (new flows stop), then its table and
    /// backends. Established flows keep their conntrack entries.
    pub fn remove_service(&mut self, addr: &ServiceAddr) -> Result<bool, DatapathError> {
        let Some(st) = self.svcs.remove(addr) else {
            return Ok(false);
        };
        match self.services.remove(&key_of(addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(map_names::SERVICES)(e)),
        }
        let _ = self.names.remove(&st.value.id);
        self.ranges.release(st.value.table_off, st.value.table_len);
        for b in st.backends.values() {
            self.free_backend(b.id)?;
        }
        self.svc_ids.release(st.value.id);
        Ok(true)
    }

    fn free_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.backends
            .set(id, BackendValue::default(), 0)
            .map_err(map_err(map_names::BACKENDS))?;
        self.backend_ids.release(id);
        Ok(())
    }

    fn reset_backend_counters(&mut self, id: u32) -> Result<(), DatapathError> {
        self.backend_stats
            .set(id, Counters::default(), 0)
            .map_err(map_err(map_names::BACKEND_STATS))?;
        self.backend_conns
            .set(id, ConnCounts::default(), 0)
            .map_err(map_err(map_names::BACKEND_CONNS))?;
        self.backend_gc
            .set(id, 0, 0)
            .map_err(map_err(map_names::BACKEND_GC))
    }

    fn reset_service_counters(&mut self, id: u32) -> Result<(), DatapathError> {
        let zero = zero_counters()?;
        self.svc_stats
            .set(id, zero, 0)
            .map_err(map_err(map_names::SVC_STATS))?;
        self.rr
            .set(id, 0, 0)
            .map_err(map_err(map_names::RR_COUNTERS))
    }

    fn write_name(&mut self, id: u32, name: &str) -> Result<(), DatapathError> {
        let mut v = NameValue::default();
        let b = name.as_bytes();
        let mut n = b.len().min(NAME_MAX);
        while !name.is_char_boundary(n) {
            n -= 1;
        }
        v.bytes[..n].copy_from_slice(&b[..n]);
        v.len = n as u32;
        self.names
            .insert(id, v, 0)
            .map_err(map_err(map_names::NAMES))
    }

    /// Writes `SLOTS[off..off+len]` with BPF_MAP_UPDATE_BATCH.
    fn write_slots(&mut self, off: u32, t: &[u32]) -> Result<(), DatapathError> {
        let keys: Vec<u32> = (off..off + t.len() as u32).collect();
        sys::update_batch(self.slots.fd().as_fd().as_raw_fd(), &keys, t, 8192).map_err(|source| {
            DatapathError::Io {
                path: "SLOTS (BPF_MAP_UPDATE_BATCH)".into(),
                source,
            }
        })
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

    // ---- reading ----

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
        self.services
            .get(&key_of(addr), 0)
            .map_err(map_err(map_names::SERVICES))
    }

    /// Backend id for `ip:port` of a service.
    pub fn backend_id(&self, addr: &ServiceAddr, ip: Ipv4Addr, port: u16) -> Option<u32> {
        self.svcs.get(addr)?.backends.get(&(ip, port)).map(|b| b.id)
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

    pub fn service_stats(&self, addr: &ServiceAddr) -> Result<ServiceStats, DatapathError> {
        let id = self.service_id(addr).ok_or_else(|| {
            DatapathError::InvalidService(addr.to_string(), "no such service".into())
        })?;
        let c = self.sum(&self.svc_stats, id, map_names::SVC_STATS)?;
        Ok(ServiceStats {
            packets: c.packets,
            bytes: c.bytes,
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
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                    active: self.backend_active(b.id)?,
                })
            })
            .collect()
    }

    /// Drop/pass/forward counters by reason, summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        lb_common::reason::NAMES
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let v = self
                    .reasons
                    .get(&(i as u32), 0)
                    .map_err(map_err(map_names::REASONS))?;
                Ok((n, v.iter().sum()))
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

    /// Direct access to the conntrack map (GC, tests).
    pub fn conntrack_map(&mut self) -> &mut HashMap<MapData, FlowKey, CtValue> {
        &mut self.conntrack
    }

    /// The conntrack map's fd (for BPF_MAP_*_BATCH calls).
    pub fn conntrack_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.conntrack_fd.as_fd()
    }

    /// Adds `n` to a backend's GC-expired count (agent-owned counter).
    pub fn add_expired(&mut self, backend_id: u32, n: u64) -> Result<(), DatapathError> {
        let cur = self
            .backend_gc
            .get(&backend_id, 0)
            .map_err(map_err(map_names::BACKEND_GC))?;
        self.backend_gc
            .set(backend_id, cur + n, 0)
            .map_err(map_err(map_names::BACKEND_GC))
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

    // ---- read-only helpers for GC and lbctl ----

    /// Every backend in use, from the index: id -> (service id, IP, port).
    /// GC uses it to credit expiries only to the backend a flow was opened
    /// on (an id that was freed and reused has fresh counters).
    pub fn backend_index(&self) -> StdHashMap<u32, (u32, Ipv4Addr, u16)> {
        self.svcs
            .values()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .map(move |(&(ip, port), b)| (b.id, (s.value.id, ip, port)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_alloc_first_fit_and_merge() {
        let mut r = RangeAlloc::new(100, &[(10, 10)]);
        assert_eq!(r.alloc(10), Some(0));
        assert_eq!(r.alloc(5), Some(20));
        assert_eq!(r.alloc(80), None);
        r.release(0, 10);
        r.release(10, 10);
        assert_eq!(r.alloc(20), Some(0));
        r.release(20, 5);
        r.release(0, 20);
        assert_eq!(r.free.len(), 1);
        assert_eq!(r.alloc(100), Some(0));
    }

    #[test]
    fn id_alloc_reuses_oldest_freed_last() {
        let mut a = IdAlloc::new(4);
        assert_eq!(
            (a.alloc(), a.alloc(), a.alloc()),
            (Some(1), Some(2), Some(3))
        );
        assert_eq!(a.alloc(), None);
        a.release(2);
        a.release(1);
        assert_eq!((a.alloc(), a.alloc(), a.alloc()), (Some(2), Some(1), None));
        a.adopt(&[3, 5]);
        assert_eq!(a.next, 6);
        assert_eq!(a.free, VecDeque::from(vec![1, 2, 4]));
    }
}
