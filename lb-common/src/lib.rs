//! Types shared by the rpclb kernel programs (`lb-ebpf`) and userspace
//! (`lb-agent`, `lbctl`, tests).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and no
//! `bool`, enum or `Option`, so that both sides agree on the bytes. Addresses
//! and ports are stored in network byte order, exactly as they appear in the
//! packet, so the kernel never swaps bytes on the fast path.
#![no_std]

/// Map names, as the loader and `lbctl` find them in the object and under the pin path.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const SLOTS: &str = "SLOTS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const AFFINITY: &str = "AFFINITY";
    pub const RR_COUNTERS: &str = "RR_COUNTERS";
    pub const SVC_STATS: &str = "SVC_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const BACKEND_CONNS: &str = "BACKEND_CONNS";
    pub const BACKEND_GC: &str = "BACKEND_GC";
    pub const REASONS: &str = "REASONS";
    pub const CONFIG: &str = "CONFIG";
    /// Service names for lbctl and metrics; the programs never read it.
    pub const NAMES: &str = "NAMES";
    /// Per-ifindex XDP flags (`xdp_iface`), written by the agent.
    pub const XDP_IFACES: &str = "XDP_IFACES";
    /// First fragments' ports, which later fragments of the datagram follow.
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// The per-CPU flow cache; pinned because its entries hold counts not
    /// yet added to the counter maps (`FlowCacheEntry::pending_packets`).
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    /// The per-CPU route cache per destination (`RouteCacheEntry`); pinned
    /// like every map, though a fresh one only costs a route lookup.
    pub const ROUTE_CACHE: &str = "ROUTE_CACHE";
    /// Backend ip:port:proto -> its one frontend (VIP:port): where the first
    /// reply of a flow finds the flow's forward key (`BACKENDS` flag
    /// `backend_flags::ONE_FRONTEND`).
    pub const FRONTENDS: &str = "FRONTENDS";
    /// IPv6 services (`ServiceKey6` -> `ServiceValue`; ids, tables and
    /// backends shared with IPv4).
    pub const SERVICES6: &str = "SERVICES6";
    /// IPv6 backend addresses by backend id (the rest is in `BACKENDS`).
    pub const BACKENDS6: &str = "BACKENDS6";
    /// IPv6 flows (`FlowKey6` -> `CtValue6`).
    pub const CONNTRACK6: &str = "CONNTRACK6";
    /// QoS limit per backend id (`u32`, 0 = none), read only for a service
    /// with `svc_flags::LIMITED`.
    pub const BACKEND_LIMITS: &str = "BACKEND_LIMITS";

    /// The IPv6 XDP programs (`prog_names::XDP6`, `XDP6_COMPAT` at 0 and
    /// 1), which the main XDP programs tail-call for IPv6 frames; filled by
    /// the agent at load. Pinned (a program array is emptied when its last
    /// user reference goes), but not in `ALL`: it holds programs, not state
    /// (`cleanup` removes it by name). A program array serves one program
    /// type, hence one for XDP and one for TC.
    pub const V6_XDP_PROGS: &str = "V6_XDP_PROGS";
    /// As `V6_XDP_PROGS` for TC (`prog_names::TC6`, `TC6_COMPAT`).
    pub const V6_TC_PROGS: &str = "V6_TC_PROGS";

    /// User-defined selectors (docs/policies.md, "User-defined selector"):
    /// the XDP and TC selector programs by service id, tail-called for a new
    /// flow of a service with `svc_flags::SELECTOR`. Programs, not state:
    /// not in `ALL` (as `V6_XDP_PROGS`).
    pub const SELECTORS_XDP: &str = "SELECTORS_XDP";
    pub const SELECTORS_TC: &str = "SELECTORS_TC";
    /// The main programs (full at 0, compat at 1) that a selector
    /// tail-calls back into with its answer.
    pub const SELECTOR_RETURN_XDP: &str = "SELECTOR_RETURN_XDP";
    pub const SELECTOR_RETURN_TC: &str = "SELECTOR_RETURN_TC";
    /// Per-CPU, one entry: the selector call's arguments and answer
    /// (`SelectorArgs`). Shared by name with the user's object.
    pub const SELECTOR_ARGS: &str = "SELECTOR_ARGS";
    /// Service id -> its candidate backends (`SelectorCandidates`), written
    /// by the agent for a service that names a selector.
    pub const SELECTOR_BACKENDS: &str = "SELECTOR_BACKENDS";
    /// The selector maps, for cleanup.
    pub const SELECTOR_MAPS: &[&str] = &[
        SELECTORS_XDP,
        SELECTORS_TC,
        SELECTOR_RETURN_XDP,
        SELECTOR_RETURN_TC,
        SELECTOR_ARGS,
        SELECTOR_BACKENDS,
    ];

    /// Every map, in a stable order (pinning and cleanup walk this list).
    pub const ALL: &[&str] = &[
        SERVICES,
        BACKENDS,
        SLOTS,
        CONNTRACK,
        AFFINITY,
        RR_COUNTERS,
        SVC_STATS,
        BACKEND_STATS,
        BACKEND_CONNS,
        BACKEND_GC,
        REASONS,
        CONFIG,
        NAMES,
        XDP_IFACES,
        FRAGMENTS,
        FLOW_CACHE,
        ROUTE_CACHE,
        FRONTENDS,
        SERVICES6,
        BACKENDS6,
        CONNTRACK6,
        BACKEND_LIMITS,
    ];
}

