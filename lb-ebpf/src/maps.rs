//! Every map of the data path, in one place. All are pinned by name, so a
//! restarted agent (or lbctl) finds the same state under the pin path.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    AffinityKey, AffinityValue, BackendValue, ConnCounts, Counters, CtValue, CtValue6,
    FlowCacheEntry, FlowKey, FlowKey6, FragKey, FragValue, NameValue, RouteCacheEntry,
    SelectorArgs, SelectorCandidates, ServiceKey, ServiceKey6, ServiceValue, config_idx, limits,
    reason, selector,
};

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(limits::MAX_SERVICES, 0);

#[map]
pub static BACKENDS: Array<BackendValue> = Array::pinned(limits::MAX_BACKENDS, 0);

/// Backend ip:port:proto (a `ServiceKey` of the backend's address) -> the
/// one frontend it is reached through (`backend_flags::ONE_FRONTEND`),
/// written by the agent: the first reply of such a backend's flow finds its
/// forward key here (`conntrack::first_reply`).
#[map]
pub static FRONTENDS: HashMap<ServiceKey, ServiceKey> = HashMap::pinned(limits::MAX_BACKENDS, 0);

/// Selection tables of all services, each a slice `[table_off, table_off + table_len)`.
#[map]
pub static SLOTS: Array<u32> = Array::pinned(limits::MAX_SLOTS, 0);

#[map]
pub static CONNTRACK: LruHashMap<FlowKey, CtValue> = LruHashMap::pinned(limits::MAX_CONNTRACK, 0);

#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(limits::MAX_AFFINITY, 0);

/// Round-robin position per service id, advanced with an atomic add.
#[map]
pub static RR_COUNTERS: Array<u64> = Array::pinned(limits::MAX_SERVICES, 0);

/// Per-CPU: every packet of a service bumps its entry, from every CPU.
#[map]
pub static SVC_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(limits::MAX_SERVICES, 0);

/// Shared, updated with atomic adds: per-CPU would cost
/// `MAX_BACKENDS` x 32 B on every possible CPU (docs/operations.md, "Map memory").
#[map]
pub static BACKEND_STATS: Array<Counters> = Array::pinned(limits::MAX_BACKENDS, 0);

/// Opens and closes per backend (kernel-owned, atomic).
#[map]
pub static BACKEND_CONNS: Array<ConnCounts> = Array::pinned(limits::MAX_BACKENDS, 0);

/// QoS limit per backend id (agent-owned; 0: none): read only for a service
/// with `svc_flags::LIMITED` (`select`).
#[map]
pub static BACKEND_LIMITS: Array<u32> = Array::pinned(limits::MAX_BACKENDS, 0);

/// Flows per backend that the agent's GC expired (agent-owned).
#[map]
pub static BACKEND_GC: Array<u64> = Array::pinned(limits::MAX_BACKENDS, 0);

#[map]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);

#[map]
pub static CONFIG: Array<u32> = Array::pinned(config_idx::COUNT, 0);

#[inline(always)]
pub fn config(idx: u32) -> u32 {
    match CONFIG.get(idx) {
        Some(v) => *v,
        None => 0,
    }
}

/// Service id -> name, written by the agent for lbctl; never read here.
#[map]
pub static NAMES: HashMap<u32, NameValue> = HashMap::pinned(limits::MAX_SERVICES, 0);

/// Per-ifindex flags (`lb_common::xdp_iface`): where native XDP may redirect.
#[map]
pub static XDP_IFACES: Array<u32> = Array::pinned(limits::MAX_XDP_IFINDEX, 0);
/// (src, dst, proto, IP id) of a fragmented datagram -> the ports of its
/// first fragment (`frag`). LRU: entries are never deleted, newer
/// datagrams evict them.
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(limits::MAX_FRAGMENTS, 0);

