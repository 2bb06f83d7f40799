//! `cargo xtask test-kernels`: the project's kernel tests on the kernels that Kubernetes
//! nodes run.
//!
//! Each Debian kernel boots under qemu (TCG; no network device at all) with the host's root
//! filesystem shared read-only over virtio-9p, and runs the test binaries already built on
//! the host, by their host paths:
//!
//! - `packet`: `datapath_packet`, which loads the programs and runs them with
//!   BPF_PROG_TEST_RUN (no attach);
//! - `packet6`: `datapath_packet6`, the same for the IPv6 programs (lb-ebpf/src/v6.rs);
//! - `lab-xdp`, `lab-xdp-generic`, `lab-tc`: `datapath_lab`'s tests of that attach mode, real
//!   TCP and UDP through the programs attached in a netns lab inside the guest;
//! - `agent`: the real `lb-agent` in a lab, `--mode auto` (TC on the lab's veths).
//!
//! The guest: a small initramfs per kernel (busybox-static, the kernel's own 9p, virtio, veth,
//! sch_ingress and cls_bpf modules with their dependencies from modules.dep, and [`INIT`])
//! mounts the host's `/` at /newroot, puts tmpfs on /tmp, /run, /var/tmp, /root and /dev/shm
//! and bpffs on /sys/fs/bpf, mounts the run folder (a second, writable 9p share) at
//! /run/rpclb-guest, and runs `run.sh` there chrooted. Each step writes `<step>.log` and
//! `<step>.status` ("<exit code> <milliseconds>") into the run folder, which is how the
//! results come back; the kernel's console goes to `console.log` beside them. The host's own
//! kernel runs the same `run.sh` directly when its image is not in /boot (this machine's is
//! not), or boots like the others when it is.
//!
//! Kernels come from Debian's archive (the `linux-image-*-amd64` that `linux-image-amd64`
//! points to in bookworm and bullseye, security updates included) through a private apt
//! sources list, lists and cache, so /etc/apt and /var/lib/apt stay as they are. Only the
//! kernel image and the modules the guest needs are kept, in
//! `${RPCLB_CACHE_DIR:-/var/cache/rpclb}/kernels/<release>_<version>/`; the file
//! `kernels/<codename>` names the one in use. A cached kernel is used without asking the
//! archive again (`--refresh` asks).

use crate::kube::{apt_install, missing_packages, tail};
use crate::setup::is_root;
use crate::{cargo, target_dir};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Debian release whose kernel the matrix boots.
struct Debian {
    /// Its name on the command line and in the table: the kernel's major.minor.
    name: &'static str,
    codename: &'static str,
}

const DEBIAN: &[Debian] = &[
    Debian {
        name: "6.1",
        codename: "bookworm",
    },
    Debian {
        name: "5.10",
        codename: "bullseye",
    },
];

/// Debian packages this needs: qemu, the static busybox of the initramfs, depmod (kmod;
/// Debian's kernel packages ship no modules.dep) and the archive keys.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "debian-archive-keyring",
];
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Modules the guest loads, with their dependencies: virtio-9p for the root and the run
/// folder, veth for the labs, sch_ingress (clsact) and cls_bpf for TC. Built-in ones are
/// skipped.
const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "veth",
    "sch_ingress",
    "cls_bpf",
];

/// The guest's qemu: TCG (KVM cannot run a guest on every machine this runs on), no network
/// device, the host's root read-only and the run folder writable, both over virtio-9p.
const QEMU: &str = "qemu-system-x86_64";
const KERNEL_CMDLINE: &str = "console=ttyS0 rdinit=/init panic=-1 quiet mitigations=off";
/// Folders of the host's / that the guest covers with tmpfs, so that tests can write there,
/// unless the workspace or a test binary lies inside one (the guest would not see it).
const TMPFS: &[&str] = &["/tmp", "/var/tmp", "/dev/shm"];
/// From qemu's start to the guest's `booted` mark. It takes about 25 s here.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// 9p message size: larger than the default 8 KiB, for the 100 MB test binaries.
const MSIZE: u32 = 262_144;

/// The guest's /init (busybox sh). It never returns: init exiting panics the kernel, which
/// powers qemu off too (panic=-1, -no-reboot).
const INIT: &str = r#"#!/bin/busybox sh
# rpclb kernel matrix guest (written by xtask/src/kernels.rs): load the modules, mount the
# host's / read-only over 9p with writable tmpfs where the tests write, run
# /run/rpclb-guest/run.sh chrooted into it, power off.
/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "rpclb-init: $*"; }
die() { say "$*"; poweroff -f; sleep 60; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say "kernel $(uname -r)"
for m in $(cat /modules/order); do
    insmod "/modules/$m" || die "insmod $m failed"
done
R=/newroot
O=/run/rpclb-guest
NINEP="trans=virtio,version=9p2000.L,msize=@MSIZE@"
mount -t 9p -o "$NINEP,ro,cache=loose" root $R || die "cannot mount the host's / (9p tag root)"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
# Writable tmpfs over the read-only root: /run always, and the folders in rpclb_tmpfs (from
# the kernel command line), which leave out any that holds the tests or the workspace.
for d in /run $(echo "$rpclb_tmpfs" | tr , ' '); do
    [ -d $R$d ] && mount -t tmpfs -o mode=1777 tmpfs $R$d
done
mount -t bpf bpf $R/sys/fs/bpf || die "cannot mount bpffs"
mkdir -p $R$O $R/run/rpclb-home $R/run/rpclb-tmp
export HOME=/run/rpclb-home
case ",$rpclb_tmpfs," in *,/tmp,*) ;; *) export TMPDIR=/run/rpclb-tmp ;; esac
mount -t 9p -o "$NINEP" out $R$O || die "cannot mount the run folder (9p tag out)"
cut -d' ' -f1 /proc/uptime > $R$O/booted
chroot $R /bin/sh $O/run.sh $O
echo $? > $R$O/exit
umount $R$O
poweroff -f
"#;

/// One test run in the guest.
#[derive(Clone, Copy)]
struct Step {
    name: &'static str,
    /// The integration test target (tests/tests/NAME.rs) of the rpclb-tests crate.
    target: &'static str,
    args: &'static [&'static str],
    /// Bounds this step in the guest (`timeout`); TCG runs tests 3-10x slower than the host.
    timeout_s: u64,
}

