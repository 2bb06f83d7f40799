//! A real Kubernetes API server for tests: kube-apiserver v1.20.2, built once by
//! `cargo xtask kube-apiserver`, with an etcd of its own. Both listen on 127.0.0.1 only, on
//! free ports, and keep their data, certificates and logs in a temp folder of their own, so
//! several can run at once. Dropping an [`ApiServer`] stops both and removes the folder.
//!
//! What it is: token auth (an admin in system:masters), RBAC, ServiceAccount tokens through
//! the TokenRequest API (`kubectl create token`), and an audit log of every request at the
//! Metadata level (who, verb, resource, response code, the authorizer's decision), read with
//! [`ApiServer::audit_events`]. What it is not: there is no
//! controller-manager, scheduler or kubelet, so no EndpointSlice mirroring, no ServiceAccount
//! token Secrets, and a deleted namespace stays Terminating. A 1.20 server serves
//! discovery.k8s.io/v1beta1 only (not v1) and drops a v1beta1 endpoint's `serving` and
//! `terminating` conditions (their feature gate is off).

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The version `cargo xtask kube-apiserver` builds.
pub const VERSION: &str = "v1.20.2";
/// The Service ClusterIP range: the project's VIP range.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";
/// The ServiceAccount token issuer, also the tokens' audience.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How long `start` waits for `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `drop` waits after SIGTERM before SIGKILL, per process.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Each instance's folder: `$TMPDIR/rpclb-kube-<test pid>-<n>`.
const DIR_PREFIX: &str = "rpclb-kube-";
/// Log lines quoted in an error.
const TAIL_LINES: usize = 25;

#[derive(Debug, thiserror::Error)]
pub enum KubeFixtureError {
    #[error(
        "no kube-apiserver at {}: run `cargo xtask kube-apiserver` (it builds {VERSION} once into \
         the cache; `cargo xtask test` runs it too), or set RPCLB_KUBE_APISERVER to a binary",
        .0.display()
    )]
    MissingApiServer(PathBuf),
    #[error("no etcd on PATH: run `cargo xtask kube-apiserver` (it installs Debian's etcd-server)")]
    MissingEtcd,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("generating certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{name} exited while starting ({status}); the tail of {log_path}:\n{log}")]
    Exited {
        name: &'static str,
        status: String,
        log_path: String,
        log: String,
    },
    #[error(
        "the API server was not ready after {secs} s (last /readyz answer: {last});\n\
         --- etcd log tail:\n{etcd}\n--- kube-apiserver log tail:\n{apiserver}"
    )]
    NotReady {
        secs: u64,
        last: String,
        etcd: String,
        apiserver: String,
    },
    #[error("`kubectl {args}` failed ({status}): {stderr}")]
    Kubectl {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("unexpected answer from {what}: {answer}")]
    Unexpected { what: String, answer: String },
}

pub type Result<T, E = KubeFixtureError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KubeFixtureError {
    let what = what.into();
    move |source| KubeFixtureError::Io { what, source }
}

/// The kube-apiserver binary: `RPCLB_KUBE_APISERVER` if set, else
/// `${RPCLB_CACHE_DIR:-/var/cache/rpclb}/kube-apiserver/1.20.2/kube-apiserver`. The same rule
/// as xtask's `kube::binary` (xtask/src/kube.rs), which builds it there.
pub fn apiserver_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("RPCLB_KUBE_APISERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::var_os("RPCLB_CACHE_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/rpclb"), PathBuf::from)
        .join("kube-apiserver")
        .join(VERSION.trim_start_matches('v'))
        .join("kube-apiserver")
}

/// A running kube-apiserver and its etcd. Drop stops both (SIGTERM, then SIGKILL after a
/// bound) and removes the folder, on a panic too.
pub struct ApiServer {
    dir: PathBuf,
    url: String,
    addr: SocketAddr,
    ca_pem: PathBuf,
    admin_kubeconfig: PathBuf,
    version: String,
    started_in: Duration,
    // Stopped in this order: the API server before its etcd.
    apiserver: Option<Child>,
    etcd: Option<Child>,
}

impl ApiServer {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers ok. The binary is
    /// [`apiserver_binary`]; without it, the error names `cargo xtask kube-apiserver`.
    pub fn start() -> Result<ApiServer> {
        Self::start_with_binary(&apiserver_binary())
    }

