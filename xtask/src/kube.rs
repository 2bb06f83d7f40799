//! `cargo xtask kube-apiserver`: a real Kubernetes API server for the tests.
//!
//! No registry ships a kube-apiserver binary, but Debian bookworm's `kubernetes` source
//! package (upstream v1.20.2 with its vendor/ tree) builds one with Debian's Go 1.19. This
//! builds it once into a cache outside the repo ([`cache_dir`]); a later run finds it and does
//! nothing. The test fixture (tests/src/kube) runs it beside Debian's etcd.

use anyhow::{Context, Result, bail};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The upstream version that the cache is keyed by.
pub const VERSION: &str = "1.20.2";
/// The Debian source package and the exact version of it that builds [`VERSION`].
const SOURCE: &str = "kubernetes";
const SOURCE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// The top folder that `apt-get source` unpacks.
const SOURCE_DIR: &str = "kubernetes-1.20.5+really1.20.2";

/// Debian packages the build needs: Go, dpkg-source (for `apt-get source`), make and rsync
/// (Kubernetes' build scripts), and the two libraries that replace vendored copies.
const BUILD_PACKAGES: &[&str] = &[
    "golang-go",
    "dpkg-dev",
    "make",
    "rsync",
    "golang-github-modern-go-reflect2-dev",
    "golang-github-json-iterator-go-dev",
];
/// Debian packages the test fixture needs at run time.
const RUN_PACKAGES: &[&str] = &["etcd-server"];

/// Vendored Go packages that crash under Go 1.19 (reflect2 1.0.1 reads runtime internals that
/// moved) and are replaced by Debian's newer sources from /usr/share/gocode/src.
const REPLACED: &[&str] = &[
    "github.com/modern-go/reflect2",
    "github.com/json-iterator/go",
];

/// `${RPCLB_CACHE_DIR:-/var/cache/rpclb}/kube-apiserver/VERSION`. The fixture
/// (tests/src/kube/mod.rs, `apiserver_binary`) applies the same rule.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("RPCLB_CACHE_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/rpclb"), PathBuf::from)
        .join("kube-apiserver")
        .join(VERSION)
}

/// The binary the tests run: `RPCLB_KUBE_APISERVER` if set, else the one in [`cache_dir`].
pub fn binary() -> PathBuf {
    std::env::var_os("RPCLB_KUBE_APISERVER")
        .filter(|p| !p.is_empty())
        .map_or_else(|| cache_dir().join("kube-apiserver"), PathBuf::from)
}

/// Installs etcd and builds kube-apiserver unless both are there already.
pub fn ensure() -> Result<()> {
    let bin = binary();
    let missing = missing_packages(RUN_PACKAGES)?;
    if !missing.is_empty() {
        apt_install("kube-apiserver", &missing)?;
    }
    if !crate::setup::have("kubectl") {
        println!(
            "kube-apiserver: warning: no kubectl on PATH (the fixture runs `kubectl`, and needs v1.24+ for `kubectl create token`)"
        );
    }
    if bin.is_file() {
        println!("kube-apiserver: ok ({})", bin.display());
        return Ok(());
    }
    if std::env::var_os("RPCLB_KUBE_APISERVER").is_some_and(|p| !p.is_empty()) {
        bail!(
            "RPCLB_KUBE_APISERVER={} is not a file (unset it to build into {})",
            bin.display(),
            cache_dir().display()
        );
    }
    build()
}

/// Which of `pkgs` dpkg does not list as installed ("ii").
pub(crate) fn missing_packages(pkgs: &[&str]) -> Result<Vec<String>> {
    // dpkg-query exits 1 when a package is unknown; its stdout still lists the known ones.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\n"])
        .args(pkgs)
        .stderr(Stdio::null())
        .output()
        .context("cannot run dpkg-query (is this a Debian machine?)")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listed
        .lines()
        .filter_map(|l| {
            let (name, status) = l.split_once(' ')?;
            status.starts_with("ii").then_some(name)
        })
        .collect();
    Ok(pkgs
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| p.to_string())
        .collect())
}

