//! Kernel memory of the data path's maps.
//!
//! [`Datapath::load`](super::Datapath::load) computes it from the map sizes
//! before anything is created, logs it, and refuses a configuration over the
//! budget (or only warns, when allowed). The formulas follow the kernel's own
//! accounting (`array_map_mem_usage` and `htab_map_mem_usage`, reported as
//! `memlock` in a map's fdinfo), leaving out the fixed header of each map
//! (under 1 KiB). docs/operations.md, "Map memory", has them with a table.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::maps::{MapInfo, MapType};
use lb_common::{
    AffinityKey, AffinityValue, BackendValue, ConnCounts, Counters, CtValue, CtValue6,
    FLOW_CACHE_SLOTS, FlowCacheEntry, FlowKey, FlowKey6, FragKey, FragValue, NameValue,
    ROUTE_CACHE_SLOTS, RouteCacheEntry, ServiceKey, ServiceKey6, ServiceValue, config_idx, limits,
    map_names as m, reason,
};
use serde::Serialize;
use tracing::{info, warn};

use super::{DatapathConfig, DatapathError};

pub const MIB: u64 = 1 << 20;

/// Default budget for all maps together: the defaults take about 300 MiB
/// with 128 possible CPUs (docs/operations.md, "Map memory").
pub const DEFAULT_BUDGET: u64 = 512 * MIB;

/// `struct htab_elem` before the key (64-bit kernels).
const HTAB_ELEM: u64 = 48;
/// `struct bucket`: list head and lock.
const HTAB_BUCKET: u64 = 16;
/// A pointer: per entry of a per-CPU array, per CPU of a non-LRU hash.
const PTR: u64 = 8;

/// The map types the data path uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MapKind {
    Array,
    PerCpuArray,
    Hash,
    LruHash,
}

impl MapKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MapKind::Array => "array",
            MapKind::PerCpuArray => "percpu-array",
            MapKind::Hash => "hash",
            MapKind::LruHash => "lru-hash",
        }
    }

    fn from_map_type(t: MapType) -> Option<MapKind> {
        Some(match t {
            MapType::Array => MapKind::Array,
            MapType::PerCpuArray => MapKind::PerCpuArray,
            MapType::Hash => MapKind::Hash,
            MapType::LruHash => MapKind::LruHash,
            _ => return None,
        })
    }
}

/// What the kernel's allocation of one map depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MapShape {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

fn round8(n: u32) -> u64 {
    (n as u64).div_ceil(8) * 8
}

impl MapShape {
    fn new<K, V>(name: &'static str, kind: MapKind, max_entries: u32) -> Self {
        MapShape {
            name,
            kind,
            key_size: std::mem::size_of::<K>() as u32,
            value_size: std::mem::size_of::<V>() as u32,
            max_entries,
        }
    }

    /// Bytes of kernel memory with `cpus` possible CPUs.
    pub fn bytes(&self, cpus: u32) -> u64 {
        let n = self.max_entries as u64;
        let cpus = cpus as u64;
        let value = round8(self.value_size);
        match self.kind {
            MapKind::Array => n * value,
            // One pointer per entry, and the value on every possible CPU.
            MapKind::PerCpuArray => n * (PTR + value * cpus),
            // Preallocated elements (header + key + value) and a power-of-two
            // bucket array; a plain hash keeps one spare element per CPU.
            MapKind::Hash | MapKind::LruHash => {
                let elem = HTAB_ELEM + round8(self.key_size) + value;
                let buckets = n.next_power_of_two() * HTAB_BUCKET;
                if self.kind == MapKind::Hash {
                    buckets + (n + cpus) * elem + cpus * PTR
                } else {
                    buckets + n * elem
                }
            }
        }
    }

    /// The part of [`Self::bytes`] that grows with the CPU count.
    pub fn per_cpu_bytes(&self) -> u64 {
        self.bytes(1) - self.bytes(0)
    }
}

