//! Named network namespaces (`ip netns`) with Drop teardown, and code execution inside them.

use super::{LabError, Result, cmd, io_err};
use std::collections::BTreeMap;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

static NEXT: AtomicU32 = AtomicU32::new(0);
/// `ip netns add` sets up the shared /run/netns mount on first use; serialise it in-process.
static ADD_LOCK: Mutex<()> = Mutex::new(());

/// Prefix of every namespace and /run directory this process creates.
pub(crate) fn prefix_of(pid: u32) -> String {
    format!("rpclb-{pid}-")
}

/// A short random suffix, so names do not repeat across runs that reuse a pid.
pub(crate) fn suffix() -> u16 {
    RandomState::new().hash_one(NEXT.load(Ordering::Relaxed)) as u16
}

/// A network namespace `rpclb-<pid>-<n>-<rand>-<role>` with `lo` up. Dropping it deletes the
/// namespace, which also destroys the veths inside it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}{n}-{:04x}-{role}",
            prefix_of(std::process::id()),
            suffix()
        );
        {
            let _g = ADD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            cmd("ip", &["netns", "add", &name])?;
        }
        let ns = Netns { name }; // from here on, Drop cleans up
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn open(&self) -> Result<File> {
        File::open(self.path()).map_err(io_err(format!("open {}", self.path().display())))
    }

    /// Run `f` on a fresh thread that has joined this namespace, and return its result.
    /// A panic in `f` is resumed in the caller.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let fd = self.open()?;
        std::thread::scope(|s| {
            let h = s.spawn(move || enter(&fd, &self.name).map(|()| f()));
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Start a named thread inside this namespace. Threads it spawns stay in the namespace.
    pub fn spawn<F, R>(&self, thread_name: &str, f: F) -> Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let fd = self.open()?;
        let name = self.name.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                let entered = enter(&fd, &name);
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                assert!(ok, "setns failed"); // never run `f` in the wrong namespace
                f()
            })
            .map_err(io_err("spawn thread"))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(h),
            Ok(Err(e)) => {
                let _ = h.join();
                Err(e)
            }
            Err(_) => panic!("namespace thread died before setns"),
        }
    }

    /// `ip netns exec <name> <program> <args>`: stdout, or an error with stderr. Note that
    /// `ip netns exec` mounts a fresh /sys for the namespace: /sys/fs/bpf is not bpffs there.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.name, program];
        a.extend_from_slice(args);
        cmd("ip", &a)
    }

    /// `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        cmd("ip", &a)
    }

    /// This namespace's `/proc/net/snmp` counters, keyed `<Group>.<Name>` (`Tcp.InCsumErrors`).
    pub fn snmp(&self) -> Result<BTreeMap<String, u64>> {
        let out = self.exec("cat", &["/proc/net/snmp"])?;
        let mut m = BTreeMap::new();
        let mut lines = out.lines();
        // Pairs of lines: `Tcp: Name1 Name2 ...` then `Tcp: 1 2 ...`.
        while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
            let (Some((group, names)), Some((_, values))) =
                (names.split_once(':'), values.split_once(':'))
            else {
                break;
            };
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if let Ok(v) = v.parse() {
                    m.insert(format!("{group}.{n}"), v);
                }
            }
        }
        Ok(m)
    }

    /// TCP and UDP segments this namespace received with a bad checksum (`InCsumErrors` of
    /// `/proc/net/snmp`: what `nstat` shows as TcpInCsumErrors and UdpInCsumErrors).
    pub fn csum_errors(&self) -> Result<CsumErrors> {
        let m = self.snmp()?;
        let get = |k: &str| m.get(k).copied().unwrap_or(0);
        Ok(CsumErrors {
            tcp: get("Tcp.InCsumErrors"),
            udp: get("Udp.InCsumErrors"),
        })
    }

    /// Counters of a link in this namespace, from its /sys/class/net statistics.
    pub fn link_stats(&self, ifname: &str) -> Result<LinkStats> {
        const FILES: [&str; 6] = [
            "rx_packets",
            "tx_packets",
            "rx_bytes",
            "tx_bytes",
            "rx_dropped",
            "tx_dropped",
        ];
        let paths: Vec<String> = FILES
            .iter()
            .map(|f| format!("/sys/class/net/{ifname}/statistics/{f}"))
            .collect();
        let args: Vec<&str> = paths.iter().map(String::as_str).collect();
        let out = self.exec("cat", &args)?;
        let v: Vec<u64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
        let [
            rx_packets,
            tx_packets,
            rx_bytes,
            tx_bytes,
            rx_dropped,
            tx_dropped,
        ] = v[..]
        else {
            return Err(LabError::Command {
                cmd: format!("cat {ifname} statistics"),
                status: "unparsable output".into(),
                stderr: out,
            });
        };
        Ok(LinkStats {
            rx_packets,
            tx_packets,
            rx_bytes,
            tx_bytes,
            rx_dropped,
            tx_dropped,
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = cmd("ip", &["netns", "del", &self.name]) {
            tracing::warn!("lab teardown: {e}");
            eprintln!("lab teardown: {e}");
        }
    }
}

/// Receive checksum errors of one namespace; see [`Netns::csum_errors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CsumErrors {
    pub tcp: u64,
    pub udp: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

fn enter(fd: &File, name: &str) -> Result<()> {
    // SAFETY: fd is an open nsfs file; CLONE_NEWNET only changes this thread's namespace.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io_err(format!("setns into {name}"))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Names in `ip netns list`.
pub fn netns_list() -> Result<Vec<String>> {
    let out = cmd("ip", &["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect())
}

/// Remove what this process left behind: its namespaces and its /run/rpclb-* bpffs mounts.
/// Returns what it removed. Never touches other processes' names.
pub fn sweep() -> Vec<String> {
    sweep_pid(std::process::id())
}

/// `sweep` for every `rpclb-<pid>-` prefix whose process is gone (a crashed or killed run).
pub fn sweep_orphans() -> Vec<String> {
    let mut pids: Vec<u32> = netns_list()
        .unwrap_or_default()
        .iter()
        .filter_map(|n| pid_of(n))
        .collect();
    if let Ok(rd) = std::fs::read_dir("/run") {
        pids.extend(
            rd.flatten()
                .filter_map(|e| pid_of(&e.file_name().to_string_lossy())),
        );
    }
    pids.sort_unstable();
    pids.dedup();
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = |pid: u32| unsafe { libc::kill(pid as i32, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    pids.into_iter()
        .filter(|&p| !alive(p))
        .flat_map(sweep_pid)
        .collect()
}

fn pid_of(name: &str) -> Option<u32> {
    name.strip_prefix("rpclb-")?.split('-').next()?.parse().ok()
}

fn sweep_pid(pid: u32) -> Vec<String> {
    let prefix = prefix_of(pid);
    let mut removed = Vec::new();
    for ns in netns_list().unwrap_or_default() {
        if ns.starts_with(&prefix) && cmd("ip", &["netns", "del", &ns]).is_ok() {
            removed.push(ns);
        }
    }
    if let Ok(rd) = std::fs::read_dir("/run") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                super::topology::remove_bpffs_dir(&e.path());
                removed.push(e.path().display().to_string());
            }
        }
    }
    removed
}
