//! Load, attach and pin the kernel programs, and write their maps.
//!
//! Layout under the pin path (default `/sys/fs/bpf/rpclb`):
//! every map by name (`SERVICES`, `CONNTRACK`, ...) and `links/<xdp|tc>_<ifname>`.
//! The maps and links outlive the agent, so traffic keeps flowing while it is
//! down, and a restarted agent adopts the same state.

pub mod abi;
mod alloc;
pub mod attach;
pub mod maglev;
pub mod memory;
pub mod pin;
pub mod programs;
pub mod reader;
pub mod scratch;
pub mod selector;
pub mod sys;
pub mod table;
pub mod writer;

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, SchedClassifier, Xdp, links::LinkError},
};
use lb_common::{limits, map_names};
use tracing::{info, warn};

pub use programs::{BpfPrograms, ProgramSet};
pub use reader::{
    BackendStats, ConntrackEntry, GrpcBackendCounts, MapReader, PendingCounts, ServiceInfo,
    ServiceStats,
};
pub use writer::MapWriter;

/// The object built by `cargo xtask build-ebpf`, embedded at compile time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/rpclb";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object (pin path {path}): {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching to {iface} ({mode}): {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<LinkError>,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("the kernel (Linux {kernel}) refused the {set} program set ({why}); {hint}")]
    Refused {
        set: &'static str,
        kernel: String,
        why: String,
        hint: String,
    },
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is full (limit {1}); raise the matching --max-* flag")]
    Full(&'static str, u32),
    #[error("service {0}: {1}")]
    InvalidService(String, String),
    #[error(
        "pin path {pin} is not on a bpffs mount ({on} is not bpffs): mount one \
         (`mount -t bpf bpf /sys/fs/bpf`) or pass --pin-path on one. \
         Note that `ip netns exec` remounts /sys, hiding /sys/fs/bpf"
    )]
    NotBpffs { pin: PathBuf, on: PathBuf },
    #[error(transparent)]
    PinPath(#[from] pin::PinPathError),
    #[error("interface {iface}: {source}")]
    Interface {
        iface: String,
        #[source]
        source: Box<DatapathError>,
    },
    #[error(
        "the maps would take {total_mib} MiB of kernel memory with {cpus} possible CPUs, over \
         the budget of {budget_mib} MiB (largest: {largest}, {largest_mib} MiB); lower the \
         --max-* flags, raise --map-memory-budget-mib, or pass --allow-map-memory-over-budget"
    )]
    OverBudget {
        total_mib: f64,
        budget_mib: f64,
        cpus: u32,
        largest: &'static str,
        largest_mib: f64,
    },
    #[error("{flag} {value}: {why}")]
    BadSize {
        flag: &'static str,
        value: u32,
        why: &'static str,
    },
    #[error(
        "map {name} is pinned as {pinned}, but this agent needs {wanted}; \
         `lb-agent cleanup` (which also drops conntrack) and a fresh start fix it"
    )]
    PinnedMismatch {
        name: &'static str,
        pinned: String,
        wanted: String,
    },
}

/// Where to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// XDP in the driver (native) where supported, else generic.
    Xdp,
    /// XDP in generic (skb) mode.
    XdpGeneric,
    /// TC clsact ingress (TCX link).
    Tc,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Xdp => "xdp",
            AttachMode::XdpGeneric => "xdp-generic",
            AttachMode::Tc => "tc",
        }
    }
}

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "xdp" => Ok(AttachMode::Xdp),
            "xdp-generic" => Ok(AttachMode::XdpGeneric),
            "tc" => Ok(AttachMode::Tc),
            _ => Err(format!(
                "unknown mode {s:?} (expected xdp, xdp-generic or tc)"
            )),
        }
    }
}