/// The whole matrix, per kernel.
const FULL: &[Step] = &[
    Step {
        name: "packet",
        target: "datapath_packet",
        args: &[],
        // 70 tests: 46 of them in 900 s on 6.1 under TCG at load 2-8 (2026-12-07).
        timeout_s: 1800,
    },
    Step {
        name: "packet6",
        target: "datapath_packet6",
        args: &[],
        // 48 tests (each XDP/TC x full/compat): 2,233 s on 5.10 under TCG at load 8-12.
        timeout_s: 3600,
    },
    Step {
        name: "lab-xdp",
        target: "datapath_lab",
        args: &["xdp_lab_", "xdp_on_pod_"],
        timeout_s: 300,
    },
    Step {
        name: "lab-xdp-generic",
        target: "datapath_lab",
        args: &["xdp_generic_lab_"],
        timeout_s: 300,
    },
    Step {
        name: "lab-tc",
        target: "datapath_lab",
        args: &["tc_lab_", "tc_netlink_lab_"],
        timeout_s: 300,
    },
    Step {
        name: "agent",
        target: "agent",
        args: &["--exact", "agent_starts_balances_and_counts"],
        timeout_s: 300,
    },
];

/// The short form that `cargo xtask test` runs on 6.1: [`SHORT_PACKET`] of the full set's
/// packet tests, one XDP lab and one TC lab.
const SHORT: &[Step] = &[
    Step {
        name: "packet",
        target: "datapath_packet",
        args: SHORT_PACKET,
        timeout_s: 600,
    },
    Step {
        name: "lab-xdp",
        target: "datapath_lab",
        args: &["--exact", "xdp_lab_balances_tcp_and_udp"],
        timeout_s: 300,
    },
    // TC on a kernel without TCX: `auto` attaches netlink filters.
    Step {
        name: "lab-tc",
        target: "datapath_lab",
        args: &["--exact", "tc_lab_balances_tcp_and_udp"],
        timeout_s: 300,
    },
];

/// The short step's packet tests: one of each feature, on the hook where it differs most
/// (both hooks for the main table). Each test loaded the whole program set then, 20-25 s of
/// verifier time under TCG (18 tests took 428 s of the step's 600 on a CI machine); a test
/// now loads only the programs it runs (`ProgramLoading::OnDemand`). The full matrix
/// (`cargo xtask test-kernels`) runs them all.
const SHORT_PACKET: &[&str] = &[
    "--exact",
    "xdp_main_table",
    "tc_main_table",
    "tc_checksum_table",
    "xdp_malformed",
    "xdp_collision_rewrite",
    "tc_one_insert_per_flow",
    "xdp_qos_limits",
    "xdp_first_fragment",
    "tc_reply_fragments",
    "xdp_fib_redirect_and_route_cache",
    "xdp_flow_cache_rules",
    "least_conn_avoids_loaded_backend",
];

/// Steps that must pass, per kernel (`*`: every step). A failure of any other step is
/// reported in the table but does not fail the run.
///
/// 5.10 runs the compat program set (`--bpf-programs auto`; lb-ebpf/src/set.rs). Its
/// veths drop a native XDP redirect into a veth whose peer has no XDP program (NAPI on the
/// peer through GRO came in 5.13), so there its `lab-xdp` checks that native XDP hands such
/// packets to the stack instead (`pass_xdp_target`).
const MUST_PASS: &[(&str, &str)] = &[("host", "*"), ("6.1", "*"), ("5.10", "*")];

/// Extra test arguments for one kernel's step. On 5.10 under TCG, XDP BPF_PROG_TEST_RUN
/// is far slower than on 6.1 (likely: 5.10 switches the XDP dispatcher on every test run,
/// which patches kernel text, and TCG pays for that), so the two tests of about 100,000
/// XDP runs each outlasted the step's 900 s while the TC ones of the same size finished;
/// they run on 6.1 and the host.
const EXTRA_ARGS: &[(&str, &str, &[&str])] = &[(
    "5.10",
    "packet",
    &[
        "--skip",
        "algorithm_spread",
        "--skip",
        "counters_exact_across_cpus",
    ],
)];

fn must_pass(kernel: &str, step: &str) -> bool {
    MUST_PASS
        .iter()
        .any(|&(k, s)| k == kernel && (s == "*" || s == step))
}

/// `cargo xtask test-kernels` options.
pub struct Options {
    pub short: bool,
    /// `6.1`, `5.10`, `host` (codenames work too); empty: all.
    pub kernels: Vec<String>,
    /// Ask the archive for newer kernels even when some are cached.
    pub refresh: bool,
    /// Replace the table in docs/operations.md with this run's.
    pub update_docs: bool,
    /// Only the steps of these names (empty: all).
    pub steps: Vec<String>,
    /// Multiplies every step's time bound: `cargo xtask test` runs the short matrix at idle
    /// priority beside the workspace tests, where the guest gets only the CPU they leave.
    pub timeout_factor: u64,
}

/// What a run of the matrix found.
pub struct Outcome {
    pub table: String,
    /// Failed steps that must pass, and kernels that did not boot.
    pub problems: Vec<String>,
}

/// `cargo xtask test-kernels`: builds the test binaries, runs the matrix, prints the table.
/// `cargo_args` are `cargo test`'s own arguments, so that the binaries are the ones a
/// `cargo test --workspace` with them just built.
pub fn run(root: &Path, opts: &Options, cargo_args: &[OsString]) -> Result<Outcome> {
    let p = prepare(root, opts, cargo_args)?;
    run_prepared(root, opts, &p)
}

/// What [`run_prepared`] boots: the kernels, the steps and their test binaries (built).
pub struct Prepared {
    kernels: Vec<String>,
    steps: Vec<Step>,
    bins: BTreeMap<String, PathBuf>,
}

/// Builds the test binaries (`cargo test --workspace --no-run`) and installs qemu if a
/// guest boots; nothing runs yet. Done before anything else holds cargo's build lock.
pub fn prepare(root: &Path, opts: &Options, cargo_args: &[OsString]) -> Result<Prepared> {
    let kernels = pick(&opts.kernels, opts.short)?;
    let all = if opts.short { SHORT } else { FULL };
    let steps: Vec<Step> = all
        .iter()
        .filter(|s| opts.steps.is_empty() || opts.steps.iter().any(|n| n == s.name))
        .map(|s| Step {
            timeout_s: s.timeout_s * opts.timeout_factor.max(1),
            ..*s
        })
        .collect();
    if steps.is_empty() {
        let names: Vec<&str> = all.iter().map(|s| s.name).collect();
        bail!(
            "no such step in the matrix; its steps: {}",
            names.join(", ")
        );
    }
    let bins = test_binaries(root, cargo_args, &steps)?;
    let boots_any = kernels.iter().any(|k| k != "host") || host_image().is_some();
    if boots_any {
        ensure_packages()?;
    }
    Ok(Prepared {
        kernels,
        steps,
        bins,
    })
}

/// Boots each kernel of `p` and runs its steps; the table and what failed.
pub fn run_prepared(root: &Path, opts: &Options, p: &Prepared) -> Result<Outcome> {
    let runs = target_dir(root).join("test-kernels");
    fs::create_dir_all(&runs).with_context(|| format!("creating {}", runs.display()))?;
    let mut results = Vec::new();
    for name in &p.kernels {
        let out = runs.join(name);
        let r = run_kernel(root, name, opts.refresh, &p.steps, &p.bins, &out)?;
        results.push(r);
    }
    let table = render(&results, opts.short);
    let problems: Vec<String> = results.iter().flat_map(KernelRun::problems).collect();
    fs::write(runs.join("matrix.md"), &table)?;
    if opts.update_docs {
        update_docs(&root.join("docs/operations.md"), &table)?;
    }
    Ok(Outcome { table, problems })
}