/// `apt-get install` of `pkgs` (root only), then checks that dpkg lists them; `who` prefixes
/// the progress line.
pub(crate) fn apt_install(who: &str, pkgs: &[String]) -> Result<()> {
    if !crate::setup::is_root() {
        bail!(
            "missing Debian packages: {} (run as root, or `apt-get install {}`)",
            pkgs.join(" "),
            pkgs.join(" ")
        );
    }
    println!("{who}: installing {}", pkgs.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .context("cannot run apt-get")?;
        if !out.status.success() {
            bail!(
                "apt-get {} failed ({}): {}",
                args[0],
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 20)
            );
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(pkgs.iter().map(String::as_str));
    apt(&args)?;
    let still = missing_packages(&pkgs.iter().map(String::as_str).collect::<Vec<_>>())?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

/// Builds into a folder beside the cache and renames it into place, so a killed build never
/// leaves a half cache. A lock keeps two builds from running at once.
fn build() -> Result<()> {
    let cache = cache_dir();
    let parent = cache.parent().expect("cache_dir has a parent");
    fs::create_dir_all(parent).with_context(|| {
        format!(
            "cannot create {} (set RPCLB_CACHE_DIR to a writable folder)",
            parent.display()
        )
    })?;
    let lock = File::create(parent.join(".lock"))?;
    lock.lock()
        .with_context(|| format!("locking {}/.lock", parent.display()))?;
    // Another build may have finished while this one waited for the lock.
    if cache.join("kube-apiserver").is_file() {
        println!(
            "kube-apiserver: ok ({}, built by another run)",
            cache.display()
        );
        return Ok(());
    }
    // What a killed build left behind; no build runs (this one holds the lock).
    for e in fs::read_dir(parent)?.flatten() {
        if e.file_name().to_string_lossy().starts_with(".build-") {
            fs::remove_dir_all(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    if cache.exists() {
        fs::remove_dir_all(&cache)?; // a folder without its binary
    }

    let missing = missing_packages(BUILD_PACKAGES)?;
    if !missing.is_empty() {
        apt_install("kube-apiserver", &missing)?;
    }
    let work = parent.join(format!(".build-{VERSION}"));
    let log_path = parent.join(format!("build-{VERSION}.log"));
    let log =
        File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    println!(
        "kube-apiserver: building v{VERSION} from Debian's `{SOURCE}` source package ({SOURCE_VERSION}); \
         about 5-10 minutes and 2.3 GB in {}; log: {}",
        work.display(),
        log_path.display()
    );
    let t0 = Instant::now();
    // The binary with a stamp and the log, staged beside the cache and renamed into place.
    let staged = parent.join(format!(".build-{VERSION}-out"));
    let built = build_in(&work, &log).and_then(|(bin, go)| {
        fs::create_dir_all(&staged)?;
        fs::rename(&bin, staged.join("kube-apiserver"))
            .with_context(|| format!("moving {} out of the build folder", bin.display()))?;
        Ok(go)
    });
    let _ = fs::remove_dir_all(&work); // the source tree: 2 GB
    let go = built.with_context(|| format!("the build failed; see {}", log_path.display()))?;
    let secs = t0.elapsed().as_secs();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    fs::write(
        staged.join("stamp"),
        format!(
            "kube-apiserver v{VERSION}\nsource: {SOURCE} {SOURCE_VERSION} (Debian)\ngo: {go}\n\
             replaced vendor/: {}\nbuilt: {now} (unix time) in {secs} s\n",
            REPLACED.join(" ")
        ),
    )?;
    fs::rename(&log_path, staged.join("build.log")).context("moving the build log")?;
    fs::rename(&staged, &cache)
        .with_context(|| format!("moving the build into {}", cache.display()))?;
    println!(
        "kube-apiserver: built in {}m{:02}s: {}",
        secs / 60,
        secs % 60,
        cache.join("kube-apiserver").display()
    );
    Ok(())
}

/// Fetches, patches and builds in `work`; returns the binary's path and Go's version.
fn build_in(work: &Path, log: &File) -> Result<(PathBuf, String)> {
    let step = |what: &str| println!("kube-apiserver: {what}");
    fs::create_dir_all(work)?;
    let t = Instant::now();

    // A private deb-src list made from the machine's own apt sources, with private lists and
    // caches, so /etc/apt, /var/lib/apt and /var/cache/apt stay as they are.
    step("fetching the source (apt-get source, private deb-src list)");
    let apt_dir = work.join("apt");
    let lists = apt_dir.join("lists");
    fs::create_dir_all(lists.join("partial"))?;
    let apt_cache = apt_dir.join("cache");
    fs::create_dir_all(apt_cache.join("archives/partial"))?;
    let parts = apt_dir.join("sources.list.d");
    fs::create_dir_all(&parts)?;
    let list = apt_dir.join("sources.list");
    write_deb_src(Path::new("/etc/apt"), &list, &parts)?;
    let apt_opts = [
        format!("-oDir::Etc::SourceList={}", list.display()),
        format!("-oDir::Etc::SourceParts={}", parts.display()),
        format!("-oDir::State::Lists={}", lists.display()),
        format!("-oDir::Cache={}", apt_cache.display()),
    ];
    logged(
        Command::new("apt-get").args(&apt_opts).arg("update"),
        log,
        "apt-get update (deb-src)",
    )?;
    let src_root = work.join("src");
    fs::create_dir_all(&src_root)?;
    logged(
        Command::new("apt-get")
            .current_dir(&src_root)
            .args(&apt_opts)
            .args(["source", "--only-source"])
            .arg(format!("{SOURCE}={SOURCE_VERSION}")),
        log,
        "apt-get source",
    )?;
    let tree = src_root.join(SOURCE_DIR);
    if !tree.join("Makefile").is_file() {
        bail!("apt-get source left no {}", tree.display());
    }

    step("replacing vendored reflect2 and json-iterator with Debian's sources");
    for pkg in REPLACED {
        let vendored = tree.join("vendor").join(pkg);
        let debian = Path::new("/usr/share/gocode/src").join(pkg);
        fs::remove_dir_all(&vendored).with_context(|| format!("{}", vendored.display()))?;
        fs::create_dir_all(&vendored)?;
        let mut copied = 0;
        for e in fs::read_dir(&debian).with_context(|| format!("{}", debian.display()))? {
            let p = e?.path();
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            let source =
                name.ends_with(".go") && !name.ends_with("_test.go") || name.ends_with(".s");
            if p.is_file() && source {
                fs::copy(&p, vendored.join(&*name))?;
                copied += 1;
            }
        }
        if copied == 0 {
            bail!("no Go sources in {}", debian.display());
        }
    }

    step("make WHAT=cmd/kube-apiserver (Go 1.19; the longest step)");
    let go = String::from_utf8_lossy(
        &Command::new("go")
            .arg("version")
            .output()
            .context("cannot run go")?
            .stdout,
    )
    .trim()
    .to_owned();
    let home = work.join("home");
    fs::create_dir_all(&home)?;
    let mut make = Command::new("make");
    make.current_dir(&tree)
        .arg("WHAT=cmd/kube-apiserver")
        // Go's caches and paths inside the build folder, not in $HOME; vendor/ only.
        .env("HOME", &home)
        .env("GOPATH", work.join("gopath"))
        .env("GOCACHE", work.join("gocache"))
        .env("GOMODCACHE", work.join("gopath/pkg/mod"))
        .env("GOTMPDIR", &home)
        .env("GOFLAGS", "-mod=vendor")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0")
        .env_remove("GOROOT")
        .env_remove("GOBIN");
    logged(&mut make, log, "make")?;
    let bin = tree.join("_output/bin/kube-apiserver");
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let version = String::from_utf8_lossy(&version.stdout);
    if version.trim() != format!("Kubernetes v{VERSION}") {
        bail!("{} --version says {version:?}", bin.display());
    }
    step(&format!("fetched and built in {} s", t.elapsed().as_secs()));
    Ok((bin, go))
}

/// Writes a deb-src twin of every `deb` source in `etc` (sources.list and sources.list.d/,
/// one-line and deb822 forms alike; what apt itself reads).
fn write_deb_src(etc: &Path, list: &Path, parts: &Path) -> Result<()> {
    let mut one_line = String::new();
    let mut files = vec![etc.join("sources.list")];
    if let Ok(dir) = fs::read_dir(etc.join("sources.list.d")) {
        let mut names: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        names.sort();
        files.extend(names);
    }
    let mut found = 0;
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".list") {
            for l in text.lines() {
                if let Some(rest) = l.trim_start().strip_prefix("deb ") {
                    one_line.push_str(&format!("deb-src {rest}\n"));
                    found += 1;
                }
            }
        } else if name.ends_with(".sources") {
            // deb822: every stanza whose Types has `deb` gets `Types: deb-src`.
            let mut out = String::new();
            for l in text.lines() {
                match l.strip_prefix("Types:") {
                    Some(types) if types.split_whitespace().any(|t| t == "deb") => {
                        out.push_str("Types: deb-src\n");
                        found += 1;
                    }
                    _ => {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
            fs::write(parts.join(&name), out)?;
        }
    }
    if found == 0 {
        bail!("no `deb` sources in {}/sources.list{{,.d}}", etc.display());
    }
    fs::write(list, one_line)?;
    Ok(())
}

/// Runs with stdout and stderr appended to `log`.
fn logged(cmd: &mut Command, log: &File, what: &str) -> Result<()> {
    let mut l = log;
    writeln!(l, "\n=== {what}: {cmd:?}")?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// The last `n` lines of `s`.
pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb_src_twins_of_both_source_forms() {
        let d = std::env::temp_dir().join(format!("xtask-debsrc-{}", std::process::id()));
        let etc = d.join("etc");
        fs::create_dir_all(etc.join("sources.list.d")).unwrap();
        fs::write(
            etc.join("sources.list"),
            "# comment\ndeb http://mirror.invalid/debian bookworm main\n",
        )
        .unwrap();
        fs::write(
            etc.join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm\n",
        )
        .unwrap();
        fs::write(
            etc.join("sources.list.d/x.list.disabled"),
            "deb http://x/ y z\n",
        )
        .unwrap();
        let parts = d.join("parts");
        fs::create_dir_all(&parts).unwrap();
        write_deb_src(&etc, &d.join("list"), &parts).unwrap();
        assert_eq!(
            fs::read_to_string(d.join("list")).unwrap(),
            "deb-src http://mirror.invalid/debian bookworm main\n"
        );
        assert_eq!(
            fs::read_to_string(parts.join("debian.sources")).unwrap(),
            "Types: deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm\n"
        );
        assert!(!parts.join("x.list.disabled").exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
