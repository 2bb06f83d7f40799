//! The Linux capabilities the agent runs with: one list, which deploy/30-agent.yaml grants
//! the agent's container (`securityContext.capabilities.add`, after `drop: [ALL]`) and with
//! which tests/tests/least_privilege.rs runs the real agent under `capsh`. That file's
//! manifest test checks that the DaemonSet's list is this one.
//!
//! Found by testing (tests/tests/least_privilege.rs removes each in turn and the eBPF data
//! path no longer starts):
//!
//! | capability | what needs it |
//! |---|---|
//! | `BPF` | bpf(2): create, pin and open the maps, load the programs (without it: EPERM creating the first map) |
//! | `NET_ADMIN` | load XDP and TC programs (networking program types need it besides `BPF`; without it: EPERM from BPF_PROG_LOAD) and attach them (XDP, TCX links, netlink TC filters); rtnetlink routes of the userspace data path |
//! | `PERFMON` | the verifier refuses the XDP program without it: "pointer -= pointer prohibited" (its frame length is `data_end - data`, which needs `allow_ptr_leaks`, i.e. `perfmon_capable()`) |
//!
//! Not needed, and not granted: `SYS_ADMIN` (only mounting bpffs needs it, which the
//! DaemonSet's init container does), `NET_RAW` (the agent opens no raw IP socket; netlink
//! sockets need none), `SYS_RESOURCE` (the agent never raises RLIMIT_MEMLOCK; kernels from
//! 5.11 charge BPF memory to the cgroup instead).

use std::path::{Path, PathBuf};

/// The agent's capabilities, as Kubernetes names them (no `CAP_` prefix).
pub const AGENT_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "PERFMON"];

/// `cap_bpf,cap_net_admin,...` for capsh, from a Kubernetes-style list.
pub fn capsh_list(caps: &[&str]) -> String {
    caps.iter()
        .map(|c| format!("cap_{}", c.to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The bit of a capability (Kubernetes name), as in /proc/PID/status.
pub fn cap_bit(name: &str) -> u32 {
    match name {
        "CHOWN" => 0,
        "DAC_OVERRIDE" => 1,
        "FOWNER" => 3,
        "KILL" => 5,
        "SETGID" => 6,
        "SETUID" => 7,
        "SETPCAP" => 8,
        "NET_BIND_SERVICE" => 10,
        "NET_RAW" => 13,
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its bit to rpclb_tests::privileges::cap_bit"),
    }
}

/// The mask of `caps` as /proc/PID/status prints CapEff and friends.
pub fn cap_mask(caps: &[&str]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1 << cap_bit(c))
}

/// `/proc/sys/kernel/cap_last_cap`: the highest capability this kernel knows.
pub fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .expect("/proc/sys/kernel/cap_last_cap")
        .trim()
        .parse()
        .expect("a number")
}

/// capsh, or `None` (install Debian's libcap2-bin: `cargo xtask setup` does).
pub fn capsh() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join("capsh"))
        .find(|p| p.is_file())
}

/// Who the agent runs as under [`capsh_args`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunAs {
    /// uid and gid 0, as the DaemonSet runs it: for root, what exec grants is the bounding
    /// set, so the bounding set (and the inheritable and ambient ones) is exactly `caps`.
    Root,
    /// A non-root uid and gid, with `caps` ambient (and inheritable, permitted, effective,
    /// bounding): what a runtime with ambient capabilities would do.
    User(u32),
}

/// capsh arguments that run `program ARGS` (append them after these) with exactly `caps`
/// in the bounding, inheritable, ambient, permitted and effective sets, as `who`, with
/// no_new_privs set (the DaemonSet's `allowPrivilegeEscalation: false`). Every other
/// capability is dropped from the bounding set, up to the kernel's last one.
pub fn capsh_args(caps: &[&str], who: RunAs, program: &Path) -> Vec<String> {
    let keep: Vec<u32> = caps.iter().map(|c| cap_bit(c)).collect();
    let drop: Vec<String> = (0..=cap_last_cap())
        .filter(|b| !keep.contains(b))
        .map(|b| b.to_string())
        .collect();
    let list = capsh_list(caps);
    let mut a = Vec::new();
    match who {
        RunAs::Root => {
            a.push(format!("--drop={}", drop.join(",")));
            a.push(format!("--inh={list}"));
            a.push(format!("--caps={list}+eip"));
        }
        RunAs::User(uid) => {
            // Keep what setuid needs until after the switch, then drop it too.
            let with = if list.is_empty() {
                "cap_setuid,cap_setgid,cap_setpcap".to_string()
            } else {
                format!("{list},cap_setuid,cap_setgid,cap_setpcap")
            };
            a.push(format!("--caps={with}+eip"));
            a.push("--keep=1".into());
            a.push(format!("--gid={uid}"));
            a.push(format!("--groups={uid}"));
            a.push(format!("--uid={uid}"));
            let setpcap = if list.is_empty() {
                "cap_setpcap".to_string()
            } else {
                format!("{list},cap_setpcap")
            };
            a.push(format!("--caps={setpcap}+eip"));
            a.push(format!("--drop={}", drop.join(",")));
            a.push(if list.is_empty() {
                "--caps=".into()
            } else {
                format!("--caps={list}+eip")
            });
        }
    }
    if !list.is_empty() {
        a.push(format!("--addamb={list}"));
    }
    a.push("--no-new-privs".into());
    a.push(format!("--shell={}", program.display()));
    a.push("--".into());
    a
}

/// The capability sets and ids of a running process, from /proc/PID/status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcCaps {
    pub inh: u64,
    pub prm: u64,
    pub eff: u64,
    pub bnd: u64,
    pub amb: u64,
    pub uid: u32,
    pub gid: u32,
    pub no_new_privs: bool,
}

pub fn proc_caps(pid: i32) -> ProcCaps {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let mut c = ProcCaps::default();
    for l in s.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let hex = || u64::from_str_radix(v, 16).expect("hex");
        let first = || v.split_whitespace().next().unwrap().parse().unwrap();
        match k {
            "CapInh" => c.inh = hex(),
            "CapPrm" => c.prm = hex(),
            "CapEff" => c.eff = hex(),
            "CapBnd" => c.bnd = hex(),
            "CapAmb" => c.amb = hex(),
            "Uid" => c.uid = first(),
            "Gid" => c.gid = first(),
            "NoNewPrivs" => c.no_new_privs = v == "1",
            _ => {}
        }
    }
    c
}
