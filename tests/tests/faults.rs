//! Faults with real long-lived connections running through them (issue 10): the agent
//! SIGKILLed and restarted, the controller lost while endpoints change, backends churning,
//! and the userspace data path's graceful restart. Every stream checks its bytes end to end
//! (`rpclb_tests::lab::stream`: a counter sequence, echoed, checked on both sides, and a
//! trailer with the server's count).
//!
//! These run in the normal suite with short durations. `cargo xtask soak` sets
//! `RPCLB_SOAK=1`, which runs the same code with the long ones (60 s streams, 30 s of churn
//! under 100 connections). Figures are printed (`--nocapture` shows them).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_api::tls::certs::Bundle;
use rpclb_tests::lab::Lab;
use rpclb_tests::lab::stream::{End, Kill, SeqServer, SeqStream, StreamOpts, StreamReport};
use rpclb_tests::procs::{
    Proc, TestDir, agent_args, agent_tls_args, controller_bin, controller_tls_args, http_get_port,
    wait_until,
};
use rpclb_tests::skip_unless_lab;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 8080;
const WEB: &str = "lab/web:http";

/// `RPCLB_SOAK=1` (set by `cargo xtask soak`): the long versions.
fn soak() -> bool {
    std::env::var_os("RPCLB_SOAK").is_some_and(|v| v == "1")
}

/// `suite` normally, `soak` under `cargo xtask soak`.
fn pick<T>(suite: T, long: T) -> T {
    if soak() { long } else { suite }
}

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn config(lab: &Lab, algo: &str, backends: &[usize]) -> String {
    let mut s = format!(
        "# written by tests/tests/faults.rs\nservices:\n  - name: {WEB}\n    vip: {VIP}\n    \
         port: 80\n    protocol: tcp\n    algorithm: {algo}\n"
    );
    if backends.is_empty() {
        s.push_str("    backends: []\n");
    } else {
        s.push_str("    backends:\n");
        for &i in backends {
            s.push_str(&format!(
                "      - {{ ip: {}, port: {PORT} }}\n",
                lab.backend(i).ip()
            ));
        }
    }
    s
}

/// A checking server in every backend, `backend-<i>`.
fn servers(lab: &Lab) -> Vec<SeqServer> {
    (1..=lab.backends().len()).map(|i| server(lab, i)).collect()
}

fn server(lab: &Lab, i: usize) -> SeqServer {
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT);
    SeqServer::start(&lab.backend(i).ns, any, &format!("backend-{i}")).expect("backend server")
}

fn index_of(backend: &str) -> usize {
    backend
        .trim_start_matches("backend-")
        .parse()
        .unwrap_or_else(|_| panic!("not backend-<i>: {backend:?}"))
}

fn stream(lab: &Lab, duration: Duration) -> SeqStream {
    let opts = StreamOpts {
        duration,
        ..StreamOpts::default()
    };
    SeqStream::start(&lab.client().ns, vip(), opts).expect("stream through the VIP")
}

/// A short stream through the VIP right now: it must complete; its backend.
fn probe(lab: &Lab) -> String {
    let r = stream(lab, Duration::from_millis(100)).join();
    assert_eq!(r.end, End::Completed, "a new connection: {r:?}");
    r.backend
}

/// The backends new connections reach, by index, from `n` probes.
fn spread(lab: &Lab, n: usize) -> BTreeMap<usize, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        *m.entry(index_of(&probe(lab))).or_default() += 1;
    }
    m
}

/// The streams of the fault tests run until [`finish_all`] ends them, so that each runs
/// through every fault however long a slow machine takes over one; this bounds them only
/// if a test dies first.
const UNTIL_FINISHED: Duration = Duration::from_secs(600);

/// A stream through the VIP that runs until [`finish_all`].
fn open_stream(lab: &Lab) -> SeqStream {
    stream(lab, UNTIL_FINISHED)
}

/// Bytes sent so far by the streams.
fn total_sent(streams: &[SeqStream]) -> u64 {
    streams.iter().map(SeqStream::sent).sum()
}

/// Fails the test with the report of a stream that ended (none may before [`finish_all`]).
fn all_running(streams: &mut Vec<SeqStream>, when: &str) {
    if let Some(i) = streams.iter().position(SeqStream::is_finished) {
        let r = streams.remove(i).join();
        panic!("a stream ended early, at {when}: {r:?}");
    }
}