/// The kernels asked for, in the matrix's order, by their table name.
fn pick(asked: &[String], short: bool) -> Result<Vec<String>> {
    let all: Vec<&str> = std::iter::once("host")
        .chain(DEBIAN.iter().map(|d| d.name))
        .collect();
    if asked.is_empty() {
        return Ok(if short {
            vec!["6.1".into()]
        } else {
            all.iter().map(|s| s.to_string()).collect()
        });
    }
    let mut out = Vec::new();
    for a in asked {
        let name = DEBIAN
            .iter()
            .find(|d| d.codename == a)
            .map_or(a.as_str(), |d| d.name);
        if !all.contains(&name) {
            bail!("unknown kernel {a:?} (expected one of {})", all.join(", "));
        }
        if !out.iter().any(|o| o == name) {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

fn ensure_packages() -> Result<()> {
    let missing = missing_packages(PACKAGES)?;
    if !missing.is_empty() {
        apt_install("test-kernels", &missing)?;
    }
    Ok(())
}

/// Whether everything a guest run needs is here already, without installing or fetching:
/// the packages and a cached 6.1. `cargo xtask test` without root uses this to decide
/// between running the short form and skipping it.
pub fn ready_without_root() -> bool {
    missing_packages(PACKAGES).is_ok_and(|m| m.is_empty())
        && cached(&DEBIAN[0]).is_some_and(|k| k.is_complete())
}

// ---- the test binaries ----

/// `cargo test --workspace --no-run` (a no-op right after `cargo test --workspace`), and the
/// executables of the steps' test targets.
fn test_binaries(
    root: &Path,
    cargo_args: &[OsString],
    steps: &[Step],
) -> Result<BTreeMap<String, PathBuf>> {
    // cargo test's own arguments: what comes before `--`, without test name filters.
    let own: Vec<&OsString> = cargo_args.iter().take_while(|a| *a != "--").collect();
    let mut cmd = cargo(root);
    cmd.args(["test", "--workspace", "--no-run"])
        .args(own)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped());
    println!("test-kernels: building the test binaries (cargo test --workspace --no-run)");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("cargo test --no-run failed ({})", out.status);
    }
    let mut bins = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let target = &v["target"];
        let is_test = target["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if v["reason"] != "compiler-artifact" || !is_test {
            continue;
        }
        if let (Some(name), Some(exe)) = (target["name"].as_str(), v["executable"].as_str()) {
            bins.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    for s in steps {
        if !bins.contains_key(s.target) {
            bail!(
                "cargo test --no-run built no test target {} (rpclb-tests)",
                s.target
            );
        }
    }
    // The agent step runs target/<profile>/lb-agent, which `cargo test --workspace` builds.
    if steps.iter().any(|s| s.target == "agent") {
        let agent = bins["agent"]
            .parent()
            .and_then(Path::parent)
            .map(|p| p.join("lb-agent"));
        if !agent.as_deref().is_some_and(Path::is_file) {
            bail!("no lb-agent beside the test binaries: {agent:?}");
        }
    }
    Ok(bins)
}

// ---- the kernels ----

/// A kernel ready to boot: its image and the modules the guest loads.
struct Kernel {
    /// `uname -r`.
    release: String,
    /// What the table says about where it comes from.
    origin: String,
    vmlinuz: PathBuf,
    /// A `lib/modules/<release>` tree with modules.dep (possibly only the guest's modules).
    modules: PathBuf,
}

/// A cached Debian kernel's folder.
struct Cached {
    dir: PathBuf,
}

impl Cached {
    fn is_complete(&self) -> bool {
        self.dir.join("stamp").is_file()
    }

    fn stamp(&self, key: &str) -> Option<String> {
        let s = fs::read_to_string(self.dir.join("stamp")).ok()?;
        s.lines()
            .find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(": ")?.to_string()))
    }

    fn kernel(&self, codename: &str) -> Result<Kernel> {
        let release = self.stamp("release").context("stamp without release")?;
        let version = self.stamp("version").unwrap_or_default();
        Ok(Kernel {
            origin: format!("Debian {codename}, linux-image-{release} {version}"),
            vmlinuz: self.dir.join("vmlinuz"),
            modules: self.dir.join("modules"),
            release,
        })
    }
}

/// `${RPCLB_CACHE_DIR:-/var/cache/rpclb}/kernels`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("RPCLB_CACHE_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/rpclb"), PathBuf::from)
        .join("kernels")
}

/// The cached kernel that `kernels/<codename>` names, complete or not.
fn cached(d: &Debian) -> Option<Cached> {
    let cache = cache_dir();
    let name = fs::read_to_string(cache.join(d.codename)).ok()?;
    let name = name.trim();
    (!name.is_empty() && !name.contains('/')).then(|| Cached {
        dir: cache.join(name),
    })
}

/// The Debian kernel, from the cache or fetched into it.
fn debian_kernel(d: &Debian, refresh: bool) -> Result<Kernel> {
    if !refresh && let Some(c) = cached(d).filter(Cached::is_complete) {
        return c.kernel(d.codename);
    }
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| {
        format!(
            "cannot create {} (set RPCLB_CACHE_DIR to a writable folder)",
            cache.display()
        )
    })?;
    let lock = File::create(cache.join(".lock"))?;
    lock.lock()
        .with_context(|| format!("locking {}/.lock", cache.display()))?;
    // Another run may have fetched it while this one waited.
    if !refresh && let Some(c) = cached(d).filter(Cached::is_complete) {
        return c.kernel(d.codename);
    }
    let t = Instant::now();
    let dir = fetch(d, &cache)?;
    // Point `kernels/<codename>` at it: written beside, renamed over.
    let ptr = cache.join(format!(".{}.new", d.codename));
    fs::write(
        &ptr,
        format!("{}\n", dir.file_name().unwrap().to_string_lossy()),
    )?;
    fs::rename(&ptr, cache.join(d.codename))?;
    println!(
        "[{}] kernel ready in {:.1} s: {}",
        d.name,
        t.elapsed().as_secs_f64(),
        dir.display()
    );
    Cached { dir }.kernel(d.codename)
}

