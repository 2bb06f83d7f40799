//! Two-node lab tests: two node namespaces on a node network, each with its
//! own pods and its own `lb-agent` (eBPF), a client outside the cluster on the
//! node network (tests/src/lab/two_node.rs). Real TCP and UDP: which backend
//! answered, which source it saw, which address the reply came from.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use rpclb_tests::lab::two_node::{counts, ident, tcp_from};
use rpclb_tests::lab::{self, Limits, Node, Reply, TcpServer, TwoNodeLab, UdpServer};
use rpclb_tests::procs::{NodeAgents as Agents, http_get_from, svc_yaml};

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

fn config_yaml(services: &[String]) -> String {
    let mut s = String::from("# written by tests/tests/two_node.rs\nservices:\n");
    for svc in services {
        s.push_str(svc);
    }
    s
}

fn udp_from(ns: &lab::Netns, target: impl Into<SocketAddr>, n: usize) -> Vec<Reply> {
    let target: SocketAddr = target.into();
    ns.run(|| lab::udp_attempts(target, n, Limits::default()))
        .expect("namespace")
        .into_iter()
        .enumerate()
        .map(|(k, r)| r.unwrap_or_else(|e| panic!("UDP {k} to {target}: {e}")))
        .collect()
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
    // hairpin, is tested apart: `two_node_hairpin_*`).
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
        ),
        svc_yaml(
            "lab/to-a:http",
            TO_A,
            80,
            "tcp",
            "round-robin",
            &[ip(a, 1)],
            8080,
        ),
        svc_yaml("lab/all:http", ALL, 80, "tcp", "round-robin", &all, 8080),
        svc_yaml("lab/all:dns", ALL, 53, "udp", "round-robin", &all, 5353),
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

/// `backends:` YAML of pods (`(node, i)`) with their nodes.
fn pods_yaml(pods: &[(&Node, usize)], port: u16) -> String {
    let mut s = String::from("    backends:\n");
    for (n, i) in pods {
        s.push_str(&format!(
            "      - {{ ip: {}, port: {port}, node: {} }}\n",
            n.pod(*i).ip(),
            n.name
        ));
    }
    s
}

/// One service with external front ends, its backends on `pods`.
fn ext_svc(
    name: &str,
    vip: impl std::fmt::Display,
    port: u16,
    proto: &str,
    backend_port: u16,
    pods: &[(&Node, usize)],
    external: &str,
) -> String {
    format!(
        "  - name: {name}\n    vip: {vip}\n    port: {port}\n    protocol: {proto}\n    \
         algorithm: round-robin\n{external}{}",
        pods_yaml(pods, backend_port)
    )
}

/// A plain HTTP GET from `ns` to `target`: (status, headers + body).
fn http_get(ns: &lab::Netns, target: impl Into<SocketAddr>) -> std::io::Result<(u16, String)> {
    let target: SocketAddr = target.into();
    ns.run(|| http_get_from(target, "/healthz", std::time::Duration::from_secs(3)))
        .expect("client namespace")
}

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);

