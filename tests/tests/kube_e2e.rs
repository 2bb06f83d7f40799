//! rpclb on a real Kubernetes API server: kube-apiserver v1.20.2 with etcd
//! (`rpclb_tests::kube`, built once by `cargo xtask kube-apiserver`), the
//! real `lb-controller --kube` on a ServiceAccount token bound only to
//! deploy/10-rbac.yaml's roles, the real `lb-agent` in a netns lab, and real
//! TCP through the VIP.
//!
//! Where things run: the API server, etcd and the controllers listen on the
//! host's 127.0.0.1 only; the agent runs in the lab's node namespace and
//! reaches "the controller Service" through a loopback relay
//! (`rpclb_tests::relay`) that, like a Service, sends each connection to the
//! first controller that accepts.
//!
//! A 1.20 server serves no discovery.k8s.io/v1, so the controller's `auto`
//! endpoints source picks core v1 Endpoints, which these tests write (there
//! is no controller-manager to write them). EndpointSlices v1 stay covered
//! by lb-controller's fake-API tests until a newer server can run here.
//!
//! Needs root for the lab, and the API server build; without either the
//! tests fail under CI, or skip (lab) / fail (no build) elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rpclb_tests::kube::{ApiServer, free_port, repo_file};
use rpclb_tests::lab::{self, HeldConn, Lab, Limits, TcpServer};
use rpclb_tests::procs::{
    Proc, TestDir, agent_args, agent_tls_args, controller_bin, controller_tls_args, wait_until,
};
use rpclb_tests::relay::Relay;
use rpclb_tests::skip_unless_lab;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The controller's gRPC port as the agent sees it (the relay, in the node namespace).
const CONTROLLER_PORT: u16 = 50551;
const NODE: &str = "node-a";

/// The API server with deploy/'s namespace and RBAC, the test namespace
/// `shop` and the Node, and a kubeconfig for the controller's ServiceAccount.
struct Cluster {
    api: ApiServer,
    controller_kubeconfig: PathBuf,
}

impl Cluster {
    fn start() -> Cluster {
        let api = ApiServer::start().unwrap_or_else(|e| panic!("{e}"));
        api.apply(&repo_file("deploy/00-namespace.yaml"))
            .expect("apply deploy/00-namespace.yaml");
        api.apply(&repo_file("deploy/10-rbac.yaml"))
            .expect("apply deploy/10-rbac.yaml");
        api.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\n"
        ))
        .expect("namespace shop and the node");
        let controller_kubeconfig = api
            .kubeconfig_for_service_account("rpclb-system", "rpclb-controller")
            .expect("a token for rpclb-controller");
        Cluster {
            api,
            controller_kubeconfig,
        }
    }

    fn apply(&self, yaml: &str) {
        self.api
            .apply(yaml)
            .unwrap_or_else(|e| panic!("kubectl apply: {e}\n{yaml}"));
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.api
            .kubectl_output(args, None)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    /// The Lease holder, if any.
    fn leader(&self) -> Option<String> {
        let out = self
            .api
            .kubectl_output(
                &[
                    "-n",
                    "rpclb-system",
                    "get",
                    "lease",
                    "rpclb-controller",
                    "-o",
                    "jsonpath={.spec.holderIdentity}",
                ],
                None,
            )
            .ok()?;
        Some(out.trim().to_string()).filter(|s| !s.is_empty())
    }

    /// The events.k8s.io/v1 Events about Service (or Pod) `shop/<name>` with `reason`.
    fn events(&self, service: &str, reason: &str) -> Vec<serde_json::Value> {
        let out = self.kubectl(&["-n", "shop", "get", "events.v1.events.k8s.io", "-o", "json"]);
        let list: serde_json::Value = serde_json::from_str(&out).expect("event list JSON");
        list["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["regarding"]["name"] == service && e["reason"] == reason)
            .collect()
    }

    /// `lb-controller --kube` on the host, as ServiceAccount rpclb-controller, with
    /// mutual TLS (the test folder's certificates, made on first use).
    fn controller(&self, dir: &TestDir, name: &str, grpc: u16) -> Proc {
        let metrics = free_port();
        let kubeconfig = self.controller_kubeconfig.display().to_string();
        let mut args: Vec<String> = [
            "--kube",
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
            "--pod-name",
            name,
            "--pod-namespace",
            "rpclb-system",
            "--lease-duration",
            "4",
            "--lease-renew-deadline",
            "3",
            "--lease-retry-period",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(controller_tls_args(&certs(dir)));
        let mut p = Proc::spawn_host(
            dir,
            name,
            controller_bin(),
            &args,
            &[("KUBECONFIG", kubeconfig.as_str())],
            metrics,
        );
        p.wait_ready();
        p
    }
}

/// `web` in `shop`: ClusterIP 10.96.0.10, port `port` (named `http`) to the
/// pods' named port `web`, with `annotations` (`key: value` lines).
fn service_yaml(port: u16, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  \
         annotations: {{{annotations}}}\nspec:\n  clusterIP: {VIP}\n  ports:\n  \
         - name: http\n    port: {port}\n    targetPort: web\n"
    )
}

/// The Endpoints of `web`: one subset per (ready IPs, not-ready IPs, port),
/// as the endpoints controller writes them (a named targetPort can resolve
/// to a different number per pod).
fn endpoints_yaml(subsets: &[(&[Ipv4Addr], &[Ipv4Addr], u16)]) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\n  namespace: shop\nsubsets:\n",
    );
    if subsets.is_empty() {
        y = y.replace("subsets:\n", "subsets: []\n");
    }
    for (ready, not_ready, port) in subsets {
        y.push_str("- addresses:\n");
        for ip in *ready {
            y.push_str(&format!("  - {{ip: {ip}, nodeName: {NODE}}}\n"));
        }
        if ready.is_empty() {
            y = y.replace("- addresses:\n", "- addresses: []\n");
        }
        if !not_ready.is_empty() {
            y.push_str("  notReadyAddresses:\n");
            for ip in *not_ready {
                y.push_str(&format!("  - {{ip: {ip}, nodeName: {NODE}}}\n"));
            }
        }
        y.push_str(&format!(
            "  ports:\n  - {{name: http, port: {port}, protocol: TCP}}\n"
        ));
    }
    y
}

