//! Lab tests of IPv6: real IPv6 traffic from the lab's client to IPv6 VIPs
//! served by the userspace proxy (L4 TCP and UDP, and the gRPC mode) and by
//! the kernel programs (the agent in eBPF mode), and a dual-stack Kubernetes
//! Service translated by the controller and served on both of its ClusterIPs.
//!
//! The lab's namespaces get ULA addresses beside their IPv4 ones
//! (`Lab::add_ipv6`, tests/src/lab/ipv6.rs); VIPs are in `fd00:10:96::/112`.
//! Nothing is added outside the lab's namespaces. Need
//! root; without it each test prints SKIP and passes (fails under CI).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service as KubeService, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_agent::userspace::UserspaceProxy;
use lb_api::{Algorithm, Backend, DesiredState, GrpcPolicy, Protocol, Service};
use rpclb_tests::grpc::proto::SimpleRequest;
use rpclb_tests::grpc::proto::test_service_client::TestServiceClient;
use rpclb_tests::grpc::{GrpcServer, Journal, TestBackend};
use rpclb_tests::lab::ipv6::pod_ip6;
use rpclb_tests::lab::{Lab, Netns};
use rpclb_tests::skip_unless_lab;

const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0xa);
const UDP_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x35);
const GRPC_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x14);
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x62);
const BACKEND_PORT: u16 = 8080;
const OP: Duration = Duration::from_secs(2);

/// Test servers in each backend namespace on `[::]:port`: TCP answers one
/// line `backend-<i> <client ip>` and closes; UDP answers each datagram the
/// same way. Stopped and joined on drop; every loop is bounded by a stop flag
/// polled every 5 ms.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(lab: &Lab, port: u16) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (i, h) in lab.backends().iter().enumerate() {
            let id = format!("backend-{}", i + 1);
            let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            let (tcp, udp) =
                h.ns.run(move || (TcpListener::bind(any), UdpSocket::bind(any)))
                    .expect("backend namespace");
            let (tcp, udp) = (tcp.expect("bind tcp"), udp.expect("bind udp"));
            tcp.set_nonblocking(true).unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(5)))
                .unwrap();
            let (s, name) = (stop.clone(), id.clone());
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut c, peer)) => {
                            let line = format!("{name} {}\n", peer.ip());
                            let _ = std::io::Write::write_all(&mut c, line.as_bytes());
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(format!("{id} {}", peer.ip()).as_bytes(), peer);
                    }
                }
            }));
        }
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `n` TCP connections from the client to `target`, each read to its line.
fn tcp_lines(client: &Netns, target: SocketAddr, n: usize) -> Vec<String> {
    client
        .run(move || {
            (0..n)
                .map(|k| {
                    let s = TcpStream::connect_timeout(&target, OP)
                        .unwrap_or_else(|e| panic!("connect {target} (#{k}): {e}"));
                    s.set_read_timeout(Some(OP)).unwrap();
                    let mut line = String::new();
                    BufReader::new(s)
                        .read_line(&mut line)
                        .unwrap_or_else(|e| panic!("read from {target}: {e}"));
                    line.trim_end().to_string()
                })
                .collect()
        })
        .expect("client namespace")
}

/// `n` datagrams from the client to `target`, each from a new socket (a new
/// session), each answered.
fn udp_lines(client: &Netns, target: SocketAddr, n: usize) -> Vec<String> {
    client
        .run(move || {
            (0..n)
                .map(|k| {
                    let s = UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))).unwrap();
                    s.set_read_timeout(Some(OP)).unwrap();
                    s.send_to(format!("ping {k}").as_bytes(), target).unwrap();
                    let mut buf = [0u8; 512];
                    let (len, from) = s
                        .recv_from(&mut buf)
                        .unwrap_or_else(|e| panic!("no answer from {target}: {e}"));
                    assert_eq!(from, target, "the answer comes from the VIP");
                    String::from_utf8_lossy(&buf[..len]).into_owned()
                })
                .collect()
        })
        .expect("client namespace")
}

fn counts(lines: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in lines {
        *m.entry(l.clone()).or_default() += 1;
    }
    m
}

fn proxy(lab: &Lab) -> UserspaceProxy {
    rpclb_tests::grpc::start_proxy(lab, |_| {})
}

fn local_routes6(lab: &Lab) -> String {
    lab.node()
        .ip(&["-6", "route", "show", "table", "local"])
        .expect("ip route")
}