/// NodePort (TCP and UDP) and an external IP with `externalTrafficPolicy:
/// Local`, from a client outside the cluster: each node sends to its own
/// pods only, the pods see the client's own address, and every reply comes
/// from the address the client used. The health-check node port answers 200
/// with the local endpoint count, then 503 once the node has none, and the
/// node port then refuses new connections.
#[test]
fn two_node_node_port_and_external_ip_local() {
    if !lab::require() {
        return;
    }
    let lab = TwoNodeLab::new(2).expect("two-node lab");
    let srv = servers(&lab);
    let (a, b) = (lab.a(), lab.b());
    let client = lab.client();
    let cip = lab.client_ip();
    let local = format!(
        "    node_port: 30080\n    external_ips: [{EXT_IP}]\n    \
         external_traffic_policy: local\n    health_check_node_port: 32080\n"
    );
    let local_udp = "    node_port: 30053\n    external_traffic_policy: local\n";
    let all = [(a, 1), (a, 2), (b, 1), (b, 2)];
    let cfg = |pods: &[(&Node, usize)]| {
        config_yaml(&[
            ext_svc("lab/web:http", WEB, 80, "tcp", 8080, pods, &local),
            ext_svc("lab/web:dns", WEB, 53, "udp", 5353, pods, local_udp),
        ])
    };
    let full = cfg(&all);
    let mut agents = Agents::start(&lab, [&full, &full], &[]);

    let check = |target: SocketAddrV4, want: [&str; 2], replies: &[Reply]| {
        let c = counts(replies);
        let w = BTreeMap::from([(want[0].to_string(), 5), (want[1].to_string(), 5)]);
        assert_eq!(c, w, "to {target}: {}", agents.log(0));
        for r in replies {
            assert_eq!(r.peer, SocketAddr::from(target), "reply from {target}");
            assert_eq!(r.local.ip(), cip);
        }
    };
    for (node, want) in [(a, ["a1", "a2"]), (b, ["b1", "b2"])] {
        let t = SocketAddrV4::new(node.addr(), 30080);
        check(t, want, &tcp_from(client, t, 10));
        let t = SocketAddrV4::new(node.addr(), 30053);
        check(t, want, &udp_from(client, t, 10));
        // The pods saw the client's own address (DNAT only).
        for w in want {
            let tcp = srv.tcp[w].peers();
            let udp = srv.udp[w].peers();
            assert!(
                !tcp.is_empty() && tcp.iter().all(|p| p.ip() == cip),
                "{w}: {tcp:?}"
            );
            assert!(
                !udp.is_empty() && udp.iter().all(|p| p.ip() == cip),
                "{w}: {udp:?}"
            );
        }
    }
    // The external IP, routed to node A.
    let t = SocketAddrV4::new(EXT_IP, 80);
    check(t, ["a1", "a2"], &tcp_from(client, t, 10));

    // healthCheckNodePort: 200 and the count on both nodes.
    for node in [a, b] {
        let (status, resp) = http_get(client, SocketAddrV4::new(node.addr(), 32080)).unwrap();
        assert_eq!(status, 200, "{resp}");
        assert!(
            resp.ends_with(
                r#"{"service":{"namespace":"lab","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
            ),
            "{resp}"
        );
        assert!(
            resp.contains("X-Load-Balancing-Endpoint-Weight: 2\r\n"),
            "{resp}"
        );
    }

    // Node B's pods leave the service: B's health check says 503, its node
    // port refuses new connections; A's is unchanged.
    agents.dirs[1].write_config(&cfg(&[(a, 1), (a, 2)]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let (status, resp) = loop {
        let r = http_get(client, SocketAddrV4::new(b.addr(), 32080)).unwrap();
        if r.0 == 503 || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(status, 503, "{resp}\n{}", agents.log(1));
    assert!(resp.contains(r#""localEndpoints":0"#), "{resp}");
    let t = SocketAddrV4::new(b.addr(), 30080);
    let r = client
        .run(|| lab::tcp_attempts(t, 1, Limits::default()))
        .unwrap();
    let e = r[0].as_ref().expect_err("no local endpoint on B");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let (status, _) = http_get(client, SocketAddrV4::new(a.addr(), 32080)).unwrap();
    assert_eq!(status, 200);
    // UDP to B's node port: an ICMP port unreachable (a connected socket
    // sees ECONNREFUSED), counted as tx_icmp_no_backend.
    let t = SocketAddrV4::new(b.addr(), 30053);
    let e = client
        .run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            s.connect(t)?;
            s.send(b"ping")?;
            s.recv(&mut [0u8; 64]).map(|_| ())
        })
        .unwrap()
        .expect_err("no local endpoint on B");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let m = agents.procs[1].scrape();
    let icmp = m.sum(
        "rpclb_datapath_events_total",
        &[("reason", "tx_icmp_no_backend")],
    );
    assert_eq!(icmp, 1.0, "{}", m.0);
}

/// `backends:` YAML of pods' IPv6 addresses (`(node, i)`) with their nodes.
fn pods_yaml6(pods: &[(&Node, usize)], port: u16) -> String {
    let mut s = String::from("    backends:\n");
    for (n, i) in pods {
        s.push_str(&format!(
            "      - {{ ip: '{}', port: {port}, node: {} }}\n",
            n.pod(*i).ip6(),
            n.name
        ));
    }
    s
}

/// Identity servers on `[::]` (both families) on every pod of both nodes:
/// TCP 8080 and UDP 5353.
fn servers6(lab: &TwoNodeLab) -> Servers {
    let any = |p| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, p));
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

const WEB6: &str = "fd00:10:96::20";
const EXT_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x60, 0, 0, 0, 0, 0, 0x10);

/// A dual-stack Service as the controller gives it to the agents (one
/// service per family on the same node ports), with `externalTrafficPolicy:
/// Local`, over IPv6 from a client outside the cluster: the node port (TCP
/// and UDP) on each node's IPv6 address and an IPv6 external IP routed to
/// node A. Each node sends to its own pods only, and every reply comes from
/// the address the client used. In eBPF mode the pods see the client's own
/// address (DNAT only); in the userspace proxy (`--datapath userspace`) they
/// see the node's. A `Cluster` node port over IPv6 uses every pod in eBPF
/// mode (the other node's SNATed: `ipv6_cluster_snat` below), the node's own
/// in the userspace proxy. The IPv4 node port answers beside it, and the
/// health-check node port answers over IPv6 with the node's IPv6 endpoints.
fn ipv6_front_ends_local(datapath: &str) {
    let lab = TwoNodeLab::new(2).expect("two-node lab");
    lab.add_ipv6().expect("IPv6 in the lab");
    let srv = servers6(&lab);
    let (a, b) = (lab.a(), lab.b());
    let client = lab.client();
    let cip6 = lab.client_ip6();
    let local6 = format!(
        "    node_port: 30080\n    external_ips: ['{EXT_IP6}']\n    \
         external_traffic_policy: local\n    health_check_node_port: 32080\n"
    );
    let local4 = "    node_port: 30080\n    external_traffic_policy: local\n    \
                  health_check_node_port: 32080\n";
    let udp6 = "    node_port: 30053\n    external_traffic_policy: local\n";
    let all = [(a, 1), (a, 2), (b, 1), (b, 2)];
    let svc6 = |name: &str, port, proto, bport, ext: &str| {
        format!(
            "  - name: {name}\n    vip: '{WEB6}'\n    port: {port}\n    protocol: {proto}\n    \
             algorithm: round-robin\n{ext}{}",
            pods_yaml6(&all, bport)
        )
    };
    let cfg = config_yaml(&[
        ext_svc("lab/web:http", WEB, 80, "tcp", 8080, &all, local4),
        svc6("lab/web:http@ipv6", 80, "tcp", 8080, &local6),
        svc6("lab/web:dns@ipv6", 53, "udp", 5353, udp6),
        // `Cluster`: every pod in eBPF mode (IPv6 SNAT on), this node's in
        // the userspace proxy.
        svc6(
            "lab/cl:http@ipv6",
            81,
            "tcp",
            8080,
            "    node_port: 30081\n",
        )
        .replace(WEB6, "fd00:10:96::21"),
    ]);
    let agents = Agents::start(&lab, [&cfg, &cfg], &["--datapath", datapath]);
    let ebpf = datapath == "ebpf";

    let check = |target: SocketAddr, want: [&str; 2], replies: &[Reply]| {
        let c = counts(replies);
        let w = BTreeMap::from([(want[0].to_string(), 5), (want[1].to_string(), 5)]);
        assert_eq!(c, w, "{datapath}: to {target}: {}", agents.log(0));
        for r in replies {
            assert_eq!(r.peer, target, "{datapath}: reply from {target}");
            assert_eq!(r.local.ip(), std::net::IpAddr::from(cip6));
        }
    };
    // What each pod saw: the client's own address (eBPF, DNAT only), or the
    // node's address on the pod's link (the userspace proxy connects).
    let saw = |node: &Node, i: usize, peers: Vec<SocketAddr>| {
        let want = if ebpf { cip6 } else { node.pod(i).node_ip6() };
        assert!(
            !peers.is_empty() && peers.iter().all(|p| p.ip() == std::net::IpAddr::from(want)),
            "{datapath}: {}{i} saw {peers:?}, not {want}",
            node.name
        );
    };
    for (node, want) in [(a, ["a1", "a2"]), (b, ["b1", "b2"])] {
        let t = SocketAddr::from((node.addr6(), 30080));
        check(t, want, &tcp_from(client, t, 10));
        let t = SocketAddr::from((node.addr6(), 30053));
        check(t, want, &udp_from(client, t, 10));
        for i in [1, 2] {
            let id = ident(node, i);
            saw(node, i, srv.tcp[&id].peers());
            saw(node, i, srv.udp[&id].peers());
        }
    }
    // The external IP, routed to node A.
    let t = SocketAddr::from((EXT_IP6, 80));
    check(t, ["a1", "a2"], &tcp_from(client, t, 10));
    saw(a, 1, srv.tcp["a1"].peers());
    // `Cluster` over IPv6: in eBPF mode every pod (b1 and b2 SNATed to
    // A's address), in the userspace proxy node A's own.
    let t = SocketAddr::from((a.addr6(), 30081));
    let r = tcp_from(client, t, 8);
    if ebpf {
        let want = ["a1", "a2", "b1", "b2"].map(|p| (p.to_string(), 2));
        assert_eq!(counts(&r), BTreeMap::from(want), "{}", agents.log(0));
        let b1 = srv.tcp["b1"].peers();
        assert_eq!(b1.last().map(|p| p.ip()), Some(a.addr6().into()), "{b1:?}");
    } else {
        let want = [("a1".to_string(), 4), ("a2".to_string(), 4)];
        assert_eq!(counts(&r), BTreeMap::from(want), "{}", agents.log(0));
        saw(a, 2, srv.tcp["a2"].peers());
    }
    assert!(r.iter().all(|x| x.peer == t));
    // The IPv4 service's node port, the same number, beside it.
    let t = SocketAddr::from((a.addr(), 30080));
    let r = tcp_from(client, t, 4);
    assert_eq!(
        counts(&r),
        BTreeMap::from([("a1".to_string(), 2), ("a2".to_string(), 2)])
    );
    assert!(r.iter().all(|x| x.peer == t));

    // healthCheckNodePort over IPv6 (and IPv4): 200 and the node's count.
    for node in [a, b] {
        for t in [
            SocketAddr::from((node.addr6(), 32080)),
            SocketAddr::from((node.addr(), 32080)),
        ] {
            let (status, resp) = http_get(client, t).unwrap();
            assert_eq!(status, 200, "{t}: {resp}");
            assert!(
                resp.ends_with(
                    r#"{"service":{"namespace":"lab","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
                ),
                "{t}: {resp}"
            );
        }
    }
}

#[test]
fn two_node_ipv6_node_port_and_external_ip_local() {
    if !lab::require() {
        return;
    }
    ipv6_front_ends_local("ebpf");
}

#[test]
fn two_node_ipv6_node_ports_in_the_userspace_proxy() {
    if !lab::require() {
        return;
    }
    ipv6_front_ends_local("userspace");
}

/// `externalTrafficPolicy: Cluster` (the default) to node A's node ports, from
/// a client outside the cluster (lb-ebpf/src/snat.rs):
/// - backends only on node B (TCP and UDP): node A SNATs to its own address,
///   so the pods see 192.168.50.1 and their replies come back through A, which
///   answers the client from the address it used;
/// - a backend on each node: both get new connections; A's own pod sees the
///   client's address (DNAT only), B's sees A's;
/// - `Local`: A's own pods only, the client's address kept.
///
/// ClusterIP traffic from a pod is never SNATed.
#[test]
fn two_node_node_port_cluster_snat() {
    if !lab::require() {
        return;
    }
    let lab = TwoNodeLab::new(2).expect("two-node lab");
    let srv = servers(&lab);
    let (a, b) = (lab.a(), lab.b());
    let client = lab.client();
    let cip = lab.client_ip();
    let np = |p: u16| format!("    node_port: {p}\n");
    let local = "    node_port: 30082\n    external_traffic_policy: local\n";
    let cfg = config_yaml(&[
        ext_svc(
            "lab/remote:http",
            Ipv4Addr::new(10, 96, 0, 30),
            80,
            "tcp",
            8080,
            &[(b, 1), (b, 2)],
            &np(30080),
        ),
        ext_svc(
            "lab/remote:dns",
            Ipv4Addr::new(10, 96, 0, 30),
            53,
            "udp",
            5353,
            &[(b, 1), (b, 2)],
            &np(30053),
        ),
        ext_svc(
            "lab/both:http",
            Ipv4Addr::new(10, 96, 0, 31),
            80,
            "tcp",
            8080,
            &[(a, 1), (b, 1)],
            &np(30081),
        ),
        ext_svc(
            "lab/local:http",
            Ipv4Addr::new(10, 96, 0, 32),
            80,
            "tcp",
            8080,
            &[(a, 2), (b, 2)],
            local,
        ),
    ]);
    let mut agents = Agents::start(&lab, [&cfg, &cfg], &[]);
    let from_client = |target: SocketAddrV4, r: &[Reply]| {
        for x in r {
            assert_eq!(x.peer, SocketAddr::from(target), "the reply from {target}");
            assert_eq!(x.local.ip(), cip);
        }
    };
    let only = |seen: Vec<SocketAddr>, ip: Ipv4Addr, what: &str| {
        assert!(
            !seen.is_empty() && seen.iter().all(|p| p.ip() == ip),
            "{what} saw {seen:?}, not only {ip}"
        );
    };

    // Backends only on B: SNATed, TCP and UDP.
    let t = SocketAddrV4::new(a.addr(), 30080);
    let r = tcp_from(client, t, 10);
    from_client(t, &r);
    let want = BTreeMap::from([("b1".to_string(), 5), ("b2".to_string(), 5)]);
    assert_eq!(counts(&r), want, "{}", agents.log(0));
    let t = SocketAddrV4::new(a.addr(), 30053);
    let r = udp_from(client, t, 10);
    from_client(t, &r);
    assert_eq!(counts(&r), want, "{}", agents.log(0));
    for pod in ["b1", "b2"] {
        only(srv.tcp[pod].peers(), a.addr(), pod);
        only(srv.udp[pod].peers(), a.addr(), pod);
    }

    // A backend on each node: both get traffic; only B's is SNATed.
    let t = SocketAddrV4::new(a.addr(), 30081);
    let r = tcp_from(client, t, 10);
    from_client(t, &r);
    let want = BTreeMap::from([("a1".to_string(), 5), ("b1".to_string(), 5)]);
    assert_eq!(counts(&r), want, "{}", agents.log(0));
    only(srv.tcp["a1"].peers(), cip, "a1");
    only(srv.tcp["b1"].peers(), a.addr(), "b1");
    assert_eq!(srv.tcp["b1"].peers().len(), 10, "5 + 5 connections");

    // Local: unchanged.
    let t = SocketAddrV4::new(a.addr(), 30082);
    let r = tcp_from(client, t, 6);
    from_client(t, &r);
    assert!(r.iter().all(|x| x.backend == "a2"), "{r:?}");
    only(srv.tcp["a2"].peers(), cip, "a2");

    // Counted on A: one SNAT per flow to B (10 TCP + 10 UDP + 5), none dropped.
    let m = agents.procs[0].scrape();
    let ev = |r: &str| m.sum("rpclb_datapath_events_total", &[("reason", r)]);
    assert_eq!(ev("ct_snat"), 25.0, "{}", m.0);
    assert_eq!(ev("drop_snat_exhausted"), 0.0);

    // ClusterIP from a pod on A to B's pods: the pod's own address.
    let before = srv.tcp["b2"].peers().len();
    let r = tcp_from(
        &a.pod(1).ns,
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 30), 80),
        4,
    );
    assert_eq!(counts(&r).values().sum::<usize>(), 4);
    let seen = srv.tcp["b2"].peers();
    only(
        seen[before..].to_vec(),
        a.pod(1).ip(),
        "b2 through the ClusterIP",
    );
    let m = agents.procs[0].scrape();
    assert_eq!(
        m.sum("rpclb_datapath_events_total", &[("reason", "ct_snat")]),
        25.0,
        "no SNAT for ClusterIP traffic"
    );
}

