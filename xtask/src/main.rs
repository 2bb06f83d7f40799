//! Project tasks: `cargo xtask setup | build-ebpf | image | kube-apiserver | test |
//! test-kernels | fuzz-packets | fuzz | soak | bench | demo | certs`.

mod fuzz;
mod image;
mod kernels;
mod kube;
mod setup;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(Parser)]
#[command(bin_name = "cargo xtask", about = "rpclb project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what builds and tests need, mount bpffs, report capabilities.
    /// Skips what is done already.
    Setup,
    /// Build the eBPF object (lb-ebpf) with the nightly toolchain.
    BuildEbpf(EbpfArgs),
    /// setup + build-ebpf + a static (musl) release build of lb-agent and lb-controller,
    /// then their OCI images, without a container daemon (umoci):
    /// target/images/rpclb-agent-VERSION.oci.tar and rpclb-controller-VERSION.oci.tar.
    Image,
    /// Build Kubernetes' kube-apiserver v1.20.2 from Debian's source package into the cache
    /// (${RPCLB_CACHE_DIR:-/var/cache/rpclb}/kube-apiserver/) and install etcd, for the
    /// Kubernetes tests. Skips what is done already.
    KubeApiserver,
    /// setup + build-ebpf + image + kube-apiserver + `cargo test --workspace ARGS` with the
    /// short kernel matrix (`test-kernels --short`: Debian 12's 6.1 under qemu, at idle
    /// priority beside the tests), then 20 s of each cargo-fuzz target (`fuzz`); ARGS are
    /// cargo test's, e.g. `cargo xtask test -p lb-agent -- --nocapture` (a `-p` list without
    /// rpclb-tests, which holds the image and kernel tests, skips both).
    #[command(disable_help_flag = true)]
    Test(Passthrough),
    /// setup + build-ebpf + the kernel tests (packet tests, a netns lab per attach mode, the
    /// agent) on Debian's 6.1 (bookworm) and 5.10 (bullseye) kernels under qemu (TCG) and on
    /// the host's kernel, then a table of kernel x mode. Kernels are fetched once into
    /// ${RPCLB_CACHE_DIR:-/var/cache/rpclb}/kernels/.
    TestKernels(KernelArgs),
    /// setup + build-ebpf + mutated packets through the XDP and TC programs
    /// (BPF_PROG_TEST_RUN, tests/tests/fuzz_packets.rs): 1,000,000 by default,
    /// with a fresh seed that is printed (pass --seed to replay one).
    FuzzPackets(FuzzArgs),
    /// The cargo-fuzz targets in fuzz/ (config parser, sync messages, Kubernetes
    /// translation), each for --seconds (nightly, cargo-fuzz from `setup`); the corpus
    /// grows under ${RPCLB_CACHE_DIR:-/var/cache/rpclb}/fuzz/. `cargo xtask test` runs each
    /// for 20 s.
    Fuzz(FuzzTargetArgs),
    /// setup + build-ebpf + the fault tests (tests/tests/faults.rs) with their long durations
    /// (RPCLB_SOAK=1), one at a time: the agent SIGKILLed three times during 60 s streams,
    /// the controller lost while endpoints change, 30 s of backend churn under 100 streaming
    /// connections, the userspace data path's restarts. ARGS filter the tests, as cargo
    /// test's do (e.g. `cargo xtask soak churn`).
    #[command(disable_help_flag = true)]
    Soak(Passthrough),
    /// setup + build-ebpf + `rpclb-bench ARGS` (release build).
    #[command(disable_help_flag = true)]
    Bench(Passthrough),
    /// setup + build-ebpf + release build of lb-agent, lb-controller and rpclb-demo, then
    /// `rpclb-demo ARGS` (as root); `cargo xtask demo --help` lists its options.
    #[command(disable_help_flag = true)]
    Demo(Passthrough),
    /// `lb-controller certs ARGS`: a CA, the controller's certificate and one per node for the
    /// stream's mutual TLS, e.g. `cargo xtask certs --out certs --nodes node-a,node-b`
    /// (docs/security.md); `cargo xtask certs --help` lists its options.
    #[command(disable_help_flag = true)]
    Certs(Passthrough),
}