fn has_route6(lab: &Lab, vip: Ipv6Addr) -> bool {
    local_routes6(lab)
        .lines()
        .any(|l| l.starts_with(&format!("local {vip} dev lo proto 114 ")))
}

fn v6_backends(lab: &Lab, port: u16) -> Vec<Backend> {
    lab.backends()
        .iter()
        .map(|h| Backend::new(h.ip6(), port))
        .collect()
}

/// An IPv6 VIP in the userspace L4 proxy: TCP and UDP from the client reach
/// both IPv6 backends in round-robin order, from the node's IPv6 address on
/// each backend's link; the VIPs' local routes come and go with the services.
#[test]
fn ipv6_vip_in_the_userspace_proxy() {
    skip_unless_lab!();
    let lab = Lab::new(2).expect("lab");
    lab.add_ipv6().expect("lab IPv6");
    let _servers = Servers::start(&lab, BACKEND_PORT);
    let p = proxy(&lab);
    let tcp = Service::new(
        "lab/web6:http",
        VIP6,
        80,
        Protocol::Tcp,
        Algorithm::RoundRobin,
        v6_backends(&lab, BACKEND_PORT),
    );
    let udp = Service::new(
        "lab/dns6:dns",
        UDP_VIP6,
        53,
        Protocol::Udp,
        Algorithm::RoundRobin,
        v6_backends(&lab, BACKEND_PORT),
    );
    let sum = p
        .apply(&DesiredState {
            services: vec![tcp.clone(), udp.clone()],
        })
        .expect("apply");
    assert_eq!(sum.added, 2);
    assert!(has_route6(&lab, VIP6), "{}", local_routes6(&lab));
    assert!(has_route6(&lab, UDP_VIP6), "{}", local_routes6(&lab));

    let (b1, b2) = (lab.backend(1), lab.backend(2));
    let want = |n: usize| {
        BTreeMap::from([
            (format!("backend-1 {}", b1.node_ip6()), n),
            (format!("backend-2 {}", b2.node_ip6()), n),
        ])
    };
    let lines = tcp_lines(&lab.client().ns, SocketAddr::from((VIP6, 80)), 8);
    assert_eq!(counts(&lines), want(4), "TCP: {lines:?}");
    // Round-robin alternates.
    assert_ne!(lines[0], lines[1]);
    let lines = udp_lines(&lab.client().ns, SocketAddr::from((UDP_VIP6, 53)), 4);
    assert_eq!(counts(&lines), want(2), "UDP: {lines:?}");

    let stats = p.stats();
    let tcp_stats = stats
        .iter()
        .find(|s| s.addr == tcp.addr())
        .expect("tcp stats");
    assert_eq!(tcp_stats.new_connections, 8);
    assert_eq!(tcp.addr().to_string(), "[fd00:10:96::a]:80/tcp");

    // Gone with the services.
    p.apply(&DesiredState::default()).expect("apply empty");
    assert!(!has_route6(&lab, VIP6), "{}", local_routes6(&lab));
    assert!(!has_route6(&lab, UDP_VIP6), "{}", local_routes6(&lab));
    p.shutdown().expect("shutdown");
}

/// An IPv6 VIP in the gRPC mode: the calls of one HTTP/2 connection to
/// `[fd00:10:96::14]:50051` spread over both IPv6 backends.
#[test]
fn ipv6_vip_in_the_grpc_mode() {
    skip_unless_lab!();
    const PORT: u16 = 50051;
    const CALLS: usize = 40;
    let lab = Lab::new(2).expect("lab");
    lab.add_ipv6().expect("lab IPv6");
    let journal = Arc::new(Journal::default());
    let _servers: Vec<GrpcServer> = (1..=2)
        .map(|i| {
            let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT));
            let b = TestBackend::new(i, format!("backend-{i}"), journal.clone());
            GrpcServer::start(&lab.backend(i).ns, any, b, Duration::from_secs(1))
                .expect("gRPC backend")
        })
        .collect();
    let p = proxy(&lab);
    let mut svc = Service::new(
        "lab/grpc6:grpc",
        GRPC_VIP6,
        PORT,
        Protocol::Tcp,
        Algorithm::Random,
        v6_backends(&lab, PORT),
    );
    svc.grpc = Some(GrpcPolicy::default());
    p.apply(&DesiredState {
        services: vec![svc.clone()],
    })
    .expect("apply");
    assert_eq!(p.routes(), vec![IpAddr::from(GRPC_VIP6)]);

    let served = rpclb_tests::grpc::block_on_in(&lab.client().ns, || async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://[{GRPC_VIP6}]:{PORT}"))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the IPv6 VIP");
        let mut c = TestServiceClient::new(ch);
        let mut served = Vec::new();
        for k in 0..CALLS {
            let call = c.unary_call(SimpleRequest::default());
            let r = tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .unwrap_or_else(|_| panic!("call {k}: no answer in time"))
                .unwrap_or_else(|e| panic!("call {k}: {e}"));
            served.push(r.into_inner().served_by);
        }
        served
    });
    let by = counts(&served);
    assert_eq!(by.values().sum::<usize>(), CALLS);
    assert_eq!(
        by.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-2"],
        "both IPv6 backends answer: {by:?}"
    );
    let stats = p.stats();
    let s = stats.iter().find(|s| s.addr == svc.addr()).expect("stats");
    assert_eq!(s.requests, CALLS as u64);
    // Each backend's address is its IPv6 one.
    for h in lab.backends() {
        assert!(s.backend(h.ip6(), PORT).is_some(), "{:?}", s.backends);
    }
    p.shutdown().expect("shutdown");
}