/// `externalTrafficPolicy: Cluster` over IPv6 (lb-ebpf/src/snat6.rs), from a
/// client outside the cluster, to node A's IPv6 node ports and an IPv6
/// external IP routed to A (`--snat-address6` left to its default: the
/// first usable global IPv6 address of A's node-network link):
/// - backends only on node B (TCP and UDP): A SNATs to its own IPv6
///   address, so the pods see fd00:50::<A> and their replies come back
///   through A, which answers the client from the address it used;
/// - a backend on each node: both get new connections; A's own pod sees
///   the client's address (DNAT only), B's sees A's.
fn ipv6_cluster_snat(extra: &[&str]) {
    let lab = TwoNodeLab::new(2).expect("two-node lab");
    lab.add_ipv6().expect("IPv6 in the lab");
    let srv = servers6(&lab);
    let (a, b) = (lab.a(), lab.b());
    let client = lab.client();
    let cip6 = std::net::IpAddr::from(lab.client_ip6());
    let a6 = std::net::IpAddr::from(a.addr6());
    let svc6 = |name: &str, vip: &str, port, proto, bport, pods: &[(&Node, usize)], ext: &str| {
        format!(
            "  - name: {name}\n    vip: '{vip}'\n    port: {port}\n    protocol: {proto}\n    \
             algorithm: round-robin\n{ext}{}",
            pods_yaml6(pods, bport)
        )
    };
    let remote = [(b, 1), (b, 2)];
    let cfg = config_yaml(&[
        svc6(
            "lab/remote:http@ipv6",
            "fd00:10:96::30",
            80,
            "tcp",
            8080,
            &remote,
            &format!("    node_port: 30080\n    external_ips: ['{EXT_IP6}']\n"),
        ),
        svc6(
            "lab/remote:dns@ipv6",
            "fd00:10:96::30",
            53,
            "udp",
            5353,
            &remote,
            "    node_port: 30053\n",
        ),
        svc6(
            "lab/both:http@ipv6",
            "fd00:10:96::31",
            80,
            "tcp",
            8080,
            &[(a, 1), (b, 1)],
            "    node_port: 30081\n",
        ),
    ]);
    let mut agents = Agents::start(&lab, [&cfg, &cfg], extra);
    let from_client = |target: SocketAddr, r: &[Reply]| {
        for x in r {
            assert_eq!(x.peer, target, "{extra:?}: the reply from {target}");
            assert_eq!(x.local.ip(), cip6);
        }
    };
    let only = |seen: Vec<SocketAddr>, ip: std::net::IpAddr, what: &str| {
        assert!(
            !seen.is_empty() && seen.iter().all(|p| p.ip() == ip),
            "{extra:?}: {what} saw {seen:?}, not only {ip}"
        );
    };

    // Backends only on B: SNATed, TCP and UDP, on the node port and the
    // external IP.
    let want = BTreeMap::from([("b1".to_string(), 5), ("b2".to_string(), 5)]);
    for t in [
        SocketAddr::from((a.addr6(), 30080)),
        SocketAddr::from((EXT_IP6, 80)),
    ] {
        let r = tcp_from(client, t, 10);
        from_client(t, &r);
        assert_eq!(counts(&r), want, "{extra:?}: TCP to {t}: {}", agents.log(0));
    }
    let t = SocketAddr::from((a.addr6(), 30053));
    let r = udp_from(client, t, 10);
    from_client(t, &r);
    assert_eq!(counts(&r), want, "{extra:?}: UDP to {t}: {}", agents.log(0));
    for pod in ["b1", "b2"] {
        only(srv.tcp[pod].peers(), a6, pod);
        only(srv.udp[pod].peers(), a6, pod);
    }

    // A backend on each node: both get traffic; only B's is SNATed.
    let before = srv.tcp["b1"].peers().len();
    let t = SocketAddr::from((a.addr6(), 30081));
    let r = tcp_from(client, t, 10);
    from_client(t, &r);
    let want = BTreeMap::from([("a1".to_string(), 5), ("b1".to_string(), 5)]);
    assert_eq!(counts(&r), want, "{extra:?}: {}", agents.log(0));
    only(srv.tcp["a1"].peers(), cip6, "a1");
    only(srv.tcp["b1"].peers()[before..].to_vec(), a6, "b1");

    // Counted on A: one SNAT per flow to B (20 TCP + 10 UDP + 5), none dropped.
    let m = agents.procs[0].scrape();
    let ev = |r: &str| m.sum("rpclb_datapath_events_total", &[("reason", r)]);
    assert_eq!(ev("ct_snat"), 35.0, "{extra:?}: {}", m.0);
    assert_eq!(ev("drop_snat_exhausted"), 0.0);
}

