//! Lab tests of the real `lb-agent` binary: it runs inside the lab's node
//! namespace (`ip netns exec <node> lb-agent ...`), pins into the lab's
//! private bpffs, and serves metrics on 127.0.0.1 of the node namespace, which
//! the tests scrape from a thread inside that namespace.
//!
//! The binaries and processes: `rpclb_tests::procs` (built on demand; every
//! process is killed and reaped on drop). Every lab is torn down on drop, on
//! panic too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_agent::datapath::MapReader;
use lb_api::tls::certs::Bundle;
use lb_api::{Protocol, ServiceAddr};
use rpclb_tests::lab::{self, Lab, Limits};
use rpclb_tests::procs::{
    Proc as Agent, Scrape, TestDir, agent_args, agent_bin, agent_tls_args, controller_bin,
    controller_tls_args, http_get_port, pin_path, svc_yaml, wait_until,
};
use rpclb_tests::skip_unless_lab;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const WEB: &str = "lab/web:http";
const DNS: &str = "lab/dns:dns";

fn web_addr() -> ServiceAddr {
    ServiceAddr {
        vip: VIP.into(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn dns_addr() -> ServiceAddr {
    ServiceAddr {
        vip: UDP_VIP.into(),
        port: 53,
        protocol: Protocol::Udp,
    }
}

fn config_yaml(services: &[String], timeouts: Option<&str>) -> String {
    let mut s = String::from("# written by tests/tests/agent.rs\nservices:\n");
    for svc in services {
        s.push_str(svc);
    }
    if let Some(t) = timeouts {
        s.push_str(&format!("timeouts: {t}\n"));
    }
    s
}

fn web(lab: &Lab, algo: &str, backends: &[usize]) -> String {
    let ips: Vec<Ipv4Addr> = backends.iter().map(|&i| lab.backend(i).ip()).collect();
    svc_yaml(WEB, VIP, 80, "tcp", algo, &ips, 8080)
}

fn dns(lab: &Lab, algo: &str, backends: &[usize]) -> String {
    let ips: Vec<Ipv4Addr> = backends.iter().map(|&i| lab.backend(i).ip()).collect();
    svc_yaml(DNS, UDP_VIP, 53, "udp", algo, &ips, 5353)
}

// ---- the agent process ----

/// `lbctl ARGS` in the node namespace (where the agent's metrics address is).
fn lbctl_in_node(lab: &Lab, args: &[&str]) -> String {
    let bin = rpclb_tests::procs::workspace_bin("lb-agent", "lbctl");
    let bin = bin.display().to_string();
    let mut a = vec![bin.as_str()];
    a.extend_from_slice(args);
    lab.node()
        .exec(a[0], &a[1..])
        .unwrap_or_else(|e| panic!("lbctl {args:?}: {e}"))
}

/// `lb-agent ARGS` run to completion in the root namespace (cleanup, bad startups).
fn agent_cmd(args: &[&str]) -> std::process::Output {
    Command::new(agent_bin())
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run lb-agent")
}

// ---- traffic ----

fn counts(replies: &[lab::Reply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.backend.clone()).or_default() += 1;
    }
    m
}

fn tcp(lab: &Lab, n: usize) -> BTreeMap<String, usize> {
    let replies = lab
        .client_tcp(SocketAddrV4::new(VIP, 80), n)
        .expect("TCP through the VIP");
    for r in &replies {
        assert_eq!(r.peer, SocketAddr::from((VIP, 80)), "reply from the VIP");
    }
    counts(&replies)
}

/// A connection kept open through the VIP, and the backend it landed on.
struct Held;

impl Held {
    fn open(lab: &Lab) -> lab::HeldConn {
        let h = lab::HeldConn::open(&lab.client().ns, SocketAddrV4::new(VIP, 80))
            .expect("connect to the VIP");
        assert_eq!(h.peer(), SocketAddr::from((VIP, 80)));
        h
    }
}

fn backend_label(lab: &Lab, i: usize, port: u16) -> String {
    format!("{}:{port}", lab.backend(i).ip())
}

fn index_of(backend: &str) -> usize {
    backend
        .trim_start_matches("backend-")
        .parse()
        .expect("backend-<i>")
}

/// The pinned maps, opened the way lbctl opens them (no agent needed).
fn pinned(lab: &Lab) -> MapReader {
    MapReader::open_pinned(&pin_path(lab)).expect("open pinned maps")
}

// ---- tests ----

/// Start with a config: ready, balanced TCP and UDP through the VIPs, and
/// /metrics counts exactly the traffic sent, by name.
#[test]
fn agent_starts_balances_and_counts() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let _udp = lab.start_udp_servers(5353).unwrap();
    let dir = TestDir::new("start");
    dir.write_config(&config_yaml(
        &[
            web(&lab, "round-robin", &[1, 2, 3]),
            dns(&lab, "round-robin", &[1, 2, 3]),
        ],
        None,
    ));
    let mut agent = Agent::start(&lab, &dir, "agent", &agent_args(&lab, &dir, &[]));
    agent.wait_ready();
    assert_eq!(agent.get("/healthz").0, 200);
    // Auto mode picks TC on the lab's veths (virtual devices): a TCX link,
    // or a netlink filter on kernels without TCX. /readyz says so.
    let (code, body) = agent.get("/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ready\ndatapath ebpf\n"), "{body}");
    for i in lab.node_ifaces() {
        let tcx = format!("  {} tcx\n", i.name);
        let nl = format!("  {} tc-netlink", i.name);
        assert!(
            body.contains(&tcx) || body.contains(&nl),
            "{}: {body}",
            i.name
        );
    }
    let node_if = lab.node_ifaces()[0].name.clone();
    let show = lab.node().ip(&["link", "show", "dev", &node_if]).unwrap();
    assert!(
        !show.contains("xdp"),
        "no XDP on a veth in auto mode: {show}"
    );
    let m = agent.scrape();
    let info = m.samples("rpclb_datapath_info");
    assert_eq!(info.len(), lab.node_ifaces().len(), "{info:?}");
    assert!(
        info.iter()
            .all(|(l, v)| *v == 1.0 && l["datapath"] == "ebpf" && l["attach"].starts_with("tc")),
        "{info:?}"
    );
    // The program set: full where the kernel has it (5.12+), else compat
    // (`--bpf-programs auto`), shown in the metric, /readyz and lbctl status.
    let set = if lb_agent::datapath::programs::kernel_has_full_set() {
        "full"
    } else {
        "compat"
    };
    assert!(info.iter().all(|(l, _)| l["programs"] == set), "{info:?}");
    let (_, ready) = agent.get("/readyz");
    assert!(ready.contains(&format!("  programs {set}")), "{ready}");
    // lbctl status asks the agent.
    let st = lbctl_in_node(&lab, &["status"]);
    assert!(st.contains("ready  datapath ebpf"), "{st}");
    assert!(st.contains(&format!("programs {set}")), "{st}");
    assert!(st.contains(&node_if), "{st}");

    let c = tcp(&lab, 30);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "round-robin: {c:?}"
    );
    let replies = lab
        .client_udp(SocketAddrV4::new(UDP_VIP, 53), 12)
        .expect("UDP through the VIP");
    assert!(
        replies
            .iter()
            .all(|r| r.peer == SocketAddr::from((UDP_VIP, 53)))
    );
    let u = counts(&replies);
    assert_eq!(
        u.values().copied().collect::<Vec<_>>(),
        vec![4, 4, 4],
        "{u:?}"
    );

    let m = agent.scrape();
    let svc = |s: &'static str| [("service", s)];
    assert_eq!(
        m.get("rpclb_service_new_flows_total", &svc(WEB)),
        Some(30.0)
    );
    assert_eq!(
        m.get("rpclb_service_new_flows_total", &svc(DNS)),
        Some(12.0)
    );
    for (i, port, want) in [(1, 8080, &c), (2, 8080, &c), (3, 8080, &c)]
        .into_iter()
        .chain([(1, 5353, &u), (2, 5353, &u), (3, 5353, &u)])
    {
        let b = backend_label(&lab, i, port);
        let service = if port == 8080 { WEB } else { DNS };
        assert_eq!(
            m.get(
                "rpclb_backend_new_flows_total",
                &[("service", service), ("backend", &b)]
            ),
            Some(want[&format!("backend-{i}")] as f64),
            "new flows of {service} {b}"
        );
        assert!(
            m.get(
                "rpclb_backend_packets_total",
                &[("backend", &b), ("service", service)]
            ) > Some(0.0)
        );
    }
    assert_eq!(
        m.sum("rpclb_backend_new_flows_total", &svc(WEB)),
        30.0,
        "per-backend new flows sum to the service's"
    );
    // Each TCP exchange is at least SYN, ACK, data, FIN each way; each UDP one a datagram each way.
    assert!(m.get("rpclb_service_packets_total", &svc(WEB)) >= Some(30.0 * 6.0));
    assert!(m.get("rpclb_service_packets_total", &svc(DNS)) >= Some(24.0));
    assert!(m.get("rpclb_service_bytes_total", &svc(WEB)) > Some(30.0 * 6.0 * 54.0));
    assert!(
        m.get("rpclb_datapath_events_total", &[("reason", "nat_forward")]) >= Some(42.0),
        "nat_forward counts"
    );
    assert_eq!(m.get("rpclb_ready", &[]), Some(1.0));
    assert_eq!(m.get("rpclb_services", &[]), Some(2.0));
    assert_eq!(m.get("rpclb_config_reloads_total", &[]), Some(0.0));
    assert_eq!(m.get("rpclb_config_reload_errors_total", &[]), Some(0.0));
    assert!(!m.0.contains("id=\""), "no raw ids in metrics");
    // The same numbers straight from the pinned maps.
    let w = pinned(&lab);
    assert_eq!(w.service_stats(&web_addr()).unwrap().new_flows, 30);
    assert_eq!(w.service_stats(&dns_addr()).unwrap().new_flows, 12);
    agent.check_alive();
}