/// The lab: three backends with identity servers on 8080 (`backend-<i>`)
/// and 9090 (`backend-<i>-9090`).
struct Pods {
    lab: Lab,
    _servers: Vec<TcpServer>,
}

impl Pods {
    fn start() -> Pods {
        let lab = Lab::new(3).expect("lab");
        let mut servers = lab.start_tcp_servers(8080).expect("servers on 8080");
        for i in 1..=3 {
            servers.push(
                TcpServer::start(
                    &lab.backend(i).ns,
                    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9090),
                    &format!("backend-{i}-9090"),
                )
                .expect("server on 9090"),
            );
        }
        Pods {
            lab,
            _servers: servers,
        }
    }

    fn ip(&self, i: usize) -> Ipv4Addr {
        self.lab.backend(i).ip()
    }

    /// The backends `n` new connections to VIP:`port` reach, or the first error.
    fn reached(&self, port: u16, n: usize) -> Result<BTreeSet<String>, String> {
        let lim = Limits {
            per_op: Duration::from_millis(500),
            total: Duration::from_secs(5),
        };
        let target = SocketAddrV4::new(VIP, port);
        let attempts = self
            .lab
            .client()
            .ns
            .run(|| lab::tcp_attempts(target, n, lim))
            .map_err(|e| e.to_string())?;
        attempts
            .into_iter()
            .map(|r| r.map(|r| r.backend).map_err(|e| e.to_string()))
            .collect()
    }

    /// Waits until new connections to VIP:`port` reach exactly `want`.
    fn wait_reach(&self, port: u16, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let mut last = Err(String::new());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            last = self.reached(port, 4 * want.len());
            if last.as_ref() == Ok(&want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("VIP:{port} never reached exactly {want:?}; last: {last:?}");
    }

    /// Waits until VIP:`port` takes no connection.
    fn wait_closed(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.reached(port, 1).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("VIP:{port} still answers");
    }
}

/// The test folder's CA and certificates (the controller's and NODE's), made once.
fn certs(dir: &TestDir) -> lb_api::tls::certs::Bundle {
    let b = lb_api::tls::certs::Bundle::at(&dir.path().join("certs"));
    if b.ca().exists() {
        b
    } else {
        dir.certs(&[NODE])
    }
}

