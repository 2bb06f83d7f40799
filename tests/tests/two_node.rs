//! Two-node lab tests: two node namespaces on a node network, each with its
//! own pods and its own `lb-agent` (eBPF), a client outside the cluster on the
//! node network (tests/src/lab/two_node.rs). Real TCP and UDP: which backend
//! answered, which source it saw, which address the reply came from.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use rpclb_tests::lab::{self, Limits, Node, Reply, TcpServer, TwoNodeLab, UdpServer};
use rpclb_tests::procs::{Proc, TestDir, node_agent_args};

/// Identity of pod `i` of `node` (`a1`, `b2`, ...).
fn ident(node: &Node, i: usize) -> String {
    format!("{}{i}", &node.name["node-".len()..])
}

/// Identity servers on every pod of both nodes: TCP 8080 and UDP 5353.
struct Servers {
    tcp: BTreeMap<String, TcpServer>,
    udp: BTreeMap<String, UdpServer>,
}

fn servers(lab: &TwoNodeLab) -> Servers {
    let any = |p| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, p);
    let mut s = Servers {
        tcp: BTreeMap::new(),
        udp: BTreeMap::new(),
    };
    for node in lab.nodes() {
        for (k, pod) in node.pods().iter().enumerate() {
            let id = ident(node, k + 1);
            s.tcp.insert(
                id.clone(),
                TcpServer::start(&pod.ns, any(8080), &id).expect("tcp server"),
            );
            s.udp.insert(
                id.clone(),
                UdpServer::start(&pod.ns, any(5353), &id).expect("udp server"),
            );
        }
    }
    s
}

/// One service entry of a config file; `extra` is more YAML of the service.
fn svc_yaml(
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    proto: &str,
    algo: &str,
    backends: &[Ipv4Addr],
    backend_port: u16,
    extra: &str,
) -> String {
    let mut s = format!(
        "  - name: {name}\n    vip: {vip}\n    port: {port}\n    protocol: {proto}\n    \
         algorithm: {algo}\n{extra}"
    );
    if backends.is_empty() {
        s.push_str("    backends: []\n");
    } else {
        s.push_str("    backends:\n");
        for b in backends {
            s.push_str(&format!("      - {{ ip: {b}, port: {backend_port} }}\n"));
        }
    }
    s
}

fn config_yaml(services: &[String]) -> String {
    let mut s = String::from("# written by tests/tests/two_node.rs\nservices:\n");
    for svc in services {
        s.push_str(svc);
    }
    s
}

/// Both nodes' agents, each with its own config file.
struct Agents {
    dirs: [TestDir; 2],
    procs: Vec<Proc>,
}

impl Agents {
    fn start(lab: &TwoNodeLab, configs: [&str; 2], extra: &[&str]) -> Agents {
        let dirs = [TestDir::new("node-a"), TestDir::new("node-b")];
        let mut procs = Vec::new();
        for ((node, dir), cfg) in lab.nodes().into_iter().zip(&dirs).zip(configs) {
            dir.write_config(cfg);
            let args = node_agent_args(node, &dir.config(), extra);
            let mut p = Proc::start_in(&node.ns, dir, &node.name, &args);
            p.wait_ready();
            procs.push(p);
        }
        Agents { dirs, procs }
    }

    fn log(&self, i: usize) -> String {
        format!(
            "{}:\n{}",
            self.dirs[i].path().display(),
            self.procs[i].log()
        )
    }
}

fn tcp_from(ns: &lab::Netns, target: SocketAddrV4, n: usize) -> Vec<Reply> {
    ns.run(|| lab::tcp_attempts(target, n, Limits::default()))
        .expect("namespace")
        .into_iter()
        .enumerate()
        .map(|(k, r)| r.unwrap_or_else(|e| panic!("TCP {k} to {target}: {e}")))
        .collect()
}