/// Edit the config: traffic follows it, and an established connection
/// survives every change, including the removal of its own backend.
#[test]
fn agent_reload_follows_config_and_keeps_established_flows() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("reload");
    dir.write_config(&config_yaml(&[web(&lab, "maglev", &[1, 2])], None));
    let mut agent = Agent::start(&lab, &dir, "agent", &agent_args(&lab, &dir, &[]));
    agent.wait_ready();

    let mut held = Held::open(&lab);
    held.echo("one");
    let mine = index_of(&held.backend);
    let other = 3 - mine;
    assert!(mine == 1 || mine == 2, "{}", held.backend);

    // Drop the other backend, add the third.
    dir.write_config(&config_yaml(&[web(&lab, "maglev", &[mine, 3])], None));
    agent.wait_metric("rpclb_config_reloads_total", 1.0);
    held.echo("two");
    let c = tcp(&lab, 30);
    assert!(
        !c.contains_key(&format!("backend-{other}")),
        "no new flow to the removed backend-{other}: {c:?}"
    );
    assert!(
        c.contains_key("backend-3"),
        "the added backend gets flows: {c:?}"
    );
    held.echo("three");

    // Remove the held flow's own backend: conntrack keeps it going.
    dir.write_config(&config_yaml(&[web(&lab, "maglev", &[other, 3])], None));
    agent.wait_metric("rpclb_config_reloads_total", 2.0);
    held.echo("four");
    let c = tcp(&lab, 30);
    assert!(
        !c.contains_key(&held.backend),
        "no new flow to the removed {}: {c:?}",
        held.backend
    );
    assert_eq!(c.len(), 2, "{c:?}");
    held.echo("five");
    let ct = pinned(&lab).conntrack().unwrap();
    let e = ct
        .iter()
        .find(|e| SocketAddr::from(e.client) == held.local())
        .expect("held flow in conntrack");
    assert_eq!(e.backend, (lab.backend(mine).ip(), 8080));
    assert_eq!(e.state, "established");

    // SIGHUP reloads an unchanged file: counted, nothing to do.
    agent.signal(libc::SIGHUP);
    agent.wait_metric("rpclb_config_reloads_total", 3.0);
    held.echo("six");
    let log = agent.log();
    assert!(log.contains("config reloaded (file changed)"), "{log}");
    assert!(log.contains("config reloaded (SIGHUP): no change"), "{log}");
    assert_eq!(
        agent.scrape().get("rpclb_config_reload_errors_total", &[]),
        Some(0.0)
    );
}

/// `path:line:col` of the first occurrence of `needle` in `text` (1-based).
fn position(text: &str, needle: &str) -> (usize, usize) {
    text.lines()
        .enumerate()
        .find_map(|(i, l)| l.find(needle).map(|c| (i + 1, c + 1)))
        .expect("needle in text")
}

/// A bad config: a clear error naming file:line:col, counted in metrics,
/// and the old state is still served. Then a good one applies again.
#[test]
fn agent_bad_config_keeps_the_running_state() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("badcfg");
    dir.write_config(&config_yaml(&[web(&lab, "round-robin", &[1, 2, 3])], None));
    let mut agent = Agent::start(&lab, &dir, "agent", &agent_args(&lab, &dir, &[]));
    agent.wait_ready();
    assert_eq!(tcp(&lab, 9).len(), 3);

    let bad = config_yaml(&[web(&lab, "fastest", &[1])], None);
    dir.write_config(&bad);
    agent.wait_metric("rpclb_config_reload_errors_total", 1.0);
    let (line, col) = position(&bad, "fastest");
    let path = dir.config().display().to_string();
    let want = format!("{path}:{line}:{col}: services[0].algorithm: unknown algorithm \"fastest\"");
    let log = agent.log();
    assert!(log.contains(&want), "log names {want:?}:\n{log}");
    assert!(log.contains("keeping the running state"), "{log}");
    // The old state: all three backends, round-robin.
    let c = tcp(&lab, 30);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{c:?}"
    );
    assert_eq!(agent.get("/readyz").0, 200);

    // A YAML syntax error, and a vanished file: counted too, still serving.
    dir.write_config("services:\n  - name: [unclosed\n");
    agent.wait_metric("rpclb_config_reload_errors_total", 2.0);
    std::fs::remove_file(dir.config()).unwrap();
    let m = agent.wait_metric("rpclb_config_reload_errors_total", 3.0);
    assert_eq!(m.get("rpclb_config_reloads_total", &[]), Some(0.0));
    assert_eq!(tcp(&lab, 6).len(), 3);
    let log = agent.log();
    assert!(
        log.contains(&format!("{path}:2:")),
        "syntax error has a position:\n{log}"
    );
    assert!(
        log.contains(&format!("{path}: cannot read config")),
        "missing file is named:\n{log}"
    );

    // A good config applies again.
    dir.write_config(&config_yaml(&[web(&lab, "round-robin", &[1, 2])], None));
    agent.wait_metric("rpclb_config_reloads_total", 1.0);
    let c = tcp(&lab, 10);
    assert_eq!(
        c.keys().map(String::as_str).collect::<Vec<_>>(),
        ["backend-1", "backend-2"]
    );
}