/// Map sizes and switches. Defaults fit a 5,000-service cluster.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    pub pin_path: PathBuf,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_conntrack: u32,
    /// IPv6 flows' conntrack entries (`CONNTRACK6`, `--max-conntrack6`).
    pub max_conntrack6: u32,
    pub max_affinity: u32,
    /// Fragmented datagrams tracked at once (`FRAGMENTS`, lb-ebpf/src/frag.rs).
    pub max_fragments: u32,
    pub max_slots: u32,
    /// Forward with `bpf_fib_lookup` + redirect (else hand every packet to the stack).
    pub fib_redirect: bool,
    /// Kernel memory all maps may take, in bytes ([`memory`]); more is refused.
    pub map_memory_budget: u64,
    /// Over the budget, warn and load anyway.
    pub allow_over_budget: bool,
    /// TCX links or netlink filters for TC (`attach::TcAttach`).
    pub tc_attach: attach::TcAttach,
    /// Which program set to load (`programs`, `--bpf-programs`).
    pub programs: BpfPrograms,
    /// Interfaces that take natively redirected XDP frames besides physical
    /// NICs running native XDP (`--xdp-redirect-to`; `lb_common::xdp_iface`).
    pub xdp_redirect_to: Vec<String>,
    /// Source ports for new flows whose backend-side tuple another flow
    /// holds (`--collision-ports`); `None`: such flows are dropped.
    pub collision_ports: Option<PortRange>,
    /// SNAT for front ends with `externalTrafficPolicy: Cluster` to
    /// backends on other nodes (lb-ebpf/src/snat.rs): the source ports
    /// (`--snat-ports`) and the node's address (`--snat-address`). Either
    /// `None`: SNAT off (no backend gets `backend_flags::SNAT`). Hairpin
    /// flows (a pod reaching itself through its Service) need the ports
    /// only: their address is `lb_common::SERVICE_LOOPBACK_V4`.
    pub snat_ports: Option<PortRange>,
    pub snat_address: Option<std::net::Ipv4Addr>,
    /// Load the eBPF object from this file instead of the one built into the
    /// binary: for benchmarks that time two builds of the programs in one run.
    pub object_file: Option<PathBuf>,
    /// The node's IPv6 address SNATed IPv6 flows leave from
    /// (`--snat-address6`; the ports are `snat_ports`). `None`: IPv6 SNAT
    /// to the node's address off (IPv6 hairpin flows need the ports only:
    /// their address is `lb_common::SERVICE_LOOPBACK_V6`).
    pub snat_address6: Option<std::net::Ipv6Addr>,
    /// Which programs [`Datapath::load`] loads: all of the set (the agent),
    /// or each hook's when first used (test data paths, `scratch`).
    pub program_loading: ProgramLoading,
}

/// When the programs of the set pass the verifier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgramLoading {
    /// All four (XDP, TC and their IPv6 programs) in [`Datapath::load`].
    #[default]
    All,
    /// The given hooks' programs (entry and IPv6) in [`Datapath::load`]:
    /// the agent, for the hooks its `--mode` can attach on its interfaces
    /// (`attach::hooks_for`). Another hook's load on first use.
    Hooks { xdp: bool, tc: bool },
    /// None in [`Datapath::load`]; a hook's entry program, and its IPv6
    /// program, when first asked for ([`Datapath::load_hook`]). The verifier
    /// takes about a second per program, and most packet tests run one hook
    /// on IPv4 only (`scratch`).
    OnDemand,
}

/// Which program a packet goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl DatapathConfig {
    /// Whether SNAT is on: an address and a port range.
    pub fn snat(&self) -> bool {
        self.snat_ports.is_some() && self.snat_address.is_some()
    }

    /// Whether IPv6 SNAT is on: an IPv6 address and a port range.
    pub fn snat6(&self) -> bool {
        self.snat_ports.is_some() && self.snat_address6.is_some()
    }
}

/// A range of ports, both ends included (`61000-65535`, or one port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// The default collision range (`limits::COLLISION_PORTS`).
    pub const DEFAULT_COLLISION: PortRange = PortRange {
        first: limits::COLLISION_PORTS.0,
        last: limits::COLLISION_PORTS.1,
    };

    /// The default SNAT range (`limits::SNAT_PORTS`).
    pub const DEFAULT_SNAT: PortRange = PortRange {
        first: limits::SNAT_PORTS.0,
        last: limits::SNAT_PORTS.1,
    };

    /// Number of ports in the range (at least 1).
    pub fn count(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// Whether the two ranges share a port.
    pub fn overlaps(&self, o: &PortRange) -> bool {
        self.first <= o.last && o.first <= self.last
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    /// `FIRST-LAST` or a single port; port 0 and an inverted range are refused.
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(format!("port range {s:?} ends before it starts"));
        }
        Ok(PortRange { first, last })
    }
}

