//! `cargo xtask image`: the OCI images of the agent and the controller, built
//! without a container daemon.
//!
//! Static musl binaries go into images FROM scratch, one layer each, made with
//! Debian's umoci: it edits an OCI image layout in a folder under target/, so
//! there is no daemon, no storage driver and nothing outside target/ to clean
//! up (buildah would need a container store and, through its package, runc and
//! the CNI plugins). Each image is written as an oci-archive (a tar of an OCI
//! image layout) to `target/images/NAME-VERSION.oci.tar`; `skopeo copy
//! oci-archive:...`, `podman load`, `ctr images import` and `kind load
//! image-archive` read it.
//!
//! Reproducible: every time in the image (file mtimes, `created`, history) is
//! SOURCE_DATE_EPOCH, by default the commit's time, so one commit built twice
//! gives the same layers, configs and digests (as long as the binaries come
//! out the same).

use crate::setup::{have, is_root, output};
use crate::{cargo, run, target_dir};
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The target of the image binaries: statically linked, so that the images
/// need no libc.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// The workspace version (xtask shares it): the images' tag.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const LICENSE: &str = env!("CARGO_PKG_LICENSE");

/// Debian packages used here, with a program each: umoci builds the images,
/// skopeo reads them back (and the image test inspects with it), and
/// musl-gcc compiles ring's C code (rustls, under kube-rs) for the musl target.
const PACKAGES: &[(&str, &str)] = &[
    ("umoci", "umoci"),
    ("skopeo", "skopeo"),
    ("musl-tools", "musl-gcc"),
];

struct Image {
    name: &'static str,
    description: &'static str,
    /// Copied to /usr/local/bin; the first one is the entrypoint.
    binaries: &'static [&'static str],
    /// uid:gid the container runs as.
    user: &'static str,
}

const IMAGES: &[Image] = &[
    Image {
        name: "rpclb-agent",
        description: "rpclb node agent (lb-agent) and BPF map inspector (lbctl)",
        binaries: &["lb-agent", "lbctl"],
        // Root for now: loading and attaching the BPF programs needs CAP_BPF,
        // CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_ADMIN, and the DaemonSet runs
        // the agent privileged (deploy/30-agent.yaml). Running it as a
        // non-root user with only those capabilities is a later change.
        user: "0:0",
    },
    Image {
        name: "rpclb-controller",
        description: "rpclb controller: streams each node's desired state from Kubernetes to the agents",
        binaries: &["lb-controller"],
        // Matches runAsUser/runAsGroup in deploy/20-controller.yaml.
        user: "65532:65532",
    },
];

// Names for the image users (nothing in the binaries looks them up: static
// Rust does no NSS lookups; tools that show a user by name do). No CA bundle:
// the controller's one TLS peer is the API server, which kube-rs checks
// against the in-cluster CA file (/var/run/secrets/kubernetes.io/
// serviceaccount/ca.crt, mounted by Kubernetes) and nothing else, and the
// agent reaches the controller in plaintext.
const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                      nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";

/// What `cargo xtask test` needs from here: whether its cargo test arguments
/// select rpclb-tests, which holds the image test (no `-p` selects all).
pub fn wanted_by_test(args: &[std::ffi::OsString]) -> bool {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .take_while(|a| a != "--")
        .collect();
    let mut packages = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-p" || a == "--package" {
            packages.extend(it.next().cloned());
        } else if let Some(p) = a.strip_prefix("--package=") {
            packages.push(p.to_string());
        } else if let Some(p) = a.strip_prefix("-p").filter(|p| !p.is_empty()) {
            packages.push(p.to_string());
        }
    }
    packages.is_empty() || packages.iter().any(|p| p == "rpclb-tests")
}

