//! Lab test of active health checks, with the real `lb-agent` binary in the
//! lab's node namespace (eBPF data path for L4, its userspace proxy for the
//! gRPC mode): two services on the same three backends,
//!
//! - `lab/grpc:grpc` in the gRPC mode with a `grpc` check
//!   (grpc.health.v1 Check; the backends' `Health` handle sets the status);
//! - `lab/web:http` at L4 (the kernel maps) with a `tcp` check (connect;
//!   the backends' identity servers can close their listener and keep
//!   their accepted connections).
//!
//! Checks every 200 ms, timeout 100 ms, 2 failures out, 2 passes back. The
//! bound from a failure to no new calls or flows is unhealthy_threshold ×
//! interval + timeout = 500 ms, plus the agent's apply (a map write:
//! milliseconds); the test waits [`BOUND`] = 1 s and then asserts.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rpclb_tests::grpc::proto::SimpleRequest;
use rpclb_tests::grpc::proto::test_service_client::TestServiceClient;
use rpclb_tests::grpc::{GrpcServer, Health, Journal, ServingStatus, TestBackend, block_on_in};
use rpclb_tests::lab::{HeldConn, Lab, Reply};
use rpclb_tests::procs::{Proc as Agent, Scrape, TestDir, agent_args};
use rpclb_tests::skip_unless_lab;

const GRPC_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const GRPC_PORT: u16 = 50051;
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB_PORT: u16 = 80;
const TCP_PORT: u16 = 8080;

/// unhealthy_threshold (2) × interval (200 ms) + timeout (100 ms) = 500 ms,
/// with room for the apply and the scheduler of a loaded 2-core machine.
const BOUND: Duration = Duration::from_secs(1);

const CHECK: &str = "interval: 200ms, timeout: 100ms, unhealthy_threshold: 2, healthy_threshold: 2";

fn config(lab: &Lab) -> String {
    let list = |port: u16| {
        lab.backends()
            .iter()
            .map(|b| format!("      - {{ ip: {}, port: {port} }}\n", b.ip()))
            .collect::<String>()
    };
    format!(
        "services:\n\
         \x20 - name: lab/grpc:grpc\n    vip: {GRPC_VIP}\n    port: {GRPC_PORT}\n    grpc: {{}}\n    \
         health_check: {{ kind: grpc, {CHECK} }}\n    backends:\n{}\
         \x20 - name: lab/web:http\n    vip: {WEB_VIP}\n    port: {WEB_PORT}\n    algorithm: round-robin\n    \
         health_check: {{ kind: tcp, {CHECK} }}\n    backends:\n{}",
        list(GRPC_PORT),
        list(TCP_PORT)
    )
}

/// `n` unary calls on one client channel (one HTTP/2 connection) to the
/// gRPC VIP, from the client namespace; the backend of each. Every call
/// must succeed.
fn calls(lab: &Lab, n: usize) -> Vec<String> {
    block_on_in(&lab.client().ns, move || async move {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{GRPC_VIP}:{GRPC_PORT}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the gRPC VIP");
        let mut c = TestServiceClient::new(ch);
        let mut out = Vec::new();
        for k in 0..n {
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                c.unary_call(SimpleRequest::default()),
            )
            .await
            .unwrap_or_else(|_| panic!("call {k}: no answer in 5 s"))
            .unwrap_or_else(|e| panic!("call {k}: {e}"));
            out.push(r.into_inner().served_by);
        }
        out
    })
}

/// `n` new L4 flows to the web VIP; every one must succeed.
fn flows(lab: &Lab, n: usize) -> Vec<String> {
    let target = SocketAddrV4::new(WEB_VIP, WEB_PORT);
    lab.client_tcp(target, n)
        .unwrap_or_else(|e| panic!("L4 flows to {target}: {e}"))
        .into_iter()
        .map(|r: Reply| r.backend)
        .collect()
}

fn count(of: &[String], backend: &str) -> usize {
    of.iter().filter(|b| *b == backend).count()
}

fn healthy(s: &Scrape, service: &str, backend: SocketAddrV4) -> Option<f64> {
    s.get(
        "rpclb_backend_healthy",
        &[("service", service), ("backend", &backend.to_string())],
    )
}

