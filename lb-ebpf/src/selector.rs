//! User-defined selectors (docs/policies.md, "User-defined selector"): a
//! new flow of a service with `svc_flags::SELECTOR` asks the user's program
//! in the service's slot of `SELECTORS_XDP`/`SELECTORS_TC` for its backend.
//!
//! The call is a tail call with re-entry, which every kernel of the matrix
//! has (5.10 included): the walk writes the flow's 5-tuple, the service id
//! and the candidates into the per-CPU `SELECTOR_ARGS` (state `ASKED`) and
//! tail-calls the selector; the selector writes its answer (state
//! `ANSWERED`) and tail-calls `SELECTOR_RETURN_<hook>[ret]`, this very
//! program, which walks the packet again: it finds no conntrack entry, and
//! here the answer for this very flow. An empty slot, no answer, -1, an
//! index out of range or a backend that takes no new flow: the built-in
//! algorithm, counted (`reason::SELECTOR_*`).
//!
//! A tail call must be made from the entry function itself (no BTF, so no
//! tail call from a subprogram): everything here is inlined.

use lb_common::{reason, selector};

use crate::{
    ctx::Ctx,
    maps::{SELECTOR_ARGS, SELECTOR_BACKENDS},
    parse::Packet,
    select,
    set::ProgramSet,
    stats,
};

/// The backend the service's selector chose for this new flow, or `None`:
/// the built-in algorithm chooses. May not return (the tail call).
///
/// Takes the service's id and flags, not its value: with the value's
/// address passed here, the optimiser reloads `table_len` in the built-in
/// algorithm and guards its division with a panic, which the verifier
/// refuses. Only the tail call is inlined into the walk: the rest runs in
/// subprograms of their own (`prepare`, `missing`), whose stack is not the
/// walk's (the compat XDP program's is within bytes of the 512 limit).
#[inline(always)]
pub fn choose<C: Ctx, S: ProgramSet>(ctx: &C, svc_id: u32, flags: u8, p: &Packet) -> Option<u32> {
    // Packed into three registers: a pointer to the packet would pin it to
    // the walk's stack.
    let r = prepare(
        svc_id as u64 | (flags as u64) << 32 | (S::INDEX as u64) << 40,
        p.saddr as u64 | (p.daddr as u64) << 32,
        p.sport as u64 | (p.dport as u64) << 16 | (p.proto as u64) << 32,
    );
    if r >= 0 {
        return Some(r as u32);
    }
    if r == ASK {
        ctx.tail_call_selector(svc_id);
        // Still here: the slot is empty.
        missing();
    }
    None
}

/// [`prepare`]: write the call and tail-call the selector.
const ASK: i64 = -2;
/// [`prepare`]: the built-in algorithm.
const FALLBACK: i64 = -1;

/// Back from the selector: its checked answer (a backend id), or
/// `FALLBACK`. Else the call written into `SELECTOR_ARGS`: `ASK`.
#[inline(never)]
fn prepare(svc: u64, addrs: u64, ports: u64) -> i64 {
    let (svc_id, flags, ret) = (svc as u32, (svc >> 32) as u8, (svc >> 40) as u32);
    let (saddr, daddr) = (addrs as u32, (addrs >> 32) as u32);
    let (sport, dport, proto) = (ports as u16, (ports >> 16) as u16, (ports >> 32) as u8);
    let a = match SELECTOR_ARGS.get_ptr_mut(0) {
        Some(a) => unsafe { &mut *a },
        None => return FALLBACK,
    };
    if a.state != selector::IDLE
        && a.svc_id == svc_id
        && a.saddr == saddr
        && a.daddr == daddr
        && a.sport == sport
        && a.dport == dport
        && a.proto == proto
    {
        // Back from the selector.
        let answered = a.state == selector::ANSWERED;
        a.state = selector::IDLE;
        return match answer(svc_id, flags, a, answered) {
            Some(id) => id as i64,
            None => FALLBACK,
        };
    }
    let c = match unsafe { SELECTOR_BACKENDS.get(&svc_id) } {
        Some(c) => c,
        None => {
            stats::reason(reason::SELECTOR_MISSING);
            return FALLBACK;
        }
    };
    a.state = selector::ASKED;
    a.version = selector::VERSION;
    a.svc_id = svc_id;
    a.ret = ret;
    a.saddr = saddr;
    a.daddr = daddr;
    a.sport = sport;
    a.dport = dport;
    a.proto = proto;
    a.n = c.n;
    a.answer = -1;
    a.backends = c.backends;
    ASK
}

/// The tail call came back: no selector in the slot.
#[inline(never)]
fn missing() {
    if let Some(a) = SELECTOR_ARGS.get_ptr_mut(0) {
        unsafe { (*a).state = selector::IDLE };
    }
    stats::reason(reason::SELECTOR_MISSING);
}

/// The selector's answer, checked: an index among the candidates whose
/// backend takes new flows of this service.
#[inline(always)]
fn answer(svc_id: u32, flags: u8, a: &lb_common::SelectorArgs, answered: bool) -> Option<u32> {
    if !answered || a.answer < 0 {
        stats::reason(reason::SELECTOR_NO_ANSWER);
        return None;
    }
    let i = a.answer as u32;
    if i >= a.n || i >= selector::MAX_CANDIDATES as u32 {
        stats::reason(reason::SELECTOR_REFUSED);
        return None;
    }
    let id = a.backends[(i as usize) & (selector::MAX_CANDIDATES - 1)];
    if !select::takes_new_flow(svc_id, flags, id) {
        stats::reason(reason::SELECTOR_REFUSED);
        return None;
    }
    stats::reason(reason::SELECTOR_CHOSEN);
    Some(id)
}
