//! Lab tests of the userspace data path: the proxy runs inside the lab's node
//! namespace (its VIP routes go there and nowhere else), and real TCP and UDP
//! sockets go client -> VIP -> backends. Need root; without it each test prints SKIP
//! and passes, or fails under CI (`CI=true` or `RPCLB_REQUIRE_PRIVILEGES=1`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use lb_agent::datapath::maglev;
use lb_agent::userspace::{
    BackendStatus, DropReason, ProxyOptions, ServiceStats, UserspaceProxy, datapath_snapshot,
};
use lb_api::{Algorithm, Backend, BackendState, DesiredState, Protocol, Service, ServiceAddr};
use rpclb_tests::lab::{self, Lab};
use rpclb_tests::skip_unless_lab;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const OP: Duration = Duration::from_secs(2);

fn opts() -> ProxyOptions {
    ProxyOptions {
        worker_threads: 2,
        ..ProxyOptions::default()
    }
}

/// Starts the proxy from inside the node namespace.
fn proxy(lab: &Lab, opts: ProxyOptions) -> UserspaceProxy {
    lab.node()
        .run(move || UserspaceProxy::start(opts))
        .expect("node namespace")
        .expect("start the proxy")
}

fn service(
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    algorithm: Algorithm,
    backends: Vec<Backend>,
) -> Service {
    Service::new(name, vip, port, protocol, algorithm, backends)
}

fn backends(lab: &Lab, port: u16) -> Vec<Backend> {
    lab.backends()
        .iter()
        .map(|h| Backend::new(h.ip(), port))
        .collect()
}

fn state(services: &[&Service]) -> DesiredState {
    DesiredState {
        services: services.iter().map(|s| (*s).clone()).collect(),
    }
}

fn counts(replies: &[lab::Reply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.backend.clone()).or_default() += 1;
    }
    m
}

fn stats_of(p: &UserspaceProxy, addr: ServiceAddr) -> ServiceStats {
    p.stats()
        .into_iter()
        .find(|s| s.addr == addr)
        .unwrap_or_else(|| panic!("no stats for {addr}"))
}