/// Resolves `linux-image-amd64` in the release's archive, and unless that version is cached
/// already, downloads and unpacks it into a staging folder, keeps the image and the guest's
/// modules, and renames the result into place. The caller holds the lock.
fn fetch(d: &Debian, cache: &Path) -> Result<PathBuf> {
    // What a killed fetch left behind (this one holds the lock).
    for e in fs::read_dir(cache)?.flatten() {
        if e.file_name().to_string_lossy().starts_with(".fetch-") {
            fs::remove_dir_all(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    if !is_root() {
        bail!(
            "fetching Debian {}'s kernel needs root (apt-get, into {})",
            d.codename,
            cache.display()
        );
    }
    let work = cache.join(format!(".fetch-{}", d.codename));
    let r = fetch_in(d, cache, &work);
    let _ = fs::remove_dir_all(&work); // the unpacked package: 300-400 MB
    r
}

fn fetch_in(d: &Debian, cache: &Path, work: &Path) -> Result<PathBuf> {
    let step = |what: &str| println!("[{}] {what}", d.name);
    let apt = work.join("apt");
    for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        fs::create_dir_all(apt.join(sub))?;
    }
    let mirror = std::env::var("RPCLB_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "http://deb.debian.org".into());
    let c = d.codename;
    let sources = format!(
        "deb [signed-by={KEYRING}] {mirror}/debian {c} main\n\
         deb [signed-by={KEYRING}] {mirror}/debian {c}-updates main\n\
         deb [signed-by={KEYRING}] {mirror}/debian-security {c}-security main\n"
    );
    fs::write(apt.join("sources.list"), sources)?;
    let opts: Vec<String> = vec![
        format!(
            "-oDir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        format!(
            "-oDir::Etc::SourceParts={}",
            apt.join("sources.list.d").display()
        ),
        format!("-oDir::State::Lists={}", apt.join("lists").display()),
        format!("-oDir::Cache={}", apt.join("cache").display()),
        // Nothing installed as far as this apt knows: the host's packages are another release.
        "-oDir::State::status=/dev/null".into(),
        // Downloads into a root-owned folder; apt's sandbox user could not write there.
        "-oAPT::Sandbox::User=root".into(),
        "-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
        "-oAcquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
        "-oAcquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
        "-oAcquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false".into(),
    ];
    let t = Instant::now();
    step(&format!(
        "fetching Debian {c}'s kernel (private apt lists: {mirror}/debian {c}, {c}-updates, {c}-security)"
    ));
    quiet(Command::new("apt-get").args(&opts).args(["-q", "update"]))?;
    // linux-image-amd64's candidate depends on exactly one ABI package.
    let deps = quiet(
        Command::new("apt-cache")
            .args(&opts)
            .args(["depends", "linux-image-amd64"]),
    )?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .with_context(|| format!("linux-image-amd64 in {c} depends on no linux-image: {deps}"))?
        .to_string();
    let show =
        quiet(
            Command::new("apt-cache")
                .args(&opts)
                .args(["show", "--no-all-versions", &pkg]),
        )?;
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .with_context(|| format!("apt-cache show {pkg}: no Version"))?
        .trim()
        .to_string();
    let release = pkg.trim_start_matches("linux-image-").to_string();
    let name = format!("{release}_{version}");
    let dir = cache.join(&name);
    if dir.join("stamp").is_file() {
        step(&format!("{pkg} {version} is cached already"));
        return Ok(dir);
    }
    step(&format!("downloading {pkg} {version}"));
    quiet(Command::new("apt-get").current_dir(work).args(&opts).args([
        "-q",
        "download",
        &format!("{pkg}={version}"),
    ]))?;
    let deb = fs::read_dir(work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let fetched = t.elapsed();
    let t = Instant::now();
    let tree = work.join("root");
    quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    fs::remove_file(&deb)?;
    // Debian's package has no modules.dep: its postinst runs depmod.
    quiet(Command::new(depmod()).arg("-b").arg(&tree).arg(&release))?;
    let src = tree.join("lib/modules").join(&release);
    let staged = cache.join(format!(".fetch-{c}-out"));
    let _ = fs::remove_dir_all(&staged);
    let dst = staged.join("modules");
    fs::create_dir_all(&dst)?;
    for f in ["modules.dep", "modules.builtin", "modules.order"] {
        fs::copy(src.join(f), dst.join(f)).with_context(|| format!("copying {f}"))?;
    }
    let closure = module_closure(&src)?;
    for m in &closure {
        let to = dst.join(m);
        fs::create_dir_all(to.parent().unwrap())?;
        fs::copy(src.join(m), &to).with_context(|| format!("copying {m}"))?;
    }
    fs::copy(
        tree.join(format!("boot/vmlinuz-{release}")),
        staged.join("vmlinuz"),
    )
    .context("the package has no /boot/vmlinuz")?;
    fs::copy(
        tree.join(format!("boot/config-{release}")),
        staged.join("config"),
    )?;
    fs::write(
        staged.join("stamp"),
        format!(
            "package: {pkg}\nversion: {version}\nrelease: {release}\nsuite: {c}\n\
             modules: {}\nfetched in: {:.1} s, unpacked in {:.1} s\n",
            closure.join(" "),
            fetched.as_secs_f64(),
            t.elapsed().as_secs_f64()
        ),
    )?;
    let _ = fs::remove_dir_all(&dir); // a folder without its stamp
    fs::rename(&staged, &dir)
        .with_context(|| format!("moving the kernel into {}", dir.display()))?;
    step(&format!(
        "{pkg} {version}: downloaded in {:.1} s, unpacked in {:.1} s",
        fetched.as_secs_f64(),
        t.elapsed().as_secs_f64()
    ));
    Ok(dir)
}

fn depmod() -> &'static str {
    ["/usr/sbin/depmod", "/sbin/depmod"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("depmod")
}

/// [`MODULES`] and everything they depend on, dependencies first (load order), as paths
/// relative to the modules tree; built-in modules are left out.
fn module_closure(modules: &Path) -> Result<Vec<String>> {
    let dep = fs::read_to_string(modules.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", modules.display()))?;
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    closure_of(&dep, &builtin, MODULES)
}

/// The module name of a path: `kernel/fs/9p/9p.ko.xz` → `9p`; `-` and `_` are one.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn closure_of(dep: &str, builtin: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let deps: BTreeMap<&str, Vec<&str>> = dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m.trim(), d.split_whitespace().collect()))
        })
        .collect();
    let by_name: BTreeMap<String, &str> = deps.keys().map(|p| (module_name(p), *p)).collect();
    let builtin: Vec<String> = builtin.lines().map(module_name).collect();
    fn visit<'a>(m: &'a str, deps: &BTreeMap<&'a str, Vec<&'a str>>, out: &mut Vec<String>) {
        if out.iter().any(|o| o == m) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, out);
        }
        out.push(m.to_string());
    }
    let mut out = Vec::new();
    for w in wanted {
        let w = w.replace('-', "_");
        match by_name.get(&w) {
            Some(p) => visit(p, &deps, &mut out),
            None if builtin.contains(&w) => {}
            None => bail!("module {w} is neither in modules.dep nor built in"),
        }
    }
    for m in &out {
        if m.ends_with(".ko.xz") || m.ends_with(".ko.zst") || m.ends_with(".ko.gz") {
            bail!("{m} is compressed; busybox insmod loads plain .ko files only");
        }
    }
    Ok(out)
}

