//! Flow keys, entries and the TCP state machine.

use lb_common::{
    CtValue, FlowKey, LAST_SEEN_GRANULARITY_NS, ServiceKey, collision_port, config_idx, ct_dir,
    ct_state, flow_hash, limits, proto,
};

use crate::{
    fwd::NewRoute,
    maps::{CONNTRACK, FIB_SCRATCH, FRONTENDS, config},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    set::ProgramSet,
    stats,
};

/// A flow key built as two 8-byte words: no `memset` call for the padding.
#[inline(always)]
pub fn flow_key(src_ip: u32, dst_ip: u32, src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
    let w0 = src_ip as u64 | (dst_ip as u64) << 32;
    let w1 = src_port as u64 | (dst_port as u64) << 16 | (proto as u64) << 32;
    // SAFETY: FlowKey is repr(C), 16 bytes, every bit pattern valid (little endian).
    unsafe { core::mem::transmute::<[u64; 2], FlowKey>([w0, w1]) }
}

#[inline(always)]
pub fn key(p: &Packet) -> FlowKey {
    flow_key(p.saddr, p.daddr, p.sport, p.dport, p.proto)
}

/// A conntrack value built as eight 8-byte words: LLVM turns a zeroed
/// struct into a call to a byte-by-byte `memset`. `fib`: the last three
/// words (`fib_ns`, `fib_ifindex`, `fib_mac`), [`no_route`] for none.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn ct_value(
    nat_ip: u32,
    nat_port: u16,
    dir: u8,
    svc_id: u32,
    backend_id: u32,
    state: u32,
    client_port: u16,
    now: u64,
    fib: [u64; 3],
) -> CtValue {
    let w = [
        nat_ip as u64 | (nat_port as u64) << 32 | (dir as u64) << 48,
        svc_id as u64 | (backend_id as u64) << 32,
        state as u64 | (client_port as u64) << 32,
        now,
        now,
        fib[0],
        fib[1],
        fib[2],
    ];
    // SAFETY: CtValue is repr(C), 64 bytes without implicit padding, every
    // bit pattern valid (little endian).
    unsafe { core::mem::transmute::<[u64; 8], CtValue>(w) }
}

/// The `fib` words of an entry without a route: `fib_ifindex` (low half of
/// the middle word) 0; `fib_ns` and `fib_mac` hold filler, which keeps LLVM
/// from turning a run of zero words into a byte-wise `memset` call.
#[inline(always)]
fn no_route(now: u64) -> [u64; 3] {
    [now, now << 32, now]
}

#[inline(always)]
pub fn lookup(k: &FlowKey) -> Option<*mut CtValue> {
    CONNTRACK.get_ptr_mut(k)
}

const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

#[inline(always)]
fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    // SAFETY: FlowKey is repr(C), 16 bytes, every bit pattern valid.
    let a = unsafe { core::mem::transmute::<FlowKey, [u64; 2]>(*a) };
    let b = unsafe { core::mem::transmute::<FlowKey, [u64; 2]>(*b) };
    a[0] == b[0] && a[1] == b[1]
}

/// The client port of a reverse entry `v` at `rev` (undoing a rewrite).
#[inline(always)]
pub fn client_port_of_reverse(rev: &FlowKey, v: *const CtValue) -> u16 {
    let p = unsafe { (*v).client_port };
    if p != 0 { p } else { rev.dst_port }
}

/// Whether the forward entry `f` (at a key whose source port is
/// `owner_sport`) translates to the reverse key `rev`: it is a forward entry
/// to `rev`'s backend, and the flow's source port as the backend sees it
/// (rewritten or the client's own) is `rev`'s destination port.
#[inline(always)]
fn points_back(f: *const CtValue, owner_sport: u16, rev: &FlowKey) -> bool {
    unsafe {
        let seen = if (*f).client_port != 0 {
            (*f).client_port
        } else {
            owner_sport
        };
        (*f).dir == ct_dir::FORWARD
            && (*f).nat_ip == rev.src_ip
            && (*f).nat_port == rev.src_port
            && seen == rev.dst_port
    }
}

/// The forward key a reverse entry `v` at `rev` names. A SNATed flow's
/// reverse key ends at the node's address; its client is in `state`.
#[inline(always)]
pub fn owner_key(rev: &FlowKey, v: *const CtValue) -> FlowKey {
    flow_key(
        crate::snat::client_of_reverse(rev, v),
        unsafe { (*v).nat_ip },
        client_port_of_reverse(rev, v),
        unsafe { (*v).nat_port },
        rev.proto,
    )
}

/// The live forward entry of the reverse entry `v` at `rev`: the entry at
/// the key `v` names, if it points back at `rev`. `None` for a stale reverse
/// entry (its flow evicted, expired or re-created elsewhere).
#[inline(always)]
pub fn owner(rev: &FlowKey, v: *const CtValue) -> Option<*mut CtValue> {
    let fk = owner_key(rev, v);
    let f = lookup(&fk)?;
    if points_back(f, fk.src_port, rev) {
        Some(f)
    } else {
        None
    }
}