/// Polls the service's stats until `ok` holds (at most 5 s); returns the
/// last ones either way, for the caller's exact assertions.
fn settled(
    p: &UserspaceProxy,
    addr: ServiceAddr,
    ok: impl Fn(&ServiceStats) -> bool,
) -> ServiceStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = stats_of(p, addr);
        if ok(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn local_routes(lab: &Lab) -> String {
    lab.node()
        .ip(&["-4", "route", "show", "table", "local"])
        .expect("ip route")
}

fn has_route(lab: &Lab, vip: Ipv4Addr) -> bool {
    local_routes(lab)
        .lines()
        .any(|l| l.starts_with(&format!("local {vip} dev lo proto 114 ")))
}

/// A TCP connection from the client, held open, that has read its backend's
/// identity line.
struct Held {
    r: BufReader<TcpStream>,
    backend: String,
}

impl Held {
    fn open(lab: &Lab, target: SocketAddrV4) -> Held {
        let s = lab
            .client()
            .ns
            .run(move || TcpStream::connect_timeout(&target.into(), OP))
            .unwrap()
            .unwrap_or_else(|e| panic!("connect {target}: {e}"));
        s.set_read_timeout(Some(OP)).unwrap();
        s.set_write_timeout(Some(OP)).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("identity line");
        assert!(line.ends_with('\n'), "identity {line:?}");
        Held {
            r,
            backend: line.trim_end().to_string(),
        }
    }

    fn echo(&mut self, line: &str) -> String {
        self.r
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .expect("write");
        let mut got = String::new();
        self.r.read_line(&mut got).expect("read echo");
        got.trim_end().to_string()
    }

    /// Waits (bounded by the read timeout) for the proxy to end the
    /// connection; returns how the read ended.
    fn ended(&mut self) -> std::io::Result<usize> {
        let mut b = [0u8; 64];
        self.r.read(&mut b)
    }
}

/// A UDP socket in the client namespace, kept for several exchanges.
fn udp_socket(lab: &Lab) -> UdpSocket {
    let s = lab
        .client()
        .ns
        .run(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    s
}

/// One datagram out, one back: the reply and where it came from.
fn exchange(s: &UdpSocket, target: SocketAddrV4) -> std::io::Result<(String, SocketAddr)> {
    s.send_to(b"ping\n", target)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((
        String::from_utf8_lossy(&buf[..n]).trim_end().to_string(),
        from,
    ))
}

/// Connects and reads until the proxy ends the connection: how it ended
/// (a reset can beat the client's connect call and fail it), and how long
/// that took.
fn reset(lab: &Lab, target: SocketAddrV4) -> (ErrorKind, Duration) {
    lab.client()
        .ns
        .run(move || {
            let t0 = Instant::now();
            let kind = match TcpStream::connect_timeout(&target.into(), OP) {
                Err(e) => e.kind(),
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    match s.read(&mut [0u8; 16]) {
                        Ok(0) => ErrorKind::UnexpectedEof,
                        Ok(_) => ErrorKind::InvalidData,
                        Err(e) => e.kind(),
                    }
                }
            };
            (kind, t0.elapsed())
        })
        .unwrap()
}

fn ping_bytes(n: usize) -> u64 {
    (0..n).map(|k| format!("ping {k}\n").len() as u64).sum()
}

#[test]
fn userspace_balances_tcp_and_udp() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let tcp_servers = lab.start_tcp_servers(8080).unwrap();
    let udp_servers = lab.start_udp_servers(5353).unwrap();
    let p = proxy(&lab, opts());
    let tcp = service(
        "lab/web:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::RoundRobin,
        backends(&lab, 8080),
    );
    let udp = service(
        "lab/dns:dns",
        UDP_VIP,
        53,
        Protocol::Udp,
        Algorithm::RoundRobin,
        backends(&lab, 5353),
    );
    let summary = p.apply(&state(&[&tcp, &udp])).unwrap();
    assert_eq!((summary.added, summary.removed, summary.updated), (2, 0, 0));
    assert!(
        has_route(&lab, VIP) && has_route(&lab, UDP_VIP),
        "{}",
        local_routes(&lab)
    );
    assert_eq!(p.routes(), vec![VIP, UDP_VIP]);
    // The same apply again changes nothing.
    let again = p.apply(&state(&[&tcp, &udp])).unwrap();
    assert_eq!((again.added, again.unchanged), (0, 2));

    // TCP: every connection succeeds, from the VIP, round-robin exactly even.
    let replies = lab.client_tcp(SocketAddrV4::new(VIP, 80), 60).unwrap();
    for r in &replies {
        assert_eq!(r.peer, SocketAddr::from((VIP, 80)));
    }
    let c = counts(&replies);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        [20, 20, 20],
        "{c:?}"
    );
    // Backends see the node's address, not the client's.
    for (i, srv) in tcp_servers.iter().enumerate() {
        let node_ip = lab.backend(i + 1).node_iface.ip;
        let peers = srv.peers();
        assert_eq!(peers.len(), 20);
        assert!(peers.iter().all(|a| a.ip() == node_ip), "{peers:?}");
    }

    // UDP: same, replies from VIP:53.
    let replies = lab.client_udp(SocketAddrV4::new(UDP_VIP, 53), 30).unwrap();
    for r in &replies {
        assert_eq!(r.peer, SocketAddr::from((UDP_VIP, 53)), "reply source");
    }
    let c = counts(&replies);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{c:?}"
    );
    for (i, srv) in udp_servers.iter().enumerate() {
        let node_ip = lab.backend(i + 1).node_iface.ip;
        assert!(srv.peers().iter().all(|a| a.ip() == node_ip));
    }

    // The counters match the traffic exactly: each TCP connection carried
    // "ping k\n" in, "backend-i\n" plus its echo out; each UDP exchange one
    // datagram each way.
    let n = 60;
    let s = settled(&p, tcp.addr(), |s| {
        s.active_connections == 0 && s.bytes_out == ping_bytes(n) + 10 * n as u64
    });
    assert_eq!(s.name, "lab/web:http");
    assert_eq!((s.new_connections, s.active_connections), (60, 0));
    assert_eq!(s.bytes_in, ping_bytes(n));
    assert_eq!(s.bytes_out, ping_bytes(n) + 10 * n as u64);
    assert!(s.packets_in >= 60 && s.packets_out >= 120, "{s:?}");
    assert_eq!((s.total_drops(), s.connect_failures), (0, 0));
    assert_eq!(s.backends.len(), 3);
    for b in &s.backends {
        assert_eq!((b.new_connections, b.active_connections), (20, 0), "{b:?}");
        assert_eq!(b.status, BackendStatus::Active);
    }
    assert_eq!(
        s.backends.iter().map(|b| b.bytes_in).sum::<u64>(),
        s.bytes_in
    );
    assert_eq!(
        s.backends.iter().map(|b| b.bytes_out).sum::<u64>(),
        s.bytes_out
    );

    let u = settled(&p, udp.addr(), |s| s.packets_out == 30);
    assert_eq!(
        (u.new_connections, u.active_connections),
        (30, 30),
        "sessions live on"
    );
    assert_eq!((u.packets_in, u.packets_out), (30, 30));
    assert_eq!((u.bytes_in, u.bytes_out), (ping_bytes(30), 300));
    assert!(
        u.backends
            .iter()
            .all(|b| b.new_connections == 10 && b.active_connections == 10)
    );

    // The metrics view of the same counters.
    let snap = datapath_snapshot(&p.stats());
    let web = snap
        .services
        .iter()
        .find(|x| x.name == "lab/web:http")
        .unwrap();
    assert_eq!(web.stats.new_flows, 60);
    assert_eq!(web.stats.bytes, s.bytes_in + s.bytes_out);
    assert_eq!(web.backends.iter().map(|b| b.new_flows).sum::<u64>(), 60);
    assert!(
        snap.reasons
            .iter()
            .all(|(r, n)| r.starts_with("drop_") && *n == 0)
    );

    // Shutdown closes everything and takes the routes away.
    p.shutdown().unwrap();
    assert!(
        !has_route(&lab, VIP) && !has_route(&lab, UDP_VIP),
        "{}",
        local_routes(&lab)
    );
    let r = lab
        .client()
        .ns
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), OP))
        .unwrap();
    assert!(r.is_err(), "connected after shutdown");
}