/// The host kernel's image and modules, when both are installed.
fn host_image() -> Option<Kernel> {
    let release = uname_r();
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    let modules = PathBuf::from(format!("/lib/modules/{release}"));
    (vmlinuz.is_file() && modules.join("modules.dep").is_file()).then(|| Kernel {
        origin: "the host's kernel, booted".into(),
        vmlinuz,
        modules,
        release,
    })
}

fn uname_r() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

// ---- the initramfs ----

/// Writes the guest's initramfs (a newc cpio, uncompressed): busybox, [`INIT`] and the
/// modules in load order.
fn build_initramfs(k: &Kernel, path: &Path) -> Result<()> {
    let closure = module_closure(&k.modules)?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .context("no busybox (apt-get install busybox-static)")?;
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        c.dir(d);
    }
    c.node("dev/console", 0o020600, (5, 1));
    c.file("bin/busybox", 0o755, &fs::read(busybox)?);
    c.file(
        "init",
        0o755,
        INIT.replace("@MSIZE@", &MSIZE.to_string()).as_bytes(),
    );
    let mut order = String::new();
    for m in &closure {
        let name = m.rsplit('/').next().unwrap();
        c.file(
            &format!("modules/{name}"),
            0o644,
            &fs::read(k.modules.join(m))?,
        );
        order.push_str(name);
        order.push('\n');
    }
    c.file("modules/order", 0o644, order.as_bytes());
    fs::write(path, c.finish())?;
    Ok(())
}

/// A cpio archive in the kernel's initramfs format ("newc").
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn node(&mut self, name: &str, mode: u32, rdev: (u32, u32)) {
        self.entry(name, mode, rdev, &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

// ---- one kernel's run ----

/// The script that runs the steps, in the guest (chrooted into the host's /) or on the host.
/// Its argument is the run folder.
fn run_script(
    root: &Path,
    kernel: &str,
    steps: &[Step],
    bins: &BTreeMap<String, PathBuf>,
) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# Written by cargo xtask test-kernels (xtask/src/kernels.rs).\nO=$1\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         # Tests that cannot run fail instead of skipping; the agent binary is built already.\n\
         export RPCLB_REQUIRE_PRIVILEGES=1 RPCLB_BINS_BUILT=1\n\
         # TCG: an agent loads its whole program set in 30-90 s (30 s on the host's clock).\n\
         export RPCLB_READY_TIMEOUT_S=240\n\
         unset CARGO\n",
    );
    let _ = writeln!(s, "cd '{}' || exit 1", root.display());
    s.push_str(
        "step() {\n    name=$1; secs=$2; shift 2\n    t0=$(date +%s%N)\n    \
         timeout -k 10 \"$secs\" \"$@\" > \"$O/$name.log\" 2>&1\n    rc=$?\n    \
         t1=$(date +%s%N)\n    echo \"$rc $(( (t1 - t0) / 1000000 ))\" > \"$O/$name.status.new\"\n    \
         mv \"$O/$name.status.new\" \"$O/$name.status\"\n}\n",
    );
    for st in steps {
        let _ = write!(
            s,
            "step {} {} '{}'",
            st.name,
            st.timeout_s,
            bins[st.target].display()
        );
        let extra = EXTRA_ARGS
            .iter()
            .filter(|(k, step, _)| *k == kernel && *step == st.name)
            .flat_map(|(_, _, args)| args.iter());
        for a in st.args.iter().chain(extra) {
            let _ = write!(s, " '{a}'");
        }
        s.push('\n');
    }
    s
}

/// What one kernel did.
struct KernelRun {
    name: String,
    release: String,
    origin: String,
    /// Why it did not boot or did not finish, with the console's end.
    broken: Option<String>,
    steps: Vec<StepResult>,
}

impl KernelRun {
    fn step(&self, name: &str) -> Option<&StepResult> {
        self.steps.iter().find(|s| s.name == name)
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(b) = &self.broken {
            p.push(format!("{} ({}): {b}", self.name, self.release));
        }
        for s in &self.steps {
            if must_pass(&self.name, s.name) && !s.passed() {
                p.push(format!(
                    "{} ({}): {} must pass and failed: {}",
                    self.name,
                    self.release,
                    s.name,
                    s.first_error.as_deref().unwrap_or("(no error found)")
                ));
            }
        }
        p
    }
}

