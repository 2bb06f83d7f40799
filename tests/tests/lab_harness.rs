//! Tests of the netns lab harness itself, with no BPF: plain routing through the node.
//! Need root; without it each test prints SKIP and passes, or fails under CI
//! (`CI=true` or `RPCLB_REQUIRE_PRIVILEGES=1`).

use rpclb_tests::lab::{self, Lab, Limits, Netns, TcpServer, sys};
use rpclb_tests::skip_unless_lab;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

fn root_links() -> String {
    lab::cmd("ip", &["-o", "link", "show"]).unwrap()
}

fn is_mounted(path: &std::path::Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_string_lossy();
    mi.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

#[test]
fn topology_is_wired_and_contained() {
    skip_unless_lab!();
    let forward_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let lab = Lab::new(3).unwrap();

    let listed = lab::netns_list().unwrap();
    assert_eq!(lab.namespaces().len(), 5);
    for ns in lab.namespaces() {
        assert!(
            ns.starts_with(&format!("rpclb-{}-", std::process::id())),
            "{ns}"
        );
        assert!(listed.iter().any(|l| l == ns), "{ns} not in {listed:?}");
    }

    // Forwarding is on in the node only; the root namespace is untouched.
    assert_eq!(
        lab.node()
            .exec("sysctl", &["-n", "net.ipv4.ip_forward"])
            .unwrap()
            .trim(),
        "1"
    );
    assert_eq!(
        lab.client()
            .ns
            .exec("sysctl", &["-n", "net.ipv4.ip_forward"])
            .unwrap()
            .trim(),
        "0"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        forward_before
    );
    let root = root_links();
    for i in lab.node_ifaces() {
        assert!(
            !root.contains(&format!(": {}", i.name)),
            "{} leaked into root ns",
            i.name
        );
    }

    // Addresses and routes: only 10.244/16 and 10.96/16, never a default route.
    for (i, h) in std::iter::once(lab.client())
        .chain(lab.backends())
        .enumerate()
    {
        let net = if i == 0 { 1 } else { 10 + i as u8 };
        assert_eq!(h.ip(), Ipv4Addr::new(10, 244, net, 2));
        assert_eq!(h.node_iface.ip, Ipv4Addr::new(10, 244, net, 1));
        let routes = h.ns.ip(&["-4", "route", "show"]).unwrap();
        let want = [
            format!("10.96.0.0/16 via 10.244.{net}.1 dev {}", h.iface.name),
            format!("10.244.0.0/16 via 10.244.{net}.1 dev {}", h.iface.name),
            format!(
                "10.244.{net}.0/24 dev {} proto kernel scope link src 10.244.{net}.2",
                h.iface.name
            ),
        ];
        let got: Vec<&str> = routes.lines().map(str::trim).collect();
        assert_eq!(got.len(), 3, "{routes}");
        for w in &want {
            assert!(got.contains(&w.as_str()), "missing {w:?} in {routes}");
        }
        // Offloads: full checksums on the wire, GRO on for XDP_REDIRECT.
        let name = h.iface.name.clone();
        let off = h.ns.run(|| sys::offloads(&name)).unwrap().unwrap();
        assert_eq!(
            off,
            sys::Offloads {
                tx_csum: false,
                tso: false,
                gro: true
            },
            "{name}"
        );
        // The ifindex and MAC are what the namespace reports.
        let link = h.ns.ip(&["-o", "link", "show", "dev", &name]).unwrap();
        assert!(
            link.starts_with(&format!("{}: {name}@", h.iface.ifindex)),
            "{link}"
        );
        let mac = h.iface.mac.map(|b| format!("{b:02x}")).join(":");
        assert!(link.contains(&format!("link/ether {mac}")), "{link}");
    }
    let node_routes = lab.node().ip(&["-4", "route", "show"]).unwrap();
    assert!(
        node_routes.lines().all(|l| l.starts_with("10.244.")),
        "{node_routes}"
    );
    let node_ifaces = lab.node_ifaces();
    assert_eq!(node_ifaces.len(), 4);
    let node_links = lab.node().ip(&["-o", "link", "show"]).unwrap();
    for i in &node_ifaces {
        assert!(i.name.len() <= 15);
        assert!(
            node_links.contains(&format!("{}: {}@", i.ifindex, i.name)),
            "{node_links}"
        );
    }

    // The bpffs is mounted, and visible as bpffs even under `ip netns exec`.
    let bpffs = lab.bpffs();
    assert!(
        bpffs.starts_with("/run") && is_mounted(&bpffs),
        "{}",
        bpffs.display()
    );
    let fstype = lab
        .node()
        .exec("stat", &["-f", "-c", "%T", bpffs.to_str().unwrap()])
        .unwrap();
    assert_eq!(fstype.trim(), "bpf_fs");

    // Nothing routes out: a VIP without a load balancer is unreachable (ICMP from the node),
    // and an outside address has no route at all in the client.
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    let lim = Limits {
        per_op: Duration::from_secs(2),
        total: Duration::from_secs(3),
    };
    let r = lab
        .client()
        .ns
        .run(|| lab::tcp_attempts(vip, 1, lim))
        .unwrap();
    assert_eq!(
        r[0].as_ref().unwrap_err().kind(),
        ErrorKind::NetworkUnreachable,
        "{r:?}"
    );
    let outside = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 80);
    let r = lab
        .client()
        .ns
        .run(|| lab::tcp_attempts(outside, 1, lim))
        .unwrap();
    assert_eq!(
        r[0].as_ref().unwrap_err().kind(),
        ErrorKind::NetworkUnreachable,
        "{r:?}"
    );
}