/// Waits (at most 10 s) until every checked backend has passed a check.
fn wait_checked(agent: &mut Agent, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = agent.scrape();
        let passed = s
            .samples("rpclb_health_checks_total")
            .into_iter()
            .filter(|(l, v)| l.get("result").map(String::as_str) == Some("pass") && *v >= 1.0)
            .count();
        if passed == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{passed} of {want} checked backends passed a check in 10 s:\n{}",
            s.0
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A backend that fails its check gets no new gRPC calls and no new L4
/// flows within [`BOUND`], while an established L4 connection to it keeps
/// working; once it passes again it gets both again. With every backend
/// failing, all take calls (panic mode).
#[test]
fn failing_backends_leave_selection_and_come_back() {
    skip_unless_lab!();
    leave_and_come_back(&[]);
}

/// The same with every service in the agent's userspace proxy (the L4
/// service too).
#[test]
fn failing_backends_leave_selection_and_come_back_userspace() {
    skip_unless_lab!();
    leave_and_come_back(&["--datapath", "userspace"]);
}

fn leave_and_come_back(extra: &[&str]) {
    let lab = Lab::new(3).expect("lab");
    let journal = Arc::new(Journal::counting());
    let mut health: Vec<Arc<Health>> = Vec::new();
    let _grpc: Vec<GrpcServer> = (1..=3)
        .map(|i| {
            let b = TestBackend::new(i, format!("backend-{i}"), journal.clone());
            health.push(b.health());
            let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, GRPC_PORT));
            GrpcServer::start(&lab.backend(i).ns, any, b, Duration::ZERO).expect("gRPC backend")
        })
        .collect();
    let tcp = lab.start_tcp_servers(TCP_PORT).expect("TCP backends");
    let dir = TestDir::new("health");
    dir.write_config(&config(&lab));
    let mut agent = Agent::start(&lab, &dir, "agent", &agent_args(&lab, &dir, extra));
    agent.wait_ready();
    wait_checked(&mut agent, 6);

    let b1 = lab.backend(1).ip();
    let (g1, t1) = (
        SocketAddrV4::new(b1, GRPC_PORT),
        SocketAddrV4::new(b1, TCP_PORT),
    );
    let (grpc_svc, web_svc) = ("lab/grpc:grpc", "lab/web:http");

    // Healthy: everything everywhere.
    let c = calls(&lab, 30);
    let f = flows(&lab, 30);
    for i in 1..=3 {
        let b = format!("backend-{i}");
        assert!(count(&c, &b) > 0, "calls: {c:?}");
        assert_eq!(count(&f, &b), 10, "round-robin flows: {f:?}");
    }
    // An established L4 connection on backend 1 (round-robin: within 3).
    let mut held = None;
    for _ in 0..6 {
        let h = HeldConn::open(&lab.client().ns, SocketAddrV4::new(WEB_VIP, WEB_PORT))
            .expect("held connection");
        if h.backend == "backend-1" {
            held = Some(h);
            break;
        }
    }
    let mut held = held.expect("a connection on backend-1");
    held.echo("before");

    // Backend 1 fails both checks: NOT_SERVING, and its listener closed
    // (its accepted connections stay).
    health[0].set(ServingStatus::NotServing);
    tcp[0].set_listening(false);
    std::thread::sleep(BOUND);
    let s = agent.scrape();
    assert_eq!(healthy(&s, grpc_svc, g1), Some(0.0), "{}", s.0);
    assert_eq!(healthy(&s, web_svc, t1), Some(0.0), "{}", s.0);
    assert!(
        s.get(
            "rpclb_health_checks_total",
            &[("backend", &g1.to_string()), ("result", "fail")]
        )
        .is_some_and(|n| n >= 2.0)
    );
    let c = calls(&lab, 60);
    assert_eq!(count(&c, "backend-1"), 0, "unhealthy got calls: {c:?}");
    assert!(count(&c, "backend-2") > 0 && count(&c, "backend-3") > 0);
    // Every new flow succeeds (none is sent to the closed port), none on 1.
    let f = flows(&lab, 30);
    assert_eq!(count(&f, "backend-1"), 0, "unhealthy got flows: {f:?}");
    assert_eq!((count(&f, "backend-2"), count(&f, "backend-3")), (15, 15));
    held.echo("while unhealthy");
    // `/status` (what `lbctl status` shows) lists both.
    let (code, status) = agent.get("/status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let mut out: Vec<String> = v["health"]["unhealthy"]
        .as_array()
        .expect("health.unhealthy")
        .iter()
        .map(|u| {
            format!(
                "{} {}",
                u["service"].as_str().unwrap(),
                u["backend"].as_str().unwrap()
            )
        })
        .collect();
    out.sort();
    assert_eq!(out, [format!("{grpc_svc} {g1}"), format!("{web_svc} {t1}")]);
    assert_eq!(v["health"]["checked"], 6);
    // The other backends are healthy.
    for b in lab.backends().iter().skip(1) {
        assert_eq!(
            healthy(&s, grpc_svc, SocketAddrV4::new(b.ip(), GRPC_PORT)),
            Some(1.0)
        );
        assert_eq!(
            healthy(&s, web_svc, SocketAddrV4::new(b.ip(), TCP_PORT)),
            Some(1.0)
        );
    }

    // Back: SERVING and listening; 2 passes put it back.
    health[0].set(ServingStatus::Serving);
    tcp[0].set_listening(true);
    std::thread::sleep(BOUND);
    let s = agent.scrape();
    assert_eq!(healthy(&s, grpc_svc, g1), Some(1.0), "{}", s.0);
    assert_eq!(healthy(&s, web_svc, t1), Some(1.0), "{}", s.0);
    let c = calls(&lab, 60);
    assert!(count(&c, "backend-1") >= 5, "back in service: {c:?}");
    let f = flows(&lab, 30);
    assert_eq!(count(&f, "backend-1"), 10, "back in round-robin: {f:?}");
    held.echo("after");

    // Every gRPC backend NOT_SERVING: panic mode, all take calls.
    for h in &health {
        h.set(ServingStatus::NotServing);
    }
    std::thread::sleep(BOUND);
    let s = agent.scrape();
    assert_eq!(
        s.sum("rpclb_backend_healthy", &[("service", grpc_svc)]),
        0.0
    );
    let c = calls(&lab, 30);
    for i in 1..=3 {
        assert!(count(&c, &format!("backend-{i}")) > 0, "panic mode: {c:?}");
    }
    assert!(
        agent.log().contains("panic mode"),
        "the agent says so:\n{}",
        agent.log()
    );
    // The health checks came from the node: every backend answered checks.
    assert!(health.iter().all(|h| h.checks() >= 5));
}