/// Every map's shape for `cfg`, in `map_names::ALL` order. The load test
/// checks these against the maps the kernel creates from the object.
pub fn shapes(cfg: &DatapathConfig) -> Vec<MapShape> {
    use MapKind::*;
    let shapes = vec![
        MapShape::new::<ServiceKey, ServiceValue>(m::SERVICES, Hash, cfg.max_services),
        MapShape::new::<u32, BackendValue>(m::BACKENDS, Array, cfg.max_backends),
        MapShape::new::<u32, u32>(m::SLOTS, Array, cfg.max_slots),
        MapShape::new::<FlowKey, CtValue>(
            m::CONNTRACK,
            LruHash,
            super::conntrack_map_entries(cfg.max_conntrack),
        ),
        MapShape::new::<AffinityKey, AffinityValue>(m::AFFINITY, LruHash, cfg.max_affinity),
        MapShape::new::<u32, u64>(m::RR_COUNTERS, Array, cfg.max_services),
        MapShape::new::<u32, Counters>(m::SVC_STATS, PerCpuArray, cfg.max_services),
        MapShape::new::<u32, Counters>(m::BACKEND_STATS, Array, cfg.max_backends),
        MapShape::new::<u32, ConnCounts>(m::BACKEND_CONNS, Array, cfg.max_backends),
        MapShape::new::<u32, u64>(m::BACKEND_GC, Array, cfg.max_backends),
        MapShape::new::<u32, u64>(m::REASONS, PerCpuArray, reason::COUNT),
        MapShape::new::<u32, u32>(m::CONFIG, Array, config_idx::COUNT),
        MapShape::new::<u32, NameValue>(m::NAMES, Hash, cfg.max_services),
        MapShape::new::<u32, u32>(m::XDP_IFACES, Array, limits::MAX_XDP_IFINDEX),
        MapShape::new::<FragKey, FragValue>(m::FRAGMENTS, LruHash, cfg.max_fragments),
        MapShape::new::<u32, FlowCacheEntry>(m::FLOW_CACHE, PerCpuArray, FLOW_CACHE_SLOTS),
        MapShape::new::<u32, RouteCacheEntry>(m::ROUTE_CACHE, PerCpuArray, ROUTE_CACHE_SLOTS),
        MapShape::new::<ServiceKey, ServiceKey>(m::FRONTENDS, Hash, cfg.max_backends),
        MapShape::new::<ServiceKey6, ServiceValue>(m::SERVICES6, Hash, cfg.max_services),
        MapShape::new::<u32, [u32; 4]>(m::BACKENDS6, Array, cfg.max_backends),
        MapShape::new::<FlowKey6, CtValue6>(m::CONNTRACK6, LruHash, cfg.max_conntrack6),
        MapShape::new::<u32, u32>(m::BACKEND_LIMITS, Array, cfg.max_backends),
    ];
    debug_assert!(shapes.iter().map(|s| s.name).eq(m::ALL.iter().copied()));
    shapes
}

/// The maps' memory for one CPU count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapMemory {
    pub cpus: u32,
    pub maps: Vec<MapShape>,
}

impl MapMemory {
    pub fn new(maps: Vec<MapShape>, cpus: u32) -> Self {
        MapMemory { cpus, maps }
    }

    /// `(map, bytes)`, in map order.
    pub fn per_map(&self) -> impl Iterator<Item = (&MapShape, u64)> {
        self.maps.iter().map(|s| (s, s.bytes(self.cpus)))
    }

    pub fn total(&self) -> u64 {
        self.per_map().map(|(_, b)| b).sum()
    }

    /// The largest map: what to shrink first.
    pub fn largest(&self) -> Option<(&MapShape, u64)> {
        self.per_map().max_by_key(|&(_, b)| b)
    }

    /// `Ok` within `budget`; else the refusal, naming the largest map.
    pub fn check(&self, budget: u64) -> Result<(), DatapathError> {
        let total = self.total();
        if total <= budget {
            return Ok(());
        }
        let (big, bytes) = self.largest().expect("maps");
        Err(DatapathError::OverBudget {
            total_mib: mib(total),
            budget_mib: mib(budget),
            cpus: self.cpus,
            largest: big.name,
            largest_mib: mib(bytes),
        })
    }
}

