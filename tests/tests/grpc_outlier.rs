//! Lab tests of the gRPC mode's passive outlier ejection, per-call metrics
//! and `lbctl grpc`, with real gRPC traffic: `rpclb_tests::grpc`'s
//! TestService in the three backend namespaces (one or two of them set to
//! answer UNAVAILABLE to every unary call), a tonic client in the client
//! namespace, one HTTP/2 connection to the VIP. The outlier tests run the
//! userspace proxy in the test process (its stats and `/metrics` rendering
//! in-process); the last test runs the real `lb-agent` and `lbctl`. Need
//! root; each test prints SKIP and passes otherwise (fails under CI).
//!
//! Calls are made one after the other unless said otherwise, so the
//! failures of a backend come in a known order.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering::Relaxed};
use std::time::{Duration, Instant};

use lb_agent::metrics::Metrics;
use lb_agent::userspace::{BackendStats, ProxyOptions, ServiceStats, StatsHandle, UserspaceProxy};
use lb_api::{
    Algorithm, Backend, DesiredState, GrpcPolicy, OutlierDetection, Protocol, RetryPolicy, Service,
};
use rpclb_tests::grpc::proto::SimpleRequest;
use rpclb_tests::grpc::proto::test_service_client::TestServiceClient;
use rpclb_tests::grpc::{GrpcServer, HOLD, Journal, TestBackend, block_on_in};
use rpclb_tests::lab::Lab;
use rpclb_tests::procs::{Proc as Agent, Scrape, TestDir, agent_args};
use rpclb_tests::skip_unless_lab;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const PORT: u16 = 50051;
const NAME: &str = "lab/grpc:grpc";
/// Bound of every single call.
const CALL: Duration = Duration::from_secs(5);

/// The TestService in every backend namespace, answering `backend-<i>`.
struct Backends {
    journal: Arc<Journal>,
    _servers: Vec<GrpcServer>,
    failing: Vec<Arc<AtomicI32>>,
}

impl Backends {
    fn start(lab: &Lab) -> Backends {
        let journal = Arc::new(Journal::counting());
        let mut failing = Vec::new();
        let servers = (1..=3)
            .map(|i| {
                let b = TestBackend::new(i, format!("backend-{i}"), journal.clone());
                failing.push(b.failing());
                let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT));
                GrpcServer::start(&lab.backend(i).ns, any, b, Duration::ZERO).expect("gRPC backend")
            })
            .collect();
        Backends {
            journal,
            _servers: servers,
            failing,
        }
    }

    /// Backend `i` (1-based) answers every unary call UNAVAILABLE.
    fn fail(&self, i: usize) {
        self.failing[i - 1].store(Code::Unavailable as i32, Relaxed);
    }

    /// Calls backend `i` got.
    fn served(&self, i: usize) -> u64 {
        self.journal.served(i)
    }
}

fn service(lab: &Lab, od: Option<OutlierDetection>, retry: Option<RetryPolicy>) -> Service {
    let backends = lab
        .backends()
        .iter()
        .map(|h| Backend::new(h.ip(), PORT))
        .collect();
    let mut s = Service::new(NAME, VIP, PORT, Protocol::Tcp, Algorithm::Maglev, backends);
    s.grpc = Some(GrpcPolicy {
        outlier_detection: od,
        retry,
        ..GrpcPolicy::default()
    });
    s
}

/// The proxy in the node namespace, serving `svc`.
fn proxy(lab: &Lab, svc: &Service) -> UserspaceProxy {
    let opts = ProxyOptions {
        worker_threads: 2,
        ..ProxyOptions::default()
    };
    let p = lab
        .node()
        .run(move || UserspaceProxy::start(opts))
        .expect("node namespace")
        .expect("start the proxy");
    p.apply(&DesiredState {
        services: vec![svc.clone()],
    })
    .expect("apply");
    p
}

fn od(consecutive: u32, base: Duration, max: Duration, percent: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_failures: consecutive,
        base_ejection_time: base,
        max_ejection_time: max,
        max_ejection_percent: percent,
    }
}

