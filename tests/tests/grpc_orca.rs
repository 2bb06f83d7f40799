//! Lab tests of the gRPC mode's load-aware balancing and retry pushback:
//! the userspace proxy in the lab's node namespace, `grpc.testing`
//! backends (`rpclb_tests::grpc`) in the backend namespaces, a tonic
//! client over one connection in the client namespace. Need root; each
//! test prints SKIP and passes otherwise (fails under CI).
//!
//! - `balancing: orca_wrr` (gRFC A51/A58): backends put ORCA load reports
//!   (`endpoint-load-metrics-bin`) in their trailers; the spread of the
//!   calls must follow A58's weights, `qps / utilization`.
//! - The fallback: backends that report nothing get the mean weight while
//!   two others report; with fewer than two reporting, the pick is P2C
//!   least outstanding, which also keeps calls off a slow backend.
//! - Server pushback (gRFC A6 `grpc-retry-pushback-ms`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use lb_agent::userspace::UserspaceProxy;
use lb_api::{
    Algorithm, Backend, Balancing, DesiredState, GrpcPolicy, OrcaWrr, Protocol, RetryPolicy,
    Service,
};
use rpclb_tests::grpc::proto::SimpleRequest;
use rpclb_tests::grpc::proto::test_service_client::TestServiceClient;
use rpclb_tests::grpc::{
    GrpcServer, Journal, TEST_HEADER, TestBackend, block_on_in, connect, orca_report, start_proxy,
};
use rpclb_tests::lab::Lab;
use rpclb_tests::skip_unless_lab;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);
const PORT: u16 = 50051;
const BACKEND_PORT: u16 = 50051;
/// Bound of every single call.
const CALL: Duration = Duration::from_secs(5);
/// The qps every reporting backend claims: equal, so that the weights
/// differ by utilization only.
const QPS: f64 = 100.0;

/// Three backends `backend-1..3`, each with its handles.
struct Backends {
    journal: Arc<Journal>,
    backends: Vec<TestBackend>,
    _servers: Vec<GrpcServer>,
}

impl Backends {
    fn start(lab: &Lab) -> Backends {
        let journal = Arc::new(Journal::default());
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for i in 1..=lab.backends().len() {
            let b = TestBackend::new(i, format!("backend-{i}"), journal.clone());
            let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT));
            servers.push(
                GrpcServer::start(&lab.backend(i).ns, any, b.clone(), Duration::ZERO)
                    .expect("gRPC backend"),
            );
            backends.push(b);
        }
        Backends {
            journal,
            backends,
            _servers: servers,
        }
    }

    /// Backend `i` (1-based) adds `name: value` to its trailers.
    fn trailer(&self, i: usize, name: &'static str, value: &str) {
        let t = self.backends[i - 1].trailers();
        t.lock()
            .unwrap()
            .insert(name, value.parse().expect("header value"));
    }

    /// Backend `i` reports this load (ORCA, binary) in every answer.
    fn report(&self, i: usize, cpu: f64, application: f64) {
        let t = self.backends[i - 1].trailers();
        t.lock().unwrap().insert(
            "endpoint-load-metrics-bin",
            orca_report(cpu, application, QPS, 0.0),
        );
    }

    fn clear_trailers(&self, i: usize) {
        self.backends[i - 1].trailers().lock().unwrap().clear();
    }
}

fn orca_wrr() -> Balancing {
    Balancing::OrcaWrr(OrcaWrr {
        blackout_period: Duration::from_millis(300),
        weight_update_period: Duration::from_millis(100),
        ..OrcaWrr::default()
    })
}

fn service(lab: &Lab, n: usize, grpc: GrpcPolicy) -> DesiredState {
    let backends = lab.backends()[..n]
        .iter()
        .map(|h| Backend::new(h.ip(), BACKEND_PORT))
        .collect();
    let mut s = Service::new(
        "lab/orca:grpc",
        VIP,
        PORT,
        Protocol::Tcp,
        Algorithm::Maglev,
        backends,
    );
    s.grpc = Some(grpc);
    DesiredState { services: vec![s] }
}