#[test]
fn userspace_least_conn_is_exact() {
    skip_unless_lab!();
    least_conn_is_exact(opts());
}

/// The same with the connections on per-thread runtimes (accepted on the
/// shared one, run on another): counts stay exact, and shutdown still ends
/// every connection.
#[test]
fn userspace_least_conn_is_exact_on_per_thread_runtimes() {
    skip_unless_lab!();
    least_conn_is_exact(ProxyOptions {
        per_thread_runtimes: true,
        ..opts()
    });
}

fn least_conn_is_exact(o: ProxyOptions) {
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let p = proxy(&lab, o);
    let svc = service(
        "lab/lc:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::LeastConn,
        backends(&lab, 8080),
    );
    p.apply(&state(&[&svc])).unwrap();
    let target = SocketAddrV4::new(VIP, 80);

    // Held connections spread exactly evenly (the fewest open wins; ties go
    // round-robin).
    let mut held: Vec<Held> = (0..6).map(|_| Held::open(&lab, target)).collect();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for h in &held {
        *per.entry(h.backend.clone()).or_default() += 1;
    }
    assert_eq!(
        per.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{per:?}"
    );
    let s = stats_of(&p, svc.addr());
    assert_eq!(s.active_connections, 6);
    assert!(
        s.backends.iter().all(|b| b.active_connections == 2),
        "{:?}",
        s.backends
    );

    // Close both on backend-1: the proxy sees it, and the next two new
    // connections go there and nowhere else.
    held.retain(|h| h.backend != "backend-1");
    assert_eq!(held.len(), 4);
    let b1 = lab.backend(1).ip();
    let s = settled(&p, svc.addr(), |s| {
        s.backend(b1, 8080).unwrap().active_connections == 0
    });
    assert_eq!(s.backend(b1, 8080).unwrap().active_connections, 0, "{s:?}");
    assert_eq!(s.active_connections, 4);
    for _ in 0..2 {
        let h = Held::open(&lab, target);
        assert_eq!(h.backend, "backend-1");
        held.push(h);
    }
    let s = stats_of(&p, svc.addr());
    assert!(
        s.backends.iter().all(|b| b.active_connections == 2),
        "{:?}",
        s.backends
    );
    assert_eq!(s.backend(b1, 8080).unwrap().new_connections, 4);
    for (k, h) in held.iter_mut().enumerate() {
        assert_eq!(h.echo(&format!("still {k}")), format!("still {k}"));
    }
    // Shutdown ends every connection (EOF or reset), within the read timeout.
    p.shutdown().unwrap();
    for h in &mut held {
        match h.ended() {
            Ok(0) => {}
            Err(e) => assert!(
                !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                "still open after shutdown"
            ),
            Ok(n) => panic!("{n} bytes after shutdown"),
        }
    }
}