/// The agent in the node namespace, following the controller(s) through a
/// relay, over mutual TLS.
fn agent(pods: &Pods, dir: &TestDir, relay_to: &[u16]) -> (Proc, Relay) {
    let upstreams: Vec<SocketAddr> = relay_to
        .iter()
        .map(|&p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
        .collect();
    let relay = Relay::start(pods.lab.node(), CONTROLLER_PORT, &upstreams).expect("relay");
    let mut args = agent_args(&pods.lab, dir, &[]);
    let i = args.iter().position(|x| x == "--config").expect("--config");
    args.drain(i..i + 2);
    args.extend(
        [
            "--controller",
            &format!("https://127.0.0.1:{CONTROLLER_PORT}"),
            "--node-name",
            NODE,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(agent_tls_args(&certs(dir), NODE));
    let mut a = Proc::start(&pods.lab, dir, "agent", &args);
    a.wait_ready();
    (a, relay)
}

/// Traffic follows the API: scaling up and down, a not-ready address, a
/// named targetPort resolved per pod, a port change and the Service's
/// deletion, with the controller on deploy/'s ClusterRole only.
#[test]
fn traffic_follows_services_and_endpoints() {
    skip_unless_lab!();
    let cluster = Cluster::start();
    let pods = Pods::start();
    let dir = TestDir::new("kube-follow");
    let grpc = free_port();
    let mut ctl = cluster.controller(&dir, "ctl-a", grpc);
    let (mut agent, _relay) = agent(&pods, &dir, &[grpc]);
    let (b1, b2, b3) = (pods.ip(1), pods.ip(2), pods.ip(3));

    cluster.apply(&service_yaml(80, ""));
    cluster.apply(&endpoints_yaml(&[(&[b1], &[], 8080)]));
    pods.wait_reach(80, &["backend-1"]);
    let log = ctl.log();
    assert!(
        log.contains("reading endpoints from endpoints"),
        "auto chose core v1 Endpoints on a 1.20 server:\n{log}"
    );

    // Scale up.
    cluster.apply(&endpoints_yaml(&[(&[b1, b2, b3], &[], 8080)]));
    pods.wait_reach(80, &["backend-1", "backend-2", "backend-3"]);
    // A pod that is not ready gets no new connections.
    cluster.apply(&endpoints_yaml(&[(&[b1, b2], &[b3], 8080)]));
    pods.wait_reach(80, &["backend-1", "backend-2"]);
    // Scale down.
    cluster.apply(&endpoints_yaml(&[(&[b2], &[b1, b3], 8080)]));
    pods.wait_reach(80, &["backend-2"]);
    // The named targetPort `web` is 8080 on pod 1 and 9090 on pod 3.
    cluster.apply(&endpoints_yaml(&[(&[b1], &[], 8080), (&[b3], &[], 9090)]));
    pods.wait_reach(80, &["backend-1", "backend-3-9090"]);
    // The Service's port changes from 80 to 81.
    cluster.apply(&service_yaml(81, ""));
    pods.wait_reach(81, &["backend-1", "backend-3-9090"]);
    pods.wait_closed(80);
    // The Service goes.
    cluster.kubectl(&["-n", "shop", "delete", "service", "web"]);
    pods.wait_closed(81);

    // The agent followed one stream the whole time.
    let m = agent.scrape();
    assert_eq!(m.get("rpclb_controller_connected", &[]), Some(1.0));
    assert_eq!(m.get("rpclb_controller_reconnects", &[]), Some(0.0));
    let c = ctl.scrape();
    assert_eq!(
        c.get("rpclb_controller_agent_refused_services", &[("node", NODE)]),
        Some(0.0)
    );
    ctl.check_alive();
}

/// Calls to VIP:`port` over one new connection: the serving backend's name per call.
fn grpc_calls(pods: &Pods, port: u16, n: usize) -> Result<Vec<String>, String> {
    rpclb_tests::grpc::block_on_in(&pods.lab.client().ns, || async move {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{VIP}:{port}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut c = rpclb_tests::grpc::proto::test_service_client::TestServiceClient::new(ch);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(
                rpclb_tests::grpc::served_by(&mut c, &[], Duration::from_secs(2))
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(out)
    })
}

/// Service annotations through the real API server, controller and agent:
/// `rpclb.io/mode: grpc` with `rpclb.io/headers` puts the headers on every
/// call the backends see; a bad header line is one Event and the calls carry
/// none of the annotation's headers; `rpclb.io/selector: example:geo` (L4)
/// makes the agent load the example selector for the service.
#[test]
fn annotations_reach_the_grpc_mode_and_the_selector() {
    skip_unless_lab!();
    const PORT: u16 = 50051;
    let cluster = Cluster::start();
    let pods = Pods::start();
    let journal = std::sync::Arc::new(rpclb_tests::grpc::Journal::default());
    let _grpc = rpclb_tests::grpc::start_backends(&pods.lab, 3, PORT, &journal);
    let dir = TestDir::new("kube-annotations");
    let grpc = free_port();
    let mut ctl = cluster.controller(&dir, "ctl-a", grpc);
    let (mut agent, _relay) = agent(&pods, &dir, &[grpc]);
    let (b1, b2, b3) = (pods.ip(1), pods.ip(2), pods.ip(3));
    cluster.apply(&endpoints_yaml(&[(&[b1, b2, b3], &[], PORT)]));

    // Calls made from now on, as the backends saw them.
    let calls_since = |mark: usize| journal.log().split_off(mark.min(journal.log().len()));
    let headers = "rpclb.io/mode: grpc, rpclb.io/headers: \"x-team: pay\\nx-tier: gold\"";
    cluster.apply(&service_yaml(PORT, headers));
    let mut mark = 0;
    wait_until(
        "calls with the annotation's headers",
        Duration::from_secs(30),
        || {
            mark = journal.log().len();
            grpc_calls(&pods, PORT, 9).is_ok()
                && calls_since(mark).iter().all(|c| {
                    c.header("x-team") == Some("pay") && c.header("x-tier") == Some("gold")
                })
        },
    );
    // Balanced per call: one connection's calls reach every backend.
    mark = journal.log().len();
    grpc_calls(&pods, PORT, 30).expect("30 calls");
    let seen = calls_since(mark);
    let by: BTreeSet<usize> = seen.iter().map(|c| c.backend).collect();
    assert_eq!(by, BTreeSet::from([1, 2, 3]), "{seen:?}");
    assert!(seen.iter().all(|c| c.header("x-team") == Some("pay")));

    // A bad line voids the annotation: one Event, the calls go on without it.
    let bad = "rpclb.io/mode: grpc, rpclb.io/headers: \"x-team: pay\\nX-Bad: 1\"";
    cluster.apply(&service_yaml(PORT, bad));
    wait_until("the Event", Duration::from_secs(20), || {
        !cluster.events("web", "InvalidAnnotation").is_empty()
    });
    wait_until("calls without the headers", Duration::from_secs(30), || {
        mark = journal.log().len();
        grpc_calls(&pods, PORT, 6).is_ok()
            && calls_since(mark)
                .iter()
                .all(|c| c.header("x-team").is_none())
    });
    let events = cluster.events("web", "InvalidAnnotation");
    assert_eq!(events.len(), 1, "{events:#?}");
    let note = events[0]["note"].as_str().unwrap_or_default();
    assert!(note.contains("rpclb.io/headers"), "{note}");

    // The selector annotation (L4): the agent loads the example for the service.
    cluster.apply(&service_yaml(PORT, "rpclb.io/selector: example:geo"));
    wait_until("the selector loaded", Duration::from_secs(30), || {
        let (code, body) = agent.get("/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        code == 200
            && v["selectors"].as_array().is_some_and(|l| {
                l.iter().any(|x| {
                    x["service"] == "shop/web:http"
                        && x["selector"] == "example:geo"
                        && x["state"] == "loaded"
                })
            })
    });
    ctl.check_alive();
}

/// A bad annotation gives exactly one Event, however long it lasts and
/// whoever leads; the controller's restart keeps it one.
#[test]
fn a_bad_annotation_is_one_event() {
    let cluster = Cluster::start();
    let dir = TestDir::new("kube-events");
    let mut ctl = cluster.controller(&dir, "ctl-a", free_port());
    cluster.apply(&service_yaml(80, "rpclb.io/algorithm: fastest"));
    wait_until("the Event", Duration::from_secs(20), || {
        !cluster.events("web", "InvalidAnnotation").is_empty()
    });
    // Many lease renewals (1 s) and recomputes later: still one.
    cluster.apply(&endpoints_yaml(&[(
        &[Ipv4Addr::new(10, 244, 1, 2)],
        &[],
        8080,
    )]));
    std::thread::sleep(Duration::from_secs(6));
    let events = cluster.events("web", "InvalidAnnotation");
    assert_eq!(events.len(), 1, "{events:#?}");
    let note = events[0]["note"].as_str().unwrap_or_default();
    assert!(note.contains("fastest"), "{note}");
    assert_eq!(events[0]["reportingController"], "rpclb.io/controller");
    assert_eq!(events[0]["reportingInstance"], "ctl-a");

    // A new replica leads (the first stepped down on SIGTERM): the problem
    // is the same Event.
    ctl.signal(libc::SIGTERM);
    ctl.wait_exit(Duration::from_secs(10)).expect("ctl-a stops");
    let mut ctl_b = cluster.controller(&dir, "ctl-b", free_port());
    wait_until("ctl-b to lead", Duration::from_secs(20), || {
        cluster.leader().as_deref() == Some("ctl-b")
    });
    std::thread::sleep(Duration::from_secs(3));
    let events = cluster.events("web", "InvalidAnnotation");
    assert_eq!(events.len(), 1, "{events:#?}");
    // The problem goes and comes back: the same Event counts it.
    cluster.apply(&service_yaml(80, ""));
    std::thread::sleep(Duration::from_secs(2));
    cluster.apply(&service_yaml(80, "rpclb.io/algorithm: fastest"));
    wait_until("the Event's series", Duration::from_secs(20), || {
        let e = cluster.events("web", "InvalidAnnotation");
        e.len() == 1 && e[0]["series"]["count"] == 2
    });
    ctl_b.check_alive();
}

/// Pods `pod-1` and `pod-2` in `shop` (never scheduled: this server has no scheduler or
/// kubelet; the controller reads only their metadata), the ServiceAccount their admission
/// needs, and `web`'s Endpoints naming them by `targetRef`, as the endpoints controller does.
fn pods_and_endpoints_yaml(ips: &[Ipv4Addr]) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: shop}\n\
         automountServiceAccountToken: false\n",
    );
    for i in 1..=ips.len() {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: shop}}\n\
             spec:\n  automountServiceAccountToken: false\n  \
             containers: [{{name: web, image: web:1}}]\n"
        ));
    }
    y.push_str(
        "---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\n  namespace: shop\n\
         subsets:\n- addresses:\n",
    );
    for (i, ip) in ips.iter().enumerate() {
        y.push_str(&format!(
            "  - {{ip: {ip}, nodeName: {NODE}, targetRef: {{kind: Pod, namespace: shop, name: pod-{}}}}}\n",
            i + 1
        ));
    }
    y.push_str("  ports:\n  - {name: http, port: 8080, protocol: TCP}\n");
    y
}