/// Whether the reverse entry at `rev` belongs to a live flow other than
/// `fwd`: its forward entry exists and points back at `rev`. A reverse entry
/// of `fwd` itself (a re-opened flow), or one whose forward entry is gone or
/// points elsewhere (evicted, re-created), is free to take.
#[inline(always)]
fn held_by_other(rev: &FlowKey, fwd: &FlowKey) -> bool {
    let v = match lookup(rev) {
        Some(v) => v,
        // Deleted since the insert failed: free.
        None => return false,
    };
    if unsafe { (*v).dir } != ct_dir::REVERSE {
        return true;
    }
    let fk = owner_key(rev, v);
    if same_key(&fk, fwd) {
        return false;
    }
    match lookup(&fk) {
        Some(f) => points_back(f, fk.src_port, rev),
        None => false,
    }
}

/// The first reply of a flow whose SYN wrote only its forward entry (its
/// backend has one frontend): finds the forward key through `FRONTENDS`
/// (backend ip:port:proto -> VIP:port), checks that the forward entry
/// there points back at this reply's key `rev`, and writes the reverse
/// entry (over a stale one, if any). Advances the TCP state as a reply
/// does. `false` if there is no such flow, or the write failed.
/// Not inlined: verified once, off the new-flow and hit paths' stack.
#[inline(never)]
pub fn first_reply<S: ProgramSet>(rev: &FlowKey, flags: u8, now: u64) -> bool {
    let bk = ServiceKey {
        vip: rev.src_ip,
        port: rev.src_port,
        proto: rev.proto,
        _pad: 0,
    };
    let fe = match unsafe { FRONTENDS.get(&bk) } {
        Some(fe) => *fe,
        None => return false,
    };
    let fk = flow_key(rev.dst_ip, fe.vip, rev.dst_port, fe.port, rev.proto);
    let f = match lookup(&fk) {
        Some(f) => f,
        None => return false,
    };
    // A rewritten flow (client_port set) is never found here: its reverse
    // key carries the rewritten port, not the client's.
    if !points_back(f, fk.src_port, rev) || unsafe { (*f).client_port } != 0 {
        return false;
    }
    // The value is built in the per-CPU scratch, not on the stack: this
    // frame sits on top of the programs' (chains <= 512 bytes).
    let Some(raw) = FIB_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let rv = ct_value(
        fe.vip,
        fe.port,
        ct_dir::REVERSE,
        unsafe { (*f).svc_id },
        unsafe { (*f).backend_id },
        0,
        0,
        now,
        no_route(now),
    );
    let w = unsafe { core::mem::transmute::<CtValue, [u64; 8]>(rv) };
    let mut i = 0;
    while i < 8 {
        unsafe { core::ptr::write_volatile((raw as *mut u64).add(i), w[i]) };
        i += 1;
    }
    if CONNTRACK
        .insert(rev, unsafe { &*(raw as *const CtValue) }, BPF_ANY)
        .is_err()
    {
        return false;
    }
    if rev.proto == proto::TCP {
        tcp_state::<S>(f, flags, false);
    }
    true
}

/// What claiming a reverse key gave.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    Written,
    /// Another live flow holds it.
    Taken,
    /// The map refused the write.
    Failed,
}

/// Writes the reverse entry `rv` at `rev` unless another live flow holds
/// that key (`BPF_NOEXIST` first: the common case costs one update).
#[inline(always)]
pub(crate) fn claim(rev: &FlowKey, rv: &CtValue, fwd: &FlowKey) -> Claim {
    match CONNTRACK.insert(rev, rv, BPF_NOEXIST) {
        Ok(()) => Claim::Written,
        Err(e) if e == -EEXIST => {
            if held_by_other(rev, fwd) {
                Claim::Taken
            } else if CONNTRACK.insert(rev, rv, BPF_ANY).is_ok() {
                Claim::Written
            } else {
                Claim::Failed
            }
        }
        Err(_) => Claim::Failed,
    }
}

/// Finds a source port for a new flow `fwd` whose backend-side tuple
/// (backend `ip:port`, client ip:port) another flow holds, and writes its
/// reverse entry there (`rv` with the client's own port). Tries up to
/// `COLLISION_PROBES` ports of the configured range, picked by the flow's
/// hash (`collision_port`). Returns the port (network order), 0 if none was
/// free.
/// Not inlined: the probe loop is verified once, apart from the fast path.
#[inline(never)]
fn rewrite_port(fwd: &FlowKey, ip: u32, port: u16, rv: &CtValue) -> u16 {
    let lo = config(config_idx::COLLISION_PORT_MIN);
    let n = config(config_idx::COLLISION_PORT_COUNT);
    if n == 0 || lo == 0 || lo > 65_535 || n > 65_536 - lo {
        return 0;
    }
    let h = flow_hash(fwd.src_ip, fwd.dst_ip, fwd.src_port, fwd.dst_port, fwd.proto);
    let mut i = 0u32;
    while i < limits::COLLISION_PROBES {
        let cand = (collision_port(lo, n, h, i) as u16).to_be();
        let rev = flow_key(ip, fwd.src_ip, port, cand, fwd.proto);
        if claim(&rev, rv, fwd) == Claim::Written {
            return cand;
        }
        i += 1;
    }
    0
}

