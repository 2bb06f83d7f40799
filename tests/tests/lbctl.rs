//! The real `lbctl` binary against real pinned maps (needs root).
//!
//! A data path is loaded and pinned in a private directory, two services are
//! written, flows are driven through the XDP program with BPF_PROG_TEST_RUN,
//! and every command's JSON is compared with the writer's own view; the
//! tables must show the same names and numbers.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use lb_agent::datapath::MapWriter;
use lb_agent::datapath::reader::monotonic_ns;
use lb_agent::datapath::scratch::{Hook, ScratchDatapath};
use lb_api::{Algorithm, Backend, BackendState, Protocol, Service};
use rpclb_tests::packet::{ACK, CLIENT, FIN, SYN, UDP_VIP, VIP, frame};
use serde_json::Value;

/// `target/<profile>/lbctl`, built on demand.
fn lbctl_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| rpclb_tests::procs::workspace_bin("lb-agent", "lbctl"))
}

fn can_run() -> bool {
    lb_agent::datapath::scratch::require_root("lbctl tests")
}

struct Harness(ScratchDatapath);

impl Harness {
    fn new() -> Harness {
        Harness(ScratchDatapath::new(|c| c.fib_redirect = false).expect("load data path"))
    }

    fn w(&mut self) -> &mut MapWriter {
        self.0.writer()
    }

    fn run(&mut self, frame: &[u8]) {
        self.0.run(Hook::Xdp, frame).expect("BPF_PROG_TEST_RUN");
    }
}

fn b(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 10 + i, 2)
}

fn services() -> (Service, Service) {
    let mut term = Backend::new(b(3), 8080);
    term.state = BackendState::Terminating;
    let web = Service {
        max_per_backend: None,
        selector: None,
        external: Default::default(),
        name: "demo/web:http".into(),
        vip: VIP.into(),
        port: 80,
        protocol: Protocol::Tcp,
        algorithm: Algorithm::Maglev,
        affinity_timeout: None,
        maglev_table_size: None,
        locality: None,
        grpc: None,
        health_check: None,
        backends: vec![
            Backend::new(b(1), 8080),
            Backend {
                weight: 2,
                ..Backend::new(b(2), 8080)
            },
            term,
        ],
    };
    let dns = Service {
        max_per_backend: None,
        selector: None,
        external: Default::default(),
        name: "demo/dns:dns".into(),
        vip: UDP_VIP.into(),
        port: 53,
        protocol: Protocol::Udp,
        algorithm: Algorithm::RoundRobin,
        affinity_timeout: None,
        maglev_table_size: None,
        locality: None,
        grpc: None,
        health_check: None,
        backends: vec![Backend::new(b(4), 5353), Backend::new(b(5), 5353)],
    };
    (web, dns)
}

/// Loads, writes the two services, and drives 6 TCP flows (one closed) and
/// 3 UDP flows through the program.
fn setup() -> (Harness, Service, Service) {
    let mut h = Harness::new();
    let (web, dns) = services();
    h.w().upsert_service(&web).unwrap();
    h.w().upsert_service(&dns).unwrap();
    for p in 40001..=40006 {
        h.run(&frame(6, CLIENT, p, VIP, 80, SYN));
        h.run(&frame(6, CLIENT, p, VIP, 80, ACK));
    }
    h.run(&frame(6, CLIENT, 40006, VIP, 80, FIN | ACK));
    for p in 41001..=41003 {
        h.run(&frame(17, CLIENT, p, UDP_VIP, 53, 0));
    }
    (h, web, dns)
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn lbctl_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(lbctl_bin());
    c.args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RPCLB_PIN_PATH");
    c
}

fn output(mut c: Command) -> Out {
    let o = c.output().expect("run lbctl");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

/// Runs lbctl with `--pin-path`; it must succeed.
fn lbctl(pin: &Path, args: &[&str]) -> String {
    let mut full = vec!["--pin-path", pin.to_str().unwrap()];
    full.extend_from_slice(args);
    let o = output(lbctl_cmd(&full));
    assert_eq!(
        o.code, 0,
        "lbctl {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        o.stdout, o.stderr
    );
    assert!(o.stderr.is_empty(), "lbctl {args:?} stderr: {}", o.stderr);
    o.stdout
}

fn lbctl_json(pin: &Path, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    let s = lbctl(pin, &full);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("lbctl {args:?}: bad JSON: {e}\n{s}"))
}

/// The whitespace-separated cells of the table row that starts with `first`.
fn row<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"))
}

