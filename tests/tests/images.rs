//! The OCI images that `cargo xtask image` writes to target/images/ (`cargo
//! xtask test` builds them before the tests run).
//!
//! For each archive: what skopeo reads in it (entrypoint, user, one layer, the
//! OCI labels and annotations), the files in its layer (only the expected
//! ones; the binaries static, and running with nothing but the layer around
//! them), and the workload in deploy/ that runs it: the same image name and
//! tag, the image's entrypoint, arguments that the entrypoint accepts, and
//! the image's user. deploy/ must name exactly these two images.
//!
//! A missing archive, or a missing skopeo, fails: run `cargo xtask image`.
//! The binaries run in a chroot of the layer as root; without root they run
//! in place (still a static binary, but not proven alone).

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VERSION: &str = env!("CARGO_PKG_VERSION");

struct Expect {
    image: &'static str,
    /// The workload in deploy/ that runs it: kind, name, container.
    workload: (&'static str, &'static str, &'static str),
    /// In /usr/local/bin; the first is the entrypoint.
    binaries: &'static [&'static str],
    user: (u32, u32),
}

const AGENT: Expect = Expect {
    image: "rpclb-agent",
    workload: ("DaemonSet", "rpclb-agent", "agent"),
    binaries: &["lb-agent", "lbctl"],
    // Root, with only the agent's capabilities (see the check below): Kubernetes has no
    // ambient capabilities, so a non-root container's added ones are never effective.
    user: (0, 0),
};

const CONTROLLER: Expect = Expect {
    image: "rpclb-controller",
    workload: ("Deployment", "rpclb-controller", "controller"),
    binaries: &["lb-controller"],
    user: (65532, 65532),
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// target/images, as `cargo xtask image` computes it.
fn images_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), |d| root().join(d));
    target.join("images")
}