/// Per-CPU scratch for `bpf_fib_lookup`'s 64-byte parameters (`fwd`), and
/// for the reverse entry `conntrack::first_reply` writes (64 bytes, before
/// any route lookup of the packet): kept off the stack, whose deepest call
/// chain is at the verifier's 512 bytes.
/// Not pinned: nothing outlives one packet in it.
#[map]
pub static FIB_SCRATCH: PerCpuArray<[u64; 8]> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU flow cache (`flowcache`): established flows' rewrites, indexed by
/// a hash of the flow key. Pinned for the hits' counts it holds (readers add
/// them; a reloaded program flushes them); the rewrites themselves are only
/// a shortcut to what `CONNTRACK` says, and the agent's start bumps the
/// generation that makes them stale.
#[map]
pub static FLOW_CACHE: PerCpuArray<FlowCacheEntry> =
    PerCpuArray::pinned(lb_common::FLOW_CACHE_SLOTS, 0);

/// Per-CPU route cache per destination (`fwd`): the last `bpf_fib_lookup`
/// result for a destination address and ingress interface, in a slot picked
/// by a hash of the two. A flow without a fresh route of its own (its first
/// packet in each direction, or its refresh once a second) takes it from
/// here while it is fresh (`FIB_CACHE_NS`; a failure `FIB_FAIL_NS`).
#[map]
pub static ROUTE_CACHE: PerCpuArray<RouteCacheEntry> =
    PerCpuArray::pinned(lb_common::ROUTE_CACHE_SLOTS, 0);

/// IPv6 services (`v6`): the same values as `SERVICES` (ids, tables in
/// `SLOTS`, per-service counters are shared with IPv4), keyed by a 16-byte VIP.
#[map]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue> = HashMap::pinned(limits::MAX_SERVICES, 0);

/// The address of each IPv6 backend, by backend id. Its port, state,
/// weight and service are in `BACKENDS` (whose `ip` is 0 for it), so the
/// selection (`select`) and the per-backend counters serve both families.
#[map]
pub static BACKENDS6: Array<[u32; 4]> = Array::pinned(limits::MAX_BACKENDS, 0);

/// IPv6 flows (`v6`): forward and reverse entries as in `CONNTRACK`.
#[map]
pub static CONNTRACK6: LruHashMap<FlowKey6, CtValue6> =
    LruHashMap::pinned(limits::MAX_CONNTRACK6, 0);

/// Per-CPU scratch of the IPv6 walk (`v6`): its flow keys and conntrack
/// values are too big for the 512-byte stack. Not pinned.
#[map]
pub static SCRATCH6: PerCpuArray<crate::v6::Scratch6> = PerCpuArray::with_max_entries(1, 0);

/// The IPv6 XDP programs (full at 0, compat at 1), tail-called by the main
/// XDP programs for IPv6 frames (`main.rs`). A program array serves one
/// program type: TC has its own.
#[map]
pub static V6_XDP_PROGS: ProgramArray = ProgramArray::pinned(2, 0);

/// As `V6_XDP_PROGS`, for TC.
#[map]
pub static V6_TC_PROGS: ProgramArray = ProgramArray::pinned(2, 0);

/// User-defined selectors by service id (`selector`, docs/policies.md):
/// the XDP ones here, filled by the agent for a service that names one.
#[map]
pub static SELECTORS_XDP: ProgramArray = ProgramArray::pinned(limits::MAX_SERVICES, 0);

/// As `SELECTORS_XDP`, for TC.
#[map]
pub static SELECTORS_TC: ProgramArray = ProgramArray::pinned(limits::MAX_SERVICES, 0);

/// The main XDP programs (full at 0, compat at 1) that a selector
/// tail-calls back into with its answer; index 2 stays empty (the agent's
/// self-test of a selector).
#[map]
pub static SELECTOR_RETURN_XDP: ProgramArray = ProgramArray::pinned(selector::RET_SLOTS, 0);

/// As `SELECTOR_RETURN_XDP`, for TC.
#[map]
pub static SELECTOR_RETURN_TC: ProgramArray = ProgramArray::pinned(selector::RET_SLOTS, 0);

/// Per-CPU: the arguments and answer of the selector call in progress
/// (`SelectorArgs`). Pinned: the user's object reuses it by name.
#[map]
pub static SELECTOR_ARGS: PerCpuArray<SelectorArgs> = PerCpuArray::pinned(1, 0);

/// Service id -> its selector's candidate backends (agent-owned).
#[map]
pub static SELECTOR_BACKENDS: HashMap<u32, SelectorCandidates> =
    HashMap::pinned(selector::MAX_SERVICES, 0);
