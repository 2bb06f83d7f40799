//! Keep-alive (gRFC A8) in the gRPC (L7) mode against a backend that goes
//! silent at the network level: no FIN, no RST, its packets dropped both
//! ways by iptables DROP rules in the BACKEND's namespace (a host that
//! vanished, a partition). Need root; each test prints SKIP and passes
//! otherwise (fails under CI).
//!
//! The proxy runs in the lab's node namespace with keep-alive interval
//! `INTERVAL` and timeout `TIMEOUT`; three `rpclb_tests::grpc` backends;
//! a tonic client calls the VIP over one HTTP/2 connection. `HELD` calls
//! that the backends answer after `HOLD_MS` are in flight on all three when
//! backend 1 is blackholed.
//!
//! Detection time: the calls on backend 1 fail with UNAVAILABLE within
//! `INTERVAL + TIMEOUT + SLACK` (400 + 400 + 700 ms = 1.5 s) of the
//! blackhole: the connection's PING goes out at most `INTERVAL` after the
//! last frame read, and is given `TIMEOUT`; `SLACK` covers timers and a
//! busy 2-CPU machine. Measured: see the test's output and docs/grpc.md
//! ("Failure behaviour"). Without keep-alive (the control), the same calls
//! hang until their deadline.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_agent::userspace::{ProxyOptions, UserspaceProxy};
use lb_api::{Algorithm, Backend, DesiredState, GrpcPolicy, Protocol, Service};
use rpclb_tests::grpc::proto::SimpleRequest;
use rpclb_tests::grpc::proto::test_service_client::TestServiceClient;
use rpclb_tests::grpc::{Journal, SLEEP, TEST_HEADER, block_on_in};
use rpclb_tests::lab::{Lab, Netns};
use rpclb_tests::skip_unless_lab;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const PORT: u16 = 50051;

const INTERVAL: Duration = Duration::from_millis(400);
const TIMEOUT: Duration = Duration::from_millis(400);
const SLACK: Duration = Duration::from_millis(700);
/// The proxy's connect timeout: a call picked for the silent backend after
/// the close waits this long for its connect, then goes to another one.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Calls in flight when the backend goes silent, and how long the backends
/// take to answer them: longer than the detection bound, so that only the
/// keep-alive can end the silent backend's calls in time.
const HELD: usize = 12;
const HOLD_MS: &str = "4000";
/// The deadline of the held calls (`grpc-timeout`): without keep-alive,
/// what ends the silent backend's calls.
const HELD_DEADLINE: Duration = Duration::from_secs(6);
/// Calls after the held ones (all after the detection), 4 in flight.
const LATER: usize = 60;
/// Bound of every call in the test (client side).
const CALL: Duration = Duration::from_secs(10);

fn detection_bound() -> Duration {
    INTERVAL + TIMEOUT + SLACK
}

/// A unary call tagged `x-test-header: tag`, with extra headers and a
/// deadline: the serving backend's name, or the status.
async fn call(
    c: &mut TestServiceClient<Channel>,
    tag: &str,
    headers: &[(&'static str, &'static str)],
    deadline: Option<Duration>,
) -> Result<String, Status> {
    let mut req = Request::new(SimpleRequest::default());
    req.metadata_mut()
        .insert(TEST_HEADER, tag.parse().expect("ascii tag"));
    for (k, v) in headers {
        req.metadata_mut()
            .insert(*k, v.parse().expect("ascii value"));
    }
    if let Some(d) = deadline {
        req.set_timeout(d);
    }
    match tokio::time::timeout(CALL, c.unary_call(req)).await {
        Ok(r) => r.map(|r| r.into_inner().served_by),
        Err(_) => Err(Status::unknown("test: call not answered in time")),
    }
}

/// Drops every packet in and out of `ns` (the rules go with the namespace).
fn blackhole(ns: &Netns) {
    for chain in ["INPUT", "OUTPUT"] {
        ns.exec("iptables", &["-w", "5", "-A", chain, "-j", "DROP"])
            .unwrap_or_else(|e| panic!("iptables DROP on {chain} in {}: {e}", ns.name()));
    }
}