#[test]
fn tcp_through_the_node_reaches_each_backend() {
    skip_unless_lab!();
    let lab = Lab::new(3).unwrap();
    let servers = lab.start_tcp_servers(8080).unwrap();
    for i in 1..=3 {
        let b = lab.backend(i);
        let before = lab.node().link_stats(&b.node_iface.name).unwrap();
        let target = SocketAddrV4::new(b.ip(), 8080);
        let replies = lab.client_tcp(target, 4).unwrap();
        assert_eq!(replies.len(), 4);
        for r in &replies {
            assert_eq!(r.backend, format!("backend-{i}"));
            assert_eq!(r.peer, SocketAddr::V4(target));
            assert_eq!(r.local.ip(), IpAddr::V4(CLIENT_IP));
        }
        // The backend saw the client's own address (routed, not NATed), once per connection.
        let peers = servers[i - 1].peers();
        assert_eq!(peers.len(), 4);
        assert!(
            peers.iter().all(|p| p.ip() == IpAddr::V4(CLIENT_IP)),
            "{peers:?}"
        );
        // And the packets went out of the node's interface towards that backend.
        let after = lab.node().link_stats(&b.node_iface.name).unwrap();
        assert!(
            after.tx_packets >= before.tx_packets + 4 * 4,
            "{before:?} -> {after:?}"
        );
    }
}

#[test]
fn udp_through_the_node_reaches_each_backend() {
    skip_unless_lab!();
    let lab = Lab::new(3).unwrap();
    let servers = lab.start_udp_servers(5353).unwrap();
    for i in 1..=3 {
        let target = SocketAddrV4::new(lab.backend(i).ip(), 5353);
        let replies = lab.client_udp(target, 5).unwrap();
        let mut ports: Vec<u16> = replies.iter().map(|r| r.local.port()).collect();
        for r in &replies {
            assert_eq!(r.backend, format!("backend-{i}"));
            assert_eq!(r.peer, SocketAddr::V4(target));
            assert_eq!(r.local.ip(), IpAddr::V4(CLIENT_IP));
        }
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 5, "each exchange is a new flow");
        let peers = servers[i - 1].peers();
        assert_eq!(peers.len(), 5);
        assert!(
            peers.iter().all(|p| p.ip() == IpAddr::V4(CLIENT_IP)),
            "{peers:?}"
        );
    }
}

#[test]
fn panic_tears_down_namespaces_and_bpffs() {
    skip_unless_lab!();
    let seen = std::sync::Mutex::new((Vec::<String>::new(), PathBuf::new()));
    let r = std::panic::catch_unwind(|| {
        let lab = Lab::new(2).unwrap();
        let _srv = lab.start_tcp_servers(8080).unwrap();
        *seen.lock().unwrap() = (
            lab.namespaces().iter().map(|s| s.to_string()).collect(),
            lab.bpffs(),
        );
        panic!("test body failed");
    });
    assert!(r.is_err());
    let (names, bpffs) = seen.into_inner().unwrap_or_else(|e| e.into_inner());
    assert_eq!(names.len(), 4);
    let listed = lab::netns_list().unwrap();
    for n in &names {
        assert!(!listed.contains(n), "{n} survived the panic");
    }
    assert!(!is_mounted(&bpffs) && !bpffs.exists() && !bpffs.parent().unwrap().exists());
}

