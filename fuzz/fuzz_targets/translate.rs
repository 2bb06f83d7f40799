//! The Kubernetes translation (`lb_controller::translate::node_state`): any
//! Services and EndpointSlices (JSON, as the API server sends them) give a
//! desired state whose every service passes the one validation, with the
//! rest reported as problems; never a panic.
#![no_main]

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use libfuzzer_sys::fuzz_target;

#[derive(serde::Deserialize)]
struct Input {
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    slices: Vec<EndpointSlice>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = serde_json::from_slice::<Input>(data) else {
        return;
    };
    for node in ["node-a", "node-b"] {
        let t = lb_controller::translate::node_state(&input.services, &input.slices, node);
        for s in &t.state.services {
            if let Err(e) = s.validate() {
                panic!("translated into an invalid service {}: {e}", s.name);
            }
        }
        let dups = lb_api::validate::duplicate_addrs(&t.state.services);
        assert!(dups.is_empty(), "duplicate addresses: {dups:?}");
    }
});