/// A half-written config never takes effect (issue 10): `: > services.yaml`
/// is refused as an empty document, and a file rewritten in place, seen by a
/// poll while cut at a line boundary (a backend short), is not applied: only
/// the whole file is, once two polls agree. Before the fix, the empty file
/// removed every service and each cut file was applied.
#[test]
fn agent_half_written_config_never_takes_effect() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("halfcfg");
    let whole = |algo| config_yaml(&[web(&lab, algo, &[1, 2, 3])], None);
    dir.write_config(&whole("round-robin"));
    let args = agent_args(&lab, &dir, &["--config-poll", "1s"]);
    let mut agent = Agent::start(&lab, &dir, "agent", &args);
    agent.wait_ready();
    assert_eq!(tcp(&lab, 9).len(), 3);

    // Truncated in place: refused, counted, the three backends still served.
    std::fs::File::create(dir.config()).unwrap();
    agent.wait_metric("rpclb_config_reload_errors_total", 1.0);
    assert!(
        agent.log().contains("write `services: []`"),
        "{}",
        agent.log()
    );
    assert_eq!(tcp(&lab, 9).len(), 3, "the empty file removed nothing");

    // Rewritten in place by a slow writer: the cut file (the last backend
    // missing) stands for 0.7 s, less than the 1 s between two polls, and
    // is caught by about 7 polls in 10. Each whole file differs from the
    // last, so each round is exactly one reload. The last round is
    // round-robin: 9 random picks miss one of 3 backends 8% of the time.
    let mut reloads = 0.0;
    for (round, algo) in ["random", "round-robin", "random", "round-robin"]
        .into_iter()
        .enumerate()
    {
        let text = whole(algo);
        let last = text.trim_end().rfind('\n').unwrap() + 1;
        std::fs::write(dir.config(), &text[..last]).unwrap();
        std::thread::sleep(Duration::from_millis(700));
        std::fs::write(dir.config(), &text).unwrap();
        reloads += 1.0;
        let m = agent.wait_metric("rpclb_config_reloads_total", reloads);
        // Two polls later: still one reload for this round.
        std::thread::sleep(Duration::from_millis(2100));
        let m2 = agent.scrape();
        assert_eq!(
            m2.get("rpclb_config_reloads_total", &[]),
            Some(reloads),
            "round {round}: the cut file was applied too:\n{}",
            agent.log()
        );
        assert_eq!(m.get("rpclb_config_reload_errors_total", &[]), Some(1.0));
    }
    assert_eq!(tcp(&lab, 9).len(), 3);
    assert_eq!(agent.scrape().get("rpclb_services", &[]), Some(1.0));

    // `services: []` is how to remove them all.
    dir.write_config("services: []\n");
    let m = agent.wait_metric("rpclb_config_reloads_total", reloads + 1.0);
    assert_eq!(m.get("rpclb_services", &[]), Some(0.0));
}

