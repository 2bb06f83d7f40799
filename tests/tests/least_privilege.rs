//! The agent needs no more than the DaemonSet gives it.
//!
//! - The manifest test: deploy/30-agent.yaml's agent container is unprivileged, drops ALL
//!   and adds exactly `rpclb_tests::privileges::AGENT_CAPABILITIES`; only the init
//!   container that mounts bpffs is privileged.
//! - The lab tests run the real `lb-agent` under `capsh` with exactly that list in its
//!   bounding, inheritable, ambient, permitted and effective sets (every other capability
//!   dropped, no_new_privs set), in the lab's node namespace, and pass real TCP through a VIP
//!   on the eBPF data path: as uid 0, as the DaemonSet runs it, and as a non-root uid with
//!   ambient capabilities. Then each capability of the list is removed in turn, and the eBPF
//!   data path no longer starts: the list is no longer than it must be.
//!
//! - The pin directory: the agent (in `auto` mode, without falling back) and lbctl refuse
//!   one that every user can write; `lb-agent mount-bpffs`, the init container's command,
//!   mounts bpffs once.
//!
//! capsh comes from Debian's libcap2-bin (`cargo xtask setup` installs it).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rpclb_tests::lab::Lab;
use rpclb_tests::privileges::{AGENT_CAPABILITIES, RunAs, cap_mask, capsh, capsh_args, proc_caps};
use rpclb_tests::procs::{Proc, TestDir, agent_args, agent_bin, pin_path, workspace_bin};
use rpclb_tests::skip_unless_lab;
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The non-root user of the second lab test (the controller image's user).
const UID: u32 = 65532;

fn deploy_file(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// The DaemonSet's pod spec.
fn agent_pod_spec() -> Value {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&deploy_file("30-agent.yaml")).expect("30-agent.yaml parses");
    let ds = docs
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "rpclb-agent")
        .expect("DaemonSet rpclb-agent");
    ds["spec"]["template"]["spec"].clone()
}

#[test]
fn the_daemonset_grants_exactly_the_tested_capabilities() {
    let spec = agent_pod_spec();
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one long-running container");
    let agent = &containers[0];
    assert_eq!(agent["name"], "agent");
    let sc = &agent["securityContext"];
    let caps = &sc["capabilities"];
    let added = strings(&caps["add"]);
    assert_eq!(
        added, AGENT_CAPABILITIES,
        "deploy/30-agent.yaml adds other capabilities than the lab tests grant \
         (rpclb_tests::privileges::AGENT_CAPABILITIES)"
    );
    assert_eq!(strings(&caps["drop"]), ["ALL"]);
    assert_ne!(
        sc["privileged"], true,
        "the agent container is not privileged"
    );
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    // The lab test's uid 0 is the DaemonSet's: Kubernetes has no ambient capabilities.
    assert_eq!(sc["runAsUser"], 0);
    assert!(spec["securityContext"]["runAsUser"].is_null());
    // It makes no mount: no Bidirectional propagation, which needs a privileged container.
    for m in agent["volumeMounts"].as_array().expect("volumeMounts") {
        assert_ne!(m["mountPropagation"], "Bidirectional", "{m}");
    }
    assert!(
        agent["args"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a != "mount-bpffs")
    );

    // The one privileged container: the init container that mounts bpffs, and exits.
    let inits = spec["initContainers"].as_array().expect("initContainers");
    assert_eq!(inits.len(), 1, "{inits:?}");
    let init = &inits[0];
    assert_eq!(init["name"], "mount-bpf-fs");
    assert_eq!(
        init["image"], agent["image"],
        "the agent's image: lb-agent is in it"
    );
    assert_eq!(
        strings(&init["args"]),
        ["mount-bpffs", "--path", "/sys/fs/bpf"]
    );
    assert_eq!(init["securityContext"]["privileged"], true);
    let mounts = init["volumeMounts"].as_array().unwrap();
    assert_eq!(
        mounts.len(),
        1,
        "it sees the host's /sys/fs/bpf and nothing else"
    );
    assert_eq!(mounts[0]["mountPath"], "/sys/fs/bpf");
    assert_eq!(mounts[0]["mountPropagation"], "Bidirectional");
    // ...which is where the agent pins.
    let args = strings(&agent["args"]);
    let pin = args
        .iter()
        .position(|a| a == "--pin-path")
        .map(|i| args[i + 1].clone())
        .expect("--pin-path");
    assert!(pin.starts_with("/sys/fs/bpf/"), "{pin}");
    // The selectors' directory: the host's, read-only, where the agent's
    // --selector-dir default looks (docs/security.md).
    let sel = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "selectors")
        .expect("a selectors mount");
    assert_eq!(
        sel["mountPath"],
        lb_agent::datapath::selector::DEFAULT_SELECTOR_DIR
    );
    assert_eq!(sel["readOnly"], true);
    assert!(
        !args.iter().any(|a| a == "--selector-dir"),
        "the default is the mount"
    );
    let vol = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "selectors")
        .expect("a selectors volume");
    assert_eq!(vol["hostPath"]["path"], "/var/lib/rpclb/selectors");
    assert_eq!(vol["hostPath"]["type"], "DirectoryOrCreate");
    // The pod-level context grants nothing either.
    assert!(spec["securityContext"]["privileged"].is_null());
    assert!(spec["hostPID"].is_null() && spec["hostIPC"].is_null());
}

