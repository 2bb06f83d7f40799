//! The locality policy (docs/policies.md) in the two-node lab
//! (tests/src/lab/two_node.rs): node A in zone `za`, node B in zone `zb`, two
//! backend pods on each, one eBPF agent per node with the same standalone
//! config (its `nodes:` say where the nodes are; each agent resolves the
//! policy for its own `--node-name`). Real TCP from a pod on each node.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use rpclb_tests::lab::two_node::{counts, ident, tcp_from};
use rpclb_tests::lab::{self, Node, TcpServer, TwoNodeLab};
use rpclb_tests::procs::NodeAgents;

const NEAR: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);

/// The config: the nodes' zones, and one service over pods 2 and 3 of both
/// nodes with `locality: { tiers: [zone], min_backends: 2 }`; `terminating`
/// names the pods (`a3`, ...) that are terminating.
fn config(lab: &TwoNodeLab, terminating: &[&str]) -> String {
    let mut s = String::from(
        "# written by tests/tests/locality.rs\n\
         nodes:\n  - { name: node-a, zone: za, region: r1 }\n  - { name: node-b, zone: zb, region: r1 }\n\
         services:\n",
    );
    s.push_str(&format!(
        "  - name: lab/near:http\n    vip: {NEAR}\n    port: 80\n    protocol: tcp\n    \
         algorithm: round-robin\n    locality: {{ tiers: [zone], min_backends: 2 }}\n    backends:\n"
    ));
    for node in lab.nodes() {
        for i in [2, 3] {
            let state = if terminating.contains(&ident(node, i).as_str()) {
                "terminating"
            } else {
                "active"
            };
            s.push_str(&format!(
                "      - {{ ip: {}, port: 8080, node: {}, state: {state} }}\n",
                node.pod(i).ip(),
                node.name
            ));
        }
    }
    s
}

/// Which backends answered `n` connections from pod 1 of `node`.
fn answered(node: &Node, n: usize) -> BTreeSet<String> {
    counts(&tcp_from(&node.pod(1).ns, SocketAddrV4::new(NEAR, 80), n))
        .into_keys()
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// A client on node A reaches only zone A's backends (and B's only B's);
/// when zone A has fewer than 2 ready backends (a3 terminating), node A
/// spills over to every backend that takes new flows, zone B's included,
/// while node B keeps to its zone.
#[test]
fn locality_prefers_the_zone_and_spills_over_below_min_backends() {
    if !lab::require() {
        return;
    }
    let lab = TwoNodeLab::new(3).expect("two-node lab");
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080);
    let _servers: Vec<TcpServer> = lab
        .nodes()
        .into_iter()
        .flat_map(|node| {
            [2, 3].map(|i| {
                TcpServer::start(&node.pod(i).ns, any, &ident(node, i)).expect("tcp server")
            })
        })
        .collect();
    let (a, b) = (lab.a(), lab.b());
    let cfg = config(&lab, &[]);
    let agents = NodeAgents::start(&lab, [&cfg, &cfg], &[]);

    assert_eq!(answered(a, 20), set(&["a2", "a3"]), "{}", agents.log(0));
    assert_eq!(answered(b, 20), set(&["b2", "b3"]), "{}", agents.log(1));

    // a3 terminates: zone A has 1 ready backend, below min_backends 2.
    let cfg = config(&lab, &["a3"]);
    for d in &agents.dirs {
        d.write_config(&cfg);
    }
    // The agents poll their file; wait (bounded) until A's state changed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if answered(a, 6).iter().any(|x| x.starts_with('b')) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node A never spilled over: {}",
            agents.log(0)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        answered(a, 30),
        set(&["a2", "b2", "b3"]),
        "{}",
        agents.log(0)
    );
    assert_eq!(answered(b, 20), set(&["b2", "b3"]), "{}", agents.log(1));

    // a3 is back: node A keeps to its zone again.
    let cfg = config(&lab, &[]);
    for d in &agents.dirs {
        d.write_config(&cfg);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered(a, 12) != set(&["a2", "a3"]) {
        assert!(
            Instant::now() < deadline,
            "node A never went back to its zone: {}",
            agents.log(0)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