/// Program names in the object.
pub mod prog_names {
    /// The full program set (Linux 5.12+).
    pub const XDP: &str = "rpclb_xdp";
    pub const TC: &str = "rpclb_tc";
    /// The compat program set (older kernels: no fetch/cmpxchg atomics, no
    /// coarse clock; lb-ebpf/src/set.rs).
    pub const XDP_COMPAT: &str = "rpclb_xdp_compat";
    pub const TC_COMPAT: &str = "rpclb_tc_compat";
    /// The IPv6 walk of each program above, a program of its own reached
    /// by a tail call (`map_names::V6_XDP_PROGS` / `V6_TC_PROGS`, full at
    /// index 0, compat at 1): its stack would not fit beside the IPv4
    /// walk's in one program.
    pub const XDP6: &str = "rpclb_xdp6";
    pub const XDP6_COMPAT: &str = "rpclb_xdp6_compat";
    pub const TC6: &str = "rpclb_tc6";
    pub const TC6_COMPAT: &str = "rpclb_tc6_compat";
    /// Benchmark baselines; loaded only by `cargo xtask bench`.
    pub const BENCH_TX: &str = "bench_xdp_tx";
    pub const BENCH_DROP: &str = "bench_xdp_drop";
}

/// Default map sizes. Each is a flag of the agent; these fit a 5,000-service cluster.
pub mod limits {
    /// Service ids index the per-service arrays, so this also bounds ids.
    pub const MAX_SERVICES: u32 = 16_384;
    /// Backend ids index the per-backend arrays. Id 0 is never used.
    pub const MAX_BACKENDS: u32 = 262_144;
    /// Conntrack entries (a flow uses `CT_ENTRIES_PER_FLOW`: forward and reverse).
    pub const MAX_CONNTRACK: u32 = 524_288;
    /// IPv6 conntrack entries (`CONNTRACK6`, `--max-conntrack6`): an
    /// entry takes 184 bytes against IPv4's 128, and most clusters carry
    /// less IPv6 than IPv4.
    pub const MAX_CONNTRACK6: u32 = 131_072;
    /// Conntrack entries one flow takes: forward and reverse. A map of
    /// `--max-conntrack` entries holds that / 2 flows. (A flow to a backend
    /// with one frontend writes its reverse entry at its first reply, so a
    /// flow that never got one, e.g. a SYN flood's, takes one entry.)
    pub const CT_ENTRIES_PER_FLOW: u32 = 2;
    /// Client-IP affinity entries.
    pub const MAX_AFFINITY: u32 = 131_072;
    /// Fragmented datagrams in flight (one entry per datagram, kept until
    /// evicted by newer ones; Cilium's default is the same).
    pub const MAX_FRAGMENTS: u32 = 8192;
    /// Total selection-table slots shared by all services (4 bytes each).
    pub const MAX_SLOTS: u32 = 1 << 24;
    /// Default Maglev table size (prime).
    pub const DEFAULT_MAGLEV_M: u32 = 16_381;
    /// Upper bound on a weighted (non-Maglev) selection table.
    pub const MAX_WEIGHTED_TABLE: u32 = 65_536;
    /// Size of `XDP_IFACES`: native XDP never redirects into an interface
    /// whose ifindex is at or above it (the packet goes to the stack).
    pub const MAX_XDP_IFINDEX: u32 = 65_536;
    /// Default source ports for flows whose backend-side tuple is taken
    /// (`--collision-ports`): above Linux's default ephemeral range
    /// (32768-60999), so a client's own ports rarely meet them. The rest of
    /// 61000-65535 is the SNAT range ([`SNAT_PORTS`]).
    pub const COLLISION_PORTS: (u16, u16) = (61_000, 61_999);
    /// Default source ports of SNATed flows (`--snat-ports`): front ends with
    /// `externalTrafficPolicy: Cluster` to a backend on another node get one
    /// of these on the node's address. Above the ephemeral range too, so the
    /// node's own connections never meet them; apart from the collision
    /// range (the agent refuses an overlap).
    pub const SNAT_PORTS: (u16, u16) = (62_000, 65_535);
    /// Candidate ports the kernel tries for one colliding flow
    /// (`collision_port`) before it counts the range as exhausted.
    pub const COLLISION_PROBES: u32 = 16;
}

/// `ServiceValue::flags`.
pub mod svc_flags {
    /// Some backend has a QoS limit (`BACKEND_LIMITS`): a new flow skips
    /// backends at their limit. Unset: `BACKEND_LIMITS` is never read.
    pub const LIMITED: u8 = 1;
    /// A user-defined selector program is in the service's slot of
    /// `SELECTORS_XDP`/`SELECTORS_TC`: a new flow asks it first.
    pub const SELECTOR: u8 = 2;
}

/// The user-defined selector ABI, version 1 (docs/policies.md, "User-defined
/// selector"). The main program writes a `SelectorArgs` into the per-CPU
/// `SELECTOR_ARGS[0]` (state `ASKED`) and tail-calls the service's selector;
/// the selector writes `answer` (an index into `backends`, or -1 for the
/// built-in algorithm), sets state `ANSWERED` and tail-calls
/// `SELECTOR_RETURN_<hook>[ret]`, which re-enters the main program.
pub mod selector {
    /// The ABI version in `SelectorArgs::version`.
    pub const VERSION: u32 = 1;
    /// At most this many candidates (the service's first backends, in the
    /// order of its config).
    pub const MAX_CANDIDATES: usize = 16;
    /// At most this many services with a selector (`SELECTOR_BACKENDS`).
    pub const MAX_SERVICES: u32 = 256;
    /// `SelectorArgs::state`.
    pub const IDLE: u32 = 0;
    pub const ASKED: u32 = 1;
    pub const ANSWERED: u32 = 2;
    /// `SelectorArgs::ret` of the agent's self-test: no program there, so
    /// the selector's tail call back fails and it returns its own verdict.
    pub const RET_SELF_TEST: u32 = 2;
    /// Entries of `SELECTOR_RETURN_XDP`/`_TC`.
    pub const RET_SLOTS: u32 = 3;
}

