//! The Kubernetes manifests in deploy/ agree with each other, with the
//! controller's code (what it watches) and with the images that `cargo xtask
//! image` builds (the archives themselves are checked by the rpclb-tests
//! crate's tests/images.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use lb_controller::watch::WATCHED;
use serde_json::Value;

const NAMESPACE: &str = "rpclb-system";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A parsed document and the file it came from.
struct Doc {
    file: String,
    v: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        str_at(&self.v, &["kind"]).unwrap_or_default()
    }
    fn name(&self) -> &str {
        str_at(&self.v, &["metadata", "name"]).unwrap_or_default()
    }
    fn namespace(&self) -> Option<&str> {
        str_at(&self.v, &["metadata", "namespace"])
    }
}

fn load() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/");
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        // Every document of the stream; empty ones are skipped.
        let values: Vec<Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        for v in values {
            docs.push(Doc {
                file: file.clone(),
                v,
            });
        }
    }
    docs
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path)?.as_str()
}

fn seq_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

fn one<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}");
    found[0]
}

fn container<'a>(workload: &'a Doc, name: &str) -> &'a Value {
    seq_at(&workload.v, &["spec", "template", "spec", "containers"])
        .iter()
        .find(|c| str_at(c, &["name"]) == Some(name))
        .unwrap_or_else(|| panic!("{}: no container {name}", workload.name()))
}

/// The value after `flag` in a container's args (`--flag value` or
/// `--flag=value`).
fn arg(c: &Value, flag: &str) -> Option<String> {
    let args = strings(at(c, &["args"]).expect("args"));
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{flag}=")).map(str::to_string)
        }
    })
}

/// The port of a listener flag. In deploy/ every listener binds the pod's IP
/// (`$(RPCLB_POD_IP):PORT`, the env var from the downward API's
/// `status.podIP`), never 0.0.0.0: checked here.
fn addr_port(c: &Value, flag: &str) -> u16 {
    let v = arg(c, flag).unwrap_or_else(|| panic!("no {flag}"));
    let port = v
        .strip_prefix("$(RPCLB_POD_IP):")
        .unwrap_or_else(|| panic!("{flag} {v}: not $(RPCLB_POD_IP):PORT"));
    let env = seq_at(c, &["env"])
        .iter()
        .find(|e| str_at(e, &["name"]) == Some("RPCLB_POD_IP"))
        .unwrap_or_else(|| panic!("{flag}: no RPCLB_POD_IP in env"));
    assert_eq!(
        str_at(env, &["valueFrom", "fieldRef", "fieldPath"]),
        Some("status.podIP")
    );
    // What the binary parses once Kubernetes has put the address in.
    format!("10.0.0.1:{port}")
        .parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{flag} {v}: {e}"))
        .port()
}

/// A probe's or Service's port: a number, or a container port's name.
fn resolve_port(c: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    let name = port.as_str().expect("port is a number or a name");
    seq_at(c, &["ports"])
        .iter()
        .find(|p| str_at(p, &["name"]) == Some(name))
        .and_then(|p| at(p, &["containerPort"])?.as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}")) as u16
}

fn container_ports(c: &Value) -> BTreeSet<u16> {
    seq_at(c, &["ports"])
        .iter()
        .map(|p| at(p, &["containerPort"]).unwrap().as_u64().unwrap() as u16)
        .collect()
}

fn env_names(c: &Value) -> BTreeSet<String> {
    seq_at(c, &["env"])
        .iter()
        .map(|e| str_at(e, &["name"]).unwrap().to_string())
        .collect()
}

fn workloads(docs: &[Doc]) -> impl Iterator<Item = &Doc> {
    docs.iter()
        .filter(|d| matches!(d.kind(), "Deployment" | "DaemonSet"))
}

#[test]
fn every_document_is_a_named_object_in_the_rpclb_namespace() {
    let docs = load();
    let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"];
    for d in &docs {
        for field in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
            assert!(
                str_at(&d.v, field).is_some_and(|s| !s.is_empty()),
                "{}: a document without {}",
                d.file,
                field.join(".")
            );
        }
        if cluster_scoped.contains(&d.kind()) {
            assert_eq!(d.namespace(), None, "{}: {} {}", d.file, d.kind(), d.name());
        } else {
            assert_eq!(
                d.namespace(),
                Some(NAMESPACE),
                "{}: {} {}",
                d.file,
                d.kind(),
                d.name()
            );
        }
    }
    one(&docs, "Namespace", NAMESPACE);
    // Unique (kind, namespace, name).
    let mut seen = BTreeSet::new();
    for d in &docs {
        assert!(
            seen.insert((d.kind(), d.namespace(), d.name())),
            "{}: {} {} twice",
            d.file,
            d.kind(),
            d.name()
        );
    }
}

