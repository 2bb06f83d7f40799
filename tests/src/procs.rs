//! Processes the lab tests run: the workspace binaries (built on demand),
//! `lb-agent` and `lb-controller` children in the lab's node namespace or on
//! the host, their logs, and their `/metrics`.
//!
//! The binaries: `cargo test --workspace` builds every workspace binary, but
//! `cargo test -p rpclb-tests` does not build other packages' binaries, so
//! the first test that needs one runs `cargo build -p <package> --bin <name>`
//! (same target directory and profile, found from the test executable's
//! path; cargo releases its build lock before running tests). Run outside
//! cargo (no `CARGO` variable), the binary must already exist.
//!
//! Every process is a child killed (SIGKILL) and reaped on drop, so none
//! outlives its test.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lb_api::tls::certs::{Bundle, Validity};

use crate::lab::Lab;

/// `target/<profile>/lb-agent`, built (or checked fresh) once per test run.
pub fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("lb-agent", "lb-agent"))
}

/// `target/<profile>/lb-controller`, likewise.
pub fn controller_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("lb-controller", "lb-controller"))
}

/// Builds a workspace binary into this test's target dir and returns its
/// path. Under `cargo xtask test` (`RPCLB_BINS_BUILT=1`), `cargo test
/// --workspace` has built every binary already, with the test build's
/// features: building it again here would rebuild its dependencies with
/// other features, for minutes, and replace it.
pub fn workspace_bin(package: &str, name: &str) -> PathBuf {
    {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/agent-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let target_dir = profile_dir.parent().expect("target dir");
        let bin = profile_dir.join(name);
        let prebuilt = std::env::var_os("RPCLB_BINS_BUILT").is_some_and(|v| v == "1");
        if let (Ok(cargo), false) = (std::env::var("CARGO"), prebuilt) {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "-p", package, "--bin", name])
                .arg("--manifest-path")
                .arg(&manifest)
                .arg("--target-dir")
                .arg(target_dir);
            match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => {}
                Some("release") => {
                    cmd.arg("--release");
                }
                Some(p) => {
                    cmd.args(["--profile", p]);
                }
            }
            // What cargo set for this test process describes this package, not the build.
            for (k, _) in std::env::vars() {
                if [
                    "CARGO_PKG_",
                    "CARGO_MANIFEST_",
                    "CARGO_CRATE_",
                    "CARGO_BIN_",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .iter()
                .any(|p| k.starts_with(p))
                {
                    cmd.env_remove(k);
                }
            }
            let out = cmd.output().expect("run cargo build");
            assert!(
                out.status.success(),
                "cargo build -p {package} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            bin.exists(),
            "{} is missing: run `cargo build -p {package}` (or `cargo test --workspace`)",
            bin.display()
        );
        bin
    }
}

/// A scratch directory for configs and logs, removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "rpclb-agenttest-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("mkdir test dir");
        TestDir(p)
    }

    pub fn config(&self) -> PathBuf {
        self.0.join("services.yaml")
    }

    /// Replaces the config the way editors do: write a new file, rename it over.
    pub fn write_config(&self, text: &str) {
        let tmp = self.0.join(".services.yaml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.config()).expect("rename config");
    }
}

impl TestDir {
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A CA, the controller's certificate and one per node, in `<dir>/certs`
    /// (lb_api::tls::certs, as `lb-controller certs` writes them).
    pub fn certs(&self, nodes: &[&str]) -> Bundle {
        Bundle::write(&self.0.join("certs"), nodes, &[], Validity::days(1))
            .expect("write test certificates")
    }
}

/// How often the tests' controllers and agents check their TLS files.
pub const TLS_POLL_MS: u64 = 200;

/// `lb-controller` flags for mutual TLS with `b`'s files.
pub fn controller_tls_args(b: &Bundle) -> Vec<String> {
    let p = b.controller_paths();
    [
        "--tls-ca".to_string(),
        p.ca.display().to_string(),
        "--tls-cert".into(),
        p.cert.display().to_string(),
        "--tls-key".into(),
        p.key.display().to_string(),
        "--tls-poll-ms".into(),
        TLS_POLL_MS.to_string(),
    ]
    .into()
}