/// The `max_entries` the agent creates `CONNTRACK` with for `--max-conntrack N`: one more
/// than N when N is a power of two of at least [`CT_SPREAD_FROM`]. The kernel gives a hash
/// map a bucket array of `max_entries` rounded up to a power of two, so at an exact power of
/// two a full map has one entry per bucket; one entry more doubles the buckets (16 B each:
/// 8 MiB at the default size), which halves the chains that a new flow's lookup and inserts
/// walk, each link a cache miss once the map outgrows the CPU caches (docs/benchmarks.md,
/// "New flows: profile and changes").
pub fn conntrack_map_entries(max_conntrack: u32) -> u32 {
    if max_conntrack >= CT_SPREAD_FROM && max_conntrack.is_power_of_two() {
        max_conntrack.saturating_add(1)
    } else {
        max_conntrack
    }
}

/// From this `--max-conntrack` on (16 MiB of entries), a power of two gets one entry more
/// ([`conntrack_map_entries`]); a smaller map stays in the caches.
pub const CT_SPREAD_FROM: u32 = 1 << 17;

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
            max_services: limits::MAX_SERVICES,
            max_backends: limits::MAX_BACKENDS,
            max_conntrack: limits::MAX_CONNTRACK,
            max_conntrack6: limits::MAX_CONNTRACK6,
            max_affinity: limits::MAX_AFFINITY,
            max_fragments: limits::MAX_FRAGMENTS,
            max_slots: limits::MAX_SLOTS,
            fib_redirect: true,
            map_memory_budget: memory::DEFAULT_BUDGET,
            allow_over_budget: false,
            tc_attach: attach::TcAttach::Auto,
            programs: BpfPrograms::Auto,
            xdp_redirect_to: Vec::new(),
            collision_ports: Some(PortRange::DEFAULT_COLLISION),
            snat_ports: Some(PortRange::DEFAULT_SNAT),
            snat_address: None,
            object_file: None,
            snat_address6: None,
            program_loading: ProgramLoading::All,
        }
    }
}

impl DatapathConfig {
    /// Small maps for tests and labs.
    pub fn small(pin_path: impl Into<PathBuf>) -> Self {
        DatapathConfig {
            pin_path: pin_path.into(),
            max_services: 1024,
            max_backends: 4096,
            max_conntrack: 65_536,
            max_conntrack6: 16_384,
            max_affinity: 4096,
            max_fragments: 1024,
            max_slots: 1 << 20,
            ..DatapathConfig::default()
        }
    }
}

/// The loaded programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_path: PathBuf,
    writer: MapWriter,
    tc_attach: attach::TcAttach,
    /// The program set and which of its programs are loaded.
    programs: Loaded,
    xdp_redirect_to: Vec<String>,
    /// `XDP_IFACES` flags this process's attachments set (ifindex -> flags).
    xdp_marks: std::collections::BTreeMap<u32, u32>,
}

impl AsMut<MapWriter> for Datapath {
    fn as_mut(&mut self) -> &mut MapWriter {
        self.writer()
    }
}

impl Datapath {
    /// Loads the object, reusing maps already pinned under the pin path (a
    /// restart), or creating and pinning them (a first start). Refuses maps
    /// over the memory budget before creating any ([`memory::prepare`]).
    ///
    /// A failed load leaves the pin path as it found it: the maps it created
    /// are unpinned (those it adopted stay, with their flows).
    pub fn load(cfg: &DatapathConfig) -> Result<Self, DatapathError> {
        let mem = memory::prepare(cfg)?;
        let before = pins_under(&cfg.pin_path);
        let r = Self::load_prepared(cfg, &mem);
        if r.is_err() {
            undo_new_pins(&cfg.pin_path, before.as_ref());
        }
        r
    }