/// Builds both images; the eBPF object must be built already (`prepare`).
pub fn build(root: &Path) -> Result<()> {
    ensure_tools()?;
    let t = Instant::now();
    let mut build = cargo(root);
    build.args(["build", "--release", "--target", MUSL]);
    build.args(["-p", "lb-agent", "-p", "lb-controller"]);
    // Without what `cargo run` set for xtask itself: ring's build script
    // reruns when CARGO_PKG_NAME and the like change, which would rebuild
    // ring, rustls and kube-rs between this and a `cargo build` from a shell.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*k,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            build.env_remove(&key);
        }
    }
    run(&mut build).context("static (musl) release build of lb-agent and lb-controller failed")?;
    let built = t.elapsed();
    let bins = target_dir(root).join(MUSL).join("release");
    for img in IMAGES {
        for b in img.binaries {
            check_static(&bins.join(b))?;
        }
    }

    let t = Instant::now();
    let meta = Meta::new(root);
    if meta.source.is_none() {
        println!(
            "image: no org.opencontainers.image.source label (no git remote `origin`; \
             set RPCLB_IMAGE_SOURCE=URL to add one)"
        );
    }
    let out = target_dir(root).join("images");
    let mut done = Vec::new();
    for img in IMAGES {
        done.push(build_one(img, &bins, &out, &meta)?);
    }
    let _ = fs::remove_dir(out.join("work"));
    println!(
        "image: musl build {}, images {} (revision {}, created {})",
        secs(built),
        secs(t.elapsed()),
        meta.revision,
        meta.created
    );
    for (path, size, digest) in done {
        println!(
            "image: {}  {:.1} MiB  {digest}",
            path.display(),
            size as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// The musl target and the Debian packages, each installed only when missing.
fn ensure_tools() -> Result<()> {
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|l| l.trim() == MUSL) {
        run(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(pkg, tool)| !dpkg_installed(pkg, tool))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {} (as root: apt-get install -y {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!("image: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        output(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)?;
    Ok(())
}

/// Whether dpkg has `pkg` installed; off Debian, whether `tool` is on PATH.
fn dpkg_installed(pkg: &str, tool: &str) -> bool {
    match Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .output()
    {
        Ok(o) => o.status.success() && o.stdout == b"installed",
        Err(_) => have(tool),
    }
}

/// Fails unless `path` is an ELF executable without a program interpreter
/// (PT_INTERP), that is, statically linked (static-pie included).
fn check_static(path: &Path) -> Result<()> {
    let elf = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    // 64-bit, little-endian ELF, of type EXEC or DYN (static-pie).
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01") && matches!(u16_at(16), Some(2 | 3)),
        "{} is not an x86-64 ELF executable",
        path.display()
    );
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{}: truncated ELF header", path.display());
    };
    for i in 0..usize::from(phnum) {
        let p_type = u32_at(phoff as usize + i * usize::from(phentsize))
            .with_context(|| format!("{}: truncated program headers", path.display()))?;
        const PT_INTERP: u32 = 3;
        ensure!(
            p_type != PT_INTERP,
            "{} is dynamically linked (it has a program interpreter)",
            path.display()
        );
    }
    Ok(())
}

/// What the labels say about the source.
struct Meta {
    /// SOURCE_DATE_EPOCH, or the commit's time.
    epoch: u64,
    /// `epoch` in RFC 3339.
    created: String,
    /// The commit, with `-dirty` when tracked files differ from it.
    revision: String,
    source: Option<String>,
}

impl Meta {
    fn new(root: &Path) -> Meta {
        let git = |args: &[&str]| {
            output(Command::new("git").arg("-C").arg(root).args(args))
                .ok()
                .map(|s| s.trim().to_string())
        };
        let epoch = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .or_else(|| git(&["log", "-1", "--format=%ct"])?.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            });
        let revision = match git(&["rev-parse", "HEAD"]) {
            Some(head) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
                Some(s) if s.is_empty() => head,
                _ => format!("{head}-dirty"),
            },
            None => "unknown".into(),
        };
        let source = std::env::var("RPCLB_IMAGE_SOURCE")
            .ok()
            .or_else(|| git(&["remote", "get-url", "origin"]).map(|u| without_userinfo(&u)))
            .filter(|s| !s.is_empty());
        Meta {
            epoch,
            created: rfc3339(epoch),
            revision,
            source,
        }
    }
}

/// `https://user:token@host/x` → `https://host/x`: no credentials in a label.
fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
    }
}

