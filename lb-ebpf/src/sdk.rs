//! The selector SDK (docs/policies.md, "User-defined selector"): what a
//! user's selector object needs to speak the ABI (`lb_common::selector`,
//! `lb_common::SelectorArgs`). Include it with
//! `#[path = ".../lb-ebpf/src/sdk.rs"] mod sdk;` (or copy it), write a
//! function `fn(&SelectorArgs) -> i32` and name it in [`rpclb_selector!`],
//! which makes the XDP and the TC program of the object from it.
//!
//! The maps below are the data path's own, pinned by name: the agent loads
//! the object against its pin path, so they are the very same maps.
#![allow(dead_code)]

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, ProgramArray},
};
use lb_common::{SelectorArgs, selector};

/// The call in progress (per CPU): arguments in, answer out.
#[map]
pub static SELECTOR_ARGS: PerCpuArray<SelectorArgs> = PerCpuArray::pinned(1, 0);

/// Where the XDP selector returns: the main XDP programs.
#[map]
pub static SELECTOR_RETURN_XDP: ProgramArray = ProgramArray::pinned(selector::RET_SLOTS, 0);

/// Where the TC selector returns: the main TC programs.
#[map]
pub static SELECTOR_RETURN_TC: ProgramArray = ProgramArray::pinned(selector::RET_SLOTS, 0);

/// Runs `f` on the call's arguments and stores its answer (an index below
/// `args.n`, or -1 for the service's built-in algorithm). Returns where to
/// tail-call back, or `None` when no call of this ABI version is in progress.
#[inline(always)]
pub fn answer(f: fn(&SelectorArgs) -> i32) -> Option<u32> {
    let a = unsafe { &mut *SELECTOR_ARGS.get_ptr_mut(0)? };
    if a.state != selector::ASKED || a.version != selector::VERSION {
        return None;
    }
    a.answer = f(a);
    a.state = selector::ANSWERED;
    Some(a.ret)
}

/// `rpclb_selector!(xdp_name, tc_name, f)`: an XDP and a TC program that
/// answer with `f` and tail-call back into the data path. If the call back
/// fails (the agent's self-test, or no data path), the packet passes.
#[macro_export]
macro_rules! rpclb_selector {
    ($xdp:ident, $tc:ident, $f:path) => {
        #[aya_ebpf::macros::xdp]
        pub fn $xdp(ctx: aya_ebpf::programs::XdpContext) -> u32 {
            if let Some(ret) = sdk::answer($f) {
                unsafe { sdk::SELECTOR_RETURN_XDP.tail_call(&ctx, ret) };
            }
            aya_ebpf::bindings::xdp_action::XDP_PASS
        }

        #[aya_ebpf::macros::classifier]
        pub fn $tc(ctx: aya_ebpf::programs::TcContext) -> i32 {
            if let Some(ret) = sdk::answer($f) {
                unsafe { sdk::SELECTOR_RETURN_TC.tail_call(&ctx, ret) };
            }
            aya_ebpf::bindings::TC_ACT_OK
        }
    };
}