#[test]
fn userspace_backend_changes_keep_open_connections() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let p = proxy(&lab, opts());
    let ip = |i: usize| lab.backend(i).ip();
    let target = SocketAddrV4::new(VIP, 80);

    // Maglev over backends 1 and 2; a long-lived connection on one of them.
    let mut svc = service(
        "lab/web:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Maglev,
        vec![Backend::new(ip(1), 8080), Backend::new(ip(2), 8080)],
    );
    p.apply(&state(&[&svc])).unwrap();
    let mut long = Held::open(&lab, target);
    let mine: usize = long.backend.trim_start_matches("backend-").parse().unwrap();
    let other = 3 - mine;
    assert_eq!(long.echo("one"), "one");
    let big = "x".repeat(256 * 1024);
    assert_eq!(long.echo(&big), big, "256 KiB echoed");

    // Its backend leaves the service: it goes on; new ones avoid that backend.
    svc.backends = vec![Backend::new(ip(other), 8080), Backend::new(ip(3), 8080)];
    let summary = p.apply(&state(&[&svc])).unwrap();
    assert_eq!(summary.updated, 1);
    assert_eq!(long.echo("two"), "two");
    let c = counts(&lab.client_tcp(target, 30).unwrap());
    assert!(
        !c.contains_key(&long.backend),
        "new flow to the removed backend: {c:?}"
    );
    assert_eq!(long.echo("three"), "three");
    let s = stats_of(&p, svc.addr());
    let gone = s
        .backend(ip(mine), 8080)
        .expect("removed backend still listed");
    assert_eq!(
        (gone.status, gone.active_connections),
        (BackendStatus::Removed, 1)
    );

    // Round-robin, and a connection held on backend 2 (at most 3 tries).
    let mut rr = service(
        "lab/web:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::RoundRobin,
        backends(&lab, 8080),
    );
    p.apply(&state(&[&rr])).unwrap();
    let mut on2 = None;
    let mut others = Vec::new();
    for _ in 0..3 {
        let h = Held::open(&lab, target);
        if h.backend == "backend-2" {
            on2 = Some(h);
            break;
        }
        others.push(h);
    }
    let mut on2 = on2.expect("round-robin reaches backend 2 within 3 connections");

    // Backend 2 terminating: nothing new goes there, its connection goes on.
    rr.backends[1].state = BackendState::Terminating;
    p.apply(&state(&[&rr])).unwrap();
    let c = counts(&lab.client_tcp(target, 30).unwrap());
    assert_eq!(c.get("backend-1"), Some(&15), "{c:?}");
    assert_eq!(c.get("backend-3"), Some(&15), "{c:?}");
    assert_eq!(on2.echo("draining"), "draining");
    let s = stats_of(&p, rr.addr());
    let b2 = s.backend(ip(2), 8080).unwrap();
    // The long-lived connection counts too if it is on backend 2: a backend
    // that comes back keeps its counters.
    let on_b2 = 1 + u64::from(mine == 2);
    assert_eq!(
        (b2.status, b2.active_connections),
        (BackendStatus::Draining, on_b2)
    );

    // Weight 0 on backend 3 drains it too; then weights 2:1 split 2:1 exactly.
    rr.backends[2].weight = 0;
    p.apply(&state(&[&rr])).unwrap();
    let c = counts(&lab.client_tcp(target, 10).unwrap());
    assert_eq!(c, BTreeMap::from([("backend-1".to_string(), 10)]));
    rr.backends[0].weight = 2;
    rr.backends[2].weight = 1;
    p.apply(&state(&[&rr])).unwrap();
    let c = counts(&lab.client_tcp(target, 30).unwrap());
    assert_eq!(c.get("backend-1"), Some(&20), "{c:?}");
    assert_eq!(c.get("backend-3"), Some(&10), "{c:?}");
    assert_eq!(on2.echo("still"), "still");
    assert_eq!(long.echo("four"), "four");
}