/// Verbs by (apiGroup, resource) over a role's rules.
fn grants(role: &Doc) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in seq_at(&role.v, &["rules"]) {
        let verbs = strings(at(rule, &["verbs"]).unwrap());
        for g in strings(at(rule, &["apiGroups"]).unwrap()) {
            for r in strings(at(rule, &["resources"]).unwrap()) {
                out.entry((g.clone(), r)).or_default().extend(verbs.clone());
            }
        }
    }
    out
}

fn has(grants: &BTreeMap<(String, String), BTreeSet<String>>, g: &str, r: &str, verbs: &[&str]) {
    let got = grants
        .get(&(g.to_string(), r.to_string()))
        .unwrap_or_else(|| panic!("no rule for {g:?}/{r}"));
    for v in verbs {
        assert!(got.contains(*v), "{g:?}/{r}: no {v} in {got:?}");
    }
}

#[test]
fn the_controller_may_list_and_watch_exactly_what_it_watches() {
    let docs = load();
    let role = grants(one(&docs, "ClusterRole", "rpclb-controller"));
    let listed_and_watched: BTreeSet<(String, String)> = role
        .iter()
        .filter(|(_, v)| v.contains("list") && v.contains("watch"))
        .map(|(k, _)| k.clone())
        .collect();
    let watched: BTreeSet<(String, String)> = WATCHED
        .iter()
        .map(|w| (w.group.to_string(), w.resource.to_string()))
        .collect();
    assert_eq!(listed_and_watched, watched);

    // Events on Services (events.k8s.io/v1, what lb_controller::events writes).
    has(
        &role,
        "events.k8s.io",
        "events",
        &["create", "get", "patch"],
    );
    // Nothing that writes Services, slices or nodes.
    for ((g, r), verbs) in &role {
        if r != "events" {
            assert!(
                verbs
                    .iter()
                    .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
                "{g:?}/{r}: {verbs:?}"
            );
        }
    }

    // Leader election: a namespaced Role on leases.
    let lease_role = grants(one(&docs, "Role", "rpclb-controller-leader-election"));
    has(
        &lease_role,
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    );
}

#[test]
fn bindings_tie_existing_roles_to_existing_service_accounts() {
    let docs = load();
    let accounts: BTreeSet<(&str, &str)> = docs
        .iter()
        .filter(|d| d.kind() == "ServiceAccount")
        .map(|d| (d.namespace().unwrap(), d.name()))
        .collect();
    let mut bound = BTreeSet::new();
    for b in docs
        .iter()
        .filter(|d| matches!(d.kind(), "ClusterRoleBinding" | "RoleBinding"))
    {
        let kind = str_at(&b.v, &["roleRef", "kind"]).unwrap();
        let name = str_at(&b.v, &["roleRef", "name"]).unwrap();
        let role = one(&docs, kind, name);
        if kind == "Role" {
            assert_eq!(role.namespace(), b.namespace(), "{}", b.name());
        }
        for s in seq_at(&b.v, &["subjects"]) {
            assert_eq!(str_at(s, &["kind"]), Some("ServiceAccount"));
            let sa = (
                str_at(s, &["namespace"]).unwrap(),
                str_at(s, &["name"]).unwrap(),
            );
            assert!(accounts.contains(&sa), "{}: unknown {sa:?}", b.name());
            bound.insert(sa.1.to_string());
        }
    }
    assert!(bound.contains("rpclb-controller"));
    assert!(
        !bound.contains("rpclb-agent"),
        "the agent needs no API access"
    );

    for w in workloads(&docs) {
        let sa = str_at(&w.v, &["spec", "template", "spec", "serviceAccountName"])
            .unwrap_or_else(|| panic!("{}: no serviceAccountName", w.name()));
        assert!(
            accounts.contains(&(w.namespace().unwrap(), sa)),
            "{}: unknown service account {sa}",
            w.name()
        );
    }
}

