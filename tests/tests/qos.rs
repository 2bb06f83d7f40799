//! QoS limits (docs/policies.md) with real traffic in the netns lab: the
//! kernel's per-backend connection limit (XDP on the node), and the gRPC
//! mode's per-backend limit of outstanding calls (the userspace proxy).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_agent::datapath::{AttachMode, Datapath, DatapathConfig};
use lb_agent::userspace::{DropReason, ServiceStats, UserspaceProxy};
use lb_api::{Algorithm, Backend, DesiredState, GrpcPolicy, Protocol, Service};
use rpclb_tests::grpc::{HOLD, Journal, SLEEP};
use rpclb_tests::lab::{self, HeldConn, Lab};
use rpclb_tests::skip_unless_lab;
use tonic::Code;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const GRPC_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const GRPC_PORT: u16 = 50051;
const CALL: Duration = Duration::from_secs(5);

/// The data path in the lab's bpffs, XDP on every node-side interface.
fn datapath(lab: &Lab) -> Datapath {
    let ifaces: Vec<String> = lab.node_ifaces().iter().map(|i| i.name.clone()).collect();
    let mut cfg = DatapathConfig::small(lab.bpffs().join("rpclb"));
    if lb_agent::datapath::programs::kernel_version() >= Some((5, 13)) {
        // The lab's client and backend veth ends have GRO on.
        cfg.xdp_redirect_to = ifaces.clone();
    }
    lab.node()
        .run(move || {
            let mut dp = Datapath::load(&cfg).expect("load");
            for i in &ifaces {
                dp.attach(i, AttachMode::Xdp).expect("attach");
            }
            dp
        })
        .expect("node namespace")
}

fn counts(replies: &[lab::Reply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.backend.clone()).or_default() += 1;
    }
    m
}

fn connect_err(lab: &Lab) -> std::io::ErrorKind {
    lab.client()
        .ns
        .run(|| {
            TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(3))
                .expect_err("refused")
                .kind()
        })
        .unwrap()
}

/// A backend with limit 2 holding 2 open connections gets no new ones while
/// the others do; all at their limit: connection refused (RST); closing one
/// frees a slot.
#[test]
fn lab_kernel_connection_limit() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let mut dp = datapath(&lab);
    let ip = |i: usize| lab.backend(i).ip();
    let target = SocketAddrV4::new(VIP, 80);
    // backend-1 alone, limit 2 (its own).
    let b1 = Backend {
        max: Some(2),
        ..Backend::new(ip(1), 8080)
    };
    let mut svc = Service::new(
        "lab/web:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        vec![b1.clone()],
    );
    dp.writer().upsert_service(&svc).unwrap();
    let mut held: Vec<HeldConn> = (0..2)
        .map(|_| HeldConn::open(&lab.client().ns, target).expect("room for 2"))
        .collect();
    assert!(held.iter().all(|h| h.backend == "backend-1"));
    // All full: refused at once.
    let t = Instant::now();
    assert_eq!(connect_err(&lab), std::io::ErrorKind::ConnectionRefused);
    assert!(t.elapsed() < Duration::from_secs(1), "refused fast");
    let reasons: BTreeMap<_, _> = dp.writer().reasons().unwrap().into_iter().collect();
    assert_eq!(reasons["tx_rst_backends_full"], 1, "{reasons:?}");
    assert_eq!(reasons["tx_rst_no_backend"], 0);

    // Two more backends without a limit: they take every new connection.
    svc.backends = vec![b1, Backend::new(ip(2), 8080), Backend::new(ip(3), 8080)];
    dp.writer().upsert_service(&svc).unwrap();
    let c = counts(&lab.client_tcp(target, 30).unwrap());
    assert!(
        !c.contains_key("backend-1"),
        "none to the full backend: {c:?}"
    );
    assert_eq!(c.values().sum::<usize>(), 30, "{c:?}");
    assert_eq!(c.len(), 2, "{c:?}");
    // Its held connections go on.
    for h in &mut held {
        h.try_echo("still there").expect("held connection");
    }
    let bs = dp.writer().backend_stats(&svc.addr()).unwrap();
    let one = bs.iter().find(|b| b.ip == ip(1)).unwrap();
    assert_eq!((one.active, one.limit), (2, Some(2)));

    // Closing one frees a slot: backend-1 takes new connections again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    while dp.writer().backend_stats(&svc.addr()).unwrap()[0].active != 1
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = counts(&lab.client_tcp(target, 30).unwrap());
    assert!(c.get("backend-1").is_some_and(|&n| n > 0), "{c:?}");
}

// ---- the gRPC mode -----------------------------------------------------------