fn udp_from(ns: &lab::Netns, target: SocketAddrV4, n: usize) -> Vec<Reply> {
    ns.run(|| lab::udp_attempts(target, n, Limits::default()))
        .expect("namespace")
        .into_iter()
        .enumerate()
        .map(|(k, r)| r.unwrap_or_else(|e| panic!("UDP {k} to {target}: {e}")))
        .collect()
}

fn counts(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.backend.clone()).or_default() += 1;
    }
    m
}

const TO_B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const TO_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const ALL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);

/// A ClusterIP connection from a pod on node A to a backend on node B works
/// and comes back, and one from B to A; a service over both nodes' pods is
/// balanced over all four from either side. Each backend sees the client pod's
/// own address (no SNAT for ClusterIP traffic); each reply comes from the VIP.
#[test]
fn two_node_cluster_ip_crosses_nodes_both_ways() {
    if !lab::require() {
        return;
    }
    let lab = TwoNodeLab::new(2).expect("two-node lab");
    let srv = servers(&lab);
    let (a, b) = (lab.a(), lab.b());
    let ip = |n: &Node, i: usize| n.pod(i).ip();
    // Pod 2 of each node; the clients below are pods 1 (a pod reaching itself through a VIP,
    // hairpin, is not handled: see docs/kubernetes.md).
    let all = [ip(a, 2), ip(b, 2)];
    let cfg = config_yaml(&[
        svc_yaml(
            "lab/to-b:http",
            TO_B,
            80,
            "tcp",
            "round-robin",
            &[ip(b, 1)],
            8080,
            "",
        ),
        svc_yaml(
            "lab/to-a:http",
            TO_A,
            80,
            "tcp",
            "round-robin",
            &[ip(a, 1)],
            8080,
            "",
        ),
        svc_yaml(
            "lab/all:http",
            ALL,
            80,
            "tcp",
            "round-robin",
            &all,
            8080,
            "",
        ),
        svc_yaml("lab/all:dns", ALL, 53, "udp", "round-robin", &all, 5353, ""),
    ]);
    let agents = Agents::start(&lab, [&cfg, &cfg], &[]);

    // A pod on A to a backend on B, and back.
    let r = tcp_from(&a.pod(2).ns, SocketAddrV4::new(TO_B, 80), 5);
    for x in &r {
        assert_eq!(x.backend, "b1", "{}", agents.log(0));
        assert_eq!(x.peer, SocketAddr::from((TO_B, 80)), "reply from the VIP");
    }
    let seen = srv.tcp["b1"].peers();
    assert_eq!(seen.len(), 5);
    assert!(
        seen.iter().all(|p| p.ip() == ip(a, 2)),
        "b1 saw the client pod's own address: {seen:?}"
    );

    // A pod on B to a backend on A, and back.
    let r = tcp_from(&b.pod(2).ns, SocketAddrV4::new(TO_A, 80), 5);
    for x in &r {
        assert_eq!(x.backend, "a1", "{}", agents.log(1));
        assert_eq!(x.peer, SocketAddr::from((TO_A, 80)));
    }
    assert!(srv.tcp["a1"].peers().iter().all(|p| p.ip() == ip(b, 2)));

    // Both nodes' pods from either node, TCP and UDP.
    for node in [a, b] {
        let c = counts(&tcp_from(&node.pod(1).ns, SocketAddrV4::new(ALL, 80), 40));
        let want = BTreeMap::from([("a2".to_string(), 20), ("b2".to_string(), 20)]);
        assert_eq!(c, want, "TCP from {}", node.name);
        let r = udp_from(&node.pod(1).ns, SocketAddrV4::new(ALL, 53), 20);
        assert!(r.iter().all(|x| x.peer == SocketAddr::from((ALL, 53))));
        let want = BTreeMap::from([("a2".to_string(), 10), ("b2".to_string(), 10)]);
        assert_eq!(counts(&r), want, "UDP from {}", node.name);
        let from = node.pod(1).ip();
        assert!(srv.udp["b2"].peers().iter().any(|p| p.ip() == from));
    }
}