/// One held call: its tag, its result, and when it ended.
type Held = (String, Result<String, Status>, Instant);

struct Outcome {
    /// When the blackhole started (taken before the first rule).
    blackholed_at: Instant,
    /// Tags of the held calls that backend 1 received.
    on_silent: Vec<String>,
    held: Vec<Held>,
    /// The later calls: result and how long each took.
    later: Vec<(Result<String, Status>, Duration)>,
    proxy: UserspaceProxy,
}

/// The scenario, with keep-alive on (`INTERVAL`, `TIMEOUT`) or off, and
/// `n_later` calls after the held ones.
fn blackholed_backend(lab: &Lab, keepalive: bool, n_later: usize) -> Outcome {
    let journal = Arc::new(Journal::default());
    let _servers = rpclb_tests::grpc::start_backends(lab, 3, PORT, &journal);
    let opts = ProxyOptions {
        worker_threads: 2,
        connect_timeout: CONNECT_TIMEOUT,
        grpc_keepalive_interval: if keepalive { INTERVAL } else { Duration::ZERO },
        grpc_keepalive_timeout: TIMEOUT,
        grpc_drain_timeout: Duration::from_secs(2),
        ..ProxyOptions::default()
    };
    let proxy = lab
        .node()
        .run(move || UserspaceProxy::start(opts))
        .expect("node namespace")
        .expect("start the proxy");
    let mut svc = Service::new(
        "lab/keepalive:grpc",
        VIP,
        PORT,
        Protocol::Tcp,
        Algorithm::Maglev,
        lab.backends()
            .iter()
            .map(|h| Backend::new(h.ip(), PORT))
            .collect(),
    );
    svc.grpc = Some(GrpcPolicy::default());
    proxy
        .apply(&DesiredState {
            services: vec![svc],
        })
        .expect("apply");

    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (held, later, blackholed_at, on_silent) = std::thread::scope(|sc| {
        let client = sc.spawn(|| {
            block_on_in(&lab.client().ns, || async move {
                let ch = Endpoint::from_shared(format!("http://{VIP}:{PORT}"))
                    .unwrap()
                    .connect_timeout(CALL)
                    .connect()
                    .await
                    .expect("connect to the VIP");
                let c = TestServiceClient::new(ch);
                // Warm-up: a pooled connection to each backend.
                for k in 0..30 {
                    let r = call(&mut c.clone(), &format!("warm-{k}"), &[], None).await;
                    r.unwrap_or_else(|e| panic!("warm-up call {k}: {e}"));
                }
                let mut set = tokio::task::JoinSet::new();
                for k in 0..HELD {
                    let mut c = c.clone();
                    set.spawn(async move {
                        let tag = format!("held-{k}");
                        let r = call(&mut c, &tag, &[(SLEEP, HOLD_MS)], Some(HELD_DEADLINE)).await;
                        (tag, r, Instant::now())
                    });
                }
                // The main thread blackholes backend 1 once they all arrived.
                let _ = tx.send(());
                let mut held: Vec<Held> = Vec::new();
                while let Some(r) = set.join_next().await {
                    held.push(r.expect("held call task"));
                }
                // Later calls, all started after the held ones ended.
                let mut done = Vec::new();
                let mut set = tokio::task::JoinSet::new();
                for w in 0..4 {
                    let mut c = c.clone();
                    set.spawn(async move {
                        let mut out = Vec::new();
                        for k in (w..n_later).step_by(4) {
                            let t = Instant::now();
                            let r = call(&mut c, &format!("later-{k}"), &[], None).await;
                            out.push((r, t.elapsed()));
                        }
                        out
                    });
                }
                while let Some(r) = set.join_next().await {
                    done.extend(r.expect("later call task"));
                }
                (held, done)
            })
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the held calls were started");
        // Wait until every held call reached its backend.
        let t0 = Instant::now();
        let on = |b: usize| -> Vec<String> {
            journal
                .log()
                .iter()
                .filter(|s| s.backend == b || b == 0)
                .filter_map(|s| s.header(TEST_HEADER).map(str::to_string))
                .filter(|t| t.starts_with("held-"))
                .collect()
        };
        while on(0).len() < HELD {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "held calls seen: {:?}",
                on(0)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let on_silent = on(1);
        let at = Instant::now();
        blackhole(&lab.backend(1).ns);
        eprintln!(
            "backend 1 blackholed {:?} after the held calls started, with {} of {HELD} on it",
            at - t0,
            on_silent.len()
        );
        let (held, later) = client.join().expect("client thread");
        (held, later, at, on_silent)
    });
    Outcome {
        blackholed_at,
        on_silent,
        held,
        later,
        proxy,
    }
}

/// Keep-alive on: the silent backend's calls fail with UNAVAILABLE within
/// the detection bound, the others' calls succeed, and every later call
/// succeeds on the other two backends.
#[test]
fn grpc_keepalive_closes_a_blackholed_backend_connection() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let o = blackholed_backend(&lab, true, LATER);
    assert!(
        !o.on_silent.is_empty(),
        "backend 1 got none of the {HELD} held calls"
    );
    let mut detected = Vec::new();
    for (tag, r, ended) in &o.held {
        if o.on_silent.contains(tag) {
            let Err(e) = r else {
                panic!("{tag} on the silent backend succeeded: {r:?}")
            };
            assert_eq!(e.code(), Code::Unavailable, "{tag}: {e:?}");
            assert!(
                *ended > o.blackholed_at,
                "{tag} failed before the blackhole"
            );
            detected.push(*ended - o.blackholed_at);
        } else {
            let by = r
                .as_ref()
                .unwrap_or_else(|e| panic!("{tag} on a live backend: {e}"));
            assert_ne!(by, "backend-1", "{tag}");
        }
    }
    let slowest = detected.iter().max().copied().unwrap_or_default();
    eprintln!(
        "keep-alive {INTERVAL:?} + {TIMEOUT:?}: the {} calls on the silent backend failed \
         (UNAVAILABLE) {:?} .. {slowest:?} after the blackhole (bound {:?})",
        detected.len(),
        detected.iter().min().copied().unwrap_or_default(),
        detection_bound()
    );
    assert!(
        slowest <= detection_bound(),
        "detected after {slowest:?}, bound {:?}",
        detection_bound()
    );

    // Later calls: none fails, none goes to the silent backend; one picked
    // for it waits for a connect (CONNECT_TIMEOUT) and moves on.
    let failed: Vec<_> = o.later.iter().filter(|(r, _)| r.is_err()).collect();
    assert!(failed.is_empty(), "later calls failed: {failed:?}");
    assert_eq!(o.later.len(), LATER);
    for (r, _) in &o.later {
        assert_ne!(r.as_ref().unwrap(), "backend-1");
    }
    let longest = o.later.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let s = o
        .proxy
        .stats()
        .into_iter()
        .find(|s| s.addr.vip == VIP)
        .expect("stats");
    let b1 = &s.backends[0];
    eprintln!(
        "{LATER} later calls: 0 failed, longest {longest:?}; backend 1: {} connect failures, \
         {} connections opened",
        b1.connect_failures, b1.new_connections
    );
    assert!(
        longest < CONNECT_TIMEOUT * 3 + Duration::from_secs(1),
        "{longest:?}"
    );
    assert_eq!(s.new_connections, 1, "one client connection");
    o.proxy.shutdown().unwrap();
}

/// The control: without keep-alive, the silent backend's calls are not
/// ended within the detection bound (they wait for their deadline).
#[test]
fn grpc_without_keepalive_a_blackholed_backend_holds_its_calls() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let o = blackholed_backend(&lab, false, 0);
    assert!(!o.on_silent.is_empty());
    for (tag, r, ended) in &o.held {
        if o.on_silent.contains(tag) {
            let took = *ended - o.blackholed_at;
            eprintln!("{tag} on the silent backend: {took:?}, {r:?}");
            assert!(r.is_err(), "{tag}");
            assert!(took > detection_bound(), "{tag} ended after {took:?}");
        }
    }
    o.proxy.shutdown().unwrap();
}