#[test]
fn workloads_select_their_own_pods_and_define_what_they_reference() {
    let docs = load();
    for w in workloads(&docs) {
        let selector = at(&w.v, &["spec", "selector", "matchLabels"])
            .and_then(Value::as_object)
            .expect("matchLabels");
        let labels = at(&w.v, &["spec", "template", "metadata", "labels"])
            .and_then(Value::as_object)
            .expect("pod labels");
        for (k, v) in selector {
            assert_eq!(labels.get(k), Some(v), "{}: selector {k:?}", w.name());
        }
        for c in seq_at(&w.v, &["spec", "template", "spec", "containers"]) {
            // $(VAR) in args must be a defined env var, or Kubernetes passes
            // it literally.
            let env = env_names(c);
            for a in strings(at(c, &["args"]).unwrap()) {
                if let Some(var) = a.strip_prefix("$(").and_then(|r| r.strip_suffix(')')) {
                    assert!(env.contains(var), "{}: $({var}) is not in env", w.name());
                }
            }
            for e in seq_at(c, &["env"]) {
                if let Some(r) = at(e, &["valueFrom", "configMapKeyRef"]) {
                    let cm = one(&docs, "ConfigMap", str_at(r, &["name"]).unwrap());
                    let key = str_at(r, &["key"]).unwrap();
                    assert!(
                        str_at(&cm.v, &["data", key]).is_some_and(|v| !v.is_empty()),
                        "ConfigMap {} has no {key}",
                        cm.name()
                    );
                }
            }
            // Probes hit declared ports.
            for probe in ["livenessProbe", "readinessProbe"] {
                if let Some(port) = at(c, &[probe, "httpGet", "port"]) {
                    let p = resolve_port(c, port);
                    assert!(container_ports(c).contains(&p), "{}: {probe}", w.name());
                }
            }
        }
    }
}

/// The path under `flag` is inside one of the container's read-only mounts;
/// returns that mount's volume.
fn tls_file_volume<'a>(w: &'a Doc, c: &Value, flag: &str) -> &'a Value {
    let path = arg(c, flag).unwrap_or_else(|| panic!("{}: no {flag}", w.name()));
    let mount = seq_at(c, &["volumeMounts"])
        .iter()
        .find(|m| str_at(m, &["mountPath"]).is_some_and(|p| path.starts_with(&format!("{p}/"))))
        .unwrap_or_else(|| panic!("{}: {flag} {path} is in no mount", w.name()));
    assert_eq!(
        at(mount, &["readOnly"]).and_then(Value::as_bool),
        Some(true),
        "{}: the TLS mount is read-only",
        w.name()
    );
    let name = str_at(mount, &["name"]).unwrap();
    seq_at(&w.v, &["spec", "template", "spec", "volumes"])
        .iter()
        .find(|v| str_at(v, &["name"]) == Some(name))
        .unwrap_or_else(|| panic!("{}: no volume {name}", w.name()))
}

#[test]
fn the_stream_is_mutual_tls_with_mounted_files() {
    let docs = load();
    // The controller: its Secret, read-only.
    let deploy = one(&docs, "Deployment", "rpclb-controller");
    let c = container(deploy, "controller");
    for flag in ["--tls-ca", "--tls-cert", "--tls-key"] {
        let v = tls_file_volume(deploy, c, flag);
        assert_eq!(
            str_at(v, &["secret", "secretName"]),
            Some("rpclb-controller-tls")
        );
    }
    // The agent: its node's own files on the host, read-only.
    let ds = one(&docs, "DaemonSet", "rpclb-agent");
    let a = container(ds, "agent");
    for flag in ["--tls-ca", "--tls-cert", "--tls-key"] {
        let v = tls_file_volume(ds, a, flag);
        assert_eq!(str_at(v, &["hostPath", "path"]), Some("/etc/rpclb/tls"));
        assert_eq!(str_at(v, &["hostPath", "type"]), Some("Directory"));
    }
    // https://, to a name the certificates of `lb-controller certs` carry; never --insecure.
    let url = arg(a, "--controller").unwrap();
    let host = url
        .strip_prefix("https://")
        .and_then(|r| r.split(':').next())
        .expect("https://HOST:PORT");
    assert!(
        lb_api::tls::certs::CONTROLLER_NAMES.contains(&host),
        "{host} is not in the controller certificate's default names"
    );
    for (w, c) in [(deploy, c), (ds, a)] {
        let args = strings(at(c, &["args"]).unwrap());
        assert!(
            !args.iter().any(|a| a.starts_with("--insecure")),
            "{}: --insecure",
            w.name()
        );
        assert!(!env_names(c).contains("RPCLB_INSECURE"), "{}", w.name());
    }
}