#[test]
fn userspace_removed_service_closes_and_drops_its_route() {
    skip_unless_lab!();
    let lab = Lab::new(2).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let _udp = lab.start_udp_servers(5353).unwrap();
    let p = proxy(&lab, opts());
    // Two services on the shared VIP (TCP and UDP), one on its own.
    let a = service(
        "lab/a:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        backends(&lab, 8080),
    );
    let b_tcp = service(
        "lab/b:tcp",
        UDP_VIP,
        8081,
        Protocol::Tcp,
        Algorithm::Random,
        backends(&lab, 8080),
    );
    let b_udp = service(
        "lab/b:udp",
        UDP_VIP,
        53,
        Protocol::Udp,
        Algorithm::Random,
        backends(&lab, 5353),
    );
    p.apply(&state(&[&a, &b_tcp, &b_udp])).unwrap();
    lab.client_tcp(SocketAddrV4::new(UDP_VIP, 8081), 2).unwrap();
    let mut held = Held::open(&lab, SocketAddrV4::new(VIP, 80));
    assert_eq!(held.echo("hi"), "hi");

    // Remove A: its route goes, its connection is cut, new ones fail.
    let summary = p.apply(&state(&[&b_tcp, &b_udp])).unwrap();
    assert_eq!((summary.removed, summary.unchanged), (1, 2));
    assert!(!has_route(&lab, VIP), "{}", local_routes(&lab));
    assert!(has_route(&lab, UDP_VIP));
    assert_eq!(p.routes(), vec![UDP_VIP]);
    match held.ended() {
        Ok(0) => {}
        Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("held connection not cut: {other:?}"),
    }
    let r = lab
        .client()
        .ns
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), OP))
        .unwrap();
    assert!(r.is_err(), "connected to a removed service");
    assert!(p.stats().iter().all(|s| s.addr != a.addr()));

    // Remove the TCP service of the shared VIP: the route stays for UDP, and
    // the closed port is refused at once by the kernel.
    p.apply(&state(&[&b_udp])).unwrap();
    assert!(has_route(&lab, UDP_VIP));
    let e = lab
        .client()
        .ns
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((UDP_VIP, 8081)), OP))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    let replies = lab.client_udp(SocketAddrV4::new(UDP_VIP, 53), 4).unwrap();
    assert_eq!(replies.len(), 4);

    // Nothing left: no routes, UDP unanswered.
    let summary = p.apply(&DesiredState::default()).unwrap();
    assert_eq!(summary.removed, 1);
    assert!(!has_route(&lab, UDP_VIP), "{}", local_routes(&lab));
    assert!(p.routes().is_empty() && p.stats().is_empty());
    let s = udp_socket(&lab);
    assert!(exchange(&s, SocketAddrV4::new(UDP_VIP, 53)).is_err());
}

