//! The embedded object passes the verifier, pins its maps, and unpins them
//! on drop; its maps have the shapes and the kernel memory that
//! `datapath::memory` computes; an upgrade that changed a counter map's
//! type finds it replaced (needs root).

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::path::Path;

use lb_agent::datapath::memory::{self, MapKind};
use lb_agent::datapath::scratch::{Hook, ScratchDatapath, require_root, test_run};
use lb_agent::datapath::{DatapathConfig, DatapathError, ProgramLoading};
use lb_api::{Algorithm, Backend, DesiredState, Protocol, Service};
use lb_common::map_names;
use rpclb_tests::packet::{ACK, CLIENT, SYN, VIP, frame};

fn load(tune: impl FnOnce(&mut DatapathConfig)) -> ScratchDatapath {
    ScratchDatapath::new(tune).unwrap_or_else(|e| {
        let mut s = format!("{e}");
        let mut src = std::error::Error::source(&e);
        while let Some(x) = src {
            s += &format!("\n caused by: {x}");
            src = x.source();
        }
        panic!("{s}")
    })
}

/// As the agent loads it (`ProgramLoading::All`, the default): all four
/// programs of the set pass the verifier at load, before any run.
#[test]
fn loads_and_pins() {
    if !require_root("loading the data path") {
        return;
    }
    assert_eq!(
        DatapathConfig::default().program_loading,
        ProgramLoading::All
    );
    let mut dp = load(|c| c.program_loading = ProgramLoading::All);
    let set = dp.dp().programs();
    assert_eq!(
        dp.dp().loaded_programs(),
        vec![set.xdp(), set.tc(), set.xdp6(), set.tc6()]
    );
    let dir = dp.dir().to_path_buf();
    for name in map_names::ALL {
        assert!(dir.join(name).exists(), "{name} pinned");
    }
    drop(dp);
    assert!(!dir.exists(), "unpinned on drop");
}

/// Every map as the kernel created it (type, key and value size, entries)
/// is what `memory::shapes` says, and the bytes agree with the kernel's own
/// figure (fdinfo `memlock`) up to each map's fixed header.
#[test]
fn map_shapes_and_memory_match_the_kernel() {
    if !require_root("loading the data path") {
        return;
    }
    let cpus = memory::possible_cpus().unwrap();
    // Sizes that differ from each other and are not powers of two (a map
    // sized by the wrong flag, or a missed rounding, shows), then the defaults.
    let odd = |c: &mut DatapathConfig| {
        c.max_services = 1000;
        c.max_backends = 3000;
        c.max_conntrack = 5000;
        c.max_affinity = 700;
        c.max_fragments = 300;
        c.max_slots = 9000;
    };
    let defaults = |c: &mut DatapathConfig| {
        let d = DatapathConfig::default();
        (c.max_services, c.max_backends, c.max_conntrack) =
            (d.max_services, d.max_backends, d.max_conntrack);
        (c.max_affinity, c.max_slots) = (d.max_affinity, d.max_slots);
        c.max_fragments = d.max_fragments;
    };
    let tunes: [&dyn Fn(&mut DatapathConfig); 2] = [&odd, &defaults];
    for tune in tunes {
        let dp = load(tune);
        let mut cfg = DatapathConfig::small(dp.dir());
        tune(&mut cfg);
        let mut kernel_total = 0;
        for want in memory::shapes(&cfg) {
            let path = dp.dir().join(want.name);
            let have = memory::pinned_shape(want.name, &path)
                .unwrap()
                .expect("a map type the data path uses");
            assert_eq!(have, want, "{} as the kernel made it", want.name);
            let Some(kernel) = memory::kernel_bytes(&path) else {
                eprintln!("this kernel reports no memlock in fdinfo; bytes not compared");
                return;
            };
            let ours = want.bytes(cpus);
            // The kernel adds the map's header (struct bpf_array / bpf_htab
            // and a few per-CPU ints): under 1 KiB + 64 B per CPU.
            assert!(
                kernel >= ours && kernel - ours <= 1024 + 64 * cpus as u64,
                "{}: formula {ours} B, kernel {kernel} B",
                want.name
            );
            kernel_total += kernel;
        }
        let total = memory::MapMemory::new(memory::shapes(&cfg), cpus).total();
        eprintln!(
            "max_backends {}: formula {total} B, kernel {kernel_total} B, {cpus} CPUs",
            cfg.max_backends
        );
    }
}

/// BPF_MAP_CREATE + BPF_OBJ_PIN of an empty map: what an older agent left.
fn pin_map(path: &Path, map_type: u32, key: u32, value: u32, entries: u32) {
    let mut a = [0u32; 16];
    a[..4].copy_from_slice(&[map_type, key, value, entries]);
    // SAFETY: a zero-padded bpf_attr for BPF_MAP_CREATE (0).
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, a.as_mut_ptr(), 64) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = [0u64; 2];
    pin[0] = p.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: bpf_attr for BPF_OBJ_PIN (6): pathname, bpf_fd; p outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_mut_ptr(), 16) };
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our fd; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;