    /// [`start`](Self::start) with another kube-apiserver binary.
    pub fn start_with_binary(bin: &Path) -> Result<ApiServer> {
        if !bin.is_file() {
            return Err(KubeFixtureError::MissingApiServer(bin.to_path_buf()));
        }
        let etcd = find_on_path("etcd").ok_or(KubeFixtureError::MissingEtcd)?;
        sweep_orphans();
        // The free ports are found by binding port 0 and closing, so another process can take
        // one before etcd or the API server binds it: then they exit, and a retry takes others.
        let mut attempt = 1;
        loop {
            match Self::start_once(bin, &etcd) {
                Err(KubeFixtureError::Exited { log, .. })
                    if attempt < 3 && log.contains("address already in use") =>
                {
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    fn start_once(bin: &Path, etcd: &Path) -> Result<ApiServer> {
        let t0 = Instant::now();
        let [etcd_client, etcd_peer, api_port] = free_ports()?;
        let dir = new_dir()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], api_port));
        // From here on, Drop cleans up whatever has been started, also when a step fails.
        let mut s = ApiServer {
            url: format!("https://{addr}"),
            addr,
            ca_pem: dir.join("ca.pem"),
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            version: String::new(),
            started_in: Duration::ZERO,
            apiserver: None,
            etcd: None,
        };
        let d = s.dir.clone();
        s.write_credentials()?;

        let client_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let mut cmd = Command::new(etcd);
        cmd.arg("--name=rpclb-test")
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=rpclb-test={peer_url}"))
            .arg("--initial-cluster-state=new");
        s.etcd = Some(spawn(&mut cmd, &d, "etcd")?);
        s.write_pids()?;

        let mut cmd = Command::new(bin);
        let path = |name: &str| d.join(name).display().to_string();
        cmd.arg(format!("--etcd-servers={client_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            .arg("--insecure-port=0")
            .arg(format!("--tls-cert-file={}", path("apiserver.pem")))
            .arg(format!(
                "--tls-private-key-file={}",
                path("apiserver-key.pem")
            ))
            .arg(format!("--cert-dir={}", path("apiserver-certs")))
            .arg(format!("--token-auth-file={}", path("tokens.csv")))
            .arg("--authorization-mode=Node,RBAC")
            .arg(format!(
                "--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"
            ))
            .arg(format!("--service-account-issuer={ISSUER}"))
            .arg(format!("--api-audiences={ISSUER}"))
            .arg(format!("--service-account-key-file={}", path("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                path("sa.key")
            ))
            // The agent's DaemonSet runs privileged containers.
            .arg("--allow-privileged=true")
            // The `kubernetes` Service's Endpoints would be 127.0.0.1, which Endpoints refuse.
            .arg("--endpoint-reconciler-type=none")
            // Every request, at the Metadata level, as JSON lines (the log backend writes
            // each event before the request completes: "blocking" mode).
            .arg(format!("--audit-policy-file={}", path("audit-policy.yaml")))
            .arg(format!("--audit-log-path={}", path("audit.log")))
            .arg("--audit-log-format=json")
            .arg("--audit-log-mode=blocking")
            .arg("--profiling=false");
        s.apiserver = Some(spawn(&mut cmd, &d, "kube-apiserver")?);
        s.write_pids()?;

        s.wait_ready(t0)?;
        let v = s.kubectl_output(&["get", "--raw", "/version"], None)?;
        s.version = serde_json::from_str::<serde_json::Value>(&v)
            .ok()
            .and_then(|v| Some(v.get("gitVersion")?.as_str()?.to_owned()))
            .ok_or_else(|| KubeFixtureError::Unexpected {
                what: "/version".into(),
                answer: v.clone(),
            })?;
        s.started_in = t0.elapsed();
        Ok(s)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The API server's address (127.0.0.1 and its port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA that signed the serving certificate (PEM).
    pub fn ca_pem(&self) -> &Path {
        &self.ca_pem
    }

    /// A kubeconfig for the admin user (token auth, group system:masters).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The server's own `gitVersion`, e.g. "v1.20.2".
    pub fn version(&self) -> &str {
        &self.version
    }

    /// How long `start` took until the server was ready.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The audit log: one JSON audit.k8s.io/v1 Event per line.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// Every audit event so far (stages ResponseStarted, for watches, and ResponseComplete;
    /// RequestReceived is omitted by the policy).
    pub fn audit_events(&self) -> Result<Vec<serde_json::Value>> {
        let text = fs::read_to_string(self.audit_log()).map_err(io_err("reading audit.log"))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| KubeFixtureError::Unexpected {
                    what: format!("audit.log ({e})"),
                    answer: l.to_owned(),
                })
            })
            .collect()
    }

    /// This instance's folder (etcd data, certificates, kubeconfigs, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pids of kube-apiserver and etcd, while they run.
    pub fn pids(&self) -> Vec<u32> {
        [&self.apiserver, &self.etcd]
            .into_iter()
            .flatten()
            .map(Child::id)
            .collect()
    }

    /// `kubectl` as the admin (`--kubeconfig` set; `KUBECONFIG` from the environment removed).
    pub fn kubectl(&self) -> Command {
        self.kubectl_as(&self.admin_kubeconfig)
    }

    /// `kubectl` with another kubeconfig, e.g. one from
    /// [`kubeconfig_for_service_account`](Self::kubeconfig_for_service_account).
    pub fn kubectl_as(&self, kubeconfig: &Path) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            // Discovery cache per instance, not in $HOME.
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        cmd
    }

    /// `kubectl apply -f -` (client-side) of `yaml` as the admin; kubectl's output.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_output(&["apply", "-f", "-"], Some(yaml))
    }

