//! How the kernel part (lb-ebpf) is built: the nightly toolchain,
//! `-Z build-std=core` for `bpfel-unknown-none`, bpf-linker, into
//! `target/ebpf`. `cargo xtask build-ebpf` runs [`ebpf_build_command`], and
//! so does lb-agent's build.rs when the object it embeds is missing or older
//! than its sources, so the two can never build it differently.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The object `cargo xtask build-ebpf` writes (release or dev profile).
pub fn ebpf_object(root: &Path, release: bool) -> PathBuf {
    root.join("target/ebpf/bpfel-unknown-none")
        .join(if release { "release" } else { "debug" })
        .join("lb-ebpf")
}

/// The example user-defined selector's object (docs/policies.md), built
/// by the same command beside [`ebpf_object`].
pub fn geo_selector_object(root: &Path, release: bool) -> PathBuf {
    ebpf_object(root, release).with_file_name("geo-selector")
}

/// What the object is built from (for staleness and `rerun-if-changed`).
pub fn ebpf_sources(root: &Path) -> [PathBuf; 3] {
    [
        root.join("lb-ebpf/src"),
        root.join("lb-common/src"),
        root.join("lb-ebpf/Cargo.toml"),
    ]
}

/// The nightly `cargo build` of lb-ebpf, run in `root` (the workspace), in
/// an environment cleaned of what an outer cargo (xtask's `cargo run`, or a
/// build script's cargo) set: it would force the stable toolchain, its
/// flags or its target dir. Registry and network settings are kept.
pub fn ebpf_build_command(root: &Path, release: bool) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args([
        "+nightly",
        "build",
        "--manifest-path",
        "lb-ebpf/Cargo.toml",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/ebpf",
    ]);
    if release {
        cmd.arg("--release");
    }
    for (key, _) in std::env::vars_os() {
        if inherited_from_outer_cargo(&key.to_string_lossy()) {
            cmd.env_remove(&key);
        }
    }
    // v3 has the BPF atomics the programs use; more flags join with \x1f.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", ["-Ctarget-cpu=v3"].join("\x1f"));
    cmd
}

/// Whether an environment variable was set by an outer cargo or toolchain
/// and must not reach the nightly build.
fn inherited_from_outer_cargo(k: &str) -> bool {
    const EXACT: &[&str] = &[
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MAKEFLAGS",
    ];
    const PREFIXES: &[&str] = &[
        "RUSTC",
        "RUSTDOC",
        "CARGO_BUILD_",
        "CARGO_PKG_",
        "CARGO_CFG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_FEATURE_",
        "CARGO_ENCODED_",
        "CARGO_PROFILE_",
    ];
    EXACT.contains(&k) || PREFIXES.iter().any(|p| k.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outer_cargo_does_not_leak_in() {
        for k in [
            "RUSTUP_TOOLCHAIN",
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTFLAGS",
            "CARGO",
            "CARGO_TARGET_DIR",
            "CARGO_PKG_NAME",
            "CARGO_CFG_TARGET_OS",
            "CARGO_MANIFEST_DIR",
            "CARGO_FEATURE_USER",
            "CARGO_ENCODED_RUSTFLAGS",
        ] {
            assert!(inherited_from_outer_cargo(k), "{k}");
        }
        for k in [
            "CARGO_HOME",
            "CARGO_NET_OFFLINE",
            "CARGO_HTTP_PROXY",
            "PATH",
            "HOME",
        ] {
            assert!(!inherited_from_outer_cargo(k), "{k}");
        }
        let cmd = ebpf_build_command(Path::new("/w"), true);
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[0], "+nightly");
        assert!(args.contains(&"--release".to_string()));
        assert_eq!(
            ebpf_object(Path::new("/w"), true),
            Path::new("/w/target/ebpf/bpfel-unknown-none/release/lb-ebpf")
        );
    }
}