/// After a fault: the streams' bytes move again (each writes every 10 ms; a lost packet
/// waits for a retransmission).
fn streams_move(streams: &mut Vec<SeqStream>, sent: u64, when: &str) {
    wait_until(
        &format!("streams moving after {when}"),
        Duration::from_secs(10),
        || {
            all_running(streams, when);
            total_sent(streams) > sent
        },
    );
}

/// Ends every stream (half-close, the server's trailer) and collects the reports.
fn finish_all(streams: Vec<SeqStream>) -> Vec<StreamReport> {
    for s in &streams {
        s.finish();
    }
    streams.into_iter().map(SeqStream::join).collect()
}

/// Every server's records: no byte out of sequence anywhere; the bytes received in all.
fn server_check(servers: &[&SeqServer]) -> u64 {
    let mut total = 0;
    for s in servers {
        for c in s.done() {
            if let Some(e) = &c.error {
                assert!(!e.starts_with("byte "), "{} from {}: {e}", s.addr(), c.peer);
            }
            total += c.received;
        }
    }
    total
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---- 1. the agent SIGKILLed and restarted ----

/// The agent is SIGKILLed and restarted three times while streams run through the eBPF data
/// path: no stream breaks, and every byte arrives once, in order, both ways. New connections
/// work while the agent is down, and streams opened by each generation survive the next kill.
#[test]
fn agent_sigkill_restarts_lose_no_byte() {
    skip_unless_lab!();
    let gap = pick(Duration::from_secs(3), Duration::from_secs(15));
    let n = pick(6, 24);
    let lab = Lab::new(3).expect("lab");
    let srv = servers(&lab);
    let dir = TestDir::new("faults-kill");
    dir.write_config(&config(&lab, "maglev", &[1, 2, 3]));
    let args = agent_args(&lab, &dir, &["--gc-interval", "1s"]);
    let mut agent = Proc::start(&lab, &dir, "agent0", &args);
    agent.wait_ready();

    let start = Instant::now();
    let mut streams: Vec<SeqStream> = (0..n).map(|_| open_stream(&lab)).collect();
    let mut restarts = Vec::new();
    for k in 1..=3u32 {
        std::thread::sleep(gap);
        let sent = total_sent(&streams);
        agent.kill9();
        // While it is down: a new connection is balanced and its bytes come back.
        probe(&lab);
        let t = Instant::now();
        agent = Proc::start(&lab, &dir, &format!("agent{k}"), &args);
        agent.wait_ready();
        restarts.push(t.elapsed());
        streams_move(&mut streams, sent, &format!("kill {k}"));
        // A stream of this generation, to survive the next kills.
        streams.push(open_stream(&lab));
        assert!(agent.log().contains("reused=true"), "{}", agent.log());
    }
    std::thread::sleep(gap);
    all_running(&mut streams, "the end");
    let total = start.elapsed();
    let reports = finish_all(streams);
    let mut bytes = 0;
    for r in &reports {
        assert_eq!(r.end, End::Completed, "{r:?}");
        assert_eq!(r.sent, r.echoed, "{r:?}");
        bytes += r.sent;
    }
    let by_backend: BTreeSet<&str> = reports.iter().map(|r| r.backend.as_str()).collect();
    let refs: Vec<&SeqServer> = srv.iter().collect();
    // The probes count too: each sent and got its bytes back.
    assert!(server_check(&refs) >= bytes);
    println!(
        "agent SIGKILL x3 over {total:?}: {} streams ({} opened mid-test) on {by_backend:?}, \
         {:.1} MiB each way checked, restart-to-ready {restarts:?}",
        reports.len(),
        3,
        mib(bytes)
    );
    agent.check_alive();
}

// ---- 3. the controller lost while endpoints change ----

const CONTROLLER_GRPC: u16 = 50551;
const CONTROLLER_METRICS: u16 = 9465;

/// `lb-controller --config` (standalone) in the node namespace, mutual TLS.
fn start_controller(lab: &Lab, dir: &TestDir, certs: &Bundle, name: &str) -> Proc {
    let mut args: Vec<String> = [
        "--config",
        &dir.config().display().to_string(),
        "--listen",
        &format!("127.0.0.1:{CONTROLLER_GRPC}"),
        "--metrics-addr",
        &format!("127.0.0.1:{CONTROLLER_METRICS}"),
        "--config-poll-ms",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(controller_tls_args(certs));
    let mut c = Proc::spawn(lab, dir, name, controller_bin(), &args);
    wait_until("the controller's /readyz", Duration::from_secs(30), || {
        c.check_alive();
        matches!(
            http_get_port(c.node.as_deref(), CONTROLLER_METRICS, "/readyz"),
            Ok((200, _))
        )
    });
    c
}

fn published_version(c: &mut Proc) -> f64 {
    c.check_alive();
    let (status, body) = http_get_port(c.node.as_deref(), CONTROLLER_METRICS, "/metrics")
        .unwrap_or_else(|e| panic!("controller /metrics: {e}\n{}", c.log()));
    assert_eq!(status, 200, "{body}");
    rpclb_tests::procs::Scrape(body)
        .get("rpclb_controller_published_version", &[])
        .expect("published version")
}

/// The agent follows the controller (node-a, mutual TLS) instead of a file.
fn agent_controller_args(lab: &Lab, dir: &TestDir, certs: &Bundle) -> Vec<String> {
    let mut a = agent_args(lab, dir, &[]);
    let i = a.iter().position(|x| x == "--config").expect("--config");
    a.drain(i..i + 2);
    a.extend(
        [
            "--controller",
            &format!("https://127.0.0.1:{CONTROLLER_GRPC}"),
            "--node-name",
            "node-a",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    a.extend(agent_tls_args(certs, "node-a"));
    a
}

/// Waits until new connections reach exactly `want`; how long that took.
fn converge(lab: &Lab, want: &[usize], within: Duration) -> Duration {
    let want: BTreeSet<usize> = want.iter().copied().collect();
    let t = Instant::now();
    let mut last = BTreeMap::new();
    while t.elapsed() < within {
        last = spread(lab, 3 * want.len());
        if last.keys().copied().collect::<BTreeSet<_>>() == want {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("new connections never reached exactly {want:?}; last spread {last:?}");
}

/// The controller is SIGKILLed; while it is down one backend is removed and another added;
/// it comes back: the agent keeps its last state meanwhile, converges on the new one after,
/// and no stream to a backend that stays breaks (nor, with conntrack keeping it, the one
/// to the removed backend, whose pod still runs).
#[test]
fn controller_loss_with_endpoint_changes_breaks_no_flow() {
    skip_unless_lab!();
    let gap = pick(Duration::from_secs(3), Duration::from_secs(15));
    let n = pick(9, 30);
    let lab = Lab::new(4).expect("lab");
    let srv = servers(&lab);
    let dir = TestDir::new("faults-controller");
    let certs = dir.certs(&["node-a"]);
    dir.write_config(&config(&lab, "round-robin", &[1, 2, 3]));
    let mut ctl = start_controller(&lab, &dir, &certs, "controller0");
    let mut agent = Proc::start(
        &lab,
        &dir,
        "agent",
        &agent_controller_args(&lab, &dir, &certs),
    );
    agent.wait_ready();
    let v1 = published_version(&mut ctl);
    agent.wait_metric("rpclb_controller_version", v1);

    let start = Instant::now();
    let mut streams: Vec<SeqStream> = (0..n).map(|_| open_stream(&lab)).collect();
    wait_until("every stream's backend", Duration::from_secs(5), || {
        streams.iter().all(|s| !s.backend().is_empty())
    });
    let on: BTreeSet<String> = streams.iter().map(SeqStream::backend).collect();
    assert_eq!(on.len(), 3, "round-robin spreads them: {on:?}");

    std::thread::sleep(gap);
    ctl.kill9();
    agent.wait_metric("rpclb_controller_connected", 0.0);
    // Endpoints change while it is down: backend 3 goes, backend 4 comes.
    dir.write_config(&config(&lab, "round-robin", &[1, 2, 4]));
    // The agent serves its last state meanwhile.
    let c = spread(&lab, 6);
    assert_eq!(
        c.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{c:?}"
    );
    assert_eq!(agent.get("/readyz").0, 200, "still ready");
    std::thread::sleep(gap);
    let sent = total_sent(&streams);

    let t = Instant::now();
    let mut ctl = start_controller(&lab, &dir, &certs, "controller1");
    let v2 = published_version(&mut ctl);
    agent.wait_metric("rpclb_controller_version", v2);
    let applied = t.elapsed();
    let converged = converge(&lab, &[1, 2, 4], Duration::from_secs(10)) + applied;
    streams_move(&mut streams, sent, "the controller's return");
    assert!(
        agent.log().contains("keeping the current state"),
        "{}",
        agent.log()
    );
    std::thread::sleep(gap);
    all_running(&mut streams, "the end");
    let reports = finish_all(streams);
    let mut bytes = 0;
    for r in &reports {
        assert_eq!(r.end, End::Completed, "{r:?}");
        bytes += r.sent;
    }
    let refs: Vec<&SeqServer> = srv.iter().collect();
    assert!(server_check(&refs) >= bytes);
    println!(
        "controller SIGKILL, endpoints {{1,2,3}} -> {{1,2,4}} while down: {} streams over {:?} \
         all complete ({:.1} MiB checked); controller restart to agent applied {applied:?}, \
         to new connections on exactly {{1,2,4}} {converged:?}",
        reports.len(),
        start.elapsed(),
        mib(bytes)
    );
    agent.check_alive();
}

// ---- 4. backend churn ----

/// A backend is removed (its pod dies: every connection closed, half with a FIN, half with a
/// RST) or added back every 200 ms while streams run, each slot reconnecting when its flow
/// ends. Flows to backends that stay never break; flows to a removed one end with a RST or a
/// close, never a hang (a read that waits 5 s is one), and no byte is ever wrong.
#[test]
fn backend_churn_breaks_only_flows_to_removed_backends() {
    skip_unless_lab!();
    let churn_for = pick(Duration::from_secs(8), Duration::from_secs(30));
    let slots = pick(30, 100);
    let stay: Vec<usize> = vec![1, 2, 3];
    let churners: Vec<usize> = vec![4, 5, 6];
    let lab = Lab::new(6).expect("lab");
    let mut srv: BTreeMap<usize, SeqServer> = (1..=6).map(|i| (i, server(&lab, i))).collect();
    let dir = TestDir::new("faults-churn");
    let all: Vec<usize> = (1..=6).collect();
    dir.write_config(&config(&lab, "maglev", &all));
    let args = agent_args(&lab, &dir, &["--config-poll", "10s"]);
    let mut agent = Proc::start(&lab, &dir, "agent", &args);
    agent.wait_ready();

    // Every slot streams until the end, reconnecting after a flow ends.
    let end = Instant::now() + churn_for + Duration::from_secs(1);
    let reports: Arc<Mutex<Vec<StreamReport>>> = Arc::default();
    let client = &lab.client().ns;
    let mut churn = Vec::new();
    let mut dead: Vec<SeqServer> = Vec::new();
    std::thread::scope(|s| {
        for _ in 0..slots {
            let reports = reports.clone();
            s.spawn(move || {
                // Bounded: each flow lasts at least until a RST/close or the deadline, and a
                // failed connect is retried at most 50 times.
                let mut connects_failed = 0;
                while Instant::now() < end && connects_failed < 50 {
                    let opts = StreamOpts {
                        duration: end.saturating_duration_since(Instant::now()),
                        ..StreamOpts::default()
                    };
                    let r = match SeqStream::start(client, vip(), opts) {
                        Ok(st) => st.join(),
                        Err(e) => panic!("stream: {e}"),
                    };
                    if matches!(r.end, End::Connect(_)) {
                        connects_failed += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    reports.lock().unwrap().push(r);
                }
            });
        }
        // Let them all connect before the churn starts.
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        let mut live: BTreeSet<usize> = all.iter().copied().collect();
        let mut k = 0usize;
        let mut removals = 0u32;
        while t0.elapsed() < churn_for {
            let tick = t0 + Duration::from_millis(200) * (k as u32 + 1);
            let b = churners[k % churners.len()];
            if live.remove(&b) {
                // Removed: the config first, then the pod dies.
                let cfg: Vec<usize> = live.iter().copied().collect();
                dir.write_config(&config(&lab, "maglev", &cfg));
                agent.signal(libc::SIGHUP);
                removals += 1;
                let how = if removals % 2 == 1 {
                    Kill::Close
                } else {
                    Kill::Reset
                };
                srv.get_mut(&b).expect("server").kill(how);
                churn.push((t0.elapsed(), b, "removed", Some(how)));
            } else {
                // Added: the pod first, then the config.
                let old = srv.insert(b, server(&lab, b)).expect("server");
                // Keep what the dead server saw.
                dead.push(old);
                live.insert(b);
                let cfg: Vec<usize> = live.iter().copied().collect();
                dir.write_config(&config(&lab, "maglev", &cfg));
                agent.signal(libc::SIGHUP);
                churn.push((t0.elapsed(), b, "added", None));
            }
            k += 1;
            std::thread::sleep(tick.saturating_duration_since(Instant::now()));
        }
    });
    let reports = Arc::try_unwrap(reports).unwrap().into_inner().unwrap();
    // The last state is applied: one more SIGHUP, and its reload. (Signals sent
    // while a reload runs coalesce; each forced reload reads the file as it is.)
    let reloads = |a: &mut Proc| {
        a.scrape()
            .get("rpclb_config_reloads_total", &[])
            .unwrap_or(0.0)
    };
    let before = reloads(&mut agent);
    agent.signal(libc::SIGHUP);
    wait_until("the last reload", Duration::from_secs(10), || {
        reloads(&mut agent) > before
    });
    let reloaded = reloads(&mut agent);

    let mut by: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut bytes = 0;
    for r in &reports {
        bytes += r.echoed;
        let kind = match &r.end {
            End::Completed => "completed",
            End::Reset(_) => "reset",
            End::Closed => "closed",
            End::Hang => "HANG",
            End::Corrupt(_) => "CORRUPT",
            End::Connect(_) => "connect failed",
        };
        *by.entry(kind).or_default() += 1;
        match &r.end {
            End::Completed => {}
            End::Connect(e) => {
                // A new flow that raced a removal reached the dead pod: refused (a RST).
                assert!(
                    e.contains("refused") || e.contains("reset") || e.contains("cut"),
                    "{r:?}"
                );
            }
            end => {
                let b = index_of(&r.backend);
                assert!(
                    churners.contains(&b),
                    "a flow to backend-{b}, which stays, broke: {r:?}"
                );
                assert!(
                    end.is_rst_or_close(),
                    "a flow to the removed backend-{b}: {r:?}"
                );
            }
        }
    }
    let refs: Vec<&SeqServer> = srv.values().chain(&dead).collect();
    server_check(&refs);
    let stayers = reports
        .iter()
        .filter(|r| stay.iter().any(|&b| r.backend == format!("backend-{b}")))
        .count();
    assert!(stayers > 0);
    println!(
        "backend churn: {} changes in {churn_for:?} ({reloaded} reloads) under {slots} \
         streaming slots: {} flows, {by:?}; flows to the 3 staying backends: {stayers}, all \
         complete; {:.1} MiB checked",
        churn.len(),
        reports.len(),
        mib(bytes)
    );
    agent.check_alive();
}

// ---- 2. the userspace data path: graceful restart and SIGKILL ----

/// Agent flags for `--datapath userspace` with a handover socket in `dir`.
fn userspace_args(lab: &Lab, dir: &TestDir) -> Vec<String> {
    let sock = dir.path().join("handover.sock").display().to_string();
    agent_args(
        lab,
        dir,
        &[
            "--datapath",
            "userspace",
            "--handover-socket",
            &sock,
            "--handover-wait",
            "20s",
        ],
    )
}

/// A figure from a log line `... key=value ...` (the last such line).
fn log_field(log: &str, line_has: &str, key: &str) -> Option<String> {
    let line = log.lines().rev().find(|l| l.contains(line_has))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    Some(
        line[at..]
            .split(|c: char| c.is_whitespace())
            .next()?
            .to_string(),
    )
}

/// Three graceful restarts of the userspace data path while streams run through it: the
/// old agent hands its listeners and every established connection to the new one (over the
/// handover socket, SCM_RIGHTS), and no stream breaks or loses a byte. Twice the old agent
/// gets SIGTERM first and serves on until the new one comes; once the new one starts while
/// the old one runs (as a DaemonSet rolls with maxSurge).
#[test]
fn userspace_graceful_restarts_hand_over_every_flow() {
    skip_unless_lab!();
    let gap = pick(Duration::from_secs(3), Duration::from_secs(15));
    let n = pick(6, 24);
    let lab = Lab::new(3).expect("lab");
    let srv = servers(&lab);
    let dir = TestDir::new("faults-handover");
    dir.write_config(&config(&lab, "maglev", &[1, 2, 3]));
    let args = userspace_args(&lab, &dir);
    let mut agent = Proc::start(&lab, &dir, "agent0", &args);
    agent.wait_ready();

    let start = Instant::now();
    let mut streams: Vec<SeqStream> = (0..n).map(|_| open_stream(&lab)).collect();
    let mut gaps = Vec::new();
    let mut probes = 0;
    for k in 1..=3u32 {
        std::thread::sleep(gap);
        let sent = total_sent(&streams);
        let sigterm_first = k != 2;
        if sigterm_first {
            agent.signal(libc::SIGTERM);
            // It serves on meanwhile: a new connection still works.
            std::thread::sleep(Duration::from_millis(300));
            probe(&lab);
            probes += 1;
        }
        let t = Instant::now();
        let mut next = Proc::start(&lab, &dir, &format!("agent{k}"), &args);
        let st = agent
            .wait_exit(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("the old agent exits:\n{}", agent.log()));
        assert!(st.success(), "{st}:\n{}", agent.log());
        let old = agent.log();
        assert!(
            old.contains("handed the userspace data path over to the new agent"),
            "{old}"
        );
        next.wait_ready();
        gaps.push(t.elapsed());
        let open = streams.iter().filter(|s| !s.is_finished()).count();
        assert_eq!(
            log_field(&old, "handed the userspace data path over", "connections"),
            Some(open.to_string()),
            "every open flow handed over:\n{old}"
        );
        assert_eq!(
            log_field(&old, "handed the userspace data path over", "acked"),
            Some("true".into()),
            "{old}"
        );
        let new = next.log();
        assert!(new.contains("took over from the previous agent"), "{new}");
        agent = next;
        all_running(&mut streams, &format!("restart {k}"));
        // New connections work on the inherited listener, and the old flows move.
        probe(&lab);
        probes += 1;
        streams_move(&mut streams, sent, &format!("restart {k}"));
        streams.push(open_stream(&lab));
    }
    std::thread::sleep(gap);
    all_running(&mut streams, "the end");
    let total = start.elapsed();
    let reports = finish_all(streams);
    let mut bytes = 0;
    for r in &reports {
        assert_eq!(r.end, End::Completed, "{r:?}");
        bytes += r.sent;
    }
    let refs: Vec<&SeqServer> = srv.iter().collect();
    assert!(server_check(&refs) >= bytes);
    // The backends saw one connection per flow (and probe): none was re-opened.
    let accepted: usize = srv.iter().map(|s| s.done().len() + s.open() as usize).sum();
    assert_eq!(
        accepted,
        reports.len() + probes,
        "connections the backends accepted"
    );
    println!(
        "userspace graceful restart x3 over {total:?}: {} streams all complete, {:.1} MiB each \
         way checked; from the new agent's start to ready, old one gone: {gaps:?}",
        reports.len(),
        mib(bytes)
    );
    agent.check_alive();
}

/// SIGKILL of the userspace data path: its connections end (a RST or a close, never a hang),
/// new connections are refused while it is down, and work again within 1 s of the new
/// agent's start (the stale handover socket and VIP routes do not get in the way).
#[test]
fn userspace_sigkill_new_connections_within_1s() {
    skip_unless_lab!();
    let lab = Lab::new(2).expect("lab");
    let _srv = servers(&lab);
    let dir = TestDir::new("faults-us-kill");
    dir.write_config(&config(&lab, "round-robin", &[1, 2]));
    let args = userspace_args(&lab, &dir);
    let mut agent = Proc::start(&lab, &dir, "agent0", &args);
    agent.wait_ready();
    let s = stream(&lab, Duration::from_secs(30));
    wait_until("the stream's backend", Duration::from_secs(5), || {
        !s.backend().is_empty()
    });

    agent.kill9();
    let r = s.join();
    assert!(r.end.is_rst_or_close(), "{r:?}");
    // Down: refused at once (the VIP is still local), not a hang.
    let t = Instant::now();
    let down = stream(&lab, Duration::from_millis(100)).join();
    assert!(matches!(down.end, End::Connect(_)), "{down:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    let t = Instant::now();
    let mut agent = Proc::start(&lab, &dir, "agent1", &args);
    let mut tries = Vec::new();
    let back = loop {
        let r = stream(&lab, Duration::from_millis(10)).join();
        tries.push((t.elapsed(), r.end.clone()));
        if r.end == End::Completed {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "still down: {tries:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        back < Duration::from_secs(1),
        "new connections work {back:?} after the new agent's start: {tries:?}\n{}",
        agent.log()
    );
    agent.wait_ready();
    let log = agent.log();
    assert!(log.contains("no previous agent to take over from"), "{log}");
    println!(
        "userspace SIGKILL: the open flow ended with {:?}; new connections work {back:?} after \
         the new agent's start (tries: {tries:?})",
        r.end
    );
}
