//! Embeds the eBPF object. It is built by `cargo xtask build-ebpf` (nightly +
//! bpf-linker); if it is missing or older than its sources, this script runs
//! the same command (`lb_build::ebpf_build_command`), and fails with
//! directions when it cannot.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

fn newest(dir: &Path, acc: &mut SystemTime) {
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
    let obj = lb_build::ebpf_object(&root, true);
    let srcs = lb_build::ebpf_sources(&root);
    for s in &srcs {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    println!("cargo:rerun-if-changed={}", obj.display());

    let mut src_time = SystemTime::UNIX_EPOCH;
    for s in &srcs {
        if s.is_dir() {
            newest(s, &mut src_time);
        } else if let Ok(t) = s.metadata().and_then(|m| m.modified()) {
            src_time = src_time.max(t);
        }
    }
    let stale = [obj.clone(), lb_build::geo_selector_object(&root, true)]
        .iter()
        .any(|o| match o.metadata().and_then(|m| m.modified()) {
            Ok(t) => t < src_time,
            Err(_) => true,
        });
    if stale {
        let ok = lb_build::ebpf_build_command(&root, true)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok || !obj.exists() || !lb_build::geo_selector_object(&root, true).exists() {
            panic!(
                "\n\nThe eBPF object {} is missing or stale and building it failed.\n\
                 Run `cargo xtask setup` (nightly rust-src + bpf-linker), then `cargo xtask build-ebpf`.\n\n",
                obj.display()
            );
        }
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("lb-ebpf.o");
    // A fresh file, not a write into the old one: a target directory copied
    // with hard links (several worktrees) would otherwise share this file,
    // and one worktree's build would embed another's object.
    let _ = std::fs::remove_file(&out);
    std::fs::copy(&obj, &out).expect("copy eBPF object");
    // The example selector, built by the same command.
    let geo = lb_build::geo_selector_object(&root, true);
    println!("cargo:rerun-if-changed={}", geo.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("geo-selector.o");
    let _ = std::fs::remove_file(&out);
    std::fs::copy(&geo, &out).expect("copy the example selector's object");
}