/// capsh, or SKIP (a panic under CI) without it.
fn require_capsh() -> Option<PathBuf> {
    let c = capsh();
    let ok = lb_agent::datapath::scratch::skip_unless(
        c.is_some(),
        "capsh is missing: install libcap2-bin (`cargo xtask setup` does)",
    );
    c.filter(|_| ok)
}

fn config(lab: &Lab) -> String {
    let mut s = String::from(
        "services:\n  - name: lab/web:http\n    vip: 10.96.0.10\n    port: 80\n    \
         protocol: tcp\n    algorithm: round-robin\n    backends:\n",
    );
    for i in 1..=3 {
        s.push_str(&format!(
            "      - {{ ip: {}, port: 8080 }}\n",
            lab.backend(i).ip()
        ));
    }
    s
}

/// `lb-agent ARGS` under capsh with `caps`, as `who`, in the node namespace.
fn start_capped(
    lab: &Lab,
    dir: &TestDir,
    name: &str,
    caps: &[&str],
    who: RunAs,
    extra: &[&str],
) -> Proc {
    let capsh = capsh().expect("capsh");
    let mut args = capsh_args(caps, who, agent_bin());
    args.extend(agent_args(lab, dir, extra));
    Proc::spawn(lab, dir, name, &capsh, &args)
}

/// 30 connections through the VIP, round-robin: 10 to each backend.
fn traffic(lab: &Lab) {
    let replies = lab
        .client_tcp(SocketAddrV4::new(VIP, 80), 30)
        .expect("TCP through the VIP");
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for r in &replies {
        assert_eq!(r.peer, SocketAddr::from((VIP, 80)), "a reply from the VIP");
        *by.entry(r.backend.clone()).or_default() += 1;
    }
    assert_eq!(
        by,
        BTreeMap::from([
            ("backend-1".to_string(), 10),
            ("backend-2".to_string(), 10),
            ("backend-3".to_string(), 10),
        ]),
        "every backend reached, in turn"
    );
}

/// Starts the agent with the DaemonSet's capabilities as `who`, checks its capability sets
/// from /proc, that it runs the eBPF data path, and passes traffic.
fn serves_with_daemonset_caps(who: RunAs) -> (Lab, TestDir, Proc) {
    let lab = Lab::new(3).expect("lab");
    let dir = TestDir::new("leastpriv");
    dir.write_config(&config(&lab));
    let mut agent = start_capped(&lab, &dir, "agent", AGENT_CAPABILITIES, who, &[]);
    agent.wait_ready();
    // `ip netns exec` and capsh exec in place: the child's pid is the agent's.
    let c = proc_caps(agent.pid());
    let want = cap_mask(AGENT_CAPABILITIES);
    let exe = std::fs::read_link(format!("/proc/{}/exe", agent.pid())).unwrap();
    assert_eq!(exe, agent_bin(), "the agent itself, not a wrapper");
    for (set, got) in [
        ("bounding", c.bnd),
        ("permitted", c.prm),
        ("effective", c.eff),
        ("inheritable", c.inh),
        ("ambient", c.amb),
    ] {
        assert_eq!(got, want, "{set} set {got:#x}, want {want:#x}: {c:?}");
    }
    assert!(c.no_new_privs, "{c:?}");
    let uid = match who {
        RunAs::Root => 0,
        RunAs::User(u) => u,
    };
    assert_eq!((c.uid, c.gid), (uid, uid));
    // The eBPF data path, not the userspace fallback.
    let (code, body) = agent.get("/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("ready\ndatapath ebpf\n"),
        "{body}\n{}",
        agent.log()
    );
    // The pin directory is the agent's, 0700.
    let pin = pin_path(&lab);
    let m = std::fs::metadata(&pin).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.mode() & 0o7777, 0o700, "{}", pin.display());
    assert_eq!(m.uid(), uid);
    (lab, dir, agent)
}