/// `SELECTOR_ARGS` value (see [`selector`]). Addresses and ports in network
/// byte order, as in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelectorArgs {
    /// `selector::IDLE`, `ASKED` or `ANSWERED`.
    pub state: u32,
    /// `selector::VERSION`.
    pub version: u32,
    pub svc_id: u32,
    /// Where the selector tail-calls back (`SELECTOR_RETURN_<hook>` index).
    pub ret: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
    /// Candidates in `backends` (at most `selector::MAX_CANDIDATES`).
    pub n: u32,
    /// The selector's answer: an index below `n`, or -1.
    pub answer: i32,
    /// Backend ids (`BACKENDS`), in the order of the service's config.
    pub backends: [u32; selector::MAX_CANDIDATES],
}

/// `SELECTOR_BACKENDS` value: a service's candidates for its selector.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelectorCandidates {
    pub n: u32,
    pub _pad: u32,
    pub backends: [u32; selector::MAX_CANDIDATES],
}

/// The example selector by client subnet (`example:geo`,
/// lb-ebpf/src/bin/geo-selector.rs): its table `GEO_SUBNETS`, an LPM trie
/// pinned by name at `<pin path>/selectors/GEO_SUBNETS`, shared by every
/// service that uses the example, filled by `lbctl selector geo`.
///
/// An entry's key is an LPM key: the prefix length (`u32`, host order) then
/// a [`geo::Subnet`]; its value a [`geo::Mask`].
pub mod geo {
    /// The table's name (pinned by name).
    pub const MAP: &str = "GEO_SUBNETS";
    /// How many subnets it holds.
    pub const MAX_ENTRIES: u32 = 4096;
    /// The key's data: the subnet's IPv4 address in network byte order (as
    /// in the packet); bits past the prefix length are zero.
    pub type Subnet = u32;
    /// The value: bit `i` set = the service's candidate `i` (its `i`-th
    /// backend, `i` below `selector::MAX_CANDIDATES`).
    pub type Mask = u32;
}

/// The slots a new flow of a `LIMITED` service tries, its algorithm's first
/// included, before it finds every backend full (docs/policies.md, "QoS limits").
pub const QOS_PROBE: u32 = 8;

/// Load-balancing algorithms (`ServiceValue::algo`).
pub mod algo {
    pub const RANDOM: u8 = 0;
    pub const ROUND_ROBIN: u8 = 1;
    pub const MAGLEV: u8 = 2;
    pub const SOURCE_HASH: u8 = 3;
    pub const LEAST_CONN: u8 = 4;
    pub const COUNT: u8 = 5;

    pub const NAMES: [&str; COUNT as usize] = [
        "random",
        "round-robin",
        "maglev",
        "source-hash",
        "least-conn",
    ];
}

/// Backend states (`BackendValue::state`).
pub mod backend_state {
    /// Free slot in the backend array.
    pub const UNUSED: u8 = 0;
    pub const ACTIVE: u8 = 1;
    /// Gets no new flows; its existing flows continue.
    pub const TERMINATING: u8 = 2;
}

/// Flags of a backend (`BackendValue::flags`).
pub mod backend_flags {
    /// The backend's ip:port:proto is reached through exactly one frontend
    /// (VIP:port), which `FRONTENDS` holds: a new flow to it writes only its
    /// forward entry, and its first reply writes the reverse entry. Without
    /// it (several frontends: NodePort, external IPs, two Services), the new
    /// flow writes both at once, and claims the reverse key against the
    /// other frontends' flows (port rewrites).
    pub const ONE_FRONTEND: u8 = 1;
    /// The backend of a front end with `externalTrafficPolicy: Cluster`
    /// (node port, external or load-balancer IP) that runs on another node:
    /// a new flow to it is SNATed to this node's address
    /// (`config_idx::SNAT_ADDR`) and a port of the SNAT range, so that the
    /// reply comes back through this node (lb-ebpf/src/snat.rs).
    pub const SNAT: u8 = 2;
}

/// Flags of a conntrack entry (`CtValue::flags`).
pub mod ct_flags {
    /// The flow is SNATed (`backend_flags::SNAT`). Forward entry: the source
    /// becomes `config_idx::SNAT_ADDR`:`client_port`. Reverse entry (keyed
    /// backend -> node address:SNAT port): `state` holds the client's
    /// address, and the reply's destination goes back to it. IPv6
    /// (`CtValue6`): the address is `config_idx::SNAT_ADDR6`'s, and both
    /// entries keep the other address in `snat_ip6`.
    pub const SNAT: u8 = 1;
    /// With `SNAT`: a hairpin flow (a pod reaching itself through its
    /// Service: the backend chosen is the client's own address). The source
    /// becomes [`SERVICE_LOOPBACK_V4`](crate::SERVICE_LOOPBACK_V4) (IPv6:
    /// [`SERVICE_LOOPBACK_V6`](crate::SERVICE_LOOPBACK_V6)), not the
    /// node's address; the reverse entry is as `SNAT`'s.
    pub const HAIRPIN: u8 = 2;
}

/// The "service loopback" address a hairpin flow is SNATed to (network
/// order): 169.254.42.1, link-local, as Cilium's default. No node or pod
/// holds it, so a packet to it can only be a hairpin flow's reply
/// (lb-ebpf/src/snat.rs, docs/kubernetes.md).
pub const SERVICE_LOOPBACK_V4: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

/// The IPv6 "service loopback" address a hairpin IPv6 flow is SNATed to
/// (four native words of the wire bytes): 100::a9fe:2a01, in the
/// discard-only prefix 100::/64 (RFC 6666) with 169.254.42.1 in its last
/// 32 bits. No node or pod holds it, and the network drops what is sent to
/// it, so a packet to it can only be a hairpin flow's reply, which rpclb
/// un-NATs (a link-local address would not do: a pod resolves fe80::/64 on
/// its own link instead of routing it to the node). docs/kubernetes.md.
pub const SERVICE_LOOPBACK_V6: [u32; 4] = [
    u32::from_ne_bytes([0x01, 0x00, 0, 0]),
    0,
    0,
    u32::from_ne_bytes([169, 254, 42, 1]),
];