/// A Pod's own annotations reach the node: `rpclb.io/weight: "0"` drains it, and
/// `rpclb.io/max` limits its open connections, in the kernel, with real TCP; an invalid one
/// is one Event on the Pod, and the pod keeps its default.
#[test]
fn pod_annotations_drain_and_limit_backends() {
    skip_unless_lab!();
    let cluster = Cluster::start();
    let pods = Pods::start();
    let dir = TestDir::new("kube-pod-annotations");
    let grpc = free_port();
    let mut ctl = cluster.controller(&dir, "ctl-a", grpc);
    let (_agent, _relay) = agent(&pods, &dir, &[grpc]);
    let (b1, b2) = (pods.ip(1), pods.ip(2));
    cluster.apply(&service_yaml(80, ""));
    cluster.apply(&pods_and_endpoints_yaml(&[b1, b2]));
    pods.wait_reach(80, &["backend-1", "backend-2"]);
    let annotate = |pod: &str, kv: &str| {
        cluster.kubectl(&["-n", "shop", "annotate", "--overwrite", "pod", pod, kv]);
    };

    // Drained by its own annotation; back when it goes.
    annotate("pod-1", "rpclb.io/weight=0");
    pods.wait_reach(80, &["backend-2"]);
    annotate("pod-1", "rpclb.io/weight-");
    pods.wait_reach(80, &["backend-1", "backend-2"]);

    // A limit of one open connection on pod-1, the only backend taking new ones: a held
    // connection fills it, and the next is refused (every backend full); closed, it has
    // room again.
    annotate("pod-2", "rpclb.io/weight=0");
    annotate("pod-1", "rpclb.io/max=1");
    pods.wait_reach(80, &["backend-1"]);
    // Held connections are opened anew until the limit has reached the agent.
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        let held = HeldConn::open(&pods.lab.client().ns, SocketAddrV4::new(VIP, 80))
            .expect("a held connection");
        assert_eq!(held.backend, "backend-1");
        if pods.reached(80, 1).is_err() {
            break held;
        }
        drop(held);
        assert!(
            Instant::now() < deadline,
            "a second connection was never refused while one was held"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Still refused while it is held; it closes, and pod-1 takes new ones again.
    assert!(pods.reached(80, 1).is_err());
    drop(held);
    pods.wait_reach(80, &["backend-1"]);

    // An invalid value: one Event on the Pod, and the pod's default (weight 1) again.
    annotate("pod-1", "rpclb.io/max-");
    annotate("pod-2", "rpclb.io/weight=heavy");
    pods.wait_reach(80, &["backend-1", "backend-2"]);
    wait_until("the Event on pod-2", Duration::from_secs(20), || {
        !cluster.events("pod-2", "InvalidAnnotation").is_empty()
    });
    std::thread::sleep(Duration::from_secs(3));
    let events = cluster.events("pod-2", "InvalidAnnotation");
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["regarding"]["kind"], "Pod");
    let note = events[0]["note"].as_str().unwrap_or_default();
    assert!(note.contains("rpclb.io/weight=\"heavy\""), "{note}");
    ctl.check_alive();
}