fn run_kernel(
    root: &Path,
    name: &str,
    refresh: bool,
    steps: &[Step],
    bins: &BTreeMap<String, PathBuf>,
    out: &Path,
) -> Result<KernelRun> {
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    fs::create_dir_all(out)?;
    let script = out.join("run.sh");
    fs::write(&script, run_script(root, name, steps, bins))?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    let kernel = match name {
        "host" => host_image(),
        _ => {
            let d = DEBIAN.iter().find(|d| d.name == name).unwrap();
            Some(debian_kernel(d, refresh)?)
        }
    };
    let budget: u64 = steps.iter().map(|s| s.timeout_s + 15).sum();
    let mut run = KernelRun {
        name: name.to_string(),
        release: String::new(),
        origin: String::new(),
        broken: None,
        steps: Vec::new(),
    };
    let _guard = RunLock::take()?;
    let t0 = Instant::now();
    match kernel {
        None => {
            run.release = uname_r();
            run.origin = "the host's kernel, run directly (no image of it in /boot)".into();
            println!("[{name}] running on the host ({}), no guest", run.release);
            let mut child = Command::new("/bin/sh")
                .arg(&script)
                .arg(out)
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start /bin/sh")?;
            let deadline = Instant::now() + Duration::from_secs(budget);
            if !wait(&mut child, deadline, name, steps, out, None)? {
                run.broken = Some(format!("did not finish in {budget} s"));
            }
        }
        Some(k) => {
            run.release = k.release.clone();
            run.origin = k.origin.clone();
            let t = Instant::now();
            let initramfs = out.join("initramfs.cpio");
            build_initramfs(&k, &initramfs)?;
            println!(
                "[{name}] initramfs built in {:.2} s; booting {} under qemu (TCG, no network device)",
                t.elapsed().as_secs_f64(),
                k.release
            );
            // What the guest must see of the host's / : the workspace, the run folder and
            // the test binaries.
            let seen: Vec<&Path> = [root, out]
                .into_iter()
                .chain(bins.values().map(PathBuf::as_path))
                .collect();
            let tmpfs: Vec<&str> = TMPFS
                .iter()
                .copied()
                .filter(|d| !seen.iter().any(|p| p.starts_with(d)))
                .collect();
            if seen.iter().any(|p| p.starts_with("/run")) {
                bail!(
                    "the guest covers /run with tmpfs: move the workspace and its target dir out of /run"
                );
            }
            run.broken = boot(&k, &tmpfs, out, &initramfs, name, steps, budget)?;
        }
    }
    for st in steps {
        run.steps.push(StepResult::read(st.name, out));
    }
    println!(
        "[{name}] done in {:.1} s; logs in {}",
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(run)
}

/// Boots `k` and waits for the run to end; `Some(why)` when it did not boot or finish.
fn boot(
    k: &Kernel,
    tmpfs: &[&str],
    out: &Path,
    initramfs: &Path,
    name: &str,
    steps: &[Step],
    budget: u64,
) -> Result<Option<String>> {
    let console = out.join("console.log");
    let mut cmd = Command::new(QEMU);
    cmd.args(["-machine", "q35", "-accel", "tcg", "-cpu", "max"])
        .args(["-m", "2048", "-smp", "2"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-nic", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!("{KERNEL_CMDLINE} rpclb_tmpfs={}", tmpfs.join(",")))
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=out,security_model=none,multidevs=remap",
            out.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(out.join("qemu.log"))?);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {QEMU}"))?;
    let t = Instant::now();
    let deadline = t + BOOT_TIMEOUT + Duration::from_secs(budget);
    let finished = wait(&mut child, deadline, name, steps, out, Some(t))?;
    let console_tail = || {
        let c = fs::read_to_string(&console).unwrap_or_default();
        let q = fs::read_to_string(out.join("qemu.log")).unwrap_or_default();
        format!("{}\n{}", tail(&c, 15), tail(&q, 5))
            .trim()
            .to_string()
    };
    if !out.join("booted").exists() {
        let why = if finished {
            "qemu exited before the guest's init ran".to_string()
        } else {
            format!("no guest init within {} s", BOOT_TIMEOUT.as_secs())
        };
        return Ok(Some(format!(
            "did not boot ({why}); console:\n{}",
            console_tail()
        )));
    }
    if !finished || !out.join("exit").exists() {
        return Ok(Some(format!(
            "the guest did not finish in {} s; console:\n{}",
            budget,
            console_tail()
        )));
    }
    Ok(None)
}

/// Waits for `child` until `deadline` (killing it then; also when a guest has not booted in
/// [`BOOT_TIMEOUT`]), printing each step's result as its status appears. `true` when it
/// ended by itself.
fn wait(
    child: &mut Child,
    deadline: Instant,
    name: &str,
    steps: &[Step],
    out: &Path,
    boot_start: Option<Instant>,
) -> Result<bool> {
    let mut shown = 0;
    let mut booted = boot_start.is_none();
    loop {
        if !booted && out.join("booted").exists() {
            booted = true;
            let t = boot_start.unwrap().elapsed();
            println!("[{name}] booted in {:.1} s", t.as_secs_f64());
        }
        while shown < steps.len() && out.join(format!("{}.status", steps[shown].name)).exists() {
            let r = StepResult::read(steps[shown].name, out);
            println!("[{name}] {}", r.summary());
            shown += 1;
        }
        if let Some(status) = child.try_wait()? {
            let _ = status;
            return Ok(true);
        }
        let late_boot = boot_start.is_some_and(|t| !booted && t.elapsed() > BOOT_TIMEOUT);
        if Instant::now() > deadline || late_boot {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One guest run at a time on this machine (each takes the CPUs it is given).
struct RunLock(#[allow(dead_code)] File);

impl RunLock {
    fn take() -> Result<Self> {
        let dir = cache_dir();
        let path = if fs::create_dir_all(&dir).is_ok() {
            dir.join(".run-lock")
        } else {
            std::env::temp_dir().join("rpclb-test-kernels.lock")
        };
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        if f.try_lock().is_err() {
            println!("test-kernels: waiting for another run ({})", path.display());
            f.lock()?;
        }
        Ok(RunLock(f))
    }
}

// ---- results ----

struct StepResult {
    name: &'static str,
    /// The exit code and milliseconds, when the step finished.
    status: Option<(i32, u64)>,
    /// libtest's `test NAME ... ok|FAILED` lines, in order.
    tests: Vec<(String, bool)>,
    first_error: Option<String>,
    /// Where the first panic happened.
    panicked_at: Option<String>,
}

impl StepResult {
    fn read(name: &'static str, out: &Path) -> StepResult {
        let status = fs::read_to_string(out.join(format!("{name}.status")))
            .ok()
            .and_then(|s| {
                let mut f = s.split_whitespace();
                Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            });
        let log = read_lossy(&out.join(format!("{name}.log")));
        let tests = test_lines(&log);
        let panic = first_panic_at(&log);
        let first_error = match status {
            Some((0, _)) => None,
            Some((124 | 137, ms)) => Some(format!(
                "timed out after {} s; last output: {}",
                ms / 1000,
                tail(&log, 5)
            )),
            _ => panic
                .as_ref()
                .map(|(_, m)| m.clone())
                .or_else(|| {
                    (!log.trim().is_empty())
                        .then(|| format!("no panic found; output ends: {}", tail(&log, 5)))
                })
                .or_else(|| Some("did not run".into())),
        };
        StepResult {
            name,
            status,
            tests,
            panicked_at: panic.filter(|_| first_error.is_some()).map(|(a, _)| a),
            first_error,
        }
    }

    /// The first error as the table's notes show it: where it panicked, then the message.
    fn verbatim(&self) -> String {
        let e = self.first_error.as_deref().unwrap_or("");
        match &self.panicked_at {
            Some(at) => format!("{} (panicked at {at}):\n{}", self.name, shorten(e)),
            None => format!("{}:\n{}", self.name, shorten(e)),
        }
    }

    /// The error without what differs between runs of the same failure (interface names,
    /// times), to say "the same" once.
    fn key(&self) -> String {
        let e = self.first_error.as_deref().unwrap_or("");
        cell(e)
            .split('"')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, p)| p)
            .collect()
    }

    fn passed(&self) -> bool {
        matches!(self.status, Some((0, _))) && !self.tests.is_empty()
    }

    fn counts(&self) -> (usize, usize) {
        let ok = self.tests.iter().filter(|(_, ok)| *ok).count();
        (ok, self.tests.len())
    }

    fn summary(&self) -> String {
        let (ok, n) = self.counts();
        let secs = self.status.map_or(String::new(), |(_, ms)| {
            format!(", {:.1} s", ms as f64 / 1000.0)
        });
        if self.passed() {
            format!("{}: ok ({ok}/{n} tests{secs})", self.name)
        } else {
            format!(
                "{}: FAILED ({ok}/{n} tests{secs}): {}",
                self.name,
                cell(self.first_error.as_deref().unwrap_or(""))
            )
        }
    }
}

fn read_lossy(p: &Path) -> String {
    let mut b = Vec::new();
    if let Ok(mut f) = File::open(p) {
        let _ = f.read_to_end(&mut b);
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// libtest's per-test result lines.
fn test_lines(log: &str) -> Vec<(String, bool)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("test ")?;
            let (name, verdict) = rest.rsplit_once(" ... ")?;
            match verdict.trim() {
                "ok" => Some((name.to_string(), true)),
                "FAILED" => Some((name.to_string(), false)),
                _ => None,
            }
        })
        .collect()
}

/// Where the first panic happened (`file:line:col`), and its message.
fn first_panic_at(log: &str) -> Option<(String, String)> {
    let mut lines = log.lines();
    let head = lines.find(|l| l.starts_with("thread '") && l.contains("panicked at"))?;
    let at = head
        .split_once("panicked at ")
        .map_or("", |(_, a)| a)
        .trim_end_matches(':')
        .to_string();
    let msg: Vec<&str> = lines
        .take_while(|l| {
            !(l.is_empty()
                || l.starts_with("note: ")
                || l.starts_with("stack backtrace:")
                || l.starts_with("thread '")
                || l.starts_with("---- "))
        })
        .collect();
    Some((at, msg.join("\n")))
}

/// A tracing log line: `2026-12-04T19:03:09.399098Z  INFO ...`.
fn is_log(l: &str) -> bool {
    l.len() > 20 && l.as_bytes()[4] == b'-' && l.contains("Z ")
}

/// When a message is a program's log: its first warning or error line.
fn log_warning(err: &str) -> Option<&str> {
    if !err.lines().next().is_some_and(is_log) {
        return None;
    }
    err.lines()
        .find(|l| is_log(l) && (l.contains(" WARN ") || l.contains(" ERROR ")))
}

/// One line for a table cell: the error's first line, and for a verifier log, the line that
/// says why (the last before the verifier's statistics).
fn cell(err: &str) -> String {
    let mut lines = err.lines();
    let first = lines.next().unwrap_or("").trim();
    let mut s = first.to_string();
    // A message that is a program's log (tracing lines: `2026-...Z  INFO ...`): its first
    // warning or error says why.
    if let Some(w) = log_warning(err) {
        s = format!("(log) {}", w.split_once("Z ").map_or(w, |(_, r)| r).trim());
    }
    if first.contains("verifier_log:") {
        let rest: Vec<&str> = lines.collect();
        let why = rest.iter().rev().find(|l| {
            let l = l.trim();
            !(l.is_empty()
                || l.starts_with("verification time")
                || l.starts_with("stack depth")
                || l.starts_with("processed ")
                || l.starts_with('}'))
        });
        if let Some(w) = why {
            let _ = write!(s, " … {}", w.trim());
        }
    }
    const MAX: usize = 300;
    if s.chars().count() > MAX {
        s = s.chars().take(MAX).collect::<String>() + "…";
    }
    s.replace('|', "\\|")
}

/// One row of the table: a kernel in one mode.
struct Row<'a> {
    loads: &'static str,
    attaches: &'static str,
    traffic: &'static str,
    tests: String,
    /// The first error and its step.
    error: Option<&'a StepResult>,
}

/// What a lab step and the packet tests of its hook say about one mode.
fn mode_row<'a>(run: &'a KernelRun, lab: &str, hook_prefix: &str) -> Option<Row<'a>> {
    let lab = run.step(lab);
    let packet = run.step("packet");
    let hook_tests: Vec<&(String, bool)> = packet
        .map(|p| {
            p.tests
                .iter()
                .filter(|(n, _)| n.starts_with(hook_prefix))
                .collect()
        })
        .unwrap_or_default();
    let packet_load_error = packet.filter(|p| {
        p.first_error
            .as_deref()
            .is_some_and(|e| e.starts_with("load data path"))
    });
    if lab.is_none() && packet.is_none() {
        return None;
    }
    let lab_err = lab.filter(|l| l.first_error.is_some());
    let lab_says = |p: &str| {
        lab_err
            .and_then(|l| l.first_error.as_deref())
            .is_some_and(|e| e.starts_with(p))
    };
    let load_failed = packet_load_error.is_some() || lab_says("load");
    let attach_failed = lab_says("attach");
    let lab_ok = lab.is_some_and(StepResult::passed);
    let packet_ok = hook_tests.iter().all(|(_, ok)| *ok) && !hook_tests.is_empty();
    let mut tests = Vec::new();
    if !hook_tests.is_empty() {
        let ok = hook_tests.iter().filter(|(_, ok)| *ok).count();
        tests.push(format!("packet {ok}/{}", hook_tests.len()));
    }
    if let Some(l) = lab {
        let (ok, n) = l.counts();
        tests.push(format!("lab {ok}/{n}"));
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let (loads, attaches, traffic) = match lab {
        _ if load_failed => ("no", "-", "-"),
        None => (yes_no(packet_ok), "(not run)", "(not run)"),
        Some(_) if attach_failed => ("yes", "no", "-"),
        Some(_) => ("yes", "yes", yes_no(lab_ok)),
    };
    let error = if load_failed {
        packet_load_error.or(lab_err)
    } else {
        lab_err.or_else(|| packet.filter(|_| !packet_ok))
    };
    Some(Row {
        loads,
        attaches,
        traffic,
        tests: tests.join(", "),
        error,
    })
}

/// The table (markdown), with each failure's first error in full below it.
fn render(runs: &[KernelRun], short: bool) -> String {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Kernel matrix of {date} (`cargo xtask test-kernels{}`): the guests boot under qemu \
         (TCG) with the host's / over 9p.\n",
        if short { " --short" } else { "" },
    );
    s.push_str(
        "| kernel | mode | loads | attaches | passes traffic | tests passed | first error |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut errors = Vec::new();
    for r in runs {
        let kernel = format!("{} ({})", r.name, r.release);
        if let Some(b) = &r.broken {
            let first = b.lines().next().unwrap_or("");
            let _ = writeln!(s, "| {kernel} | (all) | - | - | - | - | {} |", cell(first));
            errors.push((kernel.clone(), b.clone(), b.clone()));
            // Steps that never ran say nothing more.
            if r.steps.iter().all(|st| st.status.is_none()) {
                continue;
            }
        }
        let modes = [
            ("xdp", "lab-xdp", "xdp_"),
            ("xdp-generic", "lab-xdp-generic", "xdp_"),
            ("tc", "lab-tc", "tc_"),
        ];
        for (mode, lab, prefix) in modes {
            // Without its lab, xdp-generic would only repeat xdp's packet tests.
            if mode == "xdp-generic" && r.step(lab).is_none() {
                continue;
            }
            let Some(row) = mode_row(r, lab, prefix) else {
                continue;
            };
            let err = row
                .error
                .and_then(|e| e.first_error.as_deref())
                .map(cell)
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "| {kernel} | {mode} | {} | {} | {} | {} | {err} |",
                row.loads, row.attaches, row.traffic, row.tests
            );
            if let Some(e) = row.error {
                errors.push((format!("{kernel}, {mode}"), e.verbatim(), e.key()));
            }
        }
        if let Some(a) = r.step("agent") {
            let (ok, n) = a.counts();
            let err = a.first_error.as_deref().map(cell).unwrap_or_default();
            let _ = writeln!(
                s,
                "| {kernel} | lb-agent `--mode auto` (TC on veth) | | | {} | agent {ok}/{n} | {err} |",
                if a.passed() { "yes" } else { "no" }
            );
            if a.first_error.is_some() {
                errors.push((
                    format!("{kernel}, lb-agent --mode auto"),
                    a.verbatim(),
                    a.key(),
                ));
            }
        }
        if let Some(p) = r.step("packet") {
            let (ok, n) = p.counts();
            let _ = writeln!(
                s,
                "| {kernel} | packet tests (load + BPF_PROG_TEST_RUN) | {} | | | packet {ok}/{n} | {} |",
                if p.first_error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("load data path"))
                {
                    "no"
                } else {
                    "yes"
                },
                p.first_error.as_deref().map(cell).unwrap_or_default()
            );
        }
        if let Some(p) = r.step("packet6") {
            let (ok, n) = p.counts();
            let _ = writeln!(
                s,
                "| {kernel} | IPv6 packet tests (load + BPF_PROG_TEST_RUN) | | | | packet6 {ok}/{n} | {} |",
                p.first_error.as_deref().map(cell).unwrap_or_default()
            );
        }
    }
    s.push('\n');
    for r in runs {
        let _ = writeln!(s, "- {} ({}): {}", r.name, r.release, r.origin);
    }
    let mut seen: Vec<&str> = Vec::new();
    if !errors.is_empty() {
        s.push_str(
            "\nFirst errors, verbatim (a verifier log is cut to its first and last lines):\n",
        );
        for (what, e, key) in &errors {
            if seen.contains(&key.as_str()) {
                let _ = writeln!(s, "\n{what}: the same error as above.");
                continue;
            }
            seen.push(key);
            let _ = writeln!(s, "\n{what}:\n\n```text\n{}\n```", e);
        }
    }
    s
}