/// Bytes as MiB with one decimal, for messages.
pub fn mib(bytes: u64) -> f64 {
    (bytes as f64 / MIB as f64 * 10.0).round() / 10.0
}

/// Possible CPUs (`/sys/devices/system/cpu/possible`, as aya's `nr_cpus`
/// reads it): per-CPU maps allocate a value for each, online or not.
pub fn possible_cpus() -> Result<u32, DatapathError> {
    aya::util::nr_cpus()
        .map(|n| n as u32)
        .map_err(|(path, source)| DatapathError::Io {
            path: path.into(),
            source,
        })
}

/// The shape of the map pinned at `path`, as the kernel reports it.
/// `None` for a map type the data path does not use.
pub fn pinned_shape(name: &'static str, path: &Path) -> Result<Option<MapShape>, DatapathError> {
    let err = |source| DatapathError::Map {
        name,
        source: Box::new(source),
    };
    let info = MapInfo::from_pin(path).map_err(err)?;
    let Some(kind) = info.map_type().ok().and_then(MapKind::from_map_type) else {
        return Ok(None);
    };
    Ok(Some(MapShape {
        name,
        kind,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    }))
}

/// The kernel's own figure for the map pinned at `path` (`memlock` in its
/// fdinfo), where the kernel reports it.
pub fn kernel_bytes(path: &Path) -> Option<u64> {
    let info = MapInfo::from_pin(path).ok()?;
    let fd = info.fd().ok()?;
    let fdinfo =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd())).ok()?;
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Counter maps: a pinned one of another shape (an upgrade that changed
/// it) is replaced, and its counters restart from zero. (FLOW_CACHE: its
/// rewrites are a shortcut only; its pending counts are lost. ROUTE_CACHE:
/// a cache of the kernel's routes; a fresh one costs a lookup per destination.
/// CONFIG: the agent writes every entry at each load; the flow cache's
/// generation restarts with it, so FLOW_CACHE is replaced alongside.)
const REPLACEABLE: &[&str] = &[
    m::SVC_STATS,
    m::BACKEND_STATS,
    m::REASONS,
    m::FLOW_CACHE,
    m::ROUTE_CACHE,
    m::CONFIG,
];

/// Maps whose size the programs fix, not a flag: a pinned one of another
/// size is replaced too (an upgrade that adds reasons or CONFIG entries).
const SIZED_BY_PROGRAMS: &[&str] = &[m::REASONS, m::FLOW_CACHE, m::ROUTE_CACHE, m::CONFIG];

/// Before a load: the shapes the maps will have (pinned maps keep their
/// size), checked against `cfg`'s budget. A pinned counter map of another
/// shape is unpinned so that the load creates it anew; any other map of
/// another shape is an error.
pub fn prepare(cfg: &DatapathConfig) -> Result<MapMemory, DatapathError> {
    check_sizes(cfg)?;
    let cpus = possible_cpus()?;
    let mut maps = shapes(cfg);
    let mut replace = Vec::new();
    for want in &mut maps {
        let path = cfg.pin_path.join(want.name);
        if !path.exists() {
            continue;
        }
        let have = pinned_shape(want.name, &path)?;
        match have {
            // A counter map sized by the programs, not by a flag (REASONS:
            // one entry per reason), must grow when an upgrade adds reasons.
            Some(h)
                if (h.kind, h.key_size, h.value_size)
                    == (want.kind, want.key_size, want.value_size)
                    && (!SIZED_BY_PROGRAMS.contains(&want.name)
                        || h.max_entries == want.max_entries) =>
            {
                // The flag's value (CONNTRACK is created with one entry more
                // at some sizes: `conntrack_map_entries`); a map pinned by an
                // agent that did not add it counts as the same size.
                let asked = if want.name == m::CONNTRACK {
                    cfg.max_conntrack
                } else {
                    want.max_entries
                };
                if h.max_entries != want.max_entries
                    && h.max_entries != asked
                    && let Some(flag) = size_flag(want.name)
                {
                    warn!(
                        "{} is pinned with {} entries, so {flag} {asked} has no effect until \
                         `lb-agent cleanup` (which also drops conntrack) and a fresh start",
                        want.name, h.max_entries
                    );
                }
                *want = h;
            }
            // CONNTRACK6's values grew by `snat_ip6` (IPv6 SNAT): a map of
            // the older layout is replaced, and the IPv6 flows restart (a
            // TCP flow's next packet picks its backend again: the same one
            // under Maglev or source hash).
            Some(h)
                if want.name == m::CONNTRACK6
                    && (h.kind, h.key_size) == (want.kind, want.key_size)
                    && h.value_size != want.value_size =>
            {
                warn!(
                    pinned = describe(&h),
                    "CONNTRACK6 is pinned with {}-byte values from an older agent: replaced, \
                     the IPv6 flows it held are forgotten",
                    h.value_size
                );
                replace.push((want.name, path, have))
            }
            _ if REPLACEABLE.contains(&want.name) => replace.push((want.name, path, have)),
            _ => {
                return Err(DatapathError::PinnedMismatch {
                    name: want.name,
                    pinned: have.map_or("an unknown map type".into(), |h| describe(&h)),
                    wanted: describe(want),
                });
            }
        }
    }
    // A fresh CONFIG starts the flow cache's generation over: entries cached
    // under the old map's generations could match again.
    if replace.iter().any(|(n, ..)| *n == m::CONFIG)
        && !replace.iter().any(|(n, ..)| *n == m::FLOW_CACHE)
    {
        let path = cfg.pin_path.join(m::FLOW_CACHE);
        if path.exists() {
            let have = pinned_shape(m::FLOW_CACHE, &path)?;
            replace.push((m::FLOW_CACHE, path, have));
        }
    }
    let mem = MapMemory::new(maps, cpus);
    if let Err(e) = mem.check(cfg.map_memory_budget) {
        if !cfg.allow_over_budget {
            return Err(e);
        }
        warn!("{e} (allowed by --allow-map-memory-over-budget)");
    }
    for (name, path, old) in replace {
        warn!(
            map = name,
            pinned = old.map_or("an unknown map type".into(), |h| describe(&h)),
            "replacing a pinned map the agent rebuilds (a counter map or the configuration of another shape, an upgrade); what it held restarts from zero"
        );
        std::fs::remove_file(&path).map_err(|source| DatapathError::Io { path, source })?;
    }
    Ok(mem)
}

/// The flag that sizes a map (one warning per flag: the other maps it
/// sizes follow).
/// Map sizes the kernel or the programs cannot work with, refused before
/// anything is created (a zero-sized map is EINVAL at creation, after other
/// maps were made).
pub fn check_sizes(cfg: &DatapathConfig) -> Result<(), DatapathError> {
    let bad = |flag, value, why| Err(DatapathError::BadSize { flag, value, why });
    for (flag, value) in [
        ("--max-services", cfg.max_services),
        ("--max-backends", cfg.max_backends),
        ("--max-affinity", cfg.max_affinity),
        ("--max-fragments", cfg.max_fragments),
        ("--max-slots", cfg.max_slots),
    ] {
        if value == 0 {
            return bad(flag, value, "must be at least 1");
        }
    }
    if cfg.max_conntrack < 2 {
        return bad(
            "--max-conntrack",
            cfg.max_conntrack,
            "must be at least 2 (each flow takes two entries)",
        );
    }
    Ok(())
}

fn size_flag(name: &str) -> Option<&'static str> {
    Some(match name {
        m::SERVICES => "--max-services",
        m::BACKENDS | m::FRONTENDS => "--max-backends",
        m::CONNTRACK => "--max-conntrack",
        m::CONNTRACK6 => "--max-conntrack6",
        m::AFFINITY => "--max-affinity",
        m::FRAGMENTS => "--max-fragments",
        m::SLOTS => "--max-slots",
        _ => return None,
    })
}

