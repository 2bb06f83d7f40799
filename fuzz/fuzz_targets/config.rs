//! The config file parser (`lb_api::config::parse`): any text is a config
//! that passes the one validation, or an error with a message; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match lb_api::config::parse(text, "fuzz.yaml") {
        Ok(cfg) => {
            for s in &cfg.state.services {
                if let Err(e) = s.validate() {
                    panic!("accepted an invalid service {}: {e}", s.name);
                }
            }
            let dups = lb_api::validate::duplicate_addrs(&cfg.state.services);
            assert!(dups.is_empty(), "accepted duplicate addresses: {dups:?}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
