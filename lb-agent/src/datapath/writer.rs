//! The typed map writer: the one way userspace changes the data path. It is
//! a [`MapReader`] (it derefs to one) plus the writes and the allocators.
//!
//! Ordering rules, so the kernel never sees a service pointing at something
//! missing or unusable: new backends, and existing ones that become able to
//! take new flows, are written before the table that names them; a new
//! table is written to a fresh slice of `SLOTS` before the service entry is
//! switched to it (one map update, atomic); backends that stop taking new
//! flows are marked, and old backends and slices freed, only after the
//! switch.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, PerCpuValues},
};
use lb_api::{BackendState, DesiredState, Refusal, Service, ServiceAddr};
use lb_common::{
    BackendValue, ConnCounts, Counters, CtValue, CtValue6, FlowKey, FlowKey6, NAME_MAX, NameValue,
    ServiceKey, ServiceValue, backend_flags, backend_state, config_idx, limits, map_names,
    svc_flags,
};
use tracing::debug;

use super::alloc::{IdAlloc, RangeAlloc};
use super::reader::{
    BackendSlot, MapReader, SvcState, ip_wire, ip6_wire, key_of, key6_of, map_err,
};
use super::{DatapathError, abi, maglev, sys, table};

/// See [`MapWriter::set_after_switch_hook`].
pub type SwitchHook = Box<dyn FnMut(&ServiceAddr) + Send>;

/// Whether the kernel may pick this backend for a new flow
/// (`select::backend` in lb-ebpf).
fn takes_new_flows(v: &BackendValue) -> bool {
    v.state == backend_state::ACTIVE && v.weight > 0
}

/// Zeroed per-CPU counters, one per possible CPU.
fn zero_counters() -> Result<PerCpuValues<Counters>, DatapathError> {
    let ncpu = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Io {
        path: "/sys/devices/system/cpu/possible".into(),
        source: e,
    })?;
    Ok(PerCpuValues::try_from(vec![Counters::default(); ncpu]).expect("one value per CPU"))
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

/// A backend's `FRONTENDS` key: its ip:port and its service's protocol.
/// IPv4 only: IPv6 flows always write both conntrack entries (`CONNTRACK6`).
fn frontend_key(proto: u8, ip: IpAddr, port: u16) -> Option<ServiceKey> {
    let IpAddr::V4(ip) = ip else {
        return None;
    };
    Some(ServiceKey {
        vip: ip_wire(ip),
        port: port.to_be(),
        proto,
        _pad: 0,
    })
}

/// Which frontends (services' addresses) reach each IPv4 backend ip:port:proto.
fn frontend_refs(
    svcs: &BTreeMap<ServiceAddr, SvcState>,
) -> StdHashMap<ServiceKey, BTreeSet<ServiceAddr>> {
    let mut refs: StdHashMap<ServiceKey, BTreeSet<ServiceAddr>> = StdHashMap::new();
    for (addr, st) in svcs {
        let proto = key_of(addr).proto;
        for &(ip, port) in st.backends.keys() {
            if let Some(fk) = frontend_key(proto, ip, port) {
                refs.entry(fk).or_default().insert(*addr);
            }
        }
    }
    refs
}

/// The maps, their index, and the allocators of ids and table slices.
pub struct MapWriter {
    r: MapReader,
    svc_ids: IdAlloc,
    backend_ids: IdAlloc,
    ranges: RangeAlloc,
    /// The frontends of every backend ip:port:proto in the maps: a backend
    /// with one gets `backend_flags::ONE_FRONTEND` and a `FRONTENDS` entry
    /// (its new flows write their reverse entry at the first reply).
    refs: StdHashMap<ServiceKey, BTreeSet<ServiceAddr>>,
    /// What `FRONTENDS` holds (a mirror, to write only changes).
    frontends: StdHashMap<ServiceKey, ServiceKey>,
    /// Test hook: runs right after a service entry switches to its new
    /// table, before backends leaving the table are marked (see
    /// [`Self::set_after_switch_hook`]).
    after_switch: Option<SwitchHook>,
    /// The backends that get `backend_flags::SNAT`: (front end, backend
    /// ip, port), from `crate::external::expand_snat`.
    snat: SnatSet,
    /// The pin path, where user-defined selectors are loaded (`selector`);
    /// `None`: selectors are not installed (the built-in algorithm).
    pin: Option<std::path::PathBuf>,
    /// `SELECTOR_BACKENDS`, when the object has it.
    sel_backends: Option<HashMap<MapData, u32, lb_common::SelectorCandidates>>,
    /// Service id -> its selector in place.
    selectors: BTreeMap<u32, super::selector::Installed>,
    /// Why a service's selector is not in place (its last failure).
    selector_errors: BTreeMap<ServiceAddr, String>,
    /// Where selectors come from, and whether a path may be loaded.
    selector_source: super::selector::SelectorSource,
    /// Services whose selector's object file was missing at their last
    /// write ([`Self::retry_missing_selectors`]).
    selector_missing: BTreeSet<ServiceAddr>,
}