#[test]
fn controller_ports_match_its_service_and_probe() {
    let docs = load();
    let deploy = one(&docs, "Deployment", "rpclb-controller");
    assert_eq!(
        at(&deploy.v, &["spec", "replicas"]).and_then(Value::as_u64),
        Some(2)
    );
    let c = container(deploy, "controller");
    let args = strings(at(c, &["args"]).unwrap());
    assert!(args.iter().any(|a| a == "--kube"), "{args:?}");
    let listen = addr_port(c, "--listen");
    let metrics = addr_port(c, "--metrics-addr");
    assert_eq!(listen, 50551);
    assert_eq!(container_ports(c), BTreeSet::from([listen, metrics]));

    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = at(c, &[probe, "httpGet"]).unwrap_or_else(|| panic!("no {probe}"));
        assert_eq!(str_at(get, &["path"]), Some(path));
        assert_eq!(resolve_port(c, at(get, &["port"]).unwrap()), metrics);
    }

    // Leader election identity and namespace come from the pod.
    let env = env_names(c);
    assert!(env.contains("RPCLB_POD_NAME") && env.contains("RPCLB_POD_NAMESPACE"));

    let svc = one(&docs, "Service", "rpclb-controller");
    let pod_labels = at(&deploy.v, &["spec", "template", "metadata", "labels"])
        .and_then(Value::as_object)
        .unwrap();
    for (k, v) in at(&svc.v, &["spec", "selector"])
        .and_then(Value::as_object)
        .unwrap()
    {
        assert_eq!(pod_labels.get(k), Some(v), "Service selector {k:?}");
    }
    let ports = seq_at(&svc.v, &["spec", "ports"]);
    assert_eq!(ports.len(), 1);
    assert_eq!(
        at(&ports[0], &["port"]).and_then(Value::as_u64),
        Some(50551)
    );
    assert_eq!(
        resolve_port(c, at(&ports[0], &["targetPort"]).unwrap()),
        listen
    );
}

#[test]
fn agent_reaches_the_controller_service_and_keeps_its_pins_on_the_host() {
    let docs = load();
    let ds = one(&docs, "DaemonSet", "rpclb-agent");
    let spec = at(&ds.v, &["spec", "template", "spec"]).unwrap();
    let c = container(ds, "agent");

    // --controller names the controller's Service and port.
    let svc = one(&docs, "Service", "rpclb-controller");
    let url = arg(c, "--controller").expect("--controller");
    let svc_port = at(&seq_at(&svc.v, &["spec", "ports"])[0], &["port"])
        .and_then(Value::as_u64)
        .unwrap();
    assert_eq!(
        url,
        format!(
            "https://{}.{}.svc:{svc_port}",
            svc.name(),
            svc.namespace().unwrap()
        )
    );
    // On the host network, cluster DNS needs this policy.
    assert_eq!(
        at(spec, &["hostNetwork"]).and_then(Value::as_bool),
        Some(true)
    );
    assert_eq!(
        str_at(spec, &["dnsPolicy"]),
        Some("ClusterFirstWithHostNet")
    );

    assert_eq!(arg(c, "--mode").as_deref(), Some("auto"));
    assert_eq!(
        arg(c, "--interfaces").as_deref(),
        Some("$(RPCLB_INTERFACES)")
    );

    // Readiness on the metrics address.
    let metrics = addr_port(c, "--metrics-addr");
    assert_eq!(metrics, 9464);
    let probe = at(c, &["readinessProbe", "httpGet"]).expect("readiness probe");
    assert_eq!(str_at(probe, &["path"]), Some("/readyz"));
    assert_eq!(resolve_port(c, at(probe, &["port"]).unwrap()), metrics);

    // The node name from the downward API.
    let node_env = seq_at(c, &["env"])
        .iter()
        .find(|e| str_at(e, &["name"]) == Some("RPCLB_NODE_NAME"))
        .expect("RPCLB_NODE_NAME");
    assert_eq!(
        str_at(node_env, &["valueFrom", "fieldRef", "fieldPath"]),
        Some("spec.nodeName")
    );

    // Every taint tolerated.
    assert!(
        seq_at(spec, &["tolerations"])
            .iter()
            .any(|t| str_at(t, &["operator"]) == Some("Exists") && at(t, &["key"]).is_none())
    );

    // The pin path is inside a mount of the host's bpffs, which the agent
    // sees (HostToContainer) but does not mount itself: the privileged init
    // container mounts bpffs there, with Bidirectional propagation (allowed
    // only in privileged containers), if the host has none. The agent's
    // container is not privileged (its capabilities: tests/least_privilege.rs).
    let pin_path = arg(c, "--pin-path").expect("--pin-path");
    let mount = seq_at(c, &["volumeMounts"])
        .iter()
        .find(|m| pin_path.starts_with(str_at(m, &["mountPath"]).unwrap()))
        .expect("a mount holding --pin-path");
    assert_eq!(
        str_at(mount, &["mountPropagation"]),
        Some("HostToContainer")
    );
    assert_ne!(
        at(c, &["securityContext", "privileged"]).and_then(Value::as_bool),
        Some(true)
    );
    let volume_name = str_at(mount, &["name"]).unwrap();
    let volume = seq_at(spec, &["volumes"])
        .iter()
        .find(|v| str_at(v, &["name"]) == Some(volume_name))
        .expect("the mount's volume");
    assert_eq!(str_at(volume, &["hostPath", "path"]), Some("/sys/fs/bpf"));
    let init = seq_at(spec, &["initContainers"])
        .iter()
        .find(|i| str_at(i, &["name"]) == Some("mount-bpf-fs"))
        .expect("the mount-bpf-fs init container");
    let init_mount = &seq_at(init, &["volumeMounts"])[0];
    assert_eq!(str_at(init_mount, &["name"]), Some(volume_name));
    assert_eq!(
        str_at(init_mount, &["mountPropagation"]),
        Some("Bidirectional")
    );
    assert_eq!(
        at(init, &["securityContext", "privileged"]).and_then(Value::as_bool),
        Some(true)
    );
    let init_args = strings(at(init, &["args"]).unwrap());
    let bpffs = str_at(init_mount, &["mountPath"]).unwrap();
    assert_eq!(init_args, ["mount-bpffs", "--path", bpffs]);
    assert!(pin_path.starts_with(&format!("{bpffs}/")), "{pin_path}");

    // Nothing tears the data path down when the pod stops: no hook runs
    // cleanup, and the agent is not told to detach.
    for hook in ["preStop", "postStart"] {
        if let Some(cmd) = at(c, &["lifecycle", hook, "exec", "command"]) {
            let cmd = strings(cmd);
            assert!(
                !cmd.iter().any(|a| a.contains("cleanup")),
                "{hook}: {cmd:?}"
            );
        }
    }
    let args = strings(at(c, &["args"]).unwrap());
    assert!(!args.iter().any(|a| a == "--detach-on-exit"), "{args:?}");
    assert!(at(spec, &["terminationGracePeriodSeconds"]).is_some());
}

