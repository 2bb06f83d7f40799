//! The embedded object passes the verifier and pins its maps (needs root).

use lb_agent::datapath::{Datapath, DatapathConfig};

#[test]
fn loads_and_pins() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root for BPF");
        return;
    }
    let dir = format!("/sys/fs/bpf/rpclb-loadtest-{}", std::process::id());
    let cfg = DatapathConfig::small(&dir);
    let r = Datapath::load(&cfg);
    let ok = r.is_ok();
    if let Err(e) = &r {
        let mut s = format!("{e}");
        let mut src = std::error::Error::source(e);
        while let Some(x) = src {
            s += &format!("\n caused by: {x}");
            src = x.source();
        }
        eprintln!("{s}");
    }
    drop(r);
    lb_agent::datapath::cleanup(std::path::Path::new(&dir)).unwrap();
    assert!(ok);
    assert!(!std::path::Path::new(&dir).exists());
}