/// (front end, backend ip, backend port) of every backend to SNAT.
pub type SnatSet = std::collections::HashSet<(ServiceAddr, IpAddr, u16)>;

/// So that code shared by the agent (a `Datapath` behind a lock) and tools with a bare writer
/// can take either (`gc::tick`).
impl AsMut<MapWriter> for MapWriter {
    fn as_mut(&mut self) -> &mut MapWriter {
        self
    }
}

impl std::ops::Deref for MapWriter {
    type Target = MapReader;
    fn deref(&self) -> &MapReader {
        &self.r
    }
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
        let sel = ebpf.take_map(map_names::SELECTOR_BACKENDS);
        let mut w = Self::from_maps(maps)?;
        w.sel_backends = sel.and_then(|m| HashMap::try_from(m).ok());
        Ok(w)
    }

    /// Where user-defined selectors are loaded (`Datapath::load` sets it).
    pub fn set_pin_path(&mut self, pin: &Path) {
        self.pin = Some(pin.to_path_buf());
    }

    /// Why a service's selector is not in place (its last load failure), by
    /// service; the service uses its built-in algorithm meanwhile.
    pub fn selector_errors(&self) -> &BTreeMap<ServiceAddr, String> {
        &self.selector_errors
    }

    /// Where selectors come from (`--selector-dir`), and whether a path
    /// may be loaded (the agent's own `--config` only). Default: the
    /// default directory, paths refused.
    pub fn set_selector_source(&mut self, from: super::selector::SelectorSource) {
        self.selector_source = from;
    }

    /// Writes again each service whose selector's object file was missing
    /// and is there now (a `NAME.o` put in `--selector-dir` after its
    /// service named it; the agent calls this every GC tick): true when one
    /// was. One `stat` per waiting service; other failures wait for a
    /// change of their service.
    pub fn retry_missing_selectors(&mut self) -> Result<bool, DatapathError> {
        let due: Vec<Service> = self
            .selector_missing
            .iter()
            .filter_map(|a| {
                let spec = self.r.svcs.get(a)?.spec.clone()?;
                let name = spec.selector.as_deref()?;
                match super::selector::resolve(name, &self.selector_source) {
                    Ok(super::selector::Object::File(p)) if p.exists() => Some(spec),
                    _ => None,
                }
            })
            .collect();
        for s in &due {
            self.upsert_service(s)?;
        }
        if !due.is_empty() {
            self.invalidate_flow_cache()?;
        }
        Ok(!due.is_empty())
    }

    /// Every service in the maps that names a selector: `loaded`, or why
    /// not (for `/status`, `lbctl selector list` and the metrics).
    pub fn selector_status(&self) -> Vec<super::selector::SelectorStatus> {
        self.r
            .svcs
            .iter()
            .filter_map(|(addr, st)| {
                let spec = st.spec.as_ref()?;
                let selector = spec.selector.clone()?;
                let state = if st.value.flags & svc_flags::SELECTOR != 0 {
                    super::selector::SelectorStatus::LOADED.to_string()
                } else {
                    self.selector_errors.get(addr).cloned().unwrap_or_else(|| {
                        "not loaded: this data path runs no selectors (the built-in algorithm)"
                            .to_string()
                    })
                };
                Some(super::selector::SelectorStatus {
                    service: spec.name.clone(),
                    selector,
                    state,
                })
            })
            .collect()
    }

    /// Whether service `addr` has its selector in place.
    pub fn selector_in_place(&self, addr: &ServiceAddr) -> bool {
        self.r
            .svcs
            .get(addr)
            .is_some_and(|st| st.value.flags & svc_flags::SELECTOR != 0)
    }

    /// Writes the candidates of a service with a selector, and puts its
    /// selector in place if it is not (`selector`): true when it is in
    /// place. A failure is logged and kept ([`Self::selector_errors`]).
    fn prepare_selector(
        &mut self,
        svc: &Service,
        id: u32,
        next: &BTreeMap<(IpAddr, u16), BackendSlot>,
    ) -> Result<bool, DatapathError> {
        let Some(source) = &svc.selector else {
            return Ok(false);
        };
        let (Some(pin), Some(map)) = (self.pin.clone(), self.sel_backends.as_mut()) else {
            return Ok(false);
        };
        let mut c = lb_common::SelectorCandidates::default();
        for b in svc
            .backends
            .iter()
            .take(lb_common::selector::MAX_CANDIDATES)
        {
            if let Some(slot) = next.get(&(b.ip, b.port)) {
                c.backends[c.n as usize] = slot.id;
                c.n += 1;
            }
        }
        map.insert(id, c, 0)
            .map_err(map_err(map_names::SELECTOR_BACKENDS))?;
        if self.selectors.get(&id).is_some_and(|i| &i.source == source) {
            return Ok(true);
        }
        match super::selector::install(&pin, source, &self.selector_source, id, c.n) {
            Ok(i) => {
                self.selectors.insert(id, i);
                self.selector_errors.remove(&svc.addr());
                self.selector_missing.remove(&svc.addr());
                tracing::info!(service = %svc.name, selector = %source, "selector in place");
                Ok(true)
            }
            Err(e) => {
                tracing::error!(
                    service = %svc.name,
                    "{e}; the service keeps its built-in algorithm"
                );
                self.selector_errors.insert(svc.addr(), e.to_string());
                let missing = matches!(&e, super::selector::SelectorError::Read { error, .. }
                    if error.kind() == std::io::ErrorKind::NotFound);
                if missing {
                    self.selector_missing.insert(svc.addr());
                } else {
                    self.selector_missing.remove(&svc.addr());
                }
                Ok(false)
            }
        }
    }

    /// After service `id`'s entry stopped naming a selector (or went):
    /// empties its slots and forgets its candidates.
    fn drop_selector(&mut self, id: u32) {
        if self.selectors.remove(&id).is_none() {
            return;
        }
        if let Some(pin) = &self.pin
            && let Err((map, e)) = super::selector::put(pin, id, None)
        {
            tracing::warn!(map, "clearing a selector slot: {e}");
        }
        if let Some(m) = self.sel_backends.as_mut() {
            let _ = m.remove(&id);
        }
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

    fn from_maps(maps: StdHashMap<&'static str, Map>) -> Result<Self, DatapathError> {
        let (r, used_backends) = MapReader::from_maps(maps)?;
        let mut svc_ids = IdAlloc::new(r.rr.len());
        let mut backend_ids = IdAlloc::new(r.backends.len());
        let ids: Vec<u32> = r.svcs.values().map(|s| s.value.id).collect();
        svc_ids.adopt(&ids);
        backend_ids.adopt(&used_backends);
        let ranges: Vec<(u32, u32)> = r
            .svcs
            .values()
            .map(|s| (s.value.table_off, s.value.table_len))
            .collect();
        let ranges = RangeAlloc::new(r.slots_cap, &ranges);
        let refs = frontend_refs(&r.svcs);
        let mut frontends = StdHashMap::new();
        for kv in r.frontends.iter() {
            let (k, v) = kv.map_err(map_err(map_names::FRONTENDS))?;
            frontends.insert(k, v);
        }
        Ok(MapWriter {
            r,
            svc_ids,
            backend_ids,
            ranges,
            refs,
            frontends,
            after_switch: None,
            snat: SnatSet::new(),
            pin: None,
            sel_backends: None,
            selectors: BTreeMap::new(),
            selector_errors: BTreeMap::new(),
            selector_source: Default::default(),
            selector_missing: BTreeSet::new(),
        })
    }

    /// Bumps the map generation (`CONFIG[FLOW_GEN]`): every entry of the
    /// kernel's per-CPU flow cache written before is stale, and the flows'
    /// next packets take the full path through the maps. Called after every
    /// change of the maps (a packet that read the new generation then also
    /// sees the change).
    /// While the cache is off (generation 0), it stays off.
    pub fn invalidate_flow_cache(&mut self) -> Result<(), DatapathError> {
        let cur = self
            .r
            .config
            .get(&config_idx::FLOW_GEN, 0)
            .map_err(map_err(map_names::CONFIG))?;
        if cur == 0 {
            return Ok(());
        }
        self.set_flow_gen(cur.wrapping_add(1).max(1))
    }

    /// Turns the kernel's flow cache on (the default once the agent has
    /// written its configuration) or off (generation 0; the benchmark's
    /// comparison).
    pub fn set_flow_cache(&mut self, on: bool) -> Result<(), DatapathError> {
        let cur = self
            .r
            .config
            .get(&config_idx::FLOW_GEN, 0)
            .map_err(map_err(map_names::CONFIG))?;
        match (on, cur) {
            (true, 0) => self.set_flow_gen(1),
            (true, _) => self.invalidate_flow_cache(),
            (false, _) => self.set_flow_gen(0),
        }
    }

    fn set_flow_gen(&mut self, v: u32) -> Result<(), DatapathError> {
        self.r
            .config
            .set(config_idx::FLOW_GEN, v, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    /// The backends to SNAT from the next [`Self::apply`] on (a service whose
    /// flags change is rewritten even if its spec did not).
    pub fn set_snat(&mut self, snat: SnatSet) {
        self.snat = snat;
    }

    /// Writes the SNAT addresses and ports (`config_idx::SNAT_*`). No
    /// address of a family: SNAT to the node's address off for it (0), the
    /// ports still serve hairpin flows (their address is
    /// `SERVICE_LOOPBACK_V4`/`_V6`); no ports: all off (count 0).
    pub(crate) fn set_snat_config(
        &mut self,
        addr: Option<std::net::Ipv4Addr>,
        addr6: Option<std::net::Ipv6Addr>,
        ports: Option<super::PortRange>,
    ) -> Result<(), DatapathError> {
        let (first, count) = match ports {
            Some(r) => (u32::from(r.first), r.count()),
            None => (0, 0),
        };
        let a6 = addr6.map_or([0; 4], super::reader::ip6_wire);
        for (idx, v) in [
            (config_idx::SNAT_ADDR, addr.map_or(0, ip_wire)),
            (config_idx::SNAT_PORT_MIN, first),
            (config_idx::SNAT_PORT_COUNT, count),
            (config_idx::SNAT_ADDR6, a6[0]),
            (config_idx::SNAT_ADDR6 + 1, a6[1]),
            (config_idx::SNAT_ADDR6 + 2, a6[2]),
            (config_idx::SNAT_ADDR6 + 3, a6[3]),
        ] {
            self.r
                .config
                .set(idx, v, 0)
                .map_err(map_err(map_names::CONFIG))?;
        }
        self.invalidate_flow_cache()
    }

    pub(crate) fn set_config(
        &mut self,
        fib_redirect: bool,
        collision_ports: Option<super::PortRange>,
    ) -> Result<(), DatapathError> {
        let (first, count) = collision_ports.map_or((0, 0), |r| (u32::from(r.first), r.count()));
        for (idx, v) in [
            (config_idx::FIB_REDIRECT, fib_redirect as u32),
            (config_idx::COLLISION_PORT_MIN, first),
            (config_idx::COLLISION_PORT_COUNT, count),
        ] {
            self.r
                .config
                .set(idx, v, 0)
                .map_err(map_err(map_names::CONFIG))?;
        }
        self.set_flow_cache(true)
    }

    /// Sets the `XDP_IFACES` flags of one interface (`lb_common::xdp_iface`).
    /// An ifindex past the map is left out: native XDP then hands packets
    /// for it to the stack, which is slower but delivers them.
    pub fn set_xdp_iface(&mut self, ifindex: u32, flags: u32) -> Result<(), DatapathError> {
        if ifindex >= self.r.xdp_ifaces.len() {
            return Ok(());
        }
        self.r
            .xdp_ifaces
            .set(ifindex, flags, 0)
            .map_err(map_err(map_names::XDP_IFACES))?;
        self.invalidate_flow_cache()
    }

    /// Makes `XDP_IFACES` hold exactly `want` (ifindex -> flags).
    pub fn sync_xdp_ifaces(&mut self, want: &BTreeMap<u32, u32>) -> Result<(), DatapathError> {
        let have = self.r.xdp_ifaces()?;
        for (&i, _) in have.iter().filter(|(i, _)| !want.contains_key(i)) {
            self.set_xdp_iface(i, 0)?;
        }
        for (&i, &f) in want.iter().filter(|(i, f)| have.get(i) != Some(f)) {
            self.set_xdp_iface(i, f)?;
        }
        Ok(())
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
                .is_some_and(|st| st.spec.as_ref() == Some(s) && self.snat_unchanged(s, st))
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

    /// Whether every backend of `s` has, in the maps (`st`), the SNAT flag
    /// the current set gives it.
    fn snat_unchanged(&self, s: &Service, st: &super::reader::SvcState) -> bool {
        let addr = s.addr();
        st.backends.iter().all(|(&(ip, port), slot)| {
            (slot.value.flags & backend_flags::SNAT != 0) == self.snat.contains(&(addr, ip, port))
        })
    }

    /// Creates or updates one service and its backend set.
    pub fn upsert_service(&mut self, svc: &Service) -> Result<u32, DatapathError> {
        let r = self.upsert_service_inner(svc);
        if r.is_err() {
            // What the maps hold now; a backend whose flag was cleared for a
            // frontend that did not come keeps the (always correct) eager path
            // until its service is written again.
            self.refs = frontend_refs(&self.r.svcs);
        }
        // Also after a failure half-way: some maps may have changed.
        self.invalidate_flow_cache()?;
        r
    }

    fn upsert_service_inner(&mut self, svc: &Service) -> Result<u32, DatapathError> {
        let addr = svc.addr();
        let invalid = |m: String| DatapathError::InvalidService(svc.name.clone(), m);
        svc.validate().map_err(|e| invalid(e.to_string()))?;
        let mut st = match self.r.svcs.get(&addr) {
            Some(s) => s.clone(),
            None => {
                let id = self
                    .svc_ids
                    .alloc()
                    .ok_or(DatapathError::Full("SERVICES", self.r.rr.len()))?;
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

        // 0. Frontends: a backend ip:port:proto that this service makes a
        //    second frontend of loses its `ONE_FRONTEND` flag (in the other
        //    services) before this service's entry can send flows to it.
        let proto = key_of(&addr).proto;
        for b in &svc.backends {
            if let Some(fk) = frontend_key(proto, b.ip, b.port) {
                self.add_frontend(fk, addr)?;
            }
        }

        // 1. Backends first: new ones get ids; changed ones that become (or
        //    stay) able to take new flows are rewritten now, before the new
        //    table can name them (an un-drain). The others wait for step 4.
        //    A backend of one frontend (this service) gets its `FRONTENDS`
        //    entry before its flag.
        let mut next: BTreeMap<(IpAddr, u16), BackendSlot> = BTreeMap::new();
        for b in &svc.backends {
            let k = (b.ip, b.port);
            let fk = frontend_key(proto, b.ip, b.port);
            let one = fk.is_some_and(|fk| self.refs.get(&fk).is_some_and(|s| s.len() == 1));
            if let (true, Some(fk)) = (one, fk) {
                self.set_frontend(fk, key_of(&addr))?;
            }
            let value = BackendValue {
                // An IPv6 backend's address is in `BACKENDS6` (written
                // with its id, before any table names it).
                ip: match b.ip {
                    IpAddr::V4(v4) => ip_wire(v4),
                    IpAddr::V6(_) => 0,
                },
                port: b.port.to_be(),
                state: match b.state {
                    BackendState::Active => backend_state::ACTIVE,
                    BackendState::Terminating => backend_state::TERMINATING,
                },
                flags: if one { backend_flags::ONE_FRONTEND } else { 0 }
                    | if self.snat.contains(&(addr, b.ip, b.port)) {
                        backend_flags::SNAT
                    } else {
                        0
                    },
                weight: b.weight,
                svc_id: id,
            };
            // Before the service's `LIMITED` flag can make the kernel read it.
            let limit = svc.limit_of(b).unwrap_or(0);
            let slot = match st.backends.get(&k) {
                Some(old) => {
                    if old.limit != limit {
                        self.set_limit(old.id, limit)?;
                    }
                    if old.value != value && b.takes_new_flows() {
                        self.r
                            .backends
                            .set(old.id, value, 0)
                            .map_err(map_err(map_names::BACKENDS))?;
                    }
                    BackendSlot {
                        id: old.id,
                        value,
                        limit,
                    }
                }
                None => {
                    let bid = self
                        .backend_ids
                        .alloc()
                        .ok_or(DatapathError::Full("BACKENDS", self.r.backends.len()))?;
                    self.reset_backend_counters(bid)?;
                    self.set_limit(bid, limit)?;
                    if let IpAddr::V6(v6) = b.ip {
                        self.r
                            .backends6
                            .set(bid, ip6_wire(v6), 0)
                            .map_err(map_err(map_names::BACKENDS6))?;
                    }
                    self.r
                        .backends
                        .set(bid, value, 0)
                        .map_err(map_err(map_names::BACKENDS))?;
                    BackendSlot {
                        id: bid,
                        value,
                        limit,
                    }
                }
            };
            next.insert(k, slot);
        }

        // 1b. A user-defined selector: its candidates, then its programs,
        //     before the flag in the entry can make the kernel call it.
        let selector_on = self.prepare_selector(svc, id, &next)?;

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
            flags: if svc.grpc.is_none() && svc.has_limits() {
                svc_flags::LIMITED
            } else {
                0
            } | if selector_on { svc_flags::SELECTOR } else { 0 },
            _pad: [0; 2],
            table_hash: hash,
        };
        let old_range = (st.value.table_off, st.value.table_len);
        let table_changed = hash != st.value.table_hash || table.len() as u32 != st.value.table_len;
        if table_changed {
            let off = self
                .ranges
                .alloc(table.len() as u32)
                .ok_or(DatapathError::Full("SLOTS", self.r.slots_cap))?;
            if let Err(e) = self.write_slots(off, &table) {
                self.ranges.release(off, table.len() as u32);
                return Err(e);
            }
            value.table_off = off;
            value.table_len = table.len() as u32;
        }

        // 3. Switch the service (one atomic update).
        let existed = self.r.svcs.contains_key(&addr);
        if !existed || value != st.value {
            if addr.vip.is_ipv6() {
                self.r
                    .services6
                    .insert(key6_of(&addr), value, 0)
                    .map_err(map_err(map_names::SERVICES6))?;
            } else {
                self.r
                    .services
                    .insert(key_of(&addr), value, 0)
                    .map_err(map_err(map_names::SERVICES))?;
            }
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
                self.r
                    .backends
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
                if let Some(fk) = frontend_key(proto, k.0, k.1) {
                    self.drop_frontend(fk, &addr)?;
                }
            }
        }
        if !selector_on {
            // After the entry that no longer asks it.
            self.drop_selector(id);
        }
        st.value = value;
        st.backends = next;
        st.spec = Some(svc.clone());
        debug!(service = %svc.name, id, table_changed, "service written");
        self.r.svcs.insert(addr, st);
        Ok(id)
    }

    fn build_table(
        &self,
        svc: &Service,
        next: &BTreeMap<(IpAddr, u16), BackendSlot>,
    ) -> Result<Vec<u32>, String> {
        let live: Vec<(&(IpAddr, u16), &BackendSlot)> = next
            .iter()
            .filter(|(_, b)| takes_new_flows(&b.value))
            .collect();
        if live.is_empty() {
            return Ok(Vec::new());
        }
        if svc.algorithm.uses_maglev_table() {
            let mb: Vec<maglev::MaglevBackend> = live
                .iter()
                .map(|&(&(ip, port), b)| maglev::MaglevBackend {
                    id: b.id,
                    key: maglev::backend_key(ip, port),
                    weight: b.value.weight,
                })
                .collect();
            maglev::build(&mb, svc.maglev_m()).map_err(|e| e.to_string())
        } else {
            let wb: Vec<(u32, u32)> = live.iter().map(|(_, b)| (b.id, b.value.weight)).collect();
            Ok(table::weighted_slots(&wb, limits::MAX_WEIGHTED_TABLE))
        }
    }

    /// Removes a service: its entry first (new flows stop), then its table and
    /// backends. Established flows keep their conntrack entries.
    pub fn remove_service(&mut self, addr: &ServiceAddr) -> Result<bool, DatapathError> {
        let r = self.remove_service_inner(addr);
        self.invalidate_flow_cache()?;
        r
    }

    fn remove_service_inner(&mut self, addr: &ServiceAddr) -> Result<bool, DatapathError> {
        let Some(st) = self.r.svcs.remove(addr) else {
            return Ok(false);
        };
        let removed = if addr.vip.is_ipv6() {
            self.r.services6.remove(&key6_of(addr))
        } else {
            self.r.services.remove(&key_of(addr))
        };
        match removed {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(map_names::SERVICES)(e)),
        }
        let _ = self.r.names.remove(&st.value.id);
        self.drop_selector(st.value.id);
        self.selector_errors.remove(addr);
        self.selector_missing.remove(addr);
        self.ranges.release(st.value.table_off, st.value.table_len);
        for b in st.backends.values() {
            self.free_backend(b.id)?;
        }
        let proto = key_of(addr).proto;
        for &(ip, port) in st.backends.keys() {
            if let Some(fk) = frontend_key(proto, ip, port) {
                self.drop_frontend(fk, addr)?;
            }
        }
        self.svc_ids.release(st.value.id);
        Ok(true)
    }

    /// `addr` reaches the backend `k`. If that makes a second frontend, the
    /// other's backend entry loses `ONE_FRONTEND` now (its `FRONTENDS` entry
    /// stays: flows it already sent wait for their first reply there).
    fn add_frontend(&mut self, k: ServiceKey, addr: ServiceAddr) -> Result<(), DatapathError> {
        let set = self.refs.entry(k).or_default();
        if !set.insert(addr) || set.len() != 2 {
            return Ok(());
        }
        let other = *set.iter().find(|a| **a != addr).expect("two frontends");
        self.set_one_frontend(&other, k, false)
    }

    /// `addr` no longer reaches the backend `k`: the one frontend left gets
    /// the `FRONTENDS` entry, then the flag; with none left, the entry goes.
    fn drop_frontend(&mut self, k: ServiceKey, addr: &ServiceAddr) -> Result<(), DatapathError> {
        let Some(set) = self.refs.get_mut(&k) else {
            return Ok(());
        };
        set.remove(addr);
        match set.len() {
            0 => {
                self.refs.remove(&k);
                if self.frontends.remove(&k).is_some() {
                    match self.r.frontends.remove(&k) {
                        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                        Err(e) => return Err(map_err(map_names::FRONTENDS)(e)),
                    }
                }
                Ok(())
            }
            1 => {
                let last = *set.iter().next().expect("one frontend");
                self.set_frontend(k, key_of(&last))?;
                self.set_one_frontend(&last, k, true)
            }
            _ => Ok(()),
        }
    }

    /// Writes `FRONTENDS[k] = fe` unless it holds that already.
    fn set_frontend(&mut self, k: ServiceKey, fe: ServiceKey) -> Result<(), DatapathError> {
        if self.frontends.get(&k) == Some(&fe) {
            return Ok(());
        }
        self.r
            .frontends
            .insert(k, fe, 0)
            .map_err(map_err(map_names::FRONTENDS))?;
        self.frontends.insert(k, fe);
        Ok(())
    }

    /// Sets or clears `ONE_FRONTEND` on the backend `k` of the service at
    /// `addr` (its entry as the index knows it, all else unchanged).
    fn set_one_frontend(
        &mut self,
        addr: &ServiceAddr,
        k: ServiceKey,
        on: bool,
    ) -> Result<(), DatapathError> {
        let bk = (
            IpAddr::V4(super::reader::ip_from_wire(k.vip)),
            u16::from_be(k.port),
        );
        let Some(slot) = self
            .r
            .svcs
            .get_mut(addr)
            .and_then(|st| st.backends.get_mut(&bk))
        else {
            return Ok(());
        };
        let flags = if on {
            slot.value.flags | backend_flags::ONE_FRONTEND
        } else {
            slot.value.flags & !backend_flags::ONE_FRONTEND
        };
        if flags == slot.value.flags {
            return Ok(());
        }
        slot.value.flags = flags;
        let (id, value) = (slot.id, slot.value);
        self.r
            .backends
            .set(id, value, 0)
            .map_err(map_err(map_names::BACKENDS))
    }

    fn free_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.r
            .backends
            .set(id, BackendValue::default(), 0)
            .map_err(map_err(map_names::BACKENDS))?;
        self.backend_ids.release(id);
        Ok(())
    }

    fn set_limit(&mut self, id: u32, limit: u32) -> Result<(), DatapathError> {
        self.r
            .backend_limits
            .set(id, limit, 0)
            .map_err(map_err(map_names::BACKEND_LIMITS))
    }

    fn reset_backend_counters(&mut self, id: u32) -> Result<(), DatapathError> {
        self.r
            .backend_stats
            .set(id, Counters::default(), 0)
            .map_err(map_err(map_names::BACKEND_STATS))?;
        self.r
            .backend_conns
            .set(id, ConnCounts::default(), 0)
            .map_err(map_err(map_names::BACKEND_CONNS))?;
        self.r
            .backend_gc
            .set(id, 0, 0)
            .map_err(map_err(map_names::BACKEND_GC))
    }

    fn reset_service_counters(&mut self, id: u32) -> Result<(), DatapathError> {
        let zero = zero_counters()?;
        self.r
            .svc_stats
            .set(id, zero, 0)
            .map_err(map_err(map_names::SVC_STATS))?;
        self.r
            .rr
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
        self.r
            .names
            .insert(id, v, 0)
            .map_err(map_err(map_names::NAMES))
    }

    /// Writes `SLOTS[off..off+len]` with BPF_MAP_UPDATE_BATCH.
    fn write_slots(&mut self, off: u32, t: &[u32]) -> Result<(), DatapathError> {
        let keys: Vec<u32> = (off..off + t.len() as u32).collect();
        sys::update_batch(self.r.slots.fd().as_fd().as_raw_fd(), &keys, t, 8192).map_err(|source| {
            DatapathError::Io {
                path: "SLOTS (BPF_MAP_UPDATE_BATCH)".into(),
                source,
            }
        })
    }

    /// Direct access to the conntrack map (GC, tests). Whoever changes it
    /// calls [`Self::invalidate_flow_cache`] afterwards.
    pub fn conntrack_map(&mut self) -> &mut HashMap<MapData, FlowKey, CtValue> {
        &mut self.r.conntrack
    }

    /// Sets a backend's GC-expired count (the GC's recount). The kernel
    /// never writes this counter, so no kernel update is lost.
    pub fn set_expired(&mut self, backend_id: u32, v: u64) -> Result<(), DatapathError> {
        self.r
            .backend_gc
            .set(backend_id, v, 0)
            .map_err(map_err(map_names::BACKEND_GC))
    }

    /// Every entry of `CONNTRACK6` (forward and reverse), key by key.
    pub fn conntrack6_entries(&self) -> Result<Vec<(FlowKey6, CtValue6)>, DatapathError> {
        let mut out = Vec::new();
        for item in self.r.conntrack6.iter() {
            match item {
                Ok(kv) => out.push(kv),
                // Evicted between the key walk and its lookup.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::CONNTRACK6)(e)),
            }
        }
        Ok(out)
    }

    /// One `CONNTRACK6` entry, if present.
    pub fn conntrack6_get(&self, k: &FlowKey6) -> Result<Option<CtValue6>, DatapathError> {
        match self.r.conntrack6.get(k, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::CONNTRACK6)(e)),
        }
    }

    /// Deletes one `CONNTRACK6` entry (gone already is fine).
    pub fn conntrack6_remove(&mut self, k: &FlowKey6) -> Result<(), DatapathError> {
        match self.r.conntrack6.remove(k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map_names::CONNTRACK6)(e)),
        }
    }

    /// Adds `n` to a backend's GC-expired count (agent-owned counter).
    pub fn add_expired(&mut self, backend_id: u32, n: u64) -> Result<(), DatapathError> {
        let cur = self
            .backend_gc
            .get(&backend_id, 0)
            .map_err(map_err(map_names::BACKEND_GC))?;
        self.r
            .backend_gc
            .set(backend_id, cur + n, 0)
            .map_err(map_err(map_names::BACKEND_GC))
    }
}
