//! Where the CPU goes in one lab run, per connection or request: the client (wrk), the servers
//! (nginx), the kernel's softirq threads, the agent's conntrack GC (a bench thread that runs
//! what the agent's GC tick runs) and, for scale, the whole machine.
//!
//! Per-process figures are what a shared machine disturbs least. This kernel has no
//! `CONFIG_IRQ_TIME_ACCOUNTING`, so a task's `sum_exec_runtime` (schedstat, rusage) includes the
//! softirq work done in its context: on veths a packet is forwarded, and the eBPF program runs,
//! in the softirq that the sending task's `local_bh_enable` runs. What overflows to ksoftirqd is
//! counted apart. The machine's figures (`/proc/stat`) include every other process, and are
//! sampled by the tick (10 ms).

/// Jiffies per second of `/proc/stat` (USER_HZ).
const USER_HZ: u64 = 100;

/// The `cpu` line of `/proc/stat`, in ns.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stat {
    pub user: u64,
    pub system: u64,
    pub softirq: u64,
    pub irq: u64,
    pub idle: u64,
    pub steal: u64,
}

impl Stat {
    pub fn read() -> Stat {
        let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
            return Stat::default();
        };
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .map(|j: u64| j * (1_000_000_000 / USER_HZ))
            .collect();
        let g = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        Stat {
            user: g(0) + g(1),
            system: g(2),
            idle: g(3) + g(4),
            irq: g(5),
            softirq: g(6),
            steal: g(7),
        }
    }

    pub fn since(self, b: Stat) -> Stat {
        Stat {
            user: self.user.saturating_sub(b.user),
            system: self.system.saturating_sub(b.system),
            softirq: self.softirq.saturating_sub(b.softirq),
            irq: self.irq.saturating_sub(b.irq),
            idle: self.idle.saturating_sub(b.idle),
            steal: self.steal.saturating_sub(b.steal),
        }
    }

    /// Time not idle, all CPUs.
    pub fn busy(&self) -> u64 {
        self.user + self.system + self.softirq + self.irq
    }
}

/// CPU time of one run, ns.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunCpu {
    /// The client: wrk's rusage (user + system, all its threads).
    pub client: u64,
    /// Of which in the kernel (rusage's split: the tick's sample of the total).
    pub client_sys: u64,
    /// The servers: the nginx processes' schedstat.
    pub servers: u64,
    /// Of which in the kernel (`/proc/PID/stat`'s utime / stime split).
    pub servers_sys: u64,
    /// Every `ksoftirqd/N` (schedstat).
    pub ksoftirqd: u64,
    /// The agent's GC thread (schedstat), if it ran.
    pub agent: u64,
    /// The machine, all CPUs (`/proc/stat`).
    pub machine: Stat,
    /// Connections (or requests) completed in the run.
    pub done: u64,
}

impl RunCpu {
    /// The tasks above, together.
    pub fn tasks(&self) -> u64 {
        self.client + self.servers + self.ksoftirqd + self.agent
    }
}

/// Sum of field 1 (`sum_exec_runtime`, ns) of `/proc/PID/schedstat` over `pids`.
pub fn schedstat_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `(utime, stime)` of `/proc/PID/stat` summed over `pids`, in ns (tick samples).
pub fn stat_times_ns(pids: &[u32]) -> (u64, u64) {
    let mut out = (0, 0);
    for p in pids {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // After "(comm)": state is field 3; utime and stime are fields 14 and 15.
        let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let g = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        out.0 += g(11) * (1_000_000_000 / USER_HZ);
        out.1 += g(12) * (1_000_000_000 / USER_HZ);
    }
    out
}

/// Pids of the kernel's `ksoftirqd/N` threads.
pub fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(d) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    d.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

/// A snapshot of the counters that [`RunCpu`] is the difference of (all but the client,
/// whose rusage comes from `wait4`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Snap {
    servers: u64,
    servers_sys: u64,
    ksoftirqd: u64,
    agent: u64,
    machine: Stat,
}

impl Snap {
    pub fn take(servers: &[u32], ksoftirqd: &[u32]) -> Snap {
        Snap {
            servers: schedstat_ns(servers),
            servers_sys: stat_times_ns(servers).1,
            ksoftirqd: schedstat_ns(ksoftirqd),
            agent: super::throughput::thread_sched(|c| c == super::gc::THREAD).cpu_ns,
            machine: Stat::read(),
        }
    }