/// IP protocol numbers.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Conntrack flow states (`CtValue::state`).
pub mod ct_state {
    /// TCP: only the client's SYN seen.
    pub const SYN: u32 = 1;
    pub const ESTABLISHED: u32 = 2;
    /// TCP: FIN or RST seen; the backend's active count was decremented.
    pub const CLOSING: u32 = 3;
    /// UDP flows have a single state.
    pub const UDP: u32 = 4;

    pub fn name(s: u32) -> &'static str {
        match s {
            SYN => "syn",
            ESTABLISHED => "established",
            CLOSING => "closing",
            UDP => "udp",
            _ => "unknown",
        }
    }
}

/// Conntrack entry direction (`CtValue::dir`).
pub mod ct_dir {
    /// Client -> VIP; `nat_*` is the backend.
    pub const FORWARD: u8 = 1;
    /// Backend -> client; `nat_*` is the VIP.
    pub const REVERSE: u8 = 2;
}

/// Why a packet was passed, dropped or answered: indexes into `REASONS`.
pub mod reason {
    pub const PASS_NOT_IPV4: u32 = 0;
    pub const PASS_NOT_TCP_UDP: u32 = 1;
    pub const PASS_FRAGMENT: u32 = 2;
    pub const PASS_IP_OPTIONS: u32 = 3;
    pub const PASS_NO_SERVICE: u32 = 4;
    pub const PASS_FIB: u32 = 5;
    pub const DROP_TRUNCATED_ETH: u32 = 6;
    pub const DROP_TRUNCATED_IP: u32 = 7;
    pub const DROP_BAD_IHL: u32 = 8;
    pub const DROP_BAD_TOTAL_LEN: u32 = 9;
    pub const DROP_TRUNCATED_L4: u32 = 10;
    pub const DROP_NO_BACKEND: u32 = 11;
    pub const TX_RST_NO_BACKEND: u32 = 12;
    pub const DROP_BAD_TABLE: u32 = 13;
    pub const DROP_CT_INSERT: u32 = 14;
    pub const FWD_REDIRECT: u32 = 15;
    pub const NAT_FORWARD: u32 = 16;
    pub const NAT_REVERSE: u32 = 17;
    pub const DROP_RST_BUILD: u32 = 18;
    /// XDP: a translated packet whose L4 checksum is a CHECKSUM_PARTIAL seed,
    /// updated as one and handed to the stack instead of redirected.
    pub const PASS_CSUM_PARTIAL: u32 = 19;
    /// XDP: as `PASS_CSUM_PARTIAL`, for a seed-valued check on a segment too
    /// long to verify (taken for a seed without verification).
    pub const PASS_CSUM_UNVERIFIED: u32 = 20;
    /// A new flow whose backend-side tuple another flow holds (the same
    /// client ip:port to the same backend through another VIP): its source
    /// port was rewritten to a free one of the collision range. A conntrack
    /// event counted beside the packet's outcome (`nat_forward`), not one.
    pub const CT_PORT_REWRITE: u32 = 21;
    /// As `CT_PORT_REWRITE`, but no candidate port of the range was free:
    /// the new flow's packet (a SYN: the client retries) is dropped, and the
    /// flow holding the tuple is left alone.
    pub const DROP_PORTS_EXHAUSTED: u32 = 22;
    /// Native XDP: a translated packet routed to an interface that cannot
    /// take XDP frames (`xdp_iface::REDIRECT_TARGET` unset), handed to the
    /// stack instead of being redirected into a black hole.
    pub const PASS_XDP_TARGET: u32 = 23;
    /// A later fragment (no L4 header) translated as its datagram's first
    /// fragment was, found through `FRAGMENTS`. Later fragments without an
    /// entry there pass, counted as `PASS_FRAGMENT`.
    pub const NAT_FRAGMENT: u32 = 24;
    /// A packet handed to the stack because the route lookup for its flow
    /// or its destination failed less than `FIB_FAIL_NS` ago (the failure is
    /// cached in the conntrack entry and in `ROUTE_CACHE`, not repeated on
    /// every packet or every new flow).
    pub const PASS_FIB_CACHED: u32 = 25;
    /// A UDP datagram to a service with no usable backend, answered with an
    /// ICMP port unreachable (as kube-proxy's REJECT).
    pub const TX_ICMP_NO_BACKEND: u32 = 26;
    /// IPv6: an extension-header chain this program does not walk (more
    /// than `IPV6_MAX_EXT` headers or `IPV6_MAX_EXT_BYTES` bytes, a routing
    /// header with segments left, a jumbogram, or an unknown header):
    /// handed to the stack.
    pub const PASS_IPV6_EXT: u32 = 27;
    /// An IPv6 frame whose program (`prog_names::XDP6`, ...) was not in
    /// its program array (the tail call failed): handed to the stack.
    pub const PASS_IPV6_NO_PROGRAM: u32 = 28;
    /// A reply's reverse entry written at the flow's first reply (its
    /// backend has one frontend, `FRONTENDS`), or rewritten there because
    /// the entry found belonged to an older flow. A conntrack event counted
    /// beside `nat_reverse`.
    pub const CT_REVERSE_LAZY: u32 = 29;
    /// A new flow SNATed to the node's address and a port of the SNAT range
    /// (`backend_flags::SNAT`). A conntrack event counted beside
    /// `nat_forward`.
    pub const CT_SNAT: u32 = 30;
    /// A new flow to be SNATed (a `Cluster` front end's to another node, or
    /// a hairpin flow) found no free port of the SNAT range (among
    /// `COLLISION_PROBES` candidates), or SNAT is off (no ports; for the
    /// former also no address): its packet is dropped (a SYN: the client
    /// retries).
    pub const DROP_SNAT_EXHAUSTED: u32 = 31;
    /// TC: a SNATed packet (from the client side) that the walk would have
    /// handed to the stack, which drops it (its source is a local address:
    /// a martian), most often because the next hop's MAC is not known yet:
    /// sent with `bpf_redirect_neigh`, which resolves it. Counted beside the
    /// reason the walk gave (e.g. `pass_fib`).
    pub const FWD_REDIRECT_NEIGH: u32 = 32;
    /// A SNATed packet (from the client side; a hairpin flow's too) that cannot be forwarded
    /// without the stack: no route (TC), or in XDP no redirect (no
    /// neighbour entry yet, an interface that takes no XDP frames, a
    /// CHECKSUM_PARTIAL seed): dropped (the stack would drop it as a
    /// martian). The client retransmits.
    pub const DROP_SNAT_UNROUTED: u32 = 33;
    /// A TCP SYN of a new flow to a service whose backends are all at their
    /// QoS limit (docs/policies.md): answered with a RST, as with no backend.
    pub const TX_RST_BACKENDS_FULL: u32 = 34;
    /// As `TX_RST_BACKENDS_FULL`, for a UDP datagram: an ICMP port unreachable.
    pub const TX_ICMP_BACKENDS_FULL: u32 = 35;
    /// As `TX_RST_BACKENDS_FULL`, for a packet that gets no answer (not a
    /// SYN, or no way back out of the ingress interface): dropped.
    pub const DROP_BACKENDS_FULL: u32 = 36;
    /// A new hairpin flow (a pod to its own Service whose chosen backend is
    /// that pod): SNATed to `SERVICE_LOOPBACK_V4` and a port of the SNAT
    /// range (`ct_flags::HAIRPIN`). A conntrack event counted beside
    /// `nat_forward` (instead of `ct_snat`).
    pub const CT_HAIRPIN: u32 = 37;
    /// A new flow whose backend its service's user-defined selector chose
    /// (docs/policies.md). Counted beside `nat_forward`.
    pub const SELECTOR_CHOSEN: u32 = 38;
    /// A service with a selector whose slot was empty (the tail call
    /// failed): the built-in algorithm chose.
    pub const SELECTOR_MISSING: u32 = 39;
    /// The selector answered -1, or came back without an answer: the
    /// built-in algorithm chose.
    pub const SELECTOR_NO_ANSWER: u32 = 40;
    /// The selector's answer was out of range, or named a backend that
    /// takes no new flows (terminating, drained, at its QoS limit): the
    /// built-in algorithm chose.
    pub const SELECTOR_REFUSED: u32 = 41;
    pub const COUNT: u32 = 42;

    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ipv4",
        "pass_not_tcp_udp",
        "pass_fragment",
        "pass_ip_options",
        "pass_no_service",
        "pass_fib",
        "drop_truncated_eth",
        "drop_truncated_ip",
        "drop_bad_ihl",
        "drop_bad_total_len",
        "drop_truncated_l4",
        "drop_no_backend",
        "tx_rst_no_backend",
        "drop_bad_table",
        "drop_ct_insert",
        "fwd_redirect",
        "nat_forward",
        "nat_reverse",
        "drop_rst_build",
        "pass_csum_partial",
        "pass_csum_unverified",
        "ct_port_rewrite",
        "drop_ports_exhausted",
        "pass_xdp_target",
        "nat_fragment",
        "pass_fib_cached",
        "tx_icmp_no_backend",
        "pass_ipv6_ext",
        "pass_ipv6_no_program",
        "ct_reverse_lazy",
        "ct_snat",
        "drop_snat_exhausted",
        "fwd_redirect_neigh",
        "drop_snat_unrouted",
        "tx_rst_backends_full",
        "tx_icmp_backends_full",
        "drop_backends_full",
        "ct_hairpin",
        "selector_chosen",
        "selector_missing",
        "selector_no_answer",
        "selector_refused",
    ];
}