fn archive(image: &str) -> PathBuf {
    let path = images_dir().join(format!("{image}-{VERSION}.oci.tar"));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask image` (`cargo xtask test` runs it too)",
        path.display()
    );
    path
}

fn ok(what: &str, out: std::io::Result<Output>) -> String {
    let out = out.unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo").args(args).output();
    if out
        .as_ref()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        panic!("skopeo is not installed: `cargo xtask image` installs it");
    }
    ok(&format!("skopeo {}", args.join(" ")), out)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

/// A folder removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The image copied out of its archive by skopeo (which checks every blob's
/// digest on the way) and its one layer extracted to `rootfs`.
fn unpack(image: &str, path: &Path) -> Scratch {
    let dir = images_dir().join(format!("test-{image}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let scratch = Scratch(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("copy");
    skopeo(&[
        // A local archive to a local folder: no signatures to check.
        "--insecure-policy",
        "copy",
        "--quiet",
        &format!("oci-archive:{}", path.display()),
        &format!("dir:{}", copy.display()),
    ]);
    let manifest = json(&std::fs::read_to_string(copy.join("manifest.json")).unwrap());
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{image}: {layers:?}");
    let blob = layers[0]["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap();
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    ok(
        "tar",
        Command::new("tar")
            .arg("-xzf")
            .arg(copy.join(blob))
            .arg("-C")
            .arg(&rootfs)
            .output(),
    );
    scratch
}

/// Every non-directory under `dir`, relative to it.
fn files(dir: &Path, base: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            files(&p, base, out);
        } else {
            out.insert(p.strip_prefix(base).unwrap().display().to_string());
        }
    }
}

/// An x86-64 ELF executable without a program interpreter: statically linked.
fn assert_static_elf(path: &Path) {
    let elf = std::fs::read(path).unwrap();
    let n16 = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    assert!(
        elf.starts_with(b"\x7fELF\x02\x01") && matches!(n16(16), 2 | 3),
        "{}: not an x86-64 ELF executable",
        path.display()
    );
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    for i in 0..n16(0x38) {
        let at = phoff + i * n16(0x36);
        let p_type = u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
        assert_ne!(p_type, 3, "{}: has PT_INTERP (dynamic)", path.display());
    }
}

/// Runs `/usr/local/bin/BIN ARGS` from the layer: chrooted into it as root,
/// with an empty environment and a time limit.
fn run_in(rootfs: &Path, bin: &str, args: &[String]) -> String {
    let inside = format!("/usr/local/bin/{bin}");
    let mut cmd = Command::new("timeout");
    cmd.arg("20");
    if is_root() {
        cmd.arg("chroot").arg(rootfs).arg(&inside);
    } else {
        cmd.arg(rootfs.join(inside.trim_start_matches('/')));
    }
    let out = cmd
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output();
    ok(&format!("{bin} {}", args.join(" ")), out)
}

fn manifests() -> Vec<Value> {
    let mut docs = Vec::new();
    for file in ["20-controller.yaml", "30-agent.yaml"] {
        let text = std::fs::read_to_string(root().join("deploy").join(file)).unwrap();
        let values: Vec<Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        docs.extend(values);
    }
    docs
}

fn yaml_str<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

fn yaml_strings(v: Option<&Value>) -> Option<Vec<String>> {
    Some(
        v?.as_array()?
            .iter()
            .map(|s| s.as_str().expect("a string").to_string())
            .collect(),
    )
}

/// Every container of every workload in deploy/, with its pod spec.
fn containers() -> Vec<(String, String, Value, Value)> {
    let mut out = Vec::new();
    for d in manifests() {
        let kind = yaml_str(&d, &["kind"]).unwrap_or_default().to_string();
        if !matches!(kind.as_str(), "Deployment" | "DaemonSet") {
            continue;
        }
        let name = yaml_str(&d, &["metadata", "name"]).unwrap().to_string();
        let pod = d["spec"]["template"]["spec"].clone();
        let inits = pod["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for c in pod["containers"].as_array().unwrap().iter().chain(&inits) {
            out.push((kind.clone(), name.clone(), pod.clone(), c.clone()));
        }
    }
    out
}

/// `$(VAR)` in `args` replaced as the kubelet does, for the container's env vars with a
/// literal `value` or the pod IP (`status.podIP`, here a documentation address): the
/// listeners bind `$(RPCLB_POD_IP):PORT`, which the binaries parse as an address. Others
/// (a ConfigMap's value, the node name) stay as written: any string parses there.
fn kubelet_expand(container: &Value, args: Vec<String>) -> Vec<String> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().cloned().unwrap_or_default() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" {
            "192.0.2.10".to_string()
        } else {
            continue;
        };
        // An env value may refer to an earlier one, as in the kubelet.
        let value = vars
            .iter()
            .fold(value, |v, (n, x)| v.replace(&format!("$({n})"), x));
        vars.push((name, value));
    }
    args.into_iter()
        .map(|a| {
            vars.iter()
                .fold(a, |a, (n, x)| a.replace(&format!("$({n})"), x))
        })
        .collect()
}

/// The git commit of the worktree, as the revision label gives it.
fn git_revision() -> Option<String> {
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(root())
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "HEAD"])?;
    let clean = git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    Some(if clean { head } else { format!("{head}-dirty") })
}

fn check_image(e: &Expect) {
    let path = archive(e.image);
    let target = format!("oci-archive:{}", path.display());

    // The config: entrypoint, user, environment, one layer.
    let config = json(&skopeo(&["inspect", "--config", &target]));
    let c = &config["config"];
    let entrypoint = format!("/usr/local/bin/{}", e.binaries[0]);
    assert_eq!(c["Entrypoint"], serde_json::json!([entrypoint]), "{c}");
    assert!(
        c["Cmd"].is_null(),
        "no Cmd: the manifests give the args: {c}"
    );
    let user = format!("{}:{}", e.user.0, e.user.1);
    assert_eq!(c["User"], user.as_str(), "{c}");
    assert_eq!(c["Env"], serde_json::json!(["PATH=/usr/local/bin"]), "{c}");
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");

    // Labels on the config, the same as annotations on the manifest.
    let labels = c["Labels"].as_object().expect("labels");
    let label = |k: &str| {
        labels
            .get(&format!("org.opencontainers.image.{k}"))
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{}: no label {k}: {labels:?}", e.image))
    };
    assert_eq!(label("title"), e.image);
    assert_eq!(label("version"), VERSION);
    assert_eq!(label("licenses"), "Apache-2.0");
    assert!(!label("description").is_empty());
    let created = label("created");
    assert_eq!(config["created"], created, "config created = label");
    assert!(
        created.len() == 20 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "created: {created}"
    );
    match git_revision() {
        Some(rev) => assert_eq!(
            label("revision"),
            rev,
            "the archive is older than the worktree: run `cargo xtask image`"
        ),
        None => assert!(!label("revision").is_empty()),
    }
    if let Some(source) = labels.get("org.opencontainers.image.source") {
        let s = source.as_str().unwrap();
        assert!(
            !s.is_empty() && !s.split("://").nth(1).unwrap_or("").contains('@'),
            "source: {s}"
        );
    } else {
        eprintln!(
            "{}: no source label (no git remote `origin`, no RPCLB_IMAGE_SOURCE)",
            e.image
        );
    }
    let manifest = json(&skopeo(&["inspect", "--raw", &target]));
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
    assert_eq!(
        manifest["annotations"].as_object(),
        Some(labels),
        "manifest annotations = config labels"
    );
    let inspect = json(&skopeo(&["inspect", &target]));
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 1);

    // The layer: exactly these files.
    let scratch = unpack(e.image, &path);
    let rootfs = scratch.0.join("rootfs");
    let mut found = BTreeSet::new();
    files(&rootfs, &rootfs, &mut found);
    let mut expected: BTreeSet<String> = ["etc/passwd", "etc/group"].map(String::from).into();
    expected.extend(e.binaries.iter().map(|b| format!("usr/local/bin/{b}")));
    assert_eq!(found, expected, "{}: the files in the layer", e.image);

    // The user has a name.
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    let prefix = format!(":x:{}:{}:", e.user.0, e.user.1);
    assert!(
        passwd.lines().any(|l| l.contains(&prefix)),
        "no passwd entry for {user}: {passwd}"
    );
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap();
    assert!(
        group
            .lines()
            .any(|l| l.split(':').nth(2) == Some(&e.user.1.to_string())),
        "no group {}: {group}",
        e.user.1
    );

    // Static binaries that run alone.
    for b in e.binaries {
        assert_static_elf(&rootfs.join("usr/local/bin").join(b));
        let v = run_in(&rootfs, b, &["--version".into()]);
        assert!(v.contains(VERSION), "{b} --version: {v}");
    }

    // The workload that runs this image.
    let (kind, name, cname) = e.workload;
    let (_, _, pod, container) = containers()
        .into_iter()
        .find(|(k, n, _, c)| k == kind && n == name && yaml_str(c, &["name"]) == Some(cname))
        .unwrap_or_else(|| panic!("deploy/ has no {kind} {name} with a container {cname}"));
    assert_eq!(
        yaml_str(&container, &["image"]),
        Some(format!("{}:{VERSION}", e.image).as_str())
    );
    // The image's entrypoint runs: no command, or that one.
    if let Some(cmd) = yaml_strings(container.get("command")) {
        assert_eq!(cmd, [entrypoint.as_str()], "{name}: command");
    }
    // ...and accepts the arguments (`--help` after them stops it once they parse).
    let mut args = kubelet_expand(
        &container,
        yaml_strings(container.get("args")).unwrap_or_default(),
    );
    args.push("--help".into());
    run_in(&rootfs, e.binaries[0], &args);
    // Commands that the kubelet runs in the container (hooks, exec probes)
    // exist in the image: it has no shell or /bin/true.
    for (key, sub) in [
        ("lifecycle", "preStop"),
        ("lifecycle", "postStart"),
        ("livenessProbe", ""),
        ("readinessProbe", ""),
        ("startupProbe", ""),
    ] {
        let mut v = container.get(key);
        if !sub.is_empty() {
            v = v.and_then(|v| v.get(sub));
        }
        if let Some(cmd) = yaml_strings(v.and_then(|v| v.get("exec")?.get("command"))) {
            let prog = Path::new(&cmd[0]);
            let prog = if prog.is_absolute() {
                rootfs.join(prog.strip_prefix("/").unwrap())
            } else {
                rootfs.join("usr/local/bin").join(prog)
            };
            assert!(
                prog.is_file(),
                "{name}: {key} runs {cmd:?}, not in the image"
            );
        }
    }
    // The user: the pod may only restate the image's; root only where the
    // container is privileged anyway.
    for sc in [&pod["securityContext"], &container["securityContext"]] {
        if let Some(uid) = sc.get("runAsUser").and_then(Value::as_u64) {
            assert_eq!(uid, u64::from(e.user.0), "{name}: runAsUser");
        }
        if let Some(gid) = sc.get("runAsGroup").and_then(Value::as_u64) {
            assert_eq!(gid, u64::from(e.user.1), "{name}: runAsGroup");
        }
    }
    if e.user.0 == 0 {
        // Root, but unprivileged, with every capability dropped but the agent's list.
        let sc = &container["securityContext"];
        assert_ne!(sc["privileged"].as_bool(), Some(true), "{name}");
        assert_eq!(
            yaml_strings(sc["capabilities"].get("drop")),
            Some(vec!["ALL".to_string()]),
            "{name}"
        );
        assert_eq!(
            yaml_strings(sc["capabilities"].get("add")).unwrap_or_default(),
            rpclb_tests::privileges::AGENT_CAPABILITIES,
            "{name}"
        );
        // The pod's init containers that run this image (mount-bpf-fs) run its
        // entrypoint with arguments it accepts.
        for (_, _, _, init) in containers().into_iter().filter(|(k, n, _, c)| {
            k == kind
                && n == name
                && yaml_str(c, &["name"]) != Some(cname)
                && yaml_str(c, &["image"]) == yaml_str(&container, &["image"])
        }) {
            assert!(init.get("command").is_none(), "{name}: init command");
            let mut args = yaml_strings(init.get("args")).unwrap_or_default();
            args.push("--help".into());
            run_in(&rootfs, e.binaries[0], &args);
        }
    } else {
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{name}"
        );
    }
}

#[test]
fn agent_image() {
    check_image(&AGENT);
}

#[test]
fn controller_image() {
    check_image(&CONTROLLER);
}

/// deploy/ runs these two images and no other, and each archive is named for
/// the container runtimes as the Pods name it (`image: NAME:TAG` is
/// docker.io/library/NAME:TAG).
#[test]
fn deploy_names_exactly_these_images() {
    let named: BTreeSet<String> = containers()
        .iter()
        .map(|(_, _, _, c)| yaml_str(c, &["image"]).unwrap().to_string())
        .collect();
    let built: BTreeSet<String> = [AGENT.image, CONTROLLER.image]
        .map(|i| format!("{i}:{VERSION}"))
        .into();
    assert_eq!(named, built);
    for image in [AGENT.image, CONTROLLER.image] {
        let index = ok(
            "tar",
            Command::new("tar")
                .arg("-xOf")
                .arg(archive(image))
                .arg("index.json")
                .output(),
        );
        let index = json(&index);
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1, "{index}");
        let platform = &manifests[0]["platform"];
        assert_eq!(
            (&platform["os"], &platform["architecture"]),
            (&"linux".into(), &"amd64".into()),
            "{index}"
        );
        let a = &manifests[0]["annotations"];
        assert_eq!(
            a["io.containerd.image.name"],
            format!("docker.io/library/{image}:{VERSION}").as_str(),
            "{index}"
        );
        assert_eq!(a["org.opencontainers.image.ref.name"], VERSION, "{index}");
    }
}