#[test]
fn two_node_ipv6_node_port_cluster_snat() {
    if !lab::require() {
        return;
    }
    ipv6_cluster_snat(&[]);
}

#[test]
fn two_node_ipv6_node_port_cluster_snat_tc() {
    if !lab::require() {
        return;
    }
    ipv6_cluster_snat(&["--mode", "tc"]);
}

/// Node ports of an L4 and a gRPC-mode service, served by the userspace proxy:
/// in userspace mode (no kernel programs) both, in eBPF mode the gRPC-mode one
/// (its L4 twin is the kernel's, tested above). A client outside the cluster
/// reaches node A's node ports; with `Cluster` and local backends, node A uses
/// its own. The gRPC calls of ONE connection spread over node A's pods. The
/// proxy opens its own connections, so in userspace mode the pods see the
/// node's address, not the client's.
#[test]
fn two_node_node_ports_in_the_userspace_proxy() {
    if !lab::require() {
        return;
    }
    use rpclb_tests::grpc::{GrpcServer, Journal, TestBackend, block_on_in, connect};
    for datapath in ["userspace", "ebpf"] {
        let lab = TwoNodeLab::new(2).expect("two-node lab");
        let srv = servers(&lab);
        let (a, b) = (lab.a(), lab.b());
        let client = lab.client();
        let journal = std::sync::Arc::new(Journal::default());
        let grpc_pods = [(a, 1), (a, 2), (b, 1)];
        let _grpc: Vec<GrpcServer> = grpc_pods
            .iter()
            .enumerate()
            .map(|(k, (n, i))| {
                let be = TestBackend::new(k + 1, ident(n, *i), journal.clone());
                let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 50051));
                GrpcServer::start(&n.pod(*i).ns, addr, be, std::time::Duration::from_secs(1))
                    .expect("gRPC pod")
            })
            .collect();
        let rpc = format!(
            "  - name: lab/rpc:grpc\n    vip: 10.96.0.21\n    port: 50051\n    protocol: tcp\n    \
             grpc: {{}}\n    node_port: 30051\n{}",
            pods_yaml(&grpc_pods, 50051)
        );
        let web = ext_svc(
            "lab/web:http",
            WEB,
            80,
            "tcp",
            8080,
            &[(a, 1), (a, 2), (b, 1)],
            "    node_port: 30080\n",
        );
        let cfg = config_yaml(&[web, rpc]);
        let agents = Agents::start(
            &lab,
            [&cfg, &cfg],
            // Each node's own addresses (the default): in userspace mode a node
            // address of the other node would become local here and answer ARP.
            &["--datapath", datapath],
        );

        if datapath == "userspace" {
            let t = SocketAddrV4::new(a.addr(), 30080);
            let r = tcp_from(client, t, 6);
            assert_eq!(
                counts(&r),
                BTreeMap::from([("a1".to_string(), 3), ("a2".to_string(), 3)]),
                "{}",
                agents.log(0)
            );
            assert!(r.iter().all(|x| x.peer == SocketAddr::from(t)), "{r:?}");
            for i in [1, 2] {
                let node_side = a.pod(i).node_iface.ip;
                let peers = srv.tcp[&ident(a, i)].peers();
                assert!(
                    !peers.is_empty() && peers.iter().all(|p| p.ip() == node_side),
                    "{datapath}: a{i} saw {peers:?}, not the node's {node_side}"
                );
            }
        }

        let served = block_on_in(client, || async {
            let c = connect(a.addr(), 30051).await;
            let mut out = Vec::new();
            for k in 0..20 {
                let mut c = c.clone();
                let r = c
                    .unary_call(rpclb_tests::grpc::proto::SimpleRequest::default())
                    .await
                    .unwrap_or_else(|e| panic!("{datapath}: call {k}: {e}"));
                out.push(r.into_inner().served_by);
            }
            out
        });
        let mut per = BTreeMap::new();
        for s in &served {
            *per.entry(s.clone()).or_insert(0usize) += 1;
        }
        assert!(
            per.get("a1").is_some_and(|n| *n > 0)
                && per.get("a2").is_some_and(|n| *n > 0)
                && per.len() == 2,
            "{datapath}: one connection's calls over node A's pods only: {per:?}\n{}",
            agents.log(0)
        );
        assert_eq!(journal.served(3), 0, "{datapath}: b1 got calls");
    }
}