/// Flags per ifindex in `XDP_IFACES`.
pub mod xdp_iface {
    /// Native XDP may redirect into this interface: its driver takes XDP
    /// frames (a physical NIC running native XDP, or one the operator names
    /// with `--xdp-redirect-to`). A veth takes them only if its peer runs an
    /// XDP program (or, from Linux 5.13, has GRO on); else they are dropped.
    pub const REDIRECT_TARGET: u32 = 1;
    /// The XDP program on this interface runs in generic (skb) mode, whose
    /// redirects are skb transmits that every device takes.
    pub const GENERIC: u32 = 2;
}

/// Indexes into the `CONFIG` array (runtime switches set by the agent).
pub mod config_idx {
    /// 1: forward with `bpf_fib_lookup` + redirect; 0: always hand to the stack.
    pub const FIB_REDIRECT: u32 = 0;
    // 1 was the capacity of `SLOTS`, never read: the kernel's array lookup
    // bounds-checks every slot (out of range is `drop_bad_table`).
    /// First source port that a colliding flow may be given (host order).
    pub const COLLISION_PORT_MIN: u32 = 2;
    /// Number of ports from `COLLISION_PORT_MIN` on; 0 disables port
    /// rewrites (a colliding new flow is then dropped, `drop_ports_exhausted`).
    pub const COLLISION_PORT_COUNT: u32 = 3;
    /// Generation of the maps, bumped by the agent on every map change it
    /// makes: a per-CPU flow cache entry (`FlowCacheEntry`) of another
    /// generation is stale. 0 turns the cache off (nothing is cached).
    pub const FLOW_GEN: u32 = 4;
    /// The node's address that SNATed flows leave from (network order;
    /// `--snat-address`); 0: SNAT off.
    pub const SNAT_ADDR: u32 = 5;
    /// First port of the SNAT range (host order; `--snat-ports`).
    pub const SNAT_PORT_MIN: u32 = 6;
    /// Ports from `SNAT_PORT_MIN` on; 0: SNAT off (such flows are dropped,
    /// `drop_snat_exhausted`).
    pub const SNAT_PORT_COUNT: u32 = 7;
    /// The node's IPv6 address that SNATed IPv6 flows leave from
    /// (`--snat-address6`): four words, as the address's bytes on the wire
    /// (read as native words, as `FlowKey6`); all 0: IPv6 SNAT to the
    /// node's address off. The ports are the IPv4 ones above.
    pub const SNAT_ADDR6: u32 = 8;
    pub const COUNT: u32 = 12;
}