/// The controller's ServiceAccount, as the API server's audit log names it.
const CONTROLLER_USER: &str = "system:serviceaccount:rpclb-system:rpclb-controller";

/// Rules of deploy/10-rbac.yaml that the run below cannot use, each with why. Keep it short:
/// a rule that no run uses is a rule to remove.
const UNUSED_HERE: &[(&str, &str, &str, &str)] = &[
    // (verb, apiGroup, resource, why)
    (
        "list",
        "discovery.k8s.io",
        "endpointslices",
        "read instead of core Endpoints on servers that serve discovery.k8s.io/v1 (1.21+);          this 1.20 server does not (lb-controller/tests/kube_fake_api.rs covers that path)",
    ),
    ("watch", "discovery.k8s.io", "endpointslices", "as above"),
];

/// (verb, apiGroup, resource, namespace of a Role's rule or "" for the ClusterRole's) of
/// every rule that deploy/10-rbac.yaml grants rpclb-controller.
fn granted_rules() -> BTreeSet<(String, String, String, String)> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&repo_file("deploy/10-rbac.yaml")).expect("10-rbac.yaml");
    let mut out = BTreeSet::new();
    let strs = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        if !matches!(kind, "ClusterRole" | "Role") {
            continue;
        }
        // Only roles bound to the controller's account.
        let bound = docs.iter().any(|b| {
            matches!(
                b["kind"].as_str(),
                Some("ClusterRoleBinding" | "RoleBinding")
            ) && b["roleRef"]["kind"] == kind
                && b["roleRef"]["name"] == d["metadata"]["name"]
                && b["subjects"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["name"] == "rpclb-controller")
        });
        if !bound {
            continue;
        }
        let ns = d["metadata"]["namespace"].as_str().unwrap_or_default();
        for rule in d["rules"].as_array().unwrap() {
            assert!(
                rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
                "{rule}"
            );
            for verb in strs(&rule["verbs"]) {
                for group in strs(&rule["apiGroups"]) {
                    for resource in strs(&rule["resources"]) {
                        assert!(
                            verb != "*" && group != "*" && resource != "*",
                            "no wildcards: {rule}"
                        );
                        out.insert((verb.clone(), group.clone(), resource, ns.to_string()));
                    }
                }
            }
        }
    }
    out
}

