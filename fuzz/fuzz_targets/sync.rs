//! The controller's messages as the agent reads them: any bytes decoded as a
//! `ControllerMessage` and applied (`lb_api::wire::apply_message`) to an
//! empty state, then to the result, give states whose every service passes
//! the one validation, or an error; never a panic.
#![no_main]

use lb_api::wire::{NodeState, apply_message, pb};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn check(state: &NodeState) {
    for s in &state.state.services {
        if let Err(e) = s.validate() {
            panic!("applied an invalid service {}: {e}", s.name);
        }
    }
    let dups = lb_api::validate::duplicate_addrs(&state.state.services);
    assert!(dups.is_empty(), "applied duplicate addresses: {dups:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = pb::ControllerMessage::decode(data) else {
        return;
    };
    let Ok(first) = apply_message(&NodeState::default(), 0, &msg) else {
        return;
    };
    check(&first.state);
    // The same message again, on top (a delta then fails its version check).
    if let Ok(second) = apply_message(&first.state, msg.version, &msg) {
        check(&second.state);
    }
});