fn balancing(b: Balancing) -> GrpcPolicy {
    GrpcPolicy {
        balancing: b,
        ..GrpcPolicy::default()
    }
}

/// A unary call tagged `tag`, bounded by [`CALL`].
async fn unary(c: &mut TestServiceClient<Channel>, tag: &str) -> Result<String, Status> {
    let mut req = Request::new(SimpleRequest::default());
    req.metadata_mut()
        .insert(TEST_HEADER, tag.parse().expect("tag"));
    match tokio::time::timeout(CALL, c.unary_call(req)).await {
        Ok(r) => r.map(|r| r.into_inner().served_by),
        Err(_) => Err(Status::unknown("test: call not answered in time")),
    }
}

/// `n` calls, `width` at a time, over clones of one channel; all must
/// succeed. Calls per backend name.
async fn spread(c: &TestServiceClient<Channel>, n: usize, width: usize) -> BTreeMap<String, usize> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..width {
        let mut c = c.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            for k in (w..n).step_by(width) {
                let b = unary(&mut c, &format!("call-{k}"))
                    .await
                    .unwrap_or_else(|e| panic!("call {k}: {e}"));
                out.push(b);
            }
            out
        });
    }
    let mut by = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        for b in r.expect("caller task") {
            *by.entry(b).or_default() += 1;
        }
    }
    assert_eq!(by.values().sum::<usize>(), n);
    by
}

fn count(by: &BTreeMap<String, usize>, i: usize) -> f64 {
    by.get(&format!("backend-{i}")).copied().unwrap_or(0) as f64
}

fn apply(p: &UserspaceProxy, s: &DesiredState) {
    p.apply(s).expect("apply");
}

/// gRFC A58's weight at equal qps: `qps / utilization`.
fn a58_weight(utilization: f64) -> f64 {
    QPS / utilization
}

/// 0.9 / 0.3 / 0.3 utilization at equal qps: A58's weights are 1 : 3 : 3,
/// so the loaded backend gets a third of the calls of each other one (P2C
/// would give all three about the same).
#[test]
fn orca_wrr_sends_fewer_calls_to_the_loaded_backend() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let be = Backends::start(&lab);
    // Backend 1: CPU 0.9. Backend 2: CPU 0.95 but application 0.3, which
    // A58 takes first. Backend 3: CPU 0.3.
    be.report(1, 0.9, 0.0);
    be.report(2, 0.95, 0.3);
    be.report(3, 0.3, 0.0);
    let p = start_proxy(&lab, |_| {});
    apply(&p, &service(&lab, 3, balancing(Balancing::P2c)));
    // P2C ignores the reports (which are read all the same).
    let p2c = block_on_in(&lab.client().ns, || async {
        spread(&connect(VIP, PORT).await, 300, 6).await
    });
    // The same backends under orca_wrr: the weights count after the
    // blackout (300 ms from the first reports, long past) from the next
    // update (100 ms).
    apply(&p, &service(&lab, 3, balancing(orca_wrr())));
    let wrr = block_on_in(&lab.client().ns, || async {
        let c = connect(VIP, PORT).await;
        spread(&c, 30, 3).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        spread(&c, 700, 6).await
    });
    println!("p2c: {p2c:?}; orca_wrr: {wrr:?}");
    let expected = a58_weight(0.9) / a58_weight(0.3);
    assert!((expected - 1.0 / 3.0).abs() < 1e-9);
    let ratio = |by: &BTreeMap<String, usize>| count(by, 1) / ((count(by, 2) + count(by, 3)) / 2.0);
    // P2C: about even.
    assert!(ratio(&p2c) > 0.6, "p2c: {p2c:?}");
    // orca_wrr: the EDF scheduler gives exactly 1 : 3 : 3 per 7 picks;
    // allow for the picks around the rebuilds.
    let r = ratio(&wrr);
    assert!(
        (expected * 0.75..=expected * 1.25).contains(&r),
        "loaded / others = {r:.3}, expected {expected:.3}: {wrr:?}"
    );
    let (b2, b3) = (count(&wrr, 2), count(&wrr, 3));
    assert!((0.85..=1.15).contains(&(b2 / b3)), "{wrr:?}");
    // 700 calls: 100 / 300 / 300 expected.
    assert!((80.0..=120.0).contains(&count(&wrr, 1)), "{wrr:?}");
}