fn rows_with<'a>(table: &'a str, needle: &str) -> Vec<&'a str> {
    table.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn services_and_backends_match_the_maps() {
    if !can_run() {
        return;
    }
    let (mut h, web, dns) = setup();
    let pin = h.0.dir().to_path_buf();
    let w = h.w();

    // services, JSON: every field against the writer.
    let j = lbctl_json(&pin, &["services"]);
    let arr = j.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    for s in [&web, &dns] {
        let addr = s.addr();
        let js = arr.iter().find(|x| x["name"] == s.name.as_str()).unwrap();
        let st = w.service_stats(&addr).unwrap();
        let bs = w.backend_stats(&addr).unwrap();
        let info = w.services().into_iter().find(|i| i.addr == addr).unwrap();
        assert_eq!(js["address"], addr.to_string());
        assert_eq!(js["vip"], addr.vip.to_string());
        assert_eq!(js["port"], addr.port);
        assert_eq!(js["protocol"], addr.protocol.as_str());
        assert_eq!(js["algorithm"], s.algorithm.as_str());
        assert_eq!(js["backends_active"], info.backends_active);
        assert_eq!(js["backends_terminating"], info.backends_terminating);
        assert_eq!(js["new_flows"], st.new_flows);
        assert_eq!(js["packets"], st.packets);
        assert_eq!(js["bytes"], st.bytes);
        assert_eq!(js["drops"], st.drops);
        assert_eq!(js["active_flows"], bs.iter().map(|b| b.active).sum::<u64>());
        assert_eq!(js["table_size"], info.table_len);
    }
    let jweb = arr.iter().find(|x| x["name"] == "demo/web:http").unwrap();
    assert_eq!(jweb["new_flows"], 6);
    assert_eq!(jweb["active_flows"], 5, "6 opened, 1 closed");
    assert_eq!(jweb["backends_active"], 2);
    assert_eq!(jweb["backends_terminating"], 1);
    let jdns = arr.iter().find(|x| x["name"] == "demo/dns:dns").unwrap();
    assert_eq!(
        (jdns["new_flows"].as_u64(), jdns["active_flows"].as_u64()),
        (Some(3), Some(3))
    );

    // services, table.
    let t = lbctl(&pin, &["services"]);
    eprintln!("{t}");
    assert!(t.starts_with("NAME"), "{t}");
    let r = row(&t, "demo/web:http");
    let st = w.service_stats(&web.addr()).unwrap();
    assert_eq!(
        r,
        vec![
            "demo/web:http",
            "10.96.0.10:80/tcp",
            "maglev",
            "2",
            "1",
            "6",
            "5",
            &st.packets.to_string(),
            &format!("{}B", st.bytes),
        ]
    );
    let r = row(&t, "demo/dns:dns");
    assert_eq!(
        &r[1..7],
        ["10.96.0.53:53/udp", "round-robin", "2", "0", "3", "3"]
    );
    assert!(t.lines().all(|l| l.chars().count() <= 120), "{t}");

    // backends, JSON, all services.
    let j = lbctl_json(&pin, &["backends"]);
    let arr = j.as_array().unwrap();
    assert_eq!(arr.len(), 5);
    for s in [&web, &dns] {
        for bs in w.backend_stats(&s.addr()).unwrap() {
            let addr = format!("{}:{}", bs.ip, bs.port);
            let jb = arr
                .iter()
                .find(|x| x["address"] == addr.as_str() && x["service"] == s.name.as_str())
                .unwrap_or_else(|| panic!("backend {addr} missing"));
            assert_eq!(jb["service_address"], s.addr().to_string());
            assert_eq!(jb["weight"], bs.weight);
            assert_eq!(jb["state"], bs.state);
            assert_eq!(jb["active"], bs.active);
            assert_eq!(jb["new_flows"], bs.new_flows);
            assert_eq!(jb["packets"], bs.packets);
            assert_eq!(jb["bytes"], bs.bytes);
        }
    }
    let total_active: u64 = arr.iter().map(|x| x["active"].as_u64().unwrap()).sum();
    assert_eq!(total_active, 8);

    // backends of one service, by name and by address, table and JSON.
    let t = lbctl(&pin, &["backends", "demo/web:http"]);
    eprintln!("{t}");
    assert_eq!(rows_with(&t, "demo/web:http").len(), 3, "{t}");
    assert!(rows_with(&t, "demo/dns").is_empty(), "{t}");
    for bs in w.backend_stats(&web.addr()).unwrap() {
        let line = rows_with(&t, &format!("{}:{}", bs.ip, bs.port))[0];
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[2], bs.weight.to_string());
        assert_eq!(cells[3], bs.state);
        assert_eq!(cells[4], bs.active.to_string());
        assert_eq!(cells[5], bs.new_flows.to_string());
        assert_eq!(cells[6], bs.packets.to_string());
    }
    let j = lbctl_json(&pin, &["backends", "10.96.0.53:53/udp"]);
    assert_eq!(j.as_array().unwrap().len(), 2);
    assert!(
        j.as_array()
            .unwrap()
            .iter()
            .all(|x| x["service"] == "demo/dns:dns")
    );
    // A service name without its port, when unique.
    let j = lbctl_json(&pin, &["backends", "demo/dns"]);
    assert_eq!(j.as_array().unwrap().len(), 2);
}

