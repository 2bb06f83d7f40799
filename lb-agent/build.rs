//! Embeds the eBPF object. It is built by `cargo xtask build-ebpf` (nightly +
//! bpf-linker); if it is missing or older than its sources, this script
//! builds it the same way, and fails with directions when it cannot.

use std::path::{Path, PathBuf};
use std::process::Command;

fn newest(dir: &Path, acc: &mut std::time::SystemTime) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            newest(&p, acc);
        } else if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
            *acc = (*acc).max(t);
        }
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let obj = root.join("target/ebpf/bpfel-unknown-none/release/lb-ebpf");
    let srcs = [
        root.join("lb-ebpf/src"),
        root.join("lb-common/src"),
        root.join("lb-ebpf/Cargo.toml"),
    ];
    for s in &srcs {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    println!("cargo:rerun-if-changed={}", obj.display());

    let mut src_time = std::time::SystemTime::UNIX_EPOCH;
    for s in &srcs {
        if s.is_dir() {
            newest(s, &mut src_time);
        } else if let Ok(t) = s.metadata().and_then(|m| m.modified()) {
            src_time = src_time.max(t);
        }
    }
    let stale = match obj.metadata().and_then(|m| m.modified()) {
        Ok(t) => t < src_time,
        Err(_) => true,
    };
    if stale {
        let mut cmd = Command::new("rustup");
        cmd.args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--manifest-path")
        .arg(root.join("lb-ebpf/Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target/ebpf"));
        for (k, _) in std::env::vars() {
            if k.starts_with("CARGO")
                || k.starts_with("RUSTC")
                || k == "RUSTUP_TOOLCHAIN"
                || k == "RUSTFLAGS"
            {
                cmd.env_remove(&k);
            }
        }
        cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-cpu=v3");
        let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
        if !ok || !obj.exists() {
            panic!(
                "\n\nThe eBPF object {} is missing or stale and building it failed.\n\
                 Run `cargo xtask setup` (nightly rust-src + bpf-linker), then `cargo xtask build-ebpf`.\n\n",
                obj.display()
            );
        }
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("lb-ebpf.o");
    std::fs::copy(&obj, &out).expect("copy eBPF object");
}
