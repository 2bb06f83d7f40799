//! Network-namespace lab. Every network the tests build lives in namespaces named
//! `rpclb-<pid>-...` that are deleted on drop, on panic too. The root namespace's links,
//! addresses, routes and sysctls are never touched; the only thing made outside a namespace is
//! a bpffs mount under /run, which is unmounted on drop.

pub mod ipv6;
mod netns;
pub mod stream;
pub mod sys;
mod topology;
pub mod traffic;
pub mod two_node;

pub use netns::{CsumErrors, LinkStats, Netns, netns_list, sweep, sweep_orphans};
pub use topology::{BpfFs, Checksums, Host, Iface, Lab};
pub use traffic::{HeldConn, Limits, Reply, TcpServer, UdpServer, tcp_attempts, udp_attempts};
pub use two_node::{EXTERNAL_NET, NODE_NET, Node, TwoNodeLab, node_ip};

use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("probe {attempt} to {target} failed: {source}")]
    Probe {
        attempt: usize,
        target: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// Run a command to completion; its stdout on success, a `LabError::Command` otherwise.
pub fn cmd(program: &str, args: &[&str]) -> Result<String> {
    let line = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(cmd = %line, "lab");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(io_err(format!("spawn `{line}`")))?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when the lab can run here: euid 0, CAP_NET_ADMIN and CAP_SYS_ADMIN (setns, mount)
/// effective, and `ip` and `sysctl` installed.
pub fn can_run() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .unwrap_or(0);
    let has = |cap: u32| caps & (1 << cap) != 0;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && has(CAP_NET_ADMIN)
        && has(CAP_SYS_ADMIN)
        && cmd("ip", &["-V"]).is_ok()
        && cmd("sysctl", &["-V"]).is_ok()
}

/// The gate of a lab test: `true` when [`can_run`]; else SKIP (`false`), or
/// a panic under CI (see [`skip_unless_lab!`]).
pub fn require() -> bool {
    lb_agent::datapath::scratch::skip_unless(
        can_run(),
        "the lab needs root, CAP_NET_ADMIN, CAP_SYS_ADMIN, `ip` and `sysctl`",
    )
}

/// `skip_unless_lab!();` at the top of a test returns early, printing SKIP, when
/// `lab::can_run()` is false; under CI (or `RPCLB_REQUIRE_PRIVILEGES=1`) it
/// fails instead (`lb_agent::datapath::scratch::skip_unless`).
#[macro_export]
macro_rules! skip_unless_lab {
    () => {
        if !$crate::lab::require() {
            return;
        }
    };
}
