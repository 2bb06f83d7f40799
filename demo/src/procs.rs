//! Child processes of the demo: the agent in the node namespace, `lbctl`, and the client pod.
//! Each runs in its own process group, so a Ctrl-C in the terminal reaches only the demo, which
//! then stops them in order; each also gets SIGTERM if the demo dies (PR_SET_PDEATHSIG).

use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use rpclb_tests::lab::Netns;

/// Set by SIGINT / SIGTERM.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst); // async-signal-safe: a lock-free store
}

/// Route SIGINT and SIGTERM to `INTERRUPTED` instead of killing the process, so that every
/// exit path runs the teardown.
pub fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a plain handler that only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `ip netns exec <ns> <program> <args>` in its own process group, dying with the demo.
pub fn netns_command(ns: &Netns, program: &Path, args: &[String]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns.name()])
        .arg(program)
        .args(args)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// A child that is stopped on drop: SIGTERM, a grace period, then SIGKILL.
pub struct Guarded {
    pub what: String,
    child: Option<Child>,
    grace: Duration,
}

impl Guarded {
    pub fn new(what: impl Into<String>, child: Child, grace: Duration) -> Self {
        Guarded {
            what: what.into(),
            child: Some(child),
            grace,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self.pid() as libc::pid_t;
        if pid == 0 {
            bail!("{} is not running", self.what);
        }
        // SAFETY: kill(2) on our own child's pid.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("signal {}", self.what));
        }
        Ok(())
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Wait up to `t` for the child to exit by itself.
    pub fn wait_timeout(&mut self, t: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + t;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.as_mut().and_then(|c| c.stdin.take())
    }

    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut().and_then(|c| c.stderr.take())
    }

    /// SIGTERM, wait for the grace period, SIGKILL. Returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + self.grace;
        while Instant::now() < end {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.what);
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A daemon inside the node namespace (`lb-agent --controller ...` or
/// `lb-controller --config ...`), with its log in a file and a /readyz.
pub struct Agent {
    pub what: &'static str,
    pub proc: Guarded,
    pub log: PathBuf,
    pub metrics: SocketAddr,
}

pub struct AgentOpts<'a> {
    pub bin: &'a Path,
    /// The controller's gRPC URL (inside the node namespace).
    pub controller: &'a str,
    pub node_name: &'a str,
    pub interfaces: &'a [String],
    pub mode: &'a str,
    pub pin_path: &'a Path,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    /// The mutual-TLS flags (`--tls-ca ... --tls-cert ... --tls-key ...`).
    pub tls: &'a [String],
}

pub struct ControllerOpts<'a> {
    pub bin: &'a Path,
    pub config: &'a Path,
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    /// The mutual-TLS flags (`--tls-ca ... --tls-cert ... --tls-key ...`).
    pub tls: &'a [String],
}

impl Agent {
    /// `lb-controller --config FILE` (standalone mode).
    pub fn controller(node: &Netns, o: ControllerOpts<'_>) -> Result<Agent> {
        let mut args: Vec<String> = vec![
            "--config".into(),
            o.config.display().to_string(),
            "--listen".into(),
            o.listen.to_string(),
            "--metrics-addr".into(),
            o.metrics.to_string(),
        ];
        args.extend(o.tls.iter().cloned());
        Self::spawn(node, "lb-controller", o.bin, &args, o.log, o.metrics)
    }

    /// `lb-agent --controller URL`.
    pub fn start(node: &Netns, o: AgentOpts<'_>) -> Result<Agent> {
        let mut args: Vec<String> = vec![
            "--controller".into(),
            o.controller.into(),
            "--node-name".into(),
            o.node_name.into(),
            "--interfaces".into(),
            o.interfaces.join(","),
            "--mode".into(),
            o.mode.into(),
            "--pin-path".into(),
            o.pin_path.display().to_string(),
            "--metrics-addr".into(),
            o.metrics.to_string(),
        ];
        args.extend(o.tls.iter().cloned());
        Self::spawn(node, "lb-agent", o.bin, &args, o.log, o.metrics)
    }

    fn spawn(
        node: &Netns,
        what: &'static str,
        bin: &Path,
        args: &[String],
        log_path: PathBuf,
        metrics: SocketAddr,
    ) -> Result<Agent> {
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let child = netns_command(node, bin, args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Agent {
            what,
            proc: Guarded::new(what, child, Duration::from_secs(5)),
            log: log_path,
            metrics,
        })
    }

    /// Poll GET /readyz (from inside the node namespace) until it answers 200.
    pub fn wait_ready(&mut self, node: &Netns, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.proc.try_wait() {
                bail!(
                    "{} exited ({s}) before it was ready\n{}",
                    self.what,
                    self.log_tail(20)
                );
            }
            if interrupted() {
                bail!("interrupted");
            }
            let addr = self.metrics;
            let code = node.run(move || http_status(addr, "/readyz"))?;
            if code.as_ref().is_ok_and(|c| *c == 200) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} not ready after {timeout:?} (last /readyz: {code:?})\n{}",
                    self.what,
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n    ");
        format!("  {} log ({}):\n    {tail}", self.what, self.log.display())
    }
}

/// Status code of a plain HTTP/1.0 GET, with short timeouts.
fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let t = Duration::from_millis(500);
    let mut s = TcpStream::connect_timeout(&addr, t)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut line = String::new();
    BufReader::new(s.take(4096)).read_line(&mut line)?;
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))
}

/// Body of a plain HTTP/1.0 GET that must answer 200 (the agent's /metrics), read to the end
/// of the connection: at most 8 MiB, 2 s per read.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let t = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, t)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.take(8 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: no end of headers in {} bytes", raw.len()))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET {path}: {status}");
    }
    Ok(body.to_string())
}

/// Run `lbctl --pin-path P ARGS` (it reads the pinned maps, so no namespace is needed).
pub fn lbctl(bin: &Path, pin_path: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .arg("--pin-path")
        .arg(pin_path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "lbctl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Lines of a child's stdout, on a channel (the reader thread ends at EOF).
pub fn lines(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