fn stats(h: &StatsHandle) -> ServiceStats {
    h.stats()
        .into_iter()
        .find(|s| s.name == NAME)
        .expect("the service's stats")
}

fn backend<'a>(s: &'a ServiceStats, lab: &Lab, i: usize) -> &'a BackendStats {
    s.backend(lab.backend(i).ip(), PORT).expect("backend stats")
}

async fn channel() -> TestServiceClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{VIP}:{PORT}"))
        .unwrap()
        .connect_timeout(CALL)
        .connect()
        .await
        .expect("connect to the VIP");
    TestServiceClient::new(ch)
}

/// One unary call: the serving backend, or the status code.
async fn call(c: &mut TestServiceClient<Channel>) -> Result<String, Code> {
    match tokio::time::timeout(CALL, c.unary_call(SimpleRequest::default())).await {
        Ok(Ok(r)) => Ok(r.into_inner().served_by),
        Ok(Err(s)) => Err(s.code()),
        Err(_) => panic!("a call got no answer in {CALL:?}"),
    }
}

/// Calls one after the other until `done` (at most `max` calls); the
/// calls made.
async fn calls_until(
    c: &mut TestServiceClient<Channel>,
    max: usize,
    done: impl Fn() -> bool,
) -> usize {
    for n in 1..=max {
        let _ = call(c).await;
        if done() {
            return n;
        }
    }
    panic!("not done after {max} calls");
}

/// One backend of three answers UNAVAILABLE to every call: after 3 in a
/// row it gets no call for its ejection time (2 s; the test calls for
/// 1.5 s of it), then it gets calls again; its second ejection lasts twice
/// as long.
#[test]
fn consecutive_failures_eject_a_backend_for_a_growing_time() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let bs = Backends::start(&lab);
    bs.fail(1);
    let base = Duration::from_secs(2);
    let svc = service(&lab, Some(od(3, base, Duration::from_secs(10), 50)), None);
    let p = proxy(&lab, &svc);
    let h = p.stats_handle();
    let (bs, lab) = (&bs, &lab);
    block_on_in(&lab.client().ns, || async move {
        let mut c = channel().await;
        // Until its third failure (every call it gets fails).
        calls_until(&mut c, 200, || bs.served(1) == 3).await;
        let ejected_at = Instant::now();
        let s = stats(&h);
        let b1 = backend(&s, lab, 1);
        assert_eq!(b1.ejections, 1, "{b1:?}");
        assert!(b1.ejected_for_ms > 0 && b1.ejected_for_ms <= 2000, "{b1:?}");
        // For 1.5 s of its 2 s: every call succeeds, none reaches it.
        let mut during = 0;
        while ejected_at.elapsed() < Duration::from_millis(1500) && during < 5000 {
            let r = call(&mut c).await;
            assert!(r.is_ok(), "call {during} while ejected: {r:?}");
            during += 1;
        }
        assert!(during >= 10, "only {during} calls in 1.5 s");
        assert_eq!(bs.served(1), 3, "an ejected backend got calls");
        // Back after its time: it gets calls (and fails them) again.
        tokio::time::sleep(
            (base + Duration::from_millis(200)).saturating_sub(ejected_at.elapsed()),
        )
        .await;
        let s = stats(&h);
        assert_eq!(backend(&s, lab, 1).ejected_for_ms, 0);
        calls_until(&mut c, 300, || bs.served(1) == 4).await;
        // Three more in a row: ejected again, for 2 x 2 s.
        calls_until(&mut c, 300, || bs.served(1) == 6).await;
        let s = stats(&h);
        let b1 = backend(&s, lab, 1);
        assert_eq!(b1.ejections, 2, "{b1:?}");
        assert!(
            b1.ejected_for_ms > 2000 && b1.ejected_for_ms <= 4000,
            "second ejection: {b1:?}"
        );
        eprintln!(
            "ejected after 3 failures; {during} calls in the first 1.5 s of 2 s, none on it; \
             back after 2 s; second ejection {} ms left",
            b1.ejected_for_ms
        );
    });
}