/// What [`create`] did.
#[derive(Clone, Copy)]
pub enum Created {
    /// Entries written (`ok`: both); `sport` is the rewritten source port
    /// (network order), 0 if the client's own port was free.
    Flow { sport: u16, ok: bool },
    /// The backend-side tuple is taken and no port of the range was free:
    /// nothing written.
    Exhausted,
}

/// Writes the reverse, then the forward entry of a new flow. The reverse key
/// (backend -> client ip:port) may belong to another flow of this client
/// ip:port through another VIP; the new flow then gets another source port
/// ([`rewrite_port`]) rather than overwrite it. A failed insert is counted by
/// the caller; the packet is still forwarded. `route`: the forward entry's
/// `fib` words (`fwd::NewRoute::entry_words`), so that the new entry is
/// not looked up again to store the route. `lazy` (the backend has one
/// frontend, `backend_flags::ONE_FRONTEND`): only the forward entry is
/// written; the first reply writes the reverse one ([`first_reply`]). No
/// other flow can hold the reverse key then: it would be a flow of the same
/// client ip:port to the same backend through another frontend.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn create(
    fwd: &FlowKey,
    p: &Packet,
    svc_id: u32,
    backend_id: u32,
    ip: u32,
    port: u16,
    now: u64,
    route: &NewRoute,
    lazy: bool,
) -> Created {
    let state = new_state(p);
    let rev = flow_key(ip, fwd.src_ip, port, fwd.src_port, fwd.proto);
    let rv = ct_value(
        fwd.dst_ip,
        fwd.dst_port,
        ct_dir::REVERSE,
        svc_id,
        backend_id,
        0,
        0,
        now,
        no_route(now),
    );
    let mut sport = 0u16;
    let rev_ok = if lazy {
        true
    } else {
        match claim(&rev, &rv, fwd) {
        Claim::Written => true,
        Claim::Failed => false,
        Claim::Taken => {
            let rv = ct_value(
                fwd.dst_ip,
                fwd.dst_port,
                ct_dir::REVERSE,
                svc_id,
                backend_id,
                0,
                fwd.src_port,
                now,
                no_route(now),
            );
            sport = rewrite_port(fwd, ip, port, &rv);
            if sport == 0 {
                return Created::Exhausted;
            }
            true
        }
        }
    };
    let fv = ct_value(
        ip,
        port,
        ct_dir::FORWARD,
        svc_id,
        backend_id,
        state,
        sport,
        now,
        route.entry_words(now),
    );
    let fwd_ok = CONNTRACK.insert(fwd, &fv, BPF_ANY).is_ok();
    // The open counts only with a forward entry: without one, no close or
    // expiry could ever balance it.
    if fwd_ok {
        stats::conn_open(backend_id);
    }
    Created::Flow {
        sport,
        ok: rev_ok && fwd_ok,
    }
}

/// The state of a new flow's forward entry, from its first packet.
#[inline(always)]
pub fn new_state(p: &Packet) -> u32 {
    if p.is_udp() {
        ct_state::UDP
    } else if p.flags & TCP_SYN != 0 && p.flags & TCP_ACK == 0 {
        ct_state::SYN
    } else {
        ct_state::ESTABLISHED
    }
}

#[inline(always)]
pub fn touch(v: *mut CtValue, now: u64) {
    unsafe {
        if now.wrapping_sub((*v).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*v).last_seen_ns = now;
        }
    }
}

/// Advances the TCP state of a forward entry. FIN or RST closes the flow once
/// (`ProgramSet::transition`: compare-and-swap in the full set), which is when the backend's active count drops.
#[inline(always)]
pub fn tcp_state<S: ProgramSet>(fwd: *mut CtValue, flags: u8, from_client: bool) {
    let st = unsafe { &raw mut (*fwd).state };
    let cur = unsafe { *st };
    if flags & (TCP_FIN | TCP_RST) != 0 {
        if (cur == ct_state::SYN || cur == ct_state::ESTABLISHED)
            && unsafe { S::transition(st, cur, ct_state::CLOSING) }
        {
            stats::conn_close(unsafe { (*fwd).backend_id });
        }
    } else if cur == ct_state::SYN && flags & TCP_ACK != 0 && (from_client || flags & TCP_SYN != 0)
    {
        unsafe { S::transition(st, cur, ct_state::ESTABLISHED) };
    }
}

/// A fresh SYN on a closed flow (port reuse) starts a new flow.
#[inline(always)]
pub fn is_reopen(v: *const CtValue, flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN && unsafe { (*v).state } == ct_state::CLOSING
}