/// `lb-agent` flags for mutual TLS as `node`, with `b`'s files (the URL is https://).
pub fn agent_tls_args(b: &Bundle, node: &str) -> Vec<String> {
    let p = b.node_paths(node);
    [
        "--tls-ca".to_string(),
        p.ca.display().to_string(),
        "--tls-cert".into(),
        p.cert.display().to_string(),
        "--tls-key".into(),
        p.key.display().to_string(),
        "--tls-poll".into(),
        format!("{TLS_POLL_MS}ms"),
    ]
    .into()
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `lb-agent` or `lb-controller` (in the lab's node namespace, or
/// on the host); SIGKILLed and reaped on drop. `port` is its metrics port,
/// where [`Self::get`], [`Self::wait_ready`] and [`Self::scrape`] look.
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
    /// The network namespace it runs in; `None`: the host's.
    pub node: Option<String>,
    pub port: u16,
}

/// The agent's metrics port in the tests (each lab has its own namespace).
pub const AGENT_METRICS_PORT: u16 = 9464;

/// Flags every test passes: the lab's interfaces and pin path, small maps.
pub fn agent_args(lab: &Lab, dir: &TestDir, extra: &[&str]) -> Vec<String> {
    let ifaces: Vec<String> = lab.node_ifaces().iter().map(|i| i.name.clone()).collect();
    base_agent_args(&dir.config(), &ifaces.join(","), &pin_path(lab), &[], extra)
}

/// Flags for the agent of one node of a [`crate::lab::TwoNodeLab`]: its interfaces, pin
/// path and node name, the config file `config`, small maps.
pub fn node_agent_args(node: &crate::lab::Node, config: &Path, extra: &[&str]) -> Vec<String> {
    // `--datapath ebpf` unless `extra` names another.
    let datapath: &[&str] = if extra.contains(&"--datapath") {
        &[]
    } else {
        &["--datapath", "ebpf"]
    };
    let own: Vec<&str> = [datapath, &["--node-name", &node.name]].concat();
    base_agent_args(
        config,
        &node.ifaces().join(","),
        &node.pin_path(),
        &own,
        extra,
    )
}

/// The two-node lab's agents (tests/src/lab/two_node.rs), each with its
/// own config file, started and ready.
pub struct NodeAgents {
    pub dirs: [TestDir; 2],
    pub procs: Vec<Proc>,
}

impl NodeAgents {
    pub fn start(lab: &crate::lab::TwoNodeLab, configs: [&str; 2], extra: &[&str]) -> NodeAgents {
        let dirs = [TestDir::new("node-a"), TestDir::new("node-b")];
        let mut procs = Vec::new();
        for ((node, dir), cfg) in lab.nodes().into_iter().zip(&dirs).zip(configs) {
            dir.write_config(cfg);
            let args = node_agent_args(node, &dir.config(), extra);
            let mut p = Proc::start_in(&node.ns, dir, &node.name, &args);
            p.wait_ready();
            procs.push(p);
        }
        NodeAgents { dirs, procs }
    }

    /// Agent `i`'s log, after its directory.
    pub fn log(&self, i: usize) -> String {
        format!(
            "{}:\n{}",
            self.dirs[i].path().display(),
            self.procs[i].log()
        )
    }
}

/// The config file, interfaces, pin path, metrics address and small maps,
/// then `own` and `extra`.
fn base_agent_args(
    config: &Path,
    ifaces: &str,
    pin: &Path,
    own: &[&str],
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = [
        "--config",
        &config.display().to_string(),
        "--interfaces",
        ifaces,
        "--pin-path",
        &pin.display().to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{AGENT_METRICS_PORT}"),
        "--max-services",
        "1024",
        "--max-backends",
        "4096",
        "--max-conntrack",
        "65536",
        "--max-slots",
        "1048576",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(own.iter().chain(extra).map(|s| s.to_string()));
    a
}

/// One service entry of a config file.
pub fn svc_yaml(
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    proto: &str,
    algo: &str,
    backends: &[Ipv4Addr],
    backend_port: u16,
) -> String {
    let mut s = format!(
        "  - name: {name}\n    vip: {vip}\n    port: {port}\n    protocol: {proto}\n    \
         algorithm: {algo}\n"
    );
    if backends.is_empty() {
        s.push_str("    backends: []\n");
    } else {
        s.push_str("    backends:\n");
        for b in backends {
            s.push_str(&format!("      - {{ ip: {b}, port: {backend_port} }}\n"));
        }
    }
    s
}

pub fn pin_path(lab: &Lab) -> PathBuf {
    lab.bpffs().join("rpclb")
}

impl Proc {
    /// Starts `lb-agent ARGS` in the lab's node namespace; `name` names its
    /// log file (`<dir>/<name>.log`, stdout + stderr).
    pub fn start(lab: &Lab, dir: &TestDir, name: &str, args: &[String]) -> Proc {
        Proc::spawn(lab, dir, name, agent_bin(), args)
    }

    /// Starts `bin` in the node namespace, with the agent's metrics port.
    pub fn spawn(lab: &Lab, dir: &TestDir, name: &str, bin: &Path, args: &[String]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", lab.node().name()])
            .arg(bin)
            .args(args);
        Proc::run(cmd, dir, name, Some(lab.node().name()), AGENT_METRICS_PORT)
    }

    /// Starts `lb-agent ARGS` in the namespace `ns` (a node of a two-node lab).
    pub fn start_in(ns: &crate::lab::Netns, dir: &TestDir, name: &str, args: &[String]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()])
            .arg(agent_bin())
            .args(args);
        Proc::run(cmd, dir, name, Some(ns.name()), AGENT_METRICS_PORT)
    }

    /// Starts `bin` on the host (the root namespace), with `env`; its
    /// metrics on 127.0.0.1:`port`.
    pub fn spawn_host(
        dir: &TestDir,
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
        port: u16,
    ) -> Proc {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::run(cmd, dir, name, None, port)
    }

    fn run(mut cmd: Command, dir: &TestDir, name: &str, node: Option<&str>, port: u16) -> Proc {
        let log = dir.0.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create log");
        let child = cmd
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            log,
            node: node.map(str::to_string),
            port,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("process running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child (`ip netns exec` execs the binary in place).
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill {sig}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; `None` if it is still running at the deadline.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let st = self
            .wait_exit(Duration::from_secs(5))
            .expect("process dies");
        assert!(!st.success());
    }

    /// Fails the test with the process's log if it exited.
    pub fn check_alive(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Some(st) = child.try_wait().expect("try_wait")
        {
            self.child = None;
            panic!("{} exited ({st}):\n{}", self.log.display(), self.log());
        }
    }

    /// GET `path` on its metrics port.
    pub fn get(&mut self, path: &str) -> (u16, String) {
        self.check_alive();
        http_get_port(self.node.as_deref(), self.port, path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
    }

    /// Polls `/readyz` until it answers 200: 30 s, or `RPCLB_READY_TIMEOUT_S` (the kernel
    /// matrix's guests under TCG set it).
    pub fn wait_ready(&mut self) {
        let secs = std::env::var("RPCLB_READY_TIMEOUT_S")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(30);
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.check_alive();
            if let Ok((200, _)) = http_get_port(self.node.as_deref(), self.port, "/readyz") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready in {secs} s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn scrape(&mut self) -> Scrape {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        Scrape(body)
    }

    /// Polls /metrics until `metric` (no labels) reaches `want`.
    pub fn wait_metric(&mut self, metric: &str, want: f64) -> Scrape {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let m = self.scrape();
            if m.get(metric, &[]) == Some(want) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{metric} never reached {want} (now {:?}):\n{}",
                m.get(metric, &[]),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A plain HTTP/1.1 GET to 127.0.0.1:`port` inside the namespace `node`
/// (the host's when `None`), from a thread of its own.
pub fn http_get_port(node: Option<&str>, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let ns = match node {
        Some(n) => Some(std::fs::File::open(Path::new("/var/run/netns").join(n))?),
        None => None,
    };
    let path = path.to_string();
    std::thread::scope(|s| {
        s.spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this short-lived thread only.
            if let Some(ns) = &ns
                && unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let (status, resp) = http_get_from(addr, &path, Duration::from_secs(5))?;
            let body = resp
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            Ok((status, body))
        })
        .join()
        .expect("http thread")
    })
}

/// `GET path` to `addr` from the caller's namespace (HTTP/1.1, `Connection:
/// close`): the status and the whole response, headers included.
pub fn http_get_from(
    addr: SocketAddr,
    path: &str,
    read_timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    c.set_read_timeout(Some(read_timeout))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    c.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {resp:?}")))?;
    Ok((status, resp))
}

/// A Prometheus text scrape.
pub struct Scrape(pub String);

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut rest = s;
    while let Some((k, v)) = rest.split_once("=\"") {
        let mut val = String::new();
        let mut chars = v.char_indices();
        let mut end = v.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        m.insert(k.trim_start_matches(',').trim().to_string(), val);
        rest = &v[end..];
    }
    m
}

impl Scrape {
    /// Every sample of `name`: (labels, value).
    pub fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                if series.split('{').next()? != name {
                    return None;
                }
                Some((series_labels(series), value.parse().ok()?))
            })
            .collect()
    }

    /// The sample of `name` whose labels include all of `want`.
    pub fn get(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        let hits: Vec<f64> = self
            .samples(name)
            .into_iter()
            .filter(|(l, _)| {
                want.iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, v)| v)
            .collect();
        match hits[..] {
            [v] => Some(v),
            [] => None,
            _ => panic!("{name} {want:?} matches {} series", hits.len()),
        }
    }

    /// Sum of every sample of `name` whose labels include all of `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .into_iter()
            .filter(|(l, _)| {
                want.iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

fn series_labels(series: &str) -> BTreeMap<String, String> {
    series
        .split_once('{')
        .and_then(|(_, r)| r.strip_suffix('}'))
        .map(parse_labels)
        .unwrap_or_default()
}

/// Polls `f` every 200 ms until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
