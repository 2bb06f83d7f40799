//! The example user-defined selector (docs/policies.md): by client subnet.
//! `GEO_SUBNETS`, an LPM trie that the user fills, maps a client subnet to a
//! set of candidates (a bit mask of indexes into the service's backends, in
//! the order of its config); the flow goes to one of them by a hash of its
//! 5-tuple. A client in no subnet, or a set with no candidate: -1, the
//! service's built-in algorithm.
#![no_std]
#![no_main]

#[path = "../sdk.rs"]
mod sdk;

use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, lpm_trie::Key},
};
use lb_common::{SelectorArgs, flow_hash, geo, selector};

/// Client subnet (the address in network byte order, as in the packet) ->
/// a bit mask of candidate indexes (`lb_common::geo`). Pinned by name in
/// `<pin path>/selectors/`, where `lbctl selector geo` (or `bpftool`) fills
/// it; shared by every service that uses this selector.
#[map]
static GEO_SUBNETS: LpmTrie<geo::Subnet, geo::Mask> = LpmTrie::pinned(geo::MAX_ENTRIES, 0);

fn geo(a: &SelectorArgs) -> i32 {
    let set = match GEO_SUBNETS.get(Key::new(32, a.saddr)) {
        Some(m) => *m,
        None => return -1,
    };
    let n = a.n.min(selector::MAX_CANDIDATES as u32);
    let set = if n >= 32 {
        set
    } else {
        set & ((1u32 << n) - 1)
    };
    let count = set.count_ones();
    if count == 0 {
        return -1;
    }
    let mut k = flow_hash(a.saddr, a.daddr, a.sport, a.dport, a.proto) % count;
    let mut i = 0;
    while i < selector::MAX_CANDIDATES as u32 {
        if set & (1 << i) != 0 {
            if k == 0 {
                return i as i32;
            }
            k -= 1;
        }
        i += 1;
    }
    -1
}

rpclb_selector!(geo_selector_xdp, geo_selector_tc, geo);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