/// A backend that reports nothing among two that do gets the mean of their
/// weights (A58): weights 111 (0.9), 333 (0.3) and 222 for the silent one,
/// so 1/6, 1/2 and 1/3 of the calls. When it is the only one reporting, the
/// report is not used: P2C (about even here).
#[test]
fn orca_wrr_gives_a_silent_backend_the_mean_weight() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let be = Backends::start(&lab);
    be.report(1, 0.9, 0.0);
    be.report(2, 0.3, 0.0);
    let p = start_proxy(&lab, |_| {});
    apply(&p, &service(&lab, 3, balancing(orca_wrr())));
    let mixed = block_on_in(&lab.client().ns, || async {
        let c = connect(VIP, PORT).await;
        spread(&c, 30, 3).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        spread(&c, 600, 6).await
    });
    // Only backend 1 reports from now on; backend 2's weight expires (after
    // 1 s here).
    be.clear_trailers(2);
    let Balancing::OrcaWrr(w) = orca_wrr() else {
        unreachable!()
    };
    let short = Balancing::OrcaWrr(OrcaWrr {
        weight_expiration_period: Duration::from_secs(1),
        ..w
    });
    apply(&p, &service(&lab, 3, balancing(short)));
    std::thread::sleep(Duration::from_millis(1200));
    let one = block_on_in(&lab.client().ns, || async {
        spread(&connect(VIP, PORT).await, 300, 6).await
    });
    println!("mixed: {mixed:?}; one reporting: {one:?}");
    let (w1, w2) = (a58_weight(0.9), a58_weight(0.3));
    let w3 = (w1 + w2) / 2.0;
    let total = w1 + w2 + w3;
    for (i, w) in [(1, w1), (2, w2), (3, w3)] {
        let want = 600.0 * w / total;
        let got = count(&mixed, i);
        assert!(
            (want * 0.8..=want * 1.2).contains(&got),
            "backend-{i}: {got} calls, expected {want:.0}: {mixed:?}"
        );
    }
    // One report: P2C, about a third each (backend 1's 0.9 is not used).
    // P2C keeps calls off a backend that is slow for a while, as one is on
    // a busy machine (70 of 300 was seen at load 11, against a bound of 60
    // here before), so the bounds are set against what a defect gives:
    // backend 2's expired weight still in use gives 50 : 150 : 100
    // (backend 2 three times backend 1; seen so with the expiry taken out),
    // and the calls going to one backend fail the bounds of each.
    let (o1, o2) = (count(&one, 1), count(&one, 2));
    assert!(o2 < 2.0 * o1, "backend 2's expired weight in use? {one:?}");
    for i in 1..=3 {
        let got = count(&one, i);
        assert!((30.0..=150.0).contains(&got), "backend-{i}: {one:?}");
    }
}

/// One backend 10x slower than the others and no load reports: P2C least
/// outstanding keeps most calls off it, under `p2c` and under `orca_wrr`
/// alike (no reports: its fallback is P2C, not round-robin, which would
/// give it a third). With outstanding calls evened out, a backend's share
/// would follow its speed (1/10 of a fast one's); P2C only compares two at
/// a time and the proxy's own per-call time adds to every backend's, so
/// the bound is half of a fast one's (measured: about 0.2-0.3).
#[test]
fn slow_backend_gets_fewer_calls_without_reports() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let be = Backends::start(&lab);
    be.backends[0].slowness().store(100, Relaxed);
    be.backends[1].slowness().store(10, Relaxed);
    be.backends[2].slowness().store(10, Relaxed);
    let p = start_proxy(&lab, |_| {});
    let mut runs = Vec::new();
    for b in [Balancing::P2c, orca_wrr()] {
        apply(&p, &service(&lab, 3, balancing(b)));
        let by = block_on_in(&lab.client().ns, || async {
            let c = connect(VIP, PORT).await;
            spread(&c, 450, 12).await
        });
        println!("{}: {by:?}", b.name());
        runs.push((b, by));
    }
    for (b, by) in &runs {
        let ratio = count(by, 1) / ((count(by, 2) + count(by, 3)) / 2.0);
        assert!(
            ratio < 0.5,
            "{}: slow / fast = {ratio:.2} (even: 1, by speed: 0.1): {by:?}",
            b.name()
        );
    }
}