/// Seconds since 1970 as `YYYY-MM-DDThh:mm:ssZ` (days to civil date after
/// H. Hinnant's algorithm).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Builds one image and writes its archive; returns (path, size, manifest digest).
fn build_one(img: &Image, bins: &Path, out: &Path, meta: &Meta) -> Result<(PathBuf, u64, String)> {
    let work = out.join("work").join(img.name);
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    let image = format!("{}:{VERSION}", layout.display());
    let umoci = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new("umoci");
        cmd.args(args);
        output(&mut cmd).map(drop)
    };
    // Without root, umoci maps the caller to root in the layer.
    let rootless: &[&str] = if is_root() { &[] } else { &["--rootless"] };
    let bundle_s = bundle.to_str().context("a non-UTF-8 path")?;

    umoci(&[
        "init",
        "--layout",
        layout.to_str().context("a non-UTF-8 path")?,
    ])?;
    umoci(&["new", "--image", &image])?;
    // The layer is made by unpack + repack of a bundle: umoci 0.4.7's
    // `insert` writes a layer tar without its end-of-archive blocks.
    umoci(&[&["unpack"], rootless, &["--image", &image, bundle_s]].concat())?;
    fill_rootfs(&bundle.join("rootfs"), img, bins, meta.epoch)?;
    umoci(
        &[
            &["repack"],
            rootless,
            &["--image", &image],
            &["--history.created", &meta.created],
            &["--history.created_by", "cargo xtask image"],
            &[bundle_s],
        ]
        .concat(),
    )?;

    let entrypoint = format!("/usr/local/bin/{}", img.binaries[0]);
    let mut labels = vec![
        ("title", img.name.to_string()),
        ("description", img.description.to_string()),
        ("version", VERSION.to_string()),
        ("revision", meta.revision.clone()),
        ("licenses", LICENSE.to_string()),
        ("created", meta.created.clone()),
    ];
    if let Some(s) = &meta.source {
        labels.push(("source", s.clone()));
    }
    let mut config: Vec<String> = [
        "config",
        "--image",
        &image,
        "--no-history",
        "--created",
        &meta.created,
        "--config.entrypoint",
        &entrypoint,
        "--config.user",
        img.user,
        // For `kubectl exec POD -- lbctl ...`.
        "--config.env",
        "PATH=/usr/local/bin",
    ]
    .map(String::from)
    .into();
    // The same pairs as config labels (what `docker inspect` and `skopeo
    // inspect` show) and as manifest annotations (what OCI registries index).
    for (k, v) in &labels {
        let kv = format!("org.opencontainers.image.{k}={v}");
        config.extend(["--config.label".into(), kv.clone()]);
        config.extend(["--manifest.annotation".into(), kv]);
    }
    umoci(&config.iter().map(String::as_str).collect::<Vec<_>>())?;
    umoci(&["gc", "--layout", layout.to_str().unwrap()])?;

    let digest = name_in_index(&layout, img.name)?;
    fs::create_dir_all(out)?;
    let archive = out.join(format!("{}-{VERSION}.oci.tar", img.name));
    let tmp = archive.with_extension("tar.tmp");
    // A tar of the layout, with fixed times, owners and order.
    run(Command::new("tar")
        .arg("--create")
        .arg("--file")
        .arg(&tmp)
        .arg("--directory")
        .arg(&layout)
        .args([
            "--format=ustar",
            "--sort=name",
            &format!("--mtime=@{}", meta.epoch),
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mode=u=rwX,go=rX",
            "oci-layout",
            "index.json",
            "blobs",
        ]))?;
    fs::rename(&tmp, &archive)?;

    // containers/image must read back what was written.
    let seen = output(Command::new("skopeo").args([
        "inspect",
        "--format",
        "{{.Digest}}",
        &format!("oci-archive:{}", archive.display()),
    ]))?;
    ensure!(
        seen.trim() == digest,
        "skopeo reads {} as {}, not {digest}",
        archive.display(),
        seen.trim()
    );
    fs::remove_dir_all(&work)?;
    let size = fs::metadata(&archive)?.len();
    Ok((archive, size, digest))
}