// ---- Kubernetes objects through the controller's translation ----

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service as KubeService, ServicePort,
    ServiceSpec, ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_api::{BackendState, DesiredState};

/// A node's desired state as a config file (what the agent would get from the
/// controller's stream; the fields these tests use).
fn state_yaml(st: &DesiredState) -> String {
    let mut s = String::from(
        "# the controller's translation, written by tests/tests/two_node.rs\nservices:\n",
    );
    for v in &st.services {
        assert!(v.grpc.is_none() && v.health_check.is_none(), "{}", v.name);
        s.push_str(&format!(
            "  - name: {:?}\n    vip: {}\n    port: {}\n    protocol: {}\n    algorithm: {}\n",
            v.name,
            v.vip,
            v.port,
            v.protocol.as_str(),
            v.algorithm.as_str()
        ));
        if let Some(t) = v.affinity_timeout {
            s.push_str(&format!("    affinity_timeout: {}\n", t.as_secs()));
        }
        if let Some(m) = v.maglev_table_size {
            s.push_str(&format!("    maglev_table_size: {m}\n"));
        }
        let e = &v.external;
        if let Some(p) = e.node_port {
            s.push_str(&format!("    node_port: {p}\n"));
        }
        if !e.ips.is_empty() {
            let ips: Vec<String> = e.ips.iter().map(ToString::to_string).collect();
            s.push_str(&format!("    external_ips: [{}]\n", ips.join(", ")));
        }
        s.push_str(&format!(
            "    external_traffic_policy: {}\n",
            e.traffic_policy.as_str()
        ));
        if let Some(p) = e.health_check_node_port {
            s.push_str(&format!("    health_check_node_port: {p}\n"));
        }
        s.push_str("    backends:\n");
        if v.backends.is_empty() {
            s.truncate(s.len() - 1);
            s.push_str(" []\n");
        }
        for b in &v.backends {
            s.push_str(&format!(
                "      - {{ ip: {}, port: {}, weight: {}, state: {}",
                b.ip,
                b.port,
                b.weight,
                b.state.as_str()
            ));
            if let Some(n) = &b.node {
                s.push_str(&format!(", node: {n}"));
            }
            s.push_str(" }\n");
        }
    }
    s
}