#[test]
fn userspace_connect_failures_retry_then_drop() {
    skip_unless_lab!();
    let lab = Lab::new(2).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let p = proxy(
        &lab,
        ProxyOptions {
            connect_timeout: Duration::from_millis(300),
            ..opts()
        },
    );
    let (b1, b2) = (lab.backend(1).ip(), lab.backend(2).ip());
    // Nothing listens on backend 1's port 9999: refused, retried on backend 2.
    let retry = service(
        "lab/retry:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::RoundRobin,
        vec![Backend::new(b1, 9999), Backend::new(b2, 8080)],
    );
    // No such host on backend 1's subnet: the connect times out.
    let ghost = Ipv4Addr::new(10, 244, 11, 99);
    let timeout = service(
        "lab/timeout:http",
        VIP,
        81,
        Protocol::Tcp,
        Algorithm::RoundRobin,
        vec![Backend::new(ghost, 8080)],
    );
    let empty = service(
        "lab/empty:http",
        VIP,
        82,
        Protocol::Tcp,
        Algorithm::Random,
        vec![],
    );
    let empty_udp = service(
        "lab/empty:dns",
        VIP,
        53,
        Protocol::Udp,
        Algorithm::Random,
        vec![],
    );
    p.apply(&state(&[&retry, &timeout, &empty, &empty_udp]))
        .unwrap();

    let c = counts(&lab.client_tcp(SocketAddrV4::new(VIP, 80), 10).unwrap());
    assert_eq!(c, BTreeMap::from([("backend-2".to_string(), 10)]));
    let s = settled(&p, retry.addr(), |s| s.active_connections == 0);
    let dead = s.backend(b1, 9999).unwrap();
    assert_eq!((dead.connect_failures, dead.new_connections), (10, 0));
    assert_eq!(s.backend(b2, 8080).unwrap().new_connections, 10);
    assert_eq!((s.connect_failures, s.total_drops()), (10, 0));

    // Accepted, then reset once the only backend timed out.
    let (kind, took) = reset(&lab, SocketAddrV4::new(VIP, 81));
    assert_eq!(kind, ErrorKind::ConnectionReset);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let s = settled(&p, timeout.addr(), |s| {
        s.drops_for(DropReason::ConnectTimeout) == 1
    });
    assert_eq!(s.drops_for(DropReason::ConnectTimeout), 1, "{s:?}");
    assert_eq!(s.backend(ghost, 8080).unwrap().connect_failures, 1);

    // No backend at all: reset at once; the UDP datagram is dropped.
    let (kind, took) = reset(&lab, SocketAddrV4::new(VIP, 82));
    assert_eq!(kind, ErrorKind::ConnectionReset);
    assert!(took < Duration::from_secs(1), "{took:?}");
    let s = settled(&p, empty.addr(), |s| s.total_drops() == 1);
    assert_eq!(s.drops_for(DropReason::NoBackend), 1, "{s:?}");
    let u = udp_socket(&lab);
    assert!(exchange(&u, SocketAddrV4::new(VIP, 53)).is_err());
    let s = settled(&p, empty_udp.addr(), |s| s.total_drops() == 1);
    assert_eq!(s.drops_for(DropReason::NoBackend), 1, "{s:?}");
    assert_eq!(s.new_connections, 0);
}