/// Map sizes the kernel refuses (issue 10): before, `--max-conntrack 0
/// --datapath ebpf` failed with a raw `failed to create map CONNTRACK:
/// Invalid argument` after other maps were created and left them pinned.
/// Now the flag is named and nothing is created. Needs no root: sizes are
/// checked before anything else.
#[test]
fn agent_bad_map_size_at_startup_exits_1() {
    let dir = TestDir::new("badsize");
    dir.write_config("services: []\n");
    let pin = dir.path().join("pins");
    let cfg = dir.config().display().to_string();
    for (datapath, flag, value, want) in [
        (
            "ebpf",
            "--max-conntrack",
            "0",
            "lb-agent: --max-conntrack 0: must be at least 2",
        ),
        (
            "auto",
            "--max-slots",
            "0",
            "lb-agent: --max-slots 0: must be at least 1",
        ),
    ] {
        let out = agent_cmd(&[
            "--config",
            &cfg,
            "--interfaces",
            "lo",
            "--pin-path",
            &pin.display().to_string(),
            "--datapath",
            datapath,
            flag,
            value,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(want), "want {want:?} in:\n{stderr}");
        assert!(!pin.exists(), "nothing pinned");
    }
}

/// A bad config at startup: exit status 1, one clear line, no backtrace, and
/// nothing touched. Needs no root: the config is read first.
#[test]
fn agent_bad_config_at_startup_exits_1() {
    let dir = TestDir::new("badstart");
    let bad = "services:\n  - name: a/b:c\n    vip: 10.96.0.1\n    port: 0\n    backends: []\n";
    dir.write_config(bad);
    let pin = dir.path().join("pins");
    let cfg = dir.config().display().to_string();
    let out = agent_cmd(&[
        "--config",
        &cfg,
        "--interfaces",
        "lo",
        "--pin-path",
        &pin.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let (line, col) = position(bad, "port: 0");
    let want = format!(
        "lb-agent: {cfg}:{line}:{}: services[0].port: ",
        col + "port: ".len()
    );
    assert!(stderr.contains(&want), "want {want:?} in:\n{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert!(!pin.exists(), "nothing pinned");

    // Missing file, missing --config, unknown flag value.
    let out = agent_cmd(&["--config", "/nonexistent/rpclb.yaml", "--interfaces", "lo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("lb-agent: /nonexistent/rpclb.yaml: cannot read config: ")
    );
    let out = agent_cmd(&["--interfaces", "lo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "one of --config FILE (RPCLB_CONFIG) or --controller URL (RPCLB_CONTROLLER) is required"
    ));
    let out = agent_cmd(&["--config", &cfg, "--mode", "fast"]);
    assert_eq!(out.status.code(), Some(2));
}

/// SIGKILL mid-connection: the connection keeps working and new connections
/// are balanced while the agent is down; a restart on the same pin path
/// adopts the same conntrack, and counters carry on.
#[test]
fn agent_sigkill_restart_keeps_flows_and_state() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("restart");
    // Closed flows stay in conntrack for the whole test, so it can be compared.
    dir.write_config(&config_yaml(
        &[web(&lab, "maglev", &[1, 2, 3])],
        Some("{ tcp_closing: 600 }"),
    ));
    let args = agent_args(&lab, &dir, &["--gc-interval", "1s"]);
    let mut agent = Agent::start(&lab, &dir, "agent1", &args);
    agent.wait_ready();
    let mut held = Held::open(&lab);
    held.echo("before");
    assert_eq!(tcp(&lab, 30).len(), 3);

    agent.kill9();
    held.echo("agent down");
    let c = tcp(&lab, 30);
    assert_eq!(c.len(), 3, "balanced while the agent is down: {c:?}");
    assert!(c.values().all(|&n| n >= 3), "spread: {c:?}");
    let snapshot = |lab: &Lab| -> BTreeSet<String> {
        pinned(lab)
            .conntrack()
            .unwrap()
            .into_iter()
            .map(|e| {
                format!(
                    "{:?} {:?}->{:?} via {:?} b{} s{} {} @{}",
                    e.proto,
                    e.client,
                    e.vip,
                    e.backend,
                    e.backend_id,
                    e.svc_id,
                    e.state,
                    e.created_ns
                )
            })
            .collect()
    };
    let before = snapshot(&lab);
    assert_eq!(before.len(), 61, "1 held + 60 closed flows");

    // Same flags but a bigger conntrack: pinned maps keep their size, and the agent says so.
    let mut args2 = args.clone();
    let i = args2.iter().position(|a| a == "--max-conntrack").unwrap();
    args2[i + 1] = "131072".into();
    let mut agent = Agent::start(&lab, &dir, "agent2", &args2);
    agent.wait_ready();
    held.echo("restarted");
    // Let a GC sweep pass with the config's timeouts: nothing is due.
    agent.wait_metric("rpclb_ready", 1.0);
    wait_until("a GC sweep", Duration::from_secs(10), || {
        agent.scrape().get("rpclb_gc_duration_seconds_count", &[]) >= Some(1.0)
    });
    assert_eq!(
        snapshot(&lab),
        before,
        "conntrack is the same after the restart"
    );
    let log = agent.log();
    assert!(log.contains("reused=true"), "links adopted:\n{log}");
    // Veths get TC (`--mode auto`): only the TC pair passed the verifier.
    assert!(log.contains(r#"loaded=["rpclb_tc", "rpclb_tc6"]"#), "{log}");
    assert!(
        log.contains(
            "CONNTRACK is pinned with 65536 entries, so --max-conntrack 131072 has no effect"
        ),
        "{log}"
    );
    let c = tcp(&lab, 30);
    assert_eq!(c.len(), 3, "balanced after the restart: {c:?}");
    held.echo("after");
    // Counters live in the pinned maps: they carry on across the restart.
    let m = agent.scrape();
    assert_eq!(
        m.get("rpclb_service_new_flows_total", &[("service", WEB)]),
        Some(91.0)
    );
    assert_eq!(
        m.sum("rpclb_backend_new_flows_total", &[("service", WEB)]),
        91.0
    );
    let e = pinned(&lab)
        .conntrack()
        .unwrap()
        .into_iter()
        .find(|e| SocketAddr::from(e.client) == held.local())
        .expect("held flow");
    assert_eq!(format!("backend-{}", index_of(&held.backend)), held.backend);
    assert_eq!(e.backend.0, lab.backend(index_of(&held.backend)).ip());
}

/// Idle TCP and UDP flows past short timeouts: GC removes them, and the
/// active counts (kernel maps and metrics) return to zero.
#[test]
fn agent_gc_expires_idle_flows() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let _udp = lab.start_udp_servers(5353).unwrap();
    let dir = TestDir::new("gc");
    dir.write_config(&config_yaml(
        &[
            web(&lab, "round-robin", &[1, 2, 3]),
            dns(&lab, "round-robin", &[1, 2, 3]),
        ],
        Some("{ tcp_syn: 2, tcp_established: 2, tcp_closing: 1, udp: 2 }"),
    ));
    let mut agent = Agent::start(
        &lab,
        &dir,
        "agent",
        &agent_args(&lab, &dir, &["--gc-interval", "1s"]),
    );
    agent.wait_ready();

    let held: Vec<lab::HeldConn> = (0..6).map(|_| Held::open(&lab)).collect();
    assert_eq!(tcp(&lab, 6).len(), 3);
    let replies = lab.client_udp(SocketAddrV4::new(UDP_VIP, 53), 9).unwrap();
    assert_eq!(replies.len(), 9);
    let active = |lab: &Lab, a: &ServiceAddr| -> u64 {
        pinned(lab)
            .backend_stats(a)
            .unwrap()
            .iter()
            .map(|b| b.active)
            .sum()
    };
    assert!(active(&lab, &web_addr()) >= 6, "held TCP flows are active");
    assert_eq!(active(&lab, &dns_addr()), 9, "UDP flows are active");
    assert!(pinned(&lab).conntrack().unwrap().len() >= 21);

    wait_until("GC to empty conntrack", Duration::from_secs(20), || {
        pinned(&lab).conntrack().unwrap().is_empty()
    });
    assert_eq!(active(&lab, &web_addr()), 0);
    assert_eq!(active(&lab, &dns_addr()), 0);
    let m = agent.scrape();
    assert_eq!(m.sum("rpclb_backend_active_flows", &[]), 0.0);
    assert_eq!(m.sum("rpclb_service_active_flows", &[]), 0.0);
    assert!(
        m.get("rpclb_gc_expired_total", &[("state", "udp")]) >= Some(9.0),
        "{}",
        m.0
    );
    assert!(m.get("rpclb_gc_expired_total", &[("state", "established")]) >= Some(6.0));
    assert!(m.sum("rpclb_gc_expired_total", &[]) >= 21.0);
    assert!(m.get("rpclb_gc_duration_seconds_count", &[]) >= Some(1.0));
    assert_eq!(m.get("rpclb_gc_errors_total", &[]), Some(0.0));
    // The gauge is from the last sweep; the next one sees an empty map.
    wait_until("conntrack gauges at zero", Duration::from_secs(5), || {
        let m = agent.scrape();
        m.get("rpclb_conntrack_flows", &[]) == Some(0.0)
            && m.get("rpclb_conntrack_entries", &[]) == Some(0.0)
    });
    drop(held);
}

/// least-conn (TC mode): with one backend holding many open connections, new
/// flows go to the others.
#[test]
fn agent_least_conn_avoids_the_busy_backend() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("leastconn");
    dir.write_config(&config_yaml(&[web(&lab, "least-conn", &[1])], None));
    let mut agent = Agent::start(
        &lab,
        &dir,
        "agent",
        &agent_args(&lab, &dir, &["--mode", "tc"]),
    );
    agent.wait_ready();
    let held: Vec<lab::HeldConn> = (0..20).map(|_| Held::open(&lab)).collect();
    assert!(held.iter().all(|h| h.backend == "backend-1"));

    dir.write_config(&config_yaml(&[web(&lab, "least-conn", &[1, 2, 3])], None));
    let m = agent.wait_metric("rpclb_config_reloads_total", 1.0);
    let b1 = backend_label(&lab, 1, 8080);
    assert_eq!(
        m.get("rpclb_backend_active_flows", &[("backend", &b1)]),
        Some(20.0)
    );
    let c = tcp(&lab, 24);
    assert!(
        !c.contains_key("backend-1"),
        "busy backend-1 got new flows: {c:?}"
    );
    assert_eq!(c.len(), 2, "both idle backends used: {c:?}");
    let m = agent.scrape();
    assert_eq!(
        m.get("rpclb_backend_new_flows_total", &[("backend", &b1)]),
        Some(20.0)
    );
    assert_eq!(
        m.get("rpclb_backend_active_flows", &[("backend", &b1)]),
        Some(20.0)
    );
    let log = agent.log();
    // TC through a TCX link, or a netlink filter where the kernel has no TCX.
    assert!(
        log.contains("mode=\"tcx\"") || log.contains("mode=\"tc-netlink\""),
        "{log}"
    );
    drop(held);
}

fn vip_unreachable(lab: &Lab) -> bool {
    let lim = Limits {
        per_op: Duration::from_millis(700),
        total: Duration::from_secs(5),
    };
    lab.client()
        .ns
        .run(|| lab::tcp_attempts(SocketAddrV4::new(VIP, 80), 3, lim))
        .unwrap()
        .iter()
        .all(|r| r.is_err())
}

fn pins_left(lab: &Lab) -> Vec<String> {
    let mut out = Vec::new();
    for d in [pin_path(lab), pin_path(lab).join("links")] {
        if let Ok(rd) = std::fs::read_dir(d) {
            out.extend(rd.flatten().map(|e| e.path().display().to_string()));
        }
    }
    out
}

/// SIGTERM leaves the data path running; `lb-agent cleanup` then removes
/// everything; `--detach-on-exit` removes it at exit; `--cleanup` is the
/// flag spelling.
#[test]
fn agent_sigterm_cleanup_and_detach_on_exit() {
    skip_unless_lab!();
    // Pod-like veths (GRO off): native XDP must not redirect into them.
    let lab = Lab::pod_like(2).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("cleanup");
    dir.write_config(&config_yaml(&[web(&lab, "random", &[1, 2])], None));
    let node_if = lab.node_ifaces()[0].name.clone();
    let xdp_on = |lab: &Lab| {
        let out = lab.node().ip(&["link", "show", "dev", &node_if]).unwrap();
        out.contains("xdp")
    };

    let mut agent = Agent::start(
        &lab,
        &dir,
        "agent1",
        &agent_args(&lab, &dir, &["--mode", "xdp"]),
    );
    agent.wait_ready();
    assert_eq!(tcp(&lab, 10).values().sum::<usize>(), 10);
    let show = lab.node().ip(&["link", "show", "dev", &node_if]).unwrap();
    assert!(
        show.contains("prog/xdp") && !show.contains("xdpgeneric"),
        "--mode xdp attaches native XDP on veth: {show}"
    );
    let log = agent.log();
    assert!(
        log.contains(r#"loaded=["rpclb_xdp", "rpclb_xdp6"]"#),
        "--mode xdp loads the XDP pair only:\n{log}"
    );
    agent.signal(libc::SIGTERM);
    let st = agent
        .wait_exit(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(st.success(), "{st}\n{}", agent.log());
    assert!(agent.log().contains("stays attached"), "{}", agent.log());
    assert_eq!(
        tcp(&lab, 10).values().sum::<usize>(),
        10,
        "traffic flows after exit"
    );
    assert!(!pins_left(&lab).is_empty());

    let pin = pin_path(&lab).display().to_string();
    let out = agent_cmd(&["cleanup", "--pin-path", &pin]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("detached and unpinned"));
    assert_eq!(pins_left(&lab), Vec::<String>::new(), "pin dir empty");
    // The kernel releases an unpinned link after an RCU grace period.
    wait_until("programs detached", Duration::from_secs(5), || {
        !xdp_on(&lab)
    });
    assert!(vip_unreachable(&lab), "the VIP is gone with the programs");

    // --detach-on-exit: SIGTERM takes it all down.
    let mut agent = Agent::start(
        &lab,
        &dir,
        "agent2",
        &agent_args(&lab, &dir, &["--detach-on-exit", "--mode", "xdp"]),
    );
    agent.wait_ready();
    assert_eq!(tcp(&lab, 10).values().sum::<usize>(), 10);
    assert!(!pins_left(&lab).is_empty());
    agent.signal(libc::SIGTERM);
    let st = agent
        .wait_exit(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(st.success(), "{st}\n{}", agent.log());
    assert_eq!(pins_left(&lab), Vec::<String>::new());
    wait_until("programs detached", Duration::from_secs(5), || {
        !xdp_on(&lab)
    });
    assert!(vip_unreachable(&lab));

    let out = agent_cmd(&["--cleanup", "--pin-path", &pin]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing pinned"));
}

/// Drains and un-drains a backend (terminating <-> active) while a stream of
/// new connections runs: every connection succeeds and the kernel never
/// drops a SYN as `drop_bad_table` (an un-drain once switched the table to
/// the backend before marking it active). tests in lb-agent/tests/
/// write_order.rs look between the two writes deterministically.
#[test]
fn agent_undrain_under_new_connections_drops_nothing() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("undrain");
    let config = |terminating: bool| {
        let ips: Vec<Ipv4Addr> = (1..=3).map(|i| lab.backend(i).ip()).collect();
        let mut y = svc_yaml(WEB, VIP, 80, "tcp", "maglev", &ips, 8080);
        if terminating {
            let b3 = format!("{{ ip: {}, port: 8080 }}", ips[2]);
            y = y.replace(
                &b3,
                &format!("{{ ip: {}, port: 8080, state: terminating }}", ips[2]),
            );
        }
        config_yaml(&[y], None)
    };
    dir.write_config(&config(true));
    let mut agent = Agent::start(&lab, &dir, "agent", &agent_args(&lab, &dir, &[]));
    agent.wait_ready();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            let lim = Limits {
                per_op: Duration::from_secs(1),
                total: Duration::from_secs(2),
            };
            let (mut ok, mut failed) = (0usize, 0usize);
            let deadline = Instant::now() + Duration::from_secs(30);
            for _ in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let r = lab
                    .client()
                    .ns
                    .run(|| lab::tcp_attempts(SocketAddrV4::new(VIP, 80), 8, lim))
                    .expect("client namespace");
                for a in r {
                    match a {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
            }
            (ok, failed)
        });
        for round in 0..6 {
            dir.write_config(&config(round % 2 == 1));
            agent.wait_metric("rpclb_config_reloads_total", f64::from(round + 1));
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().expect("traffic thread")
    });
    assert!(ok > 100, "only {ok} connections");
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    let m = agent.scrape();
    assert_eq!(
        m.get(
            "rpclb_datapath_events_total",
            &[("reason", "drop_bad_table")]
        ),
        Some(0.0)
    );
    // The stream saw the backend come and go: it took flows while active.
    let c = tcp(&lab, 30);
    assert_eq!(
        c.len(),
        2,
        "backend 3 is terminating again at the end: {c:?}"
    );
}

// ---- the controller stream ----

const CONTROLLER_GRPC: u16 = 50551;
const CONTROLLER_METRICS: u16 = 9465;

/// `lb-controller --config` in the node namespace (its gRPC and metrics on the
/// namespace's own loopback), with mutual TLS (`certs`).
fn start_controller(lab: &Lab, dir: &TestDir, certs: &Bundle, name: &str) -> Agent {
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
    let mut c = Agent::spawn(lab, dir, name, controller_bin(), &args);
    wait_until("the controller's /readyz", Duration::from_secs(30), || {
        c.check_alive();
        matches!(
            http_get_port(c.node.as_deref(), CONTROLLER_METRICS, "/readyz"),
            Ok((200, _))
        )
    });
    c
}

/// The controller's `rpclb_controller_published_version`.
fn published_version(c: &mut Agent) -> u64 {
    let m = controller_scrape(c);
    let v = m
        .get("rpclb_controller_published_version", &[])
        .expect("published version");
    v as u64
}

fn controller_scrape(c: &mut Agent) -> Scrape {
    c.check_alive();
    let (status, body) = http_get_port(c.node.as_deref(), CONTROLLER_METRICS, "/metrics")
        .unwrap_or_else(|e| panic!("controller /metrics: {e}\n{}", c.log()));
    assert_eq!(status, 200, "{body}");
    Scrape(body)
}

/// Agent flags for `--controller https://...` (node-a, mutual TLS) instead of `--config`.
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

/// Waits until new TCP connections reach exactly the backends `want` (by index).
fn wait_backends(lab: &Lab, want: &[usize]) -> BTreeMap<String, usize> {
    let want: std::collections::BTreeSet<usize> = want.iter().copied().collect();
    let mut last = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        last = tcp(lab, 3 * want.len());
        if last
            .keys()
            .map(|b| index_of(b))
            .collect::<std::collections::BTreeSet<_>>()
            == want
        {
            return last;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("new connections never reached exactly {want:?}; last spread {last:?}");
}

#[test]
fn agent_follows_the_controller_stream() {
    if !lab::require() {
        return;
    }
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("controller");
    let certs = dir.certs(&["node-a"]);
    dir.write_config(&config_yaml(&[web(&lab, "round-robin", &[1, 2, 3])], None));
    let mut ctl = start_controller(&lab, &dir, &certs, "controller");
    let mut agent = Agent::start(
        &lab,
        &dir,
        "agent",
        &agent_controller_args(&lab, &dir, &certs),
    );
    agent.wait_ready();
    // Versions start at the controller's epoch (the millisecond of its first
    // publish, shifted left 12 bits) plus 1.
    let v1 = published_version(&mut ctl);
    assert_eq!(v1 & 0xfff, 1, "{v1}");
    assert!(
        lb_api::wire::version_epoch_ms(v1) > 1_700_000_000_000,
        "{v1}"
    );
    assert_eq!(
        agent
            .wait_metric("rpclb_controller_version", v1 as f64)
            .get("rpclb_controller_connected", &[]),
        Some(1.0)
    );
    // The snapshot is applied: exact round-robin over the three backends.
    let c = tcp(&lab, 30);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{c:?}"
    );
    let m = controller_scrape(&mut ctl);
    assert_eq!(m.get("rpclb_controller_agents_connected", &[]), Some(1.0));
    assert_eq!(
        m.get(
            "rpclb_controller_agent_acked_version",
            &[("node", "node-a")]
        ),
        Some(v1 as f64)
    );

    // A config edit reaches the agent as a delta; the held flow keeps its backend.
    let mut held = Held::open(&lab);
    let keep = index_of(&held.backend);
    let others: Vec<usize> = (1..=3).filter(|&i| i != keep).collect();
    dir.write_config(&config_yaml(&[web(&lab, "round-robin", &others)], None));
    agent.wait_metric("rpclb_controller_version", (v1 + 1) as f64);
    let c = wait_backends(&lab, &others);
    assert!(!c.contains_key(&format!("backend-{keep}")), "{c:?}");
    held.echo("still here after the delta");
    assert!(
        agent
            .log()
            .contains(&format!("applied controller delta v{}", v1 + 1)),
        "{}",
        agent.log()
    );

    // The controller goes away (SIGKILL): the agent keeps serving its last state.
    ctl.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let c = tcp(&lab, 6);
    assert_eq!(
        c.keys().map(|b| index_of(b)).collect::<Vec<_>>(),
        others,
        "{c:?}"
    );
    held.echo("still here without a controller");
    assert_eq!(agent.get("/readyz").0, 200, "still ready");
    agent.wait_metric("rpclb_controller_connected", 0.0);

    // A new state while it is down; the restarted controller resyncs the agent.
    dir.write_config(&config_yaml(&[web(&lab, "round-robin", &[keep])], None));
    let mut ctl = start_controller(&lab, &dir, &certs, "controller-2");
    agent.wait_metric("rpclb_controller_connected", 1.0);
    let c = wait_backends(&lab, &[keep]);
    assert_eq!(c.len(), 1);
    held.echo("still here after the resync");
    let m = controller_scrape(&mut ctl);
    assert_eq!(
        m.get(
            "rpclb_controller_agent_acked_version",
            &[("node", "node-a")]
        ),
        Some(published_version(&mut ctl) as f64),
    );
    // Issue 10: a restarted controller numbered its states from 1 again, so
    // two different states were both "v1" in acks and metrics. Its versions
    // carry its epoch now: above every version of the one before.
    let v2 = published_version(&mut ctl);
    assert_eq!(v2 & 0xfff, 1, "{v2}");
    assert!(
        v2 > v1 + 1,
        "the new controller's {v2} after the old one's {}",
        v1 + 1
    );
    let log = agent.log();
    assert_eq!(
        log.matches("connected to the controller").count(),
        2,
        "{log}"
    );
    assert!(log.contains("keeping the current state"), "{log}");

    // A bad edit is refused by the controller; the agent keeps the last good state.
    dir.write_config("services:\n  - name: lab/web:http\n    vip: 10.96.0.10\n    port: 0\n");
    wait_until(
        "the controller to refuse the edit",
        Duration::from_secs(10),
        || {
            controller_scrape(&mut ctl).get("rpclb_controller_config_errors_total", &[])
                == Some(1.0)
        },
    );
    assert!(ctl.log().contains("services.yaml:4:"), "{}", ctl.log());
    let c = tcp(&lab, 3);
    assert_eq!(
        c.keys().map(|b| index_of(b)).collect::<Vec<_>>(),
        vec![keep]
    );
}

/// A controller stand-in (in the node namespace, on the controller's port,
/// serving mutual TLS with `certs`' controller files through the controller's
/// own listener) that sends one snapshot and hands every ack to the test.
struct FakeController {
    acks: std::sync::mpsc::Receiver<lb_api::wire::pb::Ack>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FakeController {
    fn start(
        lab: &Lab,
        certs: &Bundle,
        snapshot: lb_api::wire::pb::ControllerMessage,
    ) -> FakeController {
        use lb_api::wire::{StateStream, StateStreamServer, pb};
        use tokio_stream::StreamExt;

        struct Svc {
            snapshot: pb::ControllerMessage,
            acks: std::sync::Mutex<std::sync::mpsc::Sender<pb::Ack>>,
        }
        type Out = std::pin::Pin<
            Box<
                dyn tokio_stream::Stream<Item = Result<pb::ControllerMessage, tonic::Status>>
                    + Send,
            >,
        >;
        #[tonic::async_trait]
        impl StateStream for Svc {
            type WatchStream = Out;
            async fn watch(
                &self,
                req: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
            ) -> Result<tonic::Response<Out>, tonic::Status> {
                let mut inbound = req.into_inner();
                let acks = self.acks.lock().unwrap().clone();
                tokio::spawn(async move {
                    while let Some(Ok(m)) = inbound.next().await {
                        if let Some(pb::agent_message::Msg::Ack(a)) = m.msg {
                            let _ = acks.send(a);
                        }
                    }
                });
                let first = tokio_stream::once(Ok(self.snapshot.clone()));
                // Then stay open, as a controller does.
                let out = first.chain(tokio_stream::pending());
                Ok(tonic::Response::new(Box::pin(out)))
            }
        }

        let (ack_tx, acks) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let svc = Svc {
            snapshot,
            acks: std::sync::Mutex::new(ack_tx),
        };
        let tls = lb_api::tls::reload::Reloader::new(
            certs.controller_paths(),
            lb_api::tls::server_config,
        )
        .expect("the controller's TLS files");
        lab.node()
            .spawn("fake-controller", move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::bind(("127.0.0.1", CONTROLLER_GRPC))
                        .await
                        .expect("bind the fake controller");
                    let _ = ready_tx.send(());
                    let incoming = lb_api::tls::server::incoming(
                        l,
                        lb_api::tls::server::Acceptor {
                            tls: Some(tls.subscribe()),
                            handshake_timeout: Duration::from_secs(10),
                            max_handshakes: 8,
                            on_handshake_error: std::sync::Arc::new(|| {}),
                        },
                    );
                    tonic::transport::Server::builder()
                        .add_service(StateStreamServer::new(svc))
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = stopped.await;
                        })
                        .await
                        .unwrap();
                });
            })
            .expect("fake controller thread");
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("fake controller listening");
        FakeController { acks, _stop: stop }
    }

    fn next_ack(&self) -> lb_api::wire::pb::Ack {
        self.acks
            .recv_timeout(Duration::from_secs(20))
            .expect("an ack from the agent")
    }
}

/// One service the agent cannot take (a Maglev table too small for its
/// backends) is refused alone: the agent serves the rest of the snapshot,
/// says which service and why in its ack, its log and its metrics, and does
/// not reconnect (it once refused the whole state, acked an error and
/// resynced in a loop).
#[test]
fn agent_refuses_an_invalid_service_alone() {
    if !lab::require() {
        return;
    }
    use lb_api::wire::{self, NodeState};
    use lb_api::{Algorithm, Backend, DesiredState, Service};
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let backends: Vec<Backend> = (1..=3)
        .map(|i| Backend::new(lab.backend(i).ip(), 8080))
        .collect();
    let good = Service::new(
        WEB,
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::RoundRobin,
        backends.clone(),
    );
    let mut bad = Service::new(
        "lab/bad:http",
        VIP,
        81,
        Protocol::Tcp,
        Algorithm::Maglev,
        backends,
    );
    bad.maglev_table_size = Some(101);
    let snapshot = wire::snapshot(
        1,
        &NodeState {
            state: DesiredState {
                services: vec![good, bad],
            },
            timeouts: Default::default(),
        },
    );
    let dir = TestDir::new("refuse-alone");
    let certs = dir.certs(&["node-a"]);
    let ctl = FakeController::start(&lab, &certs, snapshot);
    let mut agent = Agent::start(
        &lab,
        &dir,
        "agent",
        &agent_controller_args(&lab, &dir, &certs),
    );
    agent.wait_ready();
    let ack = ctl.next_ack();
    assert_eq!(ack.version, 1);
    assert_eq!(ack.error, "", "the snapshot is applied");
    assert_eq!(ack.refused.len(), 1, "{:?}", ack.refused);
    assert_eq!(ack.refused[0].service, "lab/bad:http");
    assert!(
        ack.refused[0]
            .reason
            .contains("maglev table size 101 must be > 100 x 3"),
        "{:?}",
        ack.refused[0]
    );
    // The rest is served: exact round-robin over the three backends.
    let c = tcp(&lab, 30);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{c:?}"
    );
    let m = agent.wait_metric("rpclb_controller_version", 1.0);
    assert_eq!(
        m.get("rpclb_service_refused", &[("service", "lab/bad:http")]),
        Some(1.0)
    );
    assert_eq!(m.get("rpclb_controller_reconnects", &[]), Some(0.0));
    let log = agent.log();
    assert!(log.contains("lab/bad:http"), "{log}");
    assert_eq!(
        log.matches("connected to the controller").count(),
        1,
        "{log}"
    );
}