/// At most 3 first and 8 last lines; a log from its first warning on, 10 lines.
fn shorten(e: &str) -> String {
    let mut lines: Vec<&str> = e.lines().collect();
    // A log: from its first warning on.
    if let Some(w) = log_warning(e) {
        let from = lines.iter().position(|l| *l == w).unwrap_or(0);
        lines.drain(..from);
        lines.truncate(10);
        return format!("[... {from} log lines ...]\n{}", lines.join("\n"));
    }
    if lines.len() <= 12 {
        return e.to_string();
    }
    format!(
        "{}\n[... {} lines ...]\n{}",
        lines[..3].join("\n"),
        lines.len() - 11,
        lines[lines.len() - 8..].join("\n")
    )
}

const DOCS_BEGIN: &str = "<!-- kernel-matrix:begin (cargo xtask test-kernels --update-docs) -->";
const DOCS_END: &str = "<!-- kernel-matrix:end -->";

/// Replaces the table between the markers in docs/operations.md.
fn update_docs(path: &Path, table: &str) -> Result<()> {
    let doc = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (Some(b), Some(e)) = (doc.find(DOCS_BEGIN), doc.find(DOCS_END)) else {
        bail!(
            "{} has no {DOCS_BEGIN} ... {DOCS_END} markers",
            path.display()
        );
    };
    let new = format!(
        "{}{DOCS_BEGIN}\n\n{}\n{}",
        &doc[..b],
        table.trim_end(),
        &doc[e..]
    );
    fs::write(path, new)?;
    println!("test-kernels: updated {}", path.display());
    Ok(())
}

