//! The Kubernetes fixture (`rpclb_tests::kube`) against the real kube-apiserver v1.20.2:
//! deploy/'s namespace and RBAC, the controller's ServiceAccount token seen through kube-rs,
//! what a 1.20 server serves, and several servers at once. Needs the binary that
//! `cargo xtask kube-apiserver` builds (`cargo xtask test` does it first): without it every
//! test here fails with a message naming that command.

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Secret, Service};
use kube::api::{Api, DynamicObject, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::ApiResource;
use kube::{Client, Config};
use rpclb_tests::kube::{ApiServer, KubeFixtureError, VERSION};
use std::collections::HashSet;
use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

/// Starts a server; a missing binary fails the test with the fixture's message.
fn start() -> ApiServer {
    let s = ApiServer::start().unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "kube-apiserver {} ready at {} in {:.1} s",
        s.version(),
        s.url(),
        s.started_in().as_secs_f64()
    );
    s
}

fn deploy_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn client(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("kube client")
}

/// The HTTP status of a refused call.
fn status<T: Debug>(r: kube::Result<T>) -> u16 {
    match r {
        Err(kube::Error::Api(s)) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn endpointslices_v1beta1(client: Client) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "discovery.k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "discovery.k8s.io/v1beta1".into(),
        kind: "EndpointSlice".into(),
        plural: "endpointslices".into(),
    };
    Api::all_with(client, &ar)
}

/// Watches for a second: the watch must be accepted and carry no error event.
async fn watch_ok<K>(api: &Api<K>, what: &str)
where
    K: Clone + serde::de::DeserializeOwned + Debug,
{
    let wp = WatchParams::default().timeout(1);
    let stream = api
        .watch(&wp, "0")
        .await
        .unwrap_or_else(|e| panic!("watch {what}: {e}"));
    let events: Vec<_> = stream.collect().await;
    for e in events {
        match e {
            Ok(WatchEvent::Error(s)) => panic!("watch {what}: error event {s:?}"),
            Err(e) => panic!("watch {what}: {e}"),
            Ok(_) => {}
        }
    }
}

/// deploy/00-namespace.yaml and deploy/10-rbac.yaml apply, and the controller's account gets
/// exactly what the ClusterRole and Role grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_account_gets_what_deploy_rbac_grants() {
    let s = start();
    let out = s
        .apply(&deploy_file("00-namespace.yaml"))
        .expect("apply namespace");
    assert!(out.contains("namespace/rpclb-system created"), "{out}");
    // 1.20 has no Pod Security admission: the label is stored, not enforced.
    let labels = s
        .kubectl_output(
            &[
                "get",
                "namespace",
                "rpclb-system",
                "-o",
                "jsonpath={.metadata.labels}",
            ],
            None,
        )
        .unwrap();
    assert!(
        labels.contains(r#""pod-security.kubernetes.io/enforce":"privileged""#),
        "{labels}"
    );
    let out = s.apply(&deploy_file("10-rbac.yaml")).expect("apply rbac");
    for created in [
        "serviceaccount/rpclb-controller created",
        "serviceaccount/rpclb-agent created",
        "clusterrole.rbac.authorization.k8s.io/rpclb-controller created",
        "clusterrolebinding.rbac.authorization.k8s.io/rpclb-controller created",
        "role.rbac.authorization.k8s.io/rpclb-controller-leader-election created",
        "rolebinding.rbac.authorization.k8s.io/rpclb-controller-leader-election created",
    ] {
        assert!(out.contains(created), "{created} missing from:\n{out}");
    }

    let kubeconfig = s
        .kubeconfig_for_service_account("rpclb-system", "rpclb-controller")
        .expect("token for rpclb-controller");
    let c = client(&kubeconfig).await;

    // Granted: list and watch Services, Nodes, Pods, core Endpoints and EndpointSlices
    // (v1beta1 on 1.20); not get (the controller's watchers never get by name).
    s.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
    )
    .expect("apply a Service");
    let services: Api<Service> = Api::all(c.clone());
    let list = services
        .list(&ListParams::default())
        .await
        .expect("list services");
    assert!(
        list.items
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some("web")),
        "default/web is listed"
    );
    watch_ok(&services, "services").await;
    assert_eq!(
        status(
            Api::<Service>::namespaced(c.clone(), "default")
                .get("web")
                .await
        ),
        403
    );
    let web = list
        .items
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("web"))
        .unwrap();
    let ip = web
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .unwrap_or_default();
    assert!(ip.starts_with("10.96."), "ClusterIP {ip} from 10.96.0.0/16");
    let nodes: Api<Node> = Api::all(c.clone());
    nodes
        .list(&ListParams::default())
        .await
        .expect("list nodes");
    watch_ok(&nodes, "nodes").await;
    let slices = endpointslices_v1beta1(c.clone());
    slices
        .list(&ListParams::default())
        .await
        .expect("list endpointslices");
    watch_ok(&slices, "endpointslices").await;
    let endpoints: Api<Endpoints> = Api::all(c.clone());
    endpoints
        .list(&ListParams::default())
        .await
        .expect("list endpoints");
    watch_ok(&endpoints, "endpoints").await;
    // Pods: list and watch (the controller reads their metadata), not get.
    let all_pods: Api<Pod> = Api::all(c.clone());
    all_pods
        .list_metadata(&ListParams::default())
        .await
        .expect("list pods' metadata");
    watch_ok(&all_pods, "pods").await;
    assert_eq!(
        status(
            Api::<Pod>::namespaced(c.clone(), "default")
                .get("web")
                .await
        ),
        403
    );

    // Its Lease, in rpclb-system only: allowed there (absent: 404), refused elsewhere (403).
    let leases = |ns| Api::<Lease>::namespaced(c.clone(), ns);
    assert_eq!(status(leases("rpclb-system").get("rpclb").await), 404);
    assert_eq!(status(leases("default").get("rpclb").await), 403);

    // Not granted: Secrets, writing Endpoints or Services.
    assert_eq!(
        status(
            Api::<Secret>::all(c.clone())
                .list(&ListParams::default())
                .await
        ),
        403
    );
    let ep: Endpoints =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
    assert_eq!(
        status(
            Api::<Endpoints>::namespaced(c.clone(), "default")
                .create(&PostParams::default(), &ep)
                .await
        ),
        403
    );
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}]}
    }))
    .unwrap();
    assert_eq!(
        status(
            Api::<Service>::namespaced(c.clone(), "default")
                .create(&PostParams::default(), &svc)
                .await
        ),
        403
    );

    // The kubeconfig carries only the account's token: the admin's is not in it.
    let sa = std::fs::read_to_string(&kubeconfig).unwrap();
    let admin = std::fs::read_to_string(s.admin_kubeconfig()).unwrap();
    let token = |k: &str| {
        k.lines()
            .find_map(|l| l.trim().strip_prefix("token: "))
            .map(|t| t.trim_matches('"').to_owned())
            .expect("a token line")
    };
    assert_ne!(token(&sa), token(&admin));
    assert_eq!(sa.matches("token:").count(), 1);
}