    fn load_prepared(cfg: &DatapathConfig, mem: &memory::MapMemory) -> Result<Self, DatapathError> {
        pin::create(&cfg.pin_path)?;
        let from_file = match &cfg.object_file {
            Some(path) => Some(std::fs::read(path).map_err(|error| DatapathError::Load {
                path: cfg.pin_path.clone(),
                source: Box::new(aya::EbpfError::FileError {
                    path: path.clone(),
                    error,
                }),
            })?),
            None => None,
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_path)
            .map_max_entries(map_names::SERVICES, cfg.max_services)
            .map_max_entries(map_names::NAMES, cfg.max_services)
            .map_max_entries(map_names::RR_COUNTERS, cfg.max_services)
            .map_max_entries(map_names::SVC_STATS, cfg.max_services)
            .map_max_entries(map_names::BACKENDS, cfg.max_backends)
            .map_max_entries(map_names::FRONTENDS, cfg.max_backends)
            .map_max_entries(map_names::BACKEND_STATS, cfg.max_backends)
            .map_max_entries(map_names::BACKEND_CONNS, cfg.max_backends)
            .map_max_entries(map_names::BACKEND_GC, cfg.max_backends)
            .map_max_entries(
                map_names::CONNTRACK,
                conntrack_map_entries(cfg.max_conntrack),
            )
            .map_max_entries(map_names::CONNTRACK6, cfg.max_conntrack6)
            .map_max_entries(map_names::SERVICES6, cfg.max_services)
            .map_max_entries(map_names::BACKENDS6, cfg.max_backends)
            .map_max_entries(map_names::BACKEND_LIMITS, cfg.max_backends)
            .map_max_entries(map_names::AFFINITY, cfg.max_affinity)
            .map_max_entries(map_names::FRAGMENTS, cfg.max_fragments)
            .map_max_entries(map_names::SLOTS, cfg.max_slots)
            // Indexed by service id, as the per-service arrays.
            .map_max_entries(map_names::SELECTORS_XDP, cfg.max_services)
            .map_max_entries(map_names::SELECTORS_TC, cfg.max_services)
            .load(from_file.as_deref().unwrap_or(EBPF_OBJECT))
            .map_err(|source| DatapathError::Load {
                path: cfg.pin_path.clone(),
                source: Box::new(source),
            })?;
        let mut programs = Loaded::new(cfg.programs);
        let units: Vec<Unit> = match cfg.program_loading {
            ProgramLoading::All => Unit::ALL.to_vec(),
            ProgramLoading::Hooks { xdp, tc } => Unit::ALL
                .into_iter()
                .filter(|u| match u.hook() {
                    Hook::Xdp => xdp,
                    Hook::Tc => tc,
                })
                .collect(),
            ProgramLoading::OnDemand => Vec::new(),
        };
        programs.ensure(&mut ebpf, &units)?;
        let mut writer = MapWriter::from_ebpf(&mut ebpf)?;
        writer.set_pin_path(&cfg.pin_path);
        writer.set_config(cfg.fib_redirect, cfg.collision_ports)?;
        writer.set_snat_config(cfg.snat_address, cfg.snat_address6, cfg.snat_ports)?;
        memory::log(mem, cfg.map_memory_budget, &cfg.pin_path);
        let dp = Datapath {
            ebpf,
            pin_path: cfg.pin_path.clone(),
            writer,
            tc_attach: cfg.tc_attach,
            programs,
            xdp_redirect_to: cfg.xdp_redirect_to.clone(),
            xdp_marks: Default::default(),
        };
        info!(
            pin_path = %cfg.pin_path.display(),
            programs = dp.programs.set.as_str(),
            loaded = ?dp.loaded_programs(),
            on_demand = cfg.program_loading == ProgramLoading::OnDemand,
            "data path loaded"
        );
        Ok(dp)
    }

    pub fn writer(&mut self) -> &mut MapWriter {
        &mut self.writer
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// The program set loaded (`--bpf-programs`). On demand
    /// ([`ProgramLoading::OnDemand`]) with `auto`, before any program has
    /// loaded: the set that will be tried first (full).
    pub fn programs(&self) -> ProgramSet {
        self.programs.set
    }

    /// Why [`Self::programs`] is not the set tried first (`auto` on a
    /// kernel that refused the full set).
    pub fn programs_fallback(&self) -> Option<&str> {
        self.programs.fallback.as_deref()
    }

    /// The programs loaded and in their prog arrays, by name, in load order
    /// of the agent (XDP, TC, XDP IPv6, TC IPv6): all four after a load with
    /// [`ProgramLoading::All`]; on demand, those asked for so far.
    pub fn loaded_programs(&self) -> Vec<&'static str> {
        Unit::ALL
            .into_iter()
            .filter(|u| self.programs.ready.has(*u))
            .map(|u| u.name(self.programs.set))
            .collect()
    }