/// `SERVICES` key: a VIP, port and protocol, all in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `SERVICES` value.
///
/// The selection table for a service is `SLOTS[table_off .. table_off + table_len]`:
/// a Maglev table for `maglev` and `source-hash`, a weighted slot list for the
/// others. A new table is written to a fresh slice and then this value is
/// replaced in one map update, so the kernel never sees a half-built table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub id: u32,
    pub table_off: u32,
    /// 0: no usable backend (SYN gets a RST, other packets are dropped).
    pub table_len: u32,
    /// Client-IP affinity timeout in seconds; 0 disables affinity.
    pub affinity_timeout_s: u32,
    pub algo: u8,
    /// `svc_flags`.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Hash of the table's contents: a restarted agent compares it with the
    /// table it would build, and rewrites nothing when they match.
    pub table_hash: u32,
}

/// `BACKENDS` value, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    pub ip: u32,
    pub port: u16,
    pub state: u8,
    /// `backend_flags`.
    pub flags: u8,
    pub weight: u32,
    pub svc_id: u32,
}

/// `CONNTRACK` key: the 5-tuple as seen on the wire (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `CONNTRACK` value.
///
/// A forward entry (client -> VIP) holds the backend in `nat_*`. A reverse
/// entry (backend -> client) holds the VIP. Either key can be rebuilt from the
/// other entry, which lets the reply path update the forward entry's state and
/// lets GC delete both.
///
/// Two flows of one client ip:port through two VIPs to one backend would
/// share a reverse key. The second one gets another source port instead
/// (`client_port`, docs/reliability.md "Reverse-conntrack collisions"), so
/// every reverse entry belongs to exactly one forward entry
/// ([`FlowKey::owns_reverse`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub nat_ip: u32,
    pub nat_port: u16,
    pub dir: u8,
    /// `ct_flags`.
    pub flags: u8,
    pub svc_id: u32,
    pub backend_id: u32,
    /// Forward entry: one of `ct_state`; changed with compare-and-swap in
    /// the kernel. Reverse entry: 0, but the client's address (network
    /// order) in a SNATed flow's (`ct_flags::SNAT`).
    pub state: u32,
    /// The client port across a source-port rewrite: in a forward entry the
    /// port the backend sees, in a reverse entry the client's own port
    /// (network order). 0: no rewrite.
    pub client_port: u16,
    pub _pad2: u16,
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet, updated at most every
    /// `LAST_SEEN_GRANULARITY_NS` to keep the fast path free of writes.
    pub last_seen_ns: u64,
    /// Route cache: when `fib_ifindex` != 0, the result of the last
    /// `bpf_fib_lookup` for this direction (taken at `fib_ns`, by this flow
    /// or, through `ROUTE_CACHE`, by another to the same destination):
    /// egress interface, then destination and source MAC. Reused until
    /// `FIB_CACHE_NS` after `fib_ns`, so an established flow skips the
    /// lookup. A new flow's forward entry gets its first packet's route.
    pub fib_ns: u64,
    pub fib_ifindex: u32,
    pub fib_mac: [u8; 12],
}

/// How long a flow reuses its cached route before looking it up again.
pub const FIB_CACHE_NS: u64 = 1_000_000_000;

/// `CtValue::fib_ifindex` of a flow whose last route lookup failed: the
/// packets of the next `FIB_FAIL_NS` go to the stack without a lookup.
pub const FIB_FAILED: u32 = u32::MAX;

/// How long a failed route lookup is reused (`FIB_FAILED`).
pub const FIB_FAIL_NS: u64 = 100_000_000;

/// Slots of the per-CPU route cache (`ROUTE_CACHE`), a power of two.
pub const ROUTE_CACHE_SLOTS: u32 = 1024;

/// One slot of the per-CPU route cache (lb-ebpf/src/fwd.rs): the last
/// `bpf_fib_lookup` result for a destination address arriving on an
/// interface, so that a flow whose own entry has no fresh route (a new flow,
/// or a refresh) takes it instead of looking it up. The same freshness as
/// the flow's own cache: `FIB_CACHE_NS` for a route, `FIB_FAIL_NS` for a
/// failed lookup (`FIB_FAILED`). 32 bytes; `ns`, `ifindex` and `mac` have
/// the layout of `CtValue`'s `fib_*` fields (copied as three words).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteCacheEntry {
    /// Destination IPv4 (network order) | ingress ifindex << 32; 0: empty.
    pub key: u64,
    /// When the route was looked up (the programs' clock).
    pub ns: u64,
    /// Egress interface; `FIB_FAILED`: the lookup failed; 0: empty.
    pub ifindex: u32,
    /// Destination, then source MAC.
    pub mac: [u8; 12],
}

/// Slots of the per-CPU flow cache (`FLOW_CACHE`), a power of two.
pub const FLOW_CACHE_SLOTS: u32 = 1024;

/// A flow cache entry is used while younger than this (counted from the
/// route lookup it copies), so the conntrack entry's last-seen is refreshed
/// and the route re-checked as often as without the cache.
pub const FLOW_CACHE_NS: u64 = FIB_CACHE_NS;