/// Two backends of three fail every call, and at most 50% may be ejected:
/// one is (after its 2 failures), the other keeps getting calls.
#[test]
fn no_more_than_the_share_is_ejected() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let bs = Backends::start(&lab);
    bs.fail(1);
    bs.fail(2);
    let t = Duration::from_secs(30);
    let svc = service(&lab, Some(od(2, t, t, 50)), None);
    let p = proxy(&lab, &svc);
    let h = p.stats_handle();
    let bs = &bs;
    let failed = block_on_in(&lab.client().ns, || async move {
        let mut c = channel().await;
        let mut failed = 0;
        for _ in 0..90 {
            if call(&mut c).await.is_err() {
                failed += 1;
            }
        }
        failed
    });
    let s = stats(&h);
    let (b1, b2) = (backend(&s, &lab, 1), backend(&s, &lab, 2));
    assert_eq!(b1.ejections + b2.ejections, 1, "{b1:?}\n{b2:?}");
    let (out, kept, out_i, kept_i) = if b1.ejections == 1 {
        (b1, b2, 1, 2)
    } else {
        (b2, b1, 2, 1)
    };
    assert!(out.ejected_for_ms > 0 && kept.ejected_for_ms == 0);
    // The ejected one failed exactly its 2; the other went on failing.
    assert_eq!(bs.served(out_i), 2);
    assert!(bs.served(kept_i) >= 10, "kept: {}", bs.served(kept_i));
    assert!(kept.consecutive_failures >= 2, "{kept:?}");
    assert_eq!(failed, bs.served(1) + bs.served(2));
    assert_eq!(bs.served(1) + bs.served(2) + bs.served(3), 90);
    eprintln!(
        "2 of 3 failing, max 50%: backend-{out_i} ejected after 2 failures, backend-{kept_i} \
         kept ({} calls, all failed), backend-3 {} calls",
        bs.served(kept_i),
        bs.served(3)
    );
}

/// A retry policy with ejection: one backend of three fails every call;
/// 150 calls, 3 in flight: none fails, the bad backend gets its 3 failures
/// (plus at most the 2 other calls in flight) and then no more, and
/// /metrics counts every call by status with a matching histogram.
#[test]
fn retries_and_ejection_keep_failures_at_zero_and_metrics_count_them() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let bs = Backends::start(&lab);
    bs.fail(1);
    let t = Duration::from_secs(30);
    let retry = RetryPolicy {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..RetryPolicy::new(3)
    };
    let svc = service(&lab, Some(od(3, t, t, 50)), Some(retry));
    let p = proxy(&lab, &svc);
    let h = p.stats_handle();
    let failed = block_on_in(&lab.client().ns, || async move {
        let c = channel().await;
        let mut set = tokio::task::JoinSet::new();
        for w in 0..3 {
            let mut c = c.clone();
            set.spawn(async move {
                let mut failed = 0;
                for _ in (w..150).step_by(3) {
                    if call(&mut c).await.is_err() {
                        failed += 1;
                    }
                }
                failed
            });
        }
        let mut failed = 0;
        while let Some(r) = set.join_next().await {
            failed += r.expect("caller");
        }
        failed
    });
    assert_eq!(failed, 0, "client-visible failures");
    let s = stats(&h);
    let b1 = backend(&s, &lab, 1);
    let bad = bs.served(1);
    assert!((3..=5).contains(&bad), "the bad backend got {bad} calls");
    assert_eq!(b1.ejections, 1);
    assert_eq!(b1.retries, bad, "each of its failures was retried");
    assert_eq!(bs.served(2) + bs.served(3), 150);
    eprintln!(
        "retry + ejection: 0 of 150 failed; the bad backend got {bad} calls (without ejection \
         about a third, grpc_l7's retry test)"
    );

    // Per-call metrics: the final statuses (150 OK), the attempts per
    // backend by status, and histograms whose counts match.
    assert_eq!(s.calls.code(0), 150);
    assert_eq!(s.calls.total(), 150);
    assert_eq!(b1.calls.code(14), bad);
    assert_eq!(b1.calls.total(), bad);
    let out = Metrics::new(Box::new(h.clone())).render().expect("render");
    let m = Scrape(out);
    let svc_l = [("service", NAME)];
    assert_eq!(
        m.get(
            "rpclb_service_grpc_calls_total",
            &[("service", NAME), ("code", "OK")]
        ),
        Some(150.0),
        "{}",
        m.0
    );
    assert_eq!(
        m.get("rpclb_service_grpc_call_duration_seconds_count", &svc_l),
        Some(150.0)
    );
    assert_eq!(
        m.get(
            "rpclb_service_grpc_call_duration_seconds_bucket",
            &[("service", NAME), ("le", "+Inf")]
        ),
        Some(150.0)
    );
    for i in 1..=3 {
        let be = format!("{}:{PORT}", lab.backend(i).ip());
        let (code, n) = if i == 1 {
            ("UNAVAILABLE", bad)
        } else {
            ("OK", bs.served(i))
        };
        let l = [("service", NAME), ("backend", be.as_str())];
        assert_eq!(
            m.get(
                "rpclb_backend_grpc_calls_total",
                &[l[0], l[1], ("code", code)]
            ),
            Some(n as f64),
            "backend-{i}\n{}",
            m.0
        );
        assert_eq!(
            m.get("rpclb_backend_grpc_call_duration_seconds_count", &l),
            Some(n as f64)
        );
        assert_eq!(
            m.get("rpclb_backend_grpc_ejections_total", &l),
            Some(f64::from(u8::from(i == 1)))
        );
        assert_eq!(
            m.get("rpclb_backend_grpc_ejected", &l),
            Some(f64::from(u8::from(i == 1)))
        );
    }
}