/// What `cargo xtask image` builds (xtask/src/image.rs), by the workload
/// that runs it: the image's name, and its binaries in /usr/local/bin, the
/// first being the entrypoint. The images are FROM scratch: nothing else.
const IMAGES: &[(&str, &str, &str, &[&str])] = &[
    (
        "DaemonSet",
        "rpclb-agent",
        "rpclb-agent",
        &["lb-agent", "lbctl"],
    ),
    (
        "Deployment",
        "rpclb-controller",
        "rpclb-controller",
        &["lb-controller"],
    ),
];

#[test]
fn each_workload_runs_its_own_image_and_only_what_is_in_it() {
    let docs = load();
    let version = env!("CARGO_PKG_VERSION");
    let mut named = BTreeSet::new();
    for w in workloads(&docs) {
        let (_, _, image, binaries) = IMAGES
            .iter()
            .find(|(kind, name, ..)| *kind == w.kind() && *name == w.name())
            .unwrap_or_else(|| panic!("{}: no image for {} {}", w.file, w.kind(), w.name()));
        let spec = at(&w.v, &["spec", "template", "spec"]).unwrap();
        for c in seq_at(spec, &["containers"])
            .iter()
            .chain(seq_at(spec, &["initContainers"]))
        {
            let name = format!("{} {}", w.name(), str_at(c, &["name"]).unwrap());
            let tagged = str_at(c, &["image"]).unwrap();
            assert_eq!(tagged, format!("{image}:{version}"), "{name}");
            named.insert(tagged.to_string());
            // The image's entrypoint runs, with the args.
            assert!(
                at(c, &["command"]).is_none(),
                "{name}: a command overrides the image's entrypoint ({})",
                binaries[0]
            );
            // Hooks and exec probes can run only the image's binaries (no
            // shell, no /bin/true).
            for path in [
                &["lifecycle", "preStop"][..],
                &["lifecycle", "postStart"],
                &["livenessProbe"],
                &["readinessProbe"],
                &["startupProbe"],
            ] {
                if let Some(cmd) = at(c, &[path, &["exec", "command"]].concat()) {
                    let cmd = strings(cmd);
                    let prog = cmd[0].strip_prefix("/usr/local/bin/").unwrap_or(&cmd[0]);
                    assert!(
                        binaries.contains(&prog),
                        "{name}: {} runs {cmd:?}, which is not in {image}",
                        path.join(".")
                    );
                }
            }
        }
    }
    let built: BTreeSet<String> = IMAGES
        .iter()
        .map(|(_, _, image, _)| format!("{image}:{version}"))
        .collect();
    assert_eq!(named, built, "deploy/ runs exactly the built images");
}

