//! The two-node lab (tests/src/lab/two_node.rs) driven by a real Kubernetes
//! API server (`rpclb_tests::kube`, kube-apiserver v1.20.2 with etcd on the
//! host's 127.0.0.1): the real `lb-controller --kube`, on a ServiceAccount
//! token bound only to deploy/10-rbac.yaml's roles, watches the Nodes, a
//! `type: LoadBalancer` Service and its Endpoints, and streams each node's
//! state over mutual TLS to that node's `lb-agent` (eBPF). Each agent reaches
//! the controller through a loopback relay in its node namespace
//! (`rpclb_tests::relay`), as through the controller's Service.
//!
//! Real TCP from a client outside the cluster: node ports and the
//! load-balancer IP with `externalTrafficPolicy: Local`, the pods see the
//! client's own address, `healthCheckNodePort` follows the Endpoints.
//! (The standalone twin of this test is two_node.rs's
//! `two_node_node_port_and_external_ip_local`.)
//!
//! The load-balancer IP is set in the Service's status after its creation,
//! as a cloud controller does: the controller once dropped the status in its
//! watch, so such IPs were never served (this test found it).
//!
//! A 1.20 server has no discovery.k8s.io/v1: the controller's `auto` source
//! reads core v1 Endpoints (with `nodeName`), which the test writes.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use rpclb_tests::kube::{ApiServer, free_port, repo_file};
use rpclb_tests::lab::two_node::{counts, ident, tcp_from};
use rpclb_tests::lab::{self, Limits, Node, TcpServer, TwoNodeLab};
use rpclb_tests::procs::{
    Proc, TestDir, agent_tls_args, controller_bin, controller_tls_args, http_get_from,
    node_agent_args,
};
use rpclb_tests::relay::Relay;

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// In the lab's external range, routed to node A.
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
const NODE_PORT: u16 = 30080;
const HEALTH_PORT: u16 = 32080;
/// The controller's port as each agent sees it (its relay).
const CONTROLLER_PORT: u16 = 50551;

fn apply(api: &ApiServer, yaml: &str) {
    api.apply(yaml)
        .unwrap_or_else(|e| panic!("kubectl apply: {e}\n{yaml}"));
}

/// The Endpoints of `shop/web`: the pods `(node, i)` on 8080, with their nodes.
fn endpoints_yaml(pods: &[(&Node, usize)]) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\n  namespace: shop\n\
         subsets:\n- addresses:\n",
    );
    for (n, i) in pods {
        y.push_str(&format!(
            "  - {{ip: {}, nodeName: {}}}\n",
            n.pod(*i).ip(),
            n.name
        ));
    }
    y.push_str("  ports:\n  - {name: http, port: 8080, protocol: TCP}\n");
    y
}

/// A GET of the health-check node port of `node`, from the client.
fn health(lab: &TwoNodeLab, node: &Node) -> (u16, String) {
    let t = SocketAddr::from((node.addr(), HEALTH_PORT));
    lab.client()
        .run(|| http_get_from(t, "/healthz", Duration::from_secs(3)))
        .expect("client namespace")
        .unwrap_or_else(|e| panic!("GET {t}: {e}"))
}

/// Which pods `n` new connections from the client to `target` reach (empty
/// when one failed).
fn reached(lab: &TwoNodeLab, target: SocketAddrV4, n: usize) -> BTreeMap<String, usize> {
    let lim = Limits {
        per_op: Duration::from_millis(500),
        total: Duration::from_secs(5),
    };
    let r = lab
        .client()
        .run(|| lab::tcp_attempts(target, n, lim))
        .expect("client namespace");
    if r.iter().any(|x| x.is_err()) {
        return BTreeMap::new();
    }
    counts(&r.into_iter().map(|x| x.unwrap()).collect::<Vec<_>>())
}