fn grpc_stats(p: &UserspaceProxy) -> ServiceStats {
    p.stats()
        .into_iter()
        .find(|s| s.addr.vip == GRPC_VIP)
        .expect("stats of the gRPC service")
}

/// A unary call with these headers, bounded by [`CALL`]: who served it.
async fn unary(
    c: &mut rpclb_tests::grpc::proto::test_service_client::TestServiceClient<
        tonic::transport::Channel,
    >,
    headers: &[(&'static str, &str)],
) -> Result<String, tonic::Status> {
    rpclb_tests::grpc::served_by(c, headers, CALL).await
}

/// A backend limited to N outstanding calls never has more than N in its
/// handler (the backend counts), the others take the rest; all full:
/// UNAVAILABLE, counted as `drop_backends_full`.
#[test]
fn lab_grpc_outstanding_call_limit() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let journal = Arc::new(Journal::default());
    let _servers = rpclb_tests::grpc::start_backends(&lab, 3, GRPC_PORT, &journal);
    let p = rpclb_tests::grpc::start_proxy(&lab, |_| {});
    let backends: Vec<Backend> = lab
        .backends()
        .iter()
        .map(|h| Backend::new(h.ip(), GRPC_PORT))
        .collect();
    let mut svc = Service::new(
        "lab/grpc:grpc",
        GRPC_VIP,
        GRPC_PORT,
        Protocol::Tcp,
        Algorithm::Random,
        backends,
    );
    svc.grpc = Some(GrpcPolicy::default());
    svc.max_per_backend = Some(2);
    p.apply(&DesiredState {
        services: vec![svc.clone()],
    })
    .unwrap();

    // 6 held calls fill every backend (2 each); the 7th is UNAVAILABLE.
    let (full, held) = rpclb_tests::grpc::block_on_in(&lab.client().ns, || {
        let journal = journal.clone();
        async move {
            let c = rpclb_tests::grpc::connect(GRPC_VIP, GRPC_PORT).await;
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..6 {
                let mut c = c.clone();
                calls.spawn(async move { unary(&mut c, &[(HOLD, "1")]).await });
            }
            let deadline = Instant::now() + CALL;
            while (1..=3).map(|i| journal.in_flight(i)).sum::<u64>() < 6 {
                assert!(Instant::now() < deadline, "6 calls held");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let full = unary(&mut c.clone(), &[]).await;
            journal.release();
            let mut held = Vec::new();
            while let Some(r) = calls.join_next().await {
                held.push(r.unwrap());
            }
            (full, held)
        }
    });
    let e = full.expect_err("all full");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("at its limit"), "{e:?}");
    assert!(held.iter().all(|r| r.is_ok()), "{held:?}");
    for i in 1..=3 {
        assert_eq!(journal.max_in_flight(i), 2, "backend-{i}");
    }
    assert_eq!(grpc_stats(&p).drops_for(DropReason::BackendsFull), 1);

    // backend-1 limited to 1, the others not: under 10 callers it never
    // holds 2, the others take the rest, no call fails.
    svc.max_per_backend = None;
    svc.backends[0].max = Some(1);
    p.apply(&DesiredState {
        services: vec![svc.clone()],
    })
    .unwrap();
    journal.reset_max_in_flight();
    let served_before = journal.served(1);
    let served = rpclb_tests::grpc::block_on_in(&lab.client().ns, || async move {
        let c = rpclb_tests::grpc::connect(GRPC_VIP, GRPC_PORT).await;
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let mut c = c.clone();
            calls.spawn(async move {
                let mut out = Vec::new();
                for _ in 0..6 {
                    out.push(unary(&mut c, &[(SLEEP, "30")]).await);
                }
                out
            });
        }
        let mut all = Vec::new();
        while let Some(r) = calls.join_next().await {
            all.extend(r.unwrap());
        }
        all
    });
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for r in &served {
        *by.entry(r.clone().expect("no call fails")).or_default() += 1;
    }
    assert_eq!(by.values().sum::<usize>(), 60, "{by:?}");
    assert_eq!(
        journal.max_in_flight(1),
        1,
        "backend-1 never holds 2: {by:?}"
    );
    assert!(
        journal.served(1) > served_before,
        "backend-1 still serves: {by:?}"
    );
    assert!(journal.max_in_flight(2) > 1 || journal.max_in_flight(3) > 1);
    let st = grpc_stats(&p);
    assert_eq!(st.drops_for(DropReason::BackendsFull), 1, "no new drop");
    let b1 = st.backend(lab.backend(1).ip(), GRPC_PORT).unwrap();
    assert_eq!(b1.limit, Some(1));
}