/// Parses `doc` as the Kubernetes type `T` and writes it back: a misspelt
/// or misplaced field is dropped on the way and the two differ; a value of
/// the wrong type fails to parse.
fn round_trip<T>(doc: &Doc)
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T = serde_json::from_value(doc.v.clone())
        .unwrap_or_else(|e| panic!("{}: {} {}: {e}", doc.file, doc.kind(), doc.name()));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        back,
        doc.v,
        "{}: {} {} has fields that Kubernetes does not know",
        doc.file,
        doc.kind(),
        doc.name()
    );
}

/// The controller's gRPC port is open only to the node network (the agents
/// run on the host network: their source addresses are the nodes'), and
/// its pods bind their pod IP, not 0.0.0.0 (`addr_port`).
#[test]
fn only_the_node_network_reaches_the_controller() {
    let docs = load();
    let deploy = one(&docs, "Deployment", "rpclb-controller");
    let c = container(deploy, "controller");
    let listen = addr_port(c, "--listen");
    let metrics = addr_port(c, "--metrics-addr");
    let np = one(&docs, "NetworkPolicy", "rpclb-controller");
    let pod_labels = at(&deploy.v, &["spec", "template", "metadata", "labels"]).unwrap();
    for (k, v) in at(&np.v, &["spec", "podSelector", "matchLabels"])
        .and_then(Value::as_object)
        .expect("podSelector.matchLabels")
    {
        assert_eq!(pod_labels.get(k), Some(v), "podSelector {k:?}");
    }
    assert_eq!(
        strings(at(&np.v, &["spec", "policyTypes"]).unwrap()),
        ["Ingress"]
    );
    let rules = seq_at(&np.v, &["spec", "ingress"]);
    assert_eq!(rules.len(), 1);
    // From an ipBlock (the nodes) only: no pod or namespace selector, no
    // open `from`.
    let from = seq_at(&rules[0], &["from"]);
    assert!(!from.is_empty(), "an empty `from` allows everyone");
    for f in from {
        let cidr = str_at(f, &["ipBlock", "cidr"]).expect("an ipBlock");
        assert!(cidr != "0.0.0.0/0" && cidr != "::/0", "{cidr}");
        assert!(at(f, &["podSelector"]).is_none() && at(f, &["namespaceSelector"]).is_none());
    }
    let ports: BTreeSet<u16> = seq_at(&rules[0], &["ports"])
        .iter()
        .map(|p| {
            assert_eq!(str_at(p, &["protocol"]), Some("TCP"));
            resolve_port(c, at(p, &["port"]).unwrap())
        })
        .collect();
    assert_eq!(ports, BTreeSet::from([listen, metrics]));
    // The agent's listener binds the node's address (its pod IP on the host
    // network), checked by addr_port too.
    let ds = one(&docs, "DaemonSet", "rpclb-agent");
    addr_port(container(ds, "agent"), "--metrics-addr");
}

#[test]
fn every_document_matches_the_kubernetes_schema() {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    for d in &load() {
        match d.kind() {
            "Namespace" => round_trip::<Namespace>(d),
            "ServiceAccount" => round_trip::<ServiceAccount>(d),
            "ClusterRole" => round_trip::<ClusterRole>(d),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(d),
            "Role" => round_trip::<Role>(d),
            "RoleBinding" => round_trip::<RoleBinding>(d),
            "ConfigMap" => round_trip::<ConfigMap>(d),
            "Service" => round_trip::<Service>(d),
            "Deployment" => round_trip::<Deployment>(d),
            "DaemonSet" => round_trip::<DaemonSet>(d),
            "NetworkPolicy" => round_trip::<NetworkPolicy>(d),
            other => panic!("{}: no schema check for kind {other}", d.file),
        }
    }
}
