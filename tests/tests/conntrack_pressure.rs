//! A conntrack map far too small for its flows (issue 10, "True counters
//! under pressure"): the real `lb-agent` with `--max-conntrack 64` (32 flows)
//! and 200 keep-alive connections through a VIP.
//!
//! Checked: how many established connections break on their next request
//! (none, for the algorithms that re-pick a flow's backend from the flow:
//! random, maglev, source-hash); that the evictions are counted, warned
//! about once per episode with the counter, and shown by `lbctl status` and
//! `lbctl conntrack`; and that once every connection has ended, the active
//! counters (`rpclb_service_active_flows`, least-conn's input) read the true
//! value within one GC sweep.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use lb_agent::datapath::MapReader;
use lb_common::ct_state;
use rpclb_tests::lab::{HeldConn, Lab};
use rpclb_tests::procs::{Proc as Agent, TestDir, agent_args, pin_path, wait_until};
use rpclb_tests::skip_unless_lab;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB: &str = "lab/web:http";
const CONNS: usize = 200;
/// The WARN line that opens an episode.
const WARN: &str = "conntrack map full";

fn config(lab: &Lab, algo: &str) -> String {
    let mut s = format!(
        "services:\n  - name: {WEB}\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    \
         algorithm: {algo}\n    backends:\n"
    );
    for i in 1..=3 {
        s.push_str(&format!(
            "      - {{ ip: {}, port: 8080 }}\n",
            lab.backend(i).ip()
        ));
    }
    // Closed flows leave the map quickly, so the episode can end.
    s.push_str("timeouts: { tcp_closing: 1 }\n");
    s
}

fn lbctl(lab: &Lab, args: &[&str]) -> String {
    let bin = rpclb_tests::procs::workspace_bin("lb-agent", "lbctl");
    let bin = bin.display().to_string();
    let pin = pin_path(lab).display().to_string();
    let mut a = vec!["--pin-path", pin.as_str()];
    a.extend_from_slice(args);
    lab.node()
        .exec(&bin, &a)
        .unwrap_or_else(|e| panic!("lbctl {args:?}: {e}"))
}

fn pinned(lab: &Lab) -> MapReader {
    MapReader::open_pinned(&pin_path(lab)).expect("open pinned maps")
}

/// Open (not closing) flows in the map: the true active count.
fn open_flows(lab: &Lab) -> u64 {
    pinned(lab)
        .conntrack()
        .unwrap()
        .iter()
        .filter(|e| e.state_code != ct_state::CLOSING)
        .count() as u64
}

/// Opens `CONNS` keep-alive connections one after another, then sends the
/// next request on each. Returns (connections, how many broke).
fn keepalive_round(lab: &Lab) -> (Vec<HeldConn>, usize) {
    let target = SocketAddrV4::new(VIP, 80);
    let mut held: Vec<HeldConn> = (0..CONNS)
        .map(|i| {
            HeldConn::open(&lab.client().ns, target)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    // The lab's servers close a connection idle for 10 s: stay well inside.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut broken = 0;
    for (i, h) in held.iter_mut().enumerate() {
        if Instant::now() > deadline || h.try_echo(&format!("again {i}")).is_err() {
            broken += 1;
        }
    }
    (held, broken)
}

fn warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(WARN)).collect()
}

fn gc_sweeps(agent: &mut Agent) -> f64 {
    agent
        .scrape()
        .get("rpclb_gc_duration_seconds_count", &[])
        .unwrap_or(0.0)
}