/// RBAC, proven against the real API server: the controller runs end to end (watches, the
/// agent serving traffic, an Event written, counted again after the problem comes back,
/// leadership taken, renewed and released on SIGTERM) as deploy/'s ServiceAccount with
/// deploy/'s roles. Then, from the API server's audit log: every request it made was allowed
/// (no 403; the authorizer's decision "allow", by rpclb's own bindings), and every rule the
/// roles grant was used at least once, but those in `UNUSED_HERE`.
#[test]
fn rbac_grants_exactly_what_the_controller_uses() {
    skip_unless_lab!();
    let cluster = Cluster::start();
    let pods = Pods::start();
    let dir = TestDir::new("kube-rbac");
    let grpc = free_port();
    let mut ctl = cluster.controller(&dir, "ctl-a", grpc);
    let (_agent, _relay) = agent(&pods, &dir, &[grpc]);
    wait_until("ctl-a to lead", Duration::from_secs(20), || {
        cluster.leader().as_deref() == Some("ctl-a")
    });
    let (b1, b2) = (pods.ip(1), pods.ip(2));
    cluster.apply(&service_yaml(80, "rpclb.io/algorithm: fastest"));
    cluster.apply(&endpoints_yaml(&[(&[b1, b2], &[], 8080)]));
    pods.wait_reach(80, &["backend-1", "backend-2"]);
    wait_until("the Event", Duration::from_secs(20), || {
        cluster.events("web", "InvalidAnnotation").len() == 1
    });
    // The problem goes and comes back: the Event exists, so it is read and patched.
    cluster.apply(&service_yaml(80, ""));
    std::thread::sleep(Duration::from_secs(2));
    cluster.apply(&service_yaml(80, "rpclb.io/algorithm: fastest"));
    wait_until("the Event's series", Duration::from_secs(20), || {
        let e = cluster.events("web", "InvalidAnnotation");
        e.len() == 1 && e[0]["series"]["count"] == 2
    });
    // Renewals happened (1 s retry period); SIGTERM releases the Lease.
    std::thread::sleep(Duration::from_secs(2));
    ctl.signal(libc::SIGTERM);
    ctl.wait_exit(Duration::from_secs(10)).expect("ctl-a stops");
    wait_until("the Lease released", Duration::from_secs(10), || {
        cluster.leader().is_none()
    });

    let events = cluster.api.audit_events().expect("the audit log");
    let mine: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["user"]["username"] == CONTROLLER_USER)
        .collect();
    assert!(mine.len() > 10, "{} requests by the controller", mine.len());
    let mut used = BTreeSet::new();
    let mut summary = BTreeMap::new();
    for e in &mine {
        let code = e["responseStatus"]["code"].as_u64().unwrap_or(0);
        let decision = e["annotations"]["authorization.k8s.io/decision"].as_str();
        let reason = e["annotations"]["authorization.k8s.io/reason"]
            .as_str()
            .unwrap_or_default();
        assert!(
            code != 403 && decision == Some("allow"),
            "a request of the controller was not allowed: {e}"
        );
        let verb = e["verb"].as_str().unwrap().to_string();
        let Some(obj) = e.get("objectRef") else {
            // Discovery (/api, /apis, /version): every authenticated user may.
            let uri = e["requestURI"].as_str().unwrap_or_default();
            assert!(
                ["/api", "/apis", "/version"].iter().any(|p| uri == *p
                    || uri.starts_with(&format!("{p}/"))
                    || uri.starts_with(&format!("{p}?"))),
                "{e}"
            );
            continue;
        };
        // Resource requests are allowed by rpclb's own bindings, nothing broader.
        assert!(reason.contains("\"rpclb-controller"), "{reason}: {e}");
        let group = obj["apiGroup"].as_str().unwrap_or_default().to_string();
        let resource = obj["resource"].as_str().unwrap().to_string();
        assert!(obj.get("subresource").is_none(), "{e}");
        let ns = if resource == "leases" {
            obj["namespace"].as_str().unwrap_or_default().to_string()
        } else {
            String::new()
        };
        *summary
            .entry(format!("{verb} {group}/{resource} {code}"))
            .or_insert(0) += 1;
        used.insert((verb, group, resource, ns));
    }
    eprintln!("the controller's requests (verb group/resource code: count): {summary:#?}");
    let granted = granted_rules();
    let unused_here: BTreeSet<(String, String, String, String)> = UNUSED_HERE
        .iter()
        .map(|(v, g, r, _)| (v.to_string(), g.to_string(), r.to_string(), String::new()))
        .collect();
    assert!(
        unused_here.is_subset(&granted),
        "UNUSED_HERE names rules the roles no longer grant: {:?}",
        unused_here.difference(&granted).collect::<Vec<_>>()
    );
    let never: Vec<_> = granted
        .iter()
        .filter(|r| !used.contains(*r) && !unused_here.contains(*r))
        .collect();
    assert!(
        never.is_empty(),
        "deploy/10-rbac.yaml grants rules that the controller never used: {never:?}\nused: {used:#?}"
    );
    let beyond: Vec<_> = used.difference(&granted).collect();
    assert!(beyond.is_empty(), "used but not granted: {beyond:?}");
}