    /// The run from `self` to `after`, with the client's figures.
    pub fn run(self, after: Snap, client: (u64, u64), done: u64) -> RunCpu {
        RunCpu {
            client: client.0,
            client_sys: client.1,
            servers: after.servers.saturating_sub(self.servers),
            servers_sys: after.servers_sys.saturating_sub(self.servers_sys),
            ksoftirqd: after.ksoftirqd.saturating_sub(self.ksoftirqd),
            agent: after.agent.saturating_sub(self.agent),
            machine: after.machine.since(self.machine),
            done,
        }
    }
}

/// Per-connection figures of a set of runs, in µs: each component's CPU summed over the runs
/// over their connections summed (a periodic cost, such as a GC sweep that falls into some
/// runs only, counts in full).
#[derive(Clone, Copy, Debug, Default)]
pub struct PerConn {
    pub client: f64,
    pub client_sys: f64,
    pub servers: f64,
    pub servers_sys: f64,
    pub ksoftirqd: f64,
    pub agent: f64,
    pub tasks: f64,
    pub machine_busy: f64,
    pub machine_softirq: f64,
    /// Machine busy share (of all CPUs' time) over the runs.
    pub machine_load: f64,
}

impl PerConn {
    pub fn of(runs: &[RunCpu]) -> PerConn {
        let done: u64 = runs.iter().map(|r| r.done).sum();
        let m = |f: &dyn Fn(&RunCpu) -> u64| -> f64 {
            if done == 0 {
                return f64::NAN;
            }
            runs.iter().map(f).sum::<u64>() as f64 / done as f64 / 1000.0
        };
        let busy: u64 = runs.iter().map(|r| r.machine.busy()).sum();
        let all: u64 = busy + runs.iter().map(|r| r.machine.idle).sum::<u64>();
        PerConn {
            client: m(&|r| r.client),
            client_sys: m(&|r| r.client_sys),
            servers: m(&|r| r.servers),
            servers_sys: m(&|r| r.servers_sys),
            ksoftirqd: m(&|r| r.ksoftirqd),
            agent: m(&|r| r.agent),
            tasks: m(&|r| r.tasks()),
            machine_busy: m(&|r| r.machine.busy()),
            machine_softirq: m(&|r| r.machine.softirq),
            machine_load: if all == 0 {
                f64::NAN
            } else {
                busy as f64 / all as f64
            },
        }
    }

    /// Table cells: client, servers, ksoftirqd, agent GC, the sum, machine busy (softirq).
    pub fn cells(&self) -> Vec<String> {
        vec![
            format!("{:.1} ({:.1})", self.client, self.client_sys),
            format!("{:.1} ({:.1})", self.servers, self.servers_sys),
            format!("{:.2}", self.ksoftirqd),
            format!("{:.2}", self.agent),
            format!("{:.1}", self.tasks),
            format!(
                "{:.1} ({:.1}), {:.0}% busy",
                self.machine_busy,
                self.machine_softirq,
                self.machine_load * 100.0
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(client: u64, servers: u64, agent: u64, busy: u64, idle: u64, done: u64) -> RunCpu {
        RunCpu {
            client,
            servers,
            agent,
            machine: Stat {
                user: busy,
                idle,
                ..Stat::default()
            },
            done,
            ..RunCpu::default()
        }
    }

    #[test]
    fn per_connection_is_sums_over_sums() {
        // A periodic cost (the agent's sweep) in one run of two counts in full.
        let p = PerConn::of(&[
            run(2_000_000, 1_000_000, 0, 4_000_000, 0, 1_000),
            run(6_000_000, 3_000_000, 4_000_000, 8_000_000, 4_000_000, 3_000),
        ]);
        assert_eq!(p.client, 2.0);
        assert_eq!(p.servers, 1.0);
        assert_eq!(p.agent, 1.0);
        assert_eq!(p.tasks, 4.0);
        assert_eq!(p.machine_busy, 3.0);
        assert_eq!(p.machine_load, 0.75);
        assert!(PerConn::of(&[]).client.is_nan());
    }

    #[test]
    fn reads_this_process() {
        let me = [std::process::id()];
        // This test process has run: some CPU time, and a /proc/stat with busy time.
        assert!(schedstat_ns(&me) > 0);
        assert!(Stat::read().busy() > 0);
        assert_eq!(schedstat_ns(&[u32::MAX]), 0);
    }
}