/// What the node has attached on `iface`: XDP (`ip link`) and TC netlink
/// filters. (TCX links show in neither: tests check their pins, or what
/// the backends see.)
fn attachments(lab: &Lab, iface: &str) -> String {
    let link = lab.node().ip(&["link", "show", "dev", iface]).unwrap();
    let tc = lab
        .node()
        .exec("tc", &["filter", "show", "dev", iface, "ingress"])
        .unwrap();
    format!("{link}{tc}")
}

/// The pinned links left under the pin path.
fn pinned_links(lab: &Lab) -> Vec<String> {
    std::fs::read_dir(pin_path(lab).join("links"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A falling-back agent leaves nothing of the kernel path behind: a
/// previous agent's programs stay attached after it dies, and a new agent
/// that cannot load the eBPF path (here: over its map-memory budget) must
/// detach them before its userspace proxy takes the VIPs, or they would
/// catch the VIPs' packets with stale maps.
#[test]
fn agent_fallback_detaches_everything_first() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("fallback-clean");
    dir.write_config(&config_yaml(&[web(&lab, "round-robin", &[1, 2, 3])], None));
    let mut first = Agent::start(
        &lab,
        &dir,
        "first",
        &agent_args(&lab, &dir, &["--mode", "xdp"]),
    );
    first.wait_ready();
    first.kill9();
    let node_if = lab.node_ifaces()[0].name.clone();
    assert!(
        attachments(&lab, &node_if).contains("xdp"),
        "the first agent's XDP stays"
    );
    assert!(pin_path(&lab).join("CONNTRACK").exists());

    let args = agent_args(
        &lab,
        &dir,
        &["--datapath", "auto", "--map-memory-budget-mib", "1"],
    );
    let mut agent = Agent::start(&lab, &dir, "second", &args);
    agent.wait_ready();
    let log = agent.log();
    assert!(
        log.contains("detached and unpinned the eBPF data path before falling back"),
        "{log}"
    );
    for i in lab.node_ifaces() {
        let a = attachments(&lab, &i.name);
        assert!(!a.contains("xdp") && !a.contains("bpf"), "{}: {a}", i.name);
    }
    assert!(!pin_path(&lab).join("CONNTRACK").exists(), "maps unpinned");
    assert!(pinned_links(&lab).is_empty(), "{:?}", pinned_links(&lab));
    let c = tcp(&lab, 30);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{c:?}"
    );
    // The userspace proxy served them: the backends saw the node, not the
    // client (a stale kernel program would have DNATed the client's packets).
    let client = lab.client().ip();
    for s in &_tcp {
        let peers = s.peers();
        assert!(!peers.is_empty());
        assert!(
            peers.iter().all(|p| p.ip() != std::net::IpAddr::V4(client)),
            "{peers:?}"
        );
    }
    let (_, body) = agent.get("/readyz");
    assert!(body.contains("datapath userspace (fallback: "), "{body}");
}

/// An interface that cannot attach in any mode is an error that names it,
/// under `--datapath auto` too (it is a configuration to fix, not a reason
/// to move the node to userspace), and what the agent had attached to the
/// other interfaces is removed again.
#[test]
fn agent_refuses_an_interface_it_cannot_attach() {
    skip_unless_lab!();
    let lab = Lab::new(1).expect("lab");
    let dir = TestDir::new("bad-iface");
    dir.write_config(&config_yaml(&[web(&lab, "round-robin", &[1])], None));
    let mut args = agent_args(&lab, &dir, &["--datapath", "auto"]);
    let i = args.iter().position(|a| a == "--interfaces").unwrap();
    args[i + 1] = format!("{},rpclb-nosuch0", lab.node_ifaces()[0].name);
    let mut agent = Agent::start(&lab, &dir, "agent", &args);
    let st = agent.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(!st.success());
    let log = agent.log();
    assert!(log.contains("interface rpclb-nosuch0"), "{log}");
    assert!(!log.contains("falling back to the userspace"), "{log}");
    let a = attachments(&lab, &lab.node_ifaces()[0].name);
    assert!(
        !a.contains("xdp") && !a.contains("bpf"),
        "left attached: {a}"
    );
    assert!(pinned_links(&lab).is_empty(), "{:?}", pinned_links(&lab));
}

// ---- the userspace data path ----

#[test]
fn agent_falls_back_to_the_userspace_datapath() {
    if !lab::require() {
        return;
    }
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let _udp = lab.start_udp_servers(5353).unwrap();
    let dir = TestDir::new("userspace");
    dir.write_config(&config_yaml(
        &[
            web(&lab, "round-robin", &[1, 2, 3]),
            dns(&lab, "round-robin", &[1, 2, 3]),
        ],
        None,
    ));
    // `--datapath auto` with a pin path that is not on bpffs: the eBPF path cannot
    // load, so the agent serves the services from userspace.
    let mut args = agent_args(&lab, &dir, &["--datapath", "auto"]);
    let i = args.iter().position(|a| a == "--pin-path").unwrap();
    args[i + 1] = dir.path().join("not-bpffs").display().to_string();
    let mut agent = Agent::start(&lab, &dir, "agent", &args);
    agent.wait_ready();
    assert!(
        agent
            .log()
            .contains("falling back to the userspace data path"),
        "{}",
        agent.log()
    );
    let (_, body) = agent.get("/readyz");
    assert!(
        body.starts_with("ready\ndatapath userspace (fallback: "),
        "{body}"
    );
    let m = agent.scrape();
    assert_eq!(
        m.get(
            "rpclb_datapath_info",
            &[("datapath", "userspace"), ("fallback", "true")]
        ),
        Some(1.0)
    );
    assert!(lbctl_in_node(&lab, &["status"]).contains("datapath userspace (fallback: "));
    let node_if = lab.node_ifaces()[0].name.clone();
    let show = lab.node().ip(&["link", "show", "dev", &node_if]).unwrap();
    assert!(!show.contains("xdp"), "nothing attached: {show}");

    let c = tcp(&lab, 30);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "exact round-robin in userspace: {c:?}"
    );
    let replies = lab.client_udp(SocketAddrV4::new(UDP_VIP, 53), 9).unwrap();
    assert!(
        replies
            .iter()
            .all(|r| r.peer == SocketAddr::from((UDP_VIP, 53)))
    );
    assert_eq!(
        counts(&replies).values().copied().collect::<Vec<_>>(),
        vec![3, 3, 3]
    );
    // The same metrics as the kernel path.
    let m = agent.scrape();
    assert_eq!(
        m.get("rpclb_service_new_flows_total", &[("service", WEB)]),
        Some(30.0)
    );
    assert_eq!(
        m.get("rpclb_service_new_flows_total", &[("service", DNS)]),
        Some(9.0)
    );
    // Its VIP routes live in the node namespace only, and go with the agent.
    let routes = lab
        .node()
        .ip(&["route", "show", "table", "local", "proto", "114"])
        .unwrap();
    assert!(routes.contains(&VIP.to_string()), "{routes}");
    agent.signal(libc::SIGTERM);
    let st = agent.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(st.success(), "{st}\n{}", agent.log());
    let routes = lab
        .node()
        .ip(&["route", "show", "table", "local", "proto", "114"])
        .unwrap();
    assert!(routes.trim().is_empty(), "routes left: {routes}");
    assert!(
        agent
            .log()
            .contains("userspace data path stops with the agent"),
        "{}",
        agent.log()
    );
}