/// A controller restart breaks no established flow; the agent keeps
/// serving meanwhile and resyncs from the new controller.
#[test]
fn a_controller_restart_keeps_flows_and_the_agent_resyncs() {
    skip_unless_lab!();
    let cluster = Cluster::start();
    let pods = Pods::start();
    let dir = TestDir::new("kube-restart");
    let grpc = free_port();
    let mut ctl = cluster.controller(&dir, "ctl-a", grpc);
    let (mut agent, _relay) = agent(&pods, &dir, &[grpc]);
    let (b1, b2, b3) = (pods.ip(1), pods.ip(2), pods.ip(3));
    cluster.apply(&service_yaml(80, ""));
    cluster.apply(&endpoints_yaml(&[(&[b1, b2, b3], &[], 8080)]));
    pods.wait_reach(80, &["backend-1", "backend-2", "backend-3"]);

    let mut held = HeldConn::open(&pods.lab.client().ns, SocketAddrV4::new(VIP, 80))
        .expect("a held connection");
    held.echo("before");
    ctl.kill9();
    // Without a controller: established and new connections go on.
    held.echo("without a controller");
    pods.wait_reach(80, &["backend-1", "backend-2", "backend-3"]);
    agent.wait_metric("rpclb_controller_connected", 0.0);
    // A change while it is down: a pod the held flow is not on leaves.
    let keep: usize = held.backend.trim_start_matches("backend-").parse().unwrap();
    let gone = (1..=3).find(|&i| i != keep).unwrap();
    let stay: Vec<usize> = (1..=3).filter(|&i| i != gone).collect();
    let stay_ips: Vec<Ipv4Addr> = stay.iter().map(|&i| pods.ip(i)).collect();
    cluster.apply(&endpoints_yaml(&[(&stay_ips, &[], 8080)]));
    held.echo("still without a controller");
    // The controller is back on the same port: the agent resyncs.
    let _ctl = cluster.controller(&dir, "ctl-a2", grpc);
    agent.wait_metric("rpclb_controller_connected", 1.0);
    let want: Vec<String> = stay.iter().map(|i| format!("backend-{i}")).collect();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    pods.wait_reach(80, &want);
    held.echo("after the resync");
    assert!(
        agent.log().contains("keeping the current state"),
        "{}",
        agent.log()
    );
}