#[derive(Args)]
struct EbpfArgs {
    /// Release profile (the default; it is what the agent embeds).
    #[arg(long)]
    release: bool,
    /// Dev profile instead of release.
    #[arg(long, conflicts_with = "release")]
    debug: bool,
}

#[derive(Args)]
struct KernelArgs {
    /// The short form that `cargo xtask test` runs: 6.1 only, the packet tests and one XDP lab.
    #[arg(long)]
    short: bool,
    /// Only these kernels (repeatable): 6.1 (bookworm), 5.10 (bullseye), host.
    #[arg(long = "kernel", value_name = "KERNEL")]
    kernels: Vec<String>,
    /// Ask Debian's archive for newer kernel packages even when some are cached.
    #[arg(long)]
    refresh: bool,
    /// Write the table into docs/operations.md (between its kernel-matrix markers).
    #[arg(long)]
    update_docs: bool,
    /// Only these steps of the matrix (repeatable; e.g. packet6, lab-tc): a quicker check.
    #[arg(long = "step", value_name = "STEP", conflicts_with = "update_docs")]
    steps: Vec<String>,
}

#[derive(Args)]
struct FuzzArgs {
    /// How many packets (half with FIB redirect off, half on; XDP and TC alternate).
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// The seed to replay; by default one from the clock.
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Args)]
struct FuzzTargetArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Targets to run (default: all): config, sync, translate.
    targets: Vec<String>,
}

/// Arguments for the inner command. Clap would eat a leading `--`, so the
/// arguments are taken verbatim from argv instead (see `passthrough`).
#[derive(Args)]
struct Passthrough {
    /// Passed on as typed.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    _args: Vec<OsString>,
}

/// Everything after the subcommand, as typed.
fn passthrough() -> Vec<OsString> {
    std::env::args_os().skip(2).collect()
}