/// One slot of the per-CPU flow cache (lb-ebpf/src/flowcache.rs): an
/// established flow's direction and everything its packets need, so that a
/// hit is one rewrite without the conntrack lookup. 96 bytes.
///
/// A hit counts its packet here (`pending_*`), not in the counter maps: the
/// entry's next fill (a refresh or another flow taking the slot) adds them
/// to `SVC_STATS`, `BACKEND_STATS` and `REASONS` (`nat_reason` and
/// `FWD_REDIRECT`), and readers add what is still pending to what they read
/// from those maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheEntry {
    /// The flow key of the packet as it arrives (`FlowKey`, as two words).
    pub key: [u64; 2],
    /// When the route this entry copies was looked up (coarse clock).
    pub since_ns: u64,
    /// `CONFIG[FLOW_GEN]` when the entry was written.
    pub generation: u32,
    pub ifindex: u32,
    /// The addresses and ports after the rewrite (network order).
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// One's-complement sums to add to the IPv4 checksum (addresses and the
    /// TTL decrement) and to a full L4 checksum (addresses and ports).
    pub ip_delta: u16,
    pub l4_delta: u16,
    pub svc_id: u32,
    pub backend_id: u32,
    /// Destination, then source MAC: the first 12 bytes of the frame, as
    /// three words (copied word by word, not by a byte-wise `memmove`).
    pub mac: [u32; 3],
    /// `reason::NAT_FORWARD` or `reason::NAT_REVERSE`.
    pub nat_reason: u32,
    /// Packets and bytes of this entry's hits not yet added to the counter
    /// maps (see above).
    pub pending_packets: u64,
    pub pending_bytes: u64,
    /// `jiffies` of the last hit that checked the entry's age with the
    /// clock: later hits in the same tick skip the clock (0: none yet).
    pub tick: u64,
}

/// `last_seen_ns` is refreshed only when it is older than this.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