/// Calls per call tag: (attempt number from `grpc-previous-rpc-attempts`,
/// when the backend got it), in arrival order.
fn attempts(j: &Journal) -> BTreeMap<String, Vec<(u32, std::time::Instant)>> {
    let mut by: BTreeMap<String, Vec<(u32, std::time::Instant)>> = BTreeMap::new();
    for s in j.log() {
        let prev = s
            .header("grpc-previous-rpc-attempts")
            .map_or(0, |v| v.parse().expect("attempts"));
        by.entry(s.header(TEST_HEADER).unwrap_or_default().to_string())
            .or_default()
            .push((prev, s.at));
    }
    by
}

/// gRFC A6 pushback: one backend answering UNAVAILABLE, a retry policy of
/// 3 attempts with a 1 ms backoff. With `grpc-retry-pushback-ms: 300`
/// each retry comes 300 ms after the answer before it (not within 1 ms);
/// with `-1` or a malformed value there is no retry, and the client gets
/// the backend's status.
#[test]
fn retry_pushback_sets_the_wait_or_stops_retries() {
    skip_unless_lab!();
    let lab = Lab::new(1).expect("lab");
    let be = Backends::start(&lab);
    be.backends[0]
        .failing()
        .store(Code::Unavailable as i32, Relaxed);
    let retry = RetryPolicy {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
        ..RetryPolicy::new(3)
    };
    let p = start_proxy(&lab, |_| {});
    apply(
        &p,
        &service(
            &lab,
            1,
            GrpcPolicy {
                retry: Some(retry),
                ..GrpcPolicy::default()
            },
        ),
    );
    let call = |tag: &'static str| {
        block_on_in(&lab.client().ns, move || async move {
            let mut c = connect(VIP, PORT).await;
            let t0 = std::time::Instant::now();
            let r = unary(&mut c, tag).await;
            (r, t0.elapsed())
        })
    };
    let unavailable = |r: &Result<String, Status>| {
        let e = r.as_ref().expect_err("the backend fails every call");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("backend-1 fails every call"), "{e:?}");
    };
    let pushback = "grpc-retry-pushback-ms";

    // No pushback: three attempts within milliseconds.
    let (r, took) = call("plain");
    unavailable(&r);
    // Pushback 300 ms: three attempts, each retry 300 ms after the last.
    be.trailer(1, pushback, "300");
    let (r, took_pushed) = call("pushed");
    unavailable(&r);
    // Negative, or malformed: one attempt.
    be.trailer(1, pushback, "-1");
    let (r, took_stop) = call("stop");
    unavailable(&r);
    be.trailer(1, pushback, "soon");
    let (r, _) = call("malformed");
    unavailable(&r);
    be.clear_trailers(1);

    let by = attempts(&be.journal);
    println!("plain {took:?}, pushed {took_pushed:?}, stop {took_stop:?}");
    let nums = |tag: &str| by[tag].iter().map(|a| a.0).collect::<Vec<_>>();
    assert_eq!(nums("plain"), [0, 1, 2]);
    assert_eq!(nums("pushed"), [0, 1, 2]);
    assert_eq!(nums("stop"), [0], "pushback -1: no retry");
    assert_eq!(nums("malformed"), [0], "a malformed pushback: no retry");
    let gaps = |tag: &str| {
        by[tag]
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .collect::<Vec<_>>()
    };
    for g in gaps("pushed") {
        assert!(
            g >= Duration::from_millis(300) && g < Duration::from_millis(1000),
            "retry after pushback 300 ms came {g:?} later"
        );
    }
    for g in gaps("plain") {
        assert!(g < Duration::from_millis(250), "1 ms backoff: {g:?}");
    }
    assert!(took_pushed >= Duration::from_millis(600), "{took_pushed:?}");
}