/// A 1.20 server serves discovery.k8s.io/v1beta1 only, and drops a v1beta1 endpoint's
/// `serving` and `terminating` conditions.
#[test]
fn serves_endpointslices_v1beta1_only() {
    let s = start();
    assert_eq!(s.version(), VERSION);
    let v1beta1 = s
        .kubectl_output(&["get", "--raw", "/apis/discovery.k8s.io/v1beta1"], None)
        .expect("v1beta1 is served");
    assert!(v1beta1.contains(r#""name":"endpointslices""#), "{v1beta1}");
    match s.kubectl_output(&["get", "--raw", "/apis/discovery.k8s.io/v1"], None) {
        Err(KubeFixtureError::Kubectl { stderr, .. }) => {
            assert!(stderr.contains("NotFound"), "{stderr}")
        }
        other => panic!("discovery.k8s.io/v1 should not be served: {other:?}"),
    }

    s.apply(
        r#"apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
  - name: http
    port: 8080
    protocol: TCP
endpoints:
  - addresses: ["10.244.1.5"]
    conditions: {ready: false, serving: true, terminating: true}
"#,
    )
    .expect("apply an EndpointSlice");
    let json = s
        .kubectl_output(
            &[
                "get",
                "endpointslices.v1beta1.discovery.k8s.io",
                "web-1",
                "-o",
                "json",
            ],
            None,
        )
        .unwrap();
    let slice: serde_json::Value = serde_json::from_str(&json).unwrap();
    let conditions = &slice["endpoints"][0]["conditions"];
    assert_eq!(conditions, &serde_json::json!({"ready": false}), "{json}");
}

/// Two servers in one test run side by side, each with its own data, on 127.0.0.1 only; Drop
/// stops both processes and removes the folder, on a panic too.
#[test]
fn two_servers_at_once_and_their_teardown() {
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(start);
        let b = sc.spawn(start);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.url(), b.url());
    for s in [&a, &b] {
        assert_eq!(
            loopback_listeners(&s.pids()).len(),
            3,
            "etcd client, etcd peer, API"
        );
    }

    a.kubectl_output(&["create", "namespace", "only-in-a"], None)
        .expect("create namespace in a");
    let in_b = b.kubectl_output(&["get", "namespace", "only-in-a"], None);
    assert!(
        matches!(&in_b, Err(KubeFixtureError::Kubectl { stderr, .. }) if stderr.contains("NotFound")),
        "{in_b:?}"
    );

    // A panic with a server in scope.
    let (b_pids, b_dir, b_addr) = (b.pids(), b.dir().to_path_buf(), b.addr());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _b = b;
        panic!("on purpose, with a server in scope");
    }));
    assert!(r.is_err());
    assert_gone(&b_pids, &b_dir, b_addr);

    let (a_pids, a_dir, a_addr) = (a.pids(), a.dir().to_path_buf(), a.addr());
    drop(a);
    assert_gone(&a_pids, &a_dir, a_addr);
}

#[test]
fn a_missing_binary_names_the_xtask() {
    let e = ApiServer::start_with_binary(Path::new("/nonexistent/kube-apiserver"))
        .err()
        .expect("no server without a binary");
    assert!(matches!(e, KubeFixtureError::MissingApiServer(_)), "{e:?}");
    assert!(e.to_string().contains("cargo xtask kube-apiserver"), "{e}");
}

fn assert_gone(pids: &[u32], dir: &Path, addr: std::net::SocketAddr) {
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still runs"
        );
    }
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "{addr} still answers"
    );
}

/// The listening TCP sockets of `pids` (from /proc/PID/fd and /proc/net/tcp{,6}); panics on
/// one bound to anything but 127.0.0.1, and on any UDP socket.
fn loopback_listeners(pids: &[u32]) -> Vec<String> {
    let mut inodes = HashSet::new();
    for pid in pids {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut listeners = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f[1], f[3], f[9]);
            if !inodes.contains(inode) {
                continue;
            }
            assert!(table.starts_with("tcp"), "a UDP socket: {table} {line}");
            // 0A: LISTEN. The address is hex in host byte order: 0100007F is 127.0.0.1.
            if state == "0A" {
                let ip = local.split(':').next().unwrap();
                assert!(
                    ip == "0100007F" || ip == "0000000000000000FFFF00000100007F",
                    "listening beyond 127.0.0.1: {table} {local}"
                );
                listeners.push(local.to_owned());
            }
        }
    }
    listeners
}
