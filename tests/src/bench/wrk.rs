//! The lab's "wrk and nginx" part: nginx (Debian's nginx-light) as the backends, wrk as the
//! client, the same lab and paths as the bench's own client and server (`throughput`).
//!
//! nginx serves a 64-byte body with keep-alive on; the `Connection: close` runs send that
//! header, so nginx closes each connection after its response (the server closes first). Both
//! tools come from `cargo xtask setup` (bench only); without them this part says so and is
//! skipped. Each nginx is one process (`master_process off`) in its backend's namespace,
//! killed on drop; each wrk run is bounded by `-d` and killed if it overruns.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rpclb_tests::lab::Netns;

/// Body of every nginx response, in bytes (as the bench's own server's response).
pub const BODY: usize = 64;

fn have(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}

/// `None` if both tools are there, else what is missing.
pub fn missing_tools() -> Option<String> {
    let m: Vec<&str> = ["nginx", "wrk"].into_iter().filter(|t| !have(t)).collect();
    (!m.is_empty()).then(|| m.join(" and "))
}

/// nginx in each backend namespace, listening on `port`; killed (and its files removed) on
/// drop.
pub struct Nginx {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Nginx {
    /// The nginx processes' pids (`ip netns exec` execs nginx: the child is nginx itself).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    pub fn start(backends: &[(&Netns, Ipv4Addr)], port: u16) -> Result<Nginx> {
        let dir = PathBuf::from(format!("/tmp/rpclb-{}-nginx", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let mut me = Nginx {
            children: Vec::new(),
            dir: dir.clone(),
        };
        let body = "R".repeat(BODY);
        for (i, (ns, _)) in backends.iter().enumerate() {
            let d = dir.display();
            // One process, no daemon: the bench owns it and kills it. Temp paths in our folder.
            let conf = format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\n\
                 pid {d}/nginx{i}.pid;\nerror_log {d}/error{i}.log crit;\n\
                 events {{ worker_connections 8192; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 10000000;\n  \
                 keepalive_timeout 60s;\n  client_body_temp_path {d}/body{i};\n  \
                 server {{\n    listen {port} backlog=4096;\n    location / {{\n      \
                 default_type text/plain;\n      return 200 \"{body}\";\n    }}\n  }}\n}}\n"
            );
            let path = dir.join(format!("nginx{i}.conf"));
            fs::write(&path, conf)?;
            let child = Command::new("ip")
                .args(["netns", "exec", ns.name(), "nginx", "-p"])
                .arg(&dir)
                .arg("-e")
                .arg(dir.join(format!("error{i}.log")))
                .arg("-c")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawn nginx")?;
            me.children.push(child);
        }
        // Ready when each answers on its pod address.
        for (ns, ip) in backends {
            let addr = SocketAddrV4::new(*ip, port);
            let until = Instant::now() + Duration::from_secs(5);
            loop {
                let up = ns.run(|| {
                    TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok()
                })?;
                if up {
                    break;
                }
                if Instant::now() > until {
                    let log = fs::read_to_string(dir.join("error0.log")).unwrap_or_default();
                    bail!("nginx did not listen on {addr} within 5 s: {log}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(me)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What one wrk run reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrkOutcome {
    pub rate: f64,
    pub errors: u64,
    /// Requests completed ("N requests in ...").
    pub requests: u64,
    /// wrk's CPU time (its rusage: all threads, and the softirq work run in their context),
    /// user + system and system alone, ns.
    pub cpu_ns: u64,
    pub cpu_sys_ns: u64,
}

/// Threads and connections of every wrk run: one thread per backend, so that the direct run
/// can give each thread one pod address; two connections per thread.
pub const WRK_THREADS: usize = 3;
pub const WRK_CONNS: usize = 6;

/// One wrk run from `ns` for `secs` (whole seconds, at least 1) against `url`. `pods`: give
/// wrk's threads these addresses in turn (the direct path), else all use the URL's. `close`:
/// send `Connection: close`, so that nginx closes after each response.
pub fn run(
    ns: &Netns,
    url: &str,
    pods: &[SocketAddrV4],
    close: bool,
    secs: u64,
) -> Result<WrkOutcome> {
    let dir = PathBuf::from(format!("/tmp/rpclb-{}-nginx", std::process::id()));
    let mut args: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        ns.name().into(),
        "wrk".into(),
        format!("-t{WRK_THREADS}"),
        format!("-c{WRK_CONNS}"),
        format!("-d{}s", secs.max(1)),
        "--timeout".into(),
        "2s".into(),
    ];
    if close {
        args.extend(["-H".into(), "Connection: close".into()]);
    }
    if !pods.is_empty() {
        let list: Vec<String> = pods.iter().map(|a| format!("\"{}\"", a.ip())).collect();
        let script = format!(
            "local addrs = {{ {} }}\nlocal n = 0\nfunction setup(thread)\n  n = n + 1\n  \
             thread.addr = wrk.lookup(addrs[(n - 1) % #addrs + 1], \"{}\")[1]\nend\n",
            list.join(", "),
            pods[0].port()
        );
        let path = dir.join("pods.lua");
        fs::write(&path, script)?;
        args.extend(["-s".into(), path.display().to_string()]);
    }
    args.push(url.into());
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn wrk")?;
    // Bounded: -d, plus a margin for the connections' timeouts.
    let until = Instant::now() + Duration::from_secs(secs.max(1) + 10);
    let ru = loop {
        if let Some(ru) = reap(&child)? {
            break ru;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            bail!("wrk overran its {secs} s run");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    let mut o = parse(&out).with_context(|| format!("wrk output: {out}"))?;
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    o.cpu_sys_ns = ns(ru.ru_stime);
    o.cpu_ns = ns(ru.ru_utime) + o.cpu_sys_ns;
    Ok(o)
}

/// Reaps `child` if it has exited (`wait4`, without blocking), with its rusage.
fn reap(child: &Child) -> Result<Option<libc::rusage>> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
    match r {
        0 => Ok(None),
        r if r == pid => Ok(Some(ru)),
        _ => Err(std::io::Error::last_os_error()).context("wait4 wrk"),
    }
}

/// `perf record -a -g -o OUT -- sleep SECS` (system-wide, call graphs), started now; pair it
/// with [`perf_wait`]. For `RPCLB_BENCH_PERF=DIR`.
pub fn perf_record(out: &std::path::Path, secs: u64) -> Result<Child> {
    if let Some(d) = out.parent() {
        fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
    }
    Command::new("perf")
        .args(["record", "-q", "-a", "-g", "-o"])
        .arg(out)
        .args(["--", "sleep", &secs.max(1).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn perf record")
}

/// Waits for a [`perf_record`] (its `sleep` bounds it; killed after a margin).
pub fn perf_wait(mut c: Child, secs: u64) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(secs.max(1) + 30);
    while c.try_wait()?.is_none() {
        if Instant::now() > until {
            let _ = c.kill();
            let _ = c.wait();
            bail!("perf record overran");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Requests/sec and the error counts of wrk's report.
fn parse(out: &str) -> Result<WrkOutcome> {
    let mut o = WrkOutcome::default();
    let mut seen = false;
    for l in out.lines().map(str::trim) {
        if let Some(n) = l
            .split_once(" requests in ")
            .and_then(|(n, _)| n.trim().parse::<u64>().ok())
        {
            o.requests = n;
        } else if let Some(v) = l.strip_prefix("Requests/sec:") {
            o.rate = v.trim().parse().context("Requests/sec")?;
            seen = true;
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            o.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            o.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if !seen {
        bail!("no Requests/sec line");
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://10.96.0.10:80/\n  3 threads and 6 connections\n\
                   \x20 Socket errors: connect 0, read 3, write 0, timeout 2\n\
                   \x20 24691 requests in 2.00s, 3.5MB read\n\
                   \x20 Non-2xx or 3xx responses: 1\nRequests/sec:  12345.67\nTransfer/sec: 1MB\n";
        let o = parse(out).unwrap();
        assert_eq!(o.rate, 12345.67);
        assert_eq!(o.requests, 24691);
        assert_eq!(o.errors, 6);
        assert!(parse("nothing").is_err());
    }
}