    /// Loads `hook`'s entry program, and with `ipv6` the IPv6 program it
    /// tail-calls, where not loaded yet (each is put in its prog array:
    /// `SELECTOR_RETURN_*`, `V6_*_PROGS`). With `auto`, a kernel that
    /// refuses the full set gets the compat set, as in [`Self::load`]:
    /// every program loaded so far is then loaded again from that set.
    /// Nothing to do after a load with [`ProgramLoading::All`].
    pub fn load_hook(&mut self, hook: Hook, ipv6: bool) -> Result<(), DatapathError> {
        let both = [Unit::Entry(hook), Unit::V6(hook)];
        let units = if ipv6 { &both[..] } else { &both[..1] };
        self.programs.ensure(&mut self.ebpf, units)
    }

    /// Whether `hook`'s IPv6 program is loaded and in `V6_*_PROGS`.
    fn ipv6_ready(&self, hook: Hook) -> bool {
        self.programs.ready.has(Unit::V6(hook))
    }

    /// The loaded set's XDP program, with its IPv6 program in place: on
    /// demand, [`Self::load_hook`] runs here first, and a kernel that
    /// refuses them panics (the fallible form is `load_hook`).
    pub fn xdp_program(&mut self) -> &mut Xdp {
        self.load_all_of(Hook::Xdp);
        self.entry_xdp()
    }

    /// The loaded set's TC program; as [`Self::xdp_program`].
    pub fn tc_program(&mut self) -> &mut SchedClassifier {
        self.load_all_of(Hook::Tc);
        self.entry_tc()
    }

    fn load_all_of(&mut self, hook: Hook) {
        if let Err(e) = self.load_hook(hook, true) {
            panic!("load data path ({hook:?} programs, loaded on first use): {e:?}");
        }
    }

    /// The XDP entry program as it is (loaded or not).
    fn entry_xdp(&mut self) -> &mut Xdp {
        let name = self.programs.set.xdp();
        prog(&mut self.ebpf, name).expect("the set's XDP program is in the object")
    }

    /// The TC entry program as it is (loaded or not).
    fn entry_tc(&mut self) -> &mut SchedClassifier {
        let name = self.programs.set.tc();
        prog(&mut self.ebpf, name).expect("the set's TC program is in the object")
    }

    /// A benchmark baseline program (`prog_names::BENCH_*`), loaded on first use.
    pub fn bench_program(&mut self, name: &'static str) -> Result<&mut Xdp, DatapathError> {
        let p: &mut Xdp = prog(&mut self.ebpf, name)?;
        if p.fd().is_err() {
            p.load().map_err(|source| DatapathError::Program {
                name,
                source: Box::new(source),
            })?;
        }
        Ok(p)
    }
}

/// The files pinned directly under `dir` (`None`: no such directory).
fn pins_under(dir: &Path) -> Option<std::collections::BTreeSet<std::ffi::OsString>> {
    let rd = std::fs::read_dir(dir).ok()?;
    Some(rd.flatten().map(|e| e.file_name()).collect())
}

/// After a failed load: unpins what it pinned under `dir` that was not there
/// `before`, and removes `dir` if the load created it and it is empty.
fn undo_new_pins(dir: &Path, before: Option<&std::collections::BTreeSet<std::ffi::OsString>>) {
    let Some(now) = pins_under(dir) else {
        return;
    };
    for name in now
        .iter()
        .filter(|n| before.is_none_or(|b| !b.contains(*n)))
    {
        let p = dir.join(name);
        if p.is_file() {
            match std::fs::remove_file(&p) {
                Ok(()) => info!(path = %p.display(), "unpinned a map of the failed load"),
                Err(e) => warn!(path = %p.display(), "could not unpin after a failed load: {e}"),
            }
        }
    }
    if before.is_none() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// A program of a set as it is loaded: a hook's entry program, or the IPv6
/// program that entry program tail-calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Entry(Hook),
    V6(Hook),
}

