//! The embedded object passes the verifier, pins its maps, and unpins them
//! on drop (needs root).

use lb_agent::datapath::scratch::ScratchDatapath;
use lb_common::map_names;

#[test]
fn loads_and_pins() {
    if !lb_agent::datapath::scratch::require_root("loading the data path") {
        return;
    }
    let dp = ScratchDatapath::new(|_| {}).unwrap_or_else(|e| {
        let mut s = format!("{e}");
        let mut src = std::error::Error::source(&e);
        while let Some(x) = src {
            s += &format!("\n caused by: {x}");
            src = x.source();
        }
        panic!("{s}")
    });
    let dir = dp.dir().to_path_buf();
    for name in map_names::ALL {
        assert!(dir.join(name).exists(), "{name} pinned");
    }
    drop(dp);
    assert!(!dir.exists(), "unpinned on drop");
}