fn describe(s: &MapShape) -> String {
    format!(
        "{} with {} B keys, {} B values, {} entries",
        s.kind.as_str(),
        s.key_size,
        s.value_size,
        s.max_entries
    )
}

/// Logs each map's memory and the total; after a load, with the kernel's
/// own figures where it reports them.
pub fn log(mem: &MapMemory, budget: u64, pin_path: &Path) {
    let mut kernel_total = Some(0u64);
    for (s, bytes) in mem.per_map() {
        let kernel = kernel_bytes(&pin_path.join(s.name));
        kernel_total = kernel_total.zip(kernel).map(|(a, b)| a + b);
        info!(
            map = s.name,
            kind = s.kind.as_str(),
            entries = s.max_entries,
            value_bytes = s.value_size,
            mib = mib(bytes),
            kernel_mib = kernel.map(mib),
            "map memory"
        );
    }
    info!(
        total_mib = mib(mem.total()),
        kernel_total_mib = kernel_total.map(mib),
        possible_cpus = mem.cpus,
        budget_mib = mib(budget),
        "kernel memory of the maps"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(cfg: &DatapathConfig, name: &str) -> MapShape {
        *shapes(cfg).iter().find(|s| s.name == name).unwrap()
    }

    /// The issue: BACKEND_STATS per-CPU took 256K x 32 B on every CPU,
    /// about 1 GiB with 128 CPUs. The defaults now fit the budget there.
    #[test]
    fn defaults_fit_the_budget_with_128_cpus() {
        let cfg = DatapathConfig::default();
        for cpus in [1, 2, 16, 64, 128] {
            let mem = MapMemory::new(shapes(&cfg), cpus);
            assert!(
                mem.total() <= DEFAULT_BUDGET,
                "{cpus} CPUs: {} MiB over the {} MiB budget",
                mib(mem.total()),
                mib(DEFAULT_BUDGET)
            );
            mem.check(DEFAULT_BUDGET).unwrap();
        }
    }

    #[test]
    fn sizes_the_kernel_refuses_are_refused_first() {
        let ok = DatapathConfig::default();
        check_sizes(&ok).unwrap();
        let e = check_sizes(&DatapathConfig {
            max_conntrack: 0,
            ..ok.clone()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--max-conntrack 0: must be at least 2 (each flow takes two entries)"
        );
        let e = check_sizes(&DatapathConfig {
            max_slots: 0,
            ..ok.clone()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "--max-slots 0: must be at least 1");
        // prepare() checks first: nothing is read or created.
        let e = prepare(&DatapathConfig {
            max_services: 0,
            pin_path: "/nonexistent/rpclb-pins".into(),
            ..ok
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("--max-services 0"), "{e}");
    }

    #[test]
    fn only_small_maps_grow_with_cpus() {
        let cfg = DatapathConfig::default();
        let per_cpu: u64 = shapes(&cfg).iter().map(|s| s.per_cpu_bytes()).sum();
        // SVC_STATS (16,384 x 32 B) + REASONS (one 8 B counter per reason) +
        // FLOW_CACHE (1,024 x 96 B) + ROUTE_CACHE (1,024 x 32 B) + a pointer
        // and a spare element per CPU for each plain hash (SERVICES, NAMES,
        // FRONTENDS, SERVICES6).
        let reasons = reason::COUNT as u64 * 8;
        assert_eq!(
            per_cpu,
            16_384 * 32
                + reasons
                + 1_024 * 96
                + 1_024 * 32
                + (8 + 80)
                + (8 + 312)
                + (8 + 64)
                + (8 + 96)
        );
        assert!(per_cpu < MIB, "{per_cpu} bytes per CPU");
        assert_eq!(shape(&cfg, m::BACKEND_STATS).per_cpu_bytes(), 0);
    }

    #[test]
    fn formulas() {
        let cfg = DatapathConfig::default();
        let b = |name, cpus| shape(&cfg, name).bytes(cpus);
        // Arrays round values up to 8 bytes: SLOTS' u32 takes 8.
        assert_eq!(b(m::SLOTS, 128), (1 << 24) * 8);
        assert_eq!(b(m::BACKEND_STATS, 128), 262_144 * 32);
        assert_eq!(b(m::SVC_STATS, 128), 16_384 * (8 + 32 * 128));
        assert_eq!(b(m::REASONS, 2), reason::COUNT as u64 * (8 + 8 * 2));
        // LRU: 2^20 buckets of 16 B (524,289 entries: `conntrack_map_entries`),
        // elements of 48 + 16 + 64 B.
        assert_eq!(b(m::CONNTRACK, 2), (1 << 20) * 16 + 524_289 * 128);
        // Hash: 16,384 buckets, elements of 48 + 8 + 24 B and one spare per CPU.
        assert_eq!(b(m::SERVICES, 2), 16_384 * 16 + (16_384 + 2) * 80 + 2 * 8);
        // Hash: 262,144 buckets, elements of 48 + 8 + 8 B and one spare per CPU.
        assert_eq!(
            b(m::FRONTENDS, 2),
            262_144 * 16 + (262_144 + 2) * 64 + 2 * 8
        );
        // LRU: 8,192 buckets, elements of 48 + 16 (a 12 B key) + 8 (a 4 B value) B.
        assert_eq!(b(m::FRAGMENTS, 128), 8192 * 16 + 8192 * 72);
        // Buckets round up to a power of two.
        let odd = MapShape {
            max_entries: 1000,
            ..shape(&cfg, m::AFFINITY)
        };
        assert_eq!(odd.bytes(4), 1024 * 16 + 1000 * 72);
    }

    #[test]
    fn over_budget_names_the_largest_map() {
        let cfg = DatapathConfig {
            max_backends: 8 << 20,
            ..DatapathConfig::default()
        };
        let mem = MapMemory::new(shapes(&cfg), 2);
        let e = mem.check(DEFAULT_BUDGET).unwrap_err();
        let msg = e.to_string();
        // FRONTENDS (a hash: 64 B elements and 16 B buckets per backend)
        // outgrows BACKEND_STATS (32 B per backend).
        assert!(matches!(
            e,
            DatapathError::OverBudget {
                largest: m::FRONTENDS,
                cpus: 2,
                ..
            }
        ));
        assert!(msg.contains("FRONTENDS"), "{msg}");
        assert!(mem.check(u64::MAX).is_ok());
    }

    #[test]
    fn conntrack_gets_twice_the_buckets_at_large_powers_of_two() {
        use super::super::conntrack_map_entries as e;
        assert_eq!(e(524_288), 524_289);
        assert_eq!(e(1 << 17), (1 << 17) + 1);
        assert_eq!(e(1 << 31), (1 << 31) + 1);
        // Small maps stay in the caches; other sizes already have spare buckets.
        assert_eq!(e(65_536), 65_536);
        assert_eq!(e(64), 64);
        assert_eq!(e(600_000), 600_000);
        let cfg = DatapathConfig::default();
        assert_eq!(shape(&cfg, m::CONNTRACK).max_entries, 524_289);
    }

    /// The worked table of docs/operations.md ("Map memory"):
    /// `cargo test -p lb-agent memory_table -- --nocapture`.
    #[test]
    fn memory_table() {
        let cfg = DatapathConfig::default();
        let cols = [2u32, 16, 64, 128];
        println!(
            "| map | kind | entries | value B | {} |",
            cols.map(|c| format!("{c} CPUs")).join(" | ")
        );
        for s in shapes(&cfg) {
            println!(
                "| {} | {} | {} | {} | {} |",
                s.name,
                s.kind.as_str(),
                s.max_entries,
                s.value_size,
                cols.map(|c| format!("{:.1}", mib(s.bytes(c)))).join(" | ")
            );
        }
        let totals = cols.map(|c| MapMemory::new(shapes(&cfg), c).total());
        println!(
            "| total (MiB) | | | | {} |",
            totals.map(|t| format!("{:.1}", mib(t))).join(" | ")
        );
        assert!(totals.windows(2).all(|w| w[0] < w[1]));
    }
}