    /// Runs `kubectl ARGS` as the admin, with `stdin` as its input; its stdout, or an error
    /// with its stderr.
    pub fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut cmd = self.kubectl();
        cmd.args(args);
        run_kubectl(cmd, args, stdin)
    }

    /// A token for ServiceAccount `namespace/name` from the TokenRequest API (`kubectl create
    /// token`, valid for an hour, audience [`ISSUER`]).
    pub fn service_account_token(&self, namespace: &str, name: &str) -> Result<String> {
        let token = self.kubectl_output(
            &["create", "token", name, "-n", namespace, "--duration=1h"],
            None,
        )?;
        Ok(token.trim().to_owned())
    }

    /// A kubeconfig whose only credential is a token of ServiceAccount `namespace/name` (see
    /// [`service_account_token`](Self::service_account_token)); the account must exist.
    pub fn kubeconfig_for_service_account(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let token = self.service_account_token(namespace, name)?;
        let path = self.dir.join(format!("sa-{namespace}-{name}.kubeconfig"));
        self.write_kubeconfig(&path, &format!("{namespace}-{name}"), &token)?;
        Ok(path)
    }

    /// The CA, the serving certificate, the ServiceAccount signing key, the audit policy, the
    /// token file and the admin kubeconfig.
    fn write_credentials(&self) -> Result<()> {
        let write = |name: &str, text: &str| {
            let p = self.dir.join(name);
            fs::write(&p, text).map_err(io_err(format!("writing {}", p.display())))
        };
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "rpclb test kube CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        write("ca.pem", &ca.self_signed(&ca_key)?.pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        write("apiserver.pem", &serving.signed_by(&key, &issuer)?.pem())?;
        write("apiserver-key.pem", &key.serialize_pem())?;

        let sa = KeyPair::generate()?;
        write("sa.key", &sa.serialize_pem())?;
        write("sa.pub", &sa.public_key_pem())?;

        write(
            "audit-policy.yaml",
            "apiVersion: audit.k8s.io/v1\n\
             kind: Policy\n\
             omitStages: [RequestReceived]\n\
             rules:\n\
             - level: Metadata\n",
        )?;

        let token = random_hex(16)?;
        write(
            "tokens.csv",
            &format!("{token},admin,admin,\"system:masters\"\n"),
        )?;
        self.write_kubeconfig(&self.admin_kubeconfig, "admin", &token)
    }

    /// A kubeconfig with this server, its CA (embedded) and one token user.
    fn write_kubeconfig(&self, path: &Path, user: &str, token: &str) -> Result<()> {
        let ca = fs::read(&self.ca_pem).map_err(io_err("reading ca.pem"))?;
        let ca = base64::engine::general_purpose::STANDARD.encode(ca);
        let url = &self.url;
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: rpclb-test\n  \
               cluster:\n    \
                 server: {url}\n    \
                 certificate-authority-data: {ca}\n\
             users:\n\
             - name: {user}\n  \
               user:\n    \
                 token: \"{token}\"\n\
             contexts:\n\
             - name: {user}\n  \
               context:\n    \
                 cluster: rpclb-test\n    \
                 user: {user}\n\
             current-context: {user}\n"
        );
        fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))
    }

    /// Records the children's pids, for `sweep_orphans` after a test process was killed.
    fn write_pids(&self) -> Result<()> {
        let text: String = self.pids().iter().map(|p| format!("{p}\n")).collect();
        fs::write(self.dir.join("pids"), text).map_err(io_err("writing pids"))
    }

    /// Polls `/readyz` (as the admin) until it answers ok, for at most [`READY_TIMEOUT`] from
    /// `t0`; a child that exits ends the wait at once.
    fn wait_ready(&mut self, t0: Instant) -> Result<()> {
        let mut last = "none yet".to_owned();
        loop {
            for (name, child) in [
                ("etcd", &mut self.etcd),
                ("kube-apiserver", &mut self.apiserver),
            ] {
                let Some(c) = child else { continue };
                if let Ok(Some(status)) = c.try_wait() {
                    let log_path = self.dir.join(format!("{name}.log"));
                    return Err(KubeFixtureError::Exited {
                        name,
                        status: status.to_string(),
                        log: log_tail(&log_path),
                        log_path: log_path.display().to_string(),
                    });
                }
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                let mut cmd = self.kubectl();
                cmd.args(["get", "--raw", "/readyz"]);
                match run_kubectl(cmd, &["get", "--raw", "/readyz"], None) {
                    Ok(out) if out.trim() == "ok" => return Ok(()),
                    Ok(out) => last = out.trim().to_owned(),
                    Err(e) => last = e.to_string(),
                }
            }
            if t0.elapsed() > READY_TIMEOUT {
                return Err(KubeFixtureError::NotReady {
                    secs: READY_TIMEOUT.as_secs(),
                    last,
                    etcd: log_tail(&self.dir.join("etcd.log")),
                    apiserver: log_tail(&self.dir.join("kube-apiserver.log")),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM, up to [`STOP_TIMEOUT`] for the process to exit, then SIGKILL; always reaped.
fn stop(mut child: Child) {
    // A child reaped already (try_wait saw it exit) has no pid of its own any more.
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    // SAFETY: kill(2) on our own unreaped child: the pid cannot have been reused.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts `cmd` with stdout and stderr to `dir/NAME.log` and no `ETCD_*` or `KUBECONFIG` from
/// the environment. It stays in this process group, so a Ctrl-C reaches it too.
fn spawn(cmd: &mut Command, dir: &Path, name: &str) -> Result<Child> {
    let log_path = dir.join(format!("{name}.log"));
    let log = fs::File::create(&log_path).map_err(io_err(format!("creating {name}.log")))?;
    let err = log.try_clone().map_err(io_err("dup log"))?;
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(io_err(format!("starting {}", cmd.get_program().display())))
}

fn run_kubectl(mut cmd: Command, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let what = || args.join(" ");
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!(
            "starting `kubectl {}` (is kubectl on PATH?)",
            what()
        )))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(io_err("writing kubectl's stdin"))?;
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child
        .wait_with_output()
        .map_err(io_err(format!("waiting for `kubectl {}`", what())))?;
    if !status.success() {
        return Err(KubeFixtureError::Kubectl {
            args: what(),
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// A new folder `$TMPDIR/rpclb-kube-<pid>-<n>`.
fn new_dir() -> Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
        }
    }
}

/// A file of the repository (`rel` from its root), for the tests that apply deploy/'s
/// manifests.
pub fn repo_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A free port on the host's loopback (free when asked; nothing holds it after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Three distinct free ports on 127.0.0.1 (held at once while they are chosen).
fn free_ports() -> Result<[u16; 3]> {
    let bind = || TcpListener::bind("127.0.0.1:0").map_err(io_err("binding 127.0.0.1:0"));
    let held = [bind()?, bind()?, bind()?];
    let mut ports = [0; 3];
    for (p, l) in ports.iter_mut().zip(&held) {
        *p = l.local_addr().map_err(io_err("local_addr"))?.port();
    }
    Ok(ports)
}

/// Kills what instances of a test process that died without its Drop (SIGKILL, a timeout)
/// left running, and removes their folders. A process is killed only while its command line
/// still names the folder, so a reused pid is left alone.
pub fn sweep_orphans() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let dir = e.path();
        let pids = fs::read_to_string(dir.join("pids")).unwrap_or_default();
        let dir_str = dir.display().to_string();
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir_str) {
                // SAFETY: kill(2) with a pid whose command line names the orphan's folder.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io_err("reading /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The last [`TAIL_LINES`] lines of a log file.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}