fn main() -> ExitCode {
    // Printed here rather than returned, so RUST_BACKTRACE adds no backtrace.
    match task(Cli::parse().cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn task(cmd: Cmd) -> Result<()> {
    let root = workspace_root();
    match cmd {
        Cmd::Setup => setup::all(&root),
        Cmd::BuildEbpf(a) => build_ebpf(&root, !a.debug).map(drop),
        Cmd::Image => {
            prepare(&root)?;
            image::build(&root)
        }
        Cmd::KubeApiserver => kube::ensure(),
        Cmd::Test(_) => {
            prepare(&root)?;
            let args = passthrough();
            if image::wanted_by_test(&args) {
                image::build(&root)?;
            }
            // The API server the Kubernetes tests run (built once, then cached).
            kube::ensure()?;
            // The short kernel matrix boots beside the workspace tests, at idle priority.
            let whole = image::wanted_by_test(&args);
            let matrix = if whole {
                kernels_short_start(&root, &args)?
            } else {
                None
            };
            // So is the fuzz targets' instrumented build (a cargo of its own target dir).
            let fuzz_build = if whole {
                Some(fuzz_build_start(&root)?)
            } else {
                None
            };
            let mut cmd = cargo(&root);
            cmd.args(["test", "--workspace"]).args(&args);
            if !selects_packages(&args) {
                // Every binary is built by this `cargo test --workspace`: the
                // lab tests run those instead of building them again with
                // other features (rpclb_tests::procs::workspace_bin).
                cmd.env("RPCLB_BINS_BUILT", "1");
            }
            let tests = run(&mut cmd);
            // Waited for even when the tests failed: its table is part of the report.
            let matrix = matrix.map(kernels_short_finish).transpose();
            let fuzz_built = fuzz_build.map(fuzz_build_finish).transpose();
            tests?;
            matrix?;
            fuzz_built?;
            if whole {
                fuzz::run_built(&root, &[], fuzz::TEST_SECONDS)?;
            }
            Ok(())
        }
        Cmd::TestKernels(a) => {
            prepare(&root)?;
            let opts = kernels::Options {
                short: a.short,
                kernels: a.kernels,
                refresh: a.refresh,
                update_docs: a.update_docs,
                steps: a.steps,
                timeout_factor: 1,
            };
            let out = kernels::run(&root, &opts, &[])?;
            println!("\n{}", out.table);
            if !out.problems.is_empty() {
                bail!("the kernel matrix failed:\n{}", out.problems.join("\n"));
            }
            Ok(())
        }
        Cmd::FuzzPackets(a) => {
            prepare(&root)?;
            let seed = a.seed.unwrap_or_else(|| {
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                t.map_or(1, |d| d.as_nanos() as u64)
            });
            println!("fuzz-packets: {} packets, seed {seed}", a.count);
            run(cargo(&root)
                .args(["test", "-p", "rpclb-tests", "--test", "fuzz_packets"])
                .args(["--", "--nocapture"])
                .env("RPCLB_FUZZ_PACKETS", a.count.to_string())
                .env("RPCLB_FUZZ_SEED", seed.to_string())
                .env("RPCLB_REQUIRE_PRIVILEGES", "1"))
            .with_context(|| {
                format!(
                    "replay with: cargo xtask fuzz-packets --count {} --seed {seed}",
                    a.count
                )
            })
        }
        Cmd::Fuzz(a) => fuzz::run(&root, &a.targets, a.seconds),
        Cmd::Soak(_) => {
            prepare(&root)?;
            let mut filter = passthrough();
            if filter.first().is_some_and(|a| a == "--") {
                filter.remove(0);
            }
            run(cargo(&root)
                .args(["test", "-p", "rpclb-tests", "--test", "faults", "--"])
                .args(["--nocapture", "--test-threads=1"])
                .args(filter)
                .env("RPCLB_SOAK", "1")
                .env("RPCLB_REQUIRE_PRIVILEGES", "1"))
        }
        Cmd::Bench(_) => {
            setup::bench_tools();
            run_bin(&root, "rpclb-bench")
        }
        Cmd::Demo(_) => demo(&root),
        // The one certificate maker (lb_api::tls::certs), through the controller's CLI; the
        // standalone build needs no kube-rs.
        Cmd::Certs(_) => run(cargo(&root)
            .args([
                "run",
                "--quiet",
                "-p",
                "lb-controller",
                "--no-default-features",
                "--",
            ])
            .arg("certs")
            .args(passthrough())),
    }
}

/// The short kernel matrix of `cargo xtask test`, running in a thread.
type MatrixRun = std::thread::JoinHandle<(Result<kernels::Outcome>, std::time::Duration)>;

/// Builds the test binaries (`cargo test --workspace --no-run` with `args`, the build that
/// the workspace tests then reuse), then boots the short kernel matrix in a thread whose
/// processes (qemu) run at idle priority: the guest takes only the CPU that the workspace
/// tests leave, so their timing is not disturbed, and the two overlap. The guest's time
/// bounds are doubled for that. It needs root to install qemu and fetch the kernel the first
/// time; without root and without them it skips (`None`), or fails under CI (`CI` or
/// `RPCLB_REQUIRE_PRIVILEGES`), as the tests do.
fn kernels_short_start(root: &Path, args: &[OsString]) -> Result<Option<MatrixRun>> {
    if !setup::is_root() && !kernels::ready_without_root() {
        let why = "the kernel matrix (test-kernels --short) needs root the first time, to install \
                   qemu and fetch Debian's kernel";
        if privileges_required() {
            bail!(
                "{why} (CI or RPCLB_REQUIRE_PRIVILEGES is set, so this fails instead of skipping)"
            );
        }
        println!("SKIP: {why}");
        return Ok(None);
    }
    let opts = kernels::Options {
        short: true,
        kernels: Vec::new(),
        refresh: false,
        update_docs: false,
        steps: Vec::new(),
        timeout_factor: 2,
    };
    let prepared = kernels::prepare(root, &opts, args)?;
    let root = root.to_path_buf();
    println!("test-kernels --short: booting beside the workspace tests, at idle priority");
    Ok(Some(std::thread::spawn(move || {
        let t = std::time::Instant::now();
        if let Err(e) = idle_priority() {
            println!("test-kernels --short: at normal priority ({e})");
        }
        (kernels::run_prepared(&root, &opts, &prepared), t.elapsed())
    })))
}

/// Waits for the matrix of [`kernels_short_start`], prints its table, fails on a problem.
fn kernels_short_finish(m: MatrixRun) -> Result<()> {
    let (out, took) = m
        .join()
        .map_err(|_| anyhow::anyhow!("the kernel matrix's thread panicked"))?;
    let out = out?;
    println!("\n{}", out.table);
    if !out.problems.is_empty() {
        bail!("the kernel matrix failed:\n{}", out.problems.join("\n"));
    }
    println!("test-kernels --short: ok in {:.0} s", took.as_secs_f64());
    Ok(())
}

/// The fuzz targets' build of `cargo xtask test`, at idle priority, its output in a log.
type FuzzBuild = std::thread::JoinHandle<Result<()>>;

fn fuzz_build_start(root: &Path) -> Result<FuzzBuild> {
    if !fuzz::cargo_fuzz_ok() {
        bail!("cargo-fuzz is missing: run `cargo xtask setup`");
    }
    let log_path = target_dir(root).join("fuzz-build.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut build = fuzz::build_command(root);
    build.stdout(log.try_clone()?).stderr(log);
    println!(
        "fuzz: building the targets beside the workspace tests, at idle priority (log: {})",
        log_path.display()
    );
    Ok(std::thread::spawn(move || {
        if let Err(e) = idle_priority() {
            println!("fuzz: building at normal priority ({e})");
        }
        let st = build
            .status()
            .with_context(|| format!("running {build:?}"))?;
        if !st.success() {
            let out = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = out.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "building the fuzz targets failed ({st}); the end of {}:\n{}",
                log_path.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }))
}

fn fuzz_build_finish(b: FuzzBuild) -> Result<()> {
    b.join()
        .map_err(|_| anyhow::anyhow!("the fuzz build's thread panicked"))?
}

/// SCHED_IDLE for the calling thread and every process it starts from now on (Linux's
/// scheduling policy is per thread and inherited across fork).
fn idle_priority() -> std::io::Result<()> {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread (pid 0) with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `CI` or `RPCLB_REQUIRE_PRIVILEGES` set (not empty, 0 or false): what cannot run fails.
fn privileges_required() -> bool {
    ["CI", "RPCLB_REQUIRE_PRIVILEGES"]
        .iter()
        .any(|k| env_flag(k))
}

/// The variable is set, and not empty, 0 or false.
fn env_flag(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !v.is_empty() && v != "0" && v != "false"
    })
}

/// The workspace root: this crate's parent folder.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Whether cargo test arguments pick packages (`-p`, `--package`, `--exclude`):
/// then not every binary is built.
fn selects_packages(args: &[OsString]) -> bool {
    args.iter().take_while(|a| *a != "--").any(|a| {
        let a = a.to_string_lossy();
        a == "-p" || a.starts_with("-p") || a.starts_with("--package") || a.starts_with("--exclude")
    })
}

/// Cargo's target folder: CARGO_TARGET_DIR (relative to the root) or root/target.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d))
}

/// setup, then the release eBPF object: what test, bench and demo need.
fn prepare(root: &Path) -> Result<()> {
    setup::all(root)?;
    build_ebpf(root, true)?;
    Ok(())
}

/// `cargo run` of an rpclb-tests binary; a leading `--` in its arguments is optional.
fn run_bin(root: &Path, bin: &str) -> Result<()> {
    prepare(root)?;
    let mut args = passthrough();
    if args.first().is_some_and(|a| a == "--") {
        args.remove(0);
    }
    let mut cmd = cargo(root);
    cmd.args(["run", "--release", "-p", "rpclb-tests", "--bin", bin, "--"]);
    run(cmd.args(args))
}

/// `cargo xtask demo ARGS`: setup, the eBPF object, a release build of the agent (with lbctl), the controller
/// and the demo, then the demo itself with ARGS (a leading `--` is optional; `--help` reaches
/// the demo). The demo replaces this process (exec), so a Ctrl-C reaches only the demo, which
/// tears its lab down and exits with its own status.
fn demo(root: &Path) -> Result<()> {
    prepare(root)?;
    let mut args = passthrough();
    if args.first().is_some_and(|a| a == "--") {
        args.remove(0);
    }
    run(&mut demo_build_command(root))?;
    let bin = target_dir(root).join("release").join("rpclb-demo");
    let mut cmd = Command::new(&bin);
    cmd.current_dir(root).args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let err = cmd.exec(); // returns only on failure
        Err(err).with_context(|| format!("cannot start {}", bin.display()))
    }
    #[cfg(not(unix))]
    run(&mut cmd)
}

/// The demo's release build. lb-controller keeps its default features
/// (`kube`): the demo runs it standalone, but `target/release/lb-controller`
/// is the user's binary too, and after the demo `--kube` must still work.
fn demo_build_command(root: &Path) -> Command {
    let mut cmd = cargo(root);
    cmd.args([
        "build",
        "--release",
        "-p",
        "lb-agent",
        "-p",
        "lb-controller",
        "-p",
        "rpclb-demo",
    ]);
    cmd
}

/// Builds lb-ebpf and returns the object's path.
fn build_ebpf(root: &Path, release: bool) -> Result<PathBuf> {
    run(&mut lb_build::ebpf_build_command(root, release))
        .context("building lb-ebpf (nightly, bpfel-unknown-none) failed")?;
    let obj = lb_build::ebpf_object(root, release);
    println!("ebpf object: {}", obj.display());
    Ok(obj)
}

/// The cargo that runs this xtask (same toolchain), in the workspace root.
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    // CI builds each crate once: incremental state would only cost time and disk (about
    // 10% of a cold build's CPU with the dependencies' line-tables-only, Cargo.toml).
    if std::env::var_os("CARGO_INCREMENTAL").is_none() && env_flag("CI") {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

/// Runs with inherited stdio; a failure names the command and its exit status.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        let prog = Path::new(cmd.get_program()).file_name().unwrap_or_default();
        bail!("{} {} failed ({status})", prog.display(), first_arg(cmd));
    }
    Ok(())
}

fn first_arg(cmd: &Command) -> String {
    cmd.get_args()
        .map(|a| a.to_string_lossy())
        .find(|a| !a.starts_with('+'))
        .unwrap_or_default()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo once rebuilt target/release/lb-controller without `kube`,
    /// and `lb-controller --kube` refused to start after it.
    #[test]
    fn package_selections_are_noticed() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(selects_packages(&args(&["-p", "lb-agent"])));
        assert!(selects_packages(&args(&["-plb-agent"])));
        assert!(selects_packages(&args(&["--package=lb-api"])));
        assert!(!selects_packages(&args(&["--test", "kube_e2e"])));
        assert!(!selects_packages(&args(&["--", "-p"])));
    }

    #[test]
    fn the_demo_builds_the_default_features() {
        let cmd = demo_build_command(Path::new("."));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            !args
                .iter()
                .any(|a| a.contains("no-default-features") || a == "--features"),
            "{args:?}"
        );
        assert!(
            args.windows(2).any(|w| w == ["-p", "lb-controller"]),
            "{args:?}"
        );
        assert!(args.contains(&"--release".to_string()));
    }
}