/// A selector that cannot load is visible: `lbctl status`, `lbctl selector
/// list` and `/metrics` name the service and why (a NAME whose file is not
/// in `--selector-dir`), while traffic goes on with the built-in algorithm.
/// The file put there and the config changed to it: loaded, and shown so.
#[test]
fn selector_errors_are_visible() {
    skip_unless_lab!();
    if !lb_agent::datapath::programs::kernel_has_full_set() {
        eprintln!("SKIP: selectors run in the full program set only");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new(2).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("selector");
    let sel_dir = dir.path().join("selectors");
    std::fs::create_dir_all(&sel_dir).unwrap();
    std::fs::set_permissions(&sel_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sd = sel_dir.to_str().unwrap().to_string();
    let with_selector = |name: &str| {
        let svc = web(&lab, "round-robin", &[1, 2]) + &format!("    selector: {name}\n");
        config_yaml(&[svc], None)
    };
    dir.write_config(&with_selector("nosuch"));
    let mut agent = Agent::start(
        &lab,
        &dir,
        "agent",
        &agent_args(&lab, &dir, &["--selector-dir", &sd]),
    );
    agent.wait_ready();
    let st = lbctl_in_node(&lab, &["status"]);
    assert!(st.contains("selectors: 0 of 1 loaded"), "{st}");
    let why = format!("selector nosuch: cannot read {sd}/nosuch.o: No such file or directory");
    assert!(
        st.contains(&format!(
            "NOT LOADED: {WEB} nosuch (built-in algorithm): {why}"
        )),
        "{st}"
    );
    let failed = |agent: &mut Agent, name: &str| {
        agent.scrape().get(
            "rpclb_service_selector_failed",
            &[("service", WEB), ("selector", name)],
        )
    };
    assert_eq!(failed(&mut agent, "nosuch"), Some(1.0));
    // The built-in algorithm serves meanwhile.
    let c = tcp(&lab, 10);
    assert_eq!(c.values().copied().collect::<Vec<_>>(), vec![5, 5], "{c:?}");

    // The object put in the directory, and the service changed to name it.
    let obj = sel_dir.join("geo2.o");
    std::fs::write(&obj, lb_agent::datapath::selector::EXAMPLE_GEO_OBJECT).unwrap();
    std::fs::set_permissions(&obj, std::fs::Permissions::from_mode(0o644)).unwrap();
    dir.write_config(&with_selector("geo2"));
    wait_until("the selector loaded", Duration::from_secs(15), || {
        lbctl_in_node(&lab, &["status"]).contains("selectors: 1 of 1 loaded")
    });
    assert_eq!(failed(&mut agent, "geo2"), Some(0.0));
    assert_eq!(failed(&mut agent, "nosuch"), None, "the old series is gone");
    let pin = pin_path(&lab);
    let list = lbctl_in_node(
        &lab,
        &["--pin-path", pin.to_str().unwrap(), "selector", "list"],
    );
    let row: Vec<&str> = list
        .lines()
        .find(|l| l.starts_with(WEB))
        .unwrap_or_else(|| panic!("{list}"))
        .split_whitespace()
        .collect();
    assert_eq!(row, [WEB, "geo2", "loaded"], "{list}");
    assert!(
        list.contains("the kernel does not count them per service): selector_chosen 0"),
        "{list}"
    );
    // Its table is empty: no answer, the built-in algorithm, counted.
    let c = tcp(&lab, 4);
    assert_eq!(c.values().sum::<usize>(), 4);
    let list = lbctl_in_node(
        &lab,
        &[
            "--pin-path",
            pin.to_str().unwrap(),
            "-o",
            "json",
            "selector",
            "list",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let counters: BTreeMap<String, u64> = v["counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap()))
        .collect();
    assert_eq!(counters["selector_no_answer"], 4, "{list}");
    assert_eq!(counters["selector_chosen"], 0, "{list}");
}