#[test]
fn probes_are_bounded_in_time() {
    skip_unless_lab!();
    let lab = Lab::new(1).unwrap();
    // A silent address on backend 1's subnet: ARP fails, nothing answers.
    let hole = SocketAddrV4::new(Ipv4Addr::new(10, 244, 11, 99), 80);
    let lim = Limits {
        per_op: Duration::from_millis(300),
        total: Duration::from_secs(1),
    };
    let t = Instant::now();
    let r = lab
        .client()
        .ns
        .run(|| lab::tcp_attempts(hole, 50, lim))
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.len(), 50);
    assert!(
        r.iter()
            .all(|a| a.as_ref().is_err_and(|e| e.kind() == ErrorKind::TimedOut)),
        "{r:?}"
    );
    let t = Instant::now();
    let r = lab
        .client()
        .ns
        .run(|| lab::udp_attempts(hole, 50, lim))
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert!(r.iter().all(|a| a.is_err()));
}

#[test]
fn servers_stop_when_dropped() {
    skip_unless_lab!();
    let ns = Netns::new("solo").unwrap();
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7000);
    let srv = TcpServer::start(&ns, addr, "solo").unwrap();
    let lim = Limits::default();
    let r = ns.run(|| lab::tcp_attempts(addr, 2, lim)).unwrap();
    assert!(
        r.iter()
            .all(|a| a.as_ref().is_ok_and(|r| r.backend == "solo")),
        "{r:?}"
    );
    let t = Instant::now();
    drop(srv);
    assert!(t.elapsed() < Duration::from_secs(1));
    let r = ns.run(|| lab::tcp_attempts(addr, 1, lim)).unwrap();
    assert_eq!(
        r[0].as_ref().unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
    // `run` propagates panics from inside the namespace.
    let p = std::panic::catch_unwind(|| ns.run(|| panic!("inside")));
    assert!(p.is_err());
}

#[test]
fn sweep_orphans_removes_only_dead_owners() {
    skip_unless_lab!();
    // A pid that does not exist stands for a crashed earlier run.
    let dead = (4_000_000..4_194_000)
        .find(|&p| unsafe { libc::kill(p, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH))
        .unwrap();
    let name = format!("rpclb-{dead}-0-0000-orphan");
    lab::cmd("ip", &["netns", "add", &name]).unwrap();
    let dir = PathBuf::from(format!("/run/rpclb-{dead}-lab0-0000"));
    std::fs::create_dir_all(dir.join("bpf")).unwrap();
    let mine = Netns::new("kept").unwrap();

    // (Lab::new also sweeps orphans once per process, so another test may get there first.)
    lab::sweep_orphans();
    let listed = lab::netns_list().unwrap();
    assert!(!listed.contains(&name) && !dir.exists());
    assert!(
        listed.iter().any(|n| n == mine.name()),
        "a live owner's namespace was swept"
    );
}

/// Runs this test executable's `topology_is_wired_and_contained` as user
/// nobody with no capabilities, with `env` set: its exit status and output.
fn run_unprivileged(env: &[(&str, &str)]) -> (bool, String) {
    // A copy nobody can read and run (the target dir may be private).
    let dir = tempdir("unpriv");
    let exe = dir.join("lab_harness");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ])
    .arg(&exe)
    .args(["--exact", "topology_is_wired_and_contained", "--nocapture"])
    .env_remove("CI")
    .env_remove("RPCLB_REQUIRE_PRIVILEGES")
    .current_dir(&dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("setpriv");
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn tempdir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rpclb-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A lab test that cannot run (no root) skips only outside CI: under
/// `CI=true` or `RPCLB_REQUIRE_PRIVILEGES=1` it fails, so that a CI without
/// root or BPF cannot report success with no kernel coverage.
#[test]
fn without_privileges_lab_tests_fail_under_ci_and_skip_elsewhere() {
    // Dropping to nobody needs root.
    skip_unless_lab!();
    let (ok, out) = run_unprivileged(&[]);
    assert!(ok, "outside CI it skips and passes:\n{out}");
    assert!(out.contains("SKIP: the lab needs root"), "{out}");
    for env in [("CI", "true"), ("RPCLB_REQUIRE_PRIVILEGES", "1")] {
        let (ok, out) = run_unprivileged(&[env]);
        assert!(!ok, "with {env:?} it fails:\n{out}");
        assert!(out.contains("this test cannot run here"), "{out}");
        assert!(out.contains("test result: FAILED"), "{out}");
    }
    let (ok, out) = run_unprivileged(&[("CI", "false")]);
    assert!(ok, "CI=false is not CI:\n{out}");
}