/// Upgrading from an agent whose BACKEND_STATS was per-CPU: the restarted
/// agent replaces that pin (its counters restart) instead of reading a
/// per-CPU map as a shared one. A map that holds state (conntrack) is
/// never replaced: a mismatch there is an error that names the fix.
#[test]
fn upgrade_replaces_a_per_cpu_backend_stats_pin() {
    if !require_root("loading the data path") {
        return;
    }
    let dp = load(|_| {});
    let stats = dp.dir().join(map_names::BACKEND_STATS);
    std::fs::remove_file(&stats).unwrap();
    pin_map(&stats, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 32, 4096);

    let mut twin = dp.twin(|_| {}).expect("a restart replaces the counter map");
    let have = memory::pinned_shape(map_names::BACKEND_STATS, &stats)
        .unwrap()
        .unwrap();
    assert_eq!((have.kind, have.max_entries), (MapKind::Array, 4096));
    let svc = Service::new(
        "default/web:80",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::RoundRobin,
        vec![Backend::new(Ipv4Addr::new(10, 244, 10, 2), 8080)],
    );
    let w = twin.writer();
    w.apply(&DesiredState {
        services: vec![svc.clone()],
    })
    .unwrap();
    for flags in [SYN, ACK, ACK] {
        test_run(
            &mut twin,
            Hook::Xdp,
            &frame(6, CLIENT, 40000, VIP, 80, flags),
        )
        .unwrap();
    }
    let bs = twin.writer().backend_stats(&svc.addr()).unwrap();
    assert_eq!((bs[0].packets, bs[0].new_flows), (3, 1));
    drop(twin);

    let ct = dp.dir().join(map_names::CONNTRACK);
    std::fs::remove_file(&ct).unwrap();
    pin_map(&ct, BPF_MAP_TYPE_ARRAY, 4, 64, 16);
    match dp.twin(|_| {}) {
        Err(DatapathError::PinnedMismatch { name, .. }) => assert_eq!(name, map_names::CONNTRACK),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a CONNTRACK of another shape was adopted"),
    }
}

/// Upgrading from an agent with fewer verdict reasons: the pinned REASONS
/// map (one entry per reason) is replaced by one with room for every
/// reason, instead of being adopted and failing to count the new ones.
#[test]
fn upgrade_grows_a_reasons_pin_with_fewer_reasons() {
    if !require_root("loading the data path") {
        return;
    }
    let dp = load(|_| {});
    let reasons = dp.dir().join(map_names::REASONS);
    std::fs::remove_file(&reasons).unwrap();
    let older = lb_common::reason::COUNT - 2;
    pin_map(&reasons, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, older);

    let mut twin = dp.twin(|_| {}).expect("a restart replaces the counter map");
    let have = memory::pinned_shape(map_names::REASONS, &reasons)
        .unwrap()
        .unwrap();
    assert_eq!(have.max_entries, lb_common::reason::COUNT);
    let all = twin.writer().reasons().expect("every reason readable");
    assert_eq!(all.len() as u32, lb_common::reason::COUNT);
}

/// Upgrading from an agent with fewer CONFIG entries (5 before SNAT, 8
/// after): the pinned CONFIG is replaced, not adopted; adopted, the load's
/// write of the SNAT entries failed and the agent never started. The flow
/// cache goes with it, since its generation restarts.
#[test]
fn upgrade_grows_a_config_pin_with_fewer_entries() {
    if !require_root("loading the data path") {
        return;
    }
    let dp = load(|_| {});
    let config = dp.dir().join(map_names::CONFIG);
    let cache = dp.dir().join(map_names::FLOW_CACHE);
    std::fs::remove_file(&config).unwrap();
    pin_map(
        &config,
        BPF_MAP_TYPE_ARRAY,
        4,
        4,
        lb_common::config_idx::SNAT_ADDR,
    );
    let cache_id = |p: &Path| aya::maps::MapInfo::from_pin(p).unwrap().id();
    let old_cache = cache_id(&cache);

    let twin = dp
        .twin(|_| {})
        .expect("a restart replaces the configuration map");
    let have = memory::pinned_shape(map_names::CONFIG, &config)
        .unwrap()
        .unwrap();
    assert_eq!(have.max_entries, lb_common::config_idx::COUNT);
    assert_ne!(
        cache_id(&cache),
        old_cache,
        "the flow cache was replaced too"
    );
    drop(twin);
}

/// A load that fails after creating some maps unpins them and removes the
/// directory it made (issue 10: `--max-conntrack 0` left pinned maps
/// behind). The kernel refuses a hash map of 2^32 buckets (E2BIG) at
/// creation; no check before the load catches it once the memory budget is
/// overridden. aya creates the maps in no fixed order, so most runs create
/// some before AFFINITY.
#[test]
fn a_failed_load_leaves_nothing_pinned() {
    if !require_root("loading the data path") {
        return;
    }
    let dir = Path::new("/sys/fs/bpf").join(format!("rpclb-failedload-{}", std::process::id()));
    for _ in 0..3 {
        let mut cfg = DatapathConfig::small(&dir);
        cfg.max_affinity = u32::MAX;
        cfg.allow_over_budget = true;
        let e = match lb_agent::datapath::Datapath::load(&cfg) {
            Ok(_) => panic!("a map of 2^32 entries loaded"),
            Err(e) => format!("{e:?}"),
        };
        assert!(e.contains("AFFINITY"), "{e}");
        assert!(
            !dir.exists(),
            "left behind: {:?}",
            std::fs::read_dir(&dir).map(|r| r.count())
        );
    }
    // Into a directory that exists: it stays, empty.
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = DatapathConfig::small(&dir);
    cfg.max_affinity = u32::MAX;
    cfg.allow_over_budget = true;
    assert!(lb_agent::datapath::Datapath::load(&cfg).is_err());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir(&dir).unwrap();
}

/// Over the budget, nothing is created; allowed, it loads.
#[test]
fn over_budget_is_refused_before_anything_is_created() {
    if !require_root("loading the data path") {
        return;
    }
    match ScratchDatapath::new(|c| c.map_memory_budget = memory::MIB) {
        Err(DatapathError::OverBudget { .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("loaded over a 1 MiB budget"),
    }
    let dp = load(|c| {
        c.map_memory_budget = memory::MIB;
        c.allow_over_budget = true;
    });
    assert!(dp.dir().join(map_names::SLOTS).exists());
}