#[test]
fn conntrack_and_maglev_match_the_maps() {
    if !can_run() {
        return;
    }
    let (mut h, web, dns) = setup();
    let pin = h.0.dir().to_path_buf();
    let w = h.w();

    // conntrack, JSON vs the writer's view.
    let want = w.conntrack().unwrap();
    assert_eq!(want.len(), 9);
    let before = monotonic_ns();
    let j = lbctl_json(&pin, &["conntrack"]);
    let after = monotonic_ns();
    let arr = j.as_array().unwrap();
    let got: BTreeSet<(String, String, String, String, String, String)> = arr
        .iter()
        .map(|x| {
            (
                x["client"].as_str().unwrap().to_string(),
                x["vip"].as_str().unwrap().to_string(),
                x["service"].as_str().unwrap().to_string(),
                x["backend"].as_str().unwrap().to_string(),
                x["protocol"].as_str().unwrap().to_string(),
                x["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let exp: BTreeSet<_> = want
        .iter()
        .map(|e| {
            let name = if e.proto == Protocol::Udp {
                &dns.name
            } else {
                &web.name
            };
            (
                format!("{}:{}", e.client.0, e.client.1),
                format!("{}:{}", e.vip.0, e.vip.1),
                name.clone(),
                format!("{}:{}", e.backend.0, e.backend.1),
                e.proto.as_str().to_string(),
                e.state.to_string(),
            )
        })
        .collect();
    assert_eq!(got, exp);
    for x in arr {
        let e = want
            .iter()
            .find(|e| format!("{}:{}", e.client.0, e.client.1) == x["client"])
            .unwrap();
        assert_eq!(x["created_ns"], e.created_ns);
        assert_eq!(x["last_seen_ns"], e.last_seen_ns);
        // lbctl's age is from its own clock reading, between `before` and `after`.
        let age = x["age_seconds"].as_f64().unwrap();
        let secs = |t: u64| t.saturating_sub(e.created_ns) as f64 / 1e9;
        assert!(
            (secs(before) - 1e-3..=secs(after) + 1e-3).contains(&age),
            "age {age}, between {} and {}",
            secs(before),
            secs(after)
        );
        assert!(x["idle_seconds"].as_f64().unwrap() <= x["age_seconds"].as_f64().unwrap());
    }
    let states: Vec<&str> = arr.iter().map(|x| x["state"].as_str().unwrap()).collect();
    assert_eq!(states.iter().filter(|&&s| s == "established").count(), 5);
    assert_eq!(states.iter().filter(|&&s| s == "closing").count(), 1);
    assert_eq!(states.iter().filter(|&&s| s == "udp").count(), 3);

    // Filters.
    let j = lbctl_json(&pin, &["conntrack", "--service", "demo/dns:dns"]);
    assert_eq!(j.as_array().unwrap().len(), 3);
    let b1 = want
        .iter()
        .find(|e| e.proto == Protocol::Tcp)
        .unwrap()
        .backend;
    let n_b1 = want.iter().filter(|e| e.backend == b1).count();
    let j = lbctl_json(&pin, &["conntrack", "--backend", &b1.0.to_string()]);
    assert_eq!(j.as_array().unwrap().len(), n_b1);
    let j = lbctl_json(&pin, &["conntrack", "--backend", &format!("{}:1", b1.0)]);
    assert_eq!(j.as_array().unwrap().len(), 0);
    let j = lbctl_json(&pin, &["conntrack", "--limit", "2"]);
    assert_eq!(j.as_array().unwrap().len(), 2);
    let t = lbctl(&pin, &["conntrack", "--limit", "2"]);
    assert!(
        // One entry per flow: no backend replied (see `setup`).
        t.contains("2 of 9 flows shown (9 conntrack entries)"),
        "{t}"
    );

    // conntrack, table.
    let t = lbctl(&pin, &["conntrack"]);
    eprintln!("{t}");
    assert!(t.starts_with("CLIENT"), "{t}");
    for e in &want {
        let client = format!("{}:{}", e.client.0, e.client.1);
        let r = row(&t, &client);
        assert_eq!(r[2], format!("{}:{}", e.backend.0, e.backend.1));
        assert_eq!(r[3], e.proto.as_str());
        assert_eq!(r[4], e.state);
        assert!(r[1].starts_with("demo/"), "{r:?}");
    }
    assert!(t.contains("9 flows (9 conntrack entries)"), "{t}");
    assert!(t.lines().all(|l| l.chars().count() <= 120), "{t}");

    // maglev, JSON: the table's counts per backend.
    let table = w.service_table(&web.addr()).unwrap();
    let j = lbctl_json(&pin, &["maglev", "demo/web:http"]);
    assert_eq!(j["service"], "demo/web:http");
    assert_eq!(j["kind"], "maglev");
    assert_eq!(j["table_size"], table.len());
    assert_eq!(table.len(), 16381);
    let mut sum = 0;
    for bs in w.backend_stats(&web.addr()).unwrap() {
        let jb = j["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["address"] == format!("{}:{}", bs.ip, bs.port).as_str())
            .unwrap();
        let n = table.iter().filter(|&&id| id == bs.id).count();
        assert_eq!(jb["entries"], n);
        sum += n;
        if bs.state == "terminating" {
            assert_eq!(n, 0);
            assert_eq!(jb["expected_pct"], 0.0);
        }
    }
    assert_eq!(sum, table.len());
    let b2 = j["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["weight"] == 2)
        .unwrap();
    assert_eq!(b2["expected_pct"], 66.67);
    let share = b2["share_pct"].as_f64().unwrap();
    assert!((60.0..73.0).contains(&share), "weight-2 share {share}");

    // maglev, table.
    let t = lbctl(&pin, &["maglev", "10.96.0.10:80"]);
    eprintln!("{t}");
    assert!(t.contains("demo/web:http"), "{t}");
    assert!(t.contains("maglev table, 16381 entries"), "{t}");
    let r = row(&t, &format!("{}:8080", b(2)));
    assert_eq!(r[1], "2");
    assert_eq!(r[3], b2["entries"].to_string());

    // A round-robin service has a weighted slot list.
    let j = lbctl_json(&pin, &["maglev", "demo/dns:dns"]);
    assert_eq!(j["kind"], "weighted");
    assert_eq!(j["table_size"], w.service_table(&dns.addr()).unwrap().len());

    // A removed service's flows stay until they end; they are labelled as
    // such, never with another service's name.
    w.remove_service(&dns.addr()).unwrap();
    let j = lbctl_json(&pin, &["conntrack"]);
    let arr = j.as_array().unwrap();
    assert_eq!(arr.len(), 9);
    for x in arr {
        let want = if x["protocol"] == "udp" {
            "(removed service)"
        } else {
            "demo/web:http"
        };
        assert_eq!(x["service"], want, "{x}");
    }
    let j = lbctl_json(&pin, &["services"]);
    assert_eq!(j.as_array().unwrap().len(), 1);
}

#[test]
fn stats_match_the_maps_and_watch_shows_rates() {
    if !can_run() {
        return;
    }
    let (mut h, web, _dns) = setup();
    let pin = h.0.dir().to_path_buf();
    let w = h.w();
    let reasons = w.reasons().unwrap();
    let get = |n: &str| reasons.iter().find(|r| r.0 == n).unwrap().1;

    let j = lbctl_json(&pin, &["stats"]);
    assert_eq!(
        j["totals"]["forwarded"],
        get("nat_forward") + get("nat_reverse")
    );
    assert_eq!(
        j["totals"]["forwarded"], 16,
        "12 TCP + 1 FIN + 3 UDP packets"
    );
    assert_eq!(j["totals"]["dropped"], 0);
    // One entry per flow: no backend replied, so no reverse entries (the
    // first reply writes them: lb-ebpf's `conntrack::first_reply`).
    assert_eq!(j["conntrack_entries"], 9);
    assert_eq!(j["interval_seconds"], Value::Null);
    for (name, count) in &reasons {
        let jr = j["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["reason"] == *name)
            .unwrap();
        assert_eq!(jr["count"], *count, "{name}");
    }
    let st = w.service_stats(&web.addr()).unwrap();
    let js = j["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "demo/web:http")
        .unwrap();
    assert_eq!(js["packets"], st.packets);
    assert_eq!(js["bytes"], st.bytes);
    assert_eq!(js["new_flows"], 6);

    let t = lbctl(&pin, &["stats"]);
    eprintln!("{t}");
    let r = row(&t, "nat");
    assert_eq!(r[1..], ["nat_forward", "16"]);
    let r = row(&t, "demo/web:http");
    assert_eq!(r[1], st.packets.to_string());
    assert!(t.starts_with("forwarded 16  "), "{t}");

    // --watch: two frames; traffic between them shows up as rates.
    let child = lbctl_cmd(&[
        "--pin-path",
        pin.to_str().unwrap(),
        "stats",
        "--watch",
        "--interval",
        "700ms",
        "--count",
        "2",
        "-o",
        "json",
    ])
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(250));
    for _ in 0..10 {
        h.run(&frame(6, CLIENT, 40001, VIP, 80, ACK));
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    let frames: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(frames.len(), 2, "{text}");
    assert_eq!(frames[0]["interval_seconds"], Value::Null);
    let dt = frames[1]["interval_seconds"].as_f64().unwrap();
    assert!(dt >= 0.6, "{dt}");
    let nat = |f: &Value| {
        f["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["reason"] == "nat_forward")
            .unwrap()
            .clone()
    };
    assert_eq!(
        nat(&frames[1])["count"].as_u64().unwrap() - nat(&frames[0])["count"].as_u64().unwrap(),
        10
    );
    let rate = nat(&frames[1])["per_second"].as_f64().unwrap();
    assert!((rate - 10.0 / dt).abs() < 0.2, "rate {rate}, dt {dt}");

    // --watch as a table (not a terminal: frames follow each other).
    let t = lbctl(
        &pin,
        &["stats", "--watch", "--interval", "50ms", "--count", "2"],
    );
    assert!(
        t.contains("(frame 1 of 2)") && t.contains("(frame 2 of 2)"),
        "{t}"
    );
    assert!(t.contains("PER SEC"), "{t}");
    assert!(!t.contains('\x1b'), "no ANSI codes when not a terminal");
}

#[test]
fn plain_errors_and_exit_codes() {
    if !can_run() {
        return;
    }
    let missing = format!("/sys/fs/bpf/rpclb-lbctl-missing-{}", std::process::id());
    for args in [
        vec!["services"],
        vec!["-o", "json", "conntrack"],
        vec!["stats", "--watch", "--count", "1"],
    ] {
        let mut full = vec!["--pin-path", missing.as_str()];
        full.extend(args.iter().copied());
        let o = output(lbctl_cmd(&full));
        assert_eq!(o.code, 1, "{args:?}");
        assert_eq!(
            o.stderr,
            format!(
                "lbctl: no rpclb state at {missing}: is the agent running, or is --pin-path right?\n"
            )
        );
        assert!(o.stdout.is_empty());
    }

    let (h, _, _) = setup();
    let pin = h.0.dir().to_str().unwrap();

    // The pin path from the environment.
    let mut c = lbctl_cmd(&["services"]);
    c.env("RPCLB_PIN_PATH", pin);
    let o = output(c);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("demo/web:http"));

    // Not root: a plain permission message.
    let mut c = lbctl_cmd(&["--pin-path", pin, "services"]);
    c.uid(65534).gid(65534);
    let o = output(c);
    assert_eq!(o.code, 1, "{} {}", o.stdout, o.stderr);
    assert!(
        o.stderr.starts_with("lbctl: permission denied reading ")
            && o.stderr.contains("root (or with CAP_BPF)"),
        "{}",
        o.stderr
    );
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);

    // A service that does not exist, and an ambiguous one.
    let o = output(lbctl_cmd(&["--pin-path", pin, "maglev", "demo/nope:http"]));
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr,
        "lbctl: no service matches \"demo/nope:http\" (`lbctl services` lists them)\n"
    );
    let o = output(lbctl_cmd(&[
        "--pin-path",
        pin,
        "conntrack",
        "--backend",
        "pod-1",
    ]));
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("not an IPv4 address"), "{}", o.stderr);
    assert!(!o.stderr.contains("panicked") && !o.stderr.contains("backtrace"));
}

/// lbctl reads through a `MapReader` opened read-only: it sees the
/// services the writer wrote, and the kernel refuses any write through its
/// fds.
#[test]
fn the_reader_sees_everything_and_cannot_write() {
    if !can_run() {
        return;
    }
    let (h, web, dns) = setup();
    let r = lb_agent::datapath::MapReader::open_pinned(h.0.dir()).expect("open read-only");
    let mut names: Vec<String> = r.services().into_iter().map(|s| s.name).collect();
    names.sort();
    let mut want = vec![web.name.clone(), dns.name.clone()];
    want.sort();
    assert_eq!(names, want);
    assert!(!r.service_table(&web.addr()).unwrap().is_empty());
    let key = lb_common::FlowKey::default();
    let value = lb_common::CtValue::default();
    use std::os::fd::AsRawFd;
    let e = lb_agent::datapath::sys::update(r.conntrack_fd().as_raw_fd(), &key, &value, 0)
        .expect_err("a read-only fd must not write");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
}

/// `lbctl conntrack` shows the source port the backend sees when the kernel
/// rewrote the client's (a reverse-conntrack collision: one client ip:port
/// reaching two VIPs that share a backend). Before, the row showed only the
/// client's own port, so the backend's view of the flow could not be found.
#[test]
fn conntrack_shows_a_rewritten_client_port() {
    if !can_run() {
        return;
    }
    let mut h = Harness::new();
    let vip2 = Ipv4Addr::new(10, 96, 0, 11);
    for (name, vip) in [("demo/a:http", VIP), ("demo/b:http", vip2)] {
        let svc = Service {
            max_per_backend: None,
            selector: None,
            external: Default::default(),
            name: name.into(),
            vip: vip.into(),
            port: 80,
            protocol: Protocol::Tcp,
            algorithm: Algorithm::Maglev,
            affinity_timeout: None,
            maglev_table_size: None,
            locality: None,
            grpc: None,
            health_check: None,
            backends: vec![Backend::new(b(1), 8080)],
        };
        h.w().upsert_service(&svc).unwrap();
    }
    h.run(&frame(6, CLIENT, 45_000, VIP, 80, SYN));
    h.run(&frame(6, CLIENT, 45_000, vip2, 80, SYN));
    let want = h.w().conntrack().unwrap();
    let sees = |vip: Ipv4Addr| {
        want.iter()
            .find(|e| e.vip == (vip, 80))
            .unwrap()
            .backend_sees
    };
    assert_eq!(sees(VIP), None);
    let port = sees(vip2).expect("the second flow's port was rewritten");
    assert_ne!(port, 45_000);

    let pin = h.0.dir().to_path_buf();
    let j = lbctl_json(&pin, &["conntrack"]);
    let by_vip = |vip: Ipv4Addr| {
        j.as_array()
            .unwrap()
            .iter()
            .find(|x| x["vip"] == format!("{vip}:80"))
            .unwrap()
            .clone()
    };
    assert_eq!(by_vip(VIP)["backend_sees_port"], Value::Null);
    assert_eq!(by_vip(vip2)["backend_sees_port"], port);
    assert_eq!(by_vip(vip2)["client"], format!("{CLIENT}:45000"));

    let t = lbctl(&pin, &["conntrack"]);
    let r = rows_with(&t, "demo/b:http");
    assert_eq!(r.len(), 1, "{t}");
    assert!(
        r[0].starts_with(&format!("{CLIENT}:45000 (as :{port})")),
        "{t}"
    );
    let r = rows_with(&t, "demo/a:http");
    assert!(!r[0].contains("(as"), "{t}");
}

/// `lbctl backends` shows each backend's QoS limit beside its open flows
/// (`ACTIVE` as `open/limit`; JSON `limit`, null without one).
#[test]
fn backends_show_qos_limits() {
    if !can_run() {
        return;
    }
    let mut h = Harness::new();
    let mut svc = Service::new(
        "demo/qos:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        vec![Backend::new(b(1), 8080), Backend::new(b(2), 8080)],
    );
    svc.max_per_backend = Some(3);
    svc.backends[1].max = Some(1);
    h.w().upsert_service(&svc).unwrap();
    // 4 flows fit only as 3 + 1.
    for p in 0..4u16 {
        h.run(&frame(6, CLIENT, 46_000 + p, VIP, 80, SYN));
    }
    let plain = Service::new(
        "demo/plain:http",
        Ipv4Addr::new(10, 96, 0, 12),
        80,
        Protocol::Tcp,
        Algorithm::Random,
        vec![Backend::new(b(3), 8080)],
    );
    h.w().upsert_service(&plain).unwrap();
    let want = h.w().backend_stats(&svc.addr()).unwrap();
    let active = |ip: Ipv4Addr| want.iter().find(|b| b.ip == ip).unwrap().active;
    assert_eq!(
        (active(b(1)), active(b(2))),
        (3, 1),
        "4 flows fit only as 3 + 1"
    );

    let pin = h.0.dir().to_path_buf();
    let j = lbctl_json(&pin, &["backends"]);
    let row = |ip: Ipv4Addr| {
        j.as_array()
            .unwrap()
            .iter()
            .find(|x| x["ip"] == ip.to_string())
            .unwrap()
            .clone()
    };
    assert_eq!(
        (row(b(1))["limit"].clone(), row(b(1))["active"].clone()),
        (3.into(), 3.into())
    );
    assert_eq!(
        (row(b(2))["limit"].clone(), row(b(2))["active"].clone()),
        (1.into(), 1.into())
    );
    assert_eq!(row(b(3))["limit"], Value::Null);

    let t = lbctl(&pin, &["backends"]);
    eprintln!("{t}");
    let cell = |ip: Ipv4Addr| {
        rows_with(&t, &format!("{ip}:8080"))[0]
            .split_whitespace()
            .nth(4)
            .unwrap()
            .to_string()
    };
    assert_eq!(
        (cell(b(1)), cell(b(2)), cell(b(3))),
        ("3/3".into(), "1/1".into(), "0".into())
    );
}

/// An Ethernet/IPv6/TCP SYN (checksum left 0: these flows are only looked at).
fn syn6(src: std::net::Ipv6Addr, sport: u16, dst: std::net::Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 3, 232, 0, 0, 0, 0, 0x50, SYN, 0xfa, 0xf0, 0, 0, 0, 0]);
    f
}

/// `lbctl conntrack` says how each flow is translated (`nat`: `dnat`,
/// `snat`, `hairpin`, from the entries' `ct_flags`) and, for a SNATed flow,
/// which source address and port the backend sees: a `Cluster` front end's
/// flow to another node's backend (SNATed to the node's address) and a pod
/// reaching itself (SNATed to the service loopback), IPv4 and IPv6. Before,
/// such rows looked like plain DNATed flows. Each flow's idle time counts its
/// replies (its reverse entry's last-seen), also for a SNATed IPv4 flow and
/// every IPv6 flow: before, those took the forward entry's alone.
#[test]
fn conntrack_shows_snat_and_hairpin() {
    if !can_run() {
        return;
    }
    use std::net::{IpAddr, Ipv6Addr};
    let node = Ipv4Addr::new(192, 168, 50, 1);
    let node6: Ipv6Addr = "fd00:50::1".parse().unwrap();
    let mut h = Harness(
        ScratchDatapath::new(|c| {
            c.fib_redirect = false;
            c.snat_address = Some(node);
            c.snat_address6 = Some(node6);
        })
        .expect("load data path"),
    );
    let fe = Ipv4Addr::new(192, 168, 60, 1);
    let remote = Ipv4Addr::new(10, 244, 32, 2);
    let (cip, pod) = (Ipv4Addr::new(10, 96, 0, 40), Ipv4Addr::new(10, 244, 32, 5));
    let fe6: Ipv6Addr = "fd00:60::10".parse().unwrap();
    let remote6: Ipv6Addr = "fd00:10:244:32::2".parse().unwrap();
    let cip6: Ipv6Addr = "fd00:10:96::40".parse().unwrap();
    let pod6: Ipv6Addr = "fd00:10:244:32::5".parse().unwrap();
    let svc = |name: &str, vip: IpAddr, b: IpAddr| {
        Service::new(
            name,
            vip,
            80,
            Protocol::Tcp,
            Algorithm::Maglev,
            vec![Backend::new(b, 8080)],
        )
    };
    let svcs = [
        svc("ext/remote", fe.into(), remote.into()),
        svc("ext/remote6", fe6.into(), remote6.into()),
        svc("pod/self", cip.into(), pod.into()),
        svc("pod/self6", cip6.into(), pod6.into()),
        svc("demo/web:http", VIP.into(), b(1).into()),
    ];
    // The agent marks a `Cluster` front end's backends on other nodes.
    let snat: std::collections::HashSet<_> = svcs[..2]
        .iter()
        .map(|s| (s.addr(), s.backends[0].ip, 8080))
        .collect();
    h.w().set_snat(snat);
    for s in &svcs {
        h.w().upsert_service(s).unwrap();
    }
    let c6: Ipv6Addr = "fd00:50::100".parse().unwrap();
    h.run(&frame(6, CLIENT, 40000, fe, 80, SYN));
    h.run(&syn6(c6, 40000, fe6, 80));
    h.run(&frame(6, pod, 40001, cip, 80, SYN));
    h.run(&syn6(pod6, 40001, cip6, 80));
    h.run(&frame(6, CLIENT, 40002, VIP, 80, SYN));

    let pin = h.0.dir().to_path_buf();
    let j = lbctl_json(&pin, &["conntrack"]);
    let rows = j.as_array().unwrap();
    assert_eq!(rows.len(), 5, "{j:#}");
    let by = |vip: String| {
        rows.iter()
            .find(|x| x["vip"] == vip)
            .unwrap_or_else(|| panic!("no flow to {vip}: {j:#}"))
            .clone()
    };
    let snat_port = |r: &Value| {
        let p = r["backend_sees_port"].as_u64().expect("a SNAT port");
        assert!((62000..=65535).contains(&p), "{r}");
        p
    };
    let mut want_rows = Vec::new();
    for (vip, nat, addr, shown) in [
        (
            format!("{fe}:80"),
            "snat",
            node.to_string(),
            node.to_string(),
        ),
        (
            format!("[{fe6}]:80"),
            "snat",
            node6.to_string(),
            format!("[{node6}]"),
        ),
        (
            format!("{cip}:80"),
            "hairpin",
            "169.254.42.1".into(),
            "169.254.42.1".into(),
        ),
        (
            format!("[{cip6}]:80"),
            "hairpin",
            "100::a9fe:2a01".into(),
            "[100::a9fe:2a01]".into(),
        ),
    ] {
        let r = by(vip.clone());
        assert_eq!(r["nat"], nat, "{vip}: {r}");
        assert_eq!(r["backend_sees_address"], addr.as_str(), "{vip}: {r}");
        let p = snat_port(&r);
        let client = r["client"].as_str().unwrap().to_string();
        want_rows.push(format!("{client} ({nat} as {shown}:{p})"));
    }
    let plain = by(format!("{VIP}:80"));
    assert_eq!(plain["nat"], "dnat");
    assert_eq!(plain["backend_sees_address"], Value::Null);
    assert_eq!(plain["backend_sees_port"], Value::Null);

    let t = lbctl(&pin, &["conntrack"]);
    for w in &want_rows {
        assert!(
            t.lines().any(|l| l.starts_with(w.as_str())),
            "{w:?} in\n{t}"
        );
    }
    let r = rows_with(&t, "demo/web:http");
    assert!(
        r[0].starts_with(&format!("{CLIENT}:40002 ")) && !r[0].contains(" as "),
        "{t}"
    );

    // Idle time: every flow's client went quiet 100 s ago (its forward entry),
    // its backend answered just now (its reverse entry). The flow is not idle.
    // (The plain flow's reverse entry comes with its first reply.)
    h.run(&frame(6, b(1), 8080, CLIENT, 40002, SYN | ACK));
    let now = monotonic_ns();
    let (quiet, born) = (now - 100_000_000_000, now - 200_000_000_000);
    let entries: Vec<_> = h.w().conntrack_map().iter().map(|e| e.unwrap()).collect();
    for (k, mut v) in entries {
        if v.dir == lb_common::ct_dir::FORWARD {
            (v.created_ns, v.last_seen_ns) = (born, quiet);
        } else {
            v.last_seen_ns = now;
        }
        h.w().conntrack_map().insert(k, v, 0).unwrap();
    }
    let p = pin.join(lb_common::map_names::CONNTRACK6);
    let md = aya::maps::MapData::from_pin(&p).unwrap();
    let mut ct6: aya::maps::HashMap<_, lb_common::FlowKey6, lb_common::CtValue6> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(md)).unwrap();
    let entries: Vec<_> = ct6.iter().map(|e| e.unwrap()).collect();
    assert_eq!(entries.len(), 4, "two IPv6 flows, two entries each");
    for (k, mut v) in entries {
        if v.ct.dir == lb_common::ct_dir::FORWARD {
            (v.ct.created_ns, v.ct.last_seen_ns) = (born, quiet);
        } else {
            v.ct.last_seen_ns = now;
        }
        ct6.insert(k, v, 0).unwrap();
    }
    let j = lbctl_json(&pin, &["conntrack"]);
    let rows = j.as_array().unwrap();
    assert_eq!(rows.len(), 5, "{j:#}");
    for r in rows {
        let (idle, age) = (
            r["idle_seconds"].as_f64().unwrap(),
            r["age_seconds"].as_f64().unwrap(),
        );
        assert!(idle < 50.0, "a reply just now: {r}");
        assert!((200.0..300.0).contains(&age), "{r}");
    }
}

/// `lbctl selector geo add/list/del` on the example selector's real pinned
/// table (an LPM trie), read back with aya; a SYN through the XDP program
/// goes where the entry says; deleted, the built-in algorithm again.
#[test]
fn selector_geo_table() {
    use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
    if !can_run() {
        return;
    }
    if !lb_agent::datapath::programs::kernel_has_full_set() {
        eprintln!("SKIP: selectors run in the full program set only");
        return;
    }
    let mut h = Harness::new();
    let pin = h.0.dir().to_path_buf();
    let pin_s = pin.to_str().unwrap();

    // No service uses the example yet: no table, a plain error.
    let o = output(lbctl_cmd(&["--pin-path", pin_s, "selector", "geo", "list"]));
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("no service uses example:geo yet"),
        "{}",
        o.stderr
    );

    let mut geo = Service::new(
        "demo/geo:http",
        VIP,
        80,
        Protocol::Tcp,
        Algorithm::Random,
        (1..=3).map(|i| Backend::new(b(i), 8080)).collect(),
    );
    geo.selector = Some("example:geo".into());
    h.w().upsert_service(&geo).unwrap();
    assert!(
        h.w().selector_in_place(&geo.addr()),
        "{:?}",
        h.w().selector_errors()
    );

    // CLIENT is 10.244.1.2: its /24 to backend index 2 (b(3)); host bits are cleared.
    assert_eq!(
        lbctl(
            &pin,
            &[
                "selector",
                "geo",
                "add",
                "10.244.1.77/24",
                "--backends",
                "2"
            ]
        ),
        "10.244.1.0/24: backends 2\n"
    );
    assert_eq!(
        lbctl_json(
            &pin,
            &["selector", "geo", "add", "10.0.0.0/8", "--backends", "0,1"]
        ),
        serde_json::json!({"subnet": "10.0.0.0/8", "backends": [0, 1]})
    );
    // The map holds exactly that (key: prefix length, address in network order).
    let p = lb_agent::datapath::selector::maps_dir(&pin).join(lb_common::geo::MAP);
    let t: LpmTrie<MapData, lb_common::geo::Subnet, lb_common::geo::Mask> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(MapData::from_pin(&p).unwrap())).unwrap();
    let k = |a: [u8; 4], len| Key::new(len, u32::from_ne_bytes(a));
    assert_eq!(t.get(&k([10, 244, 1, 0], 24), 0).unwrap(), 0b100);
    assert_eq!(t.get(&k([10, 0, 0, 0], 8), 0).unwrap(), 0b011);
    assert_eq!(t.iter().count(), 2);
    assert_eq!(
        lbctl_json(&pin, &["selector", "geo", "list"]),
        serde_json::json!([
            {"subnet": "10.0.0.0/8", "backends": [0, 1]},
            {"subnet": "10.244.1.0/24", "backends": [2]}
        ])
    );
    let table = lbctl(&pin, &["selector", "geo", "list"]);
    assert_eq!(row(&table, "10.244.1.0/24"), ["10.244.1.0/24", "2"]);
    assert_eq!(row(&table, "10.0.0.0/8"), ["10.0.0.0/8", "0,1"]);

    // The longest prefix wins: CLIENT's SYNs all go to b(3).
    let dst = |h: &mut Harness, sport: u16| -> Ipv4Addr {
        let (_, out) =
            h.0.run(Hook::Xdp, &frame(6, CLIENT, sport, VIP, 80, SYN))
                .expect("BPF_PROG_TEST_RUN");
        Ipv4Addr::new(out[30], out[31], out[32], out[33])
    };
    for sport in 45000..45008 {
        assert_eq!(dst(&mut h, sport), b(3), "sport {sport}");
    }
    let chosen = |h: &mut Harness| {
        h.w()
            .reasons()
            .unwrap()
            .into_iter()
            .find(|(n, _)| *n == "selector_chosen")
            .unwrap()
            .1
    };
    assert_eq!(chosen(&mut h), 8);

    // Deleted: the /8 holds CLIENT now (backends 0 and 1 only).
    assert_eq!(
        lbctl(&pin, &["selector", "geo", "del", "10.244.1.0/24"]),
        "10.244.1.0/24: deleted\n"
    );
    let mut seen = BTreeSet::new();
    for sport in 45100..45116 {
        seen.insert(dst(&mut h, sport));
    }
    assert_eq!(seen, BTreeSet::from([b(1), b(2)]));
    assert_eq!(
        lbctl_json(&pin, &["selector", "geo", "list"]),
        serde_json::json!([{"subnet": "10.0.0.0/8", "backends": [0, 1]}])
    );

    // Plain errors, exit 1, the table untouched.
    for (args, needle) in [
        (
            vec!["selector", "geo", "del", "10.244.1.0/24"],
            "no entry for 10.244.1.0/24",
        ),
        (
            vec!["selector", "geo", "add", "fd00::/8", "--backends", "0"],
            "not an IPv4 subnet",
        ),
        (
            vec!["selector", "geo", "add", "10.1.0.0/16", "--backends", "16"],
            "not a backend index (0-15",
        ),
    ] {
        let mut full = vec!["--pin-path", pin_s];
        full.extend(args.iter().copied());
        let o = output(lbctl_cmd(&full));
        assert_eq!(o.code, 1, "{args:?}");
        assert!(o.stderr.contains(needle), "{args:?}: {}", o.stderr);
    }
    assert_eq!(t.iter().count(), 1);
    assert_eq!(
        lbctl(&pin, &["selector", "geo", "del", "10.0.0.0/8"]),
        "10.0.0.0/8: deleted\n"
    );
    assert_eq!(
        lbctl(&pin, &["selector", "geo", "list"]),
        "the example's table is empty (every client: the built-in algorithm)\n"
    );
}