/// Two controllers: one leads; the leader dies under traffic (SIGKILL); the
/// agent fails over to the other, which takes the lead and follows changes;
/// no connection fails meanwhile.
#[test]
fn two_controllers_fail_over_under_traffic() {
    skip_unless_lab!();
    let cluster = Cluster::start();
    let pods = Pods::start();
    let dir = TestDir::new("kube-failover");
    let (grpc_a, grpc_b) = (free_port(), free_port());
    let mut ctl_a = cluster.controller(&dir, "ctl-a", grpc_a);
    wait_until("ctl-a to lead", Duration::from_secs(20), || {
        cluster.leader().as_deref() == Some("ctl-a")
    });
    let mut ctl_b = cluster.controller(&dir, "ctl-b", grpc_b);
    let (mut agent, _relay) = agent(&pods, &dir, &[grpc_a, grpc_b]);
    let (b1, b2, b3) = (pods.ip(1), pods.ip(2), pods.ip(3));
    cluster.apply(&service_yaml(80, "rpclb.io/algorithm: fastest"));
    cluster.apply(&endpoints_yaml(&[(&[b1, b2, b3], &[], 8080)]));
    pods.wait_reach(80, &["backend-1", "backend-2", "backend-3"]);
    wait_until("the Event", Duration::from_secs(20), || {
        !cluster.events("web", "InvalidAnnotation").is_empty()
    });
    assert_eq!(cluster.leader().as_deref(), Some("ctl-a"));

    // New connections all along, bounded in count and time.
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let client = &pods.lab.client().ns;
    std::thread::scope(|s| {
        s.spawn(|| {
            let lim = Limits {
                per_op: Duration::from_secs(1),
                total: Duration::from_secs(2),
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let r = client
                    .run(|| lab::tcp_attempts(SocketAddrV4::new(VIP, 80), 1, lim))
                    .expect("client namespace");
                match r.into_iter().next() {
                    Some(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        ctl_a.kill9();
        // ctl-b takes the lead once ctl-a's Lease expires (4 s).
        wait_until("ctl-b to lead", Duration::from_secs(20), || {
            cluster.leader().as_deref() == Some("ctl-b")
        });
        agent.wait_metric("rpclb_controller_connected", 1.0);
        // ctl-b follows a change: pod 3 leaves.
        cluster.apply(&endpoints_yaml(&[(&[b1, b2], &[], 8080)]));
        pods.wait_reach(80, &["backend-1", "backend-2"]);
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 50, "only {ok} connections made");
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    // The Event stayed one across the change of leader.
    assert_eq!(cluster.events("web", "InvalidAnnotation").len(), 1);
    let log = agent.log();
    assert_eq!(
        log.matches("connected to the controller").count(),
        2,
        "{log}"
    );
    ctl_b.check_alive();
}

/// A source that the server does not serve is an error at start that names
/// the server's version and the fix, not a controller that waits forever.
#[test]
fn an_unserved_endpoints_source_is_an_error_at_start() {
    let cluster = Cluster::start();
    let dir = TestDir::new("kube-unserved");
    let out = std::process::Command::new(controller_bin())
        .args([
            "--kube",
            "--endpoints-source",
            "endpointslices",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--metrics-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--pod-name",
            "ctl-x",
        ])
        .args(controller_tls_args(&certs(&dir)))
        .env("KUBECONFIG", &cluster.controller_kubeconfig)
        .current_dir(dir.path())
        .output()
        .expect("run lb-controller");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("does not serve discovery.k8s.io/v1 EndpointSlices")
            && err.contains("v1.20.2")
            && err.contains("--endpoints-source endpoints"),
        "{err}"
    );
}

/// Every manifest in deploy/ is accepted by a real API server (server-side
/// dry run: admission and validation run, nothing is stored), after the
/// namespace and RBAC that the later files need.
#[test]
fn the_manifests_pass_a_server_side_dry_run() {
    let cluster = Cluster::start();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for f in &files {
        let out = cluster.kubectl(&["apply", "--dry-run=server", "-f", &f.display().to_string()]);
        assert!(out.contains("(server dry run)"), "{}: {out}", f.display());
    }
}