#[test]
fn userspace_idle_timeouts_and_session_limit() {
    skip_unless_lab!();
    let lab = Lab::new(1).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let _udp = lab.start_udp_servers(5353).unwrap();
    let p = proxy(
        &lab,
        ProxyOptions {
            tcp_idle_timeout: Duration::from_secs(1),
            udp_idle_timeout: Duration::from_secs(1),
            max_udp_sessions: 2,
            ..opts()
        },
    );
    let tcp = service(
        "lab/web:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        backends(&lab, 8080),
    );
    let udp = service(
        "lab/dns:dns",
        UDP_VIP,
        53,
        Protocol::Udp,
        Algorithm::Random,
        backends(&lab, 5353),
    );
    p.apply(&state(&[&tcp, &udp])).unwrap();

    // An idle TCP connection is closed after about a second (the backend
    // would wait 10 s).
    // The clock starts before the connection: its idle time starts at its last
    // data (the identity line), which is later, so `took` can only be longer.
    let t0 = Instant::now();
    let mut h = Held::open(&lab, SocketAddrV4::new(VIP, 80));
    h.r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let r = h.ended();
    let took = t0.elapsed();
    assert!(matches!(r, Ok(0)), "{r:?}");
    assert!(
        took >= Duration::from_millis(990) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let s = settled(&p, tcp.addr(), |s| s.active_connections == 0);
    assert_eq!((s.idle_timeouts, s.active_connections), (1, 0));

    // Two sessions fit, the third client is dropped.
    let target = SocketAddrV4::new(UDP_VIP, 53);
    let socks: Vec<UdpSocket> = (0..3).map(|_| udp_socket(&lab)).collect();
    for s in &socks[..2] {
        let (who, from) = exchange(s, target).unwrap();
        assert_eq!((who.as_str(), from), ("backend-1", SocketAddr::V4(target)));
    }
    assert!(
        exchange(&socks[2], target).is_err(),
        "third session refused"
    );
    let s = stats_of(&p, udp.addr());
    assert_eq!(
        (s.active_connections, s.drops_for(DropReason::SessionsFull)),
        (2, 1)
    );
    // They expire after a second of silence; then there is room again.
    let s = settled(&p, udp.addr(), |s| s.active_connections == 0);
    assert_eq!((s.active_connections, s.idle_timeouts), (0, 2), "{s:?}");
    assert!(exchange(&socks[2], target).is_ok());
    assert_eq!(stats_of(&p, udp.addr()).new_connections, 3);
}

#[test]
fn userspace_hashes_match_the_kernel() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let p = proxy(&lab, opts());
    let target = SocketAddrV4::new(VIP, 80);
    // The kernel's table and hashes, computed here independently.
    let table: Vec<u32> = maglev::build(
        &(1..=3)
            .map(|i| maglev::MaglevBackend {
                id: i as u32,
                key: maglev::backend_key(lab.backend(i).ip(), 8080),
                weight: 1,
            })
            .collect::<Vec<_>>(),
        lb_api::DEFAULT_MAGLEV_M,
    )
    .unwrap();
    let wire = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets());
    let predict = |h: u32| format!("backend-{}", table[(h % table.len() as u32) as usize]);

    let mut svc = service(
        "lab/mg:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Maglev,
        backends(&lab, 8080),
    );
    p.apply(&state(&[&svc])).unwrap();
    let replies = lab.client_tcp(target, 30).unwrap();
    for r in &replies {
        let SocketAddr::V4(local) = r.local else {
            panic!("v4")
        };
        let h = lb_common::flow_hash(
            wire(*local.ip()),
            wire(VIP),
            local.port().to_be(),
            80u16.to_be(),
            6,
        );
        assert_eq!(r.backend, predict(h), "flow from {local}");
    }
    assert!(
        counts(&replies).len() > 1,
        "maglev spreads over source ports"
    );

    svc.algorithm = Algorithm::SourceHash;
    p.apply(&state(&[&svc])).unwrap();
    let c = counts(&lab.client_tcp(target, 10).unwrap());
    let want = predict(lb_common::src_hash(wire(lab.client().ip())));
    assert_eq!(c, BTreeMap::from([(want, 10)]));

    // Affinity pins a client to its first pick, whatever the algorithm.
    svc.algorithm = Algorithm::RoundRobin;
    svc.affinity_timeout = Some(Duration::from_secs(60));
    p.apply(&state(&[&svc])).unwrap();
    let c = counts(&lab.client_tcp(target, 9).unwrap());
    assert_eq!(c.len(), 1, "{c:?}");
}
