//! `cargo xtask fuzz`: the cargo-fuzz targets in fuzz/ (the config parser,
//! the sync messages, the Kubernetes translation), each for a bounded time.
//!
//! The corpus grows outside the repo, in
//! `${RPCLB_CACHE_DIR:-/var/cache/rpclb}/fuzz/<target>/`, seeded from the
//! checked-in `fuzz/seeds/<target>/`; the instrumented build in
//! `.../fuzz-target/`. A crash fails the run and names the input that
//! reproduces it (`fuzz/artifacts/<target>/`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Every target, in the order they run.
pub const TARGETS: &[&str] = &["config", "sync", "translate"];

/// What `cargo xtask test` gives each target.
pub const TEST_SECONDS: u64 = 20;

fn cache() -> PathBuf {
    let cache = std::env::var_os("RPCLB_CACHE_DIR").unwrap_or_else(|| "/var/cache/rpclb".into());
    PathBuf::from(cache)
}

fn corpus_dir(target: &str) -> PathBuf {
    cache().join("fuzz").join(target)
}

pub fn cargo_fuzz_ok() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the targets (once for all), then runs `targets` (all when empty) for `seconds` each.
pub fn run(root: &Path, targets: &[String], seconds: u64) -> Result<()> {
    if !cargo_fuzz_ok() {
        bail!("cargo-fuzz is missing: run `cargo xtask setup`");
    }
    let mut build = build_command(root);
    status(&mut build).context("building the fuzz targets")?;
    run_built(root, targets, seconds)
}

/// The instrumented build of every target; safe Rust, so no sanitizer, but with debug
/// assertions (overflow checks). Its dependencies are kept in the cache, beside the corpus,
/// so a fresh clone rebuilds only rpclb's own crates.
pub fn build_command(root: &Path) -> Command {
    let mut build = Command::new("cargo");
    build
        .current_dir(root.join("fuzz"))
        .args([
            "+nightly",
            "fuzz",
            "build",
            "--sanitizer",
            "none",
            "--debug-assertions",
        ])
        .arg("--target-dir")
        .arg(cache().join("fuzz-target"));
    build
}

/// [`run`] once [`build_command`] has built the targets.
pub fn run_built(root: &Path, targets: &[String], seconds: u64) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for t in &targets {
        if !TARGETS.contains(t) {
            bail!("unknown fuzz target {t:?} (known: {})", TARGETS.join(", "));
        }
    }
    let fuzz_dir = root.join("fuzz");
    let target_dir = cache().join("fuzz-target");
    for t in targets {
        let corpus = corpus_dir(t);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let t0 = std::time::Instant::now();
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&fuzz_dir)
            .args([
                "+nightly",
                "fuzz",
                "run",
                "--sanitizer",
                "none",
                "--debug-assertions",
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .arg(t)
            .arg(&corpus)
            .arg(fuzz_dir.join("seeds").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-max_len=65536"])
            .args(["-print_final_stats=1"]);
        status(&mut cmd).with_context(|| {
            format!(
                "fuzz target {t} failed: the crashing input is under {}; replay with \
                 `cd fuzz && cargo +nightly fuzz run -s none {t} <input>`",
                fuzz_dir.join("artifacts").join(t).display()
            )
        })?;
        println!(
            "fuzz: {t}: ok, {:.0} s, corpus {}",
            t0.elapsed().as_secs_f64(),
            corpus.display()
        );
    }
    Ok(())
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}