/// Waits (bounded) until `n` connections to `target` spread as `want`.
fn wait_reach(lab: &TwoNodeLab, target: SocketAddrV4, want: &[(&str, usize)], what: &str) {
    let want: BTreeMap<String, usize> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let n = want.values().sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = BTreeMap::new();
    while Instant::now() < deadline {
        last = reached(lab, target, n);
        if last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: {target} never reached {want:?}; last {last:?}");
}

#[test]
fn two_node_kube_node_ports_and_load_balancer_ip_local() {
    if !lab::require() {
        return;
    }
    let api = ApiServer::start().unwrap_or_else(|e| panic!("{e}"));
    apply(&api, &repo_file("deploy/00-namespace.yaml"));
    apply(&api, &repo_file("deploy/10-rbac.yaml"));
    apply(
        &api,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n",
    );
    let kubeconfig = api
        .kubeconfig_for_service_account("rpclb-system", "rpclb-controller")
        .expect("a token for rpclb-controller");

    let lab = TwoNodeLab::new(2).expect("two-node lab");
    let (a, b) = (lab.a(), lab.b());
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080);
    let servers: BTreeMap<String, TcpServer> = lab
        .nodes()
        .into_iter()
        .flat_map(|n| (1..=2).map(move |i| (n, i)))
        .map(|(n, i)| {
            let id = ident(n, i);
            let s = TcpServer::start(&n.pod(i).ns, any, &id).expect("tcp server");
            (id, s)
        })
        .collect();

    // The Service (LoadBalancer, Local, fixed node ports), its load-balancer
    // status, and Endpoints on both nodes.
    apply(
        &api,
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  \
             annotations: {{rpclb.io/algorithm: round-robin}}\nspec:\n  type: LoadBalancer\n  clusterIP: {WEB}\n  externalTrafficPolicy: Local\n  \
             healthCheckNodePort: {HEALTH_PORT}\n  ports:\n  - name: http\n    port: 80\n    \
             targetPort: 8080\n    nodePort: {NODE_PORT}\n    protocol: TCP\n"
        ),
    );
    api.kubectl_output(
        &[
            "-n",
            "shop",
            "patch",
            "service",
            "web",
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{LB_IP}"}}]}}}}}}"#),
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("patch the load-balancer status: {e}"));
    apply(&api, &endpoints_yaml(&[(a, 1), (a, 2), (b, 1), (b, 2)]));

    // The controller on the host, as its ServiceAccount, with mutual TLS.
    let dir = TestDir::new("two-node-kube");
    let certs = dir.certs(&["node-a", "node-b"]);
    let grpc = free_port();
    let metrics = free_port();
    let mut args: Vec<String> = [
        "--kube",
        "--listen",
        &format!("127.0.0.1:{grpc}"),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics}"),
        "--pod-name",
        "rpclb-controller-0",
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
    args.extend(controller_tls_args(&certs));
    let kc = kubeconfig.display().to_string();
    let mut controller = Proc::spawn_host(
        &dir,
        "controller",
        controller_bin(),
        &args,
        &[("KUBECONFIG", kc.as_str())],
        metrics,
    );
    controller.wait_ready();

    // One agent per node, each through its own relay to the controller.
    let upstream = [SocketAddr::from((Ipv4Addr::LOCALHOST, grpc))];
    let mut relays = Vec::new();
    let mut agents = Vec::new();
    let dirs = [TestDir::new("node-a"), TestDir::new("node-b")];
    for (node, d) in lab.nodes().into_iter().zip(&dirs) {
        relays.push(Relay::start(&node.ns, CONTROLLER_PORT, &upstream).expect("relay"));
        let mut args = node_agent_args(node, &d.config(), &[]);
        let i = args.iter().position(|x| x == "--config").expect("--config");
        args.drain(i..i + 2);
        args.extend([
            "--controller".to_string(),
            format!("https://127.0.0.1:{CONTROLLER_PORT}"),
        ]);
        args.extend(agent_tls_args(&certs, &node.name));
        let mut p = Proc::start_in(&node.ns, d, &node.name, &args);
        p.wait_ready();
        agents.push(p);
    }

    // Each node's port reaches its own pods only; so does the LB IP (node A).
    let cip = lab.client_ip();
    let port = |n: &Node| SocketAddrV4::new(n.addr(), NODE_PORT);
    wait_reach(&lab, port(a), &[("a1", 5), ("a2", 5)], "node A's port");
    wait_reach(&lab, port(b), &[("b1", 5), ("b2", 5)], "node B's port");
    let lb = SocketAddrV4::new(LB_IP, 80);
    let svc = api
        .kubectl_output(&["-n", "shop", "get", "service", "web", "-o", "yaml"], None)
        .unwrap_or_default();
    assert!(svc.contains(&format!("ip: {LB_IP}")), "the status: {svc}");
    wait_reach(&lab, lb, &[("a1", 5), ("a2", 5)], "the load-balancer IP");
    for r in tcp_from(lab.client(), port(b), 4) {
        assert_eq!(
            r.peer,
            SocketAddr::from(port(b)),
            "the reply from the node port"
        );
        assert_eq!(r.local.ip(), cip);
    }
    for (id, s) in &servers {
        let peers = s.peers();
        assert!(
            !peers.is_empty() && peers.iter().all(|p| p.ip() == cip),
            "{id} saw the client's own address: {peers:?}"
        );
    }
    for node in [a, b] {
        let (status, resp) = health(&lab, node);
        assert_eq!(status, 200, "{}: {resp}", node.name);
        assert!(
            resp.ends_with(
                r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
            ),
            "{resp}"
        );
    }

    // Node B's pods leave the Endpoints: B's health check says 503 and its
    // node port refuses; A is unchanged.
    apply(&api, &endpoints_yaml(&[(a, 1), (a, 2)]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, resp) = loop {
        let r = health(&lab, b);
        if r.0 == 503 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status, 503, "{resp}\n{}", agents[1].log());
    assert!(resp.contains(r#""localEndpoints":0"#), "{resp}");
    let r = lab
        .client()
        .run(|| lab::tcp_attempts(port(b), 1, Limits::default()))
        .expect("client namespace");
    let e = r[0].as_ref().expect_err("no local endpoint on B");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert_eq!(health(&lab, a).0, 200);
    wait_reach(
        &lab,
        port(a),
        &[("a1", 5), ("a2", 5)],
        "node A's port after",
    );
    drop(relays);
}