impl Unit {
    /// The whole set, in the order the agent loads it.
    const ALL: [Unit; 4] = [
        Unit::Entry(Hook::Xdp),
        Unit::Entry(Hook::Tc),
        Unit::V6(Hook::Xdp),
        Unit::V6(Hook::Tc),
    ];

    fn hook(self) -> Hook {
        match self {
            Unit::Entry(h) | Unit::V6(h) => h,
        }
    }

    fn name(self, set: ProgramSet) -> &'static str {
        match self {
            Unit::Entry(Hook::Xdp) => set.xdp(),
            Unit::Entry(Hook::Tc) => set.tc(),
            Unit::V6(Hook::Xdp) => set.xdp6(),
            Unit::V6(Hook::Tc) => set.tc6(),
        }
    }

    /// The prog array the program goes in: the IPv6 programs where their
    /// entry program tail-calls them, the entry programs where a
    /// user-defined selector returns (`selector`).
    fn array(self) -> &'static str {
        match self {
            Unit::Entry(Hook::Xdp) => map_names::SELECTOR_RETURN_XDP,
            Unit::Entry(Hook::Tc) => map_names::SELECTOR_RETURN_TC,
            Unit::V6(Hook::Xdp) => map_names::V6_XDP_PROGS,
            Unit::V6(Hook::Tc) => map_names::V6_TC_PROGS,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Unit::Entry(Hook::Xdp) => 1,
            Unit::Entry(Hook::Tc) => 2,
            Unit::V6(Hook::Xdp) => 4,
            Unit::V6(Hook::Tc) => 8,
        }
    }
}

/// A set of [`Unit`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Ready(u8);

impl Ready {
    fn has(self, u: Unit) -> bool {
        self.0 & u.bit() != 0
    }

    fn add(&mut self, u: Unit) {
        self.0 |= u.bit();
    }
}

/// The program set of a data path and what of it is loaded.
struct Loaded {
    set: ProgramSet,
    /// `--bpf-programs`: whether a refused full set falls back.
    choice: BpfPrograms,
    /// Why `set` is not the set tried first, if it is not.
    fallback: Option<String>,
    /// Loaded and in their prog arrays.
    ready: Ready,
}

impl Loaded {
    fn new(choice: BpfPrograms) -> Self {
        Loaded {
            set: match choice {
                BpfPrograms::Compat => ProgramSet::Compat,
                BpfPrograms::Auto | BpfPrograms::Full => ProgramSet::Full,
            },
            choice,
            fallback: None,
            ready: Ready::default(),
        }
    }

    /// Loads `units` of the set where not loaded yet, in order; with
    /// `auto`, a full set the kernel refuses falls back to compat
    /// (`programs` has the policy).
    fn ensure(&mut self, ebpf: &mut Ebpf, units: &[Unit]) -> Result<(), DatapathError> {
        for &u in units {
            if self.ready.has(u) {
                continue;
            }
            match load_unit(ebpf, self.set, u) {
                Ok(()) => self.ready.add(u),
                Err((name, source)) => return self.after_failure(ebpf, units, name, source),
            }
        }
        Ok(())
    }

    fn after_failure(
        &mut self,
        ebpf: &mut Ebpf,
        units: &[Unit],
        name: &'static str,
        source: ProgramError,
    ) -> Result<(), DatapathError> {
        if self.set == ProgramSet::Compat {
            return Err(DatapathError::Program {
                name,
                source: Box::new(source),
            });
        }
        let kernel = programs::kernel_release();
        let f = programs::LoadFailure::of(&source);
        let why = match programs::after_full_failed(self.choice, name, source, &f, &kernel) {
            programs::AfterFull::Fail(e) => return Err(e),
            programs::AfterFull::Compat(why) => why,
        };
        // A full program that did load is of no use now.
        let full = ProgramSet::Full;
        for n in [full.xdp(), full.tc(), full.xdp6(), full.tc6()] {
            if let Some(p) = ebpf.program_mut(n) {
                let _ = match p {
                    aya::programs::Program::Xdp(x) => x.unload(),
                    aya::programs::Program::SchedClassifier(c) => c.unload(),
                    _ => Ok(()),
                };
            }
        }
        // What was loaded, and what was asked for, from the compat set.
        let want: Vec<Unit> = Unit::ALL
            .into_iter()
            .filter(|u| self.ready.has(*u) || units.contains(u))
            .collect();
        self.set = ProgramSet::Compat;
        self.ready = Ready::default();
        self.fallback = Some(why.clone());
        for u in want {
            load_unit(ebpf, self.set, u).map_err(|(name, source)| DatapathError::Refused {
                set: "compat",
                kernel: kernel.clone(),
                why: format!("{name}: {}", programs::LoadFailure::of(&source).reason()),
                hint: format!("the full set was refused as well ({why})"),
            })?;
            self.ready.add(u);
        }
        warn!(
            kernel,
            programs = "compat",
            "{why} (no fetch/cmpxchg atomics, precise clock; see docs/operations.md, \"Kernels\")"
        );
        Ok(())
    }
}