/// Runs and returns stdout; a failure carries the end of its output.
fn quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            Path::new(cmd.get_program()).display(),
            out.status,
            tail(
                &format!(
                    "{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                15
            )
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closure_loads_dependencies_first_and_skips_builtins() {
        let dep = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n\
                   kernel/net/9p/9pnet.ko:\n\
                   kernel/fs/netfs/netfs.ko:\n\
                   kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/net/veth.ko:\n";
        let builtin = "kernel/net/sched/sch_ingress.ko\n";
        let got = closure_of(dep, builtin, &["9pnet_virtio", "9p", "veth", "sch_ingress"]).unwrap();
        assert_eq!(
            got,
            [
                "kernel/net/9p/9pnet.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/net/9p/9pnet_virtio.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/9p/9p.ko",
                "kernel/drivers/net/veth.ko",
            ]
        );
        assert!(closure_of(dep, builtin, &["cls_bpf"]).is_err());
    }

    #[test]
    fn cpio_is_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let b = c.finish();
        assert!(b.starts_with(b"070701"));
        assert_eq!(b.len() % 4, 0);
        // The header is 110 bytes; "bin\0" pads to 116.
        assert_eq!(&b[110..113], b"bin");
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn first_panic_and_cell() {
        let log = "running 1 test\ntest a ... FAILED\n\nfailures:\n\n---- a stdout ----\n\n\
                   thread 'a' (7) panicked at x.rs:1:2:\nload data path: Program { verifier_log: func#0\n\
                   0: r1 = 0\nR2 !read_ok\nverification time 5 usec\nstack depth 0\n } }\n\
                   note: run with `RUST_BACKTRACE=1`\n";
        let (at, e) = first_panic_at(log).unwrap();
        assert_eq!(at, "x.rs:1:2");
        assert!(e.starts_with("load data path"));
        assert!(e.ends_with(" } }"));
        assert_eq!(
            cell(&e),
            "load data path: Program { verifier_log: func#0 … R2 !read_ok"
        );
        assert_eq!(test_lines(log), vec![("a".to_string(), false)]);
    }

    #[test]
    fn extra_args_only_for_their_kernel_and_step() {
        let bins: BTreeMap<String, PathBuf> = FULL
            .iter()
            .map(|s| {
                (
                    s.target.to_string(),
                    PathBuf::from(format!("/b/{}", s.target)),
                )
            })
            .collect();
        let root = Path::new("/w");
        let old = run_script(root, "5.10", FULL, &bins);
        let packet = old.lines().find(|l| l.starts_with("step packet")).unwrap();
        assert!(
            packet.ends_with("'--skip' 'counters_exact_across_cpus'"),
            "{packet}"
        );
        assert!(
            !old.lines()
                .any(|l| l.starts_with("step lab-") && l.contains("--skip"))
        );
        let new = run_script(root, "6.1", FULL, &bins);
        assert!(!new.contains("counters_exact_across_cpus"), "{new}");
    }

    #[test]
    fn must_pass_today() {
        assert!(must_pass("host", "lab-tc"));
        assert!(must_pass("6.1", "lab-xdp"));
        assert!(must_pass("6.1", "lab-tc") && must_pass("6.1", "agent"));
        assert!(must_pass("5.10", "packet") && must_pass("5.10", "lab-tc"));
        assert!(must_pass("5.10", "lab-xdp-generic") && must_pass("5.10", "agent"));
        assert!(must_pass("5.10", "lab-xdp"));
        // The short form asserts only what must pass today.
        assert!(SHORT.iter().all(|s| must_pass("6.1", s.name)));
    }
}
