//! `cargo xtask setup`: makes a fresh machine ready and skips what is done
//! already. Prints one line per step: "ok", "installed ..." or "missing: ...".

use crate::{cargo, run};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

pub fn all(root: &Path) -> Result<()> {
    report("nightly rust-src", rust_src()?);
    report("bpf-linker 0.13", bpf_linker(root)?);
    report("cargo-fuzz", cargo_fuzz()?);
    report("tools (ip, tc, ethtool, iptables, bpftool, capsh)", tools());
    report("bpffs at /sys/fs/bpf", bpffs());
    report("capabilities", capabilities());
    Ok(())
}

fn report(step: &str, status: String) {
    println!("setup: {step:<34} {status}");
}

fn rust_src() -> Result<String> {
    let list = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if list.lines().any(|l| l.trim() == "rust-src") {
        return Ok("ok".into());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok("installed".into())
}

/// cargo-fuzz, for `cargo xtask fuzz` (and the fuzz step of `cargo xtask test`).
fn cargo_fuzz() -> Result<String> {
    if crate::fuzz::cargo_fuzz_ok() {
        return Ok("ok".into());
    }
    println!("setup: installing cargo-fuzz 0.13.2 (a minute or two)");
    let st = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--version", "0.13.2", "--locked"])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !st.success() {
        bail!("cargo install cargo-fuzz failed: {st}");
    }
    Ok("installed".into())
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" 0.13"))
}

/// bpf-linker 0.13.0 built against the nightly's own libLLVM.
fn bpf_linker(root: &Path) -> Result<String> {
    if bpf_linker_ok() {
        return Ok("ok".into());
    }
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no \"LLVM version\" in `rustc +nightly -vV`")?;
    let lib = sysroot.join("lib");
    let libllvm = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // llvm-sys wants LLVM_PREFIX/lib/libLLVM.so; point it at the nightly's library.
    let prefix = root.join("target/llvm-prefix");
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;

    println!(
        "setup: building bpf-linker 0.13.0 against {} (a few minutes)",
        libllvm.display()
    );
    let feature = format!("llvm-{major}");
    let mut cmd = cargo(root);
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        "0.13.0",
        "--locked",
        "--force",
    ])
    .args(["--no-default-features", "--features", &feature])
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .env_remove("CARGO_BUILD_RUSTFLAGS")
    .env("LLVM_PREFIX", &prefix)
    // Without the rpath, bpf-linker cannot find libLLVM at run time.
    .env(
        "RUSTFLAGS",
        format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
    );
    run(&mut cmd)?;
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker was installed, but `bpf-linker --version` is not 0.13: is ~/.cargo/bin on PATH?"
        );
    }
    Ok(format!("installed (llvm-{major})"))
}

/// Tools the tests and the benchmark baseline need, with their Debian packages.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ethtool", "ethtool"),
    ("iptables", "iptables"),
    // Lab tests check what is attached (TCX links show nowhere else).
    ("bpftool", "bpftool"),
    // tests/least_privilege.rs runs the agent with only the DaemonSet's capabilities.
    ("capsh", "libcap2-bin"),
];

/// Tools only the benchmark uses (its lab's "wrk and nginx" rows; without them it skips
/// those rows).
const BENCH_TOOLS: &[(&str, &str)] = &[("nginx", "nginx-light"), ("wrk", "wrk")];

fn tools() -> String {
    install_tools(TOOLS)
}

/// `cargo xtask bench` (besides [`all`]): the benchmark's own tools. Never fails on them.
pub fn bench_tools() {
    let had_nginx = have("nginx");
    report("bench tools (nginx, wrk)", install_tools(BENCH_TOOLS));
    // Debian starts the packaged nginx (port 80, root namespace) where an init system runs;
    // the benchmark runs its own in its namespaces, so stop what the install started.
    if !had_nginx && have("nginx") && have("systemctl") {
        let _ = output(Command::new("systemctl").args(["disable", "--now", "nginx"]));
    }
}

/// Installs the Debian packages of the `(tool, package)` pairs whose tool is missing (root
/// only); the status line.
fn install_tools(list: &[(&str, &str)]) -> String {
    let missing = || list.iter().filter(|(t, _)| !have(t)).collect::<Vec<_>>();
    let before = missing();
    if before.is_empty() {
        return "ok".into();
    }
    let names = |m: &[&(&str, &str)]| m.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ");
    if !is_root() {
        return format!("missing: {} (run setup as root to install)", names(&before));
    }
    let mut pkgs: Vec<&str> = before.iter().map(|(_, p)| *p).collect();
    pkgs.dedup();
    let apt = |args: &[&str]| {
        output(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&pkgs);
    if let Err(e) = apt(&["update", "-qq"]).and_then(|_| apt(&install)) {
        return format!("missing: {} (apt-get failed: {e:#})", names(&before));
    }
    match missing() {
        m if m.is_empty() => format!("installed ({})", pkgs.join(" ")),
        m => format!(
            "missing: {} (still, after installing {})",
            names(&m),
            pkgs.join(" ")
        ),
    }
}

/// Whether `tool` is on PATH or in an sbin folder (not on a user's PATH).
pub(crate) fn have(tool: &str) -> bool {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}

fn bpffs() -> String {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    });
    if mounted {
        return "ok".into();
    }
    if !is_root() {
        return "missing: not mounted (needs root: mount -t bpf bpf /sys/fs/bpf)".into();
    }
    match output(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
        Ok(_) => "installed (mounted)".into(),
        Err(e) => format!("missing: not mounted ({e:#})"),
    }
}

fn capabilities() -> String {
    const CAPS: &[(u32, &str)] = &[
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
        (38, "CAP_PERFMON"),
        (39, "CAP_BPF"),
    ];
    let Some(eff) = proc_status("CapEff").and_then(|v| u64::from_str_radix(&v, 16).ok()) else {
        return "missing: cannot read CapEff from /proc/self/status (BPF and netns tests will skip)".into();
    };
    let missing: Vec<&str> = CAPS
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        "ok".into()
    } else {
        format!(
            "missing: {} (BPF and netns tests will skip)",
            missing.join(", ")
        )
    }
}

/// Effective uid 0 (the second field of `Uid:`).
pub(crate) fn is_root() -> bool {
    proc_status("Uid").is_some_and(|v| v.split_whitespace().nth(1) == Some("0"))
}

/// The value of a `Key:` line in /proc/self/status.
fn proc_status(key: &str) -> Option<String> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(':')?.trim().to_owned()))
}

/// Runs and returns stdout; a failure carries the command's stderr.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            err.trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