/// Loads program `u` of `set` (unless loaded) and puts it in its prog array
/// ([`Unit::array`]; the full set's at index 0, the compat set's at 1).
fn load_unit(
    ebpf: &mut Ebpf,
    set: ProgramSet,
    u: Unit,
) -> Result<(), (&'static str, ProgramError)> {
    let name = u.name(set);
    let idx = match set {
        ProgramSet::Full => 0,
        ProgramSet::Compat => 1,
    };
    let fd = match ebpf.program_mut(name) {
        Some(aya::programs::Program::Xdp(x))
            if matches!(u, Unit::Entry(Hook::Xdp) | Unit::V6(Hook::Xdp)) =>
        {
            if x.fd().is_err() {
                x.load().map_err(|e| (name, e))?;
            }
            x.fd().map_err(|e| (name, e))?.try_clone()
        }
        Some(aya::programs::Program::SchedClassifier(c))
            if matches!(u, Unit::Entry(Hook::Tc) | Unit::V6(Hook::Tc)) =>
        {
            if c.fd().is_err() {
                c.load().map_err(|e| (name, e))?;
            }
            c.fd().map_err(|e| (name, e))?.try_clone()
        }
        _ => return Err((name, ProgramError::NotLoaded)),
    }
    .map_err(|e| (name, ProgramError::from(e)))?;
    let array = u.array();
    let map = match ebpf.map_mut(array) {
        Some(m) => m,
        // An object from before selectors (`object_file`, the benchmark's A/B runs).
        None if map_names::SELECTOR_MAPS.contains(&array) => return Ok(()),
        None => return Err((array, ProgramError::NotLoaded)),
    };
    let mut arr =
        aya::maps::ProgramArray::try_from(map).map_err(|e| (array, ProgramError::MapError(e)))?;
    arr.set(idx, &fd, 0)
        .map_err(|e| (array, ProgramError::MapError(e)))?;
    Ok(())
}

fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: Box::new(aya::programs::ProgramError::NotLoaded),
    })?;
    p.try_into().map_err(|source| DatapathError::Program {
        name,
        source: Box::new(source),
    })
}

/// Detaches (by unpinning the links, and deleting rpclb's netlink TC
/// filters) and removes every pinned map under `pin_path`. Safe to run when
/// nothing is pinned.
pub fn cleanup(pin_path: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let mut removed = Vec::new();
    let links = pin_path.join("links");
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd.flatten() {
            attach::remove_link(&links, &e.file_name().to_string_lossy())?;
            removed.push(e.path());
        }
        let _ = std::fs::remove_dir(&links);
    }
    for name in map_names::ALL
        .iter()
        .chain([&map_names::V6_XDP_PROGS, &map_names::V6_TC_PROGS])
        .chain(map_names::SELECTOR_MAPS)
    {
        let p = pin_path.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|source| DatapathError::Io {
                path: p.clone(),
                source,
            })?;
            removed.push(p);
        }
    }
    // The maps of user-defined selectors' objects (`selector::maps_dir`).
    let sel = selector::maps_dir(pin_path);
    if let Ok(rd) = std::fs::read_dir(&sel) {
        for e in rd.flatten() {
            if std::fs::remove_file(e.path()).is_ok() {
                removed.push(e.path());
            }
        }
        let _ = std::fs::remove_dir(&sel);
    }
    let _ = std::fs::remove_dir(pin_path);
    Ok(removed)
}