/// The files of the image: the binaries, /etc/passwd and /etc/group, every
/// mtime at `epoch`.
fn fill_rootfs(rootfs: &Path, img: &Image, bins: &Path, epoch: u64) -> Result<()> {
    let bin_dir = rootfs.join("usr/local/bin");
    let etc = rootfs.join("etc");
    for d in [&bin_dir, &etc] {
        fs::create_dir_all(d)?;
    }
    for b in img.binaries {
        let to = bin_dir.join(b);
        fs::copy(bins.join(b), &to).with_context(|| format!("copying {b}"))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755))?;
    }
    for (name, text) in [("passwd", PASSWD), ("group", GROUP)] {
        let to = etc.join(name);
        fs::write(&to, text)?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o644))?;
    }
    set_times(rootfs, SystemTime::UNIX_EPOCH + Duration::from_secs(epoch))
}

/// Sets the mtime of `path` and everything below it (children first, since
/// setting a child's time leaves its folder's alone but writing into it does
/// not), and folders to mode 0755.
fn set_times(path: &Path, t: SystemTime) -> Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for e in fs::read_dir(path)? {
            set_times(&e?.path(), t)?;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    }
    File::open(path)
        .and_then(|f| f.set_modified(t))
        .with_context(|| format!("setting the mtime of {}", path.display()))
}

/// Annotates the layout's one manifest in index.json: its platform (for
/// importers that pick one), its full name `docker.io/library/NAME:VERSION`
/// (what a Pod's `image: NAME:VERSION` resolves to) as
/// `io.containerd.image.name`, which `ctr images import`, `kind load` and
/// podman use, and its tag as `org.opencontainers.image.ref.name` (the OCI
/// layout's own convention, which skopeo reads). Returns the manifest's digest.
fn name_in_index(layout: &Path, name: &str) -> Result<String> {
    let path = layout.join("index.json");
    let index: Value = serde_json::from_slice(&fs::read(&path)?)?;
    let [desc] = index["manifests"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    else {
        bail!("{}: expected one manifest", path.display());
    };
    let mut desc = desc.clone();
    desc["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    desc["annotations"] = json!({
        "io.containerd.image.name": format!("docker.io/library/{name}:{VERSION}"),
        "org.opencontainers.image.ref.name": VERSION,
    });
    let digest = desc["digest"].as_str().context("no digest")?.to_string();
    let index = json!({ "schemaVersion": 2, "manifests": [desc] });
    fs::write(&path, serde_json::to_vec(&index)?)?;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn test_arguments_select_the_image_test() {
        let w = |a: &[&str]| wanted_by_test(&a.iter().map(Into::into).collect::<Vec<_>>());
        assert!(w(&[]));
        assert!(w(&["--", "-p", "x"]));
        assert!(w(&["-p", "rpclb-tests"]));
        assert!(w(&["--package=rpclb-tests", "images"]));
        assert!(!w(&["-p", "lb-agent", "--", "--nocapture"]));
        assert!(!w(&["-plb-agent"]));
    }

    #[test]
    fn credentials_stay_out_of_the_source_label() {
        assert_eq!(
            without_userinfo("https://u:t@example.org/a/b.git"),
            "https://example.org/a/b.git"
        );
        assert_eq!(without_userinfo("git@host:a/b"), "git@host:a/b");
    }
}