#[test]
fn agent_serves_with_only_the_daemonset_capabilities_as_root() {
    skip_unless_lab!();
    if require_capsh().is_none() {
        return;
    }
    let (lab, _dir, mut agent) = serves_with_daemonset_caps(RunAs::Root);
    let _servers = lab.start_tcp_servers(8080).unwrap();
    traffic(&lab);
    // The kernel counted them, and the agent (with these capabilities) reads its maps.
    let m = agent.scrape();
    assert_eq!(
        m.get(
            "rpclb_service_new_flows_total",
            &[("service", "lab/web:http")]
        ),
        Some(30.0),
        "{}",
        agent.log()
    );
    // lbctl with the same capabilities reads the pins.
    let out = lbctl_capped(&lab, RunAs::Root, &["services"]);
    assert!(out.contains("lab/web:http"), "{out}");
    agent.check_alive();
}

#[test]
fn agent_serves_as_a_non_root_user_with_ambient_capabilities() {
    skip_unless_lab!();
    if require_capsh().is_none() {
        return;
    }
    let (lab, _dir, mut agent) = serves_with_daemonset_caps(RunAs::User(UID));
    let _servers = lab.start_tcp_servers(8080).unwrap();
    traffic(&lab);
    let m = agent.scrape();
    assert_eq!(
        m.get(
            "rpclb_service_new_flows_total",
            &[("service", "lab/web:http")]
        ),
        Some(30.0)
    );
    // lbctl as that user reads the pins; as root, it refuses a pin directory that belongs to
    // another user who is not root.
    let out = lbctl_capped(&lab, RunAs::User(UID), &["services"]);
    assert!(out.contains("lab/web:http"), "{out}");
    let lbctl = workspace_bin("lb-agent", "lbctl");
    let pin = pin_path(&lab).display().to_string();
    let out = Command::new(&lbctl)
        .args(["--pin-path", &pin, "services"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("refusing pin path") && err.contains(&format!("belongs to uid {UID}")),
        "{err}"
    );
    agent.check_alive();
}

/// `lbctl --pin-path <lab> ARGS` under capsh with the agent's capabilities.
fn lbctl_capped(lab: &Lab, who: RunAs, args: &[&str]) -> String {
    let capsh = capsh().unwrap();
    let lbctl = workspace_bin("lb-agent", "lbctl");
    let mut a = capsh_args(AGENT_CAPABILITIES, who, &lbctl);
    a.extend([
        "--pin-path".to_string(),
        pin_path(lab).display().to_string(),
    ]);
    a.extend(args.iter().map(|s| s.to_string()));
    let out = Command::new(capsh).args(&a).output().expect("run lbctl");
    assert!(
        out.status.success(),
        "lbctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Without any one of the capabilities, `--datapath ebpf` does not start (and `auto` would
/// fall back to the userspace proxy): each is needed.
#[test]
fn each_capability_is_needed() {
    skip_unless_lab!();
    if require_capsh().is_none() {
        return;
    }
    let lab = Lab::new(3).expect("lab");
    let dir = TestDir::new("leastpriv-minus");
    dir.write_config(&config(&lab));
    // What the kernel says without each: the reasons given in deploy/30-agent.yaml. The
    // lab's veths get TC, so only the TC programs load (the XDP program's refusal without
    // CAP_PERFMON is "pointer -= pointer prohibited").
    let expect = |cap: &str| match cap {
        "BPF" => "failed to create map",
        "NET_ADMIN" => "BPF_PROG_LOAD syscall returned Operation not permitted",
        "PERFMON" => "rpclb_tc: Permission denied (os error 13): R4 partial copy of pointer",
        other => panic!("say what fails without CAP_{other}"),
    };
    let mut why = Vec::new();
    for missing in AGENT_CAPABILITIES {
        let caps: Vec<&str> = AGENT_CAPABILITIES
            .iter()
            .copied()
            .filter(|c| c != missing)
            .collect();
        let name = format!("agent-without-{missing}");
        let mut agent = start_capped(
            &lab,
            &dir,
            &name,
            &caps,
            RunAs::Root,
            &["--datapath", "ebpf"],
        );
        let st = agent.wait_exit(Duration::from_secs(30));
        let log = agent.log();
        assert!(
            matches!(st, Some(s) if !s.success()),
            "without CAP_{missing} the eBPF data path started ({st:?}):\n{log}"
        );
        let last = log
            .lines()
            .rev()
            .find(|l| l.contains("lb-agent:"))
            .unwrap_or_default()
            .to_string();
        assert!(
            log.contains(expect(missing)),
            "without CAP_{missing}, expected {:?}:\n{log}",
            expect(missing)
        );
        why.push(format!("without CAP_{missing}: {last}"));
        // Whatever it pinned before failing goes, so that each run starts clean.
        let out = Command::new(agent_bin())
            .args(["cleanup", "--pin-path"])
            .arg(pin_path(&lab))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // Shown with --nocapture: why each one is needed.
    for w in &why {
        eprintln!("{w}");
    }
}

/// A pin directory that every user can write: the agent refuses it before loading anything
/// (in `auto` mode too: no fallback to userspace), and so does lbctl, with the same words.
/// Nothing here touches a network: the agent stops at its second start step.
#[test]
fn an_open_pin_directory_is_refused_by_the_agent_and_lbctl() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("open-pin");
    dir.write_config("services: []\n");
    let pin = dir.path().join("rpclb");
    std::fs::create_dir(&pin).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o777)).unwrap();
    let pin_s = pin.display().to_string();
    let out = Command::new(agent_bin())
        .args(["--config", &dir.config().display().to_string()])
        .args(["--interfaces", "lo", "--pin-path", &pin_s])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let want = format!("refusing pin path {pin_s}: {pin_s} is writable by every user (mode 0777)");
    assert!(err.contains(&want), "{err}");
    assert!(!err.contains("falling back"), "{err}");
    let out = Command::new(workspace_bin("lb-agent", "lbctl"))
        .args(["--pin-path", &pin_s, "services"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&want), "{err}");
    // Writable by its group only: refused too.
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o770)).unwrap();
    let out = Command::new(workspace_bin("lb-agent", "lbctl"))
        .args(["--pin-path", &pin_s, "services"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is writable by its group (mode 0770)"),
        "{err}"
    );
}

/// The init container's command: mounts bpffs where there is none, and leaves a bpffs alone.
#[test]
fn mount_bpffs_mounts_once() {
    if !lb_agent::datapath::scratch::skip_unless(
        unsafe { libc::geteuid() } == 0,
        "mounting needs root",
    ) {
        return;
    }
    let base = PathBuf::from(format!("/run/rpclb-{}-mount-bpffs", std::process::id()));
    let target = base.join("bpf");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let c = std::ffi::CString::new(self.0.join("bpf").display().to_string()).unwrap();
            // SAFETY: a valid path; MNT_DETACH.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            let _ = std::fs::remove_dir(self.0.join("bpf"));
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _guard = Unmount(base.clone());
    let run = || {
        let out = Command::new(agent_bin())
            .args(["mount-bpffs", "--path", &target.display().to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(run().starts_with("mounted bpffs on"));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts.contains(&format!(" {} bpf ", target.display())),
        "{mounts}"
    );
    assert!(run().contains("is bpffs already"));
    // Its root is world-writable with the sticky bit, which the pin check accepts above a
    // pin directory.
    lb_agent::datapath::pin::create(&target.join("rpclb")).unwrap();
}