#[test]
fn full_conntrack_map_breaks_no_flow_counts_warns_once_and_heals() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("ctfull");
    dir.write_config(&config(&lab, "random"));
    let mut args = agent_args(&lab, &dir, &["--gc-interval", "1s"]);
    let i = args.iter().position(|a| a == "--max-conntrack").unwrap();
    args[i + 1] = "64".into();
    let mut agent = Agent::start(&lab, &dir, "agent", &args);
    agent.wait_ready();

    // Episode 1: random (the default algorithm).
    let (held, broken) = keepalive_round(&lab);
    eprintln!("random: {broken} of {CONNS} established connections broke");
    assert_eq!(broken, 0, "established connections broken by eviction");

    // Counted: after a sweep, the evictions are in the metrics and the log
    // says so once, with the counter.
    let s0 = gc_sweeps(&mut agent);
    wait_until("two GC sweeps", Duration::from_secs(10), || {
        gc_sweeps(&mut agent) >= s0 + 2.0
    });
    let m = agent.scrape();
    let evicted = m
        .get("rpclb_gc_expired_total", &[("state", "evicted")])
        .unwrap_or(0.0);
    eprintln!(
        "random: evicted {evicted}, active {:?} with {} open in the map, {:?} entries",
        m.get("rpclb_service_active_flows", &[("service", WEB)]),
        open_flows(&lab),
        m.get("rpclb_conntrack_entries", &[])
    );
    // 200 opens, 200 mid-flow re-creations; at most 32 flows fit.
    assert!(
        evicted >= (CONNS - 32) as f64,
        "evictions counted: {evicted}\n{}",
        m.0
    );
    assert_eq!(
        m.get("rpclb_conntrack_capacity", &[]),
        Some(64.0),
        "{}",
        m.0
    );
    // The round spans several sweeps that found evictions: one episode.
    assert_eq!(
        m.get("rpclb_conntrack_pressure_episodes_total", &[]),
        Some(1.0),
        "{}",
        m.0
    );
    let log = agent.log();
    let w = warnings(&log);
    assert_eq!(w.len(), 1, "one WARN for the episode:\n{log}");
    assert!(w[0].contains("WARN"), "{}", w[0]);
    assert!(w[0].contains("evicted_total="), "the counter: {}", w[0]);

    // lbctl shows fill, capacity and evictions.
    let st = lbctl(&lab, &["status"]);
    assert!(st.contains("conntrack: "), "{st}");
    assert!(st.contains(" of 64 entries ("), "{st}");
    assert!(st.contains(" open flows evicted"), "{st}");
    let json = lbctl(&lab, &["-o", "json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["conntrack"]["capacity"], 64, "{json}");
    assert!(
        v["conntrack"]["evicted_total"].as_f64() >= Some(evicted),
        "{json}"
    );
    let ct = lbctl(&lab, &["conntrack", "--limit", "1"]);
    assert!(ct.contains("conntrack map: "), "{ct}");
    assert!(ct.contains(" of 64 entries ("), "{ct}");

    // Every connection ends; within one sweep after that, the active counts
    // are the true ones.
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    let s1 = gc_sweeps(&mut agent);
    wait_until(
        "a full GC sweep after the close",
        Duration::from_secs(10),
        || gc_sweeps(&mut agent) >= s1 + 2.0,
    );
    let truth = open_flows(&lab);
    let m = agent.scrape();
    eprintln!(
        "after the close: active {:?}, {truth} open in the map",
        m.get("rpclb_service_active_flows", &[("service", WEB)])
    );
    assert_eq!(
        m.get("rpclb_service_active_flows", &[("service", WEB)]),
        Some(truth as f64),
        "active flows healed to the true count\n{}",
        m.0
    );
    assert_eq!(m.sum("rpclb_backend_active_flows", &[]), truth as f64);
    let kernel: u64 = pinned(&lab)
        .backend_stats(&lb_api::ServiceAddr {
            vip: VIP.into(),
            port: 80,
            protocol: lb_api::Protocol::Tcp,
        })
        .unwrap()
        .iter()
        .map(|b| b.active)
        .sum();
    assert_eq!(kernel, truth, "least-conn's counters (kernel maps)");

    // The map drains below the threshold: the episode ends. (Closing the
    // connections may have evicted some more, a second episode: either
    // way, one WARN per episode.)
    wait_until("the episode to end", Duration::from_secs(15), || {
        agent.scrape().get("rpclb_conntrack_pressure", &[]) == Some(0.0)
    });
    let episodes = |agent: &mut Agent| {
        agent
            .scrape()
            .get("rpclb_conntrack_pressure_episodes_total", &[])
            .unwrap()
    };
    let e1 = episodes(&mut agent);
    assert_eq!(warnings(&agent.log()).len() as f64, e1);
    assert!(agent.log().contains("conntrack pressure over"));

    // Episode 2: round-robin re-picks a backend by turn, so an evicted flow
    // lands on another backend (reset) about two times in three. Measured,
    // and a second WARN for the second episode.
    dir.write_config(&config(&lab, "round-robin"));
    agent.wait_metric("rpclb_config_reloads_total", 1.0);
    let (held, broken) = keepalive_round(&lab);
    eprintln!("round-robin: {broken} of {CONNS} established connections broke");
    let s2 = gc_sweeps(&mut agent);
    wait_until("a GC sweep", Duration::from_secs(10), || {
        gc_sweeps(&mut agent) >= s2 + 2.0
    });
    let e2 = episodes(&mut agent);
    eprintln!(
        "round-robin: evicted {:?}; episodes {e1} then {e2}",
        agent
            .scrape()
            .get("rpclb_gc_expired_total", &[("state", "evicted")])
    );
    assert!(e2 > e1, "a new episode");
    let log = agent.log();
    assert_eq!(
        warnings(&log).len() as f64,
        e2,
        "a WARN per episode:\n{log}"
    );
    drop(held);
}