impl FlowKey {
    /// The reverse key of a forward entry: backend -> client (at the port
    /// the backend sees). Not for a SNATed flow (`ct_flags::SNAT`): its
    /// reverse key's destination is the node's SNAT address, which the
    /// forward entry does not hold; find it from the reverse entries'
    /// [`FlowKey::forward_of_reverse`] instead.
    pub fn reverse_of_forward(&self, v: &CtValue) -> FlowKey {
        FlowKey {
            src_ip: v.nat_ip,
            dst_ip: self.src_ip,
            src_port: v.nat_port,
            dst_port: if v.client_port != 0 {
                v.client_port
            } else {
                self.src_port
            },
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The forward key of a reverse entry: client (at its own port) -> VIP.
    /// A SNATed flow's reverse entry is keyed on the node's address; the
    /// client's is in its `state`.
    pub fn forward_of_reverse(&self, v: &CtValue) -> FlowKey {
        FlowKey {
            src_ip: if v.flags & ct_flags::SNAT != 0 {
                v.state
            } else {
                self.dst_ip
            },
            dst_ip: v.nat_ip,
            src_port: if v.client_port != 0 {
                v.client_port
            } else {
                self.dst_port
            },
            dst_port: v.nat_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// Whether the reverse entry `rk -> rv` belongs to the forward entry
    /// `self -> fv`: each key is the other's. Another flow can hold the
    /// reverse key `self` would have (an old entry of a colliding flow).
    pub fn owns_reverse(&self, fv: &CtValue, rk: &FlowKey, rv: &CtValue) -> bool {
        rv.dir == ct_dir::REVERSE
            && self.reverse_of_forward(fv) == *rk
            && rk.forward_of_reverse(rv) == *self
    }
}

/// Extension headers (hop-by-hop, routing, destination options) the IPv6
/// path skips before the L4 header; a longer chain passes (`PASS_IPV6_EXT`).
pub const IPV6_MAX_EXT: usize = 4;
/// Bytes of extension headers the IPv6 path skips at most.
pub const IPV6_MAX_EXT_BYTES: usize = 256;

/// `SERVICES6` key: an IPv6 VIP (16 bytes as on the wire, read as four
/// native words), port and protocol (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey6 {
    pub vip: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `CONNTRACK6` key: the IPv6 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `CONNTRACK6` value: an IPv4 entry (`CtValue`: direction, ids, TCP state,
/// flags, client port, times, route cache; its `nat_ip` is 0, and `state`
/// of a SNATed reverse entry is 0 too) and the IPv6 address it translates
/// to (`nat_ip6`: the backend in a forward entry, the VIP in a reverse
/// one). Sharing `CtValue` lets the IPv6 path use the IPv4 TCP state
/// machine and route cache as they are.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue6 {
    pub ct: CtValue,
    pub nat_ip6: [u32; 4],
    /// A SNATed flow's (`ct_flags::SNAT`) other address, 0 otherwise. In
    /// the forward entry: the source address its packets leave from (the
    /// node's `config_idx::SNAT_ADDR6`, or `SERVICE_LOOPBACK_V6` for a
    /// hairpin flow), so that the reverse key can be rebuilt from the
    /// forward entry. In the reverse entry (keyed backend -> that address):
    /// the client's address, which the reply's destination goes back to
    /// (IPv4 keeps it in `CtValue::state`, too small here).
    pub snat_ip6: [u32; 4],
}

impl FlowKey6 {
    /// The reverse key of a forward entry (see `FlowKey::reverse_of_forward`;
    /// a SNATed flow's ends at its `snat_ip6`).
    pub fn reverse_of_forward(&self, v: &CtValue6) -> FlowKey6 {
        FlowKey6 {
            src_ip: v.nat_ip6,
            dst_ip: if v.ct.flags & ct_flags::SNAT != 0 {
                v.snat_ip6
            } else {
                self.src_ip
            },
            src_port: v.ct.nat_port,
            dst_port: if v.ct.client_port != 0 {
                v.ct.client_port
            } else {
                self.src_port
            },
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The forward key of a reverse entry (a SNATed flow's client is in
    /// its `snat_ip6`).
    pub fn forward_of_reverse(&self, v: &CtValue6) -> FlowKey6 {
        FlowKey6 {
            src_ip: if v.ct.flags & ct_flags::SNAT != 0 {
                v.snat_ip6
            } else {
                self.dst_ip
            },
            dst_ip: v.nat_ip6,
            src_port: if v.ct.client_port != 0 {
                v.ct.client_port
            } else {
                self.dst_port
            },
            dst_port: v.ct.nat_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// Whether the reverse entry `rk -> rv` belongs to the forward entry `self -> fv`.
    pub fn owns_reverse(&self, fv: &CtValue6, rk: &FlowKey6, rv: &CtValue6) -> bool {
        rv.ct.dir == ct_dir::REVERSE
            && self.reverse_of_forward(fv) == *rk
            && rk.forward_of_reverse(rv) == *self
    }
}

/// An IPv6 address (four native words of wire bytes) folded to one word for
/// the hashes (`flow_hash`, `src_hash`, the affinity key): the XOR of the
/// words, as userspace folds it (lb-agent `userspace::select`).
#[inline(always)]
pub fn fold6(a: &[u32; 4]) -> u32 {
    a[0] ^ a[1] ^ a[2] ^ a[3]
}

/// `FRAGMENTS` key: a fragmented datagram as every one of its fragments
/// carries it (network byte order): addresses, protocol and IP id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `FRAGMENTS` value: the L4 ports of the datagram's first fragment, as on
/// the wire. With the key they give the conntrack key of the datagram's flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub src_port: u16,
    pub dst_port: u16,
}

/// `AFFINITY` key: (service, client IP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub client_ip: u32,
}

/// `AFFINITY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
}

/// Traffic counters: per-CPU in `SVC_STATS`, shared in `BACKEND_STATS` (atomic adds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub drops: u64,
}

/// Per-backend connection counts (`BACKEND_CONNS`), changed only by the
/// kernel with atomic adds. Active = opens - closes - `BACKEND_GC[id]`, where
/// `BACKEND_GC` counts flows that the agent expired; each side owns its own
/// counter, so neither overwrites the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCounts {
    pub opens: u64,
    pub closes: u64,
}

impl ConnCounts {
    pub fn active(&self, expired: u64) -> u64 {
        self.opens
            .saturating_sub(self.closes)
            .saturating_sub(expired)
    }
}

/// `NAMES` value: a service's `namespace/name:port`, UTF-8, not NUL-terminated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameValue {
    pub len: u32,
    pub bytes: [u8; NAME_MAX],
}

pub const NAME_MAX: usize = 252;

impl Default for NameValue {
    fn default() -> Self {
        NameValue {
            len: 0,
            bytes: [0; NAME_MAX],
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<NameValue>() == 256);
    assert!(core::mem::size_of::<ServiceKey>() == 8);
    assert!(core::mem::size_of::<ServiceValue>() == 24);
    assert!(core::mem::size_of::<BackendValue>() == 16);
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<CtValue>() == 64);
    assert!(core::mem::size_of::<FlowCacheEntry>() == 96);
    assert!(core::mem::size_of::<RouteCacheEntry>() == 32);
    // RouteCacheEntry's words 1..4 are CtValue's words 5..8 (lb-ebpf copies them).
    assert!(core::mem::offset_of!(RouteCacheEntry, ns) == 8);
    assert!(core::mem::offset_of!(RouteCacheEntry, ifindex) == 16);
    assert!(core::mem::offset_of!(RouteCacheEntry, mac) == 20);
    assert!(core::mem::offset_of!(CtValue, fib_ns) == 40);
    assert!(core::mem::offset_of!(CtValue, fib_ifindex) == 48);
    assert!(core::mem::offset_of!(CtValue, fib_mac) == 52);
    assert!(core::mem::size_of::<ServiceKey6>() == 20);
    assert!(core::mem::size_of::<FlowKey6>() == 40);
    assert!(core::mem::size_of::<CtValue6>() == 96);
    assert!(core::mem::size_of::<AffinityKey>() == 8);
    assert!(core::mem::size_of::<FragKey>() == 12);
    assert!(core::mem::size_of::<FragValue>() == 4);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<Counters>() == 32);
    assert!(core::mem::size_of::<ConnCounts>() == 16);
    assert!(core::mem::size_of::<SelectorArgs>() == 104);
    assert!(core::mem::size_of::<SelectorCandidates>() == 72);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FlowCacheEntry {}
    unsafe impl aya::Pod for RouteCacheEntry {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for ConnCounts {}
    unsafe impl aya::Pod for NameValue {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for CtValue6 {}
    unsafe impl aya::Pod for SelectorArgs {}
    unsafe impl aya::Pod for SelectorCandidates {}
}

/// The 32-bit mixer used for every hash in the data path (murmur3 finalizer).
/// Userspace uses the same function to predict source-hash and Maglev picks.
#[inline(always)]
pub fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a flow's 5-tuple (Maglev key).
#[inline(always)]
pub fn flow_hash(src_ip: u32, dst_ip: u32, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let ports = ((src_port as u32) << 16) | dst_port as u32;
    let mut h = mix32(src_ip ^ 0x9e37_79b9);
    h = mix32(h ^ dst_ip);
    h = mix32(h ^ ports);
    mix32(h ^ proto as u32)
}

/// The `i`-th candidate source port (host order) for a new flow whose
/// backend-side tuple is taken: ports `first .. first + count` (`count` > 0),
/// picked by the flow's hash, each probe independent of the last (linear
/// probing would cluster: in a simulation of 4,536 ports and 16 probes the
/// first miss came at a median 51% fill, against 71% this way).
#[inline(always)]
pub fn collision_port(first: u32, count: u32, flow_hash: u32, i: u32) -> u32 {
    first + mix32(flow_hash ^ i.wrapping_mul(0x9e37_79b9)) % count
}

/// Hash of a client IP (source-hash key).
#[inline(always)]
pub fn src_hash(src_ip: u32) -> u32 {
    mix32(src_ip ^ 0x2545_f491)
}