fn slice(name: &str, family: &str, port: u16, ips: Vec<String>) -> EndpointSlice {
    EndpointSlice {
        address_type: family.into(),
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("lab".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                "dual".to_string(),
            )])),
            ..Default::default()
        },
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(i32::from(port)),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: Some(
            ips.into_iter()
                .map(|ip| Endpoint {
                    addresses: vec![ip],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// A dual-stack Kubernetes Service (IPv4 and IPv6 ClusterIPs, one
/// EndpointSlice per family) through the controller's translation: two
/// services, each served on its ClusterIP with its family's backends.
#[test]
fn dual_stack_service_through_the_translation() {
    skip_unless_lab!();
    let lab = Lab::new(2).expect("lab");
    lab.add_ipv6().expect("lab IPv6");
    let _servers = Servers::start(&lab, BACKEND_PORT);
    let v4_vip = std::net::Ipv4Addr::new(10, 96, 0, 60);
    let kube = KubeService {
        metadata: ObjectMeta {
            name: Some("dual".into()),
            namespace: Some("lab".into()),
            annotations: Some(BTreeMap::from([(
                "rpclb.io/algorithm".to_string(),
                "round-robin".to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(v4_vip.to_string()),
            cluster_ips: Some(vec![v4_vip.to_string(), VIP6.to_string()]),
            ip_families: Some(vec!["IPv4".into(), "IPv6".into()]),
            ip_family_policy: Some("PreferDualStack".into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    };
    let slices = [
        slice(
            "dual-v4",
            "IPv4",
            BACKEND_PORT,
            lab.backends().iter().map(|h| h.ip().to_string()).collect(),
        ),
        slice(
            "dual-v6",
            "IPv6",
            BACKEND_PORT,
            lab.backends().iter().map(|h| h.ip6().to_string()).collect(),
        ),
    ];
    let t = lb_controller::translate::node_state(&[kube], &slices, "node-a");
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    let names: Vec<(&str, IpAddr)> = t
        .state
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.vip))
        .collect();
    assert_eq!(
        names,
        [
            ("lab/dual:http", IpAddr::from(v4_vip)),
            ("lab/dual:http@ipv6", IpAddr::from(VIP6)),
        ]
    );

    let p = proxy(&lab);
    p.apply(&t.state).expect("apply");
    let (b1, b2) = (lab.backend(1), lab.backend(2));
    // IPv4 ClusterIP: the IPv4 backends, reached from the node's IPv4 address.
    let lines = tcp_lines(&lab.client().ns, SocketAddr::from((v4_vip, 80)), 4);
    assert_eq!(
        counts(&lines),
        BTreeMap::from([
            (format!("backend-1 ::ffff:{}", b1.node_iface.ip), 2),
            (format!("backend-2 ::ffff:{}", b2.node_iface.ip), 2),
        ]),
        "IPv4: {lines:?}"
    );
    // IPv6 ClusterIP: the IPv6 backends.
    let lines = tcp_lines(&lab.client().ns, SocketAddr::from((VIP6, 80)), 4);
    assert_eq!(
        counts(&lines),
        BTreeMap::from([
            (format!("backend-1 {}", b1.node_ip6()), 2),
            (format!("backend-2 {}", b2.node_ip6()), 2),
        ]),
        "IPv6: {lines:?}"
    );
    let stats = p.stats();
    for addr in t.state.services.iter().map(Service::addr) {
        let s = stats.iter().find(|s| s.addr == addr).expect("stats");
        assert_eq!(s.new_connections, 4, "{addr}");
    }
    p.shutdown().expect("shutdown");
}

/// The real agent in eBPF mode with an IPv4 and an IPv6 service in its
/// config: both go into the kernel's maps, and both families' backends see
/// the client's own address (DNAT in the kernel; the userspace proxy would
/// show the node's). The IPv6 flows are in the kernel's `CONNTRACK6`;
/// /metrics counts both services from the kernel's counters.
#[test]
fn ebpf_mode_serves_ipv6_services_in_the_kernel() {
    use rpclb_tests::procs::{Proc, TestDir, agent_args, pin_path};
    skip_unless_lab!();
    let lab = Lab::new(2).expect("lab");
    lab.add_ipv6().expect("lab IPv6");
    let _servers = Servers::start(&lab, BACKEND_PORT);
    let v4_vip = std::net::Ipv4Addr::new(10, 96, 0, 61);
    let entry = |name: &str, vip: String, ips: Vec<String>| {
        let mut s = format!(
            "  - name: {name}\n    vip: \"{vip}\"\n    port: 80\n    algorithm: round-robin\n    backends:\n"
        );
        for ip in ips {
            s.push_str(&format!(
                "      - {{ ip: \"{ip}\", port: {BACKEND_PORT} }}\n"
            ));
        }
        s
    };
    let dir = TestDir::new("ipv6-hybrid");
    // Two IPv6 services without backends (TCP and UDP on one VIP).
    let none = format!(
        "  - name: lab/none:http@ipv6\n    vip: \"{EMPTY6}\"\n    port: 80\n    backends: []\n  \
         - name: lab/none:dns@ipv6\n    vip: \"{EMPTY6}\"\n    port: 53\n    protocol: udp\n    \
         backends: []\n"
    );
    dir.write_config(&format!(
        "services:\n{none}{}{}",
        entry(
            "lab/web:http",
            v4_vip.to_string(),
            lab.backends().iter().map(|h| h.ip().to_string()).collect()
        ),
        entry(
            "lab/web:http@ipv6",
            VIP6.to_string(),
            lab.backends().iter().map(|h| h.ip6().to_string()).collect()
        ),
    ));
    let mut agent = Proc::start(&lab, &dir, "agent", &agent_args(&lab, &dir, &[]));
    agent.wait_ready();
    let (code, body) = agent.get("/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ready\ndatapath ebpf\n"), "{body}");

    let client = lab.client();
    let (b1, b2) = (lab.backend(1), lab.backend(2));
    // IPv4 through the kernel: the backends see the client itself.
    let lines = tcp_lines(&client.ns, SocketAddr::from((v4_vip, 80)), 4);
    assert_eq!(
        counts(&lines),
        BTreeMap::from([
            (format!("backend-1 ::ffff:{}", client.ip()), 2),
            (format!("backend-2 ::ffff:{}", client.ip()), 2),
        ]),
        "IPv4 (kernel): {lines:?}"
    );
    // IPv6 through the kernel too: the backends see the client itself.
    let lines = tcp_lines(&client.ns, SocketAddr::from((VIP6, 80)), 4);
    assert_eq!(
        counts(&lines),
        BTreeMap::from([
            (format!("backend-1 {}", client.ip6()), 2),
            (format!("backend-2 {}", client.ip6()), 2),
        ]),
        "IPv6 (kernel): {lines:?}"
    );

    // No backend: a SYN gets a RST (refused at once), a datagram an ICMPv6
    // port unreachable (a connected socket's next call is refused).
    client
        .ns
        .run(|| {
            use std::time::Duration;
            let t = std::time::Instant::now();
            let e = std::net::TcpStream::connect_timeout(
                &SocketAddr::from((EMPTY6, 80)),
                Duration::from_secs(3),
            )
            .expect_err("no backend: refused");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
            assert!(
                t.elapsed() < Duration::from_millis(900),
                "a RST, not a timeout"
            );
            let u = std::net::UdpSocket::bind("[::]:0").unwrap();
            u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            u.connect(SocketAddr::from((EMPTY6, 53))).unwrap();
            u.send(b"query").unwrap();
            let mut buf = [0u8; 16];
            let e = u.recv(&mut buf).expect_err("ICMPv6 port unreachable");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        })
        .expect("client namespace");

    // The kernel's maps hold both services, and the IPv6 flows.
    let maps = lb_agent::datapath::MapReader::open_pinned(&pin_path(&lab)).expect("pinned maps");
    let mut in_kernel: Vec<IpAddr> = maps.services().iter().map(|s| s.addr.vip).collect();
    in_kernel.sort();
    in_kernel.dedup();
    assert_eq!(
        in_kernel,
        [
            IpAddr::from(v4_vip),
            IpAddr::from(VIP6),
            IpAddr::from(EMPTY6)
        ]
    );
    let flows = maps.conntrack6().expect("CONNTRACK6");
    assert!(
        flows
            .iter()
            .filter(|f| f.vip == (VIP6, 80) && f.client.0 == client.ip6())
            .count()
            >= 4,
        "{flows:?}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f.backend == (b1.ip6(), BACKEND_PORT)
                || f.backend == (b2.ip6(), BACKEND_PORT)),
        "{flows:?}"
    );
    // lbctl lists the IPv6 flows with the IPv4 ones.
    let out = std::process::Command::new(rpclb_tests::procs::workspace_bin("lb-agent", "lbctl"))
        .args(["--pin-path", pin_path(&lab).to_str().unwrap(), "conntrack"])
        .env_remove("RPCLB_PIN_PATH")
        .output()
        .expect("run lbctl");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lbctl conntrack: {table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table
            .lines()
            .filter(|l| l.starts_with(&format!("[{}]:", client.ip6()))
                && l.contains("lab/web:http@ipv6"))
            .count()
            >= 4,
        "lbctl conntrack shows the IPv6 flows:\n{table}"
    );
    // Both are counted by name.
    let m = agent.scrape();
    for name in ["lab/web:http", "lab/web:http@ipv6"] {
        assert_eq!(
            m.get("rpclb_service_new_flows_total", &[("service", name)]),
            Some(4.0),
            "{name}"
        );
    }
    let be = m.get(
        "rpclb_backend_new_flows_total",
        &[
            ("service", "lab/web:http@ipv6"),
            ("backend", &format!("[{}]:{BACKEND_PORT}", b1.ip6())),
        ],
    );
    assert_eq!(be, Some(2.0));
}

/// The kernel's map writer writes an IPv6 service beside an IPv4 one of
/// the same state: its key in `SERVICES6`, its backends' addresses in
/// `BACKENDS6` (read back through the index), its table in `SLOTS`.
#[test]
fn the_map_writer_writes_ipv6_services() {
    use lb_agent::datapath::scratch::{ScratchDatapath, require_root};
    if !require_root("the map writer test") {
        return;
    }
    let mut dp = ScratchDatapath::new(|c| c.fib_redirect = false).expect("load");
    let v4 = Service::new(
        "t/v4:80",
        std::net::Ipv4Addr::new(10, 96, 0, 70),
        80,
        Protocol::Tcp,
        Algorithm::Maglev,
        vec![Backend::new(std::net::Ipv4Addr::new(10, 244, 11, 2), 8080)],
    );
    let s6 = Service::new(
        "t/v6:80",
        VIP6,
        80,
        Protocol::Tcp,
        Algorithm::Maglev,
        vec![
            Backend::new(pod_ip6(11, 2), 8080),
            Backend::new(pod_ip6(12, 2), 8080),
        ],
    );
    let refused = dp
        .writer()
        .apply(&DesiredState {
            services: vec![v4.clone(), s6.clone()],
        })
        .expect("apply");
    assert!(refused.is_empty(), "{refused:?}");
    let mut in_maps: Vec<IpAddr> = dp.writer().services().iter().map(|s| s.addr.vip).collect();
    in_maps.sort();
    assert_eq!(in_maps, [v4.vip, s6.vip]);
    let t = dp.writer().service_table(&s6.addr()).expect("table");
    assert_eq!(t.len() as u32, lb_common::limits::DEFAULT_MAGLEV_M);
    // A second writer on the same pins (a restarted agent) reads the IPv6
    // backends back from BACKENDS6.
    let again = lb_agent::datapath::MapReader::open_pinned(dp.dir()).expect("pinned maps");
    let mut ips: Vec<IpAddr> = again
        .backend_stats(&s6.addr())
        .expect("backends")
        .iter()
        .map(|b| b.ip)
        .collect();
    ips.sort();
    assert_eq!(
        ips,
        [IpAddr::from(pod_ip6(11, 2)), IpAddr::from(pod_ip6(12, 2))]
    );
    assert!(again.backend_id(&s6.addr(), pod_ip6(12, 2), 8080).is_some());
}