/// Each node's config from the controller's translation of `services` and `slices`.
fn translated(lab: &TwoNodeLab, services: &[KubeService], slices: &[EndpointSlice]) -> [String; 2] {
    lab.nodes().map(|n| {
        let t = lb_controller::node_state(services, slices, &n.name);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        state_yaml(&t.state)
    })
}

fn kube_service(name: &str, vip: Ipv4Addr, f: impl FnOnce(&mut ServiceSpec)) -> KubeService {
    let mut spec = ServiceSpec {
        type_: Some("ClusterIP".into()),
        cluster_ip: Some(vip.to_string()),
        cluster_ips: Some(vec![vip.to_string()]),
        ports: Some(vec![ServicePort {
            name: Some("http".into()),
            port: 80,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        ..Default::default()
    };
    f(&mut spec);
    KubeService {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("lab".into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// An EndpointSlice of `service` with pods `(node, i, state)` on port `http` 8080.
fn kube_slice(service: &str, pods: &[(&Node, usize, BackendState)]) -> EndpointSlice {
    EndpointSlice {
        address_type: "IPv4".into(),
        metadata: ObjectMeta {
            name: Some(format!("{service}-x")),
            namespace: Some("lab".into()),
            labels: Some(
                [(
                    "kubernetes.io/service-name".to_string(),
                    service.to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: Some(
            pods.iter()
                .map(|(n, i, st)| {
                    let terminating = *st == BackendState::Terminating;
                    Endpoint {
                        addresses: vec![n.pod(*i).ip().to_string()],
                        node_name: Some(n.name.clone()),
                        conditions: Some(EndpointConditions {
                            ready: Some(!terminating),
                            serving: Some(true),
                            terminating: Some(terminating),
                        }),
                        ..Default::default()
                    }
                })
                .collect(),
        ),
    }
}

const ITP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 20);

/// From Kubernetes objects through the controller's translation to each
/// node's agent: `internalTrafficPolicy: Local` keeps a pod's ClusterIP
/// connections on its own node; a LoadBalancer Service with
/// `externalTrafficPolicy: Local` is balanced on its ingress IP and node port
/// to the receiving node's pods, which see the client's address; its
/// `healthCheckNodePort` says 200 on both nodes.
#[test]
fn two_node_translated_internal_local_and_load_balancer() {
    if !lab::require() {
        return;
    }
    let lab = TwoNodeLab::new(2).expect("two-node lab");
    let srv = servers(&lab);
    let (a, b) = (lab.a(), lab.b());
    let mut svc = kube_service("web", ITP_VIP, |s| {
        s.type_ = Some("LoadBalancer".into());
        s.internal_traffic_policy = Some("Local".into());
        s.external_traffic_policy = Some("Local".into());
        s.health_check_node_port = Some(32080);
        s.ports.as_mut().unwrap()[0].node_port = Some(30080);
    });
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                ip: Some(LB_IP.to_string()),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    });
    let slice = kube_slice(
        "web",
        &[(a, 1, BackendState::Active), (b, 1, BackendState::Active)],
    );
    let [ca, cb] = translated(&lab, &[svc], &[slice]);
    let agents = Agents::start(&lab, [&ca, &cb], &[]);

    // internalTrafficPolicy: Local: each node's pod 2 reaches its own pod 1.
    for (node, want) in [(a, "a1"), (b, "b1")] {
        let r = tcp_from(&node.pod(2).ns, SocketAddrV4::new(ITP_VIP, 80), 6);
        assert!(
            r.iter().all(|x| x.backend == want),
            "{r:?}\n{}",
            agents.log(0)
        );
        assert!(
            srv.tcp[want]
                .peers()
                .iter()
                .all(|p| p.ip() == node.pod(2).ip())
        );
    }
    // The ingress IP (routed to node A) and B's node port.
    let client = lab.client();
    for (t, want) in [
        (SocketAddrV4::new(LB_IP, 80), "a1"),
        (SocketAddrV4::new(b.addr(), 30080), "b1"),
    ] {
        let r = tcp_from(client, t, 4);
        assert!(
            r.iter()
                .all(|x| x.backend == want && x.peer == SocketAddr::from(t)),
            "{r:?}"
        );
        assert!(
            srv.tcp[want]
                .peers()
                .iter()
                .any(|p| p.ip() == lab.client_ip())
        );
    }
    for node in [a, b] {
        let (status, resp) = http_get(client, SocketAddrV4::new(node.addr(), 32080)).unwrap();
        assert_eq!(status, 200, "{resp}");
        assert!(resp.contains(r#""localEndpoints":1"#), "{resp}");
    }
}

const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);

/// `sessionAffinity: ClientIP` (timeout 2 s; round-robin by annotation, so
/// that a new pick is visible) on a ClusterIP and a node port, through the
/// controller's translation: a client keeps its backend across connections
/// while it keeps connecting (the timeout runs from its last connection), and
/// gets the next one after the timeout passes; once its backend is
/// terminating it gets another at once, within the timeout (the defect users
/// report in cilium/cilium#27096).
#[test]
fn two_node_session_affinity_client_ip_on_a_vip_and_a_node_port() {
    if !lab::require() {
        return;
    }
    let lab = TwoNodeLab::new(2).expect("two-node lab");
    let _srv = servers(&lab);
    let (a, b) = (lab.a(), lab.b());
    let svc = |term: Option<usize>| {
        let mut s = kube_service("sticky", STICKY_VIP, |s| {
            s.type_ = Some("NodePort".into());
            s.session_affinity = Some("ClientIP".into());
            s.session_affinity_config = Some(SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(2),
                }),
            });
            s.ports.as_mut().unwrap()[0].node_port = Some(30081);
        });
        s.metadata.annotations =
            Some([("rpclb.io/algorithm".to_string(), "round-robin".to_string())].into());
        let st = |i| {
            if term == Some(i) {
                BackendState::Terminating
            } else {
                BackendState::Active
            }
        };
        let slice = kube_slice("sticky", &[(a, 1, st(1)), (a, 2, st(2))]);
        translated(&lab, &[s], &[slice])
    };
    let [ca, cb] = svc(None);
    let agents = Agents::start(&lab, [&ca, &cb], &[]);
    let client = lab.client();
    let one = |ns: &lab::Netns, t: SocketAddrV4| tcp_from(ns, t, 1).remove(0).backend;

    for (ns, t) in [
        (&b.pod(1).ns, SocketAddrV4::new(STICKY_VIP, 80)),
        (client, SocketAddrV4::new(a.addr(), 30081)),
    ] {
        // Sticky across connections 0.5 s apart for 3 s (past the 2 s timeout
        // counted from the first): the timeout runs from the last connection.
        let first = one(ns, t);
        for _ in 0..6 {
            std::thread::sleep(std::time::Duration::from_millis(500));
            assert_eq!(one(ns, t), first, "to {t}\n{}", agents.log(0));
        }
        // After 2.5 s of silence: a new pick, the other pod (round-robin).
        std::thread::sleep(std::time::Duration::from_millis(2500));
        let second = one(ns, t);
        assert_ne!(second, first, "to {t}: affinity expired");
        assert_eq!(one(ns, t), second);
    }

    // The pod a client is pinned to starts terminating: its next connection,
    // within the timeout, goes to the other pod.
    let t = SocketAddrV4::new(STICKY_VIP, 80);
    let ns = &b.pod(1).ns;
    let pinned = one(ns, t);
    let idx: usize = pinned[1..].parse().unwrap();
    let [ca, cb] = svc(Some(idx));
    agents.dirs[0].write_config(&ca);
    agents.dirs[1].write_config(&cb);
    // Keep the affinity fresh (a connection every 0.5 s) until B's agent
    // takes the change (config poll 1 s; at most 15 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let moved = loop {
        let got = one(ns, t);
        if got != pinned || std::time::Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_ne!(
        moved,
        pinned,
        "a terminating backend gets no new affinity\n{}",
        agents.log(1)
    );
    for _ in 0..3 {
        assert_eq!(one(ns, t), moved, "and the new pick sticks");
    }
}

/// The service loopback address hairpin flows are SNATed to
/// (`lb_common::SERVICE_LOOPBACK_V4`).
const LOOPBACK: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
const SELF: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);

/// Hairpin: pod a1 reaches itself through a ClusterIP whose only backend is
/// a1, over TCP and UDP, and gets the answer from the VIP; a1's servers see
/// the service loopback address at a port of `--snat-ports`. Pod a2 through
/// the same VIP is DNATed only (a1 sees a2's address). Node A counts one
/// `ct_hairpin` per hairpin flow and drops nothing. `xdp`: native XDP, with
/// a1's veth named a redirect target; else TC.
fn hairpin(xdp: bool) {
    let lab = TwoNodeLab::new(2).expect("two-node lab");
    let srv = servers(&lab);
    let a = lab.a();
    let (a1, a2) = (a.pod(1), a.pod(2));
    // Pods have a default route in Kubernetes (the CNI's), which covers the
    // loopback address; this lab's have none, so a1 gets that one route.
    let gw = a1.node_iface.ip.to_string();
    a1.ns
        .ip(&["route", "add", &format!("{LOOPBACK}/32"), "via", &gw])
        .expect("route to the service loopback");
    let cfg = config_yaml(&[
        svc_yaml("lab/self:http", SELF, 80, "tcp", "random", &[a1.ip()], 8080),
        svc_yaml("lab/self:dns", SELF, 53, "udp", "random", &[a1.ip()], 5353),
    ]);
    let a1_veth = a1.node_iface.name.clone();
    let extra: Vec<&str> = if xdp {
        vec!["--mode", "xdp", "--xdp-redirect-to", &a1_veth]
    } else {
        vec!["--mode", "tc"]
    };
    let mut agents = Agents::start(&lab, [&cfg, &cfg], &extra);
    let looped = |seen: Vec<SocketAddr>, what: &str| {
        assert!(
            !seen.is_empty() && seen.iter().all(|p| p.ip() == LOOPBACK && p.port() >= 62000),
            "{what} saw {seen:?}, not only {LOOPBACK} at a port of 62000-65535"
        );
    };

    let t = SocketAddrV4::new(SELF, 80);
    let r = tcp_from(&a1.ns, t, 5);
    for x in &r {
        assert_eq!(x.backend, "a1", "{}", agents.log(0));
        assert_eq!(x.peer, SocketAddr::from(t), "the reply from the VIP");
        assert_eq!(x.local.ip(), a1.ip());
    }
    looped(srv.tcp["a1"].peers(), "a1 (TCP)");
    assert_eq!(srv.tcp["a1"].peers().len(), 5);

    let t = SocketAddrV4::new(SELF, 53);
    let r = udp_from(&a1.ns, t, 5);
    for x in &r {
        assert_eq!(x.backend, "a1", "{}", agents.log(0));
        assert_eq!(x.peer, SocketAddr::from(t), "the reply from the VIP");
    }
    looped(srv.udp["a1"].peers(), "a1 (UDP)");

    // Another pod: DNAT only.
    let r = tcp_from(&a2.ns, SocketAddrV4::new(SELF, 80), 3);
    assert!(r.iter().all(|x| x.backend == "a1"), "{r:?}");
    let seen = srv.tcp["a1"].peers();
    assert!(
        seen[5..].iter().all(|p| p.ip() == a2.ip()),
        "a1 saw a2's own address: {seen:?}"
    );

    let m = agents.procs[0].scrape();
    let ev = |r: &str| m.sum("rpclb_datapath_events_total", &[("reason", r)]);
    assert_eq!(ev("ct_hairpin"), 10.0, "5 TCP + 5 UDP flows: {}", m.0);
    assert_eq!(ev("ct_snat"), 0.0);
    assert_eq!(ev("drop_snat_unrouted"), 0.0);
    assert_eq!(ev("drop_snat_exhausted"), 0.0);
}

/// [`hairpin`] with the programs on TC: the pod's packets are redirected
/// back into its own veth (`bpf_redirect` to the ingress interface).
#[test]
fn two_node_hairpin_tc() {
    if !lab::require() {
        return;
    }
    hairpin(false);
}

/// [`hairpin`] with native XDP: the pod's veth takes XDP frames (its pod
/// end has GRO on, and the agent is told so with `--xdp-redirect-to`), so
/// the rewritten packets are redirected back into it. Without that, XDP
/// drops them (`drop_snat_unrouted`, docs/kubernetes.md).
#[test]
fn two_node_hairpin_xdp() {
    if !lab::require() {
        return;
    }
    hairpin(true);
}

/// `lb_common::SERVICE_LOOPBACK_V6`.
const LOOPBACK6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0xa9fe, 0x2a01);

/// [`hairpin`] over IPv6, with the programs on TC: pod a1 connects to its
/// own IPv6 ClusterIP (TCP and UDP) whose only backend is itself; it sees
/// itself connect from the IPv6 service loopback 100::a9fe:2a01 at a port
/// of the SNAT range, and its replies come back from the ClusterIP. Another
/// pod is DNATed only.
#[test]
fn two_node_ipv6_hairpin_tc() {
    if !lab::require() {
        return;
    }
    let lab = TwoNodeLab::new(2).expect("two-node lab");
    lab.add_ipv6().expect("IPv6 in the lab");
    let srv = servers6(&lab);
    let a = lab.a();
    let (a1, a2) = (a.pod(1), a.pod(2));
    // A pod's default route (the CNI's) covers the loopback; this lab's
    // pods have none, so a1 gets that one route.
    a1.ns
        .ip(&[
            "-6",
            "route",
            "add",
            &format!("{LOOPBACK6}/128"),
            "via",
            &a1.node_ip6().to_string(),
        ])
        .expect("route to the IPv6 service loopback");
    let self6 = "fd00:10:96::15";
    let svc6 = |name: &str, port, proto, bport| {
        format!(
            "  - name: {name}\n    vip: '{self6}'\n    port: {port}\n    protocol: {proto}\n    \
             algorithm: random\n    backends:\n      - {{ ip: '{}', port: {bport} }}\n",
            a1.ip6()
        )
    };
    let cfg = config_yaml(&[
        svc6("lab/self:http@ipv6", 80, "tcp", 8080),
        svc6("lab/self:dns@ipv6", 53, "udp", 5353),
    ]);
    let mut agents = Agents::start(&lab, [&cfg, &cfg], &["--mode", "tc"]);
    let looped = |seen: Vec<SocketAddr>, what: &str| {
        assert!(
            !seen.is_empty()
                && seen
                    .iter()
                    .all(|p| p.ip() == std::net::IpAddr::from(LOOPBACK6) && p.port() >= 62000),
            "{what} saw {seen:?}, not only {LOOPBACK6} at a port of 62000-65535"
        );
    };
    let vip: std::net::Ipv6Addr = self6.parse().unwrap();
    let t = SocketAddr::from((vip, 80));
    let r = tcp_from(&a1.ns, t, 5);
    for x in &r {
        assert_eq!(x.backend, "a1", "{}", agents.log(0));
        assert_eq!(x.peer, t, "the reply from the VIP");
        assert_eq!(x.local.ip(), std::net::IpAddr::from(a1.ip6()));
    }
    looped(srv.tcp["a1"].peers(), "a1 (TCP)");
    assert_eq!(srv.tcp["a1"].peers().len(), 5);

    let t = SocketAddr::from((vip, 53));
    let r = udp_from(&a1.ns, t, 5);
    for x in &r {
        assert_eq!(x.backend, "a1", "{}", agents.log(0));
        assert_eq!(x.peer, t, "the reply from the VIP");
    }
    looped(srv.udp["a1"].peers(), "a1 (UDP)");

    // Another pod: DNAT only.
    let r = tcp_from(&a2.ns, SocketAddr::from((vip, 80)), 3);
    assert!(r.iter().all(|x| x.backend == "a1"), "{r:?}");
    let seen = srv.tcp["a1"].peers();
    assert!(
        seen[5..]
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::from(a2.ip6())),
        "a1 saw a2's own address: {seen:?}"
    );

    let m = agents.procs[0].scrape();
    let ev = |r: &str| m.sum("rpclb_datapath_events_total", &[("reason", r)]);
    assert_eq!(ev("ct_hairpin"), 10.0, "5 TCP + 5 UDP flows: {}", m.0);
    assert_eq!(ev("ct_snat"), 0.0);
    assert_eq!(ev("drop_snat_unrouted"), 0.0);
    assert_eq!(ev("drop_snat_exhausted"), 0.0);
}