/// The real agent with a YAML `outlier_detection`: after one backend's 3
/// failures, `/metrics` counts the calls by status with the histogram, and
/// `lbctl grpc` shows the backends: calls in flight (two held calls),
/// errors, the ejection, the rates.
#[test]
fn lbctl_grpc_shows_outstanding_errors_and_ejection() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let bs = Backends::start(&lab);
    bs.fail(1);
    let list: String = lab
        .backends()
        .iter()
        .map(|b| format!("      - {{ ip: {}, port: {PORT} }}\n", b.ip()))
        .collect();
    let dir = TestDir::new("grpc-outlier");
    dir.write_config(&format!(
        "services:\n  - name: {NAME}\n    vip: {VIP}\n    port: {PORT}\n    grpc:\n      \
         outlier_detection: {{ consecutive_failures: 3, base_ejection_time: 60s, max_ejection_percent: 50 }}\n    \
         backends:\n{list}"
    ));
    let mut agent = Agent::start(
        &lab,
        &dir,
        "agent",
        &agent_args(&lab, &dir, &["--datapath", "userspace"]),
    );
    agent.wait_ready();
    let bsr = &bs;
    let (ok, failed) = block_on_in(&lab.client().ns, || async move {
        let mut c = channel().await;
        let n = calls_until(&mut c, 200, || bsr.served(1) == 3).await;
        // Ten more, all on the other two.
        for _ in 0..10 {
            call(&mut c)
                .await
                .expect("a call while backend-1 is ejected");
        }
        ((n + 10 - 3) as f64, 3.0)
    });
    let m = agent.scrape();
    let get = |name: &str, extra: &[(&str, &str)]| {
        let mut l = vec![("service", NAME)];
        l.extend_from_slice(extra);
        m.get(name, &l)
    };
    assert_eq!(
        get("rpclb_service_grpc_calls_total", &[("code", "OK")]),
        Some(ok),
        "{}",
        m.0
    );
    assert_eq!(
        get("rpclb_service_grpc_calls_total", &[("code", "UNAVAILABLE")]),
        Some(failed)
    );
    assert_eq!(
        get("rpclb_service_grpc_call_duration_seconds_count", &[]),
        Some(ok + failed)
    );
    let b1 = format!("{}:{PORT}", lab.backend(1).ip());
    assert_eq!(
        m.get("rpclb_backend_grpc_ejected", &[("backend", b1.as_str())]),
        Some(1.0)
    );

    // Two calls held by the backends: outstanding 2 (on backends 2 and 3).
    let client = lab
        .client()
        .ns
        .spawn("held-calls", || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let c = channel().await;
                let held = (0..2).map(|_| {
                    let mut c = c.clone();
                    async move {
                        let mut r = Request::new(SimpleRequest::default());
                        r.metadata_mut().insert(HOLD, "1".parse().unwrap());
                        tokio::time::timeout(Duration::from_secs(10), c.unary_call(r)).await
                    }
                });
                futures::future::join_all(held).await
            })
        })
        .expect("a thread in the client namespace");
    let lbctl = |args: &[&str]| {
        let bin = rpclb_tests::procs::workspace_bin("lb-agent", "lbctl");
        let bin = bin.display().to_string();
        lab.node()
            .exec(&bin, args)
            .unwrap_or_else(|e| panic!("lbctl {args:?}: {e}"))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let v = loop {
        let v: serde_json::Value = serde_json::from_str(&lbctl(&[
            "-o",
            "json",
            "grpc",
            "lab/grpc",
            "--interval",
            "200ms",
        ]))
        .expect("lbctl grpc JSON");
        let outstanding: u64 = v["services"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| b["outstanding"].as_u64().unwrap())
            .sum();
        if outstanding == 2 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let svc = &v["services"][0];
    assert_eq!(svc["name"], NAME, "{v:#}");
    assert_eq!(svc["active"], 2, "{v:#}");
    assert_eq!(svc["errors"], 3, "{v:#}");
    assert!(svc["rate"].is_number(), "{v:#}");
    assert_eq!(svc["outlier_detection"]["consecutive_failures"], 3);
    let backends = svc["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 3);
    let row = |i: usize| {
        let want = format!("{}:{PORT}", lab.backend(i).ip());
        backends
            .iter()
            .find(|b| b["backend"] == want.as_str())
            .unwrap_or_else(|| panic!("{want} in {v:#}"))
    };
    let r1 = row(1);
    assert_eq!(r1["errors"], 3, "{v:#}");
    assert_eq!(r1["calls"], 3);
    assert_eq!(r1["codes"]["UNAVAILABLE"], 3);
    assert_eq!(r1["ejections"], 1);
    assert!(r1["ejected_for_ms"].as_u64().unwrap() > 50_000, "{v:#}");
    assert_eq!(r1["outstanding"], 0);
    assert_eq!(r1["health"], "unchecked");
    let held: u64 = [2, 3]
        .iter()
        .map(|&i| row(i)["outstanding"].as_u64().unwrap())
        .sum();
    assert_eq!(held, 2, "{v:#}");
    for i in [2, 3] {
        assert_eq!(row(i)["errors"], 0);
        assert_eq!(row(i)["ejections"], 0);
        assert!(row(i)["rate"].is_number());
    }
    // The table: one line for the service, one row per backend.
    let t = lbctl(&["grpc", "--interval", "0"]);
    eprintln!("{t}");
    assert!(
        t.starts_with(&format!("{NAME}  {VIP}:{PORT}/tcp  calls ")),
        "{t}"
    );
    assert!(
        t.contains("active 2  errors 3  outlier ejection: 3 failures, 1m00s..5m00s, max 50%"),
        "{t}"
    );
    let cells = |ip: Ipv4Addr| -> Vec<String> {
        t.lines()
            .find(|l| l.starts_with(&format!("{ip}:{PORT}")))
            .unwrap_or_else(|| panic!("{ip} in\n{t}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let c1 = cells(lab.backend(1).ip());
    // BACKEND STATE HEALTH WEIGHT ACTIVE CALLS RATE ERRORS EJECTED(2) EJECTIONS ...
    assert_eq!(&c1[1..6], ["active", "unchecked", "1", "0", "3"], "{t}");
    assert_eq!(c1[6], "-", "no rate from one read: {t}");
    assert_eq!(c1[7], "3");
    assert_eq!(c1[8], "for");
    assert_eq!(c1[10], "1");
    assert!(
        t.lines().any(|l| l.trim_start().starts_with("BACKEND")),
        "{t}"
    );
    bs.journal.release();
    let held = client.join().expect("held calls");
    assert!(
        held.iter().all(|r| matches!(r, Ok(Ok(_)))),
        "held calls: {held:?}"
    );
}
